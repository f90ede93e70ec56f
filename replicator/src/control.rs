//! The control socket: how `replicator status` talks to a running server.
//!
//! A Unix stream socket (mode 0600 in a 0700 directory) carrying one
//! request and one response, each a big-endian `u32` length followed by a
//! postcard-encoded message. The server also checks the peer's credentials:
//! only root or the server's own user may ask.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::limits;
use crate::server::stats::{ClientInfo, IoSnapshot};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    /// An admin command for the replicated resource.
    Resource(ResourceCommand),
    /// Stream a [`ControlResponse::Resource`] at every state change.
    Events,
}

/// Admin commands of `replicator up`, named after the CLI's subcommands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ResourceCommand {
    Status,
    Primary {
        force: bool,
        epoch: Option<u64>,
    },
    Secondary,
    Connect {
        discard_my_data: bool,
    },
    Disconnect,
    Verify,
    Invalidate,
    ResumeIo,
    SuspendIo,
    Outdate,
    /// Stop the resource cleanly (`up` exits as on SIGTERM); refused while
    /// NBD clients are connected.
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlResponse {
    Status(Box<StatusReport>),
    Error(String),
    Resource(Box<ResourceReport>),
    Done(String),
}

/// What `replicator status RES` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResourceReport {
    /// [`replicator_api::API_VERSION`]: readers check it before the state.
    pub api_version: u32,
    pub state: ReplicaState,
    pub clients: Vec<ClientInfo>,
    pub io: IoSnapshot,
    pub pid: u32,
}

pub use replicator_api::{ProgressReport, ReplicaState};

/// How a control request is answered: once, or as a stream.
pub enum ControlReply {
    One(ControlResponse),
    Stream(tokio::sync::mpsc::Receiver<ControlResponse>),
}

pub type ControlFuture = Pin<Box<dyn Future<Output = ControlReply> + Send>>;

/// Answers control requests; the daemon provides one.
pub type ControlHandler = Arc<dyn Fn(ControlRequest) -> ControlFuture + Send + Sync>;

/// What `replicator status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub volume: VolumeStatus,
    pub clients: Vec<ClientInfo>,
    pub io: IoSnapshot,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeStatus {
    pub disk: String,
    pub device_kind: String,
    pub meta: String,
    pub volume_uuid: String,
    pub export: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub direct_io: bool,
    pub tls: String,
    pub pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("failed to connect to control socket {path}: {cause} (is `replicator serve` running? pass --control PATH if it uses another socket)")]
    Connect { path: PathBuf, cause: std::io::Error },
    #[error("permission denied on control socket {0}: run as root or as the user running the server")]
    Permission(PathBuf),
    #[error("control socket {path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("control socket {path}: malformed message: {cause}")]
    Decode { path: PathBuf, cause: String },
    #[error("server answered with an error: {0}")]
    Server(String),
    #[error("failed to bind control socket {path}: {cause}")]
    Bind { path: PathBuf, cause: std::io::Error },
    #[error("control socket {0} is in use by a running server; stop it or pass another --control path")]
    InUse(PathBuf),
}

async fn write_message<T: Serialize>(stream: &mut UnixStream, message: &T) -> std::io::Result<()> {
    let bytes = postcard::to_stdvec(message).map_err(std::io::Error::other)?;
    stream.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    stream.write_all(&bytes).await?;
    stream.flush().await
}

async fn read_message(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if len > limits::CONTROL_MESSAGE_BYTES_MAX * 16 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "message too large"));
    }
    let mut bytes = vec![0u8; len as usize];
    stream.read_exact(&mut bytes).await?;
    Ok(bytes)
}

async fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    UnixStream::connect(path).await.map_err(|cause| {
        if cause.kind() == std::io::ErrorKind::PermissionDenied {
            ControlError::Permission(path.to_owned())
        } else {
            ControlError::Connect { path: path.to_owned(), cause }
        }
    })
}

async fn receive(stream: &mut UnixStream, path: &Path) -> Result<ControlResponse, ControlError> {
    let bytes = read_message(stream).await.map_err(|cause| {
        if cause.kind() == std::io::ErrorKind::UnexpectedEof {
            ControlError::Permission(path.to_owned())
        } else {
            ControlError::Io { path: path.to_owned(), cause }
        }
    })?;
    match postcard::from_bytes(&bytes) {
        Ok(ControlResponse::Error(message)) => Err(ControlError::Server(message)),
        Ok(response) => Ok(response),
        Err(e) => Err(ControlError::Decode { path: path.to_owned(), cause: e.to_string() }),
    }
}

/// Sends one request and returns the answer (errors from the server become
/// [`ControlError::Server`]).
pub async fn call(path: &Path, request: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let mut stream = connect(path).await?;
    write_message(&mut stream, request).await.map_err(|cause| ControlError::Io { path: path.to_owned(), cause })?;
    receive(&mut stream, path).await
}

/// Sends `request` and calls `each` for every answer until the server
/// closes the stream or `each` returns false.
pub async fn stream(
    path: &Path,
    request: &ControlRequest,
    mut each: impl FnMut(ControlResponse) -> bool,
) -> Result<(), ControlError> {
    let mut stream = connect(path).await?;
    write_message(&mut stream, request).await.map_err(|cause| ControlError::Io { path: path.to_owned(), cause })?;
    loop {
        match receive(&mut stream, path).await {
            Ok(response) => {
                if !each(response) {
                    return Ok(());
                }
            }
            Err(ControlError::Permission(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Asks the server behind `path` for its status.
pub async fn query_status(path: &Path) -> Result<StatusReport, ControlError> {
    match call(path, &ControlRequest::Status).await? {
        ControlResponse::Status(report) => Ok(*report),
        other => Err(ControlError::Server(format!("unexpected answer {other:?}"))),
    }
}

/// Binds the control socket: creates its directory (0700) if missing,
/// replaces a stale socket left by a crashed server, refuses a live one.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let bind_err = |cause| ControlError::Bind { path: path.to_owned(), cause };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(bind_err)?;
        }
    }
    let listener = crate::server::bind_unix(path).await.map_err(|cause| match cause.kind() {
        std::io::ErrorKind::AddrInUse => ControlError::InUse(path.to_owned()),
        _ => bind_err(cause),
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Answers control requests until the task is dropped.
pub async fn serve(listener: UnixListener, handler: ControlHandler) {
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let allowed = stream.peer_cred().map(|cred| cred.uid() == 0 || cred.uid() == own_uid).unwrap_or(false);
        if !allowed {
            tracing::warn!("control connection from an unauthorised user refused");
            continue;
        }
        let handler = handler.clone();
        tokio::spawn(async move {
            let request = match tokio::time::timeout(Duration::from_secs(5), read_message(&mut stream)).await {
                Ok(Ok(bytes)) => postcard::from_bytes::<ControlRequest>(&bytes),
                _ => return,
            };
            let reply = match request {
                Ok(request) => handler(request).await,
                Err(e) => ControlReply::One(ControlResponse::Error(format!("malformed request: {e}"))),
            };
            match reply {
                ControlReply::One(response) => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), write_message(&mut stream, &response)).await;
                }
                ControlReply::Stream(mut responses) => {
                    while let Some(response) = responses.recv().await {
                        if write_message(&mut stream, &response).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// The handler of a standalone `serve`: status only.
pub fn status_only(report: Arc<dyn Fn() -> StatusReport + Send + Sync>) -> ControlHandler {
    Arc::new(move |request| {
        let response = match request {
            ControlRequest::Status => ControlResponse::Status(Box::new(report())),
            _ => ControlResponse::Error(
                "this server serves a plain volume, not a replicated resource (started with `serve`, not `up`)".into(),
            ),
        };
        Box::pin(async move { ControlReply::One(response) })
    })
}
