//! `VolumeFs`: a FUSE filesystem with one regular file, the export. Reads,
//! writes, fsync and hole punching become NBD requests; replies are sent
//! from the NBD reader thread, so the FUSE loop never blocks on the network.

use std::ffi::OsStr;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    WriteFlags,
};

use crate::limits::{BLOCK_SIZE_BYTES, RANGE_REQUEST_BYTES_MAX, REQUEST_BYTES_MAX};
use crate::nbd::{Client, IoError};

/// Inode of the one file.
pub const VOLUME_INO: INodeNo = INodeNo(2);
/// Attributes never change behind the kernel's back; cache them.
const ATTR_TTL: Duration = Duration::from_secs(3600);

pub struct VolumeFs {
    client: Client,
    name: String,
    size_bytes: u64,
    read_only: bool,
    created: SystemTime,
    uid: u32,
    gid: u32,
}

impl VolumeFs {
    pub fn new(client: Client, name: &str) -> VolumeFs {
        let info = client.info();
        // SAFETY: getuid/getgid cannot fail and have no side effects.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        VolumeFs {
            client,
            name: name.to_string(),
            size_bytes: info.size_bytes,
            read_only: info.read_only(),
            created: SystemTime::now(),
            uid,
            gid,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o700, 0, 2),
            VOLUME_INO => (FileType::RegularFile, if self.read_only { 0o400 } else { 0o600 }, self.size_bytes, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE_BYTES,
            flags: 0,
        })
    }

    /// Clamps a request to the export: the kernel may read past the end.
    fn clamp(&self, offset: u64, size: u32) -> u32 {
        let left = self.size_bytes.saturating_sub(offset);
        u32::try_from(left.min(u64::from(size))).unwrap_or(size)
    }
}

fn errno(e: IoError) -> Errno {
    Errno::from_i32(e.errno())
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // 1 MiB requests; the kernel reports what it accepts if less.
        let _ = config.set_max_write(REQUEST_BYTES_MAX);
        let _ = config.set_max_readahead(REQUEST_BYTES_MAX);
        // Async direct I/O lets the loop device keep several requests in flight.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO | InitFlags::FUSE_MAX_PAGES);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.attr(VOLUME_INO)) {
            (INodeNo::ROOT, Some(attr)) if name == OsStr::new(&self.name) => {
                reply.entry(&ATTR_TTL, &attr, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&ATTR_TTL, &a),
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
        // The export's size is fixed; everything else is accepted and ignored.
        match (self.attr(ino), size) {
            (Some(_), Some(s)) if s != self.size_bytes => reply.error(Errno::EPERM),
            (Some(a), _) => reply.attr(&ATTR_TTL, &a),
            (None, _) => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != VOLUME_INO {
            return reply.error(Errno::EISDIR);
        }
        // No FUSE page cache: the loop device (or the filesystem above it)
        // caches, and a second cache would hide write errors until writeback.
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
        if ino != VOLUME_INO {
            return reply.error(Errno::EISDIR);
        }
        let n = self.clamp(offset, size);
        if n == 0 {
            return reply.data(&[]);
        }
        self.client.read(
            offset,
            n,
            Box::new(move |r| match r {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(e)),
            }),
        );
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
        if ino != VOLUME_INO {
            return reply.error(Errno::EISDIR);
        }
        let Ok(len) = u32::try_from(data.len()) else {
            return reply.error(Errno::EINVAL);
        };
        if self.clamp(offset, len) != len {
            // Writing past the end of a fixed-size device.
            return reply.error(Errno::ENOSPC);
        }
        self.client.write(
            offset,
            data,
            false,
            Box::new(move |r| match r {
                Ok(_) => reply.written(len),
                Err(e) => reply.error(errno(e)),
            }),
        );
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2): writes went through already (direct I/O); durability is fsync's job.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.client.flush(Box::new(move |r| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }));
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
        if ino != VOLUME_INO {
            return reply.error(Errno::EISDIR);
        }
        if offset.checked_add(length).is_none_or(|end| end > self.size_bytes) {
            return reply.error(Errno::EINVAL);
        }
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        // The loop device turns discards (and zeroing that may unmap) into
        // PUNCH_HOLE, and zeroing that must stay allocated into ZERO_RANGE.
        // Both promise zeros on a later read, which NBD_CMD_TRIM does not:
        // both become WRITE_ZEROES, PUNCH_HOLE letting the server punch.
        let no_hole = match mode {
            m if m == libc::FALLOC_FL_PUNCH_HOLE | keep => false,
            m if m == libc::FALLOC_FL_ZERO_RANGE || m == libc::FALLOC_FL_ZERO_RANGE | keep => true,
            // Plain preallocation inside a fixed-size device is a no-op.
            0 | libc::FALLOC_FL_KEEP_SIZE => return reply.ok(),
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        // NBD lengths are 32-bit: a large range becomes several requests,
        // and the reply waits for all of them (the first error wins).
        let chunk = u64::from(RANGE_REQUEST_BYTES_MAX);
        let ranges: Vec<(u64, u32)> = (0..length.div_ceil(chunk))
            .map(|i| {
                let o = offset + i * chunk;
                (o, u32::try_from((offset + length - o).min(chunk)).expect("chunk fits u32"))
            })
            .collect();
        if ranges.is_empty() {
            return reply.ok();
        }
        let state = Arc::new(Mutex::new((ranges.len(), Some(reply), None::<IoError>)));
        for (o, l) in ranges {
            let state = state.clone();
            let done: crate::nbd::client::Done = Box::new(move |r| {
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                st.0 -= 1;
                if let Err(e) = r {
                    st.2.get_or_insert(e);
                }
                if st.0 == 0 {
                    if let Some(reply) = st.1.take() {
                        match st.2 {
                            None => reply.ok(),
                            Some(e) => reply.error(errno(e)),
                        }
                    }
                }
            });
            self.client.write_zeroes(o, l, no_hole, done)
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (VOLUME_INO, FileType::RegularFile, self.name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
