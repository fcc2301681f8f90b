//! The per-volume write pipeline. Concurrent writes queue up; one of them (the leader)
//! takes everything queued and stores it as one group: one append (one vectored write per
//! segment run) and one map commit (one RocksDB batch). Under load a group holds many
//! requests, so the per-request cost of the filesystem write and of the metadata log is
//! shared; at queue depth 1 a write goes straight through on its own.
//!
//! Two stages overlap: as soon as a group's data is written, leadership passes to the next
//! waiting write (whose data write starts) while this group commits. A large group (from
//! 256 KiB) passes leadership on before its data write, so the data writes of consecutive
//! large groups are in flight together (the disk needs several to reach its bandwidth).
//! Commits happen in group order (a ticket), so a later write to the same block always
//! wins, also when a later group's data write finished first.

use chunkstore::AlignedBuf;
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;
use vhost_blk::DeviceError;

/// Requests and bytes one group takes at most.
const MAX_GROUP_REQUESTS: usize = 256;
const MAX_GROUP_BYTES: usize = 32 << 20;
/// From this size on, a group hands leadership on before its data write (so the data
/// writes of consecutive large groups are in flight together) instead of after it.
const PIPELINE_BYTES: usize = 256 << 10;

pub(crate) struct Pending {
    pub lba0: u64,
    pub buf: AlignedBuf,
    /// `None` for the leader's own request (it gets its result directly).
    tx: Option<oneshot::Sender<Msg>>,
}

enum Msg {
    Done(Result<(), DeviceError>),
    Lead,
}

#[derive(Default)]
struct State {
    queue: Vec<Pending>,
    leading: bool,
    /// Ticket of the next group taken.
    next_ticket: u64,
    /// Ticket of the group whose turn it is to commit.
    commit_turn: u64,
    /// Tickets of groups whose leader was cancelled before committing.
    abandoned: Vec<u64>,
}

impl State {
    /// The current group is done: move the turn on, past abandoned groups.
    fn advance(&mut self) {
        self.commit_turn += 1;
        while let Some(i) = self.abandoned.iter().position(|t| *t == self.commit_turn) {
            self.abandoned.swap_remove(i);
            self.commit_turn += 1;
        }
    }
}

#[derive(Default)]
pub(crate) struct WriteQueue {
    state: Mutex<State>,
    turn: tokio::sync::Notify,
}

impl std::fmt::Debug for WriteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteQueue").finish_non_exhaustive()
    }
}

impl WriteQueue {
    /// Queues whole blocks for `lba0` and returns when they are committed. `stage` writes
    /// one group's data; `commit` records it (called in group order) and returns one
    /// result per request, in order.
    pub async fn write<S, Fut, T, C, CFut>(
        &self,
        lba0: u64,
        buf: AlignedBuf,
        stage: S,
        commit: C,
    ) -> Result<(), DeviceError>
    where
        S: FnOnce(Vec<(u64, AlignedBuf)>) -> Fut,
        Fut: Future<Output = Result<T, DeviceError>>,
        C: FnOnce(T) -> CFut,
        CFut: Future<Output = Vec<Result<(), DeviceError>>>,
    {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut st = self.state.lock();
            if st.leading {
                st.queue.push(Pending {
                    lba0,
                    buf,
                    tx: Some(tx),
                });
                false
            } else {
                st.leading = true;
                st.queue.push(Pending {
                    lba0,
                    buf,
                    tx: None,
                });
                true
            }
        };
        if !lead {
            match rx.await {
                Ok(Msg::Done(r)) => return r,
                Ok(Msg::Lead) => {} // our request is still queued, with its sender taken
                Err(_) => return Err(DeviceError::Io("write pipeline dropped the request".into())),
            }
        }
        // Leader: take a group from the front of the queue (our request is in it: it was
        // queued before leadership reached us, and groups are taken from the front).
        // Leadership passes on when `_handoff` drops, even if this future is dropped
        // mid-group (the group's other writers then see an error).
        let mut handoff = HandOff(Some(self));
        let (group, ticket, bytes): (Vec<Pending>, u64, usize) = {
            let mut st = self.state.lock();
            let mut bytes = 0;
            let mut n = 0;
            for p in &st.queue {
                if n > 0 && (n >= MAX_GROUP_REQUESTS || bytes + p.buf.len() > MAX_GROUP_BYTES) {
                    break;
                }
                bytes += p.buf.len();
                n += 1;
            }
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            (st.queue.drain(..n).collect(), ticket, bytes)
        };
        // From here on the group must take its commit turn (even if this future is dropped),
        // or later groups would wait forever.
        let turn = Turn {
            queue: self,
            ticket,
            taken: false,
        };
        let mut items: Vec<(u64, AlignedBuf)> = Vec::with_capacity(group.len());
        let mut senders = Vec::with_capacity(group.len());
        for p in group {
            items.push((p.lba0, p.buf));
            senders.push(p.tx);
        }
        let n = items.len();
        if bytes >= PIPELINE_BYTES {
            // A large group: the next group's data write need not wait for this one's.
            handoff.now();
        }
        let staged = stage(items).await;
        // The data is written: let the next group start writing while this one commits.
        handoff.now();
        tokio::task::yield_now().await;
        let mut results = turn
            .run(|| async move {
                match staged {
                    Ok(t) => commit(t).await,
                    Err(e) => vec![Err(e); n],
                }
            })
            .await;
        results.resize_with(n, || {
            Err(DeviceError::Io("write group lost a result".into()))
        });
        let mut mine = Err(DeviceError::Io(
            "leader's request missing from its group".into(),
        ));
        for (tx, r) in senders.into_iter().zip(results) {
            match tx {
                Some(tx) => {
                    let _ = tx.send(Msg::Done(r));
                }
                None => mine = r,
            }
        }
        mine
    }

    /// Passes leadership to the first queued write, skipping writers that went away (their
    /// futures were dropped: their writes are abandoned, which is allowed for a request
    /// nobody waits for). With nothing queued, the next write to arrive leads.
    fn hand_off(&self) {
        loop {
            let tx = {
                let mut st = self.state.lock();
                let Some(p) = st.queue.first_mut() else {
                    st.leading = false;
                    return;
                };
                match p.tx.take() {
                    Some(tx) => tx,
                    None => {
                        // Unreachable (only a leader's own request has no sender); drop it
                        // rather than stall the queue.
                        st.queue.remove(0);
                        continue;
                    }
                }
            };
            if tx.send(Msg::Lead).is_ok() {
                return;
            }
            let mut st = self.state.lock();
            if st.queue.first().is_some_and(|p| p.tx.is_none()) {
                st.queue.remove(0);
            }
        }
    }
}

/// Passes leadership on exactly once: explicitly, or when dropped.
struct HandOff<'a>(Option<&'a WriteQueue>);

impl HandOff<'_> {
    fn now(&mut self) {
        if let Some(q) = self.0.take() {
            q.hand_off();
        }
    }
}

impl Drop for HandOff<'_> {
    fn drop(&mut self) {
        self.now();
    }
}

/// A group's place in the commit order. Running it waits for the group's turn; dropping
/// it without running (a cancelled leader) still passes the turn on.
struct Turn<'a> {
    queue: &'a WriteQueue,
    ticket: u64,
    taken: bool,
}

impl Turn<'_> {
    /// Waits for this group's turn, then runs its commit and passes the turn on. A commit
    /// that started finishes before the turn passes even if this future is dropped (see
    /// [`Committing`]): otherwise the next group could commit first and an older write
    /// would win.
    async fn run<R, F: Future<Output = R>>(self, f: impl FnOnce() -> F) -> R {
        loop {
            let notified = self.queue.turn.notified();
            if self.queue.state.lock().commit_turn == self.ticket {
                break;
            }
            notified.await;
        }
        Committing {
            fut: Some(Box::pin(f())),
            turn: self,
        }
        .await
    }

    fn pass(&mut self) {
        if !self.taken {
            self.taken = true;
            self.queue.state.lock().advance();
            self.queue.turn.notify_waiters();
        }
    }
}

/// A running commit and the turn it holds. The commit may run on another thread (blockd
/// moves large ones to the blocking pool); if this is dropped before it completes, the
/// drop waits for it (a rare, bounded wait: a cancelled request mid-commit), and only then
/// passes the turn.
struct Committing<'a, F: Future> {
    fut: Option<Pin<Box<F>>>,
    turn: Turn<'a>,
}

impl<F: Future> Future for Committing<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // `Committing` is Unpin (the commit future is boxed).
        let this = &mut *self;
        let Some(fut) = this.fut.as_mut() else {
            panic!("Committing polled after completion");
        };
        let r = std::task::ready!(fut.as_mut().poll(cx));
        this.fut = None;
        this.turn.pass();
        Poll::Ready(r)
    }
}

impl<F: Future> Drop for Committing<'_, F> {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            let _ = futures::executor::block_on(fut);
        }
        self.turn.pass();
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        // Cancelled before committing: if it is our turn, pass it on now; otherwise leave
        // a note so the turn skips us when it gets here.
        let mut st = self.queue.state.lock();
        if st.commit_turn == self.ticket {
            st.advance();
            drop(st);
            self.queue.turn.notify_waiters();
        } else {
            st.abandoned.push(self.ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_grouped_and_all_complete() {
        let q = Arc::new(WriteQueue::default());
        let groups = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (q, groups) = (q.clone(), groups.clone());
            tasks.push(tokio::spawn(async move {
                q.write(
                    i,
                    AlignedBuf::zeroed(4096),
                    |items| {
                        groups.fetch_add(1, Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                            Ok(items.len())
                        }
                    },
                    |n| async move { vec![Ok(()); n] },
                )
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let g = groups.load(Ordering::SeqCst);
        assert!(
            g < 64,
            "64 concurrent writes ran in {g} groups: no grouping"
        );
        assert!(!q.state.lock().leading);
    }

    #[tokio::test]
    async fn errors_reach_every_writer_and_a_cancelled_leader_hands_off() {
        let q = Arc::new(WriteQueue::default());
        // A leader whose store never finishes, then cancelled.
        let q1 = q.clone();
        let stuck = tokio::spawn(async move {
            q1.write(
                0,
                AlignedBuf::zeroed(4096),
                |_| std::future::pending::<Result<(), DeviceError>>(),
                |_| async { vec![Ok(())] },
            )
            .await
        });
        tokio::task::yield_now().await;
        let q2 = q.clone();
        let waiter = tokio::spawn(async move {
            q2.write(
                1,
                AlignedBuf::zeroed(4096),
                |items| async move { Ok(items.len()) },
                |n| async move { vec![Err(DeviceError::NoSpace); n] },
            )
            .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        stuck.abort();
        let r = waiter.await.unwrap();
        assert_eq!(
            r,
            Err(DeviceError::NoSpace),
            "the next writer led its own group"
        );
        assert!(!q.state.lock().leading);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_cancelled_mid_way_finishes_before_the_next_group_commits() {
        let q = Arc::new(WriteQueue::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel::<()>();
        // Group 1: its commit runs elsewhere (like blockd's blocking-pool commits) and
        // completes only when released.
        let (q1, o1) = (q.clone(), order.clone());
        let first = tokio::spawn(async move {
            q1.write(
                0,
                AlignedBuf::zeroed(4096),
                |_| async { Ok(()) },
                move |()| {
                    let _ = started_tx.send(());
                    let o1 = o1.clone();
                    async move {
                        tokio::task::spawn_blocking(move || {
                            release_rx.recv().unwrap();
                            o1.lock().push(1);
                        })
                        .await
                        .unwrap();
                        vec![Ok(())]
                    }
                },
            )
            .await
        });
        started_rx.await.unwrap();
        // Group 2 queues behind it.
        let (q2, o2) = (q.clone(), order.clone());
        let second = tokio::spawn(async move {
            q2.write(
                1,
                AlignedBuf::zeroed(4096),
                |_| async { Ok(()) },
                move |()| {
                    o2.lock().push(2);
                    async { vec![Ok(())] }
                },
            )
            .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // The first writer goes away while its commit runs; the commit is released later.
        first.abort();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            release_tx.send(()).unwrap();
        });
        assert_eq!(second.await.unwrap(), Ok(()));
        assert_eq!(*order.lock(), vec![1, 2], "commits ran out of group order");
        assert!(!q.state.lock().leading);
    }

    // Single-threaded so that arrival order is spawn order (each task queues its write
    // before the next is spawned); groups then finish their data writes out of order.
    #[tokio::test(flavor = "current_thread")]
    async fn commits_run_in_group_order() {
        let q = Arc::new(WriteQueue::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..40u64 {
            let (q, order) = (q.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                q.write(
                    i,
                    AlignedBuf::zeroed(4096),
                    |items| async move {
                        // Later groups finish their data write sooner.
                        let d = 20u64.saturating_sub(items[0].0 / 2);
                        tokio::time::sleep(std::time::Duration::from_millis(d)).await;
                        Ok(items.iter().map(|(l, _)| *l).collect::<Vec<u64>>())
                    },
                    |lbas| {
                        let n = lbas.len();
                        order.lock().extend(lbas);
                        async move { vec![Ok(()); n] }
                    },
                )
                .await
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let order = order.lock().clone();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order.len(), 40);
        // Groups commit in the order they were taken, which is queue (arrival) order.
        let firsts: Vec<u64> = order.clone();
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "commit order {order:?}"
        );
        assert_eq!(sorted, (0..40).collect::<Vec<_>>());
    }
}
