//! A fault-injecting object store for tests: [`FaultyStore`] wraps any [`ObjectStore`] and,
//! as its shared [`FaultConfig`] says (changeable while requests run), delays requests, fails
//! them, hangs them until a timeout, flips bits in the bytes reads return, and "loses the
//! answer" of a put that was in fact applied.
//!
//! Injected errors are `object_store::Error::Generic { store: "FaultyStore", source }` whose
//! source is an [`InjectedFault`], so [`is_transient`](super::is_transient) (and thus
//! [`retry()`](super::retry())) can tell transient from permanent ones, and tests can recognise
//! them with [`InjectedFault::find`].
//!
//! With [`FaultConfig::seeded`], every random decision comes from one seeded RNG, so a
//! sequential test replays the same faults for the same seed. Decisions are drawn in request
//! order; concurrent requests make the order (not the rates) scheduling dependent.
//!
//! Granularity: one decision per `ObjectStore` call. A multipart upload is checked when it
//! starts and when it completes, not per part; `delete_stream` is checked per path (and
//! deletes them one at a time, so a fault hits exactly the path it names).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    Attributes, CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result, UploadPart,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::op::Op;

const STORE: &str = "FaultyStore";

/// What an injected fault pretends to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A failure that may go away (a 503, a reset connection).
    Transient,
    /// A failure that will not (a 403, a corrupt request).
    Permanent,
    /// The request hung for [`FaultSettings::timeout`] and was abandoned; transient.
    Timeout,
    /// The request was applied but its answer lost (a put whose response never arrived);
    /// transient, and retrying a conditional put then meets its own object.
    LostAck,
}

/// The source of every error a [`FaultyStore`] injects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected {kind:?} fault on {op}")]
pub struct InjectedFault {
    pub op: Op,
    pub kind: FaultKind,
}

impl InjectedFault {
    pub fn is_transient(&self) -> bool {
        self.kind != FaultKind::Permanent
    }

    pub fn into_error(self) -> object_store::Error {
        object_store::Error::Generic {
            store: STORE,
            source: Box::new(self),
        }
    }

    /// The injected fault behind `err`, if it is one.
    pub fn find(err: &object_store::Error) -> Option<&InjectedFault> {
        match err {
            object_store::Error::Generic { source, .. } => source.downcast_ref::<InjectedFault>(),
            _ => None,
        }
    }
}

/// A probability in `0.0..=1.0` per kind of request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpRates {
    pub get: f64,
    pub get_range: f64,
    pub put: f64,
    pub delete: f64,
    pub list: f64,
    pub head: f64,
}

impl OpRates {
    pub fn all(rate: f64) -> Self {
        OpRates {
            get: rate,
            get_range: rate,
            put: rate,
            delete: rate,
            list: rate,
            head: rate,
        }
    }

    pub fn only(op: Op, rate: f64) -> Self {
        let mut r = OpRates::default();
        r.set(op, rate);
        r
    }

    pub fn get(&self, op: Op) -> f64 {
        match op {
            Op::Get => self.get,
            Op::GetRange => self.get_range,
            Op::Put => self.put,
            Op::Delete => self.delete,
            Op::List => self.list,
            Op::Head => self.head,
        }
    }

    pub fn set(&mut self, op: Op, rate: f64) {
        let slot = match op {
            Op::Get => &mut self.get,
            Op::GetRange => &mut self.get_range,
            Op::Put => &mut self.put,
            Op::Delete => &mut self.delete,
            Op::List => &mut self.list,
            Op::Head => &mut self.head,
        };
        *slot = rate;
    }
}

/// What to inject. The default injects nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultSettings {
    /// Probability that a request fails at once.
    pub error_rate: OpRates,
    /// Make the errors of `error_rate` and [`FaultConfig::fail_next`] permanent instead of
    /// transient.
    pub permanent_errors: bool,
    /// Probability that a request hangs for `timeout`, then fails ([`FaultKind::Timeout`]).
    pub timeout_rate: OpRates,
    pub timeout: Duration,
    /// Added to every request: `latency` plus a uniform `0..=jitter`.
    pub latency: Duration,
    pub jitter: Duration,
    /// Probability that a successful get / ranged get returns its bytes with `corrupt_bits`
    /// bits flipped (at random positions; an empty body cannot be corrupted).
    pub corrupt_rate: f64,
    /// Bits flipped in a corrupted read; 0 means 1.
    pub corrupt_bits: u32,
    /// Probability that a successful put (or copy, rename, multipart completion) reports a
    /// transient error anyway ([`FaultKind::LostAck`]).
    pub lost_ack_rate: f64,
}

impl FaultSettings {
    /// Parses a fault specification, as `blockd serve` reads it from `BLOCKD_TEST_FAULTS`
    /// (for fault-soak tests only): comma-separated `key=value` pairs, every key optional:
    /// `error` (rate of failed requests, all kinds), `permanent` (`true`: those errors are
    /// permanent), `timeout` (rate) and `timeout_ms`, `latency_ms` and `jitter_ms`,
    /// `corrupt` (rate of corrupted reads) and `corrupt_bits`, `lost_ack` (rate of puts
    /// applied but reported failed), `seed` (reproducible decisions). Returns the settings
    /// and the seed, if given.
    pub fn parse_spec(spec: &str) -> std::result::Result<(FaultSettings, Option<u64>), String> {
        let mut s = FaultSettings::default();
        let mut seed = None;
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("fault spec item {item:?} is not key=value"))?;
            let rate = || -> std::result::Result<f64, String> {
                v.parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("fault spec {k}: {v:?} is not a rate in 0..=1"))
            };
            let int = || -> std::result::Result<u64, String> {
                v.parse::<u64>()
                    .map_err(|_| format!("fault spec {k}: {v:?} is not an integer"))
            };
            match k.trim() {
                "error" => s.error_rate = OpRates::all(rate()?),
                "permanent" => {
                    s.permanent_errors = v
                        .parse()
                        .map_err(|_| format!("fault spec permanent: {v:?} is not true/false"))?
                }
                "timeout" => s.timeout_rate = OpRates::all(rate()?),
                "timeout_ms" => s.timeout = Duration::from_millis(int()?),
                "latency_ms" => s.latency = Duration::from_millis(int()?),
                "jitter_ms" => s.jitter = Duration::from_millis(int()?),
                "corrupt" => s.corrupt_rate = rate()?,
                "corrupt_bits" => s.corrupt_bits = int()? as u32,
                "lost_ack" => s.lost_ack_rate = rate()?,
                "seed" => seed = Some(int()?),
                other => return Err(format!("fault spec: unknown key {other:?}")),
            }
        }
        Ok((s, seed))
    }
}

/// Counts of what was injected, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Immediate errors (from `error_rate` or `fail_next`), per [`Op::index`].
    pub errors: [u64; Op::COUNT],
    pub timeouts: u64,
    pub corrupted_reads: u64,
    pub lost_acks: u64,
    /// Requests that were delayed by `latency` / `jitter`.
    pub delayed: u64,
}

impl FaultStats {
    pub fn errors_of(&self, op: Op) -> u64 {
        self.errors[op.index()]
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Every injected failure a caller saw as an error (not corruption, not delay).
    pub fn failures_total(&self) -> u64 {
        self.errors_total() + self.timeouts + self.lost_acks
    }
}

#[derive(Debug, Default)]
struct Counters {
    errors: [AtomicU64; Op::COUNT],
    timeouts: AtomicU64,
    corrupted_reads: AtomicU64,
    lost_acks: AtomicU64,
    delayed: AtomicU64,
}

/// The shared, runtime-changeable fault configuration of one or more [`FaultyStore`]s.
#[derive(Debug)]
pub struct FaultConfig {
    settings: Mutex<FaultSettings>,
    fail_next: AtomicU64,
    rng: Mutex<StdRng>,
    counters: Counters,
}

/// The decisions for one request, drawn up front so no lock is held across an await.
#[derive(Debug, Clone, Copy)]
struct Plan {
    delay: Duration,
    fail: Option<FaultKind>,
    timeout: Option<Duration>,
    /// Seed for the bit positions if the read is to be corrupted.
    corrupt: Option<(u64, u32)>,
    lost_ack: bool,
}

impl FaultConfig {
    /// Faults drawn from an OS-seeded RNG.
    pub fn new(settings: FaultSettings) -> Arc<Self> {
        Self::with_rng(settings, StdRng::from_os_rng())
    }

    /// Faults drawn from an RNG seeded with `seed`: reproducible for a sequential workload.
    pub fn seeded(settings: FaultSettings, seed: u64) -> Arc<Self> {
        Self::with_rng(settings, StdRng::seed_from_u64(seed))
    }

    fn with_rng(settings: FaultSettings, rng: StdRng) -> Arc<Self> {
        Arc::new(FaultConfig {
            settings: Mutex::new(settings),
            fail_next: AtomicU64::new(0),
            rng: Mutex::new(rng),
            counters: Counters::default(),
        })
    }

    pub fn settings(&self) -> FaultSettings {
        *self.settings.lock()
    }

    pub fn set(&self, settings: FaultSettings) {
        *self.settings.lock() = settings;
    }

    pub fn update(&self, f: impl FnOnce(&mut FaultSettings)) {
        f(&mut self.settings.lock());
    }

    /// Stop injecting anything (pending `fail_next` included); counters are kept.
    pub fn clear(&self) {
        self.set(FaultSettings::default());
        self.fail_next.store(0, Ordering::SeqCst);
    }

    /// Fail the next `n` requests of any kind (transient unless `permanent_errors`),
    /// replacing any count still pending.
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    pub fn reseed(&self, seed: u64) {
        *self.rng.lock() = StdRng::seed_from_u64(seed);
    }

    pub fn stats(&self) -> FaultStats {
        let c = &self.counters;
        let mut errors = [0; Op::COUNT];
        for (out, n) in errors.iter_mut().zip(&c.errors) {
            *out = n.load(Ordering::Relaxed);
        }
        FaultStats {
            errors,
            timeouts: c.timeouts.load(Ordering::Relaxed),
            corrupted_reads: c.corrupted_reads.load(Ordering::Relaxed),
            lost_acks: c.lost_acks.load(Ordering::Relaxed),
            delayed: c.delayed.load(Ordering::Relaxed),
        }
    }

    fn take_fail_next(&self) -> bool {
        self.fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn plan(&self, op: Op) -> Plan {
        let s = self.settings();
        let mut rng = self.rng.lock();
        let mut delay = s.latency;
        if !s.jitter.is_zero() {
            let j = rng.random_range(0..=s.jitter.as_nanos().min(u64::MAX as u128) as u64);
            delay += Duration::from_nanos(j);
        }
        let error_kind = if s.permanent_errors {
            FaultKind::Permanent
        } else {
            FaultKind::Transient
        };
        let mut plan = Plan {
            delay,
            fail: None,
            timeout: None,
            corrupt: None,
            lost_ack: false,
        };
        if self.take_fail_next() || chance(&mut rng, s.error_rate.get(op)) {
            plan.fail = Some(error_kind);
        } else if chance(&mut rng, s.timeout_rate.get(op)) {
            plan.timeout = Some(s.timeout);
        } else if op.reads_data() && chance(&mut rng, s.corrupt_rate) {
            plan.corrupt = Some((rng.random(), s.corrupt_bits.max(1)));
        } else if op == Op::Put && chance(&mut rng, s.lost_ack_rate) {
            plan.lost_ack = true;
        }
        plan
    }

    /// Delays, then fails or times out the request, as planned; returns the plan for the
    /// decisions that apply after the inner store answered.
    async fn before(&self, op: Op) -> Result<Plan> {
        let plan = self.plan(op);
        if !plan.delay.is_zero() {
            self.counters.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(plan.delay).await;
        }
        if let Some(kind) = plan.fail {
            self.counters.errors[op.index()].fetch_add(1, Ordering::Relaxed);
            return Err(InjectedFault { op, kind }.into_error());
        }
        if let Some(timeout) = plan.timeout {
            self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(timeout).await;
            return Err(InjectedFault {
                op,
                kind: FaultKind::Timeout,
            }
            .into_error());
        }
        Ok(plan)
    }

    /// Turns a successful put into a lost answer, if planned.
    fn after_put<T>(&self, plan: Plan, result: Result<T>) -> Result<T> {
        match result {
            Ok(_) if plan.lost_ack => {
                self.counters.lost_acks.fetch_add(1, Ordering::Relaxed);
                Err(InjectedFault {
                    op: Op::Put,
                    kind: FaultKind::LostAck,
                }
                .into_error())
            }
            r => r,
        }
    }

    fn corrupt(&self, plan: Plan, data: Bytes) -> Bytes {
        let Some((seed, bits)) = plan.corrupt else {
            return data;
        };
        if data.is_empty() {
            return data;
        }
        self.counters
            .corrupted_reads
            .fetch_add(1, Ordering::Relaxed);
        flip_bits(data, seed, bits)
    }
}

fn chance(rng: &mut StdRng, p: f64) -> bool {
    // `random::<f64>()` is in [0, 1): a rate of 0 never fires, a rate of 1 always does.
    p > 0.0 && rng.random::<f64>() < p
}

/// Flips `bits` bits of `data` at positions drawn from `seed` (a position may repeat, so
/// an even number of flips of one bit can cancel out; with one bit, it never does).
fn flip_bits(data: Bytes, seed: u64, bits: u32) -> Bytes {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = BytesMut::from(&data[..]);
    for _ in 0..bits {
        let bit = rng.random_range(0..buf.len() as u64 * 8);
        buf[(bit / 8) as usize] ^= 1 << (bit % 8);
    }
    buf.freeze()
}

/// An [`ObjectStore`] that injects the faults its [`FaultConfig`] describes into every
/// request it passes to `inner`.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: Arc<S>,
    faults: Arc<FaultConfig>,
}

impl<S: ObjectStore> FaultyStore<S> {
    pub fn new(inner: S, faults: Arc<FaultConfig>) -> Self {
        FaultyStore {
            inner: Arc::new(inner),
            faults,
        }
    }

    pub fn faults(&self) -> &Arc<FaultConfig> {
        &self.faults
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: ObjectStore> fmt::Display for FaultyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<S: ObjectStore> ObjectStore for FaultyStore<S> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let plan = self.faults.before(Op::Put).await?;
        let r = self.inner.put_opts(location, payload, opts).await;
        self.faults.after_put(plan, r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.faults.before(Op::Put).await?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            faults: Arc::clone(&self.faults),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = Op::of_get(&options);
        let plan = self.faults.before(op).await?;
        let result = self.inner.get_opts(location, options).await?;
        if plan.corrupt.is_none() || !op.reads_data() {
            return Ok(result);
        }
        // Read the body to corrupt it; the result then carries it as a one-chunk stream.
        let GetResult {
            payload,
            meta,
            range,
            attributes,
            extensions,
        } = result;
        let whole = GetResult {
            payload,
            meta: meta.clone(),
            range: range.clone(),
            attributes: Attributes::new(),
            extensions: Default::default(),
        };
        let data = self.faults.corrupt(plan, whole.bytes().await?);
        Ok(GetResult {
            payload: GetResultPayload::Stream(stream::once(async move { Ok(data) }).boxed()),
            meta,
            range,
            attributes,
            extensions,
        })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let plan = self.faults.before(Op::GetRange).await?;
        let parts = self.inner.get_ranges(location, ranges).await?;
        if plan.corrupt.is_none() {
            return Ok(parts);
        }
        // Corrupt the first non-empty range.
        let mut parts = parts;
        if let Some(p) = parts.iter_mut().find(|p| !p.is_empty()) {
            *p = self.faults.corrupt(plan, std::mem::take(p));
        }
        Ok(parts)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let inner = Arc::clone(&self.inner);
        let faults = Arc::clone(&self.faults);
        locations
            .then(move |location| {
                let inner = Arc::clone(&inner);
                let faults = Arc::clone(&faults);
                async move {
                    let location = location?;
                    faults.before(Op::Delete).await?;
                    let one = stream::once(async move { Ok(location) }).boxed();
                    let mut out = inner.delete_stream(one);
                    out.next().await.unwrap_or_else(|| {
                        Err(object_store::Error::Generic {
                            store: STORE,
                            source: "inner delete_stream yielded nothing for one path".into(),
                        })
                    })
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let listing = self.inner.list(prefix);
        let faults = Arc::clone(&self.faults);
        stream::once(async move { faults.before(Op::List).await.map(|_| listing) })
            .try_flatten()
            .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let listing = self.inner.list_with_offset(prefix, offset);
        let faults = Arc::clone(&self.faults);
        stream::once(async move { faults.before(Op::List).await.map(|_| listing) })
            .try_flatten()
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.faults.before(Op::List).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let plan = self.faults.before(Op::Put).await?;
        let r = self.inner.copy_opts(from, to, options).await;
        self.faults.after_put(plan, r)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        let plan = self.faults.before(Op::Put).await?;
        let r = self.inner.rename_opts(from, to, options).await;
        self.faults.after_put(plan, r)
    }
}

#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    faults: Arc<FaultConfig>,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let plan = self.faults.before(Op::Put).await?;
        let r = self.inner.complete().await;
        self.faults.after_put(plan, r)
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    #[test]
    fn fault_specs_parse() {
        let (s, seed) =
            FaultSettings::parse_spec("error=0.05, latency_ms=2,jitter_ms=3,lost_ack=0.1,corrupt=0.02,corrupt_bits=3,timeout=0.01,timeout_ms=50,seed=7").unwrap();
        assert_eq!(s.error_rate, OpRates::all(0.05));
        assert_eq!(s.latency, Duration::from_millis(2));
        assert_eq!(s.jitter, Duration::from_millis(3));
        assert_eq!(s.lost_ack_rate, 0.1);
        assert_eq!(s.corrupt_rate, 0.02);
        assert_eq!(s.corrupt_bits, 3);
        assert_eq!(s.timeout_rate, OpRates::all(0.01));
        assert_eq!(s.timeout, Duration::from_millis(50));
        assert!(!s.permanent_errors);
        assert_eq!(seed, Some(7));
        assert_eq!(
            FaultSettings::parse_spec("").unwrap().0,
            FaultSettings::default()
        );
        for bad in ["error=2", "bogus=1", "error", "seed=-1", "permanent=maybe"] {
            assert!(FaultSettings::parse_spec(bad).is_err(), "{bad}");
        }
    }

    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutMode};

    use super::*;
    use crate::remote::retry::is_transient;

    fn store(settings: FaultSettings, seed: u64) -> FaultyStore<InMemory> {
        FaultyStore::new(InMemory::new(), FaultConfig::seeded(settings, seed))
    }

    async fn put(s: &FaultyStore<InMemory>, key: &str, data: &'static [u8]) -> Result<PutResult> {
        s.put(&Path::from(key), PutPayload::from_static(data)).await
    }

    #[tokio::test]
    async fn no_faults_by_default() {
        let s = store(FaultSettings::default(), 1);
        for i in 0..50 {
            put(&s, &format!("k{i}"), b"abc").await.unwrap();
            let got = s
                .get(&Path::from(format!("k{i}")))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(&got[..], b"abc");
        }
        assert_eq!(s.faults().stats(), FaultStats::default());
    }

    #[tokio::test]
    async fn error_rate_is_roughly_honoured_per_op() {
        let s = store(
            FaultSettings {
                error_rate: OpRates::only(Op::Get, 0.3),
                ..FaultSettings::default()
            },
            7,
        );
        put(&s, "k", b"abc").await.unwrap();
        let mut failed = 0;
        for _ in 0..1000 {
            match s.get(&Path::from("k")).await {
                Ok(_) => {}
                Err(e) => {
                    assert!(is_transient(&e));
                    assert_eq!(InjectedFault::find(&e).map(|f| f.op), Some(Op::Get));
                    failed += 1;
                }
            }
        }
        assert!(
            (220..380).contains(&failed),
            "{failed} of 1000 failed at rate 0.3"
        );
        let stats = s.faults().stats();
        assert_eq!(stats.errors_of(Op::Get), failed);
        assert_eq!(stats.errors_total(), failed);
        // Other kinds are untouched.
        for i in 0..100 {
            put(&s, &format!("p{i}"), b"x").await.unwrap();
            s.head(&Path::from("k")).await.unwrap();
        }
    }

    #[tokio::test]
    async fn permanent_errors_are_not_transient() {
        let s = store(
            FaultSettings {
                error_rate: OpRates::all(1.0),
                permanent_errors: true,
                ..FaultSettings::default()
            },
            1,
        );
        let e = put(&s, "k", b"abc").await.unwrap_err();
        assert!(!is_transient(&e));
        assert_eq!(
            InjectedFault::find(&e),
            Some(&InjectedFault {
                op: Op::Put,
                kind: FaultKind::Permanent
            })
        );
    }

    #[tokio::test]
    async fn same_seed_same_faults() {
        async fn run(seed: u64) -> Vec<bool> {
            let s = store(
                FaultSettings {
                    error_rate: OpRates::all(0.5),
                    ..FaultSettings::default()
                },
                seed,
            );
            let mut out = Vec::new();
            for i in 0..64 {
                out.push(put(&s, &format!("k{i}"), b"x").await.is_ok());
            }
            out
        }
        let a = run(42).await;
        assert_eq!(a, run(42).await);
        assert_ne!(a, run(43).await);
    }

    #[tokio::test]
    async fn fail_next_n_then_recover() {
        let s = store(FaultSettings::default(), 1);
        put(&s, "k", b"abc").await.unwrap();
        s.faults().fail_next(3);
        assert!(s.head(&Path::from("k")).await.is_err());
        assert!(put(&s, "k2", b"x").await.is_err());
        assert!(s.list(None).try_collect::<Vec<_>>().await.is_err());
        assert!(s.head(&Path::from("k")).await.is_ok());
        let stats = s.faults().stats();
        assert_eq!(
            (
                stats.errors_of(Op::Head),
                stats.errors_of(Op::Put),
                stats.errors_of(Op::List)
            ),
            (1, 1, 1)
        );
        // The failed put was not applied.
        assert!(matches!(
            s.head(&Path::from("k2")).await,
            Err(object_store::Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn corruption_flips_exactly_one_bit() {
        let s = store(
            FaultSettings {
                corrupt_rate: 1.0,
                ..FaultSettings::default()
            },
            3,
        );
        let data = vec![0u8; 4096];
        s.put(&Path::from("k"), PutPayload::from(data.clone()))
            .await
            .unwrap();
        for _ in 0..20 {
            let got = s
                .get(&Path::from("k"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let flipped: u32 = got
                .iter()
                .zip(&data)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert_eq!(flipped, 1);
            let got = s.get_range(&Path::from("k"), 100..200).await.unwrap();
            assert_eq!(got.len(), 100);
            assert_eq!(got.iter().map(|b| b.count_ones()).sum::<u32>(), 1);
        }
        assert_eq!(s.faults().stats().corrupted_reads, 40);
        // Heads and the store itself are untouched.
        assert_eq!(s.head(&Path::from("k")).await.unwrap().size, 4096);
        let raw = s
            .inner()
            .get(&Path::from("k"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&raw[..], &data[..]);
    }

    #[tokio::test]
    async fn corruption_rate_and_runtime_change() {
        let s = store(FaultSettings::default(), 9);
        let data = vec![0xA5u8; 1024];
        s.put(&Path::from("k"), PutPayload::from(data.clone()))
            .await
            .unwrap();
        s.faults().update(|f| f.corrupt_rate = 0.25);
        let mut bad = 0;
        for _ in 0..400 {
            if s.get(&Path::from("k"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                != data
            {
                bad += 1;
            }
        }
        assert!((60..140).contains(&bad), "{bad} of 400 corrupted at 0.25");
        s.faults().clear();
        for _ in 0..50 {
            assert_eq!(
                s.get(&Path::from("k"))
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap(),
                data
            );
        }
    }

    #[tokio::test]
    async fn timeout_hangs_then_fails_transient() {
        let s = store(
            FaultSettings {
                timeout_rate: OpRates::only(Op::Head, 1.0),
                timeout: Duration::from_millis(50),
                ..FaultSettings::default()
            },
            1,
        );
        put(&s, "k", b"abc").await.unwrap();
        let start = Instant::now();
        let e = s.head(&Path::from("k")).await.unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(is_transient(&e));
        assert_eq!(
            InjectedFault::find(&e).map(|f| f.kind),
            Some(FaultKind::Timeout)
        );
        assert_eq!(s.faults().stats().timeouts, 1);
    }

    #[tokio::test]
    async fn latency_delays_requests() {
        let s = store(
            FaultSettings {
                latency: Duration::from_millis(20),
                jitter: Duration::from_millis(10),
                ..FaultSettings::default()
            },
            1,
        );
        let start = Instant::now();
        put(&s, "k", b"abc").await.unwrap();
        s.head(&Path::from("k")).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(40));
        assert_eq!(s.faults().stats().delayed, 2);
    }

    #[tokio::test]
    async fn lost_ack_applies_the_put() {
        let s = store(
            FaultSettings {
                lost_ack_rate: 1.0,
                ..FaultSettings::default()
            },
            1,
        );
        let e = s
            .put_opts(
                &Path::from("k"),
                PutPayload::from_static(b"abc"),
                PutMode::Create.into(),
            )
            .await
            .unwrap_err();
        assert!(is_transient(&e));
        assert_eq!(s.faults().stats().lost_acks, 1);
        // Retrying the create meets its own object.
        s.faults().clear();
        let e = s
            .put_opts(
                &Path::from("k"),
                PutPayload::from_static(b"abc"),
                PutMode::Create.into(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, object_store::Error::AlreadyExists { .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn delete_and_list_pass_through() {
        let s = store(FaultSettings::default(), 1);
        for i in 0..5 {
            put(&s, &format!("d/{i}"), b"x").await.unwrap();
        }
        assert_eq!(
            s.list(Some(&Path::from("d")))
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
                .len(),
            5
        );
        assert_eq!(
            s.list_with_offset(Some(&Path::from("d")), &Path::from("d/2"))
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
                .len(),
            2
        );
        s.faults().fail_next(1);
        let paths = stream::iter((0..3).map(|i| Ok(Path::from(format!("d/{i}"))))).boxed();
        let results: Vec<_> = s.delete_stream(paths).collect().await;
        assert!(results[0].is_err());
        assert!(results[1].is_ok() && results[2].is_ok());
        let left: Vec<_> = s.list(Some(&Path::from("d"))).try_collect().await.unwrap();
        let mut left: Vec<String> = left.into_iter().map(|m| m.location.to_string()).collect();
        left.sort();
        assert_eq!(left, ["d/0", "d/3", "d/4"]);
        let listed = s.list_with_delimiter(None).await.unwrap();
        assert_eq!(listed.common_prefixes, [Path::from("d")]);
        s.copy(&Path::from("d/0"), &Path::from("e")).await.unwrap();
        s.rename(&Path::from("e"), &Path::from("f")).await.unwrap();
        assert!(s.head(&Path::from("f")).await.is_ok());
        let mut up = s.put_multipart(&Path::from("m")).await.unwrap();
        up.put_part(PutPayload::from_static(b"part")).await.unwrap();
        up.complete().await.unwrap();
        assert_eq!(
            s.get_ranges(&Path::from("m"), &[0..2, 2..4]).await.unwrap(),
            [&b"pa"[..], &b"rt"[..]]
        );
    }
}
