//! Global budgets through the built `tokenfuse.wasm` in a real Envoy: the rate limit
//! service protocol against a real engine (Limitador's counter library over Redis, served by
//! `tools/rls-engine`), two proxies sharing one budget, and the service failing.

// Test code: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::envoy::EnvoySpec;
use support::stack::{counter_sum, Stack};

/// An HTTP/2 cluster `rls` at `port` (the rate limit service must be spoken to in HTTP/2).
fn rls_cluster(name: &str, port: u16) -> String {
    format!(
        r#"- name: {name}
  type: STATIC
  connect_timeout: 1s
  typed_extension_protocol_options:
    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
      "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
      explicit_http_config:
        http2_protocol_options: {{}}
  load_assignment:
    cluster_name: {name}
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"#
    )
}

fn global_config(cluster: &str, on_failure: &str) -> String {
    json!({
        "api": "v1",
        "rate_limit_service": {"cluster": cluster, "domain": "tokenfuse", "timeout_ms": 300,
                               "on_failure": on_failure},
        "budgets": [{"name": "daily", "key": "header:x-tenant", "backend": "global"}],
    })
    .to_string()
}

fn chat(max_tokens: u64) -> String {
    json!({"model": "gpt-4o", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hello there"}]})
    .to_string()
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn an_unreachable_service_applies_the_failure_mode_quickly_and_is_counted() {
    let port = closed_port();
    for (mode, want) in [("closed", 503), ("open", 200)] {
        let stack = Stack::start_with(&global_config("rls", mode), |spec| EnvoySpec {
            extra_clusters_yaml: Some(rls_cluster("rls", port)),
            ..spec
        });
        for i in 0..3 {
            let started = Instant::now();
            let r = stack
                .envoy
                .post_json("/v1/chat/completions", &[("x-tenant", "acme")], &chat(20))
                .unwrap();
            let took = started.elapsed();
            assert_eq!(r.status, want, "{mode} #{i}: {}", r.text());
            assert!(
                took < Duration::from_secs(3),
                "{mode}: took {took:?}; the 300 ms timeout must bound the wait"
            );
            if want == 503 {
                assert_eq!(r.json()["error"]["code"], "budget_service_unavailable");
            }
        }
        let errors = counter_sum(
            &stack.envoy,
            &["tokenfuse_global_errors", "budget=.=daily;"],
            3,
        );
        assert_eq!(errors, 3, "{mode}");
        if mode == "open" {
            assert_eq!(
                counter_sum(&stack.envoy, &["tokenfuse_fail_open", "budget=.=daily"], 3),
                3
            );
        }
        assert!(stack.envoy.alive());
    }
}

#[test]
fn an_unknown_service_cluster_fails_the_request_not_the_vm() {
    let stack = Stack::start(&global_config("no-such-cluster", "closed"));
    for _ in 0..3 {
        let r = stack
            .envoy
            .post_json("/v1/chat/completions", &[("x-tenant", "acme")], &chat(20))
            .unwrap();
        assert_eq!(r.status, 503, "{}", r.text());
    }
    assert_eq!(
        counter_sum(
            &stack.envoy,
            &["tokenfuse_global_errors", "reason=.=dispatch"],
            3
        ),
        3
    );
    // The VM still serves: a non-LLM request and an LLM one both get answers.
    let r = stack.envoy.get("/healthz", &[]).unwrap();
    assert_eq!(r.status, 200);
    assert!(stack.envoy.alive());
}
