//! The in-memory superblock: what the rest of the crate reads and updates.
//!
//! This file owns the decoded, typed view of a superblock and the flag-bit
//! encoding. How it is laid out on disk lives in `layout.rs`; whether its
//! sizes and offsets fit the device lives in `geometry.rs`.

use serde::{Deserialize, Serialize};

/// The decoded superblock of a volume.
///
/// Offsets are relative to the start of the metadata area (the end of the
/// data area for internal metadata, offset 0 of the file for external).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Superblock {
    /// On-disk format version; this build reads and writes only version 1.
    pub format_version: u32,
    /// Update sequence number: the slot with the highest valid `seq` wins.
    pub seq: u64,
    pub volume_uuid: uuid::Uuid,
    /// Size of the backing disk when the metadata was created.
    pub device_size_bytes: u64,
    /// Bytes exported to clients: `[0, data_size_bytes)` of the disk.
    pub data_size_bytes: u64,
    pub bitmap_granularity_bytes: u32,
    pub bitmap_offset_bytes: u64,
    pub bitmap_len_bytes: u64,
    pub al_offset_bytes: u64,
    pub al_len_bytes: u64,
    pub al_slots: u32,
    pub al_extent_bytes: u32,
    pub al_extents_max: u32,
    pub generations: Generations,
    pub flags: MetaFlags,
    pub primary_epoch: u64,
    pub node_id: u32,
}

/// Generation identifiers, DRBD-style (see `replication::generations` for
/// how they evolve and what they decide). Fresh metadata holds
/// [`Generations::JUST_CREATED`] and zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Generations {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

impl Generations {
    /// `current` of metadata that never held data: both nodes start with it,
    /// connect without syncing, and stay Inconsistent until one is made
    /// primary with `--force`, which starts the initial full sync.
    pub const JUST_CREATED: u64 = 4;
}

/// Persistent state flags, stored as bits of a little-endian u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MetaFlags {
    /// The data on this disk is consistent and up to date.
    pub consistent: bool,
    /// The last shutdown was clean (the activity log need not be replayed).
    pub clean_shutdown: bool,
    /// This node was primary; persisted so a restart keeps its role.
    pub primary: bool,
    /// The metadata lives in a separate file, not at the end of the disk.
    pub external: bool,
    /// This node crashed while primary and has not resynced since: its
    /// activity log's extents may differ from the peer's.
    pub crashed_primary: bool,
    /// The peer is known to hold newer data (set by a fence handler or the
    /// admin); cleared by a resync.
    pub outdated: bool,
}

impl MetaFlags {
    pub const CONSISTENT: u64 = 1 << 0;
    pub const CLEAN_SHUTDOWN: u64 = 1 << 1;
    pub const PRIMARY: u64 = 1 << 2;
    pub const EXTERNAL: u64 = 1 << 3;
    pub const CRASHED_PRIMARY: u64 = 1 << 4;
    pub const OUTDATED: u64 = 1 << 5;
    /// Every bit this build understands.
    pub const KNOWN_BITS: u64 = Self::CONSISTENT
        | Self::CLEAN_SHUTDOWN
        | Self::PRIMARY
        | Self::EXTERNAL
        | Self::CRASHED_PRIMARY
        | Self::OUTDATED;

    /// Encodes the flags as on-disk bits.
    pub fn to_bits(self) -> u64 {
        let mut bits = 0;
        for (set, bit) in [
            (self.consistent, Self::CONSISTENT),
            (self.clean_shutdown, Self::CLEAN_SHUTDOWN),
            (self.primary, Self::PRIMARY),
            (self.external, Self::EXTERNAL),
            (self.crashed_primary, Self::CRASHED_PRIMARY),
            (self.outdated, Self::OUTDATED),
        ] {
            if set {
                bits |= bit;
            }
        }
        bits
    }

    /// Decodes on-disk bits. Unknown bits are an error (returned as the
    /// unknown bits): silently dropping them would lose state a newer
    /// writer meant to keep on the next update.
    pub fn from_bits(bits: u64) -> Result<Self, u64> {
        let unknown = bits & !Self::KNOWN_BITS;
        if unknown != 0 {
            return Err(unknown);
        }
        Ok(Self {
            consistent: bits & Self::CONSISTENT != 0,
            clean_shutdown: bits & Self::CLEAN_SHUTDOWN != 0,
            primary: bits & Self::PRIMARY != 0,
            external: bits & Self::EXTERNAL != 0,
            crashed_primary: bits & Self::CRASHED_PRIMARY != 0,
            outdated: bits & Self::OUTDATED != 0,
        })
    }
}
