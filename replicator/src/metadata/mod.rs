//! On-disk metadata of a replicated volume, like DRBD's meta-data: the
//! public API ([`create`], [`open`], [`Metadata::update`]) and the types the
//! rest of the crate codes against.
//!
//! Metadata is *internal* (the last part of the backing device; the data area
//! shrinks) or *external* (a separate file; the whole device is data). The
//! metadata area is, 4 KiB aligned:
//!
//! `[ dirty bitmap | activity log | superblock slot A | superblock slot B ]`
//!
//! and always ends at the last 4 KiB boundary of the device holding it (the
//! disk, or the external file). Internal: data area = `[0, data_size_bytes)`,
//! metadata area right after it.
//!
//! Crash safety comes from double-buffering: every update writes the slot
//! *not* holding the newest superblock with `seq + 1` and syncs it; open
//! trusts the checksum-valid slot with the highest `seq`. A torn write
//! therefore only ever damages the copy being written.
//!
//! Files: `layout.rs` (byte format, crc), `geometry.rs` (sizes, ranges,
//! consistency), `target.rs` (device access), `create.rs`, `open.rs`,
//! `superblock.rs` (typed superblock), `error.rs`.

mod create;
mod dirty;
mod error;
mod geometry;
mod layout;
mod open;
mod superblock;
mod target;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use create::create;
pub use dirty::{ActivityLogStore, BitmapStore};
pub use error::MetadataError;
pub use open::open;
pub use superblock::{Generations, MetaFlags, Superblock};

use layout::{encode, Slot, FORMAT_VERSION, SLOT_BYTES};
use target::Target;

/// Where a volume's metadata lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the backing device.
    Internal,
    /// In a separate file (or block device).
    External(PathBuf),
}

impl FromStr for MetaLocation {
    type Err = MetadataError;

    /// `"internal"` is [`MetaLocation::Internal`]; anything else is a path
    /// (write `./internal` for a file of that name).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "internal" => Ok(Self::Internal),
            "" => Err(MetadataError::InvalidParameter(
                "metadata location is empty: use `internal` or the path of a metadata file".into(),
            )),
            path => Ok(Self::External(PathBuf::from(path))),
        }
    }
}

impl fmt::Display for MetaLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Internal => f.write_str("internal"),
            Self::External(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Parameters of [`create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub disk: PathBuf,
    pub location: MetaLocation,
    /// Data bytes per dirty-bitmap bit: a power of two in 512 B ..= 1 MiB.
    pub bitmap_granularity_bytes: u32,
    /// Activity-log transaction slots of 4 KiB: 2 ..= 4096.
    pub al_slots: u32,
    /// Activity-log extent: a power of two, bitmap granularity ..= 1 GiB.
    pub al_extent_bytes: u32,
    /// Hot extents tracked by the activity log: 7 ..= 65534.
    pub al_extents_max: u32,
    /// Overwrite existing metadata or non-zero bytes where it will go.
    pub force: bool,
}

impl CreateOptions {
    pub const DEFAULT_BITMAP_GRANULARITY_BYTES: u32 = 4096;
    pub const DEFAULT_AL_SLOTS: u32 = 64;
    pub const DEFAULT_AL_EXTENT_BYTES: u32 = 4 << 20;
    pub const DEFAULT_AL_EXTENTS_MAX: u32 = 1237;

    pub fn new(disk: PathBuf, location: MetaLocation) -> Self {
        Self {
            disk,
            location,
            bitmap_granularity_bytes: Self::DEFAULT_BITMAP_GRANULARITY_BYTES,
            al_slots: Self::DEFAULT_AL_SLOTS,
            al_extent_bytes: Self::DEFAULT_AL_EXTENT_BYTES,
            al_extents_max: Self::DEFAULT_AL_EXTENTS_MAX,
            force: false,
        }
    }
}

/// Open metadata: the metadata file and the current superblock.
#[derive(Debug)]
pub struct Metadata {
    target: Target,
    /// The slot holding `sb`; updates go to the other one.
    current: Slot,
    sb: Superblock,
    read_only: bool,
}

/// A superblock update encoded and placed, but not yet written.
#[derive(Debug)]
pub(crate) struct PendingUpdate {
    pub slot: Slot,
    /// Absolute offset of `slot` in the metadata file.
    pub offset: u64,
    /// The full 4 KiB slot image.
    pub bytes: Vec<u8>,
    pub sb: Superblock,
}

impl Metadata {
    fn from_parts(target: Target, current: Slot, sb: Superblock, read_only: bool) -> Self {
        Self { target, current, sb, read_only }
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn data_size_bytes(&self) -> u64 {
        self.sb.data_size_bytes
    }

    pub fn location(&self) -> &MetaLocation {
        &self.target.location
    }

    /// The backing disk.
    pub fn disk(&self) -> &Path {
        &self.target.disk
    }

    /// The file holding the metadata: the disk itself when internal.
    pub fn metadata_path(&self) -> &Path {
        &self.target.meta_path
    }

    /// The open metadata file, for the bitmap and activity-log code.
    pub fn file(&self) -> &File {
        &self.target.file
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Absolute offset of the metadata area within [`Self::file`].
    pub fn area_offset_bytes(&self) -> u64 {
        let area_len = self.sb.al_offset_bytes + self.sb.al_len_bytes + 2 * SLOT_BYTES;
        // open/create checked that the area fits.
        self.target.meta_end() - area_len
    }

    /// Absolute byte range of the dirty bitmap within [`Self::file`].
    pub fn bitmap_range(&self) -> Range<u64> {
        let start = self.area_offset_bytes() + self.sb.bitmap_offset_bytes;
        start..start + self.sb.bitmap_len_bytes
    }

    /// Absolute byte range of the activity log within [`Self::file`].
    pub fn al_range(&self) -> Range<u64> {
        let start = self.area_offset_bytes() + self.sb.al_offset_bytes;
        start..start + self.sb.al_len_bytes
    }

    /// Applies `f` to a copy of the superblock, bumps `seq`, writes the copy
    /// to the slot not holding the current superblock and syncs it; only then
    /// replaces the in-memory copy. On error the in-memory copy is unchanged
    /// and the on-disk current slot is untouched.
    ///
    /// `f` may change anything but the layout (sizes, offsets, parameters)
    /// and the external flag; `seq` and `format_version` are set here.
    pub fn update(&mut self, f: impl FnOnce(&mut Superblock)) -> Result<(), MetadataError> {
        let pending = self.prepare_update(f)?;
        self.target.write_at(&pending.bytes, pending.offset)?;
        self.target.sync()?;
        tracing::debug!(
            meta = %self.target.meta_path.display(),
            slot = pending.slot.name(),
            seq = pending.sb.seq,
            "updated replicator metadata"
        );
        self.current = pending.slot;
        self.sb = pending.sb;
        Ok(())
    }

    /// Everything [`Self::update`] does short of writing; split out so tests
    /// can simulate a crash in the middle of the write.
    pub(crate) fn prepare_update(&self, f: impl FnOnce(&mut Superblock)) -> Result<PendingUpdate, MetadataError> {
        if self.read_only {
            return Err(MetadataError::ReadOnly {
                disk: self.target.disk.clone(),
                location: self.target.location.clone(),
            });
        }
        let mut sb = self.sb.clone();
        f(&mut sb);
        sb.format_version = FORMAT_VERSION;
        sb.seq = self
            .sb
            .seq
            .checked_add(1)
            .ok_or_else(|| MetadataError::InvalidUpdate { reason: "sequence number exhausted".into() })?;
        // Never write what open would refuse.
        geometry::check(&sb, self.target.external(), self.target.disk_size_bytes, self.target.meta_end())
            .map_err(|m| MetadataError::InvalidUpdate { reason: m.to_string() })?;
        let slot = self.current.other();
        let offset = self.target.slot_offset(slot).expect("open/create established that both slots exist");
        Ok(PendingUpdate { slot, offset, bytes: encode(&sb), sb })
    }

    #[cfg(test)]
    pub(crate) fn current_slot(&self) -> Slot {
        self.current
    }
}
