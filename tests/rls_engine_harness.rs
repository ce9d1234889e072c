//! Tests of the global-budget harness itself (`tests/support/redis.rs`,
//! `tests/support/rls_engine.rs`): a real redis-server and the rate-limit test engine
//! start, restart on the same port and answer there, without the filter. The engine's
//! own behaviour (Limitador's verdicts over gRPC) is tested in `tools/rls-engine/tests`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::envoy::{Envoy, EnvoySpec};
use support::redis::Redis;
use support::rls_engine::{budget_limit_yaml, rls_engine_binary, RlsEngine};

#[test]
fn redis_answers_on_its_port_and_comes_back_empty_after_a_restart() {
    let redis = Redis::start();
    assert!(redis.server_pid().is_some());
    assert_eq!(redis.command(&["SET", "k", "v"]).unwrap(), "+OK");
    assert_eq!(redis.command(&["GET", "k"]).unwrap(), "v");
    assert_eq!(redis.command(&["DBSIZE"]).unwrap(), ":1");
    redis.stop();
    assert!(!redis.is_running());
    assert!(
        redis.command(&["PING"]).is_err(),
        "nothing listens while stopped"
    );
    redis.start_again();
    assert_eq!(redis.command(&["PING"]).unwrap(), "+PONG");
    assert_eq!(redis.command(&["DBSIZE"]).unwrap(), ":0", "no persistence");
}

#[test]
fn the_engine_loads_the_limits_and_speaks_http2_on_its_port() {
    let redis = Redis::start();
    let engine = RlsEngine::start(&redis, &budget_limit_yaml("tenant-daily", 10_000, 86_400));
    assert_ne!(engine.port, 0);
    assert!(engine.is_running());
    assert!(engine.answers_http2(), "log:\n{}", engine.log());
    assert!(
        engine.log().contains(
            "limit \"tenant-daily\" namespace \"tokenfuse\": max_value 10000 per 86400 s"
        ),
        "log:\n{}",
        engine.log()
    );
}

#[test]
fn the_engine_stops_and_starts_again_on_the_same_port() {
    let redis = Redis::start();
    let engine = RlsEngine::start(&redis, &budget_limit_yaml("tenant-daily", 10_000, 86_400));
    let port = engine.port;

    let status = engine.stop();
    assert!(status.success(), "SIGTERM should exit 0, got {status}");
    assert!(engine.log().contains("SIGTERM, stopping"));
    assert!(!engine.is_running());
    assert!(!engine.answers_http2(), "nothing listens while stopped");

    engine.start_again();
    assert_eq!(engine.port, port);
    assert!(engine.answers_http2(), "log:\n{}", engine.log());

    engine.kill();
    assert!(!engine.answers_http2(), "nothing listens after SIGKILL");
    engine.start_again();
    assert!(engine.answers_http2(), "log:\n{}", engine.log());
}

#[test]
fn the_budget_limit_yaml_is_a_valid_limitador_limits_file() {
    let engine = rls_engine_binary();
    let dir = std::env::temp_dir().join(format!("tokenfuse-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("limits.yaml");
    let yaml = budget_limit_yaml("tenant-daily", 10_000, 86_400)
        + &budget_limit_yaml("tenant-minute", 1_000, 60);
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(engine)
        .arg("--validate")
        .arg("--limits")
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("2 limit(s), valid\n"));
}

#[test]
fn envoy_accepts_the_engine_cluster() {
    let redis = Redis::start();
    let engine = RlsEngine::start(&redis, &budget_limit_yaml("tenant-daily", 10_000, 86_400));
    let envoy = Envoy::start(EnvoySpec {
        no_filter: true,
        extra_clusters_yaml: Some(engine.envoy_cluster_yaml("rate_limit_service")),
        ..EnvoySpec::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let clusters = envoy.admin_get("/clusters");
    assert!(
        clusters.contains(&format!("rate_limit_service::127.0.0.1:{}::", engine.port)),
        "{clusters}"
    );
}
