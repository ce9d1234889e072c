//! `ShouldRateLimit` as limitador-server's `envoy_rls` service answers it: one request in,
//! one Limitador `check_rate_limited_and_update` call, one response out. Host-free: the
//! gRPC glue lives in `service`, and the unit tests here run Limitador's in-memory
//! storage.
//!
//! The steps (the crate docs list them with their source):
//!
//! 1. An empty `domain` is answered `UNKNOWN` at once; nothing is counted.
//! 2. The domain is the namespace; each descriptor becomes a map from entry key to entry
//!    value (a repeated key keeps its last value), and the list of those maps is bound to
//!    CEL as `descriptors`.
//! 3. `hits_addend` 0 (unset) counts as 1.
//! 4. Every limit of the namespace whose conditions hold and whose variables resolve
//!    yields one counter; all of them are checked against `hits_addend` and, only if none
//!    would pass its `max_value`, all are incremented by it (all or nothing).
//! 5. `OVER_LIMIT` if a counter would pass its limit, otherwise `OK` (also when no limit
//!    applies, e.g. an unknown namespace). `statuses` stays empty; the draft-03
//!    `X-RateLimit-*` headers are added only in [`RateLimitHeaders::DraftVersion03`] mode.
//! 6. A storage error (Redis down) is the gRPC status `UNAVAILABLE`, so that the proxy's
//!    failure mode decides, rather than `UNKNOWN`, which Envoy lets through.

use std::collections::HashMap;

use limitador::errors::LimitadorError;
use limitador::limit::{Context, Limit, Namespace};
use limitador::reservation::{CommitResult, ReservationId, ReserveResult};
use limitador::{AsyncRateLimiter, CheckResult, RateLimiter};
use tonic::Status;

use crate::proto::{Code, HeaderValue, RateLimitDescriptor, RateLimitRequest, RateLimitResponse};

/// Limitador's limiter: blocking for its in-memory storage (tests), async for Redis.
pub enum Limiter {
    Blocking(RateLimiter),
    Async(AsyncRateLimiter),
}

impl Limiter {
    /// Makes `limits` the whole configuration (limitador-server's `configure_with`).
    pub async fn configure_with(&self, limits: Vec<Limit>) -> Result<(), LimitadorError> {
        match self {
            Limiter::Blocking(l) => l.configure_with(limits),
            Limiter::Async(l) => l.configure_with(limits).await,
        }
    }

    /// Limitador's `reserve` (the hold and its check in one storage step).
    pub async fn reserve(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        amount: u64,
        ttl: Option<std::time::Duration>,
    ) -> Result<ReserveResult, LimitadorError> {
        match self {
            Limiter::Blocking(l) => l.reserve(namespace, ctx, amount, ttl),
            Limiter::Async(l) => l.reserve(namespace, ctx, amount, ttl).await,
        }
    }

    /// Limitador's `commit_reservation`: charges `actual`, releases the hold if live.
    pub async fn commit_reservation(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        reservation_id: Option<&ReservationId>,
        actual: u64,
    ) -> Result<CommitResult, LimitadorError> {
        match self {
            Limiter::Blocking(l) => l.commit_reservation(namespace, ctx, reservation_id, actual),
            Limiter::Async(l) => {
                l.commit_reservation(namespace, ctx, reservation_id, actual)
                    .await
            }
        }
    }

    async fn check_rate_limited_and_update(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        delta: u64,
    ) -> Result<CheckResult, LimitadorError> {
        match self {
            Limiter::Blocking(l) => l.check_rate_limited_and_update(namespace, ctx, delta),
            Limiter::Async(l) => l.check_rate_limited_and_update(namespace, ctx, delta).await,
        }
    }
}

/// limitador-server's `--rate-limit-headers`: whether answers carry `X-RateLimit-*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RateLimitHeaders {
    /// No headers (limitador-server's default).
    #[default]
    None,
    /// `X-RateLimit-Limit`, `-Remaining`, `-Reset` of the most constrained counter
    /// (draft-polli-ratelimit-headers-03).
    DraftVersion03,
}

impl RateLimitHeaders {
    /// Parses limitador-server's spelling: `NONE` or `DRAFT_VERSION_03`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "NONE" => Some(RateLimitHeaders::None),
            "DRAFT_VERSION_03" => Some(RateLimitHeaders::DraftVersion03),
            _ => None,
        }
    }
}

/// What one call decided, for the caller's log.
#[derive(Debug)]
pub struct Answer {
    pub response: RateLimitResponse,
    /// How many counters the request matched.
    pub counters: usize,
    /// The `name` of the limit that tripped, when the limit has one.
    pub limit_name: Option<String>,
    /// What the request counted (its `hits_addend`, 0 read as 1).
    pub hits: u64,
}

/// `hits_addend` as limitador-server reads it: 0 (the proto3 default) is 1.
pub fn hits(request: &RateLimitRequest) -> u64 {
    if request.hits_addend == 0 {
        1
    } else {
        u64::from(request.hits_addend)
    }
}

/// The CEL context of a request: its descriptors as the list `descriptors`.
pub fn context(request: &RateLimitRequest) -> Context<'static> {
    descriptors_context(&request.descriptors)
}

/// The CEL context of `descriptors` (of any of the service's requests), as the list
/// `descriptors`.
pub fn descriptors_context(descriptors: &[RateLimitDescriptor]) -> Context<'static> {
    let descriptors: Vec<HashMap<String, String>> = descriptors
        .iter()
        .map(|d| {
            d.entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect()
        })
        .collect();
    let mut ctx = Context::default();
    ctx.list_binding("descriptors".to_string(), descriptors);
    ctx
}

fn response(code: Code, headers: Vec<HeaderValue>) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: code as i32,
        statuses: Vec::new(),
        response_headers_to_add: headers,
        request_headers_to_add: Vec::new(),
        raw_body: Vec::new(),
    }
}

/// Answers one `ShouldRateLimit` call (steps in the module docs).
pub async fn should_rate_limit(
    limiter: &Limiter,
    headers: RateLimitHeaders,
    request: &RateLimitRequest,
) -> Result<Answer, Status> {
    let hits = hits(request);
    if request.domain.is_empty() {
        return Ok(Answer {
            response: response(Code::Unknown, Vec::new()),
            counters: 0,
            limit_name: None,
            hits,
        });
    }
    let namespace = Namespace::from(request.domain.as_str());
    let ctx = context(request);
    let mut result = limiter
        .check_rate_limited_and_update(&namespace, &ctx, hits)
        .await
        .map_err(|e| Status::unavailable(format!("Service unavailable: {e}")))?;
    let code = if result.limited {
        Code::OverLimit
    } else {
        Code::Ok
    };
    let mut header_values: Vec<HeaderValue> = match headers {
        RateLimitHeaders::None => Vec::new(),
        RateLimitHeaders::DraftVersion03 => result
            .response_header()
            .into_iter()
            .map(|(key, value)| HeaderValue {
                key,
                value,
                raw_value: Vec::new(),
            })
            .collect(),
    };
    header_values.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Answer {
        response: response(code, header_values),
        counters: result.counters.len(),
        limit_name: result.limit_name.take(),
        hits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits;
    use crate::proto::RateLimitDescriptor;

    fn limiter(yaml: &str) -> Limiter {
        let limiter = Limiter::Blocking(RateLimiter::new(1000));
        let limits = limits::parse(yaml, "test").unwrap();
        futures_lite_block_on(limiter.configure_with(limits)).unwrap();
        limiter
    }

    // The blocking limiter never awaits, so a single poll completes these futures; a
    // tiny executor keeps tokio's test macros (and their runtime) out of the unit tests.
    fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
        use std::task::{Context as TaskContext, Poll, Waker};
        let mut future = std::pin::pin!(future);
        let mut cx = TaskContext::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("the blocking limiter should not suspend"),
        }
    }

    fn ask(limiter: &Limiter, request: &RateLimitRequest) -> Answer {
        futures_lite_block_on(should_rate_limit(limiter, RateLimitHeaders::None, request)).unwrap()
    }

    fn budget_request(budget: &str, key: &str, hits: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: "tokenfuse".into(),
            descriptors: vec![RateLimitDescriptor::of(&[("budget", budget), ("key", key)])],
            hits_addend: hits,
        }
    }

    fn code(answer: &Answer) -> Code {
        Code::try_from(answer.response.overall_code).unwrap()
    }

    const DAILY: &str = r#"
- namespace: tokenfuse
  name: tenant-daily
  max_value: 100
  seconds: 86400
  conditions: ["descriptors[0].budget == 'tenant-daily'"]
  variables: ["descriptors[0].key"]
"#;

    #[test]
    fn hits_addend_zero_counts_as_one() {
        assert_eq!(hits(&budget_request("b", "k", 0)), 1);
        assert_eq!(hits(&budget_request("b", "k", 7)), 7);
    }

    #[test]
    fn a_request_under_the_limit_is_ok_and_charged() {
        let l = limiter(DAILY);
        let a = ask(&l, &budget_request("tenant-daily", "acme", 60));
        assert_eq!(code(&a), Code::Ok);
        assert_eq!(a.counters, 1);
        assert_eq!(
            code(&ask(&l, &budget_request("tenant-daily", "acme", 40))),
            Code::Ok
        );
    }

    #[test]
    fn a_request_that_would_pass_the_limit_is_over_limit_and_not_charged() {
        let l = limiter(DAILY);
        assert_eq!(
            code(&ask(&l, &budget_request("tenant-daily", "acme", 90))),
            Code::Ok
        );
        let refused = ask(&l, &budget_request("tenant-daily", "acme", 11));
        assert_eq!(code(&refused), Code::OverLimit);
        assert_eq!(refused.limit_name.as_deref(), Some("tenant-daily"));
        // Not charged: exactly the 10 left still fit.
        assert_eq!(
            code(&ask(&l, &budget_request("tenant-daily", "acme", 10))),
            Code::Ok
        );
        assert_eq!(
            code(&ask(&l, &budget_request("tenant-daily", "acme", 1))),
            Code::OverLimit
        );
    }

    #[test]
    fn keys_count_separately() {
        let l = limiter(DAILY);
        assert_eq!(
            code(&ask(&l, &budget_request("tenant-daily", "a", 100))),
            Code::Ok
        );
        assert_eq!(
            code(&ask(&l, &budget_request("tenant-daily", "b", 100))),
            Code::Ok
        );
    }

    #[test]
    fn no_matching_limit_is_ok_and_counts_nothing() {
        let l = limiter(DAILY);
        let other_budget = ask(&l, &budget_request("other", "acme", 1000));
        assert_eq!(code(&other_budget), Code::Ok);
        assert_eq!(other_budget.counters, 0);
        let unknown_namespace = ask(
            &l,
            &RateLimitRequest {
                domain: "nobody".into(),
                ..budget_request("tenant-daily", "acme", 1000)
            },
        );
        assert_eq!(code(&unknown_namespace), Code::Ok);
    }

    #[test]
    fn an_empty_domain_is_unknown_and_counts_nothing() {
        let l = limiter(DAILY);
        let a = ask(
            &l,
            &RateLimitRequest {
                domain: String::new(),
                ..budget_request("tenant-daily", "acme", 100)
            },
        );
        assert_eq!(code(&a), Code::Unknown);
        assert_eq!(
            code(&ask(&l, &budget_request("tenant-daily", "acme", 100))),
            Code::Ok
        );
    }

    #[test]
    fn a_descriptor_without_the_variable_matches_no_limit() {
        let l = limiter(DAILY);
        let request = RateLimitRequest {
            domain: "tokenfuse".into(),
            descriptors: vec![RateLimitDescriptor::of(&[("budget", "tenant-daily")])],
            hits_addend: 1000,
        };
        let a = ask(&l, &request);
        assert_eq!(code(&a), Code::Ok);
        assert_eq!(a.counters, 0);
    }

    #[test]
    fn all_descriptors_are_checked_and_none_is_charged_when_one_is_over() {
        let l = limiter(
            r#"
- namespace: tokenfuse
  max_value: 100
  seconds: 60
  conditions: ["descriptors[0].budget == 'minute'"]
  variables: ["descriptors[0].key"]
- namespace: tokenfuse
  max_value: 10
  seconds: 60
  conditions: ["size(descriptors) > 1 && descriptors[1].budget == 'tiny'"]
  variables: ["descriptors[1].key"]
"#,
        );
        let both = |hits| RateLimitRequest {
            domain: "tokenfuse".into(),
            descriptors: vec![
                RateLimitDescriptor::of(&[("budget", "minute"), ("key", "acme")]),
                RateLimitDescriptor::of(&[("budget", "tiny"), ("key", "acme")]),
            ],
            hits_addend: hits,
        };
        assert_eq!(code(&ask(&l, &both(11))), Code::OverLimit);
        // The 11 went nowhere: the minute budget still has all of its 100.
        assert_eq!(
            code(&ask(&l, &budget_request("minute", "acme", 100))),
            Code::Ok
        );
        // One descriptor alone: the guarded condition is false, not an error.
        assert_eq!(
            code(&ask(&l, &budget_request("minute", "acme", 1))),
            Code::OverLimit
        );
    }

    #[test]
    fn a_limit_using_a_cel_macro_never_applies() {
        // limitador 0.14 takes a macro's iteration variable (`d`) for a binding the
        // request must provide; there is none, so the limit silently never matches.
        let l = limiter(
            r#"
- namespace: tokenfuse
  max_value: 10
  seconds: 60
  conditions: ["descriptors.exists(d, d.budget == 'tiny')"]
  variables: []
"#,
        );
        let a = ask(&l, &budget_request("tiny", "acme", 1000));
        assert_eq!(code(&a), Code::Ok);
        assert_eq!(a.counters, 0);
    }

    #[test]
    fn a_limit_can_find_its_descriptor_at_either_of_two_positions() {
        // The macro-free way to let a budget's descriptor sit first or second.
        let l = limiter(
            r#"
- namespace: tokenfuse
  max_value: 10
  seconds: 60
  conditions:
    - "descriptors[0].budget == 'tiny' || (size(descriptors) > 1 && descriptors[1].budget == 'tiny')"
  variables:
    - "size(descriptors) > 1 && descriptors[1].budget == 'tiny' ? descriptors[1].key : descriptors[0].key"
"#,
        );
        let second = |hits| RateLimitRequest {
            domain: "tokenfuse".into(),
            descriptors: vec![
                RateLimitDescriptor::of(&[("budget", "other"), ("key", "acme")]),
                RateLimitDescriptor::of(&[("budget", "tiny"), ("key", "acme")]),
            ],
            hits_addend: hits,
        };
        let a = ask(&l, &second(6));
        assert_eq!(code(&a), Code::Ok);
        assert_eq!(a.counters, 1);
        assert_eq!(code(&ask(&l, &budget_request("tiny", "acme", 4))), Code::Ok);
        assert_eq!(code(&ask(&l, &second(1))), Code::OverLimit);
        assert_eq!(
            code(&ask(&l, &budget_request("tiny", "other-tenant", 10))),
            Code::Ok
        );
    }

    #[test]
    fn draft_03_headers_describe_the_tightest_counter_sorted_by_name() {
        let l = limiter(DAILY);
        let a = futures_lite_block_on(should_rate_limit(
            &l,
            RateLimitHeaders::DraftVersion03,
            &budget_request("tenant-daily", "acme", 30),
        ))
        .unwrap();
        let headers: Vec<(&str, &str)> = a
            .response
            .response_headers_to_add
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_str()))
            .collect();
        assert_eq!(headers.len(), 3, "{headers:?}");
        assert_eq!(
            headers[0],
            (
                "X-RateLimit-Limit",
                "100, 100;w=86400;name=\"tenant-daily\""
            )
        );
        assert_eq!(headers[1], ("X-RateLimit-Remaining", "70"));
        assert_eq!(headers[2].0, "X-RateLimit-Reset");
        let reset: u64 = headers[2].1.parse().unwrap();
        assert!((86_000..=86_400).contains(&reset), "{reset}");
    }

    #[test]
    fn without_headers_mode_the_response_carries_only_the_code() {
        let l = limiter(DAILY);
        let a = ask(&l, &budget_request("tenant-daily", "acme", 30));
        assert!(a.response.response_headers_to_add.is_empty());
        assert!(a.response.statuses.is_empty());
    }

    #[test]
    fn a_condition_indexing_past_the_last_descriptor_panics_in_limitador() {
        // Documents the pitfall in `limits`: limitador 0.14 unwraps the evaluation error.
        let l = limiter(
            r#"
- namespace: tokenfuse
  max_value: 10
  seconds: 60
  conditions: ["descriptors[1].budget == 'x'"]
  variables: []
"#,
        );
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ask(&l, &budget_request("x", "acme", 1))
        }));
        assert!(outcome.is_err());
    }
}
