//! Catalog records (JSON in RocksDB). Small, rare, human-readable.

use crate::error::{Error, Result};
use crate::ids::{CheckpointId, Seq, TimelineId, VolumeId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    /// The timeline that receives writes.
    pub head: TimelineId,
    /// Next checkpoint number to hand out (`v{next_checkpoint}`).
    pub next_checkpoint: u64,
    pub created_unix_ms: u64,
    /// Where this volume was cloned from, for display.
    #[serde(default)]
    pub cloned_from: Option<String>,
    /// Random id of the volume's data stream: the data store keeps each volume's blocks in
    /// segments of their own. Stable across hosts (carried by manifests).
    #[serde(default)]
    pub stream: u64,
}

/// A fresh random stream id (never 0).
pub fn new_stream_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish().max(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchPoint {
    pub timeline: TimelineId,
    pub seq: Seq,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineRecord {
    pub id: TimelineId,
    /// The volume that owns the bytes written on this timeline. It may have been deleted
    /// while a clone still needs part of this timeline.
    pub volume: VolumeId,
    /// Reads of blocks this timeline never wrote continue at the parent, limited to `seq`.
    /// The parent keeps every version visible at `seq` alive for as long as this timeline
    /// exists (a branch point is a retention point).
    pub parent: Option<BranchPoint>,
    /// Set once flattening copied every ancestor-visible entry into this timeline: reads
    /// stop here, the parent link remains only to keep the copied bytes alive.
    #[serde(default)]
    pub flattened: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Created by a user.
    User,
    /// Recorded automatically by a restore: the head it replaced, so restores are undoable.
    PreRestore,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub id: CheckpointId,
    pub volume: VolumeId,
    pub timeline: TimelineId,
    pub seq: Seq,
    pub kind: CheckpointKind,
    pub comment: String,
    pub created_unix_ms: u64,
    /// Head counters at creation: restoring this checkpoint sets the head counters to these,
    /// keeping restore O(1) while `volume stat` stays exact.
    pub head_blocks: i64,
    pub head_owned_blocks: i64,
}

pub fn encode<T: Serialize>(r: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(r).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Corrupt(format!("{what} record: {e}")))
}
