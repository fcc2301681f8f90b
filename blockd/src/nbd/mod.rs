//! NBD server: serves any [`vhost_blk::BlockDevice`] over the Network Block Device protocol
//! (fixed newstyle), on Unix sockets, TCP, or any byte stream.
//!
//! # Contents
//!
//! - [`proto`]: constants and pure, panic-free encoders/decoders of the wire format (the
//!   fuzzing surface).
//! - `handshake`: option haggling up to `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`.
//! - `transmission`: the request loop, per-request tasks, the reply writer, limits.
//! - `server`: listeners, one connection's life, [`NbdServer`], [`ServerConfig`].
//! - `export`: what the daemon provides: [`Exports`], [`Attachment`], [`AttachError`].
//! - `stats`: [`NbdStats`] counters.
//!
//! # Protocol subset
//!
//! Handshake: fixed newstyle only, advertising `NBD_FLAG_FIXED_NEWSTYLE` and
//! `NBD_FLAG_NO_ZEROES`; client flags other than those two close the connection. Options:
//!
//! | option | answer |
//! |---|---|
//! | `EXPORT_NAME` | export size + transmission flags; an unknown or unusable name closes the connection (the option has no error reply) |
//! | `ABORT` | `ACK`, then close |
//! | `LIST` | one `REP_SERVER` per export, `ACK` |
//! | `STARTTLS` | `ERR_POLICY`: TLS is not offered |
//! | `INFO`, `GO` | `INFO_EXPORT`, `INFO_NAME` / `INFO_DESCRIPTION` (the device id) when asked, always `INFO_BLOCK_SIZE` (512 / 4096 / 32 MiB), `ACK`; unknown export `ERR_UNKNOWN` |
//! | `STRUCTURED_REPLY` | `ACK` |
//! | `LIST_META_CONTEXT`, `SET_META_CONTEXT` | `base:allocation` (id 1), after structured replies only |
//! | anything else | `ERR_UNSUP` |
//!
//! Malformed option data gets `ERR_INVALID`. Option data longer than 64 KiB is never read:
//! the server answers `ERR_TOO_BIG` and closes. There is no default export: the empty name
//! is unknown. `NBD_OPT_INFO` attaches the export just long enough to describe it.
//!
//! Transmission flags: `HAS_FLAGS`, `SEND_FLUSH`, `CAN_MULTI_CONN`, plus `SEND_FUA`,
//! `SEND_TRIM`, `SEND_WRITE_ZEROES`, `SEND_FAST_ZERO` for writable exports, `READ_ONLY` for
//! read-only ones, and `SEND_DF` when structured replies were negotiated.
//!
//! Commands: `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `BLOCK_STATUS`.
//! With structured replies a read is answered with one `OFFSET_DATA` chunk (so `DF` always
//! holds), errors with an `ERROR` chunk carrying a message, everything else with `NONE`.
//!
//! # Choices where the spec leaves room
//!
//! - Requests are handled concurrently and answered out of order. A connection has at most
//!   [`ServerConfig::max_in_flight_requests`] requests and
//!   [`ServerConfig::max_in_flight_bytes`] payload bytes in flight; at either limit the
//!   server stops reading that socket (back-pressure), so memory is bounded per connection.
//! - Errors: unknown commands (including `NBD_CMD_CACHE`) and flags not valid for the
//!   command get `EINVAL`; writes, trims and write-zeroes on a read-only export `EPERM`;
//!   misaligned (not a multiple of 512) or out-of-range requests `EINVAL`, writes and
//!   write-zeroes past the end included (the spec suggests `ENOSPC` there; our contract is
//!   one errno for every out-of-range request). The connection stays usable after any of
//!   these.
//! - Oversized requests: READ or WRITE above 32 MiB gets `EINVAL`. An oversized WRITE's
//!   payload is read and discarded through a small fixed buffer (never allocated), so the
//!   stream stays in sync and the connection usable. TRIM, WRITE_ZEROES and BLOCK_STATUS
//!   carry no payload and accept any length within the export.
//! - `NBD_CMD_FLAG_FUA` is accepted on every command; on TRIM it adds a flush.
//!   `NBD_CMD_FLAG_NO_HOLE` is accepted and ignored (write-zeroes may still release
//!   storage). `NBD_CMD_FLAG_FAST_ZERO` is honoured by construction: write-zeroes never
//!   writes data blocks.
//! - `BLOCK_STATUS` reports `HOLE|ZERO` for extents the device calls holes and 0 otherwise,
//!   merged, aligned to 512 (a partly-hole block counts as allocated), at most 16384
//!   descriptors per reply, one with `REQ_ONE`.
//! - A bad request magic (the stream is out of sync) closes the connection after the
//!   in-flight requests finish. So does a client EOF, mid-request or not.
//! - `NBD_CMD_DISC`: in-flight requests finish and their replies are sent, then the socket
//!   closes.
//! - Shutdown (the server's token, or an [`Attachment::shutdown`] token): the server stops
//!   reading requests, gives in-flight ones [`ServerConfig::shutdown_grace`] to finish and
//!   their replies as long again to be sent, aborts what remains, closes the socket, and
//!   then drops the attachment's guard. During the handshake, shutdown closes the connection
//!   (an option already received is answered `ERR_SHUTDOWN`).
//! - The handshake must complete within [`ServerConfig::handshake_timeout`].

pub mod proto;

mod export;
mod handshake;
mod server;
mod stats;
mod transmission;

pub use export::{AttachError, Attachment, Exports};
pub use handshake::MAX_OPTION_LEN;
pub use server::{NbdServer, ServerConfig, serve_tcp, serve_unix};
pub use stats::{NbdStats, NbdStatsSnapshot, RequestCounts, RequestKind};
