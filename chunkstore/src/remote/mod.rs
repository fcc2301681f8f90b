//! The object store behind the tier (docs/object-tier.md): where it is, how requests to it
//! are measured, retried and fenced, and a fault-injecting wrapper for tests.
//!
//! - [`config`]: [`RemoteConfig`] (`s3://`, `file://`, `memory://`) and [`RemoteConfig::open`]
//!   building a [`Remote`].
//! - [`metered`]: [`MeteredStore`], request / byte / latency counters for the daemon's metrics.
//! - [`retry`](mod@retry): [`retry()`] with backoff and jitter for transient errors only.
//! - [`lease`]: [`Lease`], one writer per volume through conditional creates.
//! - [`faults`]: [`FaultyStore`], injecting errors, timeouts, latency, corruption and lost
//!   answers, reproducibly from a seed.
//!
//! Everything here speaks `object_store::ObjectStore`, so the wrappers stack in any order
//! (`MeteredStore<FaultyStore<AmazonS3>>` in a test measures what the engine saw).

pub mod config;
pub mod faults;
pub mod lease;
pub mod metered;
mod op;
pub mod retry;

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path;

pub use config::{RemoteConfig, RemoteError, Target};
pub use faults::{
    FaultConfig, FaultKind, FaultSettings, FaultStats, FaultyStore, InjectedFault, OpRates,
};
pub use lease::{Heartbeat, Lease, LeaseError, LeaseRecord};
pub use metered::{
    HistogramSnapshot, LATENCY_BUCKETS_SECONDS, MeteredStore, MetricsSnapshot, OpSnapshot,
    StoreMetrics,
};
pub use op::Op;
pub use retry::{RetryPolicy, Retryable, is_transient, retry};

/// An opened object store and the key prefix everything of ours lives under.
#[derive(Debug, Clone)]
pub struct Remote {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
}

impl Remote {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        Remote { store, prefix }
    }

    /// A fresh in-memory store with no prefix (tests).
    pub fn memory() -> Self {
        Remote::new(Arc::new(InMemory::new()), Path::default())
    }

    /// The key of `rel` (`"volumes/v/manifest"`) under the prefix. Empty segments are
    /// dropped; characters object_store does not allow in a segment are percent-encoded.
    pub fn key(&self, rel: &str) -> Path {
        self.prefix.parts().chain(Path::from(rel).parts()).collect()
    }

    /// The same prefix over `wrap(store)`: e.g. a [`MeteredStore`] or [`FaultyStore`] around it.
    pub fn wrap(self, wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>) -> Self {
        Remote {
            store: wrap(self.store),
            prefix: self.prefix,
        }
    }

    /// Wraps the store in a [`MeteredStore`] counting into `metrics`.
    pub fn metered(self, metrics: Arc<StoreMetrics>) -> Self {
        self.wrap(|s| Arc::new(MeteredStore::new(s, metrics)))
    }
}

/// Appends a checksum line to a small text object (a lease record, a manifest): a
/// newline, the crc32c of the body in hex, a newline. Bytes damaged on the way that still
/// parse (a flipped digit) are caught by [`strip_checksum`].
pub fn append_checksum(body: &mut Vec<u8>) {
    let crc = crc32c::crc32c(body);
    body.extend_from_slice(format!("\n{crc:08x}\n").as_bytes());
}

/// The body of an object written with [`append_checksum`], if its checksum matches.
pub fn strip_checksum(object: &[u8]) -> Result<&[u8], String> {
    let object = object.strip_suffix(b"\n").unwrap_or(object);
    let nl = object
        .iter()
        .rposition(|b| *b == b'\n')
        .ok_or("no checksum line")?;
    let (body, tail) = (&object[..nl], &object[nl + 1..]);
    let want = std::str::from_utf8(tail)
        .ok()
        .and_then(|t| u32::from_str_radix(t, 16).ok())
        .ok_or("unreadable checksum line")?;
    let got = crc32c::crc32c(body);
    if got != want {
        return Err(format!(
            "checksum mismatch: stored {want:08x}, computed {got:08x}"
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use object_store::{ObjectStoreExt, PutPayload};

    use super::*;

    #[test]
    fn keys_join_the_prefix() {
        let r = Remote::new(Arc::new(InMemory::new()), Path::from("a/b"));
        assert_eq!(
            r.key("volumes/v/manifest"),
            Path::from("a/b/volumes/v/manifest")
        );
        assert_eq!(r.key("/x//y/"), Path::from("a/b/x/y"));
        assert_eq!(r.key(""), Path::from("a/b"));
        assert_eq!(Remote::memory().key("c/d"), Path::from("c/d"));
    }

    #[tokio::test]
    async fn metered_remote_counts() {
        let metrics = StoreMetrics::new();
        let r = Remote::memory().metered(metrics.clone());
        r.store
            .put(&r.key("k"), PutPayload::from_static(b"abc"))
            .await
            .unwrap();
        let snap = metrics.snapshot();
        assert_eq!(snap.op(Op::Put).requests, 1);
        assert_eq!(snap.bytes_out, 3);
    }
}
