//! The work a request can cost, for the worst body shapes there are, against the work of
//! prose of the same size (`make bench`; issue 15: no request may cost more than about
//! linear work in its body size).
//!
//! Each shape is built at several sizes and sent through the whole exchange (request
//! headers, body: parse, count, enforce, truncate where it applies; response: usage read
//! from JSON, or an SSE stream metered event by event; settlement) with the fake host,
//! natively. Counting is uncached (`tokenizer.cache_bytes: 0`), so a repeated body costs
//! what a new one does. Prints one JSON line per shape and size:
//! `{"kind":"worst_shape","shape":…,"bytes":…,"median_us":…,"us_per_kb":…}`.
//!
//! ```text
//! cargo run --release --features testkit --example worst_shapes [-- --max-kb 1024]
//! ```
//!
//! A benchmark, not a test: it asserts only that every exchange went through (a 200, or the
//! refusal the shape is meant to meet).

use std::rc::Rc;
use std::time::Instant;

#[path = "support/bench.rs"]
#[allow(dead_code)] // the cache eviction is exchange_bench's
mod bench;
use bench::median;
use serde_json::json;
use tokenfuse::config::Config;
use tokenfuse::exchange::Exchange;
use tokenfuse::filter::Filter;
use tokenfuse::host::fake::FakeHost;

/// A body's request and response sides.
struct Case {
    path: &'static str,
    request: Vec<u8>,
    /// `(content-type, body)` of the upstream's answer.
    response: (&'static str, Vec<u8>),
}

const WORDS: &[&str] = &[
    "the", "budget", "of", "tokens", "is", "spent", "when", "agents", "loop", "over", "their",
    "plans,", "and", "each", "retry", "costs", "again.", "Envoy", "counts", "them", "before",
    "they", "reach", "a", "provider", "that", "bills", "every", "one.",
];

/// About `bytes` of English-like prose.
fn prose(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 16);
    let mut i = 0usize;
    while out.len() < bytes {
        out.push_str(WORDS[i % WORDS.len()]);
        out.push(' ');
        i = i.wrapping_mul(31).wrapping_add(7) % 1009;
    }
    out
}

fn chat_body(messages: serde_json::Value, extra: serde_json::Value) -> Vec<u8> {
    let mut body = json!({"model": "gpt-4o", "max_tokens": 16, "messages": messages});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body.to_string().into_bytes()
}

fn json_answer() -> (&'static str, Vec<u8>) {
    (
        "application/json",
        br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":10,"completion_tokens":1}}"#.to_vec(),
    )
}

fn one_message(text: String) -> Vec<u8> {
    chat_body(json!([{"role": "user", "content": text}]), json!({}))
}

/// The shapes, each at about `bytes`.
fn shapes(bytes: usize) -> Vec<(&'static str, Case)> {
    let chat = |request: Vec<u8>| Case {
        path: "/v1/chat/completions",
        request,
        response: json_answer(),
    };
    let repeat = |unit: &str| unit.repeat(bytes / unit.len().max(1));
    // Tiny messages: the shape that made truncation quadratic.
    let tiny = || {
        let n = bytes / 32;
        json!(vec![json!({"role": "user", "content": "hi"}); n.max(1)])
    };
    let stream_of = |events: String| Case {
        path: "/v1/chat/completions",
        request: chat_body(
            json!([{"role": "user", "content": "hi"}]),
            json!({"stream": true}),
        ),
        response: ("text/event-stream", events.into_bytes()),
    };
    let sse_event = |content: &str, index: usize| {
        format!(
            "data: {}\n\n",
            json!({"choices": [{"index": index, "delta": {"content": content}}]})
        )
    };
    let deep = bytes / 2;
    vec![
        ("prose", chat(one_message(prose(bytes)))),
        ("tiny_messages", chat(chat_body(tiny(), json!({})))),
        (
            "tiny_messages_truncated",
            chat(chat_body(tiny(), json!({}))),
        ),
        ("one_letter_repeated", chat(one_message(repeat("a")))),
        (
            "letters_without_spaces",
            chat(one_message(repeat("qwertzuiopasdfghjklyxcvbnm"))),
        ),
        ("digits", chat(one_message(repeat("0123456789")))),
        (
            "cjk_without_spaces",
            chat(one_message(repeat("漢字仮名交じり文"))),
        ),
        ("emoji", chat(one_message(repeat("😀👍🏽🚀")))),
        ("spaces", chat(one_message(repeat(" ")))),
        ("escapes", {
            // `\u00e9` escapes: every character of the content is decoded.
            let escaped = "\\u00e9".repeat(bytes / 6);
            let body = format!(
                r#"{{"model":"gpt-4o","max_tokens":16,"messages":[{{"role":"user","content":"{escaped}"}}]}}"#
            );
            chat(body.into_bytes())
        }),
        ("deep_nesting_skipped", {
            let body = format!(
                r#"{{"model":"gpt-4o","max_tokens":16,"messages":[{{"role":"user","content":"hi"}}],"metadata":{}0{}}}"#,
                "[".repeat(deep / 2),
                "]".repeat(deep / 2)
            );
            chat(body.into_bytes())
        }),
        ("many_tools", {
            let n = bytes / 120;
            let tools: Vec<_> = (0..n.max(1))
                .map(|i| json!({"type": "function", "function": {"name": format!("f{i}"), "description": "d",
                    "parameters": {"type": "object", "properties": {"x": {"type": "string", "enum": ["a", "b", "c"]}}}}}))
                .collect();
            chat(chat_body(
                json!([{"role": "user", "content": "hi"}]),
                json!({"tools": tools}),
            ))
        }),
        (
            "sse_one_char_deltas",
            stream_of((0..bytes / 40).map(|_| sse_event("x", 0)).collect()),
        ),
        (
            "sse_many_choices",
            stream_of(
                (0..bytes / 48)
                    .map(|i| sse_event("word ", i % 64))
                    .collect(),
            ),
        ),
    ]
}

/// A filter with a budget (reservation and settlement in every exchange); with `truncate`,
/// a 200-token per-request cap that truncation must meet.
fn filter(truncate: bool) -> Rc<Filter> {
    let mut budget =
        json!({"name": "day", "key": "header:x-tenant", "window": "day", "base": 1e15});
    if truncate {
        budget["max_request_tokens"] = 200.into();
        budget["oversize"] = "truncate".into();
    }
    let config = json!({
        "api": "v1",
        "tokenizer": {"cache_bytes": 0},
        "budgets": [budget],
    });
    let config = match Config::parse(config.to_string().as_bytes()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config: {e}");
            std::process::exit(2);
        }
    };
    match Filter::new(config) {
        Ok(f) => Rc::new(f),
        Err(e) => {
            eprintln!("filter: {e}");
            std::process::exit(2);
        }
    }
}

/// One whole exchange; the status the client saw.
fn exchange(filter: &Rc<Filter>, case: &Case, id: u32) -> u32 {
    let mut host = FakeHost::post(case.path, &case.request);
    host.now_ms.set(1_800_000_000_000);
    host.request_headers
        .push(("x-tenant".into(), "bench".into()));
    let mut ex = Exchange::new(Rc::clone(filter), id);
    ex.on_request_headers(&mut host, false);
    ex.on_request_body(&mut host, case.request.len(), true);
    if let Some(reply) = &host.reply {
        return reply.status;
    }
    let (content_type, body) = &case.response;
    host.response_headers = vec![
        (":status".into(), "200".into()),
        ("content-type".into(), (*content_type).into()),
    ];
    ex.on_response_headers(&mut host, false);
    // The answer in 16 KiB chunks, as Envoy hands them over.
    for chunk in body.chunks(16 * 1024) {
        host.response_chunk = chunk.to_vec();
        ex.on_response_body(&mut host, chunk.len(), false);
    }
    host.response_chunk.clear();
    ex.on_response_body(&mut host, 0, true);
    ex.on_done(&mut host);
    200
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let max_kb: usize = args
        .iter()
        .position(|a| a == "--max-kb")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let (plain, truncating) = (filter(false), filter(true));
    let mut id = 0u32;
    let mut kb = 16;
    while kb <= max_kb {
        for (shape, case) in shapes(kb * 1024) {
            let filter = if shape.ends_with("_truncated") {
                &truncating
            } else {
                &plain
            };
            let mut times = Vec::new();
            let started = Instant::now();
            // At least 3 runs and 200 ms.
            while times.len() < 3 || started.elapsed().as_millis() < 200 {
                id = id.wrapping_add(1);
                let t = Instant::now();
                let status = exchange(filter, &case, id);
                times.push(t.elapsed().as_secs_f64() * 1e6);
                if status != 200 {
                    eprintln!("{shape} at {kb} KiB: status {status}");

                    std::process::exit(1);
                }
                if times.len() >= 50 {
                    break;
                }
            }
            let us = median(times);
            let bytes = case.request.len() + case.response.1.len();
            println!(
                "{}",
                json!({"kind": "worst_shape", "shape": shape, "kb": kb, "bytes": bytes,
                       "median_us": (us * 10.0).round() / 10.0,
                       "us_per_kb": (us / (bytes as f64 / 1024.0) * 100.0).round() / 100.0})
            );
        }
        kb *= 4;
    }
}
