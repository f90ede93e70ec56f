//! The primary's write path: application writes and flushes, the send queue and pull-ahead, epochs of the transfer log, completion.

use super::*;

impl<P: Clone> Replica<P> {
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
    pub(super) fn pump_deferred(&mut self, now_ms: u64) {
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
    pub(super) fn send_queue_full(&self, len: u64) -> bool {
        self.cfg.protocol == Protocol::A
            && self.lag() != Lag::Ahead
            && self.replicating_link().is_some()
            && self.unacked_bytes > 0
            && self.unacked_bytes + len > self.cfg.send_queue_bytes_max
    }

    /// A resync read of an overlapping range is in flight on this source:
    /// the write waits so the peer gets the resync data first.
    pub(super) fn resync_conflict(&self, offset: u64, len: u32) -> bool {
        self.resync.as_ref().is_some_and(|r| r.reading_overlaps(offset, u64::from(len)))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn issue_write(
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
        if replicate.is_none() {
            // Durable before the write's disk action below.
            self.rotate_if_pending();
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
    pub(super) fn issue_flush(&mut self, now_ms: u64, id: AppId) {
        let replicate = self.replicating_link();
        let epoch = self.tl.close(replicate.is_some());
        let peer = if replicate.is_some() { PeerWait::Sent } else { PeerWait::NotReplicated };
        self.flushes.insert(id, Flush { local: None, peer });
        self.issue_flushes(now_ms, replicate, FlushFor::App { id, epoch });
    }

    /// Closes the transfer log's open epoch (if it holds anything) with a
    /// flush of both disks.
    pub(super) fn close_epoch(&mut self, now_ms: u64) {
        let replicate = self.replicating_link();
        if let Some(epoch) = self.tl.close(replicate.is_some()) {
            self.issue_flushes(now_ms, replicate, FlushFor::Epoch(epoch));
        }
    }

    /// One local flush, and a `Flush` to the peer on `link`; the peer's
    /// covers everything it received before (its apply queue flushes an
    /// idle disk).
    pub(super) fn issue_flushes(&mut self, now_ms: u64, link: Option<LinkId>, what: FlushFor) {
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
    pub(super) fn retire(&mut self, now_ms: u64) {
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
    pub(super) fn epoch_flushed(&mut self, now_ms: u64, epoch: u64, peer: bool, ok: bool) {
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
    pub(super) fn replicating_link(&self) -> Option<LinkId> {
        match &self.conn {
            Conn::Established(p) if p.replicating => Some(p.link),
            _ => None,
        }
    }

    /// Marks a range out of sync while a peer may still acknowledge earlier
    /// writes to it (pulled ahead, or a peer's failed write): those writes
    /// no longer prove the range in sync when they settle (sim seed 679:
    /// an earlier write's late ack cleared the marks of later ones).
    pub(super) fn mark_dirty_superseding(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        for w in self.writes.values_mut() {
            if w.offset < end && offset < w.offset + u64::from(w.len) {
                w.superseded = true;
            }
        }
        self.mark_dirty(offset, len);
    }

    pub(super) fn mark_dirty(&mut self, offset: u64, len: u64) {
        self.bitmap.set_bytes(offset, len);
        self.bitmap_unpersisted = true;
        if let Some(r) = self.resync.as_mut() {
            r.invalidate(offset, len);
        }
    }

    /// Completes application requests whose conditions are met.
    /// Starts the data generation that a lost peer lacks, if losing it left
    /// that for the first write answered or issued without it.
    pub(super) fn rotate_if_pending(&mut self) {
        if self.rotate_on_write {
            self.rotate_on_write = false;
            let fresh = self.fresh_generation();
            self.generations.start_new(fresh);
            self.persist_meta();
        }
    }

    pub(super) fn try_complete_write(&mut self, id: AppId) {
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
        let (answered, peer, peer_wrote) = (w.answered, w.peer, w.peer_wrote);
        if !answered {
            if peer == PeerWait::NotReplicated && self.replicating_link().is_none() {
                // The first write the peer lacks that a client hears of
                // belongs to a new generation (persisted before the answer).
                self.rotate_if_pending();
            }
            // Later writes need a barrier only if this one is answered before
            // the peer has it on disk (protocols A and B, or no peer). When
            // the peer's Written ack came first (protocol C), the peer holds
            // it already and its apply queue need not drain before them.
            if !(peer == PeerWait::Done && peer_wrote) {
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
            if self.tl.open_len() >= crate::replication::transfer_log::EPOCH_WRITES_MAX || self.al_starved {
                self.close_epoch(now);
            }
            self.pump_after_write();
        } else if let Some(w) = self.writes.get_mut(&id) {
            w.answered = true;
        }
    }

    pub(super) fn try_complete_flush(&mut self, id: AppId) {
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

    pub(super) fn overlaps_tracked(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        self.writes.values().any(|w| w.offset < end && offset < w.offset + u64::from(w.len))
    }

    /// A write finished: deferred requests and a waiting resync may go on.
    pub(super) fn pump_after_write(&mut self) {
        let now = self.now_ms;
        if !self.deferred.is_empty() {
            self.pump_deferred(now);
        }
        if self.resync.is_some() {
            self.pump_resync(now);
        }
    }
}
