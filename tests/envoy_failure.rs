//! When a VM fails anyway: what Envoy's failure policy does with a tokenfuse module that
//! panics, measured in a real Envoy.
//!
//! The module under test is built with `--features fault-injection` (`make cargo-test` puts
//! it in `target/fault/…`, `$TOKENFUSE_FAULT_WASM`): `x-tokenfuse-fault: panic` panics its
//! VM the way a bug would. The shipped configs use `FAIL_RELOAD`: the failed VM is replaced
//! on the next request after Envoy's reload backoff (1 s base), and because budgets live in
//! shared data — process-wide, outside any VM — they survive the reload. `FAIL_CLOSED`
//! answers 503 to every request on that worker until Envoy restarts. Both are pinned here,
//! with the log line a panic leaves (location only, never the message).

// Test code: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use support::envoy::EnvoySpec;
use support::http;
use support::stack::Stack;

const ADMIN_TOKEN: &str = "failure-admin-token-0123456789";

fn fault_wasm() -> PathBuf {
    let path = std::env::var_os("TOKENFUSE_FAULT_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            support::envoy::repo_root().join("target/fault/wasm32-wasip1/release/tokenfuse.wasm")
        });
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --release --target wasm32-wasip1 \
         --features fault-injection --target-dir target/fault` (make cargo-test does)",
        path.display()
    );
    path
}

/// One worker, so the request that panics and the ones after it meet the same VM.
fn start(policy: &str) -> Stack {
    let config = json!({
        "api": "v1",
        "budgets": [{"name": "day", "key": "header:x-tenant", "window": "day", "base": 100000}],
        "admin": {"path": "/tokenfuse/admin", "token": ADMIN_TOKEN},
    });
    Stack::start_with(&config.to_string(), |spec| EnvoySpec {
        wasm: Some(fault_wasm()),
        failure_policy: policy.to_string(),
        concurrency: 1,
        ..spec
    })
}

fn ask(s: &Stack, headers: &[(&str, &str)]) -> http::Response {
    let body = json!({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    s.envoy
        .post_json("/v1/chat/completions", headers, &body.to_string())
        .unwrap()
}

fn used(s: &Stack, tenant: &str) -> u64 {
    let r = http::get(
        s.envoy.listener_port,
        &format!("/tokenfuse/admin?budget=day&key={tenant}"),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["budgets"][0]["used"].as_u64().unwrap()
}

/// Poll until a request passes the filter again; how long that took.
fn recovery(s: &Stack, give_up: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < give_up {
        let r = ask(s, &[("x-tenant", "after")]);
        if r.status == 200 && r.header("x-tokenfuse-prompt-tokens").is_some() {
            return Some(start.elapsed());
        }
        assert_eq!(r.status, 503, "{}", r.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn panic_the_vm(s: &Stack) {
    let r = ask(s, &[("x-tenant", "boom"), ("x-tokenfuse-fault", "panic")]);
    assert_eq!(r.status, 503, "{}", r.text());
    let log = s.envoy.log();
    assert!(
        log.contains("tokenfuse panicked at src/proxy/mod.rs:"),
        "no panic line in the log"
    );
    assert!(
        !log.contains("fault injected"),
        "the panic message reached the log"
    );
}

#[test]
fn under_fail_reload_a_failed_vm_is_replaced_within_seconds_and_budgets_survive() {
    let s = start("FAIL_RELOAD");
    assert_eq!(ask(&s, &[("x-tenant", "kept")]).status, 200);
    assert_eq!(used(&s, "kept"), 18);
    panic_the_vm(&s);
    let took = recovery(&s, Duration::from_secs(20)).expect("the VM was never reloaded");
    // Envoy's default reload backoff is 1 s; measured here: 1.0–1.6 s.
    eprintln!(
        "FAIL_RELOAD: serving again {} ms after the panic",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Shared data outlives the VM: the account is as it was.
    assert_eq!(used(&s, "kept"), 18);
    assert!(s.envoy.counter("wasm.tokenfuse.vm_reload_success") >= 1);
    let prometheus = s.envoy.prometheus();
    assert!(
        prometheus.contains("envoy_wasm_tokenfuse_vm_reload_success"),
        "the reload counter the alert rules read is not in the scrape"
    );
}

#[test]
fn under_fail_closed_a_failed_vm_answers_503_until_envoy_restarts() {
    let s = start("FAIL_CLOSED");
    assert_eq!(ask(&s, &[("x-tenant", "kept")]).status, 200);
    panic_the_vm(&s);
    assert_eq!(recovery(&s, Duration::from_secs(3)), None);
}
