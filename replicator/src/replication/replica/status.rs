//! Queries: the state the shell and `status` read (`Status`, timeouts, roles).

use super::*;

impl<P: Clone> Replica<P> {
    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn disk(&self) -> DiskState {
        self.disk
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn generations(&self) -> Generations {
        self.generations
    }

    /// Primary, not frozen: application writes will be completed.
    pub fn is_writable(&self) -> bool {
        self.role == Role::Primary && !self.io_suspended() && !self.demote_pending
    }

    pub fn is_frozen(&self) -> bool {
        self.io_suspended()
    }

    /// Completions and deferred requests wait: fencing froze I/O, or the
    /// admin (cluster manager) held it.
    pub(super) fn io_suspended(&self) -> bool {
        self.frozen || self.held
    }

    /// The shell should keep (re)connecting.
    pub fn wants_link(&self) -> bool {
        matches!(self.conn, Conn::Connecting) && !self.recovering
    }

    pub fn link(&self) -> Option<LinkId> {
        match &self.conn {
            Conn::Handshaking { link, .. } => Some(*link),
            Conn::Established(p) => Some(p.link),
            _ => None,
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.conn, Conn::Established(_))
    }

    /// Connected, no resync or bitmap exchange under way.
    pub fn is_in_sync(&self) -> bool {
        matches!(&self.conn, Conn::Established(p) if matches!(p.sync, Sync::None | Sync::Verify))
            && self.disk == DiskState::UpToDate
    }

    pub fn connection(&self) -> ConnState {
        match &self.conn {
            Conn::StandAlone => ConnState::StandAlone,
            Conn::Connecting => ConnState::Connecting,
            Conn::Handshaking { .. } => ConnState::WfReportParams,
            Conn::Established(p) => match &p.sync {
                Sync::None if p.lag == Lag::Ahead => ConnState::Ahead,
                Sync::None if p.lag == Lag::Behind => ConnState::Behind,
                Sync::None => ConnState::Connected,
                Sync::SourceWaitBitmap => ConnState::WfBitmap,
                Sync::Source => ConnState::SyncSource,
                Sync::Target => ConnState::SyncTarget,
                Sync::Verify => ConnState::VerifySource,
            },
        }
    }

    pub fn status(&self, now_ms: u64) -> Status {
        let peer = match &self.conn {
            Conn::Established(p) => Some(p),
            _ => None,
        };
        let mut resync = self.resync.as_ref().map(|r| r.progress(&self.bitmap, now_ms));
        let verify = self.verify.as_ref().map(|v| v.progress(now_ms));
        let mut out_of_sync_bytes = self.bitmap.dirty_bytes().min(self.cfg.size_bytes);
        let target = matches!(&self.conn, Conn::Established(p) if p.sync == Sync::Target);
        if let (true, Some((total, received_before, started_ms))) = (target, self.target_sync) {
            let done = self.resync_received_bytes.saturating_sub(received_before).min(total);
            let left = total - done;
            let rate = done * 1000 / now_ms.saturating_sub(started_ms).max(1);
            out_of_sync_bytes = left;
            resync = Some(Progress {
                total_bytes: total,
                done_bytes: done,
                percent: if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
                rate_bytes_per_sec: rate,
                eta_secs: (rate > 0).then(|| left / rate),
            });
        }
        Status {
            resource: self.cfg.resource.clone(),
            node: self.cfg.node_name.clone(),
            role: self.role,
            disk: self.disk,
            connection: self.connection(),
            peer_role: peer.map(|p| p.role),
            peer_disk: peer.map(|p| p.disk),
            peer_node: peer.map(|p| p.name.clone()),
            protocol: self.cfg.protocol,
            epoch: self.epoch,
            generations: self.generations,
            out_of_sync_bytes,
            suspended: self.io_suspended(),
            resync,
            verify,
            verify_out_of_sync_bytes: self.verify_oos_bytes,
            last_error: self.last_error.clone(),
            discard_my_data: self.discard_my_data,
            writes_in_flight: self.writes.len() + self.flushes.len(),
            resync_sent_bytes: self.resync_sent_bytes,
            resync_received_bytes: self.resync_received_bytes,
        }
    }

    /// When [`Self::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut at = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        match &self.conn {
            Conn::Handshaking { since_ms, .. } => at(since_ms + self.cfg.io_timeout_ms),
            Conn::Established(p) => {
                match p.ping_sent_ms {
                    Some(sent) => at(sent + self.cfg.ping_timeout_ms),
                    None => at(p.last_rx_ms + self.cfg.ping_interval_ms),
                }
                if let Some((_, (_, sent))) = self.outstanding.iter().next() {
                    at(sent + self.cfg.io_timeout_ms);
                }
                if let Some(t) = self.resync.as_ref().and_then(|r| r.wake_at()) {
                    at(t);
                }
                if self.bitmap_unpersisted {
                    at(self.last_bitmap_persist_ms + BITMAP_PERSIST_INTERVAL_MS);
                }
            }
            _ => {}
        }
        if let Some(t) = self.tl.close_due_ms() {
            at(t);
        }
        next
    }
}
