//! Verdicts people can trust, through real Envoy 1.40: a long-lived misroute
//! is reported while it is open; DNS load balancing over several A records
//! of one name is never misrouted, alerted or closed, with or without pod
//! ranges; an ExternalName Service aliasing a headless Service misroutes
//! pod-to-pod connections every time; audit mode marks exactly the
//! connections enforce mode closes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use dialguard_collector::report::Report;
use dialguard_tests::client::{Held, Outcome};
use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;
use dialguard_tests::pods::PodServer;
use dialguard_tests::sidecar::{self, Install, Layout};
use dialguard_tests::wait_for;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Build {
    Audit,
    Enforce,
}

/// The incident's sidecar with `pod_cidr` ("" for none) and `build`, plus
/// servers on the A records of `api.example.com` and the headless set.
fn start(dist: &Dist, build: Build, pod_cidr: &str) -> anyhow::Result<(Incident, Vec<PodServer>)> {
    let mut config = sidecar::filter_config();
    if pod_cidr.is_empty() {
        config
            .as_object_mut()
            .context("config object")?
            .remove("podCidrs");
    } else {
        config["podCidrs"] = serde_json::json!([pod_cidr]);
    }
    let module = match build {
        Build::Audit => dist.module.clone(),
        Build::Enforce => {
            config["mode"] = "enforce".into();
            dist.module_enforce.clone()
        }
    };
    let incident = Incident::start_installed(dist, false, false, |collector| {
        Ok(Install::local(&module, &config, collector.grpc))
    })?;
    let servers = extra_servers(&incident.layout)?;
    Ok((incident, servers))
}

fn extra_servers(l: &Layout) -> anyhow::Result<Vec<PodServer>> {
    let mut servers = Vec::new();
    for (i, ip) in l.api_records.iter().enumerate() {
        servers.push(PodServer::start(
            &format!("api-{i}"),
            SocketAddr::new(IpAddr::V4(*ip), l.api_port),
        )?);
    }
    for (i, ip) in l.peer_set.iter().enumerate() {
        servers.push(PodServer::start(
            &format!("peer-{i}"),
            SocketAddr::new(IpAddr::V4(*ip), l.peers_port),
        )?);
    }
    Ok(servers)
}

fn name_at(servers: &[PodServer], addr: SocketAddr) -> String {
    servers
        .iter()
        .find(|s| s.addr == addr)
        .map(|s| s.name.clone())
        .unwrap_or_default()
}

fn bytes_at(servers: &[PodServer], addr: SocketAddr) -> usize {
    servers
        .iter()
        .find(|s| s.addr == addr)
        .map_or(0, PodServer::bytes_received)
}

fn total(report: &Report, verdict: &str) -> u64 {
    report
        .rows
        .iter()
        .filter(|r| r.verdict == verdict)
        .map(|r| r.count)
        .sum()
}

/// Alert lines printed so far (the receiver is drained).
fn alert_lines(incident: &Incident) -> Vec<Value> {
    incident
        .collector
        .alerts
        .try_iter()
        .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
        .filter(|v| v.get("alert").is_some())
        .collect()
}

/// An Envoy counter of the sidecar (`wasmcustom.` prefix or not).
fn counter(incident: &Incident, name: &str) -> anyhow::Result<u64> {
    let counters = incident.envoy.counters("dialguard")?;
    Ok(counters
        .iter()
        .find(|(k, _)| k.ends_with(name))
        .map_or(0, |(_, v)| *v))
}

fn db(incident: &Incident) -> anyhow::Result<rusqlite::Connection> {
    Ok(rusqlite::Connection::open_with_flags(
        &incident.collector.db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?)
}

/// DNS load balancing: the application dials the first A record of
/// `api.example.com` twenty times; Envoy's STRICT_DNS cluster connects to
/// all three in turn. Returns how many reached another record.
fn dns_load_balancing(incident: &Incident, servers: &[PodServer]) -> anyhow::Result<u64> {
    let l = &incident.layout;
    let first = SocketAddr::new(IpAddr::V4(l.api_records[0]), l.api_port);
    let mut elsewhere = 0;
    let mut reached = BTreeMap::new();
    for _ in 0..20 {
        let outcome = incident.dial(first)?;
        let Outcome::Reached(name) = outcome else {
            anyhow::bail!("a DNS-balanced connection was closed: {outcome:?}");
        };
        if name != name_at(servers, first) {
            elsewhere += 1;
        }
        *reached.entry(name).or_insert(0) += 1;
    }
    ensure!(
        reached.len() == 3,
        "Envoy balanced over all records: {reached:?}"
    );
    Ok(elsewhere)
}

/// No misroute, no alert, no close for DNS load balancing; every difference
/// is a REDIRECTED row (cause: DNS) that enforce would not close.
fn assert_dns_balancing_is_quiet(build: Build, pod_cidr: &str) -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let (incident, servers) = start(&dist, build, pod_cidr)?;
    let elsewhere = dns_load_balancing(&incident, &servers)?;
    ensure!(elsewhere > 0);
    let report = wait_for(Duration::from_secs(20), || {
        let report = incident.collector.report().ok()?;
        (total(&report, "redirected") == elsewhere).then_some(report)
    })
    .with_context(|| {
        format!(
            "{elsewhere} redirected connections; report: {:?}",
            incident.collector.report()
        )
    })?;
    ensure!(total(&report, "misrouted") == 0, "{:#?}", report.rows);
    for row in &report.rows {
        ensure!(row.would_close == 0, "enforce would close {row:#?}");
        ensure!(row.enforced == 0, "enforced {row:#?}");
    }
    // An alert would have been printed with the commit; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    let alerts = alert_lines(&incident);
    ensure!(
        alerts.is_empty(),
        "alerts for DNS load balancing: {alerts:?}"
    );
    let enforced = counter(&incident, "dialguard.connections.enforced")?;
    ensure!(enforced == 0, "enforced {enforced}");
    Ok(())
}

#[test]
fn dns_load_balancing_is_never_misrouted_with_pod_ranges() -> anyhow::Result<()> {
    assert_dns_balancing_is_quiet(Build::Audit, sidecar::POD_CIDR)
}

#[test]
fn dns_load_balancing_is_never_misrouted_without_pod_ranges() -> anyhow::Result<()> {
    assert_dns_balancing_is_quiet(Build::Audit, "")
}

#[test]
fn enforce_never_closes_dns_load_balancing() -> anyhow::Result<()> {
    assert_dns_balancing_is_quiet(Build::Enforce, sidecar::POD_CIDR)
}

/// Each pod of the headless set dials each peer, round after round, until
/// at least three connections were misrouted (at most ten rounds); the
/// ExternalName catch-all round-robins them over the set, per Envoy worker,
/// so how many land on the dialed pod depends on which worker took them.
/// Returns the connections dialed, those that reached another pod than
/// dialed, and those closed.
fn headless_round(incident: &Incident, servers: &[PodServer]) -> anyhow::Result<(u64, u64, u64)> {
    let l = &incident.layout;
    let (mut dialed_total, mut elsewhere, mut closed) = (0, 0, 0);
    for _ in 0..10 {
        if elsewhere + closed >= 3 {
            break;
        }
        for ip in l.peer_set {
            dialed_total += 1;
            let dialed = SocketAddr::new(IpAddr::V4(ip), l.peers_port);
            match incident.dial(dialed)? {
                Outcome::Reached(name) if name == name_at(servers, dialed) => {}
                Outcome::Reached(_) => elsewhere += 1,
                Outcome::Closed => closed += 1,
            }
        }
    }
    Ok((dialed_total, elsewhere, closed))
}

/// An ExternalName Service aliasing a headless Service: every pod-to-pod
/// connection the catch-all sends to another pod is MISROUTED, however often
/// those pods were upstream hosts before; audit marks each as one enforce
/// would close, and enforce closes exactly those before a byte passes.
#[test]
fn headless_misroutes_are_all_reported_and_audit_previews_enforce() -> anyhow::Result<()> {
    let dist = Dist::locate()?;

    let (audit, audit_servers) = start(&dist, Build::Audit, sidecar::POD_CIDR)?;
    let (dialed, elsewhere, closed) = headless_round(&audit, &audit_servers)?;
    ensure!(closed == 0, "audit closed {closed} connections");
    ensure!(
        elsewhere >= 3,
        "only {elsewhere} of {dialed} went elsewhere"
    );
    // DNS balancing in the same run: reported at most as redirected.
    let balanced = dns_load_balancing(&audit, &audit_servers)?;
    let report = wait_for(Duration::from_secs(20), || {
        let report = audit.collector.report().ok()?;
        (total(&report, "misrouted") == elsewhere && total(&report, "redirected") == balanced)
            .then_some(report)
    })
    .with_context(|| format!("{elsewhere} misrouted: {:?}", audit.collector.report()))?;
    let would_close: u64 = report.rows.iter().map(|r| r.would_close).sum();
    ensure!(
        would_close == elsewhere,
        "audit marks {would_close} as enforce-closable, want exactly the {elsewhere} misroutes: {:#?}",
        report.rows
    );
    for row in report.rows.iter().filter(|r| r.verdict == "misrouted") {
        ensure!(row.cluster == audit.layout.peers_cluster(), "{row:#?}");
        ensure!(row.would_close == row.count, "{row:#?}");
    }
    drop(audit);

    let (enforce, enforce_servers) = start(&dist, Build::Enforce, sidecar::POD_CIDR)?;
    let bytes_before: usize = enforce_servers.iter().map(PodServer::bytes_received).sum();
    let (dialed, reached_elsewhere, closed) = headless_round(&enforce, &enforce_servers)?;
    ensure!(
        reached_elsewhere == 0,
        "{reached_elsewhere} misroutes got through"
    );
    ensure!(closed >= 3, "only {closed} of {dialed} closed");
    let balanced = dns_load_balancing(&enforce, &enforce_servers)?;
    let l = &enforce.layout;
    // Bytes reached only the pods that were dialed, and the API records.
    let wrong_bytes: usize = l
        .peer_set
        .iter()
        .map(|ip| {
            bytes_at(
                &enforce_servers,
                SocketAddr::new(IpAddr::V4(*ip), l.peers_port),
            )
        })
        .sum::<usize>()
        .saturating_sub(bytes_before);
    let right = dialed - closed;
    ensure!(
        wrong_bytes == usize::try_from(right)? * "hello from the application\n".len(),
        "{wrong_bytes} bytes at the peer pods for {right} legitimate connections"
    );
    let report = wait_for(Duration::from_secs(20), || {
        let report = enforce.collector.report().ok()?;
        (total(&report, "misrouted") == closed && total(&report, "redirected") == balanced)
            .then_some(report)
    })
    .with_context(|| format!("{closed} enforced: {:?}", enforce.collector.report()))?;
    let enforced: u64 = report.rows.iter().map(|r| r.enforced).sum();
    ensure!(enforced == closed, "{:#?}", report.rows);
    let stored: i64 = db(&enforce)?.query_row(
        "SELECT count(*) FROM events WHERE enforced = 1 AND would_close = 1",
        [],
        |r| r.get(0),
    )?;
    ensure!(u64::try_from(stored)? == closed);
    Ok(())
}

/// The misroute that matters most is the one that works: a long-lived
/// connection captured by the catch-all and answered by the wrong server is
/// stored and alerted within a second of its connect, while still open, and
/// counted once when it ends.
#[test]
fn a_long_lived_misroute_is_alerted_while_open() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let incident = Incident::start(&dist, false)?;
    let l = incident.layout.clone();
    let peer = l.at(l.peer_pod);
    let connected = Instant::now();
    let mut held = Held::open(incident.envoy.outbound, IpAddr::V4(l.own_pod), peer)?;
    ensure!(
        held.greeting == "idle",
        "captured and answered by idle: {}",
        held.greeting
    );
    let mut alert = None;
    while connected.elapsed() < Duration::from_secs(3) && alert.is_none() {
        held.ping()?;
        std::thread::sleep(Duration::from_millis(200));
        alert = alert_lines(&incident)
            .into_iter()
            .find(|a| a["originalDestination"] == peer.to_string());
    }
    let alerted_after = connected.elapsed();
    let alert = alert.context("no alert while the connection was open")?;
    ensure!(
        alerted_after < Duration::from_millis(1_500),
        "alerted {alerted_after:?} after connect"
    );
    let report = incident.collector.report()?;
    let row = report
        .rows
        .iter()
        .find(|r| r.verdict == "misrouted" && r.original_destination == peer.to_string())
        .with_context(|| format!("no row while open: {report:?}"))?;
    ensure!(row.count == 1, "{row:#?}");
    // Keep talking a while, then close: still one connection, one event.
    for _ in 0..5 {
        held.ping()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(held);
    std::thread::sleep(Duration::from_secs(1));
    let report = incident.collector.report()?;
    let misrouted = total(&report, "misrouted");
    ensure!(
        misrouted == 1,
        "counted {misrouted} times: {:#?}",
        report.rows
    );
    let (events, open): (i64, i64) = db(&incident)?.query_row(
        "SELECT count(*), sum(judged_open) FROM events WHERE verdict = 'misrouted'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    ensure!(
        (events, open) == (1, 1),
        "events {events}, judged open {open}"
    );
    let misrouted = counter(&incident, "dialguard.connections.misrouted")?;
    ensure!(
        misrouted == 1,
        "Envoy counted {misrouted} misrouted connections"
    );
    ensure!(
        alert["upstreamHost"] == l.at(l.idle_pod).to_string(),
        "{alert}"
    );
    Ok(())
}

/// `outboundTrafficPolicy: REGISTRY_ONLY`: istiod points the passthrough
/// chain `virtualOutbound-catchall-tcp` at `BlackHoleCluster`.
fn registry_only(listeners: &mut Value) {
    for listener in listeners.as_array_mut().into_iter().flatten() {
        if listener["name"] != "virtualOutbound" {
            continue;
        }
        for chain in listener["filter_chains"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if chain["name"] != "virtualOutbound-catchall-tcp" {
                continue;
            }
            for filter in chain["filters"].as_array_mut().into_iter().flatten() {
                if filter["name"] == "envoy.filters.network.tcp_proxy" {
                    filter["typed_config"]["cluster"] = "BlackHoleCluster".into();
                    filter["typed_config"]["stat_prefix"] = "BlackHoleCluster".into();
                }
            }
        }
    }
}

/// Each finding states the cause its events support, with the object to
/// change: a catch-all capture names the ExternalName Service, a dial to
/// the pod's own IP, DNS load balancing, and a REGISTRY_ONLY policy block
/// (never explained as a catch-all capture, never alerted as a misroute).
#[test]
fn every_finding_names_its_cause() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let config = sidecar::filter_config();
    let (incident, mut lds) = Incident::start_dynamic(&dist, false, |c| {
        Ok(Install::local(&dist.module, &config, c.grpc))
    })?;
    let servers = extra_servers(&incident.layout)?;
    let l = incident.layout.clone();
    let peer = l.at(l.peer_pod);
    ensure!(incident.dial(peer)? == Outcome::Reached("idle".into()));
    let own = incident.blackholed_destination();
    ensure!(incident.dial(own)? == Outcome::Closed);
    let balanced = dns_load_balancing(&incident, &servers)?;

    incident.reconfigure_with(
        &mut lds,
        &Install::local(&dist.module, &config, incident.collector.grpc),
        registry_only,
    )?;
    let unknown = SocketAddr::new(IpAddr::V4(l.api_records[2]), l.passthrough_port);
    ensure!(
        incident.dial(unknown)? == Outcome::Closed,
        "REGISTRY_ONLY blocks {unknown}"
    );

    let report = wait_for(Duration::from_secs(20), || {
        let report = incident.collector.report().ok()?;
        (total(&report, "misrouted") == 1
            && total(&report, "blackholed") == 2
            && total(&report, "redirected") == balanced)
            .then_some(report)
    })
    .with_context(|| format!("report: {:?}", incident.collector.report()))?;
    let find = |dialed: SocketAddr| {
        report
            .rows
            .iter()
            .find(|r| r.original_destination == dialed.to_string())
            .with_context(|| format!("no row for {dialed}: {:#?}", report.rows))
    };
    use dialguard_collector::finding::Cause;
    let captured = find(peer)?;
    ensure!(captured.cause == Cause::CatchAll, "{captured:#?}");
    let culprit = captured
        .culprit
        .as_ref()
        .context("catch-all without culprit")?;
    ensure!(
        (
            culprit.kind.as_str(),
            culprit.namespace.as_str(),
            culprit.name.as_str()
        ) == ("Service", "app", "app-ext"),
        "{culprit:#?}"
    );
    ensure!(culprit.inspect.contains("app-ext"), "{culprit:#?}");
    ensure!(
        captured.cause_text.contains(&format!("0.0.0.0_{}", l.port)),
        "{captured:#?}"
    );
    let own_row = find(own)?;
    ensure!(own_row.cause == Cause::OwnPodIp, "{own_row:#?}");
    let blocked = find(unknown)?;
    ensure!(blocked.cause == Cause::PolicyBlock, "{blocked:#?}");
    ensure!(
        blocked.cause_text.contains("REGISTRY_ONLY")
            && !blocked.cause_text.contains("catch-all")
            && !blocked.fix.contains("catch-all")
            && blocked.fix.contains("ServiceEntry"),
        "a policy block explained as something else: {} / {}",
        blocked.cause_text,
        blocked.fix
    );
    for row in report.rows.iter().filter(|r| r.verdict == "redirected") {
        ensure!(row.cause == Cause::DnsRedirection, "{row:#?}");
    }
    // Only the catch-all capture pages anyone.
    std::thread::sleep(Duration::from_millis(500));
    let alerts = alert_lines(&incident);
    ensure!(
        alerts.len() == 1 && alerts[0]["originalDestination"] == peer.to_string(),
        "{alerts:#?}"
    );
    ensure!(alerts[0]["cause"] == "catch_all", "{alerts:#?}");
    Ok(())
}
