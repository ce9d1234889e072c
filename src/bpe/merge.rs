//! Byte-pair merging of one piece, as tiktoken's `byte_pair_merge` does it: start from
//! single bytes and repeatedly merge the adjacent pair whose concatenated bytes have the
//! lowest rank (the leftmost such pair on a tie) until no adjacent pair is a token.
//!
//! Pieces that are a token by themselves never get here (the caller looks the whole piece
//! up first, as tiktoken does). Parts are linked by their start offsets, so a merge moves
//! nothing. Pieces of up to 64 bytes find each merge by a scan over keys `rank << 6 | offset`
//! on the stack (the smallest key is the lowest rank at the leftmost offset, tiktoken's
//! choice), visiting only offsets that hold a candidate (a 64-bit mask); longer ones keep (rank, offset) candidates in a heap and skip
//! stale ones, like tiktoken's `_byte_pair_merge_large` (a piece of n bytes would otherwise
//! cost n² steps). Both give the same tokens; the tests check them against each other and
//! against tiktoken-rs.
//!
//! Whether two parts merge is asked of [`pair_rank`]: a bitmap answers for two single
//! bytes, the vocabulary's prefix/suffix bits rule most other pairs out without a lookup,
//! and the [`Joins`] memo remembers the rest.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::joins::Joins;
use super::table::Vocab;

/// Pieces of at most this many bytes take the scan path, on the stack.
pub(super) const SMALL: usize = 64;

const NONE: u32 = u32::MAX;

/// Offsets of a short piece fit 6 bits (SMALL is 64); ranks (18 bits, `hash.rs`) fit above.
const OFFSET_BITS: u32 = 6;
const OFFSET_MASK: u32 = (1 << OFFSET_BITS) - 1;
const _: () = assert!(SMALL <= 1 << OFFSET_BITS && super::hash::RANK_BITS + OFFSET_BITS < 32);

/// Reusable buffers for long pieces (allocated on first use, kept for a whole text).
#[derive(Default)]
pub(super) struct Scratch {
    parts: Vec<Part>,
    heap: BinaryHeap<Reverse<(u32, u32)>>,
}

/// One token of a piece being merged (an entry of a doubly linked list over the piece).
#[derive(Clone, Copy)]
struct Part {
    /// Byte offset where this part ends (where the next one starts).
    end: u32,
    /// Start of the previous part (`NONE` for the first).
    prev: u32,
    /// Rank of this part merged with the next one, or `NONE`.
    pair: u32,
    /// Rank of this part's own bytes.
    token: u32,
}

/// The rank of the token that adjacent parts with tokens `left` and `right`, together
/// spelled `bytes`, merge into; `NONE` if they do not.
#[inline(always)]
fn pair_rank(vocab: &Vocab, joins: &Joins, left: u32, right: u32, bytes: &[u8]) -> u32 {
    let possible = match *bytes {
        [b0, b1] => vocab.is_pair(b0, b1),
        _ => vocab.may_join(left, right),
    };
    if !possible {
        return NONE;
    }
    joins
        .get_or(left, right, || vocab.rank(bytes))
        .unwrap_or(NONE)
}

/// Merge `piece` (at least 2 bytes, not itself a token) and hand each resulting token's rank
/// to `emit`, in order. Returns the number of tokens.
pub(super) fn merge(
    vocab: &Vocab,
    joins: &Joins,
    piece: &[u8],
    scratch: &mut Scratch,
    emit: &mut impl FnMut(u32),
) -> usize {
    if piece.len() <= SMALL {
        merge_small(vocab, joins, piece, emit)
    } else {
        merge_large(vocab, joins, piece, scratch, emit)
    }
}

/// The scan path. For each offset that starts a part: where the part ends, where the
/// previous one starts, the part's own rank, and the key of its merge with the next part
/// (NONE: not a token, no next part, or the offset no longer starts a part).
pub(super) fn merge_small(
    vocab: &Vocab,
    joins: &Joins,
    piece: &[u8],
    emit: &mut impl FnMut(u32),
) -> usize {
    let n = piece.len();
    debug_assert!((2..=SMALL).contains(&n));
    let mut end = [0u8; SMALL];
    let mut prev = [0u8; SMALL];
    let mut key = [NONE; SMALL];
    let mut token = [0u32; SMALL];
    let keyed = |rank: u32, at: usize| {
        if rank == NONE {
            NONE
        } else {
            rank << OFFSET_BITS | at as u32
        }
    };
    for i in 0..n {
        end[i] = i as u8 + 1;
        prev[i] = i.saturating_sub(1) as u8;
        token[i] = vocab.byte_ranks[usize::from(piece[i])];
    }
    // Bit i set: key[i] is a candidate (not NONE). The scan visits only those; once the
    // bytes of a piece have formed characters, few are left.
    let mut candidates = 0u64;
    let put = |key: &mut [u32; SMALL], candidates: &mut u64, at: usize, k: u32| {
        key[at] = k;
        if k == NONE {
            *candidates &= !(1 << at);
        } else {
            *candidates |= 1 << at;
        }
    };
    for i in 0..n - 1 {
        let rank = pair_rank(vocab, joins, token[i], token[i + 1], &piece[i..i + 2]);
        put(&mut key, &mut candidates, i, keyed(rank, i));
    }
    let mut count = n;
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
        let rank = best >> OFFSET_BITS;
        let left = (best & OFFSET_MASK) as usize;
        let right = usize::from(end[left]);
        let right_end = usize::from(end[right]);
        end[left] = right_end as u8;
        token[left] = rank;
        put(&mut key, &mut candidates, right, NONE);
        count -= 1;
        let k = if right_end < n {
            prev[right_end] = left as u8;
            let bytes = &piece[left..usize::from(end[right_end])];
            keyed(pair_rank(vocab, joins, rank, token[right_end], bytes), left)
        } else {
            NONE
        };
        put(&mut key, &mut candidates, left, k);
        if left > 0 {
            let before = usize::from(prev[left]);
            let bytes = &piece[before..right_end];
            let k = keyed(pair_rank(vocab, joins, token[before], rank, bytes), before);
            put(&mut key, &mut candidates, before, k);
        }
    }
    let mut i = 0;
    while i < n {
        emit(token[i]);
        i = usize::from(end[i]);
    }
    count
}

/// The heap path: candidate merges (rank, start) in a min-heap, stale ones skipped when
/// popped.
pub(super) fn merge_large(
    vocab: &Vocab,
    joins: &Joins,
    piece: &[u8],
    scratch: &mut Scratch,
    emit: &mut impl FnMut(u32),
) -> usize {
    let n = piece.len();
    let parts = &mut scratch.parts;
    let heap = &mut scratch.heap;
    parts.clear();
    heap.clear();
    // Parts are indexed by their start offset; parts[i] is meaningful while i starts a part.
    for (i, &byte) in piece.iter().enumerate() {
        parts.push(Part {
            end: i as u32 + 1,
            prev: if i == 0 { NONE } else { i as u32 - 1 },
            pair: NONE,
            token: vocab.byte_ranks[usize::from(byte)],
        });
    }
    for i in 0..n - 1 {
        let pair = pair_rank(
            vocab,
            joins,
            parts[i].token,
            parts[i + 1].token,
            &piece[i..i + 2],
        );
        parts[i].pair = pair;
        if pair != NONE {
            heap.push(Reverse((pair, i as u32)));
        }
    }
    let mut count = n;
    while let Some(Reverse((rank, start))) = heap.pop() {
        let left = start as usize;
        if parts[left].pair != rank {
            continue; // stale: this part has changed since the candidate was pushed
        }
        let right = parts[left].end as usize;
        let right_end = parts[right].end as usize;
        // Merge left and right.
        parts[left].end = right_end as u32;
        parts[left].token = rank;
        parts[right].pair = NONE; // `right` no longer starts a part
        count -= 1;
        // New candidates: left with its new neighbour, and the previous part with left.
        parts[left].pair = if right_end < n {
            parts[right_end].prev = left as u32;
            let next_end = parts[right_end].end as usize;
            let right_token = parts[right_end].token;
            pair_rank(vocab, joins, rank, right_token, &piece[left..next_end])
        } else {
            NONE
        };
        if parts[left].pair != NONE {
            heap.push(Reverse((parts[left].pair, left as u32)));
        }
        let prev = parts[left].prev;
        if prev != NONE {
            let prev = prev as usize;
            let prev_token = parts[prev].token;
            parts[prev].pair = pair_rank(vocab, joins, prev_token, rank, &piece[prev..right_end]);
            if parts[prev].pair != NONE {
                heap.push(Reverse((parts[prev].pair, prev as u32)));
            }
        }
    }
    let mut i = 0;
    while i < n {
        emit(parts[i].token);
        i = parts[i].end as usize;
    }
    count
}
