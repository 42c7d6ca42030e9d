//! `/metrics` scraped by a real Prometheus (Debian's `prometheus`, started by
//! the test on loopback) that also loads the shipped alerting rules
//! (`deploy/prometheus/dialguard-rules.yaml`) and evaluates every query of the
//! shipped Grafana dashboard (`deploy/grafana/dialguard-dashboard.json`).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use dialguard_proto::v1::SocketAddress;
use serde_json::Value;

/// Prometheus itself, scraping the collector every second.
struct Prometheus(Daemon);

impl Prometheus {
    fn start(dir: &Path, collector_http: SocketAddr) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{rules:?}]\n\
                 scrape_configs:\n\
                 - job_name: dialguard\n  static_configs: [{{targets: ['{collector_http}']}}]\n",
                rules = repo_file("deploy/prometheus/dialguard-rules.yaml"),
            ),
        )
        .expect("write prometheus.yml");
        let data = dir.join("data");
        Self(Daemon::start(
            "/usr/bin/prometheus",
            "DIALGUARD_PROMETHEUS",
            "prometheus",
            dir,
            free_addr(),
            |addr| {
                vec![
                    format!("--config.file={}", config.display()),
                    format!("--storage.tsdb.path={}", data.display()),
                    format!("--web.listen-address={addr}"),
                ]
            },
        ))
    }

    /// The API's `data` for a GET, or None while Prometheus is not ready.
    async fn api(&self, path: &str) -> Option<Value> {
        let value = self.0.get_json(path).await?;
        (value["status"] == "success").then(|| value["data"].clone())
    }

    /// The value of an instant query's first sample, if any.
    async fn query(&self, promql: &str) -> Option<f64> {
        let encoded: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let data = self.api(&format!("/api/v1/query?query={encoded}")).await?;
        data["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// The alerts firing now (empty while Prometheus is not ready).
    async fn firing(&self) -> Vec<Value> {
        self.api("/api/v1/alerts")
            .await
            .and_then(|a| a["alerts"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a["state"] == "firing")
            .collect()
    }

    /// Polls until `promql` yields `want` (bounded: 60 s).
    async fn wait_for_value(&self, promql: &str, want: f64) {
        for _ in 0..300 {
            if self.query(promql).await == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "{promql} never became {want} (last: {:?}); prometheus log:\n{}",
            self.query(promql).await,
            self.0.output()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_metrics_and_the_shipped_rules_fire() {
    let (dir, db) = temp_db();
    let server = Server::start(&db).await;
    let prometheus = Prometheus::start(dir.path(), server.http);
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;

    // One misroute: its series appears with it, so increase() alone (two
    // samples needed) would never see it; the shipped rule must fire anyway.
    assert_eq!(stream.send_acked(misrouted_batch(1..=1)).await, 1);
    let misrouted_9080 = r#"sum(dialguard_misrouted_connections_total{verdict="misrouted",port="9080",cause="catch_all"})"#;
    prometheus.wait_for_value(misrouted_9080, 1.0).await;
    let mut first = None;
    for _ in 0..300 {
        first = prometheus
            .firing()
            .await
            .into_iter()
            .find(|a| a["labels"]["alertname"] == "DialguardMisrouteDetected");
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first = first.unwrap_or_else(|| {
        panic!(
            "the first misroute of a new series never fired DialguardMisrouteDetected; log:\n{}",
            prometheus.0.output()
        )
    });
    assert_eq!(first["labels"]["cause"], "catch_all", "{first:#}");
    assert_eq!(first["labels"]["port"], "9080", "{first:#}");
    let description = first["annotations"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        description.contains("catch-all listener 0.0.0.0_9080"),
        "{description}"
    );

    // The VM reconnects: two more, one resend, one invalid event.
    stream.close().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    let mut bad = misrouted(5);
    bad.original_destination = Some(SocketAddress {
        ip: "nope".into(),
        port: 9080,
    });
    assert_eq!(
        stream
            .send_acked(batch(vec![misrouted(1), misrouted(2), misrouted(3), bad]))
            .await,
        5
    );
    prometheus.wait_for_value(misrouted_9080, 3.0).await;
    prometheus
        .wait_for_value("dialguard_events_received_total", 5.0)
        .await;
    prometheus
        .wait_for_value("dialguard_events_stored_total", 3.0)
        .await;
    prometheus
        .wait_for_value("dialguard_events_duplicate_total", 1.0)
        .await;
    prometheus
        .wait_for_value(
            r#"dialguard_events_rejected_total{reason="original_destination"}"#,
            1.0,
        )
        .await;
    prometheus
        .wait_for_value("dialguard_streams_connected", 1.0)
        .await;
    // The filter was certain of all three: enforce mode would close them.
    prometheus
        .wait_for_value(
            r#"dialguard_would_close_connections_total{source_namespace="bookinfo"}"#,
            3.0,
        )
        .await;
    prometheus
        .wait_for_value("sum(dialguard_commit_duration_seconds_count) > bool 0", 1.0)
        .await;

    // The shipped rules load and the misroute alert fires.
    let mut firing = Vec::new();
    for _ in 0..300 {
        firing = prometheus
            .firing()
            .await
            .into_iter()
            .map(|a| {
                a["labels"]["alertname"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        if firing.iter().any(|a| a == "DialguardMisrouteDetected")
            && firing.iter().any(|a| a == "DialguardEventsLost")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        firing.iter().any(|a| a == "DialguardMisrouteDetected"),
        "firing: {firing:?}"
    );
    assert!(
        firing.iter().any(|a| a == "DialguardEventsLost"),
        "firing: {firing:?}"
    );
    let rules = prometheus.api("/api/v1/rules").await.expect("rules");
    let unhealthy: Vec<&Value> = rules["groups"][0]["rules"]
        .as_array()
        .expect("rules listed")
        .iter()
        .filter(|r| r["health"] != "ok")
        .collect();
    assert!(unhealthy.is_empty(), "{unhealthy:#?}");

    // Every query of the shipped dashboard is valid PromQL over these metrics.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/dialguard-dashboard.json"))
            .expect("dashboard file"),
    )
    .expect("dashboard is JSON");
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let encoded: String = url::form_urlencoded::byte_serialize(expr.as_bytes()).collect();
            let data = prometheus
                .api(&format!("/api/v1/query?query={encoded}"))
                .await;
            assert!(data.is_some(), "panel {:?}: {expr} failed", panel["title"]);
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} dashboard queries");
    // Coverage has its panels: silence must be told apart from not running.
    let exprs = dashboard["panels"].to_string();
    for metric in [
        "dialguard_sidecars",
        "dialguard_namespace_uncovered",
        "dialguard_judged_connections_total",
        "dialguard_heartbeats_total",
    ] {
        assert!(exprs.contains(metric), "no dashboard panel shows {metric}");
    }
    let stat = r#"sum(increase(dialguard_misrouted_connections_total{verdict="misrouted"}[1h]))"#;
    assert!(prometheus.query(stat).await.unwrap_or(0.0) > 0.0);

    drop((stream, client));
    server.stop().await;
}
