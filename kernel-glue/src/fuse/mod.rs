//! The fallback path: the export as one file on a private FUSE mount
//! (`fs::VolumeFs`, served by fuser without libfuse), bound to a loop
//! device. `FuseLoop` owns the three pieces (NBD client, FUSE session,
//! loop device) and takes them down in the order that keeps "no write
//! after detach" true.

pub mod fs;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::error::{Error, Result};
use crate::limits::DETACH_DRAIN_MAX;
use crate::loopdev::LoopDevice;
use crate::nbd::Client;
use crate::DetachMode;

/// Name of the one file on the FUSE mount.
pub const VOLUME_FILE: &str = "volume";

/// An attached export on the fallback path.
pub struct FuseLoop {
    client: Client,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    loop_dev: Option<LoopDevice>,
    device: PathBuf,
}

impl FuseLoop {
    /// Mounts the FUSE filesystem on `mountpoint` (created if missing) and
    /// binds its file to a free loop device.
    pub fn attach(client: Client, mountpoint: &Path, direct_io: bool) -> Result<FuseLoop> {
        if !Path::new("/dev/fuse").exists() {
            return Err(Error::FuseUnavailable { reason: "/dev/fuse does not exist (modprobe fuse)".into() });
        }
        std::fs::create_dir_all(mountpoint).map_err(|e| Error::io("create", mountpoint, e))?;
        let read_only = client.info().read_only();
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("replicator".into()),
            MountOption::Subtype("replicator".into()),
            MountOption::DefaultPermissions,
            MountOption::NoExec,
            MountOption::NoAtime,
            if read_only { MountOption::RO } else { MountOption::RW },
        ];
        config.acl = SessionACL::Owner;
        // Handlers never wait on the network (replies come from the NBD
        // reader thread) except while reconnecting; a second thread keeps
        // reads flowing then.
        config.n_threads = Some(2);
        let fs = fs::VolumeFs::new(client.clone(), VOLUME_FILE);
        let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|e| match e.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENOENT) => Error::FuseUnavailable { reason: e.to_string() },
            _ => Error::io("mount FUSE on", mountpoint, e),
        })?;
        let mut me = FuseLoop {
            client,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            loop_dev: None,
            device: PathBuf::new(),
        };
        let file = mountpoint.join(VOLUME_FILE);
        match LoopDevice::attach(&file, read_only, direct_io) {
            Ok(dev) => {
                tracing::info!(device = %dev.path().display(), direct_io = dev.direct_io(), "loop device bound to the FUSE file");
                me.device = dev.path().to_path_buf();
                me.loop_dev = Some(dev);
                Ok(me)
            }
            Err(e) => {
                me.teardown_fuse();
                Err(e)
            }
        }
    }

    pub fn device(&self) -> &Path {
        &self.device
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn direct_io(&self) -> bool {
        self.loop_dev.as_ref().is_some_and(LoopDevice::direct_io)
    }

    /// Takes the device away. The caller has checked that it is unused
    /// (clean) or decided to take it anyway (forced).
    ///
    /// Order: (clean only) write back the loop device's cache; shut the
    /// NBD gate (clean: drain, FLUSH, DISC; forced: fail in-flight I/O) so
    /// no later write can reach the volume; unbind the loop device (the
    /// kernel defers this while a filesystem still holds it); abort and
    /// unmount FUSE.
    pub fn detach(mut self, mode: DetachMode) -> Result<()> {
        let mut first_err = None;
        if mode == DetachMode::Clean {
            if let Some(dev) = &self.loop_dev {
                if let Err(e) = dev.sync() {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Err(e) = self.client.close(mode == DetachMode::Clean) {
            tracing::warn!(error = %e, "closing the NBD connection was not clean");
            if mode == DetachMode::Clean {
                first_err.get_or_insert(Error::Timeout {
                    what: format!("the final flush of {}", self.device.display()),
                    seconds: DETACH_DRAIN_MAX.as_secs(),
                });
            }
        }
        if let Some(dev) = self.loop_dev.take() {
            if let Err(e) = dev.detach() {
                first_err.get_or_insert(e);
            }
        }
        self.teardown_fuse();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn teardown_fuse(&mut self) {
        // Abort first when forced or stuck: a loop device that outlives us
        // (deferred unbind under a mounted filesystem) must see errors, not
        // a FUSE connection that never answers.
        abort_fuse_connection(&self.mountpoint);
        if let Ok(c) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
            // SAFETY: NUL-terminated path that outlives the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if let Some(session) = self.session.take() {
            // Joining waits for the session thread to see the unmount; bound it.
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || drop(tx.send(session.join())));
            if rx.recv_timeout(DETACH_DRAIN_MAX).is_err() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "FUSE session did not end in time");
            }
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
    }
}

/// Aborts the FUSE connection mounted at `mountpoint` through fusectl
/// (mounted on demand): every outstanding and future request fails at once.
fn abort_fuse_connection(mountpoint: &Path) {
    let Ok(md) = std::fs::metadata(mountpoint) else { return };
    let dev = md.dev();
    if libc::major(dev) != 0 {
        return;
    }
    let conns = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(conns).map(|mut d| d.next().is_none()).unwrap_or(true) {
        let (src, dst, fs) = (c"fusectl", c"/sys/fs/fuse/connections", c"fusectl");
        // SAFETY: constant NUL-terminated strings; no data argument.
        unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    }
    let abort = conns.join(libc::minor(dev).to_string()).join("abort");
    if let Err(e) = std::fs::write(&abort, b"1") {
        tracing::debug!(path = %abort.display(), error = %e, "could not abort the FUSE connection");
    }
}

/// Releases what a dead attach daemon left behind for loop device
/// `device`: the loop binding and its (now dead) FUSE mount. No I/O can
/// reach the volume any more (the FUSE connection died with the daemon);
/// this only frees the device and the mount point.
pub fn release_orphan(device: &Path) -> Result<()> {
    let name = device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok();
    crate::loopdev::detach_path(device)?;
    if let Some(mountpoint) = backing.as_deref().map(str::trim).and_then(|b| Path::new(b).parent()) {
        if mountpoint.file_name().is_some_and(|n| n.to_string_lossy().starts_with("fuse-")) {
            abort_fuse_connection(mountpoint);
            if let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes()) {
                // SAFETY: NUL-terminated path that outlives the call.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = std::fs::remove_dir(mountpoint);
        }
    }
    Ok(())
}
