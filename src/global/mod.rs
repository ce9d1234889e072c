//! Global budgets: reserve-then-settle through a rate limit service shared by every proxy.
//!
//! A local budget lives in one Envoy's shared data; with N replicas a tenant gets N times
//! its budget. A global budget is kept by a rate limit service instead, spoken to in one of
//! two protocols (`rate_limit_service.protocol`):
//!
//! - **`envoy`**: Envoy's own `ShouldRateLimit` ([`rls`]), which envoyproxy/ratelimit and
//!   Limitador both serve. The reservation is a charge of `hits_addend`; the protocol has
//!   no negative hits, so a cost *below* the reservation cannot be given back (counted in
//!   `tokenfuse_global_unreturned`) and a cost above it is charged as more hits.
//! - **`limitador`**: Limitador's `Reserve` / `Commit` ([`limitador`]). The reservation is
//!   an atomic hold (counter + outstanding holds + the new one checked and recorded in one
//!   Redis script), and settlement commits the real cost: the unused rest comes back.
//!
//! The steps are the same for both:
//!
//! 1. **Reserve.** Once the prompt is counted (and local budgets have admitted it), the
//!    exchange asks for what the request may cost (prompt plus its output cap, in tokens or
//!    micro-USD) on the descriptor `budget=<name>, key=<identity>`, and holds the request
//!    until the verdict: admitted lets it go, over the limit answers 429, a failure or
//!    timeout applies the configured failure mode. Nothing waits longer than
//!    `rate_limit_service.timeout_ms`.
//! 2. **Settle.** When the response is known, the settlement is queued here, in the VM's
//!    [`SettleQueue`], and sent by the root context on its next tick (retried while the
//!    service is down): on `envoy` the cost above the reservation (coalesced per budget and
//!    key), on `limitador` one `Commit` per reservation with the real cost (0 for a request
//!    refused after the hold was taken). Settlement never runs on the request's own
//!    context: Envoy cancels a context's calls when the stream ends, which would lose it.

pub mod limitador;
pub mod rls;
pub mod verdict;

use std::collections::{BTreeMap, HashMap, VecDeque};

use self::rls::{Code, DescriptorStatus, RateLimitRequest, RateLimitResponse};
use crate::config::{Config, Protocol, RateLimitService};
use crate::host::{Host, Level};
use crate::stats::{add, catalog, Stat};

/// gRPC status code `OK`; Envoy passes the call's status to the response callback.
const GRPC_OK: u32 = 0;

/// Most settlements a VM queues while the service is away: (budget, key) entries on
/// `envoy`, commits on `limitador`.
pub const MAX_QUEUED: usize = 100_000;

/// Most commits one tick sends (the rest wait for the next tick).
pub const MAX_COMMITS_PER_FLUSH: usize = 2_000;

/// The `ShouldRateLimit` message charging `hits` to `budget` for `key`.
pub fn request_message(service: &RateLimitService, budget: &str, key: &str, hits: u32) -> Vec<u8> {
    RateLimitRequest {
        domain: &service.domain,
        descriptors: vec![vec![("budget", budget), ("key", key)]],
        hits_addend: hits,
    }
    .encode()
}

/// The `Reserve` message holding `amount` on `budget` for `key`.
pub fn reserve_message(
    service: &RateLimitService,
    budget: &str,
    key: &str,
    amount: u64,
) -> Vec<u8> {
    limitador::ReserveRequest {
        domain: &service.domain,
        descriptors: vec![vec![("budget", budget), ("key", key)]],
        amount,
        ttl_secs: service.reservation_ttl_secs,
    }
    .encode()
}

/// The `Commit` message settling reservation `reservation_id` of `budget` for `key` at
/// `actual`.
pub fn commit_message(
    service: &RateLimitService,
    budget: &str,
    key: &str,
    reservation_id: &str,
    actual: u64,
) -> Vec<u8> {
    limitador::CommitRequest {
        domain: &service.domain,
        descriptors: vec![vec![("budget", budget), ("key", key)]],
        reservation_id,
        actual_amount: actual,
    }
    .encode()
}

/// How one call to the service ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The service counted the hits (`envoy`).
    Ok(Option<DescriptorStatus>),
    /// The service holds the reservation with this id (`limitador`; empty: it holds
    /// nothing, because no limit applies).
    Reserved(String),
    /// The limit is reached.
    OverLimit(Option<DescriptorStatus>),
    /// No verdict: the reason is a stat tag.
    Failed(&'static str),
}

/// The failure a non-`OK` gRPC status stands for.
fn grpc_failure(grpc_status: u32) -> &'static str {
    match grpc_status {
        4 => "timeout",
        14 => "unavailable",
        _ => "grpc_error",
    }
}

/// Interpret the service's answer to a reservation: the gRPC status Envoy reports and, on
/// `OK`, the body, in the configured protocol.
pub fn outcome(protocol: Protocol, grpc_status: u32, body: Option<&[u8]>) -> Outcome {
    if grpc_status != GRPC_OK {
        return Outcome::Failed(grpc_failure(grpc_status));
    }
    let Some(body) = body else {
        return Outcome::Failed("empty");
    };
    match protocol {
        Protocol::Envoy => match RateLimitResponse::decode(body) {
            Err(_) => Outcome::Failed("malformed"),
            Ok(r) => {
                let status = r.statuses.first().copied();
                match r.overall_code {
                    Code::Ok => Outcome::Ok(status),
                    Code::OverLimit => Outcome::OverLimit(status),
                    Code::Unknown => Outcome::Failed("unknown_code"),
                }
            }
        },
        Protocol::Limitador => match limitador::ReserveResponse::decode(body) {
            Err(_) => Outcome::Failed("malformed"),
            Ok(r) => match r.code {
                Code::Ok => Outcome::Reserved(r.reservation_id),
                Code::OverLimit => Outcome::OverLimit(None),
                Code::Unknown => Outcome::Failed("unknown_code"),
            },
        },
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
    /// `Some(id)`: a Limitador reservation, settled by a commit that gives the unused rest
    /// back. `None`: hits charged over `ShouldRateLimit`, which nothing gives back.
    pub reservation: Option<String>,
}

/// Ask the service to reserve `hits` for `key` on the global budget `name`: a
/// `ShouldRateLimit` charge (at most `u32::MAX`, checked by the caller) or a Limitador
/// `Reserve`. `Err` carries the failure reason when the call could not even be sent.
pub fn dispatch_check(
    host: &mut dyn Host,
    service: &RateLimitService,
    name: &str,
    key: &str,
    hits: u64,
) -> Result<u32, &'static str> {
    let (grpc_service, method, message) = match service.protocol {
        Protocol::Envoy => {
            let hits = u32::try_from(hits).unwrap_or(u32::MAX);
            (
                rls::SERVICE,
                rls::METHOD,
                request_message(service, name, key, hits),
            )
        }
        Protocol::Limitador => (
            limitador::SERVICE,
            limitador::RESERVE,
            reserve_message(service, name, key, hits),
        ),
    };
    host.grpc_call(
        &service.cluster,
        grpc_service,
        method,
        &message,
        service.timeout_ms,
    )
    .map_err(|_| "dispatch")
}

/// Charge `hits` more for `key` on `name` over `ShouldRateLimit` (an `envoy` settlement).
fn dispatch_hits(
    host: &mut dyn Host,
    service: &RateLimitService,
    name: &str,
    key: &str,
    hits: u32,
) -> Result<u32, &'static str> {
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

/// One Limitador reservation to settle.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Commit {
    budget: usize,
    key: String,
    reservation_id: String,
    /// What the reservation held.
    reserved: u64,
    /// The real cost, charged by the commit.
    actual: u64,
    /// When it was queued (Unix ms), for `settle_retry_secs`.
    since_ms: i64,
}

/// Settlements waiting to be sent, per VM: on `envoy`, extra hits per (budget, key),
/// coalesced; on `limitador`, one commit per reservation.
#[derive(Debug, Default)]
pub struct SettleQueue {
    queued: BTreeMap<(usize, String), Queued>,
    in_flight: HashMap<u32, ((usize, String), Queued)>,
    commits: VecDeque<Commit>,
    commits_in_flight: HashMap<u32, Commit>,
}

impl SettleQueue {
    /// Queue `hits` more for `key` on global budget `budget` (`envoy`).
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

    /// Queue the commit of Limitador reservation `hold` at `actual` (`limitador`).
    pub fn commit(&mut self, host: &mut dyn Host, config: &Config, hold: &Hold, actual: u64) {
        let Some(reservation_id) = &hold.reservation else {
            return;
        };
        if self.commits.len() >= MAX_QUEUED {
            // The hold expires by itself after `reservation_ttl_secs`; only the charge is
            // lost.
            drop_hits(host, config, hold.budget, actual, "queue_full");
            return;
        }
        self.commits.push_back(Commit {
            budget: hold.budget,
            key: hold.key.clone(),
            reservation_id: reservation_id.clone(),
            reserved: hold.hits,
            actual,
            since_ms: host.now_ms(),
        });
    }

    /// Settlements queued or on their way.
    pub fn len(&self) -> usize {
        self.queued
            .len()
            .saturating_add(self.in_flight.len())
            .saturating_add(self.commits.len())
            .saturating_add(self.commits_in_flight.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Send queued settlements: one call per budget and key (`envoy`), one per reservation
    /// (`limitador`, at most [`MAX_COMMITS_PER_FLUSH`] a tick). Called on the root
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
            let hits = u32::try_from(now).unwrap_or(u32::MAX);
            match dispatch_hits(host, service, &b.name, &key, hits) {
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
        let mut failed = Vec::new();
        for _ in 0..MAX_COMMITS_PER_FLUSH {
            let Some(c) = self.commits.pop_front() else {
                break;
            };
            let Some(b) = config.global_budgets.get(c.budget) else {
                continue;
            };
            let message = commit_message(service, &b.name, &c.key, &c.reservation_id, c.actual);
            match host.grpc_call(
                &service.cluster,
                limitador::SERVICE,
                limitador::COMMIT,
                &message,
                service.timeout_ms,
            ) {
                Ok(token) => {
                    self.commits_in_flight.insert(token, c);
                }
                Err(_) => failed.push(c),
            }
        }
        // Put back after the loop, so one tick does not try a refused call twice.
        for c in failed {
            self.retry_commit(host, config, c, "dispatch");
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
        if let Some(c) = self.commits_in_flight.remove(&token) {
            self.on_commit_response(host, config, c, grpc_status, body);
            return true;
        }
        let Some((id, q)) = self.in_flight.remove(&token) else {
            return false;
        };
        let name = budget_name(config, id.0);
        match outcome(Protocol::Envoy, grpc_status, body) {
            Outcome::Ok(_) | Outcome::Reserved(_) => add(
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
                settle_error(host, name, reason);
                self.retry(host, config, id, q, reason);
            }
        }
        true
    }

    /// A commit's answer. Any gRPC `OK` means Limitador applied it, so only a failed call
    /// is sent again (an unreadable `OK` body is counted, not resent: that would charge
    /// twice).
    fn on_commit_response(
        &mut self,
        host: &mut dyn Host,
        config: &Config,
        c: Commit,
        grpc_status: u32,
        body: Option<&[u8]>,
    ) {
        let name = budget_name(config, c.budget);
        if grpc_status != GRPC_OK {
            let reason = grpc_failure(grpc_status);
            settle_error(host, name, reason);
            self.retry_commit(host, config, c, reason);
            return;
        }
        add(
            host,
            &Stat::new(catalog::GLOBAL_SETTLED).tag("budget", name),
            c.actual,
        );
        add(
            host,
            &Stat::new(catalog::GLOBAL_RETURNED).tag("budget", name),
            c.reserved.saturating_sub(c.actual),
        );
        match body.map(limitador::decode_commit_response) {
            Some(Ok(true)) => {}
            // An empty body is proto3's `reservation_released: false`.
            Some(Ok(false)) | None => {
                if !c.reservation_id.is_empty() {
                    host.counter_add(
                        Stat::new(catalog::GLOBAL_RESERVATIONS_EXPIRED)
                            .tag("budget", name)
                            .name(),
                        1,
                    );
                }
            }
            Some(Err(_)) => settle_error(host, name, "malformed"),
        }
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
        if too_old(host, config, q.since_ms) {
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

    /// Put a failed commit back in the queue, unless it is too old (its hold then expires
    /// in the service by itself; the charge is lost and counted).
    fn retry_commit(&mut self, host: &mut dyn Host, config: &Config, c: Commit, reason: &str) {
        if too_old(host, config, c.since_ms) || self.commits.len() >= MAX_QUEUED {
            drop_hits(host, config, c.budget, c.actual, reason);
            return;
        }
        self.commits.push_back(c);
    }
}

/// Whether a settlement queued at `since_ms` has been retried for `settle_retry_secs`.
fn too_old(host: &dyn Host, config: &Config, since_ms: i64) -> bool {
    let retry_ms = config.rate_limit_service.as_ref().map_or(0, |s| {
        i64::try_from(s.settle_retry_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000)
    });
    host.now_ms().saturating_sub(since_ms) >= retry_ms
}

fn budget_name(config: &Config, budget: usize) -> &str {
    config
        .global_budgets
        .get(budget)
        .map(|b| b.name.as_str())
        .unwrap_or("unknown")
}

fn settle_error(host: &mut dyn Host, name: &str, reason: &str) {
    host.counter_add(
        Stat::new(catalog::GLOBAL_SETTLE_ERRORS)
            .tag("budget", name)
            .tag("reason", reason)
            .name(),
        1,
    );
}

fn drop_hits(host: &mut dyn Host, config: &Config, budget: usize, hits: u64, reason: &str) {
    let name = budget_name(config, budget);
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
        assert_eq!(
            outcome(Protocol::Envoy, 0, Some(&[0x08, 1])),
            Outcome::Ok(None)
        );
        assert_eq!(
            outcome(Protocol::Envoy, 0, Some(&[0x08, 2])),
            Outcome::OverLimit(None)
        );
        assert_eq!(
            outcome(Protocol::Envoy, 0, Some(&[])),
            Outcome::Failed("unknown_code")
        );
        assert_eq!(outcome(Protocol::Envoy, 0, None), Outcome::Failed("empty"));
        assert_eq!(
            outcome(Protocol::Envoy, 0, Some(&[0x12, 9])),
            Outcome::Failed("malformed")
        );
        assert_eq!(
            outcome(Protocol::Envoy, 4, None),
            Outcome::Failed("timeout")
        );
        assert_eq!(
            outcome(Protocol::Envoy, 14, None),
            Outcome::Failed("unavailable")
        );
        assert_eq!(
            outcome(Protocol::Envoy, 13, Some(&[0x08, 1])),
            Outcome::Failed("grpc_error")
        );
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

    fn limitador_config() -> Config {
        Config::parse(
            br#"{"api":"v1",
                 "rate_limit_service":{"cluster":"rls","domain":"tf","timeout_ms":50,"settle_retry_secs":10,
                                       "protocol":"limitador","reservation_ttl_secs":90},
                 "budgets":[{"name":"g","key":"header:x-tenant","backend":"global"}]}"#,
        )
        .unwrap()
    }

    fn hold(id: &str, hits: u64) -> Hold {
        Hold {
            budget: 0,
            key: "acme".into(),
            hits,
            reservation: Some(id.into()),
        }
    }

    #[test]
    fn limitador_answers_become_reservations() {
        let l = Protocol::Limitador;
        let ok = [&[0x08, 1, 0x12, 2][..], b"r7"].concat();
        assert_eq!(outcome(l, 0, Some(&ok)), Outcome::Reserved("r7".into()));
        assert_eq!(
            outcome(l, 0, Some(&[0x08, 1])),
            Outcome::Reserved(String::new())
        );
        assert_eq!(outcome(l, 0, Some(&[0x08, 2])), Outcome::OverLimit(None));
        assert_eq!(outcome(l, 0, Some(&[])), Outcome::Failed("unknown_code"));
        assert_eq!(
            outcome(l, 0, Some(&[0x12, 9])),
            Outcome::Failed("malformed")
        );
        assert_eq!(outcome(l, 0, None), Outcome::Failed("empty"));
        assert_eq!(outcome(l, 4, None), Outcome::Failed("timeout"));
        // A ShouldRateLimit answer read as a ReserveResponse: the code field is the same,
        // the statuses are an unknown field, so it is a reservation of nothing.
        assert_eq!(
            outcome(l, 0, Some(&[0x08, 2, 0x12, 0])),
            Outcome::OverLimit(None)
        );
    }

    #[test]
    fn a_reservation_is_sent_as_reserve_with_the_ttl() {
        let config = limitador_config();
        let service = config.rate_limit_service.as_ref().unwrap();
        let mut host = FakeHost::default();
        dispatch_check(&mut host, service, "g", "acme", 5_000_000_000).unwrap();
        let call = &host.grpc_calls[0];
        assert_eq!(call.service, limitador::SERVICE);
        assert_eq!(call.method, limitador::RESERVE);
        // Reserve carries a uint64: no u32 clamp on this protocol.
        assert_eq!(
            call.message,
            limitador::ReserveRequest {
                domain: "tf",
                descriptors: vec![vec![("budget", "g"), ("key", "acme")]],
                amount: 5_000_000_000,
                ttl_secs: 90,
            }
            .encode()
        );
    }

    #[test]
    fn commits_go_out_one_per_reservation_and_count_what_came_back() {
        let config = limitador_config();
        let service = config.rate_limit_service.as_ref().unwrap();
        let mut host = FakeHost::default();
        let mut q = SettleQueue::default();
        q.commit(&mut host, &config, &hold("r1", 500), 100);
        q.commit(&mut host, &config, &hold("r2", 500), 0);
        // An envoy-protocol hold has nothing to commit.
        q.commit(
            &mut host,
            &config,
            &Hold {
                reservation: None,
                ..hold("", 5)
            },
            5,
        );
        assert_eq!(q.len(), 2);
        q.flush(&mut host, &config);
        assert_eq!(host.grpc_calls.len(), 2);
        let c = &host.grpc_calls[0];
        assert_eq!(
            (c.service.as_str(), c.method.as_str()),
            (limitador::SERVICE, limitador::COMMIT)
        );
        assert_eq!(c.message, commit_message(service, "g", "acme", "r1", 100));
        let tokens: Vec<u32> = host.grpc_calls.iter().map(|c| c.token).collect();
        assert!(q.on_response(&mut host, &config, tokens[0], 0, Some(&[0x08, 1])));
        // Released false: the hold had expired before the commit.
        assert!(q.on_response(&mut host, &config, tokens[1], 0, Some(&[])));
        assert!(q.is_empty());
        assert_eq!(host.counter("tokenfuse_global_settled.budget=.=g;.;"), 100);
        assert_eq!(host.counter("tokenfuse_global_returned.budget=.=g;.;"), 900);
        assert_eq!(
            host.counter("tokenfuse_global_reservations_expired.budget=.=g;.;"),
            1
        );
    }

    #[test]
    fn a_failed_commit_is_retried_then_dropped_and_an_unreadable_ok_is_not_resent() {
        let config = limitador_config();
        let mut host = FakeHost::default();
        host.now_ms.set(1_000);
        let mut q = SettleQueue::default();
        q.commit(&mut host, &config, &hold("r1", 500), 70);
        q.flush(&mut host, &config);
        let t = host.grpc_calls[0].token;
        assert!(q.on_response(&mut host, &config, t, 14, None));
        assert_eq!(q.len(), 1, "back in the queue");
        host.now_ms.set(5_000);
        q.flush(&mut host, &config);
        assert_eq!(host.grpc_calls.len(), 2);
        assert_eq!(host.grpc_calls[1].message, host.grpc_calls[0].message);
        // gRPC OK with a body that does not decode: Limitador applied it; resending would
        // charge twice.
        let t = host.grpc_calls[1].token;
        assert!(q.on_response(&mut host, &config, t, 0, Some(&[0x08])));
        assert!(q.is_empty());
        assert_eq!(host.counter("tokenfuse_global_settled.budget=.=g;.;"), 70);
        assert_eq!(
            host.counter_sum("tokenfuse_global_settle_errors", &["reason=.=malformed"]),
            1
        );
        // Past settle_retry_secs: dropped and counted.
        q.commit(&mut host, &config, &hold("r2", 500), 30);
        q.flush(&mut host, &config);
        host.now_ms.set(20_000);
        let t = host.grpc_calls[2].token;
        q.on_response(&mut host, &config, t, 4, None);
        assert!(q.is_empty());
        assert_eq!(
            host.counter("tokenfuse_global_settle_dropped.budget=.=g;.;"),
            30
        );
    }

    #[test]
    fn commits_that_cannot_be_sent_wait_and_a_tick_sends_a_bounded_number() {
        let config = limitador_config();
        let mut host = FakeHost {
            grpc_broken: true,
            ..FakeHost::default()
        };
        let mut q = SettleQueue::default();
        q.commit(&mut host, &config, &hold("r1", 5), 5);
        q.flush(&mut host, &config);
        assert_eq!(q.len(), 1);
        host.grpc_broken = false;
        for i in 0..MAX_COMMITS_PER_FLUSH {
            q.commit(&mut host, &config, &hold(&format!("x{i}"), 5), 5);
        }
        q.flush(&mut host, &config);
        assert_eq!(host.grpc_calls.len(), MAX_COMMITS_PER_FLUSH);
        q.flush(&mut host, &config);
        assert_eq!(host.grpc_calls.len(), MAX_COMMITS_PER_FLUSH + 1);
    }
}
