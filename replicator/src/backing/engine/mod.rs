//! The I/O thread: owns one io_uring, turns queued requests into SQEs in
//! batches, reaps completions and answers each request on its channel.
//!
//! Loop: drain *all* queued requests into SQEs, submit them with one
//! `io_uring_enter` that also waits for at least one completion, reap every
//! completion, repeat. In-flight operations are bounded by the ring (one
//! slot per operation, at most one SQE per slot outstanding); requests beyond
//! that wait in a local queue, never dropped.
//!
//! Wake-up: an eventfd read is always armed in the ring, so the thread only
//! ever blocks in `io_uring_enter`. Submitters write the eventfd only when
//! the thread has announced it is about to sleep ([`Waker::wake`]): a busy
//! thread picks new requests up on its next pass for free.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use io_uring::{opcode, types, IoUring};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use tracing::{error, warn};

use super::buf::AlignedBuf;
use super::mapped::MappedReads;
use super::ops::{self, Begin, Env, OpState, Step, FILE_EVENTFD};
use super::shared::{OpKind, Shared};
use super::{BackingError, CompletionSender, IoFailure, IoOp, IoRequest};

pub(in crate::backing) mod hosted;
use hosted::{Conn, HostedConnection};

/// user_data of the eventfd read; slots use their index.
const EVENTFD_TOKEN: u64 = u64::MAX;
/// EAGAIN/EINTR from an operation are retried this often before failing.
const MAX_RETRIES: u8 = 16;

/// What submitters send to an I/O thread.
pub(super) enum Msg {
    Io(IoRequest),
    /// A connection whose protocol now runs on this thread's ring.
    Host(HostedConnection),
    /// Hosted sessions stop reading requests and finish what they have.
    CloseHostedInput,
}

/// Where an operation's result goes.
pub(super) enum Reply {
    Channel(CompletionSender),
    /// The hosted connection in this slot of `Engine::conns`.
    Hosted(usize),
}

/// An operation waiting for a free slot.
pub(super) struct Queued {
    tag: u64,
    op: IoOp,
    reply: Reply,
}

/// The submitter side of one I/O thread.
pub(super) struct WorkerHandle {
    pub tx: mpsc::Sender<Msg>,
    pub waker: Arc<Waker>,
}

pub(super) struct Waker {
    efd: OwnedFd,
    /// Set by the thread just before it may block; cleared by whoever
    /// wakes it, so a sleeping thread costs one eventfd write per wake-up,
    /// not one per request.
    sleeping: AtomicBool,
}

impl Waker {
    /// Called after queueing requests. The fence pairs with the one in
    /// `Engine::run`: either the thread's last drain before sleeping sees
    /// our requests, or we see its `sleeping` flag and kick it.
    pub(super) fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            self.kick();
        }
    }

    /// Unconditional wake-up.
    pub(super) fn kick(&self) {
        // A blocking eventfd write only blocks when the counter would
        // overflow (2^64 - 2 pending wake-ups), which cannot happen.
        if let Err(e) = nix::unistd::write(&self.efd, &1u64.to_ne_bytes()) {
            warn!("cannot wake backing I/O thread: {e}");
        }
    }
}

/// Starts I/O thread `index` and waits until its ring is set up.
pub(super) fn spawn(
    shared: Arc<Shared>,
    index: usize,
    ring_entries: u32,
) -> Result<(WorkerHandle, JoinHandle<()>), BackingError> {
    let efd = new_eventfd().map_err(|source| BackingError::Ring { source })?;
    let waker = Arc::new(Waker { efd, sleeping: AtomicBool::new(false) });
    // Submissions to the I/O thread: bounded by what its senders may have
    // in flight (the NBD in-flight budgets, and a replicated volume's
    // driver, see `limits::REPL_DISK_COMPLETIONS_MAX`), never by this
    // channel, so a submission never blocks a tokio task.
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let thread_waker = Arc::clone(&waker);
    let thread = thread::Builder::new()
        .name(format!("backing-io-{index}"))
        .spawn(move || thread_main(shared, thread_waker, rx, ring_entries, ready_tx))
        .map_err(|source| BackingError::Thread { source })?;
    let started =
        ready_rx.recv().unwrap_or_else(|_| Err(io::Error::other("the I/O thread died while setting up its ring")));
    match started {
        Ok(()) => Ok((WorkerHandle { tx, waker }, thread)),
        Err(source) => {
            let _ = thread.join();
            Err(BackingError::Ring { source })
        }
    }
}

fn thread_main(
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    rx: Receiver<Msg>,
    ring_entries: u32,
    ready: mpsc::SyncSender<io::Result<()>>,
) {
    let engine = match Engine::new(Arc::clone(&shared), waker, ring_entries) {
        Ok(engine) => engine,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut engine = engine;
        engine.run(&rx)
    }));
    let failed = match outcome {
        Ok(Ok(())) => false,
        Ok(Err(e)) => {
            error!("backing I/O thread failed: {e}; answering all further requests with an error");
            true
        }
        Err(_) => {
            error!("backing I/O thread panicked; answering all further requests with an error");
            true
        }
    };
    if failed {
        // Dead engine: keep answering until shutdown disconnects us, so no
        // request is ever left without a completion.
        while let Ok(msg) = rx.recv() {
            match msg {
                Msg::Io(req) => ops::answer(&shared, req, Err(IoFailure::EngineStopped)),
                Msg::Host(conn) => conn.refuse("the I/O engine has failed"),
                Msg::CloseHostedInput => {}
            }
        }
    }
}

/// An operation in flight.
struct Slot {
    tag: u64,
    reply: Reply,
    state: OpState,
    kind: OpKind,
    bytes: u64,
    retries: u8,
}

struct Engine {
    ring: IoUring,
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    /// Indexed by user_data; `None` when free.
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Requests waiting for a free slot.
    queued: VecDeque<Queued>,
    /// Connections hosted on this ring, by slot; `None` when free.
    conns: Vec<Option<Conn>>,
    free_conns: Vec<usize>,
    /// Hosted connections that need `pump` after this round of completions.
    dirty_conns: Vec<usize>,
    /// Socket operations in flight (not counted in `in_flight`).
    conn_ops_in_flight: usize,
    /// Periodic wake-up while connections are hosted (stall checks).
    timer_spec: Box<types::Timespec>,
    timer_armed: bool,
    zero_buf: Option<AlignedBuf>,
    /// Target of the eventfd read; a heap buffer so its address is stable.
    efd_buf: AlignedBuf,
    efd_armed: bool,
    /// The channel disconnected: finish what we have, then exit.
    stopping: bool,
    /// Reused scratch space for reaped (user_data, result) pairs.
    cqes: Vec<(u64, i32)>,
    /// The wake-up read failed for good; the loop gives up (see `run`).
    wake_failure: Option<io::Error>,
    /// An operation was done inline since the last `io_uring_enter` (see `start`).
    inlined_this_round: bool,
    /// When a hosted connection's socket last completed an operation.
    last_conn_event: Instant,
    /// Windows for sending cached reads of hosted connections; `None`
    /// under O_DIRECT or where `mincore` cannot be trusted.
    mapped: Option<MappedReads>,
}

impl Engine {
    fn new(shared: Arc<Shared>, waker: Arc<Waker>, ring_entries: u32) -> io::Result<Engine> {
        let ring = build_ring(ring_entries)?;
        // Fixed files save the per-op fd table lookup and refcounting.
        let mut fds = vec![shared.files.buffered.as_raw_fd(), waker.efd.as_raw_fd()];
        if let Some(direct) = &shared.files.direct {
            fds.push(direct.as_raw_fd());
        }
        assert_eq!(fds[ops::FILE_BUFFERED as usize], shared.files.buffered.as_raw_fd());
        ring.submitter().register_files(&fds)?;

        // One SQ entry stays reserved for the eventfd read. With at most one
        // SQE per slot outstanding the SQ cannot overflow, and since the CQ
        // is at least as large, neither can it.
        let sq = ring.params().sq_entries() as usize;
        let cq = ring.params().cq_entries() as usize;
        assert!(sq >= 2 && cq >= sq, "ring too small: sq {sq}, cq {cq}");
        let max_slots = sq - 1;
        Ok(Engine {
            ring,
            waker,
            slots: (0..max_slots).map(|_| None).collect(),
            free: (0..max_slots).rev().collect(),
            in_flight: 0,
            queued: VecDeque::with_capacity(max_slots),
            conns: Vec::new(),
            free_conns: Vec::new(),
            dirty_conns: Vec::new(),
            conn_ops_in_flight: 0,
            timer_spec: Box::new(types::Timespec::new().sec(1)),
            timer_armed: false,
            zero_buf: None,
            efd_buf: AlignedBuf::zeroed(8),
            efd_armed: false,
            stopping: false,
            cqes: Vec::with_capacity(cq),
            wake_failure: None,
            inlined_this_round: false,
            last_conn_event: Instant::now(),
            mapped: MappedReads::new(
                shared.files.buffered.as_raw_fd(),
                shared.data_size,
                shared.files.direct.is_some(),
            ),
            shared,
        })
    }

    fn run(&mut self, rx: &Receiver<Msg>) -> io::Result<()> {
        loop {
            self.drain(rx);
            if self.stopping && self.in_flight == 0 && self.live_conns() == 0 && !self.timer_armed {
                assert!(self.queued.is_empty(), "queued requests with every slot free");
                break;
            }
            if !self.stopping && !self.efd_armed {
                self.arm_eventfd();
            }
            if self.poll_briefly(rx)? {
                self.inlined_this_round = false;
                self.reap();
                continue;
            }
            // Announce the sleep, then look once more (see Waker::wake).
            self.waker.sleeping.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if self.drain(rx) {
                self.waker.sleeping.store(false, Ordering::Relaxed);
                continue;
            }
            self.enter(1)?;
            self.inlined_this_round = false;
            self.waker.sleeping.store(false, Ordering::Relaxed);
            self.reap();
            if let Some(e) = self.wake_failure.take() {
                // Re-arming would spin; without wake-ups requests would hang.
                return Err(io::Error::new(e.kind(), format!("wake-up eventfd read failed: {e}")));
            }
        }
        self.retire_eventfd()
    }

    /// Busy-polls before sleeping: for up to `busy_poll` after the last
    /// socket event of a hosted connection, keeps entering the kernel
    /// without waiting (which submits, and runs the completion work of
    /// arrived requests) and looking for completions and new requests.
    /// True if something arrived. On a VM a sleeping vCPU costs tens of
    /// µs to wake, twice per request at queue depth 1 (our thread for the
    /// request, the client for the reply); polling saves the first, like
    /// the kernel's `net.core.busy_poll`. Yields the CPU on every turn, so
    /// a runnable client or kernel worker on this core goes first.
    fn poll_briefly(&mut self, rx: &Receiver<Msg>) -> io::Result<bool> {
        if self.shared.busy_poll.is_zero() || self.live_conns() == 0 || self.stopping {
            return Ok(false);
        }
        let deadline = self.last_conn_event + self.shared.busy_poll;
        while Instant::now() < deadline {
            self.enter(0)?;
            if !self.ring.completion().is_empty() || self.drain(rx) {
                return Ok(true);
            }
            thread::yield_now();
        }
        Ok(false)
    }

    /// Takes every queued request; true if anything changed.
    fn drain(&mut self, rx: &Receiver<Msg>) -> bool {
        if self.stopping {
            return false;
        }
        let mut any = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Io(IoRequest { tag, op, done })) => {
                    any = true;
                    self.enqueue(Queued { tag, op, reply: Reply::Channel(done) });
                }
                Ok(Msg::Host(conn)) => {
                    any = true;
                    self.host(conn);
                }
                Ok(Msg::CloseHostedInput) => {
                    any = true;
                    self.close_hosted_input();
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.stopping = true;
                    self.close_hosted_input();
                    any = true;
                    break;
                }
            }
        }
        self.pump_dirty();
        any
    }

    /// Starts an operation now if a slot is free, else queues it.
    fn enqueue(&mut self, queued: Queued) {
        if self.queued.is_empty() && !self.free.is_empty() {
            self.start(queued);
        } else {
            self.queued.push_back(queued);
        }
    }

    /// Starts a request; the caller made sure a slot is free.
    fn start(&mut self, queued: Queued) {
        let Queued { tag, op, reply } = queued;
        let (kind, bytes) = ops::account(&op);
        let may_inline = self.may_inline();
        let mut env = Env { shared: &self.shared, zero_buf: &mut self.zero_buf };
        match ops::begin(op, &mut env) {
            Begin::Now(result) => self.deliver(kind, bytes, tag, &reply, result),
            Begin::Pending(mut state) => {
                if may_inline {
                    if let Some(result) = state.try_inline(&env) {
                        self.inlined_this_round = true;
                        self.deliver(kind, bytes, tag, &reply, result);
                        return;
                    }
                }
                let idx = self.free.pop().expect("start() is only called with a free slot");
                let entry = state.sqe(&mut env).user_data(idx as u64);
                push_sqe(&mut self.ring, &entry);
                self.slots[idx] = Some(Slot { tag, reply, state, kind, bytes, retries: 0 });
                self.in_flight += 1;
            }
        }
    }

    /// Whether the next small operation may be done inline (see
    /// `OpState::try_inline`). A ring that hosts no connections is only a
    /// disk worker (its requesters and sockets live in tokio, as for `up`):
    /// nothing waits for this thread while it writes, and doing the write
    /// here saves the hand-off to an io-wq worker and back, so every one
    /// qualifies. A ring that hosts connections also sends and receives for
    /// them: there only one per round, and only on an idle ring, so a burst
    /// still reaches io-wq and runs beside us on the other core.
    fn may_inline(&self) -> bool {
        self.live_conns() == 0 || (self.in_flight == 0 && !self.inlined_this_round)
    }

    /// Answers an operation: on its channel, or to its hosted session.
    fn deliver(&mut self, kind: OpKind, bytes: u64, tag: u64, reply: &Reply, result: ops::IoResult) {
        match reply {
            Reply::Channel(done) => ops::finish(&self.shared, kind, bytes, tag, done, result),
            Reply::Hosted(conn) => {
                self.shared.stats.record(kind, bytes, result.is_ok());
                self.conn_completion(*conn, tag, result);
            }
        }
    }

    fn start_queued(&mut self) {
        while !self.free.is_empty() {
            match self.queued.pop_front() {
                Some(req) => self.start(req),
                None => break,
            }
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        for &(user_data, res) in &cqes {
            self.complete(user_data, res);
        }
        cqes.clear();
        self.cqes = cqes;
        self.start_queued();
        self.pump_dirty();
    }

    fn complete(&mut self, user_data: u64, res: i32) {
        if user_data == EVENTFD_TOKEN {
            self.efd_armed = false;
            if res < 0 && !matches!(-res, libc::EINTR | libc::EAGAIN | libc::ECANCELED) {
                self.wake_failure = Some(io::Error::from_raw_os_error(-res));
            }
            return;
        }
        if user_data == hosted::TIMER_TOKEN {
            self.timer_fired();
            return;
        }
        if user_data & hosted::CONN_BIT != 0 {
            self.last_conn_event = Instant::now();
            self.conn_event(user_data, res);
            return;
        }
        let idx = usize::try_from(user_data).unwrap_or(usize::MAX);
        let slot = self.slots.get_mut(idx).and_then(Option::as_mut).expect("completions only arrive for busy slots");
        let mut env = Env { shared: &self.shared, zero_buf: &mut self.zero_buf };
        let step = if (res == -libc::EAGAIN || res == -libc::EINTR) && slot.retries < MAX_RETRIES {
            // Nothing happened; ask again.
            slot.retries += 1;
            Step::Submit(slot.state.sqe(&mut env))
        } else {
            slot.state.advance(res, &mut env)
        };
        match step {
            Step::Submit(entry) => push_sqe(&mut self.ring, &entry.user_data(user_data)),
            Step::Finish(result) => {
                if let Some(slot) = self.slots[idx].take() {
                    self.free.push(idx);
                    self.in_flight -= 1;
                    self.deliver(slot.kind, slot.bytes, slot.tag, &slot.reply, result);
                }
            }
        }
    }

    fn arm_eventfd(&mut self) {
        let entry = opcode::Read::new(types::Fixed(FILE_EVENTFD), self.efd_buf.as_mut_ptr(), self.efd_buf.len() as u32)
            .build()
            .user_data(EVENTFD_TOKEN);
        push_sqe(&mut self.ring, &entry);
        self.efd_armed = true;
    }

    /// Completes the armed eventfd read (by writing the eventfd ourselves)
    /// so that no operation references our memory when the ring goes away.
    fn retire_eventfd(&mut self) -> io::Result<()> {
        if self.efd_armed {
            self.waker.kick();
        }
        while self.efd_armed {
            self.enter(1)?;
            self.reap();
        }
        Ok(())
    }

    /// Submits pending SQEs and waits for `want` completions. Transient
    /// refusals return Ok: the caller's loop reaps and tries again.
    fn enter(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submitter().submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => Ok(()),
                _ => Err(e),
            },
        }
    }
}

impl Drop for Engine {
    /// A normal exit leaves nothing outstanding. After a ring failure or a
    /// panic the kernel may still write into buffers of in-flight
    /// operations even after the ring is closed, so those are leaked, not
    /// freed; their requesters get an error.
    fn drop(&mut self) {
        let leak = self.in_flight > 0 || self.conn_ops_in_flight > 0;
        for slot in self.slots.iter_mut() {
            if let Some(slot) = slot.take() {
                let Slot { tag, reply, state, kind, bytes, .. } = slot;
                std::mem::forget(state);
                if let Reply::Channel(done) = reply {
                    ops::finish(&self.shared, kind, bytes, tag, &done, Err(IoFailure::EngineStopped));
                }
            }
        }
        if leak {
            if let Some(zeros) = self.zero_buf.take() {
                std::mem::forget(zeros);
            }
            // Requests bound for io-wq name the backing file by its plain
            // descriptor (`ops::buffered_fd`); one still queued when the ring
            // closes must not find that number reused by another file, so
            // the descriptors stay open for the life of the process.
            std::mem::forget(Arc::clone(&self.shared));
        }
        if self.efd_armed {
            std::mem::forget(std::mem::take(&mut self.efd_buf));
        }
        for queued in self.queued.drain(..) {
            if let Reply::Channel(done) = queued.reply {
                let (kind, bytes) = ops::account(&queued.op);
                ops::finish(&self.shared, kind, bytes, queued.tag, &done, Err(IoFailure::EngineStopped));
            }
        }
        // The kernel may still write into receive buffers of armed socket
        // operations: leak those connections' buffers rather than free them.
        for conn in self.conns.iter_mut().filter_map(Option::take) {
            conn.abandon(leak);
        }
    }
}

/// A blocking eventfd: io_uring answers a read of an O_NONBLOCK fd with
/// EAGAIN instead of waiting for it to become readable.
fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; it returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Queues an SQE.
fn push_sqe(ring: &mut IoUring, entry: &io_uring::squeue::Entry) {
    // SAFETY: every buffer an SQE points to outlives the operation: read and
    // write buffers are owned by the operation's slot, which is only freed
    // after its final CQE; the zero buffer and the eventfd buffer are owned
    // by the engine, which exits only when no operation is in flight (and
    // leaks them in Drop otherwise). The fixed-file indices refer to files
    // registered in `Engine::new`, kept open by `Shared`/`Waker` for the
    // ring's lifetime. Hosted connections' receive and send buffers, and
    // the boxed `msghdr`/`iovec`s of a two-piece send, are owned by their
    // `Conn`, which is only dropped once no socket operation of it is in
    // flight (or leaked, in Drop); a send from a read window holds that
    // window's mapping (`MappedRange`'s `Arc`) in the same `Conn`.
    if unsafe { ring.submission().push(entry) }.is_ok() {
        return;
    }
    // Socket operations of hosted connections are not bounded by the slots;
    // hand the queued SQEs to the kernel to make room.
    let _ = ring.submit();
    // SAFETY: as above.
    let pushed = unsafe { ring.submission().push(entry) };
    assert!(pushed.is_ok(), "submission queue still full after submitting it");
}

/// A ring for one I/O thread: SINGLE_ISSUER (only this thread touches it)
/// and COOP_TASKRUN (no interrupting IPI for completion work). Not
/// DEFER_TASKRUN: with it, every buffered write (which ext4 punts to an
/// io-wq worker) came back through task work that had to wake this thread,
/// and queue-depth-1 write latency was 45% worse (234 µs vs 160 µs here).
/// Older kernels lack these flags, so fall back step by step.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let attempts: [fn(&mut io_uring::Builder); 3] = [
        |b| {
            b.setup_coop_taskrun().setup_single_issuer();
        },
        |b| {
            b.setup_coop_taskrun();
        },
        |_| {},
    ];
    let mut last_error = io::Error::other("no io_uring setup attempted");
    for configure in attempts {
        let mut builder = IoUring::builder();
        builder.setup_clamp();
        configure(&mut builder);
        match builder.build(entries) {
            Ok(ring) => return Ok(ring),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}
