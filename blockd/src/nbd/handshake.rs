//! The handshake phase: fixed newstyle negotiation up to `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use vhost_blk::BlockDevice;

use super::export::{AttachError, Attachment, Exports};
use super::proto::{
    self, CONTEXT_BASE_ALLOCATION, FLAG_CAN_MULTI_CONN, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS,
    FLAG_NO_ZEROES, FLAG_READ_ONLY, FLAG_SEND_DF, FLAG_SEND_FAST_ZERO, FLAG_SEND_FLUSH,
    FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, INFO_DESCRIPTION, INFO_NAME,
    MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
    OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
    OPTION_HEADER_LEN, OptionHeader, PREFERRED_BLOCK_SIZE, ProtoError, REP_ACK, REP_ERR_INVALID,
    REP_ERR_POLICY, REP_ERR_SHUTDOWN, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO,
    REP_META_CONTEXT, REP_SERVER,
};

/// Largest option payload we accept. Anything valid is far smaller (strings are limited to
/// 4 KiB); a larger option is answered with `NBD_REP_ERR_TOO_BIG` and the connection closed.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// The metadata context id we assign to `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake agreed on.
pub(crate) struct Negotiated<D> {
    pub export_name: String,
    pub attachment: Attachment<D>,
    pub structured_replies: bool,
    /// Context id of `base:allocation` if the client selected it for this export.
    pub base_allocation: Option<u32>,
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

pub(crate) enum Outcome<D> {
    Transmission(Negotiated<D>),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtoError),
    #[error("option {option} carries {len} bytes, more than the {MAX_OPTION_LEN}-byte limit")]
    OptionTooLarge { option: u32, len: u32 },
    #[error("NBD_OPT_EXPORT_NAME {name:?} refused: {reason}")]
    ExportRefused { name: String, reason: AttachError },
    #[error("server is shutting down")]
    ShuttingDown,
}

/// The transmission flags we advertise for `device`.
///
/// Read-only exports advertise neither writes-related commands nor FUA. `CAN_MULTI_CONN` is
/// always set: every connection to an export shares one device, so a flush on any of them
/// covers writes completed on all of them. `SEND_FAST_ZERO` is set because our
/// write-zeroes never writes data blocks.
pub(crate) fn transmission_flags<D: BlockDevice>(device: &D, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
    if device.read_only() {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// Negotiation state carried between options.
struct State {
    structured: bool,
    /// Export for which `base:allocation` was selected by the last `NBD_OPT_SET_META_CONTEXT`.
    meta_export: Option<String>,
}

impl State {
    fn finish<D: BlockDevice>(
        self,
        export_name: String,
        attachment: Attachment<D>,
    ) -> Negotiated<D> {
        let base_allocation = match &self.meta_export {
            Some(n) if *n == export_name => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        Negotiated {
            size_bytes: attachment.device.size_bytes(),
            transmission_flags: transmission_flags(&*attachment.device, self.structured),
            export_name,
            attachment,
            structured_replies: self.structured,
            base_allocation,
        }
    }
}

async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply_type: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    s.write_all(&proto::encode_option_reply(option, reply_type, payload))
        .await
}

async fn reply_error<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply_type: u32,
    message: &str,
) -> std::io::Result<()> {
    debug!(option, reply_type, message, "option refused");
    reply(
        s,
        option,
        reply_type,
        proto::clamp_message(message).as_bytes(),
    )
    .await
}

fn attach_error_reply(e: &AttachError) -> u32 {
    match e {
        AttachError::Unknown(_) | AttachError::Unavailable(_) => REP_ERR_UNKNOWN,
        AttachError::Busy(_) => REP_ERR_POLICY,
        AttachError::ShuttingDown => REP_ERR_SHUTDOWN,
    }
}

async fn attach<E: Exports>(exports: &E, name: &str) -> Result<Attachment<E::Device>, AttachError> {
    if name.is_empty() {
        // There is no default export: a client must name a volume.
        return Err(AttachError::Unknown(String::new()));
    }
    exports.attach(name).await
}

/// Which contexts `queries` select (`list`: for `NBD_OPT_LIST_META_CONTEXT`). We know one
/// context, `base:allocation`. Unknown namespaces and leaves are ignored as the spec
/// requires; a query without a namespace is invalid.
fn select_contexts(queries: &[String], list: bool) -> Result<Vec<&'static str>, String> {
    if queries.is_empty() {
        // LIST with no query: everything; SET with no query: nothing.
        return Ok(if list {
            vec![CONTEXT_BASE_ALLOCATION]
        } else {
            Vec::new()
        });
    }
    let mut base_allocation = false;
    for q in queries {
        let Some((namespace, leaf)) = q.split_once(':') else {
            return Err(format!("meta context query {q:?} has no namespace"));
        };
        if namespace.is_empty() {
            return Err(format!("meta context query {q:?} has an empty namespace"));
        }
        if namespace != "base" {
            continue;
        }
        // `base:` is a wildcard for LIST and selects nothing for SET.
        if leaf == "allocation" || (list && leaf.is_empty()) {
            base_allocation = true;
        }
    }
    Ok(if base_allocation {
        vec![CONTEXT_BASE_ALLOCATION]
    } else {
        Vec::new()
    })
}

/// Runs the handshake on `stream` until the client enters transmission or aborts.
pub(crate) async fn negotiate<E, S>(
    stream: &mut S,
    exports: &E,
    shutdown: &CancellationToken,
) -> Result<Outcome<E::Device>, HandshakeError>
where
    E: Exports,
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(&proto::encode_greeting(
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        ))
        .await?;
    stream.flush().await?;
    let mut raw = [0u8; 4];
    stream.read_exact(&mut raw).await?;
    let client = proto::parse_client_flags(u32::from_be_bytes(raw))?;
    debug!(?client, "client flags");

    let mut st = State {
        structured: false,
        meta_export: None,
    };
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(HandshakeError::ShuttingDown),
            r = stream.read_exact(&mut hdr) => { r?; }
        }
        let OptionHeader { option, len } = proto::parse_option_header(&hdr)?;
        if len > MAX_OPTION_LEN {
            // The payload is not read: we close right after this reply.
            if option != OPT_EXPORT_NAME {
                reply_error(
                    stream,
                    option,
                    REP_ERR_TOO_BIG,
                    &format!("option data of {len} bytes exceeds the {MAX_OPTION_LEN}-byte limit"),
                )
                .await?;
                stream.flush().await?;
            }
            return Err(HandshakeError::OptionTooLarge { option, len });
        }
        // Bounded by MAX_OPTION_LEN above.
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).await?;
        debug!(option, len, "option");

        if shutdown.is_cancelled() {
            match option {
                OPT_ABORT => {
                    // The client may already be gone; nothing to do about a failed reply.
                    let _ = reply(stream, option, REP_ACK, &[]).await;
                    let _ = stream.flush().await;
                    return Ok(Outcome::Aborted);
                }
                OPT_EXPORT_NAME => {}
                _ => {
                    reply_error(stream, option, REP_ERR_SHUTDOWN, "server is shutting down")
                        .await?;
                    stream.flush().await?;
                }
            }
            return Err(HandshakeError::ShuttingDown);
        }

        match option {
            OPT_EXPORT_NAME => {
                // No error reply exists for this option: any failure closes the connection.
                let name = proto::parse_export_name(&payload)?;
                let attachment = match attach(exports, &name).await {
                    Ok(a) => a,
                    Err(reason) => return Err(HandshakeError::ExportRefused { name, reason }),
                };
                let n = st.finish(name, attachment);
                stream
                    .write_all(&proto::encode_export_name_reply(
                        n.size_bytes,
                        n.transmission_flags,
                        client.no_zeroes,
                    ))
                    .await?;
                stream.flush().await?;
                return Ok(Outcome::Transmission(n));
            }
            OPT_ABORT => {
                // Data is ignored, as the spec asks. The client may close without reading.
                let _ = reply(stream, option, REP_ACK, &[]).await;
                let _ = stream.flush().await;
                return Ok(Outcome::Aborted);
            }
            OPT_LIST => {
                if !payload.is_empty() {
                    reply_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    )
                    .await?;
                } else {
                    for name in exports.list() {
                        if proto::parse_string(name.as_bytes(), "export name").is_ok() {
                            reply(
                                stream,
                                option,
                                REP_SERVER,
                                &proto::rep_server_payload(&name),
                            )
                            .await?;
                        }
                    }
                    reply(stream, option, REP_ACK, &[]).await?;
                }
            }
            OPT_STARTTLS => {
                if !payload.is_empty() {
                    reply_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STARTTLS takes no data",
                    )
                    .await?;
                } else {
                    reply_error(
                        stream,
                        option,
                        REP_ERR_POLICY,
                        "TLS is not offered by this server",
                    )
                    .await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let req = match proto::parse_info_request(&payload) {
                    Ok(r) => r,
                    Err(e) => {
                        reply_error(stream, option, REP_ERR_INVALID, &e.to_string()).await?;
                        stream.flush().await?;
                        continue;
                    }
                };
                let attachment = match attach(exports, &req.name).await {
                    Ok(a) => a,
                    Err(e) => {
                        let msg = if req.name.is_empty() {
                            "no default export: name a volume".to_string()
                        } else {
                            e.to_string()
                        };
                        reply_error(stream, option, attach_error_reply(&e), &msg).await?;
                        stream.flush().await?;
                        continue;
                    }
                };
                let device = &attachment.device;
                let flags = transmission_flags(&**device, st.structured);
                reply(
                    stream,
                    option,
                    REP_INFO,
                    &proto::info_export_payload(device.size_bytes(), flags),
                )
                .await?;
                if req.info_types.contains(&INFO_NAME) {
                    reply(
                        stream,
                        option,
                        REP_INFO,
                        &proto::info_string_payload(INFO_NAME, &req.name),
                    )
                    .await?;
                }
                if req.info_types.contains(&INFO_DESCRIPTION) {
                    reply(
                        stream,
                        option,
                        REP_INFO,
                        &proto::info_string_payload(INFO_DESCRIPTION, &device.id()),
                    )
                    .await?;
                }
                // Always sent: our minimum (512) is stricter than the protocol default (1).
                reply(
                    stream,
                    option,
                    REP_INFO,
                    &proto::info_block_size_payload(
                        MIN_BLOCK_SIZE,
                        PREFERRED_BLOCK_SIZE,
                        MAX_BLOCK_SIZE,
                    ),
                )
                .await?;
                reply(stream, option, REP_ACK, &[]).await?;
                stream.flush().await?;
                if option == OPT_GO {
                    return Ok(Outcome::Transmission(st.finish(req.name, attachment)));
                }
                // NBD_OPT_INFO: the attachment is released here.
            }
            OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    reply_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    st.structured = true;
                    reply(stream, option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // SET replaces the selection even when it fails.
                    st.meta_export = None;
                }
                match meta_context(stream, exports, st.structured, option, set, &payload).await? {
                    Ok(selected_for) => {
                        if set {
                            st.meta_export = selected_for;
                        }
                    }
                    Err((reply_type, msg)) => {
                        reply_error(stream, option, reply_type, &msg).await?;
                    }
                }
            }
            _ => {
                reply_error(
                    stream,
                    option,
                    REP_ERR_UNSUP,
                    &format!("option {option} is not supported"),
                )
                .await?;
            }
        }
        stream.flush().await?;
    }
}

/// Answers a LIST/SET_META_CONTEXT option with its contexts and `NBD_REP_ACK`, returning
/// the export name if at least one context was sent; or returns the error reply to send
/// instead.
async fn meta_context<E: Exports, S: AsyncWrite + Unpin>(
    stream: &mut S,
    exports: &E,
    structured: bool,
    option: u32,
    set: bool,
    payload: &[u8],
) -> std::io::Result<Result<Option<String>, (u32, String)>> {
    if !structured {
        return Ok(Err((
            REP_ERR_INVALID,
            "metadata contexts need NBD_OPT_STRUCTURED_REPLY first".into(),
        )));
    }
    let req = match proto::parse_meta_context_request(payload) {
        Ok(r) => r,
        Err(e) => return Ok(Err((REP_ERR_INVALID, e.to_string()))),
    };
    if req.export_name.is_empty() || !exports.exists(&req.export_name) {
        return Ok(Err((
            REP_ERR_UNKNOWN,
            format!("unknown export {:?}", req.export_name),
        )));
    }
    let contexts = match select_contexts(&req.queries, !set) {
        Ok(c) => c,
        Err(msg) => return Ok(Err((REP_ERR_INVALID, msg))),
    };
    // LIST replies carry id 0 (reserved); SET replies carry the id used in transmission.
    let id = if set { BASE_ALLOCATION_ID } else { 0 };
    for name in &contexts {
        reply(
            stream,
            option,
            REP_META_CONTEXT,
            &proto::rep_meta_context_payload(id, name),
        )
        .await?;
    }
    reply(stream, option, REP_ACK, &[]).await?;
    Ok(Ok((!contexts.is_empty()).then_some(req.export_name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn context_selection() {
        assert_eq!(
            select_contexts(&[], true),
            Ok(vec![CONTEXT_BASE_ALLOCATION])
        );
        assert_eq!(select_contexts(&[], false), Ok(vec![]));
        assert_eq!(
            select_contexts(&q(&["base:"]), true),
            Ok(vec![CONTEXT_BASE_ALLOCATION])
        );
        assert_eq!(select_contexts(&q(&["base:"]), false), Ok(vec![]));
        assert_eq!(
            select_contexts(&q(&["qemu:dirty-bitmap:x", "base:allocation"]), false),
            Ok(vec![CONTEXT_BASE_ALLOCATION])
        );
        assert_eq!(
            select_contexts(&q(&["base:allocation", "base:allocation"]), false),
            Ok(vec![CONTEXT_BASE_ALLOCATION])
        );
        assert_eq!(select_contexts(&q(&["base:other"]), true), Ok(vec![]));
        assert_eq!(select_contexts(&q(&["x-foo:bar"]), false), Ok(vec![]));
        assert!(select_contexts(&q(&["allocation"]), false).is_err());
        assert!(select_contexts(&q(&[":allocation"]), true).is_err());
    }

    #[test]
    fn flags_for_devices() {
        let rw = vhost_blk::MemDevice::new("a", 4096);
        let f = transmission_flags(&rw, false);
        assert_eq!(f & FLAG_READ_ONLY, 0);
        assert_ne!(f & FLAG_SEND_TRIM, 0);
        assert_ne!(f & FLAG_SEND_FAST_ZERO, 0);
        assert_eq!(f & FLAG_SEND_DF, 0);
        assert_ne!(transmission_flags(&rw, true) & FLAG_SEND_DF, 0);
        let ro = vhost_blk::MemDevice::new("b", 4096).read_only();
        let f = transmission_flags(&ro, true);
        assert_ne!(f & FLAG_READ_ONLY, 0);
        assert_eq!(
            f & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FUA),
            0
        );
        assert_ne!(f & FLAG_SEND_FLUSH, 0);
    }
}
