//! Generation identifiers and the handshake decision they make.
//!
//! Each node keeps `current` (the data generation it holds), `bitmap` (the
//! generation its dirty bitmap counts from; 0 = none) and two `history`
//! entries (older generations it passed through). They change at a few
//! well-defined points ([`Generations::start_new`], [`Generations::sync_done`],
//! [`Generations::force_new`]); at every connect both nodes run
//! [`decide`] on the same two [`Side`]s, mirrored, and so agree on what to do
//! without a further round trip.
//!
//! The decision table (first matching row wins; "me"/"peer" mirrored gives
//! the peer's view) is in ARCHITECTURE.md, "Generation identifiers".

use crate::metadata::Generations;

/// What one node brings to a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub generations: Generations,
    /// Disk is UpToDate or Outdated (not Inconsistent/Failed).
    pub consistent: bool,
    pub crashed_primary: bool,
    pub primary: bool,
    pub discard_my_data: bool,
    pub dirty_bits: u64,
    pub node_id: u32,
    pub epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Identical data: replicate from here on.
    NoSync,
    /// I send; `full`: every block, else the union of both bitmaps.
    Source { full: bool },
    /// I receive.
    Target { full: bool },
    /// Both changed the data independently since they last agreed.
    /// `bitmap`: both bitmaps start from the same generation, so their union
    /// covers every difference (a resolution need not copy everything).
    SplitBrain { bitmap: bool },
    /// No common history: different disks, or metadata recreated on one side.
    Unrelated,
}

impl Decision {
    /// The same decision seen from the peer.
    pub fn mirrored(self) -> Decision {
        match self {
            Decision::Source { full } => Decision::Target { full },
            Decision::Target { full } => Decision::Source { full },
            other => other,
        }
    }
}

/// What to do on split brain when nobody said `--discard-my-data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSplitBrain {
    /// Stay StandAlone; the admin decides (the default).
    Disconnect,
    /// The side that wrote nothing since the split is overwritten.
    DiscardZeroChanges,
    /// The side promoted later (higher epoch) is overwritten.
    DiscardYoungerPrimary,
}

fn real(g: u64) -> bool {
    g != 0 && g != Generations::JUST_CREATED
}

/// Whether `me` holds data newer than `peer` with a usable relation, and how.
fn ahead(me: &Side, peer: &Side) -> Option<bool> {
    let (m, p) = (&me.generations, &peer.generations);
    if real(m.bitmap) && m.bitmap == p.current {
        return Some(false);
    }
    if real(p.current) && m.history.contains(&p.current) {
        return Some(true);
    }
    None
}

/// The raw decision, before split-brain policies. Symmetric:
/// `decide(a, b) == decide(b, a).mirrored()`.
pub fn decide(me: &Side, peer: &Side) -> Decision {
    let (m, p) = (&me.generations, &peer.generations);
    let (m_new, p_new) = (m.current == Generations::JUST_CREATED, p.current == Generations::JUST_CREATED);
    match (m_new, p_new) {
        (true, true) => return Decision::NoSync,
        (true, false) => return Decision::Target { full: true },
        (false, true) => return Decision::Source { full: true },
        (false, false) => {}
    }
    if m.current == p.current {
        return same_generation(me, peer);
    }
    match (ahead(me, peer), ahead(peer, me)) {
        (Some(full), None) => return Decision::Source { full },
        (None, Some(full)) => return Decision::Target { full },
        (Some(_), Some(_)) => return Decision::SplitBrain { bitmap: false },
        (None, None) => {}
    }
    // An Inconsistent disk (mid-resync) holds nothing worth keeping: it is
    // overwritten by a consistent peer however their histories relate.
    match (me.consistent, peer.consistent) {
        (true, false) => return Decision::Source { full: true },
        (false, true) => return Decision::Target { full: true },
        _ => {}
    }
    if real(m.bitmap) && m.bitmap == p.bitmap {
        return Decision::SplitBrain { bitmap: true };
    }
    let mine = [m.bitmap, m.history[0], m.history[1]];
    let theirs = [p.bitmap, p.history[0], p.history[1]];
    if mine.iter().any(|g| real(*g) && theirs.contains(g)) {
        return Decision::SplitBrain { bitmap: false };
    }
    Decision::Unrelated
}

/// Equal `current`: the same data generation, unless a crash, an
/// invalidate or a verify left differences behind.
fn same_generation(me: &Side, peer: &Side) -> Decision {
    match (me.consistent, peer.consistent) {
        (true, false) => return Decision::Source { full: true },
        (false, true) => return Decision::Target { full: true },
        (false, false) => return Decision::NoSync,
        (true, true) => {}
    }
    let lower_id_sends = || {
        if me.node_id < peer.node_id {
            Decision::Source { full: false }
        } else {
            Decision::Target { full: false }
        }
    };
    match (me.crashed_primary, peer.crashed_primary) {
        (true, false) => return Decision::Source { full: false },
        (false, true) => return Decision::Target { full: false },
        (true, true) => return lower_id_sends(),
        (false, false) => {}
    }
    if me.dirty_bits == 0 && peer.dirty_bits == 0 {
        return Decision::NoSync;
    }
    match (me.primary, peer.primary) {
        (true, false) => Decision::Source { full: false },
        (false, true) => Decision::Target { full: false },
        _ => lower_id_sends(),
    }
}

/// Applies `--discard-my-data` and the configured policy to a split brain.
/// Other decisions pass through. Symmetric like [`decide`].
pub fn resolve(decision: Decision, me: &Side, peer: &Side, policy: AfterSplitBrain) -> Decision {
    let Decision::SplitBrain { bitmap } = decision else { return decision };
    let full = !bitmap;
    match (me.discard_my_data, peer.discard_my_data) {
        (true, false) => return Decision::Target { full },
        (false, true) => return Decision::Source { full },
        (true, true) => return decision,
        (false, false) => {}
    }
    match policy {
        AfterSplitBrain::Disconnect => decision,
        AfterSplitBrain::DiscardZeroChanges => match (me.dirty_bits == 0, peer.dirty_bits == 0) {
            (true, false) => Decision::Target { full },
            (false, true) => Decision::Source { full },
            _ => decision,
        },
        AfterSplitBrain::DiscardYoungerPrimary => match me.epoch.cmp(&peer.epoch) {
            std::cmp::Ordering::Greater => Decision::Target { full },
            std::cmp::Ordering::Less => Decision::Source { full },
            std::cmp::Ordering::Equal => decision,
        },
    }
}

impl Generations {
    /// A new data generation begins while the peer cannot follow (a primary
    /// lost its peer, or a disconnected node was promoted): the bitmap from
    /// now on counts changes since the old `current`.
    pub fn start_new(&mut self, fresh: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        } else {
            self.push_history(self.current);
        }
        self.current = fresh;
    }

    /// `primary --force` on a disk that is not UpToDate: its data becomes a
    /// new generation unrelated to any bitmap.
    pub fn force_new(&mut self, fresh: u64) {
        if self.bitmap != 0 {
            self.push_history(self.bitmap);
            self.bitmap = 0;
        }
        self.push_history(self.current);
        self.current = fresh;
    }

    /// A resync source finished: the bitmap's base becomes history.
    pub fn sync_done(&mut self) {
        if self.bitmap != 0 {
            self.push_history(self.bitmap);
            self.bitmap = 0;
        }
    }

    fn push_history(&mut self, g: u64) {
        if real(g) && self.history[0] != g {
            self.history = [g, self.history[0]];
        }
    }
}

/// A generation id from 64 random bits: never 0 nor a reserved value.
pub fn fresh_generation(random: u64) -> u64 {
    if random <= 0xffff {
        random | 0x1_0000
    } else {
        random
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    const JC: u64 = Generations::JUST_CREATED;

    fn side(current: u64, bitmap: u64, history: [u64; 2]) -> Side {
        Side {
            generations: Generations { current, bitmap, history },
            consistent: current != JC,
            crashed_primary: false,
            primary: false,
            discard_my_data: false,
            dirty_bits: 0,
            node_id: 0,
            epoch: 1,
        }
    }

    fn peer(mut s: Side) -> Side {
        s.node_id = 1;
        s
    }

    /// The rows of the decision table in ARCHITECTURE.md, in order.
    #[test]
    fn decision_table_rows() {
        let d = |a: Side, b: Side| decide(&a, &peer(b));
        // Both fresh: nothing to sync, both stay Inconsistent.
        assert_eq!(d(side(JC, 0, [0, 0]), side(JC, 0, [0, 0])), Decision::NoSync);
        // One fresh: full sync from the other.
        assert_eq!(d(side(JC, 0, [0, 0]), side(0xA0000, 0, [0, 0])), Decision::Target { full: true });
        // Same generation, in sync.
        assert_eq!(d(side(0xA0000, 0, [0, 0]), side(0xA0000, 0, [0, 0])), Decision::NoSync);
        // Same generation, a crashed primary resyncs its activity log.
        let mut crashed = side(0xA0000, 0, [0, 0]);
        crashed.crashed_primary = true;
        assert_eq!(d(crashed, side(0xA0000, 0, [0, 0])), Decision::Source { full: false });
        // My bitmap counts from the peer's current: bitmap resync to it.
        assert_eq!(d(side(0xB0000, 0xA0000, [0, 0]), side(0xA0000, 0, [0, 0])), Decision::Source { full: false });
        assert_eq!(d(side(0xA0000, 0, [0, 0]), side(0xB0000, 0xA0000, [0, 0])), Decision::Target { full: false });
        // The peer's current is only in my history: full sync from me.
        assert_eq!(d(side(0xC0000, 0, [0xA0000, 0]), side(0xA0000, 0, [0, 0])), Decision::Source { full: true });
        // An Inconsistent peer with an older unrelated generation: overwrite.
        let mut inc = side(0x90000, 0, [0, 0]);
        inc.consistent = false;
        assert_eq!(d(side(0xC0000, 0, [0xA0000, 0]), inc), Decision::Source { full: true });
        // Both moved on from the same base: split brain, bitmaps suffice.
        assert_eq!(
            d(side(0xB0000, 0xA0000, [0, 0]), side(0xC0000, 0xA0000, [0, 0])),
            Decision::SplitBrain { bitmap: true }
        );
        // Both moved on, common ancestry further back: split brain, full.
        assert_eq!(
            d(side(0xB0000, 0xD0000, [0xA0000, 0]), side(0xC0000, 0xE0000, [0xA0000, 0])),
            Decision::SplitBrain { bitmap: false }
        );
        // Nothing in common.
        assert_eq!(d(side(0xB0000, 0, [0, 0]), side(0xC0000, 0, [0, 0])), Decision::Unrelated);
    }

    #[test]
    fn split_brain_resolution_honours_discard_and_policies() {
        let sb = Decision::SplitBrain { bitmap: true };
        let mut me = side(0xB0000, 0xA0000, [0, 0]);
        let mut other = peer(side(0xC0000, 0xA0000, [0, 0]));
        assert_eq!(resolve(sb, &me, &other, AfterSplitBrain::Disconnect), sb);
        me.discard_my_data = true;
        assert_eq!(resolve(sb, &me, &other, AfterSplitBrain::Disconnect), Decision::Target { full: false });
        me.discard_my_data = false;
        other.dirty_bits = 5;
        assert_eq!(resolve(sb, &me, &other, AfterSplitBrain::DiscardZeroChanges), Decision::Target { full: false });
        me.epoch = 9;
        assert_eq!(resolve(sb, &me, &other, AfterSplitBrain::DiscardYoungerPrimary), Decision::Target { full: false });
    }

    /// Both nodes compute the same decision, mirrored, for any pair of
    /// generation sets drawn from a small pool (so relations are common).
    #[test]
    fn decisions_are_symmetric() {
        let pool = [0, JC, 0xA0000, 0xB0000, 0xC0000, 0xD0000];
        let mut rng = Rng::new(11);
        let pick = |rng: &mut Rng| pool[rng.below(pool.len() as u64) as usize];
        for _ in 0..100_000 {
            let mut a = side(pick(&mut rng).max(JC), pick(&mut rng), [pick(&mut rng), pick(&mut rng)]);
            let mut b = peer(side(pick(&mut rng).max(JC), pick(&mut rng), [pick(&mut rng), pick(&mut rng)]));
            a.consistent = rng.below(4) != 0 && a.generations.current != JC;
            b.consistent = rng.below(4) != 0 && b.generations.current != JC;
            a.crashed_primary = rng.below(5) == 0;
            b.crashed_primary = rng.below(5) == 0;
            a.primary = rng.below(3) == 0;
            b.primary = !a.primary && rng.below(3) == 0;
            a.dirty_bits = rng.below(3);
            b.dirty_bits = rng.below(3);
            a.discard_my_data = rng.below(6) == 0;
            b.discard_my_data = rng.below(6) == 0;
            a.epoch = rng.below(3);
            b.epoch = rng.below(3);
            for policy in [
                AfterSplitBrain::Disconnect,
                AfterSplitBrain::DiscardZeroChanges,
                AfterSplitBrain::DiscardYoungerPrimary,
            ] {
                let ab = resolve(decide(&a, &b), &a, &b, policy);
                let ba = resolve(decide(&b, &a), &b, &a, policy);
                assert_eq!(ab, ba.mirrored(), "{a:?} vs {b:?} under {policy:?}");
            }
        }
    }
}
