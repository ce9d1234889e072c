//! The rank tables' hash functions and slot layouts, shared by `build.rs` (which fills the
//! tables) and [`super::table`] (which reads them in place): both sides must agree bit for
//! bit, so this file is compiled into the build script too (`#[path]`) and depends on
//! nothing.
//!
//! A token is looked up in one of three open-addressing tables, by its length, and the slot
//! that holds it carries its bytes, so a hit reads one slot and no pool (one cache line,
//! unless the slot straddles two). A fourth, `chars`, holds the characters a merge may
//! start from whole (`merge.rs`), with one mask bit per [lead-byte group](lead_group) and
//! side saying next to which neighbours that is safe:
//!
//! | table    | lengths | slot | layout (little-endian)                                       |
//! |----------|---------|------|--------------------------------------------------------------|
//! | `short`  | 2..=4   | 8 B  | `u32` key, `u32` meta                                        |
//! | `medium` | 5..=8   | 12 B | `u64` key, `u32` meta                                        |
//! | `long`   | 9..     | 16 B | `u64` first 8 bytes, `u32` meta, `u32` tail (len << 24 \| off) |
//! | `chars`  | 2..=4   | 12 B | `u32` key, `u32` meta, `u32` neighbour masks                |
//!
//! A key is the token's bytes as a little-endian integer, zero-padded; a long token's bytes
//! after its first eight are in a tail pool at `off`. The meta word: bits 0..20 the token's
//! [info](INFO_BITS) (rank, and whether it is a proper prefix or suffix of a longer token),
//! bits 20..23 the length modulo 8 (0 in `long`, whose tail word has the length), bits 23..32
//! the probe distance plus one (0: an empty slot).
//!
//! The tables are Robin Hood ordered: `build.rs` places keys in order of their home slot, so
//! along a probe sequence the homes never decrease, and a search stops at the first slot
//! whose distance from its own home is smaller than the distance walked (which an empty slot
//! always is). There is no wrap-around: the table has room after its last home for the
//! longest run. Hits and misses alike read about two slots (the figures are in the doc
//! comments `build.rs` generates), at 0.7 tokens per home slot. Keys of up to 8 bytes hash
//! with one multiply; longer ones with a round per 8 bytes.

/// Bits of a rank.
pub const RANK_BITS: u32 = 18;
/// The rank bits of a token's info.
pub const RANK_MASK: u32 = (1 << RANK_BITS) - 1;
/// Info bit: the token is a proper prefix of a longer token (it can be the left part of a
/// merge).
pub const PREFIX: u32 = 1 << RANK_BITS;
/// Info bit: the token is a proper suffix of a longer token (it can be the right part of a
/// merge).
pub const SUFFIX: u32 = 1 << (RANK_BITS + 1);
/// Bits of a token's info: rank, [`PREFIX`], [`SUFFIX`].
pub const INFO_BITS: u32 = RANK_BITS + 2;
const INFO_MASK: u32 = (1 << INFO_BITS) - 1;

const LEN_SHIFT: u32 = INFO_BITS;
/// The length field of a meta word.
pub const LEN_MASK: u32 = 7 << LEN_SHIFT;
const DIST_SHIFT: u32 = INFO_BITS + 3;
/// The largest probe distance a meta word holds.
#[allow(dead_code)]
pub const MAX_DISTANCE: usize = (1 << (32 - DIST_SHIFT)) - 2;

/// Slot sizes in bytes.
pub const SHORT_SLOT: usize = 8;
/// See [`SHORT_SLOT`].
pub const MEDIUM_SLOT: usize = 12;
/// See [`SHORT_SLOT`].
pub const LONG_SLOT: usize = 16;
/// Slot size of the `chars` table: `short`'s layout plus a `u32` of neighbour masks.
pub const CHAR_SLOT: usize = 12;
/// The longest token in `short`.
pub const SHORT_MAX: usize = 4;
/// The longest token in `medium`.
pub const MEDIUM_MAX: usize = 8;
/// Bits of a long token's tail offset.
pub const TAIL_BITS: u32 = 24;

const K0: u64 = 0x9E37_79B9_7F4A_7C15;
const K1: u64 = 0xFF51_AFD7_ED55_8CCD;
const K2: u64 = 0xC4CE_B9FE_1A85_EC53;

/// Groups of UTF-8 lead bytes (`chars` table masks have one bit per group and side).
#[allow(dead_code)]
pub const LEAD_GROUPS: usize = 8;

/// The UTF-8 length a lead byte announces (0 for a continuation byte, 1 for ASCII).
#[inline(always)]
pub fn utf8_len(b: u8) -> usize {
    match b {
        0..=0x7f => 1,
        0x80..=0xbf => 0,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// The group of a character's first byte: ASCII, 2-byte characters, the rest of the BMP
/// split where scripts change (E0-E2: Indic, Thai, punctuation, symbols; E3: CJK symbols
/// and kana; E4-E9: CJK ideographs; EA-ED: Hangul; EE-EF: private use, compatibility and
/// full-width forms), and 4-byte characters.
#[inline(always)]
pub fn lead_group(b: u8) -> u32 {
    // Groups of E0..=EF, a nibble each from E0 up.
    const THREE_BYTE: u64 = 0x6655_5544_4444_3222;
    if b < 0x80 {
        0
    } else if b < 0xe0 {
        1
    } else if b < 0xf0 {
        ((THREE_BYTE >> ((b & 0xf) << 2)) & 0xf) as u32
    } else {
        7
    }
}

/// The meta word of a slot holding a token with `info` and `len` bytes, `distance` slots
/// after its home.
#[allow(dead_code)]
pub fn meta(info: u32, len: usize, distance: usize) -> u32 {
    (info & INFO_MASK)
        | (((len & 7) as u32) << LEN_SHIFT)
        | ((distance.saturating_add(1) as u32) << DIST_SHIFT)
}

/// The token info in a meta word.
#[inline(always)]
pub fn meta_info(meta: u32) -> u32 {
    meta & INFO_MASK
}

/// Whether a search that has walked `walked` slots from its home ends (unsuccessfully) at a
/// slot with this meta word: the slot is empty, or its key's home lies after the searched
/// key's.
#[inline(always)]
pub fn ends_search(meta: u32, walked: usize) -> bool {
    (meta >> DIST_SHIFT) as usize <= walked
}

/// The length field a meta word holds for a key of `len` bytes.
#[inline(always)]
pub fn len_field(len: usize) -> u32 {
    ((len & 7) as u32) << LEN_SHIFT
}

/// Whether a meta word's length field fits a key of `len` bytes (for `long`, `len` is
/// taken as 0: its length is in the tail word).
#[inline(always)]
pub fn len_matches(meta: u32, len: usize) -> bool {
    meta & LEN_MASK == len_field(len)
}

/// The hash of a key of `len` bytes (2..=8) held in `key` (little-endian, zero-padded).
#[inline(always)]
pub fn short_hash(key: u64, len: usize) -> u64 {
    // One multiply: the fold brings the key's high bytes down, where they reach every bit
    // of the product's upper half, which picks the home slot.
    (key ^ (key >> 32) ^ (len as u64).wrapping_mul(K0)).wrapping_mul(K1)
}

/// Whether a key of `len` bytes starting with the byte `first` is in the domain of the
/// vocabulary's filter: 3..=8 bytes that start with a non-ASCII byte, the keys a merge asks
/// about inside and between characters of scripts other than Latin (a character put
/// together from its bytes, the end of one and the start of the next, two whole
/// characters). `o200k_base` has 22,799 such tokens (8,365 of 3..=4 bytes and 14,434 of
/// 5..=8), `cl100k_base` 2,398. The filter holds every token of its domain, so a key of the
/// domain whose bit is clear is certainly not a token.
#[inline(always)]
pub fn in_filter_domain(first: u8, len: usize) -> bool {
    first >= 0x80 && (3..=MEDIUM_MAX).contains(&len)
}

/// The filter bit of a key of `len` bytes (held as in [`short_hash`]) in a filter of
/// `2^(64 - shift)` bits: the top bits of its hash, which the multiply mixes every key bit
/// into (the bits that pick its home slot too: a filter only needs them spread evenly).
#[inline(always)]
pub fn filter_bit(key: u64, len: usize, shift: u32) -> usize {
    (short_hash(key, len) >> (shift & 63)) as usize
}

/// `b` (1..=8 bytes) as a little-endian integer, zero-padded.
#[inline(always)]
pub fn load_short(b: &[u8]) -> u64 {
    let n = b.len();
    if n >= 4 {
        // Two overlapping 4-byte reads: the overlap holds the same bytes at the same place.
        let last = n.saturating_sub(4); // exact: n >= 4
        let lo = load4(b, 0);
        let hi = load4(b, last);
        lo | (hi << (last << 3))
    } else {
        let mut v = 0;
        for (i, &byte) in b.iter().enumerate() {
            v |= u64::from(byte) << (i << 3);
        }
        v
    }
}

// The end wraps only for an `at` within 4 of `usize::MAX`, which no offset in a slice is;
// a wrapped end would lie before `at`, and `get` refuses such a range (the read is 0, as
// past the end), so wrapping is as safe as a checked sum and costs nothing.
#[inline(always)]
fn load4(b: &[u8], at: usize) -> u64 {
    match b.get(at..at.wrapping_add(4)) {
        Some(&[a, b, c, d]) => u64::from(u32::from_le_bytes([a, b, c, d])),
        _ => 0,
    }
}

/// Eight bytes of `b` from `at` as a little-endian integer (0 if there are fewer).
// The end wraps as in `load4`: a wrapped range is refused by `get`.
#[inline(always)]
pub fn load8(b: &[u8], at: usize) -> u64 {
    match b.get(at..at.wrapping_add(8)) {
        Some(&[a, b, c, d, e, f, g, h]) => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
        _ => 0,
    }
}

/// The `len` (1..=8) bytes of `text` from `at` as a little-endian integer, zero-padded:
/// one 8-byte load where `text` has 8 bytes from `at`, or from its end.
// Plain arithmetic on every lookup of a piece or a merge: callers pass a key within the
// text (`at + len <= n`, `len <= 8`, and a slice is at most `isize::MAX` bytes), so
// `at + 8` cannot overflow, `n - 8` is taken when `n >= 8`, and `at + 8 - n` is 1 to 7 in
// its branch (`at + 8 > n`, `at + len <= n`).
#[allow(clippy::arithmetic_side_effects)]
#[inline(always)]
pub fn key_at(text: &[u8], at: usize, len: usize) -> u64 {
    let n = text.len();
    if at + 8 <= n {
        low_bytes(load8(text, at), len)
    } else if n >= 8 && at + len <= n {
        // The last 8 bytes of the text hold the key at their end.
        low_bytes(load8(text, n - 8) >> (8 * (at + 8 - n)), len)
    } else {
        text.get(at..at + len).map_or(0, load_short)
    }
}

/// The low `len` bytes (1..=8) of `v`.
#[inline(always)]
pub fn low_bytes(v: u64, len: usize) -> u64 {
    v & (u64::MAX >> (8usize.saturating_sub(len.clamp(1, 8)) << 3))
}

/// Whether `a` and `b` (of equal length) hold the same bytes: word compares instead of a
/// `memcmp` call, which costs more than the compare for keys this short.
// Plain arithmetic in the word loop: `at + 8 < n` is the loop's condition (so `at + 8`
// cannot overflow: `at < n`, a slice's length), and `n - 8` is taken when `n > 8`.
#[allow(clippy::arithmetic_side_effects)]
#[inline(always)]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n <= 8 {
        return n == 0 || load_short(a) == load_short(b);
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

/// The hash of a long key (more than 8 bytes).
// Plain arithmetic in the word loop, as in `same_bytes`: `at` stays below `n`, a slice's
// length, so `at + 8` cannot overflow.
#[allow(clippy::arithmetic_side_effects)]
#[inline]
pub fn long_hash(b: &[u8]) -> u64 {
    let n = b.len();
    let mut h = (n as u64).wrapping_mul(K0);
    let mut at = 0;
    while at + 8 < n {
        h = (h ^ load8(b, at)).wrapping_mul(K0).rotate_left(29);
        at += 8;
    }
    // The last 8 bytes (overlapping the previous chunk when n is not a multiple of 8).
    h ^= load8(b, n.saturating_sub(8));
    h ^= h >> 33;
    h = h.wrapping_mul(K1);
    h ^= h >> 33;
    h = h.wrapping_mul(K2);
    h ^ (h >> 33)
}

/// The home slot of `hash` in a table of `homes` home slots (`homes` < 2^32).
// Two factors below 2^32 (`hash >> 32`, and `homes`: a table's count, at most a few
// hundred thousand in the tables build.rs writes), so the product fits in 64 bits. A
// saturating multiply would cost every lookup a compare for a case that cannot occur.
#[allow(clippy::arithmetic_side_effects)]
#[inline(always)]
pub fn home(hash: u64, homes: usize) -> usize {
    (((hash >> 32) * homes as u64) >> 32) as usize
}

/// A long slot's tail word.
#[allow(dead_code)]
pub fn tail_word(len: usize, offset: usize) -> u32 {
    ((len as u32) << TAIL_BITS) | offset as u32
}

/// The token length in a long slot's tail word.
#[inline(always)]
pub fn tail_len(word: u32) -> usize {
    (word >> TAIL_BITS) as usize
}

/// The tail pool offset in a long slot's tail word.
#[inline(always)]
pub fn tail_offset(word: u32) -> usize {
    (word & ((1 << TAIL_BITS) - 1)) as usize
}
