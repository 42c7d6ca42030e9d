//! One root context: a filter configuration with its identity, outbox, DNS
//! memory, counters and collector stream. Connections are judged against
//! the root they were created under.

use dialguard_filter_core::{
    Build, FilterConfig, MetadataCache, Mode, Outbox, OutboxLimits, Tally, UpstreamMemory, hello,
};

use crate::abi::{self, Buffer, LogLevel};
use crate::delivery::Delivery;
use crate::host::{EnvoyNode, now_unix_nanos, vm_instance};
use crate::metrics::Metrics;

/// (cluster, upstream host) pairs each root remembers: about 40 bytes each.
const UPSTREAM_MEMORY_ENTRIES: usize = 4096;
/// Clusters and (cluster, host) pairs whose metadata each root reuses.
const METADATA_ENTRIES: usize = 1024;
/// Open connections are judged on the root's timer at least this often, so
/// a misroute is reported well within a second of its connect even when
/// events are flushed less often.
const MAX_JUDGE_PERIOD_MS: u64 = 200;

/// A configured root. A root whose configuration was refused never becomes one.
#[derive(Debug)]
pub struct Root {
    pub config: FilterConfig,
    pub outbox: Outbox,
    pub upstreams: UpstreamMemory,
    pub metadata: MetadataCache,
    pub metrics: Metrics,
    /// Connections judged, per verdict: what heartbeats carry.
    pub tally: Tally,
    pub delivery: Delivery,
    /// Timer ticks per flush of the outbox (the tick also judges open connections).
    ticks_per_flush: u64,
    ticks: u64,
}

impl Root {
    /// Reads and checks the plugin configuration; on error logs one line naming
    /// the field, so Envoy refuses the filter.
    pub fn configure() -> Option<Self> {
        let bytes = abi::buffer(Buffer::PluginConfiguration, usize::MAX).unwrap_or_default();
        let config = match FilterConfig::from_json(&bytes) {
            Ok(config) => config,
            Err(err) => {
                abi::log(LogLevel::Error, &err.to_string());
                return None;
            }
        };
        if config.mode == Mode::Enforce && !cfg!(feature = "enforce") {
            abi::log(
                LogLevel::Error,
                "invalid dialguard configuration at `mode`: enforce needs the module built with \
                 enforcement (dialguard_filter_enforce.wasm); this module only audits",
            );
            return None;
        }
        let build = if cfg!(feature = "enforce") {
            Build::Enforce
        } else {
            Build::Audit
        };
        let vm_instance = vm_instance();
        // FNV-1a of the instance name: differs between VMs started together.
        let seed = vm_instance
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        let hello = hello(&mut EnvoyNode, vm_instance, &config, build);
        let flush_ms = config.collector.flush_interval_ms;
        let tick_ms = flush_ms.min(MAX_JUDGE_PERIOD_MS);
        let _ = abi::set_tick_period_ms(u32::try_from(tick_ms).unwrap_or(u32::MAX));
        Some(Self {
            outbox: Outbox::new(OutboxLimits::from(&config.collector)),
            upstreams: UpstreamMemory::new(UPSTREAM_MEMORY_ENTRIES),
            metadata: MetadataCache::new(METADATA_ENTRIES),
            metrics: Metrics::define(),
            tally: Tally::default(),
            delivery: Delivery::new(&config.collector, hello, seed),
            ticks_per_flush: flush_ms.div_ceil(tick_ms.max(1)).max(1),
            ticks: 0,
            config,
        })
    }

    /// The root's timer, after the open connections were judged: the
    /// heartbeat when due (the first tick says hello), batches every flush.
    pub fn on_tick(&mut self) {
        self.ticks += 1;
        let flush = self.ticks % self.ticks_per_flush == 0;
        self.delivery.on_tick(
            now_unix_nanos(),
            flush,
            &mut self.outbox,
            &self.tally,
            &self.metrics,
        );
    }

    pub fn on_grpc_receive(&mut self, token: u32, size: usize) {
        self.delivery
            .on_message(token, size, &mut self.outbox, &self.metrics);
    }

    pub fn on_grpc_close(&mut self, token: u32, status: u32) {
        self.delivery.on_close(
            token,
            status,
            now_unix_nanos(),
            &mut self.outbox,
            &self.metrics,
        );
    }
}
