//! `blockd serve`: the daemon's process. Opens the engine, binds the admin socket, the NBD
//! socket(s) and the metrics endpoint, runs background work, and shuts down cleanly on
//! SIGINT/SIGTERM (flushing everything). A `kill -9` at any moment is also safe: restart
//! recovers every acknowledged-and-flushed write (see docs/storage-model.md).

use crate::admin::{self, Status};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::ErrorCode;
use crate::metrics::StateCollector;
use crate::nbd::{AttachError, Attachment, Exports, NbdServer};
use crate::vhost::{VhostCollector, VhostServer};
use crate::volume::Volume;
use anyhow::{Context, bail};
use prometheus_client::registry::Registry;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The engine's volumes as NBD exports (export name = volume name).
#[derive(Debug)]
pub struct EngineExports {
    pub engine: Arc<Engine>,
}

impl Exports for EngineExports {
    type Device = Volume;

    async fn attach(&self, name: &str) -> Result<Attachment<Volume>, AttachError> {
        // Open on demand: a volume only the object store has is imported first.
        if self.engine.snapshotter().stat(name).is_err()
            && matches!(self.engine.remote_volume_exists(name).await, Ok(true))
        {
            match self.engine.import_volume(name, None, false).await {
                Ok(r) => tracing::info!(volume = name, ms = r.duration_ms, "imported on demand"),
                Err(e) => return Err(AttachError::Unavailable(e.to_string())),
            }
        }
        match self.engine.attach(name) {
            Ok(a) => Ok(Attachment {
                device: a.volume,
                shutdown: a.session,
                guard: Box::new(a.guard),
            }),
            Err(e) => Err(match e.code() {
                ErrorCode::NotFound => AttachError::Unknown(name.to_string()),
                ErrorCode::Busy => AttachError::Busy(e.to_string()),
                _ => AttachError::Unavailable(e.to_string()),
            }),
        }
    }

    fn list(&self) -> Vec<String> {
        self.engine
            .snapshotter()
            .list_volumes()
            .into_iter()
            .map(|v| v.name)
            .collect()
    }

    fn exists(&self, name: &str) -> bool {
        self.engine.snapshotter().stat(name).is_ok()
    }
}

/// Binds a unix socket with mode 0600, replacing a stale socket file but refusing to steal
/// one a live process still listens on.
async fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("{} is in use: another blockd is running", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

/// Takes an exclusive lock on the data directory for the life of the process.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))?;
    let path = dir.join("blockd.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a valid, owned fd.
    let r = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if r != 0 {
        bail!(
            "data directory {} is in use by another blockd ({})",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(f)
}

pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    // Everything the daemon creates is for its own user only: segment files, RocksDB's
    // files, chunk objects of a `file://` store outside the data directory, the vhost
    // directory, and sockets from the moment they are bound (before their chmod).
    // SAFETY: umask(2) cannot fail; being process-wide is the point.
    unsafe { libc::umask(0o077) };
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let engine = Engine::open(cfg.engine_config().map_err(anyhow::Error::msg)?)
        .context("opening the engine")?;
    // Volumes of this host take their leases back (a daemon that lost one refuses writes).
    engine.reclaim_leases().await;
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    let mut nbd_config = crate::nbd::ServerConfig::default();
    if let Some(n) = cfg.nbd.max_connections {
        nbd_config.max_connections = n;
    }
    let nbd = NbdServer::with_config(
        Arc::new(EngineExports {
            engine: engine.clone(),
        }),
        nbd_config,
    );
    let nbd_path = cfg.nbd_socket();
    let nbd_listener = bind_unix(&nbd_path).await?;
    {
        let nbd = nbd.clone();
        let s = shutdown.clone();
        tasks.spawn(async move { nbd.serve_unix(nbd_listener, s).await });
    }
    if let Some(addr) = cfg.nbd.tcp {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "NBD over TCP on a non-loopback address: NBD has no authentication or TLS here; expose it to trusted networks only");
        }
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding NBD TCP {addr}"))?;
        let nbd = nbd.clone();
        let s = shutdown.clone();
        tasks.spawn(async move { nbd.serve_tcp(l, s).await });
    }

    // vhost-user-blk: a socket per volume (docs/blockd.md, "vhost-user-blk").
    let vhost = if cfg.vhost.enabled {
        let v = VhostServer::start(
            engine.clone(),
            &cfg.vhost_dir(),
            cfg.vhost_backend(),
            shutdown.clone(),
        )
        .context("starting the vhost-user-blk server")?;
        let w = v.clone();
        tasks.spawn(async move { w.wait().await });
        Some(v)
    } else {
        None
    };

    let mut registry = Registry::default();
    engine.core.metrics.register(&mut registry);
    engine.core.defrag.register(&mut registry);
    if let Some(v) = &vhost {
        registry.register_collector(Box::new(VhostCollector { stats: v.stats() }));
    }
    registry.register_collector(Box::new(StateCollector {
        engine: Arc::downgrade(&engine),
        nbd: nbd.stats(),
    }));
    let registry = Arc::new(registry);
    let metrics_addr = cfg.metrics_addr().map_err(anyhow::Error::msg)?;
    let mut metrics_bound = None;
    if let Some(addr) = metrics_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics {addr}"))?;
        metrics_bound = Some(l.local_addr()?);
        let registry = registry.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    use axum::response::IntoResponse;
                    let mut out = String::new();
                    match prometheus_client::encoding::text::encode(&mut out, &registry) {
                        Ok(()) => (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            out,
                        )
                            .into_response(),
                        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }
            }),
        );
        let s = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(l, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
            {
                tracing::error!("metrics server failed: {e}");
            }
        });
    }

    let admin_path = cfg.admin_socket();
    let status_engine = Arc::downgrade(&engine);
    let data_dir = cfg.data_dir.display().to_string();
    let nbd_socket = Some(nbd_path.display().to_string());
    let nbd_tcp = cfg.nbd.tcp.map(|a| a.to_string());
    let metrics = metrics_bound.map(|a| format!("http://{a}/metrics"));
    let vhost_dir = vhost.as_ref().map(|v| v.dir().display().to_string());
    let status = Arc::new(move || {
        let has_store = status_engine
            .upgrade()
            .is_some_and(|e| e.has_object_store());
        let (volumes, local_bytes, direct_io) = match status_engine.upgrade() {
            Some(e) => (
                e.snapshotter().list_volumes().len(),
                e.core.local.allocated_bytes(),
                e.core.local.direct_io(),
            ),
            None => (0, 0, false),
        };
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            data_dir: data_dir.clone(),
            nbd_socket: nbd_socket.clone(),
            nbd_tcp: nbd_tcp.clone(),
            metrics: metrics.clone(),
            volumes,
            local_bytes,
            direct_io,
            vhost_dir: vhost_dir.clone(),
            object_store: has_store,
        }
    });
    let admin_listener = bind_unix(&admin_path).await?;
    {
        let app = admin::router(engine.clone(), status);
        let s = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(admin_listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
            {
                tracing::error!("admin server failed: {e}");
            }
        });
    }
    {
        let engine = engine.clone();
        let s = shutdown.clone();
        tasks.spawn(async move { engine.run_background(s).await });
    }
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        admin = %admin_path.display(),
        nbd = %nbd_path.display(),
        vhost = ?vhost.as_ref().map(|v| v.dir().display().to_string()),
        metrics = ?metrics_bound,
        "blockd ready"
    );

    wait_for_signal().await?;
    tracing::info!("shutting down");
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    engine.shutdown().await.context("final flush")?;
    for p in [&admin_path, &nbd_path] {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Default paths, for the CLI's `--admin-socket` default.
pub fn default_admin_socket() -> PathBuf {
    Config::default().admin_socket()
}
