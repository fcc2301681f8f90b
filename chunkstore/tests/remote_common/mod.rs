//! Scenarios every object-store backend must pass, shared by `remote_backends.rs` (memory,
//! local directory) and `remote_s3.rs` (a real S3 server). Each takes a [`Remote`] whose
//! prefix is private to the scenario.

#![allow(dead_code)] // each test crate uses a subset
#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chunkstore::remote::{
    FaultConfig, FaultSettings, FaultyStore, Lease, LeaseError, Op, OpRates, Remote, RetryPolicy,
    StoreMetrics, is_transient, retry,
};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion};

/// Whether a backend implements `PutMode::Update` (compare-and-swap on the ETag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateSupport {
    Supported,
    /// `put_opts` answers `Error::NotImplemented`.
    NotImplemented,
}

/// A retry policy fast enough for tests with many injected faults.
pub fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 50,
        initial_backoff: Duration::from_micros(100),
        max_backoff: Duration::from_millis(2),
        ..RetryPolicy::default()
    }
}

async fn get_bytes(r: &Remote, rel: &str) -> object_store::Result<Bytes> {
    r.store.get(&r.key(rel)).await?.bytes().await
}

async fn listed(r: &Remote, rel: &str) -> Vec<String> {
    let metas: Vec<_> = r.store.list(Some(&r.key(rel))).try_collect().await.unwrap();
    let mut names: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
    names.sort();
    names
}

/// put / get / ranged get / head / list / delete / copy.
pub async fn basic_ops(r: &Remote) {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    r.store
        .put(&r.key("chunks/a"), PutPayload::from(data.clone()))
        .await
        .unwrap();
    r.store
        .put(&r.key("chunks/b"), PutPayload::from_static(b"bee"))
        .await
        .unwrap();
    r.store
        .put(&r.key("meta/m"), PutPayload::from_static(b"meta"))
        .await
        .unwrap();

    assert_eq!(get_bytes(r, "chunks/a").await.unwrap(), data);
    let range = r
        .store
        .get_range(&r.key("chunks/a"), 4096..8192)
        .await
        .unwrap();
    assert_eq!(&range[..], &data[4096..8192]);
    let parts = r
        .store
        .get_ranges(
            &r.key("chunks/a"),
            &[0..10, 65_536..65_600, 99_990..100_000],
        )
        .await
        .unwrap();
    assert_eq!(&parts[0][..], &data[0..10]);
    assert_eq!(&parts[1][..], &data[65_536..65_600]);
    assert_eq!(&parts[2][..], &data[99_990..100_000]);
    assert_eq!(
        r.store.head(&r.key("chunks/a")).await.unwrap().size,
        100_000
    );

    let prefix = r.key("");
    let child = |s: &str| r.key(s).to_string();
    assert_eq!(
        listed(r, "chunks").await,
        [child("chunks/a"), child("chunks/b")]
    );
    let by_dir = r.store.list_with_delimiter(Some(&prefix)).await.unwrap();
    let mut dirs: Vec<String> = by_dir
        .common_prefixes
        .iter()
        .map(ToString::to_string)
        .collect();
    dirs.sort();
    assert_eq!(dirs, [child("chunks"), child("meta")]);

    r.store
        .copy(&r.key("chunks/b"), &r.key("chunks/c"))
        .await
        .unwrap();
    assert_eq!(&get_bytes(r, "chunks/c").await.unwrap()[..], b"bee");

    r.store.delete(&r.key("chunks/b")).await.unwrap();
    assert!(matches!(
        get_bytes(r, "chunks/b").await,
        Err(object_store::Error::NotFound { .. })
    ));
    assert!(matches!(
        r.store.head(&r.key("chunks/b")).await,
        Err(object_store::Error::NotFound { .. })
    ));
    assert_eq!(
        listed(r, "chunks").await,
        [child("chunks/a"), child("chunks/c")]
    );
    // Not-found errors are permanent: retry must not spin on them.
    let e = r.store.head(&r.key("nope")).await.unwrap_err();
    assert!(!is_transient(&e));
}

/// `PutMode::Create` on every backend; `PutMode::Update` where `update` says so, and the
/// exact error where it is not supported.
pub async fn conditional_puts(r: &Remote, update: UpdateSupport) {
    let k = r.key("volumes/v/manifest");
    let first = r
        .store
        .put_opts(&k, PutPayload::from_static(b"v1"), PutMode::Create.into())
        .await
        .unwrap();
    let e = r
        .store
        .put_opts(
            &k,
            PutPayload::from_static(b"v1-again"),
            PutMode::Create.into(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, object_store::Error::AlreadyExists { .. }),
        "{e}"
    );
    assert!(!is_transient(&e));
    assert_eq!(
        &get_bytes(r, "volumes/v/manifest").await.unwrap()[..],
        b"v1"
    );

    let v1 = UpdateVersion::from(first);
    let updated = r
        .store
        .put_opts(
            &k,
            PutPayload::from_static(b"v2"),
            PutMode::Update(v1.clone()).into(),
        )
        .await;
    match update {
        UpdateSupport::Supported => {
            let v2 = UpdateVersion::from(updated.unwrap());
            assert_ne!(v1, v2);
            assert_eq!(
                &get_bytes(r, "volumes/v/manifest").await.unwrap()[..],
                b"v2"
            );
            // A writer still holding v1 loses.
            let e = r
                .store
                .put_opts(
                    &k,
                    PutPayload::from_static(b"stale"),
                    PutMode::Update(v1).into(),
                )
                .await
                .unwrap_err();
            assert!(matches!(e, object_store::Error::Precondition { .. }), "{e}");
            assert!(!is_transient(&e));
            assert_eq!(
                &get_bytes(r, "volumes/v/manifest").await.unwrap()[..],
                b"v2"
            );
            // The current version wins.
            r.store
                .put_opts(
                    &k,
                    PutPayload::from_static(b"v3"),
                    PutMode::Update(v2).into(),
                )
                .await
                .unwrap();
            assert_eq!(
                &get_bytes(r, "volumes/v/manifest").await.unwrap()[..],
                b"v3"
            );
            // Updating an object that does not exist is a precondition failure too.
            let missing = r.key("volumes/v/missing");
            let e = r
                .store
                .put_opts(
                    &missing,
                    PutPayload::from_static(b"x"),
                    PutMode::Update(UpdateVersion {
                        e_tag: Some("\"0\"".into()),
                        version: None,
                    })
                    .into(),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }
                ),
                "{e}"
            );
        }
        UpdateSupport::NotImplemented => {
            let e = updated.unwrap_err();
            assert!(
                matches!(e, object_store::Error::NotImplemented { .. }),
                "{e}"
            );
            assert_eq!(
                &get_bytes(r, "volumes/v/manifest").await.unwrap()[..],
                b"v1"
            );
        }
    }
}

/// The lease protocol: second owner refused, forced takeover makes the first stale,
/// heartbeat, release.
pub async fn lease_protocol(r: &Remote) {
    let key = r.key("volumes/v/lease");
    let a = Lease::acquire(r.store.clone(), key.clone(), "host-a", false)
        .await
        .unwrap();
    assert_eq!(a.generation(), 1);
    a.check().await.unwrap();
    a.renew().await.unwrap();

    match Lease::acquire(r.store.clone(), key.clone(), "host-b", false).await {
        Err(LeaseError::HeldBy { owner, generation }) => {
            assert_eq!(owner, "host-a");
            assert_eq!(generation, 1);
        }
        other => panic!("expected HeldBy, got {other:?}"),
    }
    // Refusal changed nothing.
    a.check().await.unwrap();

    let b = Lease::acquire(r.store.clone(), key.clone(), "host-b", true)
        .await
        .unwrap();
    assert_eq!(b.generation(), 2);
    b.check().await.unwrap();
    match a.check().await {
        Err(LeaseError::Stale {
            generation,
            current_owner,
            current_generation,
        }) => {
            assert_eq!(
                (generation, current_owner.as_str(), current_generation),
                (1, "host-b", 2)
            );
        }
        other => panic!("expected Stale, got {other:?}"),
    }
    assert!(matches!(a.renew().await, Err(LeaseError::Stale { .. })));
    // The deposed holder cannot take it back without force either.
    assert!(matches!(
        Lease::acquire(r.store.clone(), key.clone(), "host-a", false).await,
        Err(LeaseError::HeldBy { .. })
    ));
    b.renew().await.unwrap();
    let beat = Lease::heartbeat(&r.store, &key).await.unwrap().unwrap();
    assert_eq!((beat.owner.as_str(), beat.generation), ("host-b", 2));

    // Handing over politely: release, then the next owner needs no force.
    b.release().await.unwrap();
    let c = Lease::acquire(r.store.clone(), key.clone(), "host-c", false)
        .await
        .unwrap();
    assert_eq!(c.generation(), 4);
    let cur = Lease::current(&r.store, &key).await.unwrap().unwrap();
    assert_eq!(
        (cur.owner.as_str(), cur.generation, cur.released),
        ("host-c", 4, false)
    );
}

/// Several daemons (separate store handles onto the same location) force-acquiring at once:
/// every generation is granted once and exactly one lease is current afterwards.
pub async fn lease_race(handles: Vec<Remote>, rounds: usize) {
    for round in 0..rounds {
        let key_rel = format!("race/{round}/lease");
        let tasks: Vec<_> = handles
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let store = r.store.clone();
                let key = r.key(&key_rel);
                tokio::spawn(async move {
                    Lease::acquire_with(store, key, &format!("host-{i}"), true, fast_policy()).await
                })
            })
            .collect();
        let mut held = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(l) => held.push(l),
                Err(LeaseError::HeldBy { .. }) => {} // someone forced past us: fine
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert!(!held.is_empty(), "round {round}: nobody got the lease");
        let mut gens: Vec<u64> = held.iter().map(Lease::generation).collect();
        gens.sort_unstable();
        gens.dedup();
        assert_eq!(
            gens.len(),
            held.len(),
            "round {round}: a generation was granted twice: {held:?}"
        );
        let mut current = 0;
        for l in &held {
            if l.check().await.is_ok() {
                current += 1;
            }
        }
        assert_eq!(current, 1, "round {round}: {held:?}");
    }
}

/// The lease over a store that fails requests, loses put answers and delays: the protocol
/// still grants each generation once and fences the old holder.
pub async fn lease_under_faults(r: &Remote, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let faults = FaultConfig::seeded(
            FaultSettings {
                error_rate: OpRates::all(0.15),
                lost_ack_rate: 0.3,
                jitter: Duration::from_millis(1),
                ..FaultSettings::default()
            },
            seed,
        );
        let store: Arc<dyn ObjectStore> =
            Arc::new(FaultyStore::new(r.store.clone(), faults.clone()));
        let key = r.key(&format!("faulty/{seed}/lease"));
        let a = Lease::acquire_with(store.clone(), key.clone(), "a", false, fast_policy())
            .await
            .unwrap();
        assert_eq!(a.generation(), 1, "seed {seed}");
        assert!(
            matches!(
                Lease::acquire_with(store.clone(), key.clone(), "b", false, fast_policy()).await,
                Err(LeaseError::HeldBy { .. })
            ),
            "seed {seed}"
        );
        let b = Lease::acquire_with(store.clone(), key.clone(), "b", true, fast_policy())
            .await
            .unwrap();
        assert_eq!(b.generation(), 2, "seed {seed}");
        assert!(
            matches!(a.check().await, Err(LeaseError::Stale { .. })),
            "seed {seed}"
        );
        b.check().await.unwrap();
        let stats = faults.stats();
        assert!(
            stats.failures_total() > 0,
            "seed {seed}: no fault was injected: {stats:?}"
        );
    }
}

/// Metered over faulty over the backend: retry hides transient faults, the meter sees them,
/// corruption reaches the reader.
pub async fn faults_metrics_retry(r: &Remote) {
    let faults = FaultConfig::seeded(FaultSettings::default(), 5);
    let metrics = StoreMetrics::new();
    let faults_for_wrap = faults.clone();
    let stack = r
        .clone()
        .wrap(|s| Arc::new(FaultyStore::new(s, faults_for_wrap)))
        .metered(metrics.clone());
    let k = stack.key("obj");
    let data = vec![0x5Au8; 8192];
    stack
        .store
        .put(&k, PutPayload::from(data.clone()))
        .await
        .unwrap();

    faults.fail_next(2);
    let got = retry("get", &fast_policy(), || async {
        stack.store.get(&k).await?.bytes().await
    })
    .await
    .unwrap();
    assert_eq!(got, data);
    let snap = metrics.snapshot();
    assert_eq!(snap.op(Op::Get).requests, 3);
    assert_eq!(snap.op(Op::Get).errors, 2);
    assert_eq!(snap.bytes_out, 8192);
    assert_eq!(snap.bytes_in, 8192);
    assert_eq!(faults.stats().errors_of(Op::Get), 2);

    // Permanent faults are not retried.
    faults.update(|f| f.permanent_errors = true);
    faults.fail_next(1);
    let e = retry("head", &fast_policy(), || stack.store.head(&k))
        .await
        .unwrap_err();
    assert!(!is_transient(&e));
    assert_eq!(metrics.snapshot().op(Op::Head).requests, 1);

    // Corruption on reads (a local directory returns a file payload: covered too).
    faults.clear();
    faults.update(|f| f.corrupt_rate = 1.0);
    let got = stack.store.get(&k).await.unwrap().bytes().await.unwrap();
    let flipped: u32 = got
        .iter()
        .zip(&data)
        .map(|(a, b)| (a ^ b).count_ones())
        .sum();
    assert_eq!(flipped, 1);
    let got = stack.store.get_range(&k, 100..4196).await.unwrap();
    assert_eq!(got.len(), 4096);
    assert_ne!(&got[..], &data[100..4196]);
    assert_eq!(faults.stats().corrupted_reads, 2);
    faults.clear();
    assert_eq!(
        stack.store.get(&k).await.unwrap().bytes().await.unwrap(),
        data
    );
}

/// A fresh key prefix for one scenario.
pub fn scoped(r: &Remote, name: &str) -> Remote {
    Remote::new(r.store.clone(), r.key(name))
}

pub fn path(s: &str) -> Path {
    Path::from(s)
}
