//! Hardware watchdog self-fencing, like sbd: `WatchdogDevice` (the Linux
//! watchdog device: open, timeout, pet, magic close) and `PetSchedule` (when
//! to pet, sans-IO).
//!
//! The daemon pets from its main loop, and only while every group's
//! failover core allows it (`Failover::watchdog_may_pet`: a node holding a
//! group pets only while its lease is valid and its stop path is not
//! stuck). A node that cannot stop within its lease, or whose daemon hangs
//! or dies, is reset by the hardware `timeout_ms` after its last pet; with
//! `watchdog.mode = "required"` the peers count on exactly that
//! (`FailoverConfig::peer_watchdog_ms`).
//!
//! Magic close: the driver disarms the watchdog at close only if the last
//! write before it contained 'V' (and the kernel was not built with
//! `nowayout`). `WatchdogDevice::close_disarmed` does that on a clean exit
//! holding nothing; dropping the device any other way (a panic, an exit
//! with a group still held) leaves it armed, so the node is reset.
//!
//! **Invariant:** the only `unsafe` in clusterd is the two ioctls in
//! `set_timeout_s`/`get_timeout_s`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("failed to open the watchdog {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("failed to set the watchdog {path}'s timeout to {want_s} s: {source}")]
    SetTimeout { path: PathBuf, want_s: u32, source: std::io::Error },
    #[error(
        "the watchdog {path} runs with a {actual_s} s timeout, longer than watchdog.timeout_ms ({want_s} s) that the peers count on; use a device that accepts {want_s} s or raise watchdog.timeout_ms"
    )]
    TimeoutTooLong { path: PathBuf, want_s: u32, actual_s: u32 },
    #[error("failed to pet the watchdog {path}: {source}")]
    Pet { path: PathBuf, source: std::io::Error },
}

mod ioctl {
    // <linux/watchdog.h>: WDIOC_SETTIMEOUT = _IOWR('W', 6, int),
    // WDIOC_GETTIMEOUT = _IOR('W', 7, int).
    nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, nix::libc::c_int);
    nix::ioctl_read!(wdioc_gettimeout, b'W', 7, nix::libc::c_int);
}

/// `WDIOC_SETTIMEOUT`: asks for `secs`, returns what the driver set (it may
/// round). `Ok(None)`: not a watchdog driver (a regular file in tests, a
/// driver without the ioctl).
fn set_timeout_s(file: &File, secs: u32) -> std::io::Result<Option<u32>> {
    let mut value = nix::libc::c_int::try_from(secs).unwrap_or(nix::libc::c_int::MAX);
    // SAFETY: the fd is open for the lifetime of `file`; WDIOC_SETTIMEOUT
    // reads and writes exactly one c_int through the pointer, which points
    // to a live, aligned local.
    match unsafe { ioctl::wdioc_settimeout(file.as_raw_fd(), &mut value) } {
        Ok(_) => Ok(Some(u32::try_from(value).unwrap_or(0))),
        Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `WDIOC_GETTIMEOUT`; `None` when the driver does not say.
fn get_timeout_s(file: &File) -> Option<u32> {
    let mut value: nix::libc::c_int = 0;
    // SAFETY: as in `set_timeout_s`; the driver writes one c_int.
    match unsafe { ioctl::wdioc_gettimeout(file.as_raw_fd(), &mut value) } {
        Ok(_) => u32::try_from(value).ok(),
        Err(_) => None,
    }
}

/// An open (armed) watchdog device.
#[derive(Debug)]
pub struct WatchdogDevice {
    file: Option<File>,
    path: PathBuf,
    /// The timeout the driver runs with, if it said.
    timeout_s: Option<u32>,
}

impl WatchdogDevice {
    /// Opens (and so arms) the device and sets its timeout to `timeout_ms`
    /// (whole seconds). A driver that runs a longer timeout than asked is
    /// refused: the peers count on `timeout_ms`.
    pub fn open(path: &Path, timeout_ms: u64) -> Result<WatchdogDevice, WatchdogError> {
        let want_s = u32::try_from(timeout_ms.div_ceil(1000)).unwrap_or(u32::MAX);
        // Append: a fake device (a regular file) keeps every write; a
        // character device ignores it.
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|source| WatchdogError::Open { path: path.to_owned(), source })?;
        let mut dev = WatchdogDevice { file: Some(file), path: path.to_owned(), timeout_s: None };
        let file = dev.file.as_ref().expect("just opened");
        let set = match set_timeout_s(file, want_s) {
            Ok(set) => set,
            Err(source) => {
                // Opening armed it: disarm before refusing, or a daemon
                // that goes on without it (mode auto) would be reset.
                dev.close_disarmed();
                return Err(WatchdogError::SetTimeout { path: path.to_owned(), want_s, source });
            }
        };
        dev.timeout_s = set.or_else(|| get_timeout_s(file));
        if let Some(actual_s) = dev.timeout_s.filter(|a| *a > want_s) {
            // Disarm before refusing (in mode auto the daemon goes on
            // without it).
            dev.close_disarmed();
            return Err(WatchdogError::TimeoutTooLong { path: path.to_owned(), want_s, actual_s });
        }
        Ok(dev)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The timeout the driver reported, if any (not one for a fake device).
    pub fn timeout_s(&self) -> Option<u32> {
        self.timeout_s
    }

    /// One keepalive: any write that holds no 'V'.
    pub fn pet(&mut self) -> Result<(), WatchdogError> {
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        file.write_all(b"\0").map_err(|source| WatchdogError::Pet { path: self.path.clone(), source })
    }

    /// A clean exit holding nothing: the magic close ('V', then close)
    /// disarms the watchdog. A failure is logged; the node may then be
    /// reset, which is safe.
    pub fn close_disarmed(&mut self) {
        if let Some(mut file) = self.file.take() {
            if let Err(e) = file.write_all(b"V") {
                tracing::warn!(path = %self.path.display(), "watchdog magic close failed ({e}); the node may be reset");
            }
        }
    }
}

/// When to pet (sans-IO): every `interval_ms` while the cores allow it.
/// Tracks whether petting stopped, so the shell logs a change once.
#[derive(Debug, Clone)]
pub struct PetSchedule {
    interval_ms: u64,
    timeout_ms: u64,
    next_pet_ms: u64,
    last_pet_ms: u64,
    holding_back: bool,
}

/// What `PetSchedule::poll` asks of the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PetDecision {
    /// Write a keepalive now.
    Pet,
    /// Not due yet.
    Wait,
    /// Petting stopped (just now if `first`): the hardware resets the node
    /// at `reset_at_ms` unless the cores allow petting again before.
    HoldBack { first: bool, reset_at_ms: u64 },
}

impl PetSchedule {
    /// The device was opened (armed) at `now_ms`. Pets come every quarter of
    /// the timeout, so a busy loop never misses one.
    pub fn new(timeout_ms: u64, now_ms: u64) -> PetSchedule {
        assert!(timeout_ms >= 4, "watchdog timeout {timeout_ms} ms");
        PetSchedule {
            interval_ms: timeout_ms / 4,
            timeout_ms,
            next_pet_ms: now_ms,
            last_pet_ms: now_ms,
            holding_back: false,
        }
    }

    pub fn poll(&mut self, now_ms: u64, may_pet: bool) -> PetDecision {
        if !may_pet {
            let first = !self.holding_back;
            self.holding_back = true;
            return PetDecision::HoldBack { first, reset_at_ms: self.last_pet_ms + self.timeout_ms };
        }
        self.holding_back = false;
        if now_ms < self.next_pet_ms {
            return PetDecision::Wait;
        }
        self.last_pet_ms = now_ms;
        self.next_pet_ms = now_ms + self.interval_ms;
        PetDecision::Pet
    }

    /// When the next pet is due; `u64::MAX` while petting is held back
    /// (a pet that is overdue would wake the caller in a loop): what allows
    /// petting again is an event or a core timeout, which polls anyway, and
    /// the first poll allowed pets at once.
    pub fn poll_timeout(&self) -> u64 {
        if self.holding_back {
            u64::MAX
        } else {
            self.next_pet_ms
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pets_every_quarter_timeout_only_while_allowed() {
        let mut s = PetSchedule::new(8000, 0);
        assert_eq!(s.poll(0, true), PetDecision::Pet);
        assert_eq!(s.poll(1999, true), PetDecision::Wait);
        assert_eq!(s.poll_timeout(), 2000);
        assert_eq!(s.poll(2000, true), PetDecision::Pet);
        assert_eq!(s.poll(4500, false), PetDecision::HoldBack { first: true, reset_at_ms: 10_000 });
        assert_eq!(s.poll(6000, false), PetDecision::HoldBack { first: false, reset_at_ms: 10_000 });
        assert_eq!(s.poll_timeout(), u64::MAX, "no timer while held back (an overdue pet would spin)");
        // Allowed again before the reset: petting resumes at once.
        assert_eq!(s.poll(7000, true), PetDecision::Pet);
        assert_eq!(s.poll(7001, false), PetDecision::HoldBack { first: true, reset_at_ms: 15_000 });
    }

    /// A fake device: a regular file records what is written (no ioctl).
    #[test]
    fn a_fake_device_gets_keepalives_without_v_and_the_magic_close_last() {
        let dir = std::env::temp_dir().join(format!("clusterd-wd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("watchdog");
        std::fs::write(&path, b"").unwrap();
        let mut dev = WatchdogDevice::open(&path, 5000).unwrap();
        assert_eq!(dev.timeout_s(), None, "a regular file has no driver timeout");
        let mut s = PetSchedule::new(5000, 0);
        let mut now = 0;
        let mut pets = 0;
        // The cores allow petting for 10 s, then not (a stuck stop).
        while now <= 20_000 {
            if let PetDecision::Pet = s.poll(now, now < 10_000) {
                dev.pet().unwrap();
                pets += 1;
            }
            now += 100;
        }
        let written = std::fs::read(&path).unwrap();
        assert_eq!(pets, 8, "every 1250 ms for 10 s");
        assert_eq!(written.len(), pets);
        assert!(!written.contains(&b'V'), "a keepalive must not arm the magic close");
        dev.close_disarmed();
        let written = std::fs::read(&path).unwrap();
        assert_eq!(written.last(), Some(&b'V'), "the magic close writes V last");
        dev.pet().unwrap(); // closed: nothing more reaches the device
        assert_eq!(std::fs::read(&path).unwrap().len(), pets + 1);
        // Dropped without the magic close: no V (the watchdog stays armed).
        let mut dev = WatchdogDevice::open(&path, 5000).unwrap();
        dev.pet().unwrap();
        drop(dev);
        let written = std::fs::read(&path).unwrap();
        assert_eq!(written.len(), pets + 2);
        assert_eq!(written.last(), Some(&0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_device_is_one_line_naming_it() {
        let e = WatchdogDevice::open(Path::new("/nonexistent/watchdog"), 5000).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("failed to open the watchdog /nonexistent/watchdog: "), "{msg}");
        assert!(!msg.contains('\n'));
    }
}
