//! `dialguard`: the collector's command line. `serve` runs the collector;
//! `report` prints the audit report from its database; `rollout` prints the
//! Istio resources that install the filter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dialguard_collector::alertmanager::AlertmanagerConfig;
use dialguard_collector::http::Module;
use dialguard_collector::{Limits, ServeConfig, report, store};
use dialguard_envoyfilter::rollout::{self, CollectorManifests, RolloutArgs};

#[derive(Debug, Parser)]
#[command(
    name = "dialguard",
    version,
    about = "Detects TCP connections that Istio sidecars send somewhere other than where the application dialed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive events from sidecars, store them and print alerts (JSON lines on stdout).
    Serve(ServeFlags),
    /// Print the Kubernetes resources (EnvoyFilter or WasmPlugin, and
    /// optionally the collector) that install dialguard in selected namespaces.
    Rollout(RolloutFlags),
    /// Print the audit report from a database (also while `serve` runs on it).
    Report {
        #[arg(long)]
        db: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// List the ports where a catch-all listener sends plain TCP somewhere
    /// other than PassthroughCluster (exit code 1 when there are any).
    ///
    /// Exit code 0: none found; 1: findings; 2: FILE cannot be read or is
    /// not a config dump.
    Analyze {
        /// A sidecar's config dump: `istioctl proxy-config all -o json`,
        /// Envoy's /config_dump, or `istioctl proxy-config listeners -o json`.
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Debug, clap::Args)]
struct ServeFlags {
    /// gRPC listen address for sidecar streams.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,
    /// HTTP listen address (health, report API).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// SQLite database file; created if missing.
    #[arg(long)]
    db: PathBuf,
    /// The filter module to serve at /module/dialguard_filter.wasm (its
    /// SHA-256 is printed at startup, for `rollout --module-sha256`).
    #[arg(long)]
    module: Option<PathBuf>,
    /// Delete events, report rows and directory entries last seen longer ago
    /// than this (e.g. 30d, 12h); `off` keeps everything.
    #[arg(long, default_value = "30d", value_parser = parse_retention)]
    retention: Retention,
    /// Most sidecar streams open at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_streams)]
    max_streams: usize,
    /// Most events in one batch; a larger batch gets INVALID_ARGUMENT.
    #[arg(long, default_value_t = Limits::default().max_batch_events)]
    max_batch_events: usize,
    /// Largest message from a sidecar, in bytes.
    #[arg(long, default_value_t = Limits::default().max_message_bytes)]
    max_message_bytes: usize,
    /// How long a new stream has to identify itself (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    hello_timeout: Duration,
    /// At most one alert line per (source, dialed, reached, cluster) per this
    /// interval; the next line counts the ones held back. 0s prints every one.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    alert_interval: Duration,
    /// Also push misroutes to this Alertmanager (v2 API), e.g.
    /// http://alertmanager.monitoring:9093. Pushing never delays ingest.
    #[arg(long)]
    alertmanager: Option<String>,
    /// How often active alerts are re-sent to Alertmanager.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    alertmanager_resend: Duration,
    /// An alert resolves once its misroute has been quiet this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    alertmanager_resolve_after: Duration,
    /// How long open streams get to finish on SIGTERM/SIGINT.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Retention(Option<Duration>);

fn parse_alertmanager_url(text: &str) -> anyhow::Result<String> {
    let url = url::Url::parse(text).with_context(|| {
        format!("--alertmanager {text:?}: expected a URL such as http://alertmanager:9093")
    })?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https") && url.host().is_some(),
        "--alertmanager {text:?}: expected an http:// or https:// URL with a host"
    );
    Ok(text.trim_end_matches('/').to_string())
}

fn parse_retention(text: &str) -> Result<Retention, String> {
    if text == "off" {
        return Ok(Retention(None));
    }
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(Retention(Some(d))),
        Ok(_) => Err("expected a positive duration such as 30d, or `off`".into()),
        Err(err) => Err(format!(
            "expected a duration such as 30d or 12h, or `off`: {err}"
        )),
    }
}

#[derive(Debug, clap::Args)]
struct RolloutFlags {
    /// Namespace whose sidecars get the filter (repeat for several).
    #[arg(long = "namespace", required = true)]
    namespaces: Vec<String>,
    /// Only workloads with this label, as key=value (repeat to require several).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// What the filter does with a misrouted connection.
    #[arg(long, default_value = "audit")]
    mode: String,
    /// The collector's gRPC address as the sidecars reach it, HOST:PORT.
    /// Defaults to the in-cluster collector with --with-collector.
    #[arg(long)]
    collector: Option<String>,
    /// Where Envoy downloads the module (http:// or https://).
    #[arg(long)]
    module_url: String,
    /// The module's SHA-256, 64 hex digits; Envoy refuses any other bytes.
    #[arg(long)]
    module_sha256: String,
    /// Service VIP range (repeat); default: the filter's (10.96.0.0/12).
    #[arg(long = "service-cidr")]
    service_cidrs: Vec<String>,
    /// Pod range (repeat).
    #[arg(long = "pod-cidr")]
    pod_cidrs: Vec<String>,
    /// EnvoyFilter priority.
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    priority: i32,
    /// Render a WasmPlugin (Istio 1.20+) for the filter instead of an EnvoyFilter patch.
    #[arg(long)]
    wasm_plugin: bool,
    /// Also render the collector's Deployment, Service and PVC.
    #[arg(long)]
    with_collector: bool,
    #[arg(long, default_value = "dialguard")]
    collector_namespace: String,
    /// Container image of the collector (with the module at /opt/dialguard/dialguard_filter.wasm).
    #[arg(long, required_if_eq("with_collector", "true"))]
    collector_image: Option<String>,
    #[arg(long, default_value = "1Gi")]
    collector_storage: String,
    /// Print what removes the rollout instead (for `kubectl delete -f -`).
    #[arg(long)]
    uninstall: bool,
    #[arg(long, value_enum, default_value_t = Output::Yaml)]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Yaml,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Its fallback for a failed write is `eprintln!`, which panics when
        // stderr is a closed pipe, taking a sidecar's stream down with it.
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => match err.downcast_ref::<AnalyzeExit>() {
            // The findings are on stdout already.
            Some(AnalyzeExit::Findings) => ExitCode::from(1),
            Some(AnalyzeExit::InvalidInput(cause)) => {
                eprintln!("dialguard: {cause:#}");
                ExitCode::from(2)
            }
            None => {
                eprintln!("dialguard: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(flags) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(serve(flags))
        }
        Command::Rollout(flags) => rollout(flags),
        Command::Analyze { file, format } => analyze_file(&file, format),
        Command::Report { db, format } => {
            let conn = store::open_for_reading(&db)?;
            let report = report::query(&conn)?;
            match format {
                Format::Table => print!("{}", report::render_table(&report)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(())
        }
    }
}

async fn serve(flags: ServeFlags) -> anyhow::Result<()> {
    let module = flags
        .module
        .as_deref()
        .map(Module::load)
        .transpose()
        .context("--module")?;
    let config = ServeConfig {
        shutdown_grace: flags.shutdown_grace,
        module,
        limits: Limits {
            max_message_bytes: flags.max_message_bytes,
            max_batch_events: flags.max_batch_events,
            max_streams: flags.max_streams,
            hello_timeout: flags.hello_timeout,
        },
        retention: flags.retention.0,
        alert_interval: flags.alert_interval,
        alertmanager: flags
            .alertmanager
            .map(|url| parse_alertmanager_url(&url))
            .transpose()?
            .map(|url| AlertmanagerConfig {
                url,
                resend_every: flags.alertmanager_resend,
                resolve_after: flags.alertmanager_resolve_after,
            }),
        ..ServeConfig::new(flags.db)
    };
    let (grpc, http) = (flags.grpc, flags.http);
    let grpc = tokio::net::TcpListener::bind(grpc)
        .await
        .with_context(|| format!("--grpc {grpc}: cannot listen"))?;
    let http = tokio::net::TcpListener::bind(http)
        .await
        .with_context(|| format!("--http {http}: cannot listen"))?;
    // A fixed line, whatever the log level: scripts and tests read the ports from it.
    eprintln!(
        "dialguard: listening grpc={} http={} db={}",
        grpc.local_addr()?,
        http.local_addr()?,
        config.db_path.display()
    );
    if let Some(module) = &config.module {
        eprintln!(
            "dialguard: serving module sha256={} at http://{}{}",
            module.sha256,
            http.local_addr()?,
            dialguard_collector::http::MODULE_PATH
        );
    }
    dialguard_collector::run(grpc, http, config, shutdown_signal()).await?;
    Ok(())
}

fn rollout(flags: RolloutFlags) -> anyhow::Result<()> {
    let collector_manifests = flags.with_collector.then(|| CollectorManifests {
        namespace: flags.collector_namespace.clone(),
        image: flags.collector_image.clone().unwrap_or_default(),
        storage: flags.collector_storage.clone(),
    });
    let collector = match (&flags.collector, flags.with_collector) {
        (Some(address), _) => address.clone(),
        (None, true) => rollout::in_cluster_collector(&flags.collector_namespace),
        (None, false) => anyhow::bail!("--collector HOST:PORT is required (or --with-collector)"),
    };
    let args = RolloutArgs {
        namespaces: flags.namespaces,
        selectors: flags.selectors,
        mode: flags.mode,
        collector,
        module_url: flags.module_url,
        module_sha256: flags.module_sha256,
        service_cidrs: flags.service_cidrs,
        pod_cidrs: flags.pod_cidrs,
        priority: flags.priority,
        wasm_plugin: flags.wasm_plugin,
        collector_manifests,
    };
    let objects = match flags.uninstall {
        false => rollout::render(&args)?,
        true => rollout::uninstall(&args)?,
    };
    // Rendered in full before printing: an error leaves no partial output.
    let text = match flags.output {
        Output::Json => {
            let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": objects });
            serde_json::to_string_pretty(&list)? + "\n"
        }
        Output::Yaml => {
            let mut text = String::new();
            for object in &objects {
                text.push_str("---\n");
                text.push_str(&serde_yaml_ng::to_string(object)?);
            }
            text
        }
    };
    print!("{text}");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How `analyze` ends when it does not succeed with exit code 0; `main` maps
/// it to its own exit code instead of the generic failure.
#[derive(Debug, thiserror::Error)]
enum AnalyzeExit {
    /// Catch-all ports were found (and printed): exit code 1.
    #[error("catch-all ports found")]
    Findings,
    /// The file could not be read or is not a config dump: exit code 2.
    #[error("{0:#}")]
    InvalidInput(anyhow::Error),
}

fn analyze_file(file: &std::path::Path, format: Format) -> anyhow::Result<()> {
    use dialguard_envoyfilter::analyze;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read", file.display()))
        .map_err(AnalyzeExit::InvalidInput)?;
    let analysis = analyze::parse(&text)
        .and_then(|dump| analyze::analyze_dump(&dump))
        .with_context(|| file.display().to_string())
        .map_err(AnalyzeExit::InvalidInput)?;
    if analysis.listeners == 0 {
        eprintln!(
            "dialguard: warning: {} holds no listeners, so no port was checked",
            file.display()
        );
    }
    match format {
        Format::Table => print!("{}", analyze::render_table(&analysis.findings)),
        Format::Json => println!("{}", analyze::render_json(&analysis.findings)),
    }
    if analysis.findings.is_empty() {
        Ok(())
    } else {
        Err(AnalyzeExit::Findings.into())
    }
}
