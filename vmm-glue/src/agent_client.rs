//! Host side of the guest runtime protocol: one connection per running VM (QEMU's end of
//! the virtio-serial port is a unix socket), multiplexing requests by id.

use crate::proto::{self, Event, Op, Reply, Request};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error, Clone)]
pub enum AgentError {
    #[error("the guest runtime did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection to the guest runtime is closed")]
    Closed,
    #[error("{0}")]
    Guest(GuestError),
    #[error("unexpected reply from the guest runtime: {0}")]
    Protocol(String),
}

/// An error the guest runtime answered with (derefs to its message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestError {
    pub message: String,
    /// `proto::ERR_*` where the runtime classifies the failure.
    pub code: Option<String>,
}

impl GuestError {
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

impl std::ops::Deref for GuestError {
    type Target = str;
    fn deref(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for GuestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

type Waiters = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>>;

#[derive(Debug, Clone)]
pub struct AgentConn {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    waiters: Waiters,
    next_id: AtomicU64,
    closed: tokio_util::sync::CancellationToken,
}

/// Events of one long-lived request; unregistered when dropped.
#[derive(Debug)]
pub struct EventStream {
    pub id: u64,
    rx: mpsc::UnboundedReceiver<Event>,
    conn: AgentConn,
}

impl EventStream {
    /// Next event; `None` when the connection closed.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.conn.inner.waiters.lock().remove(&self.id);
    }
}

impl AgentConn {
    /// Connects to QEMU's end of the port (the socket appears when QEMU starts).
    pub async fn connect(path: &Path, timeout: Duration) -> std::io::Result<AgentConn> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match tokio::net::UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        Ok(Self::from_stream(stream))
    }

    pub fn from_stream(stream: tokio::net::UnixStream) -> AgentConn {
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let waiters: Waiters = Arc::default();
        let closed = tokio_util::sync::CancellationToken::new();
        let c = closed.clone();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
            c.cancel();
        });
        let w = waiters.clone();
        let c = closed.clone();
        tokio::spawn(async move {
            loop {
                let mut len = [0u8; 4];
                if rd.read_exact(&mut len).await.is_err() {
                    break;
                }
                let n = u32::from_be_bytes(len) as usize;
                if n > proto::MAX_FRAME {
                    tracing::warn!(n, "guest runtime sent an oversized frame; closing");
                    break;
                }
                let mut body = vec![0u8; n];
                if rd.read_exact(&mut body).await.is_err() {
                    break;
                }
                match proto::decode::<Reply>(&body) {
                    Ok(r) => {
                        let tx = w.lock().get(&r.id).cloned();
                        match tx {
                            Some(tx) => {
                                let _ = tx.send(r.ev);
                            }
                            None => {
                                if let Event::Error { message, .. } = &r.ev {
                                    tracing::debug!(id = r.id, %message, "guest runtime error for a finished request");
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(%e, "malformed message from the guest runtime"),
                }
            }
            c.cancel();
            w.lock().clear();
        });
        AgentConn {
            inner: Arc::new(Inner {
                tx,
                waiters,
                next_id: AtomicU64::new(1),
                closed,
            }),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Sends a request whose events the caller follows.
    pub fn open(&self, op: Op) -> Result<EventStream, AgentError> {
        if self.is_closed() {
            return Err(AgentError::Closed);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.waiters.lock().insert(id, tx);
        self.inner
            .tx
            .send(proto::encode(&Request { id, op }))
            .map_err(|_| AgentError::Closed)?;
        Ok(EventStream {
            id,
            rx,
            conn: self.clone(),
        })
    }

    /// Sends a request that has no reply (stdin, TCP data, close).
    pub fn notify(&self, op: Op) -> Result<(), AgentError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .tx
            .send(proto::encode(&Request { id, op }))
            .map_err(|_| AgentError::Closed)
    }

    /// A request with one reply: the `ok` value or the guest's error.
    pub async fn call(&self, op: Op, timeout: Duration) -> Result<serde_json::Value, AgentError> {
        let mut s = self.open(op)?;
        match tokio::time::timeout(timeout, s.next()).await {
            Err(_) => Err(AgentError::Timeout(timeout)),
            Ok(None) => Err(AgentError::Closed),
            Ok(Some(Event::Ok { value })) => Ok(value),
            Ok(Some(Event::Error { message, code })) => {
                Err(AgentError::Guest(GuestError { message, code }))
            }
            Ok(Some(other)) => Err(AgentError::Protocol(format!("{other:?}"))),
        }
    }

    /// Pings until the runtime answers (it starts some time after the VM).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<serde_json::Value, AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout(timeout));
            }
            match self
                .call(Op::Ping, left.min(Duration::from_millis(500)))
                .await
            {
                Ok(v) => return Ok(v),
                Err(AgentError::Timeout(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
