//! The collector's Kubernetes objects exactly as the kustomize base in
//! `deploy/kustomize/base/` declares them, embedded at build time: `rollout
//! --with-collector` starts from these and changes only what its flags say,
//! as an overlay would, so `kubectl apply -k` and `rollout` install the same
//! objects (`tests/kustomize.rs` compares them through real `kubectl`).

use serde_json::Value;

/// The base's resources in `kustomization.yaml` order, which is apply order.
pub const BASE_FILES: &[(&str, &str)] = &[
    (
        "namespace.yaml",
        include_str!("../../deploy/kustomize/base/namespace.yaml"),
    ),
    (
        "serviceaccount.yaml",
        include_str!("../../deploy/kustomize/base/serviceaccount.yaml"),
    ),
    (
        "pvc.yaml",
        include_str!("../../deploy/kustomize/base/pvc.yaml"),
    ),
    (
        "expected-namespaces.yaml",
        include_str!("../../deploy/kustomize/base/expected-namespaces.yaml"),
    ),
    (
        "deployment.yaml",
        include_str!("../../deploy/kustomize/base/deployment.yaml"),
    ),
    (
        "service.yaml",
        include_str!("../../deploy/kustomize/base/service.yaml"),
    ),
    (
        "servicemonitor.yaml",
        include_str!("../../deploy/kustomize/base/servicemonitor.yaml"),
    ),
    (
        "prometheusrule.yaml",
        include_str!("../../deploy/kustomize/base/prometheusrule.yaml"),
    ),
    (
        "grafana-dashboard.yaml",
        include_str!("../../deploy/kustomize/base/grafana-dashboard.yaml"),
    ),
];

/// An embedded base file that is not one Kubernetes object in YAML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("deploy/kustomize/base/{file} (built into this binary): {message}")]
pub struct BaseError {
    pub file: &'static str,
    pub message: String,
}

/// Every object of the base, in apply order.
pub fn objects() -> Result<Vec<Value>, BaseError> {
    BASE_FILES
        .iter()
        .map(|(file, text)| {
            let object: Value = serde_yaml_ng::from_str(text).map_err(|err| BaseError {
                file,
                message: err.to_string(),
            })?;
            if object["kind"].is_string() && object["metadata"]["name"].is_string() {
                Ok(object)
            } else {
                Err(BaseError {
                    file,
                    message: "expected one object with kind and metadata.name".into(),
                })
            }
        })
        .collect()
}
