//! Prometheus metrics of the daemon (prometheus-client). Every metric is documented in
//! `docs/metrics.md`. Per-request metrics are updated through handles cached per volume,
//! so the data path never allocates label strings.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;
use vhost_blk::DeviceError;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
        }
    }
}

impl EncodeLabelValue for Op {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolOpLabels {
    pub volume: String,
    pub op: Op,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: Op,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub op: Op,
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminLabels {
    pub op: String,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~42 s
    Histogram::new(exponential_buckets(1e-5, 2.0, 22))
}

#[derive(Debug)]
pub struct Metrics {
    pub requests: Family<VolOpLabels, Counter>,
    pub bytes: Family<VolOpLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    pub admin_latency: Family<AdminLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            admin_latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

/// Handles for one volume's counters.
#[derive(Debug, Clone)]
pub struct VolumeCounters {
    requests: [Counter; 5],
    bytes: [Counter; 5],
}

const OPS: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Discard, Op::WriteZeroes];

fn op_index(op: Op) -> usize {
    match op {
        Op::Read => 0,
        Op::Write => 1,
        Op::Flush => 2,
        Op::Discard => 3,
        Op::WriteZeroes => 4,
    }
}

impl Metrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "blockd_requests",
            "Block requests served, by volume and operation",
            self.requests.clone(),
        );
        reg.register(
            "blockd_request_bytes",
            "Bytes read, written, discarded or zeroed, by volume and operation",
            self.bytes.clone(),
        );
        reg.register(
            "blockd_request_errors",
            "Block requests that failed, by operation and error kind",
            self.errors.clone(),
        );
        reg.register(
            "blockd_request_duration_seconds",
            "Block request latency inside the daemon, by operation",
            self.latency.clone(),
        );
        reg.register(
            "blockd_admin_duration_seconds",
            "Latency of admin operations inside the daemon (checkpoint_create, checkpoint_restore, clone, ...)",
            self.admin_latency.clone(),
        );
    }

    pub fn volume(&self, name: &str) -> VolumeCounters {
        let get = |f: &Family<VolOpLabels, Counter>, op| {
            f.get_or_create(&VolOpLabels {
                volume: name.to_string(),
                op,
            })
            .clone()
        };
        VolumeCounters {
            requests: OPS.map(|op| get(&self.requests, op)),
            bytes: OPS.map(|op| get(&self.bytes, op)),
        }
    }

    /// Drops a deleted volume's series.
    pub fn forget_volume(&self, name: &str) {
        for op in OPS {
            let l = VolOpLabels {
                volume: name.to_string(),
                op,
            };
            self.requests.remove(&l);
            self.bytes.remove(&l);
        }
    }

    pub fn observe_io(
        &self,
        vc: &VolumeCounters,
        op: Op,
        bytes: u64,
        took: Duration,
        err: Option<&DeviceError>,
    ) {
        let i = op_index(op);
        vc.requests[i].inc();
        match err {
            None => {
                vc.bytes[i].inc_by(bytes);
            }
            Some(e) => {
                let kind = match e {
                    DeviceError::Invalid(_) => "invalid",
                    DeviceError::ReadOnly => "read_only",
                    DeviceError::NoSpace => "no_space",
                    DeviceError::Unsupported => "unsupported",
                    DeviceError::Gone(_) => "gone",
                    DeviceError::Io(_) => "io",
                };
                self.errors
                    .get_or_create(&ErrorLabels {
                        op,
                        kind: kind.to_string(),
                    })
                    .inc();
            }
        }
        self.latency
            .get_or_create(&OpLabels { op })
            .observe(took.as_secs_f64());
    }

    pub fn observe_admin(&self, op: &str, took: Duration) {
        self.admin_latency
            .get_or_create(&AdminLabels { op: op.to_string() })
            .observe(took.as_secs_f64());
    }
}

/// Gauges and counters read from the engine's state on each scrape.
#[derive(Debug)]
pub struct StateCollector {
    pub engine: std::sync::Weak<crate::Engine>,
    pub nbd: std::sync::Arc<crate::nbd::NbdStats>,
}

mod state {
    use super::StateCollector;
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::MetricType;
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use std::sync::atomic::Ordering::Relaxed;

    fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
        ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
    }

    fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
        ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
    }

    /// The object store's request metrics and the tier's cache/upload state.
    fn encode_object_tier(
        e: &mut DescriptorEncoder,
        o: &crate::objects::Objects,
        dirty_bytes: u64,
    ) -> std::fmt::Result {
        let m = o.store_metrics.snapshot();
        type PerOp = fn(&chunkstore::remote::OpSnapshot) -> u64;
        let per_op: [(&str, &str, PerOp); 2] = [
            (
                "chunkstore_object_requests",
                "Object-store requests by operation",
                |op| op.requests,
            ),
            (
                "chunkstore_object_request_errors",
                "Object-store requests that failed (each attempt of a retried request counts)",
                |op| op.errors,
            ),
        ];
        for (name, help, get) in per_op {
            let mut fam = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for op in &m.ops {
                ConstCounter::new(get(op)).encode(fam.encode_family(&[("op", op.op.as_str())])?)?;
            }
        }
        {
            let mut fam = e.encode_descriptor(
                "chunkstore_object_request_seconds",
                "Object-store request latency (to the response head for GETs)",
                None,
                MetricType::Histogram,
            )?;
            for op in &m.ops {
                let buckets: Vec<(f64, u64)> = chunkstore::remote::LATENCY_BUCKETS_SECONDS
                    .iter()
                    .copied()
                    .chain([f64::INFINITY])
                    .zip(op.latency.counts.iter().copied())
                    .collect();
                fam.encode_family(&[("op", op.op.as_str())])?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    op.latency.sum_seconds,
                    op.latency.count,
                    &buckets,
                    None,
                )?;
            }
        }
        {
            let mut fam = e.encode_descriptor(
                "chunkstore_object_bytes",
                "Bytes read from (in) and written to (out) the object store",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(m.bytes_in).encode(fam.encode_family(&[("direction", "in")])?)?;
            ConstCounter::new(m.bytes_out).encode(fam.encode_family(&[("direction", "out")])?)?;
        }
        let t = &o.tier.stats;
        let counters: [(&str, &str, u64); 11] = [
            (
                "chunkstore_uploaded_chunks",
                "Chunk objects uploaded",
                t.uploaded_chunks.load(Relaxed),
            ),
            (
                "chunkstore_uploaded_bytes",
                "Compressed bytes of the chunk objects uploaded",
                t.uploaded_bytes.load(Relaxed),
            ),
            (
                "chunkstore_dedup_chunks",
                "Chunks not uploaded because an identical object was already stored",
                t.dedup_chunks.load(Relaxed),
            ),
            (
                "chunkstore_fetches",
                "Ranged GETs that paged data into the cache",
                t.fetches.load(Relaxed),
            ),
            (
                "chunkstore_fetched_bytes",
                "Compressed bytes paged in from the object store",
                t.fetched_bytes.load(Relaxed),
            ),
            (
                "chunkstore_cache_hits",
                "Reads of uploaded segments served from the local cache",
                t.cache_hits.load(Relaxed),
            ),
            (
                "chunkstore_cache_misses",
                "Reads of uploaded segments that had to fetch from the object store",
                t.cache_misses.load(Relaxed),
            ),
            (
                "chunkstore_cache_evictions",
                "Segments evicted from (chunks of)",
                t.evictions.load(Relaxed),
            ),
            (
                "chunkstore_cache_evicted_bytes",
                "Clean bytes evicted from the local cache",
                t.evicted_bytes.load(Relaxed),
            ),
            (
                "chunkstore_objects_deleted",
                "Chunk objects deleted by GC",
                t.deleted_objects.load(Relaxed),
            ),
            (
                "chunkstore_checksum_refetches",
                "Cached frames dropped and fetched again after a checksum failure",
                t.checksum_refetches.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            counter(e, name, help, v)?;
        }
        gauge(
            e,
            "chunkstore_cache_bytes",
            "Clean (uploaded) bytes resident in the local cache",
            t.cached_bytes.load(Relaxed) as i64,
        )?;
        gauge(
            e,
            "chunkstore_cache_limit_bytes",
            "Configured cache budget (object_store.cache_size)",
            o.tier.config().cache_bytes as i64,
        )?;
        gauge(
            e,
            "chunkstore_dirty_bytes",
            "Bytes written locally and not uploaded yet",
            dirty_bytes as i64,
        )?;
        gauge(
            e,
            "chunkstore_dirty_limit_bytes",
            "Configured bound on dirty bytes (object_store.dirty_limit); writes wait at it",
            o.tier.config().dirty_limit as i64,
        )?;
        let oldest = t.oldest_dirty_ms.load(Relaxed);
        let lag = if oldest == 0 {
            0.0
        } else {
            chunkstore::tier::now_ms().saturating_sub(oldest) as f64 / 1000.0
        };
        ConstGauge::new(lag).encode(e.encode_descriptor(
            "chunkstore_upload_lag_seconds",
            "Age of the oldest sealed segment waiting for upload (0: nothing waits)",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }

    impl Collector for StateCollector {
        fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
            let n = self.nbd.snapshot();
            gauge(
                &mut e,
                "blockd_nbd_connections",
                "Open NBD connections",
                n.connections_active as i64,
            )?;
            counter(
                &mut e,
                "blockd_nbd_connections_accepted",
                "NBD connections accepted",
                n.connections_accepted,
            )?;
            counter(
                &mut e,
                "blockd_nbd_handshakes_failed",
                "NBD connections that failed the handshake",
                n.handshakes_failed,
            )?;
            counter(
                &mut e,
                "blockd_nbd_protocol_errors",
                "NBD connections closed for protocol violations",
                n.protocol_errors,
            )?;
            counter(
                &mut e,
                "blockd_nbd_request_errors",
                "NBD requests answered with an error",
                n.request_errors,
            )?;
            gauge(
                &mut e,
                "blockd_nbd_in_flight_requests",
                "NBD requests in flight",
                n.in_flight_requests as i64,
            )?;
            gauge(
                &mut e,
                "blockd_nbd_in_flight_bytes",
                "NBD payload bytes held for in-flight requests",
                n.in_flight_bytes as i64,
            )?;

            let Some(engine) = self.engine.upgrade() else {
                return Ok(());
            };
            let core = &engine.core;
            let ls = &core.local.stats;
            counter(
                &mut e,
                "chunkstore_appended_bytes",
                "Bytes appended to local segments",
                ls.appended_bytes.load(Relaxed),
            )?;
            counter(
                &mut e,
                "chunkstore_read_bytes",
                "Bytes read from local segments",
                ls.read_bytes.load(Relaxed),
            )?;
            counter(
                &mut e,
                "chunkstore_punched_bytes",
                "Bytes released by punching holes in segments",
                ls.punched_bytes.load(Relaxed),
            )?;
            counter(
                &mut e,
                "chunkstore_segments_created",
                "Local segment files created",
                ls.segments_created.load(Relaxed),
            )?;
            counter(
                &mut e,
                "chunkstore_segments_removed",
                "Local segment files deleted after all their blocks were released",
                ls.segments_removed.load(Relaxed),
            )?;
            counter(
                &mut e,
                "chunkstore_segments_recycled",
                "New segments that reused an emptied segment's file instead of a new file",
                ls.segments_recycled.load(Relaxed),
            )?;
            gauge(
                &mut e,
                "chunkstore_free_segments",
                "Emptied segment files kept for reuse (storage.recycle_segments)",
                core.local.free_segments() as i64,
            )?;
            gauge(
                &mut e,
                "chunkstore_deferred_punch_bytes",
                "Released space waiting (up to 2 s) before it is punched, in case its segment empties",
                core.local.deferred_bytes() as i64,
            )?;
            counter(
                &mut e,
                "chunkstore_checksum_failures",
                "Blocks whose crc32c did not match on read (each is an I/O error to the client)",
                ls.checksum_failures.load(Relaxed),
            )?;
            counter(
                &mut e,
                "chunkstore_syncs",
                "Completed segment syncs (flushes)",
                ls.syncs.load(Relaxed),
            )?;
            gauge(
                &mut e,
                "chunkstore_segments",
                "Local segment files",
                core.local.segment_ids().len() as i64,
            )?;
            gauge(
                &mut e,
                "chunkstore_local_bytes",
                "Bytes the segment files and the free pool occupy on the local disk",
                core.local.allocated_bytes() as i64,
            )?;
            gauge(
                &mut e,
                "blockd_reclaim_pending_blocks",
                "Released blocks waiting for durability or in-flight reads before their space is reclaimed",
                core.reclaim.pending_blocks() as i64,
            )?;
            gauge(
                &mut e,
                "snapshotter_background_work_pending",
                "1 while GC or flattening work is queued",
                core.snap.has_background_work() as i64,
            )?;

            if let Some(o) = engine.objects() {
                encode_object_tier(&mut e, o, core.local.dirty_bytes())?;
            }

            let vols = engine.list_volumes();
            gauge(&mut e, "blockd_volumes", "Volumes", vols.len() as i64)?;
            type Get = fn(&crate::VolumeStat) -> u64;
            let per_volume: [(&str, &str, Get); 12] = [
                ("blockd_volume_size_bytes", "Logical size", |v| {
                    v.info.size_bytes
                }),
                (
                    "blockd_volume_head_bytes",
                    "Written, not trimmed bytes visible in the head (incl. shared from the clone source)",
                    |v| v.info.head_bytes,
                ),
                (
                    "blockd_volume_shared_bytes",
                    "Head bytes shared with the volume it was cloned from",
                    |v| v.info.head_shared_bytes,
                ),
                (
                    "blockd_volume_checkpoint_only_bytes",
                    "Bytes held only by checkpoints",
                    |v| v.info.checkpoint_only_bytes,
                ),
                (
                    "blockd_volume_owned_bytes",
                    "All bytes the volume holds (head + checkpoint-only)",
                    |v| v.info.owned_bytes,
                ),
                (
                    "blockd_volume_stored_bytes",
                    "Bytes the volume holds in the object store after compression and dedup (billable)",
                    |v| v.stored.stored_bytes,
                ),
                (
                    "blockd_volume_stored_head_bytes",
                    "Part of the stored bytes held by the head",
                    |v| v.stored.stored_head_bytes,
                ),
                (
                    "blockd_volume_stored_checkpoint_only_bytes",
                    "Part of the stored bytes held only by checkpoints",
                    |v| v.stored.stored_checkpoint_only_bytes,
                ),
                (
                    "blockd_volume_local_bytes",
                    "Bytes of the volume's segment files on the local disk",
                    |v| v.local_bytes,
                ),
                (
                    "blockd_volume_map_cache_bytes",
                    "Memory the head's block-mapping cache holds (storage.map_cache)",
                    |v| v.info.map_cache_bytes,
                ),
                ("blockd_volume_checkpoints", "Checkpoints", |v| {
                    v.info.checkpoints
                }),
                (
                    "blockd_volume_attached_clients",
                    "Front-end connections attached",
                    |v| v.attached_clients as u64,
                ),
            ];
            for (name, help, get) in per_volume {
                let mut fam = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for v in &vols {
                    let labels = [("volume", v.info.name.clone())];
                    ConstGauge::new(get(v) as i64).encode(fam.encode_family(&labels)?)?;
                }
            }
            Ok(())
        }
    }
}
