//! The HTTP side: health, Prometheus metrics (`GET /metrics`), the report as
//! JSON (`GET /api/v1/report`) and, with
//! `serve --module`, the filter module itself, so one deployment gives Envoy
//! both the module and the event sink.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use sha2::{Digest, Sha256};

use crate::inventory::{Coverage, Inventory};
use crate::metrics::{self, Metrics};
use crate::report::{self, Report};
use crate::store;

/// Where the module is served.
pub const MODULE_PATH: &str = "/module/dialguard_filter.wasm";

/// A module held in memory with its SHA-256 (what `vm_config.code.remote.sha256` must say).
#[derive(Clone)]
pub struct Module {
    pub bytes: Arc<[u8]>,
    pub sha256: String,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("len", &self.bytes.len())
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl Module {
    pub fn load(path: &Path) -> Result<Self, ModuleError> {
        let bytes = std::fs::read(path).map_err(|source| ModuleError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !bytes.starts_with(b"\0asm") {
            return Err(ModuleError::NotWasm(path.to_owned()));
        }
        Ok(Self::from_bytes(bytes))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let sha256 = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self {
            bytes: bytes.into(),
            sha256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("--module {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--module {0}: not a WebAssembly module (expected the \\0asm header)")]
    NotWasm(PathBuf),
}

#[derive(Debug, Clone)]
struct AppState {
    db_path: Arc<PathBuf>,
    module: Option<Module>,
    metrics: Metrics,
    inventory: Inventory,
}

pub fn router(
    db_path: PathBuf,
    module: Option<Module>,
    metrics: Metrics,
    inventory: Inventory,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/report", get(report_json))
        .route("/api/v1/coverage", get(coverage_json))
        .route(MODULE_PATH, get(module_bytes))
        .route(&format!("{MODULE_PATH}.sha256"), get(module_sha256))
        .with_state(AppState {
            db_path: Arc::new(db_path),
            module,
            metrics,
            inventory,
        })
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    let namespaces = state.inventory.namespaces(crate::time::now_unix_nanos());
    match state.metrics.encode_with_coverage(&namespaces) {
        Ok(text) => Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text)),
        Err(_) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )),
    }
}

async fn module_bytes(State(state): State<AppState>) -> impl IntoResponse {
    match state.module {
        Some(module) => Ok((
            [(header::CONTENT_TYPE, "application/wasm")],
            axum::body::Bytes::from_owner(module.bytes),
        )),
        None => Err((StatusCode::NOT_FOUND, "no module: start with --module\n")),
    }
}

async fn module_sha256(State(state): State<AppState>) -> impl IntoResponse {
    match state.module {
        Some(module) => Ok(module.sha256 + "\n"),
        None => Err((StatusCode::NOT_FOUND, "no module: start with --module\n")),
    }
}

/// `GET /api/v1/report[?since=&until=&namespace=&verdict=&port=]`: the
/// report, filtered as `dialguard report` filters it. A bad parameter gets
/// 400 and `{"error": "<parameter> \"<value>\": expected ..."}`.
async fn report_json(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<Report>, (StatusCode, Json<serde_json::Value>)> {
    let error = |status, message: String| (status, Json(serde_json::json!({ "error": message })));
    let filter = report::FilterArgs::from_query(query.as_deref().unwrap_or(""))
        .and_then(|args| args.resolve(std::time::SystemTime::now()))
        .map_err(|err| error(StatusCode::BAD_REQUEST, err.to_string()))?;
    let db_path = state.db_path;
    let result = tokio::task::spawn_blocking(move || {
        let conn = store::open_for_reading(&db_path)?;
        report::query_filtered(&conn, &filter)
    })
    .await;
    match result {
        Ok(Ok(report)) => Ok(Json(report)),
        Ok(Err(err)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())),
        Err(err) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())),
    }
}

/// `GET /api/v1/coverage[?since=&until=&namespace=]`: the report's
/// `coverage` alone, from the database as `report` reads it (`verdict` and
/// `port` are accepted and do not narrow it).
async fn coverage_json(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<Coverage>, (StatusCode, Json<serde_json::Value>)> {
    let error = |status, message: String| (status, Json(serde_json::json!({ "error": message })));
    let filter = report::FilterArgs::from_query(query.as_deref().unwrap_or(""))
        .and_then(|args| args.resolve(std::time::SystemTime::now()))
        .map_err(|err| error(StatusCode::BAD_REQUEST, err.to_string()))?;
    let db_path = state.db_path;
    let result = tokio::task::spawn_blocking(move || {
        let conn = store::open_for_reading(&db_path)?;
        report::coverage(&conn, &filter)
    })
    .await;
    match result {
        Ok(Ok(coverage)) => Ok(Json(coverage)),
        Ok(Err(err)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())),
        Err(err) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())),
    }
}
