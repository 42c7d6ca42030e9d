//! `dialguard rollout` rendering: every Istio document validates against
//! Istio's own CRD schemas (../shared/istio-crds), made strict the way
//! `kubectl apply --validate=strict` is (unknown fields rejected); bad flags
//! get an error naming the flag and nothing is rendered.

use dialguard_envoyfilter::rollout::{self, CollectorManifests, RolloutArgs};
use serde_json::{Value, json};

const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/istio-crds");

fn args() -> RolloutArgs {
    RolloutArgs {
        namespaces: vec!["manager".into(), "app".into()],
        collector: "dialguard-collector.dialguard.svc.cluster.local:50051".into(),
        module_url: "http://dialguard-collector.dialguard.svc.cluster.local:8080/module/dialguard_filter.wasm".into(),
        module_sha256: "9a568aa32a25ec828ae7119647f1a1fb3ff56722bfdcc880c6f45ca7ce6ee868".into(),
        service_cidrs: vec!["10.96.0.0/12".into()],
        pod_cidrs: vec!["10.244.0.0/16".into()],
        ..RolloutArgs::default()
    }
}

/// Kubernetes prunes (or, strictly, rejects) fields a structural schema does
/// not declare; plain JSON Schema allows them. Close every object schema that
/// lists properties and does not preserve unknown fields.
fn strict(schema: &mut Value) {
    if let Some(object) = schema.as_object_mut() {
        let preserves = object.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
        if object.contains_key("properties")
            && !preserves
            && !object.contains_key("additionalProperties")
        {
            object.insert("additionalProperties".into(), json!(false));
        }
        for value in object.values_mut() {
            strict(value);
        }
    } else if let Some(items) = schema.as_array_mut() {
        items.iter_mut().for_each(strict);
    }
}

fn validator(crd_file: &str, version: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(format!("{CRDS}/{crd_file}")).expect("CRD file");
    let crd: Value = serde_yaml_ng::from_str(&text).expect("CRD YAML");
    let mut schema = crd["spec"]["versions"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == version))
        .map(|v| v["schema"]["openAPIV3Schema"].clone())
        .expect("version schema");
    // The API server handles these itself.
    schema["properties"]["apiVersion"] = json!({ "type": "string" });
    schema["properties"]["kind"] = json!({ "type": "string" });
    schema["properties"]["metadata"] = json!({ "type": "object" });
    strict(&mut schema);
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn assert_valid(objects: &[Value]) {
    let envoy_filter = validator("envoyfilter.crd.yaml", "v1alpha3");
    let wasm_plugin = validator("wasmplugin.crd.yaml", "v1alpha1");
    for object in objects {
        let validator = match object["kind"].as_str() {
            Some("EnvoyFilter") => &envoy_filter,
            Some("WasmPlugin") => &wasm_plugin,
            _ => continue,
        };
        let errors: Vec<String> = validator
            .iter_errors(object)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", object["kind"]);
    }
}

#[test]
fn strictness_catches_a_misspelt_field() {
    let mut objects = rollout::render(&args()).expect("renders");
    objects[0]["spec"]["workloadSelecter"] = json!({ "labels": { "app": "x" } });
    let validator = validator("envoyfilter.crd.yaml", "v1alpha3");
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
        assert_eq!(remote["sha256"], args().module_sha256);
        assert_eq!(remote["http_uri"]["cluster"], rollout::MODULE_CLUSTER);
        let filter_config: Value =
            serde_json::from_str(config["configuration"]["value"].as_str().expect("string"))
                .expect("JSON");
        assert_eq!(
            filter_config["collector"]["cluster"],
            rollout::COLLECTOR_CLUSTER
        );
        assert_eq!(filter_config["serviceCidrs"], json!(["10.96.0.0/12"]));
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
    assert_eq!(
        kinds,
        [
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "EnvoyFilter",
            "EnvoyFilter"
        ]
    );
    let service = &objects[2];
    assert!(
        service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["name"].as_str().is_some_and(|n| n.starts_with("grpc-")))
    );
    assert_eq!(objects[1]["spec"]["replicas"], 1);

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
    // The database volume is kept: deleting the audit record is a deliberate act.
    assert_eq!(
        removed,
        [
            ("Deployment", "dialguard"),
            ("Service", "dialguard"),
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
            |a| a.module_sha256 = "abc".into(),
            "--module-sha256",
            "64 hexadecimal",
        ),
        (
            |a| a.module_sha256 = "g".repeat(64),
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
            |a| a.module_url = "ftp://x/m.wasm".into(),
            "--module-url",
            "http:// or https://",
        ),
        (
            |a| a.module_url = "not a url".into(),
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
    // Enforce with the pod ranges renders.
    let mut enforce = args();
    enforce.mode = "enforce".into();
    enforce.pod_cidrs = vec!["10.244.0.0/16".into()];
    assert!(rollout::render(&enforce).is_ok());
    // IPv6 collector addresses are fine in brackets.
    let mut v6 = args();
    v6.collector = "[fd00::10]:50051".into();
    assert!(rollout::render(&v6).is_ok());
}
