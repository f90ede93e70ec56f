//! Every bound kernel-glue relies on, in one place, with units last.

use std::time::Duration;

/// Largest READ or WRITE the FUSE path forwards in one NBD request. The
/// kernel splits larger FUSE I/O; 1 MiB lets a 1 MiB loop request through
/// whole (FUSE's own default limit is 256 pages).
pub const REQUEST_BYTES_MAX: u32 = 1024 * 1024;

/// Largest TRIM or WRITE_ZEROES sent in one request; larger FUSE ranges
/// are split (NBD lengths are 32-bit).
pub const RANGE_REQUEST_BYTES_MAX: u32 = 1 << 30;

/// Requests one NBD connection may have outstanding (FUSE path). Beyond
/// this, submitters wait, bounded by their own deadline. Each keeps its
/// message until answered (for resending after a reconnect), so this also
/// bounds that memory: 64 × 1 MiB.
pub const INFLIGHT_REQUESTS_MAX: usize = 64;

/// Bound on the option haggling: an export name longer than this is a bug.
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;

/// An option reply larger than this closes the handshake (protects the
/// client from a hostile or broken server).
pub const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;

/// Option replies accepted for one NBD_OPT_GO before giving up.
pub const OPTION_REPLIES_MAX: usize = 32;

/// Block size handed to the kernel and to the loop device.
pub const BLOCK_SIZE_BYTES: u32 = 4096;

/// Sockets one kernel nbd device may get (`AttachConfig::connections`).
pub const KERNEL_CONNECTIONS_MAX: u32 = 16;

/// Default per-request timeout: after it, I/O fails with EIO.
pub const IO_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// How long a forced or clean detach waits for in-flight requests.
pub const DETACH_DRAIN_MAX: Duration = Duration::from_secs(10);

/// Attempts to claim a free loop or nbd device before giving up (another
/// process may take the one we picked between lookup and configure).
pub const DEVICE_CLAIM_ATTEMPTS_MAX: u32 = 16;

/// Minimum pause between reconnect attempts after the connection died.
pub const RECONNECT_INTERVAL_MIN: Duration = Duration::from_millis(500);

const _: () = assert!(REQUEST_BYTES_MAX as usize % BLOCK_SIZE_BYTES as usize == 0);
const _: () = assert!(INFLIGHT_REQUESTS_MAX > 0 && OPTION_REPLIES_MAX > 0);
