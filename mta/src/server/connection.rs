//! One client connection: the I/O shell around the sans-IO
//! `smtp::session::Session`. It reads with the session's deadline, feeds
//! bytes, writes replies, answers queries (directory, AUTH limiter,
//! filters, queue) and performs the TLS upgrade.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::Shared;
use crate::config::{Listener, ListenerKind};
use crate::delivery::now_unix;
use crate::filter::{self, Verdict};
use crate::header_from;
use crate::limits::{MESSAGE_MEMORY_UNIT_BYTES, RESERVE_AUTH_SECS, STRESS_TIMEOUT_SECS, TLS_HANDSHAKE_TIMEOUT_SECS};
use crate::proxy::{self, Proxied, ProxyError};
use crate::queue::{Queue, StoredEnvelope};
use crate::received;
use crate::smtp::address::ReversePath;
use crate::smtp::reply::Reply;
use crate::smtp::session::{Answer, AuthOutcome, EnqueueOutcome, Envelope, Event, Query, Session, SessionConfig};

const READ_BUFFER_BYTES: usize = 8192;

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the TLS upgrade holds the socket.
    Upgrading,
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
            Stream::Upgrading => Err(io::Error::other("read during TLS upgrade")),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(bytes).await,
            Stream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Stream::Upgrading => Err(io::Error::other("write during TLS upgrade")),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
            Stream::Upgrading => Ok(()),
        };
    }
}

async fn tls_accept(shared: &Shared, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
    let Some(store) = &shared.tls else {
        return Err(io::Error::other("TLS requested without a certificate"));
    };
    let acceptor = TlsAcceptor::from(store.current());
    match tokio::time::timeout(Duration::from_secs(TLS_HANDSHAKE_TIMEOUT_SECS), acceptor.accept(tcp)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
    }
}

/// Reads exactly one PROXY v2 header (never a byte more: on the
/// implicit-TLS port the next bytes belong to the TLS handshake).
pub async fn read_proxy_header(tcp: &mut TcpStream) -> io::Result<Proxied> {
    let read = async {
        let mut buf = vec![0u8; 16];
        tcp.read_exact(&mut buf).await?;
        let invalid = |e: ProxyError| io::Error::new(io::ErrorKind::InvalidData, e);
        if proxy::parse(&buf).map_err(invalid)?.is_none() {
            let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
            buf.resize(16 + len, 0);
            tcp.read_exact(&mut buf[16..]).await?;
        }
        match proxy::parse(&buf).map_err(invalid)? {
            Some((proxied, used)) if used == buf.len() => Ok(proxied),
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "incomplete PROXY header")),
        }
    };
    tokio::time::timeout(Duration::from_secs(TLS_HANDSHAKE_TIMEOUT_SECS), read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PROXY header in time"))?
}

pub fn session_config(shared: &Shared, kind: ListenerKind) -> SessionConfig {
    let submission = kind != ListenerKind::Mx;
    SessionConfig {
        hostname: shared.config.hostname.clone(),
        starttls: kind != ListenerKind::Submissions && shared.tls.is_some(),
        auth: submission,
        auth_required: submission,
        tls_required: submission,
        message_bytes_max: shared.config.message_bytes_max,
        postmaster: shared.config.postmaster.clone(),
    }
}

/// Serves one connection. `slot` (its per-IP and total connection slot)
/// is released as soon as the session is closed, before its last reply is
/// written: a client that reconnects right after `221` must find it free
/// (`smtp-source -s 20` against the limit of 20 per IP did not).
pub async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    listener: Listener,
    mut shutdown: watch::Receiver<bool>,
    slot: super::Slot,
    load: Arc<super::ListenerLoad>,
) {
    let mut slot = Some(slot);
    // The submission reserve: a session admitted past the unauthenticated
    // share must authenticate within RESERVE_AUTH_SECS (see `Listener`).
    let mut unauthenticated = (listener.kind != ListenerKind::Mx).then(|| load.admit_unauthenticated());
    let mut reserve_deadline = unauthenticated
        .as_ref()
        .filter(|u| u.in_reserve)
        .map(|_| tokio::time::Instant::now() + Duration::from_secs(RESERVE_AUTH_SECS));
    let implicit_tls = listener.kind == ListenerKind::Submissions;
    let mut stream = if implicit_tls {
        match tls_accept(&shared, tcp).await {
            Ok(s) => Stream::Tls(Box::new(s)),
            Err(e) => {
                tracing::info!(%peer, error = %e, "TLS handshake failed");
                return;
            }
        }
    } else {
        Stream::Plain(tcp)
    };
    let mut session = Session::new(session_config(&shared, listener.kind), peer.ip(), implicit_tls);
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut memory = MemoryCharge::new(shared.message_memory.clone());

    // Clients must wait for the greeting (RFC 5321 §3.1); spam engines often
    // do not. Whatever arrives during the delay makes `greet` refuse.
    if listener.greeting_delay_ms > 0 {
        let delay = Duration::from_millis(listener.greeting_delay_ms);
        match tokio::time::timeout(delay, stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                tracing::info!(%peer, "client talked before the greeting");
                session.handle_input(&buf[..n]);
            }
        }
    }
    session.greet();

    let mut stats = SessionStats { messages: 0, rejects: 0, end: "quit" };
    loop {
        match drive(&shared, &mut session, &mut stream, peer, &mut slot, &mut stats).await {
            // A finished message gives its memory back here.
            Ok(true) => {
                memory.charge(session.message_bytes_buffered());
            }
            Ok(false) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended");
                stats.end = "write error";
                break;
            }
        }
        if session.login().is_some() && unauthenticated.is_some() {
            unauthenticated = None;
            reserve_deadline = None;
        }
        let read = read_with_stress(&mut stream, &mut buf, session.read_timeout_secs(), &load);
        let reserve_expired = async {
            match reserve_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = reserve_expired => {
                tracing::info!(%peer, listener = listener.kind.name(), "no AUTH in time on a reserved slot; closing");
                stats.end = "reserve timeout";
                reserve_deadline = None;
                session.handle_timeout()
            }
            r = read => match r {
                Err(_) => {
                    stats.end = "timeout";
                    session.handle_timeout()
                }
                Ok(Ok(0)) => {
                    stats.end = "disconnect";
                    break;
                }
                Ok(Ok(n)) => {
                    session.handle_input(&buf[..n]);
                    if !memory.charge(session.message_bytes_buffered()) {
                        tracing::warn!(%peer, "message memory budget exhausted; refusing");
                        session.handle_overload();
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "read failed");
                    stats.end = "read error";
                    break;
                }
            },
            _ = shutdown.changed() => {
                stats.end = "shutdown";
                session.handle_shutdown()
            }
        }
    }
    drop(slot.take());
    log_session(&session, &stream, peer, &listener, &stats);
    stream.shutdown().await;
}

/// What one session did, for its closing log line.
struct SessionStats {
    messages: u32,
    rejects: u32,
    /// How it ended: quit (or closed by us after an error reply),
    /// disconnect, timeout, reserve timeout (no AUTH on a slot of the
    /// submission reserve), shutdown, read error, write error.
    end: &'static str,
}

/// One line per session at the default level, like Postfix's
/// `disconnect from …` with counts: client, listener, TLS version and
/// cipher, AUTH login, messages queued, refusals, how it ended.
fn log_session(session: &Session, stream: &Stream, peer: SocketAddr, listener: &Listener, stats: &SessionStats) {
    let m = &*crate::metrics::METRICS;
    crate::metrics::bump(&m.sessions[crate::metrics::listener_index(listener.kind.name())]);
    let tls_index = match stream {
        Stream::Tls(t) if t.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2) => 1,
        Stream::Tls(_) => 2,
        _ => 0,
    };
    crate::metrics::bump(&m.sessions_tls[tls_index]);
    let tls = match stream {
        Stream::Tls(t) => {
            let conn = t.get_ref().1;
            let version = conn.protocol_version().map_or("?".to_string(), |v| format!("{v:?}"));
            let cipher = conn.negotiated_cipher_suite().map_or("?".to_string(), |c| format!("{:?}", c.suite()));
            format!("{version}/{cipher}")
        }
        _ => "none".to_string(),
    };
    let login = session.login().map(log_safe).unwrap_or_else(|| "-".to_string());
    tracing::info!(
        "session: client=unknown[{}] listener={} tls={tls} login={login} messages={} rejects={} end={}",
        peer.ip(),
        listener.kind.name(),
        stats.messages,
        stats.rejects,
        stats.end
    );
}

/// One `reject:` line per error reply, in the spirit of Postfix's
/// `NOQUEUE: reject: RCPT from host[addr]: 554 5.7.1 …; from=<…> to=<…>
/// proto=ESMTP helo=<…>`, so fail2ban (`mta/contrib/fail2ban/`) and audits
/// can grep it. There is no reverse DNS: the host is `unknown`.
fn log_rejections(session: &mut Session, peer: SocketAddr, stats: &mut SessionStats) {
    while let Some(r) = session.poll_rejection() {
        stats.rejects += 1;
        let m = &*crate::metrics::METRICS;
        crate::metrics::bump(&m.rejects[crate::metrics::reject_index(r.command)]);
        if r.command == "AUTH" && r.reply.starts_with("535") {
            crate::metrics::bump(&m.auth_failures);
        }
        let from = session.mail_from().map(|f| format!(" from=<{}>", log_safe(&f))).unwrap_or_default();
        let to = r.to.as_deref().map(|t| format!(" to=<{}>", log_safe(t))).unwrap_or_default();
        let proto = if session.is_esmtp() { "ESMTP" } else { "SMTP" };
        let helo = session.helo().map(|h| format!(" helo=<{}>", log_safe(h))).unwrap_or_default();
        tracing::info!("reject: {} from unknown[{}]: {};{from}{to} proto={proto}{helo}", r.command, peer.ip(), r.reply);
    }
}

/// Client-chosen text in a log line: no spaces, brackets or control
/// characters, so it cannot forge a second `from unknown[ADDR]` for
/// fail2ban to ban someone else; at most 200 characters.
fn log_safe(text: &str) -> String {
    text.chars()
        .take(200)
        .map(|c| if c.is_ascii_graphic() && !matches!(c, '[' | ']' | '<' | '>') { c } else { '?' })
        .collect()
}

/// One read with the session's timeout, cut to `STRESS_TIMEOUT_SECS` while
/// the listener is under stress, also for reads that began before the
/// stress did (the wait is re-checked every `STRESS_TIMEOUT_SECS`).
/// `Err` means the timeout passed.
async fn read_with_stress(
    stream: &mut Stream,
    buf: &mut [u8],
    timeout_secs: u64,
    load: &super::ListenerLoad,
) -> Result<io::Result<usize>, tokio::time::error::Elapsed> {
    let started = tokio::time::Instant::now();
    let normal = Duration::from_secs(timeout_secs);
    let step = Duration::from_secs(STRESS_TIMEOUT_SECS);
    loop {
        let limit = if load.stressed() { normal.min(step) } else { normal };
        let left = limit.saturating_sub(started.elapsed());
        // A zero timeout elapses at once: the same error as a real timeout.
        match tokio::time::timeout(left.min(step), stream.read(buf)).await {
            Ok(r) => return Ok(r),
            Err(elapsed) if left <= step => return Err(elapsed),
            Err(_) => continue,
        }
    }
}

/// This connection's share of the server-wide message memory budget, in
/// `MESSAGE_MEMORY_UNIT_BYTES` units; it follows the message being
/// received and drops to zero between messages.
struct MemoryCharge {
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
}

impl MemoryCharge {
    fn new(budget: Arc<Semaphore>) -> MemoryCharge {
        MemoryCharge { budget, held: None }
    }

    /// Adjusts the charge to `bytes`; false if the budget cannot cover it.
    fn charge(&mut self, bytes: usize) -> bool {
        let units = (bytes as u64).div_ceil(MESSAGE_MEMORY_UNIT_BYTES) as u32;
        let held = self.held.as_ref().map_or(0, |p| p.num_permits() as u32);
        if units == 0 {
            self.held = None;
            return true;
        }
        if units <= held {
            return true;
        }
        match self.budget.clone().try_acquire_many_owned(units - held) {
            Ok(more) => {
                match &mut self.held {
                    Some(p) => p.merge(more),
                    None => self.held = Some(more),
                }
                true
            }
            Err(_) => false,
        }
    }
}

/// Sends replies and handles events until the session needs input.
/// Returns false once the session asked to close.
async fn drive(
    shared: &Shared,
    session: &mut Session,
    stream: &mut Stream,
    peer: SocketAddr,
    slot: &mut Option<super::Slot>,
    stats: &mut SessionStats,
) -> io::Result<bool> {
    loop {
        log_rejections(session, peer, stats);
        if let Some(bytes) = session.poll_transmit() {
            if session.is_closed() {
                drop(slot.take());
            }
            stream.write_all(&bytes).await?;
        }
        let Some(event) = session.poll_event() else { return Ok(true) };
        match event {
            Event::Close => {
                log_rejections(session, peer, stats);
                drop(slot.take());
                if let Some(bytes) = session.poll_transmit() {
                    stream.write_all(&bytes).await?;
                }
                return Ok(false);
            }
            Event::StartTls => {
                let Stream::Plain(tcp) = std::mem::replace(stream, Stream::Upgrading) else {
                    return Err(io::Error::other("STARTTLS on a TLS stream"));
                };
                match tls_accept(shared, tcp).await {
                    Ok(tls) => *stream = Stream::Tls(Box::new(tls)),
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "STARTTLS handshake failed");
                        return Ok(false);
                    }
                }
                session.handle_tls_established();
            }
            Event::Query(q) => {
                let answer = answer(shared, peer, q).await;
                if matches!(answer, Answer::Enqueued(EnqueueOutcome::Queued { .. })) {
                    stats.messages += 1;
                    crate::metrics::bump(&crate::metrics::METRICS.messages_accepted);
                }
                session.handle_answer(answer);
            }
        }
    }
}

async fn answer(shared: &Shared, peer: SocketAddr, query: Query) -> Answer {
    match query {
        Query::Credentials { login, password } => {
            let delay = lock(&shared.limiter).delay(peer.ip(), &login, Instant::now());
            if !delay.is_zero() {
                // Rate limiting: this attempt waits; others are served meanwhile.
                tokio::time::sleep(delay).await;
            }
            match shared.directory.verify_login(&login, password.expose()).await {
                Ok(Some(canonical)) => {
                    lock(&shared.limiter).record_success(&canonical);
                    tracing::info!(%peer, login = ?canonical, "AUTH succeeded");
                    Answer::Credentials(AuthOutcome::Success { login: canonical })
                }
                Ok(None) => {
                    lock(&shared.limiter).record_failure(peer.ip(), &login, Instant::now());
                    tracing::warn!(%peer, login = ?login, "AUTH failed");
                    Answer::Credentials(AuthOutcome::Invalid)
                }
                Err(e) => {
                    tracing::error!(%peer, error = %e, "AUTH: directory unavailable");
                    Answer::Credentials(AuthOutcome::TempFail)
                }
            }
        }
        Query::Sender { login, address } => match shared.directory.sender_facts(login.as_deref(), &address).await {
            Ok(f) => Answer::Sender(Some(f)),
            Err(e) => {
                tracing::error!(%peer, error = %e, "sender lookup failed");
                Answer::Sender(None)
            }
        },
        Query::Recipient { address, size } => {
            match shared.directory.recipient_facts_with_postmaster(&address, shared.config.postmaster_to.as_ref()).await
            {
                Ok(mut f) => {
                    // The declared size must fit, or at least one more byte:
                    // refused once at or over quota.
                    let incoming = size.unwrap_or(1).max(1);
                    let full = super::delivery_task::mailboxes_over_quota(shared, &f.mailboxes, incoming).await;
                    if !full.is_empty() {
                        tracing::info!(%peer, to = %address, "recipient over quota");
                    }
                    f.over_quota = full.into_iter().map(|(m, _)| m).collect();
                    Answer::Recipient(Some(f))
                }
                Err(e) => {
                    tracing::error!(%peer, error = %e, "recipient lookup failed");
                    Answer::Recipient(None)
                }
            }
        }
        Query::Enqueue { envelope, message } => Answer::Enqueued(enqueue(shared, envelope, message).await),
    }
}

async fn enqueue(shared: &Shared, envelope: Envelope, message: Vec<u8>) -> EnqueueOutcome {
    match filter::run(&shared.filters, &envelope, &message) {
        Verdict::Accept => {}
        Verdict::Reject(r) | Verdict::Defer(r) => {
            tracing::info!(peer = %envelope.peer, code = r.code, "message refused by a filter");
            return EnqueueOutcome::Refused(r);
        }
    }
    if let (Some(login), true) = (&envelope.login, shared.config.enforce_from_header) {
        if let Some(refusal) = check_from_header(shared, login, &message).await {
            tracing::info!(peer = %envelope.peer, login = ?login, code = refusal_code(&refusal), "From: header refused");
            return refusal;
        }
    }
    let id = Queue::new_id();
    let now = now_unix();
    let header = received::header(&envelope, &shared.config.hostname, &id, now);
    let stored = StoredEnvelope {
        id: id.clone(),
        received_unix: now,
        from: match &envelope.from {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(a) => a.to_string(),
        },
        login: envelope.login.clone(),
        local: envelope.local.clone(),
        remote: envelope.remote.iter().map(|a| a.to_string()).collect(),
        attempts: 0,
        next_attempt_unix: 0,
        last_error: None,
    };
    let queue = shared.queue.clone();
    let result =
        tokio::task::spawn_blocking(move || queue.enqueue(&stored, &[header.as_bytes(), &message]).map(|_durable| ()))
            .await;
    match result {
        Ok(Ok(())) => {
            tracing::info!(%id, peer = %envelope.peer, from = %envelope.from_display(), local = envelope.local.len(), remote = envelope.remote.len(), "queued");
            shared.delivery_wakeup.notify_one();
            EnqueueOutcome::Queued { id }
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "queueing failed");
            EnqueueOutcome::TempFail
        }
        Err(e) => {
            tracing::error!(error = %e, "queueing task failed");
            EnqueueOutcome::TempFail
        }
    }
}

/// No spoofing in the header either: every `From:` address must be owned
/// by the login. `None` means the message may go on.
async fn check_from_header(shared: &Shared, login: &str, message: &[u8]) -> Option<EnqueueOutcome> {
    let Some(addresses) = header_from::from_addresses(message) else {
        return Some(EnqueueOutcome::Refused(Reply::new(
            550,
            (5, 6, 0),
            "Message needs exactly one well-formed From: header field",
        )));
    };
    for a in &addresses {
        match shared.directory.sender_facts(Some(login), a).await {
            Ok(f) if f.owned_by_login => {}
            Ok(_) => {
                return Some(EnqueueOutcome::Refused(Reply::new(
                    553,
                    (5, 7, 1),
                    "From: header address not owned by the authenticated user",
                )))
            }
            Err(e) => {
                tracing::error!(error = %e, "From: check: directory unavailable");
                return Some(EnqueueOutcome::TempFail);
            }
        }
    }
    None
}

fn refusal_code(o: &EnqueueOutcome) -> u16 {
    match o {
        EnqueueOutcome::Refused(r) => r.code,
        _ => 451,
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_charge_follows_the_message_and_respects_the_budget() {
        let unit = MESSAGE_MEMORY_UNIT_BYTES as usize;
        let budget = Arc::new(Semaphore::new(3));
        let mut a = MemoryCharge::new(budget.clone());
        let mut b = MemoryCharge::new(budget.clone());
        assert!(a.charge(1));
        assert!(a.charge(unit + 1));
        assert_eq!(budget.available_permits(), 1);
        assert!(!b.charge(2 * unit), "over budget");
        assert!(b.charge(unit));
        assert_eq!(budget.available_permits(), 0);
        assert!(a.charge(0));
        assert_eq!(budget.available_permits(), 2);
        assert!(b.charge(3 * unit));
        assert_eq!(budget.available_permits(), 0);
    }
}
