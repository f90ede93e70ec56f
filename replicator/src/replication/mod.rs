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
//! them), `replica` (the state machine).

pub mod activity_log;
mod apply;
pub mod bitmap;
pub mod driver;
pub mod fuzz;
pub mod generations;
pub mod ids;
pub mod link;
pub mod message;
pub mod replica;
pub mod resource;
mod resync;
mod transfer_log;
pub mod up;
pub mod wire;

#[cfg(test)]
mod sim;

pub use message::{DiskState, Message, Protocol, Role, WriteKind};
pub use replica::{
    Action, AdminError, AppWrite, Config, DiskOp, DiskOutput, Fencing, MetaState, Persisted, Replica, Status,
};

/// Why `replicator up` could not run the resource.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Metadata(#[from] crate::metadata::MetadataError),
    #[error(transparent)]
    Backing(#[from] crate::backing::BackingError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    Driver(#[from] driver::DriverError),
    #[error("failed to listen on {addr}: {cause}")]
    Listen { addr: String, cause: std::io::Error },
    #[error("failed to install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("disk {disk}: {cause}")]
    Lock { disk: std::path::PathBuf, cause: std::io::Error },
}
