//! A minimal vhost-user-blk *driver* (frontend + virtio-blk driver in one), for protocol
//! tests and host-side benchmarks: it connects to a backend's unix socket, shares a memfd as
//! "guest memory", sets up split virtqueues in it and submits virtio-blk requests the way a
//! guest driver would (one descriptor for the header, data descriptors of at most `size_max`
//! bytes, one for the status byte), with EVENT_IDX if asked. It talks to any vhost-user-blk
//! backend (ours, qemu-storage-daemon's), which makes it a fair load generator for both.
//!
//! Not a production driver: no indirect descriptors, no packed rings, no reconnect.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_blk as vb;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub type Mem = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{0}")]
    Protocol(String),
    #[error("timed out waiting for a completion")]
    Timeout,
    #[error("request failed with virtio-blk status {0}")]
    Status(u8),
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Queues to set up (the backend must offer at least this many).
    pub num_queues: u16,
    /// Descriptors per queue (power of two).
    pub queue_size: u16,
    /// Requests one queue can have in flight (each has its own buffers).
    pub slots: u16,
    /// Data buffer per slot: the largest request.
    pub slot_bytes: usize,
    /// Scratch memory for hand-made descriptor chains (tests).
    pub scratch_bytes: usize,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX (interrupt and kick suppression, like Linux).
    pub event_idx: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            num_queues: 1,
            queue_size: 256,
            slots: 32,
            slot_bytes: 1 << 20,
            scratch_bytes: 1 << 20,
            event_idx: true,
        }
    }
}

/// The fields of the device's configuration space the tests and benchmarks look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    pub capacity_sectors: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
}

impl DeviceConfig {
    fn parse(c: &[u8]) -> DeviceConfig {
        let u32_at = |i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
        DeviceConfig {
            capacity_sectors: u64::from(u32_at(0)) | u64::from(u32_at(4)) << 32,
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            num_queues: u16::from_le_bytes([c[34], c[35]]),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: c[56] != 0,
        }
    }
}

/// One descriptor of a hand-made chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A finished request: the chain head, the used length the device reported, the caller's
/// tag, and (for requests made with [`ClientQueue::submit`]) the status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub used_len: u32,
    pub tag: u64,
    pub status: Option<u8>,
    /// The slot whose buffers the request used (its data is readable until reused).
    pub slot: Option<u16>,
}

/// A virtio-blk request for [`ClientQueue::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkRequest {
    /// Read `len` bytes at `sector` into the slot's buffer.
    Read {
        sector: u64,
        len: u32,
    },
    /// Write the first `len` bytes of the slot's buffer at `sector` (fill it with
    /// [`ClientQueue::slot_buf`] or [`ClientQueue::fill_slot`] first).
    Write {
        sector: u64,
        len: u32,
    },
    Flush,
    GetId,
    /// `(sector, sectors, flags)` segments.
    Discard(Vec<(u64, u32, u32)>),
    WriteZeroes(Vec<(u64, u32, u32)>),
    /// Any request type, no data (to see UNSUPP).
    Raw {
        req_type: u32,
    },
}

const PAGE: u64 = 4096;

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// A connected driver. Its queues can be taken out and driven from other threads; the
/// connection stays open as long as the `Client` lives.
pub struct Client {
    frontend: Frontend,
    mem: Arc<Mem>,
    _memfd: File,
    queues: Vec<Option<ClientQueue>>,
    features: u64,
    config: DeviceConfig,
    scratch: GuestAddress,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("features", &self.features)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects and sets up `cfg.num_queues` queues, all enabled.
    pub fn connect(path: &Path, cfg: &ClientConfig) -> Result<Client, ClientError> {
        if !cfg.queue_size.is_power_of_two() || cfg.slots == 0 || cfg.slots > cfg.queue_size / 2 {
            return Err(ClientError::Protocol(
                "queue_size must be a power of two and slots <= queue_size / 2".into(),
            ));
        }
        let mut frontend = Frontend::connect(path, u64::from(cfg.num_queues))?;
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let mut want = 1u64 << VIRTIO_F_VERSION_1
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | 1 << vb::VIRTIO_BLK_F_SIZE_MAX
            | 1 << vb::VIRTIO_BLK_F_SEG_MAX
            | 1 << vb::VIRTIO_BLK_F_BLK_SIZE
            | 1 << vb::VIRTIO_BLK_F_TOPOLOGY
            | 1 << vb::VIRTIO_BLK_F_RO
            | 1 << vb::VIRTIO_BLK_F_FLUSH
            | 1 << vb::VIRTIO_BLK_F_MQ
            | 1 << vb::VIRTIO_BLK_F_DISCARD
            | 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
        if cfg.event_idx {
            want |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let features = offered & want;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(ClientError::Protocol(
                "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES".into(),
            ));
        }
        let pf = frontend.get_protocol_features()?;
        let pf_want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        frontend.set_protocol_features(pf & pf_want)?;
        frontend.set_features(features)?;
        if pf.contains(VhostUserProtocolFeatures::MQ) {
            let n = frontend.get_queue_num()?;
            if n < u64::from(cfg.num_queues) {
                return Err(ClientError::Protocol(format!(
                    "backend offers {n} queues, {} wanted",
                    cfg.num_queues
                )));
            }
        } else if cfg.num_queues > 1 {
            return Err(ClientError::Protocol("backend offers one queue".into()));
        }
        let (_, raw_cfg) =
            frontend.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])?;
        let config = DeviceConfig::parse(&raw_cfg);

        // Memory layout: per queue its rings, then per slot a page (header at 0, status at
        // 64) and a data buffer; then the scratch area.
        let qsize = u64::from(cfg.queue_size);
        let ring_bytes = align_up(16 * qsize + 6 + 2 * qsize, PAGE) + align_up(6 + 8 * qsize, PAGE);
        let slot_stride = PAGE + align_up(cfg.slot_bytes as u64, PAGE);
        let queue_bytes = ring_bytes + u64::from(cfg.slots) * slot_stride;
        let scratch_off = queue_bytes * u64::from(cfg.num_queues);
        let total = align_up(scratch_off + cfg.scratch_bytes as u64, 2 << 20);
        let fd = rustix::fs::memfd_create("vhost-blk-client", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(std::io::Error::from)?;
        let memfd = File::from(fd);
        memfd.set_len(total)?;
        let mem = Mem::from_ranges_with_files([(
            GuestAddress(0),
            total as usize,
            Some(FileOffset::new(memfd.try_clone()?, 0)),
        )])
        .map_err(|e| ClientError::Memory(e.to_string()))?;
        let region = mem
            .iter()
            .next()
            .ok_or_else(|| ClientError::Memory("no region".into()))?;
        let host_base = region.as_ptr() as u64;
        let info = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host_base,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        };
        frontend.set_mem_table(&[info])?;
        let mem = Arc::new(mem);

        let mut queues = Vec::new();
        for q in 0..usize::from(cfg.num_queues) {
            let base = GuestAddress(q as u64 * queue_bytes);
            let desc = base;
            let avail = GuestAddress(base.0 + 16 * qsize);
            let used = GuestAddress(base.0 + align_up(16 * qsize + 6 + 2 * qsize, PAGE));
            let call = EventFd::new(EFD_NONBLOCK)?;
            let kick = EventFd::new(EFD_NONBLOCK)?;
            frontend.set_vring_num(q, cfg.queue_size)?;
            frontend.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: cfg.queue_size,
                    queue_size: cfg.queue_size,
                    flags: 0,
                    desc_table_addr: host_base + desc.0,
                    used_ring_addr: host_base + used.0,
                    avail_ring_addr: host_base + avail.0,
                    log_addr: None,
                },
            )?;
            frontend.set_vring_base(q, 0)?;
            frontend.set_vring_call(q, &call)?;
            frontend.set_vring_kick(q, &kick)?;
            frontend.set_vring_enable(q, true)?;
            let epoll = Epoll::new()?;
            epoll.ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )?;
            let slots_base = base.0 + ring_bytes;
            queues.push(Some(ClientQueue {
                index: q,
                size: cfg.queue_size,
                mem: mem.clone(),
                desc,
                avail,
                used,
                kick,
                call,
                epoll,
                event_idx: features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
                avail_idx: 0,
                notified_idx: 0,
                used_seen: 0,
                free_desc: (0..cfg.queue_size).rev().collect(),
                slots: (0..u64::from(cfg.slots))
                    .map(|i| SlotAddrs {
                        header: GuestAddress(slots_base + i * slot_stride),
                        status: GuestAddress(slots_base + i * slot_stride + 64),
                        data: GuestAddress(slots_base + i * slot_stride + PAGE),
                    })
                    .collect(),
                slot_bytes: cfg.slot_bytes,
                free_slots: (0..cfg.slots).rev().collect(),
                inflight: HashMap::new(),
                seg_bytes: if features & (1 << vb::VIRTIO_BLK_F_SIZE_MAX) != 0
                    && config.size_max >= 4096
                {
                    config.size_max
                } else {
                    u32::MAX
                },
            }));
        }
        Ok(Client {
            frontend,
            mem,
            _memfd: memfd,
            queues,
            features,
            config,
            scratch: GuestAddress(scratch_off),
        })
    }

    /// Negotiated virtio feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    pub fn config(&self) -> DeviceConfig {
        self.config
    }

    /// The shared memory, for hand-made requests.
    pub fn mem(&self) -> &Mem {
        &self.mem
    }

    /// Start of the scratch area.
    pub fn scratch(&self) -> GuestAddress {
        self.scratch
    }

    /// Queue `i` (panics if it was taken).
    pub fn queue(&mut self, i: usize) -> &mut ClientQueue {
        self.queues[i].as_mut().expect("queue taken")
    }

    /// Takes the queues out (e.g. to drive each from its own thread).
    pub fn take_queues(&mut self) -> Vec<ClientQueue> {
        self.queues.iter_mut().filter_map(Option::take).collect()
    }

    /// Stops queue `i` (`GET_VRING_BASE`) and returns the backend's next available index.
    pub fn stop_queue(&mut self, i: usize) -> Result<u32, ClientError> {
        Ok(self.frontend.get_vring_base(i)?)
    }

    /// Reads `len` bytes at byte `offset` through queue 0.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        let q = self.queue(0);
        let c = q.run(BlkRequest::Read {
            sector: offset / 512,
            len,
        })?;
        Ok(q.slot_data(c, len as usize))
    }

    /// Writes `data` at byte `offset` through queue 0.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let q = self.queue(0);
        q.stage_write(data)?;
        q.run(BlkRequest::Write {
            sector: offset / 512,
            len: data.len() as u32,
        })
        .map(|_| ())
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.queue(0).run(BlkRequest::Flush).map(|_| ())
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.queue(0)
            .run(BlkRequest::Discard(vec![(
                offset / 512,
                (len / 512) as u32,
                0,
            )]))
            .map(|_| ())
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), ClientError> {
        let flags = if unmap {
            vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        self.queue(0)
            .run(BlkRequest::WriteZeroes(vec![(
                offset / 512,
                (len / 512) as u32,
                flags,
            )]))
            .map(|_| ())
    }

    /// The device id (GET_ID), NUL padding removed.
    pub fn get_id(&mut self) -> Result<String, ClientError> {
        let q = self.queue(0);
        let c = q.run(BlkRequest::GetId)?;
        let raw = q.slot_data(c, 20);
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        Ok(String::from_utf8_lossy(&raw[..end]).into_owned())
    }
}

#[derive(Debug, Clone, Copy)]
struct SlotAddrs {
    header: GuestAddress,
    status: GuestAddress,
    data: GuestAddress,
}

#[derive(Debug)]
struct InFlightReq {
    descs: Vec<u16>,
    tag: u64,
    slot: Option<u16>,
}

/// One virtqueue of a [`Client`].
pub struct ClientQueue {
    index: usize,
    size: u16,
    mem: Arc<Mem>,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    kick: EventFd,
    #[allow(dead_code)]
    call: EventFd,
    epoll: Epoll,
    event_idx: bool,
    avail_idx: u16,
    notified_idx: u16,
    used_seen: u16,
    free_desc: Vec<u16>,
    slots: Vec<SlotAddrs>,
    slot_bytes: usize,
    free_slots: Vec<u16>,
    inflight: HashMap<u16, InFlightReq>,
    seg_bytes: u32,
}

impl std::fmt::Debug for ClientQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientQueue")
            .field("index", &self.index)
            .field("in_flight", &self.inflight.len())
            .finish_non_exhaustive()
    }
}

fn mem_err(e: vm_memory::GuestMemoryError) -> ClientError {
    ClientError::Memory(e.to_string())
}

impl ClientQueue {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Slots free for [`ClientQueue::submit`].
    pub fn free_slots(&self) -> usize {
        self.free_slots.len()
    }

    /// Guest address of slot `slot`'s data buffer.
    pub fn slot_addr(&self, slot: u16) -> GuestAddress {
        self.slots[usize::from(slot)].data
    }

    /// Fills every slot's data buffer with `byte_source` output (e.g. random bytes, so a
    /// backend cannot store the writes as holes).
    pub fn fill_slots(
        &mut self,
        mut byte_source: impl FnMut(&mut [u8]),
    ) -> Result<(), ClientError> {
        let mut buf = vec![0u8; self.slot_bytes];
        for s in &self.slots {
            byte_source(&mut buf);
            self.mem.write_slice(&buf, s.data).map_err(mem_err)?;
        }
        Ok(())
    }

    /// Copies `data` into the slot the next [`ClientQueue::submit`] will use.
    pub fn stage_write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if data.len() > self.slot_bytes {
            return Err(ClientError::Protocol("write larger than a slot".into()));
        }
        let slot = *self
            .free_slots
            .last()
            .ok_or_else(|| ClientError::Protocol("no free slot".into()))?;
        self.mem
            .write_slice(data, self.slots[usize::from(slot)].data)
            .map_err(mem_err)
    }

    /// The first `len` bytes of the data buffer of a completed request's slot.
    pub fn slot_data(&self, c: Completion, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len.min(self.slot_bytes)];
        if let Some(s) = c.slot {
            let _ = self
                .mem
                .read_slice(&mut out, self.slots[usize::from(s)].data);
        }
        out
    }

    /// Submits a request using a free slot's buffers; returns its chain head. Kicks the
    /// backend unless `kick` is false (batching: call [`ClientQueue::notify`] afterwards).
    pub fn submit(&mut self, req: &BlkRequest, tag: u64, kick: bool) -> Result<u16, ClientError> {
        let slot = self
            .free_slots
            .pop()
            .ok_or_else(|| ClientError::Protocol("no free slot".into()))?;
        let r = self.submit_in_slot(req, tag, slot, kick);
        if r.is_err() {
            self.free_slots.push(slot);
        }
        r
    }

    fn submit_in_slot(
        &mut self,
        req: &BlkRequest,
        tag: u64,
        slot: u16,
        kick: bool,
    ) -> Result<u16, ClientError> {
        let s = self.slots[usize::from(slot)];
        let (t, sector) = match req {
            BlkRequest::Read { sector, .. } => (vb::VIRTIO_BLK_T_IN, *sector),
            BlkRequest::Write { sector, .. } => (vb::VIRTIO_BLK_T_OUT, *sector),
            BlkRequest::Flush => (vb::VIRTIO_BLK_T_FLUSH, 0),
            BlkRequest::GetId => (vb::VIRTIO_BLK_T_GET_ID, 0),
            BlkRequest::Discard(_) => (vb::VIRTIO_BLK_T_DISCARD, 0),
            BlkRequest::WriteZeroes(_) => (vb::VIRTIO_BLK_T_WRITE_ZEROES, 0),
            BlkRequest::Raw { req_type } => (*req_type, 0),
        };
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&t.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, s.header).map_err(mem_err)?;
        self.mem.write_obj(0xffu8, s.status).map_err(mem_err)?;
        let mut descs = vec![RawDesc {
            addr: s.header.0,
            len: 16,
            write: false,
        }];
        let data = |len: u32, write: bool, descs: &mut Vec<RawDesc>| -> Result<(), ClientError> {
            if len as usize > self.slot_bytes {
                return Err(ClientError::Protocol("request larger than a slot".into()));
            }
            let mut off = 0u32;
            while off < len {
                let n = (len - off).min(self.seg_bytes);
                descs.push(RawDesc {
                    addr: s.data.0 + u64::from(off),
                    len: n,
                    write,
                });
                off += n;
            }
            Ok(())
        };
        match req {
            BlkRequest::Read { len, .. } => data(*len, true, &mut descs)?,
            BlkRequest::Write { len, .. } => data(*len, false, &mut descs)?,
            BlkRequest::GetId => data(20, true, &mut descs)?,
            BlkRequest::Discard(segs) | BlkRequest::WriteZeroes(segs) => {
                let mut raw = Vec::with_capacity(segs.len() * 16);
                for (sector, n, flags) in segs {
                    raw.extend_from_slice(&sector.to_le_bytes());
                    raw.extend_from_slice(&n.to_le_bytes());
                    raw.extend_from_slice(&flags.to_le_bytes());
                }
                if raw.len() > self.slot_bytes {
                    return Err(ClientError::Protocol("too many segments".into()));
                }
                self.mem.write_slice(&raw, s.data).map_err(mem_err)?;
                descs.push(RawDesc {
                    addr: s.data.0,
                    len: raw.len() as u32,
                    write: false,
                });
            }
            BlkRequest::Flush | BlkRequest::Raw { .. } => {}
        }
        descs.push(RawDesc {
            addr: s.status.0,
            len: 1,
            write: true,
        });
        self.submit_chain(&descs, tag, Some(slot), kick)
    }

    /// Submits a hand-made chain (any addresses, any directions); returns its head.
    pub fn submit_raw(&mut self, descs: &[RawDesc], tag: u64) -> Result<u16, ClientError> {
        self.submit_chain(descs, tag, None, true)
    }

    fn submit_chain(
        &mut self,
        descs: &[RawDesc],
        tag: u64,
        slot: Option<u16>,
        kick: bool,
    ) -> Result<u16, ClientError> {
        if descs.is_empty() || descs.len() > self.free_desc.len() {
            return Err(ClientError::Protocol(format!(
                "chain of {} descriptors, {} free",
                descs.len(),
                self.free_desc.len()
            )));
        }
        let ids: Vec<u16> = (0..descs.len())
            .filter_map(|_| self.free_desc.pop())
            .collect();
        for (i, d) in descs.iter().enumerate() {
            let mut flags = 0u16;
            if d.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                ids[i + 1]
            } else {
                0
            };
            let at = GuestAddress(self.desc.0 + 16 * u64::from(ids[i]));
            self.mem
                .write_obj(Descriptor::new(d.addr, d.len, flags, next), at)
                .map_err(mem_err)?;
        }
        let head = ids[0];
        let ring_at = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.avail_idx % self.size));
        self.mem.write_obj(head.to_le(), ring_at).map_err(mem_err)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(
                self.avail_idx.to_le(),
                GuestAddress(self.avail.0 + 2),
                Ordering::Release,
            )
            .map_err(mem_err)?;
        self.inflight.insert(
            head,
            InFlightReq {
                descs: ids,
                tag,
                slot,
            },
        );
        if kick {
            self.notify()?;
        }
        Ok(head)
    }

    /// Kicks the backend if it wants to know about the requests made available since the
    /// last call (after submissions made with `kick = false`).
    pub fn notify(&mut self) -> Result<(), ClientError> {
        let old = self.notified_idx;
        if old == self.avail_idx {
            return Ok(());
        }
        self.notified_idx = self.avail_idx;
        std::sync::atomic::fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            // vring_need_event(avail_event, new, old)
            let avail_event: u16 = self
                .mem
                .load(
                    GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size)),
                    Ordering::Acquire,
                )
                .map(u16::from_le)
                .map_err(mem_err)?;
            self.avail_idx.wrapping_sub(avail_event).wrapping_sub(1)
                < self.avail_idx.wrapping_sub(old)
        } else {
            let flags: u16 = self
                .mem
                .load(self.used, Ordering::Acquire)
                .map(u16::from_le)
                .map_err(mem_err)?;
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if needed {
            self.kick.write(1)?;
        }
        Ok(())
    }

    /// Collects the completions the device has published so far (never blocks).
    pub fn poll(&mut self) -> Result<Vec<Completion>, ClientError> {
        let used_idx: u16 = self
            .mem
            .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(mem_err)?;
        let mut out = Vec::new();
        while self.used_seen != used_idx {
            let at = GuestAddress(self.used.0 + 4 + 8 * u64::from(self.used_seen % self.size));
            let id: u32 = self.mem.read_obj(at).map_err(mem_err)?;
            let len: u32 = self.mem.read_obj(GuestAddress(at.0 + 4)).map_err(mem_err)?;
            self.used_seen = self.used_seen.wrapping_add(1);
            let head = u16::try_from(u32::from_le(id))
                .map_err(|_| ClientError::Protocol(format!("used id {id} out of range")))?;
            let r = self
                .inflight
                .remove(&head)
                .ok_or_else(|| ClientError::Protocol(format!("used id {head} not in flight")))?;
            self.free_desc.extend(r.descs.iter().rev());
            let status = match r.slot {
                Some(s) => {
                    self.free_slots.push(s);
                    Some(
                        self.mem
                            .read_obj::<u8>(self.slots[usize::from(s)].status)
                            .map_err(mem_err)?,
                    )
                }
                None => None,
            };
            out.push(Completion {
                head,
                used_len: u32::from_le(len),
                tag: r.tag,
                status,
                slot: r.slot,
            });
        }
        if self.event_idx {
            // used_event: interrupt me at the next completion.
            self.mem
                .store(
                    self.used_seen.to_le(),
                    GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size)),
                    Ordering::Release,
                )
                .map_err(mem_err)?;
        }
        Ok(out)
    }

    /// Waits until at least one completion arrives (or `timeout`), returns them all.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Completion>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut events = [EpollEvent::default(); 1];
        loop {
            let done = self.poll()?;
            if !done.is_empty() {
                return Ok(done);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            // Check once more after arming (poll wrote used_event), then sleep on the call fd.
            std::sync::atomic::fence(Ordering::SeqCst);
            let done = self.poll()?;
            if !done.is_empty() {
                return Ok(done);
            }
            let ms = left.as_millis().clamp(1, 1000) as i32;
            match self.epoll.wait(ms, &mut events) {
                Ok(_) => {
                    let _ = self.call.read();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Submits one request and waits for it; an error status is an error.
    pub fn run(&mut self, req: BlkRequest) -> Result<Completion, ClientError> {
        let c = self.run_status(req)?;
        match c.status {
            Some(0) => Ok(c),
            Some(s) => Err(ClientError::Status(s)),
            None => Err(ClientError::Protocol("no status".into())),
        }
    }

    /// Submits one request and waits for it, whatever its status.
    pub fn run_status(&mut self, req: BlkRequest) -> Result<Completion, ClientError> {
        let head = self.submit(&req, 0, true)?;
        self.wait_head(head, Duration::from_secs(30))
    }

    /// Waits for the completion of chain `head` (others completing meanwhile are dropped:
    /// use this with one request in flight).
    pub fn wait_head(&mut self, head: u16, timeout: Duration) -> Result<Completion, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            for c in self.wait(left)? {
                if c.head == head {
                    return Ok(c);
                }
            }
        }
    }
}
