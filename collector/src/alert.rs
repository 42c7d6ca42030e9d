//! One JSON line on stdout per misrouted connection, as soon as it is stored.

use std::io::Write;

use dialguard_proto::v1::{Hello, Verdict};

use crate::event::ValidEvent;
use serde::Serialize;

#[derive(Debug, Clone, Default)]
pub struct AlertSink;

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
}

impl AlertSink {
    pub fn misrouted(&self, sidecar: &Hello, events: &[ValidEvent]) {
        let mut out = std::io::stdout().lock();
        for event in events.iter().filter(|e| e.verdict == Verdict::Misrouted) {
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
            };
            if let Ok(line) = serde_json::to_string(&alert) {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
    }
}
