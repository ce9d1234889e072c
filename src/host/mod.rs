//! The proxy, as the core sees it: the few things an exchange reads from or does to Envoy.
//!
//! The glue implements [`Host`] over proxy-wasm host calls (`wasm_host.rs`); tests implement
//! it with [`fake::FakeHost`], which records everything, so the whole request flow is tested
//! natively without an Envoy.

/// Severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Why a shared-data write failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedError {
    /// Another writer changed the value since it was read: read again and retry.
    CasMismatch,
    /// The proxy refused the write for another reason.
    Failed,
}

/// The proxy refused to start a gRPC call (unknown cluster, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcRefused;

/// What an exchange needs from the proxy for one HTTP stream.
pub trait Host {
    /// A request header (`:method`, `:path` included).
    fn request_header(&self, name: &str) -> Option<String>;
    /// Set (`Some`) or remove (`None`) a request header.
    fn set_request_header(&mut self, name: &str, value: Option<&str>);
    /// The buffered request body, `size` bytes from the start.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replace the first `size` bytes of the buffered request body with `body`.
    fn replace_request_body(&mut self, size: usize, body: &[u8]);
    /// A response header (`:status` included).
    fn response_header(&self, name: &str) -> Option<String>;
    /// Set (`Some`) or remove (`None`) a response header.
    fn set_response_header(&mut self, name: &str, value: Option<&str>);
    /// The current response body chunk, `size` bytes.
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Answer the client directly; the request goes no further.
    fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// The upstream cluster the request was routed to, once known.
    fn upstream_cluster(&self) -> Option<String>;
    /// Add `n` (> 0) to the counter `name`, defining it on first use.
    fn counter_add(&mut self, name: &str, n: u64);
    /// Set the gauge `name` to `value`, defining it on first use.
    fn gauge_set(&mut self, name: &str, value: u64);
    /// Record one sample of the histogram `name`, defining it on first use.
    fn histogram_record(&mut self, name: &str, value: u64);
    /// Write a log line. Callers never pass prompts, completions or credentials.
    fn log(&self, level: Level, message: &str);
    /// Whether a line at `level` would be written (so callers can skip formatting it).
    fn log_enabled(&self, level: Level) -> bool;
    /// Wall-clock time, Unix milliseconds.
    fn now_ms(&self) -> i64;
    /// A shared-data value (process-wide, all worker VMs) and its CAS token.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Write a shared-data value if its CAS token is still `cas` (Envoy: 0 writes
    /// unconditionally; a missing key is inserted whatever `cas` says).
    fn shared_set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError>;
    /// Make Envoy pick the route again after routing headers changed.
    fn clear_route_cache(&mut self);
    /// The name of the route Envoy matched, if any.
    fn route_name(&self) -> Option<String>;
    /// Start a unary gRPC call on `cluster`; its answer reaches the calling context's
    /// `on_grpc_response` with the returned token (Envoy ends it after `timeout_ms`).
    /// `Err` when the proxy refused to start it (no such cluster, say).
    fn grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, GrpcRefused>;
    /// The body of the gRPC response being delivered, `size` bytes.
    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Let a request held in the body phase go on upstream.
    fn resume_request(&mut self);
}

#[cfg(any(test, feature = "testkit"))]
pub mod fake;
