//! Envoy property reads behind the core's host traits. Each read is a
//! hostcall that costs thousands of instructions, so the core asks lazily.
//! Paths are the ABI's form, segments joined by NUL, written out once.

use std::net::SocketAddr;

use dialguard_filter_core::{
    ConnectionFacts, NodeFacts, OrigDst, UpstreamHost, parse_envoy_address,
};

use crate::abi;

const DESTINATION: &[u8] = b"destination\0address";
const UPSTREAM: &[u8] = b"upstream\0address";
const CLUSTER: &[u8] = b"xds\0cluster_name";
const SOURCE: &[u8] = b"source\0address";
const CONNECTION_ID: &[u8] = b"connection\0id";
const FILTER_CHAIN: &[u8] = b"xds\0filter_chain_name";
const RESPONSE_FLAGS: &[u8] = b"response\0flags";
const FAILURE_REASON: &[u8] = b"upstream\0transport_failure_reason";
const INTENDED_SERVICE: &[u8] =
    b"xds\0cluster_metadata\0filter_metadata\0istio\0services\x000\0host";
const UPSTREAM_WORKLOAD: &[u8] = b"xds\0upstream_host_metadata\0filter_metadata\0istio\0workload";
const NODE_ID: &[u8] = b"xds\0node\0id";
const NODE_METADATA: &[u8] = b"xds\0node\0metadata\0";

fn property(path: &[u8]) -> Option<Vec<u8>> {
    abi::property(path).ok().flatten()
}

fn string_property(path: &[u8]) -> Option<String> {
    property(path).and_then(|bytes| String::from_utf8(bytes).ok())
}

/// Integers come back as 8 bytes, little-endian.
fn u64_property(path: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = property(path)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

fn address_property(path: &[u8]) -> Option<SocketAddr> {
    parse_envoy_address(&property(path)?).ok()
}

/// The connection whose callback is running (or the root's effective
/// context). The upstream host is read at most once: judging on the timer
/// asks for it first, to skip connections still connecting.
#[derive(Debug, Default)]
pub struct EnvoyConnection {
    upstream: Option<Option<UpstreamHost>>,
}

impl ConnectionFacts for EnvoyConnection {
    fn original_destination(&mut self) -> Option<OrigDst> {
        address_property(DESTINATION).map(OrigDst)
    }
    fn upstream_host(&mut self) -> Option<UpstreamHost> {
        *self
            .upstream
            .get_or_insert_with(|| address_property(UPSTREAM).map(UpstreamHost))
    }
    fn cluster_name(&mut self) -> Option<String> {
        string_property(CLUSTER)
    }
    fn source(&mut self) -> Option<SocketAddr> {
        address_property(SOURCE)
    }
    fn connection_id(&mut self) -> Option<u64> {
        u64_property(CONNECTION_ID)
    }
    fn filter_chain_name(&mut self) -> Option<String> {
        string_property(FILTER_CHAIN)
    }
    fn response_flags(&mut self) -> Option<u64> {
        u64_property(RESPONSE_FLAGS)
    }
    fn upstream_transport_failure_reason(&mut self) -> Option<String> {
        string_property(FAILURE_REASON)
    }
    fn intended_service(&mut self) -> Option<String> {
        string_property(INTENDED_SERVICE)
    }
    fn upstream_workload(&mut self) -> Option<String> {
        string_property(UPSTREAM_WORKLOAD)
    }
}

/// The Envoy node this VM runs in.
#[derive(Debug, Default)]
pub struct EnvoyNode;

impl NodeFacts for EnvoyNode {
    fn node_id(&mut self) -> Option<String> {
        string_property(NODE_ID)
    }
    fn metadata(&mut self, key: &str) -> Option<String> {
        string_property(&[NODE_METADATA, key.as_bytes()].concat())
    }
}

/// Nanoseconds since the Unix epoch by Envoy's clock; 0 if unavailable.
pub fn now_unix_nanos() -> u64 {
    abi::now_unix_nanos().unwrap_or(0)
}

/// A name for this VM that no other VM of this Envoy (one per worker, plus
/// the main thread's) shares, and that changes when Envoy restarts. The VMs
/// are created in the same instant, so the clock alone does not tell them
/// apart: an ordinal claimed through shared data (atomic compare-and-swap
/// across the VMs of one Envoy) does.
pub fn vm_instance() -> String {
    let ordinal =
        update_shared_count("dialguard.vm_ordinal", |last| last + 1).map_or(0, |last| last + 1);
    format!("{:016x}-{ordinal}", now_unix_nanos())
}

/// Replaces a count in shared data (shared by this Envoy's VMs) by
/// `update` of it, atomically (compare-and-swap, a
/// bounded number of tries); returns the count it replaced, `None` if it
/// could not.
fn update_shared_count(key: &str, update: impl Fn(u64) -> u64) -> Option<u64> {
    for _ in 0..64 {
        let (value, cas) = abi::shared_data(key).ok()?;
        let count = value
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map_or(0, u64::from_le_bytes);
        if abi::set_shared_data(key, &update(count).to_le_bytes(), cas).is_ok() {
            return Some(count);
        }
    }
    None
}
