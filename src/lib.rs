//! tokenfuse: token budgets for LLM traffic, enforced inside Envoy.
//!
//! This file is the proxy-wasm glue and nothing else: a root context per VM that turns the
//! plugin configuration into a [`filter::Filter`] (or refuses it), and an HTTP context per
//! stream that forwards each callback to an [`exchange::Exchange`] through the
//! [`wasm_host::WasmHost`] adapter. Every decision lives in the host-independent modules
//! below, which are tested natively against a fake host.

pub mod admin;
pub mod api;
pub mod bpe;
pub mod budget;
pub mod config;
pub mod enforce;
pub mod exchange;
pub mod filter;
pub mod host;
pub mod ledger;
pub mod price;
pub mod prompt;
pub mod sse;
pub mod stats;
pub mod tokens;
pub mod truncate;
pub mod usage;
pub mod window;

#[cfg(target_arch = "wasm32")]
mod wasm_host;

#[cfg(target_arch = "wasm32")]
mod glue {
    use std::rc::Rc;

    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};

    use crate::config::Config;
    use crate::exchange::{self, Exchange};
    use crate::filter::Filter;
    use crate::host::{Host, Level};
    use crate::wasm_host::WasmHost;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Trace);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(TokenfuseRoot { filter: None })
        });
    }}

    /// Per-VM root: owns the configured filter.
    struct TokenfuseRoot {
        filter: Option<Rc<Filter>>,
    }

    impl Context for TokenfuseRoot {}

    impl RootContext for TokenfuseRoot {
        fn on_configure(&mut self, size: usize) -> bool {
            let document = self.get_plugin_configuration().unwrap_or_default();
            let _ = size;
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
                    self.filter = Some(Rc::new(filter));
                    true
                }
                Err(e) => {
                    WasmHost.log(Level::Error, &format!("{e}; the plugin is not started"));
                    false
                }
            }
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
        fn on_done(&mut self) -> bool {
            self.exchange.on_done(&mut WasmHost);
            true
        }
    }

    impl HttpContext for TokenfuseHttp {
        fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            action(
                self.exchange
                    .on_request_headers(&mut WasmHost, end_of_stream),
            )
        }

        fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            action(
                self.exchange
                    .on_request_body(&mut WasmHost, body_size, end_of_stream),
            )
        }

        fn on_http_request_trailers(&mut self, _: usize) -> Action {
            action(self.exchange.on_request_trailers(&mut WasmHost))
        }

        fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            action(
                self.exchange
                    .on_response_headers(&mut WasmHost, end_of_stream),
            )
        }

        fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            action(
                self.exchange
                    .on_response_body(&mut WasmHost, body_size, end_of_stream),
            )
        }

        fn on_log(&mut self) {
            self.exchange.on_done(&mut WasmHost);
        }
    }
}
