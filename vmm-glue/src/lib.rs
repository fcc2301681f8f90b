//! Sprite lifecycle on top of blockd: see the crate description and docs/sprites.md.

pub mod agent;
pub mod proto;
pub mod agent_client;
pub mod image;
pub mod manager;
pub mod vm;
pub mod client;
pub mod proxy;
pub mod server;
