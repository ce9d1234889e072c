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
    /// How many writes with a non-zero CAS succeed before the forced conflicts begin.
    pub conflict_after: u32,
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
    pub histograms: BTreeMap<String, Vec<u64>>,
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
    fn histogram_record(&mut self, name: &str, value: u64) {
        self.histograms
            .entry(name.to_string())
            .or_default()
            .push(value);
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
            if shared.conflict_after > 0 {
                shared.conflict_after -= 1;
            } else {
                shared.forced_conflicts -= 1;
                return Err(SharedError::CasMismatch);
            }
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
