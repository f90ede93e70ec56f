//! Admin commands: promote, demote, connect, disconnect, verify, invalidate, outdate, quiesce and shutdown.

use super::*;

impl<P: Clone> Replica<P> {
    /// Makes this node primary with `epoch` (default: one past the newest
    /// seen).
    pub fn promote(&mut self, now_ms: u64, force: bool, epoch: Option<u64>) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role == Role::Primary {
            // Re-asserting a primary with a newer epoch: how an admin (or the
            // cluster) keeps this node's data after a split brain in which
            // the peer was promoted later.
            return match epoch {
                Some(e) if e > self.epoch => {
                    warn!(resource = %self.cfg.resource, old = self.epoch, new = e, "primary epoch raised by the admin");
                    // Stays primary: a demotion waiting for its flushes is off.
                    self.demote_pending = false;
                    self.epoch = e;
                    self.persist_meta();
                    if let Some(link) = self.link().filter(|_| self.is_connected()) {
                        self.send_state(now_ms, link);
                    }
                    Ok(())
                }
                _ => Err(AdminError::AlreadyPrimary),
            };
        }
        if matches!(self.conn, Conn::Handshaking { .. }) {
            return Err(AdminError::Handshaking);
        }
        if self.recovering {
            return Err(AdminError::Recovering);
        }
        let peer_primary = matches!(&self.conn, Conn::Established(p) if p.role == Role::Primary);
        if peer_primary && epoch.is_none() {
            return Err(AdminError::PeerIsPrimary);
        }
        if self.disk != DiskState::UpToDate && !force {
            return Err(AdminError::NotUpToDate(self.disk));
        }
        let new_epoch = epoch.unwrap_or(self.epoch + 1);
        if new_epoch <= self.epoch {
            return Err(AdminError::StaleEpoch { given: new_epoch, seen: self.epoch });
        }
        if peer_primary {
            // A newer epoch is the cluster manager's word that the peer's
            // lease is over (waited out or fenced): the peer may still look
            // alive here (its pings answered within our timeout), but it
            // can no longer write, and its frames carry an older epoch that
            // this node refuses from now on. Drop its link and go on alone.
            // If the peer is alive after all, it hears of the new epoch
            // first and suspends itself.
            let link = self.link();
            if let Some(link) = link {
                let state = PeerState { role: Role::Primary, disk: self.disk, epoch: new_epoch };
                self.send(now_ms, link, Message::State(state));
            }
            self.lose_peer(
                now_ms,
                format!("promoted with epoch {new_epoch}: dropped the link to the superseded primary"),
                false,
            );
            if let Some(link) = link {
                self.actions.push_back(Action::CloseLink { link });
            }
        }
        let connected = self.is_connected();
        if self.disk != DiskState::UpToDate {
            warn!(resource = %self.cfg.resource, disk = ?self.disk, "FORCED promotion: this node's data becomes the truth; the peer will be overwritten by a full sync");
            let fresh = self.fresh_generation();
            self.generations.force_new(fresh);
            self.consistent = true;
            self.outdated = false;
            self.disk = DiskState::UpToDate;
            self.bitmap.set_all();
            self.persist_bitmap(now_ms);
        } else if !connected {
            // At once, unlike after a peer loss: a crashed primary that
            // returns must find this node's data newer than its own.
            let fresh = self.fresh_generation();
            self.generations.start_new(fresh);
        }
        assert!(
            !matches!(&self.conn, Conn::Established(p) if p.role == Role::Primary),
            "never primary beside a connected primary"
        );
        self.role = Role::Primary;
        self.epoch = new_epoch;
        self.persist_meta();
        info!(resource = %self.cfg.resource, epoch = new_epoch, "promoted to primary");
        if let Some(link) = self.link() {
            if force && self.resync.is_none() && connected {
                // Renegotiate so the peer is fully synced from us.
                self.lose_peer(now_ms, "forced promotion: reconnecting to resync the peer".into(), false);
                self.actions.push_back(Action::CloseLink { link });
            } else if connected {
                self.send_state(now_ms, link);
            }
        }
        if !self.is_connected() && self.cfg.fencing == Fencing::ResourceAndStonith {
            warn!(resource = %self.cfg.resource, "promoted without a peer: I/O suspended until the fence handler succeeds");
            self.frozen = true;
            self.start_fence();
        }
        Ok(())
    }

    /// Makes this node secondary. The shell first makes sure no client holds
    /// the volume writable; writes in flight make this fail.
    pub fn demote(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role != Role::Primary {
            return Err(AdminError::NotPrimary);
        }
        if matches!(self.conn, Conn::Handshaking { .. }) {
            return Err(AdminError::Handshaking);
        }
        let pending = self.writes.len() + self.flushes.len() + self.deferred.len();
        if pending > 0 && !self.io_suspended() {
            return Err(AdminError::WritesInFlight(pending));
        }
        if pending > 0 {
            // Suspended I/O of a primary being given up (its peer won): the
            // writes were never acknowledged and never will be.
            warn!(resource = %self.cfg.resource, pending, "demoting a suspended primary: failing its suspended I/O");
            self.fail_all_pending();
        }
        if self.demote_pending {
            return Ok(());
        }
        // The activity log may forget an extent only once its writes are
        // durable on both disks: flush first, change the role after.
        self.close_epoch(now_ms);
        if !self.tl.is_empty() {
            self.demote_pending = true;
            info!(resource = %self.cfg.resource, "demoting once the last writes are flushed on both nodes");
            return Ok(());
        }
        self.finish_demote(now_ms);
        Ok(())
    }

    pub(super) fn maybe_finish_demote(&mut self, now_ms: u64) {
        if self.demote_pending && self.tl.is_empty() && self.writes.is_empty() {
            self.demote_pending = false;
            self.finish_demote(now_ms);
        }
    }

    pub(super) fn finish_demote(&mut self, now_ms: u64) {
        // The activity log is emptied below: nothing may be unflushed.
        assert!(self.tl.is_empty() && self.writes.is_empty(), "demoted with writes not yet durable on both disks");
        self.role = Role::Secondary;
        self.frozen = false;
        self.held = false;
        self.rotate_on_write = false;
        self.persist_bitmap(now_ms);
        if self.al.clear() {
            self.actions.push_back(Action::PersistActivityLog(Vec::new()));
        }
        self.persist_meta();
        info!(resource = %self.cfg.resource, "demoted to secondary");
        if let (Some(link), true) = (self.link(), self.is_connected()) {
            self.send_state(now_ms, link);
        }
    }

    pub(super) fn fail_all_pending(&mut self) {
        for (id, w) in std::mem::take(&mut self.writes) {
            if !w.answered {
                self.actions.push_back(Action::Complete { id, result: Err(libc::EIO) });
            }
            self.al.end(w.extents);
        }
        for (id, _) in std::mem::take(&mut self.flushes) {
            self.actions.push_back(Action::Complete { id, result: Err(libc::EIO) });
        }
        for d in std::mem::take(&mut self.deferred) {
            let id = match d {
                Deferred::Write { id, .. } | Deferred::Flush { id } => id,
            };
            self.actions.push_back(Action::Complete { id, result: Err(libc::EIO) });
        }
        // Flushes stay outstanding: an epoch's flush still answers for it.
        self.outstanding.retain(|_, (what, _)| !matches!(what, Outstanding::Write(_)));
        self.unacked_bytes = 0;
    }

    /// Starts connecting (from StandAlone). `discard_my_data`: on a split
    /// brain at the next handshake (only that one), this node's changes
    /// are the ones thrown away; refused while connected, as drbdadm does,
    /// so that it can never linger until some later split brain.
    pub fn connect(&mut self, now_ms: u64, discard_my_data: bool) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if discard_my_data && matches!(self.conn, Conn::Established(_)) {
            return Err(AdminError::DiscardWhileConnected);
        }
        self.discard_my_data = discard_my_data;
        if matches!(self.conn, Conn::StandAlone) {
            self.conn = Conn::Connecting;
        }
        Ok(())
    }

    /// Drops the peer and stays StandAlone until [`Self::connect`].
    pub fn disconnect(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.discard_my_data = false;
        match self.link() {
            Some(link) => {
                self.lose_peer(now_ms, "disconnected by the admin".into(), true);
                self.actions.push_back(Action::CloseLink { link });
            }
            None => self.conn = Conn::StandAlone,
        }
    }

    /// Starts an online verify against the peer.
    pub fn verify(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        let ok = matches!(&self.conn, Conn::Established(p) if p.sync == Sync::None && p.disk == DiskState::UpToDate)
            && self.disk == DiskState::UpToDate;
        if !ok {
            return Err(AdminError::CannotVerify(format!("{:?}, disk {:?}", self.connection(), self.disk)));
        }
        self.verify = Some(Verify::new(self.cfg.size_bytes, VERIFY_CHUNK_BYTES, self.cfg.granularity_bytes, now_ms));
        self.verify_oos_bytes = 0;
        if let Conn::Established(p) = &mut self.conn {
            p.sync = Sync::Verify;
        }
        info!(resource = %self.cfg.resource, "online verify started");
        self.pump_verify(now_ms);
        Ok(())
    }

    /// Throws away the local data: full resync from the peer on the next
    /// connect (now, if connected).
    pub fn invalidate(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role == Role::Primary {
            return Err(AdminError::InvalidatePrimary);
        }
        self.consistent = false;
        self.disk = DiskState::Inconsistent;
        self.bitmap.set_all();
        self.persist_bitmap(now_ms);
        self.persist_meta();
        if let Some(link) = self.link() {
            self.lose_peer(now_ms, "invalidated: reconnecting for a full resync".into(), false);
            self.actions.push_back(Action::CloseLink { link });
        }
        Ok(())
    }

    /// The peer's fence handler says this node's data is outdated.
    pub fn outdate(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role == Role::Primary {
            return Err(AdminError::NotPrimary);
        }
        if self.disk == DiskState::UpToDate {
            self.outdated = true;
            self.disk = DiskState::Outdated;
            self.persist_meta();
        }
        Ok(())
    }

    /// Before a clean stop: closes the transfer log's open epoch, so that
    /// once [`Self::is_quiescent`] every write is durable on both disks and
    /// [`Self::shutdown`] can empty the activity log.
    pub fn quiesce(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.close_epoch(now_ms);
    }

    /// No write in flight or waiting for its flushes.
    pub fn is_quiescent(&self) -> bool {
        self.writes.is_empty() && self.flushes.is_empty() && self.tl.is_empty()
    }

    /// Clean stop: persist the bitmap, empty the activity log if nothing is
    /// in flight, and mark the shutdown clean.
    pub fn shutdown(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.persist_bitmap(now_ms);
        let idle = self.writes.is_empty() && self.flushes.is_empty() && self.tl.is_empty();
        if idle && self.al.clear() {
            self.actions.push_back(Action::PersistActivityLog(Vec::new()));
        }
        self.persist_meta_with(idle);
    }

    #[cfg(test)]
    pub(crate) fn debug_state(&self) -> String {
        format!(
            "writes {:?}\nflushes {:?}\ntransfer log {:?}\ndeferred {}\noutstanding {:?}\nfrozen {} fence_running {}",
            self.writes,
            self.flushes,
            self.tl,
            self.deferred.len(),
            self.outstanding,
            self.frozen,
            self.fence_running
        )
    }
}
