//! Block-device front ends. [`BlockDevice`] is the contract between a disk implementation
//! (blockd's `Volume`, the in-memory [`MemDevice`]) and the protocols that serve it
//! (vhost-user-blk here, NBD in blockd). This crate knows nothing about how volumes store
//! data.

#![forbid(unsafe_code)]

mod device;

pub use device::{BlockDevice, DeviceError, Extent, IoBuf, MemDevice, SECTOR_SIZE, check_range};
