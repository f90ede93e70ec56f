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
