//! The one place that answers a client: every refusal the filter makes, and every admin
//! answer, is written here, in the shape of the API the client speaks.
//!
//! A refusal is a [`Refusal`] — why the request is not forwarded — turned into a status, an
//! error body and headers by [`refuse`]. OpenAI-compatible APIs get OpenAI's error object
//! (`{"error":{"message","type","param","code"}}`) and its rate-limit headers
//! (`x-ratelimit-*-tokens`); Anthropic's Messages API gets Anthropic's
//! (`{"type":"error","error":{"type","message"}}`, `anthropic-ratelimit-tokens-*`), so each
//! SDK raises its own exception class (a 429 is `RateLimitError` in both). Both carry
//! `retry-after`, `x-should-retry: false` when waiting cannot help, the filter's own
//! `x-tokenfuse-error` code, and — when the request was counted — its prompt count in
//! `x-tokenfuse-prompt-tokens`, so a refused client still learns what its request cost.
//!
//! [`Decision`] names what became of a request in the `tokenfuse_decisions` counter.

use crate::budget::plan::Rejection;
use crate::budget::window::{go_duration, rfc3339};
use crate::budget::Unit;
use crate::global::rls::DescriptorStatus;
use crate::host::Host;
use crate::llm::api::{ApiKind, RequestError};

/// Response header carrying the filter's prompt count.
pub const PROMPT_TOKENS_HEADER: &str = "x-tokenfuse-prompt-tokens";
/// Response header naming budgets at or past their warning threshold.
pub const WARNING_HEADER: &str = "x-tokenfuse-budget-warning";
/// Response header naming the model a rerouted request was served by.
pub const REROUTED_HEADER: &str = "x-tokenfuse-rerouted-to";
/// OpenAI's rate-limit headers for tokens: limit, remaining, time to reset.
pub const RATE_LIMIT_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];
/// Anthropic's, the reset as an RFC 3339 time.
const ANTHROPIC_RATE_LIMIT_HEADERS: [&str; 3] = [
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
];

/// What became of a request: the `decision` tag of `tokenfuse_decisions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forwarded as asked.
    Allowed,
    /// Forwarded, with a budget past its warning threshold.
    Warned,
    /// Rerouted by progressive degradation.
    Degraded,
    /// Rerouted because a budget tripped.
    Rerouted,
    /// Shortened to fit a per-request cap (counted besides the final decision).
    Truncated,
    /// Refused: a budget is spent (429).
    Rejected,
    /// Refused: over a per-request cap (400).
    Oversize,
    /// Refused: a budget store or service could not answer (503).
    Unavailable,
    /// Refused: the body could not be edited (500).
    Unrewritable,
    /// Answered from the response cache (charged nothing).
    CacheHit,
    /// Answered with the answer of an identical request in flight (charged nothing).
    Coalesced,
}

impl Decision {
    /// The stat tag.
    pub fn tag(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Warned => "warned",
            Decision::Degraded => "degraded",
            Decision::Rerouted => "rerouted",
            Decision::Truncated => "truncated",
            Decision::Rejected => "rejected",
            Decision::Oversize => "oversize",
            Decision::Unavailable => "unavailable",
            Decision::Unrewritable => "unrewritable",
            Decision::CacheHit => "cache_hit",
            Decision::Coalesced => "coalesced",
        }
    }
}

/// Why a request is answered by the filter instead of the upstream.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// The body cannot be read (400; 415 when content-encoded).
    Unreadable(RequestError),
    /// Prompt plus maximum output is over a budget's per-request cap (400).
    Oversize {
        budget: String,
        cap: u64,
        estimate: u64,
    },
    /// A local budget is spent for this request (429).
    Budget(Rejection),
    /// The rate limit service says a global budget is spent (429).
    GlobalBudget {
        budget: String,
        unit: Unit,
        needed: u64,
        status: Option<DescriptorStatus>,
    },
    /// Shared data could not be updated and the failure mode is closed (503).
    StoreBusy,
    /// The rate limit service gave no verdict and the failure mode is closed (503).
    ServiceUnavailable,
    /// A body edit failed on a body the reader admitted (500).
    Unrewritable,
}

impl Refusal {
    /// The decision this refusal counts as.
    pub fn decision(&self) -> Decision {
        match self {
            Refusal::Unreadable(_) => Decision::Rejected,
            Refusal::Oversize { .. } => Decision::Oversize,
            Refusal::Budget(_) | Refusal::GlobalBudget { .. } => Decision::Rejected,
            Refusal::StoreBusy | Refusal::ServiceUnavailable => Decision::Unavailable,
            Refusal::Unrewritable => Decision::Unrewritable,
        }
    }
}

/// Where a refused request stood: which API it spoke and what it was counted at.
#[derive(Clone, Copy, Debug)]
pub struct Asked {
    pub api: ApiKind,
    /// The prompt count, once the body was read.
    pub prompt_tokens: Option<u64>,
    /// Wall-clock time, Unix milliseconds (Anthropic's reset header is a time).
    pub now_ms: i64,
    /// A reset further away than this makes `x-should-retry: false`.
    pub should_retry_max_secs: u64,
}

/// The error a refusal is answered with, before it is shaped for the API.
struct Error {
    status: u32,
    message: String,
    /// OpenAI's `error.type`.
    kind: &'static str,
    code: &'static str,
    retry_after_secs: Option<u64>,
    /// `(limit, remaining, reset in ms)` of the token budget the refusal is about.
    rate: Option<(u64, u64, u64)>,
    no_retry: bool,
    budget: Option<String>,
}

/// Answer a refused request.
pub fn refuse(host: &mut dyn Host, asked: &Asked, refusal: &Refusal) {
    let e = error(asked, refusal);
    let retry_after = e.retry_after_secs.map(|s| s.to_string());
    let prompt = asked.prompt_tokens.map(|t| t.to_string());
    let anthropic = asked.api == ApiKind::AnthropicMessages;
    let rate_values = e.rate.map(|(limit, remaining, reset_ms)| {
        let reset = if anthropic {
            let at = asked
                .now_ms
                .saturating_add(i64::try_from(reset_ms).unwrap_or(i64::MAX));
            rfc3339(at.div_euclid(1000))
        } else {
            go_duration(reset_ms)
        };
        [limit.to_string(), remaining.to_string(), reset]
    });
    let mut headers: Vec<(&str, &str)> = vec![
        ("content-type", "application/json"),
        ("x-tokenfuse-error", e.code),
    ];
    if let Some(p) = &prompt {
        headers.push((PROMPT_TOKENS_HEADER, p));
    }
    if let Some(r) = &retry_after {
        headers.push(("retry-after", r));
    }
    if let Some(values) = &rate_values {
        let names = if anthropic {
            ANTHROPIC_RATE_LIMIT_HEADERS
        } else {
            RATE_LIMIT_HEADERS
        };
        for (name, value) in names.iter().zip(values) {
            headers.push((name, value));
        }
    }
    if e.no_retry {
        headers.push(("x-should-retry", "false"));
    }
    if let Some(b) = &e.budget {
        headers.push(("x-tokenfuse-budget", b));
    }
    let body = if anthropic {
        let kind = match e.status {
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        };
        serde_json::json!({"type": "error", "error": {"type": kind, "message": e.message}})
            .to_string()
    } else {
        // Written by hand to keep OpenAI's field order (serde_json's map sorts the keys).
        let quote = |s: &str| serde_json::Value::from(s).to_string();
        format!(
            r#"{{"error":{{"message":{},"type":{},"param":null,"code":{}}}}}"#,
            quote(&e.message),
            quote(e.kind),
            quote(e.code)
        )
    };
    host.send_reply(e.status, &headers, body.as_bytes());
}

fn unit_name(unit: Unit) -> &'static str {
    match unit {
        Unit::Tokens => "tokens",
        Unit::Usd => "micro-USD",
    }
}

fn error(asked: &Asked, refusal: &Refusal) -> Error {
    let plain = |status, message: String, kind, code| Error {
        status,
        message,
        kind,
        code,
        retry_after_secs: None,
        rate: None,
        no_retry: false,
        budget: None,
    };
    match refusal {
        Refusal::Unreadable(e) => {
            // A compressed body is well-formed but unreadable here: 415, not 400.
            let status = if *e == RequestError::Encoded { 415 } else { 400 };
            plain(
                status,
                format!("tokenfuse: {e}"),
                "invalid_request_error",
                unreadable_code(e),
            )
        }
        Refusal::Oversize {
            budget,
            cap,
            estimate,
        } => plain(
            400,
            format!(
                "tokenfuse: this request needs {estimate} tokens (prompt plus maximum output), over the {cap}-token per-request limit of budget '{budget}'; shorten the conversation or lower max_tokens"
            ),
            "invalid_request_error",
            "request_tokens_exceeded",
        ),
        Refusal::Budget(r) => budget_error(asked, r),
        Refusal::GlobalBudget {
            budget,
            unit,
            needed,
            status,
        } => {
            let hopeless = *needed > u64::from(u32::MAX);
            // Without a reset from the service, a minute is a polite guess.
            let retry_after_secs = status.and_then(|s| s.reset_secs).unwrap_or(60).max(1);
            let unit_name = unit_name(*unit);
            let message = if hopeless {
                format!(
                    "tokenfuse: this request needs {needed} {unit_name}, more than global budget '{budget}' can ever grant; lower max_tokens or shorten the prompt"
                )
            } else {
                format!(
                    "tokenfuse: global budget '{budget}' is spent for this key: this request needs {needed} {unit_name}; retry in {retry_after_secs}s"
                )
            };
            let rate = status
                .filter(|_| *unit == Unit::Tokens)
                .and_then(|s| {
                    Some((
                        u64::from(s.limit?),
                        u64::from(s.remaining),
                        retry_after_secs.saturating_mul(1000),
                    ))
                });
            Error {
                status: 429,
                message,
                kind: unit.tag(),
                code: "rate_limit_exceeded",
                retry_after_secs: Some(retry_after_secs),
                rate,
                no_retry: hopeless || retry_after_secs > asked.should_retry_max_secs,
                budget: Some(budget.clone()),
            }
        }
        Refusal::StoreBusy => plain(
            503,
            "tokenfuse: budget store is busy; retry".into(),
            "server_error",
            "budget_store_unavailable",
        ),
        Refusal::ServiceUnavailable => Error {
            retry_after_secs: Some(1),
            ..plain(
                503,
                "tokenfuse: the budget service did not answer; retry".into(),
                "server_error",
                "budget_service_unavailable",
            )
        },
        Refusal::Unrewritable => plain(
            500,
            "tokenfuse: the request could not be prepared for the upstream; it was not sent"
                .into(),
            "server_error",
            "request_rewrite_failed",
        ),
    }
}

/// A local budget's 429: why, in words a client can act on.
fn budget_error(asked: &Asked, r: &Rejection) -> Error {
    let reset = go_duration(r.reset_ms);
    let unit = unit_name(r.unit);
    // This window's limit stands in for the next one's (base, burst and elastic as they
    // are now): a request above it cannot pass by waiting.
    let hopeless = r.hopeless(r.limit);
    let share = (r.ceiling * 100.0).round();
    let message = if r.no_cheaper_model && r.remaining == 0 {
        format!(
            "tokenfuse: budget '{}' is spent and this model has no cheaper alternative; it resets in {reset}",
            r.budget
        )
    } else if r.no_cheaper_model {
        format!(
            "tokenfuse: this request needs {} {unit}, more than the {} of {} left in budget '{}', and this model has no cheaper alternative; lower max_tokens or wait: it resets in {reset}",
            r.needed, r.remaining, r.limit, r.budget
        )
    } else if hopeless {
        format!(
            "tokenfuse: this request needs {} {unit}, more than priority {} may use of budget '{}' ({share}% of {}); lower max_tokens or shorten the prompt",
            r.needed, r.priority.tag(), r.budget, r.limit
        )
    } else if r.needed <= r.remaining {
        format!(
            "tokenfuse: budget '{}' keeps its last {}% for higher priorities; this priority-{} request needs {} {unit} and {} of {} are left; it resets in {reset}",
            r.budget, 100.0 - share, r.priority.tag(), r.needed, r.remaining, r.limit
        )
    } else if r.remaining == 0 {
        format!(
            "tokenfuse: budget '{}' is spent for this key: this request needs {} {unit} and none of {} is left; it resets in {reset}",
            r.budget, r.needed, r.limit
        )
    } else {
        format!(
            "tokenfuse: this request needs {} {unit}, more than the {} of {} left in budget '{}'; lower max_tokens or shorten the prompt, or wait: it resets in {reset}",
            r.needed, r.remaining, r.limit, r.budget
        )
    };
    Error {
        status: 429,
        message,
        kind: r.unit.tag(),
        code: "rate_limit_exceeded",
        retry_after_secs: Some(r.retry_after_secs),
        rate: (r.unit == Unit::Tokens).then_some((r.limit, r.remaining, r.reset_ms)),
        no_retry: hopeless || r.retry_after_secs > asked.should_retry_max_secs,
        budget: Some(r.budget.clone()),
    }
}

/// The `code` of an unreadable request's error.
fn unreadable_code(e: &RequestError) -> &'static str {
    match e {
        RequestError::Empty => "empty_body",
        RequestError::Syntax { .. } => "invalid_json",
        RequestError::Shape { .. } => "invalid_request_shape",
        RequestError::Invalid { .. } => "invalid_value",
        RequestError::Encoded => "unsupported_content_encoding",
    }
}

/// The `reason` tag of an unreadable request's parse failure.
pub fn unreadable_reason(e: &RequestError) -> &'static str {
    match e {
        RequestError::Empty => "empty",
        RequestError::Syntax { .. } => "json",
        RequestError::Shape { .. } => "shape",
        RequestError::Invalid { .. } => "invalid",
        RequestError::Encoded => "encoded",
    }
}

/// Answer an admin request with a JSON document.
pub fn json(host: &mut dyn Host, status: u32, body: &serde_json::Value) {
    host.send_reply(
        status,
        &[
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ],
        body.to_string().as_bytes(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Priority;
    use crate::host::fake::FakeHost;

    fn rejection(remaining: u64, needed: u64) -> Rejection {
        Rejection {
            budget: "usd".into(),
            unit: Unit::Usd,
            limit: 500,
            remaining,
            reset_ms: 15 * 3_600_000,
            retry_after_secs: 15 * 3600,
            no_cheaper_model: false,
            needed,
            ceiling: 1.0,
            priority: Priority::P1,
        }
    }

    fn asked(api: ApiKind) -> Asked {
        Asked {
            api,
            prompt_tokens: Some(9),
            now_ms: 1_800_000_000_000,
            should_retry_max_secs: 60,
        }
    }

    fn reply(api: ApiKind, refusal: &Refusal) -> crate::host::fake::Reply {
        let mut h = FakeHost::default();
        refuse(&mut h, &asked(api), refusal);
        h.reply.unwrap()
    }

    #[test]
    fn a_request_larger_than_what_is_left_is_not_told_the_budget_is_spent() {
        // Found by a newcomer: 486 of 500 µ$ left answered "is spent … resets in 15h".
        let r = reply(
            ApiKind::ChatCompletions,
            &Refusal::Budget(rejection(486, 490)),
        );
        let text = String::from_utf8(r.body).unwrap();
        assert!(!text.contains("is spent"), "{text}");
        assert!(text.contains("486 of 500 left"), "{text}");
        let r = reply(ApiKind::ChatCompletions, &Refusal::Budget(rejection(0, 10)));
        assert!(String::from_utf8(r.body).unwrap().contains("is spent"));
    }

    #[test]
    fn anthropic_clients_get_anthropic_errors_and_headers() {
        let mut tokens = rejection(0, 10);
        tokens.unit = Unit::Tokens;
        let r = reply(ApiKind::AnthropicMessages, &Refusal::Budget(tokens));
        assert_eq!(r.status, 429);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("is spent"));
        assert_eq!(r.header("anthropic-ratelimit-tokens-limit"), Some("500"));
        assert_eq!(r.header("anthropic-ratelimit-tokens-remaining"), Some("0"));
        // 2027-01-15T08:00:00Z plus 15 h.
        assert_eq!(
            r.header("anthropic-ratelimit-tokens-reset"),
            Some("2027-01-15T23:00:00Z")
        );
        assert_eq!(r.header("retry-after"), Some("54000"));
        assert_eq!(r.header("x-ratelimit-limit-tokens"), None);
        let r = reply(
            ApiKind::AnthropicMessages,
            &Refusal::Unreadable(RequestError::Empty),
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (r.status, &v["error"]["type"]),
            (400, &"invalid_request_error".into())
        );
    }

    #[test]
    fn refusals_of_counted_requests_carry_the_prompt_count() {
        let r = reply(ApiKind::ChatCompletions, &Refusal::StoreBusy);
        assert_eq!(r.header(PROMPT_TOKENS_HEADER), Some("9"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "budget_store_unavailable");
        let body = String::from_utf8(r.body).unwrap();
        assert!(
            body.starts_with(r#"{"error":{"message":"#),
            "OpenAI's field order"
        );
    }
}
