//! The transmission phase: one reader parses requests and spawns a task per request; one
//! writer task serializes the replies.
//!
//! ```text
//!  socket ─read─▶ reader (this task) ──spawn──▶ handler tasks ──mpsc──▶ writer task ─▶ socket
//!                 │ validates, reads WRITE        │ call the device      │ BufWriter, flushes
//!                 │ payloads into alloc_buf()     │ build the reply      │ when the queue is empty
//! ```
//!
//! Memory is bounded per connection by two semaphores, acquired by the reader before it
//! reads a payload or spawns a handler: one slot per in-flight request, and one permit per
//! payload byte (write data, read replies). Both are released when the reply has been handed
//! to the socket, so a client that does not read its replies stalls its own requests instead
//! of growing our memory.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};
use vhost_blk::{BlockDevice, DeviceError, IoBuf};

use super::proto::{
    self, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
    Command, EINVAL, EIO, EPERM, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, REQUEST_HEADER_LEN, Request,
};
use super::stats::NbdStats;

/// Request headers are read through a buffer this large. WRITE payloads bypass it, except
/// for the bytes that arrived together with their header.
const READ_BUFFER: usize = 8 * 1024;
/// Replies are coalesced in a buffer this large; larger read payloads go straight to the
/// socket.
const WRITE_BUFFER: usize = 128 * 1024;
/// Most descriptors in one block status reply (8 bytes each). Clients ask again from where
/// the reply ended.
const MAX_BLOCK_STATUS_DESCRIPTORS: usize = 16 * 1024;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_in_flight_requests: usize,
    /// At least [`MAX_BLOCK_SIZE`], or a maximal request could never start.
    pub max_in_flight_bytes: usize,
    pub shutdown_grace: Duration,
}

/// What the handshake fixed for this connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    pub size_bytes: u64,
    pub read_only: bool,
    pub structured: bool,
    /// Context id of `base:allocation`, if negotiated.
    pub base_allocation: Option<u32>,
}

/// How the transmission phase ended.
#[derive(Debug)]
pub(crate) enum End {
    /// `NBD_CMD_DISC`: every request was answered, then the socket closed.
    Disconnect,
    /// The client closed its side (possibly in the middle of a request).
    ClientClosed,
    /// The daemon or the export's token asked us to close.
    Shutdown,
    /// The client broke the protocol (e.g. a bad request magic).
    Protocol(String),
    /// The socket failed.
    Io(io::Error),
    /// A request handler panicked. A bug; the connection is closed since the client would
    /// wait forever for that reply.
    Internal(String),
}

/// A request refused before reaching the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub errno: u32,
    pub message: String,
}

fn reject(errno: u32, message: String) -> Result<(), Rejection> {
    Err(Rejection { errno, message })
}

/// Checks a request against the negotiation and the export, in the spec's order of
/// preference: unknown command or flag `EINVAL`; write to a read-only export `EPERM`;
/// oversized READ/WRITE, misalignment, or range beyond the end `EINVAL` (for writes too:
/// the product contract is one errno for every out-of-range request, although the spec
/// suggests `ENOSPC` for writes past the end).
pub(crate) fn validate(req: &Request, p: &Params) -> Result<(), Rejection> {
    let allowed_flags = match req.command {
        // FUA is accepted on every command (the spec allows clients to set it anywhere).
        Command::Read => CMD_FLAG_FUA | if p.structured { CMD_FLAG_DF } else { 0 },
        Command::Write | Command::Flush | Command::Trim => CMD_FLAG_FUA,
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        Command::Disc => u16::MAX,
        Command::Cache | Command::Unknown(_) => {
            return reject(
                EINVAL,
                format!("unsupported command type {}", req.command.to_u16()),
            );
        }
    };
    let name = req.command.name();
    if req.flags & !allowed_flags != 0 {
        return reject(
            EINVAL,
            format!("command flags {:#x} are not valid for {name}", req.flags),
        );
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if p.read_only && writes {
        return reject(EPERM, format!("{name} on a read-only export"));
    }
    match req.command {
        Command::Flush => {
            if req.offset != 0 || req.len != 0 {
                return reject(EINVAL, "FLUSH must have zero offset and length".into());
            }
            return Ok(());
        }
        Command::Disc => return Ok(()),
        Command::Read | Command::Write if req.len > MAX_BLOCK_SIZE => {
            return reject(
                EINVAL,
                format!(
                    "{name} of {} bytes exceeds the maximum block size of {MAX_BLOCK_SIZE}",
                    req.len
                ),
            );
        }
        Command::BlockStatus => {
            if p.base_allocation.is_none() {
                return reject(
                    EINVAL,
                    "BLOCK_STATUS without a negotiated metadata context".into(),
                );
            }
            if req.len == 0 {
                return reject(EINVAL, "BLOCK_STATUS of zero length".into());
            }
        }
        _ => {}
    }
    let align = u64::from(MIN_BLOCK_SIZE);
    if !req.offset.is_multiple_of(align) || !u64::from(req.len).is_multiple_of(align) {
        return reject(
            EINVAL,
            format!(
                "{name} offset {} / length {} not aligned to {align} bytes",
                req.offset, req.len
            ),
        );
    }
    match req.offset.checked_add(u64::from(req.len)) {
        Some(end) if end <= p.size_bytes => Ok(()),
        _ => reject(
            EINVAL,
            format!(
                "{name} {}+{} beyond the end of the export ({} bytes)",
                req.offset, req.len, p.size_bytes
            ),
        ),
    }
}

/// A reply on its way to the writer, with the resources it holds until it is sent.
struct Outgoing<B> {
    head: Vec<u8>,
    data: Option<B>,
    _slot: Option<Slot>,
}

impl<B> Outgoing<B> {
    fn ok(req: &Request, structured: bool) -> Self {
        let head = if structured {
            proto::encode_none_chunk(req.handle).to_vec()
        } else {
            proto::encode_simple_reply(0, req.handle).to_vec()
        };
        Outgoing {
            head,
            data: None,
            _slot: None,
        }
    }

    fn error(req: &Request, structured: bool, errno: u32, message: &str) -> Self {
        let head = if structured {
            proto::encode_error_chunk(req.handle, errno, message)
        } else {
            proto::encode_simple_reply(errno, req.handle).to_vec()
        };
        Outgoing {
            head,
            data: None,
            _slot: None,
        }
    }
}

/// One in-flight request's share of the connection's limits.
struct Slot {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
    bytes: u64,
    stats: Arc<NbdStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.in_flight_sub(self.bytes);
    }
}

async fn acquire_slot(
    requests: &Arc<Semaphore>,
    budget: &Arc<Semaphore>,
    bytes: u32,
    stats: &Arc<NbdStats>,
) -> Option<Slot> {
    let request = requests.clone().acquire_owned().await.ok()?;
    let bytes_permit = if bytes > 0 {
        Some(budget.clone().acquire_many_owned(bytes).await.ok()?)
    } else {
        None
    };
    stats.in_flight_add(u64::from(bytes));
    Some(Slot {
        _request: request,
        _bytes: bytes_permit,
        bytes: u64::from(bytes),
        stats: stats.clone(),
    })
}

/// What the reader hands a handler besides the header.
enum Work<B> {
    Write(B),
    Other,
}

struct Shared<D> {
    device: Arc<D>,
    params: Params,
    stats: Arc<NbdStats>,
}

/// Resolves when either token is cancelled.
async fn stopped(a: &CancellationToken, b: &CancellationToken) {
    tokio::select! {
        _ = a.cancelled() => {}
        _ = b.cancelled() => {}
    }
}

/// Runs `fut` to completion unless a token fires, then gives it `grace` more.
async fn two_phase<F: Future>(
    fut: F,
    a: &CancellationToken,
    b: &CancellationToken,
    grace: Duration,
) -> Option<F::Output> {
    tokio::pin!(fut);
    if !a.is_cancelled() && !b.is_cancelled() {
        tokio::select! {
            out = &mut fut => return Some(out),
            _ = stopped(a, b) => {}
        }
    }
    tokio::time::timeout(grace, fut).await.ok()
}

fn end_of_input(e: io::Error) -> End {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        End::ClientClosed
    } else {
        End::Io(e)
    }
}

/// Reads and drops `len` bytes without buffering them.
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> io::Result<()> {
    let n = tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink()).await?;
    if n < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn reap(set: &mut JoinSet<()>) -> Option<String> {
    while let Some(res) = set.try_join_next() {
        if let Err(e) = res
            && e.is_panic()
        {
            return Some(format!("request handler panicked: {e}"));
        }
    }
    None
}

async fn join_all(set: &mut JoinSet<()>) {
    while let Some(res) = set.join_next().await {
        if let Err(e) = res
            && e.is_panic()
        {
            error!("request handler panicked: {e}");
        }
    }
}

/// Serves requests on `stream` until the client disconnects, breaks the protocol, or a token
/// is cancelled. Returns only when no handler task is left (each finished or was aborted
/// after the grace period), so the caller may release the export.
pub(crate) async fn run<D, S>(
    stream: S,
    device: Arc<D>,
    params: Params,
    limits: &Limits,
    stats: Arc<NbdStats>,
    server_shutdown: &CancellationToken,
    export_shutdown: &CancellationToken,
) -> End
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let (tx, rx) = mpsc::channel::<Outgoing<D::Buf>>(limits.max_in_flight_requests + 16);
    let writer_failed = CancellationToken::new();
    // A handler that panicked (a bug) answered EIO and asks for the connection to close.
    let handler_panicked = CancellationToken::new();
    let mut writer = tokio::spawn(write_replies(wr, rx, writer_failed.clone()));
    let shared = Arc::new(Shared {
        device,
        params,
        stats: stats.clone(),
    });
    let request_slots = Arc::new(Semaphore::new(limits.max_in_flight_requests.max(1)));
    let byte_budget = Arc::new(Semaphore::new(
        limits.max_in_flight_bytes.max(MAX_BLOCK_SIZE as usize),
    ));
    let mut handlers: JoinSet<()> = JoinSet::new();
    let (a, b) = (server_shutdown, export_shutdown);
    let writer_gone = || {
        End::Io(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "reply writer stopped",
        ))
    };

    let end = loop {
        if let Some(msg) = reap(&mut handlers) {
            break End::Internal(msg);
        }
        // Requests already in the read buffer start at once, their disk I/O submitted
        // together; anything else (a rejection, a write whose payload is still on its way,
        // no free slot, the end) takes the path below.
        if !a.is_cancelled() && !b.is_cancelled() && !handler_panicked.is_cancelled() {
            shared.device.batch(|| {
                while let Some((req, work, slot)) =
                    take_buffered(&mut rd, &shared, &request_slots, &byte_budget)
                {
                    start_handler(
                        &mut handlers,
                        &shared,
                        req,
                        work,
                        slot,
                        &tx,
                        &handler_panicked,
                    );
                }
            });
        }
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = stopped(a, b) => break End::Shutdown,
            _ = writer_failed.cancelled() => break writer_gone(),
            _ = handler_panicked.cancelled() => {
                break End::Internal("a request handler panicked".into())
            }
            r = rd.read_exact(&mut hdr) => {
                if let Err(e) = r {
                    break end_of_input(e);
                }
            }
        }
        let req = match proto::parse_request_header(&hdr) {
            Ok(r) => r,
            Err(e) => break End::Protocol(e.to_string()),
        };
        stats.request(req.command);
        if req.command == Command::Disc {
            break End::Disconnect;
        }

        if let Err(rej) = validate(&req, &params) {
            debug!(handle = req.handle, errno = rej.errno, "{}", rej.message);
            stats.request_error();
            if req.command == Command::Write {
                // The payload must be consumed to stay in sync; it is never buffered.
                tokio::select! {
                    biased;
                    _ = stopped(a, b) => break End::Shutdown,
                    r = discard(&mut rd, req.len) => {
                        if let Err(e) = r {
                            break end_of_input(e);
                        }
                    }
                }
            }
            let reply = Outgoing::error(&req, params.structured, rej.errno, &rej.message);
            if tx.send(reply).await.is_err() {
                break writer_gone();
            }
            continue;
        }

        let payload_bytes = match req.command {
            Command::Read | Command::Write => req.len,
            _ => 0,
        };
        let slot = tokio::select! {
            biased;
            _ = stopped(a, b) => break End::Shutdown,
            _ = writer_failed.cancelled() => break writer_gone(),
            s = acquire_slot(&request_slots, &byte_budget, payload_bytes, &stats) => s,
        };
        let Some(slot) = slot else {
            break End::Internal("request semaphore closed".into());
        };

        let work = if req.command == Command::Write {
            let len = req.len as usize;
            let mut buf = shared.device.alloc_buf(len);
            if buf.as_mut().len() != len {
                let have = buf.as_mut().len();
                drop(buf);
                if let Err(e) = discard(&mut rd, req.len).await {
                    break end_of_input(e);
                }
                stats.request_error();
                let msg = format!("device allocated {have} bytes for a {len}-byte write");
                error!(handle = req.handle, "{msg}");
                if tx
                    .send(Outgoing::error(&req, params.structured, EIO, &msg))
                    .await
                    .is_err()
                {
                    break writer_gone();
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = stopped(a, b) => break End::Shutdown,
                r = rd.read_exact(buf.as_mut()) => {
                    if let Err(e) = r {
                        break end_of_input(e);
                    }
                }
            }
            Work::Write(buf)
        } else {
            Work::Other
        };
        start_handler(
            &mut handlers,
            &shared,
            req,
            work,
            slot,
            &tx,
            &handler_panicked,
        );
    };

    // Let in-flight requests finish: without limit for a client-initiated end, within the
    // grace period once a token is cancelled.
    let grace = limits.shutdown_grace;
    if two_phase(join_all(&mut handlers), a, b, grace)
        .await
        .is_none()
    {
        warn!(
            remaining = handlers.len(),
            "in-flight requests did not finish within the grace period; abandoning them"
        );
        handlers.abort_all();
        join_all(&mut handlers).await;
    }
    // Every sender is gone once `tx` is: the writer sends what is queued, then closes.
    drop(tx);
    match two_phase(&mut writer, a, b, grace).await {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => debug!("writing replies failed: {e}"),
        Some(Err(e)) => error!("reply writer failed: {e}"),
        None => {
            warn!("queued replies not sent within the grace period; closing");
            writer.abort();
        }
    }
    end
}

/// Takes the next request off the read buffer if it is whole there (header and any
/// payload), valid, and a slot is free at once; otherwise leaves the buffer as it is.
fn take_buffered<D, R>(
    rd: &mut BufReader<R>,
    shared: &Arc<Shared<D>>,
    request_slots: &Arc<Semaphore>,
    byte_budget: &Arc<Semaphore>,
) -> Option<(Request, Work<D::Buf>, Slot)>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
{
    let buffered = rd.buffer();
    let hdr: &[u8; REQUEST_HEADER_LEN] = buffered.get(..REQUEST_HEADER_LEN)?.try_into().ok()?;
    let req = proto::parse_request_header(hdr).ok()?;
    if !matches!(
        req.command,
        Command::Read | Command::Write | Command::Flush | Command::Trim | Command::WriteZeroes
    ) || validate(&req, &shared.params).is_err()
    {
        return None;
    }
    let payload = if req.command == Command::Write {
        req.len as usize
    } else {
        0
    };
    let data = buffered.get(REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + payload)?;
    let payload_bytes = match req.command {
        Command::Read | Command::Write => req.len,
        _ => 0,
    };
    let request = request_slots.clone().try_acquire_owned().ok()?;
    let bytes_permit = if payload_bytes > 0 {
        Some(
            byte_budget
                .clone()
                .try_acquire_many_owned(payload_bytes)
                .ok()?,
        )
    } else {
        None
    };
    let work = if req.command == Command::Write {
        let mut buf = shared.device.alloc_buf(payload);
        if buf.as_mut().len() != payload {
            return None; // the slow path reports it
        }
        buf.as_mut().copy_from_slice(data);
        Work::Write(buf)
    } else {
        Work::Other
    };
    tokio::io::AsyncBufRead::consume(std::pin::Pin::new(&mut *rd), REQUEST_HEADER_LEN + payload);
    shared.stats.request(req.command);
    shared.stats.in_flight_add(u64::from(payload_bytes));
    let slot = Slot {
        _request: request,
        _bytes: bytes_permit,
        bytes: u64::from(payload_bytes),
        stats: shared.stats.clone(),
    };
    Some((req, work, slot))
}

/// Starts a request's handler: polled once right here (so it reaches the device, and with
/// a batch open its disk I/O joins the batch), then, unless it is done, a task of the
/// connection (its next poll registers the task's waker, so no wake-up is lost). A handler
/// that panics answers EIO and closes the connection.
fn start_handler<D: BlockDevice>(
    handlers: &mut JoinSet<()>,
    shared: &Arc<Shared<D>>,
    req: Request,
    work: Work<D::Buf>,
    slot: Slot,
    tx: &mpsc::Sender<Outgoing<D::Buf>>,
    panicked: &CancellationToken,
) {
    let (reply_tx, panicked) = (tx.clone(), panicked.clone());
    let structured = shared.params.structured;
    let work = handle(shared.clone(), req, work, slot, tx.clone());
    let mut task = Box::pin(async move {
        use futures::FutureExt;
        if std::panic::AssertUnwindSafe(work)
            .catch_unwind()
            .await
            .is_err()
        {
            // Without a reply the client would wait for this request forever: answer
            // it, then close the connection (the loop stops reading requests).
            error!(
                handle = req.handle,
                "request handler panicked; closing the connection"
            );
            let msg = "internal error (request handler panicked)";
            let _ = reply_tx
                .send(Outgoing::error(&req, structured, EIO, msg))
                .await;
            panicked.cancel();
        }
    });
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if task.as_mut().poll(&mut cx).is_pending() {
        handlers.spawn(task);
    }
}

async fn write_replies<W, B>(
    wr: W,
    mut rx: mpsc::Receiver<Outgoing<B>>,
    failed: CancellationToken,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    B: IoBuf,
{
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, wr);
    let result = async {
        while let Some(msg) = rx.recv().await {
            w.write_all(&msg.head).await?;
            if let Some(data) = &msg.data {
                w.write_all(data.as_ref()).await?;
            }
            // Releases the request's slot and byte budget.
            drop(msg);
            if rx.is_empty() {
                w.flush().await?;
            }
        }
        w.flush().await?;
        w.shutdown().await
    }
    .await;
    if result.is_err() {
        failed.cancel();
    }
    result
}

fn errno(e: &DeviceError) -> u32 {
    match u32::try_from(e.errno()) {
        Ok(0) | Err(_) => EIO,
        Ok(v) => v,
    }
}

async fn handle<D: BlockDevice>(
    sh: Arc<Shared<D>>,
    req: Request,
    work: Work<D::Buf>,
    slot: Slot,
    tx: mpsc::Sender<Outgoing<D::Buf>>,
) {
    let structured = sh.params.structured;
    let mut out = match execute(&sh, &req, work).await {
        Ok(out) => out,
        Err(e) => {
            sh.stats.request_error();
            let msg = format!("{} {}+{}: {e}", req.command.name(), req.offset, req.len);
            match e {
                DeviceError::Io(_) => warn!(handle = req.handle, "{msg}"),
                _ => debug!(handle = req.handle, "{msg}"),
            }
            Outgoing::error(&req, structured, errno(&e), &msg)
        }
    };
    out._slot = Some(slot);
    // A failed send means the connection is closing; the client will not see this reply.
    let _ = tx.send(out).await;
}

async fn execute<D: BlockDevice>(
    sh: &Shared<D>,
    req: &Request,
    work: Work<D::Buf>,
) -> Result<Outgoing<D::Buf>, DeviceError> {
    let dev = &*sh.device;
    let structured = sh.params.structured;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.len);
    match (req.command, work) {
        (Command::Read, _) => {
            if req.len == 0 {
                return Ok(Outgoing::ok(req, structured));
            }
            let n = req.len as usize;
            let buf = dev.read(req.offset, n).await?;
            let got = buf.as_ref().len();
            if got != n {
                return Err(DeviceError::Io(format!(
                    "device returned {got} bytes for a {n}-byte read"
                )));
            }
            let head = if structured {
                // One chunk, so NBD_CMD_FLAG_DF is always honoured (n <= 32 MiB).
                proto::encode_offset_data_head(req.handle, req.offset, n)
                    .ok_or_else(|| DeviceError::Invalid("read too large for one chunk".into()))?
                    .to_vec()
            } else {
                proto::encode_simple_reply(0, req.handle).to_vec()
            };
            sh.stats.read(len);
            Ok(Outgoing {
                head,
                data: Some(buf),
                _slot: None,
            })
        }
        (Command::Write, Work::Write(buf)) => {
            if req.len > 0 {
                dev.write(req.offset, buf, fua).await?;
            }
            sh.stats.written(len);
            Ok(Outgoing::ok(req, structured))
        }
        (Command::Flush, _) => {
            dev.flush().await?;
            Ok(Outgoing::ok(req, structured))
        }
        (Command::Trim, _) => {
            if req.len > 0 {
                dev.discard(req.offset, len).await?;
                if fua {
                    // discard() has no FUA of its own.
                    dev.flush().await?;
                }
            }
            sh.stats.trimmed(len);
            Ok(Outgoing::ok(req, structured))
        }
        (Command::WriteZeroes, _) => {
            // NBD_CMD_FLAG_FAST_ZERO: our write-zeroes never writes data, so it is always
            // fast. NBD_CMD_FLAG_NO_HOLE is accepted but the range may still be released.
            if req.len > 0 {
                dev.write_zeroes(req.offset, len, fua).await?;
            }
            sh.stats.zeroed(len);
            Ok(Outgoing::ok(req, structured))
        }
        (Command::BlockStatus, _) => {
            let Some(context_id) = sh.params.base_allocation else {
                return Err(DeviceError::Invalid(
                    "no metadata context negotiated".into(),
                ));
            };
            let extents = dev.block_status(req.offset, len).await?;
            let descriptors = proto::block_status_descriptors(
                &extents,
                req.len,
                req.flags & CMD_FLAG_REQ_ONE != 0,
                MAX_BLOCK_STATUS_DESCRIPTORS,
            );
            Ok(Outgoing {
                head: proto::encode_block_status_chunk(req.handle, context_id, &descriptors),
                data: None,
                _slot: None,
            })
        }
        (cmd, _) => Err(DeviceError::Invalid(format!(
            "unexpected command {} in a handler",
            cmd.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn params() -> Params {
        Params {
            size_bytes: SIZE,
            read_only: false,
            structured: true,
            base_allocation: Some(1),
        }
    }

    fn req(command: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            handle: 1,
            offset,
            len,
        }
    }

    fn errno_of(r: &Request, p: &Params) -> u32 {
        match validate(r, p) {
            Ok(()) => 0,
            Err(rej) => rej.errno,
        }
    }

    #[test]
    fn accepts_valid_requests() {
        let p = params();
        for r in [
            req(Command::Read, 0, 0, 4096),
            req(Command::Read, CMD_FLAG_DF | CMD_FLAG_FUA, SIZE - 512, 512),
            req(
                Command::Write,
                CMD_FLAG_FUA,
                512,
                MAX_BLOCK_SIZE.min(SIZE as u32 - 512),
            ),
            req(Command::Write, 0, 0, 0),
            req(Command::Flush, 0, 0, 0),
            req(Command::Trim, CMD_FLAG_FUA, 0, SIZE as u32),
            req(
                Command::WriteZeroes,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
                4096,
                4096,
            ),
            req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, SIZE as u32),
            req(Command::Disc, 0xffff, 7, 7),
        ] {
            assert_eq!(validate(&r, &p), Ok(()), "{r:?}");
        }
    }

    #[test]
    fn rejects_with_the_right_errno() {
        let p = params();
        let cases = [
            (req(Command::Unknown(99), 0, 0, 0), EINVAL),
            (req(Command::Cache, 0, 0, 512), EINVAL),
            (req(Command::Read, CMD_FLAG_REQ_ONE, 0, 512), EINVAL),
            (req(Command::Read, 1 << 15, 0, 512), EINVAL),
            (req(Command::Write, CMD_FLAG_DF, 0, 512), EINVAL),
            (req(Command::Trim, CMD_FLAG_NO_HOLE, 0, 512), EINVAL),
            (req(Command::Read, 0, 1, 512), EINVAL),
            (req(Command::Read, 0, 0, 100), EINVAL),
            (req(Command::Read, 0, SIZE, 512), EINVAL),
            (req(Command::Read, 0, u64::MAX - 511, 512), EINVAL),
            (req(Command::Read, 0, 0, MAX_BLOCK_SIZE + 512), EINVAL),
            (req(Command::Write, 0, 0, MAX_BLOCK_SIZE + 512), EINVAL),
            (req(Command::Write, 0, SIZE, 512), EINVAL),
            (req(Command::WriteZeroes, 0, SIZE - 512, 1024), EINVAL),
            (req(Command::Trim, 0, SIZE - 512, 1024), EINVAL),
            (req(Command::Flush, 0, 0, 512), EINVAL),
            (req(Command::BlockStatus, 0, 0, 0), EINVAL),
            (req(Command::BlockStatus, 0, SIZE, 512), EINVAL),
        ];
        for (r, want) in cases {
            assert_eq!(errno_of(&r, &p), want, "{r:?}");
        }
    }

    #[test]
    fn negotiation_dependent_rules() {
        let simple = Params {
            structured: false,
            base_allocation: None,
            ..params()
        };
        assert_eq!(
            errno_of(&req(Command::Read, CMD_FLAG_DF, 0, 512), &simple),
            EINVAL
        );
        assert_eq!(
            errno_of(&req(Command::BlockStatus, 0, 0, 512), &simple),
            EINVAL
        );
        let ro = Params {
            read_only: true,
            ..params()
        };
        assert_eq!(errno_of(&req(Command::Write, 0, 0, 512), &ro), EPERM);
        assert_eq!(errno_of(&req(Command::Trim, 0, 0, 512), &ro), EPERM);
        assert_eq!(errno_of(&req(Command::WriteZeroes, 0, 0, 512), &ro), EPERM);
        // Out of range and read-only: EPERM wins.
        assert_eq!(errno_of(&req(Command::Write, 0, SIZE, 512), &ro), EPERM);
        assert_eq!(errno_of(&req(Command::Read, 0, 0, 512), &ro), 0);
        assert_eq!(errno_of(&req(Command::Flush, 0, 0, 0), &ro), 0);
    }
}
