//! What the vhost-user-blk device offers: feature bits, limits and the virtio-blk
//! configuration space (`struct virtio_blk_config`, little-endian).
//!
//! # Choices
//!
//! - **Logical block size 4096** (`VIRTIO_BLK_F_BLK_SIZE`) by default: the guest then only
//!   issues 4 KiB-aligned requests in multiples of 4 KiB, which is the engine's block, so no
//!   request ever needs a read-modify-write of a partial block. The guest sees a "4Kn" disk:
//!   fine for Linux filesystems and direct kernel boot; a legacy BIOS bootloader that
//!   assumes 512-byte sectors would need `logical_block_size = 512` (correct too, with
//!   read-modify-write of partial blocks inside the engine).
//! - **Request size**: `seg_max` x `size_max` never exceeds `max_request_bytes` (default
//!   126 x 256 KiB = 31.5 MiB <= 32 MiB, the engine's largest request), so a driver that
//!   respects the advertised limits never gets an error for a large request, and the device
//!   never allocates more than `max_request_bytes` for one request.
//! - **Discard / write-zeroes**: up to `max_*_seg` segments of up to `max_*_sectors` each
//!   (default 64 x 2 GiB), discard alignment 4 KiB (so trims free whole blocks), and
//!   `write_zeroes_may_unmap` = 1 (zeroed blocks are stored as holes).
//! - No `VIRTIO_BLK_F_CONFIG_WCE`: the cache is always write-back, and `VIRTIO_BLK_F_FLUSH`
//!   tells the guest to flush.

use std::time::Duration;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::bindings::virtio_blk as vb;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of the configuration space we answer (up to and including
/// `write_zeroes_may_unmap` and its padding); reads beyond it return zeros.
pub const CONFIG_SPACE_LEN: usize = 60;

/// Largest configuration read a vhost-user frontend may ask for.
const MAX_CONFIG_READ: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Virtqueues offered (`num_queues` in the config space; one worker thread each).
    pub num_queues: u16,
    /// Largest virtqueue the frontend may configure.
    pub max_queue_size: u16,
    /// `blk_size`: the guest's logical block size (see the module doc).
    pub logical_block_size: u32,
    /// Most data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Largest data segment (`size_max`).
    pub size_max: u32,
    /// Largest read or write accepted; larger ones get `VIRTIO_BLK_S_IOERR`.
    pub max_request_bytes: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    /// How long a closing connection (or `GET_VRING_BASE`) waits for requests in flight.
    pub drain_timeout: Duration,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            num_queues: 2,
            max_queue_size: 1024,
            logical_block_size: 4096,
            seg_max: 126,
            size_max: 256 << 10,
            max_request_bytes: 32 << 20,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 64,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 64,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl BackendConfig {
    /// Rejects values a guest could not work with.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.num_queues) {
            return Err(format!(
                "num_queues = {} must be between 1 and 64",
                self.num_queues
            ));
        }
        if !self.max_queue_size.is_power_of_two() || self.max_queue_size < 2 {
            return Err(format!(
                "max_queue_size = {} must be a power of two >= 2",
                self.max_queue_size
            ));
        }
        if !self.logical_block_size.is_power_of_two()
            || !(512..=4096).contains(&self.logical_block_size)
        {
            return Err(format!(
                "logical_block_size = {} must be 512, 1024, 2048 or 4096",
                self.logical_block_size
            ));
        }
        if self.seg_max == 0 || self.size_max < 4096 {
            return Err("seg_max must be >= 1 and size_max >= 4096".into());
        }
        if u64::from(self.seg_max) * u64::from(self.size_max) > u64::from(self.max_request_bytes) {
            return Err(format!(
                "seg_max x size_max ({} x {}) exceeds max_request_bytes ({})",
                self.seg_max, self.size_max, self.max_request_bytes
            ));
        }
        if self.max_discard_seg == 0 || self.max_write_zeroes_seg == 0 {
            return Err("max_discard_seg and max_write_zeroes_seg must be >= 1".into());
        }
        Ok(())
    }

    /// Virtio feature bits offered for a device (`read_only` adds `VIRTIO_BLK_F_RO`).
    pub fn features(&self, read_only: bool) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << vb::VIRTIO_BLK_F_SIZE_MAX
            | 1 << vb::VIRTIO_BLK_F_SEG_MAX
            | 1 << vb::VIRTIO_BLK_F_BLK_SIZE
            | 1 << vb::VIRTIO_BLK_F_TOPOLOGY
            | 1 << vb::VIRTIO_BLK_F_FLUSH
            | 1 << vb::VIRTIO_BLK_F_MQ
            | 1 << vb::VIRTIO_BLK_F_DISCARD
            | 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if read_only {
            f |= 1 << vb::VIRTIO_BLK_F_RO;
        }
        f
    }

    /// vhost-user protocol features offered: multiqueue, config space, reply-ack.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    /// `struct virtio_blk_config` for a device of `capacity_bytes`.
    pub fn config_space(&self, capacity_bytes: u64) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        // capacity, in 512-byte sectors whatever the logical block size.
        put(0, &(capacity_bytes / 512).to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // geometry (16..20) left zero: meaningless for a virtual disk.
        put(20, &self.logical_block_size.to_le_bytes());
        // topology: physical blocks are 4 KiB (the engine's block).
        let per_physical = (4096 / self.logical_block_size).max(1);
        put(24, &[per_physical.trailing_zeros() as u8]); // physical_block_exp
        put(25, &[0]); // alignment_offset
        put(26, &(per_physical as u16).to_le_bytes()); // min_io_size, in logical blocks
        put(28, &0u32.to_le_bytes()); // opt_io_size: no preference
        put(32, &[1]); // writeback (informational: no CONFIG_WCE)
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &self.max_discard_seg.to_le_bytes());
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &self.max_write_zeroes_seg.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// The answer to `VHOST_USER_GET_CONFIG`: exactly `size` bytes from `offset`, zeros past
    /// our structure; empty (an error to the frontend) for an impossible request.
    pub fn config_read(&self, capacity_bytes: u64, offset: u32, size: u32) -> Vec<u8> {
        let Some(end) = offset.checked_add(size) else {
            return Vec::new();
        };
        if end > MAX_CONFIG_READ {
            return Vec::new();
        }
        let space = self.config_space(capacity_bytes);
        (offset..end)
            .map(|i| space.get(i as usize).copied().unwrap_or(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn default_is_valid_and_bounded() {
        let c = BackendConfig::default();
        c.validate().unwrap();
        assert!(u64::from(c.seg_max) * u64::from(c.size_max) <= 32 << 20);
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            BackendConfig {
                num_queues: 0,
                ..Default::default()
            },
            BackendConfig {
                logical_block_size: 8192,
                ..Default::default()
            },
            BackendConfig {
                size_max: 1 << 20,
                ..Default::default()
            },
            BackendConfig {
                max_queue_size: 100,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_space_layout() {
        let c = BackendConfig::default();
        let s = c.config_space(1 << 30);
        assert_eq!(u64::from_le_bytes(s[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(u32::from_le_bytes(s[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(s[20..24].try_into().unwrap()), 4096);
        assert_eq!(s[24], 0);
        assert_eq!(u16::from_le_bytes(s[34..36].try_into().unwrap()), 2);
        assert_eq!(s[56], 1);
        let c512 = BackendConfig {
            logical_block_size: 512,
            ..Default::default()
        };
        assert_eq!(c512.config_space(0)[24], 3);
        assert_eq!(c.config_read(0, 0, 96).len(), 96);
        assert_eq!(c.config_read(0, 250, 10).len(), 0);
        assert_eq!(c.config_read(0, u32::MAX, 2).len(), 0);
        assert_eq!(c.config_read(1 << 30, 0, 8), s[0..8].to_vec());
    }

    #[test]
    fn read_only_feature() {
        let c = BackendConfig::default();
        assert_eq!(c.features(false) & (1 << vb::VIRTIO_BLK_F_RO), 0);
        assert_ne!(c.features(true) & (1 << vb::VIRTIO_BLK_F_RO), 0);
    }
}
