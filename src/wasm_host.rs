//! [`Host`] over proxy-wasm host calls: the only place that talks to Envoy.
//!
//! Header values are read as bytes and decoded lossily, because the SDK's string getter
//! unwraps UTF-8 and a client can send any bytes in a header. Metric ids are defined once
//! per VM and cached (each `define_metric` call would allocate a new id in Envoy).

use std::cell::RefCell;
use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};

use crate::host::{Host, Level, SharedError};

thread_local! {
    static METRICS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

/// The metric id of `name`, defined (once per VM) with `kind` on first use.
fn metric_id(kind: MetricType, name: &str) -> Option<u32> {
    METRICS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(id) = cache.get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(kind, name).ok()?;
        cache.insert(name.to_string(), id);
        Some(id)
    })
}

/// The host of the current HTTP context (proxy-wasm calls act on the active context).
pub struct WasmHost;

#[link(wasm_import_module = "env")]
extern "C" {
    // The ABI function behind the SDK's `get_map_value_bytes`, called directly: the SDK
    // panics (killing the VM) on any status but Ok and NotFound, and Envoy answers
    // BadArgument when a map is not available in the current phase — request headers in
    // the body phase after they went on, for instance.
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
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

fn set_header(map: MapType, name: &str, value: Option<&str>) {
    let _ = hostcalls::set_map_value(map, name, value);
}

fn buffer(kind: BufferType, size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(kind, 0, size).ok().flatten()
}

impl Host for WasmHost {
    fn request_header(&self, name: &str) -> Option<String> {
        header(MapType::HttpRequestHeaders, name)
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
        header(MapType::HttpResponseHeaders, name)
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
        if let Some(id) = metric_id(MetricType::Counter, name) {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    fn gauge_set(&mut self, name: &str, value: u64) {
        if let Some(id) = metric_id(MetricType::Gauge, name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let _ = hostcalls::log(level, message);
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
