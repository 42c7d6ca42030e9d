//! Validation of events as they arrive: a wire event becomes a [`ValidEvent`]
//! or an error that names the field and what was expected.

use std::net::{IpAddr, SocketAddr};

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
pub const CHECKED_FIELDS: [&str; 5] = [
    "sequence",
    "original_destination",
    "upstream_host",
    "source",
    "verdict",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("events[{index}].{field}: {message}")]
pub struct EventError {
    pub index: usize,
    pub field: &'static str,
    pub message: String,
}

fn socket_addr(addr: &SocketAddress) -> Result<SocketAddr, String> {
    let ip: IpAddr = addr
        .ip
        .parse()
        .map_err(|_| format!("expected an IPv4 or IPv6 address, got {:?}", addr.ip))?;
    let port = u16::try_from(addr.port)
        .map_err(|_| format!("expected a port up to 65535, got {}", addr.port))?;
    Ok(SocketAddr::new(ip, port))
}

impl ValidEvent {
    pub fn validate(index: usize, raw: ConnectionEvent) -> Result<Self, EventError> {
        let fail = |field, message: String| EventError {
            index,
            field,
            message,
        };
        if raw.sequence == 0 {
            return Err(fail(
                "sequence",
                "expected a sequence number from 1, got 0".into(),
            ));
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
