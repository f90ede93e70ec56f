//! The transmission phase for the FUSE path: `Client` sends READ, WRITE,
//! FLUSH, TRIM and WRITE_ZEROES and calls each request's completion from a
//! reader thread, so the FUSE loop never waits on the network.
//!
//! Every request carries a deadline (`timeout` after submission). A
//! watchdog thread fails overdue requests with `IoError::Timeout` and
//! shuts the connection down: a server that misses one deadline is treated
//! as gone, which is what lets a filesystem above see EIO instead of
//! hanging (nbdfuse's failure mode). When the connection is lost, every
//! request on it fails at once; the next request dials again (at most one
//! attempt per `RECONNECT_INTERVAL_MIN`), so a restarted server is picked
//! up without remounting.
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
    generation: u64,
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
    /// Serialises dialling so one reconnect serves every waiting request.
    dial: Mutex<()>,
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
            dial: Mutex::new(()),
        });
        let client = Client { shared };
        client.install(stream)?;
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

    fn install(&self, stream: Stream) -> Result<()> {
        let ep = self.shared.endpoint.to_string();
        let reader = stream.try_clone().map_err(|source| Error::Connect { endpoint: ep.clone(), source })?;
        let killer = stream.try_clone().map_err(|source| Error::Connect { endpoint: ep.clone(), source })?;
        let generation = {
            let mut st = lock(&self.shared.state);
            if st.closed {
                stream.shutdown();
                return Ok(());
            }
            st.generation += 1;
            let generation = st.generation;
            st.conn = Some(Conn { generation, writer: Arc::new(Mutex::new(stream)), killer });
            generation
        };
        let s = self.shared.clone();
        thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader_loop(&s, reader, generation))
            .map_err(|e| Error::io("spawn the reader thread for", "nbd client", e))?;
        Ok(())
    }

    /// Dials again if the connection is gone (rate-limited); false if still down.
    fn ensure_connected(&self) -> bool {
        {
            let st = lock(&self.shared.state);
            if st.conn.is_some() {
                return true;
            }
            if st.closed {
                return false;
            }
        }
        let _dialing = self.shared.dial.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut st = lock(&self.shared.state);
            if st.conn.is_some() {
                return true;
            }
            if st.last_dial.is_some_and(|t| t.elapsed() < RECONNECT_INTERVAL_MIN) {
                return false;
            }
            st.last_dial = Some(Instant::now());
        }
        match connect(&self.shared.endpoint, &self.shared.export, self.shared.timeout) {
            Ok((stream, info)) if info.size_bytes == self.shared.info.size_bytes => {
                tracing::info!(endpoint = %self.shared.endpoint, "reconnected to the NBD server");
                lock(&self.shared.state).reconnects += 1;
                self.install(stream).is_ok()
            }
            Ok((stream, info)) => {
                tracing::error!(
                    endpoint = %self.shared.endpoint,
                    was = self.shared.info.size_bytes,
                    now = info.size_bytes,
                    "export size changed across reconnect; refusing it"
                );
                stream.shutdown();
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconnect failed");
                false
            }
        }
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
        if !after_close && !self.ensure_connected() {
            let closed = lock(&self.shared.state).closed;
            return done(Err(if closed { IoError::Closed } else { IoError::Disconnected }));
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
        let Some(conn) = &st.conn else {
            drop(st);
            return done(Err(IoError::Disconnected));
        };
        let generation = conn.generation;
        let writer = conn.writer.clone();
        st.next_cookie = st.next_cookie.wrapping_add(1);
        let cookie = st.next_cookie;
        st.pending.insert(cookie, Pending { generation, deadline, kind, length, done });
        self.shared.changed.notify_all();
        // The state lock is released before the writer lock is taken: a
        // write blocked on a stalled server must never keep the watchdog
        // from shutting the socket down. Order on the wire does not matter
        // (replies are matched by cookie), and a request registered before
        // `close` is either drained (clean) or its write fails on the shut
        // socket (forced).
        drop(st);
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        let header = encode_request(flags, kind, cookie, offset, length);
        let res = match payload {
            Some(mut msg) => {
                msg[..REQUEST_HEADER_BYTES].copy_from_slice(&header);
                w.write_all(&msg)
            }
            None => w.write_all(&header),
        };
        drop(w);
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

    pub fn trim(&self, offset: u64, length: u32, done: Done) {
        if !self.shared.info.can_trim() {
            return done(Err(IoError::Unsupported));
        }
        self.submit(CMD_TRIM, 0, offset, length, None, done)
    }

    pub fn write_zeroes(&self, offset: u64, length: u32, done: Done) {
        if !self.shared.info.can_write_zeroes() {
            return done(Err(IoError::Unsupported));
        }
        self.submit(CMD_WRITE_ZEROES, 0, offset, length, None, done)
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
        {
            let mut st = lock(&self.shared.state);
            if st.closed {
                return Ok(());
            }
            st.closed = true;
            self.shared.changed.notify_all();
            if clean {
                let deadline = Instant::now() + DETACH_DRAIN_MAX;
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
            result = rx.recv().unwrap_or(Err(IoError::Disconnected)).map(drop);
        }
        let conn = lock(&self.shared.state).conn.take();
        if let Some(conn) = conn {
            if clean {
                let mut w = conn.writer.lock().unwrap_or_else(|p| p.into_inner());
                let _ = w.write_all(&encode_request(0, CMD_DISC, 0, 0, 0));
            }
            conn.killer.shutdown();
            fail_generation(&self.shared, conn.generation, IoError::Closed);
        }
        result
    }
}

/// Drops connection `generation` (if still current) and fails its requests.
fn conn_lost(shared: &Shared, generation: u64) {
    {
        let mut st = lock(&shared.state);
        if st.conn.as_ref().is_some_and(|c| c.generation == generation) {
            if let Some(c) = st.conn.take() {
                c.killer.shutdown();
            }
        }
    }
    fail_generation(shared, generation, IoError::Disconnected);
}

fn fail_generation(shared: &Shared, generation: u64, why: IoError) {
    let failed: Vec<Pending> = {
        let mut st = lock(&shared.state);
        let cookies: Vec<u64> = st.pending.iter().filter(|(_, p)| p.generation == generation).map(|(c, _)| *c).collect();
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

fn reader_loop(shared: &Shared, mut s: Stream, generation: u64) {
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
                (p.done)(Err(IoError::Disconnected));
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
fn watchdog(shared: &Shared) {
    loop {
        let expired: Vec<Pending> = {
            let mut st = lock(&shared.state);
            if st.closed && st.pending.is_empty() {
                return;
            }
            let now = Instant::now();
            let next = st.pending.values().map(|p| p.deadline).min();
            match next {
                Some(d) if d <= now => {
                    let cookies: Vec<u64> = st.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(c, _)| *c).collect();
                    let v: Vec<Pending> = cookies.iter().filter_map(|c| st.pending.remove(c)).collect();
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
        tracing::error!(requests = expired.len(), timeout_s = shared.timeout.as_secs_f64(), "NBD requests timed out; dropping the connection");
        let generations: Vec<u64> = expired.iter().map(|p| p.generation).collect();
        for p in expired {
            (p.done)(Err(IoError::Timeout));
        }
        for g in generations {
            conn_lost(shared, g);
        }
    }
}
