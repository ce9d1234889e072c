//! Provider-reported usage: what the response says the exchange cost.
//!
//! OpenAI and Anthropic name the same quantities differently. [`UsageReport`] is the common
//! form: `input` excludes nothing the provider bills as input (for Anthropic, whose
//! `input_tokens` leaves out cache reads and writes, those are added back), `cached_input`
//! and `cache_creation` say which part of it was billed at cache rates.

use serde::Deserialize;

use crate::llm::json::{self, Reader};

/// Token usage of one exchange, as reported by the provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// All input (prompt) tokens, cache reads and writes included.
    pub input: u64,
    /// Output (completion) tokens, reasoning included.
    pub output: u64,
    /// Part of `input` read from the provider's prompt cache.
    pub cached_input: u64,
    /// Part of `input` written to the provider's prompt cache (Anthropic).
    pub cache_creation: u64,
    /// Part of `output` spent on hidden reasoning.
    pub reasoning: u64,
}

/// The `usage` object of any supported API. Unknown fields are ignored; missing ones are 0.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl RawUsage {
    /// The common form. `anthropic` selects Anthropic's meaning of `input_tokens` (cache
    /// traffic not included).
    pub fn report(&self, anthropic: bool) -> UsageReport {
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .or(self.input_tokens_details.as_ref())
            .and_then(|d| d.cached_tokens)
            .or(self.cache_read_input_tokens)
            .unwrap_or(0);
        let creation = self.cache_creation_input_tokens.unwrap_or(0);
        let reasoning = self
            .completion_tokens_details
            .as_ref()
            .or(self.output_tokens_details.as_ref())
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0);
        let mut input = self.prompt_tokens.or(self.input_tokens).unwrap_or(0);
        if anthropic {
            input = input.saturating_add(cached).saturating_add(creation);
        }
        UsageReport {
            input,
            output: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
            cached_input: cached,
            cache_creation: creation,
            reasoning,
        }
    }

    /// True when the object carries at least one token count.
    pub fn is_present(&self) -> bool {
        self.prompt_tokens.is_some()
            || self.completion_tokens.is_some()
            || self.input_tokens.is_some()
            || self.output_tokens.is_some()
    }
}

/// Why usage could not be read from a JSON response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageError {
    /// The body is not JSON (or not an object).
    NotJson,
    /// The body is JSON but has no `usage` with token counts.
    Missing,
}

/// Read `usage` from a complete non-streaming JSON response body, in one pass with the
/// filter's JSON reader: the top-level `usage` object is read, everything else skipped.
/// Strings are not decoded, so a body with invalid UTF-8 in a string still has its usage
/// read (the bytes are replaced first, without a copy when they are valid).
pub fn usage_from_json(body: &[u8], anthropic: bool) -> Result<UsageReport, UsageError> {
    let text = json::lossy_text(body);
    let mut r = Reader::new(&text);
    let mut usage: Option<RawUsage> = None;
    r.fields("an object (response)", &["usage"], |r, _| {
        usage = r.optional(RawUsage::read)?;
        Ok(())
    })
    .and_then(|_| r.end())
    .map_err(|_| UsageError::NotJson)?;
    match usage {
        Some(u) if u.is_present() => Ok(u.report(anthropic)),
        _ => Err(UsageError::Missing),
    }
}

impl RawUsage {
    /// A `usage` object, as serde reads [`RawUsage`].
    pub(crate) fn read(r: &mut Reader<'_>) -> json::Result<RawUsage> {
        const NAMES: [&str; 10] = [
            "prompt_tokens",
            "completion_tokens",
            "input_tokens",
            "output_tokens",
            "prompt_tokens_details",
            "input_tokens_details",
            "completion_tokens_details",
            "output_tokens_details",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        ];
        let mut u = RawUsage::default();
        r.fields("an object (usage)", &NAMES, |r, i| {
            let count = |r: &mut Reader<'_>| r.optional(Reader::u64);
            match i {
                0 => u.prompt_tokens = count(r)?,
                1 => u.completion_tokens = count(r)?,
                2 => u.input_tokens = count(r)?,
                3 => u.output_tokens = count(r)?,
                4 => u.prompt_tokens_details = r.optional(Details::read)?,
                5 => u.input_tokens_details = r.optional(Details::read)?,
                6 => u.completion_tokens_details = r.optional(Details::read)?,
                7 => u.output_tokens_details = r.optional(Details::read)?,
                8 => u.cache_creation_input_tokens = count(r)?,
                _ => u.cache_read_input_tokens = count(r)?,
            }
            Ok(())
        })?;
        Ok(u)
    }
}

impl Details {
    fn read(r: &mut Reader<'_>) -> json::Result<Details> {
        let mut d = Details::default();
        r.fields(
            "an object (token details)",
            &["cached_tokens", "reasoning_tokens"],
            |r, i| {
                let v = r.optional(Reader::u64)?;
                match i {
                    0 => d.cached_tokens = v,
                    _ => d.reasoning_tokens = v,
                }
                Ok(())
            },
        )?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_completion_usage_with_details() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":120,"completion_tokens":30,"total_tokens":150,
            "prompt_tokens_details":{"cached_tokens":100,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":12}}}"#;
        assert_eq!(
            usage_from_json(body, false),
            Ok(UsageReport {
                input: 120,
                output: 30,
                cached_input: 100,
                cache_creation: 0,
                reasoning: 12
            })
        );
    }

    #[test]
    fn responses_api_usage_field_names() {
        let body = br#"{"object":"response","usage":{"input_tokens":50,"output_tokens":9,"total_tokens":59,
            "input_tokens_details":{"cached_tokens":8},"output_tokens_details":{"reasoning_tokens":4}}}"#;
        assert_eq!(
            usage_from_json(body, false),
            Ok(UsageReport {
                input: 50,
                output: 9,
                cached_input: 8,
                cache_creation: 0,
                reasoning: 4
            })
        );
    }

    #[test]
    fn embeddings_usage_has_no_output() {
        let body = br#"{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(
            usage_from_json(body, false).map(|u| (u.input, u.output)),
            Ok((8, 0))
        );
    }

    #[test]
    fn anthropic_input_includes_cache_reads_and_writes() {
        let body = br#"{"type":"message","usage":{"input_tokens":10,"output_tokens":5,"cache_creation_input_tokens":200,"cache_read_input_tokens":1000}}"#;
        assert_eq!(
            usage_from_json(body, true),
            Ok(UsageReport {
                input: 1210,
                output: 5,
                cached_input: 1000,
                cache_creation: 200,
                reasoning: 0
            })
        );
    }

    #[test]
    fn missing_or_empty_usage_is_reported_as_missing() {
        assert_eq!(
            usage_from_json(br#"{"choices":[]}"#, false),
            Err(UsageError::Missing)
        );
        assert_eq!(
            usage_from_json(br#"{"usage":null}"#, false),
            Err(UsageError::Missing)
        );
        assert_eq!(
            usage_from_json(br#"{"usage":{}}"#, false),
            Err(UsageError::Missing)
        );
    }

    #[test]
    fn non_json_body_is_not_json() {
        assert_eq!(
            usage_from_json(b"<html>bad gateway</html>", false),
            Err(UsageError::NotJson)
        );
        assert_eq!(usage_from_json(b"[1,2]", false), Err(UsageError::NotJson));
        assert_eq!(usage_from_json(b"", false), Err(UsageError::NotJson));
    }

    /// The serde reading this module replaced, kept as the reference.
    fn serde_usage(body: &[u8], anthropic: bool) -> Result<UsageReport, UsageError> {
        #[derive(Deserialize)]
        struct WithUsage {
            #[serde(default)]
            usage: Option<RawUsage>,
        }
        let parsed: WithUsage = serde_json::from_slice(body).map_err(|_| UsageError::NotJson)?;
        match parsed.usage {
            Some(u) if u.is_present() => Ok(u.report(anthropic)),
            _ => Err(UsageError::Missing),
        }
    }

    #[test]
    fn the_reader_reads_usage_like_serde_did() {
        let bases: [&[u8]; 4] = [
            br#"{"id":"x","choices":[{"message":{"content":"hi \"there\" \u00e9"}}],"usage":{"prompt_tokens":120,"completion_tokens":30,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":100,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":12}}}"#,
            br#"{"type":"message","usage":{"input_tokens":10,"output_tokens":5,"cache_creation_input_tokens":200,"cache_read_input_tokens":1000}}"#,
            br#"{"object":"response","usage":{"input_tokens":50,"output_tokens":9,"input_tokens_details":{"cached_tokens":8},"output_tokens_details":{"reasoning_tokens":4}}}"#,
            br#"{"usage":null,"data":[1,2,{"a":[]}]}"#,
        ];
        const FRAGMENTS: &[&str] = &[
            "null",
            "-1",
            "1.5",
            "-0",
            "18446744073709551615",
            "18446744073709551616",
            "1e400",
            "\"7\"",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"usage\":{},",
            "\"prompt_tokens\":3,",
            "\"cached_tokens\":null,",
            "\"\\ud800\"",
            "true",
        ];
        let mut m = crate::llm::json::Mutator::new(0x2545_f491_4f6c_dd1d);
        for round in 0..20_000 {
            let body = m.mutate(bases[round % bases.len()], FRAGMENTS, 3);
            for anthropic in [false, true] {
                assert_eq!(
                    usage_from_json(&body, anthropic),
                    serde_usage(&body, anthropic),
                    "{:?}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
    }

    #[test]
    fn negative_or_fractional_counts_are_not_usage() {
        assert_eq!(
            usage_from_json(br#"{"usage":{"prompt_tokens":-1}}"#, false),
            Err(UsageError::NotJson)
        );
        assert_eq!(
            usage_from_json(br#"{"usage":{"prompt_tokens":1.5}}"#, false),
            Err(UsageError::NotJson)
        );
    }
}
