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

mod admin;
mod disk;
mod handshake;
mod loss;
mod peer;
mod resync_verify;
mod status;
mod timers;
mod write;

pub use super::ids::{AppId, IoId, LinkId};
pub use super::resync::Progress;

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
