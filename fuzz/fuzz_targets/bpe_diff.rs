//! The tokenizer against its reference: arbitrary bytes (as UTF-8, invalid sequences
//! replaced) encoded by `tokenfuse::tokenizer::bpe` and by tiktoken-rs's `encode_ordinary`, both
//! encodings.
//!
//! Invariants: the token ids are identical, and the count is their number.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tiktoken_rs::CoreBPE;
use tokenfuse::tokenizer::bpe::Bpe;

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

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for pair in pairs() {
        let want = pair.reference.encode_ordinary(&text);
        assert_eq!(pair.ours.encode(&text), want, "{text:?}");
        assert_eq!(pair.ours.count(&text), want.len(), "{text:?}");
    }
});
