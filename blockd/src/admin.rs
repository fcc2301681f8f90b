//! The admin API: HTTP/1.1 + JSON on a unix socket (file mode 0600), used by the `blockd`
//! CLI and by the VMM layer. Reference: `docs/blockd.md`.
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}` with the HTTP status of the
//! code (404 not_found, 409 already_exists / busy, 400 invalid_argument, 500 internal).

use crate::engine::Engine;
use crate::error::{EngineError, ErrorCode};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use snapshotter::CheckpointId;
use std::sync::Arc;

pub const MAX_BODY_BYTES: usize = 64 << 10;

#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ApiError {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError {
        code: ErrorCode::InvalidArgument,
        message: message.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            axum::Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> ApiResult<T> {
    let slice: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(slice).map_err(|e| invalid(format!("bad request body: {e}")))
}

fn parse_checkpoint(s: &str) -> ApiResult<CheckpointId> {
    s.parse().map_err(invalid)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size_bytes: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneVolume {
    pub checkpoint: String,
    pub name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CreateCheckpoint {
    pub comment: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Force {
    pub force: bool,
}

/// What `GET /v1/status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub data_dir: String,
    pub nbd_socket: Option<String>,
    pub nbd_tcp: Option<String>,
    pub metrics: Option<String>,
    pub volumes: usize,
    pub local_bytes: u64,
    pub direct_io: bool,
    /// Directory of the per-volume vhost-user sockets (`None` when vhost-user is off).
    #[serde(default)]
    pub vhost_dir: Option<String>,
    /// Whether an object store is configured (`volume sync` works).
    #[serde(default)]
    pub object_store: bool,
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    status: Arc<dyn Fn() -> Status + Send + Sync>,
}

pub fn router(engine: Arc<Engine>, status: Arc<dyn Fn() -> Status + Send + Sync>) -> Router {
    Router::new()
        .route("/v1/status", get(status_h))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(stat_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/clone", post(clone_volume))
        .route("/v1/volumes/{name}/flush", post(flush_volume))
        .route("/v1/volumes/{name}/sync", post(sync_volume))
        .route("/v1/import", post(import_volume))
        .route("/v1/volumes/{name}/claim", post(claim_volume))
        .route(
            "/v1/volumes/{name}/checkpoints",
            get(list_checkpoints).post(create_checkpoint),
        )
        .route(
            "/v1/volumes/{name}/checkpoints/{id}",
            get(get_checkpoint).delete(delete_checkpoint),
        )
        .route(
            "/v1/volumes/{name}/checkpoints/{id}/restore",
            post(restore_checkpoint),
        )
        .fallback(|| async {
            ApiError {
                code: ErrorCode::NotFound,
                message: "no such endpoint".into(),
            }
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState { engine, status })
}

async fn status_h(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json((s.status)())
}

async fn list_volumes(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({"volumes": s.engine.list_volumes()}))
}

async fn create_volume(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let req: CreateVolume = parse_body(&body)?;
    let v = s
        .engine
        .create_volume_claimed(&req.name, req.size_bytes)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn sync_volume(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let r = s.engine.sync_volume(&name).await?;
    Ok(axum::Json(r).into_response())
}

async fn claim_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: Force = parse_body(&body)?;
    let generation = s.engine.claim_volume(&name, req.force).await?;
    Ok(axum::Json(json!({"name": name, "lease_generation": generation})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportVolume {
    /// Name of the volume in the object store.
    pub name: String,
    /// Local name (default: the same).
    #[serde(default, rename = "as")]
    pub as_name: Option<String>,
    /// Take the volume over from the daemon holding it.
    #[serde(default)]
    pub force: bool,
}

async fn import_volume(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let req: ImportVolume = parse_body(&body)?;
    let r = s
        .engine
        .import_volume(&req.name, req.as_name.as_deref(), req.force)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(r)).into_response())
}

async fn stat_volume(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(axum::Json(s.engine.stat(&name)?).into_response())
}

async fn delete_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<Force>,
) -> ApiResult<Response> {
    s.engine.delete_volume(&name, q.force).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn clone_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CloneVolume = parse_body(&body)?;
    let cp = parse_checkpoint(&req.checkpoint)?;
    let v = s.engine.clone_volume(&name, cp, &req.name).await?;
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn flush_volume(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    s.engine.stat(&name)?;
    s.engine.flush().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_checkpoints(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let cps = s.engine.list_checkpoints(&name)?;
    Ok(axum::Json(json!({"checkpoints": cps})).into_response())
}

async fn create_checkpoint(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CreateCheckpoint = parse_body(&body)?;
    if req.comment.len() > 4096 {
        return Err(invalid("comment longer than 4096 bytes"));
    }
    let cp = s.engine.create_checkpoint(&name, &req.comment).await?;
    Ok((StatusCode::CREATED, axum::Json(cp)).into_response())
}

async fn get_checkpoint(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let cp = s.engine.checkpoint(&name, parse_checkpoint(&id)?)?;
    Ok(axum::Json(cp).into_response())
}

async fn restore_checkpoint(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: Force = parse_body(&body)?;
    let auto = s
        .engine
        .restore_checkpoint(&name, parse_checkpoint(&id)?, req.force)
        .await?;
    Ok(axum::Json(json!({
        "restored": id,
        "previous_head": auto.value,
        "duration_us": auto.duration_us,
    }))
    .into_response())
}

async fn delete_checkpoint(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    s.engine
        .delete_checkpoint(&name, parse_checkpoint(&id)?)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
