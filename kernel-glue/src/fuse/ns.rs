//! The FUSE daemon's own mount namespace, and the orphans a dead daemon
//! leaves (issue 23, point 8).
//!
//! Why: a process that dies tears down its mount namespace if it holds
//! the last reference, and it does so *before* its open files are closed
//! (both are deferred to the exiting task's task_work, which runs newest
//! first). If the FUSE daemon shares a namespace with an ext4 mounted on
//! its loop device (clusterd and its children under `ip netns exec`, or a
//! systemd unit with private mounts) and is the last of them to die, the
//! unmount's final flush goes to the loop device, then to the FUSE
//! connection whose `/dev/fuse` descriptor only this same, exiting task
//! would close: it waits on itself forever (`do_exit → cleanup_mnt →
//! ext4_kill_sb → sync_filesystem → blkdev_issue_flush`). SIGKILL has no
//! exit path to abort the connection from, so the daemon moves into a
//! mount namespace of its own ([`isolate`]) before it mounts anything:
//! then no filesystem on its device is ever in a namespace whose teardown
//! its own exit performs, and whoever unmounts that ext4 waits only until
//! the daemon's exit closes `/dev/fuse`, which aborts the connection.
//!
//! The new namespace is pinned by a bind mount of its nsfs file on
//! `fuse-PID.mntns` in the caller's namespace, as `ip netns` pins network
//! namespaces: the FUSE mount then outlives a daemon that died alone, so
//! the loop device's `backing_file` keeps naming `…/fuse-PID/volume`
//! (clusterd reads the daemon's pid there), exactly as when the mount was
//! in the caller's namespace; the pin goes with the caller's namespace, at
//! a clean detach, or when the orphan is released.
//!
//! **Invariant:** the daemon's namespace holds no filesystem on a loop or
//! nbd device: those copied from the caller are unmounted at once, and
//! mounts made later in the caller's namespace do not propagate in.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Block device majors whose filesystems the daemon's namespace drops.
const LOOP_MAJOR: u32 = 7;
const NBD_MAJOR: u32 = 43;

/// The daemon runs in its own mount namespace, pinned at `pin`.
#[derive(Debug)]
pub struct Isolation {
    /// The caller's mount namespace, to unpin from.
    outer: File,
    pin: PathBuf,
}

impl Isolation {
    pub fn pin(&self) -> &Path {
        &self.pin
    }

    /// Drops the pin (from the caller's namespace), so the namespace goes
    /// away once the daemon exits. Best effort: a pin left behind is
    /// released with the orphan or by the next attach in this directory.
    pub fn release(self) {
        if let Err(e) = in_namespace(&self.outer, &[Op::Umount(&self.pin), Op::Umount(&self.pin)]) {
            tracing::debug!(pin = %self.pin.display(), error = %e, "unpinning the mount namespace");
        }
        let _ = std::fs::remove_file(&self.pin);
    }
}

/// The pin file for a daemon whose FUSE mount point is `mountpoint`.
pub fn pin_path(mountpoint: &Path) -> PathBuf {
    mountpoint.with_extension("mntns")
}

/// Whether this process runs one thread: only then does `unshare` move
/// the whole process (it moves the calling thread only).
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim() == "1")))
        .unwrap_or(false)
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|e| Error::Invalid { what: "path", reason: e.to_string() })
}

/// Moves this process into a private mount namespace pinned at
/// `pin_path(mountpoint)`. Returns `None` (and changes nothing) when the
/// process already runs several threads (a library caller; the
/// replicator's attach daemon calls this before its first thread).
pub fn isolate(mountpoint: &Path) -> Result<Option<Isolation>> {
    if !single_threaded() {
        tracing::info!(
            "FUSE attach from a multithreaded process: staying in the caller's mount namespace (a host-wide kill may hang its unmount)"
        );
        return Ok(None);
    }
    let outer_path = Path::new("/proc/self/ns/mnt");
    let outer = File::open(outer_path).map_err(|e| Error::io("open", outer_path, e))?;
    // Absolute: the helper that pins it resolves it after `setns`, which
    // moves it to the namespace's root.
    let pin = std::path::absolute(pin_path(mountpoint)).map_err(|e| Error::io("resolve", mountpoint, e))?;
    if let Some(dir) = pin.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    }
    std::fs::write(&pin, b"").map_err(|e| Error::io("create", &pin, e))?;
    // SAFETY: unshare takes flags only; the process has one thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } < 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&pin);
        return Err(Error::io("unshare the mount namespace for", mountpoint, e));
    }
    // Nothing mounted here propagates out, nothing mounted outside later
    // propagates in.
    // SAFETY: constant NUL-terminated strings; null fstype and data are allowed for a propagation change.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r < 0 {
        return Err(Error::io("make private the mounts of", "/", std::io::Error::last_os_error()));
    }
    drop_block_mounts();
    let ns_file = cstr(&PathBuf::from(format!("/proc/{}/ns/mnt", std::process::id())))?;
    let iso = Isolation { outer, pin };
    if let Err(e) = in_namespace(&iso.outer, &[Op::Pin(&ns_file, &iso.pin)]) {
        // Still isolated; only the path in `backing_file` will not survive
        // the daemon.
        tracing::warn!(pin = %iso.pin.display(), error = %e, "could not pin the FUSE daemon's mount namespace");
        let _ = std::fs::remove_file(&iso.pin);
    }
    Ok(Some(iso))
}

/// Lazily unmounts, in this (new) namespace, every filesystem on a loop or
/// nbd device: another volume's filesystem must neither be kept busy by
/// this daemon nor be unmounted (and flushed) by its exit.
fn drop_block_mounts() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut targets: Vec<String> = info
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_, _, dev, _, target) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let major: u32 = dev.split(':').next()?.parse().ok()?;
            (major == LOOP_MAJOR || major == NBD_MAJOR).then(|| crate::mount::unescape(target))
        })
        .collect();
    // Children before parents.
    targets.reverse();
    for t in targets {
        if let Ok(c) = CString::new(t.as_bytes()) {
            // SAFETY: NUL-terminated path that outlives the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

enum Op<'a> {
    /// Bind the nsfs file on the pin (making the pin's own mount private
    /// first if the kernel refuses a pin on a shared mount).
    Pin(&'a CString, &'a Path),
    /// Lazy unmount (a missing mount is not an error).
    Umount(&'a Path),
}

/// Runs `ops` in mount namespace `ns` from a forked child (`setns` needs a
/// process whose filesystem context is not shared with other threads).
/// The child makes raw system calls only, as a child of a multithreaded
/// process must.
fn in_namespace(ns: &File, ops: &[Op]) -> std::io::Result<()> {
    let paths: Vec<CString> = ops
        .iter()
        .map(|op| match op {
            Op::Pin(_, p) | Op::Umount(p) => CString::new(p.as_os_str().as_bytes()),
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let fd = ns.as_raw_fd();
    // SAFETY: fork duplicates this process; the child below only calls
    // setns, mount, umount2, reads errno and calls _exit, all
    // async-signal-safe, on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above: raw system calls on prepared, NUL-terminated data.
        unsafe {
            let errno = || *libc::__errno_location();
            if libc::setns(fd, libc::CLONE_NEWNS) < 0 {
                libc::_exit(errno().clamp(1, 255));
            }
            for (op, path) in ops.iter().zip(&paths) {
                let target = path.as_ptr();
                match op {
                    Op::Pin(src, _) => {
                        let bind = |s: *const libc::c_char| {
                            libc::mount(s, target, std::ptr::null(), libc::MS_BIND, std::ptr::null())
                        };
                        let private = || {
                            libc::mount(std::ptr::null(), target, std::ptr::null(), libc::MS_PRIVATE, std::ptr::null())
                        };
                        // A pin on a shared mount is refused (EINVAL): the
                        // pin becomes a private mount of its own first.
                        let pinned = bind(src.as_ptr()) == 0
                            || (errno() == libc::EINVAL
                                && bind(target) == 0
                                && private() == 0
                                && bind(src.as_ptr()) == 0);
                        if !pinned {
                            libc::_exit(errno().clamp(1, 255));
                        }
                    }
                    Op::Umount(_) => {
                        libc::umount2(target, libc::MNT_DETACH);
                    }
                }
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out pointer.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => Ok(()),
        Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
        None => Err(std::io::Error::other("the namespace helper was killed")),
    }
}

/// Drops a pin left by a dead daemon, from the caller's namespace.
pub fn unpin_here(pin: &Path) {
    if let Ok(c) = cstr(pin) {
        for _ in 0..2 {
            // SAFETY: NUL-terminated path that outlives the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = std::fs::remove_file(pin);
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(crate::mount::unescape(r"/srv/my\040mail"), "/srv/my mail");
        assert_eq!(crate::mount::unescape(r"/a\\b"), r"/a\\b");
        assert_eq!(crate::mount::unescape(r"/a\134b"), r"/a\b");
        assert_eq!(crate::mount::unescape("/plain"), "/plain");
    }
}
