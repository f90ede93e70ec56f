//! `QuorumView`: whether this node can commit right now, from the times it
//! last heard from each voter (pure; the raft task feeds it).
//!
//! A leader can commit while a majority of voters (itself included) was
//! heard from within the election timeout (what check-quorum enforces, but
//! known at every instant instead of once per timeout). A follower can while
//! it heard from its leader within the election timeout. Candidates and
//! nodes without a leader cannot.

use std::collections::BTreeMap;

use raft::StateRole;

pub(crate) struct QuorumView {
    me: u64,
    /// The voters (raft ids, this node included when it votes).
    voters: Vec<u64>,
    election_timeout_ms: u64,
    /// Raft id → when a message from it last arrived (ms on the node's clock).
    heard_ms: BTreeMap<u64, u64>,
}

impl QuorumView {
    pub(crate) fn new(me: u64, voters: Vec<u64>, election_timeout_ms: u64) -> QuorumView {
        QuorumView { me, voters, election_timeout_ms, heard_ms: BTreeMap::new() }
    }

    /// The membership changed (two-node mode: one voter, then two again).
    pub(crate) fn set_voters(&mut self, voters: Vec<u64>) {
        self.voters = voters;
    }

    pub(crate) fn heard(&mut self, from: u64, now_ms: u64) {
        self.heard_ms.insert(from, now_ms);
    }

    fn recent(&self, id: u64, now_ms: u64) -> bool {
        self.heard_ms.get(&id).is_some_and(|t| now_ms.saturating_sub(*t) < self.election_timeout_ms)
    }

    pub(crate) fn has_quorum(&self, role: StateRole, leader: u64, now_ms: u64) -> bool {
        match role {
            StateRole::Leader => {
                // Only voters count: a node being added back is heard from
                // before it votes.
                let others = self.voters.iter().filter(|id| **id != self.me && self.recent(**id, now_ms)).count();
                1 + others > self.voters.len() / 2
            }
            StateRole::Follower => leader != 0 && leader != self.me && self.recent(leader, now_ms),
            StateRole::Candidate | StateRole::PreCandidate => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_needs_a_recent_majority() {
        let mut q = QuorumView::new(1, vec![1, 2, 3], 500);
        assert!(!q.has_quorum(StateRole::Leader, 1, 0));
        q.heard(2, 100);
        assert!(q.has_quorum(StateRole::Leader, 1, 599));
        assert!(!q.has_quorum(StateRole::Leader, 1, 600), "heard 500 ms ago: stale");
        q.heard(3, 550);
        assert!(q.has_quorum(StateRole::Leader, 1, 600));
        // Two voters: the leader needs the other one.
        let mut two = QuorumView::new(1, vec![1, 2], 500);
        assert!(!two.has_quorum(StateRole::Leader, 1, 0));
        two.heard(2, 0);
        assert!(two.has_quorum(StateRole::Leader, 1, 10));
        // One voter: always; a non-voter heard from does not count.
        let mut one = QuorumView::new(1, vec![1], 500);
        assert!(one.has_quorum(StateRole::Leader, 1, 0));
        one.set_voters(vec![1, 2]);
        assert!(!one.has_quorum(StateRole::Leader, 1, 0), "two voters again: needs the other");
        let mut two = QuorumView::new(1, vec![1, 2], 500);
        two.heard(3, 0);
        assert!(!two.has_quorum(StateRole::Leader, 1, 10), "node 3 does not vote");
    }

    #[test]
    fn follower_needs_its_leader_recently() {
        let mut q = QuorumView::new(2, vec![1, 2, 3], 500);
        q.heard(3, 0);
        assert!(!q.has_quorum(StateRole::Follower, 0, 10), "no leader known");
        assert!(!q.has_quorum(StateRole::Follower, 1, 10), "heard from another node, not the leader");
        q.heard(1, 100);
        assert!(q.has_quorum(StateRole::Follower, 1, 200));
        assert!(!q.has_quorum(StateRole::Follower, 1, 600));
        assert!(!q.has_quorum(StateRole::PreCandidate, 1, 200));
        assert!(!q.has_quorum(StateRole::Candidate, 1, 200));
    }
}
