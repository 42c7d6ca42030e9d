//! The HTTP side: health and the report as JSON (`GET /api/v1/report`).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::report::{self, Report};
use crate::store;

pub fn router(db_path: PathBuf) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/report", get(report_json))
        .with_state(Arc::new(db_path))
}

async fn report_json(
    State(db_path): State<Arc<PathBuf>>,
) -> Result<Json<Report>, (StatusCode, String)> {
    let result = tokio::task::spawn_blocking(move || {
        let conn = store::open_for_reading(&db_path)?;
        report::query(&conn)
    })
    .await;
    match result {
        Ok(Ok(report)) => Ok(Json(report)),
        Ok(Err(err)) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n"))),
        Err(err) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n"))),
    }
}
