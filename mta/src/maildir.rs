//! Maildir delivery (tmp → fsync → rename into new → fsync new), in the
//! layout Dovecot reads with `mail_location = maildir:DATA/mailboxes/%d/%n`.
//!
//! **Invariant:** a mailbox key becomes a path only after [`mailbox_dir`]
//! checked it cannot climb out of the mailboxes directory.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::durable::{self, Durable};

static DELIVERY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `mailboxes/<domain>/<local>` for a lowercased `local@domain` key.
pub fn mailbox_dir(root: &Path, key: &str) -> io::Result<PathBuf> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidInput, format!("mailbox name {key:?} is not a safe path"));
    let (local, domain) = key.rsplit_once('@').ok_or_else(invalid)?;
    for part in [local, domain] {
        if part.is_empty() || part.starts_with('.') || part.contains(['/', '\0', '\\']) || part.contains("..") {
            return Err(invalid());
        }
    }
    Ok(root.join(domain).join(local))
}

/// Delivers one message into a mailbox, creating the Maildir if needed.
/// Returns once the message is durable in `new/`.
pub fn deliver(root: &Path, key: &str, hostname: &str, message: &[&[u8]]) -> io::Result<Durable> {
    let dir = mailbox_dir(root, key)?;
    for sub in ["tmp", "new", "cur"] {
        durable::create_dir_durable(&dir.join(sub))?;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let n = DELIVERY_COUNTER.fetch_add(1, Ordering::Relaxed);
    let size: usize = message.iter().map(|p| p.len()).sum();
    // The maildir.cr.yp.to naming, plus Dovecot's S= size hint.
    let base = format!("{}.M{}P{}Q{}.{}", now.as_secs(), now.subsec_micros(), std::process::id(), n, hostname);
    let tmp = dir.join("tmp").join(&base);
    let dest = dir.join("new").join(format!("{base},S={size}"));
    durable::write_atomically(&tmp, &dest, message)
}

/// Bytes a mailbox uses: the sizes of the files in `new/` and `cur/`
/// (0 for a Maildir that does not exist yet). One directory scan per call,
/// no cache (Dovecot's `maildirsize` would be one): fine for mailboxes of
/// tens of thousands of messages.
pub fn usage_bytes(root: &Path, key: &str) -> io::Result<u64> {
    let dir = mailbox_dir(root, key)?;
    let mut total = 0u64;
    for sub in ["new", "cur"] {
        let entries = match std::fs::read_dir(dir.join(sub)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            // A file moved by the IMAP server between readdir and stat is skipped.
            if let Ok(meta) = entry?.metadata() {
                if meta.is_file() {
                    total = total.saturating_add(meta.len());
                }
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_mailbox_names_are_refused() {
        let root = Path::new("/srv/mail/mailboxes");
        assert_eq!(mailbox_dir(root, "alice@example.org").unwrap(), root.join("example.org/alice"));
        for bad in
            ["../x@example.org", "a/b@example.org", "alice@..", "alice@a/b", "noat", "@example.org", ".x@example.org"]
        {
            assert!(mailbox_dir(root, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn usage_counts_new_and_cur_but_not_tmp() {
        let root = std::env::temp_dir().join(format!("mta-maildir-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(usage_bytes(&root, "bob@example.org").unwrap(), 0);
        let _proof = deliver(&root, "bob@example.org", "mx.example.org", &[&[b'x'; 100]]).unwrap();
        let dir = root.join("example.org/bob");
        std::fs::write(dir.join("cur/seen:2,S"), [b'y'; 50]).unwrap();
        std::fs::write(dir.join("tmp/partial"), [b'z'; 1000]).unwrap();
        assert_eq!(usage_bytes(&root, "bob@example.org").unwrap(), 150);
        assert!(usage_bytes(&root, "../x@example.org").is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn delivery_creates_a_maildir_and_lands_in_new() {
        let root = std::env::temp_dir().join(format!("mta-maildir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let _proof =
            deliver(&root, "alice@example.org", "mx.example.org", &[b"Subject: x\r\n\r\n", b"hi\r\n"]).unwrap();
        let _proof = deliver(&root, "alice@example.org", "mx.example.org", &[b"second\r\n"]).unwrap();
        let dir = root.join("example.org/alice");
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(dir.join("cur")).unwrap().count(), 0);
        let mut names: Vec<_> = std::fs::read_dir(dir.join("new")).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names.len(), 2);
        let contents: Vec<Vec<u8>> = names.iter().map(|n| std::fs::read(dir.join("new").join(n)).unwrap()).collect();
        assert!(contents.contains(&b"Subject: x\r\n\r\nhi\r\n".to_vec()));
        assert!(names.iter().any(|n| n.to_string_lossy().ends_with(",S=18")));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
