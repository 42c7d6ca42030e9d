//! The Envoy configurations under test: one sidecar topology, shaped as istiod
//! makes it (see `dialguard_tests::sidecar`), with each variant's filters put
//! into every outbound chain before `tcp_proxy`.
//!
//! Every variant runs the same listeners and clusters, so the only difference
//! between two rows of the table is the filter (or access logger) itself:
//!
//! - `virtualOutbound` (port 0 on 127.0.0.1) with the `proxy_protocol`
//!   listener filter and `use_original_dst`, its catch-all chain to
//!   `PassthroughCluster` (ORIGINAL_DST) and the `virtualOutbound-blackhole`
//!   chain for port 15001;
//! - `<VIP>_<port>` (`bind_to_port: false`) to the STATIC cluster
//!   `outbound|<port>||app.app.svc.cluster.local`;
//! - the catch-all `0.0.0.0_<port>` that an ExternalName Service makes istiod
//!   generate, whose default chain goes to the idle pod: a pod IP dialed on
//!   that port ends up there, which dialguard reports as misrouted.
//!
//! Unlike the end-to-end sidecar, no chain has a file access log, and the
//! catch-all's cluster is STATIC (no DNS refreshes during the measurement).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use dialguard_envoyfilter::{ModuleSource, collector_cluster, network_filter};
use dialguard_tests::sidecar::{COLLECTOR_CLUSTER, Layout, POD_CIDR, SERVICE_CIDR};
use serde_json::{Value, json};

/// The cluster Envoy's TCP gRPC access logger streams to (variant 5).
pub const SINK_CLUSTER: &str = "accesslog_sink";

/// What is measured, numbered as in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    /// (1) plain `tcp_proxy`.
    Plain,
    /// (2) an empty proxy-wasm filter, same SDK and profile as dialguard.
    EmptyWasm,
    /// (3) dialguard in audit mode, no mismatches (half VIP, half passthrough).
    DialguardAudit,
    /// (4) dialguard with every connection misrouted and reported.
    DialguardMisrouted,
    /// (5) Envoy's TCP gRPC access log, every connection to a gRPC sink.
    GrpcAccessLog,
    /// (6) as (3), with a heartbeat every second instead of every minute:
    /// what heartbeats cost, spread over the connections of the window.
    DialguardHeartbeat,
}

impl Variant {
    pub const ALL: [Self; 6] = [
        Self::Plain,
        Self::EmptyWasm,
        Self::DialguardAudit,
        Self::DialguardMisrouted,
        Self::GrpcAccessLog,
        Self::DialguardHeartbeat,
    ];

    pub fn number(self) -> u8 {
        match self {
            Self::Plain => 1,
            Self::EmptyWasm => 2,
            Self::DialguardAudit => 3,
            Self::DialguardMisrouted => 4,
            Self::GrpcAccessLog => 5,
            Self::DialguardHeartbeat => 6,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.number() == n)
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Plain => "plain tcp_proxy",
            Self::EmptyWasm => "empty proxy-wasm filter (same SDK, same profile)",
            Self::DialguardAudit => "dialguard audit, no mismatches",
            Self::DialguardMisrouted => "dialguard, every connection misrouted + reported",
            Self::GrpcAccessLog => "tcp_grpc access log, every connection to a sink",
            Self::DialguardHeartbeat => "as (3), heartbeat every 1 s (default 60 s)",
        }
    }

    /// The traffic the variant is driven with.
    pub fn traffic(self) -> Traffic {
        match self {
            Self::DialguardMisrouted => Traffic::Misrouted,
            _ => Traffic::Mixed,
        }
    }
}

/// Which addresses the connections dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// Even connections to the Service VIP, odd ones through passthrough.
    Mixed,
    /// Every connection to the peer pod IP, captured by the catch-all.
    Misrouted,
    /// [`Traffic::Mixed`], except one connection in `n` misrouted.
    MisroutedOneIn(u32),
}

impl Traffic {
    pub fn describe(self) -> String {
        match self {
            Self::Mixed => "1/2 to a Service VIP, 1/2 passthrough".to_owned(),
            Self::Misrouted => "all to a pod IP, captured by 0.0.0.0_<port>".to_owned(),
            Self::MisroutedOneIn(n) => format!("as (3), 1 in {n} misrouted"),
        }
    }
}

/// The addresses, taken from the end-to-end harness's incident layout.
#[derive(Debug, Clone)]
pub struct Topology {
    pub layout: Layout,
}

impl Topology {
    pub fn choose() -> anyhow::Result<Self> {
        Ok(Self {
            layout: Layout::choose()?,
        })
    }

    /// The application's own pod IP (the PROXY header's source).
    pub fn source(&self) -> IpAddr {
        IpAddr::V4(self.layout.own_pod)
    }

    /// A Service VIP; its listener's cluster leads to [`Self::vip_backend`].
    pub fn vip(&self) -> SocketAddr {
        self.layout.at(self.layout.app_vip)
    }

    pub fn vip_backend(&self) -> SocketAddr {
        self.layout.at(self.app_pod(0))
    }

    /// A pod on a port no listener covers: `PassthroughCluster`, upstream == dialed.
    pub fn passthrough(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.app_pod(1)), self.layout.passthrough_port)
    }

    /// A peer pod IP on the shared port: the catch-all sends it to [`Self::idle`].
    pub fn misrouted(&self) -> SocketAddr {
        self.layout.at(self.layout.peer_pod)
    }

    pub fn idle(&self) -> SocketAddr {
        self.layout.at(self.layout.idle_pod)
    }

    fn app_pod(&self, i: usize) -> Ipv4Addr {
        self.layout
            .app_pods
            .get(i)
            .copied()
            .unwrap_or(self.layout.own_pod)
    }

    /// Where the servers must listen.
    pub fn server_addresses(&self) -> [(&'static str, SocketAddr); 3] {
        [
            ("app-0 (VIP backend)", self.vip_backend()),
            ("app-1 (passthrough)", self.passthrough()),
            ("idle (catch-all)", self.idle()),
        ]
    }

    /// The address connection `i` dials, and whether it is meant to be misrouted.
    pub fn dial_target(&self, traffic: Traffic, i: u64) -> (SocketAddr, bool) {
        let mixed = if i % 2 == 0 {
            self.vip()
        } else {
            self.passthrough()
        };
        match traffic {
            Traffic::Mixed => (mixed, false),
            Traffic::Misrouted => (self.misrouted(), true),
            Traffic::MisroutedOneIn(n) if i % u64::from(n.max(1)) == u64::from(n.max(1)) - 1 => {
                (self.misrouted(), true)
            }
            Traffic::MisroutedOneIn(_) => (mixed, false),
        }
    }

    pub fn app_cluster(&self) -> String {
        self.layout.app_cluster()
    }

    pub fn catchall_cluster(&self) -> String {
        self.layout.app_ext_cluster()
    }
}

/// Where the variants' modules and receivers are.
#[derive(Debug, Clone)]
pub struct Endpoints<'a> {
    pub dialguard_module: &'a Path,
    pub empty_module: &'a Path,
    /// The collector's gRPC address (variants 3 and 4).
    pub collector: Option<SocketAddr>,
    /// The access log sink's address (variant 5).
    pub sink: Option<SocketAddr>,
}

/// dialguard's configuration in the benchmark: production defaults (audit,
/// 200 ms flush), the loopback Service and pod ranges.
pub fn dialguard_config() -> Value {
    json!({
        "mode": "audit",
        "collector": { "cluster": COLLECTOR_CLUSTER },
        "serviceCidrs": [SERVICE_CIDR],
        "podCidrs": [POD_CIDR],
    })
}

/// [`dialguard_config`] with heartbeats at the fastest allowed interval.
fn dialguard_heartbeat_config() -> Value {
    let mut config = dialguard_config();
    config["collector"]["heartbeatIntervalMs"] = json!(1_000);
    config
}

/// The empty module, configured exactly like dialguard's filter (same vm
/// settings, fail-open) but under its own name.
fn empty_filter(module: &Path) -> Value {
    let mut filter = network_filter(
        &json!({}),
        &ModuleSource::LocalFile(module.display().to_string()),
    );
    filter["name"] = json!("empty");
    let config = &mut filter["typed_config"]["config"];
    config["name"] = json!("empty");
    config["root_id"] = json!("empty");
    config["vm_config"]["vm_id"] = json!("empty");
    filter
}

/// The filters a variant puts before `tcp_proxy`, the access log it puts on
/// `tcp_proxy` and the clusters it adds.
#[derive(Debug, Clone, Default)]
struct Additions {
    filters: Vec<Value>,
    access_log: Option<Value>,
    clusters: Vec<Value>,
}

fn additions(variant: Variant, endpoints: &Endpoints<'_>) -> anyhow::Result<Additions> {
    Ok(match variant {
        Variant::Plain => Additions::default(),
        Variant::EmptyWasm => Additions {
            filters: vec![empty_filter(endpoints.empty_module)],
            ..Additions::default()
        },
        Variant::DialguardAudit | Variant::DialguardMisrouted | Variant::DialguardHeartbeat => {
            let collector = endpoints
                .collector
                .ok_or_else(|| anyhow::anyhow!("variant {} needs a collector", variant.number()))?;
            let config = if variant == Variant::DialguardHeartbeat {
                dialguard_heartbeat_config()
            } else {
                dialguard_config()
            };
            Additions {
                filters: vec![network_filter(
                    &config,
                    &ModuleSource::LocalFile(endpoints.dialguard_module.display().to_string()),
                )],
                access_log: None,
                clusters: vec![collector_cluster(
                    COLLECTOR_CLUSTER,
                    &collector.ip().to_string(),
                    collector.port(),
                )],
            }
        }
        Variant::GrpcAccessLog => {
            let sink = endpoints
                .sink
                .ok_or_else(|| anyhow::anyhow!("variant 5 needs the access log sink"))?;
            Additions {
                filters: Vec::new(),
                access_log: Some(json!({
                    "name": "envoy.access_loggers.tcp_grpc",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig",
                        "common_config": {
                            "log_name": "dialguard-bench",
                            "grpc_service": { "envoy_grpc": { "cluster_name": SINK_CLUSTER } },
                            "transport_api_version": "V3",
                        }
                    }
                })),
                // The same HTTP/2 cluster shape as the collector's.
                clusters: vec![collector_cluster(
                    SINK_CLUSTER,
                    &sink.ip().to_string(),
                    sink.port(),
                )],
            }
        }
    })
}

fn chain(name: Option<&str>, matcher: Option<Value>, cluster: &str, add: &Additions) -> Value {
    let mut tcp_proxy = json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
        }
    });
    if let Some(log) = &add.access_log {
        tcp_proxy["typed_config"]["access_log"] = json!([log]);
    }
    let mut filters = add.filters.clone();
    filters.push(tcp_proxy);
    let mut chain = json!({ "filters": filters });
    if let Some(name) = name {
        chain["name"] = json!(name);
    }
    if let Some(matcher) = matcher {
        chain["filter_chain_match"] = matcher;
    }
    chain
}

/// One endpoint, through the harness's cluster shape.
fn static_cluster(name: &str, service: (&str, &str), endpoint: SocketAddr) -> Value {
    dialguard_tests::sidecar::static_cluster(name, service, &[endpoint])
}

/// The whole bootstrap for `variant`.
pub fn bootstrap(
    topology: &Topology,
    variant: Variant,
    endpoints: &Endpoints<'_>,
) -> anyhow::Result<Value> {
    let add = additions(variant, endpoints)?;
    let layout = &topology.layout;
    let port = layout.port;
    let listener = |name: String, ip: String, chains: Vec<Value>| {
        json!({
            "name": name,
            "address": { "socket_address": { "address": ip, "port_value": port }},
            "filter_chains": chains,
            "traffic_direction": "OUTBOUND",
            "bind_to_port": false,
        })
    };
    let vip = layout.app_vip;
    let mut bootstrap = json!({
        "node": dialguard_tests::sidecar::node(layout),
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 }}},
        "static_resources": {
            "listeners": [
                dialguard_tests::sidecar::virtual_outbound(vec![
                    chain(Some("virtualOutbound-blackhole"), Some(json!({ "destination_port": 15001 })), "BlackHoleCluster", &add),
                    chain(Some("virtualOutbound-catchall-tcp"), None, "PassthroughCluster", &add),
                ]),
                listener(format!("{vip}_{port}"), vip.to_string(),
                         vec![chain(None, None, &topology.app_cluster(), &add)]),
                listener(format!("0.0.0.0_{port}"), "0.0.0.0".to_owned(), vec![
                    chain(None, Some(json!({ "prefix_ranges": [{ "address_prefix": layout.own_pod.to_string(), "prefix_len": 32 }] })),
                          "BlackHoleCluster", &add),
                    chain(None, None, &topology.catchall_cluster(), &add),
                ]),
            ],
            "clusters": [
                { "name": "PassthroughCluster", "type": "ORIGINAL_DST", "connect_timeout": "1s", "lb_policy": "CLUSTER_PROVIDED" },
                { "name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "1s" },
                static_cluster(&topology.app_cluster(), ("app.app.svc.cluster.local", "app"), topology.vip_backend()),
                static_cluster(&topology.catchall_cluster(), ("app-ext.app.svc.cluster.local", "app"), topology.idle()),
            ]
        }
    });
    if let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut() {
        clusters.extend(add.clusters);
    }
    Ok(bootstrap)
}
