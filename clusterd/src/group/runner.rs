//! `GroupRunner`: the sans-IO core that starts, monitors, restarts and stops
//! the steps of one resource group, in Pacemaker's manner.
//!
//! Call order: a command (`start`, `stop`, `restart`, `cleanup`) or an input
//! (`handle_result`, `handle_timeout`), then drain `poll_action` (operations
//! the shell must run, each answered later with `handle_result(now, id, …)`)
//! and `poll_event`; arm a timer for `poll_timeout` and call
//! `handle_timeout` then. Times are the caller's monotonic milliseconds; the
//! core never reads a clock.
//!
//! Semantics:
//! - start runs the steps in order, each after the previous one succeeded;
//!   a failed start stops what it started (the failed step included) in
//!   reverse and reports `StartFailed`;
//! - stop runs in reverse; a step that is not running stops successfully;
//! - a started step is monitored every `monitor_interval_ms`; a failed or
//!   timed-out monitor restarts that step and every later one (stop in
//!   reverse down to it, start again from it), at most `restarts_max` times
//!   per step until the group is stopped or cleaned up; one more failure
//!   stops the step and those after it and reports `Failed`;
//! - a failed or timed-out stop blocks the group (`StopFailed`): nothing
//!   more runs until `stop` is retried; the daemon must not let the peer
//!   promote (it fences this node);
//! - one start or stop runs at a time; a command given meanwhile waits for
//!   the running operation (the latest command wins). Monitors run beside
//!   it; results of operations that no longer matter are ignored.

use std::collections::VecDeque;

use super::config::{StepSpec, StepTiming};

/// Slack after an operation's timeout before the core gives up on the
/// shell's answer (the shell kills the process at the timeout itself).
pub const OP_GRACE_MS: u64 = 2_000;

/// Identifies one operation handed to the shell.
pub type OpId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Stop,
    Monitor,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Monitor => "monitor",
        }
    }
}

/// How an operation ended, as the shell saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; for a monitor: running.
    Ok,
    /// The resource is not running (a success for stop, a failure otherwise).
    NotRunning,
    Failed(String),
    TimedOut,
}

impl Outcome {
    fn why(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::NotRunning => "not running".into(),
            Outcome::Failed(why) => why.clone(),
            Outcome::TimedOut => "timed out".into(),
        }
    }
}

/// An operation the shell must run, then report with `handle_result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub id: OpId,
    pub step: usize,
    pub op: Op,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// Every step runs (answer to `start` or `restart`).
    Started,
    /// No step runs (answer to `stop`).
    Stopped,
    /// A start failed; everything it started is stopped again.
    StartFailed { step: String, why: String },
    /// A step failed beyond its restarts (or its restart failed); it and
    /// the steps after it are stopped. The group should move.
    Failed { step: String, why: String },
    /// A failed step was restarted locally and runs again.
    Recovered { step: String },
    /// A stop failed: the step may still run. Fence before the peer promotes.
    StopFailed { step: String, why: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Stopped,
    Starting,
    Started,
    Stopping,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StepStatus {
    pub name: String,
    pub state: StepState,
    pub last_error: Option<String>,
    pub restarts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    id: OpId,
    deadline_ms: u64,
}

#[derive(Debug)]
struct StepCore {
    name: String,
    timing: StepTiming,
    state: StepState,
    last_error: Option<String>,
    restarts: u32,
    /// A start was issued and no stop succeeded since: stop must run.
    maybe_running: bool,
    next_monitor_ms: u64,
    monitor: Option<InFlight>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    /// Answer to a command: a failure is `StartFailed`.
    Command,
    /// Local recovery after a monitor failure: a failure is `Failed`.
    Recovery { failed: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Then {
    Stopped,
    StartFrom(usize, Goal),
    ReportStartFailed { step: usize, why: String },
    ReportFailed { step: usize, why: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Start,
    Stop,
    Restart,
}

/// Named for what the group waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// No start or stop in flight; started steps (a prefix) are monitored.
    Idle,
    ExpectStarted {
        step: usize,
        op: InFlight,
        goal: Goal,
    },
    ExpectStopped {
        step: usize,
        op: InFlight,
        down_to: usize,
        then: Then,
    },
    /// A stop failed; only a retried `stop` runs anything.
    Blocked {
        step: usize,
        why: String,
    },
}

#[derive(Debug)]
pub struct GroupRunner {
    steps: Vec<StepCore>,
    phase: Phase,
    want: Option<Command>,
    /// The lowest step whose monitor failed while a start or stop ran.
    pending_failure: Option<(usize, String)>,
    next_id: OpId,
    actions: VecDeque<Run>,
    events: VecDeque<GroupEvent>,
}

impl GroupRunner {
    pub fn new(steps: &[StepSpec]) -> GroupRunner {
        GroupRunner {
            steps: steps
                .iter()
                .map(|s| StepCore {
                    name: s.name.clone(),
                    timing: s.timing,
                    state: StepState::Stopped,
                    last_error: None,
                    restarts: 0,
                    maybe_running: false,
                    next_monitor_ms: 0,
                    monitor: None,
                })
                .collect(),
            phase: Phase::Idle,
            want: None,
            pending_failure: None,
            next_id: 1,
            actions: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// A runner for a group whose steps may be running already (daemon
    /// restart): every step counts as maybe running, so `stop` stops all.
    pub fn new_unknown(steps: &[StepSpec]) -> GroupRunner {
        let mut r = GroupRunner::new(steps);
        for s in &mut r.steps {
            s.maybe_running = true;
        }
        r
    }

    pub fn poll_action(&mut self) -> Option<Run> {
        self.actions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<GroupEvent> {
        self.events.pop_front()
    }

    pub fn status(&self) -> Vec<StepStatus> {
        self.steps
            .iter()
            .map(|s| StepStatus {
                name: s.name.clone(),
                state: s.state,
                last_error: s.last_error.clone(),
                restarts: s.restarts,
            })
            .collect()
    }

    /// One word for the group: stopped, starting, started, stopping,
    /// partial (some steps run, none in transition) or blocked.
    pub fn summary(&self) -> &'static str {
        match self.phase {
            Phase::ExpectStarted { .. } => "starting",
            Phase::ExpectStopped { .. } => "stopping",
            Phase::Blocked { .. } => "blocked",
            Phase::Idle if self.steps.iter().all(|s| s.state == StepState::Started) => "started",
            Phase::Idle if self.steps.iter().all(|s| !s.maybe_running) => "stopped",
            Phase::Idle => "partial",
        }
    }

    /// Whether no start or stop is in flight.
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Idle
    }

    pub fn start(&mut self, now_ms: u64) {
        self.command(now_ms, Command::Start);
    }

    pub fn stop(&mut self, now_ms: u64) {
        self.command(now_ms, Command::Stop);
    }

    pub fn restart(&mut self, now_ms: u64) {
        self.command(now_ms, Command::Restart);
    }

    /// Forgets restart counts and errors (`clusterctl cleanup`).
    pub fn cleanup(&mut self) {
        for s in &mut self.steps {
            s.restarts = 0;
            s.last_error = None;
            if s.state == StepState::Failed && !s.maybe_running {
                s.state = StepState::Stopped;
            }
        }
    }

    /// The next time `handle_timeout` must be called, if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t: Option<u64> = None;
        let mut at = |ms: u64| t = Some(t.map_or(ms, |x| x.min(ms)));
        match &self.phase {
            Phase::ExpectStarted { op, .. } | Phase::ExpectStopped { op, .. } => at(op.deadline_ms),
            Phase::Idle | Phase::Blocked { .. } => {}
        }
        let monitoring = self.monitors_allowed();
        for s in &self.steps {
            match s.monitor {
                Some(m) => at(m.deadline_ms),
                None if monitoring && s.state == StepState::Started => at(s.next_monitor_ms),
                None => {}
            }
        }
        t
    }

    pub fn handle_timeout(&mut self, now_ms: u64) {
        // Operations the shell did not answer in time count as timed out.
        if let Phase::ExpectStarted { op, .. } | Phase::ExpectStopped { op, .. } = &self.phase {
            if op.deadline_ms <= now_ms {
                let id = op.id;
                tracing::warn!(id, "no answer from the operation; counting it as timed out");
                self.handle_result(now_ms, id, Outcome::TimedOut);
            }
        }
        for i in 0..self.steps.len() {
            if let Some(m) = self.steps[i].monitor {
                if m.deadline_ms <= now_ms {
                    self.handle_result(now_ms, m.id, Outcome::TimedOut);
                }
            }
        }
        if self.monitors_allowed() {
            for i in 0..self.steps.len() {
                let s = &mut self.steps[i];
                if s.state == StepState::Started && s.monitor.is_none() && s.next_monitor_ms <= now_ms {
                    let timeout_ms = s.timing.monitor_timeout_ms;
                    let id = self.next_id;
                    self.next_id += 1;
                    s.monitor = Some(InFlight { id, deadline_ms: now_ms + timeout_ms + OP_GRACE_MS });
                    self.actions.push_back(Run { id, step: i, op: Op::Monitor, timeout_ms });
                }
            }
        }
    }

    /// The answer to the operation `id`. Answers to operations that no
    /// longer matter (a monitor of a step being stopped, a late answer
    /// after the core's own deadline) are ignored.
    pub fn handle_result(&mut self, now_ms: u64, id: OpId, outcome: Outcome) {
        if let Some(i) = self.steps.iter().position(|s| s.monitor.is_some_and(|m| m.id == id)) {
            self.steps[i].monitor = None;
            self.monitor_result(now_ms, i, outcome);
        } else {
            match self.phase.clone() {
                Phase::ExpectStarted { step, op, goal } if op.id == id => {
                    self.start_result(now_ms, step, goal, outcome)
                }
                Phase::ExpectStopped { step, op, down_to, then } if op.id == id => {
                    self.stop_result(now_ms, step, down_to, then, outcome)
                }
                _ => tracing::debug!(id, ?outcome, "ignoring the answer of an operation that no longer matters"),
            }
        }
        self.settle(now_ms);
    }

    fn monitors_allowed(&self) -> bool {
        matches!(self.phase, Phase::Idle | Phase::ExpectStarted { .. })
    }

    fn issue(&mut self, now_ms: u64, step: usize, op: Op) -> InFlight {
        let s = &self.steps[step];
        let timeout_ms = match op {
            Op::Start => s.timing.start_timeout_ms,
            Op::Stop => s.timing.stop_timeout_ms,
            Op::Monitor => s.timing.monitor_timeout_ms,
        };
        let id = self.next_id;
        self.next_id += 1;
        self.actions.push_back(Run { id, step, op, timeout_ms });
        InFlight { id, deadline_ms: now_ms + timeout_ms + OP_GRACE_MS }
    }

    fn command(&mut self, now_ms: u64, command: Command) {
        match &self.phase {
            Phase::ExpectStarted { .. } | Phase::ExpectStopped { .. } => self.want = Some(command),
            Phase::Blocked { step, why } => {
                if command == Command::Stop {
                    // An operator retry: try the stops again.
                    self.phase = Phase::Idle;
                    self.begin_stop(now_ms, 0, Then::Stopped);
                } else {
                    let step = self.steps[*step].name.clone();
                    let why = format!("the stop of {step} failed ({why}); stop the group again or fence this node");
                    self.events.push_back(GroupEvent::StartFailed { step, why });
                }
            }
            Phase::Idle => self.run_command(now_ms, command),
        }
        self.settle(now_ms);
    }

    fn run_command(&mut self, now_ms: u64, command: Command) {
        debug_assert_eq!(self.phase, Phase::Idle);
        match command {
            Command::Start => self.begin_start(now_ms, 0, Goal::Command),
            Command::Stop => self.begin_stop(now_ms, 0, Then::Stopped),
            Command::Restart => self.begin_stop(now_ms, 0, Then::StartFrom(0, Goal::Command)),
        }
    }

    fn begin_start(&mut self, now_ms: u64, from: usize, goal: Goal) {
        let next = (from..self.steps.len()).find(|i| self.steps[*i].state != StepState::Started);
        let Some(step) = next else {
            self.phase = Phase::Idle;
            self.events.push_back(match goal {
                Goal::Command => GroupEvent::Started,
                Goal::Recovery { failed } => GroupEvent::Recovered { step: self.steps[failed].name.clone() },
            });
            return;
        };
        let s = &mut self.steps[step];
        s.state = StepState::Starting;
        s.maybe_running = true;
        s.monitor = None;
        let op = self.issue(now_ms, step, Op::Start);
        self.phase = Phase::ExpectStarted { step, op, goal };
    }

    /// Stops, highest first, every step from `down_to` up that may run.
    fn begin_stop(&mut self, now_ms: u64, down_to: usize, then: Then) {
        let next = (down_to..self.steps.len()).rev().find(|i| self.steps[*i].maybe_running);
        let Some(step) = next else {
            self.phase = Phase::Idle;
            self.finish_stop(now_ms, then);
            return;
        };
        let s = &mut self.steps[step];
        s.state = StepState::Stopping;
        s.monitor = None;
        let op = self.issue(now_ms, step, Op::Stop);
        self.phase = Phase::ExpectStopped { step, op, down_to, then };
    }

    fn finish_stop(&mut self, now_ms: u64, then: Then) {
        let want = self.want.take();
        let then = match (then, want) {
            (Then::ReportStartFailed { step, why }, _) => {
                self.steps[step].state = StepState::Failed;
                self.events.push_back(GroupEvent::StartFailed { step: self.steps[step].name.clone(), why });
                None
            }
            (Then::ReportFailed { step, why }, _) => {
                self.steps[step].state = StepState::Failed;
                self.events.push_back(GroupEvent::Failed { step: self.steps[step].name.clone(), why });
                None
            }
            (Then::Stopped, _) => {
                // A new life: restarts are counted again from zero.
                for s in &mut self.steps {
                    s.restarts = 0;
                }
                self.events.push_back(GroupEvent::Stopped);
                None
            }
            // A command given during a restart replaces it.
            (then @ Then::StartFrom(..), None) => Some(then),
            (Then::StartFrom(..), Some(_)) => None,
        };
        match (then, want) {
            (_, Some(command)) => self.run_command(now_ms, command),
            (Some(Then::StartFrom(from, goal)), None) => self.begin_start(now_ms, from, goal),
            _ => {}
        }
    }

    fn start_result(&mut self, now_ms: u64, step: usize, goal: Goal, outcome: Outcome) {
        let s = &mut self.steps[step];
        if outcome == Outcome::Ok {
            s.state = StepState::Started;
            // Status shows what is wrong now: a step that runs again has
            // no error (the event stream and the log keep the old one).
            s.last_error = None;
            s.next_monitor_ms = now_ms + s.timing.monitor_interval_ms;
            match self.want.take() {
                Some(Command::Stop) => self.begin_stop(now_ms, 0, Then::Stopped),
                Some(Command::Restart) => self.begin_stop(now_ms, 0, Then::StartFrom(0, Goal::Command)),
                Some(Command::Start) | None => self.begin_start(now_ms, step + 1, goal),
            }
            return;
        }
        let why = format!("start: {}", outcome.why());
        tracing::warn!(step = %s.name, %why, "start failed");
        s.state = StepState::Failed;
        s.last_error = Some(why.clone());
        // The failed step may be half up: it is stopped too.
        match goal {
            Goal::Command => self.begin_stop(now_ms, 0, Then::ReportStartFailed { step, why }),
            Goal::Recovery { .. } => self.begin_stop(now_ms, step, Then::ReportFailed { step, why }),
        }
    }

    fn stop_result(&mut self, now_ms: u64, step: usize, down_to: usize, then: Then, outcome: Outcome) {
        let s = &mut self.steps[step];
        match outcome {
            Outcome::Ok | Outcome::NotRunning => {
                s.state = StepState::Stopped;
                s.maybe_running = false;
                self.begin_stop(now_ms, down_to, then);
            }
            Outcome::Failed(_) | Outcome::TimedOut => {
                let why = format!("stop: {}", outcome.why());
                tracing::error!(step = %s.name, %why, "stop failed; the group is blocked");
                s.state = StepState::Failed;
                s.last_error = Some(why.clone());
                self.want = None;
                self.pending_failure = None;
                self.phase = Phase::Blocked { step, why: why.clone() };
                self.events.push_back(GroupEvent::StopFailed { step: self.steps[step].name.clone(), why });
            }
        }
    }

    fn monitor_result(&mut self, now_ms: u64, step: usize, outcome: Outcome) {
        let s = &mut self.steps[step];
        if s.state != StepState::Started {
            return;
        }
        if outcome == Outcome::Ok {
            s.next_monitor_ms = now_ms + s.timing.monitor_interval_ms;
            return;
        }
        let why = format!("monitor: {}", outcome.why());
        tracing::warn!(step = %s.name, %why, "monitor failed");
        s.state = StepState::Failed;
        s.last_error = Some(why.clone());
        if self.pending_failure.as_ref().is_none_or(|(p, _)| step < *p) {
            self.pending_failure = Some((step, why));
        }
    }

    /// Acts on a monitor failure once no start or stop is in flight.
    fn settle(&mut self, now_ms: u64) {
        if self.phase != Phase::Idle {
            return;
        }
        if let Some((step, why)) = self.pending_failure.take() {
            let s = &mut self.steps[step];
            // A stop since then dealt with it.
            if s.maybe_running && s.state == StepState::Failed {
                if s.restarts < s.timing.restarts_max {
                    s.restarts += 1;
                    tracing::info!(step = %s.name, restart = s.restarts, "restarting the step and the ones after it");
                    self.begin_stop(now_ms, step, Then::StartFrom(step, Goal::Recovery { failed: step }));
                } else {
                    tracing::warn!(step = %s.name, "restarts exhausted; the group failed here");
                    self.begin_stop(now_ms, step, Then::ReportFailed { step, why });
                }
            }
        }
        if self.phase == Phase::Idle {
            // Invariant: at rest, the steps that may run are a prefix and
            // none is in transition.
            let first_down = self.steps.iter().position(|s| !s.maybe_running).unwrap_or(self.steps.len());
            assert!(self.steps[first_down..].iter().all(|s| !s.maybe_running), "running steps are not a prefix");
            assert!(self.steps.iter().all(|s| !matches!(s.state, StepState::Starting | StepState::Stopping)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::config::StepKind;

    fn spec(names: &[&str], restarts_max: u32) -> Vec<StepSpec> {
        names
            .iter()
            .map(|n| StepSpec {
                name: (*n).into(),
                kind: StepKind::Systemd { unit: format!("{n}.service") },
                timing: StepTiming {
                    monitor_interval_ms: 1000,
                    start_timeout_ms: 5000,
                    stop_timeout_ms: 4000,
                    monitor_timeout_ms: 3000,
                    restarts_max,
                },
            })
            .collect()
    }

    struct H {
        r: GroupRunner,
        now: u64,
        names: Vec<String>,
    }

    impl H {
        fn new(names: &[&str], restarts_max: u32) -> H {
            H {
                r: GroupRunner::new(&spec(names, restarts_max)),
                now: 1000,
                names: names.iter().map(|n| n.to_string()).collect(),
            }
        }
        fn runs(&mut self) -> Vec<Run> {
            std::iter::from_fn(|| self.r.poll_action()).collect()
        }
        fn events(&mut self) -> Vec<GroupEvent> {
            std::iter::from_fn(|| self.r.poll_event()).collect()
        }
        /// The one operation issued now, which must be `op` on `step`.
        fn expect(&mut self, step: &str, op: Op) -> OpId {
            let runs = self.runs();
            assert_eq!(runs.len(), 1, "expected one {op:?} of {step}, got {runs:?}");
            assert_eq!((self.names[runs[0].step].as_str(), runs[0].op), (step, op), "{runs:?}");
            runs[0].id
        }
        fn answer(&mut self, id: OpId, outcome: Outcome) {
            self.r.handle_result(self.now, id, outcome);
        }
        /// Runs `op` on each step in `order`, answering Ok.
        fn sequence(&mut self, order: &[&str], op: Op) {
            for step in order {
                let id = self.expect(step, op);
                self.answer(id, Outcome::Ok);
            }
        }
        fn state(&self, step: usize) -> StepState {
            self.r.status()[step].state
        }
        /// Advances to the next timeout and returns what it issued.
        fn tick(&mut self) -> Vec<Run> {
            self.now = self.r.poll_timeout().expect("a timeout is armed");
            self.r.handle_timeout(self.now);
            self.runs()
        }
        fn start_all(&mut self) {
            self.r.start(self.now);
            let names: Vec<String> = self.names.clone();
            let order: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            self.sequence(&order, Op::Start);
            assert_eq!(self.events(), vec![GroupEvent::Started]);
        }
    }

    fn failed(step: &str, why: &str) -> GroupEvent {
        GroupEvent::Failed { step: step.into(), why: why.into() }
    }

    #[test]
    fn starts_in_order_and_stops_in_reverse() {
        let mut h = H::new(&["disk", "fs", "ip", "mta"], 1);
        h.r.start(h.now);
        // Only one start at a time: fs waits for disk.
        let id = h.expect("disk", Op::Start);
        assert_eq!(h.state(0), StepState::Starting);
        assert_eq!(h.r.summary(), "starting");
        h.answer(id, Outcome::Ok);
        h.sequence(&["fs", "ip", "mta"], Op::Start);
        assert_eq!(h.events(), vec![GroupEvent::Started]);
        assert_eq!(h.r.summary(), "started");
        assert!(h.r.status().iter().all(|s| s.state == StepState::Started));
        h.r.stop(h.now);
        let id = h.expect("mta", Op::Stop);
        // A stop of a resource that is not running counts as stopped.
        h.answer(id, Outcome::NotRunning);
        h.sequence(&["ip", "fs", "disk"], Op::Stop);
        assert_eq!(h.events(), vec![GroupEvent::Stopped]);
        assert_eq!(h.r.summary(), "stopped");
        assert_eq!(h.r.poll_timeout(), None, "nothing to monitor once stopped");
    }

    #[test]
    fn start_and_stop_are_idempotent() {
        let mut h = H::new(&["a", "b"], 1);
        h.r.stop(h.now);
        assert!(h.runs().is_empty());
        assert_eq!(h.events(), vec![GroupEvent::Stopped]);
        h.start_all();
        h.r.start(h.now);
        assert!(h.runs().is_empty());
        assert_eq!(h.events(), vec![GroupEvent::Started]);
        let mut empty = H::new(&[], 1);
        empty.r.start(0);
        assert_eq!(empty.events(), vec![GroupEvent::Started]);
    }

    #[test]
    fn failed_start_stops_what_started_in_reverse() {
        let mut h = H::new(&["disk", "fs", "ip", "mta"], 1);
        h.r.start(h.now);
        h.sequence(&["disk", "fs"], Op::Start);
        let id = h.expect("ip", Op::Start);
        h.answer(id, Outcome::Failed("exit code 1: RTNETLINK answers: File exists".into()));
        // The failed step itself is stopped first: it may be half up.
        h.sequence(&["ip", "fs", "disk"], Op::Stop);
        let events = h.events();
        assert_eq!(events.len(), 1);
        assert!(
            matches!(&events[0], GroupEvent::StartFailed { step, why } if step == "ip" && why.contains("File exists")),
            "{events:?}"
        );
        assert_eq!(h.state(2), StepState::Failed);
        assert_eq!(h.state(3), StepState::Stopped, "mta never started");
        assert!(h.r.status()[2].last_error.as_deref().is_some_and(|e| e.contains("start:")));
        // Nothing is monitored after the rollback.
        assert_eq!(h.r.poll_timeout(), None);
        // Started again, the step shows no error (issue 23: status kept it).
        h.r.start(h.now);
        h.sequence(&["disk", "fs", "ip", "mta"], Op::Start);
        assert_eq!(h.events(), vec![GroupEvent::Started]);
        assert!(h.r.status().iter().all(|s| s.last_error.is_none()), "{:?}", h.r.status());
    }

    #[test]
    fn start_timeout_counts_as_failure() {
        let mut h = H::new(&["a", "b"], 1);
        h.r.start(h.now);
        h.sequence(&["a"], Op::Start);
        let id = h.expect("b", Op::Start);
        // The shell never answers: the core gives up after timeout + grace
        // (meanwhile a is monitored).
        let give_up = h.now + 5000 + OP_GRACE_MS;
        let stop = loop {
            let runs = h.tick();
            assert!(h.now <= give_up);
            let (monitors, others): (Vec<Run>, Vec<Run>) = runs.into_iter().partition(|r| r.op == Op::Monitor);
            for m in monitors {
                h.answer(m.id, Outcome::Ok);
            }
            if let Some(r) = others.first() {
                break r.clone();
            }
        };
        assert_eq!(h.now, give_up);
        assert_eq!((stop.step, stop.op), (1, Op::Stop));
        h.answer(stop.id, Outcome::Ok);
        h.sequence(&["a"], Op::Stop);
        assert!(
            matches!(&h.events()[..], [GroupEvent::StartFailed { step, why }] if step == "b" && why.contains("timed out"))
        );
        // The late answer is ignored.
        h.answer(id, Outcome::Ok);
        assert!(h.runs().is_empty() && h.events().is_empty());
        assert_eq!(h.state(1), StepState::Failed);
    }

    #[test]
    fn monitors_run_at_their_interval_for_started_steps_only() {
        let mut h = H::new(&["a", "b", "c"], 1);
        h.r.start(h.now);
        h.sequence(&["a"], Op::Start);
        let start_b = h.expect("b", Op::Start);
        // a is monitored while b starts; b and c are not.
        let t0 = h.now;
        assert_eq!(h.r.poll_timeout(), Some(t0 + 1000));
        let runs = h.tick();
        assert_eq!(runs.iter().map(|r| (r.step, r.op)).collect::<Vec<_>>(), vec![(0, Op::Monitor)]);
        assert_eq!(runs[0].timeout_ms, 3000);
        h.answer(runs[0].id, Outcome::Ok);
        h.answer(start_b, Outcome::Ok);
        h.sequence(&["c"], Op::Start);
        h.events();
        // Next: a at now+1000, b and c at their start time + 1000.
        assert_eq!(h.r.poll_timeout(), Some(h.now + 1000));
        let runs = h.tick();
        assert_eq!(runs.len(), 3, "{runs:?}");
        for r in runs {
            h.answer(r.id, Outcome::Ok);
        }
        h.events();
        assert!(h.events().is_empty());
        // Once the group stops, no monitor is issued any more.
        h.r.stop(h.now);
        h.sequence(&["c", "b", "a"], Op::Stop);
        assert_eq!(h.r.poll_timeout(), None);
    }

    #[test]
    fn failed_monitor_restarts_the_step_and_the_later_ones() {
        let mut h = H::new(&["disk", "fs", "ip", "mta"], 1);
        h.start_all();
        let runs = h.tick();
        assert_eq!(runs.len(), 4);
        let fs_monitor = runs.iter().find(|r| r.step == 1).unwrap().id;
        for r in &runs {
            if r.step != 1 {
                h.answer(r.id, Outcome::Ok);
            }
        }
        h.answer(fs_monitor, Outcome::NotRunning);
        assert_eq!(h.state(1), StepState::Failed);
        assert_eq!(h.state(3), StepState::Stopping, "mta stops first");
        h.sequence(&["mta", "ip", "fs"], Op::Stop);
        h.sequence(&["fs", "ip", "mta"], Op::Start);
        assert_eq!(h.events(), vec![GroupEvent::Recovered { step: "fs".into() }]);
        assert_eq!(h.state(0), StepState::Started, "disk untouched");
        // Status shows the restart count; the error is gone once it runs
        // again (the event stream and the log keep it).
        assert_eq!(h.r.status()[1].restarts, 1);
        assert_eq!(h.r.status()[1].last_error, None);
        assert_eq!(h.r.summary(), "started");
    }

    #[test]
    fn failures_beyond_restarts_max_escalate() {
        let mut h = H::new(&["disk", "fs", "ip"], 1);
        h.start_all();
        for round in 0..2 {
            let runs = h.tick();
            let mut ip_id = None;
            for r in &runs {
                if r.step == 2 {
                    ip_id = Some(r.id);
                } else {
                    h.answer(r.id, Outcome::Ok);
                }
            }
            // A monitor that times out fails like any other.
            if round == 0 {
                h.answer(ip_id.unwrap(), Outcome::TimedOut);
                h.sequence(&["ip"], Op::Stop);
                h.sequence(&["ip"], Op::Start);
                assert_eq!(h.events(), vec![GroupEvent::Recovered { step: "ip".into() }]);
            } else {
                h.answer(ip_id.unwrap(), Outcome::Failed("address gone".into()));
                h.sequence(&["ip"], Op::Stop);
                assert_eq!(h.events(), vec![failed("ip", "monitor: address gone")]);
            }
        }
        assert_eq!(h.state(2), StepState::Failed);
        assert_eq!(h.r.summary(), "partial");
        // disk and fs are still monitored; the failed step is not.
        let runs = h.tick();
        assert_eq!(runs.iter().map(|r| r.step).collect::<Vec<_>>(), vec![0, 1]);
        for r in runs {
            h.answer(r.id, Outcome::Ok);
        }
        // The daemon stops the group (it moves); then the count starts over.
        h.r.stop(h.now);
        h.sequence(&["fs", "disk"], Op::Stop);
        assert_eq!(h.events(), vec![GroupEvent::Stopped]);
        assert_eq!(h.r.status()[2].restarts, 0);
    }

    #[test]
    fn monitor_timeout_without_answer_is_a_failure() {
        let mut h = H::new(&["a"], 0);
        h.start_all();
        let runs = h.tick();
        assert_eq!(runs.len(), 1);
        // The shell never answers the monitor: after timeout + grace it failed.
        assert_eq!(h.r.poll_timeout(), Some(h.now + 3000 + OP_GRACE_MS));
        let runs = h.tick();
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].step, runs[0].op), (0, Op::Stop));
        h.answer(runs[0].id, Outcome::Ok);
        assert_eq!(h.events(), vec![failed("a", "monitor: timed out")]);
    }

    #[test]
    fn failed_restart_reports_failed() {
        let mut h = H::new(&["a", "b", "c"], 2);
        h.start_all();
        let runs = h.tick();
        for r in &runs {
            h.answer(r.id, if r.step == 1 { Outcome::NotRunning } else { Outcome::Ok });
        }
        h.sequence(&["c", "b"], Op::Stop);
        let id = h.expect("b", Op::Start);
        h.answer(id, Outcome::Failed("exit code 1".into()));
        h.sequence(&["b"], Op::Stop);
        assert_eq!(h.events(), vec![failed("b", "start: exit code 1")]);
        assert_eq!([h.state(0), h.state(1), h.state(2)], [StepState::Started, StepState::Failed, StepState::Stopped]);
    }

    #[test]
    fn stop_while_starting_waits_for_the_running_start() {
        let mut h = H::new(&["a", "b", "c"], 1);
        h.r.start(h.now);
        h.sequence(&["a"], Op::Start);
        let id = h.expect("b", Op::Start);
        h.r.stop(h.now);
        assert!(h.runs().is_empty(), "no stop while b's start runs");
        h.answer(id, Outcome::Ok);
        // c never starts; b and a stop.
        h.sequence(&["b", "a"], Op::Stop);
        assert_eq!(h.events(), vec![GroupEvent::Stopped]);
        assert_eq!(h.state(2), StepState::Stopped);

        // The same when the running start fails: both events, in order.
        h.r.start(h.now);
        let id = h.expect("a", Op::Start);
        h.r.stop(h.now);
        h.answer(id, Outcome::Failed("boom".into()));
        h.sequence(&["a"], Op::Stop);
        let events = h.events();
        assert!(matches!(&events[..], [GroupEvent::StartFailed { .. }, GroupEvent::Stopped]), "{events:?}");
    }

    #[test]
    fn start_while_stopping_starts_after_the_stop() {
        let mut h = H::new(&["a", "b"], 1);
        h.start_all();
        h.r.stop(h.now);
        let id = h.expect("b", Op::Stop);
        h.r.start(h.now);
        h.answer(id, Outcome::Ok);
        h.sequence(&["a"], Op::Stop);
        h.sequence(&["a", "b"], Op::Start);
        assert_eq!(h.events(), vec![GroupEvent::Stopped, GroupEvent::Started]);
    }

    #[test]
    fn restart_stops_all_then_starts_all() {
        let mut h = H::new(&["a", "b"], 1);
        h.start_all();
        h.r.restart(h.now);
        h.sequence(&["b", "a"], Op::Stop);
        h.sequence(&["a", "b"], Op::Start);
        assert_eq!(h.events(), vec![GroupEvent::Started]);
        // A stop given during a restart wins over it.
        h.r.restart(h.now);
        let id = h.expect("b", Op::Stop);
        h.r.stop(h.now);
        h.answer(id, Outcome::Ok);
        h.sequence(&["a"], Op::Stop);
        assert!(h.runs().is_empty());
        assert_eq!(h.events(), vec![GroupEvent::Stopped]);
    }

    #[test]
    fn failed_stop_blocks_the_group_until_stop_is_retried() {
        let mut h = H::new(&["disk", "fs", "mta"], 1);
        h.start_all();
        h.r.stop(h.now);
        h.sequence(&["mta"], Op::Stop);
        let id = h.expect("fs", Op::Stop);
        h.answer(id, Outcome::Failed("umount: target is busy".into()));
        // disk is not detached under a mounted filesystem.
        assert!(h.runs().is_empty());
        assert!(
            matches!(&h.events()[..], [GroupEvent::StopFailed { step, why }] if step == "fs" && why.contains("busy"))
        );
        assert_eq!(h.r.summary(), "blocked");
        h.r.start(h.now);
        assert!(h.runs().is_empty());
        assert!(matches!(&h.events()[..], [GroupEvent::StartFailed { step, .. }] if step == "fs"));
        // Nothing is monitored while blocked.
        assert_eq!(h.r.poll_timeout(), None);
        h.r.stop(h.now);
        h.sequence(&["fs", "disk"], Op::Stop);
        assert_eq!(h.events(), vec![GroupEvent::Stopped]);

        // A stop timeout blocks the same way.
        let mut h = H::new(&["a"], 1);
        h.start_all();
        h.r.stop(h.now);
        h.expect("a", Op::Stop);
        h.tick();
        assert!(matches!(&h.events()[..], [GroupEvent::StopFailed { why, .. }] if why.contains("timed out")));
    }

    #[test]
    fn monitor_failure_during_a_start_waits_for_it() {
        let mut h = H::new(&["a", "b"], 1);
        h.r.start(h.now);
        h.sequence(&["a"], Op::Start);
        let start_b = h.expect("b", Op::Start);
        let runs = h.tick();
        assert_eq!(runs.len(), 1);
        h.answer(runs[0].id, Outcome::NotRunning);
        assert!(h.runs().is_empty(), "the restart waits for b's start");
        h.answer(start_b, Outcome::Ok);
        // The group came up, then a restarts with b.
        h.sequence(&["b", "a"], Op::Stop);
        h.sequence(&["a", "b"], Op::Start);
        assert_eq!(h.events(), vec![GroupEvent::Started, GroupEvent::Recovered { step: "a".into() }]);
    }

    #[test]
    fn stale_monitor_answers_are_ignored() {
        let mut h = H::new(&["a"], 1);
        h.start_all();
        let runs = h.tick();
        h.r.stop(h.now);
        h.sequence(&["a"], Op::Stop);
        h.start_all_again();
        // The monitor issued before the stop answers late: ignored.
        h.answer(runs[0].id, Outcome::NotRunning);
        assert!(h.runs().is_empty());
        assert!(h.events().is_empty());
        assert_eq!(h.state(0), StepState::Started);
    }

    impl H {
        fn start_all_again(&mut self) {
            assert_eq!(self.events(), vec![GroupEvent::Stopped]);
            self.start_all();
        }
    }

    #[test]
    fn unknown_state_after_a_daemon_restart_stops_everything() {
        let mut r = GroupRunner::new_unknown(&spec(&["a", "b"], 1));
        r.stop(0);
        let run = r.poll_action().unwrap();
        assert_eq!((run.step, run.op), (1, Op::Stop));
        r.handle_result(1, run.id, Outcome::NotRunning);
        let run = r.poll_action().unwrap();
        assert_eq!((run.step, run.op), (0, Op::Stop));
        r.handle_result(2, run.id, Outcome::Ok);
        assert_eq!(r.poll_event(), Some(GroupEvent::Stopped));
    }

    #[test]
    fn cleanup_forgets_restarts_and_errors() {
        let mut h = H::new(&["a"], 1);
        h.start_all();
        let runs = h.tick();
        h.answer(runs[0].id, Outcome::NotRunning);
        h.sequence(&["a"], Op::Stop);
        h.sequence(&["a"], Op::Start);
        assert_eq!(h.r.status()[0].restarts, 1);
        h.r.cleanup();
        assert_eq!(h.r.status()[0].restarts, 0);
        assert_eq!(h.r.status()[0].last_error, None);
    }
}
