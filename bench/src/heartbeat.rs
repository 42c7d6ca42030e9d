//! The heartbeat load: many simulated sidecar VMs, each with its own HTTP/2
//! connection (as each Envoy worker has its own pool), heartbeating the way
//! the filter does when it has nothing to report: every interval (a tenth
//! of jitter either way, a random first phase) a short `Report` stream
//! with `Hello`, one `Heartbeat` with growing counters, then the end of the
//! VM's side; the collector answers with OK once stored.
//!
//! One loopback source address holds at most [`CONNECTIONS_PER_SOURCE`]
//! connections to one collector port (the ephemeral port range is about
//! 28,000 wide), so connections are spread over 127.0.10.x sources.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use dialguard_proto::v1::collector_client::CollectorClient;
use dialguard_proto::v1::{
    ConnectionCounters, DeliveryCounters, Heartbeat, SidecarMessage, sidecar_message,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::workload::Vm;

/// Connections opened from one source address.
pub const CONNECTIONS_PER_SOURCE: usize = 20_000;
/// Connections being set up at once (the collector's listen backlog is 1,024).
const CONNECT_CONCURRENCY: usize = 128;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one heartbeat stream, from open to the collector's OK.
const BEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// A VM with its connection to the collector.
#[derive(Debug)]
pub struct Connected {
    vm: Vm,
    client: CollectorClient<Channel>,
}

/// Opens `connections` connections, [`CONNECT_CONCURRENCY`] at a time, and
/// gives VM i connection i mod `connections`: one each when there are as
/// many (as in a mesh), shared when a process may not hold that many
/// sockets (the open-files limit).
pub async fn connect(
    collector: SocketAddr,
    vms: Vec<Vm>,
    connections: usize,
) -> anyhow::Result<Vec<Connected>> {
    let channels = open_channels(collector, connections.clamp(1, vms.len().max(1))).await?;
    Ok(vms
        .into_iter()
        .enumerate()
        .map(|(i, vm)| Connected {
            vm,
            client: CollectorClient::new(channels[i % channels.len()].clone()),
        })
        .collect())
}

async fn open_channels(collector: SocketAddr, count: usize) -> anyhow::Result<Vec<Channel>> {
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for index in 0..count {
        let source = source_address(index);
        let endpoint = Endpoint::from_shared(format!("http://{collector}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .local_address(Some(source));
        let permits = Arc::clone(&permits);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
                .await
                .context("timed out connecting")?
                .with_context(|| format!("connecting from {source}"))?;
            anyhow::Ok((index, channel))
        });
    }
    let mut channels = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        channels.push(joined??);
    }
    channels.sort_by_key(|(index, _)| *index);
    Ok(channels.into_iter().map(|(_, c)| c).collect())
}

fn source_address(index: usize) -> IpAddr {
    let block = (index / CONNECTIONS_PER_SOURCE) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 10, block.saturating_add(1)))
}

/// What the heartbeats of one window achieved.
#[derive(Debug, Clone, Copy, Default)]
pub struct Beaten {
    /// Streams that ended with OK.
    pub ok: u64,
    /// Streams that failed or timed out.
    pub failed: u64,
    /// Sum and maximum of open-to-OK times, microseconds.
    pub latency_sum_us: u64,
    pub latency_max_us: u64,
    pub elapsed: Duration,
}

impl Beaten {
    pub fn per_second(&self) -> f64 {
        match self.elapsed.as_secs_f64() {
            s if s > 0.0 => self.ok as f64 / s,
            _ => 0.0,
        }
    }

    pub fn mean_latency(&self) -> Duration {
        Duration::from_micros(self.latency_sum_us / self.ok.max(1))
    }
}

/// Heartbeats so far, shared with the caller while they run.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: AtomicU64,
    failed: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
}

/// Every VM heartbeats every `interval` (jittered) from a random phase
/// until `window` has passed; `round` makes the counters grow from one
/// window to the next (they are cumulative per VM).
pub async fn beat(
    connected: &[Connected],
    interval: Duration,
    window: Duration,
    round: u64,
    tally: Arc<Tally>,
) -> Beaten {
    let started = Instant::now();
    let end = started + window;
    let mut tasks = JoinSet::new();
    for (index, c) in connected.iter().enumerate() {
        let mut client = c.client.clone();
        let mut hello = (*c.vm.hello).clone();
        hello.heartbeat_interval_ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
        let tally = Arc::clone(&tally);
        let mut rng = crate::workload::Rng::new(index as u64 ^ round << 40);
        let interval_ms = interval.as_millis() as u64;
        tasks.spawn(async move {
            let phase = Duration::from_millis(rng.below(interval_ms.max(1)));
            tokio::time::sleep(phase).await;
            let mut beats = round * 1_000;
            while Instant::now() < end {
                beats += 1;
                let messages = vec![
                    SidecarMessage {
                        kind: Some(sidecar_message::Kind::Hello(hello.clone())),
                    },
                    SidecarMessage {
                        kind: Some(sidecar_message::Kind::Heartbeat(heartbeat(beats))),
                    },
                ];
                let opened = Instant::now();
                let done = tokio::time::timeout(BEAT_TIMEOUT, async {
                    let mut responses = client
                        .report(tokio_stream::iter(messages))
                        .await?
                        .into_inner();
                    while responses.message().await?.is_some() {}
                    Ok::<_, tonic::Status>(())
                })
                .await;
                match done {
                    Ok(Ok(())) => {
                        let us = opened.elapsed().as_micros() as u64;
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        tally.latency_sum_us.fetch_add(us, Ordering::Relaxed);
                        tally.latency_max_us.fetch_max(us, Ordering::Relaxed);
                    }
                    _ => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let tenth = interval_ms / 10;
                let next = interval_ms - tenth + rng.below(2 * tenth + 1);
                let wake = Instant::now() + Duration::from_millis(next);
                if wake >= end {
                    break;
                }
                tokio::time::sleep_until(wake.into()).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Beaten {
        ok: tally.ok.load(Ordering::Relaxed),
        failed: tally.failed.load(Ordering::Relaxed),
        latency_sum_us: tally.latency_sum_us.load(Ordering::Relaxed),
        latency_max_us: tally.latency_max_us.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

/// A VM's `beats`-th heartbeat: every counter grows with it.
fn heartbeat(beats: u64) -> Heartbeat {
    Heartbeat {
        connections: Some(ConnectionCounters {
            r#match: beats * 40,
            service: beats * 55,
            ..ConnectionCounters::default()
        }),
        delivery: Some(DeliveryCounters::default()),
    }
}
