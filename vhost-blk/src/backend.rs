//! The vhost-user-blk backend of one connection: `vhost-user-backend` drives the protocol and
//! calls [`BlkBackend::handle_event`] on a worker thread per virtqueue. Each worker runs its
//! queue's requests itself, like one event loop of qemu-storage-daemon:
//!
//! - on a kick it pops the available chains, parses them ([`crate::request`]) and adds a
//!   future per request to the queue's set of requests in flight;
//! - it polls the ready ones inside one [`BlockDevice::batch`], so the disk I/O they start
//!   goes to the kernel in one submission;
//! - the device's [`QueueIo`] (blockd: an io_uring of the queue's own) is polled in the same
//!   epoll as the kick: its completions wake the requests on this thread, which write the
//!   data and status into guest memory and publish the used entries; the guest is
//!   signalled once per round, not once per request;
//! - a request woken from another thread (a write group led by another queue, a flush, an
//!   object-store fetch) wakes the worker through an eventfd in the same epoll.
//!
//! So a request normally never leaves its queue's thread: no runtime wake-up, no thread hop.
//! Requests are futures on the tokio runtime's context (timers, blocking pools, object-store
//! I/O work as usual); they are only polled here.
//!
//! # In-order publication (why reconnects lose nothing)
//!
//! Requests of a queue execute concurrently, but their used entries are published in the
//! order the driver made them available: a completion waits (without blocking anything but
//! its own publication) for the earlier requests of its queue. So at any moment the
//! requests the guest has seen completed are exactly `avail[0..used_idx)`.
//!
//! That is the invariant a vhost-user frontend relies on when the backend goes away without
//! answering `GET_VRING_BASE` (blockd restarting, or crashing): QEMU then resumes the queue
//! at the guest's used index (`virtio_queue_restore_last_avail_idx`), so the new backend
//! re-executes every request the guest has not seen complete, and none that it has.
//! Re-executing a request that had in fact reached the engine is harmless: the guest cannot
//! have issued anything depending on it, and reads/writes/discards are idempotent. Nothing
//! acknowledged is lost: a request is only published after the device completed it (a
//! completed write is in the engine's log and survives a process crash; FLUSH makes it
//! durable across power loss). `vhost-user-backend` 0.24 does not implement
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, which would allow out-of-order publication; the
//! cost of in-order publication is head-of-line blocking of completions (a slow FLUSH
//! delays the completion interrupts of requests behind it on the same queue).
//!
//! When a vring becomes ready (including after a reconnect) it is processed at once, so
//! requests the guest queued while the backend was away do not wait for another kick.
//!
//! # Tearing a connection down
//!
//! `alive` turns false before the daemon closes a connection: from then on nothing touches
//! guest memory (no data, status or used entries: the frontend may already have read the
//! used index it will resume from), requests not yet started are abandoned, and the ones
//! already in the device finish before the connection's attachment is released.

use crate::config::BackendConfig;
use crate::device::{BlockDevice, QueueIo};
use crate::request::{self, ID_BYTES, Limits, Op, Request, STATUS_IOERR, STATUS_OK};
use crate::stats::{RequestKind, VhostStats};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub(crate) type Mem = GuestMemoryMmap<()>;
pub(crate) type AtomicMem = GuestMemoryAtomic<Mem>;
pub(crate) type Vring = VringRwLock<AtomicMem>;

/// Rejected requests logged at warn level per connection (the rest at debug).
const WARN_REJECTED: u32 = 8;

/// State of one connection, shared by its vring workers and its requests in flight.
pub(crate) struct Shared<D: BlockDevice> {
    device: Arc<D>,
    cfg: BackendConfig,
    limits: Limits,
    id: [u8; ID_BYTES],
    features: u64,
    mem: AtomicMem,
    rt: tokio::runtime::Handle,
    stats: Arc<VhostStats>,
    event_idx: AtomicBool,
    /// False once the connection is being torn down (see the module doc).
    alive: RwLock<bool>,
    queues: Vec<InFlight>,
    /// The requests of each queue, run by its worker thread.
    execs: Vec<QueueExec>,
    rejected: AtomicU32,
    name: String,
}

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Epoll data of a queue's extra events (above the queue and exit events, which
/// `vhost-user-backend` numbers `0..=num_queues`).
fn io_event(num_queues: u16) -> u16 {
    num_queues + 1
}
fn wake_event(num_queues: u16) -> u16 {
    num_queues + 2
}

/// One queue's requests in flight and what drives them (see the module doc).
struct QueueExec {
    tasks: Mutex<FuturesUnordered<Task>>,
    waker: Arc<ExecWaker>,
    io: Option<Arc<dyn QueueIo>>,
    attached: AtomicBool,
    /// A request completed on the worker published a used entry: signal at the round's end.
    signal: AtomicBool,
}

/// Wakes a queue's worker: for free on the worker itself (it polls again before it
/// sleeps), through the eventfd from other threads.
struct ExecWaker {
    fd: EventFd,
    notified: AtomicBool,
    worker: OnceLock<ThreadId>,
}

impl ExecWaker {
    fn on_worker(&self) -> bool {
        self.worker.get() == Some(&std::thread::current().id())
    }
}

impl Wake for ExecWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.notified.swap(true, Ordering::AcqRel)
            && !self.on_worker()
            && let Err(e) = self.fd.write(1)
        {
            tracing::error!("cannot wake a vhost-user queue worker: {e}");
        }
    }
}

/// Requests of one queue that were popped and not yet published, in avail order.
#[derive(Default)]
struct InFlight {
    order: Mutex<Order>,
    idle: Condvar,
}

#[derive(Default)]
struct Order {
    /// Sequence number of `slots[0]`.
    front: u64,
    slots: VecDeque<Slot>,
}

#[derive(Clone, Copy)]
enum Slot {
    Pending,
    /// Finished; `Some((head, used_len))` to publish, `None` when nothing may be published.
    Done(Option<(u16, u32)>),
}

enum Outcome<B> {
    Status(u8),
    Data(B),
    Id,
    /// Not executed: the connection was torn down first.
    Abandoned,
}

impl<D: BlockDevice> Shared<D> {
    pub(crate) fn new(
        name: &str,
        device: Arc<D>,
        cfg: BackendConfig,
        mem: AtomicMem,
        rt: tokio::runtime::Handle,
        stats: Arc<VhostStats>,
    ) -> io::Result<Shared<D>> {
        let mut id = [0u8; ID_BYTES];
        let dev_id = device.id();
        let n = dev_id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&dev_id.as_bytes()[..n]);
        let limits = Limits {
            capacity_bytes: device.size_bytes(),
            read_only: device.read_only(),
            max_data_bytes: u64::from(cfg.max_request_bytes),
            max_discard_sectors: cfg.max_discard_sectors,
            max_discard_seg: cfg.max_discard_seg,
            max_write_zeroes_sectors: cfg.max_write_zeroes_sectors,
            max_write_zeroes_seg: cfg.max_write_zeroes_seg,
        };
        let execs = (0..cfg.num_queues)
            .map(|_| {
                Ok(QueueExec {
                    tasks: Mutex::new(FuturesUnordered::new()),
                    waker: Arc::new(ExecWaker {
                        fd: EventFd::new(EFD_NONBLOCK)?,
                        notified: AtomicBool::new(false),
                        worker: OnceLock::new(),
                    }),
                    io: device.queue_io(),
                    attached: AtomicBool::new(false),
                    signal: AtomicBool::new(false),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Shared {
            features: cfg.features(device.read_only()),
            queues: (0..cfg.num_queues).map(|_| InFlight::default()).collect(),
            execs,
            device,
            cfg,
            limits,
            id,
            mem,
            rt,
            stats,
            event_idx: AtomicBool::new(false),
            alive: RwLock::new(true),
            rejected: AtomicU32::new(0),
            name: name.to_string(),
        })
    }

    /// The file descriptors queue `q`'s worker must watch besides its kick, with their
    /// epoll data (for `VringEpollHandler::register_listener`).
    pub(crate) fn queue_fds(&self, q: usize) -> Vec<(RawFd, u64)> {
        let nq = self.cfg.num_queues;
        let Some(ex) = self.execs.get(q) else {
            return Vec::new();
        };
        let mut fds = vec![(ex.waker.fd.as_raw_fd(), u64::from(wake_event(nq)))];
        if let Some(io) = &ex.io {
            fds.push((io.fd(), u64::from(io_event(nq))));
        }
        fds
    }

    /// The workers are gone (joined): requests still in flight go on as runtime tasks, and
    /// their I/O completes through the runtime.
    pub(crate) fn hand_off(&self) {
        for ex in &self.execs {
            if let Some(io) = &ex.io {
                io.detach(&self.rt);
            }
            let tasks = std::mem::take(&mut *ex.tasks.lock());
            for t in tasks {
                self.rt.spawn(t);
            }
        }
    }

    /// From now on nothing touches guest memory; waits for completions doing so right now.
    pub(crate) fn mark_dead(&self) {
        *self.alive.write() = false;
    }

    /// Waits until every queue has nothing in flight; false on timeout.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        (0..self.queues.len()).all(|q| self.wait_queue_idle(q, deadline))
    }

    fn wait_queue_idle(&self, q: usize, deadline: Instant) -> bool {
        let Some(inf) = self.queues.get(q) else {
            return true;
        };
        let mut o = inf.order.lock();
        while !o.slots.is_empty() {
            if inf.idle.wait_until(&mut o, deadline).timed_out() {
                return o.slots.is_empty();
            }
        }
        true
    }

    /// Makes the calling thread queue `q`'s worker (once): its I/O context and waker.
    fn attach_worker(&self, q: usize) {
        let ex = &self.execs[q];
        if ex.attached.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = ex.waker.worker.set(std::thread::current().id());
        if let Some(io) = &ex.io {
            io.attach_thread();
        }
    }

    /// Polls queue `q`'s ready requests until none is ready (on its worker thread); the I/O
    /// they start is submitted as one batch. Then signals the guest once if any request
    /// was published.
    fn run_queue(&self, q: usize, vring: &Vring) {
        let ex = &self.execs[q];
        self.attach_worker(q);
        let waker = Waker::from(ex.waker.clone());
        let mut cx = Context::from_waker(&waker);
        {
            let _ctx = self.rt.enter();
            let mut tasks = ex.tasks.lock();
            self.device.batch(|| {
                loop {
                    ex.waker.notified.store(false, Ordering::Release);
                    while let Poll::Ready(Some(())) = tasks.poll_next_unpin(&mut cx) {}
                    // Woken while polling (on this thread, or the set yielded): go again.
                    if !ex.waker.notified.load(Ordering::Acquire) {
                        break;
                    }
                }
            });
        }
        if ex.signal.swap(false, Ordering::AcqRel) {
            self.signal(q, vring);
        }
    }

    fn signal(&self, q: usize, vring: &Vring) {
        // Without EVENT_IDX this is always true; with it, the driver's used_event decides.
        if vring.needs_notification().unwrap_or(true)
            && let Err(e) = vring.signal_used_queue()
        {
            tracing::debug!(device = %self.name, queue = q, "signal_used_queue: {e}");
        }
    }

    fn process_queue(self: &Arc<Self>, q: usize, vring: &Vring) {
        self.attach_worker(q);
        // With EVENT_IDX, notifications stay off while draining and the ring is checked
        // again after re-enabling them, so no kick is lost in between.
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            self.drain_avail(q, vring);
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(device = %self.name, queue = q, "enable_notification: {e}");
                    break;
                }
            }
        }
    }

    fn drain_avail(self: &Arc<Self>, q: usize, vring: &Vring) {
        let mem = self.mem.memory().into_inner();
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            match state.get_queue_mut().iter(mem.clone()) {
                Ok(it) => it.collect(),
                Err(e) => {
                    tracing::debug!(device = %self.name, queue = q, "queue not usable: {e}");
                    return;
                }
            }
        };
        let tasks = &self.execs[q].tasks;
        for chain in chains {
            let head = chain.head_index();
            let parsed = request::parse(chain, &*mem, &self.limits);
            let seq = self.begin(q);
            match parsed {
                Ok(req) => {
                    self.stats.started(kind_of(&req.op));
                    let this = self.clone();
                    let vring = vring.clone();
                    let mem = mem.clone();
                    tasks.lock().push(Box::pin(async move {
                        let outcome = this.execute(&req, &mem).await;
                        this.finish(q, &vring, seq, head, &req, outcome, &mem);
                    }));
                }
                Err(rej) => {
                    self.stats.started(RequestKind::Rejected);
                    let n = self.rejected.fetch_add(1, Ordering::Relaxed);
                    if n < WARN_REJECTED {
                        tracing::warn!(device = %self.name, queue = q, head, "rejected request: {}", rej.error);
                    } else {
                        tracing::debug!(device = %self.name, queue = q, head, "rejected request: {}", rej.error);
                    }
                    let alive = self.alive.read();
                    let used = if *alive {
                        match rej.status {
                            Some(at) => {
                                let ok = mem.write_obj(rej.error.status(), at).is_ok();
                                Some((head, u32::from(ok)))
                            }
                            // Nowhere to report: give the buffers back untouched.
                            None => Some((head, 0)),
                        }
                    } else {
                        None
                    };
                    self.stats.finished(false);
                    self.complete(q, vring, seq, used, *alive);
                }
            }
        }
    }

    /// Takes the next sequence number of queue `q`.
    fn begin(&self, q: usize) -> u64 {
        let mut o = self.queues[q].order.lock();
        o.slots.push_back(Slot::Pending);
        o.front + o.slots.len() as u64 - 1
    }

    async fn execute(&self, req: &Request, mem: &Mem) -> Outcome<D::Buf> {
        if !*self.alive.read() {
            return Outcome::Abandoned;
        }
        let r = match &req.op {
            Op::Read { len: 0, .. } | Op::Write { len: 0, .. } => Ok(()),
            Op::Read { offset, len } => {
                return match self.device.read(*offset, *len as usize).await {
                    Ok(buf) => Outcome::Data(buf),
                    Err(e) => Outcome::Status(request::device_status(&e)),
                };
            }
            Op::Write { offset, len } => {
                let mut buf = self.device.alloc_buf(*len as usize);
                {
                    let alive = self.alive.read();
                    if !*alive {
                        return Outcome::Abandoned;
                    }
                    if request::gather(mem, &req.data, buf.as_mut()).is_err() {
                        return Outcome::Status(STATUS_IOERR);
                    }
                }
                self.device.write(*offset, buf, false).await
            }
            Op::Flush => self.device.flush().await,
            Op::GetId => return Outcome::Id,
            Op::Discard(ranges) => {
                let mut r = Ok(());
                for x in ranges {
                    r = self.device.discard(x.offset, x.len).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            Op::WriteZeroes(ranges) => {
                let mut r = Ok(());
                for x in ranges {
                    r = self.device.write_zeroes(x.offset, x.len, false).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
        };
        match r {
            Ok(()) => Outcome::Status(STATUS_OK),
            Err(e) => {
                tracing::debug!(device = %self.name, "request failed: {e}");
                Outcome::Status(request::device_status(&e))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        q: usize,
        vring: &Vring,
        seq: u64,
        head: u16,
        req: &Request,
        outcome: Outcome<D::Buf>,
        mem: &Mem,
    ) {
        let alive = self.alive.read();
        let mut ok = false;
        let used = if !*alive {
            None
        } else {
            let written = match outcome {
                Outcome::Abandoned => None,
                Outcome::Status(s) => Some((s, 0)),
                Outcome::Data(buf) => Some(match request::scatter(mem, &req.data, buf.as_ref()) {
                    Ok(n) => (STATUS_OK, n),
                    Err(_) => (STATUS_IOERR, 0),
                }),
                Outcome::Id => {
                    let n = usize::try_from(req.data_len)
                        .unwrap_or(ID_BYTES)
                        .min(ID_BYTES);
                    Some(match request::scatter(mem, &req.data, &self.id[..n]) {
                        Ok(n) => (STATUS_OK, n),
                        Err(_) => (STATUS_IOERR, 0),
                    })
                }
            };
            written.map(|(status, n)| {
                ok = status == STATUS_OK;
                let status_ok = mem.write_obj(status, req.status).is_ok();
                // n <= max_request_bytes < u32::MAX
                (head, n as u32 + u32::from(status_ok))
            })
        };
        self.stats.finished(ok);
        self.complete(q, vring, seq, used, *alive);
    }

    /// Records request `seq` of queue `q` as done and publishes every done request at the
    /// front of the queue's order (in-order publication; see the module doc).
    fn complete(&self, q: usize, vring: &Vring, seq: u64, used: Option<(u16, u32)>, alive: bool) {
        let inf = &self.queues[q];
        let mut o = inf.order.lock();
        let Some(slot) = seq
            .checked_sub(o.front)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| o.slots.get_mut(i))
        else {
            return;
        };
        *slot = Slot::Done(used);
        let mut published = false;
        while let Some(Slot::Done(u)) = o.slots.front().copied() {
            o.slots.pop_front();
            o.front += 1;
            if let (true, Some((head, len))) = (alive, u) {
                match vring.add_used(head, len) {
                    Ok(()) => published = true,
                    Err(e) => tracing::warn!(device = %self.name, queue = q, head, "add_used: {e}"),
                }
            }
        }
        if o.slots.is_empty() {
            inf.idle.notify_all();
        }
        drop(o);
        if published {
            let ex = &self.execs[q];
            if ex.waker.on_worker() {
                ex.signal.store(true, Ordering::Release); // at the end of this round
            } else {
                self.signal(q, vring);
            }
        }
    }
}

fn kind_of(op: &Op) -> RequestKind {
    match op {
        Op::Read { .. } => RequestKind::Read,
        Op::Write { .. } => RequestKind::Write,
        Op::Flush => RequestKind::Flush,
        Op::GetId => RequestKind::GetId,
        Op::Discard(_) => RequestKind::Discard,
        Op::WriteZeroes(_) => RequestKind::WriteZeroes,
    }
}

/// The `VhostUserBackend` handed to `vhost-user-backend` for one connection.
pub(crate) struct BlkBackend<D: BlockDevice> {
    pub(crate) shared: Arc<Shared<D>>,
}

impl<D: BlockDevice> Clone for BlkBackend<D> {
    fn clone(&self) -> Self {
        BlkBackend {
            shared: self.shared.clone(),
        }
    }
}

impl<D: BlockDevice> VhostUserBackend for BlkBackend<D> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.cfg.max_queue_size)
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.shared.cfg.protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.shared
            .cfg
            .config_read(self.shared.device.size_bytes(), offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable in virtio-blk, and only with CONFIG_WCE, which is not
        // offered: the cache mode is fixed.
        Ok(())
    }

    fn update_memory(&self, _mem: AtomicMem) -> io::Result<()> {
        // The handler replaced the contents of the GuestMemoryAtomic this backend was built
        // with (`Shared::mem`); nothing else to do.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shared.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without it, dropping the daemon would wait forever for the vring workers.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("cannot create the vring worker exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend resumes at the next available index we return, so
        // everything popped must be published first.
        let deadline = Instant::now() + self.shared.cfg.drain_timeout;
        if self.shared.wait_queue_idle(queue_index as usize, deadline) {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "queue {queue_index}: requests still in flight after {:?}",
                self.shared.cfg.drain_timeout
            )))
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per worker thread: event 0 is its kick, thread_id its queue index.
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let q = thread_id;
        let nq = self.shared.cfg.num_queues;
        let Some(ex) = self.shared.execs.get(q) else {
            return Ok(());
        };
        match device_event {
            0 => self.shared.process_queue(q, vring),
            e if e == io_event(nq) => {
                if let Some(io) = &ex.io {
                    io.complete_ready();
                }
            }
            e if e == wake_event(nq) => {
                let _ = ex.waker.fd.read();
            }
            _ => return Ok(()),
        }
        self.shared.run_queue(q, vring);
        Ok(())
    }
}
