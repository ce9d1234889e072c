//! Budgets end to end: the built `tokenfuse.wasm` in a real Envoy (2 workers, so every
//! budget lives in shared data written by two VMs) in front of the mock upstreams.
//!
//! Budget state belongs to an Envoy process, so tests share an Envoy only when they use
//! disjoint budget keys: every test on the shared stacks has its own `x-tenant`. A budget
//! setting that applies to every request (oversize handling, the trip action, the key cap)
//! gets its own stack.
//!
//! Reservations are judged when a request arrives and settled when Envoy ends its stream,
//! a moment after the client has read the last byte; tests read the ledger through the
//! admin endpoint and poll until the settlement has landed.
//!
//! Windows are day windows (the minute test excepted), and tests that build up usage move
//! out of the last moments of a window first, so a rollover cannot reset them half-way.

// Test code: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::envoy::Envoy;
use support::http;
use support::mock_upstream::DEFAULT_COMPLETION;
use support::stack::{bearer_key, counter_sum, native_count, text_tokens, Stack};
use tokenfuse::llm::api::ApiKind;
use tokenfuse::tokenizer::Encoding;

const ADMIN_TOKEN: &str = "budget-tests-admin-token-0123456789";
const ADMIN_PATH: &str = "/tokenfuse/admin";
const CHAT: &str = "/v1/chat/completions";

/// The stack most tests share: a day budget and a minute budget on `x-tenant`, both
/// generous by default, with small allowances for the tenants that tests exhaust; the
/// priority header; the admin endpoint.
fn main_stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let config = json!({
            "api": "v1",
            "budgets": [
                {"name": "tenant-day", "key": "header:x-tenant", "window": "day", "base": 100_000,
                 "base_overrides": {"exhaust-day": 1000, "prio": 1000, "topup": 1000,
                                    "warn": 1000, "rate-headers": 1000}},
                {"name": "tenant-minute", "key": "header:x-tenant", "window": "minute",
                 "base": 1_000_000, "base_overrides": {"exhaust-minute": 1000, "hopeless": 1000}}
            ],
            "priority": {"header": "x-tokenfuse-priority"},
            "admin": {"path": ADMIN_PATH, "token": ADMIN_TOKEN}
        });
        Stack::start(&config.to_string())
    })
}

/// A `reroute` budget (tenant `frugal` has 10 tokens a day, everyone else plenty) and a USD
/// budget (tenant `pricey` has $0.002 a day); usage injection on; no admin.
fn reroute_stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let config = json!({
            "api": "v1",
            "inject_stream_usage": true,
            "budgets": [
                {"name": "tenant-reroute", "key": "header:x-tenant", "window": "day",
                 "base": 100_000, "action": "reroute", "base_overrides": {"frugal": 10}},
                {"name": "spend-usd", "key": "header:x-tenant", "window": "day", "unit": "usd",
                 "base": 1000.0, "base_overrides": {"pricey": 0.002}}
            ],
            "prices": {"*": {"input": 1.0, "output": 4.0},
                       "gpt-4o*": {"input": 2.5, "cached_input": 1.25, "output": 10.0}},
            "reroute": {"models": {"gpt-4o": "gpt-4o-mini"}}
        });
        Stack::start(&config.to_string())
    })
}

/// A 300-token per-request cap that truncates.
fn truncate_stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let config = json!({
            "api": "v1",
            "budgets": [{"name": "capped-requests", "key": "header:x-tenant", "window": "day",
                         "base": 100_000, "max_request_tokens": 300, "oversize": "truncate"}]
        });
        Stack::start(&config.to_string())
    })
}

fn native_text_tokens(text: &str) -> u64 {
    text_tokens(Encoding::O200kBase, text)
}

/// The `"Hello!"` chat with gpt-4o: 9 prompt tokens, so it reserves `9 + max_tokens`.
fn hello(max_tokens: u64) -> String {
    json!({"model": "gpt-4o", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Hello!"}]})
    .to_string()
}

const HELLO_PROMPT: u64 = 9;

fn chat(s: &Stack, headers: &[(&str, &str)], body: &str) -> http::Response {
    s.envoy.post_json(CHAT, headers, body).unwrap()
}

fn header_u64(r: &http::Response, name: &str) -> u64 {
    r.header(name)
        .unwrap_or_else(|| {
            panic!(
                "no {name} header; status {} headers {:?} body {}",
                r.status,
                r.headers,
                r.text()
            )
        })
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Milliseconds until the end of the current UTC window of `period_secs`.
fn ms_until_window_end(period_secs: u64) -> u64 {
    let period = period_secs * 1000;
    period - now_ms() % period
}

/// Wait for the next window if fewer than `margin_secs` are left in this one, so a test
/// that builds up usage is not reset half-way by a rollover.
fn away_from_window_end(period_secs: u64, margin_secs: u64) {
    let left = ms_until_window_end(period_secs);
    if left < margin_secs * 1000 {
        std::thread::sleep(Duration::from_millis(left + 500));
    }
}

const DAY: u64 = 86_400;
const MINUTE: u64 = 60;

/// `1h2m3s`, `59s`, `999ms` → milliseconds.
fn parse_go_duration(text: &str) -> u64 {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().unwrap();
    }
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        match c {
            '0'..='9' => number.push(c),
            'h' | 'm' | 's' => {
                let n: u64 = number
                    .parse()
                    .unwrap_or_else(|_| panic!("bad duration {text:?}"));
                total += n * match c {
                    'h' => 3_600_000,
                    'm' => 60_000,
                    _ => 1_000,
                };
                number.clear();
            }
            _ => panic!("bad duration {text:?}"),
        }
    }
    assert!(number.is_empty(), "bad duration {text:?}");
    total
}

fn admin_auth() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

/// The admin view of `key` in `budget`.
fn ledger(s: &Stack, key: &str, budget: &str) -> Value {
    let auth = admin_auth();
    let r = s
        .envoy
        .get(
            &format!("{ADMIN_PATH}?key={key}&budget={budget}"),
            &[("authorization", &auth)],
        )
        .unwrap();
    assert_eq!(r.status, 200, "admin GET: {}", r.text());
    let v = r.json();
    assert_eq!(v["key"], key);
    let budgets = v["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 1, "{v}");
    budgets[0].clone()
}

fn used(view: &Value) -> u64 {
    view["used"].as_u64().unwrap()
}

/// Polls the admin view until `used` is `expected` (a settlement lands when Envoy ends the
/// stream); panics with the last view after 10 s.
fn wait_used(s: &Stack, key: &str, budget: &str, expected: u64) -> Value {
    wait_ledger(
        s,
        key,
        budget,
        |v| used(v) == expected,
        &format!("used == {expected}"),
    )
}

fn wait_ledger(
    s: &Stack,
    key: &str,
    budget: &str,
    done: impl Fn(&Value) -> bool,
    what: &str,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = ledger(s, key, budget);
        if done(&view) {
            return view;
        }
        if Instant::now() > deadline {
            panic!("{key} in {budget}: expected {what} within 10 s; last view {view}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Make `tenant` spend exactly `amount` tokens (at least 11) with one small request whose
/// provider usage is `amount`, and wait until its settlement shows `used_after`.
fn spend(s: &Stack, tenant: &str, amount: u64, priority: &str, used_after: u64) {
    let completion = (amount - 11).to_string();
    let r = chat(
        s,
        &[
            ("x-tenant", tenant),
            ("x-tokenfuse-priority", priority),
            ("x-mock-prompt-tokens", "11"),
            ("x-mock-completion-tokens", &completion),
        ],
        &hello(1),
    );
    assert_eq!(r.status, 200, "spending {amount}: {}", r.text());
    wait_used(s, tenant, "tenant-day", used_after);
}

fn assert_rate_limit_error(r: &http::Response, budget: &str) {
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let error = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(error.len(), 4, "exactly message, type, param, code: {v}");
    assert_eq!(v["error"]["type"], "tokens");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["param"].is_null());
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(budget), "{message}");
    assert_eq!(r.header("x-tokenfuse-budget"), Some(budget));
}

// ---------------------------------------------------------------------------
// Exhaustion and the 429
// ---------------------------------------------------------------------------

#[test]
fn a_spent_day_budget_answers_429_with_rate_limit_headers_and_an_openai_error_body() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    let tenant = "exhaust-day";
    spend(s, tenant, 800, "p1", 800);

    // 800 used of 1000; 9 + 200 = 209 more does not fit under p1's 90%.
    let before = now_ms();
    let r = chat(
        s,
        &[("x-tenant", tenant), ("x-test", "exhaust-day-429")],
        &hello(200),
    );
    let after = now_ms();
    assert_rate_limit_error(&r, "tenant-day");
    assert_eq!(header_u64(&r, "x-ratelimit-limit-tokens"), 1000);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-tokens"), 200);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("needs 209 tokens, more than the 200 of 1000 left in budget 'tenant-day'"),
        "{message}"
    );

    // retry-after: seconds until the UTC day ends, as seen between sending and receiving.
    let day_ms = DAY * 1000;
    let end = (before / day_ms + 1) * day_ms;
    let retry_after = header_u64(&r, "retry-after");
    let lowest = (end - after) / 1000;
    let highest = (end - before).div_ceil(1000);
    assert!(
        (lowest..=highest).contains(&retry_after),
        "retry-after {retry_after} not in {lowest}..={highest}"
    );
    let reset = r.header("x-ratelimit-reset-tokens").unwrap();
    assert!(reset.ends_with('s'), "{reset}");
    assert_eq!(
        parse_go_duration(reset),
        retry_after * 1000,
        "x-ratelimit-reset-tokens {reset} says the same as retry-after"
    );
    assert_eq!(
        r.header("x-should-retry"),
        Some("false"),
        "a reset {retry_after}s away is beyond should_retry_max_secs (60)"
    );

    assert!(
        s.primary
            .requests()
            .iter()
            .all(|q| q.header("x-test") != Some("exhaust-day-429")),
        "a rejected request never reaches the upstream"
    );
    assert_eq!(
        used(&ledger(s, tenant, "tenant-day")),
        800,
        "a rejection reserves nothing"
    );
    assert!(
        counter_sum(
            &s.envoy,
            &[
                "tokenfuse_decisions.",
                "decision=.=rejected;",
                "budget=.=tenant-day;"
            ],
            1
        ) >= 1
    );
}

#[test]
fn a_spent_minute_budget_asks_the_client_to_retry_within_the_minute() {
    let s = main_stack();
    away_from_window_end(MINUTE, 15);
    let tenant = "exhaust-minute";
    let r = chat(
        s,
        &[
            ("x-tenant", tenant),
            ("x-mock-prompt-tokens", "11"),
            ("x-mock-completion-tokens", "789"),
        ],
        &hello(1),
    );
    assert_eq!(r.status, 200);
    wait_used(s, tenant, "tenant-minute", 800);

    let r = chat(s, &[("x-tenant", tenant)], &hello(200));
    assert_rate_limit_error(&r, "tenant-minute");
    assert_eq!(header_u64(&r, "x-ratelimit-limit-tokens"), 1000);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-tokens"), 200);
    let retry_after = header_u64(&r, "retry-after");
    assert!((1..=60).contains(&retry_after), "retry-after {retry_after}");
    let reset = parse_go_duration(r.header("x-ratelimit-reset-tokens").unwrap());
    assert!(
        reset <= 60_000 && reset.div_ceil(1000) == retry_after,
        "{reset} ms"
    );
    assert_eq!(
        r.header("x-should-retry"),
        None,
        "a reset within should_retry_max_secs leaves retrying to the client"
    );
}

#[test]
fn a_request_larger_than_its_priority_may_ever_use_is_told_not_to_retry() {
    let s = main_stack();
    away_from_window_end(MINUTE, 15);
    // 9 + 900 = 909 tokens: more than p1's 90% of a 1000-token minute, even when unused.
    let r = chat(s, &[("x-tenant", "hopeless")], &hello(900));
    assert_rate_limit_error(&r, "tenant-minute");
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-tokens"), 1000);
    assert!(header_u64(&r, "retry-after") <= 60);
    assert_eq!(
        r.header("x-should-retry"),
        Some("false"),
        "waiting for the reset cannot help"
    );
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("needs 909 tokens") && message.contains("more than priority p1 may use"),
        "{message}"
    );
    // p0 may use the whole limit.
    let r = chat(
        s,
        &[("x-tenant", "hopeless"), ("x-tokenfuse-priority", "p0")],
        &hello(900),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn admitted_responses_carry_the_tightest_budgets_rate_limit_headers() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    // 1000 a day (tenant-day) is tighter than 1,000,000 a minute (tenant-minute).
    let r = chat(s, &[("x-tenant", "rate-headers")], &hello(91));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "x-ratelimit-limit-tokens"), 1000);
    assert_eq!(
        header_u64(&r, "x-ratelimit-remaining-tokens"),
        900,
        "the reservation (9 + 91) is held while the request runs"
    );
    let reset = parse_go_duration(r.header("x-ratelimit-reset-tokens").unwrap());
    assert!(
        reset > 0 && reset <= ms_until_window_end(DAY) + 2_000,
        "{reset} ms"
    );
    assert_eq!(header_u64(&r, "x-tokenfuse-prompt-tokens"), HELLO_PROMPT);
    assert_eq!(r.header("x-tokenfuse-budget-warning"), None);
}

#[test]
fn responses_past_warn_at_carry_the_budget_warning() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    let tenant = "warn";
    spend(s, tenant, 690, "p1", 690);
    // 690 + 9 + 91 = 790: under 80%.
    let r = chat(s, &[("x-tenant", tenant)], &hello(91));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tokenfuse-budget-warning"), None);
    wait_used(s, tenant, "tenant-day", 708);
    // 708 + 100 = 808: past 80% of tenant-day, nowhere near it in tenant-minute.
    let r = chat(s, &[("x-tenant", tenant)], &hello(91));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tokenfuse-budget-warning"), Some("tenant-day"));
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-tokens"), 1000 - 808);
    assert!(counter_sum(&s.envoy, &["tokenfuse_decisions.", "decision=.=warned;"], 1) >= 1);
}

#[test]
fn requests_without_an_identity_are_charged_to_the_default_key() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    // The only request on the shared stack without `x-tenant`.
    let r = chat(s, &[], &hello(10));
    assert_eq!(r.status, 200, "{}", r.text());
    let view = wait_used(s, "_default", "tenant-day", 18);
    assert_eq!(view["tracked"], true);
    assert_eq!(view["limit"], 100_000);
}

// ---------------------------------------------------------------------------
// Priorities
// ---------------------------------------------------------------------------

#[test]
fn p2_is_shed_first_then_p1_while_p0_still_passes() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    let tenant = "prio";
    // Each probe reserves 9 + 91 = 100 and, when admitted, settles to the mock's 18.
    let probe = |priority: &str| {
        chat(
            s,
            &[("x-tenant", tenant), ("x-tokenfuse-priority", priority)],
            &hello(91),
        )
    };

    // 650 used: a probe would take it to 750, over p2's 700 but under p1's 900.
    spend(s, tenant, 650, "p1", 650);
    let r = probe("p2");
    assert_rate_limit_error(&r, "tenant-day");
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-tokens"), 350);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("keeps its last 30% for higher priorities") && message.contains("p2"),
        "{message}"
    );
    assert_eq!(probe("p1").status, 200, "750 fits under p1's 900");
    wait_used(s, tenant, "tenant-day", 668);
    assert_eq!(probe("p0").status, 200, "768 fits under p0's 1000");
    wait_used(s, tenant, "tenant-day", 686);

    // 850 used: a probe would take it to 950, over p1's 900 but under p0's 1000.
    spend(s, tenant, 164, "p0", 850);
    assert_rate_limit_error(&probe("p2"), "tenant-day");
    assert_rate_limit_error(&probe("p1"), "tenant-day");
    let r = probe("p0");
    assert_eq!(r.status, 200, "950 fits under p0's 1000: {}", r.text());
    assert_eq!(r.header("x-tokenfuse-budget-warning"), Some("tenant-day"));
    wait_used(s, tenant, "tenant-day", 868);

    // Only this test sends p2 on the shared stack.
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[
                "tokenfuse_decisions.",
                "decision=.=rejected;",
                "priority=.=p2;"
            ],
            2
        ),
        2
    );
}

// ---------------------------------------------------------------------------
// Admin endpoint and elastic top-ups
// ---------------------------------------------------------------------------

#[test]
fn an_elastic_top_up_through_the_admin_endpoint_unblocks_a_spent_tenant() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    let tenant = "topup";
    spend(s, tenant, 1000, "p0", 1000);
    let request = hello(100); // reserves 109
    assert_rate_limit_error(&chat(s, &[("x-tenant", tenant)], &request), "tenant-day");

    let auth = admin_auth();
    let topup = json!({"budget": "tenant-day", "key": tenant, "amount": 500}).to_string();
    let r = s
        .envoy
        .post_json(
            &format!("{ADMIN_PATH}/topup"),
            &[("authorization", &auth)],
            &topup,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["tiers"]["elastic"]["balance"], 500);
    assert_eq!(
        (
            v["used"].as_u64(),
            v["remaining"].as_u64(),
            v["limit"].as_u64()
        ),
        (Some(1000), Some(500), Some(1500))
    );

    // 1000 + 109 fits under 90% of 1500.
    let r = chat(s, &[("x-tenant", tenant)], &request);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "x-ratelimit-limit-tokens"), 1500);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-tokens"), 500 - 109);

    // Settled to 18, drawn from the elastic tier (base is spent).
    let view = wait_used(s, tenant, "tenant-day", 1018);
    assert_eq!(view["budget"], "tenant-day");
    assert_eq!(view["key"], tenant);
    assert_eq!(view["tracked"], true);
    assert_eq!(view["unit"], "tokens");
    assert_eq!(view["window"], "day");
    assert_eq!(view["limit"], 1500);
    assert_eq!(view["remaining"], 482);
    assert_eq!(view["tiers"]["base"]["limit"], 1000);
    assert_eq!(view["tiers"]["base"]["used"], 1000);
    assert_eq!(view["tiers"]["elastic"]["balance"], 482);
    assert_eq!(view["tiers"]["elastic"]["used_this_window"], 18);
    assert_eq!(view["tiers"]["burst"]["limit"], 0);
    let resets = view["resets_in_secs"].as_u64().unwrap();
    assert!(resets > 0 && resets <= DAY, "{resets}");
}

#[test]
fn the_admin_key_listing_puts_the_most_used_key_of_a_budget_first() {
    let s = main_stack();
    let auth = admin_auth();
    // Two keys of their own: one spends 109 then settles to 18, the other twice that.
    away_from_window_end(DAY, 120);
    let (light, heavy) = ("listing-light", "listing-heavy");
    let request = hello(100);
    for (tenant, times) in [(light, 1), (heavy, 2)] {
        for _ in 0..times {
            let r = chat(s, &[("x-tenant", tenant)], &request);
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    wait_used(s, heavy, "tenant-day", 36);
    wait_used(s, light, "tenant-day", 18);
    let r = s
        .envoy
        .get(
            &format!("{ADMIN_PATH}/keys?budget=tenant-day&limit=1000"),
            &[("authorization", &auth)],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let keys: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    let at = |key: &str| keys.iter().position(|k| *k == key).unwrap();
    assert!(at(heavy) < at(light), "{keys:?}");
    let ratios: Vec<f64> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["used_ratio"].as_f64().unwrap())
        .collect();
    assert!(ratios.windows(2).all(|w| w[0] >= w[1]), "{ratios:?}");
    assert_eq!(v["keys"][at(heavy)]["used"], 36);
    assert_eq!(v["next_from"], Value::Null);
    // Without the token: 401, as every admin path.
    let r = s
        .envoy
        .get(&format!("{ADMIN_PATH}/keys?budget=tenant-day"), &[])
        .unwrap();
    assert_eq!(r.status, 401);
}

#[test]
fn the_admin_endpoint_refuses_missing_or_wrong_tokens_and_never_reaches_the_upstream() {
    let s = main_stack();
    let path = format!("{ADMIN_PATH}?key=admin-auth&budget=tenant-day");
    let wrong = format!("Bearer {ADMIN_TOKEN}x");
    let short = format!("Bearer {}", &ADMIN_TOKEN[1..]);
    for headers in [
        vec![],
        vec![("authorization", wrong.as_str())],
        vec![("authorization", short.as_str())],
        vec![("authorization", ADMIN_TOKEN)],
    ] {
        let mut all = headers.clone();
        all.push(("x-test", "admin-auth"));
        let r = s.envoy.get(&path, &all).unwrap();
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text());
        assert_eq!(r.json()["error"]["type"], "admin_error");
    }
    // A top-up with a wrong token changes nothing.
    let topup = json!({"budget": "tenant-day", "key": "admin-auth", "amount": 500}).to_string();
    let r = s
        .envoy
        .post_json(
            &format!("{ADMIN_PATH}/topup"),
            &[("authorization", &wrong), ("x-test", "admin-auth")],
            &topup,
        )
        .unwrap();
    assert_eq!(r.status, 401);
    let view = ledger(s, "admin-auth", "tenant-day");
    assert_eq!(view["tracked"], false);
    assert_eq!(view["tiers"]["elastic"]["balance"], 0);
    assert_eq!(view["limit"], 100_000);

    assert!(
        s.primary
            .requests()
            .iter()
            .chain(s.economy.requests().iter())
            .all(|q| !q.path.starts_with(ADMIN_PATH)),
        "admin requests are answered by the filter"
    );
}

#[test]
fn the_admin_path_passes_through_to_the_upstream_when_admin_is_not_configured() {
    let s = reroute_stack();
    let auth = admin_auth();
    let r = s
        .envoy
        .get(
            &format!("{ADMIN_PATH}?key=frugal"),
            &[("authorization", &auth), ("x-test", "admin-off")],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-mock-upstream"), Some("primary"));
    assert_eq!(r.text(), "passthrough primary");
    assert!(s
        .primary
        .requests()
        .iter()
        .any(|q| q.header("x-test") == Some("admin-off") && q.path.starts_with(ADMIN_PATH)));
}

// ---------------------------------------------------------------------------
// Settlement
// ---------------------------------------------------------------------------

#[test]
fn a_json_response_settles_to_the_providers_usage() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    away_from_window_end(MINUTE, 10);
    let tenant = "settle-json";
    let r = chat(s, &[("x-tenant", tenant)], &hello(100));
    assert_eq!(r.status, 200);
    assert_eq!(
        header_u64(&r, "x-ratelimit-remaining-tokens"),
        100_000 - 109,
        "the reservation: prompt 9 + max_tokens 100"
    );
    // The mock reports 11 prompt + 7 completion tokens.
    let view = wait_used(s, tenant, "tenant-day", 18);
    assert_eq!(view["remaining"], 100_000 - 18);
    wait_used(s, tenant, "tenant-minute", 18);
}

#[test]
fn an_sse_stream_with_usage_settles_to_the_reported_usage() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    let tenant = "settle-sse-usage";
    let body = json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
                      "max_tokens": 100, "messages": [{"role": "user", "content": "Hello!"}]})
    .to_string();
    let r = chat(
        s,
        &[
            ("x-tenant", tenant),
            ("x-mock-prompt-tokens", "21"),
            ("x-mock-completion-tokens", "13"),
        ],
        &body,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-mock-include-usage"), Some("true"));
    assert!(r.text().contains("[DONE]"));
    wait_used(s, tenant, "tenant-day", 34);
}

#[test]
fn an_sse_stream_without_usage_settles_to_the_counted_tokens() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    let tenant = "settle-sse-counted";
    let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 100,
                      "messages": [{"role": "user", "content": "Hello!"}]})
    .to_string();
    let r = chat(
        s,
        &[("x-tenant", tenant), ("x-mock-usage", "absent")],
        &body,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-mock-include-usage"), Some("false"));
    let completion = native_text_tokens(DEFAULT_COMPLETION);
    assert_eq!(completion, 9, "o200k_base count of {DEFAULT_COMPLETION:?}");
    let prompt = header_u64(&r, "x-tokenfuse-prompt-tokens");
    assert_eq!(prompt, HELLO_PROMPT);
    wait_used(s, tenant, "tenant-day", prompt + completion);
}

#[test]
fn an_upstream_error_refunds_the_whole_reservation() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    let tenant = "settle-500";
    let r = chat(
        s,
        &[("x-tenant", tenant), ("x-mock-status", "500")],
        &hello(100),
    );
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-mock-upstream"), Some("primary"));
    assert_eq!(
        header_u64(&r, "x-ratelimit-remaining-tokens"),
        100_000 - 109,
        "the reservation was held while the request ran"
    );
    let view = wait_used(s, tenant, "tenant-day", 0);
    assert_eq!(view["tracked"], true);
    assert_eq!(view["remaining"], 100_000);
    assert!(counter_sum(&s.envoy, &["tokenfuse_refunded"], 109) >= 109);
}

#[test]
fn a_client_abort_mid_stream_is_charged_prompt_plus_what_was_streamed() {
    let s = main_stack();
    away_from_window_end(DAY, 120);
    let tenant = "settle-abort";
    let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 100,
                      "messages": [{"role": "user", "content": "Hello!"}]})
    .to_string();
    let reservation = HELLO_PROMPT + 100;
    let got = http::stream_then_abort(
        s.envoy.listener_port,
        CHAT,
        &[("x-tenant", tenant), ("x-mock-chunk-delay-ms", "200")],
        &body,
        100,
    )
    .unwrap();
    assert!(!got.is_empty());
    let whole = native_text_tokens(DEFAULT_COMPLETION);
    let view = wait_ledger(
        s,
        tenant,
        "tenant-day",
        |v| used(v) < reservation,
        "the reservation to be settled",
    );
    let charged = used(&view);
    assert!(
        charged > HELLO_PROMPT && charged < HELLO_PROMPT + whole,
        "charged {charged}: the prompt ({HELLO_PROMPT}) plus part of the {whole}-token answer"
    );
    // Settled once: nothing moves afterwards.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(used(&ledger(s, tenant, "tenant-day")), charged);
}

// ---------------------------------------------------------------------------
// Rerouting
// ---------------------------------------------------------------------------

#[test]
fn a_tripped_reroute_budget_serves_the_request_with_the_cheaper_model_on_the_economy_route() {
    let s = reroute_stack();
    let body = hello(20);
    let r = chat(
        s,
        &[("x-tenant", "frugal"), ("x-test", "reroute-frugal")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-mock-upstream"), Some("economy"));
    assert_eq!(r.header("x-tokenfuse-rerouted-to"), Some("gpt-4o-mini"));
    assert_eq!(r.json()["model"], "gpt-4o-mini");

    let seen = s
        .economy
        .requests()
        .into_iter()
        .find(|q| q.header("x-test") == Some("reroute-frugal"))
        .expect("the economy upstream saw the rerouted request");
    let sent = seen.json().unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(
        sent["messages"],
        serde_json::from_str::<Value>(&body).unwrap()["messages"]
    );
    assert_eq!(sent["max_tokens"], 20);
    let cl: usize = seen
        .header("content-length")
        .expect("content-length forwarded")
        .parse()
        .unwrap();
    assert_eq!(
        cl,
        seen.body.len(),
        "content-length matches the rewritten body"
    );
    assert!(s
        .primary
        .requests()
        .iter()
        .all(|q| q.header("x-test") != Some("reroute-frugal")));
    assert!(
        counter_sum(
            &s.envoy,
            &["tokenfuse_decisions.", "decision=.=rerouted;"],
            1
        ) >= 1
    );

    // A tenant with room is served as asked.
    let r = chat(s, &[("x-tenant", "roomy")], &hello(20));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-mock-upstream"), Some("primary"));
    assert_eq!(r.header("x-tokenfuse-rerouted-to"), None);
    assert_eq!(r.json()["model"], "gpt-4o");
}

#[test]
fn a_tripped_reroute_budget_rejects_models_without_a_cheaper_counterpart() {
    let s = reroute_stack();
    away_from_window_end(DAY, 120);
    let body = json!({"model": "gpt-4.1", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "Hello!"}]})
    .to_string();
    let r = chat(
        s,
        &[("x-tenant", "frugal"), ("x-test", "reroute-none")],
        &body,
    );
    assert_rate_limit_error(&r, "tenant-reroute");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("no cheaper"), "{message}");
    // 10 a day, possibly overdrawn already by a rerouted request of the other test.
    assert!(header_u64(&r, "x-ratelimit-remaining-tokens") <= 10);
    assert!(header_u64(&r, "x-ratelimit-limit-tokens") >= 10);
    assert!(header_u64(&r, "retry-after") > 60);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert!(s
        .primary
        .requests()
        .iter()
        .chain(s.economy.requests().iter())
        .all(|q| q.header("x-test") != Some("reroute-none")));
}

#[test]
fn a_rerouted_stream_gets_the_cheaper_model_and_usage_injection_with_a_correct_content_length() {
    let s = reroute_stack();
    let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 20,
                      "messages": [{"role": "user", "content": "Hello!"}]})
    .to_string();
    let r = chat(
        s,
        &[("x-tenant", "frugal"), ("x-test", "reroute-stream")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-mock-upstream"), Some("economy"));
    assert_eq!(r.header("x-tokenfuse-rerouted-to"), Some("gpt-4o-mini"));
    assert_eq!(r.header("x-mock-include-usage"), Some("true"));
    assert!(r.text().contains("[DONE]"));
    let seen = s
        .economy
        .requests()
        .into_iter()
        .find(|q| q.header("x-test") == Some("reroute-stream"))
        .expect("the economy upstream saw the rerouted stream");
    let sent = seen.json().unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let cl: usize = seen.header("content-length").unwrap().parse().unwrap();
    assert_eq!(cl, seen.body.len());
}

#[test]
fn a_usd_budget_charges_by_price_and_refuses_with_a_usd_error() {
    let s = reroute_stack();
    away_from_window_end(DAY, 120);
    let tenant = "pricey";
    // gpt-4o at $2.50 / $10 per million, rounded up per part to micro-USD:
    // 9 prompt = 23, 200 output = 2000: 2023 µ$, more than p1's 90% of 2000 µ$.
    let r = chat(s, &[("x-tenant", tenant)], &hello(200));
    assert_eq!(r.status, 429, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["type"], "usd");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r.header("x-tokenfuse-budget"), Some("spend-usd"));
    assert_eq!(
        r.header("x-should-retry"),
        Some("false"),
        "it can never fit"
    );
    assert!(r.header("retry-after").is_some());
    for h in [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ] {
        assert_eq!(r.header(h), None, "{h} belongs to token budgets");
    }
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("needs 2023 micro-USD"), "{message}");

    // Reserves 23 + 100 = 123 µ$; the mock's 11 + 7 tokens settle to 28 + 70 = 98 µ$.
    assert_eq!(chat(s, &[("x-tenant", tenant)], &hello(10)).status, 200);
    // Reserves 123 µ$; 11 + 160 tokens settle to 28 + 1600 = 1628 µ$.
    let r = chat(
        s,
        &[
            ("x-tenant", tenant),
            ("x-mock-prompt-tokens", "11"),
            ("x-mock-completion-tokens", "160"),
        ],
        &hello(10),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // 98 + 1628 = 1726 µ$ used: a 23 + 1000 = 1023 µ$ request finds 274 left.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = chat(s, &[("x-tenant", tenant)], &hello(100));
        assert_eq!(r.status, 429, "{}", r.text());
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        if message.contains("needs 1023 micro-USD, more than the 274 of 2000 left") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "settlement never showed: {message}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Oversize requests
// ---------------------------------------------------------------------------

/// A system prompt, three exchanges and a final question: about 400 prompt tokens.
fn long_conversation(max_tokens: u64) -> Value {
    let filler = |i: usize| {
        format!(
            "Turn {i}: the quarterly report covers revenue, churn, hiring plans, the office move \
             and the migration of the billing system to the new provider, in some detail."
        )
    };
    let mut messages = vec![json!({"role": "system", "content": "You are a concise analyst."})];
    for i in 0..3 {
        messages.push(json!({"role": "user", "content": filler(2 * i)}));
        messages.push(json!({"role": "assistant", "content": filler(2 * i + 1)}));
    }
    messages.push(json!({"role": "user", "content": "So what should we do first?"}));
    json!({"model": "gpt-4o", "max_tokens": max_tokens, "messages": messages})
}

#[test]
fn an_oversize_conversation_is_truncated_to_fit_keeping_system_and_last_message() {
    let s = truncate_stack();
    let original = long_conversation(50);
    let body = original.to_string();
    let full = native_count(ApiKind::ChatCompletions, body.as_bytes());
    assert!(full + 50 > 300, "the conversation must be oversize: {full}");

    let r = chat(s, &[("x-tenant", "chatty"), ("x-test", "truncate")], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s
        .primary
        .requests()
        .into_iter()
        .find(|q| q.header("x-test") == Some("truncate"))
        .expect("the upstream saw the truncated request");
    let sent = seen.json().unwrap();
    let before = original["messages"].as_array().unwrap();
    let after = sent["messages"].as_array().unwrap();
    assert!(
        after.len() < before.len(),
        "{} messages reached the upstream",
        after.len()
    );
    assert!(after.len() >= 2, "{after:?}");
    assert_eq!(after[0], before[0], "the system message stays first");
    assert_eq!(after.last(), before.last(), "the question is kept");
    assert_eq!(
        after[1..],
        before[before.len() - (after.len() - 1)..],
        "the oldest turns were dropped, the rest is untouched"
    );
    assert_eq!(sent["max_tokens"], 50);

    let prompt = header_u64(&r, "x-tokenfuse-prompt-tokens");
    assert_eq!(prompt, native_count(ApiKind::ChatCompletions, &seen.body));
    assert!(prompt + 50 <= 300, "prompt {prompt} + 50 fits the cap");
    assert!(prompt < full);
    let cl: usize = seen.header("content-length").unwrap().parse().unwrap();
    assert_eq!(cl, seen.body.len());

    // The Anthropic test on this stack adds to the same counter.
    let dropped = (before.len() - after.len()) as u64;
    assert!(counter_sum(&s.envoy, &["tokenfuse_truncated_messages"], dropped) >= dropped);
    assert!(
        counter_sum(
            &s.envoy,
            &["tokenfuse_decisions.", "decision=.=truncated;"],
            1
        ) >= 1
    );
}

#[test]
fn an_oversize_anthropic_conversation_is_truncated_and_still_starts_with_a_user_turn() {
    let s = truncate_stack();
    let chat_shaped = long_conversation(50);
    let turns: Vec<Value> = chat_shaped["messages"].as_array().unwrap()[1..].to_vec();
    let original = json!({"model": "claude-sonnet-4-5", "max_tokens": 100,
                          "system": "You are a concise analyst.", "messages": turns});
    let body = original.to_string();
    let full = native_count(ApiKind::AnthropicMessages, body.as_bytes());
    assert!(
        full + 100 > 300,
        "the conversation must be oversize: {full}"
    );

    let r = s
        .envoy
        .post_json(
            "/v1/messages",
            &[("x-tenant", "chatty"), ("x-test", "truncate-anthropic")],
            &body,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s
        .primary
        .requests()
        .into_iter()
        .find(|q| q.header("x-test") == Some("truncate-anthropic"))
        .expect("the upstream saw the truncated request");
    let sent = seen.json().unwrap();
    let before = original["messages"].as_array().unwrap();
    let after = sent["messages"].as_array().unwrap();
    assert!(after.len() < before.len());
    assert_eq!(
        after[0]["role"], "user",
        "Anthropic conversations start with a user turn"
    );
    assert_eq!(after.last(), before.last());
    assert_eq!(after[..], before[before.len() - after.len()..]);
    assert_eq!(sent["system"], original["system"]);
    let prompt = header_u64(&r, "x-tokenfuse-prompt-tokens");
    assert_eq!(prompt, native_count(ApiKind::AnthropicMessages, &seen.body));
    assert!(prompt + 100 <= 300, "prompt {prompt} + 100 fits the cap");
    let cl: usize = seen.header("content-length").unwrap().parse().unwrap();
    assert_eq!(cl, seen.body.len());
}

#[test]
fn a_conversation_that_cannot_be_shortened_enough_is_refused_as_oversize() {
    let s = truncate_stack();
    // One huge question: it is the last message, so nothing can be dropped.
    let body = json!({"model": "gpt-4o", "max_tokens": 50, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "word ".repeat(400)}]})
    .to_string();
    let r = chat(
        s,
        &[("x-tenant", "chatty"), ("x-test", "untruncatable")],
        &body,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "request_tokens_exceeded");
    assert!(s
        .primary
        .requests()
        .iter()
        .all(|q| q.header("x-test") != Some("untruncatable")));
}

#[test]
fn an_oversize_request_is_refused_with_400_and_never_reaches_the_upstream() {
    // 0.3 of a 1000 base: a 300-token per-request cap.
    let config = json!({
        "api": "v1",
        "budgets": [{"name": "strict", "key": "header:x-tenant", "window": "day",
                     "base": 1000, "max_request_tokens": 0.3, "oversize": "reject"}]
    });
    let s = Stack::start(&config.to_string());
    let body = long_conversation(50).to_string();
    let estimate = native_count(ApiKind::ChatCompletions, body.as_bytes()) + 50;
    assert!(estimate > 300);
    let r = chat(&s, &[("x-tenant", "chatty"), ("x-test", "oversize")], &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["error"]["code"], "request_tokens_exceeded");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&estimate.to_string())
            && message.contains("300")
            && message.contains("strict"),
        "{message}"
    );
    assert!(s.primary.requests().is_empty(), "the upstream never saw it");
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[
                "tokenfuse_decisions.",
                "decision=.=oversize;",
                "budget=.=strict;"
            ],
            1
        ),
        1
    );
    // A request under the cap goes through.
    let r = chat(&s, &[("x-tenant", "chatty")], &hello(200));
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------

#[test]
fn concurrent_requests_across_workers_never_reserve_more_than_the_budget() {
    const BUDGET: u64 = 10_000;
    const EACH: u64 = 500; // 9 prompt + max_tokens 491
    const REQUESTS: usize = 100;
    const DELAY_MS: u64 = 2_000;
    let config = json!({
        "api": "v1",
        "budgets": [{"name": "crowd", "key": "header:x-tenant", "window": "day", "base": BUDGET,
                     "priority_ceilings": {"p1": 1.0}}],
        "admin": {"path": ADMIN_PATH, "token": ADMIN_TOKEN}
    });
    let s = Stack::start(&config.to_string());
    away_from_window_end(DAY, 120);
    let body = hello(EACH - HELLO_PROMPT);
    let port = s.envoy.listener_port;
    let barrier = Arc::new(Barrier::new(REQUESTS));
    let start = Instant::now();
    let threads: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            let body = body.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let test = format!("crowd-{i}");
                let delay = DELAY_MS.to_string();
                let r = http::post_json(
                    port,
                    CHAT,
                    &[
                        ("x-tenant", "crowd"),
                        ("x-mock-delay-ms", &delay),
                        ("x-test", &test),
                    ],
                    &body,
                )
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
                (start.elapsed(), r)
            })
        })
        .collect();
    let results: Vec<(Duration, http::Response)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();

    let admitted: Vec<&(Duration, http::Response)> =
        results.iter().filter(|(_, r)| r.status == 200).collect();
    let rejected: Vec<&(Duration, http::Response)> =
        results.iter().filter(|(_, r)| r.status == 429).collect();
    let others: Vec<u16> = results
        .iter()
        .map(|(_, r)| r.status)
        .filter(|s| *s != 200 && *s != 429)
        .collect();
    let admitted_tokens = admitted.len() as u64 * EACH;
    let cas_retries = counter_sum(&s.envoy, &["tokenfuse_cas_retries"], 0);
    println!(
        "concurrency: {REQUESTS} requests fired at once over 2 Envoy workers, {EACH} tokens each; \
         admitted {} ({admitted_tokens} tokens) against a budget of {BUDGET}; rejected {} (429); \
         other statuses {others:?}; CAS retries {cas_retries}",
        admitted.len(),
        rejected.len(),
    );
    assert!(others.is_empty(), "unexpected statuses {others:?}");
    assert!(
        admitted_tokens <= BUDGET,
        "over-admitted: {} requests × {EACH} = {admitted_tokens} > {BUDGET}",
        admitted.len()
    );

    // The figures below hold when every admitted reservation was still held while the
    // others were judged: all answers to admitted requests came within one upstream delay
    // of each other, and every 429 came before the first of them.
    let first_ok = admitted.iter().map(|(t, _)| *t).min().unwrap();
    let last_ok = admitted.iter().map(|(t, _)| *t).max().unwrap();
    let last_rejected = rejected.iter().map(|(t, _)| *t).max().unwrap();
    println!(
        "concurrency: last 429 at {last_rejected:?}, 200s between {first_ok:?} and {last_ok:?}"
    );
    assert!(
        last_ok - first_ok < Duration::from_millis(DELAY_MS) && last_rejected < first_ok,
        "timing precondition: the requests did not all overlap (machine too loaded?)"
    );
    assert_eq!(
        admitted.len() as u64,
        BUDGET / EACH,
        "every slot of the budget is used, and no more"
    );
    // Each admission was serialised by CAS: the remaining figures are all distinct.
    let remaining: BTreeSet<u64> = admitted
        .iter()
        .map(|(_, r)| header_u64(r, "x-ratelimit-remaining-tokens"))
        .collect();
    let expected: BTreeSet<u64> = (0..BUDGET / EACH).map(|k| k * EACH).collect();
    assert_eq!(remaining, expected);
    for (_, r) in &admitted {
        assert_eq!(header_u64(r, "x-tokenfuse-prompt-tokens"), HELLO_PROMPT);
    }
    for (_, r) in &rejected {
        assert_eq!(r.header("x-tokenfuse-budget"), Some("crowd"));
    }
    assert_eq!(
        s.primary.requests().len(),
        admitted.len(),
        "only admitted requests reached the upstream"
    );

    // Both workers (two Wasm VMs) took part.
    let per_worker = worker_connections(&s.envoy);
    println!("concurrency: downstream connections per Envoy worker {per_worker:?}");
    assert!(
        per_worker.len() == 2 && per_worker.iter().all(|n| *n > 0),
        "both workers served connections: {per_worker:?}"
    );

    let n = admitted.len() as u64;
    assert_eq!(
        counter_sum(
            &s.envoy,
            &["tokenfuse_reserved.", "budget=.=crowd;"],
            n * EACH
        ),
        n * EACH
    );
    assert_eq!(
        counter_sum(
            &s.envoy,
            &[
                "tokenfuse_decisions.",
                "decision=.=rejected;",
                "budget=.=crowd;"
            ],
            REQUESTS as u64 - n
        ),
        REQUESTS as u64 - n
    );
    let view = wait_used(&s, "crowd", "crowd", n * 18);
    assert_eq!(view["remaining"], BUDGET - n * 18);
    assert_eq!(
        counter_sum(&s.envoy, &["tokenfuse_refunded"], n * (EACH - 18)),
        n * (EACH - 18)
    );
    assert_eq!(counter_sum(&s.envoy, &["tokenfuse_fail_open"], 0), 0);
    assert_eq!(counter_sum(&s.envoy, &["tokenfuse_settle_failures"], 0), 0);
    println!(
        "concurrency: after settlement used = {} (= {n} × 18), CAS retries {}",
        used(&view),
        counter_sum(&s.envoy, &["tokenfuse_cas_retries"], 0)
    );
}

/// A generous budget per `x-tenant` and one per credential (`bearer`), with admin.
fn busy_stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let config = json!({
            "api": "v1",
            "budgets": [
                {"name": "busy", "key": "header:x-tenant", "window": "day", "base": 1_000_000},
                {"name": "per-credential", "key": "bearer", "window": "day", "base": 1_000_000}
            ],
            "admin": {"path": ADMIN_PATH, "token": ADMIN_TOKEN}
        });
        Stack::start(&config.to_string())
    })
}

#[test]
fn concurrent_writes_from_both_workers_lose_no_tokens() {
    const REQUESTS: usize = 200;
    const EACH: u64 = 100; // 9 prompt + max_tokens 91
    let s = busy_stack();
    away_from_window_end(DAY, 120);
    let body = hello(EACH - HELLO_PROMPT);
    let port = s.envoy.listener_port;
    let barrier = Arc::new(Barrier::new(REQUESTS));
    let threads: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            let body = body.clone();
            std::thread::spawn(move || {
                barrier.wait();
                http::post_json(port, CHAT, &[("x-tenant", "busy")], &body)
                    .unwrap_or_else(|e| panic!("request {i}: {e}"))
                    .status
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let n = REQUESTS as u64;
    // Every reservation and every settlement landed: 200 × 18 used, nothing lost or doubled.
    let view = wait_used(s, "busy", "busy", n * 18);
    assert_eq!(view["remaining"], 1_000_000 - n * 18);
    // (The bearer test on this stack reserves in `busy` too, under another tenant.)
    assert!(
        counter_sum(
            &s.envoy,
            &["tokenfuse_reserved.", "budget=.=busy;"],
            n * EACH
        ) >= n * EACH
    );
    assert_eq!(counter_sum(&s.envoy, &["tokenfuse_settle_failures"], 0), 0);
    assert_eq!(counter_sum(&s.envoy, &["tokenfuse_fail_open"], 0), 0);
    println!(
        "concurrent writes: {REQUESTS} requests, used {} = {n} × 18, CAS retries {}, per worker {:?}",
        used(&view),
        counter_sum(&s.envoy, &["tokenfuse_cas_retries"], 0),
        worker_connections(&s.envoy)
    );
}

#[test]
fn bearer_budgets_key_on_a_hash_of_the_credential() {
    let s = busy_stack();
    away_from_window_end(DAY, 120);
    let key = bearer_key;
    let alpha = key("sk-test-alpha-credential");
    let beta = key("sk-ant-beta-credential");
    assert_ne!(alpha, beta);
    // OpenAI style, twice; Anthropic style (x-api-key) once.
    for _ in 0..2 {
        let r = chat(
            s,
            &[
                ("x-tenant", "bearer-test"),
                ("authorization", "Bearer sk-test-alpha-credential"),
            ],
            &hello(10),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = chat(
        s,
        &[
            ("x-tenant", "bearer-test"),
            ("x-api-key", "sk-ant-beta-credential"),
        ],
        &hello(10),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_used(s, &alpha, "per-credential", 36);
    wait_used(s, &beta, "per-credential", 18);
    wait_used(s, "bearer-test", "busy", 54);
}

/// Downstream connections each worker accepted on the tokenfuse listener (the only
/// non-admin listener; Envoy names it after its configured address, port 0), by worker.
fn worker_connections(envoy: &Envoy) -> Vec<u64> {
    let mut counts: Vec<(String, u64)> = envoy
        .stats_matching(r"^listener\.127\.0\.0\.1_[0-9]+\.worker_[0-9]+\.downstream_cx_total$")
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect();
    counts.sort();
    counts.into_iter().map(|(_, n)| n).collect()
}

// ---------------------------------------------------------------------------
// Key cap
// ---------------------------------------------------------------------------

#[test]
fn identities_beyond_max_keys_share_the_overflow_key() {
    let config = json!({
        "api": "v1",
        "budgets": [{"name": "capped", "key": "header:x-tenant", "window": "day",
                     "base": 100_000, "max_keys": 3}],
        "admin": {"path": ADMIN_PATH, "token": ADMIN_TOKEN}
    });
    let s = Stack::start(&config.to_string());
    away_from_window_end(DAY, 120);
    let tenants = ["t1", "t2", "t3", "t4", "t5"];
    // Each settles before the next is sent: the first three take the three slots.
    for (tenant, key, used_after) in [
        ("t1", "t1", 18),
        ("t2", "t2", 18),
        ("t3", "t3", 18),
        ("t4", "_overflow", 18),
        ("t5", "_overflow", 36),
    ] {
        let r = chat(&s, &[("x-tenant", tenant)], &hello(10));
        assert_eq!(r.status, 200, "{tenant}: {}", r.text());
        wait_used(&s, key, "capped", used_after);
    }
    for tenant in &tenants[..3] {
        let view = ledger(&s, tenant, "capped");
        assert_eq!(
            (view["tracked"].as_bool(), used(&view)),
            (Some(true), 18),
            "{tenant}"
        );
    }
    for tenant in &tenants[3..] {
        let view = ledger(&s, tenant, "capped");
        assert_eq!(
            (view["tracked"].as_bool(), used(&view)),
            (Some(false), 0),
            "{tenant}"
        );
    }
    let overflow = ledger(&s, "_overflow", "capped");
    assert_eq!(overflow["tracked"], true);
    assert_eq!(used(&overflow), 36, "t4 and t5 share the overflow key");
    assert_eq!(
        counter_sum(
            &s.envoy,
            &["tokenfuse_keys_overflowed.", "budget=.=capped;"],
            2
        ),
        2
    );
    // A tracked key keeps its own account.
    assert_eq!(chat(&s, &[("x-tenant", "t1")], &hello(10)).status, 200);
    wait_used(&s, "t1", "capped", 36);
    assert_eq!(used(&ledger(&s, "_overflow", "capped")), 36);
    // Nor can a top-up create a fourth key.
    let auth = admin_auth();
    let topup = json!({"budget": "capped", "key": "t6", "amount": 500}).to_string();
    let r = s
        .envoy
        .post_json(
            &format!("{ADMIN_PATH}/topup"),
            &[("authorization", &auth)],
            &topup,
        )
        .unwrap();
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(ledger(&s, "t6", "capped")["tracked"], false);
}
