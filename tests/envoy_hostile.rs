//! Hostile input, faults and secrecy, through the built `tokenfuse.wasm` in a real Envoy.
//!
//! Every case has a documented outcome (docs/security.md, "Bad input"): a clear error, or pass-through
//! under the configured policy — and afterwards the VMs still serve and count. Budgets are
//! on, so each fault also checks that the reservation was settled correctly, read back
//! through the admin endpoint.

// Test code: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::envoy::{Envoy, EnvoySpec};
use support::http;
use support::mock_upstream::MockUpstream;
use support::stack::{bearer_key, text_tokens, Stack};
use tokenfuse::tokenizer::Encoding;

const ADMIN_TOKEN: &str = "hostile-admin-token-0123456789";

fn config() -> String {
    json!({
        "api": "v1",
        "budgets": [{"name": "day", "key": "header:x-tenant", "window": "day", "base": 1_000_000}],
        "admin": {"path": "/tokenfuse/admin", "token": ADMIN_TOKEN},
    })
    .to_string()
}

fn start(config: &str, extra_args: &[&str], route_timeout_secs: u32) -> Stack {
    Stack::start_with(config, |spec| EnvoySpec {
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        route_timeout_secs,
        ..spec
    })
}

fn shared() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    // Trace-level filter logs, so the secrecy test sees every line the filter can write;
    // a 3 s route timeout for the slow-upstream test.
    STACK.get_or_init(|| start(&config(), &["--component-log-level", "wasm:trace"], 3))
}

fn chat(content: &str) -> String {
    json!({"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

/// The budget `day` usage of `tenant`, polled until it equals `want` (settlement lands
/// when Envoy ends the stream) or 5 s pass.
fn used(envoy: &Envoy, tenant: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = http::get(
            envoy.listener_port,
            &format!("/tokenfuse/admin?key={tenant}&budget=day"),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let used = r.json()["budgets"][0]["used"].as_u64().unwrap();
        if used == want || Instant::now() > deadline {
            return used;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VMs still answer and count an ordinary request.
fn assert_alive(s: &Stack) {
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[("x-tenant", "alive-check")],
            &chat("hello"),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tokenfuse-prompt-tokens"), Some("8"));
    let log = s.envoy.log();
    for bad in [
        "panicked",
        "Wasm VM failed",
        "Function: proxy_on",
        "failed to load",
    ] {
        assert!(!log.contains(bad), "VM trouble in the Envoy log: {bad}");
    }
}

fn post_raw(s: &Stack, headers: &[(&str, &str)], body: &[u8]) -> http::Response {
    http::request(
        s.envoy.listener_port,
        "POST",
        "/v1/chat/completions",
        headers,
        body,
    )
    .unwrap()
}

#[test]
fn deeply_nested_json_is_refused_without_exhausting_the_vm() {
    let s = shared();
    let depth = 100_000;
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // Where the filter reads the value (a tool definition is counted from its JSON), nesting
    // past 127 levels is invalid JSON, as serde_json has it.
    let tools = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}],"tools":{nested}}}"#
    );
    // Where an array stands for a content part (an object), it is the wrong shape.
    let content =
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":{nested}}}]}}"#);
    for (body, code) in [(tools, "invalid_json"), (content, "invalid_request_shape")] {
        let r = post_raw(
            s,
            &[("content-type", "application/json"), ("x-tenant", "nested")],
            body.as_bytes(),
        );
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], code);
        assert_alive(s);
    }
    // In a field the filter skips, nesting costs nothing and is not its business: the
    // request is counted and forwarded (the mock upstream's own JSON parser then refuses it).
    let skipped = format!(
        r#"{{"model":"gpt-4o","max_tokens":1,"messages":[{{"role":"user","content":"hi"}}],"metadata":{nested}}}"#
    );
    let r = post_raw(
        s,
        &[("content-type", "application/json"), ("x-tenant", "nested")],
        skipped.as_bytes(),
    );
    assert!(r.text().contains("mock:"), "{}", r.text());
    assert!(
        r.header("x-tokenfuse-prompt-tokens").is_some(),
        "{:?}",
        r.headers
    );
    assert_alive(s);
}

#[test]
fn a_huge_messages_array_is_counted_exactly() {
    let s = shared();
    let messages: Vec<Value> = (0..50_000)
        .map(|i| json!({"role": "user", "content": format!("m{i}")}))
        .collect();
    let body = json!({"model": "gpt-4o", "max_tokens": 1, "messages": messages}).to_string();
    assert!(body.len() > 1_500_000);
    let r = s
        .envoy
        .post_json("/v1/chat/completions", &[("x-tenant", "huge")], &body)
        .unwrap();
    assert_eq!(r.status, 200);
    // 3 framing + the role + the content per message, 3 to prime the reply.
    let expected: u64 = (0..50_000)
        .map(|i| 3 + o200k("user") + o200k(&format!("m{i}")))
        .sum::<u64>()
        + 3;
    let prompt: u64 = r
        .header("x-tokenfuse-prompt-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(prompt, expected);
    assert_alive(s);
}

#[test]
fn a_million_spaces_in_a_prompt_are_counted_and_the_vm_survives() {
    // tiktoken-rs, the previous counter, panicked on a white-space run this long (its regex
    // engine gives up), which killed the VM: 503 for this and every later request.
    let s = shared();
    let content = format!("{}x", " ".repeat(1_000_000));
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[("x-tenant", "spaces")],
            &chat(&content),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let prompt: u64 = r
        .header("x-tokenfuse-prompt-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(prompt, 3 + o200k("user") + o200k(&content) + 3);
    assert_alive(s);
}

#[test]
fn a_body_over_the_buffer_limit_gets_413_from_envoy() {
    let s = shared();
    let body = chat(&"x ".repeat(3 * 1024 * 1024)); // 6 MiB, over the 4 MiB limit
    let r = s
        .envoy
        .post_json("/v1/chat/completions", &[("x-tenant", "big-body")], &body)
        .unwrap();
    assert_eq!(r.status, 413);
    assert!(s
        .primary
        .requests()
        .iter()
        .all(|q| q.header("x-tenant") != Some("big-body")));
    assert_alive(s);
}

#[test]
fn content_type_is_not_trusted_the_body_decides() {
    let s = shared();
    // JSON sent as text/plain is still an LLM request and is counted.
    let r = post_raw(
        s,
        &[("content-type", "text/plain"), ("x-tenant", "ctype")],
        chat("hello").as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tokenfuse-prompt-tokens"), Some("8"));
    // A form-encoded body on an LLM path is not JSON: refused.
    let r = post_raw(
        s,
        &[("content-type", "application/x-www-form-urlencoded")],
        b"model=gpt-4o&messages=hi",
    );
    assert_eq!(r.status, 400);
    assert_alive(s);
}

#[test]
fn a_gzip_encoded_request_body_is_refused_with_415() {
    let s = shared();
    let r = post_raw(
        s,
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00",
    );
    assert_eq!(r.status, 415);
    assert_eq!(r.json()["error"]["code"], "unsupported_content_encoding");
    assert_alive(s);
}

#[test]
fn absurd_max_tokens_reserves_saturated_and_is_refused_by_the_budget() {
    let s = shared();
    let body = json!({"model": "gpt-4o", "max_tokens": 9_000_000_000_000_000_000u64, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let r = s
        .envoy
        .post_json("/v1/chat/completions", &[("x-tenant", "absurd")], &body)
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let body = json!({"model": "gpt-4o", "max_tokens": 1e300, "messages": []}).to_string();
    let r = s
        .envoy
        .post_json("/v1/chat/completions", &[("x-tenant", "absurd")], &body)
        .unwrap();
    assert_eq!(r.status, 400, "a float is not a token count");
    assert_eq!(used(&s.envoy, "absurd", 0), 0);
    assert_alive(s);
}

#[test]
fn garbage_sse_lines_are_ignored_and_the_stream_is_delivered_whole() {
    // The mock cannot emit garbage, so put a tiny raw upstream in front of a one-off Envoy.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stream: &'static str = concat!(
        ": comment\n",
        "garbage without colon\n",
        "data: {not json}\n\n",
        "event: weird\nretry: abc\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tiktoken is great!\"}}]}\n\n",
        "data: \u{1}\u{2}binary\n\n",
    );
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 65536];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
            let _ = conn.write_all(head.as_bytes());
            for piece in stream.as_bytes().chunks(7) {
                let _ = conn.write_all(format!("{:x}\r\n", piece.len()).as_bytes());
                let _ = conn.write_all(piece);
                let _ = conn.write_all(b"\r\n");
            }
            let _ = conn.write_all(b"0\r\n\r\n");
        }
    });
    let spec = EnvoySpec::new(config(), port, port);
    let envoy = Envoy::start(spec).unwrap();
    let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let r = envoy
        .post_json("/v1/chat/completions", &[("x-tenant", "garbage")], &body)
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), stream, "the client gets the stream byte for byte");
    // Charged: prompt 8 + "tiktoken is great!" (6), counted; the garbage is a parse failure.
    assert_eq!(used(&envoy, "garbage", 14), 14);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !envoy
        .stats_text()
        .lines()
        .any(|l| l.contains("tokenfuse_parse_failures") && l.contains("reason=.=sse_event;"))
    {
        assert!(
            Instant::now() < deadline,
            "no sse_event parse failure counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stream_without_done_or_usage_is_charged_what_it_streamed() {
    let s = shared();
    let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[
                ("x-tenant", "no-done"),
                ("x-mock-no-done", "1"),
                ("x-mock-usage", "absent"),
            ],
            &body,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("[DONE]"));
    // The prompt (8) plus the mock's default answer, counted.
    let want = 8 + o200k("Hello! How can I help you today?");
    assert_eq!(used(&s.envoy, "no-done", want), want);
}

#[test]
fn a_slow_upstream_past_the_route_timeout_refunds_everything() {
    let s = shared();
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[("x-tenant", "slow"), ("x-mock-delay-ms", "4500")],
            &chat("hi"),
        )
        .unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(used(&s.envoy, "slow", 0), 0);
}

#[test]
fn upstream_reset_mid_stream_is_charged_for_what_arrived() {
    let s = shared();
    let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let _ = s.envoy.post_json(
        "/v1/chat/completions",
        &[("x-tenant", "reset"), ("x-mock-cut-after", "400")],
        &body,
    );
    let charged = used(&s.envoy, "reset", u64::MAX);
    assert!(
        charged > 8 && charged < 8 + 50,
        "prompt plus part of the answer, not the reservation: {charged}"
    );
}

#[test]
fn nothing_secret_reaches_the_log_at_trace_level() {
    let s = shared();
    let secret_prompt = "PROMPT-SECRET-7f3a9c";
    let secret_key = "sk-live-KEY-SECRET-91b2";
    let secret_completion = "COMPLETION-SECRET-4d5e";
    let b64 = base64_encode(secret_completion.as_bytes());
    // Successful JSON and streamed exchanges, a malformed body quoting the secret, a 429
    // and an admin request with a wrong token.
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[
                ("x-tenant", "secrets"),
                ("authorization", &format!("Bearer {secret_key}")),
                ("x-mock-completion", &format!("b64:{b64}")),
            ],
            &chat(secret_prompt),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let body = json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": secret_prompt}]}).to_string();
    s.envoy
        .post_json(
            "/v1/chat/completions",
            &[
                ("x-tenant", "secrets"),
                ("x-mock-usage", "absent"),
                ("x-mock-completion", &format!("b64:{b64}")),
            ],
            &body,
        )
        .unwrap();
    let bad = format!(r#"{{"model":"gpt-4o","messages":"{secret_prompt}""#);
    post_raw(
        s,
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {secret_key}")),
        ],
        bad.as_bytes(),
    );
    let bad = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{secret_prompt}"}}],"max_tokens":"{secret_key}"}}"#
    );
    post_raw(s, &[("content-type", "application/json")], bad.as_bytes());
    http::get(
        s.envoy.listener_port,
        "/tokenfuse/admin?key=secrets",
        &[("authorization", &format!("Bearer {secret_key}"))],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let log = s.envoy.log();
    assert!(
        log.contains("wasm log"),
        "the filter's own lines are in the log"
    );
    for secret in [secret_prompt, secret_key, secret_completion, ADMIN_TOKEN] {
        assert!(!log.contains(secret), "{secret} leaked into the Envoy log");
    }
}

#[test]
fn a_client_cannot_pick_its_tenant_or_priority_when_they_come_from_elsewhere() {
    // Budgets keyed by the API key; no priority header configured.
    let config = json!({
        "api": "v1",
        "budgets": [{"name": "day", "key": "bearer", "window": "day", "base": 100}],
        "admin": {"path": "/tokenfuse/admin", "token": ADMIN_TOKEN},
    })
    .to_string();
    let s = start(&config, &[], 60);
    let ask = |max_tokens: u64, headers: &[(&str, &str)]| {
        let body = json!({"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello"}]}).to_string();
        s.envoy
            .post_json("/v1/chat/completions", headers, &body)
            .unwrap()
    };
    // 8 + 85 = 93 tokens: over the 90 a p1 request may use. Claiming p0 does not help,
    // because no priority header is trusted.
    let r = ask(
        85,
        &[
            ("authorization", "Bearer sk-client-one"),
            ("x-tokenfuse-priority", "p0"),
        ],
    );
    assert_eq!(r.status, 429, "{}", r.text());
    // Naming another tenant does not move the charge: the key comes from the credential.
    let r = ask(
        40,
        &[
            ("authorization", "Bearer sk-client-one"),
            ("x-tenant", "someone-else"),
        ],
    );
    assert_eq!(r.status, 200);
    let r = ask(40, &[("authorization", "Bearer sk-client-two")]);
    assert_eq!(r.status, 200);
    let key = bearer_key;
    assert_eq!(used(&s.envoy, &key("sk-client-one"), 18), 18);
    assert_eq!(used(&s.envoy, &key("sk-client-two"), 18), 18);
    assert_eq!(used(&s.envoy, "someone-else", 0), 0);
}

fn o200k(text: &str) -> u64 {
    text_tokens(Encoding::O200kBase, text)
}

/// Standard base64, for the mock's `b64:` control header values.
fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn an_envoy_restart_starts_every_local_budget_from_zero() {
    // Shared data lives in the Envoy process: a new process (restart, or a hot restart
    // into a new process) has empty budgets. This pins the documented behaviour.
    let primary = MockUpstream::start("primary").unwrap();
    let spec = || EnvoySpec::new(config(), primary.port(), primary.port());
    let first = Envoy::start(spec()).unwrap();
    let r = first
        .post_json(
            "/v1/chat/completions",
            &[("x-tenant", "restart")],
            &chat("hello"),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(used(&first, "restart", 18), 18);
    drop(first);
    let second = Envoy::start(spec()).unwrap();
    assert_eq!(used(&second, "restart", 0), 0);
}
