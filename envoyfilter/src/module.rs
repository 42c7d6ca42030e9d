//! Which dialguard build a module file is, and its SHA-256.
//!
//! The audit build refuses `mode: enforce` (Envoy then rejects the filter and
//! the namespace silently runs without dialguard), so `rollout` and `serve`
//! check the build before anything reaches a sidecar. The two builds differ
//! in their exports: only the enforce build exports the data callbacks it
//! closes connections from.

use std::fmt;

use sha2::{Digest, Sha256};

/// The name `dialguard serve --module` serves the audit build under, and
/// the file `cargo xtask dist` leaves it in.
pub const AUDIT_MODULE_FILE: &str = "dialguard_filter.wasm";
/// The same for the enforce build (`serve --enforce-module`).
pub const ENFORCE_MODULE_FILE: &str = "dialguard_filter_enforce.wasm";

/// Exported only by the enforce build.
const DATA_CALLBACKS: [&str; 2] = ["proxy_on_downstream_data", "proxy_on_upstream_data"];
/// Exported by every proxy-wasm filter.
const CONTEXT_CREATE: &str = "proxy_on_context_create";

/// A build of the dialguard filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Observes and reports; refuses `mode: enforce`.
    Audit,
    /// Also closes certain misroutes; runs `mode: audit` too.
    Enforce,
}

impl Build {
    /// The file name it is built to and served under.
    pub fn file_name(self) -> &'static str {
        match self {
            Build::Audit => AUDIT_MODULE_FILE,
            Build::Enforce => ENFORCE_MODULE_FILE,
        }
    }

    /// Whether the build runs a filter configured with `mode`.
    pub fn runs(self, mode: &str) -> bool {
        self == Build::Enforce || mode != "enforce"
    }

    /// The build a file name says it is, if it is one of the two names.
    pub fn named(file_name: &str) -> Option<Build> {
        match file_name {
            AUDIT_MODULE_FILE => Some(Build::Audit),
            ENFORCE_MODULE_FILE => Some(Build::Enforce),
            _ => None,
        }
    }
}

impl fmt::Display for Build {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Build::Audit => "audit",
            Build::Enforce => "enforce",
        })
    }
}

/// A module file's build and SHA-256 (lower-case hex, as Envoy's
/// `vm_config.code.remote.sha256` wants it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    pub build: Build,
    pub sha256: String,
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Tells the build of a dialguard module from its exports. The error says
/// what the bytes are instead, for a message naming the flag.
pub fn inspect(bytes: &[u8]) -> Result<ModuleInfo, String> {
    let mut exports = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|err| {
            format!("not a WebAssembly module ({err}); expected {AUDIT_MODULE_FILE} or {ENFORCE_MODULE_FILE}")
        })?;
        if let wasmparser::Payload::ExportSection(reader) = payload {
            for export in reader {
                let export = export.map_err(|err| format!("unreadable export section: {err}"))?;
                exports.push(export.name.to_owned());
            }
        }
    }
    let exports_name = |name: &str| exports.iter().any(|e| e == name);
    if !exports_name(CONTEXT_CREATE) {
        return Err(format!(
            "not a proxy-wasm filter (it exports no {CONTEXT_CREATE}); expected {AUDIT_MODULE_FILE} or {ENFORCE_MODULE_FILE}"
        ));
    }
    let build = match DATA_CALLBACKS.map(exports_name) {
        [true, true] => Build::Enforce,
        [false, false] => Build::Audit,
        _ => {
            return Err(format!(
                "exports only one of {} and {}, so it is neither dialguard build; expected {AUDIT_MODULE_FILE} or {ENFORCE_MODULE_FILE}",
                DATA_CALLBACKS[0], DATA_CALLBACKS[1]
            ));
        }
    };
    Ok(ModuleInfo {
        build,
        sha256: sha256_hex(bytes),
    })
}
