//! The field incident through real Envoy 1.40 with the built module and the
//! real collector: a Hazelcast-style member dialing its peer's pod IP is
//! captured by the catch-all listener an ExternalName Service created, and
//! dialguard reports it; legitimate traffic is not reported.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, ensure};
use dialguard_collector::report::{Report, ReportRow};
use dialguard_tests::client::Outcome;
use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;
use dialguard_tests::wait_for;

/// Envoy response flags: upstream connection failure, retry limit exceeded.
const UF: i64 = 0x20;
const URX: i64 = 0x8000;

fn wait_for_report(
    incident: &Incident,
    what: &str,
    done: impl Fn(&Report) -> bool,
) -> anyhow::Result<Report> {
    wait_for(Duration::from_secs(20), || {
        let report = incident.collector.report().ok()?;
        done(&report).then_some(report)
    })
    .with_context(|| format!("{what}; last report: {:?}", incident.collector.report()))
}

fn row<'a>(report: &'a Report, verdict: &str, dialed: &str) -> Option<&'a ReportRow> {
    report
        .rows
        .iter()
        .find(|r| r.verdict == verdict && r.original_destination == dialed)
}

#[test]
fn incident_is_detected_and_reported() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut incident = Incident::start(&dist, true)?;
    let l = incident.layout.clone();
    let peer = l.at(l.peer_pod);
    let idle = l.at(l.idle_pod);

    // The member dials its peer's pod IP; the catch-all sends it to `idle`.
    const MISROUTED_WHILE_IDLE_LISTENS: usize = 3;
    for _ in 0..MISROUTED_WHILE_IDLE_LISTENS {
        ensure!(
            incident.dial(peer)? == Outcome::Reached("idle".into()),
            "peer dial was not captured"
        );
    }
    // Dialing its own pod IP hits the catch-all's own-IP chain: BlackHoleCluster.
    ensure!(incident.dial(l.at(l.own_pod))? == Outcome::Closed);
    // Service VIPs are load-balanced to their pods: legitimate.
    let mut reached = BTreeSet::new();
    for _ in 0..6 {
        for vip in [l.manager_vip, l.app_vip] {
            match incident.dial(l.at(vip))? {
                Outcome::Reached(pod) => reached.insert(pod),
                Outcome::Closed => anyhow::bail!("VIP {vip} connection closed"),
            };
        }
    }
    ensure!(
        reached
            .iter()
            .all(|p| p.starts_with("manager") || p.starts_with("app-")),
        "{reached:?}"
    );
    // A port no listener covers: PassthroughCluster, exactly where it was dialed.
    for (i, ip) in l.app_pods.iter().enumerate() {
        let dialed = std::net::SocketAddr::new((*ip).into(), l.passthrough_port);
        ensure!(
            incident.dial(dialed)?
                == Outcome::Reached(format!("app-{i} (port {})", l.passthrough_port))
        );
    }

    let peer_text = peer.to_string();
    let own_text = l.at(l.own_pod).to_string();
    let report = wait_for_report(&incident, "misrouted and blackholed rows", |r| {
        row(r, "misrouted", &peer_text)
            .is_some_and(|x| x.count == MISROUTED_WHILE_IDLE_LISTENS as u64)
            && row(r, "blackholed", &own_text).is_some()
    })?;
    let misrouted = row(&report, "misrouted", &peer_text).context("misrouted row")?;
    assert_eq!(
        misrouted.upstream_host.as_deref(),
        Some(idle.to_string().as_str())
    );
    assert_eq!(misrouted.cluster, l.app_ext_cluster());
    assert_eq!(misrouted.source_workload, "manager");
    assert_eq!(misrouted.source_namespace, "manager");
    let blackholed = row(&report, "blackholed", &own_text).context("blackholed row")?;
    assert_eq!(blackholed.upstream_host, None);
    assert_eq!(blackholed.cluster, "BlackHoleCluster");
    assert_eq!(blackholed.count, 1);
    // VIP and passthrough traffic is never reported.
    assert_eq!(report.rows.len(), 2, "unexpected rows: {:#?}", report.rows);

    // As in the field report: nothing listens behind `idle`. Still reported.
    incident.stop_pod(idle);
    ensure!(
        incident.dial(peer)? == Outcome::Closed,
        "expected the upstream to fail"
    );
    let total = MISROUTED_WHILE_IDLE_LISTENS as u64 + 1;
    wait_for_report(&incident, "the failed misrouted connection", |r| {
        row(r, "misrouted", &peer_text).is_some_and(|x| x.count == total)
    })?;
    let db = rusqlite::Connection::open_with_flags(
        &incident.collector.db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let (events, failed): (i64, i64) = db.query_row(
        "SELECT count(*), sum(response_flags & ?1 = ?1) FROM events WHERE verdict = 'misrouted'",
        [UF | URX],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    assert_eq!(
        events as u64, total,
        "one stored event per misrouted connection"
    );
    assert_eq!(failed, 1, "the refused connection carries UF|URX");
    let intended: String = db.query_row(
        "SELECT intended_service FROM events WHERE verdict = 'misrouted' LIMIT 1",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(intended, "app-ext.app.svc.cluster.local");

    // One alert line per misrouted connection.
    let alerts: Vec<serde_json::Value> = wait_for(Duration::from_secs(5), || {
        let lines: Vec<String> = incident.collector.alerts.try_iter().collect();
        Some(lines)
    })
    .unwrap_or_default()
    .iter()
    .map(|line| serde_json::from_str(line))
    .collect::<Result<_, _>>()?;
    assert_eq!(alerts.len() as u64, total, "{alerts:#?}");
    assert!(
        alerts
            .iter()
            .all(|a| a["originalDestination"] == peer_text.as_str())
    );

    // Every verdict is counted in Envoy's stats, reported or not.
    let counters = incident.envoy.counters("dialguard")?;
    let count = |verdict: &str| {
        counters
            .iter()
            .filter(|(name, _)| name.ends_with(&format!("dialguard.connections.{verdict}")))
            .map(|(_, v)| *v)
            .sum::<u64>()
    };
    assert_eq!(count("misrouted"), total, "{counters:#?}");
    assert_eq!(count("blackholed"), 1, "{counters:#?}");
    assert_eq!(count("service"), 12, "{counters:#?}");
    assert_eq!(count("match"), 2, "{counters:#?}");
    // ... and reaches Prometheus named with the dialguard prefix.
    let prometheus =
        dialguard_tests::sidecar::admin_get(incident.envoy.admin, "/stats/prometheus")?;
    let line = format!("dialguard_connections_misrouted{{}} {total}");
    assert!(
        prometheus.lines().any(|l| l == line),
        "no `{line}` in /stats/prometheus"
    );
    Ok(())
}

/// The second shape that still happens on current Istio: a TCP ServiceEntry
/// with `resolution: DNS` and no `addresses` on a port pods also serve.
#[test]
fn dns_service_entry_catch_all_is_detected() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let incident = Incident::start(&dist, false)?;
    let l = incident.layout.clone();
    let app_pod = std::net::SocketAddr::new(l.app_pods[1].into(), l.dns_port);
    let mongo = std::net::SocketAddr::new(l.external_db.into(), l.dns_port);
    // The manager dials an app pod directly on that port: the catch-all sends it to mongo.
    for _ in 0..2 {
        ensure!(incident.dial(app_pod)? == Outcome::Reached("mongo (external)".into()));
    }
    // Dialing the external host's own address is not a difference at all.
    ensure!(incident.dial(mongo)? == Outcome::Reached("mongo (external)".into()));
    let dialed = app_pod.to_string();
    let report = wait_for_report(&incident, "the ServiceEntry capture", |r| {
        row(r, "misrouted", &dialed).is_some_and(|x| x.count == 2)
    })?;
    let captured = row(&report, "misrouted", &dialed).context("row")?;
    assert_eq!(captured.cluster, l.mongo_cluster());
    assert_eq!(
        captured.upstream_host.as_deref(),
        Some(mongo.to_string().as_str())
    );
    assert_eq!(report.rows.len(), 1, "{:#?}", report.rows);
    Ok(())
}
