//! A memo of pair merges: (left token, right token) → the token the two spell together (its info), or
//! none. Merging asks the same question about the same two tokens again and again (in CJK
//! text nearly every character is two or three merges of the same byte pairs), and the
//! answer is a pure function of the two ranks, so remembering it cannot change a result.
//!
//! One per encoding per VM: a direct-mapped array of 2^14 words (128 KiB). An entry packs a
//! valid bit, the key (two 18-bit ranks) and the answer (rank + 1, or 0 for none) into one
//! `u64`, so it is read and written whole; relaxed atomics keep it `Sync` (tests share
//! tokenizers between threads) at the cost of plain loads and stores (wasm32 has no
//! threads: they compile to ordinary memory accesses). A collision overwrites the older
//! entry; two threads racing on one slot both write a correct entry.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::hash::{INFO_BITS, RANK_BITS};

const SLOT_BITS: u32 = 14;
const KEY_BITS: u32 = 2 * RANK_BITS;
const KEY_MASK: u64 = (1 << KEY_BITS) - 1;
const ANSWER_MASK: u64 = (1 << (INFO_BITS + 1)) - 1;
const VALID: u64 = 1 << 63;
const _: () = assert!(KEY_BITS + INFO_BITS + 1 < 63);

pub(super) struct Joins {
    slots: Box<[AtomicU64]>,
}

impl Joins {
    pub(super) fn new() -> Joins {
        Joins {
            slots: (0..1 << SLOT_BITS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Forget every answer (the slots stay allocated).
    pub(super) fn clear(&self) {
        for slot in self.slots.iter() {
            slot.store(0, Relaxed);
        }
    }

    /// The remembered answer for (`left`, `right`), or `compute`'s, remembered.
    #[inline(always)]
    pub(super) fn get_or(
        &self,
        left: u32,
        right: u32,
        compute: impl FnOnce() -> Option<u32>,
    ) -> Option<u32> {
        let key = (u64::from(left) << RANK_BITS | u64::from(right)) & KEY_MASK;
        let at = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOT_BITS)) as usize;
        let Some(slot) = self.slots.get(at) else {
            return compute();
        };
        let entry = slot.load(Relaxed);
        if entry & VALID != 0 && entry & KEY_MASK == key {
            let answer = (entry >> KEY_BITS) & ANSWER_MASK;
            return answer.checked_sub(1).map(|r| r as u32);
        }
        let rank = compute();
        let answer = rank.map_or(0, |r| u64::from(r) + 1) & ANSWER_MASK;
        slot.store(VALID | answer << KEY_BITS | key, Relaxed);
        rank
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_answer_is_returned_without_computing() {
        let joins = Joins::new();
        assert_eq!(joins.get_or(5, 7, || Some(42)), Some(42));
        assert_eq!(joins.get_or(5, 7, || unreachable!()), Some(42));
        assert_eq!(joins.get_or(7, 5, || None), None);
        assert_eq!(joins.get_or(7, 5, || unreachable!()), None);
    }

    #[test]
    fn largest_ranks_round_trip() {
        let joins = Joins::new();
        let max = (1 << RANK_BITS) - 1;
        assert_eq!(joins.get_or(max, max, || Some(max)), Some(max));
        assert_eq!(joins.get_or(max, max, || unreachable!()), Some(max));
    }
}
