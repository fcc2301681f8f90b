//! The whole NBD server (handshake, option haggling, transmission) on one connection whose
//! client bytes are the fuzz input, served from an in-memory export. The server must never
//! panic, hang or allocate without bound, whatever the client sends. The first input byte
//! sets how many bytes each read of the socket returns (partial reads everywhere).

#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use blockd::nbd::{AttachError, Attachment, Exports, NbdServer};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use vhost_blk::MemDevice;

struct FuzzExports {
    rw: Arc<MemDevice>,
    ro: Arc<MemDevice>,
}

impl Exports for FuzzExports {
    type Device = MemDevice;

    async fn attach(&self, name: &str) -> Result<Attachment<MemDevice>, AttachError> {
        match name {
            "fz" => Ok(Attachment::new(self.rw.clone())),
            "ro" => Ok(Attachment::new(self.ro.clone())),
            "busy" => Err(AttachError::Busy("attached elsewhere".into())),
            other => Err(AttachError::Unknown(other.into())),
        }
    }

    fn list(&self) -> Vec<String> {
        vec!["fz".into(), "ro".into(), "busy".into()]
    }
}

/// The client side: yields the input in pieces of at most `step` bytes, then EOF; swallows
/// whatever the server writes.
struct Client {
    input: Vec<u8>,
    pos: usize,
    step: usize,
}

impl AsyncRead for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let pos = self.pos;
        let n = (self.input.len() - pos).min(buf.remaining()).min(self.step);
        buf.put_slice(&self.input[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn server() -> &'static NbdServer<FuzzExports> {
    static S: OnceLock<NbdServer<FuzzExports>> = OnceLock::new();
    S.get_or_init(|| {
        NbdServer::new(Arc::new(FuzzExports {
            rw: Arc::new(MemDevice::new("fz", 1 << 20)),
            ro: Arc::new(MemDevice::new("ro", 64 << 10).read_only()),
        }))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let client = Client {
        input: input.to_vec(),
        pos: 0,
        step: usize::from(step).max(1) * 7,
    };
    runtime().block_on(server().serve_connection(client, CancellationToken::new()));
});
