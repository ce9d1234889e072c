//! Request bodies read with [`crate::llm::json::Reader`]: one pass over the body, taking the
//! fields [`crate::llm::api`]'s shapes list and skipping (but checking) the rest.
//!
//! The rules are serde's for the same derived types, which this module replaced on the
//! request path (serde_json walked the body twice and copied every field it deserialised
//! through buffers): unknown fields are skipped; a known field given twice is refused
//! (`duplicate field`); a required one missing is refused (`missing field`); `null` reads as
//! absent where the field is optional; a value of the wrong type is refused. One difference,
//! on purpose: serde also accepted a JSON array in place of any object, its elements taken as
//! the fields in declaration order; here an array where an object belongs is a shape error.
//! `api::reference::parse_request` keeps the serde reading, and the tests compare the two on
//! a large set of valid and broken bodies.

use serde_json::Value;

use crate::llm::api::{
    AnthropicContent, AnthropicMessage, AnthropicRequest, ChatMessage, ChatRequest,
    CompletionsRequest, Content, ContentPart, EmbeddingsRequest, FunctionCall, ImageUrl,
    ResponsesInput, ResponsesItem, ResponsesRequest, Str, StreamOptions, TextOrTokens, ToolCall,
};
use crate::llm::json::{Kind, Reader, Result};

fn list<'a, T>(
    r: &mut Reader<'a>,
    expected: &str,
    mut item: impl FnMut(&mut Reader<'a>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    r.array(expected, |r| {
        out.push(item(r)?);
        Ok(())
    })?;
    Ok(out)
}

fn string<'a>(r: &mut Reader<'a>) -> Result<Str<'a>> {
    r.string()
}

fn opt_string<'a>(r: &mut Reader<'a>) -> Result<Option<Str<'a>>> {
    r.optional(string)
}

fn opt_bool(r: &mut Reader<'_>) -> Result<Option<bool>> {
    r.optional(Reader::bool)
}

fn opt_i64(r: &mut Reader<'_>) -> Result<Option<i64>> {
    r.optional(Reader::i64)
}

/// Any value, as a `serde_json::Value` (the few fields counted by their JSON text).
fn value(r: &mut Reader<'_>) -> Result<Value> {
    let raw = r.raw()?;
    // The text was checked just now, nesting included; what serde_json can still refuse is a
    // number beyond `f64` ("number out of range", a syntax error as in the rest of the body).
    serde_json::from_str(raw).or_else(|e| match e.classify() {
        serde_json::error::Category::Data => r.shape("a value could not be read".into()),
        _ => r.syntax_error("number out of range"),
    })
}

fn opt_value(r: &mut Reader<'_>) -> Result<Option<Value>> {
    r.optional(value)
}

fn opt_values(r: &mut Reader<'_>) -> Result<Option<Vec<Value>>> {
    r.optional(|r| list(r, "an array", value))
}

/// `stream_options`: present (even as `null`, read as empty options) or absent.
fn stream_options(r: &mut Reader<'_>) -> Result<Option<StreamOptions>> {
    const NAMES: [&str; 1] = ["include_usage"];
    let options = r.optional(|r| {
        let mut o = StreamOptions::default();
        r.fields("an object (stream_options)", &NAMES, |r, _| {
            o.include_usage = opt_bool(r)?;
            Ok(())
        })?;
        Ok(o)
    })?;
    Ok(Some(options.unwrap_or_default()))
}

/// Text, or a list of `part`s.
fn text_or_list<'a, P, T>(
    r: &mut Reader<'a>,
    expected: &str,
    text: fn(Str<'a>) -> T,
    parts: fn(Vec<P>) -> T,
    part: impl FnMut(&mut Reader<'a>) -> Result<P>,
) -> Result<T> {
    match r.peek()? {
        Kind::String => string(r).map(text),
        Kind::Array => list(r, expected, part).map(parts),
        _ => r.wrong_type(expected),
    }
}

fn content<'a>(r: &mut Reader<'a>) -> Result<Content<'a>> {
    text_or_list(
        r,
        "a string or an array of content parts",
        Content::Text,
        Content::Parts,
        content_part,
    )
}

fn anthropic_content<'a>(r: &mut Reader<'a>) -> Result<AnthropicContent<'a>> {
    text_or_list(
        r,
        "a string or an array of content blocks",
        AnthropicContent::Text,
        AnthropicContent::Blocks,
        content_part,
    )
}

fn image_url<'a>(r: &mut Reader<'a>) -> Result<ImageUrl<'a>> {
    const EXPECTED: &str = "a URL or an object with `url` and `detail`";
    match r.peek()? {
        Kind::String => string(r).map(ImageUrl::Url),
        Kind::Object => {
            let mut detail = None;
            r.fields(EXPECTED, &["detail"], |r, _| {
                detail = opt_string(r)?;
                Ok(())
            })?;
            Ok(ImageUrl::Object { detail })
        }
        _ => r.wrong_type(EXPECTED),
    }
}

fn content_part<'a>(r: &mut Reader<'a>) -> Result<ContentPart<'a>> {
    const NAMES: [&str; 9] = [
        "type",
        "text",
        "refusal",
        "image_url",
        "detail",
        "name",
        "input",
        "content",
        "thinking",
    ];
    let mut p = ContentPart::default();
    r.fields("an object (content part)", &NAMES, |r, i| {
        match i {
            0 => p.kind = string(r)?,
            1 => p.text = opt_string(r)?,
            2 => p.refusal = opt_string(r)?,
            3 => p.image_url = r.optional(image_url)?,
            4 => p.detail = opt_string(r)?,
            5 => p.name = opt_string(r)?,
            6 => p.input = opt_value(r)?,
            7 => p.content = r.optional(anthropic_content)?.map(Box::new),
            _ => p.thinking = opt_string(r)?,
        }
        Ok(())
    })?;
    Ok(p)
}

fn function_call<'a>(r: &mut Reader<'a>) -> Result<FunctionCall<'a>> {
    let mut f = FunctionCall::default();
    r.fields(
        "an object (function call)",
        &["name", "arguments"],
        |r, i| {
            match i {
                0 => f.name = string(r)?,
                _ => f.arguments = string(r)?,
            }
            Ok(())
        },
    )?;
    Ok(f)
}

fn tool_call<'a>(r: &mut Reader<'a>) -> Result<ToolCall<'a>> {
    let mut function = None;
    r.fields("an object (tool call)", &["function"], |r, _| {
        function = r.optional(function_call)?;
        Ok(())
    })?;
    Ok(ToolCall { function })
}

fn chat_message<'a>(r: &mut Reader<'a>) -> Result<ChatMessage<'a>> {
    const NAMES: [&str; 7] = [
        "role",
        "content",
        "name",
        "tool_calls",
        "tool_call_id",
        "function_call",
        "refusal",
    ];
    let mut m = ChatMessage {
        role: Str::Borrowed(""),
        content: None,
        name: None,
        tool_calls: None,
        tool_call_id: None,
        function_call: None,
        refusal: None,
    };
    let seen = r.fields("an object (message)", &NAMES, |r, i| {
        match i {
            0 => m.role = string(r)?,
            1 => m.content = r.optional(content)?,
            2 => m.name = opt_string(r)?,
            3 => m.tool_calls = r.optional(|r| list(r, "an array of tool calls", tool_call))?,
            4 => m.tool_call_id = opt_string(r)?,
            5 => m.function_call = r.optional(function_call)?,
            _ => m.refusal = opt_string(r)?,
        }
        Ok(())
    })?;
    r.require(seen, &NAMES, 0)?;
    Ok(m)
}

pub(crate) fn chat<'a>(r: &mut Reader<'a>) -> Result<ChatRequest<'a>> {
    const NAMES: [&str; 10] = [
        "model",
        "messages",
        "tools",
        "functions",
        "response_format",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "n",
    ];
    let mut c = ChatRequest {
        model: None,
        messages: Vec::new(),
        tools: None,
        functions: None,
        response_format: None,
        stream: None,
        stream_options: None,
        max_tokens: None,
        max_completion_tokens: None,
        n: None,
    };
    let seen = r.fields("an object (chat completions request)", &NAMES, |r, i| {
        match i {
            0 => c.model = opt_string(r)?,
            1 => c.messages = list(r, "an array of messages", chat_message)?,
            2 => c.tools = opt_values(r)?,
            3 => c.functions = opt_values(r)?,
            4 => c.response_format = opt_value(r)?,
            5 => c.stream = opt_bool(r)?,
            6 => c.stream_options = stream_options(r)?,
            7 => c.max_tokens = opt_i64(r)?,
            8 => c.max_completion_tokens = opt_i64(r)?,
            _ => c.n = opt_i64(r)?,
        }
        Ok(())
    })?;
    r.require(seen, &NAMES, 1)?;
    Ok(c)
}

/// One element of an array prompt.
enum Element<'a> {
    Text(Str<'a>),
    Token(u32),
    Tokens(Vec<u32>),
}

fn element<'a>(r: &mut Reader<'a>) -> Result<Element<'a>> {
    match r.peek()? {
        Kind::String => string(r).map(Element::Text),
        Kind::Number => r.u32().map(Element::Token),
        Kind::Array => list(r, "an array of token ids", Reader::u32).map(Element::Tokens),
        _ => r.wrong_type("a string, a token id or an array of token ids"),
    }
}

/// A legacy-completions prompt or an embeddings input: text, or an array whose elements are
/// all texts, all token ids, or all arrays of token ids (each element is read whole before
/// the mix is judged, as serde did).
fn text_or_tokens<'a>(r: &mut Reader<'a>) -> Result<TextOrTokens<'a>> {
    const EXPECTED: &str = "a string, an array of strings, or token ids";
    match r.peek()? {
        Kind::String => return string(r).map(TextOrTokens::Text),
        Kind::Array => {}
        _ => return r.wrong_type(EXPECTED),
    }
    let mut out = TextOrTokens::Texts(Vec::new());
    let mut first = true;
    r.array(EXPECTED, |r| {
        let e = element(r)?;
        match (&mut out, e) {
            (_, e) if first => {
                first = false;
                out = match e {
                    Element::Text(t) => TextOrTokens::Texts(vec![t]),
                    Element::Token(t) => TextOrTokens::Tokens(vec![t]),
                    Element::Tokens(t) => TextOrTokens::TokenLists(vec![t]),
                };
            }
            (TextOrTokens::Texts(v), Element::Text(t)) => v.push(t),
            (TextOrTokens::Tokens(v), Element::Token(t)) => v.push(t),
            (TextOrTokens::TokenLists(v), Element::Tokens(t)) => v.push(t),
            _ => return r.shape("an array mixing strings, token ids and arrays".into()),
        }
        Ok(())
    })?;
    Ok(out)
}

pub(crate) fn completions<'a>(r: &mut Reader<'a>) -> Result<CompletionsRequest<'a>> {
    const NAMES: [&str; 8] = [
        "model",
        "prompt",
        "suffix",
        "stream",
        "stream_options",
        "max_tokens",
        "n",
        "best_of",
    ];
    let mut c = CompletionsRequest {
        model: None,
        prompt: TextOrTokens::Texts(Vec::new()),
        suffix: None,
        stream: None,
        stream_options: None,
        max_tokens: None,
        n: None,
        best_of: None,
    };
    let seen = r.fields("an object (completions request)", &NAMES, |r, i| {
        match i {
            0 => c.model = opt_string(r)?,
            1 => c.prompt = text_or_tokens(r)?,
            2 => c.suffix = opt_string(r)?,
            3 => c.stream = opt_bool(r)?,
            4 => c.stream_options = stream_options(r)?,
            5 => c.max_tokens = opt_i64(r)?,
            6 => c.n = opt_i64(r)?,
            _ => c.best_of = opt_i64(r)?,
        }
        Ok(())
    })?;
    r.require(seen, &NAMES, 1)?;
    Ok(c)
}

pub(crate) fn embeddings<'a>(r: &mut Reader<'a>) -> Result<EmbeddingsRequest<'a>> {
    const NAMES: [&str; 2] = ["model", "input"];
    let mut model = None;
    let mut input = TextOrTokens::Texts(Vec::new());
    let seen = r.fields("an object (embeddings request)", &NAMES, |r, i| {
        match i {
            0 => model = opt_string(r)?,
            _ => input = text_or_tokens(r)?,
        }
        Ok(())
    })?;
    r.require(seen, &NAMES, 1)?;
    Ok(EmbeddingsRequest { model, input })
}

fn responses_item<'a>(r: &mut Reader<'a>) -> Result<ResponsesItem<'a>> {
    const NAMES: [&str; 6] = ["type", "role", "content", "name", "arguments", "output"];
    let mut item = ResponsesItem::default();
    r.fields("an object (input item)", &NAMES, |r, i| {
        match i {
            0 => item.kind = opt_string(r)?,
            1 => item.role = opt_string(r)?,
            2 => item.content = r.optional(content)?,
            3 => item.name = opt_string(r)?,
            4 => item.arguments = opt_string(r)?,
            _ => item.output = opt_value(r)?,
        }
        Ok(())
    })?;
    Ok(item)
}

pub(crate) fn responses<'a>(r: &mut Reader<'a>) -> Result<ResponsesRequest<'a>> {
    const NAMES: [&str; 6] = [
        "model",
        "input",
        "instructions",
        "tools",
        "stream",
        "max_output_tokens",
    ];
    let mut q = ResponsesRequest {
        model: None,
        input: None,
        instructions: None,
        tools: None,
        stream: None,
        max_output_tokens: None,
    };
    r.fields("an object (responses request)", &NAMES, |r, i| {
        match i {
            0 => q.model = opt_string(r)?,
            1 => {
                q.input = r.optional(|r| {
                    text_or_list(
                        r,
                        "a string or an array of input items",
                        ResponsesInput::Text,
                        ResponsesInput::Items,
                        responses_item,
                    )
                })?
            }
            2 => q.instructions = opt_string(r)?,
            3 => q.tools = opt_values(r)?,
            4 => q.stream = opt_bool(r)?,
            _ => q.max_output_tokens = opt_i64(r)?,
        }
        Ok(())
    })?;
    Ok(q)
}

fn anthropic_message<'a>(r: &mut Reader<'a>) -> Result<AnthropicMessage<'a>> {
    const NAMES: [&str; 2] = ["role", "content"];
    let mut role = Str::Borrowed("");
    let mut content = AnthropicContent::Text(Str::Borrowed(""));
    let seen = r.fields("an object (message)", &NAMES, |r, i| {
        match i {
            0 => role = string(r)?,
            _ => content = anthropic_content(r)?,
        }
        Ok(())
    })?;
    r.require(seen, &NAMES, 0)?;
    r.require(seen, &NAMES, 1)?;
    Ok(AnthropicMessage { role, content })
}

pub(crate) fn anthropic<'a>(r: &mut Reader<'a>) -> Result<AnthropicRequest<'a>> {
    const NAMES: [&str; 6] = [
        "model",
        "system",
        "messages",
        "tools",
        "stream",
        "max_tokens",
    ];
    let mut a = AnthropicRequest {
        model: None,
        system: None,
        messages: Vec::new(),
        tools: None,
        stream: None,
        max_tokens: None,
    };
    let seen = r.fields("an object (messages request)", &NAMES, |r, i| {
        match i {
            0 => a.model = opt_string(r)?,
            1 => a.system = r.optional(anthropic_content)?,
            2 => a.messages = list(r, "an array of messages", anthropic_message)?,
            3 => a.tools = opt_values(r)?,
            4 => a.stream = opt_bool(r)?,
            _ => a.max_tokens = opt_i64(r)?,
        }
        Ok(())
    })?;
    r.require(seen, &NAMES, 2)?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use crate::llm::api::{parse_request, reference, ApiKind};
    use crate::llm::json::Mutator;

    fn compare(kind: ApiKind, body: &[u8]) -> bool {
        reference::compare(kind, body).unwrap_or_else(|e| panic!("{e}"))
    }

    const VALID: &[(ApiKind, &str)] = &[
        (
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be terse."},{"role":"user","name":"ann","content":"Hello, \"world\" \u00e9\ud83d\ude00\n"}],"max_tokens":16,"stream":false}"#,
        ),
        (
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"https://x/y.png","detail":"low"}},{"type":"input_audio","input_audio":{"data":"AAAA"}}]},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}],"tools":[{"type":"function","function":{"name":"f","description":"d.","parameters":{"type":"object","properties":{"a":{"type":"integer","enum":[1,2]}}}}}],"response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"type":"object"}}},"stream":true,"stream_options":{"include_usage":false,"x":[1,{"y":null}]},"max_completion_tokens":5,"n":2,"temperature":0.2,"metadata":{"k":"v"}}"#,
        ),
        (
            ApiKind::ChatCompletions,
            r#"{"messages":[{"role":"assistant","function_call":{"name":"g"},"refusal":"no"}],"functions":[{"name":"g","parameters":{}}],"stream_options":null,"model":null,"max_tokens":null}"#,
        ),
        (
            ApiKind::Completions,
            r#"{"model":"davinci-002","prompt":["one","two"],"suffix":"end","max_tokens":7,"n":1,"best_of":2,"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
        (
            ApiKind::Completions,
            r#"{"model":"davinci-002","prompt":[[1,2,3],[4294967295]],"echo":true}"#,
        ),
        (
            ApiKind::Embeddings,
            r#"{"model":"text-embedding-3-small","input":[1,2,3],"dimensions":256}"#,
        ),
        (
            ApiKind::Embeddings,
            r#"{"input":"a single text","encoding_format":"float"}"#,
        ),
        (
            ApiKind::Responses,
            r#"{"model":"gpt-4.1","instructions":"Be kind.","input":[{"role":"user","content":[{"type":"input_text","text":"hi"},{"type":"input_image","image_url":"https://x","detail":"high"}]},{"type":"function_call","name":"f","arguments":"{}"},{"type":"function_call_output","output":{"r":[1,2]}}],"tools":[{"type":"web_search"}],"max_output_tokens":100,"stream":false}"#,
        ),
        (ApiKind::Responses, r#"{"model":"gpt-4.1","input":"plain"}"#),
        (
            ApiKind::AnthropicMessages,
            r#"{"model":"claude-sonnet-4","max_tokens":1024,"system":[{"type":"text","text":"sys","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"s"},{"type":"tool_use","id":"t","name":"f","input":{"q":"x"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"ok"}]},{"type":"image","source":{"type":"base64","data":"AA"}}]}],"tools":[{"name":"f","input_schema":{}}],"stream":true}"#,
        ),
    ];

    /// Fragments a mutation inserts: JSON tokens, values of every type, the fields the
    /// readers know, escapes good and bad.
    const FRAGMENTS: &[&str] = &[
        "null",
        "true",
        "false",
        "0",
        "-1",
        "1.5",
        "1e3",
        "1e400",
        "-0",
        "01",
        "4294967296",
        "9223372036854775808",
        "\"\"",
        "\"x\"",
        "\"\\u00e9\"",
        "\"\\ud800\"",
        "\"\\q\"",
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        "[]",
        "{}",
        "[[1,2],[3]]",
        "[1,\"a\"]",
        "[\"a\",1]",
        "[null]",
        "\"model\":\"m\",",
        "\"messages\":[],",
        "\"role\":\"user\",",
        "\"content\":\"c\",",
        "\"content\":[{\"type\":\"text\",\"text\":\"t\"}],",
        "\"max_tokens\":0,",
        "\"n\":-2,",
        "\"stream\":true,",
        "\"prompt\":\"p\",",
        "\"input\":[1],",
        "\"tools\":[{}],",
        "\"model\":5,",
        "{\"role\":\"user\",\"content\":\"x\"}",
        "\"type\":null,",
        "\"image_url\":{\"detail\":1},",
        "[[[[[[[[[[[[1]]]]]]]]]]]]",
        "\"\\\\\"",
        "\t\n ",
        "\u{0}",
        "é",
        "\"\\u0000\"",
    ];

    #[test]
    fn the_reader_parses_like_serde_did_on_valid_bodies() {
        for (kind, body) in VALID {
            assert!(
                parse_request(*kind, body.as_bytes()).is_ok(),
                "{kind:?} {body}"
            );
            assert!(compare(*kind, body.as_bytes()));
        }
    }

    #[test]
    fn the_reader_parses_like_serde_did_on_broken_bodies() {
        let mut m = Mutator::new(
            std::env::var("TOKENFUSE_DIFF_SEED")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0x9e37_79b9_7f4a_7c15),
        );
        let kinds = [
            ApiKind::ChatCompletions,
            ApiKind::Completions,
            ApiKind::Responses,
            ApiKind::Embeddings,
            ApiKind::AnthropicMessages,
        ];
        let (mut compared, mut divergent) = (0, 0);
        // TOKENFUSE_DIFF_ROUNDS runs more (a longer hunt than `make test` affords).
        let rounds = std::env::var("TOKENFUSE_DIFF_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        for round in 0..rounds {
            let (own_kind, base) = VALID[m.below(VALID.len())];
            let body = m.mutate(base.as_bytes(), FRAGMENTS, 6);
            // Mostly its own API, sometimes another one's shape.
            let kind = if round % 5 == 0 {
                kinds[m.below(kinds.len())]
            } else {
                own_kind
            };
            if compare(kind, &body) {
                compared += 1;
            } else {
                divergent += 1;
            }
        }
        // The deliberate difference (arrays for objects) is rare; everything else matched.
        println!("{compared} bodies read alike, {divergent} arrays for objects");
        assert!(divergent * 100 < compared, "{divergent} of {compared}");
    }

    #[test]
    fn an_array_in_place_of_an_object_is_refused() {
        for body in [&br#"[null,[]]"#[..], br#"{"messages":[["user","hi"]]}"#] {
            let e = parse_request(ApiKind::ChatCompletions, body).unwrap_err();
            assert!(
                e.to_string().contains("expected an object")
                    && e.to_string().contains("found an array"),
                "{e}"
            );
            assert_eq!(
                reference::compare(ApiKind::ChatCompletions, body),
                Ok(false)
            );
            assert!(reference::parse_request(ApiKind::ChatCompletions, body).is_ok());
        }
    }

    #[test]
    fn errors_keep_the_wording_operators_see() {
        let e = parse_request(
            ApiKind::ChatCompletions,
            br#"{"model":"a","model":"b","messages":[]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "request body has the wrong shape: duplicate field `model` (line 1, column 21)"
        );
        let e = parse_request(
            ApiKind::ChatCompletions,
            b"{\"messages\":[{\"content\":\"x\"}]}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing field `role`"), "{e}");
        let e =
            parse_request(ApiKind::ChatCompletions, br#"{"messages":[{"role":7}]}"#).unwrap_err();
        assert!(
            e.to_string().contains("expected a string, found a number"),
            "{e}"
        );
    }
}
