//! The secondary's (and sync target's) apply queue: what the peer sent, in
//! the order it sent it, started on the local disk as soon as ordering
//! allows and no sooner.
//!
//! Rules, checked against the head of the queue only (so nothing overtakes):
//! - nothing starts while a flush is in flight, and a flush starts only on
//!   an idle disk (it covers everything received before it);
//! - the first item of a new write barrier starts only on an idle disk
//!   (every write the primary completed before issuing it is done here);
//! - an item never starts while an overlapping one is in flight (a resync
//!   block and an application write to the same place land in send order).
//!
//! Hence whatever this disk holds after a crash is a state the primary
//! passed through.
//!
//! When the link goes away, the peer's writes and flushes already received
//! are still applied, in the same order (under protocol B the primary may
//! have acknowledged them on the strength of our receipt alone); only the
//! resync and verify items, which need the peer, are dropped. Until that
//! drain ends the queue is [`ApplyQueue::draining`].

use std::collections::{BTreeMap, VecDeque};

use super::ids::{IoId, LinkId};
use super::message::WriteKind;

#[derive(Debug)]
pub(super) enum InKind<P> {
    Write {
        seq: u64,
        kind: WriteKind,
        fua: bool,
        data: Option<P>,
    },
    Resync {
        seq: u64,
        data: P,
    },
    Flush {
        seq: u64,
    },
    /// Compare the local checksum with the peer's (resync or verify).
    Checksum {
        seq: u64,
        peer_csum: u32,
        verify: bool,
    },
}

#[derive(Debug)]
pub(super) struct Incoming<P> {
    pub offset: u64,
    pub len: u32,
    pub barrier: u64,
    pub kind: InKind<P>,
}

/// What an in-flight item needs when its I/O completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Started {
    Write { seq: u64, len: u32 },
    Resync { seq: u64, len: u32 },
    Flush { seq: u64 },
    Checksum { seq: u64, peer_csum: u32, verify: bool },
}

#[derive(Debug)]
struct InFlight {
    offset: u64,
    len: u32,
    flush: bool,
    started: Started,
}

#[derive(Debug)]
pub(super) struct ApplyQueue<P> {
    queue: VecDeque<Incoming<P>>,
    inflight: BTreeMap<IoId, InFlight>,
    barrier: u64,
    /// Barrier of the last item received, for items that carry none.
    last_barrier: u64,
    /// The lost link whose writes are still being applied.
    draining: Option<LinkId>,
}

impl<P> Default for ApplyQueue<P> {
    fn default() -> Self {
        ApplyQueue { queue: VecDeque::new(), inflight: BTreeMap::new(), barrier: 0, last_barrier: 0, draining: None }
    }
}

impl<P> ApplyQueue<P> {
    pub fn push(&mut self, item: Incoming<P>) {
        self.last_barrier = self.last_barrier.max(item.barrier);
        self.queue.push_back(item);
    }

    pub fn last_barrier(&self) -> u64 {
        self.last_barrier
    }

    /// Pops the head if it may start now.
    pub fn next_startable(&mut self) -> Option<Incoming<P>> {
        let head = self.queue.front()?;
        if self.inflight.values().any(|f| f.flush) {
            return None;
        }
        let idle = self.inflight.is_empty();
        let needs_idle = matches!(head.kind, InKind::Flush { .. }) || head.barrier > self.barrier;
        if needs_idle && !idle {
            return None;
        }
        let (start, end) = (head.offset, head.offset + u64::from(head.len));
        if self.inflight.values().any(|f| !f.flush && f.offset < end && start < f.offset + u64::from(f.len)) {
            return None;
        }
        let item = self.queue.pop_front()?;
        self.barrier = self.barrier.max(item.barrier);
        Some(item)
    }

    pub fn started(&mut self, io: IoId, offset: u64, len: u32, started: Started) {
        let flush = matches!(started, Started::Flush { .. });
        self.inflight.insert(io, InFlight { offset, len, flush, started });
    }

    pub fn finish(&mut self, io: IoId) -> Option<Started> {
        let started = self.inflight.remove(&io).map(|f| f.started);
        if self.queue.is_empty() && self.inflight.is_empty() {
            self.draining = None;
        }
        started
    }

    /// A resync item (data or checksum, not verify) is queued or in
    /// flight: the sync target holds its answers until none is.
    pub fn resync_pending(&self) -> bool {
        let queued =
            self.queue.iter().any(|i| matches!(i.kind, InKind::Resync { .. } | InKind::Checksum { verify: false, .. }));
        queued
            || self
                .inflight
                .values()
                .any(|f| matches!(f.started, Started::Resync { .. } | Started::Checksum { verify: false, .. }))
    }

    /// The link went away: the peer's writes and flushes already received
    /// still reach the disk, in order; resync and verify items are dropped
    /// (the bitmap keeps their blocks out of sync). In-flight I/O finishes.
    pub fn lose_link(&mut self, link: LinkId) {
        self.queue.retain(|item| matches!(item.kind, InKind::Write { .. } | InKind::Flush { .. }));
        if !self.queue.is_empty() || !self.inflight.is_empty() {
            self.draining = Some(link);
        }
    }

    /// The lost link whose writes are still being applied, if any: until
    /// they are on disk no new link may start and no local write may be
    /// issued (it could be overwritten by an older one from the queue).
    pub fn draining(&self) -> Option<LinkId> {
        self.draining
    }

    /// A new link starts (only once nothing is draining): its barriers
    /// count from zero.
    pub fn start_link(&mut self) {
        debug_assert!(self.draining.is_none() && self.queue.is_empty());
        self.barrier = 0;
        self.last_barrier = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(offset: u64, barrier: u64, seq: u64) -> Incoming<()> {
        Incoming {
            offset,
            len: 4096,
            barrier,
            kind: InKind::Write { seq, kind: WriteKind::Write, fua: false, data: None },
        }
    }

    #[test]
    fn barriers_flushes_and_overlaps_serialize() {
        let mut q = ApplyQueue::default();
        q.push(write(0, 0, 1));
        q.push(write(8192, 0, 2));
        q.push(write(0, 0, 3)); // overlaps seq 1
        q.push(write(16384, 1, 4)); // next barrier
        let a = q.next_startable().expect("first");
        q.started(1, a.offset, a.len, Started::Write { seq: 1, len: 4096 });
        let b = q.next_startable().expect("same barrier, no overlap");
        q.started(2, b.offset, b.len, Started::Write { seq: 2, len: 4096 });
        assert!(q.next_startable().is_none(), "overlap with seq 1 waits");
        assert_eq!(q.finish(1), Some(Started::Write { seq: 1, len: 4096 }));
        let c = q.next_startable().expect("overlap gone");
        q.started(3, c.offset, c.len, Started::Write { seq: 3, len: 4096 });
        assert!(q.next_startable().is_none(), "new barrier waits for an idle disk");
        q.finish(2);
        q.finish(3);
        let d = q.next_startable().expect("idle now");
        assert_eq!(d.barrier, 1);
        q.started(4, d.offset, d.len, Started::Write { seq: 4, len: 4096 });
        q.push(Incoming { offset: 0, len: 0, barrier: 1, kind: InKind::Flush { seq: 5 } });
        q.push(write(100 << 20, 1, 6));
        assert!(q.next_startable().is_none(), "flush waits for idle");
        q.finish(4);
        let f = q.next_startable().expect("flush");
        q.started(5, 0, 0, Started::Flush { seq: 5 });
        assert!(matches!(f.kind, InKind::Flush { .. }));
        assert!(q.next_startable().is_none(), "nothing passes a flush in flight");
        q.finish(5);
        assert!(q.next_startable().is_some());
    }

    #[test]
    fn a_lost_links_writes_still_drain_in_order() {
        let mut q = ApplyQueue::default();
        q.push(write(0, 0, 1));
        let a = q.next_startable().expect("first");
        q.started(1, a.offset, a.len, Started::Write { seq: 1, len: 4096 });
        q.push(write(0, 0, 2)); // overlaps seq 1: queued
        q.push(Incoming { offset: 0, len: 4096, barrier: 0, kind: InKind::Resync { seq: 3, data: () } });
        q.push(Incoming { offset: 0, len: 0, barrier: 0, kind: InKind::Flush { seq: 4 } });
        q.lose_link(7);
        assert_eq!(q.draining(), Some(7));
        assert!(q.next_startable().is_none(), "still behind the overlapping write");
        q.finish(1);
        let b = q.next_startable().expect("the queued write survives the link");
        assert!(matches!(b.kind, InKind::Write { seq: 2, .. }));
        q.started(2, b.offset, b.len, Started::Write { seq: 2, len: 4096 });
        q.finish(2);
        assert_eq!(q.draining(), Some(7), "the flush is still queued");
        let f = q.next_startable().expect("the resync item was dropped; the flush follows");
        assert!(matches!(f.kind, InKind::Flush { seq: 4 }));
        q.started(3, 0, 0, Started::Flush { seq: 4 });
        q.finish(3);
        assert_eq!(q.draining(), None);
        q.start_link();
    }

    #[test]
    fn an_idle_queue_does_not_drain() {
        let mut q: ApplyQueue<()> = ApplyQueue::default();
        q.lose_link(1);
        assert_eq!(q.draining(), None);
    }
}
