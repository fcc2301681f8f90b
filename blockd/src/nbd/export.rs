//! What the NBD server needs from the daemon: a catalogue of exports and a way to attach one
//! for the lifetime of a connection.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use vhost_blk::BlockDevice;

/// The exports the server offers. The daemon implements this over its volumes.
pub trait Exports: Send + Sync + 'static {
    type Device: BlockDevice;

    /// Opens export `name` for one connection.
    ///
    /// Called for `NBD_OPT_GO` and `NBD_OPT_EXPORT_NAME` (the attachment then lives as long
    /// as the connection) and for `NBD_OPT_INFO` (the attachment is dropped as soon as the
    /// export's size and flags have been sent). Never called with an empty name: the server
    /// has no default export and answers those itself.
    ///
    /// The returned attachment's `shutdown` token is cancelled by the daemon when the export
    /// must be closed under the client (a forced restore, a volume delete); the server then
    /// stops reading requests, lets in-flight ones finish (bounded by
    /// [`ServerConfig::shutdown_grace`](super::ServerConfig::shutdown_grace)) and closes the
    /// socket. `guard` is dropped when the connection ends, after every request that used
    /// the device has finished or been abandoned.
    fn attach(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Attachment<Self::Device>, AttachError>> + Send;

    /// Names for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<String>;

    /// Whether `name` exists, for the metadata-context options (which name an export without
    /// opening it). The default scans [`Exports::list`].
    fn exists(&self, name: &str) -> bool {
        self.list().iter().any(|n| n == name)
    }
}

/// One connection's hold on an export.
pub struct Attachment<D> {
    pub device: Arc<D>,
    /// Cancelled by the daemon to close the connection under the client.
    pub shutdown: CancellationToken,
    /// Dropped when the connection ends (e.g. releases an exclusive-open lock).
    pub guard: Box<dyn Any + Send + Sync>,
}

impl<D> Attachment<D> {
    /// An attachment with a fresh token and no guard.
    pub fn new(device: Arc<D>) -> Attachment<D> {
        Attachment {
            device,
            shutdown: CancellationToken::new(),
            guard: Box::new(()),
        }
    }
}

impl<D: BlockDevice> fmt::Debug for Attachment<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("device", &self.device.id())
            .field("shutdown", &self.shutdown.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// Why an export cannot be attached. Each variant maps to one option reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// No export by that name (`NBD_REP_ERR_UNKNOWN`).
    #[error("unknown export {0:?}")]
    Unknown(String),
    /// The export exists but may not be opened now, e.g. it is attached exclusively
    /// elsewhere (`NBD_REP_ERR_POLICY`, with the message).
    #[error("export is busy: {0}")]
    Busy(String),
    /// The daemon is shutting down (`NBD_REP_ERR_SHUTDOWN`).
    #[error("server is shutting down")]
    ShuttingDown,
    /// Opening failed, e.g. an I/O error (`NBD_REP_ERR_UNKNOWN`: "not available", with the
    /// message).
    #[error("export unavailable: {0}")]
    Unavailable(String),
}
