//! Every decoder of the NBD wire format (`blockd::nbd::proto`), server and client side, on
//! arbitrary bytes: none may panic; what decodes re-encodes to the same bytes where the
//! format is canonical; the block-status descriptor builder keeps its contract for any
//! extent list.

#![no_main]

use blockd::nbd::proto::{self, *};
use libfuzzer_sys::fuzz_target;
use vhost_blk::Extent;

fn fixed<const N: usize>(data: &[u8]) -> Option<[u8; N]> {
    data.get(..N)?.try_into().ok()
}

fuzz_target!(|data: &[u8]| {
    let _ = proto::parse_string(data, "fuzz");
    if let Some(&b) = data.first() {
        let _ = proto::parse_client_flags(u32::from(b) << (b % 25));
    }
    if let Some(buf) = fixed::<OPTION_HEADER_LEN>(data)
        && let Ok(h) = proto::parse_option_header(&buf)
    {
        assert_eq!(proto::encode_option_header(&h), buf);
    }
    if let Some(buf) = fixed::<REQUEST_HEADER_LEN>(data)
        && let Ok(r) = proto::parse_request_header(&buf)
    {
        let again = proto::encode_request_header(&r);
        assert_eq!(proto::parse_request_header(&again).ok(), Some(r));
    }
    if let Some(buf) = fixed::<OPTION_REPLY_HEADER_LEN>(data) {
        let _ = proto::parse_option_reply_header(&buf);
    }
    if let Some(buf) = fixed::<SIMPLE_REPLY_HEADER_LEN>(data) {
        let _ = proto::parse_simple_reply(&buf);
    }
    if let Some(buf) = fixed::<STRUCTURED_REPLY_HEADER_LEN>(data) {
        let _ = proto::parse_chunk_header(&buf);
    }
    let _ = proto::parse_export_name(data);
    if let Ok(req) = proto::parse_info_request(data) {
        let again = proto::encode_info_request(&req);
        assert_eq!(proto::parse_info_request(&again).ok(), Some(req));
    }
    if let Ok(req) = proto::parse_meta_context_request(data) {
        let again = proto::encode_meta_context_request(&req);
        assert_eq!(proto::parse_meta_context_request(&again).ok(), Some(req));
    }
    let _ = proto::parse_error_chunk_payload(data);
    let _ = proto::parse_block_status_payload(data);

    // Block status: extents from the input, a request length, REQ_ONE, a descriptor cap.
    if data.len() >= 6 {
        let len = u32::from_le_bytes([data[0], data[1], data[2], 0]) << (data[3] % 9);
        let req_one = data[4] & 1 == 1;
        let max = usize::from(data[5] % 64) + 1;
        let extents: Vec<Extent> = data[6..]
            .chunks(3)
            .map(|c| Extent {
                len_bytes: u64::from(u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                    << (c.get(2).map_or(0, |x| x % 12)),
                hole: c.get(2).is_some_and(|x| x & 0x80 != 0),
            })
            .collect();
        let descs = proto::block_status_descriptors(&extents, len, req_one, max);
        assert!(descs.len() <= max, "more descriptors than allowed");
        if req_one {
            assert!(
                descs.len() <= 1,
                "REQ_ONE answered with several descriptors"
            );
        }
        assert!(descs.iter().all(|d| d.len > 0), "empty descriptor");
        // The documented contract: a non-empty prefix of len (never more), boundaries on
        // 512-byte multiples except len itself, neighbours merged.
        let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
        assert!(
            total <= u64::from(len),
            "descriptors cover more than the request"
        );
        if len > 0 {
            assert!(!descs.is_empty(), "no descriptor for a non-empty request");
        }
        let mut at = 0u64;
        for d in &descs {
            at += u64::from(d.len);
            assert!(
                at == u64::from(len) || at % u64::from(MIN_BLOCK_SIZE) == 0,
                "unaligned boundary {at} (len {len})"
            );
        }
        assert!(
            descs.windows(2).all(|w| w[0].flags != w[1].flags),
            "neighbours with equal status not merged"
        );
    }
});
