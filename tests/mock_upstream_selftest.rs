//! Self-test of the mock LLM upstream (`tests/support/mock_upstream.rs`).
//!
//! The Envoy integration tests trust the mock to frame HTTP/1.1 correctly and
//! to honour its `x-mock-*` control headers; a bug here would show up there as
//! a confusing filter failure. So these tests talk to the mock directly over a
//! raw `TcpStream` (no HTTP client library that could paper over framing
//! mistakes) and check: response shapes, SSE byte-splitting, cut streams,
//! chunked request bodies, keep-alive, errors and usage accounting.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/mock_upstream.rs"]
mod mock_upstream;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mock_upstream::{MockUpstream, UsageTotals, DEFAULT_COMPLETION};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// A minimal raw HTTP/1.1 client
// ---------------------------------------------------------------------------

/// A response as read off the wire.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    /// De-chunked body (for a cut response: whatever arrived).
    body: Vec<u8>,
    /// Chunk payloads as framed by the server (empty for content-length bodies).
    chunks: Vec<Vec<u8>>,
    /// False if the connection closed before the message was complete.
    complete: bool,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("utf-8 body")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }

    /// SSE events as (event name, data) pairs.
    fn sse(&self) -> Vec<(Option<String>, String)> {
        let text = self.text();
        assert!(
            text.ends_with("\n\n"),
            "SSE body must end with a blank line: {text:?}"
        );
        text.split_terminator("\n\n")
            .map(|block| {
                let mut name = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(v.to_owned());
                    } else {
                        panic!("unexpected SSE line {line:?}");
                    }
                }
                (name, data.expect("every event has data"))
            })
            .collect()
    }

    /// The `data:` payloads of an OpenAI-style stream, `[DONE]` excluded,
    /// parsed; plus whether `[DONE]` ended the stream.
    fn openai_chunks(&self) -> (Vec<Value>, bool) {
        let mut data: Vec<String> = self.sse().into_iter().map(|(_, d)| d).collect();
        let done = data.last().is_some_and(|d| d == "[DONE]");
        if done {
            data.pop();
        }
        (
            data.iter()
                .map(|d| serde_json::from_str(d).unwrap())
                .collect(),
            done,
        )
    }
}

/// One keep-alive connection to the mock.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(mock: &MockUpstream) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", mock.port())).unwrap();
        // A mock bug must fail the test, not hang it.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Response {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nhost: mock\r\n");
        for (name, value) in headers {
            write!(raw, "{name}: {value}\r\n").unwrap();
        }
        if !body.is_empty() || method == "POST" {
            let length = body.len();
            write!(
                raw,
                "content-type: application/json\r\ncontent-length: {length}\r\n"
            )
            .unwrap();
        }
        raw.push_str("\r\n");
        raw.push_str(body);
        self.send_raw(raw.as_bytes());
        self.read_response()
    }

    fn post(&mut self, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
        self.request("POST", path, headers, &body.to_string())
    }

    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_owned()),
        }
    }

    fn read_response(&mut self) -> Response {
        let status_line = self.line().expect("status line");
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        while let Some(line) = self.line().filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
            chunks: Vec::new(),
            complete: false,
        };
        if response.header("transfer-encoding") == Some("chunked") {
            self.read_chunked(&mut response);
        } else {
            let length: usize = response.header("content-length").unwrap().parse().unwrap();
            response.body.resize(length, 0);
            response.complete = self.reader.read_exact(&mut response.body).is_ok();
        }
        response
    }

    fn read_chunked(&mut self, response: &mut Response) {
        while let Some(size_line) = self.line() {
            let size = usize::from_str_radix(&size_line, 16).unwrap();
            if size == 0 {
                response.complete = self.line().as_deref() == Some("");
                return;
            }
            let mut chunk = vec![0; size];
            self.reader.read_exact(&mut chunk).unwrap();
            assert_eq!(self.line().as_deref(), Some(""), "chunk must end with CRLF");
            response.body.extend_from_slice(&chunk);
            response.chunks.push(chunk);
        }
    }

    /// True once the server has closed the connection (EOF on read).
    fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0))
    }
}

fn start() -> MockUpstream {
    MockUpstream::start("selftest").unwrap()
}

/// Standard base64, for the `b64:` form of `x-mock-completion`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn chat_stream_body() -> Value {
    json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": "hi"}]})
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn healthz_and_passthrough_paths() {
    let mock = start();
    let mut client = Client::connect(&mock);

    let health = client.request("GET", "/healthz", &[], "");
    assert_eq!((health.status, health.text().as_str()), (200, "ok"));
    assert_eq!(health.header("x-mock-upstream"), Some("selftest"));

    for path in ["/v1/models", "/static/x?y=1"] {
        let response = client.request("GET", path, &[], "");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("text/plain"));
        assert_eq!(response.text(), "passthrough selftest");
    }
    assert_eq!(mock.usage_totals(), UsageTotals::default());
}

#[test]
fn chat_json_response_has_openai_shape() {
    let mock = start();
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let headers = [
        ("x-mock-prompt-tokens", "5"),
        ("x-mock-completion-tokens", "3"),
        ("x-mock-cached-tokens", "2"),
        ("x-test-id", "Shape"),
    ];
    let response =
        Client::connect(&mock).post("/v1/chat/completions?api-version=1", &headers, &body);

    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("x-mock-upstream"), Some("selftest"));
    let expected = json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": DEFAULT_COMPLETION},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                  "prompt_tokens_details": {"cached_tokens": 2},
                  "completion_tokens_details": {"reasoning_tokens": 0}}
    });
    assert_eq!(response.json(), expected);

    let recorded = mock.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path, "/v1/chat/completions?api-version=1");
    assert_eq!(recorded[0].header("X-Test-Id"), Some("Shape"));
    assert!(
        recorded[0].headers.iter().any(|(n, _)| n == "x-test-id"),
        "names lowercased"
    );
    assert_eq!(recorded[0].json(), Some(body));
    assert_eq!(recorded[0].upstream, "selftest");
    assert_eq!(
        mock.usage_totals(),
        UsageTotals {
            prompt_tokens: 5,
            completion_tokens: 3,
            responses: 1
        }
    );
}

#[test]
fn every_llm_api_answers_json_with_model_and_usage() {
    let mock = start();
    let mut client = Client::connect(&mock);
    let cached = [("x-mock-cached-tokens", "4")];
    let body = |model: &str| json!({"model": model, "input": "x"});

    let azure = client.post(
        "/openai/deployments/d1/chat/completions?api-version=2024-10-21",
        &[],
        &body("az"),
    );
    assert_eq!(azure.json()["object"], "chat.completion");
    assert_eq!(azure.json()["model"], "az");

    let legacy = client.post("/v1/completions", &[], &body("davinci")).json();
    assert_eq!(legacy["object"], "text_completion");
    assert_eq!(legacy["choices"][0]["text"], DEFAULT_COMPLETION);
    assert_eq!(
        legacy["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
    );

    let responses = client.post("/v1/responses", &cached, &body("gpt-5")).json();
    assert_eq!(
        responses["output"][0]["content"][0]["text"],
        DEFAULT_COMPLETION
    );
    assert_eq!(responses["usage"]["input_tokens"], 11);
    assert_eq!(responses["usage"]["output_tokens"], 7);
    assert_eq!(
        responses["usage"]["input_tokens_details"]["cached_tokens"],
        4
    );

    // Embeddings are never streamed, even when asked to.
    let embeddings = client.post(
        "/v1/embeddings",
        &[],
        &json!({"model": "emb", "stream": true}),
    );
    assert_eq!(embeddings.header("content-type"), Some("application/json"));
    assert_eq!(
        embeddings.json()["usage"],
        json!({"prompt_tokens": 11, "total_tokens": 11})
    );

    let anthropic = client.post("/v1/messages", &cached, &body("claude")).json();
    assert_eq!(anthropic["content"][0]["text"], DEFAULT_COMPLETION);
    assert_eq!(
        anthropic["usage"],
        json!({"input_tokens": 11, "output_tokens": 7,
               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4})
    );

    let absent = client
        .post(
            "/v1/messages",
            &[("x-mock-usage", "absent")],
            &body("claude"),
        )
        .json();
    assert!(absent.get("usage").is_none());

    // chat 11+7, completions 11+7, responses 11+7, embeddings 11+0, anthropic 11+7.
    assert_eq!(
        mock.usage_totals(),
        UsageTotals {
            prompt_tokens: 55,
            completion_tokens: 28,
            responses: 5
        }
    );
}

#[test]
fn split_stream_decodes_to_the_same_events() {
    let mock = start();
    let text = "こんにちは、世界 🌍🚀 tokens!";
    let completion = format!("b64:{}", base64(text.as_bytes()));
    let mut client = Client::connect(&mock);

    let whole = client.post(
        "/v1/chat/completions",
        &[("x-mock-completion", &completion)],
        &chat_stream_body(),
    );
    let split = client.post(
        "/v1/chat/completions",
        &[("x-mock-completion", &completion), ("x-mock-split", "1")],
        &chat_stream_body(),
    );

    for response in [&whole, &split] {
        assert_eq!(response.status, 200);
        assert!(response.complete);
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        assert_eq!(response.header("cache-control"), Some("no-cache"));
        assert_eq!(response.header("x-mock-include-usage"), Some("true"));
    }
    // Same bytes, different framing: one chunk per event vs one per byte
    // (so multi-byte characters straddle chunks).
    assert_eq!(whole.body, split.body);
    assert_eq!(whole.chunks.len(), whole.sse().len());
    assert_eq!(split.chunks.len(), split.body.len());

    let (chunks, done) = whole.openai_chunks();
    assert!(done, "stream ends with [DONE]");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, text);
    assert!(chunks.len() > 4, "text is streamed in several deltas");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["total_tokens"], 18);
    assert_eq!(
        mock.usage_totals(),
        UsageTotals {
            prompt_tokens: 22,
            completion_tokens: 14,
            responses: 2
        }
    );
}

#[test]
fn chat_stream_usage_needs_include_usage() {
    let mock = start();
    let mut client = Client::connect(&mock);
    let body = json!({"model": "gpt-4o-mini", "stream": true});

    let response = client.post("/v1/chat/completions", &[], &body);
    assert_eq!(response.header("x-mock-include-usage"), Some("false"));
    let (chunks, done) = response.openai_chunks();
    assert!(done);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));

    // Asked for, but suppressed by the test: still no usage; and no [DONE].
    let headers = [("x-mock-usage", "absent"), ("x-mock-no-done", "1")];
    let response = client.post("/v1/completions", &headers, &chat_stream_body());
    assert_eq!(response.header("x-mock-include-usage"), Some("true"));
    let (chunks, done) = response.openai_chunks();
    assert!(!done);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(chunks[0]["choices"][0]["text"], "Hell");

    assert_eq!(mock.usage_totals(), UsageTotals::default());
}

#[test]
fn responses_and_anthropic_streams_have_their_event_sequences() {
    let mock = start();
    let mut client = Client::connect(&mock);
    let body = json!({"model": "m", "stream": true});
    let names =
        |r: &Response| -> Vec<String> { r.sse().into_iter().map(|(n, _)| n.unwrap()).collect() };
    let data = |r: &Response, name: &str| -> Value {
        let (_, d) = r
            .sse()
            .into_iter()
            .find(|(n, _)| n.as_deref() == Some(name))
            .unwrap();
        serde_json::from_str(&d).unwrap()
    };

    let responses = client.post("/v1/responses", &[("x-mock-completion", "abcdefgh")], &body);
    assert_eq!(
        names(&responses),
        [
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(
        data(&responses, "response.completed")["response"]["output"][0]["content"][0]["text"],
        "abcdefgh"
    );
    assert_eq!(
        data(&responses, "response.completed")["response"]["usage"]["output_tokens"],
        7
    );

    let anthropic = client.post("/v1/messages", &[("x-mock-cached-tokens", "9")], &body);
    let sequence = names(&anthropic);
    assert_eq!(
        sequence[..3],
        ["message_start", "content_block_start", "ping"]
    );
    assert_eq!(
        sequence[sequence.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let start_usage = &data(&anthropic, "message_start")["message"]["usage"];
    assert_eq!(
        (
            start_usage["input_tokens"].as_u64(),
            start_usage["cache_read_input_tokens"].as_u64()
        ),
        (Some(11), Some(9))
    );
    assert_eq!(
        data(&anthropic, "message_delta")["usage"],
        json!({"output_tokens": 7})
    );

    let quiet = client.post("/v1/messages", &[("x-mock-usage", "absent")], &body);
    assert!(data(&quiet, "message_start")["message"]
        .get("usage")
        .is_none());
    assert!(data(&quiet, "message_delta").get("usage").is_none());

    assert_eq!(
        mock.usage_totals(),
        UsageTotals {
            prompt_tokens: 22,
            completion_tokens: 14,
            responses: 2
        }
    );
}

#[test]
fn cut_after_closes_the_connection_mid_stream() {
    let mock = start();
    let mut client = Client::connect(&mock);
    let response = client.post(
        "/v1/chat/completions",
        &[("x-mock-cut-after", "50")],
        &chat_stream_body(),
    );

    assert_eq!(response.status, 200);
    assert!(!response.complete, "no terminating 0-chunk");
    assert_eq!(response.body.len(), 50);
    assert!(client.closed_by_server());
    // The request was still recorded, but a cut stream reports no usage.
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(mock.usage_totals(), UsageTotals::default());
}

#[test]
fn chunked_request_body_is_decoded() {
    let mock = start();
    let mut client = Client::connect(&mock);
    let body = r#"{"model":"chunky","messages":[{"role":"user","content":"héllo"}]}"#.as_bytes();
    let (a, rest) = body.split_at(10);
    let (b, c) = rest.split_at(7);

    let mut raw =
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for (i, piece) in [a, b, c].into_iter().enumerate() {
        // An extension on one chunk, which the parser must ignore.
        let ext = if i == 1 { ";note=x" } else { "" };
        raw.extend_from_slice(format!("{:X}{ext}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\nx-trailer: t\r\n\r\n");
    client.send_raw(&raw);
    let response = client.read_response();

    assert_eq!(response.status, 200);
    assert_eq!(response.json()["model"], "chunky");
    assert_eq!(mock.requests()[0].body, body);
}

#[test]
fn keep_alive_serves_several_requests_per_connection() {
    let mock = start();
    let mut client = Client::connect(&mock);
    let first = client.post("/v1/chat/completions", &[], &json!({"model": "one"}));
    let second = client.post("/v1/chat/completions", &[], &chat_stream_body());
    let third = client.request("GET", "/v1/models", &[], "");

    assert_eq!(first.json()["model"], "one");
    assert!(second.complete);
    assert_eq!(third.text(), "passthrough selftest");
    let models: Vec<_> = mock
        .requests()
        .iter()
        .map(|r| r.json().and_then(|j| j["model"].as_str().map(String::from)))
        .collect();
    assert_eq!(
        models,
        [Some("one".to_owned()), Some("gpt-4o-mini".to_owned()), None]
    );

    mock.clear();
    assert!(mock.requests().is_empty());
    assert_eq!(mock.usage_totals(), UsageTotals::default());

    // `connection: close` is honoured.
    let last = client.request("GET", "/healthz", &[("connection", "close")], "");
    assert_eq!(last.header("connection"), Some("close"));
    assert!(client.closed_by_server());
}

#[test]
fn errors_for_invalid_json_and_forced_status() {
    let mock = start();
    let mut client = Client::connect(&mock);

    let invalid = client.request("POST", "/v1/chat/completions", &[], "{not json");
    assert_eq!(invalid.status, 400);
    assert_eq!(
        invalid.json(),
        json!({"error": {"message": "mock: invalid json", "type": "invalid_request_error", "param": null, "code": null}})
    );

    let body = json!({"model": "m", "stream": true});
    let unavailable = client.post("/v1/chat/completions", &[("x-mock-status", "503")], &body);
    assert_eq!(unavailable.status, 503);
    assert_eq!(unavailable.header("content-type"), Some("application/json"));
    assert_eq!(unavailable.json()["error"]["type"], "server_error");

    let limited = client.post("/v1/messages", &[("x-mock-status", "429")], &body);
    assert_eq!(limited.status, 429);
    assert_eq!(limited.json()["error"]["type"], "invalid_request_error");

    // A malformed control header is a test bug: reported as 400, not ignored.
    let bad = client.post("/v1/messages", &[("x-mock-completion", "b64:@@@")], &body);
    assert_eq!(bad.status, 400);

    assert_eq!(mock.usage_totals(), UsageTotals::default());
}

#[test]
fn delay_and_chunk_delay_slow_the_response() {
    let mock = start();
    let mut client = Client::connect(&mock);
    let started = Instant::now();
    let headers = [
        ("x-mock-delay-ms", "100"),
        ("x-mock-chunk-delay-ms", "20"),
        ("x-mock-completion", "abcdefgh"),
    ];
    let response = client.post("/v1/chat/completions", &headers, &chat_stream_body());

    assert!(response.complete);
    // 100 ms before the headers, then 20 ms between each of the 5 events.
    assert!(
        started.elapsed() >= Duration::from_millis(180),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn drop_stops_the_server() {
    let mock = start();
    let port = mock.port();
    let mut idle = Client::connect(&mock);
    assert_eq!(idle.request("GET", "/healthz", &[], "").status, 200);

    drop(mock);
    assert!(idle.closed_by_server(), "open connections are shut down");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "listener is closed"
    );
}
