//! The REST API under `/v1`. Every route is declared once in [`routes`], which builds both
//! the axum router and the OpenAPI document served at `/v1/openapi.json`.
//!
//! Auth: `Authorization: Bearer <token>`. The admin token manages organizations; an
//! organization's tokens see only that organization (anything else is 404, as if it did not
//! exist).

use crate::metrics::ApiMetrics;
use crate::store::{ControlPlane, SpriteRow, StoreError, UsageSample};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Query, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use vmm_glue::manager::{Manager, Pause, SettingsPatch, SpriteError};
use vmm_glue::server::{ExecRequest, PathContent, services_response};

/// Largest JSON body.
pub const MAX_JSON: usize = 1 << 20;
/// Largest file upload.
pub const MAX_FILE: usize = 256 << 20;

#[derive(Clone, Debug)]
pub struct App {
    pub m: Arc<Manager>,
    pub cp: ControlPlane,
    pub admin_token: Arc<String>,
    pub metrics: Arc<ApiMetrics>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            StoreError::AlreadyExists(m) => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", m)
            }
            StoreError::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                other.to_string(),
            ),
        }
    }
}

impl From<SpriteError> for ApiError {
    fn from(e: SpriteError) -> Self {
        let (status, code) = match &e {
            SpriteError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            SpriteError::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
            SpriteError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            SpriteError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            SpriteError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            SpriteError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        // Internal names (org--name) never leak into messages.
        ApiError::new(status, code, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Decodes a JSON request body (empty means `{}`), with the size limit; public for the fuzz
/// target over request bodies.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> ApiResult<T> {
    if body.len() > MAX_JSON {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "request body too large",
        ));
    }
    let b: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(b).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("bad request body: {e}"),
        )
    })
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    Admin,
    Org(String),
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn principal(a: &App, headers: &HeaderMap) -> ApiResult<Principal> {
    let Some(t) = bearer(headers) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing Authorization: Bearer <token>",
        ));
    };
    if !a.admin_token.is_empty() && constant_eq(t, &a.admin_token) {
        return Ok(Principal::Admin);
    }
    match a.cp.authenticate(t) {
        Some(org) => Ok(Principal::Org(org)),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid or revoked token",
        )),
    }
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn org_of(a: &App, headers: &HeaderMap) -> ApiResult<String> {
    match principal(a, headers)? {
        Principal::Org(o) => Ok(o),
        Principal::Admin => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin token manages organizations; use an organization's token",
        )),
    }
}

fn admin(a: &App, headers: &HeaderMap) -> ApiResult<()> {
    match principal(a, headers)? {
        Principal::Admin => Ok(()),
        Principal::Org(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "needs the admin token",
        )),
    }
}

/// The caller's sprite: (org, user name, internal name). 404 for other organizations' sprites.
fn sprite_of(a: &App, headers: &HeaderMap, name: &str) -> ApiResult<(String, String)> {
    let (org, row) = sprite_row(a, headers, name)?;
    Ok((org, row.internal))
}

/// [`sprite_of`] with the whole control-plane row.
fn sprite_row(a: &App, headers: &HeaderMap, name: &str) -> ApiResult<(String, SpriteRow)> {
    let org = org_of(a, headers)?;
    let row = a.cp.sprite(&org, name)?;
    Ok((org, row))
}

// ---- request bodies (their JSON Schemas go into the OpenAPI document) ----

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    /// 1-15 characters a-z 0-9, starting with a letter.
    pub name: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
}

#[derive(Debug, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UrlAuth {
    /// A token of the organization is needed (default).
    Private,
    /// Anyone with the URL.
    Public,
}

impl UrlAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            UrlAuth::Private => "private",
            UrlAuth::Public => "public",
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSprite {
    /// 1-23 characters a-z, 0-9 and single '-' inside.
    pub name: String,
    #[serde(default)]
    pub settings: SettingsPatch,
    pub url_auth: Option<UrlAuth>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSprite {
    #[serde(default)]
    pub settings: SettingsPatch,
    pub url_auth: Option<UrlAuth>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HibernateBody {
    pub mode: Option<Pause>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    pub comment: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// Checkpoint of this sprite (`v3`).
    pub checkpoint: String,
    /// Name of the new sprite.
    pub name: String,
    #[serde(default)]
    pub settings: SettingsPatch,
}

// ---- the route table ----

#[derive(Debug)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub auth: &'static str,
    /// JSON Schema of the request body (its named types go to `components/schemas`).
    pub body: Option<fn(&mut schemars::SchemaGenerator) -> schemars::Schema>,
    /// Success status and content type.
    pub ok: (u16, &'static str),
    /// Error statuses this route can answer with.
    pub errors: &'static [u16],
}

fn schema<T: JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

const JSON: &str = "application/json";
const NDJSON: &str = "application/x-ndjson";
const BYTES: &str = "application/octet-stream";
const E_ORG: &[u16] = &[400, 401, 403, 404, 422, 503];
const E_STATE: &[u16] = &[400, 401, 403, 404, 409, 422, 503];

/// Every route: its documentation and its handler.
pub fn routes() -> Vec<(RouteDoc, MethodRouter<App>)> {
    macro_rules! r {
        ($m:literal, $p:literal, $s:literal, $auth:literal, $body:expr, $ok:expr, $err:expr, $h:expr) => {
            (
                RouteDoc {
                    method: $m,
                    path: $p,
                    summary: $s,
                    auth: $auth,
                    body: $body,
                    ok: $ok,
                    errors: $err,
                },
                $h,
            )
        };
    }
    vec![
        r!(
            "post",
            "/v1/orgs",
            "Create an organization and its first token",
            "admin",
            Some(schema::<CreateOrg>),
            (201, JSON),
            &[400, 401, 403, 409, 422],
            post(create_org)
        ),
        r!(
            "get",
            "/v1/orgs",
            "List organizations",
            "admin",
            None,
            (200, JSON),
            &[401, 403],
            get(list_orgs)
        ),
        r!(
            "post",
            "/v1/tokens",
            "Create an API token of the caller's organization (shown once)",
            "org",
            Some(schema::<CreateToken>),
            (201, JSON),
            &[400, 401, 403, 422],
            post(create_token)
        ),
        r!(
            "get",
            "/v1/tokens",
            "List the organization's tokens (no secrets)",
            "org",
            None,
            (200, JSON),
            &[401, 403],
            get(list_tokens)
        ),
        r!(
            "delete",
            "/v1/tokens/{id}",
            "Revoke a token",
            "org",
            None,
            (204, JSON),
            &[401, 403, 404],
            delete(revoke_token)
        ),
        r!(
            "post",
            "/v1/sprites",
            "Create a sprite (O(1) clone of the base image) and boot it",
            "org",
            Some(schema::<CreateSprite>),
            (201, JSON),
            &[400, 401, 403, 409, 422, 503],
            post(create_sprite)
        ),
        r!(
            "get",
            "/v1/sprites",
            "List sprites (pagination: limit, cursor)",
            "org",
            None,
            (200, JSON),
            &[400, 401, 403],
            get(list_sprites)
        ),
        r!(
            "get",
            "/v1/sprites/{name}",
            "A sprite: state, transitions, URL, settings, usage",
            "org",
            None,
            (200, JSON),
            E_ORG,
            get(get_sprite)
        ),
        r!(
            "put",
            "/v1/sprites/{name}",
            "Change settings (idle timeouts, CPU/memory at next boot, URL auth)",
            "org",
            Some(schema::<UpdateSprite>),
            (200, JSON),
            E_ORG,
            put(update_sprite)
        ),
        r!(
            "delete",
            "/v1/sprites/{name}",
            "Destroy a sprite, its volume and checkpoints",
            "org",
            None,
            (204, JSON),
            E_STATE,
            delete(delete_sprite)
        ),
        r!(
            "post",
            "/v1/sprites/{name}/exec",
            "Run a command; NDJSON events started/output/exit",
            "org",
            Some(schema::<ExecRequest>),
            (200, NDJSON),
            E_STATE,
            post(exec)
        ),
        r!(
            "get",
            "/v1/sprites/{name}/services",
            "Services of the sprite with their state (docs/services.md)",
            "org",
            None,
            (200, JSON),
            E_STATE,
            get(services_list)
        ),
        r!(
            "get",
            "/v1/sprites/{name}/services/{service}",
            "A service: definition and state (status, pid, started_at, restart_count)",
            "org",
            None,
            (200, JSON),
            E_STATE,
            get(service_get)
        ),
        r!(
            "put",
            "/v1/sprites/{name}/services/{service}",
            "Create or replace a service and start it; streams NDJSON events for ?duration= (default 5s, 0 = none)",
            "org",
            Some(schema::<vmm_glue::services::ServiceDef>),
            (201, NDJSON),
            E_STATE,
            put(service_put)
        ),
        r!(
            "delete",
            "/v1/sprites/{name}/services/{service}",
            "Stop and remove a service (its log stays)",
            "org",
            None,
            (204, JSON),
            E_STATE,
            delete(service_delete)
        ),
        r!(
            "post",
            "/v1/sprites/{name}/services/{service}/{action}",
            "start | stop | restart (stream for ?duration=) | signal ({\"signal\": \"TERM\"})",
            "org",
            None,
            (200, JSON),
            E_STATE,
            post(service_action)
        ),
        r!(
            "get",
            "/v1/sprites/{name}/sessions",
            "Detachable sessions",
            "org",
            None,
            (200, JSON),
            E_STATE,
            get(sessions)
        ),
        r!(
            "get",
            "/v1/sprites/{name}/sessions/{id}/attach",
            "Follow a detachable session (NDJSON, scrollback first)",
            "org",
            None,
            (200, NDJSON),
            E_STATE,
            get(attach)
        ),
        r!(
            "delete",
            "/v1/sprites/{name}/sessions/{id}",
            "Kill a session",
            "org",
            None,
            (204, JSON),
            E_STATE,
            delete(kill_session)
        ),
        r!(
            "post",
            "/v1/sprites/{name}/sessions/{id}/stdin",
            "Send bytes to a session's stdin (close=true closes it after)",
            "org",
            None,
            (204, JSON),
            E_STATE,
            post(session_stdin)
        ),
        r!(
            "post",
            "/v1/sprites/{name}/hibernate",
            "Pause now: warm (memory kept) or cold (VM stopped)",
            "org",
            Some(schema::<HibernateBody>),
            (200, JSON),
            E_STATE,
            post(hibernate)
        ),
        r!(
            "get",
            "/v1/sprites/{name}/fs/{*path}",
            "Download a file (a directory lists as JSON)",
            "org",
            None,
            (200, BYTES),
            E_STATE,
            get(get_file)
        ),
        r!(
            "put",
            "/v1/sprites/{name}/fs/{*path}",
            "Upload a file (mode=644 query)",
            "org",
            None,
            (201, JSON),
            &[400, 401, 403, 404, 413, 422, 503],
            put(put_file)
        ),
        r!(
            "post",
            "/v1/sprites/{name}/checkpoints",
            "Checkpoint (running sprites are frozen for it)",
            "org",
            Some(schema::<CheckpointBody>),
            (201, JSON),
            E_STATE,
            post(create_checkpoint)
        ),
        r!(
            "get",
            "/v1/sprites/{name}/checkpoints",
            "List checkpoints",
            "org",
            None,
            (200, JSON),
            E_ORG,
            get(list_checkpoints)
        ),
        r!(
            "get",
            "/v1/sprites/{name}/checkpoints/{id}",
            "A checkpoint",
            "org",
            None,
            (200, JSON),
            E_ORG,
            get(get_checkpoint)
        ),
        r!(
            "delete",
            "/v1/sprites/{name}/checkpoints/{id}",
            "Delete a checkpoint",
            "org",
            None,
            (204, JSON),
            E_STATE,
            delete(delete_checkpoint)
        ),
        r!(
            "post",
            "/v1/sprites/{name}/checkpoints/{id}/restore",
            "Restore a checkpoint (boots the sprite)",
            "org",
            None,
            (200, JSON),
            E_STATE,
            post(restore_checkpoint)
        ),
        r!(
            "post",
            "/v1/sprites/{name}/fork",
            "A new sprite from a checkpoint (no data copied)",
            "org",
            Some(schema::<ForkBody>),
            (201, JSON),
            E_STATE,
            post(fork)
        ),
        r!(
            "get",
            "/v1/sprites/{name}/usage",
            "Usage of a sprite over a time range (from, to: unix ms)",
            "org",
            None,
            (200, JSON),
            E_ORG,
            get(sprite_usage)
        ),
        r!(
            "get",
            "/v1/usage",
            "Usage of the organization over a time range",
            "org",
            None,
            (200, JSON),
            &[400, 401, 403],
            get(org_usage)
        ),
    ]
}

pub fn router(app: App) -> Router {
    let mut r = Router::new().route("/v1/openapi.json", get(openapi_h));
    for (doc, mr) in routes() {
        r = r.route(doc.path, mr);
    }
    let metrics = app.metrics.clone();
    r.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let metrics = metrics.clone();
            async move {
                let route = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "unmatched".into());
                let method = req.method().as_str().to_string();
                let t0 = Instant::now();
                let resp = next.run(req).await;
                metrics.request(&route, &method, resp.status().as_u16(), t0.elapsed());
                resp
            }
        },
    ))
    .layer(axum::extract::DefaultBodyLimit::max(MAX_FILE))
    .with_state(app)
}

/// The OpenAPI 3.0 document of [`routes`] (request schemas generated from the Rust types).
pub fn openapi() -> Value {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut paths = serde_json::Map::new();
    for (d, _) in routes() {
        let mut op = json!({
            "summary": d.summary,
            "operationId": format!("{}_{}", d.method, d.path.trim_start_matches("/v1/").replace(['/', '{', '}', '*'], "_")),
            "security": [{"bearer": []}],
            "x-auth": d.auth,
            "responses": {},
        });
        let params: Vec<Value> = d
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| json!({"name": p.trim_start_matches('*'), "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if let Some(b) = d.body {
            let sch = serde_json::to_value(b(&mut generator)).unwrap_or_default();
            op["requestBody"] =
                json!({"required": false, "content": {"application/json": {"schema": sch}}});
        }
        if (d.path.ends_with("/fs/{*path}") && d.method == "put") || d.path.ends_with("/stdin") {
            op["requestBody"] =
                json!({"content": {BYTES: {"schema": {"type": "string", "format": "binary"}}}});
        }
        let mut responses = serde_json::Map::new();
        let ok_schema = if d.ok.1 == JSON {
            json!({"type": "object"})
        } else {
            json!({"type": "string"})
        };
        responses.insert(
            d.ok.0.to_string(),
            if d.ok.0 == 204 {
                json!({"description": "done"})
            } else {
                json!({"description": "success", "content": {d.ok.1: {"schema": ok_schema}}})
            },
        );
        for e in d.errors {
            responses.insert(
                e.to_string(),
                json!({"description": "error", "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}),
            );
        }
        op["responses"] = Value::Object(responses);
        let path = d.path.replace("{*path}", "{path}");
        let entry = paths.entry(path).or_insert_with(|| json!({}));
        entry[d.method] = op;
    }
    let mut schemas = serde_json::Map::new();
    for (k, v) in generator.take_definitions(true) {
        schemas.insert(k, v);
    }
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}
        }),
    );
    json!({
        "openapi": "3.0.3",
        "info": {"title": "sprites API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas
        }
    })
}

async fn openapi_h() -> impl IntoResponse {
    axum::Json(openapi())
}

// ---- handlers ----

async fn create_org(State(a): State<App>, h: HeaderMap, body: Bytes) -> ApiResult<Response> {
    admin(&a, &h)?;
    let req: CreateOrg = parse_body(&body)?;
    let (info, token) = a.cp.create_org(&req.name)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"org": req.name, "token": token, "token_info": info})),
    )
        .into_response())
}

async fn list_orgs(State(a): State<App>, h: HeaderMap) -> ApiResult<Response> {
    admin(&a, &h)?;
    Ok(axum::Json(json!({"orgs": a.cp.list_orgs()})).into_response())
}

async fn create_token(State(a): State<App>, h: HeaderMap, body: Bytes) -> ApiResult<Response> {
    let org = org_of(&a, &h)?;
    let req: CreateToken = parse_body(&body)?;
    let (info, token) = a.cp.create_token(&org, &req.name)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"token": token, "token_info": info})),
    )
        .into_response())
}

async fn list_tokens(State(a): State<App>, h: HeaderMap) -> ApiResult<Response> {
    let org = org_of(&a, &h)?;
    Ok(axum::Json(json!({"tokens": a.cp.list_tokens(&org)?})).into_response())
}

async fn revoke_token(
    State(a): State<App>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let org = org_of(&a, &h)?;
    a.cp.revoke_token(&org, &id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A sprite as users see it: the host's view with the user's name and URL.
async fn sprite_json(a: &App, org: &str, row: &SpriteRow, with_storage: bool) -> ApiResult<Value> {
    let internal = &row.internal;
    let v = if with_storage {
        a.m.describe(internal).await?
    } else {
        a.m.view(internal)?
    };
    let mut j = serde_json::to_value(&v).unwrap_or_default();
    j["name"] = json!(row.name);
    j["org"] = json!(org);
    j["url_auth"] = json!(row.url_auth);
    j["url"] = match &a.m.config().proxy_url {
        Some(base) => json!(format!("{}/s/{internal}/", base.trim_end_matches('/'))),
        None => Value::Null,
    };
    if let Some(o) = j.as_object_mut() {
        o.remove("volume");
    }
    Ok(j)
}

async fn create_sprite(State(a): State<App>, h: HeaderMap, body: Bytes) -> ApiResult<Response> {
    let org = org_of(&a, &h)?;
    let req: CreateSprite = parse_body(&body)?;
    let row = a.cp.add_sprite(
        &org,
        &req.name,
        req.url_auth.unwrap_or(UrlAuth::Private).as_str(),
    )?;
    let t0 = Instant::now();
    let created = a.m.create(&row.internal, None, &req.settings).await;
    let t = host_result(&a, &org, &row, created)?;
    a.metrics.op("create", t0.elapsed());
    let mut j = sprite_json(&a, &org, &row, false).await?;
    j["timings"] = serde_json::to_value(t).unwrap_or_default();
    Ok((StatusCode::CREATED, axum::Json(j)).into_response())
}

/// The host's answer to making a sprite (create, fork) whose row was just added: on failure
/// the row goes too, unless the host kept the sprite (a failed boot leaves it in `error`,
/// visible and retryable).
fn host_result(
    a: &App,
    org: &str,
    row: &SpriteRow,
    r: Result<(vmm_glue::manager::SpriteView, vmm_glue::manager::Timings), SpriteError>,
) -> ApiResult<vmm_glue::manager::Timings> {
    match r {
        Ok((_, t)) => Ok(t),
        Err(e) => {
            if a.m.view(&row.internal).is_err() {
                let _ = a.cp.remove_sprite(org, &row.name);
            }
            Err(e.into())
        }
    }
}

async fn list_sprites(
    State(a): State<App>,
    h: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let org = org_of(&a, &h)?;
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "limit must be 1..1000",
                )
            })?,
        None => 100,
    };
    let rows =
        a.cp.sprites(&org, q.get("cursor").map(String::as_str), limit + 1)?;
    let more = rows.len() > limit;
    let mut out = Vec::new();
    for r in rows.iter().take(limit) {
        match sprite_json(&a, &org, r, false).await {
            Ok(j) => out.push(j),
            Err(_) => out.push(json!({"name": r.name, "state": "unknown"})),
        }
    }
    let next = if more {
        rows.get(limit - 1).map(|r| r.name.clone())
    } else {
        None
    };
    Ok(axum::Json(json!({"sprites": out, "next_cursor": next})).into_response())
}

async fn get_sprite(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let (org, row) = sprite_row(&a, &h, &name)?;
    Ok(axum::Json(sprite_json(&a, &org, &row, true).await?).into_response())
}

async fn update_sprite(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let (org, mut row) = sprite_row(&a, &h, &name)?;
    let req: UpdateSprite = parse_body(&body)?;
    a.m.update_settings(&row.internal, &req.settings).await?;
    if let Some(u) = req.url_auth {
        a.cp.set_url_auth(&org, &name, u.as_str())?;
        row.url_auth = u.as_str().to_string();
    }
    Ok(axum::Json(sprite_json(&a, &org, &row, false).await?).into_response())
}

async fn delete_sprite(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let (org, internal) = sprite_of(&a, &h, &name)?;
    match a.m.delete(&internal).await {
        Ok(()) | Err(SpriteError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    a.cp.remove_sprite(&org, &name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn exec(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let req: ExecRequest = parse_body(&body)?;
    if req.args.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "args must not be empty",
        ));
    }
    Ok(vmm_glue::server::exec_response(&a.m, &internal, req).await?)
}

async fn services_list(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    Ok(services_response(&a.m, &internal, "GET", "", None, &Bytes::new()).await?)
}

async fn service_get(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, svc)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let rest = format!("/{svc}");
    Ok(services_response(&a.m, &internal, "GET", &rest, None, &Bytes::new()).await?)
}

async fn service_put(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, svc)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let rest = format!("/{svc}");
    Ok(services_response(&a.m, &internal, "PUT", &rest, q.as_deref(), &body).await?)
}

async fn service_delete(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, svc)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let rest = format!("/{svc}");
    Ok(services_response(&a.m, &internal, "DELETE", &rest, None, &Bytes::new()).await?)
}

async fn service_action(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, svc, action)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let rest = format!("/{svc}/{action}");
    Ok(services_response(&a.m, &internal, "POST", &rest, q.as_deref(), &body).await?)
}

async fn sessions(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let v =
        a.m.agent_call(&internal, vmm_glue::proto::Op::Sessions)
            .await?;
    Ok(axum::Json(json!({"sessions": v})).into_response())
}

async fn attach(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    vmm_glue::server::find_session(&a.m, &internal, &id).await?;
    let handle = a.m.attach(&internal, &id).await?;
    Ok(vmm_glue::server::stream_handle(handle, None))
}

async fn kill_session(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    a.m.agent_call(
        &internal,
        vmm_glue::proto::Op::Kill {
            session: id.clone(),
            signal: libc::SIGKILL,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn session_stdin(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    if body.len() > MAX_JSON {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "send stdin in pieces of at most 1 MiB",
        ));
    }
    let entry = vmm_glue::server::find_session(&a.m, &internal, &id).await?;
    if !(entry["exit_code"].is_null() && entry["exit_signal"].is_null()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no running session {id:?}"),
        ));
    }
    let close = q.get("close").is_some_and(|v| v == "true" || v == "1");
    vmm_glue::server::send_stdin(&a.m, &internal, &id, &body, close).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn hibernate(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let (org, row) = sprite_row(&a, &h, &name)?;
    let req: HibernateBody = parse_body(&body)?;
    let mode = req.mode.unwrap_or(Pause::Warm);
    let t = a.m.hibernate(&row.internal, mode, "requested").await?;
    a.metrics.pause(mode);
    let mut j = sprite_json(&a, &org, &row, false).await?;
    j["timings"] = serde_json::to_value(t).unwrap_or_default();
    Ok(axum::Json(j).into_response())
}

fn fs_path(p: &str) -> ApiResult<String> {
    let p = format!("/{}", p.trim_start_matches('/'));
    if p.split('/').any(|c| c == "..") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "path must not contain '..'",
        ));
    }
    Ok(p)
}

async fn get_file(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let path = fs_path(&path)?;
    match vmm_glue::server::read_path(&a.m, &internal, &path).await? {
        PathContent::File(data) => Ok(([("content-type", BYTES)], data).into_response()),
        PathContent::Dir(v) => Ok(axum::Json(json!({"entries": v})).into_response()),
    }
}

async fn put_file(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, path)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let path = fs_path(&path)?;
    let mode = match q.get("mode") {
        Some(m) => Some(
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "mode must be octal, e.g. 644",
                    )
                })?,
        ),
        None => None,
    };
    vmm_glue::server::write_file(&a.m, &internal, &path, mode, &body).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"path": path, "size": body.len()})),
    )
        .into_response())
}

/// blockd's checkpoint JSON with the user-facing id (`v3`).
fn checkpoint_json(mut v: Value) -> Value {
    if let Some(n) = v["id"].as_u64() {
        v["id"] = json!(format!("v{n}"));
    }
    for k in ["volume", "timeline", "seq"] {
        if let Some(o) = v.as_object_mut() {
            o.remove(k);
        }
    }
    v
}

async fn create_checkpoint(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let req: CheckpointBody = parse_body(&body)?;
    let t0 = Instant::now();
    let (ck, t) = a.m.checkpoint(&internal, req.comment.as_deref()).await?;
    a.metrics.op("checkpoint", t0.elapsed());
    let mut j = checkpoint_json(ck);
    j["timings"] = serde_json::to_value(t).unwrap_or_default();
    Ok((StatusCode::CREATED, axum::Json(j)).into_response())
}

async fn list_checkpoints(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let v = a.m.checkpoints(&internal).await?;
    let list: Vec<Value> = v["checkpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(checkpoint_json)
        .collect();
    Ok(axum::Json(json!({"checkpoints": list})).into_response())
}

async fn get_checkpoint(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    let v = a.m.checkpoints(&internal).await?;
    let found = v["checkpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| checkpoint_json(c.clone()))
        .find(|c| c["id"] == id.as_str())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no checkpoint {id:?}"),
            )
        })?;
    Ok(axum::Json(found).into_response())
}

async fn delete_checkpoint(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (_, internal) = sprite_of(&a, &h, &name)?;
    a.m.delete_checkpoint(&internal, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn restore_checkpoint(
    State(a): State<App>,
    h: HeaderMap,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (org, row) = sprite_row(&a, &h, &name)?;
    let t0 = Instant::now();
    let (r, t) = a.m.restore(&row.internal, &id).await?;
    a.metrics.op("restore", t0.elapsed());
    let mut j = json!({
        "restored": id,
        "previous_head": checkpoint_json(r["previous_head"].clone())["id"].clone(),
        "timings": t,
    });
    j["sprite"] = sprite_json(&a, &org, &row, false).await?;
    Ok(axum::Json(j).into_response())
}

async fn fork(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let (org, parent) = sprite_row(&a, &h, &name)?;
    let req: ForkBody = parse_body(&body)?;
    let row = a.cp.add_sprite(&org, &req.name, &parent.url_auth)?;
    let t0 = Instant::now();
    let forked =
        a.m.fork(
            &parent.internal,
            &req.checkpoint,
            &row.internal,
            &req.settings,
        )
        .await;
    let t = host_result(&a, &org, &row, forked)?;
    a.metrics.op("fork", t0.elapsed());
    let mut j = sprite_json(&a, &org, &row, false).await?;
    j["forked_from"] = json!(format!("{name}@{}", req.checkpoint));
    j["timings"] = serde_json::to_value(t).unwrap_or_default();
    Ok((StatusCode::CREATED, axum::Json(j)).into_response())
}

fn range(q: &HashMap<String, String>) -> ApiResult<(i64, i64)> {
    let get = |k: &str, d: i64| -> ApiResult<i64> {
        match q.get(k) {
            Some(v) => v.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("{k} must be unix milliseconds"),
                )
            }),
            None => Ok(d),
        }
    };
    let to = get("to", crate::store::now_ms())?;
    let from = get("from", 0)?;
    if from > to {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "from is after to",
        ));
    }
    Ok((from, to))
}

/// Usage of one sprite in [from, to]: counters' growth between the first and last sample,
/// storage at the last sample.
fn summarize(samples: &[UsageSample]) -> Value {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return json!({"samples": 0, "cpu_seconds": 0.0, "memory_mib_seconds": 0.0, "running_seconds": 0.0,
                      "head_bytes": 0, "checkpoint_bytes": 0, "billable_bytes": 0});
    };
    let base = if samples.len() == 1 {
        UsageSample::default()
    } else {
        first.clone()
    };
    json!({
        "samples": samples.len(),
        "cpu_seconds": last.cpu_seconds - base.cpu_seconds,
        "memory_mib_seconds": last.memory_mib_seconds - base.memory_mib_seconds,
        "running_seconds": last.running_seconds - base.running_seconds,
        "head_bytes": last.head_bytes,
        "checkpoint_bytes": last.checkpoint_bytes,
        "billable_bytes": last.billable_bytes,
    })
}

async fn sprite_usage(
    State(a): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let (org, internal) = sprite_of(&a, &h, &name)?;
    crate::usage::sample_one(&a, &org, &name, &internal).await;
    let (from, to) = range(&q)?;
    let samples = a.cp.usage(&org, &name, from, to)?;
    let mut j = summarize(&samples);
    j["name"] = json!(name);
    j["from"] = json!(from);
    j["to"] = json!(to);
    Ok(axum::Json(j).into_response())
}

async fn org_usage(
    State(a): State<App>,
    h: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let org = org_of(&a, &h)?;
    let rows = a.cp.sprites(&org, None, usize::MAX >> 1)?;
    for r in &rows {
        crate::usage::sample_one(&a, &org, &r.name, &r.internal).await;
    }
    let (from, to) = range(&q)?;
    let mut per = Vec::new();
    let mut total = json!({"cpu_seconds": 0.0, "memory_mib_seconds": 0.0, "running_seconds": 0.0, "head_bytes": 0, "checkpoint_bytes": 0, "billable_bytes": 0});
    for r in rows {
        let s = summarize(&a.cp.usage(&org, &r.name, from, to)?);
        for k in ["cpu_seconds", "memory_mib_seconds", "running_seconds"] {
            total[k] = json!(total[k].as_f64().unwrap_or(0.0) + s[k].as_f64().unwrap_or(0.0));
        }
        for k in ["head_bytes", "checkpoint_bytes", "billable_bytes"] {
            total[k] = json!(total[k].as_i64().unwrap_or(0) + s[k].as_i64().unwrap_or(0));
        }
        let mut s = s;
        s["name"] = json!(r.name);
        per.push(s);
    }
    Ok(
        axum::Json(json!({"org": org, "from": from, "to": to, "total": total, "sprites": per}))
            .into_response(),
    )
}

/// The proxy's URL auth: sprites of an organization answer only to its tokens unless
/// public; sprites not created through the API are not reachable.
pub fn url_authorizer(cp: ControlPlane) -> vmm_glue::proxy::Authorize {
    Arc::new(move |internal: &str, headers: &hyper::HeaderMap| {
        let Some((org, row)) = cp.owner_of_internal(internal) else {
            return Err((StatusCode::NOT_FOUND, format!("no sprite {internal:?}")));
        };
        if row.url_auth == "public" {
            return Ok(());
        }
        match bearer(headers).and_then(|t| cp.authenticate(t)) {
            Some(o) if o == org => Ok(()),
            Some(_) => Err((StatusCode::NOT_FOUND, format!("no sprite {internal:?}"))),
            None => Err((
                StatusCode::UNAUTHORIZED,
                "this sprite's URL is private: send Authorization: Bearer <token>".into(),
            )),
        }
    })
}
