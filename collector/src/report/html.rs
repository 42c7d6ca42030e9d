//! `report --format html`: one self-contained page (inline CSS and JS, no
//! fetches of any kind) for the people who fix the mesh: a summary, who
//! dialed what and where it landed, each finding with its cause and fix, and
//! the gaps in the data.
//!
//! Everything in a report comes from sidecars and is untrusted, so every
//! value goes through [`escape`]; on top of that the page's Content Security
//! Policy allows only its own script and style (by hash) and no loads at all,
//! so even a mistake here could not make the page fetch or run anything.
//! Each finding carries `data-*` attributes (`data-finding` and the row's
//! key and count) that tests compare with the JSON report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use super::{Report, ReportRow, workload_name};

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
th { font-size: 13px; color: var(--muted); font-weight: 600; }
tr.misrouted td { background: var(--red-bg); }
tr.misrouted td.verdict { color: var(--red); font-weight: 600; }
tr.redirected td.verdict { color: var(--amber); font-weight: 600; }
tr.blackholed td.verdict { color: var(--grey); font-weight: 600; }
.group { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin-bottom: 16px; }
.flow { width: 100%; height: auto; margin: 4px 0 12px; }
.flow text { font: 12px ui-monospace, monospace; fill: var(--text); }
.flow .node { fill: #fff; stroke: var(--line); }
.flow .edge { fill: none; stroke-width: 2.5; }
.flow .edge.misrouted { stroke: var(--red); }
.flow .edge.redirected { stroke: var(--amber); }
.flow .edge.blackholed { stroke: var(--grey); stroke-dasharray: 5 4; }
.finding { background: #fff; border: 1px solid var(--line); border-left: 6px solid var(--grey); border-radius: 8px; padding: 12px 16px; margin-bottom: 12px; }
.finding.misrouted { border-left-color: var(--red); }
.finding.redirected { border-left-color: var(--amber); }
.finding dl { display: grid; grid-template-columns: 120px 1fr; gap: 4px 12px; margin: 8px 0 0; }
.finding dt { color: var(--muted); }
.finding dd { margin: 0; }
.badge { display: inline-block; border-radius: 4px; padding: 0 6px; font-size: 12px; font-weight: 600; text-transform: uppercase; margin-right: 6px; }
.badge.misrouted { background: var(--red-bg); color: var(--red); }
.badge.blackholed { background: var(--grey-bg); color: var(--grey); }
.badge.redirected { background: var(--amber-bg); color: var(--amber); }
.controls { display: flex; gap: 16px; align-items: center; margin-bottom: 12px; }
.controls input[type=search] { font: inherit; padding: 4px 8px; min-width: 320px; }
#js-error { background: var(--red-bg); color: var(--red); padding: 8px 12px; border-radius: 6px; }
"#;

/// Progressive enhancement only: the page is complete without it. It
/// records any script error on `<html data-js-error>` (and shows it), and
/// marks `<html data-ready>` with the number of findings once it has run.
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
  function apply() {
    var needle = search.value.trim().toLowerCase();
    var visible = 0;
    findings.forEach(function (finding) {
      var match = (!needle || finding.textContent.toLowerCase().indexOf(needle) >= 0) &&
        (!onlyMisrouted.checked || finding.getAttribute('data-verdict') === 'misrouted');
      finding.hidden = !match;
      if (match) { visible += 1; }
    });
    shown.textContent = visible + ' of ' + findings.length + ' shown';
  }
  search.addEventListener('input', apply);
  onlyMisrouted.addEventListener('change', apply);
  apply();
  root.setAttribute('data-ready', String(findings.length));
})();
"#;

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

/// The page for `report`, stamped with `generated_at` (RFC 3339).
pub fn render_html(report: &Report, generated_at: &str) -> String {
    let mut page = String::with_capacity(16_384 + report.rows.len() * 2_048);
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
    summary(&mut page, report);
    flows(&mut page, report);
    findings(&mut page, report);
    gaps(&mut page, report);
    let _ = write!(
        page,
        "</main>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    );
    page
}

fn summary(page: &mut String, report: &Report) {
    page.push_str("<section id=\"summary\">\n<h2>Summary</h2>\n<div class=\"cards\">\n");
    for verdict in super::VERDICTS {
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
    // Source workloads with their connections per verdict, most misrouted first.
    let mut affected: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    for row in &report.rows {
        let counts = affected.entry(source_label(row)).or_default();
        if let Some(index) = super::VERDICTS.iter().position(|v| *v == row.verdict) {
            counts[index] += row.count;
        }
    }
    let mut affected: Vec<_> = affected.into_iter().collect();
    affected.sort_by(|a, b| b.1[0].cmp(&a.1[0]).then(a.0.cmp(&b.0)));
    let _ = write!(
        page,
        "<tr><th>Affected source workloads ({})</th><td>",
        affected.len()
    );
    if affected.is_empty() {
        page.push_str("none");
    }
    for (source, [misrouted, blackholed, redirected]) in &affected {
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

/// Per source workload: a diagram from what was dialed to where it landed,
/// and the same as a table.
fn flows(page: &mut String, report: &Report) {
    page.push_str(
        "<section id=\"flows\">\n<h2>Who dialed what, and where it landed</h2>\n\
         <p class=\"muted\">Left: the address the application dialed (and the pod that owns it). \
         Right: the host Envoy connected to. Red: misrouted; amber: redirected; dashed grey: blackholed (no host).</p>\n",
    );
    if report.rows.is_empty() {
        page.push_str("<p>No reported connections.</p>\n");
    }
    let mut groups: BTreeMap<String, Vec<(usize, &ReportRow)>> = BTreeMap::new();
    for (index, row) in report.rows.iter().enumerate() {
        groups
            .entry(source_label(row))
            .or_default()
            .push((index, row));
    }
    for (source, rows) in &groups {
        let _ = writeln!(
            page,
            "<div class=\"group\" data-flow-source=\"{}\">\n<h3>{}</h3>",
            escape(source),
            escape(source)
        );
        flow_diagram(page, rows);
        page.push_str(
            "<table>\n<tr><th>verdict</th><th>dialed (meant to reach)</th><th></th>\
             <th>reached (upstream workload)</th><th>via cluster</th><th>connections</th></tr>\n",
        );
        for (index, row) in rows {
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

/// A two-column SVG: dialed addresses on the left, reached hosts on the
/// right, one line per row coloured by verdict.
fn flow_diagram(page: &mut String, rows: &[(usize, &ReportRow)]) {
    const WIDTH: usize = 960;
    const NODE_WIDTH: usize = 340;
    const ROW_HEIGHT: usize = 44;
    let mut dialed: Vec<String> = Vec::new();
    let mut reached: Vec<String> = Vec::new();
    let mut edges = Vec::new();
    for (_, row) in rows {
        let left = format!("{}  {}", row.original_destination, intended_label(row));
        let right = match &row.upstream_host {
            Some(host) => format!("{host}  {}", upstream_label(row)),
            None => "(no host)".to_string(),
        };
        let left_index = position_or_push(&mut dialed, left);
        let right_index = position_or_push(&mut reached, right);
        edges.push((left_index, right_index, *row));
    }
    let height = dialed.len().max(reached.len()) * ROW_HEIGHT + 8;
    let _ = writeln!(
        page,
        "<svg class=\"flow\" viewBox=\"0 0 {WIDTH} {height}\" role=\"img\" aria-label=\"connections from this workload\">"
    );
    let center = |index: usize| index * ROW_HEIGHT + 4 + ROW_HEIGHT / 2;
    for (left, right, row) in &edges {
        let (y1, y2) = (center(*left), center(*right));
        let (x1, x2) = (NODE_WIDTH, WIDTH - NODE_WIDTH);
        let middle = (x1 + x2) / 2;
        let _ = writeln!(
            page,
            "<path class=\"edge {}\" d=\"M{x1},{y1} C{middle},{y1} {middle},{y2} {x2},{y2}\">\
             <title>{} connections via {}</title></path>",
            escape(&row.verdict),
            row.count,
            escape(&row.cluster)
        );
    }
    for (column, labels) in [(0, &dialed), (WIDTH - NODE_WIDTH, &reached)] {
        for (index, label) in labels.iter().enumerate() {
            let y = index * ROW_HEIGHT + 8;
            let _ = writeln!(
                page,
                "<g><title>{}</title><rect class=\"node\" x=\"{column}\" y=\"{y}\" width=\"{NODE_WIDTH}\" \
                 height=\"{}\" rx=\"6\"></rect><text x=\"{}\" y=\"{}\">{}</text></g>",
                escape(label),
                ROW_HEIGHT - 8,
                column + 8,
                y + ROW_HEIGHT / 2,
                escape(&truncate(label, 44))
            );
        }
    }
    page.push_str("</svg>\n");
}

fn findings(page: &mut String, report: &Report) {
    page.push_str(
        "<section id=\"findings\">\n<h2>Findings</h2>\n<div class=\"controls\">\
         <input id=\"search\" type=\"search\" placeholder=\"Filter findings by any text\" aria-label=\"filter findings\">\
         <label><input id=\"only-misrouted\" type=\"checkbox\"> only misrouted</label>\
         <span id=\"shown\" class=\"muted\"></span></div>\n",
    );
    if report.rows.is_empty() {
        page.push_str("<p>No misrouted, blackholed or redirected connections match.</p>\n");
    }
    for (index, row) in report.rows.iter().enumerate() {
        let verdict = escape(&row.verdict);
        let cause = if row.capturing_service.is_empty() {
            format!(
                "The connection was carried by cluster {}, which names no capturing service \
                 (no istio.services metadata).",
                row.cluster
            )
        } else {
            format!(
                "Captured by the listener of service {}, whose cluster {} carried the connection.",
                row.capturing_service, row.cluster
            )
        };
        let _ = writeln!(
            page,
            "<article class=\"finding {verdict}\" id=\"finding-{number}\" data-finding=\"{number}\" \
             data-source-namespace=\"{}\" data-source-workload=\"{}\" data-dialed=\"{}\" data-reached=\"{}\" \
             data-cluster=\"{}\" data-verdict=\"{verdict}\" data-count=\"{}\" data-first-seen=\"{}\" data-last-seen=\"{}\">\n\
             <h3><span class=\"badge {verdict}\">{verdict}</span>{}</h3>\n<dl>\n\
             <dt>Connections</dt><dd>{} (first {}, last {})</dd>\n\
             <dt>Meant to reach</dt><dd>{}</dd>\n\
             <dt>Reached</dt><dd><code>{}</code> {}</dd>\n\
             <dt>Cause</dt><dd>{}</dd>\n\
             <dt>Fix</dt><dd>{}</dd>\n</dl>\n</article>",
            escape(&row.source_namespace),
            escape(&row.source_workload),
            escape(&row.original_destination),
            escape(row.upstream_host.as_deref().unwrap_or("")),
            escape(&row.cluster),
            row.count,
            escape(&row.first_seen),
            escape(&row.last_seen),
            escape(&row.summary),
            row.count,
            escape(&row.first_seen),
            escape(&row.last_seen),
            escape(&intended_label(row)),
            escape(row.upstream_host.as_deref().unwrap_or("no host")),
            escape(&upstream_label(row)),
            escape(&cause),
            escape(&row.fix),
            number = index + 1,
        );
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

fn position_or_push(labels: &mut Vec<String>, label: String) -> usize {
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
    fn truncate_counts_characters() {
        assert_eq!(truncate("ééééé", 5), "ééééé");
        assert_eq!(truncate("éééééé", 5), "éééé…");
    }

    fn hostile_row() -> ReportRow {
        let evil = "<img src=x onerror=alert(1)>\"'&";
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
            fix: evil.into(),
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
            dropped_events: 1,
            rejected_events: 2,
            sampled_out_events: 3,
            filter: AppliedFilter {
                namespace: Some("<b>".into()),
                ..Default::default()
            },
        };
        let page = render_html(&report, "<now>");
        for needle in ["<img", "<script>alert", "</script><script>", "<b>", "<now>"] {
            assert!(!page.contains(needle), "{needle:?} reached the page");
        }
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
                dropped_events: 0,
                rejected_events: 0,
                sampled_out_events: 0,
                filter: AppliedFilter::default(),
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
