//! The replication link's shell: TCP + TLS (mutual, checked against the
//! cluster CA and the peer's node name), and the reader and writer tasks
//! that turn frames into [`LinkEvent`]s and messages into frames.
//!
//! The node with the lower id connects, the other accepts, so exactly one
//! connection exists. Authentication happens in the TLS handshake, before a
//! single byte of the peer's frames is read: an unknown or wrong peer never
//! reaches `wire::decode_header`. The accepting side runs each handshake
//! in its own task under a short timeout, with bounds per source address
//! and in total (`accept_loop`), so idle or hostile connections cannot
//! keep the peer out; [`LinkFailures`] logs failed attempts on both sides
//! (rate-limited) and keeps the last one for `status`.
//!
//! The writer keeps two queues and always drains the urgent one (acks,
//! pings) before the next bulk frame, so acknowledgements never wait behind
//! queued data.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::resource::{LinkSecurity, Resource};
use crate::backing::{AlignedBuf, WriteBuf};
use crate::limits;
use crate::replication::ids::LinkId;
use crate::replication::message::Message;
use crate::replication::wire::{self, FrameError, HEADER_BYTES};
use crate::tls::{load_certs as certs, TlsError};

/// A frame's data. Data received from the peer holds a share of the
/// link's receive budget until the driver has written it to disk, so a peer
/// (even an authenticated one) cannot make this node buffer without bound:
/// when the budget is spent, the reader stops and TCP pushes back.
///
/// The bytes are shared, never copied: a primary's write goes to its local
/// disk and to the link writer from the one buffer the NBD session received
/// it into (the replica clones the payload for the `Data` frame).
#[derive(Debug)]
pub struct Payload {
    pub buf: Arc<AlignedBuf>,
    permit: Option<OwnedSemaphorePermit>,
}

impl LinkError {
    /// Whether the failure says something is wrong (certificates, CA, an
    /// impostor, a stalled handshake) rather than that the peer is down.
    pub fn is_handshake(&self) -> bool {
        !matches!(self, LinkError::Connect { .. })
    }
}

impl Payload {
    pub fn new(buf: AlignedBuf) -> Payload {
        Payload { buf: Arc::new(buf), permit: None }
    }

    /// An application write's bytes.
    pub fn from_write(data: WriteBuf) -> Payload {
        match data {
            WriteBuf::Owned(buf) => Payload::new(buf),
            WriteBuf::Shared(buf) => Payload { buf, permit: None },
        }
    }

    /// The buffer and the budget it holds (release it when the data is on disk).
    pub fn into_parts(self) -> (WriteBuf, Option<OwnedSemaphorePermit>) {
        // Nobody else holds the bytes (a secondary's received data, say):
        // hand the engine the buffer itself.
        let buf = match Arc::try_unwrap(self.buf) {
            Ok(owned) => WriteBuf::Owned(owned),
            Err(shared) => WriteBuf::Shared(shared),
        };
        (buf, self.permit)
    }
}

impl Clone for Payload {
    /// Another share of the same bytes (no copy); the receive budget stays
    /// with the original.
    fn clone(&self) -> Payload {
        Payload { buf: self.buf.clone(), permit: None }
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

pub trait LinkStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> LinkStream for T {}

/// Receive buffer of the link reader.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The receive budget's unit.
const RECEIVE_UNIT_BYTES: u64 = 4096;

const _: () = assert!(
    limits::REPL_RECEIVE_BYTES_MAX >= 2 * limits::NBD_REQUEST_BYTES_MAX as u64,
    "the largest frame must fit the receive budget"
);

/// What the link tasks tell the driver.
#[derive(Debug)]
pub enum LinkEvent {
    Message {
        link: LinkId,
        msg: Message<Payload>,
    },
    FrameError {
        link: LinkId,
        error: FrameError,
    },
    /// `tls_alert`: the peer ended the connection with a TLS alert. Under
    /// TLS 1.3 the connecting side learns only here, at its first read,
    /// that the peer refused its certificate.
    Closed {
        link: LinkId,
        why: String,
        tls_alert: bool,
    },
}

/// TLS material for the link, or none in plaintext lab mode.
#[derive(Clone)]
pub struct LinkTls {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    peer_name: ServerName<'static>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to the peer at {addr}: {cause}")]
    Connect { addr: SocketAddr, cause: std::io::Error },
    #[error("TLS handshake with the peer failed: {0}")]
    Tls(std::io::Error),
    #[error("the peer's certificate is not for node {expected:?}: {why}")]
    WrongPeer { expected: String, why: String },
    #[error("TLS handshake timed out")]
    Timeout,
}

/// Builds both TLS sides from the resource: our certificate and key, the
/// cluster CA as the only trust root, TLS 1.2 and 1.3 only. A certificate
/// the peer will refuse (another node's name, another CA, expired) is
/// logged as an error but does not stop the node; `up --validate` refuses
/// it ([`check_link_tls`]).
pub fn link_tls(res: &Resource) -> Result<Option<LinkTls>, TlsError> {
    build_link_tls(res, false)
}

/// What `up --validate` checks: [`link_tls`], and our certificate as the
/// peer will check it.
pub fn check_link_tls(res: &Resource) -> Result<(), TlsError> {
    build_link_tls(res, true).map(drop)
}

fn build_link_tls(res: &Resource, strict: bool) -> Result<Option<LinkTls>, TlsError> {
    if res.link_security == LinkSecurity::PlaintextLab {
        tracing::warn!(resource = %res.name, "replication link is PLAINTEXT and unauthenticated (net.tls = plaintext-lab)");
        return Ok(None);
    }
    let (Some(ca), Some(cert), Some(key)) = (&res.ca, &res.local.cert, &res.local.key) else {
        unreachable!("resource validation requires CA, cert and key for mutual TLS");
    };
    crate::tls::require_file("CA certificate file (net.ca)", ca)?;
    crate::tls::require_file("certificate file (node.cert)", cert)?;
    crate::tls::require_file("key file (node.key)", key)?;
    let ca_certs = certs(ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in &ca_certs {
        roots.add(c.clone()).map_err(|e| TlsError::ClientCa { path: ca.clone(), cause: e.to_string() })?;
    }
    let roots = Arc::new(roots);
    let chain = certs(cert)?;
    // An unparseable certificate (v1, say) fails here; one the peer will
    // refuse fails only `--validate`: a node started anyway logs why
    // every handshake will fail.
    if let Some(refused) = check_node_certificate(cert, &chain, &ca_certs, &res.local.name)? {
        if strict {
            return Err(refused);
        }
        tracing::error!(resource = %res.name, "{refused}; the peer will refuse this node");
    }
    let key_path = key;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key { path: key.clone(), cause: e.to_string() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::ClientCa { path: ca.clone(), cause: e.to_string() })?;
    let mismatch = |e: rustls::Error| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Unusable {
            path: cert.clone(),
            why: format!("does not belong to the key {} (node.key)", key_path.display()),
        },
        other => TlsError::Config(other),
    };
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(mismatch)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(mismatch)?;
    let peer_name = ServerName::try_from(res.peer.name.clone()).map_err(|e| {
        TlsError::Config(rustls::Error::General(format!(
            "peer node name {:?} is not a valid DNS name: {e}",
            res.peer.name
        )))
    })?;
    Ok(Some(LinkTls {
        connector: TlsConnector::from(Arc::new(client)),
        acceptor: TlsAcceptor::from(Arc::new(server)),
        peer_name,
    }))
}

/// Checks what the peer will check of our certificate, so that a wrong one
/// fails at start (and `up --validate`) with a plain message rather than
/// as an opaque handshake failure on the other node: an X.509 v3
/// certificate, for this node's name, issued by the cluster CA, valid now,
/// usable as TLS server and client. `Err`: the certificate cannot be used
/// at all; `Ok(Some(_))`: the peer will refuse it.
fn check_node_certificate(
    path: &std::path::Path,
    chain: &[rustls::pki_types::CertificateDer<'static>],
    ca: &[rustls::pki_types::CertificateDer<'static>],
    node: &str,
) -> Result<Option<TlsError>, TlsError> {
    let unusable = |why: String| TlsError::Unusable { path: path.to_owned(), why };
    let Some(leaf) = chain.first() else { return Err(TlsError::NoCerts(path.to_owned())) };
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| match e {
        webpki::Error::UnsupportedCertVersion => unusable(
            "is an X.509 v1 certificate (what `openssl x509 -req` makes without -extfile); the replication \
             link needs v3 with subjectAltName = DNS:<node name> (see the README, \"Certificates\")"
                .into(),
        ),
        other => unusable(format!("cannot be parsed: {other}")),
    })?;
    let name = ServerName::try_from(node.to_owned())
        .map_err(|e| unusable(format!("cannot be checked: node name {node:?} is not a DNS name ({e})")))?;
    if ee.verify_is_valid_for_subject_name(&name).is_err() {
        return Ok(Some(unusable(format!(
            "is not for node {node:?}: its subjectAltName must include DNS:{node}, which the peer checks"
        ))));
    }
    let anchors = ca
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(format!("cannot be checked: the CA certificate is unusable ({e})")))?;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
    let now = rustls::pki_types::UnixTime::now();
    for (usage, role) in
        [(webpki::KeyUsage::server_auth(), "TLS server"), (webpki::KeyUsage::client_auth(), "TLS client")]
    {
        if let Err(e) = ee.verify_for_usage(algs, &anchors, &chain[1..], now, usage, None, None) {
            let why = match e {
                webpki::Error::UnknownIssuer => "was not issued by the cluster CA (net.ca)".to_string(),
                webpki::Error::CertExpired { .. } => "has expired".to_string(),
                webpki::Error::CertNotValidYet { .. } => "is not valid yet (check the clock)".to_string(),
                webpki::Error::RequiredEkuNotFoundContext(_) => {
                    format!("may not be used as a {role} (extendedKeyUsage must allow serverAuth and clientAuth)")
                }
                other => format!("is not accepted as a {role} by the cluster CA: {other}"),
            };
            return Ok(Some(unusable(why)));
        }
    }
    Ok(None)
}

/// Connects to the peer (the lower node id does this). The TCP connect and
/// the TLS handshake each get `timeout`.
pub async fn connect(
    addr: SocketAddr,
    tls: Option<&LinkTls>,
    timeout: Duration,
) -> Result<Box<dyn LinkStream>, LinkError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::Connect { addr, cause: std::io::ErrorKind::TimedOut.into() })?
        .map_err(|cause| LinkError::Connect { addr, cause })?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else { return Ok(Box::new(tcp)) };
    // The server's certificate must chain to the cluster CA and name the
    // peer node.
    let stream = tokio::time::timeout(timeout, tls.connector.connect(tls.peer_name.clone(), tcp))
        .await
        .map_err(|_| LinkError::Timeout)?
        .map_err(LinkError::Tls)?;
    Ok(Box::new(stream))
}

/// Runs the TLS handshake of an accepted connection and checks that the
/// client is *the peer* (the higher node id does this).
pub async fn handshake(
    tcp: TcpStream,
    tls: Option<&LinkTls>,
    timeout: Duration,
) -> Result<Box<dyn LinkStream>, LinkError> {
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else { return Ok(Box::new(tcp)) };
    let stream = tokio::time::timeout(timeout, tls.acceptor.accept(tcp))
        .await
        .map_err(|_| LinkError::Timeout)?
        .map_err(LinkError::Tls)?;
    // The CA vouched for the client; it must also be *the peer*, not another
    // node holding a certificate from the same CA.
    let expected = match &tls.peer_name {
        ServerName::DnsName(name) => name.as_ref().to_owned(),
        other => format!("{other:?}"),
    };
    let (_, conn) = stream.get_ref();
    let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Err(LinkError::WrongPeer { expected, why: "no client certificate".into() });
    };
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| LinkError::WrongPeer { expected: expected.clone(), why: e.to_string() })?;
    ee.verify_is_valid_for_subject_name(&tls.peer_name)
        .map_err(|e| LinkError::WrongPeer { expected: expected.clone(), why: e.to_string() })?;
    Ok(Box::new(tokio_rustls::TlsStream::Server(stream)))
}

/// Accepted connections that have not authenticated yet, counted per
/// source (an IPv4 address, or an IPv6 /64: one host can hold a whole
/// /64) and in total, so that idle or slow connections can neither hold
/// the listener nor crowd out the peer.
#[derive(Default)]
struct Unauthenticated {
    by_source: HashMap<IpAddr, usize>,
    total: usize,
}

/// What the per-source bound counts by.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// A claimed place among the unauthenticated connections; freed on drop.
struct PreauthSlot {
    table: Arc<Mutex<Unauthenticated>>,
    key: IpAddr,
    counted_in_total: bool,
}

impl PreauthSlot {
    /// Claims a place for a connection from `from`, or says why not. The
    /// configured peer's own address is not held to the total bound, so
    /// connections from elsewhere cannot keep it out.
    fn claim(table: &Arc<Mutex<Unauthenticated>>, from: IpAddr, peer: IpAddr) -> Result<PreauthSlot, &'static str> {
        let key = source_key(from);
        let counted_in_total = source_key(peer) != key;
        let mut t = lock(table);
        let here = t.by_source.get(&key).copied().unwrap_or(0);
        if here >= limits::REPL_PREAUTH_PER_SOURCE_MAX {
            return Err("too many unauthenticated connections from this address");
        }
        if counted_in_total && t.total >= limits::REPL_PREAUTH_CONNECTIONS_MAX {
            return Err("too many unauthenticated connections");
        }
        *t.by_source.entry(key).or_insert(0) += 1;
        if counted_in_total {
            t.total += 1;
        }
        Ok(PreauthSlot { table: table.clone(), key, counted_in_total })
    }
}

impl Drop for PreauthSlot {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        if let Some(n) = t.by_source.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                t.by_source.remove(&self.key);
            }
        }
        if self.counted_in_total {
            t.total -= 1;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still
    // holds consistent counters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accepts peer connections until the task is dropped (the higher node id
/// runs this). Each connection's handshake runs in its own task, bounded
/// by [`limits::REPL_PREAUTH_TIMEOUT_MS`] (or `io_timeout`, if shorter),
/// [`limits::REPL_PREAUTH_PER_SOURCE_MAX`] per source and
/// [`limits::REPL_PREAUTH_CONNECTIONS_MAX`] in all: idle connections from
/// a third host cannot delay the peer. Authenticated streams go to `tx`.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<LinkTls>,
    io_timeout: Duration,
    peer: IpAddr,
    failures: Arc<LinkFailures>,
    tx: mpsc::Sender<Result<Box<dyn LinkStream>, String>>,
) {
    let timeout = io_timeout.min(Duration::from_millis(limits::REPL_PREAUTH_TIMEOUT_MS));
    let table = Arc::new(Mutex::new(Unauthenticated::default()));
    let mut backoff = Duration::from_millis(10);
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::from_millis(10);
                accepted
            }
            Err(e) => {
                // Out of descriptors, say: wait for some to be freed.
                let context = format!("cannot accept replication connections on {}", local(&listener));
                failures.record(true, &context, e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let slot = match PreauthSlot::claim(&table, from.ip(), peer) {
            Ok(slot) => slot,
            Err(why) => {
                failures.record(true, &format!("refused a replication connection from {from}"), why.to_string());
                continue; // dropping `tcp` closes it
            }
        };
        let (tls, tx, failures) = (tls.clone(), tx.clone(), failures.clone());
        tokio::spawn(async move {
            let result = handshake(tcp, tls.as_ref(), timeout).await;
            drop(slot);
            match result {
                Ok(stream) => {
                    tracing::debug!(%from, "peer connection accepted");
                    let _ = tx.send(Ok(stream)).await;
                }
                Err(e) => {
                    failures.record(true, &format!("refused a replication connection from {from}"), e.to_string())
                }
            }
        });
    }
}

/// Failed connection attempts and handshakes of one resource, both
/// directions: each kind of failure is logged at warn at most once per
/// [`limits::REPL_LINK_WARN_INTERVAL_MS`] (the next warning counts those
/// left out), and the last failure is kept for `status`.
#[derive(Default)]
pub struct LinkFailures {
    inner: Mutex<FailureLog>,
}

/// Kinds of failure whose warnings are rate-limited separately; beyond
/// this, the kind warned about longest ago is forgotten.
const FAILURE_KINDS_MAX: usize = 32;

#[derive(Default)]
struct FailureLog {
    last: Option<(String, Instant)>,
    /// Per kind (the cause's text): when it was last logged, and how many
    /// have not been since.
    warned: HashMap<String, (Instant, u64)>,
}

impl LinkFailures {
    /// Records a failure: `context` says which connection (it may name a
    /// source port, so it is not part of the kind), `cause` what went
    /// wrong. `warn` says whether it is worth a warning (TLS,
    /// authentication, a flood) or only a debug line (a peer that is down
    /// refuses TCP connections, which is expected).
    pub fn record(&self, warn: bool, context: &str, cause: String) {
        let now = Instant::now();
        let what = format!("{context}: {cause}");
        let mut log = lock(&self.inner);
        log.last = Some((what.clone(), now));
        if !warn {
            tracing::debug!("{what}");
            return;
        }
        let interval = Duration::from_millis(limits::REPL_LINK_WARN_INTERVAL_MS);
        if let Some((at, left_out)) = log.warned.get_mut(&cause) {
            if now.duration_since(*at) < interval {
                *left_out += 1;
                return;
            }
            match std::mem::take(left_out) {
                0 => tracing::warn!("{what}"),
                n => tracing::warn!("{what} (and {n} more like it in the last {} s)", interval.as_secs()),
            }
            *at = now;
            return;
        }
        if log.warned.len() >= FAILURE_KINDS_MAX {
            let oldest = log.warned.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                log.warned.remove(&oldest);
            }
        }
        tracing::warn!("{what}");
        log.warned.insert(cause, (now, 0));
    }

    /// The last failure and how long ago it happened.
    pub fn last(&self) -> Option<(String, Duration)> {
        lock(&self.inner).last.as_ref().map(|(what, at)| (what.clone(), at.elapsed()))
    }
}

fn local(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The two send queues of a link, each bounded in encoded bytes (frame
/// headers plus payloads): acks and pings go ahead of bulk data.
///
/// A queue that would pass its bound means the peer stopped reading (a
/// healthy peer drains them far below it: the bulk bound covers every
/// upstream budget, see [`limits::link_bulk_queue_bytes_max`]); the driver
/// then drops the link, which marks what was not acknowledged out of sync.
pub struct LinkWriter {
    urgent: SendQueue,
    bulk: SendQueue,
    tasks: [tokio::task::AbortHandle; 2],
}

/// One bounded send queue (the sender's half).
struct SendQueue {
    tx: mpsc::UnboundedSender<(Message<Payload>, u64)>,
    /// Encoded bytes queued and not yet handed to the socket.
    queued_bytes: Arc<AtomicU64>,
    queued_bytes_max: u64,
}

/// A send queue passed its bound: the peer is not reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the peer stopped reading: {queue} send queue would hold {bytes} bytes (bound {bytes_max})")]
pub struct SendOverflow {
    pub queue: &'static str,
    pub bytes: u64,
    pub bytes_max: u64,
}

impl LinkWriter {
    /// Queues a message (acks and pings go ahead of bulk data), or refuses
    /// it when its queue would pass its bound.
    pub fn send(&self, msg: Message<Payload>) -> Result<(), SendOverflow> {
        let frame = wire::encode(&msg, |p: &Payload| &p.buf[..]);
        let bytes = (frame.header.len() + frame.payload.as_slice().len()) as u64;
        drop(frame);
        let (queue, name) =
            if wire::command_of(&msg).is_urgent() { (&self.urgent, "urgent") } else { (&self.bulk, "bulk") };
        let before = queue.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > queue.queued_bytes_max {
            queue.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(SendOverflow { queue: name, bytes: before + bytes, bytes_max: queue.queued_bytes_max });
        }
        // A closed queue means the writer task ended; its Closed event
        // tells the driver.
        let _ = queue.tx.send((msg, bytes));
        Ok(())
    }

    /// Encoded bytes waiting in the urgent and bulk queues.
    pub fn queued_bytes(&self) -> [u64; 2] {
        [self.urgent.queued_bytes.load(Ordering::Relaxed), self.bulk.queued_bytes.load(Ordering::Relaxed)]
    }

    /// Stops both tasks (the socket closes).
    pub fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The receiving half of a [`SendQueue`], owned by the writer task.
struct QueueRx {
    rx: mpsc::UnboundedReceiver<(Message<Payload>, u64)>,
    queued_bytes: Arc<AtomicU64>,
}

fn send_queue(queued_bytes_max: u64) -> (SendQueue, QueueRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued_bytes = Arc::new(AtomicU64::new(0));
    (SendQueue { tx, queued_bytes: queued_bytes.clone(), queued_bytes_max }, QueueRx { rx, queued_bytes })
}

/// Starts the reader and writer tasks for an authenticated stream; the
/// bulk queue holds at most `bulk_bytes_max` encoded bytes.
pub fn start(
    link: LinkId,
    stream: Box<dyn LinkStream>,
    events: mpsc::Sender<LinkEvent>,
    bulk_bytes_max: u64,
) -> LinkWriter {
    let (reader, writer) = tokio::io::split(stream);
    let (urgent, urgent_rx) = send_queue(limits::REPL_LINK_URGENT_QUEUE_BYTES_MAX);
    let (bulk, bulk_rx) = send_queue(bulk_bytes_max);
    let read_task = tokio::spawn(read_loop(link, reader, events.clone()));
    let write_task = tokio::spawn(write_loop(link, writer, urgent_rx, bulk_rx, events));
    LinkWriter { urgent, bulk, tasks: [read_task.abort_handle(), write_task.abort_handle()] }
}

async fn read_loop(link: LinkId, reader: impl AsyncRead + Unpin, events: mpsc::Sender<LinkEvent>) {
    // Small frames (acks, 4 KiB writes) arrive many per segment: buffered,
    // one receive takes them all instead of two per frame. Payloads larger
    // than the buffer are read straight into their own buffer.
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let budget = Arc::new(Semaphore::new((limits::REPL_RECEIVE_BYTES_MAX / RECEIVE_UNIT_BYTES) as usize));
    let mut header = [0u8; HEADER_BYTES];
    let (why, tls_alert) = loop {
        if let Err(e) = reader.read_exact(&mut header).await {
            break (format!("read from the peer: {e}"), is_tls_alert(&e));
        }
        let head = match wire::decode_header(&header) {
            Ok(h) => h,
            Err(error) => {
                let _ = events.send(LinkEvent::FrameError { link, error }).await;
                return;
            }
        };
        let units = (head.payload_len() as u64).div_ceil(RECEIVE_UNIT_BYTES).max(1) as u32;
        let Ok(permit) = budget.clone().acquire_many_owned(units).await else { return };
        let mut buf = AlignedBuf::for_overwrite(head.payload_len());
        if let Err(e) = reader.read_exact(&mut buf[..]).await {
            break (format!("read from the peer: {e}"), is_tls_alert(&e));
        }
        // The payload buffer becomes the message's data: no copy.
        match wire::decode_message(&head, Payload { buf: Arc::new(buf), permit: Some(permit) }) {
            Ok(msg) => {
                if events.send(LinkEvent::Message { link, msg }).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                let _ = events.send(LinkEvent::FrameError { link, error }).await;
                return;
            }
        }
    };
    let _ = events.send(LinkEvent::Closed { link, why, tls_alert }).await;
}

/// Whether a read failed because the peer sent a TLS alert.
fn is_tls_alert(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)))
}

async fn write_loop(
    link: LinkId,
    writer: impl AsyncWrite + Unpin,
    mut urgent: QueueRx,
    mut bulk: QueueRx,
    events: mpsc::Sender<LinkEvent>,
) {
    let mut out = BufWriter::with_capacity(256 * 1024, writer);
    let why = loop {
        let (msg, bytes, from) = match urgent.rx.try_recv() {
            Ok((m, b)) => (m, b, &urgent.queued_bytes),
            Err(_) => match bulk.rx.try_recv() {
                Ok((m, b)) => (m, b, &bulk.queued_bytes),
                Err(_) => {
                    // Nothing queued: push out what is buffered, then wait.
                    if let Err(e) = out.flush().await {
                        break format!("write to the peer: {e}");
                    }
                    tokio::select! {
                        biased;
                        m = urgent.rx.recv() => match m { Some((m, b)) => (m, b, &urgent.queued_bytes), None => return },
                        m = bulk.rx.recv() => match m { Some((m, b)) => (m, b, &bulk.queued_bytes), None => return },
                    }
                }
            },
        };
        from.fetch_sub(bytes, Ordering::Relaxed);
        let frame = wire::encode(&msg, |p: &Payload| &p.buf[..]);
        let result = async {
            out.write_all(&frame.header).await?;
            out.write_all(frame.payload.as_slice()).await
        }
        .await;
        if let Err(e) = result {
            break format!("write to the peer: {e}");
        }
    };
    let _ = events.send(LinkEvent::Closed { link, why, tls_alert: false }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that keeps its socket open but never reads: every queue stops
    /// at its bound, the writer reports the overflow, and nothing grows.
    #[tokio::test]
    async fn a_peer_that_stops_reading_fills_each_queue_only_to_its_bound() {
        use crate::replication::message::{AckKind, WriteKind};
        let (ours, _theirs) = tokio::io::duplex(64 * 1024);
        let (events, _events_rx) = mpsc::channel(16);
        let bulk_max = 8 * 1024 * 1024;
        let writer = start(1, Box::new(ours), events, bulk_max);
        let data = || Payload::new(AlignedBuf::zeroed(64 * 1024));
        let mut seq = 0;
        let mut bulk_refused = None;
        while bulk_refused.is_none() && seq < 10_000 {
            seq += 1;
            let msg = Message::Data {
                seq,
                epoch: 1,
                barrier: 0,
                offset: 0,
                len: 64 * 1024,
                kind: WriteKind::Write,
                fua: false,
                data: Some(data()),
            };
            bulk_refused = writer.send(msg).err();
            assert!(writer.queued_bytes()[1] <= bulk_max);
        }
        let refused = bulk_refused.expect("the bulk queue is bounded");
        assert_eq!((refused.queue, refused.bytes_max), ("bulk", bulk_max));
        // The writer task moved what fits into the socket; the rest waits.
        assert!(writer.queued_bytes()[1] > bulk_max - 2 * (64 * 1024 + HEADER_BYTES as u64));
        let mut urgent_refused = None;
        for seq in 0..1_000_000 {
            urgent_refused = writer.send(Message::Ack { seq, kind: AckKind::Written }).err();
            assert!(writer.queued_bytes()[0] <= limits::REPL_LINK_URGENT_QUEUE_BYTES_MAX);
            if urgent_refused.is_some() {
                break;
            }
        }
        assert_eq!(urgent_refused.map(|r| r.queue), Some("urgent"));
        writer.close();
    }

    #[test]
    fn unauthenticated_connections_are_bounded_per_source_and_in_total() {
        let table = Arc::new(Mutex::new(Unauthenticated::default()));
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let other: IpAddr = "10.0.0.9".parse().unwrap();
        let held: Vec<_> = (0..limits::REPL_PREAUTH_PER_SOURCE_MAX)
            .map(|_| PreauthSlot::claim(&table, other, peer).unwrap())
            .collect();
        assert!(PreauthSlot::claim(&table, other, peer).is_err(), "one source holds at most its share");
        // Fill the total from many sources: the peer still gets in.
        let mut many = Vec::new();
        for i in 0.. {
            let ip = IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]);
            match PreauthSlot::claim(&table, ip, peer) {
                Ok(slot) => many.push(slot),
                Err(_) => break,
            }
        }
        assert_eq!(held.len() + many.len(), limits::REPL_PREAUTH_CONNECTIONS_MAX);
        let from_peer = PreauthSlot::claim(&table, peer, peer).expect("the peer is not held to the total");
        drop((held, many, from_peer));
        let t = lock(&table);
        assert_eq!((t.total, t.by_source.len()), (0, 0), "every slot is given back");
    }

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64() {
        let a = source_key("2001:db8:1:2::1".parse().unwrap());
        let b = source_key("2001:db8:1:2:ffff::7".parse().unwrap());
        let c = source_key("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(source_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn failures_are_kept_for_status_whether_or_not_logged() {
        let f = LinkFailures::default();
        assert!(f.last().is_none());
        for port in 0..100 {
            f.record(true, &format!("refused a replication connection from 10.0.0.9:{port}"), "bad".into());
        }
        f.record(false, "connecting to b at 10.0.0.2:7789 failed", "connection refused".into());
        let (last, _) = f.last().unwrap();
        assert_eq!(last, "connecting to b at 10.0.0.2:7789 failed: connection refused");
        let log = lock(&f.inner);
        assert_eq!(log.warned.get("bad").map(|(_, n)| *n), Some(99), "repeats of one kind are counted, not logged");
    }

    /// What `openssl x509 -req` makes without `-extfile`: an X.509 v1
    /// certificate (CN=a, no extensions).
    const V1_CERT: &str = "-----BEGIN CERTIFICATE-----
MIICoDCCAYgCFClHt3KE2s/KGTg3v+fCnl/P4oWvMA0GCSqGSIb3DQEBCwUAMA0x
CzAJBgNVBAMMAmNhMB4XDTI2MTIwODAyMTIwNloXDTI2MTIxODAyMTIwNlowDDEK
MAgGA1UEAwwBYTCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAPR9gYS/
xSB6MyNozf6glwpGo86ZbaCKtHZeQDXSLo96prKUN4dBgW4Tqjm64R/wpUIjZvNF
WqClTrkLTRWc0B4PJ+9Axh70/F7+xoivjkzyORWeRdEcIibUNdY1QgCeY2/pjae8
miGGxNd/px+dtZpdomWQ7PuYI9GpLHluEOOA6n92XKMyvvC3G8YYjhfpVgn4jLlE
7RzTwKRLYOloqx8ueVxj9ylIJYIqf59R3Vs1Y1cLZRNQmIAIOVcdRPXdohxEsTEo
ifgjV+HaOsRjtIy2/1LVuCK4pjjjA74lQ4cHsNsG9vamvfi/RrglqgqmInZ/NtOj
CDV8IhxYG0Ti27kCAwEAATANBgkqhkiG9w0BAQsFAAOCAQEAjFUgfWjr/F3LnOas
QbBFdLUwmhxSRJefYHYyh8ihp7xBQC/mFD2UsmLNMAGm0FUzTRvl6WYhSHrlDCl6
IfGWOg1cuEJXWNk32lowecPj5XFT0MXcv4H3Ie6gOFoTx/1UMG9vvJ6NG8vePIpt
t4BGMJp53eJYSj7RtXaf4ajEUyTXgm7TL/ciycjVmfQy7pAIMSZ8xizT345uDkv+
WySFPS7Z6cH0n7jqdJdAJcCDjTIGhyd6fCYsE1tZbxz/GjIKZ/ZboxfUsBzMkBvH
3U71XwKI6BE5x54gjyYr8Vi72yHJhbrEUsMRaKF4GOi97HSDUE/FTEBgCd5gvJry
1desqA==
-----END CERTIFICATE-----
";

    struct Files {
        dir: std::path::PathBuf,
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A CA and certificates for `a`, `b` in a fresh directory; returns a
    /// resource (node a, mutual TLS) loaded from text with `edit` applied.
    fn resource_with(edit: impl Fn(String) -> String) -> (Files, Result<Option<LinkTls>, TlsError>) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("replicator-link-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = Files { dir: dir.clone() };
        for (ca_name, names) in [("ca", &["a", "b"][..]), ("other-ca", &["a"][..])] {
            let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca.distinguished_name.push(DnType::CommonName, ca_name);
            let ca_key = KeyPair::generate().unwrap();
            let ca_cert = ca.self_signed(&ca_key).unwrap();
            std::fs::write(dir.join(format!("{ca_name}.pem")), ca_cert.pem()).unwrap();
            for name in names {
                let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
                let key = KeyPair::generate().unwrap();
                let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
                let prefix = if ca_name == "ca" { String::new() } else { format!("{ca_name}-") };
                std::fs::write(dir.join(format!("{prefix}{name}.pem")), cert.pem()).unwrap();
                std::fs::write(dir.join(format!("{prefix}{name}.key")), key.serialize_pem()).unwrap();
            }
        }
        std::fs::write(dir.join("v1.pem"), V1_CERT).unwrap();
        let d = dir.display();
        let text = format!(
            "[resource]\nname = \"r0\"\n[net]\nca = \"{d}/ca.pem\"\n\
             [[node]]\nname = \"a\"\nid = 0\naddress = \"10.0.0.1:7789\"\ndisk = \"/dev/vdb\"\n\
             nbd-listen = [\"127.0.0.1:10809\"]\ncert = \"{d}/a.pem\"\nkey = \"{d}/a.key\"\n\
             [[node]]\nname = \"b\"\nid = 1\naddress = \"10.0.0.2:7789\"\ndisk = \"/dev/vdb\"\n\
             cert = \"{d}/b.pem\"\nkey = \"{d}/b.key\"\n"
        );
        let text = edit(text.replace(&d.to_string(), "DIR")).replace("DIR", &d.to_string());
        let res = crate::node::resource::parse(std::path::Path::new("r0.toml"), &text, Some("a")).unwrap();
        (files, check_link_tls(&res).map(|()| None))
    }

    fn refused(edit: impl Fn(String) -> String) -> String {
        match resource_with(edit).1 {
            Ok(_) => panic!("accepted"),
            Err(e) => {
                // One plain line: no Debug formatting, and nothing a source
                // chain would print again.
                assert!(std::error::Error::source(&e).is_none(), "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn link_tls_accepts_good_certificates_and_explains_bad_ones() {
        resource_with(|t| t).1.unwrap();
        let e = refused(|t| t.replace("DIR/a.pem", "DIR/missing.pem"));
        assert!(e.contains("missing.pem does not exist"), "{e}");
        let e = refused(|t| t.replace("DIR/ca.pem", "DIR/nowhere-ca.pem"));
        assert!(e.contains("nowhere-ca.pem does not exist"), "{e}");
        let e = refused(|t| t.replace("DIR/a.pem", "DIR/v1.pem"));
        assert!(e.contains("X.509 v1") && e.contains("subjectAltName"), "{e}");
        let e = refused(|t| t.replace("DIR/a.pem", "DIR/b.pem").replace("DIR/a.key", "DIR/b.key"));
        assert!(e.contains("is not for node \"a\""), "{e}");
        let e = refused(|t| t.replace("DIR/a.pem", "DIR/other-ca-a.pem").replace("DIR/a.key", "DIR/other-ca-a.key"));
        assert!(e.contains("not issued by the cluster CA"), "{e}");
        let e = refused(|t| t.replace("DIR/a.key", "DIR/b.key"));
        assert!(e.contains("does not belong to the key"), "{e}");
    }
}
