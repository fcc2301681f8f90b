//! The object-store chunk format (`chunkstore::tier::format`: header, frame table, zstd
//! frames, per-block crc32c) and the local tier's stored records, on arbitrary bytes: no
//! panic, no allocation beyond the format's bounds, and whatever decodes is consistent
//! (the declared block count, and encode → decode is the identity).

#![no_main]

use chunkstore::tier::format::{self, ChunkLayout, FRAME_BLOCKS};
use chunkstore::tier::meta::SegRecord;
use libfuzzer_sys::fuzz_target;

const BLOCK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    if let Ok((layout, crcs)) = format::decode_header(data) {
        assert_eq!(crcs.len(), usize::from(layout.blocks));
        assert_eq!(
            layout.frames.len(),
            usize::from(layout.blocks).div_ceil(FRAME_BLOCKS)
        );
    }
    if let Ok(raw) = format::decode_all(data) {
        let (layout, _) = format::decode_header(data).expect("decode_all accepted the header");
        assert_eq!(raw.len(), usize::from(layout.blocks) * BLOCK);
    }
    if let Some((&n, frame)) = data.split_first() {
        let blocks = usize::from(n) % (FRAME_BLOCKS + 1);
        if let Ok(raw) = format::decode_frame(frame, blocks) {
            assert_eq!(raw.len(), blocks * BLOCK);
        }
    }
    // Round trip of up to 20 blocks built from the input (runs of repeated bytes compress,
    // the rest does not): decoding what we encoded gives it back.
    if !data.is_empty() {
        let blocks = data.len() % 20 + 1;
        let raw: Vec<u8> = (0..blocks * BLOCK)
            .map(|i| data[(i / 97) % data.len()] ^ if i % 3 == 0 { 0 } else { (i >> 12) as u8 })
            .collect();
        let (obj, layout) = format::encode(&raw, 1).expect("encode");
        assert_eq!(usize::from(layout.blocks), blocks);
        assert_eq!(
            format::decode_all(&obj).expect("decode what we encoded"),
            raw
        );
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = chunkstore::decode::segment_file_name(s);
    }
    let _ = serde_json::from_slice::<ChunkLayout>(data);
    let _ = serde_json::from_slice::<SegRecord>(data);
});
