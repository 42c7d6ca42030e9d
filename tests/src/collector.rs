//! The real `dialguard` binary: `serve` as a child process on port 0, and
//! `report --format json` read back into the collector's own report type.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use anyhow::{Context, bail};
use dialguard_collector::report::Report;

use crate::process::{ChildGuard, piped, tee_lines};

#[derive(Debug)]
pub struct Collector {
    pub process: ChildGuard,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub db: PathBuf,
    /// The alert lines it prints on stdout.
    pub alerts: Receiver<String>,
    /// The served module's SHA-256, with `--module`.
    pub module_sha256: Option<String>,
    binary: PathBuf,
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

impl Collector {
    /// `dialguard serve` on port 0; with `module`, also `--module` (its
    /// SHA-256, as printed, lands in `module_sha256`).
    pub fn start(
        binary: &Path,
        db: &Path,
        module: Option<&Path>,
        echo_log: bool,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command
            .args([
                "serve",
                "--grpc",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--db",
            ])
            .arg(db);
        if let Some(module) = module {
            command.arg("--module").arg(module);
        }
        let mut process = ChildGuard::spawn("dialguard serve", piped(&mut command))?;
        let stderr = process
            .child_mut()
            .stderr
            .take()
            .context("collector stderr")?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .context("collector stdout")?;
        let log = tee_lines("collector", stderr, echo_log);
        let alerts = tee_lines("alert", stdout, false);
        let mut addrs = None;
        let mut module_sha256 = None;
        while let Ok(line) = log.recv_timeout(Duration::from_secs(20)) {
            if let (Some(grpc), Some(http)) = (field(&line, "grpc="), field(&line, "http=")) {
                addrs = Some((grpc, http));
            }
            if let Some(rest) = line.split("sha256=").nth(1) {
                module_sha256 = rest.split_whitespace().next().map(str::to_owned);
            }
            if addrs.is_some() && (module.is_none() || module_sha256.is_some()) {
                break;
            }
        }
        process.check_running()?;
        let Some((grpc, http)) = addrs else {
            bail!("the collector did not report its listening addresses within 20 s")
        };
        Ok(Self {
            process,
            grpc,
            http,
            db: db.to_owned(),
            alerts,
            module_sha256,
            binary: binary.to_owned(),
        })
    }

    /// `dialguard report --db DB --format json`, parsed.
    pub fn report(&self) -> anyhow::Result<Report> {
        let output = Command::new(&self.binary)
            .args(["report", "--format", "json", "--db"])
            .arg(&self.db)
            .output()?;
        if !output.status.success() {
            bail!(
                "dialguard report failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        serde_json::from_slice(&output.stdout).context("parsing the JSON report")
    }

    /// `dialguard report --db DB --format table`, as printed.
    pub fn report_table(&self) -> anyhow::Result<String> {
        let output = Command::new(&self.binary)
            .args(["report", "--format", "table", "--db"])
            .arg(&self.db)
            .output()?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}
