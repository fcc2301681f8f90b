//! Listeners and the life of one connection: handshake, transmission, release of the export.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};
use vhost_blk::BlockDevice;

use super::export::{Attachment, Exports};
use super::handshake::{self, HandshakeError, Negotiated, Outcome};
use super::proto::MAX_BLOCK_SIZE;
use super::stats::NbdStats;
use super::transmission::{self, End, Limits, Params};

/// Tunables of the NBD server. The defaults suit a laptop and a production host alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Requests one connection may have in flight; beyond it the server stops reading that
    /// connection's requests until one completes. At least 1.
    pub max_in_flight_requests: usize,
    /// Payload bytes (write data plus read replies) one connection may hold in memory. A
    /// value below the 32 MiB maximum request size is raised to it.
    pub max_in_flight_bytes: usize,
    /// Time a client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// Connections served at once per listener; at the limit the listener stops accepting
    /// (clients wait in the socket's backlog) until one closes. At least 1. Together with
    /// the per-connection limits this bounds the memory NBD clients can make the daemon
    /// hold.
    pub max_connections: usize,
    /// After a shutdown (the server's token or an export's), how long in-flight requests
    /// may take to finish, and then how long queued replies may take to be sent, before
    /// they are abandoned and the socket is closed.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight_requests: 128,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    fn normalized(mut self) -> Self {
        self.max_in_flight_requests = self.max_in_flight_requests.max(1);
        self.max_connections = self.max_connections.max(1);
        self.max_in_flight_bytes = self.max_in_flight_bytes.max(MAX_BLOCK_SIZE as usize);
        self
    }
}

/// An NBD server over a set of [`Exports`]. Cheap to clone; clones share stats.
pub struct NbdServer<E> {
    inner: Arc<Inner<E>>,
}

struct Inner<E> {
    exports: Arc<E>,
    config: ServerConfig,
    stats: Arc<NbdStats>,
    next_connection: AtomicU64,
}

impl<E> Clone for NbdServer<E> {
    fn clone(&self) -> Self {
        NbdServer {
            inner: self.inner.clone(),
        }
    }
}

impl<E> fmt::Debug for NbdServer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("config", &self.inner.config)
            .field("stats", &self.inner.stats.snapshot())
            .finish_non_exhaustive()
    }
}

/// Sources of connections.
trait Listener: Send + Sync {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_stream(&self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    async fn accept_stream(&self) -> io::Result<(UnixStream, String)> {
        let (s, _) = self.accept().await?;
        Ok((s, "unix".to_string()))
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    async fn accept_stream(&self) -> io::Result<(TcpStream, String)> {
        let (s, addr) = self.accept().await?;
        // The spec asks both sides to disable Nagle: replies are small and latency-bound.
        if let Err(e) = s.set_nodelay(true) {
            debug!("TCP_NODELAY: {e}");
        }
        Ok((s, addr.to_string()))
    }
}

/// Decrements the active-connection gauge however the connection task ends.
struct ActiveConnection(Arc<NbdStats>);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

impl<E: Exports> NbdServer<E> {
    pub fn new(exports: Arc<E>) -> Self {
        Self::with_config(exports, ServerConfig::default())
    }

    pub fn with_config(exports: Arc<E>, config: ServerConfig) -> Self {
        NbdServer {
            inner: Arc::new(Inner {
                exports,
                config: config.normalized(),
                stats: Arc::new(NbdStats::default()),
                next_connection: AtomicU64::new(1),
            }),
        }
    }

    /// The server's counters, shared by every connection.
    pub fn stats(&self) -> Arc<NbdStats> {
        self.inner.stats.clone()
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Accepts connections on a Unix socket until `shutdown` is cancelled, then closes every
    /// connection (in-flight requests get [`ServerConfig::shutdown_grace`]) and returns.
    pub async fn serve_unix(&self, listener: UnixListener, shutdown: CancellationToken) {
        self.serve(listener, shutdown).await
    }

    /// Like [`NbdServer::serve_unix`], on TCP (with `TCP_NODELAY`).
    pub async fn serve_tcp(&self, listener: TcpListener, shutdown: CancellationToken) {
        self.serve(listener, shutdown).await
    }

    async fn serve<L: Listener>(&self, listener: L, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(
            self.inner.config.max_connections,
        ));
        loop {
            // A free connection slot first: at the limit, new clients wait in the backlog.
            let slot = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => break, // never closed
                },
            };
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                r = listener.accept_stream() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let server = self.clone();
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        server.serve_connection_from(stream, &peer, shutdown).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Typically EMFILE/ENFILE: back off instead of spinning.
                    warn!("accepting an NBD connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        connections.close();
        debug!(
            connections = connections.len(),
            "NBD listener stopped; waiting for connections"
        );
        connections.wait().await;
    }

    /// Serves one already-accepted connection (any byte stream) to its end. `shutdown` plays
    /// the role of the server's token.
    pub async fn serve_connection<S>(&self, stream: S, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_connection_from(stream, "stream", shutdown).await
    }

    async fn serve_connection_from<S>(&self, stream: S, peer: &str, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let id = self.inner.next_connection.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("nbd", conn = id, peer);
        self.connection(stream, shutdown).instrument(span).await
    }

    async fn connection<S>(&self, mut stream: S, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let stats = &self.inner.stats;
        let config = &self.inner.config;
        stats.connection_opened();
        let _active = ActiveConnection(stats.clone());
        debug!("connection accepted");

        let negotiated = tokio::time::timeout(
            config.handshake_timeout,
            handshake::negotiate(&mut stream, &*self.inner.exports, &shutdown),
        )
        .await;
        let n: Negotiated<E::Device> = match negotiated {
            Ok(Ok(Outcome::Transmission(n))) => n,
            Ok(Ok(Outcome::Aborted)) => {
                debug!("client ended the handshake with NBD_OPT_ABORT");
                return;
            }
            Ok(Err(e)) => {
                stats.handshake_failed();
                match &e {
                    HandshakeError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
                        debug!("client closed the connection during the handshake")
                    }
                    HandshakeError::Protocol(_) | HandshakeError::OptionTooLarge { .. } => {
                        stats.protocol_error();
                        warn!("handshake failed: {e}");
                    }
                    _ => info!("handshake failed: {e}"),
                }
                return;
            }
            Err(_) => {
                stats.handshake_failed();
                info!(
                    "handshake not completed within {:?}; closing",
                    config.handshake_timeout
                );
                return;
            }
        };

        let Negotiated {
            export_name,
            attachment,
            structured_replies,
            base_allocation,
            size_bytes,
            transmission_flags,
        } = n;
        let Attachment {
            device,
            shutdown: export_shutdown,
            guard,
        } = attachment;
        info!(
            export = %export_name,
            size_bytes,
            flags = format_args!("{transmission_flags:#x}"),
            structured_replies,
            base_allocation = base_allocation.is_some(),
            "transmission started"
        );
        let params = Params {
            size_bytes,
            read_only: device.read_only(),
            structured: structured_replies,
            base_allocation,
        };
        let limits = Limits {
            max_in_flight_requests: config.max_in_flight_requests,
            max_in_flight_bytes: config.max_in_flight_bytes,
            shutdown_grace: config.shutdown_grace,
        };
        let end = transmission::run(
            stream,
            device,
            params,
            &limits,
            stats.clone(),
            &shutdown,
            &export_shutdown,
        )
        .await;
        match &end {
            End::Disconnect => info!(export = %export_name, "client disconnected"),
            End::ClientClosed => info!(export = %export_name, "client closed the connection"),
            End::Shutdown => info!(export = %export_name, "connection closed by shutdown"),
            End::Protocol(msg) => {
                stats.protocol_error();
                warn!(export = %export_name, "protocol violation, connection closed: {msg}");
            }
            End::Io(e) => info!(export = %export_name, "connection failed: {e}"),
            End::Internal(msg) => warn!(export = %export_name, "connection closed: {msg}"),
        }
        // Only now, with every request finished or abandoned, is the export released.
        drop(guard);
    }
}

/// Serves `exports` on a Unix socket with the default configuration until `shutdown` is
/// cancelled. Use [`NbdServer`] to tune limits or read the stats.
pub async fn serve_unix<E: Exports>(
    listener: UnixListener,
    exports: Arc<E>,
    shutdown: CancellationToken,
) {
    NbdServer::new(exports).serve_unix(listener, shutdown).await
}

/// Serves `exports` on TCP with the default configuration until `shutdown` is cancelled.
pub async fn serve_tcp<E: Exports>(
    listener: TcpListener,
    exports: Arc<E>,
    shutdown: CancellationToken,
) {
    NbdServer::new(exports).serve_tcp(listener, shutdown).await
}
