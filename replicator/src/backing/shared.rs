//! State shared by every handle and I/O thread of one backing store: the open
//! files, facts fixed at open time, the fallocate modes learned at run time,
//! and the operation counters.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::device::DeviceKind;

/// The descriptors the rings operate on.
pub(super) struct Files {
    /// Page-cache descriptor; used for everything O_DIRECT cannot do.
    pub buffered: File,
    /// O_DIRECT descriptor, when direct I/O was asked for.
    pub direct: Option<File>,
    /// Offset, length and address alignment that O_DIRECT needs.
    pub direct_align: u64,
}

pub(super) struct Shared {
    pub files: Files,
    pub kind: DeviceKind,
    /// Hard upper bound for every operation: the metadata area lies beyond.
    pub data_size: u64,
    pub read_only: bool,
    /// SEEK_DATA/SEEK_HOLE give real answers (regular files on most fs).
    pub block_status: bool,
    /// fallocate(PUNCH_HOLE) has not yet answered EOPNOTSUPP.
    pub trim_ok: AtomicBool,
    /// fallocate(ZERO_RANGE) has not yet answered EOPNOTSUPP.
    pub zero_range_ok: AtomicBool,
    /// RWF_DONTCACHE has not yet answered EOPNOTSUPP (see `IoOp::Write`).
    pub dontcache_ok: AtomicBool,
    /// See `BackingConfig::busy_poll`.
    pub busy_poll: std::time::Duration,
    pub stats: Counters,
}

/// What an operation counts as, for [`Counters::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

/// Snapshot of a backing's operation counters (successful operations by
/// kind, payload bytes, and failed operations of any kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackingStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub block_status: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

/// Relaxed atomics: the counters are statistics, never used to synchronise.
#[derive(Default)]
pub(super) struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    block_status: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    /// Counts one finished operation; `bytes` is its payload length.
    pub fn record(&self, kind: OpKind, bytes: u64, ok: bool) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        if !ok {
            add(&self.errors, 1);
            return;
        }
        match kind {
            OpKind::Read => {
                add(&self.reads, 1);
                add(&self.bytes_read, bytes);
            }
            OpKind::Write => {
                add(&self.writes, 1);
                add(&self.bytes_written, bytes);
            }
            OpKind::Flush => add(&self.flushes, 1),
            OpKind::Trim => add(&self.trims, 1),
            OpKind::WriteZeroes => add(&self.write_zeroes, 1),
            OpKind::BlockStatus => add(&self.block_status, 1),
        }
    }

    pub fn snapshot(&self) -> BackingStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BackingStats {
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            trims: get(&self.trims),
            write_zeroes: get(&self.write_zeroes),
            block_status: get(&self.block_status),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            errors: get(&self.errors),
        }
    }
}
