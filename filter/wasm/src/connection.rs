//! One downstream connection. Judged once, in `on_log`: the one callback that
//! also sees connections whose upstream failed or never sent a byte.

use std::rc::Rc;

use dialguard_filter_core::judge;
use proxy_wasm::traits::{Context, StreamContext};

use crate::host::{EnvoyConnection, now_unix_nanos};
use crate::metrics;
use crate::root::Shared;

#[derive(Debug)]
pub struct ConnectionFilter {
    shared: Option<Rc<Shared>>,
}

impl ConnectionFilter {
    pub fn new(shared: Option<Rc<Shared>>) -> Self {
        Self { shared }
    }
}

impl Context for ConnectionFilter {}

impl StreamContext for ConnectionFilter {
    fn on_log(&mut self) {
        let Some(shared) = &self.shared else { return };
        let mut facts = EnvoyConnection;
        let Ok(mut upstreams) = shared.upstreams.try_borrow_mut() else {
            return;
        };
        let Some(judgement) = judge(&shared.config, &mut upstreams, &mut facts) else {
            metrics::add(shared.metrics.unjudged, 1);
            return;
        };
        metrics::add(shared.metrics.verdict(judgement.verdict), 1);
        if judgement.is_reported() {
            let Ok(mut outbox) = shared.outbox.try_borrow_mut() else {
                return;
            };
            let dropped_before = outbox.dropped_total();
            let now = now_unix_nanos();
            outbox.push_with(|seq| judgement.to_event(&mut facts, seq, now));
            metrics::add(
                shared.metrics.events_dropped,
                outbox.dropped_total() - dropped_before,
            );
        }
    }
}
