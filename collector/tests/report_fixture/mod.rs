//! A database filled through the real ingest (the in-process collector and
//! the generated client) with rows of every verdict, two source namespaces,
//! several ports (IPv6 included), times relative to now, and names a sidecar
//! could send to break an HTML page. Shared by report_cli.rs and
//! html_report.rs; also the `dialguard report` runner they use.

#![allow(dead_code)]

use std::path::Path;
use std::process::Output;

use dialguard_collector::time::now_unix_nanos;
use dialguard_proto::v1::{
    ConnectionEvent, EventBatch, Hello, SidecarMessage, Verdict, sidecar_message,
};

use crate::common::{ReportStream, Server, addr, bounded};

pub const HOUR_NS: u64 = 3_600_000_000_000;

/// A source workload's name that would become markup if not escaped.
pub const HOSTILE_WORKLOAD: &str = "<img src=x onerror=alert(1)>\"app'&";
/// A cluster name that would end a `<script>` block if not escaped.
pub const HOSTILE_CLUSTER: &str = "outbound|8080||</script><script>alert(2)</script>.svc";

/// What the fixture holds; times are `base_ns` + hours.
#[derive(Debug, Clone, Copy)]
pub struct Fixture {
    /// Ten hours before the fixture was filled.
    pub base_ns: u64,
}

impl Fixture {
    pub fn at_hour(&self, hours: f64) -> u64 {
        self.base_ns + (hours * HOUR_NS as f64) as u64
    }
}

fn sidecar(pod: &str, namespace: &str, workload: &str, ip: &str) -> Hello {
    Hello {
        node_id: format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"),
        vm_instance: "vm-1".into(),
        pod_name: pod.into(),
        namespace: namespace.into(),
        workload_name: workload.into(),
        instance_ips: vec![ip.into()],
        cluster_id: "Kubernetes".into(),
        istio_version: "1.24.0".into(),
        filter_version: "test".into(),
        ..Default::default()
    }
}

struct Spec<'a> {
    verdict: Verdict,
    dialed: &'a str,
    reached: Option<&'a str>,
    cluster: &'a str,
    capturing_service: &'a str,
    upstream_workload: &'a str,
}

fn event(sequence: u64, at_ns: u64, spec: &Spec) -> ConnectionEvent {
    ConnectionEvent {
        sequence,
        timestamp_unix_nanos: at_ns,
        original_destination: Some(addr(spec.dialed)),
        upstream_host: spec.reached.map(addr),
        source: Some(addr("10.0.1.6:40000")),
        connection_id: 1000 + sequence,
        cluster_name: spec.cluster.into(),
        filter_chain_name: "0.0.0.0_5701".into(),
        verdict: spec.verdict as i32,
        response_flags: 0,
        upstream_transport_failure_reason: String::new(),
        intended_service: spec.capturing_service.into(),
        upstream_workload: spec.upstream_workload.into(),
        enforced: false,
        would_close: spec.verdict == Verdict::Misrouted,
        judged_open: false,
    }
}

fn batch(events: Vec<ConnectionEvent>, dropped_total: u64) -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Batch(EventBatch {
            events,
            dropped_total,
        })),
    }
}

/// Rows (hours after `base_ns`):
///
/// | # | source | verdict | dialed → reached | connections at |
/// | 1 | manager/manager | misrouted | 10.0.2.4:5701 → 10.0.9.9:5701 | 0, 0, 5 |
/// | 2 | manager/manager | blackholed | 10.0.1.6:5701 → none | 1 |
/// | 3 | manager/manager | redirected | 203.0.113.5:443 → 10.0.9.10:443 | 6 |
/// | 4 | app/HOSTILE | misrouted | 10.0.1.6:8080 → 10.0.9.11:8080 via HOSTILE_CLUSTER | 7, 7 |
/// | 5 | app/HOSTILE | blackholed | [fd00::5]:9090 → none | 8 |
///
/// Each sidecar announces its pod IP (manager-0 10.0.1.6, app-0 10.0.2.4)
/// before its batch is acknowledged, so rows 1 and 4 name the pod they meant
/// to reach. The app sidecar also reports 4 dropped events.
pub async fn fill(server: &Server) -> Fixture {
    let base_ns = now_unix_nanos() - 10 * HOUR_NS;
    let fixture = Fixture { base_ns };
    let mut client = server.client().await;

    let catch_all = Spec {
        verdict: Verdict::Misrouted,
        dialed: "10.0.2.4:5701",
        reached: Some("10.0.9.9:5701"),
        cluster: "outbound|5701||app-ext.app.svc.cluster.local",
        capturing_service: "app-ext.app.svc.cluster.local",
        upstream_workload: "idle;manager;idle;latest;Kubernetes",
    };
    let own_ip = Spec {
        verdict: Verdict::Blackholed,
        dialed: "10.0.1.6:5701",
        reached: None,
        cluster: "BlackHoleCluster",
        capturing_service: "",
        upstream_workload: "",
    };
    let external = Spec {
        verdict: Verdict::Redirected,
        dialed: "203.0.113.5:443",
        reached: Some("10.0.9.10:443"),
        cluster: "outbound|443||ext.example.com",
        capturing_service: "ext.example.com",
        upstream_workload: "",
    };
    let hostile = Spec {
        verdict: Verdict::Misrouted,
        dialed: "10.0.1.6:8080",
        reached: Some("10.0.9.11:8080"),
        cluster: HOSTILE_CLUSTER,
        capturing_service: "<b>svc</b>",
        upstream_workload: "x\"y;app;x;v1;Kubernetes",
    };
    let ipv6 = Spec {
        verdict: Verdict::Blackholed,
        dialed: "[fd00::5]:9090",
        reached: None,
        cluster: "BlackHoleCluster",
        capturing_service: "",
        upstream_workload: "",
    };

    let manager = sidecar("manager-0", "manager", "manager", "10.0.1.6");
    let mut manager_stream = ReportStream::open_with(
        &mut client,
        SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(manager)),
        },
    )
    .await
    .expect("manager stream");
    let h = |hours: f64| fixture.at_hour(hours);
    manager_stream
        .send_acked(batch(
            vec![
                event(1, h(0.0), &catch_all),
                event(2, h(0.0) + 1_000_000, &catch_all),
                event(3, h(1.0), &own_ip),
                event(4, h(5.0), &catch_all),
                event(5, h(6.0), &external),
            ],
            0,
        ))
        .await;

    let app = sidecar("app-0", "app", HOSTILE_WORKLOAD, "10.0.2.4");
    let mut app_stream = ReportStream::open_with(
        &mut client,
        SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(app)),
        },
    )
    .await
    .expect("app stream");
    app_stream
        .send_acked(batch(
            vec![
                event(1, h(7.0), &hostile),
                event(2, h(7.0) + 1_000_000, &hostile),
                event(3, h(8.0), &ipv6),
            ],
            4,
        ))
        .await;
    // Both sidecars disconnect, and the collector records it in the
    // directory, before any report is made: reports made one after another
    // then see the same directory.
    manager_stream.close().await;
    app_stream.close().await;
    // The inventory (the coverage's last-seen times) is written at most a
    // second after the streams end: reports compared with one another must
    // all come after that.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    fixture
}

/// `dialguard report ARGS`, bounded; the output whatever the exit status.
pub async fn dialguard_report(args: &[&str]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .arg("report")
        .args(args)
        .kill_on_drop(true)
        .output();
    bounded("dialguard report", child)
        .await
        .unwrap_or_else(|err| panic!("running dialguard report {args:?}: {err}"))
}

/// `dialguard report --db DB ARGS` that must succeed: its stdout.
pub async fn report_ok(db: &Path, args: &[&str]) -> String {
    let db = db.to_str().expect("UTF-8 path");
    let mut all = vec!["--db", db];
    all.extend_from_slice(args);
    let out = dialguard_report(&all).await;
    assert!(
        out.status.success(),
        "dialguard report {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}
