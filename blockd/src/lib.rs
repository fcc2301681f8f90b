//! The block daemon: composes `snapshotter` (metadata) and `chunkstore` (data) into
//! [`Volume`]s and serves them over NBD and vhost-user-blk, with an admin API on a unix
//! socket, an operator CLI, and Prometheus metrics.

pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod core;
pub mod defrag;
pub mod engine;
pub mod error;
pub mod manifest;
pub mod metrics;
pub mod nbd;
pub mod objects;
pub mod reclaim;
pub mod serve;
pub mod size;
pub mod vhost;
pub mod volume;
mod writer;

pub use engine::{AttachMode, Attached, Engine, EngineConfig, VolumeEvent, VolumeStat};
pub use error::{EngineError, ErrorCode};
pub use volume::Volume;
