//! Non-streaming JSON responses: `usage_from_json` on arbitrary bytes, as OpenAI and as
//! Anthropic.
//!
//! Invariants: nothing panics; whether usage is found does not depend on the flag; an
//! Anthropic report's input includes its cache reads and writes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenfuse::llm::usage::usage_from_json;

fuzz_target!(|data: &[u8]| {
    let openai = usage_from_json(data, false);
    let anthropic = usage_from_json(data, true);
    match (openai, anthropic) {
        (Ok(o), Ok(a)) => {
            assert!(a.input >= o.input);
            assert!(a.input >= a.cached_input.saturating_add(a.cache_creation));
            assert_eq!(
                (o.output, o.cached_input, o.cache_creation, o.reasoning),
                (a.output, a.cached_input, a.cache_creation, a.reasoning)
            );
        }
        (Err(o), Err(a)) => assert_eq!(o, a),
        (o, a) => panic!("the anthropic flag changed whether usage was read: {o:?} vs {a:?}"),
    }
});
