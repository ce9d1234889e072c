//! The ledger: budget accounts in Envoy shared data, changed only by compare-and-swap.
//!
//! Shared data is one map per Envoy process, shared by every worker VM under one lock per
//! operation. A read-modify-write is therefore a loop: read value and CAS token, compute,
//! write with the token; if another worker wrote in between the write fails with a
//! mismatch and the loop reads again. The loop is bounded; when it runs out the caller
//! applies the configured failure mode.
//!
//! Keys: `tokenfuse/v1/<budget>/k/<key>` holds an [`Account`]; `tokenfuse/v1/<budget>/#keys`
//! counts the keys created, to cap them (shared data never expires or evicts, so a client
//! rotating identities would otherwise grow it without bound). One key per (budget, key):
//! windows roll in place.
//!
//! Creation is the delicate race: Envoy inserts a missing key whatever CAS token the writer
//! passes, so two workers creating the same account could both "succeed" and the second
//! would erase the first's reservation. Creations are written with [`CREATE_CAS`], a token
//! Envoy never hands out in practice (tokens count up from 1 per write): if the key is
//! missing it is inserted; if another worker created it first, the write fails with a
//! mismatch and the loop re-reads the real account.

use crate::budget::{Account, Budget};
use crate::host::{Host, SharedError};

/// CAS token for writes that must only create a key (see the module doc).
pub const CREATE_CAS: u32 = u32::MAX;

/// The account key of `key` in `budget`.
pub fn account_key(budget: &Budget, key: &str) -> String {
    format!("tokenfuse/v1/{}/k/{}", budget.name, key)
}

fn count_key(budget: &Budget) -> String {
    format!("tokenfuse/v1/{}/#keys", budget.name)
}

/// The key every identity shares once a budget tracks `max_keys` keys.
pub const OVERFLOW_KEY: &str = "_overflow";

/// Why an update did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerError {
    /// Every attempt lost a CAS race.
    Contended { attempts: u32 },
    /// The proxy refused the write.
    Unavailable,
}

/// The result of an update: what the closure returned, the account as written (or as read,
/// when the closure chose not to write) and how many CAS races were lost on the way.
#[derive(Debug)]
pub struct Updated<R> {
    pub value: R,
    pub account: Account,
    pub retries: u32,
}

/// Read-modify-write the account `shared_key` of `budget` at `now` (Unix seconds). `change`
/// sees the account rolled into the current window and returns whether to write it back,
/// plus a value for the caller. A missing account starts as `budget.open_account(now)`; it
/// is created only if `change` writes. Values that are not accounts (a foreign writer,
/// an older layout) are replaced by a fresh account.
pub fn update<R>(
    host: &mut dyn Host,
    budget: &Budget,
    shared_key: &str,
    now: i64,
    retries: u32,
    mut change: impl FnMut(&mut Account) -> (bool, R),
) -> Result<Updated<R>, LedgerError> {
    let mut lost = 0;
    loop {
        let (mut account, cas) = match host.shared_get(shared_key) {
            Some((bytes, cas)) => (
                Account::decode(&bytes)
                    .map(|a| budget.roll(a, now))
                    .unwrap_or_else(|| budget.open_account(now)),
                cas,
            ),
            None => (budget.open_account(now), CREATE_CAS),
        };
        let (write, value) = change(&mut account);
        if !write {
            return Ok(Updated {
                value,
                account,
                retries: lost,
            });
        }
        match host.shared_set(shared_key, &account.encode(), cas) {
            Ok(()) => {
                return Ok(Updated {
                    value,
                    account,
                    retries: lost,
                })
            }
            Err(SharedError::CasMismatch) if lost < retries => lost += 1,
            Err(SharedError::CasMismatch) => {
                return Err(LedgerError::Contended { attempts: lost + 1 })
            }
            Err(SharedError::Failed) => return Err(LedgerError::Unavailable),
        }
    }
}

/// Read an account without changing it (`None` when the key has none yet).
pub fn read(host: &dyn Host, budget: &Budget, shared_key: &str, now: i64) -> Option<Account> {
    let (bytes, _) = host.shared_get(shared_key)?;
    Some(budget.roll(Account::decode(&bytes)?, now))
}

/// The key `key` is accounted under: itself when its account exists or can still be
/// created under `max_keys`, [`OVERFLOW_KEY`] otherwise. Creating an account here (empty)
/// makes the key count even if its first request is then rejected, so repeated rejected
/// requests cannot inflate the count.
pub fn admit_key(
    host: &mut dyn Host,
    budget: &Budget,
    key: &str,
    now: i64,
    retries: u32,
) -> Result<String, LedgerError> {
    if key == OVERFLOW_KEY || host.shared_get(&account_key(budget, key)).is_some() {
        return Ok(key.to_string());
    }
    // Take a slot in the key count first; a slot taken by a creation that then loses the
    // race to another worker creating the same key is not given back (a rare overcount,
    // on the safe side).
    let counter = count_key(budget);
    let mut lost = 0;
    let admitted = loop {
        let (count, cas) = match host.shared_get(&counter) {
            Some((bytes, cas)) => (
                bytes
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0),
                cas,
            ),
            None => (0, CREATE_CAS),
        };
        if count >= budget.max_keys {
            break false;
        }
        match host.shared_set(&counter, &(count + 1).to_le_bytes(), cas) {
            Ok(()) => break true,
            Err(SharedError::CasMismatch) if lost < retries => lost += 1,
            Err(SharedError::CasMismatch) => {
                return Err(LedgerError::Contended { attempts: lost + 1 })
            }
            Err(SharedError::Failed) => return Err(LedgerError::Unavailable),
        }
    };
    if !admitted {
        return Ok(OVERFLOW_KEY.to_string());
    }
    let shared_key = account_key(budget, key);
    match host.shared_set(&shared_key, &budget.open_account(now).encode(), CREATE_CAS) {
        // Created, or another worker created it first: either way it exists now.
        Ok(()) | Err(SharedError::CasMismatch) => Ok(key.to_string()),
        Err(SharedError::Failed) => Err(LedgerError::Unavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{KeySource, OversizeAction, TripAction, Unit};
    use crate::host::fake::FakeHost;
    use crate::window::{Window, WindowKind};

    fn budget(max_keys: u64) -> Budget {
        Budget {
            name: "b".into(),
            key: KeySource::Header("x-tenant".into()),
            window: Window::new(WindowKind::Minute, 0).unwrap(),
            unit: Unit::Tokens,
            base: 100,
            elastic: 0,
            burst: None,
            action: TripAction::Reject,
            warn_at: 0.8,
            degrade_from: None,
            ceilings: [1.0, 1.0, 1.0],
            max_request_tokens: None,
            oversize: OversizeAction::Reject,
            max_keys,
        }
    }

    const NOW: i64 = 1_800_000_000;

    fn add(host: &mut FakeHost, b: &Budget, n: u64) -> Result<Updated<()>, LedgerError> {
        update(host, b, &account_key(b, "k"), NOW, 3, |a| {
            a.base_used += n;
            (true, ())
        })
    }

    #[test]
    fn first_update_creates_the_account_and_later_ones_add_to_it() {
        let b = budget(10);
        let mut h = FakeHost::default();
        add(&mut h, &b, 5).unwrap();
        add(&mut h, &b, 7).unwrap();
        assert_eq!(
            read(&h, &b, &account_key(&b, "k"), NOW).unwrap().base_used,
            12
        );
    }

    #[test]
    fn lost_races_are_retried_up_to_the_bound() {
        let b = budget(10);
        let mut h = FakeHost::default();
        add(&mut h, &b, 1).unwrap();
        h.shared.borrow_mut().forced_conflicts = 3;
        let u = add(&mut h, &b, 1).unwrap();
        assert_eq!(u.retries, 3);
        h.shared.borrow_mut().forced_conflicts = 4;
        assert_eq!(
            add(&mut h, &b, 1).unwrap_err(),
            LedgerError::Contended { attempts: 4 }
        );
        assert_eq!(
            read(&h, &b, &account_key(&b, "k"), NOW).unwrap().base_used,
            2
        );
    }

    #[test]
    fn a_concurrent_creation_is_not_overwritten() {
        // Worker A and B both read "missing"; A creates the account and reserves 40;
        // B's creation must fail and B must re-read A's account instead of erasing it.
        let b = budget(10);
        let mut a_host = FakeHost::default();
        let mut b_host = FakeHost {
            shared: a_host.shared.clone(),
            ..FakeHost::default()
        };
        let key = account_key(&b, "k");
        let mut b_attempts = 0;
        let result = update(&mut b_host, &b, &key, NOW, 3, |acct| {
            b_attempts += 1;
            if b_attempts == 1 {
                // A wins the race while B is computing.
                add(&mut a_host, &b, 40).unwrap();
            }
            acct.base_used += 10;
            (true, ())
        });
        result.unwrap();
        assert_eq!(b_attempts, 2);
        assert_eq!(read(&b_host, &b, &key, NOW).unwrap().base_used, 50);
    }

    #[test]
    fn no_write_means_no_account_is_created() {
        let b = budget(10);
        let mut h = FakeHost::default();
        update(&mut h, &b, &account_key(&b, "k"), NOW, 3, |_| (false, ())).unwrap();
        assert!(h.shared.borrow().values.is_empty());
    }

    #[test]
    fn a_foreign_value_is_replaced_by_a_fresh_account() {
        let b = budget(10);
        let mut h = FakeHost::default();
        h.shared_set(&account_key(&b, "k"), b"not an account", 0)
            .unwrap();
        add(&mut h, &b, 3).unwrap();
        assert_eq!(
            read(&h, &b, &account_key(&b, "k"), NOW).unwrap().base_used,
            3
        );
    }

    #[test]
    fn broken_shared_data_is_unavailable() {
        let b = budget(10);
        let mut h = FakeHost::default();
        h.shared.borrow_mut().broken = true;
        assert_eq!(add(&mut h, &b, 1).unwrap_err(), LedgerError::Unavailable);
    }

    #[test]
    fn keys_beyond_the_cap_share_the_overflow_account() {
        let b = budget(2);
        let mut h = FakeHost::default();
        assert_eq!(admit_key(&mut h, &b, "a", NOW, 3).unwrap(), "a");
        assert_eq!(admit_key(&mut h, &b, "b", NOW, 3).unwrap(), "b");
        assert_eq!(admit_key(&mut h, &b, "c", NOW, 3).unwrap(), OVERFLOW_KEY);
        assert_eq!(admit_key(&mut h, &b, "d", NOW, 3).unwrap(), OVERFLOW_KEY);
        // Known keys stay themselves; re-admitting does not count twice.
        assert_eq!(admit_key(&mut h, &b, "a", NOW, 3).unwrap(), "a");
        // Accounts exist for a, b only (plus the counter): memory is bounded.
        let accounts = h
            .shared
            .borrow()
            .values
            .keys()
            .filter(|k| k.contains("/k/"))
            .count();
        assert_eq!(accounts, 2);
    }

    #[test]
    fn windows_roll_in_place_without_new_keys() {
        let b = budget(10);
        let mut h = FakeHost::default();
        add(&mut h, &b, 90).unwrap();
        let later = NOW + 120;
        let u = update(&mut h, &b, &account_key(&b, "k"), later, 3, |a| {
            a.base_used += 1;
            (true, ())
        })
        .unwrap();
        assert_eq!(u.account.base_used, 1);
        assert_eq!(h.shared.borrow().values.len(), 1);
    }
}
