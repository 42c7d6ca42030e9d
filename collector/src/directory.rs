//! The pod-IP directory in memory: who owns an IP, from the `hello` of every
//! sidecar that connected (`INSTANCE_IPS`), loaded from the database at
//! startup and kept current by ingest. Alerts use it to name the pod the
//! application meant to reach; the report reads the same data from SQLite.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use dialguard_proto::v1::Hello;

use crate::store::DirectoryEntry;

/// Most IPs held; a mesh beyond this many pod IPs loses names, not events.
const MAX_ENTRIES: usize = 500_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub pod_name: String,
    pub namespace: String,
    pub workload_name: String,
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    entries: Arc<RwLock<HashMap<IpAddr, PodRef>>>,
}

impl Directory {
    pub fn load(entries: HashMap<IpAddr, DirectoryEntry>) -> Self {
        let map = entries
            .into_iter()
            .take(MAX_ENTRIES)
            .map(|(ip, e)| {
                (
                    ip,
                    PodRef {
                        pod_name: e.pod_name,
                        namespace: e.namespace,
                        workload_name: e.workload_name,
                    },
                )
            })
            .collect();
        Self {
            entries: Arc::new(RwLock::new(map)),
        }
    }

    /// Records the IPs a sidecar announced; a later pod with the same IP wins.
    pub fn record(&self, sidecar: &Hello) {
        let Ok(mut entries) = self.entries.write() else {
            return;
        };
        for ip in &sidecar.instance_ips {
            let Ok(ip) = ip.trim().parse::<IpAddr>() else {
                continue;
            };
            if entries.len() >= MAX_ENTRIES && !entries.contains_key(&ip) {
                continue;
            }
            entries.insert(
                ip,
                PodRef {
                    pod_name: sidecar.pod_name.clone(),
                    namespace: sidecar.namespace.clone(),
                    workload_name: sidecar.workload_name.clone(),
                },
            );
        }
    }

    /// Whether a sidecar announced `ip` as its pod's: cheap, no clone.
    pub fn is_pod(&self, ip: IpAddr) -> bool {
        self.entries
            .read()
            .is_ok_and(|entries| entries.contains_key(&ip))
    }

    pub fn owner(&self, ip: IpAddr) -> Option<PodRef> {
        self.entries.read().ok()?.get(&ip).cloned()
    }
}
