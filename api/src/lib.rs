//! The user-facing API: see the crate description and docs/api.md.

pub mod metrics;
pub mod sdk;
pub mod server;
pub mod store;
pub mod usage;
