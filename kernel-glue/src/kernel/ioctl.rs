//! The ioctl interface of nbd, for kernels without its netlink family
//! (before 4.12). Unlike netlink, `NBD_DO_IT` blocks for the life of the
//! connection, so a thread of this process must stay in it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::KernelTimeouts;
use crate::error::{Error, Result};
use crate::limits::BLOCK_SIZE_BYTES;
use crate::nbd::{ExportInfo, Stream};

const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

fn nbd_ioctl(f: &File, path: &Path, what: &'static str, req: libc::c_ulong, arg: libc::c_ulong) -> Result<()> {
    // SAFETY: every nbd ioctl used here takes an integer argument; no memory
    // is passed to the kernel.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(Error::ioctl(what, path, io::Error::last_os_error()));
    }
    Ok(())
}

/// A device connected through ioctls; `NBD_DO_IT` runs on `thread`.
pub struct IoctlDevice {
    pub path: PathBuf,
    file: File,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Configures `/dev/nbd<index>` with `sock` and starts the `NBD_DO_IT` thread.
pub fn connect(index: u32, sock: Stream, info: &ExportInfo, timeouts: KernelTimeouts) -> Result<IoctlDevice> {
    let path = super::device_path(index);
    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| Error::io("open", &path, e))?;
    if info.size_bytes % u64::from(BLOCK_SIZE_BYTES) != 0 {
        return Err(Error::Invalid {
            what: "export size",
            reason: format!("{} is not a multiple of {BLOCK_SIZE_BYTES}", info.size_bytes),
        });
    }
    nbd_ioctl(&file, &path, "NBD_SET_BLKSIZE", NBD_SET_BLKSIZE, libc::c_ulong::from(BLOCK_SIZE_BYTES))?;
    nbd_ioctl(
        &file,
        &path,
        "NBD_SET_SIZE_BLOCKS",
        NBD_SET_SIZE_BLOCKS,
        (info.size_bytes / u64::from(BLOCK_SIZE_BYTES)) as libc::c_ulong,
    )?;
    nbd_ioctl(&file, &path, "NBD_SET_TIMEOUT", NBD_SET_TIMEOUT, timeouts.io.as_secs().max(1) as libc::c_ulong)?;
    nbd_ioctl(&file, &path, "NBD_SET_FLAGS", NBD_SET_FLAGS, libc::c_ulong::from(info.transmission_flags))?;
    nbd_ioctl(&file, &path, "NBD_SET_SOCK", NBD_SET_SOCK, sock.as_raw_fd() as libc::c_ulong)?;
    let doit = file.try_clone().map_err(|e| Error::io("dup", &path, e))?;
    let thread = std::thread::Builder::new()
        .name(format!("nbd{index}-do-it"))
        .spawn(move || {
            let _keep = sock;
            // SAFETY: NBD_DO_IT takes no argument; it blocks until disconnect.
            let r = unsafe { libc::ioctl(doit.as_raw_fd(), NBD_DO_IT, 0) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
        .map_err(|e| Error::io("spawn NBD_DO_IT thread for", &path, e))?;
    Ok(IoctlDevice { path, file, thread: Some(thread) })
}

impl IoctlDevice {
    /// NBD_DISCONNECT + NBD_CLEAR_SOCK, then waits for `NBD_DO_IT` to return.
    pub fn disconnect(mut self) -> Result<()> {
        nbd_ioctl(&self.file, &self.path, "NBD_DISCONNECT", NBD_DISCONNECT, 0)?;
        let _ = nbd_ioctl(&self.file, &self.path, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Ok(())
    }
}
