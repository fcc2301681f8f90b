//! Block data storage. This crate owns where bytes live and proves they come back intact:
//! append-only local segments written through io_uring with O_DIRECT, a crc32c per 4 KiB
//! block verified on every read, hole punching and segment deletion to reclaim space.
//!
//! It does not know about volumes, timelines or checkpoints: callers (blockd) keep the map
//! from logical blocks to [`BlockAddr`] and tell the store which addresses are free.

mod buf;
mod crc;
mod error;
mod local;
pub mod remote;
mod segment;
pub mod tier;
mod uring;

pub use buf::{ALIGN, AlignedBuf};
pub use crc::{BLOCK_SIZE, block_crc, block_crcs, zero_block_crc};
pub use error::{Error, Result};
pub use local::{
    Appended, BlockAddr, CHUNK_BLOCKS, ChunkId, LocalConfig, LocalStats, LocalStore,
    MAX_SEGMENT_BYTES, ReadReq,
};
pub use uring::Uring;

/// Decoders of stored bytes, public for the fuzz targets (`fuzz/`); the chunk object
/// format is [`tier::format`].
pub mod decode {
    pub use crate::segment::parse_file_name as segment_file_name;
}
