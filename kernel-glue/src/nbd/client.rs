//! The transmission phase for the FUSE path: `Client` sends READ, WRITE,
//! FLUSH, TRIM and WRITE_ZEROES and calls each request's completion from a
//! reader thread, so the FUSE loop never waits on the network.
//!
//! Every request carries a deadline (`timeout` after submission). A
//! watchdog thread fails overdue requests with `IoError::Timeout` and
//! shuts the connection down: a server that misses one deadline is treated
//! as gone, which is what lets a filesystem above see EIO instead of
//! hanging (nbdfuse's failure mode). When the connection is lost, the
//! requests sent on it and new ones wait in the table while a background
//! dialer reconnects (at most one attempt per `RECONNECT_INTERVAL_MIN`);
//! the new connection gets the unanswered ones again. A server restarted
//! within the timeout is thus picked up without errors or remounting (NBD
//! requests are idempotent, and unanswered ones were never acknowledged).
//! Once a deadline has passed, the link is `down` and requests fail at once
//! until a reconnect succeeds: no request waits longer than one timeout.
//!
//! **Invariant:** a completion is called exactly once: the request is
//! removed from `State::pending` under the lock by whoever completes it.
//! **Invariant:** after `close` returns, nothing more is written to the
//! socket (the gate is shut under the same lock that registers requests).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::handshake::{connect, ExportInfo};
use super::stream::{Endpoint, Stream};
use super::wire::*;
use crate::error::{Error, Result};
use crate::limits::{DETACH_DRAIN_MAX, INFLIGHT_REQUESTS_MAX, RECONNECT_INTERVAL_MIN, REQUEST_BYTES_MAX};

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("no reply within the I/O timeout")]
    Timeout,
    #[error("connection to the NBD server lost")]
    Disconnected,
    #[error("the device is detached")]
    Closed,
    #[error("request outside the export or too large")]
    Invalid,
    #[error("the export does not support this request")]
    Unsupported,
    #[error("the server replied with error {0}")]
    Server(u32),
}

impl IoError {
    /// The errno to hand the kernel: the server's own code where it is one
    /// the spec defines, EIO for everything that means "the volume is gone".
    pub fn errno(self) -> i32 {
        match self {
            IoError::Server(e @ (1 | 5 | 12 | 22 | 28 | 75 | 95)) => e as i32,
            IoError::Server(108) => libc::EIO,
            IoError::Invalid => libc::EINVAL,
            IoError::Unsupported => libc::EOPNOTSUPP,
            _ => libc::EIO,
        }
    }
}

/// A request's completion: READ gets its data, everything else an empty vector.
pub type Done = Box<dyn FnOnce(std::result::Result<Vec<u8>, IoError>) + Send>;

struct Pending {
    /// The connection it was sent on; `None` while it waits for a reconnect.
    generation: Option<u64>,
    /// The complete message (header, and payload for WRITE), kept until
    /// the reply so it can be sent again on a new connection.
    msg: Arc<Vec<u8>>,
    deadline: Instant,
    kind: u16,
    length: u32,
    done: Done,
}

struct Conn {
    generation: u64,
    writer: Arc<Mutex<Stream>>,
    /// A clone used only to shut the socket down from another thread.
    killer: Stream,
}

#[derive(Default)]
struct State {
    /// Set by `close`: no request is registered after it.
    closed: bool,
    conn: Option<Conn>,
    generation: u64,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    last_dial: Option<Instant>,
    /// A reconnect is under way (`kick_dialer`).
    dialing: bool,
    /// The server missed a deadline: requests fail at once until a
    /// reconnect succeeds, instead of each waiting a full timeout.
    down: bool,
    reconnects: u64,
}

struct Shared {
    endpoint: Endpoint,
    export: String,
    info: ExportInfo,
    timeout: Duration,
    state: Mutex<State>,
    /// Signalled when a request is registered or completed, or on close.
    changed: Condvar,
}

/// A connection to one export (cheap to clone; all clones share it).
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock is a bug elsewhere; the state itself
    // stays consistent (every mutation is a single insert or remove).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// Connects and negotiates; `timeout` bounds the handshake and every request.
    pub fn connect(endpoint: Endpoint, export: &str, timeout: Duration) -> Result<Client> {
        let (stream, info) = connect(&endpoint, export, timeout)?;
        let shared = Arc::new(Shared {
            endpoint,
            export: export.to_string(),
            info,
            timeout,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        install(&shared, stream)?;
        let client = Client { shared };
        let s = client.shared.clone();
        thread::Builder::new()
            .name("nbd-watchdog".into())
            .spawn(move || watchdog(&s))
            .map_err(|e| Error::io("spawn the watchdog thread for", "nbd client", e))?;
        Ok(client)
    }

    pub fn info(&self) -> ExportInfo {
        self.shared.info
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }

    /// Times the connection was re-established after a loss.
    pub fn reconnects(&self) -> u64 {
        lock(&self.shared.state).reconnects
    }

    /// Requests currently waiting for a reply.
    pub fn inflight(&self) -> usize {
        lock(&self.shared.state).pending.len()
    }

    /// Registers and sends one request. `payload` is a complete message
    /// (header space included) for WRITE, or `None`.
    fn submit(&self, kind: u16, flags: u16, offset: u64, length: u32, payload: Option<Vec<u8>>, done: Done) {
        self.submit_inner(kind, flags, offset, length, payload, done, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_inner(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Vec<u8>>,
        done: Done,
        after_close: bool,
    ) {
        let deadline = Instant::now() + self.shared.timeout;
        let in_range = offset.checked_add(u64::from(length)).is_some_and(|end| end <= self.shared.info.size_bytes);
        if !in_range || ((kind == CMD_READ || kind == CMD_WRITE) && length > REQUEST_BYTES_MAX) {
            return done(Err(IoError::Invalid));
        }
        let mut st = lock(&self.shared.state);
        while st.pending.len() >= INFLIGHT_REQUESTS_MAX && !st.closed {
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                return done(Err(IoError::Timeout));
            }
            st = self.shared.changed.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        if st.closed && !after_close {
            drop(st);
            return done(Err(IoError::Closed));
        }
        // Without a connection a request waits in the table for the next
        // one (until its deadline), unless the server is known to be
        // unresponsive (`down`): then it fails at once.
        let target = st.conn.as_ref().map(|c| (c.generation, c.writer.clone()));
        if target.is_none() && (st.down || after_close) {
            kick_dialer(&self.shared, &mut st);
            drop(st);
            return done(Err(IoError::Disconnected));
        }
        st.next_cookie = st.next_cookie.wrapping_add(1);
        let cookie = st.next_cookie;
        let header = encode_request(flags, kind, cookie, offset, length);
        let msg = Arc::new(match payload {
            Some(mut msg) => {
                msg[..REQUEST_HEADER_BYTES].copy_from_slice(&header);
                msg
            }
            None => header.to_vec(),
        });
        st.pending.insert(
            cookie,
            Pending { generation: target.as_ref().map(|t| t.0), msg: msg.clone(), deadline, kind, length, done },
        );
        if target.is_none() {
            kick_dialer(&self.shared, &mut st);
        }
        self.shared.changed.notify_all();
        // The state lock is released before the writer lock is taken: a
        // write blocked on a stalled server must never keep the watchdog
        // from shutting the socket down. Order on the wire does not matter
        // (replies are matched by cookie), and a request registered before
        // `close` is either drained (clean) or its write fails on the shut
        // socket (forced).
        drop(st);
        let Some((generation, writer)) = target else { return };
        let res = writer.lock().unwrap_or_else(|p| p.into_inner()).write_all(&msg);
        if let Err(e) = res {
            tracing::warn!(error = %e, "sending an NBD request failed; dropping the connection");
            conn_lost(&self.shared, generation);
        }
    }

    /// Reads `length` bytes at `offset`.
    pub fn read(&self, offset: u64, length: u32, done: Done) {
        self.submit(CMD_READ, 0, offset, length, None, done)
    }

    /// Writes `data` at `offset`; `fua` makes it durable before the reply.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool, done: Done) {
        let Ok(length) = u32::try_from(data.len()) else {
            return done(Err(IoError::Invalid));
        };
        if self.shared.info.read_only() {
            return done(Err(IoError::Server(libc::EPERM as u32)));
        }
        let mut msg = Vec::with_capacity(REQUEST_HEADER_BYTES + data.len());
        msg.resize(REQUEST_HEADER_BYTES, 0);
        msg.extend_from_slice(data);
        let flags = if fua && self.shared.info.can_fua() { CMD_FLAG_FUA } else { 0 };
        self.submit(CMD_WRITE, flags, offset, length, Some(msg), done)
    }

    /// Makes every completed write durable. A server without FLUSH writes
    /// through, so the request succeeds at once.
    pub fn flush(&self, done: Done) {
        if !self.shared.info.can_flush() {
            return done(Ok(Vec::new()));
        }
        self.submit(CMD_FLUSH, 0, 0, 0, None, done)
    }

    /// Discards a range; its contents are undefined afterwards (so the FUSE
    /// path, which must read zeros after a hole punch, uses `write_zeroes`).
    pub fn trim(&self, offset: u64, length: u32, done: Done) {
        if !self.shared.info.can_trim() {
            return done(Err(IoError::Unsupported));
        }
        self.submit(CMD_TRIM, 0, offset, length, None, done)
    }

    /// Zeroes a range; without `no_hole` the server may deallocate it.
    pub fn write_zeroes(&self, offset: u64, length: u32, no_hole: bool, done: Done) {
        if !self.shared.info.can_write_zeroes() {
            return done(Err(IoError::Unsupported));
        }
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.submit(CMD_WRITE_ZEROES, flags, offset, length, None, done)
    }

    /// Blocking READ (for tests and callers without their own threads).
    pub fn read_sync(&self, offset: u64, length: u32) -> std::result::Result<Vec<u8>, IoError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.read(offset, length, Box::new(move |r| drop(tx.send(r))));
        rx.recv().unwrap_or(Err(IoError::Disconnected))
    }

    pub fn write_sync(&self, offset: u64, data: &[u8], fua: bool) -> std::result::Result<(), IoError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.write(offset, data, fua, Box::new(move |r| drop(tx.send(r))));
        rx.recv().unwrap_or(Err(IoError::Disconnected)).map(drop)
    }

    pub fn flush_sync(&self) -> std::result::Result<(), IoError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.flush(Box::new(move |r| drop(tx.send(r))));
        rx.recv().unwrap_or(Err(IoError::Disconnected)).map(drop)
    }

    /// Shuts the gate: every later request fails with `IoError::Closed`.
    ///
    /// `clean`: wait (bounded) for in-flight requests, FLUSH, then
    /// NBD_CMD_DISC. Otherwise (forced): fail in-flight requests at once and
    /// drop the connection. Either way, after this returns no byte is sent.
    pub fn close(&self, clean: bool) -> std::result::Result<(), IoError> {
        let mut result = Ok(());
        // The drain and the final flush share one bound: a server that
        // holds I/O (a suspended primary) must not keep a detach waiting
        // for the per-request timeout on top.
        let deadline = Instant::now() + DETACH_DRAIN_MAX;
        {
            let mut st = lock(&self.shared.state);
            if st.closed {
                return Ok(());
            }
            st.closed = true;
            self.shared.changed.notify_all();
            if clean {
                while !st.pending.is_empty() {
                    let now = Instant::now();
                    if now >= deadline {
                        result = Err(IoError::Timeout);
                        break;
                    }
                    st = self.shared.changed.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
        }
        if clean && result.is_ok() && self.shared.info.can_flush() {
            let (tx, rx) = std::sync::mpsc::channel();
            self.submit_inner(CMD_FLUSH, 0, 0, 0, None, Box::new(move |r| drop(tx.send(r))), true);
            result = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(r) => r.map(drop),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(IoError::Timeout),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(IoError::Disconnected),
            };
        }
        let conn = lock(&self.shared.state).conn.take();
        if let Some(conn) = conn {
            if clean {
                let mut w = conn.writer.lock().unwrap_or_else(|p| p.into_inner());
                let _ = w.write_all(&encode_request(0, CMD_DISC, 0, 0, 0));
            }
            conn.killer.shutdown();
        }
        // Nothing may stay pending after close: not even requests waiting
        // for a reconnect.
        fail_generation(&self.shared, None, IoError::Closed);
        result
    }
}

/// Makes `stream` the current connection and starts its reader thread.
fn install(shared: &Arc<Shared>, stream: Stream) -> Result<()> {
    let ep = shared.endpoint.to_string();
    let reader = stream.try_clone().map_err(|source| Error::Connect { endpoint: ep.clone(), source })?;
    let killer = stream.try_clone().map_err(|source| Error::Connect { endpoint: ep.clone(), source })?;
    let generation = {
        let mut st = lock(&shared.state);
        if st.closed {
            stream.shutdown();
            return Ok(());
        }
        st.generation += 1;
        st.down = false;
        let generation = st.generation;
        // Requests whose connection died unanswered go out again, in
        // cookie order, before anything new (their writer lock is taken
        // before the state lock is released).
        let mut resend: Vec<(u64, Arc<Vec<u8>>)> = st
            .pending
            .iter_mut()
            .filter(|(_, p)| p.generation.is_none())
            .map(|(c, p)| {
                p.generation = Some(generation);
                (*c, p.msg.clone())
            })
            .collect();
        resend.sort_by_key(|(c, _)| *c);
        let writer = Arc::new(Mutex::new(stream));
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        st.conn = Some(Conn { generation, writer: writer.clone(), killer });
        shared.changed.notify_all();
        drop(st);
        if !resend.is_empty() {
            tracing::info!(requests = resend.len(), "resending unanswered NBD requests on the new connection");
        }
        let mut failed = false;
        for (_, msg) in &resend {
            if w.write_all(msg).is_err() {
                failed = true;
                break;
            }
        }
        drop(w);
        if failed {
            conn_lost(shared, generation);
        }
        generation
    };
    let s = shared.clone();
    thread::Builder::new()
        .name("nbd-reader".into())
        .spawn(move || reader_loop(&s, reader, generation))
        .map_err(|e| Error::io("spawn the reader thread for", "nbd client", e))?;
    Ok(())
}

/// Starts one background reconnect, at most once per `RECONNECT_INTERVAL_MIN`.
fn kick_dialer(shared: &Arc<Shared>, st: &mut State) {
    if st.dialing || st.closed || st.last_dial.is_some_and(|t| t.elapsed() < RECONNECT_INTERVAL_MIN) {
        return;
    }
    st.dialing = true;
    st.last_dial = Some(Instant::now());
    let s = shared.clone();
    let spawned = thread::Builder::new().name("nbd-dial".into()).spawn(move || {
        match connect(&s.endpoint, &s.export, s.timeout) {
            Ok((stream, info)) if info.size_bytes == s.info.size_bytes => {
                tracing::info!(endpoint = %s.endpoint, "reconnected to the NBD server");
                lock(&s.state).reconnects += 1;
                if let Err(e) = install(&s, stream) {
                    tracing::warn!(error = %e, "installing the new connection failed");
                }
            }
            Ok((stream, info)) => {
                tracing::error!(
                    endpoint = %s.endpoint,
                    was = s.info.size_bytes,
                    now = info.size_bytes,
                    "export size changed across reconnect; refusing it"
                );
                stream.shutdown();
            }
            Err(e) => tracing::warn!(error = %e, "reconnect failed"),
        }
        lock(&s.state).dialing = false;
        s.changed.notify_all();
    });
    if spawned.is_err() {
        st.dialing = false;
    }
}

/// Drops connection `generation` (if still current) and fails its requests.
///
/// Requests sent on it stay pending (until their deadline) and go out again
/// on the next connection; only when the link is `down` or closed do they
/// fail at once.
fn conn_lost(shared: &Arc<Shared>, generation: u64) {
    let fail = {
        let mut st = lock(&shared.state);
        if st.conn.as_ref().is_some_and(|c| c.generation == generation) {
            if let Some(c) = st.conn.take() {
                c.killer.shutdown();
            }
        }
        let fail = if st.closed {
            Some(IoError::Closed)
        } else if st.down {
            Some(IoError::Disconnected)
        } else {
            None
        };
        if fail.is_none() {
            for p in st.pending.values_mut().filter(|p| p.generation == Some(generation)) {
                p.generation = None;
            }
            kick_dialer(shared, &mut st);
        }
        shared.changed.notify_all();
        fail
    };
    if let Some(why) = fail {
        fail_generation(shared, Some(generation), why);
    }
}

/// Fails the requests sent on `generation` (all requests if `None`).
fn fail_generation(shared: &Shared, generation: Option<u64>, why: IoError) {
    let failed: Vec<Pending> = {
        let mut st = lock(&shared.state);
        let cookies: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| generation.is_none() || p.generation == generation)
            .map(|(c, _)| *c)
            .collect();
        let v = cookies.iter().filter_map(|c| st.pending.remove(c)).collect();
        shared.changed.notify_all();
        v
    };
    if !failed.is_empty() {
        tracing::warn!(requests = failed.len(), error = %why, "failing in-flight NBD requests");
    }
    for p in failed {
        (p.done)(Err(why));
    }
}

fn reader_loop(shared: &Arc<Shared>, mut s: Stream, generation: u64) {
    let mut header = [0u8; SIMPLE_REPLY_BYTES];
    loop {
        if let Err(e) = s.read_exact(&mut header) {
            tracing::debug!(error = %e, generation, "NBD connection closed");
            break;
        }
        let Some(reply) = decode_simple_reply(&header) else {
            tracing::error!("bad reply magic from the NBD server; dropping the connection");
            break;
        };
        let pending = {
            let mut st = lock(&shared.state);
            let p = st.pending.remove(&reply.cookie);
            shared.changed.notify_all();
            p
        };
        let Some(p) = pending else {
            // Timed out (and already failed) or never sent: either way this
            // connection is no longer trustworthy.
            tracing::warn!(cookie = reply.cookie, "reply for an unknown request; dropping the connection");
            break;
        };
        if reply.error != 0 {
            (p.done)(Err(IoError::Server(reply.error)));
            continue;
        }
        if p.kind == CMD_READ {
            let mut data = vec![0u8; p.length as usize];
            if let Err(e) = s.read_exact(&mut data) {
                tracing::warn!(error = %e, "NBD connection lost in READ data");
                // Back in the table: `conn_lost` below resends or fails it.
                lock(&shared.state).pending.insert(reply.cookie, p);
                break;
            }
            (p.done)(Ok(data));
        } else {
            (p.done)(Ok(Vec::new()));
        }
    }
    conn_lost(shared, generation);
}

/// Fails overdue requests and drops the connection they were sent on.
fn watchdog(shared: &Arc<Shared>) {
    loop {
        let expired: Vec<Pending> = {
            let mut st = lock(&shared.state);
            if st.closed && st.pending.is_empty() {
                return;
            }
            let now = Instant::now();
            // Requests waiting for a reconnect keep the dialer going even
            // when no new request arrives to kick it.
            let waiting = st.conn.is_none() && st.pending.values().any(|p| p.generation.is_none());
            if waiting {
                kick_dialer(shared, &mut st);
            }
            let next = st.pending.values().map(|p| p.deadline).min();
            let next = if waiting { next.map(|d| d.min(now + RECONNECT_INTERVAL_MIN)) } else { next };
            match next {
                Some(d) if d <= now && st.pending.values().any(|p| p.deadline <= now) => {
                    let cookies: Vec<u64> =
                        st.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(c, _)| *c).collect();
                    let v: Vec<Pending> = cookies.iter().filter_map(|c| st.pending.remove(c)).collect();
                    st.down = true;
                    shared.changed.notify_all();
                    v
                }
                Some(d) => {
                    let _ = shared.changed.wait_timeout(st, d - now);
                    continue;
                }
                None => {
                    // Woken by the next registration or by close.
                    let _ = shared.changed.wait_timeout(st, Duration::from_secs(1));
                    continue;
                }
            }
        };
        tracing::error!(
            requests = expired.len(),
            timeout_s = shared.timeout.as_secs_f64(),
            "NBD requests timed out; dropping the connection"
        );
        let generations: Vec<u64> = expired.iter().filter_map(|p| p.generation).collect();
        for p in expired {
            (p.done)(Err(IoError::Timeout));
        }
        for g in generations {
            conn_lost(shared, g);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The client against an in-process fake server on a Unix socket, whose
    //! misbehaviour each test picks: answer, stall, or drop the connection.

    use super::*;
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SIZE: u64 = 1 << 20;

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Answer,
        /// Read requests, never reply.
        Stall,
        /// On the first connection, drop it after reading one request
        /// without replying; answer normally afterwards.
        DropFirst,
    }

    struct Fake {
        path: PathBuf,
        commands: Arc<Mutex<Vec<u16>>>,
        connections: Arc<AtomicUsize>,
    }

    fn socket_path() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        std::env::temp_dir().join(format!("kg-client-{}-{}.sock", std::process::id(), N.fetch_add(1, Ordering::SeqCst)))
    }

    fn handshake(s: &mut UnixStream) -> std::io::Result<()> {
        let mut out = NBDMAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&out)?;
        let mut head = [0u8; 4 + 16];
        s.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[16], head[17], head[18], head[19]]) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&SIZE.to_be_bytes());
        let flags = TRANS_HAS_FLAGS | TRANS_SEND_FLUSH | TRANS_SEND_FUA | TRANS_SEND_TRIM;
        info.extend_from_slice(&flags.to_be_bytes());
        for (kind, data) in [(REP_INFO, info), (REP_ACK, vec![])] {
            let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&OPT_GO.to_be_bytes());
            r.extend_from_slice(&kind.to_be_bytes());
            r.extend_from_slice(&(data.len() as u32).to_be_bytes());
            r.extend_from_slice(&data);
            s.write_all(&r)?;
        }
        Ok(())
    }

    fn serve(mut s: UnixStream, mode: Mode, first: bool, disk: &Mutex<Vec<u8>>, commands: &Mutex<Vec<u16>>) {
        if handshake(&mut s).is_err() {
            return;
        }
        let mut h = [0u8; REQUEST_HEADER_BYTES];
        while s.read_exact(&mut h).is_ok() {
            let kind = u16::from_be_bytes([h[6], h[7]]);
            let cookie = &h[8..16];
            let offset = u64::from_be_bytes(h[16..24].try_into().unwrap()) as usize;
            let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
            commands.lock().unwrap().push(kind);
            let mut payload = vec![0u8; if kind == CMD_WRITE { len } else { 0 }];
            if s.read_exact(&mut payload).is_err() {
                return;
            }
            match mode {
                Mode::Stall => continue,
                Mode::DropFirst if first => return,
                _ => {}
            }
            let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            reply.extend_from_slice(&0u32.to_be_bytes());
            reply.extend_from_slice(cookie);
            let mut d = disk.lock().unwrap();
            match kind {
                CMD_WRITE => d[offset..offset + len].copy_from_slice(&payload),
                CMD_READ => reply.extend_from_slice(&d[offset..offset + len]),
                CMD_DISC => return,
                _ => {}
            }
            drop(d);
            if s.write_all(&reply).is_err() {
                return;
            }
        }
    }

    fn fake(mode: Mode) -> Fake {
        let path = socket_path();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (c, n) = (commands.clone(), connections.clone());
        thread::spawn(move || {
            let disk = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
            for s in listener.incoming() {
                let Ok(s) = s else { return };
                let first = n.fetch_add(1, Ordering::SeqCst) == 0;
                let (disk, c) = (disk.clone(), c.clone());
                thread::spawn(move || serve(s, mode, first, &disk, &c));
            }
        });
        Fake { path, commands, connections }
    }

    fn client(f: &Fake, timeout: Duration) -> Client {
        Client::connect(Endpoint::Unix(f.path.clone()), "v", timeout).unwrap()
    }

    #[test]
    fn write_read_flush_round_trip_and_range_checks() {
        let f = fake(Mode::Answer);
        let c = client(&f, Duration::from_secs(5));
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        c.write_sync(4096, &data, true).unwrap();
        assert_eq!(c.read_sync(4096, 8192).unwrap(), data);
        c.flush_sync().unwrap();
        assert_eq!(c.read_sync(SIZE - 512, 1024), Err(IoError::Invalid));
        assert_eq!(c.write_sync(SIZE, &[1], false), Err(IoError::Invalid));
        c.close(true).unwrap();
        assert_eq!(c.read_sync(0, 512), Err(IoError::Closed));
        // The fake records DISC when it reads it, after close has returned.
        let deadline = Instant::now() + Duration::from_secs(10);
        let seen = loop {
            let seen = f.commands.lock().unwrap().clone();
            if seen.last() == Some(&CMD_DISC) || Instant::now() >= deadline {
                break seen;
            }
            thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(&seen[seen.len() - 2..], &[CMD_FLUSH, CMD_DISC], "clean close flushes, then disconnects: {seen:?}");
        let _ = std::fs::remove_file(&f.path);
    }

    #[test]
    fn a_stalled_server_fails_requests_at_the_deadline_then_at_once() {
        let f = fake(Mode::Stall);
        let timeout = Duration::from_millis(600);
        let c = client(&f, timeout);
        let t0 = Instant::now();
        assert_eq!(c.write_sync(0, &[1; 4096], false), Err(IoError::Timeout));
        let waited = t0.elapsed();
        assert!(waited >= timeout && waited < timeout * 4, "failed after {waited:?}");
        // The link is down now: no second full timeout per request. (A
        // reconnect to the stalled server may be under way; either way the
        // request must not wait a whole timeout.)
        let t1 = Instant::now();
        let r = c.read_sync(0, 4096);
        assert!(r.is_err(), "{r:?}");
        assert!(t1.elapsed() < timeout, "second request waited {:?}", t1.elapsed());
        c.close(false).unwrap();
        let _ = std::fs::remove_file(&f.path);
    }

    #[test]
    fn a_dropped_connection_is_redialled_and_the_request_resent() {
        let f = fake(Mode::DropFirst);
        let c = client(&f, Duration::from_secs(10));
        c.write_sync(8192, &[0xab; 4096], false).unwrap();
        assert_eq!(c.reconnects(), 1);
        assert_eq!(f.connections.load(Ordering::SeqCst), 2);
        assert_eq!(c.read_sync(8192, 4096).unwrap(), vec![0xab; 4096]);
        c.close(false).unwrap();
        assert_eq!(c.inflight(), 0);
        let _ = std::fs::remove_file(&f.path);
    }

    #[test]
    fn forced_close_fails_in_flight_requests_at_once() {
        let f = fake(Mode::Stall);
        let c = client(&f, Duration::from_secs(30));
        let (tx, rx) = std::sync::mpsc::channel();
        c.write(0, &[7; 512], false, Box::new(move |r| drop(tx.send(r))));
        let t0 = Instant::now();
        c.close(false).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Err(IoError::Closed));
        assert!(t0.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_file(&f.path);
    }
}
