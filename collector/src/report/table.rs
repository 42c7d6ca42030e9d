//! `report -o table` and `-o wide`: the report for people. The table fits
//! the terminal: cells wrap, and when even wrapped the columns cannot fit,
//! the least needed ones go first (and a line says which); addresses,
//! verdicts and counts never break across lines. `-o wide` shows every
//! column at its full width, as kubectl's does.

use comfy_table::{
    Cell, ColumnConstraint, ContentArrangement, Table, presets::UTF8_FULL_CONDENSED,
};

use super::{Report, ReportRow, coverage_cells, gap_notes, truncation_note};
use crate::inventory::Coverage;

/// How the table is laid out: `-o table` or `-o wide`, and the width to
/// fit (the terminal's, or `COLUMNS`); `None` leaves it unlimited (a pipe).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableLayout {
    /// Every column at full width (`-o wide`).
    pub wide: bool,
    /// Fit into this many columns (not `wide`).
    pub width: Option<u16>,
}

impl TableLayout {
    fn table(&self) -> Table {
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic);
        // `-o wide` is for reading everything (or a wider window), like
        // kubectl's: it is not squeezed into the terminal.
        if let (Some(width), false) = (self.width, self.wide) {
            table.set_width(width);
        }
        table
    }
}

/// One column of the rows' table.
struct Column {
    header: &'static str,
    /// Which columns go first when the table cannot fit: the highest.
    /// 0: always shown.
    drop_rank: u8,
    /// In the default table; otherwise only with `-o wide`.
    default: bool,
    /// Its cells never break (addresses, verdicts, numbers).
    atomic: bool,
    cell: fn(&ReportRow) -> String,
}

/// A breakable column is not made narrower than this (or its longest word).
const MIN_BREAKABLE_WIDTH: usize = 16;

const COLUMNS: &[Column] = &[
    Column {
        header: "verdict",
        drop_rank: 0,
        default: true,
        atomic: true,
        cell: |row| row.verdict.clone(),
    },
    Column {
        header: "source (ns/workload)",
        drop_rank: 0,
        default: true,
        atomic: false,
        cell: |row| format!("{}/{}", row.source_namespace, row.source_workload),
    },
    Column {
        header: "dialed",
        drop_rank: 0,
        default: true,
        atomic: true,
        cell: |row| row.original_destination.clone(),
    },
    Column {
        header: "meant to reach",
        drop_rank: 3,
        default: true,
        atomic: false,
        cell: |row| {
            row.intended
                .as_ref()
                .map(|pod| format!("{}/{}", pod.namespace, pod.pod))
                .unwrap_or_else(|| "-".into())
        },
    },
    Column {
        header: "reached",
        drop_rank: 0,
        default: true,
        atomic: true,
        cell: |row| row.upstream_host.clone().unwrap_or_else(|| "(none)".into()),
    },
    Column {
        header: "cluster (service)",
        drop_rank: 0,
        default: true,
        atomic: false,
        cell: |row| {
            if row.capturing_service.is_empty() {
                row.cluster.clone()
            } else {
                format!("{}\n({})", row.cluster, row.capturing_service)
            }
        },
    },
    Column {
        header: "cause",
        drop_rank: 2,
        default: true,
        atomic: false,
        cell: |row| row.cause.label().to_string(),
    },
    Column {
        header: "count",
        drop_rank: 0,
        default: true,
        atomic: true,
        cell: |row| row.count.to_string(),
    },
    Column {
        header: "would close",
        drop_rank: 0,
        default: false,
        atomic: true,
        cell: |row| row.would_close.to_string(),
    },
    Column {
        header: "enforced",
        drop_rank: 0,
        default: false,
        atomic: true,
        cell: |row| row.enforced.to_string(),
    },
    Column {
        header: "first seen",
        drop_rank: 0,
        default: false,
        atomic: false,
        cell: |row| row.first_seen.clone(),
    },
    Column {
        header: "last seen",
        drop_rank: 4,
        default: true,
        atomic: false,
        cell: |row| row.last_seen.clone(),
    },
    Column {
        header: "source pods",
        drop_rank: 0,
        default: false,
        atomic: false,
        cell: |row| row.source_pods.join("\n"),
    },
];

/// The narrowest a column can be made: its widest cell when atomic,
/// otherwise its longest word up to [`MIN_BREAKABLE_WIDTH`].
fn narrowest(column: &Column, cells: &[String]) -> usize {
    let width = |text: &str| unicode_width::UnicodeWidthStr::width(text);
    let words = std::iter::once(column.header)
        .chain(cells.iter().map(String::as_str))
        .flat_map(|text| text.lines());
    if column.atomic {
        words.map(width).max().unwrap_or(0)
    } else {
        words
            .flat_map(str::split_whitespace)
            .map(width)
            .max()
            .unwrap_or(0)
            .min(MIN_BREAKABLE_WIDTH)
    }
}

/// The table's width for columns this narrow: a border and two spaces of
/// padding beside each, and the closing border.
fn table_width(narrowest: impl Iterator<Item = usize>) -> usize {
    narrowest.map(|w| w + 3).sum::<usize>() + 1
}

/// The report for people: the rows, the notes on what they miss, coverage.
pub fn render_table(report: &Report, layout: TableLayout) -> String {
    let mut columns: Vec<(&Column, Vec<String>)> = COLUMNS
        .iter()
        .filter(|column| layout.wide || column.default)
        .map(|column| (column, report.rows.iter().map(column.cell).collect()))
        .collect();
    if let (Some(width), false) = (layout.width, layout.wide) {
        // Leave out the least needed columns until the rest fit unbroken.
        while table_width(columns.iter().map(|(c, cells)| narrowest(c, cells))) > usize::from(width)
        {
            let Some(at) = columns
                .iter()
                .enumerate()
                .filter(|(_, (column, _))| column.drop_rank > 0)
                .max_by_key(|(_, (column, _))| column.drop_rank)
                .map(|(at, _)| at)
            else {
                break;
            };
            columns.remove(at);
        }
    }
    let mut table = layout.table();
    table.set_header(columns.iter().map(|(column, _)| Cell::new(column.header)));
    for row in 0..report.rows.len() {
        table.add_row(columns.iter().map(|(_, cells)| Cell::new(&cells[row])));
    }
    for (at, (column, _)) in columns.iter().enumerate() {
        if column.atomic
            && let Some(table_column) = table.column_mut(at)
        {
            table_column.set_constraint(ColumnConstraint::ContentWidth);
        }
    }
    let shown: Vec<&str> = columns.iter().map(|(column, _)| column.header).collect();
    let left_out: Vec<&str> = COLUMNS
        .iter()
        .filter(|column| column.default && !shown.contains(&column.header))
        .map(|column| column.header)
        .collect();

    let mut out = table.to_string();
    out.push('\n');
    let filtered = !report.filter.is_empty();
    if report.rows.is_empty() {
        out.push_str(if filtered {
            "no reported connections match the filter\n"
        } else {
            "no misrouted or blackholed connections recorded\n"
        });
    } else if !left_out.is_empty() {
        out.push_str(&format!(
            "columns left out to fit the terminal: {} (-o wide shows every column)\n",
            left_out.join(", ")
        ));
    }
    if let Some(note) = truncation_note(report) {
        out.push_str(&note);
        out.push('\n');
    }
    if filtered {
        // The effective filter, relative times resolved; as the HTTP API takes it.
        let query = serde_json::to_value(&report.filter)
            .ok()
            .and_then(|value| value.as_object().cloned())
            .unwrap_or_default()
            .into_iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(text) => format!("{name}={text}"),
                other => format!("{name}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" ");
        out.push_str(&format!("filter: {query}\n"));
    }
    for note in gap_notes(report) {
        out.push_str(&note);
        out.push('\n');
    }
    out.push_str(&render_coverage_table(&report.coverage, layout));
    out
}

/// The coverage table, with a line per uncovered namespace and the stale sidecars.
fn render_coverage_table(coverage: &Coverage, layout: TableLayout) -> String {
    let mut out = String::from("\ncoverage (pods with a dialguard sidecar, per namespace)\n");
    if coverage.namespaces.is_empty() {
        out.push_str("no sidecar has reported and no namespace is expected\n");
        return out;
    }
    let mut table = layout.table();
    table.set_header(super::COVERAGE_CSV_HEADER);
    for ns in &coverage.namespaces {
        table.add_row(coverage_cells(ns));
    }
    out.push_str(&table.to_string());
    out.push('\n');
    for namespace in &coverage.uncovered {
        out.push_str(&format!(
            "warning: expected namespace {namespace} has no reporting sidecar: no rows there means nothing was watched\n"
        ));
    }
    let stale: Vec<String> = coverage
        .sidecars
        .iter()
        .filter(|s| s.stale)
        .map(|s| format!("{}/{} (last seen {})", s.namespace, s.pod, s.last_seen))
        .collect();
    if !stale.is_empty() {
        out.push_str(&format!("stale sidecars: {}\n", stale.join(", ")));
    }
    out
}
