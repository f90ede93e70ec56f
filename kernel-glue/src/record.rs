//! Which device backs which export: the records attach daemons leave in
//! their run directory (`<dev>.pid`: pid, then the export's URI), and the
//! kernel's own view of nbd devices (`/sys/block/nbdN/pid` and `backend`).
//! `list` merges both, for `replicator status` and clusterd.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::Method;

/// A device made by attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub device: PathBuf,
    pub method: Method,
    /// The export's NBD URI, when known.
    pub backend: Option<String>,
    /// The attach daemon serving or keeping it, if any.
    pub pid: Option<u32>,
}

/// `RUN_DIR/<device name>.pid`.
pub fn path(run_dir: &Path, device: &Path) -> PathBuf {
    let name = device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    run_dir.join(format!("{name}.pid"))
}

/// Records that process `pid` serves or keeps `device` for `backend`.
pub fn write(run_dir: &Path, device: &Path, pid: u32, backend: &str) -> Result<PathBuf> {
    let p = path(run_dir, device);
    std::fs::write(&p, format!("{pid}\n{backend}\n")).map_err(|e| Error::io("write", &p, e))?;
    Ok(p)
}

/// The pid and backend recorded for `device`, if there is a record.
pub fn read(run_dir: &Path, device: &Path) -> Result<Option<(u32, Option<String>)>> {
    let p = path(run_dir, device);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &p, e)),
    };
    parse(&text)
        .map(Some)
        .ok_or_else(|| Error::Invalid { what: "attach record", reason: format!("{}: {text:?}", p.display()) })
}

fn parse(text: &str) -> Option<(u32, Option<String>)> {
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let backend = lines.next().map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
    Some((pid, backend))
}

fn method_of(device: &Path) -> Method {
    match crate::kernel::index_of(device) {
        Some(_) => Method::Kernel,
        None => Method::Fuse,
    }
}

/// Every attached device: connected kernel nbd devices, and the records
/// in `run_dir` (whose daemons may serve loop devices or keep nbd ones).
pub fn list(run_dir: &Path) -> Vec<Attached> {
    let mut out: Vec<Attached> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/block") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(index) = name.strip_prefix("nbd").and_then(|i| i.parse::<u32>().ok()) else { continue };
            if crate::kernel::is_connected(index) {
                out.push(Attached {
                    device: crate::kernel::device_path(index),
                    method: Method::Kernel,
                    backend: crate::kernel::backend_of(index),
                    pid: None,
                });
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(run_dir) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(dev) = name.strip_suffix(".pid") else { continue };
            let device = PathBuf::from("/dev").join(dev);
            let Ok(Some((pid, backend))) = read(run_dir, &device) else { continue };
            match out.iter_mut().find(|a| a.device == device) {
                Some(a) => {
                    a.pid = Some(pid);
                    a.backend = a.backend.take().or(backend);
                }
                None => out.push(Attached { method: method_of(&device), device, backend, pid: Some(pid) }),
            }
        }
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_list_finds_them() {
        let dir = std::env::temp_dir().join(format!("kg-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev = Path::new("/dev/loop7");
        write(&dir, dev, 42, "nbd://127.0.0.1:10809/volume").unwrap();
        assert_eq!(read(&dir, dev).unwrap(), Some((42, Some("nbd://127.0.0.1:10809/volume".into()))));
        let listed: Vec<Attached> = list(&dir).into_iter().filter(|a| a.device == dev).collect();
        assert_eq!(
            listed,
            vec![Attached {
                device: dev.into(),
                method: Method::Fuse,
                backend: Some("nbd://127.0.0.1:10809/volume".into()),
                pid: Some(42)
            }]
        );
        assert_eq!(read(&dir, Path::new("/dev/loop6")).unwrap(), None);
        std::fs::write(path(&dir, Path::new("/dev/loop5")), "garbage").unwrap();
        assert!(read(&dir, Path::new("/dev/loop5")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn old_records_without_a_backend_still_parse() {
        assert_eq!(parse("17\n"), Some((17, None)));
        assert_eq!(parse(""), None);
    }
}
