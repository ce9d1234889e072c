//! LLM API shapes: which API a request speaks, and what its body says that matters for
//! counting — the model, the prompt, whether it streams, and how much output it may ask for.
//!
//! The API is chosen from the path (the suffix, so `/v1/chat/completions`, Azure's
//! `/openai/deployments/{name}/chat/completions` and gateway prefixes all work), then the body
//! must have that API's shape. The body is read once (`api_read`, with [`crate::llm::json`]): the
//! fields counting needs are taken, their strings borrowed from the body unless they held
//! escapes ([`Str`]), and the rest is skipped after its syntax is checked. A body that is not
//! JSON, is not UTF-8, repeats a field, or lacks the API's required field is a
//! [`RequestError`], never a guess. The serde derivations on the shapes are the reference the
//! reader is tested against ([`reference`]).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::llm::{json, read as api_read};

/// The request shapes tokenfuse understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// OpenAI Chat Completions (`…/chat/completions`).
    ChatCompletions,
    /// OpenAI legacy Completions (`…/completions`).
    Completions,
    /// OpenAI Responses (`…/responses`).
    Responses,
    /// OpenAI Embeddings (`…/embeddings`).
    Embeddings,
    /// Anthropic Messages (`…/v1/messages`).
    AnthropicMessages,
}

impl ApiKind {
    /// The API a POST to `path` speaks, if any. The query string is ignored.
    pub fn from_path(path: &str) -> Option<ApiKind> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(ApiKind::ChatCompletions)
        } else if path.ends_with("/completions") {
            Some(ApiKind::Completions)
        } else if path.ends_with("/responses") {
            Some(ApiKind::Responses)
        } else if path.ends_with("/embeddings") {
            Some(ApiKind::Embeddings)
        } else if path.ends_with("/v1/messages") {
            // Only Anthropic's own path: OpenAI's Assistants API also has `…/messages`
            // (`/v1/threads/{id}/messages`) with a different body.
            Some(ApiKind::AnthropicMessages)
        } else {
            None
        }
    }

    /// Short name used in stats and logs.
    pub fn tag(self) -> &'static str {
        match self {
            ApiKind::ChatCompletions => "chat",
            ApiKind::Completions => "completions",
            ApiKind::Responses => "responses",
            ApiKind::Embeddings => "embeddings",
            ApiKind::AnthropicMessages => "anthropic",
        }
    }
}

/// The Azure OpenAI deployment named in a path (`/openai/deployments/{name}/…`). Azure
/// serves (and bills) the deployment, whatever `model` the body names: on such a path the
/// deployment is the model that is counted, priced and rerouted.
pub fn azure_deployment(path: &str) -> Option<&str> {
    deployment_span(path).and_then(|r| path.get(r))
}

fn deployment_span(path: &str) -> Option<std::ops::Range<usize>> {
    const MARK: &str = "/deployments/";
    let bare = path.split(['?', '#']).next()?;
    let start = bare.find(MARK)?.checked_add(MARK.len())?;
    let rest = bare.get(start..)?;
    let len = rest.find('/').unwrap_or(rest.len());
    (len > 0).then(|| start..start.saturating_add(len))
}

/// `path` with its Azure deployment replaced by `deployment` (`None` when it names none).
pub fn with_azure_deployment(path: &str, deployment: &str) -> Option<String> {
    let span = deployment_span(path)?;
    Some(format!(
        "{}{deployment}{}",
        path.get(..span.start)?,
        path.get(span.end..)?
    ))
}

/// Why a request body could not be read. Messages name positions and fields, never content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The body is empty.
    Empty,
    /// Not JSON, or not UTF-8 (JSON strings must be valid UTF-8).
    Syntax { line: usize, column: usize },
    /// JSON, but not this API's shape (missing/duplicate field, wrong type).
    Shape { detail: String },
    /// A field has a value the API does not allow.
    Invalid {
        field: &'static str,
        why: &'static str,
    },
    /// The body is content-encoded (gzip, …): the filter does not decompress.
    Encoded,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Empty => f.write_str("request body is empty"),
            RequestError::Syntax { line, column } => write!(
                f,
                "request body is not valid JSON (or not UTF-8) at line {line}, column {column}"
            ),
            RequestError::Shape { detail } => {
                write!(f, "request body has the wrong shape: {detail}")
            }
            RequestError::Invalid { field, why } => write!(f, "`{field}` {why}"),
            RequestError::Encoded => f.write_str(
                "compressed request bodies cannot be counted; send the body uncompressed",
            ),
        }
    }
}

impl std::error::Error for RequestError {}

impl RequestError {
    /// A reader error, positioned in `body`.
    fn from_json(body: &[u8], e: json::Error) -> Self {
        let (line, column) = json::line_column(body, e.at);
        match e.kind {
            json::ErrorKind::Syntax(_) => RequestError::Syntax { line, column },
            json::ErrorKind::Shape(detail) => RequestError::Shape {
                detail: format!("{detail} (line {line}, column {column})"),
            },
        }
    }

    fn from_serde(e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => RequestError::Syntax {
                line: e.line(),
                column: e.column(),
            },
            Category::Data => {
                // Keep serde's field-level wording but never a quoted value from the body.
                let text = e.to_string();
                let text = text.split(" at line ").next().unwrap_or(&text);
                let detail =
                    if text.starts_with("missing field") || text.starts_with("duplicate field") {
                        text.to_string()
                    } else if let Some((_, rest)) = text.split_once("expected") {
                        format!("a field has the wrong type, expected{rest}")
                    } else {
                        "a field has the wrong type".to_string()
                    };
                RequestError::Shape {
                    detail: format!("{detail} (line {}, column {})", e.line(), e.column()),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shapes. Every struct lists only what counting needs; unknown fields are skipped.
// ---------------------------------------------------------------------------------------

/// A string of the body: borrowed from it, unless it held escapes (then decoded, owned).
pub type Str<'a> = Cow<'a, str>;

/// Text, or a list of typed parts (OpenAI chat `content`, Responses `content`).
#[derive(Debug)]
pub enum Content<'a> {
    Text(Str<'a>),
    Parts(Vec<ContentPart<'a>>),
}

impl<'de, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text_or_list(
            d,
            "a string or an array of content parts",
            Content::Text,
            Content::Parts,
        )
    }
}

/// One part of multi-part content, any API. Only the fields counting reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ContentPart<'a> {
    #[serde(rename = "type")]
    pub kind: Str<'a>,
    pub text: Option<Str<'a>>,
    pub refusal: Option<Str<'a>>,
    pub image_url: Option<ImageUrl<'a>>,
    /// Responses API `input_image` and Anthropic image blocks carry `detail` here.
    pub detail: Option<Str<'a>>,
    // Anthropic blocks.
    pub name: Option<Str<'a>>,
    pub input: Option<Value>,
    pub content: Option<Box<AnthropicContent<'a>>>,
    pub thinking: Option<Str<'a>>,
}

/// `image_url` is a string (Responses API) or `{url, detail}` (Chat Completions).
#[derive(Debug)]
pub enum ImageUrl<'a> {
    Url(Str<'a>),
    Object { detail: Option<Str<'a>> },
}

impl<'de, 'a> Deserialize<'de> for ImageUrl<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Object {
            #[serde(default)]
            detail: Option<String>,
        }
        struct UrlOrObject<'a>(PhantomData<&'a ()>);
        impl<'de, 'a> Visitor<'de> for UrlOrObject<'a> {
            type Value = ImageUrl<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a URL or an object with `url` and `detail`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ImageUrl<'a>, E> {
                Ok(ImageUrl::Url(Cow::Owned(v.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ImageUrl<'a>, A::Error> {
                let o = Object::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ImageUrl::Object {
                    detail: o.detail.map(Cow::Owned),
                })
            }
        }
        d.deserialize_any(UrlOrObject(PhantomData))
    }
}

/// A chat message (OpenAI Chat Completions).
#[derive(Debug, Deserialize)]
pub struct ChatMessage<'a> {
    pub role: Str<'a>,
    #[serde(default)]
    pub content: Option<Content<'a>>,
    #[serde(default)]
    pub name: Option<Str<'a>>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall<'a>>>,
    #[serde(default)]
    pub tool_call_id: Option<Str<'a>>,
    #[serde(default)]
    pub function_call: Option<FunctionCall<'a>>,
    #[serde(default)]
    pub refusal: Option<Str<'a>>,
}

/// A tool call made by the assistant in an earlier turn.
#[derive(Debug, Deserialize)]
pub struct ToolCall<'a> {
    #[serde(default)]
    pub function: Option<FunctionCall<'a>>,
}

/// A function name and its JSON-encoded arguments.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FunctionCall<'a> {
    pub name: Str<'a>,
    pub arguments: Str<'a>,
}

/// `stream_options` of streaming chat/completions requests.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `stream_options` when the key is present, `null` included (as empty options): a body with
/// `"stream_options": null` must have that key rewritten by [`crate::llm::rewrite::with_stream_usage`], not a
/// second `stream_options` key added in front of it.
fn present_stream_options<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<StreamOptions>, D::Error> {
    Option::<StreamOptions>::deserialize(d).map(|o| Some(o.unwrap_or_default()))
}

/// OpenAI Chat Completions request.
#[derive(Debug, Deserialize)]
pub struct ChatRequest<'a> {
    #[serde(default)]
    pub model: Option<Str<'a>>,
    pub messages: Vec<ChatMessage<'a>>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub functions: Option<Vec<Value>>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default, deserialize_with = "present_stream_options")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub n: Option<i64>,
}

/// A legacy-completions prompt or an embeddings input: text, texts, or token ids.
#[derive(Debug)]
pub enum TextOrTokens<'a> {
    Text(Str<'a>),
    Texts(Vec<Str<'a>>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl<'de, 'a> Deserialize<'de> for TextOrTokens<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// One element of an array prompt: the first one decides what the array holds.
        enum Element {
            Text(String),
            Token(u32),
            Tokens(Vec<u32>),
        }
        impl<'de> Deserialize<'de> for Element {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct ElementVisitor;
                impl<'de> Visitor<'de> for ElementVisitor {
                    type Value = Element;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string, a token id or an array of token ids")
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<Element, E> {
                        Ok(Element::Text(v.to_owned()))
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Element, E> {
                        u32::try_from(v)
                            .map(Element::Token)
                            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
                    }
                    // serde_json hands `-0` (and any negative integer) over as an i64.
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Element, E> {
                        u32::try_from(v)
                            .map(Element::Token)
                            .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Element, A::Error> {
                        Vec::<u32>::deserialize(de::value::SeqAccessDeserializer::new(seq))
                            .map(Element::Tokens)
                    }
                }
                d.deserialize_any(ElementVisitor)
            }
        }
        struct PromptVisitor<'a>(PhantomData<&'a ()>);
        impl<'de, 'a> Visitor<'de> for PromptVisitor<'a> {
            type Value = TextOrTokens<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of strings, or token ids")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TextOrTokens<'a>, E> {
                Ok(TextOrTokens::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TextOrTokens<'a>, A::Error> {
                let mixed = || A::Error::custom("an array mixing strings, token ids and arrays");
                let mut out = TextOrTokens::Texts(Vec::new());
                let mut first = true;
                while let Some(element) = seq.next_element::<Element>()? {
                    match (&mut out, element) {
                        (_, e) if first => {
                            first = false;
                            out = match e {
                                Element::Text(t) => TextOrTokens::Texts(vec![Cow::Owned(t)]),
                                Element::Token(t) => TextOrTokens::Tokens(vec![t]),
                                Element::Tokens(t) => TextOrTokens::TokenLists(vec![t]),
                            };
                        }
                        (TextOrTokens::Texts(v), Element::Text(t)) => v.push(Cow::Owned(t)),
                        (TextOrTokens::Tokens(v), Element::Token(t)) => v.push(t),
                        (TextOrTokens::TokenLists(v), Element::Tokens(t)) => v.push(t),
                        _ => return Err(mixed()),
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(PromptVisitor(PhantomData))
    }
}

/// OpenAI legacy Completions request.
#[derive(Debug, Deserialize)]
pub struct CompletionsRequest<'a> {
    #[serde(default)]
    pub model: Option<Str<'a>>,
    pub prompt: TextOrTokens<'a>,
    #[serde(default)]
    pub suffix: Option<Str<'a>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default, deserialize_with = "present_stream_options")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub best_of: Option<i64>,
}

/// OpenAI Embeddings request.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest<'a> {
    #[serde(default)]
    pub model: Option<Str<'a>>,
    pub input: TextOrTokens<'a>,
}

/// Responses API `input`: a string, or a list of items.
#[derive(Debug)]
pub enum ResponsesInput<'a> {
    Text(Str<'a>),
    Items(Vec<ResponsesItem<'a>>),
}

impl<'de, 'a> Deserialize<'de> for ResponsesInput<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text_or_list(
            d,
            "a string or an array of input items",
            ResponsesInput::Text,
            ResponsesInput::Items,
        )
    }
}

/// One Responses API input item: a message, a function call, or a function call's output.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ResponsesItem<'a> {
    #[serde(rename = "type")]
    pub kind: Option<Str<'a>>,
    pub role: Option<Str<'a>>,
    pub content: Option<Content<'a>>,
    pub name: Option<Str<'a>>,
    pub arguments: Option<Str<'a>>,
    pub output: Option<Value>,
}

/// OpenAI Responses request.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest<'a> {
    #[serde(default)]
    pub model: Option<Str<'a>>,
    #[serde(default)]
    pub input: Option<ResponsesInput<'a>>,
    #[serde(default)]
    pub instructions: Option<Str<'a>>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
}

/// Anthropic content: a string or a list of blocks.
#[derive(Debug)]
pub enum AnthropicContent<'a> {
    Text(Str<'a>),
    Blocks(Vec<ContentPart<'a>>),
}

impl<'de, 'a> Deserialize<'de> for AnthropicContent<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text_or_list(
            d,
            "a string or an array of content blocks",
            AnthropicContent::Text,
            AnthropicContent::Blocks,
        )
    }
}

/// Deserialise "a string, or an array of `P`" straight into `T`. (serde's untagged enums
/// would first copy the whole value into a buffer, then try each variant on it: every
/// message's text twice.) The serde reading is the reference only, so its strings are owned.
fn text_or_list<'de, 'a, D, P, T>(
    d: D,
    expecting: &'static str,
    text: fn(Str<'a>) -> T,
    list: fn(Vec<P>) -> T,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    P: Deserialize<'de>,
{
    struct TextOrList<'a, P, T> {
        expecting: &'static str,
        text: fn(Str<'a>) -> T,
        list: fn(Vec<P>) -> T,
    }
    impl<'de, 'a, P: Deserialize<'de>, T> Visitor<'de> for TextOrList<'a, P, T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            Ok((self.text)(Cow::Owned(v.to_owned())))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
            Vec::<P>::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(self.list)
        }
    }
    d.deserialize_any(TextOrList {
        expecting,
        text,
        list,
    })
}

/// An Anthropic message.
#[derive(Debug, Deserialize)]
pub struct AnthropicMessage<'a> {
    pub role: Str<'a>,
    pub content: AnthropicContent<'a>,
}

/// Anthropic Messages request.
#[derive(Debug, Deserialize)]
pub struct AnthropicRequest<'a> {
    #[serde(default)]
    pub model: Option<Str<'a>>,
    #[serde(default)]
    pub system: Option<AnthropicContent<'a>>,
    pub messages: Vec<AnthropicMessage<'a>>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
}

/// A parsed request body of one of the known APIs.
#[derive(Debug)]
pub enum RequestBody<'a> {
    Chat(ChatRequest<'a>),
    Completions(CompletionsRequest<'a>),
    Responses(ResponsesRequest<'a>),
    Embeddings(EmbeddingsRequest<'a>),
    Anthropic(AnthropicRequest<'a>),
}

/// Parse `body` as `kind`'s request shape.
pub fn parse_request(kind: ApiKind, body: &[u8]) -> Result<RequestBody<'_>, RequestError> {
    let text = checked_text(body)?;
    let mut r = json::Reader::new(text);
    let parsed = match kind {
        ApiKind::ChatCompletions => api_read::chat(&mut r).map(RequestBody::Chat),
        ApiKind::Completions => api_read::completions(&mut r).map(RequestBody::Completions),
        ApiKind::Responses => api_read::responses(&mut r).map(RequestBody::Responses),
        ApiKind::Embeddings => api_read::embeddings(&mut r).map(RequestBody::Embeddings),
        ApiKind::AnthropicMessages => api_read::anthropic(&mut r).map(RequestBody::Anthropic),
    }
    .and_then(|parsed| r.end().map(|()| parsed))
    .map_err(|e| RequestError::from_json(body, e))?;
    parsed.validate()?;
    Ok(parsed)
}

/// The body as text: not empty, and UTF-8 throughout (skipped fields included), so a body
/// that is not UTF-8 is refused, never forwarded.
fn checked_text(body: &[u8]) -> Result<&str, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::Empty);
    }
    std::str::from_utf8(body).map_err(|e| {
        let (line, column) = json::line_column(body, e.valid_up_to());
        RequestError::Syntax { line, column }
    })
}

/// The serde reading of request bodies that [`parse_request`] replaced (see `api_read`):
/// kept as the reference the tests and the `request_body` fuzz target compare it with. Not
/// on the request path.
#[doc(hidden)]
pub mod reference {
    use super::*;

    /// What a parse came to, comparable across the two readings: the request in full (its
    /// `Debug` text; a string reads the same borrowed or owned), or the class of the error.
    fn outcome(r: &Result<RequestBody<'_>, RequestError>) -> String {
        match r {
            Ok(body) => format!("ok {body:?}"),
            Err(RequestError::Empty) => "empty".into(),
            Err(RequestError::Syntax { .. }) => "syntax".into(),
            Err(RequestError::Shape { .. }) => "shape".into(),
            Err(RequestError::Invalid { field, .. }) => format!("invalid {field}"),
            Err(RequestError::Encoded) => "encoded".into(),
        }
    }

    /// How [`super::parse_request`] and [`parse_request`] compare on `body`: `Ok(true)` when
    /// they agree, `Ok(false)` where they differ on purpose (serde took a JSON array in place
    /// of an object, its elements as the fields in order; the reader refuses it), `Err` with
    /// both outcomes otherwise.
    pub fn compare(kind: ApiKind, body: &[u8]) -> Result<bool, String> {
        let ours = super::parse_request(kind, body);
        if matches!(&ours, Err(RequestError::Shape { detail })
            if detail.contains("expected an object") && detail.contains("found an array"))
        {
            return Ok(false);
        }
        let (ours, theirs) = (outcome(&ours), outcome(&parse_request(kind, body)));
        if ours == theirs {
            Ok(true)
        } else {
            Err(format!(
                "{kind:?}: the reader says {ours}, serde says {theirs}, for {:?}",
                String::from_utf8_lossy(body)
            ))
        }
    }

    pub fn parse_request(kind: ApiKind, body: &[u8]) -> Result<RequestBody<'_>, RequestError> {
        let text = checked_text(body)?;
        let parsed = match kind {
            ApiKind::ChatCompletions => serde_json::from_str(text).map(RequestBody::Chat),
            ApiKind::Completions => serde_json::from_str(text).map(RequestBody::Completions),
            ApiKind::Responses => serde_json::from_str(text).map(RequestBody::Responses),
            ApiKind::Embeddings => serde_json::from_str(text).map(RequestBody::Embeddings),
            ApiKind::AnthropicMessages => serde_json::from_str(text).map(RequestBody::Anthropic),
        }
        .map_err(|e| RequestError::from_serde(&e))?;
        parsed.validate()?;
        Ok(parsed)
    }
}

fn positive(value: Option<i64>, field: &'static str) -> Result<Option<u64>, RequestError> {
    match value {
        None => Ok(None),
        Some(v) if v >= 1 => Ok(Some(v as u64)),
        Some(_) => Err(RequestError::Invalid {
            field,
            why: "must be a positive integer",
        }),
    }
}

impl RequestBody<'_> {
    fn validate(&self) -> Result<(), RequestError> {
        match self {
            RequestBody::Chat(r) => {
                positive(r.max_tokens, "max_tokens")?;
                positive(r.max_completion_tokens, "max_completion_tokens")?;
                positive(r.n, "n")?;
            }
            RequestBody::Completions(r) => {
                positive(r.max_tokens, "max_tokens")?;
                positive(r.n, "n")?;
                positive(r.best_of, "best_of")?;
            }
            RequestBody::Responses(r) => {
                positive(r.max_output_tokens, "max_output_tokens")?;
            }
            RequestBody::Anthropic(r) => {
                positive(r.max_tokens, "max_tokens")?;
            }
            RequestBody::Embeddings(_) => {}
        }
        Ok(())
    }

    /// The `model` field of the body, if any.
    pub fn model(&self) -> Option<&str> {
        match self {
            RequestBody::Chat(r) => r.model.as_deref(),
            RequestBody::Completions(r) => r.model.as_deref(),
            RequestBody::Responses(r) => r.model.as_deref(),
            RequestBody::Embeddings(r) => r.model.as_deref(),
            RequestBody::Anthropic(r) => r.model.as_deref(),
        }
    }

    /// Whether the response will be a server-sent event stream.
    pub fn stream(&self) -> bool {
        match self {
            RequestBody::Chat(r) => r.stream,
            RequestBody::Completions(r) => r.stream,
            RequestBody::Responses(r) => r.stream,
            RequestBody::Anthropic(r) => r.stream,
            RequestBody::Embeddings(_) => None,
        }
        .unwrap_or(false)
    }

    /// Whether the client already asked OpenAI for a usage chunk at the end of the stream.
    pub fn stream_usage_requested(&self) -> bool {
        let opts = match self {
            RequestBody::Chat(r) => r.stream_options.as_ref(),
            RequestBody::Completions(r) => r.stream_options.as_ref(),
            _ => None,
        };
        opts.and_then(|o| o.include_usage).unwrap_or(false)
    }

    /// Whether this API takes `stream_options.include_usage` (only OpenAI chat/completions).
    pub fn accepts_stream_options(&self) -> bool {
        matches!(self, RequestBody::Chat(_) | RequestBody::Completions(_))
    }

    /// The most output tokens the request can be billed for, over all choices it asks to be
    /// generated (`n`, and `best_of` for legacy completions, which generates that many and
    /// bills them all). `default` stands for the per-choice cap when the request gives none
    /// — it is multiplied by the choices too, or `n: 128` without a cap would reserve one
    /// choice and be billed for 128. Embeddings produce no output tokens.
    pub fn output_reservation(&self, default: u64) -> u64 {
        let choices = |n: Option<i64>| n.and_then(|v| u64::try_from(v).ok()).unwrap_or(1).max(1);
        let cap = |v: Option<i64>| {
            v.and_then(|v| u64::try_from(v).ok())
                .filter(|v| *v >= 1)
                .unwrap_or(default)
        };
        match self {
            RequestBody::Chat(r) => {
                cap(r.max_completion_tokens.or(r.max_tokens)).saturating_mul(choices(r.n))
            }
            RequestBody::Completions(r) => {
                cap(r.max_tokens).saturating_mul(choices(r.n).max(choices(r.best_of)))
            }
            RequestBody::Responses(r) => cap(r.max_output_tokens),
            RequestBody::Anthropic(r) => cap(r.max_tokens),
            RequestBody::Embeddings(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_select_the_api_by_suffix() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions"),
            Some(ApiKind::ChatCompletions)
        );
        assert_eq!(
            ApiKind::from_path("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"),
            Some(ApiKind::ChatCompletions)
        );
        assert_eq!(
            ApiKind::from_path("/v1/completions"),
            Some(ApiKind::Completions)
        );
        assert_eq!(
            ApiKind::from_path("/v1/responses"),
            Some(ApiKind::Responses)
        );
        assert_eq!(
            ApiKind::from_path("/v1/embeddings/"),
            Some(ApiKind::Embeddings)
        );
        assert_eq!(
            ApiKind::from_path("/v1/messages"),
            Some(ApiKind::AnthropicMessages)
        );
        assert_eq!(
            ApiKind::from_path("/anthropic/v1/messages?beta=true"),
            Some(ApiKind::AnthropicMessages)
        );
    }

    #[test]
    fn other_paths_are_not_llm_calls() {
        for p in [
            "/v1/models",
            "/",
            "/v1/threads/t1/messages",
            "/v1/responses/resp_1",
            "/v1/messages/count_tokens",
            "/healthz",
        ] {
            assert_eq!(ApiKind::from_path(p), None, "{p}");
        }
    }

    #[test]
    fn azure_deployment_is_read_from_the_path() {
        assert_eq!(
            azure_deployment("/openai/deployments/prod-4o/chat/completions?x=1"),
            Some("prod-4o")
        );
        assert_eq!(azure_deployment("/v1/chat/completions"), None);
        assert_eq!(azure_deployment("/openai/deployments//chat"), None);
    }

    #[test]
    fn empty_and_whitespace_bodies_are_empty() {
        assert_eq!(
            parse_request(ApiKind::ChatCompletions, b"").unwrap_err(),
            RequestError::Empty
        );
        assert_eq!(
            parse_request(ApiKind::ChatCompletions, b" \n").unwrap_err(),
            RequestError::Empty
        );
    }

    #[test]
    fn truncated_json_is_a_syntax_error_with_position() {
        let e = parse_request(
            ApiKind::ChatCompletions,
            br#"{"model":"gpt-4o","messages":[{"#,
        )
        .unwrap_err();
        assert!(matches!(e, RequestError::Syntax { line: 1, .. }), "{e:?}");
    }

    #[test]
    fn invalid_utf8_inside_a_string_is_a_syntax_error() {
        let body =
            b"{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}";
        assert!(matches!(
            parse_request(ApiKind::ChatCompletions, body),
            Err(RequestError::Syntax { .. })
        ));
    }

    #[test]
    fn invalid_utf8_in_a_skipped_field_is_a_syntax_error() {
        // Found by `make fuzz` (request_body): serde_json skips unknown fields without
        // checking their UTF-8, so such a body used to parse and be forwarded.
        let body = b"{\"stream\":true,\"extra\":{\"k\xffey\":false},\n \"messages\":[]}";
        assert_eq!(
            parse_request(ApiKind::ChatCompletions, body).unwrap_err(),
            RequestError::Syntax {
                line: 1,
                column: 27
            }
        );
        let body = b"{\"messages\":[],\n\"x\":\"\xc3\"}";
        assert_eq!(
            parse_request(ApiKind::ChatCompletions, body).unwrap_err(),
            RequestError::Syntax { line: 2, column: 6 }
        );
    }

    #[test]
    fn duplicate_model_field_is_refused() {
        let body = br#"{"model":"gpt-4o-mini","model":"gpt-4o","messages":[]}"#;
        let e = parse_request(ApiKind::ChatCompletions, body).unwrap_err();
        assert!(e.to_string().contains("duplicate field `model`"), "{e}");
    }

    #[test]
    fn chat_without_messages_is_the_wrong_shape() {
        let e = parse_request(ApiKind::ChatCompletions, br#"{"model":"gpt-4o"}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `messages`"), "{e}");
    }

    #[test]
    fn shape_errors_do_not_quote_body_values() {
        let body = br#"{"model":"gpt-4o","messages":"my secret prompt"}"#;
        let e = parse_request(ApiKind::ChatCompletions, body).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn negative_max_tokens_is_invalid() {
        let body = br#"{"model":"gpt-4o","messages":[],"max_tokens":-5}"#;
        assert_eq!(
            parse_request(ApiKind::ChatCompletions, body).unwrap_err(),
            RequestError::Invalid {
                field: "max_tokens",
                why: "must be a positive integer"
            }
        );
    }

    #[test]
    fn azure_deployments_are_found_and_replaced_in_the_path() {
        let p = "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21";
        assert_eq!(azure_deployment(p), Some("prod-4o"));
        assert_eq!(
            with_azure_deployment(p, "mini").as_deref(),
            Some("/openai/deployments/mini/chat/completions?api-version=2024-10-21")
        );
        assert_eq!(azure_deployment("/v1/chat/completions"), None);
        assert_eq!(
            azure_deployment("/openai/deployments//chat/completions"),
            None
        );
        assert_eq!(azure_deployment("/x?q=/deployments/a/b"), None);
        assert_eq!(
            azure_deployment("/openai/deployments/\u{e9}\u{e9}"),
            Some("\u{e9}\u{e9}")
        );
    }

    #[test]
    fn output_cap_prefers_max_completion_tokens_and_multiplies_by_n() {
        let out = |kind, body: &[u8]| parse_request(kind, body).unwrap().output_reservation(100);
        let chat = ApiKind::ChatCompletions;
        assert_eq!(
            out(
                chat,
                br#"{"messages":[],"max_tokens":10,"max_completion_tokens":20,"n":3}"#
            ),
            60
        );
        assert_eq!(out(chat, br#"{"messages":[]}"#), 100);
        let completions = ApiKind::Completions;
        assert_eq!(
            out(
                completions,
                br#"{"prompt":"x","max_tokens":5,"n":2,"best_of":4}"#
            ),
            20
        );
        assert_eq!(
            out(
                ApiKind::Responses,
                br#"{"input":"x","max_output_tokens":7}"#
            ),
            7
        );
        assert_eq!(out(ApiKind::Embeddings, br#"{"input":"x"}"#), 0);
    }

    #[test]
    fn choices_without_a_cap_reserve_the_default_for_each() {
        // Found by attack: `n: 128` without `max_tokens` reserved one default output.
        let out = |kind, body: &[u8]| parse_request(kind, body).unwrap().output_reservation(4096);
        assert_eq!(
            out(ApiKind::ChatCompletions, br#"{"messages":[],"n":128}"#),
            128 * 4096
        );
        assert_eq!(
            out(ApiKind::Completions, br#"{"prompt":"x","best_of":5,"n":2}"#),
            5 * 4096
        );
    }

    #[test]
    fn absurd_max_tokens_saturates_instead_of_overflowing() {
        let b = parse_request(
            ApiKind::ChatCompletions,
            br#"{"messages":[],"max_tokens":9223372036854775807,"n":4}"#,
        )
        .unwrap();
        assert_eq!(b.output_reservation(1), u64::MAX);
    }

    #[test]
    fn every_prompt_form_of_completions_and_embeddings_parses() {
        for input in [r#""a""#, r#"["a","b"]"#, "[1,2,3]", "[[1,2],[3]]"] {
            let body = format!(r#"{{"input":{input}}}"#);
            assert!(
                parse_request(ApiKind::Embeddings, body.as_bytes()).is_ok(),
                "{input}"
            );
            let body = format!(r#"{{"prompt":{input}}}"#);
            assert!(
                parse_request(ApiKind::Completions, body.as_bytes()).is_ok(),
                "{input}"
            );
        }
    }
}
