//! Upstream hosts recently chosen per cluster, so that a DNS cluster
//! (STRICT_DNS, LOGICAL_DNS) picking another address of the same name is not
//! mistaken for a misroute: when the application dialed an address this VM
//! has already seen as an upstream host of the same cluster, the difference
//! is DNS, not capture.
//!
//! Bounded: a fixed number of (cluster, address) entries, the oldest
//! forgotten first. Cluster names are kept as 64-bit hashes.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;

type Key = (u64, SocketAddr);

#[derive(Debug)]
pub struct UpstreamMemory {
    capacity: usize,
    order: VecDeque<Key>,
    known: HashSet<Key>,
}

fn key(cluster: &str, addr: SocketAddr) -> Key {
    let mut hasher = DefaultHasher::new();
    cluster.hash(&mut hasher);
    (hasher.finish(), addr)
}

impl UpstreamMemory {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            known: HashSet::new(),
        }
    }

    /// Whether `addr` was seen as an upstream host of `cluster`.
    pub fn has_seen(&self, cluster: &str, addr: SocketAddr) -> bool {
        self.known.contains(&key(cluster, addr))
    }

    /// Remembers `addr` as an upstream host of `cluster`.
    pub fn record(&mut self, cluster: &str, addr: SocketAddr) {
        let key = key(cluster, addr);
        if !self.known.insert(key) {
            return;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.known.remove(&oldest);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}
