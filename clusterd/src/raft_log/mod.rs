//! The replicated cluster log: a Raft node (the `raft` crate 0.7, default
//! protobuf codec) driven by tokio, its state on local disk, its traffic over
//! mutually authenticated TLS.
//!
//! The daemon sees a narrow interface (see `failover`'s module docs):
//! [`start`] returns a [`RaftLog`] handle and a receiver of [`LogEvent`]s.
//! The daemon proposes opaque bytes with [`RaftLog::propose`], folds the
//! payloads of `LogEvent::Committed` in order, follows `LogEvent::Quorum`,
//! replaces its folded state on `LogEvent::Restore`, and now and then hands
//! its folded state back with [`RaftLog::compact`] so the log stays short.
//!
//! Parts:
//! - `node`: the one task that owns the `RawNode`, ticks it and works through
//!   each `Ready` in raft-rs's order (persist, fsync, then send what depends
//!   on it);
//! - `storage`: `LogStore` (the `raft::Storage` the core reads, in memory)
//!   and `StateFile` (its durable mirror, one append-only file);
//! - `record`: the file's record format (pure: bytes in, state out);
//! - `quorum`: whether this node can commit right now (pure);
//! - `transport`: TLS listener and one outbound connection per peer;
//! - `tls`: certificates, and which configured peer a certificate names;
//! - `logger`: raft-rs's `slog` output forwarded to `tracing`;
//! - `limits`: every bound of this module in one place.
//!
//! Membership comes from the configuration: every node starts an empty
//! state directory with the same voter set (raft-rs's bootstrap by identical
//! initial state). The one exception is two-node mode (see `daemon`'s
//! two-node docs): after fencing its peer a node shrinks the voters to
//! itself with [`RaftLog::force_single_voter`] (no entry: there is no quorum
//! to commit one; the membership is written to the state file), and adds the
//! peer back with [`RaftLog::add_voter`] (a committed conf change) when it
//! returns. A node whose state directory
//! was removed (the fix for a corrupt state file) rejoins under its old id:
//! it clamps heartbeat commit indexes to its empty log instead of letting
//! raft-rs panic, and the leader, seeing it reject entries it had
//! acknowledged, replicates to it from scratch (entries or a snapshot).
//! Raft assumes votes are never forgotten, so remove a state directory only
//! while the other nodes are up and agree on a leader.
//!
//! **Invariant:** nothing a peer sends is decoded before its TLS handshake
//! succeeded and its certificate named a configured peer; a message is
//! attributed to a peer only through that certificate.
//! **Invariant:** a message that depends on persisted state leaves this node
//! only after that state is fsynced.

mod limits;
mod logger;
mod node;
mod quorum;
pub(crate) mod record;
mod storage;
mod tls;
mod transport;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use limits::FRAME_BYTES_MAX;
pub use transport::TransportStats;

use crate::NodeId;

/// Another voter of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftPeer {
    pub id: NodeId,
    /// The node name: the DNS name its certificate must carry.
    pub name: String,
    pub addr: SocketAddr,
}

/// This node's TLS material (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftTlsFiles {
    /// The cluster CA: the only trust root, for both directions.
    pub ca: PathBuf,
    /// This node's certificate (chain), whose DNS SAN is this node's name.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct RaftLogConfig {
    pub me: NodeId,
    pub name: String,
    pub listen: SocketAddr,
    /// The other voters (every node of the cluster votes, the witness too).
    pub peers: Vec<RaftPeer>,
    /// Local disk, never the replicated volume.
    pub state_dir: PathBuf,
    pub tls: RaftTlsFiles,
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
}

impl RaftLogConfig {
    /// A configuration with the default timing (50 ms ticks, elections
    /// after 10..20 ticks, heartbeats every 2).
    pub fn new(
        me: NodeId,
        name: String,
        listen: SocketAddr,
        peers: Vec<RaftPeer>,
        state_dir: PathBuf,
        tls: RaftTlsFiles,
    ) -> RaftLogConfig {
        RaftLogConfig { me, name, listen, peers, state_dir, tls, tick_ms: 50, election_ticks: 10, heartbeat_ticks: 2 }
    }

    /// The election timeout (its lower bound; raft randomises up to twice it).
    pub fn election_timeout_ms(&self) -> u64 {
        self.tick_ms * self.election_ticks as u64
    }
}

/// What the log tells the daemon, in order. The receiver ends (`None`) when
/// the log stopped (shutdown, a disk error, a bug in raft): the daemon must
/// then act as on `Quorum(false)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// Newly committed entries in order (one Ready's worth), each with its
    /// raft index. Empty raft entries (leader no-ops) and conf changes are
    /// not passed on.
    Committed(Vec<(u64, Vec<u8>)>),
    /// This node can commit: a leader is known (this node or another) and,
    /// for the leader, a quorum of voters was heard from within the election
    /// timeout; for a follower, it heard from the leader within the election
    /// timeout. Sent on every change (the initial value is `false`).
    Quorum(bool),
    /// The state to start from (at start-up when a snapshot exists, or when
    /// the leader sent one): the daemon replaces its folded state with
    /// `data` (which it produced through `compact`). Entries after `index`
    /// follow as `Committed`.
    Restore { index: u64, data: Vec<u8> },
}

/// A cheap view of the node, updated by the raft task.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RaftStatus {
    pub leader: Option<NodeId>,
    pub term: u64,
    pub commit: u64,
    /// The last index handed to the daemon (as `Committed` or `Restore`).
    pub applied: u64,
    /// The index the latest snapshot covers (0: none).
    pub snapshot: u64,
    pub quorum: bool,
    /// The voters of the log (all nodes, or this node alone after
    /// `force_single_voter`).
    pub voters: Vec<NodeId>,
    /// Each peer and whether this node's outbound connection to it is up.
    pub peers: Vec<(NodeId, bool)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RaftLogError {
    #[error("invalid cluster log configuration: {0}")]
    Config(String),
    #[error("failed to {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: corrupt record at byte {offset}: {why}; this node's Raft state cannot be trusted: \
         stop clusterd on this node, remove the state directory {dir} and start it again \
         (it rejoins from its peers)"
    )]
    Corrupt { path: PathBuf, dir: PathBuf, offset: u64, why: String },
    #[error("TLS material: {0}")]
    Tls(String),
    #[error("failed to listen for Raft peers on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// Maps a node to its raft id (raft reserves 0 for "none").
pub(crate) fn raft_id(node: NodeId) -> u64 {
    u64::from(node.0) + 1
}

/// The node behind a raft id, if it is one.
pub(crate) fn node_of(raft_id: u64) -> Option<NodeId> {
    raft_id.checked_sub(1).and_then(|n| u8::try_from(n).ok()).map(NodeId)
}

/// What the handle asks of the raft task.
#[derive(Debug)]
pub(crate) enum Control {
    Propose(Vec<u8>),
    Compact {
        index: u64,
        state: Vec<u8>,
    },
    /// Ask the leader to hand leadership to this node.
    LeadHere,
    ForceSingleVoter(tokio::sync::oneshot::Sender<Result<(), String>>),
    AddVoter(NodeId),
    /// Drop the connection to the peer and dial it again at once.
    Redial(NodeId),
}

/// The handle to a running node. Cheap to clone.
#[derive(Clone)]
pub struct RaftLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RaftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLog").field("local_addr", &self.inner.local_addr).field("status", &self.status()).finish()
    }
}

struct Inner {
    control: mpsc::Sender<Control>,
    status: watch::Receiver<RaftStatus>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    local_addr: SocketAddr,
    stats: Arc<transport::Counters>,
}

/// Starts the node on the current tokio runtime: reads the state directory,
/// binds the listener, spawns the raft task, the listener and one sender per
/// peer. Errors name what to fix (a corrupt state file, TLS files, the
/// listen address).
pub fn start(cfg: RaftLogConfig) -> Result<(RaftLog, mpsc::Receiver<LogEvent>), RaftLogError> {
    validate(&cfg)?;
    let tls = tls::TlsSetup::load(&cfg.tls, &cfg.peers)?;
    let (store, file, snapshot) = storage::open(&cfg)?;
    let std_listener =
        std::net::TcpListener::bind(cfg.listen).map_err(|source| RaftLogError::Listen { addr: cfg.listen, source })?;
    std_listener.set_nonblocking(true).map_err(|source| RaftLogError::Listen { addr: cfg.listen, source })?;
    let listener = tokio::net::TcpListener::from_std(std_listener)
        .map_err(|source| RaftLogError::Listen { addr: cfg.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| RaftLogError::Listen { addr: cfg.listen, source })?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (events_tx, events_rx) = mpsc::channel(limits::EVENTS_QUEUED_MAX);
    let (control_tx, control_rx) = mpsc::channel(limits::CONTROL_QUEUED_MAX);
    let (inbound_tx, inbound_rx) = mpsc::channel(limits::INBOUND_QUEUED_MAX);
    let (report_tx, report_rx) = mpsc::channel(limits::REPORTS_QUEUED_MAX);
    let stats = Arc::new(transport::Counters::default());
    let initial = RaftStatus {
        peers: cfg.peers.iter().map(|p| (p.id, false)).collect(),
        applied: snapshot.as_ref().map_or(0, |s| s.0),
        snapshot: snapshot.as_ref().map_or(0, |s| s.0),
        ..RaftStatus::default()
    };
    let (status_tx, status_rx) = watch::channel(initial);

    let tls = Arc::new(tls);
    let mut links = Vec::new();
    let mut tasks = Vec::new();
    for peer in &cfg.peers {
        let (link, task) =
            transport::spawn_sender(peer.clone(), tls.clone(), report_tx.clone(), stats.clone(), stop_rx.clone());
        links.push(link);
        tasks.push(task);
    }
    tasks.push(tokio::spawn(transport::listen(
        listener,
        tls,
        raft_id(cfg.me),
        inbound_tx,
        stats.clone(),
        stop_rx.clone(),
    )));
    let node = node::Node::new(&cfg, store, file, links, events_tx, status_tx)?;
    tasks.push(tokio::spawn(node.run(snapshot, control_rx, inbound_rx, report_rx, stop_rx)));
    tracing::info!(node = %cfg.name, listen = %local_addr, peers = cfg.peers.len(), "cluster log started");
    let inner =
        Inner { control: control_tx, status: status_rx, stop: stop_tx, tasks: Mutex::new(tasks), local_addr, stats };
    Ok((RaftLog { inner: Arc::new(inner) }, events_rx))
}

/// Resolves once `stop` says so (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn validate(cfg: &RaftLogConfig) -> Result<(), RaftLogError> {
    let bad = |m: String| Err(RaftLogError::Config(m));
    if cfg.tick_ms == 0 || cfg.heartbeat_ticks == 0 || cfg.election_ticks <= cfg.heartbeat_ticks {
        return bad(format!(
            "tick_ms ({}) and heartbeat_ticks ({}) must be positive and election_ticks ({}) larger than heartbeat_ticks",
            cfg.tick_ms, cfg.heartbeat_ticks, cfg.election_ticks
        ));
    }
    let mut ids = vec![cfg.me];
    for p in &cfg.peers {
        if ids.contains(&p.id) {
            return bad(format!("node id {} appears twice (peer {:?}); give every node its own id", p.id.0, p.name));
        }
        if p.id.0 == u8::MAX {
            return bad(format!("node id {} of peer {:?} is out of range (at most 254)", p.id.0, p.name));
        }
        ids.push(p.id);
        if p.name == cfg.name {
            return bad(format!("peer {:?} has this node's own name; list only the other nodes", p.name));
        }
    }
    Ok(())
}

impl RaftLog {
    /// Proposes `data` (fire and forget). Dropped, with a debug log, when
    /// the queue is full, there is no leader, or `data` is empty or larger
    /// than `limits::PROPOSAL_BYTES_MAX`; the daemon re-proposes on its own
    /// timers. A follower forwards the proposal to the leader.
    pub fn propose(&self, data: Vec<u8>) {
        if data.is_empty() || data.len() > limits::PROPOSAL_BYTES_MAX {
            tracing::warn!(bytes = data.len(), "cluster log: proposal dropped (empty or too large)");
            return;
        }
        if let Err(e) = self.inner.control.try_send(Control::Propose(data)) {
            tracing::debug!("cluster log: proposal dropped: {e}");
        }
    }

    /// Stores the daemon's folded state up to `applied_index` (an index it
    /// received in `Committed` or `Restore`) as the snapshot and drops the
    /// log entries it covers. Ignored when not newer than the current
    /// snapshot; dropped (debug log) when the queue is full.
    pub fn compact(&self, applied_index: u64, state: Vec<u8>) {
        if let Err(e) = self.inner.control.try_send(Control::Compact { index: applied_index, state }) {
            tracing::debug!("cluster log: compaction request dropped: {e}");
        }
    }

    /// Asks the current leader to transfer leadership to this node (the
    /// group's owner leads the log, so a cut between the two storage nodes
    /// leaves the owner with the witness, and so with quorum). A no-op on
    /// the leader or without one.
    pub fn lead_here(&self) {
        let _ = self.inner.control.try_send(Control::LeadHere);
    }

    /// The peer came back (its heartbeat is alive again): drop this node's
    /// connection to it, possibly a dead one after a reboot, and dial
    /// again without backoff.
    pub fn redial(&self, peer: NodeId) {
        let _ = self.inner.control.try_send(Control::Redial(peer));
    }

    /// Two-node mode, only after the peer was fenced (or the admin
    /// confirmed it is down): makes this node the log's only voter without
    /// a committed entry, persists the new membership (a restart keeps it),
    /// and campaigns. The quorum then returns with this node alone.
    ///
    /// Safe only because the peer is off: it cannot commit anything (it
    /// would need this node's vote) and it rejoins as a follower, its
    /// uncommitted tail replaced by this node's log. Errors when the log has
    /// other than two voters or stopped.
    pub async fn force_single_voter(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner
            .control
            .send(Control::ForceSingleVoter(tx))
            .await
            .map_err(|_| "the cluster log stopped".to_string())?;
        rx.await.map_err(|_| "the cluster log stopped".to_string())?
    }

    /// Asks the leader to add `node` back as a voter (committed conf
    /// change). A no-op unless this node leads and `node` is a configured
    /// peer that is not a voter; repeat until `status().voters` has it.
    pub fn add_voter(&self, node: NodeId) {
        let _ = self.inner.control.try_send(Control::AddVoter(node));
    }

    pub fn status(&self) -> RaftStatus {
        self.inner.status.borrow().clone()
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Counters of refused connections and dropped frames or messages.
    pub fn transport_stats(&self) -> TransportStats {
        self.inner.stats.snapshot()
    }

    /// Stops every task of this node (any clone of the handle may do it)
    /// and waits until the state file is synced and the listener closed.
    pub async fn shutdown(self) {
        let _ = self.inner.stop.send(true);
        let tasks = match self.inner.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for t in tasks {
            if let Err(e) = t.await {
                if e.is_panic() {
                    tracing::error!("cluster log task panicked: {e}");
                }
            }
        }
    }
}
