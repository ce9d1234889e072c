//! The engine as tokenfuse's tests will use it: the built binary, a real `redis-server`,
//! and a gRPC client speaking Envoy's RateLimitService and Limitador's Reserve/Commit, one
//! behaviour per test.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use rls_engine::client::RlsClient;
use rls_engine::proto::{
    Code, CommitRequest, Duration as ProtoDuration, RateLimitDescriptor, RateLimitRequest,
    RateLimitResponse, ReserveRequest,
};
use support::{Engine, Redis};
use tonic::Code as GrpcCode;

/// A 10,000-token daily budget per tenant, the shape tokenfuse's global budgets use.
const DAILY: &str = r#"
- namespace: tokenfuse
  name: tenant-daily
  max_value: 10000
  seconds: 86400
  conditions:
    - "descriptors[0].budget == 'tenant-daily'"
  variables:
    - "descriptors[0].key"
"#;

fn budget(budget: &str, key: &str, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: "tokenfuse".into(),
        descriptors: vec![RateLimitDescriptor::of(&[("budget", budget), ("key", key)])],
        hits_addend: hits,
    }
}

fn daily(key: &str, hits: u32) -> RateLimitRequest {
    budget("tenant-daily", key, hits)
}

async fn client(engine: &Engine) -> RlsClient {
    RlsClient::connect(engine.addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", engine.addr))
}

async fn code(client: &mut RlsClient, request: RateLimitRequest) -> Code {
    let response: RateLimitResponse = client
        .should_rate_limit(request)
        .await
        .unwrap_or_else(|s| panic!("ShouldRateLimit failed: {s:?}"));
    Code::try_from(response.overall_code).unwrap()
}

#[tokio::test]
async fn a_request_under_the_limit_is_ok() {
    let redis = Redis::start();
    let engine = Engine::start(&redis.url(), DAILY);
    let mut c = client(&engine).await;
    let response = c.should_rate_limit(daily("acme", 9000)).await.unwrap();
    assert_eq!(response.overall_code, Code::Ok as i32);
    // As limitador-server: no per-descriptor statuses, no headers by default.
    assert!(response.statuses.is_empty());
    assert!(response.response_headers_to_add.is_empty());
}

#[tokio::test]
async fn reaching_the_limit_is_over_limit_and_charges_nothing() {
    let redis = Redis::start();
    let engine = Engine::start(&redis.url(), DAILY);
    let mut c = client(&engine).await;
    assert_eq!(code(&mut c, daily("acme", 9990)).await, Code::Ok);
    assert_eq!(code(&mut c, daily("acme", 11)).await, Code::OverLimit);
    assert_eq!(code(&mut c, daily("acme", 11)).await, Code::OverLimit);
    // Neither refusal was charged: exactly the 10 left still fit, then nothing does.
    assert_eq!(code(&mut c, daily("acme", 10)).await, Code::Ok);
    assert_eq!(code(&mut c, daily("acme", 1)).await, Code::OverLimit);
    assert!(engine.log().contains("OVER_LIMIT (limit \"tenant-daily\")"));
}

#[tokio::test]
async fn hits_addend_is_what_a_request_charges_and_zero_charges_one() {
    let redis = Redis::start();
    let engine = Engine::start(&redis.url(), DAILY);
    let mut c = client(&engine).await;
    assert_eq!(code(&mut c, daily("acme", 4000)).await, Code::Ok);
    assert_eq!(code(&mut c, daily("acme", 5999)).await, Code::Ok);
    // 9,999 used: a request without hits_addend (0) adds 1 and fits, then nothing fits.
    assert_eq!(code(&mut c, daily("acme", 0)).await, Code::Ok);
    assert_eq!(code(&mut c, daily("acme", 0)).await, Code::OverLimit);
}

#[tokio::test]
async fn separate_keys_have_separate_counters() {
    let redis = Redis::start();
    let engine = Engine::start(&redis.url(), DAILY);
    let mut c = client(&engine).await;
    assert_eq!(code(&mut c, daily("acme", 10000)).await, Code::Ok);
    assert_eq!(code(&mut c, daily("acme", 1)).await, Code::OverLimit);
    assert_eq!(code(&mut c, daily("globex", 10000)).await, Code::Ok);
}

#[tokio::test]
async fn a_request_no_limit_matches_is_ok_and_an_empty_domain_is_unknown() {
    let redis = Redis::start();
    let engine = Engine::start(&redis.url(), DAILY);
    let mut c = client(&engine).await;
    assert_eq!(code(&mut c, budget("other", "acme", 50000)).await, Code::Ok);
    let unknown_namespace = RateLimitRequest {
        domain: "elsewhere".into(),
        ..daily("acme", 50000)
    };
    assert_eq!(code(&mut c, unknown_namespace).await, Code::Ok);
    let empty_domain = RateLimitRequest {
        domain: String::new(),
        ..daily("acme", 50000)
    };
    assert_eq!(code(&mut c, empty_domain).await, Code::Unknown);
    // None of them counted.
    assert_eq!(code(&mut c, daily("acme", 10000)).await, Code::Ok);
}

#[tokio::test]
async fn two_engines_on_one_redis_share_counters() {
    let redis = Redis::start();
    let first = Engine::start(&redis.url(), DAILY);
    let second = Engine::start(&redis.url(), DAILY);
    let mut a = client(&first).await;
    let mut b = client(&second).await;
    assert_eq!(code(&mut a, daily("acme", 6000)).await, Code::Ok);
    assert_eq!(code(&mut b, daily("acme", 4001)).await, Code::OverLimit);
    assert_eq!(code(&mut b, daily("acme", 3000)).await, Code::Ok);
    assert_eq!(code(&mut a, daily("acme", 1001)).await, Code::OverLimit);
    assert_eq!(code(&mut a, daily("acme", 1000)).await, Code::Ok);
    assert_eq!(code(&mut b, daily("acme", 1)).await, Code::OverLimit);
}

#[tokio::test]
async fn a_counter_starts_over_when_its_window_expires() {
    let redis = Redis::start();
    let engine = Engine::start(
        &redis.url(),
        r#"
- namespace: tokenfuse
  max_value: 100
  seconds: 1
  conditions: ["descriptors[0].budget == 'burst'"]
  variables: ["descriptors[0].key"]
"#,
    );
    let mut c = client(&engine).await;
    assert_eq!(code(&mut c, budget("burst", "acme", 100)).await, Code::Ok);
    assert_eq!(
        code(&mut c, budget("burst", "acme", 1)).await,
        Code::OverLimit
    );
    // The window is the counter key's TTL in Redis, set by the first charge.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if code(&mut c, budget("burst", "acme", 100)).await == Code::Ok {
            break;
        }
        assert!(Instant::now() < deadline, "the 1 s window never expired");
    }
    assert_eq!(
        code(&mut c, budget("burst", "acme", 1)).await,
        Code::OverLimit
    );
}

#[tokio::test]
async fn a_restarted_engine_keeps_the_counts_held_in_redis() {
    let redis = Redis::start();
    let mut engine = Engine::start(&redis.url(), DAILY);
    let port = engine.addr.port();
    {
        let mut c = client(&engine).await;
        assert_eq!(code(&mut c, daily("acme", 7000)).await, Code::Ok);
    }
    let status = engine.stop();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(engine.log().contains("SIGTERM, stopping"));
    engine.start_again();
    assert_eq!(engine.addr.port(), port, "restarted on the same port");
    let mut c = client(&engine).await;
    assert_eq!(code(&mut c, daily("acme", 3001)).await, Code::OverLimit);
    assert_eq!(code(&mut c, daily("acme", 3000)).await, Code::Ok);
    // The counter is a Redis key of limitador's encoding, with the window as its TTL.
    let keys = redis.command(&["DBSIZE"]).unwrap();
    assert_ne!(keys, ":0", "no keys in Redis");
}

#[tokio::test]
async fn while_stopped_nothing_listens_and_after_a_restart_a_new_connection_is_served() {
    // What a proxy sees across a restart: calls fail while the engine is down, a new
    // connection works afterwards.
    let redis = Redis::start();
    let mut engine = Engine::start(&redis.url(), DAILY);
    let addr = engine.addr;
    assert!(engine.alive());
    engine.stop();
    assert!(
        RlsClient::connect(addr).await.is_err(),
        "nothing listens while stopped"
    );
    engine.start_again();
    let mut c = client(&engine).await;
    assert_eq!(code(&mut c, daily("acme", 1)).await, Code::Ok);
}

#[tokio::test]
async fn redis_down_is_unavailable_and_redis_back_is_served_again() {
    let mut redis = Redis::start();
    let engine = Engine::start(&redis.url(), DAILY);
    let mut c = client(&engine).await;
    assert_eq!(code(&mut c, daily("acme", 1)).await, Code::Ok);
    redis.stop();
    let status = c.should_rate_limit(daily("acme", 1)).await.unwrap_err();
    assert_eq!(status.code(), GrpcCode::Unavailable, "{status:?}");
    assert!(engine.log().contains("answering UNAVAILABLE"));
    // A new, empty Redis on the same port: the engine reconnects on its own.
    redis.start_again();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match c.should_rate_limit(daily("acme", 10000)).await {
            Ok(r) => {
                assert_eq!(
                    r.overall_code,
                    Code::Ok as i32,
                    "counts were lost with Redis"
                );
                break;
            }
            Err(s) => {
                assert_eq!(s.code(), GrpcCode::Unavailable, "{s:?}");
                assert!(Instant::now() < deadline, "still unavailable: {s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[tokio::test]
async fn draft_03_mode_adds_rate_limit_headers_of_the_tightest_counter() {
    let redis = Redis::start();
    let engine = Engine::start_with(
        &redis.url(),
        DAILY,
        &["--rate-limit-headers", "DRAFT_VERSION_03"],
    );
    let mut c = client(&engine).await;
    let response = c.should_rate_limit(daily("acme", 2500)).await.unwrap();
    let headers: Vec<(String, String)> = response
        .response_headers_to_add
        .into_iter()
        .map(|h| (h.key, h.value))
        .collect();
    assert_eq!(headers[0].0, "X-RateLimit-Limit");
    assert_eq!(headers[0].1, "10000, 10000;w=86400;name=\"tenant-daily\"");
    assert_eq!(headers[1], ("X-RateLimit-Remaining".into(), "7500".into()));
    assert_eq!(headers[2].0, "X-RateLimit-Reset");
}

#[tokio::test]
async fn another_method_is_unimplemented() {
    let redis = Redis::start();
    let engine = Engine::start(&redis.url(), DAILY);
    let mut c = client(&engine).await;
    let status = c
        .call(
            "/envoy.service.ratelimit.v3.RateLimitService/Other",
            daily("acme", 1),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), GrpcCode::Unimplemented);
}

#[tokio::test]
async fn a_limit_indexing_past_the_descriptors_breaks_that_call_and_the_engine_serves_on() {
    // limitador 0.14 panics on this (see the crate docs); limitador-server would too.
    let redis = Redis::start();
    let limits = format!(
        "{DAILY}
- namespace: tokenfuse
  max_value: 5
  seconds: 60
  conditions: [\"descriptors[1].budget == 'second'\"]
  variables: []
"
    );
    let engine = Engine::start(&redis.url(), &limits);
    let mut c = client(&engine).await;
    // The handler's task dies; the client sees its stream reset (RST_STREAM CANCEL),
    // which a proxy treats as a failed call (its failure mode decides).
    let status = c.should_rate_limit(daily("acme", 1)).await.unwrap_err();
    assert_eq!(status.code(), GrpcCode::Cancelled, "{status:?}");
    assert!(engine.log().contains("panicked"), "{}", engine.log());
    let mut fresh = client(&engine).await;
    let two = RateLimitRequest {
        descriptors: vec![
            RateLimitDescriptor::of(&[("budget", "tenant-daily"), ("key", "acme")]),
            RateLimitDescriptor::of(&[("budget", "second")]),
        ],
        ..daily("acme", 5)
    };
    assert_eq!(code(&mut fresh, two).await, Code::Ok);
}

fn reserve_daily(key: &str, amount: u64) -> ReserveRequest {
    ReserveRequest {
        domain: "tokenfuse".into(),
        descriptors: vec![RateLimitDescriptor::of(&[
            ("budget", "tenant-daily"),
            ("key", key),
        ])],
        amount,
        ttl: Some(ProtoDuration {
            seconds: 30,
            nanos: 0,
        }),
    }
}

fn commit_daily(key: &str, id: &str, actual: u64) -> CommitRequest {
    CommitRequest {
        domain: "tokenfuse".into(),
        descriptors: vec![RateLimitDescriptor::of(&[
            ("budget", "tenant-daily"),
            ("key", key),
        ])],
        reservation_id: id.into(),
        actual_amount: actual,
    }
}

/// `Reserve`'s code and reservation id.
async fn reserve(client: &mut RlsClient, request: ReserveRequest) -> (Code, String) {
    let r = client
        .reserve(request)
        .await
        .unwrap_or_else(|s| panic!("Reserve failed: {s:?}"));
    (Code::try_from(r.code).unwrap(), r.reservation_id)
}

#[tokio::test]
async fn a_reservation_holds_and_its_commit_gives_the_unused_rest_back_over_redis() {
    let redis = Redis::start();
    let first = Engine::start(&redis.url(), DAILY);
    let second = Engine::start(&redis.url(), DAILY);
    let (mut a, mut b) = (client(&first).await, client(&second).await);
    let (code, id) = reserve(&mut a, reserve_daily("acme", 6000)).await;
    assert_eq!(code, Code::Ok);
    assert_eq!(id.len(), 36, "a UUID: {id:?}");
    // The hold is in Redis: the other engine sees it before anything is charged.
    assert_eq!(
        reserve(&mut b, reserve_daily("acme", 4001)).await,
        (Code::OverLimit, String::new())
    );
    // Billed 1000 of 6000: 5000 come back.
    let done = b.commit(commit_daily("acme", &id, 1000)).await.unwrap();
    assert!(done.reservation_released);
    let (code, _) = reserve(&mut b, reserve_daily("acme", 9000)).await;
    assert_eq!(code, Code::Ok);
    assert_eq!(
        reserve(&mut a, reserve_daily("acme", 1)).await.0,
        Code::OverLimit
    );
    // A second commit of the same id is a plain charge: it releases nothing.
    let again = a.commit(commit_daily("acme", &id, 0)).await.unwrap();
    assert!(!again.reservation_released);
}

#[tokio::test]
async fn concurrent_reservations_on_two_engines_never_overshoot() {
    let redis = Redis::start();
    let engines = [
        Engine::start(&redis.url(), DAILY),
        Engine::start(&redis.url(), DAILY),
    ];
    for round in 0..3 {
        let key = format!("race{round}");
        let mut tasks = Vec::new();
        for t in 0..32 {
            let addr = engines[t % 2].addr;
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = RlsClient::connect(addr).await.unwrap();
                let mut admitted = 0u32;
                for _ in 0..4 {
                    if reserve(&mut c, reserve_daily(&key, 500)).await.0 == Code::Ok {
                        admitted += 1;
                    }
                }
                admitted
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap();
        }
        // 128 reservations of 500 against 10,000: exactly 20 fit, whatever the interleaving.
        assert_eq!(admitted, 20, "round {round}");
    }
}

#[tokio::test]
async fn reserve_and_commit_with_redis_down_are_unavailable() {
    let mut redis = Redis::start();
    let engine = Engine::start(&redis.url(), DAILY);
    let mut c = client(&engine).await;
    redis.stop();
    let status = c.reserve(reserve_daily("acme", 1)).await.unwrap_err();
    assert_eq!(status.code(), GrpcCode::Unavailable);
    let status = c.commit(commit_daily("acme", "x", 1)).await.unwrap_err();
    assert_eq!(status.code(), GrpcCode::Unavailable);
}
