//! clusterd: the cluster manager of the mail appliance (issue 5). It watches
//! the nodes over authenticated heartbeats, keeps the cluster state in a
//! replicated log, fences, and moves a resource group between the two
//! storage nodes without ever letting both write the volume.
//!
//! This crate holds the sans-IO cores and their deterministic simulation:
//! - `config`: the cluster configuration file, validated;
//! - `heartbeat`: authenticated heartbeats over several paths, peer liveness;
//! - `failover`: the safety core (grants, epochs, leases, fencing decisions);
//! - `fence`: the fence-agents interface (stdin arguments, exit codes, levels);
//! - `preflight`: `check-config`'s checks of the files the configuration
//!   names on this host, and of each group's replicator resource file;
//! - `raft_log`: the replicated cluster log (Raft over mutual TLS, state on
//!   local disk) that carries `failover`'s entries;
//! - `watchdog`: hardware watchdog self-fencing (the device, when to pet);
//! - `sim` (tests only): thousands of seeded schedules over the real cores.

pub mod cluster_state;
pub mod config;
pub mod control;
pub mod daemon;
pub mod failover;
pub mod fence;
pub mod fuzz;
pub mod group;
pub mod heartbeat;
pub mod preflight;
pub mod raft_log;
pub mod watchdog;

#[cfg(test)]
mod rng;
#[cfg(test)]
mod sim;

/// A cluster node, by its index in the configuration's node list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct NodeId(pub u8);
