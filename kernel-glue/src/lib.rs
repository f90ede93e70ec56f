//! kernel-glue: an NBD export as a local block device.
//!
//! [`attach`] connects to an NBD server and returns an [`Attachment`] whose
//! [`device`](Attachment::device) is `/dev/nbdN` (kernel path: the nbd
//! driver through generic netlink, `kernel`) or `/dev/loopN` (fallback: a
//! FUSE file bound to a loop device, `fuse`). [`Attachment::detach`] takes it
//! away, refusing while the device is in use unless forced. [`mount`] has
//! the helpers the cluster uses around it (fsck, mount, umount).
//!
//! The crate owns the NBD client it needs (`nbd`): a handshake for both
//! paths, and the transmission phase with per-request deadlines for the
//! FUSE path. It knows nothing of clusterd, the MTA or the replicator's
//! internals: it speaks NBD to any server.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod error;
pub mod fuse;
pub mod kernel;
pub mod limits;
pub mod loopdev;
pub mod mount;
pub mod nbd;
pub mod record;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use error::{Error, Result};
pub use nbd::{Endpoint, ExportInfo};

use kernel::KernelTimeouts;

/// Which kind of block device to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Kernel nbd if the driver is there, else FUSE + loop.
    Auto,
    /// Kernel nbd through generic netlink (ioctls on kernels without it).
    Kernel,
    /// FUSE + loop device.
    Fuse,
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        match s {
            "auto" => Ok(Method::Auto),
            "kernel" => Ok(Method::Kernel),
            "fuse" => Ok(Method::Fuse),
            _ => Err(Error::Invalid { what: "method", reason: format!("{s:?} (expected auto, kernel or fuse)") }),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Auto => "auto",
            Method::Kernel => "kernel",
            Method::Fuse => "fuse",
        })
    }
}

/// How to detach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachMode {
    /// Refuse if the device is mounted or claimed; write back and flush first.
    Clean,
    /// Take the device away even under a mounted filesystem: its later I/O fails.
    Force,
}

/// Everything `attach` needs.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    pub endpoint: Endpoint,
    pub export: String,
    pub method: Method,
    /// A request without a reply for this long fails with EIO (FUSE path)
    /// or marks the connection dead (kernel path).
    pub io_timeout: Duration,
    /// Kernel path: how long I/O waits on a dead connection for a
    /// reconnect (`NBD_CMD_RECONFIGURE`) before failing. Zero: fail at once.
    pub dead_conn_timeout: Duration,
    /// Kernel path: use `/dev/nbd<index>` instead of any free device.
    pub nbd_index: Option<u32>,
    /// FUSE path: the private mount point for the export's file.
    pub fuse_mountpoint: PathBuf,
    /// FUSE path: ask the loop device for direct I/O.
    pub direct_io: bool,
    /// Kernel path: use the ioctl interface even where netlink exists
    /// (it is the fallback for kernels before 4.12; this tests it on new ones).
    pub force_ioctl: bool,
    /// Kernel path (netlink): sockets to hand the kernel, used in parallel
    /// when the server allows it (NBD_FLAG_CAN_MULTI_CONN); otherwise one.
    pub connections: u32,
}

impl AttachConfig {
    pub fn new(endpoint: Endpoint, export: &str, fuse_mountpoint: PathBuf) -> AttachConfig {
        AttachConfig {
            endpoint,
            export: export.to_string(),
            method: Method::Auto,
            io_timeout: limits::IO_TIMEOUT_DEFAULT,
            dead_conn_timeout: Duration::ZERO,
            nbd_index: None,
            fuse_mountpoint,
            direct_io: true,
            force_ioctl: false,
            connections: 1,
        }
    }

    fn kernel_timeouts(&self) -> KernelTimeouts {
        KernelTimeouts { io: self.io_timeout, dead_conn: self.dead_conn_timeout }
    }
}

enum Kind {
    Kernel { index: u32, size_bytes: u64 },
    KernelIoctl(kernel::ioctl::IoctlDevice),
    Fuse(fuse::FuseLoop),
}

/// An export attached as a block device. Dropping it leaves the device in
/// place (a kernel device survives this process anyway); call `detach`.
pub struct Attachment {
    device: PathBuf,
    kind: Kind,
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment").field("device", &self.device).field("method", &self.method()).finish()
    }
}

/// Marks this thread (and threads it creates afterwards) as an I/O flusher
/// (`PR_SET_IO_FLUSHER`): memory reclaim will not recurse into the block
/// device this process serves, the deadlock every userspace block driver
/// on the same host must avoid. Needs CAP_SYS_RESOURCE.
pub fn set_io_flusher() -> std::io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to the export and makes a block device of it.
pub fn attach(cfg: &AttachConfig) -> Result<Attachment> {
    match cfg.method {
        Method::Kernel => attach_kernel(cfg),
        Method::Fuse => attach_fuse(cfg),
        Method::Auto => match attach_kernel(cfg) {
            Err(Error::KernelUnavailable { reason }) => {
                tracing::info!(%reason, "kernel nbd unavailable; using FUSE + loop");
                attach_fuse(cfg)
            }
            other => other,
        },
    }
}

fn attach_kernel(cfg: &AttachConfig) -> Result<Attachment> {
    let nl = if cfg.force_ioctl {
        Err(Error::KernelUnavailable { reason: "the ioctl interface was asked for".into() })
    } else {
        kernel::Nbd::open()
    };
    // Probe before connecting, so Auto falls back without touching the server.
    let nl = match nl {
        Ok(nl) => Some(nl),
        Err(Error::KernelUnavailable { reason }) => {
            // No nbd netlink family: the ioctl interface, if the driver is there.
            let legacy = Path::new("/dev/nbd0").exists() && (cfg.force_ioctl || Path::new("/sys/module/nbd").exists());
            if !legacy {
                return Err(Error::KernelUnavailable { reason });
            }
            None
        }
        Err(e) => return Err(e),
    };
    let (stream, info) = nbd::connect(&cfg.endpoint, &cfg.export, cfg.io_timeout)?;
    match nl {
        Some(mut nl) => {
            let backend = cfg.endpoint.uri(&cfg.export);
            let mut streams = vec![stream];
            let wanted = cfg.connections.clamp(1, limits::KERNEL_CONNECTIONS_MAX);
            if wanted > 1 && !info.can_multi_conn() {
                tracing::info!(wanted, "the server does not allow several connections; using one");
            } else {
                for _ in 1..wanted {
                    let (s, more) = nbd::connect(&cfg.endpoint, &cfg.export, cfg.io_timeout)?;
                    if more.size_bytes != info.size_bytes {
                        return Err(Error::Invalid {
                            what: "export",
                            reason: "size changed between connections".into(),
                        });
                    }
                    streams.push(s);
                }
            }
            let refs: Vec<&nbd::Stream> = streams.iter().collect();
            let index = nl.connect(cfg.nbd_index, &refs, &info, cfg.kernel_timeouts(), &backend)?;
            let device = kernel::device_path(index);
            tracing::info!(
                device = %device.display(),
                size = info.size_bytes,
                connections = streams.len(),
                "kernel nbd connected (netlink)"
            );
            tune_queue(index);
            Ok(Attachment { device, kind: Kind::Kernel { index, size_bytes: info.size_bytes } })
        }
        None => {
            let index = match cfg.nbd_index {
                Some(i) => i,
                None => kernel::free_index()
                    .ok_or_else(|| Error::KernelUnavailable { reason: "no free /dev/nbdN".into() })?,
            };
            let dev = kernel::ioctl::connect(index, stream, &info, cfg.kernel_timeouts())?;
            tracing::info!(device = %dev.path.display(), "kernel nbd connected (ioctl fallback)");
            Ok(Attachment { device: dev.path.clone(), kind: Kind::KernelIoctl(dev) })
        }
    }
}

/// Lets 1 MiB requests through whole where the queue allows it.
fn tune_queue(index: u32) {
    let q = PathBuf::from(format!("/sys/block/nbd{index}/queue"));
    let read = |n: &str| std::fs::read_to_string(q.join(n)).ok().and_then(|s| s.trim().parse::<u64>().ok());
    if let (Some(cur), Some(hw)) = (read("max_sectors_kb"), read("max_hw_sectors_kb")) {
        let want = 1024.min(hw);
        if cur < want {
            let _ = std::fs::write(q.join("max_sectors_kb"), want.to_string());
        }
    }
}

fn attach_fuse(cfg: &AttachConfig) -> Result<Attachment> {
    // What dead daemons left in this run directory goes first, from the
    // caller's namespace (where their pins and mounts are); then this
    // process leaves it, before its first thread (see `fuse::ns`).
    if let Some(run_dir) = cfg.fuse_mountpoint.parent() {
        fuse::release_orphans(run_dir);
    }
    let isolation = fuse::ns::isolate(&cfg.fuse_mountpoint)?;
    // Every thread that serves the device (FUSE session, NBD reader,
    // watchdog, dialer) descends from this helper thread, which marks
    // itself an I/O flusher first; the caller's own thread stays as it was.
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if let Err(e) = set_io_flusher() {
                    tracing::warn!(error = %e, "PR_SET_IO_FLUSHER failed (needs CAP_SYS_RESOURCE); memory reclaim may deadlock under pressure");
                }
                attach_fuse_here(cfg, isolation)
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn attach_fuse_here(cfg: &AttachConfig, isolation: Option<fuse::ns::Isolation>) -> Result<Attachment> {
    let client = match nbd::Client::connect(cfg.endpoint.clone(), &cfg.export, cfg.io_timeout) {
        Ok(c) => c,
        Err(e) => {
            if let Some(iso) = isolation {
                iso.release();
            }
            return Err(e);
        }
    };
    match fuse::FuseLoop::attach(client.clone(), &cfg.fuse_mountpoint, cfg.direct_io, isolation) {
        Ok(f) => Ok(Attachment { device: f.device().to_path_buf(), kind: Kind::Fuse(f) }),
        Err(e) => {
            let _ = client.close(false);
            Err(e)
        }
    }
}

impl Attachment {
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Kernel or Fuse (never Auto).
    pub fn method(&self) -> Method {
        match self.kind {
            Kind::Kernel { .. } | Kind::KernelIoctl(_) => Method::Kernel,
            Kind::Fuse(_) => Method::Fuse,
        }
    }

    /// Whether I/O needs this process to stay alive: FUSE serves every
    /// request, and the ioctl interface blocks a thread in `NBD_DO_IT`. A
    /// netlink-connected kernel device does not.
    pub fn needs_process(&self) -> bool {
        !matches!(self.kind, Kind::Kernel { .. })
    }

    /// The FUSE path's NBD client (for counters such as reconnects).
    pub fn fuse_client(&self) -> Option<&nbd::Client> {
        match &self.kind {
            Kind::Fuse(f) => Some(f.client()),
            _ => None,
        }
    }

    /// Kernel path (netlink): `(index, export size)` for [`kernel::keep_connected`].
    pub fn kernel_device(&self) -> Option<(u32, u64)> {
        match self.kind {
            Kind::Kernel { index, size_bytes } => Some((index, size_bytes)),
            _ => None,
        }
    }

    /// FUSE path: whether the loop device does direct I/O.
    pub fn direct_io(&self) -> Option<bool> {
        match &self.kind {
            Kind::Fuse(f) => Some(f.direct_io()),
            _ => None,
        }
    }

    /// Takes the device away. `Clean` fails with `Error::Busy` or
    /// `Error::Claimed` while it is in use (and then leaves it attached);
    /// `Force` takes it away regardless, and no write issued afterwards
    /// reaches the volume.
    pub fn detach(self, mode: DetachMode) -> std::result::Result<(), (Error, Option<Box<Attachment>>)> {
        if mode == DetachMode::Clean {
            if let Err(e) = mount::ensure_unused(&self.device) {
                return Err((e, Some(Box::new(self))));
            }
        }
        let device = self.device.clone();
        let r = match self.kind {
            Kind::Kernel { index, .. } => detach_kernel(index, mode),
            Kind::KernelIoctl(dev) => {
                if mode == DetachMode::Clean {
                    sync_device(&device).ok();
                }
                dev.disconnect()
            }
            Kind::Fuse(f) => f.detach(mode),
        };
        r.map_err(|e| (e, None))
    }
}

fn sync_device(device: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new().read(true).open(device).map_err(|e| Error::io("open", device, e))?;
    f.sync_all().map_err(|e| Error::io("sync", device, e))
}

/// Detaches kernel device `/dev/nbd<index>` (from any process: the kernel
/// holds the connection, not us).
pub fn detach_kernel(index: u32, mode: DetachMode) -> Result<()> {
    let device = kernel::device_path(index);
    if mode == DetachMode::Clean {
        mount::ensure_unused(&device)?;
        sync_device(&device)?;
    }
    kernel::Nbd::open()?.disconnect(index)
}
