//! Access to the device holding the metadata: opening the disk and, for
//! external metadata, the metadata file; locating the two superblock slots;
//! positional reads and writes whose errors name the path.
//!
//! Plain positional I/O plus `sync_data`: metadata is not on the hot path.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::error::{io_err, MetadataError};
use super::geometry::round_down;
use super::layout::{decode, Slot, SlotState, BLOCK_BYTES, SLOT_BYTES};
use super::MetaLocation;
use crate::device::{device_kind, device_size_bytes, DeviceKind};

/// Chunk size for zeroing and scanning larger regions.
const CHUNK_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadOnly,
    ReadWrite,
    /// Read-write, creating an external metadata file if it does not exist.
    Create,
}

/// The opened device that holds a volume's metadata.
#[derive(Debug)]
pub(crate) struct Target {
    pub disk: PathBuf,
    pub location: MetaLocation,
    /// The metadata file: the disk itself for internal metadata.
    pub file: File,
    pub meta_path: PathBuf,
    pub meta_kind: DeviceKind,
    pub disk_size_bytes: u64,
    /// Size of the metadata file or device (the disk size when internal).
    pub meta_size_bytes: u64,
    /// An external metadata file was created by this open.
    pub created: bool,
}

/// Size of the disk, opened read-only just to ask.
pub(crate) fn disk_size(disk: &Path) -> Result<u64, MetadataError> {
    let (_, _, size) = open_device(disk, Access::ReadOnly)?;
    Ok(size)
}

fn open_device(path: &Path, access: Access) -> Result<(File, DeviceKind, u64), MetadataError> {
    let file = OpenOptions::new()
        .read(true)
        .write(access != Access::ReadOnly)
        .create(access == Access::Create)
        .open(path)
        .map_err(io_err("open", path))?;
    let kind = device_kind(&file).map_err(io_err("inspect", path))?;
    let size = device_size_bytes(&file).map_err(io_err("determine the size of", path))?;
    Ok((file, kind, size))
}

fn same_file(a: &File, b: &File) -> io::Result<bool> {
    let (a, b) = (a.metadata()?, b.metadata()?);
    let same_inode = a.dev() == b.dev() && a.ino() == b.ino();
    // Two device nodes for one block device share rdev, not the inode.
    let same_blockdev = a.file_type().is_block_device() && b.file_type().is_block_device() && a.rdev() == b.rdev();
    Ok(same_inode || same_blockdev)
}

impl Target {
    pub(crate) fn open(disk: &Path, location: &MetaLocation, access: Access) -> Result<Self, MetadataError> {
        match location {
            MetaLocation::Internal => {
                let disk_access = if access == Access::Create { Access::ReadWrite } else { access };
                let (file, kind, size) = open_device(disk, disk_access)?;
                Ok(Self {
                    disk: disk.to_path_buf(),
                    location: location.clone(),
                    file,
                    meta_path: disk.to_path_buf(),
                    meta_kind: kind,
                    disk_size_bytes: size,
                    meta_size_bytes: size,
                    created: false,
                })
            }
            MetaLocation::External(meta_path) => {
                // The disk is only sized here; the I/O layer opens it for data.
                let (disk_file, _, disk_size_bytes) = open_device(disk, Access::ReadOnly)?;
                let existed = access == Access::Create && meta_path.exists();
                let (file, meta_kind, meta_size_bytes) = open_device(meta_path, access)?;
                if same_file(&disk_file, &file).map_err(io_err("inspect", meta_path))? {
                    return Err(MetadataError::SameFile { disk: disk.to_path_buf(), meta: meta_path.clone() });
                }
                Ok(Self {
                    disk: disk.to_path_buf(),
                    location: location.clone(),
                    file,
                    meta_path: meta_path.clone(),
                    meta_kind,
                    disk_size_bytes,
                    meta_size_bytes,
                    created: access == Access::Create && !existed,
                })
            }
        }
    }

    pub(crate) fn external(&self) -> bool {
        matches!(self.location, MetaLocation::External(_))
    }

    /// End of the metadata area: the last 4 KiB boundary of its device.
    pub(crate) fn meta_end(&self) -> u64 {
        round_down(self.meta_size_bytes, BLOCK_BYTES)
    }

    /// Absolute offset of `slot`, or `None` if the device is too small to
    /// hold the slots at all.
    pub(crate) fn slot_offset(&self, slot: Slot) -> Option<u64> {
        self.meta_end().checked_sub(2 * SLOT_BYTES).map(|a| a + slot.index() * SLOT_BYTES)
    }

    /// Reads and classifies both slots, `[A, B]`.
    pub(crate) fn read_slots(&self) -> Result<[SlotState; 2], MetadataError> {
        Ok([self.read_slot(Slot::A)?, self.read_slot(Slot::B)?])
    }

    fn read_slot(&self, slot: Slot) -> Result<SlotState, MetadataError> {
        // Too small for slots: nothing was ever written there.
        let Some(offset) = self.slot_offset(slot) else {
            return Ok(SlotState::Empty);
        };
        let mut buf = vec![0u8; SLOT_BYTES as usize];
        match self.file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(decode(&buf)),
            // Only possible if the device shrank under us; report it as a
            // bad slot, not an I/O failure.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Ok(SlotState::Bad(format!("short read at offset {offset}")))
            }
            // Anything else (EIO...) is not evidence of a torn write; do not
            // silently fall back to the other slot.
            Err(e) => Err(io_err("read the superblock from", &self.meta_path)(e)),
        }
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), MetadataError> {
        self.file.write_all_at(buf, offset).map_err(io_err("write metadata to", &self.meta_path))
    }

    pub(crate) fn sync(&self) -> Result<(), MetadataError> {
        self.file.sync_data().map_err(io_err("sync metadata to", &self.meta_path))
    }

    /// Writes zeros over `[offset, offset + len)`.
    pub(crate) fn zero(&self, offset: u64, len: u64) -> Result<(), MetadataError> {
        let zeros = vec![0u8; CHUNK_BYTES.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK_BYTES);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Whether any byte in `[offset, offset + len)` is non-zero.
    pub(crate) fn any_nonzero(&self, offset: u64, len: u64) -> Result<bool, MetadataError> {
        let mut buf = vec![0u8; CHUNK_BYTES.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK_BYTES) as usize;
            self.file.read_exact_at(&mut buf[..n], offset + done).map_err(io_err("read", &self.meta_path))?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(true);
            }
            done += n as u64;
        }
        Ok(false)
    }
}
