//! One connection, judged and counted once: on the root's timer while it is
//! open, as soon as Envoy has chosen its upstream ([`JudgePoint::Open`]), or
//! at its end (`proxy_on_log`, which also sees connections whose upstream
//! failed or never existed) if it ended first. In enforce mode its first
//! data in either direction is a third chance, so no byte passes unjudged.

use dialguard_filter_core::{FilterConfig, JudgePoint, Mode, Outcome, judge};

use crate::host::{EnvoyConnection, now_unix_nanos};
use crate::metrics;
use crate::reporter::Reporter;

/// What judging did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// Open, upstream not chosen yet: ask again later.
    NotYet,
    /// Judged and counted; `close` when enforce mode wants it closed (the
    /// caller closes it).
    Done { close: bool },
}

/// Judges the connection whose context is current by `config` (its root's),
/// and counts and records it in the VM's `reporter`.
pub fn judge_and_record(config: &FilterConfig, reporter: &mut Reporter, at: JudgePoint) -> Judged {
    let mut facts = EnvoyConnection::default();
    let judgement = match judge(config, &mut reporter.upstreams, &mut facts, at) {
        Outcome::NotYet => return Judged::NotYet,
        Outcome::Unjudged => {
            metrics::add(reporter.metrics.unjudged, 1);
            reporter.tally.unjudged();
            return Judged::Done { close: false };
        }
        Outcome::Judged(judgement) => judgement,
    };
    metrics::add(reporter.metrics.verdict(judgement.verdict), 1);
    reporter.tally.judged(judgement.verdict);
    // At the end there is nothing left to close.
    let enforced =
        at == JudgePoint::Open && config.mode == Mode::Enforce && judgement.would_close();
    if judgement.is_reported() {
        let dropped_before = reporter.outbox.dropped_total();
        let now = now_unix_nanos();
        let metadata = &mut reporter.metadata;
        reporter.outbox.push_with(|seq| {
            let mut event = judgement.to_event(&mut facts, metadata, seq, now);
            event.enforced = enforced;
            event.judged_open = at == JudgePoint::Open;
            event
        });
        metrics::add(
            reporter.metrics.events_dropped,
            reporter.outbox.dropped_total() - dropped_before,
        );
    }
    if enforced {
        metrics::add(reporter.metrics.enforced, 1);
        reporter.tally.enforced();
    }
    Judged::Done { close: enforced }
}
