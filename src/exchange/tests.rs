use super::*;
use crate::config::Config;
use crate::global::rls;
use crate::host::fake::FakeHost;
use crate::tokenizer::Encoding;

fn filter(config: &str) -> Rc<Filter> {
    Rc::new(Filter::new(Config::parse(config.as_bytes()).unwrap()).unwrap())
}

fn default_filter() -> Rc<Filter> {
    filter(r#"{"api":"v1"}"#)
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#;

/// Drive a request through headers and a body delivered in `split`-byte chunks.
fn send_request(ex: &mut Exchange, host: &mut FakeHost, split: usize) -> Action {
    let body = host.request_body.clone();
    let a = ex.on_request_headers(host, body.is_empty());
    if a == Action::Continue || host.reply.is_some() {
        return a;
    }
    let mut buffered = 0;
    let chunks: Vec<&[u8]> = body.chunks(split.max(1)).collect();
    for (i, c) in chunks.iter().enumerate() {
        buffered += c.len();
        let last = i + 1 == chunks.len();
        let a = ex.on_request_body(host, buffered, last);
        if last || host.reply.is_some() {
            return a;
        }
        assert_eq!(a, Action::Pause, "partial bodies must be buffered");
    }
    Action::Continue
}

fn respond(
    ex: &mut Exchange,
    host: &mut FakeHost,
    status: &str,
    content_type: &str,
    body: &[u8],
    split: usize,
) {
    host.response_headers = vec![
        (":status".into(), status.into()),
        ("content-type".into(), content_type.into()),
    ];
    assert_eq!(
        ex.on_response_headers(host, body.is_empty()),
        Action::Continue
    );
    let chunks: Vec<&[u8]> = body.chunks(split.max(1)).collect();
    for (i, c) in chunks.iter().enumerate() {
        host.response_chunk = c.to_vec();
        assert_eq!(
            ex.on_response_body(host, c.len(), i + 1 == chunks.len()),
            Action::Continue
        );
    }
    ex.on_done(host);
}

/// A 200 event stream of which `chunk` arrives, then the stream ends without its end of
/// stream (cut upstream or abandoned by the client).
fn respond_cut(ex: &mut Exchange, host: &mut FakeHost, chunk: &[u8]) {
    host.response_headers = vec![
        (":status".into(), "200".into()),
        ("content-type".into(), "text/event-stream".into()),
    ];
    ex.on_response_headers(host, false);
    host.response_chunk = chunk.to_vec();
    ex.on_response_body(host, chunk.len(), false);
    ex.on_done(host);
}

fn tokens(host: &FakeHost, kind: &str, source: &str) -> u64 {
    host.counter_sum(
        "tokenfuse_tokens",
        &[&format!("kind=.={kind};"), &format!("source=.={source};")],
    )
}

#[test]
fn non_llm_requests_pass_untouched_and_are_counted() {
    let f = default_filter();
    for (method, path) in [
        ("GET", "/v1/models"),
        ("GET", "/v1/chat/completions"),
        ("POST", "/upload"),
    ] {
        let mut host = FakeHost::post(path, b"{}");
        host.request_headers[0].1 = method.into();
        let before = host.request_headers.clone();
        let mut ex = Exchange::new(f.clone(), 1);
        assert_eq!(ex.on_request_headers(&mut host, false), Action::Continue);
        assert_eq!(ex.on_request_body(&mut host, 2, true), Action::Continue);
        host.response_headers = vec![(":status".into(), "200".into())];
        ex.on_response_headers(&mut host, true);
        assert_eq!(host.request_headers, before);
        assert!(host.resp_header(PROMPT_TOKENS_HEADER).is_none());
    }
    let mut host = FakeHost::post("/x", b"");
    host.request_headers[0].1 = "GET".into();
    Exchange::new(f, 2).on_request_headers(&mut host, true);
    assert_eq!(host.counter("tokenfuse_passthrough.reason=.=not_llm;.;"), 1);
}

#[test]
fn chat_request_is_held_until_its_body_is_complete_then_counted() {
    let f = default_filter();
    let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
    host.request_headers
        .push(("accept-encoding".into(), "gzip".into()));
    let mut ex = Exchange::new(f, 1);
    assert_eq!(ex.on_request_headers(&mut host, false), Action::Pause);
    assert!(host.req_header("accept-encoding").is_none());
    assert_eq!(ex.on_request_body(&mut host, 10, false), Action::Pause);
    assert_eq!(
        ex.on_request_body(&mut host, CHAT.len(), true),
        Action::Continue
    );
    respond(
        &mut ex,
        &mut host,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":3}}"#,
        7,
    );
    assert_eq!(host.resp_header(PROMPT_TOKENS_HEADER).as_deref(), Some("8"));
    assert_eq!(tokens(&host, "prompt", "provider"), 8);
    assert_eq!(tokens(&host, "completion", "provider"), 3);
    assert_eq!(
        host.counter_sum(
            "tokenfuse_requests",
            &["api=.=chat;", "model=.=gpt-4o;", "cluster=.=primary;"]
        ),
        1
    );
    assert_eq!(host.counter_sum("tokenfuse_request_prompt_tokens", &[]), 8);
    assert_eq!(host.counter_sum("tokenfuse_usage_counted", &[]), 0);
}

#[test]
fn json_response_without_usage_counts_the_generated_text() {
    let f = default_filter();
    let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut host, 5);
    respond(
        &mut ex,
        &mut host,
        "200",
        "application/json",
        br#"{"choices":[{"message":{"role":"assistant","content":"tiktoken is great!"}}]}"#,
        3,
    );
    assert_eq!(tokens(&host, "prompt", "counted"), 8);
    assert_eq!(tokens(&host, "completion", "counted"), 6);
    assert_eq!(host.counter_sum("tokenfuse_usage_counted", &[]), 1);
}

#[test]
fn sse_usage_is_read_at_every_chunk_size() {
    let f = default_filter();
    let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"日本語\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
    for split in 1..stream.len() {
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut host, 64);
        respond(
            &mut ex,
            &mut host,
            "200",
            "text/event-stream; charset=utf-8",
            stream.as_bytes(),
            split,
        );
        assert_eq!(tokens(&host, "completion", "provider"), 4, "split {split}");
        assert_eq!(
            host.counter_sum("tokenfuse_parse_failures", &[]),
            0,
            "split {split}"
        );
    }
}

#[test]
fn stream_usage_is_injected_with_a_fixed_content_length() {
    let f = filter(r#"{"api":"v1","inject_stream_usage":true}"#);
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
    let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut host, 1000);
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        host.req_header("content-length"),
        Some(host.request_body.len().to_string())
    );
}

#[test]
fn malformed_body_is_rejected_with_an_openai_error_by_default() {
    let f = default_filter();
    for (body, code) in [
        ("{\"model\":", "invalid_json"),
        ("{\"model\":\"gpt-4o\"}", "invalid_request_shape"),
        ("{\"messages\":[],\"max_tokens\":-1}", "invalid_value"),
    ] {
        let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut host, 4);
        let reply = host.reply.clone().expect("a local reply");
        assert_eq!(reply.status, 400);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], code);
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("tokenfuse: "));
    }
}

#[test]
fn empty_body_on_an_llm_path_is_rejected() {
    let f = default_filter();
    let mut host = FakeHost::post("/v1/chat/completions", b"");
    let mut ex = Exchange::new(f, 1);
    ex.on_request_headers(&mut host, true);
    assert_eq!(host.reply.as_ref().map(|r| r.status), Some(400));
    assert_eq!(
        host.counter("tokenfuse_parse_failures.stage=.=request;.;api=.=chat;.;reason=.=empty;.;"),
        1
    );
}

#[test]
fn malformed_body_passes_when_configured_to() {
    let f = filter(r#"{"api":"v1","malformed_request":"pass"}"#);
    let mut host = FakeHost::post("/v1/chat/completions", b"not json");
    let mut ex = Exchange::new(f, 1);
    assert_eq!(send_request(&mut ex, &mut host, 3), Action::Continue);
    assert!(host.reply.is_none());
    assert_eq!(host.request_body, b"not json");
    respond(&mut ex, &mut host, "400", "application/json", b"{}", 10);
    assert!(host.resp_header(PROMPT_TOKENS_HEADER).is_none());
    assert_eq!(
        host.counter("tokenfuse_passthrough.reason=.=malformed;.;"),
        1
    );
}

#[test]
fn compressed_request_body_is_refused_with_415() {
    let f = default_filter();
    let mut host = FakeHost::post("/v1/chat/completions", b"\x1f\x8b...");
    host.request_headers
        .push(("content-encoding".into(), "gzip".into()));
    let mut ex = Exchange::new(f, 1);
    ex.on_request_headers(&mut host, false);
    assert_eq!(host.reply.as_ref().map(|r| r.status), Some(415));
}

#[test]
fn upstream_errors_bill_nothing() {
    let f = default_filter();
    let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut host, 100);
    respond(
        &mut ex,
        &mut host,
        "503",
        "application/json",
        br#"{"error":{"message":"overloaded"}}"#,
        100,
    );
    assert_eq!(host.counter_sum("tokenfuse_tokens", &[]), 0);
    assert_eq!(
        host.counter_sum("tokenfuse_upstream_errors", &["status=.=5xx;"]),
        1
    );
    assert_eq!(host.resp_header(PROMPT_TOKENS_HEADER).as_deref(), Some("8"));
}

#[test]
fn cut_stream_is_settled_once_with_what_was_streamed() {
    let f = default_filter();
    let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut host, 100);
    respond_cut(
            &mut ex,
            &mut host,
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tiktoken is great!\"}}]}\n\ndata: {\"cho",
        );
    ex.on_done(&mut host);
    assert_eq!(tokens(&host, "completion", "counted"), 6);
    assert_eq!(host.counter_sum("tokenfuse_requests", &[]), 1);
    assert_eq!(host.counter_sum("tokenfuse_responses_incomplete", &[]), 1);
}

#[test]
fn a_stream_cut_after_its_first_usage_is_charged_at_least_what_it_streamed() {
    let f = default_filter();
    let body = r#"{"model":"claude-sonnet-4","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut host = FakeHost::post("/v1/messages", body.as_bytes());
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut host, 100);
    // message_start says 1 output token (its placeholder); the text that follows is more;
    // the stream is cut before message_delta brings the final count.
    respond_cut(
            &mut ex,
            &mut host,
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"tiktoken is great!\"}}\n\n",
        );
    assert_eq!(tokens(&host, "prompt", "provider"), 12);
    assert_eq!(tokens(&host, "completion", "provider"), 6);
    assert_eq!(host.counter_sum("tokenfuse_responses_incomplete", &[]), 1);
}

#[test]
fn oversized_json_response_is_a_parse_failure_not_a_buffer() {
    let f = filter(r#"{"api":"v1","max_response_body_bytes":1024}"#);
    let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut host, 100);
    let big = format!(
        "{{\"x\":\"{}\",\"usage\":{{\"prompt_tokens\":1}}}}",
        "a".repeat(4000)
    );
    respond(
        &mut ex,
        &mut host,
        "200",
        "application/json",
        big.as_bytes(),
        500,
    );
    assert_eq!(
        host.counter_sum("tokenfuse_parse_failures", &["reason=.=too_large;"]),
        1
    );
    assert_eq!(tokens(&host, "prompt", "counted"), 8);
}

#[test]
fn model_from_azure_deployment_when_body_has_none() {
    let f = default_filter();
    let body = r#"{"messages":[{"role":"user","content":"hello"}]}"#;
    let mut host = FakeHost::post(
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        body.as_bytes(),
    );
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut host, 100);
    respond(
        &mut ex,
        &mut host,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":1}}"#,
        100,
    );
    assert_eq!(
        host.counter_sum("tokenfuse_requests", &["model=.=gpt-4o;"]),
        1
    );
}

#[test]
fn logs_never_contain_prompt_or_completion_text() {
    let f = default_filter();
    let body =
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"SECRET-PROMPT sk-live-123"}]}"#;
    let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut host, 100);
    respond(
        &mut ex,
        &mut host,
        "200",
        "text/event-stream",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"SECRET-COMPLETION\"}}]}\n\n",
        9,
    );
    let mut bad = FakeHost::post(
        "/v1/chat/completions",
        br#"{"model":"gpt-4o","messages":"SECRET-PROMPT"}"#,
    );
    send_request(&mut Exchange::new(f, 2), &mut bad, 100);
    for log in [host.log_text(), bad.log_text()] {
        assert!(!log.contains("SECRET") && !log.contains("sk-live"), "{log}");
    }
}

#[test]
fn client_model_names_are_capped_in_stat_tags() {
    let f = filter(r#"{"api":"v1","stats":{"model_tag_limit":2}}"#);
    let mut host = FakeHost::default();
    for m in ["a", "b", "c", "d"] {
        let body = format!(r#"{{"model":"{m}","messages":[]}}"#);
        let mut h = FakeHost::post("/v1/chat/completions", body.as_bytes());
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut h, 100);
        respond(&mut ex, &mut h, "200", "application/json", b"{}", 100);
        for (k, v) in h.counters {
            *host.counters.entry(k).or_default() += v;
        }
    }
    assert_eq!(
        host.counter_sum("tokenfuse_requests", &["model=.=other;"]),
        2
    );
}

const BUDGETS: &str = r#"{"api":"v1",
        "budgets":[{"name":"minute","key":"header:x-tenant","window":"minute","base":1000,"max_request_tokens":5000,"oversize":"truncate","base_overrides":{"bigco":100000}},
                   {"name":"usd","key":"header:x-tenant","window":"day","unit":"usd","base":1.0,"action":"reroute","base_overrides":{"thrifty":0.0001}}],
        "prices":{"*":{"input":1,"output":1},"gpt-4o*":{"input":2.5,"output":10}},
        "reroute":{"models":{"gpt-4o":"gpt-4o-mini"}},
        "admin":{"path":"/admin","token":"0123456789abcdef"}}"#;

fn budget_host(tenant: &str, body: &str, shared: &FakeHost) -> FakeHost {
    let mut h = FakeHost::post("/v1/chat/completions", body.as_bytes());
    h.request_headers.push(("x-tenant".into(), tenant.into()));
    h.request_headers
        .push(("x-request-id".into(), "req-1".into()));
    h.shared = shared.shared.clone();
    h.now_ms.set(1_800_000_030_000);
    h
}

fn chat_with(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"gpt-4o","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hello"}}]}}"#
    )
}

fn minute_used(shared: &FakeHost, f: &Filter, key: &str) -> u64 {
    let b = &f.config.budgets[0];
    let a = crate::budget::ledger::find(shared, b, key, 1_800_000_030)
        .unwrap()
        .1;
    b.standing(&a, 1_800_000_030).used
}

#[test]
fn an_admitted_request_carries_rate_headers_and_settles_to_actual_usage() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(100), &shared);
    let mut ex = Exchange::new(f.clone(), 1);
    assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
    assert_eq!(
        minute_used(&shared, &f, "acme"),
        108,
        "8 prompt + 100 reserved"
    );
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
        10,
    );
    assert_eq!(
        h.resp_header("x-ratelimit-limit-tokens").as_deref(),
        Some("1000")
    );
    assert_eq!(
        h.resp_header("x-ratelimit-remaining-tokens").as_deref(),
        Some("892")
    );
    assert_eq!(
        h.resp_header("x-ratelimit-reset-tokens").as_deref(),
        Some("30s")
    );
    assert_eq!(minute_used(&shared, &f, "acme"), 13, "settled to 8 + 5");
    assert_eq!(
        h.counter_sum("tokenfuse_decisions", &["decision=.=allowed;"]),
        1
    );
}

/// An agent loop: step `n` resends the conversation so far plus one new turn.
fn agent_step(n: usize) -> String {
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": "You are a careful agent. ".repeat(20)}),
    ];
    for i in 0..n {
        messages.push(serde_json::json!({"role": "user", "content": format!("Step {i}: observe the tool output and decide what to do next. ").repeat(8)}));
        messages.push(serde_json::json!({"role": "assistant", "content": format!("Thought {i}: 東京の天気 and fn step_{i}() {{ retry(); }} ").repeat(6)}));
    }
    serde_json::json!({"model": "gpt-4o", "messages": messages}).to_string()
}

fn prompt_tokens_of(f: &Rc<Filter>, body: &str) -> String {
    let mut h = FakeHost::post("/v1/chat/completions", body.as_bytes());
    let mut ex = Exchange::new(f.clone(), 1);
    assert_eq!(send_request(&mut ex, &mut h, 4096), Action::Continue);
    respond(&mut ex, &mut h, "200", "application/json", b"{}", 64);
    h.resp_header(PROMPT_TOKENS_HEADER).unwrap()
}

#[test]
fn an_agent_loop_counts_the_same_with_the_count_cache_and_mostly_from_it() {
    let cached = default_filter();
    let uncached = filter(r#"{"api":"v1","tokenizer":{"cache_bytes":0}}"#);
    for step in 1..12 {
        let body = agent_step(step);
        assert_eq!(
            prompt_tokens_of(&cached, &body),
            prompt_tokens_of(&uncached, &body),
            "step {step}"
        );
    }
    let mut stats = FakeHost::default();
    cached.report_count_cache(&mut stats);
    let texts =
        |source: &str| stats.counter(&format!("tokenfuse_count_cache_texts.source=.={source};.;"));
    // Turns are stored on their second sighting and served from the third on.
    assert!(
        texts("cache") > 2 * texts("tokenizer"),
        "{:?}",
        stats.counters
    );
    assert!(stats.gauges["tokenfuse_count_cache_bytes"] > 0);
    let mut none = FakeHost::default();
    uncached.report_count_cache(&mut none);
    assert!(none.counters.is_empty() && none.gauges.is_empty());
}

#[test]
fn a_reject_budget_reads_a_known_account_once_to_reserve_and_once_to_settle() {
    let f = filter(
        r#"{"api":"v1","budgets":[{"name":"minute","key":"header:x-tenant","window":"minute","base":1000}]}"#,
    );
    let shared = FakeHost::default();
    let reads = |first: bool| {
        let mut h = budget_host("acme", &chat_with(10), &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
        let reserve = h.shared_reads.get();
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
            64,
        );
        assert!(first || h.resp_header("x-ratelimit-remaining-tokens").is_some());
        (reserve, h.shared_reads.get() - reserve)
    };
    // The first request finds no account: it is counted against the key cap and
    // created before the reservation.
    let (reserve, settle) = reads(true);
    assert!(reserve > 1, "{reserve}");
    assert_eq!(settle, 1);
    // Later ones: the VM knows the account exists, and no budget can reroute, so the
    // read-only planning pass is skipped: one read inside the reservation's CAS loop.
    assert_eq!(reads(false), (1, 1));
    assert_eq!(minute_used(&shared, &f, "acme"), 26);
}

#[test]
fn a_reroute_budget_still_plans_with_a_read_only_pass() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    for expected in [None, Some(4)] {
        let mut h = budget_host("acme", &chat_with(10), &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
        // Two budgets, each read in both passes once the keys are known.
        if let Some(n) = expected {
            assert_eq!(h.shared_reads.get(), n);
        }
    }
}

#[test]
fn an_exhausted_budget_answers_429_with_openai_headers_and_body() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(995), &shared);
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut h, 64);
    let reply = h.reply.clone().expect("a 429");
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("30"));
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("1000"));
    assert_eq!(reply.header("x-ratelimit-reset-tokens"), Some("30s"));
    assert_eq!(reply.header("x-tokenfuse-budget"), Some("minute"));
    // 1003 tokens can never fit a 1000-token window at 90%: no point retrying.
    assert_eq!(reply.header("x-should-retry"), Some("false"));
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "tokens");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("priority p1"));
    assert_eq!(minute_used(&shared, &f, "acme"), 0);
    ex.on_done(&mut h);
    assert_eq!(
        h.counter_sum("tokenfuse_requests", &[]),
        0,
        "a refused request is not an exchange"
    );
}

#[test]
fn a_spent_reroute_budget_rewrites_model_route_and_content_length() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("thrifty", &chat_with(100), &shared);
    let mut ex = Exchange::new(f, 1);
    assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
    let sent: serde_json::Value = serde_json::from_slice(&h.request_body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(
        h.req_header("content-length"),
        Some(h.request_body.len().to_string())
    );
    assert_eq!(
        h.req_header("x-tokenfuse-route").as_deref(),
        Some("economy")
    );
    assert_eq!(h.route_cache_cleared, 1);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
        10,
    );
    assert_eq!(
        h.resp_header(REROUTED_HEADER).as_deref(),
        Some("gpt-4o-mini")
    );
    // Stats follow the model that served the request.
    assert_eq!(tokens(&h, "completion", "provider"), 5);
    assert_eq!(
        h.counter_sum("tokenfuse_tokens", &["model=.=gpt-4o-mini;"]),
        13
    );
}

#[test]
fn oversize_conversations_are_truncated_to_the_cap() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut messages = vec![serde_json::json!({"role":"system","content":"be brief"})];
    for i in 0..1000 {
        messages.push(serde_json::json!({"role":"user","content":format!("message {i} with several words in it")}));
    }
    let body =
        serde_json::json!({"model":"gpt-4o","max_tokens":100,"messages":messages}).to_string();
    let mut h = budget_host("bigco", &body, &shared);
    let mut ex = Exchange::new(f.clone(), 1);
    assert_eq!(send_request(&mut ex, &mut h, 4096), Action::Continue);
    let sent: serde_json::Value = serde_json::from_slice(&h.request_body).unwrap();
    let kept = sent["messages"].as_array().unwrap();
    assert!(kept.len() < 1001 && kept.len() > 2, "kept {}", kept.len());
    assert_eq!(kept[0]["role"], "system");
    assert_eq!(
        kept.last().unwrap()["content"],
        "message 999 with several words in it"
    );
    assert_eq!(
        h.req_header("content-length"),
        Some(h.request_body.len().to_string())
    );
    assert_eq!(
        h.counter_sum("tokenfuse_decisions", &["decision=.=truncated;"]),
        1
    );
    assert!(h.reply.is_none());
    let prompt: u64 = h.counter_sum("tokenfuse_decisions", &[]);
    assert_eq!(prompt, 2, "truncated, then allowed");
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        100,
    );
    let header: u64 = h
        .resp_header(PROMPT_TOKENS_HEADER)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        header + 100 <= 5000,
        "the new prompt count fits the cap: {header}"
    );
}

#[test]
fn upstream_errors_refund_the_reservation() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(300), &shared);
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut h, 64);
    assert_eq!(minute_used(&shared, &f, "acme"), 308);
    respond(&mut ex, &mut h, "503", "application/json", b"{}", 10);
    assert_eq!(minute_used(&shared, &f, "acme"), 0);
}

#[test]
fn a_client_gone_before_the_response_is_charged_its_reservation_unless_told_to_refund() {
    // The provider usually generated (and bills) the answer by then.
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(300), &shared);
    let mut ex = Exchange::new(f.clone(), 2);
    send_request(&mut ex, &mut h, 64);
    ex.on_done(&mut h);
    assert_eq!(minute_used(&shared, &f, "acme"), 308);
    let refunding = BUDGETS.replacen(r#"{"api":"v1","#, r#"{"api":"v1","abandoned":"refund","#, 1);
    let f = filter(&refunding);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(300), &shared);
    let mut ex = Exchange::new(f.clone(), 3);
    send_request(&mut ex, &mut h, 64);
    ex.on_done(&mut h);
    assert_eq!(minute_used(&shared, &f, "acme"), 0);
}

#[test]
fn a_client_abort_mid_stream_is_charged_for_what_was_streamed() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(300), &shared);
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut h, 64);
    respond_cut(
        &mut ex,
        &mut h,
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tiktoken is great!\"}}]}\n\n",
    );
    assert_eq!(minute_used(&shared, &f, "acme"), 8 + 6);
}

#[test]
fn an_unreadable_response_keeps_the_reservation() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(300), &shared);
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut h, 64);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        b"<html>not json</html>",
        10,
    );
    assert_eq!(minute_used(&shared, &f, "acme"), 308);
}

#[test]
fn admin_topup_through_the_exchange_never_reaches_upstream() {
    let f = filter(BUDGETS);
    let body = br#"{"budget":"minute","key":"acme","amount":250}"#;
    let mut h = FakeHost::post("/admin/topup", body);
    h.request_headers
        .push(("authorization".into(), "Bearer 0123456789abcdef".into()));
    h.now_ms.set(1_800_000_030_000);
    let mut ex = Exchange::new(f, 1);
    assert_eq!(ex.on_request_headers(&mut h, false), Action::Pause);
    assert_eq!(ex.on_request_body(&mut h, body.len(), true), Action::Pause);
    let reply = h.reply.clone().unwrap();
    assert_eq!(reply.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["tiers"]["elastic"]["balance"], 250);
}

#[test]
fn stats_carry_the_tenant_and_budget_gauges_follow_each_key() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(100), &shared);
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut h, 64);
    assert_eq!(
        h.gauges
            .get("tokenfuse_budget_used.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;window=.=minute;.;"),
        Some(&108)
    );
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
        10,
    );
    assert_eq!(
        h.gauges
            .get("tokenfuse_budget_used.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;window=.=minute;.;"),
        Some(&13)
    );
    assert_eq!(
        h.gauges
            .get("tokenfuse_budget_limit.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;window=.=minute;.;"),
        Some(&1000)
    );
    assert_eq!(
        h.gauges
            .get("tokenfuse_budget_remaining.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;window=.=minute;.;"),
        Some(&987)
    );
    assert_eq!(
        h.counter_sum("tokenfuse_tokens.tenant=.=acme;", &["kind=.=prompt;"]),
        8
    );
    assert_eq!(h.counter_sum("tokenfuse_requests.tenant=.=acme;", &[]), 1);
    assert_eq!(
        h.counter_sum(
            "tokenfuse_decisions.tenant=.=acme;",
            &["decision=.=allowed;"]
        ),
        1
    );
}

#[test]
fn a_quiet_keys_gauges_drop_when_its_window_rolls() {
    const USED: &str = "tokenfuse_budget_used.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;window=.=minute;.;";
    const RESET: &str =
        "tokenfuse_budget_reset_seconds.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;window=.=minute;.;";
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(100), &shared);
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut h, 64);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
        10,
    );
    assert_eq!(h.gauges.get(USED), Some(&13));
    assert_eq!(h.gauges.get(RESET), Some(&30), "30 s left in the minute");
    assert_eq!(
        h.gauges.get(
            "tokenfuse_budget_base.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;window=.=minute;.;"
        ),
        Some(&1000)
    );

    // The tick, still inside the window: the same standing, a second closer to the reset.
    let mut tick = FakeHost {
        shared: shared.shared.clone(),
        ..FakeHost::default()
    };
    tick.now_ms.set(1_800_000_031_000);
    f.refresh_gauges(&mut tick, 64);
    assert_eq!(tick.gauges.get(USED), Some(&13));
    assert_eq!(tick.gauges.get(RESET), Some(&29));

    // Refreshes are at most a second apart, whatever the tick period.
    tick.gauges.clear();
    tick.now_ms.set(1_800_000_031_500);
    f.refresh_gauges(&mut tick, 64);
    assert!(tick.gauges.is_empty());

    // The window rolls with no request from acme: the tick drops its gauges.
    tick.now_ms.set(1_800_000_061_000);
    f.refresh_gauges(&mut tick, 64);
    assert_eq!(tick.gauges.get(USED), Some(&0));
    assert_eq!(
        tick.gauges
            .get("tokenfuse_budget_remaining.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;window=.=minute;.;"),
        Some(&1000)
    );
    assert_eq!(tick.gauges.get(RESET), Some(&59));
}

#[test]
fn the_tick_refreshes_a_bounded_number_of_keys_round_robin() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    for tenant in ["t0", "t1", "t2", "t3", "t4"] {
        let mut h = budget_host(tenant, &chat_with(10), &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut h, 64);
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
            10,
        );
    }
    // Two budgets (minute and usd) of five keys each: ten keys, three per tick.
    let mut seen = std::collections::BTreeSet::new();
    let mut tick = FakeHost {
        shared: shared.shared.clone(),
        ..FakeHost::default()
    };
    for second in 0..4 {
        tick.gauges.clear();
        tick.now_ms.set(1_800_000_031_000 + second * 1000);
        f.refresh_gauges(&mut tick, 3);
        let used: Vec<&String> = tick
            .gauges
            .keys()
            .filter(|k| k.starts_with("tokenfuse_budget_used."))
            .collect();
        assert_eq!(used.len(), 3, "{used:?}");
        seen.extend(used.into_iter().cloned());
    }
    assert_eq!(seen.len(), 10, "every key within four ticks: {seen:?}");
}

#[test]
fn tokens_per_request_are_histograms_and_sdk_retries_are_counted() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(100), &shared);
    h.request_headers
        .push(("x-stainless-retry-count".into(), "2".into()));
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut h, 64);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
        10,
    );
    assert_eq!(
        h.histograms
            .get("tokenfuse_tokens_per_request.tenant=.=acme;.;kind=.=prompt;.;model=.=gpt-4o;.;"),
        Some(&vec![8])
    );
    assert_eq!(
        h.histograms.get(
            "tokenfuse_tokens_per_request.tenant=.=acme;.;kind=.=completion;.;model=.=gpt-4o;.;"
        ),
        Some(&vec![5])
    );
    assert_eq!(h.counter_sum("tokenfuse_retries.tenant=.=acme;", &[]), 1);

    // A first attempt (count 0) or a header that is not a count is no retry.
    for value in ["0", "many", ""] {
        let mut h = budget_host("acme", &chat_with(100), &shared);
        h.request_headers
            .push(("x-stainless-retry-count".into(), value.into()));
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut h, 64);
        assert_eq!(h.counter_sum("tokenfuse_retries", &[]), 0, "{value:?}");
    }
}

#[test]
fn the_tenant_tag_can_be_switched_off() {
    let f = filter(&BUDGETS.replacen(
        r#""api":"v1","#,
        r#""api":"v1","stats":{"tenant":"off"},"#,
        1,
    ));
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(100), &shared);
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut h, 64);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
        10,
    );
    // Budget keys' own stats name the key they follow; no other stat carries a tenant.
    assert!(
        h.counters
            .keys()
            .filter(|k| !k.starts_with("tokenfuse_budget_"))
            .all(|k| !k.contains("tenant=")),
        "{:?}",
        h.counters.keys()
    );
    assert_eq!(
        h.counters.get(
            "tokenfuse_budget_consumed.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;window=.=minute;.;"
        ),
        Some(&13),
        "what the settled request was charged: 8 + 5"
    );
}

#[test]
fn trailers_end_the_request_body_so_it_is_still_counted() {
    let f = default_filter();
    let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
    let mut ex = Exchange::new(f, 1);
    assert_eq!(ex.on_request_headers(&mut host, false), Action::Pause);
    assert_eq!(
        ex.on_request_body(&mut host, CHAT.len(), false),
        Action::Pause
    );
    assert_eq!(ex.on_request_trailers(&mut host), Action::Continue);
    respond(
        &mut ex,
        &mut host,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":1}}"#,
        100,
    );
    assert_eq!(host.resp_header(PROMPT_TOKENS_HEADER).as_deref(), Some("8"));
}

#[test]
fn a_client_cannot_set_the_reroute_header_itself() {
    let f = filter(BUDGETS);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(10), &shared);
    h.request_headers
        .push(("x-tokenfuse-route".into(), "economy".into()));
    let mut ex = Exchange::new(f, 1);
    assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
    assert!(h.req_header("x-tokenfuse-route").is_none());
}

#[test]
fn count_and_reject_mode_lets_headers_go_and_still_judges_the_body() {
    let config = r#"{"api":"v1","hold_request_headers":false,
            "budgets":[{"name":"m","key":"header:x-tenant","window":"minute","base":1000}]}"#;
    let f = filter(config);
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(10), &shared);
    let mut ex = Exchange::new(f.clone(), 1);
    assert_eq!(ex.on_request_headers(&mut h, false), Action::Continue);
    let n = h.request_body.len();
    assert_eq!(ex.on_request_body(&mut h, n / 2, false), Action::Pause);
    assert_eq!(ex.on_request_body(&mut h, n, true), Action::Continue);
    assert_eq!(minute_used(&shared, &f, "acme"), 18);
    let mut h = budget_host("acme", &chat_with(2000), &shared);
    let mut ex = Exchange::new(f, 2);
    assert_eq!(ex.on_request_headers(&mut h, false), Action::Continue);
    let n = h.request_body.len();
    ex.on_request_body(&mut h, n, true);
    assert_eq!(h.reply.as_ref().map(|r| r.status), Some(429));
}

const GLOBAL: &str = r#"{"api":"v1",
        "rate_limit_service":{"cluster":"rls","domain":"tf","timeout_ms":80,"on_failure":"closed"},
        "budgets":[{"name":"minute","key":"header:x-tenant","window":"minute","base":1000},
                   {"name":"daily","key":"header:x-tenant","backend":"global","max_request_tokens":4000}]}"#;

fn global_request(config: &str, shared: &FakeHost) -> (Rc<Filter>, Exchange, FakeHost) {
    let f = filter(config);
    let h = budget_host("acme", &chat_with(100), shared);
    let ex = Exchange::new(f.clone(), 1);
    (f, ex, h)
}

fn rls_answer(ex: &mut Exchange, h: &mut FakeHost, call: usize, grpc_status: u32, body: &[u8]) {
    h.grpc_body = body.to_vec();
    let token = h.grpc_calls[call].token;
    ex.on_grpc_response(h, token, grpc_status, body.len());
}

#[test]
fn a_global_budget_holds_the_request_until_the_service_admits_it() {
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
    assert_eq!(send_request(&mut ex, &mut h, 1 << 20), Action::Pause);
    assert_eq!(h.grpc_calls.len(), 1);
    let call = &h.grpc_calls[0];
    assert_eq!(
        (
            call.cluster.as_str(),
            call.service.as_str(),
            call.method.as_str()
        ),
        ("rls", rls::SERVICE, rls::METHOD)
    );
    assert_eq!(call.timeout_ms, 80);
    let service = f.config.rate_limit_service.as_ref().unwrap();
    assert_eq!(
        call.message,
        global::request_message(service, "daily", "acme", 108),
        "prompt 8 + max_tokens 100"
    );
    assert_eq!(
        minute_used(&shared, &f, "acme"),
        108,
        "local reserved first"
    );
    assert_eq!(h.resumed, 0);
    assert_eq!(
        h.counter_sum("tokenfuse_decisions", &[]),
        0,
        "not decided yet"
    );
    rls_answer(&mut ex, &mut h, 0, 0, &[0x08, 1]);
    assert_eq!(h.resumed, 1);
    assert!(h.reply.is_none());
    assert_eq!(
        h.counter_sum("tokenfuse_decisions", &["decision=.=allowed;"]),
        1
    );
    // Cost above the hold (8 + 300 > 108): the difference is queued for the root.
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":300}}"#,
        7,
    );
    let mut queue = f.settlements.borrow_mut();
    assert_eq!(queue.len(), 1);
    let before = h.grpc_calls.len();
    queue.flush(&mut h, &f.config);
    assert_eq!(
        h.grpc_calls[before].message,
        global::request_message(service, "daily", "acme", 200)
    );
}

#[test]
fn a_cost_below_the_hold_is_counted_as_unreturned() {
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
    send_request(&mut ex, &mut h, 1 << 20);
    rls_answer(&mut ex, &mut h, 0, 0, &[0x08, 1]);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":2}}"#,
        7,
    );
    assert!(f.settlements.borrow().is_empty());
    assert_eq!(
        h.counter("tokenfuse_global_unreturned.budget=.=daily;.;"),
        98
    );
    assert_eq!(
        minute_used(&shared, &f, "acme"),
        10,
        "local settles exactly"
    );
}

#[test]
fn the_services_reported_usage_sets_the_rate_headers_and_the_warning() {
    let shared = FakeHost::default();
    let (_f, mut ex, mut h) = global_request(GLOBAL, &shared);
    send_request(&mut ex, &mut h, 1 << 20);
    // OK with a status (envoyproxy/ratelimit): limit 5000, 500 left (90% used), resets in
    // 120 s; warn_at defaults to 0.8.
    let limit = [0x08, 0x88, 0x27, 0x10, 4];
    let status = [
        &[0x08, 1, 0x12, limit.len() as u8][..],
        &limit,
        &[0x18, 0xf4, 0x03, 0x22, 2, 0x08, 120],
    ]
    .concat();
    let body = [&[0x08, 1, 0x12, status.len() as u8][..], &status].concat();
    rls_answer(&mut ex, &mut h, 0, 0, &body);
    assert_eq!(h.resumed, 1);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":2}}"#,
        7,
    );
    assert_eq!(h.resp_header(WARNING_HEADER).as_deref(), Some("daily"));
    // The tighter of the local minute budget (892 left) and the service's 500.
    assert_eq!(
        h.resp_header("x-ratelimit-remaining-tokens").as_deref(),
        Some("500")
    );
    assert_eq!(
        h.counter_sum("tokenfuse_decisions", &["decision=.=warned;"]),
        1
    );
}

#[test]
fn over_limit_answers_429_and_gives_the_local_reservation_back() {
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
    send_request(&mut ex, &mut h, 1 << 20);
    // OVER_LIMIT with a status: limit 5000, 0 left, resets in 120 s.
    let limit = [0x08, 0x88, 0x27, 0x10, 4];
    let reset = [0x08, 120];
    let status = [
        &[0x08, 2, 0x12, limit.len() as u8][..],
        &limit,
        &[0x18, 0, 0x22, reset.len() as u8],
        &reset,
    ]
    .concat();
    let body = [&[0x08, 2, 0x12, status.len() as u8][..], &status].concat();
    rls_answer(&mut ex, &mut h, 0, 0, &body);
    let reply = h.reply.clone().expect("a local reply");
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("120"));
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("5000"));
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(reply.header("x-tokenfuse-budget"), Some("daily"));
    assert_eq!(
        reply.header("x-should-retry"),
        Some("false"),
        "120 s > 60 s"
    );
    assert!(String::from_utf8_lossy(&reply.body).contains("global budget 'daily'"));
    assert_eq!(h.resumed, 0);
    assert_eq!(minute_used(&shared, &f, "acme"), 0, "local refunded");
    assert_eq!(
        h.counter_sum(
            "tokenfuse_decisions",
            &["decision=.=rejected;", "budget=.=daily;"]
        ),
        1
    );
    assert_eq!(h.counter_sum("tokenfuse_decisions", &[]), 1, "decided once");
    ex.on_done(&mut h);
    assert!(f.settlements.borrow().is_empty());
}

#[test]
fn a_timeout_fails_closed_with_503_when_configured() {
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
    send_request(&mut ex, &mut h, 1 << 20);
    rls_answer(&mut ex, &mut h, 0, 4, &[]);
    assert_eq!(h.reply.as_ref().map(|r| r.status), Some(503));
    assert_eq!(minute_used(&shared, &f, "acme"), 0);
    assert_eq!(
        h.counter_sum(
            "tokenfuse_global_errors",
            &["budget=.=daily;", "reason=.=timeout"]
        ),
        1
    );
    assert_eq!(
        h.counter_sum("tokenfuse_decisions", &["decision=.=unavailable;"]),
        1
    );
}

#[test]
fn a_failure_fails_open_by_default_and_holds_nothing() {
    let config = GLOBAL.replace(r#","on_failure":"closed""#, "");
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(&config, &shared);
    send_request(&mut ex, &mut h, 1 << 20);
    rls_answer(&mut ex, &mut h, 0, 14, &[]);
    assert!(h.reply.is_none());
    assert_eq!(h.resumed, 1);
    assert_eq!(h.counter("tokenfuse_fail_open.budget=.=daily;.;"), 1);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":500}}"#,
        64,
    );
    assert!(
        f.settlements.borrow().is_empty(),
        "nothing was held, so nothing is settled"
    );
}

#[test]
fn a_call_that_cannot_be_sent_applies_the_failure_mode_without_pausing() {
    let config = GLOBAL.replace(r#""closed""#, r#""open""#);
    let shared = FakeHost::default();
    let (_f, mut ex, mut h) = global_request(&config, &shared);
    h.grpc_broken = true;
    assert_eq!(send_request(&mut ex, &mut h, 1 << 20), Action::Continue);
    assert_eq!(
        h.counter_sum("tokenfuse_global_errors", &["reason=.=dispatch"]),
        1
    );
    assert_eq!(h.resumed, 0, "never paused, nothing to resume");
}

#[test]
fn a_garbled_or_unknown_answer_is_a_failure_not_an_admission() {
    for body in [&[0x12, 9][..], &[][..], &[0x08, 0][..]] {
        let shared = FakeHost::default();
        let (_f, mut ex, mut h) = global_request(GLOBAL, &shared);
        send_request(&mut ex, &mut h, 1 << 20);
        rls_answer(&mut ex, &mut h, 0, 0, body);
        assert_eq!(h.reply.as_ref().map(|r| r.status), Some(503), "{body:?}");
    }
}

#[test]
fn a_client_that_leaves_during_the_check_gets_its_local_reservation_back() {
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
    send_request(&mut ex, &mut h, 1 << 20);
    ex.on_done(&mut h);
    assert_eq!(minute_used(&shared, &f, "acme"), 0);
    // A late answer for a finished exchange changes nothing.
    rls_answer(&mut ex, &mut h, 0, 0, &[0x08, 1]);
    assert_eq!(h.resumed, 0);
    assert_eq!(h.counter_sum("tokenfuse_decisions", &[]), 0);
}

#[test]
fn the_per_request_cap_of_a_global_budget_applies_before_asking() {
    let shared = FakeHost::default();
    let f = filter(GLOBAL);
    let mut h = budget_host("acme", &chat_with(5000), &shared);
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut h, 1 << 20);
    assert_eq!(h.reply.as_ref().map(|r| r.status), Some(400));
    assert!(h.grpc_calls.is_empty());
}

#[test]
fn a_request_larger_than_a_call_can_carry_is_refused_without_a_call() {
    let config = GLOBAL.replace(r#","max_request_tokens":4000"#, "");
    let config = config.replace(r#""base":1000"#, r#""base":1e15"#);
    let shared = FakeHost::default();
    let f = filter(&config);
    let mut h = budget_host("acme", &chat_with(5_000_000_000), &shared);
    let mut ex = Exchange::new(f, 1);
    send_request(&mut ex, &mut h, 1 << 20);
    let reply = h.reply.clone().unwrap();
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("x-should-retry"), Some("false"));
    assert!(h.grpc_calls.is_empty());
}

#[test]
fn every_global_budget_is_asked_and_any_refusal_wins() {
    let config = r#"{"api":"v1","rate_limit_service":{"cluster":"rls"},
            "prices":{"*":{"input":1,"output":1}},
            "budgets":[{"name":"tok","key":"header:x-tenant","backend":"global"},
                       {"name":"usd","key":"constant:all","backend":"global","unit":"usd"}]}"#;
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(config, &shared);
    assert_eq!(send_request(&mut ex, &mut h, 1 << 20), Action::Pause);
    assert_eq!(h.grpc_calls.len(), 2);
    let service = f.config.rate_limit_service.as_ref().unwrap();
    assert_eq!(
        h.grpc_calls[1].message,
        global::request_message(service, "usd", "all", 108),
        "$1/M each way: 108 micro-USD"
    );
    rls_answer(&mut ex, &mut h, 1, 0, &[0x08, 1]);
    assert!(
        h.reply.is_none() && h.resumed == 0,
        "still waiting for the first"
    );
    rls_answer(&mut ex, &mut h, 0, 0, &[0x08, 2]);
    assert_eq!(h.reply.as_ref().map(|r| r.status), Some(429));
    assert_eq!(
        h.counter("tokenfuse_global_unreturned.budget=.=usd;.;"),
        108,
        "the admitting budget keeps its hits"
    );
}

const LIMITADOR: &str = r#"{"api":"v1",
        "rate_limit_service":{"cluster":"rls","domain":"tf","timeout_ms":80,"on_failure":"closed",
                              "protocol":"limitador","reservation_ttl_secs":120},
        "budgets":[{"name":"minute","key":"header:x-tenant","window":"minute","base":1000},
                   {"name":"daily","key":"header:x-tenant","backend":"global"}]}"#;

fn reserved(id: &str) -> Vec<u8> {
    [&[0x08, 1, 0x12, id.len() as u8][..], id.as_bytes()].concat()
}

#[test]
fn a_limitador_reservation_is_committed_at_the_real_cost_and_the_rest_comes_back() {
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(LIMITADOR, &shared);
    assert_eq!(send_request(&mut ex, &mut h, 1 << 20), Action::Pause);
    let call = &h.grpc_calls[0];
    assert_eq!(
        (call.service.as_str(), call.method.as_str()),
        (global::limitador::SERVICE, global::limitador::RESERVE)
    );
    let service = f.config.rate_limit_service.as_ref().unwrap();
    assert_eq!(
        call.message,
        global::reserve_message(service, "daily", "acme", 108)
    );
    assert_eq!(service.reservation_ttl_secs, 120);
    rls_answer(&mut ex, &mut h, 0, 0, &reserved("r-1"));
    assert_eq!(h.resumed, 1);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":2}}"#,
        7,
    );
    // Nothing unreturned: the commit of 10 gives the other 98 back.
    assert_eq!(
        h.counter("tokenfuse_global_unreturned.budget=.=daily;.;"),
        0
    );
    let mut queue = f.settlements.borrow_mut();
    assert_eq!(queue.len(), 1);
    let before = h.grpc_calls.len();
    queue.flush(&mut h, &f.config);
    let commit = &h.grpc_calls[before];
    assert_eq!(commit.method, global::limitador::COMMIT);
    assert_eq!(
        commit.message,
        global::commit_message(service, "daily", "acme", "r-1", 10)
    );
    let token = commit.token;
    assert!(queue.on_response(&mut h, &f.config, token, 0, Some(&[0x08, 1])));
    assert_eq!(h.counter("tokenfuse_global_returned.budget=.=daily;.;"), 98);
    assert_eq!(h.counter("tokenfuse_global_settled.budget=.=daily;.;"), 10);
}

#[test]
fn a_limitador_reservation_above_the_cost_is_committed_in_one_call_too() {
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(LIMITADOR, &shared);
    send_request(&mut ex, &mut h, 1 << 20);
    rls_answer(&mut ex, &mut h, 0, 0, &reserved("r-2"));
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":300}}"#,
        7,
    );
    let mut queue = f.settlements.borrow_mut();
    let before = h.grpc_calls.len();
    queue.flush(&mut h, &f.config);
    let service = f.config.rate_limit_service.as_ref().unwrap();
    assert_eq!(
        h.grpc_calls.len(),
        before + 1,
        "one commit, no extra hits call"
    );
    assert_eq!(
        h.grpc_calls[before].message,
        global::commit_message(service, "daily", "acme", "r-2", 308)
    );
}

#[test]
fn a_limitador_refusal_answers_429_and_holds_taken_by_other_budgets_are_committed_at_zero() {
    let config = r#"{"api":"v1","rate_limit_service":{"cluster":"rls","protocol":"limitador"},
            "prices":{"*":{"input":1,"output":1}},
            "budgets":[{"name":"tok","key":"header:x-tenant","backend":"global"},
                       {"name":"usd","key":"constant:all","backend":"global","unit":"usd"}]}"#;
    let shared = FakeHost::default();
    let (f, mut ex, mut h) = global_request(config, &shared);
    send_request(&mut ex, &mut h, 1 << 20);
    rls_answer(&mut ex, &mut h, 1, 0, &reserved("usd-hold"));
    rls_answer(&mut ex, &mut h, 0, 0, &[0x08, 2]);
    assert_eq!(h.reply.as_ref().map(|r| r.status), Some(429));
    assert_eq!(h.counter("tokenfuse_global_unreturned.budget=.=usd;.;"), 0);
    let mut queue = f.settlements.borrow_mut();
    let before = h.grpc_calls.len();
    queue.flush(&mut h, &f.config);
    let service = f.config.rate_limit_service.as_ref().unwrap();
    assert_eq!(
        h.grpc_calls[before].message,
        global::commit_message(service, "usd", "all", "usd-hold", 0)
    );
}

#[test]
fn hostile_limitador_answers_apply_the_failure_mode() {
    let long_id = [&[0x08, 1, 0x12, 200, 1][..], &[b'a'; 200]].concat();
    for (mode, want) in [("closed", Some(503)), ("open", None)] {
        for body in [
            &[0x08][..],                     // truncated
            &[0x08, 1, 0x12, 2, 0xc3, 0x28], // id not UTF-8
            &long_id,                        // id too long
            &[],                             // UNKNOWN
            &[0x08, 7],                      // no such code
        ] {
            let config = LIMITADOR.replace("\"closed\"", &format!("\"{mode}\""));
            let shared = FakeHost::default();
            let (f, mut ex, mut h) = global_request(&config, &shared);
            send_request(&mut ex, &mut h, 1 << 20);
            rls_answer(&mut ex, &mut h, 0, 0, body);
            assert_eq!(h.reply.as_ref().map(|r| r.status), want, "{mode} {body:?}");
            if want.is_none() {
                assert_eq!(h.resumed, 1);
            }
            // Nothing to commit: no reservation was read.
            assert!(f.settlements.borrow().is_empty());
            assert_eq!(h.counter_sum("tokenfuse_global_errors", &[]), 1);
        }
    }
}

#[test]
fn a_refund_that_loses_its_write_race_is_counted_and_logged() {
    // Two budgets; the second is spent, so the first's reservation must go back. Every
    // write after the reservation loses its race: the refund fails, and says so.
    let f = filter(
        r#"{"api":"v1","budgets":[
                {"name":"wide","key":"header:x-tenant","window":"day","base":100000},
                {"name":"narrow","key":"header:x-tenant","window":"day","base":20}]}"#,
    );
    let shared = FakeHost::default();
    let mut h = budget_host("acme", &chat_with(5), &shared);
    let mut ex = Exchange::new(f.clone(), 1);
    assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
    respond(
        &mut ex,
        &mut h,
        "200",
        "application/json",
        br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
        64,
    );
    {
        let mut s = shared.shared.borrow_mut();
        s.conflict_after = 1;
        s.forced_conflicts = 1_000;
    }
    let mut h = budget_host("acme", &chat_with(100), &shared);
    let mut ex = Exchange::new(f.clone(), 2);
    assert_eq!(send_request(&mut ex, &mut h, 64), Action::Pause);
    assert_eq!(h.reply.as_ref().unwrap().status, 429);
    assert_eq!(
        h.counter_sum("tokenfuse_settle_failures", &["budget=.=wide;"]),
        1
    );
    assert!(h.log_text().contains("could not settle budget wide"));
}

// ---- The response cache ----------------------------------------------------------------

const CACHED: &str = r#"{"api":"v1","cache":{"scope":"shared","ttl_secs":60},
    "budgets":[{"name":"daily","key":"header:x-tenant","window":"day","base":100000}]}"#;
const DETERMINISTIC: &str =
    r#"{"model":"gpt-4o","temperature":0,"messages":[{"role":"user","content":"hello"}]}"#;
const CHAT_ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hi!"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;

fn cache_request(shared: &Rc<RefCell<crate::host::fake::FakeShared>>, body: &str) -> FakeHost {
    let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
    host.request_headers
        .push(("x-tenant".into(), "acme".into()));
    host.shared = Rc::clone(shared);
    host.now_ms.set(1_000_000);
    host
}

/// Exchange `id` sends [`DETERMINISTIC`] and is answered [`CHAT_ANSWER`] from upstream, in
/// chunks of `chunk` bytes; its host, to read what it recorded.
fn answered_upstream(
    f: &Rc<Filter>,
    shared: &Rc<RefCell<crate::host::fake::FakeShared>>,
    id: u32,
    chunk: usize,
) -> FakeHost {
    let mut host = cache_request(shared, DETERMINISTIC);
    let mut ex = Exchange::new(f.clone(), id);
    send_request(&mut ex, &mut host, 1 << 20);
    respond(
        &mut ex,
        &mut host,
        "200",
        "application/json",
        CHAT_ANSWER.as_bytes(),
        chunk,
    );
    host
}

fn used(f: &Filter, host: &mut FakeHost) -> u64 {
    let b = f.config.budget_for(0, "acme").unwrap();
    let now = host.now_ms() / 1000;
    crate::budget::ledger::find(host, &b, "acme", now)
        .map(|(_, a)| b.standing(&a, now).used)
        .unwrap_or(0)
}

use std::cell::RefCell;

#[test]
fn a_repeated_deterministic_request_is_answered_once_and_costs_nothing() {
    let f = filter(CACHED);
    let shared = Rc::new(RefCell::new(Default::default()));
    // Miss: goes upstream, its answer is kept.
    let mut host = cache_request(&shared, DETERMINISTIC);
    let mut ex = Exchange::new(f.clone(), 1);
    assert_eq!(send_request(&mut ex, &mut host, 1 << 20), Action::Continue);
    respond(
        &mut ex,
        &mut host,
        "200",
        "application/json",
        CHAT_ANSWER.as_bytes(),
        17,
    );
    assert_eq!(host.resp_header(CACHE_HEADER).as_deref(), Some("miss"));
    assert_eq!(
        host.counter("tokenfuse_cache_stores.api=.=chat;.;result=.=stored;.;"),
        1
    );
    let after_miss = used(&f, &mut host);
    assert!(after_miss > 0);
    // Hit, as JSON: the same bytes, charged nothing.
    let mut host = cache_request(&shared, DETERMINISTIC);
    host.now_ms.set(1_005_000);
    let mut ex = Exchange::new(f.clone(), 2);
    assert_eq!(send_request(&mut ex, &mut host, 1 << 20), Action::Pause);
    let reply = host.reply.clone().unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header(CACHE_HEADER), Some("hit"));
    assert_eq!(reply.header("age"), Some("5"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let got: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let want: serde_json::Value = serde_json::from_str(CHAT_ANSWER).unwrap();
    assert_eq!(got, want);
    assert_eq!(used(&f, &mut host), after_miss);
    assert_eq!(
        host.counter_sum("tokenfuse_decisions", &["decision=.=cache_hit;"]),
        1
    );
    assert_eq!(
        host.counter_sum("tokenfuse_cache_saved_tokens", &["kind=.=completion;"]),
        3
    );
    // Hit, streamed: a valid chat stream with the usage chunk the client asked for.
    let streamed = DETERMINISTIC.replace(
        "\"temperature\"",
        "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"temperature\"",
    );
    let mut host = cache_request(&shared, &streamed);
    let mut ex = Exchange::new(f.clone(), 3);
    assert_eq!(send_request(&mut ex, &mut host, 1 << 20), Action::Pause);
    let reply = host.reply.clone().unwrap();
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8(reply.body.clone()).unwrap();
    assert!(text.contains("\"content\":\"Hi!\""), "{text}");
    assert!(text.contains("\"completion_tokens\":3"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    // Another model, a warmer temperature, or no-store: not this answer.
    for (body, header) in [
        (DETERMINISTIC.replace("gpt-4o", "gpt-4o-mini"), None),
        (
            DETERMINISTIC.replace("\"temperature\":0", "\"temperature\":1"),
            None,
        ),
        (DETERMINISTIC.to_string(), Some("no-store")),
    ] {
        let mut host = cache_request(&shared, &body);
        if let Some(h) = header {
            host.request_headers
                .push(("cache-control".into(), h.into()));
        }
        let mut ex = Exchange::new(f.clone(), 4);
        assert_eq!(
            send_request(&mut ex, &mut host, 1 << 20),
            Action::Continue,
            "{body}"
        );
        assert!(host.reply.is_none());
    }
}

#[test]
fn a_streamed_answer_is_kept_and_served_as_json() {
    let f = filter(CACHED);
    let shared = Rc::new(RefCell::new(Default::default()));
    let streamed = DETERMINISTIC.replace("\"temperature\"", "\"stream\":true,\"temperature\"");
    let answer: serde_json::Value = serde_json::from_str(CHAT_ANSWER).unwrap();
    let sse = crate::cache::shape::event_stream(ApiKind::ChatCompletions, &answer, true);
    let mut host = cache_request(&shared, &streamed);
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut host, 1 << 20);
    respond(&mut ex, &mut host, "200", "text/event-stream", &sse, 7);
    let mut host = cache_request(&shared, DETERMINISTIC);
    let mut ex = Exchange::new(f.clone(), 2);
    assert_eq!(send_request(&mut ex, &mut host, 1 << 20), Action::Pause);
    let got: serde_json::Value = serde_json::from_slice(&host.reply.unwrap().body).unwrap();
    assert_eq!(got, answer);
}

#[test]
fn cut_streams_and_errors_are_never_kept() {
    let f = filter(CACHED);
    let shared = Rc::new(RefCell::new(Default::default()));
    let streamed = DETERMINISTIC.replace("\"temperature\"", "\"stream\":true,\"temperature\"");
    let answer: serde_json::Value = serde_json::from_str(CHAT_ANSWER).unwrap();
    let sse = crate::cache::shape::event_stream(ApiKind::ChatCompletions, &answer, true);
    let mut host = cache_request(&shared, &streamed);
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut host, 1 << 20);
    respond_cut(&mut ex, &mut host, &sse[..sse.len() - 8]);
    assert_eq!(
        host.counter("tokenfuse_cache_stores.api=.=chat;.;result=.=incomplete;.;"),
        1
    );
    let mut host = cache_request(&shared, &streamed);
    let mut ex = Exchange::new(f.clone(), 2);
    send_request(&mut ex, &mut host, 1 << 20);
    respond(
        &mut ex,
        &mut host,
        "500",
        "application/json",
        br#"{"error":{}}"#,
        100,
    );
    assert_eq!(
        host.counter("tokenfuse_cache_stores.api=.=chat;.;result=.=incomplete;.;"),
        1
    );
    let mut host = cache_request(&shared, DETERMINISTIC);
    let mut ex = Exchange::new(f.clone(), 3);
    assert_eq!(send_request(&mut ex, &mut host, 1 << 20), Action::Continue);
    assert!(host.reply.is_none());
}

#[test]
fn identical_requests_in_flight_wait_for_the_first() {
    let f = filter(CACHED);
    let shared = Rc::new(RefCell::new(Default::default()));
    let mut first_host = cache_request(&shared, DETERMINISTIC);
    let mut first = Exchange::new(f.clone(), 1);
    assert_eq!(
        send_request(&mut first, &mut first_host, 1 << 20),
        Action::Continue
    );
    // Two identical requests arrive while it is in flight: held.
    let mut waiting = Vec::new();
    for id in 2..4 {
        let mut host = cache_request(&shared, DETERMINISTIC);
        let mut ex = Exchange::new(f.clone(), id);
        assert_eq!(send_request(&mut ex, &mut host, 1 << 20), Action::Pause);
        assert!(ex.waiting() && host.reply.is_none());
        assert_eq!(ex.on_wake(&mut host), Wake::Waiting);
        waiting.push((ex, host));
    }
    respond(
        &mut first,
        &mut first_host,
        "200",
        "application/json",
        CHAT_ANSWER.as_bytes(),
        64,
    );
    let before = used(&f, &mut first_host);
    for (ex, host) in waiting.iter_mut() {
        assert_eq!(ex.on_wake(host), Wake::Done);
        let reply = host.reply.clone().unwrap();
        assert_eq!(reply.header(CACHE_HEADER), Some("coalesced"));
        assert!(!ex.waiting());
    }
    assert_eq!(used(&f, &mut first_host), before);
    // If the first fails, the waiters go upstream themselves (admitted as usual).
    let body = DETERMINISTIC.replace("hello", "hello again");
    let mut first_host = cache_request(&shared, &body);
    let mut first = Exchange::new(f.clone(), 10);
    send_request(&mut first, &mut first_host, 1 << 20);
    let mut host = cache_request(&shared, &body);
    let mut ex = Exchange::new(f.clone(), 11);
    assert_eq!(send_request(&mut ex, &mut host, 1 << 20), Action::Pause);
    respond(
        &mut first,
        &mut first_host,
        "503",
        "application/json",
        b"{}",
        64,
    );
    assert_eq!(ex.on_wake(&mut host), Wake::Resume);
    assert!(host.reply.is_none());
    // A waiter whose first never answers goes once its wait is over.
    let body = DETERMINISTIC.replace("hello", "hello, slow");
    let mut first_host = cache_request(&shared, &body);
    let mut first = Exchange::new(f.clone(), 20);
    send_request(&mut first, &mut first_host, 1 << 20);
    let mut host = cache_request(&shared, &body);
    let mut ex = Exchange::new(f.clone(), 21);
    assert_eq!(send_request(&mut ex, &mut host, 1 << 20), Action::Pause);
    host.now_ms.set(1_000_000 + 30_001);
    assert_eq!(ex.on_wake(&mut host), Wake::Resume);
    assert_eq!(
        host.counter_sum("tokenfuse_cache_lookups", &["result=.=waited_out;"]),
        1
    );
}

#[test]
fn answers_never_cross_tenants_by_default() {
    let f = filter(
        r#"{"api":"v1","cache":{},
        "budgets":[{"name":"daily","key":"header:x-tenant","window":"day","base":100000}]}"#,
    );
    let shared = Rc::new(RefCell::new(Default::default()));
    answered_upstream(&f, &shared, 1, 64);
    let mut other = cache_request(&shared, DETERMINISTIC);
    other.request_headers.retain(|(k, _)| k != "x-tenant");
    other
        .request_headers
        .push(("x-tenant".into(), "globex".into()));
    let mut ex = Exchange::new(f.clone(), 2);
    assert_eq!(send_request(&mut ex, &mut other, 1 << 20), Action::Continue);
    let mut same = cache_request(&shared, DETERMINISTIC);
    let mut ex = Exchange::new(f.clone(), 3);
    assert_eq!(send_request(&mut ex, &mut same, 1 << 20), Action::Pause);
}

#[test]
fn sdk_retries_take_the_configured_priority_class() {
    let f = filter(r#"{"api":"v1","priority":{"header":"x-p","retries":"p2"}}"#);
    let mut host = FakeHost::post("/v1/chat/completions", DETERMINISTIC.as_bytes());
    host.request_headers.push(("x-p".into(), "p0".into()));
    assert_eq!(
        crate::budget::plan::priority(&host, &f.config),
        Priority::P0
    );
    host.request_headers
        .push(("x-stainless-retry-count".into(), "0".into()));
    assert_eq!(
        crate::budget::plan::priority(&host, &f.config),
        Priority::P0
    );
    host.request_headers
        .retain(|(k, _)| k != "x-stainless-retry-count");
    host.request_headers
        .push(("x-stainless-retry-count".into(), "2".into()));
    assert_eq!(
        crate::budget::plan::priority(&host, &f.config),
        Priority::P2
    );
    // Not configured: a retry keeps the class its other headers give it.
    let plain = filter(r#"{"api":"v1","priority":{"header":"x-p"}}"#);
    assert_eq!(
        crate::budget::plan::priority(&host, &plain.config),
        Priority::P0
    );
}

#[test]
fn with_charge_hits_a_hit_is_charged_what_its_answer_cost() {
    let f = filter(
        r#"{"api":"v1","cache":{"scope":"shared","charge_hits":true},
        "budgets":[{"name":"daily","key":"header:x-tenant","window":"day","base":100000}]}"#,
    );
    let shared = Rc::new(RefCell::new(Default::default()));
    let mut host = answered_upstream(&f, &shared, 1, 64);
    let after_miss = used(&f, &mut host);
    assert_eq!(after_miss, 12);
    let mut host = cache_request(&shared, DETERMINISTIC);
    let mut ex = Exchange::new(f.clone(), 2);
    assert_eq!(send_request(&mut ex, &mut host, 1 << 20), Action::Pause);
    assert_eq!(
        host.reply.as_ref().unwrap().header(CACHE_HEADER),
        Some("hit")
    );
    ex.on_done(&mut host);
    assert_eq!(
        used(&f, &mut host),
        24,
        "the hit is charged its answer's 9 + 3 tokens"
    );
    assert_eq!(
        host.counter_sum("tokenfuse_requests", &["cluster=.=cache;"]),
        1
    );
}

#[test]
fn answers_copied_for_the_cache_are_bounded_per_vm() {
    let f = filter(CACHED);
    let shared = Rc::new(RefCell::new(Default::default()));
    // Another exchange of this VM holds nearly all of the copy allowance.
    let busy = crate::filter::CAPTURE_LIMIT - 10;
    f.cache_capture.set(busy);
    let host = answered_upstream(&f, &shared, 1, 8);
    assert_eq!(
        host.counter("tokenfuse_cache_stores.api=.=chat;.;result=.=incomplete;.;"),
        1
    );
    assert_eq!(
        f.cache_capture.get(),
        busy,
        "the copy's bytes were given back"
    );
    // With room, the same request's answer is kept, and its copy given back too.
    f.cache_capture.set(0);
    let host = answered_upstream(&f, &shared, 2, 8);
    assert_eq!(
        host.counter("tokenfuse_cache_stores.api=.=chat;.;result=.=stored;.;"),
        1
    );
    assert_eq!(f.cache_capture.get(), 0);
}

/// An SSE stream of chat deltas, one event per item of `deltas`, without usage or `[DONE]`.
fn chat_deltas(deltas: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in deltas {
        let data = serde_json::json!({"choices":[{"index":0,"delta":{"content":d}}]});
        out.extend_from_slice(format!("data: {data}\n\n").as_bytes());
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

#[test]
fn a_long_stream_without_usage_is_counted_exactly_as_it_passes() {
    // 1.5 MB of streamed text, more than `max_stream_text_bytes` (1 MiB): counted piece by
    // piece as it arrives, the same count as the whole text's, nothing cut.
    let f = default_filter();
    let words = [
        "It", " is", " 2024", ",", " and", " we", "'re", " here", ".\n\n", "  x",
    ];
    let deltas: Vec<String> = (0..400_000)
        .map(|i| words[i % words.len()].to_string())
        .collect();
    let text = deltas.concat();
    let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut host, 64);
    respond(
        &mut ex,
        &mut host,
        "200",
        "text/event-stream",
        &chat_deltas(&deltas),
        4096,
    );
    let counter = f.tokenizers.counter(Encoding::O200kBase).unwrap();
    assert!(text.len() > 1 << 20);
    assert_eq!(tokens(&host, "completion", "counted"), counter.count(&text));
    assert_eq!(host.counter_sum("tokenfuse_parse_failures", &[]), 0);
}

#[test]
fn an_endless_piece_past_the_cap_is_counted_in_parts_and_said_so() {
    let f = filter(r#"{"api":"v1","max_stream_text_bytes":4096}"#);
    let deltas: Vec<String> = (0..100).map(|_| "a".repeat(100)).collect();
    let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
    let mut ex = Exchange::new(f.clone(), 1);
    send_request(&mut ex, &mut host, 64);
    respond(
        &mut ex,
        &mut host,
        "200",
        "text/event-stream",
        &chat_deltas(&deltas),
        512,
    );
    assert!(tokens(&host, "completion", "counted") > 0);
    assert_eq!(
        host.counter_sum("tokenfuse_parse_failures", &["reason=.=stream_text_cut;"]),
        1
    );
}
