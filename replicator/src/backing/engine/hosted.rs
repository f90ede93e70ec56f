//! Connections hosted on the I/O thread: a socket whose byte-stream
//! protocol (a [`HostedSession`], e.g. the NBD transmission phase) runs
//! next to the ring, so receiving a request, doing its file I/O and sending
//! its reply are all SQEs of one ring, with no thread hop in between.
//!
//! The engine knows nothing of the protocol: it receives bytes into a
//! per-connection buffer, feeds them to the session, starts the file
//! operations the session asks for (through the same slots as every other
//! request), and sends the session's output in order, one transmit at a
//! time. One shortcut: a large READ whose pages are all cached is answered
//! at once with a range of a mapping of the store (`IoOutput::Mapped`, see
//! `backing::mapped`), which the session puts in its reply as is. A timer
//! wakes the thread once a second while connections exist, to drop
//! clients that stopped reading their replies.

use std::os::unix::io::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use nix::sys::socket::{shutdown, Shutdown};

use super::{ops, Engine, Queued, Reply};
use crate::backing::{AlignedBuf, IoFailure, IoOp, IoOutput, MappedRange};
use crate::limits;

/// `user_data` of the periodic timer.
pub(in crate::backing) const TIMER_TOKEN: u64 = u64::MAX - 1;
/// Set in the `user_data` of socket operations: `CONN_BIT | index << 1 | is_send`.
pub(in crate::backing) const CONN_BIT: u64 = 1 << 62;

/// Sends at least this large use MSG_WAITALL (see `submit_send`).
const LARGE_SEND_BYTES: usize = 64 * 1024;

/// Receive buffer per connection; requests larger than this arrive over
/// several receives (the session collects WRITE payloads itself).
const RECV_BUFFER_BYTES: usize = 256 * 1024;

/// Bytes a session wants sent, in order.
#[derive(Debug)]
pub enum Transmit {
    Bytes(Vec<u8>),
    /// `head` then a large READ reply's data sent as is (its header, after
    /// any small replies before it, then the data), in one send.
    Framed {
        head: Vec<u8>,
        body: ReplyBody,
    },
}

/// The data of a large READ reply.
#[derive(Debug)]
pub enum ReplyBody {
    /// Read into an I/O buffer.
    Buf(AlignedBuf),
    /// Cached pages of the store, which only the kernel reads
    /// (`backing::mapped`).
    Mapped(MappedRange),
}

impl ReplyBody {
    pub fn len(&self) -> usize {
        match self {
            ReplyBody::Buf(buf) => buf.len(),
            ReplyBody::Mapped(range) => range.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn as_ptr(&self) -> *const u8 {
        match self {
            ReplyBody::Buf(buf) => buf.as_ptr(),
            ReplyBody::Mapped(range) => range.as_ptr(),
        }
    }
}

/// Part of a transmit as the kernel sees it: an address and a length.
#[derive(Clone, Copy)]
struct RawPiece {
    ptr: *const u8,
    len: usize,
}

impl RawPiece {
    /// The bytes from `skip` on.
    fn from(ptr: *const u8, len: usize, skip: usize) -> RawPiece {
        // `skip <= len`: an address inside the piece or one past its end.
        RawPiece { ptr: ptr.wrapping_add(skip), len: len - skip }
    }

    fn iovec(self) -> libc::iovec {
        libc::iovec { iov_base: self.ptr as *mut libc::c_void, iov_len: self.len }
    }
}

impl Transmit {
    /// The bytes in order, as at most two slices; `None` when the body is
    /// mapped, which this process must not read (the engine sends it).
    pub fn pieces(&self) -> Option<(&[u8], &[u8])> {
        match self {
            Transmit::Bytes(bytes) => Some((bytes, &[])),
            Transmit::Framed { head, body: ReplyBody::Buf(buf) } => Some((head, buf)),
            Transmit::Framed { body: ReplyBody::Mapped(_), .. } => None,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Transmit::Bytes(bytes) => bytes.len(),
            Transmit::Framed { head, body } => head.len() + body.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What is left to send after the first `sent` bytes; the second piece
    /// is empty once the first is sent.
    fn rest(&self, sent: usize) -> (RawPiece, RawPiece) {
        let none = RawPiece { ptr: std::ptr::null(), len: 0 };
        match self {
            Transmit::Bytes(bytes) => (RawPiece::from(bytes.as_ptr(), bytes.len(), sent), none),
            Transmit::Framed { head, body } if sent < head.len() => {
                (RawPiece::from(head.as_ptr(), head.len(), sent), RawPiece::from(body.as_ptr(), body.len(), 0))
            }
            Transmit::Framed { head, body } => (RawPiece::from(body.as_ptr(), body.len(), sent - head.len()), none),
        }
    }
}

impl SendVectors {
    fn new() -> Box<SendVectors> {
        // SAFETY: `iovec` and `msghdr` are plain C structs of integers and
        // pointers, for which all zeroes is a valid value (null pointers,
        // zero lengths), as C code initialises them.
        Box::new(unsafe { std::mem::zeroed() })
    }
}

/// The `msghdr` and its two `iovec`s of a connection's two-piece send; the
/// kernel reads them while the SENDMSG is in flight, so they live on the
/// heap at a fixed address, one set per connection (one send at a time).
struct SendVectors {
    iov: [libc::iovec; 2],
    msg: libc::msghdr,
}

/// A large incoming payload the session lends to the host, so the socket
/// receives straight into it (no copy through the receive buffer).
#[derive(Debug)]
pub struct PayloadTarget {
    pub buf: AlignedBuf,
    /// Bytes already in `buf`; the host fills the rest.
    pub filled: usize,
}

/// A byte-stream protocol run by the I/O thread (sans-IO: it sees bytes and
/// completions, never the socket or the ring).
pub trait HostedSession: Send + 'static {
    /// Bytes received. Returns how many were consumed; fewer than given only
    /// when the session pauses (e.g. out of memory budget). The rest is
    /// offered again later.
    fn handle_input(&mut self, input: &[u8]) -> usize;
    /// The peer closed its side, or the socket failed.
    fn handle_eof(&mut self);
    /// A file operation the session started has finished (a large cached
    /// READ may finish at once, as `IoOutput::Mapped`).
    fn handle_completion(&mut self, tag: u64, result: Result<IoOutput, IoFailure>);
    /// The next file operation to start.
    fn poll_io(&mut self) -> Option<(u64, IoOp)>;
    /// The next bytes to send; the previous transmit is fully sent (or
    /// discarded, if the socket broke) before this is called again.
    fn poll_transmit(&mut self) -> Option<Transmit>;
    /// The last transmit taken has left (or was discarded).
    fn handle_sent(&mut self);
    /// Whether the session reads more input.
    fn wants_input(&self) -> bool;
    /// No more input wanted, nothing in flight, nothing left to send.
    fn is_finished(&self) -> bool;
    /// Stop reading requests (server shutdown); finish what is in flight.
    fn close_input(&mut self);
    /// Why the session ended early, if it did.
    fn take_error(&mut self) -> Option<String>;
    /// The payload being received, if it is worth receiving into directly.
    /// The host gives it back with [`HostedSession::return_payload`].
    fn lend_payload(&mut self) -> Option<PayloadTarget> {
        None
    }
    /// Gives back a lent payload, filled as far as the socket delivered.
    fn return_payload(&mut self, _target: PayloadTarget) {}
}

/// A connection handed to the engine with [`crate::backing::Backing::host`].
pub struct HostedConnection {
    /// A connected stream socket in blocking mode (io_uring waits for it).
    pub fd: OwnedFd,
    pub session: Box<dyn HostedSession>,
    /// Told when the connection is closed: `None` for a clean end.
    pub closed: tokio::sync::oneshot::Sender<Option<String>>,
}

impl HostedConnection {
    /// Closes a connection the engine cannot host.
    pub(in crate::backing) fn refuse(self, why: &str) {
        let _ = self.closed.send(Some(why.to_string()));
    }
}

pub(in crate::backing) struct Conn {
    fd: OwnedFd,
    session: Box<dyn HostedSession>,
    closed: Option<tokio::sync::oneshot::Sender<Option<String>>>,
    recv_buf: Vec<u8>,
    recv_start: usize,
    recv_end: usize,
    recv_armed: bool,
    /// A payload the session lent us, being received into.
    target: Option<PayloadTarget>,
    /// The transmit being sent and how much of it has left.
    send: Option<(Transmit, usize)>,
    vectors: Box<SendVectors>,
    send_started: Instant,
    /// EOF or error seen: receive nothing more.
    input_done: bool,
    /// The socket failed: discard output.
    broken: bool,
    error: Option<String>,
}

impl Conn {
    /// Drops the connection without waiting for its socket operations; the
    /// buffers they point into are leaked when `leak`.
    pub(in crate::backing) fn abandon(self, leak: bool) {
        let Conn { recv_buf, send, vectors, target, closed, .. } = self;
        if leak {
            std::mem::forget(recv_buf);
            std::mem::forget(send);
            std::mem::forget(vectors);
            std::mem::forget(target);
        }
        if let Some(closed) = closed {
            let _ = closed.send(Some("the I/O engine stopped".to_string()));
        }
    }
}

fn token(index: usize, is_send: bool) -> u64 {
    CONN_BIT | (index as u64) << 1 | u64::from(is_send)
}

impl Engine {
    pub(super) fn live_conns(&self) -> usize {
        self.conns.len() - self.free_conns.len()
    }

    pub(super) fn host(&mut self, conn: HostedConnection) {
        if self.stopping {
            conn.refuse("the I/O engine is stopping");
            return;
        }
        let HostedConnection { fd, session, closed } = conn;
        let conn = Conn {
            fd,
            session,
            closed: Some(closed),
            recv_buf: vec![0; RECV_BUFFER_BYTES],
            recv_start: 0,
            recv_end: 0,
            recv_armed: false,
            target: None,
            send: None,
            vectors: SendVectors::new(),
            send_started: Instant::now(),
            input_done: false,
            broken: false,
            error: None,
        };
        let index = match self.free_conns.pop() {
            Some(index) => {
                self.conns[index] = Some(conn);
                index
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.arm_timer();
        self.dirty_conns.push(index);
    }

    /// Every hosted session stops reading; an armed receive is woken by
    /// shutting down the socket's read side.
    pub(super) fn close_hosted_input(&mut self) {
        for index in 0..self.conns.len() {
            if let Some(conn) = self.conns[index].as_mut() {
                conn.session.close_input();
                if conn.recv_armed {
                    let _ = shutdown(conn.fd.as_raw_fd(), Shutdown::Read);
                }
                self.dirty_conns.push(index);
            }
        }
    }

    pub(super) fn conn_completion(&mut self, index: usize, tag: u64, result: Result<IoOutput, IoFailure>) {
        let conn = self.conns[index].as_mut().expect("completion for a closed connection");
        conn.session.handle_completion(tag, result);
        self.dirty_conns.push(index);
    }

    pub(super) fn conn_event(&mut self, user_data: u64, res: i32) {
        let index = ((user_data & !CONN_BIT) >> 1) as usize;
        let is_send = user_data & 1 == 1;
        self.conn_ops_in_flight -= 1;
        let conn = self.conns[index].as_mut().expect("socket completion for a closed connection");
        if is_send {
            let (transmit, sent) = conn.send.as_mut().expect("send completion without a send");
            if res > 0 && !conn.broken {
                *sent += res as usize;
                conn.send_started = Instant::now();
                if *sent < transmit.len() {
                    self.submit_send(index);
                    return;
                }
            } else if res <= 0 && !conn.broken {
                conn.broken = true;
                conn.error.get_or_insert_with(|| match res {
                    // Only a mapped body can fault: its pages left the file,
                    // or reading an evicted page back failed.
                    r if r == -libc::EFAULT => {
                        "send failed: mapped read data could not be read (the backing store shrank, or an I/O error)"
                            .to_string()
                    }
                    _ => format!("send failed: {}", describe(res)),
                });
                conn.session.close_input();
            }
            conn.send = None;
            conn.session.handle_sent();
        } else {
            conn.recv_armed = false;
            let direct = conn.target.take();
            let direct_used = direct.is_some();
            if let Some(mut target) = direct {
                if res > 0 {
                    target.filled += res as usize;
                    assert!(target.filled <= target.buf.len(), "kernel received past the payload");
                }
                conn.session.return_payload(target);
            }
            if res > 0 {
                if !direct_used {
                    conn.recv_end += res as usize;
                }
            } else {
                if res < 0 && res != -libc::ECONNRESET {
                    conn.error.get_or_insert_with(|| format!("receive failed: {}", describe(res)));
                }
                conn.input_done = true;
                conn.session.handle_eof();
            }
        }
        self.dirty_conns.push(index);
    }

    pub(super) fn pump_dirty(&mut self) {
        while let Some(index) = self.dirty_conns.pop() {
            self.pump(index);
        }
    }

    /// Moves one connection forward as far as it can go without waiting.
    fn pump(&mut self, index: usize) {
        let mut ops = Vec::new();
        loop {
            let Some(conn) = self.conns[index].as_mut() else { return };
            // Input already received: feed what the session will take.
            if conn.recv_start < conn.recv_end && conn.session.wants_input() {
                let consumed = conn.session.handle_input(&conn.recv_buf[conn.recv_start..conn.recv_end]);
                conn.recv_start += consumed;
                if conn.recv_start == conn.recv_end {
                    conn.recv_start = 0;
                    conn.recv_end = 0;
                }
            }
            while let Some(op) = conn.session.poll_io() {
                ops.push(op);
            }
            if !ops.is_empty() {
                for (tag, op) in ops.drain(..) {
                    if let Err(failure) = ops::validate(&op, &self.shared) {
                        let (kind, bytes) = ops::account(&op);
                        self.shared.stats.record(kind, bytes, false);
                        let conn = self.conns[index].as_mut().expect("the connection is live");
                        conn.session.handle_completion(tag, Err(failure));
                        continue;
                    }
                    if let Some(range) = self.mapped_range(&op) {
                        let (kind, bytes) = ops::account(&op);
                        self.shared.stats.record(kind, bytes, true);
                        let conn = self.conns[index].as_mut().expect("the connection is live");
                        conn.session.handle_completion(tag, Ok(IoOutput::Mapped(range)));
                        continue;
                    }
                    self.enqueue(Queued { tag, op, reply: Reply::Hosted(index) });
                }
                // Immediate answers may have produced output; go round.
                continue;
            }
            let conn = self.conns[index].as_mut().expect("the connection is live");
            if conn.send.is_none() {
                if let Some(transmit) = conn.session.poll_transmit() {
                    if conn.broken || transmit.is_empty() {
                        conn.session.handle_sent();
                        continue;
                    }
                    conn.send = Some((transmit, 0));
                    conn.send_started = Instant::now();
                    self.submit_send(index);
                }
            }
            let conn = self.conns[index].as_mut().expect("the connection is live");
            // A session that wants input has taken everything it can from
            // the buffer (at most a partial header is left): receive more.
            if conn.session.wants_input() && !conn.input_done && !conn.broken && !conn.recv_armed {
                self.submit_recv(index);
            }
            let conn = self.conns[index].as_mut().expect("the connection is live");
            if conn.send.is_none() && !conn.recv_armed && conn.session.is_finished() {
                self.close_conn(index);
            }
            return;
        }
    }

    /// A large read whose pages are all cached is answered at once with
    /// the mapped range, sent without being read (`backing::mapped`).
    fn mapped_range(&mut self, op: &IoOp) -> Option<MappedRange> {
        match op {
            IoOp::Read { offset, len, uncached: false } => self.mapped.as_mut()?.range(*offset, *len),
            _ => None,
        }
    }

    fn submit_recv(&mut self, index: usize) {
        let conn = self.conns[index].as_mut().expect("the connection is live");
        assert!(!conn.recv_armed);
        // Nothing buffered and a large payload expected: receive into it.
        if conn.recv_start == conn.recv_end {
            if let Some(mut target) = conn.session.lend_payload() {
                assert!(target.filled < target.buf.len());
                let space = &mut target.buf[target.filled..];
                // MSG_WAITALL: the kernel keeps receiving until the payload
                // is complete (or the socket fails), one completion per
                // payload instead of one per segment.
                let entry = opcode::Recv::new(types::Fd(conn.fd.as_raw_fd()), space.as_mut_ptr(), len32(space.len()))
                    .flags(libc::MSG_WAITALL)
                    .build()
                    .user_data(token(index, false));
                conn.target = Some(target);
                conn.recv_armed = true;
                self.conn_ops_in_flight += 1;
                super::push_sqe(&mut self.ring, &entry);
                return;
            }
        }
        // Keep what is left (a partial header) at the front.
        conn.recv_buf.copy_within(conn.recv_start..conn.recv_end, 0);
        conn.recv_end -= conn.recv_start;
        conn.recv_start = 0;
        assert!(conn.recv_end < conn.recv_buf.len(), "a session that wants input left the buffer full");
        let space = &mut conn.recv_buf[conn.recv_end..];
        let entry = opcode::Recv::new(types::Fd(conn.fd.as_raw_fd()), space.as_mut_ptr(), space.len() as u32)
            .build()
            .user_data(token(index, false));
        conn.recv_armed = true;
        self.conn_ops_in_flight += 1;
        super::push_sqe(&mut self.ring, &entry);
    }

    fn submit_send(&mut self, index: usize) {
        let conn = self.conns[index].as_mut().expect("the connection is live");
        let (transmit, sent) = conn.send.as_ref().expect("submit_send without a transmit");
        let (first, second) = transmit.rest(*sent);
        // MSG_WAITALL has io_uring finish a large send itself (one
        // completion instead of one per socket-buffer's worth: +40% on 1 MiB
        // reads here), but made small replies 60% slower; short sends are
        // resubmitted from `conn_event` either way.
        let flags = if first.len + second.len >= LARGE_SEND_BYTES {
            libc::MSG_NOSIGNAL | libc::MSG_WAITALL
        } else {
            libc::MSG_NOSIGNAL
        };
        let fd = types::Fd(conn.fd.as_raw_fd());
        let entry = if second.len == 0 {
            let len = u32::try_from(first.len).unwrap_or(u32::MAX);
            opcode::Send::new(fd, first.ptr, len).flags(flags).build()
        } else {
            // A large reply and its header in one send: one completion and
            // no lone header segment for the client to wake up for.
            let v = &mut *conn.vectors;
            v.iov = [first.iovec(), second.iovec()];
            v.msg.msg_iov = v.iov.as_mut_ptr();
            v.msg.msg_iovlen = 2;
            opcode::SendMsg::new(fd, &v.msg).flags(flags as u32).build()
        };
        self.conn_ops_in_flight += 1;
        super::push_sqe(&mut self.ring, &entry.user_data(token(index, true)));
    }

    fn close_conn(&mut self, index: usize) {
        let Some(mut conn) = self.conns[index].take() else { return };
        assert!(!conn.recv_armed && conn.send.is_none());
        self.free_conns.push(index);
        let error = conn.session.take_error().or(conn.error.take());
        if let Some(closed) = conn.closed.take() {
            let _ = closed.send(error);
        }
        // Dropping `conn` closes the socket.
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let entry = opcode::Timeout::new(&*self.timer_spec).build().user_data(TIMER_TOKEN);
        self.timer_armed = true;
        super::push_sqe(&mut self.ring, &entry);
    }

    /// Once a second while connections are hosted: drop clients whose
    /// replies have not moved for the stall limit, and let paused sessions
    /// retry (memory budget freed elsewhere).
    pub(super) fn timer_fired(&mut self) {
        self.timer_armed = false;
        let stall = Duration::from_secs(limits::REPLY_WRITE_STALL_SECS);
        for index in 0..self.conns.len() {
            if let Some(conn) = self.conns[index].as_mut() {
                if conn.send.is_some() && !conn.broken && conn.send_started.elapsed() > stall {
                    conn.error.get_or_insert_with(|| {
                        format!("client stopped reading replies for {} s", limits::REPLY_WRITE_STALL_SECS)
                    });
                    let _ = shutdown(conn.fd.as_raw_fd(), Shutdown::Both);
                }
                self.dirty_conns.push(index);
            }
        }
        if self.live_conns() > 0 {
            self.arm_timer();
        }
    }
}

fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn describe(res: i32) -> String {
    if res == 0 {
        "connection closed".to_string()
    } else {
        std::io::Error::from_raw_os_error(-res).to_string()
    }
}
