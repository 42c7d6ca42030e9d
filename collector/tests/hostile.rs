//! A hostile client against the real collector (in process, real gRPC
//! listener, real SQLite): oversized hellos and events, sequence numbers
//! that jump, repeat or go back, timestamps far from the collector's clock,
//! empty-batch floods, and a flood that must not sample a quiet sidecar
//! away. Each attack is checked for what the issue asks: refused with a
//! reason naming the field and the limit, never acknowledged and dropped,
//! and the other sidecars unaffected. Every await is bounded.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dialguard_collector::ServeConfig;
use dialguard_proto::limits;
use dialguard_proto::v1::{Ack, ConnectionEvent, Hello, SidecarMessage, sidecar_message};
use tonic::Code;

fn hello_of(hello: Hello) -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(hello)),
    }
}

/// Opens a stream with `hello` and returns the status it is refused with.
async fn refused_hello(server: &Server, hello: Hello) -> tonic::Status {
    let mut client = server.client().await;
    match ReportStream::open_with(&mut client, hello_of(hello)).await {
        Err(status) => status,
        Ok(mut stream) => stream.error().await,
    }
}

/// The sequences an ack refused.
fn refused(ack: &Ack) -> Vec<u64> {
    ack.rejected.iter().map(|r| r.sequence).collect()
}

/// The reason the ack gives for refusing `sequence` (INVALID_ARGUMENT).
fn refusal(ack: &Ack, sequence: u64) -> &str {
    ack.rejected
        .iter()
        .find(|r| r.sequence == sequence)
        .map(|r| {
            assert_eq!(r.code, Code::InvalidArgument as i32, "{r:?}");
            r.message.as_str()
        })
        .unwrap_or_else(|| panic!("sequence {sequence} not refused: {ack:?}"))
}

async fn send_for_ack(stream: &mut ReportStream, events: Vec<ConnectionEvent>) -> Ack {
    stream.send(batch(events)).await;
    stream.next_full_ack().await.expect("the batch's ack")
}

fn file_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// This process's resident memory (the collector runs in it), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The database and its WAL, in bytes.
fn database_bytes(db: &std::path::Path) -> u64 {
    file_size(db) + file_size(&db.with_extension("db-wal"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_hello_is_refused_naming_the_field_and_its_limit() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    // An honest sidecar streams throughout.
    let mut client = server.client().await;
    let mut honest = ReportStream::open(&mut client, NODE, "honest").await;
    assert_eq!(honest.send_acked(misrouted_batch(1..=3)).await, 3);
    let before = database_bytes(&db);
    let rss_before = rss_bytes();

    // The attack that once cost 385 MB of memory and 791 MB of disk: a
    // 256 KiB pod name and 1,500 instance IPs (about 280 KB).
    let huge = Hello {
        pod_name: "p".repeat(256 << 10),
        instance_ips: (0..1500)
            .map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))
            .collect(),
        ..hello("huge-node", "vm-1")
    };
    let started = Instant::now();
    let status = refused_hello(&server, huge.clone()).await;
    let refused_in = started.elapsed();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("hello.pod_name: 262144 bytes, expected at most 253"),
        "{status:?}"
    );
    // Meanwhile the honest stream's acks keep coming.
    let started = Instant::now();
    assert_eq!(honest.send_acked(misrouted_batch(4..=6)).await, 6);
    let honest_ack = started.elapsed();

    let status = refused_hello(
        &server,
        Hello {
            pod_name: "ok".into(),
            ..huge
        },
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("hello.instance_ips: 1500 addresses, expected at most 8"),
        "{status:?}"
    );
    let status = refused_hello(
        &server,
        Hello {
            instance_ips: vec!["10.0.0.1".into(), "not-an-ip".into()],
            ..hello("node-x", "vm-1")
        },
    )
    .await;
    assert!(
        status
            .message()
            .contains("hello.instance_ips[1]: \"not-an-ip\", expected an IPv4 or IPv6 address"),
        "{status:?}"
    );

    // Nothing of them is kept: no sidecar, no growth beyond a page or two
    // of the honest sidecar's own rows.
    assert_eq!(count(&db, "SELECT count(*) FROM sidecars"), 1);
    let grown = database_bytes(&db).saturating_sub(before);
    // Other tests of this binary run alongside: a loose bound (the attack
    // once cost 385 MB), the figure printed.
    let rss_grown = rss_bytes().saturating_sub(rss_before);
    assert!(rss_grown < 64 << 20, "memory grew by {rss_grown} bytes");
    assert!(grown < 256 << 10, "the database grew by {grown} bytes");
    assert!(
        honest_ack < Duration::from_secs(1),
        "an honest ack took {honest_ack:?}"
    );
    assert_eq!(
        metric_now(
            server.http,
            r#"dialguard_streams_refused_total{reason="invalid_hello"}"#
        )
        .await,
        3.0
    );
    println!(
        "280 KB hello refused in {refused_in:?}; an honest batch acked in {honest_ack:?} \
         meanwhile; database grew {grown} bytes, memory {rss_grown} bytes"
    );
    drop((honest, client));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_hello_field_is_accepted_at_its_limit_and_refused_beyond() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    type Set = fn(&mut Hello, String);
    let fields: [(&str, usize, Set); 8] = [
        ("node_id", limits::NODE_ID, |h, v| h.node_id = v),
        ("vm_instance", limits::VM_INSTANCE, |h, v| h.vm_instance = v),
        ("pod_name", limits::POD_NAME, |h, v| h.pod_name = v),
        ("namespace", limits::NAMESPACE, |h, v| h.namespace = v),
        ("workload_name", limits::WORKLOAD_NAME, |h, v| {
            h.workload_name = v
        }),
        ("cluster_id", limits::CLUSTER_ID, |h, v| h.cluster_id = v),
        ("istio_version", limits::VERSION, |h, v| h.istio_version = v),
        ("filter_version", limits::VERSION, |h, v| {
            h.filter_version = v
        }),
    ];
    for (index, (field, max, set)) in fields.into_iter().enumerate() {
        let mut over = hello(&format!("node-{index}"), "vm-over");
        set(&mut over, "x".repeat(max + 1));
        let status = refused_hello(&server, over).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        let expected = format!("hello.{field}: {} bytes, expected at most {max}", max + 1);
        assert!(status.message().contains(&expected), "{status:?}");

        // At the limit: accepted, and its batch stored.
        let mut at = hello(&format!("node-{index}"), &format!("vm-{index}"));
        set(&mut at, "y".repeat(max));
        let mut client = server.client().await;
        let mut stream = ReportStream::open_with(&mut client, hello_of(at))
            .await
            .unwrap_or_else(|status| panic!("{field} at its limit: {status:?}"));
        assert_eq!(
            stream.send_acked(misrouted_batch(1..=1)).await,
            1,
            "{field}"
        );
        stream.close().await;
    }
    // One report row per source workload and namespace: all stored.
    assert_eq!(count(&db, "SELECT sum(count) FROM aggregates"), 8);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_over_a_field_limit_is_refused_alone_in_its_ack() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    type Set = fn(&mut ConnectionEvent, String);
    let fields: [(&str, usize, Set); 5] = [
        ("cluster_name", limits::CLUSTER_NAME, |e, v| {
            e.cluster_name = v
        }),
        ("filter_chain_name", limits::FILTER_CHAIN_NAME, |e, v| {
            e.filter_chain_name = v
        }),
        (
            "upstream_transport_failure_reason",
            limits::FAILURE_REASON,
            |e, v| e.upstream_transport_failure_reason = v,
        ),
        ("intended_service", limits::INTENDED_SERVICE, |e, v| {
            e.intended_service = v
        }),
        ("upstream_workload", limits::UPSTREAM_WORKLOAD, |e, v| {
            e.upstream_workload = v
        }),
    ];
    let mut next = 1;
    let mut stored = Vec::new();
    for (field, max, set) in fields {
        let mut at_limit = misrouted(next);
        set(&mut at_limit, "a".repeat(max));
        let mut over = misrouted(next + 1);
        set(&mut over, "b".repeat(max + 1));
        let ack = send_for_ack(&mut stream, vec![at_limit, over, misrouted(next + 2)]).await;
        assert_eq!(ack.through_sequence, next + 2);
        assert_eq!(refused(&ack), [next + 1], "{field}: {ack:?}");
        let expected = format!(
            "events[1].{field}: {} bytes, expected at most {max}",
            max + 1
        );
        assert!(refusal(&ack, next + 1).contains(&expected), "{ack:?}");
        stored.extend([next as i64, next as i64 + 2]);
        next += 3;
    }
    // An address field of a megabyte is refused without being parsed.
    let mut long_ip = misrouted(next);
    if let Some(dest) = long_ip.original_destination.as_mut() {
        dest.ip = "1".repeat(1 << 20);
    }
    let ack = send_for_ack(&mut stream, vec![long_ip]).await;
    assert!(
        refusal(&ack, next).contains("events[0].original_destination"),
        "{ack:?}"
    );
    assert_eq!(stored_sequences(&db, "vm-1"), stored);
    assert_eq!(
        count(&db, "SELECT rejected_total FROM sidecars"),
        6,
        "refusals are counted for the report"
    );
    drop((stream, client));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_acknowledged_event_is_stored_a_duplicate_or_refused_never_dropped() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;

    // Out of range: 2^63 and 2^64-1 are refused, and pin nothing.
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    let ack = send_for_ack(&mut stream, vec![misrouted(1 << 63), misrouted(u64::MAX)]).await;
    assert_eq!(refused(&ack), [1 << 63, u64::MAX]);
    assert!(
        refusal(&ack, u64::MAX).contains(&format!(
            "expected a sequence number from 1 to {}",
            limits::MAX_SEQUENCE
        )),
        "{ack:?}"
    );
    drop(stream);

    // A new stream: 1..=3 are stored, not taken for resends below a mark.
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    let ack = send_for_ack(&mut stream, (1..=3).map(misrouted).collect()).await;
    assert_eq!((ack.through_sequence, refused(&ack)), (3, vec![]));

    // Out of order within a batch: [5, 3, 4] stores 5 and refuses 3 and 4.
    let ack = send_for_ack(&mut stream, vec![misrouted(5), misrouted(3), misrouted(4)]).await;
    assert_eq!(ack.through_sequence, 5);
    assert_eq!(refused(&ack), [3, 4]);
    assert!(refusal(&ack, 3).contains("3 is not above 5"), "{ack:?}");

    // Backwards across batches of one stream: the ack never goes back.
    let ack = send_for_ack(&mut stream, vec![misrouted(10)]).await;
    assert_eq!((ack.through_sequence, refused(&ack)), (10, vec![]));
    let ack = send_for_ack(&mut stream, vec![misrouted(2)]).await;
    assert_eq!(ack.through_sequence, 10, "the ack went backwards");
    assert_eq!(refused(&ack), [2]);
    drop(stream);

    // On a new stream, what was never stored below the highest (4, 6 to 9)
    // is stored; what was (10) is a duplicate; 11 is new.
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    let ack = send_for_ack(&mut stream, [4, 6, 7, 8, 9, 10, 11].map(misrouted).to_vec()).await;
    assert_eq!((ack.through_sequence, refused(&ack)), (11, vec![]));
    drop(stream);

    // Everything acknowledged and not refused is stored, once.
    assert_eq!(
        stored_sequences(&db, "vm-1"),
        (1..=11).collect::<Vec<i64>>()
    );
    assert_eq!(misrouted_aggregate(&db), 11);
    assert_eq!(
        metric_now(server.http, "dialguard_events_duplicate_total").await,
        1.0
    );
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jump_to_the_highest_sequence_does_not_blind_the_vm() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    // The highest sequence there is, then the VM's real events from 1.
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    let top = limits::MAX_SEQUENCE;
    let ack = send_for_ack(&mut stream, vec![misrouted(top)]).await;
    assert_eq!((ack.through_sequence, refused(&ack)), (top, vec![]));
    drop(stream);
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    let ack = send_for_ack(&mut stream, (1..=3).map(misrouted).collect()).await;
    assert_eq!((ack.through_sequence, refused(&ack)), (3, vec![]));
    assert_eq!(stored_sequences(&db, "vm-1"), [1, 2, 3, top as i64]);
    assert_eq!(misrouted_aggregate(&db), 4);
    drop((stream, client));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn timestamps_far_from_the_collectors_clock_are_refused() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        retention: Some(Duration::from_secs(24 * 3600)),
        ..test_config(&db)
    })
    .await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    let now = dialguard_collector::time::now_unix_nanos();
    const MINUTE: u64 = 60_000_000_000;
    let at = |sequence, timestamp_unix_nanos| ConnectionEvent {
        timestamp_unix_nanos,
        ..misrouted(sequence)
    };
    let ack = send_for_ack(
        &mut stream,
        vec![
            at(1, 0),
            at(2, u64::MAX),
            at(3, now + 120 * MINUTE),
            at(4, now - 25 * 60 * MINUTE),
            at(5, now - MINUTE),
            at(6, now + 30 * MINUTE),
        ],
    )
    .await;
    assert_eq!(ack.through_sequence, 6);
    assert_eq!(refused(&ack), [1, 2, 3, 4]);
    for sequence in 1..=4 {
        assert!(
            refusal(&ack, sequence).contains("timestamp_unix_nanos"),
            "{ack:?}"
        );
    }
    assert!(
        refusal(&ack, 1).contains("1970-01-01T00:00:00.000Z"),
        "{ack:?}"
    );
    assert_eq!(stored_sequences(&db, "vm-1"), [5, 6]);
    // The report row's times are the accepted events'.
    let (first, last): (i64, i64) = read_only(&db)
        .query_row(
            "SELECT first_seen_ns, last_seen_ns FROM aggregates",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .expect("one aggregate row");
    assert_eq!(
        (first as u64, last as u64),
        (now - MINUTE, now + 30 * MINUTE)
    );
    drop((stream, client));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_batches_skip_the_store_and_a_flood_of_them_ends_the_stream() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut honest = ReportStream::open(&mut client, NODE, "honest").await;
    assert_eq!(honest.send_acked(misrouted_batch(1..=2)).await, 2);
    let commits = "dialguard_commit_duration_seconds_count";
    let commits_before = metric_now(server.http, commits).await;

    let mut stream = ReportStream::open(&mut client, NODE, "flood").await;
    assert_eq!(stream.send_acked(misrouted_batch(1..=1)).await, 1);
    let commits_after_one = metric_now(server.http, commits).await;
    // Ten empty batches in a second: acked through what the stream sent,
    // and not one commit.
    for _ in 0..10 {
        assert_eq!(stream.send_acked(batch(Vec::new())).await, 1);
    }
    assert_eq!(metric_now(server.http, commits).await, commits_after_one);
    assert!(commits_after_one > commits_before);
    // The eleventh within the same second ends the stream.
    stream.send(batch(Vec::new())).await;
    let status = stream.error().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("empty batches"), "{status:?}");
    assert_eq!(
        metric_now(
            server.http,
            r#"dialguard_streams_refused_total{reason="empty_batch_flood"}"#
        )
        .await,
        1.0
    );
    // The others go on.
    assert_eq!(honest.send_acked(misrouted_batch(3..=4)).await, 4);
    assert_eq!(stored_sequences(&db, "flood"), [1]);
    drop((honest, client));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_does_not_sample_away_a_quiet_sidecars_rows() {
    let (_dir, db) = temp_db();
    let server = Server::start_overloaded(&db).await;
    let mut client = server.client().await;
    let mut flood = ReportStream::open(&mut client, NODE, "flood").await;
    let mut quiet = ReportStream::open(&mut client, NODE, "quiet").await;
    const BATCHES: u64 = 40;
    const PER_BATCH: u64 = 100;
    let mut quiet_sent = 0;
    for b in 0..BATCHES {
        let first = b * PER_BATCH + 1;
        let last = first + PER_BATCH - 1;
        assert_eq!(flood.send_acked(misrouted_batch(first..=last)).await, last);
        // Now and then one event of the quiet VM, with sequences that
        // `sequence % n` sampling would never keep.
        if b % 8 == 7 {
            quiet_sent += 1;
            let sequence = quiet_sent * 2 + 1;
            assert_eq!(
                quiet.send_acked(misrouted_batch(sequence..=sequence)).await,
                sequence
            );
        }
    }
    let flood_rows = stored_sequences(&db, "flood").len() as u64;
    let total = BATCHES * PER_BATCH;
    assert!(
        flood_rows < total / 4,
        "the flood kept {flood_rows} of {total} raw rows: not sampled"
    );
    assert_eq!(
        stored_sequences(&db, "quiet").len() as u64,
        quiet_sent,
        "the quiet VM lost raw rows to the flood"
    );
    // Aggregates stay exact for both.
    assert_eq!(misrouted_aggregate(&db), (total + quiet_sent) as i64);
    drop((flood, quiet, client));
    server.stop().await;
}
