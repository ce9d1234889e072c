//! A memo of merged pieces: a piece's bytes → how many tokens its byte-pair merge gives.
//! Real prompts repeat their pieces (words of a language, identifiers of a codebase, the
//! phrases of an agent's transcript resent at every step), and the pieces that are not a
//! token themselves, the ones the merge loop works on, are the costly ones; a remembered
//! piece costs a hash, one cache line and a compare instead of a merge.
//!
//! Exact by construction: a slot holds the piece's bytes, and a hit compares them all, so
//! the answer is the count of this very piece, whatever the hash does (a collision is a
//! miss). The count is a pure function of the piece's bytes for one encoding, and each
//! encoding ([`super::Bpe`]) has its own memo.
//!
//! Bounded: [`SLOTS`] slots of one cache line ([`SLOT_BYTES`]), direct-mapped (a new piece
//! overwrites whatever shared its slot), allocated at the first piece stored: 512 KiB per
//! encoding that merges anything, per VM, whatever the input. Pieces longer than
//! [`MAX_PIECE`] bytes are merged every time. Hostile input can only evict entries, which
//! costs the next merge of the evicted piece and nothing else.
//!
//! Only counts use it ([`super::Bpe::count`], [`super::Bpe::count_settled`]); encoding
//! (which needs the tokens) merges every time.

/// Slots in the memo (a power of two).
pub(super) const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_BITS: u32 = 13;
/// Bytes of a slot: one cache line.
pub(super) const SLOT_BYTES: usize = 64;
/// The longest piece remembered: a slot's bytes after its length and count.
pub(super) const MAX_PIECE: usize = SLOT_BYTES - 2;

/// One remembered piece: its length (0: empty), its token count, its bytes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Slot {
    len: u8,
    count: u8,
    bytes: [u8; MAX_PIECE],
}

const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_BYTES && SLOT_BITS < 32);
/// The shift that leaves a hash's top [`SLOT_BITS`] bits.
const SLOT_SHIFT: u32 = u64::BITS - SLOT_BITS;

const EMPTY: Slot = Slot {
    len: 0,
    count: 0,
    bytes: [0; MAX_PIECE],
};

/// The memo of one encoding. Not `Sync` by itself: [`super::Bpe`] keeps it in a mutex
/// taken once per counted text (a VM is one thread; a text counted while another thread
/// holds it is counted without the memo).
pub(super) struct Pieces {
    slots: Vec<Slot>,
}

impl Pieces {
    /// An empty memo (nothing allocated yet).
    pub(super) const fn new() -> Pieces {
        Pieces { slots: Vec::new() }
    }

    /// The token count of `piece` (not itself a token, at least 2 bytes), remembered, or
    /// `merge`'s, remembered when the piece fits a slot.
    #[inline(always)]
    pub(super) fn count_or(&mut self, piece: &[u8], merge: impl FnOnce() -> usize) -> usize {
        let n = piece.len();
        if n > MAX_PIECE {
            return merge();
        }
        let at = slot_of(piece);
        if let Some(slot) = self.slots.get(at) {
            if usize::from(slot.len) == n
                && slot
                    .bytes
                    .get(..n)
                    .is_some_and(|held| super::hash::same_bytes(held, piece))
            {
                return usize::from(slot.count);
            }
        }
        let count = merge();
        self.remember(at, piece, count);
        count
    }

    /// Store `piece`'s `count` in slot `at` (allocating the slots on the first store). A
    /// count that does not fit a byte (impossible for a piece of at most [`MAX_PIECE`]
    /// bytes: a token has at least one) is not stored.
    #[cold]
    fn remember(&mut self, at: usize, piece: &[u8], count: usize) {
        let (Ok(len), Ok(count)) = (u8::try_from(piece.len()), u8::try_from(count)) else {
            return;
        };
        if self.slots.is_empty() {
            self.slots = vec![EMPTY; SLOTS];
        }
        if let Some(slot) = self.slots.get_mut(at) {
            if let Some(dst) = slot.bytes.get_mut(..piece.len()) {
                dst.copy_from_slice(piece);
                slot.len = len;
                slot.count = count;
            }
        }
    }

    /// Forget every piece (the slots stay allocated).
    pub(super) fn clear(&mut self) {
        for slot in self.slots.iter_mut() {
            slot.len = 0;
        }
    }

    /// Bytes the memo holds (0 until a piece is stored).
    pub(super) fn heap_bytes(&self) -> usize {
        self.slots.len().saturating_mul(SLOT_BYTES)
    }
}

/// The slot of `piece` (1 to [`MAX_PIECE`] bytes): a hash of its length and of its first
/// and last eight bytes (overlapping in pieces shorter than 16), one multiply. Pieces that
/// share those bytes and their length share a slot and evict each other; they are never
/// taken for each other (a hit compares every byte).
#[inline(always)]
fn slot_of(piece: &[u8]) -> usize {
    use super::hash;
    let n = piece.len();
    let key = if n <= hash::MEDIUM_MAX {
        hash::load_short(piece)
    } else {
        hash::load8(piece, 0) ^ hash::load8(piece, n.saturating_sub(8)).rotate_left(29)
    };
    // The top bits: the multiply mixes every input bit into them.
    (hash::short_hash(key, n) >> SLOT_SHIFT) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_piece_is_counted_without_merging() {
        let mut memo = Pieces::new();
        assert_eq!(memo.heap_bytes(), 0);
        assert_eq!(memo.count_or(b"tokenfuse", || 3), 3);
        assert_eq!(memo.heap_bytes(), SLOTS * SLOT_BYTES);
        assert_eq!(memo.count_or(b"tokenfuse", || unreachable!()), 3);
    }

    #[test]
    fn pieces_sharing_a_slot_never_answer_for_each_other() {
        // Find two pieces of the same length with the same slot, and one of another length.
        let mut memo = Pieces::new();
        let first = b"piece-00000".to_vec();
        let home = slot_of(&first);
        let other = (1..200_000u32)
            .map(|i| format!("piece-{i:05}").into_bytes())
            .find(|p| slot_of(p) == home)
            .expect("a colliding piece among 200,000");
        let shorter = (1..200_000u32)
            .map(|i| format!("p{i}").into_bytes())
            .find(|p| slot_of(p) == home)
            .expect("a colliding shorter piece");
        assert_eq!(memo.count_or(&first, || 4), 4);
        // The collision is a miss: merged, then stored over the first piece.
        assert_eq!(memo.count_or(&other, || 5), 5);
        assert_eq!(memo.count_or(&other, || unreachable!()), 5);
        // The first was evicted: merged again, not answered with the other's count.
        assert_eq!(memo.count_or(&first, || 4), 4);
        assert_eq!(memo.count_or(&shorter, || 2), 2);
        assert_eq!(memo.count_or(&shorter, || unreachable!()), 2);
        assert_eq!(memo.count_or(&first, || 4), 4);
    }

    #[test]
    fn a_piece_differing_only_in_its_last_byte_is_a_miss() {
        let mut memo = Pieces::new();
        let a = [b'a'; MAX_PIECE];
        let mut b = a;
        b[MAX_PIECE - 1] = b'b';
        // `a` stored in the slot `b` hashes to, as if the two collided.
        memo.remember(slot_of(&b), &a, 7);
        assert_eq!(memo.count_or(&b, || 8), 8);
        assert_eq!(memo.count_or(&b, || unreachable!()), 8);
    }

    #[test]
    fn a_cleared_memo_merges_again() {
        let mut memo = Pieces::new();
        memo.count_or(b"tokenfuse", || 3);
        memo.clear();
        assert_eq!(memo.count_or(b"tokenfuse", || 4), 4);
        assert_eq!(memo.heap_bytes(), SLOTS * SLOT_BYTES);
    }

    #[test]
    fn pieces_longer_than_a_slot_are_merged_every_time() {
        let mut memo = Pieces::new();
        let long = vec![b'x'; MAX_PIECE + 1];
        assert_eq!(memo.count_or(&long, || 9), 9);
        assert_eq!(memo.count_or(&long, || 10), 10);
        assert_eq!(memo.heap_bytes(), 0);
    }
}
