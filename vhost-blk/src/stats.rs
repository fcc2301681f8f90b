//! Counters of a vhost-user-blk server, shared by all its connections. The daemon turns them
//! into metrics (blockd: `blockd_vhost_*`, see docs/metrics.md).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Request kinds counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
    /// Rejected before execution (malformed or unsupported).
    Rejected,
}

impl RequestKind {
    pub const ALL: [RequestKind; 7] = [
        RequestKind::Read,
        RequestKind::Write,
        RequestKind::Flush,
        RequestKind::Discard,
        RequestKind::WriteZeroes,
        RequestKind::GetId,
        RequestKind::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Read => "read",
            RequestKind::Write => "write",
            RequestKind::Flush => "flush",
            RequestKind::Discard => "discard",
            RequestKind::WriteZeroes => "write_zeroes",
            RequestKind::GetId => "get_id",
            RequestKind::Rejected => "rejected",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
pub struct VhostStats {
    connections_active: AtomicI64,
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    requests: [AtomicU64; 7],
    request_errors: AtomicU64,
    in_flight: AtomicI64,
}

/// A point-in-time copy of [`VhostStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VhostStatsSnapshot {
    pub connections_active: i64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    /// By [`RequestKind`], in [`RequestKind::ALL`] order.
    pub requests: [u64; 7],
    /// Requests completed with a status other than `VIRTIO_BLK_S_OK` (rejected ones too).
    pub request_errors: u64,
    pub in_flight: i64,
}

impl VhostStats {
    pub fn snapshot(&self) -> VhostStatsSnapshot {
        VhostStatsSnapshot {
            connections_active: self.connections_active.load(Relaxed),
            connections_accepted: self.connections_accepted.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            requests: std::array::from_fn(|i| self.requests[i].load(Relaxed)),
            request_errors: self.request_errors.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
        }
    }

    /// A connection the daemon refused (e.g. the volume is attached elsewhere).
    pub fn refused(&self) {
        self.connections_refused.fetch_add(1, Relaxed);
    }

    pub(crate) fn connected(&self) {
        self.connections_accepted.fetch_add(1, Relaxed);
        self.connections_active.fetch_add(1, Relaxed);
    }

    pub(crate) fn disconnected(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    pub(crate) fn started(&self, kind: RequestKind) {
        self.requests[kind.index()].fetch_add(1, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
    }

    pub(crate) fn finished(&self, ok: bool) {
        self.in_flight.fetch_sub(1, Relaxed);
        if !ok {
            self.request_errors.fetch_add(1, Relaxed);
        }
    }
}
