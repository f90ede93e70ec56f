//! The library's error type: every variant names the object it concerns.

use std::io;
use std::path::PathBuf;

/// Errors returned by kernel-glue. Operating errors only: bugs panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to connect to NBD server {endpoint}: {source}")]
    Connect { endpoint: String, source: io::Error },
    #[error("NBD handshake with {endpoint} failed: {reason}")]
    Handshake { endpoint: String, reason: String },
    #[error("NBD server {endpoint} refused export {export:?}: {reason}")]
    ExportRefused { endpoint: String, export: String, reason: String },
    #[error("kernel nbd is not available: {reason}")]
    KernelUnavailable { reason: String },
    #[error("FUSE is not available: {reason}")]
    FuseUnavailable { reason: String },
    #[error("netlink {what} failed: {source}")]
    Netlink { what: String, source: io::Error },
    #[error("ioctl {what} on {path} failed: {source}")]
    Ioctl { what: &'static str, path: PathBuf, source: io::Error },
    #[error("failed to {verb} {path}: {source}")]
    Io { verb: &'static str, path: PathBuf, source: io::Error },
    #[error("{device} is in use (mounted on {}); unmount it first or force the detach", mounts.join(", "))]
    Busy { device: PathBuf, mounts: Vec<String> },
    #[error("{device} is in use by another holder (open exclusively); force the detach to take it away")]
    Claimed { device: PathBuf },
    #[error("{command} on {device} failed ({status}): {output}")]
    Command { command: String, device: PathBuf, status: String, output: String },
    #[error("no attachment recorded for {device} in {run_dir}")]
    NotAttached { device: PathBuf, run_dir: PathBuf },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(verb: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { verb, path: path.into(), source }
    }

    pub(crate) fn ioctl(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Ioctl { what, path: path.into(), source }
    }
}
