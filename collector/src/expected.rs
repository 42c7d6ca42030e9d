//! The namespaces that must have a reporting sidecar: those given with
//! `--expect-namespace` and those listed in `--expect-namespaces-file`.
//! The file is re-read while `serve` runs, because it is usually a
//! ConfigMap key mounted as a directory, which kubelet updates in place
//! (`rollout` changes it when namespaces are rolled out to): a new list
//! applies without a restart. A file that cannot be read or holds a bad
//! line keeps the list in force and is logged, never half applied.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use crate::inventory::{Inventory, InventoryError, parse_expected_namespaces};
use crate::store::Writer;

/// How often the file is read again unless told otherwise (kubelet itself
/// syncs mounted ConfigMaps about once a minute).
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExpectedError {
    #[error("--expect-namespaces-file {}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] InventoryError),
}

/// The flags' namespaces and the file's, as they are now.
pub fn load(
    flags: &BTreeSet<String>,
    file: Option<&Path>,
) -> Result<BTreeSet<String>, ExpectedError> {
    let mut expected = flags.clone();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| ExpectedError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let name = format!("--expect-namespaces-file {}", path.display());
        expected.extend(parse_expected_namespaces(&name, &text)?);
    }
    Ok(expected)
}

/// Re-reads `file` every `every` until `stop`; a changed list goes to the
/// inventory (metrics, coverage) and the database (`report`).
pub async fn watch_file(
    flags: BTreeSet<String>,
    file: PathBuf,
    every: Duration,
    inventory: Inventory,
    writer: Writer,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now: the list was just loaded
    let mut last_error = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let read = {
            let (flags, file) = (flags.clone(), file.clone());
            tokio::task::spawn_blocking(move || load(&flags, Some(&file))).await
        };
        let expected = match read {
            Ok(Ok(expected)) => expected,
            Ok(Err(err)) => {
                let text = err.to_string();
                if last_error.as_ref() != Some(&text) {
                    tracing::error!("{text}; the expected namespaces stay as they were");
                }
                last_error = Some(text);
                continue;
            }
            Err(err) => {
                tracing::error!("reading --expect-namespaces-file failed: {err}");
                continue;
            }
        };
        last_error = None;
        if *inventory.expected() == expected {
            continue;
        }
        let forget_stale = inventory.config().forget_stale;
        match writer
            .record_coverage_config(expected.clone(), forget_stale)
            .await
        {
            Ok(()) => {
                tracing::info!(
                    "expected namespaces now: {} (from --expect-namespaces-file {})",
                    expected.iter().cloned().collect::<Vec<_>>().join(", "),
                    file.display()
                );
                inventory.set_expected(expected);
            }
            // Tried again at the next tick: the list stays unapplied until
            // `report` can see it too.
            Err(err) => tracing::error!("recording the expected namespaces failed: {err}"),
        }
    }
}
