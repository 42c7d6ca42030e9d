//! Pushes misroutes (critical) and blackholed connections (warning) to
//! Alertmanager's v2 API (`POST /api/v2/alerts`), one alert per (source,
//! dialed, reached, cluster, verdict, cause): sent at once when a
//! key first appears, re-sent every `resend_every` while it continues, and
//! resolved once it has been quiet for `resolve_after` (its `endsAt` is
//! always last seen + `resolve_after`). Ingest never waits for Alertmanager:
//! observations go through a bounded queue to one task that retries with
//! backoff while Alertmanager is down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use dialguard_proto::v1::{Hello, Verdict};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::directory::Directory;
use crate::event::ValidEvent;
use crate::finding::{Cause, Subject};

/// Alert keys held at once; new keys beyond this are not pushed until some resolve.
const MAX_ACTIVE: usize = 10_000;
/// Observations waiting for the pusher; beyond this ingest drops them (the
/// key comes back with the next event).
const QUEUE: usize = 4_096;

#[derive(Debug, Clone)]
pub struct AlertmanagerConfig {
    /// Base URL, e.g. `http://alertmanager.monitoring:9093`.
    pub url: String,
    pub resend_every: Duration,
    pub resolve_after: Duration,
}

impl AlertmanagerConfig {
    /// How often active alerts are re-sent (`--alertmanager-resend`).
    pub const DEFAULT_RESEND_EVERY: Duration = Duration::from_secs(30);
    /// How long a quiet misroute stays firing (`--alertmanager-resolve-after`).
    pub const DEFAULT_RESOLVE_AFTER: Duration = Duration::from_secs(300);

    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            resend_every: Self::DEFAULT_RESEND_EVERY,
            resolve_after: Self::DEFAULT_RESOLVE_AFTER,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Key {
    workload: String,
    namespace: String,
    dialed: SocketAddr,
    reached: Option<SocketAddr>,
    cluster: String,
    verdict: &'static str,
    cause: Cause,
}

#[derive(Debug)]
struct Observation {
    key: Key,
    annotations: BTreeMap<&'static str, String>,
    at: SystemTime,
}

/// The ingest side: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct AlertmanagerSink {
    tx: mpsc::Sender<Observation>,
}

impl AlertmanagerSink {
    /// Queues the batch's reported connections (one observation per key).
    pub fn observe(&self, sidecar: &Hello, events: &[ValidEvent], directory: &Directory) {
        let mut seen: HashSet<Key> = HashSet::new();
        // REDIRECTED (not known to be a pod: DNS load balancing, mostly)
        // pages nobody and must not crowd misroutes out of `MAX_ACTIVE`:
        // it is in the report and the metrics only.
        for event in events.iter().filter(|e| pushed(e.verdict)) {
            let key = Key {
                workload: sidecar.workload_name.clone(),
                namespace: sidecar.namespace.clone(),
                dialed: event.original_destination,
                reached: event.upstream_host,
                cluster: event.raw.cluster_name.clone(),
                verdict: event.verdict.label(),
                cause: event.cause,
            };
            if !seen.insert(key.clone()) {
                continue;
            }
            let observation = Observation {
                annotations: annotations(sidecar, event, directory),
                key,
                at: SystemTime::now(),
            };
            if self.tx.try_send(observation).is_err() {
                tracing::debug!("alertmanager queue full; the key comes back with its next event");
            }
        }
    }
}

/// The verdicts pushed: misrouted (critical) and blackholed (warning).
fn pushed(verdict: Verdict) -> bool {
    matches!(verdict, Verdict::Misrouted | Verdict::Blackholed)
}

fn annotations(
    sidecar: &Hello,
    event: &ValidEvent,
    directory: &Directory,
) -> BTreeMap<&'static str, String> {
    let dialed = event.original_destination;
    let intended = directory
        .owner(dialed.ip())
        .map(|pod| {
            format!(
                "{}/{} (workload {})",
                pod.namespace, pod.pod_name, pod.workload_name
            )
        })
        .unwrap_or_else(|| "unknown (no sidecar announced this IP)".into());
    let reached = event
        .upstream_host
        .map_or_else(|| "no host".to_string(), |a| a.to_string());
    let service = &event.raw.intended_service;
    let mut out = BTreeMap::new();
    out.insert(
        "summary",
        format!(
            "{}/{} dialed {dialed} and reached {reached} through {}",
            sidecar.namespace, sidecar.workload_name, event.raw.cluster_name
        ),
    );
    out.insert("dialed", dialed.to_string());
    out.insert("upstream", reached);
    out.insert("intended_workload", intended);
    out.insert(
        "capturing_service",
        if service.is_empty() {
            "unknown".into()
        } else {
            service.clone()
        },
    );
    out.insert("source_pod", sidecar.pod_name.clone());
    let explained = Subject {
        cause: event.cause,
        cluster: &event.raw.cluster_name,
        capturing_service: service,
        dialed,
        source_namespace: &sidecar.namespace,
        source_workload: &sidecar.workload_name,
    }
    .explain();
    out.insert("description", explained.cause_text);
    out.insert("remediation", explained.fix);
    if let Some(culprit) = explained.culprit {
        out.insert(
            "culprit",
            format!(
                "{} {}/{}: {}",
                culprit.kind, culprit.namespace, culprit.name, culprit.inspect
            ),
        );
    }
    out
}

#[derive(Debug)]
struct Active {
    annotations: BTreeMap<&'static str, String>,
    starts_at: SystemTime,
    last_seen: SystemTime,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PostableAlert<'a> {
    labels: BTreeMap<&'static str, String>,
    annotations: &'a BTreeMap<&'static str, String>,
    starts_at: String,
    ends_at: String,
}

fn severity(verdict: &str) -> &'static str {
    match verdict {
        v if v == Verdict::Misrouted.label() => "critical",
        v if v == Verdict::Blackholed.label() => "warning",
        // Not pushed (see `pushed`); never more than info.
        _ => "info",
    }
}

fn labels(key: &Key) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("alertname", "DialguardMisroute".to_string()),
        ("source_workload", key.workload.clone()),
        ("source_namespace", key.namespace.clone()),
        ("destination_port", key.dialed.port().to_string()),
        ("destination", key.dialed.to_string()),
        ("cluster", key.cluster.clone()),
        ("verdict", key.verdict.to_string()),
        ("cause", key.cause.label().to_string()),
        ("severity", severity(key.verdict).to_string()),
    ])
}

fn rfc3339(at: SystemTime) -> String {
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    crate::time::rfc3339(nanos)
}

/// Starts the pusher task; it ends when `stop` turns true.
pub fn start(config: AlertmanagerConfig, stop: watch::Receiver<bool>) -> AlertmanagerSink {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(Pusher::new(config).run(rx, stop));
    AlertmanagerSink { tx }
}

struct Pusher {
    config: AlertmanagerConfig,
    client: reqwest::Client,
    endpoint: String,
    active: HashMap<Key, Active>,
    failures: u32,
}

impl Pusher {
    fn new(config: AlertmanagerConfig) -> Self {
        let endpoint = format!("{}/api/v2/alerts", config.url.trim_end_matches('/'));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Self {
            config,
            client,
            endpoint,
            active: HashMap::new(),
            failures: 0,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Observation>, mut stop: watch::Receiver<bool>) {
        let mut next_push = Instant::now() + self.config.resend_every;
        loop {
            let observation = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                observation = rx.recv() => match observation {
                    Some(observation) => Some(observation),
                    None => return,
                },
                _ = tokio::time::sleep_until(next_push) => None,
            };
            match observation {
                Some(observation) => {
                    if self.merge(observation) && self.failures == 0 {
                        // A new misroute: tell Alertmanager now, not at the next
                        // resend (a burst of new keys shares one push).
                        next_push = next_push.min(Instant::now() + Duration::from_millis(100));
                    }
                }
                None => next_push = Instant::now() + self.push().await,
            }
        }
    }

    /// Returns whether the key is new.
    fn merge(&mut self, observation: Observation) -> bool {
        if let Some(active) = self.active.get_mut(&observation.key) {
            active.last_seen = active.last_seen.max(observation.at);
            active.annotations = observation.annotations;
            return false;
        }
        if self.active.len() >= MAX_ACTIVE {
            return false;
        }
        self.active.insert(
            observation.key,
            Active {
                annotations: observation.annotations,
                starts_at: observation.at,
                last_seen: observation.at,
            },
        );
        true
    }

    /// Sends every active alert; returns the wait until the next push.
    async fn push(&mut self) -> Duration {
        if self.active.is_empty() {
            return self.config.resend_every;
        }
        let now = SystemTime::now();
        let alerts: Vec<PostableAlert<'_>> = self
            .active
            .iter()
            .map(|(key, active)| PostableAlert {
                labels: labels(key),
                annotations: &active.annotations,
                starts_at: rfc3339(active.starts_at),
                ends_at: rfc3339(active.last_seen + self.config.resolve_after),
            })
            .collect();
        let sent = self.client.post(&self.endpoint).json(&alerts).send().await;
        match sent.and_then(|r| r.error_for_status()) {
            Ok(_) => {
                if self.failures > 0 {
                    tracing::info!("alertmanager {} reachable again", self.config.url);
                }
                self.failures = 0;
                // What was sent with an endsAt in the past is resolved now.
                let resolve_after = self.config.resolve_after;
                self.active
                    .retain(|_, active| active.last_seen + resolve_after > now);
                self.config.resend_every
            }
            Err(err) => {
                if self.failures == 0 {
                    tracing::warn!(
                        "alertmanager {}: {err}; retrying with backoff",
                        self.config.url
                    );
                }
                self.failures += 1;
                let backoff =
                    Duration::from_millis(500) * 2u32.saturating_pow(self.failures.min(16));
                backoff.min(self.config.resend_every)
            }
        }
    }
}
