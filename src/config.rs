//! Plugin configuration: the JSON an operator writes, and the validated runtime form.
//!
//! The operator's JSON (`configuration` in the Envoy Wasm plugin config) is read into
//! [`RawConfig`], which mirrors the document field by field and rejects unknown fields, then
//! compiled by [`Config::parse`] into [`Config`], whose values are all known to be usable. A bad
//! document yields a [`ConfigError`] that names the field (`tokenizer.models[2].encoding`) and
//! says why; the glue logs it and makes `on_configure` return false, so Envoy refuses the
//! plugin instead of running with a half-understood policy.
//!
//! Error messages never quote the offending *value*: a configuration may hold secrets, and
//! the field path plus the expected shape is enough to fix it.

use std::fmt;

use serde::Deserialize;

use crate::tokens::{Encoding, ModelMap, ModelRule};

/// The only configuration schema version this build understands.
pub const API_VERSION: &str = "v1";

/// What the filter does with a request on an LLM path whose body it cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MalformedPolicy {
    /// Answer 400 with an OpenAI-style error; the request never reaches the provider.
    Reject,
    /// Forward it untouched (the provider will usually refuse it); counted in a stat.
    Pass,
}

/// The validated configuration the filter runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Which model names use which encoding, and the fallback for all others.
    pub models: ModelMap,
    /// Completion tokens reserved when a request does not cap its output.
    pub default_max_output_tokens: u64,
    /// Add `stream_options.include_usage: true` to streaming chat/completions requests.
    pub inject_stream_usage: bool,
    /// Outcome for unreadable bodies on LLM paths.
    pub malformed_request: MalformedPolicy,
    /// Tokens charged for an image part with `detail: "low"`.
    pub image_tokens_low: u64,
    /// Tokens charged for any other image part (its size is unknown to the filter).
    pub image_tokens_high: u64,
    /// Largest non-streaming response body copied to read `usage` from.
    pub max_response_body_bytes: usize,
    /// Largest amount of streamed text held for counting a stream without usage.
    pub max_stream_text_bytes: usize,
    /// Distinct `model` tag values per VM before further models are tagged `other`.
    pub model_tag_limit: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            models: ModelMap::builtin(Encoding::O200kBase, 1.0),
            default_max_output_tokens: 4096,
            inject_stream_usage: false,
            malformed_request: MalformedPolicy::Reject,
            image_tokens_low: 85,
            image_tokens_high: 765,
            max_response_body_bytes: 8 << 20,
            max_stream_text_bytes: 1 << 20,
            model_tag_limit: 64,
        }
    }
}

/// The configuration document as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    api: String,
    #[serde(default)]
    tokenizer: RawTokenizer,
    default_max_output_tokens: Option<u64>,
    inject_stream_usage: Option<bool>,
    malformed_request: Option<MalformedPolicy>,
    image_tokens: Option<RawImageTokens>,
    max_response_body_bytes: Option<u64>,
    max_stream_text_bytes: Option<u64>,
    #[serde(default)]
    stats: RawStats,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenizer {
    #[serde(default)]
    models: Vec<RawModelRule>,
    builtin_models: Option<bool>,
    fallback_encoding: Option<Encoding>,
    fallback_safety_factor: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelRule {
    #[serde(rename = "match")]
    pattern: String,
    encoding: Encoding,
    safety_factor: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImageTokens {
    low: Option<u64>,
    high: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStats {
    model_tag_limit: Option<u64>,
}

/// Why a configuration was refused: the field and the reason, ready for a log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field (`.` for the document itself).
    pub field: String,
    /// What is wrong with it, in operator's terms.
    pub reason: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid tokenfuse configuration: field `{}`: {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parse and validate a configuration document. An empty document is refused: an
    /// operator must at least state the schema version, so a config written for a future
    /// schema is never half-applied.
    pub fn parse(document: &[u8]) -> Result<Config, ConfigError> {
        if document.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::new(
                ".",
                format!(
                    "the configuration is empty; it needs at least {{\"api\": \"{API_VERSION}\"}}"
                ),
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(document);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::new(field, describe_serde_error(e.inner()))
        })?;
        de.end()
            .map_err(|e| ConfigError::new(".", describe_serde_error(&e)))?;
        Config::compile(raw)
    }

    fn compile(raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.api != API_VERSION {
            return Err(ConfigError::new(
                "api",
                format!("unsupported schema version; this build understands \"{API_VERSION}\""),
            ));
        }
        let defaults = Config::default();

        let fallback_factor = raw.tokenizer.fallback_safety_factor.unwrap_or(1.0);
        check_safety_factor("tokenizer.fallback_safety_factor", fallback_factor)?;
        let fallback = raw
            .tokenizer
            .fallback_encoding
            .unwrap_or(Encoding::O200kBase);
        let mut rules = Vec::with_capacity(raw.tokenizer.models.len());
        for (i, rule) in raw.tokenizer.models.into_iter().enumerate() {
            let field = format!("tokenizer.models[{i}]");
            let factor = rule.safety_factor.unwrap_or(1.0);
            check_safety_factor(&format!("{field}.safety_factor"), factor)?;
            let parsed = ModelRule::parse(&rule.pattern, rule.encoding, factor)
                .map_err(|why| ConfigError::new(format!("{field}.match"), why))?;
            rules.push(parsed);
        }
        let models = if raw.tokenizer.builtin_models.unwrap_or(true) {
            ModelMap::builtin(fallback, fallback_factor).with_rules_first(rules)
        } else {
            ModelMap::new(rules, fallback, fallback_factor)
        };

        let default_max_output_tokens =
            match raw.default_max_output_tokens {
                Some(0) => return Err(ConfigError::new(
                    "default_max_output_tokens",
                    "must be at least 1 (it is the completion reservation for uncapped requests)",
                )),
                Some(n) if n > 10_000_000 => {
                    return Err(ConfigError::new(
                        "default_max_output_tokens",
                        "must be at most 10000000",
                    ))
                }
                Some(n) => n,
                None => defaults.default_max_output_tokens,
            };

        let (image_tokens_low, image_tokens_high) = match raw.image_tokens {
            Some(t) => (
                t.low.unwrap_or(defaults.image_tokens_low),
                t.high.unwrap_or(defaults.image_tokens_high),
            ),
            None => (defaults.image_tokens_low, defaults.image_tokens_high),
        };
        if image_tokens_low > image_tokens_high {
            return Err(ConfigError::new(
                "image_tokens.low",
                "must not exceed image_tokens.high",
            ));
        }

        let max_response_body_bytes = byte_limit(
            "max_response_body_bytes",
            raw.max_response_body_bytes,
            defaults.max_response_body_bytes,
        )?;
        let max_stream_text_bytes = byte_limit(
            "max_stream_text_bytes",
            raw.max_stream_text_bytes,
            defaults.max_stream_text_bytes,
        )?;

        let model_tag_limit = match raw.stats.model_tag_limit {
            Some(n) if n > 10_000 => {
                return Err(ConfigError::new(
                    "stats.model_tag_limit",
                    "must be at most 10000 (each value is a metric series per VM)",
                ))
            }
            Some(n) => n as usize,
            None => defaults.model_tag_limit,
        };

        Ok(Config {
            models,
            default_max_output_tokens,
            inject_stream_usage: raw.inject_stream_usage.unwrap_or(false),
            malformed_request: raw.malformed_request.unwrap_or(MalformedPolicy::Reject),
            image_tokens_low,
            image_tokens_high,
            max_response_body_bytes,
            max_stream_text_bytes,
            model_tag_limit,
        })
    }

    /// The encodings this configuration can ask for: exactly the tokenizers to build.
    pub fn encodings(&self) -> Vec<Encoding> {
        self.models.encodings()
    }
}

fn check_safety_factor(field: &str, factor: f64) -> Result<(), ConfigError> {
    if !(1.0..=4.0).contains(&factor) {
        return Err(ConfigError::new(
            field,
            "must be between 1.0 and 4.0 (a multiplier on counts made with a borrowed encoding)",
        ));
    }
    Ok(())
}

fn byte_limit(field: &str, value: Option<u64>, default: usize) -> Result<usize, ConfigError> {
    match value {
        None => Ok(default),
        Some(n) if !(1024..=(64 << 20)).contains(&n) => Err(ConfigError::new(
            field,
            "must be between 1024 and 67108864 bytes",
        )),
        Some(n) => usize::try_from(n)
            .map_err(|_| ConfigError::new(field, "does not fit this platform's address space")),
    }
}

/// Turn a serde_json error into a sentence that names what was expected and where, without
/// quoting the offending value (serde's own text sometimes does).
fn describe_serde_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = format!("line {}, column {}", e.line(), e.column());
    match e.classify() {
        Category::Syntax | Category::Eof => format!("not valid JSON ({at})"),
        Category::Io => format!("could not be read ({at})"),
        Category::Data => {
            // serde's data errors read "unknown field `x`, expected one of …" or
            // "invalid type: string \"…\", expected u64". Keep the field names and the
            // expectation; drop any quoted value.
            let text = e.to_string();
            let text = text.split(" at line ").next().unwrap_or(&text).to_string();
            if text.starts_with("unknown field") || text.starts_with("missing field") {
                format!("{text} ({at})")
            } else if let Some(pos) = text.find("expected") {
                format!("wrong type or value, {} ({at})", &text[pos..])
            } else if text.starts_with("unknown variant") {
                match text.find("expected") {
                    Some(pos) => format!("unknown value, {} ({at})", &text[pos..]),
                    None => format!("unknown value ({at})"),
                }
            } else {
                format!("wrong type or value ({at})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(doc: &str) -> ConfigError {
        match Config::parse(doc.as_bytes()) {
            Err(e) => e,
            Ok(_) => panic!("expected {doc} to be refused"),
        }
    }

    #[test]
    fn minimal_document_gets_documented_defaults() {
        let c = Config::parse(br#"{"api":"v1"}"#).unwrap();
        assert_eq!(c.default_max_output_tokens, 4096);
        assert!(!c.inject_stream_usage);
        assert_eq!(c.malformed_request, MalformedPolicy::Reject);
        assert_eq!((c.image_tokens_low, c.image_tokens_high), (85, 765));
        assert_eq!(c.max_response_body_bytes, 8 << 20);
        assert_eq!(c.max_stream_text_bytes, 1 << 20);
        assert_eq!(c.model_tag_limit, 64);
        let mut enc = c.encodings();
        enc.sort();
        assert_eq!(enc, vec![Encoding::O200kBase, Encoding::Cl100kBase]);
    }

    #[test]
    fn empty_document_is_refused_with_a_hint() {
        let e = err("  ");
        assert_eq!(e.field, ".");
        assert!(e.reason.contains("\"api\""));
    }

    #[test]
    fn wrong_api_version_is_refused() {
        let e = err(r#"{"api":"v0"}"#);
        assert_eq!(e.field, "api");
    }

    #[test]
    fn missing_api_version_is_refused() {
        let e = err(r#"{}"#);
        assert!(e.reason.contains("missing field `api`"), "{e}");
    }

    #[test]
    fn unknown_top_level_field_names_the_field() {
        let e = err(r#"{"api":"v1","inject_stream_usge":true}"#);
        assert!(e.reason.contains("inject_stream_usge"), "{e}");
    }

    #[test]
    fn unknown_nested_field_reports_its_path() {
        let e = err(
            r#"{"api":"v1","tokenizer":{"models":[{"match":"x*","encoding":"o200k_base","typo":1}]}}"#,
        );
        assert_eq!(e.field, "tokenizer.models[0].typo");
        assert!(e.reason.contains("typo"), "{e}");
    }

    #[test]
    fn unknown_encoding_is_refused_at_its_path() {
        let e =
            err(r#"{"api":"v1","tokenizer":{"models":[{"match":"x*","encoding":"p50k_base"}]}}"#);
        assert_eq!(e.field, "tokenizer.models[0].encoding");
        assert!(e.reason.contains("o200k_base"), "{e}");
    }

    #[test]
    fn wrong_type_does_not_echo_the_value() {
        let e = err(r#"{"api":"v1","default_max_output_tokens":"sk-secret-value"}"#);
        assert_eq!(e.field, "default_max_output_tokens");
        assert!(!e.reason.contains("sk-secret"), "{e}");
        assert!(e.reason.contains("expected"), "{e}");
    }

    #[test]
    fn syntax_error_gives_line_and_column() {
        let e = err("{\"api\":\"v1\",\n  \"inject_stream_usage\": tru }");
        assert!(e.reason.contains("line 2"), "{e}");
    }

    #[test]
    fn trailing_garbage_is_refused() {
        let e = err(r#"{"api":"v1"} {"api":"v1"}"#);
        assert!(e.reason.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn zero_default_reservation_is_refused() {
        assert_eq!(
            err(r#"{"api":"v1","default_max_output_tokens":0}"#).field,
            "default_max_output_tokens"
        );
    }

    #[test]
    fn safety_factor_outside_range_is_refused() {
        let e = err(r#"{"api":"v1","tokenizer":{"fallback_safety_factor":0.5}}"#);
        assert_eq!(e.field, "tokenizer.fallback_safety_factor");
        let e = err(
            r#"{"api":"v1","tokenizer":{"models":[{"match":"claude-*","encoding":"cl100k_base","safety_factor":9}]}}"#,
        );
        assert_eq!(e.field, "tokenizer.models[0].safety_factor");
    }

    #[test]
    fn bad_pattern_is_refused_at_its_path() {
        let e = err(
            r#"{"api":"v1","tokenizer":{"models":[{"match":"gpt*4","encoding":"o200k_base"}]}}"#,
        );
        assert_eq!(e.field, "tokenizer.models[0].match");
    }

    #[test]
    fn image_low_above_high_is_refused() {
        assert_eq!(
            err(r#"{"api":"v1","image_tokens":{"low":900}}"#).field,
            "image_tokens.low"
        );
    }

    #[test]
    fn byte_limits_are_bounded() {
        assert_eq!(
            err(r#"{"api":"v1","max_response_body_bytes":10}"#).field,
            "max_response_body_bytes"
        );
        assert_eq!(
            err(r#"{"api":"v1","max_stream_text_bytes":999999999999}"#).field,
            "max_stream_text_bytes"
        );
    }

    #[test]
    fn without_builtin_models_only_configured_encodings_are_built() {
        let c = Config::parse(br#"{"api":"v1","tokenizer":{"builtin_models":false,"fallback_encoding":"o200k_base","models":[{"match":"gpt-4o*","encoding":"o200k_base"}]}}"#).unwrap();
        assert_eq!(c.encodings(), vec![Encoding::O200kBase]);
    }

    #[test]
    fn malformed_policy_pass_is_accepted() {
        let c = Config::parse(br#"{"api":"v1","malformed_request":"pass"}"#).unwrap();
        assert_eq!(c.malformed_request, MalformedPolicy::Pass);
        assert_eq!(
            err(r#"{"api":"v1","malformed_request":"drop"}"#).field,
            "malformed_request"
        );
    }
}
