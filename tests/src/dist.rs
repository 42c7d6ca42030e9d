//! The artifacts `cargo xtask dist` leaves in `dist/`.

use std::path::PathBuf;

use anyhow::{Context, bail};

#[derive(Debug, Clone)]
pub struct Dist {
    pub envoy: PathBuf,
    pub module: PathBuf,
    /// The module built with enforcement (`mode: enforce`).
    pub module_enforce: PathBuf,
    pub dialguard: PathBuf,
}

impl Dist {
    /// `$DIALGUARD_DIST`, or `dist/` at the workspace root.
    pub fn locate() -> anyhow::Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = match std::env::var_os("DIALGUARD_DIST") {
            Some(dir) => root.join(dir), // a relative path is taken from the workspace root
            None => root.join("dist"),
        };
        let dir = dir
            .canonicalize()
            .with_context(|| format!("{}: run `cargo xtask dist` first", dir.display()))?;
        let dist = Self {
            envoy: dir.join("envoy"),
            module: dir.join("dialguard_filter.wasm"),
            module_enforce: dir.join("dialguard_filter_enforce.wasm"),
            dialguard: dir.join("dialguard"),
        };
        for path in [
            &dist.envoy,
            &dist.module,
            &dist.module_enforce,
            &dist.dialguard,
        ] {
            if !path.exists() {
                bail!(
                    "{} is missing: run `cargo xtask dist` first",
                    path.display()
                );
            }
        }
        Ok(dist)
    }
}
