//! Cluster and host metadata read recently, so that reported connections
//! through the same cluster (a misroute repeats: every connection to the
//! shared port takes the same catch-all) pay for `istio.services` and
//! `istio.workload` once per [`MAX_AGE_NS`] instead of on every connection.
//! Each read is a hostcall of about 12k instructions.
//!
//! Metadata changes only with an xDS update, so an entry is trusted for a
//! minute and then read again. Bounded: at most `capacity` entries per map;
//! when full, the map starts over (a burst of distinct clusters costs reads,
//! never memory).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;

/// How long a value read from Envoy is reused, by the connections' clock.
pub const MAX_AGE_NS: u64 = 60_000_000_000;

#[derive(Debug)]
pub struct MetadataCache {
    /// Cluster name hash → the cluster's `istio.services[0].host`.
    services: Recent<u64>,
    /// (Cluster name hash, upstream host) → the host's `istio.workload`.
    workloads: Recent<(u64, SocketAddr)>,
}

impl MetadataCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            services: Recent::new(capacity),
            workloads: Recent::new(capacity),
        }
    }

    /// The capturing service of `cluster`, from `read` unless read within
    /// [`MAX_AGE_NS`] of `now_ns`.
    pub fn intended_service(
        &mut self,
        cluster: &str,
        now_ns: u64,
        read: impl FnOnce() -> Option<String>,
    ) -> String {
        self.services.get_or_read(hash(cluster), now_ns, read)
    }

    /// The `istio.workload` of `host` in `cluster`, likewise.
    pub fn upstream_workload(
        &mut self,
        cluster: &str,
        host: SocketAddr,
        now_ns: u64,
        read: impl FnOnce() -> Option<String>,
    ) -> String {
        self.workloads
            .get_or_read((hash(cluster), host), now_ns, read)
    }

    /// Entries held, both maps together.
    pub fn len(&self) -> usize {
        self.services.entries.len() + self.workloads.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn hash(cluster: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    cluster.hash(&mut hasher);
    hasher.finish()
}

#[derive(Debug)]
struct Recent<K> {
    capacity: usize,
    /// The value (empty when Envoy had none: that is worth remembering too)
    /// and when it was read.
    entries: HashMap<K, (String, u64)>,
}

impl<K: Hash + Eq> Recent<K> {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
        }
    }

    fn get_or_read(
        &mut self,
        key: K,
        now_ns: u64,
        read: impl FnOnce() -> Option<String>,
    ) -> String {
        if let Some((value, read_at)) = self.entries.get(&key) {
            // A clock that went backwards counts as stale.
            if now_ns >= *read_at && now_ns - read_at < MAX_AGE_NS {
                return value.clone();
            }
        }
        let value = read().unwrap_or_default();
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.clear();
        }
        self.entries.insert(key, (value.clone(), now_ns));
        value
    }
}
