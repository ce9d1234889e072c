//! A vocabulary's rank tables, read in place from the bytes `build.rs` embedded in the
//! module: token bytes → token info (rank, and whether the token can be the left or right
//! part of a merge), with no hashing or allocation at VM start. Wasm copies the data segment
//! into each VM's linear memory once; nothing else is built.
//!
//! Layouts and hashes: `hash.rs`. Single bytes are an array; two-byte keys are first tested
//! against a bitmap of the two-byte tokens (8 KB, where most pairs a merge asks about end);
//! other keys go to the table for their length, whose slots hold the token's bytes: keys of
//! up to 8 bytes are compared as one integer, so a lookup touches one slot's cache line (and
//! a long token's tail, for the rare keys of 9 bytes or more that reach a slot with the same
//! first 8 bytes and length).

use super::hash;

/// One encoding's ordinary vocabulary (special tokens are not in it: the filter counts
/// their spellings as ordinary text).
pub(super) struct Vocab {
    /// Tokens of 2..=4 bytes: `hash::SHORT_SLOT`-byte slots.
    pub(super) short: &'static [u8],
    pub(super) short_homes: usize,
    /// Tokens of 5..=8 bytes: `hash::MEDIUM_SLOT`-byte slots.
    pub(super) medium: &'static [u8],
    pub(super) medium_homes: usize,
    /// Tokens of 9 bytes or more: `hash::LONG_SLOT`-byte slots.
    pub(super) long: &'static [u8],
    pub(super) long_homes: usize,
    /// The bytes of long tokens after their first eight.
    pub(super) tails: &'static [u8],
    /// Characters a merge may start from whole: `hash::CHAR_SLOT`-byte slots.
    pub(super) chars: &'static [u8],
    pub(super) char_homes: usize,
    /// One bit per byte pair, set when the pair is a token: most pairs a merge asks about
    /// are not, and this answers them from 8 KB instead of the large table.
    pub(super) pairs: &'static [u8; 8192],
    /// One bit per hash of a key of `hash::in_filter_domain` (3..=8 bytes, starting with a
    /// non-ASCII byte), set for every token of that domain (`hash::filter_bit`): in text of
    /// other scripts than Latin most keys a merge asks about are not tokens (a character
    /// that is not a token put back together from its bytes, the end of one character and
    /// the start of the next, two characters drawn at random), and this bitmap (64 KiB for
    /// `o200k_base`, 8 KiB for `cl100k_base`) answers most of them instead of the `short`
    /// and `medium` tables (0.6 and 1.7 MB for `o200k_base`), whose slot would usually be a
    /// cache miss.
    pub(super) filter: &'static [u8],
    /// `64 -` the filter's bits (a power of two): the shift that picks a bit from a hash.
    pub(super) filter_shift: u32,
    /// Number of tokens (ranks are `0..tokens`).
    pub(super) tokens: usize,
    /// The info of each single byte (all 256 are tokens).
    pub(super) bytes: [u32; 256],
}

include!(concat!(env!("OUT_DIR"), "/vocab.rs"));

/// Four bytes of `table` from `at`, little-endian (0 past the end: an empty slot's meta).
// The end wraps as in `hash::load4`: a wrapped range is refused by `get`.
#[inline(always)]
fn word(table: &[u8], at: usize) -> u32 {
    match table.get(at..at.wrapping_add(4)) {
        Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]),
        _ => 0,
    }
}

/// The byte offset and meta word of the slot holding the `len`-byte `key` (2..=4 bytes,
/// hash `h`) in a table whose slots start with a `u32` key and a meta word, read as one
/// 8-byte word per slot.
// Plain arithmetic in the probe loop of every lookup: the home is below `homes`, so its
// offset lies within the table, and the walk stops at the first slot whose distance is
// below `walked` (at most `hash::MAX_DISTANCE + 1` slots on), at the latest one slot past
// the table's end (read as empty): `at` stays near the table's length, `walked` small.
#[allow(clippy::arithmetic_side_effects)]
#[inline(always)]
fn find_short(
    table: &[u8],
    slot: usize,
    homes: usize,
    h: u64,
    key: u64,
    len: usize,
) -> Option<(usize, u32)> {
    // Key and length fields at once; the length field is never 0 for these lengths, so
    // an empty (all-zero) slot never matches.
    let fields = u64::from(u32::MAX) | u64::from(hash::LEN_MASK) << 32;
    let want = (key & u64::from(u32::MAX)) | u64::from(hash::len_field(len)) << 32;
    let mut at = hash::home(h, homes) * slot;
    let mut walked = 0;
    loop {
        let both = hash::load8(table, at);
        let meta = (both >> 32) as u32;
        if both & fields == want {
            return Some((at, meta));
        }
        if hash::ends_search(meta, walked) {
            return None;
        }
        at += slot;
        walked += 1;
    }
}

impl Vocab {
    /// The info of the single byte `b`.
    #[inline(always)]
    pub(super) fn byte(&self, b: u8) -> u32 {
        // 256 infos read at a byte: always there (the fallback is compiled away).
        self.bytes.get(usize::from(b)).copied().unwrap_or(0)
    }

    /// Whether the two bytes `b0 b1` are a token.
    #[inline(always)]
    pub(super) fn is_pair(&self, b0: u8, b1: u8) -> bool {
        // 2^16 bits in 8192 bytes: always there (the fallback is compiled away).
        let bit = usize::from(b0) << 8 | usize::from(b1);
        self.pairs
            .get(bit / 8)
            .is_some_and(|byte| byte & (1 << (bit % 8)) != 0)
    }

    /// False if `text[start..start + len]` is certainly not a token: it is in the domain of
    /// the filter (`hash::in_filter_domain`) and its bit is clear. True means perhaps (the
    /// table answers); the filter holds every token of its domain, so it never says false
    /// for a token. `key_at(text, start, len)` must be in bounds (`start + len <=
    /// text.len()`), as for [`Vocab::info_in`].
    #[inline(always)]
    pub(super) fn may_be_token(&self, text: &[u8], start: usize, len: usize) -> bool {
        match text.get(start) {
            Some(&first) if hash::in_filter_domain(first, len) => self.filter_has(text, start, len),
            _ => true,
        }
    }

    /// Whether the filter's bit for `text[start..start + len]` is set. Out of line: the
    /// merges of ASCII text, which never ask it, keep their code as it was (measured: the
    /// inlined form cost English and code 2 to 4% in V8).
    #[inline(never)]
    fn filter_has(&self, text: &[u8], start: usize, len: usize) -> bool {
        let key = hash::key_at(text, start, len);
        let bit = hash::filter_bit(key, len, self.filter_shift);
        // A bit past the filter (a broken build) says perhaps.
        self.filter
            .get(bit / 8)
            .is_none_or(|byte| byte & (1 << (bit % 8)) != 0)
    }

    /// The info of the token whose `len` (2..=8) bytes are `key` (little-endian,
    /// zero-padded), if there is one. The caller has checked two-byte keys against
    /// [`Vocab::is_pair`] or knows them to be tokens.
    // Plain arithmetic in the probe loop, as in `find_short`.
    #[allow(clippy::arithmetic_side_effects)]
    #[inline(always)]
    pub(super) fn short_info(&self, key: u64, len: usize) -> Option<u32> {
        let h = hash::short_hash(key, len);
        if len <= hash::SHORT_MAX {
            let (_, meta) =
                find_short(self.short, hash::SHORT_SLOT, self.short_homes, h, key, len)?;
            Some(hash::meta_info(meta))
        } else {
            let mut at = hash::home(h, self.medium_homes) * hash::MEDIUM_SLOT;
            let mut walked = 0;
            loop {
                let meta = word(self.medium, at + 8);
                if hash::ends_search(meta, walked) {
                    return None;
                }
                if hash::len_matches(meta, len) && hash::load8(self.medium, at) == key {
                    return Some(hash::meta_info(meta));
                }
                at += hash::MEDIUM_SLOT;
                walked += 1;
            }
        }
    }

    /// The info and neighbour masks of the character whose `len` (2..=4) bytes are `key`,
    /// if a merge may start from it whole (see `merge.rs`).
    // `at` is the offset of the slot `find_short` matched, within the table: `at + 8` (its
    // masks word) cannot overflow.
    #[allow(clippy::arithmetic_side_effects)]
    #[inline(always)]
    pub(super) fn char_info(&self, key: u64, len: usize) -> Option<(u32, u32)> {
        let h = hash::short_hash(key, len);
        let (at, meta) = find_short(self.chars, hash::CHAR_SLOT, self.char_homes, h, key, len)?;
        Some((hash::meta_info(meta), word(self.chars, at + 8)))
    }

    /// The info of the token spelled `key` (more than 8 bytes), if there is one.
    // Plain arithmetic in the probe loop, as in `find_short`; `off + tail.len()` is a range
    // in the tail pool (24-bit offsets, tails of tokens) checked by `get`.
    #[allow(clippy::arithmetic_side_effects)]
    #[inline(never)]
    pub(super) fn long_info(&self, key: &[u8]) -> Option<u32> {
        let first = hash::load8(key, 0);
        let tail = key.get(8..)?;
        let mut at = hash::home(hash::long_hash(key), self.long_homes) * hash::LONG_SLOT;
        let mut walked = 0;
        loop {
            let meta = word(self.long, at + 8);
            if hash::ends_search(meta, walked) {
                return None;
            }
            if hash::load8(self.long, at) == first {
                let tail_word = word(self.long, at + 12);
                if hash::tail_len(tail_word) == key.len() {
                    let off = hash::tail_offset(tail_word);
                    if let Some(stored) = self.tails.get(off..off + tail.len()) {
                        if hash::same_bytes(stored, tail) {
                            return Some(hash::meta_info(meta));
                        }
                    }
                }
            }
            at += hash::LONG_SLOT;
            walked += 1;
        }
    }

    /// The info of the token spelled `key`, if there is one.
    #[inline]
    pub(super) fn info(&self, key: &[u8]) -> Option<u32> {
        match *key {
            [] => None,
            [b] => Some(self.byte(b)),
            [b0, b1] if !self.is_pair(b0, b1) => None,
            _ if key.len() <= hash::MEDIUM_MAX => self.short_info(hash::load_short(key), key.len()),
            _ => self.long_info(key),
        }
    }

    /// The info of the token spelled `text[start..end]` (`start < end <= text.len()`), if
    /// there is one; reads the key as one 8-byte load where the text allows.
    // Plain indexing of the two bytes of a pair, on every lookup of a piece and a merge:
    // callers pass a range within the text (`walk` a piece it clamped to the text,
    // `pair_info` two adjacent parts of a piece), so `start + 1 < end <= text.len()`. Each
    // checked form measured cost the tokenizer up to 1.5% more instructions
    // (`get(start..end)`, `get(start..)` with a slice pattern, two `get`s, the bytes taken
    // from the key).
    #[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    #[inline(always)]
    pub(super) fn info_in(&self, text: &[u8], start: usize, end: usize) -> Option<u32> {
        let len = end - start;
        if !(2..=hash::MEDIUM_MAX).contains(&len) || text.len() < 8 {
            return self.info(text.get(start..end)?);
        }
        if len == 2 && !self.is_pair(text[start], text[start + 1]) {
            return None;
        }
        self.short_info(hash::key_at(text, start, len), len)
    }

    /// The rank of the token spelled `key`, if there is one.
    #[cfg(test)]
    pub(super) fn rank(&self, key: &[u8]) -> Option<u32> {
        self.info(key).map(|info| info & hash::RANK_MASK)
    }

    /// The embedded tables have the sizes the generated constants say (they always have,
    /// unless the build is broken); the one check a VM makes before counting.
    pub(super) fn is_consistent(&self) -> bool {
        let fits = |table: &[u8], slot: usize, homes: usize| {
            table.len().checked_rem(slot) == Some(0)
                && table
                    .len()
                    .checked_div(slot)
                    .is_some_and(|slots| slots >= homes)
                && homes > 0
        };
        fits(self.short, hash::SHORT_SLOT, self.short_homes)
            && fits(self.chars, hash::CHAR_SLOT, self.char_homes)
            && fits(self.medium, hash::MEDIUM_SLOT, self.medium_homes)
            && fits(self.long, hash::LONG_SLOT, self.long_homes)
            && 64u32
                .checked_sub(self.filter_shift)
                .and_then(|bits| 1usize.checked_shl(bits))
                == self.filter.len().checked_mul(8)
            && self
                .bytes
                .iter()
                .all(|&info| ((info & hash::RANK_MASK) as usize) < self.tokens)
    }

    /// The `chars` table's characters, infos and neighbour masks (for tests).
    #[cfg(test)]
    pub(super) fn char_entries(&self) -> Vec<(Vec<u8>, u32, u32)> {
        let mut out = Vec::new();
        for at in (0..self.chars.len()).step_by(hash::CHAR_SLOT) {
            let meta = word(self.chars, at + 4);
            if !hash::ends_search(meta, 0) {
                let len = ((meta >> hash::INFO_BITS) & 7) as usize;
                let bytes = self.chars[at..at + len].to_vec();
                out.push((bytes, hash::meta_info(meta), word(self.chars, at + 8)));
            }
        }
        out
    }

    /// Every token's bytes and info, in table order (for tests and diagnostics).
    #[cfg(test)]
    pub(super) fn entries(&self) -> Vec<(Vec<u8>, u32)> {
        let mut out: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], self.byte(b))).collect();
        for at in (0..self.short.len()).step_by(hash::SHORT_SLOT) {
            let meta = word(self.short, at + 4);
            if !hash::ends_search(meta, 0) {
                let len = ((meta >> hash::INFO_BITS) & 7) as usize;
                out.push((self.short[at..at + len].to_vec(), hash::meta_info(meta)));
            }
        }
        for at in (0..self.medium.len()).step_by(hash::MEDIUM_SLOT) {
            let meta = word(self.medium, at + 8);
            if !hash::ends_search(meta, 0) {
                let len = match (meta >> hash::INFO_BITS) & 7 {
                    0 => 8,
                    n => n as usize,
                };
                out.push((self.medium[at..at + len].to_vec(), hash::meta_info(meta)));
            }
        }
        for at in (0..self.long.len()).step_by(hash::LONG_SLOT) {
            let meta = word(self.long, at + 8);
            if !hash::ends_search(meta, 0) {
                let tail_word = word(self.long, at + 12);
                let off = hash::tail_offset(tail_word);
                let mut bytes = self.long[at..at + 8].to_vec();
                bytes.extend_from_slice(&self.tails[off..off + hash::tail_len(tail_word) - 8]);
                out.push((bytes, hash::meta_info(meta)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn known_tokens_have_their_tiktoken_ranks() {
        // Ranks as tiktoken assigns them (o200k: "hello" 24912, " world" 2375; cl100k:
        // "hello" 15339, " world" 1917).
        assert_eq!(O200K_BASE.rank(b"hello"), Some(24912));
        assert_eq!(O200K_BASE.rank(b" world"), Some(2375));
        assert_eq!(CL100K_BASE.rank(b"hello"), Some(15339));
        assert_eq!(CL100K_BASE.rank(b" world"), Some(1917));
        assert_eq!(CL100K_BASE.rank(b"zzqxzzqx"), None);
        assert_eq!(O200K_BASE.rank(b""), None);
    }

    #[test]
    fn every_token_is_in_the_tables_once_and_found_from_its_own_bytes() {
        for vocab in [&O200K_BASE, &CL100K_BASE] {
            assert!(vocab.is_consistent());
            let entries = vocab.entries();
            assert_eq!(entries.len(), vocab.tokens);
            let ranks: HashSet<u32> = entries.iter().map(|e| e.1 & hash::RANK_MASK).collect();
            assert_eq!(ranks.len(), vocab.tokens);
            for (bytes, info) in &entries {
                assert_eq!(vocab.info(bytes), Some(*info), "{bytes:?}");
                // The same key at every position of a text: the over-reading load.
                for before in 0..9 {
                    for after in 0..9 {
                        let mut text = vec![b'#'; before];
                        text.extend_from_slice(bytes);
                        text.extend(std::iter::repeat_n(b'#', after));
                        let end = before + bytes.len();
                        assert_eq!(vocab.info_in(&text, before, end), Some(*info));
                    }
                }
            }
        }
    }

    #[test]
    fn every_token_passes_the_filter_at_every_offset() {
        for vocab in [&O200K_BASE, &CL100K_BASE] {
            let mut domain = 0;
            for (bytes, _) in vocab.entries() {
                if bytes.len() < 2 {
                    continue;
                }
                domain += usize::from(hash::in_filter_domain(bytes[0], bytes.len()));
                for before in 0..9 {
                    for after in 0..9 {
                        let mut text = vec![0xe4; before];
                        text.extend_from_slice(&bytes);
                        text.extend(std::iter::repeat_n(0xb8, after));
                        assert!(vocab.may_be_token(&text, before, bytes.len()), "{bytes:?}");
                    }
                }
            }
            // The domain the filter was built over (o200k_base: 22,799; cl100k_base: 2,398).
            assert!(domain > 2000, "{domain}");
        }
    }

    #[test]
    fn the_filter_rules_out_most_cjk_keys_that_are_not_tokens() {
        // Two ideographs of U+4E00..U+5DFF (6 bytes), each pair in order: nearly none is a
        // token, and the filter must say so for most of them to be worth its bytes.
        for vocab in [&O200K_BASE, &CL100K_BASE] {
            let (mut pairs, mut tokens, mut passed) = (0, 0, 0);
            for a in (0x4e00u32..0x5e00).step_by(7) {
                for b in (0x4e00u32..0x5e00).step_by(13) {
                    let text: String = [a, b].iter().filter_map(|&c| char::from_u32(c)).collect();
                    let key = text.as_bytes();
                    pairs += 1;
                    tokens += usize::from(vocab.info(key).is_some());
                    passed += usize::from(vocab.may_be_token(key, 0, key.len()));
                }
            }
            assert!(passed >= tokens);
            assert!(
                passed * 10 < pairs,
                "{passed} of {pairs} pass ({tokens} tokens)"
            );
            // Ideographs that are not tokens (a merge puts them together from their bytes).
            let (mut chars, mut passed) = (0, 0);
            for c in (0x4e00u32..0xa000).filter_map(char::from_u32) {
                let key = c.to_string().into_bytes();
                if vocab.info(&key).is_none() {
                    chars += 1;
                    passed += usize::from(vocab.may_be_token(&key, 0, key.len()));
                }
            }
            assert!(
                chars > 5000 && passed * 10 < chars,
                "{passed} of {chars} pass"
            );
        }
    }

    #[test]
    fn keys_outside_the_filters_domain_always_pass() {
        for vocab in [&O200K_BASE, &CL100K_BASE] {
            for key in [
                &b"zzqxzzqx"[..],
                b"zzqxz",
                b"\xe4\xb8",
                b"\xff\xff",
                b" \xe4\xb8\xad\xe6\x96\x87",
                b"a\xff\xff\xff",
            ] {
                assert!(vocab.may_be_token(key, 0, key.len()), "{key:?}");
            }
            let long = "中文中文".as_bytes();
            assert!(vocab.may_be_token(long, 0, long.len()));
        }
    }

    #[test]
    fn prefix_and_suffix_bits_say_which_tokens_extend() {
        for vocab in [&O200K_BASE, &CL100K_BASE] {
            let entries = vocab.entries();
            let mut prefixes = HashSet::new();
            let mut suffixes = HashSet::new();
            for (bytes, _) in &entries {
                for k in 1..bytes.len() {
                    prefixes.insert(bytes[..k].to_vec());
                    suffixes.insert(bytes[k..].to_vec());
                }
            }
            for (bytes, info) in &entries {
                assert_eq!(info & hash::PREFIX != 0, prefixes.contains(bytes));
                assert_eq!(info & hash::SUFFIX != 0, suffixes.contains(bytes));
            }
        }
    }

    #[test]
    fn keys_that_are_not_tokens_are_not_found() {
        for vocab in [&O200K_BASE, &CL100K_BASE] {
            let tokens: HashSet<Vec<u8>> = vocab.entries().into_iter().map(|e| e.0).collect();
            // Every token with one byte changed or appended, and zero-padded variants
            // (a key's padding must not match a shorter or longer token).
            let mut tried = 0;
            for token in tokens.iter().take(40_000) {
                let mut variants = vec![token.clone()];
                variants[0].push(0);
                let mut changed = token.clone();
                if let Some(last) = changed.last_mut() {
                    *last = last.wrapping_add(1);
                }
                variants.push(changed);
                if token.len() > 2 {
                    variants.push(token[..token.len() - 1].to_vec());
                }
                for key in variants {
                    assert_eq!(vocab.info(&key).is_some(), tokens.contains(&key), "{key:?}");
                    tried += 1;
                }
            }
            assert!(tried > 100_000);
            for len in 2..=9 {
                let zeros = vec![0u8; len];
                assert_eq!(vocab.info(&zeros).is_some(), tokens.contains(&zeros));
            }
        }
    }
}
