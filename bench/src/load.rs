//! The collector benchmark's load generator: simulated sidecar VMs speaking
//! the real protocol (`dialguard.v1.Collector/Report`, the generated tonic
//! client) to a collector over loopback.
//!
//! One HTTP/2 connection per stream: Envoy's gRPC client opens its streams
//! on the connection pool of the worker that the VM runs on, so each VM (one
//! per worker) has a connection of its own, and a collector serving 2,000
//! VMs holds about 2,000 connections. Each stream sends its `Hello`, then,
//! once every stream is open and the start is given, batches of up to 500
//! events without waiting for each acknowledgement; like the filter's
//! buffer, a stream holds at most `max_in_flight` unacknowledged events and
//! waits for acknowledgements beyond that. Only acknowledged events count,
//! timed from the first batch sent to the last acknowledgement received.
//! Every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dialguard_proto::v1::collector_client::CollectorClient;
use dialguard_proto::v1::{CollectorMessage, SidecarMessage, collector_message, sidecar_message};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::workload::Vm;

/// Connections being set up at once (the collector's listen backlog is 1,024).
const CONNECT_CONCURRENCY: usize = 128;
/// Bound on connecting and on opening a stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One open `Report` stream: its VM, the sending half and the acknowledgements.
#[derive(Debug)]
pub struct OpenStream {
    vm: Vm,
    tx: mpsc::Sender<SidecarMessage>,
    acks: Streaming<CollectorMessage>,
    /// Held so the connection stays open as long as the stream.
    _client: CollectorClient<Channel>,
}

/// Connects one connection per VM and opens its stream with the `Hello`
/// sent, `CONNECT_CONCURRENCY` at a time.
pub async fn open(collector: SocketAddr, vms: Vec<Vm>) -> anyhow::Result<Vec<OpenStream>> {
    let endpoint = Endpoint::from_shared(format!("http://{collector}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for (index, vm) in vms.into_iter().enumerate() {
        let endpoint = endpoint.clone();
        let permits = Arc::clone(&permits);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, open_one(endpoint, vm)).await;
            let stream = opened.context("timed out opening a stream")??;
            anyhow::Ok((index, stream))
        });
    }
    let mut streams = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        streams.push(joined??);
    }
    streams.sort_by_key(|(index, _)| *index);
    Ok(streams.into_iter().map(|(_, stream)| stream).collect())
}

async fn open_one(endpoint: Endpoint, vm: Vm) -> anyhow::Result<OpenStream> {
    let channel = endpoint.connect().await.context("connecting")?;
    let mut client = CollectorClient::new(channel);
    // Room for the hello and a couple of batches; the in-flight bound is
    // what limits a stream, not this queue.
    let (tx, rx) = mpsc::channel(4);
    tx.send(SidecarMessage {
        kind: Some(vm.hello_message()),
    })
    .await?;
    let response = client
        .report(ReceiverStream::new(rx))
        .await
        .context("opening the Report stream")?;
    Ok(OpenStream {
        vm,
        tx,
        acks: response.into_inner(),
        _client: client,
    })
}

/// How each stream sends.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Events each stream sends.
    pub events_per_stream: u64,
    /// Most events per batch (the filter's `maxBatchEvents`, 500).
    pub batch_events: u64,
    /// Most unacknowledged events per stream (the filter's `maxBufferedEvents`, 10,000).
    pub max_in_flight: u64,
    /// Bound on the whole run.
    pub timeout: Duration,
}

/// What one stream achieved.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamStats {
    pub acked: u64,
    pub batches: u64,
    pub first_send: Option<Instant>,
    pub last_ack: Option<Instant>,
}

/// What every stream achieved together.
#[derive(Debug, Clone, Copy, Default)]
pub struct Driven {
    pub streams: u64,
    pub sent: u64,
    pub acked: u64,
    pub batches: u64,
    /// From the first batch sent to the last acknowledgement.
    pub elapsed: Duration,
}

impl Driven {
    pub fn events_per_second(&self) -> f64 {
        match self.elapsed.as_secs_f64() {
            secs if secs > 0.0 => self.acked as f64 / secs,
            _ => 0.0,
        }
    }
}

/// Sends `pace.events_per_stream` events on every stream once `start` turns
/// true, then closes the streams; returns once every event is acknowledged
/// (or fails when a stream ends early or `pace.timeout` passes).
pub async fn drive(
    streams: Vec<OpenStream>,
    pace: Pace,
    start: watch::Receiver<bool>,
) -> anyhow::Result<Driven> {
    let count = streams.len() as u64;
    let mut tasks = JoinSet::new();
    for stream in streams {
        let mut start = start.clone();
        tasks.spawn(async move {
            start.wait_for(|go| *go).await?;
            tokio::time::timeout(pace.timeout, send_all(stream, pace))
                .await
                .with_context(|| format!("a stream did not finish within {:?}", pace.timeout))?
        });
    }
    let mut driven = Driven {
        streams: count,
        sent: count * pace.events_per_stream,
        ..Driven::default()
    };
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    while let Some(joined) = tasks.join_next().await {
        let stats = joined??;
        driven.acked += stats.acked;
        driven.batches += stats.batches;
        first = match (first, stats.first_send) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last = last.max(stats.last_ack);
    }
    if let (Some(first), Some(last)) = (first, last) {
        driven.elapsed = last.saturating_duration_since(first);
    }
    Ok(driven)
}

async fn send_all(mut stream: OpenStream, pace: Pace) -> anyhow::Result<StreamStats> {
    let budget = pace.events_per_stream;
    let mut stats = StreamStats::default();
    let mut sent_through = 0u64;
    while stats.acked < budget {
        let next = pace.batch_events.min(budget - sent_through);
        let in_flight = sent_through - stats.acked;
        let can_send = next > 0 && in_flight + next <= pace.max_in_flight;
        tokio::select! {
            biased;
            message = stream.acks.message() => match message? {
                Some(CollectorMessage { kind: Some(collector_message::Kind::Ack(ack)) }) => {
                    stats.acked = stats.acked.max(ack.through_sequence);
                    stats.last_ack = Some(Instant::now());
                }
                Some(_) => {}
                None => bail!("the collector ended a stream after {} acknowledged events", stats.acked),
            },
            permit = stream.tx.reserve(), if can_send => {
                let permit = permit.context("the request stream closed")?;
                stats.first_send.get_or_insert_with(Instant::now);
                let batch = stream.vm.batch(next as usize);
                permit.send(SidecarMessage { kind: Some(sidecar_message::Kind::Batch(batch)) });
                sent_through += next;
                stats.batches += 1;
            }
        }
    }
    // Closing the request stream ends the collector's side cleanly.
    drop(stream.tx);
    Ok(stats)
}
