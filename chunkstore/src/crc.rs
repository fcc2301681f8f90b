//! crc32c of 4 KiB blocks: computed on write, stored beside each block's address in the
//! block map, verified on every read from any tier.

pub const BLOCK_SIZE: usize = 4096;

pub fn block_crc(block: &[u8]) -> u32 {
    crc32c::crc32c(block)
}

/// crc of each 4 KiB block of `data` (whose length is a multiple of 4 KiB).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_SIZE).map(block_crc).collect()
}

/// crc32c of an all-zero block, cached.
pub fn zero_block_crc() -> u32 {
    static ZERO: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| block_crc(&[0u8; BLOCK_SIZE]))
}
