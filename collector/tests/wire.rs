//! Bad input on the wire, against the real collector in process on loopback:
//! gRPC messages that are not protobuf, a message cut short, one over the
//! size limit, and messages from a newer sidecar with fields this collector
//! does not know. The sidecar side is a hand-driven HTTP/2 client (h2), so
//! that every byte of the gRPC framing is the test's choice. Every await is
//! bounded.

mod common;

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use common::*;
use dialguard_collector::Limits;
use dialguard_proto::v1::{
    CollectorMessage, EventBatch, SidecarMessage, Verdict, collector_message, sidecar_message,
};
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tonic::{Code, Status};

const REPORT_PATH: &str = "/dialguard.v1.Collector/Report";

// ---------------------------------------------------------------------------
// A gRPC client by hand
// ---------------------------------------------------------------------------

/// One HTTP/2 connection to the collector.
struct RawConnection {
    addr: SocketAddr,
    send_request: SendRequest<Bytes>,
    task: JoinHandle<()>,
}

impl RawConnection {
    async fn open(addr: SocketAddr) -> Self {
        let tcp = bounded("connecting", TcpStream::connect(addr))
            .await
            .expect("connect to the collector");
        let (send_request, connection) =
            bounded("the HTTP/2 handshake", h2::client::handshake(tcp))
                .await
                .expect("HTTP/2 handshake");
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self {
            addr,
            send_request,
            task,
        }
    }

    /// Starts a `Report` call; nothing of its body is sent yet.
    async fn report(&mut self) -> RawStream {
        let request = http::Request::post(format!("http://{}{REPORT_PATH}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let ready = bounded("a stream slot", self.send_request.clone().ready())
            .await
            .expect("the connection is gone");
        let mut ready = ready;
        let (response, send) = ready
            .send_request(request, false)
            .expect("start the Report call");
        RawStream {
            send,
            response: Some(response),
            body: None,
            received: BytesMut::new(),
        }
    }

    /// Drops the TCP connection without a word (no GOAWAY, no resets).
    fn close(self) {
        self.task.abort();
    }
}

/// One `Report` call, byte by byte.
struct RawStream {
    send: SendStream<Bytes>,
    response: Option<ResponseFuture>,
    body: Option<RecvStream>,
    received: BytesMut,
}

/// A gRPC frame: uncompressed, the payload's length, the payload.
fn frame(payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(0);
    let length = u32::try_from(payload.len()).expect("payload under 4 GiB");
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(payload);
    frame.into()
}

fn h2_status(err: h2::Error) -> Status {
    Status::unknown(format!("HTTP/2: {err}"))
}

impl RawStream {
    fn send_raw(&mut self, bytes: Bytes) {
        self.send
            .send_data(bytes, false)
            .expect("the request stream is closed");
    }

    /// Sends `payload` as one gRPC message.
    fn send_payload(&mut self, payload: &[u8]) {
        self.send_raw(frame(payload));
    }

    fn send_message(&mut self, message: &SidecarMessage) {
        self.send_payload(&message.encode_to_vec());
    }

    fn send_hello(&mut self, vm: &str) {
        self.send_message(&hello_message(NODE, vm));
    }

    /// Half-closes the request (END_STREAM), as a client that is done sending.
    fn finish(&mut self) {
        self.send
            .send_data(Bytes::new(), true)
            .expect("the request stream is closed");
    }

    /// The next ack's `through_sequence`, or the status that ended the call
    /// (`Code::Ok` included; an HTTP/2 failure as `Code::Unknown`).
    async fn next_ack(&mut self) -> Result<u64, Status> {
        bounded("the collector's next reply", self.next_reply()).await
    }

    async fn next_reply(&mut self) -> Result<u64, Status> {
        if let Some(response) = self.response.take() {
            let response = response.await.map_err(h2_status)?;
            assert_eq!(response.status(), 200, "{response:?}");
            // A trailers-only response carries the status in its headers.
            if let Some(status) = Status::from_header_map(response.headers()) {
                return Err(status);
            }
            self.body = Some(response.into_body());
        }
        let body = self.body.as_mut().expect("the call has ended already");
        loop {
            if let Some(header) = self.received.get(..5) {
                let length = u32::from_be_bytes(header[1..].try_into().expect("4 bytes")) as usize;
                if self.received.len() >= 5 + length {
                    let message = self.received.split_to(5 + length);
                    match CollectorMessage::decode(&message[5..]).expect("a CollectorMessage") {
                        CollectorMessage {
                            kind: Some(collector_message::Kind::Ack(ack)),
                        } => return Ok(ack.through_sequence),
                        other => panic!("expected an ack, got {other:?}"),
                    }
                }
            }
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    self.received.extend_from_slice(&chunk);
                }
                Some(Err(err)) => return Err(h2_status(err)),
                None => break,
            }
        }
        assert!(
            self.received.is_empty(),
            "the response ended inside a message: {:?}",
            self.received
        );
        let trailers = body.trailers().await.map_err(h2_status)?;
        self.body = None;
        Err(trailers
            .as_ref()
            .and_then(Status::from_header_map)
            .unwrap_or_else(|| panic!("the response ended without grpc-status: {trailers:?}")))
    }

    async fn ack(&mut self) -> u64 {
        self.next_ack().await.expect("an ack")
    }

    /// Waits for the status that ends the call: no ack may come before it.
    async fn end(&mut self) -> Status {
        match self.next_ack().await {
            Ok(through) => panic!("expected the call to end, got an ack through {through}"),
            Err(status) => status,
        }
    }
}

/// A batch of one Blackholed event (no alert line), encoded and padded with
/// a field unknown to the schema (every field the collector reads has its
/// own, smaller limit) to exactly `size` bytes.
fn batch_of_size(sequence: u64, size: usize) -> Vec<u8> {
    let message = batch(vec![event(sequence, Verdict::Blackholed, DEST, None)]).encode_to_vec();
    let mut padding = size.saturating_sub(message.len());
    // The padding's length prefix grows with it: a few rounds settle it.
    for _ in 0..4 {
        let padded = message.len() + nested(1000, &vec![b'p'; padding]).len();
        if padded == size {
            break;
        }
        padding = (padding + size).saturating_sub(padded);
    }
    let mut padded = message;
    padded.extend(nested(1000, &vec![b'p'; padding]));
    assert_eq!(padded.len(), size, "could not pad the batch");
    padded
}

/// Asserts that `vm` can still stream: a new call on `connection` has its
/// batch of `sequences` acknowledged and stored.
async fn assert_streams_work(
    connection: &mut RawConnection,
    db: &std::path::Path,
    vm: &str,
    sequences: std::ops::RangeInclusive<u64>,
) {
    let mut stream = connection.report().await;
    stream.send_hello(vm);
    stream.send_message(&misrouted_batch(sequences.clone()));
    assert_eq!(stream.ack().await, *sequences.end());
    let stored = stored_sequences(db, vm);
    for sequence in sequences {
        assert!(
            stored.contains(&(sequence as i64)),
            "{vm}: {sequence} acked but not stored: {stored:?}"
        );
    }
    stream.finish();
    assert_eq!(stream.end().await.code(), Code::Ok);
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_is_not_protobuf_ends_only_its_own_call() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;

    // Another VM on its own connection, streaming throughout.
    let mut other_client = server.client().await;
    let mut other = ReportStream::open(&mut other_client, NODE, "vm-2").await;
    assert_eq!(other.send_acked(misrouted_batch(1..=2)).await, 2);

    let mut connection = RawConnection::open(server.grpc).await;
    // Field 2 (`batch`) declaring 127 bytes, followed by fewer: no protobuf
    // decoder can read it.
    let garbage: &[u8] = b"\x12\x7fthis is not a SidecarMessage";
    assert!(SidecarMessage::decode(garbage).is_err());

    // As the first message, and after a valid hello.
    for hello_first in [false, true] {
        let mut stream = connection.report().await;
        if hello_first {
            stream.send_hello("vm-1");
        }
        stream.send_payload(garbage);
        let status = stream.end().await;
        // The client's fault, not the server's.
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "hello first: {hello_first}: {status:?}"
        );
        assert!(
            status.message().contains("decode"),
            "the status should say the message could not be decoded: {status:?}"
        );
    }

    assert_eq!(stored_sequences(&db, "vm-1"), Vec::<i64>::new());
    // Counted as refused streams, by their reason.
    assert_eq!(
        metric_now(
            server.http,
            r#"dialguard_streams_refused_total{reason="undecodable"}"#
        )
        .await,
        2.0
    );

    // The other VM's stream, and new calls on the same connection, are unaffected.
    assert_eq!(other.send_acked(misrouted_batch(3..=4)).await, 4);
    assert_eq!(stored_sequences(&db, "vm-2"), vec![1, 2, 3, 4]);
    assert_streams_work(&mut connection, &db, "vm-1", 1..=2).await;
    assert_eq!(misrouted_aggregate(&db), 6);

    connection.close();
    drop(other);
    drop(other_client);
    server.stop().await;
}

/// A call for vm-1 whose batch of `sequences` is acknowledged, followed by
/// the start of a message that never ends: a gRPC frame header announcing
/// 1000 bytes, and only 10 of them.
async fn acked_then_cut_short(
    connection: &mut RawConnection,
    sequences: std::ops::RangeInclusive<u64>,
) -> RawStream {
    let mut stream = connection.report().await;
    stream.send_hello("vm-1");
    stream.send_message(&misrouted_batch(sequences.clone()));
    assert_eq!(stream.ack().await, *sequences.end());
    let whole = frame(&misrouted_batch(100..=104).encode_to_vec());
    let mut cut = vec![0];
    cut.extend_from_slice(&1000u32.to_be_bytes());
    cut.extend_from_slice(&whole[5..15]);
    stream.send_raw(Bytes::from(cut));
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_cut_short_leaves_the_collector_healthy() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut connection = RawConnection::open(server.grpc).await;

    // 1. The client half-closes the call inside the message.
    let mut stream = acked_then_cut_short(&mut connection, 1..=3).await;
    stream.finish();
    let status = stream.end().await;
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("EOF"), "{status:?}");
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2, 3]);
    assert_streams_work(&mut connection, &db, "vm-1", 4..=5).await;

    // 2. The client resets the call inside the message.
    let mut stream = acked_then_cut_short(&mut connection, 6..=7).await;
    stream.send.send_reset(Reason::CANCEL);
    assert_streams_work(&mut connection, &db, "vm-1", 8..=9).await;

    // 3. The client drops the whole connection inside the message.
    let stream = acked_then_cut_short(&mut connection, 10..=11).await;
    connection.close();
    drop(stream);
    let mut connection = RawConnection::open(server.grpc).await;
    assert_streams_work(&mut connection, &db, "vm-1", 12..=13).await;

    // Everything acked is there once, nothing of the partial messages.
    assert_eq!(stored_sequences(&db, "vm-1"), (1..=13).collect::<Vec<_>>());
    assert_eq!(misrouted_aggregate(&db), 13);

    connection.close();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_size_limit_is_refused() {
    const MAX_MESSAGE_BYTES: usize = 4 << 20;
    assert_eq!(
        Limits::default().max_message_bytes,
        MAX_MESSAGE_BYTES,
        "the documented default limit"
    );
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut connection = RawConnection::open(server.grpc).await;

    // At the limit: accepted.
    let mut stream = connection.report().await;
    stream.send_hello("vm-1");
    stream.send_payload(&batch_of_size(1, MAX_MESSAGE_BYTES));
    assert_eq!(stream.ack().await, 1);
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1]);
    stream.finish();
    assert_eq!(stream.end().await.code(), Code::Ok);

    // One byte over: refused, from the frame header alone.
    let mut stream = connection.report().await;
    stream.send_hello("vm-1");
    stream.send_payload(&batch_of_size(2, MAX_MESSAGE_BYTES + 1));
    let status = stream.end().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for needle in [
        format!("found {} bytes", MAX_MESSAGE_BYTES + 1),
        format!("limit is: {MAX_MESSAGE_BYTES} bytes"),
    ] {
        assert!(status.message().contains(&needle), "{status:?}");
    }
    drop(stream);

    // Nothing of it is stored, and the collector goes on.
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1]);
    assert_eq!(
        metric_now(
            server.http,
            r#"dialguard_streams_refused_total{reason="message_too_large"}"#
        )
        .await,
        1.0
    );
    assert_streams_work(&mut connection, &db, "vm-1", 2..=3).await;
    let mut connection = RawConnection::open(server.grpc).await;
    assert_streams_work(&mut connection, &db, "vm-2", 1..=2).await;
    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2, 3]);

    connection.close();
    server.stop().await;
}

/// Appends fields numbered beyond anything in the schema, one of each wire
/// type a newer sidecar might use, to an encoded message.
fn with_unknown_fields(mut encoded: Vec<u8>) -> Vec<u8> {
    encode_key(1000, WireType::Varint, &mut encoded);
    encode_varint(42, &mut encoded);
    encode_key(1001, WireType::LengthDelimited, &mut encoded);
    encode_varint(6, &mut encoded);
    encoded.extend_from_slice(b"future");
    encode_key(1002, WireType::ThirtyTwoBit, &mut encoded);
    encoded.extend_from_slice(&7u32.to_le_bytes());
    encode_key(1003, WireType::SixtyFourBit, &mut encoded);
    encoded.extend_from_slice(&7u64.to_le_bytes());
    encoded
}

/// Field `tag` holding `bytes` (a nested message).
fn nested(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::new();
    encode_key(tag, WireType::LengthDelimited, &mut encoded);
    encode_varint(bytes.len() as u64, &mut encoded);
    encoded.extend_from_slice(bytes);
    encoded
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_fields_from_a_newer_sidecar_are_ignored() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut connection = RawConnection::open(server.grpc).await;

    // Hello, SidecarMessage, EventBatch, ConnectionEvent and SocketAddress
    // all carry fields this collector does not know.
    let hello = with_unknown_fields(nested(
        1,
        &with_unknown_fields(hello("node-new", "vm-1").encode_to_vec()),
    ));
    let mut events = Vec::new();
    for sequence in 1..=3 {
        let mut event = misrouted(sequence);
        let upstream = event.upstream_host.take().expect("an upstream host");
        let mut encoded = event.encode_to_vec();
        encoded.extend(nested(4, &with_unknown_fields(upstream.encode_to_vec())));
        events.extend(nested(1, &with_unknown_fields(encoded)));
    }
    let dropped = EventBatch {
        events: Vec::new(),
        dropped_total: 5,
    };
    events.extend(dropped.encode_to_vec());
    let message = with_unknown_fields(nested(2, &with_unknown_fields(events)));

    // What this collector's schema reads from it: the original messages.
    let decoded = SidecarMessage::decode(message.as_slice()).expect("decodes");
    let Some(sidecar_message::Kind::Batch(decoded)) = decoded.kind else {
        panic!("not a batch: {decoded:?}")
    };
    assert_eq!(decoded.events, (1..=3).map(misrouted).collect::<Vec<_>>());
    assert_eq!(decoded.dropped_total, 5);

    let mut stream = connection.report().await;
    stream.send_payload(&hello);
    stream.send_payload(&message);
    assert_eq!(stream.ack().await, 3);
    stream.finish();
    assert_eq!(stream.end().await.code(), Code::Ok);

    assert_eq!(stored_sequences(&db, "vm-1"), vec![1, 2, 3]);
    assert_eq!(misrouted_aggregate(&db), 3);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sidecars WHERE node_id = 'node-new'
             AND workload_name = 'reviews-v1' AND dropped_total = 5"
        ),
        1
    );

    connection.close();
    server.stop().await;
}
