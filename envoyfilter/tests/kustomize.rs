//! The kustomize base (`deploy/kustomize/base/`) and its example overlay,
//! rendered by the real `kubectl kustomize`: the core objects pass the
//! Kubernetes schemas strictly (PyPI's `kubernetes-validate`, which `cargo
//! xtask test` installs into `.tools/`), the ServiceMonitor and
//! PrometheusRule the shipped prometheus-operator CRDs, the rules `promtool
//! check rules`; the rule file and the dashboard are embedded verbatim from
//! their homes; and `rollout --with-collector` renders, object by object,
//! what the overlay applies.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::CrdValidators;
use dialguard_envoyfilter::base::BASE_FILES;
use dialguard_envoyfilter::image;
use dialguard_envoyfilter::rollout::{self, CollectorManifests, CollectorMtls, RolloutArgs};
use serde::Deserialize;
use serde_json::{Value, json};

const REGENERATE: &str =
    "UPDATE_KUSTOMIZE=1 cargo test --release -p dialguard-envoyfilter --test kustomize";
/// Kubernetes versions the core objects must be valid for: an old one
/// still in use with Istio 1.20+, and a recent one.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.35.0"];

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn kubectl() -> PathBuf {
    let kubectl = std::env::var_os("DIALGUARD_KUBECTL").map_or_else(
        || {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join("kubectl"))
                .find(|path| path.is_file())
                .unwrap_or_else(|| PathBuf::from("/usr/bin/kubectl"))
        },
        PathBuf::from,
    );
    assert!(
        kubectl.is_file(),
        "kubectl (with its built-in kustomize) is missing: it is not on PATH nor at {}; \
         install kubectl or set DIALGUARD_KUBECTL",
        kubectl.display()
    );
    kubectl
}

/// The objects of a YAML stream.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize DIR`.
fn kustomize(dir: &str) -> Vec<Value> {
    let output = Command::new(kubectl())
        .arg("kustomize")
        .arg(repo(dir))
        .output()
        .expect("run kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    documents(&String::from_utf8_lossy(&output.stdout))
}

fn by_kind_and_name(objects: &[Value]) -> BTreeMap<(String, String), Value> {
    objects
        .iter()
        .map(|o| {
            let key = (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            (key, o.clone())
        })
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The rollout flags the example overlay corresponds to.
fn overlay_equivalent() -> RolloutArgs {
    RolloutArgs {
        namespaces: vec!["a".into(), "b".into()],
        collector: rollout::in_cluster_collector("dialguard"),
        wasm_plugin: true,
        collector_manifests: Some(CollectorManifests {
            namespace: "dialguard".into(),
            image: "registry.example.com/platform/dialguard-collector:0.1.0".into(),
            storage: "20Gi".into(),
        }),
        ..RolloutArgs::default()
    }
}

/// The collector's objects only (the base has no sidecar side).
fn collector_side(objects: Vec<Value>) -> Vec<Value> {
    objects
        .into_iter()
        .filter(|o| !matches!(o["kind"].as_str(), Some("EnvoyFilter" | "WasmPlugin")))
        .collect()
}

#[test]
fn rollout_with_collector_renders_what_the_overlay_applies() {
    let overlay = by_kind_and_name(&kustomize("deploy/kustomize/overlays/example"));
    let rendered = by_kind_and_name(&collector_side(
        rollout::render(&overlay_equivalent()).expect("renders"),
    ));
    assert_eq!(
        overlay.keys().collect::<Vec<_>>(),
        rendered.keys().collect::<Vec<_>>()
    );
    for (key, object) in &overlay {
        assert!(
            rendered[key] == *object,
            "{key:?} differs:\nkubectl kustomize: {}\nrollout: {}",
            serde_json::to_string_pretty(object).unwrap_or_default(),
            serde_json::to_string_pretty(&rendered[key]).unwrap_or_default()
        );
    }
    // The overlay changed what it says it changes.
    let objects: Vec<Value> = overlay.into_values().collect();
    let pod = &find(&objects, "Deployment", "dialguard-collector")["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example.com/platform/dialguard-collector:0.1.0"
    );
    assert_eq!(
        find(&objects, "PersistentVolumeClaim", "dialguard-collector-db")["spec"]["resources"]["requests"]
            ["storage"],
        "20Gi"
    );
    assert_eq!(
        find(
            &objects,
            "ConfigMap",
            rollout::EXPECTED_NAMESPACES_CONFIGMAP
        )["data"]["namespaces"],
        "a\nb\n"
    );
}

#[test]
fn the_base_is_the_collector_hardened_from_the_release_image() {
    let objects = kustomize("deploy/kustomize/base");
    let kinds: std::collections::BTreeSet<&str> =
        objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "PersistentVolumeClaim",
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(kind), "no {kind} in the base");
    }
    let account = find(&objects, "ServiceAccount", "dialguard-collector");
    assert_eq!(account["automountServiceAccountToken"], false);
    let pod = &find(&objects, "Deployment", "dialguard-collector")["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "dialguard-collector");
    assert_eq!(
        pod["securityContext"],
        json!({
            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
            "seccompProfile": { "type": "RuntimeDefault" },
        })
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"],
        image::reference(image::COLLECTOR_IMAGE),
        "the base's image is the release's (envoyfilter/src/image.rs)"
    );
    assert_eq!(
        container["securityContext"],
        json!({
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        })
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"][kind][resource].is_string(),
                "resources.{kind}.{resource}"
            );
        }
    }
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    // Both builds served from the image.
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let module_dir = image::IMAGE_MODULE_DIR;
    assert!(args.windows(2).any(|w| w
        == [
            "--module",
            format!("{module_dir}/dialguard_filter.wasm").as_str()
        ]));
    assert!(args.windows(2).any(|w| w
        == [
            "--enforce-module",
            format!("{module_dir}/dialguard_filter_enforce.wasm").as_str()
        ]));
    // Writable: the database volume and /tmp (SQLite's temporary files),
    // nothing else.
    let mounts: BTreeMap<&str, &str> = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter(|m| m["readOnly"] != true)
        .filter_map(|m| Some((m["mountPath"].as_str()?, m["name"].as_str()?)))
        .collect();
    assert_eq!(
        mounts,
        BTreeMap::from([("/tmp", "tmp"), ("/var/lib/dialguard", "db")])
    );
    assert!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["name"] == "tmp" && v["emptyDir"].is_object())
    );
    // No sha256 of the namespace list on the pod: the collector re-reads it.
    assert!(
        !serde_json::to_string(pod)
            .unwrap_or_default()
            .contains("expected-namespaces-sha256")
    );
}

#[test]
fn the_kustomization_lists_the_files_rollout_embeds() {
    let text = std::fs::read_to_string(repo("deploy/kustomize/base/kustomization.yaml"))
        .expect("kustomization.yaml");
    let kustomization: Value = serde_yaml_ng::from_str(&text).expect("YAML");
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let embedded: Vec<&str> = BASE_FILES.iter().map(|(file, _)| *file).collect();
    assert_eq!(
        resources, embedded,
        "envoyfilter/src/base.rs embeds other files than the base lists"
    );
}

/// `.tools/kubernetes-validate-*` (installed by `cargo xtask test`), or
/// `$DIALGUARD_KUBERNETES_VALIDATE`.
fn kubernetes_validate() -> PathBuf {
    if let Some(dir) = std::env::var_os("DIALGUARD_KUBERNETES_VALIDATE") {
        return PathBuf::from(dir);
    }
    let tools = repo(".tools");
    std::fs::read_dir(&tools)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kubernetes-validate-"))
                && path.join("kubernetes_validate").is_dir()
        })
        .unwrap_or_else(|| {
            panic!(
                "PyPI's kubernetes-validate is missing from {}: `cargo xtask test` installs it \
                 (or `pip install --target .tools/kubernetes-validate-1.37.0 kubernetes-validate==1.37.0`)",
                tools.display()
            )
        })
}

/// `kubernetes-validate --strict` over `objects` for each version: Ok or its output.
fn validate_strictly(objects: &[Value]) -> Result<(), String> {
    let temp = tempfile::tempdir().expect("tempdir");
    let file = temp.path().join("objects.yaml");
    let mut text = String::new();
    for object in objects {
        text.push_str("---\n");
        text.push_str(&serde_yaml_ng::to_string(object).expect("YAML"));
    }
    std::fs::write(&file, text).expect("write objects");
    for version in KUBERNETES_VERSIONS {
        let output = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--no-warn", "-k"])
            .arg(version)
            .arg(&file)
            .env("PYTHONPATH", kubernetes_validate())
            .output()
            .expect("run python3 -m kubernetes_validate");
        let printed = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(format!("Kubernetes {version}: {printed}"));
        }
        // Each object was checked against a schema, none skipped.
        let passed = printed.matches(" passed for resource ").count();
        assert_eq!(passed, objects.len(), "Kubernetes {version}: {printed}");
    }
    Ok(())
}

fn core_objects(objects: &[Value]) -> Vec<Value> {
    objects
        .iter()
        .filter(|o| {
            o["apiVersion"]
                .as_str()
                .is_some_and(|v| v == "v1" || v.starts_with("apps/"))
        })
        .cloned()
        .collect()
}

#[test]
fn core_objects_pass_the_kubernetes_schemas_strictly() {
    let mtls = rollout::render(&RolloutArgs {
        collector_mtls: CollectorMtls::Istio,
        ..overlay_equivalent()
    })
    .expect("renders");
    for (what, objects) in [
        ("base", kustomize("deploy/kustomize/base")),
        ("overlay", kustomize("deploy/kustomize/overlays/example")),
        ("rollout --collector-mtls istio", mtls),
    ] {
        let core = core_objects(&objects);
        assert!(core.len() >= 7, "{what}: {} core objects", core.len());
        if let Err(output) = validate_strictly(&core) {
            panic!("{what}: {output}");
        }
    }
    // The check has teeth: a misspelt field is refused.
    let mut broken = core_objects(&kustomize("deploy/kustomize/base"));
    let deployment = broken
        .iter_mut()
        .find(|o| o["kind"] == "Deployment")
        .expect("Deployment");
    deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRot"] = json!(true);
    let output = validate_strictly(&broken).expect_err("a misspelt field");
    assert!(output.contains("runAsNonRot"), "{output}");
}

#[test]
fn monitoring_objects_pass_the_shipped_crds() {
    let validators = CrdValidators::load();
    let mtls = rollout::render(&RolloutArgs {
        collector_mtls: CollectorMtls::Istio,
        ..overlay_equivalent()
    })
    .expect("renders");
    for (what, objects) in [
        ("base", kustomize("deploy/kustomize/base")),
        ("overlay", kustomize("deploy/kustomize/overlays/example")),
        ("rollout --collector-mtls istio", mtls),
    ] {
        // ServiceMonitor and PrometheusRule (and the WasmPlugin side).
        assert!(validators.assert_valid(&objects) >= 2, "{what}");
    }
    let objects = kustomize("deploy/kustomize/base");
    let monitor = find(&objects, "ServiceMonitor", "dialguard-collector");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http-api");
    // The job label the rules' DialguardCollectorDown expects.
    let service = find(&objects, "Service", "dialguard-collector");
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(service["metadata"]["labels"][job_label], "dialguard");
    // The check has teeth.
    let mut broken = monitor.clone();
    broken["spec"]["endpoints"][0]["scrapeInterval"] = json!("30s");
    let errors = validators.errors(&broken).expect("a ServiceMonitor");
    assert!(
        errors.iter().any(|e| e.contains("scrapeInterval")),
        "{errors:?}"
    );
}

fn promtool() -> String {
    let binary = std::env::var("DIALGUARD_PROMTOOL").unwrap_or("/usr/bin/promtool".into());
    assert!(
        Path::new(&binary).exists(),
        "{binary} not found: install Debian's `prometheus` (`cargo xtask test` does) or set DIALGUARD_PROMTOOL"
    );
    binary
}

/// Each non-empty line of `text` indented by `by` spaces.
fn indent(text: &str, by: usize) -> String {
    text.split_inclusive('\n')
        .map(|line| {
            if line.trim().is_empty() {
                line.to_owned()
            } else {
                format!("{}{line}", " ".repeat(by))
            }
        })
        .collect()
}

const LABELS: &str = "  labels:\n    app.kubernetes.io/name: dialguard\n    app.kubernetes.io/component: collector\n";

fn generated_header(home: &str, what: &str) -> String {
    format!(
        "# GENERATED from {home} (the home of {what}), embedded verbatim:\n\
         # edit that file, then regenerate with\n# `{REGENERATE}`.\n"
    )
}

fn generated_prometheus_rule() -> String {
    let rules =
        std::fs::read_to_string(repo("deploy/prometheus/dialguard-rules.yaml")).expect("rules");
    generated_header("deploy/prometheus/dialguard-rules.yaml", "the rules")
        + "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: dialguard\n  namespace: dialguard\n"
        + LABELS
        + "spec:\n"
        + &indent(&rules, 2)
}

fn generated_dashboard() -> String {
    let dashboard = std::fs::read_to_string(repo("deploy/grafana/dialguard-dashboard.json"))
        .expect("dashboard");
    generated_header("deploy/grafana/dialguard-dashboard.json", "the dashboard")
        + "# The Grafana sidecar (kube-prometheus-stack's grafana.sidecar.dashboards)\n\
           # loads ConfigMaps labelled grafana_dashboard: \"1\"; let it search this\n\
           # namespace too (its searchNamespace: ALL, or this namespace).\n\
           apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dialguard-grafana-dashboard\n  namespace: dialguard\n"
        + LABELS
        + "    grafana_dashboard: \"1\"\ndata:\n  dialguard-dashboard.json: |\n"
        + &indent(&dashboard, 4)
}

#[test]
fn rules_and_dashboard_are_embedded_verbatim_from_their_homes() {
    for (file, generated) in [
        ("prometheusrule.yaml", generated_prometheus_rule()),
        ("grafana-dashboard.yaml", generated_dashboard()),
    ] {
        let path = repo("deploy/kustomize/base").join(file);
        if std::env::var_os("UPDATE_KUSTOMIZE").is_some() {
            std::fs::write(&path, &generated).expect("write");
            continue;
        }
        let shipped = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            shipped == generated,
            "{} is stale: run `{REGENERATE}`",
            path.display()
        );
    }
    // And what kubectl makes of them is the homes' content.
    let objects = kustomize("deploy/kustomize/base");
    let rules: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo("deploy/prometheus/dialguard-rules.yaml")).expect("rules"),
    )
    .expect("rules YAML");
    assert_eq!(find(&objects, "PrometheusRule", "dialguard")["spec"], rules);
    let dashboard = find(&objects, "ConfigMap", "dialguard-grafana-dashboard");
    assert_eq!(
        dashboard["data"]["dialguard-dashboard.json"],
        std::fs::read_to_string(repo("deploy/grafana/dialguard-dashboard.json"))
            .expect("dashboard")
    );
}

#[test]
fn the_prometheus_rule_passes_promtool() {
    let objects = kustomize("deploy/kustomize/base");
    let spec = &find(&objects, "PrometheusRule", "dialguard")["spec"];
    let temp = tempfile::tempdir().expect("tempdir");
    let file = temp.path().join("rules.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(spec).expect("YAML")).expect("write");
    let output = Command::new(promtool())
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("run promtool");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("SUCCESS: 8 rules found"), "{printed}");
}

#[test]
fn the_dashboard_asks_for_its_datasource() {
    let objects = kustomize("deploy/kustomize/base");
    let config_map = find(&objects, "ConfigMap", "dialguard-grafana-dashboard");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let text = config_map["data"]["dialguard-dashboard.json"]
        .as_str()
        .expect("the dashboard");
    // An import-time input, which file provisioning never fills in.
    assert!(!text.contains("${DS_"), "an __inputs placeholder is left");
    let dashboard: Value = serde_json::from_str(text).expect("JSON");
    assert!(dashboard.get("__inputs").is_none());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let variable = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(variable["query"], "prometheus");
    let reference = format!("${{{}}}", variable["name"].as_str().expect("name"));
    let mut datasources = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        for source in
            std::iter::once(&panel["datasource"]).chain(targets.iter().map(|t| &t["datasource"]))
        {
            assert_eq!(
                source,
                &json!({ "type": "prometheus", "uid": reference }),
                "panel {}",
                panel["title"]
            );
            datasources += 1;
        }
    }
    assert!(
        datasources >= 16,
        "only {datasources} datasource references"
    );
}
