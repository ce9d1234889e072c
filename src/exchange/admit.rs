//! The admission phase: a counted request meets its budgets. Local budgets first — the
//! key slots, the per-request caps (refuse, or truncate to fit), the plan that reserves
//! (or reroutes, or refuses) — then, when configured, the global budgets, whose verdict
//! comes back asynchronously from the rate limit service ([`crate::global::verdict`]).
//!
//! Admission yields what the request is forwarded as ([`Admitted`]), the body edits it
//! needs ([`Edits`]) and the decision to count once every budget has had its say; a refusal
//! yields the reply to send and what to refund.

use crate::budget::ledger::{self, Slot};
use crate::budget::plan::{self, Facts, Placed, Plan, RateHeaders, Reservation};
use crate::budget::{self, OversizeAction};
use crate::config::FailureMode;
use crate::filter::Filter;
use crate::global::{self, verdict, Check};
use crate::host::{Host, Level};
use crate::llm::api;
use crate::llm::prompt::PromptCount;
use crate::llm::rewrite::Edits;
use crate::llm::truncate;
use crate::stats::{self, catalog, Stat};

use super::reply::{Decision, Refusal};
use super::request::{Counted, Pending};
use super::settle;
use super::Admitted;

/// A request the local budgets admit.
pub(super) struct Admission {
    pub admitted: Admitted,
    /// Counted once the global budgets (if any) have admitted it too; none without budgets.
    pub decision: Option<Decision>,
    /// What to change in the body before it goes upstream.
    pub edits: Edits,
    /// A rerouted Azure request: the path with the cheaper deployment.
    pub path: Option<String>,
}

/// A request refused, with what its refusal leaves to do.
pub(super) struct Refused {
    pub refusal: Box<Refusal>,
    /// The budget that refused, for the decision's tag.
    pub budget: Option<String>,
    /// Reservations already drawn, to give back.
    pub refund: Vec<Reservation>,
}

impl Refused {
    fn new(refusal: Refusal, budget: Option<String>) -> Refused {
        Refused {
            refusal: Box::new(refusal),
            budget,
            refund: Vec::new(),
        }
    }
}

/// Place the request's keys in every local budget; under `on_failure: closed` a key that
/// cannot be placed refuses the request.
fn place(
    filter: &Filter,
    host: &mut dyn Host,
    pending: &Pending,
    now: i64,
    may_change_route: bool,
) -> Result<Vec<Placed>, Refused> {
    let config = &filter.config;
    let mut placed = Vec::with_capacity(config.budgets.len());
    for (i, (budget, id)) in config
        .budgets
        .iter()
        .zip(&pending.who.budget_ids)
        .enumerate()
    {
        let key = filter.budget_key(i, id);
        let hint = key.slot.get();
        if let (Some(slot), false) = (hint, may_change_route) {
            // No read-only pass will look at the account: go straight to the reservation,
            // which checks the owner (and places the key again if the slot was taken over).
            placed.push(Placed {
                budget: i,
                key,
                slot,
                account: None,
            });
            continue;
        }
        match ledger::locate(host, budget, id, now, hint, config.cas_retries) {
            Ok(found) if found.slot == Slot::Overflow => {
                host.counter_add(
                    Stat::new(catalog::KEYS_OVERFLOWED)
                        .tag("budget", &budget.name)
                        .name(),
                    1,
                );
                placed.push(Placed {
                    budget: i,
                    key: filter.budget_key(i, ledger::OVERFLOW_KEY),
                    slot: found.slot,
                    account: found.account,
                });
            }
            Ok(found) => {
                key.slot.set(Some(found.slot));
                placed.push(Placed {
                    budget: i,
                    key,
                    slot: found.slot,
                    account: found.account,
                });
            }
            Err(_) => match config.on_store_failure {
                FailureMode::Open => host.counter_add(
                    Stat::new(catalog::FAIL_OPEN)
                        .tag("budget", &budget.name)
                        .name(),
                    1,
                ),
                FailureMode::Closed => {
                    return Err(Refused::new(Refusal::StoreBusy, Some(budget.name.clone())))
                }
            },
        }
    }
    Ok(placed)
}

/// Apply the local budgets to `counted`: caps (or truncation), then the plan.
pub(super) fn local(
    filter: &Filter,
    host: &mut dyn Host,
    id: u32,
    pending: &Pending,
    counted: &Counted<'_>,
) -> Result<Admission, Refused> {
    let config = &filter.config;
    let now_ms = host.now_ms();
    let mut admitted = Admitted {
        kind: pending.kind,
        counting: counted.counting,
        prompt: counted.prompt,
        served_model: counted.model.clone(),
        model_tag: filter.model_tag(&counted.model),
        rerouted: false,
        priority: pending.who.priority,
        tenant_tag: pending.who.tenant_tag.clone(),
        reservations: Vec::new(),
        holds: Vec::new(),
        rate: None,
        warnings: Vec::new(),
    };
    let mut edits = Edits {
        stream_usage: config.inject_stream_usage,
        ..Edits::default()
    };
    if !config.has_budgets() {
        return Ok(Admission {
            admitted,
            decision: None,
            edits,
            path: None,
        });
    }
    let placed = place(
        filter,
        host,
        pending,
        now_ms.div_euclid(1000),
        config.may_change_route(),
    )?;

    // The per-request cap (circuit breaker).
    let max_output = counted.max_output;
    let estimate = counted.prompt.tokens.saturating_add(max_output);
    let mut trunc_cap: Option<(u64, &str)> = None;
    for (name, cap, oversize) in config.request_caps() {
        if estimate <= cap {
            continue;
        }
        let too_big = || {
            Refused::new(
                Refusal::Oversize {
                    budget: name.to_string(),
                    cap,
                    estimate,
                },
                Some(name.to_string()),
            )
        };
        match oversize {
            OversizeAction::Reject => return Err(too_big()),
            OversizeAction::Truncate => {
                if trunc_cap.is_none_or(|(c, _)| cap < c) {
                    trunc_cap = Some((cap, name));
                }
            }
        }
    }
    if let Some((cap, name)) = trunc_cap {
        let cut = cap.checked_sub(max_output).and_then(|max_prompt| {
            truncate::truncate(&counted.parsed, &counted.message_costs(filter)?, max_prompt)
        });
        let Some(cut) = cut else {
            return Err(Refused::new(
                Refusal::Oversize {
                    budget: name.to_string(),
                    cap,
                    estimate,
                },
                Some(name.to_string()),
            ));
        };
        host.counter_add(
            Stat::new(catalog::TRUNCATED_MESSAGES).name(),
            u64::try_from(cut.dropped).unwrap_or(u64::MAX),
        );
        super::count_decision(host, &admitted, Decision::Truncated, None);
        admitted.prompt = PromptCount {
            tokens: cut.prompt,
            exact: counted.prompt.exact,
        };
        edits.drop_messages = cut.drop;
    }

    let seed = pending
        .who
        .request_id
        .clone()
        .unwrap_or_else(|| format!("{id}-{now_ms}"));
    let facts = Facts {
        model: &admitted.served_model,
        prompt: admitted.prompt.tokens,
        max_output,
        priority: admitted.priority,
        pick: budget::pick(&seed),
        now_ms,
    };
    match plan::plan(host, config, &placed, &facts) {
        Plan::Reject { rejection, refund } => {
            let budget = Some(rejection.budget.clone());
            Err(Refused {
                refusal: Box::new(Refusal::Budget(rejection)),
                budget,
                refund,
            })
        }
        Plan::Unavailable { budget, refund } => Err(Refused {
            refusal: Box::new(Refusal::StoreBusy),
            budget: Some(budget),
            refund,
        }),
        Plan::Admit {
            reservations,
            reroute_to,
            degraded,
            warnings,
            headers,
            failed_open,
            cas_retries,
            standings,
        } => {
            settle::gauges(filter, host, &standings);
            if cas_retries > 0 {
                host.counter_add(
                    Stat::new(catalog::CAS_RETRIES).name(),
                    u64::from(cas_retries),
                );
            }
            for name in &failed_open {
                host.counter_add(Stat::new(catalog::FAIL_OPEN).tag("budget", name).name(), 1);
            }
            for r in &reservations {
                if let Some(b) = config.budgets.get(r.budget) {
                    stats::add(
                        host,
                        &Stat::new(catalog::RESERVED)
                            .tag("budget", &b.name)
                            .tag("unit", b.unit.tag()),
                        r.drawn.total(),
                    );
                }
            }
            let decision = match (&reroute_to, degraded, warnings.is_empty()) {
                (Some(_), true, _) => Decision::Degraded,
                (Some(_), false, _) => Decision::Rerouted,
                (None, _, false) => Decision::Warned,
                (None, _, true) => Decision::Allowed,
            };
            let mut path = None;
            if let Some(to) = reroute_to {
                // Azure serves the path's deployment: that is what changes (and the body's
                // model too, when it names one); elsewhere the body's model.
                path = api::with_azure_deployment(&pending.path, &to);
                if path.is_none() || counted.parsed.model().is_some() {
                    edits.model = Some(to.clone());
                }
                // Stats follow the model that serves (and bills) the request.
                admitted.model_tag = filter.model_tag(&to);
                admitted.served_model = to;
                admitted.rerouted = true;
            }
            admitted.reservations = reservations;
            admitted.rate = headers;
            admitted.warnings = warnings;
            Ok(Admission {
                admitted,
                decision: Some(decision),
                edits,
                path,
            })
        }
    }
}

/// Ask the rate limit service to reserve the request on every global budget. The checks
/// whose call could not even be sent carry their outcome already.
pub(super) fn dispatch_global(
    filter: &Filter,
    host: &mut dyn Host,
    admitted: &Admitted,
    ids: &[String],
    max_output: u64,
) -> Vec<Check> {
    let config = &filter.config;
    let Some(service) = &config.rate_limit_service else {
        return Vec::new();
    };
    let hits: Vec<u64> = config
        .global_budgets
        .iter()
        .map(|budget| {
            plan::reservation_in(
                &config.prices,
                budget.unit,
                &admitted.served_model,
                admitted.prompt.tokens,
                max_output,
            )
        })
        .collect();
    if let Some((i, (key, &hits))) = ids
        .iter()
        .zip(&hits)
        .enumerate()
        .find(|(_, (_, &h))| h > u64::from(u32::MAX))
    {
        // More than one call can carry: this request can never pass. Nothing is sent.
        return vec![Check {
            token: 0,
            budget: i,
            key: key.clone(),
            hits,
            outcome: Some(global::Outcome::OverLimit(None)),
        }];
    }
    config
        .global_budgets
        .iter()
        .zip(ids)
        .zip(&hits)
        .enumerate()
        .map(|(i, ((budget, key), &hits))| {
            let (token, outcome) =
                match global::dispatch_check(host, service, &budget.name, key, hits) {
                    Ok(token) => (token, None),
                    Err(reason) => (0, Some(global::Outcome::Failed(reason))),
                };
            Check {
                token,
                budget: i,
                key: key.clone(),
                hits,
                outcome,
            }
        })
        .collect()
}

/// Every global check has an outcome: fold them into the verdict, report what it took,
/// and admit (merging the service's rate into the admission's) or refuse.
pub(super) fn conclude_global(
    filter: &Filter,
    host: &mut dyn Host,
    id: u32,
    admitted: &mut Admitted,
    checks: &[Check],
) -> Result<(), Refused> {
    let config = &filter.config;
    let mode = config
        .rate_limit_service
        .as_ref()
        .map_or(FailureMode::Open, |s| s.on_failure);
    let folded = verdict::fold(checks, &config.global_budgets, mode);
    for &(budget, reason) in &folded.errors {
        let Some(b) = config.global_budgets.get(budget) else {
            continue;
        };
        let name = b.name.as_str();
        host.counter_add(
            Stat::new(catalog::GLOBAL_ERRORS)
                .tag("budget", name)
                .tag("reason", reason)
                .name(),
            1,
        );
        let failing = match mode {
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
        };
        host.log(
            Level::Warn,
            &format!("#{id} global budget {name}: no verdict from the rate limit service ({reason}); failing {failing}"),
        );
        if mode == FailureMode::Open {
            host.counter_add(Stat::new(catalog::FAIL_OPEN).tag("budget", name).name(), 1);
        }
    }
    let name_of = |budget: usize| config.global_budgets.get(budget).map(|b| b.name.clone());
    let refusal = match folded.verdict {
        verdict::Verdict::Admit => {
            if let Some(h) = folded.rate {
                if admitted
                    .rate
                    .is_none_or(|old: RateHeaders| h.remaining < old.remaining)
                {
                    admitted.rate = Some(h);
                }
            }
            admitted.holds = folded.holds;
            for budget in folded.warnings {
                if let Some(name) = name_of(budget) {
                    if !admitted.warnings.contains(&name) {
                        admitted.warnings.push(name);
                    }
                }
            }
            return Ok(());
        }
        verdict::Verdict::Refuse {
            budget,
            hits,
            status,
        } => {
            let b = config.global_budgets.get(budget);
            Refused::new(
                Refusal::GlobalBudget {
                    budget: name_of(budget).unwrap_or_default(),
                    unit: b.map_or(crate::budget::Unit::Tokens, |b| b.unit),
                    needed: hits,
                    status,
                },
                name_of(budget),
            )
        }
        verdict::Verdict::Unavailable { budget } => {
            Refused::new(Refusal::ServiceUnavailable, name_of(budget))
        }
    };
    // Refused: a Limitador reservation is committed at 0 (given back whole); hits charged
    // over ShouldRateLimit cannot be given back.
    for hold in &folded.holds {
        settle::give_back(filter, host, hold);
    }
    Err(Refused {
        refund: std::mem::take(&mut admitted.reservations),
        ..refusal
    })
}
