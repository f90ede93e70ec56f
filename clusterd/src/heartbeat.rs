//! Authenticated heartbeats over several independent paths and the peer
//! liveness derived from them: `Heartbeat` (the sans-IO core), `Datagram`
//! (the fixed wire layout), `HeartbeatEvent`, `Counters`.
//!
//! Call order: `handle_datagram(now_ms, path, bytes)` for every received
//! datagram and `handle_timeout(now_ms)` at `poll_timeout()`; after either,
//! drain `poll_transmit(now_ms)` (one datagram per peer and path each
//! interval) and `poll_event()`. The core owns no socket and reads no clock.
//!
//! A peer is alive as long as a valid heartbeat arrived on *any* path within
//! `deadtime_ms`; it is declared dead only when every path stayed silent that
//! long (`initdead_ms` before its first heartbeat). Silence beyond
//! `warntime_ms` is reported once. Invalid datagrams never change liveness:
//! malformed, spoofed (bad HMAC, unknown sender, wrong path) and replayed
//! (sequence not above the last accepted from that sender on that path) ones
//! are dropped and counted.
//!
//! Replay protection: each sender numbers its datagrams `(incarnation, seq)`,
//! compared lexicographically per sender and path. `incarnation` must grow
//! across restarts of the sender (the shell passes wall-clock milliseconds
//! at start-up, or a persisted boot counter), so datagrams captured before a
//! restart stay stale.

use std::collections::VecDeque;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::NodeId;

type HmacSha256 = Hmac<Sha256>;

/// Paths a cluster may have (bounds per-peer state).
pub const PATHS_MAX: usize = 8;

/// Wire layout (all integers big-endian):
///
/// | bytes  | field                                   |
/// |--------|-----------------------------------------|
/// | 0..4   | magic `b"CLHB"`                         |
/// | 4      | version (1)                             |
/// | 5      | sender node index                       |
/// | 6      | path index                              |
/// | 7      | flags (0)                               |
/// | 8..16  | cluster id                              |
/// | 16..24 | sender incarnation                      |
/// | 24..32 | sequence number                         |
/// | 32..64 | HMAC-SHA256 over bytes 0..32            |
pub const DATAGRAM_BYTES: usize = 64;
const SIGNED_BYTES: usize = 32;
const MAGIC: &[u8; 4] = b"CLHB";
const VERSION: u8 = 1;

/// One heartbeat as it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    pub sender: NodeId,
    pub path: u8,
    pub cluster_id: u64,
    pub incarnation: u64,
    pub seq: u64,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("datagram of {0} bytes (expected {DATAGRAM_BYTES})")]
    Length(usize),
    #[error("bad magic or version")]
    Magic,
    #[error("bad HMAC")]
    Mac,
}

impl Datagram {
    pub fn encode(&self, key: &[u8]) -> [u8; DATAGRAM_BYTES] {
        let mut b = [0u8; DATAGRAM_BYTES];
        b[0..4].copy_from_slice(MAGIC);
        b[4] = VERSION;
        b[5] = self.sender.0;
        b[6] = self.path;
        b[8..16].copy_from_slice(&self.cluster_id.to_be_bytes());
        b[16..24].copy_from_slice(&self.incarnation.to_be_bytes());
        b[24..32].copy_from_slice(&self.seq.to_be_bytes());
        let tag = mac(key).chain_update(&b[..SIGNED_BYTES]).finalize().into_bytes();
        b[SIGNED_BYTES..].copy_from_slice(&tag);
        b
    }

    /// Checks length, magic and HMAC (in constant time) before reading any field.
    pub fn decode(bytes: &[u8], key: &[u8]) -> Result<Datagram, DatagramError> {
        let b: &[u8; DATAGRAM_BYTES] = bytes.try_into().map_err(|_| DatagramError::Length(bytes.len()))?;
        if &b[0..4] != MAGIC || b[4] != VERSION {
            return Err(DatagramError::Magic);
        }
        mac(key).chain_update(&b[..SIGNED_BYTES]).verify_slice(&b[SIGNED_BYTES..]).map_err(|_| DatagramError::Mac)?;
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(w)
        };
        Ok(Datagram {
            sender: NodeId(b[5]),
            path: b[6],
            cluster_id: u64_at(8),
            incarnation: u64_at(16),
            seq: u64_at(24),
        })
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes keys of any length")
}

#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    pub me: NodeId,
    pub peers: Vec<NodeId>,
    pub paths: u8,
    pub cluster_id: u64,
    pub key: Vec<u8>,
    pub incarnation: u64,
    pub interval_ms: u64,
    pub deadtime_ms: u64,
    pub warntime_ms: u64,
    pub initdead_ms: u64,
}

/// Liveness changes for the failover core and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatEvent {
    PeerAlive(NodeId),
    PeerDead(NodeId),
    /// Silent for longer than warntime (reported once per silence).
    PeerLate {
        node: NodeId,
        silent_ms: u64,
    },
    PathUp {
        node: NodeId,
        path: u8,
    },
    PathDown {
        node: NodeId,
        path: u8,
    },
}

/// A datagram to send to `to` over `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: NodeId,
    pub path: u8,
    pub bytes: [u8; DATAGRAM_BYTES],
}

/// Dropped datagrams, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub accepted: u64,
    pub malformed: u64,
    pub spoofed: u64,
    pub replayed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    /// Not heard since start-up.
    Unknown,
    Alive,
    Dead,
}

#[derive(Debug)]
struct Peer {
    node: NodeId,
    liveness: Liveness,
    last_heard_ms: Option<u64>,
    warned: bool,
    /// Per path: the last accepted `(incarnation, seq)` and when.
    paths: Vec<Option<((u64, u64), u64)>>,
    path_up: Vec<bool>,
}

/// The heartbeat core of one node (see the module docs).
#[derive(Debug)]
pub struct Heartbeat {
    cfg: HeartbeatConfig,
    started_ms: u64,
    now_ms: u64,
    seq: u64,
    next_send_ms: u64,
    peers: Vec<Peer>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<HeartbeatEvent>,
    counters: Counters,
}

impl Heartbeat {
    pub fn new(cfg: HeartbeatConfig, now_ms: u64) -> Heartbeat {
        assert!(cfg.paths >= 1 && cfg.paths as usize <= PATHS_MAX, "{} paths", cfg.paths);
        assert!(cfg.deadtime_ms > 2 * cfg.interval_ms, "config validation lets no such deadtime through");
        assert!(!cfg.peers.contains(&cfg.me));
        let paths = cfg.paths as usize;
        let peers = cfg
            .peers
            .iter()
            .map(|n| Peer {
                node: *n,
                liveness: Liveness::Unknown,
                last_heard_ms: None,
                warned: false,
                paths: vec![None; paths],
                path_up: vec![false; paths],
            })
            .collect();
        Heartbeat {
            cfg,
            started_ms: now_ms,
            now_ms,
            seq: 0,
            next_send_ms: now_ms,
            peers,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn is_alive(&self, node: NodeId) -> bool {
        self.peers.iter().any(|p| p.node == node && p.liveness == Liveness::Alive)
    }

    pub fn handle_datagram(&mut self, now_ms: u64, path: u8, bytes: &[u8]) {
        self.tick(now_ms);
        let d = match Datagram::decode(bytes, &self.cfg.key) {
            Ok(d) => d,
            Err(DatagramError::Mac) => {
                self.counters.spoofed += 1;
                return;
            }
            Err(e) => {
                tracing::debug!(path, error = %e, "malformed heartbeat");
                self.counters.malformed += 1;
                return;
            }
        };
        let Some(peer) = self.peers.iter_mut().find(|p| p.node == d.sender) else {
            self.counters.spoofed += 1;
            return;
        };
        if d.cluster_id != self.cfg.cluster_id || d.path != path || path as usize >= peer.paths.len() {
            // Signed with our key but not for this cluster or this path: a
            // misconfiguration or a datagram moved between paths.
            self.counters.spoofed += 1;
            return;
        }
        let stamp = (d.incarnation, d.seq);
        let slot = &mut peer.paths[path as usize];
        if slot.is_some_and(|(last, _)| stamp <= last) {
            self.counters.replayed += 1;
            return;
        }
        *slot = Some((stamp, now_ms));
        self.counters.accepted += 1;
        peer.last_heard_ms = Some(now_ms);
        peer.warned = false;
        if !peer.path_up[path as usize] {
            peer.path_up[path as usize] = true;
            self.events.push_back(HeartbeatEvent::PathUp { node: peer.node, path });
        }
        if peer.liveness != Liveness::Alive {
            peer.liveness = Liveness::Alive;
            tracing::info!(node = ?peer.node, path, "peer alive");
            self.events.push_back(HeartbeatEvent::PeerAlive(peer.node));
        }
    }

    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.tick(now_ms);
        let (dead_ms, warn_ms, init_ms) = (self.cfg.deadtime_ms, self.cfg.warntime_ms, self.cfg.initdead_ms);
        for peer in &mut self.peers {
            for (path, up) in peer.path_up.iter_mut().enumerate() {
                let last = peer.paths[path].map(|(_, t)| t);
                if *up && last.is_some_and(|t| now_ms >= t + dead_ms) {
                    *up = false;
                    self.events.push_back(HeartbeatEvent::PathDown { node: peer.node, path: path as u8 });
                }
            }
            match (peer.liveness, peer.last_heard_ms) {
                (Liveness::Unknown, None) if now_ms >= self.started_ms + init_ms => {
                    peer.liveness = Liveness::Dead;
                    self.events.push_back(HeartbeatEvent::PeerDead(peer.node));
                }
                (Liveness::Alive, Some(t)) => {
                    if now_ms >= t + dead_ms {
                        peer.liveness = Liveness::Dead;
                        tracing::warn!(node = ?peer.node, silent_ms = now_ms - t, "peer dead");
                        self.events.push_back(HeartbeatEvent::PeerDead(peer.node));
                    } else if now_ms >= t + warn_ms && !peer.warned {
                        peer.warned = true;
                        self.events.push_back(HeartbeatEvent::PeerLate { node: peer.node, silent_ms: now_ms - t });
                    }
                }
                _ => {}
            }
        }
        if now_ms >= self.next_send_ms {
            self.next_send_ms = now_ms + self.cfg.interval_ms;
            self.seq += 1;
            for peer in &self.peers {
                for path in 0..self.cfg.paths {
                    let d = Datagram {
                        sender: self.cfg.me,
                        path,
                        cluster_id: self.cfg.cluster_id,
                        incarnation: self.cfg.incarnation,
                        seq: self.seq,
                    };
                    self.transmits.push_back(Transmit { to: peer.node, path, bytes: d.encode(&self.cfg.key) });
                }
            }
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<HeartbeatEvent> {
        self.events.pop_front()
    }

    /// The next instant `handle_timeout` has work: a send, a warning, a
    /// path or peer declared dead.
    pub fn poll_timeout(&self) -> u64 {
        let mut t = self.next_send_ms;
        for peer in &self.peers {
            match (peer.liveness, peer.last_heard_ms) {
                (Liveness::Unknown, None) => t = t.min(self.started_ms + self.cfg.initdead_ms),
                (Liveness::Alive, Some(last)) => {
                    t = t.min(last + self.cfg.deadtime_ms);
                    if !peer.warned {
                        t = t.min(last + self.cfg.warntime_ms);
                    }
                }
                _ => {}
            }
            for (path, up) in peer.path_up.iter().enumerate() {
                if let (true, Some((_, last))) = (*up, peer.paths[path]) {
                    t = t.min(last + self.cfg.deadtime_ms);
                }
            }
        }
        t.max(self.now_ms)
    }

    fn tick(&mut self, now_ms: u64) {
        assert!(now_ms >= self.now_ms, "time went backwards: {now_ms} < {}", self.now_ms);
        self.now_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    const KEY: &[u8] = b"cluster key";

    fn cfg(me: u8, incarnation: u64) -> HeartbeatConfig {
        HeartbeatConfig {
            me: NodeId(me),
            peers: (0..3).filter(|n| *n != me).map(NodeId).collect(),
            paths: 2,
            cluster_id: 7,
            key: KEY.to_vec(),
            incarnation,
            interval_ms: 200,
            deadtime_ms: 1500,
            warntime_ms: 1000,
            initdead_ms: 3000,
        }
    }

    fn events(h: &mut Heartbeat) -> Vec<HeartbeatEvent> {
        std::iter::from_fn(|| h.poll_event()).collect()
    }

    /// Node 1's datagram for node 0 on `path`.
    fn from_b(incarnation: u64, seq: u64, path: u8) -> [u8; DATAGRAM_BYTES] {
        Datagram { sender: NodeId(1), path, cluster_id: 7, incarnation, seq }.encode(KEY)
    }

    #[test]
    fn datagrams_round_trip_and_any_flipped_bit_is_refused() {
        let d = Datagram { sender: NodeId(2), path: 1, cluster_id: 7, incarnation: 9, seq: 42 };
        let b = d.encode(KEY);
        assert_eq!(Datagram::decode(&b, KEY), Ok(d));
        for i in 0..DATAGRAM_BYTES * 8 {
            let mut bad = b;
            bad[i / 8] ^= 1 << (i % 8);
            assert!(Datagram::decode(&bad, KEY).is_err(), "bit {i} flipped went unnoticed");
        }
        assert_eq!(Datagram::decode(&b, b"other key"), Err(DatagramError::Mac));
        assert_eq!(Datagram::decode(&b[..63], KEY), Err(DatagramError::Length(63)));
    }

    #[test]
    fn sends_on_every_path_to_every_peer_each_interval() {
        let mut h = Heartbeat::new(cfg(0, 1), 0);
        h.handle_timeout(0);
        let t: Vec<Transmit> = std::iter::from_fn(|| h.poll_transmit()).collect();
        assert_eq!(t.len(), 4);
        for tx in &t {
            let d = Datagram::decode(&tx.bytes, KEY).unwrap();
            assert_eq!((d.sender, d.path, d.seq), (NodeId(0), tx.path, 1));
        }
        assert_eq!(h.poll_timeout(), 200);
    }

    #[test]
    fn a_peer_is_alive_while_any_path_works_and_dead_after_deadtime_on_all() {
        let mut h = Heartbeat::new(cfg(0, 1), 0);
        h.handle_datagram(0, 0, &from_b(5, 1, 0));
        h.handle_datagram(0, 1, &from_b(5, 1, 1));
        assert!(events(&mut h).contains(&HeartbeatEvent::PeerAlive(NodeId(1))));
        // Path 0 goes silent; path 1 keeps working.
        for seq in 2..20u64 {
            let now = seq * 200;
            h.handle_timeout(now);
            h.handle_datagram(now, 1, &from_b(5, seq, 1));
        }
        let e = events(&mut h);
        assert!(e.contains(&HeartbeatEvent::PathDown { node: NodeId(1), path: 0 }), "{e:?}");
        assert!(!e.iter().any(|e| matches!(e, HeartbeatEvent::PeerDead(NodeId(1)))), "{e:?}");
        assert!(h.is_alive(NodeId(1)));
        // Both silent from 3800: late at 4800 (warntime), dead at 5300, not before.
        h.handle_timeout(4799);
        assert!(!events(&mut h).iter().any(|e| matches!(e, HeartbeatEvent::PeerLate { node: NodeId(1), .. })));
        h.handle_timeout(4800);
        assert!(events(&mut h).contains(&HeartbeatEvent::PeerLate { node: NodeId(1), silent_ms: 1000 }));
        h.handle_timeout(5299);
        assert!(h.is_alive(NodeId(1)));
        assert_eq!(h.poll_timeout(), 5300);
        h.handle_timeout(5300);
        assert!(events(&mut h).contains(&HeartbeatEvent::PeerDead(NodeId(1))));
        assert!(!h.is_alive(NodeId(1)));
    }

    #[test]
    fn never_heard_peers_are_dead_after_initdead() {
        let mut h = Heartbeat::new(cfg(0, 1), 0);
        h.handle_timeout(2999);
        assert!(!events(&mut h).iter().any(|e| matches!(e, HeartbeatEvent::PeerDead(_))));
        h.handle_timeout(3000);
        let e = events(&mut h);
        assert!(e.contains(&HeartbeatEvent::PeerDead(NodeId(1))) && e.contains(&HeartbeatEvent::PeerDead(NodeId(2))));
    }

    #[test]
    fn replayed_spoofed_and_moved_datagrams_are_counted_and_ignored() {
        let mut h = Heartbeat::new(cfg(0, 1), 0);
        h.handle_datagram(0, 0, &from_b(5, 10, 0));
        h.handle_datagram(1, 0, &from_b(5, 10, 0));
        h.handle_datagram(2, 0, &from_b(5, 9, 0));
        // Captured before the sender restarted (older incarnation).
        h.handle_datagram(3, 0, &from_b(4, 99, 0));
        assert_eq!(h.counters().replayed, 3);
        // Moved from path 0 to path 1: signed for path 0.
        h.handle_datagram(4, 1, &from_b(5, 11, 0));
        // Wrong key, unknown sender, other cluster, itself.
        let d = Datagram { sender: NodeId(1), path: 0, cluster_id: 7, incarnation: 5, seq: 12 };
        h.handle_datagram(5, 0, &d.encode(b"wrong"));
        h.handle_datagram(5, 0, &Datagram { sender: NodeId(9), ..d }.encode(KEY));
        h.handle_datagram(5, 0, &Datagram { cluster_id: 8, ..d }.encode(KEY));
        h.handle_datagram(5, 0, &Datagram { sender: NodeId(0), ..d }.encode(KEY));
        assert_eq!(h.counters().spoofed, 5);
        h.handle_datagram(6, 0, b"short");
        assert_eq!(h.counters(), Counters { accepted: 1, malformed: 1, spoofed: 5, replayed: 3 });
        // A restarted sender (newer incarnation, seq from 1) is accepted.
        h.handle_datagram(7, 0, &from_b(6, 1, 0));
        assert_eq!(h.counters().accepted, 2);
        // Spoofed traffic never keeps a dead peer alive.
        h.handle_timeout(1507);
        events(&mut h);
        for t in 1508..1600 {
            h.handle_datagram(t, 0, &d.encode(b"wrong"));
        }
        h.handle_timeout(1600);
        assert!(!h.is_alive(NodeId(1)));
    }

    #[test]
    fn random_bytes_never_panic_or_count_as_heartbeats() {
        let mut rng = Rng::new(1);
        let mut h = Heartbeat::new(cfg(0, 1), 0);
        for i in 0..20_000u64 {
            let len = if rng.below(2) == 0 { DATAGRAM_BYTES } else { rng.below(100) as usize };
            let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len >= 5 && rng.below(2) == 0 {
                b[..4].copy_from_slice(MAGIC);
                b[4] = VERSION;
            }
            h.handle_datagram(i, (rng.below(3)) as u8, &b);
        }
        let c = h.counters();
        assert_eq!(c.accepted, 0);
        assert_eq!(c.malformed + c.spoofed, 20_000);
    }
}
