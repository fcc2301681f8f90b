//! The host <-> guest runtime protocol, spoken over the virtio-serial port named
//! [`PORT_NAME`]. A frame is a 4-byte big-endian length and a JSON message. The host sends
//! [`Request`]s; the guest answers with [`Reply`]s carrying the request's `id`. Long-lived
//! requests (a command, an attachment, a TCP connection) receive any number of events under
//! their id; stdin and TCP data travel the other way as requests naming the session or
//! connection. Byte payloads are base64 strings.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};

/// Name of the virtio-serial port (`/sys/class/virtio-ports/*/name` in the guest).
pub const PORT_NAME: &str = "sprite.agent";
/// Protocol version reported by `ping`.
pub const VERSION: u32 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 8 << 20;
/// Largest payload of one read/write/data message (a file moves in pieces of this size).
pub const MAX_CHUNK: usize = 1 << 20;

/// Serde adapter: `Vec<u8>` as a base64 string.
pub mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

/// What a command runs with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecSpec {
    /// Program and arguments (`args[0]` is looked up in `PATH`).
    pub args: Vec<String>,
    /// Added to (and overriding) the default environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/root`, or `/` when that does not exist).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal (stdout and stderr merged, stdin is the terminal).
    #[serde(default)]
    pub tty: bool,
    /// Terminal size when `tty`.
    #[serde(default)]
    pub rows: Option<u16>,
    #[serde(default)]
    pub cols: Option<u16>,
    /// Keep running when the client goes away; output is kept (the last
    /// [`SCROLLBACK`] bytes) for the next attachment.
    #[serde(default)]
    pub detachable: bool,
}

/// Error code: the path or session does not exist.
pub const ERR_NOT_FOUND: &str = "not_found";
/// Error code: a file operation met a directory.
pub const ERR_IS_DIRECTORY: &str = "is_directory";

/// Output a detachable session keeps for its next attachment.
pub const SCROLLBACK: usize = 256 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Reply `ok` with `{version, uptime_ms}`.
    Ping,
    /// Starts a command. Events: `started {session, pid}`, then `output`, then `exit`.
    Exec(ExecSpec),
    /// Follows a detachable session: `output` (the scrollback first), then `exit`.
    Attach {
        session: String,
    },
    /// Stops following (the session keeps running).
    Detach {
        session: String,
    },
    Stdin {
        session: String,
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    CloseStdin {
        session: String,
    },
    Resize {
        session: String,
        rows: u16,
        cols: u16,
    },
    /// Sends a signal to the session's process group.
    Kill {
        session: String,
        signal: i32,
    },
    /// Reply `ok` with a list of [`SessionInfo`].
    Sessions,
    /// Creates parent directories as needed; `append` adds to the end.
    WriteFile {
        path: String,
        #[serde(with = "b64")]
        data: Vec<u8>,
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        append: bool,
    },
    /// Reply `ok` with `{data (base64), size, eof}`; at most [`MAX_CHUNK`] bytes.
    ReadFile {
        path: String,
        offset: u64,
        len: u64,
    },
    /// Reply `ok` with a list of [`DirEntry`].
    ListDir {
        path: String,
    },
    /// Freezes the root filesystem (FIFREEZE); thawed by `thaw` or after `timeout_ms`.
    Freeze {
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    Thaw,
    /// sync(2).
    Sync,
    /// FITRIM on the root filesystem; reply `ok` with `{trimmed_bytes}`.
    Fstrim,
    /// Reply `ok` with [`ActivityInfo`].
    Activity,
    /// Connects to `127.0.0.1:port` in the guest. Reply `ok`, then `tcp_data` events and
    /// `tcp_closed`; the host sends `tcp_send` / `tcp_close` with `conn` = this request's id.
    TcpOpen {
        port: u16,
    },
    TcpSend {
        conn: u64,
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    TcpClose {
        conn: u64,
    },
    /// One request to the in-sprite management API ([`crate::mgmt`]): `path` is like
    /// `/v1/services/web?duration=0`, `body` its JSON text. Reply `ok` with
    /// `{status, body}`; a streaming answer is `ok` with `{status, stream: true}`, then one
    /// `output` event per NDJSON line, then `exit`.
    Api {
        method: String,
        path: String,
        #[serde(default)]
        body: String,
    },
    /// Where the sprite's URL goes: reply `ok` with `{port}`, the service with an
    /// `http_port` (started first when it does not run), or `null` for the default port.
    HttpTarget,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    #[serde(flatten)]
    pub ev: Event,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Ok {
        #[serde(default)]
        value: serde_json::Value,
    },
    Error {
        message: String,
        /// What kind of failure, where callers act on it: [`ERR_NOT_FOUND`],
        /// [`ERR_IS_DIRECTORY`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
    Started {
        session: String,
        pid: u32,
    },
    Output {
        stream: Stream,
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// `code` when the process exited, `signal` when a signal ended it.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
    TcpData {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    TcpClosed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub id: String,
    pub pid: u32,
    pub args: Vec<String>,
    pub tty: bool,
    pub detachable: bool,
    pub attached: bool,
    pub started_at_ms: u64,
    /// `None` while running.
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ActivityInfo {
    /// Commands and sessions whose process still runs.
    pub running: usize,
    /// Of those, detachable sessions.
    pub running_sessions: usize,
    pub tcp_connections: usize,
    /// Live tasks (Tasks API): the sprite must not pause for idleness while any is.
    #[serde(default)]
    pub tasks: usize,
    /// Time since the last request that was not `activity`/`ping`.
    pub idle_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Serializes a message as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> std::io::Result<()> {
    w.write_all(&encode(msg))?;
    w.flush()
}

/// Reads one frame's body (blocking).
pub fn read_frame_body<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            e.into()
        }
    })?;
    Ok(body)
}

pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let reqs = vec![
            Request {
                id: 7,
                op: Op::Exec(ExecSpec {
                    args: vec!["echo".into(), "hi".into()],
                    tty: true,
                    ..Default::default()
                }),
            },
            Request {
                id: 8,
                op: Op::Stdin {
                    session: "s1".into(),
                    data: vec![0, 1, 255],
                },
            },
            Request {
                id: 9,
                op: Op::Freeze { timeout_ms: None },
            },
        ];
        for r in reqs {
            let f = encode(&r);
            let body = read_frame_body(&mut &f[..]).unwrap();
            let back: Request = decode(&body).unwrap();
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&r).unwrap()
            );
        }
        let rep = Reply {
            id: 3,
            ev: Event::Output {
                stream: Stream::Stderr,
                data: b"x\n".to_vec(),
            },
        };
        let body = read_frame_body(&mut &encode(&rep)[..]).unwrap();
        let back: Reply = decode(&body).unwrap();
        assert_eq!(back.ev, rep.ev);
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut big = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
        big.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame_body(&mut &big[..]),
            Err(FrameError::TooLarge(_))
        ));
        let short = [0u8, 0, 0, 9, b'{'];
        assert!(matches!(
            read_frame_body(&mut &short[..]),
            Err(FrameError::Closed)
        ));
        assert!(decode::<Request>(b"{\"id\":1,\"op\":\"nope\"}").is_err());
        assert!(
            decode::<Request>(b"{\"id\":1,\"op\":\"stdin\",\"session\":\"a\",\"data\":\"!!\"}")
                .is_err()
        );
    }
}
