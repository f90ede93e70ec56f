//! `replicator`: a DRBD-like block volume served over NBD.
//!
//! Crate layout (see ARCHITECTURE.md for the full code map):
//! - [`nbd`]: the NBD protocol, sans-IO (handshake, requests, replies).
//! - [`server`]: the NBD server shell (listeners, connections, counters).
//! - [`backing`]: the io_uring I/O engine that owns the backing store.
//! - [`replication`]: two-node mirroring (sans-IO core, link, resync).
//! - [`metadata`]: the versioned, checksummed, crash-safe on-disk metadata.
//! - [`device`]: facts about the backing file or block device.
//! - [`daemon`]: `serve` start-up and shutdown order.
//! - [`config`], [`tls`], [`control`], [`metrics`]: configuration, TLS
//!   material, the status socket and the Prometheus endpoint.
//! - [`limits`]: every bound, in one place.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod backing;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod limits;
pub mod metadata;
pub mod metrics;
pub mod nbd;
pub mod node;
pub mod replication;
pub mod server;
pub mod tls;

#[cfg(test)]
mod test_rng;
