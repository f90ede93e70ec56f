//! `clusterd run`: the shell around the sans-IO cores. One tokio task (this
//! module's loop) owns the heartbeat core, one failover core per resource
//! group and the folded cluster state; sockets, the cluster log, the
//! replicator and the services live in their own tasks and talk to the loop
//! over channels:
//! - `heartbeat_io`: UDP sockets per path;
//! - `raft_log`: the cluster log (proposals out, committed entries in);
//! - `executor`: one task per group carrying out volume/service actions;
//! - a volume watcher per group polling `replicator status`;
//! - `admin`: the Unix admin socket;
//! - `two_node`: two-node mode (no witness): wait-for-all, fencing the dead
//!   peer, forcing the log to a single voter and adding the peer back (its
//!   module docs hold the safety argument).
//!
//! Times given to the cores are milliseconds since the daemon started
//! (monotonic); the incarnation is the wall clock at start-up.

mod admin;
mod executor;
mod heartbeat_io;
pub mod limits;
mod two_node;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replicator_api::ConnState;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};

use crate::cluster_state::{ClusterEntry, ClusterState, Folded};
use crate::config::{ClusterConfig, Mode, NodeRole};
use crate::control::{
    DiskReport, EventRecord, FenceReport, GroupReport, HeartbeatReport, NodeReport, Request, ResourceReport, Response,
    StatusReport,
};
use crate::failover::{Action, DiskState, Entry, Failover, FailoverConfig, GroupId, GroupState, Input};
use crate::fence::{AgentExit, FenceAction, FenceAgent, FencePlan, FenceProgress};
use crate::group::{self, GroupHandle, GroupSpec, Volume, VolumeStatus};
use crate::heartbeat::{Heartbeat, HeartbeatConfig, HeartbeatEvent};
use crate::raft_log::{self, LogEvent, RaftLog, RaftLogConfig, RaftPeer, RaftTlsFiles};
use crate::watchdog::{PetDecision, PetSchedule, WatchdogDevice};
use crate::NodeId;

use executor::Report;

/// Applied entries between two snapshots of the folded state.
const COMPACT_EVERY: u64 = 2000;
/// How often each group's volume state is read.
const VOLUME_POLL_MS: u64 = 200;
/// SIGTERM: how long the daemon waits for its groups to be handed over (a
/// second SIGTERM exits at once).
const DRAIN_MS_MAX: u64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
    #[error(
        "cannot bind {what} on {addr}: {source} (is another clusterd running, or is the address not on this host?)"
    )]
    Bind { what: String, addr: SocketAddr, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("cluster log: {0}")]
    Log(#[from] raft_log::RaftLogError),
}

/// Who this process is.
pub struct Options {
    pub config: ClusterConfig,
    pub node: String,
}

/// A group on a storage node.
struct GroupRt {
    id: GroupId,
    fo: Failover,
    exec: executor::ExecHandle,
    services: GroupHandle,
    /// The newest volume state read, and what the core was last told.
    volume: Option<VolumeStatus>,
    told_disk: Option<DiskState>,
    told_connected: Option<bool>,
    told_in_sync: bool,
    told_epoch: u64,
    told_role: Option<(bool, u64)>,
    fencing: bool,
    /// The epoch under which this node's services last started (None:
    /// stopped since), for `ClusterEntry::Serving`.
    services_up_epoch: Option<u64>,
    /// When `Serving` may be proposed again (it is retried until folded).
    next_serving_ms: u64,
    /// The replicator CLI for this group's volume, and the policy that
    /// reconnects it from StandAlone.
    vol: Volume,
    reconnect: group::reconnect::Reconnect,
    /// The services' last stop failed: the executor then held the volume's
    /// I/O (see `act`).
    stop_failed: bool,
}

enum Internal {
    Volume {
        group: GroupId,
        status: Option<VolumeStatus>,
    },
    FenceDone {
        group: Option<GroupId>,
        node: NodeId,
        ok: bool,
        why: String,
        reply: Option<mpsc::Sender<Response>>,
        /// Asked by two-node mode (its answer goes to `TwoNode`).
        two_node: bool,
    },
    /// `RaftLog::force_single_voter` finished.
    Forced {
        result: Result<(), String>,
        by_admin: bool,
    },
}

pub struct Daemon {
    cfg: ClusterConfig,
    me: NodeId,
    name: String,
    started: Instant,
    incarnation: u64,
    hb: Heartbeat,
    hb_io: heartbeat_io::HeartbeatSockets,
    alive: BTreeMap<NodeId, bool>,
    raft: RaftLog,
    quorum: bool,
    state: ClusterState,
    groups: Vec<GroupRt>,
    events: broadcast::Sender<EventRecord>,
    internal_tx: mpsc::Sender<Internal>,
    report_tx: mpsc::Sender<Report>,
    applied_since_compact: u64,
    next_lead_request_ms: u64,
    /// Two-node mode on a storage node: the peer and the mode's core.
    two: Option<(NodeId, two_node::TwoNode)>,
    state_dir: std::path::PathBuf,
    /// The admin waiting for `fence --confirm-down` to finish.
    confirm_reply: Option<mpsc::Sender<Response>>,
    /// The armed hardware watchdog (storage nodes, `[watchdog]`).
    watchdog: Option<(WatchdogDevice, PetSchedule)>,
    /// Per group, the last `ClusterEntry::Serving` folded: (node, epoch).
    serving: BTreeMap<GroupId, (NodeId, u64)>,
}

/// Opens the watchdog as `[watchdog]` says, on a storage node: one log line
/// when it is not used; an error only when it is required.
fn open_watchdog(cfg: &ClusterConfig, role: NodeRole) -> Result<Option<WatchdogDevice>, DaemonError> {
    use crate::config::WatchdogMode;
    let wd = &cfg.watchdog;
    if role != NodeRole::Storage {
        tracing::info!("watchdog: not used on the witness (it holds no group)");
        return Ok(None);
    }
    match wd.mode {
        WatchdogMode::Off => {
            tracing::info!("watchdog: off (watchdog.mode = \"off\")");
            return Ok(None);
        }
        WatchdogMode::Auto if !wd.device.exists() => {
            tracing::info!(
                "watchdog: disabled: {} does not exist (watchdog.mode = \"auto\"; load a watchdog driver, e.g. softdog, to use it)",
                wd.device.display()
            );
            return Ok(None);
        }
        WatchdogMode::Auto | WatchdogMode::Required => {}
    }
    match WatchdogDevice::open(&wd.device, wd.timeout_ms) {
        Ok(dev) => {
            tracing::info!(
                device = %wd.device.display(),
                timeout_ms = wd.timeout_ms,
                driver_timeout_s = ?dev.timeout_s(),
                mode = ?wd.mode,
                "watchdog: armed; petted only while this node's groups are safe"
            );
            Ok(Some(dev))
        }
        Err(e) if wd.mode == WatchdogMode::Auto => {
            tracing::warn!("watchdog: disabled: {e} (watchdog.mode = \"auto\")");
            Ok(None)
        }
        Err(e) => Err(DaemonError::Config(format!(
            "{e}; watchdog.mode = \"required\" needs it on every storage node (load the driver, or set mode = \"auto\" and configure fencing)"
        ))),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn cluster_id(name: &str) -> u64 {
    let digest = Sha256::digest(name.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The storage nodes' ids (the replication pair), in configuration order.
fn storage_ids(cfg: &ClusterConfig) -> Vec<NodeId> {
    cfg.nodes.iter().enumerate().filter(|(_, n)| n.role == NodeRole::Storage).map(|(i, _)| NodeId(i as u8)).collect()
}

pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let cfg = opts.config;
    let Some((me, node)) = cfg.node(&opts.node) else {
        return Err(DaemonError::Config(format!(
            "node {:?} is not in the configuration; pass --node with one of: {}",
            opts.node,
            cfg.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
        )));
    };
    let node = node.clone();
    let two = match cfg.mode() {
        Mode::Witness => None,
        _ if node.role != NodeRole::Storage => None,
        mode => {
            let peer = *storage_ids(&cfg).iter().find(|n| **n != me).expect("two storage nodes");
            let policy = if mode == Mode::TwoNodeFenced && cfg.failover.automatic {
                two_node::Policy::Fenced
            } else {
                two_node::Policy::Manual
            };
            let tn_cfg = two_node::TwoNodeConfig {
                peer_name: cfg.nodes[usize::from(peer.0)].name.clone(),
                policy,
                fence_delay_ms: cfg.fence_delay_ms_for(&node.name),
            };
            tracing::info!(?policy, fence_delay_ms = tn_cfg.fence_delay_ms, "two-node mode (no witness)");
            Some((peer, two_node::TwoNode::new(tn_cfg, 0)))
        }
    };
    let key = std::fs::read(&cfg.cluster.key_file).map_err(|source| DaemonError::Io {
        what: format!(
            "reading the cluster key {} (create it with `head -c 32 /dev/urandom > {0}` on one node and copy it to all)",
            cfg.cluster.key_file.display()
        ),
        source,
    })?;
    if key.len() < 16 {
        return Err(DaemonError::Config(format!(
            "{}: the cluster key has {} bytes; use at least 16 random bytes",
            cfg.cluster.key_file.display(),
            key.len()
        )));
    }
    let started = Instant::now();
    let incarnation = unix_ms();
    let paths = node.heartbeat.len() as u8;
    let hb = Heartbeat::new(
        HeartbeatConfig {
            me,
            peers: (0..cfg.nodes.len() as u8).map(NodeId).filter(|n| *n != me).collect(),
            paths,
            cluster_id: cluster_id(&cfg.cluster.name),
            key,
            incarnation,
            interval_ms: cfg.heartbeat.interval_ms,
            deadtime_ms: cfg.heartbeat.deadtime_ms,
            warntime_ms: cfg.heartbeat.warntime_ms,
            initdead_ms: cfg.heartbeat.initdead_ms,
        },
        0,
    );
    let (dgram_tx, mut dgram_rx) = mpsc::channel(limits::DATAGRAMS_MAX);
    let hb_io = heartbeat_io::HeartbeatSockets::bind(
        &node.heartbeat,
        cfg.nodes.iter().map(|n| n.heartbeat.clone()).collect(),
        dgram_tx,
    )
    .await?;

    std::fs::create_dir_all(&node.state_dir).map_err(|source| DaemonError::Io {
        what: format!("creating the state directory {}", node.state_dir.display()),
        source,
    })?;
    let (raft, mut log_rx) = raft_log::start(RaftLogConfig {
        me,
        name: node.name.clone(),
        listen: node.raft,
        peers: cfg
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != usize::from(me.0))
            .map(|(i, n)| RaftPeer { id: NodeId(i as u8), name: n.name.clone(), addr: n.raft })
            .collect(),
        state_dir: node.state_dir.join("log"),
        tls: RaftTlsFiles { ca: cfg.cluster.ca.clone(), cert: node.cert(), key: node.key() },
        tick_ms: 50,
        election_ticks: 10,
        heartbeat_ticks: 2,
    })?;

    let (events, _) = broadcast::channel(limits::EVENTS_MAX);
    let (internal_tx, mut internal_rx) = mpsc::channel(limits::INTERNAL_MAX);
    let (report_tx, mut report_rx) = mpsc::channel(limits::REPORTS_MAX);
    let storage = storage_ids(&cfg);
    let specs: Vec<GroupSpec> = if node.role == NodeRole::Storage {
        cfg.groups
            .iter()
            .map(|g| g.validate(true))
            .collect::<Result<_, _>>()
            .map_err(|e| DaemonError::Config(format!("group: {e}")))?
    } else {
        Vec::new()
    };
    let group_states: Vec<GroupState> =
        (0..cfg.groups.len()).map(|i| GroupState::new(GroupId(i as u16), &storage, DiskState::UpToDate)).collect();
    let mut daemon = Daemon {
        me,
        name: node.name.clone(),
        started,
        incarnation,
        hb,
        hb_io,
        alive: BTreeMap::new(),
        raft,
        quorum: false,
        state: ClusterState::new(group_states),
        groups: Vec::new(),
        events,
        internal_tx,
        report_tx,
        applied_since_compact: 0,
        next_lead_request_ms: 0,
        two,
        state_dir: node.state_dir.clone(),
        confirm_reply: None,
        watchdog: None,
        serving: BTreeMap::new(),
        cfg,
    };
    for (i, spec) in specs.into_iter().enumerate() {
        daemon.start_group(GroupId(i as u16), spec, &node.state_dir);
    }
    let (admin_tx, mut admin_rx) = mpsc::channel(limits::ADMIN_REQUESTS_MAX);
    admin::listen(&node.control, admin_tx)?;
    // Armed last: an error above exits before anything could reset the node.
    if let Some(dev) = open_watchdog(&daemon.cfg, node.role)? {
        let now = daemon.now_ms();
        daemon.watchdog = Some((dev, PetSchedule::new(daemon.cfg.watchdog.timeout_ms, now)));
    }
    daemon.event(None, "start", format!("clusterd started on {} (incarnation {incarnation})", daemon.name));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| DaemonError::Io { what: "installing the SIGTERM handler".into(), source })?;
    let mut log_open = true;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        daemon.flush();
        daemon.announce_serving();
        daemon.pet_watchdog();
        if let Some(deadline) = drain_deadline {
            let drained = daemon.groups.iter().all(|g| g.fo.drained());
            if drained || Instant::now() >= deadline {
                let how = if drained { "groups handed over" } else { "drain timed out; groups left as they are" };
                daemon.event(None, "stop", format!("SIGTERM: {how}; exiting"));
                daemon.close_watchdog();
                daemon.raft.clone().shutdown().await;
                return Ok(());
            }
        }
        let mut wake = daemon.next_timeout();
        if drain_deadline.is_some() {
            wake = wake.min(Instant::now() + Duration::from_millis(VOLUME_POLL_MS));
        }
        tokio::select! {
            Some(d) = dgram_rx.recv() => {
                let now = daemon.now_ms();
                daemon.hb.handle_datagram(now, d.path, &d.bytes);
            }
            ev = log_rx.recv(), if log_open => match ev {
                Some(ev) => daemon.log_event(ev),
                None => {
                    // A disk error or a bug stopped the log: nothing can be
                    // committed any more, so act as without quorum.
                    log_open = false;
                    daemon.event(None, "error", "the cluster log stopped (see the log above); acting as without quorum".into());
                    daemon.log_event(LogEvent::Quorum(false));
                }
            },
            Some(r) = report_rx.recv() => daemon.report(r),
            Some(i) = internal_rx.recv() => daemon.internal(i),
            Some((req, reply)) = admin_rx.recv() => daemon.admin(req, reply),
            _ = tokio::time::sleep_until(wake.into()) => daemon.timeout(),
            _ = term.recv() => {
                if drain_deadline.is_some() {
                    daemon.event(None, "stop", "second SIGTERM: exiting without waiting for the drain".into());
                    daemon.close_watchdog();
                    daemon.raft.clone().shutdown().await;
                    return Ok(());
                }
                // Hand the groups over in order, as for standby: leaving
                // them running would let the lease lapse under services
                // that still write.
                daemon.event(None, "stop", "SIGTERM: handing the groups over before exiting".into());
                drain_deadline = Some(Instant::now() + Duration::from_millis(DRAIN_MS_MAX));
                let now = daemon.now_ms();
                for g in &mut daemon.groups {
                    g.fo.drain(now);
                }
            }
        }
    }
}

impl Daemon {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn node_name(&self, n: NodeId) -> String {
        self.cfg.nodes.get(usize::from(n.0)).map(|n| n.name.clone()).unwrap_or_else(|| format!("node{}", n.0))
    }

    fn start_group(&mut self, id: GroupId, spec: GroupSpec, state_dir: &std::path::Path) {
        let storage = storage_ids(&self.cfg);
        let peer = *storage.iter().find(|n| **n != self.me).expect("two storage nodes");
        let fo_cfg = FailoverConfig {
            group: id,
            me: self.me,
            peer,
            renew_interval_ms: self.cfg.failover.renew_interval_ms,
            lease_ms: self.cfg.failover.lease_ms,
            drift_margin_ms: self.cfg.drift_margin_ms(),
            takeover_after_ms: self.cfg.heartbeat.deadtime_ms,
            peer_preferred: spec.preferred.as_deref() == Some(self.node_name(peer).as_str()),
            failback: self.cfg.failover.failback,
            failback_after_ms: self.cfg.failover.failback_after_ms,
            repropose_ms: 500,
            fence_configured: self.cfg.fences.iter().any(|f| f.node == self.node_name(peer)),
            incarnation: self.incarnation,
            failures_max: self.cfg.failover.failures_max,
            failure_window_ms: self.cfg.failover.failure_window_ms,
            // Half the lease: the validated lease > 2 × renew_interval keeps
            // it below lease - renew_interval.
            stop_budget_ms: self.cfg.failover.lease_ms / 2,
            peer_watchdog_ms: self.cfg.watchdog.peer_watchdog_ms(),
        };
        let mut ctx = group::GroupContext::new(state_dir.join("run"));
        ctx.node = Some(self.name.clone());
        ctx.unknown_state = true;
        let volume = Volume::new(&spec, Some(self.name.clone()));
        let vol_for_reconnect = volume.clone();
        let (services, service_events) = group::spawn(spec.clone(), ctx);
        let exec = executor::spawn(id, volume.clone(), services.clone(), service_events, self.report_tx.clone());
        // Poll the volume's state.
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(VOLUME_POLL_MS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let status = match volume.status().await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::debug!(group = ?id, "volume status: {e}");
                        None
                    }
                };
                // Waits while the loop is behind (see `limits`).
                if tx.send(Internal::Volume { group: id, status }).await.is_err() {
                    return;
                }
            }
        });
        let fo = Failover::new(fo_cfg, self.state.groups[usize::from(id.0)].clone(), DiskState::Inconsistent, 0);
        self.groups.push(GroupRt {
            id,
            fo,
            exec,
            services,
            volume: None,
            told_disk: None,
            told_connected: None,
            told_in_sync: false,
            told_epoch: 0,
            told_role: None,
            fencing: false,
            services_up_epoch: None,
            next_serving_ms: 0,
            vol: vol_for_reconnect,
            reconnect: Default::default(),
            stop_failed: false,
        });
    }

    fn event(&self, group: Option<GroupId>, kind: &str, message: String) {
        let message = match group.and_then(|g| self.cfg.groups.get(usize::from(g.0))) {
            Some(g) => format!("{}: {message}", g.name),
            None => message,
        };
        tracing::info!(kind, "{message}");
        let _ =
            self.events.send(EventRecord { unix_ms: unix_ms(), node: self.name.clone(), kind: kind.into(), message });
    }

    fn next_timeout(&self) -> Instant {
        let mut t = self.hb.poll_timeout();
        for g in &self.groups {
            if let Some(at) = g.fo.poll_timeout() {
                t = t.min(at);
            }
        }
        if let Some(at) = self.two.as_ref().and_then(|(_, tn)| tn.poll_timeout()) {
            t = t.min(at);
        }
        if let Some((_, pets)) = &self.watchdog {
            t = t.min(pets.poll_timeout());
        }
        self.started + Duration::from_millis(t)
    }

    /// A primary whose services run records that in the log (once per
    /// epoch, again if it is missing, e.g. after a snapshot restore).
    fn announce_serving(&mut self) {
        if !self.quorum {
            return;
        }
        let now = self.now_ms();
        let me = self.me;
        for g in &mut self.groups {
            let Some(epoch) = g.fo.promoted_epoch() else { continue };
            if g.services_up_epoch != Some(epoch) || !g.fo.writable() {
                continue;
            }
            if self.serving.get(&g.id) == Some(&(me, epoch)) || now < g.next_serving_ms {
                continue;
            }
            g.next_serving_ms = now + 1000;
            self.raft.propose(ClusterEntry::Serving { group: g.id, epoch, node: me }.encode());
        }
    }

    /// Pets the watchdog when due and every group's core allows it (from
    /// this loop: a hung loop stops petting too).
    fn pet_watchdog(&mut self) {
        let now = self.now_ms();
        let holding: Vec<GroupId> = self.groups.iter().filter(|g| !g.fo.watchdog_may_pet(now)).map(|g| g.id).collect();
        let Some((dev, pets)) = self.watchdog.as_mut() else { return };
        match pets.poll(now, holding.is_empty()) {
            PetDecision::Pet => {
                if let Err(e) = dev.pet() {
                    // Nothing else to do: the hardware resets the node if
                    // the keepalives stay lost.
                    tracing::error!("{e}");
                }
            }
            PetDecision::Wait => {}
            PetDecision::HoldBack { first: true, reset_at_ms } => {
                let group = holding.first().copied();
                self.event(
                    group,
                    "watchdog",
                    format!(
                        "not petting the watchdog: the group is held without a valid lease or its stop failed; the hardware resets this node in {} ms unless it stops",
                        reset_at_ms.saturating_sub(now)
                    ),
                );
            }
            PetDecision::HoldBack { .. } => {}
        }
    }

    /// Exiting: disarm the watchdog (magic close) only if this node holds
    /// nothing; otherwise leave it armed, so the hardware resets a node that
    /// leaves a group running unsupervised.
    fn close_watchdog(&mut self) {
        let now = self.now_ms();
        let safe = self.groups.iter().all(|g| g.fo.watchdog_may_pet(now) && g.fo.drained());
        let Some((dev, _)) = self.watchdog.as_mut() else { return };
        if safe {
            dev.close_disarmed();
        } else {
            let path = dev.path().display().to_string();
            self.event(
                None,
                "watchdog",
                format!("exiting with a group still held: the watchdog {path} stays armed and resets this node"),
            );
        }
    }

    fn timeout(&mut self) {
        let now = self.now_ms();
        self.hb.handle_timeout(now);
        for g in &mut self.groups {
            g.fo.handle_timeout(now);
        }
        self.two_node_log_view();
        if let Some((_, tn)) = &mut self.two {
            tn.handle_timeout(now);
        }
        // The owner of a group leads the log: a cut between the storage
        // nodes then leaves it with the witness, i.e. with quorum.
        let owner = self.groups.iter().any(|g| g.fo.promoted_epoch().is_some());
        if owner && self.quorum && now >= self.next_lead_request_ms {
            let leader = self.raft.status().leader;
            if leader.is_some() && leader != Some(self.me) {
                self.next_lead_request_ms = now + 1000;
                self.raft.lead_here();
            }
        }
    }

    fn tell_groups(&mut self, input: Input) {
        let now = self.now_ms();
        for g in &mut self.groups {
            g.fo.handle(now, input.clone());
        }
    }

    /// Sends what the cores produced: heartbeats, liveness, actions.
    fn flush(&mut self) {
        loop {
            let mut progress = false;
            while let Some(t) = self.hb.poll_transmit() {
                self.hb_io.send(&t);
                progress = true;
            }
            while let Some(ev) = self.hb.poll_event() {
                progress = true;
                match ev {
                    HeartbeatEvent::PeerAlive(n) => {
                        // Back after being dead (a reboot): the log's
                        // connection to it may be a dead one; dial again.
                        if self.alive.get(&n) == Some(&false) {
                            self.raft.redial(n);
                        }
                        self.alive.insert(n, true);
                        self.event(None, "node-up", format!("{} is alive", self.node_name(n)));
                        self.tell_groups(Input::PeerAlive(n));
                        self.two_node_peer(n, true);
                    }
                    HeartbeatEvent::PeerDead(n) => {
                        self.alive.insert(n, false);
                        self.event(
                            None,
                            "node-down",
                            format!("{} is dead (no heartbeat on any path)", self.node_name(n)),
                        );
                        self.tell_groups(Input::PeerDead(n));
                        self.two_node_peer(n, false);
                    }
                    HeartbeatEvent::PeerLate { node, silent_ms } => {
                        tracing::warn!(node = %self.node_name(node), silent_ms, "heartbeat late");
                    }
                    HeartbeatEvent::PathUp { node, path } => {
                        tracing::info!(node = %self.node_name(node), path, "heartbeat path up");
                    }
                    HeartbeatEvent::PathDown { node, path } => {
                        self.event(
                            None,
                            "path-down",
                            format!("heartbeat path {path} to {} is down", self.node_name(node)),
                        );
                    }
                }
            }
            for i in 0..self.groups.len() {
                while let Some(action) = self.groups[i].fo.poll_action() {
                    progress = true;
                    self.act(i, action);
                }
            }
            while let Some(action) = self.two.as_mut().and_then(|(_, tn)| tn.poll_action()) {
                progress = true;
                self.two_node_act(action);
            }
            if !progress {
                return;
            }
        }
    }

    fn act(&mut self, i: usize, action: Action) {
        let id = self.groups[i].id;
        match action {
            Action::Propose(entry) => self.raft.propose(ClusterEntry::Group(entry).encode()),
            Action::Fence { node } => {
                self.groups[i].fencing = true;
                self.event(Some(id), "fence", format!("fencing {} before taking over", self.node_name(node)));
                self.fence(Some(id), node, None, false);
            }
            other => {
                if matches!(other, Action::Promote { .. } | Action::Demote | Action::StopServices) {
                    self.event(Some(id), "action", format!("{other:?}"));
                }
                // A retried stop after a failed one, while the core holds
                // the lease and counts the volume writable (a planned
                // release): the executor held the volume's I/O at the
                // failure, and services living on the volume would hang on
                // that hold in their stop; lift it first. (Without a lease
                // the core freezes, and `writable` is false.)
                if other == Action::StopServices && self.groups[i].stop_failed && self.groups[i].fo.writable() {
                    self.groups[i].exec.send(Action::Resume);
                }
                if !self.groups[i].exec.send(other) && self.groups[i].exec.dropped > 0 {
                    let dropped = self.groups[i].exec.dropped;
                    self.event(Some(id), "error", format!("executor stuck: {dropped} action(s) dropped"));
                }
            }
        }
    }

    /// Runs the fence levels configured for `node` in a blocking task.
    fn fence(&self, group: Option<GroupId>, node: NodeId, reply: Option<mpsc::Sender<Response>>, two_node: bool) {
        let target = self.node_name(node);
        let mut levels: BTreeMap<u32, Vec<FenceAgent>> = BTreeMap::new();
        for (i, f) in self.cfg.fences.iter().enumerate().filter(|(_, f)| f.node == target) {
            levels.entry(f.level).or_default().push(FenceAgent {
                name: format!("fence{}:{}", i + 1, f.agent.display()),
                path: f.agent.clone(),
                args: f.args.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                timeout_ms: f.timeout_ms,
            });
        }
        let tx = self.internal_tx.clone();
        let plan = FencePlan::new(&target, FenceAction::Off, levels.into_values().collect());
        tokio::task::spawn_blocking(move || {
            let (ok, why) = match plan {
                Err(e) => (false, e.to_string()),
                Ok(mut plan) => loop {
                    let Some(request) = plan.next_request() else {
                        break (false, format!("no fence device is configured for {target}; add a [[fence]] for it"));
                    };
                    let exit: AgentExit = crate::fence::run_agent(&request);
                    match plan.handle_exit(&exit) {
                        FenceProgress::Continue => {}
                        FenceProgress::Fenced => break (true, format!("{target} fenced")),
                        FenceProgress::Failed(errors) => break (false, errors.join("; ")),
                    }
                },
            };
            // A blocking thread: waits while the loop's queue is full.
            let _ = tx.blocking_send(Internal::FenceDone { group, node, ok, why, reply, two_node });
        });
    }

    fn internal(&mut self, i: Internal) {
        match i {
            Internal::Volume { group, status } => self.volume_seen(group, status),
            Internal::Forced { result, by_admin } => self.forced(result, by_admin),
            Internal::FenceDone { group, node, ok, why, reply, two_node } => {
                self.event(group, if ok { "fenced" } else { "fence-failed" }, why.clone());
                self.raft.propose(ClusterEntry::Fenced { node, by: self.me, ok, unix_ms: unix_ms() }.encode());
                if two_node {
                    let now = self.now_ms();
                    if let Some((_, tn)) = &mut self.two {
                        tn.handle_fence_done(now, ok, &why);
                    }
                }
                if let Some(g) = group.and_then(|g| self.groups.iter_mut().find(|x| x.id == g)) {
                    g.fencing = false;
                    let now = self.started.elapsed().as_millis() as u64;
                    g.fo.handle(now, Input::FenceDone { node, ok });
                }
                if let Some(reply) = reply {
                    let r = if ok { Response::Done(why) } else { Response::Error(format!("fencing failed: {why}")) };
                    let _ = reply.try_send(r);
                }
            }
        }
    }

    /// Tells a group's core what changed in the volume's state.
    fn volume_seen(&mut self, group: GroupId, status: Option<VolumeStatus>) {
        let now = self.now_ms();
        if let Some(s) = &status {
            self.reconnect_if_standalone(group, s);
        }
        let Some(g) = self.groups.iter_mut().find(|g| g.id == group) else { return };
        g.volume = status.clone();
        let Some(s) = status else {
            // The replicator does not answer: its disk cannot be trusted.
            if g.told_disk != Some(DiskState::Inconsistent) {
                g.told_disk = Some(DiskState::Inconsistent);
                g.fo.handle(now, Input::LocalDisk(DiskState::Inconsistent));
            }
            if g.told_connected != Some(false) {
                g.told_connected = Some(false);
                g.told_in_sync = false;
                g.fo.handle(now, Input::Replication { connected: false });
            }
            return;
        };
        if g.told_epoch != s.epoch {
            g.told_epoch = s.epoch;
            g.fo.handle(now, Input::VolumeEpoch(s.epoch));
        }
        // The role as the replicator holds it: a primary left behind (a
        // failed demotion, an admin's command) is demoted again by the core.
        let role = (s.is_primary(), s.epoch);
        if g.told_role != Some(role) {
            g.told_role = Some(role);
            g.fo.handle(now, Input::VolumeRole { primary: role.0, epoch: role.1 });
        }
        let disk = s.disk_state().unwrap_or(DiskState::Inconsistent);
        if g.told_disk != Some(disk) {
            g.told_disk = Some(disk);
            g.fo.handle(now, Input::LocalDisk(disk));
        }
        // Writes reach the peer once the handshake is over (also while a
        // resync runs).
        let connected = s.connection.replicates_writes();
        if g.told_connected != Some(connected) {
            g.told_connected = Some(connected);
            g.told_in_sync = false;
            g.fo.handle(now, Input::Replication { connected });
        }
        let in_sync = connected
            && s.connection == ConnState::Connected
            && disk == DiskState::UpToDate
            && s.peer_disk_state() == Some(DiskState::UpToDate);
        if in_sync && !g.told_in_sync {
            g.told_in_sync = true;
            g.fo.handle(now, Input::PeerInSync);
        } else if !in_sync {
            g.told_in_sync = false;
        }
    }

    /// A StandAlone volume whose peer is alive again is reconnected, unless
    /// its last error leaves the decision to the admin (split brain): see
    /// `group::reconnect`.
    fn reconnect_if_standalone(&mut self, group: GroupId, s: &VolumeStatus) {
        use group::reconnect::Verdict;
        let now = self.now_ms();
        let Some(g) = self.groups.iter_mut().find(|g| g.id == group) else { return };
        let peer_alive = self.alive.get(&g.fo.config().peer) == Some(&true);
        match g.reconnect.poll(now, s, peer_alive) {
            Verdict::Nothing | Verdict::Wait | Verdict::Admin { first: false, .. } => {}
            Verdict::Admin { cause, first: true } => {
                let fix = cause.fix().replace("RES", &g.vol.resource);
                self.event(Some(group), "standalone", format!("volume StandAlone, left to the admin: {fix}"));
            }
            Verdict::Connect => {
                let vol = g.vol.clone();
                let report = self.report_tx.clone();
                let why = s.last_error.clone().unwrap_or_default();
                self.event(
                    Some(group),
                    "reconnect",
                    format!("volume StandAlone ({why}) while the peer is alive: replicator connect"),
                );
                tokio::spawn(async move {
                    let message = match group::reconnect::connect(&vol).await {
                        Ok(()) => "replicator connect done; the handshake decides the resync".to_string(),
                        Err(e) => e,
                    };
                    let _ = report.send(Report::Event { group, kind: "reconnect", message }).await;
                });
            }
        }
    }

    fn report(&mut self, r: Report) {
        let now = self.now_ms();
        match r {
            Report::Demoted(id) => {
                if let Some(g) = self.groups.iter_mut().find(|g| g.id == id) {
                    g.fo.handle(now, Input::Demoted);
                }
            }
            Report::Promoted { group, epoch } => {
                if let Some(g) = self.groups.iter_mut().find(|g| g.id == group) {
                    g.fo.handle(now, Input::Promoted { epoch });
                }
            }
            Report::PromoteRefused { group, epoch } => {
                if let Some(g) = self.groups.iter_mut().find(|g| g.id == group) {
                    g.fo.handle(now, Input::PromoteRefused { epoch });
                }
            }
            Report::ServicesStopped { group, stopped } => {
                if let Some(g) = self.groups.iter_mut().find(|g| g.id == group) {
                    g.services_up_epoch = None;
                    g.stop_failed = !stopped;
                    g.fo.handle(now, Input::ServicesStopped { stopped });
                }
            }
            Report::Started(group) => {
                if let Some(g) = self.groups.iter_mut().find(|g| g.id == group) {
                    g.services_up_epoch = g.fo.promoted_epoch();
                }
            }
            Report::ResourceFailed(id) => {
                if let Some(g) = self.groups.iter_mut().find(|g| g.id == id) {
                    g.fo.handle(now, Input::ResourceFailed);
                }
            }
            Report::Event { group, kind, message } => self.event(Some(group), kind, message),
        }
    }

    fn log_event(&mut self, ev: LogEvent) {
        match ev {
            LogEvent::Quorum(q) => {
                if q != self.quorum {
                    self.quorum = q;
                    self.event(None, "quorum", if q { "quorum gained".into() } else { "quorum LOST".into() });
                }
                self.tell_groups(Input::Quorum(q));
                self.two_node_log_view();
            }
            LogEvent::Committed(entries) => {
                let mut per_group: BTreeMap<GroupId, Vec<Entry>> = BTreeMap::new();
                let mut moves = Vec::new();
                for (index, bytes) in entries {
                    self.applied_since_compact += 1;
                    let entry = match ClusterEntry::decode(&bytes) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::error!(index, "skipping a log entry: {e}");
                            self.state.applied = self.state.applied.max(index);
                            continue;
                        }
                    };
                    match self.state.apply(index, entry) {
                        Ok(Folded::Group { group, entry, .. }) => per_group.entry(group).or_default().push(entry),
                        Ok(Folded::Move { group, epoch, to }) => moves.push((group, epoch, to)),
                        Ok(Folded::Fenced(r)) => {
                            tracing::info!(node = %self.node_name(r.node), ok = r.ok, "fence recorded")
                        }
                        Ok(Folded::Serving { group, epoch, node }) => {
                            self.serving.insert(group, (node, epoch));
                        }
                        Err(e) => tracing::error!(index, "skipping a log entry: {e}"),
                    }
                }
                let now = self.now_ms();
                for g in &mut self.groups {
                    if let Some(entries) = per_group.remove(&g.id) {
                        g.fo.handle(now, Input::Committed(entries));
                    }
                }
                for (group, epoch, to) in moves {
                    let me = self.me;
                    if let Some(g) = self.groups.iter_mut().find(|g| g.id == group) {
                        if to != me && g.fo.promoted_epoch() == Some(epoch) {
                            let released = g.fo.release(now);
                            let msg = if released {
                                "planned move: stopping services and demoting".to_string()
                            } else {
                                "planned move refused: the peer cannot take the group (standby, failed or not UpToDate)"
                                    .to_string()
                            };
                            self.event(Some(group), "move", msg);
                        }
                    }
                }
                if self.applied_since_compact >= COMPACT_EVERY {
                    self.applied_since_compact = 0;
                    self.raft.compact(self.state.applied, self.state.snapshot());
                }
            }
            LogEvent::Restore { index, data } => match ClusterState::restore(&data, self.cfg.groups.len()) {
                Ok(mut state) => {
                    state.applied = index;
                    self.state = state;
                    let now = self.now_ms();
                    for g in &mut self.groups {
                        // A fresh core from the snapshot: it stops the group
                        // here first, as at start-up.
                        let cfg = g.fo_config();
                        let disk = g.told_disk.unwrap_or(DiskState::Inconsistent);
                        g.fo = Failover::new(cfg, self.state.groups[usize::from(g.id.0)].clone(), disk, now);
                        g.told_role = None;
                        g.fo.handle(now, Input::Quorum(self.quorum));
                    }
                    self.event(None, "restore", format!("cluster state restored from a snapshot at index {index}"));
                }
                Err(e) => tracing::error!("ignoring a snapshot: {e}"),
            },
        }
    }

    fn admin(&mut self, req: Request, reply: mpsc::Sender<Response>) {
        let answer = match req {
            Request::Status => {
                // Resource states come from the groups' tasks.
                let mut report = self.status();
                let handles: Vec<(usize, GroupHandle)> =
                    self.groups.iter().map(|g| (usize::from(g.id.0), g.services.clone())).collect();
                tokio::spawn(async move {
                    for (i, resources) in resource_reports(handles).await {
                        if let Some(g) = report.groups.get_mut(i) {
                            g.resources = resources;
                        }
                    }
                    let _ = reply.send(Response::Status(Box::new(report))).await;
                });
                return;
            }
            Request::Events => return admin::stream_events(self.events.subscribe(), reply),
            Request::Fence { node, confirm_down: true } => match self.confirm_down(&node) {
                Ok(()) => {
                    self.confirm_reply = Some(reply);
                    return;
                }
                Err(e) => Response::Error(e),
            },
            // `cleanup GROUP` (a name that is a group, not a node).
            Request::Cleanup { node: Some(name) }
                if self.storage_node(&name).is_err() && self.group_id(&name).is_ok() =>
            {
                match self.cleanup_group(&name) {
                    Ok(m) => Response::Done(m),
                    Err(e) => Response::Error(e),
                }
            }
            Request::Fence { node, confirm_down: false } => match self.storage_node(&node) {
                Ok(n) => {
                    self.event(None, "fence", format!("admin fences {node}"));
                    return self.fence(None, n, Some(reply), false);
                }
                Err(e) => Response::Error(e),
            },
            other => match self.admin_change(other) {
                Ok(message) => Response::Done(message),
                Err(e) => Response::Error(e),
            },
        };
        let _ = reply.try_send(answer);
    }

    fn storage_node(&self, name: &str) -> Result<NodeId, String> {
        match self.cfg.node(name) {
            Some((id, n)) if n.role == NodeRole::Storage => Ok(id),
            Some(_) => Err(format!("{name} is the witness, which runs no resources; name a storage node")),
            None => Err(format!(
                "no node {name:?} in the configuration (nodes: {})",
                self.cfg.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    fn group_id(&self, name: &str) -> Result<GroupId, String> {
        self.cfg.groups.iter().position(|g| g.name == name).map(|i| GroupId(i as u16)).ok_or_else(|| {
            format!(
                "no group {name:?} (groups: {})",
                self.cfg.groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Commands that change the cluster: all go through the log.
    fn admin_change(&mut self, req: Request) -> Result<String, String> {
        if !self.quorum {
            return Err("no quorum: this node cannot reach a majority of the cluster, so nothing can be changed \
                        from here; check the network and that the other nodes run clusterd (`clusterd status`)"
                .into());
        }
        let groups: Vec<GroupId> = (0..self.cfg.groups.len()).map(|i| GroupId(i as u16)).collect();
        let propose = |d: &Daemon, e: ClusterEntry| d.raft.propose(e.encode());
        match req {
            Request::Move { group, node } => {
                let g = self.group_id(&group)?;
                let to = self.storage_node(&node)?;
                self.request_move(g, to).map(|m| format!("{group}: {m}"))
            }
            Request::Promote { node } => {
                let to = self.storage_node(&node)?;
                let mut out = Vec::new();
                for g in groups {
                    out.push(format!("{}: {}", self.cfg.groups[usize::from(g.0)].name, self.request_move(g, to)?));
                }
                Ok(out.join("\n"))
            }
            Request::Demote { node } => {
                let from = self.storage_node(&node)?;
                let to = *storage_ids(&self.cfg).iter().find(|n| **n != from).expect("two storage nodes");
                let mut out = Vec::new();
                for g in groups {
                    if self.state.groups[usize::from(g.0)].owner == Some(from) {
                        out.push(format!("{}: {}", self.cfg.groups[usize::from(g.0)].name, self.request_move(g, to)?));
                    }
                }
                if out.is_empty() {
                    return Ok(format!("{node} runs no group"));
                }
                Ok(out.join("\n"))
            }
            Request::Standby { node } => {
                let n = self.storage_node(&node)?;
                for group in groups {
                    propose(self, ClusterEntry::Group(Entry::Standby { group, node: n, on: true }));
                }
                Ok(format!("{node}: standby (its groups move to the peer)"))
            }
            Request::Online { node } => {
                let n = self.storage_node(&node)?;
                for group in groups {
                    propose(self, ClusterEntry::Group(Entry::Standby { group, node: n, on: false }));
                }
                Ok(format!("{node}: online"))
            }
            Request::Cleanup { node } => {
                let nodes = match node {
                    Some(name) => vec![self.storage_node(&name)?],
                    None => storage_ids(&self.cfg),
                };
                let now = self.now_ms();
                for group in groups {
                    for n in &nodes {
                        match self.groups.iter_mut().find(|g| g.id == group) {
                            Some(g) => g.fo.cleanup(now, *n),
                            None => propose(self, ClusterEntry::Group(Entry::Cleanup { group, node: *n })),
                        }
                    }
                }
                Ok("failures cleared".into())
            }
            Request::Status | Request::Events | Request::Fence { .. } => Err("not a change".into()),
        }
    }

    /// `clusterd cleanup GROUP` (like `crm_resource --cleanup`): forget the
    /// group's failures on this node and look at its real state again — the
    /// runner's restart counts and errors cleared, the volume's state told
    /// to the core afresh at the next poll, a stuck stop or demotion retried
    /// at once (a stop of what is stopped succeeds, which unblocks the
    /// group), and every storage node's failure mark cleared in the log
    /// (that part needs quorum).
    fn cleanup_group(&mut self, name: &str) -> Result<String, String> {
        let id = self.group_id(name)?;
        let now = self.now_ms();
        let quorum = self.quorum;
        let storage = storage_ids(&self.cfg);
        let Some(g) = self.groups.iter_mut().find(|g| g.id == id) else {
            return Err(format!(
                "this node runs no group (it is the witness); run `clusterd cleanup {name}` on a storage node"
            ));
        };
        if quorum {
            for n in &storage {
                g.fo.cleanup(now, *n);
            }
        }
        g.told_role = None;
        g.told_disk = None;
        g.told_connected = None;
        g.told_in_sync = false;
        g.reconnect = Default::default();
        // A failed stop made the executor hold the volume's I/O; while the
        // core holds a lease and counts the volume writable, that hold only
        // hangs the stops of services living on the volume: lift it before
        // the retried stop (the core freezes again when its lease ends).
        if g.fo.writable() {
            let _ = g.exec.send(Action::Resume);
        }
        g.fo.retry_stop_now(now);
        let services = g.services.clone();
        tokio::spawn(async move {
            let _ = services.cleanup().await;
        });
        let log = if quorum {
            "failures cleared in the cluster log"
        } else {
            "no quorum: failure marks in the cluster log left as they are"
        };
        self.event(Some(id), "cleanup", format!("admin cleanup: {log}; state re-probed here"));
        Ok(format!("{name}: {log}; resources and volume re-probed on {}", self.name))
    }

    fn request_move(&self, g: GroupId, to: NodeId) -> Result<String, String> {
        let st = &self.state.groups[usize::from(g.0)];
        let to_name = self.node_name(to);
        if st.owner == Some(to) && !st.released {
            return Ok(format!("already on {to_name}"));
        }
        if !self.raft.status().voters.contains(&to) {
            return Err(format!(
                "{to_name} is not a member of the cluster log now (two-node mode removed it when it was fenced or confirmed down; it is added back once it runs again): nothing can move there; start clusterd on {to_name} and wait for `clusterd status`"
            ));
        }
        if to != self.me && self.alive.get(&to) != Some(&true) {
            return Err(format!(
                "{to_name} is offline (no heartbeat from it): it cannot take the group; start clusterd on {to_name} or check the network, then retry"
            ));
        }
        if !st.may_grant(to) || st.disks.get(&to) != Some(&DiskState::UpToDate) {
            return Err(format!(
                "{to_name} cannot take the group now (disk {}{}{}); wait for the resync, `clusterd online {to_name}` or `clusterd cleanup {to_name}`",
                st.disks.get(&to).map(|d| format!("{d:?}")).unwrap_or_else(|| "unknown".into()),
                if st.standby.contains(&to) { ", standby" } else { "" },
                if st.failed.contains(&to) { ", failed" } else { "" },
            ));
        }
        match st.owner {
            Some(owner) if !st.released => {
                self.raft.propose(ClusterEntry::Move { group: g, epoch: st.epoch, to }.encode());
                Ok(format!("moving from {} to {to_name}", self.node_name(owner)))
            }
            _ => Ok(format!("no node runs it; {to_name} takes it when eligible")),
        }
    }

    fn status(&self) -> StatusReport {
        let raft = self.raft.status();
        let standby_any = |n: NodeId| self.state.groups.iter().any(|g| g.standby.contains(&n));
        let nodes = self
            .cfg
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let id = NodeId(i as u8);
                let up = if id == self.me { Some(true) } else { self.alive.get(&id).copied() };
                let state = match (up, standby_any(id)) {
                    (Some(true), true) => "standby",
                    (Some(true), false) => "online",
                    (Some(false), _) => "offline",
                    (None, _) => "unknown",
                };
                NodeReport {
                    name: n.name.clone(),
                    role: format!("{:?}", n.role).to_lowercase(),
                    state: state.into(),
                    this_node: id == self.me,
                }
            })
            .collect();
        let groups = self
            .state
            .groups
            .iter()
            .enumerate()
            .map(|(i, st)| {
                let rt = self.groups.iter().find(|g| usize::from(g.id.0) == i);
                let local_role = match rt {
                    None => "none".to_string(),
                    Some(g) if g.fo.releasing() => "Releasing".into(),
                    Some(g) if g.fo.promoting() => "Promoting".into(),
                    Some(g) if g.fo.promoted_epoch().is_some() => "Primary".into(),
                    Some(_) => "Secondary".into(),
                };
                GroupReport {
                    name: self.cfg.groups[i].name.clone(),
                    owner: st.owner.map(|n| self.node_name(n)),
                    epoch: st.epoch,
                    released: st.released,
                    disks: st
                        .disks
                        .iter()
                        .map(|(n, d)| DiskReport { node: self.node_name(*n), state: format!("{d:?}") })
                        .collect(),
                    failed: st.failed.iter().map(|n| self.node_name(*n)).collect(),
                    standby: st.standby.iter().map(|n| self.node_name(*n)).collect(),
                    local_role,
                    volume: rt.and_then(|g| g.volume.as_ref()).map(|v| v.describe()),
                    writable: rt.is_some_and(|g| g.fo.writable()),
                    resources: Vec::new(),
                    served_by: self
                        .serving
                        .get(&GroupId(i as u16))
                        .filter(|(n, e)| *e == st.epoch && st.owner == Some(*n) && !st.released)
                        .map(|(n, _)| self.node_name(*n)),
                }
            })
            .collect();
        let c = self.hb.counters();
        StatusReport {
            cluster: self.cfg.cluster.name.clone(),
            node: self.name.clone(),
            quorum: self.quorum,
            leader: raft.leader.map(|n| self.node_name(n)),
            term: raft.term,
            nodes,
            groups,
            fences: self
                .state
                .fences
                .iter()
                .map(|f| FenceReport {
                    node: self.node_name(f.node),
                    by: self.node_name(f.by),
                    ok: f.ok,
                    unix_ms: f.unix_ms,
                })
                .collect(),
            heartbeat: HeartbeatReport {
                accepted: c.accepted,
                malformed: c.malformed,
                spoofed: c.spoofed,
                replayed: c.replayed,
            },
            two_node: self.two.as_ref().map(|(_, tn)| tn.status_line()),
        }
    }
}

/// Two-node mode (see `two_node`).
impl Daemon {
    fn two_node_peer(&mut self, n: NodeId, alive: bool) {
        let now = self.now_ms();
        if let Some((peer, tn)) = &mut self.two {
            if *peer == n {
                tn.handle_peer(now, alive);
            }
        }
    }

    /// Tells the two-node core what the log looks like now.
    fn two_node_log_view(&mut self) {
        let now = self.now_ms();
        let st = self.raft.status();
        let single = st.voters == [self.me];
        let leader_here = st.leader == Some(self.me);
        let quorum = self.quorum;
        if let Some((_, tn)) = &mut self.two {
            tn.handle_log(now, quorum, single, leader_here);
        }
    }

    fn two_node_act(&mut self, action: two_node::Action) {
        let Some((peer, _)) = &self.two else { return };
        let peer = *peer;
        match action {
            two_node::Action::Fence => self.fence(None, peer, None, true),
            two_node::Action::ForceSingleVoter => self.force_single_voter(false),
            // Only once this node's log connection to the peer is up: a
            // voter added while unreachable would take the quorum away.
            two_node::Action::AddPeerBack => {
                if self.raft.status().peers.contains(&(peer, true)) {
                    self.raft.add_voter(peer);
                }
            }
            two_node::Action::Event { kind, message } => self.event(None, kind, message),
        }
    }

    fn force_single_voter(&self, by_admin: bool) {
        let raft = self.raft.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = raft.force_single_voter().await;
            let _ = tx.send(Internal::Forced { result, by_admin }).await;
        });
    }

    /// `clusterd fence NODE --confirm-down`.
    fn confirm_down(&mut self, name: &str) -> Result<(), String> {
        let n = self.storage_node(name)?;
        let now = self.now_ms();
        let Some((peer, tn)) = &mut self.two else {
            return Err("--confirm-down is for two-node mode (no witness); with a witness the cluster fails over \
                        by quorum: use `clusterd fence NODE` to run its fence devices"
                .into());
        };
        if n != *peer {
            return Err(format!("{name} is this node; run --confirm-down on the surviving node, naming the dead one"));
        }
        tn.confirm_down(now)?;
        self.event(None, "fence", format!("the admin confirmed {name} is down (--confirm-down)"));
        Ok(())
    }

    fn forced(&mut self, result: Result<(), String>, by_admin: bool) {
        let now = self.now_ms();
        let Some((peer, _)) = &self.two else { return };
        let peer = *peer;
        let peer_name = self.node_name(peer);
        let reply = self.confirm_reply.take();
        match result {
            Ok(()) => {
                // The fence history: in the log (committed once this node
                // leads alone) and in a local file an admin can read.
                self.raft
                    .propose(ClusterEntry::Fenced { node: peer, by: self.me, ok: true, unix_ms: unix_ms() }.encode());
                let how = if by_admin { "confirmed down by the admin" } else { "fenced by its fence device" };
                let line = format!("{} {peer_name} {how}; {} became the only voter\n", unix_ms(), self.name);
                let path = self.state_dir.join("two-node-fences");
                let written =
                    std::fs::OpenOptions::new().create(true).append(true).open(&path).and_then(|mut f| {
                        std::io::Write::write_all(&mut f, line.as_bytes()).and_then(|()| f.sync_data())
                    });
                if let Err(e) = written {
                    tracing::warn!(path = %path.display(), "cannot record the fence: {e}");
                }
                self.event(
                    None,
                    "two-node",
                    format!("{peer_name} {how}: this node is the cluster log's only voter and takes over"),
                );
                if let Some(r) = reply {
                    let _ = r.try_send(Response::Done(format!(
                        "{peer_name} recorded as down; this node is the only voter and takes over the groups \
                         (`clusterd status`); {peer_name} is added back when it returns"
                    )));
                }
            }
            Err(why) => {
                if let Some((_, tn)) = &mut self.two {
                    tn.handle_force_failed(now, &why);
                }
                if let Some(r) = reply {
                    let _ = r.try_send(Response::Error(format!("could not make this node the only voter: {why}")));
                }
            }
        }
        self.two_node_log_view();
    }
}

impl GroupRt {
    fn fo_config(&self) -> FailoverConfig {
        self.fo.config().clone()
    }
}

/// Resource states for `status`, asked from each group's task.
async fn resource_reports(handles: Vec<(usize, GroupHandle)>) -> Vec<(usize, Vec<ResourceReport>)> {
    let mut out = Vec::new();
    for (i, h) in handles {
        if let Ok(st) = h.status().await {
            out.push((
                i,
                st.steps
                    .iter()
                    .map(|s| ResourceReport {
                        name: s.name.clone(),
                        state: format!("{:?}", s.state).to_lowercase(),
                        last_error: s.last_error.clone(),
                    })
                    .collect(),
            ));
        }
    }
    out
}
