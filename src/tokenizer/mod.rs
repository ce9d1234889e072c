//! Tokenizers and the model map: which BPE encoding counts which model, built once per VM.
//!
//! OpenAI models are counted with their own encoding (`o200k_base` for the GPT-4o family,
//! o-series and GPT-5; `cl100k_base` for GPT-4, GPT-3.5 and the v3 embeddings), so the
//! filter's count is the provider's bill. Models with a private tokenizer (Anthropic, most
//! self-hosted ones) borrow an encoding and multiply the count by a configured safety
//! factor; such counts are estimates and are marked as such.
//!
//! Counting is [`crate::tokenizer::bpe`]: tiktoken's `encode_ordinary`, token for token, over rank
//! tables compiled into the module, so [`Tokenizers::build`] (called once per VM from
//! `on_configure`, only for the encodings the configuration can reach) checks the embedded
//! tables and builds nothing.

pub mod bpe;
pub mod count_cache;
pub mod streamed;

use std::fmt;
use std::sync::Mutex;

use serde::Deserialize;

use crate::tokenizer::bpe::Bpe;
use crate::tokenizer::count_cache::{CacheActivity, CountCache, MIN_TEXT_BYTES};

/// A byte-pair encoding the filter can count with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, GPT-4.5, o1/o3/o4, GPT-5.
    #[serde(rename = "o200k_base")]
    O200kBase,
    /// GPT-4, GPT-3.5-turbo, text-embedding-3-*, text-embedding-ada-002.
    #[serde(rename = "cl100k_base")]
    Cl100kBase,
}

impl Encoding {
    /// The encoding's name as tiktoken spells it.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a model name is matched: the whole name (`gpt-4`), or a prefix (`gpt-4o*`; `*` alone
/// matches everything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    /// Parse `name` or `prefix*`. A `*` anywhere but at the end is refused, so an operator
    /// never believes `gpt*4` does what it looks like.
    pub fn parse(pattern: &str) -> Result<Pattern, String> {
        if pattern.is_empty() {
            return Err("must not be empty".into());
        }
        match pattern.split_once('*') {
            None => Ok(Pattern::Exact(pattern.to_string())),
            Some((prefix, "")) => Ok(Pattern::Prefix(prefix.to_string())),
            Some(_) => Err("only a single trailing `*` (prefix match) is supported".into()),
        }
    }

    /// How well `model` matches: exact beats any prefix, a longer prefix beats a shorter one.
    pub fn score(&self, model: &str) -> Option<usize> {
        match self {
            Pattern::Exact(name) if name == model => Some(usize::MAX),
            Pattern::Prefix(prefix) if model.starts_with(prefix.as_str()) => Some(prefix.len()),
            _ => None,
        }
    }
}

/// The best-matching entry of `rules` for `model`.
pub fn best_match<'r, T>(rules: &'r [(Pattern, T)], model: &str) -> Option<&'r T> {
    rules
        .iter()
        .filter_map(|(p, v)| p.score(model).map(|s| (s, v)))
        .max_by_key(|(s, _)| *s)
        .map(|(_, v)| v)
}

/// One entry of the model map.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRule {
    pattern: Pattern,
    encoding: Encoding,
    safety_factor: f64,
}

impl ModelRule {
    /// A rule for `pattern` (see [`Pattern::parse`]).
    pub fn parse(pattern: &str, encoding: Encoding, safety_factor: f64) -> Result<Self, String> {
        Ok(ModelRule {
            pattern: Pattern::parse(pattern)?,
            encoding,
            safety_factor,
        })
    }

    fn matches(&self, model: &str) -> Option<usize> {
        self.pattern.score(model)
    }
}

/// How a model is to be counted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelCounting {
    /// The encoding to count with.
    pub encoding: Encoding,
    /// Multiplier on the raw count (1.0 for models counted with their own encoding).
    pub safety_factor: f64,
    /// True when the model matched a map entry (its own encoding, or an operator's choice);
    /// false when the fallback was used.
    pub matched: bool,
}

/// Model name → encoding. Exact names win over prefixes; among prefixes the longest wins,
/// so `gpt-4o*` beats `gpt-4*`. Operator rules are consulted before the built-in ones.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMap {
    operator_rules: Vec<ModelRule>,
    builtin_rules: Vec<ModelRule>,
    fallback: Encoding,
    fallback_factor: f64,
}

/// OpenAI's published model → encoding assignments (tiktoken's `model.py`).
const BUILTIN: &[(&str, Encoding)] = &[
    ("gpt-5*", Encoding::O200kBase),
    ("gpt-4.1*", Encoding::O200kBase),
    ("gpt-4.5*", Encoding::O200kBase),
    ("gpt-4o*", Encoding::O200kBase),
    ("chatgpt-4o*", Encoding::O200kBase),
    ("gpt-oss*", Encoding::O200kBase),
    ("o1*", Encoding::O200kBase),
    ("o3*", Encoding::O200kBase),
    ("o4*", Encoding::O200kBase),
    ("gpt-4", Encoding::Cl100kBase),
    ("gpt-4-*", Encoding::Cl100kBase),
    ("gpt-3.5-turbo*", Encoding::Cl100kBase),
    ("gpt-35-turbo*", Encoding::Cl100kBase),
    ("text-embedding-3*", Encoding::Cl100kBase),
    ("text-embedding-ada-002", Encoding::Cl100kBase),
    ("davinci-002", Encoding::Cl100kBase),
    ("babbage-002", Encoding::Cl100kBase),
];

impl ModelMap {
    /// A map of only the operator's rules.
    pub fn new(rules: Vec<ModelRule>, fallback: Encoding, fallback_factor: f64) -> Self {
        ModelMap {
            operator_rules: rules,
            builtin_rules: Vec::new(),
            fallback,
            fallback_factor,
        }
    }

    /// The built-in OpenAI map.
    pub fn builtin(fallback: Encoding, fallback_factor: f64) -> Self {
        let builtin_rules = BUILTIN
            .iter()
            .filter_map(|(p, e)| ModelRule::parse(p, *e, 1.0).ok())
            .collect();
        ModelMap {
            operator_rules: Vec::new(),
            builtin_rules,
            fallback,
            fallback_factor,
        }
    }

    /// This map with `rules` consulted before the existing ones.
    pub fn with_rules_first(mut self, rules: Vec<ModelRule>) -> Self {
        self.operator_rules = rules;
        self
    }

    /// How to count `model`.
    pub fn resolve(&self, model: &str) -> ModelCounting {
        for rules in [&self.operator_rules, &self.builtin_rules] {
            let best = rules
                .iter()
                .filter_map(|r| r.matches(model).map(|score| (score, r)))
                .max_by_key(|(score, _)| *score);
            if let Some((_, rule)) = best {
                return ModelCounting {
                    encoding: rule.encoding,
                    safety_factor: rule.safety_factor,
                    matched: true,
                };
            }
        }
        ModelCounting {
            encoding: self.fallback,
            safety_factor: self.fallback_factor,
            matched: false,
        }
    }

    /// Every encoding some model (or the fallback) can resolve to, sorted, without repeats.
    pub fn encodings(&self) -> Vec<Encoding> {
        let mut all: Vec<Encoding> = self
            .operator_rules
            .iter()
            .chain(self.builtin_rules.iter())
            .map(|r| r.encoding)
            .chain(std::iter::once(self.fallback))
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// Why a tokenizer could not be built.
#[derive(Debug)]
pub struct TokenizerError {
    encoding: Encoding,
    cause: String,
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not build the {} tokenizer: {}",
            self.encoding, self.cause
        )
    }
}

impl std::error::Error for TokenizerError {}

/// The tokenizers of one VM.
pub struct Tokenizers {
    o200k: Option<Bpe>,
    cl100k: Option<Bpe>,
    /// Counts of long texts seen before ([`Tokenizers::with_cache`]; none by default). A
    /// mutex only so that a `Tokenizers` may be shared (tests, native tools); a VM is one
    /// thread, and a lock that is taken is simply not waited for (the text is counted).
    cache: Mutex<CountCache>,
}

impl fmt::Debug for Tokenizers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizers")
            .field("o200k_base", &self.o200k.is_some())
            .field("cl100k_base", &self.cl100k.is_some())
            .finish()
    }
}

impl Tokenizers {
    /// Build the given encodings (and no others).
    pub fn build(encodings: &[Encoding]) -> Result<Tokenizers, TokenizerError> {
        let mut t = Tokenizers {
            o200k: None,
            cl100k: None,
            cache: Mutex::new(CountCache::new(0)),
        };
        for &encoding in encodings {
            let built = match encoding {
                Encoding::O200kBase => Bpe::o200k_base(),
                Encoding::Cl100kBase => Bpe::cl100k_base(),
            };
            if !built.is_consistent() {
                return Err(TokenizerError {
                    encoding,
                    cause: "the embedded rank table is damaged (rebuild the module)".into(),
                });
            }
            match encoding {
                Encoding::O200kBase => t.o200k = Some(built),
                Encoding::Cl100kBase => t.cl100k = Some(built),
            }
        }
        Ok(t)
    }

    /// Remember the counts of long texts, up to `capacity` bytes of them (see
    /// [`crate::tokenizer::count_cache`]).
    pub fn with_cache(self, capacity: usize) -> Tokenizers {
        Tokenizers {
            cache: Mutex::new(CountCache::new(capacity)),
            ..self
        }
    }

    /// Bytes the count cache holds.
    pub fn cache_used_bytes(&self) -> usize {
        self.cache.try_lock().map(|c| c.used_bytes()).unwrap_or(0)
    }

    /// What the count cache did since the last call.
    pub fn take_cache_activity(&self) -> CacheActivity {
        self.cache
            .try_lock()
            .map(|mut c| c.take_activity())
            .unwrap_or_default()
    }

    /// A counter for `encoding`, if it was built.
    pub fn counter(&self, encoding: Encoding) -> Option<TextCounter<'_>> {
        let bpe = match encoding {
            Encoding::O200kBase => self.o200k.as_ref(),
            Encoding::Cl100kBase => self.cl100k.as_ref(),
        }?;
        Some(TextCounter {
            bpe,
            encoding,
            cache: &self.cache,
        })
    }
}

/// Counts text with one encoding.
#[derive(Clone, Copy)]
pub struct TextCounter<'a> {
    bpe: &'a Bpe,
    encoding: Encoding,
    cache: &'a Mutex<CountCache>,
}

impl TextCounter<'_> {
    /// Tokens in `text`. Special-token spellings such as `<|endoftext|>` inside user text are
    /// counted as ordinary text, as the provider's API treats them. Long texts go through the
    /// count cache, when there is one.
    pub fn count(&self, text: &str) -> u64 {
        let count = |t: &str| self.bpe.count(t) as u64;
        if text.len() < MIN_TEXT_BYTES {
            return count(text);
        }
        match self.cache.try_lock() {
            Ok(mut cache) => cache.count(self.encoding, text, count),
            Err(_) => count(text),
        }
    }

    /// The tokens of the pieces of `text` that no continuation can change, and where the
    /// rest starts (see [`Bpe::count_settled`]; [`streamed::StreamedText`] uses it). Not
    /// cached: these are texts seen once.
    pub fn count_settled(&self, text: &str) -> (u64, usize) {
        let (tokens, tail) = self.bpe.count_settled(text);
        (tokens as u64, tail)
    }

    /// The tokens of `text` (tiktoken's `encode_ordinary`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.bpe.encode(text)
    }

    /// The encoding this counter uses.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use std::sync::OnceLock;

    /// Building a tokenizer takes a while; tests share one instance with both encodings.
    pub(crate) fn shared() -> &'static Tokenizers {
        static T: OnceLock<Tokenizers> = OnceLock::new();
        T.get_or_init(|| Tokenizers::build(&[Encoding::O200kBase, Encoding::Cl100kBase]).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::shared;
    use super::*;

    fn resolve(model: &str) -> (Encoding, bool) {
        let r = ModelMap::builtin(Encoding::Cl100kBase, 1.2).resolve(model);
        (r.encoding, r.matched)
    }

    #[test]
    fn gpt_4o_family_uses_o200k() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4o-2024-08-06",
            "gpt-4.1",
            "gpt-4.1-nano",
            "o1-mini",
            "o3",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "chatgpt-4o-latest",
        ] {
            assert_eq!(resolve(m), (Encoding::O200kBase, true), "{m}");
        }
    }

    #[test]
    fn gpt_4_and_3_5_use_cl100k() {
        for m in [
            "gpt-4",
            "gpt-4-0613",
            "gpt-4-turbo",
            "gpt-3.5-turbo",
            "gpt-3.5-turbo-0125",
            "text-embedding-3-small",
            "text-embedding-ada-002",
        ] {
            assert_eq!(resolve(m), (Encoding::Cl100kBase, true), "{m}");
        }
    }

    #[test]
    fn longest_prefix_wins_over_shorter_one() {
        // `gpt-4o-mini` starts with `gpt-4` too; the exact `gpt-4` rule must not catch it,
        // and `gpt-4-*` must not catch `gpt-4o`.
        assert_eq!(resolve("gpt-4o").0, Encoding::O200kBase);
        assert_eq!(resolve("gpt-4-32k").0, Encoding::Cl100kBase);
    }

    #[test]
    fn unknown_models_fall_back_with_the_safety_factor() {
        let map = ModelMap::builtin(Encoding::Cl100kBase, 1.2);
        let r = map.resolve("claude-sonnet-4-5");
        assert_eq!(
            r,
            ModelCounting {
                encoding: Encoding::Cl100kBase,
                safety_factor: 1.2,
                matched: false
            }
        );
        // A name that merely contains a known model is not that model.
        assert!(!map.resolve("my-gpt-4o").matched);
    }

    #[test]
    fn operator_rules_override_builtin_ones() {
        let rule = ModelRule::parse("gpt-4o-custom*", Encoding::Cl100kBase, 1.5).unwrap();
        let map = ModelMap::builtin(Encoding::O200kBase, 1.0).with_rules_first(vec![rule]);
        let r = map.resolve("gpt-4o-custom-1");
        assert_eq!((r.encoding, r.safety_factor), (Encoding::Cl100kBase, 1.5));
        assert_eq!(map.resolve("gpt-4o").encoding, Encoding::O200kBase);
    }

    #[test]
    fn exact_rule_beats_prefix_rule() {
        let rules = vec![
            ModelRule::parse("m*", Encoding::Cl100kBase, 1.0).unwrap(),
            ModelRule::parse("m1", Encoding::O200kBase, 1.0).unwrap(),
        ];
        let map = ModelMap::new(rules, Encoding::Cl100kBase, 1.0);
        assert_eq!(map.resolve("m1").encoding, Encoding::O200kBase);
        assert_eq!(map.resolve("m12").encoding, Encoding::Cl100kBase);
    }

    #[test]
    fn pattern_with_inner_star_is_refused() {
        assert!(ModelRule::parse("gpt*4", Encoding::O200kBase, 1.0).is_err());
        assert!(ModelRule::parse("", Encoding::O200kBase, 1.0).is_err());
    }

    #[test]
    fn counts_match_tiktoken_reference_values() {
        // Reference values from OpenAI's tiktoken for these strings.
        let t = shared();
        let o = t.counter(Encoding::O200kBase).unwrap();
        let c = t.counter(Encoding::Cl100kBase).unwrap();
        assert_eq!(o.count("tiktoken is great!"), 6);
        assert_eq!(c.count("tiktoken is great!"), 6);
        assert_eq!(c.count("antidisestablishmentarianism"), 6);
        assert_eq!(o.count(""), 0);
    }

    #[test]
    fn special_token_text_counts_as_ordinary_text() {
        let c = shared().counter(Encoding::Cl100kBase).unwrap();
        assert!(c.count("<|endoftext|>") > 1);
    }

    #[test]
    fn only_requested_encodings_are_built() {
        let t = Tokenizers::build(&[Encoding::Cl100kBase]).unwrap();
        assert!(t.counter(Encoding::O200kBase).is_none());
        assert!(t.counter(Encoding::Cl100kBase).is_some());
    }
}
