//! Entry points for the replication fuzz targets (and seeded random tests):
//! arbitrary bytes from the peer's point of view.

use super::generations::AfterSplitBrain;
use super::message::{DiskState, Hello, Message, Protocol, Role};
use super::replica::{Action, Config, DiskOp, DiskOutput, Fencing, Persisted, Replica};
use super::wire::{self, HEADER_BYTES};
use crate::metadata::Generations;

const SIZE: u64 = 1 << 20;

fn config(node_id: u32, protocol: Protocol) -> Config {
    Config {
        resource: "r0".into(),
        node_name: format!("n{node_id}"),
        node_id,
        size_bytes: SIZE,
        granularity_bytes: 4096,
        al_extent_bytes: 64 * 1024,
        al_extents_max: 8,
        protocol,
        fencing: Fencing::DontCare,
        after_split_brain: AfterSplitBrain::Disconnect,
        ping_interval_ms: 100,
        ping_timeout_ms: 200,
        io_timeout_ms: 1000,
        resync_rate_min_bytes_per_sec: 1 << 20,
        resync_rate_max_bytes_per_sec: 1 << 30,
        resync_chunk_bytes: 64 * 1024,
        resync_inflight_bytes_max: 1 << 20,
        resync_checksums: false,
        send_queue_bytes_max: 1 << 20,
        on_congestion: super::replica::OnCongestion::PullAhead,
        seed: 7,
    }
}

/// Splits `data` into frames, decodes each and, while they decode, feeds
/// them to a secondary replica connected to a primary peer. The first byte
/// picks the protocol and whether the local node is primary instead.
pub fn frames(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let protocol = [Protocol::A, Protocol::B, Protocol::C][usize::from(mode % 3)];
    let primary = mode & 4 != 0;
    let generations = Generations { current: 0x1_0000_0001, ..Generations::default() };
    let persisted = Persisted {
        generations,
        consistent: true,
        outdated: false,
        primary,
        crashed_primary: false,
        clean_shutdown: true,
        epoch: 3,
        bitmap_words: Vec::new(),
        al_extents: Vec::new(),
    };
    let mut replica: Replica<Vec<u8>> = Replica::new(config(1, protocol), persisted, 0);
    replica.handle_connected(1, 1);
    let hello = Hello {
        resource: "r0".into(),
        node_name: "n0".into(),
        node_id: 0,
        size_bytes: SIZE,
        granularity_bytes: 4096,
        protocol,
        generations,
        role: if primary { Role::Secondary } else { Role::Primary },
        disk: DiskState::UpToDate,
        crashed_primary: false,
        epoch: 3,
        discard_my_data: false,
        dirty_bits: 0,
    };
    replica.handle_message(2, 1, Message::Hello(Box::new(hello)));
    let mut now = 3;
    let mut ios = Vec::new();
    for _ in 0..10_000 {
        drain(&mut replica, &mut ios);
        // Complete the oldest disk operation now and then.
        if rest.len() % 3 == 0 {
            if let Some((io, out)) = ios.pop() {
                replica.handle_disk(now, io, Ok(out));
                continue;
            }
        }
        if rest.len() < HEADER_BYTES {
            break;
        }
        let (head, tail) = rest.split_at(HEADER_BYTES);
        let head: &[u8; HEADER_BYTES] = head.try_into().expect("split at HEADER_BYTES");
        let Ok(header) = wire::decode_header(head) else { break };
        let len = header.payload_len().min(tail.len());
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        match wire::decode_message(&header, payload.to_vec()) {
            Ok(msg) => replica.handle_message(now, 1, msg),
            Err(e) => {
                replica.handle_frame_error(now, 1, &e);
                break;
            }
        }
        now += 1;
        replica.handle_timeout(now);
    }
    drain(&mut replica, &mut ios);
}

fn drain(replica: &mut Replica<Vec<u8>>, ios: &mut Vec<(u64, DiskOutput<Vec<u8>>)>) {
    while let Some(action) = replica.poll_action() {
        if let Action::Disk { io, op } = action {
            let out = match op {
                DiskOp::Read { len, .. } => DiskOutput::Data(vec![0; len as usize]),
                DiskOp::Checksum { .. } => DiskOutput::Checksum(0),
                _ => DiskOutput::Done,
            };
            ios.push((io, out));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// Random frames (valid headers with random fields, random payloads)
    /// never panic the core.
    #[test]
    fn random_frames_never_panic_the_core() {
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let mut data = vec![rng.below(8) as u8];
            for _ in 0..rng.below(40) {
                let command = 2 + rng.below(15) as u8;
                let payload_len = match command {
                    4 | 8 => 4096,
                    2 => 16 * rng.below(4) as usize,
                    _ => 0,
                };
                let mut header = [0u8; HEADER_BYTES];
                header[..4].copy_from_slice(b"RPL1");
                header[4] = 1;
                header[5] = command;
                header[6..8].copy_from_slice(&(rng.below(4) as u16).to_be_bytes());
                header[8..16].copy_from_slice(&rng.below(64).to_be_bytes());
                header[16..24].copy_from_slice(&(rng.below(300) * 4096).to_be_bytes());
                let length = if payload_len > 0 { payload_len as u32 } else { 4096 * rng.below(3) as u32 };
                header[24..28].copy_from_slice(&length.to_be_bytes());
                header[28..32].copy_from_slice(&(payload_len as u32).to_be_bytes());
                header[32..40].copy_from_slice(&rng.below(6).to_be_bytes());
                let payload = rng.bytes(payload_len);
                let mut h = crc32fast::Hasher::new();
                h.update(&header);
                h.update(&payload);
                header[52..].copy_from_slice(&h.finalize().to_be_bytes());
                data.extend_from_slice(&header);
                data.extend_from_slice(&payload);
            }
            frames(&data);
        }
    }
}
