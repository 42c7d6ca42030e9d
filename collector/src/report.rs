//! The audit report: one row per (source workload, source namespace, original
//! destination, upstream host, cluster, verdict), from the exact aggregates.
//! The JSON shape is documented in docs/report.md and kept stable.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use rusqlite::Connection;
use serde::Serialize;

use crate::store::{self, StoreError};
use crate::time::rfc3339;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportRow {
    pub source_workload: String,
    pub source_namespace: String,
    /// "ip:port" the application dialed.
    pub original_destination: String,
    /// "ip:port" Envoy connected to; null when no host was chosen.
    pub upstream_host: Option<String>,
    pub cluster: String,
    /// Lower case: "misrouted", "blackholed", ...
    pub verdict: String,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub rows: Vec<ReportRow>,
    /// Events sidecars dropped before sending (their buffer was full): a gap
    /// in the rows' counts.
    pub dropped_events: u64,
}

/// Reads the report; misrouted rows first, then by count.
pub fn query(conn: &Connection) -> Result<Report, StoreError> {
    let mut statement = conn.prepare(
        "SELECT source_workload, source_namespace, original_destination, upstream_host,
                cluster, verdict, count, first_seen_ns, last_seen_ns
         FROM aggregates
         ORDER BY verdict = 'misrouted' DESC, count DESC, original_destination",
    )?;
    let rows = statement
        .query_map([], |row| {
            let upstream: String = row.get(3)?;
            let count: i64 = row.get(6)?;
            let first: i64 = row.get(7)?;
            let last: i64 = row.get(8)?;
            Ok(ReportRow {
                source_workload: row.get(0)?,
                source_namespace: row.get(1)?,
                original_destination: row.get(2)?,
                upstream_host: (!upstream.is_empty()).then_some(upstream),
                cluster: row.get(4)?,
                verdict: row.get(5)?,
                count: count.max(0) as u64,
                first_seen: rfc3339(first.max(0) as u64),
                last_seen: rfc3339(last.max(0) as u64),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Report {
        rows,
        dropped_events: store::total_dropped(conn)?,
    })
}

/// A table for people.
pub fn render_table(report: &Report) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "verdict",
        "source (ns/workload)",
        "dialed",
        "reached",
        "cluster",
        "count",
        "first seen",
        "last seen",
    ]);
    for row in &report.rows {
        table.add_row([
            row.verdict.clone(),
            format!("{}/{}", row.source_namespace, row.source_workload),
            row.original_destination.clone(),
            row.upstream_host.clone().unwrap_or_else(|| "(none)".into()),
            row.cluster.clone(),
            row.count.to_string(),
            row.first_seen.clone(),
            row.last_seen.clone(),
        ]);
    }
    let mut out = table.to_string();
    out.push('\n');
    if report.rows.is_empty() {
        out.push_str("no misrouted or blackholed connections recorded\n");
    }
    if report.dropped_events > 0 {
        out.push_str(&format!(
            "warning: sidecars dropped {} events before they could be sent; counts above miss them\n",
            report.dropped_events
        ));
    }
    out
}
