//! rls-engine: the rate limit service tokenfuse's integration tests run against — the
//! real Limitador counter library (the `limitador` crate 0.14.0 as published on crates.io)
//! with its Redis storage, served by a thin adapter that does what limitador-server's gRPC
//! port does: Envoy's `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` ([`rls`])
//! and Limitador's own `kuadrant.service.ratelimit.v1.RateLimitService/Reserve` and
//! `/Commit` ([`reserve`]). Every count, check, hold and release is the library's.
//!
//! The crate's `redis_storage` feature alone does not compile in 0.14.0 (nor 0.13.0):
//! `src/storage/keys.rs` uses its `bin` key encoding, declared only under `disk_storage`.
//! So the default features stay on, and RocksDB (which the engine never opens) is linked
//! from the system (Debian `librocksdb-dev`, through librocksdb-sys' `ROCKSDB_LIB_DIR`,
//! which the Makefile sets) rather than compiled from its C++ sources.
//!
//! # What is mirrored from limitador-server
//!
//! Read from Kuadrant/limitador `limitador-server/src/envoy_rls/server.rs`
//! (`MyRateLimiter::should_rate_limit`), `limitador-server/src/main.rs`
//! (`Limiter::load_limits_from_file`, the Redis storage setup) and the `limitador` 0.14.0
//! sources:
//!
//! - **domain → namespace.** An empty domain is answered `overall_code: UNKNOWN` without
//!   touching a counter ([`rls`]); a domain with no limits (unknown namespace) is `OK`.
//! - **descriptors → context.** Each descriptor becomes a map entry key → value (a
//!   repeated key keeps its last value); the list of maps is bound to CEL as
//!   `descriptors`, so limits say `descriptors[0].budget == '…'`. Descriptor `limit`
//!   overrides are ignored.
//! - **hits_addend** 0 (unset) is 1; otherwise it is added as is.
//! - **check_rate_limited_and_update**, all or nothing: every counter of every limit that
//!   applies is checked against `hits_addend`; if any would pass its `max_value` the
//!   answer is `OVER_LIMIT` and *no* counter moves, otherwise all move by `hits_addend`
//!   and the answer is `OK`.
//! - **the response** carries only `overall_code`: `statuses` stays empty (no
//!   per-descriptor verdicts), and the draft-03 `X-RateLimit-*` response headers are added
//!   only with `--rate-limit-headers DRAFT_VERSION_03` (limitador-server's flag, default
//!   `NONE`).
//! - **storage errors** (Redis unreachable) are the gRPC status `UNAVAILABLE`, so the
//!   proxy's failure mode applies.
//! - **limits file**: limitador-server's YAML, read with `serde_yaml` into
//!   `Vec<Limit>` and applied with `configure_with` ([`limits`]).
//! - **storage**: `AsyncRedisStorage`, which limitador-server uses for `redis URL`
//!   (not `redis_cached`). Every check reads Redis and every charge is an `INCRBY` there,
//!   so two engines (or two Limitadors) on one Redis see each other's charges at once and
//!   a restart loses nothing. The cached variant counts locally and flushes to Redis
//!   every second, so another instance would see charges up to a flush late.
//!   A counter's window is a Redis TTL of `seconds`, started by its first charge (not a
//!   calendar window).
//!
//! # Where it differs
//!
//! - The limitador-server `server.rs` read for this (commit a5ac755b) calls the
//!   `check_rate_limited_and_update` of limitador ≤ 0.13, with a fourth `load_counters`
//!   flag (set when headers are on); 0.14's has no flag and always loads the counters.
//!   Same verdicts and counting.
//! - Not here: the HTTP API, Prometheus metrics, tracing, the `kuadrant` RLS v1 service's
//!   `CheckRateLimit` and `Report`, gRPC reflection, reloading the limits file when it
//!   changes.
//! - `Reserve` and `Commit` follow `kuadrant_service.rs` of PR #515 as merged, written
//!   against the published 0.14.0 library (`reserve(…, ttl: Option<Duration>)`); the
//!   server's `--max-reservation-ttl` / `--max-reservation-fraction` are the engine's
//!   flags of the same names (Limitador's `ReservationLimits`).
//! - The storage error's message names the cause (`Service unavailable: …`) where
//!   limitador-server says only `Service unavailable`; the code is the same. A call that has
//!   not been answered within [`CALL_TIMEOUT`] is that error too (with Redis gone
//!   the Redis client can wait on its reconnection indefinitely).
//!
//! # Limitador behaviours to know (kept, not fixed)
//!
//! - `ShouldRateLimit`'s check then charge are two Redis round trips, not one script:
//!   concurrent calls on one counter can each pass the check and together overshoot by up
//!   to one `hits_addend` per racing caller. Serial calls, from any number of engines, are
//!   exact. `Reserve` checks and holds in one Lua script: no overshoot.
//! - Holds are invisible to `ShouldRateLimit` (it checks the counter alone): a budget's
//!   counters should be spoken to over one protocol, not both.
//! - A hold nobody commits lasts until its ttl (at most `--max-reservation-ttl`); a commit
//!   always charges its `actual_amount`, so committing twice charges twice.
//! - A condition indexing past the request's last descriptor panics inside limitador
//!   (`Limit::applies` unwraps the evaluation error); the call's stream breaks and the
//!   engine keeps serving. Guard with `size(descriptors) > N && …`.
//! - CEL macros (`exists`, `filter`, `map`, …) in conditions or variables make a limit
//!   silently never apply: limitador takes the macro's loop variable for a binding the
//!   request lacks.

pub mod client;
pub mod limits;
pub mod proto;
pub mod reserve;
pub mod rls;
pub mod service;

/// The longest the engine works on one call (Limitador's storage included).
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A call's answer, or `UNAVAILABLE` after [`CALL_TIMEOUT`]: with Redis gone, the Redis
/// client can wait on its reconnection far longer than any caller would, and a caller
/// (Envoy's gRPC timeout, a test) must get an answer.
pub async fn in_time<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(tonic::Status::unavailable(format!(
            "Service unavailable: no answer from the storage within {CALL_TIMEOUT:?}"
        ))),
    }
}
