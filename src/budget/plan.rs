//! Enforcement: turn a counted request into reservations against every budget, or into a
//! refusal; and later settle those reservations with what the exchange really cost.
//!
//! Planning happens in two passes. The first reads each budget's account (no writes) to
//! choose the route: a trip on a `reject` budget refuses the request; a trip on a `reroute`
//! budget, or progressive degradation, sends it to the cheaper model. The second pass
//! reserves, budget by budget, each in its own CAS transaction that judges the account
//! again before drawing — so however many requests race, a budget only admits what fits.
//! If a later budget refuses, the reservations already made are refunded.
//!
//! When no budget can change the route (every one rejects, none degrades), the first pass
//! is skipped: the second judges each budget inside its transaction anyway, and refuses the
//! same request. The difference is only transient: with several budgets, the ones before
//! the refusing one hold the request's reservation for the moment it takes to refund it.
//!
//! Rerouted requests are served: they are charged to every budget even beyond its limit
//! (an operator who wants a hard stop adds a `reject` budget above the `reroute` one).

use std::cell::Cell;
use std::rc::Rc;

use crate::budget::ledger::{self, Hold, LedgerError, Slot};
use crate::budget::price::PriceList;
use crate::budget::{Account, Budget, Drawn, Priority, Standing, TripAction, Unit, Verdict};
use crate::config::{Config, FailureMode};
use crate::host::Host;
use crate::llm::usage::UsageReport;
use crate::stats::{catalog, Stat};
use crate::tokenizer::best_match;

/// What is known about a request when it is planned.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    pub model: &'a str,
    pub prompt: u64,
    pub max_output: u64,
    pub priority: Priority,
    /// Deterministic position in [0, 1) for progressive degradation.
    pub pick: f64,
    pub now_ms: i64,
}

/// One key of one budget as a VM knows it: the identity (its stored key, or
/// [`ledger::OVERFLOW_KEY`]), the slot it was last found in, and the names of its stats.
/// Built once per VM (see [`crate::filter::Filter`]) and shared by every request of that
/// key, so a request formats none of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetKey {
    /// The stored key the account belongs to.
    pub key: String,
    /// Where this VM last found the account: a hint, checked against the owner on use.
    pub slot: Cell<Option<Slot>>,
    /// The key's stats; `None` when the tenant tag cap is reached (an `other` gauge would
    /// mean nothing).
    pub stats: Option<KeyStats>,
}

/// The stat names of one budget key, tagged budget, tenant, unit and window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyStats {
    /// Gauges: the key's standing this window, and the seconds until the window resets.
    pub used: String,
    pub limit: String,
    pub remaining: String,
    pub reset_seconds: String,
    /// Gauge: the key's base allowance per window (its override, if any).
    pub base: String,
    /// Gauge: the budget's `max_request_tokens`, when it has one.
    pub request_cap: String,
    /// Counters: what settled requests were charged, and how many there were (the sizing
    /// rules' input).
    pub consumed: String,
    pub settled: String,
}

impl BudgetKey {
    /// `key` of `budget`, whose stats carry `tenant` (the tag value the cap admitted).
    pub fn new(budget: &Budget, key: &str, tenant: &str) -> BudgetKey {
        let name = |name: &str| {
            Stat::new(name)
                .tag("budget", &budget.name)
                .tag("tenant", tenant)
                .tag("unit", budget.unit.tag())
                .tag("window", budget.window.kind.as_str())
                .name()
                .to_string()
        };
        BudgetKey {
            key: key.to_string(),
            slot: Cell::new((key == ledger::OVERFLOW_KEY).then_some(Slot::Overflow)),
            stats: (tenant != "other").then(|| KeyStats {
                used: name(catalog::BUDGET_USED),
                limit: name(catalog::BUDGET_LIMIT),
                remaining: name(catalog::BUDGET_REMAINING),
                reset_seconds: name(catalog::BUDGET_RESET_SECONDS),
                base: name(catalog::BUDGET_BASE),
                request_cap: name(catalog::BUDGET_REQUEST_CAP),
                consumed: name(catalog::BUDGET_CONSUMED),
                settled: name(catalog::BUDGET_SETTLED),
            }),
        }
    }
}

/// A request's key in one budget, located in the ledger.
#[derive(Clone, Debug)]
pub struct Placed {
    /// Index of the budget in the configuration.
    pub budget: usize,
    pub key: Rc<BudgetKey>,
    pub slot: Slot,
    /// The account as it was read when located (`None`: not written yet).
    pub account: Option<Account>,
}

/// Tokens reserved (or USD) in one budget for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub budget: usize,
    /// The budget key the reservation was made for.
    pub key: Rc<BudgetKey>,
    /// The slot it was drawn in, and the slot's incarnation: it settles there, if that
    /// incarnation still holds the slot.
    pub slot: Slot,
    pub generation: u32,
    pub drawn: Drawn,
    pub window_start: i64,
}

/// Figures for the `x-ratelimit-*-tokens` headers: the tightest token budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

/// A refusal because a budget is spent (429).
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub budget: String,
    pub unit: Unit,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    pub retry_after_secs: u64,
    /// Rerouting was wanted but the model has no cheaper counterpart.
    pub no_cheaper_model: bool,
    /// What the request needed.
    pub needed: u64,
    /// The share of the limit the request's priority may use.
    pub ceiling: f64,
    pub priority: Priority,
}

impl Rejection {
    /// True when waiting cannot help: the request needs more than its priority may ever
    /// use of this budget in a window.
    pub fn hopeless(&self, budget_full_limit: u64) -> bool {
        self.needed as f64 > self.ceiling * budget_full_limit as f64
    }
}

/// The outcome of planning.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Forward the request, possibly to the cheaper model.
    Admit {
        reservations: Vec<Reservation>,
        reroute_to: Option<String>,
        /// Whether the reroute comes from progressive degradation (not a trip).
        degraded: bool,
        /// Budgets at or above their warning threshold after this request.
        warnings: Vec<String>,
        headers: Option<RateHeaders>,
        /// Budgets that could not be updated and were skipped under `on_failure: open`.
        failed_open: Vec<String>,
        cas_retries: u32,
        /// Each reserved budget's position after the reservation.
        standings: Vec<(usize, Rc<BudgetKey>, Standing)>,
    },
    /// Refused (429). The `refund` holds what earlier budgets had reserved before a later
    /// one refused: the caller gives it back on its one refund path.
    Reject {
        rejection: Rejection,
        refund: Vec<Reservation>,
    },
    /// Shared data could not be updated and the failure mode is closed (503); `refund` as
    /// for a rejection.
    Unavailable {
        budget: String,
        refund: Vec<Reservation>,
    },
}

/// The request's priority: the trusted header, else the route, else the default.
pub fn priority(host: &dyn Host, config: &Config) -> Priority {
    let source = &config.priority;
    if let Some(p) = source.retries.filter(|_| is_retry(host)) {
        return p;
    }
    if let Some(p) = source
        .header
        .as_deref()
        .and_then(|h| host.request_header(h))
        .and_then(|v| Priority::parse(&v))
    {
        return p;
    }
    if !source.routes.is_empty() {
        if let Some(p) = host
            .route_name()
            .and_then(|r| source.routes.get(&r).copied())
        {
            return p;
        }
    }
    source.default
}

/// A request an SDK marks as a retry (`x-stainless-retry-count` above 0, sent by the
/// OpenAI and Anthropic SDKs).
pub fn is_retry(host: &dyn Host) -> bool {
    host.request_header("x-stainless-retry-count")
        .and_then(|v| v.trim().parse::<u32>().ok())
        .is_some_and(|n| n > 0)
}

/// The cheaper model `model` is rerouted to, if the map has one (and it differs).
pub fn cheaper_model(config: &Config, model: &str) -> Option<String> {
    best_match(&config.reroute.models, model)
        .filter(|to| to.as_str() != model)
        .cloned()
}

/// What `budget` would reserve for a request to `model`.
fn estimate(config: &Config, budget: &Budget, model: &str, facts: &Facts<'_>) -> u64 {
    reservation_in(
        &config.prices,
        budget.unit,
        model,
        facts.prompt,
        facts.max_output,
    )
}

/// What a request may cost in `unit`: prompt plus output cap, in tokens, or priced at
/// `model` in micro-USD (`u64::MAX` when the model has no price, so it never fits).
pub fn reservation_in(
    prices: &PriceList,
    unit: Unit,
    model: &str,
    prompt: u64,
    max_output: u64,
) -> u64 {
    match unit {
        Unit::Tokens => prompt.saturating_add(max_output),
        Unit::Usd => prices
            .get(model)
            .map(|p| p.estimate(prompt, max_output))
            .unwrap_or(u64::MAX),
    }
}

/// The share of `budget`'s limit requests of `priority` may use.
fn ceiling(budget: &Budget, priority: Priority) -> f64 {
    let [p0, p1, p2] = budget.ceilings;
    match priority {
        Priority::P0 => p0,
        Priority::P1 => p1,
        Priority::P2 => p2,
    }
}

fn rejection(
    budget: &Budget,
    standing: crate::budget::Standing,
    facts: &Facts<'_>,
    needed: u64,
    no_cheaper: bool,
) -> Rejection {
    let now_ms = facts.now_ms;
    Rejection {
        needed,
        ceiling: ceiling(budget, facts.priority),
        priority: facts.priority,
        budget: budget.name.clone(),
        unit: budget.unit,
        limit: standing.limit,
        remaining: standing.remaining,
        reset_ms: budget.window.ms_until_end(now_ms),
        retry_after_secs: budget.window.retry_after_secs(now_ms),
        no_cheaper_model: no_cheaper,
    }
}

/// Plan a request against every budget it was placed in (a budget whose key could not be
/// located under `on_failure: open` has no entry).
pub fn plan(host: &mut dyn Host, config: &Config, placed: &[Placed], facts: &Facts<'_>) -> Plan {
    let now = facts.now_ms.div_euclid(1000);

    // Pass 1, read-only: which route? A tripped `reroute` budget is remembered, to report
    // it if the model turns out to have no cheaper counterpart.
    let mut tripped_reroute: Option<Rejection> = None;
    let mut degraded = false;
    let passes = if config.may_change_route() {
        placed
    } else {
        &[]
    };
    for p in passes {
        let Some(budget) = config.budget_for(p.budget, &p.key.key) else {
            continue;
        };
        let account = p.account.unwrap_or_else(|| budget.open_account(now));
        let standing = budget.standing(&account, now);
        let est = estimate(config, &budget, facts.model, facts);
        match budget.judge(&standing, est, facts.priority, facts.pick) {
            Verdict::Trip if budget.action == TripAction::Reject => {
                return Plan::Reject {
                    rejection: rejection(&budget, standing, facts, est, false),
                    refund: Vec::new(),
                };
            }
            Verdict::Trip => {
                if tripped_reroute.is_none() {
                    tripped_reroute = Some(rejection(&budget, standing, facts, est, true));
                }
            }
            Verdict::Degrade => degraded = true,
            Verdict::Allow { .. } => {}
        }
    }
    let wants_reroute = tripped_reroute.is_some();
    let reroute_to = if wants_reroute || degraded {
        let target = cheaper_model(config, facts.model);
        match (target, tripped_reroute) {
            (None, Some(rejection)) => {
                return Plan::Reject {
                    rejection,
                    refund: Vec::new(),
                }
            }
            (target, _) => target,
        }
    } else {
        None
    };
    let degraded = degraded && !wants_reroute && reroute_to.is_some();
    let model = reroute_to.as_deref().unwrap_or(facts.model);

    // Pass 2: reserve, judging again inside each CAS transaction.
    let mut reservations: Vec<Reservation> = Vec::with_capacity(placed.len());
    let mut warnings = Vec::new();
    let mut headers: Option<RateHeaders> = None;
    let mut failed_open = Vec::new();
    let mut cas_retries: u32 = 0;
    let mut standings = Vec::with_capacity(placed.len());
    let rerouted = reroute_to.is_some();
    for p in placed {
        let Some(budget) = config.budget_for(p.budget, &p.key.key) else {
            continue;
        };
        let est = estimate(config, &budget, model, facts);
        let reserve = |account: &mut Account| {
            let standing = budget.standing(account, now);
            let verdict = budget.judge(&standing, est, facts.priority, facts.pick);
            let tripped = verdict == Verdict::Trip;
            if tripped && (!rerouted || budget.action == TripAction::Reject) {
                return (false, Err(standing));
            }
            let drawn = budget.draw(account, est, now, rerouted);
            (true, Ok(drawn))
        };
        let mut slot = p.slot;
        let mut result = ledger::update(
            host,
            &budget,
            ledger::At {
                slot,
                owner: &p.key.key,
                generation: None,
            },
            now,
            config.cas_retries,
            Hold::Take,
            reserve,
        );
        if result.as_ref().err() == Some(&LedgerError::Moved) {
            // The slot was taken over since it was located (the account was empty then):
            // place the key again, once.
            result = ledger::locate(host, &budget, &p.key.key, now, None, config.cas_retries)
                .and_then(|found| {
                    if found.slot == Slot::Overflow {
                        return Err(LedgerError::Moved);
                    }
                    slot = found.slot;
                    p.key.slot.set(Some(slot));
                    ledger::update(
                        host,
                        &budget,
                        ledger::At {
                            slot,
                            owner: &p.key.key,
                            generation: None,
                        },
                        now,
                        config.cas_retries,
                        Hold::Take,
                        reserve,
                    )
                });
        }
        match result {
            Ok(updated) => {
                cas_retries = cas_retries.saturating_add(updated.retries);
                match updated.value {
                    Ok(drawn) => {
                        let standing = budget.standing(&updated.account, now);
                        standings.push((p.budget, Rc::clone(&p.key), standing));
                        if standing.ratio() >= budget.warn_at {
                            warnings.push(budget.name.clone());
                        }
                        if budget.unit == Unit::Tokens {
                            let h = RateHeaders {
                                limit: standing.limit,
                                remaining: standing.remaining,
                                reset_ms: budget.window.ms_until_end(facts.now_ms),
                            };
                            if headers.is_none_or(|old| h.remaining < old.remaining) {
                                headers = Some(h);
                            }
                        }
                        reservations.push(Reservation {
                            budget: p.budget,
                            key: Rc::clone(&p.key),
                            slot,
                            generation: updated.generation,
                            drawn,
                            window_start: updated.account.window_start,
                        });
                    }
                    Err(standing) => {
                        // Another request took what was left between the passes.
                        return Plan::Reject {
                            rejection: rejection(&budget, standing, facts, est, false),
                            refund: reservations,
                        };
                    }
                }
            }
            Err(_) => match config.on_store_failure {
                FailureMode::Open => failed_open.push(budget.name.clone()),
                FailureMode::Closed => {
                    return Plan::Unavailable {
                        budget: budget.name.clone(),
                        refund: reservations,
                    };
                }
            },
        }
    }
    Plan::Admit {
        reservations,
        reroute_to,
        degraded,
        warnings,
        headers,
        failed_open,
        cas_retries,
        standings,
    }
}

/// Actual cost of an exchange in `budget`'s unit, for `model`.
pub fn actual_amount(config: &Config, budget: &Budget, model: &str, usage: &UsageReport) -> u64 {
    cost_in(&config.prices, budget.unit, model, usage)
}

/// What an exchange cost in `unit`: tokens in and out, or micro-USD at `model`'s price
/// (0 when the model has no price).
pub fn cost_in(prices: &PriceList, unit: Unit, model: &str, usage: &UsageReport) -> u64 {
    match unit {
        Unit::Tokens => usage.input.saturating_add(usage.output),
        Unit::Usd => prices.get(model).map(|p| p.actual(usage)).unwrap_or(0),
    }
}

/// Why some settlements could not be written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SettleReport {
    pub refunded: u64,
    pub charged_extra: u64,
    pub cas_retries: u32,
    /// Budgets whose settlement was lost (retries exhausted or store failure).
    pub failed: Vec<String>,
    /// Each settled budget's position afterwards.
    pub standings: Vec<(usize, Rc<BudgetKey>, Standing)>,
    /// What each settled key was charged in the end.
    pub consumed: Vec<(Rc<BudgetKey>, u64)>,
}

/// Replace each reservation by `actual(budget, reservation)`. Settlement retries four times as
/// long as a reservation does: losing one would leave a reservation standing forever.
pub fn settle(
    host: &mut dyn Host,
    config: &Config,
    reservations: &[Reservation],
    actual: impl Fn(&Budget, &Reservation) -> u64,
    now_ms: i64,
) -> SettleReport {
    let now = now_ms.div_euclid(1000);
    let mut report = SettleReport::default();
    for r in reservations {
        // Settle against the budget as it applies to this key (its base override), so an
        // extra charge draws from the key's own base before its elastic balance.
        let Some(budget) = config.budget_for(r.budget, &r.key.key) else {
            continue;
        };
        let amount = actual(&budget, r);
        let result = ledger::update(
            host,
            &budget,
            ledger::At {
                slot: r.slot,
                owner: &r.key.key,
                generation: Some(r.generation),
            },
            now,
            config.cas_retries.saturating_mul(4),
            Hold::Release,
            |account| {
                budget.settle(account, r.drawn, r.window_start, amount, now);
                (true, ())
            },
        );
        match result {
            Ok(u) => {
                report.cas_retries = report.cas_retries.saturating_add(u.retries);
                report.standings.push((
                    r.budget,
                    Rc::clone(&r.key),
                    budget.standing(&u.account, now),
                ));
                report.consumed.push((Rc::clone(&r.key), amount));
                let reserved = r.drawn.total();
                if amount < reserved {
                    report.refunded = report
                        .refunded
                        .saturating_add(reserved.saturating_sub(amount));
                } else {
                    report.charged_extra = report
                        .charged_extra
                        .saturating_add(amount.saturating_sub(reserved));
                }
            }
            // Lost: contended or refused by the proxy, or the slot was taken over (only a
            // reservation older than ledger::STALE_HOLD_SECS can lose its slot).
            Err(_) => report.failed.push(budget.name.clone()),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::host::fake::FakeHost;

    const NOW_MS: i64 = 1_800_000_000_000; // 2027-01-15T08:00:00Z

    fn config(budgets: &str) -> Config {
        let doc = format!(
            r#"{{"api":"v1","budgets":{budgets},"prices":{{"*":{{"input":1,"output":2}},"gpt-4o*":{{"input":2.5,"cached_input":1.25,"output":10}},"gpt-4o-mini*":{{"input":0.15,"output":0.6}}}},
               "reroute":{{"models":{{"gpt-4o":"gpt-4o-mini"}}}}}}"#
        );
        Config::parse(doc.as_bytes()).unwrap()
    }

    fn facts(model: &str, prompt: u64, max_output: u64, priority: Priority) -> Facts<'_> {
        Facts {
            model,
            prompt,
            max_output,
            priority,
            pick: 0.5,
            now_ms: NOW_MS,
        }
    }

    fn host() -> FakeHost {
        let h = FakeHost::default();
        h.now_ms.set(NOW_MS);
        h
    }

    /// The request's key in every budget, located (and claimed) as a request does.
    fn keys(c: &Config, h: &mut FakeHost) -> Vec<Placed> {
        c.budgets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let id = crate::budget::identity::of_request(h, &b.key);
                let found = ledger::locate(h, b, &id, NOW_MS / 1000, None, 8).unwrap();
                let owner = if found.slot == Slot::Overflow {
                    ledger::OVERFLOW_KEY
                } else {
                    &id
                };
                Placed {
                    budget: i,
                    key: Rc::new(BudgetKey::new(b, owner, owner)),
                    slot: found.slot,
                    account: found.account,
                }
            })
            .collect()
    }

    /// Place the request's keys, then plan it.
    fn plan_now(h: &mut FakeHost, c: &Config, facts: &Facts<'_>) -> Plan {
        let k = keys(c, h);
        plan(h, c, &k, facts)
    }

    fn used(h: &FakeHost, c: &Config, i: usize, key: &str) -> u64 {
        let b = c.budget_for(i, key).unwrap();
        let now = NOW_MS / 1000;
        b.standing(&ledger::find(h, &b, key, now).unwrap().1, now)
            .used
    }

    const DAILY_1000: &str =
        r#"[{"name":"daily","key":"header:x-tenant","window":"day","base":1000}]"#;

    #[test]
    fn admitted_requests_reserve_prompt_plus_output() {
        let c = config(DAILY_1000);
        let mut h = host();
        h.request_headers.push(("x-tenant".into(), "acme".into()));
        assert_eq!(keys(&c, &mut h)[0].key.key, "acme");
        let plan = plan_now(&mut h, &c, &facts("gpt-4o", 100, 200, Priority::P0));
        let Plan::Admit {
            reservations,
            headers,
            warnings,
            ..
        } = plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!(reservations[0].drawn.total(), 300);
        assert_eq!(headers.unwrap().remaining, 700);
        assert!(warnings.is_empty());
        assert_eq!(used(&h, &c, 0, "acme"), 300);
    }

    #[test]
    fn an_exhausted_budget_rejects_with_its_reset_time() {
        let c = config(DAILY_1000);
        let mut h = host();
        assert!(matches!(
            plan_now(&mut h, &c, &facts("gpt-4o", 500, 400, Priority::P0)),
            Plan::Admit { .. }
        ));
        let Plan::Reject { rejection: r, .. } =
            plan_now(&mut h, &c, &facts("gpt-4o", 50, 60, Priority::P0))
        else {
            panic!()
        };
        assert_eq!(
            (r.budget.as_str(), r.limit, r.remaining),
            ("daily", 1000, 100)
        );
        // 08:00 UTC: the day resets in 16 hours.
        assert_eq!(r.retry_after_secs, 16 * 3600);
        assert_eq!(
            used(&h, &c, 0, "_default"),
            900,
            "a rejection reserves nothing"
        );
    }

    #[test]
    fn settlement_refunds_the_unused_reservation() {
        let c = config(DAILY_1000);
        let mut h = host();
        let Plan::Admit { reservations, .. } =
            plan_now(&mut h, &c, &facts("gpt-4o", 100, 800, Priority::P0))
        else {
            panic!()
        };
        let report = settle(&mut h, &c, &reservations, |_, _| 130, NOW_MS);
        assert_eq!(report.refunded, 770);
        assert_eq!(used(&h, &c, 0, "_default"), 130);
    }

    #[test]
    fn a_reroute_budget_sends_tripped_requests_to_the_cheaper_model_and_charges_them() {
        let c = config(
            r#"[{"name":"d","key":"constant:all","window":"day","base":100,"action":"reroute"}]"#,
        );
        let mut h = host();
        let Plan::Admit {
            reroute_to,
            degraded,
            ..
        } = plan_now(&mut h, &c, &facts("gpt-4o", 80, 100, Priority::P0))
        else {
            panic!()
        };
        assert_eq!(reroute_to.as_deref(), Some("gpt-4o-mini"));
        assert!(!degraded);
        assert_eq!(
            used(&h, &c, 0, "all"),
            180,
            "rerouted requests are charged beyond the limit"
        );
        // No cheaper model: rejected.
        let Plan::Reject { rejection: r, .. } =
            plan_now(&mut h, &c, &facts("claude-x", 1, 1, Priority::P0))
        else {
            panic!()
        };
        assert!(r.no_cheaper_model);
    }

    #[test]
    fn a_reroute_refusal_names_the_budget_that_tripped() {
        // Two reroute budgets; only the second is spent, and the model has no cheaper one.
        let c = config(
            r#"[{"name":"roomy","key":"constant:all","window":"day","base":100000,"action":"reroute"},
                {"name":"spent","key":"constant:all","window":"day","base":10,"action":"reroute"}]"#,
        );
        let mut h = host();
        let Plan::Reject { rejection: r, .. } =
            plan_now(&mut h, &c, &facts("claude-x", 50, 0, Priority::P0))
        else {
            panic!()
        };
        assert_eq!((r.budget.as_str(), r.no_cheaper_model), ("spent", true));
    }

    /// The first budget reserved before the second refused: the plan hands that
    /// reservation back to the caller's refund path, and nothing stays reserved once it is
    /// refunded.
    fn assert_refunded_by_the_caller(h: &mut FakeHost, c: &Config, refund: &[Reservation]) {
        assert_eq!(refund.len(), 1);
        assert!(used(h, c, 0, "all") > 0);
        let report = settle(h, c, refund, |_, _| 0, NOW_MS);
        assert!(report.failed.is_empty());
        assert_eq!(used(h, c, 0, "all"), 0);
    }

    #[test]
    fn several_budgets_must_all_pass_and_a_refusal_refunds_the_others() {
        let c = config(
            r#"[{"name":"big","key":"constant:all","window":"day","base":10000},
                          {"name":"small","key":"constant:all","window":"minute","base":100}]"#,
        );
        let mut h = host();
        let Plan::Reject {
            rejection: r,
            refund,
        } = plan_now(&mut h, &c, &facts("gpt-4o", 150, 0, Priority::P0))
        else {
            panic!()
        };
        assert_eq!(r.budget, "small");
        assert_refunded_by_the_caller(&mut h, &c, &refund);
    }

    #[test]
    fn the_second_pass_refunds_when_a_race_took_the_budget() {
        // Budget 2 is read as fitting in pass 1, but a concurrent request fills it before
        // pass 2: simulate by pre-filling between passes is not possible with plan(), so
        // check the rollback path directly through two budgets where the second trips.
        let c = config(
            r#"[{"name":"a","key":"constant:all","window":"day","base":1000},
                          {"name":"b","key":"constant:all","window":"day","base":1000,"priority_ceilings":{"p1":0.5,"p2":0.5}}]"#,
        );
        let mut h = host();
        let Plan::Reject {
            rejection: r,
            refund,
        } = plan_now(&mut h, &c, &facts("gpt-4o", 600, 0, Priority::P1))
        else {
            panic!()
        };
        assert_eq!(r.budget, "b");
        assert_refunded_by_the_caller(&mut h, &c, &refund);
    }

    #[test]
    fn usd_budgets_charge_by_price_and_settle_with_cached_rates() {
        let c = config(
            r#"[{"name":"usd","key":"constant:all","window":"month","unit":"usd","base":1.0}]"#,
        );
        let mut h = host();
        // 1000 prompt at $2.50/M = 2500 µ$, 100 output at $10/M = 1000 µ$.
        let Plan::Admit {
            reservations,
            headers,
            ..
        } = plan_now(&mut h, &c, &facts("gpt-4o", 1000, 100, Priority::P0))
        else {
            panic!()
        };
        assert_eq!(reservations[0].drawn.total(), 3500);
        assert!(
            headers.is_none(),
            "x-ratelimit-*-tokens come from token budgets only"
        );
        let usage = UsageReport {
            input: 1000,
            cached_input: 1000,
            output: 10,
            ..Default::default()
        };
        let b = &c.budgets[0];
        settle(
            &mut h,
            &c,
            &reservations,
            |b2, _| actual_amount(&c, b2, "gpt-4o", &usage),
            NOW_MS,
        );
        assert_eq!(used(&h, &c, 0, "all"), 1250 + 100);
        let _ = b;
    }

    #[test]
    fn priority_comes_from_the_trusted_header_then_route_then_default() {
        let c = Config::parse(br#"{"api":"v1","priority":{"header":"x-prio","routes":{"batch":"p2"},"default":"p1"}}"#).unwrap();
        let mut h = host();
        assert_eq!(priority(&h, &c), Priority::P1);
        h.route = Some("batch".into());
        assert_eq!(priority(&h, &c), Priority::P2);
        h.request_headers.push(("x-prio".into(), "p0".into()));
        assert_eq!(priority(&h, &c), Priority::P0);
        // Without a configured header, a client's header is ignored.
        let c = Config::parse(br#"{"api":"v1"}"#).unwrap();
        assert_eq!(priority(&h, &c), Priority::P1);
    }

    #[test]
    fn base_overrides_give_known_keys_their_own_allowance() {
        let c = config(
            r#"[{"name":"d","key":"header:x-tenant","window":"day","base":100,"base_overrides":{"acme":5000}}]"#,
        );
        let mut h = host();
        h.request_headers.push(("x-tenant".into(), "acme".into()));
        assert!(matches!(
            plan_now(&mut h, &c, &facts("gpt-4o", 1000, 0, Priority::P0)),
            Plan::Admit { .. }
        ));
        let mut other = host();
        other.shared = h.shared.clone();
        other
            .request_headers
            .push(("x-tenant".into(), "unknown-co".into()));
        assert!(matches!(
            plan_now(&mut other, &c, &facts("gpt-4o", 1000, 0, Priority::P0)),
            Plan::Reject { .. }
        ));
    }

    #[test]
    fn an_extra_charge_for_an_overridden_key_draws_its_own_base_before_elastic() {
        // Default base 100, acme's own 5000, everyone starts with 1000 elastic: a request
        // that reserved 50 and used 500 must take the extra 450 from acme's base.
        let c = config(
            r#"[{"name":"d","key":"header:x-tenant","window":"day","base":100,"elastic":1000,"base_overrides":{"acme":5000}}]"#,
        );
        let mut h = host();
        h.request_headers.push(("x-tenant".into(), "acme".into()));
        let Plan::Admit { reservations, .. } =
            plan_now(&mut h, &c, &facts("gpt-4o", 40, 10, Priority::P0))
        else {
            panic!()
        };
        settle(&mut h, &c, &reservations, |_, _| 500, NOW_MS);
        let b = c.budget_for(0, "acme").unwrap();
        let a = ledger::find(&h, &b, "acme", NOW_MS / 1000).unwrap().1;
        assert_eq!((a.base_used, a.elastic_balance), (500, 1000));
    }

    #[test]
    fn store_failures_follow_the_failure_mode() {
        let mut c = config(DAILY_1000);
        let mut h = host();
        let k = keys(&c, &mut h);
        h.shared.borrow_mut().broken = true;
        let Plan::Admit {
            failed_open,
            reservations,
            ..
        } = plan(&mut h, &c, &k, &facts("gpt-4o", 1, 1, Priority::P0))
        else {
            panic!()
        };
        assert_eq!(
            (failed_open, reservations.len()),
            (vec!["daily".to_string()], 0)
        );
        c.on_store_failure = FailureMode::Closed;
        assert_eq!(
            plan(&mut h, &c, &k, &facts("gpt-4o", 1, 1, Priority::P0)),
            Plan::Unavailable {
                budget: "daily".into(),
                refund: Vec::new()
            }
        );
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_budget() {
        // 50 "workers" interleave: each reads, then a conflict is injected before its
        // write, forcing the retry path; every admitted reservation must still fit.
        let c = config(r#"[{"name":"g","key":"constant:all","window":"day","base":1000}]"#);
        let shared = host().shared.clone();
        let mut admitted = 0;
        for i in 0..50 {
            let mut h = host();
            h.shared = shared.clone();
            shared.borrow_mut().forced_conflicts = (i % 3) as u32;
            let k = keys(&c, &mut h);
            if let Plan::Admit { reservations, .. } =
                plan(&mut h, &c, &k, &facts("gpt-4o", 60, 10, Priority::P0))
            {
                admitted += reservations[0].drawn.total();
            }
        }
        assert_eq!(admitted, 980);
        let h = host();
        let mut h2 = h;
        h2.shared = shared;
        assert_eq!(used(&h2, &c, 0, "all"), 980);
    }
}
