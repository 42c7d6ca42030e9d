//! The rollout as a sidecar receives it: Envoy 1.40 configured exactly as the
//! `EnvoyFilter` that `dialguard rollout` renders would configure it, with the
//! module fetched from the collector (`serve --module`) and checked against
//! its SHA-256.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use dialguard_tests::client::Outcome;
use dialguard_tests::collector::Collector;
use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;
use dialguard_tests::sidecar::{Install, POD_CIDR, SERVICE_CIDR};
use dialguard_tests::wait_for;

/// `dialguard rollout ... --output json` for namespace `manager`, pointed at
/// this collector; returns the `EnvoyFilter`.
fn rendered_envoy_filter(
    dist: &Dist,
    collector: &Collector,
    sha256: &str,
) -> anyhow::Result<serde_json::Value> {
    let output = Command::new(&dist.dialguard)
        .args(["rollout", "--namespace", "manager", "--output", "json"])
        .args(["--collector", &collector.grpc.to_string()])
        .args([
            "--module-url",
            &format!("http://{}/module/dialguard_filter.wasm", collector.http),
        ])
        .args(["--module-sha256", sha256])
        .args(["--service-cidr", SERVICE_CIDR, "--pod-cidr", POD_CIDR])
        .output()?;
    if !output.status.success() {
        bail!(
            "rollout failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let list: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    list["items"]
        .as_array()
        .and_then(|items| items.iter().find(|o| o["kind"] == "EnvoyFilter"))
        .cloned()
        .context("no EnvoyFilter rendered")
}

#[test]
fn module_fetched_from_the_collector_detects_the_incident() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let incident = Incident::start_installed(&dist, true, false, |collector| {
        let sha = collector
            .module_sha256
            .clone()
            .context("the collector printed no module sha256")?;
        Install::from_envoy_filter(&rendered_envoy_filter(&dist, collector, &sha)?)
    })?;
    let l = incident.layout.clone();
    ensure!(incident.dial(l.at(l.peer_pod))? == Outcome::Reached("idle".into()));
    let peer = l.at(l.peer_pod).to_string();
    let report = wait_for(Duration::from_secs(20), || {
        let report = incident.collector.report().ok()?;
        report
            .rows
            .iter()
            .any(|r| r.verdict == "misrouted" && r.original_destination == peer)
            .then_some(report)
    })
    .context("the remotely loaded filter reported nothing")?;
    assert_eq!(report.rows[0].cluster, l.app_ext_cluster());
    let counters = incident.envoy.counters("wasm.remote_load")?;
    // Fetched over HTTP from the collector (once per filter configuration) and accepted.
    assert!(
        counters.get("wasm.remote_load_fetch_successes") >= Some(&1),
        "{counters:?}"
    );
    assert_eq!(
        counters.get("wasm.remote_load_fetch_failures"),
        Some(&0),
        "{counters:?}"
    );
    Ok(())
}

#[test]
fn wrong_sha256_leaves_traffic_flowing_and_says_why() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let wrong = "0".repeat(64);
    let incident = Incident::start_installed(&dist, true, false, |collector| {
        Install::from_envoy_filter(&rendered_envoy_filter(&dist, collector, &wrong)?)
    })?;
    let l = incident.layout.clone();
    // Fail-open: the connection goes where the sidecar routes it, unobserved.
    ensure!(
        incident.envoy.module_rejected(),
        "Envoy never rejected the module"
    );
    for _ in 0..3 {
        ensure!(incident.dial(l.at(l.peer_pod))? == Outcome::Reached("idle".into()));
        ensure!(
            matches!(incident.dial(l.at(l.app_vip))?, Outcome::Reached(pod) if pod.starts_with("app-"))
        );
    }
    let log: Vec<String> = incident.envoy.log.try_iter().collect();
    assert!(
        log.iter()
            .any(|line| line.contains("Plugin dialguard failed to load")),
        "no clear log line:\n{}",
        log.join("\n")
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        incident.collector.report()?.rows.is_empty(),
        "nothing can have been reported"
    );
    Ok(())
}

#[test]
fn rendered_patches_apply_to_a_real_sidecar_and_envoy_accepts_them() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let dump_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/testdata/istio/sidecar-listeners-configdump.json"
    );
    let dump: serde_json::Value = serde_json::from_slice(&std::fs::read(dump_path)?)?;
    for wasm_plugin in [false, true] {
        let mut command = Command::new(&dist.dialguard);
        command.args(["rollout", "--namespace", "default", "--output", "json"]).args([
            "--collector",
            "dialguard-collector.dialguard.svc.cluster.local:50051",
            "--module-url",
            "http://dialguard-collector.dialguard.svc.cluster.local:8080/module/dialguard_filter.wasm",
            "--module-sha256",
            &"a".repeat(64),
        ]);
        if wasm_plugin {
            command.arg("--wasm-plugin");
        }
        let output = command.output()?;
        ensure!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let list: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let envoy_filter = list["items"]
            .as_array()
            .and_then(|items| items.iter().find(|o| o["kind"] == "EnvoyFilter"))
            .context("no EnvoyFilter")?;
        if wasm_plugin {
            // Only the collector cluster is patched in; istiod renders the plugin itself.
            let clusters: Vec<_> = envoy_filter["spec"]["configPatches"]
                .as_array()
                .context("patches")?
                .iter()
                .map(|p| &p["applyTo"])
                .collect();
            assert_eq!(clusters, ["CLUSTER"]);
            continue;
        }
        let install = Install::from_envoy_filter(envoy_filter)?;
        let (bootstrap, patched) = dialguard_tests::istio_dump::patched_bootstrap(&dump, &install)?;
        ensure!(
            patched >= 10,
            "only {patched} outbound chains received the filter"
        );
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("patched.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&bootstrap)?)?;
        let output = Command::new(&dist.envoy)
            .args(["--mode", "validate", "-l", "error", "-c"])
            .arg(&path)
            .output()?;
        let log = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.success(),
            "envoy rejected the patched sidecar ({}):\n{log}",
            path.display()
        );
        // The filter really is in the chains Envoy accepted.
        let text = std::fs::read_to_string(&path)?;
        ensure!(text.matches("\"root_id\": \"dialguard\"").count() == patched);
    }
    Ok(())
}
