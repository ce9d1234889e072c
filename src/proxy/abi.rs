//! The proxy-wasm ABI, called directly: every host call tokenfuse makes, as a function
//! that returns what the host said instead of panicking.
//!
//! The SDK's `hostcalls` panic — killing the VM, and every request on its worker — on any
//! status they do not expect (`status => panic!("unexpected status")`), and decode strings
//! with `unwrap`. Envoy answers statuses the SDK does not expect in ordinary situations
//! (BadArgument for a map that is not available in the current phase, NotFound for a
//! buffer, a status a newer host adds), so no SDK host call is used on a path a request
//! can reach; these wrappers take the status as a plain integer and map it to
//! `Option`/`Result`. Statuses are integers here, not the SDK's enum: an unknown value
//! from a newer host must not become an invalid enum value.
//!
//! One exception, in `wasm_host.rs`: a gRPC call that expects an answer goes through the
//! SDK, whose dispatcher routes the answer only to calls it made itself; the one status it
//! would panic on is ruled out before the call (see `grpc_cluster_ready` there).

use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

/// `Status::Ok`.
pub const OK: u32 = 0;
/// `Status::NotFound`.
pub const NOT_FOUND: u32 = 1;
/// `Status::CasMismatch`.
pub const CAS_MISMATCH: u32 = 8;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_call_foreign_function(
        function_name_data: *const u8,
        function_name_size: usize,
        arguments_data: *const u8,
        arguments_size: usize,
        results_data: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
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
}

/// Take ownership of a buffer the host returned (`None` for a null pointer).
///
/// # Safety
/// `data`/`size` must be what the host wrote after answering Ok: a buffer it allocated
/// through this module's allocator export (`proxy_on_memory_allocate`, from the SDK),
/// owned by the caller exactly once.
unsafe fn owned(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the caller's contract above.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// A call that returns a host-allocated buffer: `Ok(None)` when the host answered Ok with
/// nothing, `Err(status)` otherwise.
fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, u32> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    match call(&mut data, &mut size) {
        // SAFETY: the host answered Ok and wrote `data`/`size` for us to own.
        OK => Ok(unsafe { owned(data, size) }),
        status => Err(status),
    }
}

/// Write a log line.
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: a live &str's pointer and length.
    unsafe {
        proxy_log(level as u32, message.as_ptr(), message.len());
    }
}

/// The plugin's log level as the proxy numbers it (0 trace … 5 critical, higher = off);
/// trace when the proxy does not say.
pub fn log_level() -> u32 {
    let mut level = 0u32;
    // SAFETY: `level` is a valid u32 for the host to write.
    match unsafe { proxy_get_log_level(&mut level) } {
        OK => level,
        _ => 0,
    }
}

/// Wall-clock time in nanoseconds since the Unix epoch, if the host says.
pub fn now_ns() -> Option<u64> {
    let mut t = 0u64;
    // SAFETY: `t` is a valid u64 for the host to write.
    (unsafe { proxy_get_current_time_nanoseconds(&mut t) } == OK).then_some(t)
}

/// Ask for the root context's tick every `ms` milliseconds.
pub fn set_tick_period(ms: u32) -> bool {
    // SAFETY: a plain integer argument.
    unsafe { proxy_set_tick_period_milliseconds(ms) == OK }
}

/// Up to `max` bytes of buffer `kind` from `start`.
pub fn buffer(kind: BufferType, start: usize, max: usize) -> Option<Vec<u8>> {
    // SAFETY: out-pointers to live locals (see `returned`).
    returned(|data, size| unsafe { proxy_get_buffer_bytes(kind as u32, start, max, data, size) })
        .ok()
        .flatten()
}

/// Replace `size` bytes of buffer `kind` from `start` with `bytes`.
pub fn set_buffer(kind: BufferType, start: usize, size: usize, bytes: &[u8]) -> bool {
    // SAFETY: a live slice's pointer and length.
    unsafe { proxy_set_buffer_bytes(kind as u32, start, size, bytes.as_ptr(), bytes.len()) == OK }
}

/// A whole header map, serialised as the ABI does (see [`crate::proxy::headers::HeaderPairs`]).
pub fn header_map(map: MapType) -> Option<Vec<u8>> {
    // SAFETY: out-pointers to live locals (see `returned`).
    match returned(|data, size| unsafe { proxy_get_header_map_pairs(map as u32, data, size) }) {
        Ok(bytes) => Some(bytes.unwrap_or_default()),
        Err(_) => None,
    }
}

/// One header's value, as bytes.
pub fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    // SAFETY: a live &str's pointer and length; out-pointers to live locals.
    match returned(|data, size| unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), data, size)
    }) {
        Ok(bytes) => Some(bytes.unwrap_or_default()),
        Err(_) => None,
    }
}

/// Set (`Some`) or remove (`None`) every value of header `name`; false when refused (a map
/// that has gone on already).
pub fn set_header(map: MapType, name: &str, value: Option<&str>) -> bool {
    // SAFETY: pointer/length pairs of live &str values.
    let status = unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(
                map as u32,
                name.as_ptr(),
                name.len(),
                v.as_ptr(),
                v.len(),
            ),
            None => proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()),
        }
    };
    status == OK
}

/// `pairs` serialised as the ABI's header map: a u32 count, (key length, value length) u32
/// pairs, then each key and value followed by a NUL byte, little-endian. `None` when a
/// length does not fit a u32.
pub fn serialize_map(pairs: &[(&str, &str)]) -> Option<Vec<u8>> {
    let size = pairs.iter().try_fold(4usize, |n, (k, v)| {
        n.checked_add(k.len())?
            .checked_add(v.len())?
            .checked_add(10)
    })?;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&u32::try_from(pairs.len()).ok()?.to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&u32::try_from(k.len()).ok()?.to_le_bytes());
        out.extend_from_slice(&u32::try_from(v.len()).ok()?.to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    Some(out)
}

/// Answer the client with `status`, `headers` and `body`.
pub fn send_local_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> bool {
    let Some(map) = serialize_map(headers) else {
        return false;
    };
    // SAFETY: pointer/length pairs of live slices; a null details pointer with size 0.
    unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        ) == OK
    }
}

/// Make the HTTP context `id` the one the following host calls act on, for the rest of
/// this VM call (the root's tick answering a request that waited for a coalesced one).
/// `false` when the proxy no longer knows the context (its stream is gone).
pub fn set_effective_context(id: u32) -> bool {
    // SAFETY: a plain integer argument.
    unsafe { proxy_set_effective_context(id) == OK }
}

/// Let a request held in the body phase go on.
pub fn continue_request() -> bool {
    // StreamType::HttpRequest.
    // SAFETY: a plain integer argument.
    unsafe { proxy_continue_stream(0) == OK }
}

/// A shared-data value and its CAS token; `Ok(None)` when the key is missing.
pub fn shared_get(key: &str) -> Result<Option<(Vec<u8>, u32)>, u32> {
    let mut cas = 0u32;
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: a live &str's pointer and length; out-pointers to live locals.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        // SAFETY: Ok: the host wrote `data`/`size` for us to own.
        OK => Ok(Some((
            unsafe { owned(data, size) }.unwrap_or_default(),
            cas,
        ))),
        NOT_FOUND => Ok(None),
        other => Err(other),
    }
}

/// Write a shared-data value if its CAS token is still `cas`; the status otherwise.
pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<(), u32> {
    // SAFETY: pointer/length pairs of live slices.
    match unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    } {
        OK => Ok(()),
        other => Err(other),
    }
}

/// Define a metric; its id.
pub fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: a live &str's pointer and length; `id` is a valid u32 for the host to write.
    (unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) } == OK)
        .then_some(id)
}

/// Add `n` to counter `id`.
pub fn increment_metric(id: u32, n: i64) {
    // SAFETY: plain integer arguments.
    unsafe {
        proxy_increment_metric(id, n);
    }
}

/// Set gauge `id` to `value`.
pub fn record_metric(id: u32, value: u64) {
    // SAFETY: plain integer arguments.
    unsafe {
        proxy_record_metric(id, value);
    }
}

/// A property (`path` segments, e.g. `["xds", "cluster_name"]`); `None` when absent.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let mut joined = Vec::new();
    for segment in path {
        joined.extend_from_slice(segment.as_bytes());
        joined.push(0);
    }
    // SAFETY: a live slice's pointer and length; out-pointers to live locals.
    returned(|data, size| unsafe { proxy_get_property(joined.as_ptr(), joined.len(), data, size) })
        .ok()
        .flatten()
}

/// Call the host's foreign function `name` with `args`.
pub fn foreign_function(name: &str, args: &[u8]) -> bool {
    // SAFETY: pointer/length pairs of live slices; out-pointers to live locals.
    returned(|data, size| unsafe {
        proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            args.as_ptr(),
            args.len(),
            data,
            size,
        )
    })
    .is_ok()
}

/// Start a unary gRPC call; its token, or the host's status.
pub fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32, u32> {
    // An empty metadata map: a zero count.
    let metadata = 0u32.to_le_bytes();
    let mut token = 0u32;
    // SAFETY: every pointer/length pair describes a live slice; `token` is a valid u32.
    let status = unsafe {
        proxy_grpc_call(
            cluster.as_ptr(),
            cluster.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    };
    match status {
        OK => Ok(token),
        other => Err(other),
    }
}

/// Cancel gRPC call `token`.
pub fn grpc_cancel(token: u32) {
    // SAFETY: a plain integer argument.
    unsafe {
        proxy_grpc_cancel(token);
    }
}

#[cfg(test)]
mod tests {
    use super::serialize_map;
    use crate::proxy::headers::HeaderPairs;

    #[test]
    fn serialised_maps_read_back() {
        let pairs = [(":status", "429"), ("x-empty", ""), ("k", "v\u{e9}")];
        let bytes = serialize_map(&pairs).unwrap();
        let read = HeaderPairs::parse(bytes).unwrap().pairs();
        let want: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(read, want);
    }
}
