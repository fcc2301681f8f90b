//! `blockd serve` configuration: one TOML file, every key optional, flags override it.
//! See `docs/blockd.md` for the reference.

use crate::size::deserialize_size;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/sprites/blockd";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Everything blockd stores lives under this directory.
    pub data_dir: PathBuf,
    /// Admin API socket (default `<data_dir>/admin.sock`).
    pub admin_socket: Option<PathBuf>,
    pub nbd: NbdConfig,
    pub metrics: MetricsConfig,
    pub storage: StorageConfig,
    pub runtime: RuntimeConfig,
    pub object_store: ObjectStoreConfig,
    pub vhost: VhostConfig,
    /// Log filter (`info`, `blockd=debug`, ...); `RUST_LOG` wins when set.
    pub log: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct NbdConfig {
    /// NBD unix socket (default `<data_dir>/nbd.sock`).
    pub socket: Option<PathBuf>,
    /// Optional TCP listen address. Off by default; NBD has no authentication here and we
    /// do not offer TLS, so bind it to loopback or a private network only.
    pub tcp: Option<SocketAddr>,
    /// NBD connections served at once per listener (default 1024); more wait in the
    /// listen backlog until one closes.
    pub max_connections: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint; empty string disables it.
    pub addr: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VhostConfig {
    /// Serve every volume over vhost-user-blk.
    pub enabled: bool,
    /// Directory of the per-volume sockets `<dir>/<volume>.sock` (default `<data_dir>/vhost`).
    pub dir: Option<PathBuf>,
    /// Virtqueues offered to each VM (QEMU's `num-queues` may be at most this).
    pub num_queues: u16,
    /// Logical block size the guest sees: 4096 (no read-modify-write in the engine) or 512
    /// (for guests that need 512-byte sectors, e.g. legacy BIOS bootloaders).
    pub logical_block_size: u32,
}

impl Default for VhostConfig {
    fn default() -> Self {
        VhostConfig {
            enabled: true,
            dir: None,
            num_queues: 2,
            logical_block_size: 4096,
        }
    }
}

/// The object-store tier (docs/object-tier.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectStoreConfig {
    /// `file:///abs/dir`, `s3://bucket/prefix`, `memory://` (tests), or `none` for local
    /// only. Default: `file://<data_dir>/objects`.
    pub url: Option<String>,
    /// S3-compatible endpoint (e.g. `http://127.0.0.1:9000`); AWS when unset.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Credentials; the `AWS_*` environment variables are used when unset.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub allow_http: Option<bool>,
    /// Clean (uploaded) data kept on the local disk.
    #[serde(deserialize_with = "deserialize_size")]
    pub cache_size: u64,
    /// Data not uploaded yet at which writes start waiting for the uploader.
    #[serde(deserialize_with = "deserialize_size")]
    pub dirty_limit: u64,
    pub upload_concurrency: usize,
    /// zstd level of uploaded chunks (1 = fastest).
    pub compression_level: i32,
    /// 64 KiB frames fetched ahead of sequential reads.
    pub readahead_frames: u32,
    /// Seconds an unreferenced object is kept before deletion.
    pub gc_grace_secs: u64,
    /// Seconds between checks that this daemon still holds its volumes' leases.
    pub lease_check_secs: u64,
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        ObjectStoreConfig {
            url: None,
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            allow_http: None,
            cache_size: 8 << 30,
            dirty_limit: 1 << 30,
            upload_concurrency: 4,
            compression_level: 1,
            readahead_frames: 16,
            gc_grace_secs: 3600,
            lease_check_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Async worker threads serving requests; 0 = half the CPUs (at least 1). A request is
    /// handled start to finish on one thread, so fewer threads mean fewer hand-offs; more
    /// threads serve more concurrent volumes.
    pub worker_threads: usize,
}

impl RuntimeConfig {
    pub fn threads(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        std::thread::available_parallelism()
            .map(|n| n.get() / 2)
            .unwrap_or(1)
            .max(1)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Size of each local segment file.
    #[serde(deserialize_with = "deserialize_size")]
    pub segment_size: u64,
    /// Use O_DIRECT for segment I/O (falls back to buffered where unsupported).
    pub direct_io: bool,
    /// io_uring queue depth (bound on in-flight disk operations).
    pub ring_entries: u32,
    /// RocksDB block cache for the block map.
    #[serde(deserialize_with = "deserialize_size")]
    pub metadata_cache: u64,
    /// Flatten a timeline when reads would visit more timelines than this.
    pub max_read_depth: usize,
    /// Per volume: memory for the in-memory copy of the head's block mappings that small
    /// reads and commits consult before RocksDB (24 bytes per 4 KiB block); 0 disables it.
    #[serde(deserialize_with = "deserialize_size")]
    pub map_cache: u64,
    /// Rewrite a range in block order when a large read finds it fragmented (scattered by
    /// random overwrites), so the next sequential read of it is one disk read.
    pub defrag_on_read: bool,
    /// Emptied segment files kept for reuse by new segments (appends then overwrite
    /// written blocks instead of converting freshly preallocated ones); 0 deletes them.
    pub recycle_segments: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            admin_socket: None,
            nbd: NbdConfig::default(),
            metrics: MetricsConfig::default(),
            storage: StorageConfig::default(),
            runtime: RuntimeConfig::default(),
            vhost: VhostConfig::default(),
            object_store: ObjectStoreConfig::default(),
            log: "info".into(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            addr: "127.0.0.1:9490".into(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            segment_size: 64 << 20,
            direct_io: true,
            ring_entries: 256,
            metadata_cache: 256 << 20,
            max_read_depth: 4,
            map_cache: 16 << 20,
            defrag_on_read: true,
            recycle_segments: 0,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| format!("invalid config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.nbd
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("nbd.sock"))
    }

    pub fn vhost_dir(&self) -> PathBuf {
        self.vhost
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("vhost"))
    }

    /// The vhost-user-blk device settings for each volume.
    pub fn vhost_backend(&self) -> vhost_blk::BackendConfig {
        vhost_blk::BackendConfig {
            num_queues: self.vhost.num_queues,
            logical_block_size: self.vhost.logical_block_size,
            ..Default::default()
        }
    }

    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.metrics.addr.trim().is_empty() {
            return Ok(None);
        }
        self.metrics
            .addr
            .parse()
            .map(Some)
            .map_err(|e| format!("invalid metrics address {:?}: {e}", self.metrics.addr))
    }

    /// Rejects values that cannot work, with a message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.nbd.max_connections == Some(0) {
            return Err("nbd.max_connections must be at least 1".into());
        }
        let s = &self.storage;
        if s.segment_size < (1 << 20)
            || !s.segment_size.is_multiple_of(4096)
            || s.segment_size > (1 << 28)
        {
            return Err(format!(
                "storage.segment_size = {} must be a multiple of 4096 between 1M and 256M",
                s.segment_size
            ));
        }
        if !(8..=32768).contains(&s.ring_entries) {
            return Err(format!(
                "storage.ring_entries = {} must be between 8 and 32768",
                s.ring_entries
            ));
        }
        if self.runtime.worker_threads > 1024 {
            return Err("runtime.worker_threads must be at most 1024 (0 = automatic)".into());
        }
        if self.object_store_url().is_some() && s.segment_size > chunkstore::MAX_SEGMENT_BYTES {
            return Err(format!(
                "storage.segment_size must be at most {} with an object store",
                chunkstore::MAX_SEGMENT_BYTES
            ));
        }
        let o = &self.object_store;
        if o.upload_concurrency == 0 || o.upload_concurrency > 256 {
            return Err("object_store.upload_concurrency must be between 1 and 256".into());
        }
        if !(-7..=19).contains(&o.compression_level) {
            return Err("object_store.compression_level must be between -7 and 19".into());
        }
        if o.dirty_limit < (16 << 20) {
            return Err("object_store.dirty_limit must be at least 16M".into());
        }
        if s.max_read_depth < 2 {
            return Err("storage.max_read_depth must be at least 2".into());
        }
        self.metrics_addr()?;
        if !matches!(self.vhost.logical_block_size, 512 | 4096) {
            return Err(format!(
                "vhost.logical_block_size = {} must be 512 or 4096",
                self.vhost.logical_block_size
            ));
        }
        self.vhost_backend()
            .validate()
            .map_err(|e| format!("vhost: {e}"))?;
        // The shortest volume name must fit: <dir>/<x>.sock.
        let vhost_dir = self.vhost_dir();
        if self.vhost.enabled && vhost_dir.as_os_str().len() + "/x.sock".len() >= 108 {
            return Err(format!(
                "vhost.dir {} is too long for unix sockets in it (max 100 bytes)",
                vhost_dir.display()
            ));
        }
        for (what, p) in [
            ("admin socket", self.admin_socket()),
            ("nbd socket", self.nbd_socket()),
        ] {
            if p.as_os_str().len() >= 108 {
                return Err(format!(
                    "{what} path {} is too long for a unix socket (max 107 bytes)",
                    p.display()
                ));
            }
        }
        Ok(())
    }

    /// The object store URL in effect (`None`: local only).
    pub fn object_store_url(&self) -> Option<String> {
        match self.object_store.url.as_deref().map(str::trim) {
            Some("") | Some("none") => None,
            Some(u) => Some(u.to_string()),
            None => Some(format!(
                "file://{}",
                self.data_dir.join("objects").display()
            )),
        }
    }

    /// Opens the object store (makes no request yet).
    pub fn remote_setup(&self) -> Result<Option<crate::objects::RemoteSetup>, String> {
        let Some(url) = self.object_store_url() else {
            return Ok(None);
        };
        let o = &self.object_store;
        let rc = chunkstore::remote::RemoteConfig {
            url,
            endpoint: o.endpoint.clone(),
            region: o.region.clone(),
            access_key_id: o.access_key_id.clone(),
            secret_access_key: o.secret_access_key.clone(),
            session_token: o.session_token.clone(),
            allow_http: o.allow_http,
        };
        let remote = rc
            .open()
            .map_err(|e| format!("object_store: {e}"))?
            .ok_or_else(|| "object_store.url is empty".to_string())?;
        let remote = match std::env::var(TEST_FAULTS_ENV) {
            Ok(spec) if !spec.trim().is_empty() => with_test_faults(remote, &spec)?,
            _ => remote,
        };
        Ok(Some(crate::objects::RemoteSetup {
            remote,
            tier: chunkstore::tier::TierConfig {
                cache_bytes: o.cache_size,
                dirty_limit: o.dirty_limit,
                upload_concurrency: o.upload_concurrency,
                zstd_level: o.compression_level,
                readahead_frames: o.readahead_frames,
                gc_grace: std::time::Duration::from_secs(o.gc_grace_secs),
                attempts: 5,
            },
            lease_check: std::time::Duration::from_secs(o.lease_check_secs.max(1)),
        }))
    }

    pub fn engine_config(&self) -> Result<crate::EngineConfig, String> {
        let mut e = crate::EngineConfig::new(&self.data_dir);
        e.remote = self.remote_setup()?;
        e.local.segment_bytes = self.storage.segment_size;
        e.local.direct_io = self.storage.direct_io;
        e.local.ring_entries = self.storage.ring_entries;
        e.local.recycle_segments = self.storage.recycle_segments;
        e.meta_cache_bytes = self.storage.metadata_cache as usize;
        e.max_read_depth = self.storage.max_read_depth;
        e.head_cache_bytes = usize::try_from(self.storage.map_cache)
            .map_err(|_| "storage.map_cache is too large".to_string())?;
        e.defrag_on_read = self.storage.defrag_on_read;
        Ok(e)
    }
}

/// Environment variable that makes the daemon's object store inject faults: for fault-soak
/// tests only (docs/reliability.md), never in production. Its value is a fault
/// specification, see [`chunkstore::remote::FaultSettings::parse_spec`], e.g.
/// `error=0.05,latency_ms=2,jitter_ms=20,lost_ack=0.05,corrupt=0.02`.
pub const TEST_FAULTS_ENV: &str = "BLOCKD_TEST_FAULTS";

/// Wraps the store in a [`chunkstore::remote::FaultyStore`] configured by `spec`. The faults
/// sit below the request metrics, so `chunkstore_object_request_errors_total` counts them.
fn with_test_faults(
    remote: chunkstore::remote::Remote,
    spec: &str,
) -> Result<chunkstore::remote::Remote, String> {
    use chunkstore::remote::{FaultConfig, FaultSettings, FaultyStore};
    let (settings, seed) =
        FaultSettings::parse_spec(spec).map_err(|e| format!("{TEST_FAULTS_ENV}: {e}"))?;
    let faults = match seed {
        Some(seed) => FaultConfig::seeded(settings, seed),
        None => FaultConfig::new(settings),
    };
    tracing::warn!(
        "{TEST_FAULTS_ENV} is set: the object store injects faults ({spec}); for testing only"
    );
    Ok(remote.wrap(|store| std::sync::Arc::new(FaultyStore::new(store, faults))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_config() {
        let cfg: Config = toml::from_str(
            r#"
            data_dir = "/tmp/x"
            log = "debug"
            [nbd]
            tcp = "127.0.0.1:10809"
            [metrics]
            addr = ""
            [storage]
            segment_size = "128M"
            metadata_cache = 1048576
            map_cache = "1M"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.storage.segment_size, 128 << 20);
        assert_eq!(cfg.storage.metadata_cache, 1 << 20);
        assert_eq!(cfg.storage.map_cache, 1 << 20);
        assert_eq!(cfg.engine_config().unwrap().head_cache_bytes, 1 << 20);
        assert_eq!(cfg.nbd_socket(), PathBuf::from("/tmp/x/nbd.sock"));
        assert_eq!(cfg.metrics_addr().unwrap(), None);
        cfg.validate().unwrap();
    }

    #[test]
    fn rejects_bad_values() {
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        assert!(toml::from_str::<Config>("[storage]\nsegment_size = \"12Q\"").is_err());
        let cfg: Config = toml::from_str("[storage]\nsegment_size = \"4K\"").unwrap();
        assert!(cfg.validate().unwrap_err().contains("segment_size"));
        let cfg: Config = toml::from_str("[metrics]\naddr = \"nope\"").unwrap();
        assert!(cfg.validate().is_err());
    }
}
