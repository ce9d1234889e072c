//! Compiling the raw document into checked values: one function per part, each naming the
//! field it refuses and why.

use std::collections::{BTreeMap, HashMap};

use super::raw::{RawBudget, RawCache, RawPrice, RawPriority, RawRateLimitService, RawReroute};
use super::{
    ConfigError, FailureMode, GlobalBudget, PrioritySource, Protocol, RateLimitService, Reroute,
};
use crate::budget::price::{usd_to_micro, Price, PriceList};
use crate::budget::window::{PeakHours, Window};
use crate::budget::{Budget, Burst, KeySource, OversizeAction, Priority, TripAction, Unit};
use crate::tokenizer::Pattern;

pub(super) fn check_safety_factor(field: &str, factor: f64) -> Result<(), ConfigError> {
    if !(1.0..=4.0).contains(&factor) {
        return Err(ConfigError::new(
            field,
            "must be between 1.0 and 4.0 (a multiplier on counts made with a borrowed encoding)",
        ));
    }
    Ok(())
}

pub(super) fn byte_limit(
    field: &str,
    value: Option<u64>,
    default: usize,
) -> Result<usize, ConfigError> {
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

/// Budget and key names: short, and safe inside shared-data keys and stat tags.
pub(super) fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            "must be 1-48 characters of [A-Za-z0-9._-]",
        ))
    }
}

pub(super) fn ratio(field: &str, value: Option<f64>, default: f64) -> Result<f64, ConfigError> {
    let v = value.unwrap_or(default);
    if !(v > 0.0 && v <= 1.0) {
        return Err(ConfigError::new(field, "must be a fraction in (0, 1]"));
    }
    Ok(v)
}

/// An amount in the budget's unit: whole tokens, or USD (to the micro-dollar).
pub(super) fn amount(field: &str, value: f64, unit: Unit) -> Result<u64, ConfigError> {
    match unit {
        Unit::Tokens => {
            if !(value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value < 1e18) {
                return Err(ConfigError::new(
                    field,
                    "must be a whole number of tokens, at least 0",
                ));
            }
            Ok(value as u64)
        }
        Unit::Usd => usd_to_micro(value)
            .ok_or_else(|| ConfigError::new(field, "must be a USD amount, at least 0")),
    }
}

/// `+05:30`, `-08:00`, `Z` → seconds east of UTC.
pub(super) fn parse_offset(field: &str, text: &str) -> Result<i32, ConfigError> {
    let bad = || ConfigError::new(field, "must look like +05:30, -08:00 or Z");
    if text == "Z" || text == "z" {
        return Ok(0);
    }
    let (sign, rest) = if let Some(rest) = text.strip_prefix('+') {
        (1, rest)
    } else if let Some(rest) = text.strip_prefix('-') {
        (-1, rest)
    } else {
        return Err(bad());
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    if h > 14 || m > 59 || rest.len() != 5 {
        return Err(bad());
    }
    // Four digits at most (`rest` is five bytes with a `:`): no product overflows, but a
    // value that did would be no offset either.
    h.checked_mul(3600)
        .zip(m.checked_mul(60))
        .and_then(|(h, m)| h.checked_add(m))
        .and_then(|secs| secs.checked_mul(sign))
        .ok_or_else(bad)
}

pub(super) fn parse_key(field: &str, text: &str) -> Result<KeySource, ConfigError> {
    let bad = || {
        ConfigError::new(
            field,
            "must be `header:<name>`, `bearer`, `route` or `constant:<name>`",
        )
    };
    match text.split_once(':') {
        Some(("header", name)) if !name.is_empty() => {
            Ok(KeySource::Header(name.to_ascii_lowercase()))
        }
        Some(("constant", name)) => {
            check_name(field, name)?;
            Ok(KeySource::Constant(name.to_string()))
        }
        None if text == "bearer" => Ok(KeySource::BearerHash),
        None if text == "route" => Ok(KeySource::Route),
        _ => Err(bad()),
    }
}

pub(super) fn compile_budget(
    i: usize,
    rb: &RawBudget,
) -> Result<(Budget, HashMap<String, u64>), ConfigError> {
    let f = |name: &str| format!("budgets[{i}].{name}");
    check_name(&f("name"), &rb.name)?;
    let key = parse_key(&f("key"), &rb.key)?;
    let offset = match &rb.utc_offset {
        Some(t) => parse_offset(&f("utc_offset"), t)?,
        None => 0,
    };
    let kind = rb
        .window
        .ok_or_else(|| ConfigError::new(f("window"), "missing field `window`"))?;
    let window = Window::new(kind, offset).map_err(|why| ConfigError::new(f("utc_offset"), why))?;
    let unit = budget_unit(i, rb)?;
    let base = rb
        .base
        .ok_or_else(|| ConfigError::new(f("base"), "missing field `base`"))?;
    let base = amount(&f("base"), base, unit)?;
    let elastic = amount(&f("elastic"), rb.elastic.unwrap_or(0.0), unit)?;
    let burst = match &rb.burst {
        None => None,
        Some(b) => Some(Burst {
            amount: amount(&f("burst.amount"), b.amount, unit)?,
            peak: PeakHours::parse(&b.from, &b.to, &b.weekdays, offset)
                .map_err(|why| ConfigError::new(f("burst"), why))?,
        }),
    };
    let action = match rb.action.as_deref() {
        None | Some("reject") => TripAction::Reject,
        Some("reroute") => TripAction::Reroute,
        Some(_) => {
            return Err(ConfigError::new(
                f("action"),
                "must be `reject` or `reroute`",
            ))
        }
    };
    let warn_at = ratio(&f("warn_at"), rb.warn_at, 0.8)?;
    let degrade_from = match rb.degrade_from {
        None => None,
        Some(d) if d > 0.0 && d < 1.0 => Some(d),
        Some(_) => {
            return Err(ConfigError::new(
                f("degrade_from"),
                "must be a fraction in (0, 1)",
            ))
        }
    };
    let c = rb.priority_ceilings.as_ref();
    let ceilings = [
        ratio(&f("priority_ceilings.p0"), c.and_then(|c| c.p0), 1.0)?,
        ratio(&f("priority_ceilings.p1"), c.and_then(|c| c.p1), 0.9)?,
        ratio(&f("priority_ceilings.p2"), c.and_then(|c| c.p2), 0.7)?,
    ];
    if !(ceilings[0] >= ceilings[1] && ceilings[1] >= ceilings[2]) {
        return Err(ConfigError::new(
            f("priority_ceilings"),
            "must not increase from p0 to p2 (background work is shed first)",
        ));
    }
    let max_request_tokens = match rb.max_request_tokens {
        None => None,
        Some(v) if v > 0.0 && v < 1.0 => {
            if unit != Unit::Tokens {
                return Err(ConfigError::new(
                    f("max_request_tokens"),
                    "a fraction of the base needs a token budget; give an absolute number",
                ));
            }
            Some(((base as f64) * v).floor() as u64)
        }
        Some(v) if v >= 1.0 && v.fract() == 0.0 && v < 1e18 => Some(v as u64),
        Some(_) => {
            return Err(ConfigError::new(
                f("max_request_tokens"),
                "must be a whole number of tokens, or a fraction of the base in (0, 1)",
            ))
        }
    };
    let oversize = oversize_action(i, rb)?;
    let max_keys = rb.max_keys.unwrap_or(10_000);
    if !(1..=1_000_000).contains(&max_keys) {
        return Err(ConfigError::new(
            f("max_keys"),
            "must be between 1 and 1000000",
        ));
    }
    let mut overrides = HashMap::new();
    for (k, v) in &rb.base_overrides {
        // Identities as stored: a plain value, or a stored key as the admin API and the
        // stats show it (`_h-…`, `_key-…`). Nothing else is accepted — and a refused key is
        // never quoted, since it could be a credential.
        if !crate::budget::identity::is_stored_form(k) {
            return Err(ConfigError::new(
                f("base_overrides"),
                "keys must be identities as stored: 1-64 characters of [A-Za-z0-9.@:-] not starting with `_`, or a stored key (`_h-…`, `_key-…`) as the admin API shows it",
            ));
        }
        // Keyed by the stored key, as the ledger names accounts.
        overrides.insert(
            crate::budget::identity::named(&key, k),
            amount(&f(&format!("base_overrides.{k}")), *v, unit)?,
        );
    }
    Ok((
        Budget {
            name: rb.name.clone(),
            key,
            window,
            unit,
            base,
            elastic,
            burst,
            action,
            warn_at,
            degrade_from,
            ceilings,
            max_request_tokens,
            oversize,
            max_keys,
        },
        overrides,
    ))
}

pub(super) fn budget_unit(i: usize, rb: &RawBudget) -> Result<Unit, ConfigError> {
    match rb.unit.as_deref() {
        None | Some("tokens") => Ok(Unit::Tokens),
        Some("usd") => Ok(Unit::Usd),
        Some(_) => Err(ConfigError::new(
            format!("budgets[{i}].unit"),
            "must be `tokens` or `usd`",
        )),
    }
}

pub(super) fn oversize_action(i: usize, rb: &RawBudget) -> Result<OversizeAction, ConfigError> {
    match rb.oversize.as_deref() {
        None | Some("reject") => Ok(OversizeAction::Reject),
        Some("truncate") => Ok(OversizeAction::Truncate),
        Some(_) => Err(ConfigError::new(
            format!("budgets[{i}].oversize"),
            "must be `reject` or `truncate`",
        )),
    }
}

/// A `backend: global` budget: the rate limit service owns its limit and window, so the
/// fields that describe them here are refused rather than silently ignored.
pub(super) fn compile_global_budget(i: usize, rb: &RawBudget) -> Result<GlobalBudget, ConfigError> {
    let f = |name: &str| format!("budgets[{i}].{name}");
    check_name(&f("name"), &rb.name)?;
    let key = parse_key(&f("key"), &rb.key)?;
    let kept_by_service = [
        ("window", rb.window.is_some()),
        ("utc_offset", rb.utc_offset.is_some()),
        ("base", rb.base.is_some()),
        ("elastic", rb.elastic.is_some()),
        ("burst", rb.burst.is_some()),
        ("degrade_from", rb.degrade_from.is_some()),
        ("priority_ceilings", rb.priority_ceilings.is_some()),
        ("max_keys", rb.max_keys.is_some()),
        ("base_overrides", !rb.base_overrides.is_empty()),
    ];
    if let Some((field, _)) = kept_by_service.iter().find(|(_, set)| *set) {
        return Err(ConfigError::new(
            f(field),
            "does not apply to a global budget: its limit and window are set in the rate limit \
             service's own limits (see docs/global-budgets.md)",
        ));
    }
    match rb.action.as_deref() {
        None | Some("reject") => {}
        Some(_) => {
            return Err(ConfigError::new(
                f("action"),
                "a global budget can only `reject` (the service has already counted a request \
                 it refuses, so it cannot be re-planned on a cheaper model)",
            ))
        }
    }
    let max_request_tokens = match rb.max_request_tokens {
        None => None,
        Some(v) if v >= 1.0 && v.fract() == 0.0 && v < 1e18 => Some(v as u64),
        Some(_) => {
            return Err(ConfigError::new(
                f("max_request_tokens"),
                "must be a whole number of tokens (a global budget has no base to take a \
                 fraction of)",
            ))
        }
    };
    Ok(GlobalBudget {
        name: rb.name.clone(),
        key,
        unit: budget_unit(i, rb)?,
        max_request_tokens,
        oversize: oversize_action(i, rb)?,
        warn_at: ratio(&f("warn_at"), rb.warn_at, 0.8)?,
    })
}

pub(super) fn compile_rate_limit_service(
    raw: RawRateLimitService,
) -> Result<RateLimitService, ConfigError> {
    if raw.cluster.trim().is_empty() {
        return Err(ConfigError::new(
            "rate_limit_service.cluster",
            "must name the Envoy cluster (HTTP/2) of the rate limit service",
        ));
    }
    let domain = raw.domain.unwrap_or_else(|| "tokenfuse".to_string());
    if domain.is_empty() {
        return Err(ConfigError::new(
            "rate_limit_service.domain",
            "must not be empty (engines refuse an empty domain)",
        ));
    }
    let bounded = |field: &str, v: Option<u64>, default: u64, lo: u64, hi: u64| match v {
        None => Ok(default),
        Some(v) if (lo..=hi).contains(&v) => Ok(v),
        Some(_) => Err(ConfigError::new(
            format!("rate_limit_service.{field}"),
            format!("must be between {lo} and {hi}"),
        )),
    };
    let protocol = match raw.protocol.as_deref() {
        None | Some("envoy") => Protocol::Envoy,
        Some("limitador") => Protocol::Limitador,
        Some(_) => {
            return Err(ConfigError::new(
                "rate_limit_service.protocol",
                "must be \"envoy\" (ShouldRateLimit: envoyproxy/ratelimit, Limitador) or \
                 \"limitador\" (Limitador's Reserve/Commit, limitador-server 0.14 or later)",
            ))
        }
    };
    if protocol == Protocol::Envoy && raw.reservation_ttl_secs.is_some() {
        return Err(ConfigError::new(
            "rate_limit_service.reservation_ttl_secs",
            "only with \"protocol\": \"limitador\" (ShouldRateLimit holds nothing to expire)",
        ));
    }
    Ok(RateLimitService {
        protocol,
        reservation_ttl_secs: bounded(
            "reservation_ttl_secs",
            raw.reservation_ttl_secs,
            60,
            1,
            86_400,
        )?,
        cluster: raw.cluster,
        domain,
        timeout_ms: bounded("timeout_ms", raw.timeout_ms, 100, 1, 60_000)?,
        on_failure: raw.on_failure.unwrap_or(FailureMode::Open),
        flush_interval_ms: bounded("flush_interval_ms", raw.flush_interval_ms, 100, 10, 60_000)?,
        settle_retry_secs: bounded("settle_retry_secs", raw.settle_retry_secs, 300, 0, 86_400)?,
    })
}

pub(super) fn compile_prices(raw: &BTreeMap<String, RawPrice>) -> Result<PriceList, ConfigError> {
    let mut rules = Vec::with_capacity(raw.len());
    for (pattern, p) in raw {
        let field = |n: &str| format!("prices.{pattern}.{n}");
        let pat = Pattern::parse(pattern)
            .map_err(|why| ConfigError::new(format!("prices.{pattern}"), why))?;
        let usd = |n: &str, v: f64| {
            usd_to_micro(v).ok_or_else(|| {
                ConfigError::new(field(n), "must be USD per million tokens, at least 0")
            })
        };
        let input = usd("input", p.input)?;
        rules.push((
            pat,
            Price {
                input,
                cached_input: match p.cached_input {
                    Some(v) => usd("cached_input", v)?,
                    None => input,
                },
                output: usd("output", p.output)?,
            },
        ));
    }
    Ok(PriceList::new(rules))
}

pub(super) fn compile_priority(raw: Option<&RawPriority>) -> Result<PrioritySource, ConfigError> {
    let Some(raw) = raw else {
        return Ok(PrioritySource {
            header: None,
            routes: HashMap::new(),
            default: Priority::P1,
            retries: None,
        });
    };
    let parse = |field: String, v: &str| {
        Priority::parse(v).ok_or_else(|| ConfigError::new(field, "must be p0, p1 or p2"))
    };
    let mut routes = HashMap::new();
    for (route, p) in &raw.routes {
        routes.insert(route.clone(), parse(format!("priority.routes.{route}"), p)?);
    }
    Ok(PrioritySource {
        header: raw.header.as_ref().map(|h| h.to_ascii_lowercase()),
        routes,
        default: match &raw.default {
            Some(d) => parse("priority.default".into(), d)?,
            None => Priority::P1,
        },
        retries: match &raw.retries {
            Some(r) => Some(parse("priority.retries".into(), r)?),
            None => None,
        },
    })
}

pub(super) fn compile_reroute(
    raw: Option<&RawReroute>,
    defaults: &Reroute,
) -> Result<Reroute, ConfigError> {
    let Some(raw) = raw else {
        return Ok(defaults.clone());
    };
    let mut models = Vec::with_capacity(raw.models.len());
    for (from, to) in &raw.models {
        let pat = Pattern::parse(from)
            .map_err(|why| ConfigError::new(format!("reroute.models.{from}"), why))?;
        if to.is_empty() {
            return Err(ConfigError::new(
                format!("reroute.models.{from}"),
                "the cheaper model must not be empty",
            ));
        }
        models.push((pat, to.clone()));
    }
    Ok(Reroute {
        header: raw
            .header
            .clone()
            .unwrap_or_else(|| defaults.header.clone())
            .to_ascii_lowercase(),
        value: raw.value.clone().unwrap_or_else(|| defaults.value.clone()),
        models,
    })
}

/// Turn a serde_json error into a sentence that names what was expected and where, without
/// quoting the offending value (serde's own text sometimes does).
pub(super) fn describe_serde_error(e: &serde_json::Error) -> String {
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
            } else if let Some(expected) = text.find("expected").and_then(|pos| text.get(pos..)) {
                format!("wrong type or value, {expected} ({at})")
            } else if text.starts_with("unknown variant") {
                match text.find("expected").and_then(|pos| text.get(pos..)) {
                    Some(expected) => format!("unknown value, {expected} ({at})"),
                    None => format!("unknown value ({at})"),
                }
            } else {
                format!("wrong type or value ({at})")
            }
        }
    }
}

/// The `cache` section. `tenant` is the tenant tag's source, the default scope key.
pub(super) fn compile_cache(
    raw: RawCache,
    tenant: Option<&KeySource>,
) -> Result<crate::cache::Cache, ConfigError> {
    use crate::cache::{Cache, Scope};
    use crate::llm::api::ApiKind;
    let all = [
        ApiKind::ChatCompletions,
        ApiKind::Completions,
        ApiKind::Responses,
        ApiKind::Embeddings,
        ApiKind::AnthropicMessages,
    ];
    let apis = match raw.apis {
        None => vec![
            ApiKind::ChatCompletions,
            ApiKind::Completions,
            ApiKind::Responses,
            ApiKind::AnthropicMessages,
        ],
        Some(names) => {
            let mut apis = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let kind = all.iter().find(|k| k.tag() == name).ok_or_else(|| {
                    ConfigError::new(
                        format!("cache.apis[{i}]"),
                        "must be one of `chat`, `completions`, `responses`, `embeddings`, `anthropic`",
                    )
                })?;
                apis.push(*kind);
            }
            apis
        }
    };
    let mut models = Vec::new();
    for (i, m) in raw.models.iter().enumerate() {
        models.push(
            Pattern::parse(m).map_err(|why| ConfigError::new(format!("cache.models[{i}]"), why))?,
        );
    }
    let ttl_secs = raw.ttl_secs.unwrap_or(300);
    if !(1..=7 * 86_400).contains(&ttl_secs) {
        return Err(ConfigError::new(
            "cache.ttl_secs",
            "must be between 1 and 604800 (a week)",
        ));
    }
    let max_entries = raw.max_entries.unwrap_or(1024);
    if !(4..=1 << 20).contains(&max_entries) {
        return Err(ConfigError::new(
            "cache.max_entries",
            "must be between 4 and 1048576 (each entry is a shared-data key)",
        ));
    }
    let max_entry_bytes = byte_limit("cache.max_entry_bytes", raw.max_entry_bytes, 256 << 10)?;
    let max_bytes = raw.max_bytes.unwrap_or(64 << 20);
    if !(1024..=16 << 30).contains(&max_bytes) {
        return Err(ConfigError::new(
            "cache.max_bytes",
            "must be between 1024 and 17179869184 (16 GiB)",
        ));
    }
    if (max_entry_bytes as u64) > max_bytes {
        return Err(ConfigError::new(
            "cache.max_entry_bytes",
            "must not exceed cache.max_bytes",
        ));
    }
    let scope = match (raw.scope.as_deref(), raw.key.as_deref()) {
        (Some("shared"), None) => Scope::Shared,
        (Some("shared"), Some(_)) => {
            return Err(ConfigError::new(
                "cache.key",
                "has no meaning with scope: shared (answers cross every identity)",
            ))
        }
        (None | Some("tenant"), Some(source)) => Scope::PerIdentity(parse_key("cache.key", source)?),
        (None | Some("tenant"), None) => match tenant {
            Some(source) => Scope::PerIdentity(source.clone()),
            None => {
                return Err(ConfigError::new(
                    "cache.key",
                    "is needed: a per-tenant cache needs to know the tenant (set `cache.key`, `stats.tenant` or a budget), or set `scope: shared`",
                ))
            }
        },
        (Some(_), _) => {
            return Err(ConfigError::new(
                "cache.scope",
                "must be `tenant` (answers never cross identities) or `shared`",
            ))
        }
    };
    let coalesce_wait_ms = raw.coalesce_wait_ms.unwrap_or(30_000);
    if !(10..=600_000).contains(&coalesce_wait_ms) {
        return Err(ConfigError::new(
            "cache.coalesce_wait_ms",
            "must be between 10 and 600000",
        ));
    }
    Ok(Cache {
        apis,
        models,
        routes: raw.routes,
        ttl_ms: ttl_secs.saturating_mul(1000),
        max_entries: u32::try_from(max_entries).unwrap_or(u32::MAX),
        max_entry_bytes,
        max_bytes,
        scope,
        deterministic_only: raw.deterministic_only.unwrap_or(true),
        coalesce: raw.coalesce.unwrap_or(true),
        coalesce_wait_ms,
        charge_hits: raw.charge_hits.unwrap_or(false),
    })
}
