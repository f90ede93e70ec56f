//! What the cluster log holds and what every node folds it into:
//! `ClusterEntry` (one log entry, postcard-encoded), `ClusterState` (the
//! groups' `GroupState`s plus the fencing history) and its snapshot form.
//!
//! Decoding is strict: an entry that does not decode, or names a group or
//! node the configuration does not have, is skipped and logged on every node
//! alike (the log is ordered, so all nodes still fold the same state).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::failover::{Applied, Entry, GroupId, GroupState};
use crate::NodeId;

/// Fence records kept in the state (older ones are dropped).
pub const FENCE_HISTORY_MAX: usize = 32;
/// A snapshot or entry larger than this is refused (corrupt or hostile).
pub const ENCODED_MAX: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterEntry {
    /// An entry of a group's failover core.
    Group(Entry),
    /// The admin asked to move the group, owned at `epoch`, to `to` (the
    /// owner acts on it: stop, demote, release).
    Move { group: GroupId, epoch: u64, to: NodeId },
    /// A fence of `node` by `by` finished.
    Fenced { node: NodeId, by: NodeId, ok: bool, unix_ms: u64 },
    /// `node`, owner of `epoch`, started the group's services: the group is
    /// served there (what `clusterd move` waits for). Not part of the
    /// snapshot: the owner records it again when it finds it missing.
    /// (Last variant: older entries keep their encoding.)
    Serving { group: GroupId, epoch: u64, node: NodeId },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    pub node: NodeId,
    pub by: NodeId,
    pub ok: bool,
    pub unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cluster log entry does not decode: {0}")]
    Decode(postcard::Error),
    #[error("cluster log entry of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("cluster log entry names group {0:?}, which the configuration does not have")]
    UnknownGroup(GroupId),
}

impl ClusterEntry {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("entries always serialise")
    }

    pub fn decode(bytes: &[u8]) -> Result<ClusterEntry, StateError> {
        if bytes.len() > ENCODED_MAX {
            return Err(StateError::TooLarge(bytes.len()));
        }
        postcard::from_bytes(bytes).map_err(StateError::Decode)
    }
}

/// Every node's view of the cluster, folded from the log in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub groups: Vec<GroupState>,
    pub fences: VecDeque<FenceRecord>,
    /// The raft index of the last entry folded in.
    pub applied: u64,
}

/// What one folded entry means to this node's shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Folded {
    /// A failover entry: pass it to the group's core.
    Group {
        group: GroupId,
        entry: Entry,
        applied: Applied,
    },
    Move {
        group: GroupId,
        epoch: u64,
        to: NodeId,
    },
    Fenced(FenceRecord),
    Serving {
        group: GroupId,
        epoch: u64,
        node: NodeId,
    },
}

impl ClusterState {
    pub fn new(groups: Vec<GroupState>) -> ClusterState {
        ClusterState { groups, fences: VecDeque::new(), applied: 0 }
    }

    pub fn apply(&mut self, index: u64, entry: ClusterEntry) -> Result<Folded, StateError> {
        self.applied = self.applied.max(index);
        match entry {
            ClusterEntry::Group(entry) => {
                let group = group_of(&entry);
                let state = self.groups.get_mut(usize::from(group.0)).ok_or(StateError::UnknownGroup(group))?;
                let applied = state.apply(&entry);
                Ok(Folded::Group { group, entry, applied })
            }
            ClusterEntry::Move { group, epoch, to } => {
                if usize::from(group.0) >= self.groups.len() {
                    return Err(StateError::UnknownGroup(group));
                }
                Ok(Folded::Move { group, epoch, to })
            }
            ClusterEntry::Fenced { node, by, ok, unix_ms } => {
                let record = FenceRecord { node, by, ok, unix_ms };
                if self.fences.len() == FENCE_HISTORY_MAX {
                    self.fences.pop_front();
                }
                self.fences.push_back(record.clone());
                Ok(Folded::Fenced(record))
            }
            ClusterEntry::Serving { group, epoch, node } => {
                if usize::from(group.0) >= self.groups.len() {
                    return Err(StateError::UnknownGroup(group));
                }
                Ok(Folded::Serving { group, epoch, node })
            }
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("state always serialises")
    }

    /// A snapshot made by `snapshot`, checked against the configuration.
    pub fn restore(bytes: &[u8], groups: usize) -> Result<ClusterState, StateError> {
        if bytes.len() > ENCODED_MAX {
            return Err(StateError::TooLarge(bytes.len()));
        }
        let state: ClusterState = postcard::from_bytes(bytes).map_err(StateError::Decode)?;
        if state.groups.len() != groups {
            return Err(StateError::UnknownGroup(GroupId(state.groups.len() as u16)));
        }
        Ok(state)
    }
}

pub fn group_of(entry: &Entry) -> GroupId {
    match *entry {
        Entry::Grant { group, .. }
        | Entry::Renew { group, .. }
        | Entry::Disk { group, .. }
        | Entry::MarkFailed { group, .. }
        | Entry::Cleanup { group, .. }
        | Entry::Release { group, .. }
        | Entry::Standby { group, .. }
        | Entry::EpochFloor { group, .. } => group,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::DiskState;

    fn state() -> ClusterState {
        ClusterState::new(vec![GroupState::new(GroupId(0), &[NodeId(0), NodeId(1)], DiskState::UpToDate)])
    }

    #[test]
    fn entries_round_trip_and_fold() {
        let mut s = state();
        let grant = ClusterEntry::Group(Entry::Grant { group: GroupId(0), node: NodeId(1), epoch: 1, incarnation: 9 });
        let decoded = ClusterEntry::decode(&grant.encode()).unwrap();
        assert_eq!(decoded, grant);
        let folded = s.apply(5, decoded).unwrap();
        assert!(matches!(folded, Folded::Group { applied: Applied::Granted { epoch: 1, .. }, .. }), "{folded:?}");
        assert_eq!((s.groups[0].owner, s.groups[0].epoch, s.applied), (Some(NodeId(1)), 1, 5));
        for i in 0..40 {
            s.apply(6 + i, ClusterEntry::Fenced { node: NodeId(0), by: NodeId(1), ok: true, unix_ms: i }).unwrap();
        }
        assert_eq!(s.fences.len(), FENCE_HISTORY_MAX);
        assert_eq!(s.fences.back().map(|f| f.unix_ms), Some(39));
        let serving = ClusterEntry::Serving { group: GroupId(0), epoch: 1, node: NodeId(1) };
        assert_eq!(ClusterEntry::decode(&serving.encode()).unwrap(), serving);
        assert_eq!(s.apply(50, serving).unwrap(), Folded::Serving { group: GroupId(0), epoch: 1, node: NodeId(1) });
        // The older variants keep their encoding (entries already in logs).
        assert_eq!(grant.encode()[0], 0);
        assert_eq!(ClusterEntry::Fenced { node: NodeId(0), by: NodeId(1), ok: true, unix_ms: 0 }.encode()[0], 2);
        let back = ClusterState::restore(&s.snapshot(), 1).unwrap();
        assert_eq!(back, s);
        assert!(ClusterState::restore(&s.snapshot(), 2).is_err(), "a snapshot for another configuration");
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        assert!(ClusterEntry::decode(&[0xff; 7]).is_err());
        assert!(ClusterEntry::decode(&vec![0; ENCODED_MAX + 1]).is_err());
        let mut s = state();
        let other = ClusterEntry::Group(Entry::Cleanup { group: GroupId(3), node: NodeId(0) });
        assert!(matches!(s.apply(1, other), Err(StateError::UnknownGroup(GroupId(3)))));
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in 0..2000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes: Vec<u8> = (0..len % 64).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            if let Ok(e) = ClusterEntry::decode(&bytes) {
                let _ = s.apply(2, e);
            }
            let _ = ClusterState::restore(&bytes, 1);
        }
    }
}
