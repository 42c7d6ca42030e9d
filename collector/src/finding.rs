//! What a reported connection means: its root cause, the object to change
//! and the fix. One home for the words that the report (every format), the
//! alert line, the Alertmanager annotations and the metrics share.

use std::net::{IpAddr, SocketAddr};

use dialguard_proto::v1::Verdict;
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

/// Envoy's `StreamInfo::ResponseFlag` bits as the filter reports them
/// (`response.flags`), for the few that tell causes apart.
pub mod response_flags {
    /// UH: no healthy upstream host.
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2;
    /// UF: the upstream connection failed.
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    /// UO: circuit breaker overflow.
    pub const UPSTREAM_OVERFLOW: u64 = 0x80;
    /// URX: connect attempts (TCP) or retries (HTTP) exhausted.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 0x8000;
}

// Istio's names for the clusters and chains that tell causes apart.
pub use dialguard_istio::{
    BLACK_HOLE_CLUSTER, BLACKHOLE_CHAIN, CATCHALL_CHAIN, OUTBOUND_CAPTURE_PORT, OutboundCluster,
    PASSTHROUGH_CLUSTER,
};

impl Cause {
    /// Every cause, in the order the docs list them.
    pub const ALL: [Cause; 7] = [
        Cause::CatchAll,
        Cause::PolicyBlock,
        Cause::NoEndpoints,
        Cause::OwnPodIp,
        Cause::ProxyLoop,
        Cause::DnsRedirection,
        Cause::Unexplained,
    ];

    /// The stored and serialized name (also the `cause` metric label).
    pub fn label(self) -> &'static str {
        match self {
            Cause::CatchAll => "catch_all",
            Cause::PolicyBlock => "policy_block",
            Cause::NoEndpoints => "no_endpoints",
            Cause::OwnPodIp => "own_pod_ip",
            Cause::ProxyLoop => "proxy_loop",
            Cause::DnsRedirection => "dns_redirection",
            Cause::Unexplained => "unexplained",
        }
    }

    /// The cause a stored label names; `None` for anything else (rows
    /// stored before causes existed have an empty one).
    pub fn from_label(label: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|cause| cause.label() == label)
    }
}

/// What an event says about one connection, as classification needs it.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The verdict after the collector's upgrade (a REDIRECTED dial to a
    /// known pod counts as MISROUTED).
    pub verdict: Verdict,
    pub cluster: &'a str,
    /// Empty for Istio's unnamed outbound chains (`<VIP>_<port>`, `0.0.0.0_<port>`).
    pub filter_chain: &'a str,
    pub response_flags: u64,
    pub dialed: SocketAddr,
    pub upstream: Option<SocketAddr>,
    /// The connection's source address, when the filter read it.
    pub source: Option<SocketAddr>,
    /// The reporting sidecar's `INSTANCE_IPS` (its pod's own addresses).
    pub instance_ips: &'a [String],
}

/// The cause an event supports. Cheap (no allocation): ingest calls it once
/// per stored event.
pub fn classify(facts: &Facts<'_>) -> Cause {
    let outbound = OutboundCluster::parse(facts.cluster);
    match facts.verdict {
        Verdict::Blackholed if facts.cluster == BLACK_HOLE_CLUSTER => {
            if facts.filter_chain == BLACKHOLE_CHAIN || facts.dialed.port() == OUTBOUND_CAPTURE_PORT
            {
                Cause::ProxyLoop
            } else if facts.filter_chain == CATCHALL_CHAIN {
                Cause::PolicyBlock
            } else if facts.filter_chain.is_empty() || dials_itself(facts) {
                // Istio's only unnamed outbound chain that leads to
                // BlackHoleCluster is a catch-all listener's own-pod-IP chain.
                Cause::OwnPodIp
            } else {
                Cause::Unexplained
            }
        }
        // ORIGINAL_DST always has a host: no endpoints is not what happened.
        Verdict::Blackholed if facts.cluster == PASSTHROUGH_CLUSTER => Cause::Unexplained,
        Verdict::Blackholed if !facts.cluster.is_empty() => Cause::NoEndpoints,
        Verdict::Misrouted if outbound.is_some() => Cause::CatchAll,
        Verdict::Redirected | Verdict::Resolved if outbound.is_some() => Cause::DnsRedirection,
        _ => Cause::Unexplained,
    }
}

/// Whether the dialed IP is the source pod's own (rare path: parses the hello's IPs).
fn dials_itself(facts: &Facts<'_>) -> bool {
    let dialed = facts.dialed.ip();
    facts.source.is_some_and(|source| source.ip() == dialed)
        || facts
            .instance_ips
            .iter()
            .any(|ip| ip.trim().parse::<IpAddr>() == Ok(dialed))
}

/// What a report row, an alert line or an Alertmanager alert says about a
/// finding: the stored cause plus the row's own fields.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub cause: Cause,
    pub cluster: &'a str,
    /// `istio.services[0].host` of the cluster; empty when it has none.
    pub capturing_service: &'a str,
    pub dialed: SocketAddr,
    pub source_namespace: &'a str,
    pub source_workload: &'a str,
}

/// A finding's words: why, what to change, and the object to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub cause_text: String,
    pub fix: String,
    pub culprit: Option<Culprit>,
}

impl Subject<'_> {
    /// The service that captured the connection: the cluster's
    /// `istio.services`, else the host in the cluster's name.
    fn service_host(&self) -> Option<&str> {
        if !self.capturing_service.is_empty() {
            return Some(self.capturing_service);
        }
        OutboundCluster::parse(self.cluster).map(|c| c.host)
    }

    pub fn explain(&self) -> Explanation {
        let port = self.dialed.port();
        let dialed = self.dialed;
        let ip = dialed.ip();
        let cluster = self.cluster;
        let listener = format!("`0.0.0.0_{port}`");
        let host = self.service_host();
        let service = host.map_or_else(
            || format!("a Service or ServiceEntry declaring port {port}"),
            |host| format!("`{host}`"),
        );
        let source = format!("{}/{}", self.source_namespace, self.source_workload);
        match self.cause {
            Cause::CatchAll => Explanation {
                cause_text: format!(
                    "{service} declares port {port} without an address of its own (an \
                     ExternalName Service or an address-less ServiceEntry), so every sidecar \
                     that sees it has a catch-all listener {listener}; it captured this \
                     connection to pod IP {dialed} and sent it to `{cluster}`."
                ),
                fix: remediation(host.unwrap_or(""), port),
                culprit: host.map(service_culprit),
            },
            Cause::PolicyBlock => Explanation {
                cause_text: format!(
                    "The outbound traffic policy is `REGISTRY_ONLY` and no service the sidecar \
                     knows has {dialed}: the passthrough chain `{CATCHALL_CHAIN}` sent the \
                     connection to `{BLACK_HOLE_CLUSTER}`."
                ),
                fix: format!(
                    "If {source} should reach {dialed}, add a ServiceEntry for it (its host, \
                     `addresses: [{ip}]`, port {port}, `resolution: STATIC` or `NONE`); or relax \
                     the policy to `outboundTrafficPolicy: {{mode: ALLOW_ANY}}` in the Sidecar \
                     resource of namespace {ns} or in meshConfig. If the connection is not \
                     wanted, the policy did its job.",
                    ns = self.source_namespace
                ),
                culprit: Some(Culprit {
                    kind: "Sidecar".into(),
                    namespace: self.source_namespace.into(),
                    name: String::new(),
                    inspect: format!(
                        "kubectl -n {ns} get sidecars.networking.istio.io -o yaml; \
                         kubectl -n istio-system get configmap istio -o jsonpath='{{.data.mesh}}' \
                         (the namespace's Sidecar decides; without one, meshConfig's \
                         outboundTrafficPolicy does)",
                        ns = self.source_namespace
                    ),
                }),
            },
            Cause::NoEndpoints => Explanation {
                cause_text: format!(
                    "`{cluster}` had no healthy endpoint to connect to, so the connection to \
                     {dialed} was closed{captured}.",
                    captured = match host {
                        Some(host) => format!(
                            "; if {dialed} is not an address of `{host}`, its catch-all listener \
                             {listener} captured it"
                        ),
                        None => String::new(),
                    }
                ),
                fix: format!(
                    "Give {service} ready endpoints: its selector must match running, ready pods \
                     (for an ExternalName Service or a DNS ServiceEntry, its name must resolve). \
                     If {dialed} was not meant for it, stop it from declaring port {port} \
                     (catch-all listener {listener})."
                ),
                culprit: host.map(|host| {
                    let mut culprit = service_culprit(host);
                    if culprit.kind == "Service" {
                        culprit.inspect = format!(
                            "kubectl -n {} get endpointslices -l kubernetes.io/service-name={}",
                            culprit.namespace, culprit.name
                        );
                    }
                    culprit
                }),
            },
            Cause::OwnPodIp => Explanation {
                cause_text: format!(
                    "{source} dialed its own pod IP {dialed}; a catch-all listener {listener} \
                     covers port {port}, and its own-pod-IP chain sends such connections to \
                     `{BLACK_HOLE_CLUSTER}` so they cannot loop."
                ),
                fix: format!(
                    "Let the application reach itself on localhost or through its own Service, \
                     not its pod IP; or remove the catch-all on port {port}: find the Service or \
                     ServiceEntry declaring it with `dialguard analyze` on this sidecar's config \
                     dump and give it an address or its own port."
                ),
                culprit: None,
            },
            Cause::ProxyLoop => Explanation {
                cause_text: format!(
                    "Something in {source} dialed {dialed}, port {OUTBOUND_CAPTURE_PORT}: the \
                     sidecar's own outbound capture port; Istio's `{BLACKHOLE_CHAIN}` chain \
                     drops such connections so they cannot loop through the proxy."
                ),
                fix: format!(
                    "Find the process dialing port {OUTBOUND_CAPTURE_PORT} (Istio reserves it): \
                     move the application off that port, or, if it dialed its own pod IP and \
                     iptables redirected that connection to {OUTBOUND_CAPTURE_PORT}, let it \
                     reach itself on localhost instead."
                ),
                culprit: None,
            },
            Cause::DnsRedirection => Explanation {
                cause_text: format!(
                    "{dialed} is not known as a pod; {service} took the connection and sent it \
                     to an address of its DNS name through `{cluster}`: DNS load balancing over \
                     that name, or an address outside it captured by its catch-all listener \
                     {listener}."
                ),
                fix: format!(
                    "If {ip} is an address of {service}, this is DNS load balancing: allow it \
                     with an allow rule `{{\"cluster\": \"{cluster}\"}}`. Otherwise that name \
                     captures every address on port {port}: give its ServiceEntry `addresses` \
                     (or its own port) so it stops capturing other destinations."
                ),
                culprit: host.map(service_culprit),
            },
            Cause::Unexplained => Explanation {
                cause_text: format!(
                    "Nothing the event carries explains why `{cluster}` took the connection to \
                     {dialed}."
                ),
                fix: format!(
                    "Look at the listeners of this sidecar for port {port} (`istioctl \
                     proxy-config listeners <pod> --port {port}`) and run `dialguard analyze` \
                     on its config dump."
                ),
                culprit: None,
            },
        }
    }
}

/// The object behind a service host: `name.ns.svc.<domain>` is a
/// Kubernetes Service; any other host comes from a ServiceEntry, whose
/// namespace and name the event does not carry.
pub fn service_culprit(host: &str) -> Culprit {
    let mut labels = host.split('.');
    let service = match (labels.next(), labels.next(), labels.next(), labels.next()) {
        (Some(name), Some(namespace), Some("svc"), Some(domain))
            if !name.is_empty() && !namespace.is_empty() && !domain.is_empty() =>
        {
            Some((namespace, name))
        }
        _ => None,
    };
    if let Some((namespace, name)) = service {
        return Culprit {
            kind: "Service".into(),
            namespace: namespace.into(),
            name: name.into(),
            inspect: format!("kubectl -n {namespace} get service {name} -o yaml"),
        };
    }
    Culprit {
        kind: "ServiceEntry".into(),
        namespace: String::new(),
        name: String::new(),
        inspect: format!(
            "kubectl get serviceentries.networking.istio.io -A -o json | jq -r '.items[] | \
             select(.spec.hosts | index(\"{host}\")) | .metadata.namespace + \"/\" + .metadata.name'"
        ),
    }
}

/// The fix for a catch-all capture, after ../shared/INCIDENT.md: the
/// capturing service declares a shared TCP port, so its catch-all listener
/// takes every connection to that port, pod IPs included.
pub fn remediation(capturing_service: &str, port: u16) -> String {
    let culprit = if capturing_service.is_empty() {
        format!(
            "A Service or ServiceEntry declaring port {port} (find it with `dialguard analyze` \
             on this sidecar's config dump)"
        )
    } else {
        format!("{capturing_service}, which declares port {port},")
    };
    format!(
        "{culprit} makes every sidecar capture connections to pod IPs on port {port} \
         (catch-all listener 0.0.0.0_{port}). Fix: do not declare port {port} on that \
         ExternalName Service or address-less ServiceEntry (give the ServiceEntry \
         `addresses`, or use a VirtualService to redirect instead of swapping Service \
         types); or restrict its visibility (`exportTo`, a Sidecar resource); or move \
         one of the services to its own port or to TLS with SNI; and name ports with \
         their protocol (tcp-, http-, grpc-)."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP_EXT: &str = "outbound|5701||app-ext.app.svc.cluster.local";

    struct Case {
        name: &'static str,
        verdict: Verdict,
        cluster: &'static str,
        chain: &'static str,
        flags: u64,
        dialed: &'static str,
        upstream: Option<&'static str>,
        source: Option<&'static str>,
        want: Cause,
    }

    fn case(
        name: &'static str,
        verdict: Verdict,
        cluster: &'static str,
        chain: &'static str,
        dialed: &'static str,
        upstream: Option<&'static str>,
        want: Cause,
    ) -> Case {
        Case {
            name,
            verdict,
            cluster,
            chain,
            flags: 0,
            dialed,
            upstream,
            source: None,
            want,
        }
    }

    /// The same situations over IPv4 and IPv6: `a` is a peer pod, `own`
    /// the reporting pod, `far` an external host.
    fn cases(a: &'static str, own: &'static str, far: &'static str, up: &'static str) -> Vec<Case> {
        use Verdict::*;
        vec![
            Case {
                flags: response_flags::UPSTREAM_CONNECTION_FAILURE
                    | response_flags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
                ..case(
                    "the incident",
                    Misrouted,
                    APP_EXT,
                    "",
                    a,
                    Some(up),
                    Cause::CatchAll,
                )
            },
            case(
                "catch-all, named chain",
                Misrouted,
                APP_EXT,
                "0.0.0.0_5701",
                a,
                Some(up),
                Cause::CatchAll,
            ),
            case(
                "misrouted via passthrough",
                Misrouted,
                PASSTHROUGH_CLUSTER,
                CATCHALL_CHAIN,
                a,
                Some(up),
                Cause::Unexplained,
            ),
            case(
                "misrouted via an inbound cluster",
                Misrouted,
                "inbound|5701||",
                "",
                a,
                Some(up),
                Cause::Unexplained,
            ),
            case(
                "REGISTRY_ONLY",
                Blackholed,
                BLACK_HOLE_CLUSTER,
                CATCHALL_CHAIN,
                far,
                None,
                Cause::PolicyBlock,
            ),
            case(
                "dial to 15001",
                Blackholed,
                BLACK_HOLE_CLUSTER,
                BLACKHOLE_CHAIN,
                a,
                None,
                Cause::ProxyLoop,
            ),
            case(
                "own IP chain (unnamed)",
                Blackholed,
                BLACK_HOLE_CLUSTER,
                "",
                own,
                None,
                Cause::OwnPodIp,
            ),
            case(
                "own IP from instance_ips, named chain",
                Blackholed,
                BLACK_HOLE_CLUSTER,
                "0.0.0.0_5701",
                own,
                None,
                Cause::OwnPodIp,
            ),
            Case {
                source: Some(a),
                ..case(
                    "own IP from the source address",
                    Blackholed,
                    BLACK_HOLE_CLUSTER,
                    "x",
                    a,
                    None,
                    Cause::OwnPodIp,
                )
            },
            case(
                "black hole, another pod, named chain",
                Blackholed,
                BLACK_HOLE_CLUSTER,
                "x",
                a,
                None,
                Cause::Unexplained,
            ),
            Case {
                flags: response_flags::NO_HEALTHY_UPSTREAM,
                ..case(
                    "no endpoints",
                    Blackholed,
                    APP_EXT,
                    "",
                    a,
                    None,
                    Cause::NoEndpoints,
                )
            },
            case(
                "no endpoints, other cluster",
                Blackholed,
                "db",
                "",
                a,
                None,
                Cause::NoEndpoints,
            ),
            case(
                "blackholed via passthrough",
                Blackholed,
                PASSTHROUGH_CLUSTER,
                CATCHALL_CHAIN,
                far,
                None,
                Cause::Unexplained,
            ),
            case(
                "DNS load balancing",
                Redirected,
                "outbound|443||api.example.com",
                "",
                far,
                Some(up),
                Cause::DnsRedirection,
            ),
            case(
                "resolved, if ever reported",
                Resolved,
                "outbound|443||api.example.com",
                "",
                far,
                Some(up),
                Cause::DnsRedirection,
            ),
            case(
                "redirected via passthrough",
                Redirected,
                PASSTHROUGH_CLUSTER,
                CATCHALL_CHAIN,
                far,
                Some(up),
                Cause::Unexplained,
            ),
            case(
                "malformed outbound cluster",
                Misrouted,
                "outbound|5701|",
                "",
                a,
                Some(up),
                Cause::Unexplained,
            ),
            case(
                "never reported",
                Match,
                APP_EXT,
                "",
                a,
                Some(a),
                Cause::Unexplained,
            ),
        ]
    }

    #[test]
    fn causes_by_event_ipv4_and_ipv6() {
        let v4 = cases(
            "10.244.1.7:5701",
            "10.244.1.6:5701",
            "203.0.113.9:443",
            "10.244.2.9:5701",
        );
        let v6 = cases(
            "[fd00:10:244::7]:5701",
            "[fd00:10:244::6]:5701",
            "[2001:db8::9]:443",
            "[fd00:10:244::2:9]:5701",
        );
        let mut v6_proxy_port = cases(
            "[fd00::7]:15001",
            "[fd00::6]:5701",
            "[2001:db8::9]:443",
            "[fd00::9]:5701",
        );
        v6_proxy_port.retain(|c| c.name == "dial to 15001");
        let instance_ips = [
            "10.244.1.6".to_string(),
            " fd00:10:244::6".to_string(),
            "fd00::6".to_string(),
        ];
        for (family, table) in [("v4", v4), ("v6", v6), ("v6", v6_proxy_port)] {
            for c in table {
                let parse = |text: &str| text.parse::<SocketAddr>().expect(c.name);
                let facts = Facts {
                    verdict: c.verdict,
                    cluster: c.cluster,
                    filter_chain: c.chain,
                    response_flags: c.flags,
                    dialed: parse(c.dialed),
                    upstream: c.upstream.map(parse),
                    source: c.source.map(parse),
                    instance_ips: &instance_ips,
                };
                assert_eq!(classify(&facts), c.want, "{family}: {}", c.name);
            }
        }
    }

    #[test]
    fn a_dial_to_the_capture_port_is_a_proxy_loop_whatever_the_chain() {
        let facts = Facts {
            verdict: Verdict::Blackholed,
            cluster: BLACK_HOLE_CLUSTER,
            filter_chain: "",
            response_flags: 0,
            dialed: "10.244.1.7:15001".parse().expect("addr"),
            upstream: None,
            source: None,
            instance_ips: &[],
        };
        assert_eq!(classify(&facts), Cause::ProxyLoop);
    }

    #[test]
    fn labels_round_trip_and_match_serde() {
        for cause in Cause::ALL {
            assert_eq!(Cause::from_label(cause.label()), Some(cause));
            assert_eq!(
                serde_json::to_value(cause).ok(),
                Some(serde_json::Value::String(cause.label().into()))
            );
        }
        assert_eq!(Cause::from_label(""), None);
    }

    fn subject(cause: Cause, cluster: &'static str, service: &'static str) -> Subject<'static> {
        Subject {
            cause,
            cluster,
            capturing_service: service,
            dialed: "10.244.1.7:5701".parse().expect("addr"),
            source_namespace: "manager",
            source_workload: "manager",
        }
    }

    #[test]
    fn each_cause_names_its_listener_object_and_fix() {
        let catch_all =
            subject(Cause::CatchAll, APP_EXT, "app-ext.app.svc.cluster.local").explain();
        assert!(
            catch_all.cause_text.contains("`0.0.0.0_5701`"),
            "{}",
            catch_all.cause_text
        );
        assert!(
            catch_all
                .cause_text
                .contains("`app-ext.app.svc.cluster.local`")
        );
        assert_eq!(
            catch_all.fix,
            remediation("app-ext.app.svc.cluster.local", 5701)
        );
        assert_eq!(
            catch_all.culprit,
            Some(Culprit {
                kind: "Service".into(),
                namespace: "app".into(),
                name: "app-ext".into(),
                inspect: "kubectl -n app get service app-ext -o yaml".into(),
            })
        );

        // No istio.services: the host comes from the cluster name; not a
        // Kubernetes Service name, so a ServiceEntry found by its host.
        let entry = subject(Cause::CatchAll, "outbound|5701||hz.example.com", "").explain();
        let culprit = entry.culprit.expect("a culprit");
        assert_eq!(
            (culprit.kind.as_str(), culprit.namespace.as_str()),
            ("ServiceEntry", "")
        );
        assert!(
            culprit.inspect.contains("index(\"hz.example.com\")"),
            "{}",
            culprit.inspect
        );

        let policy = subject(Cause::PolicyBlock, BLACK_HOLE_CLUSTER, "").explain();
        assert!(
            policy.cause_text.contains("REGISTRY_ONLY") && !policy.cause_text.contains("0.0.0.0_")
        );
        assert!(policy.fix.contains("ServiceEntry") && policy.fix.contains("ALLOW_ANY"));
        let sidecar = policy.culprit.expect("a culprit");
        assert_eq!(
            (sidecar.kind.as_str(), sidecar.namespace.as_str()),
            ("Sidecar", "manager")
        );
        assert!(
            sidecar.inspect.contains("configmap istio"),
            "{}",
            sidecar.inspect
        );

        let empty = subject(Cause::NoEndpoints, APP_EXT, "app-ext.app.svc.cluster.local").explain();
        assert_eq!(
            empty.culprit.map(|c| c.inspect),
            Some("kubectl -n app get endpointslices -l kubernetes.io/service-name=app-ext".into())
        );

        let own = subject(Cause::OwnPodIp, BLACK_HOLE_CLUSTER, "").explain();
        assert!(own.cause_text.contains("own pod IP") && own.culprit.is_none());
        let proxy = subject(Cause::ProxyLoop, BLACK_HOLE_CLUSTER, "").explain();
        assert!(proxy.cause_text.contains("15001"));
        let dns = subject(Cause::DnsRedirection, "outbound|443||api.example.com", "").explain();
        assert!(
            dns.fix
                .contains(r#"{"cluster": "outbound|443||api.example.com"}"#),
            "{}",
            dns.fix
        );
        // Every cause's words differ from every other's.
        let fixes: std::collections::HashSet<String> = Cause::ALL
            .into_iter()
            .map(|cause| subject(cause, APP_EXT, "").explain().fix)
            .collect();
        assert_eq!(fixes.len(), Cause::ALL.len());
    }
}
