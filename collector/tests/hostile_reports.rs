//! Hostile report readers (issue 12): reports are paged, worst first, over
//! the real HTTP listener of the in-process collector and through the real
//! `dialguard report` CLI (`--db` and `--server`); more report requests at
//! once than allowed get 503 with Retry-After; a pod with several IPs is
//! stored once in the directory and still names the pod its IPs belong to.
//! The databases are filled through the real gRPC ingest. Every wait is
//! bounded.

mod common;
mod report_fixture;

use std::cmp::Reverse;
use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use dialguard_collector::ServeConfig;
use dialguard_collector::report::{Report, ReportRow};
use dialguard_proto::v1::{ConnectionEvent, Hello, SidecarMessage, Verdict, sidecar_message};
use report_fixture::{dialguard_report, report_ok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLUSTER: &str = "outbound|9080||ratings.bookinfo.svc.cluster.local";

/// A row's place in the documented order: misrouted, blackholed, the rest;
/// count descending; then dialed address, namespace, workload, reached,
/// cluster, verdict (byte order).
type OrderKey = (
    u8,
    Reverse<u64>,
    String,
    String,
    String,
    String,
    String,
    String,
);

fn severity(verdict: &str) -> u8 {
    match verdict {
        "misrouted" => 0,
        "blackholed" => 1,
        _ => 2,
    }
}

fn order_key(row: &ReportRow) -> OrderKey {
    (
        severity(&row.verdict),
        Reverse(row.count),
        row.original_destination.clone(),
        row.source_namespace.clone(),
        row.source_workload.clone(),
        row.upstream_host.clone().unwrap_or_default(),
        row.cluster.clone(),
        row.verdict.clone(),
    )
}

/// One aggregate row as sent: its key and how many connections it gets.
#[derive(Debug, Clone)]
struct Sent {
    dialed: String,
    verdict: Verdict,
    count: u64,
}

impl Sent {
    fn reached(&self) -> Option<&'static str> {
        match self.verdict {
            Verdict::Blackholed => None,
            Verdict::Redirected => Some("10.0.3.10:5701"),
            _ => Some("10.0.3.9:5701"),
        }
    }

    fn verdict_label(&self) -> &'static str {
        match self.verdict {
            Verdict::Misrouted => "misrouted",
            Verdict::Blackholed => "blackholed",
            _ => "redirected",
        }
    }
}

/// `n` distinct rows in `subnet` (10.`subnet`.x.y:5701): verdicts in turn
/// misrouted, blackholed, redirected; 1 to `most` connections each.
fn rows_in(subnet: u8, n: usize, most: u64) -> Vec<Sent> {
    let verdicts = [Verdict::Misrouted, Verdict::Blackholed, Verdict::Redirected];
    (0..n)
        .map(|i| Sent {
            dialed: format!("10.{subnet}.{}.{}:5701", i / 250, i % 250),
            verdict: verdicts[i % 3],
            count: 1 + i as u64 % most,
        })
        .collect()
}

fn hello_message(hello: Hello) -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(hello)),
    }
}

/// A sidecar of `workload` in `namespace` (its own pod IP `ip`).
fn sidecar(namespace: &str, workload: &str, ip: &str) -> Hello {
    Hello {
        node_id: format!("sidecar~{ip}~{workload}-0.{namespace}~{namespace}.svc.cluster.local"),
        pod_name: format!("{workload}-0"),
        namespace: namespace.into(),
        workload_name: workload.into(),
        instance_ips: vec![ip.into()],
        ..hello("unused", "vm-1")
    }
}

/// Sends `rows` from `sidecar` through the real ingest, each row's
/// connections as separate events, `per_batch` events a batch.
async fn send_rows(server: &Server, sidecar: Hello, rows: &[Sent], per_batch: usize) {
    let mut client = server.client().await;
    let mut stream = ReportStream::open_with(&mut client, hello_message(sidecar))
        .await
        .expect("stream");
    let mut events: Vec<ConnectionEvent> = Vec::new();
    for row in rows {
        for _ in 0..row.count {
            let sequence = events.len() as u64 + 1;
            let mut sent = event(sequence, row.verdict, &row.dialed, row.reached());
            sent.cluster_name = CLUSTER.into();
            events.push(sent);
        }
    }
    for chunk in events.chunks(per_batch) {
        let last = chunk.last().map_or(0, |e| e.sequence);
        assert_eq!(stream.send_acked(batch(chunk.to_vec())).await, last);
    }
    stream.close().await;
}

/// The rows the collector must hold, in the documented order.
fn expected_order(sent: &[(&str, &str, &[Sent])]) -> Vec<OrderKey> {
    let mut keys: Vec<OrderKey> = sent
        .iter()
        .flat_map(|(namespace, workload, rows)| {
            rows.iter().map(move |row| {
                (
                    severity(row.verdict_label()),
                    Reverse(row.count),
                    row.dialed.clone(),
                    namespace.to_string(),
                    workload.to_string(),
                    row.reached().unwrap_or_default().to_string(),
                    CLUSTER.to_string(),
                    row.verdict_label().to_string(),
                )
            })
        })
        .collect();
    keys.sort();
    keys
}

/// The tests' collector, printing one alert line per misrouted row at most.
fn quiet(db: &std::path::Path) -> ServeConfig {
    ServeConfig {
        alert_interval: std::time::Duration::from_secs(3_600),
        ..test_config(db)
    }
}

fn parse_report(json: &str) -> Report {
    serde_json::from_str(json).unwrap_or_else(|err| panic!("not a report ({err}): {json}"))
}

/// `GET /api/v1/report?{query}`, which must answer 200.
async fn get_page(http: SocketAddr, query: &str) -> Report {
    let (status, _, body) = http_get(http, &format!("/api/v1/report?{query}")).await;
    assert_eq!(status, 200, "?{query}: {body}");
    parse_report(&body)
}

fn query(pairs: &[(&str, &str)]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        query.append_pair(name, value);
    }
    query.finish()
}

/// Every page of `filter`, `limit` rows each, following `nextCursor`.
async fn walk(http: SocketAddr, filter: &[(&str, &str)], limit: usize) -> Vec<Report> {
    let limit = limit.to_string();
    let mut pages: Vec<Report> = Vec::new();
    let mut cursor: Option<String> = None;
    // Bounded: a cursor that never ends fails the test instead of looping.
    for _ in 0..100 {
        let mut pairs = filter.to_vec();
        pairs.push(("limit", &limit));
        if let Some(cursor) = &cursor {
            pairs.push(("cursor", cursor));
        }
        let page = get_page(http, &query(&pairs)).await;
        cursor = page.next_cursor.clone();
        pages.push(page);
        if cursor.is_none() {
            return pages;
        }
    }
    panic!("more than 100 pages for {filter:?}");
}

fn keys(rows: &[ReportRow]) -> Vec<OrderKey> {
    rows.iter().map(order_key).collect()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_are_paged_worst_first_through_http_and_the_cli() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(quiet(&db)).await;
    let bookinfo = rows_in(9, 1_300, 5);
    let other = rows_in(8, 200, 5);
    send_rows(
        &server,
        sidecar("bookinfo", "reviews", "10.0.1.6"),
        &bookinfo,
        1_000,
    )
    .await;
    send_rows(
        &server,
        sidecar("other", "client", "10.0.1.7"),
        &other,
        1_000,
    )
    .await;
    let all = expected_order(&[
        ("bookinfo", "reviews", &bookinfo),
        ("other", "client", &other),
    ]);
    assert_eq!(all.len(), 1_500);

    // The default page: the worst 1,000 of 1,500.
    let first = get_page(server.http, "").await;
    assert_eq!(first.rows.len(), 1_000);
    assert_eq!((first.total_rows, first.truncated), (1_500, true));
    assert_eq!(keys(&first.rows), all[..1_000]);
    assert!(first.rows[0].verdict == "misrouted" && first.rows[0].count == 5);
    let default_cursor = first.next_cursor.clone().expect("a next cursor");

    // Every page in turn: each row once, in order, the last page says so.
    let pages = walk(server.http, &[], 400).await;
    let sizes: Vec<usize> = pages.iter().map(|page| page.rows.len()).collect();
    assert_eq!(sizes, [400, 400, 400, 300]);
    for (index, page) in pages.iter().enumerate() {
        assert_eq!(page.total_rows, 1_500);
        assert_eq!(page.truncated, index < 3, "page {index}");
        assert_eq!(page.next_cursor.is_some(), index < 3, "page {index}");
        // The totals and coverage are on every page.
        assert!(!page.coverage.namespaces.is_empty());
    }
    let walked: Vec<ReportRow> = pages.iter().flat_map(|p| p.rows.clone()).collect();
    assert_eq!(keys(&walked), all);
    let counted: u64 = walked.iter().map(|row| row.count).sum();
    assert_eq!(
        counted,
        bookinfo.iter().chain(&other).map(|r| r.count).sum::<u64>()
    );

    // Filters keep working with paging: only their rows, all of them, in order.
    for (filter, limit) in [
        (vec![("namespace", "other")], 64),
        (
            vec![("verdict", "blackholed"), ("namespace", "bookinfo")],
            100,
        ),
        (vec![("verdict", "MISROUTED")], 1_000),
    ] {
        let pages = walk(server.http, &filter, limit).await;
        let rows: Vec<ReportRow> = pages.iter().flat_map(|p| p.rows.clone()).collect();
        let expected: Vec<OrderKey> = all
            .iter()
            .filter(|key| {
                filter.iter().all(|(name, value)| match *name {
                    "namespace" => key.3 == *value,
                    _ => key.7.eq_ignore_ascii_case(value),
                })
            })
            .cloned()
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(keys(&rows), expected, "{filter:?}");
        assert!(
            pages.iter().all(|p| p.total_rows == expected.len() as u64),
            "{filter:?}"
        );
        assert_eq!(pages.len(), expected.len().div_ceil(limit), "{filter:?}");
    }

    // The CLI reads the same pages from the database and through --server.
    let server_url = format!("http://{}", server.http);
    let page_two_cursor = pages[0].next_cursor.clone().expect("cursor");
    for source in [
        vec!["--db", db.to_str().expect("UTF-8 path")],
        vec!["--server", &server_url],
    ] {
        for (cursor, expected) in [(None, &pages[0]), (Some(&page_two_cursor), &pages[1])] {
            let mut args = source.clone();
            args.extend(["--format", "json", "--limit", "400"]);
            if let Some(cursor) = cursor {
                args.extend(["--cursor", cursor.as_str()]);
            }
            let out = dialguard_report(&args).await;
            assert!(out.status.success(), "{args:?}: {}", stderr_of(&out));
            let report = parse_report(&String::from_utf8_lossy(&out.stdout));
            assert_eq!(report.rows, expected.rows, "{args:?}");
            assert_eq!(
                (report.total_rows, report.truncated, &report.next_cursor),
                (
                    expected.total_rows,
                    expected.truncated,
                    &expected.next_cursor
                ),
                "{args:?}"
            );
        }
    }

    // The table says what it left out and how to get it.
    let table = report_ok(&db, &[]).await;
    assert!(
        table.contains(&format!(
            "showing 1000 of 1500 rows, worst first; more with --limit N (at most 10000), \
             or the next page with --cursor {default_cursor}"
        )),
        "{table}"
    );
    let whole = report_ok(&db, &["--limit", "1500"]).await;
    assert!(!whole.contains("showing"), "nothing left out: {whole}");
    let last_cursor = pages[2].next_cursor.clone().expect("cursor");
    let last = report_ok(&db, &["--limit", "400", "--cursor", &last_cursor]).await;
    assert!(last.contains("showing the last 300 of 1500 rows"), "{last}");

    // CSV stays data only; the note goes to stderr.
    let db_str = db.to_str().expect("UTF-8 path");
    let csv = dialguard_report(&["--db", db_str, "--format", "csv", "--limit", "10"]).await;
    assert!(csv.status.success(), "{}", stderr_of(&csv));
    assert_eq!(String::from_utf8_lossy(&csv.stdout).lines().count(), 1 + 10);
    assert!(
        stderr_of(&csv).contains("dialguard: showing 10 of 1500 rows, worst first"),
        "{}",
        stderr_of(&csv)
    );

    // So does the HTML page, above everything that counts the rows.
    let html = report_ok(&db, &["--format", "html", "--limit", "10"]).await;
    let note = html
        .find("<p id=\"truncated\" data-shown=\"10\" data-total=\"1500\">")
        .expect("the HTML says rows were left out");
    assert!(note < html.find("id=\"summary\"").expect("summary"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_limits_and_cursors_are_refused_naming_the_parameter() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    send_rows(
        &server,
        sidecar("bookinfo", "reviews", "10.0.1.6"),
        &rows_in(9, 3, 1),
        100,
    )
    .await;
    let good = get_page(server.http, "limit=1").await;
    let cursor = good.next_cursor.expect("a cursor");
    assert_eq!(
        get_page(server.http, &format!("limit=1&cursor={cursor}"))
            .await
            .rows
            .len(),
        1
    );

    let limit_expected = "expected a number of rows from 1 to 10000";
    let cursor_expected = "expected the nextCursor of an earlier page of the report";
    for (query, expected) in [
        (
            "limit=0".to_string(),
            format!("limit \"0\": {limit_expected}"),
        ),
        (
            "limit=10001".into(),
            format!("limit \"10001\": {limit_expected}"),
        ),
        ("limit=-5".into(), format!("limit \"-5\": {limit_expected}")),
        (
            "limit=lots".into(),
            format!("limit \"lots\": {limit_expected}"),
        ),
        (
            "limit=1&limit=2".into(),
            "limit given more than once".into(),
        ),
        (
            "cursor=nope".into(),
            format!("cursor \"nope\": {cursor_expected}"),
        ),
        // A cursor cut short, or tampered with (the message quotes at
        // most 80 characters of it).
        (
            format!("cursor={}", &cursor[..cursor.len() - 3]),
            format!("cursor \"{}\": {cursor_expected}", &cursor[..80]),
        ),
    ] {
        let (status, head, body) = http_get(server.http, &format!("/api/v1/report?{query}")).await;
        assert_eq!(status, 400, "?{query}: {body}");
        assert!(head.contains("application/json"), "{head}");
        let error: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
        assert_eq!(error["error"], expected.as_str(), "?{query}");
    }

    let db_str = db.to_str().expect("UTF-8 path");
    let server_url = format!("http://{}", server.http);
    for source in [["--db", db_str], ["--server", &server_url]] {
        for (flags, expected) in [
            (["--limit", "0"], format!("--limit \"0\": {limit_expected}")),
            (
                ["--limit", "99999"],
                format!("--limit \"99999\": {limit_expected}"),
            ),
            (
                ["--cursor", "nope"],
                format!("--cursor \"nope\": {cursor_expected}"),
            ),
        ] {
            let mut args = source.to_vec();
            args.extend(flags);
            let out = dialguard_report(&args).await;
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(
                stderr_of(&out).contains(&expected),
                "{args:?}: {}",
                stderr_of(&out)
            );
            assert!(!stderr_of(&out).contains("panicked"), "{}", stderr_of(&out));
            assert!(out.stdout.is_empty(), "{args:?} printed a report");
        }
    }
    server.stop().await;
}

/// GETs `path` on a connection opened before `start` is given, so that
/// every request of a burst is on the wire at once: (status, lower-cased
/// head, body).
async fn burst_get(
    http: SocketAddr,
    path: String,
    start: Arc<tokio::sync::Barrier>,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(http).await.expect("connect");
    start.wait().await;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn more_report_requests_at_once_than_allowed_get_503_with_retry_after() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(quiet(&db)).await;
    // Enough rows that each report takes a while (counting and ordering
    // 150,000 rows), so that a burst overlaps. Blackholed: no alert lines.
    for (subnet, namespace, ip) in [
        (9, "bookinfo", "10.0.1.6"),
        (8, "other", "10.0.1.7"),
        (7, "third", "10.0.1.8"),
    ] {
        let rows: Vec<Sent> = rows_in(subnet, 50_000, 1)
            .into_iter()
            .map(|row| Sent {
                verdict: Verdict::Blackholed,
                ..row
            })
            .collect();
        send_rows(&server, sidecar(namespace, "app", ip), &rows, 10_000).await;
    }

    const BURST: usize = 16;
    let start = Arc::new(tokio::sync::Barrier::new(BURST + 1));
    let mut requests = tokio::task::JoinSet::new();
    for index in 0..BURST {
        // Coverage reads share the cap with the report.
        let path = match index % 8 {
            7 => "/api/v1/coverage",
            _ => "/api/v1/report",
        };
        requests.spawn(burst_get(server.http, path.to_string(), Arc::clone(&start)));
    }
    // Health is not a report read: it answers during the burst.
    requests.spawn(burst_get(
        server.http,
        "/healthz".into(),
        Arc::clone(&start),
    ));
    let mut answers = Vec::new();
    bounded("the burst", async {
        while let Some(answer) = requests.join_next().await {
            answers.push(answer.expect("a request task"));
        }
    })
    .await;
    let ok = answers.iter().filter(|(status, ..)| *status == 200).count();
    let busy: Vec<_> = answers
        .iter()
        .filter(|(status, ..)| *status == 503)
        .collect();
    assert_eq!(ok + busy.len(), BURST + 1, "{answers:?}");
    assert!(ok >= 2, "health and at least one report: {ok}");
    // Each report takes far longer than the burst takes to arrive: at most
    // the permits' holders (and a fast coverage read or two after them)
    // are served.
    assert!(busy.len() >= BURST / 2, "{} of {BURST} refused", busy.len());
    for (_, head, body) in busy {
        assert!(head.contains("retry-after: 1\r\n"), "{head}");
        assert!(head.contains("application/json"), "{head}");
        let error: serde_json::Value = serde_json::from_str(body).expect("JSON error");
        assert_eq!(
            error["error"],
            "the collector serves at most 4 report requests at once; retry after 1 s"
        );
    }

    // The permits come back: the next report is served.
    let after = get_page(server.http, "limit=5").await;
    assert_eq!((after.rows.len(), after.total_rows), (5, 150_000));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_with_several_ips_is_stored_once_and_named_for_each() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let pod_name = format!("{}-0", "p".repeat(200));
    let ips = ["10.7.0.1", "10.7.0.2", "fd00::7:1", "fd00::7:2"];
    let owner = |vm: &str| Hello {
        node_id: format!("sidecar~10.7.0.1~{pod_name}.store~store.svc.cluster.local"),
        vm_instance: vm.into(),
        pod_name: pod_name.clone(),
        namespace: "store".into(),
        workload_name: "store".into(),
        instance_ips: ips.iter().map(|ip| ip.to_string()).collect(),
        ..hello("unused", "unused")
    };
    // Both workers (VMs) of the pod connect.
    let mut client = server.client().await;
    let first = ReportStream::open_with(&mut client, hello_message(owner("vm-1")))
        .await
        .expect("vm-1");
    let second = ReportStream::open_with(&mut client, hello_message(owner("vm-2")))
        .await
        .expect("vm-2");
    // Another pod dials each of its IPs.
    let dialed: Vec<Sent> = ips
        .iter()
        .map(|ip| Sent {
            dialed: SocketAddr::new(ip.parse().expect("ip"), 5701).to_string(),
            verdict: Verdict::Misrouted,
            count: 1,
        })
        .collect();
    send_rows(
        &server,
        sidecar("bookinfo", "reviews", "10.0.1.6"),
        &dialed,
        100,
    )
    .await;
    first.close().await;
    second.close().await;
    // The directory is written behind the streams (queued, not awaited).
    wait_until("the directory rows", || {
        (count(&db, "SELECT count(*) FROM pod_ips") == 5).then_some(())
    })
    .await;

    // One row per pod (this one and the reviews pod), one per IP.
    assert_eq!(count(&db, "SELECT count(*) FROM pods"), 2);
    assert_eq!(count(&db, "SELECT count(*) FROM pod_ips"), 5);
    assert_eq!(
        count(
            &db,
            "SELECT sum(length(pod_name)) FROM pods WHERE namespace = 'store'"
        ),
        pod_name.len() as i64
    );
    let report = get_page(server.http, "namespace=bookinfo").await;
    assert_eq!(report.rows.len(), 4);
    for row in &report.rows {
        let intended = row.intended.as_ref().expect("the directory names the pod");
        assert_eq!(
            (intended.pod.as_str(), intended.namespace.as_str()),
            (pod_name.as_str(), "store"),
            "{}",
            row.original_destination
        );
    }
    server.stop().await;
}
