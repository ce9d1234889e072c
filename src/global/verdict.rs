//! The verdict on a request's global budgets, folded from the service's answers: the one
//! decision beside the local [`crate::budget::plan::Plan`], pure so it is tested alone.
//!
//! Every answered reservation the service counted becomes a [`Hold`] (to settle or, on a
//! refusal, to give back: a Limitador reservation is committed at 0, hits charged over
//! `ShouldRateLimit` are reported as unreturned, that protocol cannot give them back). The first
//! over-limit answer refuses the request. A call without an answer is an error to count;
//! under `on_failure: closed` the first one makes the request unavailable, under `open` it
//! is let through (and counted as failing open).

use crate::budget::plan::RateHeaders;
use crate::budget::Unit;
use crate::config::{FailureMode, GlobalBudget};

use super::rls::DescriptorStatus;
use super::{Check, Hold, Outcome};

/// What the service's answers amount to.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Every budget admitted the request (or failed open).
    Admit,
    /// Global budget `budget` (an index) is spent; the request needed `hits`.
    Refuse {
        budget: usize,
        hits: u64,
        status: Option<DescriptorStatus>,
    },
    /// Global budget `budget` gave no verdict and fails closed.
    Unavailable { budget: usize },
}

/// The verdict, with what the caller reports either way.
#[derive(Clone, Debug, PartialEq)]
pub struct Folded {
    pub verdict: Verdict,
    /// What the service took for this request.
    pub holds: Vec<Hold>,
    /// The tightest token budget's position, for the `x-ratelimit-*` headers.
    pub rate: Option<RateHeaders>,
    /// Calls without an answer: (budget index, reason).
    pub errors: Vec<(usize, &'static str)>,
    /// Budgets (indexes) whose reported usage is at or past their `warn_at`.
    pub warnings: Vec<usize>,
}

/// Fold the answered `checks` of one request.
pub fn fold(checks: &[Check], budgets: &[GlobalBudget], mode: FailureMode) -> Folded {
    let mut holds = Vec::new();
    let mut rate: Option<RateHeaders> = None;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut refusal = None;
    let mut failure = None;
    for check in checks {
        let Some(budget) = budgets.get(check.budget) else {
            continue;
        };
        match &check.outcome {
            Some(Outcome::Reserved(id)) => holds.push(Hold {
                budget: check.budget,
                key: check.key.clone(),
                hits: check.hits,
                reservation: Some(id.clone()),
            }),
            Some(Outcome::Ok(status)) => {
                holds.push(Hold {
                    budget: check.budget,
                    key: check.key.clone(),
                    hits: check.hits,
                    reservation: None,
                });
                if status.is_some_and(|s| past_warning(&s, budget.warn_at)) {
                    warnings.push(check.budget);
                }
                if let (Unit::Tokens, Some(s)) = (budget.unit, status) {
                    if let Some(limit) = s.limit {
                        let h = RateHeaders {
                            limit: u64::from(limit),
                            remaining: u64::from(s.remaining),
                            reset_ms: s.reset_secs.unwrap_or(0).saturating_mul(1000),
                        };
                        if rate.is_none_or(|old| h.remaining < old.remaining) {
                            rate = Some(h);
                        }
                    }
                }
            }
            Some(Outcome::OverLimit(status)) => {
                refusal.get_or_insert(Verdict::Refuse {
                    budget: check.budget,
                    hits: check.hits,
                    status: *status,
                });
            }
            Some(Outcome::Failed(reason)) => {
                errors.push((check.budget, *reason));
                if mode == FailureMode::Closed {
                    failure.get_or_insert(Verdict::Unavailable {
                        budget: check.budget,
                    });
                }
            }
            None => {}
        }
    }
    Folded {
        verdict: refusal.or(failure).unwrap_or(Verdict::Admit),
        holds,
        rate,
        errors,
        warnings,
    }
}

/// Whether a reported status puts the budget's usage (limit minus remaining, this request
/// counted) at or past `warn_at` of its limit. No limit reported, or a zero one, says
/// nothing; a remaining above the limit (a broken service) is no usage.
fn past_warning(status: &DescriptorStatus, warn_at: f64) -> bool {
    match status.limit {
        Some(limit) if limit > 0 => {
            let used = limit.saturating_sub(status.remaining);
            f64::from(used) >= warn_at * f64::from(limit)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::KeySource;

    fn budgets() -> Vec<GlobalBudget> {
        ["tokens", "usd"]
            .iter()
            .map(|name| GlobalBudget {
                name: name.to_string(),
                key: KeySource::Constant("all".into()),
                unit: if *name == "usd" {
                    Unit::Usd
                } else {
                    Unit::Tokens
                },
                max_request_tokens: None,
                oversize: crate::budget::OversizeAction::Reject,
                warn_at: 0.8,
            })
            .collect()
    }

    fn check(budget: usize, outcome: Outcome) -> Check {
        Check {
            token: 1,
            budget,
            key: "k".into(),
            hits: 10,
            outcome: Some(outcome),
        }
    }

    fn status(remaining: u32) -> Option<DescriptorStatus> {
        Some(DescriptorStatus {
            code: Some(super::super::rls::Code::Ok),
            limit: Some(100),
            remaining,
            reset_secs: Some(30),
        })
    }

    #[test]
    fn every_budget_admitting_admits_with_the_tightest_rate() {
        let f = fold(
            &[
                check(0, Outcome::Ok(status(40))),
                check(1, Outcome::Ok(status(5))),
            ],
            &budgets(),
            FailureMode::Closed,
        );
        assert_eq!(f.verdict, Verdict::Admit);
        assert_eq!(f.holds.len(), 2);
        // The USD budget's figures are not tokens: the token budget's rate stands.
        assert_eq!(f.rate.unwrap().remaining, 40);
        assert_eq!(f.rate.unwrap().reset_ms, 30_000);
    }

    #[test]
    fn a_refusal_wins_over_a_failure_and_keeps_the_holds_taken() {
        let f = fold(
            &[
                check(0, Outcome::Failed("timeout")),
                check(1, Outcome::OverLimit(None)),
                check(0, Outcome::Ok(None)),
            ],
            &budgets(),
            FailureMode::Closed,
        );
        assert!(matches!(f.verdict, Verdict::Refuse { budget: 1, .. }));
        assert_eq!(f.holds.len(), 1);
        assert_eq!(f.errors, vec![(0, "timeout")]);
    }

    #[test]
    fn reported_usage_past_warn_at_warns_whatever_the_unit() {
        let f = fold(
            &[
                check(0, Outcome::Ok(status(30))),
                check(1, Outcome::Ok(status(10))),
            ],
            &budgets(),
            FailureMode::Closed,
        );
        // 70 of 100 used: under 0.8; 90 of 100: past it.
        assert_eq!(f.warnings, vec![1]);
        let edge = fold(
            &[check(0, Outcome::Ok(status(20)))],
            &budgets(),
            FailureMode::Open,
        );
        assert_eq!(edge.warnings, vec![0], "exactly at warn_at warns");
        let hostile = DescriptorStatus {
            limit: Some(0),
            ..status(0).unwrap()
        };
        let over = DescriptorStatus {
            remaining: 500,
            ..status(0).unwrap()
        };
        for s in [hostile, over] {
            let f = fold(
                &[check(0, Outcome::Ok(Some(s)))],
                &budgets(),
                FailureMode::Open,
            );
            assert!(f.warnings.is_empty(), "{s:?}");
        }
        let none = fold(
            &[check(0, Outcome::Ok(None))],
            &budgets(),
            FailureMode::Open,
        );
        assert!(none.warnings.is_empty());
    }

    #[test]
    fn failures_follow_the_failure_mode() {
        let checks = [check(0, Outcome::Failed("unavailable"))];
        assert_eq!(
            fold(&checks, &budgets(), FailureMode::Closed).verdict,
            Verdict::Unavailable { budget: 0 }
        );
        let open = fold(&checks, &budgets(), FailureMode::Open);
        assert_eq!(open.verdict, Verdict::Admit);
        assert_eq!(open.errors.len(), 1);
    }
}
