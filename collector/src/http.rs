//! The HTTP side: liveness (`GET /healthz`), readiness (`GET /readyz`:
//! whether the store can write), Prometheus metrics (`GET /metrics`), the report as
//! JSON (`GET /api/v1/report`, a page at a time) and, with
//! `serve --module` and `--enforce-module`, the filter's two builds, so one
//! deployment gives Envoy both the module and the event sink.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dialguard_envoyfilter::module::{self, Build};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::health::{Readiness, StoreHealth};
use crate::inventory::Inventory;
use crate::metrics::{self, Metrics};
use crate::report::{self, FilterError};
use crate::store::{self, StoreError};

/// `serve --max-report-requests`: report reads served at once. Each holds
/// a page of rows (up to `report::MAX_LIMIT`) and its JSON in memory.
pub const DEFAULT_MAX_REPORT_REQUESTS: usize = 4;
/// What a refused report request is told to wait, in seconds (`Retry-After`).
pub const REPORT_RETRY_AFTER_SECS: u64 = 1;

/// Where the audit build (`serve --module`) is served.
pub const MODULE_PATH: &str = "/module/dialguard_filter.wasm";
/// Where the enforce build (`serve --enforce-module`) is served.
pub const ENFORCE_MODULE_PATH: &str = "/module/dialguard_filter_enforce.wasm";

/// A module held in memory with its SHA-256 (what `vm_config.code.remote.sha256` must say).
#[derive(Clone)]
pub struct Module {
    pub bytes: Arc<[u8]>,
    pub sha256: String,
    pub build: Build,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("len", &self.bytes.len())
            .field("sha256", &self.sha256)
            .field("build", &self.build)
            .finish()
    }
}

impl Module {
    /// Reads the module and checks that it is `build`: each build is served
    /// under its own name, and `rollout` picks the URL by that name, so a
    /// name must never serve the other build.
    pub fn load(path: &Path, build: Build) -> Result<Self, ModuleError> {
        let flag = Self::flag(build);
        let bytes = std::fs::read(path).map_err(|source| ModuleError::Read {
            flag,
            path: path.to_owned(),
            source,
        })?;
        let info = module::inspect(&bytes).map_err(|why| ModuleError::Invalid {
            flag,
            path: path.to_owned(),
            why,
        })?;
        if info.build != build {
            return Err(ModuleError::WrongBuild {
                flag,
                path: path.to_owned(),
                found: info.build,
                expected: build,
            });
        }
        Ok(Self {
            bytes: bytes.into(),
            sha256: info.sha256,
            build,
        })
    }

    /// The `serve` flag that loads `build`.
    pub fn flag(build: Build) -> &'static str {
        match build {
            Build::Audit => "--module",
            Build::Enforce => "--enforce-module",
        }
    }

    /// The HTTP path it is served at.
    pub fn path(&self) -> &'static str {
        match self.build {
            Build::Audit => MODULE_PATH,
            Build::Enforce => ENFORCE_MODULE_PATH,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("{flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {path}: {why}")]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error(
        "{flag} {path}: this is the {found} build; expected the {expected} build, {} \
         (each build is served under its own name: --module takes {}, --enforce-module {})",
        expected.file_name(),
        Build::Audit.file_name(),
        Build::Enforce.file_name()
    )]
    WrongBuild {
        flag: &'static str,
        path: PathBuf,
        found: Build,
        expected: Build,
    },
}

#[derive(Debug, Clone)]
struct AppState {
    db_path: Arc<PathBuf>,
    module: Option<Module>,
    enforce_module: Option<Module>,
    metrics: Metrics,
    inventory: Inventory,
    /// Permits for report reads; none left means 503.
    report_reads: Arc<Semaphore>,
    max_report_requests: usize,
    health: StoreHealth,
}

impl AppState {
    fn module(&self, build: Build) -> Option<&Module> {
        match build {
            Build::Audit => self.module.as_ref(),
            Build::Enforce => self.enforce_module.as_ref(),
        }
    }
}

/// The served modules: the audit build (`--module`) and the enforce build
/// (`--enforce-module`), each optional.
#[derive(Debug, Clone, Default)]
pub struct Modules {
    pub audit: Option<Module>,
    pub enforce: Option<Module>,
}

pub fn router(
    db_path: PathBuf,
    modules: Modules,
    metrics: Metrics,
    inventory: Inventory,
    max_report_requests: usize,
    health: StoreHealth,
) -> Router {
    let mut router = Router::new()
        // Liveness: the process and its event loop answer.
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/report", get(report_json))
        .route("/api/v1/coverage", get(coverage_json));
    for (path, build) in [
        (MODULE_PATH, Build::Audit),
        (ENFORCE_MODULE_PATH, Build::Enforce),
    ] {
        router = router
            .route(
                path,
                get(move |State(state): State<AppState>| async move {
                    module_bytes(&state, build)
                }),
            )
            .route(
                &format!("{path}.sha256"),
                get(move |State(state): State<AppState>| async move {
                    module_sha256(&state, build)
                }),
            );
    }
    router.with_state(AppState {
        db_path: Arc::new(db_path),
        module: modules.audit,
        enforce_module: modules.enforce,
        metrics,
        inventory,
        report_reads: Arc::new(Semaphore::new(max_report_requests)),
        max_report_requests,
        health,
    })
}

/// `GET /readyz`: 200 while the store can write; 503 with the reason and
/// since when otherwise, e.g. `{"ready": false, "reason": "the store cannot
/// write: database or disk is full (3 failed attempts)", "since":
/// "2026-11-26T06:51:18.123Z"}`. Reads no database: cheap for probes.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.health.readiness() {
        Readiness::Ready => (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "ready": true })),
        ),
        Readiness::NotReady {
            reason,
            since_unix_ns,
        } => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "ready": false,
                "reason": reason,
                "since": crate::time::rfc3339(since_unix_ns),
            })),
        ),
    }
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

fn no_module(build: Build) -> (StatusCode, String) {
    (
        StatusCode::NOT_FOUND,
        format!(
            "no {build} module: start with {} {}\n",
            Module::flag(build),
            build.file_name()
        ),
    )
}

fn module_bytes(state: &AppState, build: Build) -> impl IntoResponse + use<> {
    match state.module(build) {
        Some(module) => Ok((
            [(header::CONTENT_TYPE, "application/wasm")],
            axum::body::Bytes::from_owner(module.bytes.clone()),
        )),
        None => Err(no_module(build)),
    }
}

fn module_sha256(state: &AppState, build: Build) -> impl IntoResponse + use<> {
    match state.module(build) {
        Some(module) => Ok(module.sha256.clone() + "\n"),
        None => Err(no_module(build)),
    }
}

/// Why the report API refused or failed a request; answered as the status
/// and `{"error": "<message>"}`.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error(transparent)]
    Parameter(#[from] FilterError),
    #[error(
        "the collector serves at most {0} report requests at once; retry after {REPORT_RETRY_AFTER_SECS} s"
    )]
    Busy(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encoding the answer: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the report task ended: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::Parameter(_) => StatusCode::BAD_REQUEST,
            Self::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(_) | Self::Encode(_) | Self::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = serde_json::json!({ "error": self.to_string() });
        let mut response = (status, axum::Json(body)).into_response();
        if let Self::Busy(_) = self {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(REPORT_RETRY_AFTER_SECS),
            );
        }
        response
    }
}

/// Parses the report filters and page of `query` (400 naming the
/// parameter, e.g. `{"error": "since \"x\": expected ..."}`), takes a
/// report permit (503 when none is left) and runs `read` with them on a
/// reading connection to the database, off the async threads, encoding
/// the JSON there too: the permit is held until the answer's bytes exist,
/// so at most `--max-report-requests` pages are in memory at once.
async fn read_filtered<T: Serialize + Send + 'static>(
    state: AppState,
    query: Option<String>,
    read: fn(&rusqlite::Connection, &report::ReportFilter) -> Result<T, StoreError>,
) -> Result<Response, ApiError> {
    let filter = report::FilterArgs::from_query(query.as_deref().unwrap_or(""))
        .and_then(|args| args.resolve(std::time::SystemTime::now()))?;
    let permit = Arc::clone(&state.report_reads)
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy(state.max_report_requests))?;
    let db_path = state.db_path;
    let body = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let conn = store::open_for_reading(&db_path)?;
        let value = read(&conn, &filter)?;
        Ok::<_, ApiError>(serde_json::to_vec(&value)?)
    })
    .await??;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `GET /api/v1/report[?since=&until=&namespace=&verdict=&port=&limit=&cursor=]`:
/// a page of the report, filtered as `dialguard report` filters it.
async fn report_json(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    read_filtered(state, query, report::query_filtered).await
}

/// `GET /api/v1/coverage[?since=&until=&namespace=]`: the report's
/// `coverage` alone, from the database as `report` reads it (`verdict`,
/// `port`, `limit` and `cursor` are accepted and do not narrow it).
async fn coverage_json(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    read_filtered(state, query, report::coverage).await
}
