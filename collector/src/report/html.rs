//! `report --format html`: one self-contained page (inline CSS and JS, no
//! fetches of any kind) for the people who fix the mesh: a summary, the
//! findings grouped by root cause (the object to change, how to inspect it
//! and the fix, once per group, worst group first), who dialed what and
//! where it landed, and the gaps in the data.
//!
//! Everything in a report comes from sidecars and is untrusted, so every
//! value goes through [`escape`] (fix and cause texts through
//! [`inline_code`], which escapes too); on top of that the page's Content
//! Security Policy allows only its own script and style (by hash) and no
//! loads at all, so even a mistake here could not make the page fetch or run
//! anything. Each finding carries `data-*` attributes (`data-finding`, the
//! row's number in the JSON report, and the row's key and counts), and each
//! group `data-group` and its cause and culprit, that tests compare with
//! the report.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use super::{Report, ReportRow, VERDICTS, workload_name};
use crate::finding::{Cause, Culprit};

const STYLE: &str = r#"
:root { color-scheme: light; --red: #b71c1c; --red-bg: #fdecea; --amber: #8a5a00; --amber-bg: #fff4dc;
  --grey: #455a64; --grey-bg: #eceff1; --line: #d0d7de; --text: #1f2328; --muted: #57606a; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--text); background: #f6f8fa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 12px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 16px; margin: 0 0 8px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; overflow-wrap: anywhere; }
p code, dd code { background: var(--grey-bg); border-radius: 3px; padding: 0 3px; }
.muted { color: var(--muted); }
[hidden] { display: none !important; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; min-width: 170px; }
.card .number { font-size: 26px; font-weight: 600; }
.card.misrouted { border-left: 6px solid var(--red); }
.card.blackholed { border-left: 6px solid var(--grey); }
.card.redirected { border-left: 6px solid var(--amber); }
.card.warn { background: var(--amber-bg); }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; vertical-align: top; padding: 6px 8px; border-bottom: 1px solid var(--line); }
td { overflow-wrap: anywhere; }
/* Fixed columns: an absurdly long name wraps in its own column instead of
   squeezing the others. */
table.rows, table.flows { table-layout: fixed; }
td.verdict { font-size: 13px; }
.rows .c-verdict { width: 10%; } .rows .c-source { width: 14%; } .rows .c-dialed { width: 17%; }
.rows .c-reached { width: 16%; } .rows .c-cluster { width: 14%; } .rows .c-count { width: 9%; }
.rows .c-close { width: 8%; } .rows .c-seen { width: 12%; }
.flows .c-verdict { width: 10%; } .flows .c-dialed { width: 30%; } .flows .c-arrow { width: 3%; }
.flows .c-reached { width: 27%; } .flows .c-cluster { width: 20%; } .flows .c-count { width: 10%; }
th { font-size: 13px; color: var(--muted); font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
td.seen { font-size: 13px; }
tr.misrouted td { background: var(--red-bg); }
tr.misrouted td.verdict { color: var(--red); font-weight: 600; }
tr.redirected td.verdict { color: var(--amber); font-weight: 600; }
tr.blackholed td.verdict { color: var(--grey); font-weight: 600; }
tr.uncovered td { background: var(--red-bg); }
tr.uncovered td.covered { color: var(--red); font-weight: 600; }
.pods { font-size: 13px; color: var(--muted); }
.pod { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; overflow-wrap: anywhere; }
.pod + .pod::before { content: ", "; }
.group { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin-bottom: 16px; }
.scroll { overflow-x: auto; }
.flow { display: block; margin: 4px 0 12px; }
.flow text { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; fill: var(--text); }
.flow text.owner { fill: var(--muted); }
.flow .node { fill: #fff; stroke: var(--line); }
.flow .edge { fill: none; stroke-width: 2.5; }
.flow .edge.misrouted { stroke: var(--red); stroke-width: 3.5; }
.flow .edge.redirected { stroke: var(--amber); stroke-dasharray: 2 4; }
.flow .edge.blackholed { stroke: var(--grey); stroke-dasharray: 8 4; }
.cause-group { background: #fff; border: 1px solid var(--line); border-left: 6px solid var(--grey); border-radius: 8px; padding: 12px 16px; margin-bottom: 16px; }
.cause-group.misrouted { border-left-color: var(--red); }
.cause-group.redirected { border-left-color: var(--amber); }
.cause-group dl { display: grid; grid-template-columns: 120px 1fr; gap: 6px 12px; margin: 8px 0 12px; }
.cause-group dt { color: var(--muted); }
.cause-group dd { margin: 0; }
.cause-group dd p { margin: 0 0 4px; }
.culprit-object { font-size: 14px; font-weight: 600; }
.command { display: flex; gap: 8px; align-items: flex-start; }
pre.inspect { margin: 0; padding: 6px 10px; background: var(--grey-bg); border-radius: 6px; white-space: pre-wrap; overflow-wrap: anywhere; flex: 1; }
button.copy { font: inherit; font-size: 13px; padding: 4px 10px; }
.badge { display: inline-block; border-radius: 4px; padding: 0 6px; font-size: 12px; font-weight: 600; text-transform: uppercase; margin-right: 6px; }
.badge.misrouted { background: var(--red-bg); color: var(--red); }
.badge.blackholed { background: var(--grey-bg); color: var(--grey); }
.badge.redirected { background: var(--amber-bg); color: var(--amber); }
.controls { display: flex; gap: 16px; align-items: center; margin-bottom: 12px; }
.controls input[type=search] { font: inherit; padding: 4px 8px; min-width: 320px; }
#js-error { background: var(--red-bg); color: var(--red); padding: 8px 12px; border-radius: 6px; }
#truncated { background: var(--amber-bg); padding: 8px 12px; border-radius: 6px; }
@media print {
  /* Paper: black on white, nothing to click, whole groups per page where they fit. */
  :root { --red: #000; --amber: #000; --grey: #000; --red-bg: #fff; --amber-bg: #fff; --grey-bg: #fff; --line: #777; --text: #000; --muted: #333; }
  body { background: #fff; font-size: 11pt; }
  th, td { padding: 3px 4px; font-size: 8pt; }
  th { font-size: 7pt; }
  code, .pod, td.seen { font-size: 8pt; }
  td.verdict { font-size: 7.5pt; }
  .rows .c-verdict { width: 11%; } .rows .c-source { width: 13%; } .rows .c-dialed { width: 16%; }
  .rows .c-cluster { width: 13%; } .rows .c-seen { width: 14%; }
  .cards { gap: 6px; }
  .card { padding: 4px 10px; min-width: 0; }
  .card .number { font-size: 14pt; }
  .card .muted { font-size: 8pt; }
  main { max-width: none; padding: 0; }
  .controls, button, #js-error { display: none !important; }
  .cause-group, .group, .card, tr { break-inside: avoid; page-break-inside: avoid; }
  h2, h3, .group-head { break-after: avoid; page-break-after: avoid; }
  .cause-group, .group, .card { border-left-width: 1px; }
  .badge { border: 1px solid #000; }
  tr.misrouted td.verdict { text-decoration: underline; }
  tr.uncovered td.covered { text-decoration: underline; }
  pre.inspect { border: 1px solid #777; }
  a { color: inherit; text-decoration: none; }
  .scroll { overflow: visible; }
  .flow { max-width: 100%; height: auto; }
}
"#;

/// Progressive enhancement only: the page is complete without it. It
/// records any script error on `<html data-js-error>` (and shows it), adds
/// the text filter and copy buttons, and marks `<html data-ready>` with the
/// number of findings once it has run.
const SCRIPT: &str = r#"
(function () {
  'use strict';
  var root = document.documentElement;
  window.addEventListener('error', function (event) {
    var message = String(event.message || 'script error');
    root.setAttribute('data-js-error', message);
    var banner = document.getElementById('js-error');
    if (banner) { banner.textContent = 'Script error: ' + message; banner.hidden = false; }
  });
  var search = document.getElementById('search');
  var onlyMisrouted = document.getElementById('only-misrouted');
  var shown = document.getElementById('shown');
  var findings = Array.prototype.slice.call(document.querySelectorAll('[data-finding]'));
  var groups = Array.prototype.slice.call(document.querySelectorAll('[data-group]'));
  function apply() {
    var needle = search.value.trim().toLowerCase();
    var visible = 0;
    groups.forEach(function (group) {
      var head = group.querySelector('.group-head');
      // Text of the group (culprit, cause, fix) matches all its rows.
      var headMatch = !needle || (head && head.textContent.toLowerCase().indexOf(needle) >= 0);
      var any = false;
      Array.prototype.forEach.call(group.querySelectorAll('[data-finding]'), function (finding) {
        var match = (headMatch || finding.textContent.toLowerCase().indexOf(needle) >= 0) &&
          (!onlyMisrouted.checked || finding.getAttribute('data-verdict') === 'misrouted');
        finding.hidden = !match;
        if (match) { visible += 1; any = true; }
      });
      group.hidden = !any;
    });
    shown.textContent = visible + ' of ' + findings.length + ' shown';
  }
  search.addEventListener('input', apply);
  onlyMisrouted.addEventListener('change', apply);
  apply();
  Array.prototype.forEach.call(document.querySelectorAll('pre.inspect'), function (block) {
    var button = document.createElement('button');
    button.type = 'button';
    button.className = 'copy';
    button.textContent = 'Copy';
    function select() {
      var range = document.createRange();
      range.selectNodeContents(block);
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      button.textContent = 'Selected: press Ctrl+C';
    }
    button.addEventListener('click', function () {
      // The clipboard API may be missing or refused for a local file: then
      // the command is selected for the user to copy.
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(block.textContent).then(function () {
          button.textContent = 'Copied';
        }, select);
      } else {
        select();
      }
    });
    block.parentNode.appendChild(button);
  });
  root.setAttribute('data-ready', String(findings.length));
})();
"#;

/// Labels in the flow diagrams longer than this many characters (names
/// nobody reads to the end) end in an ellipsis; their `<title>` has them whole.
pub const MAX_LABEL_CHARS: usize = 100;

/// Escapes text for HTML element content and for double- or single-quoted
/// attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

/// Escaped text whose Markdown code spans (a run of backticks up to the
/// next run of the same length, as in CommonMark) become `<code>` elements.
/// Nothing else of Markdown is interpreted; a backtick run without a partner
/// stays literal text. The span's content is escaped like the rest.
pub fn inline_code(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    let mut rest = text;
    while let Some(start) = rest.find('`') {
        let run = backtick_run(&rest[start..]);
        let after = &rest[start + run..];
        match closing_run(after, run) {
            Some(end) => {
                out.push_str(&escape(&rest[..start]));
                let mut code = &after[..end];
                // CommonMark: one space on both sides is padding, so that a
                // span can start or end with a backtick.
                if code.len() >= 2
                    && code.starts_with(' ')
                    && code.ends_with(' ')
                    && !code.trim().is_empty()
                {
                    code = &code[1..code.len() - 1];
                }
                let _ = write!(out, "<code>{}</code>", escape(code));
                rest = &after[end + run..];
            }
            None => {
                out.push_str(&escape(&rest[..start + run]));
                rest = after;
            }
        }
    }
    out.push_str(&escape(rest));
    out
}

/// `value` as one Markdown code span whatever backticks it holds: fenced
/// by a longer run than any inside, padded when it starts or ends with one.
fn code_span(value: &str) -> String {
    let longest = value.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest + 1);
    let pad = if value.starts_with('`') || value.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{value}{pad}{fence}")
}

/// Length of the run of backticks `text` starts with.
fn backtick_run(text: &str) -> usize {
    text.bytes().take_while(|b| *b == b'`').count()
}

/// Start of the first run of exactly `length` backticks in `text`.
fn closing_run(text: &str, length: usize) -> Option<usize> {
    let mut offset = 0;
    while let Some(found) = text[offset..].find('`') {
        let start = offset + found;
        let run = backtick_run(&text[start..]);
        if run == length {
            return Some(start);
        }
        offset = start + run;
    }
    None
}

/// The page for `report`, stamped with `generated_at` (RFC 3339).
pub fn render_html(report: &Report, generated_at: &str) -> String {
    let mut page = String::with_capacity(16_384 + report.rows.len() * 3_072);
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
         img-src 'none'; base-uri 'none'; form-action 'none'",
        sha256_base64(SCRIPT),
        sha256_base64(STYLE)
    );
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"{}\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n\
         <title>dialguard audit report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n\
         <p id=\"js-error\" hidden></p>\n\
         <h1>dialguard audit report</h1>\n<p class=\"muted\">Generated {} from the collector's aggregates.</p>\n",
        escape(&csp),
        escape(generated_at)
    );
    if let Some(note) = super::truncation_note(report) {
        let _ = writeln!(
            page,
            "<p id=\"truncated\" data-shown=\"{}\" data-total=\"{}\">This page holds part of the \
             report's rows, and everything below counts those rows only: {}.</p>",
            report.rows.len(),
            report.total_rows,
            escape(&note)
        );
    }
    let groups = cause_groups(report);
    summary(&mut page, report, &groups);
    findings(&mut page, report, &groups);
    flows(&mut page, report);
    coverage(&mut page, report);
    gaps(&mut page, report);
    let _ = write!(
        page,
        "</main>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    );
    page
}

/// Position of a verdict in severity order (misrouted first); unknown
/// verdicts after the known ones.
fn severity(verdict: &str) -> usize {
    VERDICTS
        .iter()
        .position(|v| *v == verdict)
        .unwrap_or(VERDICTS.len())
}

/// Connections per verdict, in [`VERDICTS`] order.
fn per_verdict<'a>(rows: impl IntoIterator<Item = &'a ReportRow>) -> [u64; 3] {
    let mut counts = [0u64; 3];
    for row in rows {
        if let Some(count) = counts.get_mut(severity(&row.verdict)) {
            *count += row.count;
        }
    }
    counts
}

/// The findings that one change fixes: the same cause and the same object
/// to change (or, when no object is named, the same capturing service).
#[derive(Debug)]
struct CauseGroup<'a> {
    cause: Cause,
    culprit: Option<&'a Culprit>,
    /// Only when `culprit` is `None`: the capturing service they share.
    capturing_service: &'a str,
    /// Row indices in the report and rows, worst first.
    rows: Vec<(usize, &'a ReportRow)>,
}

impl CauseGroup<'_> {
    /// The most severe verdict among the rows.
    fn worst(&self) -> &str {
        self.rows
            .iter()
            .map(|(_, row)| row.verdict.as_str())
            .min_by_key(|verdict| severity(verdict))
            .unwrap_or("")
    }

    fn connections(&self) -> u64 {
        self.rows.iter().map(|(_, row)| row.count).sum()
    }

    /// Order key, smallest first: the worst verdict, then more connections
    /// of that verdict, then more connections in all, then report order.
    fn rank(&self) -> (usize, Reverse<u64>, Reverse<u64>, usize) {
        let worst = severity(self.worst());
        let of_worst = self
            .rows
            .iter()
            .filter(|(_, row)| severity(&row.verdict) == worst)
            .map(|(_, row)| row.count)
            .sum();
        let first = self.rows.iter().map(|(i, _)| *i).min().unwrap_or(0);
        (worst, Reverse(of_worst), Reverse(self.connections()), first)
    }
}

type GroupKey<'a> = (Cause, Option<[&'a str; 4]>, &'a str);

/// The report's rows grouped by root cause, worst group first.
fn cause_groups(report: &Report) -> Vec<CauseGroup<'_>> {
    let mut index: HashMap<GroupKey<'_>, usize> = HashMap::new();
    let mut groups: Vec<CauseGroup<'_>> = Vec::new();
    for (number, row) in report.rows.iter().enumerate() {
        let culprit = row
            .culprit
            .as_ref()
            .map(|c| [&*c.kind, &*c.namespace, &*c.name, &*c.inspect]);
        let capturing = if culprit.is_some() {
            ""
        } else {
            row.capturing_service.as_str()
        };
        let slot = *index
            .entry((row.cause, culprit, capturing))
            .or_insert_with(|| {
                groups.push(CauseGroup {
                    cause: row.cause,
                    culprit: row.culprit.as_ref(),
                    capturing_service: capturing,
                    rows: Vec::new(),
                });
                groups.len() - 1
            });
        groups[slot].rows.push((number, row));
    }
    for group in &mut groups {
        group
            .rows
            .sort_by_key(|(number, row)| (severity(&row.verdict), Reverse(row.count), *number));
    }
    groups.sort_by_cached_key(|group| group.rank());
    groups
}

fn cause_title(cause: Cause) -> &'static str {
    match cause {
        Cause::CatchAll => "A catch-all listener captured connections to pod IPs",
        Cause::PolicyBlock => "Blocked by the outbound traffic policy (REGISTRY_ONLY)",
        Cause::NoEndpoints => "The chosen cluster had no endpoint",
        Cause::OwnPodIp => "The application dialed its own pod IP on a catch-all port",
        Cause::ProxyLoop => "A connection to the sidecar's own outbound port",
        Cause::DnsRedirection => "Sent to the addresses of a DNS name",
        Cause::Unexplained => "Cause not established from the events",
    }
}

/// "Service app/app-ext"; what is unknown is said so.
fn culprit_label(culprit: &Culprit) -> String {
    let kind = if culprit.kind.is_empty() {
        "object"
    } else {
        culprit.kind.as_str()
    };
    match (culprit.namespace.is_empty(), culprit.name.is_empty()) {
        (false, false) => format!("{kind} {}/{}", culprit.namespace, culprit.name),
        (true, false) => format!("{kind} {}", culprit.name),
        (false, true) => format!("{kind} in namespace {} (name not known)", culprit.namespace),
        (true, true) => format!("{kind} (namespace and name not known)"),
    }
}

/// What the group's heading names as the thing to change.
fn group_subject(group: &CauseGroup<'_>) -> String {
    match (group.culprit, group.capturing_service) {
        (Some(culprit), _) => culprit_label(culprit),
        (None, "") => "object not named by the events".to_string(),
        (None, service) => format!("captured by service {service}"),
    }
}

/// The row's cause sentence; rows from a collector that does not fill
/// `causeText` get one from the cluster and capturing service.
fn cause_sentence(row: &ReportRow) -> String {
    if !row.cause_text.is_empty() {
        row.cause_text.clone()
    } else if row.capturing_service.is_empty() {
        format!(
            "The connection was carried by cluster {}, which names no capturing service \
             (no istio.services metadata).",
            code_span(&row.cluster)
        )
    } else {
        format!(
            "Captured by the listener of service {}, whose cluster {} carried the connection.",
            code_span(&row.capturing_service),
            code_span(&row.cluster)
        )
    }
}

/// Distinct values in first-seen order (a group usually has one).
fn distinct(values: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for value in values {
        if !value.is_empty() && !out.contains(&value) {
            out.push(value);
        }
    }
    out
}

fn summary(page: &mut String, report: &Report, groups: &[CauseGroup<'_>]) {
    page.push_str("<section id=\"summary\">\n<h2>Summary</h2>\n<div class=\"cards\">\n");
    for verdict in VERDICTS {
        let rows: Vec<&ReportRow> = report
            .rows
            .iter()
            .filter(|row| row.verdict == verdict)
            .collect();
        let connections: u64 = rows.iter().map(|row| row.count).sum();
        let _ = writeln!(
            page,
            "<div class=\"card {verdict}\" data-verdict-total=\"{verdict}\" data-connections=\"{connections}\">\
             <div class=\"number\">{connections}</div><div>{verdict} connections</div>\
             <div class=\"muted\">{} distinct (source, dialed, reached, cluster)</div></div>",
            rows.len()
        );
    }
    let would_close: u64 = report.rows.iter().map(|row| row.would_close).sum();
    let enforced: u64 = report.rows.iter().map(|row| row.enforced).sum();
    let _ = writeln!(
        page,
        "<div class=\"card\" data-would-close=\"{would_close}\" data-enforced=\"{enforced}\">\
         <div class=\"number\">{would_close}</div><div>connections enforce mode would close</div>\
         <div class=\"muted\">{enforced} of them closed by sidecars in enforce mode</div></div>"
    );
    let expected = report
        .coverage
        .namespaces
        .iter()
        .filter(|ns| ns.expected)
        .count();
    let uncovered = report.coverage.uncovered.len();
    let judged: u64 = report.coverage.namespaces.iter().map(|ns| ns.judged).sum();
    let _ = writeln!(
        page,
        "<div class=\"card{}\" data-uncovered=\"{uncovered}\" data-judged=\"{judged}\"><div class=\"number\">{}</div>\
         <div>expected namespaces covered</div><div class=\"muted\">{judged} connections judged; \
         see <a href=\"#coverage\">coverage</a></div></div>",
        if uncovered > 0 { " warn" } else { "" },
        escape(&format!("{} of {expected}", expected - uncovered))
    );
    let gap_total = report.dropped_events + report.rejected_events;
    let _ = writeln!(
        page,
        "<div class=\"card{}\"><div class=\"number\">{gap_total}</div><div>events missing from the counts</div>\
         <div class=\"muted\">dropped by sidecars or refused; see <a href=\"#gaps\">event gaps</a></div></div>",
        if gap_total > 0 { " warn" } else { "" }
    );
    page.push_str("</div>\n<table>\n");

    let filter = &report.filter;
    let window = match (&filter.since, &filter.until) {
        (None, None) => "everything recorded".to_string(),
        (Some(since), None) => format!("since {since}"),
        (None, Some(until)) => format!("until {until}"),
        (Some(since), Some(until)) => format!("{since} to {until}"),
    };
    let _ = writeln!(
        page,
        "<tr><th>Time window</th><td>{} <span class=\"muted\">(rows whose connections overlap it)</span></td></tr>",
        escape(&window)
    );
    let first = report.rows.iter().map(|row| row.first_seen.as_str()).min();
    let last = report.rows.iter().map(|row| row.last_seen.as_str()).max();
    if let (Some(first), Some(last)) = (first, last) {
        let _ = writeln!(
            page,
            "<tr><th>Connections seen</th><td>{} to {}</td></tr>",
            escape(first),
            escape(last)
        );
    }
    let mut other_filters = Vec::new();
    if let Some(namespace) = &filter.namespace {
        other_filters.push(format!("source namespace {namespace}"));
    }
    if let Some(verdict) = &filter.verdict {
        other_filters.push(format!("verdict {verdict}"));
    }
    if let Some(port) = filter.port {
        other_filters.push(format!("destination port {port}"));
    }
    if !other_filters.is_empty() {
        let _ = writeln!(
            page,
            "<tr><th>Filter</th><td>{}</td></tr>",
            escape(&other_filters.join(", "))
        );
    }
    let _ = write!(
        page,
        "<tr><th>Root causes ({}), worst first</th><td>",
        groups.len()
    );
    if groups.is_empty() {
        page.push_str("none");
    }
    for (number, group) in groups.iter().enumerate() {
        let _ = writeln!(
            page,
            "<div><a href=\"#group-{}\">{}</a>: <code>{}</code> <span class=\"muted\">{} connections</span></div>",
            number + 1,
            escape(cause_title(group.cause)),
            escape(&group_subject(group)),
            group.connections()
        );
    }
    page.push_str("</td></tr>\n");
    let affected = workloads_worst_first(report);
    let _ = write!(
        page,
        "<tr><th>Affected source workloads ({})</th><td>",
        affected.len()
    );
    if affected.is_empty() {
        page.push_str("none");
    }
    for (source, rows) in &affected {
        let [misrouted, blackholed, redirected] = per_verdict(rows.iter().map(|(_, row)| *row));
        let _ = writeln!(
            page,
            "<div data-affected-source=\"{}\"><code>{}</code> <span class=\"muted\">{misrouted} misrouted, \
             {blackholed} blackholed, {redirected} redirected</span></div>",
            escape(source),
            escape(source)
        );
    }
    page.push_str("</td></tr>\n</table>\n</section>\n");
}

type WorkloadRows<'a> = (String, Vec<(usize, &'a ReportRow)>);

/// Rows per source workload; workloads with more misrouted connections
/// first, then blackholed, then redirected, then by name. Rows worst first.
fn workloads_worst_first(report: &Report) -> Vec<WorkloadRows<'_>> {
    let mut by_source: BTreeMap<String, Vec<(usize, &ReportRow)>> = BTreeMap::new();
    for (index, row) in report.rows.iter().enumerate() {
        by_source
            .entry(source_label(row))
            .or_default()
            .push((index, row));
    }
    let mut workloads: Vec<WorkloadRows<'_>> = by_source.into_iter().collect();
    for (_, rows) in &mut workloads {
        rows.sort_by_key(|(index, row)| (severity(&row.verdict), Reverse(row.count), *index));
    }
    // A stable sort: equal workloads keep their name order.
    workloads
        .sort_by_cached_key(|(_, rows)| Reverse(per_verdict(rows.iter().map(|(_, row)| *row))));
    workloads
}

fn findings(page: &mut String, report: &Report, groups: &[CauseGroup<'_>]) {
    page.push_str(
        "<section id=\"findings\">\n<h2>Findings by root cause, worst first</h2>\n\
         <p class=\"muted\">Each group is one thing to change: the cause, the object to change and \
         how to inspect it, the fix, then every connection it explains.</p>\n<div class=\"controls\">\
         <input id=\"search\" type=\"search\" placeholder=\"Filter findings by any text\" aria-label=\"filter findings\">\
         <label><input id=\"only-misrouted\" type=\"checkbox\"> only misrouted</label>\
         <span id=\"shown\" class=\"muted\"></span></div>\n",
    );
    if report.rows.is_empty() {
        page.push_str("<p>No misrouted, blackholed or redirected connections match.</p>\n");
    }
    for (number, group) in groups.iter().enumerate() {
        cause_group(page, number + 1, group);
    }
    page.push_str("</section>\n");
}

fn cause_group(page: &mut String, number: usize, group: &CauseGroup<'_>) {
    let worst = escape(group.worst());
    let rows = || group.rows.iter().map(|(_, row)| *row);
    let [misrouted, blackholed, redirected] = per_verdict(rows());
    let would_close: u64 = rows().map(|row| row.would_close).sum();
    let sources = distinct(rows().map(source_label)).len();
    let (kind, namespace, name, inspect) = match group.culprit {
        Some(c) => (&*c.kind, &*c.namespace, &*c.name, &*c.inspect),
        None => ("", "", "", ""),
    };
    let _ = writeln!(
        page,
        "<section class=\"cause-group {worst}\" id=\"group-{number}\" data-group=\"{number}\" \
         data-cause=\"{}\" data-culprit-kind=\"{}\" data-culprit-namespace=\"{}\" data-culprit-name=\"{}\" \
         data-capturing-service=\"{}\" data-worst=\"{worst}\" data-connections=\"{}\" data-would-close=\"{would_close}\">\n\
         <div class=\"group-head\">\n<h3><span class=\"badge {worst}\">{worst}</span>{}: <span class=\"subject\">{}</span></h3>\n\
         <p class=\"muted\">{} connections ({misrouted} misrouted, {blackholed} blackholed, {redirected} redirected) \
         from {sources} source workload{}; enforce mode would close {would_close}.</p>\n<dl>",
        group.cause.label(),
        escape(kind),
        escape(namespace),
        escape(name),
        escape(group.capturing_service),
        group.connections(),
        escape(cause_title(group.cause)),
        escape(&group_subject(group)),
        group.connections(),
        if sources == 1 { "" } else { "s" },
    );
    page.push_str("<dt>Cause</dt><dd class=\"cause-text\">");
    for sentence in distinct(rows().map(cause_sentence)) {
        let _ = write!(page, "<p>{}</p>", inline_code(&sentence));
    }
    page.push_str("</dd>\n<dt>Change</dt><dd class=\"culprit\">");
    match group.culprit {
        Some(culprit) => {
            let _ = write!(
                page,
                "<code class=\"culprit-object\">{}</code>",
                escape(&culprit_label(culprit))
            );
        }
        None if !group.capturing_service.is_empty() => {
            let _ = write!(
                page,
                "The Service or ServiceEntry behind <code>{}</code> (the events do not name it; \
                 <code>dialguard analyze</code> on a sidecar's config dump does).",
                escape(group.capturing_service)
            );
        }
        None => page.push_str(
            "Not named by the events: <code>dialguard analyze</code> on the source sidecar's \
             config dump shows which listener took the port.",
        ),
    }
    page.push_str("</dd>\n");
    if !inspect.is_empty() {
        let _ = writeln!(
            page,
            "<dt>Inspect</dt><dd><div class=\"command\"><pre class=\"inspect\"><code>{}</code></pre></div></dd>",
            escape(inspect)
        );
    }
    let fixes = distinct(rows().map(|row| row.fix.clone()));
    if !fixes.is_empty() {
        page.push_str("<dt>Fix</dt><dd class=\"fix\">");
        for fix in fixes {
            let _ = write!(page, "<p>{}</p>", inline_code(&fix));
        }
        page.push_str("</dd>\n");
    }
    page.push_str(
        "</dl>\n</div>\n<table class=\"rows\">\n<colgroup><col class=\"c-verdict\"><col class=\"c-source\">\
         <col class=\"c-dialed\"><col class=\"c-reached\"><col class=\"c-cluster\"><col class=\"c-count\">\
         <col class=\"c-close\"><col class=\"c-seen\"></colgroup>\n<tr><th>verdict</th><th>source workload (pods)</th>\
         <th>dialed (meant to reach)</th><th>reached (upstream workload)</th><th>via cluster</th>\
         <th>count</th><th>would close</th><th>first / last seen</th></tr>\n",
    );
    for (index, row) in &group.rows {
        finding_row(page, *index + 1, row);
    }
    page.push_str("</table>\n</section>\n");
}

fn finding_row(page: &mut String, number: usize, row: &ReportRow) {
    let verdict = escape(&row.verdict);
    let mut pods = String::new();
    for pod in &row.source_pods {
        let _ = write!(pods, "<span class=\"pod\">{}</span>", escape(pod));
    }
    if pods.is_empty() {
        pods.push_str("pods not recorded");
    }
    let closed = if row.enforced > 0 {
        format!("<br><span class=\"muted\">{} closed</span>", row.enforced)
    } else {
        String::new()
    };
    let _ = writeln!(
        page,
        "<tr class=\"{verdict}\" id=\"finding-{number}\" data-finding=\"{number}\" \
         data-source-namespace=\"{}\" data-source-workload=\"{}\" data-dialed=\"{}\" data-reached=\"{}\" \
         data-cluster=\"{}\" data-verdict=\"{verdict}\" data-count=\"{}\" data-would-close=\"{}\" \
         data-enforced=\"{}\" data-first-seen=\"{}\" data-last-seen=\"{}\" title=\"{}\">\
         <td class=\"verdict\">{verdict}</td>\
         <td><code>{}</code><div class=\"pods\">{pods}</div></td>\
         <td><code>{}</code><br><span class=\"muted\">{}</span></td>\
         <td><code>{}</code><br><span class=\"muted\">{}</span></td>\
         <td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}{closed}</td>\
         <td class=\"seen\">{}<br>{}</td></tr>",
        escape(&row.source_namespace),
        escape(&row.source_workload),
        escape(&row.original_destination),
        escape(row.upstream_host.as_deref().unwrap_or("")),
        escape(&row.cluster),
        row.count,
        row.would_close,
        row.enforced,
        escape(&row.first_seen),
        escape(&row.last_seen),
        escape(&row.summary),
        escape(&source_label(row)),
        escape(&row.original_destination),
        escape(&intended_label(row)),
        escape(row.upstream_host.as_deref().unwrap_or("(no host)")),
        escape(&upstream_label(row)),
        escape(&row.cluster),
        row.count,
        row.would_close,
        timestamp(&row.first_seen),
        timestamp(&row.last_seen),
    );
}

/// An escaped RFC 3339 time that may wrap between date and time.
fn timestamp(time: &str) -> String {
    match time.split_once('T') {
        Some((date, clock)) => format!("{}T<wbr>{}", escape(date), escape(clock)),
        None => escape(time),
    }
}

/// Per source workload, worst first: a diagram from what was dialed to
/// where it landed, and the same as a table.
fn flows(page: &mut String, report: &Report) {
    page.push_str(
        "<section id=\"flows\">\n<h2>Who dialed what, and where it landed</h2>\n\
         <p class=\"muted\">Per source workload, worst first. Left: the address the application dialed \
         (and the pod that owns it). Right: the host Envoy connected to. Solid red: misrouted; dotted amber: \
         redirected; dashed grey: blackholed (no host).</p>\n",
    );
    if report.rows.is_empty() {
        page.push_str("<p>No reported connections.</p>\n");
    }
    for (source, rows) in workloads_worst_first(report) {
        let _ = writeln!(
            page,
            "<div class=\"group\" data-flow-source=\"{}\">\n<h3>{}</h3>",
            escape(&source),
            escape(&source)
        );
        flow_diagram(page, &rows);
        page.push_str(
            "<table class=\"flows\">\n<colgroup><col class=\"c-verdict\"><col class=\"c-dialed\"><col class=\"c-arrow\">\
             <col class=\"c-reached\"><col class=\"c-cluster\"><col class=\"c-count\"></colgroup>\n\
             <tr><th>verdict</th><th>dialed (meant to reach)</th><th></th>\
             <th>reached (upstream workload)</th><th>via cluster</th><th>connections</th></tr>\n",
        );
        for (index, row) in &rows {
            let _ = writeln!(
                page,
                "<tr class=\"{verdict}\"><td class=\"verdict\">{verdict}</td><td><code>{}</code><br>{}</td>\
                 <td>&rarr;</td><td><code>{}</code><br>{}</td><td><code>{}</code></td>\
                 <td><a href=\"#finding-{}\">{}</a></td></tr>",
                escape(&row.original_destination),
                escape(&intended_label(row)),
                escape(row.upstream_host.as_deref().unwrap_or("(no host)")),
                escape(&upstream_label(row)),
                escape(&row.cluster),
                index + 1,
                row.count,
                verdict = escape(&row.verdict),
            );
        }
        page.push_str("</table>\n</div>\n");
    }
    page.push_str("</section>\n");
}

/// Width of a line of the diagram's 12px monospace text, in pixels, with a
/// margin: DejaVu Sans Mono's advance is 7.2px; characters outside ASCII
/// (CJK, emoji) can take two cells.
fn text_width(line: &str) -> usize {
    let cells: usize = line.chars().map(|c| if c.is_ascii() { 1 } else { 2 }).sum();
    cells * 15 / 2
}

/// A two-column SVG: dialed addresses on the left, reached hosts on the
/// right, one line per row (colour and dash pattern by verdict, so that
/// black and white prints tell them apart). Each box is as wide as its
/// column's longest line, so nothing is cut short of [`MAX_LABEL_CHARS`].
fn flow_diagram(page: &mut String, rows: &[(usize, &ReportRow)]) {
    const GAP: usize = 200;
    const PAD: usize = 10;
    const MIN_NODE: usize = 160;
    const LINE: usize = 16;
    const ROW_HEIGHT: usize = 3 * LINE + 20;
    let mut dialed: Vec<Vec<String>> = Vec::new();
    let mut reached: Vec<Vec<String>> = Vec::new();
    let mut edges = Vec::new();
    for (_, row) in rows {
        let mut left = vec![row.original_destination.clone()];
        match &row.intended {
            Some(pod) => {
                left.push(format!("pod {}/{}", pod.namespace, pod.pod));
                if !pod.workload.is_empty() {
                    left.push(format!("workload {}", pod.workload));
                }
            }
            None => left.push("no sidecar announced this IP".to_string()),
        }
        let right = match &row.upstream_host {
            Some(host) => vec![host.clone(), upstream_label(row)],
            None => vec!["(no host)".to_string(), "blackholed".to_string()],
        };
        let left_index = position_or_push(&mut dialed, left);
        let right_index = position_or_push(&mut reached, right);
        edges.push((left_index, right_index, *row));
    }
    let column_width = |labels: &[Vec<String>]| {
        labels
            .iter()
            .flatten()
            .map(|line| text_width(&truncate(line, MAX_LABEL_CHARS)) + 2 * PAD)
            .max()
            .unwrap_or(0)
            .max(MIN_NODE)
    };
    let (left_width, right_width) = (column_width(&dialed), column_width(&reached));
    let width = left_width + GAP + right_width;
    let height = dialed.len().max(reached.len()) * ROW_HEIGHT + 8;
    let _ = writeln!(
        page,
        "<div class=\"scroll\"><svg class=\"flow\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         role=\"img\" aria-label=\"connections from this workload\">"
    );
    let center = |index: usize| index * ROW_HEIGHT + 4 + ROW_HEIGHT / 2;
    for (left, right, row) in &edges {
        let (y1, y2) = (center(*left), center(*right));
        let (x1, x2) = (left_width, left_width + GAP);
        let middle = (x1 + x2) / 2;
        let _ = writeln!(
            page,
            "<path class=\"edge {}\" d=\"M{x1},{y1} C{middle},{y1} {middle},{y2} {x2},{y2}\">\
             <title>{} {} connections via {}</title></path>",
            escape(&row.verdict),
            row.count,
            escape(&row.verdict),
            escape(&row.cluster)
        );
    }
    for (x, node_width, labels) in [
        (0, left_width, &dialed),
        (left_width + GAP, right_width, &reached),
    ] {
        for (index, lines) in labels.iter().enumerate() {
            let y = index * ROW_HEIGHT + 8;
            let _ = write!(
                page,
                "<g class=\"node-box\"><title>{}</title><rect class=\"node\" x=\"{x}\" y=\"{y}\" width=\"{node_width}\" \
                 height=\"{}\" rx=\"6\"></rect>",
                escape(&lines.join("\n")),
                ROW_HEIGHT - 8,
            );
            for (line_number, line) in lines.iter().enumerate() {
                let _ = write!(
                    page,
                    "<text{} x=\"{}\" y=\"{}\">{}</text>",
                    if line_number == 0 {
                        ""
                    } else {
                        " class=\"owner\""
                    },
                    x + PAD,
                    y + 6 + LINE * (line_number + 1),
                    escape(&truncate(line, MAX_LABEL_CHARS))
                );
            }
            page.push_str("</g>\n");
        }
    }
    page.push_str("</svg></div>\n");
}

/// Which namespaces have reporting sidecars, what they judged, and which
/// sidecars went stale: rows are only as complete as this.
fn coverage(page: &mut String, report: &Report) {
    let coverage = &report.coverage;
    page.push_str(
        "<section id=\"coverage\">\n<h2>Coverage</h2>\n<p class=\"muted\">Pods whose dialguard \
         sidecar reports (heard within three heartbeat intervals) or went stale, per namespace. \
         Judged connections are the sidecars' own counts of every connection they judged, \
         legitimate ones included: no rows for a covered namespace means no misroutes; no rows \
         for an uncovered one means nothing was watched.</p>\n",
    );
    if coverage.namespaces.is_empty() {
        page.push_str("<p>No sidecar has reported and no namespace is expected.</p>\n");
    } else {
        page.push_str(
            "<table class=\"coverage\">\n<tr><th>namespace</th><th>expected</th><th>covered</th>\
             <th>reporting sidecars</th><th>stale sidecars</th><th>judged connections</th></tr>\n",
        );
        for ns in &coverage.namespaces {
            let uncovered = ns.expected && !ns.covered;
            let _ = writeln!(
                page,
                "<tr data-namespace=\"{name}\" data-covered=\"{covered}\" data-expected=\"{expected}\" \
                 data-judged=\"{judged}\"{class}><td><code>{name}</code></td><td>{expected_text}</td>\
                 <td class=\"covered\">{covered_text}</td><td class=\"num\">{sidecars}</td>\
                 <td class=\"num\">{stale}</td><td class=\"num\">{judged}</td></tr>",
                name = escape(&ns.namespace),
                covered = ns.covered,
                expected = ns.expected,
                judged = ns.judged,
                class = if uncovered {
                    " class=\"uncovered\""
                } else {
                    ""
                },
                expected_text = if ns.expected { "yes" } else { "no" },
                covered_text = if ns.covered {
                    "yes"
                } else if ns.expected {
                    "NO: nothing watched"
                } else {
                    "no"
                },
                sidecars = ns.sidecars,
                stale = ns.stale,
            );
        }
        page.push_str("</table>\n");
    }
    let stale: Vec<_> = coverage.sidecars.iter().filter(|s| s.stale).collect();
    if !stale.is_empty() {
        let _ = writeln!(
            page,
            "<h3>Stale sidecars ({})</h3>\n<ul class=\"stale\">",
            stale.len()
        );
        for sidecar in stale {
            let _ = writeln!(
                page,
                "<li data-stale-pod=\"{ns}/{pod}\"><code>{ns}/{pod}</code> <span class=\"muted\">last seen {}, \
                 filter {}</span></li>",
                escape(&sidecar.last_seen),
                escape(&sidecar.filter_version),
                ns = escape(&sidecar.namespace),
                pod = escape(&sidecar.pod),
            );
        }
        page.push_str("</ul>\n");
    }
    page.push_str("</section>\n");
}

fn gaps(page: &mut String, report: &Report) {
    let _ = writeln!(
        page,
        "<section id=\"gaps\">\n<h2>Event gaps</h2>\n<p class=\"muted\">Totals over the whole database; \
         they are not narrowed by the report's filter.</p>\n<table>\n\
         <tr><th>dropped by sidecars</th><td data-gap=\"droppedEvents\">{}</td><td>Events sidecars dropped \
         before sending (buffer full): the counts above miss at least this many connections.</td></tr>\n\
         <tr><th>refused by the collector</th><td data-gap=\"rejectedEvents\">{}</td><td>Events with an \
         unparseable address or unknown verdict: not in the counts; the collector's log names each.</td></tr>\n\
         <tr><th>raw records sampled out</th><td data-gap=\"sampledOutEvents\">{}</td><td>Counted above, but \
         their raw records were not kept while the collector was behind.</td></tr>\n</table>\n</section>",
        report.dropped_events, report.rejected_events, report.sampled_out_events
    );
}

fn source_label(row: &ReportRow) -> String {
    format!("{}/{}", row.source_namespace, row.source_workload)
}

fn intended_label(row: &ReportRow) -> String {
    match &row.intended {
        Some(pod) if pod.workload.is_empty() => format!("pod {}/{}", pod.namespace, pod.pod),
        Some(pod) => format!(
            "pod {}/{} (workload {})",
            pod.namespace, pod.pod, pod.workload
        ),
        None => "no sidecar announced this IP".to_string(),
    }
}

fn upstream_label(row: &ReportRow) -> String {
    match (&row.upstream_host, row.upstream_workload.is_empty()) {
        (None, _) => "no upstream host (blackholed)".to_string(),
        (Some(_), true) => "workload unknown".to_string(),
        (Some(_), false) => format!("workload {}", workload_name(&row.upstream_workload)),
    }
}

fn position_or_push<T: PartialEq>(labels: &mut Vec<T>, label: T) -> usize {
    match labels.iter().position(|existing| *existing == label) {
        Some(index) => index,
        None => {
            labels.push(label);
            labels.len() - 1
        }
    }
}

/// At most `max` characters (not bytes: labels are arbitrary UTF-8).
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// The CSP source hash of an inline block: base64 of its SHA-256.
fn sha256_base64(text: &str) -> String {
    base64(&Sha256::digest(text.as_bytes()))
}

/// Standard base64 with padding (RFC 4648), for the CSP hashes.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{AppliedFilter, Intended};

    #[test]
    fn escape_covers_text_and_both_attribute_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x" + 'y') && 1</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; + &#39;y&#39;) &amp;&amp; 1&lt;/script&gt;"
        );
        assert_eq!(escape("plain ünïcode ✓"), "plain ünïcode ✓");
        assert_eq!(escape("&amp;"), "&amp;amp;");
        assert_eq!(escape(""), "");
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn code_spans_become_code_and_everything_is_escaped() {
        for (markdown, html) in [
            ("plain", "plain"),
            ("use `exportTo` here", "use <code>exportTo</code> here"),
            ("`a` and `b`", "<code>a</code> and <code>b</code>"),
            (
                "`<img src=x>` & <b>",
                "<code>&lt;img src=x&gt;</code> &amp; &lt;b&gt;",
            ),
            // A longer run may hold a backtick; one space of padding goes.
            ("run `` a`b `` now", "run <code>a`b</code> now"),
            ("`` `x` ``", "<code>`x`</code>"),
            // Unpaired runs stay text.
            ("a ` b", "a ` b"),
            ("``x` y", "``x` y"),
            ("`a` `", "<code>a</code> `"),
            ("``", "``"),
            ("`é ü`", "<code>é ü</code>"),
        ] {
            assert_eq!(inline_code(markdown), html, "{markdown:?}");
        }
    }

    /// A row of `verdict` and `count` with `cause`, `culprit` named by
    /// "kind/namespace/name" (or none) and source workload `source`.
    fn row(
        source: &str,
        verdict: &str,
        count: u64,
        cause: crate::finding::Cause,
        culprit: Option<&str>,
    ) -> ReportRow {
        ReportRow {
            source_workload: source.into(),
            source_namespace: "ns".into(),
            original_destination: format!("10.0.1.{count}:5701"),
            upstream_host: (verdict != "blackholed").then(|| "10.0.9.9:5701".into()),
            cluster: "outbound|5701||app-ext.app.svc.cluster.local".into(),
            verdict: verdict.into(),
            count,
            first_seen: "2026-11-26T07:00:21.502Z".into(),
            last_seen: "2026-11-26T07:00:22.010Z".into(),
            intended: None,
            capturing_service: String::new(),
            upstream_workload: String::new(),
            summary: String::new(),
            fix: "Remove port 5701 from `app-ext`.".into(),
            cause,
            cause_text: String::new(),
            culprit: culprit.map(|path| {
                let mut parts = path.split('/');
                let mut next = || parts.next().unwrap_or_default().to_string();
                let (kind, namespace, name) = (next(), next(), next());
                crate::finding::Culprit {
                    inspect: format!("kubectl -n {namespace} get {kind} {name} -o yaml"),
                    kind,
                    namespace,
                    name,
                }
            }),
            would_close: count,
            enforced: 0,
            source_pods: vec![format!("{source}-0")],
        }
    }

    fn report(rows: Vec<ReportRow>) -> Report {
        Report {
            total_rows: rows.len() as u64,
            truncated: false,
            next_cursor: None,
            rows,
            dropped_events: 0,
            rejected_events: 0,
            sampled_out_events: 0,
            filter: AppliedFilter::default(),
            coverage: Default::default(),
        }
    }

    #[test]
    fn groups_share_cause_and_culprit_and_come_worst_first() {
        use crate::finding::Cause::*;
        let report = report(vec![
            row(
                "a",
                "redirected",
                900,
                DnsRedirection,
                Some("ServiceEntry//"),
            ),
            row(
                "b",
                "blackholed",
                50,
                PolicyBlock,
                Some("Sidecar/ns/default"),
            ),
            row("c", "misrouted", 2, CatchAll, Some("Service/app/app-ext")),
            row("d", "misrouted", 3, CatchAll, Some("Service/app/app-ext")),
            row(
                "d",
                "blackholed",
                400,
                OwnPodIp,
                Some("Service/app/app-ext"),
            ),
            row("e", "misrouted", 7, CatchAll, Some("Service/app/other")),
            row(
                "e",
                "blackholed",
                60,
                PolicyBlock,
                Some("Sidecar/ns/default"),
            ),
            row("f", "blackholed", 1, Unexplained, None),
        ]);
        let groups = cause_groups(&report);
        let summary: Vec<(&str, Vec<usize>)> = groups
            .iter()
            .map(|g| (g.worst(), g.rows.iter().map(|(i, _)| *i).collect()))
            .collect();
        assert_eq!(
            summary,
            [
                ("misrouted", vec![5]),     // other: 7 misrouted
                ("misrouted", vec![3, 2]),  // app-ext catch-all: 5, rows by count
                ("blackholed", vec![4]),    // own pod IP, same Service: another cause
                ("blackholed", vec![6, 1]), // one Sidecar, two workloads
                ("blackholed", vec![7]),
                ("redirected", vec![0]),
            ]
        );
        let page = render_html(&report, "2026-12-01T00:00:00.000Z");
        let order: Vec<usize> = page
            .match_indices("data-finding=\"")
            .map(|(at, m)| {
                let rest = &page[at + m.len()..];
                rest[..rest.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        // Finding numbers are the JSON row numbers, in group order.
        assert_eq!(order, [6, 4, 3, 5, 7, 2, 8, 1]);
        assert!(page.contains("<code class=\"culprit-object\">Service app/app-ext</code>"));
        assert!(page.contains("ServiceEntry (namespace and name not known)"));
        assert!(page.contains(
            "<pre class=\"inspect\"><code>kubectl -n app get Service app-ext -o yaml</code></pre>"
        ));
        assert!(page.contains("<p>Remove port 5701 from <code>app-ext</code>.</p>"));
        let would_close: u64 = report.rows.iter().map(|r| r.would_close).sum();
        assert!(page.contains(&format!(
            "<div class=\"number\">{would_close}</div><div>connections enforce mode would close"
        )));
    }

    #[test]
    fn workloads_come_worst_first() {
        use crate::finding::Cause::*;
        let report = report(vec![
            row("a", "redirected", 900, DnsRedirection, None),
            row("b", "blackholed", 50, PolicyBlock, None),
            row("c", "misrouted", 2, CatchAll, None),
            row("z", "misrouted", 9, CatchAll, None),
            row("c", "blackholed", 70, PolicyBlock, None),
        ]);
        let order: Vec<String> = workloads_worst_first(&report)
            .into_iter()
            .map(|(source, _)| source)
            .collect();
        assert_eq!(order, ["ns/z", "ns/c", "ns/b", "ns/a"]);
    }

    #[test]
    fn diagram_boxes_fit_their_longest_line() {
        use crate::finding::Cause::*;
        let mut long = row("a", "misrouted", 1, CatchAll, None);
        let pod = "manager-hazelcast-member-statefulset-7948c5f9d-sh7rx";
        long.intended = Some(Intended {
            pod: pod.into(),
            namespace: "manager".into(),
            workload: "manager".into(),
            last_seen: String::new(),
        });
        let mut absurd = row("a", "misrouted", 2, CatchAll, None);
        absurd.upstream_workload = format!("{};app;x;y;z", "w".repeat(300));
        let page = render_html(&report(vec![long, absurd]), "now");
        let line = format!("pod manager/{pod}");
        assert!(line.chars().count() > 44, "longer than the old cut");
        assert!(page.contains(&format!(">{line}</text>")));
        // The left boxes are as wide as that line and the absurd label is cut,
        // whole in its tooltip.
        let left = text_width(&line) + 20;
        assert!(page.contains(&format!("x=\"0\" y=\"8\" width=\"{left}\"")));
        let cut = format!("workload app/{}…", "w".repeat(MAX_LABEL_CHARS - 14));
        assert!(page.contains(&format!(">{cut}</text>")), "{page}");
        assert!(page.contains(&format!("workload app/{}</title>", "w".repeat(300))));
    }

    #[test]
    fn any_value_makes_one_code_span() {
        for value in ["plain", "a`b", "``x", "y`", "a ``` b", "<b>&"] {
            assert_eq!(
                inline_code(&format!("x {} y", code_span(value))),
                format!("x <code>{}</code> y", escape(value)),
                "{value:?}"
            );
        }
    }

    #[test]
    fn truncate_counts_characters() {
        assert_eq!(truncate("ééééé", 5), "ééééé");
        assert_eq!(truncate("éééééé", 5), "éééé…");
    }

    fn evil_text() -> &'static str {
        "<img src=x onerror=alert(1)>\"'&"
    }

    fn hostile_row() -> ReportRow {
        let evil = evil_text();
        ReportRow {
            source_workload: evil.into(),
            source_namespace: "</script><script>alert(2)</script>".into(),
            original_destination: "10.0.1.7:5701".into(),
            upstream_host: Some("10.0.1.9:5701".into()),
            cluster: format!("outbound|5701||{evil}"),
            verdict: "misrouted".into(),
            count: 3,
            first_seen: "2026-11-26T07:00:21.502Z".into(),
            last_seen: "2026-11-26T07:00:22.010Z".into(),
            intended: Some(Intended {
                pod: evil.into(),
                namespace: "manager".into(),
                workload: evil.into(),
                last_seen: "2026-11-26T07:00:23.117Z".into(),
            }),
            capturing_service: evil.into(),
            upstream_workload: format!("{evil};app;x;y;z"),
            summary: evil.into(),
            fix: format!("run `{evil}` then {evil}"),
            cause: crate::finding::Cause::CatchAll,
            cause_text: evil.into(),
            culprit: Some(crate::finding::Culprit {
                kind: "Service".into(),
                namespace: "app".into(),
                name: evil.into(),
                inspect: format!("kubectl -n app get service {evil}"),
            }),
            would_close: 3,
            enforced: 0,
            source_pods: vec![evil.into()],
        }
    }

    #[test]
    fn untrusted_values_never_become_markup() {
        let report = Report {
            rows: vec![hostile_row()],
            // A collector's cursor is base64; one from elsewhere is text.
            total_rows: 9,
            truncated: true,
            next_cursor: Some(evil_text().into()),
            dropped_events: 1,
            rejected_events: 2,
            sampled_out_events: 3,
            filter: AppliedFilter {
                namespace: Some("<b>".into()),
                ..Default::default()
            },
            coverage: crate::inventory::Coverage {
                sidecars: vec![crate::inventory::SidecarCoverage {
                    pod: evil_text().into(),
                    namespace: evil_text().into(),
                    filter_version: evil_text().into(),
                    last_seen: evil_text().into(),
                    stale: true,
                    ..Default::default()
                }],
                namespaces: vec![crate::inventory::NamespaceCoverage {
                    namespace: evil_text().into(),
                    expected: true,
                    ..Default::default()
                }],
                uncovered: vec![evil_text().into()],
            },
        };
        let page = render_html(&report, "<now>");
        for needle in ["<img", "<script>alert", "</script><script>", "<b>", "<now>"] {
            assert!(!page.contains(needle), "{needle:?} reached the page");
        }
        assert!(page.contains(&format!("<code>{}</code>", escape(evil_text()))));
        assert!(
            page.contains("<p id=\"truncated\" data-shown=\"1\" data-total=\"9\">"),
            "no note that rows were left out"
        );
        // Our own script is the only one.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains(
            "data-source-workload=\"&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;\""
        ));
    }

    #[test]
    fn the_policy_hashes_the_inline_blocks_exactly() {
        let page = render_html(
            &Report {
                rows: vec![],
                total_rows: 0,
                truncated: false,
                next_cursor: None,
                dropped_events: 0,
                rejected_events: 0,
                sampled_out_events: 0,
                filter: AppliedFilter::default(),
                coverage: Default::default(),
            },
            "2026-12-01T00:00:00.000Z",
        );
        assert!(page.contains(&format!("<script>{SCRIPT}</script>")));
        assert!(page.contains(&format!("<style>{STYLE}</style>")));
        // Inside the (escaped) content attribute of the policy.
        assert!(page.contains(&format!("&#39;sha256-{}&#39;", sha256_base64(SCRIPT))));
        assert!(page.contains(&format!("&#39;sha256-{}&#39;", sha256_base64(STYLE))));
        assert!(!page.contains("http://") && !page.contains("https://"));
    }
}
