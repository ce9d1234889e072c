//! The official OpenAI and Anthropic Python SDKs against tokenfuse in a real Envoy: each
//! API's refusals raise that SDK's own exception classes (a spent budget is a
//! `RateLimitError`, an oversize request a `BadRequestError`), and a refusal that says
//! waiting will not help (`x-should-retry: false`) is not retried.
//!
//! The SDKs come from PyPI into the repository's `.venv` (`make sdk-clients`, part of
//! `make test`); the script they run is `tests/sdk/clients.py`.

// Test code: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;

use serde_json::{json, Value};
use support::envoy::repo_root;
use support::stack::Stack;

#[test]
fn each_sdk_raises_its_own_exceptions_for_tokenfuse_refusals() {
    let python = repo_root().join(".venv/bin/python");
    let probe = Command::new(&python)
        .args(["-c", "import anthropic, openai"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the SDKs are missing from {}: run `make sdk-clients`",
        python.display()
    );
    let s = Stack::start(
        &json!({
            "api": "v1",
            "budgets": [{"name": "day", "key": "header:x-tenant", "window": "day", "base": 100000,
                         "base_overrides": {"spent": 0}, "max_request_tokens": 50}],
        })
        .to_string(),
    );
    let out = Command::new(&python)
        .arg(repo_root().join("tests/sdk/clients.py"))
        .arg(s.envoy.listener_port.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "clients.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let case = |name: &str| &got[name];
    for (name, class, status, error_type) in [
        ("anthropic_spent", "RateLimitError", 429, "rate_limit_error"),
        (
            "anthropic_oversize",
            "BadRequestError",
            400,
            "invalid_request_error",
        ),
        ("openai_spent", "RateLimitError", 429, ""),
        ("openai_oversize", "BadRequestError", 400, ""),
    ] {
        let c = case(name);
        assert_eq!(c["raised"], class, "{name}: {c}");
        assert_eq!(c["status"], status, "{name}: {c}");
        if name.starts_with("anthropic") {
            assert_eq!(c["type"], "error", "{name}: {c}");
            assert_eq!(c["error_type"], error_type, "{name}: {c}");
        }
    }
    assert_eq!(case("anthropic_ok")["raised"], "ok", "{got}");
    assert_eq!(case("openai_ok")["raised"], "ok", "{got}");
    // The spent tenant's refusals say waiting will not help (the day's reset is hours
    // away): the SDKs did not retry them. Each refused request reached the filter once.
    let refused = support::stack::counter_sum(
        &s.envoy,
        &["tokenfuse_decisions", "decision=.=rejected;"],
        2,
    );
    assert_eq!(refused, 2, "the spent tenant's requests were retried");
}

#[test]
fn each_sdk_parses_the_streams_the_cache_serves() {
    let python = repo_root().join(".venv/bin/python");
    let s = Stack::start(
        &json!({
            "api": "v1",
            "cache": {"ttl_secs": 300},
            "budgets": [{"name": "day", "key": "header:x-tenant", "window": "day", "base": 100000}],
        })
        .to_string(),
    );
    let out = Command::new(&python)
        .arg(repo_root().join("tests/sdk/cache.py"))
        .arg(s.envoy.listener_port.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cache.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (case, marker) in [
        ("openai_chat", "sdk cache chat"),
        ("openai_responses", "sdk cache responses"),
        ("anthropic_messages", "sdk cache anthropic"),
    ] {
        let texts = got[case]["texts"]
            .as_array()
            .unwrap_or_else(|| panic!("{case}: {}", got[case]));
        assert_eq!(texts.len(), 3, "{case}: {texts:?}");
        assert!(
            texts[0].as_str().is_some_and(|t| !t.is_empty()),
            "{case}: {texts:?}"
        );
        assert!(texts.iter().all(|t| t == &texts[0]), "{case}: {texts:?}");
        // The second and third were answered by the filter: one upstream call.
        let calls = s
            .primary
            .requests()
            .iter()
            .filter(|r| String::from_utf8_lossy(&r.body).contains(marker))
            .count();
        assert_eq!(calls, 1, "{case}: {calls} upstream calls");
    }
}
