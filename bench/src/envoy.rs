//! Envoy as the benchmark runs it: natively or under callgrind, one worker
//! unless asked otherwise, killed by its own PID when dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use anyhow::{Context, bail};
use dialguard_tests::process::{ChildGuard, piped, tee_lines};
use dialguard_tests::sidecar::{admin_get, listener_address};
use dialguard_tests::wait_for;
use serde_json::Value;

/// How Envoy is run.
#[derive(Debug, Clone)]
pub enum Runner {
    Native,
    /// Under `valgrind --tool=callgrind --instr-atstart=no`, writing its
    /// dumps to `out` (`out.1`, `out.2`, … for each `callgrind_control --dump`).
    Callgrind {
        out: PathBuf,
    },
}

#[derive(Debug)]
pub struct Envoy {
    process: ChildGuard,
    pub admin: SocketAddr,
    /// Where `virtualOutbound` listens.
    pub outbound: SocketAddr,
    pub runner: Runner,
    /// Envoy's (and valgrind's) log lines, as they come.
    pub log: Receiver<String>,
    dir: PathBuf,
}

impl Envoy {
    /// Writes `bootstrap` into `dir` and starts Envoy with `--concurrency
    /// concurrency`; returns once it is LIVE. Under callgrind startup takes
    /// seconds (minutes with instrumentation on), so the waits are generous
    /// but bounded.
    pub fn start(
        envoy: &Path,
        bootstrap: &Value,
        dir: &Path,
        concurrency: u32,
        runner: Runner,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("envoy.json");
        std::fs::write(&config, serde_json::to_vec_pretty(bootstrap)?)?;
        let admin_file = dir.join("envoy-admin-address");
        let _ = std::fs::remove_file(&admin_file);
        let mut command = match &runner {
            Runner::Native => Command::new(envoy),
            Runner::Callgrind { out } => {
                let mut command = Command::new(valgrind()?);
                command
                    .arg("--tool=callgrind")
                    // Not counted until `callgrind::instrument`: startup runs several times faster.
                    .arg("--instr-atstart=no")
                    .arg(format!("--callgrind-out-file={}", out.display()))
                    .arg(format!(
                        "--log-file={}",
                        dir.join("valgrind-%p.log").display()
                    ))
                    .arg(envoy);
                command
            }
        };
        command
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--disable-hot-restart", "-l", "warning", "--concurrency"])
            .arg(concurrency.to_string())
            .current_dir(dir);
        let mut process = ChildGuard::spawn("envoy", piped(&mut command))?;
        let stderr = process.child_mut().stderr.take().context("envoy stderr")?;
        let log = tee_lines("envoy", stderr, false);
        let startup = match runner {
            Runner::Native => Duration::from_secs(30),
            Runner::Callgrind { .. } => Duration::from_secs(300),
        };
        let admin = wait_for(startup, || {
            if !running(&mut process) {
                return Some(None);
            }
            std::fs::read_to_string(&admin_file)
                .ok()?
                .trim()
                .parse::<SocketAddr>()
                .ok()
                .map(Some)
        })
        .flatten();
        process
            .check_running()
            .with_context(|| format!("envoy failed to start: {}", drain(&log)))?;
        let admin = admin.with_context(|| {
            format!(
                "envoy did not publish its admin address within {startup:?}: {}",
                drain(&log)
            )
        })?;
        let ready = wait_for(startup, || {
            if !running(&mut process) {
                return Some(false);
            }
            admin_get(admin, "/ready")
                .ok()
                .filter(|s| s.trim() == "LIVE")
                .map(|_| true)
        });
        process
            .check_running()
            .with_context(|| format!("envoy failed to start: {}", drain(&log)))?;
        if ready != Some(true) {
            bail!(
                "envoy did not become LIVE within {startup:?}: {}",
                drain(&log)
            );
        }
        let outbound = listener_address(admin, "virtualOutbound")?;
        Ok(Self {
            process,
            admin,
            outbound,
            runner,
            log,
            dir: dir.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counter and gauge values whose names contain `filter` (`/stats?format=json`).
    pub fn stats(&self, filter: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        dialguard_tests::sidecar::stats(self.admin, filter)
    }

    /// One stat by its exact name (0 when Envoy does not have it).
    pub fn stat(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.stats(name)?.get(name).copied().unwrap_or(0))
    }

    /// `VmRSS` from `/proc/PID/status`, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        crate::proc_stat::status_kib(self.pid(), "VmRSS")
    }

    /// Envoy's log so far, for error messages.
    pub fn log_so_far(&self) -> String {
        drain(&self.log)
    }

    /// SIGTERM (callgrind then writes its final dump), SIGKILL after a grace period.
    pub fn stop(mut self) {
        let grace = match self.runner {
            Runner::Native => Duration::from_secs(10),
            Runner::Callgrind { .. } => Duration::from_secs(60),
        };
        self.process.terminate(grace);
    }
}

fn running(process: &mut ChildGuard) -> bool {
    process.check_running().is_ok()
}

fn drain(log: &Receiver<String>) -> String {
    let lines: Vec<String> = log.try_iter().collect();
    let start = lines.len().saturating_sub(20);
    lines.get(start..).unwrap_or_default().join("\n")
}

/// `valgrind` from PATH (Debian: /usr/bin/valgrind, a wrapper that execs
/// valgrind.bin, so the child's PID is valgrind's).
pub fn valgrind() -> anyhow::Result<PathBuf> {
    find_in_path("valgrind").context(
        "valgrind is not installed (`apt-get install valgrind`; `cargo xtask bench filter` installs it)",
    )
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
