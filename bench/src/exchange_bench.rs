//! Per-request micro-benchmark for `make bench` (bench/run.py): the filter's whole work for
//! one chat completion — request headers, body (parse, count, enforce), response headers,
//! response body (usage), settlement — through [`tokenfuse::exchange::Exchange`] against an
//! in-memory host, natively and compiled to `wasm32-wasip1` under V8. It leaves out what
//! Envoy itself costs (host calls, the calls into the VM); bench/run.py measures that side
//! by side in a real Envoy.
//!
//! ```text
//! cargo run --release --example exchange_bench -- results/body-1kb.json
//! cargo build --release --example exchange_bench --target wasm32-wasip1
//! node scripts/wasi-run.mjs target/wasm32-wasip1/release/examples/exchange_bench.wasm results/body-1kb.json
//! ```
//!
//! Arguments: request bodies (chat completions JSON) to send, relative to the current
//! directory. A body asking for `"stream":true` is answered with a chat completion stream
//! ([`stream_events`]: one SSE event per body chunk, as the mock upstream sends it, ending
//! with a usage chunk and `[DONE]`); any other with one JSON completion. Every request is
//! made distinct (its last message's text starts with the request's number), so the filter's count cache never serves it: the cost measured is
//! that of text never seen before; `--repeat` sends the body unchanged instead (from the
//! third request on, its long texts come from the cache). Options: `--rounds N` (default
//! 5), `--min-ms N` (shortest timed loop, default 300), `--iterations N` (a fixed number of
//! requests per round, for callgrind), `--thrash-kb N` (write N KiB of memory between
//! requests, untimed, evicting caches as Envoy's own work does), `--config count|budget`
//! (default: count and budget; `count-uncached` is counting with the count cache off).
//! Prints one JSON object per line and configuration and body:
//! `{"kind":"exchange","config":...,"median_us":...,"allocations_per_request":...}`. A
//! benchmark, not a test: it asserts nothing but that the exchange went through.

use rustc_hash::FxHashMap as HashMap;
use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Instant;

#[path = "support/bench.rs"]
mod bench;
use bench::{median, Thrash};
use tokenfuse::config::Config;
use tokenfuse::exchange::{Action, Exchange};
use tokenfuse::filter::Filter;
use tokenfuse::host::{GrpcRefused, Host, Level, SharedError};

/// Counts heap allocations (natively and in V8 alike), to report them per request.
struct CountingAlloc;

static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Allocations made between a request's first callback and the end of its exchange.
static EXCHANGE_ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const RESPONSE: &[u8] = br#"{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;

/// A streamed answer: a role-and-text chunk, 29 more text chunks (a word each), the finish
/// chunk, the usage chunk (`stream_options.include_usage`) and `[DONE]`, each delivered as its
/// own body chunk. Built once and kept for the run (leaked), so the host lends every chunk as
/// it lends [`RESPONSE`].
fn stream_events() -> Vec<&'static [u8]> {
    const HEAD: &str = r#"{"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o""#;
    let words = "Sure, here is a short answer with a few words in every chunk, as models \
                 stream them: tokens arrive one or two at a time, and the filter meters them.";
    let mut events: Vec<String> = words
        .split_inclusive(' ')
        .enumerate()
        .map(|(i, w)| {
            let role = if i == 0 { r#""role":"assistant","# } else { "" };
            format!(
                "data: {HEAD},\"choices\":[{{\"index\":0,\"delta\":{{{role}\"content\":\"{w}\"}},\"finish_reason\":null}}]}}\n\n"
            )
        })
        .collect();
    events.push(format!(
        "data: {HEAD},\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
    ));
    events.push(format!(
        "data: {HEAD},\"choices\":[],\"usage\":{{\"prompt_tokens\":11,\"completion_tokens\":30,\"total_tokens\":41}}}}\n\n"
    ));
    events.push("data: [DONE]\n\n".to_string());
    events.into_iter().map(|e| e.leak().as_bytes()).collect()
}

const CONFIGS: [(&str, &str); 3] = [
    ("count", r#"{"api":"v1"}"#),
    (
        "budget",
        r#"{"api":"v1","budgets":[{"name":"bench","key":"header:x-tenant","window":"minute","base":1e15}]}"#,
    ),
    // What the count cache costs when it never helps (run only when asked for).
    (
        "count-uncached",
        r#"{"api":"v1","tokenizer":{"cache_bytes":0}}"#,
    ),
];

/// Shared data that outlives every request (one process, one worker).
type Shared = Rc<RefCell<HashMap<String, (Vec<u8>, u32)>>>;

/// The least a host can do: hold one request's headers and bodies, shared data, counters.
///
/// Not the tests' `tokenfuse::host::fake::FakeHost`, which does more than Envoy would: it
/// reports every log level enabled (the filter then formats its debug lines) and keeps every
/// line, and it allocates a key on every counter update. Measured with it (natively, 1 KB
/// body): 39 instead of 31 allocations per request counting, 84 instead of 67 with a budget.
struct BenchHost {
    request_headers: Vec<(String, String)>,
    request_body: Vec<u8>,
    response_headers: Vec<(String, String)>,
    /// The response body chunk Envoy would hold now.
    response_chunk: &'static [u8],
    shared: Shared,
    counters: HashMap<String, u64>,
    replied: Option<u32>,
}

fn get(list: &[(String, String)], name: &str) -> Option<String> {
    list.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

fn set(list: &mut Vec<(String, String)>, name: &str, value: Option<&str>) {
    list.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    if let Some(v) = value {
        list.push((name.to_string(), v.to_string()));
    }
}

impl Host for BenchHost {
    fn request_header(&self, name: &str) -> Option<String> {
        get(&self.request_headers, name)
    }
    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        set(&mut self.request_headers, name, value)
    }
    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        self.request_body.get(..size).map(<[u8]>::to_vec)
    }
    fn replace_request_body(&mut self, size: usize, body: &[u8]) {
        let size = size.min(self.request_body.len());
        self.request_body.splice(..size, body.iter().copied());
    }
    fn response_header(&self, name: &str) -> Option<String> {
        get(&self.response_headers, name)
    }
    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        set(&mut self.response_headers, name, value)
    }
    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        self.response_chunk.get(..size).map(<[u8]>::to_vec)
    }
    fn send_reply(&mut self, status: u32, _: &[(&str, &str)], _: &[u8]) {
        self.replied = Some(status);
    }
    fn upstream_cluster(&self) -> Option<String> {
        Some("primary".to_string())
    }
    fn counter_add(&mut self, name: &str, n: u64) {
        // As the Wasm host does: one map entry per stat name, updated in place.
        match self.counters.get_mut(name) {
            Some(v) => *v += n,
            None => {
                self.counters.insert(name.to_string(), n);
            }
        }
    }
    fn gauge_set(&mut self, name: &str, value: u64) {
        self.counter_add(name, value)
    }
    fn histogram_record(&mut self, name: &str, value: u64) {
        self.counter_add(name, value)
    }
    fn log(&self, _: Level, _: &str) {}
    fn log_enabled(&self, _: Level) -> bool {
        false
    }
    fn now_ms(&self) -> i64 {
        1_780_000_000_000
    }
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.borrow().get(key).cloned()
    }
    fn shared_set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError> {
        let mut shared = self.shared.borrow_mut();
        match shared.get_mut(key) {
            Some(entry) if cas != 0 && cas != entry.1 => Err(SharedError::CasMismatch),
            Some(entry) => {
                *entry = (value.to_vec(), entry.1.wrapping_add(1).max(1));
                Ok(())
            }
            None => {
                shared.insert(key.to_string(), (value.to_vec(), 1));
                Ok(())
            }
        }
    }
    fn clear_route_cache(&mut self) {}
    fn route_name(&self) -> Option<String> {
        None
    }
    fn grpc_call(
        &mut self,
        _: &str,
        _: &str,
        _: &str,
        _: &[u8],
        _: u64,
    ) -> Result<u32, GrpcRefused> {
        Err(GrpcRefused)
    }
    fn grpc_response_body(&self, _: usize) -> Option<Vec<u8>> {
        None
    }
    fn resume_request(&mut self) {}
}

/// One request through the exchange, as Envoy's HTTP/1 codec delivers it: headers, the
/// body (then an empty end-of-stream chunk), response headers, the response body, done.
/// `stream`: the events of a streamed answer (empty: answer with [`RESPONSE`]).
fn one_request(
    filter: &Rc<Filter>,
    host: &mut BenchHost,
    body: &[u8],
    id: u32,
    stream: &[&'static [u8]],
) -> bool {
    host.request_headers = vec![
        (":method".into(), "POST".into()),
        (":path".into(), "/v1/chat/completions".into()),
        (":authority".into(), "127.0.0.1:10000".into()),
        (":scheme".into(), "http".into()),
        ("content-type".into(), "application/json".into()),
        ("content-length".into(), body.len().to_string()),
        ("x-tenant".into(), "bench".into()),
        ("x-forwarded-proto".into(), "http".into()),
        (
            "x-request-id".into(),
            "8f0c3c52-5f7e-4bd4-9a53-3b1c7b6f8e21".into(),
        ),
    ];
    host.request_body.clear();
    host.request_body.extend_from_slice(body);
    host.response_headers = if stream.is_empty() {
        vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "application/json".into()),
            ("content-length".into(), RESPONSE.len().to_string()),
        ]
    } else {
        vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "text/event-stream".into()),
            ("transfer-encoding".into(), "chunked".into()),
        ]
    };
    host.replied = None;
    let allocations = ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed);
    let mut ex = Exchange::new(Rc::clone(filter), id);
    ex.on_request_headers(host, false);
    ex.on_request_body(host, body.len(), false);
    let action = ex.on_request_body(host, body.len(), true);
    if action != Action::Continue || host.replied.is_some() {
        return false;
    }
    ex.on_response_headers(host, false);
    if stream.is_empty() {
        host.response_chunk = RESPONSE;
        ex.on_response_body(host, RESPONSE.len(), true);
    } else {
        // Chunks pass through (the filter returns Continue), so each call sees one event;
        // the stream ends with an empty end-of-stream chunk, as Envoy's codec delivers it.
        for event in stream {
            host.response_chunk = event;
            ex.on_response_body(host, event.len(), false);
        }
        ex.on_response_body(host, 0, true);
    }
    ex.on_done(host);
    drop(ex);
    EXCHANGE_ALLOCATIONS.fetch_add(
        ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed) - allocations,
        std::sync::atomic::Ordering::Relaxed,
    );
    true
}

/// `body` with request `id`'s number at the start of its last `"content"` text, so no two
/// requests carry the same prompt.
fn distinct(out: &mut Vec<u8>, body: &[u8], id: u32) {
    const MARK: &[u8] = br#""content":"#;
    out.clear();
    let text_start = body
        .windows(MARK.len())
        .rposition(|w| w == MARK)
        .and_then(|at| {
            let after = at + MARK.len();
            let quote = after
                + body[after..]
                    .iter()
                    .position(|b| !b.is_ascii_whitespace())?;
            (body[quote] == b'"').then_some(quote + 1)
        });
    match text_start {
        Some(split) => {
            out.extend_from_slice(&body[..split]);
            out.extend_from_slice(format!("#{id} ").as_bytes());
            out.extend_from_slice(&body[split..]);
        }
        None => out.extend_from_slice(body),
    }
}

fn main() -> ExitCode {
    let target = if cfg!(target_family = "wasm") {
        "wasm32-wasip1"
    } else {
        "native"
    };
    let mut rounds = 5usize;
    let mut min_ms = 300u128;
    let mut configs: Vec<(&str, &str)> = CONFIGS[..2].to_vec();
    let mut thrash_kb = 0usize;
    let mut repeat = false;
    let mut iterations = 0u64;
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => match args.next().and_then(|v| v.parse::<usize>().ok()) {
                Some(n) if n > 0 => rounds = n,
                _ => {
                    eprintln!("exchange_bench: --rounds needs a positive number");
                    return ExitCode::from(2);
                }
            },
            "--min-ms" => match args.next().and_then(|v| v.parse::<u128>().ok()) {
                Some(n) => min_ms = n,
                None => {
                    eprintln!("exchange_bench: --min-ms needs a number");
                    return ExitCode::from(2);
                }
            },
            "--iterations" => match args.next().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) => iterations = n,
                None => {
                    eprintln!("exchange_bench: --iterations needs a number");
                    return ExitCode::from(2);
                }
            },
            "--repeat" => repeat = true,
            "--thrash-kb" => match args.next().and_then(|v| v.parse::<usize>().ok()) {
                Some(n) => thrash_kb = n,
                None => {
                    eprintln!("exchange_bench: --thrash-kb needs a number");
                    return ExitCode::from(2);
                }
            },
            "--config" => {
                let want = args.next().unwrap_or_default();
                configs = CONFIGS
                    .iter()
                    .copied()
                    .filter(|(n, _)| *n == want)
                    .collect();
                if configs.is_empty() {
                    eprintln!("exchange_bench: --config is count, budget or count-uncached");
                    return ExitCode::from(2);
                }
            }
            _ => files.push(arg),
        }
    }
    // Each body with the answer it gets: the events of a streamed one (for `"stream":true`),
    // or none (answered with RESPONSE).
    let events = stream_events();
    let mut bodies = Vec::new();
    for path in &files {
        match std::fs::read(path) {
            Ok(body) => {
                let streamed = serde_json::from_slice::<serde_json::Value>(&body)
                    .is_ok_and(|v| v["stream"] == serde_json::Value::Bool(true));
                let stream: &[&'static [u8]] = if streamed { &events } else { &[] };
                bodies.push((path.clone(), body, stream));
            }
            Err(err) => {
                eprintln!("exchange_bench: cannot read {path}: {err}");
                return ExitCode::from(2);
            }
        }
    }
    for (name, document) in configs {
        let filter = match Config::parse(document.as_bytes()).map(Filter::new) {
            Ok(Ok(f)) => Rc::new(f),
            Ok(Err(e)) => {
                eprintln!("exchange_bench: {name}: {e}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("exchange_bench: {name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut host = BenchHost {
            request_headers: Vec::new(),
            request_body: Vec::new(),
            response_headers: Vec::new(),
            response_chunk: RESPONSE,
            shared: Shared::default(),
            counters: HashMap::default(),
            replied: None,
        };
        for &(ref path, ref body, stream) in &bodies {
            // Warm-up (lets V8 tier the hot code up), and the check that the request went
            // through the filter and upstream, not into a local reply.
            for id in 0..50 {
                if !one_request(&filter, &mut host, body, id, stream) {
                    eprintln!(
                        "exchange_bench: {name}: {path} did not go through (reply {:?})",
                        host.replied
                    );
                    return ExitCode::FAILURE;
                }
            }
            let mut per_request = Vec::new();
            let mut variant = Vec::with_capacity(body.len() + 16);
            let allocations_before =
                EXCHANGE_ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed);
            let mut requests = 0u64;
            let mut id = 100u32;
            for _ in 0..rounds {
                let start = Instant::now();
                let mut n = 0u64;
                let mut thrash = Thrash::new(thrash_kb);
                let mut thrash_ns = 0u128;
                loop {
                    if !repeat {
                        let t = Instant::now();
                        distinct(&mut variant, body, id);
                        thrash_ns += t.elapsed().as_nanos();
                    }
                    let body = if repeat { &body[..] } else { &variant[..] };
                    thrash_ns += thrash.evict();
                    std::hint::black_box(one_request(&filter, &mut host, body, id, stream));
                    id = id.wrapping_add(1);
                    n += 1;
                    requests += 1;
                    if (iterations > 0 && n >= iterations)
                        || (iterations == 0 && start.elapsed().as_millis() >= min_ms)
                    {
                        break;
                    }
                }
                let spent = start.elapsed().as_nanos() - thrash_ns;
                per_request.push(spent as f64 / 1e3 / n as f64);
            }
            // Between the first callback and the exchange's end: the filter's own, plus
            // what this host allocates for it (header values, body and shared-data copies),
            // as the Wasm host does.
            let allocations = EXCHANGE_ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed)
                - allocations_before;
            println!(
                "{{\"kind\":\"exchange\",\"config\":\"{name}\",\"target\":\"{target}\",\"file\":\"{path}\",\"bytes\":{},\"stream_events\":{},\"rounds\":{rounds},\"median_us\":{:.3},\"allocations_per_request\":{:.1}}}",
                body.len(),
                stream.len(),
                median(per_request),
                allocations as f64 / requests.max(1) as f64,
            );
        }
    }
    ExitCode::SUCCESS
}
