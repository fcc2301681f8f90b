//! The block daemon.

pub mod nbd;
