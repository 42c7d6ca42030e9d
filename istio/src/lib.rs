//! `dialguard-istio`: the names istiod gives the clusters, filter chains and
//! ports of a sidecar's Envoy configuration, and the shape of its outbound
//! cluster names. One home for what the collector's causes
//! (`collector/src/finding.rs`) and the config-dump analysis
//! (`envoyfilter/src/analyze.rs`) both read, so the two cannot disagree.

/// The cluster Istio sends traffic to unknown destinations through
/// (`ORIGINAL_DST`: to exactly the address the application dialed).
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// The cluster Istio sends traffic it must drop to.
pub const BLACK_HOLE_CLUSTER: &str = "BlackHoleCluster";
/// The `virtualOutbound` chain for destinations no listener matches.
pub const CATCHALL_CHAIN: &str = "virtualOutbound-catchall-tcp";
/// The `virtualOutbound` chain for connections to the capture port itself.
pub const BLACKHOLE_CHAIN: &str = "virtualOutbound-blackhole";
/// The port istio-iptables redirects outbound traffic to.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;

/// `outbound|<port>|<subset>|<host>`: the parts of an Istio outbound cluster name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundCluster<'a> {
    pub port: &'a str,
    pub subset: &'a str,
    pub host: &'a str,
}

impl<'a> OutboundCluster<'a> {
    /// The parts of `cluster`; `None` for any other name (inbound clusters,
    /// `BlackHoleCluster`, an empty host, a fifth part).
    pub fn parse(cluster: &'a str) -> Option<Self> {
        let mut parts = cluster.split('|');
        let (Some("outbound"), Some(port), Some(subset), Some(host), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        (!host.is_empty()).then_some(Self { port, subset, host })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_cluster_names() {
        assert_eq!(
            OutboundCluster::parse("outbound|9080|v1|reviews.default.svc.cluster.local"),
            Some(OutboundCluster {
                port: "9080",
                subset: "v1",
                host: "reviews.default.svc.cluster.local"
            })
        );
        assert_eq!(
            OutboundCluster::parse("outbound|5701||app-ext.app.svc.cluster.local").map(|c| c.host),
            Some("app-ext.app.svc.cluster.local")
        );
        for bad in [
            "",
            "BlackHoleCluster",
            "outbound|1||",
            "inbound|1||x",
            "inbound|5701|tcp|x.y.svc.cluster.local",
            "outbound|1||x|y",
        ] {
            assert_eq!(OutboundCluster::parse(bad), None, "{bad}");
        }
    }
}
