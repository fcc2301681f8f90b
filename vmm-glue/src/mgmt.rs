//! The management API inside a sprite: plain HTTP/1.1 + JSON on `/.sprite/api.sock` (virtual
//! host `sprite`), served by the runtime with one thread per connection. [`route`] is the
//! whole API; the host reaches the same function through the runtime protocol
//! (`Op::Api`), so `/v1/sprites/{name}/services/...` outside means exactly what
//! `/v1/services/...` means inside. Endpoints: docs/services.md.

use crate::services::{self, ApiError, ApiResult, Runtime, ServiceDef};
use serde::Deserialize;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Default path of the socket inside a sprite.
pub const SOCKET: &str = "/.sprite/api.sock";
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body.
pub const MAX_BODY: usize = 1 << 20;
/// Default `duration` of the event stream after create/start/restart.
pub const DEFAULT_STREAM: Duration = Duration::from_secs(5);

/// What a request produced.
pub enum Reply {
    Json(u16, Value),
    NoContent,
    /// NDJSON events until the stream ends.
    Stream(u16, Box<dyn Iterator<Item = Value> + Send>),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Json(s, v) => write!(f, "Json({s}, {v})"),
            Reply::NoContent => f.write_str("NoContent"),
            Reply::Stream(s, _) => write!(f, "Stream({s})"),
        }
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        Reply::Json(e.status, e.to_json())
    }
}

/// A service's events for `duration`, then `complete` with its log files.
struct Follow {
    rx: mpsc::Receiver<Value>,
    deadline: Instant,
    log: String,
    done: bool,
}

impl Iterator for Follow {
    type Item = Value;
    fn next(&mut self) -> Option<Value> {
        if self.done {
            return None;
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(v) => Some(v),
            Err(_) => {
                self.done = true;
                Some(json!({
                    "type": "complete",
                    "log_files": [self.log],
                    "timestamp": crate::manager::now_ms(),
                }))
            }
        }
    }
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// `?duration=`: how long create/start/restart stream events (0: not at all).
fn stream_duration(query: &str) -> ApiResult<Duration> {
    let Some(v) = query_param(query, "duration") else {
        return Ok(DEFAULT_STREAM);
    };
    let d = services::parse_duration(v)
        .ok_or_else(|| ApiError::bad(format!("bad duration {v:?}: like 5s, 500ms, 1m, 0")))?;
    if d > services::MAX_STREAM {
        return Err(ApiError::bad("duration must be at most 5m"));
    }
    Ok(d)
}

fn body_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad("a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("bad JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    #[serde(default)]
    name: Option<String>,
    signal: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    expire: Value,
}

fn signal_of(v: &Value) -> ApiResult<i32> {
    match v {
        Value::String(s) => services::parse_signal(s),
        Value::Number(n) => services::parse_signal(&n.to_string()),
        _ => Err(ApiError::bad("signal: a name like \"TERM\" or a number")),
    }
}

/// Runs `act` on `name`, answering with the service (or, for a positive `duration`, with its
/// events from before `act` for that long).
fn acting(
    rt: &Arc<Runtime>,
    name: &str,
    query: &str,
    ok: u16,
    act: impl FnOnce() -> ApiResult<()>,
) -> ApiResult<Reply> {
    let d = stream_duration(query)?;
    let rx = if d.is_zero() {
        None
    } else {
        Some(rt.subscribe(name)?)
    };
    act()?;
    Ok(match rx {
        Some(rx) => follow(rt, name, rx, ok, d),
        None => Reply::Json(ok, rt.get(name)?),
    })
}

fn follow(rt: &Runtime, name: &str, rx: mpsc::Receiver<Value>, ok: u16, d: Duration) -> Reply {
    Reply::Stream(
        ok,
        Box::new(Follow {
            rx,
            deadline: Instant::now() + d,
            log: rt.log_path(name).display().to_string(),
            done: false,
        }),
    )
}

/// The management API: `method` and `target` (path and query) of one request.
pub fn route(rt: &Arc<Runtime>, method: &str, target: &str, body: &[u8]) -> Reply {
    match route_inner(rt, method, target, body) {
        Ok(r) => r,
        Err(e) => e.into(),
    }
}

fn route_inner(rt: &Arc<Runtime>, method: &str, target: &str, body: &[u8]) -> ApiResult<Reply> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let no_method = || {
        ApiError::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )
    };
    match segs.as_slice() {
        ["v1", "services"] => match method {
            "GET" => Ok(Reply::Json(200, rt.list())),
            _ => Err(no_method()),
        },
        ["v1", "services", "signal"] if method == "POST" => {
            let b: SignalBody = body_json(body)?;
            let name = b.name.ok_or_else(|| ApiError::bad("name is required"))?;
            rt.signal(&name, signal_of(&b.signal)?)?;
            Ok(Reply::Json(200, rt.get(&name)?))
        }
        ["v1", "services", name] => match method {
            "GET" => Ok(Reply::Json(200, rt.get(name)?)),
            "PUT" => {
                let def: ServiceDef = body_json(body)?;
                let d = stream_duration(query)?;
                let (created, rx) = rt.put_following(name, def, !d.is_zero())?;
                let ok = if created { 201 } else { 200 };
                Ok(match rx {
                    Some(rx) => follow(rt, name, rx, ok, d),
                    None => Reply::Json(ok, rt.get(name)?),
                })
            }
            "DELETE" => {
                rt.delete(name)?;
                Ok(Reply::NoContent)
            }
            _ => Err(no_method()),
        },
        ["v1", "services", name, action] => {
            if method != "POST" {
                return Err(no_method());
            }
            match *action {
                "start" => acting(rt, name, query, 200, || rt.start(name)),
                "restart" => acting(rt, name, query, 200, || rt.restart(name)),
                "stop" => {
                    rt.stop(name)?;
                    Ok(Reply::Json(200, rt.get(name)?))
                }
                "signal" => {
                    let b: SignalBody = body_json(body)?;
                    if b.name.as_deref().is_some_and(|n| n != *name) {
                        return Err(ApiError::bad("name in the body differs from the path"));
                    }
                    rt.signal(name, signal_of(&b.signal)?)?;
                    Ok(Reply::Json(200, rt.get(name)?))
                }
                other => Err(ApiError::new(
                    404,
                    "not_found",
                    format!("no action {other:?} (start, stop, restart, signal)"),
                )),
            }
        }
        ["v1", "tasks"] => match method {
            "GET" => Ok(Reply::Json(200, rt.task_list())),
            "POST" | "PUT" => {
                let b: TaskBody = body_json(body)?;
                let name = b.name.ok_or_else(|| ApiError::bad("name is required"))?;
                let expire = services::parse_expire(&b.expire)?;
                if method == "POST" {
                    Ok(Reply::Json(201, rt.task_create(&name, expire)?))
                } else {
                    Ok(Reply::Json(200, rt.task_upsert(&name, expire)?))
                }
            }
            _ => Err(no_method()),
        },
        ["v1", "tasks", name] => match method {
            "GET" => Ok(Reply::Json(200, rt.task_get(name)?)),
            "PUT" => {
                let b: TaskBody = body_json(body)?;
                if b.name.as_deref().is_some_and(|n| n != *name) {
                    return Err(ApiError::bad("name in the body differs from the path"));
                }
                let expire = services::parse_expire(&b.expire)?;
                Ok(Reply::Json(200, rt.task_upsert(name, expire)?))
            }
            "DELETE" => {
                rt.task_delete(name)?;
                Ok(Reply::NoContent)
            }
            _ => Err(no_method()),
        },
        _ => Err(ApiError::new(
            404,
            "not_found",
            format!("no endpoint {path} (see /v1/services, /v1/tasks)"),
        )),
    }
}

// ---- the HTTP server ---------------------------------------------------------------------

/// Serves the API on a unix socket at `path` (mode 0666: anyone inside the sprite; nothing
/// outside it can reach the path). Returns once listening.
pub fn serve_socket(rt: Arc<Runtime>, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            let rt = rt.clone();
            std::thread::spawn(move || serve_conn(&rt, conn));
        }
    });
    Ok(())
}

/// One request read from the socket.
#[derive(Debug)]
pub struct HttpRequest {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub body: Vec<u8>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

/// Parses one request from bytes, as the socket server does (the fuzz target's entry).
pub fn parse_request(mut bytes: &[u8]) -> Result<HttpRequest, ApiError> {
    read_request(&mut bytes, || {})
}

/// Reads one request; `on_continue` answers `Expect: 100-continue`. Errors carry the status
/// to answer with.
fn read_request<R: BufRead>(
    r: &mut R,
    mut on_continue: impl FnMut(),
) -> Result<HttpRequest, ApiError> {
    let mut head = Vec::new();
    loop {
        let n = r
            .by_ref()
            .take((MAX_HEAD + 1 - head.len()) as u64)
            .read_until(b'\n', &mut head)
            .map_err(|e| ApiError::bad(format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(ApiError::bad("connection closed before the request ended"));
        }
        if head.len() > MAX_HEAD {
            return Err(ApiError::new(431, "too_large", "request head too large"));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") || head == b"\r\n" {
            if head == b"\r\n" {
                head.clear();
                continue;
            }
            break;
        }
    }
    let text = String::from_utf8(head).map_err(|_| ApiError::bad("request head is not UTF-8"))?;
    let mut lines = text.lines();
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ApiError::bad(format!("bad request line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(ApiError::bad(format!("bad request line {line:?}")));
    }
    let mut len: Option<usize> = None;
    let mut chunked = false;
    let mut expect_continue = false;
    for h in lines {
        let Some((k, v)) = h.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                len = Some(
                    v.parse()
                        .map_err(|_| ApiError::bad(format!("bad Content-Length {v:?}")))?,
                )
            }
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "expect" => expect_continue = v.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    if len.is_some_and(|n| n > MAX_BODY) {
        return Err(ApiError::new(
            413,
            "too_large",
            format!("request body over {MAX_BODY} bytes"),
        ));
    }
    if expect_continue {
        on_continue();
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            r.by_ref()
                .take(64)
                .read_line(&mut size_line)
                .map_err(|e| ApiError::bad(e.to_string()))?;
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| ApiError::bad("bad chunk size"))?;
            if body.len() + size > MAX_BODY {
                return Err(ApiError::new(413, "too_large", "request body too large"));
            }
            let at = body.len();
            body.resize(at + size, 0);
            r.read_exact(&mut body[at..])
                .map_err(|e| ApiError::bad(e.to_string()))?;
            let mut crlf = String::new();
            r.by_ref()
                .take(2)
                .read_line(&mut crlf)
                .map_err(|e| ApiError::bad(e.to_string()))?;
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = len {
        body.resize(n, 0);
        r.read_exact(&mut body)
            .map_err(|e| ApiError::bad(format!("reading the body: {e}")))?;
    }
    Ok(HttpRequest {
        method: method.to_string(),
        target: target.to_string(),
        body,
    })
}

fn write_json(s: &mut UnixStream, status: u16, v: &Value) -> std::io::Result<()> {
    let body = format!("{v}\n");
    write!(
        s,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )
}

fn serve_conn(rt: &Arc<Runtime>, mut s: UnixStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = match s
        .try_clone()
        .map_err(|e| ApiError::bad(e.to_string()))
        .and_then(|r| {
            let mut w = s.try_clone().map_err(|e| ApiError::bad(e.to_string()))?;
            read_request(&mut BufReader::new(r), || {
                let _ = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            })
        }) {
        Ok(r) => r,
        Err(e) => {
            let _ = write_json(&mut s, e.status, &e.to_json());
            return;
        }
    };
    let _ = match route(rt, &req.method, &req.target, &req.body) {
        Reply::Json(status, v) => write_json(&mut s, status, &v),
        Reply::NoContent => s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"),
        Reply::Stream(status, events) => (|| {
            write!(
                s,
                "HTTP/1.1 {status} {}\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
                reason(status)
            )?;
            for ev in events {
                s.write_all(format!("{ev}\n").as_bytes())?;
                s.flush()?;
            }
            Ok(())
        })(),
    };
    let _ = s.shutdown(std::net::Shutdown::Both);
}

// ---- the client (sprite-env) -------------------------------------------------------------

/// Sends one request to the socket at `sock`; the response body goes to `out` as it arrives.
/// Returns the status.
pub fn call(
    sock: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
    out: &mut dyn FnMut(&[u8]),
) -> std::io::Result<u16> {
    let mut s = UnixStream::connect(sock)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", sock.display())))?;
    let body = body.unwrap_or_default();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: sprite\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut r = BufReader::new(s);
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut len: Option<u64> = None;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok();
        }
    }
    let mut buf = [0u8; 16 << 10];
    let mut left = len.unwrap_or(u64::MAX);
    while left > 0 {
        let want = buf.len().min(left.min(usize::MAX as u64) as usize);
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        out(&buf[..n]);
        left -= n as u64;
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn call_json(sock: &Path, method: &str, target: &str, body: Option<&str>) -> (u16, String) {
        let mut out = Vec::new();
        let st = call(sock, method, target, body.map(str::as_bytes), &mut |b| {
            out.extend_from_slice(b)
        })
        .unwrap();
        (st, String::from_utf8(out).unwrap())
    }

    #[test]
    fn socket_api_status_codes() {
        let d = tempfile::tempdir().unwrap();
        let rt = Runtime::open(&d.path().join("s"), &d.path().join("run")).unwrap();
        let sock = d.path().join("api.sock");
        serve_socket(rt.clone(), &sock).unwrap();
        // Tasks: every status code.
        let t = |m: &str, p: &str, b: Option<&str>| call_json(&sock, m, p, b).0;
        assert_eq!(
            t("POST", "/v1/tasks", Some(r#"{"name":"a","expire":60}"#)),
            201
        );
        assert_eq!(
            t("POST", "/v1/tasks", Some(r#"{"name":"a","expire":"1h"}"#)),
            409
        );
        assert_eq!(
            t("POST", "/v1/tasks", Some(r#"{"name":"b","expire":"2h"}"#)),
            400
        );
        assert_eq!(t("POST", "/v1/tasks", Some(r#"{"expire":5}"#)), 400);
        assert_eq!(t("POST", "/v1/tasks", Some("not json")), 400);
        assert_eq!(t("POST", "/v1/tasks", None), 400);
        assert_eq!(t("PUT", "/v1/tasks/c", Some(r#"{"expire":"30m"}"#)), 200);
        assert_eq!(
            t("PUT", "/v1/tasks", Some(r#"{"name":"c","expire":10}"#)),
            200
        );
        assert_eq!(t("PUT", "/v1/tasks/c", Some(r#"{"expire":"soon"}"#)), 400);
        let (st, body) = call_json(&sock, "GET", "/v1/tasks", None);
        assert_eq!(st, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["tasks"].as_array().unwrap().len(), 2, "{v}");
        assert!(v["tasks"][0]["expires_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(t("GET", "/v1/tasks/a", None), 200);
        assert_eq!(t("GET", "/v1/tasks/zz", None), 404);
        assert_eq!(t("DELETE", "/v1/tasks/a", None), 204);
        assert_eq!(t("DELETE", "/v1/tasks/a", None), 404);
        assert_eq!(t("PATCH", "/v1/tasks", None), 405);
        assert_eq!(t("GET", "/v1/nope", None), 404);
        // Services over the socket, with the creation stream.
        let (st, body) = call_json(
            &sock,
            "PUT",
            "/v1/services/hello?duration=1s",
            Some(r#"{"cmd":"sh","args":["-c","echo hi; sleep 30"]}"#),
        );
        assert_eq!(st, 201);
        let events: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(kinds.first(), Some(&"started"), "{body}");
        assert!(kinds.contains(&"stdout"), "{body}");
        assert_eq!(kinds.last(), Some(&"complete"), "{body}");
        assert!(events.iter().all(|e| e["timestamp"].as_u64().is_some()));
        let (st, body) = call_json(
            &sock,
            "PUT",
            "/v1/services/bad?duration=2s",
            Some(r#"{"cmd":"/no/such/binary"}"#),
        );
        assert_eq!(st, 201);
        assert!(body.contains(r#""type":"exit""#), "{body}");
        assert_eq!(
            t(
                "PUT",
                "/v1/services/bad?duration=0",
                Some(r#"{"cmd":"x","bogus":1}"#)
            ),
            400
        );
        assert_eq!(
            t(
                "PUT",
                "/v1/services/x?duration=forever",
                Some(r#"{"cmd":"x"}"#)
            ),
            400
        );
        assert_eq!(t("POST", "/v1/services/hello/stop", None), 200);
        assert_eq!(
            t(
                "POST",
                "/v1/services/hello/signal",
                Some(r#"{"signal":"TERM"}"#)
            ),
            409
        );
        assert_eq!(t("POST", "/v1/services/hello/start?duration=0", None), 200);
        assert_eq!(
            t(
                "POST",
                "/v1/services/signal",
                Some(r#"{"name":"hello","signal":"HUP"}"#)
            ),
            200
        );
        assert_eq!(t("POST", "/v1/services/hello/jump", None), 404);
        assert_eq!(t("GET", "/v1/services/hello/start", None), 405);
        assert_eq!(t("DELETE", "/v1/services/hello", None), 204);
        assert_eq!(t("DELETE", "/v1/services/hello", None), 404);
        assert_eq!(t("DELETE", "/v1/services/bad", None), 204);
        // A malformed request gets a 400, not a hang or a crash.
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"garbage\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    }
}

// ---- the `services` subcommands (shared by `sprite-env` inside and `sprite` outside) ------

/// How long create/start/restart follow the service's events.
#[derive(Debug, Clone, clap::Args)]
pub struct FollowArgs {
    /// Stream the service's events (NDJSON) for this long: 5s, 500ms, 1m
    #[arg(long, default_value = "5s")]
    pub duration: String,
    /// Return at once with the service's state instead of streaming
    #[arg(long)]
    pub no_stream: bool,
}

impl FollowArgs {
    fn query(&self) -> String {
        let d = if self.no_stream { "0" } else { &self.duration };
        format!("?duration={d}")
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    pub name: String,
    /// The program (arguments go in --args)
    #[arg(long)]
    pub cmd: String,
    /// Arguments, comma-separated: --args "-m,http.server,3000"
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Environment, comma-separated K=V pairs
    #[arg(long, value_delimiter = ',')]
    pub env: Vec<String>,
    /// Working directory
    #[arg(long)]
    pub dir: Option<String>,
    /// Services to start first, comma-separated
    #[arg(long, value_delimiter = ',')]
    pub needs: Vec<String>,
    /// The port the sprite's URL routes to (one service per sprite)
    #[arg(long)]
    pub http_port: Option<u16>,
    #[command(flatten)]
    pub follow: FollowArgs,
}

/// `services` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ServicesCmd {
    /// Create (or replace) a service and start it; streams its first events
    Create(CreateArgs),
    /// Every service with its state
    List,
    /// One service with its state (status, pid, started_at, restart_count)
    Get { name: String },
    /// Start a service (clears a stop)
    Start {
        name: String,
        #[command(flatten)]
        follow: FollowArgs,
    },
    /// Stop a service; it stays stopped across wakes and boots until started
    Stop { name: String },
    /// Stop and start a service
    Restart {
        name: String,
        #[command(flatten)]
        follow: FollowArgs,
    },
    /// Send a signal (TERM, HUP, KILL, 9...) to a service's processes
    Signal { name: String, signal: String },
    /// Stop and remove a service (its log stays)
    Delete { name: String },
}

/// One request of the management API, relative to `/v1/services`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub method: &'static str,
    /// Appended to `/v1/services` (e.g. `/web?duration=5s`).
    pub path: String,
    pub body: Option<Value>,
}

impl ServicesCmd {
    pub fn request(&self) -> Result<ApiRequest, String> {
        let r = |method, path: String, body| ApiRequest { method, path, body };
        Ok(match self {
            ServicesCmd::Create(a) => {
                let mut env = serde_json::Map::new();
                for kv in &a.env {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| format!("--env {kv:?}: expected K=V"))?;
                    env.insert(k.to_string(), json!(v));
                }
                let mut body = json!({
                    "cmd": a.cmd, "args": a.args, "env": env, "needs": a.needs,
                    "http_port": a.http_port,
                });
                if let Some(d) = &a.dir {
                    body["dir"] = json!(d);
                }
                r(
                    "PUT",
                    format!("/{}{}", a.name, a.follow.query()),
                    Some(body),
                )
            }
            ServicesCmd::List => r("GET", String::new(), None),
            ServicesCmd::Get { name } => r("GET", format!("/{name}"), None),
            ServicesCmd::Start { name, follow } => {
                r("POST", format!("/{name}/start{}", follow.query()), None)
            }
            ServicesCmd::Stop { name } => r("POST", format!("/{name}/stop"), None),
            ServicesCmd::Restart { name, follow } => {
                r("POST", format!("/{name}/restart{}", follow.query()), None)
            }
            ServicesCmd::Signal { name, signal } => r(
                "POST",
                format!("/{name}/signal"),
                Some(json!({ "signal": signal })),
            ),
            ServicesCmd::Delete { name } => r("DELETE", format!("/{name}"), None),
        })
    }
}

/// Prints a management API answer as it arrives: NDJSON events (more than one line) line by
/// line, a single JSON document at the end (pretty unless `compact`).
#[derive(Debug, Default)]
pub struct BodyPrinter {
    buf: Vec<u8>,
    streaming: bool,
}

impl BodyPrinter {
    pub fn feed(&mut self, chunk: &[u8], out: &mut dyn Write) {
        self.buf.extend_from_slice(chunk);
        if !self.streaming && self.buf.iter().filter(|&&b| b == b'\n').count() > 1 {
            self.streaming = true;
        }
        if self.streaming
            && let Some(end) = self.buf.iter().rposition(|&b| b == b'\n')
        {
            let _ = out.write_all(&self.buf[..=end]);
            let _ = out.flush();
            self.buf.drain(..=end);
        }
    }

    /// What is left: the whole body when it was one document.
    pub fn finish(self, compact: bool, out: &mut dyn Write) {
        let text = String::from_utf8_lossy(&self.buf);
        if text.trim().is_empty() {
            return;
        }
        match serde_json::from_str::<Value>(text.trim()) {
            Ok(v) if !compact && !self.streaming => {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                );
            }
            _ => {
                let _ = out.write_all(text.as_bytes());
            }
        }
    }

    /// The body so far (for error messages).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}
