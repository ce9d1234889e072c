//! The configuration document as written: one serde struct per JSON object, mirroring it
//! field by field and refusing unknown fields (`tests/docs.rs` checks that
//! docs/configuration.md lists exactly these fields).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{AbandonedPolicy, FailureMode, MalformedPolicy};
use crate::budget::window::WindowKind;
use crate::tokenizer::Encoding;

/// The configuration document as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub(super) api: String,
    #[serde(default)]
    pub(super) tokenizer: RawTokenizer,
    pub(super) default_max_output_tokens: Option<u64>,
    pub(super) inject_stream_usage: Option<bool>,
    pub(super) hold_request_headers: Option<bool>,
    pub(super) malformed_request: Option<MalformedPolicy>,
    pub(super) abandoned: Option<AbandonedPolicy>,
    pub(super) image_tokens: Option<RawImageTokens>,
    pub(super) max_response_body_bytes: Option<u64>,
    pub(super) max_stream_text_bytes: Option<u64>,
    #[serde(default)]
    pub(super) stats: RawStats,
    #[serde(default)]
    pub(super) budgets: Vec<RawBudget>,
    pub(super) priority: Option<RawPriority>,
    #[serde(default)]
    pub(super) prices: BTreeMap<String, RawPrice>,
    pub(super) reroute: Option<RawReroute>,
    pub(super) admin: Option<RawAdmin>,
    pub(super) shared_data: Option<RawSharedData>,
    pub(super) rate_limit_service: Option<RawRateLimitService>,
    pub(super) should_retry_max_secs: Option<u64>,
    pub(super) cache: Option<RawCache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) apis: Option<Vec<String>>,
    #[serde(default)]
    pub(super) models: Vec<String>,
    #[serde(default)]
    pub(super) routes: Vec<String>,
    pub(super) ttl_secs: Option<u64>,
    pub(super) max_entries: Option<u64>,
    pub(super) max_entry_bytes: Option<u64>,
    pub(super) max_bytes: Option<u64>,
    pub(super) scope: Option<String>,
    pub(super) key: Option<String>,
    pub(super) deterministic_only: Option<bool>,
    pub(super) coalesce: Option<bool>,
    pub(super) coalesce_wait_ms: Option<u64>,
    pub(super) charge_hits: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimitService {
    pub(super) cluster: String,
    pub(super) domain: Option<String>,
    pub(super) timeout_ms: Option<u64>,
    pub(super) on_failure: Option<FailureMode>,
    pub(super) flush_interval_ms: Option<u64>,
    pub(super) settle_retry_secs: Option<u64>,
    pub(super) protocol: Option<String>,
    pub(super) reservation_ttl_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub(super) name: String,
    pub(super) key: String,
    pub(super) backend: Option<String>,
    pub(super) window: Option<WindowKind>,
    pub(super) utc_offset: Option<String>,
    pub(super) unit: Option<String>,
    pub(super) base: Option<f64>,
    pub(super) elastic: Option<f64>,
    pub(super) burst: Option<RawBurst>,
    pub(super) action: Option<String>,
    pub(super) warn_at: Option<f64>,
    pub(super) degrade_from: Option<f64>,
    pub(super) priority_ceilings: Option<RawCeilings>,
    pub(super) max_request_tokens: Option<f64>,
    pub(super) oversize: Option<String>,
    pub(super) max_keys: Option<u64>,
    #[serde(default)]
    pub(super) base_overrides: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBurst {
    pub(super) amount: f64,
    pub(super) from: String,
    pub(super) to: String,
    #[serde(default)]
    pub(super) weekdays: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCeilings {
    pub(super) p0: Option<f64>,
    pub(super) p1: Option<f64>,
    pub(super) p2: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPriority {
    pub(super) header: Option<String>,
    #[serde(default)]
    pub(super) routes: BTreeMap<String, String>,
    pub(super) default: Option<String>,
    pub(super) retries: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    pub(super) input: f64,
    pub(super) cached_input: Option<f64>,
    pub(super) output: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReroute {
    pub(super) header: Option<String>,
    pub(super) value: Option<String>,
    #[serde(default)]
    pub(super) models: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) path: String,
    pub(super) token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSharedData {
    pub(super) cas_retries: Option<u32>,
    pub(super) on_failure: Option<FailureMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokenizer {
    #[serde(default)]
    pub(super) models: Vec<RawModelRule>,
    pub(super) builtin_models: Option<bool>,
    pub(super) fallback_encoding: Option<Encoding>,
    pub(super) fallback_safety_factor: Option<f64>,
    pub(super) cache_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModelRule {
    #[serde(rename = "match")]
    pub(super) pattern: String,
    pub(super) encoding: Encoding,
    pub(super) safety_factor: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawImageTokens {
    pub(super) low: Option<u64>,
    pub(super) high: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStats {
    pub(super) model_tag_limit: Option<u64>,
    pub(super) tenant: Option<String>,
    pub(super) tenant_tag_limit: Option<u64>,
}
