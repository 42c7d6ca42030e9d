//! What a VM tells the collector besides events: that it runs, and what it
//! judged. The [`Tally`] holds the per-verdict counters a heartbeat carries;
//! the [`HeartbeatClock`] says when the next one is due: at once when the
//! VM starts (so a VM is known before it has anything to report), then every
//! interval with a tenth of jitter either way, so a mesh of sidecars started
//! together does not heartbeat in step.

use dialguard_proto::v1::{ConnectionCounters, Heartbeat, Verdict};

use crate::Outbox;

/// Connections judged by one VM (one root context), since it started.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    connections: ConnectionCounters,
}

impl Tally {
    pub fn judged(&mut self, verdict: Verdict) {
        if let Some(count) = self.connections.of_mut(verdict) {
            *count += 1;
        }
    }

    pub fn unjudged(&mut self) {
        self.connections.unjudged += 1;
    }

    pub fn enforced(&mut self) {
        self.connections.enforced += 1;
    }

    pub fn connections(&self) -> &ConnectionCounters {
        &self.connections
    }

    /// The heartbeat message: these counters and the outbox's delivery ones.
    pub fn heartbeat(&self, outbox: &Outbox) -> Heartbeat {
        Heartbeat {
            connections: Some(self.connections),
            delivery: Some(outbox.delivery_counters()),
        }
    }
}

/// When this VM's next heartbeat is due, by Envoy's clock (nanoseconds).
#[derive(Debug, Clone)]
pub struct HeartbeatClock {
    interval_nanos: u64,
    due_nanos: u64,
    rng: fastrand::Rng,
}

impl HeartbeatClock {
    /// Due at once; `seed` should differ between VMs (their start time).
    pub fn new(interval_ms: u64, seed: u64) -> Self {
        Self {
            interval_nanos: interval_ms.saturating_mul(1_000_000),
            due_nanos: 0,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    pub fn is_due(&self, now_nanos: u64) -> bool {
        now_nanos >= self.due_nanos
    }

    /// A heartbeat went out at `now_nanos`: the next one is an interval
    /// later, give or take a tenth.
    pub fn sent(&mut self, now_nanos: u64) {
        let tenth = self.interval_nanos / 10;
        let jittered = self.interval_nanos - tenth + self.rng.u64(0..=tenth.saturating_mul(2));
        self.due_nanos = now_nanos.saturating_add(jittered);
    }

    /// The last heartbeat did not reach the collector: due again at once
    /// (the stream's backoff decides when it is actually tried).
    pub fn failed(&mut self) {
        self.due_nanos = 0;
    }

    /// A new interval (the filter was reconfigured), from the next heartbeat on.
    pub fn set_interval(&mut self, interval_ms: u64) {
        self.interval_nanos = interval_ms.saturating_mul(1_000_000);
    }

    /// When the next heartbeat is due (0: now).
    pub fn due_nanos(&self) -> u64 {
        self.due_nanos
    }
}
