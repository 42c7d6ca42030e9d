//! `dialguard`: the collector's command line. `serve` runs the collector;
//! `report` prints the audit report from its database; `rollout` prints the
//! Istio resources that install the filter.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand, ValueEnum};
use dialguard_collector::alertmanager::AlertmanagerConfig;
use dialguard_collector::auth::HttpToken;
use dialguard_collector::http::{self, Module, Modules};
use dialguard_collector::tls::{TlsConfig, TlsFiles, read_certificates};
use dialguard_collector::{
    Collector, Limits, ListenerLimits, ServeConfig, ServeError, report, store,
};
use dialguard_envoyfilter::module::Build;
use dialguard_envoyfilter::rollout::{
    self, CollectorManifests, CollectorMtls, ImagePullPolicy, RolloutArgs,
};

mod version;

#[derive(Debug, Parser)]
#[command(
    name = "dialguard",
    version = version::long_version(),
    long_version = version::long_version(),
    about = "Detects TCP connections that Istio sidecars send somewhere other than where the application dialed",
    after_help = "Exit status: 0 done; 1 found (analyze: catch-all ports; report --fail-on); \
                  2 error (bad flags or input, a database or server that cannot be used)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive events from sidecars, store them and print alerts (JSON lines on stdout).
    Serve(Box<ServeFlags>),
    /// Print the Kubernetes resources (EnvoyFilter or WasmPlugin, and
    /// optionally the collector) that install dialguard in selected namespaces.
    Rollout(RolloutFlags),
    /// Print the audit report from a database (also while `serve` runs on
    /// it) or from a running collector's HTTP API.
    Report(ReportFlags),
    /// List the ports where a catch-all listener sends plain TCP somewhere
    /// other than PassthroughCluster (exit code 1 when there are any).
    ///
    /// Exit status 0: none found; 1: findings; 2: FILE cannot be read or is
    /// not a config dump.
    Analyze {
        /// A sidecar's config dump: `istioctl proxy-config all -o json`,
        /// Envoy's /config_dump, or `istioctl proxy-config listeners -o json`.
        file: PathBuf,
        /// How to print the findings (`--format` is an alias).
        #[arg(short = 'o', long = "output", visible_alias = "format", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Print the version, the git revision, the SHA-256 of the module builds
    /// made with this binary and the default image references (as --version).
    Version(version::VersionFlags),
    /// Print a shell completion script: `dialguard completion bash >
    /// /etc/bash_completion.d/dialguard`, `dialguard completion zsh >
    /// "${fpath[1]}/_dialguard"`, `dialguard completion fish >
    /// ~/.config/fish/completions/dialguard.fish`.
    Completion {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, clap::Args)]
struct ServeFlags {
    /// gRPC listen address for sidecar streams. Loopback unless given:
    /// pass e.g. 0.0.0.0:50051 to accept other hosts (then use --tls-cert).
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,
    /// HTTP listen address (health, report API, metrics). Loopback unless given.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Serve both gRPC and HTTP over TLS with this certificate chain (PEM,
    /// leaf first); needs --tls-key.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require gRPC clients to present a certificate issued by a CA in this
    /// PEM file (mutual TLS); needs --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    grpc_client_ca: Option<PathBuf>,
    /// Require `Authorization: Bearer <token>` on the HTTP API and /metrics,
    /// with the token read from this file (kept out of `ps`). /healthz,
    /// /readyz and the module stay open.
    #[arg(long, value_name = "PATH")]
    http_token_file: Option<PathBuf>,
    /// SQLite database file; created if missing.
    #[arg(long)]
    db: PathBuf,
    /// The filter's audit build (dist/dialguard_filter.wasm) to serve at
    /// /module/dialguard_filter.wasm (its SHA-256 is printed at startup, for
    /// `rollout --module-sha256`). The enforce build is refused here.
    #[arg(long, value_name = "PATH")]
    module: Option<PathBuf>,
    /// The filter's enforce build (dist/dialguard_filter_enforce.wasm) to
    /// serve at /module/dialguard_filter_enforce.wasm, for `rollout --mode
    /// enforce` (its SHA-256 is printed at startup too).
    #[arg(long, value_name = "PATH")]
    enforce_module: Option<PathBuf>,
    /// Delete events, report rows and directory entries last seen longer ago
    /// than this (e.g. 30d, 12h); `off` keeps everything.
    #[arg(long, default_value_t = Retention(Some(dialguard_collector::DEFAULT_RETENTION)), value_parser = parse_retention)]
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
    #[arg(long, default_value_t = Limits::default().hello_timeout.into())]
    hello_timeout: humantime::Duration,
    /// Events stamped further ahead of this collector's clock are refused in
    /// their ack (as are events older than --retention, or 30d with
    /// `--retention off`).
    #[arg(long, default_value_t = Limits::default().max_clock_skew.into())]
    max_clock_skew: humantime::Duration,
    /// At most one alert line per (source, dialed, reached, cluster) per this
    /// interval; the next line counts the ones held back. 0s prints every one.
    #[arg(long, default_value_t = ServeConfig::DEFAULT_ALERT_INTERVAL.into())]
    alert_interval: humantime::Duration,
    /// Also push misroutes to this Alertmanager (v2 API), e.g.
    /// http://alertmanager.monitoring:9093. Pushing never delays ingest.
    #[arg(long)]
    alertmanager: Option<String>,
    /// How often active alerts are re-sent to Alertmanager.
    #[arg(long, default_value_t = AlertmanagerConfig::DEFAULT_RESEND_EVERY.into())]
    alertmanager_resend: humantime::Duration,
    /// An alert resolves once its misroute has been quiet this long.
    #[arg(long, default_value_t = AlertmanagerConfig::DEFAULT_RESOLVE_AFTER.into())]
    alertmanager_resolve_after: humantime::Duration,
    /// How long open streams get to finish on SIGTERM/SIGINT.
    #[arg(long, default_value_t = ServeConfig::DEFAULT_SHUTDOWN_GRACE.into())]
    shutdown_grace: humantime::Duration,
    /// A namespace that must have a reporting dialguard sidecar (repeat for
    /// several): without one it is uncovered in reports and metrics.
    #[arg(long = "expect-namespace", value_name = "NS", value_parser = parse_namespace)]
    expect_namespaces: Vec<String>,
    /// More expected namespaces, one per line (`#` starts a comment): e.g.
    /// the ConfigMap key `rollout --with-collector` mounts at
    /// /etc/dialguard/expected-namespaces. Read again every 10s while
    /// serving (kubelet updates a mounted ConfigMap in place): a changed
    /// list applies without a restart; one that cannot be read or holds a
    /// bad line is logged and the list in force stays.
    #[arg(long, value_name = "PATH")]
    expect_namespaces_file: Option<PathBuf>,
    /// A pod whose sidecars have all been stale this long leaves the
    /// coverage (its rows stay until --retention).
    #[arg(long, default_value_t = dialguard_collector::inventory::DEFAULT_FORGET_STALE.into())]
    forget_stale: humantime::Duration,
    /// Most sidecar VMs (node, VM instance) held in memory; hellos from new
    /// ones beyond it get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_vms)]
    max_vms: usize,
    /// Most GET /api/v1/report and /api/v1/coverage requests served at
    /// once (each holds up to 10000 rows in memory); more get 503 with
    /// Retry-After.
    #[arg(long, default_value_t = http::DEFAULT_MAX_REPORT_REQUESTS,
          value_parser = clap::value_parser!(u16).range(1..=1024).map(usize::from))]
    max_report_requests: usize,
    /// Most connections the gRPC listener holds; more are closed at once.
    /// Lowered at startup to what the file descriptor limit leaves after
    /// HTTP's share and a reserve for the database (logged).
    #[arg(long, default_value_t = ListenerLimits::default().max_grpc_connections, value_parser = at_least_one)]
    max_grpc_connections: usize,
    /// Most connections the HTTP listener holds. When full, a newcomer
    /// takes the slot of the oldest connection that is not being answered
    /// (one still sending its headers, or kept alive and idle); when all
    /// are being answered it is closed. Lowered at startup to at most a
    /// quarter of the file descriptor limit (3 per connection).
    #[arg(long, default_value_t = ListenerLimits::default().max_http_connections, value_parser = at_least_one)]
    max_http_connections: usize,
    /// How long an HTTP client gets to send a request's headers, on a new
    /// connection or the next request on a kept-alive one (e.g. 10s).
    #[arg(long, default_value_t = ListenerLimits::default().http_header_timeout.into(), value_parser = positive_duration)]
    http_header_timeout: humantime::Duration,
    /// How long an HTTP answer waits for a client that does not read it
    /// before its connection is closed (e.g. 30s).
    #[arg(long, default_value_t = ListenerLimits::default().http_idle_timeout.into(), value_parser = positive_duration)]
    http_idle_timeout: humantime::Duration,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("expected at least 1".into()),
        Ok(n) => Ok(n),
        Err(err) => Err(format!("expected a whole number of connections: {err}")),
    }
}

fn positive_duration(text: &str) -> Result<humantime::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d.into()),
        Ok(_) => Err("expected a positive duration such as 10s".into()),
        Err(err) => Err(format!("expected a duration such as 10s: {err}")),
    }
}

fn parse_namespace(text: &str) -> Result<String, String> {
    dialguard_collector::inventory::check_namespace("--expect-namespace", 1, text).map_err(|_| {
        "expected a namespace name (lowercase letters, digits and '-', at most 63, \
             starting and ending with a letter or digit)"
            .to_string()
    })
}

#[derive(Debug, Clone, Copy)]
struct Retention(Option<Duration>);

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(keep) => humantime::format_duration(keep).fmt(f),
            None => f.write_str("off"),
        }
    }
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["db", "server"])))]
struct ReportFlags {
    /// The collector's SQLite database (read-only; fine while `serve` runs).
    #[arg(long)]
    db: Option<PathBuf>,
    /// A running collector's HTTP address (its --http), e.g.
    /// http://dialguard.dialguard:8080: reads GET /api/v1/report.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// With --server: send `Authorization: Bearer <token>`, the token read
    /// from this file (the collector's --http-token-file).
    #[arg(long, value_name = "PATH", requires = "server")]
    token_file: Option<PathBuf>,
    /// With --server https://…: trust the CA certificates in this PEM file
    /// instead of the built-in public roots.
    #[arg(long, value_name = "PATH", requires = "server")]
    ca: Option<PathBuf>,
    /// How to print the report (`--format` is an alias). `table` fits the
    /// terminal (or `COLUMNS`) and leaves out the first-seen time, the
    /// enforcement counts and the source pods; `wide` shows them.
    #[arg(short = 'o', long = "output", visible_alias = "format", value_enum, default_value_t = ReportFormat::Table)]
    output: ReportFormat,
    /// With -o csv: `rows` (the default), `coverage` (one line per
    /// namespace) or `gaps` (the row totals and the events missing from
    /// the counts; also warned about on stderr with `rows`). The other
    /// formats hold all three.
    #[arg(long, value_enum)]
    section: Option<Section>,
    /// Exit with status 1 (after printing the report) when it holds any of
    /// these, for CI: a verdict (`misrouted`, `blackholed`, `redirected`;
    /// over every row the other filters select, not only this page) or
    /// `uncovered` (an expected namespace without a reporting sidecar).
    /// Comma-separated or repeated.
    #[arg(long, value_name = "WHAT", value_enum, value_delimiter = ',')]
    fail_on: Vec<FailOn>,
    /// Rows whose connections went on at or after this: an RFC 3339 time
    /// (2026-11-26T07:00:00Z) or a duration meaning that long ago (24h, 7d).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Rows whose connections began at or before this (same forms as --since).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Only connections from workloads in this namespace.
    #[arg(short = 'n', long, value_name = "NS")]
    namespace: Option<String>,
    /// Only this verdict: misrouted, blackholed or redirected.
    #[arg(long)]
    verdict: Option<String>,
    /// Only connections dialed to this destination port.
    #[arg(long, value_name = "N")]
    port: Option<String>,
    /// Rows per page, worst first (misrouted, then blackholed, then the
    /// rest; then by count): 1 to 10000 (default 1000). Every format says
    /// when rows were left out (CSV on stderr).
    #[arg(long, value_name = "N")]
    limit: Option<String>,
    /// The page after an earlier one: its `nextCursor` (JSON), or the
    /// cursor its table, CSV or HTML note names.
    #[arg(long, value_name = "CURSOR")]
    cursor: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Rows,
    Coverage,
    Gaps,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FailOn {
    Misrouted,
    Blackholed,
    Redirected,
    /// An expected namespace has no reporting sidecar.
    Uncovered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReportFormat {
    Table,
    /// The table with every column.
    Wide,
    Json,
    Csv,
    /// One self-contained page (no external resources).
    Html,
}

/// How long `report --server` waits for the collector, connecting included.
const REPORT_SERVER_TIMEOUT: Duration = Duration::from_secs(60);

fn report_command(flags: ReportFlags) -> anyhow::Result<()> {
    if flags.section.is_some() && flags.output != ReportFormat::Csv {
        anyhow::bail!(
            "--section: only with -o csv (the other formats show rows, coverage and gaps together)"
        );
    }
    // Validated here whatever the source, so --server gets the same errors
    // (and relative times count back from this machine's clock).
    let filter = report::FilterArgs {
        since: flags.since,
        until: flags.until,
        namespace: flags.namespace,
        verdict: flags.verdict,
        port: flags.port,
        limit: flags.limit,
        cursor: flags.cursor,
    }
    .resolve(std::time::SystemTime::now())
    .map_err(|err| anyhow::anyhow!(err.flag_message()))?;
    let source = match (&flags.db, &flags.server) {
        (Some(db), _) => ReportSource::Db(store::open_for_reading(db)?),
        (None, Some(server)) => ReportSource::Server {
            url: server.clone(),
            access: ServerAccess::load(flags.token_file.as_deref(), flags.ca.as_deref())?,
        },
        (None, None) => anyhow::bail!("--db PATH or --server URL is required"),
    };
    let report = source.report(&filter)?;
    let found = findings(&source, &report, &filter, &flags.fail_on)?;
    // Rendered in full before printing: an error leaves no partial output.
    let layout = |wide| report::TableLayout {
        wide,
        width: table_width(),
    };
    let text = match flags.output {
        ReportFormat::Table => report::render_table(&report, layout(false)),
        ReportFormat::Wide => report::render_table(&report, layout(true)),
        ReportFormat::Json => serde_json::to_string_pretty(&report)? + "\n",
        ReportFormat::Csv => match flags.section.unwrap_or(Section::Rows) {
            Section::Coverage => report::render_coverage_csv(&report).context("writing CSV")?,
            Section::Gaps => report::render_gaps_csv(&report).context("writing CSV")?,
            Section::Rows => {
                // The CSV stays data only (one header, one line per row), so
                // that tools read it unchanged: the notes go to stderr.
                for note in report::truncation_note(&report)
                    .into_iter()
                    .chain(report::gap_notes(&report))
                {
                    eprintln!("dialguard: {note}");
                }
                report::render_csv(&report).context("writing CSV")?
            }
        },
        ReportFormat::Html => report::html::render_html(
            &report,
            &dialguard_collector::time::rfc3339(dialguard_collector::time::now_unix_nanos()),
        ),
    };
    print!("{text}");
    if found.is_empty() {
        Ok(())
    } else {
        Err(Findings(format!("--fail-on: the report holds {}", found.join(", "))).into())
    }
}

/// Where `report` reads from: the database or a running collector.
#[derive(Debug)]
enum ReportSource {
    Db(rusqlite::Connection),
    Server { url: String, access: ServerAccess },
}

impl ReportSource {
    fn report(&self, filter: &report::ReportFilter) -> anyhow::Result<report::Report> {
        match self {
            Self::Db(conn) => Ok(report::query_filtered(conn, filter)?),
            Self::Server { url, access } => fetch_report(url, filter, access),
        }
    }
}

/// What of `fail_on` the report holds, e.g. `["misrouted rows", "uncovered
/// namespaces (a, b)"]`. A verdict that is not on this page is looked up
/// over every row the filter selects (one more query of one row).
fn findings(
    source: &ReportSource,
    report: &report::Report,
    filter: &report::ReportFilter,
    fail_on: &[FailOn],
) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for what in fail_on {
        let verdict = match what {
            FailOn::Uncovered => {
                if !report.coverage.uncovered.is_empty() {
                    found.push(format!(
                        "uncovered namespaces ({})",
                        report.coverage.uncovered.join(", ")
                    ));
                }
                continue;
            }
            FailOn::Misrouted => "misrouted",
            FailOn::Blackholed => "blackholed",
            FailOn::Redirected => "redirected",
        };
        let on_page = report.rows.iter().any(|row| row.verdict == verdict);
        let whole_filter = filter.page.after.is_some() || report.truncated;
        let elsewhere =
            !on_page && whole_filter && filter.verdict.as_deref().is_none_or(|v| v == verdict) && {
                let only = report::ReportFilter {
                    verdict: Some(verdict.to_string()),
                    page: report::Page {
                        limit: 1,
                        after: None,
                    },
                    ..filter.clone()
                };
                source.report(&only)?.total_rows > 0
            };
        if on_page || elsewhere {
            found.push(format!("{verdict} rows"));
        }
    }
    Ok(found)
}

/// The width tables fit into: `COLUMNS` when set (as shells export it),
/// else the terminal's when stdout is one; `None` (unlimited) for a pipe.
fn table_width() -> Option<u16> {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|text| text.trim().parse::<u16>().ok())
        .filter(|width| *width > 0)
        .or_else(|| comfy_table::Table::new().width())
}

/// `GET {server}/api/v1/report?{filter}`, with the collector's `{"error"}`
/// message shown when it refuses.
fn fetch_report(
    server: &str,
    filter: &report::ReportFilter,
    access: &ServerAccess,
) -> anyhow::Result<report::Report> {
    let base = url::Url::parse(server)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--server {server:?}: expected an http:// or https:// URL such as http://127.0.0.1:8080"
            )
        })?;
    // Joined below the path given (a collector behind a path prefix), not beside it.
    let mut base = base;
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    let mut url = base
        .join("api/v1/report")
        .with_context(|| format!("--server {server:?}"))?;
    let query = filter.to_query();
    url.set_query((!query.is_empty()).then_some(query.as_str()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let client = access
            .client_builder()
            .timeout(REPORT_SERVER_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        let response = access
            .authorize(client.get(url.clone()))
            .send()
            .await
            .with_context(|| format!("--server: GET {url}"))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .with_context(|| format!("--server: reading the answer to GET {url}"))?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| body.trim().chars().take(500).collect());
            anyhow::bail!("--server: GET {url} answered {status}: {message}");
        }
        serde_json::from_str(&body)
            .with_context(|| format!("--server: GET {url}: not a dialguard report"))
    })
}

/// What `report --server` needs beyond the URL: `--token-file` and `--ca`.
#[derive(Debug, Default)]
struct ServerAccess {
    token: Option<HttpToken>,
    ca: Vec<reqwest::Certificate>,
}

impl ServerAccess {
    fn load(token_file: Option<&Path>, ca: Option<&Path>) -> anyhow::Result<Self> {
        let token = token_file
            .map(|path| HttpToken::load("--token-file", path))
            .transpose()?;
        let ca = match ca {
            None => Vec::new(),
            Some(path) => read_certificates("--ca", path)?
                .iter()
                .map(|der| {
                    reqwest::Certificate::from_der(der).with_context(|| {
                        format!("--ca {}: not a usable certificate", path.display())
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        };
        Ok(Self { token, ca })
    }

    fn client_builder(&self) -> reqwest::ClientBuilder {
        let mut builder = reqwest::Client::builder();
        if !self.ca.is_empty() {
            builder = builder.use_rustls_tls().tls_built_in_root_certs(false);
            for certificate in &self.ca {
                builder = builder.add_root_certificate(certificate.clone());
            }
        }
        builder
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token.secret()),
            None => request,
        }
    }
}

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
    /// A namespace to roll out to (repeat for several).
    #[arg(short = 'n', long = "namespace", required = true)]
    namespaces: Vec<String>,
    /// Only workloads with this label, as key=value (repeat to require several).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// What the filter does with a misrouted connection.
    #[arg(long, default_value = "audit")]
    mode: String,
    /// The collector's gRPC address as the sidecars reach it, HOST:PORT.
    /// Defaults to the collector that deploy/kustomize/base (or
    /// --with-collector) installs in --collector-namespace:
    /// dialguard-collector.NAMESPACE.svc.cluster.local:50051.
    #[arg(long)]
    collector: Option<String>,
    /// Where Envoy downloads the module (http:// or https://), or, with
    /// --wasm-plugin, the image istio-agent pulls
    /// (oci://REGISTRY/dialguard-filter:TAG[@sha256:DIGEST]). Defaults: with
    /// --with-collector, that collector's URL of the build the mode needs;
    /// else with --wasm-plugin, the release image of that build. --mode
    /// enforce needs the enforce build's URL (/dialguard_filter_enforce.wasm,
    /// or the image dialguard-filter-enforce) unless --module shows the build.
    #[arg(long)]
    module_url: Option<String>,
    /// The module's SHA-256, 64 hex digits; Envoy refuses any other bytes.
    /// Computed from --module when that is given. For an oci:// image: the
    /// image manifest's digest (optional; a @sha256: in the URL is the same).
    #[arg(long)]
    module_sha256: Option<String>,
    /// The module file the URL serves (e.g. dist/dialguard_filter_enforce.wasm):
    /// rollout computes its SHA-256 and checks that its build runs --mode
    /// (for an oci:// image, the build only).
    #[arg(long, value_name = "PATH")]
    module: Option<PathBuf>,
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
    /// With --wasm-plugin: when istio-agent pulls the module again.
    #[arg(long, value_enum, value_name = "POLICY")]
    image_pull_policy: Option<ImagePullPolicyFlag>,
    /// With --wasm-plugin and an oci:// --module-url: the Secret
    /// (kubernetes.io/dockerconfigjson) in each rolled-out namespace that
    /// istio-agent pulls the image with.
    #[arg(long, value_name = "NAME")]
    image_pull_secret: Option<String>,
    /// Also render the collector: the objects of deploy/kustomize/base
    /// (Namespace, ServiceAccount, PVC, Deployment, Service, ServiceMonitor,
    /// PrometheusRule, Grafana dashboard) with these flags applied.
    #[arg(long)]
    with_collector: bool,
    #[arg(long, default_value = "dialguard")]
    collector_namespace: String,
    /// Container image of the collector, holding both builds in /opt/dialguard/
    /// (dialguard_filter.wasm and dialguard_filter_enforce.wasm).
    #[arg(long, default_value_t = dialguard_envoyfilter::image::reference(dialguard_envoyfilter::image::COLLECTOR_IMAGE))]
    collector_image: String,
    #[arg(long, default_value = "1Gi")]
    collector_storage: String,
    /// How sidecars connect to the collector. `istio`: mutual TLS with
    /// their Istio workload certificates (SDS secret `default`), checking
    /// the collector's certificate against the mesh's root (`ROOTCA`) and
    /// its --collector host name; the collector must run with --tls-cert,
    /// --tls-key and --grpc-client-ca (the mesh's root). With
    /// --with-collector the Deployment does, from the Secret
    /// dialguard-collector-tls and the ConfigMap istio-ca-root-cert.
    #[arg(long, value_enum, default_value_t = CollectorMtlsFlag::Off)]
    collector_mtls: CollectorMtlsFlag,
    /// Print what removes the rollout instead (for `kubectl delete -f -`).
    #[arg(long)]
    uninstall: bool,
    /// yaml: documents separated by `---`; json: a v1 List.
    #[arg(short = 'o', long, visible_alias = "format", value_enum, default_value_t = Output::Yaml)]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ImagePullPolicyFlag {
    #[value(name = "IfNotPresent")]
    IfNotPresent,
    #[value(name = "Always")]
    Always,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CollectorMtlsFlag {
    Off,
    Istio,
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
        Err(err) => match err.downcast_ref::<Findings>() {
            // What was found is on stdout already.
            Some(Findings(what)) => {
                eprintln!("dialguard: {what}");
                ExitCode::from(1)
            }
            None => {
                eprintln!("dialguard: {}", error_chain(&err));
                ExitCode::from(2)
            }
        },
    }
}

/// A command found what it looks for (`analyze`'s catch-all ports,
/// `report --fail-on`): exit status 1, where every error is 2 (as clap's
/// usage errors are), so CI tells "found" from "could not look".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Findings(String);

/// The error and its causes joined by ": ", each cause left out when the
/// text before it already says it (many errors print their source in
/// their own message too: "no such file: no such file").
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(flags) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(serve(*flags))
        }
        Command::Rollout(flags) => rollout(flags),
        Command::Analyze { file, output } => analyze_file(&file, output),
        Command::Report(flags) => report_command(flags),
        Command::Completion { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "dialguard",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Version(flags) => version::print(&flags),
    }
}

async fn serve(flags: ServeFlags) -> anyhow::Result<()> {
    // First, so that everything opened later counts against the raised
    // limit; logged after the listening line, which must come first.
    let fd_limit = dialguard_collector::listener::raise_fd_limit();
    let modules = Modules {
        audit: flags
            .module
            .as_deref()
            .map(|path| Module::load(path, Build::Audit))
            .transpose()?,
        enforce: flags
            .enforce_module
            .as_deref()
            .map(|path| Module::load(path, Build::Enforce))
            .transpose()?,
    };
    let config = ServeConfig {
        shutdown_grace: flags.shutdown_grace.into(),
        modules,
        limits: Limits {
            max_message_bytes: flags.max_message_bytes,
            max_batch_events: flags.max_batch_events,
            max_streams: flags.max_streams,
            hello_timeout: flags.hello_timeout.into(),
            max_vms: flags.max_vms,
            max_clock_skew: flags.max_clock_skew.into(),
            ..Limits::default()
        },
        listeners: ListenerLimits {
            max_grpc_connections: flags.max_grpc_connections,
            max_http_connections: flags.max_http_connections,
            http_header_timeout: flags.http_header_timeout.into(),
            http_idle_timeout: flags.http_idle_timeout.into(),
        },
        expected_namespaces: flags.expect_namespaces.iter().cloned().collect(),
        expected_namespaces_file: flags.expect_namespaces_file.clone(),
        forget_stale: flags.forget_stale.into(),
        max_report_requests: flags.max_report_requests,
        retention: flags.retention.0,
        alert_interval: flags.alert_interval.into(),
        alertmanager: flags
            .alertmanager
            .map(|url| parse_alertmanager_url(&url))
            .transpose()?
            .map(|url| AlertmanagerConfig {
                url,
                resend_every: flags.alertmanager_resend.into(),
                resolve_after: flags.alertmanager_resolve_after.into(),
            }),
        tls: match (flags.tls_cert, flags.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig::load(&TlsFiles {
                cert,
                key,
                grpc_client_ca: flags.grpc_client_ca,
            })?),
            // clap enforces both or neither (`requires`).
            _ => None,
        },
        http_token: flags
            .http_token_file
            .as_deref()
            .map(|path| HttpToken::load("--http-token-file", path))
            .transpose()?,
        ..ServeConfig::new(flags.db)
    };
    // Before anything says it listens: a database that cannot be opened
    // or migrated stops `serve` here, with the flag named.
    let db = config.db_path.clone();
    let collector = Collector::open(config).map_err(|err| match err {
        ServeError::Expected(err) => anyhow::Error::new(err),
        err => anyhow::Error::new(err)
            .context(format!("--db {}: cannot use the database", db.display())),
    })?;
    let config = collector.config();
    let (grpc, http) = (flags.grpc, flags.http);
    let grpc = tokio::net::TcpListener::bind(grpc)
        .await
        .with_context(|| format!("--grpc {grpc}: cannot listen"))?;
    let http = tokio::net::TcpListener::bind(http)
        .await
        .with_context(|| format!("--http {http}: cannot listen"))?;
    let security = match &config.tls {
        Some(tls) if tls.grpc_client_auth() => "tls=on grpc-client-certs=required",
        Some(_) => "tls=on",
        None => "tls=off",
    };
    // A fixed first line, whatever the log level: scripts and tests read the ports from it.
    eprintln!(
        "dialguard: listening grpc={} http={} db={} {security}",
        grpc.local_addr()?,
        http.local_addr()?,
        config.db_path.display()
    );
    warn_if_exposed(config, grpc.local_addr()?, http.local_addr()?);
    match fd_limit {
        Ok(limit) if limit.soft_before != limit.soft => tracing::info!(
            "file descriptors: soft limit raised from {} to {} (the hard limit is {})",
            limit.soft_before,
            limit.soft,
            limit.hard
        ),
        Ok(limit) => tracing::info!(
            "file descriptors: soft limit {} (the hard limit is {})",
            limit.soft,
            limit.hard
        ),
        Err(err) => tracing::warn!("raising the file descriptor limit failed: {err}"),
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // The audit build's line first and unchanged: scripts read it.
    for module in [&config.modules.audit, &config.modules.enforce]
        .into_iter()
        .flatten()
    {
        let build = match module.build {
            Build::Audit => "",
            Build::Enforce => "enforce ",
        };
        eprintln!(
            "dialguard: serving {build}module sha256={} at {scheme}://{}{}",
            module.sha256,
            http.local_addr()?,
            module.path()
        );
    }
    collector.serve(grpc, http, shutdown_signal()).await?;
    Ok(())
}

/// Warns on stderr about a listener that other hosts can reach without TLS
/// (or, for HTTP, without a token): binding there is allowed, as inside a
/// cluster, but should be a choice.
fn warn_if_exposed(config: &ServeConfig, grpc: SocketAddr, http: SocketAddr) {
    if config.tls.is_none() {
        for (flag, addr) in [("--grpc", grpc), ("--http", http)] {
            if !addr.ip().is_loopback() {
                eprintln!(
                    "dialguard: warning: {flag} {addr} is reachable from other hosts and TLS is off \
                     (--tls-cert/--tls-key): traffic is plain text"
                );
            }
        }
    }
    for warning in config.tls.iter().flat_map(TlsConfig::warnings) {
        eprintln!("dialguard: warning: {warning}");
    }
    if config.http_token.is_none() && !http.ip().is_loopback() {
        eprintln!(
            "dialguard: warning: --http {http} is reachable from other hosts without \
             --http-token-file: anyone who reaches it can read the report and metrics"
        );
    }
}

fn rollout(flags: RolloutFlags) -> anyhow::Result<()> {
    let collector_manifests = flags.with_collector.then(|| CollectorManifests {
        namespace: flags.collector_namespace.clone(),
        image: flags.collector_image.clone(),
        storage: flags.collector_storage.clone(),
    });
    let collector = flags
        .collector
        .clone()
        .unwrap_or_else(|| rollout::in_cluster_collector(&flags.collector_namespace));
    let args = RolloutArgs {
        namespaces: flags.namespaces,
        selectors: flags.selectors,
        mode: flags.mode,
        collector,
        module_url: flags.module_url,
        module_sha256: flags.module_sha256,
        module_file: flags.module,
        service_cidrs: flags.service_cidrs,
        pod_cidrs: flags.pod_cidrs,
        priority: flags.priority,
        wasm_plugin: flags.wasm_plugin,
        collector_manifests,
        collector_mtls: match flags.collector_mtls {
            CollectorMtlsFlag::Off => CollectorMtls::Off,
            CollectorMtlsFlag::Istio => CollectorMtls::Istio,
        },
        image_pull_policy: flags.image_pull_policy.map(|policy| match policy {
            ImagePullPolicyFlag::IfNotPresent => ImagePullPolicy::IfNotPresent,
            ImagePullPolicyFlag::Always => ImagePullPolicy::Always,
        }),
        image_pull_secret: flags.image_pull_secret,
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

fn analyze_file(file: &std::path::Path, format: Format) -> anyhow::Result<()> {
    use dialguard_envoyfilter::analyze;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let analysis = analyze::parse(&text)
        .and_then(|dump| analyze::analyze_dump(&dump))
        .with_context(|| file.display().to_string())?;
    if analysis.listeners == 0 {
        eprintln!(
            "dialguard: warning: {} holds no listeners, so no port was checked",
            file.display()
        );
    }
    match format {
        Format::Table => print!(
            "{}",
            analyze::render_table(&analysis.findings, table_width())
        ),
        Format::Json => println!("{}", analyze::render_json(&analysis.findings)),
    }
    match analysis.findings.len() {
        0 => Ok(()),
        n => Err(Findings(format!("{n} catch-all ports found")).into()),
    }
}
