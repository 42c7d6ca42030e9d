//! Events awaiting the collector's acknowledgement, per VM, bounded by count
//! and bytes. Sequence numbers start at 1 and never repeat within a VM, so the
//! collector can store resent events once.

use std::collections::VecDeque;

use dialguard_proto::v1::{ConnectionEvent, DeliveryCounters, EventBatch};
use prost::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_batch_events: usize,
}

impl From<&crate::CollectorConfig> for OutboxLimits {
    fn from(c: &crate::CollectorConfig) -> Self {
        Self {
            max_events: c.max_buffered_events,
            max_bytes: c.max_buffered_bytes,
            max_batch_events: c.max_batch_events,
        }
    }
}

#[derive(Debug)]
pub struct Outbox {
    limits: OutboxLimits,
    last_sequence: u64,
    /// Unacknowledged events in sequence order, with their encoded sizes.
    queue: VecDeque<(ConnectionEvent, usize)>,
    bytes: usize,
    /// Highest sequence already sent on the current stream.
    sent_through: u64,
    /// Highest sequence ever sent, on any stream.
    highest_sent: u64,
    dropped_total: u64,
    resent_total: u64,
    sent_total: u64,
    acked_total: u64,
    rejected_total: u64,
}

impl Outbox {
    pub fn new(limits: OutboxLimits) -> Self {
        Self {
            limits,
            last_sequence: 0,
            queue: VecDeque::new(),
            bytes: 0,
            sent_through: 0,
            highest_sent: 0,
            dropped_total: 0,
            resent_total: 0,
            sent_total: 0,
            acked_total: 0,
            rejected_total: 0,
        }
    }

    /// Adds an event built with the next sequence number; when the buffer is
    /// over its limits the oldest events are dropped and counted.
    pub fn push_with(&mut self, build: impl FnOnce(u64) -> ConnectionEvent) {
        self.last_sequence += 1;
        let event = build(self.last_sequence);
        let size = event.encoded_len();
        self.queue.push_back((event, size));
        self.bytes += size;
        self.trim();
    }

    /// New limits (the filter was reconfigured): what is buffered stays,
    /// down to the new bounds, the oldest dropped and counted first.
    pub fn set_limits(&mut self, limits: OutboxLimits) {
        self.limits = limits;
        self.trim();
    }

    /// Gives up every buffered event (they cannot be delivered any more),
    /// counted as dropped; returns how many.
    pub fn give_up(&mut self) -> u64 {
        let given_up = self.queue.len() as u64;
        self.queue.clear();
        self.bytes = 0;
        self.dropped_total += given_up;
        given_up
    }

    fn trim(&mut self) {
        while self.queue.len() > self.limits.max_events
            || (self.bytes > self.limits.max_bytes && self.queue.len() > 1)
        {
            if let Some((_, size)) = self.queue.pop_front() {
                self.bytes -= size;
                self.dropped_total += 1;
            }
        }
    }

    /// The next batch of events not yet sent on the current stream, marked as sent.
    pub fn take_batch(&mut self) -> Option<EventBatch> {
        let sent_through = self.sent_through;
        let first_unsent = self
            .queue
            .partition_point(|(event, _)| event.sequence <= sent_through);
        let events: Vec<ConnectionEvent> = self
            .queue
            .range(first_unsent..)
            .take(self.limits.max_batch_events)
            .map(|(event, _)| event.clone())
            .collect();
        self.sent_through = events.last()?.sequence;
        let highest_sent = self.highest_sent;
        self.resent_total += events.iter().filter(|e| e.sequence <= highest_sent).count() as u64;
        self.highest_sent = self.highest_sent.max(self.sent_through);
        self.sent_total += events.len() as u64;
        Some(EventBatch {
            events,
            dropped_total: self.dropped_total,
        })
    }

    /// The collector stored every event up to `through`.
    pub fn acknowledge(&mut self, through: u64) {
        while let Some((event, size)) = self.queue.front() {
            if event.sequence > through {
                break;
            }
            self.bytes -= *size;
            self.queue.pop_front();
            self.acked_total += 1;
        }
    }

    /// The collector refused `n` of the acknowledged events (its ack lists them).
    pub fn rejected(&mut self, n: u64) {
        self.rejected_total += n;
    }

    /// Sent, acknowledged, resent, dropped and rejected events since the VM started.
    pub fn delivery_counters(&self) -> DeliveryCounters {
        DeliveryCounters {
            sent: self.sent_total,
            acked: self.acked_total,
            resent: self.resent_total,
            dropped: self.dropped_total,
            rejected: self.rejected_total,
        }
    }

    /// The stream ended: whatever was sent but not acknowledged goes again on
    /// the next stream.
    pub fn rewind(&mut self) {
        self.sent_through = 0;
    }

    /// Whether a batch is waiting to be sent.
    pub fn has_unsent(&self) -> bool {
        self.queue
            .back()
            .is_some_and(|(event, _)| event.sequence > self.sent_through)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// Events sent more than once (after a stream was lost), since the VM started.
    pub fn resent_total(&self) -> u64 {
        self.resent_total
    }
}
