//! Request body edits: the few changes the filter makes to what goes upstream — the
//! messages a truncation keeps, the model of a rerouted request,
//! `stream_options.include_usage` — collected as [`Edits`] and applied once, by one writer
//! ([`apply`]).
//!
//! Every edit is made on the body's text: the spans of the members it touches are found by
//! the same strict reader that parsed the request ([`crate::llm::json`]), and only those
//! bytes change; everything else goes upstream byte for byte as the client sent it. So any
//! body the filter admitted can be edited: an edit cannot fail on something the reader
//! accepts (a number beyond `f64`, nesting past 128 levels in a skipped field) the way a
//! rebuild through a JSON value would — and if an edit fails anyway, the caller refuses
//! the request rather than forward a body that says something else than what was billed.
//!
//! Work is linear in the body: one scan of the top-level members, one of the `messages`
//! array's elements when messages are dropped, one of `stream_options` when it is set.

use std::ops::Range;

use crate::llm::api::RequestBody;
use crate::llm::json::{self, Error};

/// What to change in a request body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Edits {
    /// Ranges of `messages` indices to drop, ascending and disjoint (a truncation).
    pub drop_messages: Vec<Range<usize>>,
    /// The top-level `model` to set (added when the body has none).
    pub model: Option<String>,
    /// Ask for `stream_options.include_usage: true`, where the API takes it and the request
    /// streams without it. An explicit `include_usage: false` is overridden: the client then
    /// receives one more chunk, with empty `choices`, before `[DONE]`.
    pub stream_usage: bool,
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

/// `text` as a JSON string literal.
fn quoted(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// The first non-space byte of `text`, which must open an object.
fn object_start(text: &str) -> Result<usize, EditError> {
    let start = text.len().saturating_sub(text.trim_start().len());
    match text.as_bytes().get(start) {
        Some(b'{') => Ok(start),
        _ => Err(EditError::Unreadable),
    }
}

/// Whether the object opening at `open` (its `{`) has no members.
fn is_empty_object(text: &str, open: usize) -> bool {
    text.get(open.saturating_add(1)..)
        .is_some_and(|rest| rest.trim_start().starts_with('}'))
}

/// A change to the text: replace `span` (empty for an insertion) by `with`.
struct Splice {
    span: Range<usize>,
    with: String,
}

/// Members to add as the first ones of the object opening at `open`: one splice.
fn prepend(text: &str, open: usize, members: &[String]) -> Option<Splice> {
    if members.is_empty() {
        return None;
    }
    let mut with = members.join(",");
    if !is_empty_object(text, open) {
        with.push(',');
    }
    let at = open.checked_add(1)?;
    Some(Splice { span: at..at, with })
}

/// `body` with `edits` applied; `Ok(None)` when nothing changes.
pub fn apply(
    body: &[u8],
    parsed: &RequestBody<'_>,
    edits: &Edits,
) -> Result<Option<Vec<u8>>, EditError> {
    let stream_usage = edits.stream_usage
        && parsed.accepts_stream_options()
        && parsed.stream()
        && !parsed.stream_usage_requested();
    edit(body, edits, stream_usage)
}

/// [`apply`], with whether usage must be asked for already decided.
fn edit(body: &[u8], edits: &Edits, stream_usage: bool) -> Result<Option<Vec<u8>>, EditError> {
    if edits.drop_messages.is_empty() && edits.model.is_none() && !stream_usage {
        return Ok(None);
    }
    let text = std::str::from_utf8(body).map_err(|_| EditError::Unreadable)?;
    let open = object_start(text)?;
    let members = json::members(text)?;
    let span_of = |name: &str| {
        members
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, span)| span.clone())
    };
    let mut splices: Vec<Splice> = Vec::new();
    let mut added: Vec<String> = Vec::new();
    if !edits.drop_messages.is_empty() {
        let span = span_of("messages").ok_or(EditError::Unreadable)?;
        let kept = kept_elements(text, span.clone(), &edits.drop_messages)?;
        splices.push(Splice { span, with: kept });
    }
    if let Some(model) = &edits.model {
        let value = quoted(model);
        match span_of("model") {
            Some(span) => splices.push(Splice { span, with: value }),
            None => added.push(format!("\"model\":{value}")),
        }
    }
    if stream_usage {
        const MEMBER: &str = r#""include_usage":true"#;
        match span_of("stream_options") {
            None => added.push(format!(r#""stream_options":{{{MEMBER}}}"#)),
            Some(span) => {
                let value = text.get(span.clone()).ok_or(EditError::Unreadable)?;
                if value == "null" {
                    splices.push(Splice {
                        span,
                        with: format!("{{{MEMBER}}}"),
                    });
                } else {
                    // An object (the reader refused any other type): set its member.
                    let inner = json::members(value)?
                        .into_iter()
                        .find(|(key, _)| key == "include_usage")
                        .map(|(_, inner)| inner);
                    match inner {
                        // `inner` is within `value`, which starts at `span.start`.
                        Some(inner) => splices.push(Splice {
                            span: span.start.saturating_add(inner.start)
                                ..span.start.saturating_add(inner.end),
                            with: "true".into(),
                        }),
                        None => splices.extend(prepend(text, span.start, &[MEMBER.into()])),
                    }
                }
            }
        }
    }
    splices.extend(prepend(text, open, &added));
    write(text, splices).map(Some)
}

/// The array at `span` of `text` without the elements in `drop` (index ranges), each kept
/// element byte for byte.
fn kept_elements(
    text: &str,
    span: Range<usize>,
    drop: &[Range<usize>],
) -> Result<String, EditError> {
    let elements = json::elements(text, span.clone())?;
    let mut drops = drop.iter().peekable();
    let mut array = String::with_capacity(span.len());
    array.push('[');
    let mut first = true;
    for (i, element) in elements.into_iter().enumerate() {
        while drops.peek().is_some_and(|r| r.end <= i) {
            drops.next();
        }
        if drops.peek().is_some_and(|r| r.contains(&i)) {
            continue;
        }
        if !first {
            array.push(',');
        }
        first = false;
        array.push_str(text.get(element).ok_or(EditError::Unreadable)?);
    }
    array.push(']');
    Ok(array)
}

/// `text` with every splice made (they must not overlap).
fn write(text: &str, mut splices: Vec<Splice>) -> Result<Vec<u8>, EditError> {
    splices.sort_by_key(|s| (s.span.start, s.span.end));
    let grown = splices.iter().map(|s| s.with.len()).sum::<usize>();
    let mut out = Vec::with_capacity(text.len().saturating_add(grown));
    let mut at = 0;
    for s in &splices {
        let kept = text.get(at..s.span.start).ok_or(EditError::Unreadable)?;
        out.extend_from_slice(kept.as_bytes());
        out.extend_from_slice(s.with.as_bytes());
        at = s.span.end;
    }
    out.extend_from_slice(text.get(at..).ok_or(EditError::Unreadable)?.as_bytes());
    Ok(out)
}

/// `body` with its top-level `model` set to `model` (added when the body has none).
pub fn set_model(body: &[u8], model: &str) -> Result<Vec<u8>, EditError> {
    let edits = Edits {
        model: Some(model.to_string()),
        ..Edits::default()
    };
    edit(body, &edits, false)?.ok_or(EditError::Unreadable)
}

/// `body` with `stream_options.include_usage: true` ([`Edits::stream_usage`]); `Ok(None)`
/// when nothing needs to change.
pub fn with_stream_usage(
    body: &[u8],
    parsed: &RequestBody<'_>,
) -> Result<Option<Vec<u8>>, EditError> {
    let edits = Edits {
        stream_usage: true,
        ..Edits::default()
    };
    apply(body, parsed, &edits)
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
        let drop = |ranges: Vec<Range<usize>>, body: &[u8]| {
            let edits = Edits {
                drop_messages: ranges,
                ..Edits::default()
            };
            edit(body, &edits, false)
        };
        let body = br#"{"messages":[ {"a":1} , {"b":[2]},{"c":"3"} ],"z":true}"#;
        let out = drop(std::iter::once(1..2).collect(), body)
            .unwrap()
            .unwrap();
        assert_eq!(out, br#"{"messages":[{"a":1},{"c":"3"}],"z":true}"#);
        let out = drop(vec![0..1, 1..3], body).unwrap().unwrap();
        assert_eq!(out, br#"{"messages":[],"z":true}"#);
        assert!(drop(std::iter::once(0..1).collect(), br#"{"nope":[1]}"#).is_err());
    }

    #[test]
    fn every_edit_at_once_is_one_pass_over_the_original() {
        let body = br#"{"messages":[{"role":"user","content":"old"},{"role":"user","content":"hi"}],"stream":true}"#;
        let parsed = parse_request(ApiKind::ChatCompletions, body).unwrap();
        let edits = Edits {
            drop_messages: std::iter::once(0..1).collect(),
            model: Some("gpt-4o-mini".into()),
            stream_usage: true,
        };
        let out = apply(body, &parsed, &edits).unwrap().unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"gpt-4o-mini","stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}],"stream":true}"#
        );
        assert_eq!(apply(body, &parsed, &Edits::default()).unwrap(), None);
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
