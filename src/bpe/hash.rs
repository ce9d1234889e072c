//! The rank table's hash function and slot layout, shared by `build.rs` (which fills the
//! table) and [`super::table`] (which reads it in place): both sides must agree bit for bit,
//! so this file is compiled into the build script too (`#[path]`) and depends on nothing.
//!
//! A slot is a little-endian `u64`: bits 0..24 the token's offset in the byte pool, 24..32
//! its length (1..=255; 0 marks an empty slot), 32..50 its rank, 50..64 a 14-bit fingerprint
//! of its hash, so a probe rarely has to compare bytes with a token that is not the one
//! looked for. The table uses linear probing; a hash picks its home slot with the high 32
//! bits (multiply-shift onto the table size) and its fingerprint with the low 14.

/// Bits of the pool offset.
pub const OFFSET_BITS: u32 = 24;
/// Bits of the token length.
pub const LEN_BITS: u32 = 8;
/// Bits of the rank.
pub const RANK_BITS: u32 = 18;
/// Bits of the fingerprint.
pub const FP_BITS: u32 = 14;

const LEN_SHIFT: u32 = OFFSET_BITS;
const RANK_SHIFT: u32 = OFFSET_BITS + LEN_BITS;
const FP_SHIFT: u32 = OFFSET_BITS + LEN_BITS + RANK_BITS;
const FP_MASK: u64 = (1 << FP_BITS) - 1;

const K0: u64 = 0x9E37_79B9_7F4A_7C15;
const K1: u64 = 0xFF51_AFD7_ED55_8CCD;
const K2: u64 = 0xC4CE_B9FE_1A85_EC53;

/// Up to 8 bytes as a little-endian integer (zero-padded); `b.len()` must be 1..=8.
#[inline(always)]
fn load_short(b: &[u8]) -> u64 {
    let n = b.len();
    if n >= 4 {
        // Two overlapping 4-byte reads: the overlap holds the same bytes at the same place.
        let lo = load4(b, 0);
        let hi = load4(b, n - 4);
        lo | (hi << ((n - 4) * 8))
    } else if n > 0 {
        let first = u64::from(b[0]);
        let mid = u64::from(b[n / 2]);
        let last = u64::from(b[n - 1]);
        first | (mid << 8) | (last << 16)
    } else {
        0
    }
}

#[inline(always)]
fn load4(b: &[u8], at: usize) -> u64 {
    match b.get(at..at + 4) {
        Some(&[a, b, c, d]) => u64::from(u32::from_le_bytes([a, b, c, d])),
        _ => 0,
    }
}

#[inline(always)]
fn load8(b: &[u8], at: usize) -> u64 {
    match b.get(at..at + 8) {
        Some(&[a, b, c, d, e, f, g, h]) => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
        _ => 0,
    }
}

/// Whether `a` and `b` (of equal length) hold the same bytes: word compares instead of a
/// `memcmp` call, which costs more than the compare for keys this short.
#[inline(always)]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n <= 8 {
        return load_short(a) == load_short(b);
    }
    let mut at = 0;
    while at + 8 < n {
        if load8(a, at) != load8(b, at) {
            return false;
        }
        at += 8;
    }
    load8(a, n - 8) == load8(b, n - 8)
}

/// The hash of a token's bytes.
#[inline]
pub fn hash(b: &[u8]) -> u64 {
    let n = b.len();
    let mut h = (n as u64).wrapping_mul(K0);
    if n <= 8 {
        h ^= load_short(b);
    } else {
        let mut at = 0;
        while at + 8 < n {
            h = (h ^ load8(b, at)).wrapping_mul(K0).rotate_left(29);
            at += 8;
        }
        // The last 8 bytes (overlapping the previous chunk when n is not a multiple of 8).
        h ^= load8(b, n - 8);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(K1);
    h ^= h >> 33;
    h = h.wrapping_mul(K2);
    h ^ (h >> 33)
}

/// The home slot of `hash` in a table of `slots` slots (`slots` < 2^32).
#[inline(always)]
pub fn home(hash: u64, slots: u64) -> u64 {
    ((hash >> 32) * slots) >> 32
}

/// The fingerprint of `hash` as it sits in a slot.
#[inline(always)]
fn fingerprint_bits(hash: u64) -> u64 {
    (hash & FP_MASK) << FP_SHIFT
}

/// The bits of a slot that must equal [`match_bits`] for the slot to hold a key of this
/// length and hash: its length and fingerprint fields.
pub const MATCH_MASK: u64 = (((1 << LEN_BITS) - 1) << LEN_SHIFT) | (FP_MASK << FP_SHIFT);

/// What the length and fingerprint fields of the slot holding a `len`-byte key with this
/// hash look like.
#[inline(always)]
pub fn match_bits(len: usize, hash: u64) -> u64 {
    ((len as u64) << LEN_SHIFT) | fingerprint_bits(hash)
}

/// A filled slot (build.rs fills the table with these).
#[allow(dead_code)]
pub fn slot(offset: u32, len: u32, rank: u32, hash: u64) -> u64 {
    u64::from(offset)
        | (u64::from(len) << LEN_SHIFT)
        | (u64::from(rank) << RANK_SHIFT)
        | fingerprint_bits(hash)
}

/// The pool offset of a slot's token.
#[inline(always)]
pub fn slot_offset(slot: u64) -> usize {
    (slot & ((1 << OFFSET_BITS) - 1)) as usize
}

/// The length of a slot's token; 0 for an empty slot.
#[inline(always)]
pub fn slot_len(slot: u64) -> usize {
    ((slot >> LEN_SHIFT) & ((1 << LEN_BITS) - 1)) as usize
}

/// The rank of a slot's token.
#[inline(always)]
pub fn slot_rank(slot: u64) -> u32 {
    ((slot >> RANK_SHIFT) & ((1 << RANK_BITS) - 1)) as u32
}
