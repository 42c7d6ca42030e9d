//! The proxy-wasm ABI (0.2.1) host functions dialguard calls, behind safe
//! wrappers that return `Result` for every status: nothing here can panic.
//!
//! Why not the proxy-wasm SDK's dispatcher: a module that uses it exports
//! every callback (new connection, data in both directions, close, done,
//! delete), and Envoy calls each export on every connection or data chunk. A
//! filter that only judges connections at their end needs two calls per
//! connection (`proxy_on_context_create`, `proxy_on_log`); the host skips
//! callbacks a module does not export. Memory handed to the host is
//! allocated by [`crate::exports`]' `proxy_on_memory_allocate`.
#![allow(unsafe_code)]

use std::ptr::null_mut;

/// A status the host returned other than Ok.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    #[cfg(feature = "enforce")]
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_grpc_stream(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        return_stream_id: *mut u32,
    ) -> u32;
    fn proxy_grpc_send(
        token: u32,
        message_data: *const u8,
        message_size: usize,
        end_stream: u32,
    ) -> u32;
    fn proxy_grpc_cancel(token: u32) -> u32;
    fn proxy_grpc_close(token: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
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
}

fn check(status: u32) -> Result<(), Status> {
    match status {
        OK => Ok(()),
        other => Err(Status(other)),
    }
}

/// Takes ownership of a buffer the host filled through `proxy_on_memory_allocate`.
///
/// Safety: `data`/`size` must come from the host's return of a hostcall,
/// i.e. from an allocation made by our `proxy_on_memory_allocate`.
unsafe fn take_host_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the host wrote `size` bytes into a Vec<u8> allocation of
    // capacity `size` that our allocator leaked for it.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// Log levels of the ABI.
#[derive(Debug, Clone, Copy)]
pub enum LogLevel {
    Warn = 3,
    Error = 4,
}

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: pointer and length of a live &str.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Reads a property; `path` is its segments joined by NUL bytes
/// (`b"destination\0address"`). `Ok(None)` when the property is absent.
pub fn property(path: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: valid path slice and out-pointers to locals.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    match status {
        OK => Ok(Some(unsafe { take_host_buffer(data, size) })),
        NOT_FOUND => Ok(None),
        other => Err(Status(other)),
    }
}

/// Buffer types of the ABI that dialguard reads.
#[derive(Debug, Clone, Copy)]
pub enum Buffer {
    GrpcReceive = 5,
    PluginConfiguration = 7,
}

pub fn buffer(kind: Buffer, max_size: usize) -> Result<Vec<u8>, Status> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: out-pointers to locals.
    let status = unsafe { proxy_get_buffer_bytes(kind as u32, 0, max_size, &mut data, &mut size) };
    match status {
        OK => Ok(unsafe { take_host_buffer(data, size) }),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(Status(other)),
    }
}

/// Closes both sides of the connection whose callback is running.
#[cfg(feature = "enforce")]
pub fn close_connection() {
    const DOWNSTREAM: u32 = 2;
    const UPSTREAM: u32 = 3;
    // SAFETY: plain values; acts on the current (effective) context.
    let _ = unsafe { proxy_close_stream(DOWNSTREAM) };
    let _ = unsafe { proxy_close_stream(UPSTREAM) };
}

/// Makes later hostcalls act on context `context_id` (a connection, from
/// the root's timer; the root's own id switches back). Fails when the
/// context no longer exists.
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    // SAFETY: plain value.
    check(unsafe { proxy_set_effective_context(context_id) })
}

pub fn set_tick_period_ms(period: u32) -> Result<(), Status> {
    // SAFETY: plain value.
    check(unsafe { proxy_set_tick_period_milliseconds(period) })
}

/// Nanoseconds since the Unix epoch by Envoy's clock.
pub fn now_unix_nanos() -> Result<u64, Status> {
    let mut nanos = 0;
    // SAFETY: out-pointer to a local.
    check(unsafe { proxy_get_current_time_nanoseconds(&mut nanos) })?;
    Ok(nanos)
}

/// Opens a gRPC stream through Envoy cluster `cluster`. Envoy answers an
/// unknown cluster with an error status, which is returned, not a panic.
pub fn grpc_stream(cluster: &str, service: &str, method: &str) -> Result<u32, Status> {
    // An empty metadata map: its entry count, zero.
    let no_metadata = [0u8; 4];
    let mut token = 0;
    // SAFETY: slices of live strings and an out-pointer to a local.
    let status = unsafe {
        proxy_grpc_stream(
            cluster.as_ptr(),
            cluster.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            no_metadata.as_ptr(),
            no_metadata.len(),
            &mut token,
        )
    };
    check(status).map(|()| token)
}

pub fn grpc_send(token: u32, message: &[u8]) -> Result<(), Status> {
    // SAFETY: a live slice.
    check(unsafe { proxy_grpc_send(token, message.as_ptr(), message.len(), 0) })
}

pub fn grpc_cancel(token: u32) -> Result<(), Status> {
    // SAFETY: plain value.
    check(unsafe { proxy_grpc_cancel(token) })
}

/// Ends our side of a stream (half-close); the collector answers with its
/// status once it stored what it received.
pub fn grpc_close(token: u32) -> Result<(), Status> {
    // SAFETY: plain value.
    check(unsafe { proxy_grpc_close(token) })
}

pub fn define_counter(name: &str) -> Result<u32, Status> {
    let mut id = 0;
    // SAFETY: a live &str and an out-pointer to a local.
    check(unsafe { proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: plain values.
    check(unsafe { proxy_increment_metric(id, offset) })
}

/// A shared-data value (shared by the VMs of one Envoy) and its CAS token.
pub fn shared_data(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    let (mut data, mut size, mut cas) = (null_mut(), 0, 0);
    // SAFETY: a live &str and out-pointers to locals.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        OK => Ok((Some(unsafe { take_host_buffer(data, size) }), cas)),
        NOT_FOUND => Ok((None, 0)),
        other => Err(Status(other)),
    }
}

/// Sets a shared-data value if `cas` still matches (0: unconditionally).
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: live slices.
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// Memory the host asks for, to return values into; handed back to Rust by
/// [`take_host_buffer`].
pub fn allocate(size: usize) -> *mut u8 {
    let mut buffer: Vec<u8> = Vec::with_capacity(size);
    let ptr = buffer.as_mut_ptr();
    std::mem::forget(buffer);
    ptr
}
