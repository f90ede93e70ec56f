//! One owner per mail tree: an exclusive `flock` on `DATA_DIR/mta.lock`.
//!
//! `serve` takes it before anything else and keeps the descriptor open for
//! its whole life (through the chroot and the drop of privileges), so two
//! servers can never deliver from the same queue. Admin commands that
//! change the queue take the same lock, so they never race the delivery
//! task; read-only commands (`queue list`) do not need it. The file holds
//! the owner's PID, which the refusal names. The lock lives and dies with
//! the process (kill -9 included): there is no stale lock to clean up.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file's name inside `data_dir`.
pub const LOCK_FILE: &str = "mta.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("failed to open the lock file {path}: {cause}")]
    Open { path: PathBuf, cause: std::io::Error },
    #[error("failed to lock {path}: {cause}")]
    Lock { path: PathBuf, cause: Errno },
    #[error("the mail tree {data_dir} is in use by another mta (PID {holder}, lock {path}); stop it first")]
    Held { data_dir: PathBuf, path: PathBuf, holder: String },
    #[error("failed to write the PID into {path}: {cause}")]
    Write { path: PathBuf, cause: std::io::Error },
}

/// Held while alive; the kernel releases it when the process ends.
#[derive(Debug)]
pub struct DataLock {
    _file: Flock<File>,
}

/// Takes the exclusive lock on `data_dir` without waiting, and records
/// this process's PID in it.
pub fn acquire(data_dir: &Path) -> Result<DataLock, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|cause| LockError::Open { path: path.clone(), cause })?;
    let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = (&mut file).take(64).read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "unknown".to_string(),
                pid if pid.bytes().all(|b| b.is_ascii_digit()) => pid.to_string(),
                _ => "unknown".to_string(),
            };
            return Err(LockError::Held { data_dir: data_dir.to_owned(), path, holder });
        }
        Err((_, cause)) => return Err(LockError::Lock { path, cause }),
    };
    let write = |f: &mut File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(format!("{}\n", std::process::id()).as_bytes())?;
        f.sync_data()
    };
    write(&mut locked).map_err(|cause| LockError::Write { path, cause })?;
    Ok(DataLock { _file: locked })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flock locks belong to the open file description, so a second open
    /// in the same process conflicts just as another process would.
    #[test]
    fn second_acquire_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("mta-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = acquire(&dir).unwrap();
        let err = acquire(&dir).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&format!("PID {}", std::process::id())), "{text}");
        drop(first);
        let again = acquire(&dir).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
