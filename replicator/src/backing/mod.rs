//! The io_uring I/O engine that owns the backing store (a regular file or a
//! block device) and the public API the NBD server codes against.
//!
//! [`Backing::open`] opens the store and starts `io_threads` dedicated std
//! threads, each owning one ring. Requests go to a thread over a std channel
//! (waking it through an eventfd whose read is itself a ring operation, so the
//! thread only ever blocks in `io_uring_enter`), and each completion comes
//! back on the request's own tokio channel.
//!
//! Every operation is checked against `data_size_bytes` before any I/O: the
//! metadata area beyond it is never touched through this engine.
//!
//! Files: `buf` (aligned buffers), `open` (descriptors and probes), `shared`
//! (state shared with the threads, counters), `engine` (thread and ring
//! loop), `ops` (request → SQEs state machines), `zero` (write-zeroes),
//! `extents` (block status), `mapped` (large replies of hosted connections
//! sent from a mapping of the page cache).

mod buf;
mod engine;
mod extents;
mod mapped;
mod open;
mod ops;
mod shared;
mod zero;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use tracing::warn;

pub use buf::{AlignedBuf, WriteBuf};
pub use engine::hosted::{HostedConnection, HostedSession, PayloadTarget, ReplyBody, Transmit};
pub use mapped::MappedRange;
pub use shared::BackingStats;

use engine::{Msg, WorkerHandle};
use shared::Shared;

/// Where a request's completion is sent.
pub type CompletionSender = tokio::sync::mpsc::UnboundedSender<IoCompletion>;

/// How to open a backing store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Use O_DIRECT for operations aligned to the device's block size.
    pub direct_io: bool,
    /// Operations must stay below this offset; the metadata area lies beyond.
    pub data_size_bytes: u64,
    /// Submission queue size of each ring (in-flight bound per thread).
    pub ring_entries: u32,
    /// Number of I/O threads, each with its own ring.
    pub io_threads: usize,
    /// How long an I/O thread that hosts connections keeps polling after
    /// the last socket event before it sleeps (zero: it sleeps at once).
    pub busy_poll: std::time::Duration,
}

impl BackingConfig {
    /// Read-write, buffered, one thread with a 256-entry ring, busy
    /// polling for [`BUSY_POLL_DEFAULT_US`].
    pub fn new(path: PathBuf, data_size_bytes: u64) -> Self {
        Self {
            path,
            read_only: false,
            direct_io: false,
            data_size_bytes,
            ring_entries: 256,
            io_threads: 1,
            busy_poll: std::time::Duration::from_micros(BUSY_POLL_DEFAULT_US.into()),
        }
    }
}

/// Default busy-poll time of a ring that hosts connections, in µs.
pub const BUSY_POLL_DEFAULT_US: u32 = 50;

/// Upper bound for the busy-poll time, in µs.
pub const BUSY_POLL_MAX_US: u32 = 10_000;

/// What the backing can do, as learned so far (`trim` and `zero_range` turn
/// false after the first EOPNOTSUPP from the filesystem or device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// fallocate(PUNCH_HOLE) works (trim deallocates).
    pub trim: bool,
    /// fallocate(ZERO_RANGE) works (fast zeroing without deallocating).
    pub zero_range: bool,
    /// BlockStatus reports real holes (otherwise everything is data).
    pub block_status: bool,
    pub direct_io: bool,
}

/// One operation and where to answer it.
#[derive(Debug)]
pub struct IoRequest {
    /// Opaque to the engine; echoed in the completion.
    pub tag: u64,
    pub op: IoOp,
    pub done: CompletionSender,
}

#[derive(Debug)]
pub enum IoOp {
    /// `uncached`: see [`IoOp::Write`].
    Read { offset: u64, len: u32, uncached: bool },
    /// `fua`: durable before completion (RWF_DSYNC). `uncached`: a bulk
    /// transfer (resync, verify) whose data should not stay in the page
    /// cache: RWF_DONTCACHE where the file system has it (Linux 6.14+),
    /// a plain buffered transfer elsewhere. Besides sparing the cache, this
    /// keeps a bulk transfer's large folios out of it: on ext4 a later
    /// 4 KiB write into a cached 256 KiB folio walks all 64 of its buffer
    /// heads, and such writes cost several times more.
    Write { offset: u64, data: WriteBuf, fua: bool, uncached: bool },
    /// fdatasync: covers every write completed before the flush was submitted.
    Flush,
    /// Advisory deallocation (punch hole); succeeds doing nothing if unsupported.
    Trim { offset: u64, len: u32 },
    /// Make the range read as zeros. `may_trim`: deallocating is allowed;
    /// `fast_only`: fail with `NotSupported` rather than write zero buffers.
    WriteZeroes { offset: u64, len: u32, may_trim: bool, fast_only: bool, fua: bool },
    /// Allocation map of the range.
    BlockStatus { offset: u64, len: u32 },
}

#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub result: Result<IoOutput, IoFailure>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum IoOutput {
    Read(AlignedBuf),
    /// A large read of a hosted connection whose pages are all cached: the
    /// reply is sent from a mapping of the store, with no read into a
    /// buffer (the kernel copies the pages into the socket once).
    Mapped(MappedRange),
    Done,
    Extents(Vec<Extent>),
}

/// One run of a block-status answer. Runs are consecutive from the request's
/// offset, cover at least one byte and never exceed the requested length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub hole: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoFailure {
    #[error("I/O error: {}", io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    #[error("fast zeroing is not supported here")]
    NotSupported,
    #[error("operation reaches beyond the data area")]
    OutOfRange,
    #[error("backing store is read-only")]
    ReadOnly,
    #[error("I/O engine has stopped")]
    EngineStopped,
}

impl IoFailure {
    /// The errno an NBD reply should carry for this failure.
    pub fn errno(self) -> i32 {
        match self {
            IoFailure::Errno(e) => e,
            IoFailure::NotSupported => libc::EOPNOTSUPP,
            IoFailure::OutOfRange => libc::EINVAL,
            IoFailure::ReadOnly => libc::EPERM,
            IoFailure::EngineStopped => libc::ESHUTDOWN,
        }
    }
}

/// Why a backing store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("cannot open backing store {} for {access}: {source}; check that it exists and that this user may {access} it", .path.display())]
    Open { path: PathBuf, access: &'static str, source: io::Error },
    #[error("backing store {} is not a regular file or block device ({source}); point it at a file or a block device", .path.display())]
    NotFileOrDevice { path: PathBuf, source: io::Error },
    #[error("cannot determine the size of backing store {}: {source}", .path.display())]
    Stat { path: PathBuf, source: io::Error },
    #[error("block device {} holds {size} bytes but the data area needs {data_size}; use a larger device or a smaller volume", .path.display())]
    TooSmall { path: PathBuf, size: u64, data_size: u64 },
    #[error("cannot open backing store {} with O_DIRECT ({source}): this filesystem does not support O_DIRECT; drop direct-io", .path.display())]
    DirectIoUnsupported { path: PathBuf, source: io::Error },
    #[error("invalid backing configuration: {0}")]
    InvalidConfig(String),
    #[error("cannot set up io_uring: {source}; io_uring may be disabled (sysctl kernel.io_uring_disabled) or blocked by a seccomp or container policy")]
    Ring { source: io::Error },
    #[error("cannot start an I/O thread: {source}")]
    Thread { source: io::Error },
}

/// Handle to an open backing store; cheap to clone, usable from any thread.
/// The engine shuts down when the last handle is dropped (or on
/// [`Backing::shutdown`]).
#[derive(Clone)]
pub struct Backing {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// `None` once shut down. Submitters hold the read lock while sending, so
    /// after `shutdown` has taken the write lock no request can slip into a
    /// channel behind the threads' final drain.
    workers: RwLock<Option<Vec<WorkerHandle>>>,
    /// Held while joining, so a second `shutdown` waits for the first.
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_worker: AtomicUsize,
}

impl Backing {
    /// Opens the store and starts the I/O threads.
    pub fn open(cfg: BackingConfig) -> Result<Backing, BackingError> {
        let shared = Arc::new(open::open_shared(&cfg)?);
        let inner = Inner {
            shared: Arc::clone(&shared),
            workers: RwLock::new(Some(Vec::with_capacity(cfg.io_threads))),
            threads: Mutex::new(Vec::with_capacity(cfg.io_threads)),
            next_worker: AtomicUsize::new(0),
        };
        // Built inside `Inner` so an error half-way stops the threads already
        // started (through `Inner::drop`).
        let backing = Backing { inner: Arc::new(inner) };
        for index in 0..cfg.io_threads {
            let (worker, thread) = engine::spawn(Arc::clone(&shared), index, cfg.ring_entries)?;
            backing.lock_threads().push(thread);
            if let Some(workers) = backing.write_workers().as_mut() {
                workers.push(worker);
            }
        }
        Ok(backing)
    }

    pub fn data_size_bytes(&self) -> u64 {
        self.inner.shared.data_size
    }

    pub fn kind(&self) -> crate::device::DeviceKind {
        self.inner.shared.kind
    }

    pub fn capabilities(&self) -> Capabilities {
        let shared = &self.inner.shared;
        Capabilities {
            trim: shared.trim_ok.load(Ordering::Relaxed),
            zero_range: shared.zero_range_ok.load(Ordering::Relaxed),
            block_status: shared.block_status,
            direct_io: shared.files.direct.is_some(),
        }
    }

    pub fn stats(&self) -> BackingStats {
        self.inner.shared.stats.snapshot()
    }

    /// Queues one request. Never blocks (beyond a short lock) and never
    /// fails: refusals and a stopped engine are answered on `req.done`.
    pub fn submit(&self, req: IoRequest) {
        self.submit_batch(std::iter::once(req));
    }

    /// Queues many requests to one I/O thread with a single wake-up.
    pub fn submit_batch(&self, reqs: impl IntoIterator<Item = IoRequest>) {
        let shared = &*self.inner.shared;
        let guard = self.inner.workers.read().unwrap_or_else(PoisonError::into_inner);
        let worker = guard.as_ref().and_then(|workers| {
            let n = workers.len();
            let pick = if n > 1 { self.inner.next_worker.fetch_add(1, Ordering::Relaxed) % n } else { 0 };
            workers.get(pick)
        });
        let mut sent = false;
        for req in reqs {
            if let Err(failure) = ops::validate(&req.op, shared) {
                ops::answer(shared, req, Err(failure));
                continue;
            }
            match worker {
                Some(worker) => match worker.tx.send(Msg::Io(req)) {
                    Ok(()) => sent = true,
                    // The thread is gone (it only exits after shutdown or
                    // a panic); the request comes back to us.
                    Err(std::sync::mpsc::SendError(Msg::Io(req))) => {
                        ops::answer(shared, req, Err(IoFailure::EngineStopped))
                    }
                    Err(_) => unreachable!("we sent an Io message"),
                },
                None => ops::answer(shared, req, Err(IoFailure::EngineStopped)),
            }
        }
        if let (true, Some(worker)) = (sent, worker) {
            worker.waker.wake();
        }
    }

    /// Hands a connected socket and its protocol session to an I/O thread,
    /// which then runs the connection (see `engine::hosted`). `conn.closed`
    /// is told when it ends.
    pub fn host(&self, conn: HostedConnection) {
        let guard = self.inner.workers.read().unwrap_or_else(PoisonError::into_inner);
        let Some(workers) = guard.as_ref().filter(|w| !w.is_empty()) else {
            conn.refuse("the I/O engine is stopped");
            return;
        };
        let pick = self.inner.next_worker.fetch_add(1, Ordering::Relaxed) % workers.len();
        let worker = &workers[pick];
        match worker.tx.send(Msg::Host(conn)) {
            Ok(()) => worker.waker.wake(),
            Err(std::sync::mpsc::SendError(Msg::Host(conn))) => conn.refuse("the I/O engine is stopped"),
            Err(_) => unreachable!("we sent a Host message"),
        }
    }

    /// Hosted connections stop reading requests and close once their
    /// in-flight requests are answered (server shutdown).
    pub fn close_hosted_input(&self) {
        let guard = self.inner.workers.read().unwrap_or_else(PoisonError::into_inner);
        for worker in guard.iter().flatten() {
            if worker.tx.send(Msg::CloseHostedInput).is_ok() {
                worker.waker.wake();
            }
        }
    }

    /// Stops accepting requests, lets every queued and in-flight request
    /// finish, and joins the I/O threads. Blocks until then; idempotent.
    /// Later submissions are answered with [`IoFailure::EngineStopped`].
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.inner.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_workers(&self) -> std::sync::RwLockWriteGuard<'_, Option<Vec<WorkerHandle>>> {
        self.inner.workers.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn shutdown(&self) {
        let workers = self.workers.write().unwrap_or_else(PoisonError::into_inner).take();
        // Dropping a sender disconnects the channel; the thread sees that
        // after draining everything queued before it, finishes what is in
        // flight, and exits. The kick makes sure it is awake to notice.
        for worker in workers.into_iter().flatten() {
            let WorkerHandle { tx, waker } = worker;
            drop(tx);
            waker.kick();
        }
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        for thread in threads.drain(..) {
            if thread.join().is_err() {
                warn!("backing I/O thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backing")
            .field("kind", &self.kind())
            .field("data_size_bytes", &self.data_size_bytes())
            .field("capabilities", &self.capabilities())
            .finish()
    }
}
