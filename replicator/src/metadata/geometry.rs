//! Where things go: parameter ranges, the size of the metadata area, the
//! data size it leaves, and the consistency check of a superblock against
//! the device it was found on.
//!
//! Metadata area, 4 KiB aligned, offsets relative to its start:
//! `[ dirty bitmap | activity log | superblock slot A | superblock slot B ]`.
//! The area always ends at the last 4 KiB boundary of the device that holds
//! it, so the two slots can be found from the device size alone, before any
//! superblock has been read.

use super::layout::{BLOCK_BYTES, SLOT_BYTES};
use super::superblock::Superblock;

/// Smallest data area a volume may have.
pub(crate) const MIN_DATA_BYTES: u64 = 1 << 20;
pub(crate) const MIN_GRANULARITY_BYTES: u32 = 512;
pub(crate) const MAX_GRANULARITY_BYTES: u32 = 1 << 20;
/// At least two, so a transaction can be written while another stays intact.
pub(crate) const MIN_AL_SLOTS: u32 = 2;
pub(crate) const MAX_AL_SLOTS: u32 = 4096;
pub(crate) const MAX_AL_EXTENT_BYTES: u32 = 1 << 30;
/// DRBD's accepted range for its `al-extents` setting.
pub(crate) const MIN_AL_EXTENTS: u32 = 7;
pub(crate) const MAX_AL_EXTENTS: u32 = 65534;
/// Each activity-log transaction slot is one 4 KiB block.
pub(crate) const AL_SLOT_BYTES: u64 = 4096;

/// The user-chosen sizing parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    pub granularity_bytes: u32,
    pub al_slots: u32,
    pub al_extent_bytes: u32,
    pub al_extents_max: u32,
}

impl Params {
    pub(crate) fn of(sb: &Superblock) -> Self {
        Self {
            granularity_bytes: sb.bitmap_granularity_bytes,
            al_slots: sb.al_slots,
            al_extent_bytes: sb.al_extent_bytes,
            al_extents_max: sb.al_extents_max,
        }
    }

    /// Checks the ranges; the message names the allowed range.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let g = self.granularity_bytes;
        if !g.is_power_of_two() || !(MIN_GRANULARITY_BYTES..=MAX_GRANULARITY_BYTES).contains(&g) {
            return Err(format!(
                "bitmap granularity {g} bytes is invalid: it must be a power of two \
                 between {MIN_GRANULARITY_BYTES} bytes and 1 MiB ({MAX_GRANULARITY_BYTES})"
            ));
        }
        if !(MIN_AL_SLOTS..=MAX_AL_SLOTS).contains(&self.al_slots) {
            return Err(format!(
                "{} activity-log slots is invalid: it must be between {MIN_AL_SLOTS} and \
                 {MAX_AL_SLOTS}",
                self.al_slots
            ));
        }
        let e = self.al_extent_bytes;
        if !e.is_power_of_two() || e < g || e > MAX_AL_EXTENT_BYTES {
            return Err(format!(
                "activity-log extent size {e} bytes is invalid: it must be a power of two \
                 between the bitmap granularity ({g} bytes) and 1 GiB ({MAX_AL_EXTENT_BYTES})"
            ));
        }
        if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&self.al_extents_max) {
            return Err(format!(
                "{} activity-log extents is invalid: it must be between {MIN_AL_EXTENTS} \
                 and {MAX_AL_EXTENTS}",
                self.al_extents_max
            ));
        }
        Ok(())
    }
}

/// Sizes derived from the device size and the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub device_size_bytes: u64,
    pub data_size_bytes: u64,
    pub bitmap_len_bytes: u64,
    pub al_len_bytes: u64,
}

/// The device cannot hold the metadata plus [`MIN_DATA_BYTES`] of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shortfall {
    /// Metadata bytes that would live on the device (0 when external).
    pub metadata_bytes: u64,
    pub needed_bytes: u64,
}

impl Geometry {
    /// Sizes a volume on a disk of `device_size_bytes`. `params` must be valid.
    pub(crate) fn compute(external: bool, device_size_bytes: u64, params: &Params) -> Result<Self, Shortfall> {
        assert!(params.validate().is_ok(), "unvalidated params {params:?}");
        let aligned = round_down(device_size_bytes, BLOCK_BYTES);
        // Internal metadata: size the bitmap for the whole device instead of
        // solving for the data size it leaves; the over-estimate is a few
        // bits and keeps the arithmetic obviously right.
        let tracked = if external { aligned } else { device_size_bytes };
        let bitmap_len_bytes = bitmap_len_for(tracked, params.granularity_bytes);
        let al_len_bytes = u64::from(params.al_slots) * AL_SLOT_BYTES;
        let area = bitmap_len_bytes + al_len_bytes + 2 * SLOT_BYTES;
        let metadata_bytes = if external { 0 } else { area };
        let data_size_bytes = aligned
            .checked_sub(metadata_bytes)
            .filter(|&d| d >= MIN_DATA_BYTES)
            .ok_or(Shortfall { metadata_bytes, needed_bytes: metadata_bytes + MIN_DATA_BYTES })?;
        Ok(Self { device_size_bytes, data_size_bytes, bitmap_len_bytes, al_len_bytes })
    }

    pub(crate) fn area_len_bytes(&self) -> u64 {
        self.bitmap_len_bytes + self.al_len_bytes + 2 * SLOT_BYTES
    }

    /// Fills the layout fields of a superblock.
    pub(crate) fn apply(&self, sb: &mut Superblock) {
        sb.device_size_bytes = self.device_size_bytes;
        sb.data_size_bytes = self.data_size_bytes;
        sb.bitmap_offset_bytes = 0;
        sb.bitmap_len_bytes = self.bitmap_len_bytes;
        sb.al_offset_bytes = self.bitmap_len_bytes;
        sb.al_len_bytes = self.al_len_bytes;
    }
}

/// Bytes of dirty bitmap for `bytes` of data, one bit per granule, rounded up
/// to whole 4 KiB blocks.
pub(crate) fn bitmap_len_for(bytes: u64, granularity_bytes: u32) -> u64 {
    let bits = bytes.div_ceil(u64::from(granularity_bytes));
    round_up(bits.div_ceil(8), BLOCK_BYTES)
}

pub(crate) fn round_down(value: u64, align: u64) -> u64 {
    value - value % align
}

fn round_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// Absolute offset of the metadata area in a device whose metadata ends at
/// `meta_end` (a 4 KiB boundary), or `None` if it does not fit.
pub(crate) fn area_start(meta_end: u64, area_len_bytes: u64) -> Option<u64> {
    meta_end.checked_sub(area_len_bytes)
}

/// Why a checksum-valid superblock does not fit the device it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mismatch {
    /// The disk is not the size recorded at create time.
    DeviceSize {
        recorded: u64,
        actual: u64,
    },
    Other(String),
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::DeviceSize { recorded, actual } => {
                write!(f, "device size {actual} bytes does not match the recorded {recorded} bytes")
            }
            Mismatch::Other(reason) => f.write_str(reason),
        }
    }
}

/// Checks that `sb` describes a layout this build would have produced for
/// this device. Used on open (to refuse what does not fit) and before every
/// write (so nothing is ever written that open would refuse).
///
/// `meta_end` is the end of the metadata area: the last 4 KiB boundary of
/// the disk (internal) or of the metadata file (external).
pub(crate) fn check(sb: &Superblock, external: bool, disk_size_bytes: u64, meta_end: u64) -> Result<(), Mismatch> {
    let params = Params::of(sb);
    params.validate().map_err(Mismatch::Other)?;
    if sb.flags.external != external {
        let kind = |ext: bool| if ext { "external" } else { "internal" };
        return Err(Mismatch::Other(format!(
            "the superblock describes {} metadata but was opened as {}",
            kind(sb.flags.external),
            kind(external)
        )));
    }
    if sb.device_size_bytes != disk_size_bytes {
        return Err(Mismatch::DeviceSize { recorded: sb.device_size_bytes, actual: disk_size_bytes });
    }
    let geometry = Geometry::compute(external, sb.device_size_bytes, &params).map_err(|s| {
        Mismatch::Other(format!(
            "recorded device size {} bytes cannot hold {} bytes of metadata and 1 MiB of data",
            sb.device_size_bytes, s.metadata_bytes
        ))
    })?;
    let mut expected = sb.clone();
    geometry.apply(&mut expected);
    let fields = [
        ("data_size_bytes", sb.data_size_bytes, expected.data_size_bytes),
        ("bitmap_offset_bytes", sb.bitmap_offset_bytes, expected.bitmap_offset_bytes),
        ("bitmap_len_bytes", sb.bitmap_len_bytes, expected.bitmap_len_bytes),
        ("al_offset_bytes", sb.al_offset_bytes, expected.al_offset_bytes),
        ("al_len_bytes", sb.al_len_bytes, expected.al_len_bytes),
    ];
    for (name, found, want) in fields {
        if found != want {
            return Err(Mismatch::Other(format!("{name} is {found}, expected {want} for this device and parameters")));
        }
    }
    let Some(start) = area_start(meta_end, geometry.area_len_bytes()) else {
        return Err(Mismatch::Other(format!(
            "the metadata area needs {} bytes but its device holds only {meta_end}",
            geometry.area_len_bytes()
        )));
    };
    // Internal: the data area must end exactly where the metadata begins.
    if !external && start != geometry.data_size_bytes {
        return Err(Mismatch::Other(format!(
            "the metadata area starts at {start} but the data area ends at {}",
            geometry.data_size_bytes
        )));
    }
    Ok(())
}
