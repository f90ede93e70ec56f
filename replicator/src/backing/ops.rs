//! Per-request state machines: the range and permission checks done before
//! any I/O, how each [`IoOp`] becomes SQEs, and how each CQE advances it
//! (resubmitting the rest of a short transfer) until it can be answered.
//!
//! The engine owns the states; the SQEs built here point into buffers owned
//! by the state (or by the engine, for the shared zero buffer), which is why
//! a state must stay alive until its last CQE.

use io_uring::{opcode, squeue::Entry, types};

use super::buf::{AlignedBuf, WriteBuf};
use super::shared::{OpKind, Shared};
use super::zero::ZeroOp;
use super::{extents, IoCompletion, IoFailure, IoOp, IoOutput, IoRequest};

/// Fixed-file slots every ring registers (see `engine`).
pub(super) const FILE_BUFFERED: u32 = 0;
pub(super) const FILE_EVENTFD: u32 = 1;
pub(super) const FILE_DIRECT: u32 = 2;

/// Reads at least this large run in an io-wq worker (see `OpState::sqe`).
const LARGE_READ_BYTES: usize = 256 * 1024;

/// Buffered reads and writes up to this size may be done inline (see
/// `OpState::try_inline`).
const INLINE_MAX_BYTES: usize = 64 * 1024;

pub(super) type IoResult = Result<IoOutput, IoFailure>;

/// What the ops need from their I/O thread besides the shared state.
pub(super) struct Env<'a> {
    pub shared: &'a Shared,
    /// Source of zero-writes, allocated on first use and owned by the thread
    /// so that any number of in-flight writes can read from it.
    pub zero_buf: &'a mut Option<AlignedBuf>,
}

/// Outcome of starting an operation.
pub(super) enum Begin {
    /// Answered without the ring (no-ops, block status, known-unsupported).
    Now(IoResult),
    /// Needs the ring; the engine submits `state.sqe()`.
    Pending(OpState),
}

/// Outcome of one CQE.
pub(super) enum Step {
    Submit(Entry),
    Finish(IoResult),
}

pub(super) enum OpState {
    Read { buf: AlignedBuf, offset: u64, done: u32, uncached: bool },
    Write { data: WriteBuf, offset: u64, done: u32, fua: bool, uncached: bool },
    Flush,
    Trim { offset: u64, len: u32 },
    Zero(ZeroOp),
}

/// Refuses what must never reach the disk: writes to a read-only store and
/// anything reaching past the data area (the metadata lives there).
pub(super) fn validate(op: &IoOp, shared: &Shared) -> Result<(), IoFailure> {
    let (offset, len, writes) = match op {
        IoOp::Read { offset, len, .. } | IoOp::BlockStatus { offset, len } => (*offset, u64::from(*len), false),
        IoOp::Write { offset, data, .. } => {
            if u32::try_from(data.len()).is_err() {
                return Err(IoFailure::Errno(libc::EINVAL));
            }
            (*offset, data.len() as u64, true)
        }
        IoOp::Trim { offset, len } | IoOp::WriteZeroes { offset, len, .. } => (*offset, u64::from(*len), true),
        // A flush on a read-only store is harmless (and fdatasync allows it).
        IoOp::Flush => return Ok(()),
    };
    if writes && shared.read_only {
        return Err(IoFailure::ReadOnly);
    }
    match offset.checked_add(len) {
        Some(end) if end <= shared.data_size => Ok(()),
        _ => Err(IoFailure::OutOfRange),
    }
}

/// Counter class and payload bytes of `op`, taken before it is consumed.
pub(super) fn account(op: &IoOp) -> (OpKind, u64) {
    match op {
        IoOp::Read { len, .. } => (OpKind::Read, u64::from(*len)),
        IoOp::Write { data, .. } => (OpKind::Write, data.len() as u64),
        IoOp::Flush => (OpKind::Flush, 0),
        IoOp::Trim { .. } => (OpKind::Trim, 0),
        IoOp::WriteZeroes { .. } => (OpKind::WriteZeroes, 0),
        IoOp::BlockStatus { .. } => (OpKind::BlockStatus, 0),
    }
}

/// Answers a request (counting it); a vanished receiver is not our problem.
pub(super) fn answer(shared: &Shared, req: IoRequest, result: IoResult) {
    let (kind, bytes) = account(&req.op);
    finish(shared, kind, bytes, req.tag, &req.done, result);
}

pub(super) fn finish(
    shared: &Shared,
    kind: OpKind,
    bytes: u64,
    tag: u64,
    done: &super::CompletionSender,
    result: IoResult,
) {
    shared.stats.record(kind, bytes, result.is_ok());
    let _ = done.send(IoCompletion { tag, result });
}

/// Starts a validated operation.
pub(super) fn begin(op: IoOp, env: &mut Env<'_>) -> Begin {
    let state = match op {
        IoOp::Read { len: 0, .. } => return Begin::Now(Ok(IoOutput::Read(AlignedBuf::new()))),
        IoOp::Read { offset, len, uncached } => {
            OpState::Read { buf: AlignedBuf::for_overwrite(len as usize), offset, done: 0, uncached }
        }
        IoOp::Write { data, .. } if data.is_empty() => return Begin::Now(Ok(IoOutput::Done)),
        IoOp::Write { offset, data, fua, uncached } => OpState::Write { data, offset, done: 0, fua, uncached },
        IoOp::Flush => OpState::Flush,
        IoOp::Trim { len: 0, .. } => return Begin::Now(Ok(IoOutput::Done)),
        // Trim is advisory: once the fs said it cannot punch holes, skip it.
        IoOp::Trim { .. } if !env.shared.trim_ok.load(std::sync::atomic::Ordering::Relaxed) => {
            return Begin::Now(Ok(IoOutput::Done))
        }
        IoOp::Trim { offset, len } => OpState::Trim { offset, len },
        IoOp::WriteZeroes { offset, len, may_trim, fast_only, fua } => {
            match ZeroOp::begin(offset, len, may_trim, fast_only, fua, env.shared) {
                Ok(zero) => OpState::Zero(zero),
                Err(result) => return Begin::Now(result),
            }
        }
        // lseek is cheap and never waits for I/O; no need for the ring.
        IoOp::BlockStatus { offset, len } => {
            return Begin::Now(extents::block_status(env.shared, offset, len).map(IoOutput::Extents))
        }
    };
    Begin::Pending(state)
}

impl OpState {
    /// The SQE for the current step (also used to retry after EAGAIN/EINTR).
    pub(super) fn sqe(&mut self, env: &mut Env<'_>) -> Entry {
        match self {
            OpState::Read { buf, offset, done, uncached } => {
                let rest = &mut buf[*done as usize..];
                let pos = *offset + u64::from(*done);
                let fd = pick_fd(env.shared, pos, rest.len(), rest.as_ptr());
                let flags = cache_flags(env.shared, fd, *uncached);
                let (ptr, len) = (rest.as_mut_ptr(), len32(rest.len()));
                if rest.len() < LARGE_READ_BYTES || fd.0 != FILE_BUFFERED {
                    return opcode::Read::new(fd, ptr, len).offset(pos).rw_flags(flags).build();
                }
                // A large page-cache read is a long memcpy; done inline it
                // would keep the ring thread from sending and receiving
                // meanwhile. A kernel worker does it on the other core, given
                // the plain descriptor (see `buffered_fd`). O_DIRECT reads
                // copy nothing and are asynchronous in the ring anyway.
                opcode::Read::new(buffered_fd(env.shared), ptr, len)
                    .offset(pos)
                    .rw_flags(flags)
                    .build()
                    .flags(io_uring::squeue::Flags::ASYNC)
            }
            OpState::Write { data, offset, done, fua, uncached } => {
                let rest = &data[*done as usize..];
                let pos = *offset + u64::from(*done);
                write_sqe(env.shared, pos, rest, *fua, *uncached)
            }
            OpState::Flush => flush_sqe(env.shared),
            OpState::Trim { offset, len } => fallocate_sqe(env.shared, *offset, *len, libc::FALLOC_FL_PUNCH_HOLE),
            OpState::Zero(zero) => zero.sqe(env),
        }
    }

    /// A small page-cache read or non-FUA write, done here with one system
    /// call instead of through the ring, when the engine allows it
    /// (`Engine::may_inline`). Through the ring, a buffered write on ext4
    /// goes to an io-wq worker (no non-blocking buffered write path),
    /// costing two thread wake-ups; a read needs another `io_uring_enter`
    /// before its reply can be sent. Reads use RWF_NOWAIT, so data not in
    /// the page cache still goes through the ring and never blocks this
    /// thread. Uncached transfers always go through the ring.
    /// `None`: the ring does it (or, after a short transfer, the rest).
    pub(super) fn try_inline(&mut self, env: &Env<'_>) -> Option<IoResult> {
        match self {
            OpState::Write { data, offset, done, fua: false, uncached: false } => {
                use std::os::unix::fs::FileExt;
                let rest = &data[*done as usize..];
                let pos = *offset + u64::from(*done);
                if !inline_fits(env.shared, pos, rest) {
                    return None;
                }
                match env.shared.files.buffered.write_at(rest, pos) {
                    Ok(n) if n == rest.len() => Some(Ok(IoOutput::Done)),
                    Ok(n) => {
                        *done += len32(n);
                        None
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
                    Err(e) => Some(Err(IoFailure::Errno(e.raw_os_error().unwrap_or(libc::EIO)))),
                }
            }
            OpState::Read { buf, offset, done, uncached: false } => {
                let pos = *offset + u64::from(*done);
                let rest = &mut buf[*done as usize..];
                if !inline_fits(env.shared, pos, rest) {
                    return None;
                }
                let n = read_nowait(&env.shared.files.buffered, rest, pos)?;
                if n == 0 {
                    // EOF inside the data area reads as zeros (see `advance`).
                    rest.fill(0);
                    return Some(Ok(IoOutput::Read(std::mem::take(buf))));
                }
                *done += len32(n);
                (*done as usize == buf.len()).then(|| Ok(IoOutput::Read(std::mem::take(buf))))
            }
            _ => None,
        }
    }

    /// Consumes one CQE result (`res` < 0 is a negated errno).
    pub(super) fn advance(&mut self, res: i32, env: &mut Env<'_>) -> Step {
        if res == -libc::EOPNOTSUPP && self.take_uncached() {
            // No RWF_DONTCACHE here (at most one retry: the flag is gone).
            no_dontcache(env.shared);
            return Step::Submit(self.sqe(env));
        }
        match self {
            OpState::Read { buf, done, .. } => {
                let n = match transferred(res) {
                    Ok(n) => n,
                    Err(failure) => return Step::Finish(Err(failure)),
                };
                if n == 0 {
                    // EOF inside the data area: a regular file shorter than
                    // the data area. The space beyond reads as zeros.
                    buf[*done as usize..].fill(0);
                    return Step::Finish(Ok(IoOutput::Read(std::mem::take(buf))));
                }
                *done += n;
                assert!(*done as usize <= buf.len(), "kernel read past the buffer");
                if *done as usize == buf.len() {
                    Step::Finish(Ok(IoOutput::Read(std::mem::take(buf))))
                } else {
                    Step::Submit(self.sqe(env))
                }
            }
            OpState::Write { data, done, .. } => {
                let n = match transferred(res) {
                    // A write that makes no progress would loop forever.
                    Ok(0) => return Step::Finish(Err(IoFailure::Errno(libc::EIO))),
                    Ok(n) => n,
                    Err(failure) => return Step::Finish(Err(failure)),
                };
                *done += n;
                assert!(*done as usize <= data.len(), "kernel wrote past the buffer");
                if *done as usize == data.len() {
                    Step::Finish(Ok(IoOutput::Done))
                } else {
                    Step::Submit(self.sqe(env))
                }
            }
            OpState::Flush => Step::Finish(transferred(res).map(|_| IoOutput::Done)),
            OpState::Trim { .. } => Step::Finish(match res {
                r if r >= 0 => Ok(IoOutput::Done),
                r if unsupported(r) => {
                    disable(&env.shared.trim_ok, "punch hole");
                    Ok(IoOutput::Done)
                }
                // Unaligned for this device, say; trim is only a hint.
                r if r == -libc::EINVAL => Ok(IoOutput::Done),
                r => Err(IoFailure::Errno(-r)),
            }),
            OpState::Zero(zero) => zero.advance(res, env),
        }
    }
}

impl OpState {
    /// Turns an uncached transfer into a cached one; whether it was one.
    fn take_uncached(&mut self) -> bool {
        match self {
            OpState::Read { uncached, .. } | OpState::Write { uncached, .. } => std::mem::take(uncached),
            _ => false,
        }
    }
}

/// The file system refused RWF_DONTCACHE: stop asking for it.
fn no_dontcache(shared: &Shared) {
    if shared.dontcache_ok.swap(false, std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(
            "backing store does not support uncached (RWF_DONTCACHE) transfers; bulk data goes through the page cache"
        );
    }
}

/// Bytes moved by a read or write CQE, or the failure.
pub(super) fn transferred(res: i32) -> Result<u32, IoFailure> {
    u32::try_from(res).map_err(|_| IoFailure::Errno(res.saturating_neg()))
}

/// Whether a CQE result means "this fallocate mode is not implemented here".
pub(super) fn unsupported(res: i32) -> bool {
    res == -libc::EOPNOTSUPP || res == -libc::ENOSYS
}

/// Remembers for the whole backing that an fallocate mode does not work.
pub(super) fn disable(flag: &std::sync::atomic::AtomicBool, what: &str) {
    if flag.swap(false, std::sync::atomic::Ordering::Relaxed) {
        tracing::info!("backing store does not support fallocate {what}; not trying again");
    }
}

pub(super) fn write_sqe(shared: &Shared, pos: u64, bytes: &[u8], fua: bool, uncached: bool) -> Entry {
    let fd = pick_fd(shared, pos, bytes.len(), bytes.as_ptr());
    let durable = if fua { libc::RWF_DSYNC } else { 0 };
    let flags = durable | cache_flags(shared, fd, uncached);
    opcode::Write::new(fd, bytes.as_ptr(), len32(bytes.len())).offset(pos).rw_flags(flags).build()
}

/// RWF_DONTCACHE (not yet in `libc`): the page cache drops the data once
/// the transfer (for writes: the writeback) is done.
const RWF_DONTCACHE: libc::c_int = 0x80;

/// The read/write flags that keep an uncached transfer out of the page
/// cache, while the file system has not refused them; O_DIRECT transfers
/// bypass the cache anyway.
fn cache_flags(shared: &Shared, fd: types::Fixed, uncached: bool) -> libc::c_int {
    if uncached && fd.0 == FILE_BUFFERED && shared.dontcache_ok.load(std::sync::atomic::Ordering::Relaxed) {
        RWF_DONTCACHE
    } else {
        0
    }
}

/// fdatasync; io_uring always runs it in an io-wq worker, so it names the
/// plain descriptor (see `buffered_fd`).
pub(super) fn flush_sqe(shared: &Shared) -> Entry {
    // fdatasync acts on the inode, so the buffered descriptor also covers
    // writes that went through the O_DIRECT one.
    opcode::Fsync::new(buffered_fd(shared)).flags(types::FsyncFlags::DATASYNC).build()
}

/// fallocate; like fdatasync, always run in an io-wq worker.
pub(super) fn fallocate_sqe(shared: &Shared, offset: u64, len: u32, mode: libc::c_int) -> Entry {
    opcode::Fallocate::new(buffered_fd(shared), u64::from(len))
        .offset(offset)
        .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
        .build()
}

/// O_DIRECT when offset, length and address are all aligned for it, the
/// page cache otherwise (O_DIRECT would fail with EINVAL).
fn pick_fd(shared: &Shared, pos: u64, len: usize, addr: *const u8) -> types::Fixed {
    // direct_align is a power of two (checked at open).
    let mask = shared.files.direct_align - 1;
    let aligned = (pos | len as u64 | addr as u64) & mask == 0;
    if aligned && shared.files.direct.is_some() {
        types::Fixed(FILE_DIRECT)
    } else {
        types::Fixed(FILE_BUFFERED)
    }
}

/// The page-cache descriptor as a plain one (not its registered slot), for
/// requests that run in an io-wq worker. A worker resolving a registered
/// descriptor takes the ring's submission lock, which the ring thread holds
/// for as long as it submits, including copying a large reply into a
/// socket: the worker would wait for that send (BENCHMARKS.md, 2026-12-07).
/// A plain descriptor is looked up in the process's file table, without
/// the lock.
fn buffered_fd(shared: &Shared) -> types::Fd {
    use std::os::fd::AsRawFd;
    types::Fd(shared.files.buffered.as_raw_fd())
}

/// Small enough for `OpState::try_inline`, and through the page cache (an
/// O_DIRECT transfer is asynchronous in the ring already).
fn inline_fits(shared: &Shared, pos: u64, bytes: &[u8]) -> bool {
    bytes.len() <= INLINE_MAX_BYTES && pick_fd(shared, pos, bytes.len(), bytes.as_ptr()).0 == FILE_BUFFERED
}

/// `preadv2(RWF_NOWAIT)`: bytes read, or `None` when the data is not in the
/// page cache (or the call was interrupted, or the kernel cannot do it),
/// so the caller goes through the ring instead.
fn read_nowait(file: &std::fs::File, dst: &mut [u8], pos: u64) -> Option<usize> {
    use std::os::unix::io::AsRawFd;
    let pos = libc::off_t::try_from(pos).ok()?;
    let iov = libc::iovec { iov_base: dst.as_mut_ptr().cast(), iov_len: dst.len() };
    // SAFETY: `iov` describes `dst`, a live buffer we borrow exclusively for
    // the duration of this synchronous call, and the kernel writes at most
    // `iov_len` bytes into it; `file` keeps the descriptor open.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, pos, libc::RWF_NOWAIT) };
    usize::try_from(n).ok()
}

/// Transfer lengths come from u32 request lengths, so this never saturates.
fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}
