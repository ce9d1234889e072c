//! Plugin configuration: `Config::parse` on arbitrary bytes.
//!
//! Invariants: nothing panics; an accepted configuration asks for at least one tokenizer; a
//! refusal is a short log line that quotes no value of the document (src/config.rs: "Error
//! messages never quote the offending value: a configuration may hold secrets").
//!
//! What a message may contain of the document, by design: keys (field paths name map keys,
//! `prices.<model>.input`; serde names unknown fields). The check removes those from the
//! message; what is left is template text, which must be short, contain none of the marker
//! characters below, and quote no string value of the document.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokenfuse::config::Config;

/// Longest message without document text in it, with room to spare.
const MAX_TEMPLATE_LEN: usize = 400;

/// Characters no message template contains (checked against src/config.rs, window.rs,
/// tokens.rs, price.rs, budget.rs): one left in a message came from the document.
fn is_marker(c: char) -> bool {
    !c.is_ascii() || c.is_ascii_control() || "~^@#$%&!|".contains(c)
}

/// Values that message templates themselves quote (`{"api": "v1"}`, the catch-all `"*"`,
/// the `"09:00"` example).
const QUOTED_BY_TEMPLATES: [&str; 3] = ["v1", "*", "09:00"];

#[derive(Default)]
struct Doc {
    keys: Vec<String>,
    values: Vec<String>,
}

fn walk(v: &Value, doc: &mut Doc) {
    match v {
        Value::String(s) => doc.values.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| walk(i, doc)),
        Value::Object(map) => {
            for (k, item) in map {
                doc.keys.push(k.clone());
                walk(item, doc);
            }
        }
        _ => {}
    }
}

/// Every string literal of a document serde_json refuses: it may have read (and named) any
/// of them as a key before it hit the error. No value can be quoted from such a document,
/// since it never reaches validation.
fn string_literals(data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if data[i] != b'"' {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        while i < data.len() && data[i] != b'"' {
            i += if data[i] == b'\\' { 2 } else { 1 };
        }
        if i >= data.len() {
            break;
        }
        if let Ok(s) = serde_json::from_slice::<String>(&data[start..=i]) {
            out.push(s);
        }
        i += 1;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let error = match Config::parse(data) {
        Ok(config) => {
            assert!(!config.encodings().is_empty(), "no tokenizer to build");
            return;
        }
        Err(e) => e,
    };
    let message = error.to_string();

    let (mut allowed, values) = match serde_json::from_slice::<Value>(data) {
        Ok(value) => {
            let mut doc = Doc::default();
            walk(&value, &mut doc);
            (doc.keys, doc.values)
        }
        Err(_) => (string_literals(data), Vec::new()),
    };
    allowed.retain(|k| !k.is_empty());
    allowed.sort_by_key(|k| std::cmp::Reverse(k.len()));
    let mut template = message.clone();
    for k in &allowed {
        template = template.replace(k.as_str(), "");
    }
    assert!(
        template.len() <= MAX_TEMPLATE_LEN,
        "message of {} bytes beyond the document's keys: {message}",
        template.len()
    );
    assert!(
        !template.chars().any(is_marker),
        "the message quotes a value of the document: {message}"
    );
    for v in values {
        if v.is_empty() || QUOTED_BY_TEMPLATES.contains(&v.as_str()) {
            continue;
        }
        assert!(
            !template.contains(&format!("\"{v}\"")),
            "the message quotes the value {v:?}: {message}"
        );
    }
});
