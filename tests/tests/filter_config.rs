//! The filter's configuration as Envoy 1.40 sees it: an invalid one is
//! rejected at load time with one log line naming the field; a filter that
//! fails at run time (its collector cluster does not exist) never stops traffic.

use std::process::Command;

use anyhow::Context;
use dialguard_tests::client::Outcome;
use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;
use dialguard_tests::sidecar::{self, Install, Layout};
use serde_json::json;

fn validate(dist: &Dist, filter_config: &serde_json::Value) -> anyhow::Result<(bool, String)> {
    let dir = tempfile::tempdir()?;
    let layout = Layout::choose()?;
    let install = Install::local(&dist.module, filter_config, "127.0.0.1:9".parse()?);
    let bootstrap = sidecar::bootstrap(&layout, &install, &dir.path().join("access.log"));
    let path = dir.path().join("envoy.json");
    std::fs::write(&path, serde_json::to_vec(&bootstrap)?)?;
    let output = Command::new(&dist.envoy)
        .args(["--mode", "validate", "-l", "error", "-c"])
        .arg(&path)
        .output()
        .context("running envoy --mode validate")?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    Ok((output.status.success(), log))
}

#[test]
fn envoy_accepts_the_shipped_configuration() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let (ok, log) = validate(&dist, &sidecar::filter_config())?;
    assert!(ok, "envoy rejected a valid configuration:\n{log}");
    Ok(())
}

#[test]
fn envoy_rejects_invalid_configuration_naming_the_field() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    // One case per field: each must be refused by Envoy with a line naming it.
    let c = |extra: serde_json::Value| {
        let mut config = json!({ "collector": { "cluster": "c" } });
        if let (Some(base), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
            for (key, value) in extra {
                base.insert(key.clone(), value.clone());
            }
        }
        config
    };
    let cases = [
        (json!("not an object"), "at `.`: invalid type"),
        (json!({}), "at `.`: missing field `collector`"),
        (
            c(json!({ "mode": "block" })),
            "at `mode`: unknown variant `block`",
        ),
        // Enforce closes only certain misroutes: pod IPs sent elsewhere.
        (
            c(json!({ "mode": "enforce" })),
            "at `podCidrs`: enforce mode closes only connections dialed to pod IPs",
        ),
        // The audit build refuses enforce mode rather than silently auditing.
        (
            c(json!({ "mode": "enforce", "podCidrs": ["10.244.0.0/16"] })),
            "at `mode`: enforce needs the module built with enforcement",
        ),
        (c(json!({ "colector": {} })), "at `colector`: unknown field"),
        (
            json!({ "collector": {} }),
            "at `collector`: missing field `cluster`",
        ),
        (
            json!({ "collector": { "cluster": "" } }),
            "at `collector.cluster`: expected the name",
        ),
        (
            json!({ "collector": { "cluster": "c", "flushIntervalMs": 0 } }),
            "at `collector.flushIntervalMs`: expected 10 to 60000",
        ),
        (
            json!({ "collector": { "cluster": "c", "maxBatchEvents": 0 } }),
            "at `collector.maxBatchEvents`: expected 1 to 10000",
        ),
        (
            json!({ "collector": { "cluster": "c", "maxBufferedEvents": 1, "maxBatchEvents": 5 } }),
            "at `collector.maxBufferedEvents`: expected maxBatchEvents",
        ),
        (
            json!({ "collector": { "cluster": "c", "maxBufferedBytes": 10 } }),
            "at `collector.maxBufferedBytes`: expected 4096",
        ),
        (
            c(json!({ "serviceCidrs": ["10.96.0.0/33"] })),
            "at `serviceCidrs[0]`: expected a CIDR",
        ),
        (
            c(json!({ "podCidrs": ["10.244.0.0/16", "pods"] })),
            "at `podCidrs[1]`: expected a CIDR",
        ),
        (
            c(json!({ "allow": [{ "port": 5432 }, {}] })),
            "at `allow[1]`: expected at least one of",
        ),
        (
            c(json!({ "allow": [{ "cluster": "a*b" }] })),
            "at `allow[0].cluster`: expected a cluster name",
        ),
        (
            c(json!({ "allow": [{ "destinationCidr": "10.1.0.0/99" }] })),
            "at `allow[0].destinationCidr`: expected a CIDR",
        ),
        (
            c(json!({ "allow": [{ "port": 0 }] })),
            "at `allow[0].port`: expected 1 to 65535",
        ),
    ];
    for (config, expected) in cases {
        let (ok, log) = validate(&dist, &config)?;
        assert!(!ok, "envoy accepted {config}");
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("invalid dialguard configuration"))
            .collect();
        assert_eq!(lines.len(), 1, "one log line for {config}:\n{log}");
        assert!(lines[0].contains(expected), "{config}: {}", lines[0]);
    }
    Ok(())
}

#[test]
fn a_filter_that_cannot_reach_its_collector_never_stops_traffic() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut config = sidecar::filter_config();
    config["collector"]["cluster"] = json!("no_such_cluster");
    let incident = Incident::start_with(&dist, &config, false)?;
    let l = incident.layout.clone();
    // Reported connections make the filter try to open its stream, and fail.
    for _ in 0..5 {
        assert_eq!(
            incident.dial(l.at(l.peer_pod))?,
            Outcome::Reached("idle".into())
        );
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    assert!(
        matches!(incident.dial(l.at(l.app_vip))?, Outcome::Reached(pod) if pod.starts_with("app-"))
    );
    // The filter stays alive: it still judges and counts, and records each failed open.
    let counters = incident.envoy.counters("dialguard")?;
    let get = |name: &str| {
        counters
            .iter()
            .find(|(k, _)| k.ends_with(name))
            .map_or(0, |(_, v)| *v)
    };
    assert_eq!(get("dialguard.connections.misrouted"), 5, "{counters:#?}");
    assert!(get("dialguard.stream.failures") >= 1, "{counters:#?}");
    assert_eq!(get("dialguard.events.sent"), 0, "{counters:#?}");
    Ok(())
}
