//! One LLM exchange, request to response: the filter's whole behaviour for an HTTP stream.
//!
//! Request headers decide whether the stream is an LLM call (a POST to a known API path);
//! if it is, the request is held until its body is complete (the plugin config must set
//! `allow_on_headers_stop_iteration`), the body is parsed and its prompt counted, and the
//! request goes on with `x-tokenfuse-prompt-tokens` promised for the response. The
//! response is read without delaying it: JSON bodies are copied chunk by chunk (up to a cap)
//! and their `usage` read at the end; SSE streams are decoded chunk by chunk. When the
//! stream ends — cleanly, cut by the upstream, or abandoned by the client — the exchange is
//! settled once, into stats.
//!
//! Every outcome is explicit: unreadable request bodies follow the configured
//! [`MalformedPolicy`]; anything the filter cannot read in a response is counted as a parse
//! failure and settled with the filter's own counts.

use std::rc::Rc;

use crate::api::{self, ApiKind, RequestBody, RequestError};
use crate::config::MalformedPolicy;
use crate::filter::Filter;
use crate::host::{Host, Level};
use crate::prompt::{count_prompt, ImageCosts, PromptCount};
use crate::sse::{SseDecoder, StreamMeter};
use crate::stats::Stat;
use crate::tokens::{ModelCounting, TextCounter};
use crate::usage::{usage_from_json, UsageError, UsageReport};

/// Response header carrying the filter's prompt count.
pub const PROMPT_TOKENS_HEADER: &str = "x-tokenfuse-prompt-tokens";

/// What the glue tells Envoy after a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let the stream go on.
    Continue,
    /// Hold it (headers: until the body is complete; body: keep buffering).
    Pause,
}

/// One HTTP stream through the filter.
pub struct Exchange {
    filter: Rc<Filter>,
    id: u32,
    phase: Phase,
}

enum Phase {
    /// Not an LLM call, or already settled: the filter stays out of the way.
    Idle,
    /// An LLM call whose request body is still arriving.
    AwaitingBody { kind: ApiKind, path: String },
    /// Forwarded; the response is being read.
    Forwarded(Box<Call>),
}

/// What the filter knows about a forwarded LLM call.
struct Call {
    kind: ApiKind,
    model_tag: String,
    counting: ModelCounting,
    prompt: PromptCount,
    response: Response,
    cluster: Option<String>,
}

enum Response {
    /// No response headers yet.
    Pending,
    /// A non-streaming body, copied as it passes.
    Json { body: Vec<u8>, overflowed: bool },
    /// An event stream, decoded as it passes.
    Stream {
        decoder: SseDecoder,
        meter: StreamMeter,
    },
    /// The provider answered with an error (nothing is billed).
    UpstreamError { status: u32 },
    /// A body the filter cannot read (content-encoded).
    Unreadable,
}

/// How a settled exchange's tokens are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Provider,
    Counted,
}

impl Source {
    fn tag(self) -> &'static str {
        match self {
            Source::Provider => "provider",
            Source::Counted => "counted",
        }
    }
}

impl Exchange {
    /// A new exchange for the HTTP context `id`.
    pub fn new(filter: Rc<Filter>, id: u32) -> Self {
        Exchange {
            filter,
            id,
            phase: Phase::Idle,
        }
    }

    /// Request headers arrived.
    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Action {
        let method = host.request_header(":method").unwrap_or_default();
        let path = host.request_header(":path").unwrap_or_default();
        let kind = match ApiKind::from_path(&path) {
            Some(kind) if method.eq_ignore_ascii_case("POST") => kind,
            _ => {
                host.counter_add(Stat::new("passthrough").tag("reason", "not_llm").name(), 1);
                return Action::Continue;
            }
        };
        if end_of_stream {
            return self.malformed(host, kind, &RequestError::Empty, false);
        }
        if let Some(encoding) = host.request_header("content-encoding") {
            if !encoding.eq_ignore_ascii_case("identity") {
                return self.unreadable_encoding(host, kind);
            }
        }
        // Ask the provider for an uncompressed response: its usage must be readable.
        host.set_request_header("accept-encoding", None);
        self.phase = Phase::AwaitingBody { kind, path };
        Action::Pause
    }

    /// A request body chunk arrived; `body_size` is everything buffered so far.
    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let (kind, path) = match &self.phase {
            Phase::AwaitingBody { kind, path } => (*kind, path.clone()),
            _ => return Action::Continue,
        };
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host.request_body(body_size).unwrap_or_default();
        let parsed = match api::parse_request(kind, &body) {
            Ok(parsed) => parsed,
            Err(e) => return self.malformed(host, kind, &e, true),
        };
        let model = parsed
            .model()
            .or_else(|| api::azure_deployment(&path))
            .unwrap_or("unknown")
            .to_string();
        let counting = self.filter.config.models.resolve(&model);
        let Some(counter) = self.filter.tokenizers.counter(counting.encoding) else {
            // Cannot happen with a validated config (its encodings are all built); if it
            // does, the request is not worth failing for it.
            host.log(
                Level::Error,
                &format!(
                    "#{} no tokenizer for {}; passing through",
                    self.id, counting.encoding
                ),
            );
            host.counter_add(Stat::new("passthrough").tag("reason", "internal").name(), 1);
            self.phase = Phase::Idle;
            return Action::Continue;
        };
        let config = &self.filter.config;
        let images = ImageCosts {
            low: config.image_tokens_low,
            high: config.image_tokens_high,
        };
        let prompt = count_prompt(&parsed, &model, counting, counter, images);
        let stream = parsed.stream();
        if config.inject_stream_usage {
            self.inject_stream_usage(host, &body, &parsed);
        }
        host.log(
            Level::Debug,
            &format!(
                "#{} {} model={} encoding={} prompt_tokens={} exact={} stream={} max_output={}",
                self.id,
                kind.tag(),
                crate::stats::sanitize(&model),
                counting.encoding,
                prompt.tokens,
                prompt.exact,
                stream,
                parsed
                    .max_output_tokens()
                    .unwrap_or(config.default_max_output_tokens)
            ),
        );
        self.phase = Phase::Forwarded(Box::new(Call {
            kind,
            model_tag: self.filter.model_tag(&model),
            counting,
            prompt,
            response: Response::Pending,
            cluster: None,
        }));
        Action::Continue
    }

    fn inject_stream_usage(&self, host: &mut dyn Host, body: &[u8], parsed: &RequestBody) {
        if let Some(new_body) = api::with_stream_usage(body, parsed) {
            host.replace_request_body(body.len(), &new_body);
            // Envoy does not fix content-length when a filter replaces the body.
            host.set_request_header("content-length", Some(&new_body.len().to_string()));
        }
    }

    /// Response headers arrived.
    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Action {
        let Phase::Forwarded(call) = &mut self.phase else {
            return Action::Continue;
        };
        host.set_response_header(PROMPT_TOKENS_HEADER, Some(&call.prompt.tokens.to_string()));
        call.cluster = host.upstream_cluster();
        let status = host
            .response_header(":status")
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        let content_type = host.response_header("content-type").unwrap_or_default();
        let encoded = host
            .response_header("content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case("identity"));
        let config = &self.filter.config;
        call.response = if !(200..300).contains(&status) {
            Response::UpstreamError { status }
        } else if encoded {
            Response::Unreadable
        } else if content_type
            .to_ascii_lowercase()
            .starts_with("text/event-stream")
        {
            Response::Stream {
                decoder: SseDecoder::new(config.max_stream_text_bytes),
                meter: StreamMeter::new(call.kind, config.max_stream_text_bytes),
            }
        } else {
            Response::Json {
                body: Vec::new(),
                overflowed: false,
            }
        };
        if end_of_stream {
            self.settle(host, true);
        }
        Action::Continue
    }

    /// A response body chunk of `body_size` bytes arrived. Never delays it.
    pub fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let Phase::Forwarded(call) = &mut self.phase else {
            return Action::Continue;
        };
        let max_json = self.filter.config.max_response_body_bytes;
        match &mut call.response {
            Response::Json { body, overflowed } if !*overflowed && body_size > 0 => {
                if body.len() + body_size > max_json {
                    *overflowed = true;
                    *body = Vec::new();
                } else if let Some(chunk) = host.response_body(body_size) {
                    body.extend_from_slice(&chunk);
                }
            }
            Response::Stream { decoder, meter } if body_size > 0 => {
                if let Some(chunk) = host.response_body(body_size) {
                    if let Some(counter) = self.filter.tokenizers.counter(call.counting.encoding) {
                        decoder.feed(&chunk, |event, data| meter.on_event(event, data, counter));
                    }
                }
            }
            _ => {}
        }
        if end_of_stream {
            self.settle(host, true);
        }
        Action::Continue
    }

    /// The stream is over (completed, reset or abandoned). Settles anything not yet settled.
    pub fn on_done(&mut self, host: &mut dyn Host) {
        self.settle(host, false);
    }

    /// Settle the exchange into stats, exactly once.
    fn settle(&mut self, host: &mut dyn Host, ended: bool) {
        let Phase::Forwarded(mut call) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let cluster = call
            .cluster
            .clone()
            .or_else(|| host.upstream_cluster())
            .unwrap_or_else(|| "none".to_string());
        let model = call.model_tag.clone();
        let tagged = |name: &str| {
            Stat::new(name)
                .tag("model", &model)
                .tag("cluster", &cluster)
        };
        host.counter_add(
            Stat::new("requests")
                .tag("api", call.kind.tag())
                .tag("model", &model)
                .tag("cluster", &cluster)
                .name(),
            1,
        );
        add(host, &tagged("request_prompt_tokens"), call.prompt.tokens);
        if !call.prompt.exact {
            host.counter_add(tagged("prompt_estimates").name(), 1);
        }
        let counter = self.filter.tokenizers.counter(call.counting.encoding);
        let settled = match std::mem::replace(&mut call.response, Response::Pending) {
            Response::Pending => {
                host.counter_add(tagged("no_response").name(), 1);
                None
            }
            Response::UpstreamError { status } => {
                let class = format!("{}xx", status / 100);
                host.counter_add(tagged("upstream_errors").tag("status", &class).name(), 1);
                None
            }
            Response::Unreadable => {
                self.parse_failure(host, call.kind, "encoded");
                Some((Source::Counted, call.prompt.tokens, 0))
            }
            Response::Json {
                overflowed: true, ..
            } => {
                self.parse_failure(host, call.kind, "too_large");
                Some((Source::Counted, call.prompt.tokens, 0))
            }
            Response::Json { body, .. } if !ended => {
                // The client or upstream went away mid-body: what arrived may not parse.
                let _ = body;
                host.counter_add(tagged("responses_incomplete").name(), 1);
                Some((Source::Counted, call.prompt.tokens, 0))
            }
            Response::Json { body, .. } => {
                let anthropic = call.kind == ApiKind::AnthropicMessages;
                match usage_from_json(&body, anthropic) {
                    Ok(u) => Some(provider(u)),
                    Err(UsageError::Missing) => {
                        let output = counter
                            .map(|c| scaled(&call, json_output_tokens(&body, c)))
                            .unwrap_or(0);
                        Some((Source::Counted, call.prompt.tokens, output))
                    }
                    Err(UsageError::NotJson) => {
                        self.parse_failure(host, call.kind, "json");
                        Some((Source::Counted, call.prompt.tokens, 0))
                    }
                }
            }
            Response::Stream { mut meter, .. } => match counter {
                Some(c) => {
                    let outcome = meter.finish(c);
                    if outcome.bad_events > 0 {
                        self.parse_failure(host, call.kind, "sse_event");
                    }
                    if !outcome.complete {
                        host.counter_add(tagged("responses_incomplete").name(), 1);
                    }
                    match outcome.reported {
                        // A stream cut after its usage arrived is billed as reported.
                        Some(u) => Some(provider(u)),
                        None => Some((
                            Source::Counted,
                            call.prompt.tokens,
                            scaled(&call, outcome.counted_output),
                        )),
                    }
                }
                None => None,
            },
        };
        if let Some((source, prompt, completion)) = settled {
            if source == Source::Counted {
                host.counter_add(tagged("usage_counted").name(), 1);
            }
            for (kind, n) in [("prompt", prompt), ("completion", completion)] {
                let stat = Stat::new("tokens")
                    .tag("kind", kind)
                    .tag("source", source.tag())
                    .tag("model", &model)
                    .tag("cluster", &cluster);
                add(host, &stat, n);
            }
            host.log(
                Level::Debug,
                &format!(
                    "#{} settled {} prompt={} completion={} source={}",
                    self.id,
                    call.kind.tag(),
                    prompt,
                    completion,
                    source.tag()
                ),
            );
        }
    }

    fn parse_failure(&self, host: &mut dyn Host, kind: ApiKind, reason: &str) {
        host.counter_add(
            Stat::new("parse_failures")
                .tag("stage", "response")
                .tag("api", kind.tag())
                .tag("reason", reason)
                .name(),
            1,
        );
    }

    /// An LLM request whose body cannot be read.
    fn malformed(
        &mut self,
        host: &mut dyn Host,
        kind: ApiKind,
        error: &RequestError,
        headers_sent_on: bool,
    ) -> Action {
        self.phase = Phase::Idle;
        let policy = self.filter.config.malformed_request;
        host.counter_add(
            Stat::new("parse_failures")
                .tag("stage", "request")
                .tag("api", kind.tag())
                .tag("reason", error_reason(error))
                .name(),
            1,
        );
        host.log(
            Level::Info,
            &format!(
                "#{} unreadable {} request ({}): {}",
                self.id,
                kind.tag(),
                match policy {
                    MalformedPolicy::Reject => "rejected",
                    MalformedPolicy::Pass => "passed",
                },
                error
            ),
        );
        match policy {
            MalformedPolicy::Pass => {
                host.counter_add(
                    Stat::new("passthrough").tag("reason", "malformed").name(),
                    1,
                );
                Action::Continue
            }
            MalformedPolicy::Reject => {
                let _ = headers_sent_on;
                send_error(
                    host,
                    400,
                    &format!("tokenfuse: {error}"),
                    "invalid_request_error",
                    error_code(error),
                );
                Action::Pause
            }
        }
    }

    fn unreadable_encoding(&mut self, host: &mut dyn Host, kind: ApiKind) -> Action {
        self.phase = Phase::Idle;
        host.counter_add(
            Stat::new("parse_failures")
                .tag("stage", "request")
                .tag("api", kind.tag())
                .tag("reason", "encoded")
                .name(),
            1,
        );
        match self.filter.config.malformed_request {
            MalformedPolicy::Pass => {
                host.counter_add(
                    Stat::new("passthrough").tag("reason", "malformed").name(),
                    1,
                );
                Action::Continue
            }
            MalformedPolicy::Reject => {
                send_error(
                    host,
                    415,
                    "tokenfuse: compressed request bodies cannot be counted; send the body uncompressed",
                    "invalid_request_error",
                    "unsupported_content_encoding",
                );
                Action::Pause
            }
        }
    }
}

fn provider(u: UsageReport) -> (Source, u64, u64) {
    (Source::Provider, u.input, u.output)
}

/// Scale a count made with a borrowed encoding by the model's safety factor.
fn scaled(call: &Call, raw: u64) -> u64 {
    let f = call.counting.safety_factor;
    if f == 1.0 {
        raw
    } else {
        (raw as f64 * f).ceil() as u64
    }
}

fn add(host: &mut dyn Host, stat: &Stat, n: u64) {
    // Envoy rejects counter increments of zero.
    if n > 0 {
        host.counter_add(stat.name(), n);
    }
}

/// Tokens of the generated text in a JSON response that carries no usage.
fn json_output_tokens(body: &[u8], counter: TextCounter<'_>) -> u64 {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    let mut total = 0u64;
    let mut count = |t: Option<&str>| {
        if let Some(t) = t {
            total = total.saturating_add(counter.count(t));
        }
    };
    // Chat / completions.
    for choice in v["choices"].as_array().into_iter().flatten() {
        count(choice["message"]["content"].as_str());
        count(choice["text"].as_str());
        for call in choice["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            count(call["function"]["name"].as_str());
            count(call["function"]["arguments"].as_str());
        }
    }
    // Responses API.
    for item in v["output"].as_array().into_iter().flatten() {
        for part in item["content"].as_array().into_iter().flatten() {
            count(part["text"].as_str());
        }
        count(item["arguments"].as_str());
    }
    // Anthropic.
    for block in v["content"].as_array().into_iter().flatten() {
        count(block["text"].as_str());
        if let Some(input) = block.get("input") {
            count(Some(&input.to_string()));
        }
    }
    total
}

fn error_reason(e: &RequestError) -> &'static str {
    match e {
        RequestError::Empty => "empty",
        RequestError::Syntax { .. } => "json",
        RequestError::Shape { .. } => "shape",
        RequestError::Invalid { .. } => "invalid",
    }
}

fn error_code(e: &RequestError) -> &'static str {
    match e {
        RequestError::Empty => "empty_body",
        RequestError::Syntax { .. } => "invalid_json",
        RequestError::Shape { .. } => "invalid_request_shape",
        RequestError::Invalid { .. } => "invalid_value",
    }
}

/// An OpenAI-style error reply: `{"error":{"message","type","param","code"}}`.
fn send_error(host: &mut dyn Host, status: u32, message: &str, kind: &str, code: &str) {
    // Written by hand to keep OpenAI's field order (serde_json's map would sort the keys).
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let body = format!(
        r#"{{"error":{{"message":{},"type":{},"param":null,"code":{}}}}}"#,
        quote(message),
        quote(kind),
        quote(code)
    );
    host.send_reply(
        status,
        &[
            ("content-type", "application/json"),
            ("x-tokenfuse-error", code),
        ],
        body.as_bytes(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::host::fake::FakeHost;

    fn filter(config: &str) -> Rc<Filter> {
        Rc::new(Filter::new(Config::parse(config.as_bytes()).unwrap()).unwrap())
    }

    fn default_filter() -> Rc<Filter> {
        filter(r#"{"api":"v1"}"#)
    }

    const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#;

    /// Drive a request through headers and a body delivered in `split`-byte chunks.
    fn send_request(ex: &mut Exchange, host: &mut FakeHost, split: usize) -> Action {
        let body = host.request_body.clone();
        let a = ex.on_request_headers(host, body.is_empty());
        if a == Action::Continue || host.reply.is_some() {
            return a;
        }
        let mut buffered = 0;
        let chunks: Vec<&[u8]> = body.chunks(split.max(1)).collect();
        for (i, c) in chunks.iter().enumerate() {
            buffered += c.len();
            let last = i + 1 == chunks.len();
            let a = ex.on_request_body(host, buffered, last);
            if last || host.reply.is_some() {
                return a;
            }
            assert_eq!(a, Action::Pause, "partial bodies must be buffered");
        }
        Action::Continue
    }

    fn respond(
        ex: &mut Exchange,
        host: &mut FakeHost,
        status: &str,
        content_type: &str,
        body: &[u8],
        split: usize,
    ) {
        host.response_headers = vec![
            (":status".into(), status.into()),
            ("content-type".into(), content_type.into()),
        ];
        assert_eq!(
            ex.on_response_headers(host, body.is_empty()),
            Action::Continue
        );
        let chunks: Vec<&[u8]> = body.chunks(split.max(1)).collect();
        for (i, c) in chunks.iter().enumerate() {
            host.response_chunk = c.to_vec();
            assert_eq!(
                ex.on_response_body(host, c.len(), i + 1 == chunks.len()),
                Action::Continue
            );
        }
        ex.on_done(host);
    }

    fn tokens(host: &FakeHost, kind: &str, source: &str) -> u64 {
        host.counter_sum(
            "tokenfuse_tokens",
            &[&format!("kind=.={kind};"), &format!("source=.={source};")],
        )
    }

    #[test]
    fn non_llm_requests_pass_untouched_and_are_counted() {
        let f = default_filter();
        for (method, path) in [
            ("GET", "/v1/models"),
            ("GET", "/v1/chat/completions"),
            ("POST", "/upload"),
        ] {
            let mut host = FakeHost::post(path, b"{}");
            host.request_headers[0].1 = method.into();
            let before = host.request_headers.clone();
            let mut ex = Exchange::new(f.clone(), 1);
            assert_eq!(ex.on_request_headers(&mut host, false), Action::Continue);
            assert_eq!(ex.on_request_body(&mut host, 2, true), Action::Continue);
            host.response_headers = vec![(":status".into(), "200".into())];
            ex.on_response_headers(&mut host, true);
            assert_eq!(host.request_headers, before);
            assert!(host.resp_header(PROMPT_TOKENS_HEADER).is_none());
        }
        let mut host = FakeHost::post("/x", b"");
        host.request_headers[0].1 = "GET".into();
        Exchange::new(f, 2).on_request_headers(&mut host, true);
        assert_eq!(host.counter("tokenfuse_passthrough.reason=.=not_llm;.;"), 1);
    }

    #[test]
    fn chat_request_is_held_until_its_body_is_complete_then_counted() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        host.request_headers
            .push(("accept-encoding".into(), "gzip".into()));
        let mut ex = Exchange::new(f, 1);
        assert_eq!(ex.on_request_headers(&mut host, false), Action::Pause);
        assert!(host.req_header("accept-encoding").is_none());
        assert_eq!(ex.on_request_body(&mut host, 10, false), Action::Pause);
        assert_eq!(
            ex.on_request_body(&mut host, CHAT.len(), true),
            Action::Continue
        );
        respond(
            &mut ex,
            &mut host,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":3}}"#,
            7,
        );
        assert_eq!(host.resp_header(PROMPT_TOKENS_HEADER).as_deref(), Some("8"));
        assert_eq!(tokens(&host, "prompt", "provider"), 8);
        assert_eq!(tokens(&host, "completion", "provider"), 3);
        assert_eq!(
            host.counter_sum(
                "tokenfuse_requests",
                &["api=.=chat;", "model=.=gpt-4o;", "cluster=.=primary;"]
            ),
            1
        );
        assert_eq!(host.counter_sum("tokenfuse_request_prompt_tokens", &[]), 8);
        assert_eq!(host.counter_sum("tokenfuse_usage_counted", &[]), 0);
    }

    #[test]
    fn json_response_without_usage_counts_the_generated_text() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 5);
        respond(
            &mut ex,
            &mut host,
            "200",
            "application/json",
            br#"{"choices":[{"message":{"role":"assistant","content":"tiktoken is great!"}}]}"#,
            3,
        );
        assert_eq!(tokens(&host, "prompt", "counted"), 8);
        assert_eq!(tokens(&host, "completion", "counted"), 6);
        assert_eq!(host.counter_sum("tokenfuse_usage_counted", &[]), 1);
    }

    #[test]
    fn sse_usage_is_read_at_every_chunk_size() {
        let f = default_filter();
        let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"日本語\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
            let mut ex = Exchange::new(f.clone(), 1);
            send_request(&mut ex, &mut host, 64);
            respond(
                &mut ex,
                &mut host,
                "200",
                "text/event-stream; charset=utf-8",
                stream.as_bytes(),
                split,
            );
            assert_eq!(tokens(&host, "completion", "provider"), 4, "split {split}");
            assert_eq!(
                host.counter_sum("tokenfuse_parse_failures", &[]),
                0,
                "split {split}"
            );
        }
    }

    #[test]
    fn stream_usage_is_injected_with_a_fixed_content_length() {
        let f = filter(r#"{"api":"v1","inject_stream_usage":true}"#);
        let body =
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
        let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 1000);
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(
            host.req_header("content-length"),
            Some(host.request_body.len().to_string())
        );
    }

    #[test]
    fn malformed_body_is_rejected_with_an_openai_error_by_default() {
        let f = default_filter();
        for (body, code) in [
            ("{\"model\":", "invalid_json"),
            ("{\"model\":\"gpt-4o\"}", "invalid_request_shape"),
            ("{\"messages\":[],\"max_tokens\":-1}", "invalid_value"),
        ] {
            let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
            let mut ex = Exchange::new(f.clone(), 1);
            send_request(&mut ex, &mut host, 4);
            let reply = host.reply.clone().expect("a local reply");
            assert_eq!(reply.status, 400);
            assert_eq!(reply.header("content-type"), Some("application/json"));
            let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert_eq!(v["error"]["code"], code);
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("tokenfuse: "));
        }
    }

    #[test]
    fn empty_body_on_an_llm_path_is_rejected() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", b"");
        let mut ex = Exchange::new(f, 1);
        ex.on_request_headers(&mut host, true);
        assert_eq!(host.reply.as_ref().map(|r| r.status), Some(400));
        assert_eq!(
            host.counter(
                "tokenfuse_parse_failures.stage=.=request;.;api=.=chat;.;reason=.=empty;.;"
            ),
            1
        );
    }

    #[test]
    fn malformed_body_passes_when_configured_to() {
        let f = filter(r#"{"api":"v1","malformed_request":"pass"}"#);
        let mut host = FakeHost::post("/v1/chat/completions", b"not json");
        let mut ex = Exchange::new(f, 1);
        assert_eq!(send_request(&mut ex, &mut host, 3), Action::Continue);
        assert!(host.reply.is_none());
        assert_eq!(host.request_body, b"not json");
        respond(&mut ex, &mut host, "400", "application/json", b"{}", 10);
        assert!(host.resp_header(PROMPT_TOKENS_HEADER).is_none());
        assert_eq!(
            host.counter("tokenfuse_passthrough.reason=.=malformed;.;"),
            1
        );
    }

    #[test]
    fn compressed_request_body_is_refused_with_415() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", b"\x1f\x8b...");
        host.request_headers
            .push(("content-encoding".into(), "gzip".into()));
        let mut ex = Exchange::new(f, 1);
        ex.on_request_headers(&mut host, false);
        assert_eq!(host.reply.as_ref().map(|r| r.status), Some(415));
    }

    #[test]
    fn upstream_errors_bill_nothing() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 100);
        respond(
            &mut ex,
            &mut host,
            "503",
            "application/json",
            br#"{"error":{"message":"overloaded"}}"#,
            100,
        );
        assert_eq!(host.counter_sum("tokenfuse_tokens", &[]), 0);
        assert_eq!(
            host.counter_sum("tokenfuse_upstream_errors", &["status=.=5xx;"]),
            1
        );
        assert_eq!(host.resp_header(PROMPT_TOKENS_HEADER).as_deref(), Some("8"));
    }

    #[test]
    fn cut_stream_is_settled_once_with_what_was_streamed() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 100);
        host.response_headers = vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "text/event-stream".into()),
        ];
        ex.on_response_headers(&mut host, false);
        host.response_chunk = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tiktoken is great!\"}}]}\n\ndata: {\"cho".to_vec();
        let n = host.response_chunk.len();
        ex.on_response_body(&mut host, n, false);
        ex.on_done(&mut host);
        ex.on_done(&mut host);
        assert_eq!(tokens(&host, "completion", "counted"), 6);
        assert_eq!(host.counter_sum("tokenfuse_requests", &[]), 1);
        assert_eq!(host.counter_sum("tokenfuse_responses_incomplete", &[]), 1);
    }

    #[test]
    fn oversized_json_response_is_a_parse_failure_not_a_buffer() {
        let f = filter(r#"{"api":"v1","max_response_body_bytes":1024}"#);
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 100);
        let big = format!(
            "{{\"x\":\"{}\",\"usage\":{{\"prompt_tokens\":1}}}}",
            "a".repeat(4000)
        );
        respond(
            &mut ex,
            &mut host,
            "200",
            "application/json",
            big.as_bytes(),
            500,
        );
        assert_eq!(
            host.counter_sum("tokenfuse_parse_failures", &["reason=.=too_large;"]),
            1
        );
        assert_eq!(tokens(&host, "prompt", "counted"), 8);
    }

    #[test]
    fn model_from_azure_deployment_when_body_has_none() {
        let f = default_filter();
        let body = r#"{"messages":[{"role":"user","content":"hello"}]}"#;
        let mut host = FakeHost::post(
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            body.as_bytes(),
        );
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 100);
        respond(
            &mut ex,
            &mut host,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":1}}"#,
            100,
        );
        assert_eq!(
            host.counter_sum("tokenfuse_requests", &["model=.=gpt-4o;"]),
            1
        );
    }

    #[test]
    fn logs_never_contain_prompt_or_completion_text() {
        let f = default_filter();
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"SECRET-PROMPT sk-live-123"}]}"#;
        let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut host, 100);
        respond(&mut ex, &mut host, "200", "text/event-stream", b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"SECRET-COMPLETION\"}}]}\n\n", 9);
        let mut bad = FakeHost::post(
            "/v1/chat/completions",
            br#"{"model":"gpt-4o","messages":"SECRET-PROMPT"}"#,
        );
        send_request(&mut Exchange::new(f, 2), &mut bad, 100);
        for log in [host.log_text(), bad.log_text()] {
            assert!(!log.contains("SECRET") && !log.contains("sk-live"), "{log}");
        }
    }

    #[test]
    fn client_model_names_are_capped_in_stat_tags() {
        let f = filter(r#"{"api":"v1","stats":{"model_tag_limit":2}}"#);
        let mut host = FakeHost::default();
        for m in ["a", "b", "c", "d"] {
            let body = format!(r#"{{"model":"{m}","messages":[]}}"#);
            let mut h = FakeHost::post("/v1/chat/completions", body.as_bytes());
            let mut ex = Exchange::new(f.clone(), 1);
            send_request(&mut ex, &mut h, 100);
            respond(&mut ex, &mut h, "200", "application/json", b"{}", 100);
            for (k, v) in h.counters {
                *host.counters.entry(k).or_default() += v;
            }
        }
        assert_eq!(
            host.counter_sum("tokenfuse_requests", &["model=.=other;"]),
            2
        );
    }
}
