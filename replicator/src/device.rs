//! Facts about a backing store that both the metadata and the I/O layer need:
//! whether it is a regular file or a block device, and how many bytes it holds.
//!
//! This is part of the I/O layer and one of the few places with `unsafe`
//! (the `BLKGETSIZE64` ioctl).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;

/// What kind of object backs a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    RegularFile,
    BlockDevice,
}

// BLKGETSIZE64 = _IOR(0x12, 114, size_t)
nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

/// Returns the kind of `file` or an error if it is neither a regular file nor
/// a block device.
pub fn device_kind(file: &File) -> io::Result<DeviceKind> {
    let file_type = file.metadata()?.file_type();
    if file_type.is_file() {
        Ok(DeviceKind::RegularFile)
    } else if file_type.is_block_device() {
        Ok(DeviceKind::BlockDevice)
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file or block device"))
    }
}

/// Size in bytes of a regular file or block device.
pub fn device_size_bytes(file: &File) -> io::Result<u64> {
    match device_kind(file)? {
        DeviceKind::RegularFile => Ok(file.metadata()?.len()),
        DeviceKind::BlockDevice => {
            let mut size_bytes: u64 = 0;
            // SAFETY: the fd is a valid open block device for the lifetime of
            // `file`, and BLKGETSIZE64 writes exactly one u64 through the
            // pointer, which points at a live, properly aligned local.
            unsafe { blk_get_size64(file.as_raw_fd(), &mut size_bytes) }.map_err(io::Error::from)?;
            Ok(size_bytes)
        }
    }
}

/// An exclusive advisory lock on a backing disk, held while a process
/// serves or rewrites it; released when dropped.
pub struct DiskLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the exclusive lock on `path`, failing at once if another process
/// holds it (a second `serve`, or `create-md` under a running server).
pub fn lock_disk(path: &std::path::Path) -> io::Result<DiskLock> {
    let file = File::open(path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DiskLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            Err(io::Error::new(io::ErrorKind::WouldBlock, "in use by another replicator process; stop it first"))
        }
        Err((_, errno)) => Err(io::Error::from(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_file_size_is_its_length() {
        let dir = std::env::temp_dir().join(format!("device-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let file = File::create(&path).unwrap();
        file.set_len(3 * 4096).unwrap();
        assert_eq!(device_kind(&file).unwrap(), DeviceKind::RegularFile);
        assert_eq!(device_size_bytes(&file).unwrap(), 3 * 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_disk_is_locked_by_one_holder_at_a_time() {
        let dir = std::env::temp_dir().join(format!("device-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        File::create(&path).unwrap().set_len(4096).unwrap();
        let first = lock_disk(&path).unwrap();
        let err = lock_disk(&path).err().expect("a second lock must fail");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(first);
        lock_disk(&path).expect("free again after the holder is gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
