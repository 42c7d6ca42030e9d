//! What a reported connection means: its root cause, the object to change
//! and the fix. One home for the words that the report (every format), the
//! alert line, the Alertmanager annotations and the metrics share.

use serde::{Deserialize, Serialize};

/// Why a reported connection went where it did, as far as its event shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A pod IP captured by a wildcard `0.0.0.0_<port>` listener (an
    /// ExternalName Service or an address-less ServiceEntry declaring the
    /// port) and sent to that service's cluster.
    CatchAll,
    /// `outboundTrafficPolicy: REGISTRY_ONLY`: the passthrough chain
    /// `virtualOutbound-catchall-tcp` sends unknown destinations to
    /// `BlackHoleCluster` by policy.
    PolicyBlock,
    /// A cluster was chosen but had no endpoint to connect to.
    NoEndpoints,
    /// The application dialed its own pod IP on a port that has a catch-all
    /// listener (Istio's own-IP chain leads to `BlackHoleCluster`).
    OwnPodIp,
    /// A connection to the sidecar's own outbound port 15001
    /// (`virtualOutbound-blackhole`).
    ProxyLoop,
    /// An address not known as a pod, sent to the addresses of a DNS name:
    /// DNS load balancing over the same name, or an external host captured
    /// by that name's catch-all listener.
    DnsRedirection,
    /// Nothing in the event supports one of the causes above.
    #[default]
    Unexplained,
}

/// The Kubernetes or Istio object to change, and how to look at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Culprit {
    /// `Service`, `ServiceEntry`, `Sidecar`, ...
    pub kind: String,
    /// Empty when the event does not tell (e.g. a ServiceEntry's namespace).
    pub namespace: String,
    /// Empty when the event does not tell (e.g. a ServiceEntry's name).
    pub name: String,
    /// A read-only command that shows it, e.g. `kubectl -n app get service app-ext -o yaml`.
    pub inspect: String,
}
