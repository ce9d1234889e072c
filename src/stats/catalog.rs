//! Every metric tokenfuse writes, by name (without the `tokenfuse_` prefix), with the tags
//! it carries, in the order they are written. Call sites name metrics only through these
//! constants, so a rename happens here or not at all; the alert rules, the dashboard and
//! the canary templates are checked against a real Envoy's scrape (`tests/observability.rs`).

// Requests and decisions.
/// LLM requests settled. Tags: `[tenant]`, api, model, cluster.
pub const REQUESTS: &str = "requests";
/// Admission decisions. Tags: `[tenant]`, decision, `[budget]`, priority.
pub const DECISIONS: &str = "decisions";
/// Requests the filter let through without counting. Tags: reason.
pub const PASSTHROUGH: &str = "passthrough";
/// Bodies or responses the filter could not read. Tags: stage, api, reason.
pub const PARSE_FAILURES: &str = "parse_failures";
/// Messages dropped to fit a per-request cap.
pub const TRUNCATED_MESSAGES: &str = "truncated_messages";

// Tokens and spend.
/// Tokens billed. Tags: `[tenant]`, kind (prompt/completion), source, model, cluster.
pub const TOKENS: &str = "tokens";
/// The filter's own prompt count. Tags: model, cluster.
pub const REQUEST_PROMPT_TOKENS: &str = "request_prompt_tokens";
/// Requests whose prompt count is an estimate. Tags: model, cluster.
pub const PROMPT_ESTIMATES: &str = "prompt_estimates";
/// Exchanges billed by the filter's count (no provider usage). Tags: model, cluster.
pub const USAGE_COUNTED: &str = "usage_counted";
/// Spend in micro-USD, for priced models. Tags: `[tenant]`, model, cluster.
pub const COST_MICRO_USD: &str = "cost_micro_usd";
/// Tokens billed per request, a histogram (p50/p95/p99 per request are one query away).
/// Tags: `[tenant]`, kind (prompt/completion), model.
pub const TOKENS_PER_REQUEST: &str = "tokens_per_request";
/// Requests an SDK marked as a retry (`x-stainless-retry-count` above 0): each is paid for
/// again. Tags: `[tenant]`, api.
pub const RETRIES: &str = "retries";

// Responses.
/// Requests whose client left before the response headers. Tags: model, cluster.
pub const NO_RESPONSE: &str = "no_response";
/// Upstream error answers. Tags: model, cluster, status (class, `5xx`).
pub const UPSTREAM_ERRORS: &str = "upstream_errors";
/// Responses cut before their end. Tags: model, cluster.
pub const RESPONSES_INCOMPLETE: &str = "responses_incomplete";

// Local budgets.
/// Amounts reserved. Tags: budget, unit.
pub const RESERVED: &str = "reserved";
/// Amounts given back at settlement.
pub const REFUNDED: &str = "refunded";
/// Amounts charged beyond the reservation at settlement.
pub const CHARGED_EXTRA: &str = "charged_extra";
/// Settlements (refunds included) that could not be written. Tags: budget.
pub const SETTLE_FAILURES: &str = "settle_failures";
/// Lost compare-and-swap races, retried.
pub const CAS_RETRIES: &str = "cas_retries";
/// Requests let through unreserved under `on_failure: open`. Tags: budget.
pub const FAIL_OPEN: &str = "fail_open";
/// Identities placed in a budget's overflow account. Tags: budget.
pub const KEYS_OVERFLOWED: &str = "keys_overflowed";
/// Budget gauges of a key. Tags: budget, tenant, unit.
pub const BUDGET_USED: &str = "budget_used";
/// See [`BUDGET_USED`].
pub const BUDGET_LIMIT: &str = "budget_limit";
/// See [`BUDGET_USED`].
pub const BUDGET_REMAINING: &str = "budget_remaining";
/// Seconds until the key's window resets (the forecast alert's horizon). See
/// [`BUDGET_USED`].
pub const BUDGET_RESET_SECONDS: &str = "budget_reset_seconds";
/// The key's base allowance per window (its `base_overrides` entry, if any). See
/// [`BUDGET_USED`].
pub const BUDGET_BASE: &str = "budget_base";
/// The budget's `max_request_tokens`, when it has one. See [`BUDGET_USED`].
pub const BUDGET_REQUEST_CAP: &str = "budget_request_cap";
/// What settled requests were charged to the key, a counter (its increase over a window
/// is the window's use: the sizing rules read it). Tags as [`BUDGET_USED`].
pub const BUDGET_CONSUMED: &str = "budget_consumed";
/// Requests settled for the key, a counter (the sizing rules want enough of them). Tags as
/// [`BUDGET_USED`].
pub const BUDGET_SETTLED: &str = "budget_settled";

// Global budgets.
/// Reservation calls without a verdict. Tags: budget, reason.
pub const GLOBAL_ERRORS: &str = "global_errors";
/// Hits the service keeps beyond the cost (it cannot give them back). Tags: budget.
pub const GLOBAL_UNRETURNED: &str = "global_unreturned";
/// Extra hits settled with the service. Tags: budget.
pub const GLOBAL_SETTLED: &str = "global_settled";
/// Settlement calls the service refused. Tags: budget.
pub const GLOBAL_SETTLE_REFUSED: &str = "global_settle_refused";
/// Settlement calls that failed. Tags: budget, reason.
pub const GLOBAL_SETTLE_ERRORS: &str = "global_settle_errors";
/// Settlement hits given up. Tags: budget, reason.
pub const GLOBAL_SETTLE_DROPPED: &str = "global_settle_dropped";
/// Reserved hits the service gave back on commit (`"protocol": "limitador"`). Tags: budget.
pub const GLOBAL_RETURNED: &str = "global_returned";
/// Commits whose reservation had already expired (it outlived `reservation_ttl_secs`).
/// Tags: budget.
pub const GLOBAL_RESERVATIONS_EXPIRED: &str = "global_reservations_expired";

// The response cache.
/// Cache lookups by result (`hit`, `miss`, `coalesced`, `refresh`, `waited_out`). Tags:
/// `[tenant]`, api, result.
pub const CACHE_LOOKUPS: &str = "cache_lookups";
/// Requests the cache does not consider, by reason (`api`, `model`, `route`,
/// `nondeterministic`, `no_store`, `unreadable`). Tags: api, reason.
pub const CACHE_BYPASSED: &str = "cache_bypassed";
/// Answers offered to the cache, by result (`stored`, `too_large`, `full`, `lost`,
/// `incomplete`, `unreadable`, `unsupported`). Tags: api, result.
pub const CACHE_STORES: &str = "cache_stores";
/// Answers removed before a new one could take their way (`evicted`) or once expired
/// (`expired`). Tags: reason.
pub const CACHE_EVICTIONS: &str = "cache_evictions";
/// Bytes of answers the cache holds (process-wide; each worker reports it).
pub const CACHE_BYTES: &str = "cache_bytes";
/// Tokens the cache saved (what the answers it served had cost). Tags: `[tenant]`, kind
/// (prompt/completion), model.
pub const CACHE_SAVED_TOKENS: &str = "cache_saved_tokens";
/// Spend the cache saved, micro-USD, for priced models. Tags: `[tenant]`, model.
pub const CACHE_SAVED_COST_MICRO_USD: &str = "cache_saved_cost_micro_usd";

// The count cache.
/// Long prompt texts counted, by where the count came from. Tags: source.
pub const COUNT_CACHE_TEXTS: &str = "count_cache_texts";
/// Their bytes. Tags: source.
pub const COUNT_CACHE_TEXT_BYTES: &str = "count_cache_text_bytes";
/// Bytes the count cache holds.
pub const COUNT_CACHE_BYTES: &str = "count_cache_bytes";
