//! Budgets: what a key may spend per window, and the arithmetic of spending it.
//!
//! A [`Budget`] is key × window × unit × tiers. Its per-key state is an [`Account`]: the
//! window it belongs to and what each tier has given in it. Tiers are drawn in order —
//! `base` (resets every window), `elastic` (a prepaid balance that never resets), `burst`
//! (per window, only inside peak hours) — and refunded in the reverse order.
//!
//! Everything here is pure: the caller reads an account from shared data, asks for a
//! [`Verdict`], draws or settles, and writes it back under CAS (`ledger.rs`). Amounts are
//! integers in the budget's unit: tokens, or micro-USD.

pub mod identity;
pub mod ledger;
pub mod plan;
pub mod price;
pub mod window;

use crate::budget::window::{PeakHours, Window};

/// What a budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Prompt plus completion tokens.
    Tokens,
    /// Cost in micro-USD, from per-model prices.
    Usd,
}

impl Unit {
    /// Name used in stats, headers and the admin API.
    pub fn tag(self) -> &'static str {
        match self {
            Unit::Tokens => "tokens",
            Unit::Usd => "usd",
        }
    }
}

/// Where a request's budget key comes from. Only trusted sources: a header the auth layer
/// sets (clients must not be able to set it — strip it at the edge), a hash of the bearer
/// credential, the route, or a constant for a global budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The value of this request header.
    Header(String),
    /// A hash of the `authorization: Bearer …` credential (or `x-api-key`).
    BearerHash,
    /// The name of the route Envoy matched.
    Route,
    /// One key for every request.
    Constant(String),
}

/// What happens when a request does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TripAction {
    /// 429 with an OpenAI-style error.
    Reject,
    /// Send the request to the economy route with a cheaper model; reject when there is
    /// no cheaper model.
    Reroute,
}

/// What happens to a request above the per-request cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OversizeAction {
    /// 400 with its own error code.
    Reject,
    /// Drop the oldest non-system messages until the request fits (chat and Anthropic).
    Truncate,
}

/// Priority classes: p0 critical, p1 normal, p2 batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    P0,
    P1,
    P2,
}

impl Priority {
    /// `p0`, `p1`, `p2`.
    pub fn parse(s: &str) -> Option<Priority> {
        match s.trim().to_ascii_lowercase().as_str() {
            "p0" => Some(Priority::P0),
            "p1" => Some(Priority::P1),
            "p2" => Some(Priority::P2),
            _ => None,
        }
    }

    /// Name used in stats.
    pub fn tag(self) -> &'static str {
        match self {
            Priority::P0 => "p0",
            Priority::P1 => "p1",
            Priority::P2 => "p2",
        }
    }
}

/// The burst tier: extra allowance per window, usable only inside peak hours.
#[derive(Clone, Debug, PartialEq)]
pub struct Burst {
    pub amount: u64,
    pub peak: PeakHours,
}

/// One validated budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub name: String,
    pub key: KeySource,
    pub window: Window,
    pub unit: Unit,
    /// Allowance per window.
    pub base: u64,
    /// Elastic balance a new key starts with.
    pub elastic: u64,
    pub burst: Option<Burst>,
    pub action: TripAction,
    /// Usage ratio from which responses carry a warning.
    pub warn_at: f64,
    /// Usage ratio from which a growing share of p1/p2 requests is rerouted.
    pub degrade_from: Option<f64>,
    /// Share of the limit each priority may use (p0, p1, p2).
    pub ceilings: [f64; 3],
    /// Largest prompt + completion reservation one request may carry, in tokens.
    pub max_request_tokens: Option<u64>,
    pub oversize: OversizeAction,
    /// Distinct keys tracked; further identities share the overflow key.
    pub max_keys: u64,
}

/// Per-key state of one budget, as stored in shared data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// Start of the window the per-window fields belong to (Unix seconds).
    pub window_start: i64,
    pub base_used: u64,
    pub burst_used: u64,
    /// Elastic drawn in this window (for reporting; the balance is what limits).
    pub elastic_used: u64,
    /// Elastic balance left; never resets.
    pub elastic_balance: u64,
}

/// Where a reservation was drawn from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drawn {
    pub base: u64,
    pub elastic: u64,
    pub burst: u64,
}

impl Drawn {
    /// Everything drawn.
    pub fn total(&self) -> u64 {
        self.base
            .saturating_add(self.elastic)
            .saturating_add(self.burst)
    }
}

/// An account's position at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    pub used: u64,
    pub remaining: u64,
    /// `used + remaining`: what the key may spend in total this window.
    pub limit: u64,
}

impl Standing {
    /// Used share of the limit (1.0 when the limit is 0).
    pub fn ratio(&self) -> f64 {
        if self.limit == 0 {
            1.0
        } else {
            self.used as f64 / self.limit as f64
        }
    }
}

/// The budget's answer for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Fits; `warn` when usage after it reaches `warn_at`.
    Allow { warn: bool },
    /// Fits, but progressive degradation picked this request for rerouting.
    Degrade,
    /// Does not fit under this priority's ceiling: apply the trip action.
    Trip,
}

impl Budget {
    /// The burst allowance available at `now`.
    fn burst_now(&self, now: i64) -> u64 {
        match &self.burst {
            Some(b) if b.peak.contains(now) => b.amount,
            _ => 0,
        }
    }

    /// A key's first account.
    pub fn open_account(&self, now: i64) -> Account {
        Account {
            window_start: self.window.start(now),
            elastic_balance: self.elastic,
            ..Account::default()
        }
    }

    /// `account` moved into the window containing `now`: per-window use resets, the
    /// elastic balance stays.
    pub fn roll(&self, account: Account, now: i64) -> Account {
        let start = self.window.start(now);
        if account.window_start == start {
            return account;
        }
        Account {
            window_start: start,
            base_used: 0,
            burst_used: 0,
            elastic_used: 0,
            elastic_balance: account.elastic_balance,
        }
    }

    /// Where `account` stands at `now` (already rolled).
    pub fn standing(&self, account: &Account, now: i64) -> Standing {
        let burst = self.burst_now(now);
        let remaining = self
            .base
            .saturating_sub(account.base_used)
            .saturating_add(account.elastic_balance)
            .saturating_add(burst.saturating_sub(account.burst_used));
        let used = account
            .base_used
            .saturating_add(account.elastic_used)
            .saturating_add(account.burst_used);
        Standing {
            used,
            remaining,
            limit: used.saturating_add(remaining),
        }
    }

    /// The verdict for a request of `priority` that would draw `estimate`. `pick` is the
    /// request's deterministic position in [0, 1) for progressive degradation.
    pub fn judge(
        &self,
        standing: &Standing,
        estimate: u64,
        priority: Priority,
        pick: f64,
    ) -> Verdict {
        // u128: a saturated sum must not look like it fits (and two u64 cannot saturate it).
        let after = u128::from(standing.used).saturating_add(u128::from(estimate)) as f64;
        let limit = standing.limit as f64;
        let [p0, p1, p2] = self.ceilings;
        let ceiling = match priority {
            Priority::P0 => p0,
            Priority::P1 => p1,
            Priority::P2 => p2,
        };
        if standing.limit == 0 || after > ceiling * limit {
            return Verdict::Trip;
        }
        let ratio = after / limit;
        if let Some(from) = self.degrade_from {
            if priority != Priority::P0 && ratio >= from {
                // From `from` to 100% the rerouted share grows linearly from 0 to 1.
                let share = ((ratio - from) / (1.0 - from)).clamp(0.0, 1.0);
                if pick < share {
                    return Verdict::Degrade;
                }
            }
        }
        Verdict::Allow {
            warn: ratio >= self.warn_at,
        }
    }

    /// Draw `amount` from the tiers in order (base, elastic, burst). With `overdraw`,
    /// whatever the tiers cannot give is charged to base beyond its allowance (rerouted
    /// requests are served and must be paid for); otherwise the draw stops at what is there.
    pub fn draw(&self, account: &mut Account, amount: u64, now: i64, overdraw: bool) -> Drawn {
        // Each part is at most what is left (a `min`), so no subtraction saturates, and the
        // overdrawn base is at most `amount`.
        let mut left = amount;
        let base = left.min(self.base.saturating_sub(account.base_used));
        left = left.saturating_sub(base);
        let elastic = left.min(account.elastic_balance);
        left = left.saturating_sub(elastic);
        let burst = left.min(self.burst_now(now).saturating_sub(account.burst_used));
        left = left.saturating_sub(burst);
        let base = if overdraw {
            base.saturating_add(left)
        } else {
            base
        };
        account.base_used = account.base_used.saturating_add(base);
        account.elastic_balance = account.elastic_balance.saturating_sub(elastic);
        account.elastic_used = account.elastic_used.saturating_add(elastic);
        account.burst_used = account.burst_used.saturating_add(burst);
        Drawn {
            base,
            elastic,
            burst,
        }
    }

    /// Replace a reservation by the actual amount. `reserved_in` is the window the
    /// reservation was drawn in; `account` is already rolled to now.
    ///
    /// Same window: a refund goes back in reverse draw order (burst, elastic, base); an
    /// extra charge is drawn like a new request, overdrawing base if need be. The window
    /// has rolled: the old window's base and burst are gone with it, so only the elastic
    /// part can be refunded, and any extra is charged to the new window.
    pub fn settle(
        &self,
        account: &mut Account,
        reserved: Drawn,
        reserved_in: i64,
        actual: u64,
        now: i64,
    ) {
        // Every part refunded is at most what is left to refund and what is used (a `min`),
        // so no subtraction below saturates.
        let total = reserved.total();
        if actual > total {
            self.draw(account, actual.saturating_sub(total), now, true);
            return;
        }
        let mut refund = total.saturating_sub(actual);
        if account.window_start == reserved_in {
            let burst = refund.min(reserved.burst).min(account.burst_used);
            account.burst_used = account.burst_used.saturating_sub(burst);
            refund = refund.saturating_sub(burst);
        }
        let elastic = refund.min(reserved.elastic);
        account.elastic_balance = account.elastic_balance.saturating_add(elastic);
        if account.window_start == reserved_in {
            account.elastic_used = account.elastic_used.saturating_sub(elastic);
        }
        refund = refund.saturating_sub(elastic);
        if account.window_start == reserved_in {
            let base = refund.min(account.base_used);
            account.base_used = account.base_used.saturating_sub(base);
        }
    }
}

/// Encoding of an account in shared data: a version byte and five little-endian 64-bit
/// fields. Fixed size, so a torn or foreign value is recognised by its length.
pub const ACCOUNT_BYTES: usize = 1 + 5 * 8;

impl Account {
    /// The shared-data value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ACCOUNT_BYTES);
        out.push(1);
        out.extend_from_slice(&self.window_start.to_le_bytes());
        for v in [
            self.base_used,
            self.burst_used,
            self.elastic_used,
            self.elastic_balance,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Read a shared-data value; `None` if it is not an account of this version.
    pub fn decode(bytes: &[u8]) -> Option<Account> {
        if bytes.len() != ACCOUNT_BYTES {
            return None;
        }
        let (&1, fields) = bytes.split_first()? else {
            return None;
        };
        // The five fields in order (fields are evaluated in the order written).
        let mut words = fields.chunks_exact(8).map(<[u8; 8]>::try_from);
        let mut field = || words.next()?.ok();
        Some(Account {
            window_start: i64::from_le_bytes(field()?),
            base_used: u64::from_le_bytes(field()?),
            burst_used: u64::from_le_bytes(field()?),
            elastic_used: u64::from_le_bytes(field()?),
            elastic_balance: u64::from_le_bytes(field()?),
        })
    }
}

/// A request's deterministic position in [0, 1), from a stable request attribute (Envoy's
/// `x-request-id`), so a retried request lands on the same side of the degradation share.
pub fn pick(seed: &str) -> f64 {
    // FNV-1a, then the splitmix64 finaliser to spread similar ids over the high bits:
    // stable across VMs and builds, which a std hasher does not promise.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::window::{days_from_civil, WindowKind};

    fn at(y: i64, m: u32, d: u32, hh: i64, mm: i64) -> i64 {
        days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60
    }

    fn budget() -> Budget {
        Budget {
            name: "t".into(),
            key: KeySource::Constant("all".into()),
            window: Window::new(WindowKind::Day, 0).unwrap(),
            unit: Unit::Tokens,
            base: 1000,
            elastic: 0,
            burst: None,
            action: TripAction::Reject,
            warn_at: 0.8,
            degrade_from: None,
            ceilings: [1.0, 0.9, 0.7],
            max_request_tokens: None,
            oversize: OversizeAction::Reject,
            max_keys: 100,
        }
    }

    fn with_burst(mut b: Budget) -> Budget {
        b.burst = Some(Burst {
            amount: 500,
            peak: PeakHours::parse("09:00", "17:00", &[], 0).unwrap(),
        });
        b
    }

    const NOON: (i64, u32, u32) = (2026, 3, 10);

    fn noon() -> i64 {
        at(NOON.0, NOON.1, NOON.2, 12, 0)
    }

    fn night() -> i64 {
        at(NOON.0, NOON.1, NOON.2, 22, 0)
    }

    #[test]
    fn tiers_are_drawn_base_then_elastic_then_burst() {
        let b = with_burst(budget());
        let mut a = Account {
            elastic_balance: 300,
            ..b.open_account(noon())
        };
        assert_eq!(
            b.draw(&mut a, 900, noon(), false),
            Drawn {
                base: 900,
                elastic: 0,
                burst: 0
            }
        );
        assert_eq!(
            b.draw(&mut a, 250, noon(), false),
            Drawn {
                base: 100,
                elastic: 150,
                burst: 0
            }
        );
        assert_eq!(
            b.draw(&mut a, 400, noon(), false),
            Drawn {
                base: 0,
                elastic: 150,
                burst: 250
            }
        );
        assert_eq!(
            a,
            Account {
                window_start: a.window_start,
                base_used: 1000,
                burst_used: 250,
                elastic_used: 300,
                elastic_balance: 0
            }
        );
    }

    #[test]
    fn burst_is_only_available_in_peak_hours() {
        let b = with_burst(budget());
        let a = b.open_account(noon());
        assert_eq!(b.standing(&a, noon()).remaining, 1500);
        assert_eq!(b.standing(&a, night()).remaining, 1000);
        let mut a = Account {
            base_used: 1000,
            ..a
        };
        assert_eq!(b.draw(&mut a, 100, night(), false).total(), 0);
    }

    #[test]
    fn overdraw_charges_what_the_tiers_cannot_give_to_base() {
        let b = budget();
        let mut a = Account {
            base_used: 950,
            ..b.open_account(noon())
        };
        assert_eq!(
            b.draw(&mut a, 200, noon(), true),
            Drawn {
                base: 200,
                elastic: 0,
                burst: 0
            }
        );
        assert_eq!(a.base_used, 1150);
        assert_eq!(b.standing(&a, noon()).ratio(), 1.0);
    }

    #[test]
    fn priority_ceilings_shed_batch_first_and_keep_a_reserve_for_critical() {
        let b = budget();
        // 650 used of 1000: p2 may go to 700, p1 to 900, p0 to 1000.
        let s = b.standing(
            &Account {
                base_used: 650,
                ..b.open_account(noon())
            },
            noon(),
        );
        assert_eq!(
            b.judge(&s, 50, Priority::P2, 0.5),
            Verdict::Allow { warn: false }
        );
        assert_eq!(b.judge(&s, 51, Priority::P2, 0.5), Verdict::Trip);
        assert_eq!(
            b.judge(&s, 250, Priority::P1, 0.5),
            Verdict::Allow { warn: true }
        );
        assert_eq!(b.judge(&s, 251, Priority::P1, 0.5), Verdict::Trip);
        assert_eq!(
            b.judge(&s, 350, Priority::P0, 0.5),
            Verdict::Allow { warn: true }
        );
        assert_eq!(b.judge(&s, 351, Priority::P0, 0.5), Verdict::Trip);
    }

    #[test]
    fn warning_starts_at_warn_at() {
        let b = budget();
        let s = b.standing(&b.open_account(noon()), noon());
        assert_eq!(
            b.judge(&s, 799, Priority::P0, 0.0),
            Verdict::Allow { warn: false }
        );
        assert_eq!(
            b.judge(&s, 800, Priority::P0, 0.0),
            Verdict::Allow { warn: true }
        );
    }

    #[test]
    fn degradation_share_grows_linearly_and_spares_p0() {
        let mut b = budget();
        b.degrade_from = Some(0.8);
        b.ceilings = [1.0, 1.0, 1.0];
        let s = b.standing(
            &Account {
                base_used: 800,
                ..b.open_account(noon())
            },
            noon(),
        );
        // After a 100-token request usage is 90%: half of p1/p2 requests are rerouted.
        assert_eq!(b.judge(&s, 100, Priority::P1, 0.49), Verdict::Degrade);
        assert_eq!(
            b.judge(&s, 100, Priority::P1, 0.51),
            Verdict::Allow { warn: true }
        );
        assert_eq!(
            b.judge(&s, 100, Priority::P0, 0.0),
            Verdict::Allow { warn: true }
        );
        // At 80% exactly the share is 0; near 100% nearly everything goes.
        assert_eq!(
            b.judge(&s, 0, Priority::P2, 0.0),
            Verdict::Allow { warn: true }
        );
        assert_eq!(b.judge(&s, 199, Priority::P2, 0.99), Verdict::Degrade);
    }

    #[test]
    fn pick_is_deterministic_and_spread() {
        assert_eq!(pick("req-1"), pick("req-1"));
        let picks: Vec<f64> = (0..1000).map(|i| pick(&format!("req-{i}"))).collect();
        assert!(picks.iter().all(|p| (0.0..1.0).contains(p)));
        let below_half = picks.iter().filter(|p| **p < 0.5).count();
        assert!((400..600).contains(&below_half), "{below_half}");
    }

    #[test]
    fn refund_returns_burst_then_elastic_then_base() {
        let b = with_burst(budget());
        let mut a = Account {
            base_used: 800,
            elastic_balance: 100,
            ..b.open_account(noon())
        };
        let start = a.window_start;
        let drawn = b.draw(&mut a, 500, noon(), false);
        assert_eq!(
            drawn,
            Drawn {
                base: 200,
                elastic: 100,
                burst: 200
            }
        );
        b.settle(&mut a, drawn, start, 120, noon());
        // 380 refunded: 200 burst, 100 elastic, 80 base.
        assert_eq!(
            (a.base_used, a.elastic_balance, a.elastic_used, a.burst_used),
            (920, 100, 0, 0)
        );
    }

    #[test]
    fn extra_actual_usage_is_charged_even_beyond_the_budget() {
        let b = budget();
        let mut a = b.open_account(noon());
        let start = a.window_start;
        let drawn = b.draw(&mut a, 900, noon(), false);
        b.settle(&mut a, drawn, start, 1300, noon());
        assert_eq!(a.base_used, 1300);
    }

    #[test]
    fn settling_after_the_window_rolled_refunds_only_elastic_and_charges_extras_to_the_new_window()
    {
        let b = budget();
        let mut a = Account {
            base_used: 950,
            elastic_balance: 100,
            ..b.open_account(noon())
        };
        let old = a.window_start;
        let drawn = b.draw(&mut a, 120, noon(), false);
        assert_eq!(
            drawn,
            Drawn {
                base: 50,
                elastic: 70,
                burst: 0
            }
        );
        let tomorrow = noon() + 86_400;
        let mut rolled = b.roll(a, tomorrow);
        assert_eq!(rolled.base_used, 0);
        b.settle(&mut rolled, drawn, old, 20, tomorrow);
        // 100 refunded: the 70 elastic comes back; the base part died with yesterday.
        assert_eq!((rolled.base_used, rolled.elastic_balance), (0, 100));
        let mut rolled = b.roll(a, tomorrow);
        b.settle(&mut rolled, drawn, old, 200, tomorrow);
        assert_eq!(rolled.base_used, 80);
    }

    #[test]
    fn roll_keeps_the_elastic_balance() {
        let b = budget();
        let a = Account {
            window_start: b.window.start(noon()),
            base_used: 10,
            burst_used: 5,
            elastic_used: 7,
            elastic_balance: 42,
        };
        assert_eq!(b.roll(a, noon()), a);
        let next = b.roll(a, noon() + 86_400);
        assert_eq!(
            next,
            Account {
                window_start: a.window_start + 86_400,
                elastic_balance: 42,
                ..Account::default()
            }
        );
    }

    #[test]
    fn a_zero_limit_trips_every_request() {
        let mut b = budget();
        b.base = 0;
        let s = b.standing(&b.open_account(noon()), noon());
        assert_eq!(s.ratio(), 1.0);
        assert_eq!(b.judge(&s, 0, Priority::P0, 0.0), Verdict::Trip);
    }

    #[test]
    fn account_round_trips_and_rejects_foreign_values() {
        let a = Account {
            window_start: -5,
            base_used: 1,
            burst_used: u64::MAX,
            elastic_used: 3,
            elastic_balance: 4,
        };
        assert_eq!(Account::decode(&a.encode()), Some(a));
        assert_eq!(Account::decode(b"garbage"), None);
        let mut v = a.encode();
        v[0] = 2;
        assert_eq!(Account::decode(&v), None);
    }

    #[test]
    fn saturating_arithmetic_never_panics_on_absurd_amounts() {
        let b = budget();
        let mut a = b.open_account(noon());
        let d = b.draw(&mut a, u64::MAX, noon(), true);
        assert_eq!(d.total(), u64::MAX);
        let s = b.standing(&a, noon());
        assert_eq!(b.judge(&s, u64::MAX, Priority::P0, 0.0), Verdict::Trip);
        let start = a.window_start;
        b.settle(&mut a, d, start, 0, noon());
        assert_eq!(a.base_used, 0);
    }
}
