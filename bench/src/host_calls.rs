//! What one proxy-wasm host call costs inside Envoy, for `make bench` (bench/run.py): a Wasm
//! filter that, on every request it sees, makes each kind of call tokenfuse makes a few
//! times in a row and times them from inside the VM with the host clock. The time includes
//! Envoy's side of the call and, for calls that return data, the host's call back into the
//! VM to allocate the buffer it returns (`proxy_on_memory_allocate`); it does not include
//! the callbacks' own entry into the VM. The calls run back to back, so these are warm
//! figures: a call made once in a request, after Envoy's own work, costs more.
//!
//! Every 2,000 requests a VM logs one line at warning level:
//! `host_calls {"requests":2000,"us":{"clock":0.21,...}}` (µs per call, averaged).
//!
//! ```text
//! cargo build --release --target wasm32-wasip1 --example host_calls
//! # target/wasm32-wasip1/release/examples/host_calls.wasm, loaded by bench/run.py
//! ```
//!
//! A `cdylib` example (see Cargo.toml); it compiles to nothing natively (`cargo test` builds
//! every example).

#[cfg(target_arch = "wasm32")]
mod calls {
    use std::cell::RefCell;
    use std::time::UNIX_EPOCH;

    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(CallsRoot) });
    }}

    /// The kinds of call timed, in the order they are reported.
    const KINDS: [&str; 10] = [
        "clock",
        "request_header_map",
        "request_header_value",
        "cluster_property",
        "request_body",
        "shared_data_get",
        "shared_data_get_cas",
        "response_header_map",
        "response_header_set",
        "response_body",
    ];
    /// Calls of each kind per request (timed together: the clock's own cost is spread).
    const REPEAT: u32 = 10;
    const REPORT_EVERY: u64 = 2000;
    const KEY: &str = "host_calls:counter";

    thread_local! {
        /// Nanoseconds per kind, and requests, since the last report.
        static TOTALS: RefCell<([u64; KINDS.len()], u64)> =
            const { RefCell::new(([0; KINDS.len()], 0)) };
    }

    fn now_ns() -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    /// Run `call` REPEAT times and add the time to the totals of `kind`; returns the bytes
    /// the calls returned (kept, so no call is optimised away).
    fn timed(kind: &str, mut call: impl FnMut() -> usize) -> usize {
        let Some(slot) = KINDS.iter().position(|k| *k == kind) else {
            return 0;
        };
        let mut bytes = 0;
        let start = now_ns();
        for _ in 0..REPEAT {
            bytes += call();
        }
        let took = now_ns().saturating_sub(start);
        TOTALS.with(|t| t.borrow_mut().0[slot] += took);
        bytes
    }

    fn len(v: Option<Vec<u8>>) -> usize {
        v.map_or(0, |v| v.len())
    }

    struct CallsRoot;

    impl Context for CallsRoot {}

    impl RootContext for CallsRoot {
        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Calls { seen: 0 }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Calls {
        /// Bytes the calls returned.
        seen: usize,
    }

    impl Context for Calls {}

    impl HttpContext for Calls {
        fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            self.seen += timed("clock", || usize::from(now_ns() > 0));
            self.seen += timed("request_header_map", || {
                hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_or(0, |m| m.len())
            });
            self.seen += timed("request_header_value", || {
                hostcalls::get_map_value(MapType::HttpRequestHeaders, "x-tenant")
                    .ok()
                    .flatten()
                    .map_or(0, |v| v.len())
            });
            self.seen += timed("cluster_property", || {
                len(hostcalls::get_property(vec!["xds", "cluster_name"])
                    .ok()
                    .flatten())
            });
            if end_of_stream {
                Action::Continue
            } else {
                Action::Pause
            }
        }

        fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            if !end_of_stream {
                return Action::Pause;
            }
            self.seen += timed("request_body", || {
                len(
                    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                        .ok()
                        .flatten(),
                )
            });
            self.seen += timed("shared_data_get", || {
                len(hostcalls::get_shared_data(KEY).ok().and_then(|(v, _)| v))
            });
            // A read and a compare-and-swap write, as a reservation makes them; the write's
            // own cost is this less shared_data_get.
            self.seen += timed("shared_data_get_cas", || {
                let Ok((value, cas)) = hostcalls::get_shared_data(KEY) else {
                    return 0;
                };
                let n = value
                    .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                    .map_or(0, u64::from_le_bytes);
                let _ = hostcalls::set_shared_data(KEY, Some(&(n + 1).to_le_bytes()), cas);
                8
            });
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
            self.seen += timed("response_header_map", || {
                hostcalls::get_map_bytes(MapType::HttpResponseHeaders).map_or(0, |m| m.len())
            });
            let mut i = 0u32;
            self.seen += timed("response_header_set", || {
                i += 1;
                let value = i.to_string();
                let _ = hostcalls::set_map_value(
                    MapType::HttpResponseHeaders,
                    "x-host-calls",
                    Some(&value),
                );
                value.len()
            });
            Action::Continue
        }

        fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            if body_size > 0 {
                self.seen += timed("response_body", || {
                    len(
                        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
                            .ok()
                            .flatten(),
                    )
                });
            }
            if end_of_stream {
                report(self.seen);
            }
            Action::Continue
        }
    }

    /// Count a finished request; every REPORT_EVERY, log the averages and start over.
    fn report(seen: usize) {
        TOTALS.with(|t| {
            let mut t = t.borrow_mut();
            t.1 += 1;
            if t.1 < REPORT_EVERY {
                return;
            }
            let calls = (t.1 * u64::from(REPEAT)) as f64;
            let fields: Vec<String> = KINDS
                .iter()
                .zip(t.0)
                .map(|(kind, ns)| format!("\"{kind}\":{:.3}", ns as f64 / calls / 1000.0))
                .collect();
            let _ = hostcalls::log(
                LogLevel::Warn,
                &format!(
                    "host_calls {{\"requests\":{},\"bytes_seen\":{seen},\"us\":{{{}}}}}",
                    t.1,
                    fields.join(",")
                ),
            );
            *t = ([0; KINDS.len()], 0);
        });
    }
}
