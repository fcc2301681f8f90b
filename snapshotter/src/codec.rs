//! On-disk encodings of everything the snapshotter stores in RocksDB.
//!
//! Block map (column family `map`), one entry per (timeline, block, version):
//!
//! ```text
//! key   = timeline u64 BE | lba u64 BE | !seq u64 BE            (24 bytes)
//! value = 0x01 | group u64 BE | index u32 BE | crc32c u32 BE    (Owned, 17 bytes)
//!       | 0x02                                                  (Tombstone: reads as zeros)
//!       | 0x03 | group | index | crc | origin timeline u64 BE   (Borrowed, 25 bytes)
//! ```
//!
//! **Head slot.** The newest version of a block on a timeline lives at the key whose seq
//! field is `HEAD_SLOT` (`!seq` = 0, so it sorts first); its value is
//! `0x10 | seq u64 BE | <version encoding above>`. Older versions that a checkpoint or a
//! branch point still needs live at their own seq ("history" keys), all below the head
//! slot's seq. Invariant: if a timeline holds any version of a block, the head slot holds
//! the newest. So the data path finds the current version with a bloom-filtered point
//! lookup, and an overwrite nothing retains is a single put.
//!
//! Keys sort by timeline, then block, then descending seq: after the head slot, one seek to
//! `(t, lba, !limit)` lands on the newest history version visible at `limit`.
//!
//! The small catalog records (volumes, timelines, checkpoints) are JSON: they are read at
//! open and written by admin operations only, and stay readable by operators.
//! Every decoder returns an error on malformed input; none panics (see fuzz targets).

use crate::error::{Error, Result};
use crate::ids::{Lba, PhysBlock, Seq, TimelineId};

pub const MAP_KEY_LEN: usize = 24;

/// The seq field of a block's head slot key.
pub const HEAD_SLOT: Seq = Seq::MAX;

/// Key of the head slot of block `lba` on timeline `t`.
pub fn head_key(t: TimelineId, lba: Lba) -> [u8; MAP_KEY_LEN] {
    map_key(t, lba, HEAD_SLOT)
}

pub fn map_key(t: TimelineId, lba: Lba, seq: Seq) -> [u8; MAP_KEY_LEN] {
    let mut k = [0u8; MAP_KEY_LEN];
    k[0..8].copy_from_slice(&t.0.to_be_bytes());
    k[8..16].copy_from_slice(&lba.0.to_be_bytes());
    k[16..24].copy_from_slice(&(!seq.0).to_be_bytes());
    k
}

/// The first key of a timeline's block `lba` (its newest possible version).
pub fn map_key_first(t: TimelineId, lba: Lba) -> [u8; MAP_KEY_LEN] {
    map_key(t, lba, Seq::MAX)
}

pub fn decode_map_key(k: &[u8]) -> Result<(TimelineId, Lba, Seq)> {
    if k.len() != MAP_KEY_LEN {
        return Err(Error::Corrupt(format!("map key of {} bytes", k.len())));
    }
    let t = u64::from_be_bytes(be8(&k[0..8]));
    let lba = u64::from_be_bytes(be8(&k[8..16]));
    let seq = !u64::from_be_bytes(be8(&k[16..24]));
    Ok((TimelineId(t), Lba(lba), Seq(seq)))
}

fn be8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    a
}

fn be4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    a
}

/// One version of one block in the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapValue {
    /// Data written on this timeline; the timeline's volume owns (pays for) the bytes.
    Owned { phys: PhysBlock, crc: u32 },
    /// Discarded or zeroed: reads return zeros and ancestors are not consulted.
    Tombstone,
    /// A copy of an ancestor's entry made by flattening. It never frees the bytes: the
    /// `origin` timeline owns them and keeps them alive through this timeline's branch point.
    Borrowed {
        phys: PhysBlock,
        crc: u32,
        origin: TimelineId,
    },
}

const TAG_OWNED: u8 = 1;
const TAG_TOMBSTONE: u8 = 2;
const TAG_BORROWED: u8 = 3;

/// An encoded map value on the stack: the data path encodes one per written block, and a
/// heap allocation each (two for a head slot) showed in the profile of large writes.
pub struct Encoded {
    buf: [u8; ENCODED_MAX],
    len: usize,
}

/// The longest encoding: a head slot (tag + seq) holding a borrowed value.
const ENCODED_MAX: usize = 9 + 25;

impl Encoded {
    fn new() -> Encoded {
        Encoded {
            buf: [0; ENCODED_MAX],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

impl std::ops::Deref for Encoded {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsRef<[u8]> for Encoded {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// Shows the encoded bytes (the unused tail of the buffer is not part of the value).
impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x?}", &**self)
    }
}

impl MapValue {
    pub fn encode(&self) -> Encoded {
        let mut v = Encoded::new();
        self.encode_into(&mut v);
        v
    }

    fn encode_into(&self, v: &mut Encoded) {
        match *self {
            MapValue::Owned { phys, crc } => {
                v.push(&[TAG_OWNED]);
                v.push(&phys.group.to_be_bytes());
                v.push(&phys.index.to_be_bytes());
                v.push(&crc.to_be_bytes());
            }
            MapValue::Tombstone => v.push(&[TAG_TOMBSTONE]),
            MapValue::Borrowed { phys, crc, origin } => {
                v.push(&[TAG_BORROWED]);
                v.push(&phys.group.to_be_bytes());
                v.push(&phys.index.to_be_bytes());
                v.push(&crc.to_be_bytes());
                v.push(&origin.0.to_be_bytes());
            }
        }
    }

    pub fn decode(v: &[u8]) -> Result<MapValue> {
        let bad = || Error::Corrupt(format!("map value of {} bytes: {:02x?}", v.len(), v));
        let (&tag, rest) = v.split_first().ok_or_else(bad)?;
        let data = |rest: &[u8]| -> (PhysBlock, u32) {
            let group = u64::from_be_bytes(be8(&rest[0..8]));
            let index = u32::from_be_bytes(be4(&rest[8..12]));
            let crc = u32::from_be_bytes(be4(&rest[12..16]));
            (PhysBlock { group, index }, crc)
        };
        match (tag, rest.len()) {
            (TAG_OWNED, 16) => {
                let (phys, crc) = data(rest);
                Ok(MapValue::Owned { phys, crc })
            }
            (TAG_TOMBSTONE, 0) => Ok(MapValue::Tombstone),
            (TAG_BORROWED, 24) => {
                let (phys, crc) = data(rest);
                let origin = TimelineId(u64::from_be_bytes(be8(&rest[16..24])));
                Ok(MapValue::Borrowed { phys, crc, origin })
            }
            _ => Err(bad()),
        }
    }

    /// The bytes this version points at, if it has data.
    pub fn data(&self) -> Option<(PhysBlock, u32)> {
        match *self {
            MapValue::Owned { phys, crc } | MapValue::Borrowed { phys, crc, .. } => {
                Some((phys, crc))
            }
            MapValue::Tombstone => None,
        }
    }
}

const TAG_HEAD: u8 = 0x10;

/// One version of a block: its seq and value (wherever it is stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub seq: Seq,
    pub value: MapValue,
}

impl Version {
    /// Encoding for the head slot (the seq travels in the value).
    pub fn encode_head(&self) -> Encoded {
        let mut v = Encoded::new();
        v.push(&[TAG_HEAD]);
        v.push(&self.seq.0.to_be_bytes());
        self.value.encode_into(&mut v);
        v
    }

    /// Decodes a map entry found at a key whose seq field is `key_seq`.
    pub fn decode(key_seq: Seq, v: &[u8]) -> Result<Version> {
        if key_seq != HEAD_SLOT {
            return Ok(Version {
                seq: key_seq,
                value: MapValue::decode(v)?,
            });
        }
        match v {
            [TAG_HEAD, rest @ ..] if rest.len() > 8 => {
                let seq = Seq(u64::from_be_bytes(be8(&rest[..8])));
                if seq == HEAD_SLOT {
                    return Err(Error::Corrupt("head slot holding the head-slot seq".into()));
                }
                Ok(Version {
                    seq,
                    value: MapValue::decode(&rest[8..])?,
                })
            }
            _ => Err(Error::Corrupt(format!(
                "head slot value of {} bytes: {:02x?}",
                v.len(),
                &v[..v.len().min(32)]
            ))),
        }
    }
}

pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn decode_u64_key(k: &[u8]) -> Result<u64> {
    if k.len() != 8 {
        return Err(Error::Corrupt(format!("u64 key of {} bytes", k.len())));
    }
    Ok(u64::from_be_bytes(be8(k)))
}

/// Key of a checkpoint record: volume id, checkpoint number.
pub fn checkpoint_key(volume: u64, number: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[0..8].copy_from_slice(&volume.to_be_bytes());
    k[8..16].copy_from_slice(&number.to_be_bytes());
    k
}

pub fn decode_checkpoint_key(k: &[u8]) -> Result<(u64, u64)> {
    if k.len() != 16 {
        return Err(Error::Corrupt(format!(
            "checkpoint key of {} bytes",
            k.len()
        )));
    }
    Ok((
        u64::from_be_bytes(be8(&k[0..8])),
        u64::from_be_bytes(be8(&k[8..16])),
    ))
}

/// Counters kept per volume (column family `volstats`), updated with merge operands that
/// add signed deltas, so every commit batch can adjust them without a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Blocks with data visible in the head (written, not trimmed), including inherited ones.
    pub head_blocks: i64,
    /// Head-visible blocks whose bytes this volume owns.
    pub head_owned_blocks: i64,
    /// Blocks this volume owns in total (head and checkpoints).
    pub owned_blocks: i64,
}

impl Counters {
    pub const ENCODED_LEN: usize = 24;

    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.head_blocks.to_be_bytes());
        b[8..16].copy_from_slice(&self.head_owned_blocks.to_be_bytes());
        b[16..24].copy_from_slice(&self.owned_blocks.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Counters> {
        if b.len() != Self::ENCODED_LEN {
            return Err(Error::Corrupt(format!("counters of {} bytes", b.len())));
        }
        Ok(Counters {
            head_blocks: i64::from_be_bytes(be8(&b[0..8])),
            head_owned_blocks: i64::from_be_bytes(be8(&b[8..16])),
            owned_blocks: i64::from_be_bytes(be8(&b[16..24])),
        })
    }

    pub fn add(&mut self, d: &Counters) {
        self.head_blocks += d.head_blocks;
        self.head_owned_blocks += d.head_owned_blocks;
        self.owned_blocks += d.owned_blocks;
    }

    pub fn is_zero(&self) -> bool {
        *self == Counters::default()
    }
}

pub fn encode_i64(n: i64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn decode_i64(b: &[u8]) -> Result<i64> {
    if b.len() != 8 {
        return Err(Error::Corrupt(format!("i64 of {} bytes", b.len())));
    }
    Ok(i64::from_be_bytes(be8(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newest_version_sorts_first() {
        let t = TimelineId(7);
        let a = map_key(t, Lba(3), Seq(10));
        let b = map_key(t, Lba(3), Seq(9));
        let c = map_key(t, Lba(4), Seq(100));
        assert!(a < b && b < c);
        assert!(map_key_first(t, Lba(3)) < a);
    }

    proptest! {
        #[test]
        fn map_key_roundtrip(t: u64, lba: u64, seq: u64) {
            let k = map_key(TimelineId(t), Lba(lba), Seq(seq));
            prop_assert_eq!(decode_map_key(&k).unwrap(), (TimelineId(t), Lba(lba), Seq(seq)));
        }

        #[test]
        fn map_value_roundtrip(group: u64, index: u32, crc: u32, origin: u64, kind in 0u8..3) {
            let phys = PhysBlock { group, index };
            let v = match kind {
                0 => MapValue::Owned { phys, crc },
                1 => MapValue::Tombstone,
                _ => MapValue::Borrowed { phys, crc, origin: TimelineId(origin) },
            };
            prop_assert_eq!(MapValue::decode(&v.encode()).unwrap(), v);
        }

        #[test]
        fn head_slot_roundtrip(seq in 0u64..u64::MAX, group: u64, index: u32, crc: u32) {
            let v = Version { seq: Seq(seq), value: MapValue::Owned { phys: PhysBlock { group, index }, crc } };
            prop_assert_eq!(Version::decode(HEAD_SLOT, &v.encode_head()).unwrap(), v);
            let t = Version { seq: Seq(seq), value: MapValue::Tombstone };
            prop_assert_eq!(Version::decode(HEAD_SLOT, &t.encode_head()).unwrap(), t);
        }

        #[test]
        fn decoders_never_panic(bytes: Vec<u8>, seq: u64) {
            let _ = Version::decode(Seq(seq), &bytes);
            let _ = Version::decode(HEAD_SLOT, &bytes);
            let _ = MapValue::decode(&bytes);
            let _ = decode_map_key(&bytes);
            let _ = Counters::decode(&bytes);
            let _ = decode_checkpoint_key(&bytes);
        }
    }
}
