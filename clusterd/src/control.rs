//! The admin socket protocol between `clusterd` subcommands and the local
//! daemon: one JSON request line, then one JSON response line (or a stream
//! of event lines for `events`). The socket is root-only (mode 0600 and the
//! peer's uid checked with SO_PEERCRED); lines are bounded.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest request or response line accepted.
pub const LINE_MAX: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Status,
    /// Move every group to `node`.
    Promote {
        node: String,
    },
    /// Move every group `node` runs to its peer.
    Demote {
        node: String,
    },
    Move {
        group: String,
        node: String,
    },
    Standby {
        node: String,
    },
    Online {
        node: String,
    },
    Fence {
        node: String,
        /// Two-node mode: do not run fence agents; the admin confirms that
        /// `node` is off, and this node becomes the cluster log's only voter.
        #[serde(default)]
        confirm_down: bool,
    },
    /// Clear failures of `node` (all storage nodes when None).
    Cleanup {
        node: Option<String>,
    },
    Events,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Status(Box<StatusReport>),
    Done(String),
    Error(String),
    Event(EventRecord),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub cluster: String,
    pub node: String,
    pub quorum: bool,
    pub leader: Option<String>,
    pub term: u64,
    pub nodes: Vec<NodeReport>,
    pub groups: Vec<GroupReport>,
    pub fences: Vec<FenceReport>,
    pub heartbeat: HeartbeatReport,
    /// Two-node mode: what this node does about its peer (None with a witness).
    #[serde(default)]
    pub two_node: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    pub name: String,
    pub role: String,
    /// "online", "standby", "offline", or "unknown" (not heard yet).
    pub state: String,
    pub this_node: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    pub name: String,
    pub owner: Option<String>,
    pub epoch: u64,
    pub released: bool,
    /// Each storage node's disk as the cluster log records it.
    pub disks: Vec<DiskReport>,
    pub failed: Vec<String>,
    pub standby: Vec<String>,
    /// What this node does with the group: Primary, Secondary, …
    pub local_role: String,
    /// The volume as the replicator holds it here, e.g. "Primary+suspended,
    /// StandAlone, epoch 4" (None: not read yet, or the replicator does
    /// not answer); it can differ from `local_role` (issue 23).
    #[serde(default)]
    pub volume: Option<String>,
    pub writable: bool,
    pub resources: Vec<ResourceReport>,
    /// The node whose services run the group at the current epoch, as the
    /// cluster log records it (None: not served yet, or being moved).
    #[serde(default)]
    pub served_by: Option<String>,
}

/// `{"node": "a", "state": "UpToDate"}` (issue 23: was a `[node, state]`
/// pair, which scripts had to index by position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub node: String,
    /// UpToDate, Outdated or Inconsistent.
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceReport {
    pub name: String,
    pub state: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FenceReport {
    pub node: String,
    pub by: String,
    pub ok: bool,
    pub unix_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatReport {
    pub accepted: u64,
    pub malformed: u64,
    pub spoofed: u64,
    pub replayed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    pub unix_ms: u64,
    pub node: String,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the local clusterd at {path}: {cause} (is `clusterd run` running? see --control)")]
    Connect { path: String, cause: std::io::Error },
    #[error("talking to clusterd: {0}")]
    Io(#[from] std::io::Error),
    #[error("clusterd sent an unreadable answer: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("clusterd closed the connection without an answer")]
    Closed,
    #[error("a line longer than {LINE_MAX} bytes")]
    TooLong,
}

pub async fn write_line<T: Serialize>(w: &mut (impl AsyncWriteExt + Unpin), value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// Reads one line of at most `LINE_MAX` bytes; None at end of stream.
pub async fn read_line(r: &mut (impl AsyncBufReadExt + Unpin)) -> Result<Option<Vec<u8>>, ControlError> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return if line.is_empty() { Ok(None) } else { Err(ControlError::Closed) };
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > LINE_MAX {
            return Err(ControlError::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            return Ok(Some(line));
        }
    }
}

/// Connects to the daemon and sends `request`; the reader yields responses.
pub async fn connect(path: &Path, request: &Request) -> Result<BufReader<UnixStream>, ControlError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|cause| ControlError::Connect { path: path.display().to_string(), cause })?;
    write_line(&mut stream, request).await?;
    Ok(BufReader::new(stream))
}

/// One request, one response.
pub async fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let mut reader = connect(path, request).await?;
    let line = read_line(&mut reader).await?.ok_or(ControlError::Closed)?;
    Ok(serde_json::from_slice(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_objects_in_status_json() {
        let g = GroupReport {
            name: "mail".into(),
            owner: Some("a".into()),
            epoch: 3,
            released: false,
            disks: vec![
                DiskReport { node: "a".into(), state: "UpToDate".into() },
                DiskReport { node: "b".into(), state: "Outdated".into() },
            ],
            failed: Vec::new(),
            standby: Vec::new(),
            local_role: "Primary".into(),
            volume: None,
            writable: true,
            resources: Vec::new(),
            served_by: Some("a".into()),
        };
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["disks"][1], serde_json::json!({"node": "b", "state": "Outdated"}));
        assert_eq!(v["served_by"], "a");
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let (a, mut b) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            let big = vec![b'x'; LINE_MAX + 10];
            let _ = b.write_all(&big).await;
        });
        let mut r = BufReader::new(a);
        assert!(matches!(read_line(&mut r).await, Err(ControlError::TooLong)));
        writer.abort();
        let (a, mut b) = tokio::io::duplex(4096);
        write_line(&mut b, &Request::Fence { node: "b".into(), confirm_down: false }).await.unwrap();
        drop(b);
        let mut r = BufReader::new(a);
        let line = read_line(&mut r).await.unwrap().unwrap();
        assert_eq!(
            serde_json::from_slice::<Request>(&line).unwrap(),
            Request::Fence { node: "b".into(), confirm_down: false }
        );
        assert!(read_line(&mut r).await.unwrap().is_none());
    }
}
