//! The one way files are made durable: write a temporary file, fsync it,
//! rename it into place, fsync the directory. Used by the queue and by
//! Maildir delivery.
//!
//! Main type: [`Durable`], a proof that a file reached the disk; only
//! [`write_atomically`] makes one, and the SMTP 250 needs it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Proof that a file is on disk under its final name, directory entry included.
#[derive(Debug)]
#[must_use]
pub struct Durable(());

/// Writes `parts` to `tmp`, fsyncs it, renames it to `dest` and fsyncs the
/// destination's directory. `tmp` and `dest` must be on one filesystem.
/// On error the temporary file is removed.
pub fn write_atomically(tmp: &Path, dest: &Path, parts: &[&[u8]]) -> io::Result<Durable> {
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()?;
        drop(f);
        fs::rename(tmp, dest)?;
        sync_dir(dest.parent().unwrap_or(Path::new("/")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result.map(|()| Durable(()))
}

/// The proof for a file found already in place (a delivery repeated after
/// a crash): fsyncs the file and its directory again, since the crash may
/// have come between the rename and the directory's fsync.
pub fn already_in_place(path: &Path) -> io::Result<Durable> {
    File::open(path)?.sync_all()?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))?;
    Ok(Durable(()))
}

/// fsync of a directory: makes renames and unlinks in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `create_dir_all` that also fsyncs every directory it created and its
/// parent, so a new mailbox survives a crash together with its first message.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(dir.parent().unwrap_or(Path::new("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomically_leaves_only_the_final_file() {
        let dir = std::env::temp_dir().join(format!("mta-durable-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        create_dir_durable(&dir.join("a/b")).unwrap();
        let (tmp, dest) = (dir.join("a/x.tmp"), dir.join("a/b/x"));
        let _proof = write_atomically(&tmp, &dest, &[b"hello ", b"world"]).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"hello world");
        assert!(!tmp.exists());
        // A second write to the same temporary name fails cleanly if it exists.
        fs::write(&tmp, b"partial").unwrap();
        assert!(write_atomically(&tmp, &dir.join("a/b/y"), &[b"z"]).is_err());
        assert!(!dir.join("a/b/y").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
