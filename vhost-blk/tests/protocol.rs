//! vhost-user-blk protocol tests: the crate's own driver ([`vhost_blk::client`], a real
//! vhost-user frontend with split virtqueues in shared memfd memory) drives a [`Session`]
//! over a unix socket, against the in-memory device.

#![allow(clippy::unwrap_used)] // tests: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use vhost_blk::client::{BlkRequest, Client, ClientConfig, ClientError, RawDesc};
use vhost_blk::request::{STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
use vhost_blk::{
    BackendConfig, BlockDevice, DeviceError, Listener, MemDevice, Session, SessionOptions,
    VhostStats,
};
use virtio_bindings::bindings::virtio_blk as vb;
use vm_memory::{Bytes, GuestAddress};

const SIZE: usize = 16 << 20;

struct Server {
    session: Session,
    stats: Arc<VhostStats>,
    guard_drops: Arc<AtomicUsize>,
}

struct DropCounter(Arc<AtomicUsize>);
impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Binds `path`, then accepts one connection on a thread (the client connects meanwhile).
fn serve<D: BlockDevice>(
    path: &Path,
    device: Arc<D>,
    config: BackendConfig,
    rt: &tokio::runtime::Runtime,
) -> std::thread::JoinHandle<Server> {
    let mut listener = Listener::new(path, true).unwrap();
    let handle = rt.handle().clone();
    std::thread::spawn(move || {
        let stats = Arc::new(VhostStats::default());
        let guard_drops = Arc::new(AtomicUsize::new(0));
        let session = Session::accept(
            &mut listener,
            device,
            SessionOptions {
                name: "test".into(),
                config,
                runtime: handle,
                stats: stats.clone(),
                guard: Box::new(DropCounter(guard_drops.clone())),
            },
        )
        .unwrap();
        Server {
            session,
            stats,
            guard_drops,
        }
    })
}

fn client_config(num_queues: u16) -> ClientConfig {
    ClientConfig {
        num_queues,
        queue_size: 128,
        slots: 32,
        slot_bytes: 256 << 10,
        scratch_bytes: 1 << 20,
        event_idx: true,
    }
}

fn setup(
    name: &str,
    device: MemDevice,
    config: BackendConfig,
    ccfg: &ClientConfig,
) -> (
    tempfile::TempDir,
    tokio::runtime::Runtime,
    Arc<MemDevice>,
    Client,
    Server,
) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join(format!("{name}.sock"));
    let rt = runtime();
    let dev = Arc::new(device);
    let server = serve(&path, dev.clone(), config, &rt);
    let client = Client::connect(&path, ccfg).unwrap();
    let server = server.join().unwrap();
    (dir, rt, dev, client, server)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn data_path_commands() {
    let (_d, rt, dev, mut c, server) = setup(
        "data",
        MemDevice::new("vol-data", SIZE),
        BackendConfig::default(),
        &client_config(1),
    );
    let a = pattern(1, 64 << 10);
    c.write(4096, &a).unwrap();
    assert_eq!(c.read(4096, a.len() as u32).unwrap(), a);
    assert_eq!(&dev.snapshot()[4096..4096 + a.len()], &a[..]);
    // A 512-byte aligned, non-4K request (the device accepts those too).
    c.write(512, &pattern(2, 1024)).unwrap();
    assert_eq!(c.read(512, 1024).unwrap(), pattern(2, 1024));
    c.flush().unwrap();

    c.discard(8192, 16384).unwrap();
    assert!(c.read(8192, 16384).unwrap().iter().all(|b| *b == 0));
    assert_eq!(c.read(4096, 4096).unwrap(), a[..4096]);
    c.write(1 << 20, &pattern(3, 65536)).unwrap();
    c.write_zeroes(1 << 20, 32768, true).unwrap();
    c.write_zeroes((1 << 20) + 32768, 4096, false).unwrap();
    let back = c.read(1 << 20, 65536).unwrap();
    assert!(back[..36864].iter().all(|b| *b == 0));
    assert_eq!(back[36864..], pattern(3, 65536)[36864..]);
    // Several discard segments in one request.
    c.write(2 << 20, &pattern(4, 65536)).unwrap();
    c.queue(0)
        .run(BlkRequest::Discard(vec![
            ((2 << 20) / 512, 8, 0),
            (((2 << 20) + 32768) / 512, 16, 0),
        ]))
        .unwrap();
    let back = c.read(2 << 20, 65536).unwrap();
    assert!(back[..4096].iter().all(|b| *b == 0));
    assert_eq!(back[4096..32768], pattern(4, 65536)[4096..32768]);
    assert!(back[32768..40960].iter().all(|b| *b == 0));

    assert_eq!(c.get_id().unwrap(), "vol-data");
    // Reads past the end are I/O errors, the device stays usable.
    let end = SIZE as u64 / 512;
    let r = c.queue(0).run_status(BlkRequest::Read {
        sector: end - 1,
        len: 4096,
    });
    assert_eq!(r.unwrap().status, Some(STATUS_IOERR));
    assert_eq!(c.read(4096, 4096).unwrap(), a[..4096]);

    let s = server.stats.snapshot();
    assert!(s.requests.iter().sum::<u64>() >= 15, "{s:?}");
    assert_eq!(s.request_errors, 1);
    assert_eq!(s.connections_active, 1);
    drop(c);
    rt.block_on(server.session.closed());
    assert_eq!(server.guard_drops.load(Ordering::SeqCst), 1);
    assert_eq!(server.stats.snapshot().connections_active, 0);
}

#[test]
fn config_space_features_and_long_ids() {
    let name = "a-volume-name-longer-than-twenty-bytes";
    let (_d, _rt, _dev, mut c, _server) = setup(
        "cfg",
        MemDevice::new(name, SIZE),
        BackendConfig::default(),
        &client_config(2),
    );
    let cfg = c.config();
    assert_eq!(cfg.capacity_sectors, SIZE as u64 / 512);
    assert_eq!(cfg.blk_size, 4096);
    assert_eq!(cfg.num_queues, 2);
    assert_eq!(cfg.seg_max, 126);
    assert_eq!(cfg.size_max, 256 << 10);
    assert!(cfg.write_zeroes_may_unmap);
    assert!(cfg.max_discard_seg >= 1 && cfg.max_write_zeroes_seg >= 1);
    for f in [
        vb::VIRTIO_BLK_F_FLUSH,
        vb::VIRTIO_BLK_F_DISCARD,
        vb::VIRTIO_BLK_F_WRITE_ZEROES,
        vb::VIRTIO_BLK_F_MQ,
        vb::VIRTIO_BLK_F_BLK_SIZE,
        vb::VIRTIO_BLK_F_TOPOLOGY,
        vb::VIRTIO_BLK_F_SEG_MAX,
        virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert!(c.has_feature(f), "feature {f} missing");
    }
    assert!(!c.has_feature(vb::VIRTIO_BLK_F_RO));
    // GET_ID: the first 20 bytes, no terminator.
    assert_eq!(c.get_id().unwrap(), &name[..20]);
}

#[test]
fn many_requests_in_flight_on_two_queues() {
    let (_d, rt, dev, mut c, server) = setup(
        "mq",
        MemDevice::new("mq", SIZE),
        BackendConfig::default(),
        &client_config(2),
    );
    let queues = c.take_queues();
    let threads: Vec<_> = queues
        .into_iter()
        .map(|mut q| {
            std::thread::spawn(move || {
                let qi = q.index() as u64;
                // 32 writes in flight at once, each 16 KiB at its own offset.
                let mut heads = Vec::new();
                for i in 0..32u64 {
                    let data = pattern((qi * 32 + i) as u8, 16384);
                    q.stage_write(&data).unwrap();
                    let offset = (qi * 32 + i) * 16384;
                    heads.push(
                        q.submit(
                            &BlkRequest::Write {
                                sector: offset / 512,
                                len: 16384,
                            },
                            i,
                            i == 31,
                        )
                        .unwrap(),
                    );
                }
                let mut done = Vec::new();
                while done.len() < 32 {
                    done.extend(q.wait(Duration::from_secs(30)).unwrap());
                }
                // In-order publication: completions come back in submission order.
                let tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
                assert_eq!(tags, (0..32).collect::<Vec<_>>());
                assert!(done.iter().all(|c| c.status == Some(STATUS_OK)));
                // 32 reads in flight.
                for i in 0..32u64 {
                    let offset = (qi * 32 + i) * 16384;
                    q.submit(
                        &BlkRequest::Read {
                            sector: offset / 512,
                            len: 16384,
                        },
                        i,
                        true,
                    )
                    .unwrap();
                }
                let mut n = 0;
                while n < 32 {
                    for c in q.wait(Duration::from_secs(30)).unwrap() {
                        assert_eq!(c.status, Some(STATUS_OK));
                        assert_eq!(c.used_len, 16384 + 1);
                        assert_eq!(
                            q.slot_data(c, 16384),
                            pattern((qi * 32 + c.tag) as u8, 16384)
                        );
                        n += 1;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let snap = dev.snapshot();
    for i in 0..64u64 {
        let at = (i * 16384) as usize;
        assert_eq!(&snap[at..at + 16384], &pattern(i as u8, 16384)[..]);
    }
    drop(c);
    rt.block_on(server.session.closed());
}

#[test]
fn malformed_chains_get_a_status_or_are_dropped_and_the_device_survives() {
    let config = BackendConfig {
        seg_max: 15,
        size_max: 4096,
        max_request_bytes: 64 << 10,
        ..Default::default()
    };
    let (_d, _rt, dev, mut c, server) = setup(
        "bad",
        MemDevice::new("bad", SIZE),
        config,
        &client_config(1),
    );
    c.write(0, &pattern(9, 8192)).unwrap();
    let mem_end = {
        use vm_memory::GuestMemoryBackend;
        c.mem().last_addr().0 + 1
    };
    let s = c.scratch().0;
    let hdr = |t: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    };
    let status_at = s + 4000;
    let rd = |addr, len| RawDesc {
        addr,
        len,
        write: false,
    };
    let wr = |addr, len| RawDesc {
        addr,
        len,
        write: true,
    };
    // (what, header bytes at the scratch area, chain, expected status; None = no status
    // written, used length 0)
    type Case = (&'static str, Vec<u8>, Vec<RawDesc>, Option<u8>);
    let mut cases: Vec<Case> = vec![
        (
            "unknown type",
            hdr(77, 0).to_vec(),
            vec![rd(s, 16), wr(status_at, 1)],
            Some(STATUS_UNSUPP),
        ),
        (
            "short header",
            hdr(vb::VIRTIO_BLK_T_IN, 0).to_vec(),
            vec![rd(s, 8), wr(status_at, 1)],
            Some(STATUS_IOERR),
        ),
        (
            "header outside guest memory",
            vec![],
            vec![rd(mem_end - 8, 16), wr(status_at, 1)],
            Some(STATUS_IOERR),
        ),
        (
            "data outside guest memory",
            hdr(vb::VIRTIO_BLK_T_IN, 0).to_vec(),
            vec![rd(s, 16), wr(u64::MAX - 100, 512), wr(status_at, 1)],
            Some(STATUS_IOERR),
        ),
        (
            "readable after writable",
            hdr(vb::VIRTIO_BLK_T_OUT, 0).to_vec(),
            vec![
                rd(s, 16),
                wr(s + 512, 512),
                rd(s + 1024, 512),
                wr(status_at, 1),
            ],
            Some(STATUS_IOERR),
        ),
        (
            "misaligned length",
            hdr(vb::VIRTIO_BLK_T_IN, 0).to_vec(),
            vec![rd(s, 16), wr(s + 512, 100), wr(status_at, 1)],
            Some(STATUS_IOERR),
        ),
        (
            "too large",
            hdr(vb::VIRTIO_BLK_T_IN, 0).to_vec(),
            vec![rd(s, 16), wr(s + 4096, 128 << 10), wr(status_at, 1)],
            Some(STATUS_IOERR),
        ),
        (
            "sector overflow",
            hdr(vb::VIRTIO_BLK_T_OUT, u64::MAX - 1).to_vec(),
            vec![rd(s, 16), rd(s + 512, 512), wr(status_at, 1)],
            Some(STATUS_IOERR),
        ),
        (
            "write with an in-buffer",
            hdr(vb::VIRTIO_BLK_T_OUT, 0).to_vec(),
            vec![rd(s, 16), wr(s + 512, 512), wr(status_at, 1)],
            Some(STATUS_IOERR),
        ),
        (
            "no writable descriptor",
            hdr(vb::VIRTIO_BLK_T_IN, 0).to_vec(),
            vec![rd(s, 16), rd(status_at, 1)],
            None,
        ),
        (
            "status outside guest memory",
            hdr(vb::VIRTIO_BLK_T_FLUSH, 0).to_vec(),
            vec![rd(s, 16), wr(mem_end, 1)],
            None,
        ),
    ];
    // Discard with the unmap flag (UNSUPP by spec) and a segment past the end (IOERR).
    let mut disc = hdr(vb::VIRTIO_BLK_T_DISCARD, 0).to_vec();
    disc.extend_from_slice(&0u64.to_le_bytes());
    disc.extend_from_slice(&8u32.to_le_bytes());
    disc.extend_from_slice(&1u32.to_le_bytes());
    cases.push((
        "discard with unmap flag",
        disc,
        vec![rd(s, 32), wr(status_at, 1)],
        Some(STATUS_UNSUPP),
    ));
    let mut disc = hdr(vb::VIRTIO_BLK_T_DISCARD, 0).to_vec();
    disc.extend_from_slice(&(SIZE as u64 / 512).to_le_bytes());
    disc.extend_from_slice(&8u32.to_le_bytes());
    disc.extend_from_slice(&0u32.to_le_bytes());
    cases.push((
        "discard past the end",
        disc,
        vec![rd(s, 32), wr(status_at, 1)],
        Some(STATUS_IOERR),
    ));

    for (what, header, chain, expected) in cases {
        if !header.is_empty() {
            c.mem().write_slice(&header, GuestAddress(s)).unwrap();
        }
        c.mem().write_obj(0xaau8, GuestAddress(status_at)).unwrap();
        let q = c.queue(0);
        let head = q.submit_raw(&chain, 0).unwrap();
        let done = q.wait_head(head, Duration::from_secs(10)).unwrap();
        let status: u8 = c.mem().read_obj(GuestAddress(status_at)).unwrap();
        match expected {
            Some(st) => {
                assert_eq!(status, st, "{what}");
                assert_eq!(done.used_len, 1, "{what}");
            }
            None => {
                assert_eq!(status, 0xaa, "{what}: nothing may be written");
                assert_eq!(done.used_len, 0, "{what}");
            }
        }
        // Still alive and correct after each one.
        assert_eq!(c.read(0, 8192).unwrap(), pattern(9, 8192), "after {what}");
    }
    assert_eq!(&dev.snapshot()[..8192], &pattern(9, 8192)[..]);
    assert_eq!(
        server.stats.snapshot().requests[6],
        13,
        "rejected requests counted"
    );
}

#[test]
fn read_only_device_refuses_writes() {
    let (_d, _rt, dev, mut c, _server) = setup(
        "ro",
        MemDevice::new("ro", SIZE).read_only(),
        BackendConfig::default(),
        &client_config(1),
    );
    assert!(c.has_feature(vb::VIRTIO_BLK_F_RO));
    assert!(matches!(
        c.write(0, &pattern(1, 4096)),
        Err(ClientError::Status(STATUS_IOERR))
    ));
    assert!(matches!(
        c.discard(0, 4096),
        Err(ClientError::Status(STATUS_IOERR))
    ));
    assert!(matches!(
        c.write_zeroes(0, 4096, false),
        Err(ClientError::Status(STATUS_IOERR))
    ));
    assert_eq!(c.read(0, 4096).unwrap(), vec![0u8; 4096]);
    c.flush().unwrap();
    assert!(dev.snapshot().iter().all(|b| *b == 0));
}

#[test]
fn works_without_event_idx() {
    let mut ccfg = client_config(1);
    ccfg.event_idx = false;
    let (_d, _rt, _dev, mut c, _server) = setup(
        "noidx",
        MemDevice::new("noidx", SIZE),
        BackendConfig::default(),
        &ccfg,
    );
    assert!(!c.has_feature(virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX));
    for i in 0..50u64 {
        c.write(i * 4096, &pattern(i as u8, 4096)).unwrap();
    }
    for i in 0..50u64 {
        assert_eq!(c.read(i * 4096, 4096).unwrap(), pattern(i as u8, 4096));
    }
}

/// A device whose requests at offset 0 take `delay`.
struct Slow {
    inner: MemDevice,
    delay: Duration,
}

impl BlockDevice for Slow {
    type Buf = Vec<u8>;
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn id(&self) -> String {
        self.inner.id()
    }
    fn alloc_buf(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        if offset == 0 {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        if offset == 0 {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.inner.write_zeroes(offset, len, fua).await
    }
}

/// Completions are published in avail order even when the device finishes out of order
/// (the invariant reconnects rely on), and `GET_VRING_BASE` waits for requests in flight.
#[test]
fn completions_are_published_in_order_and_stop_drains() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.sock");
    let rt = runtime();
    let dev = Arc::new(Slow {
        inner: MemDevice::new("slow", SIZE),
        delay: Duration::from_millis(700),
    });
    let server = serve(&path, dev.clone(), BackendConfig::default(), &rt);
    let mut c = Client::connect(&path, &client_config(1)).unwrap();
    let _server = server.join().unwrap();
    let q = c.queue(0);
    q.stage_write(&pattern(1, 4096)).unwrap();
    q.submit(
        &BlkRequest::Write {
            sector: 0,
            len: 4096,
        },
        0,
        true,
    )
    .unwrap();
    q.stage_write(&pattern(2, 4096)).unwrap();
    q.submit(
        &BlkRequest::Write {
            sector: 8,
            len: 4096,
        },
        1,
        true,
    )
    .unwrap();
    // The second write is done in the device long before the first...
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(&dev.inner.snapshot()[4096..8192], &pattern(2, 4096)[..]);
    // ...but the guest sees nothing complete until the first one is.
    assert!(q.poll().unwrap().is_empty());
    let mut done = Vec::new();
    while done.len() < 2 {
        done.extend(q.wait(Duration::from_secs(10)).unwrap());
    }
    assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), vec![0, 1]);

    // GET_VRING_BASE with a slow request in flight returns only after it is published.
    let q = c.queue(0);
    q.stage_write(&pattern(3, 4096)).unwrap();
    q.submit(
        &BlkRequest::Write {
            sector: 0,
            len: 4096,
        },
        2,
        true,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200)); // popped, in the device
    let base = c.stop_queue(0).unwrap();
    assert_eq!(base, 3);
    assert_eq!(c.queue(0).poll().unwrap().len(), 1);
}

/// Shutting a connection down with a request in the device: nothing more is published to
/// the guest, the request still finishes, and only then is the guard released.
#[test]
fn shutdown_stops_publishing_and_releases_the_guard_after_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shut.sock");
    let rt = runtime();
    let dev = Arc::new(Slow {
        inner: MemDevice::new("shut", SIZE),
        delay: Duration::from_millis(500),
    });
    let server = serve(&path, dev.clone(), BackendConfig::default(), &rt);
    let mut c = Client::connect(&path, &client_config(1)).unwrap();
    let server = server.join().unwrap();
    let q = c.queue(0);
    q.stage_write(&pattern(5, 4096)).unwrap();
    q.submit(
        &BlkRequest::Write {
            sector: 0,
            len: 4096,
        },
        0,
        true,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    server.session.shutdown();
    assert_eq!(server.guard_drops.load(Ordering::SeqCst), 0);
    rt.block_on(server.session.closed());
    assert_eq!(server.guard_drops.load(Ordering::SeqCst), 1);
    // The write reached the device before the guard was released...
    assert_eq!(&dev.inner.snapshot()[..4096], &pattern(5, 4096)[..]);
    // ...but was never published (a reconnecting frontend resubmits it).
    assert!(c.queue(0).poll().unwrap().is_empty());
    assert!(server.session.is_closed());
}
