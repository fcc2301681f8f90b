//! RocksDB layout: column families, merge operators, write helpers.

use crate::codec::{Counters, decode_i64, encode_i64};
use crate::error::Result;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType,
    MemtableFactory, MergeOperands, Options, WriteBatch, WriteOptions,
};
use std::path::Path;

pub const CF_META: &str = "meta";
pub const CF_VOLUMES: &str = "volumes";
pub const CF_TIMELINES: &str = "timelines";
pub const CF_CHECKPOINTS: &str = "checkpoints";
/// timeline -> last committed seq (written in every commit batch).
pub const CF_HEADS: &str = "heads";
pub const CF_MAP: &str = "map";
/// group -> live reference count (merge: i64 add).
pub const CF_GROUPS: &str = "groups";
/// volume -> Counters (merge: element-wise add).
pub const CF_VOLSTATS: &str = "volstats";

const ALL_CFS: [&str; 8] = [
    CF_META,
    CF_VOLUMES,
    CF_TIMELINES,
    CF_CHECKPOINTS,
    CF_HEADS,
    CF_MAP,
    CF_GROUPS,
    CF_VOLSTATS,
];

pub const META_NEXT_VOLUME: &[u8] = b"next_volume_id";
pub const META_NEXT_TIMELINE: &[u8] = b"next_timeline_id";
pub const META_FORMAT: &[u8] = b"format_version";
pub const FORMAT_VERSION: &[u8] = b"1";
/// Prefix of persisted background work markers: `gc/<timeline BE>`, `flatten/<timeline BE>`.
pub const META_GC_PREFIX: &[u8] = b"gc/";
pub const META_FLATTEN_PREFIX: &[u8] = b"flatten/";

fn add_i64(_key: &[u8], existing: Option<&[u8]>, ops: &MergeOperands) -> Option<Vec<u8>> {
    let mut n = existing.and_then(|b| decode_i64(b).ok()).unwrap_or(0);
    for op in ops {
        if let Ok(d) = decode_i64(op) {
            n += d;
        }
    }
    Some(encode_i64(n).to_vec())
}

fn add_counters(_key: &[u8], existing: Option<&[u8]>, ops: &MergeOperands) -> Option<Vec<u8>> {
    let mut c = existing
        .and_then(|b| Counters::decode(b).ok())
        .unwrap_or_default();
    for op in ops {
        if let Ok(d) = Counters::decode(op) {
            c.add(&d);
        }
    }
    Some(c.encode().to_vec())
}

pub fn open(path: &Path, cache_bytes: usize) -> Result<DB> {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.increase_parallelism(2);
    db_opts.set_max_background_jobs(2);
    db_opts.set_keep_log_file_num(4);
    db_opts.set_max_total_wal_size(256 << 20);
    // The per-commit metadata column families use vector memtables (below), which take
    // inserts from one writer at a time.
    db_opts.set_allow_concurrent_memtable_write(false);

    let cache = Cache::new_lru_cache(cache_bytes);
    let cfs = ALL_CFS.iter().map(|&name| {
        let mut o = Options::default();
        let mut bb = BlockBasedOptions::default();
        bb.set_block_cache(&cache);
        if name == CF_MAP {
            // Blooms on the (timeline, block) prefix let a single-block seek skip every file
            // that holds no version of that block (the data path's common case).
            o.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(16));
            o.set_memtable_prefix_bloom_ratio(0.1);
            bb.set_bloom_filter(10.0, false);
            bb.set_cache_index_and_filter_blocks(true);
            bb.set_pin_l0_filter_and_index_blocks_in_cache(true);
            // A small memtable: the data path's multi-get of head slots mostly misses it
            // (the prefix bloom answers), and the skip list it does search stays shallow
            // and cache-resident. 64 MiB cost ~10 % of 4K random-write IOPS (measured).
            o.set_write_buffer_size(16 << 20);
            // ~60 bytes per written block: uncompressed, so a block-cache miss costs a
            // copy and a checksum, not a decompression on the read path.
            o.set_compression_type(DBCompressionType::None);
            o.set_bottommost_compression_type(DBCompressionType::None);
        }
        if matches!(name, CF_HEADS | CF_GROUPS | CF_VOLSTATS) {
            // Every commit adds an entry for the same few keys here (the head's seq, the
            // groups' reference-count and the volume's counter merges), and these families
            // are read only when the engine opens. A skip list pays a deep, cache-missing
            // search per insert (~10 % of the daemon's CPU on 4K random writes, profiled);
            // a vector memtable appends, and sorts once when it is flushed or read.
            o.set_memtable_factory(MemtableFactory::Vector);
            o.set_write_buffer_size(8 << 20);
        }
        o.set_block_based_table_factory(&bb);
        match name {
            CF_GROUPS => o.set_merge_operator_associative("add_i64", add_i64),
            CF_VOLSTATS => o.set_merge_operator_associative("add_counters", add_counters),
            _ => {}
        }
        ColumnFamilyDescriptor::new(name, o)
    });
    Ok(DB::open_cf_descriptors(&db_opts, path, cfs)?)
}

pub fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    // Every column family in ALL_CFS is created at open, so this cannot miss.
    db.cf_handle(name)
        .unwrap_or_else(|| panic!("column family {name} missing after open"))
}

/// Writes a batch. Admin operations pass `sync = true`; the data path does not (FLUSH makes
/// it durable later through `Snapshotter::sync`).
pub fn write(db: &DB, batch: WriteBatch, sync: bool) -> Result<()> {
    let mut wo = WriteOptions::default();
    wo.set_sync(sync);
    db.write_opt(batch, &wo)?;
    Ok(())
}
