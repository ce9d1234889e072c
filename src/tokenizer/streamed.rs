//! Streamed text counted as it arrives, holding only what can still change.
//!
//! A streamed answer arrives a few characters at a time. Counting it at the end meant
//! holding all of it; [`StreamedText`] instead counts every pre-tokenizer piece as soon as
//! no continuation can change it and keeps only the rest: the last two pieces of what it
//! has scanned (why two suffice is proved in `bpe/split.rs`, "Which pieces are final"),
//! plus what arrived since its last scan. The total is exactly the count of the whole text
//! ([`TextCounter::count`]), whatever the chunks.
//!
//! Scans are batched: the held text is scanned once what arrived since the last scan is
//! at least [`SCAN_EVERY`] bytes and at least as long as the tail the last scan kept. Each
//! scan then reads at most twice the bytes that arrived since the previous one, so the
//! work stays linear in the text even when one piece never ends (a megabyte of letters),
//! and ordinary prose holds under `SCAN_EVERY` bytes plus two pieces and the last delta.
//! A piece that never ends still grows the tail: the caller bounds it ([`StreamedText::cut`]).

use crate::tokenizer::TextCounter;

/// The bytes that arrive between two scans of ordinary text (a scan re-reads the tail of
/// two pieces, so scanning every few bytes would read most text several times).
pub const SCAN_EVERY: usize = 1024;

/// One stream's text (one choice of one response), counted as it arrives.
#[derive(Debug, Default)]
pub struct StreamedText {
    /// Not yet counted: the tail the last scan kept, then what arrived since.
    held: String,
    /// Bytes at the end of `held` that arrived since the last scan.
    unscanned: usize,
    /// Tokens of the text already let go.
    counted: u64,
}

impl StreamedText {
    /// Nothing streamed yet (no allocation).
    pub fn new() -> Self {
        Self::default()
    }

    /// Append `text`, and count the pieces that have become final if it is time to scan.
    pub fn push(&mut self, text: &str, counter: TextCounter<'_>) {
        self.held.push_str(text);
        self.unscanned = self.unscanned.saturating_add(text.len());
        let tail = self.held.len().saturating_sub(self.unscanned);
        if self.unscanned >= tail.max(SCAN_EVERY) {
            self.settle(counter);
        }
    }

    /// Count every piece of the held text that no continuation can change, and let it go.
    pub fn settle(&mut self, counter: TextCounter<'_>) {
        if self.unscanned == 0 {
            return; // scanned already: the same tail again
        }
        let (tokens, tail) = counter.count_settled(&self.held);
        if self.held.is_char_boundary(tail) {
            self.counted = self.counted.saturating_add(tokens);
            self.held.drain(..tail);
            self.unscanned = 0;
        } else {
            // A piece boundary is always a character boundary; should the pre-tokenizer
            // ever say otherwise, count the text as if it ended here rather than panic.
            self.cut(counter);
        }
    }

    /// Count the held text as if the stream ended here and let it go (its allocation
    /// too): the end of the stream, or a tail past the caller's bound. After a cut that is
    /// not the end, a piece straddling it is counted as two.
    pub fn cut(&mut self, counter: TextCounter<'_>) {
        let held = std::mem::take(&mut self.held);
        self.counted = self.counted.saturating_add(counter.count(&held));
        self.unscanned = 0;
    }

    /// Tokens counted so far (all of them after [`StreamedText::cut`]).
    pub fn counted(&self) -> u64 {
        self.counted
    }

    /// Bytes of text held, not yet counted.
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// Bytes allocated for the held text (at least [`StreamedText::held_bytes`]).
    pub fn allocated_bytes(&self) -> usize {
        self.held.capacity()
    }

    /// Give back the allocation beyond what the held text needs (after a big delta).
    pub fn shrink(&mut self) {
        self.held.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests_support::shared;
    use crate::tokenizer::Encoding;

    fn counters() -> [TextCounter<'static>; 2] {
        let t = shared();
        [
            t.counter(Encoding::O200kBase).unwrap(),
            t.counter(Encoding::Cl100kBase).unwrap(),
        ]
    }

    /// The count of `chunks` fed one by one, scanning after every chunk (the batching
    /// would otherwise hide most split points), and at the batching's own pace.
    fn streamed(chunks: &[&str], counter: TextCounter<'_>) -> (u64, u64) {
        let mut eager = StreamedText::new();
        let mut batched = StreamedText::new();
        for c in chunks {
            eager.push(c, counter);
            eager.settle(counter);
            batched.push(c, counter);
        }
        eager.cut(counter);
        batched.cut(counter);
        (eager.counted(), batched.counted())
    }

    #[test]
    fn every_two_way_split_counts_like_the_whole_text() {
        let text = "Hello! How can I help you today? I'm     here\n\n  for   you: 12345 don't WE'LL \u{301}AB 中A 中文Ab x'l";
        for counter in counters() {
            let whole = counter.count(text);
            for (at, _) in text.char_indices().skip(1) {
                let (a, b) = text.split_at(at);
                assert_eq!(streamed(&[a, b], counter), (whole, whole), "{a:?} | {b:?}");
            }
        }
    }

    #[test]
    fn settled_pieces_are_those_before_the_last_two() {
        for counter in counters() {
            // One piece, two pieces: nothing is final yet.
            assert_eq!(counter.count_settled("hello"), (0, 0));
            assert_eq!(counter.count_settled("hello world"), (0, 0));
            // Three: the first is.
            assert_eq!(counter.count_settled("hello big world"), (1, 5));
            assert_eq!(counter.count_settled(""), (0, 0));
        }
    }

    #[test]
    fn pieces_that_merge_with_what_follows_are_kept() {
        // Each prefix ends in pieces that the continuation joins or splits: the upper-case
        // run that A1 gives back, a contraction, a white-space run, a number.
        for (head, rest) in [
            ("x 中A", "b"),
            ("x \u{301}AB", "c"),
            ("x don'", "t"),
            ("x don'l", "l"),
            ("x   \n  ", "\n"),
            ("x   \n  ", "y"),
            ("x 12", "3456"),
            ("x !!", "\n/"),
        ] {
            for counter in counters() {
                let whole = counter.count(&format!("{head}{rest}"));
                assert_eq!(streamed(&[head, rest], counter), (whole, whole), "{head:?}");
            }
        }
    }

    #[test]
    fn one_endless_piece_is_held_whole_and_scanned_linearly() {
        let counter = counters()[0];
        let mut s = StreamedText::new();
        let mut scans = 0;
        for _ in 0..10_000 {
            let before = s.unscanned;
            s.push("aaaaaaaaaa", counter);
            if s.unscanned < before {
                scans += 1;
            }
        }
        // 100 KB of one piece: nothing is final, and the doubling rule scanned it only a
        // few times (every time the new text matched the tail), not once per chunk.
        assert_eq!((s.counted(), s.held_bytes()), (0, 100_000));
        assert!(scans < 12, "{scans} scans");
        s.cut(counter);
        assert_eq!(s.counted(), counter.count(&"a".repeat(100_000)));
        assert_eq!((s.held_bytes(), s.allocated_bytes()), (0, 0));
    }
}
