//! The tier's persistent index (RocksDB under `<data_dir>/tier`):
//!
//! | CF | key | value |
//! |---|---|---|
//! | `chunks` | chunk id u64 BE | `ChunkLayout` (JSON): object hash, frame table, size |
//! | `objrefs` | object hash | i64: local references (merge: add); dedup within a host |
//! | `segs` | segment id u64 BE | `SegRecord` (JSON): stream, upload epoch, bytes |
//! | `manifested` | chunk id u64 BE | empty: a manifest written here references the chunk |
//! | `deletes` | object hash | u64 BE: unix ms after which the object may be deleted |
//! | `meta` | `epoch` | u64 BE: upload epoch counter |

use super::format::ChunkLayout;
use crate::error::{Error, Result};
use rocksdb::{
    ColumnFamilyDescriptor, DB, IteratorMode, MergeOperands, Options, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use std::path::Path;

const CFS: [&str; 6] = ["chunks", "objrefs", "segs", "manifested", "deletes", "meta"];

/// Upload state of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegRecord {
    pub stream: u64,
    /// Upload epoch: clean once the stream's manifest epoch reaches it.
    pub epoch: u64,
    /// Blocks covered by the upload.
    pub blocks: u32,
    /// Compressed bytes of the chunks uploaded for it.
    pub object_bytes: u64,
}

fn add_i64(_k: &[u8], existing: Option<&[u8]>, ops: &MergeOperands) -> Option<Vec<u8>> {
    let mut n = existing.map(be_i64).unwrap_or(0);
    for op in ops {
        n += be_i64(op);
    }
    Some(n.to_be_bytes().to_vec())
}

fn be_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    if b.len() == 8 {
        a.copy_from_slice(b);
    }
    i64::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    be_i64(b) as u64
}

fn db_err(e: rocksdb::Error) -> Error {
    Error::Invalid(format!("tier index: {e}"))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn unjson<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Invalid(format!("tier index record: {e}")))
}

#[derive(Debug)]
pub struct Meta {
    db: DB,
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta> {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        o.set_keep_log_file_num(2);
        let cfs = CFS.iter().map(|&n| {
            let mut co = Options::default();
            if n == "objrefs" {
                co.set_merge_operator_associative("add_i64", add_i64);
            }
            ColumnFamilyDescriptor::new(n, co)
        });
        Ok(Meta {
            db: DB::open_cf_descriptors(&o, path, cfs).map_err(db_err)?,
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // All CFs are created at open.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("tier CF {name} missing"))
    }

    fn write(&self, b: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(b, &wo).map_err(db_err)
    }

    pub fn chunk(&self, id: u64) -> Result<Option<ChunkLayout>> {
        match self
            .db
            .get_cf(self.cf("chunks"), id.to_be_bytes())
            .map_err(db_err)?
        {
            Some(v) => Ok(Some(unjson(&v)?)),
            None => Ok(None),
        }
    }

    pub fn obj_refs(&self, hash: &str) -> Result<i64> {
        Ok(self
            .db
            .get_cf(self.cf("objrefs"), hash.as_bytes())
            .map_err(db_err)?
            .map(|v| be_i64(&v))
            .unwrap_or(0))
    }

    /// Records an uploaded segment: its chunks' layouts, one reference per chunk to its
    /// object, and the segment's record, in one batch.
    pub fn record_upload(
        &self,
        seg: u64,
        rec: &SegRecord,
        chunks: &[(u64, ChunkLayout)],
    ) -> Result<()> {
        let mut b = WriteBatch::default();
        for (id, layout) in chunks {
            b.put_cf(self.cf("chunks"), id.to_be_bytes(), json(layout));
            b.merge_cf(
                self.cf("objrefs"),
                layout.hash.as_bytes(),
                1i64.to_be_bytes(),
            );
            // Referenced again: no longer a deletion candidate.
            b.delete_cf(self.cf("deletes"), layout.hash.as_bytes());
        }
        b.put_cf(self.cf("segs"), seg.to_be_bytes(), json(rec));
        self.write(b)
    }

    /// Installs chunk layouts learnt from a manifest (a volume imported from the bucket).
    pub fn import_chunks(
        &self,
        chunks: &[(u64, ChunkLayout)],
        segs: &[(u64, SegRecord)],
    ) -> Result<()> {
        let mut b = WriteBatch::default();
        for (id, layout) in chunks {
            if self.chunk(*id)?.is_some() {
                continue;
            }
            b.put_cf(self.cf("chunks"), id.to_be_bytes(), json(layout));
            b.put_cf(self.cf("manifested"), id.to_be_bytes(), b"");
            b.merge_cf(
                self.cf("objrefs"),
                layout.hash.as_bytes(),
                1i64.to_be_bytes(),
            );
            b.delete_cf(self.cf("deletes"), layout.hash.as_bytes());
        }
        for (seg, rec) in segs {
            b.put_cf(self.cf("segs"), seg.to_be_bytes(), json(rec));
        }
        self.write(b)
    }

    /// Forgets a chunk nothing references; returns its layout and whether its object lost
    /// its last local reference (it is then scheduled for deletion at `delete_after_ms`).
    pub fn release_chunk(
        &self,
        id: u64,
        delete_after_ms: u64,
    ) -> Result<Option<(ChunkLayout, bool)>> {
        let Some(layout) = self.chunk(id)? else {
            return Ok(None);
        };
        let last = self.obj_refs(&layout.hash)? <= 1;
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf("chunks"), id.to_be_bytes());
        b.delete_cf(self.cf("manifested"), id.to_be_bytes());
        b.merge_cf(
            self.cf("objrefs"),
            layout.hash.as_bytes(),
            (-1i64).to_be_bytes(),
        );
        if last {
            b.put_cf(
                self.cf("deletes"),
                layout.hash.as_bytes(),
                delete_after_ms.to_be_bytes(),
            );
        }
        self.write(b)?;
        Ok(Some((layout, last)))
    }

    pub fn seg(&self, id: u64) -> Result<Option<SegRecord>> {
        match self
            .db
            .get_cf(self.cf("segs"), id.to_be_bytes())
            .map_err(db_err)?
        {
            Some(v) => Ok(Some(unjson(&v)?)),
            None => Ok(None),
        }
    }

    pub fn segs(&self) -> Result<Vec<(u64, SegRecord)>> {
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf("segs"), IteratorMode::Start) {
            let (k, v) = kv.map_err(db_err)?;
            out.push((be_u64(&k), unjson(&v)?));
        }
        Ok(out)
    }

    pub fn remove_seg(&self, id: u64) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf("segs"), id.to_be_bytes());
        self.write(b)
    }

    pub fn next_epoch(&self) -> Result<u64> {
        let cur = self
            .db
            .get_cf(self.cf("meta"), b"epoch")
            .map_err(db_err)?
            .map(|v| be_u64(&v))
            .unwrap_or(0);
        let mut b = WriteBatch::default();
        b.put_cf(self.cf("meta"), b"epoch", (cur + 1).to_be_bytes());
        self.write(b)?;
        Ok(cur + 1)
    }

    pub fn manifested(&self, chunk: u64) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf("manifested"), chunk.to_be_bytes())
            .map_err(db_err)?
            .is_some())
    }

    pub fn mark_manifested(&self, chunks: &[u64]) -> Result<()> {
        let mut b = WriteBatch::default();
        for c in chunks {
            b.put_cf(self.cf("manifested"), c.to_be_bytes(), b"");
        }
        self.write(b)
    }

    /// Objects whose deletion is due (unix ms <= now).
    pub fn due_deletes(&self, now_ms: u64) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf("deletes"), IteratorMode::Start) {
            let (k, v) = kv.map_err(db_err)?;
            if be_u64(&v) <= now_ms {
                out.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
        Ok(out)
    }

    /// (Re)schedules an object's deletion for `after_ms` (unix ms).
    pub fn schedule_delete(&self, hash: &str, after_ms: u64) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf("deletes"), hash.as_bytes(), after_ms.to_be_bytes());
        self.write(b)
    }

    pub fn deleted(&self, hash: &str) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf("deletes"), hash.as_bytes());
        self.write(b)
    }

    /// All chunk layouts of a segment (for manifests).
    pub fn seg_chunks(&self, seg: u64) -> Result<Vec<(u64, ChunkLayout)>> {
        let mut out = Vec::new();
        let from = (seg << 8).to_be_bytes();
        for kv in self.db.iterator_cf(
            self.cf("chunks"),
            IteratorMode::From(&from, rocksdb::Direction::Forward),
        ) {
            let (k, v) = kv.map_err(db_err)?;
            let id = be_u64(&k);
            if id >> 8 != seg {
                break;
            }
            out.push((id, unjson(&v)?));
        }
        Ok(out)
    }
}
