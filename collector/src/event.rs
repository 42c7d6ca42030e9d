//! Validation of events as they arrive: a wire event becomes a [`ValidEvent`]
//! or an error that names the field and what was expected.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use dialguard_proto::limits;

use dialguard_proto::v1::{ConnectionEvent, SocketAddress, Verdict};

use crate::finding::Cause;

#[derive(Debug, Clone)]
pub struct ValidEvent {
    pub raw: ConnectionEvent,
    pub original_destination: SocketAddr,
    pub upstream_host: Option<SocketAddr>,
    pub source: Option<SocketAddr>,
    pub verdict: Verdict,
    /// What the event supports as the cause: set by ingest once the
    /// verdict is final (`ingest::judge`), stored with the event.
    pub cause: Cause,
}

/// Every field an event can be refused for (the `reason` label values).
pub const CHECKED_FIELDS: [&str; 11] = [
    "sequence",
    "timestamp_unix_nanos",
    "original_destination",
    "upstream_host",
    "source",
    "verdict",
    "cluster_name",
    "filter_chain_name",
    "upstream_transport_failure_reason",
    "intended_service",
    "upstream_workload",
];

/// The times an event may carry, from the collector's clock: not further
/// ahead than the clock skew allowed, not older than what retention keeps
/// (an older event would be expired at once, and a timestamp of 0 or
/// 2^64-1 would pin a report row's first or last seen for good).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    pub earliest_ns: u64,
    pub latest_ns: u64,
}

impl TimeWindow {
    pub fn around(now_ns: u64, max_age: Duration, max_skew: Duration) -> Self {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Self {
            earliest_ns: now_ns.saturating_sub(nanos(max_age)),
            latest_ns: now_ns.saturating_add(nanos(max_skew)),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("events[{index}].{field}: {message}")]
pub struct EventError {
    pub index: usize,
    pub field: &'static str,
    pub message: String,
}

fn socket_addr(addr: &SocketAddress) -> Result<SocketAddr, String> {
    if addr.ip.len() > limits::IP {
        return Err(format!(
            "expected an IPv4 or IPv6 address, got {} bytes",
            addr.ip.len()
        ));
    }
    let ip: IpAddr = addr
        .ip
        .parse()
        .map_err(|_| format!("expected an IPv4 or IPv6 address, got {:?}", addr.ip))?;
    let port = u16::try_from(addr.port)
        .map_err(|_| format!("expected a port up to 65535, got {}", addr.port))?;
    Ok(SocketAddr::new(ip, port))
}

impl ValidEvent {
    /// Checks every field of the event at `index` of its batch; the
    /// sequence's order within its stream is checked by ingest.
    pub fn validate(
        index: usize,
        raw: ConnectionEvent,
        window: TimeWindow,
    ) -> Result<Self, EventError> {
        let fail = |field, message: String| EventError {
            index,
            field,
            message,
        };
        if !(1..=limits::MAX_SEQUENCE).contains(&raw.sequence) {
            return Err(fail(
                "sequence",
                format!(
                    "expected a sequence number from 1 to {}, got {}",
                    limits::MAX_SEQUENCE,
                    raw.sequence
                ),
            ));
        }
        let at = raw.timestamp_unix_nanos;
        if at < window.earliest_ns || at > window.latest_ns {
            return Err(fail(
                "timestamp_unix_nanos",
                format!(
                    "{at} ({}) is outside what the collector accepts, {} to {} \
                     (older than retention, or ahead of the collector's clock by \
                     more than the allowed skew)",
                    crate::time::rfc3339(at),
                    crate::time::rfc3339(window.earliest_ns),
                    crate::time::rfc3339(window.latest_ns),
                ),
            ));
        }
        for (field, value, max) in [
            ("cluster_name", &raw.cluster_name, limits::CLUSTER_NAME),
            (
                "filter_chain_name",
                &raw.filter_chain_name,
                limits::FILTER_CHAIN_NAME,
            ),
            (
                "upstream_transport_failure_reason",
                &raw.upstream_transport_failure_reason,
                limits::FAILURE_REASON,
            ),
            (
                "intended_service",
                &raw.intended_service,
                limits::INTENDED_SERVICE,
            ),
            (
                "upstream_workload",
                &raw.upstream_workload,
                limits::UPSTREAM_WORKLOAD,
            ),
        ] {
            if value.len() > max {
                return Err(fail(
                    field,
                    format!("{} bytes, expected at most {max}", value.len()),
                ));
            }
        }
        let original_destination = match &raw.original_destination {
            None => return Err(fail("original_destination", "required, missing".into())),
            Some(addr) => socket_addr(addr).map_err(|m| fail("original_destination", m))?,
        };
        let upstream_host = raw
            .upstream_host
            .as_ref()
            .map(socket_addr)
            .transpose()
            .map_err(|m| fail("upstream_host", m))?;
        let source = raw
            .source
            .as_ref()
            .map(socket_addr)
            .transpose()
            .map_err(|m| fail("source", m))?;
        let verdict = match Verdict::try_from(raw.verdict) {
            Ok(Verdict::Unspecified) | Err(_) => {
                return Err(fail(
                    "verdict",
                    format!("expected a known verdict (1 to 7), got {}", raw.verdict),
                ));
            }
            Ok(verdict) => verdict,
        };
        Ok(Self {
            raw,
            original_destination,
            upstream_host,
            source,
            verdict,
            cause: Cause::Unexplained,
        })
    }
}
