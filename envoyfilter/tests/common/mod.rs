//! What the envoyfilter tests share: custom resources validated against the
//! CRDs of Istio (../shared/istio-crds) and prometheus-operator
//! (../shared/prometheus-operator-crds), made strict as
//! `kubectl apply --validate=strict` is (unknown fields rejected).

#![allow(dead_code)] // each test binary uses a part

use std::path::PathBuf;

use serde_json::{Value, json};

/// `shared/` beside the repository.
pub fn shared(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(path)
}

/// Kubernetes prunes (or, strictly, rejects) fields a structural schema does
/// not declare; plain JSON Schema allows them. Close every object schema that
/// lists properties and does not preserve unknown fields.
pub fn strict(schema: &mut Value) {
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

/// The strict schema of `version` in a CRD file under `shared/`.
pub fn validator(crd_file: &str, version: &str) -> jsonschema::Validator {
    let path = shared(crd_file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("CRD file {}: {err}", path.display()));
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

/// The validator of a custom resource's kind, `None` for other kinds.
pub struct CrdValidators(Vec<(&'static str, jsonschema::Validator)>);

impl CrdValidators {
    pub fn load() -> Self {
        Self(vec![
            (
                "EnvoyFilter",
                validator("istio-crds/envoyfilter.crd.yaml", "v1alpha3"),
            ),
            (
                "WasmPlugin",
                validator("istio-crds/wasmplugin.crd.yaml", "v1alpha1"),
            ),
            (
                "ServiceMonitor",
                validator(
                    "prometheus-operator-crds/monitoring.coreos.com_servicemonitors.yaml",
                    "v1",
                ),
            ),
            (
                "PrometheusRule",
                validator(
                    "prometheus-operator-crds/monitoring.coreos.com_prometheusrules.yaml",
                    "v1",
                ),
            ),
        ])
    }

    /// The schema errors of `object`, or `None` when no CRD here has its kind.
    pub fn errors(&self, object: &Value) -> Option<Vec<String>> {
        let (_, validator) = self.0.iter().find(|(kind, _)| object["kind"] == *kind)?;
        Some(
            validator
                .iter_errors(object)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect(),
        )
    }

    /// Every custom resource among `objects` is valid; returns how many were checked.
    pub fn assert_valid(&self, objects: &[Value]) -> usize {
        let mut checked = 0;
        for object in objects {
            if let Some(errors) = self.errors(object) {
                assert!(
                    errors.is_empty(),
                    "{} {}: {errors:#?}",
                    object["kind"],
                    object["metadata"]["name"]
                );
                checked += 1;
            }
        }
        checked
    }
}
