//! Heartbeats: due at start, then every interval within a tenth either way;
//! the tally and the outbox give the counters they carry.

use dialguard_filter_core::{HeartbeatClock, Outbox, OutboxLimits, Tally, Verdict};
use dialguard_proto::v1::{ConnectionEvent, DeliveryCounters};

const SECOND: u64 = 1_000_000_000;

#[test]
fn a_vm_heartbeats_at_start_then_every_interval_with_a_tenth_of_jitter() {
    let mut clock = HeartbeatClock::new(60_000, 7);
    assert!(clock.is_due(0), "the hello at start is due at once");
    let start = 1_000 * SECOND;
    let mut now = start;
    let mut gaps = Vec::new();
    for _ in 0..200 {
        clock.sent(now);
        let due = clock.due_nanos();
        assert!(!clock.is_due(due - 1));
        assert!(clock.is_due(due));
        gaps.push(due - now);
        now = due;
    }
    let (min, max) = (*gaps.iter().min().unwrap(), *gaps.iter().max().unwrap());
    assert!(min >= 54 * SECOND && max <= 66 * SECOND, "{min}..{max}");
    assert!(
        max - min > 6 * SECOND,
        "jittered, not in step: {min}..{max}"
    );
}

#[test]
fn vms_started_together_spread_their_heartbeats() {
    let dues: Vec<u64> = (0..50u64)
        .map(|seed| {
            let mut clock = HeartbeatClock::new(60_000, seed);
            clock.sent(0);
            clock.due_nanos()
        })
        .collect();
    let distinct: std::collections::HashSet<_> = dues.iter().map(|d| d / SECOND).collect();
    assert!(distinct.len() >= 8, "{dues:?}");
}

#[test]
fn a_failed_heartbeat_is_due_again() {
    let mut clock = HeartbeatClock::new(1_000, 1);
    clock.sent(5 * SECOND);
    assert!(!clock.is_due(5 * SECOND + 1));
    clock.failed();
    assert!(clock.is_due(5 * SECOND + 1));
}

#[test]
fn the_heartbeat_carries_cumulative_verdict_and_delivery_counters() {
    let mut tally = Tally::default();
    for verdict in [
        Verdict::Match,
        Verdict::Match,
        Verdict::Service,
        Verdict::Misrouted,
        Verdict::Resolved,
    ] {
        tally.judged(verdict);
    }
    tally.unjudged();
    tally.enforced();
    let mut outbox = Outbox::new(OutboxLimits {
        max_events: 2,
        max_bytes: 1 << 20,
        max_batch_events: 10,
    });
    for _ in 0..3 {
        outbox.push_with(|sequence| ConnectionEvent {
            sequence,
            ..ConnectionEvent::default()
        });
    }
    let batch = outbox.take_batch().unwrap();
    assert_eq!(batch.events.len(), 2);
    outbox.rewind();
    outbox.take_batch().unwrap();
    outbox.acknowledge(3);
    outbox.rejected(1);
    let heartbeat = tally.heartbeat(&outbox);
    let connections = heartbeat.connections.unwrap();
    assert_eq!(
        (
            connections.r#match,
            connections.service,
            connections.misrouted,
            connections.resolved,
            connections.allowed,
            connections.unjudged,
            connections.enforced
        ),
        (2, 1, 1, 1, 0, 1, 1)
    );
    assert_eq!(
        heartbeat.delivery.unwrap(),
        DeliveryCounters {
            sent: 4,
            acked: 2,
            resent: 2,
            dropped: 1,
            rejected: 1,
        }
    );
}
