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

/// A header map as proxy-wasm serialises it (`proxy_get_header_map_pairs`): a u32 count, a
/// (key length, value length) u32 pair per entry, then each key and value followed by a NUL
/// byte, little-endian. Kept as received; entries are located once and looked up in place,
/// so reading a map costs one allocation for the offsets, not two strings per header.
/// Writes made through the filter afterwards are recorded on top ([`HeaderPairs::set`]).
#[derive(Debug, Default)]
pub struct HeaderPairs {
    raw: Vec<u8>,
    /// Byte ranges of each key and value in `raw`, for the entries not overwritten since.
    spans: Vec<[u32; 4]>,
    /// Values set since the map was read, in order.
    added: Vec<(String, String)>,
}

impl HeaderPairs {
    /// Locate the entries of `raw`. `None` when the bytes do not add up.
    pub fn parse(raw: Vec<u8>) -> Option<HeaderPairs> {
        if raw.is_empty() {
            return Some(HeaderPairs::default());
        }
        let word = |at: usize| -> Option<usize> {
            let b = raw.get(at..at.checked_add(4)?)?;
            Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
        };
        let count = word(0)?;
        let mut data = count.checked_mul(8)?.checked_add(4)?;
        if data > raw.len() {
            return None;
        }
        let mut spans = Vec::with_capacity(count);
        for i in 0..count {
            let sizes = i.checked_mul(8)?;
            let key_len = word(sizes.checked_add(4)?)?;
            let value_len = word(sizes.checked_add(8)?)?;
            let key_end = data.checked_add(key_len)?;
            let value_start = key_end.checked_add(1)?;
            let value_end = value_start.checked_add(value_len)?;
            if raw.get(key_end) != Some(&0) || raw.get(value_end) != Some(&0) {
                return None;
            }
            // Every offset is below raw.len(), which the host's u32 sizes bound.
            let at = |n: usize| u32::try_from(n).ok();
            spans.push([at(data)?, at(key_end)?, at(value_start)?, at(value_end)?]);
            data = value_end.checked_add(1)?;
        }
        Some(HeaderPairs {
            raw,
            spans,
            added: Vec::new(),
        })
    }

    fn bytes(&self, from: u32, to: u32) -> &[u8] {
        self.raw.get(from as usize..to as usize).unwrap_or_default()
    }

    /// The first value of `name` (case-insensitive), decoded lossily: clients send any
    /// bytes in headers.
    pub fn get(&self, name: &str) -> Option<String> {
        if let Some((_, v)) = self
            .added
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            return Some(v.clone());
        }
        self.spans
            .iter()
            .find(|s| self.bytes(s[0], s[1]).eq_ignore_ascii_case(name.as_bytes()))
            .map(|s| String::from_utf8_lossy(self.bytes(s[2], s[3])).into_owned())
    }

    /// Whether `name` has a value.
    pub fn contains(&self, name: &str) -> bool {
        self.added.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
            || self
                .spans
                .iter()
                .any(|s| self.bytes(s[0], s[1]).eq_ignore_ascii_case(name.as_bytes()))
    }

    /// Record that every value of `name` was replaced by `value` (or removed).
    pub fn set(&mut self, name: &str, value: Option<&str>) {
        let raw = &self.raw;
        self.spans.retain(|s| {
            !raw.get(s[0] as usize..s[1] as usize)
                .unwrap_or_default()
                .eq_ignore_ascii_case(name.as_bytes())
        });
        self.added.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            self.added.push((name.to_ascii_lowercase(), v.to_string()));
        }
    }

    /// Every entry, in order (the map as read, then what was set since).
    pub fn pairs(&self) -> Vec<(String, String)> {
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        self.spans
            .iter()
            .map(|s| (lossy(self.bytes(s[0], s[1])), lossy(self.bytes(s[2], s[3]))))
            .chain(self.added.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod map_tests {
    use super::HeaderPairs;

    fn parse_map_pairs(bytes: &[u8]) -> Option<Vec<(String, String)>> {
        HeaderPairs::parse(bytes.to_vec()).map(|m| m.pairs())
    }

    fn encode(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    #[test]
    fn header_pairs_decode_in_order_with_lossy_values() {
        let bytes = encode(&[
            (":path", b"/v1/chat"),
            ("x-tenant", b"acme"),
            ("x-bin", b"\xff"),
        ]);
        assert_eq!(
            parse_map_pairs(&bytes).unwrap(),
            vec![
                (":path".to_string(), "/v1/chat".to_string()),
                ("x-tenant".to_string(), "acme".to_string()),
                ("x-bin".to_string(), "\u{fffd}".to_string()),
            ]
        );
        assert_eq!(parse_map_pairs(&[]).unwrap(), vec![]);
    }

    #[test]
    fn lookups_are_case_insensitive_and_writes_replace_every_value() {
        let bytes = encode(&[
            (":status", b"200"),
            ("x-a", b"1"),
            ("x-a", b"2"),
            ("content-type", b"application/json"),
        ]);
        let mut m = HeaderPairs::parse(bytes).unwrap();
        assert_eq!(m.get("X-A").as_deref(), Some("1"));
        assert!(m.contains("content-type"));
        assert!(!m.contains("content-encoding"));
        m.set("x-a", Some("3"));
        assert_eq!(m.get("x-a").as_deref(), Some("3"));
        m.set("Content-Type", None);
        assert_eq!(m.get("content-type"), None);
        m.set("x-new", Some("v"));
        assert_eq!(
            m.pairs(),
            vec![
                (":status".to_string(), "200".to_string()),
                ("x-a".to_string(), "3".to_string()),
                ("x-new".to_string(), "v".to_string()),
            ]
        );
    }

    #[test]
    fn truncated_or_lying_maps_are_refused_not_panicked_on() {
        let bytes = encode(&[("k", b"value")]);
        for n in 1..bytes.len() {
            assert!(parse_map_pairs(&bytes[..n]).is_none(), "prefix {n}");
        }
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_map_pairs(&huge).is_none());
        let mut long_key = bytes;
        long_key[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(parse_map_pairs(&long_key).is_none());
    }
}

#[cfg(any(test, feature = "testkit"))]
pub mod fake {
    //! An in-memory [`Host`] for tests.

    // A test double (compiled outside tests only for the fuzz targets and benchmarks, with
    // the `testkit` feature): its assertions and arithmetic are the tests', not the filter's.
    #![allow(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::panic
    )]

    use std::cell::{Cell, RefCell};
    use std::collections::{BTreeMap, HashMap};
    use std::rc::Rc;

    use super::{GrpcRefused, Host, Level, SharedError};

    /// Shared data with Envoy's semantics, shareable between fake hosts (one per
    /// simulated worker or request).
    #[derive(Debug, Default)]
    pub struct FakeShared {
        pub values: HashMap<String, (Vec<u8>, u32)>,
        next_cas: u32,
        /// The next this-many writes with a non-zero CAS fail with a mismatch, as if
        /// another worker had written in between.
        pub forced_conflicts: u32,
        /// Every write fails (the proxy refuses).
        pub broken: bool,
    }

    /// A local reply the exchange sent.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Reply {
        pub status: u32,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Reply {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
    }

    /// A gRPC call the code under test started.
    #[derive(Clone, Debug, PartialEq)]
    pub struct GrpcCall {
        pub token: u32,
        pub cluster: String,
        pub service: String,
        pub method: String,
        pub message: Vec<u8>,
        pub timeout_ms: u64,
    }

    /// Records everything; tests set the request/response side and read the effects.
    #[derive(Debug, Default)]
    pub struct FakeHost {
        pub request_headers: Vec<(String, String)>,
        pub request_body: Vec<u8>,
        pub response_headers: Vec<(String, String)>,
        pub response_chunk: Vec<u8>,
        pub cluster: Option<String>,
        pub reply: Option<Reply>,
        pub counters: BTreeMap<String, u64>,
        pub gauges: BTreeMap<String, u64>,
        pub logs: RefCell<Vec<(Level, String)>>,
        pub shared: Rc<RefCell<FakeShared>>,
        pub now_ms: Cell<i64>,
        pub route: Option<String>,
        pub route_cache_cleared: u32,
        pub grpc_calls: Vec<GrpcCall>,
        /// Every `grpc_call` is refused.
        pub grpc_broken: bool,
        /// What `grpc_response_body` returns.
        pub grpc_body: Vec<u8>,
        pub resumed: u32,
        /// How many times `shared_get` was called (each is a host call in Envoy).
        pub shared_reads: Cell<u32>,
    }

    fn get(list: &[(String, String)], name: &str) -> Option<String> {
        list.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn set(list: &mut Vec<(String, String)>, name: &str, value: Option<&str>) {
        list.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            list.push((name.to_string(), v.to_string()));
        }
    }

    impl FakeHost {
        /// A POST to `path` with `body` and a matching content-length.
        pub fn post(path: &str, body: &[u8]) -> Self {
            FakeHost {
                request_headers: vec![
                    (":method".into(), "POST".into()),
                    (":path".into(), path.into()),
                    ("content-type".into(), "application/json".into()),
                    ("content-length".into(), body.len().to_string()),
                ],
                request_body: body.to_vec(),
                cluster: Some("primary".into()),
                ..Default::default()
            }
        }

        pub fn req_header(&self, name: &str) -> Option<String> {
            get(&self.request_headers, name)
        }

        pub fn resp_header(&self, name: &str) -> Option<String> {
            get(&self.response_headers, name)
        }

        /// Counter value by exact name, 0 when never incremented.
        pub fn counter(&self, name: &str) -> u64 {
            self.counters.get(name).copied().unwrap_or(0)
        }

        /// Sum of all counters whose name starts with `prefix` and contains every `parts`.
        pub fn counter_sum(&self, prefix: &str, parts: &[&str]) -> u64 {
            self.counters
                .iter()
                .filter(|(k, _)| k.starts_with(prefix) && parts.iter().all(|p| k.contains(p)))
                .map(|(_, v)| *v)
                .sum()
        }

        pub fn log_text(&self) -> String {
            self.logs
                .borrow()
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        }
    }

    impl Host for FakeHost {
        fn request_header(&self, name: &str) -> Option<String> {
            get(&self.request_headers, name)
        }
        fn set_request_header(&mut self, name: &str, value: Option<&str>) {
            set(&mut self.request_headers, name, value)
        }
        fn request_body(&self, size: usize) -> Option<Vec<u8>> {
            Some(self.request_body[..size.min(self.request_body.len())].to_vec())
        }
        fn replace_request_body(&mut self, size: usize, body: &[u8]) {
            let size = size.min(self.request_body.len());
            self.request_body.splice(..size, body.iter().copied());
        }
        fn response_header(&self, name: &str) -> Option<String> {
            get(&self.response_headers, name)
        }
        fn set_response_header(&mut self, name: &str, value: Option<&str>) {
            set(&mut self.response_headers, name, value)
        }
        fn response_body(&self, size: usize) -> Option<Vec<u8>> {
            Some(self.response_chunk[..size.min(self.response_chunk.len())].to_vec())
        }
        fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
            self.reply = Some(Reply {
                status,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: body.to_vec(),
            });
        }
        fn upstream_cluster(&self) -> Option<String> {
            self.cluster.clone()
        }
        fn counter_add(&mut self, name: &str, n: u64) {
            assert!(n > 0, "Envoy rejects counter increments <= 0 ({name})");
            *self.counters.entry(name.to_string()).or_default() += n;
        }
        fn log(&self, level: Level, message: &str) {
            self.logs.borrow_mut().push((level, message.to_string()));
        }
        fn gauge_set(&mut self, name: &str, value: u64) {
            self.gauges.insert(name.to_string(), value);
        }
        fn log_enabled(&self, _level: Level) -> bool {
            true
        }
        fn now_ms(&self) -> i64 {
            self.now_ms.get()
        }
        fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.shared_reads.set(self.shared_reads.get() + 1);
            self.shared.borrow().values.get(key).cloned()
        }
        fn shared_set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError> {
            let mut shared = self.shared.borrow_mut();
            if shared.broken {
                return Err(SharedError::Failed);
            }
            if cas != 0 && shared.forced_conflicts > 0 {
                shared.forced_conflicts -= 1;
                return Err(SharedError::CasMismatch);
            }
            shared.next_cas = shared.next_cas.wrapping_add(1).max(1);
            let next = shared.next_cas;
            match shared.values.get_mut(key) {
                Some(entry) => {
                    if cas != 0 && cas != entry.1 {
                        return Err(SharedError::CasMismatch);
                    }
                    *entry = (value.to_vec(), next);
                }
                None => {
                    shared
                        .values
                        .insert(key.to_string(), (value.to_vec(), next));
                }
            }
            Ok(())
        }
        fn clear_route_cache(&mut self) {
            self.route_cache_cleared += 1;
        }
        fn route_name(&self) -> Option<String> {
            self.route.clone()
        }
        fn grpc_call(
            &mut self,
            cluster: &str,
            service: &str,
            method: &str,
            message: &[u8],
            timeout_ms: u64,
        ) -> Result<u32, GrpcRefused> {
            if self.grpc_broken {
                return Err(GrpcRefused);
            }
            let token = 100 + self.grpc_calls.len() as u32;
            self.grpc_calls.push(GrpcCall {
                token,
                cluster: cluster.to_string(),
                service: service.to_string(),
                method: method.to_string(),
                message: message.to_vec(),
                timeout_ms,
            });
            Ok(token)
        }
        fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>> {
            Some(self.grpc_body[..size.min(self.grpc_body.len())].to_vec())
        }
        fn resume_request(&mut self) {
            self.resumed += 1;
        }
    }
}
