//! Cached answers from hostile upstream bytes: what [`shape::assemble`] keeps from any
//! response body (JSON, or an event stream) of any API, and what [`shape::event_stream`]
//! serves from it.
//!
//! Input layout: byte 0 picks the API (low 3 bits) and whether the bytes are an event
//! stream (bit 3); the rest is the response body.
//!
//! Invariants: nothing panics; every answer kept can be served as the API's event stream,
//! and that stream reads back to an answer that is kept the same way again (one
//! normalisation, then a fixed point), so a hit served as a stream and kept again never
//! drifts; the JSON body of a kept answer reads back to the same answer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenfuse::cache::shape;
use tokenfuse::llm::api::ApiKind;

const KINDS: [ApiKind; 5] = [
    ApiKind::ChatCompletions,
    ApiKind::Completions,
    ApiKind::Responses,
    ApiKind::Embeddings,
    ApiKind::AnthropicMessages,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let kind = KINDS[usize::from(pick & 7) % KINDS.len()];
    let streamed = pick & 8 != 0;
    let Ok(answer) = shape::assemble(kind, body, streamed) else {
        return;
    };
    let json = shape::json_body(&answer);
    assert_eq!(
        shape::assemble(kind, &json, false).as_ref(),
        Ok(&answer),
        "the JSON body of a kept answer reads back differently"
    );
    if !shape::streams(kind) {
        return;
    }
    let once = shape::event_stream(kind, &answer, true);
    let normalised = shape::assemble(kind, &once, true)
        .unwrap_or_else(|e| panic!("a kept answer served as a stream does not read back: {e:?}"));
    let twice = shape::event_stream(kind, &normalised, true);
    assert_eq!(
        shape::assemble(kind, &twice, true).as_ref(),
        Ok(&normalised),
        "a served stream drifts when kept again"
    );
});
