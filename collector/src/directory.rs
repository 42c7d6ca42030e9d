//! The pod-IP directory in memory: who owns an IP, from the `hello` of every
//! sidecar that connected (`INSTANCE_IPS`), loaded from the database at
//! startup and kept current by ingest. Alerts use it to name the pod the
//! application meant to reach; the report looks the IPs of its rows up in
//! SQLite. Each pod is held once, shared by its IPs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use dialguard_proto::v1::Hello;

use crate::store::{self, DirectoryPod};

/// Most IPs held; a mesh beyond this many pod IPs loses names, not events.
pub const MAX_ENTRIES: usize = 500_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub pod_name: String,
    pub namespace: String,
    pub workload_name: String,
}

impl PodRef {
    fn of(sidecar: &Hello) -> Self {
        Self {
            pod_name: sidecar.pod_name.clone(),
            namespace: sidecar.namespace.clone(),
            workload_name: sidecar.workload_name.clone(),
        }
    }

    fn is(&self, sidecar: &Hello) -> bool {
        self.pod_name == sidecar.pod_name
            && self.namespace == sidecar.namespace
            && self.workload_name == sidecar.workload_name
    }
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    entries: Arc<RwLock<HashMap<IpAddr, Arc<PodRef>>>>,
}

impl Directory {
    /// The directory as stored (see [`store::directory_pods`], which
    /// stops at [`MAX_ENTRIES`] IPs).
    pub fn load(pods: Vec<DirectoryPod>) -> Self {
        let mut map = HashMap::new();
        for DirectoryPod { pod, ips } in pods {
            let shared = Arc::new(PodRef {
                pod_name: pod.pod_name,
                namespace: pod.namespace,
                workload_name: pod.workload_name,
            });
            for ip in ips {
                if map.len() >= MAX_ENTRIES {
                    break;
                }
                map.insert(ip, Arc::clone(&shared));
            }
        }
        Self {
            entries: Arc::new(RwLock::new(map)),
        }
    }

    /// Records the IPs a sidecar announced; a later pod with the same IP
    /// wins. Every hello of a pod's VMs (heartbeats included) comes here, so
    /// an unchanged pod costs a read lock only.
    pub fn record(&self, sidecar: &Hello) {
        let ips = store::announced_ips(sidecar);
        let current = |entries: &HashMap<IpAddr, Arc<PodRef>>| {
            ips.iter()
                .all(|ip| entries.get(ip).is_some_and(|pod| pod.is(sidecar)))
        };
        if self.entries.read().is_ok_and(|entries| current(&entries)) {
            return;
        }
        let Ok(mut entries) = self.entries.write() else {
            return;
        };
        // One record per pod: the one an IP of this pod already holds, if any.
        let shared = ips
            .iter()
            .find_map(|ip| entries.get(ip).filter(|pod| pod.is(sidecar)).cloned())
            .unwrap_or_else(|| Arc::new(PodRef::of(sidecar)));
        for ip in ips {
            if entries
                .get(&ip)
                .is_some_and(|pod| Arc::ptr_eq(pod, &shared))
            {
                continue;
            }
            if entries.len() >= MAX_ENTRIES && !entries.contains_key(&ip) {
                continue;
            }
            entries.insert(ip, Arc::clone(&shared));
        }
    }

    /// Whether a sidecar announced `ip` as its pod's: cheap, no clone.
    pub fn is_pod(&self, ip: IpAddr) -> bool {
        self.entries
            .read()
            .is_ok_and(|entries| entries.contains_key(&ip))
    }

    pub fn owner(&self, ip: IpAddr) -> Option<Arc<PodRef>> {
        self.entries.read().ok()?.get(&ip).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, workload: &str, ips: &[&str]) -> Hello {
        Hello {
            node_id: format!("node-{name}"),
            pod_name: name.into(),
            namespace: "ns".into(),
            workload_name: workload.into(),
            instance_ips: ips.iter().map(|ip| ip.to_string()).collect(),
            ..Default::default()
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn a_pods_ips_share_one_record() {
        let directory = Directory::default();
        directory.record(&pod("a", "w", &["10.0.0.1", "fd00::1", "10.0.0.2"]));
        let first = directory.owner(ip("10.0.0.1")).expect("owner");
        for other in ["fd00::1", "10.0.0.2"] {
            let owner = directory.owner(ip(other)).expect("owner");
            assert!(Arc::ptr_eq(&first, &owner), "{other} has its own copy");
        }
        // The pod's next hello, with one more IP: the same record.
        directory.record(&pod("a", "w", &["10.0.0.1", "10.0.0.3"]));
        let added = directory.owner(ip("10.0.0.3")).expect("owner");
        assert!(Arc::ptr_eq(&first, &added));
        // A strong count of one per IP and ours: nothing else holds copies.
        assert_eq!(Arc::strong_count(&first), 4 + 2);
    }

    #[test]
    fn a_later_pod_takes_an_ip_over_and_changes_are_seen() {
        let directory = Directory::default();
        directory.record(&pod("a", "w", &["10.0.0.1", "10.0.0.2"]));
        directory.record(&pod("b", "w", &["10.0.0.2"]));
        assert_eq!(
            directory.owner(ip("10.0.0.2")).map(|p| p.pod_name.clone()),
            Some("b".into())
        );
        assert_eq!(
            directory.owner(ip("10.0.0.1")).map(|p| p.pod_name.clone()),
            Some("a".into())
        );
        // The same pod under a new workload name: updated, not ignored.
        directory.record(&pod("a", "w2", &["10.0.0.1"]));
        assert_eq!(
            directory
                .owner(ip("10.0.0.1"))
                .map(|p| p.workload_name.clone()),
            Some("w2".into())
        );
        assert!(directory.is_pod(ip("10.0.0.1")) && !directory.is_pod(ip("10.0.0.9")));
    }

    #[test]
    fn loading_shares_one_record_per_stored_pod() {
        let entry = store::DirectoryEntry {
            pod_name: "a".into(),
            namespace: "ns".into(),
            workload_name: "w".into(),
            last_seen_ns: 1,
        };
        let directory = Directory::load(vec![DirectoryPod {
            pod: entry,
            ips: vec![ip("10.0.0.1"), ip("10.0.0.2")],
        }]);
        let a = directory.owner(ip("10.0.0.1")).expect("owner");
        let b = directory.owner(ip("10.0.0.2")).expect("owner");
        assert!(Arc::ptr_eq(&a, &b));
    }
}
