//! The admin socket: a Unix socket, mode 0600, whose clients must be root
//! (checked with SO_PEERCRED, so a loosened file mode still lets no one
//! else in). Each connection sends one request line; the daemon's loop
//! answers through a channel (one line, or a stream for `events`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc};

use super::DaemonError;
use crate::control::{read_line, write_line, EventRecord, Request, Response};

pub type AdminCall = (Request, mpsc::Sender<Response>);

pub fn listen(path: &Path, tx: mpsc::Sender<AdminCall>) -> Result<(), DaemonError> {
    let io = |what: String| move |source| DaemonError::Io { what, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    // A socket left by a previous run (a live daemon would hold the
    // cluster log's port, which failed earlier).
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(io(format!(
        "binding the admin socket {} (another clusterd running? remove the file if not)",
        path.display()
    )))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("restricting {}", path.display())))?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, tx.clone()));
                }
                Err(e) => tracing::warn!("admin socket accept: {e}"),
            }
        }
    });
    Ok(())
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<AdminCall>) {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let mut stream = BufReader::new(stream);
    // The request line is read (bounded) before refusing, so the client is
    // not cut off mid-write and sees the answer; it is decoded only for root.
    let line = read_line(&mut stream).await;
    if uid != Some(0) {
        tracing::warn!(?uid, "admin socket: refused a client that is not root");
        let _ = write_line(stream.get_mut(), &Response::Error("permission denied: run as root".into())).await;
        return;
    }
    let request = match line {
        Ok(Some(line)) => match serde_json::from_slice::<Request>(&line) {
            Ok(r) => r,
            Err(e) => {
                let _ = write_line(stream.get_mut(), &Response::Error(format!("bad request: {e}"))).await;
                return;
            }
        },
        _ => return,
    };
    let (reply_tx, mut reply_rx) = mpsc::channel(super::limits::ADMIN_REPLIES_MAX);
    if tx.send((request, reply_tx)).await.is_err() {
        return;
    }
    // One line, or many for `events`; the stream ends when the daemon
    // drops the sender or the client goes away.
    while let Some(response) = reply_rx.recv().await {
        if write_line(stream.get_mut(), &response).await.is_err() {
            return;
        }
        if !matches!(response, Response::Event(_)) {
            let _ = stream.get_mut().shutdown().await;
            return;
        }
    }
}

/// Forwards every event to one `events` client until it goes away.
pub fn stream_events(mut rx: broadcast::Receiver<EventRecord>, reply: mpsc::Sender<Response>) {
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    if reply.send(Response::Event(e)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "an events client fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}
