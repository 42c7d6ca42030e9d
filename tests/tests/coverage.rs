//! Coverage through real Envoy 1.40 and the real collector: every sidecar's
//! filter says hello when it starts and heartbeats its counters, so silence
//! in the report means "no misroutes", never "not running". A sidecar with
//! only legitimate traffic is listed with exact counts; a module that never
//! loaded, or a namespace without the filter, shows as uncovered; a sidecar
//! that stops goes stale; a pod that is only ever dialed is named.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use dialguard_tests::client::Outcome;
use dialguard_tests::collector::Collector;
use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;
use dialguard_tests::scenario::{row, wait_for_report};
use dialguard_tests::sidecar::{self, Install, MANAGER_POD, PEER_POD};
use dialguard_tests::wait_for;
use serde_json::{Value, json};

/// Heartbeats every second, so that staleness (3 intervals) shows in seconds.
const HEARTBEAT_MS: u64 = 1_000;

fn fast_heartbeat_config() -> Value {
    let mut config = sidecar::filter_config();
    config["collector"]["heartbeatIntervalMs"] = json!(HEARTBEAT_MS);
    config
}

fn coverage(collector: &Collector) -> anyhow::Result<Value> {
    let report = collector.report_json()?;
    Ok(report["coverage"].clone())
}

fn sidecar_entry<'a>(coverage: &'a Value, pod: &str) -> Option<&'a Value> {
    coverage["sidecars"]
        .as_array()?
        .iter()
        .find(|s| s["pod"] == pod)
}

fn namespace_entry<'a>(coverage: &'a Value, namespace: &str) -> Option<&'a Value> {
    coverage["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["namespace"] == namespace)
}

fn metrics(collector: &Collector) -> anyhow::Result<String> {
    let url = format!("http://{}/metrics", collector.http);
    Ok(ureq::get(&url).call()?.body_mut().read_to_string()?)
}

#[test]
fn a_sidecar_with_only_legitimate_traffic_is_covered_with_exact_counts() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let incident = Incident::start_with(&dist, &fast_heartbeat_config(), false)?;
    let l = incident.layout.clone();
    // Known as soon as it starts, before any traffic.
    let started = Instant::now();
    let hello = wait_for(Duration::from_secs(10), || {
        let coverage = coverage(&incident.collector).ok()?;
        let entry = sidecar_entry(&coverage, MANAGER_POD)?;
        (entry["stale"] == false).then(|| entry.clone())
    })
    .context("the sidecar never appeared in coverage before its first connection")?;
    eprintln!("listed {:?} after start: {hello}", started.elapsed());
    assert_eq!(hello["namespace"], "manager");
    assert_eq!(hello["workload"], "manager");
    assert_eq!(hello["mode"], "audit");

    // Only legitimate traffic: three VIP connections, two passthrough ones.
    for _ in 0..3 {
        let outcome = incident.dial(l.at(l.manager_vip))?;
        ensure!(
            matches!(&outcome, Outcome::Reached(pod) if pod.starts_with("manager")),
            "{outcome:?}"
        );
    }
    for (i, ip) in l.app_pods.iter().enumerate() {
        let dialed = std::net::SocketAddr::new((*ip).into(), l.passthrough_port);
        ensure!(
            incident.dial(dialed)?
                == Outcome::Reached(format!("app-{i} (port {})", l.passthrough_port))
        );
    }
    let traffic_done = Instant::now();
    let expected = json!({
        "match": 2, "service": 3, "allowed": 0, "misrouted": 0,
        "blackholed": 0, "redirected": 0, "resolved": 0,
    });
    let counted = wait_for(Duration::from_secs(10), || {
        let coverage = coverage(&incident.collector).ok()?;
        let connections = sidecar_entry(&coverage, MANAGER_POD)?["connections"].clone();
        (expected
            .as_object()?
            .iter()
            .all(|(verdict, n)| connections[verdict] == *n))
        .then_some(connections)
    });
    let waited = traffic_done.elapsed();
    let counted = counted.with_context(|| {
        format!(
            "coverage never showed {expected}: {:?}",
            coverage(&incident.collector).ok()
        )
    })?;
    eprintln!("exact counts {counted} in coverage {waited:?} after the traffic");
    // Within two heartbeat intervals (jitter included), plus the collector's
    // at-most-one-second write of its inventory.
    ensure!(
        waited <= Duration::from_millis(2 * HEARTBEAT_MS * 11 / 10 + 1_000),
        "took {waited:?}"
    );
    let coverage = coverage(&incident.collector)?;
    let namespace = namespace_entry(&coverage, "manager").context("namespace manager")?;
    assert_eq!(namespace["sidecars"], 1, "{namespace}");
    assert_eq!(namespace["stale"], 0, "{namespace}");
    assert!(
        incident.collector.report()?.rows.is_empty(),
        "legitimate traffic is never a report row"
    );
    // Envoy's own counters agree with what the heartbeats carried.
    let stats = incident.envoy.counters("dialguard.connections")?;
    assert_eq!(
        stats.get("wasmcustom.dialguard.connections.match"),
        Some(&2),
        "{stats:?}"
    );
    assert_eq!(
        stats.get("wasmcustom.dialguard.connections.service"),
        Some(&3),
        "{stats:?}"
    );
    Ok(())
}

#[test]
fn a_module_that_never_loaded_and_a_namespace_without_the_filter_are_uncovered()
-> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let wrong_sha256 = "0".repeat(64);
    let incident = Incident::start_with_collector_flags(
        &dist,
        true,
        &[
            "--expect-namespace",
            "manager",
            "--expect-namespace",
            "payments",
        ],
        |collector| {
            let module = dialguard_envoyfilter::ModuleSource::Remote {
                uri: format!("http://{}/module/dialguard_filter.wasm", collector.http),
                cluster: "dialguard_module".into(),
                sha256: wrong_sha256.clone(),
            };
            let mut install =
                Install::local(&dist.module, &fast_heartbeat_config(), collector.grpc);
            install.filter =
                dialguard_envoyfilter::network_filter(&fast_heartbeat_config(), &module);
            install.clusters.push(dialguard_envoyfilter::module_cluster(
                "dialguard_module",
                &collector.http.ip().to_string(),
                collector.http.port(),
                false,
            ));
            Ok(install)
        },
    )?;
    let l = incident.layout.clone();
    ensure!(
        incident.envoy.module_rejected(),
        "Envoy never rejected the module"
    );
    // Fail-open: traffic flows, misrouted and unobserved.
    ensure!(incident.dial(l.at(l.peer_pod))? == Outcome::Reached("idle".into()));
    // Three heartbeat intervals: a loaded filter would have said hello by now.
    std::thread::sleep(Duration::from_millis(3 * HEARTBEAT_MS));
    let coverage = coverage(&incident.collector)?;
    assert!(
        coverage["sidecars"].as_array().is_some_and(Vec::is_empty),
        "no filter ran, so no sidecar can be listed: {coverage}"
    );
    for namespace in ["manager", "payments"] {
        let entry = namespace_entry(&coverage, namespace)
            .with_context(|| format!("expected namespace {namespace} missing: {coverage}"))?;
        assert_eq!(entry["sidecars"], 0, "{entry}");
        assert_eq!(entry["covered"], false, "{entry}");
    }
    let metrics = metrics(&incident.collector)?;
    for namespace in ["manager", "payments"] {
        let line = format!("dialguard_namespace_uncovered{{namespace=\"{namespace}\"}} 1");
        assert!(
            metrics.contains(&line),
            "no `{line}` in /metrics:\n{metrics}"
        );
    }
    let table = incident.collector.report_table()?;
    assert!(
        table.contains("payments") && table.contains("manager"),
        "the table report names the uncovered namespaces:\n{table}"
    );
    Ok(())
}

#[test]
fn a_stopped_sidecar_goes_stale_and_the_dialed_pod_is_named() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut incident = Incident::start_with(&dist, &fast_heartbeat_config(), false)?;
    let l = incident.layout.clone();
    let install = Install::local(
        &dist.module,
        &fast_heartbeat_config(),
        incident.collector.grpc,
    );
    incident.start_peer_sidecar(&dist, &install)?;
    // The peer pod's sidecar announces itself, with its IP, before anything
    // dials it.
    wait_for(Duration::from_secs(10), || {
        let coverage = coverage(&incident.collector).ok()?;
        (sidecar_entry(&coverage, PEER_POD)?["stale"] == false).then_some(())
    })
    .context("the peer sidecar never appeared in coverage")?;
    let both = coverage(&incident.collector)?;
    let namespace = namespace_entry(&both, "manager").context("namespace manager")?;
    assert_eq!(namespace["sidecars"], 2, "both manager pods report: {both}");

    // The incident's headline: the member dials its peer's pod IP and the
    // catch-all sends it to idle. The report names the pod it was meant for.
    ensure!(incident.dial(l.at(l.peer_pod))? == Outcome::Reached("idle".into()));
    let peer = l.at(l.peer_pod).to_string();
    let report = wait_for_report(&incident.collector, "the misroute", |r| {
        row(r, "misrouted", &peer).is_some()
    })?;
    let misrouted = row(&report, "misrouted", &peer).context("row")?;
    let intended = misrouted
        .intended
        .as_ref()
        .context("the misroute names no pod it was meant to reach")?;
    assert_eq!(intended.pod, PEER_POD);
    assert_eq!(intended.namespace, "manager");

    // The peer's sidecar stops: within three intervals (plus jitter and the
    // collector's write) it is stale; the manager's own stays reporting.
    let stopped = Instant::now();
    incident.peer_sidecar = None;
    let stale = wait_for(Duration::from_secs(15), || {
        let coverage = coverage(&incident.collector).ok()?;
        (sidecar_entry(&coverage, PEER_POD)?["stale"] == true).then_some(coverage)
    })
    .context("the stopped sidecar never went stale")?;
    let after = stopped.elapsed();
    eprintln!("stale {after:?} after the stop");
    ensure!(
        after >= Duration::from_millis(2 * HEARTBEAT_MS),
        "stale too early: {after:?}"
    );
    assert_eq!(
        sidecar_entry(&stale, MANAGER_POD).context("manager")?["stale"],
        false
    );
    let namespace = namespace_entry(&stale, "manager").context("namespace manager")?;
    assert_eq!(namespace["stale"], 1, "{namespace}");
    Ok(())
}
