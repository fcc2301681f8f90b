//! Volume metadata for the block engine: volumes, timelines, checkpoints, restore, clone,
//! the versioned block map, per-group reference counts and per-volume billing counters,
//! all in RocksDB.
//!
//! Storage model (see `docs/storage-model.md`): a volume's head is a timeline; every write
//! request gets the timeline's next seq and one map entry per block. A checkpoint names
//! (timeline, seq). Restore and clone create a timeline branching off a checkpoint. All
//! three are a single small batch: no data copied, no map scan.
//!
//! This crate does not know where bytes live: a [`PhysBlock`] is an opaque address chosen
//! by the data store (blockd composes this crate with `chunkstore`). It only reports which
//! addresses became unreferenced ([`Released`]).

#![forbid(unsafe_code)]

mod catalog;
mod checkpoint;
mod codec;
mod db;
mod engine;
mod error;
mod export;
mod flatten;
mod gc;
mod headcache;
mod ids;
mod map;
mod records;
mod volume;

pub use checkpoint::{CheckpointInfo, CheckpointReader};
pub use codec::{Counters, HEAD_SLOT, MapValue, Version};
pub use engine::{Options, Released, Snapshotter};
pub use error::{Error, Result};
pub use export::{
    CountersExport, EntryExport, FOREIGN_VOLUME, PAGE_BLOCKS, TimelineExport, VolumeExport,
};
pub use ids::{BLOCK_SIZE, CheckpointId, Lba, PhysBlock, Seq, TimelineId, VolumeId};
pub use map::{Found, Mapping};
pub use records::{BranchPoint, CheckpointKind, CheckpointRecord, TimelineRecord, VolumeRecord};
pub use volume::{BlockUpdate, Commit, Relocated, Relocation, VolumeHandle, VolumeInfo};

/// Decoders for untrusted on-disk bytes, exposed for fuzzing.
/// Decoders of stored bytes, public for the fuzz targets (`fuzz/`).
pub mod decode {
    pub use crate::codec::{
        Counters, MapValue, decode_checkpoint_key, decode_i64, decode_map_key, decode_u64_key,
    };
    pub use crate::records::decode as record;
}
