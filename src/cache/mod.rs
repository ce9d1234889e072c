//! Paying once: a response cache in shared data, and coalescing of identical requests.
//!
//! - [`Cache`]: what is cached (`cache` in the configuration): which APIs, models and
//!   routes, for how long, how big, and in whose scope.
//! - [`ask`]: whether a request may be answered from the cache and its answer kept — by
//!   default only answers meant to repeat (`temperature: 0`, or a `seed`), or any when the
//!   client sends `cache-control: max-age=N`; `no-cache` refreshes, `no-store` bypasses.
//! - [`key`]: a SHA-256 of everything that changes the answer: the API, the model that
//!   serves it, the scope (the tenant, unless `scope: shared`), and the request body in a
//!   canonical form without the fields that only change its transport (`stream`,
//!   `stream_options`).
//! - [`store`]: the bounded shared-data store, with the in-flight claims that coalesce
//!   identical requests across workers.
//! - [`shape`]: answers kept as JSON, served as JSON or as the API's event stream.

pub mod shape;
pub mod store;

use serde_json::Value;

use crate::budget::KeySource;
use crate::llm::api::ApiKind;
use crate::tokenizer::Pattern;

pub use store::{Bounds, Entry, Found, Key};

/// Whose answers a request may get.
#[derive(Clone, Debug, PartialEq)]
pub enum Scope {
    /// Only answers made for the same identity (the key source's stored key).
    PerIdentity(KeySource),
    /// Answers are shared by every client.
    Shared,
}

/// The `cache` section, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Cache {
    /// APIs whose answers are cached.
    pub apis: Vec<ApiKind>,
    /// Model patterns whose answers are cached (empty: every model).
    pub models: Vec<Pattern>,
    /// Route names whose requests are cached (empty: every route).
    pub routes: Vec<String>,
    /// How long an answer is served, ms.
    pub ttl_ms: u64,
    /// Entries the store has room for (ways: a multiple of [`store::WAYS`]).
    pub max_entries: u32,
    /// Largest answer kept, bytes of its JSON body.
    pub max_entry_bytes: usize,
    /// Most bytes of answers held together.
    pub max_bytes: u64,
    pub scope: Scope,
    /// Cache only requests whose answer is meant to repeat, unless the client opts in.
    pub deterministic_only: bool,
    /// Identical requests wait for the one in flight (instead of going upstream too).
    pub coalesce: bool,
    /// The longest a request waits for an identical one in flight, ms.
    pub coalesce_wait_ms: u64,
    /// Charge hits to the local budgets as if the upstream had answered (default: free).
    pub charge_hits: bool,
}

impl Cache {
    /// The store's shape.
    pub fn bounds(&self, cas_retries: u32) -> Bounds {
        Bounds {
            sets: self.max_entries.div_ceil(store::WAYS as u32).max(1),
            max_entry_bytes: self.max_entry_bytes,
            max_bytes: self.max_bytes,
            cas_retries,
        }
    }
}

/// What a request's `cache-control` header says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    /// `max-age=N`, seconds.
    pub max_age: Option<u64>,
}

impl Directives {
    /// Parse a `cache-control` value; unknown directives are ignored.
    pub fn parse(value: Option<&str>) -> Directives {
        let mut d = Directives::default();
        for part in value.unwrap_or("").split(',') {
            let part = part.trim();
            let (name, arg) = part.split_once('=').unwrap_or((part, ""));
            match name.trim().to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "max-age" => d.max_age = arg.trim().trim_matches('"').parse().ok(),
                _ => {}
            }
        }
        d
    }
}

/// What the cache does for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Not cached (the stat tag says why).
    Bypass(&'static str),
    /// Looked up (`read`), and its answer kept when complete.
    Use { read: bool, max_age_ms: Option<u64> },
}

/// Whether `body` (the request of `kind` for `model`, on `route`) is answered from the
/// cache and kept in it.
pub fn ask(
    cache: &Cache,
    kind: ApiKind,
    model: &str,
    route: Option<&str>,
    body: &Value,
    directives: Directives,
) -> Ask {
    if !cache.apis.contains(&kind) {
        return Ask::Bypass("api");
    }
    if !cache.models.is_empty() && !cache.models.iter().any(|p| p.score(model).is_some()) {
        return Ask::Bypass("model");
    }
    if !cache.routes.is_empty() && !route.is_some_and(|r| cache.routes.iter().any(|x| x == r)) {
        return Ask::Bypass("route");
    }
    if directives.no_store {
        return Ask::Bypass("no_store");
    }
    let opted_in = directives.max_age.is_some_and(|s| s > 0);
    if cache.deterministic_only && !opted_in && !deterministic(body) {
        return Ask::Bypass("nondeterministic");
    }
    Ask::Use {
        read: !directives.no_cache && directives.max_age != Some(0),
        max_age_ms: directives
            .max_age
            .filter(|s| *s > 0)
            .map(|s| s.saturating_mul(1000)),
    }
}

/// An answer meant to repeat: `temperature: 0`, or a `seed`; embeddings always.
fn deterministic(body: &Value) -> bool {
    let temperature_zero = body
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let seeded = body.get("seed").is_some_and(Value::is_number);
    let embedding = body.get("input").is_some() && body.get("messages").is_none();
    temperature_zero || seeded || embedding
}

/// The cache key of a request: `kind`, the model that serves it, the scope's identity and
/// the body without its transport fields (`stream`, `stream_options`) or `model`.
pub fn key(kind: ApiKind, served_model: &str, scope: &str, body: &Value) -> Key {
    let mut material = Vec::with_capacity(256);
    // Each part length-prefixed: no choice of model or scope can shift a boundary.
    for part in ["tokenfuse-cache-v1", kind.tag(), served_model, scope] {
        material.extend_from_slice(&(part.len() as u64).to_le_bytes());
        material.extend_from_slice(part.as_bytes());
    }
    if let Value::Object(fields) = body {
        let mut names: Vec<&String> = fields
            .keys()
            .filter(|k| !matches!(k.as_str(), "stream" | "stream_options" | "model"))
            .collect();
        names.sort();
        material.push(b'{');
        for name in names {
            canonical(&Value::String(name.clone()), &mut material);
            material.push(b':');
            if let Some(v) = fields.get(name) {
                canonical(v, &mut material);
            }
            material.push(b',');
        }
        material.push(b'}');
    } else {
        canonical(body, &mut material);
    }
    Key::of(&material)
}

/// `v` as JSON with object members sorted, so the same request in any member order has
/// one key. Depth is bounded by the parser (serde_json refuses nesting past 128).
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(fields) => {
            let mut names: Vec<&String> = fields.keys().collect();
            names.sort();
            out.push(b'{');
            for name in names {
                canonical(&Value::String(name.clone()), out);
                out.push(b':');
                if let Some(v) = fields.get(name) {
                    canonical(v, out);
                }
                out.push(b',');
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for item in items {
                canonical(item, out);
                out.push(b',');
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cache() -> Cache {
        Cache {
            apis: vec![ApiKind::ChatCompletions, ApiKind::AnthropicMessages],
            models: Vec::new(),
            routes: Vec::new(),
            ttl_ms: 60_000,
            max_entries: 64,
            max_entry_bytes: 1 << 16,
            max_bytes: 1 << 20,
            scope: Scope::Shared,
            deterministic_only: true,
            coalesce: true,
            coalesce_wait_ms: 30_000,
            charge_hits: false,
        }
    }

    #[test]
    fn keys_ignore_transport_and_member_order_only() {
        let a = json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]});
        let b = json!({"messages": [{"content": "hi", "role": "user"}], "stream": true,
                       "stream_options": {"include_usage": true}, "temperature": 0, "model": "m"});
        let k = |v: &Value| key(ApiKind::ChatCompletions, "m", "t1", v);
        assert_eq!(k(&a), k(&b));
        // Anything that changes the answer changes the key.
        for changed in [
            json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi!"}]}),
            json!({"model": "m", "temperature": 0, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            json!({"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": "hi"}]}),
            json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}], "tools": []}),
        ] {
            assert_ne!(k(&a), k(&changed), "{changed}");
        }
        assert_ne!(k(&a), key(ApiKind::ChatCompletions, "m", "t2", &a));
        assert_ne!(k(&a), key(ApiKind::ChatCompletions, "m2", "t1", &a));
        assert_ne!(k(&a), key(ApiKind::AnthropicMessages, "m", "t1", &a));
        // A key material boundary cannot be shifted by the parts themselves.
        assert_ne!(
            key(ApiKind::ChatCompletions, "m\u{0}t", "1", &a),
            key(ApiKind::ChatCompletions, "m", "t\u{0}1", &a)
        );
    }

    #[test]
    fn only_answers_meant_to_repeat_by_default() {
        let c = cache();
        let ask = |body: Value, cc: Option<&str>| {
            super::ask(
                &c,
                ApiKind::ChatCompletions,
                "m",
                None,
                &body,
                Directives::parse(cc),
            )
        };
        let hot = json!({"messages": []});
        assert_eq!(ask(hot.clone(), None), Ask::Bypass("nondeterministic"));
        assert_eq!(
            ask(json!({"temperature": 0}), None),
            Ask::Use {
                read: true,
                max_age_ms: None
            }
        );
        assert_eq!(
            ask(json!({"seed": 7, "temperature": 1}), None),
            Ask::Use {
                read: true,
                max_age_ms: None
            }
        );
        assert_eq!(
            ask(hot.clone(), Some("max-age=60")),
            Ask::Use {
                read: true,
                max_age_ms: Some(60_000)
            }
        );
        assert_eq!(
            ask(json!({"temperature": 0}), Some("no-cache")),
            Ask::Use {
                read: false,
                max_age_ms: None
            }
        );
        assert_eq!(
            ask(json!({"temperature": 0}), Some("No-Store")),
            Ask::Bypass("no_store")
        );
        assert_eq!(
            super::ask(
                &c,
                ApiKind::Responses,
                "m",
                None,
                &json!({"temperature": 0}),
                Directives::default()
            ),
            Ask::Bypass("api")
        );
    }
}
