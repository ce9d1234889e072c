//! The proxy-wasm side: the only code that imports `proxy_wasm`.
//!
//! A root context per VM turns the plugin configuration into a [`crate::filter::Filter`]
//! (or refuses it); an HTTP context per stream forwards each callback to an
//! [`crate::exchange::Exchange`] through [`host::WasmHost`], the [`crate::host::Host`] over
//! Envoy's host calls ([`abi`]: the raw ABI, so no host status can panic the VM).
//! [`headers`] is the ABI's header-map wire format, host-independent and tested natively.
//! Everything that decides lives outside this module and is tested against a fake host.

pub mod headers;

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod host;

/// Per-callback time inside the VM, logged every 5,000 requests per VM, when built with
/// `--features timing` (profiling the per-request cost; off in normal builds).
#[cfg(target_arch = "wasm32")]
mod timing {
    #[cfg(feature = "timing")]
    // A profiling build only: `slot` is one of the callbacks' literal 0..=4, and the
    // totals are nanoseconds and call counts of one VM's run.
    #[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    mod on {
        use std::cell::RefCell;

        use proxy_wasm::types::LogLevel;

        use crate::proxy::abi;

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
        let asked = crate::proxy::abi::header(MapType::HttpRequestHeaders, "x-tokenfuse-fault");
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
mod contexts {
    use std::cell::{Cell, RefCell};
    use std::rc::{Rc, Weak};

    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

    use super::timing;
    use crate::config::Config;
    use crate::exchange::{self, Exchange};
    use crate::filter::Filter;
    use crate::host::{Host, Level};
    use crate::proxy::host::{flush_metrics, WasmHost};

    /// How often batched stats reach Envoy (the most a stat lags behind its request).
    const STATS_FLUSH_MS: u64 = 500;
    /// Most known budget keys whose gauges one tick refreshes (one shared-data read each);
    /// ticks refresh at most once a second, so a worker reads at most this many a second.
    const GAUGE_REFRESH_PER_TICK: usize = 64;
    /// Cache sets one tick sweeps for expired answers (ticks sweep at most once a second).
    const CACHE_SWEEP_PER_TICK: u32 = 64;
    /// The tick period while requests wait for identical ones in flight: how late, at
    /// most, a waiting request learns that the answer is there.
    const WAKE_TICK_MS: u32 = 20;

    thread_local! {
        /// Requests of this VM waiting for an identical one in flight, by context id.
        static WAITERS: RefCell<Vec<(u32, Weak<RefCell<Exchange>>)>> = const { RefCell::new(Vec::new()) };
    }

    /// Register `exchange` (context `id`) as waiting, and tick fast until none waits.
    fn wait(id: u32, exchange: &Rc<RefCell<Exchange>>) {
        WAITERS.with(|w| {
            let mut w = w.borrow_mut();
            if w.is_empty() {
                crate::proxy::abi::set_tick_period(WAKE_TICK_MS);
            }
            w.push((id, Rc::downgrade(exchange)));
        });
    }

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Trace);
        // Replaces the SDK's hook (set just above), which logs the panic message: messages
        // can quote what they panicked on — a header, a credential — and logs must not.
        std::panic::set_hook(Box::new(|info| {
            let at = info.location().map_or_else(
                || "an unknown location".to_string(),
                |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
            );
            crate::proxy::abi::log(
                LogLevel::Critical,
                &format!("tokenfuse panicked at {at}; the message is withheld (it may quote request data)"),
            );
        }));
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(TokenfuseRoot {
                filter: None,
                tick_ms: STATS_FLUSH_MS,
                upkept_at: Cell::new(i64::MIN),
                sweep_from: Cell::new(0),
                swept_at: Cell::new(i64::MIN),
            })
        });
    }}

    /// Per-VM root: owns the configured filter.
    struct TokenfuseRoot {
        filter: Option<Rc<Filter>>,
        /// The tick period the filter's upkeep wants (ms).
        tick_ms: u64,
        /// When the upkeep last ran (ms): ticks come faster while requests wait.
        upkept_at: Cell<i64>,
        /// Where the next cache sweep starts, and when the last one ran.
        sweep_from: Cell<u32>,
        swept_at: Cell<i64>,
    }

    impl TokenfuseRoot {
        /// Look again at every waiting request; returns whether any still waits.
        fn wake_waiters(&self) -> bool {
            let waiters = WAITERS.with(|w| std::mem::take(&mut *w.borrow_mut()));
            let mut still = Vec::new();
            for (id, weak) in waiters {
                let Some(exchange) = weak.upgrade() else {
                    continue;
                };
                let Ok(mut ex) = exchange.try_borrow_mut() else {
                    still.push((id, weak));
                    continue;
                };
                if !ex.waiting() {
                    continue;
                }
                // The stream may be gone without its context being deleted yet.
                if !crate::proxy::abi::set_effective_context(id) {
                    continue;
                }
                let mut host = WasmHost::new();
                match ex.on_wake(&mut host) {
                    exchange::Wake::Waiting => still.push((id, weak)),
                    exchange::Wake::Resume => host.resume_request(),
                    exchange::Wake::Done => {}
                }
            }
            WAITERS.with(|w| {
                let mut w = w.borrow_mut();
                // Requests that started waiting during the wake-ups above come after.
                still.append(&mut w);
                *w = still;
                !w.is_empty()
            })
        }
    }

    impl Context for TokenfuseRoot {
        fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
            let Some(filter) = &self.filter else {
                return;
            };
            let body = if status_code == 0 {
                WasmHost::new().grpc_response_body(response_size)
            } else {
                None
            };
            filter.settlements.borrow_mut().on_response(
                &mut WasmHost::new(),
                &filter.config,
                token_id,
                status_code,
                body.as_deref(),
            );
        }
    }

    impl RootContext for TokenfuseRoot {
        fn on_configure(&mut self, size: usize) -> bool {
            let document = crate::proxy::abi::buffer(BufferType::PluginConfiguration, 0, size)
                .unwrap_or_default();
            let config = match Config::parse(&document) {
                Ok(c) => c,
                Err(e) => {
                    WasmHost::new().log(Level::Error, &format!("{e}; the plugin is not started"));
                    return false;
                }
            };
            for warning in config.load_warnings() {
                WasmHost::new().log(Level::Warn, &warning);
            }
            let started = WasmHost::new().now_ms();
            let encodings: Vec<String> = config.encodings().iter().map(|e| e.to_string()).collect();
            match Filter::new(config) {
                Ok(filter) => {
                    WasmHost::new().log(
                        Level::Info,
                        &format!(
                            "configured; tokenizers [{}] built in {} ms",
                            encodings.join(", "),
                            WasmHost::new().now_ms().saturating_sub(started)
                        ),
                    );
                    // The tick hands batched stats to Envoy, and sends global-budget
                    // settlements (calls that must outlive the requests that owe them).
                    let tick_ms = filter
                        .config
                        .rate_limit_service
                        .as_ref()
                        .map_or(STATS_FLUSH_MS, |s| s.flush_interval_ms.min(STATS_FLUSH_MS));
                    crate::proxy::abi::set_tick_period(u32::try_from(tick_ms).unwrap_or(u32::MAX));
                    self.tick_ms = tick_ms;
                    self.filter = Some(Rc::new(filter));
                    true
                }
                Err(e) => {
                    WasmHost::new().log(Level::Error, &format!("{e}; the plugin is not started"));
                    false
                }
            }
        }

        fn on_tick(&mut self) {
            let had_waiters = WAITERS.with(|w| !w.borrow().is_empty());
            if had_waiters && !self.wake_waiters() {
                // Nobody waits any more: back to the upkeep's pace.
                crate::proxy::abi::set_tick_period(u32::try_from(self.tick_ms).unwrap_or(u32::MAX));
            }
            let now = WasmHost::new().now_ms();
            let period = i64::try_from(self.tick_ms).unwrap_or(i64::MAX);
            if had_waiters && now.saturating_sub(self.upkept_at.get()) < period {
                return;
            }
            self.upkept_at.set(now);
            if let Some(filter) = &self.filter {
                let mut queue = filter.settlements.borrow_mut();
                if !queue.is_empty() {
                    queue.flush(&mut WasmHost::new(), &filter.config);
                }
                filter.report_count_cache(&mut WasmHost::new());
                filter.refresh_gauges(&mut WasmHost::new(), GAUGE_REFRESH_PER_TICK);
                if filter.config.cache.is_some() && now.saturating_sub(self.swept_at.get()) >= 1000
                {
                    self.swept_at.set(now);
                    let next = exchange::cache_upkeep(
                        filter,
                        &mut WasmHost::new(),
                        self.sweep_from.get(),
                        CACHE_SWEEP_PER_TICK,
                    );
                    self.sweep_from.set(next);
                }
            }
            flush_metrics();
        }

        fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
            let filter = self.filter.clone()?;
            Some(Box::new(TokenfuseHttp {
                id: context_id,
                exchange: Rc::new(RefCell::new(Exchange::new(filter, context_id))),
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// Per-stream context: forwards every callback to the exchange (shared with the root's
    /// list of waiting requests, which holds it weakly).
    struct TokenfuseHttp {
        id: u32,
        exchange: Rc<RefCell<Exchange>>,
    }

    fn action(a: exchange::Action) -> Action {
        match a {
            exchange::Action::Continue => Action::Continue,
            exchange::Action::Pause => Action::Pause,
        }
    }

    impl Context for TokenfuseHttp {
        fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
            self.exchange.borrow_mut().on_grpc_response(
                &mut WasmHost::new(),
                token_id,
                status_code,
                response_size,
            );
        }

        fn on_done(&mut self) -> bool {
            self.exchange.borrow_mut().on_done(&mut WasmHost::new());
            true
        }
    }

    impl HttpContext for TokenfuseHttp {
        fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            #[cfg(feature = "fault-injection")]
            super::fault::on_request_headers();
            let exchange = &mut *self.exchange.borrow_mut();
            action(timing::timed(0, || {
                exchange.on_request_headers(&mut WasmHost::new(), end_of_stream)
            }))
        }

        fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            let mut exchange = self.exchange.borrow_mut();
            let a = timing::timed(1, || {
                exchange.on_request_body(&mut WasmHost::new(), body_size, end_of_stream)
            });
            if exchange.waiting() {
                drop(exchange);
                wait(self.id, &self.exchange);
            }
            action(a)
        }

        fn on_http_request_trailers(&mut self, _: usize) -> Action {
            let mut exchange = self.exchange.borrow_mut();
            let a = exchange.on_request_trailers(&mut WasmHost::new());
            if exchange.waiting() {
                drop(exchange);
                wait(self.id, &self.exchange);
            }
            action(a)
        }

        fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            let exchange = &mut *self.exchange.borrow_mut();
            action(timing::timed(2, || {
                exchange.on_response_headers(&mut WasmHost::new(), end_of_stream)
            }))
        }

        fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            let exchange = &mut *self.exchange.borrow_mut();
            action(timing::timed(3, || {
                exchange.on_response_body(&mut WasmHost::new(), body_size, end_of_stream)
            }))
        }

        fn on_log(&mut self) {
            let exchange = &mut *self.exchange.borrow_mut();
            timing::timed(4, || exchange.on_done(&mut WasmHost::new()));
        }
    }
}
