//! Resync (source and target) and online verify: starting, pacing, finishing.

use super::*;

impl<P: Clone> Replica<P> {
    pub(super) fn start_resync(&mut self, now_ms: u64) {
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

    pub(super) fn lag(&self) -> Lag {
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
    pub(super) fn pull_ahead(&mut self, now_ms: u64) -> bool {
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
    pub(super) fn maybe_catch_up(&mut self) {
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
    pub(super) fn outdated_by_peer(&mut self, now_ms: u64) {
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
    pub(super) fn maybe_start_repair(&mut self, now_ms: u64) {
        let idle = matches!(&self.conn, Conn::Established(p)
            if p.sync == Sync::None && p.role != Role::Primary && p.lag == Lag::InStep);
        let peer_outdated = matches!(&self.conn, Conn::Established(p) if p.disk == DiskState::Outdated);
        if idle && (self.bitmap.count() > 0 || peer_outdated) && self.disk == DiskState::UpToDate {
            info!(resource = %self.cfg.resource, out_of_sync_bytes = self.bitmap.dirty_bytes(), "resending out-of-sync blocks");
            self.start_resync(now_ms);
        }
    }

    pub(super) fn pump_resync(&mut self, now_ms: u64) {
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

    pub(super) fn finish_resync(&mut self, now_ms: u64, link: LinkId) {
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

    pub(super) fn pump_verify(&mut self, now_ms: u64) {
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
}
