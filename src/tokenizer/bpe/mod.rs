//! Exact byte-pair encoding for `o200k_base` and `cl100k_base`, without tiktoken at run
//! time: the same tokens tiktoken's `encode_ordinary` produces, from tables compiled into
//! the module, so a Wasm VM starts counting without building anything.
//!
//! Three parts, each the counterpart of one step of tiktoken's `CoreBPE::encode_ordinary`:
//!
//! 1. `split`: the encoding's pre-tokenizer regex, hand-written (fancy-regex semantics,
//!    Unicode classes from `classes`).
//! 2. `table`: the rank of a piece's bytes, looked up in hash tables `build.rs` generated
//!    from tiktoken-rs's vocabulary and that are read in place.
//! 3. `merge`: tiktoken's `byte_pair_merge` for pieces that are not a token themselves.
//!
//! Special tokens are not recognised: their spellings (`<|endoftext|>`) are ordinary text,
//! as in `encode_ordinary`. The equivalence with tiktoken-rs, token for token, is what the
//! tests in `tests.rs` check on a large generated corpus.
//!
//! # Where the time goes, and how it is kept short
//!
//! Inside Envoy a count usually starts with cold caches (the proxy's own work between
//! requests evicts L1 and L2), so the design counts cache lines as well as instructions.
//! One loop walks the text: the pre-tokenizer finds the next piece (ASCII pieces on a fast
//! path of byte-table lookups, `split.rs`), the piece is looked up whole (most are tokens),
//! and only the others are merged. A lookup reads one slot of a table chosen by the piece's
//! length, and the slot holds the token's bytes (8- and 12-byte slots for tokens of up to
//! 8 bytes, the great majority), so a hit costs one cache line, not a slot and then the
//! token's bytes elsewhere; the slot also carries the token's rank and whether it can be
//! the left or right part of a merge, which rules most merge candidates out with no lookup
//! at all (`hash.rs`, `table.rs`). Merges start from single bytes as tiktoken's do, except
//! that characters of a vocabulary-derived table start whole where a proof (in
//! `merge.rs`) shows the result cannot differ: a CJK piece then costs about one step per
//! character instead of three. A filter of the keys of 3 to 8 bytes that start with a
//! non-ASCII byte (one bit per hash, set for every such token; `table.rs`) rules out most
//! merges between characters of other scripts than Latin before any table is read. Pair
//! merges already answered are remembered per VM (`joins.rs`), and so are the counts of
//! pieces merged before, up to 62 bytes long, in a bounded direct-mapped memo that
//! compares a piece's bytes before it answers (`pieces.rs`; counts only). The tables are
//! ~3.7 MB (`o200k_base`, its filter 64 KiB) and ~1.7 MB (`cl100k_base`, 8 KiB) of static
//! data, read in place; a VM builds nothing but the memos and counts without allocating
//! unless a piece is longer than 64 bytes.

mod classes;
mod hash;
mod joins;
mod merge;
mod pieces;
mod split;
mod table;

#[cfg(test)]
mod tests;

use std::sync::Mutex;

use joins::Joins;
use merge::Scratch;
use pieces::Pieces;
use table::Vocab;

/// A byte-pair encoder for one encoding. Cheap to create: the vocabulary is static data;
/// the only allocations are the 128 KiB memo of pair merges ([`Joins`]) and, at the first
/// piece a count merges, the 512 KiB memo of merged pieces ([`Pieces`]).
pub struct Bpe {
    vocab: &'static Vocab,
    split: Split,
    joins: Joins,
    /// Taken once per counted text: a VM is one thread, so it is always free there; where
    /// threads share a `Bpe` (tests, native tools), a text counted while another holds it
    /// is counted without the memo.
    pieces: Mutex<Pieces>,
}

/// Which pre-tokenizer (a `match` rather than a function pointer, so each is inlined into
/// its own copy of the encoding loop).
#[derive(Clone, Copy)]
enum Split {
    O200k,
    Cl100k,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpe")
            .field("tokens", &self.vocab.tokens)
            .finish()
    }
}

impl Bpe {
    /// `o200k_base` (GPT-4o, o-series, GPT-5).
    pub fn o200k_base() -> Bpe {
        Bpe {
            vocab: &table::O200K_BASE,
            split: Split::O200k,
            joins: Joins::new(),
            pieces: Mutex::new(Pieces::new()),
        }
    }

    /// `cl100k_base` (GPT-4, GPT-3.5, text-embedding-3).
    pub fn cl100k_base() -> Bpe {
        Bpe {
            vocab: &table::CL100K_BASE,
            split: Split::Cl100k,
            joins: Joins::new(),
            pieces: Mutex::new(Pieces::new()),
        }
    }

    /// False if the embedded table is not the size its constants say (a broken build).
    pub fn is_consistent(&self) -> bool {
        self.vocab.is_consistent()
    }

    /// The number of ordinary tokens (ranks run from 0 to this, exclusive).
    pub fn vocabulary_size(&self) -> usize {
        self.vocab.tokens
    }

    /// How many tokens `text` encodes to. Pieces merged before are counted from the memo
    /// of merged pieces ([`Pieces`]).
    pub fn count(&self, text: &str) -> usize {
        let mut memo = self.pieces.try_lock().ok();
        self.walk(text, memo.as_deref_mut(), &mut |_| {})
    }

    /// [`Bpe::count`] without the memo of merged pieces (every piece that is not a token is
    /// merged): what the memo's tests and benchmarks compare against.
    pub fn count_unremembered(&self, text: &str) -> usize {
        self.walk(text, None, &mut |_| {})
    }

    /// Forget every remembered pair merge and piece; the memos stay allocated. The next
    /// count costs what a VM's first count of text it has never seen costs (benchmarks of
    /// first-seen text use it; counts are the same either way).
    pub fn forget(&self) {
        self.joins.clear();
        if let Ok(mut memo) = self.pieces.lock() {
            memo.clear();
        }
    }

    /// Bytes the memo of merged pieces holds (0 until a count has merged a piece).
    pub fn memo_bytes(&self) -> usize {
        self.pieces.try_lock().map_or(0, |m| m.heap_bytes())
    }

    /// The tokens of every piece of `text` except the last two, and where the last two
    /// start (0 when there are fewer than three pieces): the pieces that no continuation
    /// of the text can change, and the tail that one could. For any `rest`, `count(text +
    /// rest)` is the returned count plus `count(&text[tail..] + rest)` (the proof is in
    /// `split.rs`, "Which pieces are final"; `streamed.rs` relies on it).
    pub fn count_settled(&self, text: &str) -> (usize, usize) {
        let mut memo = self.pieces.try_lock().ok();
        let memo = memo.as_deref_mut();
        match self.split {
            Split::O200k => settled(self.vocab, &self.joins, memo, text, split::o200k_piece_end),
            Split::Cl100k => settled(self.vocab, &self.joins, memo, text, split::cl100k_piece_end),
        }
    }

    /// The tokens (ranks) of `text`, as tiktoken's `encode_ordinary` returns them.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.walk(text, None, &mut |t| out.push(t));
        out
    }

    /// Split `text` into pieces, encode each, hand every token to `emit`; returns the count.
    /// With a `memo`, a remembered piece is counted and its tokens are not emitted: only for
    /// callers that want the count alone.
    #[inline]
    fn walk(&self, text: &str, memo: Option<&mut Pieces>, emit: &mut impl FnMut(u32)) -> usize {
        let (vocab, joins) = (self.vocab, &self.joins);
        match self.split {
            Split::O200k => walk(vocab, joins, memo, text, split::o200k_piece_end, emit),
            Split::Cl100k => walk(vocab, joins, memo, text, split::cl100k_piece_end, emit),
        }
    }
}

// Plain arithmetic in the loop over every piece of every counted text: `p < b.len()` (the
// loop's condition), so `p + 1` cannot overflow, and `count` is the number of tokens so
// far, at most the number of bytes walked (a token has at least one byte), so it cannot
// either.
#[allow(clippy::arithmetic_side_effects)]
#[inline(always)]
fn walk(
    vocab: &Vocab,
    joins: &Joins,
    mut memo: Option<&mut Pieces>,
    text: &str,
    piece_end: impl Fn(&[u8], usize) -> usize,
    emit: &mut impl FnMut(u32),
) -> usize {
    let b = text.as_bytes();
    let mut scratch = Scratch::new();
    let mut count = 0;
    let mut p = 0;
    while p < b.len() {
        // A piece is never empty and never runs past the text (a broken pre-tokenizer
        // could only make the count wrong, not loop or panic).
        let end = match piece_end(b, p) {
            end if end > p && end <= b.len() => end,
            _ => p + 1,
        };
        if let Some(info) = vocab.info_in(b, p, end) {
            emit(info & hash::RANK_MASK);
            count += 1;
        } else if let Some(piece) = b.get(p..end) {
            let mut merged =
                || merge::merge(vocab, joins, piece, merge::Start::Chars, &mut scratch, emit);
            count += match memo.as_deref_mut() {
                Some(memo) => memo.count_or(piece, merged),
                None => merged(),
            };
        }
        p = end;
    }
    count
}

/// [`Bpe::count_settled`]: the pieces are found as [`walk`] finds them, and each is counted
/// once two more have been found after it. Plain arithmetic for the same reasons as
/// [`walk`]'s (positions below `b.len()`, a count at most the bytes walked).
#[allow(clippy::arithmetic_side_effects)]
fn settled(
    vocab: &Vocab,
    joins: &Joins,
    mut memo: Option<&mut Pieces>,
    text: &str,
    piece_end: impl Fn(&[u8], usize) -> usize,
) -> (usize, usize) {
    let b = text.as_bytes();
    let mut scratch = Scratch::new();
    let mut count = 0;
    // Where the last two pieces found so far start, the older first; `found` counts the
    // pieces up to two.
    let (mut older, mut newer) = (0, 0);
    let mut found = 0;
    let mut p = 0;
    while p < b.len() {
        let end = match piece_end(b, p) {
            end if end > p && end <= b.len() => end,
            _ => p + 1,
        };
        if found == 2 {
            // The piece at `older` now has two pieces after it: final.
            if vocab.info_in(b, older, newer).is_some() {
                count += 1;
            } else if let Some(piece) = b.get(older..newer) {
                let mut merged = || {
                    let start = merge::Start::Chars;
                    merge::merge(vocab, joins, piece, start, &mut scratch, &mut |_| {})
                };
                count += match memo.as_deref_mut() {
                    Some(memo) => memo.count_or(piece, merged),
                    None => merged(),
                };
            }
        } else {
            found += 1;
        }
        (older, newer) = if found == 1 { (p, p) } else { (newer, p) };
        p = end;
    }
    (count, if found == 2 { older } else { 0 })
}
