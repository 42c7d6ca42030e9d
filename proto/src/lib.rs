//! `dialguard-proto`: the wire contract between the dialguard filter (a
//! proxy-wasm module in every sidecar) and the dialguard collector.
//!
//! The messages are plain prost types usable inside wasm; the tonic client and
//! server for the `Collector` service come with the `grpc` feature.

/// Package `dialguard.v1`.
pub mod v1 {
    #![allow(missing_debug_implementations, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/dialguard.v1.rs"));
}

impl v1::SocketAddress {
    /// Builds the wire form of an IP socket address.
    pub fn from_socket_addr(addr: std::net::SocketAddr) -> Self {
        Self {
            ip: addr.ip().to_string(),
            port: u32::from(addr.port()),
        }
    }
}

impl v1::Verdict {
    /// The lower-case name used in reports and alerts ("misrouted").
    pub fn label(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Match => "match",
            Self::Service => "service",
            Self::Allowed => "allowed",
            Self::Misrouted => "misrouted",
            Self::Blackholed => "blackholed",
            Self::Redirected => "redirected",
            Self::Resolved => "resolved",
        }
    }
}
