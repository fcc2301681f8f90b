//! Identifier and unit newtypes. Mixing any two of these up would be a bug, so they are
//! distinct types; raw integers only appear at the encoding boundary (`codec.rs`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Logical block size of every volume. The block map has one entry per written block.
pub const BLOCK_SIZE: u64 = 4096;

/// A logical block address inside a volume (units of [`BLOCK_SIZE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Lba(pub u64);

/// A write sequence number on one timeline. Every committed write or discard request takes
/// the next one; seq 0 is reserved for entries inherited by flattening.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Seq(pub u64);

impl Seq {
    /// Reads with this limit see every committed version (the head).
    pub const MAX: Seq = Seq(u64::MAX);
    /// Entries copied in by flattening carry this seq, below every real write.
    pub const BASE: Seq = Seq(0);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VolumeId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimelineId(pub u64);

/// Per-volume checkpoint number, shown to users as `v1`, `v2`, ... Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckpointId(pub u64);

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl std::str::FromStr for CheckpointId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix('v').unwrap_or(s);
        match digits.parse::<u64>() {
            Ok(n) if n > 0 => Ok(CheckpointId(n)),
            _ => Err(format!("invalid checkpoint id {s:?}: expected v1, v2, ...")),
        }
    }
}

/// Where a block's bytes live, as far as the snapshotter is concerned: an opaque address
/// chosen by the data store. The snapshotter only uses `group` to keep a reference count per
/// group (the data store's segment), so the data store knows when a group holds nothing live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PhysBlock {
    pub group: u64,
    pub index: u32,
}
