//! Shared helpers for the integration tests in `tests/`: a real Envoy running the
//! built `tokenfuse.wasm` ([`envoy`]) on a bootstrap rendered from the shipped
//! `envoy/envoy.yaml` ([`envoy_config`]), a small HTTP/1.1 client ([`http`]), a
//! mock OpenAI-compatible upstream ([`mock_upstream`]), and for global budgets a real
//! `redis-server` ([`redis`]) with the rate-limit test engine on it ([`rls_engine`]).
//!
//! Each integration test crate includes this with `mod support;` and uses only
//! part of it, hence `dead_code` is allowed. Helpers panic with a message that
//! says what to do (they are test code: failing loudly is their job), hence the
//! crate's clippy bans on `panic`/`unwrap`/`expect` are lifted here.
#![allow(dead_code, clippy::panic, clippy::unwrap_used, clippy::expect_used)]

pub mod envoy;
pub mod envoy_config;
pub mod http;
pub mod mock_upstream;
pub mod redis;
pub mod rls_engine;
pub mod stack;
