//! One NBD client connection: the IO shell around the sans-IO protocol core.
//!
//! [`serve`] drives [`Handshake`] (upgrading to TLS when asked). The
//! transmission phase is a [`Session`] (sans-IO) with one of two shells:
//! - plaintext TCP/Unix sockets are handed to the I/O thread, which runs the
//!   session next to its ring (`backing::Backing::host`);
//! - TLS streams need rustls in user space, so [`run_session`] drives the
//!   same session here: it feeds received bytes in, submits the session's
//!   file operations to the engine, feeds completions back and writes the
//!   session's output.
//!
//! Either way a reply is sent only after its operation completed in the
//! engine, so a FLUSH received after a reply covers that reply's write on
//! any connection (the engine shares one file; fdatasync covers all of it).

use std::os::unix::io::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::session::Session;
use super::stats::ClientGuard;
use super::Shared;
use crate::backing::{HostedConnection, HostedSession, IoCompletion, IoRequest, PayloadTarget};
use crate::limits;
use crate::nbd::handshake::{Handshake, HandshakeEvent, Negotiated};
use crate::nbd::request::TransmissionConfig;

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

/// A client byte stream: a plain socket the I/O thread can host, or one
/// (TLS) that tokio must drive.
pub trait SplitStream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// The plain socket, in blocking mode, for hosting on the I/O thread
    /// (`Ok(Err(_))` if taking it out of tokio failed: the connection is
    /// lost); `Err(self)` for streams that need user-space processing (TLS).
    fn into_hosted_fd(self) -> Result<std::io::Result<OwnedFd>, Self>;
}

impl SplitStream for tokio::net::TcpStream {
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
    fn into_hosted_fd(self) -> Result<std::io::Result<OwnedFd>, Self> {
        Ok(self.into_std().and_then(|std| {
            std.set_nonblocking(false)?;
            Ok(std.into())
        }))
    }
}

impl<S: SplitStream> SplitStream for tokio_rustls::server::TlsStream<S> {
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
    let mut export = shared.export.clone();
    export.unavailable = shared.replica.as_ref().and_then(|r| r.unavailable());
    let mut handshake = Handshake::new(export, shared.tls_mode);
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
    let session = Session::new(config, shared.counters.clone(), shared.inflight_bytes.clone());
    // A replicated volume's writes go through the replica's task, so its
    // sessions stay in tokio; a plain volume's run on the I/O thread.
    if shared.replica.is_some() {
        return run_session(&shared, stream, session).await;
    }
    match stream.into_hosted_fd() {
        Ok(fd) => hosted_transmission(&shared, fd?, session).await,
        Err(stream) => run_session(&shared, stream, session).await,
    }
}

/// Runs the transmission phase on the I/O thread; returns when the engine
/// closed the connection.
async fn hosted_transmission(shared: &Shared, fd: OwnedFd, session: Session) -> Result<(), ConnectionError> {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    shared.backing.host(HostedConnection { fd, session: Box::new(session), closed: closed_tx });
    match closed_rx.await {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(ConnectionError::Hosted(why)),
        Err(_) => Err(ConnectionError::Hosted("the I/O engine dropped the connection".into())),
    }
}

/// Drives `session` over a stream tokio owns (TLS): the same protocol core
/// as on the I/O thread, with tokio doing the socket I/O.
async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: S,
    mut session: Session,
) -> Result<(), ConnectionError> {
    let stall = Duration::from_secs(limits::REPLY_WRITE_STALL_SECS);
    let (mut reader, mut writer) = tokio::io::split(stream);
    // Bounded by construction: one completion per request in flight, and
    // the connection's in-flight budget (`CONNECTION_INFLIGHT_BYTES_MAX`,
    // at least one unit a request) caps those.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<IoCompletion>();
    let mut shutdown = shared.shutdown.subscribe();
    let mut input = vec![0u8; 256 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    let mut eof = false;
    let mut batch = Vec::new();
    // A large WRITE payload the session lent us: the socket reads straight
    // into it instead of through `input` (no copy).
    let mut lent: Option<PayloadTarget> = None;
    loop {
        if start < end && session.wants_input() {
            start += session.handle_input(&input[start..end]);
            if start == end {
                (start, end) = (0, 0);
            }
        }
        if lent.is_none() && start == end && !eof {
            lent = session.lend_payload();
        }
        while let Some((tag, op)) = session.poll_io() {
            batch.push(IoRequest { tag, op, done: done_tx.clone() });
        }
        if !batch.is_empty() {
            match &shared.replica {
                Some(replica) => replica.submit_batch(batch.drain(..)),
                None => shared.backing.submit_batch(batch.drain(..)),
            }
        }
        // Completions that already arrived answer in the same write.
        while let Ok(completion) = done_rx.try_recv() {
            session.handle_completion(completion.tag, completion.result);
        }
        while let Some(transmit) = session.poll_transmit() {
            // Only the I/O thread's own connections are answered from a
            // mapping; this shell's reads come back in buffers.
            let Some((first, second)) = transmit.pieces() else {
                return Err(ConnectionError::Hosted("a mapped reply reached the tokio shell".into()));
            };
            for bytes in [first, second] {
                match tokio::time::timeout(stall, writer.write_all(bytes)).await {
                    Ok(result) => result?,
                    Err(_) => return Err(ConnectionError::ReplyStall(limits::REPLY_WRITE_STALL_SECS)),
                }
            }
            session.handle_sent();
        }
        if session.is_finished() {
            let _ = tokio::time::timeout(stall, writer.shutdown()).await;
            return match session.take_error() {
                None => Ok(()),
                Some(why) => Err(ConnectionError::Hosted(why)),
            };
        }
        let want_input = lent.is_some() || (session.wants_input() && !eof);
        if want_input && start == end {
            (start, end) = (0, 0);
        } else if want_input && start > 0 {
            // Keep a partial header at the front, then read after it.
            input.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        tokio::select! {
            completion = done_rx.recv() => {
                let completion = completion.expect("the session holds a sender");
                session.handle_completion(completion.tag, completion.result);
            }
            read = reader.read(match lent.as_mut() {
                Some(target) => &mut target.buf[target.filled..],
                None => &mut input[end..],
            }), if want_input => {
                let n = read?;
                match lent.take() {
                    Some(mut target) => {
                        target.filled += n;
                        session.return_payload(target);
                    }
                    None => end += n,
                }
                if n == 0 {
                    eof = true;
                    session.handle_eof();
                }
            }
            _ = shutdown.changed(), if !*shutdown.borrow() => session.close_input(),
            // Paused for memory another connection holds: look again later.
            _ = tokio::time::sleep(Duration::from_secs(1)), if !want_input && !eof => {}
        }
        if *shutdown.borrow() {
            session.close_input();
        }
    }
}
