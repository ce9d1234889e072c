//! The response cache and coalescing end to end: the built `tokenfuse.wasm` in a real Envoy
//! (2 workers: the cache lives in shared data both VMs read and write) in front of the mock
//! upstream, which records every request it serves — so "one upstream call" is counted at
//! the upstream, not inferred from the filter's stats.
//!
//! Every test sends bodies with a marker of its own, so tests sharing a stack never share
//! an answer; the upstream calls of a test are the recorded requests carrying its marker.

// Test code: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::{Arc, Barrier, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use support::http;
use support::stack::{counter_sum, Stack};

const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";
const RESPONSES: &str = "/v1/responses";

/// The stack most tests share: the cache on (per tenant, deterministic requests), a day
/// budget per tenant.
fn main_stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let config = json!({
            "api": "v1",
            "cache": {"ttl_secs": 300, "coalesce_wait_ms": 10_000},
            "budgets": [{"name": "tenant-day", "key": "header:x-tenant", "window": "day",
                         "base": 1_000_000}],
            "admin": {"path": "/tokenfuse/admin", "token": "cache-tests-admin-token-0123"}
        });
        Stack::start(&config.to_string())
    })
}

/// A cache of 2-second answers, 16 entries, 8 KiB in all.
fn small_stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let config = json!({
            "api": "v1",
            "cache": {"scope": "shared", "ttl_secs": 2, "max_entries": 16,
                      "max_entry_bytes": 4096, "max_bytes": 8192}
        });
        Stack::start(&config.to_string())
    })
}

fn chat_body(marker: &str, stream: bool) -> String {
    json!({"model": "gpt-4o", "temperature": 0, "stream": stream,
           "messages": [{"role": "user", "content": format!("cache test {marker}")}]})
    .to_string()
}

/// Upstream calls whose body carries `marker`.
fn calls(s: &Stack, marker: &str) -> usize {
    s.primary
        .requests()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains(marker))
        .count()
}

fn post(s: &Stack, path: &str, headers: &[(&str, &str)], body: &str) -> http::Response {
    s.envoy.post_json(path, headers, body).unwrap()
}

fn cache_header(r: &http::Response) -> &str {
    r.header("x-tokenfuse-cache").unwrap_or("none")
}

/// The data lines of an event stream.
fn events(r: &http::Response) -> Vec<Value> {
    r.text()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

#[test]
fn a_repeated_request_makes_one_upstream_call_and_costs_nothing() {
    let s = main_stack();
    let tenant = [("x-tenant", "repeat")];
    let body = chat_body("repeat-json", false);
    let first = post(s, CHAT, &tenant, &body);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(cache_header(&first), "miss");
    // The answer is stored when Envoy ends the first stream, a moment after the client
    // read it.
    counter_sum(&s.envoy, &["cache_stores", "result=.=stored;"], 1);
    let before = counter_sum(&s.envoy, &["decisions", "decision=.=cache_hit;"], 0);
    for _ in 0..3 {
        let again = post(s, CHAT, &tenant, &body);
        assert_eq!(again.status, 200);
        assert_eq!(cache_header(&again), "hit");
        assert!(again.header("age").is_some());
        assert_eq!(again.json(), first.json());
        // A hit is not counted again: its prompt is what the provider billed for it.
        let billed_prompt = first.json()["usage"]["prompt_tokens"].to_string();
        assert_eq!(
            again.header("x-tokenfuse-prompt-tokens"),
            Some(billed_prompt.as_str())
        );
    }
    assert_eq!(calls(s, "repeat-json"), 1);
    assert!(
        counter_sum(
            &s.envoy,
            &["decisions", "decision=.=cache_hit;"],
            before + 3
        ) >= before + 3
    );
    // Charged once: the budget holds the first request's cost only.
    let standing = s
        .envoy
        .get(
            "/tokenfuse/admin?key=repeat&budget=tenant-day",
            &[("authorization", "Bearer cache-tests-admin-token-0123")],
        )
        .unwrap();
    assert_eq!(standing.status, 200, "{}", standing.text());
    let usage = first.json()["usage"].clone();
    let billed =
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        standing.json()["budgets"][0]["used"].as_u64(),
        Some(billed),
        "{}",
        standing.text()
    );
    // What the hits saved is counted.
    assert!(counter_sum(&s.envoy, &["cache_saved_tokens", "kind=.=completion;"], 3) >= 3);
}

#[test]
fn streamed_and_json_answers_serve_each_other() {
    let s = main_stack();
    let tenant = [("x-tenant", "shapes")];
    // Chat: streamed miss, then a JSON hit and a streamed hit with the usage chunk.
    let streamed = json!({"model": "gpt-4o", "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "cache test shapes-chat"}]})
    .to_string();
    let miss = post(s, CHAT, &tenant, &streamed);
    assert_eq!(cache_header(&miss), "miss");
    let text: String = events(&miss)
        .iter()
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    counter_sum(
        &s.envoy,
        &["cache_stores", "api=.=chat;", "result=.=stored;"],
        1,
    );
    let json_hit = post(
        s,
        CHAT,
        &tenant,
        &chat_body("shapes-chat", false).replace("\"stream\":false,", ""),
    );
    // (the body above has no stream_options: same key, `stream` is not part of it)
    assert_eq!(cache_header(&json_hit), "hit", "{}", json_hit.text());
    assert_eq!(
        json_hit.json()["choices"][0]["message"]["content"].as_str(),
        Some(text.as_str())
    );
    assert_eq!(json_hit.header("content-type"), Some("application/json"));
    let sse_hit = post(s, CHAT, &tenant, &streamed);
    assert_eq!(cache_header(&sse_hit), "hit");
    assert_eq!(sse_hit.header("content-type"), Some("text/event-stream"));
    assert!(sse_hit.text().ends_with("data: [DONE]\n\n"));
    let hit_events = events(&sse_hit);
    assert!(hit_events
        .iter()
        .any(|e| e["usage"]["completion_tokens"].is_u64()));
    assert_eq!(calls(s, "shapes-chat"), 1);

    // Anthropic: JSON miss, streamed hit.
    let anthropic = |stream: bool| {
        json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "temperature": 0, "stream": stream,
               "messages": [{"role": "user", "content": "cache test shapes-anthropic"}]})
        .to_string()
    };
    let miss = post(s, MESSAGES, &tenant, &anthropic(false));
    assert_eq!(cache_header(&miss), "miss", "{}", miss.text());
    counter_sum(
        &s.envoy,
        &["cache_stores", "api=.=anthropic;", "result=.=stored;"],
        1,
    );
    let hit = post(s, MESSAGES, &tenant, &anthropic(true));
    assert_eq!(cache_header(&hit), "hit");
    let evs = events(&hit);
    let kinds: Vec<&str> = evs.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"message_start"));
    assert_eq!(kinds.last(), Some(&"message_stop"));
    let text: String = evs
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(
        Some(text.as_str()),
        miss.json()["content"][0]["text"].as_str()
    );
    assert_eq!(calls(s, "shapes-anthropic"), 1);

    // Responses: streamed miss, JSON hit.
    let responses = |stream: bool| {
        json!({"model": "gpt-4o", "temperature": 0, "stream": stream,
               "input": "cache test shapes-responses"})
        .to_string()
    };
    let miss = post(s, RESPONSES, &tenant, &responses(true));
    assert_eq!(cache_header(&miss), "miss");
    counter_sum(
        &s.envoy,
        &["cache_stores", "api=.=responses;", "result=.=stored;"],
        1,
    );
    let hit = post(s, RESPONSES, &tenant, &responses(false));
    assert_eq!(cache_header(&hit), "hit", "{}", hit.text());
    assert_eq!(hit.json()["status"], "completed");
    assert!(hit.json()["output"][0]["content"][0]["text"].is_string());
    let sse = post(s, RESPONSES, &tenant, &responses(true));
    let kinds: Vec<String> = events(&sse)
        .iter()
        .filter_map(|e| e["type"].as_str().map(String::from))
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("response.created"));
    assert_eq!(kinds.last().map(String::as_str), Some("response.completed"));
    assert!(kinds.iter().any(|k| k == "response.output_text.delta"));
    assert_eq!(calls(s, "shapes-responses"), 1);
}

#[test]
fn answers_never_cross_tenants() {
    let s = main_stack();
    let body = chat_body("tenants", false);
    assert_eq!(
        cache_header(&post(s, CHAT, &[("x-tenant", "t-one")], &body)),
        "miss"
    );
    counter_sum(&s.envoy, &["cache_stores", "result=.=stored;"], 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cache_header(&post(s, CHAT, &[("x-tenant", "t-two")], &body)),
        "miss"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cache_header(&post(s, CHAT, &[("x-tenant", "t-one")], &body)),
        "hit"
    );
    assert_eq!(calls(s, "tenants"), 2);
}

#[test]
fn only_deterministic_or_opted_in_requests_are_cached() {
    let s = main_stack();
    let tenant = [("x-tenant", "policy")];
    let warm =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "cache test warm"}]})
            .to_string();
    for _ in 0..2 {
        let r = post(s, CHAT, &tenant, &warm);
        assert_eq!(cache_header(&r), "bypass");
    }
    assert_eq!(calls(s, "cache test warm"), 2);
    // The client opts in with max-age, and no-store keeps a deterministic one out.
    let opted = [("x-tenant", "policy"), ("cache-control", "max-age=600")];
    let optin = warm.replace("warm", "opt-in");
    assert_eq!(cache_header(&post(s, CHAT, &opted, &optin)), "miss");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cache_header(&post(s, CHAT, &opted, &optin)), "hit");
    let no_store = [("x-tenant", "policy"), ("cache-control", "no-store")];
    let body = chat_body("no-store", false);
    post(s, CHAT, &no_store, &body);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cache_header(&post(s, CHAT, &no_store, &body)), "bypass");
    assert_eq!(calls(s, "no-store"), 2);
}

#[test]
fn cut_streams_and_errors_are_never_stored() {
    let s = main_stack();
    let tenant = [("x-tenant", "broken")];
    let body = chat_body("broken-stream", true);
    // The client sees the stream cut (an error reading the chunked body).
    let cut = s.envoy.post_json(
        CHAT,
        &[("x-tenant", "broken"), ("x-mock-cut-after", "120")],
        &body,
    );
    assert!(cut.is_err() || cut.is_ok_and(|r| !r.text().contains("[DONE]")));
    std::thread::sleep(Duration::from_millis(300));
    let err = post(
        s,
        CHAT,
        &[("x-tenant", "broken"), ("x-mock-status", "500")],
        &body,
    );
    assert_eq!(err.status, 500);
    std::thread::sleep(Duration::from_millis(300));
    let ok = post(s, CHAT, &tenant, &body);
    assert_eq!(
        cache_header(&ok),
        "miss",
        "a cut or failed answer was served"
    );
    assert_eq!(calls(s, "broken-stream"), 3);
}

#[test]
fn fifty_identical_concurrent_requests_make_one_upstream_call() {
    let s = main_stack();
    let body = chat_body("fifty", false);
    let port = s.envoy.listener_port;
    let barrier = Arc::new(Barrier::new(50));
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let body = body.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                http::post_json(
                    port,
                    CHAT,
                    &[("x-tenant", "fifty"), ("x-mock-delay-ms", "1500")],
                    &body,
                )
                .unwrap()
            })
        })
        .collect();
    let answers: Vec<http::Response> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut by_kind = std::collections::BTreeMap::<String, usize>::new();
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["choices"], answers[0].json()["choices"]);
        *by_kind.entry(cache_header(a).to_string()).or_default() += 1;
    }
    assert_eq!(calls(s, "fifty"), 1, "answers by cache header: {by_kind:?}");
    assert_eq!(by_kind.get("miss"), Some(&1), "{by_kind:?}");
    // Both workers held waiters (the connections spread over them): each VM's coalesced
    // decisions are in the process-wide counter.
    assert!(
        by_kind.get("coalesced").copied().unwrap_or(0) >= 40,
        "{by_kind:?}"
    );
}

#[test]
fn waiters_go_upstream_themselves_when_the_first_fails() {
    let s = main_stack();
    let body = chat_body("first-fails", false);
    let port = s.envoy.listener_port;
    let first = {
        let body = body.clone();
        std::thread::spawn(move || {
            http::post_json(
                port,
                CHAT,
                &[
                    ("x-tenant", "fails"),
                    ("x-mock-delay-ms", "800"),
                    ("x-mock-status", "503"),
                ],
                &body,
            )
            .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let second = post(s, CHAT, &[("x-tenant", "fails")], &body);
    assert_eq!(first.join().unwrap().status, 503);
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(calls(s, "first-fails"), 2);
}

#[test]
fn answers_expire_and_the_store_stays_inside_its_bounds() {
    let s = small_stack();
    let body = chat_body("ttl", false);
    assert_eq!(cache_header(&post(s, CHAT, &[], &body)), "miss");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cache_header(&post(s, CHAT, &[], &body)), "hit");
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(cache_header(&post(s, CHAT, &[], &body)), "miss");
    assert_eq!(calls(s, "cache test ttl"), 2);
    // A flood of distinct answers of ~1.5 KB: at most 8 KiB are ever held.
    for i in 0..40 {
        let r = post(
            s,
            CHAT,
            &[("x-mock-repeat", "45")],
            &chat_body(&format!("flood {i}"), false),
        );
        assert_eq!(r.status, 200);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let held = s
        .envoy
        .stat("wasmcustom.tokenfuse_cache_bytes")
        .unwrap_or(0);
    assert!(held <= 8192, "cache holds {held} bytes");
    assert!(counter_sum(&s.envoy, &["cache_evictions"], 1) >= 1);
    // Answers over max_entry_bytes are refused, not truncated.
    let big = chat_body("too big", false);
    post(s, CHAT, &[("x-mock-repeat", "200")], &big);
    assert!(counter_sum(&s.envoy, &["cache_stores", "result=.=too_large;"], 1) >= 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cache_header(&post(s, CHAT, &[("x-mock-repeat", "200")], &big)),
        "miss"
    );
}
