//! Request bodies: arbitrary bytes parsed as every API's request shape; whatever parses is
//! counted, gets the stream-usage injection and is truncated to a small cap.
//!
//! Invariants: nothing panics; the filter's reader (`api::parse_request`) and the serde
//! reading it replaced (`api::reference::parse_request`) agree — the same request, or the
//! same class of error — except where the reader refuses an array standing for an object
//! (on purpose); an injected body is JSON, parses as the same API again and asks for
//! `stream_options.include_usage: true`; a truncated body parses, fits its cap and dropped
//! at least one message.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokenfuse::api::{parse_request, reference, with_stream_usage, ApiKind, RequestBody};
use tokenfuse::prompt::{count_prompt, ImageCosts};
use tokenfuse::truncate::truncate;

const IMAGES: ImageCosts = ImageCosts { low: 85, high: 765 };

fn count(parsed: &RequestBody) -> u64 {
    let name = parsed.model().unwrap_or("gpt-4o");
    let model = common::models().resolve(name);
    count_prompt(parsed, name, model, common::counter(model.encoding), IMAGES).tokens
}

fn check(kind: ApiKind, data: &[u8]) {
    if let Err(disagreement) = reference::compare(kind, data) {
        panic!("{disagreement}");
    }
    let Ok(parsed) = parse_request(kind, data) else {
        return;
    };
    let _ = parsed.max_output_tokens();
    let prompt = count(&parsed);

    if let Some(injected) = with_stream_usage(data, &parsed) {
        let value: Value = serde_json::from_slice(&injected).unwrap_or_else(|e| {
            panic!(
                "with_stream_usage produced invalid JSON ({e}): {}",
                String::from_utf8_lossy(&injected)
            )
        });
        assert_eq!(
            value.pointer("/stream_options/include_usage"),
            Some(&Value::Bool(true)),
            "with_stream_usage did not set include_usage: {}",
            String::from_utf8_lossy(&injected)
        );
        let again = parse_request(kind, &injected).unwrap_or_else(|e| {
            panic!(
                "with_stream_usage output no longer parses as {kind:?} ({e}): {}",
                String::from_utf8_lossy(&injected)
            )
        });
        assert!(again.stream_usage_requested());
        assert_eq!(again.model(), parsed.model());
        assert!(again.stream());
    }

    let cap = prompt / 2;
    if let Some(t) = truncate(kind, data, cap, count) {
        assert!(t.prompt <= cap, "truncated to {} > cap {cap}", t.prompt);
        assert!(t.dropped > 0);
        let reparsed = parse_request(kind, &t.body).expect("a truncated body parses");
        assert_eq!(count(&reparsed), t.prompt);
    }
}

fuzz_target!(|data: &[u8]| {
    for kind in common::KINDS {
        check(kind, data);
    }
});
