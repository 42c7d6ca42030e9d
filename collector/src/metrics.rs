//! The collector's own Prometheus metrics, served at `GET /metrics`
//! (OpenMetrics text). Label sets are bounded: misrouted connections are
//! labelled by source namespace, verdict, port and cause for the first
//! `MAX_MISROUTE_SERIES` combinations, and as `other` after that; would-close
//! counts by source namespace, the first `MAX_WOULD_CLOSE_SERIES` of them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::finding::Cause;

/// Distinct (namespace, verdict, port) series before new ones fold into `other`.
const MAX_MISROUTE_SERIES: usize = 1_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MisrouteLabels {
    pub source_namespace: String,
    pub verdict: String,
    pub port: String,
    /// One of `finding::Cause`'s seven labels: bounded by construction.
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub source_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SidecarStateLabels {
    pub namespace: String,
    /// `reporting` or `stale`.
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CoverageNamespaceLabels {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JudgedLabels {
    pub namespace: String,
    /// One of `inventory::VERDICTS`.
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionRefusalLabels {
    /// `grpc` or `http`.
    pub listener: String,
    /// One of `listener::REFUSAL_REASONS`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `grpc` or `http`.
    pub listener: String,
}

/// Namespaces with their own coverage series (sidecars, judged
/// connections) before the rest fold into `other`; expected namespaces
/// always get theirs.
const MAX_COVERAGE_NAMESPACES: usize = 2_000;

/// Distinct source namespaces of `would_close_connections` before new ones
/// fold into `other`.
const MAX_WOULD_CLOSE_SERIES: usize = 1_000;

/// Every metric, cheap to clone (the handles share their values).
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub events_received: Counter,
    pub events_stored: Counter,
    pub events_duplicate: Counter,
    pub events_rejected: Family<ReasonLabels, Counter>,
    pub events_sampled_out: Counter,
    pub sidecar_dropped_events: Counter,
    pub streams_connected: Gauge,
    pub streams_refused: Family<ReasonLabels, Counter>,
    pub commit_duration: Histogram,
    misrouted: Family<MisrouteLabels, Counter>,
    misroute_series: Arc<Mutex<HashSet<MisrouteLabels>>>,
    would_close: Family<NamespaceLabels, Counter>,
    would_close_series: Arc<Mutex<HashSet<String>>>,
    pub heartbeats: Counter,
    sidecars: Family<SidecarStateLabels, Gauge>,
    namespace_expected: Family<CoverageNamespaceLabels, Gauge>,
    namespace_uncovered: Family<CoverageNamespaceLabels, Gauge>,
    judged: Family<JudgedLabels, Counter>,
    judged_series: Arc<Mutex<HashSet<String>>>,
    /// Namespaces that had sidecar series: they keep them (at 0) after
    /// their last pod left the coverage, so the drop shows.
    sidecar_namespaces: Arc<Mutex<HashSet<String>>>,
    /// Held while the coverage gauges are rebuilt and encoded, so that two
    /// scrapes never see each other's half-built families.
    scrape: Arc<Mutex<()>>,
    pub connections_refused: Family<ConnectionRefusalLabels, Counter>,
    pub connections_open: Family<ListenerLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dialguard");
        let events_received = Counter::default();
        let events_stored = Counter::default();
        let events_duplicate = Counter::default();
        let events_rejected = Family::<ReasonLabels, Counter>::default();
        let events_sampled_out = Counter::default();
        let sidecar_dropped_events = Counter::default();
        let streams_connected = Gauge::default();
        let streams_refused = Family::<ReasonLabels, Counter>::default();
        // 0.5 ms to about 8 s.
        let commit_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        let misrouted = Family::<MisrouteLabels, Counter>::default();
        let would_close = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "events_received",
            "Events received from sidecars (valid or not, resends included)",
            events_received.clone(),
        );
        registry.register(
            "events_stored",
            "Events stored and counted for the first time",
            events_stored.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events received again (resends after a lost acknowledgement); acknowledged, not counted twice",
            events_duplicate.clone(),
        );
        registry.register(
            "events_rejected",
            "Events refused, by the field that was invalid",
            events_rejected.clone(),
        );
        registry.register(
            "events_sampled_out",
            "Events counted in the aggregates whose raw row was not kept (overload)",
            events_sampled_out.clone(),
        );
        registry.register(
            "sidecar_dropped_events",
            "Events sidecars dropped before sending them (their buffer was full)",
            sidecar_dropped_events.clone(),
        );
        registry.register(
            "streams_connected",
            "Sidecar streams open now (identified by hello)",
            streams_connected.clone(),
        );
        registry.register(
            "streams_refused",
            "Streams ended by the collector, by reason",
            streams_refused.clone(),
        );
        registry.register(
            "commit_duration_seconds",
            "Time to commit one group of batches to the database",
            commit_duration.clone(),
        );
        registry.register(
            "misrouted_connections",
            "Connections reported by sidecars (misrouted, blackholed, redirected), by source namespace, verdict, dialed port and cause",
            misrouted.clone(),
        );
        registry.register(
            "would_close_connections",
            "Connections enforce mode closes (or would close, in audit mode), by source namespace",
            would_close.clone(),
        );
        let heartbeats = Counter::default();
        let sidecars = Family::<SidecarStateLabels, Gauge>::default();
        let namespace_expected = Family::<CoverageNamespaceLabels, Gauge>::default();
        let namespace_uncovered = Family::<CoverageNamespaceLabels, Gauge>::default();
        let judged = Family::<JudgedLabels, Counter>::default();
        registry.register(
            "heartbeats",
            "Heartbeats accepted from sidecar VMs",
            heartbeats.clone(),
        );
        registry.register(
            "sidecars",
            "Pods with a dialguard sidecar, by namespace and state (reporting: a VM heard within three heartbeat intervals; stale: none)",
            sidecars.clone(),
        );
        registry.register(
            "namespace_expected",
            "1 per namespace serve was told to expect (--expect-namespace, --expect-namespaces-file)",
            namespace_expected.clone(),
        );
        registry.register(
            "namespace_uncovered",
            "1 when an expected namespace has no reporting sidecar, else 0",
            namespace_uncovered.clone(),
        );
        registry.register(
            "judged_connections",
            "Connections judged by a namespace's sidecars, by verdict (from heartbeat counters)",
            judged.clone(),
        );
        // Labelled series exist from the start at 0, so that Prometheus'
        // increase() sees the first refusal too.
        for reason in crate::event::CHECKED_FIELDS {
            let _ = events_rejected.get_or_create(&ReasonLabels {
                reason: reason.into(),
            });
        }
        for reason in crate::ingest::IngestError::REASONS {
            let _ = streams_refused.get_or_create(&ReasonLabels {
                reason: reason.into(),
            });
        }
        let connections_refused = Family::<ConnectionRefusalLabels, Counter>::default();
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "connections_refused",
            "Connections a listener refused or closed before serving them, by listener and reason \
             (full: no free slot; evicted: closed while waiting for its request to make room; \
             timeout: request headers, a TLS handshake or an unread answer too slow; \
             handshake: the TLS handshake failed)",
            connections_refused.clone(),
        );
        registry.register(
            "connections_open",
            "Connections a listener holds now, by listener",
            connections_open.clone(),
        );
        for listener in crate::listener::Listener::ALL {
            let _ = connections_open.get_or_create(&ListenerLabels {
                listener: listener.label().into(),
            });
            for reason in crate::listener::REFUSAL_REASONS {
                let _ = connections_refused.get_or_create(&ConnectionRefusalLabels {
                    listener: listener.label().into(),
                    reason: reason.into(),
                });
            }
        }
        Self {
            registry: Arc::new(registry),
            events_received,
            events_stored,
            events_duplicate,
            events_rejected,
            events_sampled_out,
            sidecar_dropped_events,
            streams_connected,
            streams_refused,
            commit_duration,
            misrouted,
            misroute_series: Arc::new(Mutex::new(HashSet::new())),
            would_close,
            would_close_series: Arc::new(Mutex::new(HashSet::new())),
            heartbeats,
            sidecars,
            namespace_expected,
            namespace_uncovered,
            judged,
            judged_series: Arc::new(Mutex::new(HashSet::new())),
            sidecar_namespaces: Arc::new(Mutex::new(HashSet::new())),
            scrape: Arc::new(Mutex::new(())),
            connections_refused,
            connections_open,
        }
    }

    /// Counts what a namespace's sidecar judged since its last heartbeat.
    /// A namespace's first heartbeat creates all its verdicts' series (at
    /// 0 where nothing was judged), so that increase() sees the first.
    pub fn judged(&self, namespace: &str, judged: &[u64; 7]) {
        let known = match self.judged_series.lock() {
            Ok(series) if series.contains(namespace) => true,
            Ok(mut series) if series.len() < MAX_COVERAGE_NAMESPACES => {
                series.insert(namespace.to_string());
                true
            }
            _ => false,
        };
        let namespace = if known { namespace } else { "other" };
        for (verdict, n) in crate::inventory::VERDICTS.iter().zip(judged) {
            self.judged
                .get_or_create(&JudgedLabels {
                    namespace: namespace.to_string(),
                    verdict: verdict.to_string(),
                })
                .inc_by(*n);
        }
    }

    /// The exposition text with the coverage gauges set from `namespaces`
    /// (recomputed per scrape: staleness is a matter of time).
    pub fn encode_with_coverage(
        &self,
        namespaces: &[crate::inventory::NamespaceCoverage],
    ) -> Result<String, std::fmt::Error> {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.sidecars.clear();
        self.namespace_expected.clear();
        self.namespace_uncovered.clear();
        let mut known = self
            .sidecar_namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut own = 0;
        for ns in namespaces {
            let name = if ns.expected || own < MAX_COVERAGE_NAMESPACES {
                own += usize::from(!ns.expected);
                ns.namespace.as_str()
            } else {
                "other"
            };
            if name != "other" && known.len() < MAX_COVERAGE_NAMESPACES {
                known.insert(name.to_string());
            }
            for (state, pods) in [("reporting", ns.sidecars), ("stale", ns.stale)] {
                self.sidecars
                    .get_or_create(&SidecarStateLabels {
                        namespace: name.to_string(),
                        state: state.to_string(),
                    })
                    .inc_by(i64::try_from(pods).unwrap_or(i64::MAX));
            }
            if ns.expected {
                let labels = CoverageNamespaceLabels {
                    namespace: name.to_string(),
                };
                self.namespace_expected.get_or_create(&labels).set(1);
                self.namespace_uncovered
                    .get_or_create(&labels)
                    .set(i64::from(!ns.covered));
            }
        }
        for namespace in known.iter() {
            for state in ["reporting", "stale"] {
                // Created at 0 when absent from this scrape's coverage.
                let _ = self.sidecars.get_or_create(&SidecarStateLabels {
                    namespace: namespace.clone(),
                    state: state.to_string(),
                });
            }
        }
        drop(known);
        self.encode()
    }

    pub fn reject_event(&self, field: &str) {
        self.events_rejected
            .get_or_create(&ReasonLabels {
                reason: field.to_string(),
            })
            .inc();
    }

    pub fn refuse_stream(&self, reason: &str) {
        self.streams_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn observe_commit(&self, took: Duration) {
        self.commit_duration.observe(took.as_secs_f64());
    }

    /// Counts reported connections; past the series cap, under `other`.
    pub fn misrouted(
        &self,
        source_namespace: &str,
        verdict: &str,
        port: u16,
        cause: Cause,
        connections: u64,
    ) {
        let labels = MisrouteLabels {
            source_namespace: source_namespace.to_string(),
            verdict: verdict.to_string(),
            port: port.to_string(),
            cause: cause.label().to_string(),
        };
        let labels = match self.misroute_series.lock() {
            Ok(series) if series.contains(&labels) => labels,
            Ok(mut series) if series.len() < MAX_MISROUTE_SERIES => {
                series.insert(labels.clone());
                labels
            }
            _ => MisrouteLabels {
                source_namespace: "other".into(),
                verdict: verdict.to_string(),
                port: "other".into(),
                cause: cause.label().to_string(),
            },
        };
        self.misrouted.get_or_create(&labels).inc_by(connections);
    }

    /// Counts connections enforce mode closes or would close; past the
    /// namespace cap, under `other`.
    pub fn would_close(&self, source_namespace: &str, connections: u64) {
        if connections == 0 {
            return;
        }
        let known = match self.would_close_series.lock() {
            Ok(series) if series.contains(source_namespace) => true,
            Ok(mut series) if series.len() < MAX_WOULD_CLOSE_SERIES => {
                series.insert(source_namespace.to_string());
                true
            }
            _ => false,
        };
        let labels = NamespaceLabels {
            source_namespace: if known {
                source_namespace.to_string()
            } else {
                "other".into()
            },
        };
        self.would_close.get_or_create(&labels).inc_by(connections);
    }

    /// The exposition text (OpenMetrics).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misroute_series_are_capped() {
        let metrics = Metrics::new();
        for port in 0..(MAX_MISROUTE_SERIES as u16 + 50) {
            metrics.misrouted("manager", "misrouted", port, Cause::CatchAll, 1);
        }
        let text = metrics.encode().unwrap_or_default();
        let series = text
            .lines()
            .filter(|l| l.starts_with("dialguard_misrouted_connections_total{"))
            .count();
        assert_eq!(series, MAX_MISROUTE_SERIES + 1, "capped plus one `other`");
        assert!(text.contains(
            r#"dialguard_misrouted_connections_total{source_namespace="other",verdict="misrouted",port="other",cause="catch_all"} 50"#
        ));
    }
}

#[cfg(test)]
mod would_close_tests {
    use super::*;

    #[test]
    fn would_close_series_are_per_namespace_and_capped() {
        let metrics = Metrics::new();
        metrics.would_close("manager", 0);
        assert!(
            !metrics
                .encode()
                .unwrap_or_default()
                .contains("would_close_connections_total{")
        );
        for n in 0..(MAX_WOULD_CLOSE_SERIES + 3) {
            metrics.would_close(&format!("ns-{n}"), 2);
        }
        metrics.would_close("ns-0", 1);
        let text = metrics.encode().unwrap_or_default();
        assert!(
            text.contains(r#"dialguard_would_close_connections_total{source_namespace="ns-0"} 3"#)
        );
        assert!(
            text.contains(r#"dialguard_would_close_connections_total{source_namespace="other"} 6"#)
        );
        let series = text
            .lines()
            .filter(|l| l.starts_with("dialguard_would_close_connections_total{"))
            .count();
        assert_eq!(series, MAX_WOULD_CLOSE_SERIES + 1);
    }
}
