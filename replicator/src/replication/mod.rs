//! Two-node replication, DRBD-style.
//!
//! The core is sans-IO: [`replica::Replica`] takes events (application
//! writes, disk completions, peer messages, link up/down, timeouts, admin
//! commands) and returns [`replica::Action`]s; it never touches a socket, a
//! file or a clock. The deterministic simulation in `sim` runs two of them
//! through seeded schedules of crashes, cuts and disk faults.
//!
//! Files: `message` (what replicas say), `wire` (frames: zerocopy header +
//! crc32), `generations` (generation ids and the handshake decision),
//! `bitmap` (dirty bitmap), `activity_log` (hot extents), `apply` (the
//! secondary's ordered apply queue), `resync` (source-side resync and
//! verify pacing), `transfer_log` (settled writes until both disks flushed
//! them), `ids`, `replica/` (the state machine). The shell that runs it
//! (sockets, files, tasks) is `crate::node`.

pub mod activity_log;
mod apply;
pub mod bitmap;
pub mod fuzz;
pub mod generations;
pub mod ids;
pub mod message;
pub mod replica;
mod resync;
mod transfer_log;
pub mod wire;

#[cfg(test)]
mod sim;

pub use message::{DiskState, Message, Protocol, Role, WriteKind};
pub use replica::{
    Action, AdminError, AppWrite, Config, DiskOp, DiskOutput, Fencing, MetaState, Persisted, Replica, Status,
};
