//! Request metrics of an object store: [`MeteredStore`] wraps any [`ObjectStore`] and counts,
//! per [`Op`], requests, errors and latency, plus the bytes read from and written to the store,
//! in plain atomics. [`StoreMetrics::snapshot`] is what the daemon exports:
//!
//! | metric | type | labels | from |
//! |---|---|---|---|
//! | `chunkstore_object_requests_total` | counter | `op` | [`OpSnapshot::requests`] |
//! | `chunkstore_object_request_errors_total` | counter | `op` | [`OpSnapshot::errors`] |
//! | `chunkstore_object_request_seconds` | histogram | `op` | [`OpSnapshot::latency`] |
//! | `chunkstore_object_bytes_total` | counter | `direction="in"` (read from the store) / `"out"` (written) | [`MetricsSnapshot::bytes_in`], [`MetricsSnapshot::bytes_out`] |
//!
//! What one "request" is: one `ObjectStore` call (a `list` is one request however many pages
//! the store fetches; each path of a `delete_stream` is one delete). Latency of a get is the
//! time to the response head (the body streams afterwards, its bytes are counted as they
//! arrive); of a list, the time until the listing ended or was dropped; of a path of a
//! `delete_stream`, the time since the previous path's answer. An error while a get's body
//! streams counts as an error of that get (so errors may exceed failed calls).

use std::fmt;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
    UploadPart,
};

use super::op::Op;

/// Upper bounds (seconds) of the latency histogram buckets; a last `+Inf` bucket follows.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BUCKETS: usize = LATENCY_BUCKETS_SECONDS.len() + 1;

#[derive(Debug, Default)]
struct Histogram {
    /// Non-cumulative counts; index `LATENCY_BUCKETS_SECONDS.len()` is `+Inf`.
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut counts = [0; BUCKETS];
        for (out, b) in counts.iter_mut().zip(&self.buckets) {
            *out = b.load(Ordering::Relaxed);
        }
        HistogramSnapshot {
            counts,
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)).as_secs_f64(),
        }
    }
}

/// A latency histogram at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative): `counts[i]` for `i <
    /// LATENCY_BUCKETS_SECONDS.len()` fell in `(LATENCY_BUCKETS_SECONDS[i-1],
    /// LATENCY_BUCKETS_SECONDS[i]]`, the last one above every bound.
    pub counts: [u64; BUCKETS],
    pub count: u64,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// `(upper bound, cumulative count)` pairs as Prometheus writes them, `+Inf` last.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let bounds = LATENCY_BUCKETS_SECONDS
            .iter()
            .copied()
            .chain([f64::INFINITY]);
        bounds.zip(self.counts.iter().scan(0u64, |acc, c| {
            *acc += c;
            Some(*acc)
        }))
    }
}

/// The counters of one [`Op`] at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpSnapshot {
    pub op: Op,
    pub requests: u64,
    pub errors: u64,
    pub latency: HistogramSnapshot,
}

/// All counters of a [`StoreMetrics`] at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Indexed by [`Op::index`].
    pub ops: [OpSnapshot; Op::COUNT],
    /// Bytes read from the store (get bodies).
    pub bytes_in: u64,
    /// Bytes written to the store (put payloads, multipart parts).
    pub bytes_out: u64,
}

impl MetricsSnapshot {
    pub fn op(&self, op: Op) -> &OpSnapshot {
        &self.ops[op.index()]
    }

    pub fn requests_total(&self) -> u64 {
        self.ops.iter().map(|o| o.requests).sum()
    }

    pub fn errors_total(&self) -> u64 {
        self.ops.iter().map(|o| o.errors).sum()
    }
}

/// Counters shared by a [`MeteredStore`] and whoever exports them.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    requests: [AtomicU64; Op::COUNT],
    errors: [AtomicU64; Op::COUNT],
    latency: [Histogram; Op::COUNT],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl StoreMetrics {
    pub fn new() -> Arc<Self> {
        Arc::new(StoreMetrics::default())
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            ops: Op::ALL.map(|op| OpSnapshot {
                op,
                requests: self.requests[op.index()].load(Ordering::Relaxed),
                errors: self.errors[op.index()].load(Ordering::Relaxed),
                latency: self.latency[op.index()].snapshot(),
            }),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }

    fn record<T>(&self, op: Op, start: Instant, r: &Result<T>) {
        self.requests[op.index()].fetch_add(1, Ordering::Relaxed);
        self.latency[op.index()].observe(start.elapsed());
        if r.is_err() {
            self.errors[op.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn error(&self, op: Op) {
        self.errors[op.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// An [`ObjectStore`] that records every request it passes to `inner` in a [`StoreMetrics`].
#[derive(Debug)]
pub struct MeteredStore<S> {
    inner: S,
    metrics: Arc<StoreMetrics>,
}

impl<S: ObjectStore> MeteredStore<S> {
    pub fn new(inner: S, metrics: Arc<StoreMetrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    pub fn metrics(&self) -> &Arc<StoreMetrics> {
        &self.metrics
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: ObjectStore> fmt::Display for MeteredStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeteredStore({})", self.inner)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<S: ObjectStore> ObjectStore for MeteredStore<S> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let len = payload.content_length();
        let start = Instant::now();
        let r = self.inner.put_opts(location, payload, opts).await;
        self.metrics.record(Op::Put, start, &r);
        if r.is_ok() {
            self.metrics.bytes_out(len);
        }
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let start = Instant::now();
        let inner = self.inner.put_multipart_opts(location, opts).await;
        if inner.is_err() {
            // The upload never started: a failed put.
            self.metrics.record(Op::Put, start, &inner);
        }
        Ok(Box::new(MeteredUpload {
            inner: inner?,
            metrics: Arc::clone(&self.metrics),
            start,
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = Op::of_get(&options);
        let start = Instant::now();
        let r = self.inner.get_opts(location, options).await;
        self.metrics.record(op, start, &r);
        let mut result = r?;
        result.payload = match result.payload {
            GetResultPayload::Stream(s) => GetResultPayload::Stream(
                CountBytes {
                    inner: s,
                    metrics: Arc::clone(&self.metrics),
                    op,
                }
                .boxed(),
            ),
            // A local file is read by the caller; its range is what it will read.
            file => {
                self.metrics
                    .bytes_in((result.range.end - result.range.start) as usize);
                file
            }
        };
        Ok(result)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let start = Instant::now();
        let r = self.inner.get_ranges(location, ranges).await;
        self.metrics.record(Op::GetRange, start, &r);
        if let Ok(parts) = &r {
            self.metrics.bytes_in(parts.iter().map(Bytes::len).sum());
        }
        r
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        MeteredStream::new(
            self.inner.delete_stream(locations),
            &self.metrics,
            Op::Delete,
            true,
        )
        .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        MeteredStream::new(self.inner.list(prefix), &self.metrics, Op::List, false).boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        MeteredStream::new(
            self.inner.list_with_offset(prefix, offset),
            &self.metrics,
            Op::List,
            false,
        )
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let start = Instant::now();
        let r = self.inner.list_with_delimiter(prefix).await;
        self.metrics.record(Op::List, start, &r);
        r
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let start = Instant::now();
        let r = self.inner.copy_opts(from, to, options).await;
        self.metrics.record(Op::Put, start, &r);
        r
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        let start = Instant::now();
        let r = self.inner.rename_opts(from, to, options).await;
        self.metrics.record(Op::Put, start, &r);
        r
    }
}

/// Counts the bytes of a get body as they arrive, and an error if the body fails.
struct CountBytes {
    inner: BoxStream<'static, Result<Bytes>>,
    metrics: Arc<StoreMetrics>,
    op: Op,
}

impl Stream for CountBytes {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.poll_next_unpin(cx);
        match &item {
            Poll::Ready(Some(Ok(b))) => self.metrics.bytes_in(b.len()),
            Poll::Ready(Some(Err(_))) => self.metrics.error(self.op),
            _ => {}
        }
        item
    }
}

/// Meters a streaming request: a list (one request, timed from the first poll until its end,
/// first error or drop) or a delete stream (one request per item, each timed since the
/// previous item or the first poll).
struct MeteredStream<T> {
    inner: BoxStream<'static, Result<T>>,
    metrics: Arc<StoreMetrics>,
    op: Op,
    per_item: bool,
    timing: Timing,
}

enum Timing {
    NotPolled,
    Since(Instant),
    Recorded,
}

impl<T> MeteredStream<T> {
    fn new(
        inner: BoxStream<'static, Result<T>>,
        metrics: &Arc<StoreMetrics>,
        op: Op,
        per_item: bool,
    ) -> Self {
        MeteredStream {
            inner,
            metrics: Arc::clone(metrics),
            op,
            per_item,
            timing: Timing::NotPolled,
        }
    }

    fn finish(&mut self, r: &Result<()>) {
        if let Timing::Since(start) = std::mem::replace(&mut self.timing, Timing::Recorded) {
            self.metrics.record(self.op, start, r);
        }
    }
}

impl<T> Stream for MeteredStream<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Timing::NotPolled = this.timing {
            this.timing = Timing::Since(Instant::now());
        }
        let item = this.inner.poll_next_unpin(cx);
        match &item {
            Poll::Ready(Some(r)) if this.per_item => {
                if let Timing::Since(start) = this.timing {
                    this.metrics.record(this.op, start, r);
                }
                this.timing = Timing::Since(Instant::now());
            }
            Poll::Ready(Some(Err(_))) => this.finish(&Err(stream_failed())),
            Poll::Ready(None) if !this.per_item => this.finish(&Ok(())),
            _ => {}
        }
        item
    }
}

impl<T> Drop for MeteredStream<T> {
    fn drop(&mut self) {
        if !self.per_item {
            self.finish(&Ok(()));
        }
    }
}

fn stream_failed() -> object_store::Error {
    object_store::Error::Generic {
        store: "MeteredStore",
        source: "stream failed".into(),
    }
}

#[derive(Debug)]
struct MeteredUpload {
    inner: Box<dyn MultipartUpload>,
    metrics: Arc<StoreMetrics>,
    start: Instant,
}

#[async_trait]
impl MultipartUpload for MeteredUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let len = data.content_length();
        let metrics = Arc::clone(&self.metrics);
        let part = self.inner.put_part(data);
        Box::pin(async move {
            let r = part.await;
            if r.is_ok() {
                metrics.bytes_out(len);
            }
            r
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let r = self.inner.complete().await;
        self.metrics.record(Op::Put, self.start, &r);
        r
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;
    use futures::stream;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutMode};

    use super::*;

    fn store() -> MeteredStore<InMemory> {
        MeteredStore::new(InMemory::new(), StoreMetrics::new())
    }

    #[tokio::test]
    async fn counts_requests_bytes_and_errors() {
        let s = store();
        let k = Path::from("a/k");
        s.put(&k, PutPayload::from(vec![7u8; 1000])).await.unwrap();
        s.put(&Path::from("a/j"), PutPayload::from(vec![7u8; 24]))
            .await
            .unwrap();
        let e = s
            .put_opts(&k, PutPayload::from_static(b"x"), PutMode::Create.into())
            .await;
        assert!(e.is_err());
        assert_eq!(s.get(&k).await.unwrap().bytes().await.unwrap().len(), 1000);
        assert_eq!(s.get_range(&k, 10..110).await.unwrap().len(), 100);
        assert_eq!(s.get_ranges(&k, &[0..10, 20..30]).await.unwrap().len(), 2);
        assert_eq!(s.head(&k).await.unwrap().size, 1000);
        assert!(s.head(&Path::from("missing")).await.is_err());
        assert_eq!(
            s.list(Some(&Path::from("a")))
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
                .len(),
            2
        );
        s.list_with_delimiter(None).await.unwrap();
        s.delete(&k).await.unwrap();
        s.copy(&Path::from("a/j"), &Path::from("b")).await.unwrap();

        let snap = s.metrics().snapshot();
        let count = |op| (snap.op(op).requests, snap.op(op).errors);
        assert_eq!(count(Op::Put), (4, 1)); // 2 puts, 1 failed create, 1 copy
        assert_eq!(count(Op::Get), (1, 0));
        assert_eq!(count(Op::GetRange), (2, 0));
        assert_eq!(count(Op::Head), (2, 1));
        assert_eq!(count(Op::List), (2, 0));
        assert_eq!(count(Op::Delete), (1, 0));
        assert_eq!(snap.bytes_out, 1024);
        assert_eq!(snap.bytes_in, 1000 + 100 + 20);
        assert_eq!(snap.requests_total(), 12);
        assert_eq!(snap.errors_total(), 2);
        for op in Op::ALL {
            let h = snap.op(op).latency;
            assert_eq!(h.count, snap.op(op).requests, "{op}");
            assert_eq!(h.counts.iter().sum::<u64>(), h.count);
            assert_eq!(h.cumulative().last(), Some((f64::INFINITY, h.count)));
        }
    }

    #[tokio::test]
    async fn delete_stream_counts_each_path() {
        let s = store();
        for i in 0..3 {
            s.put(&Path::from(format!("d/{i}")), PutPayload::from_static(b"x"))
                .await
                .unwrap();
        }
        let paths = stream::iter((0..3).map(|i| Ok(Path::from(format!("d/{i}"))))).boxed();
        let deleted: Vec<_> = s.delete_stream(paths).try_collect().await.unwrap();
        assert_eq!(deleted.len(), 3);
        assert_eq!(s.metrics().snapshot().op(Op::Delete).requests, 3);
    }

    #[tokio::test]
    async fn dropped_list_counts_once_unpolled_not_at_all() {
        let s = store();
        for i in 0..3 {
            s.put(&Path::from(format!("d/{i}")), PutPayload::from_static(b"x"))
                .await
                .unwrap();
        }
        drop(s.list(None));
        assert_eq!(s.metrics().snapshot().op(Op::List).requests, 0);
        let mut l = s.list(None);
        assert!(l.next().await.is_some());
        drop(l);
        assert_eq!(s.metrics().snapshot().op(Op::List).requests, 1);
    }

    #[test]
    fn histogram_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let snap = h.snapshot();
        assert_eq!(snap.counts[0], 1);
        assert_eq!(snap.counts[2], 1);
        assert_eq!(snap.counts[BUCKETS - 1], 1);
        assert_eq!(snap.count, 3);
        assert!((snap.sum_seconds - 100.0035).abs() < 1e-6);
        let cum: Vec<u64> = snap.cumulative().map(|(_, c)| c).collect();
        assert_eq!(cum[0], 1);
        assert_eq!(cum[1], 1);
        assert_eq!(cum[2], 2);
        assert_eq!(cum[BUCKETS - 1], 3);
    }
}
