//! The tokenizer against its reference: arbitrary bytes (as UTF-8, invalid sequences
//! replaced) encoded by `tokenfuse::tokenizer::bpe` and by tiktoken-rs's `encode_ordinary`, both
//! encodings.
//!
//! Then the same text streamed: cut at a point and in chunks chosen from a hash of the
//! input (so the committed seeds keep their meaning), counted with `Bpe::count_settled` and
//! with `StreamedText` (scanning after every chunk, and at its own batched pace).
//!
//! `Bpe::count` goes through the memo of merged pieces, which persists from input to input
//! (a fuzzing process keeps one `Bpe` per encoding): its pieces are counted first merged,
//! then remembered (the second count below, and the counts of the streamed checks), after
//! collisions and evictions by every earlier input's pieces.
//!
//! Invariants: the token ids are identical, and the count is their number, with the memo
//! and without it (`count_unremembered`); the pieces
//! `count_settled` lets go plus the count of the rest make the whole count, at the cut and
//! over every chunking.

#![no_main]

mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tiktoken_rs::CoreBPE;
use tokenfuse::tokenizer::bpe::Bpe;
use tokenfuse::tokenizer::streamed::StreamedText;
use tokenfuse::tokenizer::Encoding;

struct Pair {
    ours: Bpe,
    reference: CoreBPE,
}

fn pairs() -> &'static [Pair; 2] {
    static P: OnceLock<[Pair; 2]> = OnceLock::new();
    P.get_or_init(|| {
        [
            Pair {
                ours: Bpe::o200k_base(),
                reference: tiktoken_rs::o200k_base().expect("tiktoken-rs builds o200k_base"),
            },
            Pair {
                ours: Bpe::cl100k_base(),
                reference: tiktoken_rs::cl100k_base().expect("tiktoken-rs builds cl100k_base"),
            },
        ]
    })
}

/// splitmix64 over a hash of the input: the chunk sizes.
struct Rng(u64);

impl Rng {
    fn new(data: &[u8]) -> Rng {
        // FNV-1a.
        let seed = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A character boundary of `text` after `from`, at most `most` bytes on (or the end).
    fn boundary(&mut self, text: &str, from: usize, most: u64) -> usize {
        let mut at = from + 1 + (self.next() % most) as usize;
        if at >= text.len() {
            return text.len();
        }
        while !text.is_char_boundary(at) {
            at += 1;
        }
        at
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for pair in pairs() {
        let want = pair.reference.encode_ordinary(&text);
        assert_eq!(pair.ours.encode(&text), want, "{text:?}");
        assert_eq!(pair.ours.count(&text), want.len(), "{text:?}");
        assert_eq!(pair.ours.count(&text), want.len(), "{text:?} remembered");
        assert_eq!(pair.ours.count_unremembered(&text), want.len(), "{text:?}");
    }
    if text.is_empty() {
        return;
    }
    let mut rng = Rng::new(data);
    for (pair, encoding) in pairs().iter().zip([Encoding::O200kBase, Encoding::Cl100kBase]) {
        let whole = pair.ours.count(&text);
        // One cut: what is let go, plus the rest counted from the tail, is the whole.
        let cut = rng.boundary(&text, 0, text.len() as u64);
        let (settled, tail) = pair.ours.count_settled(&text[..cut]);
        assert!(tail <= cut && text.is_char_boundary(tail), "{text:?} at {cut}");
        assert_eq!(settled + pair.ours.count(&text[tail..]), whole, "{text:?} at {cut}");
        // Chunks of 1 to 16 bytes (or up to the whole text), through StreamedText.
        let counter = common::counter(encoding);
        let most = if rng.next() % 4 == 0 { text.len() as u64 } else { 16 };
        let mut eager = StreamedText::new();
        let mut batched = StreamedText::new();
        let mut at = 0;
        let mut chunks = Vec::new();
        while at < text.len() {
            let next = rng.boundary(&text, at, most);
            let chunk = &text[at..next];
            chunks.push(chunk);
            eager.push(chunk, counter);
            eager.settle(counter);
            batched.push(chunk, counter);
            at = next;
        }
        eager.cut(counter);
        batched.cut(counter);
        assert_eq!(eager.counted(), whole as u64, "{chunks:?}");
        assert_eq!(batched.counted(), whole as u64, "{chunks:?}");
    }
});
