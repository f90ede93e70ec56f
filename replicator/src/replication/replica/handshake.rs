//! The link coming and going, and the handshake: `Hello`, the generation decision, the bitmap exchange.

use super::*;

impl<P: Clone> Replica<P> {
    /// A transport to the peer is up and authenticated.
    pub fn handle_connected(&mut self, now_ms: u64, link: LinkId) {
        self.now_ms = now_ms;
        if !matches!(self.conn, Conn::Connecting) {
            self.actions.push_back(Action::CloseLink { link });
            return;
        }
        if self.apply.draining().is_some() || self.recovering {
            // The last link's writes (or the last run's) are still reaching
            // the disk; the shell retries after its connect interval.
            debug!(resource = %self.cfg.resource, "new link refused: the peer's last writes are still being applied");
            self.actions.push_back(Action::CloseLink { link });
            return;
        }
        self.apply.start_link();
        self.conn = Conn::Handshaking { link, since_ms: now_ms, sent: self.side() };
        let hello = self.hello();
        self.send(now_ms, link, Message::Hello(Box::new(hello)));
    }

    pub fn handle_disconnected(&mut self, now_ms: u64, link: LinkId) {
        self.now_ms = now_ms;
        if self.link() == Some(link) {
            self.lose_peer(now_ms, "connection to the peer lost".into(), false);
        }
    }

    /// A frame from the peer failed its checks: drop the link.
    pub fn handle_frame_error(&mut self, now_ms: u64, link: LinkId, error: &FrameError) {
        self.now_ms = now_ms;
        if self.link() == Some(link) {
            self.protocol_error(now_ms, format!("bad frame from the peer: {error}"));
        }
    }

    pub(super) fn hello(&self) -> Hello {
        Hello {
            resource: self.cfg.resource.clone(),
            node_name: self.cfg.node_name.clone(),
            node_id: self.cfg.node_id,
            size_bytes: self.cfg.size_bytes,
            granularity_bytes: self.cfg.granularity_bytes,
            protocol: self.cfg.protocol,
            generations: self.generations,
            role: self.role,
            disk: self.disk,
            crashed_primary: self.crashed_primary,
            epoch: self.epoch,
            discard_my_data: self.discard_my_data,
            dirty_bits: self.bitmap.count(),
        }
    }

    pub(super) fn side(&self) -> Side {
        Side {
            generations: self.generations,
            consistent: matches!(self.disk, DiskState::UpToDate | DiskState::Outdated),
            crashed_primary: self.crashed_primary,
            primary: self.role == Role::Primary,
            discard_my_data: self.discard_my_data,
            dirty_bits: self.bitmap.count(),
            node_id: self.cfg.node_id,
            epoch: self.epoch,
        }
    }

    pub fn handle_message(&mut self, now_ms: u64, link: LinkId, msg: Message<P>) {
        self.now_ms = now_ms;
        if self.link() != Some(link) {
            return;
        }
        match &mut self.conn {
            Conn::Handshaking { .. } => match msg {
                Message::Hello(hello) => self.handle_hello(now_ms, link, *hello),
                _ => self.protocol_error(now_ms, "the peer sent data before its parameters".into()),
            },
            Conn::Established(p) => {
                p.last_rx_ms = now_ms;
                p.ping_sent_ms = None;
                self.handle_established(now_ms, link, msg);
            }
            Conn::StandAlone | Conn::Connecting => {}
        }
    }

    pub(super) fn handle_hello(&mut self, now_ms: u64, link: LinkId, peer: Hello) {
        let mut stale_primary = false;
        let mismatch = if peer.resource != self.cfg.resource {
            Some(format!(
                "the peer serves resource {:?}, not {:?}; check the resource files",
                peer.resource, self.cfg.resource
            ))
        } else if peer.node_id == self.cfg.node_id {
            Some(format!("the peer has this node's id {}; give each node its own id", peer.node_id))
        } else if peer.size_bytes != self.cfg.size_bytes {
            Some(format!(
                "the peer's volume holds {} bytes, this one {}; make both backing disks the same size",
                peer.size_bytes, self.cfg.size_bytes
            ))
        } else if peer.granularity_bytes != self.cfg.granularity_bytes {
            Some(format!(
                "bitmap granularity differs ({} vs {} bytes); recreate metadata with the same --bitmap-granularity",
                peer.granularity_bytes, self.cfg.granularity_bytes
            ))
        } else if peer.protocol != self.cfg.protocol {
            Some(format!(
                "protocol differs ({:?} vs {:?}); use one resource file on both nodes",
                peer.protocol, self.cfg.protocol
            ))
        } else if peer.role == Role::Primary && self.role == Role::Primary {
            if peer.epoch != self.epoch {
                // The older one was superseded by its cluster manager and
                // will be demoted: keep trying, the link comes up then.
                stale_primary = true;
            }
            Some(format!(
                "both nodes are primary (epochs {} here, {} on the peer): split brain; demote the stale one \
                 and resolve with --discard-my-data",
                self.epoch, peer.epoch
            ))
        } else if peer.role == Role::Primary && peer.epoch < self.epoch && !self.discard_my_data {
            // (An admin who chose to discard this node's data resolves a
            // split brain in favour of that primary, whatever its epoch.)
            stale_primary = true;
            Some(format!(
                "the peer is a stale primary (epoch {} < newest seen {}); it must be demoted and resynced",
                peer.epoch, self.epoch
            ))
        } else if self.role == Role::Primary && peer.epoch > self.epoch && !peer.discard_my_data {
            stale_primary = true;
            Some(format!(
                "this primary is stale: the peer has seen epoch {} > ours {}; demote this node, or keep its data \
                 with `replicator primary {} --epoch {}` and `connect --discard-my-data` on the peer",
                peer.epoch,
                self.epoch,
                self.cfg.resource,
                peer.epoch + 1
            ))
        } else {
            None
        };
        if let Some(why) = mismatch {
            self.fail_handshake(link, why, stale_primary);
            return;
        }
        if self.role == Role::Primary && peer.epoch > self.epoch {
            // The peer discards its data for ours: this primary carries on
            // with an epoch newer than any the peer has seen, so that it
            // accepts our writes.
            warn!(resource = %self.cfg.resource, old = self.epoch, new = peer.epoch + 1,
                "the peer discards its data for this primary's: primary epoch raised above the peer's");
            self.epoch = peer.epoch + 1;
            self.persist_meta();
        } else if peer.epoch > self.epoch {
            self.epoch = peer.epoch;
            self.persist_meta();
        }
        let peer_side = Side {
            generations: peer.generations,
            consistent: matches!(peer.disk, DiskState::UpToDate | DiskState::Outdated),
            crashed_primary: peer.crashed_primary,
            primary: peer.role == Role::Primary,
            discard_my_data: peer.discard_my_data,
            dirty_bits: peer.dirty_bits,
            node_id: peer.node_id,
            epoch: peer.epoch,
        };
        let me = match &self.conn {
            Conn::Handshaking { sent, .. } => *sent,
            _ => self.side(),
        };
        let raw = generations::decide(&me, &peer_side);
        let decision = generations::resolve(raw, &me, &peer_side, self.cfg.after_split_brain);
        info!(resource = %self.cfg.resource, peer = %peer.node_name, ?raw, ?decision, "handshake decision");
        let sync = match decision {
            Decision::SplitBrain { .. } => {
                self.fail_handshake(
                    link,
                    format!(
                        "split brain detected with {}: both nodes changed the data since they last agreed; \
                         nothing was overwritten. On the node whose changes must go, run \
                         `replicator connect {} --discard-my-data`; then `replicator connect {}` on the other",
                        peer.node_name, self.cfg.resource, self.cfg.resource
                    ),
                    false,
                );
                return;
            }
            Decision::Unrelated => {
                self.fail_handshake(
                    link,
                    format!(
                        "the data on {} is unrelated to this node's (no common generation): wrong disk, or \
                         metadata recreated; to overwrite one side, recreate its metadata (create-md --force)",
                        peer.node_name
                    ),
                    false,
                );
                return;
            }
            Decision::Target { .. } if self.role == Role::Primary => {
                self.fail_handshake(
                    link,
                    "this primary would have to become sync target; demote it first".into(),
                    false,
                );
                return;
            }
            Decision::NoSync => Sync::None,
            Decision::Source { full } => {
                if full {
                    self.bitmap.set_all();
                    self.bitmap_unpersisted = true;
                }
                Sync::SourceWaitBitmap
            }
            Decision::Target { full } => {
                if full {
                    self.bitmap.set_all();
                }
                // The source resyncs the union of both bitmaps; this side
                // knows its own and how many bits the source had.
                let peer_bytes = peer.dirty_bits.saturating_mul(u64::from(self.cfg.granularity_bytes));
                let total = self.bitmap.dirty_bytes().max(peer_bytes).min(self.cfg.size_bytes);
                self.target_sync = Some((total, self.resync_received_bytes, now_ms));
                self.consistent = false;
                self.disk = DiskState::Inconsistent;
                self.persist_meta();
                self.persist_bitmap(now_ms);
                Sync::Target
            }
        };
        // `--discard-my-data` applied to this handshake only.
        self.discard_my_data = false;
        let newest = match decision {
            // Same data generation: nothing newer exists after all.
            Decision::NoSync => peer_side.consistent,
            // The peer's data is older than ours (it becomes our target).
            Decision::Source { .. } => true,
            _ => false,
        };
        if newest && self.disk == DiskState::Outdated {
            self.outdated = false;
            self.disk = DiskState::UpToDate;
            self.persist_meta();
        }
        self.conn = Conn::Established(Box::new(Peer {
            link,
            name: peer.node_name.clone(),
            role: peer.role,
            disk: if matches!(decision, Decision::Source { .. }) { DiskState::Inconsistent } else { peer.disk },
            last_rx_ms: now_ms,
            last_tx_ms: now_ms,
            ping_sent_ms: None,
            sync,
            replicating: true,
            lag: Lag::InStep,
        }));
        // Both sides agree on the data from here: a later disconnect decides
        // anew whether a generation must start.
        self.rotate_on_write = false;
        if sync == Sync::Target {
            let pairs: Vec<(u64, u64)> = self.bitmap.nonzero_words().collect();
            let mut chunks = pairs.chunks(BITMAP_PAIRS_PER_FRAME).peekable();
            if chunks.peek().is_none() {
                self.send(now_ms, link, Message::Bitmap { pairs: Vec::new(), last: true });
            }
            while let Some(chunk) = chunks.next() {
                let last = chunks.peek().is_none();
                self.send(now_ms, link, Message::Bitmap { pairs: chunk.to_vec(), last });
            }
        }
        if self.frozen {
            info!(resource = %self.cfg.resource, "peer is back: resuming suspended I/O");
            self.unfreeze(now_ms);
        }
        self.last_error = None;
    }

    /// Refuses the peer: StandAlone until the admin acts, or (`retry`:
    /// the other side is a superseded primary its cluster manager will
    /// demote) connecting again after the shell's interval.
    pub(super) fn fail_handshake(&mut self, link: LinkId, why: String, retry: bool) {
        if self.last_error.as_deref() != Some(why.as_str()) {
            warn!(resource = %self.cfg.resource, "{why}");
        }
        self.last_error = Some(why);
        // `--discard-my-data` given during this handshake (its Hello went
        // without it) is for the next one: try again.
        let sent_discard = matches!(&self.conn, Conn::Handshaking { sent, .. } if sent.discard_my_data);
        if retry || (self.discard_my_data && !sent_discard) {
            self.conn = Conn::Connecting;
        } else {
            // `--discard-my-data` was for this handshake; the admin decides
            // again.
            self.discard_my_data = false;
            self.conn = Conn::StandAlone;
        }
        self.actions.push_back(Action::CloseLink { link });
    }
}
