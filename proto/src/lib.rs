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

/// What the collector accepts in each field: lengths in bytes of UTF-8,
/// counts in elements. They follow what Kubernetes and Istio allow, with
/// room to spare, so a real sidecar never meets them; a `hello` over one is
/// refused (INVALID_ARGUMENT naming the field), an event over one is
/// refused in its batch's ack.
pub mod limits {
    /// Envoy's node id, `sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN`.
    pub const NODE_ID: usize = 1024;
    /// The filter's own id of a VM (a few dozen characters).
    pub const VM_INSTANCE: usize = 128;
    /// A pod name: a DNS subdomain (RFC 1123), as Kubernetes bounds it.
    pub const POD_NAME: usize = 253;
    /// A namespace: a DNS label.
    pub const NAMESPACE: usize = 63;
    /// Istio's WORKLOAD_NAME: a Kubernetes object name.
    pub const WORKLOAD_NAME: usize = 253;
    /// Istio's INSTANCE_IPS: a pod has one address per IP family; a few
    /// more leave room for multi-network setups.
    pub const INSTANCE_IPS: usize = 8;
    /// One address of INSTANCE_IPS (the longest IPv6 text is 45).
    pub const IP: usize = 45;
    /// Istio's CLUSTER_ID (a cluster name).
    pub const CLUSTER_ID: usize = 253;
    /// ISTIO_VERSION and the filter's version.
    pub const VERSION: usize = 64;
    /// An Envoy cluster name; Istio's `outbound|PORT|SUBSET|HOST` stays
    /// under 340 bytes.
    pub const CLUSTER_NAME: usize = 512;
    /// An Envoy filter chain name, e.g. `0.0.0.0_5701`.
    pub const FILTER_CHAIN_NAME: usize = 512;
    /// Envoy's upstream transport failure reason (a TLS error text).
    pub const FAILURE_REASON: usize = 1024;
    /// A service host name (a DNS name).
    pub const INTENDED_SERVICE: usize = 253;
    /// Istio's `istio.workload` metadata, five names joined by `;`.
    pub const UPSTREAM_WORKLOAD: usize = 1024;
    /// The highest event sequence number (sequences are stored as signed
    /// 64-bit integers).
    pub const MAX_SEQUENCE: u64 = i64::MAX as u64;
}
