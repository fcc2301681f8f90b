//! virtio-blk request parsing: a pure function from a descriptor chain and guest memory to a
//! validated [`Request`] or a [`Rejected`] one. This is the fuzzing surface: it never panics,
//! never allocates in proportion to guest-controlled lengths (only to the number of
//! descriptors, which the queue bounds), and touches guest memory only through vm-memory's
//! checked accessors.
//!
//! # Framing
//!
//! The device does not assume any particular split of a request into descriptors (virtio 1.x
//! "any layout"). The device-readable descriptors, concatenated, are the 16-byte header
//! (`type: le32, ioprio: le32, sector: le64`) followed by the request's out-payload (write
//! data, or discard / write-zeroes segments). The device-writable descriptors, concatenated,
//! are the in-payload (read data, device id) followed by the one-byte status. Every
//! device-readable descriptor must come before every device-writable one.
//!
//! # What is rejected, and how
//!
//! A request whose status byte can be located (the last byte of the last non-empty
//! device-writable descriptor, inside guest memory) is answered with a status:
//! `VIRTIO_BLK_S_UNSUPP` for unknown request types and for flags the device does not know
//! (and the unmap flag on a discard, as the spec requires), `VIRTIO_BLK_S_IOERR` for
//! everything else (short header, wrong directions, descriptors outside guest memory,
//! misaligned or oversized data, sector ranges past the end or overflowing, writes to a
//! read-only device). A request without a usable status byte is returned to the driver with
//! a used length of 0 and otherwise ignored.

use crate::device::{DeviceError, SECTOR_SIZE};
use virtio_bindings::bindings::virtio_blk as vb;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Length of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u64 = 16;
/// Length of one `struct virtio_blk_discard_write_zeroes` segment.
pub const SEGMENT_LEN: u64 = 16;
/// Length of the device id answered to `VIRTIO_BLK_T_GET_ID`.
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

pub const STATUS_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// The status a device error is reported with. The one place this mapping lives.
pub fn device_status(e: &DeviceError) -> u8 {
    match e {
        DeviceError::Unsupported => STATUS_UNSUPP,
        // virtio-blk has no finer statuses: invalid ranges, read-only, a full disk, a device
        // that went away and disk errors are all I/O errors to the guest.
        DeviceError::Invalid(_)
        | DeviceError::ReadOnly
        | DeviceError::NoSpace
        | DeviceError::Gone(_)
        | DeviceError::Io(_) => STATUS_IOERR,
    }
}

/// A guest buffer: `len` bytes at `addr`, already checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

/// A byte range of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into the request's data buffers.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write the request's data buffers (`len` bytes) at `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Write the device id (at most [`ID_BYTES`]) into the data buffers.
    GetId,
    Discard(Vec<ByteRange>),
    /// The unmap flag is accepted either way: the device may always release zeroed storage.
    WriteZeroes(Vec<ByteRange>),
}

impl Op {
    pub fn is_write(&self) -> bool {
        matches!(self, Op::Write { .. } | Op::Discard(_) | Op::WriteZeroes(_))
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Data buffers: device-readable for writes, device-writable for reads and GET_ID;
    /// empty for the other operations.
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// What the device accepts; everything else is rejected by [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub capacity_bytes: u64,
    pub read_only: bool,
    /// Largest read or write, in bytes (bounds the buffer a request makes the device hold).
    pub max_data_bytes: u64,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("no device-writable status byte inside guest memory")]
    NoStatus,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
    #[error("request header shorter than {HEADER_LEN} bytes")]
    ShortHeader,
    #[error("guest memory access failed: {0}")]
    GuestMemory(String),
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("{0} bytes of unexpected device-readable payload")]
    UnexpectedPayload(u64),
    #[error("{0} bytes of unexpected device-writable buffers")]
    UnexpectedBuffers(u64),
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    Misaligned(u64),
    #[error("request of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    #[error("sectors {sector}+{sectors} are beyond the end of the device")]
    OutOfRange { sector: u64, sectors: u64 },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("GET_ID without a buffer for the id")]
    NoIdBuffer,
    #[error("discard/write-zeroes payload of {0} bytes is not 1..=max segments of 16 bytes")]
    BadSegments(u64),
    #[error("segment of {sectors} sectors exceeds the limit of {max}")]
    SegmentTooLarge { sectors: u32, max: u32 },
    #[error("unsupported flags {0:#x} on a discard/write-zeroes segment")]
    UnsupportedFlags(u32),
}

impl ParseError {
    /// The status a rejected request is answered with (when it has a status byte).
    pub fn status(&self) -> u8 {
        match self {
            ParseError::UnsupportedType(_) | ParseError::UnsupportedFlags(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A request that cannot be executed, and where (if anywhere) to report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: ParseError,
    /// The status byte, when the chain has a usable one.
    pub status: Option<GuestAddress>,
}

/// Parses one descriptor chain (e.g. a `virtio_queue::DescriptorChain`, which already
/// follows indirect tables and bounds the chain length) against guest memory `mem`.
pub fn parse<M>(
    descs: impl IntoIterator<Item = Descriptor>,
    mem: &M,
    limits: &Limits,
) -> Result<Request, Rejected>
where
    M: GuestMemory + ?Sized,
{
    let mut readable: Vec<Segment> = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut order_error = false;
    let mut bounds_error: Option<ParseError> = None;
    for d in descs {
        let seg = Segment {
            addr: d.addr(),
            len: u64::from(d.len()),
        };
        if d.is_write_only() {
            if seg.len > 0 {
                writable.push(seg);
            }
        } else {
            if !writable.is_empty() {
                order_error = true;
            }
            if seg.len > 0 {
                readable.push(seg);
            }
        }
        let perm = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if bounds_error.is_none() && seg.len > 0 && !in_memory(mem, seg, perm) {
            bounds_error = Some(ParseError::OutOfBounds {
                addr: seg.addr.raw_value(),
                len: d.len(),
            });
        }
    }

    // The status byte: the last byte of the device-writable part.
    let Some(last) = writable.pop() else {
        return Err(Rejected {
            error: ParseError::NoStatus,
            status: None,
        });
    };
    let status = match last.addr.checked_add(last.len - 1) {
        Some(a) if in_memory(mem, Segment { addr: a, len: 1 }, Permissions::Write) => a,
        _ => {
            return Err(Rejected {
                error: ParseError::NoStatus,
                status: None,
            });
        }
    };
    if last.len > 1 {
        writable.push(Segment {
            addr: last.addr,
            len: last.len - 1,
        });
    }
    let reject = |error| Rejected {
        error,
        status: Some(status),
    };
    if order_error {
        return Err(reject(ParseError::ReadableAfterWritable));
    }
    if let Some(e) = bounds_error {
        return Err(reject(e));
    }

    let mut header = [0u8; HEADER_LEN as usize];
    if total_len(&readable) < HEADER_LEN {
        return Err(reject(ParseError::ShortHeader));
    }
    read_stream(mem, &readable, 0, &mut header).map_err(reject)?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let payload = skip(&readable, HEADER_LEN);
    let payload_len = total_len(&payload);
    let in_len = total_len(&writable);

    let no_payload = |what: u64| {
        if what > 0 {
            Err(ParseError::UnexpectedPayload(what))
        } else {
            Ok(())
        }
    };
    let no_buffers = |what: u64| {
        if what > 0 {
            Err(ParseError::UnexpectedBuffers(what))
        } else {
            Ok(())
        }
    };

    let r: Result<Request, ParseError> = (|| match req_type {
        vb::VIRTIO_BLK_T_IN => {
            no_payload(payload_len)?;
            let offset = check_data(sector, in_len, limits)?;
            Ok(Request {
                op: Op::Read {
                    offset,
                    len: in_len,
                },
                data: writable.clone(),
                data_len: in_len,
                status,
            })
        }
        vb::VIRTIO_BLK_T_OUT => {
            no_buffers(in_len)?;
            if limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            let offset = check_data(sector, payload_len, limits)?;
            Ok(Request {
                op: Op::Write {
                    offset,
                    len: payload_len,
                },
                data: payload.clone(),
                data_len: payload_len,
                status,
            })
        }
        vb::VIRTIO_BLK_T_FLUSH => {
            no_payload(payload_len)?;
            no_buffers(in_len)?;
            Ok(Request {
                op: Op::Flush,
                data: Vec::new(),
                data_len: 0,
                status,
            })
        }
        vb::VIRTIO_BLK_T_GET_ID => {
            no_payload(payload_len)?;
            if in_len == 0 {
                return Err(ParseError::NoIdBuffer);
            }
            Ok(Request {
                op: Op::GetId,
                data: writable.clone(),
                data_len: in_len,
                status,
            })
        }
        vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES => {
            no_buffers(in_len)?;
            let discard = req_type == vb::VIRTIO_BLK_T_DISCARD;
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let ranges = parse_segments(mem, &payload, payload_len, discard, max_seg, max_sectors)?;
            // Flags and ranges are checked before the read-only check: an invalid request
            // is reported as such whatever the device.
            for r in &ranges {
                check_range(r.offset / SECTOR_SIZE, r.len, limits)?;
            }
            if limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            let ranges = ranges.into_iter().filter(|r| r.len > 0).collect();
            Ok(Request {
                op: if discard {
                    Op::Discard(ranges)
                } else {
                    Op::WriteZeroes(ranges)
                },
                data: Vec::new(),
                data_len: 0,
                status,
            })
        }
        t => Err(ParseError::UnsupportedType(t)),
    })();
    r.map_err(reject)
}

fn in_memory<M: GuestMemory + ?Sized>(mem: &M, seg: Segment, perm: Permissions) -> bool {
    match usize::try_from(seg.len) {
        Ok(len) => GuestMemory::check_range(mem, seg.addr, len, perm),
        Err(_) => false,
    }
}

fn total_len(segs: &[Segment]) -> u64 {
    // Each segment is at most u32::MAX bytes and a chain has at most 2^16 descriptors, so
    // this cannot overflow.
    segs.iter().map(|s| s.len).sum()
}

/// The segments after the first `n` bytes.
fn skip(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if n >= s.len {
            n -= s.len;
            continue;
        }
        // n < s.len, and the segment is inside guest memory, so the address cannot overflow.
        match s.addr.checked_add(n) {
            Some(addr) => out.push(Segment {
                addr,
                len: s.len - n,
            }),
            None => return Vec::new(),
        }
        n = 0;
    }
    out
}

/// Reads `out.len()` bytes starting `skip_bytes` into the concatenation of `segs`.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    skip_bytes: u64,
    out: &mut [u8],
) -> Result<(), ParseError> {
    let mut done = 0usize;
    for s in skip(segs, skip_bytes) {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(usize::try_from(s.len).unwrap_or(usize::MAX));
        mem.read_slice(&mut out[done..done + n], s.addr)
            .map_err(|e| ParseError::GuestMemory(e.to_string()))?;
        done += n;
    }
    if done < out.len() {
        return Err(ParseError::ShortHeader);
    }
    Ok(())
}

/// Checks a read or write of `len` bytes at `sector`; returns the byte offset.
fn check_data(sector: u64, len: u64, limits: &Limits) -> Result<u64, ParseError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ParseError::Misaligned(len));
    }
    if len > limits.max_data_bytes {
        return Err(ParseError::TooLarge {
            len,
            max: limits.max_data_bytes,
        });
    }
    check_range(sector, len, limits)
}

/// Checks that `len` bytes at `sector` lie inside the device; returns the byte offset.
fn check_range(sector: u64, len: u64, limits: &Limits) -> Result<u64, ParseError> {
    let out_of_range = || ParseError::OutOfRange {
        sector,
        sectors: len / SECTOR_SIZE,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    match offset.checked_add(len) {
        Some(end) if end <= limits.capacity_bytes => Ok(offset),
        _ => Err(out_of_range()),
    }
}

fn parse_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    payload: &[Segment],
    payload_len: u64,
    discard: bool,
    max_seg: u32,
    max_sectors: u32,
) -> Result<Vec<ByteRange>, ParseError> {
    let n = payload_len / SEGMENT_LEN;
    if payload_len == 0 || !payload_len.is_multiple_of(SEGMENT_LEN) || n > u64::from(max_seg) {
        return Err(ParseError::BadSegments(payload_len));
    }
    let mut raw = vec![0u8; payload_len as usize]; // <= max_seg * 16 bytes
    read_stream(mem, payload, 0, &mut raw)?;
    let mut out = Vec::with_capacity(n as usize);
    for seg in raw.chunks_exact(SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes([
            seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
        ]);
        let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        let allowed = if discard {
            0
        } else {
            vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Err(ParseError::UnsupportedFlags(flags));
        }
        if sectors > max_sectors {
            return Err(ParseError::SegmentTooLarge {
                sectors,
                max: max_sectors,
            });
        }
        let out_of_range = || ParseError::OutOfRange {
            sector,
            sectors: u64::from(sectors),
        };
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
        out.push(ByteRange {
            offset,
            len: u64::from(sectors) * SECTOR_SIZE,
        });
    }
    Ok(out)
}

/// Copies `data` into the concatenation of `segs` (read data, device id); returns the bytes
/// written.
pub fn scatter<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    data: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for s in segs {
        if done == data.len() {
            break;
        }
        let n = (data.len() - done).min(usize::try_from(s.len).unwrap_or(usize::MAX));
        mem.write_slice(&data[done..done + n], s.addr)?;
        done += n;
    }
    Ok(done)
}

/// Fills `out` from the concatenation of `segs` (write data).
pub fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(usize::try_from(s.len).unwrap_or(usize::MAX));
        mem.read_slice(&mut out[done..done + n], s.addr)?;
        done += n;
    }
    if done != out.len() {
        return Err(vm_memory::GuestMemoryError::PartialBuffer {
            expected: out.len(),
            completed: done,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            capacity_bytes: 1 << 20,
            read_only: false,
            max_data_bytes: 64 << 10,
            max_discard_sectors: 1024,
            max_discard_seg: 4,
            max_write_zeroes_sectors: 1024,
            max_write_zeroes_seg: 4,
        }
    }

    fn rd(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_NEXT as u16, 0)
    }
    fn wr(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(
            addr,
            len,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )
    }

    fn header(m: &GuestMemoryMmap<()>, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn seg(m: &GuestMemoryMmap<()>, at: u64, sector: u64, n: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(at)).unwrap();
    }

    #[test]
    fn read_write_flush_getid() {
        let m = mem();
        header(&m, 0, vb::VIRTIO_BLK_T_IN, 8);
        let r = parse([rd(0, 16), wr(0x1000, 4096), wr(0x3000, 1)], &m, &limits()).unwrap();
        assert_eq!(
            r.op,
            Op::Read {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(r.status, GuestAddress(0x3000));
        assert_eq!(r.data_len, 4096);

        header(&m, 0, vb::VIRTIO_BLK_T_OUT, 0);
        let r = parse(
            [rd(0, 16), rd(0x1000, 512), rd(0x2000, 1024), wr(0x3000, 1)],
            &m,
            &limits(),
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Write {
                offset: 0,
                len: 1536
            }
        );
        assert_eq!(r.data.len(), 2);

        header(&m, 0, vb::VIRTIO_BLK_T_FLUSH, 0);
        let r = parse([rd(0, 16), wr(0x3000, 1)], &m, &limits()).unwrap();
        assert_eq!(r.op, Op::Flush);

        header(&m, 0, vb::VIRTIO_BLK_T_GET_ID, 0);
        let r = parse([rd(0, 16), wr(0x1000, 20), wr(0x3000, 1)], &m, &limits()).unwrap();
        assert_eq!(r.op, Op::GetId);
    }

    #[test]
    fn any_layout_header_and_data_share_descriptors() {
        let m = mem();
        // Header split across two descriptors, the second also carrying the write data.
        header(&m, 0x100, vb::VIRTIO_BLK_T_OUT, 1);
        let r = parse(
            [rd(0x100, 10), rd(0x10a, 6 + 512), wr(0x3000, 1)],
            &m,
            &limits(),
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Write {
                offset: 512,
                len: 512
            }
        );
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(0x110),
                len: 512
            }]
        );
        // Read data and status in one writable descriptor.
        header(&m, 0x100, vb::VIRTIO_BLK_T_IN, 0);
        let r = parse([rd(0x100, 16), wr(0x2000, 513)], &m, &limits()).unwrap();
        assert_eq!(
            r.op,
            Op::Read {
                offset: 0,
                len: 512
            }
        );
        assert_eq!(r.status, GuestAddress(0x2200));
    }

    #[test]
    fn rejections() {
        let m = mem();
        let l = limits();
        let err = |descs: Vec<Descriptor>| parse(descs, &m, &l).unwrap_err();

        // No status at all: nowhere to report.
        header(&m, 0, vb::VIRTIO_BLK_T_IN, 0);
        assert_eq!(err(vec![rd(0, 16)]).status, None);
        // Status outside guest memory.
        assert_eq!(err(vec![rd(0, 16), wr(MEM, 1)]).status, None);
        // Short header.
        let r = err(vec![rd(0, 8), wr(0x3000, 1)]);
        assert_eq!(
            (r.error.clone(), r.status),
            (ParseError::ShortHeader, Some(GuestAddress(0x3000)))
        );
        assert_eq!(r.error.status(), STATUS_IOERR);
        // Wrong direction order.
        assert_eq!(
            err(vec![
                rd(0, 16),
                wr(0x1000, 512),
                rd(0x2000, 512),
                wr(0x3000, 1)
            ])
            .error,
            ParseError::ReadableAfterWritable
        );
        // Data outside guest memory.
        assert!(matches!(
            err(vec![rd(0, 16), wr(MEM - 256, 512), wr(0x3000, 1)]).error,
            ParseError::OutOfBounds { .. }
        ));
        // Address overflow.
        assert!(matches!(
            err(vec![rd(u64::MAX - 4, 16), wr(0x3000, 1)]).error,
            ParseError::OutOfBounds { .. }
        ));
        // Misaligned, too large, out of range, overflowing sector.
        assert_eq!(
            err(vec![rd(0, 16), wr(0x1000, 100), wr(0x3000, 1)]).error,
            ParseError::Misaligned(100)
        );
        assert!(matches!(
            err(vec![rd(0, 16), wr(0x1000, 128 << 10), wr(0x3000, 1)]).error,
            ParseError::TooLarge { .. }
        ));
        header(&m, 0, vb::VIRTIO_BLK_T_IN, (1 << 20) / 512);
        assert!(matches!(
            err(vec![rd(0, 16), wr(0x1000, 512), wr(0x3000, 1)]).error,
            ParseError::OutOfRange { .. }
        ));
        header(&m, 0, vb::VIRTIO_BLK_T_IN, u64::MAX / 256);
        assert!(matches!(
            err(vec![rd(0, 16), wr(0x1000, 512), wr(0x3000, 1)]).error,
            ParseError::OutOfRange { .. }
        ));
        // Read with an out-payload; write with in-buffers.
        header(&m, 0, vb::VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            err(vec![rd(0, 16), rd(0x1000, 512), wr(0x3000, 1)]).error,
            ParseError::UnexpectedPayload(512)
        );
        header(&m, 0, vb::VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            err(vec![rd(0, 16), wr(0x1000, 512), wr(0x3000, 1)]).error,
            ParseError::UnexpectedBuffers(512)
        );
        // Unknown type: UNSUPP.
        header(&m, 0, 77, 0);
        let r = err(vec![rd(0, 16), wr(0x3000, 1)]);
        assert_eq!(r.error, ParseError::UnsupportedType(77));
        assert_eq!(r.error.status(), STATUS_UNSUPP);
        // GET_ID without a buffer.
        header(&m, 0, vb::VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            err(vec![rd(0, 16), wr(0x3000, 1)]).error,
            ParseError::NoIdBuffer
        );
        // Read-only device.
        let ro = Limits {
            read_only: true,
            ..l
        };
        header(&m, 0, vb::VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            parse([rd(0, 16), rd(0x1000, 512), wr(0x3000, 1)], &m, &ro)
                .unwrap_err()
                .error,
            ParseError::ReadOnly
        );
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        let l = limits();
        header(&m, 0, vb::VIRTIO_BLK_T_DISCARD, 0);
        seg(&m, 0x1000, 8, 16, 0);
        seg(&m, 0x1010, 64, 0, 0);
        let r = parse([rd(0, 16), rd(0x1000, 32), wr(0x3000, 1)], &m, &l).unwrap();
        assert_eq!(
            r.op,
            Op::Discard(vec![ByteRange {
                offset: 4096,
                len: 8192
            }])
        );
        // The unmap flag on a discard is UNSUPP; on write-zeroes it is fine.
        seg(&m, 0x1000, 8, 16, 1);
        let e = parse([rd(0, 16), rd(0x1000, 16), wr(0x3000, 1)], &m, &l).unwrap_err();
        assert_eq!(e.error.status(), STATUS_UNSUPP);
        header(&m, 0, vb::VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let r = parse([rd(0, 16), rd(0x1000, 16), wr(0x3000, 1)], &m, &l).unwrap();
        assert!(matches!(r.op, Op::WriteZeroes(_)));
        // Unknown flags, too many segments, bad payload length, too large, out of range.
        seg(&m, 0x1000, 8, 16, 2);
        assert_eq!(
            parse([rd(0, 16), rd(0x1000, 16), wr(0x3000, 1)], &m, &l)
                .unwrap_err()
                .error,
            ParseError::UnsupportedFlags(2)
        );
        assert!(matches!(
            parse([rd(0, 16), rd(0x1000, 80), wr(0x3000, 1)], &m, &l)
                .unwrap_err()
                .error,
            ParseError::BadSegments(80)
        ));
        assert!(matches!(
            parse([rd(0, 16), rd(0x1000, 15), wr(0x3000, 1)], &m, &l)
                .unwrap_err()
                .error,
            ParseError::BadSegments(15)
        ));
        seg(&m, 0x1000, 0, 2048, 0);
        assert!(matches!(
            parse([rd(0, 16), rd(0x1000, 16), wr(0x3000, 1)], &m, &l)
                .unwrap_err()
                .error,
            ParseError::SegmentTooLarge { .. }
        ));
        seg(&m, 0x1000, 2040, 16, 0);
        assert!(matches!(
            parse([rd(0, 16), rd(0x1000, 16), wr(0x3000, 1)], &m, &l)
                .unwrap_err()
                .error,
            ParseError::OutOfRange { .. }
        ));
        seg(&m, 0x1000, u64::MAX, 16, 0);
        assert!(matches!(
            parse([rd(0, 16), rd(0x1000, 16), wr(0x3000, 1)], &m, &l)
                .unwrap_err()
                .error,
            ParseError::OutOfRange { .. }
        ));
    }

    #[test]
    fn scatter_and_gather_cross_segments() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 10,
            },
        ];
        assert_eq!(scatter(&m, &segs, b"hello world").unwrap(), 11);
        let mut out = [0u8; 11];
        gather(&m, &segs, &mut out).unwrap();
        assert_eq!(&out, b"hello world");
        let mut too_long = [0u8; 14];
        assert!(gather(&m, &segs, &mut too_long).is_err());
    }

    /// Random chains over random memory never panic (a smoke version of the fuzz target).
    #[test]
    fn random_chains_never_panic() {
        let m = mem();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000u64 {
            header(&m, 0, (next() % 16) as u32, next() % 4096);
            let n = next() % 6;
            let descs: Vec<Descriptor> = (0..n)
                .map(|_| {
                    let v = next();
                    let addr = if v % 5 == 0 {
                        next()
                    } else {
                        next() % (MEM + 64)
                    };
                    let len = if v % 7 == 0 {
                        next() as u32
                    } else {
                        (next() % 5000) as u32
                    };
                    let flags = if v % 3 == 0 {
                        VRING_DESC_F_WRITE as u16
                    } else {
                        0
                    };
                    Descriptor::new(if i % 2 == 0 { addr } else { addr & !0xfff }, len, flags, 0)
                })
                .collect();
            let _ = parse(descs, &m, &limits());
        }
    }
}
