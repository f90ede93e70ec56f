//! The control socket: how `replicator status` talks to a running server.
//!
//! A Unix stream socket (mode 0600 in a 0700 directory) carrying one
//! request and one response, each a big-endian `u32` length followed by a
//! postcard-encoded message. The server also checks the peer's credentials:
//! only root or the server's own user may ask.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlResponse {
    Status(Box<StatusReport>),
    Error(String),
}

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

/// Asks the server behind `path` for its status.
pub async fn query_status(path: &Path) -> Result<StatusReport, ControlError> {
    let mut stream = UnixStream::connect(path).await.map_err(|cause| {
        if cause.kind() == std::io::ErrorKind::PermissionDenied {
            ControlError::Permission(path.to_owned())
        } else {
            ControlError::Connect { path: path.to_owned(), cause }
        }
    })?;
    let io = |cause| ControlError::Io { path: path.to_owned(), cause };
    write_message(&mut stream, &ControlRequest::Status).await.map_err(io)?;
    let bytes = read_message(&mut stream).await.map_err(|cause| {
        if cause.kind() == std::io::ErrorKind::UnexpectedEof {
            ControlError::Permission(path.to_owned())
        } else {
            ControlError::Io { path: path.to_owned(), cause }
        }
    })?;
    match postcard::from_bytes(&bytes) {
        Ok(ControlResponse::Status(report)) => Ok(*report),
        Ok(ControlResponse::Error(message)) => Err(ControlError::Server(message)),
        Err(e) => Err(ControlError::Decode { path: path.to_owned(), cause: e.to_string() }),
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
pub async fn serve(listener: UnixListener, report: Arc<dyn Fn() -> StatusReport + Send + Sync>) {
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
        let report = report.clone();
        tokio::spawn(async move {
            let exchange = async {
                let bytes = read_message(&mut stream).await?;
                let response = match postcard::from_bytes::<ControlRequest>(&bytes) {
                    Ok(ControlRequest::Status) => ControlResponse::Status(Box::new(report())),
                    Err(e) => ControlResponse::Error(format!("malformed request: {e}")),
                };
                write_message(&mut stream, &response).await
            };
            if let Ok(Err(err)) = tokio::time::timeout(Duration::from_secs(5), exchange).await {
                tracing::debug!(error = %err, "control exchange failed");
            }
        });
    }
}
