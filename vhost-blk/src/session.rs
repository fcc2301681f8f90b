//! One vhost-user connection serving one device: accepts the frontend on a listener, runs the
//! protocol (`vhost-user-backend`'s daemon thread plus one vring worker per queue) and tears
//! everything down in an order that keeps the frontend's view consistent (see
//! [`crate::backend`]): stop touching guest memory, close the socket, stop the workers, let
//! the requests already in the device finish, and only then release the caller's guard
//! (blockd's attachment, so a forced restore never races a late write).

use crate::backend::{AtomicMem, BlkBackend, Mem, Shared};
use crate::config::BackendConfig;
use crate::device::BlockDevice;
use crate::stats::VhostStats;
use std::any::Any;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Whether `listener` has a connection waiting to be accepted (never blocks). An event loop
/// watching a non-blocking listener calls [`Session::accept`] only when this is true, so the
/// accept never spins on `EAGAIN`.
pub fn connection_pending(listener: &Listener) -> std::io::Result<bool> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )?;
    let mut events = [EpollEvent::default()];
    Ok(epoll.wait(0, &mut events)? > 0)
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid backend configuration: {0}")]
    Config(String),
    #[error("vhost-user: {0}")]
    Vhost(String),
    #[error("cannot start the connection's threads or events: {0}")]
    Thread(std::io::Error),
}

/// Everything a connection needs besides the listener and the device.
pub struct SessionOptions {
    /// Used in thread names and logs (blockd: the volume name).
    pub name: String,
    pub config: BackendConfig,
    /// Requests run here.
    pub runtime: tokio::runtime::Handle,
    pub stats: Arc<VhostStats>,
    /// Dropped when the connection has ended and every request has finished.
    pub guard: Box<dyn Any + Send>,
}

impl std::fmt::Debug for SessionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionOptions")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

trait Quiesce: Send + Sync {
    fn mark_dead(&self);
}

impl<D: BlockDevice> Quiesce for Shared<D> {
    fn mark_dead(&self) {
        Shared::mark_dead(self)
    }
}

/// A live vhost-user connection. Dropping it does not close the connection: call
/// [`Session::shutdown`].
pub struct Session {
    shared: Arc<dyn Quiesce>,
    shutdown: ShutdownHandle,
    done: tokio::sync::watch::Receiver<bool>,
    name: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.name)
            .field("closed", &*self.done.borrow())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Accepts one frontend from `listener` (blocking until one connects, unless the
    /// listener is non-blocking and a connection is pending) and serves `device` on it until
    /// the frontend disconnects or [`Session::shutdown`] is called.
    pub fn accept<D: BlockDevice>(
        listener: &mut Listener,
        device: Arc<D>,
        opts: SessionOptions,
    ) -> Result<Session, SessionError> {
        opts.config.validate().map_err(SessionError::Config)?;
        let mem: AtomicMem = AtomicMem::new(Mem::new());
        let shared = Arc::new(
            Shared::new(
                &opts.name,
                device,
                opts.config.clone(),
                mem.clone(),
                opts.runtime,
                opts.stats.clone(),
            )
            .map_err(SessionError::Thread)?,
        );
        let backend = BlkBackend {
            shared: shared.clone(),
        };
        let thread_name: String = format!("vu-{}", opts.name).chars().take(15).collect();
        let mut daemon = VhostUserDaemon::new(thread_name.clone(), backend, mem)
            .map_err(|e| SessionError::Vhost(e.to_string()))?;
        // Each queue's worker also waits for its requests' completions and wake-ups.
        for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            for (fd, data) in shared.queue_fds(q) {
                handler
                    .register_listener(fd, EventSet::IN, data)
                    .map_err(|e| SessionError::Vhost(format!("queue {q} events: {e}")))?;
            }
        }
        daemon
            .start(listener)
            .map_err(|e| SessionError::Vhost(e.to_string()))?;
        let shutdown = daemon
            .shutdown_handle()
            .ok_or_else(|| SessionError::Vhost("no connection after accept".into()))?;
        let (tx, done) = tokio::sync::watch::channel(false);
        let stats = opts.stats.clone();
        let guard = opts.guard;
        let drain = opts.config.drain_timeout;
        let name = opts.name.clone();
        let thread_shared = shared.clone();
        stats.connected();
        let spawned = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let r = daemon.wait();
                match &r {
                    Ok(()) => tracing::info!(device = %name, "vhost-user frontend disconnected"),
                    Err(e) => tracing::info!(device = %name, "vhost-user connection ended: {e}"),
                }
                thread_shared.mark_dead();
                // Stops and joins the vring workers (exit events): no request starts after.
                drop(daemon);
                // What they still ran goes on as runtime tasks.
                thread_shared.hand_off();
                if !thread_shared.wait_idle(drain) {
                    tracing::error!(device = %name, "requests still in flight {drain:?} after the connection closed; releasing it anyway");
                }
                stats.disconnected();
                drop(guard);
                let _ = tx.send(true);
            });
        if let Err(e) = spawned {
            shutdown.shutdown();
            opts.stats.disconnected();
            return Err(SessionError::Thread(e));
        }
        Ok(Session {
            shared,
            shutdown,
            done,
            name: opts.name,
        })
    }

    /// Closes the connection: from now on no request touches guest memory or completes
    /// (the frontend will resubmit what it has not seen complete when it reconnects);
    /// requests already in the device finish before the guard is released.
    pub fn shutdown(&self) {
        self.shared.mark_dead();
        self.shutdown.shutdown();
    }

    /// Resolves once the connection has ended and its guard was released.
    pub async fn closed(&self) {
        let mut rx = self.done.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.done.borrow()
    }
}
