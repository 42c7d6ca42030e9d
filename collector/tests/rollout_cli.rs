//! `dialguard rollout` through the real binary: the shipped examples in
//! envoyfilter/examples/ are exactly what the documented commands print, and
//! bad flags print a clear error and nothing on stdout.

use std::path::PathBuf;
use std::process::{Command, Output};

const SHA: &str = "9a568aa32a25ec828ae7119647f1a1fb3ff56722bfdcc880c6f45ca7ce6ee868";

fn rollout(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .arg("rollout")
        .args(args)
        .output()
        .expect("run dialguard")
}

fn common() -> Vec<&'static str> {
    vec![
        "--module-url",
        "http://dialguard-collector.dialguard.svc.cluster.local:8080/module/dialguard_filter.wasm",
        "--module-sha256",
        SHA,
        "--service-cidr",
        "10.96.0.0/12",
        "--pod-cidr",
        "10.244.0.0/16",
    ]
}

/// (file, flags): each example and the command that produces it; the
/// envoyfilter README lists the same commands.
fn examples() -> Vec<(&'static str, Vec<&'static str>)> {
    let collector = [
        "--collector",
        "dialguard-collector.dialguard.svc.cluster.local:50051",
    ];
    vec![
        (
            "envoyfilter-manager.yaml",
            [&["--namespace", "manager"][..], &collector, &common()].concat(),
        ),
        (
            "envoyfilter-selected-workloads.yaml",
            [
                &[
                    "--namespace",
                    "manager",
                    "--namespace",
                    "app",
                    "--selector",
                    "app=manager",
                ][..],
                &collector,
                &common(),
            ]
            .concat(),
        ),
        (
            "wasmplugin-manager.yaml",
            [
                &["--namespace", "manager", "--wasm-plugin"][..],
                &collector,
                &common(),
            ]
            .concat(),
        ),
        (
            "with-collector.yaml",
            [
                &[
                    "--namespace",
                    "manager",
                    "--with-collector",
                    "--collector-image",
                    "registry.example.com/dialguard:0.1.0",
                ][..],
                &common(),
            ]
            .concat(),
        ),
        (
            // No --module-url: the mode picks the collector's enforce build.
            "enforce-with-collector.yaml",
            vec![
                "--namespace",
                "manager",
                "--mode",
                "enforce",
                "--with-collector",
                "--collector-image",
                "registry.example.com/dialguard:0.1.0",
                "--module-sha256",
                SHA,
                "--service-cidr",
                "10.96.0.0/12",
                "--pod-cidr",
                "10.244.0.0/16",
            ],
        ),
        (
            // No --module-url: the release's filter image, pulled by istio-agent.
            "wasmplugin-release-image.yaml",
            vec![
                "-n",
                "a",
                "-n",
                "b",
                "--wasm-plugin",
                "--image-pull-policy",
                "IfNotPresent",
                "--collector",
                "dialguard-collector.dialguard.svc.cluster.local:50051",
                "--service-cidr",
                "10.96.0.0/12",
                "--pod-cidr",
                "10.244.0.0/16",
            ],
        ),
        (
            "uninstall-manager.yaml",
            [
                &["--namespace", "manager", "--uninstall"][..],
                &collector,
                &common(),
            ]
            .concat(),
        ),
    ]
}

#[test]
fn shipped_examples_are_what_the_commands_print() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../envoyfilter/examples");
    let update = std::env::var_os("UPDATE_EXAMPLES").is_some();
    for (file, args) in examples() {
        let output = rollout(&args);
        assert!(
            output.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = dir.join(file);
        if update {
            std::fs::write(&path, &output.stdout).expect("write example");
            continue;
        }
        let shipped = std::fs::read(&path).unwrap_or_default();
        assert!(
            shipped == output.stdout,
            "{} is stale: run `UPDATE_EXAMPLES=1 cargo test -p dialguard-collector --test rollout_cli`",
            path.display()
        );
    }
}

#[test]
fn json_output_is_a_kubernetes_list() {
    let mut args = vec![
        "--namespace",
        "manager",
        "--collector",
        "c.dialguard:50051",
        "--output",
        "json",
    ];
    args.extend(common());
    let output = rollout(&args);
    assert!(output.status.success());
    let list: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["kind"], "EnvoyFilter");
}

#[test]
fn short_flags_and_the_format_alias_print_the_same() {
    let long = [
        &[
            "--namespace",
            "manager",
            "--collector",
            "c.dialguard:50051",
            "--output",
            "json",
        ][..],
        &common(),
    ]
    .concat();
    let short = [
        &[
            "-n",
            "manager",
            "--collector",
            "c.dialguard:50051",
            "-o",
            "json",
        ][..],
        &common(),
    ]
    .concat();
    let alias = [
        &[
            "-n",
            "manager",
            "--collector",
            "c.dialguard:50051",
            "--format",
            "json",
        ][..],
        &common(),
    ]
    .concat();
    let printed: Vec<Vec<u8>> = [long, short, alias]
        .iter()
        .map(|args| {
            let output = rollout(args);
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            output.stdout
        })
        .collect();
    assert!(printed[0].starts_with(b"{"), "not JSON");
    assert_eq!(printed[0], printed[1]);
    assert_eq!(printed[0], printed[2]);
}

#[test]
fn the_collector_defaults_to_the_one_the_base_installs() {
    let output = rollout(&["-n", "a", "--wasm-plugin", "-o", "json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let cluster = &list["items"][1]["spec"]["configPatches"][0]["patch"]["value"];
    assert_eq!(cluster["name"], "dialguard_collector");
    let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    // The Service of deploy/kustomize/base/service.yaml, its gRPC port.
    let service: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize/base/service.yaml"),
        )
        .expect("service.yaml"),
    )
    .expect("YAML");
    assert_eq!(
        address["address"],
        format!(
            "{}.{}.svc.cluster.local",
            service["metadata"]["name"].as_str().expect("name"),
            service["metadata"]["namespace"]
                .as_str()
                .expect("namespace")
        )
    );
    let grpc = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "grpc-ingest")
        .expect("the grpc-ingest port");
    assert_eq!(address["port_value"], grpc["port"]);
}

#[test]
fn an_oci_module_without_wasm_plugin_says_what_to_use() {
    let output = rollout(&[
        "-n",
        "manager",
        "--collector",
        "c:1",
        "--module-url",
        "oci://ghcr.io/dialguard/dialguard-filter:0.1.0",
    ]);
    assert!(!output.status.success() && output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--module-url \"oci://ghcr.io/dialguard/dialguard-filter:0.1.0\"")
            && stderr.contains("expected --wasm-plugin, or an https:// or http:// URL"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_print_an_error_and_nothing_else() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--namespace",
                "manager",
                "--collector",
                "c:50051",
                "--service-cidr",
                "10.96.0.0/33",
            ],
            "--service-cidr \"10.96.0.0/33\"",
        ),
        (
            &["--namespace", "manager", "--collector", "c"],
            "--collector \"c\"",
        ),
        (&["--namespace", "", "--collector", "c:1"], "--namespace"),
        (&["--collector", "c:1"], "--namespace"),
        (
            &[
                "--namespace",
                "manager",
                "--with-collector",
                "--collector-image",
                "",
            ],
            "--collector-image \"\": expected a container image reference",
        ),
        (
            &[
                "-n",
                "manager",
                "--collector",
                "c:1",
                "--wasm-plugin",
                "--image-pull-policy",
                "Sometimes",
            ],
            "--image-pull-policy",
        ),
        // Enforce with the audit build's URL: Envoy would refuse the filter.
        (
            &[
                "--namespace",
                "manager",
                "--collector",
                "c:1",
                "--mode",
                "enforce",
            ],
            "--module-url \"http://dialguard-collector.dialguard.svc.cluster.local:8080/module/dialguard_filter.wasm\": names the audit build, which refuses --mode enforce",
        ),
    ];
    for (flags, expected) in cases {
        let mut args: Vec<&str> = flags.to_vec();
        args.extend(common());
        let output = rollout(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?} succeeded");
        assert!(
            output.stdout.is_empty(),
            "{flags:?} printed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
    let mut bad_sha = vec!["--namespace", "manager", "--collector", "c:1"];
    bad_sha.extend(common());
    let at = bad_sha.iter().position(|a| *a == SHA).expect("sha");
    bad_sha[at] = "xyz";
    let output = rollout(&bad_sha);
    assert!(!output.status.success() && output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--module-sha256 \"xyz\""));
}

#[test]
fn every_shipped_filter_is_fail_open() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../envoyfilter/examples");
    let mut filters = 0;
    for entry in std::fs::read_dir(&dir).expect("examples") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("example");
        // Each wasm filter and each WasmPlugin states its failure policy, FAIL_OPEN.
        let wasm = text
            .matches("envoy.extensions.filters.network.wasm.v3.Wasm")
            .count();
        let plugins = text.matches("kind: WasmPlugin").count();
        assert_eq!(text.matches("failure_policy: FAIL_OPEN").count(), wasm);
        assert_eq!(text.matches("failStrategy: FAIL_OPEN").count(), plugins);
        assert!(!text.contains("FAIL_CLOSED"));
        filters += wasm + plugins;
    }
    assert!(filters >= 4, "only {filters} filters in the examples");
}

/// The objects of a YAML stream by (kind, name).
fn objects_by_kind_and_name(
    yaml: &[u8],
) -> std::collections::BTreeMap<(String, String), serde_json::Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_slice(yaml)
        .map(|doc| serde_json::Value::deserialize(doc).expect("a YAML document"))
        .filter(|o| !o.is_null())
        .map(|o| {
            let key = (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            (key, o)
        })
        .collect()
}

/// One source of truth: `dialguard rollout --with-collector` with the flags
/// deploy/kustomize/overlays/example stands for prints, object by object,
/// what `kubectl kustomize` makes of that overlay (plus the sidecars' side).
#[test]
fn rollout_with_collector_prints_what_the_example_overlay_applies() {
    let overlay =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize/overlays/example");
    let kubectl = std::env::var("DIALGUARD_KUBECTL").unwrap_or("kubectl".into());
    let kustomized = Command::new(&kubectl)
        .arg("kustomize")
        .arg(&overlay)
        .output()
        .unwrap_or_else(|err| {
            panic!("{kubectl} (with its built-in kustomize) is needed: {err}; install kubectl or set DIALGUARD_KUBECTL")
        });
    assert!(
        kustomized.status.success(),
        "{}",
        String::from_utf8_lossy(&kustomized.stderr)
    );
    let rolled = rollout(&[
        "-n",
        "a",
        "-n",
        "b",
        "--wasm-plugin",
        "--with-collector",
        "--collector-image",
        "registry.example.com/platform/dialguard-collector:0.1.0",
        "--collector-storage",
        "20Gi",
    ]);
    assert!(
        rolled.status.success(),
        "{}",
        String::from_utf8_lossy(&rolled.stderr)
    );
    let expected = objects_by_kind_and_name(&kustomized.stdout);
    let mut printed = objects_by_kind_and_name(&rolled.stdout);
    printed.retain(|(kind, _), _| kind != "EnvoyFilter" && kind != "WasmPlugin");
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        printed.keys().collect::<Vec<_>>()
    );
    assert!(expected.len() >= 9, "{:?}", expected.keys());
    for (key, object) in &expected {
        assert!(
            printed[key] == *object,
            "{key:?}: kubectl kustomize printed {object}, rollout {}",
            printed[key]
        );
    }
}
