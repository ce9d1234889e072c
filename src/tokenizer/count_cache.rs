//! Token counts of texts a VM has counted before.
//!
//! Agent loops resend their whole conversation at every step, so most of a request's prompt
//! is text the filter has already counted: the system prompt, tool definitions, every earlier
//! turn. This cache remembers the count of long texts (message contents, tool arguments: at
//! least [`MIN_TEXT_BYTES`]) per encoding, so a step costs the counting of what is new.
//!
//! Exact by construction: an entry keeps the whole text and a hit compares it byte for byte
//! (the hash only finds the entry), so a collision, crafted or not, is a miss, never a wrong
//! count. Bounded: the texts held add up to at most the configured capacity, and one text may
//! take at most an eighth of it. Admission: a text is stored the second time it is seen (a
//! small table of hashes remembers first sightings), so a stream of one-off prompts does not
//! churn the cache. Eviction: CLOCK (each hit marks its entry; the hand passes over marked
//! entries once before evicting them), an approximation of least recently used.
//!
//! One cache per VM (it lives in [`crate::tokenizer::Tokenizers`]); a VM is single-threaded.

use std::hash::Hasher;

use rustc_hash::{FxHashMap, FxHasher};

use crate::tokenizer::Encoding;

/// Shorter texts are counted every time: a lookup would cost about as much as counting.
pub const MIN_TEXT_BYTES: usize = 256;

/// First sightings remembered (hashes, direct-mapped): 64 KiB.
const DOORKEEPER_SLOTS: usize = 8192;

/// Bytes an entry costs beyond its text (slab slot, index entry, allocation header).
const ENTRY_OVERHEAD: usize = 64;

/// What the cache did since it was last asked (for the stats the root context emits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheActivity {
    /// Texts counted from the cache, and their bytes.
    pub hits: u64,
    pub hit_bytes: u64,
    /// Texts of cacheable length counted by the tokenizer.
    pub misses: u64,
    pub miss_bytes: u64,
}

struct Entry {
    hash: u64,
    encoding: Encoding,
    text: Box<str>,
    tokens: u64,
    referenced: bool,
}

/// The cache. See the module documentation.
pub struct CountCache {
    capacity: usize,
    used: usize,
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    index: FxHashMap<u64, u32>,
    hand: usize,
    doorkeeper: Vec<u64>,
    activity: CacheActivity,
}

impl std::fmt::Debug for CountCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountCache")
            .field("capacity", &self.capacity)
            .field("used", &self.used)
            .field("entries", &self.index.len())
            .finish()
    }
}

/// `a == b`, eight bytes at a time: slice equality calls the C library's `memcmp`, which in
/// wasm32-wasip1 (wasi-libc, no SIMD) compares one byte at a time, and a hit compares whole
/// message texts.
fn same_text(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut wa = a.chunks_exact(8);
    let mut wb = b.chunks_exact(8);
    for (x, y) in (&mut wa).zip(&mut wb) {
        // Chunks of exactly eight bytes: both conversions succeed.
        let (Ok(wx), Ok(wy)) = (<[u8; 8]>::try_from(x), <[u8; 8]>::try_from(y)) else {
            return x == y;
        };
        if u64::from_le_bytes(wx) != u64::from_le_bytes(wy) {
            return false;
        }
    }
    wa.remainder() == wb.remainder()
}

fn hash(encoding: Encoding, text: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write_u8(encoding as u8);
    h.write(text.as_bytes());
    h.finish()
}

impl CountCache {
    /// A cache holding at most `capacity` bytes of text (0: nothing is cached).
    pub fn new(capacity: usize) -> CountCache {
        CountCache {
            capacity,
            used: 0,
            slots: Vec::new(),
            free: Vec::new(),
            index: FxHashMap::default(),
            hand: 0,
            doorkeeper: if capacity > 0 {
                vec![0; DOORKEEPER_SLOTS]
            } else {
                Vec::new()
            },
            activity: CacheActivity::default(),
        }
    }

    /// The tokens of `text` in `encoding`: from the cache, or from `count` (and then
    /// remembered, if the text qualifies).
    pub fn count(
        &mut self,
        encoding: Encoding,
        text: &str,
        count: impl FnOnce(&str) -> u64,
    ) -> u64 {
        let size = text.len().saturating_add(ENTRY_OVERHEAD);
        if text.len() < MIN_TEXT_BYTES || size > self.capacity / 8 {
            return count(text);
        }
        let h = hash(encoding, text);
        if let Some(&i) = self.index.get(&h) {
            if let Some(e) = self.slots.get_mut(i as usize).and_then(Option::as_mut) {
                if e.encoding == encoding && same_text(&e.text, text) {
                    e.referenced = true;
                    self.activity.hits = self.activity.hits.saturating_add(1);
                    self.activity.hit_bytes =
                        self.activity.hit_bytes.saturating_add(text.len() as u64);
                    return e.tokens;
                }
            }
        }
        let tokens = count(text);
        self.activity.misses = self.activity.misses.saturating_add(1);
        self.activity.miss_bytes = self.activity.miss_bytes.saturating_add(text.len() as u64);
        // The doorkeeper has its slots whenever the capacity admits a text (above).
        let Some(door) = self.doorkeeper.get_mut((h as usize) % DOORKEEPER_SLOTS) else {
            return tokens;
        };
        if *door != h {
            // First sighting: remember the hash only.
            *door = h;
            return tokens;
        }
        *door = 0;
        self.insert(h, encoding, text, tokens);
        tokens
    }

    fn insert(&mut self, h: u64, encoding: Encoding, text: &str, tokens: u64) {
        // A text under the same hash (a collision) gives way to the new one.
        if let Some(i) = self.index.remove(&h) {
            self.evict(i as usize);
        }
        let size = text.len().saturating_add(ENTRY_OVERHEAD);
        while self.used.saturating_add(size) > self.capacity && self.evict_one() {}
        let entry = Entry {
            hash: h,
            encoding,
            text: text.into(),
            tokens,
            referenced: false,
        };
        // A free slot is one `evict` emptied, so it is within `slots`.
        let free = self.free.pop();
        let i = match free.and_then(|i| Some((i, self.slots.get_mut(i as usize)?))) {
            Some((i, slot)) => {
                *slot = Some(entry);
                i
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len().saturating_sub(1) as u32
            }
        };
        self.index.insert(h, i);
        // At most the capacity: entries were evicted to make room.
        self.used = self.used.saturating_add(size);
    }

    /// Free slot `i` (its index entry is the caller's to remove).
    fn evict(&mut self, i: usize) {
        if let Some(e) = self.slots.get_mut(i).and_then(Option::take) {
            // The entry's size was added to `used` when it was inserted.
            self.used = self
                .used
                .saturating_sub(e.text.len().saturating_add(ENTRY_OVERHEAD));
            self.free.push(i as u32);
        }
    }

    /// Move the CLOCK hand to the next unmarked entry and evict it. False when empty.
    fn evict_one(&mut self) -> bool {
        if self.index.is_empty() {
            return false;
        }
        // Two turns of the hand: the first clears every mark, so the second finds an entry
        // (the index holds one, in a slot).
        for _ in 0..=self.slots.len().saturating_mul(2) {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let i = self.hand;
            // Below `slots.len()` (just checked), so far from `usize::MAX`.
            self.hand = self.hand.saturating_add(1);
            let Some(e) = self.slots.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            if e.referenced {
                e.referenced = false;
                continue;
            }
            let h = e.hash;
            self.index.remove(&h);
            self.evict(i);
            return true;
        }
        false
    }

    /// What happened since the last call.
    pub fn take_activity(&mut self) -> CacheActivity {
        std::mem::take(&mut self.activity)
    }

    /// Bytes held (texts plus per-entry overhead), never above the capacity.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// Texts held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(i: usize, len: usize) -> String {
        let mut t = format!("message {i}: ");
        while t.len() < len {
            t.push_str("lorem ipsum dolor sit amet ");
        }
        t.truncate(len);
        t
    }

    /// A counter that records how often it was asked.
    fn counting(calls: &mut u32) -> impl FnMut(&str) -> u64 + '_ {
        move |t: &str| {
            *calls += 1;
            t.len() as u64 / 4
        }
    }

    #[test]
    fn a_text_is_stored_on_its_second_sighting_and_served_from_the_third() {
        let mut c = CountCache::new(1 << 20);
        let t = text(1, 1000);
        let mut calls = 0;
        for _ in 0..5 {
            let mut f = counting(&mut calls);
            assert_eq!(c.count(Encoding::O200kBase, &t, &mut f), 250);
        }
        assert_eq!(calls, 2);
        assert_eq!(c.len(), 1);
        let a = c.take_activity();
        assert_eq!((a.hits, a.misses), (3, 2));
        assert_eq!(c.take_activity(), CacheActivity::default());
    }

    #[test]
    fn texts_compare_byte_for_byte() {
        let t = text(9, 1003);
        assert!(same_text(&t, &t.clone()));
        for i in [0, 7, 8, 500, 1000, 1002] {
            let mut other = t.clone().into_bytes();
            other[i] ^= 1;
            assert!(
                !same_text(&t, std::str::from_utf8(&other).unwrap()),
                "byte {i}"
            );
        }
        assert!(!same_text(&t, &t[..1002]));
    }

    #[test]
    fn short_texts_and_other_encodings_are_not_confused() {
        let mut c = CountCache::new(1 << 20);
        let t = text(2, 1000);
        let mut calls = 0;
        for _ in 0..3 {
            c.count(Encoding::O200kBase, &t, |t| t.len() as u64);
        }
        // The same text in the other encoding is a different count.
        assert_eq!(
            c.count(Encoding::Cl100kBase, &t, |_| {
                calls += 1;
                7
            }),
            7
        );
        assert_eq!(calls, 1);
        let short = "short text";
        for _ in 0..3 {
            c.count(Encoding::O200kBase, short, |_| {
                calls += 1;
                1
            });
        }
        assert_eq!(calls, 4, "short texts are always counted");
    }

    #[test]
    fn a_colliding_text_is_a_miss_not_a_wrong_count() {
        let mut c = CountCache::new(1 << 20);
        let t = text(3, 1000);
        for _ in 0..2 {
            c.count(Encoding::O200kBase, &t, |_| 11);
        }
        // Force another text under the same hash, as a crafted collision would.
        let other = text(4, 1000);
        let i = c.index[&hash(Encoding::O200kBase, &t)];
        c.index.insert(hash(Encoding::O200kBase, &other), i);
        assert_eq!(c.count(Encoding::O200kBase, &other, |_| 99), 99);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity_and_keeps_what_is_used() {
        let capacity = 64 * 1024;
        let mut c = CountCache::new(capacity);
        let hot = text(0, 2000);
        for round in 0..200 {
            // The hot text is used every round; a stream of others passes through.
            c.count(Encoding::O200kBase, &hot, |_| 1);
            let t = text(1000 + round, 1500);
            c.count(Encoding::O200kBase, &t, |_| 2);
            c.count(Encoding::O200kBase, &t, |_| 2);
            assert!(c.used_bytes() <= capacity);
        }
        let mut calls = 0;
        c.count(Encoding::O200kBase, &hot, |_| {
            calls += 1;
            1
        });
        assert_eq!(calls, 0, "the text in use survived the churn");
    }

    #[test]
    fn texts_beyond_an_eighth_of_the_capacity_and_a_zero_capacity_cache_count_every_time() {
        for (capacity, len) in [(8 * 1024, 2000), (0, 1000)] {
            let mut c = CountCache::new(capacity);
            let t = text(5, len);
            let mut calls = 0;
            for _ in 0..4 {
                c.count(Encoding::O200kBase, &t, |_| {
                    calls += 1;
                    3
                });
            }
            assert_eq!(calls, 4);
            assert!(c.is_empty());
        }
    }
}
