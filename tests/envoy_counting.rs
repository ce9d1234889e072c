//! Token counting end to end: the built `tokenfuse.wasm` in a real Envoy (2 workers) in
//! front of the mock OpenAI-compatible upstream, driven over loopback.
//!
//! Most tests share one Envoy and one pair of mock upstreams (starting Envoy builds the
//! tokenizers in every VM, which takes a second or two). Tests stay independent by giving
//! each its own model name (`gpt-4o-<test>` still maps to o200k_base), so the per-model
//! counters they read are theirs alone, and by tagging their requests with `x-test`.
//! Tests that need another filter configuration start their own Envoy.
//!
//! Expected prompt counts come from two places: literal figures the OpenAI API reported
//! for the cookbook examples, and the crate's own counting code run natively on the same
//! body, which shows the filter counts identically inside V8.

// Test code: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::OnceLock;

use serde_json::{json, Value};
use support::envoy::{Envoy, EnvoySpec};
use support::http;
use support::stack::{counter_sum, native_count, text_tokens, Stack};
use tokenfuse::llm::api::ApiKind;
use tokenfuse::tokenizer::Encoding;

const DEMO_CONFIG: &str = r#"{"api":"v1","inject_stream_usage":true}"#;

fn shared() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| Stack::start(DEMO_CONFIG))
}

fn native_text_tokens(encoding: Encoding, text: &str) -> u64 {
    text_tokens(encoding, text)
}

fn prompt_header(r: &http::Response) -> u64 {
    r.header("x-tokenfuse-prompt-tokens")
        .unwrap_or_else(|| {
            panic!(
                "no x-tokenfuse-prompt-tokens header; status {} body {}",
                r.status,
                r.text()
            )
        })
        .parse()
        .unwrap()
}

fn model_tag(model: &str) -> String {
    format!("model=.={model};")
}

fn chat_body(model: &str, content: &str, stream: bool) -> String {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

const COOKBOOK_MESSAGES: &str = r#"[
    {"role":"system","content":"You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role":"system","name":"example_user","content":"New synergies will help drive top-line growth."},
    {"role":"system","name":"example_assistant","content":"Things working well together will increase revenue."},
    {"role":"system","name":"example_user","content":"Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role":"system","name":"example_assistant","content":"Let's talk later when we're less busy about how to do better."},
    {"role":"user","content":"This late pivot means we don't have time to boil the ocean for the client deliverable."}]"#;

#[test]
fn chat_prompt_count_in_envoy_equals_what_the_openai_api_reported() {
    let s = shared();
    // The OpenAI API reported 124 prompt tokens (gpt-4o) and 129 (gpt-4) for this request.
    for (model, expected) in [
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
        ("gpt-4", 129),
        ("gpt-3.5-turbo", 129),
    ] {
        let body =
            format!(r#"{{"model":"{model}","messages":{COOKBOOK_MESSAGES},"max_tokens":1}}"#);
        let r = s
            .envoy
            .post_json("/v1/chat/completions", &[], &body)
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(prompt_header(&r), expected, "{model}");
    }
}

#[test]
fn tool_definitions_are_counted_as_the_openai_api_counts_them() {
    let s = shared();
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
            {"role": "user", "content": "What's the weather like in San Francisco?"}],
        "tools": [{"type": "function", "function": {
            "name": "get_current_weather", "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}},
              "required": ["location"]}}}]
    });
    let r = s
        .envoy
        .post_json("/v1/chat/completions", &[], &body.to_string())
        .unwrap();
    // The OpenAI API reported 101 prompt tokens for gpt-4o.
    assert_eq!(prompt_header(&r), 101);
}

#[test]
fn every_api_shape_is_counted_in_envoy_as_natively() {
    let s = shared();
    let cases: Vec<(ApiKind, &str, String)> = vec![
        (ApiKind::ChatCompletions, "/v1/chat/completions", json!({"model": "gpt-4.1", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Describe this, in 日本語 please."},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}]}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": {"type": "object"}}}}).to_string()),
        (ApiKind::ChatCompletions, "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            json!({"messages": [{"role": "user", "content": "Azure puts the model in the path."}]}).to_string()),
        (ApiKind::Completions, "/v1/completions", json!({"model": "gpt-3.5-turbo-instruct", "prompt": ["Say this is a test", "and this"], "max_tokens": 7}).to_string()),
        (ApiKind::Completions, "/v1/completions", json!({"model": "davinci-002", "prompt": [1, 2, 3, 4, 5]}).to_string()),
        (ApiKind::Responses, "/v1/responses", json!({"model": "gpt-5", "instructions": "Be terse.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}]},
            {"type": "function_call", "name": "lookup", "arguments": "{\"q\":\"France\"}", "call_id": "c1"},
            {"type": "function_call_output", "call_id": "c1", "output": "Paris"}],
            "tools": [{"type": "function", "name": "lookup", "description": "Look things up.", "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "query"}}}}]}).to_string()),
        (ApiKind::Embeddings, "/v1/embeddings", json!({"model": "text-embedding-3-small", "input": ["The food was delicious and the waiter...", "Second input"]}).to_string()),
        (ApiKind::AnthropicMessages, "/v1/messages", json!({"model": "claude-sonnet-4-5", "max_tokens": 1024,
            "system": [{"type": "text", "text": "You are a pirate."}],
            "messages": [{"role": "user", "content": "Hello, Claude"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]}],
            "tools": [{"name": "get_weather", "description": "Weather by city", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]}).to_string()),
    ];
    for (kind, path, body) in cases {
        let r = s.envoy.post_json(path, &[], &body).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let expected = native_count(kind, body.as_bytes());
        assert!(expected > 0);
        assert_eq!(prompt_header(&r), expected, "{path} {body}");
    }
}

#[test]
fn json_usage_is_read_into_provider_token_stats() {
    let s = shared();
    let model = "gpt-4o-json-usage";
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[
                ("x-mock-prompt-tokens", "1234"),
                ("x-mock-completion-tokens", "56"),
            ],
            &chat_body(model, "hello", false),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let m = model_tag(model);
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[&m, "kind=.=prompt;", "source=.=provider;"],
            1234
        ),
        1234
    );
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[&m, "kind=.=completion;", "source=.=provider;"],
            56
        ),
        56
    );
    assert_eq!(
        counter_sum(
            &s.envoy,
            &["tokenfuse_requests.", &m, "cluster=.=primary;"],
            1
        ),
        1
    );
    assert_eq!(
        counter_sum(&s.envoy, &["tokenfuse_request_prompt_tokens.", &m], 8),
        8
    );
}

#[test]
fn anthropic_json_usage_adds_cache_reads_to_input() {
    let s = shared();
    let model = "claude-json-usage";
    let body =
        json!({"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let r = s
        .envoy
        .post_json(
            "/v1/messages",
            &[
                ("x-mock-prompt-tokens", "10"),
                ("x-mock-cached-tokens", "90"),
                ("x-mock-completion-tokens", "4"),
            ],
            &body,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let m = model_tag(model);
    assert_eq!(
        counter_sum(&s.envoy, &[&m, "kind=.=prompt;", "source=.=provider;"], 100),
        100
    );
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[&m, "kind=.=completion;", "source=.=provider;"],
            4
        ),
        4
    );
}

/// A streamed chat completion whose SSE body the mock writes `split` bytes per HTTP chunk,
/// with a pause between writes so Envoy hands the filter the pieces separately.
fn stream_chat(s: &Stack, model: &str, split: usize, extra: &[(&str, &str)]) -> http::Response {
    let split = split.to_string();
    let mut headers = vec![
        ("x-mock-split", split.as_str()),
        ("x-mock-chunk-delay-ms", "1"),
        ("x-mock-prompt-tokens", "21"),
        ("x-mock-completion-tokens", "13"),
    ];
    headers.extend_from_slice(extra);
    s.envoy
        .post_json(
            "/v1/chat/completions",
            &headers,
            &chat_body(model, "hello", true),
        )
        .unwrap()
}

#[test]
fn sse_usage_is_read_when_envoy_splits_events_at_every_byte() {
    let s = shared();
    for split in [1usize, 2, 3, 5, 8, 13, 64, 4096] {
        let model = format!("gpt-4o-sse-split-{split}");
        let r = stream_chat(
            s,
            &model,
            split,
            &[(
                "x-mock-completion",
                "b64:44GT44KT44Gr44Gh44GvIPCfjokgd29ybGQ=",
            )],
        );
        assert_eq!(r.status, 200);
        let text = r.text();
        assert!(
            text.contains("[DONE]"),
            "stream must reach the client whole"
        );
        let m = model_tag(&model);
        assert_eq!(
            counter_sum(
                &s.envoy,
                &[&m, "kind=.=completion;", "source=.=provider;"],
                13
            ),
            13,
            "split {split}"
        );
        assert_eq!(
            counter_sum(&s.envoy, &[&m, "kind=.=prompt;", "source=.=provider;"], 21),
            21,
            "split {split}"
        );
        assert_eq!(
            counter_sum(&s.envoy, &["tokenfuse_parse_failures", &m], 0),
            0
        );
    }
    // Every stream's events arrived intact: no parse failure anywhere for these models.
    assert_eq!(
        counter_sum(&s.envoy, &["tokenfuse_parse_failures", "sse_event"], 0),
        0
    );
}

#[test]
fn streaming_chat_requests_get_include_usage_injected_with_a_correct_content_length() {
    let s = shared();
    let model = "gpt-4o-inject";
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[("x-test", "inject")],
            &chat_body(model, "hello", true),
        )
        .unwrap();
    assert_eq!(r.header("x-mock-include-usage"), Some("true"));
    let seen = s
        .primary
        .requests()
        .into_iter()
        .find(|q| q.header("x-test") == Some("inject"))
        .expect("the upstream saw the request");
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["messages"][0]["content"], "hello");
    // Envoy forwards the content-length the filter set; it must be the new body's length
    // (a stale one would truncate the body upstream).
    let cl = seen
        .header("content-length")
        .expect("content-length forwarded");
    assert_eq!(cl.parse::<usize>().unwrap(), seen.body.len());
    assert!(seen.body.len() > chat_body(model, "hello", true).len());
}

#[test]
fn stream_without_usage_is_counted_from_its_deltas() {
    let s = shared();
    // "こんにちは 🎉 world" — multi-byte characters split across one-byte chunks.
    let text = "こんにちは 🎉 world";
    for (path, kind, body) in [
        ("/v1/chat/completions", "chat", chat_body("gpt-4o-deltas-chat", "hi", true)),
        ("/v1/responses", "responses", json!({"model": "gpt-4o-deltas-resp", "input": "hi", "stream": true}).to_string()),
        ("/v1/messages", "anthropic", json!({"model": "claude-deltas", "max_tokens": 9, "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string()),
    ] {
        let r = s
            .envoy
            .post_json(path, &[("x-mock-usage", "absent"), ("x-mock-split", "1"), ("x-mock-chunk-delay-ms", "1"), ("x-mock-completion", "b64:44GT44KT44Gr44Gh44GvIPCfjokgd29ybGQ=")], &body)
            .unwrap();
        assert_eq!(r.status, 200, "{kind}");
        let model = serde_json::from_str::<Value>(&body).unwrap()["model"].as_str().unwrap().to_string();
        let m = model_tag(&model);
        // Anthropic models borrow the fallback encoding (o200k_base, factor 1.0 here).
        let expected = native_text_tokens(Encoding::O200kBase, text);
        assert_eq!(counter_sum(&s.envoy, &[&m, "kind=.=completion;", "source=.=counted;"], expected), expected, "{kind}");
        assert_eq!(counter_sum(&s.envoy, &["tokenfuse_usage_counted.", &m], 1), 1, "{kind}");
        let prompt = counter_sum(&s.envoy, &[&m, "kind=.=prompt;", "source=.=counted;"], 1);
        assert_eq!(prompt, prompt_header(&r), "{kind}: the counted prompt is the filter's own count");
    }
}

#[test]
fn a_stream_longer_than_the_text_cap_without_usage_is_counted_exactly() {
    // 1.3 MB of streamed text, more than `max_stream_text_bytes` (1 MiB): counted as it
    // arrives, piece by piece, the same count as the whole text's.
    let s = shared();
    let unit = "It's 2024, and we're here.\n\n  Numbers 1234567 and   spaces!? ";
    let repeat = 1_300_000 / unit.len() + 1;
    let text = unit.repeat(repeat);
    let body = chat_body("gpt-4o-long-stream", "hi", true);
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[
                ("x-mock-usage", "absent"),
                // `unit` in base64 (a header cannot carry its newlines).
                (
                    "x-mock-completion",
                    "b64:SXQncyAyMDI0LCBhbmQgd2UncmUgaGVyZS4KCiAgTnVtYmVycyAxMjM0NTY3IGFuZCAgIHNwYWNlcyE/IA==",
                ),
                ("x-mock-repeat", &repeat.to_string()),
                ("x-mock-delta-chars", "37"),
            ],
            &body,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(text.len() > 1 << 20);
    let m = model_tag("gpt-4o-long-stream");
    let expected = native_text_tokens(Encoding::O200kBase, &text);
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[&m, "kind=.=completion;", "source=.=counted;"],
            expected
        ),
        expected
    );
    assert_eq!(
        counter_sum(
            &s.envoy,
            &["tokenfuse_parse_failures", "stream_text_cut"],
            0
        ),
        0,
        "nothing cut"
    );
}

#[test]
fn responses_and_anthropic_streams_report_usage() {
    let s = shared();
    let r = s
        .envoy
        .post_json(
            "/v1/responses",
            &[
                ("x-mock-split", "7"),
                ("x-mock-prompt-tokens", "31"),
                ("x-mock-completion-tokens", "17"),
            ],
            &json!({"model": "gpt-4o-resp-stream", "input": "hi", "stream": true}).to_string(),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let m = model_tag("gpt-4o-resp-stream");
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[&m, "kind=.=completion;", "source=.=provider;"],
            17
        ),
        17
    );
    assert_eq!(
        counter_sum(&s.envoy, &[&m, "kind=.=prompt;", "source=.=provider;"], 31),
        31
    );

    let r = s
        .envoy
        .post_json("/v1/messages", &[("x-mock-split", "5"), ("x-mock-prompt-tokens", "40"), ("x-mock-cached-tokens", "2"), ("x-mock-completion-tokens", "9")],
                   &json!({"model": "claude-stream", "max_tokens": 9, "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string())
        .unwrap();
    assert_eq!(r.status, 200);
    let m = model_tag("claude-stream");
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[&m, "kind=.=completion;", "source=.=provider;"],
            9
        ),
        9
    );
    assert_eq!(
        counter_sum(&s.envoy, &[&m, "kind=.=prompt;", "source=.=provider;"], 42),
        42
    );
}

#[test]
fn non_llm_requests_pass_untouched() {
    let s = shared();
    let before = counter_sum(
        &s.envoy,
        &["tokenfuse_passthrough.", "reason=.=not_llm;"],
        0,
    );
    let r = s
        .envoy
        .get("/v1/models", &[("x-test", "passthrough-get")])
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("x-tokenfuse-prompt-tokens").is_none());
    let body = "{\"not\": \"an llm call\", \"messages\": 3}";
    let r = http::request(
        s.envoy.listener_port,
        "POST",
        "/upload",
        &[("x-test", "passthrough-post"), ("accept-encoding", "gzip")],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("x-tokenfuse-prompt-tokens").is_none());
    let seen = s
        .primary
        .requests()
        .into_iter()
        .find(|q| q.header("x-test") == Some("passthrough-post"))
        .unwrap();
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(
        seen.header("accept-encoding"),
        Some("gzip"),
        "non-LLM requests keep their headers"
    );
    assert!(
        counter_sum(
            &s.envoy,
            &["tokenfuse_passthrough.", "reason=.=not_llm;"],
            before + 2
        ) >= before + 2
    );
}

#[test]
fn economy_route_is_tagged_with_its_cluster() {
    // A spent reroute budget sends the request to the economy cluster with the cheaper
    // model; the stats carry that cluster and the model that served.
    let s = Stack::start(
        &json!({
            "api": "v1",
            "budgets": [{"name": "usd", "key": "header:x-tenant", "window": "day", "unit": "usd",
                         "base": 0, "action": "reroute"}],
            "prices": {"*": {"input": 1, "output": 1}},
            "reroute": {"models": {"gpt-4o-economy-tag": "gpt-4o-economy-tag-mini"}},
        })
        .to_string(),
    );
    let (model, served) = ("gpt-4o-economy-tag", "gpt-4o-economy-tag-mini");
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[("x-tenant", "spent")],
            &chat_body(model, "hi", false),
        )
        .unwrap();
    assert_eq!(r.header("x-mock-upstream"), Some("economy"));
    assert_eq!(r.header("x-tokenfuse-rerouted-to"), Some(served));
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[
                "tokenfuse_requests.",
                &model_tag(served),
                "cluster=.=economy;"
            ],
            1
        ),
        1
    );
    let seen = s
        .economy
        .requests()
        .into_iter()
        .find(|q| q.json().is_some_and(|v| v["model"] == served))
        .expect("the economy upstream got the request");
    assert_eq!(
        seen.header("x-tokenfuse-route"),
        None,
        "the routing header stays in Envoy"
    );
}

#[test]
fn prometheus_output_has_labels_and_keeps_dots_in_model_names() {
    let s = shared();
    let model = "gpt-4.1-prom.test";
    s.envoy
        .post_json("/v1/chat/completions", &[], &chat_body(model, "hi", false))
        .unwrap();
    counter_sum(&s.envoy, &[&model_tag(model)], 1);
    let prom = s.envoy.prometheus();
    let line = prom
        .lines()
        .find(|l| l.starts_with("tokenfuse_requests{") && l.contains("model=\"gpt-4.1-prom.test\""))
        .unwrap_or_else(|| panic!("no labelled series for {model} in:\n{prom}"));
    assert!(
        line.contains("api=\"chat\"") && line.contains("cluster=\"primary\""),
        "{line}"
    );
}

#[test]
fn unreadable_request_bodies_get_a_400_and_the_vm_stays_alive() {
    let s = shared();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated json",
            br#"{"model":"gpt-4o","messages":[{"role":"us"#.to_vec(),
            "invalid_json",
        ),
        (
            "invalid utf-8",
            b"{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"
                .to_vec(),
            "invalid_json",
        ),
        (
            "not an object",
            b"[1,2,3]".to_vec(),
            "invalid_request_shape",
        ),
        (
            "duplicate model",
            br#"{"model":"gpt-4o-mini","model":"gpt-4o","messages":[]}"#.to_vec(),
            "invalid_request_shape",
        ),
        (
            "negative max_tokens",
            br#"{"model":"gpt-4o","messages":[],"max_tokens":-1}"#.to_vec(),
            "invalid_value",
        ),
        ("empty body", Vec::new(), "empty_body"),
    ];
    for (name, body, code) in cases {
        let r = http::request(
            s.envoy.listener_port,
            "POST",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-test", "malformed"),
            ],
            &body,
        )
        .unwrap();
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"), "{name}");
        let v = r.json();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{name}");
        assert_eq!(v["error"]["code"], code, "{name}");
    }
    assert!(
        s.primary
            .requests()
            .iter()
            .all(|q| q.header("x-test") != Some("malformed")),
        "rejected requests never reach the upstream"
    );
    // The VMs are alive and counting.
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[],
            &chat_body("gpt-4o", "hello", false),
        )
        .unwrap();
    assert_eq!(prompt_header(&r), 8);
    assert!(s.envoy.alive());
    let log = s.envoy.log();
    assert!(
        !log.contains("panicked") && !log.contains("Function: proxy_on"),
        "VM trouble in log"
    );
}

#[test]
fn malformed_bodies_pass_through_when_configured_to() {
    let stack = Stack::start(r#"{"api":"v1","malformed_request":"pass"}"#);
    let r = http::request(
        stack.envoy.listener_port,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        b"{not json",
    )
    .unwrap();
    assert_eq!(
        r.status, 400,
        "the mock upstream refuses invalid JSON itself"
    );
    assert_eq!(r.header("x-mock-upstream"), Some("primary"));
    assert!(r.header("x-tokenfuse-prompt-tokens").is_none());
    assert_eq!(stack.primary.requests().last().unwrap().body, b"{not json");
    assert_eq!(
        counter_sum(
            &stack.envoy,
            &["tokenfuse_passthrough.", "reason=.=malformed;"],
            1
        ),
        1
    );
}

#[test]
fn bad_plugin_config_is_refused_with_a_log_line_naming_the_field() {
    for (config, needle) in [
        (
            r#"{"api":"v1","inject_stream_usge":true}"#,
            "field `inject_stream_usge`",
        ),
        (r#"{"api":"v2"}"#, "field `api`: unsupported schema version"),
        (
            r#"{"api":"v1","tokenizer":{"models":[{"match":"gpt*x","encoding":"o200k_base"}]}}"#,
            "field `tokenizer.models[0].match`",
        ),
        ("not json", "not valid JSON"),
    ] {
        let spec = EnvoySpec {
            ..EnvoySpec::new(config, 1, 2)
        };
        let log = Envoy::start_expect_failure(spec);
        assert!(
            log.contains("invalid tokenfuse configuration") && log.contains(needle),
            "{config}: missing {needle:?} in:\n{log}"
        );
    }
}

#[test]
fn upstream_errors_are_counted_and_bill_nothing() {
    let s = shared();
    let model = "gpt-4o-upstream-500";
    let r = s
        .envoy
        .post_json(
            "/v1/chat/completions",
            &[("x-mock-status", "500")],
            &chat_body(model, "hi", false),
        )
        .unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(
        prompt_header(&r),
        8,
        "error responses still say what the gateway counted"
    );
    let m = model_tag(model);
    assert_eq!(
        counter_sum(
            &s.envoy,
            &["tokenfuse_upstream_errors.", &m, "status=.=5xx;"],
            1
        ),
        1
    );
    assert_eq!(counter_sum(&s.envoy, &["tokenfuse_tokens.", &m], 0), 0);
}

#[test]
fn a_stream_cut_by_the_upstream_is_charged_for_what_was_streamed() {
    let s = shared();
    let model = "gpt-4o-cut";
    // Cut inside the third delta event: two deltas ("Hell", "o! H") reached the client.
    let cut = 2 * 170 + 60;
    let _ = s.envoy.post_json(
        "/v1/chat/completions",
        &[
            ("x-mock-cut-after", &cut.to_string()),
            ("x-mock-split", "16"),
        ],
        &chat_body(model, "hi", true),
    );
    let m = model_tag(model);
    assert_eq!(counter_sum(&s.envoy, &["tokenfuse_requests.", &m], 1), 1);
    assert_eq!(
        counter_sum(&s.envoy, &["tokenfuse_responses_incomplete.", &m], 1),
        1
    );
    let counted = counter_sum(
        &s.envoy,
        &[&m, "kind=.=completion;", "source=.=counted;"],
        1,
    );
    assert!(
        (1..7).contains(&counted),
        "charged {counted} for a partial stream"
    );
    assert_eq!(counter_sum(&s.envoy, &[&m, "source=.=provider;"], 0), 0);
}

#[test]
fn a_client_abort_mid_stream_is_settled() {
    let s = shared();
    let model = "gpt-4o-client-abort";
    let got = http::stream_then_abort(
        s.envoy.listener_port,
        "/v1/chat/completions",
        &[("x-mock-chunk-delay-ms", "200")],
        &chat_body(model, "hi", true),
        100,
    )
    .unwrap();
    assert!(!got.is_empty());
    let m = model_tag(model);
    assert_eq!(counter_sum(&s.envoy, &["tokenfuse_requests.", &m], 1), 1);
    assert_eq!(
        counter_sum(&s.envoy, &["tokenfuse_responses_incomplete.", &m], 1),
        1
    );
    let counted = counter_sum(
        &s.envoy,
        &[&m, "kind=.=completion;", "source=.=counted;"],
        1,
    );
    assert!((1..7).contains(&counted), "charged {counted}");
}

#[test]
fn a_large_prompt_is_counted_exactly() {
    let s = shared();
    let paragraph = "The quick brown fox jumps over the lazy dog. 素早い茶色の狐。 fn main() { println!(\"hi\"); }\n";
    let content = paragraph.repeat(10_000); // about 1 MB
    let body = chat_body("gpt-4o", &content, false);
    let r = s
        .envoy
        .post_json("/v1/chat/completions", &[], &body)
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        prompt_header(&r),
        native_count(ApiKind::ChatCompletions, body.as_bytes())
    );
}
