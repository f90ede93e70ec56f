//! Opening existing metadata: read both superblock slots, trust the valid
//! one with the highest seq, and check it against the device.
//!
//! A torn superblock write damages only the slot being written; the other
//! slot still holds the previous update, so open falls back to it.

use std::io;
use std::path::Path;

use super::error::MetadataError;
use super::geometry::{self, Mismatch};
use super::layout::{Decoded, Slot, SlotState};
use super::target::{Access, Target};
use super::{MetaLocation, Metadata};

/// The outcome of reading both slots.
#[derive(Debug)]
pub(crate) enum Newest {
    /// Neither slot has the magic: no metadata here.
    Nothing,
    /// Some magic, but no slot with a valid checksum: `[A, B]` reasons.
    AllBad([String; 2]),
    /// The checksum-valid slot with the highest seq.
    Found {
        slot: Slot,
        seq: u64,
        content: Decoded,
        /// Why the other slot was not used, if it was unusable.
        other_bad: Option<String>,
    },
}

/// Picks the slot to trust from `[A, B]`. On equal seqs (never written by
/// this code) slot A wins, to be deterministic.
pub(crate) fn newest(states: [SlotState; 2]) -> Newest {
    fn describe(state: &SlotState) -> String {
        match state {
            SlotState::Empty => "no superblock (magic absent)".to_string(),
            SlotState::Bad(reason) => reason.clone(),
            SlotState::Valid { seq, .. } => format!("valid, seq {seq}"),
        }
    }
    // An older valid or a never-written other slot is normal; only a
    // damaged one is worth reporting.
    fn bad(state: SlotState) -> Option<String> {
        match state {
            SlotState::Bad(reason) => Some(reason),
            SlotState::Empty | SlotState::Valid { .. } => None,
        }
    }
    let [a, b] = states;
    let (slot, seq, content, other_bad) = match (a, b) {
        (SlotState::Valid { seq: seq_a, content: content_a }, SlotState::Valid { seq: seq_b, content: content_b }) => {
            if seq_b > seq_a {
                (Slot::B, seq_b, content_b, None)
            } else {
                (Slot::A, seq_a, content_a, None)
            }
        }
        (SlotState::Valid { seq, content }, other) => (Slot::A, seq, content, bad(other)),
        (other, SlotState::Valid { seq, content }) => (Slot::B, seq, content, bad(other)),
        (SlotState::Empty, SlotState::Empty) => return Newest::Nothing,
        (a, b) => return Newest::AllBad([describe(&a), describe(&b)]),
    };
    Newest::Found { slot, seq, content, other_bad }
}

/// Opens the metadata of `disk` at `location`. With `read_only`, nothing is
/// opened for writing and [`Metadata::update`] fails.
pub fn open(disk: &Path, location: &MetaLocation, read_only: bool) -> Result<Metadata, MetadataError> {
    let no_metadata =
        |detail: String| MetadataError::NoMetadata { disk: disk.to_path_buf(), location: location.clone(), detail };
    let access = if read_only { Access::ReadOnly } else { Access::ReadWrite };
    let target = match Target::open(disk, location, access) {
        Ok(target) => target,
        // A missing external file means "not created yet", not an I/O fault.
        Err(MetadataError::Io { path, source, .. })
            if source.kind() == io::ErrorKind::NotFound
                && matches!(location, MetaLocation::External(p) if *p == path) =>
        {
            return Err(no_metadata(": the file does not exist".into()));
        }
        Err(e) => return Err(e),
    };

    let (slot, sb) = match newest(target.read_slots()?) {
        Newest::Nothing => {
            let detail = match target.slot_offset(Slot::A) {
                None => format!(": it is only {} bytes", target.meta_size_bytes),
                Some(_) => String::new(),
            };
            return Err(no_metadata(detail));
        }
        Newest::AllBad([slot_a, slot_b]) => {
            return Err(MetadataError::Corrupt { disk: disk.to_path_buf(), location: location.clone(), slot_a, slot_b })
        }
        Newest::Found { slot, seq, content, other_bad } => {
            if let Some(reason) = other_bad {
                // Expected after a crash during an update: that slot was
                // being written. The next update overwrites it.
                tracing::warn!(
                    meta = %target.meta_path.display(),
                    using = slot.name(),
                    seq,
                    unusable = slot.other().name(),
                    reason,
                    "one superblock slot is unusable (interrupted update?); using the other"
                );
            }
            match content {
                Decoded::Ok(sb) => (slot, sb),
                Decoded::NewerVersion(version) => {
                    return Err(MetadataError::NewerVersion {
                        disk: disk.to_path_buf(),
                        location: location.clone(),
                        version,
                    })
                }
                Decoded::Unsupported(reason) => {
                    return Err(MetadataError::Unsupported {
                        disk: disk.to_path_buf(),
                        location: location.clone(),
                        reason,
                    })
                }
            }
        }
    };

    geometry::check(&sb, target.external(), target.disk_size_bytes, target.meta_end()).map_err(|mismatch| {
        match mismatch {
            Mismatch::DeviceSize { recorded, actual } => {
                MetadataError::SizeMismatch { disk: disk.to_path_buf(), location: location.clone(), recorded, actual }
            }
            Mismatch::Other(reason) => {
                MetadataError::Inconsistent { disk: disk.to_path_buf(), location: location.clone(), reason }
            }
        }
    })?;

    tracing::debug!(
        meta = %target.meta_path.display(),
        slot = slot.name(),
        seq = sb.seq,
        "opened replicator metadata"
    );
    Ok(Metadata::from_parts(target, slot, sb, read_only))
}
