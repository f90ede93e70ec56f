//! Creating metadata: validate parameters, size the area, refuse to clobber
//! anything that looks like data or metadata (unless forced), then zero the
//! area and write the first superblock.
//!
//! Write order matters for crash safety: old superblocks are invalidated
//! first (and synced), so a crash part-way through never leaves an old
//! superblock describing a freshly zeroed bitmap. A crash during create
//! leaves "no metadata" (or the old metadata, if the crash came before the
//! invalidation), and create can simply be run again.

use std::fs::File;
use std::path::Path;

use super::error::MetadataError;
use super::geometry::{self, area_start, Geometry, Params, Shortfall};
use super::layout::{encode, Decoded, Slot, FORMAT_VERSION, SLOT_BYTES};
use super::open::{newest, Newest};
use super::superblock::{Generations, MetaFlags, Superblock};
use super::target::{self, Access, Target};
use super::{CreateOptions, MetaLocation, Metadata};
use crate::device::DeviceKind;

/// Creates fresh metadata for `opts.disk` and returns it opened read-write.
pub fn create(opts: &CreateOptions) -> Result<Metadata, MetadataError> {
    let params = Params {
        granularity_bytes: opts.bitmap_granularity_bytes,
        al_slots: opts.al_slots,
        al_extent_bytes: opts.al_extent_bytes,
        al_extents_max: opts.al_extents_max,
    };
    params.validate().map_err(MetadataError::InvalidParameter)?;
    let external = matches!(opts.location, MetaLocation::External(_));
    let too_small = |size: u64, s: Shortfall| MetadataError::DiskTooSmall {
        disk: opts.disk.clone(),
        size,
        metadata_bytes: s.metadata_bytes,
        needed: s.needed_bytes,
    };

    // Size check first, so a doomed create does not leave an empty external
    // metadata file behind.
    let size = target::disk_size(&opts.disk)?;
    Geometry::compute(external, size, &params).map_err(|s| too_small(size, s))?;

    let mut target = Target::open(&opts.disk, &opts.location, Access::Create)?;
    let geometry = Geometry::compute(external, target.disk_size_bytes, &params)
        .map_err(|s| too_small(target.disk_size_bytes, s))?;
    let area_len = geometry.area_len_bytes();
    // A regular external file is sized to exactly the area; a block device
    // (or the disk, when internal) keeps its size and holds the area at its end.
    let resize_file = external && target.meta_kind == DeviceKind::RegularFile;
    let meta_end = if resize_file { area_len } else { target.meta_end() };
    let Some(start) = area_start(meta_end, area_len) else {
        // compute() guarantees the fit for internal metadata.
        assert!(external, "internal metadata area does not fit the disk");
        return Err(MetadataError::MetaDeviceTooSmall {
            path: target.meta_path.clone(),
            size: target.meta_size_bytes,
            needed: area_len,
        });
    };

    if !opts.force {
        refuse_to_clobber(&target, &geometry, start, resize_file)?;
    }

    // 1. Invalidate old superblocks (at the end of the current device).
    if let Some(old_slots) = target.slot_offset(Slot::A) {
        target.zero(old_slots, 2 * SLOT_BYTES)?;
        target.sync()?;
    }
    // 2. Size a regular external file to the area.
    if resize_file {
        target.file.set_len(area_len).map_err(super::error::io_err("resize", &target.meta_path))?;
        target.meta_size_bytes = area_len;
    }
    assert_eq!(target.meta_end(), meta_end);
    // 3. Zero bitmap, activity log and both slots, durably, before a
    //    superblock makes them meaningful.
    target.zero(start, area_len)?;
    target.sync()?;

    // 4. The first superblock, in slot A.
    let mut sb = Superblock {
        format_version: FORMAT_VERSION,
        seq: 1,
        volume_uuid: uuid::Uuid::new_v4(),
        device_size_bytes: 0,
        data_size_bytes: 0,
        bitmap_granularity_bytes: params.granularity_bytes,
        bitmap_offset_bytes: 0,
        bitmap_len_bytes: 0,
        al_offset_bytes: 0,
        al_len_bytes: 0,
        al_slots: params.al_slots,
        al_extent_bytes: params.al_extent_bytes,
        al_extents_max: params.al_extents_max,
        generations: Generations { current: Generations::JUST_CREATED, ..Generations::default() },
        flags: MetaFlags { external, ..MetaFlags::default() },
        primary_epoch: 0,
        node_id: 0,
    };
    geometry.apply(&mut sb);
    let checked = geometry::check(&sb, external, target.disk_size_bytes, meta_end);
    assert!(checked.is_ok(), "create built a superblock open would refuse: {checked:?}");
    let slot_a = start + area_len - 2 * SLOT_BYTES;
    assert_eq!(target.slot_offset(Slot::A), Some(slot_a));
    target.write_at(&encode(&sb), slot_a)?;
    target.sync()?;
    // 5. Make a new file's directory entry durable too.
    if target.created {
        sync_parent_dir(&target.meta_path)?;
    }

    tracing::info!(
        disk = %opts.disk.display(),
        meta = %target.meta_path.display(),
        volume = %sb.volume_uuid,
        data_size_bytes = sb.data_size_bytes,
        metadata_bytes = area_len,
        "created replicator metadata"
    );
    Ok(Metadata::from_parts(target, Slot::A, sb, false))
}

/// Without `--force`, refuses to overwrite existing metadata or any
/// non-zero bytes in the region the metadata area will occupy.
fn refuse_to_clobber(target: &Target, geometry: &Geometry, start: u64, resize_file: bool) -> Result<(), MetadataError> {
    let existing = match newest(target.read_slots()?) {
        Newest::Nothing => None,
        Newest::AllBad([a, b]) => Some(format!("damaged: slot A: {a}; slot B: {b}")),
        Newest::Found { seq, content, .. } => Some(match content {
            Decoded::Ok(sb) => format!("volume {}, seq {seq}", sb.volume_uuid),
            Decoded::NewerVersion(v) => format!("format {v}, seq {seq}"),
            Decoded::Unsupported(reason) => format!("seq {seq}, {reason}"),
        }),
    };
    if let Some(existing) = existing {
        return Err(MetadataError::AlreadyExists {
            disk: target.disk.clone(),
            location: target.location.clone(),
            existing,
        });
    }
    // A regular external file is truncated to the area: all of it is at risk.
    let (offset, len) = if resize_file { (0, target.meta_size_bytes) } else { (start, geometry.area_len_bytes()) };
    if !target.any_nonzero(offset, len)? {
        return Ok(());
    }
    Err(if target.external() {
        MetadataError::ExternalNotEmpty { path: target.meta_path.clone() }
    } else {
        MetadataError::WouldOverwriteData {
            disk: target.disk.clone(),
            overwrite_bytes: geometry.device_size_bytes - geometry.data_size_bytes,
        }
    })
}

fn sync_parent_dir(path: &Path) -> Result<(), MetadataError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent).and_then(|dir| dir.sync_all()).map_err(super::error::io_err("sync directory", parent))
}
