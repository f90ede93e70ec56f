//! The kernel path: hand a negotiated NBD socket to the kernel's nbd
//! driver. `Nbd` speaks the nbd generic-netlink family (linux/nbd-netlink.h:
//! CONNECT, DISCONNECT, RECONFIGURE, and the LINK_DEAD notification);
//! `ioctl` is the fallback for kernels without it (before 4.12).
//!
//! After CONNECT the kernel owns the socket: no process has to stay
//! around for I/O to flow. A daemon restart is survived by
//! RECONFIGURE with a fresh socket within the dead-connection timeout
//! (`watch_and_reconnect`).

pub mod genl;
pub mod ioctl;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use genl::{attr_u32, attrs, Message, Socket};

use crate::error::{Error, Result};
use crate::limits::BLOCK_SIZE_BYTES;
use crate::nbd::{ExportInfo, Stream};

const FAMILY: &str = "nbd";
const MCAST_GROUP: &str = "nbd_mc_group";
const VERSION: u8 = 1;

const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;
const CMD_LINK_DEAD: u8 = 4;

const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_TIMEOUT: u16 = 4;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_CLIENT_FLAGS: u16 = 6;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_BACKEND_IDENTIFIER: u16 = 10;
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;

/// Timeouts handed to the kernel.
#[derive(Debug, Clone, Copy)]
pub struct KernelTimeouts {
    /// A request without a reply for this long fails (or, with a dead
    /// connection timeout, marks the connection dead).
    pub io: Duration,
    /// How long the kernel queues I/O on a dead connection waiting for
    /// RECONFIGURE before failing it. Zero: fail at once.
    pub dead_conn: Duration,
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The backend identifier the kernel shows for `/dev/nbd<index>`, if any.
pub fn backend_of(index: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/sys/block/nbd{index}/backend")).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// The path of `/dev/nbdN`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// Parses `/dev/nbdN` back into N.
pub fn index_of(device: &Path) -> Option<u32> {
    device.file_name()?.to_str()?.strip_prefix("nbd")?.parse().ok()
}

/// The nbd generic-netlink family, resolved.
pub struct Nbd {
    sock: Socket,
    family: u16,
    mcast_group: Option<u32>,
}

fn nl_err(what: &str, source: io::Error) -> Error {
    Error::Netlink { what: what.into(), source }
}

impl Nbd {
    /// Loads the driver if needed and resolves the family. `KernelUnavailable`
    /// when the driver or its netlink interface is missing.
    pub fn open() -> Result<Nbd> {
        if !Path::new("/sys/module/nbd").exists() {
            // Best effort: a host without kmod or the module fails just below.
            let _ = Command::new("modprobe").arg("nbd").env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin").output();
        }
        let mut sock = Socket::open().map_err(|e| nl_err("socket", e))?;
        let (family, groups) = sock.resolve(FAMILY).map_err(|e| Error::KernelUnavailable {
            reason: format!("generic netlink family {FAMILY:?} not found ({e}); is the nbd module loaded?"),
        })?;
        let mcast_group = groups.iter().find(|(n, _)| n == MCAST_GROUP).map(|(_, id)| *id);
        Ok(Nbd { sock, family, mcast_group })
    }

    fn sockets(m: &mut Message, sockets: &[&Stream]) -> Result<()> {
        m.begin_nested(ATTR_SOCKETS);
        for s in sockets {
            let fd = u32::try_from(s.as_raw_fd())
                .map_err(|_| Error::Invalid { what: "descriptor", reason: "negative".into() })?;
            m.begin_nested(SOCK_ITEM).u32(SOCK_FD, fd).end_nested();
        }
        m.end_nested();
        Ok(())
    }

    /// NBD_CMD_CONNECT: binds `sockets` (each negotiated for the same
    /// export) to `/dev/nbd<index>`, or to a free device when `index` is
    /// `None`. Returns the index. The kernel keeps its own references to
    /// the sockets; the caller may close its descriptors afterwards.
    /// `backend` (the export's URI) shows in `/sys/block/nbdN/backend`
    /// (Linux 5.16+; older kernels ignore it), and the kernel refuses a
    /// RECONFIGURE that names another backend.
    pub fn connect(
        &mut self,
        index: Option<u32>,
        sockets: &[&Stream],
        info: &ExportInfo,
        timeouts: KernelTimeouts,
        backend: &str,
    ) -> Result<u32> {
        let mut m = Message::new(self.family, CMD_CONNECT, VERSION);
        if let Some(i) = index {
            m.u32(ATTR_INDEX, i);
        }
        m.u64(ATTR_SIZE_BYTES, info.size_bytes)
            .u64(ATTR_BLOCK_SIZE_BYTES, u64::from(BLOCK_SIZE_BYTES))
            .u64(ATTR_TIMEOUT, timeouts.io.as_secs().max(1))
            .u64(ATTR_SERVER_FLAGS, u64::from(info.transmission_flags))
            // No DESTROY_ON_DISCONNECT / DISCONNECT_ON_CLOSE: the device
            // outlives this process, and only an explicit detach removes it.
            .u64(ATTR_CLIENT_FLAGS, 0)
            .attr(ATTR_BACKEND_IDENTIFIER, &nul_terminated(backend));
        if !timeouts.dead_conn.is_zero() {
            m.u64(ATTR_DEAD_CONN_TIMEOUT, timeouts.dead_conn.as_secs().max(1));
        }
        Self::sockets(&mut m, sockets)?;
        let replies = self.sock.request(&mut m).map_err(|e| nl_err("NBD_CMD_CONNECT", e))?;
        let got = replies
            .iter()
            .flat_map(|r| {
                attrs(&r.attrs).filter(|(k, _)| *k == ATTR_INDEX).filter_map(|(_, p)| attr_u32(p)).collect::<Vec<_>>()
            })
            .next()
            .or(index);
        got.ok_or_else(|| {
            nl_err("NBD_CMD_CONNECT", io::Error::new(io::ErrorKind::InvalidData, "reply without an index"))
        })
    }

    /// NBD_CMD_RECONFIGURE: replaces dead connections of `index` with
    /// `sockets` (same export, same size).
    pub fn reconfigure(
        &mut self,
        index: u32,
        sockets: &[&Stream],
        timeouts: KernelTimeouts,
        backend: &str,
    ) -> Result<()> {
        let mut m = Message::new(self.family, CMD_RECONFIGURE, VERSION);
        m.u32(ATTR_INDEX, index)
            .u64(ATTR_TIMEOUT, timeouts.io.as_secs().max(1))
            .attr(ATTR_BACKEND_IDENTIFIER, &nul_terminated(backend));
        if !timeouts.dead_conn.is_zero() {
            m.u64(ATTR_DEAD_CONN_TIMEOUT, timeouts.dead_conn.as_secs().max(1));
        }
        Self::sockets(&mut m, sockets)?;
        self.sock.request(&mut m).map_err(|e| nl_err("NBD_CMD_RECONFIGURE", e))?;
        Ok(())
    }

    /// NBD_CMD_DISCONNECT: the kernel sends NBD_CMD_DISC, fails queued I/O
    /// and releases the device.
    pub fn disconnect(&mut self, index: u32) -> Result<()> {
        let mut m = Message::new(self.family, CMD_DISCONNECT, VERSION);
        m.u32(ATTR_INDEX, index);
        self.sock.request(&mut m).map_err(|e| nl_err("NBD_CMD_DISCONNECT", e))?;
        Ok(())
    }

    /// Subscribes to the nbd multicast group (LINK_DEAD notifications).
    pub fn subscribe(&mut self) -> Result<()> {
        let g = self
            .mcast_group
            .ok_or_else(|| nl_err("subscribe", io::Error::new(io::ErrorKind::NotFound, "no nbd_mc_group")))?;
        self.sock.join_group(g).map_err(|e| nl_err("join nbd_mc_group", e))
    }

    /// Blocks until the kernel reports a dead connection; returns the device
    /// index. `timeout` None waits forever.
    pub fn wait_link_dead(&mut self, timeout: Option<Duration>) -> Result<Option<u32>> {
        self.sock.set_recv_timeout(timeout).map_err(|e| nl_err("setsockopt", e))?;
        loop {
            match self.sock.next_notification() {
                Ok(r) if r.cmd == CMD_LINK_DEAD => {
                    return Ok(attrs(&r.attrs).find(|(k, _)| *k == ATTR_INDEX).and_then(|(_, p)| attr_u32(p)));
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) => return Err(nl_err("receive", e)),
            }
        }
    }
}

/// The first `/dev/nbdN` without a connection (ioctl path: netlink finds
/// one itself).
pub fn free_index() -> Option<u32> {
    (0..1024u32).take_while(|i| device_path(*i).exists()).find(|i| !is_connected(*i))
}

/// True if `/dev/nbdN` has a connection (its `pid` attribute exists).
pub fn is_connected(index: u32) -> bool {
    Path::new(&format!("/sys/block/nbd{index}/pid")).exists()
}

/// Keeps `/dev/nbd<index>` connected across server restarts: on each
/// LINK_DEAD notification for it, dials `endpoint` again and hands the
/// kernel the new socket with NBD_CMD_RECONFIGURE, retrying until
/// `timeouts.dead_conn` has passed (after that the kernel has failed the
/// queued I/O anyway). Returns when `stop` returns true (polled about once
/// a second).
pub fn keep_connected(
    index: u32,
    endpoint: &crate::nbd::Endpoint,
    export: &str,
    size_bytes: u64,
    timeouts: KernelTimeouts,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    let mut events = Nbd::open()?;
    events.subscribe()?;
    let mut control = Nbd::open()?;
    while !stop() {
        match events.wait_link_dead(Some(Duration::from_secs(1)))? {
            Some(i) if i == index => {}
            _ => continue,
        }
        tracing::warn!(index, "nbd connection dead; reconnecting");
        let give_up = std::time::Instant::now() + timeouts.dead_conn.max(timeouts.io);
        let dial_timeout = timeouts.io.min(Duration::from_secs(2));
        loop {
            if stop() {
                return Ok(());
            }
            let attempt = crate::nbd::connect(endpoint, export, dial_timeout).and_then(|(s, info)| {
                if info.size_bytes != size_bytes {
                    return Err(Error::Invalid {
                        what: "export",
                        reason: format!("size changed from {size_bytes} to {} bytes", info.size_bytes),
                    });
                }
                control.reconfigure(index, &[&s], timeouts, &endpoint.uri(export))
            });
            match attempt {
                Ok(()) => {
                    tracing::info!(index, "nbd connection replaced (NBD_CMD_RECONFIGURE)");
                    break;
                }
                Err(e) if std::time::Instant::now() < give_up => {
                    tracing::debug!(error = %e, "reconnect attempt failed");
                    // A pause between attempts, not a synchronisation.
                    std::thread::sleep(crate::limits::RECONNECT_INTERVAL_MIN);
                }
                Err(e) => {
                    tracing::error!(error = %e, index, "could not reconnect within the dead-connection timeout");
                    break;
                }
            }
        }
    }
    Ok(())
}
