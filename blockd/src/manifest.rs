//! What a sync writes to the object store about a volume (see docs/object-tier.md):
//!
//! - `volumes/<name>/manifest`: JSON [`Manifest`]: the volume's catalog
//!   (`snapshotter::VolumeExport`) and, per timeline, the pages of its block map.
//! - `meta/<blake3>`: one [`Page`], content-addressed (an unchanged page is uploaded once):
//!
//! ```text
//! zstd( "SPPG" | version u8 = 1 | timeline u64 BE | first lba u64 BE | entries u32 BE
//!       entries × ( lba u64 BE | key seq u64 BE | value length u8 | value )
//!       JSON length u32 BE | JSON { "chunks": [[chunk id, layout]], "segs": [[segment, record]] } )
//! ```
//!
//! A page carries the layouts of the chunks its entries point into, so a host opening the
//! volume can fetch any block with one ranged GET. Decoding never panics (fuzzed).

use chunkstore::tier::format::ChunkLayout;
use chunkstore::tier::meta::SegRecord;
use serde::{Deserialize, Serialize};
use snapshotter::{EntryExport, VolumeExport};
use std::collections::BTreeMap;

pub const MANIFEST_FORMAT: u32 = 1;
const PAGE_MAGIC: &[u8; 4] = b"SPPG";
const PAGE_VERSION: u8 = 1;
/// Largest page we accept when decoding (compressed and decompressed).
const MAX_PAGE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("malformed manifest: {0}")]
    Manifest(String),
    #[error("malformed map page: {0}")]
    Page(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRef {
    /// First block of the page.
    pub first: u64,
    /// blake3 of the encoded page: its object name.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// Who wrote it, and with which lease generation (the fencing token).
    pub writer: String,
    pub lease_generation: u64,
    pub written_unix_ms: u64,
    pub export: VolumeExport,
    /// Pages of each exported timeline (by its exported id).
    pub pages: BTreeMap<u64, Vec<PageRef>>,
}

impl Manifest {
    /// Pretty JSON with a checksum line (damaged bytes that still parse are caught).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).unwrap_or_default();
        chunkstore::remote::append_checksum(&mut b);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Manifest, ManifestError> {
        let json = chunkstore::remote::strip_checksum(b).map_err(ManifestError::Manifest)?;
        let m: Manifest =
            serde_json::from_slice(json).map_err(|e| ManifestError::Manifest(e.to_string()))?;
        if m.format != MANIFEST_FORMAT {
            return Err(ManifestError::Manifest(format!(
                "format {} is not supported (expected {MANIFEST_FORMAT})",
                m.format
            )));
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
struct PageChunks {
    chunks: Vec<(u64, ChunkLayout)>,
    segs: Vec<(u64, SegRecord)>,
}

/// One page of a timeline's block map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub timeline: u64,
    pub first: u64,
    pub entries: Vec<EntryExport>,
    pub chunks: Vec<(u64, ChunkLayout)>,
    pub segs: Vec<(u64, SegRecord)>,
}

impl Page {
    /// Encoded bytes and their blake3 (hex).
    pub fn encode(&self) -> (Vec<u8>, String) {
        let mut raw = Vec::with_capacity(32 + self.entries.len() * 40);
        raw.extend_from_slice(PAGE_MAGIC);
        raw.push(PAGE_VERSION);
        raw.extend_from_slice(&self.timeline.to_be_bytes());
        raw.extend_from_slice(&self.first.to_be_bytes());
        raw.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        for e in &self.entries {
            raw.extend_from_slice(&e.lba.to_be_bytes());
            raw.extend_from_slice(&e.key_seq.to_be_bytes());
            raw.push(e.value.len() as u8);
            raw.extend_from_slice(&e.value);
        }
        let json = serde_json::to_vec(&PageChunks {
            chunks: self.chunks.clone(),
            segs: self.segs.clone(),
        })
        .unwrap_or_default();
        raw.extend_from_slice(&(json.len() as u32).to_be_bytes());
        raw.extend_from_slice(&json);
        let bytes = zstd::bulk::compress(&raw, 3).unwrap_or_default();
        let hash = blake3::hash(&bytes).to_hex().to_string();
        (bytes, hash)
    }

    pub fn decode(bytes: &[u8]) -> Result<Page, ManifestError> {
        let bad = |m: &str| ManifestError::Page(m.to_string());
        if bytes.len() > MAX_PAGE_BYTES {
            return Err(bad("too large"));
        }
        // Streamed with a cap: memory follows the page's real size (a one-shot decompress
        // would reserve the 64 MiB cap for every page, 16 pages at a time during an import).
        let raw = {
            use std::io::Read;
            let mut raw = Vec::new();
            zstd::stream::read::Decoder::with_buffer(bytes)
                .and_then(|d| d.take(MAX_PAGE_BYTES as u64 + 1).read_to_end(&mut raw))
                .map_err(|e| ManifestError::Page(format!("decompress: {e}")))?;
            if raw.len() > MAX_PAGE_BYTES {
                return Err(bad("decompresses beyond the size limit"));
            }
            raw
        };
        let mut r = Reader { b: &raw, at: 0 };
        if r.take(4)? != PAGE_MAGIC {
            return Err(bad("missing magic"));
        }
        if r.take(1)?[0] != PAGE_VERSION {
            return Err(bad("unknown version"));
        }
        let timeline = r.u64()?;
        let first = r.u64()?;
        let n = r.u32()? as usize;
        if n > raw.len() / 17 {
            return Err(bad("entry count exceeds the page"));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let lba = r.u64()?;
            let key_seq = r.u64()?;
            let len = r.take(1)?[0] as usize;
            let value = r.take(len)?.to_vec();
            entries.push(EntryExport {
                lba,
                key_seq,
                value,
            });
        }
        let jlen = r.u32()? as usize;
        let json = r.take(jlen)?;
        if r.at != raw.len() {
            return Err(bad("trailing bytes"));
        }
        let pc: PageChunks =
            serde_json::from_slice(json).map_err(|e| ManifestError::Page(e.to_string()))?;
        Ok(Page {
            timeline,
            first,
            entries,
            chunks: pc.chunks,
            segs: pc.segs,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| ManifestError::Page("truncated".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64, ManifestError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn u32(&mut self) -> Result<u32, ManifestError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn page_roundtrip() {
        let p = Page {
            timeline: 7,
            first: 16384,
            entries: vec![
                EntryExport {
                    lba: 16385,
                    key_seq: u64::MAX,
                    value: vec![0x10, 1, 2, 3],
                },
                EntryExport {
                    lba: 16390,
                    key_seq: 4,
                    value: vec![2],
                },
            ],
            chunks: vec![(
                42,
                ChunkLayout {
                    hash: "ab".into(),
                    blocks: 3,
                    frames: vec![],
                    object_bytes: 100,
                },
            )],
            segs: vec![],
        };
        let (bytes, hash) = p.encode();
        assert_eq!(hash, blake3::hash(&bytes).to_hex().to_string());
        assert_eq!(Page::decode(&bytes).unwrap(), p);
        assert_eq!(
            p.encode().1,
            hash,
            "deterministic: equal pages share an object"
        );
    }

    #[test]
    fn manifest_checksum_catches_damage_that_still_parses() {
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshotter::Snapshotter::open(dir.path(), Default::default()).unwrap();
        snap.create_volume("vol", 1 << 30).unwrap();
        let m = Manifest {
            format: MANIFEST_FORMAT,
            name: "vol".into(),
            writer: "blockd-1234".into(),
            lease_generation: 3,
            written_unix_ms: 1_700_000_000_000,
            export: snap.export_volume("vol").unwrap(),
            pages: BTreeMap::new(),
        };
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        // Flip each bit of every byte in turn: never a different manifest.
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(got) = Manifest::decode(&b) {
                    assert_eq!(got, m, "byte {i} bit {bit} changed the manifest unnoticed");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes: Vec<u8>) {
            let _ = Page::decode(&bytes);
            let _ = Manifest::decode(&bytes);
            if let Ok(c) = zstd::bulk::compress(&bytes, 1) {
                let _ = Page::decode(&c);
            }
        }
    }
}
