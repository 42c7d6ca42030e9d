//! The VM's gRPC stream to the collector: opened lazily when events wait,
//! `Hello` first, then batches; acknowledged events leave the outbox, and a
//! closed stream rewinds it so unacknowledged events are sent again.
//!
//! Everything runs on the root context's timer, never on a connection's path.

use dialguard_filter_core::CollectorConfig;
use dialguard_proto::v1::{
    CollectorMessage, Hello, SidecarMessage, collector_message, sidecar_message,
};
use prost::Message;

use dialguard_filter_core::Outbox;

use crate::abi::{self, Buffer, LogLevel};
use crate::host::now_unix_nanos;
use crate::metrics::{self, Metrics};

const SERVICE: &str = "dialguard.v1.Collector";
const METHOD: &str = "Report";
const MAX_BACKOFF_NANOS: u64 = 30_000_000_000;

#[derive(Debug)]
pub struct Delivery {
    cluster: String,
    hello: Vec<u8>,
    flush_interval_nanos: u64,
    stream: Option<u32>,
    consecutive_failures: u32,
    retry_at_nanos: u64,
}

impl Delivery {
    pub fn new(collector: &CollectorConfig, hello: Hello) -> Self {
        let hello = SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(hello)),
        };
        Self {
            cluster: collector.cluster.clone(),
            hello: hello.encode_to_vec(),
            flush_interval_nanos: collector.flush_interval_ms.saturating_mul(1_000_000),
            stream: None,
            consecutive_failures: 0,
            retry_at_nanos: 0,
        }
    }

    /// Sends every batch not yet sent on the current stream.
    pub fn flush(&mut self, outbox: &mut Outbox, metrics: &Metrics) {
        if !outbox.has_unsent() {
            return;
        }
        let token = match self.stream {
            Some(token) => token,
            None if now_unix_nanos() < self.retry_at_nanos => return,
            None => match self.open() {
                Some(token) => token,
                None => return self.failed(metrics),
            },
        };
        let resent_before = outbox.resent_total();
        while let Some(batch) = outbox.take_batch() {
            let count = batch.events.len() as u64;
            let message = SidecarMessage {
                kind: Some(sidecar_message::Kind::Batch(batch)),
            };
            if abi::grpc_send(token, &message.encode_to_vec()).is_err() {
                let _ = abi::grpc_cancel(token);
                self.stream = None;
                outbox.rewind();
                return self.failed(metrics);
            }
            metrics::add(metrics.events_sent, count);
        }
        metrics::add(metrics.events_resent, outbox.resent_total() - resent_before);
    }

    fn open(&mut self) -> Option<u32> {
        let token = abi::grpc_stream(&self.cluster, SERVICE, METHOD).ok()?;
        if abi::grpc_send(token, &self.hello).is_err() {
            let _ = abi::grpc_cancel(token);
            return None;
        }
        self.stream = Some(token);
        Some(token)
    }

    pub fn on_message(&mut self, token: u32, size: usize, outbox: &mut Outbox, metrics: &Metrics) {
        if self.stream != Some(token) {
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

    pub fn on_close(&mut self, token: u32, status: u32, outbox: &mut Outbox, metrics: &Metrics) {
        if self.stream != Some(token) {
            return;
        }
        self.stream = None;
        outbox.rewind();
        abi::log(
            LogLevel::Warn,
            &format!(
                "dialguard: collector stream on cluster {} closed with gRPC status {status}; {} unacknowledged events will be sent again",
                self.cluster,
                outbox.len()
            ),
        );
        self.failed(metrics);
    }

    /// Exponential backoff from the flush interval up to 30 s, with jitter
    /// from the clock so a mesh of sidecars does not reconnect in step.
    fn failed(&mut self, metrics: &Metrics) {
        metrics::add(metrics.stream_failures, 1);
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let exponent = self.consecutive_failures.min(16);
        let backoff = self
            .flush_interval_nanos
            .saturating_mul(1 << exponent)
            .min(MAX_BACKOFF_NANOS);
        let now = now_unix_nanos();
        let jitter = now % (backoff / 2).max(1);
        self.retry_at_nanos = now.saturating_add(backoff / 2 + jitter);
    }
}
