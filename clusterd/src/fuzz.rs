//! Entry point for the fuzz target `cluster_input` (fuzz/): everything
//! clusterd parses from the network or its own disk, with hostile bytes.
//! The first byte picks the parser:
//! - heartbeat datagrams (64-byte chunks) into a live heartbeat core;
//! - a raft message as the log transport decodes a frame's body;
//! - the log's state file (torn tails vs corruption);
//! - cluster log entries folded into the cluster state, a snapshot, and an
//!   admin request line.
//!
//! None of them may panic, loop or allocate without bound.

use protobuf::Message as _;

use crate::cluster_state::{ClusterEntry, ClusterState};
use crate::failover::{DiskState, GroupId, GroupState};
use crate::heartbeat::{Datagram, Heartbeat, HeartbeatConfig, DATAGRAM_BYTES};
use crate::NodeId;

const KEY: &[u8] = b"fuzzing key, 32 bytes long......";

pub fn input(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    match kind % 4 {
        0 => heartbeats(rest),
        1 => {
            if let Ok(m) = raft::eraftpb::Message::parse_from_bytes(rest) {
                let _ = (m.get_msg_type(), m.from, m.to, m.get_entries().len());
            }
        }
        2 => {
            let _ = crate::raft_log::record::replay(rest);
        }
        _ => {
            let mut state =
                ClusterState::new(vec![GroupState::new(GroupId(0), &[NodeId(0), NodeId(1)], DiskState::UpToDate)]);
            for (i, chunk) in rest.split(|b| *b == 0xff).enumerate() {
                if let Ok(e) = ClusterEntry::decode(chunk) {
                    let _ = state.apply(i as u64, e);
                }
            }
            let _ = ClusterState::restore(rest, 1);
            let _ = serde_json::from_slice::<crate::control::Request>(rest);
        }
    }
}

fn heartbeats(data: &[u8]) {
    let mut hb = Heartbeat::new(
        HeartbeatConfig {
            me: NodeId(0),
            peers: vec![NodeId(1), NodeId(2)],
            paths: 2,
            cluster_id: 7,
            key: KEY.to_vec(),
            incarnation: 1,
            interval_ms: 200,
            deadtime_ms: 1500,
            warntime_ms: 1000,
            initdead_ms: 3000,
        },
        0,
    );
    let mut now = 0;
    for (i, chunk) in data.chunks(DATAGRAM_BYTES).enumerate() {
        let _ = Datagram::decode(chunk, KEY);
        now += u64::from(chunk[0]) * 10;
        hb.handle_datagram(now, (i % 3) as u8, chunk);
        hb.handle_timeout(now);
        while hb.poll_event().is_some() {}
        while hb.poll_transmit().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_inputs_do_not_panic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..3000usize {
            let bytes: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            super::input(&bytes);
        }
    }
}
