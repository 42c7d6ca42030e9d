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
    /// Flags given to `serve` beyond the harness's own, kept for restarts.
    extra: Vec<String>,
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

/// A free loopback port below Linux's ephemeral range (32768 and up), so that
/// while a test has killed its collector no other process's port-0 bind can
/// take the port before the restart.
fn port_outside_ephemeral_range() -> anyhow::Result<u16> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    for i in 0..200u32 {
        let port = 20_000 + (seed.wrapping_add(i.wrapping_mul(7_919)) % 10_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in 20000..30000 on 127.0.0.1")
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
        let grpc = SocketAddr::from(([127, 0, 0, 1], port_outside_ephemeral_range()?));
        Self::start_at(binary, db, grpc, module, echo_log)
    }

    /// [`Collector::start`] with more `serve` flags (e.g. `--expect-namespace app`).
    pub fn start_with_flags(
        binary: &Path,
        db: &Path,
        module: Option<&Path>,
        flags: &[&str],
        echo_log: bool,
    ) -> anyhow::Result<Self> {
        let grpc = SocketAddr::from(([127, 0, 0, 1], port_outside_ephemeral_range()?));
        let flags: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
        Self::start_full(binary, db, grpc, module, &flags, echo_log)
    }

    /// `dialguard serve` with its gRPC listener on `grpc` (port 0: any).
    pub fn start_at(
        binary: &Path,
        db: &Path,
        grpc: SocketAddr,
        module: Option<&Path>,
        echo_log: bool,
    ) -> anyhow::Result<Self> {
        Self::start_full(binary, db, grpc, module, &[], echo_log)
    }

    fn start_full(
        binary: &Path,
        db: &Path,
        grpc: SocketAddr,
        module: Option<&Path>,
        extra: &[String],
        echo_log: bool,
    ) -> anyhow::Result<Self> {
        let echo_log = echo_log || std::env::var_os("DIALGUARD_TEST_ECHO").is_some();
        let mut command = Command::new(binary);
        command
            .args([
                "serve",
                "--grpc",
                &grpc.to_string(),
                "--http",
                "127.0.0.1:0",
                // The tests count one alert line per misrouted connection;
                // the rate limit itself is unit-tested in the collector.
                "--alert-interval",
                "0s",
                "--db",
            ])
            .arg(db);
        if let Some(module) = module {
            command.arg("--module").arg(module);
        }
        command.args(extra);
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
            extra: extra.to_vec(),
        })
    }

    /// SIGKILL, as a crash or an OOM kill would end it.
    pub fn kill(&mut self) {
        let _ = self.process.child_mut().kill();
        let _ = self.process.child_mut().wait();
    }

    /// Starts the same binary again on the same gRPC address and database.
    pub fn restart(&mut self, echo_log: bool) -> anyhow::Result<()> {
        self.kill();
        let grpc = self.grpc;
        // The kernel may hold the port a moment after the kill.
        let started = crate::wait_for(std::time::Duration::from_secs(10), || {
            Self::start_full(&self.binary, &self.db, grpc, None, &self.extra, echo_log).ok()
        });
        *self = started.context("the collector did not restart on its port")?;
        Ok(())
    }

    /// Signals the process (e.g. `STOP`/`CONT` to make it unresponsive and back).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.process.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// `dialguard report --db DB --format json`, parsed.
    pub fn report(&self) -> anyhow::Result<Report> {
        serde_json::from_slice(&self.report_bytes()?).context("parsing the JSON report")
    }

    /// The same report as JSON (for what the report type does not model,
    /// e.g. `coverage`).
    pub fn report_json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.report_bytes()?).context("parsing the JSON report")
    }

    fn report_bytes(&self) -> anyhow::Result<Vec<u8>> {
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
        Ok(output.stdout)
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
