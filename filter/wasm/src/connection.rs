//! One connection, judged once: when it ends (`proxy_on_log`, the one
//! callback that also sees connections whose upstream failed or never sent a
//! byte) or, in enforce mode, at its first data in either direction, when
//! the upstream is known and nothing has passed yet.

use dialguard_filter_core::{Mode, Verdict, judge};

use crate::host::{EnvoyConnection, now_unix_nanos};
use crate::metrics;
use crate::root::Root;

/// Judges, counts and records the connection; returns whether enforce mode
/// wants it closed (the caller closes it).
pub fn judge_and_record(root: &mut Root, enforce_now: bool) -> bool {
    let mut facts = EnvoyConnection;
    let Some(judgement) = judge(&root.config, &mut root.upstreams, &mut facts) else {
        metrics::add(root.metrics.unjudged, 1);
        return false;
    };
    metrics::add(root.metrics.verdict(judgement.verdict), 1);
    let enforced =
        enforce_now && root.config.mode == Mode::Enforce && judgement.verdict == Verdict::Misrouted;
    if judgement.is_reported() {
        let dropped_before = root.outbox.dropped_total();
        let now = now_unix_nanos();
        let metadata = &mut root.metadata;
        root.outbox.push_with(|seq| {
            let mut event = judgement.to_event(&mut facts, metadata, seq, now);
            event.enforced = enforced;
            event
        });
        metrics::add(
            root.metrics.events_dropped,
            root.outbox.dropped_total() - dropped_before,
        );
    }
    if enforced {
        metrics::add(root.metrics.enforced, 1);
    }
    enforced
}

pub fn on_log(root: &mut Root) {
    judge_and_record(root, false);
}
