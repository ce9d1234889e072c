//! tokenfuse: token budgets for LLM traffic, enforced inside Envoy.
//!
//! A proxy-wasm HTTP filter. [`proxy`] is the only module that talks to Envoy; everything
//! else is plain Rust, tested natively against a fake host ([`host`]):
//!
//! - [`exchange`]: one HTTP stream through the filter, phase by phase — the request is read
//!   and counted, admitted (or refused, through the one reply path), its response metered,
//!   and the exchange settled (the one refund path);
//! - [`llm`]: the APIs' request and response shapes: reading, counting rules, streams,
//!   usage, body edits;
//! - [`tokenizer`]: the encodings (tiktoken's, token for token) and the count cache;
//! - [`budget`]: budgets and their arithmetic, windows, prices, identities, the ledger in
//!   shared data, planning and settling reservations;
//! - [`global`]: budgets kept by a rate limit service across proxies;
//! - [`cache`]: paying once — the response cache and the coalescing of identical requests;
//! - [`config`]: the plugin configuration, checked at load; [`filter`]: the per-VM state;
//!   [`stats`]: metric names and tags.

// Every byte the filter reads — headers, paths, bodies, upstream answers, shared data — may
// be hostile, and a panic in a VM is an outage for every request on its worker: outside
// tests, no indexing or slicing that can panic, no slicing of a str at a byte offset, no
// unchecked arithmetic. Each exception is a narrow `allow` with the invariant that makes it
// safe written beside it.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::string_slice,
        clippy::arithmetic_side_effects
    )
)]

pub mod budget;
pub mod cache;
pub mod config;
pub mod exchange;
pub mod filter;
pub mod global;
pub mod host;
pub mod llm;
pub mod proxy;
pub mod stats;
pub mod tokenizer;
