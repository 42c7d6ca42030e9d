//! `dialguard report`'s filters, formats and `--server`, against a database
//! filled through the real ingest (report_fixture), and the same filters on
//! `GET /api/v1/report` of the in-process collector. Every wait is bounded.

mod common;
mod report_fixture;

use std::collections::BTreeSet;

use common::*;
use dialguard_collector::report::{CSV_HEADER, Report};
use report_fixture::*;

const MISROUTED_5701: &str = "10.0.2.4:5701";
const BLACKHOLED_5701: &str = "10.0.1.6:5701";
const REDIRECTED_443: &str = "203.0.113.5:443";
const MISROUTED_8080: &str = "10.0.1.6:8080";
const BLACKHOLED_V6: &str = "[fd00::5]:9090";
const ALL: [&str; 5] = [
    MISROUTED_5701,
    BLACKHOLED_5701,
    REDIRECTED_443,
    MISROUTED_8080,
    BLACKHOLED_V6,
];

/// The rows by their dialed address (unique in the fixture).
fn dialed(report: &Report) -> BTreeSet<String> {
    report
        .rows
        .iter()
        .map(|row| row.original_destination.clone())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
        .to_string()
}

fn parse_report(json: &str) -> Report {
    serde_json::from_str(json).unwrap_or_else(|err| panic!("not a report ({err}): {json}"))
}

/// One filter, as flags and as the equivalent query string.
struct Case {
    flags: Vec<String>,
    query: String,
    expected: BTreeSet<String>,
}

fn case(pairs: &[(&str, &str)], expected: &[&str]) -> Case {
    Case {
        flags: pairs
            .iter()
            .flat_map(|(name, value)| [format!("--{name}"), value.to_string()])
            .collect(),
        query: pairs
            .iter()
            .fold(
                url::form_urlencoded::Serializer::new(String::new()),
                |mut query, (name, value)| {
                    query.append_pair(name, value);
                    query
                },
            )
            .finish(),
        expected: set(expected),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_filter_narrows_the_rows_in_the_cli_the_http_api_and_through_server() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let fixture = fill(&server).await;
    let at = |hours: f64| rfc3339(fixture.at_hour(hours));
    let (h2, h3) = (at(2.0), at(3.0));
    let cases = [
        case(&[], &ALL),
        case(
            &[("namespace", "manager")],
            &[MISROUTED_5701, BLACKHOLED_5701, REDIRECTED_443],
        ),
        case(&[("namespace", "app")], &[MISROUTED_8080, BLACKHOLED_V6]),
        case(&[("namespace", "nobody")], &[]),
        case(
            &[("verdict", "misrouted")],
            &[MISROUTED_5701, MISROUTED_8080],
        ),
        case(
            &[("verdict", "blackholed")],
            &[BLACKHOLED_5701, BLACKHOLED_V6],
        ),
        case(&[("verdict", "redirected")], &[REDIRECTED_443]),
        case(&[("port", "5701")], &[MISROUTED_5701, BLACKHOLED_5701]),
        case(&[("port", "9090")], &[BLACKHOLED_V6]),
        // ":80" is not a suffix of ":8080".
        case(&[("port", "80")], &[]),
        // Row 1's connections span hours 0 to 5: it overlaps [2h, 3h] with
        // none of its connections inside, and keeps its whole count.
        case(&[("since", &h2), ("until", &h3)], &[MISROUTED_5701]),
        case(
            &[("since", &at(5.5))],
            &[REDIRECTED_443, MISROUTED_8080, BLACKHOLED_V6],
        ),
        case(&[("until", &at(1.5))], &[MISROUTED_5701, BLACKHOLED_5701]),
        // Relative: 3h30m ago is hour 6.5 of the fixture (now - 10h).
        case(&[("since", "3h30m")], &[MISROUTED_8080, BLACKHOLED_V6]),
        case(&[("until", "9h30m")], &[MISROUTED_5701]),
        case(
            &[
                ("namespace", "manager"),
                ("verdict", "misrouted"),
                ("port", "5701"),
                ("since", "6h"),
            ],
            &[MISROUTED_5701],
        ),
    ];
    let server_url = format!("http://{}", server.http);
    for case in &cases {
        let flags: Vec<&str> = case.flags.iter().map(String::as_str).collect();

        let mut args = vec!["--format", "json"];
        args.extend(&flags);
        let from_db = parse_report(&report_ok(&db, &args).await);
        assert_eq!(dialed(&from_db), case.expected, "--db {flags:?}");
        for row in &from_db.rows {
            if row.original_destination == MISROUTED_5701 {
                assert_eq!(row.count, 3, "a row keeps its aggregate count: {flags:?}");
            }
        }

        let (status, _, body) =
            http_get(server.http, &format!("/api/v1/report?{}", case.query)).await;
        assert_eq!(status, 200, "?{}: {body}", case.query);
        let from_http = parse_report(&body);
        assert_eq!(dialed(&from_http), case.expected, "?{}", case.query);
        assert_eq!(from_http.rows, from_db.rows, "?{}", case.query);

        let mut args = vec!["--server", &server_url, "--format", "json"];
        args.extend(&flags);
        let out = dialguard_report(&args).await;
        assert!(
            out.status.success(),
            "--server {flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let from_server = parse_report(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(from_server.rows, from_db.rows, "--server {flags:?}");
        assert_eq!(from_server.dropped_events, 4);
        // Absolute filters read the same everywhere; relative ones are
        // resolved by each reader's clock.
        let relative = flags
            .windows(2)
            .any(|w| matches!(w[0], "--since" | "--until") && !w[1].ends_with('Z'));
        if !relative {
            assert_eq!(from_server, from_db, "--server {flags:?}");
        }
    }

    // The report says which filter made it, relative times resolved.
    let filtered = parse_report(
        &report_ok(
            &db,
            &["--format", "json", "--since", &h2, "--verdict", "MISROUTED"],
        )
        .await,
    );
    assert_eq!(filtered.filter.since.as_deref(), Some(h2.as_str()));
    assert_eq!(filtered.filter.verdict.as_deref(), Some("misrouted"));
    let unfiltered = report_ok(&db, &["--format", "json"]).await;
    assert!(!unfiltered.contains("\"filter\""), "{unfiltered}");

    let table = report_ok(&db, &["--verdict", "redirected"]).await;
    assert!(table.contains(REDIRECTED_443), "{table}");
    assert!(!table.contains(MISROUTED_5701), "{table}");
    assert!(table.contains("filter: verdict=redirected"), "{table}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_has_the_table_columns_and_parses_back_to_the_json_rows() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    fill(&server).await;
    let json = parse_report(&report_ok(&db, &["--format", "json"]).await);
    let csv_text = report_ok(&db, &["--format", "csv"]).await;
    server.stop().await;

    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(header, CSV_HEADER);
    let records: Vec<csv::StringRecord> = reader
        .records()
        .collect::<Result<_, _>>()
        .expect("CSV records");
    assert_eq!(records.len(), json.rows.len(), "{csv_text}");
    assert_eq!(records.len(), 5);
    for (record, row) in records.iter().zip(&json.rows) {
        let intended = row
            .intended
            .as_ref()
            .map(|pod| format!("{}/{}", pod.namespace, pod.pod))
            .unwrap_or_default();
        let expected = [
            row.verdict.clone(),
            format!("{}/{}", row.source_namespace, row.source_workload),
            row.original_destination.clone(),
            intended,
            row.upstream_host.clone().unwrap_or_default(),
            row.cluster.clone(),
            row.capturing_service.clone(),
            row.cause.label().to_string(),
            row.count.to_string(),
            row.would_close.to_string(),
            row.first_seen.clone(),
            row.last_seen.clone(),
        ];
        let fields: Vec<&str> = record.iter().collect();
        assert_eq!(fields, expected, "{csv_text}");
    }
    // Quotes, commas-free but quote-laden names survive the round trip.
    assert!(
        json.rows
            .iter()
            .any(|row| row.source_workload == HOSTILE_WORKLOAD),
        "the fixture's hostile workload is in the report"
    );
    // One header line and one line per row: no field spans lines.
    assert_eq!(csv_text.lines().count(), 1 + json.rows.len());
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_filter_values_are_refused_naming_the_flag_or_parameter() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    fill(&server).await;
    let db_str = db.to_str().expect("UTF-8 path");
    let server_url = format!("http://{}", server.http);

    let cli_cases: [(&[&str], &str); 6] = [
        (
            &["--verdict", "foo"],
            "--verdict \"foo\": expected misrouted, blackholed or redirected",
        ),
        (
            &["--port", "http"],
            "--port \"http\": expected a port number from 1 to 65535",
        ),
        (
            &["--port", "65536"],
            "--port \"65536\": expected a port number from 1 to 65535",
        ),
        (
            &["--since", "yesterday"],
            "--since \"yesterday\": expected an RFC 3339 time such as 2026-11-26T07:00:00Z, or a duration such as 24h or 7d",
        ),
        (
            &["--until", "2026-13-01T00:00:00Z"],
            "--until \"2026-13-01T00:00:00Z\": expected an RFC 3339 time",
        ),
        (
            &["--namespace", ""],
            "--namespace \"\": expected a namespace name",
        ),
    ];
    for (flags, expected) in cli_cases {
        for source in [["--db", db_str], ["--server", &server_url]] {
            let mut args = source.to_vec();
            args.extend_from_slice(flags);
            let out = dialguard_report(&args).await;
            assert!(!out.status.success(), "{args:?} succeeded");
            let stderr = stderr_of(&out);
            assert!(
                stderr.contains(expected),
                "{args:?}: {stderr:?} lacks {expected:?}"
            );
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            assert!(out.stdout.is_empty(), "{args:?} printed a report");
        }
    }

    let http_cases = [
        (
            "verdict=foo",
            "verdict \"foo\": expected misrouted, blackholed or redirected",
        ),
        (
            "port=0",
            "port \"0\": expected a port number from 1 to 65535",
        ),
        ("since=x", "since \"x\": expected an RFC 3339 time"),
        (
            "since=1h&until=2h",
            "since \"1h\": expected a time no later than until",
        ),
        (
            "verdit=misrouted",
            "unknown parameter \"verdit\": expected since, until, namespace, verdict, port, limit or cursor",
        ),
        ("port=1&port=2", "port given more than once"),
    ];
    for (query, expected) in http_cases {
        let (status, head, body) = http_get(server.http, &format!("/api/v1/report?{query}")).await;
        assert_eq!(status, 400, "?{query}: {body}");
        assert!(head.contains("application/json"), "?{query}: {head}");
        let error: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|err| panic!("?{query}: {err}: {body}"));
        let message = error["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(expected),
            "?{query}: {message:?} does not start with {expected:?}"
        );
    }

    // Exactly one of --db and --server.
    let neither = dialguard_report(&["--format", "json"]).await;
    assert!(!neither.status.success());
    assert!(
        stderr_of(&neither).contains("--db"),
        "{}",
        stderr_of(&neither)
    );
    let both = dialguard_report(&["--db", db_str, "--server", &server_url]).await;
    assert!(!both.status.success());
    assert!(
        stderr_of(&both).contains("cannot be used with"),
        "{}",
        stderr_of(&both)
    );

    // --server problems say what went wrong, without a report.
    let not_http = dialguard_report(&["--server", "ftp://example"]).await;
    assert!(!not_http.status.success());
    assert!(
        stderr_of(&not_http)
            .contains("--server \"ftp://example\": expected an http:// or https:// URL"),
        "{}",
        stderr_of(&not_http)
    );
    let wrong_path = format!("{server_url}/no/such/prefix");
    let not_found = dialguard_report(&["--server", &wrong_path]).await;
    assert!(!not_found.status.success());
    assert!(
        stderr_of(&not_found).contains("answered 404"),
        "{}",
        stderr_of(&not_found)
    );
    let nobody = format!("http://{}", free_addr());
    let refused = dialguard_report(&["--server", &nobody]).await;
    assert!(!refused.status.success());
    assert!(
        stderr_of(&refused).contains("--server: GET"),
        "{}",
        stderr_of(&refused)
    );
    server.stop().await;
}
