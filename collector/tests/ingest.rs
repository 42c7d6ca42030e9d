//! Ingest end to end, in process: the real collector (`dialguard_collector::run`)
//! on loopback port 0 with a temporary SQLite database, driven by the generated
//! tonic client over a real HTTP/2 connection. Every await is bounded.

mod common;

use std::time::Duration;

use common::*;
use dialguard_collector::finding::{self, Cause};
use dialguard_collector::store::WriterConfig;
use dialguard_collector::{Limits, ServeConfig, report, store};
use dialguard_proto::v1::collector_client::CollectorClient;
use dialguard_proto::v1::{
    Ack, ConnectionEvent, EventBatch, Hello, SidecarMessage, SocketAddress, Verdict,
    sidecar_message,
};
use rusqlite::Connection;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Opens a stream that is expected to fail, returning the error status
/// whether it arrives as the call's result or on the response stream.
async fn open_expecting_error(
    client: &mut CollectorClient<Channel>,
    first: SidecarMessage,
    then: Option<SidecarMessage>,
) -> Status {
    match ReportStream::open_with(client, first).await {
        Err(status) => status,
        Ok(mut stream) => {
            if let Some(message) = then {
                // The collector may already have closed the stream; that's fine.
                let _ = stream.tx.send(message).await;
            }
            stream.error().await
        }
    }
}

fn assert_invalid_argument(status: &Status, needle: &str) {
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "unexpected status: {status:?}"
    );
    assert!(
        status.message().contains(needle),
        "status message {:?} does not mention {needle:?}",
        status.message()
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn ack_arrives_only_after_the_batch_is_committed() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;

    // Hold SQLite's write lock so the collector cannot commit: no ack may come.
    let blocker = Connection::open(&db).expect("open the database for writing");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    stream.send(misrouted_batch(1..=3)).await;
    let early = tokio::time::timeout(Duration::from_millis(800), stream.rx.message()).await;
    assert!(
        early.is_err(),
        "the collector answered before it could commit: {early:?}"
    );
    assert_eq!(stored_events(&db), 0);

    // Release the lock (well inside the writer's busy timeout): the commit
    // goes through, and only then the ack.
    blocker
        .execute_batch("ROLLBACK")
        .expect("release the write lock");
    drop(blocker);
    assert_eq!(stream.next_ack().await.expect("ack"), 3);

    // The ack has arrived: the batch must already be visible to a new reader.
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2, 3]);
    assert_eq!(stored_events(&db), 3);
    assert_eq!(misrouted_aggregate(&db), 3);
    assert_eq!(count(&db, "SELECT count(*) FROM aggregates"), 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sidecars WHERE vm_instance = 'vm-1'"
        ),
        1
    );

    drop(stream);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resent_events_are_stored_once_per_vm() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;

    let mut first = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(first.send_acked(misrouted_batch(1..=3)).await, 3);
    drop(first);

    // The VM reconnects and resends what it did not see acknowledged.
    let mut again = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(again.send_acked(misrouted_batch(1..=3)).await, 3);
    assert_eq!(stored_events(&db), 3);
    assert_eq!(misrouted_aggregate(&db), 3, "duplicates were counted");

    // Even within one stream.
    assert_eq!(again.send_acked(misrouted_batch(2..=3)).await, 3);
    assert_eq!(stored_events(&db), 3);
    assert_eq!(misrouted_aggregate(&db), 3, "duplicates were counted");
    drop(again);

    // The same sequence numbers from another VM are other events.
    let mut other_vm = ReportStream::open(&mut client, NODE, "vm-2").await;
    assert_eq!(other_vm.send_acked(misrouted_batch(1..=3)).await, 3);
    assert_eq!(stored_events(&db), 6);
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2, 3]);
    assert_eq!(stored_sequences(&db, "vm-2"), vec![1, 2, 3]);
    assert_eq!(misrouted_aggregate(&db), 6);
    assert_eq!(count(&db, "SELECT count(*) FROM sidecars"), 2);

    drop(other_vm);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_message_must_be_a_valid_hello() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;

    let status = open_expecting_error(&mut client, misrouted_batch(1..=3), None).await;
    assert_invalid_argument(&status, "hello");

    let no_vm = SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(hello(NODE, ""))),
    };
    let status = open_expecting_error(&mut client, no_vm, Some(misrouted_batch(1..=3))).await;
    assert_invalid_argument(&status, "hello.vm_instance");

    let no_node = SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(hello("", "vm-1"))),
    };
    let status = open_expecting_error(&mut client, no_node, Some(misrouted_batch(1..=3))).await;
    assert_invalid_argument(&status, "hello.node_id");

    assert_eq!(stored_events(&db), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM aggregates"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM sidecars"), 0);

    drop(client);
    server.stop().await;
}

/// The refusal the ack carries for `sequence`, checked to be INVALID_ARGUMENT
/// naming `field` and quoting `value`.
fn assert_refused(ack: &Ack, sequence: u64, field: &str, value: &str) {
    let refusal = ack
        .rejected
        .iter()
        .find(|r| r.sequence == sequence)
        .unwrap_or_else(|| panic!("sequence {sequence} not refused: {ack:?}"));
    assert_eq!(refusal.code, Code::InvalidArgument as i32, "{refusal:?}");
    assert!(
        refusal.message.starts_with(field) && refusal.message.contains(value),
        "the refusal should name {field} and quote {value}: {:?}",
        refusal.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_event_is_refused_alone() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;

    // Another VM, on its own connection, streaming concurrently.
    let mut other_client = server.client().await;
    let mut other = ReportStream::open(&mut other_client, NODE, "vm-2").await;
    assert_eq!(other.send_acked(misrouted_batch(1..=2)).await, 2);

    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(stream.send_acked(misrouted_batch(1..=2)).await, 2);

    let mut bad = misrouted(4);
    bad.original_destination = Some(SocketAddress {
        ip: "not-an-ip".into(),
        port: 9080,
    });
    let mut bad_port = misrouted(6);
    bad_port.upstream_host = Some(SocketAddress {
        ip: "10.0.3.9".into(),
        port: 70_000,
    });
    stream
        .send(batch(vec![misrouted(3), bad, misrouted(5), bad_port]))
        .await;
    // The whole batch is acknowledged: resending a bad event would fail again.
    let ack = stream.next_full_ack().await.expect("ack");
    assert_eq!(ack.through_sequence, 6);
    assert_eq!(ack.rejected.len(), 2, "{ack:?}");
    assert_refused(&ack, 4, "events[1].original_destination", "not-an-ip");
    assert_refused(&ack, 6, "events[3].upstream_host", "70000");

    // The valid events of that batch are stored, and the stream goes on.
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2, 3, 5]);
    assert_eq!(stream.send_acked(misrouted_batch(7..=7)).await, 7);
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2, 3, 5, 7]);

    // The other VM's stream is unaffected.
    assert_eq!(other.send_acked(misrouted_batch(3..=4)).await, 4);
    assert_eq!(stored_sequences(&db, "vm-2"), vec![1, 2, 3, 4]);
    assert_eq!(misrouted_aggregate(&db), 9);

    let report = report::query(&read_only(&db)).expect("report");
    assert_eq!(report.rejected_events, 2);

    drop(stream);
    drop(other);
    drop(client);
    drop(other_client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_verdict_is_refused() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;

    let mut unknown = misrouted(1);
    unknown.verdict = 99;
    // Unspecified (0) is not a verdict either.
    let mut unspecified = misrouted(2);
    unspecified.verdict = Verdict::Unspecified as i32;
    stream.send(batch(vec![unknown, unspecified])).await;
    let ack = stream.next_full_ack().await.expect("ack");
    assert_eq!(ack.through_sequence, 2);
    assert_refused(&ack, 1, "events[0].verdict", "99");
    assert_refused(&ack, 2, "events[1].verdict", "got 0");

    assert_eq!(stored_events(&db), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM aggregates"), 0);

    drop(stream);
    drop(client);
    server.stop().await;
}

/// The words the report gives a row of the default sidecar on the ratings cluster.
fn explain(cause: Cause, dialed: &str) -> finding::Explanation {
    finding::Subject {
        cause,
        cluster: "outbound|9080||ratings.bookinfo.svc.cluster.local",
        capturing_service: "ratings.bookinfo.svc.cluster.local",
        dialed: dialed.parse().expect("dialed address"),
        source_namespace: "bookinfo",
        source_workload: "reviews-v1",
    }
    .explain()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_has_the_documented_shape() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;

    // Two keys: misrouted (IPv4, with an upstream host) twice, and blackholed
    // (IPv6, no upstream host) three times, so that "misrouted rows first"
    // and "then by count" disagree.
    let blackholed = |sequence| event(sequence, Verdict::Blackholed, "[fd00::7]:5432", None);
    let mut message = batch(vec![
        misrouted(1),
        misrouted(2),
        blackholed(3),
        blackholed(4),
        blackholed(5),
    ]);
    if let Some(sidecar_message::Kind::Batch(batch)) = &mut message.kind {
        batch.dropped_total = 2;
    }
    assert_eq!(stream.send_acked(message).await, 5);

    // The pod that owns DEST connects too: the directory then knows who the
    // application meant to reach.
    let ratings = Hello {
        node_id: "sidecar~10.0.2.7~ratings-v1-5c6b-xyz12.bookinfo~bookinfo.svc.cluster.local"
            .into(),
        pod_name: "ratings-v1-5c6b-xyz12".into(),
        workload_name: "ratings-v1".into(),
        instance_ips: vec!["10.0.2.7".into(), "fd00::2:7".into()],
        ..hello(NODE, "vm-1")
    };
    let mut ratings_client = server.client().await;
    let ratings_stream = ReportStream::open_with(
        &mut ratings_client,
        SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(ratings)),
        },
    )
    .await
    .expect("ratings stream");
    let directory = wait_until("the directory has the ratings pod", || {
        let conn = read_only(&db);
        let entries = store::directory(&conn).expect("directory");
        (entries.len() == 3).then_some(entries)
    })
    .await;
    let owner = &directory[&"10.0.2.7".parse().expect("ip")];
    assert_eq!(owner.pod_name, "ratings-v1-5c6b-xyz12");
    assert!(directory.contains_key(&"fd00::2:7".parse().expect("ip")));

    let expected = json!({
        "rows": [
            {
                "sourceWorkload": "reviews-v1",
                "sourceNamespace": "bookinfo",
                "originalDestination": DEST,
                "upstreamHost": WRONG_POD,
                "cluster": "outbound|9080||ratings.bookinfo.svc.cluster.local",
                "verdict": "misrouted",
                "count": 2,
                "firstSeen": "2023-11-14T22:13:20.001Z",
                "lastSeen": "2023-11-14T22:13:20.002Z",
                "intended": {
                    "pod": "ratings-v1-5c6b-xyz12",
                    "namespace": "bookinfo",
                    "workload": "ratings-v1",
                    "lastSeen": "(when the pod was last connected)",
                },
                "capturingService": "ratings.bookinfo.svc.cluster.local",
                "upstreamWorkload": "ratings-v1;bookinfo;ratings;v1;Kubernetes",
                "summary": "bookinfo/reviews-v1 dialed pod bookinfo/ratings-v1-5c6b-xyz12 (10.0.2.7:9080) \
                    and reached 10.0.3.9:9080 (bookinfo/ratings-v1) through \
                    outbound|9080||ratings.bookinfo.svc.cluster.local, captured by service \
                    ratings.bookinfo.svc.cluster.local",
                "fix": finding::remediation("ratings.bookinfo.svc.cluster.local", 9080),
                "cause": "catch_all",
                "causeText": explain(Cause::CatchAll, DEST).cause_text,
                "culprit": {
                    "kind": "Service",
                    "namespace": "bookinfo",
                    "name": "ratings",
                    "inspect": "kubectl -n bookinfo get service ratings -o yaml",
                },
                "wouldClose": 2,
                "enforced": 0,
                "sourcePods": ["reviews-v1-7d9f-abcde"],
            },
            {
                "sourceWorkload": "reviews-v1",
                "sourceNamespace": "bookinfo",
                "originalDestination": "[fd00::7]:5432",
                "upstreamHost": null,
                "cluster": "outbound|9080||ratings.bookinfo.svc.cluster.local",
                "verdict": "blackholed",
                "count": 3,
                "firstSeen": "2023-11-14T22:13:20.003Z",
                "lastSeen": "2023-11-14T22:13:20.005Z",
                "intended": null,
                "capturingService": "ratings.bookinfo.svc.cluster.local",
                "upstreamWorkload": "ratings-v1;bookinfo;ratings;v1;Kubernetes",
                "summary": "bookinfo/reviews-v1 dialed [fd00::7]:5432 and reached no host through \
                    outbound|9080||ratings.bookinfo.svc.cluster.local, captured by service \
                    ratings.bookinfo.svc.cluster.local",
                "fix": explain(Cause::NoEndpoints, "[fd00::7]:5432").fix,
                "cause": "no_endpoints",
                "causeText": explain(Cause::NoEndpoints, "[fd00::7]:5432").cause_text,
                "culprit": {
                    "kind": "Service",
                    "namespace": "bookinfo",
                    "name": "ratings",
                    "inspect": "kubectl -n bookinfo get endpointslices -l kubernetes.io/service-name=ratings",
                },
                "wouldClose": 0,
                "enforced": 0,
                "sourcePods": ["reviews-v1-7d9f-abcde"],
            },
        ],
        "droppedEvents": 2,
        "rejectedEvents": 0,
        "sampledOutEvents": 0,
    });
    // The directory's last-seen time is the collector's clock: check its
    // form, then compare the rest exactly.
    let comparable = |mut value: serde_json::Value| {
        let seen = &mut value["rows"][0]["intended"]["lastSeen"];
        let text = seen.as_str().unwrap_or_default().to_owned();
        assert!(
            text.ends_with('Z') && text.len() == 24,
            "not RFC 3339 UTC with ms: {text:?}"
        );
        *seen = json!("(when the pod was last connected)");
        // Coverage depends on when the inventory was last written (at most
        // a second behind); its shape is checked in coverage.rs.
        let coverage = value
            .as_object_mut()
            .and_then(|report| report.remove("coverage"))
            .unwrap_or_default();
        assert!(
            coverage["sidecars"].is_array() && coverage["namespaces"].is_array(),
            "no coverage in the report: {coverage}"
        );
        value
    };

    // The library, over a read-only connection, while the collector runs.
    let conn = store::open_for_reading(&db).expect("open for reading");
    let report = report::query(&conn).expect("report query");
    assert_eq!(report.rows.len(), 2, "{report:?}");
    assert_eq!(report.rows[0].verdict, "misrouted");
    assert_eq!(report.rows[0].upstream_host.as_deref(), Some(WRONG_POD));
    assert_eq!(report.rows[1].upstream_host, None);
    assert_eq!(report.dropped_events, 2);
    let value = serde_json::to_value(&report).expect("serialize the report");
    assert_eq!(comparable(value), expected);
    let text = serde_json::to_string(&report).expect("serialize the report");
    for key in [
        "\"rows\"",
        "\"sourceWorkload\"",
        "\"sourceNamespace\"",
        "\"originalDestination\"",
        "\"upstreamHost\":null",
        "\"cluster\"",
        "\"verdict\"",
        "\"count\"",
        "\"firstSeen\"",
        "\"lastSeen\"",
        "\"droppedEvents\"",
    ] {
        assert!(text.contains(key), "{key} missing from {text}");
    }
    for row in &report.rows {
        for time in [&row.first_seen, &row.last_seen] {
            assert!(time.ends_with('Z'), "not UTC RFC 3339: {time}");
        }
    }

    // The HTTP API serves the same JSON.
    let (status, head, body) = http_get(server.http, "/api/v1/report").await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let served: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(comparable(served), expected);
    let (status, _, body) = http_get(server.http, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    drop(ratings_stream);
    drop(ratings_client);
    drop(stream);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dedupe_holds_across_a_restart_on_the_same_database() {
    let (_dir, db) = temp_db();

    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(stream.send_acked(misrouted_batch(1..=3)).await, 3);
    // Stop while the stream is still open: shutdown must not wait for it forever.
    server.stop().await;
    let status = stream.error().await;
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "an open stream should learn the collector is going away: {status:?}"
    );
    drop(stream);
    drop(client);

    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(stream.send_acked(misrouted_batch(1..=3)).await, 3);
    assert_eq!(stream.send_acked(misrouted_batch(4..=5)).await, 5);
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2, 3, 4, 5]);
    assert_eq!(misrouted_aggregate(&db), 5);
    assert_eq!(count(&db, "SELECT count(*) FROM sidecars"), 1);

    drop(stream);
    drop(client);
    server.stop().await;

    // Everything is still there once no collector runs.
    assert_eq!(stored_events(&db), 5);
    assert_eq!(misrouted_aggregate(&db), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_totals_are_acked_and_reported() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;

    let dropped = |total| SidecarMessage {
        kind: Some(sidecar_message::Kind::Batch(EventBatch {
            events: Vec::new(),
            dropped_total: total,
        })),
    };
    assert_eq!(stream.send_acked(dropped(7)).await, 0);
    let report = report::query(&store::open_for_reading(&db).expect("open")).expect("report");
    assert_eq!(report.dropped_events, 7);
    assert!(report.rows.is_empty(), "{report:?}");

    // The total is cumulative per VM: sending it again does not add it again.
    assert_eq!(stream.send_acked(dropped(7)).await, 0);
    let report = report::query(&store::open_for_reading(&db).expect("open")).expect("report");
    assert_eq!(report.dropped_events, 7);

    // Another VM's drops add up.
    let mut other = ReportStream::open(&mut client, NODE, "vm-2").await;
    assert_eq!(other.send_acked(dropped(1)).await, 0);
    let report = report::query(&store::open_for_reading(&db).expect("open")).expect("report");
    assert_eq!(report.dropped_events, 8);

    drop(stream);
    drop(other);
    drop(client);
    server.stop().await;
}

/// `run` promises to close connections still open after `shutdown_grace`.
/// A sidecar that stops reading its acks keeps its stream task blocked on
/// sending one, where it does not see the shutdown; `run` must still return.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_completes_when_a_sidecar_stops_reading_acks() {
    let (_dir, db) = temp_db();
    let grace = Duration::from_millis(500);
    let server = Server::start_with_grace(&db, grace).await;
    // A small receive window, so that unread acks soon stall the collector.
    let channel = bounded(
        "connecting to the collector",
        Endpoint::from_shared(format!("http://{}", server.grpc))
            .expect("endpoint")
            .initial_stream_window_size(1024)
            .initial_connection_window_size(65_535)
            .connect(),
    )
    .await
    .expect("connect to the collector");
    let mut client = CollectorClient::new(channel);
    let stream = ReportStream::open(&mut client, NODE, "vm-1").await;

    const SENT: u64 = 2000;
    let tx = stream.tx.clone();
    let feeder = tokio::spawn(async move {
        for sequence in 1..=SENT {
            let event = event(sequence, Verdict::Blackholed, DEST, None);
            if tx.send(batch(vec![event])).await.is_err() {
                break;
            }
        }
    });
    // Wait until the collector stops committing: it is blocked on an ack.
    let mut stored = -1;
    bounded("the collector to stall", async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = stored_events(&db);
            if now == stored {
                break;
            }
            stored = now;
        }
    })
    .await;
    assert!(
        stored > 0 && (stored as u64) < SENT,
        "expected the stream to stall on unread acks; {stored} of {SENT} stored"
    );

    let _ = server.stop.send(());
    let finished = tokio::time::timeout(grace + Duration::from_secs(5), server.task).await;
    feeder.abort();
    drop(stream);
    drop(client);
    let result = finished.unwrap_or_else(|_| {
        panic!("run() had not returned 5 s after shutdown_grace ({grace:?}) expired")
    });
    result
        .expect("the collector task panicked")
        .expect("run returned an error");
}

/// The binary keeps serving when its stderr is a closed pipe (a log shipper
/// that went away): logging a connected sidecar must not take its stream down.
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_stderr_does_not_break_streams() {
    let (_dir, db) = temp_db();
    let (mut serve, stderr) = ServeProcess::start(&db);
    // The reader is dropped here: the pipe closes.
    drop(stderr);
    let mut client = client(serve.grpc).await;
    let mut stream = ReportStream::open(&mut client, "node-a", "vm-1").await;
    stream.send(misrouted_batch(1..=2)).await;
    let ack = stream.next_ack().await;
    let _ = serve.child.kill();
    let _ = serve.child.wait();
    assert_eq!(ack.expect("an ack, not a broken stream"), 2);
}

// ---------------------------------------------------------------------------
// Limits, overload, retention, directory
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_never_says_hello_is_closed() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        limits: Limits {
            hello_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
        ..test_config(&db)
    })
    .await;
    let mut client = server.client().await;
    // Open the call, then say nothing.
    let (_silent, outbound) = tokio::sync::mpsc::channel::<SidecarMessage>(1);
    let response = bounded(
        "opening a silent stream",
        client.report(tokio_stream::wrappers::ReceiverStream::new(outbound)),
    )
    .await
    .expect("the call itself is accepted");
    let status = bounded("the stream's end", response.into_inner().message())
        .await
        .expect_err("a silent stream must end with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("hello"), "{status:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_beyond_the_limit_are_refused_until_one_closes() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        limits: Limits {
            max_streams: 2,
            ..Limits::default()
        },
        ..test_config(&db)
    })
    .await;
    let mut client = server.client().await;
    let mut first = ReportStream::open(&mut client, NODE, "vm-1").await;
    let mut second = ReportStream::open(&mut client, NODE, "vm-2").await;
    assert_eq!(first.send_acked(misrouted_batch(1..=1)).await, 1);

    let status = open_expecting_error(&mut client, hello_message(NODE, "vm-3"), None).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("at most 2 streams"), "{status:?}");
    // The open streams are unaffected.
    assert_eq!(second.send_acked(misrouted_batch(1..=2)).await, 2);

    // Once one closes, its slot is free again.
    drop(first);
    let mut third = wait_for_stream(&mut client, "vm-3").await;
    assert_eq!(third.send_acked(misrouted_batch(1..=3)).await, 3);
    assert_eq!(stored_events(&db), 6);

    drop((second, third, client));
    server.stop().await;
}

/// Opens a stream, retrying while the collector says RESOURCE_EXHAUSTED.
async fn wait_for_stream(client: &mut CollectorClient<Channel>, vm: &str) -> ReportStream {
    bounded("a free stream slot", async {
        loop {
            match ReportStream::open_with(client, hello_message(NODE, vm)).await {
                Ok(stream) => return stream,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_the_limit_ends_its_stream_only() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        limits: Limits {
            max_batch_events: 3,
            ..Limits::default()
        },
        ..test_config(&db)
    })
    .await;
    let mut client = server.client().await;
    let mut other = ReportStream::open(&mut client, NODE, "vm-2").await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(stream.send_acked(misrouted_batch(1..=3)).await, 3);
    stream.send(misrouted_batch(4..=7)).await;
    let status = stream.error().await;
    assert_invalid_argument(&status, "batch.events");
    assert!(status.message().contains("at most 3"), "{status:?}");
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2, 3]);
    assert_eq!(other.send_acked(misrouted_batch(1..=3)).await, 3);
    drop((stream, other, client));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn under_overload_raw_rows_are_sampled_and_aggregates_stay_exact() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        // Every batch counts as having waited too long.
        writer: WriterConfig {
            overloaded_after: Duration::ZERO,
            ..WriterConfig::default()
        },
        ..test_config(&db)
    })
    .await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    const BATCHES: u64 = 12;
    const PER_BATCH: u64 = 50;
    for b in 0..BATCHES {
        let first = b * PER_BATCH + 1;
        let last = first + PER_BATCH - 1;
        assert_eq!(stream.send_acked(misrouted_batch(first..=last)).await, last);
    }
    let total = (BATCHES * PER_BATCH) as i64;
    // Exact: every connection counted once.
    assert_eq!(misrouted_aggregate(&db), total);
    // Sampled: fewer raw rows, and the report says how many are missing.
    let rows = stored_events(&db);
    assert!(rows < total / 2, "{rows} raw rows of {total}: not sampled");
    assert!(rows > 0, "sampling must keep some raw rows");
    let report = report::query(&read_only(&db)).expect("report");
    assert_eq!(report.sampled_out_events as i64, total - rows);
    assert_eq!(report.rows[0].count as i64, total);

    // Resends of sampled-out events are still recognised as resends.
    assert_eq!(
        stream.send_acked(misrouted_batch(1..=PER_BATCH)).await,
        PER_BATCH
    );
    assert_eq!(misrouted_aggregate(&db), total);
    drop((stream, client));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_what_is_older_than_the_cutoff() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        retention: Some(Duration::from_secs(24 * 3600)),
        retention_every: Duration::from_millis(100),
        ..test_config(&db)
    })
    .await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    // 1..=3 carry 2023 timestamps; 4..=5 are from now.
    assert_eq!(stream.send_acked(misrouted_batch(1..=3)).await, 3);
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    let recent = |sequence| ConnectionEvent {
        timestamp_unix_nanos: now_ns,
        original_destination: Some(addr("10.0.2.8:9080")),
        ..misrouted(sequence)
    };
    assert_eq!(
        stream.send_acked(batch(vec![recent(4), recent(5)])).await,
        5
    );

    wait_until("the old events expire", || {
        (stored_sequences(&db, "vm-1") == [4, 5]).then_some(())
    })
    .await;
    let report = report::query(&read_only(&db)).expect("report");
    assert_eq!(report.rows.len(), 1, "{report:#?}");
    assert_eq!(report.rows[0].original_destination, "10.0.2.8:9080");
    assert_eq!(report.rows[0].count, 2);
    // The sidecar and its directory entry are current: kept.
    assert_eq!(count(&db, "SELECT count(*) FROM sidecars"), 1);
    assert_eq!(count(&db, "SELECT count(*) FROM directory"), 1);
    // Resends of expired events are still recognised (the VM's mark survives).
    assert_eq!(stream.send_acked(misrouted_batch(1..=3)).await, 3);
    assert_eq!(stored_sequences(&db, "vm-1"), vec![4, 5]);
    drop((stream, client));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_directory_outlives_the_stream() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    let connected = wait_until("the directory entry", || {
        let entries = store::directory(&read_only(&db)).expect("directory");
        entries
            .get(&"10.0.1.6".parse().expect("ip"))
            .map(|e| e.last_seen_ns)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(stream);
    let entry = wait_until("last seen moves on at disconnect", || {
        let entries = store::directory(&read_only(&db)).expect("directory");
        entries
            .get(&"10.0.1.6".parse().expect("ip"))
            .filter(|e| e.last_seen_ns > connected)
            .cloned()
    })
    .await;
    assert_eq!(entry.pod_name, "reviews-v1-7d9f-abcde");
    assert_eq!(entry.workload_name, "reviews-v1");
    drop(client);
    server.stop().await;
}
