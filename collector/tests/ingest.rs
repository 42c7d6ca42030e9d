//! Ingest end to end, in process: the real collector (`dialguard_collector::run`)
//! on loopback port 0 with a temporary SQLite database, driven by the generated
//! tonic client over a real HTTP/2 connection. Every await is bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use dialguard_collector::{report, store};
use dialguard_proto::v1::collector_client::CollectorClient;
use dialguard_proto::v1::{EventBatch, SidecarMessage, SocketAddress, Verdict, sidecar_message};
use rusqlite::Connection;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
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

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    bounded("an HTTP GET", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect http");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        let raw = String::from_utf8(raw).expect("UTF-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        let head = head.to_ascii_lowercase();
        assert!(
            !head.contains("transfer-encoding: chunked"),
            "chunked response not handled by this test: {head}"
        );
        (status, head, body.to_owned())
    })
    .await
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

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_event_fails_only_its_own_stream() {
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
    stream
        .send(batch(vec![misrouted(3), bad, misrouted(5)]))
        .await;
    let status = stream.error().await;
    assert_invalid_argument(&status, "events[1].original_destination");
    assert!(
        status.message().contains("not-an-ip"),
        "the message should quote the bad value: {:?}",
        status.message()
    );

    // The acked batch stays; nothing of the rejected batch is stored.
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2]);

    // The other VM's stream is unaffected.
    assert_eq!(other.send_acked(misrouted_batch(3..=4)).await, 4);
    assert_eq!(stored_sequences(&db, "vm-2"), vec![1, 2, 3, 4]);
    assert_eq!(misrouted_aggregate(&db), 6);

    drop(stream);
    drop(other);
    drop(client);
    drop(other_client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_verdict_is_rejected() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;

    let mut unknown = misrouted(1);
    unknown.verdict = 99;
    stream.send(batch(vec![unknown])).await;
    let status = stream.error().await;
    assert_invalid_argument(&status, "events[0].verdict");
    assert!(
        status.message().contains("99"),
        "the message should quote the bad value: {:?}",
        status.message()
    );

    // Unspecified (0) is not a verdict either.
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    let mut unspecified = misrouted(1);
    unspecified.verdict = Verdict::Unspecified as i32;
    stream.send(batch(vec![unspecified])).await;
    assert_invalid_argument(&stream.error().await, "events[0].verdict");

    assert_eq!(stored_events(&db), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM aggregates"), 0);

    drop(stream);
    drop(client);
    server.stop().await;
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
            },
        ],
        "droppedEvents": 2,
    });

    // The library, over a read-only connection, while the collector runs.
    let conn = store::open_for_reading(&db).expect("open for reading");
    let report = report::query(&conn).expect("report query");
    assert_eq!(report.rows.len(), 2, "{report:?}");
    assert_eq!(report.rows[0].verdict, "misrouted");
    assert_eq!(report.rows[0].upstream_host.as_deref(), Some(WRONG_POD));
    assert_eq!(report.rows[1].upstream_host, None);
    assert_eq!(report.dropped_events, 2);
    let value = serde_json::to_value(&report).expect("serialize the report");
    assert_eq!(value, expected);
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
    assert_eq!(served, expected);
    let (status, _, body) = http_get(server.http, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

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
