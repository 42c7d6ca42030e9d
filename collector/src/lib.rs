//! `dialguard-collector`: the server that every sidecar's dialguard filter
//! streams mismatch events to (gRPC, `dialguard.v1.Collector/Report`). It
//! stores them durably in SQLite, acknowledges only what is committed, prints
//! an alert line per misrouted connection and serves the audit report.
//!
//! The `dialguard` binary is a thin CLI over [`run`] and [`report`]; tests
//! start the real server in-process on port 0.

pub mod alert;
pub mod event;
pub mod http;
pub mod ingest;
pub mod report;
pub mod store;
pub mod time;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use dialguard_proto::v1::collector_server::CollectorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::alert::AlertSink;
use crate::ingest::CollectorService;
use crate::store::{StoreError, Writer};

/// Largest message the collector accepts from a sidecar.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub db_path: PathBuf,
    /// How long open streams get to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// The filter module to serve to sidecars, if any.
    pub module: Option<http::Module>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Serves gRPC ingest on `grpc` and the HTTP API on `http` until `shutdown`
/// completes; then stops reading, lets in-flight commits finish and returns.
pub async fn run(
    grpc: TcpListener,
    http: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let conn = store::open_for_writing(&config.db_path)?;
    let (writer, writer_thread) = Writer::start(conn);
    let (stop_tx, stop_rx) = watch::channel(false);

    let service = CollectorService::new(writer, AlertSink, stop_rx.clone());
    let grpc_server = tonic::transport::Server::builder()
        .add_service(CollectorServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stopped(stop_rx.clone()));
    let http_server = axum::serve(
        http,
        http::router(config.db_path.clone(), config.module.clone()),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));

    let grpc_task = tokio::spawn(grpc_server);
    let http_task = tokio::spawn(http_server.into_future());
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
        Ok(Ok(result)) => result.map_err(ServeError::from),
        Ok(Err(join)) => Err(ServeError::Http(std::io::Error::other(join))),
        Err(_) => Ok(()),
    };
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

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
