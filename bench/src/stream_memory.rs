//! Heap held per in-flight stream: `streams` exchanges answered with chat completion streams
//! that carry no usage chunk (the case where the filter must count the streamed text), fed
//! in turns (one event to each stream, then the next), measured with a counting allocator
//! while all of them are still open. What the filter itself holds per stream, natively,
//! through [`tokenfuse::exchange::Exchange`] against the tests' fake host (one host shared
//! by the streams, its log emptied before each measurement); not Envoy's own buffers.
//!
//! ```text
//! cargo run --release --features testkit --example stream_memory -- [streams] [text KB]...
//! ```
//!
//! Defaults: 50 streams, answers of 4, 64, 256 and 1024 KB of text, a word per event.
//! Prints, for each answer size, the heap the streams hold beyond what they held at
//! their response headers, per stream. A measurement, not a test: it asserts nothing but
//! that the exchanges went through. It uses only what the filter's API offered before
//! streamed text was counted as it arrives, so it runs on earlier commits too.

use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokenfuse::config::Config;
use tokenfuse::exchange::{Action, Exchange};
use tokenfuse::filter::Filter;
use tokenfuse::host::fake::FakeHost;

/// Counts the bytes allocated and not yet freed.
struct LiveBytes;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl std::alloc::GlobalAlloc for LiveBytes {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        LIVE.fetch_add(size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static GLOBAL: LiveBytes = LiveBytes;

const CHAT: &str = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Tell me a long story."}]}"#;

/// Words of prose, one per event, as models stream them.
const WORDS: &[&str] = &[
    "Once", " upon", " a", " time", ",", " in", " 1999", ",", " a", " small", " fox", " didn't",
    " know", " where", " the", " river", " went", ".", "\n\n", "It", " walked", " for", " 12",
    " days", " and", " found", " the", " sea", "!",
];

fn event(word: &str) -> Vec<u8> {
    let data = serde_json::json!({
        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}],
    });
    format!("data: {data}\n\n").into_bytes()
}

/// Heap held per stream after `text_kb` KB of text streamed to each of `streams` streams,
/// beyond what they held at their response headers; and the text bytes each received.
fn measure(filter: &Rc<Filter>, streams: usize, text_kb: usize) -> Result<(i64, usize), String> {
    let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
    let events: Vec<Vec<u8>> = WORDS.iter().map(|w| event(w)).collect();
    let mut exchanges = Vec::with_capacity(streams);
    for id in 0..streams {
        let mut ex = Exchange::new(Rc::clone(filter), id as u32 + 1);
        let body_len = host.request_body.len();
        if ex.on_request_headers(&mut host, false) == Action::Pause {
            ex.on_request_body(&mut host, body_len, true);
        }
        host.response_headers = vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "text/event-stream".into()),
        ];
        ex.on_response_headers(&mut host, false);
        if host.reply.is_some() {
            return Err("the filter answered the request itself".into());
        }
        exchanges.push(ex);
    }
    host.response_chunk = Vec::with_capacity(events.iter().map(Vec::len).max().unwrap_or(0));
    host.logs.borrow_mut().clear();
    host.logs.borrow_mut().shrink_to_fit();
    let before = LIVE.load(Ordering::Relaxed);
    let mut text = 0;
    let mut i = 0;
    while text < text_kb * 1000 {
        let word = WORDS[i % WORDS.len()];
        host.response_chunk.clear();
        host.response_chunk
            .extend_from_slice(&events[i % WORDS.len()]);
        let size = host.response_chunk.len();
        for ex in &mut exchanges {
            ex.on_response_body(&mut host, size, false);
        }
        text += word.len();
        i += 1;
    }
    host.logs.borrow_mut().clear();
    host.logs.borrow_mut().shrink_to_fit();
    let after = LIVE.load(Ordering::Relaxed);
    for ex in &mut exchanges {
        ex.on_done(&mut host);
    }
    Ok(((after - before) / streams as i64, text))
}

fn main() -> ExitCode {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let streams = args.first().copied().unwrap_or(50);
    let sizes = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![4, 64, 256, 1024]
    };
    let filter = match Config::parse(br#"{"api":"v1"}"#).map(Filter::new) {
        Ok(Ok(f)) => Rc::new(f),
        _ => {
            eprintln!("the default configuration does not load");
            return ExitCode::FAILURE;
        }
    };
    println!("streams in flight: {streams}, no usage chunk, one word per event");
    println!("| text streamed per stream | heap held per stream beyond its response headers |");
    println!("|---:|---:|");
    for kb in sizes {
        match measure(&filter, streams, kb) {
            Ok((held, text)) => println!("| {text} bytes | {held} bytes |"),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
