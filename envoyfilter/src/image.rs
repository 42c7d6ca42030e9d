//! The images dialguard ships, by name: one home for the references that
//! `cargo xtask images` tags, `rollout` defaults to and `dialguard version`
//! prints.

/// Where the images are published.
pub const IMAGE_REGISTRY: &str = "ghcr.io/dialguard";
/// The collector: the `dialguard` binary and both module builds.
pub const COLLECTOR_IMAGE: &str = "dialguard-collector";
/// The audit module as a Wasm image for Istio's `WasmPlugin` (`oci://`).
pub const FILTER_IMAGE: &str = "dialguard-filter";
/// The enforce module as a Wasm image.
pub const FILTER_ENFORCE_IMAGE: &str = "dialguard-filter-enforce";
/// Every image is tagged with the workspace version.
pub const IMAGE_TAG: &str = env!("CARGO_PKG_VERSION");
/// Where the collector image holds `dialguard_filter.wasm` and
/// `dialguard_filter_enforce.wasm`.
pub const IMAGE_MODULE_DIR: &str = "/opt/dialguard";

/// `ghcr.io/dialguard/NAME:TAG` for one of the image names above.
pub fn reference(image: &str) -> String {
    format!("{IMAGE_REGISTRY}/{image}:{IMAGE_TAG}")
}
