//! The cache phase: before a counted request is admitted, the response cache may answer
//! it (a hit), make it wait for an identical request in flight (coalescing), or let it go
//! on — claiming its answer's way, so identical requests wait for it, and keeping its
//! answer when it comes back complete ([`crate::cache`] has the policy and the store).
//!
//! A hit or a coalesced answer is charged nothing: nothing is reserved for it, and it is
//! counted as its own decision (`cache_hit`, `coalesced`) with the tokens and cost it saved.

use serde_json::Value;

use crate::cache::{self, shape, store, Ask, Directives, Entry, Found, Key};
use crate::filter::Filter;
use crate::host::{Host, Level};
use crate::llm::api::ApiKind;
use crate::stats::{add, catalog, Stat};

use super::meter::{Billed, Note, Source};
use super::reply::{Decision, PROMPT_TOKENS_HEADER};

/// The response header that says what the cache did.
pub const CACHE_HEADER: &str = "x-tokenfuse-cache";

/// What the request headers said about caching, read in the headers callback.
#[derive(Clone, Debug, Default)]
pub(super) struct CacheHeaders {
    /// The scope's identity (the stored key), or `_shared`.
    pub scope: String,
    pub directives: Directives,
}

impl CacheHeaders {
    pub fn read(host: &dyn Host, cache: &cache::Cache) -> CacheHeaders {
        CacheHeaders {
            scope: match &cache.scope {
                cache::Scope::Shared => "_shared".to_string(),
                cache::Scope::PerIdentity(source) => {
                    crate::budget::identity::of_request(host, source)
                }
            },
            directives: Directives::parse(host.request_header("cache-control").as_deref()),
        }
    }
}

/// A request the cache considers: its body as JSON and what the client wants back.
pub(super) struct Considered {
    pub body: Value,
    pub read: bool,
    pub max_age_ms: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Whether the cache looks at this request at all; counts the bypasses.
pub(super) fn consider(
    filter: &Filter,
    host: &mut dyn Host,
    kind: ApiKind,
    model: &str,
    headers: &CacheHeaders,
    raw: &[u8],
) -> Option<Considered> {
    let cache = filter.config.cache.as_ref()?;
    let bypass = |host: &mut dyn Host, reason: &str| {
        host.counter_add(
            Stat::new(catalog::CACHE_BYPASSED)
                .tag("api", kind.tag())
                .tag("reason", reason)
                .name(),
            1,
        );
    };
    if !cache.apis.contains(&kind) {
        bypass(host, "api");
        return None;
    }
    let Ok(body) = serde_json::from_slice::<Value>(raw) else {
        // The filter's reader accepted it, serde_json did not (nesting past 128): fine to
        // answer, not to cache.
        bypass(host, "unreadable");
        return None;
    };
    let route = host.route_name();
    match cache::ask(
        cache,
        kind,
        model,
        route.as_deref(),
        &body,
        headers.directives,
    ) {
        Ask::Bypass(reason) => {
            bypass(host, reason);
            None
        }
        Ask::Use { read, max_age_ms } => {
            let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
            let include_usage = body
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true);
            Some(Considered {
                body,
                read,
                max_age_ms,
                stream,
                include_usage,
            })
        }
    }
}

/// What the lookup decided.
pub(super) enum Begin {
    /// A live answer.
    Hit(Entry),
    /// An identical request is in flight: wait for it until `until_ms`.
    Wait { key: Key, until_ms: i64 },
    /// Go upstream; keep the answer in the claimed way (or claim one at the end).
    Go(Caching),
}

/// A request whose answer the cache wants.
pub(super) struct Caching {
    pub key: Key,
    /// The way claimed for it (identical requests wait for it).
    pub claim: Option<u32>,
    pub kind: ApiKind,
    /// The response so far, while it may still be kept.
    capture: Vec<u8>,
    /// This VM's bytes in captures like this one (see [`crate::filter::CAPTURE_LIMIT`]).
    captured_in_vm: std::rc::Rc<std::cell::Cell<usize>>,
    /// `Some(streamed)` once 2xx response headers were seen; `None`: not kept.
    streamed: Option<bool>,
    given_up: bool,
}

/// Look the request up; on a miss claim its way when `claim` (and the cache coalesces).
pub(super) fn begin(
    filter: &Filter,
    host: &mut dyn Host,
    kind: ApiKind,
    served_model: &str,
    headers: &CacheHeaders,
    considered: &Considered,
    may_wait: bool,
) -> Option<Begin> {
    let cache = filter.config.cache.as_ref()?;
    let bounds = cache.bounds(filter.config.cas_retries);
    let key = cache::key(kind, served_model, &headers.scope, &considered.body);
    let now = host.now_ms();
    let until = now.saturating_add(i64::try_from(cache.coalesce_wait_ms).unwrap_or(i64::MAX));
    let mut activity = store::Activity::default();
    let found = store::lookup(
        host,
        &bounds,
        &key,
        now,
        store::Lookup {
            read: considered.read,
            max_age_ms: considered.max_age_ms,
            claim_until_ms: Some(until),
        },
        &mut activity,
    );
    record_activity(host, &activity);
    let go = |claim| {
        Begin::Go(Caching {
            key,
            claim,
            kind,
            capture: Vec::new(),
            captured_in_vm: std::rc::Rc::clone(&filter.cache_capture),
            streamed: None,
            given_up: false,
        })
    };
    Some(match found {
        Found::Hit(entry) => Begin::Hit(entry),
        Found::Pending { until_ms } if cache.coalesce && may_wait => Begin::Wait { key, until_ms },
        Found::Pending { .. } => go(None),
        Found::Miss { claimed } => go(claimed),
    })
}

/// Look `key` up again for a request waiting on it (no claim).
pub(super) fn recheck(filter: &Filter, host: &mut dyn Host, key: &Key) -> Option<Found> {
    let cache = filter.config.cache.as_ref()?;
    let bounds = cache.bounds(filter.config.cas_retries);
    let mut activity = store::Activity::default();
    let now = host.now_ms();
    Some(store::lookup(
        host,
        &bounds,
        key,
        now,
        store::Lookup {
            read: true,
            max_age_ms: None,
            claim_until_ms: None,
        },
        &mut activity,
    ))
}

impl Caching {
    /// The response headers arrived: keep only complete 2xx answers the filter can read.
    pub fn on_response_headers(&mut self, host: &dyn Host) {
        let status = host
            .response_header(":status")
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        let encoded = host
            .response_header("content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case("identity"));
        if !(200..300).contains(&status) || encoded {
            self.given_up = true;
            return;
        }
        let streamed = host
            .response_header("content-type")
            .is_some_and(|t| t.to_ascii_lowercase().starts_with("text/event-stream"));
        self.streamed = Some(streamed);
    }

    /// Whether the next body chunk is wanted.
    pub fn capturing(&self) -> bool {
        self.streamed.is_some() && !self.given_up
    }

    /// A body chunk, as it passed.
    pub fn on_body(&mut self, chunk: &[u8], max_entry_bytes: usize) {
        let in_vm = self.captured_in_vm.get();
        // An event stream is larger than the JSON it becomes; twice the bound is plenty.
        if self.capture.len().saturating_add(chunk.len()) > max_entry_bytes.saturating_mul(2)
            || in_vm.saturating_add(chunk.len()) > crate::filter::CAPTURE_LIMIT
        {
            self.given_up = true;
            self.captured_in_vm
                .set(in_vm.saturating_sub(self.capture.len()));
            self.capture = Vec::new();
        } else {
            self.capture.extend_from_slice(chunk);
            self.captured_in_vm.set(in_vm.saturating_add(chunk.len()));
        }
    }
}

impl Drop for Caching {
    fn drop(&mut self) {
        let in_vm = self.captured_in_vm.get();
        self.captured_in_vm
            .set(in_vm.saturating_sub(self.capture.len()));
    }
}

/// The exchange is settled: keep its answer if it is complete, else release the claim.
pub(super) fn finish(
    filter: &Filter,
    host: &mut dyn Host,
    id: u32,
    caching: Caching,
    billed: &Billed,
    notes: &[Note],
    ended: bool,
) {
    let Some(cache) = filter.config.cache.as_ref() else {
        return;
    };
    let bounds = cache.bounds(filter.config.cas_retries);
    let stored = |host: &mut dyn Host, result: &str| {
        host.counter_add(
            Stat::new(catalog::CACHE_STORES)
                .tag("api", caching.kind.tag())
                .tag("result", result)
                .name(),
            1,
        );
    };
    let usage = match billed {
        Billed::Usage {
            source: Source::Provider,
            usage,
        } => Some(*usage),
        _ => None,
    };
    let complete = ended && !caching.given_up && notes.is_empty();
    let (Some(streamed), Some(usage), true) = (caching.streamed, usage, complete) else {
        if let Some(g) = caching.claim {
            store::release(host, &bounds, &caching.key, g);
        }
        stored(host, "incomplete");
        return;
    };
    let answer = match shape::assemble(caching.kind, &caching.capture, streamed) {
        Ok(answer) => answer,
        Err(why) => {
            if let Some(g) = caching.claim {
                store::release(host, &bounds, &caching.key, g);
            }
            stored(host, why.tag());
            return;
        }
    };
    let now = host.now_ms();
    let entry = Entry {
        created_ms: now,
        usage,
        body: shape::json_body(&answer),
    };
    let generation = match caching.claim {
        Some(g) => Some(g),
        // Not claimed at the start (another request held the way then): claim it now.
        None => match store::lookup(
            host,
            &bounds,
            &caching.key,
            now,
            store::Lookup {
                read: false,
                max_age_ms: None,
                claim_until_ms: Some(now.saturating_add(1000)),
            },
            &mut store::Activity::default(),
        ) {
            Found::Miss { claimed } => claimed,
            _ => None,
        },
    };
    let Some(generation) = generation else {
        stored(host, "lost");
        return;
    };
    let expires = now.saturating_add(i64::try_from(cache.ttl_ms).unwrap_or(i64::MAX));
    let mut activity = store::Activity::default();
    let filled = store::fill(
        host,
        &bounds,
        &caching.key,
        generation,
        &entry,
        expires,
        &mut activity,
    );
    record_activity(host, &activity);
    match filled {
        Ok(()) => {
            stored(host, "stored");
            if host.log_enabled(Level::Debug) {
                host.log(
                    Level::Debug,
                    &format!(
                        "#{id} cached {} bytes under {}",
                        entry.body.len(),
                        caching.key.short()
                    ),
                );
            }
        }
        Err(why) => stored(host, why.tag()),
    }
}

/// How a request is answered from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Served {
    Hit,
    Coalesced,
}

/// Who was answered, for the stats: a request as its headers announced it, and the model
/// whose answer it gets.
pub(super) struct Answered<'a> {
    pub pending: &'a super::request::Pending,
    pub model: &'a str,
}

/// Answer from `entry`, in the shape the client asked for. `false` when the entry cannot
/// be rendered (the caller goes on as on a miss).
pub(super) fn serve(
    filter: &Filter,
    host: &mut dyn Host,
    considered: &Considered,
    entry: &Entry,
    served: Served,
    who: &Answered<'_>,
) -> bool {
    let api = who.pending.kind;
    let tenant_tag = who.pending.who.tenant_tag.as_deref();
    let model_tag = filter.model_tag(who.model);
    let body = if considered.stream && shape::streams(api) {
        let Ok(answer) = serde_json::from_slice::<Value>(&entry.body) else {
            return false;
        };
        shape::event_stream(api, &answer, considered.include_usage)
    } else {
        entry.body.clone()
    };
    let content_type = if considered.stream && shape::streams(api) {
        "text/event-stream"
    } else {
        "application/json"
    };
    let now = host.now_ms();
    let age = (now.saturating_sub(entry.created_ms).max(0) / 1000).to_string();
    // The prompt as it was billed when the answer was made: a hit is not counted again.
    let prompt = entry.usage.input.to_string();
    let how = match served {
        Served::Hit => "hit",
        Served::Coalesced => "coalesced",
    };
    host.send_reply(
        200,
        &[
            ("content-type", content_type),
            (CACHE_HEADER, how),
            ("age", &age),
            (PROMPT_TOKENS_HEADER, &prompt),
        ],
        &body,
    );
    // Stats: the decision, the lookup, and what was saved.
    let decision = match served {
        Served::Hit => Decision::CacheHit,
        Served::Coalesced => Decision::Coalesced,
    };
    super::decision_stat(host, tenant_tag, who.pending.who.priority, decision, None);
    lookup_stat(host, api, tenant_tag, how);
    let with_tenant = |name: &str| {
        let mut s = Stat::new(name);
        if let Some(t) = tenant_tag {
            s = s.tag("tenant", t);
        }
        s
    };
    for (kind, n) in [
        ("prompt", entry.usage.input),
        ("completion", entry.usage.output),
    ] {
        add(
            host,
            &with_tenant(catalog::CACHE_SAVED_TOKENS)
                .tag("kind", kind)
                .tag("model", &model_tag),
            n,
        );
    }
    if let Some(price) = filter.config.prices.get(who.model) {
        add(
            host,
            &with_tenant(catalog::CACHE_SAVED_COST_MICRO_USD).tag("model", &model_tag),
            price.actual(&entry.usage),
        );
    }
    true
}

/// Count a lookup's result (`hit`, `miss`, `coalesced`, `refresh`, `waited_out`).
pub(super) fn lookup_stat(host: &mut dyn Host, kind: ApiKind, tenant: Option<&str>, result: &str) {
    let mut s = Stat::new(catalog::CACHE_LOOKUPS);
    if let Some(t) = tenant {
        s = s.tag("tenant", t);
    }
    host.counter_add(s.tag("api", kind.tag()).tag("result", result).name(), 1);
}

fn record_activity(host: &mut dyn Host, activity: &store::Activity) {
    add(
        host,
        &Stat::new(catalog::CACHE_EVICTIONS).tag("reason", "evicted"),
        activity.evictions,
    );
    add(
        host,
        &Stat::new(catalog::CACHE_EVICTIONS).tag("reason", "expired"),
        activity.expirations,
    );
    add(host, &Stat::new(catalog::CAS_RETRIES), activity.cas_retries);
}

/// The root tick's share of the cache's upkeep: empty expired ways (`sets` of them from
/// `from`; returns where to go on next time), and report the bytes held.
pub fn upkeep(filter: &Filter, host: &mut dyn Host, from: u32, sets: u32) -> u32 {
    let Some(cache) = filter.config.cache.as_ref() else {
        return from;
    };
    let bounds = cache.bounds(filter.config.cas_retries);
    let mut activity = store::Activity::default();
    let now = host.now_ms();
    let next = store::sweep(host, &bounds, from, sets, now, &mut activity);
    record_activity(host, &activity);
    host.gauge_set(
        Stat::new(catalog::CACHE_BYTES).name(),
        store::bytes_held(host),
    );
    next
}
