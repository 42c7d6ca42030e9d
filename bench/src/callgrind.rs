//! Talking to a process running under callgrind: `callgrind_control
//! --instr=on` once it is up, `--zero` at the start of the measured window,
//! `--dump` at its end, and the total instruction count (`Ir`) read back
//! from the dump.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// `callgrind_control ACTION PID`; fails unless it answers `OK`.
fn control(pid: u32, action: &str) -> anyhow::Result<()> {
    let output = Command::new("callgrind_control")
        .arg(action)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control (part of Debian's valgrind package)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !stdout.contains("OK") {
        bail!(
            "callgrind_control {action} {pid} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Switches instrumentation on (the run was started with
/// `--instr-atstart=no`, which makes Envoy's startup several times faster).
pub fn instrument(pid: u32) -> anyhow::Result<()> {
    control(pid, "--instr=on")
}

/// Zeroes every event counter of the callgrind run `pid`.
pub fn zero(pid: u32) -> anyhow::Result<()> {
    control(pid, "--zero")
}

/// The dump files callgrind has written next to `out` (`out.1`, `out.2`, …).
fn dumps(out: &Path) -> BTreeSet<PathBuf> {
    let (Some(dir), Some(name)) = (out.parent(), out.file_name()) else {
        return BTreeSet::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// Asks the callgrind run `pid` (started with `--callgrind-out-file=out`)
/// for a dump and returns the instructions counted since the last zero or
/// dump, with the dump's path.
pub fn dump(pid: u32, out: &Path) -> anyhow::Result<(u64, PathBuf)> {
    let before = dumps(out);
    control(pid, "--dump")?;
    let found = dialguard_tests::wait_for(Duration::from_secs(120), || {
        dumps(out).difference(&before).find_map(|path| {
            let text = std::fs::read_to_string(path).ok()?;
            Some((total_instructions(&text)?, path.clone()))
        })
    });
    found.with_context(|| format!("no callgrind dump next to {} within 120 s", out.display()))
}

/// The total of the first event (`Ir`) from a callgrind dump: its
/// `summary:` line, or `totals:` when there is none.
pub fn total_instructions(dump: &str) -> Option<u64> {
    let first = |key: &str| {
        dump.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    };
    first("summary:").or_else(|| first("totals:"))
}

#[cfg(test)]
mod tests {
    use super::total_instructions;

    #[test]
    fn reads_the_summary_line_first() {
        let dump =
            "version: 1\nevents: Ir\nfn=(1) main\n3 10\nsummary: 20441993\ntotals: 20674853\n";
        assert_eq!(total_instructions(dump), Some(20_441_993));
        assert_eq!(total_instructions("totals: 7 3\n"), Some(7));
        assert_eq!(total_instructions("events: Ir\n"), None);
    }
}
