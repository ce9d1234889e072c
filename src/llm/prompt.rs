//! Prompt counting: the tokens a request will be billed for before it is forwarded.
//!
//! Chat requests follow OpenAI's published rules ("How to count tokens with tiktoken", the
//! OpenAI cookbook): every message costs 3 tokens of framing plus its role and content, a
//! `name` one more token, the reply is primed with 3 tokens, and function/tool definitions
//! are rendered into the prompt with fixed per-function, per-property and per-enum costs
//! that differ between the `cl100k_base` and `o200k_base` model families. For the cookbook's
//! worked examples these rules give exactly the `prompt_tokens` the API reports, and the
//! tests below pin those figures.
//!
//! Where no published rule exists (images, nested tool schemas, `response_format` schemas,
//! the Responses API's item framing, Anthropic's private tokenizer) the count is an estimate
//! and [`PromptCount::exact`] says so.

use serde_json::Value;

use crate::llm::api::{
    AnthropicContent, AnthropicMessage, AnthropicRequest, ChatMessage, ChatRequest, Content,
    ContentPart, ImageUrl, RequestBody, ResponsesInput, ResponsesRequest, TextOrTokens,
};
use crate::tokenizer::{Encoding, ModelCounting, TextCounter};

/// A prompt's token count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptCount {
    /// Tokens, after any safety factor.
    pub tokens: u64,
    /// True when the count follows the provider's published rules with the model's own
    /// encoding; false when any part of it was estimated.
    pub exact: bool,
}

/// Costs of images, whose pixel size the filter does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageCosts {
    /// An image part with `detail: "low"`.
    pub low: u64,
    /// Any other image part.
    pub high: u64,
}

/// The chat framing constants of one model family (OpenAI cookbook).
#[derive(Clone, Copy, Debug)]
struct ChatFormat {
    per_message: i64,
    per_name: i64,
    reply_priming: i64,
    func_init: i64,
    prop_init: i64,
    prop_key: i64,
    enum_init: i64,
    enum_item: i64,
    func_end: i64,
}

impl ChatFormat {
    fn for_model(model: &str, encoding: Encoding) -> ChatFormat {
        let base = ChatFormat {
            per_message: 3,
            per_name: 1,
            reply_priming: 3,
            func_init: 7,
            prop_init: 3,
            prop_key: 3,
            enum_init: -3,
            enum_item: 3,
            func_end: 12,
        };
        match encoding {
            // gpt-3.5-turbo-0301 framed messages differently (4 per message, a name
            // replacing the role).
            Encoding::Cl100kBase if model == "gpt-3.5-turbo-0301" => ChatFormat {
                per_message: 4,
                per_name: -1,
                func_init: 10,
                ..base
            },
            Encoding::Cl100kBase => ChatFormat {
                func_init: 10,
                ..base
            },
            Encoding::O200kBase => base,
        }
    }
}

/// Accumulates a count and whether it stayed exact.
struct Tally<'a> {
    counter: TextCounter<'a>,
    tokens: i64,
    exact: bool,
    images: ImageCosts,
}

impl<'a> Tally<'a> {
    fn new(counter: TextCounter<'a>, images: ImageCosts) -> Self {
        Tally {
            counter,
            tokens: 0,
            exact: true,
            images,
        }
    }

    fn text(&mut self, text: &str) {
        self.tokens = self
            .tokens
            .saturating_add(i64::try_from(self.counter.count(text)).unwrap_or(i64::MAX));
    }

    fn add(&mut self, n: i64) {
        self.tokens = self.tokens.saturating_add(n);
    }

    fn estimate(&mut self) {
        self.exact = false;
    }

    /// Count a JSON value by its compact serialisation (an estimate).
    fn json(&mut self, value: &Value) {
        self.estimate();
        self.text(&value.to_string());
    }

    fn image(&mut self, detail: Option<&str>) {
        self.estimate();
        let cost = if detail == Some("low") {
            self.images.low
        } else {
            self.images.high
        };
        self.add(i64::try_from(cost).unwrap_or(i64::MAX));
    }

    fn part(&mut self, part: &ContentPart) {
        match &*part.kind {
            "text" | "input_text" | "output_text" => {
                if let Some(t) = &part.text {
                    self.text(t);
                }
            }
            "refusal" => {
                if let Some(t) = &part.refusal {
                    self.text(t);
                }
            }
            "image_url" => {
                let detail = match &part.image_url {
                    Some(ImageUrl::Object { detail }) => detail.as_deref(),
                    _ => part.detail.as_deref(),
                };
                self.image(detail);
            }
            "input_image" | "image" => self.image(part.detail.as_deref()),
            // Anthropic blocks.
            "tool_use" => {
                if let Some(n) = &part.name {
                    self.text(n);
                }
                if let Some(input) = &part.input {
                    self.json(input);
                }
            }
            "tool_result" => {
                if let Some(c) = part.content.as_deref() {
                    self.anthropic_content(c);
                }
            }
            "thinking" => {
                if let Some(t) = &part.thinking {
                    self.text(t);
                }
            }
            // Audio, files, documents and unknown part types: their cost depends on data the
            // filter does not decode. Text they carry is counted; the rest is not.
            _ => {
                self.estimate();
                if let Some(t) = &part.text {
                    self.text(t);
                }
            }
        }
    }

    fn content(&mut self, content: &Content) {
        match content {
            Content::Text(t) => self.text(t),
            Content::Parts(parts) => parts.iter().for_each(|p| self.part(p)),
        }
    }

    fn anthropic_content(&mut self, content: &AnthropicContent) {
        match content {
            AnthropicContent::Text(t) => self.text(t),
            AnthropicContent::Blocks(blocks) => blocks.iter().for_each(|b| self.part(b)),
        }
    }

    fn text_or_tokens(&mut self, input: &TextOrTokens) {
        match input {
            TextOrTokens::Text(t) => self.text(t),
            TextOrTokens::Texts(ts) => ts.iter().for_each(|t| self.text(t)),
            TextOrTokens::Tokens(ids) => self.add(ids.len() as i64),
            TextOrTokens::TokenLists(lists) => {
                for ids in lists {
                    self.add(ids.len() as i64);
                }
            }
        }
    }

    /// One chat message under `format`.
    fn chat_message(&mut self, m: &ChatMessage, format: &ChatFormat) {
        self.add(format.per_message);
        self.text(&m.role);
        if let Some(c) = &m.content {
            self.content(c);
        }
        if let Some(name) = &m.name {
            self.text(name);
            self.add(format.per_name);
        }
        if let Some(id) = &m.tool_call_id {
            self.text(id);
        }
        if let Some(r) = &m.refusal {
            self.text(r);
        }
        // Earlier assistant turns with calls: the rendering is unpublished; name plus
        // arguments plus one token per call is the usual approximation.
        let calls = m
            .tool_calls
            .iter()
            .flatten()
            .filter_map(|c| c.function.as_ref())
            .chain(m.function_call.as_ref());
        for call in calls {
            self.estimate();
            self.text(&call.name);
            self.text(&call.arguments);
            self.add(1);
        }
    }

    /// Function definitions as the cookbook renders them: `name:description` per function,
    /// `key:type:description` per property, enum items, and fixed framing.
    fn functions<'v>(&mut self, defs: impl Iterator<Item = &'v Value>, format: &ChatFormat) {
        let mut any = false;
        for def in defs {
            any = true;
            self.add(format.func_init);
            let name = def.get("name").and_then(Value::as_str).unwrap_or("");
            let desc = def.get("description").and_then(Value::as_str).unwrap_or("");
            self.text(&format!(
                "{name}:{}",
                desc.strip_suffix('.').unwrap_or(desc)
            ));
            let props = def
                .get("parameters")
                .and_then(|p| p.get("properties"))
                .and_then(Value::as_object);
            let Some(props) = props.filter(|p| !p.is_empty()) else {
                continue;
            };
            self.add(format.prop_init);
            for (key, prop) in props {
                self.add(format.prop_key);
                if let Some(items) = prop.get("enum").and_then(Value::as_array) {
                    self.add(format.enum_init);
                    for item in items {
                        self.add(format.enum_item);
                        match item.as_str() {
                            Some(s) => self.text(s),
                            None => self.json(item),
                        }
                    }
                }
                let ptype = prop.get("type").and_then(Value::as_str).unwrap_or("");
                let pdesc = prop
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                self.text(&format!(
                    "{key}:{ptype}:{}",
                    pdesc.strip_suffix('.').unwrap_or(pdesc)
                ));
                // Nested schemas are rendered too, by rules OpenAI has not published.
                for nested in ["properties", "items", "anyOf", "oneOf", "allOf"] {
                    if let Some(v) = prop.get(nested) {
                        self.json(v);
                    }
                }
            }
        }
        if any {
            self.add(format.func_end);
        }
    }

    fn finish(self, factor: f64) -> PromptCount {
        let raw = u64::try_from(self.tokens.max(0)).unwrap_or(0);
        let scaled = scale(raw, factor);
        PromptCount {
            tokens: scaled,
            exact: self.exact && factor == 1.0,
        }
    }
}

/// `ceil(raw × factor)`, saturating: a count made with a borrowed encoding, scaled by the
/// model's safety factor.
pub fn scale(raw: u64, factor: f64) -> u64 {
    if factor == 1.0 {
        return raw;
    }
    let scaled = (raw as f64 * factor).ceil();
    if scaled >= u64::MAX as f64 {
        u64::MAX
    } else {
        scaled as u64
    }
}

/// Count the prompt of `body` for a model counted as `model`.
pub fn count_prompt(
    body: &RequestBody,
    model_name: &str,
    model: ModelCounting,
    counter: TextCounter<'_>,
    images: ImageCosts,
) -> PromptCount {
    let mut tally = Tally::new(counter, images);
    if !model.matched {
        tally.estimate();
    }
    let format = ChatFormat::for_model(model_name, model.encoding);
    match body {
        RequestBody::Chat(r) => count_chat(&mut tally, r, &format),
        RequestBody::Completions(r) => {
            tally.text_or_tokens(&r.prompt);
            if let Some(s) = &r.suffix {
                tally.text(s);
            }
        }
        RequestBody::Embeddings(r) => tally.text_or_tokens(&r.input),
        RequestBody::Responses(r) => count_responses(&mut tally, r, &format),
        RequestBody::Anthropic(r) => count_anthropic(&mut tally, r),
    }
    tally.finish(model.safety_factor)
}

/// A conversation's prompt cost split into what each message adds and the rest, before the
/// model's safety factor: the prompt of any subset of the messages (in order) is
/// `scale(fixed + Σ messages[i], factor)`, exactly what [`count_prompt`] gives for the body
/// holding that subset — counting is additive over messages. Lets a truncation try every cut
/// of a conversation in linear time instead of recounting it per cut.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageCosts {
    pub fixed: i64,
    pub messages: Vec<i64>,
    pub factor: f64,
}

impl MessageCosts {
    /// `raw` (the fixed part plus the costs of some messages) as a prompt count: scaled by
    /// the safety factor.
    pub fn prompt(&self, raw: i64) -> u64 {
        scale(u64::try_from(raw.max(0)).unwrap_or(0), self.factor)
    }

    /// The unscaled sum of every message and the fixed part.
    pub fn total(&self) -> i64 {
        self.messages
            .iter()
            .fold(self.fixed, |sum, m| sum.saturating_add(*m))
    }
}

/// The per-message costs of a chat or Anthropic request (`None` for other APIs).
pub fn message_costs(
    body: &RequestBody,
    model_name: &str,
    model: ModelCounting,
    counter: TextCounter<'_>,
    images: ImageCosts,
) -> Option<MessageCosts> {
    let format = ChatFormat::for_model(model_name, model.encoding);
    let one = |f: &mut dyn FnMut(&mut Tally<'_>)| {
        let mut tally = Tally::new(counter, images);
        f(&mut tally);
        tally.tokens
    };
    let (fixed, messages) = match body {
        RequestBody::Chat(r) => (
            one(&mut |t| count_chat_rest(t, r, &format)),
            r.messages
                .iter()
                .map(|m| one(&mut |t| t.chat_message(m, &format)))
                .collect(),
        ),
        RequestBody::Anthropic(r) => (
            one(&mut |t| count_anthropic_rest(t, r)),
            r.messages
                .iter()
                .map(|m| one(&mut |t| anthropic_message(t, m)))
                .collect(),
        ),
        _ => return None,
    };
    Some(MessageCosts {
        fixed,
        messages,
        factor: model.safety_factor,
    })
}

fn count_chat(tally: &mut Tally<'_>, r: &ChatRequest, format: &ChatFormat) {
    for m in &r.messages {
        tally.chat_message(m, format);
    }
    count_chat_rest(tally, r, format);
}

/// Everything of a chat request but its messages.
fn count_chat_rest(tally: &mut Tally<'_>, r: &ChatRequest, format: &ChatFormat) {
    tally.add(format.reply_priming);
    let tool_defs = r
        .tools
        .iter()
        .flatten()
        .filter_map(|t| t.get("function"))
        .chain(r.functions.iter().flatten());
    tally.functions(tool_defs, format);
    // A JSON schema for structured output is added to the prompt by unpublished rules.
    if let Some(schema) = r
        .response_format
        .as_ref()
        .and_then(|f| f.get("json_schema"))
    {
        tally.json(schema);
    }
}

/// The Responses API frames `instructions` and input items like chat messages; the chat
/// rules applied to the equivalent messages are used, and the result marked an estimate.
fn count_responses(tally: &mut Tally<'_>, r: &ResponsesRequest, format: &ChatFormat) {
    tally.estimate();
    if let Some(instructions) = &r.instructions {
        tally.add(format.per_message);
        tally.text("system");
        tally.text(instructions);
    }
    match &r.input {
        Some(ResponsesInput::Text(t)) => {
            tally.add(format.per_message);
            tally.text("user");
            tally.text(t);
        }
        Some(ResponsesInput::Items(items)) => {
            for item in items {
                tally.add(format.per_message);
                if let Some(role) = &item.role {
                    tally.text(role);
                }
                if let Some(c) = &item.content {
                    tally.content(c);
                }
                if let Some(n) = &item.name {
                    tally.text(n);
                }
                if let Some(a) = &item.arguments {
                    tally.text(a);
                }
                match &item.output {
                    Some(Value::String(s)) => tally.text(s),
                    Some(other) => tally.json(other),
                    None => {}
                }
            }
        }
        None => {}
    }
    tally.add(format.reply_priming);
    // Responses tools are flat: `{type: "function", name, description, parameters}`.
    let defs = r
        .tools
        .iter()
        .flatten()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"));
    tally.functions(defs, format);
}

/// Anthropic's tokenizer is private: the text is counted with the borrowed encoding and the
/// model rule's safety factor scales it.
fn count_anthropic(tally: &mut Tally<'_>, r: &AnthropicRequest) {
    for m in &r.messages {
        anthropic_message(tally, m);
    }
    count_anthropic_rest(tally, r);
}

fn anthropic_message(tally: &mut Tally<'_>, m: &AnthropicMessage) {
    tally.add(3);
    tally.text(&m.role);
    tally.anthropic_content(&m.content);
}

/// Everything of an Anthropic request but its messages.
fn count_anthropic_rest(tally: &mut Tally<'_>, r: &AnthropicRequest) {
    tally.estimate();
    if let Some(system) = &r.system {
        tally.anthropic_content(system);
    }
    for tool in r.tools.iter().flatten() {
        tally.json(tool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::api::{parse_request, ApiKind};
    use crate::tokenizer::{tests_support::shared, ModelMap};

    const IMAGES: ImageCosts = ImageCosts { low: 85, high: 765 };

    fn count(kind: ApiKind, body: &str) -> PromptCount {
        let parsed = parse_request(kind, body.as_bytes()).unwrap();
        let model = parsed.model().unwrap_or("gpt-4o").to_string();
        let resolved = ModelMap::builtin(Encoding::O200kBase, 1.0).resolve(&model);
        let counter = shared().counter(resolved.encoding).unwrap();
        count_prompt(&parsed, &model, resolved, counter, IMAGES)
    }

    fn with_model(body: &str, model: &str) -> String {
        body.replacen("MODEL", model, 1)
    }

    /// The cookbook's first worked example (six messages, four with `name`).
    const COOKBOOK_CHAT: &str = r#"{"model":"MODEL","messages":[
        {"role":"system","content":"You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role":"system","name":"example_user","content":"New synergies will help drive top-line growth."},
        {"role":"system","name":"example_assistant","content":"Things working well together will increase revenue."},
        {"role":"system","name":"example_user","content":"Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role":"system","name":"example_assistant","content":"Let's talk later when we're less busy about how to do better."},
        {"role":"user","content":"This late pivot means we don't have time to boil the ocean for the client deliverable."}]}"#;

    /// The cookbook's tools example (one function, two properties, one enum).
    const COOKBOOK_TOOLS: &str = r#"{"model":"MODEL","messages":[
        {"role":"system","content":"You are a helpful assistant that can answer to questions about the weather."},
        {"role":"user","content":"What's the weather like in San Francisco?"}],
      "tools":[{"type":"function","function":{"name":"get_current_weather","description":"Get the current weather in a given location",
        "parameters":{"type":"object","properties":{
          "location":{"type":"string","description":"The city and state, e.g. San Francisco, CA"},
          "unit":{"type":"string","description":"The unit of temperature to return","enum":["celsius","fahrenheit"]}},
        "required":["location"]}}}]}"#;

    #[test]
    fn cookbook_chat_example_matches_api_prompt_tokens_for_cl100k_models() {
        // The OpenAI API reported 129 prompt tokens for gpt-3.5-turbo, gpt-4-0613 and gpt-4.
        for m in ["gpt-3.5-turbo", "gpt-4-0613", "gpt-4"] {
            let c = count(ApiKind::ChatCompletions, &with_model(COOKBOOK_CHAT, m));
            assert_eq!(
                c,
                PromptCount {
                    tokens: 129,
                    exact: true
                },
                "{m}"
            );
        }
    }

    #[test]
    fn cookbook_chat_example_matches_api_prompt_tokens_for_o200k_models() {
        // The OpenAI API reported 124 prompt tokens for gpt-4o and gpt-4o-mini.
        for m in ["gpt-4o", "gpt-4o-mini"] {
            let c = count(ApiKind::ChatCompletions, &with_model(COOKBOOK_CHAT, m));
            assert_eq!(
                c,
                PromptCount {
                    tokens: 124,
                    exact: true
                },
                "{m}"
            );
        }
    }

    #[test]
    fn cookbook_tools_example_matches_api_prompt_tokens() {
        // The OpenAI API reported 105 (gpt-3.5-turbo, gpt-4) and 101 (gpt-4o, gpt-4o-mini).
        for (m, expected) in [
            ("gpt-3.5-turbo", 105),
            ("gpt-4", 105),
            ("gpt-4o", 101),
            ("gpt-4o-mini", 101),
        ] {
            let c = count(ApiKind::ChatCompletions, &with_model(COOKBOOK_TOOLS, m));
            assert_eq!(
                c,
                PromptCount {
                    tokens: expected,
                    exact: true
                },
                "{m}"
            );
        }
    }

    #[test]
    fn legacy_functions_field_counts_like_tools() {
        let tools = count(
            ApiKind::ChatCompletions,
            &with_model(COOKBOOK_TOOLS, "gpt-4o"),
        );
        let v: Value = serde_json::from_str(&with_model(COOKBOOK_TOOLS, "gpt-4o")).unwrap();
        let functions = serde_json::json!({
            "model": "gpt-4o",
            "messages": v["messages"],
            "functions": [v["tools"][0]["function"]],
        });
        assert_eq!(
            count(ApiKind::ChatCompletions, &functions.to_string()),
            tools
        );
    }

    #[test]
    fn single_user_message_costs_framing_role_content_and_priming() {
        // 3 (message) + "user" (1) + "hello" (1) + 3 (priming) = 8.
        let c = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#,
        );
        assert_eq!(
            c,
            PromptCount {
                tokens: 8,
                exact: true
            }
        );
    }

    #[test]
    fn text_parts_count_like_plain_content() {
        let plain = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello there"}]}"#,
        );
        let parts = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"hello there"}]}]}"#,
        );
        assert_eq!(plain, parts);
    }

    #[test]
    fn images_add_their_configured_cost_and_make_the_count_an_estimate() {
        let text = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"what is this"}]}]}"#,
        );
        let low = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"what is this"},{"type":"image_url","image_url":{"url":"https://x/y.png","detail":"low"}}]}]}"#,
        );
        let high = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"what is this"},{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
        );
        assert_eq!(low.tokens, text.tokens + 85);
        assert_eq!(high.tokens, text.tokens + 765);
        assert!(!low.exact && !high.exact);
    }

    #[test]
    fn response_format_schema_is_counted_as_an_estimate() {
        let plain = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}"#,
        );
        let schema = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"r","schema":{"type":"object"}}}}"#,
        );
        assert!(schema.tokens > plain.tokens);
        assert!(!schema.exact);
        let json_mode = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#,
        );
        assert_eq!(json_mode, plain);
    }

    #[test]
    fn tool_results_and_earlier_tool_calls_are_counted() {
        let base = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"weather?"}]}"#,
        );
        let turn = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"weather?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"sunny"}]}"#,
        );
        assert!(turn.tokens > base.tokens + 10, "{turn:?} vs {base:?}");
        assert!(!turn.exact);
    }

    #[test]
    fn completions_prompt_forms_count_text_and_token_ids() {
        assert_eq!(
            count(
                ApiKind::Completions,
                r#"{"model":"gpt-4o","prompt":"tiktoken is great!"}"#
            )
            .tokens,
            6
        );
        assert_eq!(
            count(
                ApiKind::Completions,
                r#"{"model":"gpt-4o","prompt":["tiktoken is great!","tiktoken is great!"]}"#
            )
            .tokens,
            12
        );
        assert_eq!(
            count(
                ApiKind::Completions,
                r#"{"model":"gpt-4o","prompt":[1,2,3,4]}"#
            )
            .tokens,
            4
        );
        assert_eq!(
            count(
                ApiKind::Completions,
                r#"{"model":"gpt-4o","prompt":[[1,2],[3]]}"#
            )
            .tokens,
            3
        );
    }

    #[test]
    fn embeddings_count_each_input_without_framing() {
        let c = count(
            ApiKind::Embeddings,
            r#"{"model":"text-embedding-3-small","input":["antidisestablishmentarianism","tiktoken is great!"]}"#,
        );
        assert_eq!(
            c,
            PromptCount {
                tokens: 12,
                exact: true
            }
        );
    }

    #[test]
    fn responses_string_input_counts_like_a_user_message_estimate() {
        let chat = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello"}]}"#,
        );
        let resp = count(
            ApiKind::Responses,
            r#"{"model":"gpt-4o","instructions":"be brief","input":"hello"}"#,
        );
        assert_eq!(resp.tokens, chat.tokens);
        assert!(!resp.exact);
        let items = count(
            ApiKind::Responses,
            r#"{"model":"gpt-4o","instructions":"be brief","input":[{"role":"user","content":[{"type":"input_text","text":"hello"}]}]}"#,
        );
        assert_eq!(items.tokens, chat.tokens);
    }

    #[test]
    fn responses_flat_function_tools_count_like_chat_tools() {
        let chat_tools = count(
            ApiKind::ChatCompletions,
            &with_model(COOKBOOK_TOOLS, "gpt-4o"),
        );
        let chat_plain = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-4o","messages":[
            {"role":"system","content":"You are a helpful assistant that can answer to questions about the weather."},
            {"role":"user","content":"What's the weather like in San Francisco?"}]}"#,
        );
        let v: Value = serde_json::from_str(&with_model(COOKBOOK_TOOLS, "gpt-4o")).unwrap();
        let mut flat = v["tools"][0]["function"].clone();
        flat["type"] = Value::from("function");
        let resp = serde_json::json!({
            "model": "gpt-4o",
            "instructions": "You are a helpful assistant that can answer to questions about the weather.",
            "input": "What's the weather like in San Francisco?",
            "tools": [flat, {"type": "web_search"}],
        });
        let resp = count(ApiKind::Responses, &resp.to_string());
        assert_eq!(resp.tokens - count(ApiKind::Responses, r#"{"model":"gpt-4o","instructions":"You are a helpful assistant that can answer to questions about the weather.","input":"What's the weather like in San Francisco?"}"#).tokens,
                   chat_tools.tokens - chat_plain.tokens);
    }

    #[test]
    fn anthropic_counts_system_messages_and_tools_with_the_safety_factor() {
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":100,"system":"be brief",
            "messages":[{"role":"user","content":"hello"},{"role":"assistant","content":[{"type":"text","text":"hi"}]}],
            "tools":[{"name":"get_weather","description":"weather","input_schema":{"type":"object"}}]}"#;
        let parsed = parse_request(ApiKind::AnthropicMessages, body.as_bytes()).unwrap();
        let map = ModelMap::builtin(Encoding::Cl100kBase, 1.25);
        let resolved = map.resolve("claude-sonnet-4-5");
        let counter = shared().counter(resolved.encoding).unwrap();
        let plain = count_prompt(
            &parsed,
            "claude-sonnet-4-5",
            ModelCounting {
                safety_factor: 1.0,
                ..resolved
            },
            counter,
            IMAGES,
        );
        let scaled = count_prompt(&parsed, "claude-sonnet-4-5", resolved, counter, IMAGES);
        assert!(!plain.exact && !scaled.exact);
        assert_eq!(scaled.tokens, (plain.tokens as f64 * 1.25).ceil() as u64);
        assert!(plain.tokens > 20);
    }

    #[test]
    fn unknown_model_counts_are_estimates() {
        let c = count(
            ApiKind::ChatCompletions,
            r#"{"model":"llama-3-70b","messages":[{"role":"user","content":"hello"}]}"#,
        );
        assert_eq!(
            c,
            PromptCount {
                tokens: 8,
                exact: false
            }
        );
    }

    #[test]
    fn gpt_35_turbo_0301_uses_its_own_framing() {
        // 4 per message, and a name costs -1: the name replaces the role.
        let c = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-3.5-turbo-0301","messages":[{"role":"user","name":"bob","content":"hello"}]}"#,
        );
        let c2 = count(
            ApiKind::ChatCompletions,
            r#"{"model":"gpt-3.5-turbo","messages":[{"role":"user","name":"bob","content":"hello"}]}"#,
        );
        assert_eq!(c.tokens, c2.tokens + 1 - 2);
    }

    #[test]
    fn scale_rounds_up_and_saturates() {
        assert_eq!(scale(10, 1.25), 13);
        assert_eq!(scale(u64::MAX, 2.0), u64::MAX);
        assert_eq!(scale(7, 1.0), 7);
    }
}
