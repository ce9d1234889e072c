//! Byte-pair merging of one piece, as tiktoken's `byte_pair_merge` does it: start from
//! single bytes and repeatedly merge the adjacent pair whose concatenated bytes have the
//! lowest rank (the leftmost such pair on a tie) until no adjacent pair is a token.
//!
//! Pieces that are a token by themselves never get here (the caller looks the whole piece
//! up first, as tiktoken does). Short pieces use tiktoken's quadratic scan over a stack
//! array, long ones (where a piece of n bytes could cost n² lookups) a heap of candidate
//! merges with the same order — lowest rank, then lowest start — as tiktoken's
//! `_byte_pair_merge_large`. Either way a merge moves nothing: parts are linked by offsets. Both give the same tokens; the tests check them against each
//! other and against tiktoken-rs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::table::Vocab;

/// Pieces of at most this many bytes take the quadratic path, on the stack (offsets fit a
/// `u8`).
pub(super) const SMALL: usize = 64;

const NONE: u32 = u32::MAX;

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

/// Merge `piece` (at least 2 bytes, not itself a token) and hand each resulting token's rank
/// to `emit`, in order. Returns the number of tokens.
pub(super) fn merge(
    vocab: &Vocab,
    piece: &[u8],
    scratch: &mut Scratch,
    emit: &mut impl FnMut(u32),
) -> usize {
    if piece.len() <= SMALL {
        merge_small(vocab, piece, emit)
    } else {
        merge_large(vocab, piece, scratch, emit)
    }
}

/// tiktoken's scan: the lowest-ranked pair found by a linear pass over the piece, merged,
/// until none is left. Parts are linked by their start offsets (dead offsets hold no pair),
/// so a merge moves nothing.
pub(super) fn merge_small(vocab: &Vocab, piece: &[u8], emit: &mut impl FnMut(u32)) -> usize {
    let n = piece.len();
    debug_assert!((2..=SMALL).contains(&n));
    // For each offset that starts a part: where the part ends, where the previous one
    // starts, the rank of the part merged with the next one (NONE: not a token, or no next
    // part, or the offset no longer starts a part) and the part's own rank.
    let mut end = [0u8; SMALL];
    let mut prev = [0u8; SMALL];
    let mut pair = [NONE; SMALL];
    let mut token = [0u32; SMALL];
    for i in 0..n {
        end[i] = i as u8 + 1;
        prev[i] = i.saturating_sub(1) as u8;
        token[i] = vocab.byte_ranks[usize::from(piece[i])];
    }
    for i in 0..n - 1 {
        pair[i] = vocab.rank(&piece[i..i + 2]).unwrap_or(NONE);
    }
    let mut count = n;
    loop {
        let mut best = NONE;
        let mut left = 0;
        for (i, &r) in pair[..n].iter().enumerate() {
            if r < best {
                best = r;
                left = i;
            }
        }
        if best == NONE {
            break;
        }
        let right = usize::from(end[left]);
        let right_end = usize::from(end[right]);
        end[left] = right_end as u8;
        token[left] = best;
        pair[right] = NONE;
        count -= 1;
        pair[left] = if right_end < n {
            prev[right_end] = left as u8;
            vocab
                .rank(&piece[left..usize::from(end[right_end])])
                .unwrap_or(NONE)
        } else {
            NONE
        };
        if left > 0 {
            let before = usize::from(prev[left]);
            pair[before] = vocab.rank(&piece[before..right_end]).unwrap_or(NONE);
        }
    }
    let mut i = 0;
    while i < n {
        emit(token[i]);
        i = usize::from(end[i]);
    }
    count
}

/// The heap variant: candidate merges (rank, start) in a min-heap, stale ones skipped when
/// popped, parts linked by start offsets.
pub(super) fn merge_large(
    vocab: &Vocab,
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
    for i in 0..n {
        let pair = if i + 1 < n {
            vocab.rank(&piece[i..i + 2]).unwrap_or(NONE)
        } else {
            NONE
        };
        if pair != NONE {
            heap.push(Reverse((pair, i as u32)));
        }
        parts.push(Part {
            end: i as u32 + 1,
            prev: if i == 0 { NONE } else { i as u32 - 1 },
            pair,
            token: vocab.byte_ranks[usize::from(piece[i])],
        });
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
        if right_end < n {
            parts[right_end].prev = left as u32;
        }
        count -= 1;
        // New candidates: left with its new neighbour, and the previous part with left.
        let next_end = if right_end < n {
            parts[right_end].end as usize
        } else {
            0
        };
        parts[left].pair = if right_end < n {
            vocab.rank(&piece[left..next_end]).unwrap_or(NONE)
        } else {
            NONE
        };
        if parts[left].pair != NONE {
            heap.push(Reverse((parts[left].pair, left as u32)));
        }
        let prev = parts[left].prev;
        if prev != NONE {
            let prev = prev as usize;
            parts[prev].pair = vocab.rank(&piece[prev..right_end]).unwrap_or(NONE);
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
