//! `LogStore`, the `raft::Storage` the core reads (in memory), and
//! `StateFile`, its durable mirror in `<state_dir>/raft.log` (format in
//! `record`).
//!
//! The raft task changes both together: it encodes the change into the
//! file's pending bytes, updates the `LogStore`, then writes and fsyncs the
//! pending bytes (on a blocking thread) before sending anything that depends
//! on them. A new snapshot (compaction, or one received from the leader)
//! rewrites the whole file: temp file, fsync, rename, fsync the directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use super::record::{self, Replayed};
use super::{raft_id, RaftLogConfig, RaftLogError};

pub(crate) const STATE_FILE: &str = "raft.log";
const STATE_FILE_TMP: &str = "raft.log.tmp";

/// The raft log as the core reads it: the snapshot, the entries after it
/// and the hard state, all durable (never ahead of the state file).
pub(crate) struct LogStore {
    hard_state: HardState,
    conf_state: ConfState,
    /// The log index whose conf-change entries `conf_state` already
    /// includes: replaying committed entries up to it must not apply them
    /// again (a forced single-voter membership would be undone).
    conf_index: u64,
    snapshot: Snapshot,
    /// `entries[i].index == snapshot index + 1 + i`.
    entries: Vec<Entry>,
}

impl LogStore {
    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn last(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }

    pub(crate) fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub(crate) fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    pub(crate) fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub(crate) fn conf_index(&self) -> u64 {
        self.conf_index
    }

    /// Records a new membership that includes the log's conf changes up to
    /// `index`; the caller persists `membership()` before acting on it.
    pub(crate) fn set_conf_state(&mut self, cs: ConfState, index: u64) {
        self.conf_state = cs;
        self.conf_index = self.conf_index.max(index);
    }

    /// The membership as the state file stores it.
    pub(crate) fn membership(&self) -> SnapshotMetadata {
        let mut m = SnapshotMetadata { index: self.conf_index, ..Default::default() };
        m.set_conf_state(self.conf_state.clone());
        m
    }

    /// Appends entries from a `Ready`, replacing any conflicting suffix.
    pub(crate) fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        let base = self.snapshot_index() + 1;
        // raft never hands out entries before the snapshot or after a gap.
        assert!(
            first.index >= base && first.index <= self.last() + 1,
            "raft appended entry {} outside {}..={}",
            first.index,
            base,
            self.last() + 1
        );
        self.entries.truncate((first.index - base) as usize);
        self.entries.extend_from_slice(ents);
    }

    pub(crate) fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    pub(crate) fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    /// Installs a snapshot received from the leader: it replaces the log.
    pub(crate) fn install_snapshot(&mut self, snap: Snapshot) {
        let meta = snap.get_metadata();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        if let Some(cs) = meta.conf_state.as_ref() {
            self.conf_state = cs.clone();
            self.conf_index = meta.index;
        }
        self.entries.clear();
        self.snapshot = snap;
    }

    /// Makes `state` (the daemon's fold up to `index`, a committed index in
    /// the log) the snapshot and drops the entries it covers.
    pub(crate) fn compact(&mut self, index: u64, state: Vec<u8>) -> Result<(), String> {
        if index <= self.snapshot_index() {
            return Err(format!("index {index} is not after the snapshot at {}", self.snapshot_index()));
        }
        if index > self.hard_state.commit {
            return Err(format!("index {index} is not committed (commit {})", self.hard_state.commit));
        }
        let term = raft::Storage::term(self, index).map_err(|e| format!("no term for index {index}: {e}"))?;
        let mut snap = Snapshot { data: state.into(), ..Default::default() };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        let drop = (index - self.snapshot_index()) as usize;
        self.entries.drain(..drop);
        self.snapshot = snap;
        Ok(())
    }

    /// The whole state as a file image.
    pub(crate) fn image(&self) -> Vec<u8> {
        record::image(&self.snapshot, &self.membership(), &self.entries, &self.hard_state)
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let base = self.snapshot_index() + 1;
        if low < base {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut ents = self.entries[(low - base) as usize..(high - base) as usize].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.snapshot_index();
        if idx == snap {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < snap {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - snap - 1) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snapshot_index() + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // Without a compaction every entry is still in the log, so a
        // follower never needs a snapshot; raft retries later otherwise.
        if self.snapshot_index() == 0 || self.snapshot_index() < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let mut snap = self.snapshot.clone();
        // A snapshot taken while this node was the only voter names only
        // it; the peer it is sent to was added back since (the leader sends
        // only to voters), and raft-rs refuses a snapshot whose voters omit
        // the receiver. The current voters are a superset that the entries
        // after the snapshot (the AddNode among them) lead to anyway.
        let names_receiver = |cs: &ConfState| cs.voters.contains(&to) || cs.learners.contains(&to);
        if snap.get_metadata().conf_state.as_ref().is_some_and(|cs| !names_receiver(cs))
            && names_receiver(&self.conf_state)
        {
            snap.mut_metadata().set_conf_state(self.conf_state.clone());
        }
        Ok(snap)
    }
}

/// What the raft task hands to a blocking thread: items to append (as one
/// frame), or a whole new file.
pub(crate) enum DiskWrite {
    Append(Vec<u8>),
    Rewrite(Vec<u8>),
}

/// The durable mirror of the `LogStore`.
pub(crate) struct StateFile {
    dir: PathBuf,
    path: PathBuf,
    file: File,
}

impl StateFile {
    /// Writes and fsyncs; blocking (run it on a blocking thread).
    pub(crate) fn write(&mut self, w: DiskWrite) -> Result<(), RaftLogError> {
        match w {
            DiskWrite::Append(bytes) => {
                if !bytes.is_empty() {
                    // One frame per write: only the last write can be torn.
                    self.file.write_all(&record::frame(&bytes)).map_err(|e| self.err("append to", e))?;
                }
                self.file.sync_data().map_err(|e| self.err("fsync", e))
            }
            DiskWrite::Rewrite(image) => {
                self.file = replace_file(&self.dir, &image)?;
                Ok(())
            }
        }
    }

    fn err(&self, action: &'static str, source: std::io::Error) -> RaftLogError {
        RaftLogError::Io { action, path: self.path.clone(), source }
    }
}

/// Writes `image` as the new state file atomically and returns it opened
/// for appending.
fn replace_file(dir: &Path, image: &[u8]) -> Result<File, RaftLogError> {
    let tmp = dir.join(STATE_FILE_TMP);
    let path = dir.join(STATE_FILE);
    let io = |action, path: &Path, source| RaftLogError::Io { action, path: path.to_owned(), source };
    let mut f = File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
    f.write_all(image).map_err(|e| io("write", &tmp, e))?;
    f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(|e| io("rename into place", &path, e))?;
    sync_dir(dir)?;
    OpenOptions::new().append(true).open(&path).map_err(|e| io("open", &path, e))
}

fn sync_dir(dir: &Path) -> Result<(), RaftLogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| RaftLogError::Io {
        action: "fsync the directory",
        path: dir.to_owned(),
        source,
    })
}

/// A snapshot to hand to the daemon at start-up: (index, data).
pub(crate) type StartSnapshot = Option<(u64, Vec<u8>)>;

/// Opens (or creates) the state directory and replays the state file. A
/// torn tail is cut off; corruption is an error naming the fix.
pub(crate) fn open(cfg: &RaftLogConfig) -> Result<(LogStore, StateFile, StartSnapshot), RaftLogError> {
    let dir = cfg.state_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| RaftLogError::Io {
        action: "create the state directory",
        path: dir.clone(),
        source,
    })?;
    let path = dir.join(STATE_FILE);
    let mut voters: Vec<u64> = cfg.peers.iter().map(|p| raft_id(p.id)).collect();
    voters.push(raft_id(cfg.me));
    voters.sort_unstable();
    let conf_state = ConfState { voters: voters.clone(), ..Default::default() };

    let replayed = match File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A new node: every node starts from the same voter set and an
            // empty log (raft-rs's bootstrap by identical initial state).
            let empty = LogStore {
                hard_state: HardState::default(),
                conf_state: conf_state.clone(),
                conf_index: 0,
                snapshot: Snapshot::default(),
                entries: Vec::new(),
            };
            let file = replace_file(&dir, &empty.image())?;
            tracing::info!(path = %path.display(), "cluster log: new state file");
            return Ok((empty, StateFile { dir, path, file }, None));
        }
        Err(source) => return Err(RaftLogError::Io { action: "open", path, source }),
        Ok(mut f) => {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map_err(|source| RaftLogError::Io {
                action: "read",
                path: path.clone(),
                source,
            })?;
            record::replay(&bytes).map_err(|c| RaftLogError::Corrupt {
                path: path.clone(),
                dir: dir.clone(),
                offset: c.offset,
                why: c.why,
            })?
        }
    };
    let Replayed { hard_state, snapshot, entries, membership, valid_bytes, torn_bytes } = replayed;
    let file = OpenOptions::new().append(true).open(&path).map_err(|source| RaftLogError::Io {
        action: "open",
        path: path.clone(),
        source,
    })?;
    if torn_bytes > 0 {
        tracing::warn!(path = %path.display(), torn_bytes, "cluster log: discarding a torn tail (an unfinished write before a crash)");
        file.set_len(valid_bytes).and_then(|()| file.sync_all()).map_err(|source| RaftLogError::Io {
            action: "truncate the torn tail of",
            path: path.clone(),
            source,
        })?;
    }
    // Two-node mode may have shrunk the voters to this node alone (see
    // `RaftLog::force_single_voter`); any other difference means the node
    // list changed under the log.
    let (conf_state, conf_index) = match membership.as_ref().and_then(|m| m.conf_state.as_ref().map(|cs| (cs, m.index)))
    {
        Some((cs, index)) => {
            let mut stored = cs.voters.clone();
            stored.sort_unstable();
            if stored.is_empty() || stored.iter().any(|v| !voters.contains(v)) {
                return Err(RaftLogError::Config(format!(
                    "the voters recorded in {} ({stored:?}) are not among the configured nodes ({voters:?}); \
                     membership follows the node list: restore it, or remove the state directory {} on every node \
                     to start a new cluster log",
                    path.display(),
                    dir.display()
                )));
            }
            (cs.clone(), index)
        }
        None => (conf_state, 0),
    };
    let start = (snapshot.get_metadata().index > 0).then(|| (snapshot.get_metadata().index, snapshot.data.to_vec()));
    tracing::info!(
        path = %path.display(),
        snapshot = snapshot.get_metadata().index,
        entries = entries.len(),
        commit = hard_state.commit,
        term = hard_state.term,
        "cluster log: state loaded"
    );
    let store = LogStore { hard_state, conf_state, conf_index, snapshot, entries };
    Ok((store, StateFile { dir, path, file }, start))
}
