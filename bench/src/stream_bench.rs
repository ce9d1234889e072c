//! The many-streams scenario of `make bench` (bench/run.py `--only streams`): a mock upstream
//! that streams long chat completion answers slowly, and a load client that holds thousands of
//! those streams open through Envoy at once.
//!
//! ```text
//! cargo build --release --example stream_bench
//! stream_bench mock [--port PORT]
//! stream_bench load --port PORT --streams N --events E [--text-bytes D] [--events-per-tick K]
//!                   [--interval-ms I] [--usage] [--path PATH]
//! ```
//!
//! `mock` prints `stream mock listening on 127.0.0.1:PORT` once bound and serves until killed.
//! Each request is answered with a chat completion stream (`text/event-stream`, chunked):
//! `x-stream-events` content events (default 8) of `x-stream-text-bytes` bytes of English
//! text each (default 48, about ten tokens), written `x-stream-events-per-tick` at a time
//! (one HTTP chunk) every `x-stream-interval-ms` (default 100), then the finish event, the
//! usage chunk if the request body asked for it (`"include_usage":true`), and `[DONE]`.
//! The answer is generated as it is written, never held whole: a stream costs the mock a
//! thread (64 KiB of stack reserved, a few KiB touched) and a small buffer, whatever its
//! length. Connections are kept alive (Envoy reuses them).
//!
//! `load` opens `--streams` streaming chat completion requests through Envoy at once (a thread
//! each: a blocking read per stream costs nothing while it waits, and the event rate here —
//! tens of thousands of chunks a second at most — is far below what thread wake-ups cost;
//! Python's asyncio would spend the cores Envoy needs), sends the control headers above,
//! reads every answer to its end (`connection: close`, the chunked body decoded) and checks
//! it: status 200, `[DONE]` seen, the usage chunk seen when `--usage` asked for it. It prints
//! one JSON line when every stream has its response headers (`{"open":N,"bytes":B,…}`), one
//! when the first stream ends (`{"first_done":…}`), the bytes received so far every 250 ms
//! (`{"progress":B}`), and a summary at the end (`{"streams":…,
//! "ok":…,"bytes":…}`); exit status 1 if a stream failed. `bytes` are decoded body bytes.
//!
//! Standard library only; both halves in one program so the scenario builds one binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: stream_bench mock [--port PORT]\n\
    \x20      stream_bench load --port PORT --streams N --events E [--text-bytes D]\n\
    \x20                        [--events-per-tick K] [--interval-ms I] [--usage] [--path PATH]";

/// Stack reserved per thread: the threads hold a few small buffers only.
const STACK: usize = 128 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("mock") => Options::parse(args.get(1..).unwrap_or_default()).and_then(|o| mock(&o)),
        Some("load") => Options::parse(args.get(1..).unwrap_or_default()).and_then(|o| load(&o)),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("stream_bench: {e}");
            ExitCode::from(2)
        }
    }
}

#[derive(Debug, Clone)]
struct Options {
    port: u16,
    streams: usize,
    events: u64,
    text_bytes: usize,
    events_per_tick: u64,
    interval_ms: u64,
    usage: bool,
    path: String,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            port: 0,
            streams: 1,
            events: 8,
            text_bytes: 48,
            events_per_tick: 1,
            interval_ms: 100,
            usage: false,
            path: "/v1/chat/completions".to_string(),
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
            match flag.as_str() {
                "--port" => o.port = number(flag, value()?)?,
                "--streams" => o.streams = number(flag, value()?)?,
                "--events" => o.events = number(flag, value()?)?,
                "--text-bytes" => o.text_bytes = number(flag, value()?)?,
                "--events-per-tick" => o.events_per_tick = number(flag, value()?)?,
                "--interval-ms" => o.interval_ms = number(flag, value()?)?,
                "--path" => o.path = value()?.clone(),
                "--usage" => o.usage = true,
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        Ok(o)
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("bad value {v:?} for {flag}"))
}

// ---------------------------------------------------------------------------
// The mock upstream
// ---------------------------------------------------------------------------

const WORDS: &[&str] = &[
    "the",
    "model",
    "streams",
    "its",
    "answer",
    "token",
    "by",
    "token,",
    "and",
    "a",
    "gateway",
    "in",
    "front",
    "of",
    "it",
    "counts",
    "what",
    "passes.",
    "Reasoning",
    "takes",
    "time;",
    "long",
    "answers",
    "hold",
    "connections",
    "open",
    "for",
    "minutes",
    "while",
    "text",
    "trickles",
    "out.",
    "Budgets",
    "are",
    "settled",
    "when",
    "stream",
    "ends.",
    "Memory",
    "per",
    "request",
    "matters",
    "more",
    "than",
    "speed",
    "here,",
    "because",
    "thousands",
    "wait",
    "at",
    "once.",
    "Quarterly",
    "revenue",
    "grew",
    "twelve",
    "percent",
    "driven",
    "mostly",
    "new",
    "customers",
    "Europe.",
];

/// 64 KiB of ASCII prose (no character JSON would escape), the text events are cut from.
fn prose() -> Vec<u8> {
    let mut out = Vec::with_capacity(1 << 16);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    while out.len() < 1 << 16 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let i = usize::try_from(state >> 33).unwrap_or(0) % WORDS.len();
        out.extend_from_slice(WORDS.get(i).copied().unwrap_or("the").as_bytes());
        out.push(b' ');
    }
    out
}

fn mock(o: &Options) -> Result<bool, String> {
    let listener = TcpListener::bind(("127.0.0.1", o.port)).map_err(|e| format!("bind: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("stream mock listening on 127.0.0.1:{port}");
    let _ = std::io::stdout().flush();
    let text: Arc<[u8]> = prose().into();
    for conn in listener.incoming() {
        let Ok(conn) = conn else {
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let text = Arc::clone(&text);
        let spawned = thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || serve(conn, &text));
        if spawned.is_err() {
            eprintln!("stream mock: cannot spawn a thread");
        }
    }
    Ok(true)
}

/// Serves the requests of one connection, one after another, until it closes.
fn serve(conn: TcpStream, text: &[u8]) {
    let _ = conn.set_nodelay(true);
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(16 * 1024, conn);
    let mut offset = 0usize;
    loop {
        let Ok(Some(request)) = read_request(&mut reader) else {
            return;
        };
        if answer(&mut writer, &request, text, &mut offset).is_err() {
            return;
        }
    }
}

struct Request {
    headers: Vec<(String, String)>,
    usage: bool,
}

impl Request {
    fn number(&self, name: &str, default: u64) -> u64 {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(default)
    }
}

/// The next request's headers and body (content-length only: Envoy sends that for these
/// small bodies); `None` at a clean end of the connection.
fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let compact: Vec<u8> = body
        .into_iter()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let usage = compact.windows(20).any(|w| w == b"\"include_usage\":true");
    Ok(Some(Request { headers, usage }))
}

const HEAD: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o""#;

/// Writes one answer: a chunk of events per tick, then the end of the stream.
fn answer(
    w: &mut TcpStream,
    request: &Request,
    text: &[u8],
    offset: &mut usize,
) -> std::io::Result<()> {
    let events = request.number("x-stream-events", 8);
    let text_bytes = usize::try_from(request.number("x-stream-text-bytes", 48))
        .unwrap_or(48)
        .clamp(1, 4096);
    let per_tick = request.number("x-stream-events-per-tick", 1).max(1);
    let interval = Duration::from_millis(request.number("x-stream-interval-ms", 100));
    w.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
          transfer-encoding: chunked\r\n\r\n",
    )?;
    let mut chunk = String::new();
    let mut sent = 0u64;
    let mut text_sent = 0u64;
    let start = Instant::now();
    let mut tick = 0u32;
    while sent < events {
        chunk.clear();
        let mut n = 0;
        while n < per_tick && sent < events {
            if offset.saturating_add(text_bytes) > text.len() {
                *offset = 0;
            }
            let piece = text
                .get(*offset..offset.saturating_add(text_bytes))
                .unwrap_or_default();
            *offset = offset.saturating_add(text_bytes);
            text_sent = text_sent.saturating_add(piece.len() as u64);
            let role = if sent == 0 {
                r#""role":"assistant","#
            } else {
                ""
            };
            chunk.push_str("data: ");
            chunk.push_str(HEAD);
            chunk.push_str(r#","choices":[{"index":0,"delta":{"#);
            chunk.push_str(role);
            chunk.push_str(r#""content":""#);
            chunk.push_str(std::str::from_utf8(piece).unwrap_or_default());
            chunk.push_str(r#""},"finish_reason":null}]}"#);
            chunk.push_str("\n\n");
            n += 1;
            sent += 1;
        }
        if sent >= events {
            chunk.push_str("data: ");
            chunk.push_str(HEAD);
            chunk.push_str(r#","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#);
            chunk.push_str("\n\n");
            if request.usage {
                let completion = text_sent / 4;
                chunk.push_str(&format!(
                    "data: {HEAD},\"choices\":[],\"usage\":{{\"prompt_tokens\":11,\
                     \"completion_tokens\":{completion},\"total_tokens\":{}}}}}\n\n",
                    completion + 11
                ));
            }
            chunk.push_str("data: [DONE]\n\n");
        }
        write!(w, "{:x}\r\n", chunk.len())?;
        w.write_all(chunk.as_bytes())?;
        w.write_all(b"\r\n")?;
        if sent < events {
            // Ticks on a fixed schedule from the start, so a late wake-up does not stretch
            // the answer.
            tick += 1;
            let due = start + interval * tick;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
    }
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

// ---------------------------------------------------------------------------
// The load client
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Totals {
    headers: AtomicU64,
    bytes: AtomicU64,
    first_done: AtomicBool,
}

#[derive(Debug, Default)]
struct Outcome {
    status: u16,
    bytes: u64,
    done: bool,
    usage: bool,
    complete: bool,
    error: Option<String>,
}

fn load(o: &Options) -> Result<bool, String> {
    let totals = Arc::new(Totals::default());
    let request = Arc::new(request_bytes(o));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(o.streams);
    for i in 0..o.streams {
        let (totals, request, outcomes) = (
            Arc::clone(&totals),
            Arc::clone(&request),
            Arc::clone(&outcomes),
        );
        let port = o.port;
        let h = thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || {
                let mut out = Outcome::default();
                if let Err(e) = one_stream(port, &request, &totals, &mut out) {
                    out.error = Some(e.to_string());
                }
                if let Ok(mut all) = outcomes.lock() {
                    all.push(out);
                }
            })
            .map_err(|e| format!("cannot spawn stream thread {i}: {e}"))?;
        handles.push(h);
        // Connections opened 20 every 10 ms (2,000 a second): the accept queues (Envoy's
        // listener, and the mock's behind it, 128 deep) are not flooded, or connections wait
        // for SYN retries past Envoy's upstream connect timeout (2 s) and get 503.
        if i % 20 == 19 {
            thread::sleep(Duration::from_millis(10));
        }
    }
    // Every stream with its response headers, or an error: all are in flight.
    let n = o.streams as u64;
    let mut reported_open = false;
    let mut last_progress = Instant::now();
    loop {
        let finished = outcomes.lock().map(|v| v.len()).unwrap_or(0) as u64;
        if !reported_open && totals.headers.load(Ordering::Relaxed) >= n {
            println!(
                r#"{{"open":{n},"bytes":{},"elapsed_s":{:.3}}}"#,
                totals.bytes.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stdout().flush();
            reported_open = true;
        }
        if finished > 0 && !totals.first_done.swap(true, Ordering::Relaxed) {
            println!(
                r#"{{"first_done":{finished},"bytes":{},"elapsed_s":{:.3}}}"#,
                totals.bytes.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stdout().flush();
        }
        if finished >= n {
            break;
        }
        if last_progress.elapsed() >= Duration::from_millis(250) {
            println!(r#"{{"progress":{}}}"#, totals.bytes.load(Ordering::Relaxed));
            let _ = std::io::stdout().flush();
            last_progress = Instant::now();
        }
        thread::sleep(Duration::from_millis(20));
    }
    for h in handles {
        let _ = h.join();
    }
    let all = outcomes.lock().map_err(|_| "poisoned".to_string())?;
    let ok = all
        .iter()
        .filter(|r| {
            r.error.is_none() && r.status == 200 && r.done && r.complete && (r.usage || !o.usage)
        })
        .count();
    let bytes: u64 = all.iter().map(|r| r.bytes).sum();
    let errors: Vec<String> = all
        .iter()
        .filter_map(|r| {
            r.error.clone().or_else(|| {
                (r.status != 200 || !r.done || !r.complete || (o.usage && !r.usage)).then(|| {
                    format!(
                        "status {} done {} usage {} complete {}",
                        r.status, r.done, r.usage, r.complete
                    )
                })
            })
        })
        .take(5)
        .collect();
    let min = all.iter().map(|r| r.bytes).min().unwrap_or(0);
    let max = all.iter().map(|r| r.bytes).max().unwrap_or(0);
    println!(
        r#"{{"streams":{},"ok":{ok},"bytes":{bytes},"min_bytes":{min},"max_bytes":{max},"usage_seen":{},"elapsed_s":{:.3},"errors":{}}}"#,
        all.len(),
        all.iter().filter(|r| r.usage).count(),
        started.elapsed().as_secs_f64(),
        serde_json::to_string(&errors).unwrap_or_default()
    );
    Ok(ok == all.len())
}

fn request_bytes(o: &Options) -> Vec<u8> {
    let stream_options = if o.usage {
        r#","stream_options":{"include_usage":true}"#
    } else {
        ""
    };
    let body = format!(
        r#"{{"model":"gpt-4o","stream":true{stream_options},"messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"Write a long, careful answer about how gateways meter streamed tokens."}}]}}"#
    );
    format!(
        "POST {} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\nx-tenant: bench\r\n\
         connection: close\r\nx-stream-events: {}\r\nx-stream-text-bytes: {}\r\n\
         x-stream-events-per-tick: {}\r\nx-stream-interval-ms: {}\r\ncontent-length: {}\r\n\r\n{body}",
        o.path,
        o.events,
        o.text_bytes,
        o.events_per_tick,
        o.interval_ms,
        body.len()
    )
    .into_bytes()
}

/// One stream: the request, the response head, the chunked body decoded to its end.
fn one_stream(
    port: u16,
    request: &[u8],
    totals: &Totals,
    out: &mut Outcome,
) -> std::io::Result<()> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    conn.write_all(request)?;
    let mut reader = BufReader::with_capacity(16 * 1024, conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    out.status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed in the response head"));
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
    }
    totals.headers.fetch_add(1, Ordering::Relaxed);
    // The last bytes of the body seen so far, to find markers across chunk boundaries.
    let mut tail: Vec<u8> = Vec::with_capacity(512);
    let mut note = |data: &[u8], out: &mut Outcome| {
        out.bytes += data.len() as u64;
        totals.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        let keep = tail.len().saturating_sub(32);
        tail.drain(..keep);
        tail.extend_from_slice(data);
        if !out.usage && contains(&tail, b"\"usage\":{") {
            out.usage = true;
        }
        if contains(&tail, b"data: [DONE]") {
            out.done = true;
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    if !chunked {
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                out.complete = true;
                return Ok(());
            }
            note(buf.get(..n).unwrap_or_default(), out);
        }
    }
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed before the last chunk"));
        }
        let size_field = line.trim_end().split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_field, 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size_field:?}")))?;
        if size == 0 {
            out.complete = true;
            return Ok(());
        }
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len());
            let got = reader.read(buf.get_mut(..want).unwrap_or_default())?;
            if got == 0 {
                return Err(std::io::Error::other("closed inside a chunk"));
            }
            note(buf.get(..got).unwrap_or_default(), out);
            left -= got;
        }
        line.clear();
        reader.read_line(&mut line)?; // the CRLF after the chunk
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
