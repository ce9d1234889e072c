//! Request body edits: the few changes the filter makes to what goes upstream — the model of
//! a rerouted request, `stream_options.include_usage`, the messages a truncation keeps.
//!
//! Every edit is made on the body's text: the spans of the members it touches are found by
//! the same strict reader that parsed the request ([`crate::llm::json`]), and only those bytes
//! change; everything else goes upstream byte for byte as the client sent it. So any body
//! the filter admitted can be edited: an edit cannot fail on something the reader accepts
//! (a number beyond `f64`, nesting past 128 levels in a skipped field) the way a rebuild
//! through a JSON value would — and if an edit fails anyway, the caller refuses the request
//! rather than forward a body that says something else than what was billed.
//!
//! Work is linear in the body: one scan of the top-level members per edit, and a second of
//! one array's elements for a truncation.

use std::ops::Range;

use crate::llm::api::RequestBody;
use crate::llm::json::{self, Error};

/// `text` as a JSON string literal.
fn quoted(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// Where the top-level member `name` is, as the span of its value; `Ok(None)` when absent.
fn member(text: &str, name: &str) -> Result<Option<Range<usize>>, Error> {
    Ok(json::members(text)?
        .into_iter()
        .find(|(key, _)| key == name)
        .map(|(_, span)| span))
}

/// `text` with `span` replaced by `with`.
fn splice(text: &str, span: Range<usize>, with: &str) -> Option<Vec<u8>> {
    let before = text.get(..span.start)?;
    let after = text.get(span.end..)?;
    let mut out = Vec::with_capacity(
        before
            .len()
            .saturating_add(with.len())
            .saturating_add(after.len()),
    );
    out.extend_from_slice(before.as_bytes());
    out.extend_from_slice(with.as_bytes());
    out.extend_from_slice(after.as_bytes());
    Some(out)
}

/// `text` (an object, from its first non-space byte) with `member` (`"key":value`) added as
/// its first member.
fn prepend_member(text: &str, object_start: usize, member: &str) -> Option<Vec<u8>> {
    let open = object_start.checked_add(1)?;
    let rest = text.get(open..)?;
    let empty = rest.trim_start().starts_with('}');
    let with = if empty {
        member.to_string()
    } else {
        format!("{member},")
    };
    splice(text, open..open, &with)
}

/// Why an edit could not be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EditError {
    /// The body is not what the reader admitted (never expected; reported, not forwarded).
    Unreadable,
}

impl From<Error> for EditError {
    fn from(_: Error) -> Self {
        EditError::Unreadable
    }
}

fn text(body: &[u8]) -> Result<&str, EditError> {
    std::str::from_utf8(body).map_err(|_| EditError::Unreadable)
}

fn object_start(text: &str) -> Result<usize, EditError> {
    let start = text.len().saturating_sub(text.trim_start().len());
    match text.as_bytes().get(start) {
        Some(b'{') => Ok(start),
        _ => Err(EditError::Unreadable),
    }
}

/// `body` with its top-level `model` set to `model` (added when the body has none).
pub fn set_model(body: &[u8], model: &str) -> Result<Vec<u8>, EditError> {
    let text = text(body)?;
    let start = object_start(text)?;
    let value = quoted(model);
    let edited = match member(text, "model")? {
        Some(span) => splice(text, span, &value),
        None => prepend_member(text, start, &format!("\"model\":{value}")),
    };
    edited.ok_or(EditError::Unreadable)
}

/// `body` with `stream_options.include_usage: true`, so the provider reports usage in a
/// final chunk; `Ok(None)` when nothing needs to change (not a streaming chat/completions
/// request, or usage asked for already). An explicit `include_usage: false` is overridden:
/// the client then receives one more chunk, with empty `choices`, before `[DONE]`.
pub fn with_stream_usage(
    body: &[u8],
    parsed: &RequestBody<'_>,
) -> Result<Option<Vec<u8>>, EditError> {
    if !parsed.accepts_stream_options() || !parsed.stream() || parsed.stream_usage_requested() {
        return Ok(None);
    }
    let text = text(body)?;
    let start = object_start(text)?;
    const MEMBER: &str = r#""include_usage":true"#;
    let edited = match member(text, "stream_options")? {
        None => prepend_member(text, start, &format!(r#""stream_options":{{{MEMBER}}}"#)),
        Some(span) => {
            let value = text.get(span.clone()).ok_or(EditError::Unreadable)?;
            if value == "null" {
                splice(text, span, &format!("{{{MEMBER}}}"))
            } else {
                // An object (the reader refused any other type): set its member.
                match member(value, "include_usage")? {
                    Some(inner) => {
                        // `inner` is within `value`, which starts at `span.start`.
                        let at = span.start;
                        let start = at.saturating_add(inner.start);
                        splice(text, start..at.saturating_add(inner.end), "true")
                    }
                    None => prepend_member(text, span.start, MEMBER),
                }
            }
        }
    };
    edited.map(Some).ok_or(EditError::Unreadable)
}

/// `body` with the elements of its top-level array `field` for which `keep` is false
/// removed, each kept element byte for byte.
pub fn retain_elements(
    body: &[u8],
    field: &str,
    mut keep: impl FnMut(usize) -> bool,
) -> Result<Vec<u8>, EditError> {
    let text = text(body)?;
    let span = member(text, field)?.ok_or(EditError::Unreadable)?;
    let elements = json::elements(text, span.clone())?;
    let mut array = String::with_capacity(span.len());
    array.push('[');
    let mut first = true;
    for (i, element) in elements.into_iter().enumerate() {
        if !keep(i) {
            continue;
        }
        if !first {
            array.push(',');
        }
        first = false;
        array.push_str(text.get(element).ok_or(EditError::Unreadable)?);
    }
    array.push(']');
    splice(text, span, &array).ok_or(EditError::Unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::api::{parse_request, ApiKind};
    use serde_json::Value;

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn the_model_is_replaced_in_place_and_the_rest_kept_byte_for_byte() {
        let body =
            br#"{ "messages":[{"role":"user","content":"hi"}], "model" : "gpt-4o", "seed":1e400}"#;
        let out = set_model(body, "gpt-4o-mini").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "messages":[{"role":"user","content":"hi"}], "model" : "gpt-4o-mini", "seed":1e400}"#
        );
        // An escaped key is the same member.
        let out = set_model(br#"{"mod\u0065l":"a"}"#, "b").unwrap();
        assert_eq!(out, br#"{"mod\u0065l":"b"}"#);
    }

    #[test]
    fn a_missing_model_is_added() {
        assert_eq!(set_model(b" {}", "m").unwrap(), br#" {"model":"m"}"#);
        assert_eq!(
            set_model(br#"{"messages":[]}"#, "m\"x").unwrap(),
            br#"{"model":"m\"x","messages":[]}"#
        );
    }

    #[test]
    fn bodies_serde_json_refuses_are_edited_too() {
        // Found by attack: a reroute rebuilt through serde_json failed on these and the
        // original body (the dearer model) went upstream.
        let deep = format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}],"metadata":{{"x":{}1{}}}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        for body in [
            deep.as_str(),
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"seed":1e400}"#,
        ] {
            assert!(serde_json::from_str::<Value>(body).is_err());
            let parsed = parse_request(ApiKind::ChatCompletions, body.as_bytes()).unwrap();
            assert_eq!(parsed.model(), Some("gpt-4o"));
            let out = set_model(body.as_bytes(), "gpt-4o-mini").unwrap();
            let again = parse_request(ApiKind::ChatCompletions, &out).unwrap();
            assert_eq!(again.model(), Some("gpt-4o-mini"));
            assert_eq!(out.len(), body.len() + 5);
        }
    }

    #[test]
    fn stream_usage_is_added_or_set_in_every_form() {
        let usage = |body: &str| {
            let parsed = parse_request(ApiKind::ChatCompletions, body.as_bytes()).unwrap();
            with_stream_usage(body.as_bytes(), &parsed)
                .unwrap()
                .map(|b| json(&b)["stream_options"].clone())
        };
        let base = r#""model":"m","stream":true,"messages":[]"#;
        assert_eq!(
            usage(&format!("{{{base}}}")),
            Some(serde_json::json!({"include_usage": true}))
        );
        assert_eq!(
            usage(&format!(r#"{{{base},"stream_options":null}}"#)),
            Some(serde_json::json!({"include_usage": true}))
        );
        assert_eq!(
            usage(&format!(r#"{{{base},"stream_options":{{}}}}"#)),
            Some(serde_json::json!({"include_usage": true}))
        );
        assert_eq!(
            usage(&format!(
                r#"{{{base},"stream_options":{{"x":1,"include_usage":false}}}}"#
            )),
            Some(serde_json::json!({"x": 1, "include_usage": true}))
        );
        assert_eq!(
            usage(&format!(
                r#"{{{base},"stream_options":{{"include_usage":true}}}}"#
            )),
            None
        );
        assert_eq!(usage(r#"{"model":"m","messages":[]}"#), None);
    }

    #[test]
    fn elements_are_removed_and_the_kept_ones_kept_as_sent() {
        let body = br#"{"messages":[ {"a":1} , {"b":[2]},{"c":"3"} ],"z":true}"#;
        let out = retain_elements(body, "messages", |i| i != 1).unwrap();
        assert_eq!(out, br#"{"messages":[{"a":1},{"c":"3"}],"z":true}"#);
        let out = retain_elements(body, "messages", |_| false).unwrap();
        assert_eq!(out, br#"{"messages":[],"z":true}"#);
        assert!(retain_elements(body, "nope", |_| true).is_err());
    }

    #[test]
    fn stream_usage_is_injected_textually_when_absent() {
        let body =
            br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let parsed = parse_request(ApiKind::ChatCompletions, body).unwrap();
        let out = with_stream_usage(body, &parsed).unwrap().unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert!(out.ends_with(br#""messages":[{"role":"user","content":"hi"}]}"#));
    }

    #[test]
    fn stream_usage_overrides_an_explicit_false() {
        let body =
            br#"{"stream":true,"stream_options":{"include_usage":false,"x":1},"messages":[]}"#;
        let parsed = parse_request(ApiKind::ChatCompletions, body).unwrap();
        let v: Value =
            serde_json::from_slice(&with_stream_usage(body, &parsed).unwrap().unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(v["stream_options"]["x"], 1);
    }

    #[test]
    fn stream_usage_replaces_a_null_stream_options_instead_of_duplicating_the_key() {
        // Found by `make fuzz` (request_body): the textual edit used to put a second
        // `stream_options` key in front of `"stream_options":null`, and JSON readers take
        // the last one, so usage was never asked for (and tokenfuse itself refuses the body).
        for (kind, body) in [
            (
                ApiKind::Completions,
                &br#"{"model":"davinci-002","prompt":[1,2,3,4],"stream":true,"stream_options":null}"#[..],
            ),
            (
                ApiKind::ChatCompletions,
                br#"{"stream_options":null,"stream":true,"messages":[]}"#,
            ),
        ] {
            let parsed = parse_request(kind, body).unwrap();
            let out = with_stream_usage(body, &parsed).unwrap().unwrap();
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
            assert!(parse_request(kind, &out).unwrap().stream_usage_requested());
        }
    }

    #[test]
    fn stream_usage_is_left_alone_when_not_needed() {
        for (kind, body) in [
            (ApiKind::ChatCompletions, &br#"{"messages":[]}"#[..]),
            (
                ApiKind::ChatCompletions,
                br#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            ),
            (ApiKind::Responses, br#"{"stream":true,"input":"x"}"#),
            (
                ApiKind::AnthropicMessages,
                br#"{"stream":true,"messages":[],"max_tokens":5}"#,
            ),
        ] {
            let parsed = parse_request(kind, body).unwrap();
            assert!(with_stream_usage(body, &parsed).unwrap().is_none());
        }
    }
}
