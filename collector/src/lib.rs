//! `dialguard-collector`: the server that every sidecar's dialguard filter
//! streams mismatch events to (gRPC, `dialguard.v1.Collector/Report`). It
//! stores them durably in SQLite, acknowledges only what is committed, prints
//! an alert line per misrouted connection and serves the audit report.
//!
//! The `dialguard` binary is a thin CLI over [`run`] and [`report`]; tests
//! start the real server in-process on port 0.

pub mod alert;
pub mod alertmanager;
pub mod auth;
pub mod directory;
pub mod event;
pub mod expected;
pub mod finding;
pub mod health;
pub mod http;
pub mod identity;
pub mod ingest;
pub mod inventory;
pub mod listener;
pub mod metrics;
pub mod report;
pub mod sequence;
pub mod store;
pub mod time;
pub mod tls;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use dialguard_proto::v1::collector_server::CollectorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::alert::AlertSink;
use crate::alertmanager::AlertmanagerConfig;
use crate::auth::HttpToken;
use crate::directory::Directory;
use crate::health::StoreHealth;
pub use crate::ingest::Limits;
use crate::ingest::{CollectorService, Notify};
use crate::inventory::{CoverageConfig, Inventory};
pub use crate::listener::ListenerLimits;
use crate::listener::{Listener, Slots};
use crate::metrics::Metrics;
use crate::store::{StoreError, Writer, WriterConfig};
use crate::tls::TlsConfig;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub db_path: PathBuf,
    /// How long open streams get to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// The filter's builds to serve to sidecars, if any.
    pub modules: http::Modules,
    pub limits: Limits,
    /// Events, aggregate rows and directory entries last seen longer ago
    /// than this are deleted in the background; `None` keeps everything.
    pub retention: Option<Duration>,
    /// How often retention runs (also once at startup).
    pub retention_every: Duration,
    /// At most one alert line per aggregation key per this interval.
    pub alert_interval: Duration,
    /// Push misroutes to this Alertmanager too.
    pub alertmanager: Option<AlertmanagerConfig>,
    pub writer: WriterConfig,
    /// TLS on both listeners (and, if it says so, client certificates on gRPC).
    pub tls: Option<TlsConfig>,
    /// The HTTP API requires this bearer token (see [`auth`] for the open paths).
    pub http_token: Option<HttpToken>,
    /// Namespaces that must have a reporting sidecar (recorded in the
    /// database for `report`).
    pub expected_namespaces: BTreeSet<String>,
    /// More of them, one per line, in a file read at startup and again
    /// every `expected_namespaces_reload` while serving (see [`expected`]).
    pub expected_namespaces_file: Option<PathBuf>,
    pub expected_namespaces_reload: Duration,
    /// A pod stale for longer than this leaves the coverage.
    pub forget_stale: Duration,
    /// Connection caps and timeouts of both listeners.
    pub listeners: ListenerLimits,
    /// Most report reads of the HTTP API at once; more get 503.
    pub max_report_requests: usize,
}

impl ServeConfig {
    /// How long open streams get to finish on shutdown (`--shutdown-grace`).
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
    /// At most one alert line per key per this (`--alert-interval`).
    pub const DEFAULT_ALERT_INTERVAL: Duration = Duration::from_secs(60);

    /// The defaults of `dialguard serve` (its flags' defaults are these)
    /// for a database at `db_path`.
    pub fn new(db_path: impl Into<PathBuf>) -> Self {
        Self {
            db_path: db_path.into(),
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            modules: http::Modules::default(),
            limits: Limits::default(),
            retention: Some(DEFAULT_RETENTION),
            retention_every: Duration::from_secs(600),
            alert_interval: Self::DEFAULT_ALERT_INTERVAL,
            alertmanager: None,
            writer: WriterConfig::default(),
            tls: None,
            http_token: None,
            expected_namespaces: BTreeSet::new(),
            expected_namespaces_file: None,
            expected_namespaces_reload: expected::RELOAD_EVERY,
            forget_stale: inventory::DEFAULT_FORGET_STALE,
            listeners: ListenerLimits::default(),
            max_report_requests: http::DEFAULT_MAX_REPORT_REQUESTS,
        }
    }
}

/// `--retention` when not given: 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error(transparent)]
    Expected(#[from] expected::ExpectedError),
}

/// Serves gRPC ingest on `grpc` and the HTTP API on `http` until `shutdown`
/// completes; then stops reading, lets in-flight commits finish and returns.
pub async fn run(
    grpc: TcpListener,
    http: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    Collector::open(config)?.serve(grpc, http, shutdown).await
}

/// The collector with its database opened and migrated and its state
/// loaded, not serving yet: `dialguard serve` says it listens only once
/// this has worked, so a database it cannot use fails before that line.
#[derive(Debug)]
pub struct Collector {
    config: ServeConfig,
    conn: rusqlite::Connection,
    directory: Directory,
    inventory: Inventory,
}

impl Collector {
    /// Opens (creating and migrating) the database and loads the pod
    /// directory and the sidecar inventory from it.
    pub fn open(config: ServeConfig) -> Result<Self, ServeError> {
        let mut conn = store::open_for_writing(&config.db_path)?;
        let directory = Directory::load(store::directory_pods(&conn, directory::MAX_ENTRIES)?);
        let expected = expected::load(
            &config.expected_namespaces,
            config.expected_namespaces_file.as_deref(),
        )?;
        store::record_coverage_config(&mut conn, &expected, config.forget_stale)?;
        let inventory = Inventory::load(
            store::inventory(&conn, None, config.limits.max_vms)?,
            CoverageConfig {
                max_vms: config.limits.max_vms,
                expected,
                forget_stale: config.forget_stale,
            },
        );
        inventory.forget(crate::time::now_unix_nanos());
        Ok(Self {
            config,
            conn,
            directory,
            inventory,
        })
    }

    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// [`run`], on the opened database.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let Self {
            config,
            conn,
            directory,
            inventory,
        } = self;
        let metrics = Metrics::new();
        let health = StoreHealth::new();
        let (writer, writer_thread) =
            Writer::start(conn, config.writer.clone(), metrics.clone(), health.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        let probe = tokio::spawn(probe_store(writer.clone(), health.clone(), stop_rx.clone()));

        let alerts = AlertSink::new(config.alert_interval);
        let background = tokio::spawn(background(
            writer.clone(),
            alerts.clone(),
            config.clone(),
            stop_rx.clone(),
        ));
        let persist = tokio::spawn(persist_inventory(
            inventory.clone(),
            writer.clone(),
            stop_rx.clone(),
        ));
        let watch_expected = config.expected_namespaces_file.clone().map(|file| {
            tokio::spawn(expected::watch_file(
                config.expected_namespaces.clone(),
                file,
                config.expected_namespaces_reload,
                inventory.clone(),
                writer.clone(),
                stop_rx.clone(),
            ))
        });
        let final_flush = (inventory.clone(), writer.clone());
        let mut limits = config.limits;
        if let Some(retention) = config.retention {
            // An event older than retention would be expired at once.
            limits.max_event_age = limits.max_event_age.min(retention);
        }
        let alertmanager = config
            .alertmanager
            .clone()
            .map(|am| alertmanager::start(am, stop_rx.clone()));
        let service = CollectorService::new(
            writer,
            Notify {
                alerts,
                alertmanager,
                directory,
                inventory: inventory.clone(),
            },
            limits,
            metrics.clone(),
            stop_rx.clone(),
        );
        let grpc_server = tonic::transport::Server::builder()
            // Dead sidecars (a node gone without a FIN) must not hold a stream slot forever.
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .http2_keepalive_interval(Some(Duration::from_secs(60)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            // Flow control bounds what each connection can buffer before ingest
            // reads it. A sidecar keeps up to 10,000 events (about 2 MB)
            // unacknowledged; with 256 KiB windows a single busy stream spent
            // most of that waiting for window updates (76k events/s against
            // 153k/s with 1 MiB, `cargo xtask bench collector`). Decoded events
            // are bounded separately (`QUEUED_EVENTS`).
            .initial_stream_window_size(Some(1 << 20))
            .initial_connection_window_size(Some(1 << 20))
            .add_service(
                CollectorServer::new(service).max_decoding_message_size(limits.max_message_bytes),
            );
        let fd_limit = listener::fd_limit().unwrap_or_else(|err| {
            tracing::warn!("reading the file descriptor limit failed ({err}); assuming 1024");
            1024
        });
        let caps = config.listeners.caps(fd_limit);
        tracing::info!(
            "connections: at most {} gRPC and {} HTTP (file descriptor limit {fd_limit}, \
             {} kept for the database and the collector's own files)",
            caps.grpc,
            caps.http,
            listener::RESERVED_FDS
        );
        let grpc_incoming = listener::accept(
            grpc,
            listener::Accept {
                listener: Listener::Grpc,
                slots: Slots::new(Listener::Grpc, caps.grpc, metrics.clone()),
                tls: config.tls.as_ref().map(TlsConfig::grpc),
                // A plain connection that never says anything holds no slot for long.
                await_first_bytes: true,
            },
            stop_rx.clone(),
        );
        let incoming = ReceiverStream::new(grpc_incoming).map(Ok::<_, std::io::Error>);
        let grpc_task = tokio::spawn(
            grpc_server.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())),
        );

        let http_slots = Slots::new(Listener::Http, caps.http, metrics.clone());
        let mut app = http::router(
            config.db_path.clone(),
            config.modules.clone(),
            metrics,
            inventory,
            config.max_report_requests,
            health,
        );
        if let Some(token) = config.http_token.clone() {
            app = auth::require_token(app, token);
        }
        let http_incoming = listener::accept(
            http,
            listener::Accept {
                listener: Listener::Http,
                slots: http_slots,
                tls: config.tls.as_ref().map(TlsConfig::http),
                // hyper's header timeout covers a silent client.
                await_first_bytes: false,
            },
            stop_rx.clone(),
        );
        let http_task = tokio::spawn(listener::serve_http(
            http_incoming,
            app,
            config.listeners,
            stop_rx.clone(),
        ));
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        let grace = config.shutdown_grace;
        let grpc_result = match tokio::time::timeout(grace, grpc_task).await {
            Ok(Ok(result)) => result.map_err(ServeError::from),
            Ok(Err(join)) => Err(ServeError::Http(std::io::Error::other(join))),
            Err(_) => {
                tracing::warn!("gRPC connections still open after {grace:?}; closing them");
                Ok(())
            }
        };
        let http_result = match tokio::time::timeout(grace, http_task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(join)) => Err(ServeError::Http(std::io::Error::other(join))),
            Err(_) => Ok(()),
        };
        let _ = background.await;
        let _ = persist.await;
        let _ = probe.await;
        if let Some(watch) = watch_expected {
            let _ = watch.await;
        }
        // What the streams changed since the last flush, once they are done
        // (or abandoned after the grace period).
        let (inventory, flush_writer) = final_flush;
        flush_inventory(&inventory, &flush_writer).await;
        drop(flush_writer);
        // The writer thread ends once every stream task has dropped its handle;
        // commits already queued finish first. A connection that outlives the
        // grace period is abandoned: what it did not get acknowledged, the
        // sidecar sends again.
        let join = tokio::task::spawn_blocking(move || writer_thread.join());
        if tokio::time::timeout(grace, join).await.is_err() {
            tracing::warn!("streams still open after {grace:?}; stopping without them");
        }
        grpc_result.and(http_result)
    }
}

/// Retention passes and alert sweeps, until shutdown.
async fn background(
    writer: Writer,
    alerts: AlertSink,
    config: ServeConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut retention = tokio::time::interval(config.retention_every);
    let mut sweep = tokio::time::interval(config.alert_interval.max(Duration::from_secs(1)));
    let mut stopping = stop.clone();
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let retain = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = sweep.tick() => {
                alerts.sweep();
                continue;
            }
            _ = retention.tick() => config.retention,
        };
        let Some(keep) = retain else { continue };
        let cutoff = crate::time::now_unix_nanos().saturating_sub(keep.as_nanos() as u64);
        let expired = tokio::select! {
            expired = writer.expire(cutoff) => expired,
            _ = stopping.wait_for(|s| *s) => return,
        };
        match expired {
            Ok(expired) if expired != store::Expired::default() => {
                tracing::info!(
                    ?expired,
                    "retention: removed what is older than {}",
                    humantime::format_duration(keep)
                );
            }
            Ok(_) => {}
            Err(err) => tracing::error!("retention pass failed: {err}"),
        }
    }
}

/// How often the inventory's changed VMs are written (one transaction).
const INVENTORY_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Writes the inventory's changed VMs every [`INVENTORY_FLUSH_EVERY`] and
/// drops the long-stale ones from memory, until shutdown.
async fn persist_inventory(inventory: Inventory, writer: Writer, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INVENTORY_FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        flush_inventory(&inventory, &writer).await;
    }
}

async fn flush_inventory(inventory: &Inventory, writer: &Writer) {
    let forgotten = inventory.forget(crate::time::now_unix_nanos());
    if forgotten > 0 {
        tracing::debug!("forgot {forgotten} long-stale sidecar VMs (kept in the database)");
    }
    let dirty = inventory.take_dirty();
    if dirty.is_empty() {
        return;
    }
    let keys: Vec<_> = dirty.iter().map(|(key, _)| key.clone()).collect();
    if let Err(err) = writer.save_inventory(dirty).await {
        tracing::error!("saving the sidecar inventory failed, retrying in a second: {err}");
        inventory.mark_dirty(&keys);
    }
}

/// Has the writer make a small write whenever it was idle for
/// [`health::PROBE_EVERY`], so that `/readyz` notices a store that cannot
/// write even while nobody writes; until shutdown.
async fn probe_store(writer: Writer, health: StoreHealth, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(health::PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        if health.idle_for() >= health::PROBE_EVERY {
            writer.probe();
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
