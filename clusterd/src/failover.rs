//! The failover safety core: `Failover`, one per resource group on each
//! storage node, decides when this node may promote its volume, when it must
//! stop writing, and what it asks the cluster log to record.
//!
//! Sans-IO: no clock, no sockets, no processes. Inputs go to
//! `Failover::handle(now_ms, Input)` (times are the node's own monotonic
//! milliseconds); outputs are drained with `poll_action` after every call, and
//! `handle_timeout(now_ms)` is called at `poll_timeout()`.
//!
//! **The cluster log is a narrow interface.** The core only emits
//! `Action::Propose(Entry)` and consumes `Input::Committed(Entry)` (in commit
//! order) and `Input::Quorum(bool)`. Every node folds committed entries into
//! the same `GroupState` with `GroupState::apply`, which refuses stale or
//! unsafe entries deterministically (a grant must carry exactly the next
//! epoch, a renewal the current one). A shell around the `raft` crate (0.7)
//! maps `Propose` to `RawNode::propose`, each committed entry of a `Ready` to
//! `Committed`, and "a leader is known and check-quorum holds" to `Quorum`;
//! the simulation uses a small majority-commit log instead.
//!
//! Rules enforced here (issue 5):
//! - promotion only through a committed `Entry::Grant` naming this node with
//!   the next epoch, then only after the previous owner's lease ran out (plus
//!   a clock-drift margin) or a fence of it succeeded;
//! - a primary writes only while it holds a lease: the send time of its
//!   newest *committed* renewal plus `lease_ms`; without one it freezes, and
//!   at the lease's end it stops services and demotes;
//! - a primary whose replication link is down freezes until the cluster log
//!   records the peer's disk as Outdated (so a later grant cannot pick it);
//! - grants go only to an UpToDate node when one exists, never to a node
//!   marked failed (anti-flapping) until `Entry::Cleanup`;
//! - sticky: nothing moves the group back once it moved.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// Renewals awaiting commit that a primary remembers (older ones are
/// forgotten; their commit would grant a lease already over anyway).
const RENEWALS_INFLIGHT_MAX: usize = 64;

/// A promotion the volume refused (its replicator still sees the old
/// primary, a handshake runs) is retried after this pause, doubled at each
/// refusal up to `PROMOTE_RETRY_MS_MAX`, for as long as the grant holds.
pub const PROMOTE_RETRY_MS_MIN: u64 = 200;
pub const PROMOTE_RETRY_MS_MAX: u64 = 2_000;

/// The services are restarted after a resource failure only after this
/// pause, doubled at each failure within the window up to
/// `RESTART_BACKOFF_MS_MAX`: a service that fails at once does not use up
/// `failures_max` in milliseconds.
pub const RESTART_BACKOFF_MS_MIN: u64 = 1_000;
pub const RESTART_BACKOFF_MS_MAX: u64 = 8_000;

/// A volume found primary under a core that does not run the group (a
/// demotion that failed, a stop that hung, an admin's `replicator primary`)
/// is stopped and demoted again after this pause, doubled at each attempt
/// up to `VOLUME_FIX_MS_MAX`: there is always a way out of a stuck stop.
pub const VOLUME_FIX_MS_MIN: u64 = 1_000;
pub const VOLUME_FIX_MS_MAX: u64 = 8_000;

const _: () = assert!(VOLUME_FIX_MS_MIN > 0 && VOLUME_FIX_MS_MIN <= VOLUME_FIX_MS_MAX);
const _: () = assert!(PROMOTE_RETRY_MS_MIN > 0 && PROMOTE_RETRY_MS_MIN <= PROMOTE_RETRY_MS_MAX);
const _: () = assert!(RESTART_BACKOFF_MS_MIN > 0 && RESTART_BACKOFF_MS_MIN <= RESTART_BACKOFF_MS_MAX);

/// `min` doubled `n` times, capped at `max`.
fn backoff_ms(min: u64, max: u64, n: u32) -> u64 {
    min.saturating_mul(1u64 << n.min(20)).min(max)
}

/// A resource group (volume + services that move together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u16);

/// A node's volume state as the replicator reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    UpToDate,
    Outdated,
    Inconsistent,
}

/// What the cluster log records about a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// The group belongs to `node` from `epoch` on (valid only as the next
    /// epoch). `incarnation` names the process that asked, so a restarted
    /// node never mistakes an old grant for the one it is waiting for.
    Grant { group: GroupId, node: NodeId, epoch: u64, incarnation: u64 },
    /// The owner of `epoch` is alive and holds quorum; `seq` ties the commit
    /// back to the proposal's send time.
    Renew { group: GroupId, epoch: u64, seq: u64 },
    /// The owner of `epoch` reports a node's disk state (valid only for the
    /// current epoch); `report` numbers the owner's reports in order.
    Disk { group: GroupId, epoch: u64, node: NodeId, state: DiskState, report: u64 },
    /// The group failed too often on `node`: not eligible until cleanup.
    MarkFailed { group: GroupId, node: NodeId },
    /// The admin cleared `node`'s failures (`clusterctl cleanup`).
    Cleanup { group: GroupId, node: NodeId },
    /// The owner of `epoch` stopped its services and demoted for a planned
    /// move: the group may be granted again without waiting for a lease.
    Release { group: GroupId, epoch: u64 },
    /// `node` is put in standby (`on`) or back online: a node in standby is
    /// never granted a group, and an owner in standby releases it.
    Standby { group: GroupId, node: NodeId, on: bool },
    /// The volume already saw primary epochs up to `floor` (it was used
    /// before the cluster, or promoted by hand): the next grant must carry a
    /// larger one. Valid only while no node runs the group.
    EpochFloor { group: GroupId, floor: u64 },
}

/// What applying one committed entry changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Granted {
        node: NodeId,
        epoch: u64,
        incarnation: u64,
        previous: Option<NodeId>,
    },
    Renewed {
        epoch: u64,
        seq: u64,
    },
    Disk {
        node: NodeId,
        state: DiskState,
        report: u64,
    },
    Failed(NodeId),
    Cleaned(NodeId),
    Released(NodeId),
    Standby {
        node: NodeId,
        on: bool,
    },
    EpochRaised(u64),
    /// Stale (older epoch), unsafe, or for another group: no effect.
    Ignored,
}

/// The replicated state of a group: every node derives the same value by
/// applying the same committed entries in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub group: GroupId,
    pub owner: Option<NodeId>,
    pub epoch: u64,
    pub disks: BTreeMap<NodeId, DiskState>,
    pub failed: BTreeSet<NodeId>,
    pub standby: BTreeSet<NodeId>,
    /// The owner released the group (planned move) and no longer writes.
    pub released: bool,
}

impl GroupState {
    /// The state before any entry: no owner, epoch 0, the storage nodes'
    /// disks as created (UpToDate after the initial sync).
    pub fn new(group: GroupId, storage: &[NodeId], initial: DiskState) -> GroupState {
        GroupState {
            group,
            owner: None,
            epoch: 0,
            disks: storage.iter().map(|n| (*n, initial)).collect(),
            failed: BTreeSet::new(),
            standby: BTreeSet::new(),
            released: false,
        }
    }

    /// Whether a grant to `node` is allowed: a storage node, not failed, not
    /// in standby, and UpToDate unless no node is UpToDate.
    pub fn may_grant(&self, node: NodeId) -> bool {
        let Some(disk) = self.disks.get(&node) else { return false };
        if self.failed.contains(&node) || self.standby.contains(&node) {
            return false;
        }
        *disk == DiskState::UpToDate || !self.disks.values().any(|d| *d == DiskState::UpToDate)
    }

    pub fn apply(&mut self, entry: &Entry) -> Applied {
        match *entry {
            Entry::Grant { group, node, epoch, incarnation } if group == self.group => {
                if epoch != self.epoch + 1 || !self.may_grant(node) {
                    return Applied::Ignored;
                }
                let previous = self.owner.replace(node);
                self.epoch = epoch;
                self.released = false;
                Applied::Granted { node, epoch, incarnation, previous }
            }
            Entry::Renew { group, epoch, seq } if group == self.group && epoch == self.epoch => {
                Applied::Renewed { epoch, seq }
            }
            Entry::Disk { group, epoch, node, state, report } if group == self.group && epoch == self.epoch => {
                match self.disks.get_mut(&node) {
                    Some(d) => {
                        *d = state;
                        Applied::Disk { node, state, report }
                    }
                    None => Applied::Ignored,
                }
            }
            Entry::MarkFailed { group, node } if group == self.group => {
                self.failed.insert(node);
                Applied::Failed(node)
            }
            Entry::Cleanup { group, node } if group == self.group => {
                self.failed.remove(&node);
                Applied::Cleaned(node)
            }
            Entry::Release { group, epoch } if group == self.group && epoch == self.epoch && !self.released => {
                match self.owner {
                    Some(owner) => {
                        self.released = true;
                        Applied::Released(owner)
                    }
                    None => Applied::Ignored,
                }
            }
            Entry::EpochFloor { group, floor }
                if group == self.group && floor > self.epoch && (self.owner.is_none() || self.released) =>
            {
                self.epoch = floor;
                Applied::EpochRaised(floor)
            }
            Entry::Standby { group, node, on } if group == self.group && self.disks.contains_key(&node) => {
                if on {
                    self.standby.insert(node);
                } else {
                    self.standby.remove(&node);
                }
                Applied::Standby { node, on }
            }
            _ => Applied::Ignored,
        }
    }
}

/// Timing and policy of one group on one node.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub group: GroupId,
    pub me: NodeId,
    /// The other storage node (the replication peer).
    pub peer: NodeId,
    pub renew_interval_ms: u64,
    /// How long a committed renewal lets the owner write, from its send time.
    pub lease_ms: u64,
    /// Added to the lease by a node waiting for the previous owner's lease,
    /// to cover the clocks' rate difference (see `drift_margin_ms`).
    pub drift_margin_ms: u64,
    /// A dead owner (heartbeat) is replaced only after no renewal was seen
    /// for this long.
    pub takeover_after_ms: u64,
    /// The peer is the group's preferred node: a group nobody ever owned is
    /// left to it unless it is dead or silent for `takeover_after_ms`.
    pub peer_preferred: bool,
    /// Failback: a primary gives the group back (planned release) to its
    /// preferred peer once that peer is alive, in sync and eligible, after
    /// this node has run it for `failback_after_ms`. Off: sticky.
    pub failback: bool,
    pub failback_after_ms: u64,
    /// How often an uncommitted proposal is sent again.
    pub repropose_ms: u64,
    /// A fence agent exists: a new owner fences a dead previous owner instead
    /// of waiting out its lease when the fence is faster.
    pub fence_configured: bool,
    /// Differs at every start of the node (boot counter, or wall-clock
    /// milliseconds at start-up); carried in this node's grants.
    pub incarnation: u64,
    /// Anti-flapping: this many resource failures within the window mark the
    /// node failed.
    pub failures_max: u32,
    pub failure_window_ms: u64,
    /// A primary whose renewals stop committing stops its services once
    /// its lease has this little left, while I/O still flows: a service
    /// stopped on held I/O hangs (issue 23). Below `lease_ms -
    /// renew_interval_ms`, so a healthy primary never stops.
    pub stop_budget_ms: u64,
    /// Every storage node runs a hardware watchdog with this timeout
    /// (`watchdog.mode = "required"`; 0: not relied on). A node that holds
    /// the group pets its watchdog only while its lease is valid and its
    /// stop path is not stuck (`Failover::watchdog_may_pet`), so the
    /// previous owner is stopped or reset by `lease end + this`: the wait
    /// for its lease includes it, and then covers an owner whose freeze or
    /// stop hung, without a fence agent.
    pub peer_watchdog_ms: u64,
}

/// The margin a node adds to a lease measured on another node's clock, when
/// clock rates differ by at most `drift_ppm_max` from true time: the lease
/// lasts at most `lease·(1+ρ)`, the wait at least `(lease+m)·(1−ρ)`.
pub fn drift_margin_ms(lease_ms: u64, drift_ppm_max: u64) -> u64 {
    assert!(drift_ppm_max < 500_000, "clock drift bound {drift_ppm_max} ppm is not a clock");
    let m = (2 * lease_ms * drift_ppm_max).div_ceil(1_000_000 - drift_ppm_max);
    m + 1
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FailoverConfigError {
    #[error("lease_ms ({lease_ms}) must exceed 2 × renew_interval_ms ({renew_interval_ms}): one lost renewal must not freeze the primary; raise lease_ms")]
    LeaseTooShort { lease_ms: u64, renew_interval_ms: u64 },
    #[error("failures_max must be at least 1")]
    NoFailuresAllowed,
    #[error("node {0:?} cannot be its own replication peer")]
    PeerIsMe(NodeId),
    #[error("stop_budget_ms ({stop_budget_ms}) must be below lease_ms - renew_interval_ms ({limit_ms}): a healthy primary would stop its services")]
    StopBudgetTooLong { stop_budget_ms: u64, limit_ms: u64 },
}

impl FailoverConfig {
    pub fn validate(&self) -> Result<(), FailoverConfigError> {
        if self.lease_ms <= 2 * self.renew_interval_ms {
            return Err(FailoverConfigError::LeaseTooShort {
                lease_ms: self.lease_ms,
                renew_interval_ms: self.renew_interval_ms,
            });
        }
        if self.failures_max == 0 {
            return Err(FailoverConfigError::NoFailuresAllowed);
        }
        if self.me == self.peer {
            return Err(FailoverConfigError::PeerIsMe(self.me));
        }
        let limit_ms = self.lease_ms - self.renew_interval_ms;
        if self.stop_budget_ms >= limit_ms {
            return Err(FailoverConfigError::StopBudgetTooLong { stop_budget_ms: self.stop_budget_ms, limit_ms });
        }
        Ok(())
    }
}

/// Inputs from the heartbeat, the cluster log, the replicator, resource
/// monitors and fence agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    PeerAlive(NodeId),
    PeerDead(NodeId),
    /// This node can commit entries (leader known, check-quorum holds).
    Quorum(bool),
    /// Newly committed entries in log order (one Raft `Ready`'s worth): all
    /// are applied before the core acts, so a batch that grants the group to
    /// this node and then to another never promotes it.
    Committed(Vec<Entry>),
    /// This node's volume state.
    LocalDisk(DiskState),
    /// This node's replication link to the peer came up or went down.
    Replication {
        connected: bool,
    },
    /// Resync finished: the peer's disk equals ours.
    PeerInSync,
    /// A monitor of the group's services failed here.
    ResourceFailed,
    FenceDone {
        node: NodeId,
        ok: bool,
    },
    /// The shell finished an `Action::Demote` (needed by a planned release,
    /// which proposes `Entry::Release` only once the volume is secondary).
    Demoted,
    /// The volume is primary with `epoch` (the answer to `Action::Promote`).
    Promoted {
        epoch: u64,
    },
    /// The volume refused `Action::Promote { epoch }` (its replicator still
    /// sees the old primary connected, a handshake runs, the command timed
    /// out): nothing above it may start. Retried with a backoff while the
    /// grant holds; not a resource failure.
    PromoteRefused {
        epoch: u64,
    },
    /// The newest primary epoch this node's volume has seen.
    VolumeEpoch(u64),
    /// The volume's role as the replicator reports it (polled), with the
    /// newest epoch it saw. A primary volume under a core that does not run
    /// the group is stopped and demoted again (with a backoff) until it is
    /// secondary; a primary core whose volume went secondary at its epoch or
    /// later (an admin's `replicator secondary`) steps down.
    VolumeRole {
        primary: bool,
        epoch: u64,
    },
    /// The services' stop failed (`stopped: false`: they may still run) or
    /// finished. A node that does not run the group stops them again, with
    /// the same backoff as a stray primary volume, until they stopped.
    ServicesStopped {
        stopped: bool,
    },
}

/// Effects for the shell, in the order they must happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Propose(Entry),
    /// `replicator primary RES --epoch N`, answered with `Input::Promoted`
    /// or `Input::PromoteRefused`; nothing starts above the volume before
    /// `Promoted`.
    Promote {
        epoch: u64,
    },
    Resume,
    Freeze,
    StartServices,
    RestartServices,
    /// In reverse order of start.
    StopServices,
    Demote,
    /// Run the fence agents (levels in order) with action=off on `node`.
    Fence {
        node: NodeId,
    },
}

/// What this node is doing with the group, named for what it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Secondary,
    /// Granted; waiting for the previous owner's lease to end or its fence.
    ExpectLeaseEndOrFence {
        epoch: u64,
        wait_until_ms: u64,
        fencing: Option<NodeId>,
    },
    /// `Action::Promote { epoch }` was issued: waiting for the volume's
    /// answer. The volume may already be primary (so a step-down demotes),
    /// but nothing runs above it.
    ExpectPromoted {
        epoch: u64,
    },
    /// Promoted with `epoch`; writes while `frozen` is false.
    Primary {
        epoch: u64,
        promoted_ms: u64,
    },
    /// A planned release: services stopping and the volume demoting while
    /// the lease is still renewed; `demoted` once the shell confirmed.
    Releasing {
        epoch: u64,
        demoted: bool,
    },
}

/// The per-node failover state machine (see the module docs for call order).
#[derive(Debug)]
pub struct Failover {
    cfg: FailoverConfig,
    state: GroupState,
    role: Role,
    now_ms: u64,
    peer_alive: Option<bool>,
    quorum: bool,
    local_disk: DiskState,
    replication_connected: bool,
    peer_in_sync: bool,
    /// When this node last applied a grant or a current-epoch renewal.
    owner_activity_ms: u64,
    renew_seq: u64,
    renewals_inflight: VecDeque<(u64, u64)>,
    next_renew_ms: u64,
    lease_until_ms: u64,
    next_propose_ms: u64,
    frozen: bool,
    services_started: bool,
    failures: VecDeque<u64>,
    /// A restart of the services after a resource failure waits until then.
    restart_at_ms: Option<u64>,
    /// The services were stopped because the lease ran short.
    services_stopped_for_lease: bool,
    /// Refusals of the current grant's promotion so far (the retry backoff).
    promote_refusals: u32,
    /// The volume was last reported primary.
    volume_primary: bool,
    /// The services' last stop failed: they may still run.
    services_stuck: bool,
    /// The daemon is shutting down (SIGTERM): it gives the group up and
    /// never asks for it again.
    draining: bool,
    /// A stray primary volume is stopped and demoted again no earlier than
    /// this; `volume_fixes` counts the attempts (the backoff).
    next_volume_fix_ms: u64,
    volume_fixes: u32,
    /// Numbers this node's disk reports; the newest UpToDate report about
    /// the peer not yet superseded by a committed Outdated one (0: none).
    disk_reports: u64,
    up_to_date_claim: u64,
    /// The epoch of the last grant this incarnation proposed for itself.
    proposed_grant: Option<u64>,
    /// A release given up before promotion is recorded no earlier than
    /// the end of this node's wait for the owner before it (0: no bound).
    release_not_before_ms: u64,
    /// The newest epoch the local volume has seen (grants must exceed it).
    volume_epoch: u64,
    actions: VecDeque<Action>,
}

impl Failover {
    /// A core on a node that just started: it first makes sure the group is
    /// stopped here (the volume is never writable across a restart).
    pub fn new(cfg: FailoverConfig, initial: GroupState, local_disk: DiskState, now_ms: u64) -> Failover {
        assert_ne!(cfg.me, cfg.peer);
        assert!(initial.disks.contains_key(&cfg.me), "{:?} is not a storage node of the group", cfg.me);
        let mut f = Failover {
            cfg,
            state: initial,
            role: Role::Secondary,
            now_ms,
            peer_alive: None,
            quorum: false,
            local_disk,
            replication_connected: false,
            peer_in_sync: false,
            owner_activity_ms: now_ms,
            renew_seq: 0,
            renewals_inflight: VecDeque::new(),
            next_renew_ms: 0,
            lease_until_ms: 0,
            next_propose_ms: now_ms,
            frozen: true,
            services_started: false,
            failures: VecDeque::new(),
            restart_at_ms: None,
            services_stopped_for_lease: false,
            promote_refusals: 0,
            volume_primary: false,
            services_stuck: false,
            draining: false,
            next_volume_fix_ms: now_ms + VOLUME_FIX_MS_MIN,
            volume_fixes: 0,
            disk_reports: 0,
            up_to_date_claim: 0,
            proposed_grant: None,
            release_not_before_ms: 0,
            volume_epoch: 0,
            actions: VecDeque::new(),
        };
        f.actions.extend([Action::Freeze, Action::StopServices, Action::Demote]);
        f
    }

    pub fn state(&self) -> &GroupState {
        &self.state
    }

    pub fn config(&self) -> &FailoverConfig {
        &self.cfg
    }

    /// Whether this node's volume accepts writes now (promoted, not frozen).
    pub fn writable(&self) -> bool {
        matches!(self.role, Role::Primary { .. } | Role::Releasing { demoted: false, .. }) && !self.frozen
    }

    /// The epoch this node is promoted with, if it is.
    pub fn promoted_epoch(&self) -> Option<u64> {
        match self.role {
            Role::Primary { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    /// A promotion was issued and its answer is awaited.
    pub fn promoting(&self) -> bool {
        matches!(self.role, Role::ExpectPromoted { .. })
    }

    /// How many times the volume refused the current grant's promotion.
    pub fn promote_refusals(&self) -> u32 {
        self.promote_refusals
    }

    pub fn replication_connected(&self) -> bool {
        self.replication_connected
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next time `handle_timeout` has something to do, strictly after
    /// the last `now_ms` seen.
    pub fn poll_timeout(&self) -> Option<u64> {
        let never = u64::MAX;
        let role = match self.role {
            Role::Secondary if self.volume_primary || self.services_stuck => {
                [self.next_volume_fix_ms, never, never, never]
            }
            Role::Secondary => [never; 4],
            Role::ExpectLeaseEndOrFence { wait_until_ms, .. } => [wait_until_ms, self.next_renew_ms, never, never],
            Role::ExpectPromoted { .. } => [self.next_renew_ms, self.lease_until_ms, never, never],
            Role::Primary { promoted_ms, .. } => [
                self.next_renew_ms.min(self.restart_at_ms.unwrap_or(never)),
                self.lease_until_ms.saturating_sub(self.cfg.stop_budget_ms),
                self.lease_until_ms,
                self.lease_until_ms.max(promoted_ms + self.cfg.lease_ms),
            ],
            Role::Releasing { demoted: false, .. } => {
                [self.next_renew_ms, self.lease_until_ms, self.next_volume_fix_ms, never]
            }
            Role::Releasing { .. } => [self.next_renew_ms, self.lease_until_ms, self.release_not_before_ms, never],
        };
        [self.next_propose_ms, self.owner_activity_ms + self.cfg.takeover_after_ms]
            .into_iter()
            .chain(role)
            .filter(|t| *t > self.now_ms && *t != never)
            .min()
    }

    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.tick(now_ms);
        self.update();
    }

    /// The admin's `cleanup`: proposes clearing `node`'s failures.
    /// A planned move away from this node (`clusterctl move`, standby): if
    /// it is the primary, stop services and demote in order while the lease
    /// is kept, then record the release so the peer takes over at once.
    /// Returns false when this node does not run the group, or the peer
    /// could not take it (failed, standby, or its disk not UpToDate).
    pub fn release(&mut self, now_ms: u64) -> bool {
        self.tick(now_ms);
        let Role::Primary { epoch, .. } = self.role else { return false };
        if !self.state.may_grant(self.cfg.peer) || self.state.disks.get(&self.cfg.peer) != Some(&DiskState::UpToDate) {
            tracing::warn!(epoch, "planned release refused: the peer cannot take the group");
            return false;
        }
        tracing::info!(epoch, "planned release: stopping services and demoting");
        self.stop_and_demote_for_release(epoch);
        true
    }

    /// A primary's ordered release: services stop, then the volume demotes,
    /// while the lease is still renewed; `Release` is proposed once the
    /// shell confirms the demotion.
    fn stop_and_demote_for_release(&mut self, epoch: u64) {
        // I/O stays as it is: stopping the services flushes through it.
        self.role = Role::Releasing { epoch, demoted: false };
        self.release_not_before_ms = 0;
        self.volume_fixes = 0;
        self.next_volume_fix_ms = self.now_ms + VOLUME_FIX_MS_MIN;
        self.services_started = false;
        self.actions.extend([Action::StopServices, Action::Demote]);
    }

    /// The daemon stops (SIGTERM): give the group up in order, as for
    /// standby (services stopped, volume demoted, the release recorded even
    /// when the peer cannot take the group), and never ask for it again.
    /// Leaving it running would let the lease lapse under services that
    /// still write.
    pub fn drain(&mut self, now_ms: u64) {
        self.tick(now_ms);
        self.draining = true;
        self.give_up_for_standby();
        self.update();
    }

    /// Whether this node holds nothing of the group any more (for a drain:
    /// not owning it, its volume and services stopped as far as known).
    pub fn drained(&self) -> bool {
        self.role == Role::Secondary && !self.volume_primary && !self.services_stuck
    }

    /// Whether this node may pet its hardware watchdog at `now_ms` (sbd's
    /// rule): always while it holds nothing of the group; while it holds
    /// something (owns the group past its grant, its volume is primary, or
    /// a stop of its services failed) only while its lease is valid and
    /// its stop path is not stuck. A node that cannot stop within its lease
    /// is therefore reset by the hardware within the watchdog's timeout of
    /// the lease's end; a node whose daemon hangs stops petting too.
    pub fn watchdog_may_pet(&self, now_ms: u64) -> bool {
        let holds = self.volume_primary
            || self.services_stuck
            || matches!(
                self.role,
                Role::ExpectPromoted { .. } | Role::Primary { .. } | Role::Releasing { demoted: false, .. }
            );
        !holds || (now_ms < self.lease_until_ms && !self.services_stuck)
    }

    /// Whether a planned release is in progress here.
    pub fn releasing(&self) -> bool {
        matches!(self.role, Role::Releasing { .. })
    }

    /// The admin's `cleanup GROUP` on this node: a stop or demotion that
    /// is being retried (a stuck stop, a stray primary volume) is retried
    /// at once instead of after its backoff, which starts over.
    pub fn retry_stop_now(&mut self, now_ms: u64) {
        self.tick(now_ms);
        self.volume_fixes = 0;
        self.next_volume_fix_ms = now_ms;
        self.update();
    }

    pub fn cleanup(&mut self, now_ms: u64, node: NodeId) {
        self.tick(now_ms);
        self.failures.clear();
        self.actions.push_back(Action::Propose(Entry::Cleanup { group: self.cfg.group, node }));
    }

    pub fn handle(&mut self, now_ms: u64, input: Input) {
        self.tick(now_ms);
        match input {
            Input::PeerAlive(n) if n == self.cfg.peer => self.peer_alive = Some(true),
            Input::PeerDead(n) if n == self.cfg.peer => self.peer_alive = Some(false),
            Input::PeerAlive(_) | Input::PeerDead(_) => {}
            Input::Quorum(q) => self.quorum = q,
            Input::Committed(entries) => {
                for entry in &entries {
                    self.committed(entry);
                }
            }
            Input::LocalDisk(d) => self.local_disk = d,
            Input::Replication { connected } => {
                // Report the peer's new disk state without delay.
                self.next_propose_ms = self.now_ms;
                self.replication_connected = connected;
                if !connected {
                    self.peer_in_sync = false;
                }
            }
            Input::PeerInSync => {
                self.next_propose_ms = self.now_ms;
                self.peer_in_sync = self.replication_connected;
            }
            Input::ResourceFailed => self.resource_failed(),
            Input::VolumeEpoch(e) => self.volume_epoch = e,
            Input::ServicesStopped { stopped } => {
                if stopped == self.services_stuck {
                    self.volume_fixes = 0;
                    self.next_volume_fix_ms = self.now_ms + VOLUME_FIX_MS_MIN;
                }
                self.services_stuck = !stopped;
            }
            Input::VolumeRole { primary, epoch } => {
                self.volume_epoch = self.volume_epoch.max(epoch);
                if primary != self.volume_primary {
                    self.volume_primary = primary;
                    self.volume_fixes = 0;
                    // Give the shell's own demotion (queued behind a stop)
                    // time before the first repeat.
                    self.next_volume_fix_ms = self.now_ms + VOLUME_FIX_MS_MIN;
                }
                if let Role::Primary { epoch: mine, .. } = self.role {
                    // Demoted at this epoch or later: not a report from
                    // before this node's own promotion.
                    if !primary && epoch >= mine {
                        tracing::warn!(epoch = mine, "the volume was demoted behind clusterd's back; stepping down");
                        self.step_down();
                    }
                }
            }
            Input::Promoted { epoch } => {
                if self.role == (Role::ExpectPromoted { epoch }) {
                    tracing::info!(epoch, refusals = self.promote_refusals, "volume promoted");
                    self.role = Role::Primary { epoch, promoted_ms: self.now_ms };
                    self.frozen = true;
                    self.services_started = false;
                    self.services_stopped_for_lease = false;
                    self.restart_at_ms = None;
                    // Report the peer's disk at once: a lost peer must be
                    // recorded Outdated before this node may write.
                    self.next_propose_ms = self.now_ms;
                }
            }
            Input::PromoteRefused { epoch } => {
                if self.role == (Role::ExpectPromoted { epoch }) {
                    let pause = backoff_ms(PROMOTE_RETRY_MS_MIN, PROMOTE_RETRY_MS_MAX, self.promote_refusals);
                    self.promote_refusals = self.promote_refusals.saturating_add(1);
                    tracing::warn!(
                        epoch,
                        refusals = self.promote_refusals,
                        retry_in_ms = pause,
                        "promotion refused; retrying while the grant holds"
                    );
                    // Back to waiting: promoted again only while the lease
                    // of this epoch holds, so never after a newer owner.
                    self.role =
                        Role::ExpectLeaseEndOrFence { epoch, wait_until_ms: self.now_ms + pause, fencing: None };
                }
            }
            Input::Demoted => {
                if let Role::Releasing { epoch, demoted: false } = self.role {
                    self.role = Role::Releasing { epoch, demoted: true };
                    self.frozen = true;
                    self.next_propose_ms = self.now_ms;
                }
            }
            Input::FenceDone { node, ok } => {
                if let Role::ExpectLeaseEndOrFence { epoch, wait_until_ms, fencing: Some(victim) } = self.role {
                    if victim == node {
                        let wait_until_ms = if ok { self.now_ms } else { wait_until_ms };
                        tracing::info!(?node, ok, "fence finished");
                        self.role = Role::ExpectLeaseEndOrFence { epoch, wait_until_ms, fencing: None };
                        // Put in standby while the fence ran: give the
                        // group up now, before `update` could promote.
                        if self.draining || self.state.standby.contains(&self.cfg.me) {
                            self.give_up_for_standby();
                        }
                    }
                }
            }
        }
        self.update();
    }

    fn tick(&mut self, now_ms: u64) {
        assert!(now_ms >= self.now_ms, "time went backwards: {now_ms} < {}", self.now_ms);
        self.now_ms = now_ms;
    }

    fn committed(&mut self, entry: &Entry) {
        let owner_activity_before = self.owner_activity_ms;
        let released_before = self.state.released;
        match self.state.apply(entry) {
            Applied::Granted { node, epoch, incarnation, previous } => {
                self.owner_activity_ms = self.now_ms;
                if node == self.cfg.me && (incarnation != self.cfg.incarnation || self.proposed_grant != Some(epoch)) {
                    // A grant this incarnation did not ask for (replayed
                    // after a restart, or asked for before a step-down):
                    // owning the group again takes the next epoch.
                    tracing::info!(epoch, "replayed grant to this node; not acting on it");
                    if self.role != Role::Secondary {
                        self.step_down();
                    }
                } else if node == self.cfg.me {
                    self.proposed_grant = None;
                    // The previous owner may still write until its lease,
                    // measured from a renewal this node saw no earlier than
                    // it was sent, has surely ended on every clock.
                    let other = previous.filter(|p| *p != self.cfg.me);
                    // A released owner demoted before recording it: no wait.
                    // The wait holds when the previous grant was this node's
                    // own too (an older incarnation, or before a step-down):
                    // that grant may never have promoted, and then the owner
                    // before it may still write until its lease ends, which
                    // the last owner activity bounds (sim seed 10378433).
                    // With watchdogs everywhere, the previous owner pets its
                    // own only until its lease ends unless it stopped: by
                    // `+ peer_watchdog_ms` it is stopped or reset, whatever
                    // hung (the margin covers the sum's drift).
                    let wait_until_ms = match previous {
                        Some(_) if !released_before => {
                            owner_activity_before
                                + self.cfg.lease_ms
                                + self.cfg.peer_watchdog_ms
                                + self.cfg.drift_margin_ms
                        }
                        _ => self.now_ms,
                    };
                    // Fence only an owner that vanished: one marked failed
                    // steps down by itself (its heartbeat may merely be cut),
                    // so its lease is waited out instead (sim seed 20400).
                    let fencing = other.filter(|p| {
                        self.cfg.fence_configured
                            && self.peer_alive == Some(false)
                            && !self.state.failed.contains(p)
                            && wait_until_ms > self.now_ms
                    });
                    tracing::info!(epoch, ?previous, wait_until_ms, "group granted to this node");
                    if let Some(victim) = fencing {
                        self.actions.push_back(Action::Fence { node: victim });
                    }
                    self.role = Role::ExpectLeaseEndOrFence { epoch, wait_until_ms, fencing };
                    self.promote_refusals = 0;
                    self.renewals_inflight.clear();
                    self.lease_until_ms = 0;
                    self.next_renew_ms = self.now_ms;
                } else if self.role != Role::Secondary {
                    tracing::warn!(?node, epoch, "group granted to another node; stepping down");
                    self.step_down();
                }
            }
            Applied::Renewed { epoch, seq } => {
                self.owner_activity_ms = self.now_ms;
                if self.owned_epoch() == Some(epoch) {
                    while let Some(&(s, sent_ms)) = self.renewals_inflight.front() {
                        if s > seq {
                            break;
                        }
                        self.renewals_inflight.pop_front();
                        if s == seq {
                            self.lease_until_ms = self.lease_until_ms.max(sent_ms + self.cfg.lease_ms);
                        }
                    }
                }
            }
            Applied::Failed(node) if node == self.cfg.me && self.role != Role::Secondary => {
                tracing::warn!("group marked failed on this node; stepping down");
                self.step_down();
            }
            Applied::Disk { node, state: DiskState::Outdated, report }
                if node == self.cfg.peer && report > self.up_to_date_claim =>
            {
                // Every UpToDate report this node made came before: the log
                // now surely says Outdated.
                self.up_to_date_claim = 0;
            }
            Applied::Released(node) if node == self.cfg.me => {
                if let Role::Releasing { .. } = self.role {
                    tracing::info!("release recorded; the peer may take the group");
                    self.role = Role::Secondary;
                    self.next_volume_fix_ms = self.next_volume_fix_ms.max(self.now_ms + VOLUME_FIX_MS_MIN);
                    self.renewals_inflight.clear();
                    self.lease_until_ms = 0;
                    self.up_to_date_claim = 0;
                } else if self.role != Role::Secondary {
                    // Not this incarnation's release (replayed): step down.
                    self.step_down();
                }
            }
            Applied::Released(_) => {
                // The owner gave the group up: ask for it without delay.
                self.next_propose_ms = self.now_ms;
            }
            Applied::Standby { node, on: true } if node == self.cfg.me => self.give_up_for_standby(),
            Applied::Failed(_)
            | Applied::Cleaned(_)
            | Applied::Disk { .. }
            | Applied::Standby { .. }
            | Applied::EpochRaised(_)
            | Applied::Ignored => {}
        }
    }

    /// The admin put this node in standby: it gives the group up, in order,
    /// and records that in the log even when nobody can take the group
    /// now, so that the next owner neither waits out this node's lease nor
    /// fences a node that is merely in standby (sim seeds 10078840 and
    /// 10212197: its heartbeats to the next owner were cut).
    fn give_up_for_standby(&mut self) {
        match self.role {
            Role::Primary { epoch, .. } => {
                tracing::info!(epoch, "standby: stopping services and demoting");
                self.stop_and_demote_for_release(epoch);
            }
            // The volume may be promoted already but runs nothing: demote
            // it (after the promotion, in the shell's order) and record the
            // release while the lease holds; at the lease's end `update`
            // steps down instead.
            Role::ExpectPromoted { epoch } => {
                tracing::info!(epoch, "standby: giving up the group while its promotion runs");
                // Promoted only after the wait: no bound left.
                self.release_not_before_ms = 0;
                self.frozen = true;
                self.services_started = false;
                self.role = Role::Releasing { epoch, demoted: false };
                self.volume_fixes = 0;
                self.next_volume_fix_ms = self.now_ms + VOLUME_FIX_MS_MIN;
                self.actions.push_back(Action::Demote);
            }
            // Granted but never promoted: confirm the volume is secondary,
            // then record the release while the lease is ours. Not while a
            // fence is running: the next owner could be the node it is
            // about to power off (sim seed 10488317).
            Role::ExpectLeaseEndOrFence { epoch, fencing: None, wait_until_ms }
                if self.lease_until_ms > self.now_ms =>
            {
                tracing::info!(epoch, "standby: giving up the group before promotion");
                // The release lets the next owner skip the lease wait: it
                // must not come before this node's own wait for the owner
                // before it ended (that owner, cut off, may still write
                // until then; with watchdogs, until its reset).
                self.release_not_before_ms = wait_until_ms;
                self.frozen = true;
                self.services_started = false;
                self.role = Role::Releasing { epoch, demoted: false };
                self.volume_fixes = 0;
                self.next_volume_fix_ms = self.now_ms + VOLUME_FIX_MS_MIN;
                self.actions.push_back(Action::Demote);
            }
            // A fence is running: stepping down now would leave the grant
            // unreleased in the log, and the next owner would fence this
            // node, merely in standby (sim seed 60223264). Keep renewing;
            // the release follows the fence (`Input::FenceDone`).
            Role::ExpectLeaseEndOrFence { fencing: Some(_), .. } => {
                tracing::info!("standby: giving up the group once the running fence ends");
            }
            // No lease yet (the grant's renewal has not committed): a
            // step-down now would leave the grant unreleased, and the next
            // owner would fence this node, merely in standby (sim seed
            // 311101). Keep renewing; `update` releases once the lease
            // holds, and never promotes meanwhile.
            Role::ExpectLeaseEndOrFence { .. } => {
                tracing::info!("standby: giving up the group once a renewal commits");
            }
            Role::Releasing { .. } | Role::Secondary => {}
        }
    }

    fn owned_epoch(&self) -> Option<u64> {
        match self.role {
            Role::Secondary => None,
            Role::ExpectLeaseEndOrFence { epoch, .. }
            | Role::ExpectPromoted { epoch }
            | Role::Primary { epoch, .. }
            | Role::Releasing { epoch, .. } => Some(epoch),
        }
    }

    fn resource_failed(&mut self) {
        if !matches!(self.role, Role::Primary { .. }) {
            return;
        }
        let window_start = self.now_ms.saturating_sub(self.cfg.failure_window_ms);
        self.failures.retain(|t| *t > window_start);
        self.failures.push_back(self.now_ms);
        if self.failures.len() >= self.cfg.failures_max as usize {
            tracing::warn!(failures = self.failures.len(), "too many resource failures; marking this node failed");
            self.actions.push_back(Action::Propose(Entry::MarkFailed { group: self.cfg.group, node: self.cfg.me }));
            self.failures.clear();
            self.restart_at_ms = None;
        } else if self.restart_at_ms.is_none() {
            // Failures close together (a service that fails at once) are
            // one failure until the restart: they must not use up
            // `failures_max` before the restart could even have helped.
            let n = self.failures.len().saturating_sub(1) as u32;
            let pause = backoff_ms(RESTART_BACKOFF_MS_MIN, RESTART_BACKOFF_MS_MAX, n);
            tracing::info!(failures = self.failures.len(), restart_in_ms = pause, "resource failure; restarting later");
            self.restart_at_ms = Some(self.now_ms + pause);
        } else {
            // Already waiting to restart: the same failure reported again.
            self.failures.pop_back();
        }
    }

    fn step_down(&mut self) {
        self.restart_at_ms = None;
        self.services_stopped_for_lease = false;
        // The demotion below is under way: no repeat before it had time.
        self.next_volume_fix_ms = self.next_volume_fix_ms.max(self.now_ms + VOLUME_FIX_MS_MIN);
        // A refused promotion may still have taken effect (the command
        // timed out, its answer was lost): demote as after a promotion;
        // demoting a secondary is a no-op.
        let refused_before = matches!(self.role, Role::ExpectLeaseEndOrFence { .. }) && self.promote_refusals > 0;
        if refused_before
            || matches!(
                self.role,
                Role::ExpectPromoted { .. } | Role::Primary { .. } | Role::Releasing { demoted: false, .. }
            )
        {
            self.actions.extend([Action::Freeze, Action::StopServices, Action::Demote]);
        }
        self.frozen = true;
        self.services_started = false;
        self.role = Role::Secondary;
        self.renewals_inflight.clear();
        self.lease_until_ms = 0;
        self.up_to_date_claim = 0;
    }

    fn propose(&mut self, entry: Entry) {
        self.actions.push_back(Action::Propose(entry));
    }

    /// Re-evaluates everything after an input or timeout.
    fn update(&mut self) {
        let now = self.now_ms;
        let group = self.cfg.group;
        if let Some(epoch) = self.owned_epoch() {
            if self.quorum && now >= self.next_renew_ms {
                self.renew_seq += 1;
                if self.renewals_inflight.len() == RENEWALS_INFLIGHT_MAX {
                    self.renewals_inflight.pop_front();
                }
                self.renewals_inflight.push_back((self.renew_seq, now));
                self.next_renew_ms = now + self.cfg.renew_interval_ms;
                self.propose(Entry::Renew { group, epoch, seq: self.renew_seq });
            }
        }
        if let Role::ExpectLeaseEndOrFence { fencing: None, .. } = self.role {
            if (self.draining || self.state.standby.contains(&self.cfg.me)) && now < self.lease_until_ms {
                self.give_up_for_standby();
            }
        }
        if let Role::ExpectLeaseEndOrFence { epoch, wait_until_ms, .. } = self.role {
            // Promote only while holding a lease of the new epoch: a node
            // cut off after its grant committed never promotes after a
            // newer owner did (sim seed 44905). A node in standby never
            // promotes.
            if now >= wait_until_ms
                && now < self.lease_until_ms
                && !self.draining
                && !self.state.standby.contains(&self.cfg.me)
            {
                assert_eq!(self.state.owner, Some(self.cfg.me));
                assert_eq!(self.state.epoch, epoch);
                tracing::info!(epoch, attempt = self.promote_refusals + 1, "promoting");
                self.actions.push_back(Action::Promote { epoch });
                self.role = Role::ExpectPromoted { epoch };
                self.frozen = true;
            }
        }
        if let Role::ExpectPromoted { epoch } = self.role {
            // The answer is late: the volume may be primary, the lease is
            // over; demote it (queued after the promotion in the shell).
            if now >= self.lease_until_ms {
                tracing::warn!(epoch, "lease ended while the promotion ran; demoting");
                self.step_down();
            }
        }
        if let Role::Primary { epoch, promoted_ms } = self.role {
            let peer = self.cfg.peer;
            let committed_up_to_date = self.state.disks.get(&peer) == Some(&DiskState::UpToDate);
            // An UpToDate report may have committed without this node
            // having seen it yet: count on the peer until a later Outdated
            // report is seen committed.
            let peer_up_to_date = committed_up_to_date || self.up_to_date_claim != 0;
            let lease_over = now >= self.lease_until_ms.max(promoted_ms + self.cfg.lease_ms);
            if lease_over {
                tracing::warn!(epoch, "lease ended without renewal; stopping and demoting");
                self.step_down();
            } else {
                // The lease alone bounds the writes (a lost quorum only
                // stops the renewals): freezing on quorum loss would hold
                // the services' I/O before they could stop (issue 23).
                let writable = now < self.lease_until_ms
                    // Writes reach the peer, or the log no longer counts on it.
                    && (self.replication_connected || !peer_up_to_date)
                    && !self.state.failed.contains(&self.cfg.me);
                // Renewals stopped committing: stop the services while the
                // lease lets them flush; start them again (with a renewal
                // interval of hysteresis) once renewals commit.
                let lease_short = now + self.cfg.stop_budget_ms >= self.lease_until_ms;
                let lease_ample = now + self.cfg.stop_budget_ms + self.cfg.renew_interval_ms < self.lease_until_ms;
                if self.services_started && lease_short {
                    tracing::warn!(
                        epoch,
                        lease_left_ms = self.lease_until_ms.saturating_sub(now),
                        "renewals are not committing; stopping the services within the lease"
                    );
                    self.services_started = false;
                    self.services_stopped_for_lease = true;
                    self.restart_at_ms = None;
                    self.actions.push_back(Action::StopServices);
                }
                if writable && self.frozen {
                    self.frozen = false;
                    self.actions.push_back(Action::Resume);
                } else if !writable && !self.frozen {
                    self.frozen = true;
                    self.actions.push_back(Action::Freeze);
                }
                let may_start = if self.services_stopped_for_lease { lease_ample } else { !lease_short };
                if writable && !self.services_started && may_start {
                    if self.services_stopped_for_lease {
                        tracing::info!(epoch, "renewals commit again; starting the services");
                    }
                    self.services_started = true;
                    self.services_stopped_for_lease = false;
                    self.restart_at_ms = None;
                    self.actions.push_back(Action::StartServices);
                }
                if self.restart_at_ms.is_some_and(|at| now >= at) {
                    // A frozen primary restarts too: the services wait
                    // for I/O as they would have after the failure.
                    self.restart_at_ms = None;
                    if self.services_started {
                        self.actions.push_back(Action::RestartServices);
                    }
                }
                if self.cfg.failback
                    && self.cfg.peer_preferred
                    && !self.frozen
                    && now >= promoted_ms + self.cfg.failback_after_ms
                    && self.peer_alive == Some(true)
                    && self.replication_connected
                    && self.peer_in_sync
                    && committed_up_to_date
                    && self.state.may_grant(peer)
                {
                    tracing::info!(epoch, "failback: giving the group back to its preferred node");
                    self.release(now);
                    return;
                }
                if now >= self.next_propose_ms && self.quorum {
                    let disk = if !self.replication_connected && peer_up_to_date {
                        Some(DiskState::Outdated)
                    } else if self.replication_connected && self.peer_in_sync && !committed_up_to_date {
                        Some(DiskState::UpToDate)
                    } else {
                        None
                    };
                    if let Some(state) = disk {
                        self.next_propose_ms = now + self.cfg.repropose_ms;
                        self.disk_reports += 1;
                        let report = self.disk_reports;
                        if state == DiskState::UpToDate {
                            self.up_to_date_claim = report;
                        }
                        self.propose(Entry::Disk { group, epoch, node: peer, state, report });
                    }
                }
            }
        }
        if let Role::Releasing { epoch, demoted } = self.role {
            let peer_up_to_date =
                self.state.disks.get(&self.cfg.peer) == Some(&DiskState::UpToDate) || self.up_to_date_claim != 0;
            if now >= self.lease_until_ms {
                tracing::warn!(epoch, "lease ended during a planned release; stopping and demoting");
                self.step_down();
            } else if !self.frozen && !self.replication_connected && peer_up_to_date {
                // The same condition as a primary's: writes that would not
                // reach the peer the log counts on wait (never resumed: the
                // group is being given up). Quorum loss does not freeze:
                // the lease's end does, the stops flushing until then.
                tracing::warn!(epoch, "replication lost during a planned release; freezing");
                self.frozen = true;
                self.actions.push_back(Action::Freeze);
            } else if demoted && self.quorum && now >= self.next_propose_ms && now >= self.release_not_before_ms {
                self.next_propose_ms = now + self.cfg.repropose_ms;
                self.propose(Entry::Release { group, epoch });
            }
            if !demoted && now >= self.next_volume_fix_ms {
                // The demotion failed (a stop that hung, a volume still in
                // use): stop again (the runner retries a failed stop) and
                // demote again, while the lease is kept.
                let pause = backoff_ms(VOLUME_FIX_MS_MIN, VOLUME_FIX_MS_MAX, self.volume_fixes);
                self.volume_fixes = self.volume_fixes.saturating_add(1);
                self.next_volume_fix_ms = now + pause;
                tracing::warn!(
                    epoch,
                    attempt = self.volume_fixes,
                    "the release's demotion has not finished; stopping and demoting again"
                );
                self.actions.extend([Action::StopServices, Action::Demote]);
            }
        }
        if self.role == Role::Secondary
            && (self.volume_primary || self.services_stuck)
            && now >= self.next_volume_fix_ms
        {
            // Nothing may run above a volume this node does not own, and a
            // primary left behind blocks the peer's reconnection: stop (the
            // runner retries a failed stop, killing a busy mount's users)
            // and demote again until the volume reports secondary.
            let pause = backoff_ms(VOLUME_FIX_MS_MIN, VOLUME_FIX_MS_MAX, self.volume_fixes);
            self.volume_fixes = self.volume_fixes.saturating_add(1);
            self.next_volume_fix_ms = now + pause;
            tracing::warn!(
                attempt = self.volume_fixes,
                volume_primary = self.volume_primary,
                services_stuck = self.services_stuck,
                "the group is not stopped on a node that does not run it; stopping and demoting again"
            );
            self.actions.extend([Action::Freeze, Action::StopServices, Action::Demote]);
        }
        if self.role == Role::Secondary && self.quorum && now >= self.next_propose_ms && self.wants_grant() {
            self.next_propose_ms = now + self.cfg.repropose_ms;
            let free = self.state.owner.is_none() || self.state.released;
            if free && self.volume_epoch > self.state.epoch {
                // Raise the log's epoch past the volume's first; the grant
                // below then carries the next one.
                tracing::info!(floor = self.volume_epoch, "the volume saw newer epochs than the log");
                self.propose(Entry::EpochFloor { group, floor: self.volume_epoch });
            }
            let epoch = self.state.epoch.max(if free { self.volume_epoch } else { 0 }) + 1;
            tracing::info!(epoch, owner = ?self.state.owner, "asking for the group");
            self.proposed_grant = Some(epoch);
            self.propose(Entry::Grant { group, node: self.cfg.me, epoch, incarnation: self.cfg.incarnation });
        }
    }

    fn wants_grant(&self) -> bool {
        let me = self.cfg.me;
        if self.draining {
            return false;
        }
        if !self.state.may_grant(me) || self.local_disk == DiskState::Inconsistent {
            return false;
        }
        match self.state.owner {
            None => {
                !self.cfg.peer_preferred
                    || self.peer_alive == Some(false)
                    || self.now_ms >= self.owner_activity_ms + self.cfg.takeover_after_ms
            }
            // A released group stays with its owner if the peer cannot take it.
            Some(owner) if owner == me => !self.state.released || !self.state.may_grant(self.cfg.peer),
            Some(_) if self.state.released => true,
            Some(owner) if self.state.failed.contains(&owner) => true,
            Some(_) => {
                self.peer_alive == Some(false) && self.now_ms >= self.owner_activity_ms + self.cfg.takeover_after_ms
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: GroupId = GroupId(0);
    const A: NodeId = NodeId(0);
    const B: NodeId = NodeId(1);

    fn cfg(me: NodeId, fence: bool) -> FailoverConfig {
        FailoverConfig {
            group: G,
            me,
            peer: NodeId(1 - me.0),
            renew_interval_ms: 250,
            lease_ms: 3000,
            drift_margin_ms: 10,
            takeover_after_ms: 1000,
            peer_preferred: false,
            failback: false,
            failback_after_ms: 5000,
            repropose_ms: 500,
            fence_configured: fence,
            incarnation: 7,
            failures_max: 3,
            failure_window_ms: 10_000,
            stop_budget_ms: 1500,
            peer_watchdog_ms: 0,
        }
    }

    struct Harness {
        f: Failover,
        now: u64,
        /// The volume accepts every promotion at once (a healthy shell).
        auto_promote: bool,
    }

    impl Harness {
        fn new(me: NodeId, fence: bool) -> Harness {
            let c = cfg(me, fence);
            c.validate().unwrap();
            let mut h = Harness {
                f: Failover::new(c, GroupState::new(G, &[A, B], DiskState::UpToDate), DiskState::UpToDate, 0),
                now: 0,
                auto_promote: true,
            };
            assert_eq!(h.actions(), vec![Action::Freeze, Action::StopServices, Action::Demote]);
            h
        }

        fn actions(&mut self) -> Vec<Action> {
            let mut out: Vec<Action> = std::iter::from_fn(|| self.f.poll_action()).collect();
            if self.auto_promote {
                let promoted: Vec<u64> = out
                    .iter()
                    .filter_map(|a| if let Action::Promote { epoch } = a { Some(*epoch) } else { None })
                    .collect();
                for epoch in promoted {
                    self.f.handle(self.now, Input::Promoted { epoch });
                    out.extend(std::iter::from_fn(|| self.f.poll_action()));
                }
            }
            out
        }

        fn input(&mut self, i: Input) -> Vec<Action> {
            self.f.handle(self.now, i);
            self.actions()
        }

        fn advance_to(&mut self, t: u64) -> Vec<Action> {
            let mut out = Vec::new();
            while let Some(next) = self.f.poll_timeout().filter(|n| *n <= t) {
                self.now = next;
                self.f.handle_timeout(next);
                out.extend(self.actions());
            }
            self.now = t;
            self.f.handle_timeout(t);
            out.extend(self.actions());
            out
        }

        fn commit(&mut self, e: Entry) -> Vec<Action> {
            self.input(Input::Committed(vec![e]))
        }

        /// Advances to `t`, committing every proposal at once (a healthy log).
        fn advance_committing(&mut self, t: u64) {
            while let Some(next) = self.f.poll_timeout().filter(|n| *n <= t) {
                let a = self.advance_to(next);
                self.commit_proposals(&a);
            }
            self.now = t;
        }

        /// As `advance_committing`, returning the actions.
        fn advance_committing_collect(&mut self, t: u64) -> Vec<Action> {
            let mut out = Vec::new();
            while let Some(next) = self.f.poll_timeout().filter(|n| *n <= t) {
                let a = self.advance_to(next);
                out.extend(self.commit_proposals(&a));
                out.extend(a);
            }
            self.now = t;
            out
        }

        /// Commits every proposal among `actions`, in order.
        fn commit_proposals(&mut self, actions: &[Action]) -> Vec<Action> {
            let mut out = Vec::new();
            for a in actions {
                if let Action::Propose(e) = a {
                    out.extend(self.commit(e.clone()));
                }
            }
            out
        }
    }

    fn proposals(actions: &[Action]) -> Vec<&Entry> {
        actions.iter().filter_map(|a| if let Action::Propose(e) = a { Some(e) } else { None }).collect()
    }

    #[test]
    fn group_state_accepts_only_the_next_epoch_and_up_to_date_nodes() {
        let mut s = GroupState::new(G, &[A, B], DiskState::UpToDate);
        assert_eq!(s.apply(&Entry::Grant { group: G, node: A, epoch: 2, incarnation: 1 }), Applied::Ignored);
        assert_eq!(s.apply(&Entry::Grant { group: GroupId(9), node: A, epoch: 1, incarnation: 1 }), Applied::Ignored);
        assert_eq!(s.apply(&Entry::Grant { group: G, node: NodeId(2), epoch: 1, incarnation: 1 }), Applied::Ignored);
        assert!(matches!(
            s.apply(&Entry::Grant { group: G, node: A, epoch: 1, incarnation: 1 }),
            Applied::Granted { .. }
        ));
        // The owner of epoch 1 outdates B; a stale owner's report is ignored.
        assert_eq!(
            s.apply(&Entry::Disk { group: G, epoch: 0, node: A, state: DiskState::Outdated, report: 1 }),
            Applied::Ignored
        );
        s.apply(&Entry::Disk { group: G, epoch: 1, node: B, state: DiskState::Outdated, report: 1 });
        assert!(!s.may_grant(B), "an Outdated node while A is UpToDate");
        assert_eq!(s.apply(&Entry::Grant { group: G, node: B, epoch: 2, incarnation: 1 }), Applied::Ignored);
        s.apply(&Entry::MarkFailed { group: G, node: A });
        assert!(!s.may_grant(A) && !s.may_grant(B), "A failed, B Outdated while A is UpToDate: nobody");
        s.apply(&Entry::Cleanup { group: G, node: A });
        assert!(s.may_grant(A));
        assert_eq!(s.apply(&Entry::Renew { group: G, epoch: 0, seq: 1 }), Applied::Ignored);
        assert_eq!(s.epoch, 1);
        // No UpToDate node at all: the best remaining one may take it.
        let mut s = GroupState::new(G, &[A, B], DiskState::Outdated);
        assert!(s.may_grant(B));
        s.disks.insert(A, DiskState::Inconsistent);
        assert!(s.may_grant(A), "the rule only prefers UpToDate nodes; the core refuses Inconsistent local disks");
    }

    /// B owns epoch 1 and renewed at 100 ms; A takes over after B dies.
    fn a_with_b_owner(fence: bool) -> Harness {
        let mut h = Harness::new(A, fence);
        h.input(Input::PeerAlive(B));
        h.commit(Entry::Grant { group: G, node: B, epoch: 1, incarnation: 1 });
        h.now = 100;
        h.commit(Entry::Renew { group: G, epoch: 1, seq: 1 });
        assert!(proposals(&h.input(Input::Quorum(true))).is_empty(), "B is alive and renewing");
        h
    }

    #[test]
    fn takeover_needs_a_committed_grant_then_the_old_lease() {
        let mut h = a_with_b_owner(false);
        h.now = 1000;
        assert!(proposals(&h.input(Input::PeerDead(B))).is_empty(), "a renewal was seen within takeover_after_ms");
        let a = h.advance_to(2000);
        let grant = Entry::Grant { group: G, node: A, epoch: 2, incarnation: 7 };
        // Asked at 1100 (1000 ms without renewal), again at 1600 (not committed yet).
        assert_eq!(proposals(&a), vec![&grant, &grant]);
        assert!(!a.iter().any(|a| matches!(a, Action::Promote { .. })), "no promotion before the commit");
        let a = h.commit(grant);
        assert!(!a.iter().any(|a| matches!(a, Action::Promote { .. })), "B's lease runs until 3100 + margin");
        // A's first renewal (sent at 2000) commits: A holds a lease of
        // epoch 2, but still waits for B's.
        assert!(h.commit_proposals(&a).is_empty());
        let a = h.advance_to(3109);
        assert!(!a.iter().any(|a| matches!(a, Action::Promote { .. })));
        let a = h.advance_to(3110);
        assert!(a.contains(&Action::Promote { epoch: 2 }), "{a:?}");
        // B's disk must be recorded Outdated first (the replication link is down).
        assert!(!h.f.writable());
        let outdate = Entry::Disk { group: G, epoch: 2, node: B, state: DiskState::Outdated, report: 1 };
        assert!(proposals(&a).contains(&&outdate), "{a:?}");
        assert_eq!(h.commit(outdate), vec![Action::Resume, Action::StartServices]);
        assert!(h.f.writable());
        assert_eq!(h.f.promoted_epoch(), Some(2));
    }

    #[test]
    fn no_promotion_without_a_committed_renewal_of_the_new_epoch() {
        let mut h = a_with_b_owner(false);
        h.now = 1000;
        h.input(Input::PeerDead(B));
        h.advance_to(1100);
        let grant_actions = h.commit(Entry::Grant { group: G, node: A, epoch: 2, incarnation: 7 });
        // The wait is over, but A was cut off: none of its renewals commit.
        let a = h.advance_to(10_000);
        assert!(!a.iter().any(|a| matches!(a, Action::Promote { .. })), "{a:?}");
        // A late commit of the renewal sent at 1100 (lease until 4100) is
        // too late to promote on.
        let a = h.commit_proposals(&grant_actions);
        assert!(!a.iter().any(|a| matches!(a, Action::Promote { .. })), "{a:?}");
        // A fresh one is not.
        let a = h.advance_to(10_250);
        let a = h.commit_proposals(&a);
        assert!(a.contains(&Action::Promote { epoch: 2 }), "{a:?}");
    }

    /// A, with fencing, granted epoch 2 after B (the owner) vanished; the
    /// grant's renewal committed, B's fence issued and running.
    fn a_granted_after_b_vanished() -> Harness {
        let mut h = a_with_b_owner(true);
        h.now = 1500;
        h.input(Input::PeerDead(B));
        h.advance_to(2000);
        let a = h.commit(Entry::Grant { group: G, node: A, epoch: 2, incarnation: 7 });
        assert!(a.contains(&Action::Fence { node: B }), "{a:?}");
        h.commit_proposals(&a);
        h.now = 2100;
        h
    }

    #[test]
    fn a_successful_fence_replaces_the_wait_and_a_failed_one_does_not() {
        let mut h = a_granted_after_b_vanished();
        let a = h.input(Input::FenceDone { node: B, ok: true });
        assert!(a.contains(&Action::Promote { epoch: 2 }), "{a:?}");

        let mut h = a_granted_after_b_vanished();
        let a = h.input(Input::FenceDone { node: B, ok: false });
        assert!(!a.contains(&Action::Promote { epoch: 2 }), "a failed fence proves nothing");
        assert!(h.advance_to(3110).contains(&Action::Promote { epoch: 2 }));
    }

    #[test]
    fn a_healthy_owner_is_neither_replaced_nor_fenced() {
        let mut h = a_with_b_owner(true);
        // B's heartbeats are lost (A-B link cut) but its renewals keep
        // committing through the witness: A never asks for the group.
        h.now = 1500;
        h.input(Input::PeerDead(B));
        for t in (1600..20_000).step_by(500) {
            h.now = t;
            let a = h.commit(Entry::Renew { group: G, epoch: 1, seq: t });
            assert!(proposals(&a).is_empty() && !a.iter().any(|a| matches!(a, Action::Fence { .. })), "{a:?}");
        }
    }

    fn primary_a() -> Harness {
        let mut h = Harness::new(A, false);
        h.input(Input::PeerAlive(B));
        h.input(Input::Replication { connected: true });
        let a = h.input(Input::Quorum(true));
        let grant = Entry::Grant { group: G, node: A, epoch: 1, incarnation: 7 };
        assert_eq!(proposals(&a), vec![&grant], "nobody owns the group: ask at once");
        let a = h.commit_proposals(&a);
        let a = h.commit_proposals(&a);
        assert!(a.contains(&Action::Promote { epoch: 1 }), "no previous owner: no wait, once a renewal committed");
        assert!(h.f.writable());
        h
    }

    #[test]
    fn a_primary_without_committed_renewals_stops_within_its_lease() {
        let mut h = primary_a();
        // Quorum is lost but nobody told the core: renewals stop committing.
        let a = h.advance_to(2999);
        assert!(h.f.writable(), "the lease of the renewal sent at 0 lasts until 3000: {a:?}");
        let a = h.advance_to(3000);
        assert_eq!(
            a.iter().filter(|a| !matches!(a, Action::Propose(_))).cloned().collect::<Vec<_>>(),
            vec![Action::Freeze, Action::StopServices, Action::Demote]
        );
        assert!(!h.f.writable());
        assert_eq!(h.f.promoted_epoch(), None);
        // Owning the group again takes a new epoch.
        let a = h.advance_to(3600);
        assert!(proposals(&a).contains(&&Entry::Grant { group: G, node: A, epoch: 2, incarnation: 7 }), "{a:?}");
    }

    #[test]
    fn the_watchdog_is_petted_only_while_a_holder_has_its_lease_and_no_stuck_stop() {
        let mut h = primary_a();
        h.input(Input::VolumeRole { primary: true, epoch: 1 });
        assert!(h.f.watchdog_may_pet(h.now), "a primary within its lease");
        // Renewals stop committing: the lease of the renewal sent at 0 ends at 3000.
        h.advance_to(2999);
        assert!(h.f.watchdog_may_pet(2999));
        h.advance_to(3000);
        assert_eq!(h.f.promoted_epoch(), None, "stepped down at the lease's end");
        assert!(!h.f.watchdog_may_pet(3000), "stepped down, but the volume is still primary: the stop path runs");
        // The demotion went through: nothing is held any more.
        h.input(Input::VolumeRole { primary: false, epoch: 1 });
        assert!(h.f.watchdog_may_pet(3000));
        // A stop that failed holds the node again until it succeeds.
        h.input(Input::ServicesStopped { stopped: false });
        assert!(!h.f.watchdog_may_pet(3000));
        h.input(Input::ServicesStopped { stopped: true });
        assert!(h.f.watchdog_may_pet(3000));
        // A primary within its lease whose stop failed is stuck too.
        let mut h = primary_a();
        assert!(h.f.watchdog_may_pet(h.now));
        h.input(Input::ServicesStopped { stopped: false });
        assert!(!h.f.watchdog_may_pet(h.now), "the stop path is stuck");
        // A node that never held the group pets freely.
        let h = Harness::new(B, false);
        assert!(h.f.watchdog_may_pet(1_000_000));
    }

    #[test]
    fn with_peer_watchdogs_the_next_owner_waits_out_lease_plus_watchdog_timeout() {
        let mut c = cfg(A, false);
        c.peer_watchdog_ms = 5000;
        c.validate().unwrap();
        let mut h = Harness {
            f: Failover::new(c, GroupState::new(G, &[A, B], DiskState::UpToDate), DiskState::UpToDate, 0),
            now: 0,
            auto_promote: true,
        };
        h.actions();
        h.input(Input::PeerAlive(B));
        h.commit(Entry::Grant { group: G, node: B, epoch: 1, incarnation: 1 });
        h.now = 100;
        h.commit(Entry::Renew { group: G, epoch: 1, seq: 1 });
        h.input(Input::Quorum(true));
        h.now = 1000;
        h.input(Input::PeerDead(B));
        let a = h.advance_to(1100);
        let a = h.commit_proposals(&a);
        h.commit_proposals(&a);
        // B's lease (renewal seen at 100) + its watchdog + the margin: 8110.
        let a = h.advance_committing_collect(8109);
        assert!(!a.iter().any(|a| matches!(a, Action::Promote { .. })), "{a:?}");
        let a = h.advance_committing_collect(8110);
        assert!(a.contains(&Action::Promote { epoch: 2 }), "{a:?}");
    }

    #[test]
    fn a_primary_freezes_on_replication_loss_until_the_peer_is_outdated_and_not_on_quorum_loss() {
        let mut h = primary_a();
        // The lease bounds the writes; freezing at quorum loss held the
        // services' I/O before they could stop (issue 23).
        assert!(h.input(Input::Quorum(false)).is_empty());
        assert!(h.input(Input::Quorum(true)).is_empty());
        let a = h.input(Input::Replication { connected: false });
        assert_eq!(a[0], Action::Freeze);
        let outdate = Entry::Disk { group: G, epoch: 1, node: B, state: DiskState::Outdated, report: 1 };
        assert!(proposals(&a).contains(&&outdate), "{a:?}");
        assert_eq!(h.commit(outdate), vec![Action::Resume]);
        // Back in sync: B is UpToDate again in the log.
        h.input(Input::Replication { connected: true });
        let a = h.input(Input::PeerInSync);
        let up = Entry::Disk { group: G, epoch: 1, node: B, state: DiskState::UpToDate, report: 2 };
        assert!(proposals(&a).contains(&&up), "{a:?}");
        // The link drops before the report's commit reached this node: it
        // may have committed, so B counts as UpToDate and I/O freezes.
        let a = h.input(Input::Replication { connected: false });
        assert_eq!(a[0], Action::Freeze);
        let outdate = Entry::Disk { group: G, epoch: 1, node: B, state: DiskState::Outdated, report: 3 };
        assert!(proposals(&a).contains(&&outdate), "{a:?}");
        assert!(h.commit(up).is_empty());
        assert_eq!(h.f.state().disks[&B], DiskState::UpToDate);
        assert_eq!(h.commit(outdate), vec![Action::Resume]);
        assert!(h.f.writable());
    }

    /// Advances with a healthy log until the services restart; the time.
    fn until_restart(h: &mut Harness, limit: u64) -> u64 {
        while let Some(next) = h.f.poll_timeout().filter(|n| *n <= limit) {
            let a = h.advance_to(next);
            h.commit_proposals(&a);
            if a.contains(&Action::RestartServices) {
                return next;
            }
        }
        panic!("no restart by {limit}");
    }

    #[test]
    fn repeated_resource_failures_mark_the_node_failed_and_it_steps_down() {
        let mut h = primary_a();
        h.now = 10;
        assert!(h.input(Input::ResourceFailed).is_empty(), "the restart waits");
        assert_eq!(until_restart(&mut h, 5000), 10 + RESTART_BACKOFF_MS_MIN);
        // Failures outside the window are forgotten.
        h.advance_committing(20_000);
        assert!(h.f.writable());
        assert!(h.input(Input::ResourceFailed).is_empty());
        // Failures reported again before the restart are the same failure.
        assert!(h.input(Input::ResourceFailed).is_empty());
        assert_eq!(until_restart(&mut h, 25_000), 20_000 + RESTART_BACKOFF_MS_MIN);
        let t = h.now;
        assert!(h.input(Input::ResourceFailed).is_empty());
        assert_eq!(until_restart(&mut h, 30_000), t + 2 * RESTART_BACKOFF_MS_MIN, "the second pause is longer");
        let a = h.input(Input::ResourceFailed);
        let failed = Entry::MarkFailed { group: G, node: A };
        assert_eq!(proposals(&a), vec![&failed]);
        let a = h.commit(failed);
        assert_eq!(a, vec![Action::Freeze, Action::StopServices, Action::Demote]);
        assert!(
            proposals(&h.advance_to(30_000)).iter().all(|e| !matches!(e, Entry::Grant { .. })),
            "failed: stays put"
        );
    }

    #[test]
    fn a_replayed_grant_after_restart_is_not_acted_on() {
        // A restarts (new incarnation) and replays the log: the old grant
        // to A must not promote it; it asks for the next epoch instead.
        let mut h = Harness::new(A, false);
        h.input(Input::Quorum(true));
        h.actions();
        let a = h.commit(Entry::Grant { group: G, node: A, epoch: 1, incarnation: 3 });
        assert!(!a.iter().any(|a| matches!(a, Action::Promote { .. })), "{a:?}");
        let a = h.advance_to(1000);
        assert!(proposals(&a).contains(&&Entry::Grant { group: G, node: A, epoch: 2, incarnation: 7 }), "{a:?}");
    }

    #[test]
    fn a_restarted_node_ignores_its_old_grant_even_for_the_epoch_it_just_asked() {
        // Restarted with an empty state, A asks for epoch 1 before catching
        // up; the log then replays the grant of epoch 1 that A's previous
        // incarnation (3) got. It must not promote on it (sim seed 970).
        let mut h = Harness::new(A, false);
        let a = h.input(Input::Quorum(true));
        assert_eq!(proposals(&a), vec![&Entry::Grant { group: G, node: A, epoch: 1, incarnation: 7 }]);
        let a = h.input(Input::Committed(vec![
            Entry::Grant { group: G, node: A, epoch: 1, incarnation: 3 },
            Entry::Renew { group: G, epoch: 1, seq: 1 },
        ]));
        assert!(!a.iter().any(|a| matches!(a, Action::Promote { .. })), "{a:?}");
        assert_eq!(h.f.promoted_epoch(), None);
    }

    #[test]
    fn sticky_the_group_does_not_move_back() {
        let mut h = Harness::new(A, false);
        h.input(Input::Quorum(true));
        h.actions();
        h.commit(Entry::Grant { group: G, node: B, epoch: 1, incarnation: 1 });
        h.input(Input::PeerAlive(B));
        for t in (0..10_000).step_by(200) {
            h.now = t;
            let a = h.commit(Entry::Renew { group: G, epoch: 1, seq: t });
            assert!(proposals(&a).is_empty());
        }
    }

    #[test]
    fn a_planned_release_stops_then_demotes_then_records_and_the_peer_takes_over_at_once() {
        let mut h = primary_a();
        h.input(Input::PeerInSync);
        h.now += 10;
        // The peer's disk is UpToDate in the log (initial state): release works.
        assert!(h.f.release(h.now));
        assert_eq!(h.actions(), vec![Action::StopServices, Action::Demote]);
        assert!(h.f.writable(), "stopping services still flushes through the volume");
        // Renewals go on while the services stop.
        let a = h.advance_to(h.now + 300);
        assert!(proposals(&a).iter().any(|e| matches!(e, Entry::Renew { .. })), "{a:?}");
        h.commit_proposals(&a);
        let a = h.input(Input::Demoted);
        let release = Entry::Release { group: G, epoch: 1 };
        assert!(proposals(&a).contains(&&release), "{a:?}");
        assert!(!h.f.writable());
        assert!(h.commit(release.clone()).is_empty());
        assert_eq!(h.f.promoted_epoch(), None);
        // The peer: a released owner is no reason to wait for its lease.
        let mut b = Harness::new(B, false);
        b.input(Input::PeerAlive(A));
        b.input(Input::Replication { connected: true });
        b.input(Input::Quorum(true));
        b.actions();
        b.commit(Entry::Grant { group: G, node: A, epoch: 1, incarnation: 7 });
        b_takes_the_released_group(&mut b, release, 2);
        // A, secondary now, does not ask for the group back.
        let a = h.commit(Entry::Grant { group: G, node: B, epoch: 2, incarnation: 7 });
        assert!(proposals(&a).is_empty(), "{a:?}");
    }

    #[test]
    fn release_is_refused_when_the_peer_cannot_take_the_group_and_standby_moves_it() {
        let mut h = primary_a();
        h.commit(Entry::Standby { group: G, node: B, on: true });
        assert!(!h.f.release(h.now), "the peer is in standby");
        assert!(h.f.writable());
        h.commit(Entry::Standby { group: G, node: B, on: false });
        // This node in standby: it releases by itself.
        let a = h.commit(Entry::Standby { group: G, node: A, on: true });
        assert_eq!(a, vec![Action::StopServices, Action::Demote]);
        assert!(!h.f.state().may_grant(A));
    }

    #[test]
    fn a_primary_put_in_standby_records_its_release_even_when_the_peer_cannot_take_over() {
        let mut h = primary_a();
        h.commit(Entry::MarkFailed { group: G, node: B });
        assert!(!h.f.release(h.now), "a failed peer cannot take a planned move");
        let a = h.commit(Entry::Standby { group: G, node: A, on: true });
        assert_eq!(a, vec![Action::StopServices, Action::Demote]);
        let a = h.input(Input::Demoted);
        let release = Entry::Release { group: G, epoch: 1 };
        assert!(proposals(&a).contains(&&release), "recorded, so the next owner need not fence A: {a:?}");
        h.commit(release);
        assert_eq!(h.f.promoted_epoch(), None);
        assert!(!h.f.releasing());
    }

    #[test]
    fn an_owner_put_in_standby_while_its_fence_runs_releases_once_the_fence_ends() {
        // Sim seed 60223264: A, granted after B vanished, is fencing B when
        // the admin puts A in standby. Stepping down at once would leave
        // A's grant unreleased, and the next owner would fence A.
        let mut h = a_granted_after_b_vanished();
        let a = h.commit(Entry::Standby { group: G, node: A, on: true });
        assert!(!a.iter().any(|a| matches!(a, Action::Demote | Action::Propose(Entry::Release { .. }))), "{a:?}");
        let a = h.input(Input::FenceDone { node: B, ok: true });
        assert_eq!(a, vec![Action::Demote], "no promotion: the release starts");
        let a = h.input(Input::Demoted);
        assert!(proposals(&a).contains(&&Entry::Release { group: G, epoch: 2 }), "{a:?}");
        assert!(!h.advance_to(3110).iter().any(|a| matches!(a, Action::Promote { .. })), "standby never promotes");
    }

    #[test]
    fn an_owner_put_in_standby_before_promotion_records_its_release() {
        // A took the group from a vanished B, which it cannot fence, and
        // waits out B's lease; the admin puts A in standby meanwhile.
        let mut h = a_granted_after_b_vanished();
        let a = h.input(Input::FenceDone { node: B, ok: false });
        assert!(!a.contains(&Action::Promote { epoch: 2 }), "{a:?}");
        let a = h.commit(Entry::Standby { group: G, node: A, on: true });
        assert_eq!(a, vec![Action::Demote], "never promoted: only the demotion is confirmed");
        assert!(!h.f.writable());
        let a = h.input(Input::Demoted);
        let release = Entry::Release { group: G, epoch: 2 };
        // Not before B's lease (renewal seen at 100: 3110) surely ended:
        // the release lets the next owner skip that wait, and B may still
        // write until then.
        assert!(!proposals(&a).contains(&&release), "{a:?}");
        let mut before = Vec::new();
        while let Some(t) = h.f.poll_timeout().filter(|t| *t < 3110) {
            let a = h.advance_to(t);
            before.extend(h.commit_proposals(&a));
            before.extend(a);
        }
        assert!(!proposals(&before).contains(&&release), "{before:?}");
        let a = h.advance_to(3110);
        assert!(!a.iter().any(|a| matches!(a, Action::Promote { .. })), "standby never promotes");
        assert!(proposals(&a).contains(&&release), "{a:?}");
        h.commit(release.clone());
        assert_eq!(h.f.promoted_epoch(), None);
        assert!(!h.f.releasing());
        // B comes back with its heartbeats to A cut: a released owner is
        // neither waited for nor fenced.
        let mut b = Harness::new(B, true);
        b.input(Input::PeerDead(A));
        b.input(Input::Quorum(true));
        b.actions();
        b.commit(Entry::Grant { group: G, node: B, epoch: 1, incarnation: 1 });
        b.commit(Entry::Grant { group: G, node: A, epoch: 2, incarnation: 7 });
        let granted = b_takes_the_released_group(&mut b, release, 3);
        assert!(!granted.iter().any(|a| matches!(a, Action::Fence { .. })), "{granted:?}");
    }

    /// B applies `release` and asks for the group with `epoch`, which it
    /// promotes on as soon as its renewal commits; the grant's actions.
    fn b_takes_the_released_group(b: &mut Harness, release: Entry, epoch: u64) -> Vec<Action> {
        b.now = 100;
        let a = b.commit(release);
        let grant = Entry::Grant { group: G, node: B, epoch, incarnation: 7 };
        assert_eq!(proposals(&a), vec![&grant]);
        let granted = b.commit(grant);
        let a = b.commit_proposals(&granted);
        assert!(a.contains(&Action::Promote { epoch }), "promoted at once after the renewal: {a:?}");
        granted
    }

    #[test]
    fn replication_loss_during_a_release_freezes() {
        let mut h = primary_a();
        assert!(h.f.release(h.now));
        h.actions();
        let a = h.input(Input::Replication { connected: false });
        assert!(a.contains(&Action::Freeze), "{a:?}");
        assert!(!h.f.writable());
    }

    #[test]
    fn a_volume_with_newer_epochs_raises_the_logs_floor_before_the_grant() {
        let mut h = Harness::new(A, false);
        h.input(Input::VolumeEpoch(7));
        let a = h.input(Input::Quorum(true));
        let floor = Entry::EpochFloor { group: G, floor: 7 };
        let grant = Entry::Grant { group: G, node: A, epoch: 8, incarnation: 7 };
        assert_eq!(proposals(&a), vec![&floor, &grant]);
        let a = h.commit_proposals(&a);
        let a = h.commit_proposals(&a);
        assert!(a.contains(&Action::Promote { epoch: 8 }), "{a:?}");
        // Once a node runs the group, a floor changes nothing.
        let mut s = h.f.state().clone();
        assert_eq!(s.apply(&Entry::EpochFloor { group: G, floor: 20 }), Applied::Ignored);
        assert_eq!(s.epoch, 8);
    }

    #[test]
    fn failback_gives_the_group_back_to_a_preferred_peer_in_sync_and_only_then() {
        let mut h = primary_a();
        h.f.cfg.peer_preferred = true;
        h.f.cfg.failback = true;
        h.f.cfg.failback_after_ms = 2000;
        h.input(Input::PeerInSync);
        // Too early: the group stays.
        h.advance_committing(1500);
        assert!(h.f.writable());
        // Later, with the peer alive and in sync: a planned release.
        h.input(Input::PeerAlive(B));
        let mut released = false;
        for t in (1600..3000).step_by(100) {
            let a = h.advance_to(t);
            h.commit_proposals(&a);
            if a.contains(&Action::StopServices) {
                assert!(a.contains(&Action::Demote), "{a:?}");
                released = true;
                break;
            }
        }
        assert!(released, "no failback");
        assert!(h.f.releasing());
        // Sticky without failback, or with a peer out of sync.
        let mut h = primary_a();
        h.f.cfg.peer_preferred = true;
        h.f.cfg.failback = true;
        h.f.cfg.failback_after_ms = 0;
        h.input(Input::PeerAlive(B));
        h.advance_committing(3000);
        assert!(h.f.writable() && !h.f.releasing(), "the peer never reported in sync");
    }

    /// A after B's death, its promotion to epoch 2 issued (B's lease
    /// waited out) and its answer not given yet.
    fn a_promoting_after_b_died() -> Harness {
        let mut h = a_with_b_owner(false);
        h.auto_promote = false;
        h.now = 1000;
        h.input(Input::PeerDead(B));
        h.advance_to(1100);
        let a = h.commit(Entry::Grant { group: G, node: A, epoch: 2, incarnation: 7 });
        h.commit_proposals(&a);
        let mut promoted = false;
        while !promoted {
            let next = h.f.poll_timeout().expect("a timer runs");
            let a = h.advance_to(next);
            promoted = a.contains(&Action::Promote { epoch: 2 });
            h.commit_proposals(&a);
            assert!(h.now < 5000, "no promotion");
        }
        assert!(h.f.promoting());
        h
    }

    fn starts_something(a: &[Action]) -> bool {
        a.iter().any(|a| matches!(a, Action::Resume | Action::StartServices | Action::RestartServices))
    }

    #[test]
    fn a_refused_promotion_starts_nothing_and_is_retried_with_backoff_while_the_grant_holds() {
        // Issue 23: the replicator still saw B connected and primary (its
        // ping timeout is longer than the heartbeat's deadtime) and refused;
        // clusterd started the services anyway and marked A failed.
        let mut h = a_promoting_after_b_died();
        let mut attempts_ms = vec![h.now];
        while attempts_ms.len() < 12 {
            let a = h.input(Input::PromoteRefused { epoch: 2 });
            assert!(!starts_something(&a) && !h.f.writable(), "{a:?}");
            assert!(!proposals(&a).iter().any(|e| matches!(e, Entry::MarkFailed { .. })), "{a:?}");
            // Renewals go on (the grant holds) until the retry.
            loop {
                let next = h.f.poll_timeout().expect("a timer runs");
                let a = h.advance_to(next);
                assert!(!starts_something(&a), "{a:?}");
                assert!(!proposals(&a).iter().any(|e| matches!(e, Entry::MarkFailed { .. } | Entry::Grant { .. })));
                h.commit_proposals(&a);
                if a.contains(&Action::Promote { epoch: 2 }) {
                    attempts_ms.push(h.now);
                    break;
                }
            }
        }
        let pauses: Vec<u64> = attempts_ms.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(pauses[..4], [200, 400, 800, 1600], "{pauses:?}");
        assert!(pauses[4..].iter().all(|p| *p == PROMOTE_RETRY_MS_MAX), "{pauses:?}");
        assert_eq!(h.f.promote_refusals(), 11);
        assert_eq!(h.f.state().failed.len(), 0);
        // The volume takes it at last: now the services start, once B's
        // disk is recorded Outdated.
        let a = h.input(Input::Promoted { epoch: 2 });
        assert!(!starts_something(&a), "B not yet recorded Outdated: {a:?}");
        let a = h.commit_proposals(&a);
        assert_eq!(a, vec![Action::Resume, Action::StartServices]);
        assert!(h.f.writable());
    }

    #[test]
    fn a_promotion_still_unanswered_at_the_lease_end_is_undone() {
        let mut h = a_promoting_after_b_died();
        // Cut off: no renewal commits any more.
        let a = h.advance_to(h.now + 10_000);
        let effects: Vec<&Action> = a.iter().filter(|a| !matches!(a, Action::Propose(_))).collect();
        assert_eq!(effects, [&Action::Freeze, &Action::StopServices, &Action::Demote], "queued after the promotion");
        // Its late answer changes nothing.
        assert!(h.input(Input::Promoted { epoch: 2 }).is_empty());
        assert!(!h.f.writable() && h.f.promoted_epoch().is_none());
    }

    #[test]
    fn a_node_whose_promotion_was_refused_demotes_when_it_loses_the_grant() {
        // The refusal may have been wrong (a timed-out command that took
        // effect): losing the group demotes the volume anyway.
        let mut h = a_promoting_after_b_died();
        h.input(Input::PromoteRefused { epoch: 2 });
        let a = h.commit(Entry::Grant { group: G, node: B, epoch: 3, incarnation: 9 });
        assert!(a.contains(&Action::Demote), "{a:?}");
    }

    /// The effects among `a` (proposals left out).
    fn effects(a: &[Action]) -> Vec<Action> {
        a.iter().filter(|a| !matches!(a, Action::Propose(_))).cloned().collect()
    }

    #[test]
    fn a_primary_volume_left_under_a_secondary_core_is_stopped_and_demoted_again_until_it_is_secondary() {
        // Issue 23: a stop hung on held I/O, the demotion failed, and the
        // volume stayed Primary and suspended with no way out.
        let mut h = primary_a();
        h.input(Input::VolumeRole { primary: true, epoch: 1 });
        h.now = 100;
        assert!(h.input(Input::Quorum(false)).is_empty());
        let a = h.advance_to(3000);
        assert_eq!(
            effects(&a),
            [Action::StopServices, Action::Freeze, Action::StopServices, Action::Demote],
            "services stopped within the lease, then the step-down at its end"
        );
        // The demotion fails: the volume stays primary. Stop and demote
        // again, 1 s after the step-down, then 1 s, 2 s, 4 s, 8 s, 8 s later.
        let mut repeats = Vec::new();
        while repeats.len() < 6 {
            let next = h.f.poll_timeout().expect("a repeat is due");
            let a = h.advance_to(next);
            if effects(&a).contains(&Action::Demote) {
                assert_eq!(effects(&a), [Action::Freeze, Action::StopServices, Action::Demote]);
                repeats.push(next);
            }
        }
        let pauses: Vec<u64> = repeats.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(repeats[0], 3000 + VOLUME_FIX_MS_MIN);
        assert_eq!(pauses, [1000, 2000, 4000, 8000, 8000]);
        // Secondary at last: no more repeats.
        h.input(Input::VolumeRole { primary: false, epoch: 1 });
        let a = h.advance_to(h.now + 60_000);
        assert!(!effects(&a).contains(&Action::Demote), "{a:?}");
        // An admin's `replicator primary` behind clusterd's back: demoted.
        h.input(Input::VolumeRole { primary: true, epoch: 1 });
        let a = h.advance_to(h.now + VOLUME_FIX_MS_MIN);
        assert!(effects(&a).contains(&Action::Demote), "{a:?}");
    }

    #[test]
    fn a_primary_whose_renewals_stop_committing_stops_its_services_within_its_lease() {
        // Issue 23: the cut-off primary froze I/O, then stopped its
        // services at the lease's end; the MTA blocked on the held device,
        // umount failed, and the volume stayed primary.
        let mut h = primary_a();
        // The renewal sent at 0 is the newest that commits: lease until
        // 3000, stop budget 1500.
        let a = h.advance_to(1499);
        assert!(effects(&a).is_empty(), "{a:?}");
        let a = h.advance_to(1500);
        assert_eq!(effects(&a), [Action::StopServices], "I/O still flows");
        assert!(h.f.writable(), "the stops flush through the volume");
        let a = h.advance_to(2999);
        assert!(effects(&a).is_empty(), "{a:?}");
        let a = h.advance_to(3000);
        assert_eq!(effects(&a), [Action::Freeze, Action::StopServices, Action::Demote]);
        assert!(!h.f.writable());

        // Renewals commit again before the lease ends: the services start
        // again, once the lease is ample (a renewal interval of hysteresis).
        let mut h = primary_a();
        let a = h.advance_to(1500);
        assert_eq!(effects(&a), [Action::StopServices]);
        let a = h.advance_to(1600);
        h.commit_proposals(&a);
        let mut restarted = false;
        for t in (1700..6000).step_by(100) {
            let a = h.advance_to(t);
            let e = effects(&h.commit_proposals(&a));
            assert!(!e.contains(&Action::Demote) && !e.contains(&Action::Freeze), "{e:?}");
            if effects(&a).contains(&Action::StartServices) || e.contains(&Action::StartServices) {
                restarted = true;
            }
        }
        assert!(restarted && h.f.writable());
    }

    #[test]
    fn cleanup_retries_a_stuck_stop_at_once() {
        let mut h = Harness::new(B, false);
        h.input(Input::ServicesStopped { stopped: false });
        assert!(h.advance_to(500).is_empty(), "the first repeat waits 1 s");
        h.f.retry_stop_now(500);
        assert_eq!(effects(&h.actions()), vec![Action::Freeze, Action::StopServices, Action::Demote]);
        // The backoff starts over: the next repeat after 1 s again.
        assert!(effects(&h.advance_to(1499)).is_empty());
        assert_eq!(effects(&h.advance_to(1500)), vec![Action::Freeze, Action::StopServices, Action::Demote]);
        // Nothing stuck: nothing to retry.
        let mut h = Harness::new(B, false);
        h.f.retry_stop_now(10);
        assert!(effects(&h.actions()).is_empty());
    }

    #[test]
    fn services_whose_stop_failed_are_stopped_again_on_a_node_that_does_not_run_the_group() {
        // Issue 23: a failed stop blocked the group for good (StopFailed
        // until an admin's cleanup), its address possibly still up.
        let mut h = primary_a();
        h.now = 100;
        let a = h.advance_to(3000);
        assert!(effects(&a).contains(&Action::Demote), "lease over: {a:?}");
        h.input(Input::VolumeRole { primary: false, epoch: 1 });
        assert!(h.input(Input::ServicesStopped { stopped: false }).is_empty());
        let mut stops = Vec::new();
        while stops.len() < 3 {
            let next = h.f.poll_timeout().expect("a repeat is due");
            assert!(next < 20_000, "{stops:?}");
            let a = h.advance_to(next);
            if effects(&a).contains(&Action::StopServices) {
                stops.push(next);
            }
        }
        assert_eq!(stops, [3000 + VOLUME_FIX_MS_MIN, 3000 + 2 * VOLUME_FIX_MS_MIN, 3000 + 4 * VOLUME_FIX_MS_MIN]);
        h.input(Input::ServicesStopped { stopped: true });
        let a = h.advance_to(h.now + 60_000);
        assert!(!effects(&a).contains(&Action::StopServices), "{a:?}");
    }

    #[test]
    fn an_owner_put_in_standby_before_its_first_renewal_commits_records_its_release() {
        // Sim seed 311101: B took a released group; standby for B committed
        // right after the grant, before its renewal. B stepped down without
        // recording a release, and A, later owner, fenced B.
        let mut b = Harness::new(B, true);
        b.input(Input::PeerAlive(A));
        b.input(Input::Quorum(true));
        b.actions();
        b.commit(Entry::Grant { group: G, node: A, epoch: 1, incarnation: 1 });
        b.now = 100;
        let a = b.commit(Entry::Release { group: G, epoch: 1 });
        let grant = Entry::Grant { group: G, node: B, epoch: 2, incarnation: 7 };
        assert_eq!(proposals(&a), vec![&grant]);
        let granted = b.commit(grant);
        let a = b.commit(Entry::Standby { group: G, node: B, on: true });
        assert!(effects(&a).is_empty(), "no step-down without a lease: {a:?}");
        let a = b.commit_proposals(&granted);
        assert_eq!(effects(&a), [Action::Demote], "never promoted: the release starts");
        let a = b.input(Input::Demoted);
        assert!(proposals(&a).contains(&&Entry::Release { group: G, epoch: 2 }), "{a:?}");
        assert!(!b.advance_to(5000).iter().any(|a| matches!(a, Action::Promote { .. })), "standby never promotes");
    }

    #[test]
    fn a_drained_primary_hands_the_group_over_in_order_and_never_asks_for_it_again() {
        // Issue 23, point 10: SIGTERM left the services running while the
        // lease lapsed.
        let mut h = primary_a();
        h.input(Input::VolumeRole { primary: true, epoch: 1 });
        h.commit(Entry::MarkFailed { group: G, node: B });
        h.f.drain(h.now);
        assert_eq!(h.actions(), [Action::StopServices, Action::Demote], "in order, even with nobody to take it");
        assert!(!h.f.drained());
        let a = h.input(Input::Demoted);
        let release = Entry::Release { group: G, epoch: 1 };
        assert!(proposals(&a).contains(&&release), "{a:?}");
        let a = h.commit(release);
        assert!(proposals(&a).is_empty(), "{a:?}");
        h.input(Input::VolumeRole { primary: false, epoch: 1 });
        assert!(h.f.drained());
        // The peer cannot take it, yet a draining node does not ask back.
        let a = h.advance_to(h.now + 10_000);
        assert!(!proposals(&a).iter().any(|e| matches!(e, Entry::Grant { .. })), "{a:?}");
    }

    #[test]
    fn a_release_whose_demotion_fails_stops_and_demotes_again_while_keeping_its_lease() {
        let mut h = primary_a();
        h.input(Input::VolumeRole { primary: true, epoch: 1 });
        assert!(h.f.release(h.now));
        assert_eq!(h.actions(), [Action::StopServices, Action::Demote]);
        // No `Demoted`: the demotion failed. The lease is renewed and the
        // stop and demotion are repeated.
        let start = h.now;
        let mut repeats = 0;
        while h.now < start + 10_000 {
            let next = h.f.poll_timeout().expect("renewals run");
            let a = h.advance_to(next);
            h.commit_proposals(&a);
            if effects(&a) == [Action::StopServices, Action::Demote] {
                repeats += 1;
            }
        }
        assert_eq!(repeats, 4, "after 1 s, 2 s, 4 s and 8 s");
        assert!(h.f.releasing());
        let a = h.input(Input::Demoted);
        assert!(proposals(&a).contains(&&Entry::Release { group: G, epoch: 1 }), "{a:?}");
    }

    #[test]
    fn a_primary_whose_volume_is_demoted_behind_its_back_steps_down_and_asks_again() {
        let mut h = primary_a();
        // A report from before the promotion (older epoch) means nothing.
        assert!(h.input(Input::VolumeRole { primary: false, epoch: 0 }).is_empty());
        assert!(h.f.writable());
        let a = h.input(Input::VolumeRole { primary: false, epoch: 1 });
        assert_eq!(effects(&a), [Action::Freeze, Action::StopServices, Action::Demote]);
        assert!(!h.f.writable());
        let a = h.advance_to(h.now + 1000);
        assert!(proposals(&a).contains(&&Entry::Grant { group: G, node: A, epoch: 2, incarnation: 7 }), "{a:?}");
    }

    #[test]
    fn config_relations_are_checked() {
        let mut c = cfg(A, false);
        c.lease_ms = 500;
        assert!(matches!(c.validate(), Err(FailoverConfigError::LeaseTooShort { .. })));
        assert!(drift_margin_ms(1000, 0) >= 1);
        // 2 % drift on a 3 s lease: at least 2·3000·0.02/0.98 ≈ 123 ms.
        assert!(drift_margin_ms(3000, 20_000) >= 123);
    }
}
