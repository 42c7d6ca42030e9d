//! The gRPC access log sink for variant 5: accepts Envoy's client-streaming
//! `envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs` over
//! HTTP/2 (cleartext, prior knowledge) on loopback, counts the gRPC messages
//! (and the log entries in them) and their bytes, and never fails a stream. It needs none of Envoy's
//! protos: a gRPC message is a 5-byte prefix (compressed flag, big-endian
//! length) and that many bytes.
//!
//! It runs on one thread of its own (a current-thread tokio runtime), so its
//! CPU time can be read from `/proc/self/task/TID` like any process's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::proc_stat;

/// The method Envoy's TCP/HTTP gRPC access loggers call.
pub const STREAM_ACCESS_LOGS: &str =
    "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";

#[derive(Debug, Default)]
struct Counters {
    streams: AtomicU64,
    messages: AtomicU64,
    /// Access log entries inside those messages (one per connection).
    entries: AtomicU64,
    /// gRPC payload bytes (prefixes included): the HTTP/2 DATA the sink read.
    bytes: AtomicU64,
}

/// What the sink has received so far, and the CPU time its thread used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkSnapshot {
    pub streams: u64,
    pub messages: u64,
    pub entries: u64,
    pub bytes: u64,
    pub cpu: Duration,
}

#[derive(Debug)]
pub struct Sink {
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    /// The sink thread's id (`/proc/self/task/TID`).
    tid: Option<u32>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Listens on 127.0.0.1, on a port of the kernel's choosing.
    pub fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("sink: bind")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = oneshot::channel();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = {
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("accesslog-sink".to_owned())
                .spawn(move || {
                    let _ = tid_tx.send(proc_stat::current_thread_id());
                    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .enable_time()
                        .build()
                    else {
                        return;
                    };
                    runtime.block_on(async move {
                        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                            return;
                        };
                        tokio::select! {
                            () = accept_loop(listener, counters) => {}
                            _ = stopped => {}
                        }
                    });
                })?
        };
        let tid = tid_rx.recv_timeout(Duration::from_secs(5)).ok().flatten();
        Ok(Self {
            addr,
            counters,
            tid,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn snapshot(&self) -> SinkSnapshot {
        SinkSnapshot {
            streams: self.counters.streams.load(Ordering::SeqCst),
            messages: self.counters.messages.load(Ordering::SeqCst),
            entries: self.counters.entries.load(Ordering::SeqCst),
            bytes: self.counters.bytes.load(Ordering::SeqCst),
            cpu: self
                .tid
                .and_then(|tid| proc_stat::thread_cpu(tid).ok())
                .unwrap_or_default(),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, counters: Arc<Counters>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of file descriptors or the like: try again a little later.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(tcp, counters.clone()));
    }
}

async fn connection(tcp: tokio::net::TcpStream, counters: Arc<Counters>) {
    let Ok(mut h2) = h2::server::Builder::new()
        .initial_connection_window_size(4 << 20)
        .initial_window_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
    else {
        return;
    };
    while let Some(Ok((request, respond))) = h2.accept().await {
        tokio::spawn(stream(request, respond, counters.clone()));
    }
}

/// One call: counts its messages until the client ends it, then answers OK.
async fn stream(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    counters: Arc<Counters>,
) {
    let counted = request.uri().path() == STREAM_ACCESS_LOGS;
    if counted {
        counters.streams.fetch_add(1, Ordering::SeqCst);
    }
    let mut body = request.into_body();
    let mut framing = Framing::default();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
        if counted {
            counters
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            let mut entries = 0;
            let messages = framing.feed(&chunk, |m| entries += access_log_entries(m));
            counters.messages.fetch_add(messages, Ordering::SeqCst);
            counters.entries.fetch_add(entries, Ordering::SeqCst);
        }
    }
    let status = if counted { "0" } else { "12" }; // OK, or UNIMPLEMENTED
    let Ok(response) = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
    else {
        return;
    };
    if let Ok(mut send) = respond.send_response(response, false) {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static(status));
        let _ = send.send_trailers(trailers);
    }
}

/// Splits a stream of bytes into gRPC length-prefixed messages, across chunks.
#[derive(Debug, Default)]
pub struct Framing {
    buffer: Vec<u8>,
}

impl Framing {
    /// Feeds the next chunk; calls `each` with every message it completed
    /// (without its 5-byte prefix) and returns how many there were.
    pub fn feed(&mut self, data: &[u8], mut each: impl FnMut(&[u8])) -> u64 {
        self.buffer.extend_from_slice(data);
        let mut at = 0;
        let mut completed = 0;
        while let Some(&[_, a, b, c, d]) = self.buffer.get(at..at + 5) {
            let len = u32::from_be_bytes([a, b, c, d]) as usize;
            let Some(message) = self.buffer.get(at + 5..at + 5 + len) else {
                break;
            };
            each(message);
            completed += 1;
            at += 5 + len;
        }
        self.buffer.drain(..at);
        completed
    }
}

/// The fields of a protobuf message that are length-delimited (wire type 2),
/// as (field number, bytes); stops at the first malformed byte.
fn length_delimited_fields(mut buf: &[u8]) -> Vec<(u64, &[u8])> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut fields = Vec::new();
    while !buf.is_empty() {
        let Some(key) = varint(&mut buf) else { break };
        let skip = match key & 7 {
            0 => {
                if varint(&mut buf).is_none() {
                    break;
                }
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let Some(len) = varint(&mut buf).and_then(|l| usize::try_from(l).ok()) else {
                    break;
                };
                let Some(value) = buf.get(..len) else { break };
                fields.push((key >> 3, value));
                len
            }
            _ => break,
        };
        let Some(rest) = buf.get(skip..) else { break };
        buf = rest;
    }
    fields
}

/// Access log entries in one `StreamAccessLogsMessage`: its `http_logs` (2)
/// or `tcp_logs` (3) hold repeated `log_entry` (1).
pub fn access_log_entries(message: &[u8]) -> u64 {
    length_delimited_fields(message)
        .into_iter()
        .filter(|(field, _)| *field == 2 || *field == 3)
        .map(|(_, entries)| {
            length_delimited_fields(entries)
                .iter()
                .filter(|(field, _)| *field == 1)
                .count() as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::{Framing, access_log_entries};

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut wire = vec![0];
        wire.extend((body.len() as u32).to_be_bytes());
        wire.extend(body);
        wire
    }

    #[test]
    fn counts_messages_split_anywhere() {
        let wire: Vec<u8> = [&b"abc"[..], b"", b"0123456789"]
            .into_iter()
            .flat_map(frame)
            .collect();
        for split in 0..wire.len() {
            let mut framing = Framing::default();
            let (a, b) = wire.split_at(split);
            let mut bodies = Vec::new();
            let n = framing.feed(a, |m| bodies.push(m.to_vec()))
                + framing.feed(b, |m| bodies.push(m.to_vec()));
            assert_eq!(n, 3, "split at {split}");
            assert_eq!(bodies, [b"abc".to_vec(), vec![], b"0123456789".to_vec()]);
        }
    }

    #[test]
    fn counts_tcp_log_entries() {
        // identifier (1) { log_name: "x" }, tcp_logs (3) { log_entry x2 }, a varint field.
        let entry = [0x0a, 0x02, 0x08, 0x01]; // log_entry (1) { common_properties: 1 }
        let mut tcp_logs = Vec::new();
        tcp_logs.extend(entry);
        tcp_logs.extend(entry);
        let mut message = vec![0x0a, 0x03, 0x1a, 0x01, b'x'];
        message.push(0x1a);
        message.push(tcp_logs.len() as u8);
        message.extend(&tcp_logs);
        message.extend([0x20, 0x96, 0x01]);
        assert_eq!(access_log_entries(&message), 2);
        assert_eq!(access_log_entries(&[0xff]), 0);
    }
}
