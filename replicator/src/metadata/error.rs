//! Errors of the metadata module. Every error a user can cause says what to
//! do about it and names the path involved.

use std::io;
use std::path::{Path, PathBuf};

use super::MetaLocation;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "no replicator metadata {}{detail}; run `replicator create-md --disk {} ...` first",
        place(.disk, .location),
        .disk.display()
    )]
    NoMetadata {
        disk: PathBuf,
        location: MetaLocation,
        /// Extra context, starting with ": " (may be empty).
        detail: String,
    },

    #[error(
        "replicator metadata {} is corrupt: both superblock slots are unusable \
         (slot A: {slot_a}; slot B: {slot_b}); restore the metadata from the peer, \
         or re-create it with `replicator create-md --disk {} ... --force`, which discards \
         the replication state (generation ids, dirty bitmap) and requires a full resync",
        place(.disk, .location),
        .disk.display()
    )]
    Corrupt { disk: PathBuf, location: MetaLocation, slot_a: String, slot_b: String },

    #[error(
        "replicator metadata {} was written by a newer replicator (format {version}, \
         this build reads {}); upgrade replicator",
        place(.disk, .location),
        super::layout::FORMAT_VERSION
    )]
    NewerVersion { disk: PathBuf, location: MetaLocation, version: u32 },

    #[error(
        "replicator metadata {} cannot be used by this build: {reason}; upgrade replicator",
        place(.disk, .location)
    )]
    Unsupported { disk: PathBuf, location: MetaLocation, reason: String },

    #[error(
        "replicator metadata {} is inconsistent with the device: {reason}; re-create it \
         with `replicator create-md --disk {} ... --force` (discards the replication state \
         and requires a full resync)",
        place(.disk, .location),
        .disk.display()
    )]
    Inconsistent { disk: PathBuf, location: MetaLocation, reason: String },

    #[error(
        "{} is {actual} bytes, but its replicator metadata {} was created for {recorded} \
         bytes: the disk was resized; restore its size to {recorded} bytes, or re-create the \
         metadata with `replicator create-md --disk {} ... --force` (discards the replication \
         state and requires a full resync)",
        .disk.display(),
        place(.disk, .location),
        .disk.display()
    )]
    SizeMismatch { disk: PathBuf, location: MetaLocation, recorded: u64, actual: u64 },

    #[error(
        "replicator metadata already exists {} ({existing}); refusing \
         to overwrite it. `--force` overwrites it and discards its replication state \
         (generation ids, dirty bitmap), which requires a full resync",
        place(.disk, .location)
    )]
    AlreadyExists {
        disk: PathBuf,
        location: MetaLocation,
        /// What was found, e.g. "volume 1b4e…, seq 7".
        existing: String,
    },

    #[error(
        "internal metadata would overwrite the last {} MiB ({overwrite_bytes} bytes) of {}, \
         which holds non-zero data but no replicator metadata (probably the end of a \
         filesystem); shrink the filesystem by at least that much, use external metadata, \
         or pass --force to overwrite it",
        .overwrite_bytes.div_ceil(1 << 20),
        .disk.display()
    )]
    WouldOverwriteData { disk: PathBuf, overwrite_bytes: u64 },

    #[error(
        "{} already exists and holds data that is not replicator metadata; choose another \
         metadata file or pass --force to overwrite it",
        .path.display()
    )]
    ExternalNotEmpty { path: PathBuf },

    #[error(
        "external metadata {} is the data disk {} itself; use internal metadata or a \
         separate file",
        .meta.display(),
        .disk.display()
    )]
    SameFile { disk: PathBuf, meta: PathBuf },

    #[error(
        "{} is too small: it is {size} bytes, but {}at least 1 MiB of data needs \
         {needed} bytes; use a larger device{}",
        .disk.display(),
        metadata_phrase(*.metadata_bytes),
        if *.metadata_bytes > 0 { " or external metadata" } else { "" }
    )]
    DiskTooSmall { disk: PathBuf, size: u64, metadata_bytes: u64, needed: u64 },

    #[error(
        "external metadata device {} is too small: it is {size} bytes, but the metadata \
         needs {needed} bytes; use a larger device or a regular file",
        .path.display()
    )]
    MetaDeviceTooSmall { path: PathBuf, size: u64, needed: u64 },

    #[error("invalid metadata parameter: {0}")]
    InvalidParameter(String),

    #[error("replicator metadata {} was opened read-only; it cannot be updated", place(.disk, .location))]
    ReadOnly { disk: PathBuf, location: MetaLocation },

    /// A caller's update would produce a superblock that open would refuse.
    #[error("refusing to write a superblock that would not open again: {reason}")]
    InvalidUpdate { reason: String },
}

/// "on /dev/sdb (internal)" or "in /var/lib/x.md (external, for /dev/sdb)".
pub(crate) fn place(disk: &Path, location: &MetaLocation) -> String {
    match location {
        MetaLocation::Internal => format!("on {} (internal)", disk.display()),
        MetaLocation::External(file) => {
            format!("in {} (external, for {})", file.display(), disk.display())
        }
    }
}

fn metadata_phrase(metadata_bytes: u64) -> String {
    if metadata_bytes > 0 {
        format!("internal metadata ({metadata_bytes} bytes) plus ")
    } else {
        String::new()
    }
}

/// Shorthand for wrapping an `io::Error` with what was being done to which path.
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MetadataError {
    let path = path.to_path_buf();
    move |source| MetadataError::Io { action, path, source }
}
