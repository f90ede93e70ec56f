//! The primary's transfer log: writes that both disks completed but that
//! may not yet be on *stable storage* on both.
//!
//! A completed write is in a disk's cache, not necessarily on its platter:
//! a power loss can still take it. So a write leaves the primary's
//! tracking (its bitmap bits cleared, its activity-log extents released)
//! only once a flush on each disk covers it, epoch by epoch as DRBD does
//! with barrier acknowledgements:
//!
//! - a settled write joins the *open* epoch;
//! - closing the epoch issues one local flush and sends one `Flush` to the
//!   peer (a client FLUSH closes it; so do [`EPOCH_WRITES_MAX`] settled
//!   writes, [`EPOCH_OPEN_MS_MAX`] of age, and a full activity log);
//! - an epoch retires, oldest first, once its local flush and the peer's
//!   `FlushAck` are in; only then are its writes durable on both nodes.
//!
//! Until then a lost link (or a peer that failed its flush) marks the
//! epoch's writes out of sync, and the activity log keeps their extents,
//! so a crash of either node finds them. A flush covers every write that
//! completed before it was issued, which holds here: a write joins an
//! epoch only after both disks completed it, and the epoch's flushes are
//! issued after that (the peer's `Flush` arrives behind the write it
//! acknowledged).
//!
//! Pure bookkeeping: [`super::replica::Replica`] issues the flushes and
//! acts on what retires.

use std::collections::VecDeque;
use std::ops::RangeInclusive;

/// Settled writes an open epoch holds before it is closed (bounds the
/// log: at most this many per epoch, and epochs close no later than
/// [`EPOCH_OPEN_MS_MAX`]).
pub const EPOCH_WRITES_MAX: usize = 4096;

/// Age of an open epoch's first write after which the epoch is closed.
pub const EPOCH_OPEN_MS_MAX: u64 = 100;

/// A write both disks completed, waiting for both to flush it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settled {
    pub offset: u64,
    pub len: u32,
    pub extents: RangeInclusive<u32>,
    /// Both sides wrote it successfully: its bits may be cleared once it
    /// is durable on both. False once anything made it out of sync.
    pub in_sync: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerFlush {
    /// The epoch's `Flush` is on its way to the peer.
    Waiting,
    /// Acknowledged, or not needed (no peer when it closed, or the peer
    /// was lost: its writes were marked out of sync instead).
    Resolved,
}

#[derive(Debug)]
struct Epoch {
    id: u64,
    writes: Vec<Settled>,
    local: Option<bool>,
    peer: PeerFlush,
}

#[derive(Debug, Default)]
pub(super) struct TransferLog {
    open: Vec<Settled>,
    open_since_ms: Option<u64>,
    closed: VecDeque<Epoch>,
    next_id: u64,
}

impl TransferLog {
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.closed.is_empty()
    }

    pub fn open_len(&self) -> usize {
        self.open.len()
    }

    pub fn push(&mut self, now_ms: u64, write: Settled) {
        self.open_since_ms.get_or_insert(now_ms);
        self.open.push(write);
        assert!(self.open.len() <= EPOCH_WRITES_MAX, "the open epoch is closed before it exceeds its bound");
    }

    /// When the open epoch must be closed by age.
    pub fn close_due_ms(&self) -> Option<u64> {
        self.open_since_ms.map(|t| t + EPOCH_OPEN_MS_MAX)
    }

    /// Closes the open epoch, if it holds anything: the caller issues a
    /// local flush and, when `peer`, sends the peer a `Flush`, and reports
    /// both outcomes with the returned id.
    pub fn close(&mut self, peer: bool) -> Option<u64> {
        if self.open.is_empty() {
            return None;
        }
        self.next_id += 1;
        let id = self.next_id;
        let writes = std::mem::take(&mut self.open);
        self.open_since_ms = None;
        let peer = if peer { PeerFlush::Waiting } else { PeerFlush::Resolved };
        self.closed.push_back(Epoch { id, writes, local: None, peer });
        Some(id)
    }

    /// The local flush of epoch `id` finished. Returns the ranges that a
    /// failed flush leaves out of sync (the peer may hold what this disk lost).
    pub fn local_flushed(&mut self, id: u64, ok: bool) -> Vec<(u64, u32)> {
        let Some(e) = self.closed.iter_mut().find(|e| e.id == id) else { return Vec::new() };
        assert!(e.local.is_none(), "one local flush per epoch");
        e.local = Some(ok);
        if ok {
            return Vec::new();
        }
        e.writes.iter_mut().map(mark).collect()
    }

    /// The peer answered epoch `id`'s flush. A failed flush leaves the
    /// epoch's writes out of sync.
    pub fn peer_flushed(&mut self, id: u64, ok: bool) -> Vec<(u64, u32)> {
        let Some(e) = self.closed.iter_mut().find(|e| e.id == id) else { return Vec::new() };
        e.peer = PeerFlush::Resolved;
        if ok {
            return Vec::new();
        }
        e.writes.iter_mut().map(mark).collect()
    }

    /// The link went away: nothing held is known durable on the peer any
    /// more. Returns every held range, for the bitmap; closed epochs now
    /// wait only for their local flush.
    pub fn peer_lost(&mut self) -> Vec<(u64, u32)> {
        let mut ranges: Vec<(u64, u32)> = self.open.iter_mut().map(mark).collect();
        for e in &mut self.closed {
            e.peer = PeerFlush::Resolved;
            ranges.extend(e.writes.iter_mut().map(mark));
        }
        ranges
    }

    /// The oldest epoch, if both of its flushes are in: its writes are
    /// durable on every disk that still counts.
    pub fn pop_retired(&mut self) -> Option<Vec<Settled>> {
        let front = self.closed.front()?;
        if front.local.is_none() || front.peer == PeerFlush::Waiting {
            return None;
        }
        self.closed.pop_front().map(|e| e.writes)
    }

    /// Some held write overlaps the range (a later write decides what the
    /// blocks hold, so an earlier one must not clear their bits).
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        let hit = |w: &Settled| w.offset < end && offset < w.offset + u64::from(w.len);
        self.open.iter().any(hit) || self.closed.iter().any(|e| e.writes.iter().any(hit))
    }
}

fn mark(w: &mut Settled) -> (u64, u32) {
    w.in_sync = false;
    (w.offset, w.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled(block: u64) -> Settled {
        Settled { offset: block * 4096, len: 4096, extents: 0..=0, in_sync: true }
    }

    #[test]
    fn an_epoch_retires_only_after_both_flushes_in_order() {
        let mut tl = TransferLog::default();
        tl.push(0, settled(1));
        assert_eq!(tl.close_due_ms(), Some(EPOCH_OPEN_MS_MAX));
        let a = tl.close(true).expect("non-empty");
        tl.push(5, settled(2));
        let b = tl.close(true).expect("non-empty");
        assert!(tl.close(true).is_none(), "nothing open");
        tl.local_flushed(b, true);
        tl.peer_flushed(b, true);
        assert!(tl.pop_retired().is_none(), "epochs retire oldest first");
        tl.local_flushed(a, true);
        assert!(tl.pop_retired().is_none(), "the peer's flush is still out");
        tl.peer_flushed(a, true);
        assert_eq!(tl.pop_retired(), Some(vec![settled(1)]));
        assert_eq!(tl.pop_retired(), Some(vec![settled(2)]));
        assert!(tl.is_empty());
    }

    #[test]
    fn a_lost_peer_marks_everything_held_and_stops_waiting_for_it() {
        let mut tl = TransferLog::default();
        tl.push(0, settled(1));
        let a = tl.close(true).expect("non-empty");
        tl.push(1, settled(2));
        let lost = tl.peer_lost();
        assert_eq!(lost, vec![(8192, 4096), (4096, 4096)]);
        tl.local_flushed(a, true);
        let retired = tl.pop_retired().expect("no peer to wait for");
        assert!(!retired[0].in_sync, "out of sync: its bits stay set");
        assert!(tl.overlaps(8192, 4096), "the open write is still held");
    }

    #[test]
    fn failed_flushes_leave_writes_out_of_sync() {
        let mut tl = TransferLog::default();
        tl.push(0, settled(1));
        let a = tl.close(false).expect("non-empty");
        assert_eq!(tl.local_flushed(a, false), vec![(4096, 4096)]);
        assert!(!tl.pop_retired().expect("local only")[0].in_sync);
        tl.push(0, settled(3));
        let b = tl.close(true).expect("non-empty");
        tl.local_flushed(b, true);
        assert_eq!(tl.peer_flushed(b, false), vec![(3 * 4096, 4096)]);
        assert!(!tl.pop_retired().expect("both in")[0].in_sync);
    }
}
