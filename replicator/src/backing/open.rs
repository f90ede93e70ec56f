//! Opening a backing store: configuration checks, the buffered and O_DIRECT
//! descriptors, and the probes that decide the capabilities.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::AtomicBool;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::buf::BUF_ALIGN;
use super::shared::{Counters, Files, Shared};
use super::{BackingConfig, BackingError};
use crate::device::{device_kind, device_size_bytes, DeviceKind};

/// Largest ring we accept; the kernel's own limit is 32768 entries.
const MAX_RING_ENTRIES: u32 = 32768;
/// More threads than this cannot help: each one owns a whole ring.
const MAX_IO_THREADS: usize = 64;

// BLKSSZGET = _IO(0x12, 104): logical block size as an int.
nix::ioctl_read_bad!(blk_get_logical_block_size, 0x1268, libc::c_int);

pub(super) fn open_shared(cfg: &BackingConfig) -> Result<Shared, BackingError> {
    check_config(cfg)?;
    let path = &cfg.path;
    let access = if cfg.read_only { "read" } else { "read and write" };

    let buffered =
        options(cfg, 0).open(path).map_err(|source| BackingError::Open { path: path.clone(), access, source })?;
    let kind = device_kind(&buffered).map_err(|source| BackingError::NotFileOrDevice { path: path.clone(), source })?;
    let size = device_size_bytes(&buffered).map_err(|source| BackingError::Stat { path: path.clone(), source })?;
    // A regular file shorter than the data area reads as zeros past its end
    // (and grows on write); a block device cannot grow, so refuse it now
    // rather than fail every write near the end.
    if kind == DeviceKind::BlockDevice && size < cfg.data_size_bytes {
        return Err(BackingError::TooSmall { path: path.clone(), size, data_size: cfg.data_size_bytes });
    }

    let direct = if cfg.direct_io {
        let file = options(cfg, libc::O_DIRECT).open(path).map_err(|source| {
            if source.raw_os_error() == Some(libc::EINVAL) {
                BackingError::DirectIoUnsupported { path: path.clone(), source }
            } else {
                BackingError::Open { path: path.clone(), access, source }
            }
        })?;
        Some(file)
    } else {
        None
    };

    let direct_align = match kind {
        DeviceKind::BlockDevice => logical_block_size(&buffered),
        // Files: the fs block size is at most 4096 on any setup we support
        // and the device below has a logical block size dividing it.
        DeviceKind::RegularFile => BUF_ALIGN as u64,
    };
    assert!(direct_align.is_power_of_two(), "O_DIRECT alignment {direct_align} must be a power of two");
    let block_status = kind == DeviceKind::RegularFile && seek_data_works(&buffered);
    let writable = !cfg.read_only;

    Ok(Shared {
        files: Files { buffered, direct, direct_align },
        kind,
        data_size: cfg.data_size_bytes,
        read_only: cfg.read_only,
        block_status,
        // Optimistic: the first EOPNOTSUPP turns these off for good.
        trim_ok: AtomicBool::new(writable),
        zero_range_ok: AtomicBool::new(writable),
        dontcache_ok: AtomicBool::new(true),
        busy_poll: cfg.busy_poll,
        stats: Counters::default(),
    })
}

fn check_config(cfg: &BackingConfig) -> Result<(), BackingError> {
    if cfg.busy_poll > std::time::Duration::from_micros(super::BUSY_POLL_MAX_US.into()) {
        return Err(BackingError::InvalidConfig(format!(
            "busy_poll is {:?}; use at most {} µs",
            cfg.busy_poll,
            super::BUSY_POLL_MAX_US
        )));
    }
    if !(2..=MAX_RING_ENTRIES).contains(&cfg.ring_entries) {
        return Err(BackingError::InvalidConfig(format!(
            "ring_entries is {}; use a value from 2 to {MAX_RING_ENTRIES} (256 is a good default)",
            cfg.ring_entries
        )));
    }
    if !(1..=MAX_IO_THREADS).contains(&cfg.io_threads) {
        return Err(BackingError::InvalidConfig(format!(
            "io_threads is {}; use a value from 1 to {MAX_IO_THREADS}",
            cfg.io_threads
        )));
    }
    Ok(())
}

fn options(cfg: &BackingConfig, extra_flags: libc::c_int) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(!cfg.read_only).custom_flags(libc::O_CLOEXEC | extra_flags);
    options
}

/// The block device's logical block size: the O_DIRECT alignment unit. A
/// failing ioctl falls back to 4096, which every device accepts.
fn logical_block_size(file: &File) -> u64 {
    let mut size: libc::c_int = 0;
    // SAFETY: the fd is an open block device for the lifetime of `file`, and
    // BLKSSZGET writes one int through the pointer, which points at a live,
    // aligned local.
    let res = unsafe { blk_get_logical_block_size(file.as_raw_fd(), &mut size) };
    match (res, u64::try_from(size)) {
        (Ok(_), Ok(size)) if size.is_power_of_two() && (512..=BUF_ALIGN as u64).contains(&size) => size,
        _ => BUF_ALIGN as u64,
    }
}

/// Whether SEEK_DATA is implemented: ENXIO (no data at all) counts as yes,
/// EINVAL (unsupported whence) as no.
fn seek_data_works(file: &File) -> bool {
    match lseek(file.as_raw_fd(), 0, Whence::SeekData) {
        Ok(_) | Err(Errno::ENXIO) => true,
        Err(_) => false,
    }
}
