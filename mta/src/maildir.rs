//! Maildir delivery (tmp → fsync → rename into new → fsync new), in the
//! layout Dovecot reads with `mail_location = maildir:DATA/mailboxes/%d/%n`.
//!
//! **Invariant:** a mailbox key becomes a path only after [`mailbox_dir`]
//! checked it cannot climb out of the mailboxes directory.

use std::io;
use std::path::{Path, PathBuf};

use crate::durable::{self, Durable};

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

/// How a delivery ended.
#[derive(Debug)]
pub enum Delivered {
    /// Written now.
    New(Durable),
    /// This queue id's copy was already in the mailbox (a redelivery after
    /// a crash between the Maildir write and the queue update).
    Already(Durable),
}

/// Delivers one message into a mailbox, creating the Maildir if needed.
/// Returns once the message is durable in `new/`.
///
/// Idempotent per queue id: the file name is made from `queue_id` and
/// `received_unix` (not the clock, the pid or a counter), and a copy
/// already in `new/` or `cur/` (where the IMAP server moves it, adding
/// flags after `:`) is not written again. So a restart after delivery but
/// before the queue file's removal does not deliver twice.
pub fn deliver(
    root: &Path,
    key: &str,
    hostname: &str,
    queue_id: &str,
    received_unix: u64,
    message: &[&[u8]],
) -> io::Result<Delivered> {
    let dir = mailbox_dir(root, key)?;
    for sub in ["tmp", "new", "cur"] {
        durable::create_dir_durable(&dir.join(sub))?;
    }
    if queue_id.is_empty() || !queue_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("queue id {queue_id:?} is not alphanumeric")));
    }
    let size: usize = message.iter().map(|p| p.len()).sum();
    // The maildir.cr.yp.to naming (time.unique.host) with the queue id as
    // the unique part, plus Dovecot's S= size hint.
    let base = format!("{received_unix}.Q{queue_id}.{hostname}");
    let dest = dir.join("new").join(format!("{base},S={size}"));
    if dest.exists() {
        return durable::already_in_place(&dest).map(Delivered::Already);
    }
    let prefix = format!("{base},");
    for entry in std::fs::read_dir(dir.join("cur"))? {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
            return durable::already_in_place(&entry.path()).map(Delivered::Already);
        }
    }
    let tmp = dir.join("tmp").join(&base);
    // A crash between writing tmp/ and the rename leaves this file behind;
    // only this delivery (one server per mail tree, one delivery per queue
    // id at a time) writes this name.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    durable::write_atomically(&tmp, &dest, message).map(Delivered::New)
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
        let _proof = deliver(&root, "bob@example.org", "mx.example.org", "a1", 1, &[&[b'x'; 100]]).unwrap();
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
            deliver(&root, "alice@example.org", "mx.example.org", "a1", 1, &[b"Subject: x\r\n\r\n", b"hi\r\n"])
                .unwrap();
        let _proof = deliver(&root, "alice@example.org", "mx.example.org", "a2", 1, &[b"second\r\n"]).unwrap();
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

    /// Issue 20: after kill -9 between the Maildir write and the queue
    /// update, the restarted server delivered the message again.
    #[test]
    fn delivering_one_queue_id_twice_leaves_one_copy_even_after_the_reader_moved_it() {
        let root = std::env::temp_dir().join(format!("mta-maildir-once-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let msg: &[&[u8]] = &[b"Subject: once\r\n\r\nhi\r\n"];
        assert!(matches!(deliver(&root, "carol@example.org", "mx.example.org", "beef", 7, msg), Ok(Delivered::New(_))));
        assert!(matches!(
            deliver(&root, "carol@example.org", "mx.example.org", "beef", 7, msg),
            Ok(Delivered::Already(_))
        ));
        let dir = root.join("example.org/carol");
        assert_eq!(std::fs::read_dir(dir.join("new")).unwrap().count(), 1);
        // An IMAP server moved it to cur/ and added flags; a leftover tmp/ file
        // from a crash does not stop a new delivery either.
        let name = std::fs::read_dir(dir.join("new")).unwrap().next().unwrap().unwrap().file_name();
        let name = name.to_str().unwrap().to_string();
        std::fs::rename(dir.join("new").join(&name), dir.join("cur").join(format!("{name}:2,S"))).unwrap();
        assert!(matches!(
            deliver(&root, "carol@example.org", "mx.example.org", "beef", 7, msg),
            Ok(Delivered::Already(_))
        ));
        assert_eq!(std::fs::read_dir(dir.join("new")).unwrap().count(), 0);
        std::fs::write(dir.join("tmp/7.Qf00d.mx.example.org"), b"partial").unwrap();
        assert!(matches!(deliver(&root, "carol@example.org", "mx.example.org", "f00d", 7, msg), Ok(Delivered::New(_))));
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
