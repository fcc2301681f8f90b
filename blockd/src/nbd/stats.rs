//! Counters for the NBD server, kept as plain atomics so the daemon can export them (e.g. as
//! Prometheus metrics) without this module knowing how.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::proto::Command;

/// Request kinds counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    /// Unknown or unsupported command types.
    Other,
}

impl RequestKind {
    const COUNT: usize = 8;

    fn index(self) -> usize {
        self as usize
    }

    pub fn of(cmd: Command) -> RequestKind {
        match cmd {
            Command::Read => RequestKind::Read,
            Command::Write => RequestKind::Write,
            Command::Disc => RequestKind::Disc,
            Command::Flush => RequestKind::Flush,
            Command::Trim => RequestKind::Trim,
            Command::WriteZeroes => RequestKind::WriteZeroes,
            Command::BlockStatus => RequestKind::BlockStatus,
            Command::Cache | Command::Unknown(_) => RequestKind::Other,
        }
    }
}

/// Live counters of one server (all connections). Cheap to update from any task.
#[derive(Debug, Default)]
pub struct NbdStats {
    connections_accepted: AtomicU64,
    connections_active: AtomicU64,
    handshakes_failed: AtomicU64,
    protocol_errors: AtomicU64,
    requests: [AtomicU64; RequestKind::COUNT],
    request_errors: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    trimmed_bytes: AtomicU64,
    zeroed_bytes: AtomicU64,
    in_flight_requests: AtomicU64,
    in_flight_bytes: AtomicU64,
}

/// A point-in-time copy of [`NbdStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NbdStatsSnapshot {
    /// Connections accepted since start.
    pub connections_accepted: u64,
    /// Connections currently open (handshake or transmission).
    pub connections_active: u64,
    /// Connections that ended before transmission other than by `NBD_OPT_ABORT`: timeout,
    /// malformed handshake, refused `NBD_OPT_EXPORT_NAME`, hang-up, server shutdown.
    pub handshakes_failed: u64,
    /// Connections closed because the client broke the protocol (bad magic, ...).
    pub protocol_errors: u64,
    /// Requests received, by command.
    pub requests: RequestCounts,
    /// Requests answered with an error.
    pub request_errors: u64,
    /// Bytes returned by successful reads.
    pub read_bytes: u64,
    /// Bytes stored by successful writes.
    pub written_bytes: u64,
    /// Bytes covered by successful trims.
    pub trimmed_bytes: u64,
    /// Bytes covered by successful write-zeroes.
    pub zeroed_bytes: u64,
    /// Requests being processed or whose reply is being sent.
    pub in_flight_requests: u64,
    /// Payload bytes (write data and read replies) held in memory for in-flight requests.
    pub in_flight_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub read: u64,
    pub write: u64,
    pub disc: u64,
    pub flush: u64,
    pub trim: u64,
    pub write_zeroes: u64,
    pub block_status: u64,
    pub other: u64,
}

impl NbdStats {
    pub fn snapshot(&self) -> NbdStatsSnapshot {
        let r = |k: RequestKind| self.requests[k.index()].load(Relaxed);
        NbdStatsSnapshot {
            connections_accepted: self.connections_accepted.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            handshakes_failed: self.handshakes_failed.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
            requests: RequestCounts {
                read: r(RequestKind::Read),
                write: r(RequestKind::Write),
                disc: r(RequestKind::Disc),
                flush: r(RequestKind::Flush),
                trim: r(RequestKind::Trim),
                write_zeroes: r(RequestKind::WriteZeroes),
                block_status: r(RequestKind::BlockStatus),
                other: r(RequestKind::Other),
            },
            request_errors: self.request_errors.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            written_bytes: self.written_bytes.load(Relaxed),
            trimmed_bytes: self.trimmed_bytes.load(Relaxed),
            zeroed_bytes: self.zeroed_bytes.load(Relaxed),
            in_flight_requests: self.in_flight_requests.load(Relaxed),
            in_flight_bytes: self.in_flight_bytes.load(Relaxed),
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_accepted.fetch_add(1, Relaxed);
        self.connections_active.fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    pub(crate) fn handshake_failed(&self) {
        self.handshakes_failed.fetch_add(1, Relaxed);
    }

    pub(crate) fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn request(&self, cmd: Command) {
        self.requests[RequestKind::of(cmd).index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn request_error(&self) {
        self.request_errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn read(&self, n: u64) {
        self.read_bytes.fetch_add(n, Relaxed);
    }

    pub(crate) fn written(&self, n: u64) {
        self.written_bytes.fetch_add(n, Relaxed);
    }

    pub(crate) fn trimmed(&self, n: u64) {
        self.trimmed_bytes.fetch_add(n, Relaxed);
    }

    pub(crate) fn zeroed(&self, n: u64) {
        self.zeroed_bytes.fetch_add(n, Relaxed);
    }

    pub(crate) fn in_flight_add(&self, bytes: u64) {
        self.in_flight_requests.fetch_add(1, Relaxed);
        self.in_flight_bytes.fetch_add(bytes, Relaxed);
    }

    pub(crate) fn in_flight_sub(&self, bytes: u64) {
        self.in_flight_requests.fetch_sub(1, Relaxed);
        self.in_flight_bytes.fetch_sub(bytes, Relaxed);
    }
}
