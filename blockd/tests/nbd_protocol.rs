//! Protocol tests: a raw NBD client written here (with the spec's numbers, not the server's
//! constants) speaks to the in-process server over a Unix socket.

#![allow(clippy::unwrap_used)]

#[path = "nbd_support.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use blockd::nbd::ServerConfig;
use support::{MIB, TestDevice, TestExports, TestServer, eventually, pattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

// Values from doc/proto.md of the NBD reference implementation.
const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const OPT_REPLY_MAGIC: u64 = 0x3e889045565a9;
const REQUEST_MAGIC: u32 = 0x25609513;
const SIMPLE_MAGIC: u32 = 0x67446698;
const STRUCTURED_MAGIC: u32 = 0x668e33ef;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const FLAG_HAS_FLAGS: u16 = 1;
const FLAG_READ_ONLY: u16 = 2;
const FLAG_SEND_FLUSH: u16 = 4;
const FLAG_SEND_FUA: u16 = 8;
const FLAG_SEND_TRIM: u16 = 32;
const FLAG_SEND_WRITE_ZEROES: u16 = 64;
const FLAG_SEND_DF: u16 = 128;
const FLAG_CAN_MULTI_CONN: u16 = 256;
const FLAG_SEND_FAST_ZERO: u16 = 2048;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;
const CMD_FLAG_DF: u16 = 4;
const CMD_FLAG_REQ_ONE: u16 = 8;
const CMD_FLAG_FAST_ZERO: u16 = 16;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = 0x8001;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const EIO: u32 = 5;

const STATE_HOLE_ZERO: u32 = 3;

const DISK_SIZE: usize = MIB;
const T: Duration = Duration::from_secs(10);

/// Writable `disk` (1 MiB), read-only `ro` (1 MiB), writable `big` (64 MiB).
fn exports() -> TestExports {
    let e = TestExports::default();
    e.add("disk", TestDevice::new("disk", DISK_SIZE));
    e.add("ro", TestDevice::read_only("ro", DISK_SIZE));
    e.add("big", TestDevice::new("big", 64 * MIB));
    e
}

fn device(srv: &TestServer, name: &str) -> std::sync::Arc<TestDevice> {
    srv.exports.device(name)
}

#[derive(Debug)]
struct OptReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

#[derive(Debug)]
struct Chunk {
    flags: u16,
    reply_type: u16,
    handle: u64,
    payload: Vec<u8>,
}

impl Chunk {
    fn error(&self) -> (u32, String) {
        assert_eq!(self.reply_type, REPLY_TYPE_ERROR, "{self:?}");
        let errno = u32::from_be_bytes(self.payload[0..4].try_into().unwrap());
        let len = u16::from_be_bytes(self.payload[4..6].try_into().unwrap()) as usize;
        assert_eq!(self.payload.len(), 6 + len);
        (
            errno,
            String::from_utf8(self.payload[6..].to_vec()).unwrap(),
        )
    }
}

/// The raw client.
struct Client {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
}

impl Client {
    /// Connects and completes the initial exchange with `client_flags`.
    async fn connect_with(srv: &TestServer, client_flags: u32) -> Client {
        let s = UnixStream::connect(&srv.socket).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let mut greeting = [0u8; 18];
        r.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..8], NBDMAGIC);
        assert_eq!(&greeting[8..16], IHAVEOPT);
        // FIXED_NEWSTYLE | NO_ZEROES and nothing else.
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]), 3);
        w.write_all(&client_flags.to_be_bytes()).await.unwrap();
        Client { r, w }
    }

    async fn connect(srv: &TestServer) -> Client {
        Self::connect_with(srv, 3).await
    }

    /// Connects, optionally negotiates structured replies, and GOes to `name`.
    async fn open(srv: &TestServer, name: &str, structured: bool) -> (Client, u64, u16) {
        let mut c = Client::connect(srv).await;
        if structured {
            c.structured().await;
        }
        let (size, flags) = c.go(name).await;
        (c, size, flags)
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(IHAVEOPT);
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.w.write_all(&m).await.unwrap();
    }

    async fn opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        tokio::time::timeout(T, self.r.read_exact(&mut h))
            .await
            .expect("option reply timed out")
            .unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.r.read_exact(&mut data).await.unwrap();
        OptReply {
            option: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            reply_type: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        }
    }

    async fn structured(&mut self) {
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await;
        let r = self.opt_reply().await;
        assert_eq!((r.option, r.reply_type), (OPT_STRUCTURED_REPLY, REP_ACK));
    }

    fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p
    }

    /// Sends INFO or GO and collects the replies up to the final one.
    async fn info_or_go(&mut self, option: u32, name: &str, infos: &[u16]) -> Vec<OptReply> {
        self.send_option(option, &Self::info_payload(name, infos))
            .await;
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply().await;
            assert_eq!(r.option, option);
            let last = r.reply_type != REP_INFO;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// GO that must succeed; returns size and transmission flags.
    async fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.info_or_go(OPT_GO, name, &[]).await;
        assert_eq!(
            replies.last().unwrap().reply_type,
            REP_ACK,
            "GO {name}: {replies:?}"
        );
        export_info(&replies)
    }

    async fn meta(&mut self, option: u32, name: &str, queries: &[&str]) -> Vec<OptReply> {
        let mut p = Vec::new();
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        self.send_option(option, &p).await;
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply().await;
            let last = r.reply_type != REP_META_CONTEXT;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    async fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let mut m = request_bytes(flags, cmd, handle, offset, len);
        m.extend_from_slice(data);
        self.w.write_all(&m).await.unwrap();
    }

    /// A simple reply; `data_len` bytes follow it if the error is zero.
    async fn simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        read_simple(&mut self.r, data_len).await
    }

    async fn chunk(&mut self) -> Chunk {
        read_chunk(&mut self.r).await
    }

    /// Simple-reply write; returns the error.
    async fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(0, CMD_WRITE, handle, offset, data.len() as u32, data)
            .await;
        let (err, h, _) = self.simple(0).await;
        assert_eq!(h, handle);
        err
    }

    /// Simple-reply read.
    async fn read(&mut self, handle: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.request(0, CMD_READ, handle, offset, len, &[]).await;
        let (err, h, data) = self.simple(len as usize).await;
        assert_eq!(h, handle);
        (err, data)
    }

    /// Structured read that must succeed with one OFFSET_DATA chunk marked DONE.
    async fn sread(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, handle, offset, len, &[]).await;
        let c = self.chunk().await;
        assert_eq!(c.handle, handle);
        assert_eq!(c.reply_type, REPLY_TYPE_OFFSET_DATA, "{c:?}");
        assert_eq!(c.flags, REPLY_FLAG_DONE);
        assert_eq!(
            u64::from_be_bytes(c.payload[..8].try_into().unwrap()),
            offset
        );
        c.payload[8..].to_vec()
    }

    /// Waits for the server to close the connection (EOF on the read side).
    async fn expect_closed(&mut self) {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(T, self.r.read(&mut buf)).await {
            Err(_) => panic!("connection not closed"),
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("unexpected {n} bytes: {:?}", &buf[..n]),
        }
    }

    /// Asserts nothing arrives for a while (the connection is open and quiet).
    async fn expect_quiet(&mut self, d: Duration) {
        let mut buf = [0u8; 1];
        if let Ok(r) = tokio::time::timeout(d, self.r.read(&mut buf)).await {
            panic!("expected silence, got {r:?}");
        }
    }
}

async fn read_simple(r: &mut OwnedReadHalf, data_len: usize) -> (u32, u64, Vec<u8>) {
    let mut h = [0u8; 16];
    tokio::time::timeout(T, r.read_exact(&mut h))
        .await
        .expect("reply timed out")
        .unwrap();
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().unwrap()),
        SIMPLE_MAGIC
    );
    let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let mut data = Vec::new();
    if error == 0 {
        data.resize(data_len, 0);
        r.read_exact(&mut data).await.unwrap();
    }
    (error, handle, data)
}

async fn read_chunk(r: &mut OwnedReadHalf) -> Chunk {
    let mut h = [0u8; 20];
    tokio::time::timeout(T, r.read_exact(&mut h))
        .await
        .expect("reply timed out")
        .unwrap();
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().unwrap()),
        STRUCTURED_MAGIC
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.unwrap();
    Chunk {
        flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
        reply_type: u16::from_be_bytes(h[6..8].try_into().unwrap()),
        handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
        payload,
    }
}

fn request_bytes(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(28);
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}

fn export_info(replies: &[OptReply]) -> (u64, u16) {
    let r = replies
        .iter()
        .find(|r| r.reply_type == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes())
        .expect("NBD_INFO_EXPORT");
    assert_eq!(r.data.len(), 12);
    (
        u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
        u16::from_be_bytes(r.data[10..12].try_into().unwrap()),
    )
}

fn info_of(replies: &[OptReply], ty: u16) -> Option<Vec<u8>> {
    replies
        .iter()
        .find(|r| r.reply_type == REP_INFO && r.data[..2] == ty.to_be_bytes())
        .map(|r| r.data[2..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_with_info_then_simple_io() {
    let srv = TestServer::start(exports()).await;
    let mut c = Client::connect(&srv).await;
    let replies = c
        .info_or_go(
            OPT_GO,
            "disk",
            &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999],
        )
        .await;
    assert_eq!(replies.last().unwrap().reply_type, REP_ACK);
    let (size, flags) = export_info(&replies);
    assert_eq!(size, DISK_SIZE as u64);
    assert_eq!(
        flags,
        FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
            | FLAG_SEND_FAST_ZERO,
        "no SEND_DF without structured replies"
    );
    assert_eq!(info_of(&replies, INFO_NAME).unwrap(), b"disk");
    assert_eq!(
        info_of(&replies, INFO_DESCRIPTION).unwrap(),
        b"test device disk"
    );
    let bs = info_of(&replies, INFO_BLOCK_SIZE).unwrap();
    assert_eq!(bs.len(), 12);
    assert_eq!(u32::from_be_bytes(bs[0..4].try_into().unwrap()), 512);
    assert_eq!(u32::from_be_bytes(bs[4..8].try_into().unwrap()), 4096);
    assert_eq!(u32::from_be_bytes(bs[8..12].try_into().unwrap()), 32 << 20);

    let data = pattern(8192, 1);
    assert_eq!(c.write(1, 4096, &data).await, 0);
    let (err, back) = c.read(2, 4096, 8192).await;
    assert_eq!(err, 0);
    assert_eq!(back, data);
    // Zero-length read: success without data.
    assert_eq!(c.read(3, 0, 0).await, (0, vec![]));
    c.request(0, CMD_FLUSH, 4, 0, 0, &[]).await;
    assert_eq!(c.simple(0).await, (0, 4, vec![]));
    c.request(0, CMD_DISC, 5, 0, 0, &[]).await;
    c.expect_closed().await;

    let dev = device(&srv, "disk");
    assert_eq!(&dev.mem.snapshot()[4096..12288], &data[..]);
    assert!(
        dev.alloc_bufs.load(Ordering::SeqCst) >= 1,
        "write payload goes into alloc_buf"
    );
    assert!(dev.flushes.load(Ordering::SeqCst) >= 1);
    let stats = srv.server.stats().snapshot();
    assert_eq!(stats.requests.write, 1);
    assert_eq!(stats.requests.read, 2);
    assert_eq!(stats.requests.flush, 1);
    assert_eq!(stats.requests.disc, 1);
    assert_eq!(stats.read_bytes, 8192);
    assert_eq!(stats.written_bytes, 8192);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_info_and_attachment_lifetimes() {
    let srv = TestServer::start(exports()).await;
    let mut c = Client::connect(&srv).await;
    c.send_option(OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let r = c.opt_reply().await;
        assert_eq!(r.option, OPT_LIST);
        if r.reply_type == REP_ACK {
            break;
        }
        assert_eq!(r.reply_type, REP_SERVER);
        let len = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(r.data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, ["big", "disk", "ro"]);

    // INFO describes without keeping the export attached.
    let info = c.info_or_go(OPT_INFO, "disk", &[]).await;
    assert_eq!(info.last().unwrap().reply_type, REP_ACK);
    assert_eq!(srv.exports.attached(), 0);
    let (size, flags) = export_info(&info);
    // GO with the same parameters right after INFO: same information.
    let (size2, flags2) = c.go("disk").await;
    assert_eq!((size, flags), (size2, flags2));
    assert_eq!(srv.exports.attached(), 1);
    c.request(0, CMD_DISC, 1, 0, 0, &[]).await;
    c.expect_closed().await;
    assert!(eventually(T, || srv.exports.attached() == 0).await);
    assert_eq!(srv.server.stats().snapshot().connections_active, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_busy_and_empty_exports() {
    let srv = TestServer::start(exports()).await;
    let mut c = Client::connect(&srv).await;
    for (name, want) in [
        ("nope", REP_ERR_UNKNOWN),
        ("", REP_ERR_UNKNOWN),
        ("busy", REP_ERR_POLICY),
    ] {
        for opt in [OPT_INFO, OPT_GO] {
            let r = c.info_or_go(opt, name, &[INFO_BLOCK_SIZE]).await;
            assert_eq!(r.len(), 1, "no NBD_REP_INFO before an error: {r:?}");
            assert_eq!(r[0].reply_type, want, "{name:?}");
            assert!(!r[0].data.is_empty(), "error replies carry a message");
        }
    }
    // The session is still usable.
    c.go("disk").await;
    assert_eq!(c.read(1, 0, 512).await.0, 0);
    drop(c);

    // NBD_OPT_EXPORT_NAME has no error reply: an unknown name closes the connection.
    let mut c = Client::connect(&srv).await;
    c.send_option(OPT_EXPORT_NAME, b"nope").await;
    c.expect_closed().await;
    assert!(srv.server.stats().snapshot().handshakes_failed >= 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_with_and_without_zeroes() {
    let srv = TestServer::start(exports()).await;
    for (client_flags, expected_len) in [(3u32, 10usize), (1, 134)] {
        let mut c = Client::connect_with(&srv, client_flags).await;
        c.send_option(OPT_EXPORT_NAME, b"disk").await;
        let mut r = vec![0u8; expected_len];
        c.r.read_exact(&mut r).await.unwrap();
        assert_eq!(
            u64::from_be_bytes(r[0..8].try_into().unwrap()),
            DISK_SIZE as u64
        );
        let flags = u16::from_be_bytes(r[8..10].try_into().unwrap());
        assert_eq!(flags & FLAG_HAS_FLAGS, FLAG_HAS_FLAGS);
        assert!(r[10..].iter().all(|b| *b == 0));
        // The next bytes are the reply to our first request, not more padding.
        let (err, data) = c.read(7, 0, 512).await;
        assert_eq!((err, data.len()), (0, 512));
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_errors_keep_the_session() {
    let srv = TestServer::start(exports()).await;
    let mut c = Client::connect(&srv).await;

    c.send_option(99, b"whatever").await;
    let r = c.opt_reply().await;
    assert_eq!((r.option, r.reply_type), (99, REP_ERR_UNSUP));

    c.send_option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.opt_reply().await.reply_type, REP_ERR_POLICY);

    c.send_option(OPT_LIST, b"x").await;
    assert_eq!(c.opt_reply().await.reply_type, REP_ERR_INVALID);

    c.send_option(OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(c.opt_reply().await.reply_type, REP_ERR_INVALID);

    // GO whose name length runs past the payload.
    c.send_option(OPT_GO, &[0, 0, 0, 9, b'd', 0, 0]).await;
    assert_eq!(c.opt_reply().await.reply_type, REP_ERR_INVALID);
    // GO with trailing garbage.
    let mut p = Client::info_payload("disk", &[]);
    p.push(0);
    c.send_option(OPT_GO, &p).await;
    assert_eq!(c.opt_reply().await.reply_type, REP_ERR_INVALID);

    // Metadata contexts before structured replies.
    let r = c
        .meta(OPT_SET_META_CONTEXT, "disk", &["base:allocation"])
        .await;
    assert_eq!(r.last().unwrap().reply_type, REP_ERR_INVALID);

    c.structured().await;
    // Malformed meta context option (query count beyond the data).
    c.send_option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 5])
        .await;
    assert_eq!(c.opt_reply().await.reply_type, REP_ERR_INVALID);
    // Unknown export.
    let r = c.meta(OPT_LIST_META_CONTEXT, "nope", &[]).await;
    assert_eq!(r.last().unwrap().reply_type, REP_ERR_UNKNOWN);

    let (_, flags) = c.go("disk").await;
    assert_eq!(flags & FLAG_SEND_DF, FLAG_SEND_DF);
    assert_eq!(c.sread(1, 0, 512).await, vec![0; 512]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_option_is_refused_and_closes() {
    let srv = TestServer::start(exports()).await;
    let mut c = Client::connect(&srv).await;
    // Announce 1 MiB of option data but send only the header.
    let mut m = Vec::new();
    m.extend_from_slice(IHAVEOPT);
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    c.w.write_all(&m).await.unwrap();
    let r = c.opt_reply().await;
    assert_eq!((r.option, r.reply_type), (OPT_GO, REP_ERR_TOO_BIG));
    c.expect_closed().await;
    assert_eq!(srv.server.stats().snapshot().protocol_errors, 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_bad_flags_and_bad_option_magic() {
    let srv = TestServer::start(exports()).await;
    let mut c = Client::connect(&srv).await;
    c.send_option(OPT_ABORT, &[]).await;
    let r = c.opt_reply().await;
    assert_eq!((r.option, r.reply_type), (OPT_ABORT, REP_ACK));
    c.expect_closed().await;

    // Client flags we never offered.
    let mut c = Client::connect_with(&srv, 3 | 4).await;
    c.expect_closed().await;

    let mut c = Client::connect(&srv).await;
    c.w.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0").await.unwrap();
    c.expect_closed().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies() {
    let srv = TestServer::start(exports()).await;
    let (mut c, _, flags) = Client::open(&srv, "disk", true).await;
    assert_eq!(flags & FLAG_SEND_DF, FLAG_SEND_DF);
    let data = pattern(64 * 1024, 7);
    c.request(CMD_FLAG_FUA, CMD_WRITE, 10, 65536, data.len() as u32, &data)
        .await;
    let ch = c.chunk().await;
    assert_eq!(
        (ch.handle, ch.reply_type, ch.flags, ch.payload.len()),
        (10, REPLY_TYPE_NONE, REPLY_FLAG_DONE, 0)
    );
    assert_eq!(c.sread(11, 65536, 65536).await, data);
    // DF: still a single chunk.
    c.request(CMD_FLAG_DF, CMD_READ, 12, 65536, 4096, &[]).await;
    let ch = c.chunk().await;
    assert_eq!(
        (ch.reply_type, ch.flags),
        (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE)
    );
    assert_eq!(&ch.payload[8..], &data[..4096]);

    // Errors come as ERROR chunks with a message, also for reads.
    c.request(0, CMD_READ, 13, 100, 512, &[]).await;
    let ch = c.chunk().await;
    assert_eq!((ch.handle, ch.flags), (13, REPLY_FLAG_DONE));
    let (errno, msg) = ch.error();
    assert_eq!(errno, EINVAL);
    assert!(msg.contains("aligned"), "{msg}");
    c.request(0, CMD_WRITE, 14, DISK_SIZE as u64, 512, &[0; 512])
        .await;
    let (errno, msg) = c.chunk().await.error();
    assert_eq!(errno, EINVAL);
    assert!(msg.contains("beyond the end"), "{msg}");
    // Zero-length structured read: success, no data chunk.
    c.request(0, CMD_READ, 15, 0, 0, &[]).await;
    let ch = c.chunk().await;
    assert_eq!((ch.handle, ch.reply_type), (15, REPLY_TYPE_NONE));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_errors_and_the_connection_survives() {
    let srv = TestServer::start(exports()).await;
    let (mut c, _, _) = Client::open(&srv, "disk", false).await;
    let size = DISK_SIZE as u64;
    // (flags, cmd, offset, len, send payload, errno)
    let cases: &[(u16, u16, u64, u32, bool, u32)] = &[
        (0, CMD_READ, 1, 512, false, EINVAL),    // misaligned offset
        (0, CMD_READ, 0, 1000, false, EINVAL),   // misaligned length
        (0, CMD_READ, size, 512, false, EINVAL), // past the end
        (0, CMD_READ, u64::MAX - 511, 512, false, EINVAL), // overflowing range
        (0, CMD_WRITE, 512, 100, true, EINVAL),  // misaligned write, payload sent
        (0, CMD_WRITE, size - 512, 1024, true, EINVAL), // write past the end
        (0, CMD_TRIM, size, 512, false, EINVAL),
        (0, CMD_WRITE_ZEROES, size - 512, 4096, false, EINVAL),
        (0, 42, 0, 512, false, EINVAL),        // unknown command
        (0, CMD_CACHE, 0, 512, false, EINVAL), // not offered
        (CMD_FLAG_DF, CMD_READ, 0, 512, false, EINVAL), // DF without structured replies
        (CMD_FLAG_REQ_ONE, CMD_WRITE, 0, 512, true, EINVAL), // flag not valid for WRITE
        (0x100, CMD_READ, 0, 512, false, EINVAL), // unknown flag
        (0, CMD_FLUSH, 0, 512, false, EINVAL), // FLUSH with a length
        (0, CMD_BLOCK_STATUS, 0, 4096, false, EINVAL), // no meta context negotiated
    ];
    for (i, &(flags, cmd, offset, len, payload, errno)) in cases.iter().enumerate() {
        let handle = 100 + i as u64;
        let data = if payload {
            pattern(len as usize, 9)
        } else {
            vec![]
        };
        c.request(flags, cmd, handle, offset, len, &data).await;
        let (err, h, _) = c.simple(0).await;
        assert_eq!((h, err), (handle, errno), "case {i}");
    }
    // Still in sync: a valid write and read work, and nothing was written by the failures.
    let data = pattern(4096, 3);
    assert_eq!(c.write(1, 0, &data).await, 0);
    assert_eq!(c.read(2, 0, 4096).await, (0, data.clone()));
    let dev = device(&srv, "disk");
    let snap = dev.mem.snapshot();
    assert!(snap[4096..].iter().all(|b| *b == 0));
    assert_eq!(
        srv.server.stats().snapshot().request_errors,
        cases.len() as u64
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_requests() {
    let srv = TestServer::start(exports()).await;
    let (mut c, _, _) = Client::open(&srv, "big", false).await;
    let max = 32u32 << 20;
    // READ above the maximum block size: EINVAL, no payload.
    let (err, _) = c.read(1, 0, max + 512).await;
    assert_eq!(err, EINVAL);
    // WRITE above the maximum: the payload is consumed and discarded.
    let big = vec![0xeeu8; (max + 512) as usize];
    assert_eq!(c.write(2, 0, &big).await, EINVAL);
    // Exactly the maximum works both ways.
    let data = pattern(max as usize, 5);
    assert_eq!(c.write(3, 4096, &data).await, 0);
    let (err, back) = c.read(4, 4096, max).await;
    assert_eq!(err, 0);
    assert!(back == data);
    // Nothing of the refused write reached the device.
    let dev = device(&srv, "big");
    assert!(dev.mem.snapshot()[..4096].iter().all(|b| *b == 0));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export() {
    let srv = TestServer::start(exports()).await;
    let (mut c, _, flags) = Client::open(&srv, "ro", true).await;
    assert_eq!(flags & FLAG_READ_ONLY, FLAG_READ_ONLY);
    assert_eq!(
        flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FUA),
        0
    );
    c.request(0, CMD_WRITE, 1, 0, 4096, &[1; 4096]).await;
    assert_eq!(c.chunk().await.error().0, EPERM);
    c.request(0, CMD_TRIM, 2, 0, 4096, &[]).await;
    assert_eq!(c.chunk().await.error().0, EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096, &[]).await;
    assert_eq!(c.chunk().await.error().0, EPERM);
    assert_eq!(c.sread(4, 0, 4096).await, vec![0; 4096]);
    c.request(0, CMD_FLUSH, 5, 0, 0, &[]).await;
    assert_eq!(c.chunk().await.reply_type, REPLY_TYPE_NONE);
    srv.stop().await;
}

fn descriptors(c: &Chunk) -> (u32, Vec<(u32, u32)>) {
    assert_eq!(c.reply_type, REPLY_TYPE_BLOCK_STATUS, "{c:?}");
    assert_eq!(c.flags, REPLY_FLAG_DONE);
    assert_eq!((c.payload.len() - 4) % 8, 0);
    let id = u32::from_be_bytes(c.payload[..4].try_into().unwrap());
    let d = c.payload[4..]
        .chunks(8)
        .map(|x| {
            (
                u32::from_be_bytes(x[..4].try_into().unwrap()),
                u32::from_be_bytes(x[4..].try_into().unwrap()),
            )
        })
        .collect();
    (id, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_contexts_and_block_status() {
    let srv = TestServer::start(exports()).await;
    let dev = device(&srv, "disk");
    let mut c = Client::connect(&srv).await;
    c.structured().await;

    // LIST with no query lists everything; `base:` is a wildcard for LIST.
    for queries in [&[][..], &["base:"][..]] {
        let r = c.meta(OPT_LIST_META_CONTEXT, "disk", queries).await;
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].reply_type, REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], b"base:allocation");
        assert_eq!(r[1].reply_type, REP_ACK);
    }
    // Unknown namespaces and leaves select nothing.
    let r = c
        .meta(
            OPT_SET_META_CONTEXT,
            "disk",
            &["qemu:dirty-bitmap:b", "base:nope", "base:"],
        )
        .await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply_type, REP_ACK);
    // Select base:allocation.
    let r = c
        .meta(
            OPT_SET_META_CONTEXT,
            "disk",
            &["x-foo:bar", "base:allocation"],
        )
        .await;
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].reply_type, REP_META_CONTEXT);
    let id = u32::from_be_bytes(r[0].data[..4].try_into().unwrap());
    assert_eq!(&r[0].data[4..], b"base:allocation");
    c.go("disk").await;

    // Block 1 (4 KiB) and block 3 hold data; the rest is zero.
    let data = pattern(4096, 1);
    c.request(0, CMD_WRITE, 1, 4096, 4096, &data).await;
    assert_eq!(c.chunk().await.reply_type, REPLY_TYPE_NONE);
    c.request(0, CMD_WRITE, 2, 3 * 4096, 4096, &data).await;
    assert_eq!(c.chunk().await.reply_type, REPLY_TYPE_NONE);

    c.request(0, CMD_BLOCK_STATUS, 3, 0, 6 * 4096, &[]).await;
    let ch = c.chunk().await;
    assert_eq!(ch.handle, 3);
    let (got_id, d) = descriptors(&ch);
    assert_eq!(got_id, id);
    assert_eq!(
        d,
        vec![
            (4096, STATE_HOLE_ZERO),
            (4096, 0),
            (4096, STATE_HOLE_ZERO),
            (4096, 0),
            (8192, STATE_HOLE_ZERO)
        ]
    );
    // REQ_ONE: exactly one descriptor, not longer than the request.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, 8192, 16384, &[])
        .await;
    let (_, d) = descriptors(&c.chunk().await);
    assert_eq!(d, vec![(4096, STATE_HOLE_ZERO)]);
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 5, 4096, 512, &[])
        .await;
    let (_, d) = descriptors(&c.chunk().await);
    assert_eq!(d, vec![(512, 0)]);
    // Past the end: EINVAL.
    c.request(0, CMD_BLOCK_STATUS, 6, DISK_SIZE as u64 - 512, 1024, &[])
        .await;
    assert_eq!(c.chunk().await.error().0, EINVAL);
    // Trim and write-zeroes turn data back into holes.
    c.request(CMD_FLAG_FUA, CMD_TRIM, 7, 4096, 4096, &[]).await;
    assert_eq!(c.chunk().await.reply_type, REPLY_TYPE_NONE);
    c.request(
        CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        CMD_WRITE_ZEROES,
        8,
        3 * 4096,
        4096,
        &[],
    )
    .await;
    assert_eq!(c.chunk().await.reply_type, REPLY_TYPE_NONE);
    c.request(0, CMD_BLOCK_STATUS, 9, 0, DISK_SIZE as u32, &[])
        .await;
    let (_, d) = descriptors(&c.chunk().await);
    assert_eq!(d, vec![(DISK_SIZE as u32, STATE_HOLE_ZERO)]);
    assert!(dev.mem.snapshot().iter().all(|b| *b == 0));
    assert!(dev.flushes.load(Ordering::SeqCst) >= 1, "FUA trim flushes");

    // A meta context selected for another export does not carry over.
    let mut c2 = Client::connect(&srv).await;
    c2.structured().await;
    let r = c2
        .meta(OPT_SET_META_CONTEXT, "big", &["base:allocation"])
        .await;
    assert_eq!(r.len(), 2);
    c2.go("disk").await;
    c2.request(0, CMD_BLOCK_STATUS, 1, 0, 4096, &[]).await;
    assert_eq!(c2.chunk().await.error().0, EINVAL);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_out_of_order() {
    let srv = TestServer::start(exports()).await;
    let dev = device(&srv, "disk");
    let (mut c, _, _) = Client::open(&srv, "disk", true).await;
    dev.close_gate(65536);
    // Handle 1 waits at the gate; 2 and 3 must overtake it.
    c.request(0, CMD_READ, 1, 65536, 4096, &[]).await;
    c.request(0, CMD_WRITE, 2, 0, 4096, &[7; 4096]).await;
    c.request(0, CMD_READ, 3, 8192, 4096, &[]).await;
    let mut seen = vec![c.chunk().await.handle, c.chunk().await.handle];
    seen.sort();
    assert_eq!(seen, vec![2, 3]);
    c.expect_quiet(Duration::from_millis(100)).await;
    dev.open_gate();
    let ch = c.chunk().await;
    assert_eq!((ch.handle, ch.reply_type), (1, REPLY_TYPE_OFFSET_DATA));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_requests() {
    let srv = TestServer::start(exports()).await;
    let dev = device(&srv, "disk");
    let (c, _, _) = Client::open(&srv, "disk", true).await;
    let Client { mut r, mut w } = c;
    let blocks = 256u64;
    // Write every 4 KiB block with its own pattern, all in flight at once, from another task
    // while this one reads the replies.
    let sender = tokio::spawn(async move {
        let mut m = Vec::new();
        for b in 0..blocks {
            m.extend_from_slice(&request_bytes(0, CMD_WRITE, b, b * 4096, 4096));
            m.extend_from_slice(&pattern(4096, b as u8));
        }
        w.write_all(&m).await.unwrap();
        w
    });
    let mut done = std::collections::HashSet::new();
    for _ in 0..blocks {
        let ch = read_chunk(&mut r).await;
        assert_eq!(ch.reply_type, REPLY_TYPE_NONE);
        assert!(done.insert(ch.handle), "duplicate reply {}", ch.handle);
    }
    assert_eq!(done.len() as u64, blocks);
    let snap = dev.mem.snapshot();
    for b in 0..blocks as usize {
        assert_eq!(&snap[b * 4096..(b + 1) * 4096], &pattern(4096, b as u8)[..]);
    }
    // Then read them all back, pipelined.
    let mut w = sender.await.unwrap();
    let mut m = Vec::new();
    for b in 0..blocks {
        m.extend_from_slice(&request_bytes(0, CMD_READ, 1000 + b, b * 4096, 4096));
    }
    w.write_all(&m).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..blocks {
        let ch = read_chunk(&mut r).await;
        assert_eq!(ch.reply_type, REPLY_TYPE_OFFSET_DATA);
        let b = ch.handle - 1000;
        assert!(seen.insert(b));
        assert_eq!(
            u64::from_be_bytes(ch.payload[..8].try_into().unwrap()),
            b * 4096
        );
        assert_eq!(&ch.payload[8..], &pattern(4096, b as u8)[..]);
    }
    let s = srv.server.stats().snapshot();
    assert_eq!((s.requests.write, s.requests.read), (blocks, blocks));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_waits_for_in_flight_requests() {
    let srv = TestServer::start(exports()).await;
    let dev = device(&srv, "disk");
    let (mut c, _, _) = Client::open(&srv, "disk", false).await;
    dev.close_gate(8192);
    c.request(0, CMD_WRITE, 1, 8192, 4096, &[0x5a; 4096]).await;
    c.request(0, CMD_DISC, 2, 0, 0, &[]).await;
    // The write is held: the connection stays open and the export attached.
    c.expect_quiet(Duration::from_millis(200)).await;
    assert_eq!(srv.exports.attached(), 1);
    dev.open_gate();
    let (err, h, _) = c.simple(0).await;
    assert_eq!((err, h), (0, 1));
    c.expect_closed().await;
    assert!(dev.mem.snapshot()[8192..12288].iter().all(|b| *b == 0x5a));
    assert!(eventually(T, || srv.exports.attached() == 0).await);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes() {
    let srv = TestServer::start(exports()).await;
    let (mut c, _, _) = Client::open(&srv, "disk", false).await;
    assert_eq!(c.read(1, 0, 512).await.0, 0);
    let mut bad = [0u8; 28];
    bad[..4].copy_from_slice(&0x25609514u32.to_be_bytes());
    c.w.write_all(&bad).await.unwrap();
    c.expect_closed().await;
    assert!(eventually(T, || srv.exports.attached() == 0).await);
    assert_eq!(srv.server.stats().snapshot().protocol_errors, 1);
    // The server keeps serving others.
    let (mut c, _, _) = Client::open(&srv, "disk", false).await;
    assert_eq!(c.read(1, 0, 512).await.0, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_eof_mid_request() {
    let srv = TestServer::start(exports()).await;
    let (mut c, _, _) = Client::open(&srv, "disk", false).await;
    // Header of a 4 KiB write, then only part of the payload, then EOF.
    let mut m = request_bytes(0, CMD_WRITE, 1, 0, 4096);
    m.extend_from_slice(&[1; 100]);
    c.w.write_all(&m).await.unwrap();
    c.w.shutdown().await.unwrap();
    c.expect_closed().await;
    assert!(eventually(T, || srv.exports.attached() == 0).await);
    let dev = device(&srv, "disk");
    assert!(dev.mem.snapshot()[..4096].iter().all(|b| *b == 0));
    // A half-closed client still gets the replies to complete requests.
    let (mut c, _, _) = Client::open(&srv, "disk", false).await;
    c.request(0, CMD_WRITE, 9, 0, 512, &[3; 512]).await;
    c.w.shutdown().await.unwrap();
    assert_eq!(c.simple(0).await, (0, 9, vec![]));
    c.expect_closed().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_shutdown_token_closes_after_in_flight() {
    let srv = TestServer::start(exports()).await;
    let dev = device(&srv, "disk");
    let (mut c, _, _) = Client::open(&srv, "disk", true).await;
    let (mut other, _, _) = Client::open(&srv, "big", true).await;
    dev.close_gate(4096);
    c.request(0, CMD_READ, 1, 4096, 4096, &[]).await;
    assert!(eventually(T, || dev.reads_started.load(Ordering::SeqCst) == 1).await);
    srv.exports.kick("disk");
    // The server stops reading: this request is never answered.
    c.request(0, CMD_READ, 2, 0, 4096, &[]).await;
    c.expect_quiet(Duration::from_millis(100)).await;
    dev.open_gate();
    let ch = c.chunk().await;
    assert_eq!((ch.handle, ch.reply_type), (1, REPLY_TYPE_OFFSET_DATA));
    c.expect_closed().await;
    assert!(eventually(T, || srv.exports.attached() == 1).await);
    // Other exports are unaffected.
    assert_eq!(other.sread(1, 0, 512).await, vec![0; 512]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_requests_are_abandoned_after_the_grace_period() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(exports(), config).await;
    let dev = device(&srv, "disk");
    let (mut c, _, _) = Client::open(&srv, "disk", true).await;
    dev.close_gate(0);
    c.request(0, CMD_WRITE, 1, 0, 4096, &[1; 4096]).await;
    assert!(eventually(T, || dev.writes_started.load(Ordering::SeqCst) == 1).await);
    let t0 = std::time::Instant::now();
    srv.exports.kick("disk");
    c.expect_closed().await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The guard is released even though the device never completed the write.
    assert!(eventually(T, || srv.exports.attached() == 0).await);
    assert_eq!(srv.server.stats().snapshot().in_flight_requests, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_closes_connections() {
    let srv = TestServer::start(exports()).await;
    let (mut c1, _, _) = Client::open(&srv, "disk", false).await;
    let mut c2 = Client::connect(&srv).await; // still in the handshake
    assert!(eventually(T, || srv.server.stats().snapshot().connections_active == 2).await);
    let exports = srv.exports.clone();
    let stats = srv.server.stats();
    srv.stop().await;
    c1.expect_closed().await;
    c2.expect_closed().await;
    assert_eq!(exports.attached(), 0);
    assert_eq!(stats.snapshot().connections_active, 0);
}

/// A request whose handler panics (a bug) is still answered (EIO), so the client does not
/// wait forever; then the connection closes and the server keeps serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_answered_and_the_connection_closed() {
    let srv = TestServer::start(exports()).await;
    let dev = device(&srv, "disk");
    let (mut c, _, _) = Client::open(&srv, "disk", false).await;
    dev.panic_at(4096);
    let (err, _) = c.read(1, 4096, 512).await;
    assert_eq!(err, EIO);
    c.expect_closed().await;
    let (mut c2, _, _) = Client::open(&srv, "disk", false).await;
    let (err, _) = c2.read(2, 0, 512).await;
    assert_eq!(err, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_request_limit() {
    let config = ServerConfig {
        max_in_flight_requests: 4,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(exports(), config).await;
    let dev = device(&srv, "disk");
    let (mut c, _, _) = Client::open(&srv, "disk", true).await;
    dev.close_gate(0);
    for h in 0..10 {
        c.request(0, CMD_READ, h, 0, 512, &[]).await;
    }
    assert!(eventually(T, || dev.reads_started.load(Ordering::SeqCst) == 4).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(dev.reads_started.load(Ordering::SeqCst), 4);
    assert_eq!(srv.server.stats().snapshot().in_flight_requests, 4);
    dev.open_gate();
    let mut handles: Vec<u64> = Vec::new();
    for _ in 0..10 {
        handles.push(c.chunk().await.handle);
    }
    handles.sort();
    assert_eq!(handles, (0..10).collect::<Vec<_>>());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_byte_budget() {
    // The budget cannot go below the 32 MiB maximum request; ask for less to get exactly it.
    let config = ServerConfig {
        max_in_flight_bytes: MIB,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(exports(), config).await;
    let dev = device(&srv, "big");
    let (c, _, _) = Client::open(&srv, "big", true).await;
    let Client { r, mut w } = c;
    dev.close_gate(0);
    let chunk = 4 * MIB;
    let n = 12u64;
    let sender = tokio::spawn(async move {
        for h in 0..n {
            let mut m = request_bytes(0, CMD_WRITE, h, 0, chunk as u32);
            m.extend_from_slice(&vec![h as u8; chunk]);
            w.write_all(&m).await.unwrap();
        }
        w
    });
    // 8 x 4 MiB fill the 32 MiB budget; the 9th payload is not read until one completes.
    assert!(eventually(T, || dev.writes_started.load(Ordering::SeqCst) == 8).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(dev.writes_started.load(Ordering::SeqCst), 8);
    let s = srv.server.stats().snapshot();
    assert_eq!(s.in_flight_bytes, 32 * MIB as u64);
    assert!(
        !sender.is_finished(),
        "the client is blocked by back-pressure"
    );
    dev.open_gate();
    let w = sender.await.unwrap();
    let mut c = Client { r, w };
    let mut handles: Vec<u64> = Vec::new();
    for _ in 0..n {
        let ch = c.chunk().await;
        assert_eq!(ch.reply_type, REPLY_TYPE_NONE);
        handles.push(ch.handle);
    }
    handles.sort();
    assert_eq!(handles, (0..n).collect::<Vec<_>>());
    assert!(eventually(T, || srv.server.stats().snapshot().in_flight_bytes == 0).await);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(exports(), config).await;
    let mut c = Client::connect(&srv).await;
    c.expect_closed().await;
    assert!(srv.server.stats().snapshot().handshakes_failed >= 1);
    srv.stop().await;
}

/// Greeting, GO `disk`, a write and a read with simple replies, DISC: over any stream.
async fn smoke<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    let payload = Client::info_payload("disk", &[]);
    let mut m = Vec::new();
    m.extend_from_slice(IHAVEOPT);
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(&payload);
    s.write_all(&m).await.unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut data).await.unwrap();
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_INFO);
    }
    let mut m = request_bytes(0, CMD_WRITE, 1, 512, 512);
    m.extend_from_slice(&[0x33; 512]);
    m.extend_from_slice(&request_bytes(0, CMD_READ, 2, 0, 1024));
    s.write_all(&m).await.unwrap();
    // Replies may come in any order; the read may even overtake the write.
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), SIMPLE_MAGIC);
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        if handle == 2 {
            let mut data = vec![0u8; 1024];
            s.read_exact(&mut data).await.unwrap();
        }
        got.push(handle);
    }
    got.sort();
    assert_eq!(got, [1, 2]);
    s.write_all(&request_bytes(0, CMD_DISC, 3, 0, 0))
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest))
        .await
        .expect("closed after DISC")
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_in_memory_streams() {
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let exports = Arc::new(exports());
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(blockd::nbd::serve_tcp(
        listener,
        exports.clone(),
        shutdown.clone(),
    ));
    smoke(tokio::net::TcpStream::connect(addr).await.unwrap()).await;

    // Any AsyncRead + AsyncWrite works, e.g. an in-memory pipe.
    let nbd = blockd::nbd::NbdServer::new(exports.clone());
    let (client, server_end) = tokio::io::duplex(64 * 1024);
    let conn = tokio::spawn({
        let nbd = nbd.clone();
        let shutdown = shutdown.clone();
        async move { nbd.serve_connection(server_end, shutdown).await }
    });
    smoke(client).await;
    tokio::time::timeout(T, conn).await.unwrap().unwrap();
    assert_eq!(nbd.stats().snapshot().requests.write, 1);

    shutdown.cancel();
    tokio::time::timeout(T, server).await.unwrap().unwrap();
    assert_eq!(
        &exports.device("disk").mem.snapshot()[512..1024],
        &[0x33; 512]
    );
    assert_eq!(exports.attached(), 0);
}
