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

impl v1::ConnectionCounters {
    /// The count of one verdict (0 for `Unspecified`).
    pub fn of(&self, verdict: v1::Verdict) -> u64 {
        match verdict {
            v1::Verdict::Unspecified => 0,
            v1::Verdict::Match => self.r#match,
            v1::Verdict::Service => self.service,
            v1::Verdict::Allowed => self.allowed,
            v1::Verdict::Misrouted => self.misrouted,
            v1::Verdict::Blackholed => self.blackholed,
            v1::Verdict::Redirected => self.redirected,
            v1::Verdict::Resolved => self.resolved,
        }
    }

    /// The counter of one verdict, to add to (`None` for `Unspecified`).
    pub fn of_mut(&mut self, verdict: v1::Verdict) -> Option<&mut u64> {
        match verdict {
            v1::Verdict::Unspecified => None,
            v1::Verdict::Match => Some(&mut self.r#match),
            v1::Verdict::Service => Some(&mut self.service),
            v1::Verdict::Allowed => Some(&mut self.allowed),
            v1::Verdict::Misrouted => Some(&mut self.misrouted),
            v1::Verdict::Blackholed => Some(&mut self.blackholed),
            v1::Verdict::Redirected => Some(&mut self.redirected),
            v1::Verdict::Resolved => Some(&mut self.resolved),
        }
    }
}

impl v1::Build {
    /// The lower-case name used in reports ("audit", "enforce").
    pub fn label(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Audit => "audit",
            Self::Enforce => "enforce",
        }
    }
}
