//! The NBD server shell: listeners, accept loops and graceful drain.
//!
//! [`Shared`] is everything connections share (the engine, the export, the
//! counters, the shutdown signal). [`accept_loop`] runs per listener and
//! spawns one task per client ([`connection::serve`]). [`drain`] waits for
//! connections to finish after the shutdown signal.

pub mod connection;
pub mod session;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::backing::Backing;
use crate::limits;
use crate::nbd::handshake::{ExportInfo, TlsMode};
use stats::{ClientRegistry, IoCounters};

/// State shared by every connection of one export.
pub struct Shared {
    pub backing: Backing,
    /// Set for a replicated resource: writes go through the replica, and
    /// the export is open only while this node is primary.
    pub replica: Option<crate::node::driver::ReplicaHandle>,
    pub export: ExportInfo,
    pub tls_mode: TlsMode,
    pub tls_acceptor: Option<TlsAcceptor>,
    pub counters: Arc<IoCounters>,
    pub clients: ClientRegistry,
    /// Server-wide budget of in-flight payload, in
    /// [`limits::INFLIGHT_UNIT_BYTES`] units.
    pub inflight_bytes: Arc<Semaphore>,
    /// One permit per open connection.
    pub connections: Arc<Semaphore>,
    /// Flips to `true` once: stop accepting, stop reading new requests.
    pub shutdown: watch::Sender<bool>,
}

impl Shared {
    pub fn new(backing: Backing, export: ExportInfo, tls_mode: TlsMode, tls_acceptor: Option<TlsAcceptor>) -> Shared {
        assert!(tls_mode == TlsMode::Off || tls_acceptor.is_some(), "TLS mode needs an acceptor");
        let units = limits::SERVER_INFLIGHT_BYTES_MAX / u64::from(limits::INFLIGHT_UNIT_BYTES);
        Shared {
            backing,
            replica: None,
            export,
            tls_mode,
            tls_acceptor,
            counters: Arc::new(IoCounters::default()),
            clients: ClientRegistry::default(),
            inflight_bytes: Arc::new(Semaphore::new(units as usize)),
            connections: Arc::new(Semaphore::new(limits::SERVER_CONNECTIONS_MAX)),
            shutdown: watch::channel(false).0,
        }
    }
}

/// Binds a Unix stream socket at `path`, replacing a stale socket file a
/// crashed process left behind; a live one (something accepts on it) is
/// refused with `AddrInUse`.
pub async fn bind_unix(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another server is listening there"));
            }
            std::fs::remove_file(path)?;
        }
    }
    UnixListener::bind(path)
}

/// A bound NBD listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix { listener: UnixListener, path: PathBuf },
}

impl Listener {
    /// How the readiness line and logs name this listener.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(addr) => format!("tcp {addr}"),
                Err(_) => "tcp ?".to_string(),
            },
            Listener::Unix { path, .. } => format!("unix {}", path.display()),
        }
    }
}

/// Accepts clients until shutdown. Accept errors (e.g. out of file
/// descriptors) back off instead of spinning.
pub async fn accept_loop(shared: Arc<Shared>, listener: Listener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = accept_one(&listener) => accepted,
        };
        match accepted {
            Ok(client) => {
                let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
                    tracing::warn!(limit = limits::SERVER_CONNECTIONS_MAX, "connection limit reached; refusing client");
                    continue;
                };
                IoCounters::add(&shared.counters.connections_total, 1);
                tokio::spawn(handle_client(shared.clone(), client, permit));
            }
            Err(err) => {
                tracing::warn!(error = %err, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, String),
    Unix(tokio::net::UnixStream, String),
}

async fn accept_one(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, addr) = listener.accept().await?;
            // Replies are coalesced by the writer; Nagle would only add latency.
            stream.set_nodelay(true)?;
            Ok(Accepted::Tcp(stream, addr.to_string()))
        }
        Listener::Unix { listener, path } => {
            let (stream, _) = listener.accept().await?;
            let peer = match stream.peer_cred() {
                Ok(cred) => format!("{} pid={} uid={}", path.display(), cred.pid().unwrap_or(0), cred.uid()),
                Err(_) => path.display().to_string(),
            };
            Ok(Accepted::Unix(stream, peer))
        }
    }
}

async fn handle_client(shared: Arc<Shared>, client: Accepted, _permit: OwnedSemaphorePermit) {
    let (peer, transport) = match &client {
        Accepted::Tcp(_, peer) => (peer.clone(), "tcp"),
        Accepted::Unix(_, peer) => (peer.clone(), "unix"),
    };
    let guard = shared.clients.register(peer.clone(), transport);
    tracing::info!(%peer, transport, "client connected");
    let result = match client {
        Accepted::Tcp(stream, _) => connection::serve(shared.clone(), stream, &guard).await,
        Accepted::Unix(stream, _) => connection::serve(shared.clone(), stream, &guard).await,
    };
    match result {
        Ok(()) => tracing::info!(%peer, "client disconnected"),
        Err(err) => tracing::warn!(%peer, error = %err, "client dropped"),
    }
}

/// After the shutdown signal, waits (bounded) for every connection to
/// answer its in-flight requests and close. Returns `false` on timeout.
pub async fn drain(shared: &Shared) -> bool {
    let all = limits::SERVER_CONNECTIONS_MAX as u32;
    let wait = shared.connections.acquire_many(all);
    match tokio::time::timeout(Duration::from_secs(limits::SHUTDOWN_DRAIN_SECS), wait).await {
        Ok(Ok(permits)) => {
            drop(permits);
            true
        }
        _ => false,
    }
}
