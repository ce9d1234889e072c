//! `Reserve` and `Commit` as limitador-server's `kuadrant.service.ratelimit.v1` service
//! answers them (Kuadrant/limitador PR #515, `limitador-server/src/envoy_rls/
//! kuadrant_service.rs`): one request in, one call of Limitador's `reserve` or
//! `commit_reservation`, one response out. No counting here: the hold, its check against
//! the counter plus the holds outstanding, and the commit are the library's (one Lua
//! script per call in its Redis storage). Host-free: the gRPC glue is in `service`.
//!
//! `Reserve`:
//! 1. An empty `domain` is answered `UNKNOWN` with no id; nothing is held.
//! 2. The descriptors become the CEL binding `descriptors`, as for `ShouldRateLimit`.
//! 3. `ttl` unset is the server's ceiling (`--max-reservation-ttl`), a set one is clamped
//!    to it by the library; a negative or unreadable one counts as unset.
//! 4. Limited: `OVER_LIMIT`, no id. Admitted: `OK` and the reservation id, empty when the
//!    library held nothing (no limit applies, or the amount was 0).
//!
//! `Commit`:
//! 1. An empty `domain`: `reservation_released: false`, nothing charged.
//! 2. `actual_amount` is charged to every counter that applies, whatever the id; a live
//!    hold with that id is released (`reservation_released: true`). An empty id is a plain
//!    charge.
//!
//! A storage error (Redis down) is the gRPC status `UNAVAILABLE` for both.

use std::time::Duration;

use limitador::limit::Namespace;
use limitador::reservation::ReservationId;
use tonic::Status;

use crate::proto::{Code, CommitRequest, CommitResponse, ReserveRequest, ReserveResponse};
use crate::rls::{descriptors_context, Limiter};

/// What one `Reserve` decided, for the caller's log.
#[derive(Debug)]
pub struct Reserved {
    pub response: ReserveResponse,
    /// How many counters the request matched.
    pub counters: usize,
    /// What the library holds (the request's amount, or less when clamped).
    pub held: u64,
}

/// A request's `ttl` as the library takes it: `None` (the ceiling) when unset or not a
/// valid non-negative duration.
fn ttl(request: &ReserveRequest) -> Option<Duration> {
    let d = request.ttl.as_ref()?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(secs, nanos))
}

/// Answers one `Reserve` call (steps in the module docs).
pub async fn reserve(limiter: &Limiter, request: &ReserveRequest) -> Result<Reserved, Status> {
    if request.domain.is_empty() {
        return Ok(Reserved {
            response: ReserveResponse {
                code: Code::Unknown as i32,
                reservation_id: String::new(),
            },
            counters: 0,
            held: 0,
        });
    }
    let namespace = Namespace::from(request.domain.as_str());
    let ctx = descriptors_context(&request.descriptors);
    let result = limiter
        .reserve(&namespace, &ctx, request.amount, ttl(request))
        .await
        .map_err(|e| Status::unavailable(format!("Service unavailable: {e}")))?;
    let response = if result.limited {
        ReserveResponse {
            code: Code::OverLimit as i32,
            reservation_id: String::new(),
        }
    } else {
        ReserveResponse {
            code: Code::Ok as i32,
            reservation_id: result
                .reservation_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        }
    };
    Ok(Reserved {
        response,
        counters: result.counters.len(),
        held: result.amount,
    })
}

/// Answers one `Commit` call (steps in the module docs).
pub async fn commit(limiter: &Limiter, request: &CommitRequest) -> Result<CommitResponse, Status> {
    if request.domain.is_empty() {
        return Ok(CommitResponse {
            reservation_released: false,
        });
    }
    let namespace = Namespace::from(request.domain.as_str());
    let ctx = descriptors_context(&request.descriptors);
    let id = (!request.reservation_id.is_empty())
        .then(|| ReservationId::from(request.reservation_id.clone()));
    let result = limiter
        .commit_reservation(&namespace, &ctx, id.as_ref(), request.actual_amount)
        .await
        .map_err(|e| Status::unavailable(format!("Service unavailable: {e}")))?;
    Ok(CommitResponse {
        reservation_released: result.reservation_released,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits;
    use crate::proto::{Duration as ProtoDuration, RateLimitDescriptor};
    use limitador::RateLimiter;

    fn limiter(max: u64) -> Limiter {
        let yaml = format!(
            "- namespace: tf\n  max_value: {max}\n  seconds: 60\n  \
             conditions: [\"descriptors[0].budget == 'd'\"]\n  variables: [\"descriptors[0].key\"]\n"
        );
        let limiter = Limiter::Blocking(RateLimiter::new(1000));
        block_on(limiter.configure_with(limits::parse(&yaml, "test").unwrap())).unwrap();
        limiter
    }

    // The blocking limiter never awaits: one poll completes these futures.
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        use std::task::{Context, Poll, Waker};
        let mut future = std::pin::pin!(future);
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("the blocking limiter should not suspend"),
        }
    }

    fn reserve_req(key: &str, amount: u64) -> ReserveRequest {
        ReserveRequest {
            domain: "tf".into(),
            descriptors: vec![RateLimitDescriptor::of(&[("budget", "d"), ("key", key)])],
            amount,
            ttl: Some(ProtoDuration {
                seconds: 30,
                nanos: 0,
            }),
        }
    }

    fn commit_req(key: &str, id: &str, actual: u64) -> CommitRequest {
        CommitRequest {
            domain: "tf".into(),
            descriptors: vec![RateLimitDescriptor::of(&[("budget", "d"), ("key", key)])],
            reservation_id: id.into(),
            actual_amount: actual,
        }
    }

    #[test]
    fn holds_count_against_the_limit_until_committed_and_the_unused_rest_comes_back() {
        let l = limiter(1000);
        let a = block_on(reserve(&l, &reserve_req("acme", 500))).unwrap();
        assert_eq!(a.response.code, Code::Ok as i32);
        assert!(!a.response.reservation_id.is_empty());
        assert_eq!((a.counters, a.held), (1, 500));
        let b = block_on(reserve(&l, &reserve_req("acme", 500))).unwrap();
        assert_eq!(b.response.code, Code::Ok as i32);
        // 500 + 500 held: a third does not fit, though nothing is charged yet.
        let c = block_on(reserve(&l, &reserve_req("acme", 500))).unwrap();
        assert_eq!(c.response.code, Code::OverLimit as i32);
        assert_eq!(c.response.reservation_id, "");
        // Billed 100 of 500: 400 come back, so 500 fits again.
        let done = block_on(commit(
            &l,
            &commit_req("acme", &a.response.reservation_id, 100),
        ));
        assert!(done.unwrap().reservation_released);
        let d = block_on(reserve(&l, &reserve_req("acme", 400))).unwrap();
        assert_eq!(d.response.code, Code::Ok as i32);
        // Another key has its own counter.
        let other = block_on(reserve(&l, &reserve_req("zeta", 1000))).unwrap();
        assert_eq!(other.response.code, Code::Ok as i32);
    }

    #[test]
    fn a_commit_without_a_live_hold_is_a_plain_charge() {
        let l = limiter(1000);
        let r = block_on(commit(&l, &commit_req("acme", "", 900))).unwrap();
        assert!(!r.reservation_released);
        let r = block_on(commit(&l, &commit_req("acme", "no-such-id", 50))).unwrap();
        assert!(!r.reservation_released);
        // 950 charged: 100 does not fit, 50 does.
        let over = block_on(reserve(&l, &reserve_req("acme", 100))).unwrap();
        assert_eq!(over.response.code, Code::OverLimit as i32);
        let fits = block_on(reserve(&l, &reserve_req("acme", 50))).unwrap();
        assert_eq!(fits.response.code, Code::Ok as i32);
    }

    #[test]
    fn an_empty_domain_holds_and_charges_nothing() {
        let l = limiter(10);
        let mut req = reserve_req("acme", 5);
        req.domain.clear();
        let r = block_on(reserve(&l, &req)).unwrap();
        assert_eq!(r.response.code, Code::Unknown as i32);
        let mut c = commit_req("acme", "", 5);
        c.domain.clear();
        assert!(!block_on(commit(&l, &c)).unwrap().reservation_released);
        assert_eq!(
            block_on(reserve(&l, &reserve_req("acme", 10)))
                .unwrap()
                .response
                .code,
            Code::Ok as i32
        );
    }

    #[test]
    fn no_limit_applying_admits_without_an_id() {
        let l = limiter(10);
        let mut req = reserve_req("acme", 5);
        req.descriptors = vec![RateLimitDescriptor::of(&[("budget", "other")])];
        let r = block_on(reserve(&l, &req)).unwrap();
        assert_eq!(r.response.code, Code::Ok as i32);
        assert_eq!(r.response.reservation_id, "");
        assert_eq!(r.counters, 0);
    }

    #[test]
    fn odd_ttls_fall_back_to_the_ceiling() {
        let mut req = reserve_req("acme", 5);
        assert_eq!(ttl(&req), Some(Duration::from_secs(30)));
        req.ttl = Some(ProtoDuration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(ttl(&req), None);
        req.ttl = Some(ProtoDuration {
            seconds: 1,
            nanos: 2_000_000_000,
        });
        assert_eq!(ttl(&req), None);
        req.ttl = None;
        assert_eq!(ttl(&req), None);
    }
}
