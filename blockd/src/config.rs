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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint; empty string disables it.
    pub addr: String,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            admin_socket: None,
            nbd: NbdConfig::default(),
            metrics: MetricsConfig::default(),
            storage: StorageConfig::default(),
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
            metadata_cache: 64 << 20,
            max_read_depth: 4,
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
        let s = &self.storage;
        if s.segment_size < (1 << 20)
            || !s.segment_size.is_multiple_of(4096)
            || s.segment_size > (1 << 34)
        {
            return Err(format!(
                "storage.segment_size = {} must be a multiple of 4096 between 1M and 16G",
                s.segment_size
            ));
        }
        if !(8..=32768).contains(&s.ring_entries) {
            return Err(format!(
                "storage.ring_entries = {} must be between 8 and 32768",
                s.ring_entries
            ));
        }
        if s.max_read_depth < 2 {
            return Err("storage.max_read_depth must be at least 2".into());
        }
        self.metrics_addr()?;
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

    pub fn engine_config(&self) -> crate::EngineConfig {
        let mut e = crate::EngineConfig::new(&self.data_dir);
        e.local.segment_bytes = self.storage.segment_size;
        e.local.direct_io = self.storage.direct_io;
        e.local.ring_entries = self.storage.ring_entries;
        e.meta_cache_bytes = self.storage.metadata_cache as usize;
        e.max_read_depth = self.storage.max_read_depth;
        e
    }
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
            "#,
        )
        .unwrap();
        assert_eq!(cfg.storage.segment_size, 128 << 20);
        assert_eq!(cfg.storage.metadata_cache, 1 << 20);
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
