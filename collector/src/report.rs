//! The audit report: one row per (source workload, source namespace, original
//! destination, upstream host, cluster, verdict), from the exact aggregates,
//! worst first, a page at a time. The JSON shape is documented in
//! docs/report.md and kept stable.
//!
//! Memory per report is bounded whatever the database holds: SQLite orders
//! and limits the rows (its sorter keeps only the page's rows; no index,
//! because filtered pages walking a worst-first index were slower than a
//! scan, see docs/benchmarks.md), the page's rows are read one by one, and
//! the directory is asked for the page's dialed IPs only.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use rusqlite::Connection;
use serde::Serialize;

use crate::finding::{Cause, Culprit, Subject};
use crate::inventory::{self, Coverage, CoverageScope, NamespaceCoverage};
use crate::store::{self, DirectoryEntry, StoreError};
use crate::time::rfc3339;

mod filter;
pub mod html;
mod page;
mod table;

pub use filter::{AppliedFilter, FilterArgs, FilterError, ReportFilter, VERDICTS};
pub use page::{Cursor, DEFAULT_LIMIT, MAX_LIMIT, Page};
pub use table::{TableLayout, render_table};

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
    /// The pod that owns the dialed address, from the directory of
    /// connected sidecars; null when no sidecar announced that IP.
    #[serde(default)]
    pub intended: Option<Intended>,
    /// The service whose listener captured the connection (the cluster's
    /// `istio.services`); empty when the cluster carries none.
    #[serde(default)]
    pub capturing_service: String,
    /// The upstream host's `istio.workload` as the filter read it; empty when unknown.
    #[serde(default)]
    pub upstream_workload: String,
    /// The row in one sentence.
    #[serde(default)]
    pub summary: String,
    /// What usually fixes it (from the field incidents).
    #[serde(default)]
    pub fix: String,
    /// The root cause the row's events support.
    #[serde(default)]
    pub cause: Cause,
    /// The cause in one sentence, naming the listener, service or policy.
    #[serde(default)]
    pub cause_text: String,
    /// The object to change; null when the events do not name one.
    #[serde(default)]
    pub culprit: Option<Culprit>,
    /// Connections of the row that enforce mode would close (audit) or closed.
    #[serde(default)]
    pub would_close: u64,
    /// Connections of the row that enforce mode closed.
    #[serde(default)]
    pub enforced: u64,
    /// Pods of the source workload that made these connections (at most 16).
    #[serde(default)]
    pub source_pods: Vec<String>,
}

/// Who the application meant to reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Intended {
    pub pod: String,
    pub namespace: String,
    pub workload: String,
    /// When that pod's sidecar was last connected.
    pub last_seen: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// This page's rows, worst first.
    pub rows: Vec<ReportRow>,
    /// Rows the filter selects, over all pages.
    #[serde(default)]
    pub total_rows: u64,
    /// More rows follow this page: ask again with `nextCursor`.
    #[serde(default)]
    pub truncated: bool,
    /// The `cursor` of the next page, when `truncated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Events sidecars dropped before sending (their buffer was full): a gap
    /// in the rows' counts.
    pub dropped_events: u64,
    /// Events the collector refused (invalid fields): not in the counts.
    #[serde(default)]
    pub rejected_events: u64,
    /// Events counted in the rows whose raw record was not kept because the
    /// collector was behind (raw rows are sampled then; counts stay exact).
    #[serde(default)]
    pub sampled_out_events: u64,
    /// The filter the rows were selected with; absent when unfiltered. The
    /// three gap counters above are never filtered (sidecars count them
    /// without time or destination).
    #[serde(default, skip_serializing_if = "AppliedFilter::is_empty")]
    pub filter: AppliedFilter,
    /// Which pods' sidecars report, what they judged, and which expected
    /// namespaces have none: silence in `rows` means "no misroutes" only
    /// where coverage says sidecars were reporting.
    #[serde(default)]
    pub coverage: Coverage,
}

/// Reads the first page of the report, worst first.
pub fn query(conn: &Connection) -> Result<Report, StoreError> {
    query_filtered(conn, &ReportFilter::default())
}

/// The `aggregates` columns a row is made of, in [`read_row`]'s order.
const ROW_COLUMNS: &str = "source_workload, source_namespace, original_destination, upstream_host,
    cluster, verdict, count, first_seen_ns, last_seen_ns, capturing_service, upstream_workload,
    cause, would_close, enforced, source_pods";
/// Where [`page::order_columns`] start in a row.
const ORDER_COLUMNS_AT: usize = 15;

/// Reads the page of rows that `filter` selects (in SQL, over the
/// aggregates), with the totals and the coverage, from one snapshot of the
/// database.
pub fn query_filtered(conn: &Connection, filter: &ReportFilter) -> Result<Report, StoreError> {
    // A read transaction: the count, the page and the totals agree even
    // while the collector commits.
    let snapshot = conn.unchecked_transaction()?;
    let (condition, values) = filter.sql_condition();
    let total_rows: i64 = snapshot.query_row(
        &format!("SELECT count(*) FROM aggregates WHERE {condition}"),
        rusqlite::params_from_iter(&values),
        |row| row.get(0),
    )?;
    let limit = filter.page.limit;
    let (after, after_values) = filter.page.sql_after();
    let mut statement = snapshot.prepare(&format!(
        "SELECT {ROW_COLUMNS}, {}
         FROM aggregates
         WHERE ({condition}) AND {after}
         ORDER BY {}
         LIMIT ?",
        page::order_columns(),
        page::order_by(),
    ))?;
    // One row more than the page: whether another page follows.
    let bound = values
        .into_iter()
        .chain(after_values)
        .chain([rusqlite::types::Value::Integer(limit as i64 + 1)]);
    let mut selected = statement.query(rusqlite::params_from_iter(bound))?;
    let mut rows = Vec::with_capacity(limit.min(1_024));
    let mut last = None;
    let mut truncated = false;
    while let Some(row) = selected.next()? {
        if rows.len() == limit {
            truncated = true;
            break;
        }
        rows.push(read_row(row)?);
        last = Some(Cursor::read(row, ORDER_COLUMNS_AT)?);
    }
    drop(selected);
    let owners = store::directory_owners(&snapshot, rows.iter().filter_map(dialed_ip))?;
    let gaps = store::gaps(&snapshot)?;
    let coverage = coverage(&snapshot, filter)?;
    Ok(Report {
        rows: rows.into_iter().map(|row| enrich(row, &owners)).collect(),
        total_rows: total_rows.max(0) as u64,
        truncated,
        next_cursor: last.filter(|_| truncated).map(|cursor| cursor.encode()),
        dropped_events: gaps.dropped,
        rejected_events: gaps.rejected,
        sampled_out_events: gaps.sampled_out,
        filter: filter.applied(),
        coverage,
    })
}

/// Most VMs a coverage view reads from the database (the collector holds
/// at most `--max-vms` in memory; the newest are read first).
const MAX_COVERAGE_VMS: usize = 1_000_000;

/// Coverage as of now, from the stored inventory: `--namespace` restricts
/// it; `--since`/`--until` keep the sidecars heard within the window, with
/// their counts as of their last heartbeat (cumulative, not cut at the
/// window's edges). `verdict` and `port` do not narrow it.
pub fn coverage(conn: &Connection, filter: &ReportFilter) -> Result<Coverage, StoreError> {
    let (expected, forget_stale) = store::coverage_config(conn)?;
    let vms = store::inventory(conn, filter.namespace.as_deref(), MAX_COVERAGE_VMS)?;
    let scope = CoverageScope {
        now_ns: crate::time::now_unix_nanos(),
        since_ns: filter.since_ns,
        until_ns: filter.until_ns,
        namespace: filter.namespace.clone(),
        expected,
        forget_stale,
    };
    Ok(inventory::coverage(
        vms.iter().map(|(key, vm)| (key, vm)),
        &scope,
    ))
}

/// A row of [`ROW_COLUMNS`], before [`enrich`] adds what is not stored.
fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ReportRow> {
    let upstream: String = row.get(3)?;
    let count: i64 = row.get(6)?;
    let first: i64 = row.get(7)?;
    let last: i64 = row.get(8)?;
    let cause: String = row.get(11)?;
    let would_close: i64 = row.get(12)?;
    let enforced: i64 = row.get(13)?;
    let source_pods: String = row.get(14)?;
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
        intended: None,
        capturing_service: row.get(9)?,
        upstream_workload: row.get(10)?,
        summary: String::new(),
        fix: String::new(),
        // Empty for rows stored before causes existed.
        cause: Cause::from_label(&cause).unwrap_or_default(),
        cause_text: String::new(),
        culprit: None,
        would_close: would_close.max(0) as u64,
        enforced: enforced.max(0) as u64,
        source_pods: source_pods
            .split(',')
            .filter(|pod| !pod.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

fn dialed_ip(row: &ReportRow) -> Option<IpAddr> {
    row.original_destination
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip())
}

/// Adds the owner of the dialed address (from `owners`, the directory's
/// entries for the page's dialed IPs) and the one-sentence summary.
fn enrich(mut row: ReportRow, owners: &HashMap<IpAddr, DirectoryEntry>) -> ReportRow {
    row.intended = dialed_ip(&row)
        .and_then(|ip| owners.get(&ip))
        .map(|entry| Intended {
            pod: entry.pod_name.clone(),
            namespace: entry.namespace.clone(),
            workload: entry.workload_name.clone(),
            last_seen: rfc3339(entry.last_seen_ns),
        });
    row.summary = summary(&row);
    if let Ok(dialed) = row.original_destination.parse::<SocketAddr>() {
        let explained = Subject {
            cause: row.cause,
            cluster: &row.cluster,
            capturing_service: &row.capturing_service,
            dialed,
            source_namespace: &row.source_namespace,
            source_workload: &row.source_workload,
        }
        .explain();
        row.cause_text = explained.cause_text;
        row.fix = explained.fix;
        row.culprit = explained.culprit;
    }
    row
}

/// The line that says a report shows part of its rows, and how to see
/// the rest; `None` when it shows them all.
pub fn truncation_note(report: &Report) -> Option<String> {
    let shown = report.rows.len() as u64;
    let total = report.total_rows;
    match &report.next_cursor {
        Some(cursor) if report.truncated => Some(format!(
            "showing {shown} of {total} rows, worst first; more with --limit N (at most {MAX_LIMIT}), \
             or the next page with --cursor {cursor}"
        )),
        _ if shown < total => Some(format!(
            "showing the last {shown} of {total} rows (the page after --cursor)"
        )),
        _ => None,
    }
}

/// "manager/manager dialed pod manager-7948-sh7rx (10.0.1.7:5701) and
/// reached 10.96.3.4:5701 through outbound|5701||app-ext.app.svc.cluster.local".
fn summary(row: &ReportRow) -> String {
    let source = format!("{}/{}", row.source_namespace, row.source_workload);
    let dialed = match &row.intended {
        Some(pod) => format!(
            "pod {}/{} ({})",
            pod.namespace, pod.pod, row.original_destination
        ),
        None => row.original_destination.clone(),
    };
    let reached = match &row.upstream_host {
        Some(host) if row.upstream_workload.is_empty() => format!("reached {host}"),
        Some(host) => format!("reached {host} ({})", workload_name(&row.upstream_workload)),
        None => "reached no host".to_string(),
    };
    let captured = if row.capturing_service.is_empty() {
        String::new()
    } else {
        format!(", captured by service {}", row.capturing_service)
    };
    format!(
        "{source} dialed {dialed} and {reached} through {}{captured}",
        row.cluster
    )
}

/// `istio.workload` is "name;namespace;canonical-service;revision;cluster":
/// "namespace/name" reads better.
fn workload_name(istio_workload: &str) -> String {
    let mut parts = istio_workload.split(';');
    match (parts.next(), parts.next()) {
        (Some(name), Some(namespace)) if !namespace.is_empty() => format!("{namespace}/{name}"),
        _ => istio_workload.to_string(),
    }
}

/// The table's columns as CSV, one header line and one line per row; the
/// table's "cluster (service)" is split in two columns and absent values are
/// empty cells.
pub fn render_csv(report: &Report) -> Result<String, csv::Error> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(CSV_HEADER)?;
    for row in &report.rows {
        let count = row.count.to_string();
        let source = format!("{}/{}", row.source_namespace, row.source_workload);
        let intended = row
            .intended
            .as_ref()
            .map(|pod| format!("{}/{}", pod.namespace, pod.pod))
            .unwrap_or_default();
        let would_close = row.would_close.to_string();
        writer.write_record([
            row.verdict.as_str(),
            &source,
            &row.original_destination,
            &intended,
            row.upstream_host.as_deref().unwrap_or(""),
            &row.cluster,
            &row.capturing_service,
            row.cause.label(),
            &count,
            &would_close,
            &row.first_seen,
            &row.last_seen,
        ])?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|err| csv::Error::from(err.into_error()))?;
    // Every field written is a String, so the output is UTF-8.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `report --format csv --section coverage`: one line per namespace.
pub fn render_coverage_csv(report: &Report) -> Result<String, csv::Error> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(COVERAGE_CSV_HEADER)?;
    for ns in &report.coverage.namespaces {
        writer.write_record(coverage_cells(ns))?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|err| csv::Error::from(err.into_error()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The lines that say where the counts have gaps (events refused,
/// sampled out or dropped by sidecars); none when they have none.
pub fn gap_notes(report: &Report) -> Vec<String> {
    let mut notes = Vec::new();
    if report.rejected_events > 0 {
        notes.push(format!(
            "warning: the collector refused {} invalid events; counts above miss them",
            report.rejected_events
        ));
    }
    if report.sampled_out_events > 0 {
        notes.push(format!(
            "note: {} events are counted above but their raw records were sampled out while the collector was behind",
            report.sampled_out_events
        ));
    }
    if report.dropped_events > 0 {
        notes.push(format!(
            "warning: sidecars dropped {} events before they could be sent; counts above miss them",
            report.dropped_events
        ));
    }
    notes
}

/// `report -o csv --section gaps`: one line with the rows' totals and the
/// gap counters, for tools that keep the CSV (the table and JSON carry
/// them with the rows).
pub fn render_gaps_csv(report: &Report) -> Result<String, csv::Error> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(GAPS_CSV_HEADER)?;
    writer.write_record([
        report.total_rows.to_string(),
        report.rows.len().to_string(),
        report.truncated.to_string(),
        report.rejected_events.to_string(),
        report.sampled_out_events.to_string(),
        report.dropped_events.to_string(),
    ])?;
    let bytes = writer
        .into_inner()
        .map_err(|err| csv::Error::from(err.into_error()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The columns of [`render_gaps_csv`].
pub const GAPS_CSV_HEADER: [&str; 6] = [
    "total rows",
    "rows shown",
    "truncated",
    "rejected events",
    "sampled out events",
    "dropped events",
];

/// The coverage columns (CSV and table).
pub const COVERAGE_CSV_HEADER: [&str; 6] = [
    "namespace",
    "expected",
    "covered",
    "reporting sidecars",
    "stale sidecars",
    "judged connections",
];

pub(crate) fn coverage_cells(ns: &NamespaceCoverage) -> [String; 6] {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    [
        ns.namespace.clone(),
        yes_no(ns.expected),
        yes_no(ns.covered),
        ns.sidecars.to_string(),
        ns.stale.to_string(),
        ns.judged.to_string(),
    ]
}

/// The CSV columns: the table's, with cluster and capturing service apart.
pub const CSV_HEADER: [&str; 12] = [
    "verdict",
    "source (ns/workload)",
    "dialed",
    "meant to reach",
    "reached",
    "cluster",
    "capturing service",
    "cause",
    "count",
    "would close",
    "first seen",
    "last seen",
];
