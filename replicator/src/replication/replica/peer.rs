//! Messages on an established link: state, data, acks, flushes, resync and verify traffic.

use super::*;

impl<P: Clone> Replica<P> {
    pub(super) fn handle_established(&mut self, now_ms: u64, link: LinkId, msg: Message<P>) {
        let sync = match &self.conn {
            Conn::Established(p) => p.sync,
            _ => return,
        };
        match msg {
            Message::Hello(_) => self.protocol_error(now_ms, "second Hello on one connection".into()),
            Message::Ping => self.send(now_ms, link, Message::PingAck),
            Message::PingAck => self.state_unconfirmed = false,
            Message::Outdate => self.outdated_by_peer(now_ms),
            Message::State(state) => {
                if state.role == Role::Primary && self.role == Role::Primary {
                    if state.epoch > self.epoch {
                        // Superseded: the cluster granted the peer a newer
                        // epoch, so this node's lease is over. It stops
                        // writing at once and keeps trying to connect; its
                        // cluster manager demotes it.
                        warn!(resource = %self.cfg.resource, epoch = self.epoch, newer = state.epoch,
                            "the peer was promoted with a newer epoch: I/O suspended until this node is demoted");
                        self.held = true;
                        self.epoch = state.epoch;
                        self.persist_meta();
                        let why = format!("superseded by the peer's epoch {}: demote this node", state.epoch);
                        self.lose_peer(now_ms, why, false);
                    } else {
                        let why = "both nodes became primary; disconnected to protect the data".into();
                        self.lose_peer(now_ms, why, true);
                    }
                    self.actions.push_back(Action::CloseLink { link });
                    return;
                }
                if state.epoch > self.epoch {
                    self.epoch = state.epoch;
                    self.persist_meta();
                }
                if let Conn::Established(p) = &mut self.conn {
                    p.role = state.role;
                    p.disk = state.disk;
                }
            }
            Message::Bitmap { pairs, last } => {
                if sync != Sync::SourceWaitBitmap {
                    return self.protocol_error(now_ms, "unexpected bitmap".into());
                }
                for (index, word) in pairs {
                    if !self.bitmap.merge_word(index, word) {
                        return self.protocol_error(now_ms, format!("bitmap word {index} lies outside the volume"));
                    }
                }
                if last {
                    self.bitmap_unpersisted = true;
                    self.start_resync(now_ms);
                }
            }
            Message::Data { seq, epoch, barrier, offset, len, kind, fua, data } => {
                if self.role == Role::Primary {
                    return self.protocol_error(now_ms, "the peer sent writes to a primary".into());
                }
                if epoch < self.epoch {
                    let why = format!("refusing writes from a stale primary (epoch {epoch} < {})", self.epoch);
                    self.lose_peer(now_ms, why, true);
                    self.actions.push_back(Action::CloseLink { link });
                    return;
                }
                if epoch > self.epoch {
                    self.epoch = epoch;
                    self.persist_meta();
                }
                if !self.in_volume(offset, len) || (kind == WriteKind::Write) != data.is_some() {
                    return self
                        .protocol_error(now_ms, format!("write at {offset}+{len} is malformed or outside the volume"));
                }
                if self.cfg.protocol == Protocol::B {
                    self.send(now_ms, link, Message::Ack { seq, kind: AckKind::Received });
                }
                self.apply.push(Incoming { offset, len, barrier, kind: InKind::Write { seq, kind, fua, data } });
                self.pump_apply(now_ms);
            }
            Message::Flush { seq, barrier } => {
                self.apply.push(Incoming { offset: 0, len: 0, barrier, kind: InKind::Flush { seq } });
                self.pump_apply(now_ms);
            }
            Message::ResyncData { seq, offset, len, data } => {
                self.queue_resync_item(now_ms, sync, offset, len, InKind::Resync { seq, data });
            }
            Message::ResyncCsum { seq, offset, len, csum } => {
                let kind = InKind::Checksum { seq, peer_csum: csum, verify: false };
                self.queue_resync_item(now_ms, sync, offset, len, kind);
            }
            Message::VerifyReq { seq, offset, len, csum } => {
                if !self.in_volume(offset, len) {
                    return self.protocol_error(now_ms, "verify request outside the volume".into());
                }
                let barrier = self.apply.last_barrier();
                let kind = InKind::Checksum { seq, peer_csum: csum, verify: true };
                self.apply.push(Incoming { offset, len, barrier, kind });
                self.pump_apply(now_ms);
            }
            Message::ResyncDone(done) => {
                if !matches!(sync, Sync::Target | Sync::None) || self.role == Role::Primary {
                    return self.protocol_error(now_ms, "unexpected end of resync".into());
                }
                self.generations = done.generations;
                self.consistent = true;
                self.outdated = false;
                self.crashed_primary = false;
                self.disk = DiskState::UpToDate;
                self.bitmap.clear_all();
                self.persist_bitmap(now_ms);
                self.persist_meta();
                if let Conn::Established(p) = &mut self.conn {
                    p.sync = Sync::None;
                    p.disk = DiskState::UpToDate;
                    p.lag = Lag::InStep;
                }
                self.target_sync = None;
                info!(resource = %self.cfg.resource, "resync finished: disk UpToDate");
            }
            Message::Ack { seq, kind } => match self.outstanding.get(&seq) {
                Some((Outstanding::Write(id), _)) => {
                    let id = *id;
                    if kind != AckKind::Received {
                        self.outstanding.remove(&seq);
                    }
                    let mut failed = None;
                    if let Some(w) = self.writes.get_mut(&id) {
                        if kind != AckKind::Received {
                            self.unacked_bytes = self.unacked_bytes.saturating_sub(u64::from(w.sent_bytes));
                        }
                        match kind {
                            AckKind::Received if w.peer == PeerWait::Sent => w.peer = PeerWait::Received,
                            AckKind::Received => {}
                            AckKind::Written => {
                                w.peer = PeerWait::Done;
                                w.peer_wrote = true;
                            }
                            AckKind::Failed => {
                                w.peer = PeerWait::Done;
                                failed = Some((w.offset, u64::from(w.len)));
                            }
                        }
                    }
                    if let Some((offset, len)) = failed {
                        self.mark_dirty_superseding(offset, len);
                        // The peer outdated itself; it is UpToDate again only
                        // after the repair resync.
                        if let Conn::Established(p) = &mut self.conn {
                            p.disk = DiskState::Outdated;
                        }
                    }
                    self.try_complete_write(id);
                    self.maybe_catch_up();
                    self.maybe_start_repair(now_ms);
                    if !self.deferred.is_empty() {
                        self.pump_deferred(now_ms);
                    }
                }
                _ => self.protocol_error(now_ms, format!("ack for unknown write {seq}")),
            },
            Message::FlushAck { seq, ok } => match self.outstanding.remove(&seq) {
                Some((Outstanding::Flush(what), _)) => {
                    let epoch = match what {
                        FlushFor::App { id, epoch } => {
                            if let Some(f) = self.flushes.get_mut(&id) {
                                f.peer = PeerWait::Done;
                            }
                            self.try_complete_flush(id);
                            epoch
                        }
                        FlushFor::Epoch(e) => Some(e),
                    };
                    if let Some(e) = epoch {
                        self.epoch_flushed(now_ms, e, true, ok);
                    }
                    if !ok {
                        // It outdated itself and may have lost anything it
                        // had not flushed: the handshake decides the resync
                        // (the lost link marks everything held).
                        self.lose_peer(
                            now_ms,
                            "the peer's disk failed a flush; reconnecting to resync it".into(),
                            false,
                        );
                        self.actions.push_back(Action::CloseLink { link });
                    }
                }
                _ => self.protocol_error(now_ms, format!("flush ack for unknown flush {seq}")),
            },
            Message::ResyncAck { seq, ok } => {
                if !matches!(self.outstanding.remove(&seq), Some((Outstanding::Resync, _))) {
                    return self.protocol_error(now_ms, format!("resync ack for unknown block {seq}"));
                }
                if let Some(r) = self.resync.as_mut() {
                    if ok {
                        if let Some(bits) = r.finished(seq) {
                            self.bitmap.clear_bits(bits);
                            self.bitmap_unpersisted = true;
                        }
                    } else {
                        r.abandon(seq);
                        self.note_error("the peer failed to write resync data; the blocks stay out of sync".into());
                    }
                }
                self.pump_resync(now_ms);
            }
            Message::ResyncCsumReply { seq, equal } => {
                if !matches!(self.outstanding.remove(&seq), Some((Outstanding::Resync, _))) {
                    return self.protocol_error(now_ms, format!("checksum reply for unknown block {seq}"));
                }
                let Some(r) = self.resync.as_mut() else { return };
                if equal {
                    if let Some(bits) = r.finished(seq) {
                        self.bitmap.clear_bits(bits);
                        self.bitmap_unpersisted = true;
                    }
                    self.pump_resync(now_ms);
                } else {
                    r.needs_data(seq);
                    self.pump_resync(now_ms);
                }
            }
            Message::VerifyReply { seq, kind } => {
                if !matches!(self.outstanding.remove(&seq), Some((Outstanding::Verify, _))) {
                    return self.protocol_error(now_ms, format!("verify reply for unknown block {seq}"));
                }
                let Some(v) = self.verify.as_mut() else { return };
                let Some((offset, len)) = v.take(seq) else { return };
                match kind {
                    AckKind::Written => {}
                    // A chunk that differs is checked again granule by
                    // granule; only the granules that differ are marked.
                    AckKind::Received if v.differs(offset, len) => {}
                    AckKind::Received => {
                        v.out_of_sync_bytes += u64::from(len);
                        self.mark_dirty(offset, u64::from(len));
                        warn!(resource = %self.cfg.resource, offset, len, "verify: out of sync");
                    }
                    AckKind::Failed => {
                        self.note_error(format!("the peer could not read {offset}+{len} for verify"));
                        self.mark_dirty(offset, u64::from(len));
                    }
                }
                self.pump_verify(now_ms);
            }
        }
    }

    /// Resync data or a resync checksum for this node (a sync target, or a
    /// secondary being repaired), queued behind what the peer sent before.
    pub(super) fn queue_resync_item(&mut self, now_ms: u64, sync: Sync, offset: u64, len: u32, kind: InKind<P>) {
        if !matches!(sync, Sync::Target | Sync::None) || self.role == Role::Primary || !self.in_volume(offset, len) {
            return self.protocol_error(now_ms, "unexpected or malformed resync frame".into());
        }
        let barrier = self.apply.last_barrier();
        self.apply.push(Incoming { offset, len, barrier, kind });
        self.pump_apply(now_ms);
    }

    pub(super) fn in_volume(&self, offset: u64, len: u32) -> bool {
        len > 0 && offset.checked_add(u64::from(len)).is_some_and(|end| end <= self.cfg.size_bytes)
    }

    pub(super) fn protocol_error(&mut self, now_ms: u64, why: String) {
        let link = self.link();
        self.lose_peer(now_ms, format!("protocol error: {why}"), false);
        if let Some(link) = link {
            self.actions.push_back(Action::CloseLink { link });
        }
    }
}
