//! The messages two replicas exchange, as the core sees them. `P` is the
//! shell's data buffer: the core moves it around and never looks inside.
//! `wire.rs` maps these to frames.

use serde::{Deserialize, Serialize};

use crate::metadata::Generations;

/// Role, disk state and protocol are the admin API's types (`replicator-api`):
/// their names are what `status` shows and clusterd reads; on the link they
/// travel as postcard variant indexes.
pub use replicator_api::{DiskState, Protocol, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteKind {
    /// Data follows.
    Write,
    /// Deallocate (reads return zeros or old data: advisory).
    Trim,
    /// Read back as zeros.
    Zeroes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Protocol B: the peer has the data in memory.
    Received,
    /// The peer's disk completed the operation.
    Written,
    /// The peer's disk failed the operation.
    Failed,
}

/// First message on every connection, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub resource: String,
    pub node_name: String,
    pub node_id: u32,
    pub size_bytes: u64,
    pub granularity_bytes: u32,
    pub protocol: Protocol,
    pub generations: Generations,
    pub role: Role,
    pub disk: DiskState,
    /// This node crashed while primary and has not resynced since.
    pub crashed_primary: bool,
    /// The newest primary epoch this node has seen (its own, if primary).
    pub epoch: u64,
    /// The admin asked this node to give up its changes (split-brain victim).
    pub discard_my_data: bool,
    /// Bits set in this node's dirty bitmap.
    pub dirty_bits: u64,
}

/// A role or disk change while connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerState {
    pub role: Role,
    pub disk: DiskState,
    pub epoch: u64,
}

/// End of a resync: the target adopts the source's generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncDone {
    pub generations: Generations,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<P> {
    Hello(Box<Hello>),
    /// Sparse dirty bitmap: (word index, word) pairs; `last` ends it.
    Bitmap {
        pairs: Vec<(u64, u64)>,
        last: bool,
    },
    State(PeerState),
    /// An application write, replicated. `barrier`: writes of barrier n+1
    /// were issued after some write of barrier n was answered before the
    /// peer had it on disk (protocols A/B), so the peer must finish every
    /// write of n before starting one of n+1.
    Data {
        seq: u64,
        epoch: u64,
        barrier: u64,
        offset: u64,
        len: u32,
        kind: WriteKind,
        fua: bool,
        data: Option<P>,
    },
    Ack {
        seq: u64,
        kind: AckKind,
    },
    /// Flush everything received before it.
    Flush {
        seq: u64,
        barrier: u64,
    },
    FlushAck {
        seq: u64,
        ok: bool,
    },
    ResyncData {
        seq: u64,
        offset: u64,
        len: u32,
        data: P,
    },
    ResyncAck {
        seq: u64,
        ok: bool,
    },
    /// Checksum-based resync: send data only if the target's block differs.
    ResyncCsum {
        seq: u64,
        offset: u64,
        len: u32,
        csum: u32,
    },
    ResyncCsumReply {
        seq: u64,
        equal: bool,
    },
    ResyncDone(ResyncDone),
    VerifyReq {
        seq: u64,
        offset: u64,
        len: u32,
        csum: u32,
    },
    /// `Written` = equal, `Received` = differs, `Failed` = could not read.
    VerifyReply {
        seq: u64,
        kind: AckKind,
    },
    Ping,
    PingAck,
    /// Primary to secondary: writes are no longer all sent (protocol A
    /// pulled ahead of a congested link), so the secondary's disk is
    /// Outdated until the resync that follows. Sent in order with the data
    /// (not ahead of it), so an earlier resync's end cannot overtake it.
    Outdate,
}
