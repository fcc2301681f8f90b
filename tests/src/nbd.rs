//! A small blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies) for tests that
//! need to know exactly which request was acknowledged and with which errno: the crash
//! torture's writer, the disk-full test, the many-clients load test.
//!
//! Requests can be pipelined: [`Client::send`] queues one, [`Client::recv`] reads the next
//! reply (the server answers out of order; replies are matched by handle).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_FLAG_FUA: u16 = 1;

/// errno values of the protocol (Linux's).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// What went wrong with a request.
#[derive(Debug)]
pub enum NbdError {
    /// The server answered the request with this errno (the connection is still usable).
    Errno(u32),
    /// The connection failed (server gone, protocol violation): nothing more can be sent.
    Io(io::Error),
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Errno(e) => write!(f, "server answered errno {e}"),
            NbdError::Io(e) => write!(f, "connection failed: {e}"),
        }
    }
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> Self {
        NbdError::Io(e)
    }
}

/// One reply: its handle and, for a read that succeeded, the data.
#[derive(Debug)]
pub struct Reply {
    pub handle: u64,
    pub result: Result<Vec<u8>, u32>,
}

/// A connection to one export.
#[derive(Debug)]
pub struct Client {
    sock: UnixStream,
    pub size_bytes: u64,
    pub transmission_flags: u16,
    /// Length to read for each outstanding read request, by handle.
    pending_reads: std::collections::HashMap<u64, usize>,
    next_handle: u64,
}

fn proto_err(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Client {
    /// Connects to `socket` and opens `export` with `NBD_OPT_GO`. A refused export is an
    /// `Err` carrying the server's message.
    pub fn connect(socket: &Path, export: &str) -> io::Result<Client> {
        let sock = UnixStream::connect(socket)?;
        sock.set_read_timeout(Some(Duration::from_secs(120)))?;
        sock.set_write_timeout(Some(Duration::from_secs(120)))?;
        let mut c = Client {
            sock,
            size_bytes: 0,
            transmission_flags: 0,
            pending_reads: Default::default(),
            next_handle: 1,
        };
        c.handshake(export)?;
        Ok(c)
    }

    fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.sock.read_exact(&mut b)?;
        Ok(b)
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
    }

    fn handshake(&mut self, export: &str) -> io::Result<()> {
        let g = self.read_exact(18)?;
        if Self::u64_at(&g, 0) != NBDMAGIC || Self::u64_at(&g, 8) != IHAVEOPT {
            return Err(proto_err("bad greeting".into()));
        }
        self.sock
            .write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        self.sock.write_all(&opt)?;
        loop {
            let h = self.read_exact(20)?;
            if Self::u64_at(&h, 0) != OPTION_REPLY_MAGIC {
                return Err(proto_err("bad option reply magic".into()));
            }
            let rtype = Self::u32_at(&h, 12);
            let len = Self::u32_at(&h, 16) as usize;
            if len > 1 << 20 {
                return Err(proto_err(format!("option reply of {len} bytes")));
            }
            let payload = self.read_exact(len)?;
            if rtype & (1 << 31) != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "export {export:?} refused ({rtype:#x}): {}",
                        String::from_utf8_lossy(&payload)
                    ),
                ));
            }
            if rtype == REP_INFO
                && payload.len() >= 12
                && u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT
            {
                self.size_bytes = Self::u64_at(&payload, 2);
                self.transmission_flags = u16::from_be_bytes([payload[10], payload[11]]);
            }
            if rtype == REP_ACK {
                return Ok(());
            }
        }
    }

    /// Queues one request; returns its handle.
    pub fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut r = Vec::with_capacity(28 + payload.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.sock.write_all(&r)?;
        if cmd == CMD_READ {
            self.pending_reads.insert(handle, len as usize);
        }
        Ok(handle)
    }

    /// Reads the next reply (any outstanding request's).
    pub fn recv(&mut self) -> io::Result<Reply> {
        let h = self.read_exact(16)?;
        if Self::u32_at(&h, 0) != SIMPLE_REPLY_MAGIC {
            return Err(proto_err(format!(
                "bad reply magic {:#x}",
                Self::u32_at(&h, 0)
            )));
        }
        let errno = Self::u32_at(&h, 4);
        let handle = Self::u64_at(&h, 8);
        let read_len = self.pending_reads.remove(&handle);
        if errno != 0 {
            return Ok(Reply {
                handle,
                result: Err(errno),
            });
        }
        let data = match read_len {
            Some(n) => self.read_exact(n)?,
            None => Vec::new(),
        };
        Ok(Reply {
            handle,
            result: Ok(data),
        })
    }

    /// One request, waiting for its reply (nothing else may be outstanding).
    fn call(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, NbdError> {
        let h = self.send(cmd, flags, offset, len, payload)?;
        let r = self.recv()?;
        if r.handle != h {
            return Err(NbdError::Io(proto_err(format!(
                "reply for handle {} while waiting for {h}",
                r.handle
            ))));
        }
        r.result.map_err(NbdError::Errno)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.call(CMD_WRITE, flags, offset, data.len() as u32, data)
            .map(drop)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.call(CMD_READ, 0, offset, len, &[])
    }

    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.call(CMD_FLUSH, 0, 0, 0, &[]).map(drop)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.call(CMD_TRIM, 0, offset, len, &[]).map(drop)
    }

    /// Reads the whole export in 1 MiB requests.
    pub fn read_all(&mut self) -> Result<Vec<u8>, NbdError> {
        let mut out = Vec::with_capacity(self.size_bytes as usize);
        let mut off = 0;
        while off < self.size_bytes {
            let n = (self.size_bytes - off).min(1 << 20) as u32;
            out.extend(self.read(off, n)?);
            off += n as u64;
        }
        Ok(out)
    }

    /// `NBD_CMD_DISC`, then close.
    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0, &[]);
    }
}

/// A 4 KiB block that names itself: `(lba, stamp)` repeated. A block holding another
/// block's content, a torn mix of two writes, or zeros, is told apart from the right one.
pub fn stamped_block(lba: u64, stamp: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    for (i, c) in b.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&lba.to_le_bytes());
        c[8..].copy_from_slice(&(stamp ^ (i as u64) << 48).to_le_bytes());
    }
    b
}

/// The stamp of a block written by [`stamped_block`] for `lba` (0 for a zero block), or
/// `Err` describing what else it holds.
pub fn block_stamp(lba: u64, b: &[u8]) -> Result<u64, String> {
    if b.iter().all(|x| *x == 0) {
        return Ok(0);
    }
    let got_lba = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
    let stamp = u64::from_le_bytes(b[8..16].try_into().unwrap_or([0; 8]));
    if got_lba != lba {
        return Err(format!("holds block {got_lba}'s data (stamp {stamp})"));
    }
    if b[..] != stamped_block(lba, stamp)[..] {
        return Err(format!("is torn (starts with stamp {stamp})"));
    }
    Ok(stamp)
}
