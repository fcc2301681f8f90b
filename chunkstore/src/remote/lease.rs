//! Fencing through the object store: which daemon may write a volume.
//!
//! # Layout
//!
//! Under the lease key `K` (e.g. `volumes/<name>/lease`):
//!
//! ```text
//! K/gen/<generation, 20 digits>   JSON LeaseRecord {owner, generation, token, acquired_at_ms, released}
//! K/heartbeat                     JSON Heartbeat {owner, generation, renewed_at_ms}, informational
//! ```
//!
//! The holder of the lease is the owner of the record with the highest generation, unless
//! that record says `released`.
//!
//! # Protocol
//!
//! Only one conditional operation is used: `PutMode::Create` (create-if-absent), because it
//! is the one every backend has: S3 (`If-None-Match: *`), the local directory (a hard link)
//! and memory. `PutMode::Update` (compare-and-swap on an ETag) is not available on a local
//! directory in object_store 0.14, and one protocol tested on every backend beats two.
//!
//! - `acquire(owner, force)`: list `K/gen/`, read the highest record `G`. If there is none or
//!   it is released, or it is `owner`'s own (a restarted daemon takes its volumes back), or
//!   `force`: create `K/gen/G+1` with `PutMode::Create` and a fresh random token. Otherwise
//!   fail with [`LeaseError::HeldBy`]. If the create meets an existing object, it is either
//!   ours (an earlier attempt whose answer was lost: same token) or a competitor's, and the
//!   decision is taken again from the new state. After creating, list again: if a higher
//!   generation already exists, a competitor forced past us and we report it as the holder.
//!   Finally, generations below ours are deleted (best effort, only to keep the list short).
//! - `check()`: list `K/gen/` and read the highest record; `Ok` iff it is our generation and
//!   token, else [`LeaseError::Stale`].
//! - `renew()`: `check()`, then overwrite `K/heartbeat` with the time. There is no expiry:
//!   the heartbeat only lets an operator or a policy judge whether a holder is alive
//!   before forcing.
//! - `release()`: create `K/gen/G+1` marked `released`, so the next `acquire` needs no force.
//!
//! # Guarantee
//!
//! Assuming the store's create-if-absent is atomic and a list reflects every create that
//! completed before it started (true of S3 since December 2020, of a local directory and of
//! memory; not of every S3-compatible server):
//!
//! 1. At most one `acquire` ever succeeds for a given generation, and generations only grow.
//! 2. After `acquire` returned generation `G` to daemon B, every `check()` or `renew()` of an
//!    older holder A that *starts* later fails with `Stale`, and so does every `acquire` by
//!    another owner without `force` (`HeldBy`).
//! 3. What the lease alone does not give: a write A issued after a successful `check()` but
//!    that lands after B's takeover is not stopped (the check-then-write window). Writes that
//!    must never be overwritten by a stale holder have to carry the fence themselves: write
//!    them to generation-scoped keys (e.g. `manifest/<generation>/...`, with readers taking
//!    the highest generation) or with `PutMode::Create` on a key the new holder also
//!    writes. [`Lease::generation`] exists for this. A `check()` *after* such a write then
//!    tells A whether it still mattered.
//! 4. A crashed holder keeps the lease until someone forces it (or the same owner acquires
//!    again): liveness is an operator's or a policy's decision, not a clock's.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use serde::{Deserialize, Serialize};

use super::retry::{RetryPolicy, retry};

/// Rounds of "read state, try to create the next generation" before giving up under
/// contention.
const MAX_ROUNDS: u32 = 8;

/// Reads of a record that does not parse before it is declared corrupt.
const PARSE_ATTEMPTS: u32 = 4;

/// Why a lease could not be taken or is no longer ours.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease is held by {owner:?} (generation {generation}); take it over with force")]
    HeldBy { owner: String, generation: u64 },
    #[error(
        "lease generation {generation} is stale: {current_owner:?} holds generation {current_generation}"
    )]
    Stale {
        generation: u64,
        current_owner: String,
        current_generation: u64,
    },
    #[error("lease {key}: still contended after {rounds} rounds")]
    Contended { key: String, rounds: u32 },
    #[error("lease record {path} is malformed: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("lease {key}: object store: {source}")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },
}

/// One generation of a lease, as stored in `K/gen/<generation>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub owner: String,
    pub generation: u64,
    /// Random per acquire attempt: tells our own record from a competitor's with the same
    /// owner, and a retried create from a lost race.
    pub token: u64,
    pub acquired_at_ms: u64,
    #[serde(default)]
    pub released: bool,
}

/// The heartbeat a holder writes on [`Lease::renew`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub owner: String,
    pub generation: u64,
    pub renewed_at_ms: u64,
}

/// A held lease. Dropping it does not release it (a crash does not either).
pub struct Lease {
    store: Arc<dyn ObjectStore>,
    key: Path,
    owner: String,
    generation: u64,
    token: u64,
    policy: RetryPolicy,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key.as_ref())
            .field("owner", &self.owner)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Takes the lease at `key` for `owner` (module docs), retrying transient store errors
    /// with the default [`RetryPolicy`].
    pub async fn acquire(
        store: Arc<dyn ObjectStore>,
        key: Path,
        owner_id: &str,
        force: bool,
    ) -> Result<Lease, LeaseError> {
        Self::acquire_with(store, key, owner_id, force, RetryPolicy::default()).await
    }

    /// [`acquire`](Self::acquire) with an explicit retry policy for each store request.
    pub async fn acquire_with(
        store: Arc<dyn ObjectStore>,
        key: Path,
        owner_id: &str,
        force: bool,
        policy: RetryPolicy,
    ) -> Result<Lease, LeaseError> {
        let io = Io {
            store: &store,
            key: &key,
            policy: &policy,
        };
        for _ in 0..MAX_ROUNDS {
            let next = match io.current().await? {
                None => 1,
                Some(cur) if cur.released || cur.owner == owner_id || force => cur.generation + 1,
                Some(cur) => {
                    return Err(LeaseError::HeldBy {
                        owner: cur.owner,
                        generation: cur.generation,
                    });
                }
            };
            let record = LeaseRecord {
                owner: owner_id.to_string(),
                generation: next,
                token: rand::random(),
                acquired_at_ms: now_ms(),
                released: false,
            };
            if !io.create(&record).await? {
                continue; // someone else took `next`: decide again
            }
            // A competitor may have forced past `next` between our list and now.
            match io.current().await? {
                Some(cur) if cur.generation == next && cur.token == record.token => {}
                Some(cur) => {
                    return Err(LeaseError::HeldBy {
                        owner: cur.owner,
                        generation: cur.generation,
                    });
                }
                None => {
                    return Err(LeaseError::Corrupt {
                        path: io.gen_key(next).to_string(),
                        reason: "created, then not listed".into(),
                    });
                }
            }
            io.delete_below(next).await;
            tracing::info!(key = %key, owner = owner_id, generation = next, force, "lease acquired");
            return Ok(Lease {
                owner: record.owner,
                generation: next,
                token: record.token,
                store,
                key,
                policy,
            });
        }
        Err(LeaseError::Contended {
            key: key.to_string(),
            rounds: MAX_ROUNDS,
        })
    }

    /// The current holder's record at `key`, released or not; `None` if never acquired.
    pub async fn current(
        store: &Arc<dyn ObjectStore>,
        key: &Path,
    ) -> Result<Option<LeaseRecord>, LeaseError> {
        Io {
            store,
            key,
            policy: &RetryPolicy::default(),
        }
        .current()
        .await
    }

    /// The last heartbeat written at `key`, if any (it may be of an older generation).
    pub async fn heartbeat(
        store: &Arc<dyn ObjectStore>,
        key: &Path,
    ) -> Result<Option<Heartbeat>, LeaseError> {
        let io = Io {
            store,
            key,
            policy: &RetryPolicy::default(),
        };
        io.read_json(&io.heartbeat_key()).await
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The fencing token: strictly greater for every later holder.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn key(&self) -> &Path {
        &self.key
    }

    fn io(&self) -> Io<'_> {
        Io {
            store: &self.store,
            key: &self.key,
            policy: &self.policy,
        }
    }

    /// `Ok` iff this lease is still the current generation.
    pub async fn check(&self) -> Result<(), LeaseError> {
        match self.io().current().await? {
            Some(cur) if cur.generation == self.generation && cur.token == self.token => Ok(()),
            cur => Err(self.stale(cur)),
        }
    }

    /// Checks the lease and records a heartbeat for observers.
    pub async fn renew(&self) -> Result<(), LeaseError> {
        self.check().await?;
        let io = self.io();
        let beat = Heartbeat {
            owner: self.owner.clone(),
            generation: self.generation,
            renewed_at_ms: now_ms(),
        };
        let body = to_json(&beat)?;
        let path = io.heartbeat_key();
        retry("lease heartbeat", &self.policy, || {
            self.store
                .put_opts(&path, body.clone(), PutMode::Overwrite.into())
        })
        .await
        .map_err(|e| io.store_err(e))?;
        Ok(())
    }

    /// Gives the lease up, so that the next `acquire` needs no force. `Stale` if it was
    /// already taken over.
    pub async fn release(self) -> Result<(), LeaseError> {
        self.check().await?;
        let record = LeaseRecord {
            owner: self.owner.clone(),
            generation: self.generation + 1,
            token: rand::random(),
            acquired_at_ms: now_ms(),
            released: true,
        };
        if self.io().create(&record).await? {
            tracing::info!(key = %self.key, owner = %self.owner, generation = self.generation, "lease released");
            Ok(())
        } else {
            Err(self.stale(self.io().current().await?))
        }
    }

    fn stale(&self, cur: Option<LeaseRecord>) -> LeaseError {
        let (current_owner, current_generation) =
            cur.map(|c| (c.owner, c.generation)).unwrap_or_default();
        LeaseError::Stale {
            generation: self.generation,
            current_owner,
            current_generation,
        }
    }
}

/// The store requests of the protocol, each retried on transient errors.
struct Io<'a> {
    store: &'a Arc<dyn ObjectStore>,
    key: &'a Path,
    policy: &'a RetryPolicy,
}

impl Io<'_> {
    fn gen_dir(&self) -> Path {
        self.key.clone().join("gen")
    }

    fn gen_key(&self, generation: u64) -> Path {
        self.gen_dir().join(format!("{generation:020}").as_str())
    }

    fn heartbeat_key(&self) -> Path {
        self.key.clone().join("heartbeat")
    }

    fn store_err(&self, source: object_store::Error) -> LeaseError {
        LeaseError::Store {
            key: self.key.to_string(),
            source,
        }
    }

    /// Generations present, unordered.
    async fn generations(&self) -> Result<Vec<u64>, LeaseError> {
        let dir = self.gen_dir();
        let metas: Vec<_> = retry("lease list", self.policy, || {
            self.store.list(Some(&dir)).try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| self.store_err(e))?;
        let mut gens = Vec::with_capacity(metas.len());
        for m in metas {
            match m.location.filename().and_then(|f| f.parse::<u64>().ok()) {
                Some(g) => gens.push(g),
                None => tracing::warn!(path = %m.location, "lease: ignoring unexpected object"),
            }
        }
        Ok(gens)
    }

    /// The record of the highest generation.
    async fn current(&self) -> Result<Option<LeaseRecord>, LeaseError> {
        // The highest generation is never deleted, but a listed lower one may be deleted
        // before we read it if a newer holder appeared meanwhile: list again then.
        for _ in 0..MAX_ROUNDS {
            let Some(top) = self.generations().await?.into_iter().max() else {
                return Ok(None);
            };
            let path = self.gen_key(top);
            if let Some(record) = self.read_json::<LeaseRecord>(&path).await? {
                if record.generation != top {
                    return Err(LeaseError::Corrupt {
                        path: path.to_string(),
                        reason: format!("record says generation {}", record.generation),
                    });
                }
                return Ok(Some(record));
            }
        }
        Err(LeaseError::Contended {
            key: self.key.to_string(),
            rounds: MAX_ROUNDS,
        })
    }

    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &Path,
    ) -> Result<Option<T>, LeaseError> {
        // A body whose checksum does not match or that does not parse may have been
        // damaged on the way (bit flips in transit): read it again a few times before
        // calling the record corrupt.
        let mut last = String::new();
        for _ in 0..PARSE_ATTEMPTS {
            let got = retry("lease get", self.policy, || async {
                self.store.get(path).await?.bytes().await
            })
            .await;
            let bytes = match got {
                Ok(b) => b,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.store_err(e)),
            };
            match super::strip_checksum(&bytes) {
                Ok(json) => match serde_json::from_slice(json) {
                    Ok(v) => return Ok(Some(v)),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e,
            }
        }
        Err(LeaseError::Corrupt {
            path: path.to_string(),
            reason: last,
        })
    }

    /// Creates `record`'s generation; `false` if another attempt got it first.
    async fn create(&self, record: &LeaseRecord) -> Result<bool, LeaseError> {
        let path = self.gen_key(record.generation);
        let body = to_json(record)?;
        let put = retry("lease create", self.policy, || {
            self.store
                .put_opts(&path, body.clone(), PutMode::Create.into())
        })
        .await;
        match put {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Ours if an earlier attempt of this very create succeeded unseen.
                let existing = self.read_json::<LeaseRecord>(&path).await?;
                Ok(existing.is_some_and(|r| r.token == record.token))
            }
            Err(e) => Err(self.store_err(e)),
        }
    }

    /// Deletes generations below `generation`; failures only leave garbage behind.
    async fn delete_below(&self, generation: u64) {
        let Ok(gens) = self.generations().await else {
            return;
        };
        for g in gens.into_iter().filter(|&g| g < generation) {
            if let Err(e) = self.store.delete(&self.gen_key(g)).await {
                tracing::debug!(generation = g, error = %e, "lease: old generation not deleted");
            }
        }
    }
}

/// A record as stored: its JSON with a checksum line ([`super::append_checksum`]).
fn to_json<T: Serialize>(v: &T) -> Result<PutPayload, LeaseError> {
    let mut body = serde_json::to_vec(v).map_err(|e| LeaseError::Corrupt {
        path: String::new(),
        reason: format!("encoding: {e}"),
    })?;
    super::append_checksum(&mut body);
    Ok(PutPayload::from(body))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;
    use crate::remote::faults::{FaultConfig, FaultSettings, FaultyStore, OpRates};

    fn mem() -> Arc<dyn ObjectStore> {
        Arc::new(InMemory::new())
    }

    fn key() -> Path {
        Path::from("volumes/v/lease")
    }

    #[tokio::test]
    async fn second_owner_is_refused_and_force_makes_first_stale() {
        let store = mem();
        let a = Lease::acquire(store.clone(), key(), "a", false)
            .await
            .unwrap();
        assert_eq!(a.generation(), 1);
        a.check().await.unwrap();
        a.renew().await.unwrap();
        match Lease::acquire(store.clone(), key(), "b", false).await {
            Err(LeaseError::HeldBy { owner, generation }) => {
                assert_eq!((owner.as_str(), generation), ("a", 1))
            }
            other => panic!("{other:?}"),
        }
        let b = Lease::acquire(store.clone(), key(), "b", true)
            .await
            .unwrap();
        assert_eq!(b.generation(), 2);
        b.check().await.unwrap();
        match a.check().await {
            Err(LeaseError::Stale {
                generation,
                current_owner,
                current_generation,
            }) => assert_eq!(
                (generation, current_owner.as_str(), current_generation),
                (1, "b", 2)
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(a.renew().await, Err(LeaseError::Stale { .. })));
        assert!(matches!(a.release().await, Err(LeaseError::Stale { .. })));
        // Old generations are cleaned up.
        let listed: Vec<_> = store
            .list(Some(&key().join("gen")))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            Lease::current(&store, &key())
                .await
                .unwrap()
                .map(|r| r.owner),
            Some("b".into())
        );
        assert_eq!(
            Lease::heartbeat(&store, &key())
                .await
                .unwrap()
                .map(|h| h.generation),
            Some(1)
        );
    }

    #[tokio::test]
    async fn same_owner_reacquires_and_fences_its_old_incarnation() {
        let store = mem();
        let old = Lease::acquire(store.clone(), key(), "a", false)
            .await
            .unwrap();
        let new = Lease::acquire(store.clone(), key(), "a", false)
            .await
            .unwrap();
        assert_eq!(new.generation(), 2);
        assert!(matches!(old.check().await, Err(LeaseError::Stale { .. })));
        new.check().await.unwrap();
    }

    #[tokio::test]
    async fn release_lets_the_next_owner_in_without_force() {
        let store = mem();
        let a = Lease::acquire(store.clone(), key(), "a", false)
            .await
            .unwrap();
        a.release().await.unwrap();
        let b = Lease::acquire(store.clone(), key(), "b", false)
            .await
            .unwrap();
        assert_eq!(b.generation(), 3);
    }

    #[tokio::test]
    async fn leases_are_independent_per_key() {
        let store = mem();
        let _a = Lease::acquire(store.clone(), Path::from("v1/lease"), "a", false)
            .await
            .unwrap();
        let b = Lease::acquire(store.clone(), Path::from("v2/lease"), "b", false)
            .await
            .unwrap();
        assert_eq!(b.generation(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_forced_acquires_leave_exactly_one_holder() {
        for seed in 0..20 {
            // Random delays make the acquirers' requests interleave.
            let faults = FaultConfig::seeded(
                FaultSettings {
                    jitter: std::time::Duration::from_millis(2),
                    ..FaultSettings::default()
                },
                seed,
            );
            let store: Arc<dyn ObjectStore> = Arc::new(FaultyStore::new(InMemory::new(), faults));
            let tasks: Vec<_> = (0..4)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        Lease::acquire(store, key(), &format!("o{i}"), true).await
                    })
                })
                .collect();
            let mut held = Vec::new();
            for t in tasks {
                if let Ok(lease) = t.await.unwrap() {
                    held.push(lease);
                }
            }
            let mut current = 0;
            for l in &held {
                if l.check().await.is_ok() {
                    current += 1;
                }
            }
            assert_eq!(current, 1, "exactly one current holder among {held:?}");
            let mut gens: Vec<u64> = held.iter().map(Lease::generation).collect();
            gens.sort();
            gens.dedup();
            assert_eq!(
                gens.len(),
                held.len(),
                "a generation was granted twice: {held:?}"
            );
        }
    }

    #[tokio::test]
    async fn survives_transient_faults_and_lost_acks() {
        for seed in 0..20 {
            let faults = FaultConfig::seeded(
                FaultSettings {
                    error_rate: OpRates::all(0.2),
                    lost_ack_rate: 0.3,
                    ..FaultSettings::default()
                },
                seed,
            );
            let store: Arc<dyn ObjectStore> =
                Arc::new(FaultyStore::new(InMemory::new(), faults.clone()));
            let policy = RetryPolicy {
                max_attempts: 50,
                initial_backoff: std::time::Duration::from_micros(10),
                max_backoff: std::time::Duration::from_micros(100),
                ..RetryPolicy::default()
            };
            let a = Lease::acquire_with(store.clone(), key(), "a", false, policy.clone())
                .await
                .unwrap();
            assert_eq!(a.generation(), 1, "seed {seed}");
            assert!(matches!(
                Lease::acquire_with(store.clone(), key(), "b", false, policy.clone()).await,
                Err(LeaseError::HeldBy { .. })
            ));
            let b = Lease::acquire_with(store.clone(), key(), "b", true, policy.clone())
                .await
                .unwrap();
            assert_eq!(b.generation(), 2, "seed {seed}");
            assert!(matches!(a.check().await, Err(LeaseError::Stale { .. })));
            b.check().await.unwrap();
            assert!(faults.stats().failures_total() > 0);
        }
    }

    #[tokio::test]
    async fn permanent_store_errors_surface() {
        let faults = FaultConfig::seeded(
            FaultSettings {
                permanent_errors: true,
                ..FaultSettings::default()
            },
            1,
        );
        let store: Arc<dyn ObjectStore> =
            Arc::new(FaultyStore::new(InMemory::new(), faults.clone()));
        faults.fail_next(1);
        assert!(matches!(
            Lease::acquire(store, key(), "a", false).await,
            Err(LeaseError::Store { .. })
        ));
    }
}
