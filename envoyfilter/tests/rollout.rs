//! `dialguard rollout` rendering: every Istio document validates against
//! Istio's own CRD schemas (../shared/istio-crds), made strict the way
//! `kubectl apply --validate=strict` is (unknown fields rejected); bad flags
//! get an error naming the flag and nothing is rendered.

use std::path::PathBuf;
use std::process::Command;

mod common;

use common::{CrdValidators, validator};
use dialguard_envoyfilter::module::{self, Build};
use dialguard_envoyfilter::rollout::{
    self, CollectorManifests, CollectorMtls, ImagePullPolicy, RolloutArgs,
};
use serde_json::{Value, json};

const SHA: &str = "9a568aa32a25ec828ae7119647f1a1fb3ff56722bfdcc880c6f45ca7ce6ee868";

/// A module `cargo xtask dist` built: `$DIALGUARD_DIST` (from the workspace
/// root) or dist/.
fn dist_module(build: Build) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir =
        std::env::var_os("DIALGUARD_DIST").map_or_else(|| root.join("dist"), |d| root.join(d));
    let path = dir.join(build.file_name());
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask dist` first",
        path.display()
    );
    path
}

/// The filter's JSON configuration and the vm_config sha256 of an EnvoyFilter.
fn filter_config_and_sha(envoy_filter: &Value) -> (Value, String) {
    let config =
        &envoy_filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"];
    let filter_config: Value =
        serde_json::from_str(config["configuration"]["value"].as_str().expect("string"))
            .expect("JSON");
    let sha = config["vm_config"]["code"]["remote"]["sha256"]
        .as_str()
        .expect("sha256")
        .to_owned();
    (filter_config, sha)
}

fn args() -> RolloutArgs {
    RolloutArgs {
        namespaces: vec!["manager".into(), "app".into()],
        collector: "dialguard-collector.dialguard.svc.cluster.local:50051".into(),
        module_url: Some("http://dialguard-collector.dialguard.svc.cluster.local:8080/module/dialguard_filter.wasm".into()),
        module_sha256: Some(SHA.into()),
        service_cidrs: vec!["10.96.0.0/12".into()],
        pod_cidrs: vec!["10.244.0.0/16".into()],
        ..RolloutArgs::default()
    }
}

fn assert_valid(objects: &[Value]) {
    CrdValidators::load().assert_valid(objects);
}

#[test]
fn strictness_catches_a_misspelt_field() {
    let mut objects = rollout::render(&args()).expect("renders");
    objects[0]["spec"]["workloadSelecter"] = json!({ "labels": { "app": "x" } });
    let validator = validator("istio-crds/envoyfilter.crd.yaml", "v1alpha3");
    assert!(!validator.is_valid(&objects[0]));
}

#[test]
fn envoy_filters_per_namespace_validate_against_the_crd() {
    let mut with_selector = args();
    with_selector.selectors = vec![
        "app=manager".into(),
        "app.kubernetes.io/part-of=hazelcast".into(),
    ];
    let objects = rollout::render(&with_selector).expect("renders");
    assert_eq!(objects.len(), 2);
    assert_valid(&objects);
    for (object, ns) in objects.iter().zip(["manager", "app"]) {
        assert_eq!(object["kind"], "EnvoyFilter");
        assert_eq!(object["metadata"]["namespace"], ns);
        let spec = &object["spec"];
        assert_eq!(spec["priority"], 10);
        assert_eq!(spec["workloadSelector"]["labels"]["app"], "manager");
        let patches = spec["configPatches"].as_array().expect("patches");
        let filter = &patches[0];
        assert_eq!(filter["applyTo"], "NETWORK_FILTER");
        assert_eq!(filter["match"]["context"], "SIDECAR_OUTBOUND");
        assert_eq!(
            filter["match"]["listener"]["filterChain"]["filter"]["name"],
            "envoy.filters.network.tcp_proxy"
        );
        assert_eq!(filter["patch"]["operation"], "INSERT_BEFORE");
        let config = &filter["patch"]["value"]["typed_config"]["config"];
        assert_eq!(config["failure_policy"], "FAIL_OPEN");
        assert_eq!(config["vm_config"]["runtime"], "envoy.wasm.runtime.v8");
        let remote = &config["vm_config"]["code"]["remote"];
        assert_eq!(remote["sha256"], SHA);
        assert_eq!(remote["http_uri"]["cluster"], rollout::MODULE_CLUSTER);
        let filter_config: Value =
            serde_json::from_str(config["configuration"]["value"].as_str().expect("string"))
                .expect("JSON");
        assert_eq!(
            filter_config["collector"]["cluster"],
            rollout::COLLECTOR_CLUSTER
        );
        assert_eq!(filter_config["serviceCidrs"], json!(["10.96.0.0/12"]));
        // The filter reports the sha256 it was pinned with in its hello.
        assert_eq!(filter_config["moduleSha256"], SHA);
        // The filter itself accepts what was rendered.
        dialguard_filter_core::FilterConfig::from_json(filter_config.to_string().as_bytes())
            .expect("accepted");
        let clusters: Vec<&Value> = patches[1..].iter().map(|p| &p["patch"]["value"]).collect();
        assert!(
            patches[1..]
                .iter()
                .all(|p| p["applyTo"] == "CLUSTER" && p["patch"]["operation"] == "ADD")
        );
        let collector = clusters
            .iter()
            .find(|c| c["name"] == rollout::COLLECTOR_CLUSTER)
            .expect("collector cluster");
        assert!(
            collector["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                ["explicit_http_config"]["http2_protocol_options"]
                .is_object(),
            "the collector cluster speaks HTTP/2"
        );
        assert!(
            clusters
                .iter()
                .any(|c| c["name"] == rollout::MODULE_CLUSTER)
        );
    }
}

#[test]
fn wasm_plugin_variant_validates_against_the_crd() {
    let mut plugin = args();
    plugin.wasm_plugin = true;
    plugin.selectors = vec!["app=manager".into()];
    let objects = rollout::render(&plugin).expect("renders");
    assert_valid(&objects);
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["WasmPlugin", "EnvoyFilter", "WasmPlugin", "EnvoyFilter"]
    );
    let spec = &objects[0]["spec"];
    assert_eq!(spec["type"], "NETWORK");
    assert_eq!(spec["failStrategy"], "FAIL_OPEN");
    assert_eq!(spec["selector"]["matchLabels"]["app"], "manager");
    assert_eq!(
        spec["pluginConfig"]["collector"]["cluster"],
        rollout::COLLECTOR_CLUSTER
    );
}

#[test]
fn collector_manifests_and_uninstall() {
    let mut with_collector = args();
    with_collector.collector_manifests = Some(CollectorManifests {
        namespace: "dialguard".into(),
        image: "registry.example.com/dialguard:0.1.0".into(),
        storage: "2Gi".into(),
    });
    let objects = rollout::render(&with_collector).expect("renders");
    assert_valid(&objects);
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    // The kustomize base's objects in its order, then the sidecars' side.
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "PersistentVolumeClaim",
            "ConfigMap",
            "Deployment",
            "Service",
            "ServiceMonitor",
            "PrometheusRule",
            "ConfigMap",
            "EnvoyFilter",
            "EnvoyFilter"
        ]
    );
    let of_kind = |kind: &str| objects.iter().find(|o| o["kind"] == kind).expect(kind);
    let service = of_kind("Service");
    assert!(
        service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["name"].as_str().is_some_and(|n| n.starts_with("grpc-")))
    );
    let deployment = of_kind("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    // Ready while the store can write; alive while the process answers.
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["readinessProbe"]["httpGet"],
        json!({ "path": "/readyz", "port": 8080 })
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"],
        json!({ "path": "/healthz", "port": 8080 })
    );
    // The flags' changes to the base.
    assert_eq!(container["image"], "registry.example.com/dialguard:0.1.0");
    assert_eq!(
        of_kind("PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"],
        "2Gi"
    );
    assert!(
        objects
            .iter()
            .filter(|o| o["kind"] != "EnvoyFilter" && o["kind"] != "Namespace")
            .all(|o| o["metadata"]["namespace"] == "dialguard")
    );

    let removal = rollout::uninstall(&with_collector).expect("renders");
    let removed: Vec<(&str, &str)> = removal
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or(""),
                o["metadata"]["namespace"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // The database volume is kept, and so is its namespace (deleting it
    // would delete the volume): deleting the audit record is a deliberate act.
    assert_eq!(
        removed,
        [
            ("ServiceAccount", "dialguard"),
            ("ConfigMap", "dialguard"),
            ("Deployment", "dialguard"),
            ("Service", "dialguard"),
            ("ServiceMonitor", "dialguard"),
            ("PrometheusRule", "dialguard"),
            ("ConfigMap", "dialguard"),
            ("EnvoyFilter", "manager"),
            ("EnvoyFilter", "app")
        ]
    );
    assert!(removal.iter().all(|o| o.get("spec").is_none()));
}

#[test]
fn bad_flags_are_named() {
    type Mutation = fn(&mut RolloutArgs);
    let cases: Vec<(Mutation, &str, &str)> = vec![
        (
            |a| a.namespaces.clear(),
            "--namespace",
            "at least one namespace",
        ),
        (
            |a| a.namespaces.push("Bad_NS".into()),
            "--namespace",
            "namespace name",
        ),
        (
            |a| a.service_cidrs.push("10.96.0.0/33".into()),
            "--service-cidr",
            "expected a CIDR",
        ),
        (
            |a| a.pod_cidrs.push("pods".into()),
            "--pod-cidr",
            "expected a CIDR",
        ),
        (
            |a| a.module_sha256 = Some("abc".into()),
            "--module-sha256",
            "64 hexadecimal",
        ),
        (
            |a| a.module_sha256 = Some("g".repeat(64)),
            "--module-sha256",
            "64 hexadecimal",
        ),
        (
            |a| a.collector = "collector".into(),
            "--collector",
            "HOST:PORT",
        ),
        (
            |a| a.collector = "collector:0".into(),
            "--collector",
            "HOST:PORT",
        ),
        (
            |a| a.collector = "bad host:50051".into(),
            "--collector",
            "HOST:PORT",
        ),
        (
            |a| a.module_url = Some("ftp://x/m.wasm".into()),
            "--module-url",
            "http:// or https://",
        ),
        (
            |a| a.module_url = Some("not a url".into()),
            "--module-url",
            "http:// or https://",
        ),
        (
            |a| a.selectors.push("app".into()),
            "--selector",
            "key=value",
        ),
        (
            |a| a.mode = "block".into(),
            "--mode",
            "expected audit or enforce",
        ),
        (
            |a| {
                a.mode = "enforce".into();
                a.pod_cidrs.clear();
            },
            "--pod-cidr",
            "enforce mode closes only connections dialed to pod IPs",
        ),
    ];
    for (mutate, flag, expected) in cases {
        let mut bad = args();
        mutate(&mut bad);
        let err = rollout::render(&bad).expect_err(flag);
        assert_eq!(err.flag, flag, "{err}");
        assert!(err.to_string().contains(expected), "{err}");
        assert!(rollout::uninstall(&bad).is_err());
    }
    // Enforce with the pod ranges and the enforce module's URL renders.
    let mut enforce = args();
    enforce.mode = "enforce".into();
    enforce.module_url = Some(rollout::in_cluster_module_url("dialguard", Build::Enforce));
    enforce.pod_cidrs = vec!["10.244.0.0/16".into()];
    assert!(rollout::render(&enforce).is_ok());
    // IPv6 collector addresses are fine in brackets.
    let mut v6 = args();
    v6.collector = "[fd00::10]:50051".into();
    assert!(rollout::render(&v6).is_ok());
}

#[test]
fn the_shipped_builds_are_told_apart_by_their_exports() {
    for build in [Build::Audit, Build::Enforce] {
        let path = dist_module(build);
        let bytes = std::fs::read(&path).expect("module");
        let info = module::inspect(&bytes).expect("a dialguard module");
        assert_eq!(info.build, build, "{}", path.display());
        // The same digest coreutils computes.
        let sum = Command::new("sha256sum")
            .arg(&path)
            .output()
            .expect("sha256sum");
        let sum = String::from_utf8_lossy(&sum.stdout);
        assert_eq!(Some(info.sha256.as_str()), sum.split_whitespace().next());
    }
    // Not a module at all, and a module that is no proxy-wasm filter.
    let err = module::inspect(b"{\"mode\": \"audit\"}").expect_err("JSON");
    assert!(err.contains("not a WebAssembly module"), "{err}");
    let empty = b"\0asm\x01\0\0\0";
    let err = module::inspect(empty).expect_err("empty module");
    assert!(err.contains("exports no proxy_on_context_create"), "{err}");
}

fn with_collector() -> CollectorManifests {
    CollectorManifests {
        namespace: "dialguard".into(),
        image: "registry.example.com/dialguard:0.1.0".into(),
        storage: "1Gi".into(),
    }
}

#[test]
fn enforce_with_the_collector_points_to_the_enforce_module() {
    let enforce_file = dist_module(Build::Enforce);
    let enforce_sha = module::sha256_hex(&std::fs::read(&enforce_file).expect("module"));
    for wasm_plugin in [false, true] {
        // No URL and no sha256: the collector's enforce URL and the file's
        // digest for the EnvoyFilter.
        let mut enforce = args();
        enforce.mode = "enforce".into();
        enforce.module_url = None;
        enforce.module_sha256 = None;
        enforce.module_file = Some(enforce_file.clone());
        enforce.wasm_plugin = wasm_plugin;
        enforce.collector_manifests = Some(with_collector());
        let objects = rollout::render(&enforce).expect("renders");
        assert_valid(&objects);
        let url = "http://dialguard-collector.dialguard.svc.cluster.local:8080/module/dialguard_filter_enforce.wasm";
        if wasm_plugin {
            let plugin = objects
                .iter()
                .find(|o| o["kind"] == "WasmPlugin")
                .expect("plugin");
            // A WasmPlugin pulls the release's enforce image; the file's
            // digest is not the image's, so none is claimed.
            assert_eq!(
                plugin["spec"]["url"],
                "oci://ghcr.io/dialguard/dialguard-filter-enforce:0.1.0"
            );
            assert!(plugin["spec"].get("sha256").is_none());
            assert_eq!(plugin["spec"]["pluginConfig"]["mode"], "enforce");
        } else {
            let filter = objects
                .iter()
                .find(|o| o["kind"] == "EnvoyFilter")
                .expect("filter");
            let (config, sha) = filter_config_and_sha(filter);
            assert_eq!(sha, enforce_sha);
            assert_eq!(config["mode"], "enforce");
            assert_eq!(config["moduleSha256"], enforce_sha);
            let remote = &filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]
                ["vm_config"]["code"]["remote"];
            assert_eq!(remote["http_uri"]["uri"], url);
            // The filter accepts it.
            dialguard_filter_core::FilterConfig::from_json(config.to_string().as_bytes())
                .expect("accepted");
        }
    }

    // With only the sha256, the mode picks the URL; audit gets the audit build.
    let mut by_mode = args();
    by_mode.module_url = None;
    by_mode.collector_manifests = Some(with_collector());
    for (mode, file) in [
        ("audit", "dialguard_filter.wasm"),
        ("enforce", "dialguard_filter_enforce.wasm"),
    ] {
        by_mode.mode = mode.into();
        let objects = rollout::render(&by_mode).expect("renders");
        let filter = objects
            .iter()
            .find(|o| o["kind"] == "EnvoyFilter")
            .expect("filter");
        let uri = &filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]["vm_config"]
            ["code"]["remote"]["http_uri"]["uri"];
        assert!(
            uri.as_str()
                .is_some_and(|u| u.ends_with(&format!("/module/{file}"))),
            "{mode}: {uri}"
        );
        let (config, sha) = filter_config_and_sha(filter);
        assert_eq!(
            (config["moduleSha256"].as_str(), sha.as_str()),
            (Some(SHA), SHA)
        );
    }

    // The kill switch: the enforce file in audit mode keeps the enforce URL.
    let mut kill_switch = args();
    kill_switch.module_url = None;
    kill_switch.module_sha256 = None;
    kill_switch.module_file = Some(enforce_file.clone());
    kill_switch.collector_manifests = Some(with_collector());
    let objects = rollout::render(&kill_switch).expect("renders");
    let filter = objects
        .iter()
        .find(|o| o["kind"] == "EnvoyFilter")
        .expect("filter");
    let (config, sha) = filter_config_and_sha(filter);
    assert_eq!(
        (config["mode"].as_str(), sha.as_str()),
        (Some("audit"), enforce_sha.as_str())
    );

    // A URL of the user's own with the enforce file: its build is known.
    let mut own_url = args();
    own_url.mode = "enforce".into();
    own_url.module_url = Some("https://modules.example.com/dialguard/v0.1.0.wasm".into());
    own_url.module_sha256 = Some(enforce_sha.to_ascii_uppercase());
    own_url.module_file = Some(enforce_file);
    let objects = rollout::render(&own_url).expect("renders");
    assert_valid(&objects);
    assert_eq!(filter_config_and_sha(&objects[0]).1, enforce_sha);
}

#[test]
fn a_module_that_cannot_run_the_mode_is_refused_naming_the_flag() {
    let audit_file = dist_module(Build::Audit);
    let enforce_file = dist_module(Build::Enforce);
    let audit_sha = module::sha256_hex(&std::fs::read(&audit_file).expect("module"));
    let not_wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mismatch = format!(
        "does not match --module {} (sha256 {audit_sha})",
        audit_file.display()
    );
    let enforce = || RolloutArgs {
        mode: "enforce".into(),
        ..args()
    };
    let cases: Vec<(RolloutArgs, &str, &str)> = vec![
        // Today's trap: enforce with the audit module's URL.
        (
            enforce(),
            "--module-url",
            "names the audit build, which refuses --mode enforce",
        ),
        (
            RolloutArgs {
                module_url: Some("https://modules.example.com/dialguard.wasm".into()),
                ..enforce()
            },
            "--module-url",
            "cannot tell which build this URL serves",
        ),
        (
            RolloutArgs {
                module_url: Some("https://modules.example.com/dialguard.wasm".into()),
                module_file: Some(audit_file.clone()),
                module_sha256: None,
                ..enforce()
            },
            "--module",
            "this is the audit build",
        ),
        (
            RolloutArgs {
                module_url: None,
                module_sha256: None,
                module_file: Some(audit_file.clone()),
                collector_manifests: Some(with_collector()),
                ..enforce()
            },
            "--module",
            "expected the enforce build, dialguard_filter_enforce.wasm",
        ),
        // The file and the URL disagree about the build.
        (
            RolloutArgs {
                module_sha256: None,
                module_file: Some(enforce_file.clone()),
                ..enforce()
            },
            "--module-url",
            "names the audit build but --module",
        ),
        (
            RolloutArgs {
                module_url: Some(rollout::in_cluster_module_url("dialguard", Build::Enforce)),
                module_sha256: None,
                module_file: Some(audit_file.clone()),
                ..args()
            },
            "--module-url",
            "names the enforce build but --module",
        ),
        // The file and the sha256 disagree.
        (
            RolloutArgs {
                module_file: Some(audit_file.clone()),
                ..args()
            },
            "--module-sha256",
            &mismatch,
        ),
        (
            RolloutArgs {
                module_file: Some(not_wasm),
                module_sha256: None,
                ..args()
            },
            "--module",
            "not a WebAssembly module",
        ),
        (
            RolloutArgs {
                module_file: Some("/nonexistent/dialguard_filter.wasm".into()),
                ..args()
            },
            "--module",
            "cannot read it",
        ),
        (
            RolloutArgs {
                module_sha256: None,
                ..args()
            },
            "--module-sha256",
            "or --module PATH",
        ),
        (
            RolloutArgs {
                module_url: None,
                ..args()
            },
            "--module-url",
            "only --with-collector (the collector's URL) and --wasm-plugin (the release's filter image) know it",
        ),
    ];
    for (bad, flag, expected) in cases {
        let err = rollout::render(&bad).expect_err(expected);
        assert_eq!(err.flag, flag, "{err}");
        assert!(err.to_string().contains(expected), "{err}");
    }
    // The audit file with its own sha256 in audit mode is fine.
    let audit = RolloutArgs {
        module_file: Some(audit_file),
        module_sha256: Some(audit_sha.clone()),
        ..args()
    };
    let objects = rollout::render(&audit).expect("renders");
    assert_eq!(filter_config_and_sha(&objects[0]).1, audit_sha);
}

#[test]
fn the_collector_is_told_which_namespaces_to_expect() {
    let mut rolled = args();
    rolled.namespaces = vec!["manager".into(), "app".into(), "manager".into()];
    rolled.collector_manifests = Some(with_collector());
    let objects = rollout::render(&rolled).expect("renders");
    let config_map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap")
        .expect("ConfigMap");
    assert_eq!(
        config_map["metadata"]["name"],
        rollout::EXPECTED_NAMESPACES_CONFIGMAP
    );
    assert_eq!(config_map["metadata"]["namespace"], "dialguard");
    assert_eq!(config_map["data"]["namespaces"], "manager\napp\n");

    let (pod, args) = collector_pod(&objects);
    let container = &pod["containers"][0];
    let file = flag(&args, "--expect-namespaces-file");
    assert_eq!(file, "/etc/dialguard/expected-namespaces/namespaces");
    // Both builds are served.
    assert!(
        args.windows(2)
            .any(|w| w == ["--module", "/opt/dialguard/dialguard_filter.wasm"])
    );
    assert!(args.windows(2).any(|w| w
        == [
            "--enforce-module",
            "/opt/dialguard/dialguard_filter_enforce.wasm"
        ]));
    // The file is the ConfigMap's key inside the directory it is mounted as.
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"]["name"] == rollout::EXPECTED_NAMESPACES_CONFIGMAP)
        .expect("ConfigMap volume");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("mounted");
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees updates"
    );
    assert_eq!(
        format!(
            "{}/{}",
            mount["mountPath"].as_str().expect("path"),
            rollout::EXPECTED_NAMESPACES_KEY
        ),
        file
    );
    // A new list changes the ConfigMap only: the collector reads the file
    // again when kubelet updates it, so the pod template (which a kustomize
    // overlay could not keep in step with a hash of the list) stays as it is.
    let template = |objects: &[Value]| {
        objects
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .expect("Deployment")["spec"]["template"]
            .clone()
    };
    let before = template(&objects);
    rolled.namespaces.push("billing".into());
    let after = rollout::render(&rolled).expect("renders");
    assert_eq!(template(&after), before);
    assert!(
        after
            .iter()
            .any(|o| o["data"]["namespaces"] == "manager\napp\nbilling\n")
    );
}

// ---------------------------------------------------------------------------
// --collector-mtls istio
// ---------------------------------------------------------------------------

/// The `dialguard_collector` cluster of a namespace's EnvoyFilter.
fn collector_cluster_of(envoy_filter: &Value) -> Value {
    envoy_filter["spec"]["configPatches"]
        .as_array()
        .expect("patches")
        .iter()
        .map(|patch| &patch["patch"]["value"])
        .find(|value| value["name"] == rollout::COLLECTOR_CLUSTER)
        .cloned()
        .expect("the collector cluster patch")
}

/// The first `sds_config` Istio itself renders for its SDS secrets, from a
/// real sidecar's config dump (shared/testdata/istio).
fn istio_sds_config() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/testdata/istio/sidecar-listeners-configdump.json"
    );
    let dump: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("Istio's config dump"))
            .expect("JSON");
    fn find(value: &Value) -> Option<Value> {
        match value {
            Value::Object(map) => map
                .get("tls_certificate_sds_secret_configs")
                .and_then(|configs| configs[0].get("sds_config").cloned())
                .or_else(|| map.values().find_map(find)),
            Value::Array(items) => items.iter().find_map(find),
            _ => None,
        }
    }
    find(&dump).expect("an SDS secret config in Istio's dump")
}

#[test]
fn collector_mtls_istio_uses_the_workload_certificate_and_mesh_root_from_sds() {
    let objects = rollout::render(&RolloutArgs {
        collector_mtls: CollectorMtls::Istio,
        ..args()
    })
    .expect("renders");
    assert_valid(&objects);
    let host = "dialguard-collector.dialguard.svc.cluster.local";
    for envoy_filter in &objects {
        let cluster = collector_cluster_of(envoy_filter);
        let socket = &cluster["transport_socket"];
        assert_eq!(socket["name"], "envoy.transport_sockets.tls");
        let tls = &socket["typed_config"];
        assert_eq!(
            tls["@type"],
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
        );
        assert_eq!(tls["sni"], host);
        let common = &tls["common_tls_context"];
        assert_eq!(common["alpn_protocols"], json!(["h2"]));
        let certificate = &common["tls_certificate_sds_secret_configs"][0];
        let root = &common["combined_validation_context"]["validation_context_sds_secret_config"];
        assert_eq!(certificate["name"], "default");
        assert_eq!(root["name"], "ROOTCA");
        // Exactly how Istio configures its own SDS secrets.
        let istio = istio_sds_config();
        assert_eq!(certificate["sds_config"], istio, "workload certificate");
        assert_eq!(root["sds_config"], istio, "mesh root");
        assert_eq!(
            common["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"],
            json!([{ "san_type": "DNS", "matcher": { "exact": host } }])
        );
    }
    // Off (the default): plain text, as before.
    let plain = rollout::render(&args()).expect("renders");
    assert!(
        collector_cluster_of(&plain[0])
            .get("transport_socket")
            .is_none()
    );
}

/// Envoy 1.40 itself (dist/envoy, `--mode validate`) accepts the rendered
/// cluster beside an `sds-grpc` cluster like Istio's bootstrap has.
#[test]
fn envoy_accepts_the_istio_mtls_collector_cluster() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir =
        std::env::var_os("DIALGUARD_DIST").map_or_else(|| root.join("dist"), |d| root.join(d));
    let envoy = dir.join("envoy");
    assert!(
        envoy.exists(),
        "{} is missing: run `cargo xtask dist` first",
        envoy.display()
    );
    let objects = rollout::render(&RolloutArgs {
        collector_mtls: CollectorMtls::Istio,
        collector: "10.96.0.50:50051".into(),
        ..args()
    })
    .expect("renders");
    let cluster = collector_cluster_of(&objects[0]);
    // An IP literal is matched as an IP SAN.
    assert_eq!(
        cluster["transport_socket"]["typed_config"]["common_tls_context"]["combined_validation_context"]
            ["default_validation_context"]["match_typed_subject_alt_names"][0]["san_type"],
        "IP_ADDRESS"
    );
    let temp = tempfile::tempdir().expect("tempdir");
    let sds = json!({
        "name": "sds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} }
            }
        },
        "load_assignment": { "cluster_name": "sds-grpc", "endpoints": [{ "lb_endpoints": [{ "endpoint": {
            "address": { "pipe": { "path": temp.path().join("sds.sock") } }
        }}]}]},
    });
    let bootstrap = |cluster: &Value| {
        let path = temp.path().join("bootstrap.json");
        let text = json!({
            "node": { "id": "sidecar~10.244.0.9~manager-0.manager~manager.svc.cluster.local", "cluster": "manager" },
            "static_resources": { "clusters": [sds.clone(), cluster.clone()] },
        });
        std::fs::write(&path, text.to_string()).expect("write the bootstrap");
        let output = Command::new(&envoy)
            .args(["--mode", "validate", "--log-level", "warn", "-c"])
            .arg(&path)
            .output()
            .expect("run envoy --mode validate");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, output) = bootstrap(&cluster);
    assert!(ok, "Envoy refused the cluster: {output}");
    // The check has teeth: a misspelt field is refused.
    let mut broken = cluster.clone();
    broken["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_config"] =
        json!([]);
    let (ok, output) = bootstrap(&broken);
    assert!(
        !ok && output.contains("tls_certificate_sds_secret_config"),
        "{output}"
    );
}

#[test]
fn the_collector_deployed_with_istio_mtls_serves_tls_and_trusts_the_mesh_root() {
    let objects = rollout::render(&RolloutArgs {
        collector_mtls: CollectorMtls::Istio,
        collector_manifests: Some(with_collector()),
        module_url: None,
        ..args()
    })
    .expect("renders");
    assert_valid(&objects);
    let (pod, args) = collector_pod(&objects);
    let container = &pod["containers"][0];
    assert_eq!(flag(&args, "--tls-cert"), "/etc/dialguard/tls/tls.crt");
    assert_eq!(flag(&args, "--tls-key"), "/etc/dialguard/tls/tls.key");
    assert_eq!(
        flag(&args, "--grpc-client-ca"),
        "/etc/dialguard/istio-ca/root-cert.pem"
    );
    let volumes = pod["volumes"].as_array().expect("volumes");
    assert!(volumes.contains(
        &json!({ "name": "tls", "secret": { "secretName": "dialguard-collector-tls" } })
    ));
    assert!(
        volumes.contains(
            &json!({ "name": "istio-ca", "configMap": { "name": "istio-ca-root-cert" } })
        )
    );
    // Probes and the module download speak TLS too (one certificate for both listeners).
    assert_eq!(container["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert_eq!(container["livenessProbe"]["httpGet"]["scheme"], "HTTPS");
    let envoy_filter = objects
        .iter()
        .find(|o| o["kind"] == "EnvoyFilter")
        .expect("an EnvoyFilter");
    let code = &envoy_filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]
        ["vm_config"]["code"]["remote"]["http_uri"]["uri"];
    assert!(
        code.as_str()
            .is_some_and(|uri| uri.starts_with("https://dialguard-collector.dialguard.svc")),
        "{code}"
    );
}

/// The collector Deployment's pod spec and its container's arguments.
fn collector_pod(objects: &[Value]) -> (&Value, Vec<&str>) {
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("the collector Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let args = pod["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    (pod, args)
}

/// The value given to `name` in `args`.
fn flag<'a>(args: &[&'a str], name: &str) -> &'a str {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1])
        .unwrap_or_else(|| panic!("{name} missing from {args:?}"))
}

// ---------------------------------------------------------------------------
// Modules as OCI images (WasmPlugin)
// ---------------------------------------------------------------------------

const DIGEST: &str = "4f2a0a5e3c1b9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e";

fn plugin_args() -> RolloutArgs {
    RolloutArgs {
        wasm_plugin: true,
        module_url: None,
        module_sha256: None,
        ..args()
    }
}

fn plugin_spec(objects: &[Value]) -> &Value {
    &objects
        .iter()
        .find(|o| o["kind"] == "WasmPlugin")
        .expect("a WasmPlugin")["spec"]
}

#[test]
fn wasm_plugins_pull_the_release_filter_image_by_default() {
    let objects = rollout::render(&plugin_args()).expect("renders");
    assert_valid(&objects);
    let spec = plugin_spec(&objects);
    assert_eq!(
        spec["url"],
        "oci://ghcr.io/dialguard/dialguard-filter:0.1.0"
    );
    assert_eq!(
        spec["url"],
        format!(
            "oci://{}",
            dialguard_envoyfilter::image::reference(dialguard_envoyfilter::image::FILTER_IMAGE)
        )
    );
    // A tag alone pins nothing: no sha256 is claimed, in the spec or the hello.
    assert!(spec.get("sha256").is_none(), "{spec}");
    assert!(spec["pluginConfig"].get("moduleSha256").is_none());
    assert!(spec.get("imagePullPolicy").is_none());

    // Enforce mode picks the enforce image.
    let enforce = rollout::render(&RolloutArgs {
        mode: "enforce".into(),
        ..plugin_args()
    })
    .expect("renders");
    assert_eq!(
        plugin_spec(&enforce)["url"],
        "oci://ghcr.io/dialguard/dialguard-filter-enforce:0.1.0"
    );
    // So does the enforce file, whose build decides.
    let from_file = rollout::render(&RolloutArgs {
        module_file: Some(dist_module(Build::Enforce)),
        ..plugin_args()
    })
    .expect("renders");
    assert_eq!(
        plugin_spec(&from_file)["url"],
        "oci://ghcr.io/dialguard/dialguard-filter-enforce:0.1.0"
    );
    // The file's sha256 is not the image's digest: it is not claimed.
    assert!(plugin_spec(&from_file).get("sha256").is_none());
}

#[test]
fn oci_images_pinned_by_digest_with_pull_policy_and_secret() {
    let registry = "oci://registry.example.com:5000/platform/dialguard-filter";
    // The digest in the URL is the manifest digest Istio checks.
    let pinned = rollout::render(&RolloutArgs {
        module_url: Some(format!("{registry}@sha256:{DIGEST}")),
        image_pull_policy: Some(ImagePullPolicy::Always),
        image_pull_secret: Some("registry-credentials".into()),
        ..plugin_args()
    })
    .expect("renders");
    assert_valid(&pinned);
    let spec = plugin_spec(&pinned);
    assert_eq!(spec["sha256"], DIGEST);
    assert_eq!(spec["pluginConfig"]["moduleSha256"], DIGEST);
    assert_eq!(spec["imagePullPolicy"], "Always");
    assert_eq!(spec["imagePullSecret"], "registry-credentials");
    // Or by tag with --module-sha256 as the manifest digest; both must agree.
    let tagged = rollout::render(&RolloutArgs {
        module_url: Some(format!("{registry}:0.1.0")),
        module_sha256: Some(DIGEST.to_uppercase()),
        image_pull_policy: Some(ImagePullPolicy::IfNotPresent),
        ..plugin_args()
    })
    .expect("renders");
    assert_valid(&tagged);
    assert_eq!(plugin_spec(&tagged)["sha256"], DIGEST);
    assert_eq!(plugin_spec(&tagged)["imagePullPolicy"], "IfNotPresent");
    let both = rollout::render(&RolloutArgs {
        module_url: Some(format!("{registry}:0.1.0@sha256:{DIGEST}")),
        module_sha256: Some(DIGEST.into()),
        ..plugin_args()
    })
    .expect("renders");
    assert_eq!(plugin_spec(&both)["sha256"], DIGEST);
}

#[test]
fn oci_modules_that_cannot_work_are_refused_naming_the_flag() {
    let audit_image = "oci://ghcr.io/dialguard/dialguard-filter:0.1.0";
    let cases: Vec<(RolloutArgs, &str, &str)> = vec![
        // Envoy cannot pull an image: the EnvoyFilter form refuses it.
        (
            RolloutArgs {
                module_url: Some(audit_image.into()),
                ..args()
            },
            "--module-url",
            "expected --wasm-plugin, or an https:// or http:// URL",
        ),
        (
            RolloutArgs {
                module_url: Some("oci://ghcr.io/dialguard/dialguard-filter@sha256:abc".into()),
                ..plugin_args()
            },
            "--module-url",
            "expected an OCI image reference",
        ),
        (
            RolloutArgs {
                module_url: Some("oci://ghcr.io".into()),
                ..plugin_args()
            },
            "--module-url",
            "expected an OCI image reference",
        ),
        (
            RolloutArgs {
                module_url: Some("oci://Bad Registry/dialguard-filter:1".into()),
                ..plugin_args()
            },
            "--module-url",
            "expected an OCI image reference",
        ),
        (
            RolloutArgs {
                module_url: Some(format!(
                    "oci://ghcr.io/dialguard/dialguard-filter@sha256:{DIGEST}"
                )),
                module_sha256: Some(SHA.into()),
                ..plugin_args()
            },
            "--module-sha256",
            "the image manifest's digest",
        ),
        // Enforce needs the enforce image.
        (
            RolloutArgs {
                module_url: Some(audit_image.into()),
                mode: "enforce".into(),
                ..plugin_args()
            },
            "--module-url",
            "expected the enforce build: an image named dialguard-filter-enforce",
        ),
        (
            RolloutArgs {
                module_url: Some("oci://registry.example.com/filters/guard:1".into()),
                mode: "enforce".into(),
                ..plugin_args()
            },
            "--module-url",
            "cannot tell which build",
        ),
        (
            RolloutArgs {
                module_url: Some(audit_image.into()),
                module_file: Some(dist_module(Build::Enforce)),
                ..plugin_args()
            },
            "--module-url",
            "names the audit build but --module",
        ),
        // Pull settings only where istio-agent pulls.
        (
            RolloutArgs {
                image_pull_policy: Some(ImagePullPolicy::Always),
                ..args()
            },
            "--image-pull-policy",
            "expected --wasm-plugin",
        ),
        (
            RolloutArgs {
                image_pull_secret: Some("creds".into()),
                wasm_plugin: true,
                ..args()
            },
            "--image-pull-secret",
            "expected an oci:// --module-url",
        ),
        (
            RolloutArgs {
                image_pull_secret: Some("Bad_Secret".into()),
                ..plugin_args()
            },
            "--image-pull-secret",
            "expected the name of a Secret",
        ),
    ];
    for (bad, flag, expected) in cases {
        let err = rollout::render(&bad).expect_err(expected);
        assert_eq!(err.flag, flag, "{err}");
        assert!(err.to_string().contains(expected), "{err}");
    }
}
