//! Block-device front ends. [`BlockDevice`] is the contract between a disk implementation
//! (blockd's `Volume`, the in-memory [`MemDevice`]) and the protocols that serve it
//! (vhost-user-blk here, NBD in blockd). This crate knows nothing about how volumes store
//! data, nor about volumes, attachments or sockets: the daemon owns those.
//!
//! # Contents
//!
//! - [`device`](BlockDevice): the trait, [`DeviceError`], [`MemDevice`].
//! - [`request`]: pure, panic-free virtio-blk request parsing (the fuzzing surface) and the
//!   one `DeviceError` -> virtio status mapping.
//! - [`config`]: what the device offers: features, limits, configuration space
//!   ([`BackendConfig`]).
//! - `backend`: the `vhost-user-backend` backend of one connection: one worker thread per
//!   queue that starts, drives and completes its requests itself, in-order completion (why
//!   reconnects lose nothing: see there).
//! - [`Session`]: one vhost-user connection's life (accept, serve, tear down).
//! - [`VhostStats`]: counters shared by a server's connections.
//! - [`client`] (feature `client`): a minimal vhost-user-blk driver for tests and
//!   benchmarks.

#![forbid(unsafe_code)]

mod backend;
#[cfg(feature = "client")]
pub mod client;
pub mod config;
mod device;
pub mod request;
mod session;
mod stats;

pub use config::BackendConfig;
pub use device::{
    BlockDevice, DeviceError, Extent, IoBuf, MemDevice, QueueIo, SECTOR_SIZE, check_range,
};
pub use session::{Session, SessionError, SessionOptions, connection_pending};
pub use stats::{RequestKind, VhostStats, VhostStatsSnapshot};
/// The listener type [`Session::accept`] takes (`vhost::vhost_user::Listener`).
pub use vhost::vhost_user::Listener;
