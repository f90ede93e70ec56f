//! One task per resource group carrying out the failover core's actions on
//! this node, in order: the volume through the replicator CLI, the services
//! through the group runner. `Freeze` jumps the queue (it must take effect
//! within the lease even while a stop is under way); everything else waits
//! for the previous action, and a `Demote` or `Promote` after
//! `StopServices` waits until the services stopped, except a `Demote` of a
//! volume the core froze after it lost its peer: that one goes first,
//! failing the held writes a hanging stop may wait on.
//!
//! Results go back to the daemon's loop as `Report`s.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;

use super::limits::{EXEC_ACTIONS_MAX, EXEC_FREEZE_MAX};
use crate::failover::{Action, GroupId};
use crate::group::{GroupEvent, GroupHandle, Volume};

/// How often a demotion queued behind a stop on a frozen volume checks
/// whether the volume lost its peer (then it need not wait).
const DEMOTE_RECHECK_MS: u64 = 250;

/// What the executor tells the daemon's loop.
#[derive(Debug)]
pub enum Report {
    /// The volume is secondary after a `Demote`.
    Demoted(GroupId),
    /// The volume is primary with `epoch` after a `Promote`.
    Promoted { group: GroupId, epoch: u64 },
    /// The volume refused the `Promote` (the core retries while its grant
    /// holds; not a resource failure). Actions queued behind it were
    /// dropped: nothing starts above a volume that is not primary.
    PromoteRefused { group: GroupId, epoch: u64 },
    /// A service failed for good: the failover core counts it (and moves
    /// the group when it repeats).
    ResourceFailed(GroupId),
    /// The services started (all steps running).
    Started(GroupId),
    /// The services stopped (`true`), or their stop failed (`false`).
    ServicesStopped { group: GroupId, stopped: bool },
    /// Something worth an event line.
    Event { group: GroupId, kind: &'static str, message: String },
}

/// The loop's side of an executor: bounded, never waited on (see
/// `limits`): a freeze goes on its own one-slot queue (coalesced), other
/// actions are dropped and counted when `EXEC_ACTIONS_MAX` are queued.
#[derive(Debug)]
pub struct ExecHandle {
    actions: mpsc::Sender<Action>,
    freeze: mpsc::Sender<()>,
    /// Actions dropped because the queue was full.
    pub dropped: u64,
}

impl ExecHandle {
    pub fn new(actions: mpsc::Sender<Action>, freeze: mpsc::Sender<()>) -> ExecHandle {
        ExecHandle { actions, freeze, dropped: 0 }
    }

    /// Queues `action`; false if it was dropped (the queue is full).
    pub fn send(&mut self, action: Action) -> bool {
        if action == Action::Freeze {
            // Full: a freeze is pending already. Closed: the executor is gone.
            let _ = self.freeze.try_send(());
            return true;
        }
        match self.actions.try_send(action) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(a)) => {
                self.dropped += 1;
                tracing::error!(action = ?a, dropped = self.dropped, "the executor's queue is full (a command hangs beyond its timeout?); action dropped");
                false
            }
        }
    }
}

pub fn spawn(
    group: GroupId,
    volume: Volume,
    services: GroupHandle,
    events: mpsc::Receiver<GroupEvent>,
    report: mpsc::Sender<Report>,
) -> ExecHandle {
    let (tx, rx) = mpsc::channel(EXEC_ACTIONS_MAX);
    let (freeze_tx, freeze_rx) = mpsc::channel(EXEC_FREEZE_MAX);
    tokio::spawn(
        Executor {
            group,
            volume,
            services,
            report,
            stopping: false,
            blocked: false,
            stop_retried_for_start: false,
            held_by_core: false,
            queue: VecDeque::new(),
        }
        .run(rx, freeze_rx, events),
    );
    ExecHandle::new(tx, freeze_tx)
}

struct Executor {
    group: GroupId,
    volume: Volume,
    services: GroupHandle,
    report: mpsc::Sender<Report>,
    /// A stop was requested and the runner has not reported `Stopped` yet.
    stopping: bool,
    /// The runner's last stop failed: it runs nothing until a stop is
    /// retried. A start is preceded by one more stop attempt.
    blocked: bool,
    stop_retried_for_start: bool,
    /// The core froze the volume (its lease ended or is ending, or the
    /// group is being given up): nothing written from now on will be
    /// acknowledged, so a queued `Demote` need not wait for the stop.
    held_by_core: bool,
    queue: VecDeque<Action>,
}

impl Executor {
    async fn run(
        mut self,
        mut actions: mpsc::Receiver<Action>,
        mut freezes: mpsc::Receiver<()>,
        mut events: mpsc::Receiver<GroupEvent>,
    ) {
        let mut events_open = true;
        loop {
            self.drain().await;
            // A demotion waiting behind a stop on a frozen volume looks
            // again now and then: the replicator may notice its peer is
            // gone only after its ping timeout.
            let recheck = self.stopping && self.held_by_core && matches!(self.queue.front(), Some(Action::Demote));
            tokio::select! {
                biased;
                Some(()) = freezes.recv() => self.core_freeze().await,
                action = actions.recv() => match action {
                    Some(Action::Freeze) => self.core_freeze().await,
                    Some(a) => self.queue.push_back(a),
                    None => return,
                },
                event = events.recv(), if events_open => match event {
                    Some(e) => self.service_event(e).await,
                    None => events_open = false,
                },
                () = tokio::time::sleep(Duration::from_millis(DEMOTE_RECHECK_MS)), if recheck => {}
            }
        }
    }

    /// Runs queued actions until one must wait for the services to stop.
    async fn drain(&mut self) {
        while let Some(action) = self.queue.front() {
            if self.stopping && !matches!(action, Action::StopServices) {
                if !(matches!(action, Action::Demote) && self.cut_off_and_frozen().await) {
                    return;
                }
                // A stop on a volume frozen without its peer can hang on the
                // very writes the freeze holds (an fsync, the file system's
                // final flush): demoting first fails them (they were never
                // acknowledged), and the stop goes through (issue 23: a
                // cut-off primary took 30 s to let go, or never did).
                self.event("demote", "frozen without its peer: demoting without waiting for the stop".into()).await;
            }
            if self.blocked
                && !self.stop_retried_for_start
                && matches!(action, Action::StartServices | Action::RestartServices)
            {
                // A start on a runner blocked by a failed stop would fail
                // at once (and count as this node's failure): retry the stop
                // first (it escalates: users killed, lazy unmount).
                self.stop_retried_for_start = true;
                self.stopping = true;
                self.event("stop", "retrying the failed stop before starting".into()).await;
                let _ = self.services.stop().await;
                return;
            }
            if matches!(action, Action::StartServices | Action::RestartServices) {
                self.stop_retried_for_start = false;
            }
            let action = self.queue.pop_front().expect("front exists");
            self.execute(action).await;
        }
    }

    async fn event(&self, kind: &'static str, message: String) {
        self.send(Report::Event { group: self.group, kind, message }).await;
    }

    /// Waits while the loop's report queue is full (see `limits`).
    async fn send(&self, r: Report) {
        let _ = self.report.send(r).await;
    }

    /// The core froze the volume and the volume has lost its peer: no write
    /// held now can ever be acknowledged. (With the peer connected, as in a
    /// planned move whose stop failed, writes are not what a stop waits on,
    /// and the demotion keeps waiting for the stop.)
    async fn cut_off_and_frozen(&self) -> bool {
        self.held_by_core
            && self.volume.status().await.is_ok_and(|s| s.is_primary() && !s.connection.replicates_writes())
    }

    /// A freeze the failover core asked for (not the executor's own hold
    /// after a failed stop).
    async fn core_freeze(&mut self) {
        self.freeze().await;
        self.held_by_core = true;
    }

    async fn freeze(&mut self) {
        match self.volume.freeze().await {
            Ok(()) => self.event("freeze", "volume I/O suspended".into()).await,
            // A secondary has nothing to hold.
            Err(e) => tracing::debug!(group = ?self.group, "freeze: {e}"),
        }
    }

    async fn execute(&mut self, action: Action) {
        tracing::debug!(group = ?self.group, ?action, "executing");
        match action {
            Action::Promote { epoch } => {
                let promoted = match self.volume.promote(epoch).await {
                    Ok(()) => Ok(()),
                    // The command may have taken effect although it failed
                    // (timed out, or a retry of one that did): the volume's
                    // own state decides.
                    Err(e) => match self.volume.status().await {
                        Ok(s) if s.is_primary() && s.epoch == epoch => Ok(()),
                        _ => Err(e),
                    },
                };
                match promoted {
                    Ok(()) => {
                        self.held_by_core = false;
                        self.event("promote", format!("volume primary with epoch {epoch}")).await;
                        self.send(Report::Promoted { group: self.group, epoch }).await;
                    }
                    Err(e) => {
                        self.event(
                            "promote-refused",
                            format!("promotion refused, retrying while the grant holds: {e}"),
                        )
                        .await;
                        // Whatever the core queued behind the promotion
                        // assumed it succeeded; the core sends it again
                        // after a successful retry.
                        self.queue
                            .retain(|a| !matches!(a, Action::Resume | Action::StartServices | Action::RestartServices));
                        self.send(Report::PromoteRefused { group: self.group, epoch }).await;
                    }
                }
            }
            Action::Resume => {
                self.held_by_core = false;
                match self.volume.resume().await {
                    Ok(()) => self.event("resume", "volume I/O resumed".into()).await,
                    Err(e) => self.event("error", format!("resume failed: {e}")).await,
                }
            }
            Action::Freeze => self.core_freeze().await,
            Action::StartServices => {
                if self.services.start().await.is_err() {
                    tracing::error!(group = ?self.group, "the resource group task is gone");
                }
            }
            Action::RestartServices => {
                let _ = self.services.restart().await;
            }
            Action::StopServices => {
                self.stopping = true;
                let _ = self.services.stop().await;
            }
            Action::Demote => match self.volume.demote().await {
                Ok(()) => {
                    self.event("demote", "volume secondary".into()).await;
                    self.send(Report::Demoted(self.group)).await;
                }
                Err(e) => {
                    // Already secondary counts as done.
                    let text = e.to_string();
                    if text.contains("not primary") {
                        self.send(Report::Demoted(self.group)).await;
                    } else {
                        self.event("error", format!("demotion failed: {text}")).await;
                    }
                }
            },
            // Proposals and fencing are the daemon's loop's business.
            Action::Propose(_) | Action::Fence { .. } => {}
        }
    }

    async fn service_event(&mut self, e: GroupEvent) {
        match e {
            GroupEvent::Started => {
                self.event("started", "services started".into()).await;
                self.send(Report::Started(self.group)).await;
            }
            GroupEvent::Stopped => {
                self.stopping = false;
                self.blocked = false;
                self.event("stopped", "services stopped".into()).await;
                self.send(Report::ServicesStopped { group: self.group, stopped: true }).await;
            }
            GroupEvent::Recovered { step } => {
                self.event("recovered", format!("{step} restarted after a failure")).await
            }
            GroupEvent::StartFailed { step, why } => {
                self.event("error", format!("start of {step} failed: {why}")).await;
                self.send(Report::ResourceFailed(self.group)).await;
            }
            GroupEvent::Failed { step, why } => {
                self.event("error", format!("{step} failed: {why}")).await;
                self.send(Report::ResourceFailed(self.group)).await;
            }
            GroupEvent::StopFailed { step, why } => {
                // The step may still run: hold the volume's I/O so nothing it
                // writes is acknowledged, and leave the rest to the lease.
                self.stopping = false;
                self.blocked = true;
                self.event("error", format!("stop of {step} failed: {why}; volume I/O held, the stop is retried"))
                    .await;
                self.freeze().await;
                self.send(Report::ServicesStopped { group: self.group, stopped: false }).await;
            }
        }
    }
}
