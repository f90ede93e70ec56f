//! Resource groups: the ordered steps that run where the group's volume is
//! primary (attach → filesystem → service IP → services), and the volume
//! commands the failover core's actions map to.
//!
//! - `config`: the `[[group]]` table, validated into a `GroupSpec`;
//! - `runner`: `GroupRunner`, the sans-IO core (order, monitors, restarts,
//!   escalation);
//! - `exec`: the tokio shell: runs each kind's commands with timeouts, and
//!   `spawn` gives a `GroupHandle`;
//! - `volume`: `Volume`, the replicator CLI (promote, demote, freeze,
//!   resume, status).
//!
//! **Invariant:** the runner never runs a process or reads a clock; the
//! shell never decides what to run next.

pub mod config;
pub mod exec;
mod kinds;
pub mod runner;
pub mod volume;

pub use config::{GroupConfigError, GroupSection, GroupSpec, ResourceSection, StepKind, StepSpec};
pub use exec::{spawn, GroupContext, GroupHandle};
pub use runner::{GroupEvent, GroupRunner, Op, Outcome, StepState, StepStatus};
pub use volume::{Volume, VolumeError, VolumeStatus};
