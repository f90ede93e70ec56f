//! Disk completions: the primary's own writes and flushes, the secondary's apply queue, resync and verify reads.

use super::*;

impl<P: Clone> Replica<P> {
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

    pub(super) fn apply_done(&mut self, now_ms: u64, io: IoId, link: LinkId, result: Result<DiskOutput<P>, i32>) {
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
    pub(super) fn maybe_flush_replies(&mut self, link: LinkId) {
        if self.reply_flush.is_some() || self.replies_unflushed.is_empty() || self.apply.resync_pending() {
            return;
        }
        self.replies_flushing = std::mem::take(&mut self.replies_unflushed);
        let io = self.take_io(IoPurpose::ReplyFlush { link });
        self.reply_flush = Some(io);
        self.actions.push_back(Action::Disk { io, op: DiskOp::Flush });
    }

    pub(super) fn reply_flush_done(&mut self, now_ms: u64, link: LinkId, ok: bool) {
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

    pub(super) fn pump_apply(&mut self, _now_ms: u64) {
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

    pub(super) fn resync_read_done(&mut self, now_ms: u64, link: LinkId, seq: u64, result: Result<DiskOutput<P>, i32>) {
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

    pub(super) fn verify_read_done(&mut self, now_ms: u64, link: LinkId, seq: u64, result: Result<DiskOutput<P>, i32>) {
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
}
