//! Cached answers in Envoy shared data, bounded by construction.
//!
//! Shared data never expires or deletes a key, so the cache owns a fixed set of keys from
//! the start: `sets = ⌈max_entries / WAYS⌉` set records, `tokenfuse/cache/v1/set/<n>`, each
//! describing [`WAYS`] ways, and one answer key per way, `tokenfuse/cache/v1/way/<n>/<w>`,
//! holding at most `max_entry_bytes`. A request's [`Key`] picks its set; within it a way is
//! empty, *pending* (an identical request is in flight: later ones wait for it, the
//! coalescing) or *ready* (an answer, until it expires). So the cache never holds more than
//! `max_entries` answers of at most `max_entry_bytes` each, whatever the traffic; a byte
//! counter, `tokenfuse/cache/v1/bytes`, keeps the answers' total under `max_bytes` as well
//! (a store that would pass it is refused).
//!
//! Every change to a set record is a compare-and-swap, so workers never lose each other's
//! writes; a set record that does not decode (garbage, another version) is treated as
//! empty and rewritten. An answer key is written before its way turns ready and carries the
//! way's key and generation, so a reader that meets an answer being replaced sees a
//! mismatch — a miss — never another request's answer. Expired ways are emptied by the
//! root tick ([`sweep`]), a few sets at a time, and by any claim that needs their way.

use sha2::{Digest, Sha256};

use crate::budget::ledger::CREATE_CAS;
use crate::host::{Host, SharedError};
use crate::llm::usage::UsageReport;

/// Ways per set.
pub const WAYS: usize = 4;
const KEY_LEN: usize = 32;
/// state, key, generation, created, expires, size.
const WAY_LEN: usize = 1 + KEY_LEN + 4 + 8 + 8 + 4;
const SET_LEN: usize = 1 + WAYS * WAY_LEN;
const SET_VERSION: u8 = 1;
const ENTRY_MAGIC: &[u8; 4] = b"TFC1";
/// magic, key, generation, created, five usage figures.
const ENTRY_HEAD: usize = 4 + KEY_LEN + 4 + 8 + 5 * 8;
const BYTES_KEY: &str = "tokenfuse/cache/v1/bytes";

/// What identifies an answer: a SHA-256 of everything that changes it (see `key.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key(pub [u8; KEY_LEN]);

impl Key {
    /// The key of `material`.
    pub fn of(material: &[u8]) -> Key {
        Key(Sha256::digest(material).into())
    }

    fn set(&self, sets: u32) -> u32 {
        let mut head = [0u8; 8];
        for (d, s) in head.iter_mut().zip(self.0.iter()) {
            *d = *s;
        }
        let n = u64::from_le_bytes(head)
            .checked_rem(u64::from(sets))
            .unwrap_or(0);
        u32::try_from(n).unwrap_or(0)
    }

    /// A short form for logs.
    pub fn short(&self) -> String {
        self.0.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }
}

/// Where the cache lives and how big it may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub sets: u32,
    pub max_entry_bytes: usize,
    pub max_bytes: u64,
    pub cas_retries: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Empty,
    Pending,
    Ready,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Way {
    state: State,
    key: [u8; KEY_LEN],
    generation: u32,
    created_ms: i64,
    /// Ready: when the answer expires. Pending: when waiters stop waiting for it.
    until_ms: i64,
    size: u32,
}

type Set = [Way; WAYS];

fn set_key(set: u32) -> String {
    format!("tokenfuse/cache/v1/set/{set}")
}

fn way_key(set: u32, way: usize) -> String {
    format!("tokenfuse/cache/v1/way/{set}/{way}")
}

fn take<const N: usize>(bytes: &[u8], at: &mut usize) -> Option<[u8; N]> {
    let end = at.checked_add(N)?;
    let out: [u8; N] = bytes.get(*at..end)?.try_into().ok()?;
    *at = end;
    Some(out)
}

fn decode_set(bytes: &[u8]) -> Option<Set> {
    if bytes.len() != SET_LEN || bytes.first() != Some(&SET_VERSION) {
        return None;
    }
    let mut at = 1;
    let mut set = Set::default();
    for way in set.iter_mut() {
        let [state] = take::<1>(bytes, &mut at)?;
        *way = Way {
            state: match state {
                0 => State::Empty,
                1 => State::Pending,
                2 => State::Ready,
                _ => return None,
            },
            key: take::<KEY_LEN>(bytes, &mut at)?,
            generation: u32::from_le_bytes(take(bytes, &mut at)?),
            created_ms: i64::from_le_bytes(take(bytes, &mut at)?),
            until_ms: i64::from_le_bytes(take(bytes, &mut at)?),
            size: u32::from_le_bytes(take(bytes, &mut at)?),
        };
    }
    Some(set)
}

fn encode_set(set: &Set) -> Vec<u8> {
    let mut out = Vec::with_capacity(SET_LEN);
    out.push(SET_VERSION);
    for way in set {
        out.push(match way.state {
            State::Empty => 0,
            State::Pending => 1,
            State::Ready => 2,
        });
        out.extend_from_slice(&way.key);
        out.extend_from_slice(&way.generation.to_le_bytes());
        out.extend_from_slice(&way.created_ms.to_le_bytes());
        out.extend_from_slice(&way.until_ms.to_le_bytes());
        out.extend_from_slice(&way.size.to_le_bytes());
    }
    out
}

/// A set record as read: its ways (all empty when missing or unreadable) and the CAS token
/// to write it back with.
fn read_set(host: &dyn Host, set: u32) -> (Set, u32) {
    match host.shared_get(&set_key(set)) {
        Some((bytes, cas)) => (decode_set(&bytes).unwrap_or_default(), cas),
        None => (Set::default(), CREATE_CAS),
    }
}

/// A cached answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub created_ms: i64,
    /// What the answer cost when it was made (what a hit saves).
    pub usage: UsageReport,
    /// The answer as the API's JSON body.
    pub body: Vec<u8>,
}

fn encode_entry(key: &Key, generation: u32, entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENTRY_HEAD.saturating_add(entry.body.len()));
    out.extend_from_slice(ENTRY_MAGIC);
    out.extend_from_slice(&key.0);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&entry.created_ms.to_le_bytes());
    let u = &entry.usage;
    for n in [
        u.input,
        u.output,
        u.cached_input,
        u.cache_creation,
        u.reasoning,
    ] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&entry.body);
    out
}

fn decode_entry(bytes: &[u8], key: &Key, generation: u32) -> Option<Entry> {
    let mut at = 0;
    if &take::<4>(bytes, &mut at)? != ENTRY_MAGIC || take::<KEY_LEN>(bytes, &mut at)? != key.0 {
        return None;
    }
    if u32::from_le_bytes(take(bytes, &mut at)?) != generation {
        return None;
    }
    let created_ms = i64::from_le_bytes(take(bytes, &mut at)?);
    let mut n = [0u64; 5];
    for v in n.iter_mut() {
        *v = u64::from_le_bytes(take(bytes, &mut at)?);
    }
    let [input, output, cached_input, cache_creation, reasoning] = n;
    Some(Entry {
        created_ms,
        usage: UsageReport {
            input,
            output,
            cached_input,
            cache_creation,
            reasoning,
        },
        body: bytes.get(at..)?.to_vec(),
    })
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A live answer.
    Hit(Entry),
    /// An identical request is in flight; its answer is expected by `until_ms`.
    Pending { until_ms: i64 },
    /// Nothing; when asked to, the way is now claimed for this request (`Some(generation)`):
    /// identical requests wait for it until it is filled or released.
    Miss { claimed: Option<u32> },
}

/// What [`lookup`] may do beyond reading.
#[derive(Clone, Copy, Debug)]
pub struct Lookup {
    /// Serve a ready answer (false: `cache-control: no-cache`, a refresh).
    pub read: bool,
    /// Oldest answer acceptable (`cache-control: max-age`), ms.
    pub max_age_ms: Option<u64>,
    /// Claim the way on a miss, until `claim_until_ms`.
    pub claim_until_ms: Option<i64>,
}

/// Something a cache operation did worth a stat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    pub evictions: u64,
    pub expirations: u64,
    pub cas_retries: u64,
}

fn clear_answer(host: &mut dyn Host, set: u32, way: usize, size: u32) {
    if host.shared_set(&way_key(set, way), &[], 0).is_ok() && size > 0 {
        add_bytes(host, Bytes::Free(u64::from(size)), u64::MAX, 8);
    }
}

/// A change to the byte counter.
#[derive(Clone, Copy)]
enum Bytes {
    Take(u64),
    Free(u64),
}

/// Change the byte counter; a take only if the result stays within `max`. Whether it did.
fn add_bytes(host: &mut dyn Host, change: Bytes, max: u64, retries: u32) -> bool {
    for _ in 0..=retries {
        let (held, cas) = match host.shared_get(BYTES_KEY) {
            Some((v, cas)) => (
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0),
                cas,
            ),
            None => (0, CREATE_CAS),
        };
        let next = match change {
            Bytes::Take(n) => held.saturating_add(n),
            Bytes::Free(n) => held.saturating_sub(n),
        };
        if matches!(change, Bytes::Take(_)) && next > max {
            return false;
        }
        match host.shared_set(BYTES_KEY, next.to_string().as_bytes(), cas) {
            Ok(()) => return true,
            Err(SharedError::CasMismatch) => continue,
            Err(SharedError::Failed) => return false,
        }
    }
    false
}

/// Bytes of answers the cache holds now.
pub fn bytes_held(host: &dyn Host) -> u64 {
    host.shared_get(BYTES_KEY)
        .and_then(|(v, _)| std::str::from_utf8(&v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Look `key` up at `now_ms`, and on a miss claim a way for it when `ask` says so.
pub fn lookup(
    host: &mut dyn Host,
    bounds: &Bounds,
    key: &Key,
    now_ms: i64,
    ask: Lookup,
    activity: &mut Activity,
) -> Found {
    let set = key.set(bounds.sets);
    for _ in 0..=bounds.cas_retries {
        let (mut ways, cas) = read_set(host, set);
        // This key's own way, if it has one.
        let own = ways
            .iter()
            .position(|w| w.state != State::Empty && w.key == key.0);
        if let Some(at) = own {
            let way = ways.get(at).copied().unwrap_or_default();
            match way.state {
                State::Ready if way.until_ms > now_ms => {
                    let young = ask.max_age_ms.is_none_or(|max| {
                        now_ms.saturating_sub(way.created_ms)
                            <= i64::try_from(max).unwrap_or(i64::MAX)
                    });
                    if ask.read && young {
                        if let Some(entry) = host
                            .shared_get(&way_key(set, at))
                            .and_then(|(bytes, _)| decode_entry(&bytes, key, way.generation))
                        {
                            return Found::Hit(entry);
                        }
                    }
                }
                State::Pending if way.until_ms > now_ms => {
                    return Found::Pending {
                        until_ms: way.until_ms,
                    };
                }
                _ => {}
            }
        }
        let Some(until) = ask.claim_until_ms else {
            return Found::Miss { claimed: None };
        };
        // Claim: this key's own way if it has one (expired, or refreshed), else an empty
        // way, else an expired one, else the ready answer expiring soonest. Ways claimed
        // by requests still in flight are never taken: when all are, go without a claim.
        let victim = own
            .or_else(|| ways.iter().position(|w| w.state == State::Empty))
            .or_else(|| ways.iter().position(|w| w.until_ms <= now_ms))
            .or_else(|| {
                ways.iter()
                    .enumerate()
                    .filter(|(_, w)| w.state == State::Ready)
                    .min_by_key(|(_, w)| w.until_ms)
                    .map(|(i, _)| i)
            });
        let Some(victim) = victim else {
            return Found::Miss { claimed: None };
        };
        let Some(slot) = ways.get_mut(victim) else {
            return Found::Miss { claimed: None };
        };
        let old = *slot;
        let generation = old.generation.wrapping_add(1);
        *slot = Way {
            state: State::Pending,
            key: key.0,
            generation,
            created_ms: now_ms,
            until_ms: until,
            size: 0,
        };
        match host.shared_set(&set_key(set), &encode_set(&ways), cas) {
            Ok(()) => {
                if old.state == State::Ready {
                    if old.until_ms > now_ms && old.key != key.0 {
                        activity.evictions = activity.evictions.saturating_add(1);
                    } else {
                        activity.expirations = activity.expirations.saturating_add(1);
                    }
                    clear_answer(host, set, victim, old.size);
                }
                return Found::Miss {
                    claimed: Some(generation),
                };
            }
            Err(SharedError::CasMismatch) => {
                activity.cas_retries = activity.cas_retries.saturating_add(1);
            }
            Err(SharedError::Failed) => break,
        }
    }
    Found::Miss { claimed: None }
}

/// Why an answer was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStored {
    /// Larger than `max_entry_bytes`.
    TooLarge,
    /// The cache holds `max_bytes` already.
    Full,
    /// The way was taken by another request meanwhile, or shared data refused a write.
    Lost,
}

impl NotStored {
    /// The stat tag.
    pub fn tag(self) -> &'static str {
        match self {
            NotStored::TooLarge => "too_large",
            NotStored::Full => "full",
            NotStored::Lost => "lost",
        }
    }
}

/// Store `entry` under `key` in the way claimed with `generation`, live until
/// `expires_ms`. On failure the claim is released.
pub fn fill(
    host: &mut dyn Host,
    bounds: &Bounds,
    key: &Key,
    generation: u32,
    entry: &Entry,
    expires_ms: i64,
    activity: &mut Activity,
) -> Result<(), NotStored> {
    let now_ms = entry.created_ms;
    let set = key.set(bounds.sets);
    let payload = encode_entry(key, generation, entry);
    if entry.body.len() > bounds.max_entry_bytes {
        release(host, bounds, key, generation);
        return Err(NotStored::TooLarge);
    }
    let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    // Over `max_bytes`: make room by evicting the ready answers expiring soonest, in this
    // set and the next few (bounded work), before giving up.
    let mut taken = false;
    for attempt in 0..=EVICTION_ATTEMPTS {
        if add_bytes(
            host,
            Bytes::Take(u64::from(size)),
            bounds.max_bytes,
            bounds.cas_retries,
        ) {
            taken = true;
            break;
        }
        if attempt == EVICTION_ATTEMPTS {
            break;
        }
        let sets = bounds.sets.max(1);
        let from = set
            .wrapping_add(attempt.checked_div(WAYS as u32).unwrap_or(0))
            .checked_rem(sets)
            .unwrap_or(0);
        evict_one(host, bounds, from, now_ms, activity);
    }
    if !taken {
        release(host, bounds, key, generation);
        return Err(NotStored::Full);
    }
    let Some(at) = find_claim(host, set, key, generation) else {
        add_bytes(
            host,
            Bytes::Free(u64::from(size)),
            u64::MAX,
            bounds.cas_retries,
        );
        return Err(NotStored::Lost);
    };
    if host.shared_set(&way_key(set, at), &payload, 0).is_err() {
        add_bytes(
            host,
            Bytes::Free(u64::from(size)),
            u64::MAX,
            bounds.cas_retries,
        );
        release(host, bounds, key, generation);
        return Err(NotStored::Lost);
    }
    for _ in 0..=bounds.cas_retries {
        let (mut ways, cas) = read_set(host, set);
        let Some(way) = ways
            .get_mut(at)
            .filter(|w| w.state == State::Pending && w.key == key.0 && w.generation == generation)
        else {
            break;
        };
        way.state = State::Ready;
        way.created_ms = entry.created_ms;
        way.until_ms = expires_ms;
        way.size = size;
        match host.shared_set(&set_key(set), &encode_set(&ways), cas) {
            Ok(()) => return Ok(()),
            Err(SharedError::CasMismatch) => continue,
            Err(SharedError::Failed) => break,
        }
    }
    // The way is someone else's now (or the write failed): take the answer written above
    // back out unless its new owner has replaced it already, and give back its bytes.
    if let Some((bytes, cas)) = host.shared_get(&way_key(set, at)) {
        if decode_entry(&bytes, key, generation).is_some() {
            let _ = host.shared_set(&way_key(set, at), &[], cas);
        }
    }
    add_bytes(
        host,
        Bytes::Free(u64::from(size)),
        u64::MAX,
        bounds.cas_retries,
    );
    Err(NotStored::Lost)
}

/// Evictions a store may make to stay under `max_bytes`.
const EVICTION_ATTEMPTS: u32 = 4 * WAYS as u32;

/// Empty the ready way of `set` that expires soonest; whether one was emptied.
fn evict_one(
    host: &mut dyn Host,
    bounds: &Bounds,
    set: u32,
    now_ms: i64,
    activity: &mut Activity,
) -> bool {
    for _ in 0..=bounds.cas_retries {
        let (mut ways, cas) = read_set(host, set);
        if cas == CREATE_CAS {
            return false;
        }
        let Some((at, way)) = ways
            .iter_mut()
            .enumerate()
            .filter(|(_, w)| w.state == State::Ready)
            .min_by_key(|(_, w)| w.until_ms)
        else {
            return false;
        };
        let old = *way;
        way.state = State::Empty;
        match host.shared_set(&set_key(set), &encode_set(&ways), cas) {
            Ok(()) => {
                if old.until_ms > now_ms {
                    activity.evictions = activity.evictions.saturating_add(1);
                } else {
                    activity.expirations = activity.expirations.saturating_add(1);
                }
                clear_answer(host, set, at, old.size);
                return true;
            }
            Err(SharedError::CasMismatch) => continue,
            Err(SharedError::Failed) => return false,
        }
    }
    false
}

fn find_claim(host: &dyn Host, set: u32, key: &Key, generation: u32) -> Option<usize> {
    let (ways, _) = read_set(host, set);
    ways.iter()
        .position(|w| w.state == State::Pending && w.key == key.0 && w.generation == generation)
}

/// Give up the claim `generation` on `key`'s way: requests waiting for it go upstream.
pub fn release(host: &mut dyn Host, bounds: &Bounds, key: &Key, generation: u32) {
    let set = key.set(bounds.sets);
    for _ in 0..=bounds.cas_retries {
        let (mut ways, cas) = read_set(host, set);
        let Some(way) = ways
            .iter_mut()
            .find(|w| w.state == State::Pending && w.key == key.0 && w.generation == generation)
        else {
            return;
        };
        way.state = State::Empty;
        way.until_ms = 0;
        match host.shared_set(&set_key(set), &encode_set(&ways), cas) {
            Err(SharedError::CasMismatch) => continue,
            _ => return,
        }
    }
}

/// Empty the expired ways of up to `count` sets from `from`; the set to start from next.
pub fn sweep(
    host: &mut dyn Host,
    bounds: &Bounds,
    from: u32,
    count: u32,
    now_ms: i64,
    activity: &mut Activity,
) -> u32 {
    let sets = bounds.sets.max(1);
    let mut set = from.checked_rem(sets).unwrap_or(0);
    for _ in 0..count.min(sets) {
        let (mut ways, cas) = read_set(host, set);
        let mut freed = Vec::new();
        let mut changed = false;
        for (i, way) in ways.iter_mut().enumerate() {
            if way.state != State::Empty && way.until_ms <= now_ms {
                changed = true;
                if way.state == State::Ready {
                    freed.push((i, way.size));
                }
                way.state = State::Empty;
            }
        }
        // Only sets that exist and changed are written (a lost race is retried next pass).
        if changed
            && cas != CREATE_CAS
            && host
                .shared_set(&set_key(set), &encode_set(&ways), cas)
                .is_ok()
        {
            for (i, size) in freed {
                activity.expirations = activity.expirations.saturating_add(1);
                clear_answer(host, set, i, size);
            }
        }
        set = set.wrapping_add(1).checked_rem(sets).unwrap_or(0);
    }
    set
}

/// What the store holds, read whole (tests and the hostile-exchange player).
#[cfg(any(test, feature = "testkit"))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Ways claimed by a request in flight (and not expired).
    pub pending: usize,
    pub ready: usize,
    /// Bytes of the answer keys that hold something.
    pub payload_bytes: u64,
    /// What the byte counter says.
    pub counted_bytes: u64,
    /// Shared-data keys of the cache.
    pub keys: usize,
}

/// Read every set and answer key of the store at `now_ms`.
#[cfg(any(test, feature = "testkit"))]
pub fn audit(host: &dyn Host, bounds: &Bounds, now_ms: i64) -> Audit {
    let mut a = Audit {
        counted_bytes: bytes_held(host),
        ..Audit::default()
    };
    for set in 0..bounds.sets {
        let (ways, cas) = read_set(host, set);
        if cas != CREATE_CAS {
            a.keys = a.keys.saturating_add(1);
        }
        for (i, w) in ways.iter().enumerate() {
            match w.state {
                State::Pending if w.until_ms > now_ms => a.pending = a.pending.saturating_add(1),
                State::Ready => a.ready = a.ready.saturating_add(1),
                _ => {}
            }
            if let Some((bytes, _)) = host.shared_get(&way_key(set, i)) {
                a.keys = a.keys.saturating_add(1);
                a.payload_bytes = a.payload_bytes.saturating_add(bytes.len() as u64);
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn bounds(sets: u32) -> Bounds {
        Bounds {
            sets,
            max_entry_bytes: 1000,
            max_bytes: 10_000,
            cas_retries: 8,
        }
    }

    fn entry(body: &str) -> Entry {
        Entry {
            created_ms: 1_000,
            usage: UsageReport {
                input: 10,
                output: 5,
                ..UsageReport::default()
            },
            body: body.as_bytes().to_vec(),
        }
    }

    fn claim(host: &mut FakeHost, b: &Bounds, key: &Key, now: i64) -> Found {
        lookup(
            host,
            b,
            key,
            now,
            Lookup {
                read: true,
                max_age_ms: None,
                claim_until_ms: Some(now + 30_000),
            },
            &mut Activity::default(),
        )
    }

    #[test]
    fn miss_claim_wait_fill_hit() {
        let mut host = FakeHost::default();
        let b = bounds(4);
        let k = Key::of(b"a");
        let Found::Miss { claimed: Some(g) } = claim(&mut host, &b, &k, 1_000) else {
            panic!("first lookup must claim");
        };
        assert_eq!(
            claim(&mut host, &b, &k, 1_001),
            Found::Pending { until_ms: 31_000 }
        );
        fill(
            &mut host,
            &b,
            &k,
            g,
            &entry("{}"),
            61_000,
            &mut Activity::default(),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(claim(&mut host, &b, &k, 2_000), Found::Hit(entry("{}")));
        assert!(bytes_held(&host) > 2);
        // Expired: a miss, and the claim takes the same way back.
        assert!(matches!(
            claim(&mut host, &b, &k, 61_000),
            Found::Miss { claimed: Some(_) }
        ));
        assert_eq!(bytes_held(&host), 0);
    }

    #[test]
    fn released_claims_let_waiters_go() {
        let mut host = FakeHost::default();
        let b = bounds(1);
        let k = Key::of(b"a");
        let Found::Miss { claimed: Some(g) } = claim(&mut host, &b, &k, 0) else {
            panic!("claim");
        };
        release(&mut host, &b, &k, g);
        assert!(matches!(
            claim(&mut host, &b, &k, 1),
            Found::Miss { claimed: Some(_) }
        ));
    }

    #[test]
    fn bounds_hold_under_a_flood() {
        let mut host = FakeHost::default();
        let b = Bounds {
            sets: 2,
            max_entry_bytes: 300,
            max_bytes: 1_000,
            cas_retries: 8,
        };
        let mut stored = 0;
        let mut activity = Activity::default();
        for i in 0..500u32 {
            let k = Key::of(&i.to_le_bytes());
            let found = lookup(
                &mut host,
                &b,
                &k,
                i64::from(i),
                Lookup {
                    read: true,
                    max_age_ms: None,
                    claim_until_ms: Some(100_000),
                },
                &mut activity,
            );
            if let Found::Miss { claimed: Some(g) } = found {
                if fill(
                    &mut host,
                    &b,
                    &k,
                    g,
                    &entry(&"x".repeat(150)),
                    1_000_000,
                    &mut activity,
                )
                .is_ok()
                {
                    stored += 1;
                }
            }
            assert!(bytes_held(&host) <= b.max_bytes);
        }
        assert!(stored > 100, "stored {stored}");
        assert!(activity.evictions > 0);
        // Only the fixed keys exist: 2 sets, 8 ways, the byte counter.
        assert!(host.shared.borrow().values.len() <= 2 + 8 + 1);
        let too_big = Key::of(b"big");
        if let Found::Miss { claimed: Some(g) } = claim(&mut host, &b, &too_big, 5) {
            assert_eq!(
                fill(
                    &mut host,
                    &b,
                    &too_big,
                    g,
                    &entry(&"x".repeat(301)),
                    10,
                    &mut activity
                ),
                Err(NotStored::TooLarge)
            );
        }
    }

    #[test]
    fn garbage_in_shared_data_is_a_miss_and_is_rewritten() {
        let mut host = FakeHost::default();
        let b = bounds(1);
        let k = Key::of(b"a");
        let _ = host.shared_set(&set_key(0), b"garbage", 0);
        let _ = host.shared_set(&way_key(0, 0), b"TFC1garbage", 0);
        assert!(matches!(
            claim(&mut host, &b, &k, 0),
            Found::Miss { claimed: Some(_) }
        ));
        let _ = host.shared_set(BYTES_KEY, b"not a number", 0);
        assert_eq!(bytes_held(&host), 0);
    }

    #[test]
    fn sweep_empties_expired_answers() {
        let mut host = FakeHost::default();
        let b = bounds(3);
        for i in 0..6u8 {
            let k = Key::of(&[i]);
            if let Found::Miss { claimed: Some(g) } = claim(&mut host, &b, &k, 0) {
                let _ = fill(
                    &mut host,
                    &b,
                    &k,
                    g,
                    &entry("{}"),
                    100,
                    &mut Activity::default(),
                );
            }
        }
        assert!(bytes_held(&host) > 0);
        let mut activity = Activity::default();
        let next = sweep(&mut host, &b, 2, 3, 100, &mut activity);
        assert_eq!(next, 2);
        assert_eq!(bytes_held(&host), 0);
        assert_eq!(activity.expirations, 6);
    }
}
