//! The NBD transmission phase as a sans-IO state machine ([`Session`]),
//! hosted on the I/O thread for plaintext TCP and Unix connections.
//!
//! The host (the ring engine, `backing::hosted`) feeds received bytes to
//! [`Session::handle_input`], I/O completions to
//! [`Session::handle_completion`], and drains [`Session::poll_io`] (file
//! operations to start) and [`Session::poll_transmit`] (bytes to send, in
//! order). After each transmit is fully on the wire the host calls
//! [`Session::handle_sent`], which releases that reply's memory budget.
//!
//! Hosting the session next to the ring means a request costs no thread
//! hop: socket receive, file I/O and reply send are all SQEs of one ring.
//! TLS connections keep the tokio shell (`server::connection`); both shells
//! share `nbd::request` and `nbd::reply`, so validation and encoding are
//! the same code.
//!
//! Invariant: a request's reply is queued only after its operation
//! completed, and its budget is released only after the reply was sent.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::stats::IoCounters;
use crate::backing::{AlignedBuf, HostedSession, IoFailure, IoOp, IoOutput, PayloadTarget, ReplyBody, Transmit};
use crate::limits;
use crate::nbd::reply::{self, StatusExtent};
use crate::nbd::request::{self, Command, Decoded, TransmissionConfig};
use crate::nbd::wire::{self, NbdError};

/// What the session is reading from the stream.
enum Input {
    ExpectHeader,
    /// Collecting a WRITE payload straight into its aligned buffer.
    ReceivingPayload {
        tag: u64,
        offset: u64,
        fua: bool,
        data: AlignedBuf,
        filled: usize,
    },
    /// The payload buffer is lent to the host, which receives into it.
    PayloadLent {
        tag: u64,
        offset: u64,
        fua: bool,
    },
    /// Skipping the payload of a refused WRITE, then queueing `reply`.
    Discarding {
        remaining: u32,
        reply: Vec<u8>,
        budget: Budget,
    },
    /// DISC, EOF, a protocol violation or shutdown: read nothing more.
    Closed,
}

/// Memory a request holds until its reply is sent.
struct Budget {
    connection_bytes: u64,
    _server: OwnedSemaphorePermit,
}

struct Pending {
    cookie: u64,
    kind: PendingKind,
    budget: Budget,
}

#[derive(Clone, Copy)]
enum PendingKind {
    Read {
        offset: u64,
        len: u32,
    },
    Plain,
    /// A TRIM with FUA: flushed before it is answered.
    TrimThenFlush,
    BlockStatus {
        len: u32,
        req_one: bool,
    },
}

/// One plaintext NBD connection's transmission phase.
pub struct Session {
    config: TransmissionConfig,
    counters: Arc<IoCounters>,
    server_budget: Arc<Semaphore>,
    input: Input,
    header: [u8; wire::REQUEST_HEADER_BYTES],
    /// The last header found no memory budget; input waits until it would.
    paused: bool,
    paused_bytes: u32,
    next_tag: u64,
    pending: HashMap<u64, Pending>,
    io_queue: VecDeque<(u64, IoOp)>,
    /// Small replies coalesce here; a large one takes them as the head of
    /// its transmit, so the order on the wire is the order of completion.
    out: Vec<u8>,
    /// Budgets of the replies in `out`.
    out_budgets: Vec<Budget>,
    /// Transmits not yet taken, each with the budgets it releases when sent.
    transmits: VecDeque<(Transmit, Vec<Budget>)>,
    /// Budgets of the transmit the host is sending.
    sending: Option<Vec<Budget>>,
    /// Bytes of request data held: received payloads, read data waiting to
    /// be sent.
    connection_bytes: u64,
    /// Why the session stopped early, for the log.
    error: Option<String>,
}

impl Session {
    pub fn new(config: TransmissionConfig, counters: Arc<IoCounters>, server_budget: Arc<Semaphore>) -> Session {
        Session {
            config,
            counters,
            server_budget,
            input: Input::ExpectHeader,
            header: [0; wire::REQUEST_HEADER_BYTES],
            paused: false,
            paused_bytes: 0,
            next_tag: 0,
            pending: HashMap::new(),
            io_queue: VecDeque::new(),
            out: Vec::with_capacity(OUT_BYTES_INITIAL),
            out_budgets: Vec::new(),
            transmits: VecDeque::new(),
            sending: None,
            connection_bytes: 0,
            error: None,
        }
    }

    fn counters(&self) -> &IoCounters {
        &self.counters
    }

    /// Queues a READ's reply: small data copied after its header among the
    /// coalesced replies, large data sent as is, in one send with them.
    /// `header` is empty, with room for the reply header.
    fn read_done(&mut self, request: Pending, offset: u64, len: u32, body: ReplyBody, mut header: Vec<u8>) {
        assert_eq!(body.len(), len as usize, "engine returned a short read");
        IoCounters::add(&self.counters().bytes_read, u64::from(len));
        if matches!(body, ReplyBody::Mapped(_)) {
            IoCounters::add(&self.counters().reads_mapped, 1);
        }
        reply::read_ok_header(&mut header, request.cookie, offset, len, self.config.structured_replies);
        match body {
            ReplyBody::Buf(data) if data.len() <= limits::REPLY_COPY_BYTES_MAX => {
                header.extend_from_slice(&data);
                self.queue_reply(&header, request.budget);
            }
            body => {
                self.out.extend_from_slice(&header);
                let (head, mut budgets) = self.take_out();
                budgets.push(request.budget);
                self.transmits.push_back((Transmit::Framed { head, body }, budgets));
            }
        }
    }

    /// Whether `bytes` of request data fit the connection's budget now.
    fn fits_connection(&self, bytes: u32) -> bool {
        // An idle connection may always take one request, however large.
        self.connection_bytes == 0
            || self.connection_bytes + u64::from(bytes) <= u64::from(limits::CONNECTION_INFLIGHT_BYTES_MAX)
    }

    /// Reserves budget for `bytes` of request data, or `None` to pause input.
    /// Every request is charged at least one unit, so requests without data
    /// (FLUSH, TRIM, refusals) are bounded too: their replies and pending
    /// entries also take memory while a client is not reading.
    fn reserve(&mut self, bytes: u32) -> Option<Budget> {
        let charged = bytes.max(limits::INFLIGHT_UNIT_BYTES);
        self.paused_bytes = charged;
        if !self.fits_connection(charged) {
            return None;
        }
        let units = charged.div_ceil(limits::INFLIGHT_UNIT_BYTES);
        let server = self.server_budget.clone().try_acquire_many_owned(units).ok()?;
        self.connection_bytes += u64::from(charged);
        Some(Budget { connection_bytes: u64::from(charged), _server: server })
    }

    fn release(&mut self, budget: Budget) {
        assert!(self.connection_bytes >= budget.connection_bytes);
        self.connection_bytes -= budget.connection_bytes;
    }

    /// Takes the coalesced small replies and their budgets, leaving an
    /// empty buffer.
    fn take_out(&mut self) -> (Vec<u8>, Vec<Budget>) {
        let bytes = std::mem::replace(&mut self.out, Vec::with_capacity(OUT_BYTES_INITIAL));
        (bytes, std::mem::take(&mut self.out_budgets))
    }

    /// Queues a reply; its budget is released once the host sent it.
    fn queue_reply(&mut self, bytes: &[u8], budget: Budget) {
        self.out.extend_from_slice(bytes);
        self.out_budgets.push(budget);
    }

    /// Ends input. A WRITE whose payload never fully arrived is dropped
    /// unanswered (there is nobody left to answer).
    fn close(&mut self, why: Option<String>) {
        match std::mem::replace(&mut self.input, Input::Closed) {
            Input::ReceivingPayload { tag, .. } => {
                if let Some(pending) = self.pending.remove(&tag) {
                    self.release(pending.budget);
                }
            }
            Input::PayloadLent { tag, .. } => {
                // The buffer comes back through return_payload and is dropped.
                if let Some(pending) = self.pending.remove(&tag) {
                    self.release(pending.budget);
                }
            }
            Input::Discarding { budget, .. } => self.release(budget),
            Input::ExpectHeader | Input::Closed => {}
        }
        if self.error.is_none() {
            self.error = why;
        }
    }

    /// Handles one complete header; returns false to pause (no budget).
    fn handle_header(&mut self) -> bool {
        let decoded = match request::decode(&self.config, &self.header) {
            Ok(decoded) => decoded,
            Err(violation) => {
                IoCounters::add(&self.counters().protocol_errors, 1);
                self.close(Some(violation.to_string()));
                return true;
            }
        };
        let buffer_bytes = match decoded {
            Decoded::Execute(req) => req.command.buffer_bytes(),
            _ => 0,
        };
        let Some(budget) = self.reserve(buffer_bytes) else { return false };
        self.paused = false;
        match decoded {
            Decoded::Refuse { cookie, error, discard_bytes, structured_error } => {
                IoCounters::add(&self.counters().errors, 1);
                let mut bytes = Vec::new();
                reply::error(&mut bytes, cookie, error, structured_error, refusal_message(error));
                if discard_bytes > 0 {
                    self.input = Input::Discarding { remaining: discard_bytes, reply: bytes, budget };
                } else {
                    self.queue_reply(&bytes, budget);
                }
            }
            Decoded::RefuseAndClose { cookie, error } => {
                IoCounters::add(&self.counters().protocol_errors, 1);
                let mut bytes = Vec::new();
                reply::error(&mut bytes, cookie, error, false, "request too large");
                self.queue_reply(&bytes, budget);
                self.close(Some("request larger than the maximum".into()));
            }
            Decoded::Execute(req) => {
                self.next_tag += 1;
                let tag = self.next_tag;
                let c = &*self.counters;
                let (op, kind) = match req.command {
                    Command::Disconnect => {
                        self.release(budget);
                        self.close(None);
                        return true;
                    }
                    Command::Cache => {
                        let mut bytes = Vec::new();
                        reply::ok(&mut bytes, req.cookie);
                        self.queue_reply(&bytes, budget);
                        return true;
                    }
                    Command::Write { offset, len, fua } => {
                        IoCounters::add(&c.writes, 1);
                        IoCounters::add(&c.bytes_written, u64::from(len));
                        self.pending.insert(tag, Pending { cookie: req.cookie, kind: PendingKind::Plain, budget });
                        self.input = Input::ReceivingPayload {
                            tag,
                            offset,
                            fua,
                            data: AlignedBuf::for_overwrite(len as usize),
                            filled: 0,
                        };
                        return true;
                    }
                    Command::Read { offset, len } => {
                        IoCounters::add(&c.reads, 1);
                        (IoOp::Read { offset, len, uncached: false }, PendingKind::Read { offset, len })
                    }
                    Command::Flush => {
                        IoCounters::add(&c.flushes, 1);
                        (IoOp::Flush, PendingKind::Plain)
                    }
                    Command::Trim { offset, len, fua } => {
                        IoCounters::add(&c.trims, 1);
                        let kind = if fua { PendingKind::TrimThenFlush } else { PendingKind::Plain };
                        (IoOp::Trim { offset, len }, kind)
                    }
                    Command::WriteZeroes { offset, len, may_trim, fast_only, fua } => {
                        IoCounters::add(&c.zeroes, 1);
                        (IoOp::WriteZeroes { offset, len, may_trim, fast_only, fua }, PendingKind::Plain)
                    }
                    Command::BlockStatus { offset, len, req_one } => {
                        IoCounters::add(&c.block_status, 1);
                        (IoOp::BlockStatus { offset, len }, PendingKind::BlockStatus { len, req_one })
                    }
                };
                self.pending.insert(tag, Pending { cookie: req.cookie, kind, budget });
                self.io_queue.push_back((tag, op));
            }
        }
        true
    }
}

impl HostedSession for Session {
    fn handle_input(&mut self, mut input: &[u8]) -> usize {
        let total = input.len();
        while !input.is_empty() {
            match &mut self.input {
                Input::Closed => break,
                Input::ExpectHeader => {
                    // Headers are only taken whole; a partial one stays with
                    // the host until the rest arrives.
                    if input.len() < wire::REQUEST_HEADER_BYTES {
                        break;
                    }
                    self.header.copy_from_slice(&input[..wire::REQUEST_HEADER_BYTES]);
                    if !self.handle_header() {
                        // No budget: leave the header unconsumed and pause.
                        self.paused = true;
                        break;
                    }
                    input = &input[wire::REQUEST_HEADER_BYTES..];
                }
                Input::ReceivingPayload { data, filled, .. } => {
                    let take = (data.len() - *filled).min(input.len());
                    data[*filled..*filled + take].copy_from_slice(&input[..take]);
                    *filled += take;
                    input = &input[take..];
                    if *filled == data.len() {
                        if let Input::ReceivingPayload { tag, offset, fua, data, .. } =
                            std::mem::replace(&mut self.input, Input::ExpectHeader)
                        {
                            self.io_queue
                                .push_back((tag, IoOp::Write { offset, data: data.into(), fua, uncached: false }));
                        }
                    }
                }
                Input::PayloadLent { .. } => {
                    unreachable!("the host does not feed input while it holds the payload")
                }
                Input::Discarding { remaining, .. } => {
                    let take = (*remaining as usize).min(input.len());
                    *remaining -= take as u32;
                    input = &input[take..];
                    if *remaining == 0 {
                        if let Input::Discarding { reply, budget, .. } =
                            std::mem::replace(&mut self.input, Input::ExpectHeader)
                        {
                            self.queue_reply(&reply, budget);
                        }
                    }
                }
            }
        }
        total - input.len()
    }

    fn handle_eof(&mut self) {
        let mid_request = !matches!(self.input, Input::ExpectHeader | Input::Closed);
        // (PayloadLent counts as mid-request: EOF arrived before the payload.)
        if mid_request {
            self.close(Some("client closed the connection mid-request".into()));
        } else {
            self.close(None);
        }
    }

    fn handle_completion(&mut self, tag: u64, result: Result<IoOutput, IoFailure>) {
        let Some(request) = self.pending.remove(&tag) else {
            panic!("completion for unknown tag {tag}");
        };
        let structured = self.config.structured_replies;
        let mut header = Vec::with_capacity(64);
        match (result, request.kind) {
            (Ok(IoOutput::Read(data)), PendingKind::Read { offset, len }) => {
                self.read_done(request, offset, len, ReplyBody::Buf(data), header);
                return;
            }
            (Ok(IoOutput::Mapped(range)), PendingKind::Read { offset, len }) => {
                self.read_done(request, offset, len, ReplyBody::Mapped(range), header);
                return;
            }
            (Ok(IoOutput::Extents(extents)), PendingKind::BlockStatus { len, req_one }) => {
                let mut status: Vec<StatusExtent> = extents
                    .iter()
                    .filter(|e| e.length > 0)
                    .map(|e| StatusExtent { length: e.length, hole: e.hole })
                    .collect();
                if status.is_empty() {
                    status.push(StatusExtent { length: len, hole: false });
                }
                reply::block_status(&mut header, request.cookie, &status, req_one);
            }
            (Ok(IoOutput::Done), PendingKind::TrimThenFlush) => {
                // FUA on a TRIM: the deallocation must be durable before the
                // reply, so the same request continues with a flush.
                self.pending.insert(tag, Pending { kind: PendingKind::Plain, ..request });
                self.io_queue.push_back((tag, IoOp::Flush));
                return;
            }
            (Ok(IoOutput::Done), PendingKind::Plain) => reply::ok(&mut header, request.cookie),
            (Ok(_), _) => panic!("engine output does not match the request kind"),
            (Err(failure), kind) => {
                IoCounters::add(&self.counters().errors, 1);
                let (error, message) = failure_reply(failure);
                let structured_error =
                    structured && matches!(kind, PendingKind::Read { .. } | PendingKind::BlockStatus { .. });
                reply::error(&mut header, request.cookie, error, structured_error, message);
            }
        }
        self.queue_reply(&header, request.budget);
    }

    fn poll_io(&mut self) -> Option<(u64, IoOp)> {
        self.io_queue.pop_front()
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        assert!(self.sending.is_none(), "the host sends one transmit at a time");
        let (transmit, budgets) = match self.transmits.pop_front() {
            Some(next) => next,
            None if self.out.is_empty() => return None,
            None => {
                let (bytes, budgets) = self.take_out();
                (Transmit::Bytes(bytes), budgets)
            }
        };
        self.sending = Some(budgets);
        Some(transmit)
    }

    fn handle_sent(&mut self) {
        let budgets = self.sending.take().expect("handle_sent without a transmit");
        for budget in budgets {
            self.release(budget);
        }
    }

    fn wants_input(&self) -> bool {
        if matches!(self.input, Input::Closed) {
            return false;
        }
        if self.paused {
            let units = self.paused_bytes.div_ceil(limits::INFLIGHT_UNIT_BYTES) as usize;
            return self.fits_connection(self.paused_bytes) && self.server_budget.available_permits() >= units;
        }
        true
    }

    fn is_finished(&self) -> bool {
        matches!(self.input, Input::Closed)
            && self.pending.is_empty()
            && self.io_queue.is_empty()
            && self.out.is_empty()
            && self.transmits.is_empty()
            && self.sending.is_none()
    }

    fn close_input(&mut self) {
        if !matches!(self.input, Input::Closed) {
            self.close(None);
        }
    }

    fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }

    fn lend_payload(&mut self) -> Option<PayloadTarget> {
        let Input::ReceivingPayload { data, filled, .. } = &self.input else { return None };
        // Small remainders are cheaper to copy than to receive separately.
        if data.len() - *filled < LEND_PAYLOAD_BYTES_MIN {
            return None;
        }
        match std::mem::replace(&mut self.input, Input::Closed) {
            Input::ReceivingPayload { tag, offset, fua, data, filled } => {
                self.input = Input::PayloadLent { tag, offset, fua };
                Some(PayloadTarget { buf: data, filled })
            }
            _ => unreachable!("checked above"),
        }
    }

    fn return_payload(&mut self, target: PayloadTarget) {
        let Input::PayloadLent { tag, offset, fua } = self.input else {
            // Input was closed meanwhile; the request is already dropped.
            return;
        };
        let PayloadTarget { buf: data, filled } = target;
        if filled == data.len() {
            self.input = Input::ExpectHeader;
            self.io_queue.push_back((tag, IoOp::Write { offset, data: data.into(), fua, uncached: false }));
        } else {
            self.input = Input::ReceivingPayload { tag, offset, fua, data, filled };
        }
    }
}

/// Payload remainders at least this large are received in place.
const LEND_PAYLOAD_BYTES_MIN: usize = 64 * 1024;

/// Capacity of a fresh buffer for coalescing small replies.
const OUT_BYTES_INITIAL: usize = 64 * 1024;

fn refusal_message(error: NbdError) -> &'static str {
    match error {
        NbdError::Perm => "export is read-only",
        NbdError::NoSpc => "request extends past the end of the export",
        _ => "invalid request",
    }
}

/// The reply error and message for an engine failure.
pub fn failure_reply(failure: IoFailure) -> (NbdError, &'static str) {
    match failure {
        IoFailure::Errno(errno) => (NbdError::from_errno(errno), "i/o error on the backing store"),
        IoFailure::NotSupported => (NbdError::NotSup, "fast zeroing is not supported here"),
        IoFailure::OutOfRange => (NbdError::Inval, "request outside the export"),
        IoFailure::ReadOnly => (NbdError::Perm, "export is read-only"),
        IoFailure::EngineStopped => (NbdError::Shutdown, "server is shutting down"),
    }
}

#[cfg(test)]
mod tests {
    //! The session driven by a fake host: an in-memory disk executes the
    //! I/O, input arrives in random chunks, and every reply is checked
    //! against a model of the disk.

    use super::*;
    use crate::backing::Extent;
    use crate::test_rng::Rng;

    const DISK_BYTES: u64 = 1 << 20;

    fn session(read_only: bool) -> Session {
        let config =
            TransmissionConfig { size_bytes: DISK_BYTES, read_only, structured_replies: false, base_allocation: false };
        Session::new(config, Arc::new(IoCounters::default()), Arc::new(Semaphore::new(1 << 20)))
    }

    fn header(command: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut h = wire::REQUEST_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&command.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    /// A host that runs I/O against a Vec and collects the output.
    struct FakeHost {
        disk: Vec<u8>,
        wire: Vec<u8>,
    }

    impl FakeHost {
        fn new() -> FakeHost {
            FakeHost { disk: vec![0; DISK_BYTES as usize], wire: Vec::new() }
        }

        /// Runs everything the session asked for, in the order asked (so
        /// the model is deterministic), but delivers the completions in a
        /// shuffled order (replies may overtake each other), until quiet.
        fn settle(&mut self, s: &mut Session, rng: &mut Rng) {
            loop {
                let mut ops = Vec::new();
                while let Some(op) = s.poll_io() {
                    ops.push(op);
                }
                let mut progressed = !ops.is_empty();
                let mut done = Vec::new();
                for (tag, op) in ops {
                    let result = match op {
                        IoOp::Read { offset, len, .. } => Ok(IoOutput::Read(AlignedBuf::from_slice(
                            &self.disk[offset as usize..offset as usize + len as usize],
                        ))),
                        IoOp::Write { offset, data, .. } => {
                            self.disk[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                            Ok(IoOutput::Done)
                        }
                        IoOp::WriteZeroes { offset, len, .. } | IoOp::Trim { offset, len } => {
                            self.disk[offset as usize..(offset + u64::from(len)) as usize].fill(0);
                            Ok(IoOutput::Done)
                        }
                        IoOp::Flush => Ok(IoOutput::Done),
                        IoOp::BlockStatus { len, .. } => {
                            Ok(IoOutput::Extents(vec![Extent { length: len, hole: false }]))
                        }
                    };
                    done.push((tag, result));
                }
                while !done.is_empty() {
                    let (tag, result) = done.swap_remove(rng.next() as usize % done.len());
                    s.handle_completion(tag, result);
                }
                while let Some(t) = s.poll_transmit() {
                    progressed = true;
                    let (first, second) = t.pieces().expect("the fake host maps nothing");
                    self.wire.extend_from_slice(first);
                    self.wire.extend_from_slice(second);
                    s.handle_sent();
                }
                if !progressed {
                    return;
                }
            }
        }
    }

    /// Splits simple replies off the wire: (cookie, error, data of `read_len`).
    fn take_reply(wire: &mut Vec<u8>, read_lens: &HashMap<u64, usize>) -> Option<(u64, u32, Vec<u8>)> {
        if wire.len() < wire::SIMPLE_REPLY_BYTES {
            return None;
        }
        assert_eq!(u32::from_be_bytes(wire[..4].try_into().unwrap()), wire::SIMPLE_REPLY_MAGIC);
        let error = u32::from_be_bytes(wire[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(wire[8..16].try_into().unwrap());
        let data_len = if error == 0 { read_lens.get(&cookie).copied().unwrap_or(0) } else { 0 };
        let data = wire[16..16 + data_len].to_vec();
        wire.drain(..16 + data_len);
        Some((cookie, error, data))
    }

    #[test]
    fn random_request_streams_match_a_disk_model() {
        for seed in 0..300u64 {
            let mut rng = Rng::new(seed);
            let mut s = session(false);
            let mut host = FakeHost::new();
            let mut model = vec![0u8; DISK_BYTES as usize];
            // Expected answers by cookie: Ok(read data) or Err(errno).
            let mut expected: HashMap<u64, Result<Vec<u8>, u32>> = HashMap::new();
            let mut read_lens = HashMap::new();
            let mut stream = Vec::new();
            for cookie in 0..40u64 {
                let offset = rng.next() % (DISK_BYTES + 8192) / 512 * 512;
                let len = (rng.next() % 70_000) as u32 + 1;
                let in_range = offset + u64::from(len) <= DISK_BYTES;
                match rng.next() % 4 {
                    0 => {
                        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                        stream.extend(header(wire::CMD_WRITE, 0, cookie, offset, len));
                        stream.extend(&data);
                        if in_range {
                            model[offset as usize..offset as usize + len as usize].copy_from_slice(&data);
                            expected.insert(cookie, Ok(Vec::new()));
                        } else {
                            expected.insert(cookie, Err(NbdError::NoSpc as u32));
                        }
                    }
                    1 | 2 => {
                        // The fake host executes in request order, so a read
                        // sees every write before it.
                        stream.extend(header(wire::CMD_FLUSH, 0, 1_000_000 + cookie, 0, 0));
                        expected.insert(1_000_000 + cookie, Ok(Vec::new()));
                        stream.extend(header(wire::CMD_READ, 0, cookie, offset, len));
                        if in_range {
                            read_lens.insert(cookie, len as usize);
                            expected
                                .insert(cookie, Ok(model[offset as usize..offset as usize + len as usize].to_vec()));
                        } else {
                            expected.insert(cookie, Err(NbdError::Inval as u32));
                        }
                    }
                    _ => {
                        stream.extend(header(wire::CMD_WRITE_ZEROES, 0, cookie, offset, len));
                        if in_range {
                            model[offset as usize..offset as usize + len as usize].fill(0);
                            expected.insert(cookie, Ok(Vec::new()));
                        } else {
                            expected.insert(cookie, Err(NbdError::NoSpc as u32));
                        }
                    }
                }
            }
            stream.extend(header(wire::CMD_DISC, 0, 99_999, 0, 0));
            // Feed the stream in random chunks, as a socket would deliver
            // it, settling between requests so reads follow writes.
            let mut pos = 0;
            let mut pending = Vec::new();
            while pos < stream.len() || !pending.is_empty() {
                if pos < stream.len() {
                    let n = (1 + rng.next() % 9000) as usize;
                    pending.extend_from_slice(&stream[pos..(pos + n).min(stream.len())]);
                    pos = (pos + n).min(stream.len());
                }
                let consumed = s.handle_input(&pending);
                pending.drain(..consumed);
                host.settle(&mut s, &mut rng);
                if pos == stream.len() && consumed == 0 {
                    assert!(pending.len() < wire::REQUEST_HEADER_BYTES || !s.wants_input(), "seed {seed}: stuck");
                    break;
                }
            }
            assert!(s.is_finished(), "seed {seed}: session not finished after DISC");
            let mut answered = 0;
            while let Some((cookie, error, data)) = take_reply(&mut host.wire, &read_lens) {
                answered += 1;
                match expected.remove(&cookie) {
                    Some(Ok(want)) => {
                        assert_eq!(error, 0, "seed {seed}: cookie {cookie} failed");
                        assert!(data == want, "seed {seed}: cookie {cookie} read wrong data");
                    }
                    Some(Err(want)) => assert_eq!(error, want, "seed {seed}: cookie {cookie}"),
                    None => panic!("seed {seed}: reply for unknown or repeated cookie {cookie}"),
                }
            }
            assert!(expected.is_empty(), "seed {seed}: {} requests unanswered", expected.len());
            assert!(answered > 0);
            assert_eq!(s.connection_bytes, 0, "seed {seed}: budget leaked");
        }
    }

    #[test]
    fn large_payloads_are_lent_to_the_host_and_completed_in_place() {
        let mut s = session(false);
        let len = 200_000u32;
        let mut input = header(wire::CMD_WRITE, 0, 5, 4096, len);
        input.extend(vec![0x11; 1000]);
        assert_eq!(s.handle_input(&input), input.len());
        let mut target = s.lend_payload().expect("a 199 KB remainder is received in place");
        assert_eq!(target.filled, 1000);
        assert!(s.lend_payload().is_none(), "only one lender at a time");
        target.buf[1000..100_000].fill(0x22);
        target.filled = 100_000;
        s.return_payload(target);
        assert!(s.poll_io().is_none(), "half a payload is not a write yet");
        let mut target = s.lend_payload().unwrap();
        target.buf[100_000..].fill(0x33);
        target.filled = len as usize;
        s.return_payload(target);
        match s.poll_io() {
            Some((tag, IoOp::Write { offset: 4096, data, fua: false, uncached: false })) => {
                assert_eq!((data[0], data[50_000], data[150_000]), (0x11, 0x22, 0x33));
                s.handle_completion(tag, Ok(IoOutput::Done));
            }
            other => panic!("expected the write, got {other:?}"),
        }
        // Closing while lent drops the request once the buffer comes back.
        let mut input = header(wire::CMD_WRITE, 0, 6, 0, len);
        input.extend(vec![0; 10]);
        s.handle_input(&input);
        let target = s.lend_payload().unwrap();
        s.close_input();
        s.return_payload(target);
        assert!(s.poll_io().is_none());
        let mut host = FakeHost::new();
        host.settle(&mut s, &mut Rng::new(3));
        assert!(s.is_finished());
    }

    #[test]
    fn trim_with_fua_is_flushed_before_its_reply() {
        let mut s = session(false);
        s.handle_input(&header(wire::CMD_TRIM, wire::CMD_FLAG_FUA, 9, 0, 4096));
        let (tag, op) = s.poll_io().unwrap();
        assert!(matches!(op, IoOp::Trim { .. }));
        s.handle_completion(tag, Ok(IoOutput::Done));
        assert!(s.poll_transmit().is_none(), "no reply before the flush");
        let (flush_tag, op) = s.poll_io().unwrap();
        assert!(matches!(op, IoOp::Flush) && flush_tag == tag);
        s.handle_completion(tag, Ok(IoOutput::Done));
        let mut host = FakeHost::new();
        host.settle(&mut s, &mut Rng::new(1));
        assert_eq!(take_reply(&mut host.wire, &HashMap::new()).map(|r| (r.0, r.1)), Some((9, 0)));
    }

    #[test]
    fn requests_without_data_are_bounded_too() {
        // A client that sends FLUSHes and never reads the replies.
        let mut s = session(false);
        let input: Vec<u8> = (0..20_000u64).flat_map(|c| header(wire::CMD_FLUSH, 0, c, 0, 0)).collect();
        let consumed = s.handle_input(&input);
        let max_requests = (limits::CONNECTION_INFLIGHT_BYTES_MAX / limits::INFLIGHT_UNIT_BYTES) as usize;
        assert_eq!(consumed, max_requests * wire::REQUEST_HEADER_BYTES);
        assert!(!s.wants_input());
    }

    #[test]
    fn a_header_split_across_inputs_is_taken_whole() {
        let mut s = session(false);
        let h = header(wire::CMD_FLUSH, 0, 7, 0, 0);
        assert_eq!(s.handle_input(&h[..10]), 0, "a partial header is left with the host");
        assert!(s.wants_input());
        assert_eq!(s.handle_input(&h), h.len());
        assert!(matches!(s.poll_io(), Some((_, IoOp::Flush))));
    }

    #[test]
    fn budget_pauses_input_until_replies_are_sent() {
        let mut s = session(false);
        let big = limits::NBD_REQUEST_BYTES_MAX;
        let mut input = header(wire::CMD_READ, 0, 1, 0, big.min(DISK_BYTES as u32));
        input.extend(header(wire::CMD_READ, 0, 2, 0, big.min(DISK_BYTES as u32)));
        // Shrink the limit's effect: fill the connection budget by hand.
        s.connection_bytes = u64::from(limits::CONNECTION_INFLIGHT_BYTES_MAX);
        assert_eq!(s.handle_input(&input), 0, "no budget: the header stays unconsumed");
        assert!(!s.wants_input());
        s.connection_bytes = 0;
        assert!(s.wants_input(), "budget back: input resumes");
        assert_eq!(s.handle_input(&input), input.len());
    }

    #[test]
    fn refused_write_payload_is_skipped_and_eof_mid_payload_drops_the_request() {
        let mut s = session(true);
        let mut input = header(wire::CMD_WRITE, 0, 1, 0, 100);
        input.extend(vec![0xEE; 100]);
        input.extend(header(wire::CMD_WRITE, 0, 2, 0, 50));
        input.extend(vec![0xEE; 10]);
        assert_eq!(s.handle_input(&input), input.len());
        let mut host = FakeHost::new();
        host.settle(&mut s, &mut Rng::new(1));
        let (cookie, error, _) = take_reply(&mut host.wire, &HashMap::new()).unwrap();
        assert_eq!((cookie, error), (1, NbdError::Perm as u32));
        s.handle_eof();
        host.settle(&mut s, &mut Rng::new(1));
        assert!(s.is_finished());
        assert!(take_reply(&mut host.wire, &HashMap::new()).is_none(), "nothing answers a half-received write");
        assert_eq!(s.connection_bytes, 0);
    }
}
