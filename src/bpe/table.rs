//! A vocabulary's rank table, read in place from the bytes `build.rs` embedded in the
//! module: token bytes → rank, with no hashing or allocation at VM start. Wasm copies the
//! data segment into each VM's linear memory once; nothing else is built.
//!
//! Layout and hash: `hash.rs`. A lookup hashes the key once, walks the probe sequence from
//! its home slot and compares bytes only with slots whose length and fingerprint match; an
//! empty slot ends an unsuccessful search.

use super::hash;

/// One encoding's ordinary vocabulary (special tokens are not in it: the filter counts
/// their spellings as ordinary text).
pub(super) struct Vocab {
    /// `slot_count` little-endian `u64` slots.
    pub(super) slots: &'static [u8],
    /// Every token's bytes, in rank order.
    pub(super) pool: &'static [u8],
    /// One bit per byte pair, set when the pair is a token: most pairs a merge asks about
    /// are not, and this answers them from 8 KB instead of the large table.
    pub(super) pairs: &'static [u8; 8192],
    /// Two bitsets over ranks, one after the other: the token is a proper prefix of a longer
    /// token; it is a proper suffix of one. Parts whose bits rule out a merge are not looked
    /// up at all.
    pub(super) affixes: &'static [u8],
    pub(super) slot_count: usize,
    /// Number of tokens (ranks are `0..tokens`).
    pub(super) tokens: usize,
    /// The rank of each single byte (all 256 are tokens).
    pub(super) byte_ranks: [u32; 256],
}

include!(concat!(env!("OUT_DIR"), "/vocab.rs"));

impl Vocab {
    /// The rank of the token spelled `key`, if there is one.
    #[inline]
    pub(super) fn rank(&self, key: &[u8]) -> Option<u32> {
        match *key {
            [] => return None,
            [b] => return Some(self.byte_ranks[usize::from(b)]),
            [b0, b1] if !self.is_pair(b0, b1) => return None,
            _ => {}
        }
        let h = hash::hash(key);
        let want = hash::match_bits(key.len(), h);
        let mut i = hash::home(h, self.slot_count as u64) as usize;
        loop {
            let slot = self.slot(i);
            if slot & hash::MATCH_MASK == want {
                let at = hash::slot_offset(slot);
                if let Some(token) = self.pool.get(at..at + key.len()) {
                    if hash::same_bytes(token, key) {
                        return Some(hash::slot_rank(slot));
                    }
                }
            } else if hash::slot_len(slot) == 0 {
                return None;
            }
            i += 1;
            if i == self.slot_count {
                i = 0;
            }
        }
    }

    /// Whether the tokens `left` and `right` could concatenate to a token: `left` must be a
    /// proper prefix and `right` a proper suffix of some token. False means certainly not.
    #[inline(always)]
    pub(super) fn may_join(&self, left: u32, right: u32) -> bool {
        let half = self.affixes.len() / 2;
        let bit = |base: usize, rank: u32| {
            let r = rank as usize;
            self.affixes
                .get(base + r / 8)
                .is_some_and(|b| b & (1 << (r % 8)) != 0)
        };
        bit(0, left) && bit(half, right)
    }

    /// Whether the two bytes `b0 b1` are a token.
    #[inline(always)]
    pub(super) fn is_pair(&self, b0: u8, b1: u8) -> bool {
        let bit = usize::from(b0) << 8 | usize::from(b1);
        self.pairs[bit / 8] & (1 << (bit % 8)) != 0
    }

    #[inline(always)]
    fn slot(&self, i: usize) -> u64 {
        match self.slots.get(i * 8..i * 8 + 8) {
            Some(&[a, b, c, d, e, f, g, h]) => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            // Out of range never happens for i < slot_count; an empty slot ends the search.
            _ => 0,
        }
    }

    /// The embedded table has the size the generated constants say (it always has, unless
    /// the build is broken); the one check a VM makes before counting.
    pub(super) fn is_consistent(&self) -> bool {
        self.slots.len() == self.slot_count * 8
            && self.slot_count > self.tokens
            && self.affixes.len() == self.tokens.div_ceil(8) * 2
            && self.byte_ranks.iter().all(|&r| (r as usize) < self.tokens)
    }

    /// The bytes of the token with `rank` (a linear scan: for tests and diagnostics only).
    #[cfg(test)]
    pub(super) fn bytes_of(&self, rank: u32) -> Option<&'static [u8]> {
        (0..self.slot_count).find_map(|i| {
            let slot = self.slot(i);
            (hash::slot_len(slot) != 0 && hash::slot_rank(slot) == rank).then(|| {
                let at = hash::slot_offset(slot);
                &self.pool[at..at + hash::slot_len(slot)]
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_single_byte_is_a_token_and_found_by_lookup_too() {
        for vocab in [&O200K_BASE, &CL100K_BASE] {
            assert!(vocab.is_consistent());
            for b in 0..=255u8 {
                let r = vocab.byte_ranks[usize::from(b)];
                assert_eq!(vocab.bytes_of(r), Some(&[b][..]));
            }
        }
    }

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
    fn every_slot_is_found_from_its_own_bytes() {
        for vocab in [&O200K_BASE, &CL100K_BASE] {
            let mut found = 0;
            for i in 0..vocab.slot_count {
                let slot = vocab.slot(i);
                let len = hash::slot_len(slot);
                if len == 0 {
                    continue;
                }
                let at = hash::slot_offset(slot);
                let key = &vocab.pool[at..at + len];
                assert_eq!(vocab.rank(key), Some(hash::slot_rank(slot)));
                found += 1;
            }
            assert_eq!(found, vocab.tokens);
        }
    }
}
