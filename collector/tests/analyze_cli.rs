//! `dialguard analyze FILE` as a user runs it: the built binary on files, its
//! output and its exit code (0: nothing found, 1: findings, 2: bad input).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

const SIDECAR_DUMP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/testdata/istio/sidecar-listeners-configdump.json"
);
const APP_EXT_CLUSTER: &str = "outbound|5701||app-ext.app.svc.cluster.local";

fn dialguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run dialguard")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

fn tcp_proxy(cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
        }
    })
}

/// The real sidecar dump plus what an ExternalName Service `app-ext` that
/// declares port 5701 adds: the catch-all listener and its STRICT_DNS cluster.
fn external_name_dump() -> Value {
    let text = std::fs::read_to_string(SIDECAR_DUMP).expect("sidecar dump");
    let mut dump: Value = serde_json::from_str(&text).expect("JSON");
    let listener = json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "0.0.0.0_5701",
        "address": { "socket_address": { "address": "0.0.0.0", "port_value": 5701 } },
        "filter_chains": [
            { "filter_chain_match": { "prefix_ranges": [{ "address_prefix": "10.244.1.17", "prefix_len": 32 }] },
              "filters": [tcp_proxy("BlackHoleCluster")] },
            { "filters": [tcp_proxy(APP_EXT_CLUSTER)] }
        ],
        "traffic_direction": "OUTBOUND",
        "bind_to_port": false
    });
    dump["configs"][0]["dynamic_listeners"]
        .as_array_mut()
        .expect("dynamic_listeners")
        .push(json!({ "name": "0.0.0.0_5701", "active_state": { "listener": listener } }));
    dump["configs"]
        .as_array_mut()
        .expect("configs")
        .push(json!({
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "dynamic_active_clusters": [{ "cluster": {
                "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                "name": APP_EXT_CLUSTER,
                "type": "STRICT_DNS",
                "metadata": { "filter_metadata": { "istio": { "services": [
                    { "host": "app-ext.app.svc.cluster.local", "name": "app-ext", "namespace": "app" }
                ]}}}
            }}]
        }));
    dump
}

#[test]
fn external_name_dump_exits_1_with_the_finding_in_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config_dump.json");
    std::fs::write(&file, external_name_dump().to_string()).expect("write dump");

    let out = dialguard(&["analyze", path_str(&file), "--format", "json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    let findings = report["findings"].as_array().expect("findings");
    assert_eq!(findings.len(), 1, "{report:#}");
    assert_eq!(findings[0]["port"], 5701);
    assert_eq!(findings[0]["listener"], "0.0.0.0_5701");
    assert_eq!(findings[0]["cluster"], APP_EXT_CLUSTER);
    assert_eq!(findings[0]["clusterType"], "STRICT_DNS");
    assert_eq!(
        findings[0]["services"],
        json!(["app-ext.app.svc.cluster.local"])
    );

    // The table (the default format) says the same, with the fix.
    let out = dialguard(&["analyze", path_str(&file)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains(APP_EXT_CLUSTER), "{stdout}");
    assert!(stdout.contains("port 5701: plain TCP"), "{stdout}");
}

#[test]
fn real_sidecar_dump_exits_0() {
    let out = dialguard(&["analyze", SIDECAR_DUMP, "--format", "json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report, json!({ "findings": [] }));

    let out = dialguard(&["analyze", SIDECAR_DUMP]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("no catch-all listener"));
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");

    // Not JSON (YAML, as `istioctl ... -o yaml` prints it).
    let yaml = dir.path().join("dump.yaml");
    std::fs::write(
        &yaml,
        "configs:\n- '@type': type.googleapis.com/envoy.admin.v3.ListenersConfigDump\n",
    )
    .expect("write");
    let out = dialguard(&["analyze", path_str(&yaml)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    assert!(stderr.contains(path_str(&yaml)), "{stderr}");
    assert!(stderr.contains("not JSON"), "{stderr}");
    assert!(stderr.contains("line 1 column 1"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // JSON of the wrong shape.
    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, r#"{"configs": [{"dynamic_listeners": []}]}"#).expect("write");
    let out = dialguard(&["analyze", path_str(&wrong)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(r#"configs[0]: expected an object with "@type""#),
        "{stderr}"
    );

    // A file that does not exist.
    let missing = dir.path().join("missing.json");
    let out = dialguard(&["analyze", path_str(&missing)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("missing.json: cannot read"), "{stderr}");
}
