//! `Node`: the one task that owns the `RawNode`. It ticks every `tick_ms`,
//! takes proposals, compactions, peer messages and sender reports from
//! channels, and after each batch of inputs works through the `Ready` in
//! raft-rs's order:
//!
//! 1. send the leader's messages (they do not depend on local persistence);
//! 2. install a received snapshot (`Restore` to the daemon);
//! 3. hand committed entries to the daemon;
//! 4. append new entries and the hard state to the state file, fsync;
//! 5. send the persisted messages (votes, append responses);
//! 6. `advance`, then the light ready's commit, messages and entries.
//!
//! Committed conf-change entries (two-node mode adding a peer back) are
//! applied as they are handed on, and the new membership is written to the
//! state file in the same batch. `force_single` changes the membership
//! without an entry (see `RaftLog::force_single_voter`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::limits::{
    APPENDS_INFLIGHT_MAX, APPEND_BYTES_MAX, INPUTS_PER_READY_MAX, SNAPSHOT_BYTES_MAX, UNCOMMITTED_BYTES_MAX,
};
use super::quorum::QuorumView;
use super::record;
use super::storage::{DiskWrite, LogStore, StartSnapshot, StateFile};
use super::transport::{Inbound, PeerLink, Report};
use super::{logger, node_of, raft_id, Control, LogEvent, RaftLogConfig, RaftLogError, RaftStatus};

pub(crate) struct Node {
    name: String,
    raw: RawNode<LogStore>,
    file: Arc<Mutex<StateFile>>,
    /// Items encoded for the state file, not yet written (one frame).
    pending: Vec<u8>,
    links: BTreeMap<u64, PeerLink>,
    events: mpsc::Sender<LogEvent>,
    status: watch::Sender<RaftStatus>,
    quorum: QuorumView,
    has_quorum: bool,
    applied: u64,
    tick_ms: u64,
    started: Instant,
}

impl Drop for Node {
    /// However the task ends (shutdown, disk failure, a panic inside
    /// raft-rs), the status must not keep claiming a quorum; the event
    /// receiver closes at the same time.
    fn drop(&mut self) {
        self.status.send_modify(|s| {
            s.quorum = false;
            s.leader = None;
        });
    }
}

/// The raft task stops: the daemon is gone or the disk failed.
#[derive(Debug)]
struct Stop(String);

impl Node {
    pub(crate) fn new(
        cfg: &RaftLogConfig,
        store: LogStore,
        file: StateFile,
        links: Vec<PeerLink>,
        events: mpsc::Sender<LogEvent>,
        status: watch::Sender<RaftStatus>,
    ) -> Result<Node, RaftLogError> {
        let applied = store.snapshot_ref().get_metadata().index;
        let raft_cfg = raft::Config {
            id: raft_id(cfg.me),
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            max_size_per_msg: APPEND_BYTES_MAX,
            max_inflight_msgs: APPENDS_INFLIGHT_MAX,
            max_uncommitted_size: UNCOMMITTED_BYTES_MAX,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let voters = store.conf_state().voters.clone();
        let raw = RawNode::new(&raft_cfg, store, &logger::logger(&cfg.name))?;
        Ok(Node {
            name: cfg.name.clone(),
            raw,
            file: Arc::new(Mutex::new(file)),
            pending: Vec::new(),
            links: links.into_iter().map(|l| (l.raft_id, l)).collect(),
            events,
            status,
            quorum: QuorumView::new(raft_id(cfg.me), voters, cfg.election_timeout_ms()),
            has_quorum: false,
            applied,
            tick_ms: cfg.tick_ms,
            started: Instant::now(),
        })
    }

    pub(crate) async fn run(
        mut self,
        snapshot: StartSnapshot,
        mut control: mpsc::Receiver<Control>,
        mut inbound: mpsc::Receiver<Inbound>,
        mut reports: mpsc::Receiver<Report>,
        mut stop: watch::Receiver<bool>,
    ) {
        let result = async {
            if let Some((index, data)) = snapshot {
                self.emit(LogEvent::Restore { index, data }).await?;
            }
            let mut ticker = tokio::time::interval(std::time::Duration::from_millis(self.tick_ms));
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = super::stopped(&mut stop) => return Ok(()),
                    _ = ticker.tick() => {
                        self.raw.tick();
                    }
                    c = control.recv() => match c {
                        Some(c) => self.control(c).await?,
                        None => return Ok(()),
                    },
                    Some((from, m)) = inbound.recv() => self.step(from, m),
                    Some(r) = reports.recv() => self.report(r),
                }
                // Take whatever else is waiting, bounded, so one Ready
                // covers a burst.
                for _ in 0..INPUTS_PER_READY_MAX {
                    if let Ok((from, m)) = inbound.try_recv() {
                        self.step(from, m);
                    } else if let Ok(c) = control.try_recv() {
                        self.control(c).await?;
                    } else {
                        break;
                    }
                }
                self.on_ready().await?;
                self.publish().await?;
            }
        };
        let result: Result<(), Stop> = result.await;
        if let Err(Stop(why)) = &result {
            tracing::error!(node = %self.name, "cluster log stopped: {why}");
        }
        // Light-ready commit indexes are written lazily; sync them now.
        if let Err(Stop(why)) = self.persist(None).await {
            tracing::warn!(node = %self.name, "cluster log: final sync failed: {why}");
        }
        tracing::info!(node = %self.name, "cluster log stopped");
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn step(&mut self, from: u64, mut m: Message) {
        self.quorum.heard(from, self.now_ms());
        match m.get_msg_type() {
            // A node whose state directory was removed hears of a commit
            // index beyond its (empty) log; raft-rs would panic on it.
            MessageType::MsgHeartbeat => {
                let last = self.raw.raft.raft_log.last_index();
                if m.commit > last {
                    m.commit = last;
                }
            }
            // The leader learns that such a node lost entries it had
            // acknowledged: raft-rs never lowers `matched` and would ignore
            // the rejections forever, so start that peer over (probe, then
            // entries or a snapshot). Lowering `matched` only delays commits.
            MessageType::MsgAppendResponse if m.reject && self.raw.raft.state == StateRole::Leader => {
                if let Some(pr) = self.raw.raft.mut_prs().get_mut(from) {
                    if m.reject_hint < pr.matched {
                        tracing::warn!(
                            node = %self.name,
                            peer = from,
                            acknowledged = pr.matched,
                            has = m.reject_hint,
                            "a peer lost log entries it had acknowledged (state directory removed?); replicating to it from scratch"
                        );
                        pr.matched = m.reject_hint;
                        pr.become_probe();
                    }
                }
            }
            _ => {}
        }
        if let Err(e) = self.raw.step(m) {
            tracing::debug!(node = %self.name, from, "raft refused a message: {e}");
        }
    }

    fn report(&mut self, r: Report) {
        match r {
            Report::Snapshot { to, sent } => {
                let status = if sent { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.raw.report_snapshot(to, status);
            }
            Report::Unreachable(to) => self.raw.report_unreachable(to),
        }
    }

    async fn control(&mut self, c: Control) -> Result<(), Stop> {
        match c {
            Control::Propose(data) => {
                if let Err(e) = self.raw.propose(Vec::new(), data) {
                    tracing::debug!(node = %self.name, "proposal dropped: {e}");
                }
            }
            Control::ForceSingleVoter(reply) => {
                let r = self.force_single().await?;
                let _ = reply.send(r);
            }
            Control::AddVoter(node) => self.add_voter(raft_id(node)),
            Control::Redial(node) => {
                if let Some(link) = self.links.get(&raft_id(node)) {
                    link.redial();
                }
            }
            Control::LeadHere => {
                let (me, leader) = (self.raw.raft.id, self.raw.raft.leader_id);
                if self.raw.raft.state != StateRole::Leader && leader != raft::INVALID_ID {
                    tracing::info!(node = %self.name, from = leader, "asking for the log's leadership");
                    self.raw.transfer_leader(me);
                }
            }
            Control::Compact { index, state } => {
                if state.len() > SNAPSHOT_BYTES_MAX {
                    tracing::error!(node = %self.name, bytes = state.len(), max = SNAPSHOT_BYTES_MAX, "compaction refused: the state is too large for a snapshot");
                    return Ok(());
                }
                if index > self.applied {
                    tracing::warn!(node = %self.name, index, applied = self.applied, "compaction refused: index not yet applied");
                    return Ok(());
                }
                match self.raw.mut_store().compact(index, state) {
                    Ok(()) => {
                        let image = self.raw.store().image();
                        self.persist(Some(image)).await?;
                        tracing::debug!(node = %self.name, index, "log compacted");
                    }
                    Err(why) => tracing::debug!(node = %self.name, "compaction skipped: {why}"),
                }
            }
        }
        Ok(())
    }

    /// Writes the pending bytes, or a whole new file, and fsyncs, on a
    /// blocking thread. A disk error stops the node: it can no longer keep
    /// the promises its votes and acknowledgements made.
    async fn persist(&mut self, image: Option<Vec<u8>>) -> Result<(), Stop> {
        let write = match image {
            Some(image) => {
                self.pending.clear();
                DiskWrite::Rewrite(image)
            }
            None => DiskWrite::Append(std::mem::take(&mut self.pending)),
        };
        let file = self.file.clone();
        let done = tokio::task::spawn_blocking(move || match file.lock() {
            Ok(mut f) => f.write(write),
            Err(poisoned) => poisoned.into_inner().write(write),
        })
        .await;
        match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Stop(e.to_string())),
            Err(e) => Err(Stop(format!("the disk writer failed: {e}"))),
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            match self.links.get(&m.to) {
                Some(link) => link.send(m),
                None => tracing::warn!(node = %self.name, to = m.to, "raft addressed a message to an unknown node"),
            }
        }
    }

    async fn emit(&mut self, ev: LogEvent) -> Result<(), Stop> {
        self.events.send(ev).await.map_err(|_| Stop("the daemon dropped the event receiver".into()))
    }

    async fn deliver(&mut self, entries: Vec<Entry>) -> Result<(), Stop> {
        let Some(last) = entries.last().map(|e| e.index) else { return Ok(()) };
        for e in &entries {
            if e.get_entry_type() != EntryType::EntryNormal {
                self.apply_conf_entry(e);
            }
        }
        let payloads: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .filter(|e| e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty())
            .map(|e| (e.index, e.data.to_vec()))
            .collect();
        if !payloads.is_empty() {
            self.emit(LogEvent::Committed(payloads)).await?;
        }
        self.applied = self.applied.max(last);
        Ok(())
    }

    /// Applies a committed conf-change entry unless the stored membership
    /// already includes it (a replay after a restart, or one made before a
    /// forced single-voter membership, which must stay forced).
    fn apply_conf_entry(&mut self, e: &Entry) {
        if e.index <= self.raw.store().conf_index() {
            return;
        }
        let cc: Result<ConfChangeV2, String> = match e.get_entry_type() {
            EntryType::EntryConfChange => ConfChange::parse_from_bytes(&e.data)
                .map(|c| single(c.node_id, c.get_change_type()))
                .map_err(|x| x.to_string()),
            EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(&e.data).map_err(|x| x.to_string()),
            EntryType::EntryNormal => return,
        };
        let applied = cc.and_then(|cc| self.raw.apply_conf_change(&cc).map_err(|x| x.to_string()));
        match applied {
            Ok(cs) => {
                tracing::info!(node = %self.name, index = e.index, voters = ?cs.voters, "cluster log membership changed");
                self.set_membership(cs, e.index);
            }
            // Committed on every node alike: skipping it is what all do.
            Err(why) => tracing::error!(node = %self.name, index = e.index, "skipping a conf change: {why}"),
        }
    }

    /// Takes a new membership into the store, the quorum view and the
    /// pending bytes of the state file.
    fn set_membership(&mut self, cs: raft::eraftpb::ConfState, index: u64) {
        self.quorum.set_voters(cs.voters.clone());
        self.raw.mut_store().set_conf_state(cs, index);
        let m = self.raw.store().membership();
        record::encode_membership(&m, &mut self.pending);
    }

    /// Two-node mode after the peer was fenced: this node becomes the only
    /// voter without a committed entry (there is no quorum to commit one),
    /// persists that, and campaigns, which it wins alone.
    async fn force_single(&mut self) -> Result<Result<(), String>, Stop> {
        let me = self.raw.raft.id;
        let voters = self.raw.raft.prs().conf().voters().ids().iter().collect::<Vec<u64>>();
        if voters == [me] {
            return Ok(Ok(()));
        }
        if !voters.contains(&me) {
            return Ok(Err("this node is not a voter of the cluster log".into()));
        }
        if voters.len() != 2 {
            return Ok(Err(format!("the cluster log has {} voters; only a pair can shrink to one", voters.len())));
        }
        let others: Vec<u64> = voters.iter().copied().filter(|v| *v != me).collect();
        let [other] = others[..] else { unreachable!("two voters, this node one of them") };
        let cc = single(other, ConfChangeType::RemoveNode);
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => return Ok(Err(format!("raft refused the membership change: {e}"))),
        };
        // Conf changes in the log up to its end are older than this one.
        let last = self.raw.raft.raft_log.last_index();
        tracing::warn!(node = %self.name, removed = ?others, "cluster log forced to this node as the only voter");
        self.set_membership(cs, last);
        self.persist(None).await?;
        if let Err(e) = self.raw.campaign() {
            tracing::warn!(node = %self.name, "campaign after forcing a single voter: {e}");
        }
        Ok(Ok(()))
    }

    /// The leader adds a returning peer back as a voter through a committed
    /// conf change (ignored unless this node leads, the peer is not a voter
    /// and no other conf change is pending; the daemon asks again).
    fn add_voter(&mut self, id: u64) {
        if self.raw.raft.state != StateRole::Leader || self.raw.raft.has_pending_conf() {
            return;
        }
        if self.raw.raft.prs().conf().voters().contains(id) || !self.links.contains_key(&id) {
            return;
        }
        let cc = single(id, ConfChangeType::AddNode);
        match self.raw.propose_conf_change(Vec::new(), cc) {
            Ok(()) => tracing::info!(node = %self.name, peer = id, "proposing to add the peer back as a voter"),
            Err(e) => tracing::debug!(node = %self.name, "adding a voter: {e}"),
        }
    }

    async fn on_ready(&mut self) -> Result<(), Stop> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());

        let mut rewrite = false;
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let (index, data) = (snap.get_metadata().index, snap.data.to_vec());
            self.raw.mut_store().install_snapshot(snap);
            rewrite = true;
            tracing::info!(node = %self.name, index, "installed a snapshot from the leader");
            self.emit(LogEvent::Restore { index, data }).await?;
            self.applied = index;
        }
        let committed = rd.take_committed_entries();
        self.deliver(committed).await?;
        if !rd.entries().is_empty() {
            let ents = rd.take_entries();
            if !rewrite {
                for e in &ents {
                    record::encode_entry(e, &mut self.pending);
                }
            }
            self.raw.mut_store().append(&ents);
        }
        if let Some(hs) = rd.hs() {
            if !rewrite {
                record::encode_hard_state(hs, &mut self.pending);
            }
            self.raw.mut_store().set_hard_state(hs.clone());
        }
        if rewrite {
            let image = self.raw.store().image();
            self.persist(Some(image)).await?;
        } else if !self.pending.is_empty() || rd.must_sync() {
            self.persist(None).await?;
        }
        self.send(rd.take_persisted_messages());

        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
            // Written with the next batch (or at shutdown): a lost commit
            // index is learned again from the leader.
            let hs = self.raw.store().hard_state().clone();
            record::encode_hard_state(&hs, &mut self.pending);
        }
        self.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.deliver(committed).await?;
        self.raw.advance_apply();
        Ok(())
    }

    /// Updates the quorum view and the status; tells the daemon about a
    /// quorum change.
    async fn publish(&mut self) -> Result<(), Stop> {
        let r = &self.raw.raft;
        let quorum = self.quorum.has_quorum(r.state, r.leader_id, self.now_ms());
        let leader = if r.leader_id == 0 { None } else { node_of(r.leader_id) };
        let status = RaftStatus {
            leader,
            term: r.term,
            commit: r.raft_log.committed,
            applied: self.applied,
            snapshot: r.raft_log.store.snapshot_ref().get_metadata().index,
            quorum,
            voters: r.prs().conf().voters().ids().iter().filter_map(node_of).collect(),
            peers: self
                .links
                .values()
                .filter_map(|l| node_of(l.raft_id).map(|n| (n, l.connected.load(Ordering::Relaxed))))
                .collect(),
        };
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
        if quorum != self.has_quorum {
            self.has_quorum = quorum;
            tracing::info!(node = %self.name, quorum, ?leader, "cluster log quorum changed");
            self.emit(LogEvent::Quorum(quorum)).await?;
        }
        Ok(())
    }
}

/// A conf change of one voter (raft-rs's "simple" change).
fn single(node_id: u64, change_type: ConfChangeType) -> ConfChangeV2 {
    let mut c = ConfChangeSingle { node_id, ..Default::default() };
    c.set_change_type(change_type);
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![c].into());
    cc
}
