//! Envoy counters defined by the filter (`dialguard.*` on Envoy's stats).

use dialguard_filter_core::Verdict;

use crate::abi;

const VERDICTS: [Verdict; 7] = [
    Verdict::Match,
    Verdict::Service,
    Verdict::Allowed,
    Verdict::Misrouted,
    Verdict::Blackholed,
    Verdict::Redirected,
    Verdict::Resolved,
];

/// Counter ids; `None` where Envoy refused to define one (counting is then skipped).
#[derive(Debug, Default)]
pub struct Metrics {
    verdicts: [Option<u32>; VERDICTS.len()],
    pub unjudged: Option<u32>,
    pub enforced: Option<u32>,
    pub events_sent: Option<u32>,
    pub events_acked: Option<u32>,
    pub events_resent: Option<u32>,
    pub events_dropped: Option<u32>,
    pub events_rejected: Option<u32>,
    pub stream_failures: Option<u32>,
}

fn counter(name: &str) -> Option<u32> {
    abi::define_counter(name).ok()
}

impl Metrics {
    pub fn define() -> Self {
        Self {
            verdicts: VERDICTS.map(|v| counter(&format!("dialguard.connections.{}", v.label()))),
            unjudged: counter("dialguard.connections.unjudged"),
            enforced: counter("dialguard.connections.enforced"),
            events_sent: counter("dialguard.events.sent"),
            events_acked: counter("dialguard.events.acked"),
            events_resent: counter("dialguard.events.resent"),
            events_dropped: counter("dialguard.events.dropped"),
            events_rejected: counter("dialguard.events.rejected"),
            stream_failures: counter("dialguard.stream.failures"),
        }
    }

    pub fn verdict(&self, verdict: Verdict) -> Option<u32> {
        let index = VERDICTS.iter().position(|v| *v == verdict)?;
        *self.verdicts.get(index)?
    }
}

/// Adds to a counter; a failure to count never affects traffic.
pub fn add(counter: Option<u32>, n: u64) {
    if let Some(id) = counter {
        let _ = abi::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
    }
}
