//! What the collector concludes from events, end to end through real ingest:
//! a REDIRECTED dial to an address its pod directory knows is upgraded to
//! MISROUTED (stored, counted, alerted, reported); each event's cause is
//! stored once and reaches the report, the metrics and the alert line;
//! would-close and enforced counts and the source pods are summed exactly.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use dialguard_collector::finding::Cause;
use dialguard_collector::report::{self, Report, ReportRow};
use dialguard_collector::store::MAX_SOURCE_PODS;
use dialguard_proto::v1::{ConnectionEvent, Hello, SidecarMessage, Verdict, sidecar_message};

/// The ratings pod: its sidecar announces DEST's IP.
fn ratings() -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(Hello {
            node_id: "sidecar~10.0.2.7~ratings-v1-5c6b-xyz12.bookinfo~bookinfo.svc.cluster.local"
                .into(),
            pod_name: "ratings-v1-5c6b-xyz12".into(),
            workload_name: "ratings-v1".into(),
            instance_ips: vec!["10.0.2.7".into(), "fd00::2:7".into()],
            ..hello(NODE, "ratings-vm")
        })),
    }
}

/// A reviews pod (the default sidecar's workload) named `pod`.
fn reviews(pod: &str) -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(Hello {
            node_id: format!("sidecar~10.0.1.6~{pod}.bookinfo~bookinfo.svc.cluster.local"),
            pod_name: pod.into(),
            ..hello(NODE, &format!("{pod}-vm"))
        })),
    }
}

/// A REDIRECTED event (the filter has no podCidrs, so it was not certain).
fn redirected(sequence: u64, dest: &str, cluster: &str) -> ConnectionEvent {
    ConnectionEvent {
        cluster_name: cluster.into(),
        filter_chain_name: String::new(),
        intended_service: String::new(),
        ..event(sequence, Verdict::Redirected, dest, Some(WRONG_POD))
    }
}

fn blackholed(sequence: u64, dest: &str, chain: &str) -> ConnectionEvent {
    ConnectionEvent {
        cluster_name: "BlackHoleCluster".into(),
        filter_chain_name: chain.into(),
        intended_service: String::new(),
        upstream_workload: String::new(),
        ..event(sequence, Verdict::Blackholed, dest, None)
    }
}

const EXTERNAL: &str = "203.0.113.5:443";
const EXTERNAL_CLUSTER: &str = "outbound|443||api.example.com";
const BLOCKED: &str = "198.51.100.7:443";
const OWN_IP: &str = "10.0.1.6:9080";
const RATINGS_CLUSTER: &str = "outbound|9080||ratings.bookinfo.svc.cluster.local";
/// A misroute the filter was certain of, to another pod than DEST.
const OTHER_POD: &str = "10.0.2.8:9080";

/// Every kind of event, in one batch: sequences 1..=7.
fn mixed_batch() -> SidecarMessage {
    batch(vec![
        redirected(1, EXTERNAL, EXTERNAL_CLUSTER),
        blackholed(2, BLOCKED, "virtualOutbound-catchall-tcp"),
        blackholed(3, OWN_IP, ""),
        // DEST is the ratings pod: the directory makes this a misroute.
        redirected(4, DEST, RATINGS_CLUSTER),
        redirected(5, "[fd00::2:7]:9080", RATINGS_CLUSTER),
        ConnectionEvent {
            enforced: true,
            judged_open: true,
            ..event(6, Verdict::Misrouted, OTHER_POD, Some(WRONG_POD))
        },
        event(7, Verdict::Misrouted, OTHER_POD, Some(WRONG_POD)),
    ])
}

fn row<'a>(report: &'a Report, dialed: &str) -> &'a ReportRow {
    report
        .rows
        .iter()
        .find(|r| r.original_destination == dialed)
        .unwrap_or_else(|| panic!("no row dialing {dialed}: {report:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn verdicts_are_upgraded_and_causes_reach_the_report_and_the_metrics() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let _ratings = ReportStream::open_with(&mut client, ratings())
        .await
        .expect("ratings stream");
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(stream.send_acked(mixed_batch()).await, 7);

    let report = report::query(&read_only(&db)).expect("report");
    let expect = |dialed: &str, verdict: &str, cause: Cause, count, would_close, enforced| {
        let r = row(&report, dialed);
        assert_eq!(
            (
                r.verdict.as_str(),
                r.cause,
                r.count,
                r.would_close,
                r.enforced
            ),
            (verdict, cause, count, would_close, enforced),
            "{r:#?}"
        );
        assert_eq!(r.source_pods, ["reviews-v1-7d9f-abcde"], "{r:#?}");
        assert!(!r.cause_text.is_empty() && !r.fix.is_empty(), "{r:#?}");
        r
    };
    let upgraded = expect(DEST, "misrouted", Cause::CatchAll, 1, 0, 0);
    assert!(upgraded.intended.is_some(), "the directory names the pod");
    let culprit = upgraded.culprit.as_ref().expect("culprit");
    assert_eq!(
        (
            culprit.kind.as_str(),
            culprit.namespace.as_str(),
            culprit.name.as_str()
        ),
        ("Service", "bookinfo", "ratings")
    );
    expect("[fd00::2:7]:9080", "misrouted", Cause::CatchAll, 1, 0, 0);
    let certain = expect(OTHER_POD, "misrouted", Cause::CatchAll, 2, 2, 1);
    assert!(
        certain.cause_text.contains("`0.0.0.0_9080`"),
        "{}",
        certain.cause_text
    );
    let external = expect(EXTERNAL, "redirected", Cause::DnsRedirection, 1, 0, 0);
    assert!(
        external.fix.contains(EXTERNAL_CLUSTER),
        "the allow rule names the cluster: {}",
        external.fix
    );
    let blocked = expect(BLOCKED, "blackholed", Cause::PolicyBlock, 1, 0, 0);
    assert!(
        !blocked.cause_text.contains("0.0.0.0_") && blocked.cause_text.contains("REGISTRY_ONLY"),
        "a policy block is no catch-all capture: {}",
        blocked.cause_text
    );
    assert_eq!(
        blocked
            .culprit
            .as_ref()
            .map(|c| (c.kind.as_str(), c.namespace.as_str())),
        Some(("Sidecar", "bookinfo"))
    );
    expect(OWN_IP, "blackholed", Cause::OwnPodIp, 1, 0, 0);
    // Worst first: every misrouted row before the others.
    let verdicts: Vec<&str> = report.rows.iter().map(|r| r.verdict.as_str()).collect();
    assert_eq!(verdicts[..3], ["misrouted"; 3], "{verdicts:?}");

    // The raw rows carry the cause, the upgraded verdict and the flags as sent.
    let stored = |sequence: u64| -> (String, String, bool, bool) {
        read_only(&db)
            .query_row(
                "SELECT e.verdict, e.cause, e.would_close, e.judged_open FROM events e
                 JOIN sidecars s ON s.id = e.sidecar_id
                 WHERE s.vm_instance = 'vm-1' AND e.sequence = ?1",
                [sequence as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .expect("stored event")
    };
    assert_eq!(
        stored(1),
        ("redirected".into(), "dns_redirection".into(), false, false)
    );
    assert_eq!(
        stored(2),
        ("blackholed".into(), "policy_block".into(), false, false)
    );
    assert_eq!(
        stored(4),
        ("misrouted".into(), "catch_all".into(), false, false)
    );
    assert_eq!(
        stored(6),
        ("misrouted".into(), "catch_all".into(), true, true)
    );

    // The metrics count the upgraded verdict, with its cause.
    let (status, _, metrics) = http_get(server.http, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"dialguard_misrouted_connections_total{source_namespace="bookinfo",verdict="misrouted",port="9080",cause="catch_all"} 4"#,
        r#"dialguard_misrouted_connections_total{source_namespace="bookinfo",verdict="redirected",port="443",cause="dns_redirection"} 1"#,
        r#"dialguard_misrouted_connections_total{source_namespace="bookinfo",verdict="blackholed",port="443",cause="policy_block"} 1"#,
        r#"dialguard_misrouted_connections_total{source_namespace="bookinfo",verdict="blackholed",port="9080",cause="own_pod_ip"} 1"#,
        r#"dialguard_would_close_connections_total{source_namespace="bookinfo"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }

    drop(stream);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn source_pods_are_distinct_and_bounded() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    // More pods than a row keeps, each reporting the same misroute twice
    // (two commits), and the first pod again at the end.
    let pods: Vec<String> = (0..MAX_SOURCE_PODS + 2)
        .map(|n| format!("reviews-v1-7d9f-{n:02}"))
        .chain(["reviews-v1-7d9f-00".to_string()])
        .collect();
    for (index, pod) in pods.iter().enumerate() {
        let mut stream = ReportStream::open_with(&mut client, reviews(pod))
            .await
            .expect("stream");
        let base = if index > MAX_SOURCE_PODS + 1 { 10 } else { 0 };
        assert_eq!(
            stream
                .send_acked(misrouted_batch(base + 1..=base + 1))
                .await,
            base + 1
        );
        assert_eq!(
            stream
                .send_acked(misrouted_batch(base + 2..=base + 2))
                .await,
            base + 2
        );
    }
    let report = report::query(&read_only(&db)).expect("report");
    assert_eq!(report.rows.len(), 1, "{report:#?}");
    let row = &report.rows[0];
    assert_eq!(row.count, 2 * pods.len() as u64);
    assert_eq!(row.would_close, row.count);
    let expected: Vec<String> = pods[..MAX_SOURCE_PODS].to_vec();
    assert_eq!(row.source_pods, expected);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_misroutes_print_an_alert_line_and_it_states_the_cause() {
    let (_dir, db) = temp_db();
    let (mut process, stderr) =
        ServeProcess::start_with_stdout(&db, &["--alert-interval", "0s"], Stdio::piped());
    // Keep draining stderr so the collector never blocks on it.
    std::thread::spawn(move || for _ in stderr.lines() {});
    let stdout = process.child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut client = client(process.grpc).await;
    let _ratings = ReportStream::open_with(&mut client, ratings())
        .await
        .expect("ratings stream");
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(stream.send_acked(mixed_batch()).await, 7);
    // A last misroute: once its line is out, every earlier one is too.
    let last = ConnectionEvent {
        original_destination: Some(addr("10.0.2.9:9080")),
        ..misrouted(8)
    };
    assert_eq!(stream.send_acked(batch(vec![last])).await, 8);

    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no alert line for the last misroute; got {lines:#?}"));
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}"));
        let done = value["originalDestination"] == "10.0.2.9:9080";
        lines.push(value);
        if done {
            break;
        }
    }
    let dialed: Vec<&str> = lines
        .iter()
        .map(|l| l["originalDestination"].as_str().unwrap_or_default())
        .collect();
    // Sequences 4, 5 (upgraded), 6, 7 (certain) and 8; never 1, 2 or 3.
    assert_eq!(
        dialed,
        [
            DEST,
            "[fd00::2:7]:9080",
            OTHER_POD,
            OTHER_POD,
            "10.0.2.9:9080"
        ],
        "{lines:#?}"
    );
    for line in &lines {
        assert_eq!(line["alert"], "DialguardMisroute");
        assert_eq!(line["cause"], "catch_all", "{line:#}");
        let text = line["causeText"].as_str().unwrap_or_default();
        assert!(text.contains("`0.0.0.0_9080`"), "{line:#}");
        let fix = line["fix"].as_str().unwrap_or_default();
        assert!(fix.contains("exportTo"), "{line:#}");
    }
    // The filter was not certain of the upgraded ones.
    let would_close: Vec<bool> = lines
        .iter()
        .map(|l| l["wouldClose"].as_bool().expect("wouldClose"))
        .collect();
    assert_eq!(would_close, [false, false, true, true, true]);
    // Nothing else came.
    std::thread::sleep(Duration::from_millis(300));
    assert!(rx.try_recv().is_err(), "an unexpected alert line");
    drop((stream, client));
}
