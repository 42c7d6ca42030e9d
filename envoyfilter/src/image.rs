//! The container images dialguard ships and where they are published: one
//! home for the names that `cargo xtask images` tags, `rollout` defaults to
//! and the kustomize base (`deploy/kustomize/base/`) refers to.

/// The registry the release images are pushed to.
pub const IMAGE_REGISTRY: &str = "ghcr.io/dialguard";
/// The collector: the `dialguard` binary and both filter builds.
pub const COLLECTOR_IMAGE: &str = "dialguard-collector";
/// The audit build of the filter as a Wasm image istio-agent can pull.
pub const FILTER_IMAGE: &str = "dialguard-filter";
/// The enforce build of the filter as a Wasm image.
pub const FILTER_ENFORCE_IMAGE: &str = "dialguard-filter-enforce";
/// Every image is tagged with the workspace version.
pub const IMAGE_TAG: &str = env!("CARGO_PKG_VERSION");
/// Where the collector image holds `dialguard_filter.wasm` and
/// `dialguard_filter_enforce.wasm`, served with `serve --module` and
/// `--enforce-module`.
pub const IMAGE_MODULE_DIR: &str = "/opt/dialguard";

/// `ghcr.io/dialguard/NAME:TAG`, the reference a release publishes `image` under.
pub fn reference(image: &str) -> String {
    format!("{IMAGE_REGISTRY}/{image}:{IMAGE_TAG}")
}
