//! `serve --alertmanager`: misroutes pushed to a real Alertmanager (Debian's
//! `prometheus-alertmanager`, started by the test on loopback), checked
//! through Alertmanager's own API: the alert arrives even though
//! Alertmanager came up after the misroute, carries the documented labels
//! and annotations, stays while the misroute continues and resolves after
//! the quiet period.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use dialguard_collector::ServeConfig;
use dialguard_collector::alertmanager::AlertmanagerConfig;
use dialguard_proto::v1::{ConnectionEvent, Hello, SidecarMessage, Verdict, sidecar_message};
use serde_json::Value;

fn start_alertmanager(dir: &Path, addr: SocketAddr) -> Daemon {
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        "route: {receiver: nowhere, group_wait: 1s}\nreceivers: [{name: nowhere}]\n",
    )
    .expect("write alertmanager.yml");
    let storage = dir.join("alertmanager-data");
    Daemon::start(
        "/usr/bin/prometheus-alertmanager",
        "DIALGUARD_ALERTMANAGER",
        "prometheus-alertmanager",
        dir,
        addr,
        |addr| {
            vec![
                format!("--config.file={}", config.display()),
                format!("--storage.path={}", storage.display()),
                format!("--web.listen-address={addr}"),
                // A single instance: no gossip port.
                "--cluster.listen-address=".into(),
            ]
        },
    )
}

/// dialguard's alerts that Alertmanager holds as active (resolved ones are not listed).
async fn active_misroutes(alertmanager: &Daemon) -> Option<Vec<Value>> {
    let alerts = alertmanager.get_json("/api/v2/alerts").await?;
    Some(
        alerts
            .as_array()?
            .iter()
            .filter(|a| a["labels"]["alertname"] == "DialguardMisroute")
            .filter(|a| a["status"]["state"] == "active")
            .cloned()
            .collect(),
    )
}

async fn wait_for_alerts(
    alertmanager: &Daemon,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    for _ in 0..150 {
        if let Some(alerts) = active_misroutes(alertmanager).await {
            if done(&alerts) {
                return alerts;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "{what}: last seen {:#?}\nalertmanager log:\n{}",
        active_misroutes(alertmanager).await,
        alertmanager.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn misroutes_fire_in_alertmanager_and_resolve_when_quiet() {
    let (dir, db) = temp_db();
    let alertmanager_addr = free_addr();
    let server = Server::start_with(ServeConfig {
        alertmanager: Some(AlertmanagerConfig {
            url: format!("http://{alertmanager_addr}"),
            resend_every: Duration::from_secs(1),
            resolve_after: Duration::from_secs(4),
        }),
        ..test_config(&db)
    })
    .await;
    let mut client = server.client().await;

    // The pod that owns the dialed IP is known to the directory.
    let ratings = Hello {
        node_id: "sidecar~10.0.2.7~ratings-v1-5c6b-xyz12.bookinfo~bookinfo.svc.cluster.local"
            .into(),
        pod_name: "ratings-v1-5c6b-xyz12".into(),
        workload_name: "ratings-v1".into(),
        instance_ips: vec!["10.0.2.7".into()],
        ..hello(NODE, "ratings-vm")
    };
    let _ratings = ReportStream::open_with(
        &mut client,
        SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(ratings)),
        },
    )
    .await
    .expect("ratings stream");

    // The misroute happens while Alertmanager is still down: the push retries.
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(stream.send_acked(misrouted_batch(1..=3)).await, 3);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let alertmanager = start_alertmanager(dir.path(), alertmanager_addr);

    let alerts =
        wait_for_alerts(&alertmanager, "the misroute alert fires", |a| !a.is_empty()).await;
    assert_eq!(alerts.len(), 1, "one alert per key: {alerts:#?}");
    let alert = &alerts[0];
    let labels = &alert["labels"];
    assert_eq!(labels["source_workload"], "reviews-v1");
    assert_eq!(labels["source_namespace"], "bookinfo");
    assert_eq!(labels["destination_port"], "9080");
    assert_eq!(
        labels["cluster"],
        "outbound|9080||ratings.bookinfo.svc.cluster.local"
    );
    assert_eq!(labels["verdict"], "misrouted");
    assert_eq!(labels["cause"], "catch_all");
    assert_eq!(labels["severity"], "critical");
    let annotations = &alert["annotations"];
    assert_eq!(annotations["dialed"], DEST);
    assert_eq!(annotations["upstream"], WRONG_POD);
    assert_eq!(
        annotations["intended_workload"],
        "bookinfo/ratings-v1-5c6b-xyz12 (workload ratings-v1)"
    );
    assert_eq!(
        annotations["capturing_service"],
        "ratings.bookinfo.svc.cluster.local"
    );
    let fix = annotations["remediation"].as_str().unwrap_or_default();
    assert!(
        fix.contains("port 9080") && fix.contains("exportTo"),
        "remediation: {fix}"
    );
    let description = annotations["description"].as_str().unwrap_or_default();
    assert!(
        description.contains("catch-all listener `0.0.0.0_9080`"),
        "description: {description}"
    );
    assert_eq!(
        annotations["culprit"],
        "Service bookinfo/ratings: kubectl -n bookinfo get service ratings -o yaml"
    );

    // While the misroute continues, the alert stays (re-sent every second).
    for sequence in 4..=6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            stream
                .send_acked(misrouted_batch(sequence..=sequence))
                .await,
            sequence
        );
    }
    let still = active_misroutes(&alertmanager).await.unwrap_or_default();
    assert_eq!(
        still.len(),
        1,
        "still firing while it continues: {still:#?}"
    );

    // A policy block warns, with its own cause and words; a redirected
    // connection (not known to be a pod) pages nobody: it is not pushed.
    let blocked = ConnectionEvent {
        cluster_name: "BlackHoleCluster".into(),
        filter_chain_name: "virtualOutbound-catchall-tcp".into(),
        intended_service: String::new(),
        ..event(7, Verdict::Blackholed, "198.51.100.7:443", None)
    };
    let external = ConnectionEvent {
        cluster_name: "outbound|443||api.example.com".into(),
        ..event(
            8,
            Verdict::Redirected,
            "203.0.113.5:443",
            Some("203.0.113.6:443"),
        )
    };
    assert_eq!(stream.send_acked(batch(vec![blocked, external])).await, 8);
    let alerts = wait_for_alerts(&alertmanager, "the policy block warns", |a| {
        a.iter().any(|a| a["labels"]["verdict"] == "blackholed")
    })
    .await;
    let block = alerts
        .iter()
        .find(|a| a["labels"]["verdict"] == "blackholed")
        .expect("the blackholed alert");
    assert_eq!(block["labels"]["severity"], "warning");
    assert_eq!(block["labels"]["cause"], "policy_block");
    let description = block["annotations"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        description.contains("REGISTRY_ONLY") && !description.contains("0.0.0.0_"),
        "description: {description}"
    );
    assert!(
        alerts
            .iter()
            .all(|a| a["labels"]["verdict"] != "redirected"),
        "a redirected connection was pushed: {alerts:#?}"
    );

    // Quiet for longer than resolve_after: resolved.
    wait_for_alerts(&alertmanager, "the alert resolves", |a| a.is_empty()).await;

    drop((stream, client));
    server.stop().await;
}
