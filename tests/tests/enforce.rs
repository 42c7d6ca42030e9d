//! Enforce mode through real Envoy: a misrouted connection is closed at its
//! first data, before any application byte reaches the wrong server or the
//! client; legitimate traffic is untouched; the event says it was enforced.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use dialguard_tests::client::Outcome;
use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;
use dialguard_tests::pods::{PodServer, Protocol};
use dialguard_tests::sidecar::{self, Install};
use dialguard_tests::wait_for;

fn enforcing(dist: &Dist) -> anyhow::Result<Incident> {
    let mut config = sidecar::filter_config();
    config["mode"] = "enforce".into();
    Incident::start_installed(dist, false, false, |collector| {
        Ok(Install::local(
            &dist.module_enforce,
            &config,
            collector.grpc,
        ))
    })
}

fn bytes_received(incident: &Incident, addr: SocketAddr) -> usize {
    incident
        .pods
        .iter()
        .filter(|p| p.addr == addr)
        .map(PodServer::bytes_received)
        .sum()
}

/// Blocks the incident's connections and checks everything that must hold.
fn assert_enforced(incident: &Incident) -> anyhow::Result<()> {
    let l = &incident.layout;
    let (peer, idle) = (l.at(l.peer_pod), l.at(l.idle_pod));
    for _ in 0..3 {
        ensure!(
            incident.dial(peer)? == Outcome::Closed,
            "the misrouted connection got an answer"
        );
    }
    // Legitimate traffic passes: a VIP, a passthrough pod, the peer on another port.
    ensure!(
        matches!(incident.dial(l.at(l.app_vip))?, Outcome::Reached(p) if p.starts_with("app-"))
    );
    let passthrough = SocketAddr::new(l.app_pods[0].into(), l.passthrough_port);
    ensure!(matches!(incident.dial(passthrough)?, Outcome::Reached(p) if p.starts_with("app-0")));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        bytes_received(incident, idle),
        0,
        "the wrong server received application bytes"
    );
    assert!(
        bytes_received(incident, passthrough) > 0,
        "legitimate bytes were held back"
    );

    let misrouted = wait_for(Duration::from_secs(20), || {
        let report = incident.collector.report().ok()?;
        report
            .rows
            .into_iter()
            .find(|r| r.verdict == "misrouted" && r.count == 3)
    })
    .context("the enforced connections were not reported")?;
    assert_eq!(misrouted.original_destination, peer.to_string());
    let db = rusqlite::Connection::open_with_flags(
        &incident.collector.db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let enforced: i64 =
        db.query_row("SELECT count(*) FROM events WHERE enforced = 1", [], |r| {
            r.get(0)
        })?;
    assert_eq!(enforced, 3, "each event says it was enforced");
    let counters = incident.envoy.counters("dialguard.connections")?;
    let get = |name: &str| {
        counters
            .iter()
            .find(|(k, _)| k.ends_with(name))
            .map_or(0, |(_, v)| *v)
    };
    assert_eq!(get("dialguard.connections.enforced"), 3, "{counters:?}");
    assert_eq!(
        get("dialguard.connections.misrouted"),
        3,
        "judged once each: {counters:?}"
    );
    Ok(())
}

#[test]
fn server_first_wrong_server_never_reaches_the_client() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let incident = enforcing(&dist)?;
    assert_enforced(&incident)
}

#[test]
fn client_first_bytes_never_reach_the_wrong_server() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut incident = enforcing(&dist)?;
    let idle = incident.layout.at(incident.layout.idle_pod);
    incident.stop_pod(idle);
    incident.pods.push(PodServer::start_speaking(
        "idle",
        idle,
        Protocol::ClientFirst,
    )?);
    assert_enforced(&incident)
}
