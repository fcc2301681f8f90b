//! The NBD wire format: constants, and pure encoders and decoders.
//!
//! Nothing here does I/O. Every decoder takes a byte slice (or a fixed-size header array),
//! returns a `Result`, never panics and never allocates more than its input justifies: a
//! length field is only trusted after checking that the bytes it announces are present.
//! These functions are the fuzz targets for untrusted client input.
//!
//! Values and layouts follow `doc/proto.md` of the NBD reference implementation
//! (NetworkBlockDevice/nbd). Every integer is big-endian on the wire.

use vhost_blk::Extent;

// ---------------------------------------------------------------------------------------------
// Magic numbers.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags.

/// Server handshake flag: fixed newstyle negotiation is supported.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may ask us to omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags.

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options (client -> server during the handshake).

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types. Errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// `NBD_REP_INFO` information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Transmission: commands, command flags, reply chunks.

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// Error values (the protocol's, which happen to match Linux errnos).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Metadata contexts.

/// The only metadata context we serve.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Sizes and limits.

pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// The reserved zero bytes after the `NBD_OPT_EXPORT_NAME` reply (without `NO_ZEROES`).
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Advertised minimum block size: offsets and lengths must be multiples of it.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Advertised maximum block size: the largest READ or WRITE payload we accept (32 MiB).
pub const MAX_BLOCK_SIZE: u32 = 32 << 20;

// ---------------------------------------------------------------------------------------------
// Errors.

/// A message from the client that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic: expected {expected:#x}, got {found:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("client flags {0:#x} contain bits we did not offer")]
    UnknownClientFlags(u32),
    #[error("{what}: message is truncated")]
    Truncated { what: &'static str },
    #[error("{what}: {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what}: not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{what}: contains a NUL character")]
    ContainsNul { what: &'static str },
    #[error("{what}: {len} bytes, more than the {max}-byte limit")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// A bounds-checked reader over a byte slice.

struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(ProtoError::Truncated { what: self.what })?;
        self.buf = rest;
        Ok(*head)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        self.array().map(u64::from_be_bytes)
    }

    /// The next `len` bytes; fails (without allocating) if fewer are left.
    fn bytes(&mut self, len: u64) -> Result<&'a [u8], ProtoError> {
        let len = usize::try_from(len).map_err(|_| ProtoError::Truncated { what: self.what })?;
        if len > self.buf.len() {
            return Err(ProtoError::Truncated { what: self.what });
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    /// A length-prefixed (u32) string.
    fn string(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let len = self.u32()?;
        let raw = self.bytes(u64::from(len))?;
        parse_string(raw, what)
    }

    fn finish(self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}

/// Validates a protocol string: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
pub fn parse_string(raw: &[u8], what: &'static str) -> Result<String, ProtoError> {
    if raw.len() > MAX_STRING_LEN {
        return Err(ProtoError::TooLong {
            what,
            len: raw.len(),
            max: MAX_STRING_LEN,
        });
    }
    let s = std::str::from_utf8(raw).map_err(|_| ProtoError::NotUtf8 { what })?;
    if s.contains('\0') {
        return Err(ProtoError::ContainsNul { what });
    }
    Ok(s.to_owned())
}

/// Cuts `msg` to at most [`MAX_STRING_LEN`] bytes on a character boundary, so it can be sent
/// as a protocol string.
pub fn clamp_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING_LEN {
        return msg;
    }
    let mut end = MAX_STRING_LEN;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

// ---------------------------------------------------------------------------------------------
// Handshake.

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// What the client asked for in its 32-bit flags field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decodes the client flags. Bits we did not offer are an error: the spec requires the
/// server to drop the connection.
pub fn parse_client_flags(raw: u32) -> Result<ClientFlags, ProtoError> {
    if raw & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags(raw));
    }
    Ok(ClientFlags {
        fixed_newstyle: raw & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: raw & FLAG_C_NO_ZEROES != 0,
    })
}

/// The fixed part of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    /// Length of the option data that follows.
    pub len: u32,
}

pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let mut c = Cursor::new(buf, "option header");
    let magic = c.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: c.u32()?,
        len: c.u32()?,
    })
}

pub fn encode_option_header(h: &OptionHeader) -> [u8; OPTION_HEADER_LEN] {
    let mut out = [0u8; OPTION_HEADER_LEN];
    out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&h.option.to_be_bytes());
    out[12..].copy_from_slice(&h.len.to_be_bytes());
    out
}

/// `NBD_OPT_EXPORT_NAME` data: the whole payload is the name.
pub fn parse_export_name(payload: &[u8]) -> Result<String, ProtoError> {
    parse_string(payload, "export name")
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Requested `NBD_INFO_*` types, in the client's order (unknown ones included).
    pub info_types: Vec<u16>,
}

pub fn parse_info_request(payload: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut c = Cursor::new(payload, "NBD_OPT_INFO/GO");
    let name = c.string("export name")?;
    let count = c.u16()?;
    let raw = c.bytes(u64::from(count) * 2)?;
    c.finish()?;
    let info_types = raw
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    Ok(InfoRequest { name, info_types })
}

pub fn encode_info_request(req: &InfoRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + req.name.len() + 2 * req.info_types.len());
    out.extend_from_slice(&(req.name.len() as u32).to_be_bytes());
    out.extend_from_slice(req.name.as_bytes());
    out.extend_from_slice(&(req.info_types.len() as u16).to_be_bytes());
    for t in &req.info_types {
        out.extend_from_slice(&t.to_be_bytes());
    }
    out
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export_name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_context_request(payload: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let mut c = Cursor::new(payload, "meta context option");
    let export_name = c.string("export name")?;
    let count = c.u32()?;
    // No `with_capacity(count)`: the count is the client's claim. Each query takes at least
    // 4 bytes, so the loop is bounded by the payload length.
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(c.string("meta context query")?);
    }
    c.finish()?;
    Ok(MetaContextRequest {
        export_name,
        queries,
    })
}

pub fn encode_meta_context_request(req: &MetaContextRequest) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(req.export_name.len() as u32).to_be_bytes());
    out.extend_from_slice(req.export_name.as_bytes());
    out.extend_from_slice(&(req.queries.len() as u32).to_be_bytes());
    for q in &req.queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and (unless the client
/// negotiated `NO_ZEROES`) 124 zero bytes.
pub fn encode_export_name_reply(
    size_bytes: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_ZEROES);
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.resize(10 + EXPORT_NAME_ZEROES, 0);
    }
    out
}

/// An option reply: header plus `payload`. The payload must be shorter than 4 GiB, which
/// every caller guarantees (replies are built from bounded strings).
pub fn encode_option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + payload.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The header of an option reply (for clients and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

pub fn parse_option_reply_header(
    buf: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ProtoError> {
    let mut c = Cursor::new(buf, "option reply header");
    let magic = c.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: c.u32()?,
        reply_type: c.u32()?,
        len: c.u32()?,
    })
}

/// `NBD_REP_SERVER` payload: one export name.
pub fn rep_server_payload(name: &str) -> Vec<u8> {
    let name = clamp_message(name);
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn rep_meta_context_payload(context_id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&context_id.to_be_bytes());
    out.extend_from_slice(clamp_message(name).as_bytes());
    out
}

/// `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
pub fn info_export_payload(size_bytes: u64, transmission_flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    out[10..].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// `NBD_REP_INFO` payload for `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_string_payload(info_type: u16, s: &str) -> Vec<u8> {
    let s = clamp_message(s);
    let mut out = Vec::with_capacity(2 + s.len());
    out.extend_from_slice(&info_type.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

/// `NBD_REP_INFO` payload for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size_payload(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&min.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..].copy_from_slice(&max.to_be_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// Transmission requests.

/// A request type. Unknown values are kept so the server can answer them with `EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Command {
        match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(v) => v,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disc => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::Cache => "CACHE",
            Command::WriteZeroes => "WRITE_ZEROES",
            Command::BlockStatus => "BLOCK_STATUS",
            Command::Unknown(_) => "UNKNOWN",
        }
    }
}

/// A decoded request header. Flags are kept raw: which flags are valid depends on the
/// command and on the negotiation, which the server checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// Decodes a request header. Only a bad magic is an error (the stream is out of sync and
/// the connection must close); everything else is judged by the server.
pub fn parse_request_header(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, ProtoError> {
    let mut c = Cursor::new(buf, "request header");
    let magic = c.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: u64::from(REQUEST_MAGIC),
            found: u64::from(magic),
        });
    }
    let flags = c.u16()?;
    let command = Command::from_u16(c.u16()?);
    Ok(Request {
        flags,
        command,
        handle: c.u64()?,
        offset: c.u64()?,
        len: c.u32()?,
    })
}

pub fn encode_request_header(r: &Request) -> [u8; REQUEST_HEADER_LEN] {
    let mut out = [0u8; REQUEST_HEADER_LEN];
    out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.command.to_u16().to_be_bytes());
    out[8..16].copy_from_slice(&r.handle.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..].copy_from_slice(&r.len.to_be_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// Transmission replies.

/// A simple reply header (the read payload, if any, follows).
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
    out
}

/// A decoded simple reply header (for clients and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
}

pub fn parse_simple_reply(buf: &[u8; SIMPLE_REPLY_HEADER_LEN]) -> Result<SimpleReply, ProtoError> {
    let mut c = Cursor::new(buf, "simple reply");
    let magic = c.u32()?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: u64::from(SIMPLE_REPLY_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(SimpleReply {
        error: c.u32()?,
        handle: c.u64()?,
    })
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub reply_type: u16,
    pub handle: u64,
    /// Length of the chunk payload that follows.
    pub len: u32,
}

pub fn encode_chunk_header(h: &ChunkHeader) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
    let mut out = [0u8; STRUCTURED_REPLY_HEADER_LEN];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&h.flags.to_be_bytes());
    out[6..8].copy_from_slice(&h.reply_type.to_be_bytes());
    out[8..16].copy_from_slice(&h.handle.to_be_bytes());
    out[16..].copy_from_slice(&h.len.to_be_bytes());
    out
}

pub fn parse_chunk_header(
    buf: &[u8; STRUCTURED_REPLY_HEADER_LEN],
) -> Result<ChunkHeader, ProtoError> {
    let mut c = Cursor::new(buf, "structured reply chunk");
    let magic = c.u32()?;
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: u64::from(STRUCTURED_REPLY_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(ChunkHeader {
        flags: c.u16()?,
        reply_type: c.u16()?,
        handle: c.u64()?,
        len: c.u32()?,
    })
}

/// A complete `NBD_REPLY_TYPE_NONE` chunk with `DONE`: success without payload.
pub fn encode_none_chunk(handle: u64) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
    encode_chunk_header(&ChunkHeader {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_NONE,
        handle,
        len: 0,
    })
}

/// The header and offset of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `data_len` bytes of
/// data must follow. `None` if the chunk would not fit the 32-bit length field.
pub fn encode_offset_data_head(handle: u64, offset: u64, data_len: usize) -> Option<[u8; 28]> {
    let len = u32::try_from(data_len.checked_add(8)?).ok()?;
    let mut out = [0u8; 28];
    out[..20].copy_from_slice(&encode_chunk_header(&ChunkHeader {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_OFFSET_DATA,
        handle,
        len,
    }));
    out[20..].copy_from_slice(&offset.to_be_bytes());
    Some(out)
}

/// A complete final `NBD_REPLY_TYPE_ERROR` chunk. `error` must be nonzero; the message is
/// clamped to the protocol's string limit.
pub fn encode_error_chunk(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let message = clamp_message(message);
    let payload_len = 6 + message.len();
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + payload_len);
    out.extend_from_slice(&encode_chunk_header(&ChunkHeader {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_ERROR,
        handle,
        len: payload_len as u32,
    }));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// A decoded error chunk payload (for clients and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    pub error: u32,
    pub message: String,
}

pub fn parse_error_chunk_payload(payload: &[u8]) -> Result<ErrorChunk, ProtoError> {
    let mut c = Cursor::new(payload, "error chunk");
    let error = c.u32()?;
    let len = c.u16()?;
    let message = parse_string(c.bytes(u64::from(len))?, "error message")?;
    c.finish()?;
    Ok(ErrorChunk { error, message })
}

/// One `base:allocation` block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub len: u32,
    pub flags: u32,
}

/// A complete final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk. `descriptors` must be non-empty
/// and short enough for the 32-bit length field (callers cap it).
pub fn encode_block_status_chunk(
    handle: u64,
    context_id: u32,
    descriptors: &[BlockDescriptor],
) -> Vec<u8> {
    let payload_len = 4 + 8 * descriptors.len();
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + payload_len);
    out.extend_from_slice(&encode_chunk_header(&ChunkHeader {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_BLOCK_STATUS,
        handle,
        len: u32::try_from(payload_len).unwrap_or(u32::MAX),
    }));
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.len.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
    out
}

/// Decodes a block status chunk payload into its context id and descriptors.
pub fn parse_block_status_payload(
    payload: &[u8],
) -> Result<(u32, Vec<BlockDescriptor>), ProtoError> {
    let mut c = Cursor::new(payload, "block status chunk");
    let id = c.u32()?;
    if c.buf.is_empty() || !c.buf.len().is_multiple_of(8) {
        return Err(ProtoError::Truncated {
            what: "block status chunk",
        });
    }
    let mut out = Vec::with_capacity(c.buf.len() / 8);
    while !c.buf.is_empty() {
        out.push(BlockDescriptor {
            len: c.u32()?,
            flags: c.u32()?,
        });
    }
    Ok((id, out))
}

/// Turns a device's allocation answer for `[offset, offset + len)` into `base:allocation`
/// descriptors.
///
/// The result covers a non-empty prefix of `len` (never more), uses [`MIN_BLOCK_SIZE`]
/// multiples for every boundary except `len` itself, merges neighbours with equal status,
/// and has at most `max_descriptors` entries (exactly one with `req_one`). A block only
/// partly described as a hole is reported as allocated (status 0 is always safe). If the
/// device described nothing, the whole range is reported allocated.
pub fn block_status_descriptors(
    extents: &[Extent],
    len: u32,
    req_one: bool,
    max_descriptors: usize,
) -> Vec<BlockDescriptor> {
    let total = u64::from(len);
    let align = u64::from(MIN_BLOCK_SIZE);
    let mut out: Vec<BlockDescriptor> = Vec::new();
    if total == 0 {
        return out;
    }
    let limit = if req_one { 1 } else { max_descriptors.max(1) };
    let push = |out: &mut Vec<BlockDescriptor>, n: u64, flags: u32| {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if n == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len = last.len.saturating_add(n),
            _ => out.push(BlockDescriptor { len: n, flags }),
        }
    };
    // Boundaries are aligned down to the block size, except the end of the request.
    let block_end = |pos: u64| {
        ((pos / align).saturating_add(1))
            .saturating_mul(align)
            .min(total)
    };
    let align_down = |pos: u64| {
        if pos == total {
            total
        } else {
            pos / align * align
        }
    };

    let mut pos = 0u64;
    // Status of the partly described block that contains `pos`, if `pos` is unaligned.
    let mut partial: Option<u32> = None;
    for e in extents {
        // Stop early once enough descriptors exist: the last one may still grow by merging,
        // so allow one extra and truncate at the end.
        if pos >= total || out.len() > limit {
            break;
        }
        let end = pos.saturating_add(e.len_bytes).min(total);
        if end == pos {
            continue;
        }
        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        let mut cur = pos;
        if !cur.is_multiple_of(align) {
            let acc = partial.unwrap_or(flags) & flags;
            let b_end = block_end(cur);
            cur = end.min(b_end);
            if cur == b_end {
                push(&mut out, b_end - pos / align * align, acc);
                partial = None;
            } else {
                partial = Some(acc);
            }
        }
        if cur < end {
            let full_end = align_down(end);
            if full_end > cur {
                push(&mut out, full_end - cur, flags);
                cur = full_end;
            }
            if cur < end {
                partial = Some(flags);
            }
        }
        pos = end;
    }
    if partial.is_some() && pos < total {
        // The rest of that block was not described: report it as allocated.
        let start = pos / align * align;
        push(&mut out, block_end(pos) - start, 0);
    }
    if out.is_empty() {
        out.push(BlockDescriptor { len, flags: 0 });
    }
    out.truncate(limit);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_layout() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(3),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            parse_client_flags(0),
            Ok(ClientFlags {
                fixed_newstyle: false,
                no_zeroes: false
            })
        );
        assert_eq!(
            parse_client_flags(4),
            Err(ProtoError::UnknownClientFlags(4))
        );
        assert!(parse_client_flags(0x8000_0001).is_err());
    }

    #[test]
    fn option_header_roundtrip_and_bad_magic() {
        let h = OptionHeader {
            option: OPT_GO,
            len: 77,
        };
        assert_eq!(parse_option_header(&encode_option_header(&h)), Ok(h));
        let mut raw = encode_option_header(&h);
        raw[0] ^= 1;
        assert!(matches!(
            parse_option_header(&raw),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn info_request_roundtrip() {
        let r = InfoRequest {
            name: "vol-1".into(),
            info_types: vec![INFO_BLOCK_SIZE, INFO_NAME, 999],
        };
        assert_eq!(parse_info_request(&encode_info_request(&r)), Ok(r));
        let empty = InfoRequest {
            name: String::new(),
            info_types: vec![],
        };
        assert_eq!(parse_info_request(&encode_info_request(&empty)), Ok(empty));
    }

    #[test]
    fn info_request_malformed() {
        // Name length beyond the payload.
        let mut p = encode_info_request(&InfoRequest {
            name: "abc".into(),
            info_types: vec![],
        });
        p[3] = 200;
        assert!(matches!(
            parse_info_request(&p),
            Err(ProtoError::Truncated { .. })
        ));
        // Huge name length must not allocate or panic.
        let p = [0xff, 0xff, 0xff, 0xff, 0, 0];
        assert!(parse_info_request(&p).is_err());
        // Info count beyond the payload.
        let p = [0, 0, 0, 0, 0, 2, 0, 3];
        assert!(matches!(
            parse_info_request(&p),
            Err(ProtoError::Truncated { .. })
        ));
        // Trailing bytes.
        let p = [0, 0, 0, 0, 0, 0, 9];
        assert!(matches!(
            parse_info_request(&p),
            Err(ProtoError::TrailingBytes { extra: 1, .. })
        ));
        // Too short for the fixed fields.
        assert!(parse_info_request(&[0, 0, 0]).is_err());
        // Invalid UTF-8 and NUL in the name.
        let p = [0, 0, 0, 1, 0xff, 0, 0];
        assert!(matches!(
            parse_info_request(&p),
            Err(ProtoError::NotUtf8 { .. })
        ));
        let p = [0, 0, 0, 1, 0, 0, 0];
        assert!(matches!(
            parse_info_request(&p),
            Err(ProtoError::ContainsNul { .. })
        ));
    }

    #[test]
    fn export_name_limits() {
        assert_eq!(parse_export_name(b"disk"), Ok("disk".to_string()));
        assert_eq!(parse_export_name(b""), Ok(String::new()));
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        assert!(matches!(
            parse_export_name(&long),
            Err(ProtoError::TooLong { .. })
        ));
        assert!(parse_export_name(&vec![b'a'; MAX_STRING_LEN]).is_ok());
    }

    #[test]
    fn meta_context_roundtrip_and_malformed() {
        let r = MetaContextRequest {
            export_name: "v".into(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
        };
        let enc = encode_meta_context_request(&r);
        assert_eq!(parse_meta_context_request(&enc), Ok(r));
        // A query count far larger than the payload: error, not a giant allocation.
        let p = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            parse_meta_context_request(&p),
            Err(ProtoError::Truncated { .. })
        ));
        // Query length beyond the payload.
        let p = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'b'];
        assert!(parse_meta_context_request(&p).is_err());
        // Trailing garbage.
        let mut enc2 = encode_meta_context_request(&MetaContextRequest {
            export_name: String::new(),
            queries: vec![],
        });
        enc2.push(1);
        assert!(matches!(
            parse_meta_context_request(&enc2),
            Err(ProtoError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn request_header_roundtrip_and_unknown_command() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            handle: 0xdead_beef_0000_0001,
            offset: 4096,
            len: 512,
        };
        let raw = encode_request_header(&r);
        assert_eq!(&raw[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(parse_request_header(&raw), Ok(r));
        let unk = Request {
            command: Command::Unknown(42),
            ..r
        };
        assert_eq!(parse_request_header(&encode_request_header(&unk)), Ok(unk));
        let mut bad = raw;
        bad[3] = 0;
        assert!(matches!(
            parse_request_header(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn command_codes_match_spec() {
        for (cmd, v) in [
            (Command::Read, 0),
            (Command::Write, 1),
            (Command::Disc, 2),
            (Command::Flush, 3),
            (Command::Trim, 4),
            (Command::Cache, 5),
            (Command::WriteZeroes, 6),
            (Command::BlockStatus, 7),
        ] {
            assert_eq!(cmd.to_u16(), v);
            assert_eq!(Command::from_u16(v), cmd);
        }
    }

    #[test]
    fn replies_layout() {
        let s = encode_simple_reply(EINVAL, 7);
        assert_eq!(
            parse_simple_reply(&s),
            Ok(SimpleReply {
                error: 22,
                handle: 7
            })
        );
        let n = encode_none_chunk(9);
        assert_eq!(
            parse_chunk_header(&n),
            Ok(ChunkHeader {
                flags: REPLY_FLAG_DONE,
                reply_type: REPLY_TYPE_NONE,
                handle: 9,
                len: 0
            })
        );
        let e = encode_error_chunk(3, EIO, "disk on fire");
        let mut hdr = [0u8; STRUCTURED_REPLY_HEADER_LEN];
        hdr.copy_from_slice(&e[..STRUCTURED_REPLY_HEADER_LEN]);
        let h = parse_chunk_header(&hdr).unwrap();
        assert_eq!(h.reply_type, 0x8001);
        assert_eq!(h.len as usize, e.len() - STRUCTURED_REPLY_HEADER_LEN);
        assert_eq!(
            parse_error_chunk_payload(&e[STRUCTURED_REPLY_HEADER_LEN..]),
            Ok(ErrorChunk {
                error: EIO,
                message: "disk on fire".into()
            })
        );
        let d = encode_offset_data_head(1, 4096, 512).unwrap();
        hdr.copy_from_slice(&d[..20]);
        let h = parse_chunk_header(&hdr).unwrap();
        assert_eq!((h.reply_type, h.len, h.flags), (1, 520, REPLY_FLAG_DONE));
        assert_eq!(&d[20..], &4096u64.to_be_bytes());
        assert!(encode_offset_data_head(1, 0, u32::MAX as usize).is_none());
    }

    #[test]
    fn long_error_messages_are_clamped() {
        let msg = "é".repeat(5000);
        let e = encode_error_chunk(1, EIO, &msg);
        let p = parse_error_chunk_payload(&e[STRUCTURED_REPLY_HEADER_LEN..]).unwrap();
        assert!(p.message.len() <= MAX_STRING_LEN);
        assert!(p.message.len() >= MAX_STRING_LEN - 1);
    }

    #[test]
    fn option_reply_roundtrip() {
        let r = encode_option_reply(OPT_LIST, REP_SERVER, &rep_server_payload("a"));
        let mut hdr = [0u8; OPTION_REPLY_HEADER_LEN];
        hdr.copy_from_slice(&r[..OPTION_REPLY_HEADER_LEN]);
        assert_eq!(
            parse_option_reply_header(&hdr),
            Ok(OptionReplyHeader {
                option: OPT_LIST,
                reply_type: REP_SERVER,
                len: 5
            })
        );
        assert_eq!(&r[OPTION_REPLY_HEADER_LEN..], &[0, 0, 0, 1, b'a']);
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_TOO_BIG, 0x8000_0009);
    }

    #[test]
    fn export_name_reply_zeroes() {
        assert_eq!(encode_export_name_reply(1 << 20, 3, true).len(), 10);
        let r = encode_export_name_reply(1 << 20, 3, false);
        assert_eq!(r.len(), 134);
        assert!(r[10..].iter().all(|b| *b == 0));
    }

    fn ext(len_bytes: u64, hole: bool) -> Extent {
        Extent { len_bytes, hole }
    }

    fn d(len: u32, flags: u32) -> BlockDescriptor {
        BlockDescriptor { len, flags }
    }

    const HZ: u32 = STATE_HOLE | STATE_ZERO;

    #[test]
    fn descriptors_merge_and_clip() {
        let e = [
            ext(4096, false),
            ext(4096, false),
            ext(8192, true),
            ext(1 << 30, false),
        ];
        assert_eq!(
            block_status_descriptors(&e, 20480, false, 100),
            vec![d(8192, 0), d(8192, HZ), d(4096, 0)]
        );
        assert_eq!(
            block_status_descriptors(&e, 20480, true, 100),
            vec![d(8192, 0)]
        );
        assert_eq!(
            block_status_descriptors(&e, 20480, false, 2),
            vec![d(8192, 0), d(8192, HZ)]
        );
    }

    #[test]
    fn descriptors_fallback_and_prefix() {
        assert_eq!(
            block_status_descriptors(&[], 4096, false, 10),
            vec![d(4096, 0)]
        );
        assert_eq!(
            block_status_descriptors(&[ext(0, true)], 4096, false, 10),
            vec![d(4096, 0)]
        );
        // A prefix answer stays a prefix.
        assert_eq!(
            block_status_descriptors(&[ext(1024, true)], 4096, false, 10),
            vec![d(1024, HZ)]
        );
    }

    #[test]
    fn descriptors_unaligned_extents_are_conservative() {
        // 256 bytes of hole, then data: the first block is partly data -> allocated.
        let e = [ext(256, true), ext(256, false), ext(1024, true)];
        assert_eq!(
            block_status_descriptors(&e, 1536, false, 10),
            vec![d(512, 0), d(1024, HZ)]
        );
        // Hole extents that together cover whole blocks stay holes.
        let e = [ext(256, true), ext(768, true), ext(512, false)];
        assert_eq!(
            block_status_descriptors(&e, 1536, false, 10),
            vec![d(1024, HZ), d(512, 0)]
        );
        // Device stops mid-block: that block is reported allocated.
        let e = [ext(768, true)];
        assert_eq!(
            block_status_descriptors(&e, 4096, false, 10),
            vec![d(512, HZ), d(512, 0)]
        );
    }

    fn arb_extents() -> impl Strategy<Value = Vec<Extent>> {
        proptest::collection::vec(
            (0u64..20_000, any::<bool>()).prop_map(|(l, h)| ext(l, h)),
            0..20,
        )
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_context_request(&data);
            let _ = parse_export_name(&data);
            let _ = parse_error_chunk_payload(&data);
            let _ = parse_block_status_payload(&data);
            let mut h28 = [0u8; REQUEST_HEADER_LEN];
            let n = data.len().min(28);
            h28[..n].copy_from_slice(&data[..n]);
            let _ = parse_request_header(&h28);
            let mut h16 = [0u8; 16];
            let n = data.len().min(16);
            h16[..n].copy_from_slice(&data[..n]);
            let _ = parse_option_header(&h16);
            let _ = parse_simple_reply(&h16);
            let mut h20 = [0u8; 20];
            let n = data.len().min(20);
            h20[..n].copy_from_slice(&data[..n]);
            let _ = parse_chunk_header(&h20);
            let _ = parse_option_reply_header(&h20);
        }

        #[test]
        fn request_header_roundtrips(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
            let r = Request { flags, command: Command::from_u16(cmd), handle, offset, len };
            prop_assert_eq!(parse_request_header(&encode_request_header(&r)), Ok(r));
        }

        #[test]
        fn meta_context_roundtrips(name in "[a-z0-9:-]{0,40}",
                                   queries in proptest::collection::vec("[a-z:]{0,30}", 0..8)) {
            let r = MetaContextRequest { export_name: name, queries };
            prop_assert_eq!(parse_meta_context_request(&encode_meta_context_request(&r)), Ok(r));
        }

        #[test]
        fn descriptors_are_well_formed(extents in arb_extents(), blocks in 1u32..64,
                                       req_one: bool, max in 1usize..8) {
            let len = blocks * MIN_BLOCK_SIZE;
            let out = block_status_descriptors(&extents, len, req_one, max);
            prop_assert!(!out.is_empty());
            let cap = if req_one { 1 } else { max };
            prop_assert!(out.len() <= cap);
            let sum: u64 = out.iter().map(|x| u64::from(x.len)).sum();
            prop_assert!(sum <= u64::from(len));
            for (i, x) in out.iter().enumerate() {
                prop_assert!(x.len > 0);
                prop_assert!(x.len % MIN_BLOCK_SIZE == 0);
                if i > 0 { prop_assert_ne!(out[i - 1].flags, x.flags); }
            }
            // Never claims a hole where the device reported data.
            let mut pos = 0u64;
            for x in &out {
                if x.flags & STATE_HOLE != 0 {
                    let (s, e) = (pos, pos + u64::from(x.len));
                    let mut p = 0u64;
                    for ex in &extents {
                        let (es, ee) = (p, p + ex.len_bytes);
                        if !ex.hole && es < e && ee > s {
                            prop_assert!(false, "hole {s}..{e} overlaps data {es}..{ee}");
                        }
                        p = ee;
                    }
                    prop_assert!(p >= e, "hole {s}..{e} beyond described range {p}");
                }
                pos += u64::from(x.len);
            }
        }
    }
}
