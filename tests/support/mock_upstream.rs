//! Mock OpenAI-compatible LLM upstream, used by the integration tests (Envoy in
//! front of it) and by `make run` (through `examples/mock_upstream.rs`).
//!
//! It is a small HTTP/1.1 server built on the standard library only: one thread
//! per connection, keep-alive (Envoy reuses upstream connections), request
//! bodies framed by `content-length` or `transfer-encoding: chunked` (Envoy
//! re-frames a body as chunked when a filter removed `content-length`).
//!
//! Every request is recorded (see [`MockUpstream::requests`]) *before* it is
//! answered, so a test that has received a response can inspect the request.
//! Every response carries `x-mock-upstream: <name>`.
//!
//! # Routes
//!
//! * `GET /healthz` → `200 ok`.
//! * LLM APIs, matched by path suffix (query string ignored), any method:
//!   `/chat/completions` (also Azure `/openai/deployments/<d>/chat/completions`),
//!   `/completions`, `/responses`, `/embeddings`, `/v1/messages` (Anthropic).
//!   The JSON body gives `model` (echoed back) and `stream`. A body that is not
//!   JSON gets a 400 OpenAI-style error.
//! * Anything else → `200 text/plain` with body `passthrough <name>`.
//!
//! # Control headers (LLM routes only)
//!
//! | header                     | default                            | effect |
//! |----------------------------|------------------------------------|--------|
//! | `x-mock-status`            | —                                  | answer with this status (200..=599) and an OpenAI-style error body (`server_error` for 5xx, else `invalid_request_error`), no usage |
//! | `x-mock-usage`             | `present`                          | `absent` omits usage everywhere |
//! | `x-mock-prompt-tokens`     | 11                                 | reported prompt/input tokens |
//! | `x-mock-completion-tokens` | 7                                  | reported completion/output tokens |
//! | `x-mock-cached-tokens`     | 0                                  | `cached_tokens` / Anthropic `cache_read_input_tokens` |
//! | `x-mock-completion`        | `Hello! How can I help you today?` | completion text; `b64:<standard base64 of UTF-8>` for non-ASCII |
//! | `x-mock-delay-ms`          | 0                                  | sleep before the response headers |
//! | `x-mock-chunk-delay-ms`    | 0                                  | streams: sleep between written pieces |
//! | `x-mock-split`             | one HTTP chunk per SSE event       | streams: write the SSE body in pieces of N bytes, ignoring event and UTF-8 boundaries |
//! | `x-mock-cut-after`         | —                                  | close the TCP connection after N body bytes (streams: no terminating 0-chunk, even if N ≥ body; JSON: short body if N < body) |
//! | `x-mock-no-done`           | —                                  | `OpenAI` chat/completions streams: omit `data: [DONE]` |
//! | `x-mock-repeat`            | 1                                  | the completion text is repeated N times (long answers without long headers) |
//! | `x-mock-delta-chars`       | 4                                  | streams: characters per delta |
//! | `x-mock-choices`           | 1                                  | chat streams: the deltas go to N choices, in N consecutive runs (choice 0 first) |
//!
//! A malformed control header (non-number, bad base64, status out of range) is
//! answered with a 400 error naming it: a test bug should fail loudly.
//!
//! Realism rule: like `OpenAI`, chat and legacy completions streams carry the usage
//! chunk only when the request asked for it with
//! `"stream_options":{"include_usage":true}` (the filter under test may inject
//! that option). Such stream responses report the decision in the response
//! header `x-mock-include-usage: true|false`.
//!
//! Usage accounting ([`MockUpstream::usage_totals`]) sums what the mock *reported*
//! in responses it fully delivered: cut or failed responses and responses
//! without usage are not counted.
//!
//! This file is `#[path]`-included by several crates (tests, the example), each
//! using a different subset of it, hence the `dead_code` allowance. It uses no
//! `unwrap`/`expect`: a poisoned lock is recovered, I/O errors close the
//! connection.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;

/// Completion text when `x-mock-completion` is not sent.
pub const DEFAULT_COMPLETION: &str = "Hello! How can I help you today?";
/// Prompt tokens reported when `x-mock-prompt-tokens` is not sent.
pub const DEFAULT_PROMPT_TOKENS: u64 = 11;
/// Completion tokens reported when `x-mock-completion-tokens` is not sent.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 7;
/// Model echoed when the request body has no string `model`.
pub const DEFAULT_MODEL: &str = "mock-model";

/// Fixed `created` timestamp, so responses are byte-for-byte reproducible.
const CREATED: u64 = 1_700_000_000;
/// Characters per streamed delta: small enough that multi-byte UTF-8 text lands
/// in several deltas.
const DELTA_CHARS: usize = 4;
/// Longest accepted request line or header line.
const MAX_LINE: usize = 64 * 1024;
/// Largest accepted request body (Envoy's demo config buffers at most 4 MiB).
const MAX_BODY: usize = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path including the query string, exactly as on the request line.
    pub path: String,
    /// Header names lowercased, values trimmed, in arrival order.
    pub headers: Vec<(String, String)>,
    /// Body bytes after de-chunking.
    pub body: Vec<u8>,
    /// Name of the mock that received it.
    pub upstream: String,
}

impl Recorded {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Usage reported by fully delivered responses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Number of fully delivered responses that reported usage.
    pub responses: u64,
}

/// A running mock upstream on 127.0.0.1. Dropping it stops accepting and shuts
/// down open connections (best effort).
pub struct MockUpstream {
    shared: Arc<Shared>,
    port: u16,
    acceptor: Option<JoinHandle<()>>,
}

impl MockUpstream {
    /// Starts on an ephemeral port.
    pub fn start(name: &str) -> io::Result<MockUpstream> {
        Self::start_on(name, 0)
    }

    /// Starts on `port` (0 = ephemeral).
    pub fn start_on(name: &str, port: u16) -> io::Result<MockUpstream> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::new(name));
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("mock-{name}-accept"))
                .spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(MockUpstream {
            shared,
            port,
            acceptor: Some(acceptor),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// Forgets recorded requests and resets the usage totals.
    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
        *lock(&self.shared.totals) = UsageTotals::default();
    }

    /// Sum of usage reported by fully delivered responses.
    pub fn usage_totals(&self) -> UsageTotals {
        *lock(&self.shared.totals)
    }

    /// Logs one line per request to stderr (used by the example binary).
    pub fn set_logging(&self, on: bool) {
        self.shared.logging.store(on, Ordering::Relaxed);
    }

    /// Keeps (the default) or forgets requests as they arrive; usage totals are kept.
    pub fn set_recording(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
    }

    /// Serves until the process ends.
    pub fn serve_forever(mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            // accept() blocks; a connection of our own wakes it so it sees
            // `stopping`. Join only if that worked, never hang a test on drop.
            let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                let _ = acceptor.join();
            }
        }
        for (_, conn) in lock(&self.shared.connections).drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

// ---------------------------------------------------------------------------
// Server state and connection handling
// ---------------------------------------------------------------------------

struct Shared {
    name: String,
    requests: Mutex<Vec<Recorded>>,
    totals: Mutex<UsageTotals>,
    /// Open connections, so Drop can shut them down.
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_connection: AtomicU64,
    stopping: AtomicBool,
    logging: AtomicBool,
    /// Keep every request for [`MockUpstream::requests`] (on by default; the example
    /// binary turns it off: a benchmark's millions of bodies would fill the memory).
    recording: AtomicBool,
}

impl Shared {
    fn new(name: &str) -> Shared {
        Shared {
            name: name.to_owned(),
            requests: Mutex::new(Vec::new()),
            totals: Mutex::new(UsageTotals::default()),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            logging: AtomicBool::new(false),
            recording: AtomicBool::new(true),
        }
    }

    /// Adds (`undo == false`) or removes one response's usage.
    fn account(&self, usage: Usage, undo: bool) {
        let mut totals = lock(&self.totals);
        if undo {
            totals.prompt_tokens -= usage.prompt;
            totals.completion_tokens -= usage.completion;
            totals.responses -= 1;
        } else {
            totals.prompt_tokens += usage.prompt;
            totals.completion_tokens += usage.completion;
            totals.responses += 1;
        }
    }
}

/// Locks, recovering from poisoning: the data (lists, counters) stays usable
/// even if a connection thread panicked while holding the lock.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = conn else {
            // E.g. out of file descriptors: back off instead of spinning.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.connections).insert(id, clone);
        }
        let worker_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("mock-{}-conn-{id}", shared.name))
            .spawn(move || {
                serve_connection(stream, &worker_shared);
                lock(&worker_shared.connections).remove(&id);
            });
        if spawned.is_err() {
            lock(&shared.connections).remove(&id);
        }
    }
}

/// Serves requests on one connection until EOF, an error, a cut response or
/// `connection: close`.
fn serve_connection(stream: TcpStream, shared: &Shared) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let request = match read_request(&mut reader, &mut writer, &shared.name) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(err) => {
                if err.kind() == io::ErrorKind::InvalidData {
                    let reply = Reply::error(400, &format!("mock: bad request: {err}"));
                    let _ = send(&mut writer, shared, &reply, true);
                }
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
        };
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if shared.recording.load(Ordering::Relaxed) {
            lock(&shared.requests).push(request.clone());
        }
        let reply = plan_reply(&shared.name, &request);
        log_request(shared, &request, &reply);
        let outcome = send(&mut writer, shared, &reply, close);
        if outcome != Outcome::Completed || close {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn log_request(shared: &Shared, request: &Recorded, reply: &Reply) {
    if !shared.logging.load(Ordering::Relaxed) {
        return;
    }
    let usage = match reply.reported {
        Some(u) => format!("usage {}/{}", u.prompt, u.completion),
        None => "no usage".to_owned(),
    };
    eprintln!(
        "[mock {}] {} {} -> {} {}, {usage}",
        shared.name, request.method, request.path, reply.status, reply.content_type
    );
}

// ---------------------------------------------------------------------------
// HTTP/1.1 request parsing
// ---------------------------------------------------------------------------

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads one CRLF- (or LF-) terminated line without its terminator.
/// `Ok(None)` on EOF before any byte.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if n >= MAX_LINE {
            invalid("line too long")
        } else {
            io::Error::from(io::ErrorKind::UnexpectedEof)
        });
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn require_line(reader: &mut impl BufRead) -> io::Result<String> {
    read_line(reader)?.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
}

/// Reads the next request; `Ok(None)` when the client closed the connection
/// between requests.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    upstream: &str,
) -> io::Result<Option<Recorded>> {
    // RFC 9112 §2.2: ignore empty lines before the request line.
    let line = loop {
        match read_line(reader)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => {}
            Some(line) => break line,
        }
    };
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(_version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("malformed request line"));
    };
    let (method, path) = (method.to_owned(), path.to_owned());
    let headers = read_headers(reader)?;
    if find_header(&headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = read_body(reader, &headers)?;
    Ok(Some(Recorded {
        method,
        path,
        headers,
        body,
        upstream: upstream.to_owned(),
    }))
}

fn read_headers(reader: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = require_line(reader)?;
        if line.is_empty() {
            return Ok(headers);
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid("malformed header"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}

/// Body framed by `transfer-encoding: chunked` (takes precedence, RFC 9112
/// §6.3) or `content-length`; no framing means no body.
fn read_body(reader: &mut impl BufRead, headers: &[(String, String)]) -> io::Result<Vec<u8>> {
    let chunked = find_header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return read_chunked_body(reader);
    }
    let Some(length) = find_header(headers, "content-length") else {
        return Ok(Vec::new());
    };
    let length: usize = length.parse().map_err(|_| invalid("bad content-length"))?;
    if length > MAX_BODY {
        return Err(invalid("body too large"));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(body)
}

fn read_chunked_body(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = require_line(reader)?;
        // Chunk extensions (";name=value") are allowed and ignored.
        let size_field = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_field, 16).map_err(|_| invalid("bad chunk size"))?;
        if size == 0 {
            // Trailer section, ended by an empty line.
            while !require_line(reader)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(invalid("body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        if !require_line(reader)?.is_empty() {
            return Err(invalid("chunk data not followed by CRLF"));
        }
    }
}

// ---------------------------------------------------------------------------
// Deciding the reply
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Anthropic,
}

/// Classifies by path suffix. `/chat/completions` is checked before
/// `/completions`, which it also ends with.
fn classify(path: &str) -> Option<Api> {
    let path = path.split('?').next().unwrap_or_default();
    [
        ("/chat/completions", Api::Chat),
        ("/completions", Api::Completions),
        ("/responses", Api::Responses),
        ("/embeddings", Api::Embeddings),
        ("/v1/messages", Api::Anthropic),
    ]
    .into_iter()
    .find(|(suffix, _)| path.ends_with(suffix))
    .map(|(_, api)| api)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    prompt: u64,
    completion: u64,
    cached: u64,
}

/// Per-request behaviour, from the `x-mock-*` headers.
struct Controls {
    status: Option<u16>,
    usage: Option<Usage>,
    text: String,
    delay: Duration,
    chunk_delay: Duration,
    split: Option<usize>,
    cut_after: Option<usize>,
    no_done: bool,
    delta_chars: usize,
    choices: usize,
}

impl Controls {
    /// `Err` carries the message of a 400 answer: a malformed control header is
    /// a bug in the test, better reported loudly than ignored.
    fn from_request(request: &Recorded) -> Result<Controls, String> {
        let status = match number(request, "x-mock-status")? {
            Some(code @ 200..=599) => Some(u16::try_from(code).unwrap_or(500)),
            Some(_) => return Err("mock: x-mock-status must be 200..=599".to_owned()),
            None => None,
        };
        let usage_absent = request
            .header("x-mock-usage")
            .is_some_and(|v| v.eq_ignore_ascii_case("absent"));
        let usage = Usage {
            prompt: number(request, "x-mock-prompt-tokens")?.unwrap_or(DEFAULT_PROMPT_TOKENS),
            completion: number(request, "x-mock-completion-tokens")?
                .unwrap_or(DEFAULT_COMPLETION_TOKENS),
            cached: number(request, "x-mock-cached-tokens")?.unwrap_or(0),
        };
        let text = match request.header("x-mock-completion") {
            None => DEFAULT_COMPLETION.to_owned(),
            Some(value) => match value.strip_prefix("b64:") {
                None => value.to_owned(),
                Some(encoded) => decode_base64(encoded)
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .ok_or_else(|| "mock: x-mock-completion b64: is not base64 UTF-8".to_owned())?,
            },
        };
        let repeat = number(request, "x-mock-repeat")?.unwrap_or(1);
        let text =
            text.repeat(usize::try_from(repeat).map_err(|_| "mock: x-mock-repeat too large")?);
        let millis =
            |name| Ok::<_, String>(Duration::from_millis(number(request, name)?.unwrap_or(0)));
        let size = |name| {
            number(request, name)?
                .map(|n| usize::try_from(n).map_err(|_| format!("mock: {name} too large")))
                .transpose()
        };
        Ok(Controls {
            status,
            usage: (!usage_absent).then_some(usage),
            text,
            delay: millis("x-mock-delay-ms")?,
            chunk_delay: millis("x-mock-chunk-delay-ms")?,
            // Split 0 would mean empty pieces forever; treat it as "no split".
            split: size("x-mock-split")?.filter(|&n| n > 0),
            cut_after: size("x-mock-cut-after")?,
            no_done: request
                .header("x-mock-no-done")
                .is_some_and(|v| !matches!(v, "0" | "false")),
            delta_chars: size("x-mock-delta-chars")?
                .filter(|&n| n > 0)
                .unwrap_or(DELTA_CHARS),
            choices: size("x-mock-choices")?.filter(|&n| n > 0).unwrap_or(1),
        })
    }
}

fn number(request: &Recorded, name: &str) -> Result<Option<u64>, String> {
    request
        .header(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| format!("mock: {name} must be a number, got {v:?}"))
        })
        .transpose()
}

enum Body {
    Fixed(Vec<u8>),
    /// SSE events, each a complete `...\n\n` block.
    Stream(Vec<String>),
}

/// Everything needed to write one response.
struct Reply {
    status: u16,
    content_type: &'static str,
    extra_headers: Vec<(&'static str, String)>,
    body: Body,
    /// Usage the body reports; counted once the response is fully delivered.
    reported: Option<Usage>,
    delay: Duration,
    chunk_delay: Duration,
    split: Option<usize>,
    cut_after: Option<usize>,
}

impl Reply {
    fn fixed(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            content_type,
            extra_headers: Vec::new(),
            body: Body::Fixed(body.into()),
            reported: None,
            delay: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            split: None,
            cut_after: None,
        }
    }

    /// OpenAI-style error JSON.
    fn error(status: u16, message: &str) -> Reply {
        let kind = if status >= 500 {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let body = format!(
            r#"{{"error":{{"message":{},"type":"{kind}","param":null,"code":null}}}}"#,
            js(message)
        );
        Reply::fixed(status, "application/json", body)
    }

    /// Applies the timing/cutting controls, which hold for errors too.
    fn with_timing(mut self, controls: &Controls) -> Reply {
        self.delay = controls.delay;
        self.chunk_delay = controls.chunk_delay;
        self.split = controls.split;
        self.cut_after = controls.cut_after;
        self
    }
}

fn plan_reply(name: &str, request: &Recorded) -> Reply {
    let path = request.path.split('?').next().unwrap_or_default();
    if request.method == "GET" && path == "/healthz" {
        return Reply::fixed(200, "text/plain", "ok");
    }
    let Some(api) = classify(&request.path) else {
        return Reply::fixed(200, "text/plain", format!("passthrough {name}"));
    };
    let controls = match Controls::from_request(request) {
        Ok(controls) => controls,
        Err(message) => return Reply::error(400, &message),
    };
    plan_llm_reply(api, request, &controls).with_timing(&controls)
}

fn plan_llm_reply(api: Api, request: &Recorded, controls: &Controls) -> Reply {
    if let Some(status) = controls.status {
        return Reply::error(status, &format!("mock: forced status {status}"));
    }
    let Ok(json) = serde_json::from_slice::<Value>(&request.body) else {
        return Reply::error(400, "mock: invalid json");
    };
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL);
    if json.get("stream").and_then(Value::as_bool) == Some(true) {
        if let Some(reply) = stream_reply(api, &json, model, controls) {
            return reply;
        }
    }
    json_reply(api, model, controls)
}

fn json_reply(api: Api, model: &str, controls: &Controls) -> Reply {
    let (text, usage) = (controls.text.as_str(), controls.usage);
    let body = match api {
        Api::Chat => chat_json(model, text, usage),
        Api::Completions => completions_json(model, text, usage),
        Api::Responses => responses_json(model, text, usage),
        Api::Embeddings => embeddings_json(model, usage),
        Api::Anthropic => anthropic_json(model, text, usage),
    };
    let mut reply = Reply::fixed(200, "application/json", body);
    // Embeddings have no completion: only the prompt tokens are reported.
    reply.reported = match api {
        Api::Embeddings => usage.map(|u| Usage { completion: 0, ..u }),
        _ => usage,
    };
    reply
}

/// `None` for embeddings, which are never streamed (answered as JSON even
/// with `"stream": true`).
fn stream_reply(api: Api, json: &Value, model: &str, controls: &Controls) -> Option<Reply> {
    let deltas = text_deltas(&controls.text, controls.delta_chars);
    let done = !controls.no_done;
    let mut extra_headers = Vec::new();
    let (events, reported) = match api {
        Api::Chat | Api::Completions => {
            // OpenAI sends the usage chunk only when the client asked for it.
            let include_usage = json
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true);
            extra_headers.push(("x-mock-include-usage", include_usage.to_string()));
            let usage = controls.usage.filter(|_| include_usage);
            let events = if api == Api::Chat {
                chat_stream(model, &deltas, usage, done, controls.choices)
            } else {
                completions_stream(model, &deltas, usage, done)
            };
            (events, usage)
        }
        Api::Responses => (
            responses_stream(model, &controls.text, &deltas, controls.usage),
            controls.usage,
        ),
        Api::Anthropic => (
            anthropic_stream(model, &deltas, controls.usage),
            controls.usage,
        ),
        Api::Embeddings => return None,
    };
    Some(Reply {
        content_type: "text/event-stream",
        extra_headers,
        body: Body::Stream(events),
        reported,
        ..Reply::fixed(200, "", Vec::new())
    })
}

// ---------------------------------------------------------------------------
// Response bodies. JSON is written by hand so field order matches the real
// APIs and the brief (serde_json's map would sort keys).
// ---------------------------------------------------------------------------

/// A JSON string literal.
fn js(s: &str) -> String {
    Value::from(s).to_string()
}

/// `text` split on char boundaries into pieces of [`DELTA_CHARS`] chars; at
/// least one (possibly empty) piece so streams always carry a delta.
fn text_deltas(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    chars
        .chunks(size)
        .map(|piece| piece.iter().collect())
        .collect()
}

fn openai_usage(u: Usage, details: bool) -> String {
    let (p, c, k) = (u.prompt, u.completion, u.cached);
    let total = p + c;
    if details {
        format!(
            r#"{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{total},"prompt_tokens_details":{{"cached_tokens":{k}}},"completion_tokens_details":{{"reasoning_tokens":0}}}}"#
        )
    } else {
        format!(r#"{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{total}}}"#)
    }
}

fn responses_usage(u: Usage) -> String {
    let (p, c, k) = (u.prompt, u.completion, u.cached);
    let total = p + c;
    format!(
        r#"{{"input_tokens":{p},"output_tokens":{c},"total_tokens":{total},"input_tokens_details":{{"cached_tokens":{k}}},"output_tokens_details":{{"reasoning_tokens":0}}}}"#
    )
}

/// `,"usage":{...}` or nothing.
fn usage_field(usage: Option<Usage>, render: impl Fn(Usage) -> String) -> String {
    usage
        .map(|u| format!(r#","usage":{}"#, render(u)))
        .unwrap_or_default()
}

fn chat_json(model: &str, text: &str, usage: Option<Usage>) -> String {
    format!(
        r#"{{"id":"chatcmpl-mock","object":"chat.completion","created":{CREATED},"model":{},"choices":[{{"index":0,"message":{{"role":"assistant","content":{}}},"finish_reason":"stop"}}]{}}}"#,
        js(model),
        js(text),
        usage_field(usage, |u| openai_usage(u, true))
    )
}

fn completions_json(model: &str, text: &str, usage: Option<Usage>) -> String {
    format!(
        r#"{{"id":"cmpl-mock","object":"text_completion","created":{CREATED},"model":{},"choices":[{{"index":0,"text":{},"finish_reason":"stop"}}]{}}}"#,
        js(model),
        js(text),
        usage_field(usage, |u| openai_usage(u, false))
    )
}

fn responses_json(model: &str, text: &str, usage: Option<Usage>) -> String {
    format!(
        r#"{{"id":"resp_mock","object":"response","model":{},"status":"completed","output":[{{"id":"msg_mock","type":"message","status":"completed","role":"assistant","content":[{{"type":"output_text","text":{},"annotations":[]}}]}}]{}}}"#,
        js(model),
        js(text),
        usage_field(usage, responses_usage)
    )
}

fn embeddings_json(model: &str, usage: Option<Usage>) -> String {
    format!(
        r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[0.1,0.2,0.3]}}],"model":{}{}}}"#,
        js(model),
        usage_field(usage, |u| format!(
            r#"{{"prompt_tokens":{p},"total_tokens":{p}}}"#,
            p = u.prompt
        ))
    )
}

fn anthropic_usage(u: Usage, output_tokens: u64) -> String {
    format!(
        r#"{{"input_tokens":{},"output_tokens":{output_tokens},"cache_creation_input_tokens":0,"cache_read_input_tokens":{}}}"#,
        u.prompt, u.cached
    )
}

fn anthropic_json(model: &str, text: &str, usage: Option<Usage>) -> String {
    format!(
        r#"{{"id":"msg_mock","type":"message","role":"assistant","model":{},"content":[{{"type":"text","text":{}}}],"stop_reason":"end_turn"{}}}"#,
        js(model),
        js(text),
        usage_field(usage, |u| anthropic_usage(u, u.completion))
    )
}

fn data_event(json: &str) -> String {
    format!("data: {json}\n\n")
}

fn named_event(name: &str, json: &str) -> String {
    format!("event: {name}\ndata: {json}\n\n")
}

/// Chat chunks: role+first delta, further deltas, finish chunk, optional usage
/// chunk (`choices: []`), optional `[DONE]`.
fn chat_stream(
    model: &str,
    deltas: &[String],
    usage: Option<Usage>,
    done: bool,
    choices: usize,
) -> Vec<String> {
    let head = format!(
        r#"{{"id":"chatcmpl-mock","object":"chat.completion.chunk","created":{CREATED},"model":{}"#,
        js(model)
    );
    let mut events: Vec<String> = deltas
        .iter()
        .enumerate()
        .map(|(i, delta)| {
            let role = if i == 0 { r#""role":"assistant","# } else { "" };
            // Consecutive runs of deltas per choice: choice 0 gets the first run.
            let index = i * choices / deltas.len();
            data_event(&format!(
                r#"{head},"choices":[{{"index":{index},"delta":{{{role}"content":{}}},"finish_reason":null}}]}}"#,
                js(delta)
            ))
        })
        .collect();
    events.push(data_event(&format!(
        r#"{head},"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}"#
    )));
    if let Some(u) = usage {
        events.push(data_event(&format!(
            r#"{head},"choices":[],"usage":{}}}"#,
            openai_usage(u, true)
        )));
    }
    if done {
        events.push(data_event("[DONE]"));
    }
    events
}

/// Legacy completions chunks, same shape rules as chat.
fn completions_stream(
    model: &str,
    deltas: &[String],
    usage: Option<Usage>,
    done: bool,
) -> Vec<String> {
    let head = format!(
        r#"{{"id":"cmpl-mock","object":"text_completion","created":{CREATED},"model":{}"#,
        js(model)
    );
    let mut events: Vec<String> = deltas
        .iter()
        .map(|delta| {
            data_event(&format!(
                r#"{head},"choices":[{{"index":0,"text":{},"finish_reason":null}}]}}"#,
                js(delta)
            ))
        })
        .collect();
    events.push(data_event(&format!(
        r#"{head},"choices":[{{"index":0,"text":"","finish_reason":"stop"}}]}}"#
    )));
    if let Some(u) = usage {
        events.push(data_event(&format!(
            r#"{head},"choices":[],"usage":{}}}"#,
            openai_usage(u, false)
        )));
    }
    if done {
        events.push(data_event("[DONE]"));
    }
    events
}

/// Responses API events, as OpenAI sends them (the output item and its content part
/// opened, text deltas, everything closed); usage rides on `response.completed`. No
/// `[DONE]`.
fn responses_stream(
    model: &str,
    text: &str,
    deltas: &[String],
    usage: Option<Usage>,
) -> Vec<String> {
    let model = js(model);
    let text = js(text);
    let at = r#""item_id":"msg_mock","output_index":0,"content_index":0"#;
    let mut events = vec![
        named_event(
            "response.created",
            &format!(
                r#"{{"type":"response.created","sequence_number":0,"response":{{"id":"resp_mock","object":"response","status":"in_progress","model":{model},"output":[]}}}}"#
            ),
        ),
        named_event(
            "response.output_item.added",
            r#"{"type":"response.output_item.added","sequence_number":1,"output_index":0,"item":{"id":"msg_mock","type":"message","status":"in_progress","role":"assistant","content":[]}}"#,
        ),
        named_event(
            "response.content_part.added",
            &format!(
                r#"{{"type":"response.content_part.added","sequence_number":2,{at},"part":{{"type":"output_text","text":"","annotations":[]}}}}"#
            ),
        ),
    ];
    let mut seq = 3;
    for delta in deltas {
        events.push(named_event(
            "response.output_text.delta",
            &format!(
                r#"{{"type":"response.output_text.delta","sequence_number":{seq},{at},"delta":{}}}"#,
                js(delta)
            ),
        ));
        seq += 1;
    }
    let part = format!(r#"{{"type":"output_text","text":{text},"annotations":[]}}"#);
    let item = format!(
        r#"{{"id":"msg_mock","type":"message","status":"completed","role":"assistant","content":[{part}]}}"#
    );
    events.push(named_event(
        "response.output_text.done",
        &format!(
            r#"{{"type":"response.output_text.done","sequence_number":{seq},{at},"text":{text}}}"#
        ),
    ));
    events.push(named_event(
        "response.content_part.done",
        &format!(
            r#"{{"type":"response.content_part.done","sequence_number":{},{at},"part":{part}}}"#,
            seq + 1
        ),
    ));
    events.push(named_event(
        "response.output_item.done",
        &format!(
            r#"{{"type":"response.output_item.done","sequence_number":{},"output_index":0,"item":{item}}}"#,
            seq + 2
        ),
    ));
    events.push(named_event(
        "response.completed",
        &format!(
            r#"{{"type":"response.completed","sequence_number":{},"response":{{"id":"resp_mock","object":"response","status":"completed","model":{model},"output":[{item}]{}}}}}"#,
            seq + 3,
            usage_field(usage, responses_usage)
        ),
    ));
    events
}

/// Anthropic Messages events: input usage in `message_start` (with the
/// interim `output_tokens: 1` the real API sends), final output tokens in
/// `message_delta`.
fn anthropic_stream(model: &str, deltas: &[String], usage: Option<Usage>) -> Vec<String> {
    let mut events = vec![
        named_event(
            "message_start",
            &format!(
                r#"{{"type":"message_start","message":{{"id":"msg_mock","type":"message","role":"assistant","model":{},"content":[]{}}}}}"#,
                js(model),
                usage_field(usage, |u| anthropic_usage(u, 1))
            ),
        ),
        named_event(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        // Spacing as the real API sends it.
        named_event("ping", r#"{"type": "ping"}"#),
    ];
    for delta in deltas {
        events.push(named_event(
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
                js(delta)
            ),
        ));
    }
    events.push(named_event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    ));
    events.push(named_event(
        "message_delta",
        &format!(
            r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn"}}{}}}"#,
            usage_field(usage, |u| format!(
                r#"{{"output_tokens":{}}}"#,
                u.completion
            ))
        ),
    ));
    events.push(named_event("message_stop", r#"{"type":"message_stop"}"#));
    events
}

// ---------------------------------------------------------------------------
// Writing the reply
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Fully written; the connection can serve the next request.
    Completed,
    /// Deliberately cut (`x-mock-cut-after`); the connection is closed.
    Cut,
    /// A write failed (client went away).
    Failed,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Mock Status",
    }
}

fn send(writer: &mut TcpStream, shared: &Shared, reply: &Reply, close: bool) -> Outcome {
    if !reply.delay.is_zero() {
        thread::sleep(reply.delay);
    }
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\nx-mock-upstream: {}\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        shared.name
    );
    for (name, value) in &reply.extra_headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    let result = match &reply.body {
        Body::Fixed(body) => send_fixed(writer, shared, reply, head, body),
        Body::Stream(events) => send_stream(writer, shared, reply, head, events),
    };
    result.unwrap_or(Outcome::Failed)
}

/// Usage is accounted just before the write that completes the response, so a
/// client that has read the whole response always sees it in the totals; it
/// is taken back if that write fails.
fn finish(
    writer: &mut TcpStream,
    shared: &Shared,
    reply: &Reply,
    last: &[u8],
) -> io::Result<Outcome> {
    if let Some(usage) = reply.reported {
        shared.account(usage, false);
    }
    let written = writer.write_all(last).and_then(|()| writer.flush());
    if written.is_err() {
        if let Some(usage) = reply.reported {
            shared.account(usage, true);
        }
    }
    written.map(|()| Outcome::Completed)
}

/// Closes the connection without finishing the message.
fn cut(writer: &mut TcpStream) -> io::Result<Outcome> {
    writer.flush()?;
    writer.shutdown(Shutdown::Both)?;
    Ok(Outcome::Cut)
}

fn send_fixed(
    writer: &mut TcpStream,
    shared: &Shared,
    reply: &Reply,
    mut head: String,
    body: &[u8],
) -> io::Result<Outcome> {
    let _ = write!(head, "content-length: {}\r\n\r\n", body.len());
    if let Some(limit) = reply.cut_after {
        if limit < body.len() {
            writer.write_all(head.as_bytes())?;
            writer.write_all(&body[..limit])?;
            return cut(writer);
        }
    }
    let mut message = head.into_bytes();
    message.extend_from_slice(body);
    finish(writer, shared, reply, &message)
}

fn write_chunk(writer: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    writer.write_all(&chunk)?;
    writer.flush()
}

/// Writes the SSE body as HTTP chunks: one per event, or pieces of
/// `split` bytes. Each chunk is flushed (`TCP_NODELAY` is set) so the proxy sees
/// the pieces separately, especially with a chunk delay.
fn send_stream(
    writer: &mut TcpStream,
    shared: &Shared,
    reply: &Reply,
    mut head: String,
    events: &[String],
) -> io::Result<Outcome> {
    head.push_str("cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n");
    writer.write_all(head.as_bytes())?;
    writer.flush()?;

    let joined: Vec<u8>;
    let pieces: Vec<&[u8]> = match reply.split {
        Some(size) => {
            joined = events.concat().into_bytes();
            joined.chunks(size).collect()
        }
        None => events.iter().map(String::as_bytes).collect(),
    };

    let mut written = 0;
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 && !reply.chunk_delay.is_zero() {
            thread::sleep(reply.chunk_delay);
        }
        let piece = match reply.cut_after {
            Some(limit) => &piece[..piece.len().min(limit.saturating_sub(written))],
            None => piece,
        };
        if !piece.is_empty() {
            write_chunk(writer, piece)?;
        }
        written += piece.len();
        if reply.cut_after.is_some_and(|limit| written >= limit) {
            return cut(writer);
        }
    }
    // A cut-after beyond the body still leaves the message unterminated.
    if reply.cut_after.is_some() {
        return cut(writer);
    }
    finish(writer, shared, reply, b"0\r\n\r\n")
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// Decodes standard (or URL-safe) base64, padding optional. `None` on any
/// invalid character or a dangling 6-bit group.
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in input.trim().trim_end_matches('=').bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            // `acc` holds fewer than 8 + 6 bits, so this always fits.
            out.push(u8::try_from(acc >> bits).ok()?);
            acc &= (1 << bits) - 1;
        }
    }
    (bits < 6).then_some(out)
}
