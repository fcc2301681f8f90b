//! virtio-blk request parsing (`vhost_blk::request::parse`) over arbitrary descriptor
//! chains and guest memory layouts: up to four memory regions anywhere in the address
//! space (with gaps), filled with input bytes (the request header and payload a guest would
//! write), a chain of up to 16 descriptors pointing anywhere (inside, across region ends,
//! outside, overflowing), and arbitrary device limits. Parsing must never panic; an accepted
//! request's buffers must all lie inside guest memory (gather / scatter of its whole data
//! length and the status byte succeed) and respect the limits; a rejected request's status
//! byte, when it has one, must be writable.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_blk::request::{self, Limits, Op};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Reads input bytes front to back; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = self.0.len().min(N);
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    // Memory layout: 1..=4 regions of 1..=16 pages at page-granular bases, no overlaps.
    let nregions = usize::from(inp.u8() % 4) + 1;
    let mut regions: Vec<(GuestAddress, usize)> = Vec::new();
    for _ in 0..nregions {
        let base = u64::from(inp.u16()) << 12 | (u64::from(inp.u8() & 3) << 40);
        let size = (usize::from(inp.u8() % 16) + 1) << 12;
        let overlaps = regions
            .iter()
            .any(|(b, s)| base < b.0 + *s as u64 && b.0 < base + size as u64);
        if !overlaps {
            regions.push((GuestAddress(base), size));
        }
    }
    regions.sort_by_key(|(b, _)| b.0);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&regions) else {
        return;
    };
    // Limits.
    let limits = Limits {
        capacity_bytes: u64::from(inp.u32()) << 9,
        read_only: inp.u8() & 1 == 1,
        max_data_bytes: u64::from(inp.u16()) << (inp.u8() % 8),
        max_discard_sectors: inp.u32(),
        max_discard_seg: u32::from(inp.u8()),
        max_write_zeroes_sectors: inp.u32(),
        max_write_zeroes_seg: u32::from(inp.u8()),
    };
    // The chain: address relative to a region (or absolute), length, device-writable flag.
    let ndescs = usize::from(inp.u8() % 16) + 1;
    let mut descs = Vec::with_capacity(ndescs);
    for _ in 0..ndescs {
        let sel = inp.u8();
        let off = u64::from(inp.u16());
        let addr = if sel & 0x80 != 0 {
            inp.u64()
        } else {
            let (b, _) = regions[usize::from(sel) % regions.len()];
            b.0.wrapping_add(off)
        };
        let len = if sel & 0x40 != 0 {
            inp.u32()
        } else {
            u32::from(inp.u16())
        };
        let flags = VRING_DESC_F_NEXT | if sel & 1 == 1 { VRING_DESC_F_WRITE } else { 0 };
        descs.push(Descriptor::new(addr, len, flags, 0));
    }
    // The rest of the input is what the guest wrote: copied to the start of each region.
    for (b, s) in &regions {
        let n = inp.0.len().min(*s);
        mem.write_slice(&inp.0[..n], *b).expect("inside the region");
    }

    match request::parse(descs, &mem, &limits) {
        Ok(req) => {
            let seg_total: u64 = req.data.iter().map(|s| s.len).sum();
            assert_eq!(
                seg_total, req.data_len,
                "data_len is not the buffers' total"
            );
            match &req.op {
                Op::Read { offset, len } | Op::Write { offset, len } => {
                    assert_eq!(*len, req.data_len);
                    assert!(
                        *len <= limits.max_data_bytes,
                        "request above the size limit"
                    );
                    assert!(
                        offset
                            .checked_add(*len)
                            .is_some_and(|e| e <= limits.capacity_bytes),
                        "request beyond the device"
                    );
                    assert!(
                        !(req.op.is_write() && limits.read_only),
                        "write to read-only"
                    );
                }
                Op::Discard(ranges) | Op::WriteZeroes(ranges) => {
                    assert!(!limits.read_only, "discard on a read-only device");
                    for r in ranges {
                        assert!(
                            r.offset
                                .checked_add(r.len)
                                .is_some_and(|e| e <= limits.capacity_bytes),
                            "range beyond the device"
                        );
                    }
                }
                Op::Flush | Op::GetId => {}
            }
            // The buffers are guest memory: moving the whole data through them works.
            if req.data_len <= 1 << 22 {
                let mut buf = vec![0u8; req.data_len as usize];
                if matches!(req.op, Op::Write { .. }) {
                    request::gather(&mem, &req.data, &mut buf).expect("gather of a parsed write");
                } else {
                    let n =
                        request::scatter(&mem, &req.data, &buf).expect("scatter of a parsed read");
                    assert_eq!(n as u64, req.data_len);
                }
            }
            mem.write_obj(0u8, req.status)
                .expect("status byte of a parsed request");
        }
        Err(rej) => {
            if let Some(status) = rej.status {
                mem.write_obj(rej.error.status(), status)
                    .expect("status byte of a rejected request");
            }
        }
    }
});
