//! Request bodies: arbitrary bytes parsed as every API's request shape; whatever parses is
//! counted, gets the stream-usage injection and is truncated to a small cap.
//!
//! Invariants: nothing panics; the filter's reader (`api::parse_request`) and the serde
//! reading it replaced (`api::reference::parse_request`) agree — the same request, or the
//! same class of error — except where the reader refuses an array standing for an object
//! (on purpose); every admitted body can have its model set (and then parses with that model
//! and the same count); an injected body parses as the same API again and asks for
//! `stream_options.include_usage: true`; message costs add up to the prompt count; a
//! truncated body parses, fits its cap, dropped at least one message and counts as said.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokenfuse::llm::api::{parse_request, reference, ApiKind, RequestBody};
use tokenfuse::llm::prompt::{count_prompt, message_costs, ImageCosts};
use tokenfuse::llm::rewrite::{apply, set_model, with_stream_usage, Edits};
use tokenfuse::llm::truncate::truncate;

const IMAGES: ImageCosts = ImageCosts { low: 85, high: 765 };

fn count(parsed: &RequestBody) -> u64 {
    let name = parsed.model().unwrap_or("gpt-4o");
    let model = common::models().resolve(name);
    count_prompt(parsed, name, model, common::counter(model.encoding), IMAGES).tokens
}

/// The count of a body whose model was renamed, under the original's counting rules.
fn count_without_model(parsed: &RequestBody) -> u64 {
    let model = common::models().resolve("gpt-4o");
    count_prompt(parsed, "gpt-4o", model, common::counter(model.encoding), IMAGES).tokens
}

fn check(kind: ApiKind, data: &[u8]) {
    if let Err(disagreement) = reference::compare(kind, data) {
        panic!("{disagreement}");
    }
    let Ok(parsed) = parse_request(kind, data) else {
        return;
    };
    let _ = parsed.output_reservation(4096);
    let prompt = count(&parsed);

    // Every body the reader admits can have its model set, and says nothing else new.
    let renamed = set_model(data, "fuzz-model\u{e9}\"").unwrap_or_else(|e| {
        panic!("set_model refused an admitted body ({e:?}): {}", String::from_utf8_lossy(data))
    });
    let again = parse_request(kind, &renamed).unwrap_or_else(|e| {
        panic!(
            "set_model output no longer parses as {kind:?} ({e}): {}",
            String::from_utf8_lossy(&renamed)
        )
    });
    assert_eq!(again.model(), Some("fuzz-model\u{e9}\""));
    assert_eq!(again.stream(), parsed.stream());
    assert_eq!(count_without_model(&again), count_without_model(&parsed));

    let injected = with_stream_usage(data, &parsed).unwrap_or_else(|e| {
        panic!("with_stream_usage refused an admitted body ({e:?}): {}", String::from_utf8_lossy(data))
    });
    if let Some(injected) = injected {
        // serde_json reads it too, unless the client's body was beyond it already (a number
        // past f64, deep nesting in a skipped field): those go upstream as sent.
        if let Ok(value) = serde_json::from_slice::<Value>(&injected) {
            assert_eq!(
                value.pointer("/stream_options/include_usage"),
                Some(&Value::Bool(true)),
                "with_stream_usage did not set include_usage: {}",
                String::from_utf8_lossy(&injected)
            );
        }
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
    let name = parsed.model().unwrap_or("gpt-4o");
    let model = common::models().resolve(name);
    let costs = message_costs(&parsed, name, model, common::counter(model.encoding), IMAGES);
    if let Some(costs) = &costs {
        assert_eq!(costs.prompt(costs.total()), prompt, "message costs add up to the count");
    }
    if let Some(t) = costs.and_then(|c| truncate(&parsed, &c, cap)) {
        assert!(t.prompt <= cap, "truncated to {} > cap {cap}", t.prompt);
        assert!(t.dropped > 0);
        let edits = Edits {
            drop_messages: t.drop,
            model: None,
            stream_usage: true,
        };
        let body = apply(data, &parsed, &edits)
            .expect("an admitted body can be edited")
            .expect("dropping messages changes it");
        let reparsed = parse_request(kind, &body).expect("a truncated body parses");
        assert_eq!(count(&reparsed), t.prompt);
    }
}

fuzz_target!(|data: &[u8]| {
    for kind in common::KINDS {
        check(kind, data);
    }
});
