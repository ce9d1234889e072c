//! The floor for `make bench`: the least a proxy-wasm filter that counts LLM traffic must do,
//! with none of the counting. It holds each request until its body is complete, reads the
//! body once, adds one response header, and reads each response body chunk as it passes —
//! the host calls and the calls into the VM tokenfuse cannot avoid. What Envoy spends on it
//! is what any Wasm filter of this kind costs; what tokenfuse costs beyond it is its own work.
//!
//! ```text
//! cargo build --release --target wasm32-wasip1 --example floor_filter
//! # target/wasm32-wasip1/release/examples/floor_filter.wasm, loaded by bench/run.py
//! ```
//!
//! A `cdylib` example (see Cargo.toml); it compiles to nothing natively (`cargo test` builds
//! every example).

#[cfg(target_arch = "wasm32")]
mod floor {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(FloorRoot) });
    }}

    struct FloorRoot;

    impl Context for FloorRoot {}

    impl RootContext for FloorRoot {
        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Floor { body_bytes: 0 }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Floor {
        body_bytes: usize,
    }

    impl Context for Floor {}

    impl HttpContext for Floor {
        fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
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
            self.body_bytes = self
                .get_http_request_body(0, body_size)
                .map_or(0, |b| b.len());
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
            self.set_http_response_header("x-floor-body-bytes", Some(&self.body_bytes.to_string()));
            Action::Continue
        }

        fn on_http_response_body(&mut self, body_size: usize, _: bool) -> Action {
            if body_size > 0 {
                let _ = self.get_http_response_body(0, body_size);
            }
            Action::Continue
        }
    }
}
