//! The chunk object format (see docs/object-tier.md):
//!
//! ```text
//! "SPCH" | version u8 = 1 | blocks u16 BE | frames u8
//! crc32c of each block            blocks × u32 BE
//! frame table                     frames × (offset u32 BE, length u32 BE), offsets relative
//!                                 to the end of the header
//! frames                          zstd frames of up to FRAME_BLOCKS blocks each
//! ```
//!
//! Encoding and decoding are pure functions over byte slices; decoding never panics and
//! rejects anything inconsistent (it is fuzzed).

use crate::crc::{BLOCK_SIZE, block_crc};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"SPCH";
pub const VERSION: u8 = 1;
/// Blocks per compression frame (64 KiB): the unit of ranged reads and of residency.
pub const FRAME_BLOCKS: usize = 16;
pub const MAX_BLOCKS: usize = 256;
const FIXED_HEADER: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("chunk object malformed: {0}")]
    Malformed(String),
    #[error("chunk frame does not decompress: {0}")]
    Decompress(String),
    #[error("block {block} of the chunk fails its checksum")]
    Checksum { block: usize },
}

/// Where a frame sits in the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameRef {
    /// Absolute byte offset in the object.
    pub offset: u64,
    pub len: u32,
}

/// What the chunk index remembers about an uploaded chunk: enough to fetch any frame with
/// one ranged GET.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLayout {
    /// blake3 of the raw content, hex: the object's name.
    pub hash: String,
    pub blocks: u16,
    pub frames: Vec<FrameRef>,
    /// Size of the whole object.
    pub object_bytes: u64,
}

fn header_len(blocks: usize, frames: usize) -> usize {
    FIXED_HEADER + 4 * blocks + 8 * frames
}

/// Encodes `raw` (whole blocks, at most MAX_BLOCKS) as a chunk object. Returns the object
/// bytes and its layout. `level` is the zstd level.
pub fn encode(raw: &[u8], level: i32) -> Result<(Vec<u8>, ChunkLayout), FormatError> {
    if raw.is_empty()
        || !raw.len().is_multiple_of(BLOCK_SIZE)
        || raw.len() / BLOCK_SIZE > MAX_BLOCKS
    {
        return Err(FormatError::Malformed(format!(
            "cannot encode {} bytes as a chunk",
            raw.len()
        )));
    }
    let blocks = raw.len() / BLOCK_SIZE;
    // Frames carry zstd's content checksum: corruption is caught when decoding, before
    // the per-block crc32c check.
    let mut zc =
        zstd::bulk::Compressor::new(level).map_err(|e| FormatError::Decompress(e.to_string()))?;
    zc.include_checksum(true)
        .map_err(|e| FormatError::Decompress(e.to_string()))?;
    let frames: Vec<Vec<u8>> = raw
        .chunks(FRAME_BLOCKS * BLOCK_SIZE)
        .map(|f| {
            zc.compress(f)
                .map_err(|e| FormatError::Decompress(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let hlen = header_len(blocks, frames.len());
    let total: usize = hlen + frames.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(blocks as u16).to_be_bytes());
    out.push(frames.len() as u8);
    for b in raw.chunks(BLOCK_SIZE) {
        out.extend_from_slice(&block_crc(b).to_be_bytes());
    }
    let mut refs = Vec::with_capacity(frames.len());
    let mut off = 0u32;
    for f in &frames {
        out.extend_from_slice(&off.to_be_bytes());
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        refs.push(FrameRef {
            offset: (hlen as u64) + off as u64,
            len: f.len() as u32,
        });
        off += f.len() as u32;
    }
    for f in &frames {
        out.extend_from_slice(f);
    }
    let layout = ChunkLayout {
        hash: blake3::hash(raw).to_hex().to_string(),
        blocks: blocks as u16,
        frames: refs,
        object_bytes: out.len() as u64,
    };
    Ok((out, layout))
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Parses the header of a whole object: its layout (hash unknown: empty) and block crcs.
pub fn decode_header(obj: &[u8]) -> Result<(ChunkLayout, Vec<u32>), FormatError> {
    let bad = |m: &str| FormatError::Malformed(m.to_string());
    if obj.len() < FIXED_HEADER || &obj[..4] != MAGIC {
        return Err(bad("missing magic"));
    }
    if obj[4] != VERSION {
        return Err(FormatError::Malformed(format!(
            "unknown version {}",
            obj[4]
        )));
    }
    let blocks = u16::from_be_bytes([obj[5], obj[6]]) as usize;
    let nframes = obj[7] as usize;
    if blocks == 0 || blocks > MAX_BLOCKS || nframes != blocks.div_ceil(FRAME_BLOCKS) {
        return Err(bad("inconsistent block/frame counts"));
    }
    let hlen = header_len(blocks, nframes);
    if obj.len() < hlen {
        return Err(bad("truncated header"));
    }
    let crcs: Vec<u32> = (0..blocks)
        .map(|i| be_u32(&obj[FIXED_HEADER + 4 * i..]))
        .collect();
    let table = FIXED_HEADER + 4 * blocks;
    let mut frames = Vec::with_capacity(nframes);
    let mut expect = 0u64;
    for i in 0..nframes {
        let off = be_u32(&obj[table + 8 * i..]) as u64;
        let len = be_u32(&obj[table + 8 * i + 4..]);
        if off != expect || len == 0 {
            return Err(bad("frame table not contiguous"));
        }
        expect = off + len as u64;
        frames.push(FrameRef {
            offset: hlen as u64 + off,
            len,
        });
    }
    if hlen as u64 + expect != obj.len() as u64 {
        return Err(bad("object length does not match its frame table"));
    }
    Ok((
        ChunkLayout {
            hash: String::new(),
            blocks: blocks as u16,
            frames,
            object_bytes: obj.len() as u64,
        },
        crcs,
    ))
}

/// Decompresses one frame (`data` = exactly the frame's bytes) holding `blocks` blocks.
pub fn decode_frame(data: &[u8], blocks: usize) -> Result<Vec<u8>, FormatError> {
    let want = blocks * BLOCK_SIZE;
    let out =
        zstd::bulk::decompress(data, want).map_err(|e| FormatError::Decompress(e.to_string()))?;
    if out.len() != want {
        return Err(FormatError::Decompress(format!(
            "frame decompressed to {} bytes, expected {want}",
            out.len()
        )));
    }
    Ok(out)
}

/// Number of blocks in frame `i` of a chunk of `blocks` blocks.
pub fn frame_blocks(blocks: usize, i: usize) -> usize {
    (blocks - i * FRAME_BLOCKS).min(FRAME_BLOCKS)
}

/// Decodes a whole object, verifying every block against the crcs in its header.
pub fn decode_all(obj: &[u8]) -> Result<Vec<u8>, FormatError> {
    let (layout, crcs) = decode_header(obj)?;
    let mut out = Vec::with_capacity(layout.blocks as usize * BLOCK_SIZE);
    for (i, f) in layout.frames.iter().enumerate() {
        let start = f.offset as usize;
        let data = &obj[start..start + f.len as usize];
        out.extend(decode_frame(data, frame_blocks(layout.blocks as usize, i))?);
    }
    for (i, b) in out.chunks(BLOCK_SIZE).enumerate() {
        if block_crc(b) != crcs[i] {
            return Err(FormatError::Checksum { block: i });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(blocks: usize, seed: u8) -> Vec<u8> {
        (0..blocks * BLOCK_SIZE)
            .map(|i| {
                if (i / BLOCK_SIZE).is_multiple_of(3) {
                    0
                } else {
                    (i as u8).wrapping_mul(seed | 1)
                }
            })
            .collect()
    }

    #[test]
    fn roundtrip_and_ranged_frames() {
        for blocks in [1, 15, 16, 17, 100, 256] {
            let raw = data(blocks, 7);
            let (obj, layout) = encode(&raw, 3).unwrap();
            assert_eq!(layout.object_bytes as usize, obj.len());
            assert_eq!(layout.hash, blake3::hash(&raw).to_hex().to_string());
            assert_eq!(decode_all(&obj).unwrap(), raw);
            let (h, _) = decode_header(&obj).unwrap();
            assert_eq!(h.frames, layout.frames);
            // Any frame alone, from the layout only (a ranged GET).
            for (i, f) in layout.frames.iter().enumerate() {
                let part = &obj[f.offset as usize..(f.offset + f.len as u64) as usize];
                let n = frame_blocks(blocks, i);
                let got = decode_frame(part, n).unwrap();
                assert_eq!(got, raw[i * FRAME_BLOCKS * BLOCK_SIZE..][..n * BLOCK_SIZE]);
            }
        }
    }

    #[test]
    fn corruption_is_detected() {
        let raw = data(32, 9);
        let (mut obj, layout) = encode(&raw, 1).unwrap();
        let f = layout.frames[1];
        let mid = (f.offset + f.len as u64 / 2) as usize;
        obj[mid] ^= 0x55;
        assert!(decode_all(&obj).is_err());
        assert!(encode(&raw[..100], 1).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes: Vec<u8>, n in 0usize..20) {
            let _ = decode_header(&bytes);
            let _ = decode_all(&bytes);
            let _ = decode_frame(&bytes, n);
        }
    }
}
