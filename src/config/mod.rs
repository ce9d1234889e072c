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

use std::collections::HashMap;

use serde::Deserialize;

use crate::budget::price::PriceList;
use crate::budget::window::WindowKind;
use crate::budget::{Budget, KeySource, OversizeAction, Priority, TripAction, Unit};
use crate::tokenizer::{Encoding, ModelMap, ModelRule, Pattern};

mod compile;
mod raw;

use compile::*;
pub use raw::RawConfig;
use raw::*;

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

/// What a request whose client left before the response headers arrived is charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbandonedPolicy {
    /// Keep the reservation: the provider has usually generated (and bills) the answer by
    /// the time anyone notices the client is gone, so this is the safe side.
    Charge,
    /// Give the reservation back (the provider did not bill, or the operator accepts the
    /// risk of under-counting).
    Refund,
}

/// The validated configuration the filter runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Which model names use which encoding, and the fallback for all others.
    pub models: ModelMap,
    /// Bytes of long texts whose counts a VM remembers (`tokenizer.cache_bytes`; 0: none).
    pub count_cache_bytes: usize,
    /// Completion tokens reserved when a request does not cap its output.
    pub default_max_output_tokens: u64,
    /// Add `stream_options.include_usage: true` to streaming chat/completions requests.
    pub inject_stream_usage: bool,
    /// Hold LLM request headers until the body is read (needs Envoy's
    /// `allow_on_headers_stop_iteration`). `false` is count-and-reject mode, for proxies
    /// that cannot set that flag (Istio's WasmPlugin): headers go on at once, the body is
    /// still read before it is forwarded, so counting, reservations and 429/400 work, but
    /// nothing that changes routing or the body (reroute, degradation, truncation, usage
    /// injection) can.
    pub hold_request_headers: bool,
    /// Outcome for unreadable bodies on LLM paths.
    pub malformed_request: MalformedPolicy,
    /// What a request abandoned before its response headers is charged.
    pub abandoned: AbandonedPolicy,
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
    /// Where the `tenant` stat tag comes from; `None` switches the tag off.
    pub tenant_tag: Option<KeySource>,
    /// Distinct `tenant` tag values per VM before further tenants are tagged `other`.
    pub tenant_tag_limit: usize,
    /// Budgets every LLM request must pass, in order (the local, shared-data ones).
    pub budgets: Vec<Budget>,
    /// Budgets kept by a rate limit service, across proxies (`backend: global`).
    pub global_budgets: Vec<GlobalBudget>,
    /// The rate limit service global budgets ask; set when there is any global budget.
    pub rate_limit_service: Option<RateLimitService>,
    /// Per-key base allowances, by budget index then key.
    pub base_overrides: Vec<HashMap<String, u64>>,
    /// Where a request's priority comes from.
    pub priority: PrioritySource,
    /// Model prices, for USD budgets.
    pub prices: PriceList,
    /// Where rerouted requests go.
    pub reroute: Reroute,
    /// The admin endpoint, when enabled.
    pub admin: Option<Admin>,
    /// CAS retries per shared-data update before the failure mode applies.
    pub cas_retries: u32,
    /// What happens when shared data cannot be updated.
    pub on_store_failure: FailureMode,
    /// `x-should-retry: false` is sent when the reset is further away than this.
    pub should_retry_max_secs: u64,
    /// The response cache, when configured.
    pub cache: Option<crate::cache::Cache>,
}

/// Where a request's priority comes from: a trusted header, else the route, else a default.
#[derive(Clone, Debug, PartialEq)]
pub struct PrioritySource {
    pub header: Option<String>,
    pub routes: HashMap<String, Priority>,
    pub default: Priority,
    /// The class of requests an SDK marks as retries (`x-stainless-retry-count` above 0),
    /// whatever else they say: `p2` sheds retries first.
    pub retries: Option<Priority>,
}

/// Rerouting: the header that selects the economy route, and cheaper models.
#[derive(Clone, Debug, PartialEq)]
pub struct Reroute {
    pub header: String,
    pub value: String,
    pub models: Vec<(Pattern, String)>,
}

/// The admin endpoint: a path and the bearer token that guards it.
#[derive(Clone, Debug, PartialEq)]
pub struct Admin {
    pub path: String,
    pub token: String,
}

/// A budget kept by a rate limit service (envoyproxy/ratelimit, Limitador) for every proxy
/// that asks it: the service owns the limit and the window, the filter sends what each
/// request reserves as `hits_addend` on the descriptor `budget=<name>, key=<identity>`.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalBudget {
    pub name: String,
    pub key: KeySource,
    /// What one hit is: a token, or a micro-dollar.
    pub unit: Unit,
    /// Largest prompt + completion reservation one request may carry, in tokens.
    pub max_request_tokens: Option<u64>,
    pub oversize: OversizeAction,
    /// Usage ratio from which admitted requests carry the warning header, when the service
    /// reports the limit and what remains (envoyproxy/ratelimit's descriptor status).
    pub warn_at: f64,
}

/// Where global budgets are kept, and what happens when it cannot answer.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimitService {
    /// The Envoy cluster (HTTP/2) of the rate limit service.
    pub cluster: String,
    /// The descriptor domain (Limitador: the namespace).
    pub domain: String,
    /// How long a request waits for the service's verdict.
    pub timeout_ms: u64,
    /// What a request gets when the service fails or times out.
    pub on_failure: FailureMode,
    /// How often each worker sends its queued settlements.
    pub flush_interval_ms: u64,
    /// How long a settlement the service cannot take is retried before it is dropped.
    pub settle_retry_secs: u64,
    /// The protocol spoken to the service.
    pub protocol: Protocol,
    /// How long Limitador keeps a reservation nobody commits (`Protocol::Limitador`).
    pub reservation_ttl_secs: u64,
}

/// How global budgets talk to the rate limit service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Envoy's `ShouldRateLimit` with `hits_addend` (envoyproxy/ratelimit, Limitador): a
    /// reservation is a charge, and what a request does not use is never given back.
    Envoy,
    /// Limitador's `Reserve` / `Commit` (limitador-server 0.14 and later): an atomic hold,
    /// settled with the real cost, the unused rest given back.
    Limitador,
}

/// Behaviour when a budget cannot be read or updated (CAS retries exhausted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through unreserved (counted in `tokenfuse_fail_open`).
    Open,
    /// Answer 503.
    Closed,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            models: ModelMap::builtin(Encoding::O200kBase, 1.0),
            count_cache_bytes: 4 << 20,
            default_max_output_tokens: 4096,
            inject_stream_usage: false,
            hold_request_headers: true,
            malformed_request: MalformedPolicy::Reject,
            abandoned: AbandonedPolicy::Charge,
            image_tokens_low: 85,
            image_tokens_high: 765,
            max_response_body_bytes: 8 << 20,
            max_stream_text_bytes: 1 << 20,
            model_tag_limit: 64,
            tenant_tag: None,
            tenant_tag_limit: 100,
            budgets: Vec::new(),
            global_budgets: Vec::new(),
            rate_limit_service: None,
            base_overrides: Vec::new(),
            priority: PrioritySource {
                header: None,
                routes: HashMap::new(),
                default: Priority::P1,
                retries: None,
            },
            prices: PriceList::default(),
            reroute: Reroute {
                header: "x-tokenfuse-route".into(),
                value: "economy".into(),
                models: Vec::new(),
            },
            admin: None,
            cas_retries: 32,
            on_store_failure: FailureMode::Open,
            should_retry_max_secs: 60,
            cache: None,
        }
    }
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

        let count_cache_bytes = match raw.tokenizer.cache_bytes {
            None => defaults.count_cache_bytes,
            Some(n) if n > 256 << 20 => {
                return Err(ConfigError::new(
                    "tokenizer.cache_bytes",
                    "must be at most 268435456 (256 MiB per worker VM); 0 turns the cache off",
                ))
            }
            Some(n) => usize::try_from(n).map_err(|_| {
                ConfigError::new(
                    "tokenizer.cache_bytes",
                    "does not fit this platform's address space",
                )
            })?,
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

        let hold_request_headers = raw.hold_request_headers.unwrap_or(true);
        if !hold_request_headers {
            // The headers (route, content-length) are upstream before the body is read.
            let why = "cannot work with hold_request_headers: false (the request headers, \
                       route and content-length included, have gone upstream before the body \
                       is read)";
            if raw.inject_stream_usage == Some(true) {
                return Err(ConfigError::new("inject_stream_usage", why));
            }
            for (i, b) in raw.budgets.iter().enumerate() {
                if b.action.as_deref() == Some("reroute") {
                    return Err(ConfigError::new(format!("budgets[{i}].action"), why));
                }
                if b.degrade_from.is_some() {
                    return Err(ConfigError::new(format!("budgets[{i}].degrade_from"), why));
                }
                if b.oversize.as_deref() == Some("truncate") {
                    return Err(ConfigError::new(format!("budgets[{i}].oversize"), why));
                }
            }
        }
        let prices = compile_prices(&raw.prices)?;
        let mut budgets = Vec::with_capacity(raw.budgets.len());
        let mut base_overrides = Vec::with_capacity(raw.budgets.len());
        let mut global_budgets: Vec<GlobalBudget> = Vec::new();
        for (i, rb) in raw.budgets.iter().enumerate() {
            let (name, unit) = match rb.backend.as_deref() {
                None | Some("local") => {
                    let (budget, overrides) = compile_budget(i, rb)?;
                    let named = (budget.name.clone(), budget.unit);
                    budgets.push(budget);
                    base_overrides.push(overrides);
                    named
                }
                Some("global") => {
                    let budget = compile_global_budget(i, rb)?;
                    let named = (budget.name.clone(), budget.unit);
                    global_budgets.push(budget);
                    named
                }
                Some(_) => {
                    return Err(ConfigError::new(
                        format!("budgets[{i}].backend"),
                        "must be `local` (this proxy's shared data) or `global` (the rate limit service)",
                    ))
                }
            };
            let uses = budgets
                .iter()
                .filter(|b| b.name == name)
                .count()
                .saturating_add(global_budgets.iter().filter(|b| b.name == name).count());
            if uses > 1 {
                return Err(ConfigError::new(
                    format!("budgets[{i}].name"),
                    "budget names must be unique",
                ));
            }
            if unit == Unit::Usd && !prices.has_catch_all() {
                return Err(ConfigError::new(
                    "prices",
                    "a USD budget needs a price for every model: add a catch-all entry \"*\"",
                ));
            }
        }
        let rate_limit_service = match raw.rate_limit_service {
            Some(r) => Some(compile_rate_limit_service(r)?),
            None if !global_budgets.is_empty() => {
                return Err(ConfigError::new(
                    "rate_limit_service",
                    "a global budget needs `rate_limit_service` (at least its Envoy `cluster`)",
                ))
            }
            None => None,
        };
        let priority = compile_priority(raw.priority.as_ref())?;
        let reroute = compile_reroute(raw.reroute.as_ref(), &defaults.reroute)?;
        let admin = match raw.admin {
            None => None,
            Some(a) => {
                // Requests are matched by their normalized path (admin.rs): the configured
                // path must be one already, so that the two compare.
                let normalized = crate::exchange::admin::normalize_path(&a.path);
                if !a.path.starts_with('/')
                    || normalized == "/"
                    || normalized != a.path.trim_end_matches('/')
                {
                    return Err(ConfigError::new(
                        "admin.path",
                        "must be an absolute path other than `/`, in lower case, without `?`, `#`, `%`, `.` or empty segments",
                    ));
                }
                if a.token.len() < 16 {
                    return Err(ConfigError::new(
                        "admin.token",
                        "must be at least 16 characters",
                    ));
                }
                Some(Admin {
                    path: a.path.trim_end_matches('/').to_string(),
                    token: a.token,
                })
            }
        };
        let shared = raw.shared_data.unwrap_or(RawSharedData {
            cas_retries: None,
            on_failure: None,
        });
        let cas_retries = shared.cas_retries.unwrap_or(defaults.cas_retries);
        if !(1..=1000).contains(&cas_retries) {
            return Err(ConfigError::new(
                "shared_data.cas_retries",
                "must be between 1 and 1000",
            ));
        }

        // The tenant tag: as configured ("off" disables it), else the first budget's key.
        let tenant_tag = match raw.stats.tenant.as_deref() {
            Some("off") => None,
            Some(source) => Some(parse_key("stats.tenant", source)?),
            None => budgets
                .first()
                .map(|b| b.key.clone())
                .or_else(|| global_budgets.first().map(|b| b.key.clone())),
        };
        let tenant_tag_limit = match raw.stats.tenant_tag_limit {
            Some(n) if n > 10_000 => {
                return Err(ConfigError::new(
                    "stats.tenant_tag_limit",
                    "must be at most 10000 (each value is a metric series per VM)",
                ))
            }
            Some(n) => n as usize,
            None => defaults.tenant_tag_limit,
        };

        let cache = match raw.cache {
            Some(c) => Some(compile::compile_cache(c, tenant_tag.as_ref())?),
            None => None,
        };

        Ok(Config {
            cache,
            tenant_tag,
            tenant_tag_limit,
            budgets,
            global_budgets,
            rate_limit_service,
            base_overrides,
            priority,
            prices,
            reroute,
            admin,
            cas_retries,
            on_store_failure: shared.on_failure.unwrap_or(defaults.on_store_failure),
            should_retry_max_secs: raw
                .should_retry_max_secs
                .unwrap_or(defaults.should_retry_max_secs),
            models,
            count_cache_bytes,
            default_max_output_tokens,
            inject_stream_usage: raw.inject_stream_usage.unwrap_or(false),
            hold_request_headers,
            malformed_request: raw.malformed_request.unwrap_or(MalformedPolicy::Reject),
            abandoned: raw.abandoned.unwrap_or(defaults.abandoned),
            image_tokens_low,
            image_tokens_high,
            max_response_body_bytes,
            max_stream_text_bytes,
            model_tag_limit,
        })
    }

    /// Budget `index` as it applies to `key`: with the key's base override, if it has one.
    pub fn budget_for(&self, index: usize, key: &str) -> Option<std::borrow::Cow<'_, Budget>> {
        let budget = self.budgets.get(index)?;
        Some(
            match self.base_overrides.get(index).and_then(|o| o.get(key)) {
                Some(base) => std::borrow::Cow::Owned(Budget {
                    base: *base,
                    ..budget.clone()
                }),
                None => std::borrow::Cow::Borrowed(budget),
            },
        )
    }

    /// Whether some local budget can send a request to the cheaper model (a `reroute`
    /// action, or progressive degradation): only then does planning need its read-only
    /// first pass.
    pub fn may_change_route(&self) -> bool {
        self.budgets
            .iter()
            .any(|b| b.action != TripAction::Reject || b.degrade_from.is_some())
    }

    /// Whether any budget, local or global, applies to LLM requests.
    pub fn has_budgets(&self) -> bool {
        !self.budgets.is_empty() || !self.global_budgets.is_empty()
    }

    /// Every per-request cap: (budget name, cap in tokens, what to do above it).
    pub fn request_caps(&self) -> impl Iterator<Item = (&str, u64, OversizeAction)> {
        let local = self
            .budgets
            .iter()
            .filter_map(|b| Some((b.name.as_str(), b.max_request_tokens?, b.oversize)));
        let global = self
            .global_budgets
            .iter()
            .filter_map(|b| Some((b.name.as_str(), b.max_request_tokens?, b.oversize)));
        local.chain(global)
    }

    /// What the operator should know at load about a configuration that is valid: one line
    /// per local budget whose window is a day or longer, since shared data lives in one
    /// Envoy process and starts from zero when Envoy restarts.
    pub fn load_warnings(&self) -> Vec<String> {
        self.budgets
            .iter()
            .filter(|b| {
                matches!(
                    b.window.kind,
                    WindowKind::Day | WindowKind::Week | WindowKind::Month
                )
            })
            .map(|b| {
                format!(
                    "budget {}: a local {} budget lives in this Envoy's shared data and starts \
                     from zero when Envoy restarts (and counts per Envoy, not across replicas); \
                     for a budget that must outlive restarts use \"backend\": \"global\" \
                     (docs/global-budgets.md)",
                    b.name,
                    b.window.kind.as_str()
                )
            })
            .collect()
    }

    /// The encodings this configuration can ask for: exactly the tokenizers to build.
    pub fn encodings(&self) -> Vec<Encoding> {
        self.models.encodings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_name_identities_as_stored_and_never_quote_a_refused_one() {
        let doc = |key: &str| {
            format!(
                r#"{{"api":"v1","budgets":[{{"name":"d","key":"header:x-tenant","window":"day","base":1,"base_overrides":{{"{key}":5}}}}]}}"#
            )
        };
        for ok in ["acme@corp:eu", "_h-0123456789abcdef0123456789abcdef"] {
            let c = Config::parse(doc(ok).as_bytes()).unwrap();
            assert_eq!(c.budget_for(0, ok).unwrap().base, 5, "{ok}");
        }
        let e = err(&doc("sk live SECRET"));
        assert_eq!(e.field, "budgets[0].base_overrides");
        assert!(!e.to_string().contains("SECRET"), "{e}");
    }

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
    fn the_count_cache_is_on_by_default_and_bounded() {
        assert_eq!(
            Config::parse(br#"{"api":"v1"}"#).unwrap().count_cache_bytes,
            4 << 20
        );
        let off = Config::parse(br#"{"api":"v1","tokenizer":{"cache_bytes":0}}"#).unwrap();
        assert_eq!(off.count_cache_bytes, 0);
        assert_eq!(
            err(r#"{"api":"v1","tokenizer":{"cache_bytes":999999999999}}"#).field,
            "tokenizer.cache_bytes"
        );
    }

    #[test]
    fn without_builtin_models_only_configured_encodings_are_built() {
        let c = Config::parse(br#"{"api":"v1","tokenizer":{"builtin_models":false,"fallback_encoding":"o200k_base","models":[{"match":"gpt-4o*","encoding":"o200k_base"}]}}"#).unwrap();
        assert_eq!(c.encodings(), vec![Encoding::O200kBase]);
    }

    #[test]
    fn count_and_reject_mode_refuses_what_needs_held_headers() {
        let base = r#""budgets":[{"name":"b","key":"constant:all","window":"day","base":10"#;
        for (extra, field) in [
            (r#","inject_stream_usage":true"#, "inject_stream_usage"),
            (
                &format!(r#",{base},"action":"reroute"}}]"#)[..],
                "budgets[0].action",
            ),
            (
                &format!(r#",{base},"degrade_from":0.5}}]"#)[..],
                "budgets[0].degrade_from",
            ),
            (
                &format!(r#",{base},"oversize":"truncate"}}]"#)[..],
                "budgets[0].oversize",
            ),
        ] {
            let doc = format!(r#"{{"api":"v1","hold_request_headers":false{extra}}}"#);
            let e = err(&doc);
            assert_eq!(e.field, field, "{doc}");
            assert!(e.reason.contains("hold_request_headers"), "{e}");
        }
        let ok = format!(
            r#"{{"api":"v1","hold_request_headers":false,{base},"max_request_tokens":5}}]}}"#
        );
        assert!(!Config::parse(ok.as_bytes()).unwrap().hold_request_headers);
        assert!(
            Config::parse(br#"{"api":"v1"}"#)
                .unwrap()
                .hold_request_headers
        );
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

    #[test]
    fn global_budgets_compile_apart_from_local_ones() {
        let c = Config::parse(
            br#"{"api":"v1","rate_limit_service":{"cluster":"rls"},
                 "budgets":[{"name":"m","key":"header:x-tenant","window":"minute","base":10},
                            {"name":"g","key":"header:x-team","backend":"global","max_request_tokens":500}]}"#,
        )
        .unwrap();
        assert_eq!(c.budgets.len(), 1);
        assert_eq!(c.global_budgets.len(), 1);
        let s = c.rate_limit_service.as_ref().unwrap();
        assert_eq!(
            (
                s.domain.as_str(),
                s.timeout_ms,
                s.on_failure,
                s.flush_interval_ms,
                s.settle_retry_secs
            ),
            ("tokenfuse", 100, FailureMode::Open, 100, 300)
        );
        let caps: Vec<_> = c.request_caps().map(|(n, cap, _)| (n, cap)).collect();
        assert_eq!(caps, vec![("g", 500)]);
    }

    #[test]
    fn a_global_budget_refuses_what_the_service_decides() {
        for (extra, field) in [
            (r#""window":"day""#, "budgets[0].window"),
            (r#""base":100"#, "budgets[0].base"),
            (
                r#""burst":{"amount":1,"from":"09:00","to":"17:00"}"#,
                "budgets[0].burst",
            ),
            (
                r#""priority_ceilings":{"p2":0.5}"#,
                "budgets[0].priority_ceilings",
            ),
            (r#""action":"reroute""#, "budgets[0].action"),
            (r#""warn_at":1.5"#, "budgets[0].warn_at"),
            (
                r#""max_request_tokens":0.5"#,
                "budgets[0].max_request_tokens",
            ),
        ] {
            let doc = format!(
                r#"{{"api":"v1","rate_limit_service":{{"cluster":"rls"}},
                    "budgets":[{{"name":"g","key":"header:x","backend":"global",{extra}}}]}}"#
            );
            assert_eq!(err(&doc).field, field, "{extra}");
        }
    }

    #[test]
    fn a_global_budget_needs_the_service_and_a_known_backend() {
        let e = err(r#"{"api":"v1","budgets":[{"name":"g","key":"header:x","backend":"global"}]}"#);
        assert_eq!(e.field, "rate_limit_service");
        let e = err(r#"{"api":"v1","budgets":[{"name":"g","key":"header:x","backend":"redis"}]}"#);
        assert_eq!(e.field, "budgets[0].backend");
        let e = err(r#"{"api":"v1","budgets":[{"name":"g","key":"header:x","base":5}]}"#);
        assert_eq!(e.field, "budgets[0].window");
        let e = err(r#"{"api":"v1","rate_limit_service":{"cluster":"rls"},
                "budgets":[{"name":"g","key":"header:x","window":"day","base":5},
                           {"name":"g","key":"header:x","backend":"global"}]}"#);
        assert_eq!(e.field, "budgets[1].name");
        for (service, field) in [
            (r#"{"cluster":"rls","timeout_ms":0}"#, "timeout_ms"),
            (r#"{"cluster":"rls","domain":""}"#, "domain"),
            (r#"{"cluster":" "}"#, "cluster"),
        ] {
            let doc = format!(r#"{{"api":"v1","rate_limit_service":{service}}}"#);
            assert_eq!(err(&doc).field, format!("rate_limit_service.{field}"));
        }
    }

    #[test]
    fn the_protocol_defaults_to_envoy_and_limitador_takes_a_reservation_ttl() {
        let parse = |service: &str| {
            Config::parse(format!(r#"{{"api":"v1","rate_limit_service":{service}}}"#).as_bytes())
        };
        let s = parse(r#"{"cluster":"rls"}"#)
            .unwrap()
            .rate_limit_service
            .unwrap();
        assert_eq!((s.protocol, s.reservation_ttl_secs), (Protocol::Envoy, 60));
        let s = parse(r#"{"cluster":"rls","protocol":"limitador"}"#)
            .unwrap()
            .rate_limit_service
            .unwrap();
        assert_eq!(
            (s.protocol, s.reservation_ttl_secs),
            (Protocol::Limitador, 60)
        );
        let s = parse(r#"{"cluster":"rls","protocol":"limitador","reservation_ttl_secs":600}"#)
            .unwrap()
            .rate_limit_service
            .unwrap();
        assert_eq!(s.reservation_ttl_secs, 600);
        for (service, field) in [
            (r#"{"cluster":"rls","protocol":"redis"}"#, "protocol"),
            (
                r#"{"cluster":"rls","protocol":"limitador","reservation_ttl_secs":0}"#,
                "reservation_ttl_secs",
            ),
            (
                r#"{"cluster":"rls","reservation_ttl_secs":30}"#,
                "reservation_ttl_secs",
            ),
        ] {
            let doc = format!(r#"{{"api":"v1","rate_limit_service":{service}}}"#);
            assert_eq!(err(&doc).field, format!("rate_limit_service.{field}"));
        }
    }

    #[test]
    fn local_budgets_of_a_day_or_longer_warn_that_a_restart_starts_them_from_zero() {
        let c = Config::parse(
            br#"{"api":"v1","rate_limit_service":{"cluster":"rls"},
                 "budgets":[{"name":"m","key":"header:x","window":"minute","base":10},
                            {"name":"h","key":"header:x","window":"hour","base":10},
                            {"name":"d","key":"header:x","window":"day","base":10},
                            {"name":"mo","key":"header:x","window":"month","base":10},
                            {"name":"g","key":"header:x","backend":"global"}]}"#,
        )
        .unwrap();
        let w = c.load_warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("budget d: a local day budget"), "{}", w[0]);
        assert!(w[0].contains("starts from zero when Envoy restarts"));
        assert!(w[0].contains(r#""backend": "global""#));
        assert!(w[1].starts_with("budget mo: a local month budget"));
        assert!(Config::parse(br#"{"api":"v1"}"#)
            .unwrap()
            .load_warnings()
            .is_empty());
    }
}
