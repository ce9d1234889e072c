//! The admin endpoint: read a key's budgets, top up an elastic balance.
//!
//! Off unless configured (`admin.path`, `admin.token`). Every request whose path falls
//! under the admin path is answered by the filter itself and never reaches an upstream:
//! the path is compared after percent-decoding, merging slashes, resolving `.`/`..` and
//! ignoring ASCII case, so no spelling of it (`/TokenFuse/Admin/`, `/tokenfuse%2Fadmin`)
//! slips through to an upstream with the admin token. It must carry
//! `authorization: Bearer <token>` (compared in constant time), else 401.
//!
//! - `GET <path>?key=<key>[&budget=<name>]`: the key's account in every (or one) budget.
//! - `GET <path>/keys?budget=<name>[&limit=<n>][&offset=<n>][&from=<slot>]`: the keys a
//!   local budget tracks with their standing, most used share first, a page at a time (see
//!   [`list_keys`]).
//! - `POST <path>/topup` with `{"budget": "<name>", "key": "<key>", "amount": <n>}`: add
//!   `n` (tokens, or USD for USD budgets) to the key's elastic balance.
//! - anything else under the path: 404 (405 for a known resource with another method).
//!
//! A key is named as a request presents it (a header value, a route name, the credential
//! of a `bearer` budget) or by its stored key (`_h-…`, `_key-…`, as stats show it), and
//! mapped exactly as traffic is ([`crate::budget::identity::named`]): a top-up always lands on the
//! account requests of that identity use.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::budget::identity;
use crate::budget::ledger::{self, Hold, Slot};
use crate::budget::price::usd_to_micro;
use crate::budget::Unit;
use crate::config::{Admin, Config};
use crate::host::Host;

/// What the admin handler wants next.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminStep {
    /// Not an admin request.
    NotAdmin,
    /// Answered already.
    Replied,
    /// A top-up: wait for its body.
    AwaitBody,
}

/// `path` as the filter compares it: the part before `?` or `#`, percent-decoded once,
/// ASCII-lowercased, with empty and `.` segments dropped and `..` resolved. Bytes that do
/// not decode to UTF-8 are replaced; the result always starts with `/`.
pub fn normalize_path(path: &str) -> String {
    let bare = path.split(['?', '#']).next().unwrap_or_default();
    let decoded = percent_decode(bare, false).to_ascii_lowercase();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len().saturating_add(1));
    for s in segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Where under the admin path a normalized path points, if it is under it at all: `""`
/// for the path itself, `"/topup"` and so on below it. Any path that merely starts with
/// the admin path (`/tokenfuse/adminx`) is the admin's too: it is answered, not forwarded.
fn admin_resource<'p>(admin: &Admin, normalized: &'p str) -> Option<&'p str> {
    normalized.strip_prefix(admin.path.as_str())
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(host: &dyn Host, admin: &Admin) -> bool {
    host.request_header("authorization")
        .as_deref()
        .and_then(identity::bearer_credential)
        .is_some_and(|token| same(token.as_bytes(), admin.token.as_bytes()))
}

fn reply(host: &mut dyn Host, status: u32, body: &Value) {
    host.send_reply(
        status,
        &[
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ],
        body.to_string().as_bytes(),
    );
}

fn error(host: &mut dyn Host, status: u32, code: &str, message: &str) {
    reply(
        host,
        status,
        &json!({"error": {"message": message, "type": "admin_error", "param": null, "code": code}}),
    );
}

fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or_default();
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v, true))
    })
}

/// `s` with `%XX` escapes decoded (and `+` as a space in query values); a `%` not followed
/// by two hex digits stays as it is. Works on bytes, so any input is safe.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        match b {
            b'%' => match (
                tail.first().and_then(|&h| hex(h)),
                tail.get(1).and_then(|&l| hex(l)),
            ) {
                (Some(h), Some(l)) => {
                    // Two hex digits: at most 0xff.
                    out.push(u8::try_from(h.saturating_mul(16).saturating_add(l)).unwrap_or(b'%'));
                    rest = tail.get(2..).unwrap_or_default();
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A budget's figures for one key, as JSON (amounts in the budget's unit: tokens or
/// micro-USD). `key` is the stored key.
fn describe(host: &dyn Host, config: &Config, index: usize, key: &str, now_ms: i64) -> Value {
    let Some(budget) = config.budget_for(index, key) else {
        return Value::Null;
    };
    let now = now_ms.div_euclid(1000);
    let found = if key == ledger::OVERFLOW_KEY {
        ledger::record(host, &budget, Slot::Overflow)
            .map(|r| (Slot::Overflow, budget.roll(r.account, now)))
    } else {
        ledger::find(host, &budget, key, now)
    };
    let tracked = found.is_some();
    let account = found
        .map(|(_, a)| a)
        .unwrap_or_else(|| budget.open_account(now));
    let standing = budget.standing(&account, now);
    let burst_limit = budget.burst.as_ref().map(|b| b.amount).unwrap_or(0);
    let burst_active = budget.burst.as_ref().is_some_and(|b| b.peak.contains(now));
    json!({
        "budget": budget.name,
        "key": key,
        "tracked": tracked,
        "unit": if budget.unit == Unit::Usd { "micro_usd" } else { "tokens" },
        "window": budget.window.kind.as_str(),
        "window_start": account.window_start,
        "resets_in_secs": budget.window.retry_after_secs(now_ms),
        "used": standing.used,
        "remaining": standing.remaining,
        "limit": standing.limit,
        "tiers": {
            "base": {"limit": budget.base, "used": account.base_used},
            "elastic": {"balance": account.elastic_balance, "used_this_window": account.elastic_used},
            "burst": {"limit": burst_limit, "used": account.burst_used, "active": burst_active},
        },
    })
}

/// Handle request headers of a possible admin request.
pub fn on_request_headers(host: &mut dyn Host, config: &Config, end_of_stream: bool) -> AdminStep {
    let Some(admin) = &config.admin else {
        return AdminStep::NotAdmin;
    };
    let path = host.request_header(":path").unwrap_or_default();
    let normalized = normalize_path(&path);
    let Some(resource) = admin_resource(admin, &normalized) else {
        return AdminStep::NotAdmin;
    };
    if !authorized(host, admin) {
        error(
            host,
            401,
            "unauthorized",
            "missing or wrong admin bearer token",
        );
        return AdminStep::Replied;
    }
    let method = host.request_header(":method").unwrap_or_default();
    match (resource, method.as_str()) {
        ("", "GET") => {
            let Some(name) = query_param(&path, "key").filter(|k| !k.trim().is_empty()) else {
                error(
                    host,
                    400,
                    "missing_key",
                    "query parameter `key` is required",
                );
                return AdminStep::Replied;
            };
            let wanted = query_param(&path, "budget");
            let now_ms = host.now_ms();
            let mut budgets = Vec::new();
            for (i, budget) in config.budgets.iter().enumerate() {
                if wanted.as_deref().is_none_or(|w| budget.name == w) {
                    let key = identity::named(&budget.key, &name);
                    budgets.push(describe(host, config, i, &key, now_ms));
                }
            }
            if budgets.is_empty() {
                error(host, 404, "no_such_budget", "no such budget");
            } else {
                // `key` as asked; each budget's entry names the stored key it maps to.
                reply(host, 200, &json!({"key": name, "budgets": budgets}));
            }
            AdminStep::Replied
        }
        ("/keys", "GET") => {
            list_keys(host, config, &path);
            AdminStep::Replied
        }
        ("/topup", "POST") if end_of_stream => {
            error(host, 400, "missing_body", "a top-up needs a JSON body");
            AdminStep::Replied
        }
        ("/topup", "POST") => AdminStep::AwaitBody,
        ("" | "/topup" | "/keys", _) => {
            error(
                host,
                405,
                "method_not_allowed",
                "use GET <path>?key=…, GET <path>/keys?budget=… or POST <path>/topup",
            );
            AdminStep::Replied
        }
        _ => {
            error(host, 404, "not_found", "no such admin resource");
            AdminStep::Replied
        }
    }
}

/// Most slots one listing request reads (one shared-data read each): a budget with more
/// slots is listed a range at a time (`from`, `next_from`), so no request holds a worker
/// for long whatever `max_keys` is.
pub const LIST_SCAN_SLOTS: u64 = 16_384;
/// Default and largest page of the listing.
const LIST_PAGE: usize = 50;
const LIST_PAGE_MAX: usize = 1_000;

/// A numeric query parameter: `default` when absent, `None` (a 400) when not a number.
fn number_param(path: &str, name: &str, default: u64) -> Option<u64> {
    match query_param(path, name) {
        None => Some(default),
        Some(v) => v.trim().parse().ok(),
    }
}

/// `GET <path>/keys?budget=<name>`: the keys holding a slot of a local budget, each with
/// its standing in the current window, sorted by used share of its limit (then by use,
/// then by key), `limit` (default 50, at most 1,000) from `offset`, plus the overflow
/// account. The listing reads slots `from` (default 0) on, at most [`LIST_SCAN_SLOTS`] of
/// them: the default 10,000 slots fit in one range; for larger budgets the order holds
/// within the range read, and `next_from` names the next range (`null` after the last).
fn list_keys(host: &mut dyn Host, config: &Config, path: &str) {
    let Some(name) = query_param(path, "budget") else {
        error(
            host,
            400,
            "missing_budget",
            "query parameter `budget` is required",
        );
        return;
    };
    let Some(index) = config.budgets.iter().position(|b| b.name == name) else {
        if config.global_budgets.iter().any(|g| g.name == name) {
            error(
                host,
                400,
                "global_budget",
                "a global budget's counters live in the rate limit service",
            );
        } else {
            error(host, 404, "no_such_budget", "no such budget");
        }
        return;
    };
    let (Some(limit), Some(offset), Some(from)) = (
        number_param(path, "limit", LIST_PAGE as u64),
        number_param(path, "offset", 0),
        number_param(path, "from", 0),
    ) else {
        error(
            host,
            400,
            "bad_parameter",
            "`limit`, `offset` and `from` are whole numbers",
        );
        return;
    };
    let Some(budget) = config.budgets.get(index) else {
        return;
    };
    let limit = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .clamp(1, LIST_PAGE_MAX);
    let offset = usize::try_from(offset).unwrap_or(usize::MAX);
    let from = from.min(budget.max_keys);
    let to = from.saturating_add(LIST_SCAN_SLOTS).min(budget.max_keys);
    let now_ms = host.now_ms();
    let now = now_ms.div_euclid(1000);

    let mut found = Vec::new();
    for n in from..to {
        let Ok(n) = u32::try_from(n) else { break };
        let Some(record) = ledger::record(host, budget, Slot::Index(n)) else {
            continue;
        };
        let Some(b) = config.budget_for(index, &record.owner) else {
            continue;
        };
        let standing = b.standing(&b.roll(record.account, now), now);
        found.push((n, record.owner, record.holds, standing));
    }
    let keys_found = found.len();
    found.sort_by(|a, b| {
        b.3.ratio()
            .total_cmp(&a.3.ratio())
            .then(b.3.used.cmp(&a.3.used))
            .then_with(|| a.1.cmp(&b.1))
    });
    let keys: Vec<Value> = found
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|(slot, key, holds, s)| {
            json!({
                "key": key,
                "slot": slot,
                "used": s.used,
                "remaining": s.remaining,
                "limit": s.limit,
                "used_ratio": s.ratio(),
                "open_reservations": holds,
            })
        })
        .collect();
    let overflow = ledger::record(host, budget, Slot::Overflow).map(|r| {
        let s = budget.standing(&budget.roll(r.account, now), now);
        json!({"key": ledger::OVERFLOW_KEY, "used": s.used, "remaining": s.remaining,
               "limit": s.limit, "used_ratio": s.ratio()})
    });
    reply(
        host,
        200,
        &json!({
            "budget": budget.name,
            "unit": if budget.unit == Unit::Usd { "micro_usd" } else { "tokens" },
            "window": budget.window.kind.as_str(),
            "resets_in_secs": budget.window.retry_after_secs(now_ms),
            "slots": budget.max_keys,
            "scanned": {"from": from, "to": to},
            "next_from": if to < budget.max_keys { Some(to) } else { None },
            "keys_found": keys_found,
            "offset": offset,
            "limit": limit,
            "keys": keys,
            "overflow": overflow,
        }),
    );
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUp {
    budget: String,
    key: String,
    amount: f64,
}

/// Handle the complete body of a top-up.
pub fn on_topup_body(host: &mut dyn Host, config: &Config, body: &[u8]) {
    let Ok(topup) = serde_json::from_slice::<TopUp>(body) else {
        error(
            host,
            400,
            "invalid_body",
            "body must be {\"budget\": …, \"key\": …, \"amount\": …}",
        );
        return;
    };
    let Some((index, budget)) = config
        .budgets
        .iter()
        .enumerate()
        .find(|(_, b)| b.name == topup.budget)
    else {
        error(host, 404, "no_such_budget", "no such budget");
        return;
    };
    let amount = match budget.unit {
        Unit::Tokens
            if topup.amount >= 0.0 && topup.amount.fract() == 0.0 && topup.amount < 1e18 =>
        {
            // Checked just above: a whole number in [0, 1e18).
            topup.amount as u64
        }
        Unit::Usd => match usd_to_micro(topup.amount) {
            Some(m) => m,
            None => {
                error(
                    host,
                    400,
                    "invalid_amount",
                    "amount must be a USD amount, at least 0",
                );
                return;
            }
        },
        Unit::Tokens => {
            error(
                host,
                400,
                "invalid_amount",
                "amount must be a whole number of tokens, at least 0",
            );
            return;
        }
    };
    if topup.key.trim().is_empty() || topup.key.len() > 4096 {
        error(host, 400, "invalid_key", "key must be 1-4096 bytes");
        return;
    }
    let key = identity::named(&budget.key, &topup.key);
    let now_ms = host.now_ms();
    let now = now_ms.div_euclid(1000);
    // A top-up takes a key slot, like a request; the balance it adds keeps the slot. The
    // overflow account (`_overflow`) has its own place, shared by every identity without a
    // slot: topping it up tops up what they share.
    let located = if key == ledger::OVERFLOW_KEY {
        Ok(Slot::Overflow)
    } else {
        ledger::locate(host, budget, &key, now, None, config.cas_retries).map(|found| found.slot)
    };
    let slot = match located {
        Ok(slot) if slot != Slot::Overflow || key == ledger::OVERFLOW_KEY => slot,
        Ok(_) => {
            error(
                host,
                409,
                "no_key_slot",
                "every key slot of this budget holds a live account; this key cannot be added now",
            );
            return;
        }
        Err(_) => {
            error(host, 503, "store_busy", "shared data is busy; retry");
            return;
        }
    };
    let result = ledger::update(
        host,
        budget,
        ledger::At {
            slot,
            owner: &key,
            generation: None,
        },
        now,
        config.cas_retries.saturating_mul(4),
        Hold::Keep,
        |account| {
            account.elastic_balance = account.elastic_balance.saturating_add(amount);
            (true, ())
        },
    );
    match result {
        Ok(_) => {
            let state = describe(host, config, index, &key, now_ms);
            reply(host, 200, &state);
        }
        Err(_) => error(host, 503, "store_busy", "shared data is busy; retry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn config() -> Config {
        Config::parse(br#"{"api":"v1","admin":{"path":"/tokenfuse/admin","token":"0123456789abcdef-token"},
            "budgets":[{"name":"daily","key":"header:x-tenant","window":"day","base":1000},
                       {"name":"spend","key":"header:x-tenant","window":"month","unit":"usd","base":5}],
            "prices":{"*":{"input":1,"output":1}}}"#).unwrap()
    }

    fn admin_request(method: &str, path: &str, token: Option<&str>) -> FakeHost {
        let mut h = FakeHost::post(path, b"");
        h.request_headers[0].1 = method.into();
        if let Some(t) = token {
            h.request_headers
                .push(("authorization".into(), format!("Bearer {t}")));
        }
        h.now_ms.set(1_800_000_000_000);
        h
    }

    fn body_json(h: &FakeHost) -> Value {
        serde_json::from_slice(&h.reply.as_ref().unwrap().body).unwrap()
    }

    #[test]
    fn admin_is_off_unless_configured() {
        let c = Config::parse(br#"{"api":"v1"}"#).unwrap();
        let mut h = admin_request("GET", "/tokenfuse/admin?key=a", Some("x"));
        assert_eq!(on_request_headers(&mut h, &c, true), AdminStep::NotAdmin);
    }

    #[test]
    fn missing_or_wrong_tokens_get_401() {
        let c = config();
        for token in [
            None,
            Some("wrong"),
            Some("0123456789abcdef-toke"),
            Some("0123456789abcdef-tokenX"),
        ] {
            let mut h = admin_request("GET", "/tokenfuse/admin?key=a", token);
            assert_eq!(on_request_headers(&mut h, &c, true), AdminStep::Replied);
            assert_eq!(h.reply.as_ref().unwrap().status, 401, "{token:?}");
        }
    }

    #[test]
    fn get_reports_every_budget_of_a_key() {
        let c = config();
        let mut h = admin_request(
            "GET",
            "/tokenfuse/admin?key=acme",
            Some("0123456789abcdef-token"),
        );
        assert_eq!(on_request_headers(&mut h, &c, true), AdminStep::Replied);
        let v = body_json(&h);
        assert_eq!(v["budgets"].as_array().unwrap().len(), 2);
        assert_eq!(v["budgets"][0]["tiers"]["base"]["limit"], 1000);
        assert_eq!(v["budgets"][0]["tracked"], false);
        assert_eq!(v["budgets"][1]["unit"], "micro_usd");
        assert_eq!(v["budgets"][1]["limit"], 5_000_000);
    }

    /// Spend `amount` of budget `index` for `key` through the ledger, as a request would.
    fn spend(h: &mut FakeHost, c: &Config, index: usize, key: &str, amount: u64) {
        let budget = c.budget_for(index, key).unwrap();
        let now = h.now_ms().div_euclid(1000);
        let slot = ledger::locate(h, &budget, key, now, None, 8).unwrap().slot;
        let at = ledger::At {
            slot,
            owner: key,
            generation: None,
        };
        ledger::update(h, &budget, at, now, 8, Hold::Keep, |a| {
            budget.draw(a, amount, now, true);
            (true, ())
        })
        .unwrap();
    }

    fn listing(h: &FakeHost, c: &Config, query: &str) -> (u32, Value) {
        let (status, v, _) = listing_reads(h, c, query);
        (status, v)
    }

    /// A listing's status, body and the shared-data reads it took.
    fn listing_reads(h: &FakeHost, c: &Config, query: &str) -> (u32, Value, u32) {
        let mut h2 = admin_request(
            "GET",
            &format!("/tokenfuse/admin/keys?{query}"),
            Some("0123456789abcdef-token"),
        );
        h2.shared = h.shared.clone();
        h2.now_ms.set(h.now_ms());
        assert_eq!(on_request_headers(&mut h2, c, true), AdminStep::Replied);
        (
            h2.reply.as_ref().unwrap().status,
            body_json(&h2),
            h2.shared_reads.get(),
        )
    }

    #[test]
    fn keys_are_listed_by_used_share_a_page_at_a_time() {
        let c = Config::parse(br#"{"api":"v1","admin":{"path":"/tokenfuse/admin","token":"0123456789abcdef-token"},
            "budgets":[{"name":"daily","key":"header:x-tenant","window":"day","base":1000,"max_keys":64,
                        "base_overrides":{"big":10000}}]}"#).unwrap();
        let mut h = admin_request("GET", "/", None);
        for (key, amount) in [("a", 100), ("b", 900), ("c", 500), ("big", 2000), ("d", 0)] {
            spend(&mut h, &c, 0, key, amount);
        }
        let (status, v) = listing(&h, &c, "budget=daily");
        assert_eq!(status, 200, "{v}");
        let order: Vec<&str> = v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key"].as_str().unwrap())
            .collect();
        assert_eq!(order, ["b", "c", "big", "a", "d"]);
        assert_eq!(v["keys"][0]["used"], 900);
        assert_eq!(v["keys"][0]["remaining"], 100);
        assert_eq!(
            v["keys"][2]["limit"], 10000,
            "the override is the key's limit"
        );
        assert_eq!(v["keys_found"], 5);
        assert_eq!(v["next_from"], Value::Null);

        let (_, page) = listing(&h, &c, "budget=daily&limit=2&offset=1");
        let order: Vec<&str> = page["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key"].as_str().unwrap())
            .collect();
        assert_eq!(order, ["c", "big"]);

        // The next day every key is back to nothing used.
        h.now_ms.set(h.now_ms() + 86_400_000);
        let (_, v) = listing(&h, &c, "budget=daily");
        assert!(
            v["keys"].as_array().unwrap().iter().all(|k| k["used"] == 0),
            "{v}"
        );
    }

    #[test]
    fn a_listing_reads_a_bounded_range_of_slots() {
        let c = Config::parse(br#"{"api":"v1","admin":{"path":"/tokenfuse/admin","token":"0123456789abcdef-token"},
            "budgets":[{"name":"daily","key":"header:x-tenant","window":"day","base":1000,"max_keys":40000}]}"#).unwrap();
        let mut h = admin_request("GET", "/", None);
        spend(&mut h, &c, 0, "a", 10);
        let (_, v, reads) = listing_reads(&h, &c, "budget=daily");
        assert_eq!(v["scanned"], json!({"from": 0, "to": LIST_SCAN_SLOTS}));
        assert_eq!(v["next_from"], LIST_SCAN_SLOTS);
        assert_eq!(
            u64::from(reads),
            LIST_SCAN_SLOTS + 1,
            "the range and the overflow"
        );
        let (_, last) = listing(&h, &c, "budget=daily&from=32768");
        assert_eq!(last["scanned"], json!({"from": 32768, "to": 40000}));
        assert_eq!(last["next_from"], Value::Null);
        let total = v["keys_found"].as_u64().unwrap()
            + listing(&h, &c, "budget=daily&from=16384").1["keys_found"]
                .as_u64()
                .unwrap()
            + last["keys_found"].as_u64().unwrap();
        assert_eq!(total, 1, "the key is in exactly one range");
    }

    #[test]
    fn bad_listing_requests_get_clear_errors() {
        let c = config();
        let h = admin_request("GET", "/", None);
        for (query, status, code) in [
            ("", 400, "missing_budget"),
            ("budget=nope", 404, "no_such_budget"),
            ("budget=daily&limit=ten", 400, "bad_parameter"),
            ("budget=daily&offset=-1", 400, "bad_parameter"),
            (
                "budget=daily&from=99999999999999999999999",
                400,
                "bad_parameter",
            ),
        ] {
            let (s, v) = listing(&h, &c, query);
            assert_eq!(
                (s, v["error"]["code"].as_str().unwrap()),
                (status, code),
                "{query}"
            );
        }
        // Out-of-range numbers are clamped, not refused.
        let (s, v) = listing(
            &h,
            &c,
            "budget=daily&limit=0&offset=18446744073709551615&from=18446744073709551615",
        );
        assert_eq!(s, 200);
        assert_eq!(v["limit"], 1);
        assert_eq!(v["keys"], json!([]));
    }

    #[test]
    fn a_topup_of_the_overflow_account_reaches_the_account_overflowing_keys_share() {
        let c = config();
        let mut h = admin_request(
            "POST",
            "/tokenfuse/admin/topup",
            Some("0123456789abcdef-token"),
        );
        on_topup_body(
            &mut h,
            &c,
            br#"{"budget":"daily","key":"_overflow","amount":700}"#,
        );
        assert_eq!(h.reply.as_ref().unwrap().status, 200);
        let overflow = ledger::record(&h, &c.budgets[0], Slot::Overflow).unwrap();
        assert_eq!(overflow.account.elastic_balance, 700);
        // No key slot was taken for it.
        assert!(!h.shared.borrow().values.keys().any(|k| k.contains("/s/")));
    }

    #[test]
    fn topup_adds_to_the_elastic_balance() {
        let c = config();
        let mut h = admin_request(
            "POST",
            "/tokenfuse/admin/topup",
            Some("0123456789abcdef-token"),
        );
        assert_eq!(on_request_headers(&mut h, &c, false), AdminStep::AwaitBody);
        on_topup_body(
            &mut h,
            &c,
            br#"{"budget":"daily","key":"acme","amount":500}"#,
        );
        let v = body_json(&h);
        assert_eq!(v["tiers"]["elastic"]["balance"], 500);
        assert_eq!(v["remaining"], 1500);
        on_topup_body(
            &mut h,
            &c,
            br#"{"budget":"spend","key":"acme","amount":2.5}"#,
        );
        assert_eq!(body_json(&h)["tiers"]["elastic"]["balance"], 2_500_000);
    }

    #[test]
    fn bad_topups_are_refused() {
        let c = config();
        for (body, status) in [
            (&br#"{"budget":"nope","key":"a","amount":1}"#[..], 404),
            (br#"{"budget":"daily","key":"a","amount":-1}"#, 400),
            (br#"{"budget":"daily","key":"a","amount":1.5}"#, 400),
            (br#"{"budget":"daily","key":"","amount":1}"#, 400),
            (br#"not json"#, 400),
        ] {
            let mut h = admin_request(
                "POST",
                "/tokenfuse/admin/topup",
                Some("0123456789abcdef-token"),
            );
            on_topup_body(&mut h, &c, body);
            assert_eq!(h.reply.as_ref().unwrap().status, status);
        }
    }

    #[test]
    fn other_methods_and_paths_get_405_and_key_is_required() {
        let c = config();
        let mut h = admin_request("DELETE", "/tokenfuse/admin", Some("0123456789abcdef-token"));
        on_request_headers(&mut h, &c, true);
        assert_eq!(h.reply.as_ref().unwrap().status, 405);
        let mut h = admin_request("GET", "/tokenfuse/admin", Some("0123456789abcdef-token"));
        on_request_headers(&mut h, &c, true);
        assert_eq!(h.reply.as_ref().unwrap().status, 400);
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            query_param("/a?key=acme%2Dcorp&x=1", "key").as_deref(),
            Some("acme-corp")
        );
        assert_eq!(query_param("/a?key=%zz", "key").as_deref(), Some("%zz"));
        assert_eq!(query_param("/a?x=1", "key"), None);
    }
}
