//! Resource groups: the ordered steps that run where the group's volume is
//! primary (attach → filesystem → service IP → services), and the volume
//! commands the failover core's actions map to.
//!
//! - `config`: the `[[group]]` table, validated into a `GroupSpec`;
//! - `runner`: `GroupRunner`, the sans-IO core (order, monitors, restarts,
//!   escalation);
//! - `exec`: the tokio shell: `run_command` (timeouts kill the process
//!   group), and `spawn`, which drives a runner and gives a `GroupHandle`;
//! - `kinds`: what attach, filesystem, ip, ocf and systemd steps run;
//! - `volume`: `Volume`, the replicator CLI (promote, demote, freeze,
//!   resume, status);
//! - `reconnect`: when a StandAlone volume is reconnected (`replicator
//!   connect`) and when it is left to the admin (split brain).
//!
//! How the daemon maps the failover core's actions: `Promote { epoch }` →
//! `Volume::promote`, `Resume` → `Volume::resume`, `StartServices` →
//! `GroupHandle::start`, `RestartServices` → `restart`, `StopServices` →
//! `stop` (then wait for `GroupEvent::Stopped` before `Demote`), `Freeze` →
//! `Volume::freeze`, `Demote` → `Volume::demote`. `GroupEvent::Failed` and
//! `StartFailed` become `Input::ResourceFailed`; `StopFailed` means the node
//! must fence itself (or be fenced) before the peer may promote.
//!
//! **Invariant:** the runner never runs a process or reads a clock; the
//! shell never decides what to run next.

pub mod config;
pub mod exec;
mod kinds;
pub mod reconnect;
pub mod runner;
pub mod volume;

pub use config::{GroupConfigError, GroupSection, GroupSpec, ResourceSection, StepKind, StepSpec};
pub use exec::{spawn, GroupContext, GroupHandle};
pub use runner::{GroupEvent, GroupRunner, Op, Outcome, StepState, StepStatus};
pub use volume::{Volume, VolumeError, VolumeStatus};
