//! The client library of the sprites API (the `sprite` CLI is built on it).
//!
//! ```no_run
//! # async fn demo() -> Result<(), api::sdk::SdkError> {
//! use api::sdk::Client;
//! let c = Client::new("http://127.0.0.1:8400", "spr_acme_...");
//! let s = c.create_sprite("web", Default::default()).await?;
//! println!("{} is {}", s.name, s.state);
//! let out = c.exec_collect("web", &["sh", "-c", "echo hello"]).await?;
//! assert_eq!(out.stdout, b"hello\n");
//! let ck = c.create_checkpoint("web", Some("before upgrade")).await?;
//! c.restore_checkpoint("web", &ck.id).await?;
//! # Ok(()) }
//! ```

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error("cannot reach the API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected response: {0}")]
    Protocol(String),
}

impl SdkError {
    /// Exit status for command-line tools (docs/api.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            SdkError::Unreachable { .. } => 7,
            SdkError::Api { status, .. } => vmm_glue::client::exit_code_for_status(*status),
            SdkError::Protocol(_) => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, SdkError>;

/// A sprite as the API returns it (`raw` keeps every field).
#[derive(Debug, Clone, Deserialize)]
pub struct Sprite {
    pub name: String,
    pub state: String,
    pub pause: Option<String>,
    #[serde(default)]
    pub reason: String,
    pub url: Option<String>,
    #[serde(flatten)]
    pub raw: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    #[serde(default)]
    pub comment: String,
    #[serde(flatten)]
    pub raw: serde_json::Map<String, Value>,
}

impl Sprite {
    /// Every field, as the API sent it.
    pub fn to_json(&self) -> Value {
        let mut m = self.raw.clone();
        m.insert("name".into(), json!(self.name));
        m.insert("state".into(), json!(self.state));
        m.insert("pause".into(), json!(self.pause));
        m.insert("reason".into(), json!(self.reason));
        m.insert("url".into(), json!(self.url));
        Value::Object(m)
    }
}

impl Checkpoint {
    /// Every field, as the API sent it.
    pub fn to_json(&self) -> Value {
        let mut m = self.raw.clone();
        m.insert("id".into(), json!(self.id));
        m.insert("comment".into(), json!(self.comment));
        Value::Object(m)
    }
}

/// Settings of a sprite (unset fields keep their defaults).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpriteSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_warm_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_cold_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
}

/// One event of a running command.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    Started {
        session: String,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
    Error(String),
}

#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The exit status (128 + N when killed by signal N; -1 when the sprite went away).
    pub status: i32,
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
}

fn enc_path(p: &str) -> String {
    p.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Client {
    /// `base`: `http://host:port` of the API server.
    pub fn new(base: &str, token: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// Sends a request; non-2xx answers become [`SdkError::Api`].
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let unreachable = |reason: String| SdkError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let authority = self.base.strip_prefix("http://").ok_or_else(|| {
            SdkError::Protocol(format!(
                "only http:// API URLs are supported, got {}",
                self.base
            ))
        })?;
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", content_type)
            .body(Full::new(body))
            .map_err(|e| SdkError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let (code, message) = vmm_glue::client::error_of(resp)
            .await
            .map_err(SdkError::Protocol)?;
        Err(SdkError::Api {
            status,
            code,
            message,
        })
    }

    /// A JSON call (`Value::Null` for empty answers).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let b = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
        let resp = self.send(method, path, "application/json", b).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| SdkError::Protocol(e.to_string()))?
            .to_bytes();
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| SdkError::Protocol(e.to_string()))
    }

    fn typed<T: for<'de> Deserialize<'de>>(v: Value) -> Result<T> {
        serde_json::from_value(v).map_err(|e| SdkError::Protocol(e.to_string()))
    }

    pub async fn create_org(&self, name: &str) -> Result<(String, String)> {
        let v = self
            .call("POST", "/v1/orgs", Some(json!({"name": name})))
            .await?;
        Ok((
            name.to_string(),
            v["token"].as_str().unwrap_or("").to_string(),
        ))
    }

    /// A new token of the caller's organization (its secret is only shown here).
    pub async fn create_token(&self, name: &str) -> Result<String> {
        let v = self
            .call("POST", "/v1/tokens", Some(json!({"name": name})))
            .await?;
        Ok(v["token"].as_str().unwrap_or("").to_string())
    }

    pub async fn create_sprite(&self, name: &str, settings: SpriteSettings) -> Result<Sprite> {
        let v = self
            .call(
                "POST",
                "/v1/sprites",
                Some(json!({"name": name, "settings": settings})),
            )
            .await?;
        Self::typed(v)
    }

    /// Every sprite (follows the pagination).
    pub async fn list_sprites(&self) -> Result<Vec<Sprite>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/sprites?limit=100&cursor={}", enc_path(c)),
                None => "/v1/sprites?limit=100".to_string(),
            };
            let v = self.call("GET", &path, None).await?;
            for s in v["sprites"].as_array().into_iter().flatten() {
                out.push(Self::typed(s.clone())?);
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return Ok(out),
            }
        }
    }

    pub async fn get_sprite(&self, name: &str) -> Result<Sprite> {
        Self::typed(
            self.call("GET", &format!("/v1/sprites/{name}"), None)
                .await?,
        )
    }

    pub async fn delete_sprite(&self, name: &str) -> Result<()> {
        self.call("DELETE", &format!("/v1/sprites/{name}"), None)
            .await
            .map(|_| ())
    }

    pub async fn update_sprite(&self, name: &str, body: Value) -> Result<Sprite> {
        Self::typed(
            self.call("PUT", &format!("/v1/sprites/{name}"), Some(body))
                .await?,
        )
    }

    pub async fn hibernate(&self, name: &str, cold: bool) -> Result<Sprite> {
        let mode = if cold { "cold" } else { "warm" };
        Self::typed(
            self.call(
                "POST",
                &format!("/v1/sprites/{name}/hibernate"),
                Some(json!({"mode": mode})),
            )
            .await?,
        )
    }

    /// Runs a command, calling `on` per event; returns the exit status.
    pub async fn exec(
        &self,
        name: &str,
        request: Value,
        mut on: impl FnMut(ExecEvent),
    ) -> Result<i32> {
        self.follow(
            "POST",
            &format!("/v1/sprites/{name}/exec"),
            Some(request),
            &mut on,
        )
        .await
    }

    /// Follows a detachable session until it exits (or the connection ends).
    pub async fn attach(
        &self,
        name: &str,
        session: &str,
        mut on: impl FnMut(ExecEvent),
    ) -> Result<i32> {
        self.follow(
            "GET",
            &format!("/v1/sprites/{name}/sessions/{session}/attach"),
            None,
            &mut on,
        )
        .await
    }

    async fn follow(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        on: &mut dyn FnMut(ExecEvent),
    ) -> Result<i32> {
        let b = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
        let mut body = self
            .send(method, path, "application/json", b)
            .await?
            .into_body();
        let mut buf = Vec::new();
        let mut status = -1;
        let b64 = |v: &Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or("").as_bytes())
                .unwrap_or_default()
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| SdkError::Protocol(e.to_string()))?;
            let Some(d) = frame.data_ref() else { continue };
            buf.extend_from_slice(d);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                match v["event"].as_str() {
                    Some("started") => on(ExecEvent::Started {
                        session: v["session"].as_str().unwrap_or("").to_string(),
                    }),
                    Some("output") if v["stream"] == "stderr" => {
                        on(ExecEvent::Stderr(b64(&v["data"])))
                    }
                    Some("output") => on(ExecEvent::Stdout(b64(&v["data"]))),
                    Some("exit") => {
                        let code = v["code"].as_i64().map(|c| c as i32);
                        let signal = v["signal"].as_i64().map(|s| s as i32);
                        status = code.or(signal.map(|s| 128 + s)).unwrap_or(-1);
                        on(ExecEvent::Exit { code, signal });
                    }
                    Some("error") => on(ExecEvent::Error(
                        v["message"].as_str().unwrap_or("").to_string(),
                    )),
                    _ => {}
                }
            }
        }
        Ok(status)
    }

    /// A request to the sprite's services (`sprite services ...`): `on` gets the response
    /// body as it arrives (one JSON document, or NDJSON events while a service starts).
    pub async fn services(
        &self,
        name: &str,
        req: &vmm_glue::mgmt::ApiRequest,
        on: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        let b = req
            .body
            .as_ref()
            .map(|v| Bytes::from(v.to_string()))
            .unwrap_or_default();
        let path = format!("/v1/sprites/{name}/services{}", req.path);
        let mut body = self
            .send(req.method, &path, "application/json", b)
            .await?
            .into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| SdkError::Protocol(e.to_string()))?;
            if let Some(d) = frame.data_ref() {
                on(d);
            }
        }
        Ok(())
    }

    /// Runs a command to its end and collects its output.
    pub async fn exec_collect(&self, name: &str, args: &[&str]) -> Result<ExecOutput> {
        let mut out = ExecOutput::default();
        out.status = self
            .exec(name, json!({"args": args}), |e| match e {
                ExecEvent::Stdout(d) => out.stdout.extend(d),
                ExecEvent::Stderr(d) => out.stderr.extend(d),
                _ => {}
            })
            .await?;
        Ok(out)
    }

    /// Sends bytes to a running session's stdin (`close`: then closes it).
    pub async fn send_stdin(
        &self,
        name: &str,
        session: &str,
        data: Vec<u8>,
        close: bool,
    ) -> Result<()> {
        let q = if close { "?close=true" } else { "" };
        self.send(
            "POST",
            &format!("/v1/sprites/{name}/sessions/{session}/stdin{q}"),
            "application/octet-stream",
            data.into(),
        )
        .await
        .map(|_| ())
    }

    pub async fn read_file(&self, name: &str, path: &str) -> Result<Vec<u8>> {
        let resp = self
            .send(
                "GET",
                &format!(
                    "/v1/sprites/{name}/fs/{}",
                    enc_path(path.trim_start_matches('/'))
                ),
                "application/json",
                Bytes::new(),
            )
            .await?;
        Ok(resp
            .into_body()
            .collect()
            .await
            .map_err(|e| SdkError::Protocol(e.to_string()))?
            .to_bytes()
            .to_vec())
    }

    pub async fn write_file(
        &self,
        name: &str,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<()> {
        let mut p = format!(
            "/v1/sprites/{name}/fs/{}",
            enc_path(path.trim_start_matches('/'))
        );
        if let Some(m) = mode {
            p.push_str(&format!("?mode={m:o}"));
        }
        self.send("PUT", &p, "application/octet-stream", data.into())
            .await
            .map(|_| ())
    }

    pub async fn create_checkpoint(&self, name: &str, comment: Option<&str>) -> Result<Checkpoint> {
        Self::typed(
            self.call(
                "POST",
                &format!("/v1/sprites/{name}/checkpoints"),
                Some(json!({"comment": comment})),
            )
            .await?,
        )
    }

    pub async fn list_checkpoints(&self, name: &str) -> Result<Vec<Checkpoint>> {
        let v = self
            .call("GET", &format!("/v1/sprites/{name}/checkpoints"), None)
            .await?;
        v["checkpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| Self::typed(c.clone()))
            .collect()
    }

    pub async fn restore_checkpoint(&self, name: &str, id: &str) -> Result<Value> {
        self.call(
            "POST",
            &format!("/v1/sprites/{name}/checkpoints/{id}/restore"),
            None,
        )
        .await
    }

    pub async fn delete_checkpoint(&self, name: &str, id: &str) -> Result<()> {
        self.call(
            "DELETE",
            &format!("/v1/sprites/{name}/checkpoints/{id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    pub async fn fork(&self, name: &str, checkpoint: &str, new_name: &str) -> Result<Sprite> {
        Self::typed(
            self.call(
                "POST",
                &format!("/v1/sprites/{name}/fork"),
                Some(json!({"checkpoint": checkpoint, "name": new_name})),
            )
            .await?,
        )
    }

    /// Usage of one sprite (`Some`) or of the organization, over [from, to] (unix ms).
    pub async fn usage(
        &self,
        name: Option<&str>,
        from: Option<i64>,
        to: Option<i64>,
    ) -> Result<Value> {
        let mut q = Vec::new();
        if let Some(f) = from {
            q.push(format!("from={f}"));
        }
        if let Some(t) = to {
            q.push(format!("to={t}"));
        }
        let base = match name {
            Some(n) => format!("/v1/sprites/{n}/usage"),
            None => "/v1/usage".to_string(),
        };
        let path = if q.is_empty() {
            base
        } else {
            format!("{base}?{}", q.join("&"))
        };
        self.call("GET", &path, None).await
    }
}
