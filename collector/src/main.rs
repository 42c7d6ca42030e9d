//! `dialguard`: the collector's command line. `serve` runs the collector;
//! `report` prints the audit report from its database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dialguard_collector::{ServeConfig, report, store};

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
    Serve {
        /// gRPC listen address for sidecar streams.
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc: SocketAddr,
        /// HTTP listen address (health, report API).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// SQLite database file; created if missing.
        #[arg(long)]
        db: PathBuf,
    },
    /// Print the audit report from a database (also while `serve` runs on it).
    Report {
        #[arg(long)]
        db: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
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
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dialguard: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { grpc, http, db } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(serve(grpc, http, db))
        }
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

async fn serve(grpc: SocketAddr, http: SocketAddr, db: PathBuf) -> anyhow::Result<()> {
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
        db.display()
    );
    let config = ServeConfig {
        db_path: db,
        shutdown_grace: Duration::from_secs(5),
    };
    dialguard_collector::run(grpc, http, config, shutdown_signal()).await?;
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
