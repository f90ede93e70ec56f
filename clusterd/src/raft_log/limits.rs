//! Every bound of the cluster log, units last.

use std::time::Duration;

/// The largest frame a peer may send (a raft message; snapshots are the big
/// ones). A larger length prefix drops the connection.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// The largest frame in the state file (one append: the entries and hard
/// state of one `Ready`; or a part of a rewrite).
pub(crate) const RECORD_BYTES_MAX: usize = 1 << 30;
/// The largest state the daemon may hand to `compact` (a snapshot message
/// carries it, plus a little metadata, in one frame).
pub(crate) const SNAPSHOT_BYTES_MAX: usize = FRAME_BYTES_MAX - (1 << 20);
/// The largest proposal (the daemon's entries are small).
pub(crate) const PROPOSAL_BYTES_MAX: usize = 1 << 20;
/// Raft's limit on the entries in one append message.
pub(crate) const APPEND_BYTES_MAX: u64 = 1 << 20;
/// Raft's limit on append messages in flight to one peer.
pub(crate) const APPENDS_INFLIGHT_MAX: usize = 256;
/// Raft's limit on proposed but uncommitted entry bytes (the leader refuses
/// more proposals beyond it).
pub(crate) const UNCOMMITTED_BYTES_MAX: u64 = 16 << 20;

/// Messages queued for one peer; when full, the newest is dropped (raft
/// retransmits).
pub(crate) const PEER_QUEUED_MAX: usize = 1024;
/// Frames written before one flush.
pub(crate) const PEER_BATCH_MAX: usize = 64;
/// Messages received from all peers waiting for the raft task; readers wait
/// (TCP pushes back) when it is full.
pub(crate) const INBOUND_QUEUED_MAX: usize = 1024;
/// Proposals and compactions waiting for the raft task; more are dropped.
pub(crate) const CONTROL_QUEUED_MAX: usize = 1024;
/// Events waiting for the daemon; the raft task waits when it is full.
pub(crate) const EVENTS_QUEUED_MAX: usize = 1024;
/// Snapshot and reachability reports from the senders; more are dropped.
pub(crate) const REPORTS_QUEUED_MAX: usize = 256;
/// Inputs handled before the next `Ready` (so ticks are never starved).
pub(crate) const INPUTS_PER_READY_MAX: usize = 256;

/// Inbound connections at once (handshaking or established).
pub(crate) const INBOUND_CONNECTIONS_MAX: usize = 32;
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A frame's body (after its length) must arrive within this.
pub(crate) const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A batch of frames must be written within this, else the connection is
/// dropped and redialled.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

const _: () = assert!(RECORD_BYTES_MAX > FRAME_BYTES_MAX, "a received snapshot must fit a state-file frame");
const _: () = assert!(
    2 * INPUTS_PER_READY_MAX * (APPEND_BYTES_MAX as usize) + (UNCOMMITTED_BYTES_MAX as usize) < RECORD_BYTES_MAX,
    "the entries of one Ready must fit a state-file frame"
);
const _: () = assert!((APPEND_BYTES_MAX as usize) * 2 < FRAME_BYTES_MAX, "an append message must fit a frame");
const _: () = assert!(PROPOSAL_BYTES_MAX as u64 <= APPEND_BYTES_MAX, "one entry must fit an append message");
