//! Mount helpers for the cluster: `fsck` (journal replay and safe repairs),
//! `mount` with an fstab-style option string, `umount`, and the checks
//! detach relies on (`mounts_of`, `ensure_unused`).
//!
//! Mounting uses mount(2) directly (no `mount` binary): errors then carry
//! the errno and the exact device, target and options. fsck runs the
//! distribution's `fsck.<type>`, the only correct journal replayer.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// One line of /proc/self/mountinfo that concerns a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// What fsck did (its exit status below 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsckOutcome {
    /// Nothing to do.
    Clean,
    /// Errors were corrected (this includes a journal replay).
    Repaired,
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|e| Error::Invalid { what: "path", reason: e.to_string() })
}

fn device_number(device: &Path) -> Result<u64> {
    let md = std::fs::metadata(device).map_err(|e| Error::io("stat", device, e))?;
    if !md.file_type().is_block_device() {
        return Err(Error::Invalid { what: "device", reason: format!("{} is not a block device", device.display()) });
    }
    Ok(md.rdev())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts of `major:minor` in a mountinfo text.
fn parse_mountinfo(text: &str, major: u32, minor: u32) -> Vec<MountEntry> {
    let want = format!("{major}:{minor}");
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            if fields.get(2)? != &want {
                return None;
            }
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: fields.get(sep + 1)?.to_string(),
            })
        })
        .collect()
}

/// Where `device` is mounted (in this process's mount namespace).
pub fn mounts_of(device: &Path) -> Result<Vec<MountEntry>> {
    let rdev = device_number(device)?;
    let p = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(p).map_err(|e| Error::io("read", p, e))?;
    Ok(parse_mountinfo(&text, libc::major(rdev), libc::minor(rdev)))
}

/// Fails with `Error::Busy` if `device` is mounted, or `Error::Claimed` if
/// something else holds it exclusively (a mount in another namespace, a
/// device-mapper target, a filesystem tool).
pub fn ensure_unused(device: &Path) -> Result<()> {
    let mounts = mounts_of(device)?;
    if !mounts.is_empty() {
        return Err(Error::Busy {
            device: device.to_path_buf(),
            mounts: mounts.iter().map(|m| m.mount_point.display().to_string()).collect(),
        });
    }
    // O_EXCL on a block device fails with EBUSY while anyone claims it.
    match OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(device) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error::Claimed { device: device.to_path_buf() }),
        Err(e) => Err(Error::io("open", device, e)),
    }
}

/// Runs `fsck.<fstype> -p` (preen: replay the journal, fix what is safe).
/// Exit status 4 or more (errors left, operational error) is an error that
/// quotes fsck's output.
pub fn fsck(device: &Path, fstype: &str) -> Result<FsckOutcome> {
    if fstype.is_empty() || !fstype.bytes().all(|c| c.is_ascii_alphanumeric()) {
        return Err(Error::Invalid { what: "filesystem type", reason: format!("{fstype:?}") });
    }
    let program = format!("fsck.{fstype}");
    let out = Command::new(&program)
        .arg("-p")
        .arg(device)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .map_err(|e| Error::io("run fsck for", device, io::Error::new(e.kind(), format!("{program}: {e}"))))?;
    let code = out.status.code();
    match code {
        Some(0) => Ok(FsckOutcome::Clean),
        Some(1) | Some(2) | Some(3) => Ok(FsckOutcome::Repaired),
        _ => Err(Error::Command {
            command: format!("{program} -p"),
            device: device.to_path_buf(),
            status: out.status.to_string(),
            output: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
                .trim()
                .to_string(),
        }),
    }
}

/// Splits fstab-style options into mount(2) flags and the data string.
fn parse_options(options: &str) -> (libc::c_ulong, String) {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for o in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        match o {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => flags &= !libc::MS_RDONLY,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "sync" => flags |= libc::MS_SYNCHRONOUS,
            "dirsync" => flags |= libc::MS_DIRSYNC,
            "noatime" => flags |= libc::MS_NOATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            "lazytime" => flags |= libc::MS_LAZYTIME,
            "defaults" | "async" | "suid" | "dev" | "exec" | "atime" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Mounts `device` on `target` as `fstype` with fstab-style `options`
/// (`noatime,nodev,data=ordered`).
pub fn mount(device: &Path, target: &Path, fstype: &str, options: &str) -> Result<()> {
    let (flags, data) = parse_options(options);
    let src = cstring(device)?;
    let dst = cstring(target)?;
    let fs = CString::new(fstype).map_err(|e| Error::Invalid { what: "filesystem type", reason: e.to_string() })?;
    let data_c =
        CString::new(data.clone()).map_err(|e| Error::Invalid { what: "mount options", reason: e.to_string() })?;
    // SAFETY: all four pointers are NUL-terminated strings that outlive the call.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), flags, data_c.as_ptr().cast()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EBUSY) => " (already mounted, or the device is in use)",
            Some(libc::EINVAL) => " (no filesystem of that type on the device, or a bad option)",
            Some(libc::ENODEV) => " (the kernel does not know this filesystem type)",
            Some(libc::EROFS) => " (the device is read-only; mount with ro)",
            _ => "",
        };
        return Err(Error::io(
            "mount",
            format!("{} on {} as {fstype} with {options:?}{hint}", device.display(), target.display()),
            e,
        ));
    }
    Ok(())
}

/// Unmounts `target`. A busy filesystem is an error naming the target:
/// the cluster must stop its users first, never unmount lazily behind them.
pub fn umount(target: &Path) -> Result<()> {
    let t = cstring(target)?;
    // SAFETY: NUL-terminated path that outlives the call.
    let r = unsafe { libc::umount2(t.as_ptr(), 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        let verb = if e.raw_os_error() == Some(libc::EBUSY) { "unmount (files are still open on)" } else { "unmount" };
        return Err(Error::io(verb, target, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_match_by_device_number() {
        let text = "\
36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
37 35 7:3 / /var/tmp/with\\040space rw shared:2 - ext4 /dev/loop3 rw
38 35 7:30 / /other rw - ext4 /dev/loop30 rw";
        let got = parse_mountinfo(text, 7, 3);
        assert_eq!(got, vec![MountEntry { mount_point: PathBuf::from("/var/tmp/with space"), fstype: "ext4".into() }]);
        assert!(parse_mountinfo(text, 7, 4).is_empty());
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = parse_options("noatime,nodev,data=ordered,ro, errors=remount-ro");
        assert_eq!(f, libc::MS_NOATIME | libc::MS_NODEV | libc::MS_RDONLY);
        assert_eq!(d, "data=ordered,errors=remount-ro");
        assert_eq!(parse_options("defaults"), (0, String::new()));
    }

    #[test]
    fn fsck_refuses_odd_filesystem_types() {
        assert!(matches!(fsck(Path::new("/dev/null"), "../../bin/sh"), Err(Error::Invalid { .. })));
    }
}
