//! The response phase: the answer is read as it passes, never delayed, and when it ends —
//! completed, cut by the upstream or abandoned by the client — it becomes what the
//! exchange is [`Billed`].
//!
//! JSON bodies are copied chunk by chunk (up to `max_response_body_bytes`) and their
//! `usage` read at the end; SSE streams are decoded chunk by chunk and metered event by
//! event. An error status bills nothing; a body the filter cannot read keeps the
//! reservation (the provider billed something the filter cannot see).

use crate::config::{AbandonedPolicy, Config};
use crate::host::Host;
use crate::llm::api::ApiKind;
use crate::llm::prompt::{scale, PromptCount};
use crate::llm::sse::{SseDecoder, StreamMeter};
use crate::llm::usage::{usage_from_json, UsageError, UsageReport};
use crate::tokenizer::{ModelCounting, TextCounter};

/// What a settled exchange is billed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Billed {
    /// Nothing: the provider answered with an error, or was never asked.
    Nothing,
    /// Known usage.
    Usage { source: Source, usage: UsageReport },
    /// The prompt is known, the output is not (an unreadable response, a client gone
    /// before the answer): the budgets keep the reservation, the stats record the prompt.
    Unknown,
}

/// How a settled exchange's tokens are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    Provider,
    Counted,
}

impl Source {
    /// The stat tag.
    pub fn tag(self) -> &'static str {
        match self {
            Source::Provider => "provider",
            Source::Counted => "counted",
        }
    }
}

/// Something about the response worth a stat, seen while metering it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Note {
    /// The client left before the response headers.
    NoResponse,
    /// The upstream answered with an error status (its class, `5xx`).
    UpstreamError(String),
    /// The response could not be read (the `reason` tag).
    ParseFailure(&'static str),
    /// The response was cut before its end.
    Incomplete,
}

/// A response being read.
pub(super) enum Meter {
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

impl Meter {
    /// The response headers arrived: how to read what follows.
    pub fn start(host: &dyn Host, config: &Config, kind: ApiKind) -> Meter {
        let status = host
            .response_header(":status")
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        let content_type = host.response_header("content-type").unwrap_or_default();
        let encoded = host
            .response_header("content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case("identity"));
        if !(200..300).contains(&status) {
            Meter::UpstreamError { status }
        } else if encoded {
            Meter::Unreadable
        } else if content_type
            .to_ascii_lowercase()
            .starts_with("text/event-stream")
        {
            Meter::Stream {
                decoder: SseDecoder::new(config.max_stream_text_bytes),
                meter: StreamMeter::new(kind, config.max_stream_text_bytes),
            }
        } else {
            Meter::Json {
                body: Vec::new(),
                overflowed: false,
            }
        }
    }

    /// A body chunk of `size` bytes arrived.
    pub fn feed(
        &mut self,
        host: &dyn Host,
        size: usize,
        max_json: usize,
        counter: Option<TextCounter<'_>>,
    ) {
        if size == 0 {
            return;
        }
        match self {
            Meter::Json { body, overflowed } if !*overflowed => {
                if body.len().saturating_add(size) > max_json {
                    *overflowed = true;
                    *body = Vec::new();
                } else if let Some(chunk) = host.response_body(size) {
                    body.extend_from_slice(&chunk);
                }
            }
            Meter::Stream { decoder, meter } => {
                if let (Some(chunk), Some(counter)) = (host.response_body(size), counter) {
                    decoder.feed(&chunk, |event, data| meter.on_event(event, data, counter));
                }
            }
            _ => {}
        }
    }

    /// What the exchange is billed for this response. `ended`: the response reached its
    /// end (not cut by a reset); `asked`: the request went upstream (a request refused by a
    /// global budget never did).
    pub fn finish(self, end: &End<'_>) -> (Billed, Vec<Note>) {
        let counted = |output: u64| Billed::Usage {
            source: Source::Counted,
            usage: UsageReport {
                input: end.prompt.tokens,
                output,
                ..UsageReport::default()
            },
        };
        match self {
            Meter::Pending => {
                // The client left before the response headers. The provider usually went
                // on generating, and bills it: keep the reservation unless told otherwise.
                let billed = match end.abandoned {
                    AbandonedPolicy::Charge if end.asked => Billed::Unknown,
                    _ => Billed::Nothing,
                };
                (billed, vec![Note::NoResponse])
            }
            Meter::UpstreamError { status } => (
                Billed::Nothing,
                vec![Note::UpstreamError(format!("{}xx", status / 100))],
            ),
            Meter::Unreadable => (Billed::Unknown, vec![Note::ParseFailure("encoded")]),
            Meter::Json {
                overflowed: true, ..
            } => (Billed::Unknown, vec![Note::ParseFailure("too_large")]),
            // The client or upstream went away mid-body: what arrived may not parse, and
            // the provider has produced (and bills) the whole answer.
            Meter::Json { .. } if !end.ended => (Billed::Unknown, vec![Note::Incomplete]),
            Meter::Json { body, .. } => {
                match usage_from_json(&body, end.kind == ApiKind::AnthropicMessages) {
                    Ok(usage) => (
                        Billed::Usage {
                            source: Source::Provider,
                            usage,
                        },
                        Vec::new(),
                    ),
                    Err(UsageError::Missing) => {
                        let output = end
                            .counter
                            .map(|c| {
                                scale(json_output_tokens(&body, c), end.counting.safety_factor)
                            })
                            .unwrap_or(0);
                        (counted(output), Vec::new())
                    }
                    Err(UsageError::NotJson) => (Billed::Unknown, vec![Note::ParseFailure("json")]),
                }
            }
            Meter::Stream { mut meter, .. } => {
                let Some(c) = end.counter else {
                    return (Billed::Unknown, Vec::new());
                };
                let outcome = meter.finish(c);
                let mut notes = Vec::new();
                if outcome.bad_events > 0 {
                    notes.push(Note::ParseFailure("sse_event"));
                }
                if outcome.text_cuts > 0 {
                    // Held text passed `max_stream_text_bytes` (one endless piece, or many
                    // choices) and was counted in parts: the count may be a little high.
                    notes.push(Note::ParseFailure("stream_text_cut"));
                }
                if !outcome.complete {
                    notes.push(Note::Incomplete);
                }
                let streamed = scale(outcome.counted_output, end.counting.safety_factor);
                let billed = match outcome.reported {
                    Some(usage) if outcome.complete => Billed::Usage {
                        source: Source::Provider,
                        usage,
                    },
                    // Cut after some usage arrived: the provider's figures, but at least the
                    // output that was streamed (Anthropic's message_start says 1 output
                    // token; the final count comes only at the end).
                    Some(usage) => Billed::Usage {
                        source: Source::Provider,
                        usage: UsageReport {
                            output: usage.output.max(streamed),
                            ..usage
                        },
                    },
                    None => counted(streamed),
                };
                (billed, notes)
            }
        }
    }
}

/// What [`Meter::finish`] needs to know about the exchange.
pub(super) struct End<'a> {
    pub kind: ApiKind,
    pub prompt: PromptCount,
    pub counting: ModelCounting,
    pub counter: Option<TextCounter<'a>>,
    pub abandoned: AbandonedPolicy,
    pub ended: bool,
    pub asked: bool,
}

/// Tokens of the generated text in a JSON response that carries no usage.
fn json_output_tokens(body: &[u8], counter: TextCounter<'_>) -> u64 {
    use serde_json::Value;
    fn list<'v>(v: &'v Value, at: &str) -> &'v [Value] {
        v.pointer(at)
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }
    fn text<'v>(v: &'v Value, at: &str) -> Option<&'v str> {
        v.pointer(at).and_then(Value::as_str)
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    let mut total = 0u64;
    let mut count = |t: Option<&str>| {
        if let Some(t) = t {
            total = total.saturating_add(counter.count(t));
        }
    };
    // Chat / completions.
    for choice in list(&v, "/choices") {
        count(text(choice, "/message/content"));
        count(text(choice, "/text"));
        for call in list(choice, "/message/tool_calls") {
            count(text(call, "/function/name"));
            count(text(call, "/function/arguments"));
        }
    }
    // Responses API.
    for item in list(&v, "/output") {
        for part in list(item, "/content") {
            count(text(part, "/text"));
        }
        count(text(item, "/arguments"));
    }
    // Anthropic.
    for block in list(&v, "/content") {
        count(text(block, "/text"));
        if let Some(input) = block.get("input") {
            count(Some(&input.to_string()));
        }
    }
    total
}
