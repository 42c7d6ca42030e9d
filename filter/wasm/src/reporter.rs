//! What a VM reports, whichever root contexts come and go: its identity
//! (one `vm_instance` for the VM's life, so sequence numbers and counters
//! never start over on a reconfiguration), the outbox of unacknowledged
//! events, the tally, the stream to the collector, Envoy's counters, and
//! the DNS and metadata memories (they do not depend on the configuration).
//!
//! Roots only hold a configuration. One root at a time drives delivery from
//! its timer; gRPC callbacks arrive at the root whose context opened the
//! stream, so when that root goes away its streams are taken as lost and the
//! next root's timer opens a new one: unacknowledged events are sent again
//! and the collector stores each (node, VM, sequence) once.

use dialguard_filter_core::{
    Build, FilterConfig, MetadataCache, Outbox, OutboxLimits, Tally, UpstreamMemory, hello,
};

use crate::abi::{self, LogLevel};
use crate::delivery::Delivery;
use crate::host::{EnvoyNode, vm_instance};
use crate::metrics::{self, Metrics};

/// (cluster, upstream host) pairs each VM remembers: about 40 bytes each.
const UPSTREAM_MEMORY_ENTRIES: usize = 4096;
/// Clusters and (cluster, host) pairs whose metadata each VM reuses.
const METADATA_ENTRIES: usize = 1024;

/// The module's build, known where it was compiled.
const BUILD: Build = if cfg!(feature = "enforce") {
    Build::Enforce
} else {
    Build::Audit
};

#[derive(Debug)]
pub struct Reporter {
    pub outbox: Outbox,
    pub tally: Tally,
    pub metrics: Metrics,
    pub upstreams: UpstreamMemory,
    pub metadata: MetadataCache,
    delivery: Delivery,
    vm_instance: String,
    /// The root whose timer drives delivery (and whose context opened the streams).
    driver: Option<u32>,
    flush_interval_nanos: u64,
    next_flush_nanos: u64,
}

impl Reporter {
    /// The VM's reporter, set up by its first configured root.
    pub fn new(config: &FilterConfig) -> Self {
        let vm_instance = vm_instance();
        // FNV-1a of the instance name: differs between VMs started together.
        let seed = vm_instance
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        let hello = hello(&mut EnvoyNode, vm_instance.clone(), config, BUILD);
        Self {
            outbox: Outbox::new(OutboxLimits::from(&config.collector)),
            tally: Tally::default(),
            metrics: Metrics::define(),
            upstreams: UpstreamMemory::new(UPSTREAM_MEMORY_ENTRIES),
            metadata: MetadataCache::new(METADATA_ENTRIES),
            delivery: Delivery::new(&config.collector, hello, seed),
            vm_instance,
            driver: None,
            flush_interval_nanos: config.collector.flush_interval_ms.saturating_mul(1_000_000),
            next_flush_nanos: 0,
        }
    }

    /// A root was (re)configured: the buffer and the sequence numbers stay;
    /// limits, collector and what the hello says follow the new configuration.
    pub fn reconfigure(&mut self, config: &FilterConfig) {
        let dropped_before = self.outbox.dropped_total();
        self.outbox
            .set_limits(OutboxLimits::from(&config.collector));
        metrics::add(
            self.metrics.events_dropped,
            self.outbox.dropped_total() - dropped_before,
        );
        let hello = hello(&mut EnvoyNode, self.vm_instance.clone(), config, BUILD);
        self.delivery
            .reconfigure(&config.collector, hello, &mut self.outbox);
        self.flush_interval_nanos = config.collector.flush_interval_ms.saturating_mul(1_000_000);
    }

    /// Root `root_id`'s timer: the driving root (the first to tick while
    /// none drives) heartbeats, flushes when due and ends idle streams.
    pub fn on_tick(&mut self, root_id: u32, now: u64) {
        match self.driver {
            Some(driver) if driver != root_id => return,
            Some(_) => {}
            None => self.driver = Some(root_id),
        }
        let flush = now >= self.next_flush_nanos;
        if flush {
            self.next_flush_nanos = now.saturating_add(self.flush_interval_nanos);
        }
        self.delivery
            .on_tick(now, flush, &mut self.outbox, &self.tally, &self.metrics);
    }

    pub fn on_grpc_receive(&mut self, token: u32, size: usize) {
        self.delivery
            .on_message(token, size, &mut self.outbox, &self.metrics);
    }

    pub fn on_grpc_close(&mut self, token: u32, status: u32, now: u64) {
        self.delivery
            .on_close(token, status, now, &mut self.outbox, &self.metrics);
    }

    /// Root `root_id` is gone: if it drove delivery, its streams went with
    /// it, and another root takes over at its next tick.
    pub fn root_gone(&mut self, root_id: u32) {
        if self.driver == Some(root_id) {
            self.driver = None;
            self.delivery.streams_lost(&mut self.outbox);
        }
    }

    /// The VM's last root is gone, and the VM with it: what is still
    /// unacknowledged can never be sent, and nothing of the VM outlives it
    /// (Envoy removes its stats and its shared data with it). The loss is
    /// logged, with its number.
    pub fn give_up_for_good(&mut self) {
        let given_up = self.outbox.give_up();
        if given_up == 0 {
            return;
        }
        abi::log(
            LogLevel::Error,
            &format!(
                "dialguard: the filter is going away (its listeners removed, its module \
                 replaced, or Envoy shutting down) with {given_up} events the collector has not \
                 acknowledged ({} dropped before); they are lost",
                self.outbox.dropped_total() - given_up
            ),
        );
    }
}
