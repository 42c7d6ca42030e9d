//! `dialguard version` and `dialguard --version`: the release, the git
//! revision it was built from, the SHA-256 of the module builds it was
//! built with (`cargo xtask dist` builds them first and passes them in) and
//! the default image references. Only this binary reads these build-time
//! variables, so a new commit rebuilds nothing else.

use std::sync::LazyLock;

use dialguard_envoyfilter::image::{
    COLLECTOR_IMAGE, FILTER_ENFORCE_IMAGE, FILTER_IMAGE, reference,
};
use serde::Serialize;

/// A build-time variable, None when unset or empty (a plain `cargo build`).
macro_rules! recorded {
    ($name:literal) => {
        match option_env!($name) {
            Some(value) if !value.is_empty() => Some(value),
            _ => None,
        }
    };
}

const REVISION: Option<&str> = recorded!("DIALGUARD_GIT_REVISION");
const AUDIT_MODULE_SHA256: Option<&str> = recorded!("DIALGUARD_AUDIT_MODULE_SHA256");
const ENFORCE_MODULE_SHA256: Option<&str> = recorded!("DIALGUARD_ENFORCE_MODULE_SHA256");

/// `-o/--output` of `dialguard version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VersionOutput {
    Text,
    Json,
    Yaml,
}

#[derive(Debug, clap::Args)]
pub struct VersionFlags {
    /// Output format: `text` (as `--version`), `json` (one object) or `yaml`.
    #[arg(short = 'o', long, value_enum, default_value_t = VersionOutput::Text)]
    output: VersionOutput,
}

/// What `version -o json` prints; absent values are null.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionInfo {
    version: &'static str,
    revision: Option<&'static str>,
    audit_module_sha256: Option<&'static str>,
    enforce_module_sha256: Option<&'static str>,
    images: Images,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Images {
    collector: String,
    filter: String,
    filter_enforce: String,
}

fn info() -> VersionInfo {
    VersionInfo {
        version: env!("CARGO_PKG_VERSION"),
        revision: REVISION,
        audit_module_sha256: AUDIT_MODULE_SHA256,
        enforce_module_sha256: ENFORCE_MODULE_SHA256,
        images: Images {
            collector: reference(COLLECTOR_IMAGE),
            filter: reference(FILTER_IMAGE),
            filter_enforce: reference(FILTER_ENFORCE_IMAGE),
        },
    }
}

/// The text after "dialguard " that `--version` and `version` print.
fn text(info: &VersionInfo) -> String {
    let not_recorded = "not recorded";
    format!(
        "{}\nrevision: {}\naudit module sha256: {}\nenforce module sha256: {}\ncollector image: {}\nfilter image: {}\nfilter enforce image: {}",
        info.version,
        info.revision.unwrap_or("unknown"),
        info.audit_module_sha256.unwrap_or(not_recorded),
        info.enforce_module_sha256.unwrap_or(not_recorded),
        info.images.collector,
        info.images.filter,
        info.images.filter_enforce,
    )
}

static LONG_VERSION: LazyLock<String> = LazyLock::new(|| text(&info()));

/// For clap's `version`/`long_version`: `dialguard --version` prints
/// "dialguard " and this.
pub fn long_version() -> &'static str {
    LONG_VERSION.as_str()
}

/// `dialguard version`.
pub fn print(flags: &VersionFlags) -> anyhow::Result<()> {
    let info = info();
    match flags.output {
        VersionOutput::Text => println!("dialguard {}", text(&info)),
        VersionOutput::Json => println!("{}", serde_json::to_string_pretty(&info)?),
        VersionOutput::Yaml => print!("{}", serde_yaml_ng::to_string(&info)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_every_field_and_says_what_was_not_recorded() {
        let mut info = info();
        info.revision = None;
        info.audit_module_sha256 = None;
        info.enforce_module_sha256 = Some("ab12");
        let text = text(&info);
        assert!(text.starts_with(env!("CARGO_PKG_VERSION")), "{text}");
        assert!(text.contains("\nrevision: unknown\n"), "{text}");
        assert!(
            text.contains("\naudit module sha256: not recorded\n"),
            "{text}"
        );
        assert!(text.contains("\nenforce module sha256: ab12\n"), "{text}");
        assert!(
            text.contains("\ncollector image: ghcr.io/dialguard/dialguard-collector:"),
            "{text}"
        );
    }
}
