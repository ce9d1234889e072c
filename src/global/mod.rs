//! Global budgets: reserve-then-settle through a rate limit service shared by every proxy.
//!
//! A local budget lives in one Envoy's shared data; with N replicas a tenant gets N times
//! its budget. A global budget is kept by a rate limit service instead (envoyproxy/ratelimit
//! or Limitador over Redis), spoken to in Envoy's own protocol ([`crate::global::rls`]):
//!
//! 1. **Reserve.** Once the prompt is counted (and local budgets have admitted it), the
//!    exchange asks `ShouldRateLimit` with `hits_addend` = what the request may cost (prompt
//!    plus its output cap, in tokens or micro-USD) on the descriptor
//!    `budget=<name>, key=<identity>`, and holds the request until the verdict: `OK` lets it
//!    go, `OVER_LIMIT` answers 429, a failure or timeout applies the configured failure
//!    mode. Nothing waits longer than `rate_limit_service.timeout_ms`.
//! 2. **Settle.** When the response is known, a cost above the reservation is queued here,
//!    in the VM's [`SettleQueue`], and sent as more hits by the root context on its next tick
//!    (coalesced per budget and key, retried while the service is down). Settlement never
//!    runs on the request's own context: Envoy cancels a context's calls when the stream
//!    ends, which would lose the charge.
//!
//! The protocol has no negative hits, so a cost *below* the reservation cannot be given
//! back: the service keeps the whole reservation (counted in `tokenfuse_global_unreturned`).
//! That keeps the budget safe (never more admitted than the limit), and is why requests
//! under a global budget should carry a realistic `max_tokens`.

pub mod rls;
pub mod verdict;

use std::collections::{BTreeMap, HashMap};

use self::rls::{Code, DescriptorStatus, RateLimitRequest, RateLimitResponse};
use crate::config::{Config, RateLimitService};
use crate::host::{Host, Level};
use crate::stats::{add, catalog, Stat};

/// gRPC status code `OK`; Envoy passes the call's status to the response callback.
const GRPC_OK: u32 = 0;

/// Most (budget, key) settlements a VM queues while the service is away.
pub const MAX_QUEUED: usize = 100_000;

/// The `ShouldRateLimit` message charging `hits` to `budget` for `key`.
pub fn request_message(service: &RateLimitService, budget: &str, key: &str, hits: u32) -> Vec<u8> {
    RateLimitRequest {
        domain: &service.domain,
        descriptors: vec![vec![("budget", budget), ("key", key)]],
        hits_addend: hits,
    }
    .encode()
}

/// How one call to the service ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The service counted the hits.
    Ok(Option<DescriptorStatus>),
    /// The limit is reached.
    OverLimit(Option<DescriptorStatus>),
    /// No verdict: the reason is a stat tag.
    Failed(&'static str),
}

/// Interpret the service's answer: the gRPC status Envoy reports and, on `OK`, the body.
pub fn outcome(grpc_status: u32, body: Option<&[u8]>) -> Outcome {
    if grpc_status != GRPC_OK {
        return Outcome::Failed(match grpc_status {
            4 => "timeout",
            14 => "unavailable",
            _ => "grpc_error",
        });
    }
    let Some(body) = body else {
        return Outcome::Failed("empty");
    };
    match RateLimitResponse::decode(body) {
        Err(_) => Outcome::Failed("malformed"),
        Ok(r) => {
            let status = r.statuses.first().copied();
            match r.overall_code {
                Code::Ok => Outcome::Ok(status),
                Code::OverLimit => Outcome::OverLimit(status),
                Code::Unknown => Outcome::Failed("unknown_code"),
            }
        }
    }
}

/// One outstanding reservation call of an exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub token: u32,
    /// Index into `Config::global_budgets`.
    pub budget: usize,
    pub key: String,
    pub hits: u64,
    pub outcome: Option<Outcome>,
}

/// What the service holds for an admitted request until it settles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub budget: usize,
    pub key: String,
    pub hits: u64,
}

/// Ask the service to charge `hits` (at most `u32::MAX`) for `key` on the global budget
/// `name`: a reservation, or a settlement. `Err` carries the failure reason when the call
/// could not even be sent.
pub fn dispatch_check(
    host: &mut dyn Host,
    service: &RateLimitService,
    name: &str,
    key: &str,
    hits: u64,
) -> Result<u32, &'static str> {
    // Checked by the caller: more than u32::MAX can never pass.
    let hits = u32::try_from(hits).unwrap_or(u32::MAX);
    let message = request_message(service, name, key, hits);
    host.grpc_call(
        &service.cluster,
        rls::SERVICE,
        rls::METHOD,
        &message,
        service.timeout_ms,
    )
    .map_err(|_| "dispatch")
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Queued {
    hits: u64,
    /// When the oldest of these hits was queued (Unix ms): they are given up after
    /// `settle_retry_secs`.
    since_ms: i64,
}

/// Settlements waiting to be sent, per VM: extra hits per (budget, key), coalesced.
#[derive(Debug, Default)]
pub struct SettleQueue {
    queued: BTreeMap<(usize, String), Queued>,
    in_flight: HashMap<u32, ((usize, String), Queued)>,
}

impl SettleQueue {
    /// Queue `hits` more for `key` on global budget `budget`.
    pub fn add(
        &mut self,
        host: &mut dyn Host,
        config: &Config,
        budget: usize,
        key: &str,
        hits: u64,
    ) {
        if hits == 0 {
            return;
        }
        let now_ms = host.now_ms();
        let id = (budget, key.to_string());
        if let Some(q) = self.queued.get_mut(&id) {
            q.hits = q.hits.saturating_add(hits);
            return;
        }
        if self.queued.len() >= MAX_QUEUED {
            drop_hits(host, config, budget, hits, "queue_full");
            return;
        }
        self.queued.insert(
            id,
            Queued {
                hits,
                since_ms: now_ms,
            },
        );
    }

    /// Settlements queued or on their way.
    pub fn len(&self) -> usize {
        self.queued.len().saturating_add(self.in_flight.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Send every queued settlement (one call per budget and key). Called on the root
    /// context's tick, so the calls outlive any request.
    pub fn flush(&mut self, host: &mut dyn Host, config: &Config) {
        let Some(service) = &config.rate_limit_service else {
            return;
        };
        let queued = std::mem::take(&mut self.queued);
        for ((budget, key), mut q) in queued {
            let Some(b) = config.global_budgets.get(budget) else {
                continue;
            };
            // One call carries at most u32::MAX hits; the rest waits for the next tick.
            let now = q.hits.min(u64::from(u32::MAX));
            match dispatch_check(host, service, &b.name, &key, now) {
                Ok(token) => {
                    let rest = q.hits.saturating_sub(now);
                    q.hits = now;
                    if rest > 0 {
                        self.queued.insert(
                            (budget, key.clone()),
                            Queued {
                                hits: rest,
                                since_ms: q.since_ms,
                            },
                        );
                    }
                    self.in_flight.insert(token, ((budget, key), q));
                }
                Err(_) => self.retry(host, config, (budget, key), q, "dispatch"),
            }
        }
    }

    /// The service answered settlement call `token` (`grpc_status` as Envoy reports it).
    /// Returns false when the token is not a settlement's.
    pub fn on_response(
        &mut self,
        host: &mut dyn Host,
        config: &Config,
        token: u32,
        grpc_status: u32,
        body: Option<&[u8]>,
    ) -> bool {
        let Some((id, q)) = self.in_flight.remove(&token) else {
            return false;
        };
        let name = config
            .global_budgets
            .get(id.0)
            .map(|b| b.name.as_str())
            .unwrap_or("unknown");
        match outcome(grpc_status, body) {
            Outcome::Ok(_) => add(
                host,
                &Stat::new(catalog::GLOBAL_SETTLED).tag("budget", name),
                q.hits,
            ),
            Outcome::OverLimit(_) => {
                // envoyproxy/ratelimit has counted the hits anyway; Limitador refuses a
                // charge that would cross the limit, and it is lost to the count. Either
                // way, resending would not help.
                add(
                    host,
                    &Stat::new(catalog::GLOBAL_SETTLE_REFUSED).tag("budget", name),
                    q.hits,
                );
            }
            Outcome::Failed(reason) => {
                host.counter_add(
                    Stat::new(catalog::GLOBAL_SETTLE_ERRORS)
                        .tag("budget", name)
                        .tag("reason", reason)
                        .name(),
                    1,
                );
                self.retry(host, config, id, q, reason);
            }
        }
        true
    }

    /// Put a failed settlement back in the queue, unless it is too old.
    fn retry(
        &mut self,
        host: &mut dyn Host,
        config: &Config,
        id: (usize, String),
        q: Queued,
        reason: &str,
    ) {
        let retry_ms = config
            .rate_limit_service
            .as_ref()
            .map_or(0, |s| (s.settle_retry_secs as i64).saturating_mul(1000));
        if host.now_ms().saturating_sub(q.since_ms) >= retry_ms {
            drop_hits(host, config, id.0, q.hits, reason);
            return;
        }
        match self.queued.get_mut(&id) {
            Some(existing) => {
                existing.hits = existing.hits.saturating_add(q.hits);
                existing.since_ms = existing.since_ms.min(q.since_ms);
            }
            None => {
                self.queued.insert(id, q);
            }
        }
    }
}

fn drop_hits(host: &mut dyn Host, config: &Config, budget: usize, hits: u64, reason: &str) {
    let name = config
        .global_budgets
        .get(budget)
        .map(|b| b.name.as_str())
        .unwrap_or("unknown");
    add(
        host,
        &Stat::new(catalog::GLOBAL_SETTLE_DROPPED).tag("budget", name),
        hits,
    );
    host.log(
        Level::Error,
        &format!("global budget {name}: gave up settling {hits} hits ({reason})"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn config() -> Config {
        Config::parse(
            br#"{"api":"v1",
                 "rate_limit_service":{"cluster":"rls","domain":"tf","timeout_ms":50,"settle_retry_secs":10},
                 "budgets":[{"name":"g","key":"header:x-tenant","backend":"global"}]}"#,
        )
        .unwrap()
    }

    fn ok_body() -> Vec<u8> {
        vec![0x08, 1]
    }

    #[test]
    fn outcome_maps_grpc_status_and_codes() {
        assert_eq!(outcome(0, Some(&[0x08, 1])), Outcome::Ok(None));
        assert_eq!(outcome(0, Some(&[0x08, 2])), Outcome::OverLimit(None));
        assert_eq!(outcome(0, Some(&[])), Outcome::Failed("unknown_code"));
        assert_eq!(outcome(0, None), Outcome::Failed("empty"));
        assert_eq!(outcome(0, Some(&[0x12, 9])), Outcome::Failed("malformed"));
        assert_eq!(outcome(4, None), Outcome::Failed("timeout"));
        assert_eq!(outcome(14, None), Outcome::Failed("unavailable"));
        assert_eq!(outcome(13, Some(&[0x08, 1])), Outcome::Failed("grpc_error"));
    }

    #[test]
    fn settlements_coalesce_per_budget_and_key_and_go_out_on_flush() {
        let config = config();
        let mut host = FakeHost::default();
        let mut q = SettleQueue::default();
        q.add(&mut host, &config, 0, "acme", 30);
        q.add(&mut host, &config, 0, "acme", 12);
        q.add(&mut host, &config, 0, "zeta", 5);
        q.add(&mut host, &config, 0, "zeta", 0);
        assert_eq!(q.len(), 2);
        q.flush(&mut host, &config);
        assert_eq!(host.grpc_calls.len(), 2);
        let acme = &host.grpc_calls[0];
        assert_eq!(acme.cluster, "rls");
        assert_eq!(acme.timeout_ms, 50);
        assert_eq!(
            acme.message,
            request_message(config.rate_limit_service.as_ref().unwrap(), "g", "acme", 42)
        );
        let tokens: Vec<u32> = host.grpc_calls.iter().map(|c| c.token).collect();
        for t in tokens {
            assert!(q.on_response(&mut host, &config, t, 0, Some(&ok_body())));
        }
        assert!(q.is_empty());
        assert_eq!(host.counter("tokenfuse_global_settled.budget=.=g;.;"), 47);
    }

    #[test]
    fn a_failed_settlement_is_retried_until_it_is_too_old() {
        let config = config();
        let mut host = FakeHost::default();
        host.now_ms.set(1_000);
        let mut q = SettleQueue::default();
        q.add(&mut host, &config, 0, "acme", 40);
        q.flush(&mut host, &config);
        let t = host.grpc_calls[0].token;
        assert!(q.on_response(&mut host, &config, t, 14, None));
        assert_eq!(q.len(), 1, "back in the queue");
        // More for the same key joins the retried hits.
        q.add(&mut host, &config, 0, "acme", 2);
        host.now_ms.set(5_000);
        q.flush(&mut host, &config);
        assert_eq!(host.grpc_calls.len(), 2);
        assert_eq!(
            host.grpc_calls[1].message,
            request_message(config.rate_limit_service.as_ref().unwrap(), "g", "acme", 42)
        );
        // Past settle_retry_secs (10 s) since the first hits were queued: dropped, counted.
        host.now_ms.set(11_500);
        let t = host.grpc_calls[1].token;
        q.on_response(&mut host, &config, t, 4, None);
        assert!(q.is_empty());
        assert_eq!(
            host.counter("tokenfuse_global_settle_dropped.budget=.=g;.;"),
            42
        );
        assert_eq!(
            host.counter_sum("tokenfuse_global_settle_errors", &["reason=.=unavailable"]),
            1
        );
        assert!(host.log_text().contains("gave up settling 42 hits"));
    }

    #[test]
    fn a_refused_settlement_is_counted_not_resent() {
        let config = config();
        let mut host = FakeHost::default();
        let mut q = SettleQueue::default();
        q.add(&mut host, &config, 0, "acme", 9);
        q.flush(&mut host, &config);
        let t = host.grpc_calls[0].token;
        q.on_response(&mut host, &config, t, 0, Some(&[0x08, 2]));
        assert!(q.is_empty());
        assert_eq!(
            host.counter("tokenfuse_global_settle_refused.budget=.=g;.;"),
            9
        );
    }

    #[test]
    fn a_call_that_cannot_be_sent_stays_queued() {
        let config = config();
        let mut host = FakeHost {
            grpc_broken: true,
            ..FakeHost::default()
        };
        let mut q = SettleQueue::default();
        q.add(&mut host, &config, 0, "acme", 9);
        q.flush(&mut host, &config);
        assert_eq!(q.len(), 1);
        host.grpc_broken = false;
        q.flush(&mut host, &config);
        assert_eq!(host.grpc_calls.len(), 1);
    }

    #[test]
    fn more_than_u32_hits_go_out_over_several_ticks() {
        let config = config();
        let mut host = FakeHost::default();
        let mut q = SettleQueue::default();
        q.add(&mut host, &config, 0, "acme", u64::from(u32::MAX) + 10);
        q.flush(&mut host, &config);
        assert_eq!(q.len(), 2, "one in flight, the rest queued");
        q.flush(&mut host, &config);
        let service = config.rate_limit_service.as_ref().unwrap();
        assert_eq!(
            host.grpc_calls[1].message,
            request_message(service, "g", "acme", 10)
        );
    }

    #[test]
    fn unknown_tokens_are_not_the_queues() {
        let config = config();
        let mut host = FakeHost::default();
        let mut q = SettleQueue::default();
        assert!(!q.on_response(&mut host, &config, 77, 0, Some(&ok_body())));
    }

    #[test]
    fn reservation_and_actual_follow_the_unit() {
        use crate::budget::plan::{cost_in, reservation_in};
        use crate::llm::usage::UsageReport;
        let config = Config::parse(
            br#"{"api":"v1","rate_limit_service":{"cluster":"rls"},
                 "prices":{"*":{"input":2.5,"output":10}},
                 "budgets":[{"name":"t","key":"header:x","backend":"global"},
                            {"name":"u","key":"header:x","backend":"global","unit":"usd"}]}"#,
        )
        .unwrap();
        let (t, u) = (&config.global_budgets[0], &config.global_budgets[1]);
        let prices = &config.prices;
        assert_eq!(reservation_in(prices, t.unit, "m", 100, 50), 150);
        // $2.5/M in, $10/M out: 100 in + 50 out = 250 + 500 micro-USD.
        assert_eq!(reservation_in(prices, u.unit, "m", 100, 50), 750);
        let usage = UsageReport {
            input: 100,
            output: 20,
            ..UsageReport::default()
        };
        assert_eq!(cost_in(prices, t.unit, "m", &usage), 120);
        assert_eq!(cost_in(prices, u.unit, "m", &usage), 450);
    }
}
