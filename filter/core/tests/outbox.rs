//! The outbox: sequence numbers, batches, acknowledgements, resends and bounded memory.

use dialguard_filter_core::{Outbox, OutboxLimits};
use dialguard_proto::v1::ConnectionEvent;

fn outbox(max_events: usize, max_batch_events: usize) -> Outbox {
    Outbox::new(OutboxLimits {
        max_events,
        max_bytes: 1 << 20,
        max_batch_events,
    })
}

fn push(outbox: &mut Outbox, n: usize) {
    for _ in 0..n {
        outbox.push_with(|sequence| ConnectionEvent {
            sequence,
            cluster_name: "c".into(),
            ..Default::default()
        });
    }
}

fn sequences(outbox: &mut Outbox) -> Vec<Vec<u64>> {
    std::iter::from_fn(|| outbox.take_batch())
        .map(|b| b.events.iter().map(|e| e.sequence).collect())
        .collect()
}

#[test]
fn batches_in_order_and_sends_each_event_once_per_stream() {
    let mut outbox = outbox(100, 2);
    push(&mut outbox, 5);
    assert!(outbox.has_unsent());
    assert_eq!(sequences(&mut outbox), [vec![1, 2], vec![3, 4], vec![5]]);
    assert!(!outbox.has_unsent());
    push(&mut outbox, 1);
    assert_eq!(sequences(&mut outbox), [vec![6]]);
}

#[test]
fn acknowledged_events_leave_and_a_lost_stream_resends_the_rest() {
    let mut outbox = outbox(100, 10);
    push(&mut outbox, 5);
    assert_eq!(sequences(&mut outbox), [vec![1, 2, 3, 4, 5]]);
    outbox.acknowledge(3);
    assert_eq!(outbox.len(), 2);
    assert_eq!(outbox.resent_total(), 0);
    outbox.rewind();
    assert_eq!(sequences(&mut outbox), [vec![4, 5]]);
    assert_eq!(outbox.resent_total(), 2);
    outbox.acknowledge(5);
    assert!(outbox.is_empty());
    assert_eq!(outbox.buffered_bytes(), 0);
    // Sequence numbers never repeat.
    push(&mut outbox, 1);
    assert_eq!(sequences(&mut outbox), [vec![6]]);
}

#[test]
fn full_buffer_drops_the_oldest_and_counts_them() {
    let mut outbox = outbox(3, 10);
    push(&mut outbox, 5);
    assert_eq!(outbox.len(), 3);
    assert_eq!(outbox.dropped_total(), 2);
    let batch = outbox.take_batch().expect("batch");
    assert_eq!(batch.dropped_total, 2);
    assert_eq!(
        batch.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [3, 4, 5]
    );
}

#[test]
fn byte_limit_bounds_memory() {
    let mut outbox = Outbox::new(OutboxLimits {
        max_events: 1000,
        max_bytes: 64,
        max_batch_events: 1000,
    });
    push(&mut outbox, 100);
    assert!(outbox.buffered_bytes() <= 64, "{}", outbox.buffered_bytes());
    assert_eq!(outbox.len() as u64 + outbox.dropped_total(), 100);
}

#[test]
fn new_limits_keep_what_fits_and_count_the_rest() {
    let mut outbox = outbox(10, 5);
    push(&mut outbox, 8);
    outbox.take_batch().unwrap();
    outbox.set_limits(OutboxLimits {
        max_events: 6,
        max_bytes: 1 << 20,
        max_batch_events: 2,
    });
    assert_eq!(outbox.len(), 6);
    assert_eq!(outbox.dropped_total(), 2);
    // Sequences go on; the next batch uses the new batch size.
    push(&mut outbox, 1);
    assert_eq!(outbox.len(), 6);
    assert_eq!(outbox.dropped_total(), 3);
    outbox.rewind();
    assert_eq!(
        sequences(&mut outbox),
        vec![vec![4, 5], vec![6, 7], vec![8, 9]]
    );
}

#[test]
fn giving_up_counts_every_buffered_event_as_dropped() {
    let mut outbox = outbox(10, 5);
    push(&mut outbox, 4);
    outbox.acknowledge(1);
    assert_eq!(outbox.give_up(), 3);
    assert!(outbox.is_empty());
    assert_eq!(outbox.dropped_total(), 3);
    assert_eq!(outbox.delivery_counters().dropped, 3);
    push(&mut outbox, 1);
    assert_eq!(sequences(&mut outbox), vec![vec![5]]);
}
