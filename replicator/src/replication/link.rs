//! The replication link's shell: TCP + TLS (mutual, checked against the
//! cluster CA and the peer's node name), and the reader and writer tasks
//! that turn frames into [`LinkEvent`]s and messages into frames.
//!
//! The node with the lower id connects, the other accepts, so exactly one
//! connection exists. Authentication happens in the TLS handshake, before a
//! single byte of the peer's frames is read: an unknown or wrong peer never
//! reaches `wire::decode_header`.
//!
//! The writer keeps two queues and always drains the urgent one (acks,
//! pings) before the next bulk frame, so acknowledgements never wait behind
//! queued data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::message::Message;
use super::replica::LinkId;
use super::resource::{LinkSecurity, Resource};
use super::wire::{self, FrameError, HEADER_BYTES};
use crate::backing::{AlignedBuf, WriteBuf};
use crate::limits;
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
    Message { link: LinkId, msg: Message<Payload> },
    FrameError { link: LinkId, error: FrameError },
    Closed { link: LinkId, why: String },
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
    #[error("connection attempt timed out")]
    Timeout,
}

/// Builds both TLS sides from the resource: our certificate and key, the
/// cluster CA as the only trust root, TLS 1.2 and 1.3 only.
pub fn link_tls(res: &Resource) -> Result<Option<LinkTls>, TlsError> {
    if res.link_security == LinkSecurity::PlaintextLab {
        tracing::warn!(resource = %res.name, "replication link is PLAINTEXT and unauthenticated (net.tls = plaintext-lab)");
        return Ok(None);
    }
    let (Some(ca), Some(cert), Some(key)) = (&res.ca, &res.local.cert, &res.local.key) else {
        unreachable!("resource validation requires CA, cert and key for mutual TLS");
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| TlsError::ClientCa { path: ca.clone(), cause: e.to_string() })?;
    }
    let roots = Arc::new(roots);
    let chain = certs(cert)?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key { path: key.clone(), cause: e.to_string() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::ClientCa { path: ca.clone(), cause: e.to_string() })?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
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

/// Connects to the peer (the lower node id does this).
pub async fn connect(
    addr: SocketAddr,
    tls: Option<&LinkTls>,
    timeout: Duration,
) -> Result<Box<dyn LinkStream>, LinkError> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|cause| LinkError::Connect { addr, cause })?;
        let _ = tcp.set_nodelay(true);
        match tls {
            None => Ok(Box::new(tcp) as Box<dyn LinkStream>),
            Some(tls) => {
                // The server's certificate must chain to the cluster CA and
                // name the peer node.
                let stream = tls.connector.connect(tls.peer_name.clone(), tcp).await.map_err(LinkError::Tls)?;
                Ok(Box::new(stream) as Box<dyn LinkStream>)
            }
        }
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| LinkError::Timeout)?
}

/// Accepts one peer connection (the higher node id does this).
pub async fn accept(
    listener: &TcpListener,
    tls: Option<&LinkTls>,
    timeout: Duration,
) -> Result<(Box<dyn LinkStream>, SocketAddr), LinkError> {
    let (tcp, from) = listener.accept().await.map_err(|cause| LinkError::Connect { addr: local(listener), cause })?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else { return Ok((Box::new(tcp), from)) };
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
    Ok((Box::new(tokio_rustls::TlsStream::Server(stream)), from))
}

fn local(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Sending side of an established link.
pub struct LinkWriter {
    urgent: mpsc::UnboundedSender<Message<Payload>>,
    bulk: mpsc::UnboundedSender<Message<Payload>>,
    tasks: [tokio::task::AbortHandle; 2],
}

impl LinkWriter {
    /// Queues a message; acks and pings go ahead of bulk data. Memory is
    /// bounded upstream (NBD in-flight budgets, resync in-flight bound).
    pub fn send(&self, msg: Message<Payload>) {
        let queue = if wire::command_of(&msg).is_urgent() { &self.urgent } else { &self.bulk };
        let _ = queue.send(msg);
    }

    /// Stops both tasks (the socket closes).
    pub fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the reader and writer tasks for an authenticated stream.
pub fn start(link: LinkId, stream: Box<dyn LinkStream>, events: mpsc::Sender<LinkEvent>) -> LinkWriter {
    let (reader, writer) = tokio::io::split(stream);
    let (urgent_tx, urgent_rx) = mpsc::unbounded_channel();
    let (bulk_tx, bulk_rx) = mpsc::unbounded_channel();
    let read_task = tokio::spawn(read_loop(link, reader, events.clone()));
    let write_task = tokio::spawn(write_loop(link, writer, urgent_rx, bulk_rx, events));
    LinkWriter { urgent: urgent_tx, bulk: bulk_tx, tasks: [read_task.abort_handle(), write_task.abort_handle()] }
}

async fn read_loop(link: LinkId, reader: impl AsyncRead + Unpin, events: mpsc::Sender<LinkEvent>) {
    // Small frames (acks, 4 KiB writes) arrive many per segment: buffered,
    // one receive takes them all instead of two per frame. Payloads larger
    // than the buffer are read straight into their own buffer.
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let budget = Arc::new(Semaphore::new((limits::REPL_RECEIVE_BYTES_MAX / RECEIVE_UNIT_BYTES) as usize));
    let mut header = [0u8; HEADER_BYTES];
    let why = loop {
        if let Err(e) = reader.read_exact(&mut header).await {
            break format!("read from the peer: {e}");
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
            break format!("read from the peer: {e}");
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
    let _ = events.send(LinkEvent::Closed { link, why }).await;
}

async fn write_loop(
    link: LinkId,
    writer: impl AsyncWrite + Unpin,
    mut urgent: mpsc::UnboundedReceiver<Message<Payload>>,
    mut bulk: mpsc::UnboundedReceiver<Message<Payload>>,
    events: mpsc::Sender<LinkEvent>,
) {
    let mut out = BufWriter::with_capacity(256 * 1024, writer);
    let why = loop {
        let msg = match urgent.try_recv() {
            Ok(m) => m,
            Err(_) => match bulk.try_recv() {
                Ok(m) => m,
                Err(_) => {
                    // Nothing queued: push out what is buffered, then wait.
                    if let Err(e) = out.flush().await {
                        break format!("write to the peer: {e}");
                    }
                    tokio::select! {
                        biased;
                        m = urgent.recv() => match m { Some(m) => m, None => return },
                        m = bulk.recv() => match m { Some(m) => m, None => return },
                    }
                }
            },
        };
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
    let _ = events.send(LinkEvent::Closed { link, why }).await;
}
