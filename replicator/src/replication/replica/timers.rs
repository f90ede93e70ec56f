//! Timers: pings, timeouts, epoch ages, bitmap persistence, resync pacing.

use super::*;

impl<P: Clone> Replica<P> {
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        match &mut self.conn {
            Conn::Handshaking { since_ms, .. } if now_ms >= *since_ms + self.cfg.io_timeout_ms => {
                let link = self.link();
                self.lose_peer(now_ms, "the peer did not send its parameters in time".into(), false);
                if let Some(link) = link {
                    self.actions.push_back(Action::CloseLink { link });
                }
                return;
            }
            Conn::Established(p) => {
                let link = p.link;
                if let Some(sent) = p.ping_sent_ms {
                    if now_ms >= sent + self.cfg.ping_timeout_ms {
                        let why = format!("the peer did not answer a ping within {} ms", self.cfg.ping_timeout_ms);
                        self.lose_peer(now_ms, why, false);
                        self.actions.push_back(Action::CloseLink { link });
                        return;
                    }
                } else if now_ms >= p.last_rx_ms + self.cfg.ping_interval_ms {
                    p.ping_sent_ms = Some(now_ms);
                    self.send(now_ms, link, Message::Ping);
                }
                if let Some((_, (_, sent))) = self.outstanding.iter().next() {
                    if now_ms >= sent + self.cfg.io_timeout_ms {
                        let why = format!("the peer did not acknowledge within {} ms", self.cfg.io_timeout_ms);
                        self.lose_peer(now_ms, why, false);
                        self.actions.push_back(Action::CloseLink { link });
                        return;
                    }
                }
                if self.resync.is_some() {
                    self.pump_resync(now_ms);
                }
            }
            _ => {}
        }
        if self.tl.close_due_ms().is_some_and(|t| now_ms >= t) {
            self.close_epoch(now_ms);
        }
        if self.bitmap_unpersisted && now_ms >= self.last_bitmap_persist_ms + BITMAP_PERSIST_INTERVAL_MS {
            self.persist_bitmap(now_ms);
        }
    }
}
