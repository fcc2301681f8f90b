//! `sprited`'s control API: HTTP/JSON on a unix socket (docs/sprites.md lists every
//! endpoint). Command output streams as NDJSON.

use crate::agent_client::{AgentError, GuestError};
use crate::manager::{Manager, Pause, SettingsPatch, SpriteError};
use crate::proto::{Event, ExecSpec, Op};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, State};
use axum::http::Method;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Largest file upload through `PUT .../fs`.
pub const MAX_UPLOAD: usize = 1 << 30;
/// Largest JSON body.
const MAX_JSON: usize = 16 << 20;

#[derive(Clone)]
struct App {
    m: Arc<Manager>,
}

struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            axum::Json(json!({"error": {"code": self.1, "message": self.2}})),
        )
            .into_response()
    }
}

impl From<SpriteError> for ApiError {
    fn from(e: SpriteError) -> Self {
        ApiError(
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.code(),
            e.to_string(),
        )
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn bad(msg: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid_argument", msg.to_string())
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> ApiResult<T> {
    if body.len() > MAX_JSON {
        return Err(bad("request body too large"));
    }
    let b: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(b).map_err(|e| bad(format!("bad request body: {e}")))
}

pub fn router(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/images", get(images).post(build_image))
        .route("/v1/sprites", get(list).post(create))
        .route(
            "/v1/sprites/{name}",
            get(describe).delete(destroy).put(update).patch(update),
        )
        .route("/v1/sprites/{name}/exec", post(exec))
        .route("/v1/sprites/{name}/services", get(services_list))
        .route(
            "/v1/sprites/{name}/services/{svc}",
            get(service_one).put(service_one).delete(service_one),
        )
        .route(
            "/v1/sprites/{name}/services/{svc}/{action}",
            post(service_action),
        )
        .route("/v1/sprites/{name}/sessions", get(sessions))
        .route("/v1/sprites/{name}/sessions/{id}/attach", get(attach))
        .route("/v1/sprites/{name}/sessions/{id}/stdin", post(stdin))
        .route(
            "/v1/sprites/{name}/sessions/{id}",
            axum::routing::delete(kill_session),
        )
        .route("/v1/sprites/{name}/hibernate", post(hibernate))
        .route("/v1/sprites/{name}/wake", post(wake))
        .route("/v1/sprites/{name}/fs", get(download).put(upload))
        .route("/v1/sprites/{name}/ls", get(ls))
        .route(
            "/v1/sprites/{name}/checkpoints",
            get(checkpoints).post(checkpoint),
        )
        .route(
            "/v1/sprites/{name}/checkpoints/{id}",
            axum::routing::delete(delete_checkpoint),
        )
        .route("/v1/sprites/{name}/checkpoints/{id}/restore", post(restore))
        .route("/v1/sprites/{name}/fork", post(fork))
        .route("/v1/sprites/{name}/usage", get(usage))
        .route("/v1/sprites/{name}/kill-vm", post(kill_vm))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .with_state(App { m })
}

async fn status(State(a): State<App>) -> impl IntoResponse {
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "vmm": a.m.launcher_name(),
        "sprites": a.m.list().len(),
        "data_dir": a.m.config().data_dir,
        "proxy_url": a.m.config().proxy_url,
        "domain": a.m.config().domain,
    }))
}

async fn images(State(a): State<App>) -> impl IntoResponse {
    axum::Json(
        json!({"images": crate::image::list(&crate::manager::images_dir(&a.m.config().data_dir))}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildImage {
    name: String,
    #[serde(default = "default_image_mib")]
    size_mib: u64,
}

fn default_image_mib() -> u64 {
    1024
}

async fn build_image(State(a): State<App>, body: Bytes) -> ApiResult<Response> {
    let req: BuildImage = parse(&body)?;
    if !(64..=1 << 20).contains(&req.size_mib) {
        return Err(bad("size_mib must be 64..1048576"));
    }
    let cfg = a.m.config();
    let rec = crate::image::build(
        a.m.blockd(),
        a.m.nbd_socket(),
        &crate::manager::images_dir(&cfg.data_dir),
        &req.name,
        req.size_mib,
        &cfg.agent_bin,
    )
    .await
    .map_err(|e| {
        let msg = format!("{e:#}");
        if msg.contains("already exists") {
            ApiError(StatusCode::CONFLICT, "already_exists", msg)
        } else if msg.contains("invalid name") {
            bad(msg)
        } else {
            ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
        }
    })?;
    Ok((StatusCode::CREATED, axum::Json(rec)).into_response())
}

async fn list(State(a): State<App>) -> impl IntoResponse {
    axum::Json(json!({"sprites": a.m.list()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    image: Option<String>,
    #[serde(default)]
    settings: SettingsPatch,
}

async fn create(State(a): State<App>, body: Bytes) -> ApiResult<Response> {
    let req: Create = parse(&body)?;
    let (v, t) =
        a.m.create(&req.name, req.image.as_deref(), &req.settings)
            .await?;
    let mut out = serde_json::to_value(v).unwrap_or_default();
    out["timings"] = serde_json::to_value(t).unwrap_or_default();
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

async fn describe(State(a): State<App>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(axum::Json(a.m.describe(&name).await?).into_response())
}

async fn destroy(State(a): State<App>, Path(name): Path<String>) -> ApiResult<Response> {
    a.m.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn update(
    State(a): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let p: SettingsPatch = parse(&body)?;
    Ok(axum::Json(a.m.update_settings(&name, &p).await?).into_response())
}

/// Body of an exec request (this API and the user-facing one).
#[derive(Debug, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments.
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    #[serde(default)]
    pub tty: bool,
    pub rows: Option<u16>,
    pub cols: Option<u16>,
    /// Keep running after the client goes away (attach again through sessions).
    #[serde(default)]
    pub detachable: bool,
    /// Base64 data written to the command's stdin (then closed, unless the command is
    /// detachable and `stdin` is absent).
    pub stdin: Option<String>,
}

/// Forwards a request to the sprite's management API (`/v1/services{rest}` inside it) and
/// relays the answer: JSON with its status, or the NDJSON event stream.
pub async fn services_response(
    m: &Arc<Manager>,
    name: &str,
    method: &str,
    rest: &str,
    query: Option<&str>,
    body: &Bytes,
) -> Result<Response, SpriteError> {
    if body.len() > crate::mgmt::MAX_BODY {
        return Err(SpriteError::Invalid(format!(
            "request body over {} bytes",
            crate::mgmt::MAX_BODY
        )));
    }
    let body = std::str::from_utf8(body)
        .map_err(|_| SpriteError::Invalid("the body is not UTF-8 JSON".into()))?
        .to_string();
    let mut path = format!("/v1/services{rest}");
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    let status = |s: u16| StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(match m.runtime_api(name, method, &path, body).await? {
        crate::manager::RuntimeReply::Json(204, _) => StatusCode::NO_CONTENT.into_response(),
        crate::manager::RuntimeReply::Json(s, v) => (status(s), axum::Json(v)).into_response(),
        crate::manager::RuntimeReply::Stream {
            status: s,
            events,
            guard,
        } => {
            let lines = futures::stream::unfold((events, guard), |(mut ev, guard)| async move {
                match ev.next().await {
                    Some(Event::Output { data, .. }) => {
                        guard.touch();
                        Some((
                            Ok::<_, std::convert::Infallible>(Bytes::from(data)),
                            (ev, guard),
                        ))
                    }
                    _ => None,
                }
            });
            Response::builder()
                .status(status(s))
                .header("content-type", "application/x-ndjson")
                .body(Body::from_stream(lines))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    })
}

async fn services_list(
    State(a): State<App>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    Ok(services_response(&a.m, &name, "GET", "", q.as_deref(), &Bytes::new()).await?)
}

async fn service_one(
    State(a): State<App>,
    method: Method,
    Path((name, svc)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult<Response> {
    let rest = format!("/{svc}");
    Ok(services_response(&a.m, &name, method.as_str(), &rest, q.as_deref(), &body).await?)
}

async fn service_action(
    State(a): State<App>,
    Path((name, svc, action)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult<Response> {
    let rest = format!("/{svc}/{action}");
    Ok(services_response(&a.m, &name, "POST", &rest, q.as_deref(), &body).await?)
}

fn event_line(ev: &Event) -> Bytes {
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let v = match ev {
        Event::Output { stream, data } => {
            json!({"event": "output", "stream": stream, "data": b64(data)})
        }
        Event::Exit { code, signal } => json!({"event": "exit", "code": code, "signal": signal}),
        Event::Error { message, .. } => json!({"event": "error", "message": message}),
        other => json!({"event": "other", "detail": format!("{other:?}")}),
    };
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// NDJSON response following a command (see docs/sprites.md).
pub fn stream_handle(h: crate::manager::ExecHandle, first: Option<Bytes>) -> Response {
    let s = futures::stream::unfold((h, first, false), |(mut h, first, done)| async move {
        if let Some(f) = first {
            return Some((Ok::<_, std::convert::Infallible>(f), (h, None, false)));
        }
        if done {
            return None;
        }
        match h.next().await {
            Some(ev) => {
                let end = matches!(ev, Event::Exit { .. } | Event::Error { .. });
                Some((Ok(event_line(&ev)), (h, None, end)))
            }
            None => {
                if h.finished_without_exit() {
                    let l = event_line(&Event::Error {
                        message: "the sprite's VM went away".into(),
                        code: None,
                    });
                    return Some((Ok(l), (h, None, true)));
                }
                None
            }
        }
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(s))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn exec(State(a): State<App>, Path(name): Path<String>, body: Bytes) -> ApiResult<Response> {
    let req: ExecRequest = parse(&body)?;
    Ok(exec_response(&a.m, &name, req).await?)
}

/// Starts a command and returns its NDJSON stream.
pub async fn exec_response(
    m: &Arc<Manager>,
    name: &str,
    req: ExecRequest,
) -> Result<Response, SpriteError> {
    let stdin = match &req.stdin {
        Some(s) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(|e| SpriteError::Invalid(format!("stdin is not base64: {e}")))?,
        ),
        None => None,
    };
    let spec = ExecSpec {
        args: req.args,
        env: req.env,
        cwd: req.cwd,
        tty: req.tty,
        rows: req.rows,
        cols: req.cols,
        detachable: req.detachable,
    };
    let detachable = spec.detachable;
    let h = m.exec(name, spec).await?;
    if let Some(data) = stdin {
        for chunk in data.chunks(crate::proto::MAX_CHUNK) {
            h.stdin(chunk.to_vec())?;
        }
        h.close_stdin()?;
    } else if !detachable {
        h.close_stdin()?;
    }
    let first = json!({"event": "started", "session": h.session, "pid": h.pid}).to_string() + "\n";
    Ok(stream_handle(h, Some(Bytes::from(first))))
}

async fn sessions(State(a): State<App>, Path(name): Path<String>) -> ApiResult<Response> {
    let v = a.m.agent_call(&name, Op::Sessions).await?;
    Ok(axum::Json(json!({"sessions": v})).into_response())
}

async fn attach(
    State(a): State<App>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    // Fail fast on an unknown session (the agent would only say so in the stream).
    find_session(&a.m, &name, &id).await?;
    let h = a.m.attach(&name, &id).await?;
    Ok(stream_handle(h, None))
}

async fn stdin(
    State(a): State<App>,
    Path((name, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> ApiResult<Response> {
    find_session(&a.m, &name, &id).await?;
    let close = q.get("close").is_some_and(|v| v == "true" || v == "1");
    send_stdin(&a.m, &name, &id, &body, close).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn kill_session(
    State(a): State<App>,
    Path((name, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let signal = match q.get("signal") {
        Some(s) => s
            .parse::<i32>()
            .map_err(|_| bad("signal must be a number"))?,
        None => libc::SIGKILL,
    };
    a.m.agent_call(
        &name,
        Op::Kill {
            session: id,
            signal,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Hibernate {
    #[serde(default = "warm")]
    mode: Pause,
}

fn warm() -> Pause {
    Pause::Warm
}

async fn hibernate(
    State(a): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: Hibernate = parse(&body)?;
    let t = a.m.hibernate(&name, req.mode, "requested").await?;
    let mut v = serde_json::to_value(a.m.view(&name)?).unwrap_or_default();
    v["timings"] = serde_json::to_value(t).unwrap_or_default();
    Ok(axum::Json(v).into_response())
}

async fn wake(State(a): State<App>, Path(name): Path<String>) -> ApiResult<Response> {
    let t = a.m.wake(&name, "requested").await?;
    let mut v = serde_json::to_value(a.m.view(&name)?).unwrap_or_default();
    v["timings"] = serde_json::to_value(t).unwrap_or_default();
    Ok(axum::Json(v).into_response())
}

fn path_param(q: &HashMap<String, String>) -> ApiResult<String> {
    let p = q.get("path").ok_or_else(|| bad("missing ?path="))?;
    if !p.starts_with('/') {
        return Err(bad("path must be absolute"));
    }
    Ok(p.clone())
}

async fn download(
    State(a): State<App>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let path = path_param(&q)?;
    let out = read_file(&a.m, &name, &path).await?;
    Ok(([("content-type", "application/octet-stream")], out).into_response())
}

/// Writes `data` to a session's stdin (in `MAX_CHUNK` pieces), then closes it if asked. The
/// sprite counts as active meanwhile.
pub async fn send_stdin(
    m: &Arc<Manager>,
    name: &str,
    id: &str,
    data: &[u8],
    close: bool,
) -> Result<(), SpriteError> {
    let (_guard, agent) = m.hold(name, "stdin").await?;
    for chunk in data.chunks(crate::proto::MAX_CHUNK) {
        agent.notify(Op::Stdin {
            session: id.to_string(),
            data: chunk.to_vec(),
        })?;
    }
    if close {
        agent.notify(Op::CloseStdin {
            session: id.to_string(),
        })?;
    }
    Ok(())
}

/// A session's entry in the runtime's list (`NotFound` when there is none).
pub async fn find_session(
    m: &Arc<Manager>,
    name: &str,
    id: &str,
) -> Result<serde_json::Value, SpriteError> {
    let list = m.agent_call(name, Op::Sessions).await?;
    list.as_array()
        .and_then(|l| l.iter().find(|s| s["id"] == id))
        .cloned()
        .ok_or_else(|| SpriteError::NotFound(format!("no session {id:?}")))
}

/// A whole file from the sprite (`NotFound` when it does not exist).
pub async fn read_file(m: &Arc<Manager>, name: &str, path: &str) -> Result<Vec<u8>, SpriteError> {
    read_chunks(m, name, path)
        .await?
        .map_err(|g| AgentError::Guest(g).into())
}

/// What a path holds: a file's bytes, or a directory's entries.
#[derive(Debug)]
pub enum PathContent {
    File(Vec<u8>),
    Dir(serde_json::Value),
}

/// A file's bytes, or the listing when the path is a directory.
pub async fn read_path(
    m: &Arc<Manager>,
    name: &str,
    path: &str,
) -> Result<PathContent, SpriteError> {
    match read_chunks(m, name, path).await? {
        Ok(data) => Ok(PathContent::File(data)),
        Err(g) if g.is(crate::proto::ERR_IS_DIRECTORY) => {
            let entries = m
                .agent_call(
                    name,
                    Op::ListDir {
                        path: path.to_string(),
                    },
                )
                .await?;
            Ok(PathContent::Dir(entries))
        }
        Err(g) => Err(AgentError::Guest(g).into()),
    }
}

/// Reads a file in `MAX_CHUNK` pieces; the guest's error (with its code) stays apart.
async fn read_chunks(
    m: &Arc<Manager>,
    name: &str,
    path: &str,
) -> Result<Result<Vec<u8>, GuestError>, SpriteError> {
    let mut out = Vec::new();
    loop {
        let v = match m
            .agent_call_raw(
                name,
                Op::ReadFile {
                    path: path.to_string(),
                    offset: out.len() as u64,
                    len: crate::proto::MAX_CHUNK as u64,
                },
            )
            .await?
        {
            Ok(v) => v,
            Err(g) => return Ok(Err(g)),
        };
        let data = base64::engine::general_purpose::STANDARD
            .decode(v["data"].as_str().unwrap_or("").as_bytes())
            .map_err(|e| SpriteError::Internal(e.to_string()))?;
        out.extend_from_slice(&data);
        if v["eof"].as_bool().unwrap_or(true) || data.is_empty() {
            break;
        }
        if out.len() > MAX_UPLOAD {
            return Err(SpriteError::Invalid(
                "file too large for one download".into(),
            ));
        }
    }
    Ok(Ok(out))
}

async fn upload(
    State(a): State<App>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> ApiResult<Response> {
    let path = path_param(&q)?;
    let mode = match q.get("mode") {
        Some(m) => {
            Some(u32::from_str_radix(m, 8).map_err(|_| bad("mode must be octal, e.g. 644"))?)
        }
        None => None,
    };
    write_file(&a.m, &name, &path, mode, &body).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"path": path, "size": body.len()})),
    )
        .into_response())
}

/// Writes a whole file into the sprite (parents created; 1 MiB pieces).
pub async fn write_file(
    m: &Arc<Manager>,
    name: &str,
    path: &str,
    mode: Option<u32>,
    body: &[u8],
) -> Result<(), SpriteError> {
    let chunks: Vec<&[u8]> = if body.is_empty() {
        vec![&[][..]]
    } else {
        body.chunks(crate::proto::MAX_CHUNK).collect()
    };
    for (i, c) in chunks.into_iter().enumerate() {
        m.agent_call(
            name,
            Op::WriteFile {
                path: path.to_string(),
                data: c.to_vec(),
                mode,
                append: i > 0,
            },
        )
        .await?;
    }
    Ok(())
}

async fn ls(
    State(a): State<App>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let path = path_param(&q)?;
    let v = a.m.agent_call(&name, Op::ListDir { path }).await?;
    Ok(axum::Json(json!({"entries": v})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointReq {
    comment: Option<String>,
}

async fn checkpoint(
    State(a): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CheckpointReq = parse(&body)?;
    let (mut ck, t) = a.m.checkpoint(&name, req.comment.as_deref()).await?;
    ck["timings"] = serde_json::to_value(t).unwrap_or_default();
    Ok((StatusCode::CREATED, axum::Json(ck)).into_response())
}

async fn checkpoints(State(a): State<App>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(axum::Json(a.m.checkpoints(&name).await?).into_response())
}

async fn delete_checkpoint(
    State(a): State<App>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    a.m.delete_checkpoint(&name, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn restore(
    State(a): State<App>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (mut v, t) = a.m.restore(&name, &id).await?;
    v["timings"] = serde_json::to_value(t).unwrap_or_default();
    v["sprite"] = serde_json::to_value(a.m.view(&name)?).unwrap_or_default();
    Ok(axum::Json(v).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkReq {
    checkpoint: String,
    name: String,
    #[serde(default)]
    settings: SettingsPatch,
}

async fn fork(State(a): State<App>, Path(name): Path<String>, body: Bytes) -> ApiResult<Response> {
    let req: ForkReq = parse(&body)?;
    let (v, t) =
        a.m.fork(&name, &req.checkpoint, &req.name, &req.settings)
            .await?;
    let mut out = serde_json::to_value(v).unwrap_or_default();
    out["timings"] = serde_json::to_value(t).unwrap_or_default();
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

async fn usage(State(a): State<App>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(axum::Json(a.m.usage(&name).await?).into_response())
}

async fn kill_vm(State(a): State<App>, Path(name): Path<String>) -> ApiResult<Response> {
    a.m.kill_vm(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
