//! Server-sent event streams: usage and streamed text, read chunk by chunk.
//!
//! Envoy hands the filter a streamed response in chunks that fall anywhere: inside an
//! event, inside a line, inside a `\r\n` pair, inside a multi-byte UTF-8 character.
//! [`SseDecoder`] keeps only the unfinished line between chunks, so a stream is never held
//! whole, and decodes text only once a line is complete (so a split character is whole by
//! then). [`StreamMeter`] turns events into usage: the final usage chunk of OpenAI streams,
//! `response.completed` of the Responses API, `message_start`/`message_delta` of Anthropic;
//! and, for streams that carry no usage, the streamed text to count with the tokenizer.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::api::ApiKind;
use crate::tokens::TextCounter;
use crate::usage::{RawUsage, UsageReport};

/// Incremental SSE parser (the WHATWG event-stream format: `field: value` lines, events
/// ended by a blank line, `\n`, `\r\n` or `\r` line ends, `:` comments).
#[derive(Debug)]
pub struct SseDecoder {
    /// Bytes of the current, unfinished line.
    pending: Vec<u8>,
    /// The last chunk ended with `\r`: a `\n` starting the next chunk belongs to it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    max_line: usize,
    /// Lines dropped for exceeding `max_line`.
    pub oversized_lines: u64,
}

impl SseDecoder {
    /// A decoder that drops any single line longer than `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        SseDecoder {
            pending: Vec::new(),
            after_cr: false,
            event: String::new(),
            data: String::new(),
            has_data: false,
            max_line,
            oversized_lines: 0,
        }
    }

    /// Feed one chunk; `on_event(event_name, data)` is called for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(&str, &str)) {
        if chunk.is_empty() {
            return; // nothing to read, and a pending `\r` must still meet its `\n`
        }
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(b'\n') = rest.first() {
                rest = &rest[1..];
            }
        }
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let (line, tail) = rest.split_at(end);
            // A line longer than `max_line` goes through `push_pending` even when whole in
            // this chunk, so it is dropped the same wherever the chunks were split.
            if self.pending.is_empty() && line.len() <= self.max_line {
                self.line(line, &mut on_event);
            } else {
                self.push_pending(line);
                let whole = std::mem::take(&mut self.pending);
                self.line(&whole, &mut on_event);
            }
            // Skip the terminator: `\r\n` counts as one.
            rest = match tail {
                [b'\r', b'\n', more @ ..] => more,
                [b'\r'] => {
                    self.after_cr = true;
                    &[]
                }
                [_, more @ ..] => more,
                [] => &[],
            };
        }
        self.push_pending(rest);
    }

    fn push_pending(&mut self, bytes: &[u8]) {
        if self.pending.len() + bytes.len() > self.max_line {
            // A line this long is not an LLM event; drop it rather than grow without bound.
            // The marker keeps later bytes of the same line from being read as a new line.
            if self.pending.first() != Some(&0) {
                self.oversized_lines += 1;
            }
            self.pending.clear();
            self.pending.push(0);
            return;
        }
        self.pending.extend_from_slice(bytes);
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(&str, &str)) {
        if line.first() == Some(&0) {
            return; // the end of an oversized line
        }
        if line.is_empty() {
            if self.has_data {
                on_event(&self.event, &self.data);
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            return;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.find(':') {
            Some(0) => return, // comment
            Some(i) => {
                let v = &text[i + 1..];
                (&text[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&text[..], ""),
        };
        match field {
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                if self.data.len() + value.len() <= self.max_line {
                    self.data.push_str(value);
                } else {
                    self.oversized_lines += 1;
                }
                self.has_data = true;
            }
            _ => {} // id, retry, unknown fields
        }
    }
}

/// What a finished (or cut) stream amounted to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOutcome {
    /// Usage the provider reported in the stream, if it did.
    pub reported: Option<UsageReport>,
    /// Output tokens counted from the streamed text (always computed, so a cut stream that
    /// never reached its usage chunk is still charged for what it delivered).
    pub counted_output: u64,
    /// The stream reached its API's terminal event (`[DONE]`, `response.completed`, …).
    pub complete: bool,
    /// Events whose data was not the JSON the API sends.
    pub bad_events: u64,
}

/// Reads usage and output text from the events of one response stream.
#[derive(Debug)]
pub struct StreamMeter {
    kind: ApiKind,
    /// Usage seen so far; later events override earlier ones (Anthropic sends input in
    /// `message_start` and the final output in `message_delta`).
    usage: Option<UsageReport>,
    /// Streamed text per choice index, not yet counted.
    text: BTreeMap<u32, String>,
    text_bytes: usize,
    max_text_bytes: usize,
    counted: u64,
    complete: bool,
    bad_events: u64,
}

impl StreamMeter {
    /// A meter for a stream of `kind`, holding at most `max_text_bytes` of uncounted text.
    pub fn new(kind: ApiKind, max_text_bytes: usize) -> Self {
        StreamMeter {
            kind,
            usage: None,
            text: BTreeMap::new(),
            text_bytes: 0,
            max_text_bytes,
            counted: 0,
            complete: false,
            bad_events: 0,
        }
    }

    /// Account for one event.
    pub fn on_event(&mut self, event: &str, data: &str, counter: TextCounter<'_>) {
        let ok = match self.kind {
            ApiKind::ChatCompletions | ApiKind::Completions => self.openai_chunk(data),
            ApiKind::Responses => self.responses_event(data),
            ApiKind::AnthropicMessages => self.anthropic_event(event, data),
            // Embeddings do not stream; anything arriving here is not ours to read.
            ApiKind::Embeddings => false,
        };
        if !ok {
            self.bad_events += 1;
        }
        if self.text_bytes > self.max_text_bytes {
            // Count what is held and let it go: streams are never held whole. A token that
            // straddles this cut may be counted as two.
            self.flush(counter);
        }
    }

    fn flush(&mut self, counter: TextCounter<'_>) {
        for text in self.text.values_mut() {
            self.counted = self.counted.saturating_add(counter.count(text));
            text.clear();
        }
        self.text_bytes = 0;
    }

    fn push_text(&mut self, index: u32, text: &str) {
        if text.is_empty() {
            return;
        }
        self.text_bytes += text.len();
        self.text.entry(index).or_default().push_str(text);
    }

    fn merge_usage(&mut self, raw: &RawUsage) {
        if !raw.is_present() {
            return;
        }
        let anthropic = self.kind == ApiKind::AnthropicMessages;
        let next = raw.report(anthropic);
        let merged = match self.usage {
            // Anthropic's message_delta repeats only some fields; keep the others.
            Some(prev) if anthropic => UsageReport {
                input: if next.input > 0 {
                    next.input
                } else {
                    prev.input
                },
                output: next.output.max(prev.output),
                cached_input: next.cached_input.max(prev.cached_input),
                cache_creation: next.cache_creation.max(prev.cache_creation),
                reasoning: next.reasoning.max(prev.reasoning),
            },
            _ => next,
        };
        self.usage = Some(merged);
    }

    fn openai_chunk(&mut self, data: &str) -> bool {
        if data.trim() == "[DONE]" {
            self.complete = true;
            return true;
        }
        let Ok(chunk) = serde_json::from_str::<OpenAiChunk>(data) else {
            return false;
        };
        for choice in &chunk.choices {
            if let Some(t) = &choice.text {
                self.push_text(choice.index, t);
            }
            if let Some(d) = &choice.delta {
                for t in [&d.content, &d.refusal].into_iter().flatten() {
                    self.push_text(choice.index, t);
                }
                let calls = d
                    .tool_calls
                    .iter()
                    .flatten()
                    .filter_map(|c| c.function.as_ref())
                    .chain(d.function_call.as_ref());
                for f in calls {
                    for t in [&f.name, &f.arguments].into_iter().flatten() {
                        self.push_text(choice.index, t);
                    }
                }
            }
        }
        if let Some(u) = &chunk.usage {
            self.merge_usage(u);
        }
        true
    }

    fn responses_event(&mut self, data: &str) -> bool {
        let Ok(ev) = serde_json::from_str::<ResponsesEvent>(data) else {
            return false;
        };
        match ev.kind.as_str() {
            "response.output_text.delta"
            | "response.refusal.delta"
            | "response.function_call_arguments.delta" => {
                if let Some(d) = &ev.delta {
                    self.push_text(0, d);
                }
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                self.complete = true;
                if let Some(u) = ev.response.as_ref().and_then(|r| r.usage.as_ref()) {
                    self.merge_usage(u);
                }
            }
            _ => {}
        }
        true
    }

    fn anthropic_event(&mut self, event: &str, data: &str) -> bool {
        let Ok(ev) = serde_json::from_str::<AnthropicEvent>(data) else {
            return false;
        };
        let kind = if ev.kind.is_empty() { event } else { &ev.kind };
        match kind {
            "message_start" => {
                if let Some(u) = ev.message.as_ref().and_then(|m| m.usage.as_ref()) {
                    self.merge_usage(u);
                }
            }
            "content_block_delta" => {
                if let Some(d) = &ev.delta {
                    for t in [&d.text, &d.partial_json, &d.thinking]
                        .into_iter()
                        .flatten()
                    {
                        self.push_text(ev.index.unwrap_or(0), t);
                    }
                }
            }
            "message_delta" => {
                if let Some(u) = &ev.usage {
                    self.merge_usage(u);
                }
            }
            "message_stop" => self.complete = true,
            _ => {}
        }
        true
    }

    /// Close the meter: count the text still held and report.
    pub fn finish(&mut self, counter: TextCounter<'_>) -> StreamOutcome {
        self.flush(counter);
        StreamOutcome {
            reported: self.usage,
            counted_output: self.counted,
            complete: self.complete,
            bad_events: self.bad_events,
        }
    }
}

#[derive(Deserialize)]
struct OpenAiChunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<ChunkDelta>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
    #[serde(default)]
    function_call: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct ResponsesEvent {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    delta: Option<String>,
    #[serde(default)]
    response: Option<ResponseObject>,
}

#[derive(Deserialize)]
struct ResponseObject {
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct AnthropicEvent {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    message: Option<ResponseObject>,
    #[serde(default)]
    delta: Option<AnthropicDelta>,
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct AnthropicDelta {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::{tests_support::shared, Encoding};

    fn events_of(chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut d = SseDecoder::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, |e, data| out.push((e.to_string(), data.to_string())));
        }
        out
    }

    fn split_every_way(stream: &[u8]) -> Vec<Vec<&[u8]>> {
        (1..stream.len())
            .map(|i| vec![&stream[..i], &stream[i..]])
            .collect()
    }

    #[test]
    fn decoder_reads_events_fields_and_comments() {
        let got = events_of(&[
            b": keep-alive\nevent: message_start\ndata: {\"a\":1}\n\ndata: x\ndata: y\nid: 7\n\n",
        ]);
        assert_eq!(
            got,
            vec![
                ("message_start".into(), "{\"a\":1}".into()),
                ("".into(), "x\ny".into())
            ]
        );
    }

    #[test]
    fn decoder_handles_crlf_and_cr_line_ends() {
        let want = vec![
            ("".to_string(), "a".to_string()),
            ("e".to_string(), "b".to_string()),
        ];
        assert_eq!(
            events_of(&[b"data: a\r\n\r\nevent: e\r\ndata: b\r\n\r\n"]),
            want
        );
        assert_eq!(events_of(&[b"data: a\r\revent: e\rdata: b\r\r"]), want);
    }

    #[test]
    fn a_crlf_split_between_chunks_is_one_line_end() {
        let got = events_of(&[b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]);
        assert_eq!(got, vec![("".into(), "a".into()), ("".into(), "b".into())]);
    }

    #[test]
    fn an_empty_chunk_between_cr_and_lf_keeps_them_one_line_end() {
        // Found with the sse_stream fuzz target: an empty chunk used to forget the pending
        // `\r`, so the `\n` after it ended a second (blank) line and cut the event in two.
        let got = events_of(&[b"data: a\r", b"", b"\ndata: b\n\n"]);
        assert_eq!(got, vec![("".into(), "a\nb".into())]);
    }

    #[test]
    fn every_two_way_split_gives_the_same_events() {
        let stream =
            "event: x\r\ndata: {\"t\":\"héllo 世界 🎉\"}\r\n\r\ndata: [DONE]\n\n".as_bytes();
        let whole = events_of(&[stream]);
        assert_eq!(whole.len(), 2);
        for chunks in split_every_way(stream) {
            assert_eq!(events_of(&chunks), whole);
        }
    }

    #[test]
    fn byte_by_byte_feeding_gives_the_same_events() {
        let stream = "data: {\"t\":\"日本語\"}\n\ndata: [DONE]\n\n".as_bytes();
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events_of(&chunks), events_of(&[stream]));
    }

    #[test]
    fn oversized_lines_are_dropped_not_buffered() {
        let mut d = SseDecoder::new(16);
        let mut out = Vec::new();
        d.feed(b"data: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa", |_, x| {
            out.push(x.to_string())
        });
        d.feed(b"aaaaaaaaaaaa\n\ndata: ok\n\n", |_, x| {
            out.push(x.to_string())
        });
        assert_eq!(out, vec!["ok".to_string()]);
        assert_eq!(d.oversized_lines, 1);
        assert!(d.pending.len() <= 16);
    }

    #[test]
    fn an_oversized_line_is_dropped_whether_it_arrives_whole_or_split() {
        // Found by `make fuzz` (sse_stream): a too-long line arriving whole in one chunk used
        // to be read, the same line split across chunks dropped.
        let stream = b"event: message_start\ndata: {\"a\":1}\n\n";
        let feed = |chunks: &[&[u8]]| {
            let mut d = SseDecoder::new(16);
            let mut out = Vec::new();
            for c in chunks {
                d.feed(c, |e, x| out.push((e.to_string(), x.to_string())));
            }
            (out, d.oversized_lines)
        };
        let want = (vec![(String::new(), "{\"a\":1}".to_string())], 1);
        assert_eq!(feed(&[stream]), want);
        for chunks in split_every_way(stream) {
            assert_eq!(feed(&chunks), want);
        }
    }

    fn meter(kind: ApiKind, stream: &[u8], split: usize) -> StreamOutcome {
        let counter = shared().counter(Encoding::O200kBase).unwrap();
        let mut d = SseDecoder::new(1 << 20);
        let mut m = StreamMeter::new(kind, 1 << 20);
        for chunk in stream.chunks(split) {
            d.feed(chunk, |e, data| m.on_event(e, data, counter));
        }
        m.finish(counter)
    }

    const CHAT_STREAM: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"! How can I help you today?\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":10,\"total_tokens\":19}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn openai_final_usage_chunk_is_read_at_every_split_size() {
        for split in 1..CHAT_STREAM.len() {
            let o = meter(ApiKind::ChatCompletions, CHAT_STREAM.as_bytes(), split);
            assert_eq!(
                o.reported.map(|u| (u.input, u.output)),
                Some((9, 10)),
                "split {split}"
            );
            assert!(o.complete);
            assert_eq!(o.bad_events, 0);
        }
    }

    #[test]
    fn openai_stream_without_usage_is_counted_from_deltas() {
        let no_usage: String = CHAT_STREAM
            .lines()
            .filter(|l| !l.contains("usage"))
            .map(|l| format!("{l}\n"))
            .collect();
        let o = meter(ApiKind::ChatCompletions, no_usage.as_bytes(), 7);
        assert_eq!(o.reported, None);
        let counter = shared().counter(Encoding::O200kBase).unwrap();
        assert_eq!(
            o.counted_output,
            counter.count("Hello! How can I help you today?")
        );
        assert!(o.counted_output > 0);
    }

    #[test]
    fn choices_are_counted_separately() {
        let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}},{\"index\":1,\"delta\":{\"content\":\"Hello\"}}]}\n\n";
        let o = meter(ApiKind::ChatCompletions, stream.as_bytes(), 5);
        assert_eq!(o.counted_output, 2);
        assert!(!o.complete);
    }

    #[test]
    fn tool_call_arguments_are_counted() {
        let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}]}}]}\n\n";
        let o = meter(ApiKind::ChatCompletions, stream.as_bytes(), 11);
        assert!(o.counted_output >= 5, "{o:?}");
    }

    #[test]
    fn garbage_events_are_counted_not_fatal() {
        let stream = "data: {not json\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\nretry: 10\ngarbage line\n\n";
        let o = meter(ApiKind::ChatCompletions, stream.as_bytes(), 3);
        assert_eq!(o.bad_events, 1);
        assert_eq!(o.counted_output, 1);
    }

    #[test]
    fn legacy_completions_stream_text_is_counted() {
        let stream = "data: {\"choices\":[{\"index\":0,\"text\":\"tiktoken is great!\"}]}\n\ndata: [DONE]\n\n";
        let o = meter(ApiKind::Completions, stream.as_bytes(), 4);
        assert_eq!((o.counted_output, o.complete), (6, true));
    }

    const RESPONSES_STREAM: &str = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"status\":\"in_progress\"}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"tiktoken is\"}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\" great!\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":6,\"input_tokens_details\":{\"cached_tokens\":4}}}}\n\n",
    );

    #[test]
    fn responses_stream_usage_comes_from_response_completed() {
        for split in [1, 2, 13, 64] {
            let o = meter(ApiKind::Responses, RESPONSES_STREAM.as_bytes(), split);
            assert_eq!(
                o.reported.map(|u| (u.input, u.output, u.cached_input)),
                Some((12, 6, 4))
            );
            assert_eq!(o.counted_output, 6);
            assert!(o.complete);
        }
    }

    const ANTHROPIC_STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":100,\"cache_creation_input_tokens\":0}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"tiktoken is great!\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn anthropic_stream_merges_message_start_and_message_delta_usage() {
        for split in [1, 3, 50] {
            let o = meter(
                ApiKind::AnthropicMessages,
                ANTHROPIC_STREAM.as_bytes(),
                split,
            );
            let u = o.reported.unwrap();
            assert_eq!((u.input, u.output, u.cached_input), (125, 15, 100));
            assert!(o.complete);
            assert_eq!(o.counted_output, 6);
        }
    }

    #[test]
    fn a_cut_stream_is_incomplete_but_counts_what_arrived() {
        let cut = &CHAT_STREAM[..CHAT_STREAM.find("finish_reason").unwrap()];
        let o = meter(ApiKind::ChatCompletions, cut.as_bytes(), 9);
        assert!(!o.complete);
        assert_eq!(o.reported, None);
        assert!(o.counted_output > 0);
    }

    #[test]
    fn held_text_is_flushed_at_the_cap_and_still_counted() {
        let counter = shared().counter(Encoding::O200kBase).unwrap();
        let mut m = StreamMeter::new(ApiKind::ChatCompletions, 64);
        for _ in 0..100 {
            m.on_event(
                "",
                "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"word word word \"}}]}",
                counter,
            );
            assert!(m.text_bytes <= 64 + 15);
        }
        let o = m.finish(counter);
        let exact = counter.count(&"word word word ".repeat(100));
        assert!(
            o.counted_output.abs_diff(exact) <= 25,
            "{} vs {exact}",
            o.counted_output
        );
    }
}
