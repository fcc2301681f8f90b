//! Client of the admin API over its unix socket (used by the CLI, tests and the VMM layer).

use crate::error::ErrorCode;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach blockd at {socket}: {reason} (is `blockd serve` running? set --admin-socket)"
    )]
    Unreachable { socket: String, reason: String },
    #[error("{message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("unexpected response from blockd: {0}")]
    Protocol(String),
}

impl ClientError {
    /// CLI exit status for this error (README documents them).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unreachable { .. } => 7,
            ClientError::Api { code, .. } => code.exit_code(),
            ClientError::Protocol(_) => 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    pub fn new(socket: &Path) -> AdminClient {
        AdminClient {
            socket: socket.to_path_buf(),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            socket: self.socket.display().to_string(),
            reason,
        };
        let bytes = match &body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let resp = unix_request(&self.socket, method, path, "blockd", bytes)
            .await
            .map_err(|e| match e {
                UnixRequestError::Invalid(m) => ClientError::Protocol(m),
                UnixRequestError::Unreachable(m) => unreachable(m),
            })?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| ClientError::Protocol(format!("status {status}: {e}")))?
        };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let err = &value["error"];
        let code = serde_json::from_value(err["code"].clone()).unwrap_or(ErrorCode::Internal);
        Err(ClientError::Api {
            status,
            code,
            message: err["message"]
                .as_str()
                .unwrap_or("unknown error")
                .to_string(),
        })
    }
}

/// Sends one HTTP/1.1 request over a unix socket, on a connection of its own. Shared by the
/// clients of blockd's and sprited's control sockets.
pub async fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    host: &str,
    body: Bytes,
) -> Result<hyper::Response<hyper::body::Incoming>, UnixRequestError> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| UnixRequestError::Invalid(e.to_string()))?;
    let gone = |e: String| UnixRequestError::Unreachable(e);
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| gone(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| gone(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| gone(e.to_string()))
}

#[derive(Debug)]
pub enum UnixRequestError {
    /// The request could not be built (bad method or path).
    Invalid(String),
    /// The daemon could not be reached or dropped the connection.
    Unreachable(String),
}
