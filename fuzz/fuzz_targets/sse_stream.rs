//! Server-sent event streams: the same bytes fed to `SseDecoder` + `StreamMeter` whole and
//! split into chunks at fuzzer-chosen points (empty chunks included), as Envoy may split a
//! response anywhere.
//!
//! Input layout: byte 0 picks the decoder's line limit and the meter's text cap (small ones,
//! so the oversize and flush paths run), byte 1 the number of splits `n` (0..=15), the next
//! `n` bytes the gaps between split points; the rest is the stream.
//!
//! Invariants: nothing panics; the events, the decoder's oversized-line count (streams
//! without NUL bytes) and every API's `StreamOutcome` are the same whatever the split.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tokenfuse::llm::sse::{SseDecoder, StreamMeter, StreamOutcome};
use tokenfuse::tokenizer::Encoding;

#[derive(Debug, PartialEq)]
struct Run {
    events: Vec<(String, String)>,
    oversized_lines: u64,
    outcomes: Vec<StreamOutcome>,
}

fn run(chunks: &[&[u8]], max_line: usize, max_text: usize) -> Run {
    let counter = common::counter(Encoding::O200kBase);
    let mut decoder = SseDecoder::new(max_line);
    let mut meters: Vec<StreamMeter> = common::KINDS
        .iter()
        .map(|&k| StreamMeter::new(k, max_text))
        .collect();
    let mut events = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk, |event, data| {
            events.push((event.to_string(), data.to_string()));
            for m in &mut meters {
                m.on_event(event, data, counter);
            }
        });
    }
    Run {
        events,
        oversized_lines: decoder.oversized_lines,
        outcomes: meters.iter_mut().map(|m| m.finish(counter)).collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    let [limits, splits, rest @ ..] = data else {
        return;
    };
    let max_line = match limits & 0x0f {
        0 => 1 << 20,
        l => usize::from(l) * 16,
    };
    let max_text = match limits >> 4 {
        0 => 1 << 20,
        t => usize::from(t) * 8,
    };
    let n = usize::from(splits & 0x0f).min(rest.len());
    let (gaps, stream) = rest.split_at(n);

    let mut chunks = Vec::with_capacity(n + 1);
    let mut start = 0;
    for &gap in gaps {
        let end = (start + usize::from(gap)).min(stream.len());
        chunks.push(&stream[start..end]);
        start = end;
    }
    chunks.push(&stream[start..]);

    let whole = run(&[stream], max_line, max_text);
    let mut split = run(&chunks, max_line, max_text);
    if stream.contains(&0) {
        // The decoder marks the rest of a dropped line with a leading NUL byte, so an
        // oversized line that itself starts with NUL may go uncounted (never read, though).
        split.oversized_lines = whole.oversized_lines;
    }
    assert_eq!(whole, split, "chunks: {chunks:?}");
});
