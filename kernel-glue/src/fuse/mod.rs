//! The fallback path: the export as one file on a private FUSE mount
//! (`fs::VolumeFs`, served by fuser without libfuse), bound to a loop
//! device. `FuseLoop` owns the three pieces (NBD client, FUSE session,
//! loop device) and takes them down in the order that keeps "no write
//! after detach" true. The daemon serving it runs in a mount namespace of
//! its own (`ns`: why, and how it stays visible); [`release_orphans`]
//! frees what dead daemons left in a run directory.

pub mod fs;
pub mod ns;

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
    isolation: Option<ns::Isolation>,
}

impl FuseLoop {
    /// Mounts the FUSE filesystem on `mountpoint` (created if missing) and
    /// binds its file to a free loop device. `isolation` (from
    /// [`ns::isolate`]) is released with the mount.
    pub fn attach(
        client: Client,
        mountpoint: &Path,
        direct_io: bool,
        isolation: Option<ns::Isolation>,
    ) -> Result<FuseLoop> {
        let fail = |isolation: Option<ns::Isolation>, e: Error| {
            if let Some(iso) = isolation {
                iso.release();
            }
            Err(e)
        };
        if !Path::new("/dev/fuse").exists() {
            return fail(
                isolation,
                Error::FuseUnavailable { reason: "/dev/fuse does not exist (modprobe fuse)".into() },
            );
        }
        if let Err(e) = std::fs::create_dir_all(mountpoint) {
            return fail(isolation, Error::io("create", mountpoint, e));
        }
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
        let session = match fuser::spawn_mount(fs, mountpoint, &config) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir(mountpoint);
                return fail(
                    isolation,
                    match e.raw_os_error() {
                        Some(libc::ENODEV) | Some(libc::ENOENT) => Error::FuseUnavailable { reason: e.to_string() },
                        _ => Error::io("mount FUSE on", mountpoint, e),
                    },
                );
            }
        };
        let mut me = FuseLoop {
            client,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            loop_dev: None,
            device: PathBuf::new(),
            isolation,
        };
        let file = mountpoint.join(VOLUME_FILE);
        match LoopDevice::attach(&file, read_only, direct_io) {
            Ok(dev) => {
                tracing::info!(device = %dev.path().display(), direct_io = dev.direct_io(), "loop device bound to the FUSE file");
                // What identifies the binding once the daemon and its
                // namespace are gone (the sysfs path does not, the name
                // given at binding may be truncated): see `release_orphans`.
                if let Ok(md) = std::fs::metadata(&file) {
                    let record = binding_record(mountpoint);
                    let text =
                        format!("{}\n{}:{}\n", dev.path().display(), libc::major(md.dev()), libc::minor(md.dev()));
                    if let Err(e) = std::fs::write(&record, text) {
                        tracing::warn!(path = %record.display(), error = %e, "could not record the loop binding");
                    }
                }
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
        let _ = std::fs::remove_file(binding_record(&self.mountpoint));
        if let Some(iso) = self.isolation.take() {
            iso.release();
        }
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
/// `device`: the loop binding, its FUSE connection (aborted, so nothing
/// above the device waits on it), the namespace pin, the mount and its
/// mount point. No I/O can reach the volume any more (the FUSE connection
/// died with the daemon); this only frees the device and the mount point.
pub fn release_orphan(device: &Path) -> Result<()> {
    release_orphan_of(device, None)
}

/// `release_orphan`, with the dead daemon's mount point when known.
fn release_orphan_of(device: &Path, known: Option<&Path>) -> Result<()> {
    let name = device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let backing_file = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok();
    let status = crate::loopdev::backing(device);
    if let Some((dev, _)) = &status {
        abort_connection(*dev);
    }
    crate::loopdev::detach_path(device)?;
    // The path in sysfs, else (the daemon's namespace is gone) the name it
    // gave at binding.
    let mountpoint = known.map(Path::to_path_buf).or_else(|| {
        [backing_file.as_deref().map(str::trim), status.as_ref().map(|(_, n)| n.as_str())]
            .into_iter()
            .flatten()
            .filter_map(|b| Path::new(b).parent())
            .find(|m| daemon_pid_of(m).is_some())
            .map(Path::to_path_buf)
    });
    if let Some(mountpoint) = mountpoint {
        release_mountpoint(&mountpoint);
    }
    Ok(())
}

/// The pid in a mount point's name (`fuse-PID`).
fn daemon_pid_of(mountpoint: &Path) -> Option<u32> {
    mountpoint.file_name()?.to_str()?.strip_prefix("fuse-")?.parse().ok()
}

/// Aborts the FUSE connection of a backing file on device `dev` (`0:N`).
fn abort_connection(dev: u64) {
    if libc::major(dev) != 0 {
        return;
    }
    let abort = Path::new("/sys/fs/fuse/connections").join(libc::minor(dev).to_string()).join("abort");
    if abort.exists() {
        if let Err(e) = std::fs::write(&abort, b"1") {
            tracing::debug!(path = %abort.display(), error = %e, "could not abort the FUSE connection");
        }
    }
}

/// `fuse-PID.loop`: the loop device and its backing file's device number.
fn binding_record(mountpoint: &Path) -> PathBuf {
    mountpoint.with_extension("loop")
}

/// The loop device a dead daemon bound, from its binding record, if that
/// device is still bound to the same FUSE file.
fn recorded_binding(mountpoint: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(binding_record(mountpoint)).ok()?;
    let mut lines = text.lines();
    let device = PathBuf::from(lines.next()?.trim());
    let (major, minor) = lines.next()?.trim().split_once(':')?;
    let dev = libc::makedev(major.parse().ok()?, minor.parse().ok()?);
    let (bound, _) = crate::loopdev::backing(&device)?;
    (bound == dev).then_some(device)
}

/// Drops a dead daemon's namespace pin, its mount (if it is in ours) and
/// its mount point.
fn release_mountpoint(mountpoint: &Path) {
    let _ = std::fs::remove_file(binding_record(mountpoint));
    ns::unpin_here(&ns::pin_path(mountpoint));
    abort_fuse_connection(mountpoint);
    if let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir(mountpoint);
}

/// Whether process `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')))
        .unwrap_or(false)
}

/// Frees what dead attach daemons of `run_dir` left (a daemon's mount
/// point is `run_dir/fuse-PID`): loop devices still bound to their files
/// (found by the binding record `fuse-PID.loop`, by the sysfs path, or by
/// the name given at binding), their FUSE connections, namespace pins, mounts and
/// mount points. A daemon whose pid is alive is left alone. Called when
/// an attach starts; returns the loop devices it freed.
pub fn release_orphans(run_dir: &Path) -> Vec<PathBuf> {
    let dead = |m: &Path| m.parent() == Some(run_dir) && daemon_pid_of(m).is_some_and(|p| !process_alive(p));
    let mut freed = Vec::new();
    let mut free = |device: PathBuf, mountpoint: Option<&Path>| match release_orphan_of(&device, mountpoint) {
        Ok(()) => {
            // The attach record names a device that is free now.
            if let Ok(Some((pid, _))) = crate::record::read(run_dir, &device) {
                if !process_alive(pid) {
                    let _ = std::fs::remove_file(crate::record::path(run_dir, &device));
                }
            }
            freed.push(device)
        }
        Err(e) => tracing::warn!(device = %device.display(), error = %e, "could not free an orphaned loop device"),
    };
    // By binding record (also after the daemon's namespace is gone).
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "loop") {
                let mountpoint = path.with_extension("");
                if dead(&mountpoint) {
                    if let Some(device) = recorded_binding(&mountpoint) {
                        free(device, Some(&mountpoint));
                    }
                }
            }
        }
    }
    // By path (daemons without a record, namespace still there).
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let device = PathBuf::from("/dev").join(&name);
            let backing_file = std::fs::read_to_string(e.path().join("loop/backing_file")).ok();
            let given = crate::loopdev::backing(&device).map(|(_, n)| n);
            let orphan = [backing_file.as_deref().map(str::trim), given.as_deref()]
                .into_iter()
                .flatten()
                .filter(|b| b.ends_with(&format!("/{VOLUME_FILE}")))
                .filter_map(|b| Path::new(b).parent())
                .any(dead);
            if orphan {
                free(device, None);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for e in entries.flatten() {
            let path = e.path();
            let side = path.extension().is_some_and(|x| x == "mntns" || x == "loop");
            let mountpoint = if side { path.with_extension("") } else { path };
            if dead(&mountpoint) {
                release_mountpoint(&mountpoint);
            }
        }
    }
    if !freed.is_empty() {
        tracing::warn!(devices = ?freed, run_dir = %run_dir.display(), "freed loop devices of dead attach daemons");
    }
    freed
}
