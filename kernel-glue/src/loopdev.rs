//! Loop devices through their ioctls: find a free one
//! (`LOOP_CTL_GET_FREE`), bind a file with `LOOP_CONFIGURE` (block size
//! and direct I/O in one call, Linux 5.8+), and unbind with `LOOP_CLR_FD`.
//!
//! `LoopDevice` owns an open descriptor of `/dev/loopN` for as long as the
//! binding should last; it does not unbind on drop (a detach is an explicit,
//! checked decision).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::limits::{BLOCK_SIZE_BYTES, DEVICE_CLAIM_ATTEMPTS_MAX};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LOOP_MAJOR: u32 = 7;

/// `struct loop_info64` from linux/loop.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from linux/loop.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// A configured loop device.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    file: File,
    direct_io: bool,
}

fn ioctl_arg(f: &File, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the loop ioctls used with this helper take an integer argument
    // (or none); no memory is passed to the kernel.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Creates `/dev/loopN` if the kernel has the device but the container's
/// /dev lacks the node.
fn ensure_node(path: &Path, index: u32) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| Error::Invalid { what: "device path", reason: e.to_string() })?;
    // SAFETY: mknod with a NUL-terminated path; makedev is a pure computation.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, libc::makedev(LOOP_MAJOR, index)) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(Error::io("create device node", path, e));
        }
    }
    Ok(())
}

impl LoopDevice {
    /// Binds `backing` to a free loop device with 4 KiB logical blocks,
    /// asking for direct I/O when `direct_io` (the kernel falls back to
    /// buffered I/O if the file cannot do it; `direct_io()` tells which).
    pub fn attach(backing: &Path, read_only: bool, direct_io: bool) -> Result<LoopDevice> {
        let ctl_path = Path::new("/dev/loop-control");
        let ctl =
            OpenOptions::new().read(true).write(true).open(ctl_path).map_err(|e| Error::io("open", ctl_path, e))?;
        let mut last_err = None;
        for _ in 0..DEVICE_CLAIM_ATTEMPTS_MAX {
            let index =
                ioctl_arg(&ctl, LOOP_CTL_GET_FREE, 0).map_err(|e| Error::ioctl("LOOP_CTL_GET_FREE", ctl_path, e))?;
            let index =
                u32::try_from(index).map_err(|_| Error::Invalid { what: "loop index", reason: index.to_string() })?;
            let path = PathBuf::from(format!("/dev/loop{index}"));
            ensure_node(&path, index)?;
            match Self::configure(&path, backing, read_only, direct_io) {
                Ok(dev) => return Ok(dev),
                // Someone else bound it between GET_FREE and CONFIGURE: try the next.
                Err(Error::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
                    last_err = Some(source);
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::ioctl(
            "LOOP_CONFIGURE",
            "/dev/loop*",
            last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)),
        ))
    }

    fn configure(path: &Path, backing: &Path, read_only: bool, direct_io: bool) -> Result<LoopDevice> {
        let dev = OpenOptions::new().read(true).write(!read_only).open(path).map_err(|e| Error::io("open", path, e))?;
        if !dev.metadata().map_err(|e| Error::io("stat", path, e))?.file_type().is_block_device() {
            return Err(Error::Invalid {
                what: "loop device",
                reason: format!("{} is not a block device", path.display()),
            });
        }
        let open_backing = |odirect: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if odirect {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(backing)
        };
        // O_DIRECT at open is what lets loop use direct I/O on older kernels;
        // a file that refuses it is still usable buffered.
        let file = match direct_io.then(|| open_backing(true)) {
            Some(Ok(f)) => f,
            _ => open_backing(false).map_err(|e| Error::io("open", backing, e))?,
        };
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: if read_only { LO_FLAGS_READ_ONLY } else { 0 } | if direct_io { LO_FLAGS_DIRECT_IO } else { 0 },
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        let name = backing.as_os_str().as_bytes();
        let n = name.len().min(info.lo_file_name.len() - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        let fd = u32::try_from(file.as_raw_fd())
            .map_err(|_| Error::Invalid { what: "descriptor", reason: "negative".into() })?;
        let config = LoopConfig { fd, block_size: BLOCK_SIZE_BYTES, info, reserved: [0; 8] };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
        // `LoopConfig` mirrors exactly (size asserted at compile time); the
        // pointer is valid for the duration of the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig) };
        if r < 0 {
            return Err(Error::ioctl("LOOP_CONFIGURE", path, io::Error::last_os_error()));
        }
        // The kernel holds its own reference to the backing file now.
        drop(file);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let direct_io =
            std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).map(|s| s.trim() == "1").unwrap_or(false);
        Ok(LoopDevice { path: path.to_path_buf(), file: dev, direct_io })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the kernel actually uses direct I/O on the backing file.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Writes back the device's page cache (and makes the backing file
    /// durable: loop turns a flush into fsync of the file).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io("sync", &self.path, e))
    }

    /// Unbinds the file. If the device is still open elsewhere (a mounted
    /// filesystem), the kernel unbinds it when the last user closes it.
    pub fn detach(self) -> Result<()> {
        clear(&self.path, &self.file)
    }
}

fn clear(path: &Path, f: &File) -> Result<()> {
    match ioctl_arg(f, LOOP_CLR_FD, 0) {
        Ok(_) => Ok(()),
        // Already unbound (a second detach, or autoclear won the race).
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(Error::ioctl("LOOP_CLR_FD", path, e)),
    }
}

/// Unbinds loop device `path` (for `detach` from another process).
pub fn detach_path(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let md = f.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !md.file_type().is_block_device() || libc::major(md.rdev()) != LOOP_MAJOR {
        return Err(Error::Invalid { what: "loop device", reason: format!("{} is not a loop device", path.display()) });
    }
    clear(path, &f)
}

/// What a bound loop device says about its backing file: the file's
/// device number (a FUSE file: `0:N`, N naming its connection in
/// /sys/fs/fuse/connections) and the name given at binding
/// (`lo_file_name`, at most 63 bytes). Both stay as they were when the
/// file's mount namespace is gone, unlike sysfs `backing_file`. `None`:
/// not bound (or not a loop device).
pub fn backing(path: &Path) -> Option<(u64, String)> {
    let f = File::open(path).ok()?;
    let mut info = std::mem::MaybeUninit::<LoopInfo64>::zeroed();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, which
    // `LoopInfo64` mirrors exactly (size asserted at compile time), into
    // memory valid for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64, info.as_mut_ptr()) };
    if r < 0 {
        return None;
    }
    // SAFETY: the kernel filled the struct; all-zero is valid for it anyway.
    let info = unsafe { info.assume_init() };
    let len = info.lo_file_name.iter().position(|b| *b == 0).unwrap_or(info.lo_file_name.len());
    Some((info.lo_device, String::from_utf8_lossy(&info.lo_file_name[..len]).into_owned()))
}
