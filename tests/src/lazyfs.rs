//! `LazyFs`: a FUSE file system that loses power on command, in the spirit
//! of Jepsen's LazyFS.
//!
//! Every file lives in this process's memory twice: what reads see, and
//! what is *stable*. A write changes only the first; `fsync`/`fdatasync`
//! makes the file's written pages stable. [`LazyFs::power_cut`] drops
//! everything unsynced: each dirty 4 KiB page keeps its new content,
//! reverts to its stable content, or (with `tear`) mixes the two at 512-byte
//! sector granularity. Files are opened with FUSE direct I/O, so the
//! kernel's page cache never holds data this process could lose: a
//! restarted program reads exactly what survived.
//!
//! One flat directory; regular files only; sizes change durably at once
//! (what matters here is data, the replicator's backing files and
//! metadata). Mounting needs root (mount(2)) and `/dev/fuse`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, SessionACL, WriteFlags,
};

const PAGE: u64 = 4096;
const SECTOR: usize = 512;
const TTL: Duration = Duration::from_secs(0);
/// Largest file this test file system holds (memory is the limit).
const FILE_BYTES_MAX: u64 = 1 << 30;

struct File {
    name: String,
    data: Vec<u8>,
    stable: Vec<u8>,
    dirty: BTreeSet<u64>,
}

#[derive(Default)]
struct State {
    files: BTreeMap<u64, File>,
    next_ino: u64,
    /// Pages made stable by fsync and pages lost, for the tests' reports.
    synced_pages: u64,
    cuts: u64,
}

impl State {
    fn by_name(&self, name: &OsStr) -> Option<(u64, &File)> {
        self.files.iter().find(|(_, f)| OsStr::new(&f.name) == name).map(|(i, f)| (*i, f))
    }
}

/// What [`LazyFs::power_cut`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    pub pages_kept: u64,
    pub pages_reverted: u64,
    pub pages_torn: u64,
}

struct Fs {
    state: Arc<Mutex<State>>,
    created: SystemTime,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fs {
    fn attr(&self, ino: u64, size: u64, dir: bool) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: if dir { 0o755 } else { 0o644 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        }
    }

    fn file_attr(&self, state: &State, ino: u64) -> Option<FileAttr> {
        if ino == INodeNo::ROOT.0 {
            return Some(self.attr(ino, 0, true));
        }
        state.files.get(&ino).map(|f| self.attr(ino, f.data.len() as u64, false))
    }
}

fn resize(f: &mut File, size: u64) {
    f.data.resize(size as usize, 0);
    f.stable.resize(size as usize, 0);
    f.dirty.retain(|p| p * PAGE < size);
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = lock(&self.state);
        match state.by_name(name) {
            Some((ino, f)) if parent == INodeNo::ROOT => {
                reply.entry(&TTL, &self.attr(ino, f.data.len() as u64, false), Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let state = lock(&self.state);
        match self.file_attr(&state, ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = lock(&self.state);
        if let (Some(size), Some(f)) = (size, state.files.get_mut(&ino.0)) {
            if size > FILE_BYTES_MAX {
                return reply.error(Errno::EFBIG);
            }
            resize(f, size);
        }
        match self.file_attr(&state, ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let Some(name) = name.to_str() else { return reply.error(Errno::EINVAL) };
        let mut state = lock(&self.state);
        let ino = match state.by_name(OsStr::new(name)) {
            Some((ino, _)) => ino,
            None => {
                state.next_ino += 1;
                let ino = state.next_ino + 1;
                let file =
                    File { name: name.to_string(), data: Vec::new(), stable: Vec::new(), dirty: BTreeSet::new() };
                state.files.insert(ino, file);
                ino
            }
        };
        let size = state.files.get(&ino).map_or(0, |f| f.data.len() as u64);
        reply.created(&TTL, &self.attr(ino, size, false), Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if !lock(&self.state).files.contains_key(&ino.0) {
            return reply.error(Errno::EISDIR);
        }
        // No kernel page cache: it would outlive a power cut.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = lock(&self.state);
        let Some(f) = state.files.get(&ino.0) else { return reply.error(Errno::ENOENT) };
        let start = (offset as usize).min(f.data.len());
        let end = (start + size as usize).min(f.data.len());
        reply.data(&f.data[start..end])
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = lock(&self.state);
        let Some(f) = state.files.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        let end = offset + data.len() as u64;
        if end > FILE_BYTES_MAX {
            return reply.error(Errno::EFBIG);
        }
        if end > f.data.len() as u64 {
            resize(f, end);
        }
        f.data[offset as usize..end as usize].copy_from_slice(data);
        f.dirty.extend(offset / PAGE..end.div_ceil(PAGE));
        reply.written(data.len() as u32)
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2) promises nothing about durability.
        reply.ok()
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut state = lock(&self.state);
        let Some(f) = state.files.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        let pages = std::mem::take(&mut f.dirty);
        for p in &pages {
            let (start, end) = ((p * PAGE) as usize, (((p + 1) * PAGE) as usize).min(f.data.len()));
            f.stable[start..end].copy_from_slice(&f.data[start..end]);
        }
        state.synced_pages += pages.len() as u64;
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut state = lock(&self.state);
        let Some(f) = state.files.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        let Some(end) = offset.checked_add(length).filter(|e| *e <= FILE_BYTES_MAX) else {
            return reply.error(Errno::EFBIG);
        };
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let zero = match mode {
            0 => false,
            m if m == keep => false,
            m if m == libc::FALLOC_FL_PUNCH_HOLE | keep => true,
            m if m == libc::FALLOC_FL_ZERO_RANGE || m == libc::FALLOC_FL_ZERO_RANGE | keep => true,
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        if mode & keep == 0 && end > f.data.len() as u64 {
            resize(f, end);
        }
        if zero {
            let end = end.min(f.data.len() as u64);
            if offset < end {
                f.data[offset as usize..end as usize].fill(0);
                f.dirty.extend(offset / PAGE..end.div_ceil(PAGE));
            }
        }
        reply.ok()
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let state = lock(&self.state);
        let mut entries = vec![(INodeNo::ROOT, FileType::Directory, ".".to_string())];
        entries.push((INodeNo::ROOT, FileType::Directory, "..".to_string()));
        entries.extend(state.files.iter().map(|(i, f)| (INodeNo(*i), FileType::RegularFile, f.name.clone())));
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok()
    }
}

/// A mounted [`LazyFs`]; unmounted on drop.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl LazyFs {
    pub fn mount(mountpoint: &Path) -> Result<LazyFs> {
        std::fs::create_dir_all(mountpoint).with_context(|| format!("create {}", mountpoint.display()))?;
        let state = Arc::new(Mutex::new(State::default()));
        let fs = Fs { state: state.clone(), created: SystemTime::now() };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("lazyfs".into()), MountOption::RW];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(fs, mountpoint, &config)
            .with_context(|| format!("mount LazyFs on {}", mountpoint.display()))?;
        Ok(LazyFs { state, mountpoint: mountpoint.to_path_buf(), session: Some(session) })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Power loss: every page written since its last fsync keeps its new
    /// content, reverts, or (`tear`) mixes both by 512-byte sectors, as the
    /// seed picks. The process using the files must be dead already.
    pub fn power_cut(&self, seed: u64, tear: bool) -> CutReport {
        let mut rng = seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut report = CutReport::default();
        let mut state = lock(&self.state);
        state.cuts += 1;
        for f in state.files.values_mut() {
            for p in std::mem::take(&mut f.dirty) {
                let (start, end) = ((p * PAGE) as usize, (((p + 1) * PAGE) as usize).min(f.data.len()));
                match next() % if tear { 3 } else { 2 } {
                    0 => report.pages_kept += 1,
                    1 => {
                        f.data[start..end].copy_from_slice(&f.stable[start..end]);
                        report.pages_reverted += 1;
                    }
                    _ => {
                        for s in (start..end).step_by(SECTOR) {
                            let e = (s + SECTOR).min(end);
                            if next() % 2 == 0 {
                                f.data[s..e].copy_from_slice(&f.stable[s..e]);
                            }
                        }
                        report.pages_torn += 1;
                    }
                }
                f.stable[start..end].copy_from_slice(&f.data[start..end]);
            }
        }
        report
    }

    /// Pages written and not yet synced, over all files.
    pub fn unsynced_pages(&self) -> u64 {
        lock(&self.state).files.values().map(|f| f.dirty.len() as u64).sum()
    }

    /// Pages made stable by fsync so far.
    pub fn synced_pages(&self) -> u64 {
        lock(&self.state).synced_pages
    }

    /// A file's current content (what a read sees), without FUSE.
    pub fn contents(&self, name: &str) -> io::Result<Vec<u8>> {
        let state = lock(&self.state);
        state
            .by_name(OsStr::new(name))
            .map(|(_, f)| f.data.clone())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_string()))
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        // A lazy unmount first, so that a process still holding a file
        // cannot keep the session (and this drop) waiting.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        drop(self.session.take());
    }
}
