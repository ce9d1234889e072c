//! tokenfuse: token budgets for LLM traffic, enforced inside Envoy.
//!
//! This file is the proxy-wasm glue and nothing else: a root context per VM that turns the
//! plugin configuration into a [`filter::Filter`] (or refuses it), and an HTTP context per
//! stream that forwards each callback to an [`exchange::Exchange`] through the
//! [`wasm_host::WasmHost`] adapter. Every decision lives in the host-independent modules
//! below, which are tested natively against a fake host.

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

pub mod admin;
pub mod api;
mod api_read;
pub mod bpe;
pub mod budget;
pub mod config;
pub mod count_cache;
pub mod enforce;
pub mod exchange;
pub mod filter;
pub mod global;
pub mod host;
pub mod identity;
pub mod json;
pub mod ledger;
pub mod price;
pub mod prompt;
pub mod rewrite;
pub mod rls;
#[cfg(any(test, feature = "testkit"))]
pub mod scenario;
pub mod sse;
pub mod stats;
pub mod tokens;
pub mod truncate;
pub mod usage;
pub mod window;

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod wasm_host;

/// Per-callback time inside the VM, logged every 5,000 requests per VM, when built with
/// `--features timing` (profiling the per-request cost; off in normal builds).
#[cfg(target_arch = "wasm32")]
mod timing {
    #[cfg(feature = "timing")]
    mod on {
        use std::cell::RefCell;

        use proxy_wasm::types::LogLevel;

        use crate::abi;

        const NAMES: [&str; 5] = [
            "request_headers",
            "request_body",
            "response_headers",
            "response_body",
            "done",
        ];

        thread_local! {
            static TOTALS: RefCell<([u64; 5], [u64; 5])> = const { RefCell::new(([0; 5], [0; 5])) };
        }

        fn now_ns() -> u64 {
            abi::now_ns().unwrap_or(0)
        }

        pub fn timed<T>(slot: usize, f: impl FnOnce() -> T) -> T {
            let start = now_ns();
            let out = f();
            let took = now_ns().saturating_sub(start);
            TOTALS.with(|t| {
                let mut t = t.borrow_mut();
                t.0[slot] += took;
                t.1[slot] += 1;
                if slot == 4 && t.1[4] % 5000 == 0 {
                    let line: Vec<String> = (0..5)
                        .map(|i| {
                            format!(
                                "{} {} calls {:.1} us",
                                NAMES[i],
                                t.1[i],
                                t.0[i] as f64 / t.1[i].max(1) as f64 / 1000.0
                            )
                        })
                        .collect();
                    let per_request: u64 = t.0.iter().sum::<u64>() / t.1[4].max(1);
                    abi::log(
                        LogLevel::Info,
                        &format!(
                            "timing: {} | per request {:.1} us",
                            line.join(", "),
                            per_request as f64 / 1000.0
                        ),
                    );
                    *t = ([0; 5], [0; 5]);
                }
            });
            out
        }
    }

    #[cfg(feature = "timing")]
    pub use on::timed;

    #[cfg(not(feature = "timing"))]
    #[inline(always)]
    pub fn timed<T>(_slot: usize, f: impl FnOnce() -> T) -> T {
        f()
    }
}

/// A panic on demand, in builds with `--features fault-injection` only (never in the
/// shipped module): `x-tokenfuse-fault: panic` fails the VM, so the tests can measure what
/// Envoy's failure policy does afterwards (tests/envoy_failure.rs).
#[cfg(all(target_arch = "wasm32", feature = "fault-injection"))]
mod fault {
    use proxy_wasm::types::MapType;

    pub fn on_request_headers() {
        let asked = crate::abi::header(MapType::HttpRequestHeaders, "x-tokenfuse-fault");
        if asked.as_deref() == Some(b"panic".as_slice()) {
            // The point of this build: fail the VM the way a bug would.
            #[allow(clippy::panic)]
            {
                panic!(
                    "fault injected with x-tokenfuse-fault: panic (this text must not be logged)"
                );
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod glue {
    use std::rc::Rc;

    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

    use super::timing;
    use crate::config::Config;
    use crate::exchange::{self, Exchange};
    use crate::filter::Filter;
    use crate::host::{Host, Level};
    use crate::wasm_host::{self, WasmHost};

    /// How often batched stats reach Envoy (the most a stat lags behind its request).
    const STATS_FLUSH_MS: u64 = 500;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Trace);
        // Replaces the SDK's hook (set just above), which logs the panic message: messages
        // can quote what they panicked on — a header, a credential — and logs must not.
        std::panic::set_hook(Box::new(|info| {
            let at = info.location().map_or_else(
                || "an unknown location".to_string(),
                |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
            );
            crate::abi::log(
                LogLevel::Critical,
                &format!("tokenfuse panicked at {at}; the message is withheld (it may quote request data)"),
            );
        }));
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(TokenfuseRoot { filter: None })
        });
    }}

    /// Per-VM root: owns the configured filter.
    struct TokenfuseRoot {
        filter: Option<Rc<Filter>>,
    }

    impl Context for TokenfuseRoot {
        fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
            let Some(filter) = &self.filter else {
                return;
            };
            let body = if status_code == 0 {
                WasmHost.grpc_response_body(response_size)
            } else {
                None
            };
            filter.settlements.borrow_mut().on_response(
                &mut WasmHost,
                &filter.config,
                token_id,
                status_code,
                body.as_deref(),
            );
        }
    }

    impl RootContext for TokenfuseRoot {
        fn on_configure(&mut self, size: usize) -> bool {
            let document =
                crate::abi::buffer(BufferType::PluginConfiguration, 0, size).unwrap_or_default();
            let config = match Config::parse(&document) {
                Ok(c) => c,
                Err(e) => {
                    WasmHost.log(Level::Error, &format!("{e}; the plugin is not started"));
                    return false;
                }
            };
            let started = WasmHost.now_ms();
            let encodings: Vec<String> = config.encodings().iter().map(|e| e.to_string()).collect();
            match Filter::new(config) {
                Ok(filter) => {
                    WasmHost.log(
                        Level::Info,
                        &format!(
                            "configured; tokenizers [{}] built in {} ms",
                            encodings.join(", "),
                            WasmHost.now_ms().saturating_sub(started)
                        ),
                    );
                    // The tick hands batched stats to Envoy, and sends global-budget
                    // settlements (calls that must outlive the requests that owe them).
                    let tick_ms = filter
                        .config
                        .rate_limit_service
                        .as_ref()
                        .map_or(STATS_FLUSH_MS, |s| s.flush_interval_ms.min(STATS_FLUSH_MS));
                    crate::abi::set_tick_period(u32::try_from(tick_ms).unwrap_or(u32::MAX));
                    self.filter = Some(Rc::new(filter));
                    true
                }
                Err(e) => {
                    WasmHost.log(Level::Error, &format!("{e}; the plugin is not started"));
                    false
                }
            }
        }

        fn on_tick(&mut self) {
            if let Some(filter) = &self.filter {
                let mut queue = filter.settlements.borrow_mut();
                if !queue.is_empty() {
                    queue.flush(&mut WasmHost, &filter.config);
                }
                filter.report_count_cache(&mut WasmHost);
            }
            wasm_host::flush_metrics();
        }

        fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
            let filter = self.filter.clone()?;
            Some(Box::new(TokenfuseHttp {
                exchange: Exchange::new(filter, context_id),
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// Per-stream context: forwards every callback to the exchange.
    struct TokenfuseHttp {
        exchange: Exchange,
    }

    fn action(a: exchange::Action) -> Action {
        match a {
            exchange::Action::Continue => Action::Continue,
            exchange::Action::Pause => Action::Pause,
        }
    }

    impl Context for TokenfuseHttp {
        fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
            wasm_host::begin_callback();
            self.exchange
                .on_grpc_response(&mut WasmHost, token_id, status_code, response_size);
        }

        fn on_done(&mut self) -> bool {
            self.exchange.on_done(&mut WasmHost);
            true
        }
    }

    impl HttpContext for TokenfuseHttp {
        fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            wasm_host::begin_callback();
            #[cfg(feature = "fault-injection")]
            crate::fault::on_request_headers();
            let exchange = &mut self.exchange;
            action(timing::timed(0, || {
                exchange.on_request_headers(&mut WasmHost, end_of_stream)
            }))
        }

        fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            wasm_host::begin_callback();
            let exchange = &mut self.exchange;
            action(timing::timed(1, || {
                exchange.on_request_body(&mut WasmHost, body_size, end_of_stream)
            }))
        }

        fn on_http_request_trailers(&mut self, _: usize) -> Action {
            wasm_host::begin_callback();
            action(self.exchange.on_request_trailers(&mut WasmHost))
        }

        fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            wasm_host::begin_callback();
            let exchange = &mut self.exchange;
            action(timing::timed(2, || {
                exchange.on_response_headers(&mut WasmHost, end_of_stream)
            }))
        }

        fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            wasm_host::begin_callback();
            let exchange = &mut self.exchange;
            action(timing::timed(3, || {
                exchange.on_response_body(&mut WasmHost, body_size, end_of_stream)
            }))
        }

        fn on_log(&mut self) {
            wasm_host::begin_callback();
            let exchange = &mut self.exchange;
            timing::timed(4, || exchange.on_done(&mut WasmHost));
        }
    }
}
