//! Enforce mode through real Envoy: a misrouted connection is closed at its
//! first data, before any application byte reaches the wrong server or the
//! client; legitimate traffic is untouched; the event says it was enforced.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use dialguard_tests::client::{Held, Outcome};
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

/// The kill switch: a namespace goes back to audit with one rollout that
/// changes only the filter configuration (the enforce module runs audit
/// too), pushed while traffic flows. The switch itself drops nothing: no
/// legitimate connection fails, a long-lived one stays open, and afterwards
/// misroutes are reported, not closed.
#[test]
fn back_to_audit_with_the_same_module_drops_no_connection() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let dist = Dist::locate()?;
    let install = |mode: &str, collector: SocketAddr| {
        let mut config = sidecar::filter_config();
        config["mode"] = mode.into();
        Install::local(&dist.module_enforce, &config, collector)
    };
    let (incident, mut lds) =
        Incident::start_dynamic(&dist, false, |c| Ok(install("enforce", c.grpc)))?;
    let l = incident.layout.clone();
    let peer = l.at(l.peer_pod);
    let passthrough = SocketAddr::new(l.app_pods[0].into(), l.passthrough_port);
    ensure!(
        incident.dial(peer)? == Outcome::Closed,
        "enforce closes the misroute"
    );

    let mut held = Held::open(incident.envoy.outbound, l.own_pod.into(), passthrough)?;
    ensure!(held.greeting.starts_with("app-0"), "{}", held.greeting);
    let stop = Arc::new(AtomicBool::new(false));
    let (reached, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, reached, failed) = (stop.clone(), reached.clone(), failed.clone());
        let (outbound, own) = (incident.envoy.outbound, l.own_pod);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match dialguard_tests::client::dial(outbound, own.into(), passthrough) {
                    Ok(Outcome::Reached(_)) => reached.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    incident.reconfigure(&mut lds, &install("audit", incident.collector.grpc))?;
    held.ping()?;
    // New connections take the new chains at once.
    let answered = wait_for(Duration::from_secs(5), || {
        matches!(incident.dial(peer).ok()?, Outcome::Reached(name) if name == "idle").then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let _ = traffic.join();
    answered.context("after the switch to audit the misroute still does not get through")?;
    let (reached, failed) = (
        reached.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
    );
    ensure!(
        failed == 0 && reached > 10,
        "{failed} legitimate connections failed, {reached} passed"
    );
    held.ping()?;
    ensure!(
        held.is_open(),
        "the long-lived connection was dropped by the switch"
    );

    let row = wait_for(Duration::from_secs(20), || {
        let report = incident.collector.report().ok()?;
        report
            .rows
            .into_iter()
            .find(|r| r.verdict == "misrouted" && r.count >= 2)
    })
    .context("the misroutes before and after the switch were not reported")?;
    ensure!(row.enforced == 1, "one closed in enforce: {row:#?}");
    ensure!(
        row.would_close == row.count,
        "each would be closed: {row:#?}"
    );
    Ok(())
}
