//! Byte-pair merging of one piece, as tiktoken's `byte_pair_merge` does it: start from
//! single bytes and repeatedly merge the adjacent pair whose concatenated bytes have the
//! lowest rank (the leftmost such pair on a tie) until no adjacent pair is a token.
//!
//! Pieces that are a token by themselves never get here (the caller looks the whole piece
//! up first, as tiktoken does). Parts are linked by their start offsets, so a merge moves
//! nothing. Pieces of up to 64 bytes find each merge by a scan over keys `rank << 8 | … |
//! offset` (the smallest key is the lowest rank at the leftmost offset, tiktoken's choice),
//! visiting only offsets that hold a candidate (a 64-bit mask), in arrays kept for the whole
//! text ([`Scratch`]); longer ones keep (rank, offset) candidates in a heap and skip stale
//! ones, like tiktoken's `_byte_pair_merge_large` (a piece of n bytes would otherwise cost n²
//! steps). Both give the same tokens; the tests check them against each other and
//! against tiktoken-rs.
//!
//! Whether two parts merge is asked of [`pair_info`]: the parts' prefix/suffix bits (part
//! of every token's info) rule most pairs out without a lookup, a bitmap answers for two
//! single bytes, a filter rules out most pairs of 3..=8 bytes that start with a non-ASCII
//! byte (bytes of a CJK character that is not a token, two CJK characters:
//! `Vocab::may_be_token`), and the [`Joins`] memo remembers the rest.
//!
//! # Starting from whole characters
//!
//! Merging a CJK piece byte by byte spends most of its steps putting each 3-byte character
//! back together before any merge between characters. [`Start::Chars`] starts such a
//! character as one part instead, when that provably changes nothing. Let `c` be a
//! character that is a token, whose bytes merged on their own become `c`, and let `M` be the
//! highest rank among those merges. Suppose every token that can form around `c` in this
//! piece and holds bytes of `c` and bytes outside it has a rank above `M`: tokens that
//! contain `c` and more; tokens that end with a proper prefix of `c` after the character on
//! its left; tokens that start with a proper suffix of `c` before the character on its
//! right. Then the merge from bytes (B) and the merge from whole `c` (C) give the same
//! tokens:
//!
//! * While `c` is incomplete in B, its inside holds a candidate of rank ≤ M (the next of
//!   its own merges: the parts inside it are the ones it has on its own, since nothing
//!   outside has touched them yet). A merge joining part of `c` with bytes outside it would
//!   have a rank above M, so it never is the lowest candidate: no such merge happens, `c`
//!   completes in B as on its own, and the first merge B makes that involves `c` takes it
//!   whole.
//! * Every candidate C has that B lacks joins a whole `c` with a neighbour: its token
//!   contains `c` and more, so its rank is above M, above the candidate inside `c` that B has
//!   instead while `c` is incomplete. Whenever B merges between whole parts, that merge is
//!   therefore also the lowest (and, on a tie, leftmost) candidate C has in the same state;
//!   B's merges between whole parts are C's merges, in C's order, and B ends when C does.
//!
//! The argument is per character, so characters that qualify start whole and the others
//! from bytes, in one piece. `build.rs` checks the condition for every character token
//! against the whole vocabulary, per group of the neighbours' lead bytes
//! (`hash::lead_group`: a token " \xe4" rules out a CJK character after a space, not after
//! another CJK character), and stores those that pass in the vocabulary's `chars` table
//! with one mask bit per group and side; [`initial_parts`] tests the actual neighbours.
//! Only valid UTF-8 qualifies (a neighbour is a whole character), which a `str`'s piece is.
//! The tests check every table character next to neighbours of each group, and random
//! runs, against a plain merge from bytes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::hash::{self, PREFIX, RANK_MASK, SUFFIX};
use super::joins::Joins;
use super::table::Vocab;

/// Pieces of at most this many bytes take the scan path.
pub(super) const SMALL: usize = 64;

const NONE: u32 = u32::MAX;

/// A scan key: `rank << 8 | affix bits << 6 | offset`. The smallest key is the lowest rank
/// at the leftmost offset (one rank has one set of affix bits), and the key holds the whole
/// info of the merged token.
const OFFSET_BITS: u32 = 6;
const OFFSET_MASK: u32 = (1 << OFFSET_BITS) - 1;
const AFFIX_SHIFT: u32 = super::hash::RANK_BITS;
const _: () = assert!(SMALL <= 1 << OFFSET_BITS && super::hash::INFO_BITS + OFFSET_BITS < 32);

/// Working memory for merges, kept for a whole text so that merging a short piece
/// initialises only as many entries as the piece has bytes (the arrays are indexed by byte
/// offset; entries past the piece's end are stale and never read).
pub(super) struct Scratch {
    /// The piece, zero-padded, so every key of up to 8 bytes is one 8-byte load.
    text: [u8; SMALL + 8],
    /// For each offset that starts a part: where the part ends,
    end: [u8; SMALL],
    /// where the previous one starts,
    prev: [u8; SMALL],
    /// the part's own info,
    token: [u32; SMALL],
    /// and the scan key of its merge with the next part (NONE: not a token, no next part,
    /// or the offset no longer starts a part).
    key: [u32; SMALL],
    /// The heap path's parts and candidates (allocated on first use).
    parts: Vec<Part>,
    heap: BinaryHeap<Reverse<(u32, u32)>>,
}

impl Scratch {
    pub(super) fn new() -> Scratch {
        Scratch {
            text: [0; SMALL + 8],
            end: [0; SMALL],
            prev: [0; SMALL],
            token: [0; SMALL],
            key: [NONE; SMALL],
            parts: Vec::new(),
            heap: BinaryHeap::new(),
        }
    }
}

/// One token of a piece being merged (an entry of a doubly linked list over the piece).
#[derive(Clone, Copy)]
struct Part {
    /// Byte offset where this part ends (where the next one starts).
    end: u32,
    /// Start of the previous part (`NONE` for the first).
    prev: u32,
    /// Info of this part merged with the next one, or `NONE`.
    pair: u32,
    /// Info of this part's own bytes.
    token: u32,
}

/// The info of the token that adjacent parts with infos `left` and `right`, together
/// spelled `text[start..end]`, merge into; `NONE` if they do not.
// `start < end`: the callers pass the start of a part and the end of the next one (so
// `end - start`, asked for every candidate merge, cannot underflow).
#[allow(clippy::arithmetic_side_effects)]
#[inline(always)]
fn pair_info(
    vocab: &Vocab,
    joins: &Joins,
    left: u32,
    right: u32,
    text: &[u8],
    start: usize,
    end: usize,
) -> u32 {
    if left & PREFIX == 0 || right & SUFFIX == 0 {
        return NONE;
    }
    if end - start == 2 {
        // Two single bytes: the bitmap answers, and the table only for a token.
        return match vocab.info_in(text, start, end) {
            Some(info) => info,
            None => NONE,
        };
    }
    // Parts of characters of other scripts than Latin, rarely a token together: the filter
    // answers most of them before the memo or a table is read.
    if !vocab.may_be_token(text, start, end - start) {
        return NONE;
    }
    joins
        .get_or(left & RANK_MASK, right & RANK_MASK, || {
            vocab.info_in(text, start, end)
        })
        .unwrap_or(NONE)
}

/// Where a merge starts from: single bytes, or whole characters where that is safe.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Start {
    /// Every byte a part, as tiktoken starts.
    Bytes,
    /// The piece is valid UTF-8 (a `str`'s piece): characters of the vocabulary's `chars`
    /// table start whole when their neighbours allow it.
    Chars,
}

/// Merge `piece` (at least 2 bytes, not itself a token) and hand each resulting token's rank
/// to `emit`, in order. Returns the number of tokens.
pub(super) fn merge(
    vocab: &Vocab,
    joins: &Joins,
    piece: &[u8],
    start: Start,
    scratch: &mut Scratch,
    emit: &mut impl FnMut(u32),
) -> usize {
    if piece.len() <= SMALL {
        merge_small(vocab, joins, piece, start, scratch, emit)
    } else {
        merge_large(vocab, joins, piece, start, scratch, emit)
    }
}

/// The parts a merge of `piece` starts from, in order: `part(start, end, info)`; `keys`
/// holds the piece's bytes at the same offsets (padded, or the piece itself). With
/// [`Start::Chars`], a character of the `chars` table is one part when the lead-byte groups
/// of the characters before and after it (if any) have their bits in its masks.
// Plain indexing and arithmetic on the hot path of every merge: `i` and `j` are offsets
// below `n = piece.len()` (the loop conditions), `i + len` at most `n + 3` (`len` is 1 to 4)
// and clamped to `n` before use, `8 + lead_group` at most 15 (a group is below 8).
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
#[inline(always)]
fn initial_parts(
    vocab: &Vocab,
    piece: &[u8],
    keys: &[u8],
    start: Start,
    mut part: impl FnMut(usize, usize, u32),
) {
    if start == Start::Bytes || piece.is_ascii() {
        for (i, &b) in piece.iter().enumerate() {
            part(i, i + 1, vocab.byte(b));
        }
        return;
    }
    let n = piece.len();
    let mut i = 0;
    // Mask bit of the lead-byte group of the character before the one at i (all bits for
    // none).
    let mut left_bit = u32::MAX;
    while i < n {
        let lead = piece[i];
        // A stray continuation byte (never in a `str`'s piece) is a part of its own.
        let len = hash::utf8_len(lead).max(1);
        let end = (i + len).min(n);
        if len > 1 && end == i + len {
            let key = hash::key_at(keys, i, len);
            if let Some((info, masks)) = vocab.char_info(key, len) {
                let right_bit = piece
                    .get(end)
                    .map_or(u32::MAX, |&next| 1 << (8 + hash::lead_group(next)));
                if masks & left_bit != 0 && masks & right_bit != 0 {
                    part(i, end, info);
                    left_bit = 1 << hash::lead_group(lead);
                    i = end;
                    continue;
                }
            }
        }
        for (j, &b) in piece.iter().enumerate().take(end).skip(i) {
            part(j, j + 1, vocab.byte(b));
        }
        left_bit = 1 << hash::lead_group(lead);
        i = end;
    }
}

/// The scan path: each merge scans the keys of the offsets that hold a candidate (a
/// 64-bit mask), updates the two neighbouring candidates, and moves nothing.
// Plain indexing and arithmetic in the scan, the tokenizer's innermost loop: every index
// is an offset below `n <= SMALL` (the arrays' length; `text` has SMALL + 8) — a part's
// start, as `initial_parts` and each merge record it in `end` and `prev` (ends are at most
// `n`, and an end is used as an index only once it is checked to be below `n`), or the
// lowest set bit of a nonzero 64-bit mask. `count` is the number of parts, one fewer per
// merge, and `rest - 1` is taken while `rest` is nonzero.
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
pub(super) fn merge_small(
    vocab: &Vocab,
    joins: &Joins,
    piece: &[u8],
    start: Start,
    scratch: &mut Scratch,
    emit: &mut impl FnMut(u32),
) -> usize {
    let n = piece.len();
    let Scratch {
        text,
        end,
        prev,
        token,
        key,
        ..
    } = scratch;
    let Some(padded) = text.get_mut(..n + 8) else {
        return 0;
    };
    let (dst, pad) = padded.split_at_mut(n);
    dst.copy_from_slice(piece);
    pad.fill(0);
    let text = &*text;
    let mut count = 0;
    let mut last = 0;
    initial_parts(vocab, piece, text, start, |from, to, info| {
        end[from] = to as u8;
        prev[from] = last as u8;
        token[from] = info;
        last = from;
        count += 1;
    });
    let keyed = |info: u32, at: usize| {
        if info == NONE {
            NONE
        } else {
            (info & RANK_MASK) << 8 | (info >> AFFIX_SHIFT) << OFFSET_BITS | at as u32
        }
    };
    // Bit i set: key[i] is a candidate (not NONE). The scan visits only those; once the
    // bytes of a piece have formed characters, few are left.
    let mut live = 0u64;
    let mut put = |key: &mut [u32; SMALL], at: usize, k: u32| {
        key[at] = k;
        if k == NONE {
            live &= !(1 << at);
        } else {
            live |= 1 << at;
        }
        live
    };
    let mut candidates = 0;
    let mut i = 0;
    while usize::from(end[i]) < n {
        let next = usize::from(end[i]);
        let next_end = usize::from(end[next]);
        let info = pair_info(vocab, joins, token[i], token[next], text, i, next_end);
        candidates = put(key, i, keyed(info, i));
        i = next;
    }
    loop {
        let mut best = NONE;
        let mut rest = candidates;
        while rest != 0 {
            best = best.min(key[rest.trailing_zeros() as usize]);
            rest &= rest - 1;
        }
        if best == NONE {
            break;
        }
        let info = (best >> 8) | ((best >> OFFSET_BITS) & 3) << AFFIX_SHIFT;
        let left = (best & OFFSET_MASK) as usize;
        let right = usize::from(end[left]);
        let right_end = usize::from(end[right]);
        end[left] = right_end as u8;
        token[left] = info;
        put(key, right, NONE);
        count -= 1;
        let k = if right_end < n {
            prev[right_end] = left as u8;
            let next_end = usize::from(end[right_end]);
            keyed(
                pair_info(vocab, joins, info, token[right_end], text, left, next_end),
                left,
            )
        } else {
            NONE
        };
        candidates = put(key, left, k);
        if left > 0 {
            let before = usize::from(prev[left]);
            let joined = pair_info(vocab, joins, token[before], info, text, before, right_end);
            candidates = put(key, before, keyed(joined, before));
        }
    }
    let mut i = 0;
    while i < n {
        emit(token[i] & RANK_MASK);
        i = usize::from(end[i]);
    }
    count
}

/// The heap path: candidate merges (rank, start) in a min-heap, stale ones skipped when
/// popped.
// Plain indexing and arithmetic, as in `merge_small`: `parts` has `n` entries, and every
// index is a part's start below `n` (an end reaches `n` only for the last part, and is
// checked against `n` before it is used as an index); `count` is the number of parts,
// one fewer per merge.
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
pub(super) fn merge_large(
    vocab: &Vocab,
    joins: &Joins,
    piece: &[u8],
    start: Start,
    scratch: &mut Scratch,
    emit: &mut impl FnMut(u32),
) -> usize {
    let n = piece.len();
    let parts = &mut scratch.parts;
    let heap = &mut scratch.heap;
    parts.clear();
    heap.clear();
    // Parts are indexed by their start offset; parts[i] is meaningful while i starts a part.
    let unused = Part {
        end: NONE,
        prev: NONE,
        pair: NONE,
        token: NONE,
    };
    parts.resize(n, unused);
    let mut count = 0;
    let mut last = NONE;
    initial_parts(vocab, piece, piece, start, |from, to, info| {
        parts[from] = Part {
            end: to as u32,
            prev: last,
            pair: NONE,
            token: info,
        };
        last = from as u32;
        count += 1;
    });
    let rank = |info: u32| if info == NONE { NONE } else { info & RANK_MASK };
    let mut i = 0;
    while (parts[i].end as usize) < n {
        let next = parts[i].end as usize;
        let next_end = parts[next].end as usize;
        let pair = pair_info(
            vocab,
            joins,
            parts[i].token,
            parts[next].token,
            piece,
            i,
            next_end,
        );
        parts[i].pair = pair;
        if pair != NONE {
            heap.push(Reverse((rank(pair), i as u32)));
        }
        i = next;
    }
    while let Some(Reverse((pair_rank, at))) = heap.pop() {
        let left = at as usize;
        let info = parts[left].pair;
        if rank(info) != pair_rank {
            continue; // stale: this part has changed since the candidate was pushed
        }
        let right = parts[left].end as usize;
        let right_end = parts[right].end as usize;
        // Merge left and right.
        parts[left].end = right_end as u32;
        parts[left].token = info;
        parts[right].pair = NONE; // `right` no longer starts a part
        count -= 1;
        // New candidates: left with its new neighbour, and the previous part with left.
        parts[left].pair = if right_end < n {
            parts[right_end].prev = left as u32;
            let next_end = parts[right_end].end as usize;
            let right_token = parts[right_end].token;
            pair_info(vocab, joins, info, right_token, piece, left, next_end)
        } else {
            NONE
        };
        if parts[left].pair != NONE {
            heap.push(Reverse((rank(parts[left].pair), left as u32)));
        }
        let prev = parts[left].prev;
        if prev != NONE {
            let prev = prev as usize;
            let prev_token = parts[prev].token;
            parts[prev].pair = pair_info(vocab, joins, prev_token, info, piece, prev, right_end);
            if parts[prev].pair != NONE {
                heap.push(Reverse((rank(parts[prev].pair), prev as u32)));
            }
        }
    }
    let mut i = 0;
    while i < n {
        emit(parts[i].token & RANK_MASK);
        i = parts[i].end as usize;
    }
    count
}
