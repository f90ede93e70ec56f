//! The durable queue on the mail tree.
//!
//! Layout under `DATA/queue/`: `incoming/` (temporary files, discarded at
//! start-up), `active/` (waiting for delivery), `hold/` (held by the admin).
//! A queue file is `MTA-QUEUE-1\n`, one line of JSON ([`StoredEnvelope`]),
//! then the message exactly as it will be delivered.
//!
//! **Invariant:** a file appears in `active/` only complete and fsync'd,
//! with its directory entry fsync'd ([`Queue::enqueue`] returns the
//! [`Durable`] proof the session's 250 waits for).

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::durable::{self, Durable};

const MAGIC: &[u8] = b"MTA-QUEUE-1\n";

/// The envelope as stored, with delivery progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredEnvelope {
    pub id: String,
    pub received_unix: u64,
    /// Empty for the null sender `<>`.
    pub from: String,
    pub login: Option<String>,
    /// Local mailboxes still to deliver to.
    pub local: Vec<String>,
    /// Remote recipients still to deliver to.
    pub remote: Vec<String>,
    pub attempts: u32,
    pub next_attempt_unix: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct QueueEntry {
    pub envelope: StoredEnvelope,
    pub held: bool,
    pub size_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue I/O on {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("queue file {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("no queued message with id {0:?}")]
    NotFound(String),
    #[error("{0:?} is not a queue id (expected hexadecimal digits)")]
    BadId(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> QueueError + '_ {
    move |cause| QueueError::Io { path: path.to_owned(), cause }
}

static ID_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
}

impl Queue {
    /// Opens (creating) the queue and discards partial files left by a crash.
    /// Returns the number discarded.
    pub fn open(dir: &Path) -> Result<(Queue, usize), QueueError> {
        let q = Queue { dir: dir.to_owned() };
        for sub in [q.incoming(), q.active(), q.held()] {
            durable::create_dir_durable(&sub).map_err(io_err(&sub))?;
        }
        let mut discarded = 0;
        let incoming = q.incoming();
        for entry in fs::read_dir(&incoming).map_err(io_err(&incoming))? {
            let entry = entry.map_err(io_err(&incoming))?;
            fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
            discarded += 1;
        }
        if discarded > 0 {
            durable::sync_dir(&incoming).map_err(io_err(&incoming))?;
        }
        Ok((q, discarded))
    }

    /// Opens an existing queue for the admin commands, which run beside a
    /// live daemon: nothing is created and nothing discarded (the files in
    /// `incoming/` may be the daemon's writes in progress).
    pub fn attach(dir: &Path) -> Result<Queue, QueueError> {
        let q = Queue { dir: dir.to_owned() };
        for sub in [q.incoming(), q.active(), q.held()] {
            if !sub.is_dir() {
                return Err(QueueError::Corrupt {
                    path: sub,
                    why: "missing: no queue here yet (start `mta serve` once, or check data_dir)".into(),
                });
            }
        }
        Ok(q)
    }

    fn incoming(&self) -> PathBuf {
        self.dir.join("incoming")
    }
    fn active(&self) -> PathBuf {
        self.dir.join("active")
    }
    fn held(&self) -> PathBuf {
        self.dir.join("hold")
    }

    /// A new unique id: seconds, microseconds, a process-wide counter and
    /// randomness (ids stay unique across restarts and processes).
    pub fn new_id() -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let n = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut r = [0u8; 4];
        // Without randomness the counter and pid still make ids unique per process.
        let _ = getrandom::getrandom(&mut r);
        format!(
            "{:x}{:05x}{:04x}{:04x}{:08x}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id() & 0xffff,
            n & 0xffff,
            u32::from_le_bytes(r)
        )
    }

    /// Writes the message durably into `active/`.
    pub fn enqueue(&self, envelope: &StoredEnvelope, message: &[&[u8]]) -> Result<Durable, QueueError> {
        check_id(&envelope.id)?;
        let json = serde_json::to_vec(envelope)
            .map_err(|e| QueueError::Corrupt { path: self.dir.clone(), why: e.to_string() })?;
        let mut parts: Vec<&[u8]> = vec![MAGIC, &json, b"\n"];
        parts.extend_from_slice(message);
        let tmp = self.incoming().join(&envelope.id);
        let dest = self.active().join(&envelope.id);
        durable::write_atomically(&tmp, &dest, &parts).map_err(io_err(&dest))
    }

    fn path_of(&self, id: &str) -> Result<(PathBuf, bool), QueueError> {
        check_id(id)?;
        let active = self.active().join(id);
        if active.exists() {
            return Ok((active, false));
        }
        let held = self.held().join(id);
        if held.exists() {
            return Ok((held, true));
        }
        Err(QueueError::NotFound(id.to_string()))
    }

    /// Envelope and message of one queued message.
    pub fn read(&self, id: &str) -> Result<(StoredEnvelope, Vec<u8>), QueueError> {
        let (path, _) = self.path_of(id)?;
        let f = fs::File::open(&path).map_err(io_err(&path))?;
        let mut r = BufReader::new(f);
        let envelope = read_header(&path, &mut r)?;
        let mut message = Vec::new();
        r.read_to_end(&mut message).map_err(io_err(&path))?;
        Ok((envelope, message))
    }

    /// Every queued message's envelope, oldest id first.
    pub fn list(&self) -> Result<Vec<QueueEntry>, QueueError> {
        let mut out = Vec::new();
        for (dir, held) in [(self.active(), false), (self.held(), true)] {
            for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let entry = entry.map_err(io_err(&dir))?;
                let path = entry.path();
                let size_bytes = entry.metadata().map_err(io_err(&path))?.len();
                let f = fs::File::open(&path).map_err(io_err(&path))?;
                let envelope = read_header(&path, &mut BufReader::new(f))?;
                out.push(QueueEntry { envelope, held, size_bytes });
            }
        }
        out.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
        Ok(out)
    }

    /// Replaces a message's envelope (delivery progress), atomically.
    pub fn update(&self, envelope: &StoredEnvelope) -> Result<(), QueueError> {
        let (path, held) = self.path_of(&envelope.id)?;
        let (_, message) = self.read(&envelope.id)?;
        let json =
            serde_json::to_vec(envelope).map_err(|e| QueueError::Corrupt { path: path.clone(), why: e.to_string() })?;
        // Per process: the daemon and an admin command may update at once.
        let tmp = self.incoming().join(format!("{}.update.{}", envelope.id, std::process::id()));
        let dest = if held { self.held() } else { self.active() }.join(&envelope.id);
        let _proof: Durable =
            durable::write_atomically(&tmp, &dest, &[MAGIC, &json, b"\n", &message]).map_err(io_err(&dest))?;
        Ok(())
    }

    /// Removes a message for good (delivered, or deleted by the admin).
    pub fn remove(&self, id: &str) -> Result<(), QueueError> {
        let (path, _) = self.path_of(id)?;
        fs::remove_file(&path).map_err(io_err(&path))?;
        let dir = path.parent().unwrap_or(&self.dir).to_owned();
        durable::sync_dir(&dir).map_err(io_err(&dir))
    }

    /// Moves a message to `hold/` (`held = true`) or back to `active/`.
    pub fn set_held(&self, id: &str, held: bool) -> Result<(), QueueError> {
        let (path, now_held) = self.path_of(id)?;
        if now_held == held {
            return Ok(());
        }
        let dest = if held { self.held() } else { self.active() }.join(id);
        fs::rename(&path, &dest).map_err(io_err(&dest))?;
        for dir in [self.held(), self.active()] {
            durable::sync_dir(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// Makes every active message due now. Returns how many.
    pub fn flush(&self) -> Result<usize, QueueError> {
        let mut n = 0;
        for entry in self.list()?.into_iter().filter(|e| !e.held) {
            let mut env = entry.envelope;
            env.next_attempt_unix = 0;
            self.update(&env)?;
            n += 1;
        }
        Ok(n)
    }

    /// Ids in `active/` due at `now_unix`.
    pub fn due(&self, now_unix: u64) -> Result<Vec<StoredEnvelope>, QueueError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|e| !e.held && e.envelope.next_attempt_unix <= now_unix)
            .map(|e| e.envelope)
            .collect())
    }
}

fn check_id(id: &str) -> Result<(), QueueError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(QueueError::BadId(id.to_string()));
    }
    Ok(())
}

fn read_header(path: &Path, r: &mut impl BufRead) -> Result<StoredEnvelope, QueueError> {
    let corrupt = |why: String| QueueError::Corrupt { path: path.to_owned(), why };
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(|e| corrupt(format!("short header: {e}")))?;
    if magic != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let mut line = Vec::new();
    r.take(1 << 20).read_until(b'\n', &mut line).map_err(io_err(path))?;
    serde_json::from_slice(&line).map_err(|e| corrupt(format!("bad envelope: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(id: &str) -> StoredEnvelope {
        StoredEnvelope {
            id: id.to_string(),
            received_unix: 1,
            from: "a@remote.example".into(),
            login: None,
            local: vec!["alice@example.org".into()],
            remote: vec![],
            attempts: 0,
            next_attempt_unix: 0,
            last_error: None,
        }
    }

    #[test]
    fn enqueue_read_hold_flush_remove() {
        let dir = std::env::temp_dir().join(format!("mta-queue-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (q, discarded) = Queue::open(&dir).unwrap();
        assert_eq!(discarded, 0);
        let id = Queue::new_id();
        assert_ne!(id, Queue::new_id());
        let _proof = q.enqueue(&envelope(&id), &[b"Received: x\r\n", b"body\r\n"]).unwrap();
        let (env, msg) = q.read(&id).unwrap();
        assert_eq!(env, envelope(&id));
        assert_eq!(msg, b"Received: x\r\nbody\r\n");

        q.set_held(&id, true).unwrap();
        assert!(q.due(10).unwrap().is_empty());
        assert!(q.list().unwrap()[0].held);
        q.set_held(&id, false).unwrap();

        let mut later = env.clone();
        later.next_attempt_unix = 100;
        later.attempts = 1;
        q.update(&later).unwrap();
        assert!(q.due(10).unwrap().is_empty());
        assert_eq!(q.flush().unwrap(), 1);
        assert_eq!(q.due(10).unwrap()[0].attempts, 1);
        assert_eq!(q.read(&id).unwrap().1, b"Received: x\r\nbody\r\n");

        q.remove(&id).unwrap();
        assert!(matches!(q.read(&id), Err(QueueError::NotFound(_))));
        assert!(matches!(q.read("../etc/passwd"), Err(QueueError::BadId(_))));
        fs::remove_dir_all(&dir).unwrap();
    }

    // A crash between create and rename leaves a file in incoming/.
    #[test]
    fn partial_files_are_discarded_at_open() {
        let dir = std::env::temp_dir().join(format!("mta-queue-partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (q, _) = Queue::open(&dir).unwrap();
        fs::write(dir.join("incoming/abc"), b"MTA-QUEUE-1\n{\"id\":").unwrap();
        drop(q);
        // Admin commands attach beside a live daemon: nothing is discarded.
        let attached = Queue::attach(&dir).unwrap();
        assert!(attached.list().unwrap().is_empty());
        assert!(dir.join("incoming/abc").exists());
        assert!(Queue::attach(&dir.join("nonexistent")).is_err());
        let (q, discarded) = Queue::open(&dir).unwrap();
        assert_eq!(discarded, 1);
        assert!(q.list().unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
