//! One NBD client connection: the IO shell around the sans-IO protocol core.
//!
//! [`serve`] drives [`Handshake`] (upgrading to TLS when asked), then runs
//! the transmission phase as two halves in one task:
//! - the *reader* parses requests ([`request::decode`]), reads WRITE
//!   payloads straight into aligned I/O buffers, and submits batches to the
//!   [`Backing`] engine;
//! - the *writer* turns engine completions and immediate refusals into
//!   replies, coalescing many into one socket write.
//!
//! Replies leave in completion order, not request order (NBD allows this).
//! A reply is sent only after its operation completed in the engine, so a
//! FLUSH received after a reply covers that reply's write, on any
//! connection (the engine shares one file; fdatasync covers all of it).
//!
//! Memory: every request holds permits from a per-connection and a
//! server-wide semaphore, sized by its payload, until its reply has been
//! written. A client that stops reading stalls its reader; after
//! [`limits::REPLY_WRITE_STALL_SECS`] the connection is dropped and its
//! buffers freed.

use std::collections::HashMap;
use std::os::unix::io::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::session::{failure_reply, Session};
use super::stats::{ClientGuard, IoCounters};
use super::Shared;
use crate::backing::{AlignedBuf, HostedConnection, IoCompletion, IoFailure, IoOp, IoOutput, IoRequest};
use crate::limits;
use crate::nbd::handshake::{Handshake, HandshakeEvent, Negotiated};
use crate::nbd::reply::{self, StatusExtent};
use crate::nbd::request::{self, Command, Decoded, TransmissionConfig};
use crate::nbd::wire::{self, NbdError};

/// Why a connection ended early; logged once, never sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] crate::nbd::handshake::HandshakeError),
    #[error("protocol: {0}")]
    Protocol(#[from] crate::nbd::request::ProtocolViolation),
    #[error("handshake not finished within {0} s")]
    HandshakeTimeout(u64),
    #[error("client stopped reading replies for {0} s")]
    ReplyStall(u64),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client asked for TLS but the server has no TLS configuration")]
    TlsUnavailable,
    #[error("{0}")]
    Hosted(String),
}

/// Result of driving the handshake on one stream.
enum Step<S> {
    Ready(S, Negotiated),
    StartTls(S),
    Closed,
}

async fn drive_handshake<S>(handshake: &mut Handshake, mut stream: S) -> Result<Step<S>, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut input = Vec::new();
    loop {
        if let Some(out) = handshake.poll_transmit() {
            stream.write_all(&out).await?;
            stream.flush().await?;
        }
        match handshake.poll_event() {
            Some(HandshakeEvent::Ready(negotiated)) => return Ok(Step::Ready(stream, negotiated)),
            Some(HandshakeEvent::StartTls) => return Ok(Step::StartTls(stream)),
            Some(HandshakeEvent::Closed) => return Ok(Step::Closed),
            None => {}
        }
        let wanted = handshake.bytes_wanted();
        assert!(wanted > 0, "handshake neither wants input nor has an event");
        input.resize(wanted, 0);
        stream.read_exact(&mut input).await?;
        if let Err(err) = handshake.handle_input(&input) {
            // Send the final error reply, if the core queued one, then close.
            if let Some(out) = handshake.poll_transmit() {
                let _ = stream.write_all(&out).await;
                let _ = stream.flush().await;
            }
            return Err(err.into());
        }
    }
}

/// A byte stream that can be split into independent read and write halves.
pub trait SplitStream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    type Read: AsyncRead + Unpin + Send;
    type Write: AsyncWrite + Unpin + Send;
    fn split_halves(self) -> (Self::Read, Self::Write);
    /// The plain socket, in blocking mode, for hosting on the I/O thread
    /// (`Ok(Err(_))` if taking it out of tokio failed: the connection is
    /// lost); `Err(self)` for streams that need user-space processing (TLS).
    fn into_hosted_fd(self) -> Result<std::io::Result<OwnedFd>, Self>;
}

impl SplitStream for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn into_hosted_fd(self) -> Result<std::io::Result<OwnedFd>, Self> {
        Ok(self.into_std().and_then(|std| {
            // io_uring completes operations on a non-blocking socket with
            // EAGAIN instead of waiting for it; in blocking mode it polls.
            std.set_nonblocking(false)?;
            Ok(std.into())
        }))
    }
}

impl SplitStream for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn into_hosted_fd(self) -> Result<std::io::Result<OwnedFd>, Self> {
        Ok(self.into_std().and_then(|std| {
            std.set_nonblocking(false)?;
            Ok(std.into())
        }))
    }
}

impl<S: SplitStream> SplitStream for tokio_rustls::server::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
    fn into_hosted_fd(self) -> Result<std::io::Result<OwnedFd>, Self> {
        Err(self)
    }
}

/// Serves one client from handshake to disconnect.
pub async fn serve<S: SplitStream>(
    shared: Arc<Shared>,
    stream: S,
    client: &ClientGuard<'_>,
) -> Result<(), ConnectionError> {
    let timeout = Duration::from_secs(limits::HANDSHAKE_TIMEOUT_SECS);
    let mut handshake = Handshake::new(shared.export.clone(), shared.tls_mode);
    let step = tokio::time::timeout(timeout, drive_handshake(&mut handshake, stream))
        .await
        .map_err(|_| ConnectionError::HandshakeTimeout(limits::HANDSHAKE_TIMEOUT_SECS))??;
    let (stream, negotiated) = match step {
        Step::Closed => return Ok(()),
        Step::Ready(stream, negotiated) => {
            client.update(|c| c.phase = "transmission".into());
            return transmission(shared, stream, negotiated).await;
        }
        Step::StartTls(stream) => {
            let acceptor = shared.tls_acceptor.clone().ok_or(ConnectionError::TlsUnavailable)?;
            let tls_stream = tokio::time::timeout(timeout, acceptor.accept(stream))
                .await
                .map_err(|_| ConnectionError::HandshakeTimeout(limits::HANDSHAKE_TIMEOUT_SECS))?
                .map_err(ConnectionError::Tls)?;
            handshake.tls_established();
            client.update(|c| c.tls = true);
            let step = tokio::time::timeout(timeout, drive_handshake(&mut handshake, tls_stream))
                .await
                .map_err(|_| ConnectionError::HandshakeTimeout(limits::HANDSHAKE_TIMEOUT_SECS))??;
            match step {
                Step::Closed => return Ok(()),
                Step::Ready(stream, negotiated) => (stream, negotiated),
                Step::StartTls(_) => unreachable!("the core refuses a second STARTTLS"),
            }
        }
    };
    client.update(|c| c.phase = "transmission".into());
    transmission(shared, stream, negotiated).await
}

/// Requests submitted to the engine and not yet answered, by tag. The
/// reader inserts before submitting; the writer removes on completion.
type PendingMap = Mutex<HashMap<u64, Pending>>;

fn lock(pending: &PendingMap) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
    // Entries are inserted and removed whole; a poisoned map is still consistent.
    pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the writer needs to answer a request once its I/O completes.
struct Pending {
    cookie: u64,
    kind: PendingKind,
    _permits: Permits,
}

#[derive(Clone, Copy)]
enum PendingKind {
    Read { offset: u64, len: u32 },
    Plain,
    BlockStatus { len: u32, req_one: bool },
}

/// Permits a request holds until its reply is on the wire.
struct Permits {
    _request: OwnedSemaphorePermit,
    _connection_bytes: OwnedSemaphorePermit,
    _server_bytes: OwnedSemaphorePermit,
}

/// An answer that needs no I/O (refusals, CACHE).
struct Immediate {
    bytes: Vec<u8>,
    _permits: Permits,
}

struct Budget {
    requests: Arc<Semaphore>,
    connection_bytes: Arc<Semaphore>,
    server_bytes: Arc<Semaphore>,
}

impl Budget {
    fn units(buffer_bytes: u32) -> u32 {
        buffer_bytes.div_ceil(limits::INFLIGHT_UNIT_BYTES).max(1)
    }

    fn try_acquire(&self, buffer_bytes: u32) -> Option<Permits> {
        let units = Self::units(buffer_bytes);
        let request = self.requests.clone().try_acquire_owned().ok()?;
        let connection_bytes = self.connection_bytes.clone().try_acquire_many_owned(units).ok()?;
        let server_bytes = self.server_bytes.clone().try_acquire_many_owned(units).ok()?;
        Some(Permits { _request: request, _connection_bytes: connection_bytes, _server_bytes: server_bytes })
    }

    async fn acquire(&self, buffer_bytes: u32) -> Permits {
        let units = Self::units(buffer_bytes);
        // The semaphores are never closed, so acquisition only waits.
        let request = self.requests.clone().acquire_owned().await.expect("semaphore never closed");
        let connection_bytes =
            self.connection_bytes.clone().acquire_many_owned(units).await.expect("semaphore never closed");
        let server_bytes = self.server_bytes.clone().acquire_many_owned(units).await.expect("semaphore never closed");
        Permits { _request: request, _connection_bytes: connection_bytes, _server_bytes: server_bytes }
    }
}

async fn transmission<S: SplitStream>(
    shared: Arc<Shared>,
    stream: S,
    negotiated: Negotiated,
) -> Result<(), ConnectionError> {
    let config = TransmissionConfig {
        size_bytes: shared.export.size_bytes,
        read_only: shared.export.read_only,
        structured_replies: negotiated.structured_replies,
        base_allocation: negotiated.base_allocation,
    };
    let stream = if shared.host_plain_connections {
        match stream.into_hosted_fd() {
            Ok(fd) => return hosted_transmission(&shared, fd?, config).await,
            Err(stream) => stream,
        }
    } else {
        stream
    };
    let (read_half, write_half) = stream.split_halves();
    let pending: PendingMap = Mutex::new(HashMap::new());
    let (done_tx, done_rx) = mpsc::unbounded_channel::<IoCompletion>();
    let (immediate_tx, immediate_rx) = mpsc::unbounded_channel::<Immediate>();
    let budget = Budget {
        requests: Arc::new(Semaphore::new(limits::CONNECTION_INFLIGHT_REQUESTS_MAX as usize)),
        connection_bytes: Arc::new(Semaphore::new(
            (limits::CONNECTION_INFLIGHT_BYTES_MAX / limits::INFLIGHT_UNIT_BYTES) as usize,
        )),
        server_bytes: shared.inflight_bytes.clone(),
    };

    let reader = read_requests(&shared, config, read_half, &pending, done_tx, immediate_tx, &budget);
    let writer = write_replies(&shared, config, write_half, &pending, done_rx, immediate_rx);
    tokio::pin!(reader);
    tokio::pin!(writer);
    tokio::select! {
        read_result = &mut reader => {
            // The reader is done (disconnect, shutdown or error); let the
            // writer answer everything already submitted, then report the
            // first error.
            let write_result = writer.await;
            read_result.and(write_result)
        }
        write_result = &mut writer => {
            // The writer only finishes first on error; the reader future is
            // dropped, which drops the socket and every pending buffer.
            write_result
        }
    }
}

/// Runs the transmission phase on the I/O thread (see
/// `server::session`); returns when the engine closed the connection.
async fn hosted_transmission(shared: &Shared, fd: OwnedFd, config: TransmissionConfig) -> Result<(), ConnectionError> {
    let session = Session::new(config, shared.counters.clone(), shared.inflight_bytes.clone());
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    shared.backing.host(HostedConnection { fd, session: Box::new(session), closed: closed_tx });
    match closed_rx.await {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(ConnectionError::Hosted(why)),
        Err(_) => Err(ConnectionError::Hosted("the I/O engine dropped the connection".into())),
    }
}

/// Reads requests until DISC, EOF, shutdown or a protocol violation.
async fn read_requests<R: AsyncRead + Unpin>(
    shared: &Shared,
    config: TransmissionConfig,
    read_half: R,
    pending: &PendingMap,
    done_tx: mpsc::UnboundedSender<IoCompletion>,
    immediate_tx: mpsc::UnboundedSender<Immediate>,
    budget: &Budget,
) -> Result<(), ConnectionError> {
    let mut reader = BufReader::with_capacity(256 * 1024, read_half);
    let mut shutdown = shared.shutdown.subscribe();
    let mut batch: Vec<IoRequest> = Vec::with_capacity(64);
    let mut next_tag: u64 = 0;
    let counters = &shared.counters;
    let flush_batch = |batch: &mut Vec<IoRequest>| {
        if !batch.is_empty() {
            shared.backing.submit_batch(batch.drain(..));
        }
    };

    loop {
        let mut header = [0u8; wire::REQUEST_HEADER_BYTES];
        if reader.buffer().len() < header.len() {
            flush_batch(&mut batch);
            if *shutdown.borrow() {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                filled = fill(&mut reader) => {
                    if !filled? {
                        return Ok(()); // EOF between requests: the client hung up.
                    }
                }
            }
        }
        reader.read_exact(&mut header).await?;
        let decoded = match request::decode(&config, &header) {
            Ok(decoded) => decoded,
            Err(violation) => {
                IoCounters::add(&counters.protocol_errors, 1);
                flush_batch(&mut batch);
                return Err(violation.into());
            }
        };
        let buffer_bytes = match decoded {
            Decoded::Execute(req) => req.command.buffer_bytes(),
            Decoded::Refuse { .. } | Decoded::RefuseAndClose { .. } => 0,
        };
        let permits = match budget.try_acquire(buffer_bytes) {
            Some(permits) => permits,
            None => {
                // Submit what we hold before waiting: those requests'
                // permits are what will free room.
                flush_batch(&mut batch);
                budget.acquire(buffer_bytes).await
            }
        };
        match decoded {
            Decoded::Refuse { cookie, error, discard_bytes, structured_error } => {
                IoCounters::add(&counters.errors, 1);
                if discard_bytes > 0 {
                    flush_batch(&mut batch);
                    discard(&mut reader, discard_bytes).await?;
                }
                let mut bytes = Vec::new();
                reply::error(&mut bytes, cookie, error, structured_error, refusal_message(error));
                let _ = immediate_tx.send(Immediate { bytes, _permits: permits });
            }
            Decoded::RefuseAndClose { cookie, error } => {
                IoCounters::add(&counters.protocol_errors, 1);
                let mut bytes = Vec::new();
                reply::error(&mut bytes, cookie, error, false, "request too large");
                let _ = immediate_tx.send(Immediate { bytes, _permits: permits });
                flush_batch(&mut batch);
                return Ok(());
            }
            Decoded::Execute(req) => {
                let (op, kind) = match req.command {
                    Command::Disconnect => {
                        flush_batch(&mut batch);
                        return Ok(());
                    }
                    Command::Cache => {
                        let mut bytes = Vec::new();
                        reply::ok(&mut bytes, req.cookie);
                        let _ = immediate_tx.send(Immediate { bytes, _permits: permits });
                        continue;
                    }
                    Command::Read { offset, len } => {
                        IoCounters::add(&counters.reads, 1);
                        (IoOp::Read { offset, len }, PendingKind::Read { offset, len })
                    }
                    Command::Write { offset, len, fua } => {
                        IoCounters::add(&counters.writes, 1);
                        IoCounters::add(&counters.bytes_written, u64::from(len));
                        let mut data = AlignedBuf::for_overwrite(len as usize);
                        if reader.buffer().len() < len as usize {
                            flush_batch(&mut batch);
                        }
                        reader.read_exact(&mut data).await?;
                        (IoOp::Write { offset, data, fua }, PendingKind::Plain)
                    }
                    Command::Flush => {
                        IoCounters::add(&counters.flushes, 1);
                        (IoOp::Flush, PendingKind::Plain)
                    }
                    Command::Trim { offset, len, .. } => {
                        IoCounters::add(&counters.trims, 1);
                        (IoOp::Trim { offset, len }, PendingKind::Plain)
                    }
                    Command::WriteZeroes { offset, len, may_trim, fast_only, fua } => {
                        IoCounters::add(&counters.zeroes, 1);
                        (IoOp::WriteZeroes { offset, len, may_trim, fast_only, fua }, PendingKind::Plain)
                    }
                    Command::BlockStatus { offset, len, req_one } => {
                        IoCounters::add(&counters.block_status, 1);
                        (IoOp::BlockStatus { offset, len }, PendingKind::BlockStatus { len, req_one })
                    }
                };
                next_tag += 1;
                lock(pending).insert(next_tag, Pending { cookie: req.cookie, kind, _permits: permits });
                batch.push(IoRequest { tag: next_tag, op, done: done_tx.clone() });
                if batch.len() >= limits::REPLY_BATCH_MAX {
                    flush_batch(&mut batch);
                }
            }
        }
    }
}

/// Waits until the reader has buffered input; `false` on EOF. Cancel-safe,
/// so it can race the shutdown signal; `read_exact` afterwards completes a
/// partial header.
async fn fill<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> std::io::Result<bool> {
    use tokio::io::AsyncBufReadExt;
    Ok(!reader.fill_buf().await?.is_empty())
}

async fn discard<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, bytes: u32) -> std::io::Result<()> {
    let mut sink = tokio::io::sink();
    let copied = tokio::io::copy(&mut (&mut *reader).take(u64::from(bytes)), &mut sink).await?;
    if copied < u64::from(bytes) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn refusal_message(error: NbdError) -> &'static str {
    match error {
        NbdError::Perm => "export is read-only",
        NbdError::NoSpc => "request extends past the end of the export",
        _ => "invalid request",
    }
}

/// Sends replies until every submitted request is answered and the reader
/// has finished.
async fn write_replies<W: AsyncWrite + Unpin>(
    shared: &Shared,
    config: TransmissionConfig,
    mut write_half: W,
    pending: &PendingMap,
    mut done_rx: mpsc::UnboundedReceiver<IoCompletion>,
    mut immediate_rx: mpsc::UnboundedReceiver<Immediate>,
) -> Result<(), ConnectionError> {
    let stall = Duration::from_secs(limits::REPLY_WRITE_STALL_SECS);
    let mut out: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut held: Vec<Pending> = Vec::with_capacity(limits::REPLY_BATCH_MAX);
    let mut held_immediate: Vec<Immediate> = Vec::new();
    let mut done_open = true;
    let mut immediate_open = true;
    while done_open || immediate_open {
        // Wait for the first item, then take whatever else is ready.
        tokio::select! {
            completion = done_rx.recv(), if done_open => match completion {
                Some(completion) => {
                    encode_completion(shared, config, pending, completion, &mut out, &mut write_half, &mut held, stall).await?;
                }
                None => done_open = false,
            },
            immediate = immediate_rx.recv(), if immediate_open => match immediate {
                Some(immediate) => {
                    out.extend_from_slice(&immediate.bytes);
                    held_immediate.push(immediate);
                }
                None => immediate_open = false,
            },
        }
        for _ in 1..limits::REPLY_BATCH_MAX {
            if let Ok(completion) = done_rx.try_recv() {
                encode_completion(shared, config, pending, completion, &mut out, &mut write_half, &mut held, stall)
                    .await?;
            } else if let Ok(immediate) = immediate_rx.try_recv() {
                out.extend_from_slice(&immediate.bytes);
                held_immediate.push(immediate);
            } else {
                break;
            }
        }
        if !out.is_empty() {
            write_with_stall_limit(&mut write_half, &out, stall).await?;
            out.clear();
        }
        // Replies are on the wire: release the permits.
        held.clear();
        held_immediate.clear();
    }
    let _ = tokio::time::timeout(stall, write_half.shutdown()).await;
    Ok(())
}

async fn write_with_stall_limit<W: AsyncWrite + Unpin>(
    write_half: &mut W,
    bytes: &[u8],
    stall: Duration,
) -> Result<(), ConnectionError> {
    match tokio::time::timeout(stall, async {
        write_half.write_all(bytes).await?;
        write_half.flush().await
    })
    .await
    {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnectionError::ReplyStall(limits::REPLY_WRITE_STALL_SECS)),
    }
}

#[allow(clippy::too_many_arguments)]
async fn encode_completion<W: AsyncWrite + Unpin>(
    shared: &Shared,
    config: TransmissionConfig,
    pending: &PendingMap,
    completion: IoCompletion,
    out: &mut Vec<u8>,
    write_half: &mut W,
    held: &mut Vec<Pending>,
    stall: Duration,
) -> Result<(), ConnectionError> {
    let Some(request) = lock(pending).remove(&completion.tag) else {
        // Every tag is registered before submission; a stray one is a bug.
        panic!("completion for unknown tag {}", completion.tag);
    };
    let structured = config.structured_replies;
    let counters = &shared.counters;
    match (completion.result, request.kind) {
        (Ok(IoOutput::Read(data)), PendingKind::Read { offset, len }) => {
            assert_eq!(data.len(), len as usize, "engine returned a short read");
            IoCounters::add(&counters.bytes_read, u64::from(len));
            reply::read_ok_header(out, request.cookie, offset, len, structured);
            if data.len() <= limits::REPLY_COPY_BYTES_MAX {
                out.extend_from_slice(&data);
            } else {
                // Large reads go from the I/O buffer to the socket uncopied.
                write_with_stall_limit(write_half, out, stall).await?;
                out.clear();
                write_with_stall_limit(write_half, &data, stall).await?;
            }
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
            reply::block_status(out, request.cookie, &status, req_one);
        }
        (Ok(IoOutput::Done), PendingKind::Plain) => reply::ok(out, request.cookie),
        (Ok(_), _) => panic!("engine output does not match the request kind"),
        (Err(failure), kind) => {
            IoCounters::add(&counters.errors, 1);
            let (error, message) = failure_reply(failure);
            if let IoFailure::Errno(errno) = failure {
                tracing::warn!(errno, "backing store i/o failed");
            }
            let structured_error = structured && !matches!(kind, PendingKind::Plain);
            reply::error(out, request.cookie, error, structured_error, message);
        }
    }
    held.push(request);
    Ok(())
}
