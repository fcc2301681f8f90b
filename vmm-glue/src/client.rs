//! Client of `sprited`'s control socket (used by the `sprited` CLI subcommands and tests).

use blockd::client::UnixRequestError;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach sprited at {socket}: {reason} (is `sprited serve` running?)")]
    Unreachable { socket: String, reason: String },
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected response: {0}")]
    Protocol(String),
}

impl ClientError {
    /// CLI exit status (docs/sprites.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unreachable { .. } => 7,
            ClientError::Api { status, .. } => exit_code_for_status(*status),
            ClientError::Protocol(_) => 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends a request; returns the response (status checked: errors become `Api`).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            socket: self.socket.display().to_string(),
            reason,
        };
        let resp = blockd::client::unix_request(&self.socket, method, path, "sprited", body)
            .await
            .map_err(|e| match e {
                UnixRequestError::Invalid(m) => ClientError::Protocol(m),
                UnixRequestError::Unreachable(m) => unreachable(m),
            })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let (code, message) = error_of(resp).await.map_err(ClientError::Protocol)?;
        Err(ClientError::Api {
            status,
            code,
            message,
        })
    }

    /// A JSON call.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let b = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
        let resp = self.send(method, path, b).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Raw bytes of a response (file downloads).
    pub async fn bytes(&self, method: &str, path: &str, body: Bytes) -> Result<Bytes, ClientError> {
        let resp = self.send(method, path, body).await?;
        Ok(resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes())
    }

    /// Follows an NDJSON stream, calling `f` per line (a JSON value).
    pub async fn stream(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        mut f: impl FnMut(Value),
    ) -> Result<(), ClientError> {
        let b = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
        let mut body = self.send(method, path, b).await?.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Some(d) = frame.data_ref() {
                buf.extend_from_slice(d);
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    if let Ok(v) = serde_json::from_slice(&line) {
                        f(v);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// The `{"error": {"code", "message"}}` of a failed response (shared with the API's SDK).
pub async fn error_of(
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<(String, String), String> {
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((
        v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
        v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&body))),
    ))
}

/// Prints rows as aligned columns (the first row is the header).
pub fn print_table(rows: &[Vec<String>]) {
    let n = rows.first().map(|r| r.len()).unwrap_or(0);
    let w: Vec<usize> = (0..n)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let l: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = w[i]))
            .collect();
        println!("{}", l.join("  ").trim_end());
    }
}

/// Exit status of the command-line tools for an HTTP error status (docs/sprites.md,
/// docs/api.md): 2 unauthorized, 3 not found, 4 conflict, 5 invalid, 6 unavailable, else 1.
pub fn exit_code_for_status(status: u16) -> i32 {
    match status {
        401 | 403 => 2,
        404 => 3,
        409 => 4,
        400 | 422 => 5,
        503 => 6,
        _ => 1,
    }
}

/// The body of an exec request from command-line flags: `env` as `K=V` strings; with
/// `read_stdin`, all of this process's stdin goes to the command.
pub fn exec_body(
    args: &[String],
    env: &[String],
    cwd: Option<&str>,
    tty: bool,
    detachable: bool,
    read_stdin: bool,
) -> Result<Value, String> {
    use base64::Engine as _;
    let mut envs = serde_json::Map::new();
    for kv in env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--env wants K=V, got {kv:?}"))?;
        envs.insert(k.into(), v.into());
    }
    let mut body =
        serde_json::json!({"args": args, "env": envs, "tty": tty, "detachable": detachable});
    if let Some(d) = cwd {
        body["cwd"] = serde_json::json!(d);
    }
    if read_stdin {
        let mut data = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut data);
        body["stdin"] = serde_json::json!(base64::engine::general_purpose::STANDARD.encode(&data));
    }
    Ok(body)
}
