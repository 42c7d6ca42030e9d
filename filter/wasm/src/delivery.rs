//! The root's streams to the collector. Each stream starts with `Hello` and
//! a `Heartbeat`, then carries batches (and heartbeats while it lasts).
//! A stream is opened when the VM starts, when a heartbeat is due and when
//! events wait; once everything sent is acknowledged and nothing was sent
//! for [`LINGER_NANOS`], the VM ends its side and the collector closes the
//! stream with OK. An idle VM thus costs the collector no open stream, only
//! a heartbeat now and then. Acknowledged events leave the outbox; a stream
//! that fails rewinds it, so unacknowledged events are sent again.
//!
//! Everything runs on the root context's timer, never on a connection's path.

use dialguard_filter_core::{CollectorConfig, HeartbeatClock, Outbox, Tally};
use dialguard_proto::v1::{
    CollectorMessage, Hello, SidecarMessage, collector_message, sidecar_message,
};
use prost::Message;

use crate::abi::{self, Buffer, LogLevel};
use crate::metrics::{self, Metrics};

const SERVICE: &str = "dialguard.v1.Collector";
const METHOD: &str = "Report";
const MAX_BACKOFF_NANOS: u64 = 30_000_000_000;
/// How long a stream stays open after its last batch once everything is
/// acknowledged: a VM that reports now and then keeps one stream, not one
/// per flush.
const LINGER_NANOS: u64 = 5_000_000_000;
/// gRPC status OK.
const OK: u32 = 0;
/// gRPC status INVALID_ARGUMENT.
const INVALID_ARGUMENT: u32 = 3;

#[derive(Debug)]
pub struct Delivery {
    cluster: String,
    hello: Vec<u8>,
    flush_interval_nanos: u64,
    stream: Option<Stream>,
    /// A stream whose side we ended, awaiting the collector's status.
    closing: Option<u32>,
    consecutive_failures: u32,
    retry_at_nanos: u64,
    heartbeat: HeartbeatClock,
    /// False once a collector refused a stream with INVALID_ARGUMENT while
    /// this VM sent heartbeats: a collector of an earlier release, which
    /// takes the unknown `heartbeat` message for an empty one. The VM then
    /// sends hellos (on the same schedule) and batches only, which it reads.
    heartbeats_understood: bool,
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    token: u32,
    /// When a batch last went out on it (0: none yet).
    last_batch_nanos: u64,
}

impl Delivery {
    /// `seed` spreads the heartbeats of VMs started together.
    pub fn new(collector: &CollectorConfig, hello: Hello, seed: u64) -> Self {
        let hello = SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(hello)),
        };
        Self {
            cluster: collector.cluster.clone(),
            hello: hello.encode_to_vec(),
            flush_interval_nanos: collector.flush_interval_ms.saturating_mul(1_000_000),
            stream: None,
            closing: None,
            consecutive_failures: 0,
            retry_at_nanos: 0,
            heartbeat: HeartbeatClock::new(collector.heartbeat_interval_ms, seed),
            heartbeats_understood: true,
        }
    }

    /// The filter was reconfigured: the next stream goes to `collector` with
    /// the new `hello` (a stream carries one hello, so an open one is ended
    /// and what it left unacknowledged goes again on the next) and starts
    /// with a heartbeat at once, so the collector learns the change.
    pub fn reconfigure(&mut self, collector: &CollectorConfig, hello: Hello, outbox: &mut Outbox) {
        let hello = SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(hello)),
        }
        .encode_to_vec();
        self.flush_interval_nanos = collector.flush_interval_ms.saturating_mul(1_000_000);
        if hello == self.hello && collector.cluster == self.cluster {
            return;
        }
        self.hello = hello;
        self.cluster.clone_from(&collector.cluster);
        self.heartbeat.set_interval(collector.heartbeat_interval_ms);
        self.heartbeat.failed();
        if let Some(stream) = self.stream.take() {
            let _ = abi::grpc_cancel(stream.token);
            outbox.rewind();
        }
    }

    /// The root whose context opened the streams is gone, and its streams
    /// with it: what they left unacknowledged goes again on the next.
    pub fn streams_lost(&mut self, outbox: &mut Outbox) {
        self.stream = None;
        self.closing = None;
        outbox.rewind();
    }

    /// Sends a heartbeat when due and, with `flush`, every batch not yet
    /// sent; then ends an idle stream.
    pub fn on_tick(
        &mut self,
        now: u64,
        flush: bool,
        outbox: &mut Outbox,
        tally: &Tally,
        metrics: &Metrics,
    ) {
        let heartbeat_due = self.heartbeat.is_due(now);
        let batches_due = flush && outbox.has_unsent();
        if heartbeat_due || batches_due {
            self.send(now, heartbeat_due, outbox, tally, metrics);
        }
        self.end_if_idle(now, outbox);
    }

    fn send(
        &mut self,
        now: u64,
        heartbeat_due: bool,
        outbox: &mut Outbox,
        tally: &Tally,
        metrics: &Metrics,
    ) {
        let (token, opened) = match self.stream {
            Some(stream) => (stream.token, false),
            None if now < self.retry_at_nanos => return,
            None => match self.open() {
                Some(token) => (token, true),
                None => return self.failed(now, metrics),
            },
        };
        // A new stream always starts with a heartbeat after its hello, so
        // the collector learns the counters with the identity.
        if heartbeat_due || opened {
            if self.heartbeats_understood {
                let message = SidecarMessage {
                    kind: Some(sidecar_message::Kind::Heartbeat(tally.heartbeat(outbox))),
                };
                if abi::grpc_send(token, &message.encode_to_vec()).is_err() {
                    return self.broken(token, now, outbox, metrics);
                }
            }
            self.heartbeat.sent(now);
        }
        let resent_before = outbox.resent_total();
        let mut sent_batch = false;
        while let Some(batch) = outbox.take_batch() {
            let count = batch.events.len() as u64;
            let message = SidecarMessage {
                kind: Some(sidecar_message::Kind::Batch(batch)),
            };
            if abi::grpc_send(token, &message.encode_to_vec()).is_err() {
                return self.broken(token, now, outbox, metrics);
            }
            metrics::add(metrics.events_sent, count);
            sent_batch = true;
        }
        metrics::add(metrics.events_resent, outbox.resent_total() - resent_before);
        if sent_batch {
            if let Some(stream) = &mut self.stream {
                stream.last_batch_nanos = now;
            }
        }
    }

    fn open(&mut self) -> Option<u32> {
        let token = abi::grpc_stream(&self.cluster, SERVICE, METHOD).ok()?;
        if abi::grpc_send(token, &self.hello).is_err() {
            let _ = abi::grpc_cancel(token);
            return None;
        }
        self.stream = Some(Stream {
            token,
            last_batch_nanos: 0,
        });
        Some(token)
    }

    /// Everything sent is acknowledged and nothing went out for a while:
    /// end our side; the collector closes the stream with its status.
    fn end_if_idle(&mut self, now: u64, outbox: &Outbox) {
        let Some(stream) = self.stream else {
            return;
        };
        if !outbox.is_empty() || now.saturating_sub(stream.last_batch_nanos) < LINGER_NANOS {
            return;
        }
        self.stream = None;
        if abi::grpc_close(stream.token).is_ok() {
            self.closing = Some(stream.token);
        } else {
            let _ = abi::grpc_cancel(stream.token);
        }
    }

    fn broken(&mut self, token: u32, now: u64, outbox: &mut Outbox, metrics: &Metrics) {
        let _ = abi::grpc_cancel(token);
        self.stream = None;
        outbox.rewind();
        self.heartbeat.failed();
        self.failed(now, metrics);
    }

    pub fn on_message(&mut self, token: u32, size: usize, outbox: &mut Outbox, metrics: &Metrics) {
        if self.stream.map(|s| s.token) != Some(token) {
            return;
        }
        let Ok(bytes) = abi::buffer(Buffer::GrpcReceive, size) else {
            return;
        };
        match CollectorMessage::decode(bytes.as_slice()) {
            Ok(CollectorMessage {
                kind: Some(collector_message::Kind::Ack(ack)),
            }) => {
                let before = outbox.len();
                outbox.acknowledge(ack.through_sequence);
                metrics::add(metrics.events_acked, (before - outbox.len()) as u64);
                self.consecutive_failures = 0;
                if let Some(first) = ack.rejected.first() {
                    outbox.rejected(ack.rejected.len() as u64);
                    metrics::add(metrics.events_rejected, ack.rejected.len() as u64);
                    abi::log(
                        LogLevel::Warn,
                        &format!(
                            "dialguard: the collector refused {} events, e.g. sequence {}: {}",
                            ack.rejected.len(),
                            first.sequence,
                            first.message
                        ),
                    );
                }
            }
            Ok(_) => {}
            Err(err) => abi::log(
                LogLevel::Warn,
                &format!("dialguard: undecodable message from the collector: {err}"),
            ),
        }
    }

    pub fn on_close(
        &mut self,
        token: u32,
        status: u32,
        now: u64,
        outbox: &mut Outbox,
        metrics: &Metrics,
    ) {
        let ours = self.closing == Some(token) || self.stream.map(|s| s.token) == Some(token);
        if ours && status == INVALID_ARGUMENT && self.heartbeats_understood {
            self.heartbeats_understood = false;
            abi::log(
                LogLevel::Warn,
                &format!(
                    "dialguard: the collector on cluster {} refused a stream as invalid; taking it \
                     for an earlier release that does not read heartbeats: hellos and events only \
                     from now on",
                    self.cluster
                ),
            );
        }
        if self.closing == Some(token) {
            // Our side was ended with everything acknowledged: OK means the
            // heartbeat was stored too; anything else, send it again.
            self.closing = None;
            if status == OK {
                self.consecutive_failures = 0;
            } else {
                abi::log(
                    LogLevel::Warn,
                    &format!(
                        "dialguard: collector stream on cluster {} ended with gRPC status {status}; the heartbeat will be sent again",
                        self.cluster
                    ),
                );
                self.heartbeat.failed();
                self.failed(now, metrics);
            }
            return;
        }
        if self.stream.map(|s| s.token) != Some(token) {
            return;
        }
        self.stream = None;
        outbox.rewind();
        self.heartbeat.failed();
        abi::log(
            LogLevel::Warn,
            &format!(
                "dialguard: collector stream on cluster {} closed with gRPC status {status}; {} unacknowledged events will be sent again",
                self.cluster,
                outbox.len()
            ),
        );
        self.failed(now, metrics);
    }

    /// Exponential backoff from the flush interval up to 30 s, with jitter
    /// from the clock so a mesh of sidecars does not reconnect in step.
    fn failed(&mut self, now: u64, metrics: &Metrics) {
        metrics::add(metrics.stream_failures, 1);
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let exponent = self.consecutive_failures.min(16);
        let backoff = self
            .flush_interval_nanos
            .saturating_mul(1 << exponent)
            .min(MAX_BACKOFF_NANOS);
        let jitter = now % (backoff / 2).max(1);
        self.retry_at_nanos = now.saturating_add(backoff / 2 + jitter);
    }
}
