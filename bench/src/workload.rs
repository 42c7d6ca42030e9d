//! What the collector benchmark's simulated sidecars say: a `Hello` per
//! Envoy wasm VM and realistic reported events. Deterministic (a seeded
//! splitmix64, no `rand`), so two runs send the same events.
//!
//! The shape, after the field incident (docs/benchmarks.md, "Collector"):
//! sidecars belong to workloads spread over namespaces, two VMs (Envoy
//! workers) per sidecar; each workload's pods dial a small set of peer pod
//! IPs on one shared TCP port (Hazelcast, Cassandra, Redis, ...), and the
//! ExternalName catch-all of that port sends most of them to one of two
//! wrong pods. Verdicts: 85% `MISROUTED` (pod IP dialed, another pod
//! reached), 10% `BLACKHOLED` (the pod's own IP, `BlackHoleCluster`), 5%
//! `REDIRECTED` (an external address resolved elsewhere). So the report has
//! about 40 rows per workload, whatever the number of events.

use std::sync::Arc;

use dialguard_proto::v1::{
    ConnectionEvent, EventBatch, Hello, Mode, SocketAddress, Verdict, sidecar_message,
};

/// Workloads the sidecars are spread over (fewer when there are fewer sidecars).
pub const WORKLOADS: usize = 200;
/// Namespaces the workloads are spread over.
const NAMESPACES: usize = 20;
/// Envoy workers (wasm VMs, so streams) per sidecar.
pub const VMS_PER_SIDECAR: usize = 2;
/// Peer pods each workload dials on its shared port.
const PEERS: u32 = 16;
/// Wrong pods behind the ExternalName catch-all of a port.
const CATCH_ALL_ENDPOINTS: u32 = 2;
/// Distinct events each VM draws from (its share of its workload's keys).
const TEMPLATES: usize = 128;

/// Shared ports and the ExternalName service whose catch-all captures them.
const PORTS: &[(u32, &str, &str)] = &[
    (5701, "hazelcast", "hz-ext.cache.svc.cluster.local"),
    (9042, "cassandra", "cassandra-ext.data.svc.cluster.local"),
    (6379, "redis", "redis-ext.cache.svc.cluster.local"),
    (5432, "postgres", "pg-ext.data.svc.cluster.local"),
    (44985, "manager", "app-ext.app.svc.cluster.local"),
];

/// splitmix64: small, fast, good enough to spread keys.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn address(ip: String, port: u32) -> Option<SocketAddress> {
    Some(SocketAddress { ip, port })
}

/// A pod IP in 10.244.0.0/16 from an index.
fn pod_ip_of(index: u32) -> String {
    format!("10.244.{}.{}", (index / 250) % 256, index % 250 + 2)
}

/// Address number `n`: 10.0.0.0/8, then the next port (distinct for
/// any `n` below 2^24 x 64,000; never a simulated pod IP below 2^24 x 244 / 256).
pub fn distinct_destination(n: u64) -> Option<SocketAddress> {
    let ip = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
    address(ip, 1_024 + (n >> 24) as u32)
}

/// One simulated Envoy wasm VM: its `Hello` and the events it reports, with
/// its own sequence numbers from 1.
#[derive(Debug)]
pub struct Vm {
    pub hello: Arc<Hello>,
    templates: Vec<ConnectionEvent>,
    rng: Rng,
    next_sequence: u64,
    pod_ip: String,
    /// When the VM started: event times are this plus 1 ms per sequence
    /// number (recent, so the collector's retention keeps them).
    started_ns: u64,
    /// Each event dials an address of its own, numbered from this: one
    /// report row per event (the report memory measurement).
    distinct_from: Option<u64>,
}

impl Vm {
    /// VM `index` of a run; `sidecars` is how many sidecars the run has
    /// (VMs / 2), which decides how many workloads there are. `run` goes into
    /// `vm_instance` as the filter's start time does.
    pub fn new(index: usize, sidecars: usize, run: u64) -> Self {
        let sidecar = index / VMS_PER_SIDECAR;
        let worker = index % VMS_PER_SIDECAR;
        let workloads = sidecars.clamp(1, WORKLOADS);
        let workload = sidecar % workloads;
        let replica = sidecar / workloads;
        let (port, app, ext) = PORTS[workload % PORTS.len()];
        let namespace = format!("team-{:02}", workload % NAMESPACES);
        let workload_name = format!("{app}-{workload:03}");
        let pod_name = format!("{workload_name}-7d9f{:04x}-{replica:05}", workload);
        let pod_ip = pod_ip_of(sidecar as u32 + 20_000);
        let hello = Hello {
            node_id: format!(
                "sidecar~{pod_ip}~{pod_name}.{namespace}~{namespace}.svc.cluster.local"
            ),
            vm_instance: format!("{run:016x}-{}", worker + 1),
            pod_name,
            namespace: namespace.clone(),
            workload_name: workload_name.clone(),
            instance_ips: vec![pod_ip.clone()],
            cluster_id: "Kubernetes".into(),
            istio_version: "1.24.2".into(),
            filter_version: "bench".into(),
            mode: Mode::Audit as i32,
            ..Hello::default()
        };
        let mut rng = Rng::new((workload as u64) << 32 | index as u64);
        let peer_base = workload as u32 * PEERS;
        let catch_all_base = 60_000 + (workload % PORTS.len()) as u32 * CATCH_ALL_ENDPOINTS;
        let ext_cluster = format!("outbound|{port}||{ext}");
        let intended = format!("{app}.{namespace}.svc.cluster.local");
        let templates = (0..TEMPLATES)
            .map(|_| {
                let roll = rng.below(100);
                let mut event = ConnectionEvent {
                    filter_chain_name: format!("0.0.0.0_{port}"),
                    intended_service: intended.clone(),
                    ..Default::default()
                };
                if roll < 85 {
                    let wrong = catch_all_base + rng.below(CATCH_ALL_ENDPOINTS.into()) as u32;
                    event.verdict = Verdict::Misrouted as i32;
                    event.original_destination =
                        address(pod_ip_of(peer_base + rng.below(PEERS.into()) as u32), port);
                    event.upstream_host = address(pod_ip_of(wrong), port);
                    event.cluster_name = ext_cluster.clone();
                    event.upstream_workload = format!(
                        "{app}-ext-{};{namespace};{app}-ext;v1;Kubernetes",
                        wrong % 7
                    );
                } else if roll < 95 {
                    event.verdict = Verdict::Blackholed as i32;
                    event.original_destination = address(pod_ip.clone(), port);
                    event.cluster_name = "BlackHoleCluster".into();
                    event.response_flags = 0x10; // UH, no healthy upstream
                    event.upstream_transport_failure_reason = String::new();
                } else {
                    event.verdict = Verdict::Redirected as i32;
                    event.original_destination =
                        address(format!("52.84.{}.{}", rng.below(4), 10 + rng.below(2)), 443);
                    event.upstream_host =
                        address(format!("52.84.{}.{}", rng.below(4), 20 + rng.below(2)), 443);
                    event.cluster_name = "outbound|443||api.partner.example.com".into();
                    event.filter_chain_name = "0.0.0.0_443".into();
                    event.intended_service = "api.partner.example.com".into();
                }
                event
            })
            .collect();
        Self {
            hello: Arc::new(hello),
            templates,
            rng,
            next_sequence: 1,
            pod_ip,
            started_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            distinct_from: None,
        }
    }

    /// The same VM, but its event with sequence number `s` dials address
    /// number `first + s` (see [`distinct_destination`]), so that every
    /// event is a report row of its own.
    pub fn with_distinct_destinations(mut self, first: u64) -> Self {
        self.distinct_from = Some(first);
        self
    }

    pub fn hello_message(&self) -> sidecar_message::Kind {
        sidecar_message::Kind::Hello((*self.hello).clone())
    }

    /// The next `n` events, numbered on from the last batch.
    pub fn events(&mut self, n: usize) -> Vec<ConnectionEvent> {
        (0..n)
            .map(|_| {
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                let pick = self.rng.below(TEMPLATES as u64) as usize;
                let mut event = self.templates[pick].clone();
                event.sequence = sequence;
                event.timestamp_unix_nanos = self.started_ns + sequence * 1_000_000;
                event.connection_id = 1_000 + sequence;
                event.source = address(self.pod_ip.clone(), 32_768 + (sequence % 28_000) as u32);
                if let Some(first) = self.distinct_from {
                    event.original_destination = distinct_destination(first + sequence);
                }
                event
            })
            .collect()
    }

    /// A batch of the next `n` events, as the filter sends it.
    pub fn batch(&mut self, n: usize) -> EventBatch {
        EventBatch {
            events: self.events(n),
            dropped_total: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_have_distinct_identities_and_numbered_events() {
        let mut a = Vm::new(0, 10, 7);
        let b = Vm::new(1, 10, 7);
        let c = Vm::new(2, 10, 7);
        assert_eq!(a.hello.node_id, b.hello.node_id, "two VMs per sidecar");
        assert_ne!(a.hello.vm_instance, b.hello.vm_instance);
        assert_ne!(a.hello.node_id, c.hello.node_id);
        let first = a.batch(3);
        let second = a.batch(2);
        let sequences: Vec<u64> = first
            .events
            .iter()
            .chain(&second.events)
            .map(|e| e.sequence)
            .collect();
        assert_eq!(sequences, [1, 2, 3, 4, 5]);
        for event in first.events {
            let dialed = event.original_destination.expect("dialed");
            assert!(dialed.ip.parse::<std::net::IpAddr>().is_ok(), "{dialed:?}");
            assert!(event.timestamp_unix_nanos > 0 && !event.cluster_name.is_empty());
        }
    }

    #[test]
    fn distinct_destinations_give_every_event_its_own_address() {
        let mut a = Vm::new(0, 10, 7).with_distinct_destinations(0);
        let mut b = Vm::new(1, 10, 7).with_distinct_destinations(1_000);
        let dialed: std::collections::BTreeSet<String> = a
            .events(1_000)
            .into_iter()
            .chain(b.events(1_000))
            .map(|e| format!("{:?}", e.original_destination))
            .collect();
        assert_eq!(dialed.len(), 2_000);
        assert_ne!(distinct_destination(1 << 24), distinct_destination(0));
    }

    #[test]
    fn verdicts_are_mostly_misrouted() {
        let mut vm = Vm::new(3, 100, 1);
        let events = vm.events(10_000);
        let misrouted = events
            .iter()
            .filter(|e| e.verdict == Verdict::Misrouted as i32)
            .count();
        assert!((7_000..=9_500).contains(&misrouted), "{misrouted}");
    }
}
