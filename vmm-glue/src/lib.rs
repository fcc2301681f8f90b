//! Sprite lifecycle on top of blockd: see the crate description and docs/sprites.md.

pub mod agent;
pub mod agent_client;
pub mod client;
pub mod image;
pub mod manager;
pub mod mgmt;
pub mod proto;
pub mod proxy;
pub mod serve;
pub mod server;
pub mod services;
pub mod vm;
