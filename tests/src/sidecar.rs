//! An Envoy 1.40 shaped like the incident's istio-proxy, on loopback.
//!
//! Names and shapes follow what istiod generates (see
//! ../shared/testdata/istio/): `virtualOutbound` with `use_original_dst` and
//! the `virtualOutbound-blackhole` / `virtualOutbound-catchall-tcp` chains;
//! per-service listeners `<VIP>_<port>` with `bind_to_port: false`; the
//! catch-all `0.0.0.0_<port>` that an ExternalName Service declaring the port
//! produces (own-IP chain to `BlackHoleCluster`, default chain to a
//! STRICT_DNS `outbound|<port>||app-ext.app.svc.cluster.local`);
//! `PassthroughCluster` (ORIGINAL_DST) and `BlackHoleCluster`; node metadata
//! as the sidecar injector sets it. Differences, all forced by running without
//! Kubernetes: EDS clusters are STATIC with the same endpoints; pods, VIPs and
//! the idle pod are loopback addresses; the `original_dst` listener filter is
//! replaced by `proxy_protocol` (see [`crate::client`]). With
//! [`Capture::Iptables`] the same sidecar is built for a pod network namespace
//! ([`crate::netns`]): `virtualOutbound` on 15001 and `virtualInbound` on 15006
//! as istiod generates them, fed by istio-iptables' REDIRECT rules.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use dialguard_envoyfilter::{ModuleSource, collector_cluster, network_filter};
use serde_json::{Value, json};

use crate::process::{ChildGuard, piped, tee_lines};

pub const SERVICE_CIDR: &str = "127.96.0.0/16";
pub const POD_CIDR: &str = "127.0.0.0/16";
pub const COLLECTOR_CLUSTER: &str = "dialguard_collector";

/// Addresses of the incident, mapped onto loopback.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The TCP port the services share (Hazelcast's 5701 in the field report).
    pub port: u16,
    /// A port no listener covers: traffic to it takes `PassthroughCluster`.
    pub passthrough_port: u16,
    /// The port of a TCP ServiceEntry with `resolution: DNS` and no
    /// `addresses` (`mongo.external.example.com`), which the app pods also
    /// serve on: the second catch-all shape.
    pub dns_port: u16,
    /// Where `mongo.external.example.com` resolves.
    pub external_db: Ipv4Addr,
    /// The manager pod whose sidecar this is.
    pub own_pod: Ipv4Addr,
    /// Its name (Kubernetes' `<deployment>-<hash>-<suffix>`).
    pub own_pod_name: &'static str,
    /// The other manager pod, which Hazelcast dials directly.
    pub peer_pod: Ipv4Addr,
    /// The `idle` pod behind `idle.manager.svc.cluster.local`.
    pub idle_pod: Ipv4Addr,
    pub app_pods: [Ipv4Addr; 2],
    pub manager_vip: Ipv4Addr,
    pub app_vip: Ipv4Addr,
    /// The port of `api.example.com`, a TCP ServiceEntry with `resolution:
    /// DNS` and no `addresses` whose name has several A records: DNS load
    /// balancing, which must never look like a misroute.
    pub api_port: u16,
    /// The A records of `api.example.com`, outside the pod and Service ranges.
    pub api_records: [Ipv4Addr; 3],
    /// The port of `peers-ext`, an ExternalName Service that aliases a
    /// headless Service: its catch-all's DNS name resolves to pod IPs.
    pub peers_port: u16,
    /// The pods behind the headless Service.
    pub peer_set: [Ipv4Addr; 3],
}

impl Layout {
    /// The incident's addresses, with ports free on every one of them.
    pub fn choose() -> anyhow::Result<Self> {
        let mut layout = Self {
            port: 0,
            passthrough_port: 0,
            dns_port: 0,
            external_db: Ipv4Addr::new(127, 0, 3, 10),
            own_pod: Ipv4Addr::new(127, 0, 1, 6),
            own_pod_name: MANAGER_POD,
            peer_pod: Ipv4Addr::new(127, 0, 1, 7),
            idle_pod: Ipv4Addr::new(127, 0, 1, 9),
            app_pods: [Ipv4Addr::new(127, 0, 2, 4), Ipv4Addr::new(127, 0, 2, 5)],
            manager_vip: Ipv4Addr::new(127, 96, 0, 20),
            app_vip: Ipv4Addr::new(127, 96, 3, 4),
            api_port: 0,
            api_records: [
                Ipv4Addr::new(127, 1, 0, 10),
                Ipv4Addr::new(127, 1, 0, 11),
                Ipv4Addr::new(127, 1, 0, 12),
            ],
            peers_port: 0,
            peer_set: [
                Ipv4Addr::new(127, 0, 4, 1),
                Ipv4Addr::new(127, 0, 4, 2),
                Ipv4Addr::new(127, 0, 4, 3),
            ],
        };
        layout.port = free_port_on(&layout.pod_ips())?;
        layout.passthrough_port = free_port_on(&layout.pod_ips())?;
        layout.dns_port = free_port_on(&layout.pod_ips())?;
        layout.api_port = free_port_on(&layout.api_records)?;
        layout.peers_port = free_port_on(&layout.peer_set)?;
        Ok(layout)
    }

    /// The incident's addresses as a cluster would have them (pod CIDR
    /// 10.244.0.0/16, Service CIDR 10.96.0.0/12, an external host in
    /// TEST-NET-1) and the field report's ports, for pods that are network
    /// namespaces of their own ([`crate::netns`]), where every port is free.
    pub fn pod_network() -> Self {
        Self {
            port: 5701,
            passthrough_port: 8080,
            dns_port: 27017,
            external_db: Ipv4Addr::new(192, 0, 2, 10),
            own_pod: Ipv4Addr::new(10, 244, 1, 6),
            own_pod_name: MANAGER_POD,
            peer_pod: Ipv4Addr::new(10, 244, 1, 7),
            idle_pod: Ipv4Addr::new(10, 244, 1, 9),
            app_pods: [Ipv4Addr::new(10, 244, 2, 4), Ipv4Addr::new(10, 244, 2, 5)],
            manager_vip: Ipv4Addr::new(10, 96, 0, 20),
            app_vip: Ipv4Addr::new(10, 96, 3, 4),
            api_port: 8443,
            api_records: [
                Ipv4Addr::new(192, 0, 2, 20),
                Ipv4Addr::new(192, 0, 2, 21),
                Ipv4Addr::new(192, 0, 2, 22),
            ],
            peers_port: 7800,
            peer_set: [
                Ipv4Addr::new(10, 244, 4, 1),
                Ipv4Addr::new(10, 244, 4, 2),
                Ipv4Addr::new(10, 244, 4, 3),
            ],
        }
    }

    /// The same incident seen from the other manager pod: its sidecar has
    /// the same listeners (istiod gives both replicas one configuration),
    /// and its own IP is the peer's.
    pub fn as_peer(&self) -> Self {
        Self {
            own_pod: self.peer_pod,
            peer_pod: self.own_pod,
            own_pod_name: if self.own_pod_name == MANAGER_POD {
                PEER_POD
            } else {
                MANAGER_POD
            },
            ..self.clone()
        }
    }

    /// Every pod server of the incident, by name (the name it answers with)
    /// and address: the manager pods, `idle`, the external database and the
    /// app pods on the shared, the passthrough and the DNS ServiceEntry port.
    pub fn pod_servers(&self) -> Vec<(String, SocketAddr)> {
        let mut servers = vec![
            ("manager-0 (this pod)".to_owned(), self.at(self.own_pod)),
            ("manager-1".to_owned(), self.at(self.peer_pod)),
            ("idle".to_owned(), self.at(self.idle_pod)),
            (
                "mongo (external)".to_owned(),
                SocketAddr::new(IpAddr::V4(self.external_db), self.dns_port),
            ),
        ];
        for (i, ip) in self.app_pods.iter().enumerate() {
            servers.push((format!("app-{i}"), self.at(*ip)));
            for port in [self.passthrough_port, self.dns_port] {
                servers.push((
                    format!("app-{i} (port {port})"),
                    SocketAddr::new(IpAddr::V4(*ip), port),
                ));
            }
        }
        servers
    }

    pub fn pod_ips(&self) -> Vec<Ipv4Addr> {
        let mut ips = vec![self.own_pod, self.peer_pod, self.idle_pod, self.external_db];
        ips.extend(self.app_pods);
        ips
    }

    pub fn at(&self, ip: Ipv4Addr) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(ip), self.port)
    }

    pub fn manager_cluster(&self) -> String {
        format!("outbound|{}||manager.manager.svc.cluster.local", self.port)
    }
    pub fn app_cluster(&self) -> String {
        format!("outbound|{}||app.app.svc.cluster.local", self.port)
    }
    pub fn mongo_cluster(&self) -> String {
        format!("outbound|{}||mongo.external.example.com", self.dns_port)
    }
    pub fn app_ext_cluster(&self) -> String {
        format!("outbound|{}||app-ext.app.svc.cluster.local", self.port)
    }
    pub fn api_cluster(&self) -> String {
        format!("outbound|{}||api.example.com", self.api_port)
    }
    pub fn peers_cluster(&self) -> String {
        format!(
            "outbound|{}||peers-ext.app.svc.cluster.local",
            self.peers_port
        )
    }
}

/// A port that is free on each of `ips` (bound and released; loopback only).
fn free_port_on(ips: &[Ipv4Addr]) -> anyhow::Result<u16> {
    for _ in 0..50 {
        let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = probe.local_addr()?.port();
        drop(probe);
        if ips
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return Ok(port);
        }
    }
    bail!("no port free on all of {ips:?}")
}

/// The dialguard filter configuration used by the sidecar.
pub fn filter_config() -> Value {
    filter_config_with(SERVICE_CIDR, POD_CIDR)
}

/// The same configuration for a cluster with the given Service and pod ranges.
pub fn filter_config_with(service_cidr: &str, pod_cidr: &str) -> Value {
    json!({
        "mode": "audit",
        "collector": { "cluster": COLLECTOR_CLUSTER, "flushIntervalMs": 100 },
        "serviceCidrs": [service_cidr],
        "podCidrs": [pod_cidr],
    })
}

fn tcp_proxy(cluster: &str, access_log: &Path) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log,
                    "log_format": { "text_format_source": { "inline_string":
                        "dialed=%DOWNSTREAM_LOCAL_ADDRESS% upstream=%UPSTREAM_HOST% cluster=%UPSTREAM_CLUSTER% flags=%RESPONSE_FLAGS%\n"
                    }}
                }
            }]
        }
    })
}

/// An outbound filter chain: dialguard before tcp_proxy, as the rollout inserts it.
fn chain(
    name: Option<&str>,
    matcher: Option<Value>,
    cluster: &str,
    dialguard: &Value,
    log: &Path,
) -> Value {
    let mut chain = json!({ "filters": [dialguard, tcp_proxy(cluster, log)] });
    if let Some(name) = name {
        chain["name"] = json!(name);
    }
    if let Some(matcher) = matcher {
        chain["filter_chain_match"] = matcher;
    }
    chain
}

/// A STATIC cluster (Istio's EDS clusters here) with `istio.services` metadata.
pub fn static_cluster(name: &str, service: (&str, &str), endpoints: &[SocketAddr]) -> Value {
    let (host, namespace) = service;
    let short = host.split('.').next().unwrap_or(host);
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": { "cluster_name": name, "endpoints": [{ "lb_endpoints":
            endpoints.iter().map(|a| json!({ "endpoint": { "address": { "socket_address": {
                "address": a.ip().to_string(), "port_value": a.port() }}}})).collect::<Vec<_>>()
        }]},
        "metadata": { "filter_metadata": { "istio": {
            "services": [{ "host": host, "name": short, "namespace": namespace }],
            "default_original_port": endpoints.first().map_or(0, |a| a.port()),
        }}}
    })
}

/// The manager pod's Envoy node, with the metadata the sidecar injector sets.
pub fn node(layout: &Layout) -> Value {
    let pod = pod_identity(layout);
    json!({
        "id": format!("sidecar~{}~{}.manager~manager.svc.cluster.local", layout.own_pod, pod),
        "cluster": "manager.manager",
        "metadata": {
            "NAME": pod,
            "NAMESPACE": "manager",
            "WORKLOAD_NAME": "manager",
            "INSTANCE_IPS": layout.own_pod.to_string(),
            "CLUSTER_ID": "Kubernetes",
            "ISTIO_VERSION": "1.24.2",
            "LABELS": { "app": "manager" },
        }
    })
}

/// How the application's connections reach `virtualOutbound`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// On loopback: the client connects to `virtualOutbound` (any port) and
    /// states the dialed address in a PROXY protocol header.
    ProxyProtocol,
    /// In a pod network namespace: istio-iptables REDIRECTs outbound TCP to
    /// 15001 (and Envoy's own connections to the pod's IP to 15006), and
    /// the listeners recover the dialed address from the socket.
    Iptables,
}

/// `virtualOutbound` (15001 in a pod; any loopback port here): PROXY protocol
/// restores the dialed address, `use_original_dst` hands the connection to
/// the listener for it; `chains` take what no listener does.
pub fn virtual_outbound(chains: Vec<Value>) -> Value {
    virtual_outbound_for(Capture::ProxyProtocol, chains)
}

/// `virtualOutbound` for `capture`. Under iptables it is exactly istiod's:
/// 0.0.0.0:15001 with `use_original_dst` and no listener filter at all,
/// because Envoy itself adds `envoy.filters.listener.original_dst` to a
/// listener with `use_original_dst` (../shared/testdata/istio/ has none either).
pub fn virtual_outbound_for(capture: Capture, chains: Vec<Value>) -> Value {
    let mut listener = json!({
        "name": "virtualOutbound",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 }},
        "filter_chains": chains,
        "use_original_dst": true,
        "traffic_direction": "OUTBOUND",
    });
    match capture {
        Capture::ProxyProtocol => {
            listener["listener_filters"] = json!([{
                "name": "envoy.filters.listener.proxy_protocol",
                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol" }
            }]);
        }
        Capture::Iptables => {
            listener["address"] =
                json!({ "socket_address": { "address": "0.0.0.0", "port_value": 15001 }});
        }
    }
    listener
}

/// `virtualInbound` on 15006, as istiod makes it for TCP: the explicit
/// `original_dst` listener filter, a loop guard to `BlackHoleCluster`, and
/// plain TCP to `InboundPassthroughClusterIpv4`. Only iptables capture needs
/// it: when a Service VIP is balanced to this very pod, Envoy's upstream
/// connection to the pod's own IP is redirected here (istio-iptables'
/// `ISTIO_IN_REDIRECT` for uid 1337 over `lo`). No dialguard: it is outbound only.
fn virtual_inbound(access_log: &Path) -> Value {
    json!({
        "name": "virtualInbound",
        "address": { "socket_address": { "address": "0.0.0.0", "port_value": 15006 }},
        "listener_filters": [{
            "name": "envoy.filters.listener.original_dst",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst" }
        }],
        "filter_chains": [
            { "name": "virtualInbound-blackhole", "filter_chain_match": { "destination_port": 15006 },
              "filters": [tcp_proxy("BlackHoleCluster", access_log)] },
            { "name": "virtualInbound",
              "filter_chain_match": { "prefix_ranges": [{ "address_prefix": "0.0.0.0", "prefix_len": 0 }] },
              "filters": [tcp_proxy(INBOUND_PASSTHROUGH, access_log)] },
        ],
        "traffic_direction": "INBOUND",
    })
}

const INBOUND_PASSTHROUGH: &str = "InboundPassthroughClusterIpv4";

/// Inbound passthrough connects from 127.0.0.6, the source istio-iptables
/// lets through (`-o lo -s 127.0.0.6/32 -j RETURN`) instead of capturing again.
fn inbound_passthrough_cluster() -> Value {
    json!({
        "name": INBOUND_PASSTHROUGH,
        "type": "ORIGINAL_DST",
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "upstream_bind_config": { "source_address": { "address": "127.0.0.6", "port_value": 0 }},
    })
}

/// What installing dialguard adds to a sidecar: the network filter that goes
/// before `tcp_proxy` in every outbound chain, and the clusters it needs.
#[derive(Debug, Clone)]
pub struct Install {
    pub filter: Value,
    pub clusters: Vec<Value>,
}

impl Install {
    /// The module from a local file, streaming to the collector at `collector`.
    pub fn local(module: &Path, filter_config: &Value, collector: SocketAddr) -> Self {
        Self {
            filter: network_filter(
                filter_config,
                &ModuleSource::LocalFile(module.display().to_string()),
            ),
            clusters: vec![collector_cluster(
                COLLECTOR_CLUSTER,
                &collector.ip().to_string(),
                collector.port(),
            )],
        }
    }

    /// Exactly what a rendered `EnvoyFilter` patches in, as istiod applies it:
    /// the `INSERT_BEFORE` value of its `NETWORK_FILTER` patch and the `ADD`
    /// values of its `CLUSTER` patches.
    pub fn from_envoy_filter(envoy_filter: &Value) -> anyhow::Result<Self> {
        let patches = envoy_filter["spec"]["configPatches"]
            .as_array()
            .context("EnvoyFilter without spec.configPatches")?;
        let mut filter = None;
        let mut clusters = Vec::new();
        for patch in patches {
            let value = patch["patch"]["value"].clone();
            match (
                patch["applyTo"].as_str(),
                patch["patch"]["operation"].as_str(),
            ) {
                (Some("NETWORK_FILTER"), Some("INSERT_BEFORE")) => filter = Some(value),
                (Some("CLUSTER"), Some("ADD")) => clusters.push(value),
                other => bail!("unexpected patch {other:?}"),
            }
        }
        let filter = filter.context("EnvoyFilter without a NETWORK_FILTER patch")?;
        Ok(Self { filter, clusters })
    }
}

/// The whole bootstrap of the manager pod's sidecar with dialguard installed.
pub fn bootstrap(layout: &Layout, install: &Install, access_log: &Path) -> Value {
    bootstrap_for(Capture::ProxyProtocol, layout, install, access_log)
}

/// The same sidecar for `capture`; with [`Capture::Iptables`] also the
/// inbound side a pod's own traffic comes back through, and the admin
/// endpoint on istio-proxy's 127.0.0.1:15000.
pub fn bootstrap_for(
    capture: Capture,
    layout: &Layout,
    install: &Install,
    access_log: &Path,
) -> Value {
    let dialguard = &install.filter;
    let port = layout.port;
    let listener = |name: String, ip: &str, chains: Vec<Value>| {
        json!({
            "name": name,
            "address": { "socket_address": { "address": ip, "port_value": port }},
            "filter_chains": chains,
            "traffic_direction": "OUTBOUND",
            "bind_to_port": false,
        })
    };
    let vip_listener = |vip: Ipv4Addr, cluster: String| {
        listener(
            format!("{vip}_{port}"),
            &vip.to_string(),
            vec![chain(None, None, &cluster, dialguard, access_log)],
        )
    };
    let mut bootstrap = json!({
        "node": node(layout),
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 }}},
        "static_resources": {
            "listeners": [
                virtual_outbound_for(capture, vec![
                    chain(Some("virtualOutbound-blackhole"), Some(json!({ "destination_port": 15001 })), "BlackHoleCluster", dialguard, access_log),
                    chain(Some("virtualOutbound-catchall-tcp"), None, "PassthroughCluster", dialguard, access_log),
                ]),
                vip_listener(layout.manager_vip, layout.manager_cluster()),
                vip_listener(layout.app_vip, layout.app_cluster()),
                // What the ExternalName Service `app-ext` (port 5701) made istiod generate.
                listener(format!("0.0.0.0_{port}"), "0.0.0.0", vec![
                    chain(None, Some(json!({ "prefix_ranges": [{ "address_prefix": layout.own_pod.to_string(), "prefix_len": 32 }] })),
                          "BlackHoleCluster", dialguard, access_log),
                    chain(None, None, &layout.app_ext_cluster(), dialguard, access_log),
                ]),
                // What a TCP ServiceEntry with `resolution: DNS` and no
                // `addresses` on a port the app pods also use generates.
                {
                    "name": format!("0.0.0.0_{}", layout.dns_port),
                    "address": { "socket_address": { "address": "0.0.0.0", "port_value": layout.dns_port }},
                    "filter_chains": [chain(None, None, &layout.mongo_cluster(), dialguard, access_log)],
                    "traffic_direction": "OUTBOUND",
                    "bind_to_port": false,
                },
                // The same for `api.example.com`, whose name has three A records.
                {
                    "name": format!("0.0.0.0_{}", layout.api_port),
                    "address": { "socket_address": { "address": "0.0.0.0", "port_value": layout.api_port }},
                    "filter_chains": [chain(None, None, &layout.api_cluster(), dialguard, access_log)],
                    "traffic_direction": "OUTBOUND",
                    "bind_to_port": false,
                },
                // What the ExternalName Service `peers-ext` (aliasing a headless Service) generates.
                {
                    "name": format!("0.0.0.0_{}", layout.peers_port),
                    "address": { "socket_address": { "address": "0.0.0.0", "port_value": layout.peers_port }},
                    "filter_chains": [
                        chain(None, Some(json!({ "prefix_ranges": [{ "address_prefix": layout.own_pod.to_string(), "prefix_len": 32 }] })),
                              "BlackHoleCluster", dialguard, access_log),
                        chain(None, None, &layout.peers_cluster(), dialguard, access_log),
                    ],
                    "traffic_direction": "OUTBOUND",
                    "bind_to_port": false,
                },
            ],
            "clusters": [
                { "name": "PassthroughCluster", "type": "ORIGINAL_DST", "connect_timeout": "1s", "lb_policy": "CLUSTER_PROVIDED" },
                { "name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "1s" },
                static_cluster(&layout.manager_cluster(), ("manager.manager.svc.cluster.local", "manager"),
                               &[layout.at(layout.own_pod), layout.at(layout.peer_pod)]),
                static_cluster(&layout.app_cluster(), ("app.app.svc.cluster.local", "app"),
                               &layout.app_pods.map(|ip| layout.at(ip))),
                app_ext_cluster(layout),
                mongo_cluster(layout),
                dns_cluster(&layout.api_cluster(), ("api.example.com", "app"),
                            &layout.api_records.map(|ip| SocketAddr::new(IpAddr::V4(ip), layout.api_port))),
                dns_cluster(&layout.peers_cluster(), ("peers-ext.app.svc.cluster.local", "app"),
                            &layout.peer_set.map(|ip| SocketAddr::new(IpAddr::V4(ip), layout.peers_port))),
            ]
        }
    });
    if let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut() {
        clusters.extend(install.clusters.iter().cloned());
        if capture == Capture::Iptables {
            clusters.push(inbound_passthrough_cluster());
        }
    }
    if capture == Capture::Iptables {
        if let Some(listeners) = bootstrap["static_resources"]["listeners"].as_array_mut() {
            listeners.push(virtual_inbound(access_log));
        }
        bootstrap["admin"]["address"]["socket_address"]["port_value"] = json!(15000);
    }
    bootstrap
}

/// The DNS ServiceEntry's cluster: STRICT_DNS to its host, here the literal
/// address it would resolve to.
fn mongo_cluster(layout: &Layout) -> Value {
    let mut cluster = static_cluster(
        &layout.mongo_cluster(),
        ("mongo.external.example.com", "app"),
        &[SocketAddr::new(
            IpAddr::V4(layout.external_db),
            layout.dns_port,
        )],
    );
    cluster["type"] = json!("STRICT_DNS");
    cluster["dns_lookup_family"] = json!("V4_ONLY");
    cluster
}

/// A STRICT_DNS cluster over the addresses its name resolves to (literal
/// addresses here: no DNS on loopback), balanced round robin.
fn dns_cluster(name: &str, service: (&str, &str), endpoints: &[SocketAddr]) -> Value {
    let mut cluster = static_cluster(name, service, endpoints);
    cluster["type"] = json!("STRICT_DNS");
    cluster["dns_lookup_family"] = json!("V4_ONLY");
    cluster
}

/// The ExternalName Service's cluster: STRICT_DNS to `idle.manager.svc.cluster.local`,
/// here the idle pod's literal address (no cluster DNS on loopback).
fn app_ext_cluster(layout: &Layout) -> Value {
    let mut cluster = static_cluster(
        &layout.app_ext_cluster(),
        ("app-ext.app.svc.cluster.local", "app"),
        &[layout.at(layout.idle_pod)],
    );
    cluster["type"] = json!("STRICT_DNS");
    cluster["dns_lookup_family"] = json!("V4_ONLY");
    cluster
}

/// The manager pods' names: the sidecar's own, and the peer's.
pub const MANAGER_POD: &str = "manager-7948c8d9f-sh7rx";
pub const PEER_POD: &str = "manager-7948c8d9f-x2k9p";

pub fn pod_identity(layout: &Layout) -> &'static str {
    layout.own_pod_name
}

/// The sidecar's listeners served from a file (file-based LDS) instead of
/// the bootstrap, so a test can push a new listener configuration the way
/// istiod does: Envoy updates changed filter chains in place and drains the
/// old ones.
#[derive(Debug)]
pub struct DynamicListeners {
    path: PathBuf,
    version: u64,
    /// `virtualOutbound`'s port, fixed so that every version binds the same.
    outbound_port: u16,
}

impl DynamicListeners {
    /// Moves `bootstrap`'s listeners into `dir/lds.json` and points
    /// `dynamic_resources.lds_config` at it.
    pub fn install(bootstrap: &mut Value, dir: &Path) -> anyhow::Result<Self> {
        let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let outbound_port = probe.local_addr()?.port();
        drop(probe);
        let mut lds = Self {
            path: dir.join("lds.json"),
            version: 0,
            outbound_port,
        };
        let listeners = bootstrap["static_resources"]
            .as_object_mut()
            .and_then(|r| r.remove("listeners"))
            .context("bootstrap without static listeners")?;
        lds.push(&listeners)?;
        bootstrap["dynamic_resources"] = json!({ "lds_config": {
            "resource_api_version": "V3",
            "path_config_source": { "path": lds.path, "watched_directory": { "path": dir } },
        }});
        Ok(lds)
    }

    /// Serves `listeners` as the next version (written aside, then renamed
    /// over the watched file, so Envoy never reads half a file).
    pub fn push(&mut self, listeners: &Value) -> anyhow::Result<()> {
        self.version += 1;
        let mut listeners = listeners.as_array().context("listeners array")?.clone();
        for listener in &mut listeners {
            if listener["name"] == "virtualOutbound" {
                listener["address"]["socket_address"]["port_value"] = json!(self.outbound_port);
            }
            listener["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
        }
        let response = json!({ "version_info": self.version.to_string(), "resources": listeners });
        let staged = self.path.with_extension("next");
        std::fs::write(&staged, serde_json::to_vec_pretty(&response)?)?;
        std::fs::rename(&staged, &self.path)?;
        Ok(())
    }

    /// The versions pushed so far.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// A running Envoy with its admin endpoint.
#[derive(Debug)]
pub struct Envoy {
    pub process: ChildGuard,
    pub admin: SocketAddr,
    /// Where `virtualOutbound` listens (15001 in a pod).
    pub outbound: SocketAddr,
    pub access_log: PathBuf,
    /// Envoy's log lines (stderr), as they come.
    pub log: std::sync::mpsc::Receiver<String>,
}

impl Envoy {
    pub fn start(
        envoy: &Path,
        echo: bool,
        bootstrap: &Value,
        dir: &Path,
        access_log: PathBuf,
    ) -> anyhow::Result<Self> {
        Self::start_as(None, envoy, echo, bootstrap, dir, access_log)
    }

    /// Starts Envoy as user and group `user` (supplementary groups cleared),
    /// as istio-proxy runs as 1337 so that iptables can tell its connections
    /// from the application's; `dir`, the binary and the module must be
    /// readable by it, and `dir` writable.
    pub fn start_as(
        user: Option<u32>,
        envoy: &Path,
        echo: bool,
        bootstrap: &Value,
        dir: &Path,
        access_log: PathBuf,
    ) -> anyhow::Result<Self> {
        let config = dir.join("envoy.json");
        std::fs::write(&config, serde_json::to_vec_pretty(bootstrap)?)?;
        let admin_file = dir.join("envoy-admin-address");
        let mut command = Command::new(envoy);
        command
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "2",
                "-l",
                "warning",
                // Access logs reach the file within 0.2 s (the default is 10 s).
                "--file-flush-interval-msec",
                "200",
                // Listener updates drain the old filter chains for 2 s
                // (Envoy's default is 600 s, Istio's 45 s), so a test sees
                // the old dialguard root retired.
                "--drain-time-s",
                "2",
            ]);
        if let Some(id) = user {
            // std clears the supplementary groups when root sets a uid.
            command.uid(id).gid(id);
        }
        let mut process = ChildGuard::spawn("envoy", piped(&mut command))?;
        let stderr = process.child_mut().stderr.take().context("envoy stderr")?;
        let log = tee_lines("envoy", stderr, echo);
        let admin = crate::wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(&admin_file)
                .ok()?
                .trim()
                .parse::<SocketAddr>()
                .ok()
        });
        process.check_running()?;
        let admin = admin.context("envoy did not publish its admin address within 30 s")?;
        let ready = crate::wait_for(Duration::from_secs(30), || {
            (admin_get(admin, "/ready").ok()?.trim() == "LIVE").then_some(())
        });
        process.check_running()?;
        ready.context("envoy did not become LIVE within 30 s")?;
        let outbound = listener_address(admin, "virtualOutbound")?;
        Ok(Self {
            process,
            admin,
            outbound,
            access_log,
            log,
        })
    }

    /// Waits until Envoy refused a remotely fetched module (its sha256 did
    /// not match); false if it did not within 20 s.
    pub fn module_rejected(&self) -> bool {
        crate::wait_for(Duration::from_secs(20), || {
            let counters = self.counters("wasm.remote_load").ok()?;
            (counters.get("wasm.remote_load_fetch_failures") >= Some(&1)).then_some(())
        })
        .is_some()
    }

    /// Counter values whose names contain `filter`, from `/stats?format=json`.
    pub fn counters(
        &self,
        filter: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        stats(self.admin, filter)
    }
}

/// Counter and gauge values whose names contain `filter`, from an Envoy
/// admin endpoint's `/stats?format=json`.
pub fn stats(
    admin: SocketAddr,
    filter: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    stats_from(&admin_get(admin, &stats_path(filter))?)
}

/// The admin path [`stats`] reads.
pub fn stats_path(filter: &str) -> String {
    format!("/stats?format=json&filter={filter}")
}

/// The counter and gauge values in a `/stats?format=json` body.
pub fn stats_from(body: &str) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let stats: Value = serde_json::from_str(body)?;
    Ok(stats["stats"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s["value"].as_u64()?)))
        .collect())
}

pub fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let url = format!("http://{admin}{path}");
    let body = ureq::get(&url)
        .call()
        .with_context(|| format!("GET {url}"))?
        .body_mut()
        .read_to_string()?;
    Ok(body)
}

/// Where listener `name` is bound, from Envoy's admin `/listeners`.
pub fn listener_address(admin: SocketAddr, name: &str) -> anyhow::Result<SocketAddr> {
    let body = admin_get(admin, "/listeners?format=json")?;
    let listeners: Value = serde_json::from_str(&body)?;
    let found = listeners["listener_statuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["name"] == name)
        .with_context(|| format!("listener {name} not in /listeners: {body}"))?;
    let address = &found["local_address"]["socket_address"];
    let ip: IpAddr = address["address"]
        .as_str()
        .context("listener address")?
        .parse()?;
    let port = address["port_value"].as_u64().context("listener port")?;
    Ok(SocketAddr::new(ip, u16::try_from(port)?))
}
