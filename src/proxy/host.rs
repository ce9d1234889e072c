//! [`Host`] over proxy-wasm host calls: the only place that talks to Envoy.
//!
//! Every call goes through [`crate::proxy::abi`] (the raw ABI: no host status can panic the VM);
//! header values are read as bytes and decoded lossily, since a client can send any bytes
//! in a header. Metric ids are defined once
//! per VM and cached (each `define_metric` call would allocate a new id in Envoy), and
//! updates are batched per VM and handed to Envoy by [`flush_metrics`] on the root
//! context's tick, off the request path.

use std::cell::RefCell;
use std::collections::HashSet;

use rustc_hash::FxHashMap;

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

use crate::proxy::abi;

use crate::host::{GrpcRefused, Host, Level, SharedError};
use crate::proxy::headers::HeaderPairs;

/// A metric as this VM holds it: Envoy's id, and what has not been handed to Envoy yet.
struct Metric {
    id: u32,
    kind: MetricType,
    /// Counter increments since the last flush.
    pending: u64,
    /// The gauge's latest value, if set since the last flush.
    latest: Option<u64>,
    /// Histogram samples since the last flush (at most [`MAX_SAMPLES`]).
    samples: Vec<u64>,
}

/// Most samples a histogram keeps between two flushes (about a second): beyond, samples are
/// dropped rather than held without bound.
const MAX_SAMPLES: usize = 4096;

thread_local! {
    static METRICS: RefCell<FxHashMap<String, Metric>> = RefCell::new(FxHashMap::default());
    /// The proxy's log level for this plugin, and how many more checks it is trusted for.
    static LOG_LEVEL: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
    /// Clusters Envoy has accepted a gRPC call for (see [`grpc_cluster_ready`]).
    static GRPC_CLUSTERS: RefCell<HashSet<String>> = RefCell::new(HashSet::new());
}

/// Apply `update` to metric `name`, defining it (once per VM) with `kind` on first use.
fn with_metric(kind: MetricType, name: &str, update: impl FnOnce(&mut Metric)) {
    METRICS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(m) = cache.get_mut(name) {
            update(m);
            return;
        }
        let Some(id) = abi::define_metric(kind, name) else {
            return;
        };
        let mut m = Metric {
            id,
            kind,
            pending: 0,
            latest: None,
            samples: Vec::new(),
        };
        update(&mut m);
        cache.insert(name.to_string(), m);
    })
}

/// Hand every pending counter increment and gauge value to Envoy. Stats are batched per
/// VM and flushed from the root context's tick (about once a second), because each
/// metric host call costs microseconds on the request path.
pub fn flush_metrics() {
    METRICS.with(|cache| {
        for m in cache.borrow_mut().values_mut() {
            if m.pending > 0 {
                let n = i64::try_from(m.pending).unwrap_or(i64::MAX);
                if m.kind == MetricType::Counter {
                    abi::increment_metric(m.id, n);
                }
                m.pending = 0;
            }
            if let Some(v) = m.latest.take() {
                abi::record_metric(m.id, v);
            }
            for v in m.samples.drain(..) {
                abi::record_metric(m.id, v);
            }
        }
    })
}

fn proxy_level(level: Level) -> LogLevel {
    match level {
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    }
}

/// Whether Envoy takes gRPC calls for `cluster`, found once per VM with a call to a method
/// no service has, cancelled at once (no effect on the service). The SDK's dispatch panics
/// — killing the VM — on the status Envoy gives for a cluster it cannot reach a client
/// for; an unknown cluster must instead apply the failure mode.
fn grpc_cluster_ready(cluster: &str) -> bool {
    if GRPC_CLUSTERS.with(|c| c.borrow().contains(cluster)) {
        return true;
    }
    let Ok(token) = abi::grpc_call(cluster, "tokenfuse.Probe", "Probe", &[], 1) else {
        return false;
    };
    abi::grpc_cancel(token);
    GRPC_CLUSTERS.with(|c| c.borrow_mut().insert(cluster.to_string()));
    true
}

fn header(map: MapType, name: &str) -> Option<String> {
    abi::header(map, name).map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// The host as one callback sees it: the proxy, plus the request and response header maps
/// read during this callback (one host call fetches a whole map; the lookups that follow
/// are local, and writes are applied to it). A value per callback ([`WasmHost::new`]), so
/// no map outlives the callback it was read in.
#[derive(Default)]
pub struct WasmHost {
    maps: RefCell<[Option<HeaderPairs>; 2]>,
}

impl WasmHost {
    /// The host for a callback that is starting.
    pub fn new() -> WasmHost {
        WasmHost::default()
    }

    /// Apply `read` to the map cached for this callback (fetched on first use); `None`
    /// when the proxy has no such map in this phase.
    fn with_map<T>(&self, map: MapType, read: impl FnOnce(&HeaderPairs) -> T) -> Option<T> {
        let mut maps = self.maps.borrow_mut();
        let entry = slot(&mut maps, map);
        if entry.is_none() {
            *entry = Some(HeaderPairs::parse(abi::header_map(map)?)?);
        }
        entry.as_ref().map(read)
    }

    /// Header `name` of `map`, from the map cached for this callback.
    fn header(&self, map: MapType, name: &str) -> Option<String> {
        // Not available as a whole in this phase: answer as the single-value call does.
        self.with_map(map, |m| m.get(name))
            .unwrap_or_else(|| header(map, name))
    }

    fn set_header(&mut self, map: MapType, name: &str, value: Option<&str>) {
        // Removing a header that is not there is a host call for nothing.
        if value.is_none() && self.with_map(map, |m| m.contains(name)) == Some(false) {
            return;
        }
        if !abi::set_header(map, name, value) {
            return;
        }
        // Keep the cached map in step (the proxy replaces every value of `name`).
        if let Some(pairs) = slot(&mut self.maps.borrow_mut(), map) {
            pairs.set(name, value);
        }
    }
}

/// The cache entry of `map`: request headers, or the response's.
fn slot(maps: &mut [Option<HeaderPairs>; 2], map: MapType) -> &mut Option<HeaderPairs> {
    let [request, response] = maps;
    match map {
        MapType::HttpRequestHeaders => request,
        _ => response,
    }
}

fn buffer(kind: BufferType, size: usize) -> Option<Vec<u8>> {
    abi::buffer(kind, 0, size)
}

impl Host for WasmHost {
    fn request_header(&self, name: &str) -> Option<String> {
        self.header(MapType::HttpRequestHeaders, name)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        self.set_header(MapType::HttpRequestHeaders, name, value)
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        buffer(BufferType::HttpRequestBody, size)
    }

    fn replace_request_body(&mut self, size: usize, body: &[u8]) {
        abi::set_buffer(BufferType::HttpRequestBody, 0, size, body);
    }

    fn response_header(&self, name: &str) -> Option<String> {
        self.header(MapType::HttpResponseHeaders, name)
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        self.set_header(MapType::HttpResponseHeaders, name, value)
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        buffer(BufferType::HttpResponseBody, size)
    }

    fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        abi::send_local_response(status, headers, body);
    }

    fn upstream_cluster(&self) -> Option<String> {
        // Envoy's attribute is `xds.cluster_name`; older proxies (and Istio's docs) used
        // the top-level `cluster_name`.
        [vec!["xds", "cluster_name"], vec!["cluster_name"]]
            .into_iter()
            .find_map(|path| match abi::property(&path) {
                Some(bytes) if !bytes.is_empty() => {
                    Some(String::from_utf8_lossy(&bytes).into_owned())
                }
                _ => None,
            })
    }

    fn counter_add(&mut self, name: &str, n: u64) {
        // Envoy rejects increments of zero.
        if n == 0 {
            return;
        }
        with_metric(MetricType::Counter, name, |m| {
            m.pending = m.pending.saturating_add(n)
        });
    }

    fn gauge_set(&mut self, name: &str, value: u64) {
        with_metric(MetricType::Gauge, name, |m| m.latest = Some(value));
    }

    fn histogram_record(&mut self, name: &str, value: u64) {
        with_metric(MetricType::Histogram, name, |m| {
            if m.samples.len() < MAX_SAMPLES {
                m.samples.push(value);
            }
        });
    }

    fn log(&self, level: Level, message: &str) {
        abi::log(proxy_level(level), message);
    }

    fn log_enabled(&self, level: Level) -> bool {
        let wanted = proxy_level(level);
        LOG_LEVEL.with(|cached| {
            let (mut current, left) = cached.get();
            // The level can change at run time (`/logging` on the admin port): ask again
            // every 1,000 checks instead of on every line.
            if left == 0 {
                current = abi::log_level();
                cached.set((current, 1000));
            } else {
                cached.set((current, left.saturating_sub(1)));
            }
            wanted as u32 >= current
        })
    }

    fn now_ms(&self) -> i64 {
        abi::now_ns()
            .map(|ns| i64::try_from(ns / 1_000_000).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        abi::shared_get(key).ok().flatten()
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError> {
        match abi::shared_set(key, value, cas) {
            Ok(()) => Ok(()),
            Err(abi::CAS_MISMATCH) => Err(SharedError::CasMismatch),
            Err(_) => Err(SharedError::Failed),
        }
    }

    fn clear_route_cache(&mut self) {
        // Newer ABIs no longer clear the route cache when a filter changes headers;
        // Envoy exposes it as a foreign function.
        abi::foreign_function("clear_route_cache", &[]);
    }

    fn grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, GrpcRefused> {
        if !grpc_cluster_ready(cluster) {
            return Err(GrpcRefused);
        }
        // The SDK's call, not the raw ABI: the SDK routes the answer to this context's
        // `on_grpc_call_response` only for calls it dispatched itself. Its panicking
        // statuses are ruled out by the probe just above (an unknown cluster is the one
        // Envoy answers with a status the SDK does not expect).
        hostcalls::dispatch_grpc_call(
            cluster,
            service,
            method,
            Vec::new(),
            Some(message),
            Duration::from_millis(timeout_ms),
        )
        .map_err(|_| GrpcRefused)
    }

    fn grpc_response_body(&self, size: usize) -> Option<Vec<u8>> {
        buffer(BufferType::GrpcReceiveBuffer, size)
    }

    fn resume_request(&mut self) {
        abi::continue_request();
    }

    fn route_name(&self) -> Option<String> {
        [vec!["xds", "route_name"], vec!["route_name"]]
            .into_iter()
            .find_map(|path| match abi::property(&path) {
                Some(bytes) if !bytes.is_empty() => {
                    Some(String::from_utf8_lossy(&bytes).into_owned())
                }
                _ => None,
            })
    }
}
