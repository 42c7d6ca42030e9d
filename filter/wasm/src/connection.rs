//! One connection, judged once when it ends (`proxy_on_log`: the one callback
//! that also sees connections whose upstream failed or never sent a byte).

use dialguard_filter_core::judge;

use crate::host::{EnvoyConnection, now_unix_nanos};
use crate::metrics;
use crate::root::Root;

pub fn on_log(root: &mut Root) {
    let mut facts = EnvoyConnection;
    let Some(judgement) = judge(&root.config, &mut root.upstreams, &mut facts) else {
        metrics::add(root.metrics.unjudged, 1);
        return;
    };
    metrics::add(root.metrics.verdict(judgement.verdict), 1);
    if judgement.is_reported() {
        let dropped_before = root.outbox.dropped_total();
        let now = now_unix_nanos();
        root.outbox
            .push_with(|seq| judgement.to_event(&mut facts, seq, now));
        metrics::add(
            root.metrics.events_dropped,
            root.outbox.dropped_total() - dropped_before,
        );
    }
}
