//! The field incident's checks, written once for every [`Wiring`] of the
//! manager pod: on loopback with a PROXY header standing in for iptables
//! ([`crate::incident::Loopback`]) and in network namespaces with
//! istio-iptables' rules ([`crate::netns::PodNetwork`]). The same
//! connections must give the same report rows, stored events, alerts and
//! Envoy counters, whatever delivers them to the sidecar.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use dialguard_collector::report::{Report, ReportRow};

use crate::client::Outcome;
use crate::collector::Collector;
use crate::incident::{Incident, Wiring};
use crate::wait_for;

/// Envoy response flags: upstream connection failure, retry limit exceeded.
const UF: i64 = 0x20;
const URX: i64 = 0x8000;

/// Waits up to 20 s for a report that satisfies `done`.
pub fn wait_for_report(
    collector: &Collector,
    what: &str,
    done: impl Fn(&Report) -> bool,
) -> anyhow::Result<Report> {
    wait_for(Duration::from_secs(20), || {
        let report = collector.report().ok()?;
        done(&report).then_some(report)
    })
    .with_context(|| format!("{what}; last report: {:?}", collector.report()))
}

/// The report row for `verdict` and the dialed address `dialed`.
pub fn row<'a>(report: &'a Report, verdict: &str, dialed: &str) -> Option<&'a ReportRow> {
    report
        .rows
        .iter()
        .find(|r| r.verdict == verdict && r.original_destination == dialed)
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> anyhow::Result<()> {
    ensure!(got == want, "{what}: got {got:?}, want {want:?}");
    Ok(())
}

fn connections<W: Wiring>(incident: &Incident<W>, addr: SocketAddr) -> anyhow::Result<usize> {
    Ok(incident
        .pod(addr)
        .with_context(|| format!("no pod server on {addr}"))?
        .connections())
}

/// The incident: a Hazelcast-style member dialing its peer's pod IP is
/// captured by the catch-all listener an ExternalName Service created and
/// reported; blackholed traffic is reported; VIP and passthrough traffic is not.
pub fn incident_is_detected<W: Wiring>(incident: &mut Incident<W>) -> anyhow::Result<()> {
    let l = incident.layout.clone();
    let peer = l.at(l.peer_pod);
    let idle = l.at(l.idle_pod);

    // The member dials its peer's pod IP; the catch-all sends it to `idle`.
    const MISROUTED_WHILE_IDLE_LISTENS: usize = 3;
    for _ in 0..MISROUTED_WHILE_IDLE_LISTENS {
        expect_eq(
            "the peer dial, captured",
            incident.dial(peer)?,
            Outcome::Reached("idle".into()),
        )?;
    }
    // The servers agree: the peer never saw a connection, idle saw them all.
    expect_eq("connections at the peer", connections(incident, peer)?, 0)?;
    expect_eq(
        "connections at idle",
        connections(incident, idle)?,
        MISROUTED_WHILE_IDLE_LISTENS,
    )?;
    // BlackHoleCluster: no upstream at all.
    let blackholed = incident.blackholed_destination();
    expect_eq(
        "the blackholed dial",
        incident.dial(blackholed)?,
        Outcome::Closed,
    )?;
    // Service VIPs are load-balanced to their pods: legitimate.
    let mut reached = BTreeSet::new();
    for _ in 0..6 {
        for vip in [l.manager_vip, l.app_vip] {
            match incident.dial(l.at(vip))? {
                Outcome::Reached(server) => reached.insert(server),
                Outcome::Closed => bail!("VIP {vip} connection closed"),
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
        let dialed = SocketAddr::new((*ip).into(), l.passthrough_port);
        expect_eq(
            "the passthrough dial",
            incident.dial(dialed)?,
            Outcome::Reached(format!("app-{i} (port {})", l.passthrough_port)),
        )?;
    }

    let collector = &incident.collector;
    let peer_text = peer.to_string();
    let blackholed_text = blackholed.to_string();
    let report = wait_for_report(collector, "misrouted and blackholed rows", |r| {
        row(r, "misrouted", &peer_text)
            .is_some_and(|x| x.count == MISROUTED_WHILE_IDLE_LISTENS as u64)
            && row(r, "blackholed", &blackholed_text).is_some()
    })?;
    let misrouted = row(&report, "misrouted", &peer_text).context("misrouted row")?;
    expect_eq(
        "misrouted upstream",
        misrouted.upstream_host.as_deref(),
        Some(idle.to_string().as_str()),
    )?;
    expect_eq(
        "misrouted cluster",
        &misrouted.cluster,
        &l.app_ext_cluster(),
    )?;
    expect_eq(
        "source workload",
        misrouted.source_workload.as_str(),
        "manager",
    )?;
    expect_eq(
        "source namespace",
        misrouted.source_namespace.as_str(),
        "manager",
    )?;
    let black = row(&report, "blackholed", &blackholed_text).context("blackholed row")?;
    expect_eq("blackholed upstream", black.upstream_host.as_deref(), None)?;
    expect_eq(
        "blackholed cluster",
        black.cluster.as_str(),
        "BlackHoleCluster",
    )?;
    expect_eq("blackholed count", black.count, 1)?;
    // VIP and passthrough traffic is never reported.
    ensure!(
        report.rows.len() == 2,
        "unexpected rows: {:#?}",
        report.rows
    );

    // As in the field report: nothing listens behind `idle`. Still reported.
    incident.stop_pod(idle);
    expect_eq(
        "the peer dial with idle gone (the upstream fails)",
        incident.dial(peer)?,
        Outcome::Closed,
    )?;
    let collector = &incident.collector;
    let total = MISROUTED_WHILE_IDLE_LISTENS as u64 + 1;
    wait_for_report(collector, "the failed misrouted connection", |r| {
        row(r, "misrouted", &peer_text).is_some_and(|x| x.count == total)
    })?;
    let db = rusqlite::Connection::open_with_flags(
        &collector.db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let (events, failed): (i64, i64) = db.query_row(
        "SELECT count(*), sum(response_flags & ?1 = ?1) FROM events WHERE verdict = 'misrouted'",
        [UF | URX],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    expect_eq(
        "stored misrouted events (one per connection)",
        events as u64,
        total,
    )?;
    expect_eq("events of refused connections, carrying UF|URX", failed, 1)?;
    let intended: String = db.query_row(
        "SELECT intended_service FROM events WHERE verdict = 'misrouted' LIMIT 1",
        [],
        |r| r.get(0),
    )?;
    expect_eq(
        "intended service",
        intended.as_str(),
        "app-ext.app.svc.cluster.local",
    )?;

    // One alert line per misrouted connection.
    let alerts: Vec<serde_json::Value> = wait_for(Duration::from_secs(5), || {
        let lines: Vec<String> = collector.alerts.try_iter().collect();
        Some(lines)
    })
    .unwrap_or_default()
    .iter()
    .map(|line| serde_json::from_str(line))
    .collect::<Result<_, _>>()?;
    ensure!(alerts.len() as u64 == total, "{alerts:#?}");
    ensure!(
        alerts
            .iter()
            .all(|a| a["originalDestination"] == peer_text.as_str()),
        "{alerts:#?}"
    );

    // Every verdict is counted in Envoy's stats, reported or not.
    let counters = crate::sidecar::stats_from(
        &incident.envoy_admin(&crate::sidecar::stats_path("dialguard"))?,
    )?;
    let count = |verdict: &str| {
        counters
            .iter()
            .filter(|(name, _)| name.ends_with(&format!("dialguard.connections.{verdict}")))
            .map(|(_, v)| *v)
            .sum::<u64>()
    };
    for (verdict, want) in [
        ("misrouted", total),
        ("blackholed", 1),
        ("service", 12),
        ("match", 2),
    ] {
        ensure!(count(verdict) == want, "{verdict} != {want}: {counters:#?}");
    }
    // ... and reaches Prometheus named with the dialguard prefix.
    let prometheus = incident.envoy_admin("/stats/prometheus")?;
    let line = format!("dialguard_connections_misrouted{{}} {total}");
    ensure!(
        prometheus.lines().any(|l| l == line),
        "no `{line}` in /stats/prometheus"
    );
    Ok(())
}

/// The second shape that still happens on current Istio: a TCP ServiceEntry
/// with `resolution: DNS` and no `addresses` on a port pods also serve.
pub fn dns_service_entry_is_detected<W: Wiring>(incident: &Incident<W>) -> anyhow::Result<()> {
    let l = incident.layout.clone();
    let app_pod = SocketAddr::new(l.app_pods[1].into(), l.dns_port);
    let mongo = SocketAddr::new(l.external_db.into(), l.dns_port);
    let captured_by_mongo = Outcome::Reached("mongo (external)".into());
    // The manager dials an app pod directly on that port: the catch-all sends it to mongo.
    for _ in 0..2 {
        expect_eq(
            "the app pod dial",
            incident.dial(app_pod)?,
            captured_by_mongo.clone(),
        )?;
    }
    expect_eq(
        "connections at the app pod",
        connections(incident, app_pod)?,
        0,
    )?;
    // Dialing the external host's own address is not a difference at all.
    expect_eq("the mongo dial", incident.dial(mongo)?, captured_by_mongo)?;
    let dialed = app_pod.to_string();
    let report = wait_for_report(&incident.collector, "the ServiceEntry capture", |r| {
        row(r, "misrouted", &dialed).is_some_and(|x| x.count == 2)
    })?;
    let captured = row(&report, "misrouted", &dialed).context("row")?;
    expect_eq("cluster", &captured.cluster, &l.mongo_cluster())?;
    expect_eq(
        "upstream",
        captured.upstream_host.as_deref(),
        Some(mongo.to_string().as_str()),
    )?;
    ensure!(report.rows.len() == 1, "{:#?}", report.rows);
    Ok(())
}
