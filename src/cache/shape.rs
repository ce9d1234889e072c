//! Answers in both shapes: a cached answer is kept as the API's JSON body, whichever way it
//! arrived, and served as JSON or as an event stream, whichever way the client asks.
//!
//! [`assemble`] turns a complete 2xx answer (a JSON body, or the bytes of an SSE stream)
//! into the JSON body the same request would have got without `stream`, or says why it
//! cannot be kept: cut streams, answers without a finish reason, shapes the filter cannot
//! replay faithfully (log probabilities, unknown content blocks). [`json_body`] and
//! [`event_stream`] render a kept answer; the event streams are the ones the providers
//! send (OpenAI chat and completions chunks with `[DONE]`, Anthropic's message events,
//! the Responses API's typed events), so the official SDKs' stream parsers accept them.
//!
//! Everything here reads upstream bytes: parse failures, missing fields and odd types are
//! refusals to store ([`Unstorable`]), never panics; the work is linear in the answer,
//! which the caller bounds (`cache.max_entry_bytes`).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::llm::api::ApiKind;
use crate::llm::sse::SseDecoder;

/// Why an answer is not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unstorable {
    /// Not JSON, or an event that is not.
    Unreadable,
    /// Cut before its end, or without a finish reason.
    Incomplete,
    /// Something the filter cannot replay faithfully in both shapes.
    Unsupported,
}

impl Unstorable {
    /// The stat tag.
    pub fn tag(self) -> &'static str {
        match self {
            Unstorable::Unreadable => "unreadable",
            Unstorable::Incomplete => "incomplete",
            Unstorable::Unsupported => "unsupported",
        }
    }
}

/// The JSON body of a complete answer of `kind`, from what the upstream sent (`streamed`:
/// the bytes of an event stream).
pub fn assemble(kind: ApiKind, body: &[u8], streamed: bool) -> Result<Value, Unstorable> {
    let value = if streamed {
        let events = decode_events(body)?;
        match kind {
            ApiKind::ChatCompletions | ApiKind::Completions => openai_chunks(kind, &events)?,
            ApiKind::AnthropicMessages => anthropic_events(&events)?,
            ApiKind::Responses => responses_events(&events)?,
            ApiKind::Embeddings => return Err(Unstorable::Unsupported),
        }
    } else {
        serde_json::from_slice::<Value>(body).map_err(|_| Unstorable::Unreadable)?
    };
    check_complete(kind, &value)?;
    Ok(value)
}

/// A kept answer as the JSON body.
pub fn json_body(answer: &Value) -> Vec<u8> {
    serde_json::to_vec(answer).unwrap_or_default()
}

/// A kept answer as an event stream. `include_usage`: an OpenAI chat or completions
/// client asked for the usage chunk (`stream_options.include_usage`); other APIs always
/// carry their usage in their events.
pub fn event_stream(kind: ApiKind, answer: &Value, include_usage: bool) -> Vec<u8> {
    let mut out = Vec::new();
    match kind {
        ApiKind::ChatCompletions | ApiKind::Completions => {
            openai_stream(kind, answer, include_usage, &mut out);
        }
        ApiKind::AnthropicMessages => anthropic_stream(answer, &mut out),
        ApiKind::Responses => responses_stream(answer, &mut out),
        ApiKind::Embeddings => {}
    }
    out
}

/// Whether `kind` answers can be streamed at all.
pub fn streams(kind: ApiKind) -> bool {
    kind != ApiKind::Embeddings
}

fn decode_events(body: &[u8]) -> Result<Vec<(String, String)>, Unstorable> {
    let mut decoder = SseDecoder::new(body.len().saturating_add(1));
    let mut events = Vec::new();
    decoder.feed(body, |event, data| {
        events.push((event.to_string(), data.to_string()));
    });
    // A stream that ends inside an event was cut.
    decoder.feed(b"\n\n", |_, _| {});
    if decoder.oversized_lines > 0 {
        return Err(Unstorable::Unreadable);
    }
    Ok(events)
}

fn parse(data: &str) -> Result<Value, Unstorable> {
    serde_json::from_str(data).map_err(|_| Unstorable::Unreadable)
}

/// The array `v.key`, or none.
fn list<'v>(v: &'v Value, key: &str) -> &'v [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

fn str_of<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

fn push_str(target: &mut Map<String, Value>, key: &str, more: &str) {
    match target.get_mut(key) {
        Some(Value::String(s)) => s.push_str(more),
        _ => {
            target.insert(key.to_string(), Value::String(more.to_string()));
        }
    }
}

/// The complete-answer test of each API's JSON body.
fn check_complete(kind: ApiKind, v: &Value) -> Result<(), Unstorable> {
    let obj = v.as_object().ok_or(Unstorable::Unreadable)?;
    match kind {
        ApiKind::ChatCompletions | ApiKind::Completions => {
            let choices = obj
                .get("choices")
                .and_then(Value::as_array)
                .ok_or(Unstorable::Incomplete)?;
            if choices.is_empty() {
                return Err(Unstorable::Incomplete);
            }
            for c in choices {
                if c.get("index").and_then(Value::as_u64).is_none() {
                    return Err(Unstorable::Unreadable);
                }
                if str_of(c, "finish_reason").is_none() {
                    return Err(Unstorable::Incomplete);
                }
                if c.get("logprobs").is_some_and(|l| !l.is_null()) {
                    return Err(Unstorable::Unsupported);
                }
                let ok = if kind == ApiKind::ChatCompletions {
                    c.get("message").is_some_and(Value::is_object)
                } else {
                    c.get("text").is_some_and(Value::is_string)
                };
                if !ok {
                    return Err(Unstorable::Unreadable);
                }
            }
        }
        ApiKind::AnthropicMessages => {
            if str_of(v, "stop_reason").is_none() {
                return Err(Unstorable::Incomplete);
            }
            let blocks = obj
                .get("content")
                .and_then(Value::as_array)
                .ok_or(Unstorable::Unreadable)?;
            for b in blocks {
                match str_of(b, "type") {
                    Some("text") if b.get("text").is_some_and(Value::is_string) => {}
                    Some("tool_use") if b.get("input").is_some_and(Value::is_object) => {}
                    Some("thinking") if b.get("thinking").is_some_and(Value::is_string) => {}
                    Some("redacted_thinking") => {}
                    _ => return Err(Unstorable::Unsupported),
                }
            }
        }
        ApiKind::Responses => {
            if str_of(v, "status") != Some("completed") {
                return Err(Unstorable::Incomplete);
            }
            let output = obj
                .get("output")
                .and_then(Value::as_array)
                .ok_or(Unstorable::Unreadable)?;
            for item in output {
                if !item.is_object() {
                    return Err(Unstorable::Unreadable);
                }
                if str_of(item, "type") == Some("message") {
                    let parts = item
                        .get("content")
                        .and_then(Value::as_array)
                        .ok_or(Unstorable::Unreadable)?;
                    for p in parts {
                        match str_of(p, "type") {
                            Some("output_text") if str_of(p, "text").is_some() => {}
                            Some("refusal") if str_of(p, "refusal").is_some() => {}
                            _ => return Err(Unstorable::Unsupported),
                        }
                    }
                }
            }
        }
        ApiKind::Embeddings => {
            if !obj.get("data").is_some_and(Value::is_array) {
                return Err(Unstorable::Incomplete);
            }
        }
    }
    Ok(())
}

// ---- OpenAI chat and completions -------------------------------------------------------

#[derive(Default)]
struct ChoiceSoFar {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    text: String,
    tool_calls: BTreeMap<u64, Map<String, Value>>,
    finish_reason: Option<String>,
}

fn openai_chunks(kind: ApiKind, events: &[(String, String)]) -> Result<Value, Unstorable> {
    let mut head = Map::new();
    let mut choices: BTreeMap<u64, ChoiceSoFar> = BTreeMap::new();
    let mut usage = None;
    let mut done = false;
    for (_, data) in events {
        if data.trim() == "[DONE]" {
            done = true;
            continue;
        }
        if done {
            return Err(Unstorable::Unreadable);
        }
        let chunk = parse(data)?;
        let obj = chunk.as_object().ok_or(Unstorable::Unreadable)?;
        if obj.contains_key("error") {
            return Err(Unstorable::Incomplete);
        }
        for key in [
            "id",
            "created",
            "model",
            "system_fingerprint",
            "service_tier",
        ] {
            if let Some(v) = obj.get(key) {
                if !v.is_null() && !head.contains_key(key) {
                    head.insert(key.to_string(), v.clone());
                }
            }
        }
        if let Some(u) = obj.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        for c in list(&chunk, "choices") {
            let index = c
                .get("index")
                .and_then(Value::as_u64)
                .ok_or(Unstorable::Unreadable)?;
            if c.get("logprobs").is_some_and(|l| !l.is_null()) {
                return Err(Unstorable::Unsupported);
            }
            let so_far = choices.entry(index).or_default();
            if let Some(r) = str_of(c, "finish_reason") {
                so_far.finish_reason = Some(r.to_string());
            }
            if kind == ApiKind::Completions {
                if let Some(t) = str_of(c, "text") {
                    so_far.text.push_str(t);
                }
                continue;
            }
            let Some(delta) = c.get("delta") else {
                continue;
            };
            if let Some(r) = str_of(delta, "role") {
                so_far.role = Some(r.to_string());
            }
            if let Some(t) = str_of(delta, "content") {
                so_far.content.get_or_insert_with(String::new).push_str(t);
            }
            if let Some(t) = str_of(delta, "refusal") {
                so_far.refusal.get_or_insert_with(String::new).push_str(t);
            }
            for call in list(delta, "tool_calls") {
                let at = call
                    .get("index")
                    .and_then(Value::as_u64)
                    .ok_or(Unstorable::Unreadable)?;
                let entry = so_far.tool_calls.entry(at).or_default();
                for key in ["id", "type"] {
                    if let Some(v) = str_of(call, key) {
                        entry.insert(key.to_string(), Value::String(v.to_string()));
                    }
                }
                if let Some(f) = call.get("function") {
                    let function = entry
                        .entry("function")
                        .or_insert_with(|| json!({"name": "", "arguments": ""}));
                    let function = function.as_object_mut().ok_or(Unstorable::Unreadable)?;
                    for key in ["name", "arguments"] {
                        if let Some(v) = str_of(f, key) {
                            push_str(function, key, v);
                        }
                    }
                }
            }
        }
    }
    if !done {
        return Err(Unstorable::Incomplete);
    }
    let mut out = head;
    let object = if kind == ApiKind::Completions {
        "text_completion"
    } else {
        "chat.completion"
    };
    out.insert("object".into(), json!(object));
    let list: Vec<Value> = choices
        .into_iter()
        .map(|(index, c)| {
            if kind == ApiKind::Completions {
                return json!({"index": index, "text": c.text, "logprobs": null,
                              "finish_reason": c.finish_reason});
            }
            let mut message = Map::new();
            message.insert(
                "role".into(),
                json!(c.role.unwrap_or_else(|| "assistant".into())),
            );
            message.insert("content".into(), json!(c.content));
            if let Some(r) = c.refusal {
                message.insert("refusal".into(), json!(r));
            }
            if !c.tool_calls.is_empty() {
                let calls: Vec<Value> = c.tool_calls.into_values().map(Value::Object).collect();
                message.insert("tool_calls".into(), Value::Array(calls));
            }
            json!({"index": index, "message": message, "logprobs": null,
                   "finish_reason": c.finish_reason})
        })
        .collect();
    out.insert("choices".into(), Value::Array(list));
    if let Some(u) = usage {
        out.insert("usage".into(), u);
    }
    Ok(Value::Object(out))
}

fn data_line(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
}

fn named_event(out: &mut Vec<u8>, name: &str, v: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\n");
    data_line(out, v);
}

fn openai_stream(kind: ApiKind, answer: &Value, include_usage: bool, out: &mut Vec<u8>) {
    let mut head = Map::new();
    for key in [
        "id",
        "created",
        "model",
        "system_fingerprint",
        "service_tier",
    ] {
        if let Some(v) = answer.get(key) {
            head.insert(key.to_string(), v.clone());
        }
    }
    let object = if kind == ApiKind::Completions {
        "text_completion"
    } else {
        "chat.completion.chunk"
    };
    head.insert("object".into(), json!(object));
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut c = head.clone();
        c.insert("choices".into(), choices);
        if include_usage {
            c.insert("usage".into(), usage.cloned().unwrap_or(Value::Null));
        }
        Value::Object(c)
    };
    let choices = list(answer, "choices");
    for c in choices {
        let index = c.get("index").cloned().unwrap_or(json!(0));
        let finish = c.get("finish_reason").cloned().unwrap_or(Value::Null);
        if kind == ApiKind::Completions {
            let text = c.get("text").cloned().unwrap_or(json!(""));
            data_line(
                out,
                &chunk(
                    json!([{"index": index, "text": text, "logprobs": null, "finish_reason": null}]),
                    None,
                ),
            );
            data_line(
                out,
                &chunk(
                    json!([{"index": index, "text": "", "logprobs": null, "finish_reason": finish}]),
                    None,
                ),
            );
            continue;
        }
        let message = c.get("message").cloned().unwrap_or(json!({}));
        let mut delta = Map::new();
        delta.insert(
            "role".into(),
            message.get("role").cloned().unwrap_or(json!("assistant")),
        );
        if let Some(content) = message.get("content").filter(|v| v.is_string()) {
            delta.insert("content".into(), content.clone());
        }
        if let Some(refusal) = message.get("refusal").filter(|v| v.is_string()) {
            delta.insert("refusal".into(), refusal.clone());
        }
        if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
            let indexed: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, call)| {
                    let mut call = call.as_object().cloned().unwrap_or_default();
                    call.insert("index".into(), json!(i));
                    Value::Object(call)
                })
                .collect();
            delta.insert("tool_calls".into(), Value::Array(indexed));
        }
        data_line(
            out,
            &chunk(
                json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]),
                None,
            ),
        );
        data_line(
            out,
            &chunk(
                json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}]),
                None,
            ),
        );
    }
    if include_usage {
        if let Some(usage) = answer.get("usage") {
            data_line(out, &chunk(json!([]), Some(usage)));
        }
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
}

// ---- Anthropic Messages -----------------------------------------------------------------

fn anthropic_events(events: &[(String, String)]) -> Result<Value, Unstorable> {
    let mut message: Option<Map<String, Value>> = None;
    let mut blocks: BTreeMap<u64, Map<String, Value>> = BTreeMap::new();
    let mut partial_json: BTreeMap<u64, String> = BTreeMap::new();
    let mut stopped = false;
    for (_, data) in events {
        let event = parse(data)?;
        let index = event.get("index").and_then(Value::as_u64);
        match str_of(&event, "type") {
            Some("message_start") => {
                let m = event
                    .get("message")
                    .and_then(Value::as_object)
                    .ok_or(Unstorable::Unreadable)?;
                message = Some(m.clone());
            }
            Some("content_block_start") => {
                let block = event
                    .get("content_block")
                    .and_then(Value::as_object)
                    .ok_or(Unstorable::Unreadable)?;
                blocks.insert(index.ok_or(Unstorable::Unreadable)?, block.clone());
            }
            Some("content_block_delta") => {
                let at = index.ok_or(Unstorable::Unreadable)?;
                let block = blocks.get_mut(&at).ok_or(Unstorable::Unreadable)?;
                let delta = event.get("delta").ok_or(Unstorable::Unreadable)?;
                match str_of(delta, "type") {
                    Some("text_delta") => {
                        push_str(block, "text", str_of(delta, "text").unwrap_or(""));
                    }
                    Some("thinking_delta") => {
                        push_str(block, "thinking", str_of(delta, "thinking").unwrap_or(""));
                    }
                    Some("signature_delta") => {
                        push_str(block, "signature", str_of(delta, "signature").unwrap_or(""));
                    }
                    Some("input_json_delta") => partial_json
                        .entry(at)
                        .or_default()
                        .push_str(str_of(delta, "partial_json").unwrap_or("")),
                    _ => return Err(Unstorable::Unsupported),
                }
            }
            Some("content_block_stop") => {
                let at = index.ok_or(Unstorable::Unreadable)?;
                if let Some(json) = partial_json.remove(&at) {
                    let block = blocks.get_mut(&at).ok_or(Unstorable::Unreadable)?;
                    let input = if json.trim().is_empty() {
                        json!({})
                    } else {
                        parse(&json)?
                    };
                    block.insert("input".into(), input);
                }
            }
            Some("message_delta") => {
                let m = message.as_mut().ok_or(Unstorable::Unreadable)?;
                if let Some(delta) = event.get("delta").and_then(Value::as_object) {
                    for (k, v) in delta {
                        m.insert(k.clone(), v.clone());
                    }
                }
                if let Some(u) = event.get("usage").and_then(Value::as_object) {
                    let usage = m.entry("usage").or_insert_with(|| json!({}));
                    if let Some(usage) = usage.as_object_mut() {
                        for (k, v) in u {
                            if !v.is_null() {
                                usage.insert(k.clone(), v.clone());
                            }
                        }
                    }
                }
            }
            Some("message_stop") => stopped = true,
            Some("ping") => {}
            Some("error") => return Err(Unstorable::Incomplete),
            _ => return Err(Unstorable::Unsupported),
        }
    }
    let mut m = message.ok_or(Unstorable::Incomplete)?;
    if !stopped || !partial_json.is_empty() {
        return Err(Unstorable::Incomplete);
    }
    let content: Vec<Value> = blocks.into_values().map(Value::Object).collect();
    m.insert("content".into(), Value::Array(content));
    Ok(Value::Object(m))
}

fn anthropic_stream(answer: &Value, out: &mut Vec<u8>) {
    let mut start = answer.as_object().cloned().unwrap_or_default();
    start.insert("content".into(), json!([]));
    start.insert("stop_reason".into(), Value::Null);
    start.insert("stop_sequence".into(), Value::Null);
    let usage = answer.get("usage").cloned().unwrap_or(json!({}));
    let mut start_usage = usage.as_object().cloned().unwrap_or_default();
    start_usage.insert("output_tokens".into(), json!(1));
    start.insert("usage".into(), Value::Object(start_usage));
    named_event(
        out,
        "message_start",
        &json!({"type": "message_start", "message": start}),
    );
    let blocks = list(answer, "content");
    for (index, block) in blocks.iter().enumerate() {
        let kind = str_of(block, "type").unwrap_or("");
        let mut opening = block.as_object().cloned().unwrap_or_default();
        let delta = match kind {
            "text" => {
                opening.insert("text".into(), json!(""));
                Some(
                    json!({"type": "text_delta", "text": block.get("text").cloned().unwrap_or(json!(""))}),
                )
            }
            "tool_use" => {
                opening.insert("input".into(), json!({}));
                let input = block.get("input").cloned().unwrap_or(json!({}));
                Some(json!({"type": "input_json_delta",
                            "partial_json": serde_json::to_string(&input).unwrap_or_default()}))
            }
            "thinking" => {
                opening.insert("thinking".into(), json!(""));
                opening.insert("signature".into(), json!(""));
                Some(json!({"type": "thinking_delta",
                            "thinking": block.get("thinking").cloned().unwrap_or(json!(""))}))
            }
            _ => None,
        };
        named_event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": opening}),
        );
        if let Some(delta) = delta {
            named_event(
                out,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": delta}),
            );
        }
        if kind == "thinking" {
            if let Some(sig) = block.get("signature").filter(|s| s.is_string()) {
                named_event(
                    out,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "signature_delta", "signature": sig}}),
                );
            }
        }
        named_event(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
    }
    named_event(
        out,
        "message_delta",
        &json!({"type": "message_delta",
                "delta": {"stop_reason": answer.get("stop_reason").cloned().unwrap_or(Value::Null),
                          "stop_sequence": answer.get("stop_sequence").cloned().unwrap_or(Value::Null)},
                "usage": usage}),
    );
    named_event(out, "message_stop", &json!({"type": "message_stop"}));
}

// ---- OpenAI Responses ---------------------------------------------------------------------

fn responses_events(events: &[(String, String)]) -> Result<Value, Unstorable> {
    let mut completed = None;
    for (event, data) in events {
        let v = parse(data)?;
        let kind = str_of(&v, "type").unwrap_or(event.as_str());
        match kind {
            "response.completed" => {
                completed = Some(v.get("response").cloned().ok_or(Unstorable::Unreadable)?);
            }
            "response.failed" | "response.incomplete" | "error" => {
                return Err(Unstorable::Incomplete)
            }
            _ => {}
        }
    }
    completed.ok_or(Unstorable::Incomplete)
}

fn responses_stream(answer: &Value, out: &mut Vec<u8>) {
    let mut seq = 0u64;
    let mut emit = |out: &mut Vec<u8>, name: &str, mut body: Map<String, Value>| {
        body.insert("type".into(), json!(name));
        body.insert("sequence_number".into(), json!(seq));
        seq = seq.saturating_add(1);
        named_event(out, name, &Value::Object(body));
    };
    let fields = |pairs: Value| pairs.as_object().cloned().unwrap_or_default();
    let mut opening = answer.as_object().cloned().unwrap_or_default();
    opening.insert("status".into(), json!("in_progress"));
    opening.insert("output".into(), json!([]));
    opening.insert("usage".into(), Value::Null);
    emit(
        out,
        "response.created",
        fields(json!({"response": opening.clone()})),
    );
    emit(
        out,
        "response.in_progress",
        fields(json!({"response": opening})),
    );
    let items = list(answer, "output");
    for (oi, item) in items.iter().enumerate() {
        let item_id = item.get("id").cloned().unwrap_or(Value::Null);
        let mut added = item.as_object().cloned().unwrap_or_default();
        let kind = str_of(item, "type").unwrap_or("");
        match kind {
            "message" => {
                added.insert("status".into(), json!("in_progress"));
                added.insert("content".into(), json!([]));
            }
            "function_call" => {
                added.insert("status".into(), json!("in_progress"));
                added.insert("arguments".into(), json!(""));
            }
            _ => {}
        }
        emit(
            out,
            "response.output_item.added",
            fields(json!({"output_index": oi, "item": added})),
        );
        if kind == "message" {
            let parts = list(item, "content");
            for (ci, part) in parts.iter().enumerate() {
                let at = json!({"item_id": item_id, "output_index": oi, "content_index": ci});
                let with = |extra: Value| {
                    let mut m = fields(at.clone());
                    m.extend(fields(extra));
                    m
                };
                let (empty, delta_name, done_name, key) = if str_of(part, "type") == Some("refusal")
                {
                    (
                        json!({"type": "refusal", "refusal": ""}),
                        "response.refusal.delta",
                        "response.refusal.done",
                        "refusal",
                    )
                } else {
                    (
                        json!({"type": "output_text", "text": "", "annotations": []}),
                        "response.output_text.delta",
                        "response.output_text.done",
                        "text",
                    )
                };
                let text = part.get(key).cloned().unwrap_or(json!(""));
                emit(
                    out,
                    "response.content_part.added",
                    with(json!({"part": empty})),
                );
                emit(out, delta_name, with(json!({"delta": text})));
                emit(out, done_name, with(json!({ key: text })));
                emit(
                    out,
                    "response.content_part.done",
                    with(json!({"part": part})),
                );
            }
        } else if kind == "function_call" {
            let args = item.get("arguments").cloned().unwrap_or(json!(""));
            let at = json!({"item_id": item_id, "output_index": oi});
            let mut delta = fields(at.clone());
            delta.insert("delta".into(), args.clone());
            emit(out, "response.function_call_arguments.delta", delta);
            let mut done = fields(at);
            done.insert("arguments".into(), args);
            emit(out, "response.function_call_arguments.done", done);
        }
        emit(
            out,
            "response.output_item.done",
            fields(json!({"output_index": oi, "item": item})),
        );
    }
    emit(
        out,
        "response.completed",
        fields(json!({"response": answer})),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(kind: ApiKind, answer: &Value, include_usage: bool) -> Value {
        let stream = event_stream(kind, answer, include_usage);
        assemble(kind, &stream, true).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn chat_answer() -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
               "model": "gpt-4o-mini",
               "choices": [
                 {"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                  "logprobs": null, "finish_reason": "stop"},
                 {"index": 1, "message": {"role": "assistant", "content": null,
                   "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                  "logprobs": null, "finish_reason": "tool_calls"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})
    }

    #[test]
    fn chat_answers_survive_both_shapes() {
        let answer = chat_answer();
        assert_eq!(roundtrip(ApiKind::ChatCompletions, &answer, true), answer);
        // Without the usage chunk the same answer, less its usage.
        let mut less = answer.clone();
        less.as_object_mut().map(|m| m.remove("usage"));
        assert_eq!(roundtrip(ApiKind::ChatCompletions, &answer, false), less);
        let stream = event_stream(ApiKind::ChatCompletions, &answer, true);
        assert!(stream.ends_with(b"data: [DONE]\n\n"));
    }

    #[test]
    fn completions_answers_survive_both_shapes() {
        let answer = json!({"id": "cmpl-1", "object": "text_completion", "created": 1,
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"index": 0, "text": "Hi", "logprobs": null, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
        assert_eq!(roundtrip(ApiKind::Completions, &answer, true), answer);
    }

    #[test]
    fn anthropic_answers_survive_both_shapes() {
        let answer = json!({"id": "msg_1", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [
              {"type": "thinking", "thinking": "hmm", "signature": "sig"},
              {"type": "text", "text": "Hello"},
              {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 20}});
        assert_eq!(
            roundtrip(ApiKind::AnthropicMessages, &answer, false),
            answer
        );
    }

    #[test]
    fn responses_answers_survive_both_shapes() {
        let answer = json!({"id": "resp_1", "object": "response", "status": "completed",
            "model": "gpt-4o",
            "output": [
              {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": "Hi", "annotations": []}]},
              {"id": "fc_1", "type": "function_call", "status": "completed",
               "call_id": "c1", "name": "f", "arguments": "{}"}],
            "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}});
        assert_eq!(roundtrip(ApiKind::Responses, &answer, false), answer);
        let stream =
            String::from_utf8(event_stream(ApiKind::Responses, &answer, false)).unwrap_or_default();
        assert!(stream.contains("event: response.output_text.delta"));
        assert!(stream.contains("\"sequence_number\":0"));
    }

    #[test]
    fn cut_and_unfinished_answers_are_not_kept() {
        let answer = chat_answer();
        // Every cut of `stream` ending before its last `tail` bytes is refused.
        let cuts_refused = |kind: ApiKind, stream: &[u8], tail: usize| {
            for cut in 0..stream.len().saturating_sub(tail) {
                let got = assemble(kind, stream.get(..cut).unwrap_or(&[]), true);
                assert!(got.is_err(), "cut at {cut} was kept");
            }
        };
        let stream = event_stream(ApiKind::ChatCompletions, &answer, true);
        // Every cut short of the whole stream is refused.
        cuts_refused(ApiKind::ChatCompletions, &stream, 1);
        let no_finish = json!({"choices": [{"index": 0, "message": {"content": "x"},
                                            "finish_reason": null}]});
        assert_eq!(
            assemble(ApiKind::ChatCompletions, &json_body(&no_finish), false),
            Err(Unstorable::Incomplete)
        );
        let anthropic = json!({"id": "m", "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": "x"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 1}});
        let stream = event_stream(ApiKind::AnthropicMessages, &anthropic, false);
        cuts_refused(ApiKind::AnthropicMessages, &stream, 2);
        assert_eq!(
            assemble(ApiKind::ChatCompletions, b"{not json", false),
            Err(Unstorable::Unreadable)
        );
        let with_logprobs = json!({"choices": [{"index": 0, "message": {"content": "x"},
                                   "logprobs": {"content": []}, "finish_reason": "stop"}]});
        assert_eq!(
            assemble(ApiKind::ChatCompletions, &json_body(&with_logprobs), false),
            Err(Unstorable::Unsupported)
        );
    }

    #[test]
    fn numbers_survive_being_kept_and_served_again() {
        // Found by the cache_shapes fuzz target: without serde_json's float_roundtrip, this
        // number read back 1 ULP away from itself.
        let body = br#"{"id":"c","object":"chat.completion","kreated":9999999990000000000000000000000000000000000000000000002107684625609392108,"model":"m","choices":[{"index":5,"message":{"content":"Hi"},"logprobs":null,"finish_reason":"stop"}]}"#;
        let kept = assemble(ApiKind::ChatCompletions, body, false).unwrap();
        assert_eq!(
            assemble(ApiKind::ChatCompletions, &json_body(&kept), false),
            Ok(kept)
        );
    }

    #[test]
    fn hostile_streams_are_refused_not_panicked_on() {
        let cases: [&[u8]; 6] = [
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":7}]}}]}\n\ndata: [DONE]\n\n",
            b"data: {\"choices\":[{\"delta\":{}}]}\n\ndata: [DONE]\n\n",
            b"data: [DONE]\n\ndata: {}\n\n",
            b"event: message_start\ndata: {\"type\":\"content_block_delta\",\"index\":3,\"delta\":{\"type\":\"text_delta\"}}\n\n",
            b"data: {\"type\":\"message_start\",\"message\":{}}\n\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\ndata: {\"type\":\"message_stop\"}\n\n",
            b"data: {\"type\":\"response.completed\"}\n\n",
        ];
        for (i, c) in cases.iter().enumerate() {
            for kind in [
                ApiKind::ChatCompletions,
                ApiKind::Completions,
                ApiKind::AnthropicMessages,
                ApiKind::Responses,
            ] {
                let _ = assemble(kind, c, true);
                let _ = i;
            }
        }
        assert!(assemble(ApiKind::ChatCompletions, cases[0], true).is_err());
        assert!(assemble(ApiKind::ChatCompletions, cases[1], true).is_err());
    }
}
