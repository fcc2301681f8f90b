//! blockd's vhost-user-blk server: every volume is offered to VMs on its own unix socket,
//! `<vhost.dir>/<volume>.sock` (mode 0600), created at start and when a volume is created
//! or cloned, removed when it is deleted and at shutdown. The protocol lives in `vhost-blk`;
//! this module owns sockets, attachments and metrics.
//!
//! A connection attaches its volume [`AttachMode::Exclusive`]: it is refused (closed at once,
//! with a warning in the log naming the holder, and `blockd_vhost_connections_refused_total`)
//! while any other client holds the volume, and while it lives every other attachment (NBD or
//! a second VM) is refused. A forced restore or delete cancels the attachment: the connection
//! is closed, the requests already in the engine finish, then the attachment is released and
//! the operation proceeds. On shutdown every connection is closed the same way before the
//! final flush; a VM whose QEMU uses `reconnect-ms` resumes when blockd is back (see
//! `vhost_blk`'s backend module for why nothing acknowledged is lost).

use crate::engine::{AttachMode, Engine, VolumeEvent};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vhost_blk::{BackendConfig, Listener, Session, SessionOptions, VhostStats};

/// Longest unix socket path (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug)]
pub struct VhostServer {
    engine: Arc<Engine>,
    dir: PathBuf,
    backend: BackendConfig,
    stats: Arc<VhostStats>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Accept loop of each volume with a socket.
    listeners: Mutex<HashMap<String, CancellationToken>>,
}

impl VhostServer {
    /// Creates the socket directory, binds a socket for every existing volume and follows
    /// volume creation and deletion. Call from inside the runtime.
    pub fn start(
        engine: Arc<Engine>,
        dir: &Path,
        backend: BackendConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<VhostServer>> {
        use anyhow::Context;
        backend.validate().map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let server = Arc::new(VhostServer {
            engine: engine.clone(),
            dir: dir.to_path_buf(),
            backend,
            stats: Arc::new(VhostStats::default()),
            runtime: tokio::runtime::Handle::current(),
            shutdown,
            tracker: TaskTracker::new(),
            listeners: Mutex::new(HashMap::new()),
        });
        let weak: Weak<VhostServer> = Arc::downgrade(&server);
        engine.on_volume_event(move |name, event| {
            if let Some(s) = weak.upgrade() {
                match event {
                    VolumeEvent::Created => s.add_volume(name),
                    VolumeEvent::Deleted => s.remove_volume(name),
                }
            }
        });
        for v in engine.snapshotter().list_volumes() {
            server.add_volume(&v.name);
        }
        Ok(server)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> Arc<VhostStats> {
        self.stats.clone()
    }

    pub fn socket_path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.sock"))
    }

    /// Binds the volume's socket and starts accepting VMs on it. Failures are logged: the
    /// volume stays usable over NBD.
    pub fn add_volume(self: &Arc<Self>, name: &str) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let path = self.socket_path(name);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            tracing::warn!(
                volume = name,
                path = %path.display(),
                "socket path too long for a unix socket (max {MAX_SOCKET_PATH} bytes): not served over vhost-user"
            );
            return;
        }
        let listener = match bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(volume = name, path = %path.display(), "cannot bind vhost-user socket: {e:#}");
                return;
            }
        };
        let stop = CancellationToken::new();
        if let Some(old) = self.listeners.lock().insert(name.to_string(), stop.clone()) {
            old.cancel();
        }
        let this = self.clone();
        let name = name.to_string();
        self.tracker.spawn_on(
            async move { this.accept_loop(name, path, listener, stop).await },
            &self.runtime,
        );
    }

    /// Stops accepting VMs for the volume and removes its socket (its attachment, if any,
    /// was cancelled by the forced delete).
    pub fn remove_volume(&self, name: &str) {
        if let Some(stop) = self.listeners.lock().remove(name) {
            stop.cancel();
        }
    }

    /// Waits until every accept loop and connection has ended (after `shutdown` was
    /// cancelled: connections are closed and their requests drained).
    pub async fn wait(&self) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
    }

    async fn accept_loop(
        self: Arc<Self>,
        name: String,
        path: PathBuf,
        listener: Listener,
        stop: CancellationToken,
    ) {
        // SAFETY: the Listener owns its socket's fd; it stays open and is the same fd until
        // the AsyncFd (which owns the Listener) is dropped: Listener never replaces it.
        let registered = unsafe { AsyncFd::register(listener) };
        let mut afd = match registered {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(volume = %name, "cannot watch the vhost-user socket: {e}");
                return;
            }
        };
        tracing::debug!(volume = %name, path = %path.display(), "vhost-user socket ready");
        loop {
            let mut ready = tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.shutdown.cancelled() => break,
                r = afd.readable_mut() => match r {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::error!(volume = %name, "vhost-user socket failed: {e}");
                        break;
                    }
                },
            };
            match vhost_blk::connection_pending(ready.get_inner()) {
                Ok(true) => self.accept_one(&name, ready.get_inner_mut()),
                Ok(false) => ready.clear_ready(),
                Err(e) => {
                    tracing::warn!(volume = %name, "polling the vhost-user socket: {e}");
                    ready.clear_ready();
                }
            }
        }
        // The socket file goes with the listener (a stale file would make QEMU's reconnects
        // fail with ECONNREFUSED instead of ENOENT; both are retried).
        let _ = std::fs::remove_file(&path);
    }

    fn accept_one(&self, name: &str, listener: &mut Listener) {
        let attached = match self.engine.attach_mode(name, AttachMode::Exclusive) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(volume = name, "vhost-user connection refused: {e}");
                self.stats.refused();
                // Accept and drop: the frontend sees the connection close.
                let _ = listener.accept();
                return;
            }
        };
        let detach = attached.session.clone();
        let opts = SessionOptions {
            name: name.to_string(),
            config: self.backend.clone(),
            runtime: self.runtime.clone(),
            stats: self.stats.clone(),
            guard: Box::new(attached.guard),
        };
        let session = match Session::accept(listener, attached.volume, opts) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(volume = name, "vhost-user connection failed: {e}");
                return;
            }
        };
        tracing::info!(volume = name, "VM attached over vhost-user");
        let shutdown = self.shutdown.clone();
        let name = name.to_string();
        self.tracker.spawn_on(
            async move {
                tokio::select! {
                    _ = session.closed() => return,
                    _ = detach.cancelled() => {
                        tracing::info!(volume = %name, "disconnecting the VM (forced restore or delete)");
                    }
                    _ = shutdown.cancelled() => {
                        tracing::info!(volume = %name, "closing the vhost-user connection (shutting down)");
                    }
                }
                session.shutdown();
                session.closed().await;
            },
            &self.runtime,
        );
    }
}

/// Binds a unix socket (mode 0600) as a non-blocking vhost-user listener, replacing a stale
/// socket file but refusing to steal one a live process listens on.
fn bind(path: &Path) -> anyhow::Result<Listener> {
    use anyhow::Context;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by another process", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(Listener::from(l))
}

/// `blockd_vhost_*` metrics (docs/metrics.md), read at scrape time.
#[derive(Debug)]
pub struct VhostCollector {
    pub stats: Arc<VhostStats>,
}

mod collector {
    use super::VhostCollector;
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::MetricType;
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use vhost_blk::RequestKind;

    impl Collector for VhostCollector {
        fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
            let s = self.stats.snapshot();
            let gauge = |e: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
                ConstGauge::new(v).encode(e.encode_descriptor(
                    name,
                    help,
                    None,
                    MetricType::Gauge,
                )?)
            };
            let counter = |e: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
                ConstCounter::new(v).encode(e.encode_descriptor(
                    name,
                    help,
                    None,
                    MetricType::Counter,
                )?)
            };
            gauge(
                &mut e,
                "blockd_vhost_connections",
                "Open vhost-user connections (attached VMs)",
                s.connections_active,
            )?;
            counter(
                &mut e,
                "blockd_vhost_connections_accepted",
                "vhost-user connections accepted",
                s.connections_accepted,
            )?;
            counter(
                &mut e,
                "blockd_vhost_connections_refused",
                "vhost-user connections refused (the volume was attached elsewhere or being restored/deleted)",
                s.connections_refused,
            )?;
            counter(
                &mut e,
                "blockd_vhost_request_errors",
                "vhost-user requests completed with a status other than OK (rejected ones included)",
                s.request_errors,
            )?;
            gauge(
                &mut e,
                "blockd_vhost_in_flight_requests",
                "vhost-user requests popped from a virtqueue and not yet completed",
                s.in_flight,
            )?;
            let mut fam = e.encode_descriptor(
                "blockd_vhost_requests",
                "vhost-user requests by kind (rejected: malformed or unsupported)",
                None,
                MetricType::Counter,
            )?;
            for (kind, n) in RequestKind::ALL.iter().zip(s.requests) {
                ConstCounter::new(n).encode(fam.encode_family(&[("kind", kind.as_str())])?)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::engine::EngineConfig;
    use std::time::{Duration, Instant};
    use vhost_blk::client::{Client, ClientConfig};

    fn ccfg() -> ClientConfig {
        ClientConfig {
            num_queues: 2,
            queue_size: 64,
            slots: 16,
            slot_bytes: 128 << 10,
            scratch_bytes: 4096,
            event_idx: true,
        }
    }

    struct Env {
        _dir: tempfile::TempDir,
        engine: Arc<Engine>,
        server: Arc<VhostServer>,
        shutdown: CancellationToken,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = EngineConfig::new(&dir.path().join("data"));
        cfg.detach_timeout = Duration::from_secs(10);
        let engine = Engine::open(cfg).unwrap();
        let shutdown = CancellationToken::new();
        let server = VhostServer::start(
            engine.clone(),
            &dir.path().join("vhost"),
            BackendConfig::default(),
            shutdown.clone(),
        )
        .unwrap();
        Env {
            _dir: dir,
            engine,
            server,
            shutdown,
        }
    }

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockets_follow_volumes_and_serve_io() {
        let env = env();
        env.engine.create_volume("vm1", 64 << 20).unwrap();
        let sock = env.server.socket_path("vm1");
        assert!(sock.exists(), "socket created with the volume");
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let s = sock.clone();
        let (id, back) = blocking(move || {
            let mut c = Client::connect(&s, &ccfg()).unwrap();
            assert_eq!(c.config().blk_size, 4096);
            assert_eq!(c.config().capacity_sectors, (64 << 20) / 512);
            let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 + 1).collect();
            c.write(1 << 20, &data).unwrap();
            c.flush().unwrap();
            let back = c.read(1 << 20, 65536).unwrap();
            assert_eq!(back, data);
            (c.get_id().unwrap(), back)
        })
        .await;
        assert_eq!(id, "vm1");
        // The VM's writes are the volume's: visible to the engine after it disconnected.
        wait_until("detach", || env.engine.attached_clients("vm1") == 0).await;
        let v = env.engine.volume("vm1").unwrap();
        use vhost_blk::BlockDevice;
        let direct = v.read(1 << 20, 65536).await.unwrap();
        assert_eq!(direct.as_ref(), &back[..]);

        // Clone: a socket for the new volume; delete: the socket goes.
        let cp = env.engine.create_checkpoint("vm1", "").await.unwrap();
        env.engine
            .clone_volume("vm1", cp.value.id, "vm1-fork")
            .await
            .unwrap();
        assert!(env.server.socket_path("vm1-fork").exists());
        env.engine.delete_volume("vm1-fork", false).await.unwrap();
        wait_until("socket removal", || {
            !env.server.socket_path("vm1-fork").exists()
        })
        .await;

        env.shutdown.cancel();
        env.server.wait().await;
        assert!(!sock.exists(), "sockets removed at shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_attachment_is_exclusive() {
        let env = env();
        env.engine.create_volume("vm2", 16 << 20).unwrap();
        let sock = env.server.socket_path("vm2");

        // A VM attached: NBD and a second VM are refused.
        let s = sock.clone();
        let mut vm = blocking(move || Client::connect(&s, &ccfg()).unwrap()).await;
        wait_until("attach", || env.engine.attached_clients("vm2") == 1).await;
        let e = env.engine.attach("vm2").unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::Busy);
        assert!(e.to_string().contains("VM over vhost-user"), "{e}");
        let s = sock.clone();
        let second = blocking(move || Client::connect(&s, &ccfg())).await;
        assert!(second.is_err(), "a second VM must be refused");
        assert_eq!(env.server.stats().snapshot().connections_refused, 1);
        // The first VM is unaffected.
        vm = blocking(move || {
            vm.write(0, &[7u8; 4096]).unwrap();
            vm
        })
        .await;
        drop(vm);
        wait_until("detach", || env.engine.attached_clients("vm2") == 0).await;

        // NBD attached: a VM is refused; NBD connections share.
        let nbd1 = env.engine.attach("vm2").unwrap();
        let nbd2 = env.engine.attach("vm2").unwrap();
        let s = sock.clone();
        assert!(
            blocking(move || Client::connect(&s, &ccfg()))
                .await
                .is_err()
        );
        assert_eq!(env.server.stats().snapshot().connections_refused, 2);
        let e = env
            .engine
            .attach_mode("vm2", AttachMode::Exclusive)
            .unwrap_err();
        assert!(e.to_string().contains("2 NBD connection(s)"), "{e}");
        drop((nbd1, nbd2));
        let s = sock.clone();
        let vm = blocking(move || {
            let mut c = Client::connect(&s, &ccfg()).unwrap();
            assert_eq!(c.read(0, 4096).unwrap(), vec![7u8; 4096]);
            c
        })
        .await;
        drop(vm);
        env.shutdown.cancel();
        env.server.wait().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forced_restore_disconnects_the_vm() {
        let env = env();
        env.engine.create_volume("vm3", 16 << 20).unwrap();
        let sock = env.server.socket_path("vm3");
        let s = sock.clone();
        let vm = blocking(move || {
            let mut c = Client::connect(&s, &ccfg()).unwrap();
            c.write(0, &[1u8; 8192]).unwrap();
            c
        })
        .await;
        let cp = env.engine.create_checkpoint("vm3", "").await.unwrap();
        let vm = blocking(move || {
            let mut vm = vm;
            vm.write(0, &[2u8; 8192]).unwrap();
            vm
        })
        .await;
        let e = env
            .engine
            .restore_checkpoint("vm3", cp.value.id, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::Busy);
        env.engine
            .restore_checkpoint("vm3", cp.value.id, true)
            .await
            .unwrap();
        assert_eq!(env.server.stats().snapshot().connections_active, 0);
        // The old connection is dead: its requests never complete.
        let r = blocking(move || {
            let mut vm = vm;
            let q = vm.queue(0);
            let head = q
                .submit(
                    &vhost_blk::client::BlkRequest::Read {
                        sector: 0,
                        len: 4096,
                    },
                    0,
                    true,
                )
                .unwrap();
            q.wait_head(head, Duration::from_millis(500)).map(|_| ())
        })
        .await;
        assert!(r.is_err());
        // A new connection sees the restored content.
        let s = sock.clone();
        let back =
            blocking(move || Client::connect(&s, &ccfg()).unwrap().read(0, 8192).unwrap()).await;
        assert_eq!(back, vec![1u8; 8192]);
        env.shutdown.cancel();
        env.server.wait().await;
    }

    #[test]
    fn config_keys() {
        let cfg: crate::config::Config = toml::from_str(
            "data_dir = \"/tmp/x\"\n[vhost]\nenabled = false\ndir = \"/run/v\"\nnum_queues = 4\nlogical_block_size = 512\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        assert!(!cfg.vhost.enabled);
        assert_eq!(cfg.vhost_dir(), PathBuf::from("/run/v"));
        assert_eq!(cfg.vhost_backend().num_queues, 4);
        let cfg: crate::config::Config = toml::from_str("data_dir = \"/tmp/x\"").unwrap();
        assert_eq!(cfg.vhost_dir(), PathBuf::from("/tmp/x/vhost"));
        assert!(cfg.vhost.enabled);
        for bad in [
            "[vhost]\nnum_queues = 0",
            "[vhost]\nnum_queues = 65",
            "[vhost]\nlogical_block_size = 1024",
        ] {
            let cfg: crate::config::Config = toml::from_str(bad).unwrap();
            assert!(cfg.validate().unwrap_err().contains("vhost"), "{bad}");
        }
    }
}
