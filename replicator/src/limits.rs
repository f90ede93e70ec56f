//! Every bound the replicator enforces, in one place, with units last.
//!
//! Relations between limits are checked at compile time below, so that
//! changing one cannot silently break another.
//!
//! Channels between tasks and threads: the replication driver's request
//! queue ([`REPL_APP_QUEUE_REQUESTS_MAX`]), its disk completions
//! ([`REPL_DISK_COMPLETIONS_MAX`]), the link's two send queues
//! ([`REPL_LINK_URGENT_QUEUE_BYTES_MAX`], [`link_bulk_queue_bytes_max`]),
//! its event queue (256 events; the reader waits), admin commands (16) and
//! the per-connection and I/O-engine queues, whose bound is the in-flight
//! budget of their senders ([`CONNECTION_INFLIGHT_BYTES_MAX`]).

/// Largest NBD request payload (READ/WRITE length) we accept; advertised as
/// the maximum block size. Larger WRITEs are refused and the connection
/// closed, because their payload cannot be skipped cheaply.
pub const NBD_REQUEST_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// Preferred block size advertised to clients (and the page size we align
/// buffers to).
pub const NBD_BLOCK_BYTES_PREFERRED: u32 = 4096;

/// Largest option payload accepted during the handshake. The spec limits
/// names and queries to 4 KiB each; options larger than this are refused
/// with NBD_REP_ERR_TOO_BIG and the connection is closed.
pub const NBD_OPTION_BYTES_MAX: u32 = 64 * 1024;

/// Options a client may send before it must pick an export; bounds the time
/// and work an unauthenticated client can cost us.
pub const NBD_OPTIONS_PER_HANDSHAKE_MAX: u32 = 256;

/// Meta-context queries in one LIST/SET_META_CONTEXT option.
pub const NBD_META_QUERIES_MAX: u32 = 128;

/// Payload bytes one connection may have in flight, in both directions
/// (write data received but not yet written, read data read but not yet
/// sent); every request counts at least [`INFLIGHT_UNIT_BYTES`], so this
/// also bounds the number of requests in flight. A client that stops
/// reading replies stalls here.
pub const CONNECTION_INFLIGHT_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Payload bytes all connections together may have in flight.
pub const SERVER_INFLIGHT_BYTES_MAX: u64 = 1024 * 1024 * 1024;

/// Concurrent client connections (NBD, all listeners together).
pub const SERVER_CONNECTIONS_MAX: usize = 1024;

/// Largest control payload on the replication link (Hello, State,
/// ResyncDone: a few hundred bytes in practice).
pub const REPL_CONTROL_PAYLOAD_BYTES_MAX: u32 = 64 * 1024;

/// Peer data a node holds between reading it and writing it to disk
/// (queued in the apply queue or in flight to the disk); the link reader
/// stops when it is spent.
pub const REPL_RECEIVE_BYTES_MAX: u64 = 128 * 1024 * 1024;

/// Protocol A: write data a primary keeps sent but not yet acknowledged
/// written by the peer (DRBD's `sndbuf-size`); further writes wait.
pub const REPL_SEND_QUEUE_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// The range `net.send-queue-kib` may set that bound in (the default is
/// [`REPL_SEND_QUEUE_BYTES_MAX`]).
pub const REPL_SEND_QUEUE_KIB_MIN: u64 = 64;
pub const REPL_SEND_QUEUE_KIB_MAX: u64 = 1024 * 1024;

/// Encoded bytes of acks, pings and replies queued for the peer. A peer
/// that keeps sending writes but stops reading our acks reaches it; the
/// link is then dropped (what it did not acknowledge is marked out of sync).
pub const REPL_LINK_URGENT_QUEUE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Encoded bytes of data, flushes, resync and bitmap frames queued for the
/// peer (the bulk queue). Everything upstream is bounded, so a peer that
/// reads never reaches it: application writes in flight (their payload
/// and a header each), protocol A's send queue at its largest, resync data both ways, a
/// whole bitmap twice over (`bitmap_bytes`: the resource's dirty bitmap
/// in bytes, sent as (index, word) pairs), plus a slack for control frames.
pub const fn link_bulk_queue_bytes_max(bitmap_bytes: u64) -> u64 {
    SERVER_INFLIGHT_BYTES_MAX
        + (SERVER_INFLIGHT_BYTES_MAX / INFLIGHT_UNIT_BYTES as u64) * REPL_FRAME_HEADER_BYTES
        + REPL_SEND_QUEUE_KIB_MAX * 1024
        + 2 * REPL_RESYNC_INFLIGHT_BYTES_MAX
        + 4 * bitmap_bytes
        + 16 * 1024 * 1024
}

/// A replication frame's header (`wire::HEADER_BYTES`).
pub const REPL_FRAME_HEADER_BYTES: u64 = 56;

/// NBD requests queued from the client connections to a replicated
/// volume's driver. Every request holds at least one in-flight unit of the
/// server's budget until answered, so the queue can never hold more; a
/// full queue is a bug and the request fails instead of waiting.
pub const REPL_APP_QUEUE_REQUESTS_MAX: usize = (SERVER_INFLIGHT_BYTES_MAX / INFLIGHT_UNIT_BYTES as u64) as usize;

/// Disk completions queued from the I/O engine to a replicated volume's
/// driver: at most one per operation the driver has in flight, which is
/// bounded by the application budget, the receive budget, the resync
/// window and one flush per epoch and client FLUSH. The driver asserts it.
pub const REPL_DISK_COMPLETIONS_MAX: usize = REPL_APP_QUEUE_REQUESTS_MAX
    + (REPL_RECEIVE_BYTES_MAX / INFLIGHT_UNIT_BYTES as u64) as usize
    + (REPL_RESYNC_INFLIGHT_BYTES_MAX / INFLIGHT_UNIT_BYTES as u64) as usize
    + 4096;

/// Bytes one resync request covers (a run of dirty bitmap granules).
pub const REPL_RESYNC_CHUNK_BYTES: u32 = 256 * 1024;

/// Resync bytes a sync source keeps in flight (read, sent, not acked).
pub const REPL_RESYNC_INFLIGHT_BYTES_MAX: u64 = 8 * 1024 * 1024;

/// Largest bitmap frame: 4096 (index, word) pairs.
pub const REPL_BITMAP_PAYLOAD_BYTES_MAX: u32 = 4096 * 16;

/// Milliseconds an accepted replication connection may take to finish its
/// TLS handshake (the resource's `net.io-timeout-ms` if shorter). The
/// real peer needs a few round trips; anything slower is idle or hostile.
pub const REPL_PREAUTH_TIMEOUT_MS: u64 = 2_000;

/// Unauthenticated replication connections (handshake not finished) from
/// one source address (IPv6: one /64); more are closed at once.
pub const REPL_PREAUTH_PER_SOURCE_MAX: usize = 4;

/// Unauthenticated replication connections from all sources together,
/// not counting the configured peer's address, which keeps its own
/// per-source share whatever others do.
pub const REPL_PREAUTH_CONNECTIONS_MAX: usize = 64;

/// At most one warning per this many milliseconds about failed
/// replication connections and handshakes (each side); the others are
/// counted in the next warning.
pub const REPL_LINK_WARN_INTERVAL_MS: u64 = 10_000;

/// Seconds a client may take to finish the handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT_SECS: u64 = 30;

/// Seconds a reply write may stall (client not reading) before the
/// connection is dropped and its in-flight buffers freed.
pub const REPLY_WRITE_STALL_SECS: u64 = 30;

/// Seconds SIGTERM waits for in-flight requests before giving up on them.
pub const SHUTDOWN_DRAIN_SECS: u64 = 30;

/// Read replies up to this size are copied into the batch buffer; larger
/// ones are written straight from their I/O buffer.
pub const REPLY_COPY_BYTES_MAX: usize = 64 * 1024;

/// Control-socket request size.
pub const CONTROL_MESSAGE_BYTES_MAX: u32 = 64 * 1024;

/// Accounting unit for in-flight bytes (semaphore permits are this many bytes).
pub const INFLIGHT_UNIT_BYTES: u32 = 4096;

const _: () = assert!(NBD_REQUEST_BYTES_MAX <= CONNECTION_INFLIGHT_BYTES_MAX);
const _: () = assert!(CONNECTION_INFLIGHT_BYTES_MAX as u64 <= SERVER_INFLIGHT_BYTES_MAX);
const _: () = assert!(NBD_REQUEST_BYTES_MAX % INFLIGHT_UNIT_BYTES == 0);
const _: () = assert!(CONNECTION_INFLIGHT_BYTES_MAX % INFLIGHT_UNIT_BYTES == 0);
const _: () = assert!(NBD_REQUEST_BYTES_MAX.is_power_of_two());
const _: () = assert!(NBD_BLOCK_BYTES_PREFERRED <= NBD_REQUEST_BYTES_MAX);
const _: () = assert!(REPL_PREAUTH_PER_SOURCE_MAX >= 2, "the peer may have a stale attempt open while it retries");
const _: () = assert!(REPL_PREAUTH_PER_SOURCE_MAX <= REPL_PREAUTH_CONNECTIONS_MAX);
const _: () = assert!(link_bulk_queue_bytes_max(0) > SERVER_INFLIGHT_BYTES_MAX + REPL_SEND_QUEUE_BYTES_MAX);
const _: () = assert!(REPL_LINK_URGENT_QUEUE_BYTES_MAX >= 1024 * REPL_FRAME_HEADER_BYTES);
