//! Envoy property reads behind the core's host traits. Each read is a hostcall
//! (about 12k instructions), so the core asks lazily.

use std::net::SocketAddr;

use dialguard_filter_core::{
    ConnectionFacts, NodeFacts, OrigDst, UpstreamHost, parse_envoy_address,
};
use proxy_wasm::hostcalls;

fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

fn string_property(path: &[&str]) -> Option<String> {
    property(path).and_then(|bytes| String::from_utf8(bytes).ok())
}

/// Integers come back as 8 bytes, little-endian.
fn u64_property(path: &[&str]) -> Option<u64> {
    let bytes: [u8; 8] = property(path)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

fn address_property(path: &[&str]) -> Option<SocketAddr> {
    parse_envoy_address(&property(path)?).ok()
}

/// The connection whose callback is running.
#[derive(Debug, Default)]
pub struct EnvoyConnection;

impl ConnectionFacts for EnvoyConnection {
    fn original_destination(&mut self) -> Option<OrigDst> {
        address_property(&["destination", "address"]).map(OrigDst)
    }
    fn upstream_host(&mut self) -> Option<UpstreamHost> {
        address_property(&["upstream", "address"]).map(UpstreamHost)
    }
    fn cluster_name(&mut self) -> Option<String> {
        string_property(&["xds", "cluster_name"])
    }
    fn source(&mut self) -> Option<SocketAddr> {
        address_property(&["source", "address"])
    }
    fn connection_id(&mut self) -> Option<u64> {
        u64_property(&["connection", "id"])
    }
    fn filter_chain_name(&mut self) -> Option<String> {
        string_property(&["xds", "filter_chain_name"])
    }
    fn response_flags(&mut self) -> Option<u64> {
        u64_property(&["response", "flags"])
    }
    fn upstream_transport_failure_reason(&mut self) -> Option<String> {
        string_property(&["upstream", "transport_failure_reason"])
    }
    fn intended_service(&mut self) -> Option<String> {
        string_property(&[
            "xds",
            "cluster_metadata",
            "filter_metadata",
            "istio",
            "services",
            "0",
            "host",
        ])
    }
    fn upstream_workload(&mut self) -> Option<String> {
        string_property(&[
            "xds",
            "upstream_host_metadata",
            "filter_metadata",
            "istio",
            "workload",
        ])
    }
}

/// The Envoy node this VM runs in.
#[derive(Debug, Default)]
pub struct EnvoyNode;

impl NodeFacts for EnvoyNode {
    fn node_id(&mut self) -> Option<String> {
        string_property(&["xds", "node", "id"])
    }
    fn metadata(&mut self, key: &str) -> Option<String> {
        string_property(&["xds", "node", "metadata", key])
    }
}

/// Nanoseconds since the Unix epoch by Envoy's clock; 0 if unavailable.
pub fn now_unix_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A name for this VM that no other VM of this Envoy (one per worker, plus
/// the main thread's) shares, and that changes when Envoy restarts. The VMs
/// are created in the same instant, so the clock alone does not tell them
/// apart: an ordinal claimed through shared data (atomic compare-and-swap
/// across the VMs of one Envoy) does.
pub fn vm_instance() -> String {
    const KEY: &str = "dialguard.vm_ordinal";
    let mut ordinal = 0u64;
    for _ in 0..64 {
        let Ok((value, cas)) = hostcalls::get_shared_data(KEY) else {
            break;
        };
        let last = value
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map_or(0, u64::from_le_bytes);
        if hostcalls::set_shared_data(KEY, Some(&(last + 1).to_le_bytes()), cas).is_ok() {
            ordinal = last + 1;
            break;
        }
    }
    format!("{:016x}-{ordinal}", now_unix_nanos())
}
