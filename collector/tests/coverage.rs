//! Coverage (issue 11) end to end: VMs say hello and heartbeat through the
//! real gRPC listener of the in-process collector (or the `dialguard serve`
//! binary), and coverage is read back through `GET /api/v1/coverage`,
//! `/api/v1/report`, `/metrics`, and the real `dialguard report` CLI on the
//! database. Every wait is bounded.

mod common;
mod report_fixture;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use dialguard_collector::inventory::Coverage;
use dialguard_collector::{Limits, ServeConfig};
use dialguard_proto::v1::{
    Build, ConnectionCounters, DeliveryCounters, Heartbeat, Hello, Mode, SidecarMessage, Verdict,
    sidecar_message,
};
use report_fixture::{dialguard_report, report_ok};
use serde_json::{Value, json};
use tonic::Code;

const NS: &str = "bookinfo";
const POD: &str = "reviews-v1-7d9f-abcde";

fn vm_hello(pod: &str, vm: &str, ip: &str, interval_ms: u32) -> Hello {
    Hello {
        node_id: format!("sidecar~{ip}~{pod}.{NS}~{NS}.svc.cluster.local"),
        vm_instance: vm.into(),
        pod_name: pod.into(),
        namespace: NS.into(),
        workload_name: "reviews-v1".into(),
        instance_ips: vec![ip.into()],
        cluster_id: "Kubernetes".into(),
        istio_version: "1.24.0".into(),
        filter_version: "0.2.0".into(),
        mode: Mode::Audit as i32,
        build: Build::Audit as i32,
        module_sha256: "ab".repeat(32),
        heartbeat_interval_ms: interval_ms,
    }
}

fn hello_msg(hello: Hello) -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(hello)),
    }
}

fn heartbeat(connections: ConnectionCounters, dropped: u64) -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Heartbeat(Heartbeat {
            connections: Some(connections),
            delivery: Some(DeliveryCounters {
                sent: 0,
                acked: 0,
                resent: 0,
                dropped,
                rejected: 0,
            }),
        })),
    }
}

fn counts(matched: u64, service: u64, misrouted: u64) -> ConnectionCounters {
    ConnectionCounters {
        r#match: matched,
        service,
        misrouted,
        ..ConnectionCounters::default()
    }
}

/// One heartbeat stream as the filter makes it: hello, a heartbeat,
/// half-close; returns once the collector ended it with OK.
async fn heartbeat_stream(server: &Server, hello: Hello, beat: SidecarMessage) {
    let mut client = server.client().await;
    let stream = ReportStream::open_with(&mut client, hello_msg(hello))
        .await
        .expect("the Report call");
    stream.send(beat).await;
    stream.close().await;
}

/// A stream whose heartbeat must be refused: its status.
async fn refused_heartbeat(
    server: &Server,
    hello: Hello,
    beats: Vec<SidecarMessage>,
) -> tonic::Status {
    let mut client = server.client().await;
    let mut stream = ReportStream::open_with(&mut client, hello_msg(hello))
        .await
        .expect("the Report call");
    for beat in beats {
        // The collector may already have ended the stream.
        let _ = stream.tx.send(beat).await;
    }
    stream.error().await
}

async fn get_json(server: &Server, path: &str) -> Value {
    let (status, _, body) = http_get(server.http, path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|err| panic!("GET {path}: {err}: {body}"))
}

async fn metrics(server: &Server) -> String {
    http_get(server.http, "/metrics").await.2
}

/// Polls `GET /api/v1/coverage` (the database, flushed once a second)
/// until `check` accepts it.
async fn coverage_until(
    server: &Server,
    what: &str,
    check: impl Fn(&Coverage) -> bool,
) -> Coverage {
    bounded(what, async {
        loop {
            let body = get_json(server, "/api/v1/coverage").await;
            let coverage: Coverage = serde_json::from_value(body).expect("coverage JSON");
            if check(&coverage) {
                return coverage;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// The value of one exposition line (`name{labels}`), if present.
fn stored_counter(db: &std::path::Path, vm: &str, column: &str) -> i64 {
    read_only(db)
        .query_row(
            &format!("SELECT {column} FROM sidecars WHERE vm_instance = ?1"),
            [vm],
            |row| row.get(0),
        )
        .unwrap_or_else(|err| panic!("{column} of {vm}: {err}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_with_only_legitimate_traffic_is_covered_with_exact_counts_and_no_rows() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    heartbeat_stream(
        &server,
        vm_hello(POD, "vm-1", "10.0.1.6", 60_000),
        heartbeat(counts(5, 3, 0), 0),
    )
    .await;
    // The database is at most a second behind.
    let coverage = coverage_until(&server, "the heartbeat in coverage", |c| {
        c.sidecars
            .first()
            .is_some_and(|s| s.connections.matched == 5)
    })
    .await;

    let out = report_ok(&db, &["--format", "json"]).await;
    let report: Value = serde_json::from_str(&out).expect("report JSON");
    assert_eq!(report["rows"], json!([]), "legitimate traffic makes no row");
    let sidecar = &report["coverage"]["sidecars"][0];
    let first_seen = sidecar["firstSeen"]
        .as_str()
        .expect("firstSeen")
        .to_string();
    let last_seen = sidecar["lastSeen"].as_str().expect("lastSeen").to_string();
    assert!(
        first_seen.ends_with('Z') && first_seen.len() == 24,
        "{first_seen}"
    );
    assert_eq!(
        report["coverage"],
        json!({
            "sidecars": [{
                "pod": POD,
                "namespace": NS,
                "workload": "reviews-v1",
                "mode": "audit",
                "build": "audit",
                "filterVersion": "0.2.0",
                "moduleSha256": "ab".repeat(32),
                "firstSeen": first_seen,
                "lastSeen": last_seen,
                "stale": false,
                "vms": 1,
                "connections": {
                    "match": 5, "service": 3, "allowed": 0, "misrouted": 0, "blackholed": 0,
                    "redirected": 0, "resolved": 0, "unjudged": 0, "enforced": 0
                },
                "delivery": { "sent": 0, "acked": 0, "resent": 0, "dropped": 0, "rejected": 0 }
            }],
            "namespaces": [{
                "namespace": NS, "sidecars": 1, "stale": 0, "expected": false, "covered": true,
                "judged": 8
            }],
            "uncovered": []
        })
    );
    // The HTTP API serves the same, with the report and alone.
    assert_eq!(
        serde_json::to_value(&coverage).expect("JSON"),
        report["coverage"]
    );
    assert_eq!(
        get_json(&server, "/api/v1/report").await["coverage"],
        report["coverage"]
    );

    let text = metrics(&server).await;
    for (series, value) in [
        ("dialguard_heartbeats_total", 1.0),
        (
            r#"dialguard_judged_connections_total{namespace="bookinfo",verdict="match"}"#,
            5.0,
        ),
        (
            r#"dialguard_judged_connections_total{namespace="bookinfo",verdict="service"}"#,
            3.0,
        ),
        (
            r#"dialguard_judged_connections_total{namespace="bookinfo",verdict="misrouted"}"#,
            0.0,
        ),
        (
            r#"dialguard_sidecars{namespace="bookinfo",state="reporting"}"#,
            1.0,
        ),
        (
            r#"dialguard_sidecars{namespace="bookinfo",state="stale"}"#,
            0.0,
        ),
    ] {
        assert_eq!(metric(&text, series), Some(value), "{series} in\n{text}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_that_stops_heartbeating_goes_stale_after_three_intervals_then_leaves() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        forget_stale: Duration::from_secs(2),
        ..test_config(&db)
    })
    .await;
    heartbeat_stream(
        &server,
        vm_hello(POD, "vm-1", "10.0.1.6", 1_000),
        heartbeat(counts(1, 0, 0), 0),
    )
    .await;
    let heard = Instant::now();
    let reporting = r#"dialguard_sidecars{namespace="bookinfo",state="reporting"}"#;
    let stale = r#"dialguard_sidecars{namespace="bookinfo",state="stale"}"#;
    let text = metrics(&server).await;
    assert_eq!(metric(&text, reporting), Some(1.0), "{text}");

    // Three intervals of 1 s, then stale; polled, never longer than WAIT.
    bounded("the VM to go stale", async {
        while metric(&metrics(&server).await, stale) != Some(1.0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let after = heard.elapsed();
    assert!(
        after >= Duration::from_millis(2_900) && after < Duration::from_secs(5),
        "stale after {after:?}"
    );
    assert_eq!(metric(&metrics(&server).await, reporting), Some(0.0));
    let out = report_ok(&db, &["--format", "json"]).await;
    let report: Value = serde_json::from_str(&out).expect("report JSON");
    assert_eq!(
        report["coverage"]["sidecars"][0]["stale"],
        json!(true),
        "{out}"
    );
    assert_eq!(
        report["coverage"]["namespaces"][0],
        json!({"namespace": NS, "sidecars": 0, "stale": 1, "expected": false, "covered": false, "judged": 1})
    );

    // Stale for longer than --forget-stale (2 s): out of the coverage, kept in the database.
    bounded("the pod to leave the coverage", async {
        while metric(&metrics(&server).await, stale) != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    coverage_until(&server, "the pod gone from the report", |c| {
        c.sidecars.is_empty()
    })
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM sidecars"), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expected_namespace_without_sidecars_is_uncovered_in_every_format() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        expected_namespaces: BTreeSet::from(["payments".to_string(), NS.to_string()]),
        ..test_config(&db)
    })
    .await;
    heartbeat_stream(
        &server,
        vm_hello(POD, "vm-1", "10.0.1.6", 60_000),
        heartbeat(counts(2, 0, 0), 0),
    )
    .await;
    coverage_until(&server, "the heartbeat in coverage", |c| {
        c.sidecars
            .first()
            .is_some_and(|s| s.connections.matched == 2)
    })
    .await;

    let report: Value =
        serde_json::from_str(&report_ok(&db, &["--format", "json"]).await).expect("JSON");
    assert_eq!(
        report["coverage"]["namespaces"],
        json!([
            {"namespace": NS, "sidecars": 1, "stale": 0, "expected": true, "covered": true, "judged": 2},
            {"namespace": "payments", "sidecars": 0, "stale": 0, "expected": true, "covered": false, "judged": 0}
        ])
    );
    assert_eq!(report["coverage"]["uncovered"], json!(["payments"]));
    // --namespace restricts the coverage too.
    let only: Value = serde_json::from_str(
        &report_ok(&db, &["--format", "json", "--namespace", "payments"]).await,
    )
    .expect("JSON");
    assert_eq!(only["coverage"]["sidecars"], json!([]));
    assert_eq!(only["coverage"]["uncovered"], json!(["payments"]));

    let table = report_ok(&db, &[]).await;
    let payments_line = table
        .lines()
        .find(|line| line.contains("payments") && line.contains('│'))
        .unwrap_or_else(|| panic!("no payments row in\n{table}"));
    let cells: Vec<&str> = payments_line
        .split(['│', '┆'])
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cells, ["payments", "yes", "no", "0", "0", "0"], "{table}");
    assert!(
        table.contains("warning: expected namespace payments has no reporting sidecar"),
        "{table}"
    );

    let csv = report_ok(&db, &["--format", "csv", "--section", "coverage"]).await;
    assert_eq!(
        csv,
        "namespace,expected,covered,reporting sidecars,stale sidecars,judged connections\n\
         bookinfo,yes,yes,1,0,2\n\
         payments,yes,no,0,0,0\n"
    );
    // The rows' CSV is unchanged by default; --section needs csv.
    let rows_csv = report_ok(&db, &["--format", "csv"]).await;
    assert_eq!(rows_csv.lines().count(), 1, "header only: {rows_csv}");
    let wrong =
        dialguard_report(&["--db", db.to_str().expect("path"), "--section", "coverage"]).await;
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("--section: only with -o csv"),
        "{wrong:?}"
    );

    let html = report_ok(&db, &["--format", "html"]).await;
    assert!(
        html.contains(
            "<tr data-namespace=\"payments\" data-covered=\"false\" data-expected=\"true\" data-judged=\"0\" class=\"uncovered\">"
        ),
        "no uncovered payments row in the page"
    );
    assert!(html.contains(
        "<tr data-namespace=\"bookinfo\" data-covered=\"true\" data-expected=\"true\" data-judged=\"2\">"
    ));
    assert!(html.contains("data-uncovered=\"1\" data-judged=\"2\""));

    let text = metrics(&server).await;
    for (series, value) in [
        (r#"dialguard_namespace_expected{namespace="payments"}"#, 1.0),
        (r#"dialguard_namespace_expected{namespace="bookinfo"}"#, 1.0),
        (
            r#"dialguard_namespace_uncovered{namespace="payments"}"#,
            1.0,
        ),
        (
            r#"dialguard_namespace_uncovered{namespace="bookinfo"}"#,
            0.0,
        ),
        (
            r#"dialguard_sidecars{namespace="payments",state="reporting"}"#,
            0.0,
        ),
        (
            r#"dialguard_sidecars{namespace="payments",state="stale"}"#,
            0.0,
        ),
        (
            r#"dialguard_sidecars{namespace="bookinfo",state="reporting"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metric(&text, series), Some(value), "{series} in\n{text}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_reads_expected_namespaces_from_flags_and_a_configmap_file() {
    let (dir, db) = temp_db();
    let file = dir.path().join("expected-namespaces");
    std::fs::write(
        &file,
        "# dialguard must see these\npayments\n\n  orders  # team b\n",
    )
    .expect("write the file");
    let file_arg = file.to_str().expect("path");
    let (process, _stderr) = ServeProcess::start_with_args(
        &db,
        &[
            "--expect-namespace",
            NS,
            "--expect-namespaces-file",
            file_arg,
        ],
    );
    // serve records the set in the database as it starts.
    let db_arg = db.to_str().expect("path");
    bounded("serve to record the expected namespaces", async {
        loop {
            let out = dialguard_report(&["--db", db_arg, "--format", "json"]).await;
            let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if report["coverage"]["uncovered"] == json!([NS, "orders", "payments"]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(process);

    std::fs::write(&file, "payments\nNot_A_Namespace\n").expect("write the file");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .args([
            "serve",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--db",
        ])
        .arg(&db)
        .args(["--expect-namespaces-file", file_arg])
        .output()
        .expect("run dialguard serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "--expect-namespaces-file {file_arg}: line 2: \"Not_A_Namespace\": expected a namespace name"
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_expected_namespaces_file_applies_while_serving_and_a_bad_one_changes_nothing() {
    let (dir, db) = temp_db();
    let file = dir.path().join("expected-namespaces");
    std::fs::write(&file, "payments\n").expect("write the file");
    let server = Server::start_with(ServeConfig {
        expected_namespaces: [NS.to_string()].into(),
        expected_namespaces_file: Some(file.clone()),
        expected_namespaces_reload: Duration::from_millis(100),
        ..test_config(&db)
    })
    .await;
    let uncovered =
        |namespace: &str| format!(r#"dialguard_namespace_uncovered{{namespace="{namespace}"}}"#);
    // What report (from the database) and /metrics (from memory) say.
    let state = || async {
        let report: Value =
            serde_json::from_str(&report_ok(&db, &["-o", "json"]).await).expect("JSON report");
        let (_, _, metrics) = http_get(server.http, "/metrics").await;
        let in_metrics: Vec<&str> = [NS, "payments", "orders"]
            .into_iter()
            .filter(|ns| metric(&metrics, &uncovered(ns)) == Some(1.0))
            .collect();
        (report["coverage"]["uncovered"].clone(), json!(in_metrics))
    };
    // The database is ready once /metrics answers (it is opened first).
    bounded("serve to answer", async {
        while http_get(server.http, "/healthz").await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        state().await,
        (json!([NS, "payments"]), json!([NS, "payments"]))
    );

    // kubelet swaps the file in place when the ConfigMap changes.
    std::fs::write(&file, "# rolled out to orders too\norders\npayments\n").expect("write");
    let started = Instant::now();
    bounded("the new list to apply", async {
        while state().await
            != (
                json!([NS, "orders", "payments"]),
                json!([NS, "payments", "orders"]),
            )
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    println!(
        "a changed list applied {:?} after the write",
        started.elapsed()
    );

    // A bad line, then no file at all: the list in force stays, whole.
    for broken in [Some("orders\nNot_A_Namespace\n"), None] {
        match broken {
            Some(text) => std::fs::write(&file, text).expect("write"),
            None => std::fs::remove_file(&file).expect("remove"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            state().await,
            (
                json!([NS, "orders", "payments"]),
                json!([NS, "payments", "orders"])
            ),
            "after {broken:?}"
        );
    }
    // Fixed: applies again; the flag's namespace always stays.
    std::fs::write(&file, "orders\n").expect("write");
    bounded("the fixed list to apply", async {
        while state().await != (json!([NS, "orders"]), json!([NS, "orders"])) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_going_backwards_are_refused_and_change_nothing() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let hello = vm_hello(POD, "vm-1", "10.0.1.6", 60_000);
    heartbeat_stream(&server, hello.clone(), heartbeat(counts(5, 0, 7), 0)).await;
    coverage_until(&server, "the first heartbeat stored", |c| {
        c.sidecars
            .first()
            .is_some_and(|s| s.connections.misrouted == 7)
    })
    .await;

    let status =
        refused_heartbeat(&server, hello.clone(), vec![heartbeat(counts(6, 0, 3), 0)]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "heartbeat.connections.misrouted: 3 is below 7, already reported by this vm_instance; \
         counters are cumulative (a restarted VM sends a new vm_instance)"
    );
    // A later valid heartbeat shows the refused one left nothing behind.
    heartbeat_stream(&server, hello, heartbeat(counts(5, 0, 7), 0)).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(stored_counter(&db, "vm-1", "conn_match"), 5);
    assert_eq!(stored_counter(&db, "vm-1", "conn_misrouted"), 7);
    let text = metrics(&server).await;
    assert_eq!(
        metric(
            &text,
            r#"dialguard_judged_connections_total{namespace="bookinfo",verdict="match"}"#
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"dialguard_streams_refused_total{reason="heartbeat_backwards"}"#
        ),
        Some(1.0)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_before_hello_is_refused() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let status = match ReportStream::open_with(&mut client, heartbeat(counts(1, 0, 0), 0)).await {
        Err(status) => status,
        Ok(mut stream) => stream.error().await,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("must be `hello`"), "{status:?}");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(count(&db, "SELECT count(*) FROM sidecars"), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_hello_fields_are_named() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let base = vm_hello(POD, "vm-1", "10.0.1.6", 60_000);
    let cases = [
        (
            Hello {
                module_sha256: "xyz".into(),
                ..base.clone()
            },
            "hello.module_sha256: \"xyz\", expected empty or 64 hex digits",
        ),
        (
            Hello {
                build: 7,
                ..base.clone()
            },
            "hello.build: 7, expected 0 (BUILD_UNSPECIFIED), 1 (BUILD_AUDIT) or 2 (BUILD_ENFORCE)",
        ),
        (
            Hello {
                mode: 9,
                ..base.clone()
            },
            "hello.mode: 9, expected 0 (MODE_UNSPECIFIED), 1 (MODE_AUDIT) or 2 (MODE_ENFORCE)",
        ),
        (
            Hello {
                heartbeat_interval_ms: 10,
                ..base.clone()
            },
            "hello.heartbeat_interval_ms: 10, expected 0 (a filter that does not heartbeat) or 1000 to 3600000",
        ),
    ];
    for (hello, message) in cases {
        let status = refused_heartbeat(&server, hello, vec![]).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), message);
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(count(&db, "SELECT count(*) FROM sidecars"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM pods"), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_flood_is_refused_and_the_flood_not_stored() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    // Ten within a second are accepted, the eleventh is the flood.
    let beats = (1..=11).map(|n| heartbeat(counts(n, 0, 0), 0)).collect();
    let status = refused_heartbeat(&server, vm_hello(POD, "vm-1", "10.0.1.6", 1_000), beats).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "more than 10 heartbeats per second from this vm_instance (over all its streams); \
         expected one per heartbeat_interval_ms"
    );
    coverage_until(&server, "the accepted heartbeats stored", |c| {
        !c.sidecars.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(stored_counter(&db, "vm-1", "conn_match"), 10);
    let text = metrics(&server).await;
    assert_eq!(metric(&text, "dialguard_heartbeats_total"), Some(10.0));
    assert_eq!(
        metric(
            &text,
            r#"dialguard_streams_refused_total{reason="heartbeat_flood"}"#
        ),
        Some(1.0)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn new_vms_beyond_max_vms_are_refused() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        limits: Limits {
            max_vms: 1,
            ..Limits::default()
        },
        ..test_config(&db)
    })
    .await;
    heartbeat_stream(
        &server,
        vm_hello(POD, "vm-1", "10.0.1.6", 60_000),
        heartbeat(counts(1, 0, 0), 0),
    )
    .await;
    let status =
        refused_heartbeat(&server, vm_hello(POD, "vm-2", "10.0.1.6", 60_000), vec![]).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "the collector holds at most 1 sidecar VMs (--max-vms); this new vm_instance is refused"
    );
    // The known VM still reports.
    heartbeat_stream(
        &server,
        vm_hello(POD, "vm-1", "10.0.1.6", 60_000),
        heartbeat(counts(2, 0, 0), 0),
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coverage_and_counters_survive_a_collector_restart() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let hello = vm_hello(POD, "vm-1", "10.0.1.6", 60_000);
    heartbeat_stream(&server, hello.clone(), heartbeat(counts(5, 3, 0), 4)).await;
    // Stopped at once: the final flush writes what the last second changed.
    server.stop().await;

    let server = Server::start(&db).await;
    let text = metrics(&server).await;
    assert_eq!(
        metric(
            &text,
            r#"dialguard_sidecars{namespace="bookinfo",state="reporting"}"#
        ),
        Some(1.0),
        "loaded at startup: {text}"
    );
    let coverage: Coverage =
        serde_json::from_value(get_json(&server, "/api/v1/coverage").await).expect("coverage");
    let sidecar = &coverage.sidecars[0];
    assert_eq!(
        (
            sidecar.connections.matched,
            sidecar.connections.service,
            sidecar.delivery.dropped
        ),
        (5, 3, 4)
    );
    // The dropped events are a gap in the report too.
    let report = get_json(&server, "/api/v1/report").await;
    assert_eq!(report["droppedEvents"], json!(4));
    // The restarted collector still knows what this VM reported.
    let status = refused_heartbeat(&server, hello, vec![heartbeat(counts(4, 3, 0), 4)]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("heartbeat.connections.match: 4 is below 5"),
        "{status:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_only_said_hello_is_named_as_the_one_meant_to_be_reached() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    // The dialed pod never reports a connection: its hello at start is all.
    heartbeat_stream(
        &server,
        vm_hello("ratings-v1-5c8d-qwert", "vm-1", "10.0.2.7", 60_000),
        heartbeat(counts(0, 0, 0), 0),
    )
    .await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-9").await;
    assert_eq!(
        stream
            .send_acked(batch(vec![event(
                1,
                Verdict::Misrouted,
                DEST,
                Some(WRONG_POD)
            )]))
            .await,
        1
    );
    stream.close().await;
    let report = get_json(&server, "/api/v1/report").await;
    assert_eq!(report["rows"][0]["originalDestination"], json!(DEST));
    assert_eq!(
        report["rows"][0]["intended"]["pod"],
        json!("ratings-v1-5c8d-qwert")
    );
    server.stop().await;
}
