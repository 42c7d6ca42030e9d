//! One JSON line on stdout per misrouted connection (only MISROUTED, after
//! the collector's upgrade: blackholed and redirected ones are reported,
//! never alerted here), as soon as it is stored,
//! rate-limited per aggregation key: a misroute that repeats a thousand times
//! a second prints one line per interval, and the next line says how many
//! were held back.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dialguard_proto::v1::{Hello, Verdict};
use serde::Serialize;

use crate::event::ValidEvent;
use crate::finding::{Cause, Subject};

/// Keys tracked at once; beyond this, lines for new keys are counted, not printed.
const MAX_TRACKED_KEYS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct AlertSink {
    limiter: Arc<Mutex<Limiter>>,
}

#[derive(Debug, Hash, PartialEq, Eq, Clone)]
struct AlertKey {
    workload: String,
    namespace: String,
    dialed: SocketAddr,
    reached: Option<SocketAddr>,
    cluster: String,
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    suppressed: u64,
}

#[derive(Debug)]
struct Limiter {
    interval: Duration,
    windows: HashMap<AlertKey, Window>,
    /// Lines not printed because every tracked slot was taken.
    untracked: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MisrouteAlert<'a> {
    alert: &'static str,
    time: String,
    source_workload: &'a str,
    source_namespace: &'a str,
    source_pod: &'a str,
    node_id: &'a str,
    source: Option<String>,
    original_destination: String,
    upstream_host: Option<String>,
    cluster: &'a str,
    intended_service: &'a str,
    response_flags: u64,
    connection_id: u64,
    cause: Cause,
    cause_text: String,
    fix: String,
    /// Enforce mode closes this connection (the filter was certain); false
    /// for a misroute only the collector's pod directory recognised.
    would_close: bool,
    /// Lines held back for this key since the previous one.
    suppressed: u64,
}

/// Printed when a key's interval ends with lines held back and no new one to carry the count.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SuppressedSummary<'a> {
    alert: &'static str,
    time: String,
    source_workload: &'a str,
    source_namespace: &'a str,
    original_destination: String,
    upstream_host: Option<String>,
    cluster: &'a str,
    suppressed: u64,
}

impl AlertSink {
    /// At most one line per key per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            limiter: Arc::new(Mutex::new(Limiter {
                interval,
                windows: HashMap::new(),
                untracked: 0,
            })),
        }
    }

    pub fn misrouted(&self, sidecar: &Hello, events: &[ValidEvent]) {
        let mut lines = Vec::new();
        {
            let Ok(mut limiter) = self.limiter.lock() else {
                return;
            };
            let now = Instant::now();
            for event in events.iter().filter(|e| e.verdict == Verdict::Misrouted) {
                let key = AlertKey {
                    workload: sidecar.workload_name.clone(),
                    namespace: sidecar.namespace.clone(),
                    dialed: event.original_destination,
                    reached: event.upstream_host,
                    cluster: event.raw.cluster_name.clone(),
                };
                if let Some(suppressed) = limiter.admit(key, now) {
                    lines.push(alert_line(sidecar, event, suppressed));
                }
            }
        }
        write_lines(&lines);
    }

    /// Prints the held-back counts of intervals that ended, and forgets
    /// their keys. Call it about once per interval.
    pub fn sweep(&self) {
        let lines = match self.limiter.lock() {
            Ok(mut limiter) => limiter.sweep(Instant::now()),
            Err(_) => return,
        };
        write_lines(&lines);
    }
}

impl Limiter {
    /// `Some(held back since the last line)` when this event gets a line.
    fn admit(&mut self, key: AlertKey, now: Instant) -> Option<u64> {
        let interval = self.interval;
        if let Some(window) = self.windows.get_mut(&key) {
            if now.duration_since(window.opened) < interval {
                window.suppressed += 1;
                return None;
            }
            let suppressed = std::mem::take(&mut window.suppressed);
            window.opened = now;
            return Some(suppressed);
        }
        if self.windows.len() >= MAX_TRACKED_KEYS {
            self.untracked += 1;
            return None;
        }
        self.windows.insert(
            key,
            Window {
                opened: now,
                suppressed: 0,
            },
        );
        Some(0)
    }

    fn sweep(&mut self, now: Instant) -> Vec<String> {
        let interval = self.interval;
        let mut lines = Vec::new();
        let time = crate::time::rfc3339(crate::time::now_unix_nanos());
        self.windows.retain(|key, window| {
            if now.duration_since(window.opened) < interval {
                return true;
            }
            if window.suppressed > 0 {
                let summary = SuppressedSummary {
                    alert: "DialguardMisroute",
                    time: time.clone(),
                    source_workload: &key.workload,
                    source_namespace: &key.namespace,
                    original_destination: key.dialed.to_string(),
                    upstream_host: key.reached.map(|a| a.to_string()),
                    cluster: &key.cluster,
                    suppressed: window.suppressed,
                };
                lines.extend(serde_json::to_string(&summary).ok());
            }
            false
        });
        if self.untracked > 0 {
            lines.push(
                serde_json::json!({
                    "alert": "DialguardMisroute",
                    "time": time,
                    "suppressedUntracked": std::mem::take(&mut self.untracked),
                })
                .to_string(),
            );
        }
        lines
    }
}

fn alert_line(sidecar: &Hello, event: &ValidEvent, suppressed: u64) -> String {
    let explained = Subject {
        cause: event.cause,
        cluster: &event.raw.cluster_name,
        capturing_service: &event.raw.intended_service,
        dialed: event.original_destination,
        source_namespace: &sidecar.namespace,
        source_workload: &sidecar.workload_name,
    }
    .explain();
    let alert = MisrouteAlert {
        alert: "DialguardMisroute",
        time: crate::time::rfc3339(event.raw.timestamp_unix_nanos),
        source_workload: &sidecar.workload_name,
        source_namespace: &sidecar.namespace,
        source_pod: &sidecar.pod_name,
        node_id: &sidecar.node_id,
        source: event.source.map(|a| a.to_string()),
        original_destination: event.original_destination.to_string(),
        upstream_host: event.upstream_host.map(|a| a.to_string()),
        cluster: &event.raw.cluster_name,
        intended_service: &event.raw.intended_service,
        response_flags: event.raw.response_flags,
        connection_id: event.raw.connection_id,
        cause: event.cause,
        cause_text: explained.cause_text,
        fix: explained.fix,
        would_close: event.raw.would_close,
        suppressed,
    };
    serde_json::to_string(&alert).unwrap_or_default()
}

fn write_lines(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    // A closed stdout must not break ingest: write errors are ignored.
    let mut out = std::io::stdout().lock();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> AlertKey {
        AlertKey {
            workload: "manager".into(),
            namespace: "manager".into(),
            dialed: SocketAddr::from(([10, 0, 1, 7], port)),
            reached: Some(SocketAddr::from(([10, 96, 3, 4], port))),
            cluster: format!("outbound|{port}||app-ext.app.svc.cluster.local"),
        }
    }

    fn limiter(interval: Duration) -> Limiter {
        Limiter {
            interval,
            windows: HashMap::new(),
            untracked: 0,
        }
    }

    #[test]
    fn one_line_per_key_per_interval_and_the_next_carries_the_count() {
        let mut limiter = limiter(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(limiter.admit(key(5701), t0), Some(0));
        for i in 1..=5 {
            assert_eq!(limiter.admit(key(5701), t0 + Duration::from_secs(i)), None);
        }
        // Another key is limited on its own.
        assert_eq!(limiter.admit(key(6379), t0), Some(0));
        assert_eq!(
            limiter.admit(key(5701), t0 + Duration::from_secs(61)),
            Some(5)
        );
        assert_eq!(limiter.admit(key(5701), t0 + Duration::from_secs(62)), None);
    }

    #[test]
    fn a_sweep_prints_held_back_counts_and_forgets_quiet_keys() {
        let mut limiter = limiter(Duration::from_secs(60));
        let t0 = Instant::now();
        limiter.admit(key(5701), t0);
        limiter.admit(key(5701), t0);
        limiter.admit(key(5701), t0);
        limiter.admit(key(6379), t0);
        assert!(limiter.sweep(t0 + Duration::from_secs(30)).is_empty());
        let lines = limiter.sweep(t0 + Duration::from_secs(60));
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap_or_default();
        assert_eq!(line["suppressed"], 2);
        assert_eq!(line["originalDestination"], "10.0.1.7:5701");
        assert!(limiter.windows.is_empty(), "both keys are forgotten");
        // The next event of a forgotten key prints at once, with nothing held back.
        assert_eq!(
            limiter.admit(key(5701), t0 + Duration::from_secs(61)),
            Some(0)
        );
    }

    #[test]
    fn keys_beyond_capacity_are_counted_not_printed() {
        let mut limiter = limiter(Duration::from_secs(60));
        let t0 = Instant::now();
        for port in 0..MAX_TRACKED_KEYS as u16 {
            assert_eq!(limiter.admit(key(port), t0), Some(0));
        }
        assert_eq!(limiter.admit(key(u16::MAX), t0), None);
        assert_eq!(limiter.windows.len(), MAX_TRACKED_KEYS);
        let lines = limiter.sweep(t0 + Duration::from_secs(60));
        let last: serde_json::Value =
            serde_json::from_str(lines.last().map_or("", String::as_str)).unwrap_or_default();
        assert_eq!(last["suppressedUntracked"], 1);
    }

    #[test]
    fn a_zero_interval_prints_every_line() {
        let mut limiter = limiter(Duration::ZERO);
        let t0 = Instant::now();
        assert_eq!(limiter.admit(key(5701), t0), Some(0));
        assert_eq!(limiter.admit(key(5701), t0), Some(0));
    }
}
