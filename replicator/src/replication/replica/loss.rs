//! Losing the peer: what is marked out of sync, fencing, suspended and resumed I/O.

use super::*;

impl<P: Clone> Replica<P> {
    /// The peer is gone (or refused). Everything it did not acknowledge goes
    /// into the bitmap; a primary starts a new data generation, persisted
    /// before any write is answered; fencing may freeze I/O.
    pub(super) fn lose_peer(&mut self, now_ms: u64, why: String, standalone: bool) {
        let was_replicating = matches!(&self.conn, Conn::Established(p) if p.replicating);
        if let Some(link) = self.link() {
            self.apply.lose_link(link);
        }
        // Only a peer that held our data generation falls behind now (also
        // during a repair resync, which leaves it UpToDate or Outdated); an
        // Inconsistent sync target still holds the generation our bitmap
        // counts from.
        let peer_was_current = matches!(&self.conn, Conn::Established(p)
            if p.replicating && matches!(p.disk, DiskState::UpToDate | DiskState::Outdated));
        // The same cause again (a peer that keeps refusing us): once is
        // enough at warn level.
        if self.last_error.as_deref() == Some(why.as_str()) {
            debug!(resource = %self.cfg.resource, "{why}");
        } else {
            warn!(resource = %self.cfg.resource, "{why}");
        }
        self.last_error = Some(why);
        self.conn = if standalone { Conn::StandAlone } else { Conn::Connecting };
        self.resync = None;
        self.verify = None;
        let outstanding = std::mem::take(&mut self.outstanding);
        self.unacked_bytes = 0;
        // Protocol A/B: writes a client already heard of that the peer may lack.
        let mut answered_unreplicated = false;
        for (_, (what, _)) in outstanding {
            match what {
                Outstanding::Write(id) => {
                    if let Some(w) = self.writes.get_mut(&id) {
                        answered_unreplicated |= w.answered;
                        w.peer = PeerWait::NotReplicated;
                        let (offset, len) = (w.offset, u64::from(w.len));
                        self.mark_dirty(offset, len);
                    }
                }
                Outstanding::Flush(FlushFor::App { id, .. }) => {
                    if let Some(f) = self.flushes.get_mut(&id) {
                        f.peer = PeerWait::NotReplicated;
                    }
                }
                Outstanding::Flush(FlushFor::Epoch(_)) | Outstanding::Resync | Outstanding::Verify => {}
            }
        }
        // Settled writes not yet flushed there may be lost with the peer's
        // cache (a power loss looks like this from here).
        for (offset, len) in self.tl.peer_lost() {
            self.mark_dirty(offset, u64::from(len));
        }
        self.replies_unflushed.clear();
        self.replies_flushing.clear();
        if self.role == Role::Primary && peer_was_current {
            // The data changes without the peer from the first write a
            // client hears of that the peer may lack: at once if such a
            // write was answered already (protocols A and B), else at the
            // first write answered or issued alone. A primary whose writes
            // stay suspended until it is demoted (resource-and-stonith, its
            // lease over) thus keeps the generation the peer knows, and
            // rejoins as a sync target instead of a split brain: what only
            // it wrote was never acknowledged (issue 23).
            self.rotate_on_write = true;
            if answered_unreplicated {
                self.rotate_if_pending();
            }
        }
        // A held primary (its lease is over, or a newer epoch superseded
        // it) writes nothing more and must not fence the node that now
        // owns the volume.
        if self.role == Role::Primary && was_replicating && !self.held {
            match self.cfg.fencing {
                Fencing::DontCare => {}
                Fencing::ResourceOnly => self.start_fence(),
                Fencing::ResourceAndStonith => {
                    warn!(resource = %self.cfg.resource, "peer lost: I/O suspended until the fence handler succeeds");
                    self.frozen = true;
                    self.start_fence();
                }
            }
        }
        self.retire(now_ms);
        self.complete_ready(now_ms);
    }

    /// Answers every request whose conditions now hold, then issues what
    /// was deferred.
    pub(super) fn complete_ready(&mut self, now_ms: u64) {
        let ids: Vec<AppId> = self.writes.keys().copied().collect();
        for id in ids {
            self.try_complete_write(id);
        }
        let ids: Vec<AppId> = self.flushes.keys().copied().collect();
        for id in ids {
            self.try_complete_flush(id);
        }
        self.pump_deferred(now_ms);
    }

    pub(super) fn start_fence(&mut self) {
        if !self.fence_running {
            self.fence_running = true;
            self.actions.push_back(Action::Fence);
        }
    }

    /// The fence handler finished. Success resumes suspended I/O.
    pub fn handle_fence_result(&mut self, now_ms: u64, ok: bool) {
        self.now_ms = now_ms;
        self.fence_running = false;
        if ok {
            info!(resource = %self.cfg.resource, "fence handler succeeded");
            if self.frozen {
                self.unfreeze(now_ms);
            }
        } else {
            let why = "fence handler failed: I/O stays suspended until the peer reconnects or an admin \
                       fences it by hand and runs `replicator resume-io`"
                .to_string();
            warn!(resource = %self.cfg.resource, "{why}");
            self.last_error = Some(why);
        }
    }

    /// Admin override after fencing by hand.
    pub fn resume_io(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if self.io_suspended() {
            warn!(resource = %self.cfg.resource, "I/O resumed by the admin");
            self.held = false;
            self.unfreeze(now_ms);
        }
    }

    /// Holds I/O of a primary: writes and flushes are neither issued nor
    /// answered until `resume_io` (or fail at a demotion). The cluster
    /// manager calls it when its lease may run out, before another node
    /// may be promoted.
    pub fn suspend_io(&mut self, now_ms: u64) -> Result<(), AdminError> {
        self.now_ms = now_ms;
        if self.role != Role::Primary {
            return Err(AdminError::NotPrimary);
        }
        if !self.held {
            warn!(resource = %self.cfg.resource, "I/O suspended by the admin until `resume-io` or demotion");
            self.held = true;
        }
        Ok(())
    }

    pub(super) fn unfreeze(&mut self, now_ms: u64) {
        self.frozen = false;
        self.complete_ready(now_ms);
    }
}
