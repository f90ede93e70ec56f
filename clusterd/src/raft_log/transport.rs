//! Raft traffic: frames (`len: u32 BE | raft Message protobuf`) over TCP +
//! mutual TLS.
//!
//! Inbound (`listen`, `serve`): the TLS handshake verifies the client
//! certificate against the cluster CA, then `TlsSetup::identify` must find
//! the one configured peer it names; only then is a frame read. A message
//! whose `from` is not that peer, or whose `to` is not this node, a bad
//! length or an undecodable body drops the connection (logged, counted).
//!
//! Outbound (`spawn_sender`): one task per peer owns the connection to it,
//! redials with backoff, and drains a bounded queue the raft task fills
//! with `try_send`, so sending never blocks the raft task (a full queue
//! drops the newest message; raft retransmits). Snapshot messages are
//! reported back (sent or failed) so raft resumes replication to the peer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::limits::{
    CONNECT_TIMEOUT, FRAME_BYTES_MAX, FRAME_READ_TIMEOUT, HANDSHAKE_TIMEOUT, INBOUND_CONNECTIONS_MAX, PEER_BATCH_MAX,
    PEER_QUEUED_MAX, RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN, WRITE_TIMEOUT,
};
use super::tls::{server_name, TlsSetup};
use super::{raft_id, RaftPeer};

/// A message from an authenticated peer (its raft id).
pub(crate) type Inbound = (u64, Message);

/// What a sender tells the raft task.
#[derive(Debug)]
pub(crate) enum Report {
    Snapshot { to: u64, sent: bool },
    Unreachable(u64),
}

/// Counters of what the transport refused or dropped.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    handshakes_failed: AtomicU64,
    peers_unknown: AtomicU64,
    frames_bad: AtomicU64,
    messages_bad: AtomicU64,
    messages_wrong_from: AtomicU64,
    sends_dropped: AtomicU64,
}

/// A copy of the transport's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Inbound TLS handshakes that failed (no or untrusted certificate, …).
    pub handshakes_failed: u64,
    /// Clients with a CA-signed certificate naming no configured peer.
    pub peers_unknown: u64,
    /// Connections dropped for a bad length prefix or a truncated frame.
    pub frames_bad: u64,
    /// Connections dropped for an undecodable message or one not for us.
    pub messages_bad: u64,
    /// Connections dropped for a message whose `from` is not the peer.
    pub messages_wrong_from: u64,
    /// Outbound messages dropped (queue full, peer unreachable, too large).
    pub sends_dropped: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> TransportStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TransportStats {
            handshakes_failed: g(&self.handshakes_failed),
            peers_unknown: g(&self.peers_unknown),
            frames_bad: g(&self.frames_bad),
            messages_bad: g(&self.messages_bad),
            messages_wrong_from: g(&self.messages_wrong_from),
            sends_dropped: g(&self.sends_dropped),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The raft task's side of one peer's sender.
pub(crate) struct PeerLink {
    pub(crate) raft_id: u64,
    queue: mpsc::Sender<Message>,
    pub(crate) connected: Arc<AtomicBool>,
    counters: Arc<Counters>,
    reports: mpsc::Sender<Report>,
    redial: Arc<Notify>,
}

impl PeerLink {
    /// Drops the connection to the peer and dials again at once (no
    /// backoff): the peer came back (its heartbeat is alive again) and the
    /// old connection may be a dead one whose writes only fill the kernel's
    /// buffer while TCP retransmits with backoff (issue 23: a rebooted
    /// peer rejoined after 2–27 s).
    pub(crate) fn redial(&self) {
        self.redial.notify_one();
    }

    /// Queues `m` without waiting; drops it when the queue is full.
    pub(crate) fn send(&self, m: Message) {
        if let Err(e) = self.queue.try_send(m) {
            bump(&self.counters.sends_dropped);
            let m = match e {
                mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
            };
            tracing::debug!(to = self.raft_id, kind = ?m.get_msg_type(), "raft message dropped: peer queue full");
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let _ = self.reports.try_send(Report::Snapshot { to: self.raft_id, sent: false });
            }
        }
    }
}

pub(crate) fn spawn_sender(
    peer: RaftPeer,
    tls: Arc<TlsSetup>,
    reports: mpsc::Sender<Report>,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) -> (PeerLink, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(PEER_QUEUED_MAX);
    let connected = Arc::new(AtomicBool::new(false));
    let redial = Arc::new(Notify::new());
    let link = PeerLink {
        raft_id: raft_id(peer.id),
        queue: tx,
        connected: connected.clone(),
        counters: counters.clone(),
        reports: reports.clone(),
        redial: redial.clone(),
    };
    let sender = Sender { peer, tls, rx, reports, counters, connected, redial };
    let task = tokio::spawn(async move {
        let mut stop = stop;
        tokio::select! {
            () = sender.run() => {}
            _ = super::stopped(&mut stop) => {}
        }
    });
    (link, task)
}

struct Sender {
    peer: RaftPeer,
    tls: Arc<TlsSetup>,
    rx: mpsc::Receiver<Message>,
    reports: mpsc::Sender<Report>,
    counters: Arc<Counters>,
    connected: Arc<AtomicBool>,
    redial: Arc<Notify>,
}

impl Sender {
    async fn run(mut self) {
        let to = raft_id(self.peer.id);
        let mut backoff = RECONNECT_BACKOFF_MIN;
        let mut failures = 0u64;
        loop {
            match self.connect().await {
                Ok(stream) => {
                    if failures > 0 {
                        tracing::info!(peer = %self.peer.name, "raft: connected to peer");
                    }
                    failures = 0;
                    backoff = RECONNECT_BACKOFF_MIN;
                    self.connected.store(true, Ordering::Relaxed);
                    let why = self.pump(stream).await;
                    self.connected.store(false, Ordering::Relaxed);
                    match why {
                        None => return,
                        Some(Pumped::Redial) => {
                            tracing::info!(peer = %self.peer.name, "raft: the peer is back; dialling it again");
                            continue;
                        }
                        Some(Pumped::Failed(why)) => {
                            tracing::info!(peer = %self.peer.name, "raft: connection to peer lost: {why}")
                        }
                    }
                    let _ = self.reports.try_send(Report::Unreachable(to));
                }
                Err(why) => {
                    failures += 1;
                    // Log the first failure and then rarely: a down peer
                    // is redialled every second.
                    if failures == 1 || failures % 60 == 0 {
                        tracing::warn!(peer = %self.peer.name, addr = %self.peer.addr, failures, "raft: cannot connect to peer: {why}");
                    }
                    let _ = self.reports.try_send(Report::Unreachable(to));
                }
            }
            // Wait out the backoff, dropping what raft queues meanwhile (it
            // would be stale by the time the peer is back).
            let wait = tokio::time::sleep(backoff);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    () = self.redial.notified() => break,
                    m = self.rx.recv() => match m {
                        Some(m) => self.dropped(&m),
                        None => return,
                    },
                }
            }
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    fn dropped(&self, m: &Message) {
        bump(&self.counters.sends_dropped);
        if m.get_msg_type() == MessageType::MsgSnapshot {
            let _ = self.reports.try_send(Report::Snapshot { to: m.to, sent: false });
        }
    }

    async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name = server_name(&self.peer.name).map_err(|e| e.to_string())?;
        let attempt = async {
            let tcp = TcpStream::connect(self.peer.addr).await.map_err(|e| format!("TCP: {e}"))?;
            let _ = tcp.set_nodelay(true);
            // The server's certificate must chain to the cluster CA and name
            // the peer dialled.
            self.tls.connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt).await.map_err(|_| "timed out".to_string())?
    }

    /// Writes queued messages until the connection fails, a redial is
    /// asked for, or the raft task is gone (`None`).
    async fn pump(&mut self, stream: tokio_rustls::client::TlsStream<TcpStream>) -> Option<Pumped> {
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::new(wr);
        // The server never writes; a read returning means it closed or failed.
        let mut probe = [0u8; 1];
        let mut batch = Vec::with_capacity(PEER_BATCH_MAX);
        loop {
            tokio::select! {
                r = rd.read(&mut probe) => {
                    return Some(Pumped::Failed(match r { Ok(_) => "closed by the peer".into(), Err(e) => e.to_string() }));
                }
                () = self.redial.notified() => return Some(Pumped::Redial),
                n = self.rx.recv_many(&mut batch, PEER_BATCH_MAX) => {
                    if n == 0 {
                        return None;
                    }
                }
            }
            let mut snapshots = Vec::new();
            let write = async {
                for m in &batch {
                    let bytes = match m.write_to_bytes() {
                        Ok(b) if b.len() <= FRAME_BYTES_MAX => b,
                        Ok(b) => {
                            tracing::error!(to = m.to, bytes = b.len(), "raft: message larger than a frame, dropped");
                            self.dropped(m);
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(to = m.to, "raft: cannot encode message: {e}");
                            self.dropped(m);
                            continue;
                        }
                    };
                    wr.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
                    wr.write_all(&bytes).await?;
                    if m.get_msg_type() == MessageType::MsgSnapshot {
                        snapshots.push(m.to);
                    }
                }
                wr.flush().await
            };
            let result = tokio::time::timeout(WRITE_TIMEOUT, write).await;
            let failed = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("write timed out".to_string()),
            };
            for to in snapshots {
                let _ = self.reports.try_send(Report::Snapshot { to, sent: failed.is_none() });
            }
            batch.clear();
            if let Some(why) = failed {
                return Some(Pumped::Failed(why));
            }
        }
    }
}

/// Why `Sender::pump` returned.
enum Pumped {
    Failed(String),
    Redial,
}

/// Accepts peers until `stop`; each connection is served by its own task,
/// all aborted when this returns.
pub(crate) async fn listen(
    listener: TcpListener,
    tls: Arc<TlsSetup>,
    me: u64,
    inbound: mpsc::Sender<Inbound>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(INBOUND_CONNECTIONS_MAX));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = super::stopped(&mut stop) => return,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (tcp, from) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!("raft: accept failed: {e}");
                tokio::select! {
                    () = tokio::time::sleep(RECONNECT_BACKOFF_MIN) => continue,
                    _ = super::stopped(&mut stop) => return,
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%from, "raft: too many inbound connections, refusing one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (tls, inbound, counters) = (tls.clone(), inbound.clone(), counters.clone());
        conns.spawn(async move {
            let _permit = permit;
            serve(tcp, from, &tls, me, &inbound, &counters).await;
        });
    }
}

/// Why a connection was dropped.
enum Dropped {
    /// The raft task is gone (shutting down): nothing to log.
    Closed,
    Eof,
    Io(std::io::Error),
    BadFrame(String),
    BadMessage(String),
    WrongFrom {
        claimed: u64,
    },
}

async fn serve(
    tcp: TcpStream,
    from: std::net::SocketAddr,
    tls: &TlsSetup,
    me: u64,
    inbound: &mpsc::Sender<Inbound>,
    counters: &Counters,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            bump(&counters.handshakes_failed);
            tracing::warn!(%from, "raft: TLS handshake with a client failed: {e}");
            return;
        }
        Err(_) => {
            bump(&counters.handshakes_failed);
            tracing::warn!(%from, "raft: TLS handshake with a client timed out");
            return;
        }
    };
    let peer = match tls.identify(stream.get_ref().1.peer_certificates().and_then(|c| c.first())) {
        Ok(p) => p,
        Err(why) => {
            bump(&counters.peers_unknown);
            tracing::warn!(%from, "raft: refusing a client: {why}");
            return;
        }
    };
    tracing::debug!(%from, peer, "raft: peer connected");
    let (mut rd, _wr) = tokio::io::split(stream);
    let why = read_frames(&mut rd, peer, me, inbound).await;
    match why {
        Dropped::Closed => {}
        Dropped::Eof => tracing::debug!(%from, peer, "raft: peer closed its connection"),
        Dropped::Io(e) => tracing::info!(%from, peer, "raft: connection from peer failed: {e}"),
        Dropped::BadFrame(why) => {
            bump(&counters.frames_bad);
            tracing::warn!(%from, peer, "raft: dropping the connection from peer: {why}");
        }
        Dropped::BadMessage(why) => {
            bump(&counters.messages_bad);
            tracing::warn!(%from, peer, "raft: dropping the connection from peer: {why}");
        }
        Dropped::WrongFrom { claimed } => {
            bump(&counters.messages_wrong_from);
            tracing::warn!(%from, peer, claimed, "raft: dropping the connection from peer: a message claims another sender");
        }
    }
}

async fn read_frames<R: AsyncRead + Unpin>(rd: &mut R, peer: u64, me: u64, inbound: &mpsc::Sender<Inbound>) -> Dropped {
    loop {
        let mut len = [0u8; 4];
        if let Err(e) = rd.read_exact(&mut len).await {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof { Dropped::Eof } else { Dropped::Io(e) };
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > FRAME_BYTES_MAX {
            return Dropped::BadFrame(format!("frame length {len} outside 1..={FRAME_BYTES_MAX}"));
        }
        let mut body = vec![0u8; len];
        match tokio::time::timeout(FRAME_READ_TIMEOUT, rd.read_exact(&mut body)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Dropped::BadFrame(format!("truncated frame: {e}")),
            Err(_) => return Dropped::BadFrame(format!("a frame's {len} bytes did not arrive in time")),
        }
        let m = match Message::parse_from_bytes(&body) {
            Ok(m) => m,
            Err(e) => return Dropped::BadMessage(format!("undecodable message: {e}")),
        };
        if m.from != peer {
            return Dropped::WrongFrom { claimed: m.from };
        }
        if m.to != me {
            return Dropped::BadMessage(format!("message for node {} received by node {me}", m.to));
        }
        if inbound.send((peer, m)).await.is_err() {
            return Dropped::Closed;
        }
    }
}
