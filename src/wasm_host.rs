//! [`Host`] over proxy-wasm host calls: the only place that talks to Envoy.
//!
//! Header values are read as bytes and decoded lossily, because the SDK's string getter
//! unwraps UTF-8 and a client can send any bytes in a header. Metric ids are defined once
//! per VM and cached (each `define_metric` call would allocate a new id in Envoy), and
//! updates are batched per VM and handed to Envoy by [`flush_metrics`] on the root
//! context's tick, off the request path.

use std::cell::RefCell;
use std::collections::HashSet;

use rustc_hash::FxHashMap;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};

use crate::host::{GrpcRefused, HeaderPairs, Host, Level, SharedError};

/// A metric as this VM holds it: Envoy's id, and what has not been handed to Envoy yet.
struct Metric {
    id: u32,
    kind: MetricType,
    /// Counter increments since the last flush.
    pending: u64,
    /// The gauge's latest value, if set since the last flush.
    latest: Option<u64>,
}

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
        let Ok(id) = hostcalls::define_metric(kind, name) else {
            return;
        };
        let mut m = Metric {
            id,
            kind,
            pending: 0,
            latest: None,
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
                    let _ = hostcalls::increment_metric(m.id, n);
                }
                m.pending = 0;
            }
            if let Some(v) = m.latest.take() {
                let _ = hostcalls::record_metric(m.id, v);
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

/// The host of the current HTTP context (proxy-wasm calls act on the active context).
pub struct WasmHost;

#[link(wasm_import_module = "env")]
extern "C" {
    // The ABI function behind the SDK's `get_map_value_bytes`, called directly: the SDK
    // panics (killing the VM) on any status but Ok and NotFound, and Envoy answers
    // BadArgument when a map is not available in the current phase — request headers in
    // the body phase after they went on, for instance.
    // Header writes, also called directly: the SDK panics on any status but Ok, and Envoy
    // refuses writes to a map that has already gone on.
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

#[link(wasm_import_module = "env")]
extern "C" {
    // The ABI behind the SDK's `dispatch_grpc_call`, used only to probe a cluster: the SDK
    // panics on any status but Ok, ParseFailure and InternalFailure.
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        request_data: *const u8,
        request_size: usize,
        timeout_milliseconds: u32,
        token_ptr: *mut u32,
    ) -> u32;
    fn proxy_grpc_cancel(token_id: u32) -> u32;
    // Read as a plain integer: the SDK writes the host's answer into its `LogLevel` enum,
    // and a level it does not know (Envoy's `off`) would be an invalid enum value.
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
}

/// The plugin's log level as the proxy numbers it (0 trace … 5 critical, higher = off);
/// trace when the proxy does not say.
fn log_level() -> u32 {
    let mut level = 0u32;
    // SAFETY: `level` is a valid u32 for the host to write.
    match unsafe { proxy_get_log_level(&mut level) } {
        ABI_OK => level,
        _ => 0,
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
    const SERVICE: &str = "tokenfuse.Probe";
    const METHOD: &str = "Probe";
    // An empty metadata map in the ABI's serialisation: a zero count.
    let metadata = 0u32.to_le_bytes();
    let mut token = 0u32;
    // SAFETY: every pointer/length pair describes a live slice; `token` is a valid u32.
    let status = unsafe {
        proxy_grpc_call(
            cluster.as_ptr(),
            cluster.len(),
            SERVICE.as_ptr(),
            SERVICE.len(),
            METHOD.as_ptr(),
            METHOD.len(),
            metadata.as_ptr(),
            metadata.len(),
            std::ptr::null(),
            0,
            1,
            &mut token,
        )
    };
    if status != ABI_OK {
        return false;
    }
    // SAFETY: a plain ABI call with the token Envoy just returned.
    unsafe {
        proxy_grpc_cancel(token);
    }
    GRPC_CLUSTERS.with(|c| c.borrow_mut().insert(cluster.to_string()));
    true
}

/// `Status::Ok` in the ABI (a plain integer here: an unknown status from a newer host must
/// not become an invalid enum value).
const ABI_OK: u32 = 0;

fn header(map: MapType, name: &str) -> Option<String> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the key pointer and length describe a live &str; on Ok the host has written
    // a buffer it allocated through this module's `proxy_on_memory_allocate` (the SDK's
    // allocator export), which we take ownership of exactly once.
    let status =
        unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) };
    match status {
        ABI_OK if data.is_null() => Some(String::new()),
        ABI_OK => {
            // SAFETY: see above; `size` is the length the host wrote.
            let bytes = unsafe { Vec::from_raw_parts(data, size, size) };
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        _ => None,
    }
}

thread_local! {
    /// The request and response header maps read during the current callback: one host
    /// call fetches a whole map, and the lookups that follow are local. Cleared by
    /// [`begin_callback`]; header writes are applied to it.
    static HEADER_MAPS: RefCell<[Option<HeaderPairs>; 2]> = const { RefCell::new([None, None]) };
}

/// The cache entry of `map`: request headers, or the response's.
fn slot(maps: &mut [Option<HeaderPairs>; 2], map: MapType) -> &mut Option<HeaderPairs> {
    let [request, response] = maps;
    match map {
        MapType::HttpRequestHeaders => request,
        _ => response,
    }
}

/// Forget the header maps read so far: a new callback (possibly of another stream) starts.
pub fn begin_callback() {
    HEADER_MAPS.with(|m| *m.borrow_mut() = [None, None]);
}

/// A whole header map in one host call, through the raw ABI (no status can panic the VM).
fn header_pairs(map: MapType) -> Option<HeaderPairs> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `header`: on Ok the host wrote a buffer it allocated through this
    // module's allocator export, owned here exactly once.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
    if status != ABI_OK {
        return None;
    }
    if data.is_null() {
        return Some(HeaderPairs::default());
    }
    // SAFETY: see above; `size` is the length the host wrote.
    let bytes = unsafe { Vec::from_raw_parts(data, size, size) };
    HeaderPairs::parse(bytes)
}

/// Apply `read` to the map cached for this callback (fetched on first use); `None` when
/// the proxy has no such map in this phase.
fn with_cached_map<T>(map: MapType, read: impl FnOnce(&HeaderPairs) -> T) -> Option<T> {
    HEADER_MAPS.with(|maps| {
        let mut maps = maps.borrow_mut();
        let entry = slot(&mut maps, map);
        if entry.is_none() {
            *entry = Some(header_pairs(map)?);
        }
        entry.as_ref().map(read)
    })
}

/// Header `name` of `map`, from the map cached for this callback.
fn cached_header(map: MapType, name: &str) -> Option<String> {
    // Not available as a whole in this phase: answer as the single-value call does.
    with_cached_map(map, |m| m.get(name)).unwrap_or_else(|| header(map, name))
}

fn set_header(map: MapType, name: &str, value: Option<&str>) {
    // Removing a header that is not there is a host call for nothing.
    if value.is_none() && with_cached_map(map, |m| m.contains(name)) == Some(false) {
        return;
    }
    // SAFETY: pointer/length pairs of live &str values; the status is only compared.
    let status = unsafe {
        match value {
            Some(v) => {
                proxy_replace_header_map_value(map, name.as_ptr(), name.len(), v.as_ptr(), v.len())
            }
            None => proxy_remove_header_map_value(map, name.as_ptr(), name.len()),
        }
    };
    if status != ABI_OK {
        return;
    }
    // Keep the cached map in step (the proxy replaces every value of `name`).
    HEADER_MAPS.with(|m| {
        if let Some(pairs) = slot(&mut m.borrow_mut(), map) {
            pairs.set(name, value);
        }
    });
}

fn buffer(kind: BufferType, size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(kind, 0, size).ok().flatten()
}

impl Host for WasmHost {
    fn request_header(&self, name: &str) -> Option<String> {
        cached_header(MapType::HttpRequestHeaders, name)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        set_header(MapType::HttpRequestHeaders, name, value)
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        buffer(BufferType::HttpRequestBody, size)
    }

    fn replace_request_body(&mut self, size: usize, body: &[u8]) {
        let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body);
    }

    fn response_header(&self, name: &str) -> Option<String> {
        cached_header(MapType::HttpResponseHeaders, name)
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        set_header(MapType::HttpResponseHeaders, name, value)
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        buffer(BufferType::HttpResponseBody, size)
    }

    fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let _ = hostcalls::send_http_response(status, headers.to_vec(), Some(body));
    }

    fn upstream_cluster(&self) -> Option<String> {
        // Envoy's attribute is `xds.cluster_name`; older proxies (and Istio's docs) used
        // the top-level `cluster_name`.
        [vec!["xds", "cluster_name"], vec!["cluster_name"]]
            .into_iter()
            .find_map(|path| match hostcalls::get_property(path) {
                Ok(Some(bytes)) if !bytes.is_empty() => {
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

    fn log(&self, level: Level, message: &str) {
        let _ = hostcalls::log(proxy_level(level), message);
    }

    fn log_enabled(&self, level: Level) -> bool {
        let wanted = proxy_level(level);
        LOG_LEVEL.with(|cached| {
            let (mut current, left) = cached.get();
            // The level can change at run time (`/logging` on the admin port): ask again
            // every 1,000 checks instead of on every line.
            if left == 0 {
                current = log_level();
                cached.set((current, 1000));
            } else {
                cached.set((current, left.saturating_sub(1)));
            }
            wanted as u32 >= current
        })
    }

    fn now_ms(&self) -> i64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), Some(cas))) => Some((bytes, cas)),
            Ok((Some(bytes), None)) => Some((bytes, 0)),
            _ => None,
        }
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError> {
        match hostcalls::set_shared_data(key, Some(value), Some(cas)) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SharedError::CasMismatch),
            Err(_) => Err(SharedError::Failed),
        }
    }

    fn clear_route_cache(&mut self) {
        // Newer ABIs no longer clear the route cache when a filter changes headers;
        // Envoy exposes it as a foreign function.
        let _ = hostcalls::call_foreign_function("clear_route_cache", Some(&[]));
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
        let _ = hostcalls::resume_http_request();
    }

    fn route_name(&self) -> Option<String> {
        [vec!["xds", "route_name"], vec!["route_name"]]
            .into_iter()
            .find_map(|path| match hostcalls::get_property(path) {
                Ok(Some(bytes)) if !bytes.is_empty() => {
                    Some(String::from_utf8_lossy(&bytes).into_owned())
                }
                _ => None,
            })
    }
}
