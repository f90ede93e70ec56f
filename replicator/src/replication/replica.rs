//! `Replica`: one node's replication state machine, sans-IO.
//!
//! It owns roles, disk and connection states, generation identifiers, the
//! dirty bitmap and activity log, the primary's write path (protocols
//! A/B/C, barriers, fencing freeze), the secondary's ordered apply queue,
//! resync (source and target) and online verify. It never touches a
//! socket, a file or a clock:
//!
//! - inputs are `handle_*(now_ms, …)` calls and admin methods;
//! - outputs are [`Action`]s drained with [`Replica::poll_action`], which the
//!   shell must carry out **in order**; `Persist*` actions are synchronous
//!   (durable before the next action runs), everything else is started and
//!   its result comes back as an input;
//! - [`Replica::poll_timeout`] says when to call [`Replica::handle_timeout`].
//!
//! `P` is the shell's data buffer; the core clones it when the same data
//! goes to the disk and to the peer, and otherwise only moves it.

use std::collections::{BTreeMap, VecDeque};
use std::ops::RangeInclusive;

use serde::Serialize;
use tracing::{debug, info, warn};

use super::activity_log::ActivityLog;
use super::apply::{ApplyQueue, InKind, Incoming, Started};
use super::bitmap::Bitmap;
use super::generations::{self, AfterSplitBrain, Decision, Side};
use super::message::{AckKind, DiskState, Hello, Message, PeerState, Protocol, ResyncDone, Role, WriteKind};
use super::resync::{Resync, Verify};
use super::transfer_log::{Settled, TransferLog};
use super::wire::FrameError;
use crate::limits;
use crate::metadata::Generations;

pub type AppId = u64;
pub type IoId = u64;
pub type LinkId = u64;

/// What a primary does when it loses its peer (DRBD's `fencing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fencing {
    /// Carry on alone.
    DontCare,
    /// Run the fence handler (to outdate the peer), without waiting.
    ResourceOnly,
    /// Freeze I/O, run the fence handler, resume only when it succeeds.
    ResourceAndStonith,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub resource: String,
    pub node_name: String,
    pub node_id: u32,
    pub size_bytes: u64,
    pub granularity_bytes: u32,
    pub al_extent_bytes: u32,
    pub al_extents_max: u32,
    pub protocol: Protocol,
    pub fencing: Fencing,
    pub after_split_brain: AfterSplitBrain,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub io_timeout_ms: u64,
    pub resync_rate_min_bytes_per_sec: u64,
    pub resync_rate_max_bytes_per_sec: u64,
    pub resync_chunk_bytes: u32,
    pub resync_inflight_bytes_max: u64,
    pub resync_checksums: bool,
    /// Protocol A: write data sent to the peer and not yet acknowledged
    /// written, at most (like DRBD's `sndbuf-size`); a write that would
    /// exceed it waits, so a link slower than the disk cannot grow memory
    /// without bound.
    pub send_queue_bytes_max: u64,
    /// What a protocol A primary does when that queue is full.
    pub on_congestion: OnCongestion,
    /// Seeds the generation-id generator (a fresh random value in production).
    pub seed: u64,
}

/// Protocol A with a full send queue (DRBD's `on-congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCongestion {
    /// New writes wait for the peer's acks (the default: the peer stays
    /// as current as protocol A allows).
    #[default]
    Block,
    /// New writes are only marked in the bitmap (the primary is Ahead, the
    /// outdated peer Behind) until everything sent is acknowledged; then a
    /// resync sends what was marked. Writes never wait for a slow link.
    PullAhead,
}

/// What the shell loaded from the metadata at start.
#[derive(Debug, Clone)]
pub struct Persisted {
    pub generations: Generations,
    pub consistent: bool,
    pub outdated: bool,
    pub primary: bool,
    pub crashed_primary: bool,
    pub clean_shutdown: bool,
    pub epoch: u64,
    pub bitmap_words: Vec<u64>,
    pub al_extents: Vec<u32>,
}

/// The persistent state the shell must write (superblock fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MetaState {
    pub generations: Generations,
    pub consistent: bool,
    pub outdated: bool,
    pub primary: bool,
    pub crashed_primary: bool,
    pub clean_shutdown: bool,
    pub epoch: u64,
}

/// An application write handed to [`Replica::handle_write`].
#[derive(Debug)]
pub struct AppWrite<P> {
    pub id: AppId,
    pub offset: u64,
    pub len: u32,
    pub kind: WriteKind,
    pub fua: bool,
    /// `Some` exactly for [`WriteKind::Write`].
    pub data: Option<P>,
}

/// Reads are resync and verify reads (application reads bypass the core).
/// `bulk`: resync data, which the shell need not keep cached.
#[derive(Debug)]
pub enum DiskOp<P> {
    Write {
        offset: u64,
        len: u32,
        kind: WriteKind,
        fua: bool,
        data: Option<P>,
        bulk: bool,
    },
    Read {
        offset: u64,
        len: u32,
    },
    /// crc32 of the range.
    Checksum {
        offset: u64,
        len: u32,
    },
    Flush,
}

#[derive(Debug)]
pub enum DiskOutput<P> {
    Done,
    Data(P),
    Checksum(u32),
}

#[derive(Debug)]
pub enum Action<P> {
    /// Write the superblock fields durably before the next action.
    PersistMeta(MetaState),
    /// Write [`Replica::bitmap`] durably before the next action.
    PersistBitmap,
    /// Write the activity log's extent set durably before the next action.
    PersistActivityLog(Vec<u32>),
    Disk {
        io: IoId,
        op: DiskOp<P>,
    },
    Send {
        link: LinkId,
        msg: Message<P>,
    },
    /// Answer an application request (errno on failure).
    Complete {
        id: AppId,
        result: Result<(), i32>,
    },
    /// Drop this link; if [`Replica::wants_link`], connect again later.
    CloseLink {
        link: LinkId,
    },
    /// Run the fence handler against the peer; answer with
    /// [`Replica::handle_fence_result`].
    Fence,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("the peer is primary; demote it first (`replicator secondary` on the peer)")]
    PeerIsPrimary,
    #[error("the local disk is {0:?}, not UpToDate; promote anyway with --force (the peer's newer data will be overwritten)")]
    NotUpToDate(DiskState),
    #[error("epoch {given} is not newer than epoch {seen} already seen; give a larger epoch or none")]
    StaleEpoch { given: u64, seen: u64 },
    #[error("already primary (give a newer --epoch to raise this primary's epoch)")]
    AlreadyPrimary,
    #[error("not primary")]
    NotPrimary,
    #[error("{0} writes still in flight; wait for them or disconnect the clients first")]
    WritesInFlight(usize),
    #[error("verify needs a connected peer with both disks UpToDate (now {0})")]
    CannotVerify(String),
    #[error("invalidate is refused on a primary; demote first")]
    InvalidatePrimary,
    #[error("the connection handshake is in progress; retry in a moment")]
    Handshaking,
    #[error("recovering from a crash: the disk is being flushed; retry in a moment")]
    Recovering,
    #[error(
        "already connected: --discard-my-data applies to the next handshake only; run `replicator disconnect` \
         first, then `replicator connect --discard-my-data`"
    )]
    DiscardWhileConnected,
}

/// Connection states, as DRBD users know them (shared with clusterd).
pub use replicator_api::ConnState;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub resource: String,
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
    pub connection: ConnState,
    pub peer_role: Option<Role>,
    pub peer_disk: Option<DiskState>,
    pub peer_node: Option<String>,
    pub protocol: Protocol,
    pub epoch: u64,
    pub generations: Generations,
    pub out_of_sync_bytes: u64,
    pub suspended: bool,
    pub resync: Option<Progress>,
    pub verify: Option<Progress>,
    pub verify_out_of_sync_bytes: u64,
    pub last_error: Option<String>,
    /// `connect --discard-my-data` waits for the next handshake.
    pub discard_my_data: bool,
    pub writes_in_flight: usize,
    pub resync_sent_bytes: u64,
    pub resync_received_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerWait {
    /// The link was down when the write was issued (or went down): it is in
    /// the bitmap instead.
    NotReplicated,
    Sent,
    Received,
    Done,
}

#[derive(Debug)]
struct Write {
    offset: u64,
    len: u32,
    extents: RangeInclusive<u32>,
    local: Option<Result<(), i32>>,
    peer: PeerWait,
    /// The application has its answer (protocols A and B answer before the
    /// peer's final ack; the entry stays until then).
    answered: bool,
    /// The peer acknowledged writing it.
    peer_wrote: bool,
    /// Payload bytes it put on the link (counted in `unacked_bytes`).
    sent_bytes: u32,
    /// A later write to an overlapping range was marked out of sync while
    /// this one was tracked: its own peer ack must not clear those bits.
    superseded: bool,
}

#[derive(Debug)]
struct Flush {
    local: Option<Result<(), i32>>,
    peer: PeerWait,
}

/// What a disk flush the core issued is for.
#[derive(Debug, Clone, Copy)]
enum FlushFor {
    /// A client FLUSH, which also closed transfer-log epoch `epoch`.
    App { id: AppId, epoch: Option<u64> },
    /// Closing transfer-log epoch `epoch` without a client FLUSH.
    Epoch(u64),
}

#[derive(Debug)]
enum Deferred<P> {
    Write { id: AppId, offset: u64, len: u32, kind: WriteKind, fua: bool, data: Option<P> },
    Flush { id: AppId },
}

/// Something sent that awaits an answer from the peer, by seq.
#[derive(Debug, Clone, Copy)]
enum Outstanding {
    Write(AppId),
    Flush(FlushFor),
    Resync,
    Verify,
}

#[derive(Debug)]
enum IoPurpose {
    AppWrite(AppId),
    Flush(FlushFor),
    /// A secondary making resync data durable before acknowledging it.
    ReplyFlush {
        link: LinkId,
    },
    /// After a crash: what the previous run left in the page cache is
    /// made durable before this run relies on it.
    StartupFlush,
    /// A secondary applying something the peer sent.
    Apply {
        link: LinkId,
    },
    ResyncRead {
        link: LinkId,
        seq: u64,
    },
    VerifyRead {
        link: LinkId,
        seq: u64,
    },
}

#[derive(Debug)]
enum Conn {
    StandAlone,
    Connecting,
    /// Hello sent; `sent` is what it said about us, which the decision must
    /// use (the peer decides from exactly that).
    Handshaking {
        link: LinkId,
        since_ms: u64,
        sent: Side,
    },
    Established(Box<Peer>),
}

#[derive(Debug)]
struct Peer {
    link: LinkId,
    name: String,
    role: Role,
    disk: DiskState,
    last_rx_ms: u64,
    last_tx_ms: u64,
    ping_sent_ms: Option<u64>,
    sync: Sync,
    /// This connection reached the replicating state (a primary starts a new
    /// generation when it loses such a peer, not after a failed handshake).
    replicating: bool,
    /// Protocol A pulled ahead of a congested link (`OnCongestion::PullAhead`).
    lag: Lag,
}

/// Whether writes reach the peer while connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lag {
    InStep,
    /// This primary only marks new writes until what it sent is acknowledged.
    Ahead,
    /// This secondary was told it no longer gets every write: Outdated
    /// until the resync.
    Behind,
}

/// What the connection is doing besides replicating application writes.
/// The resync and verify drivers themselves live in `Replica::resync` and
/// `Replica::verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    None,
    /// Waiting for the peer's bitmap before the resync can start.
    SourceWaitBitmap,
    Source,
    /// Sent my bitmap; applying resync data until ResyncDone.
    Target,
    Verify,
}

pub struct Replica<P> {
    cfg: Config,
    role: Role,
    disk: DiskState,
    generations: Generations,
    consistent: bool,
    outdated: bool,
    crashed_primary: bool,
    /// Newest primary epoch seen (own epoch while primary).
    epoch: u64,
    bitmap: Bitmap,
    al: ActivityLog,
    conn: Conn,
    frozen: bool,
    /// I/O held by `suspend-io` (the cluster manager lost its lease): only
    /// `resume-io` or a demotion ends it, never a fence result or a peer.
    held: bool,
    /// A primary that lost its peer starts a new data generation at its
    /// first write that the peer does not get (persisted before that write
    /// is issued), not when the peer goes away: a primary cut off and
    /// demoted before writing anything then resyncs from the new primary
    /// instead of looking like a split brain. (A node promoted without a
    /// peer starts one at once.)
    rotate_on_write: bool,
    fence_running: bool,
    discard_my_data: bool,
    writes: BTreeMap<AppId, Write>,
    flushes: BTreeMap<AppId, Flush>,
    /// Settled writes not yet known durable on both disks.
    tl: TransferLog,
    /// An activity-log extent was refused (every logged extent busy): the
    /// transfer log closes epochs at once so that extents are released.
    al_starved: bool,
    /// `demote` waits for the transfer log to retire before the role
    /// changes (the activity log may be emptied only then).
    demote_pending: bool,
    /// A sync target's resync answers, held until a flush makes the data
    /// they vouch for durable (`replies_flushing`: those the flush in
    /// flight covers).
    replies_unflushed: Vec<Message<P>>,
    replies_flushing: Vec<Message<P>>,
    reply_flush: Option<IoId>,
    /// After an unclean stop, the startup flush is still out: no link, no
    /// promotion. (The previous run's writes may still be only in the page
    /// cache, which a later power loss takes: a resync must not send them,
    /// nor an activity-log extent forget them, before they are durable;
    /// sim seed 74124779.)
    recovering: bool,
    /// A sync target's view of its resync: (estimated total bytes, bytes
    /// received before it started, start time). The source holds the real
    /// bitmap; the target knows its own and the count the source had.
    target_sync: Option<(u64, u64, u64)>,
    deferred: VecDeque<Deferred<P>>,
    outstanding: BTreeMap<u64, (Outstanding, u64)>,
    /// Write data sent and not yet acknowledged written (or failed).
    unacked_bytes: u64,
    ios: BTreeMap<IoId, IoPurpose>,
    apply: ApplyQueue<P>,
    next_io: IoId,
    next_seq: u64,
    barrier: u64,
    completed_since_barrier: bool,
    last_app_write_ms: u64,
    rng: u64,
    actions: VecDeque<Action<P>>,
    last_error: Option<String>,
    verify_oos_bytes: u64,
    resync_sent_bytes: u64,
    resync_received_bytes: u64,
    last_bitmap_persist_ms: u64,
    bitmap_unpersisted: bool,
    resync: Option<Resync>,
    verify: Option<Verify>,
    /// The latest `now_ms` given to any input.
    now_ms: u64,
    /// A role change was sent and the peer has not yet answered the ping
    /// that follows it (so it may not have applied it).
    state_unconfirmed: bool,
}

impl<P: Clone> Replica<P> {
    /// Starts from persisted state. After a crash (no clean shutdown) of a
    /// primary, the activity log's extents are merged into the bitmap and the
    /// node is marked crashed-primary, both persisted before anything else.
    pub fn new(cfg: Config, persisted: Persisted, now_ms: u64) -> Replica<P> {
        let bitmap = Bitmap::from_words(cfg.size_bytes, cfg.granularity_bytes, &persisted.bitmap_words);
        let al = ActivityLog::new(cfg.al_extent_bytes, cfg.al_extents_max, &persisted.al_extents);
        let disk = if !persisted.consistent {
            DiskState::Inconsistent
        } else if persisted.outdated {
            DiskState::Outdated
        } else {
            DiskState::UpToDate
        };
        let mut r = Replica {
            role: if persisted.primary && persisted.clean_shutdown { Role::Primary } else { Role::Secondary },
            disk,
            generations: persisted.generations,
            consistent: persisted.consistent,
            outdated: persisted.outdated,
            crashed_primary: persisted.crashed_primary,
            epoch: persisted.epoch,
            bitmap,
            al,
            conn: Conn::Connecting,
            frozen: false,
            held: false,
            rotate_on_write: false,
            fence_running: false,
            discard_my_data: false,
            writes: BTreeMap::new(),
            flushes: BTreeMap::new(),
            tl: TransferLog::default(),
            al_starved: false,
            demote_pending: false,
            replies_unflushed: Vec::new(),
            replies_flushing: Vec::new(),
            reply_flush: None,
            recovering: false,
            target_sync: None,
            deferred: VecDeque::new(),
            outstanding: BTreeMap::new(),
            unacked_bytes: 0,
            ios: BTreeMap::new(),
            apply: ApplyQueue::default(),
            next_io: 1,
            next_seq: 1,
            barrier: 0,
            completed_since_barrier: false,
            last_app_write_ms: 0,
            rng: cfg.seed | 1,
            actions: VecDeque::new(),
            last_error: None,
            verify_oos_bytes: 0,
            resync_sent_bytes: 0,
            resync_received_bytes: 0,
            last_bitmap_persist_ms: now_ms,
            bitmap_unpersisted: false,
            resync: None,
            verify: None,
            now_ms,
            state_unconfirmed: false,
            cfg,
        };
        if !persisted.clean_shutdown && persisted.primary {
            let extents = persisted.al_extents.clone();
            for e in &extents {
                let start = u64::from(*e) * r.al.extent_bytes();
                if start < r.cfg.size_bytes {
                    let len = r.al.extent_bytes().min(r.cfg.size_bytes - start);
                    r.bitmap.set_bytes(start, len);
                }
            }
            r.crashed_primary = true;
            warn!(
                resource = %r.cfg.resource,
                extents = extents.len(),
                "recovering from a crash while primary: activity-log extents marked for resync; starting as secondary"
            );
            r.actions.push_back(Action::PersistBitmap);
        }
        if !persisted.clean_shutdown && !persisted.primary && r.disk == DiskState::UpToDate {
            r.outdate_after_secondary_crash();
        }
        // Running: a crash from here on is not a clean shutdown; a primary
        // that restarts cleanly stays primary.
        r.persist_meta_with(false);
        // (Fresh metadata never held replicated data: nothing to make durable.)
        if !persisted.clean_shutdown && persisted.generations.current != Generations::JUST_CREATED {
            r.recovering = true;
            let io = r.take_io(IoPurpose::StartupFlush);
            r.actions.push_back(Action::Disk { io, op: DiskOp::Flush });
        }
        r
    }

    /// A secondary acknowledges a write before it is on stable storage
    /// (protocols A and B on receipt, C once its cache holds it; only the
    /// epoch's flush makes it durable), so one that crashed or lost power
    /// may lack writes its primary acknowledged. Like DRBD's restarted node
    /// (Consistent, not UpToDate), it is not promoted on its own word: it
    /// is Outdated until its peer confirms or resyncs it (the handshake
    /// clears it; the peer's transfer log marked whatever this node may
    /// have lost), or the admin forces a promotion. Without this, a
    /// secondary that crashed, then a primary that crashed before noticing,
    /// left the secondary promotable with writes missing that only the dead
    /// primary held; the primary's return then resynced them away (sim seed
    /// 10023229; under protocol C with power loss, issue 19).
    fn outdate_after_secondary_crash(&mut self) {
        warn!(
            resource = %self.cfg.resource,
            protocol = ?self.cfg.protocol,
            "recovering from a crash while secondary: writes the primary acknowledged may be missing here; \
             Outdated until the peer confirms the data (`replicator primary --force` overrides)"
        );
        self.outdated = true;
        self.disk = DiskState::Outdated;
    }

    // ----- queries -----

    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn disk(&self) -> DiskState {
        self.disk
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn generations(&self) -> Generations {
        self.generations
    }

    /// Primary, not frozen: application writes will be completed.
    pub fn is_writable(&self) -> bool {
        self.role == Role::Primary && !self.io_suspended() && !self.demote_pending
    }

    pub fn is_frozen(&self) -> bool {
        self.io_suspended()
    }

    /// Completions and deferred requests wait: fencing froze I/O, or the
    /// admin (cluster manager) held it.
    fn io_suspended(&self) -> bool {
        self.frozen || self.held
    }

    /// The shell should keep (re)connecting.
    pub fn wants_link(&self) -> bool {
        matches!(self.conn, Conn::Connecting) && !self.recovering
    }

    pub fn link(&self) -> Option<LinkId> {
        match &self.conn {
            Conn::Handshaking { link, .. } => Some(*link),
            Conn::Established(p) => Some(p.link),
            _ => None,
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.conn, Conn::Established(_))
    }

    /// Connected, no resync or bitmap exchange under way.
    pub fn is_in_sync(&self) -> bool {
        matches!(&self.conn, Conn::Established(p) if matches!(p.sync, Sync::None | Sync::Verify))
            && self.disk == DiskState::UpToDate
    }

    pub fn connection(&self) -> ConnState {
        match &self.conn {
            Conn::StandAlone => ConnState::StandAlone,
            Conn::Connecting => ConnState::Connecting,
            Conn::Handshaking { .. } => ConnState::WfReportParams,
            Conn::Established(p) => match &p.sync {
                Sync::None if p.lag == Lag::Ahead => ConnState::Ahead,
                Sync::None if p.lag == Lag::Behind => ConnState::Behind,
                Sync::None => ConnState::Connected,
                Sync::SourceWaitBitmap => ConnState::WfBitmap,
                Sync::Source => ConnState::SyncSource,
                Sync::Target => ConnState::SyncTarget,
                Sync::Verify => ConnState::VerifySource,
            },
        }
    }

    pub fn status(&self, now_ms: u64) -> Status {
        let peer = match &self.conn {
            Conn::Established(p) => Some(p),
            _ => None,
        };
        let mut resync = self.resync.as_ref().map(|r| r.progress(&self.bitmap, now_ms));
        let verify = self.verify.as_ref().map(|v| v.progress(now_ms));
        let mut out_of_sync_bytes = self.bitmap.dirty_bytes().min(self.cfg.size_bytes);
        let target = matches!(&self.conn, Conn::Established(p) if p.sync == Sync::Target);
        if let (true, Some((total, received_before, started_ms))) = (target, self.target_sync) {
            let done = self.resync_received_bytes.saturating_sub(received_before).min(total);
            let left = total - done;
            let rate = done * 1000 / now_ms.saturating_sub(started_ms).max(1);
            out_of_sync_bytes = left;
            resync = Some(Progress {
                total_bytes: total,
                done_bytes: done,
                percent: if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
                rate_bytes_per_sec: rate,
                eta_secs: (rate > 0).then(|| left / rate),
            });
        }
        Status {
            resource: self.cfg.resource.clone(),
            node: self.cfg.node_name.clone(),
            role: self.role,
            disk: self.disk,
            connection: self.connection(),
            peer_role: peer.map(|p| p.role),
            peer_disk: peer.map(|p| p.disk),
            peer_node: peer.map(|p| p.name.clone()),
            protocol: self.cfg.protocol,
            epoch: self.epoch,
            generations: self.generations,
            out_of_sync_bytes,
            suspended: self.io_suspended(),
            resync,
            verify,
            verify_out_of_sync_bytes: self.verify_oos_bytes,
            last_error: self.last_error.clone(),
            discard_my_data: self.discard_my_data,
            writes_in_flight: self.writes.len() + self.flushes.len(),
            resync_sent_bytes: self.resync_sent_bytes,
            resync_received_bytes: self.resync_received_bytes,
        }
    }

    /// When [`Self::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut at = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        match &self.conn {
            Conn::Handshaking { since_ms, .. } => at(since_ms + self.cfg.io_timeout_ms),
            Conn::Established(p) => {
                match p.ping_sent_ms {
                    Some(sent) => at(sent + self.cfg.ping_timeout_ms),
                    None => at(p.last_rx_ms + self.cfg.ping_interval_ms),
                }
                if let Some((_, (_, sent))) = self.outstanding.iter().next() {
                    at(sent + self.cfg.io_timeout_ms);
                }
                if let Some(t) = self.resync.as_ref().and_then(|r| r.wake_at()) {
                    at(t);
                }
                if self.bitmap_unpersisted {
                    at(self.last_bitmap_persist_ms + BITMAP_PERSIST_INTERVAL_MS);
                }
            }
            _ => {}
        }
        if let Some(t) = self.tl.close_due_ms() {
            at(t);
        }
        next
    }

    // ----- application requests -----

    /// An application write (only a primary gets these; the shell refuses
    /// writes elsewhere). Completed later with [`Action::Complete`].
    pub fn handle_write(&mut self, now_ms: u64, w: AppWrite<P>) {
        self.now_ms = now_ms;
        self.last_app_write_ms = now_ms;
        let AppWrite { id, offset, len, kind, fua, data } = w;
        if self.role != Role::Primary || self.demote_pending || matches!(self.disk, DiskState::Failed) {
            self.actions.push_back(Action::Complete { id, result: Err(libc::EROFS) });
            return;
        }
        if !self.in_volume(offset, len) {
            self.actions.push_back(Action::Complete { id, result: Err(libc::EINVAL) });
            return;
        }
        self.deferred.push_back(Deferred::Write { id, offset, len, kind, fua, data });
        self.pump_deferred(now_ms);
    }

    pub fn handle_flush(&mut self, now_ms: u64, id: AppId) {
        self.now_ms = now_ms;
        if self.role != Role::Primary || self.demote_pending {
            self.actions.push_back(Action::Complete { id, result: Err(libc::EROFS) });
            return;
        }
        self.deferred.push_back(Deferred::Flush { id });
        self.pump_deferred(now_ms);
    }

    /// Issues deferred requests in order until one must wait.
    fn pump_deferred(&mut self, now_ms: u64) {
        while let Some(front) = self.deferred.front() {
            if self.io_suspended() || self.apply.draining().is_some() {
                return;
            }
            match front {
                Deferred::Write { offset, len, .. } => {
                    let (offset, len) = (*offset, *len);
                    if self.resync_conflict(offset, len) {
                        return;
                    }
                    if self.send_queue_full(u64::from(len)) && !self.pull_ahead(now_ms) {
                        return;
                    }
                    let extents = self.al.extents(offset, u64::from(len));
                    match self.al.begin(extents.clone()) {
                        Err(_) => {
                            // Settled writes hold extents until their epoch
                            // retires: close it now rather than at its age.
                            self.al_starved = true;
                            self.close_epoch(now_ms);
                            return;
                        }
                        Ok(Some(change)) => {
                            if change.evicted {
                                self.persist_bitmap(now_ms);
                            }
                            self.actions.push_back(Action::PersistActivityLog(change.extents));
                        }
                        Ok(None) => {}
                    }
                    self.al_starved = false;
                    let Some(Deferred::Write { id, offset, len, kind, fua, data }) = self.deferred.pop_front() else {
                        unreachable!("front was a write")
                    };
                    self.issue_write(now_ms, id, offset, len, kind, fua, data, extents);
                }
                Deferred::Flush { .. } => {
                    let Some(Deferred::Flush { id }) = self.deferred.pop_front() else {
                        unreachable!("front was a flush")
                    };
                    self.issue_flush(now_ms, id);
                }
            }
        }
    }

    /// Protocol A answers before the peer has the data: the data waiting
    /// on the link is bounded instead (one write always goes, whatever
    /// its size).
    fn send_queue_full(&self, len: u64) -> bool {
        self.cfg.protocol == Protocol::A
            && self.lag() != Lag::Ahead
            && self.replicating_link().is_some()
            && self.unacked_bytes > 0
            && self.unacked_bytes + len > self.cfg.send_queue_bytes_max
    }

    /// A resync read of an overlapping range is in flight on this source:
    /// the write waits so the peer gets the resync data first.
    fn resync_conflict(&self, offset: u64, len: u32) -> bool {
        self.resync.as_ref().is_some_and(|r| r.reading_overlaps(offset, u64::from(len)))
    }

    #[allow(clippy::too_many_arguments)]
    fn issue_write(
        &mut self,
        now_ms: u64,
        id: AppId,
        offset: u64,
        len: u32,
        kind: WriteKind,
        fua: bool,
        data: Option<P>,
        extents: RangeInclusive<u32>,
    ) {
        assert!(self.role == Role::Primary && !self.demote_pending, "only a primary issues application writes");
        assert!(self.apply.draining().is_none(), "no local write while a lost link's writes drain");
        if self.completed_since_barrier {
            self.barrier += 1;
            self.completed_since_barrier = false;
        }
        let replicate = self.replicating_link();
        if replicate.is_none() && self.rotate_on_write {
            self.rotate_on_write = false;
            let fresh = self.fresh_generation();
            self.generations.start_new(fresh);
            // Durable before the write's disk action below.
            self.persist_meta();
        }
        // Ahead of a congested link, writes are only marked (their epoch
        // flushes still reach the peer, for the writes sent before).
        let peer = match replicate.filter(|_| self.lag() != Lag::Ahead) {
            Some(link) => {
                let seq = self.take_seq();
                self.outstanding.insert(seq, (Outstanding::Write(id), now_ms));
                let msg = Message::Data {
                    seq,
                    epoch: self.epoch,
                    barrier: self.barrier,
                    offset,
                    len,
                    kind,
                    fua,
                    data: data.clone(),
                };
                self.send(now_ms, link, msg);
                // Protocol A may answer now (see try_complete_write) but still
                // waits for the peer's ack before forgetting the write, so a
                // lost link marks it dirty.
                PeerWait::Sent
            }
            None => {
                self.mark_dirty_superseding(offset, u64::from(len));
                PeerWait::NotReplicated
            }
        };
        // A write without data (trim, zeroes) still costs a frame: each
        // counts at least one unit, so their number is bounded too.
        let sent_bytes = match (peer, data.is_some()) {
            (PeerWait::Sent, true) => len.max(limits::INFLIGHT_UNIT_BYTES),
            (PeerWait::Sent, false) => limits::INFLIGHT_UNIT_BYTES,
            _ => 0,
        };
        self.unacked_bytes += u64::from(sent_bytes);
        let w = Write {
            offset,
            len,
            extents,
            local: None,
            peer,
            answered: false,
            peer_wrote: false,
            sent_bytes,
            superseded: false,
        };
        self.writes.insert(id, w);
        let io = self.take_io(IoPurpose::AppWrite(id));
        self.actions.push_back(Action::Disk { io, op: DiskOp::Write { offset, len, kind, fua, data, bulk: false } });
    }

    /// A client FLUSH: flushes both disks, and closes the transfer log's
    /// open epoch with the same two flushes.
    fn issue_flush(&mut self, now_ms: u64, id: AppId) {
        let replicate = self.replicating_link();
        let epoch = self.tl.close(replicate.is_some());
        let peer = if replicate.is_some() { PeerWait::Sent } else { PeerWait::NotReplicated };
        self.flushes.insert(id, Flush { local: None, peer });
        self.issue_flushes(now_ms, replicate, FlushFor::App { id, epoch });
    }

    /// Closes the transfer log's open epoch (if it holds anything) with a
    /// flush of both disks.
    fn close_epoch(&mut self, now_ms: u64) {
        let replicate = self.replicating_link();
        if let Some(epoch) = self.tl.close(replicate.is_some()) {
            self.issue_flushes(now_ms, replicate, FlushFor::Epoch(epoch));
        }
    }

    /// One local flush, and a `Flush` to the peer on `link`; the peer's
    /// covers everything it received before (its apply queue flushes an
    /// idle disk).
    fn issue_flushes(&mut self, now_ms: u64, link: Option<LinkId>, what: FlushFor) {
        if let Some(link) = link {
            let seq = self.take_seq();
            self.outstanding.insert(seq, (Outstanding::Flush(what), now_ms));
            self.send(now_ms, link, Message::Flush { seq, barrier: self.barrier });
        }
        let io = self.take_io(IoPurpose::Flush(what));
        self.actions.push_back(Action::Disk { io, op: DiskOp::Flush });
    }

    /// Transfer-log epochs whose flushes are both in: their writes are
    /// durable on both disks, so their bits may be cleared (unless a later
    /// write to the same blocks is still held: it decides what they hold)
    /// and their activity-log extents released.
    fn retire(&mut self, now_ms: u64) {
        let mut retired = false;
        while let Some(batch) = self.tl.pop_retired() {
            assert!(!batch.is_empty(), "an epoch closes only with writes in it");
            retired = true;
            for (i, w) in batch.iter().enumerate() {
                let (offset, len) = (w.offset, u64::from(w.len));
                let end = offset + len;
                let later = batch[i + 1..].iter().any(|x| x.offset < end && offset < x.offset + u64::from(x.len));
                if w.in_sync && !later && !self.tl.overlaps(offset, len) && !self.overlaps_tracked(offset, len) {
                    self.bitmap.clear_covered_bytes(offset, len);
                }
                self.al.end(w.extents.clone());
            }
        }
        if retired {
            self.pump_after_write();
            self.maybe_finish_demote(now_ms);
        }
    }

    /// An epoch flush answered: a failure leaves its writes out of sync.
    fn epoch_flushed(&mut self, now_ms: u64, epoch: u64, peer: bool, ok: bool) {
        let lost = if peer { self.tl.peer_flushed(epoch, ok) } else { self.tl.local_flushed(epoch, ok) };
        for (offset, len) in lost {
            self.mark_dirty(offset, u64::from(len));
        }
        if !ok && !peer {
            self.note_error("the local disk failed a flush; its recent writes are marked out of sync".into());
        }
        self.retire(now_ms);
    }

    /// The link app writes are replicated on: established, and the peer is
    /// not going to be overwritten wholesale by a full sync from us anyway.
    fn replicating_link(&self) -> Option<LinkId> {
        match &self.conn {
            Conn::Established(p) if p.replicating => Some(p.link),
            _ => None,
        }
    }

    /// Marks a range out of sync while a peer may still acknowledge earlier
    /// writes to it (pulled ahead, or a peer's failed write): those writes
    /// no longer prove the range in sync when they settle (sim seed 679:
    /// an earlier write's late ack cleared the marks of later ones).
    fn mark_dirty_superseding(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        for w in self.writes.values_mut() {
            if w.offset < end && offset < w.offset + u64::from(w.len) {
                w.superseded = true;
            }
        }
        self.mark_dirty(offset, len);
    }

    fn mark_dirty(&mut self, offset: u64, len: u64) {
        self.bitmap.set_bytes(offset, len);
        self.bitmap_unpersisted = true;
        if let Some(r) = self.resync.as_mut() {
            r.invalidate(offset, len);
        }
    }

    /// Completes application requests whose conditions are met.
    fn try_complete_write(&mut self, id: AppId) {
        if self.io_suspended() {
            return;
        }
        let Some(w) = self.writes.get(&id) else { return };
        let Some(local) = w.local else { return };
        let peer_ok = match w.peer {
            PeerWait::NotReplicated | PeerWait::Done => true,
            PeerWait::Received => self.cfg.protocol != Protocol::C,
            PeerWait::Sent => self.cfg.protocol == Protocol::A,
        };
        if !peer_ok {
            return;
        }
        // Protocol A/B may complete before the peer's final ack: keep the
        // entry (without answering twice) until that ack or a disconnect.
        let finished = matches!(w.peer, PeerWait::NotReplicated | PeerWait::Done);
        if !w.answered {
            // Later writes need a barrier only if this one is answered before
            // the peer has it on disk (protocols A and B, or no peer). When
            // the peer's Written ack came first (protocol C), the peer holds
            // it already and its apply queue need not drain before them.
            if !(w.peer == PeerWait::Done && w.peer_wrote) {
                self.completed_since_barrier = true;
            }
            self.actions.push_back(Action::Complete { id, result: local });
        }
        if finished {
            let w = self.writes.remove(&id).expect("checked above");
            // Both disks completed it; it is in sync once both flushed it
            // (the transfer log's epoch retires).
            let in_sync = w.peer_wrote && local.is_ok() && !w.superseded;
            let now = self.now_ms;
            self.tl.push(now, Settled { offset: w.offset, len: w.len, extents: w.extents, in_sync });
            if self.tl.open_len() >= super::transfer_log::EPOCH_WRITES_MAX || self.al_starved {
                self.close_epoch(now);
            }
            self.pump_after_write();
        } else if let Some(w) = self.writes.get_mut(&id) {
            w.answered = true;
        }
    }

    fn try_complete_flush(&mut self, id: AppId) {
        if self.io_suspended() {
            return;
        }
        let Some(f) = self.flushes.get(&id) else { return };
        let Some(local) = f.local else { return };
        // Protocol A does not wait for the peer's disk, for flushes either.
        if matches!(f.peer, PeerWait::Sent | PeerWait::Received) && self.cfg.protocol != Protocol::A {
            return;
        }
        self.flushes.remove(&id);
        self.actions.push_back(Action::Complete { id, result: local });
    }

    fn overlaps_tracked(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        self.writes.values().any(|w| w.offset < end && offset < w.offset + u64::from(w.len))
    }

    /// A write finished: deferred requests and a waiting resync may go on.
    fn pump_after_write(&mut self) {
        let now = self.now_ms;
        if !self.deferred.is_empty() {
            self.pump_deferred(now);
        }
        if self.resync.is_some() {
            self.pump_resync(now);
        }
    }

    // ----- disk completions -----

    pub fn handle_disk(&mut self, now_ms: u64, io: IoId, result: Result<DiskOutput<P>, i32>) {
        self.now_ms = now_ms;
        let Some(purpose) = self.ios.remove(&io) else {
            debug_assert!(false, "completion for unknown io {io}");
            return;
        };
        match purpose {
            IoPurpose::AppWrite(id) => {
                let r = result.map(|_| ());
                if let Some(w) = self.writes.get_mut(&id) {
                    w.local = Some(r);
                    if let Err(errno) = r {
                        let (offset, len) = (w.offset, u64::from(w.len));
                        // The peer may have written what we could not.
                        self.mark_dirty(offset, len);
                        self.note_error(format!(
                            "local write at {offset} failed: errno {errno}; the range is marked out of sync"
                        ));
                    }
                }
                self.try_complete_write(id);
                self.maybe_start_repair(now_ms);
                if self.resync.is_some() {
                    self.pump_resync(now_ms);
                }
            }
            IoPurpose::Flush(what) => {
                let ok = result.is_ok();
                let epoch = match what {
                    FlushFor::App { id, epoch } => {
                        if let Some(f) = self.flushes.get_mut(&id) {
                            f.local = Some(result.map(|_| ()));
                        }
                        self.try_complete_flush(id);
                        epoch
                    }
                    FlushFor::Epoch(e) => Some(e),
                };
                if let Some(e) = epoch {
                    self.epoch_flushed(now_ms, e, false, ok);
                }
            }
            IoPurpose::ReplyFlush { link } => self.reply_flush_done(now_ms, link, result.is_ok()),
            IoPurpose::StartupFlush => {
                self.recovering = false;
                if let Err(errno) = result {
                    self.note_error(format!(
                        "flushing the disk after a crash failed: errno {errno}; data from before the crash may not be durable"
                    ));
                }
            }
            IoPurpose::Apply { link } => self.apply_done(now_ms, io, link, result),
            IoPurpose::ResyncRead { link, seq } => self.resync_read_done(now_ms, link, seq, result),
            IoPurpose::VerifyRead { link, seq } => self.verify_read_done(now_ms, link, seq, result),
        }
    }

    fn apply_done(&mut self, now_ms: u64, io: IoId, link: LinkId, result: Result<DiskOutput<P>, i32>) {
        let Some(started) = self.apply.finish(io) else { return };
        let live = self.link() == Some(link);
        let failed = result.is_err();
        // Resync answers let the source clear bits: they wait for a flush
        // that makes the data durable here.
        let vouches = matches!(started, Started::Resync { .. } | Started::Checksum { verify: false, .. });
        if live {
            let ok = !failed;
            let msg = match (started, result) {
                (Started::Write { seq, .. }, _) => {
                    Message::Ack { seq, kind: if ok { AckKind::Written } else { AckKind::Failed } }
                }
                (Started::Resync { seq, len }, _) => {
                    if ok {
                        self.resync_received_bytes += u64::from(len);
                    }
                    Message::ResyncAck { seq, ok }
                }
                (Started::Flush { seq }, _) => Message::FlushAck { seq, ok },
                (Started::Checksum { seq, peer_csum, verify }, r) => {
                    let equal = matches!(r, Ok(DiskOutput::Checksum(c)) if c == peer_csum);
                    if verify {
                        let kind = match (ok, equal) {
                            (false, _) => AckKind::Failed,
                            (true, true) => AckKind::Written,
                            (true, false) => AckKind::Received,
                        };
                        Message::VerifyReply { seq, kind }
                    } else {
                        Message::ResyncCsumReply { seq, equal }
                    }
                }
            };
            if vouches && ok {
                self.replies_unflushed.push(msg);
            } else {
                self.send(now_ms, link, msg);
            }
        }
        if failed {
            self.note_error(format!("local disk failed applying a peer's {started:?}"));
            // This disk now misses a write the primary may acknowledge (or,
            // for a flush, may lose some): it must not be promoted until a
            // resync repairs it.
            let lost = matches!(started, Started::Write { .. } | Started::Flush { .. });
            if lost && self.disk == DiskState::UpToDate {
                self.outdated = true;
                self.disk = DiskState::Outdated;
                self.persist_meta();
            }
        }
        self.pump_apply(now_ms);
        if live {
            self.maybe_flush_replies(link);
        }
        if !live && self.apply.draining().is_none() {
            // The lost link's writes are all on disk: local writes may go.
            self.pump_deferred(now_ms);
        }
    }

    /// Flushes this disk for the held resync answers once no resync item
    /// is queued or in flight (the source's in-flight bound makes that
    /// happen at least once per window).
    fn maybe_flush_replies(&mut self, link: LinkId) {
        if self.reply_flush.is_some() || self.replies_unflushed.is_empty() || self.apply.resync_pending() {
            return;
        }
        self.replies_flushing = std::mem::take(&mut self.replies_unflushed);
        let io = self.take_io(IoPurpose::ReplyFlush { link });
        self.reply_flush = Some(io);
        self.actions.push_back(Action::Disk { io, op: DiskOp::Flush });
    }

    fn reply_flush_done(&mut self, now_ms: u64, link: LinkId, ok: bool) {
        self.reply_flush = None;
        let replies = std::mem::take(&mut self.replies_flushing);
        if self.link() != Some(link) {
            return;
        }
        if !ok {
            self.note_error("flushing resync data failed; those blocks stay out of sync".into());
        }
        for msg in replies {
            let msg = match msg {
                Message::ResyncAck { seq, .. } if !ok => Message::ResyncAck { seq, ok: false },
                Message::ResyncCsumReply { seq, .. } if !ok => Message::ResyncCsumReply { seq, equal: false },
                msg => msg,
            };
            self.send(now_ms, link, msg);
        }
        self.maybe_flush_replies(link);
    }

    fn pump_apply(&mut self, _now_ms: u64) {
        let Some(link) = self.apply.draining().or(self.link()) else { return };
        while let Some(item) = self.apply.next_startable() {
            let Incoming { offset, len, kind, .. } = item;
            let (op, started) = match kind {
                InKind::Write { seq, kind, fua, data } => {
                    (DiskOp::Write { offset, len, kind, fua, data, bulk: false }, Started::Write { seq, len })
                }
                InKind::Resync { seq, data } => (
                    DiskOp::Write { offset, len, kind: WriteKind::Write, fua: false, data: Some(data), bulk: true },
                    Started::Resync { seq, len },
                ),
                InKind::Flush { seq } => (DiskOp::Flush, Started::Flush { seq }),
                InKind::Checksum { seq, peer_csum, verify } => {
                    (DiskOp::Checksum { offset, len }, Started::Checksum { seq, peer_csum, verify })
                }
            };
            let io = self.take_io(IoPurpose::Apply { link });
            self.apply.started(io, offset, len, started);
            self.actions.push_back(Action::Disk { io, op });
        }
    }

    fn resync_read_done(&mut self, now_ms: u64, link: LinkId, seq: u64, result: Result<DiskOutput<P>, i32>) {
        if self.link() != Some(link) {
            return;
        }
        let Some(r) = self.resync.as_mut() else { return };
        let checksum = r.is_checksum_stage(seq);
        let msg = match result {
            Ok(DiskOutput::Data(data)) if !checksum => {
                let Some((offset, len)) = r.range(seq) else { return };
                r.sent(seq, u64::from(len));
                self.resync_sent_bytes += u64::from(len);
                Message::ResyncData { seq, offset, len, data }
            }
            Ok(DiskOutput::Checksum(csum)) if checksum => {
                let Some((offset, len)) = r.range(seq) else { return };
                r.sent(seq, 0);
                Message::ResyncCsum { seq, offset, len, csum }
            }
            Ok(_) => unreachable!("resync reads ask for data or a checksum as their stage says"),
            Err(errno) => {
                r.abandon(seq);
                self.note_error(format!("resync read failed: errno {errno}; the blocks stay out of sync"));
                self.pump_resync(now_ms);
                return;
            }
        };
        self.outstanding.insert(seq, (Outstanding::Resync, now_ms));
        self.send(now_ms, link, msg);
        // Application writes held back by this read may go now.
        self.pump_deferred(now_ms);
        self.pump_resync(now_ms);
    }

    fn verify_read_done(&mut self, now_ms: u64, link: LinkId, seq: u64, result: Result<DiskOutput<P>, i32>) {
        if self.link() != Some(link) {
            return;
        }
        let Some(v) = self.verify.as_mut() else { return };
        let Some((offset, len)) = v.range(seq) else { return };
        match result {
            Ok(DiskOutput::Checksum(csum)) => {
                self.outstanding.insert(seq, (Outstanding::Verify, now_ms));
                self.send(now_ms, link, Message::VerifyReq { seq, offset, len, csum });
            }
            _ => {
                v.take(seq);
                self.note_error(format!("verify read at {offset} failed; range marked out of sync"));
                self.mark_dirty(offset, u64::from(len));
                self.pump_verify(now_ms);
            }
        }
    }

    // ----- the link -----

    /// A transport to the peer is up and authenticated.
    pub fn handle_connected(&mut self, now_ms: u64, link: LinkId) {
        self.now_ms = now_ms;
        if !matches!(self.conn, Conn::Connecting) {
            self.actions.push_back(Action::CloseLink { link });
            return;
        }
        if self.apply.draining().is_some() || self.recovering {
            // The last link's writes (or the last run's) are still reaching
            // the disk; the shell retries after its connect interval.
            debug!(resource = %self.cfg.resource, "new link refused: the peer's last writes are still being applied");
            self.actions.push_back(Action::CloseLink { link });
            return;
        }
        self.apply.start_link();
        self.conn = Conn::Handshaking { link, since_ms: now_ms, sent: self.side() };
        let hello = self.hello();
        self.send(now_ms, link, Message::Hello(Box::new(hello)));
    }

    pub fn handle_disconnected(&mut self, now_ms: u64, link: LinkId) {
        self.now_ms = now_ms;
        if self.link() == Some(link) {
            self.lose_peer(now_ms, "connection to the peer lost".into(), false);
        }
    }

    /// A frame from the peer failed its checks: drop the link.
    pub fn handle_frame_error(&mut self, now_ms: u64, link: LinkId, error: &FrameError) {
        self.now_ms = now_ms;
        if self.link() == Some(link) {
            self.protocol_error(now_ms, format!("bad frame from the peer: {error}"));
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            resource: self.cfg.resource.clone(),
            node_name: self.cfg.node_name.clone(),
            node_id: self.cfg.node_id,
            size_bytes: self.cfg.size_bytes,
            granularity_bytes: self.cfg.granularity_bytes,
            protocol: self.cfg.protocol,
            generations: self.generations,
            role: self.role,
            disk: self.disk,
            crashed_primary: self.crashed_primary,
            epoch: self.epoch,
            discard_my_data: self.discard_my_data,
            dirty_bits: self.bitmap.count(),
        }
    }

    fn side(&self) -> Side {
        Side {
            generations: self.generations,
            consistent: matches!(self.disk, DiskState::UpToDate | DiskState::Outdated),
            crashed_primary: self.crashed_primary,
            primary: self.role == Role::Primary,
            discard_my_data: self.discard_my_data,
            dirty_bits: self.bitmap.count(),
            node_id: self.cfg.node_id,
            epoch: self.epoch,
        }
    }

    pub fn handle_message(&mut self, now_ms: u64, link: LinkId, msg: Message<P>) {
        self.now_ms = now_ms;
        if self.link() != Some(link) {
            return;
        }
        match &mut self.conn {
            Conn::Handshaking { .. } => match msg {
                Message::Hello(hello) => self.handle_hello(now_ms, link, *hello),
                _ => self.protocol_error(now_ms, "the peer sent data before its parameters".into()),
            },
            Conn::Established(p) => {
                p.last_rx_ms = now_ms;
                p.ping_sent_ms = None;
                self.handle_established(now_ms, link, msg);
            }
            Conn::StandAlone | Conn::Connecting => {}
        }
    }

    fn handle_hello(&mut self, now_ms: u64, link: LinkId, peer: Hello) {
        let mut stale_primary = false;
        let mismatch = if peer.resource != self.cfg.resource {
            Some(format!(
                "the peer serves resource {:?}, not {:?}; check the resource files",
                peer.resource, self.cfg.resource
            ))
        } else if peer.node_id == self.cfg.node_id {
            Some(format!("the peer has this node's id {}; give each node its own id", peer.node_id))
        } else if peer.size_bytes != self.cfg.size_bytes {
            Some(format!(
                "the peer's volume holds {} bytes, this one {}; make both backing disks the same size",
                peer.size_bytes, self.cfg.size_bytes
            ))
        } else if peer.granularity_bytes != self.cfg.granularity_bytes {
            Some(format!(
                "bitmap granularity differs ({} vs {} bytes); recreate metadata with the same --bitmap-granularity",
                peer.granularity_bytes, self.cfg.granularity_bytes
            ))
        } else if peer.protocol != self.cfg.protocol {
            Some(format!(
                "protocol differs ({:?} vs {:?}); use one resource file on both nodes",
                peer.protocol, self.cfg.protocol
            ))
        } else if peer.role == Role::Primary && self.role == Role::Primary {
            if peer.epoch != self.epoch {
                // The older one was superseded by its cluster manager and
                // will be demoted: keep trying, the link comes up then.
                stale_primary = true;
            }
            Some(format!(
                "both nodes are primary (epochs {} here, {} on the peer): split brain; demote the stale one \
                 and resolve with --discard-my-data",
                self.epoch, peer.epoch
            ))
        } else if peer.role == Role::Primary && peer.epoch < self.epoch && !self.discard_my_data {
            // (An admin who chose to discard this node's data resolves a
            // split brain in favour of that primary, whatever its epoch.)
            stale_primary = true;
            Some(format!(
                "the peer is a stale primary (epoch {} < newest seen {}); it must be demoted and resynced",
                peer.epoch, self.epoch
            ))
        } else if self.role == Role::Primary && peer.epoch > self.epoch && !peer.discard_my_data {
            stale_primary = true;
            Some(format!(
                "this primary is stale: the peer has seen epoch {} > ours {}; demote this node, or keep its data \
                 with `replicator primary {} --epoch {}` and `connect --discard-my-data` on the peer",
                peer.epoch,
                self.epoch,
                self.cfg.resource,
                peer.epoch + 1
            ))
        } else {
            None
        };
        if let Some(why) = mismatch {
            self.fail_handshake(link, why, stale_primary);
            return;
        }
        if self.role == Role::Primary && peer.epoch > self.epoch {
            // The peer discards its data for ours: this primary carries on
            // with an epoch newer than any the peer has seen, so that it
            // accepts our writes.
            warn!(resource = %self.cfg.resource, old = self.epoch, new = peer.epoch + 1,
                "the peer discards its data for this primary's: primary epoch raised above the peer's");
            self.epoch = peer.epoch + 1;
            self.persist_meta();
        } else if peer.epoch > self.epoch {
            self.epoch = peer.epoch;
            self.persist_meta();
        }
        let peer_side = Side {
            generations: peer.generations,
            consistent: matches!(peer.disk, DiskState::UpToDate | DiskState::Outdated),
            crashed_primary: peer.crashed_primary,
            primary: peer.role == Role::Primary,
            discard_my_data: peer.discard_my_data,
            dirty_bits: peer.dirty_bits,
            node_id: peer.node_id,
            epoch: peer.epoch,
        };
        let me = match &self.conn {
            Conn::Handshaking { sent, .. } => *sent,
            _ => self.side(),
        };
        let raw = generations::decide(&me, &peer_side);
        let decision = generations::resolve(raw, &me, &peer_side, self.cfg.after_split_brain);
        info!(resource = %self.cfg.resource, peer = %peer.node_name, ?raw, ?decision, "handshake decision");
        let sync = match decision {
            Decision::SplitBrain { .. } => {
                self.fail_handshake(
                    link,
                    format!(
                        "split brain detected with {}: both nodes changed the data since they last agreed; \
                         nothing was overwritten. On the node whose changes must go, run \
                         `replicator connect {} --discard-my-data`; then `replicator connect {}` on the other",
                        peer.node_name, self.cfg.resource, self.cfg.resource
                    ),
                    false,
                );
                return;
            }
            Decision::Unrelated => {
                self.fail_handshake(
                    link,
                    format!(
                        "the data on {} is unrelated to this node's (no common generation): wrong disk, or \
                         metadata recreated; to overwrite one side, recreate its metadata (create-md --force)",
                        peer.node_name
                    ),
                    false,
                );
                return;
            }
            Decision::Target { .. } if self.role == Role::Primary => {
                self.fail_handshake(
                    link,
                    "this primary would have to become sync target; demote it first".into(),
                    false,
                );
                return;
            }
            Decision::NoSync => Sync::None,
            Decision::Source { full } => {
                if full {
                    self.bitmap.set_all();
                    self.bitmap_unpersisted = true;
                }
                Sync::SourceWaitBitmap
            }
            Decision::Target { full } => {
                if full {
                    self.bitmap.set_all();
                }
                // The source resyncs the union of both bitmaps; this side
                // knows its own and how many bits the source had.
                let peer_bytes = peer.dirty_bits.saturating_mul(u64::from(self.cfg.granularity_bytes));
                let total = self.bitmap.dirty_bytes().max(peer_bytes).min(self.cfg.size_bytes);
                self.target_sync = Some((total, self.resync_received_bytes, now_ms));
                self.consistent = false;
                self.disk = DiskState::Inconsistent;
                self.persist_meta();
                self.persist_bitmap(now_ms);
                Sync::Target
            }
        };
        // `--discard-my-data` applied to this handshake only.
        self.discard_my_data = false;
        let newest = match decision {
            // Same data generation: nothing newer exists after all.
            Decision::NoSync => peer_side.consistent,
            // The peer's data is older than ours (it becomes our target).
            Decision::Source { .. } => true,
            _ => false,
        };
        if newest && self.disk == DiskState::Outdated {
            self.outdated = false;
            self.disk = DiskState::UpToDate;
            self.persist_meta();
        }
        self.conn = Conn::Established(Box::new(Peer {
            link,
            name: peer.node_name.clone(),
            role: peer.role,
            disk: if matches!(decision, Decision::Source { .. }) { DiskState::Inconsistent } else { peer.disk },
            last_rx_ms: now_ms,
            last_tx_ms: now_ms,
            ping_sent_ms: None,
            sync,
            replicating: true,
            lag: Lag::InStep,
        }));
        // Both sides agree on the data from here: a later disconnect decides
        // anew whether a generation must start.
        self.rotate_on_write = false;
        if sync == Sync::Target {
            let pairs: Vec<(u64, u64)> = self.bitmap.nonzero_words().collect();
            let mut chunks = pairs.chunks(BITMAP_PAIRS_PER_FRAME).peekable();
            if chunks.peek().is_none() {
                self.send(now_ms, link, Message::Bitmap { pairs: Vec::new(), last: true });
            }
            while let Some(chunk) = chunks.next() {
                let last = chunks.peek().is_none();
                self.send(now_ms, link, Message::Bitmap { pairs: chunk.to_vec(), last });
            }
        }
        if self.frozen {
            info!(resource = %self.cfg.resource, "peer is back: resuming suspended I/O");
            self.unfreeze(now_ms);
        }
        self.last_error = None;
    }

    /// Refuses the peer: StandAlone until the admin acts, or (`retry`:
    /// the other side is a superseded primary its cluster manager will
    /// demote) connecting again after the shell's interval.
    fn fail_handshake(&mut self, link: LinkId, why: String, retry: bool) {
        if self.last_error.as_deref() != Some(why.as_str()) {
            warn!(resource = %self.cfg.resource, "{why}");
        }
        self.last_error = Some(why);
        // `--discard-my-data` given during this handshake (its Hello went
        // without it) is for the next one: try again.
        let sent_discard = matches!(&self.conn, Conn::Handshaking { sent, .. } if sent.discard_my_data);
        if retry || (self.discard_my_data && !sent_discard) {
            self.conn = Conn::Connecting;
        } else {
            // `--discard-my-data` was for this handshake; the admin decides
            // again.
            self.discard_my_data = false;
            self.conn = Conn::StandAlone;
        }
        self.actions.push_back(Action::CloseLink { link });
    }

    fn handle_established(&mut self, now_ms: u64, link: LinkId, msg: Message<P>) {
        let sync = match &self.conn {
            Conn::Established(p) => p.sync,
            _ => return,
        };
        match msg {
            Message::Hello(_) => self.protocol_error(now_ms, "second Hello on one connection".into()),
            Message::Ping => self.send(now_ms, link, Message::PingAck),
            Message::PingAck => self.state_unconfirmed = false,
            Message::Outdate => self.outdated_by_peer(now_ms),
            Message::State(state) => {
                if state.role == Role::Primary && self.role == Role::Primary {
                    if state.epoch > self.epoch {
                        // Superseded: the cluster granted the peer a newer
                        // epoch, so this node's lease is over. It stops
                        // writing at once and keeps trying to connect; its
                        // cluster manager demotes it.
                        warn!(resource = %self.cfg.resource, epoch = self.epoch, newer = state.epoch,
                            "the peer was promoted with a newer epoch: I/O suspended until this node is demoted");
                        self.held = true;
                        self.epoch = state.epoch;
                        self.persist_meta();
                        let why = format!("superseded by the peer's epoch {}: demote this node", state.epoch);
                        self.lose_peer(now_ms, why, false);
                    } else {
                        let why = "both nodes became primary; disconnected to protect the data".into();
                        self.lose_peer(now_ms, why, true);
                    }
                    self.actions.push_back(Action::CloseLink { link });
                    return;
                }
                if state.epoch > self.epoch {
                    self.epoch = state.epoch;
                    self.persist_meta();
                }
                if let Conn::Established(p) = &mut self.conn {
                    p.role = state.role;
                    p.disk = state.disk;
                }
            }
            Message::Bitmap { pairs, last } => {
                if sync != Sync::SourceWaitBitmap {
                    return self.protocol_error(now_ms, "unexpected bitmap".into());
                }
                for (index, word) in pairs {
                    if !self.bitmap.merge_word(index, word) {
                        return self.protocol_error(now_ms, format!("bitmap word {index} lies outside the volume"));
                    }
                }
                if last {
                    self.bitmap_unpersisted = true;
                    self.start_resync(now_ms);
                }
            }
            Message::Data { seq, epoch, barrier, offset, len, kind, fua, data } => {
                if self.role == Role::Primary {
                    return self.protocol_error(now_ms, "the peer sent writes to a primary".into());
                }
                if epoch < self.epoch {
                    let why = format!("refusing writes from a stale primary (epoch {epoch} < {})", self.epoch);
                    self.lose_peer(now_ms, why, true);
                    self.actions.push_back(Action::CloseLink { link });
                    return;
                }
                if epoch > self.epoch {
                    self.epoch = epoch;
                    self.persist_meta();
                }
                if !self.in_volume(offset, len) || (kind == WriteKind::Write) != data.is_some() {
                    return self
                        .protocol_error(now_ms, format!("write at {offset}+{len} is malformed or outside the volume"));
                }
                if self.cfg.protocol == Protocol::B {
                    self.send(now_ms, link, Message::Ack { seq, kind: AckKind::Received });
                }
                self.apply.push(Incoming { offset, len, barrier, kind: InKind::Write { seq, kind, fua, data } });
                self.pump_apply(now_ms);
            }
            Message::Flush { seq, barrier } => {
                self.apply.push(Incoming { offset: 0, len: 0, barrier, kind: InKind::Flush { seq } });
                self.pump_apply(now_ms);
            }
            Message::ResyncData { seq, offset, len, data } => {
                self.queue_resync_item(now_ms, sync, offset, len, InKind::Resync { seq, data });
            }
            Message::ResyncCsum { seq, offset, len, csum } => {
                let kind = InKind::Checksum { seq, peer_csum: csum, verify: false };
                self.queue_resync_item(now_ms, sync, offset, len, kind);
            }
            Message::VerifyReq { seq, offset, len, csum } => {
                if !self.in_volume(offset, len) {
                    return self.protocol_error(now_ms, "verify request outside the volume".into());
                }
                let barrier = self.apply.last_barrier();
                let kind = InKind::Checksum { seq, peer_csum: csum, verify: true };
                self.apply.push(Incoming { offset, len, barrier, kind });
                self.pump_apply(now_ms);
            }
            Message::ResyncDone(done) => {
                if !matches!(sync, Sync::Target | Sync::None) || self.role == Role::Primary {
                    return self.protocol_error(now_ms, "unexpected end of resync".into());
                }
                self.generations = done.generations;
                self.consistent = true;
                self.outdated = false;
                self.crashed_primary = false;
                self.disk = DiskState::UpToDate;
                self.bitmap.clear_all();
                self.persist_bitmap(now_ms);
                self.persist_meta();
                if let Conn::Established(p) = &mut self.conn {
                    p.sync = Sync::None;
                    p.disk = DiskState::UpToDate;
                    p.lag = Lag::InStep;
                }
                self.target_sync = None;
                info!(resource = %self.cfg.resource, "resync finished: disk UpToDate");
            }
            Message::Ack { seq, kind } => match self.outstanding.get(&seq) {
                Some((Outstanding::Write(id), _)) => {
                    let id = *id;
                    if kind != AckKind::Received {
                        self.outstanding.remove(&seq);
                    }
                    let mut failed = None;
                    if let Some(w) = self.writes.get_mut(&id) {
                        if kind != AckKind::Received {
                            self.unacked_bytes = self.unacked_bytes.saturating_sub(u64::from(w.sent_bytes));
                        }
                        match kind {
                            AckKind::Received if w.peer == PeerWait::Sent => w.peer = PeerWait::Received,
                            AckKind::Received => {}
                            AckKind::Written => {
                                w.peer = PeerWait::Done;
                                w.peer_wrote = true;
                            }
                            AckKind::Failed => {
                                w.peer = PeerWait::Done;
                                failed = Some((w.offset, u64::from(w.len)));
                            }
                        }
                    }
                    if let Some((offset, len)) = failed {
                        self.mark_dirty_superseding(offset, len);
                        // The peer outdated itself; it is UpToDate again only
                        // after the repair resync.
                        if let Conn::Established(p) = &mut self.conn {
                            p.disk = DiskState::Outdated;
                        }
                    }
                    self.try_complete_write(id);
                    self.maybe_catch_up();
                    self.maybe_start_repair(now_ms);
                    if !self.deferred.is_empty() {
                        self.pump_deferred(now_ms);
                    }
                }
                _ => self.protocol_error(now_ms, format!("ack for unknown write {seq}")),
            },
            Message::FlushAck { seq, ok } => match self.outstanding.remove(&seq) {
                Some((Outstanding::Flush(what), _)) => {
                    let epoch = match what {
                        FlushFor::App { id, epoch } => {
                            if let Some(f) = self.flushes.get_mut(&id) {
                                f.peer = PeerWait::Done;
                            }
                            self.try_complete_flush(id);
                            epoch
                        }
                        FlushFor::Epoch(e) => Some(e),
                    };
                    if let Some(e) = epoch {
                        self.epoch_flushed(now_ms, e, true, ok);
                    }
                    if !ok {
                        // It outdated itself and may have lost anything it
                        // had not flushed: the handshake decides the resync
                        // (the lost link marks everything held).
                        self.lose_peer(
                            now_ms,
                            "the peer's disk failed a flush; reconnecting to resync it".into(),
                            false,
                        );
                        self.actions.push_back(Action::CloseLink { link });
                    }
                }
                _ => self.protocol_error(now_ms, format!("flush ack for unknown flush {seq}")),
            },
            Message::ResyncAck { seq, ok } => {
                if !matches!(self.outstanding.remove(&seq), Some((Outstanding::Resync, _))) {
                    return self.protocol_error(now_ms, format!("resync ack for unknown block {seq}"));
                }
                if let Some(r) = self.resync.as_mut() {
                    if ok {
                        if let Some(bits) = r.finished(seq) {
                            self.bitmap.clear_bits(bits);
                            self.bitmap_unpersisted = true;
                        }
                    } else {
                        r.abandon(seq);
                        self.note_error("the peer failed to write resync data; the blocks stay out of sync".into());
                    }
                }
                self.pump_resync(now_ms);
            }
            Message::ResyncCsumReply { seq, equal } => {
                if !matches!(self.outstanding.remove(&seq), Some((Outstanding::Resync, _))) {
                    return self.protocol_error(now_ms, format!("checksum reply for unknown block {seq}"));
                }
                let Some(r) = self.resync.as_mut() else { return };
                if equal {
                    if let Some(bits) = r.finished(seq) {
                        self.bitmap.clear_bits(bits);
                        self.bitmap_unpersisted = true;
                    }
                    self.pump_resync(now_ms);
                } else {
                    r.needs_data(seq);
                    self.pump_resync(now_ms);
                }
            }
            Message::VerifyReply { seq, kind } => {
                if !matches!(self.outstanding.remove(&seq), Some((Outstanding::Verify, _))) {
                    return self.protocol_error(now_ms, format!("verify reply for unknown block {seq}"));
                }
                let Some(v) = self.verify.as_mut() else { return };
                let Some((offset, len)) = v.take(seq) else { return };
                match kind {
                    AckKind::Written => {}
                    // A chunk that differs is checked again granule by
                    // granule; only the granules that differ are marked.
                    AckKind::Received if v.differs(offset, len) => {}
                    AckKind::Received => {
                        v.out_of_sync_bytes += u64::from(len);
                        self.mark_dirty(offset, u64::from(len));
                        warn!(resource = %self.cfg.resource, offset, len, "verify: out of sync");
                    }
                    AckKind::Failed => {
                        self.note_error(format!("the peer could not read {offset}+{len} for verify"));
                        self.mark_dirty(offset, u64::from(len));
                    }
                }
                self.pump_verify(now_ms);
            }
        }
    }

    /// Resync data or a resync checksum for this node (a sync target, or a
    /// secondary being repaired), queued behind what the peer sent before.
    fn queue_resync_item(&mut self, now_ms: u64, sync: Sync, offset: u64, len: u32, kind: InKind<P>) {
        if !matches!(sync, Sync::Target | Sync::None) || self.role == Role::Primary || !self.in_volume(offset, len) {
            return self.protocol_error(now_ms, "unexpected or malformed resync frame".into());
        }
        let barrier = self.apply.last_barrier();
        self.apply.push(Incoming { offset, len, barrier, kind });
        self.pump_apply(now_ms);
    }

    fn in_volume(&self, offset: u64, len: u32) -> bool {
        len > 0 && offset.checked_add(u64::from(len)).is_some_and(|end| end <= self.cfg.size_bytes)
    }

    fn protocol_error(&mut self, now_ms: u64, why: String) {
        let link = self.link();
        self.lose_peer(now_ms, format!("protocol error: {why}"), false);
        if let Some(link) = link {
            self.actions.push_back(Action::CloseLink { link });
        }
    }

    /// The peer is gone (or refused). Everything it did not acknowledge goes
    /// into the bitmap; a primary starts a new data generation, persisted
    /// before any write is answered; fencing may freeze I/O.
    fn lose_peer(&mut self, now_ms: u64, why: String, standalone: bool) {
        let was_replicating = matches!(&self.conn, Conn::Established(p) if p.replicating);
        if let Some(link) = self.link() {
            self.apply.lose_link(link);
        }
        // Only a peer that held our data generation falls behind now (also
        // during a repair resync, which leaves it UpToDate or Outdated); an
        // Inconsistent sync target still holds the generation our bitmap
        // counts from.
        let peer_was_current = matches!(&self.conn, Conn::Established(p)
            if p.replicating && matches!(p.disk, DiskState::UpToDate | DiskState::Outdated));
        // The same cause again (a peer that keeps refusing us): once is
        // enough at warn level.
        if self.last_error.as_deref() == Some(why.as_str()) {
            debug!(resource = %self.cfg.resource, "{why}");
        } else {
            warn!(resource = %self.cfg.resource, "{why}");
        }
        self.last_error = Some(why);
        self.conn = if standalone { Conn::StandAlone } else { Conn::Connecting };
        self.resync = None;
        self.verify = None;
        let outstanding = std::mem::take(&mut self.outstanding);
        self.unacked_bytes = 0;
        for (_, (what, _)) in outstanding {
            match what {
                Outstanding::Write(id) => {
                    if let Some(w) = self.writes.get_mut(&id) {
                        w.peer = PeerWait::NotReplicated;
                        let (offset, len) = (w.offset, u64::from(w.len));
                        self.mark_dirty(offset, len);
                    }
                }
                Outstanding::Flush(FlushFor::App { id, .. }) => {
                    if let Some(f) = self.flushes.get_mut(&id) {
                        f.peer = PeerWait::NotReplicated;
                    }
                }
                Outstanding::Flush(FlushFor::Epoch(_)) | Outstanding::Resync | Outstanding::Verify => {}
            }
        }
        // Settled writes not yet flushed there may be lost with the peer's
        // cache (a power loss looks like this from here).
        for (offset, len) in self.tl.peer_lost() {
            self.mark_dirty(offset, u64::from(len));
        }
        self.replies_unflushed.clear();
        self.replies_flushing.clear();
        if self.role == Role::Primary && peer_was_current {
            if self.bitmap.count() > 0 {
                // Writes the peer may lack already exist: they belong to a
                // new generation.
                let fresh = self.fresh_generation();
                self.generations.start_new(fresh);
                self.persist_meta();
            } else {
                self.rotate_on_write = true;
            }
        }
        // A held primary (its lease is over, or a newer epoch superseded
        // it) writes nothing more and must not fence the node that now
        // owns the volume.
        if self.role == Role::Primary && was_replicating && !self.held {
            match self.cfg.fencing {
                Fencing::DontCare => {}
                Fencing::ResourceOnly => self.start_fence(),
                Fencing::ResourceAndStonith => {
                    warn!(resource = %self.cfg.resource, "peer lost: I/O suspended until the fence handler succeeds");
                    self.frozen = true;
                    self.start_fence();
                }
            }
        }
        self.retire(now_ms);
        self.complete_ready(now_ms);
    }

    /// Answers every request whose conditions now hold, then issues what
    /// was deferred.
    fn complete_ready(&mut self, now_ms: u64) {
        let ids: Vec<AppId> = self.writes.keys().copied().collect();
        for id in ids {
            self.try_complete_write(id);
        }
        let ids: Vec<AppId> = self.flushes.keys().copied().collect();
        for id in ids {
            self.try_complete_flush(id);
        }
        self.pump_deferred(now_ms);
    }

    fn start_fence(&mut self) {
        if !self.fence_running {
            self.fence_running = true;
            self.actions.push_back(Action::Fence);
        }
    }

    /// The fence handler finished. Success resumes suspended I/O.
    pub fn handle_fence_result(&mut self, now_ms: u64, ok: bool) {
        self.now_ms = now_ms;
        self.fence_running = false;
        if ok {
            info!(resource = %self.cfg.resource, "fence handler succeeded");
            if self.frozen {
                self.unfreeze(now_ms);
            }
        } else {
            let why = "fence handler failed: I/O stays suspended until the peer reconnects or an admin \
                       fences it by hand and runs `replicator resume-io`"
                .to_string();
            warn!(resource = %self.cfg.resource, "{why}");
            self.last_error = Some(why);
        }
    }

    /// Admin override after fencing by hand.
    pub fn resume_io(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if self.io_suspended() {
            warn!(resource = %self.cfg.resource, "I/O resumed by the admin");
            self.held = false;
            self.unfreeze(now_ms);
        }
    }

    /// Holds I/O of a primary: writes and flushes are neither issued nor
    /// answered until `resume_io` (or fail at a demotion). The cluster
    /// manager calls it when its lease may run out, before another node
    /// may be promoted.
    pub fn suspend_io(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role != Role::Primary {
            return Err(AdminError::NotPrimary);
        }
        if !self.held {
            warn!(resource = %self.cfg.resource, "I/O suspended by the admin until `resume-io` or demotion");
            self.held = true;
        }
        Ok(())
    }

    fn unfreeze(&mut self, now_ms: u64) {
        self.frozen = false;
        self.complete_ready(now_ms);
    }

    // ----- resync and verify -----

    fn start_resync(&mut self, now_ms: u64) {
        let cfg = &self.cfg;
        self.resync = Some(Resync::new(
            &self.bitmap,
            cfg.resync_chunk_bytes,
            cfg.resync_inflight_bytes_max,
            cfg.resync_rate_min_bytes_per_sec,
            cfg.resync_rate_max_bytes_per_sec,
            cfg.resync_checksums,
            now_ms,
        ));
        if let Conn::Established(p) = &mut self.conn {
            p.sync = Sync::Source;
        }
        info!(resource = %self.cfg.resource, out_of_sync_bytes = self.bitmap.dirty_bytes(), "resync started as source");
        self.pump_resync(now_ms);
    }

    fn lag(&self) -> Lag {
        match &self.conn {
            Conn::Established(p) => p.lag,
            _ => Lag::InStep,
        }
    }

    /// Protocol A's send queue is full: with `pull-ahead`, stop sending
    /// write data (this write and later ones are marked in the bitmap),
    /// tell the peer it is Outdated, and return true so the write goes on.
    /// Only while plainly connected to a secondary; otherwise the write
    /// waits (false).
    fn pull_ahead(&mut self, now_ms: u64) -> bool {
        if self.cfg.on_congestion != OnCongestion::PullAhead {
            return false;
        }
        let Conn::Established(p) = &mut self.conn else { return false };
        if p.sync != Sync::None || p.role != Role::Secondary || p.lag != Lag::InStep {
            return false;
        }
        assert!(
            self.role == Role::Primary && self.cfg.protocol == Protocol::A,
            "only a protocol A primary pulls ahead"
        );
        p.lag = Lag::Ahead;
        // Conservative at once: the peer outdates itself when it reads this.
        p.disk = DiskState::Outdated;
        let link = p.link;
        warn!(resource = %self.cfg.resource, unacked_bytes = self.unacked_bytes,
            "send queue full: pulling ahead of the peer (writes are marked and resynced once the link catches up)");
        self.send(now_ms, link, Message::Outdate);
        true
    }

    /// Ahead, and everything sent before is acknowledged: back in step,
    /// and the repair resync sends what was marked meanwhile.
    fn maybe_catch_up(&mut self) {
        let caught_up = self.unacked_bytes == 0;
        if let Conn::Established(p) = &mut self.conn {
            if p.lag == Lag::Ahead && caught_up {
                p.lag = Lag::InStep;
                info!(resource = %self.cfg.resource, out_of_sync_bytes = self.bitmap.dirty_bytes(),
                    "the link caught up: resyncing what was marked while ahead");
            }
        }
    }

    /// The primary pulled ahead: this disk misses writes from now on.
    fn outdated_by_peer(&mut self, now_ms: u64) {
        let Conn::Established(p) = &mut self.conn else { return };
        if self.role != Role::Secondary || p.role != Role::Primary {
            self.protocol_error(now_ms, "Outdate from a peer that is not our primary".into());
            return;
        }
        if p.sync == Sync::None {
            p.lag = Lag::Behind;
        }
        if self.disk == DiskState::UpToDate {
            warn!(resource = %self.cfg.resource, "the primary pulled ahead of a congested link: Outdated until the resync");
            self.outdated = true;
            self.disk = DiskState::Outdated;
            self.persist_meta();
        }
    }

    /// Blocks went out of sync while connected (a failed write on either
    /// side, or verify found differences): the primary (or the verifier)
    /// resends them now, as a resync without a new handshake.
    /// A peer that outdated itself (a failed write) needs a resync's end
    /// to be UpToDate again even when later writes already covered what
    /// it missed (sim seed 73007942: a verify ran while its failure was
    /// reported, and the bits were cleared before the verify ended).
    fn maybe_start_repair(&mut self, now_ms: u64) {
        let idle = matches!(&self.conn, Conn::Established(p)
            if p.sync == Sync::None && p.role != Role::Primary && p.lag == Lag::InStep);
        let peer_outdated = matches!(&self.conn, Conn::Established(p) if p.disk == DiskState::Outdated);
        if idle && (self.bitmap.count() > 0 || peer_outdated) && self.disk == DiskState::UpToDate {
            info!(resource = %self.cfg.resource, out_of_sync_bytes = self.bitmap.dirty_bytes(), "resending out-of-sync blocks");
            self.start_resync(now_ms);
        }
    }

    fn pump_resync(&mut self, now_ms: u64) {
        let Some(link) = self.link() else { return };
        loop {
            let Some(mut r) = self.resync.take() else { return };
            if self.bitmap.count() == 0 && r.is_idle() {
                self.finish_resync(now_ms, link);
                return;
            }
            let writes = &self.writes;
            let blocked = |offset: u64, len: u64| {
                let end = offset + len;
                writes.values().any(|w| w.local.is_none() && w.offset < end && offset < w.offset + u64::from(w.len))
            };
            if let Some((seq, offset, len)) = r.next_data_read(&blocked) {
                self.resync = Some(r);
                let io = self.take_io(IoPurpose::ResyncRead { link, seq });
                self.actions.push_back(Action::Disk { io, op: DiskOp::Read { offset, len } });
                continue;
            }
            let mut next_seq = self.next_seq;
            let step = r.next(
                &self.bitmap,
                self.cfg.size_bytes,
                now_ms,
                self.last_app_write_ms,
                &mut || {
                    let s = next_seq;
                    next_seq += 1;
                    s
                },
                &blocked,
            );
            self.next_seq = next_seq;
            self.resync = Some(r);
            let Some(step) = step else { return };
            let op = if step.checksum_first {
                DiskOp::Checksum { offset: step.offset, len: step.len }
            } else {
                DiskOp::Read { offset: step.offset, len: step.len }
            };
            let io = self.take_io(IoPurpose::ResyncRead { link, seq: step.seq });
            self.actions.push_back(Action::Disk { io, op });
        }
    }

    fn finish_resync(&mut self, now_ms: u64, link: LinkId) {
        self.resync = None;
        self.generations.sync_done();
        self.crashed_primary = false;
        self.outdated = false;
        self.persist_bitmap(now_ms);
        self.persist_meta();
        if let Conn::Established(p) = &mut self.conn {
            p.sync = Sync::None;
            p.disk = DiskState::UpToDate;
        }
        info!(resource = %self.cfg.resource, "resync finished: peer UpToDate");
        self.send(now_ms, link, Message::ResyncDone(ResyncDone { generations: self.generations }));
    }

    fn pump_verify(&mut self, now_ms: u64) {
        let Some(link) = self.link() else { return };
        let Some(mut v) = self.verify.take() else { return };
        if v.is_done() {
            info!(resource = %self.cfg.resource, out_of_sync_bytes = v.out_of_sync_bytes, "verify finished");
            self.verify_oos_bytes = v.out_of_sync_bytes;
            if let Conn::Established(p) = &mut self.conn {
                p.sync = Sync::None;
            }
            self.persist_bitmap(now_ms);
            self.maybe_start_repair(now_ms);
            return;
        }
        let mut next_seq = self.next_seq;
        let mut steps = Vec::new();
        while let Some(step) = v.next(&mut || {
            let s = next_seq;
            next_seq += 1;
            s
        }) {
            steps.push(step);
        }
        self.next_seq = next_seq;
        self.verify = Some(v);
        for (seq, offset, len) in steps {
            let io = self.take_io(IoPurpose::VerifyRead { link, seq });
            self.actions.push_back(Action::Disk { io, op: DiskOp::Checksum { offset, len } });
        }
    }

    // ----- timers -----

    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        match &mut self.conn {
            Conn::Handshaking { since_ms, .. } if now_ms >= *since_ms + self.cfg.io_timeout_ms => {
                let link = self.link();
                self.lose_peer(now_ms, "the peer did not send its parameters in time".into(), false);
                if let Some(link) = link {
                    self.actions.push_back(Action::CloseLink { link });
                }
                return;
            }
            Conn::Established(p) => {
                let link = p.link;
                if let Some(sent) = p.ping_sent_ms {
                    if now_ms >= sent + self.cfg.ping_timeout_ms {
                        let why = format!("the peer did not answer a ping within {} ms", self.cfg.ping_timeout_ms);
                        self.lose_peer(now_ms, why, false);
                        self.actions.push_back(Action::CloseLink { link });
                        return;
                    }
                } else if now_ms >= p.last_rx_ms + self.cfg.ping_interval_ms {
                    p.ping_sent_ms = Some(now_ms);
                    self.send(now_ms, link, Message::Ping);
                }
                if let Some((_, (_, sent))) = self.outstanding.iter().next() {
                    if now_ms >= sent + self.cfg.io_timeout_ms {
                        let why = format!("the peer did not acknowledge within {} ms", self.cfg.io_timeout_ms);
                        self.lose_peer(now_ms, why, false);
                        self.actions.push_back(Action::CloseLink { link });
                        return;
                    }
                }
                if self.resync.is_some() {
                    self.pump_resync(now_ms);
                }
            }
            _ => {}
        }
        if self.tl.close_due_ms().is_some_and(|t| now_ms >= t) {
            self.close_epoch(now_ms);
        }
        if self.bitmap_unpersisted && now_ms >= self.last_bitmap_persist_ms + BITMAP_PERSIST_INTERVAL_MS {
            self.persist_bitmap(now_ms);
        }
    }

    // ----- admin -----

    /// Makes this node primary with `epoch` (default: one past the newest
    /// seen).
    pub fn promote(&mut self, now_ms: u64, force: bool, epoch: Option<u64>) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role == Role::Primary {
            // Re-asserting a primary with a newer epoch: how an admin (or the
            // cluster) keeps this node's data after a split brain in which
            // the peer was promoted later.
            return match epoch {
                Some(e) if e > self.epoch => {
                    warn!(resource = %self.cfg.resource, old = self.epoch, new = e, "primary epoch raised by the admin");
                    // Stays primary: a demotion waiting for its flushes is off.
                    self.demote_pending = false;
                    self.epoch = e;
                    self.persist_meta();
                    if let Some(link) = self.link().filter(|_| self.is_connected()) {
                        self.send_state(now_ms, link);
                    }
                    Ok(())
                }
                _ => Err(AdminError::AlreadyPrimary),
            };
        }
        if matches!(self.conn, Conn::Handshaking { .. }) {
            return Err(AdminError::Handshaking);
        }
        if self.recovering {
            return Err(AdminError::Recovering);
        }
        let peer_primary = matches!(&self.conn, Conn::Established(p) if p.role == Role::Primary);
        if peer_primary && epoch.is_none() {
            return Err(AdminError::PeerIsPrimary);
        }
        if self.disk != DiskState::UpToDate && !force {
            return Err(AdminError::NotUpToDate(self.disk));
        }
        let new_epoch = epoch.unwrap_or(self.epoch + 1);
        if new_epoch <= self.epoch {
            return Err(AdminError::StaleEpoch { given: new_epoch, seen: self.epoch });
        }
        if peer_primary {
            // A newer epoch is the cluster manager's word that the peer's
            // lease is over (waited out or fenced): the peer may still look
            // alive here (its pings answered within our timeout), but it
            // can no longer write, and its frames carry an older epoch that
            // this node refuses from now on. Drop its link and go on alone.
            // If the peer is alive after all, it hears of the new epoch
            // first and suspends itself.
            let link = self.link();
            if let Some(link) = link {
                let state = PeerState { role: Role::Primary, disk: self.disk, epoch: new_epoch };
                self.send(now_ms, link, Message::State(state));
            }
            self.lose_peer(
                now_ms,
                format!("promoted with epoch {new_epoch}: dropped the link to the superseded primary"),
                false,
            );
            if let Some(link) = link {
                self.actions.push_back(Action::CloseLink { link });
            }
        }
        let connected = self.is_connected();
        if self.disk != DiskState::UpToDate {
            warn!(resource = %self.cfg.resource, disk = ?self.disk, "FORCED promotion: this node's data becomes the truth; the peer will be overwritten by a full sync");
            let fresh = self.fresh_generation();
            self.generations.force_new(fresh);
            self.consistent = true;
            self.outdated = false;
            self.disk = DiskState::UpToDate;
            self.bitmap.set_all();
            self.persist_bitmap(now_ms);
        } else if !connected {
            // At once, unlike after a peer loss: a crashed primary that
            // returns must find this node's data newer than its own.
            let fresh = self.fresh_generation();
            self.generations.start_new(fresh);
        }
        assert!(
            !matches!(&self.conn, Conn::Established(p) if p.role == Role::Primary),
            "never primary beside a connected primary"
        );
        self.role = Role::Primary;
        self.epoch = new_epoch;
        self.persist_meta();
        info!(resource = %self.cfg.resource, epoch = new_epoch, "promoted to primary");
        if let Some(link) = self.link() {
            if force && self.resync.is_none() && connected {
                // Renegotiate so the peer is fully synced from us.
                self.lose_peer(now_ms, "forced promotion: reconnecting to resync the peer".into(), false);
                self.actions.push_back(Action::CloseLink { link });
            } else if connected {
                self.send_state(now_ms, link);
            }
        }
        if !self.is_connected() && self.cfg.fencing == Fencing::ResourceAndStonith {
            warn!(resource = %self.cfg.resource, "promoted without a peer: I/O suspended until the fence handler succeeds");
            self.frozen = true;
            self.start_fence();
        }
        Ok(())
    }

    /// Makes this node secondary. The shell first makes sure no client holds
    /// the volume writable; writes in flight make this fail.
    pub fn demote(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role != Role::Primary {
            return Err(AdminError::NotPrimary);
        }
        if matches!(self.conn, Conn::Handshaking { .. }) {
            return Err(AdminError::Handshaking);
        }
        let pending = self.writes.len() + self.flushes.len() + self.deferred.len();
        if pending > 0 && !self.io_suspended() {
            return Err(AdminError::WritesInFlight(pending));
        }
        if pending > 0 {
            // Suspended I/O of a primary being given up (its peer won): the
            // writes were never acknowledged and never will be.
            warn!(resource = %self.cfg.resource, pending, "demoting a suspended primary: failing its suspended I/O");
            self.fail_all_pending();
        }
        if self.demote_pending {
            return Ok(());
        }
        // The activity log may forget an extent only once its writes are
        // durable on both disks: flush first, change the role after.
        self.close_epoch(now_ms);
        if !self.tl.is_empty() {
            self.demote_pending = true;
            info!(resource = %self.cfg.resource, "demoting once the last writes are flushed on both nodes");
            return Ok(());
        }
        self.finish_demote(now_ms);
        Ok(())
    }

    fn maybe_finish_demote(&mut self, now_ms: u64) {
        if self.demote_pending && self.tl.is_empty() && self.writes.is_empty() {
            self.demote_pending = false;
            self.finish_demote(now_ms);
        }
    }

    fn finish_demote(&mut self, now_ms: u64) {
        // The activity log is emptied below: nothing may be unflushed.
        assert!(self.tl.is_empty() && self.writes.is_empty(), "demoted with writes not yet durable on both disks");
        self.role = Role::Secondary;
        self.frozen = false;
        self.held = false;
        self.rotate_on_write = false;
        self.persist_bitmap(now_ms);
        if self.al.clear() {
            self.actions.push_back(Action::PersistActivityLog(Vec::new()));
        }
        self.persist_meta();
        info!(resource = %self.cfg.resource, "demoted to secondary");
        if let (Some(link), true) = (self.link(), self.is_connected()) {
            self.send_state(now_ms, link);
        }
    }

    fn fail_all_pending(&mut self) {
        for (id, w) in std::mem::take(&mut self.writes) {
            if !w.answered {
                self.actions.push_back(Action::Complete { id, result: Err(libc::EIO) });
            }
            self.al.end(w.extents);
        }
        for (id, _) in std::mem::take(&mut self.flushes) {
            self.actions.push_back(Action::Complete { id, result: Err(libc::EIO) });
        }
        for d in std::mem::take(&mut self.deferred) {
            let id = match d {
                Deferred::Write { id, .. } | Deferred::Flush { id } => id,
            };
            self.actions.push_back(Action::Complete { id, result: Err(libc::EIO) });
        }
        // Flushes stay outstanding: an epoch's flush still answers for it.
        self.outstanding.retain(|_, (what, _)| !matches!(what, Outstanding::Write(_)));
        self.unacked_bytes = 0;
    }

    /// Starts connecting (from StandAlone). `discard_my_data`: on a split
    /// brain at the next handshake (only that one), this node's changes
    /// are the ones thrown away; refused while connected, as drbdadm does,
    /// so that it can never linger until some later split brain.
    pub fn connect(&mut self, now_ms: u64, discard_my_data: bool) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if discard_my_data && matches!(self.conn, Conn::Established(_)) {
            return Err(AdminError::DiscardWhileConnected);
        }
        self.discard_my_data = discard_my_data;
        if matches!(self.conn, Conn::StandAlone) {
            self.conn = Conn::Connecting;
        }
        Ok(())
    }

    /// Drops the peer and stays StandAlone until [`Self::connect`].
    pub fn disconnect(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.discard_my_data = false;
        match self.link() {
            Some(link) => {
                self.lose_peer(now_ms, "disconnected by the admin".into(), true);
                self.actions.push_back(Action::CloseLink { link });
            }
            None => self.conn = Conn::StandAlone,
        }
    }

    /// Starts an online verify against the peer.
    pub fn verify(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        let ok = matches!(&self.conn, Conn::Established(p) if p.sync == Sync::None && p.disk == DiskState::UpToDate)
            && self.disk == DiskState::UpToDate;
        if !ok {
            return Err(AdminError::CannotVerify(format!("{:?}, disk {:?}", self.connection(), self.disk)));
        }
        self.verify = Some(Verify::new(self.cfg.size_bytes, VERIFY_CHUNK_BYTES, self.cfg.granularity_bytes, now_ms));
        self.verify_oos_bytes = 0;
        if let Conn::Established(p) = &mut self.conn {
            p.sync = Sync::Verify;
        }
        info!(resource = %self.cfg.resource, "online verify started");
        self.pump_verify(now_ms);
        Ok(())
    }

    /// Throws away the local data: full resync from the peer on the next
    /// connect (now, if connected).
    pub fn invalidate(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role == Role::Primary {
            return Err(AdminError::InvalidatePrimary);
        }
        self.consistent = false;
        self.disk = DiskState::Inconsistent;
        self.bitmap.set_all();
        self.persist_bitmap(now_ms);
        self.persist_meta();
        if let Some(link) = self.link() {
            self.lose_peer(now_ms, "invalidated: reconnecting for a full resync".into(), false);
            self.actions.push_back(Action::CloseLink { link });
        }
        Ok(())
    }

    /// The peer's fence handler says this node's data is outdated.
    pub fn outdate(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role == Role::Primary {
            return Err(AdminError::NotPrimary);
        }
        if self.disk == DiskState::UpToDate {
            self.outdated = true;
            self.disk = DiskState::Outdated;
            self.persist_meta();
        }
        Ok(())
    }

    /// Before a clean stop: closes the transfer log's open epoch, so that
    /// once [`Self::is_quiescent`] every write is durable on both disks and
    /// [`Self::shutdown`] can empty the activity log.
    pub fn quiesce(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.close_epoch(now_ms);
    }

    /// No write in flight or waiting for its flushes.
    pub fn is_quiescent(&self) -> bool {
        self.writes.is_empty() && self.flushes.is_empty() && self.tl.is_empty()
    }

    /// Clean stop: persist the bitmap, empty the activity log if nothing is
    /// in flight, and mark the shutdown clean.
    pub fn shutdown(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.persist_bitmap(now_ms);
        let idle = self.writes.is_empty() && self.flushes.is_empty() && self.tl.is_empty();
        if idle && self.al.clear() {
            self.actions.push_back(Action::PersistActivityLog(Vec::new()));
        }
        self.persist_meta_with(idle);
    }

    #[cfg(test)]
    pub(crate) fn debug_state(&self) -> String {
        format!(
            "writes {:?}\nflushes {:?}\ntransfer log {:?}\ndeferred {}\noutstanding {:?}\nfrozen {} fence_running {}",
            self.writes,
            self.flushes,
            self.tl,
            self.deferred.len(),
            self.outstanding,
            self.frozen,
            self.fence_running
        )
    }

    // ----- helpers -----

    /// Tells the peer our role and disk, followed by a ping: its answer
    /// proves the peer applied the change (frames are processed in order).
    fn send_state(&mut self, now_ms: u64, link: LinkId) {
        let state = PeerState { role: self.role, disk: self.disk, epoch: self.epoch };
        self.send(now_ms, link, Message::State(state));
        self.send(now_ms, link, Message::Ping);
        self.state_unconfirmed = true;
    }

    /// No role change is waiting for the peer (it applied the last one, or
    /// there is no peer to tell), and no lost link's writes are still
    /// being applied (a new primary's data is complete).
    pub fn state_settled(&self) -> bool {
        (!self.state_unconfirmed || !self.is_connected()) && self.apply.draining().is_none() && !self.demote_pending
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn take_io(&mut self, purpose: IoPurpose) -> IoId {
        let io = self.next_io;
        self.next_io += 1;
        self.ios.insert(io, purpose);
        io
    }

    fn send(&mut self, now_ms: u64, link: LinkId, msg: Message<P>) {
        if let Conn::Established(p) = &mut self.conn {
            p.last_tx_ms = now_ms;
        }
        self.actions.push_back(Action::Send { link, msg });
    }

    fn note_error(&mut self, why: String) {
        warn!(resource = %self.cfg.resource, "{why}");
        self.last_error = Some(why);
    }

    fn fresh_generation(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        generations::fresh_generation(x)
    }

    fn persist_meta(&mut self) {
        self.persist_meta_with(false);
    }

    fn persist_meta_with(&mut self, clean_shutdown: bool) {
        self.actions.push_back(Action::PersistMeta(MetaState {
            generations: self.generations,
            consistent: self.consistent,
            outdated: self.outdated,
            primary: self.role == Role::Primary,
            crashed_primary: self.crashed_primary,
            clean_shutdown,
            epoch: self.epoch,
        }));
    }

    fn persist_bitmap(&mut self, now_ms: u64) {
        self.actions.push_back(Action::PersistBitmap);
        self.bitmap_unpersisted = false;
        self.last_bitmap_persist_ms = now_ms;
    }
}

const BITMAP_PERSIST_INTERVAL_MS: u64 = 5_000;
const BITMAP_PAIRS_PER_FRAME: usize = 4096;
const VERIFY_CHUNK_BYTES: u32 = 1 << 20;
