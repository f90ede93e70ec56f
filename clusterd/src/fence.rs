//! Fencing through agents of the fence-agents project (fence_ipmilan,
//! fence_virsh, …): `FenceAgent` (one device), `agent_stdin` (the
//! `key=value` lines an agent reads on stdin), `interpret` (exit code →
//! `FenceOutcome`), `FencePlan` (levels: every device of level 1, else every
//! device of level 2, …) and `run_agent`, the one function that spawns a
//! process. Each agent runs in its own process group, killed as a whole on
//! timeout, so what it started (ipmitool, ssh) does not outlive it (issue
//! 19).
//!
//! The plan is sans-IO: it hands out `FenceRequest`s and consumes outcomes,
//! so the failover core and the simulation use it without processes.
//! Exit codes follow the fence-agents API: 0 success; for `status`, 0 = on
//! and 2 = off; anything else, a signal, a spawn error or a timeout is a
//! failure.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Devices per level and levels per node (bounds the plan).
pub const DEVICES_PER_LEVEL_MAX: usize = 8;
pub const LEVELS_MAX: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceAction {
    Off,
    On,
    Reboot,
    Status,
    Monitor,
}

impl FenceAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceAction::Off => "off",
            FenceAction::On => "on",
            FenceAction::Reboot => "reboot",
            FenceAction::Status => "status",
            FenceAction::Monitor => "monitor",
        }
    }
}

/// One fence device: an agent executable and its arguments (`ipaddr`,
/// `login`, `plug`, …), without `action`, which the plan supplies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceAgent {
    pub name: String,
    pub path: PathBuf,
    pub args: Vec<(String, String)>,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error("fence device {device}: argument key {key:?} must be lower-case letters, digits or '_'")]
    BadKey { device: String, key: String },
    #[error("fence device {device}: the value of {key} contains a line break or NUL")]
    BadValue { device: String, key: String },
    #[error("fence device {device}: `action` is chosen by clusterd; remove it from the arguments")]
    ActionInArgs { device: String },
    #[error("fencing of {node}: {levels} levels or a level of more than {DEVICES_PER_LEVEL_MAX} devices (max {LEVELS_MAX} levels); shorten the topology")]
    TooLarge { node: String, levels: usize },
    #[error("fencing of {node}: a level has no device")]
    EmptyLevel { node: String },
}

/// The stdin of one agent run: `action=…`, `nodename=<target>`, then the
/// device's arguments, one `key=value` per line.
pub fn agent_stdin(agent: &FenceAgent, action: FenceAction, target: &str) -> Result<String, FenceError> {
    let mut out = format!("action={}\n", action.as_str());
    let mut push = |key: &str, value: &str| -> Result<(), FenceError> {
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return Err(FenceError::BadKey { device: agent.name.clone(), key: key.to_owned() });
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(FenceError::BadValue { device: agent.name.clone(), key: key.to_owned() });
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
        out.push('\n');
        Ok(())
    };
    push("nodename", target)?;
    for (k, v) in &agent.args {
        if k == "action" {
            return Err(FenceError::ActionInArgs { device: agent.name.clone() });
        }
        push(k, v)?;
    }
    Ok(out)
}

/// How an agent run ended, as the process layer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentExit {
    Code(i32),
    Signaled,
    TimedOut,
    SpawnFailed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceOutcome {
    Done,
    /// `status`: the target is powered on.
    PoweredOn,
    /// `status`: the target is powered off.
    PoweredOff,
    Failed(String),
}

pub fn interpret(action: FenceAction, exit: &AgentExit) -> FenceOutcome {
    match (action, exit) {
        (FenceAction::Status, AgentExit::Code(0)) => FenceOutcome::PoweredOn,
        (FenceAction::Status, AgentExit::Code(2)) => FenceOutcome::PoweredOff,
        (_, AgentExit::Code(0)) => FenceOutcome::Done,
        (_, AgentExit::Code(c)) => FenceOutcome::Failed(format!("exit code {c}")),
        (_, AgentExit::Signaled) => FenceOutcome::Failed("killed by a signal".into()),
        (_, AgentExit::TimedOut) => FenceOutcome::Failed("timed out".into()),
        (_, AgentExit::SpawnFailed(e)) => FenceOutcome::Failed(format!("could not start: {e}")),
    }
}

/// One agent run the shell must perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceRequest {
    pub level: usize,
    pub device: usize,
    pub agent: FenceAgent,
    pub stdin: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceProgress {
    /// Run `next_request()`.
    Continue,
    Fenced,
    /// Every level failed; the reasons, one per failed level.
    Failed(Vec<String>),
}

/// Fencing one node with `action` through levels of devices: a level
/// succeeds when all its devices succeed (in order); a failed device ends
/// its level and the next level starts.
#[derive(Debug)]
pub struct FencePlan {
    target: String,
    action: FenceAction,
    levels: Vec<Vec<FenceAgent>>,
    level: usize,
    device: usize,
    errors: Vec<String>,
}

impl FencePlan {
    pub fn new(target: &str, action: FenceAction, levels: Vec<Vec<FenceAgent>>) -> Result<FencePlan, FenceError> {
        if levels.len() > LEVELS_MAX || levels.iter().any(|l| l.len() > DEVICES_PER_LEVEL_MAX) {
            return Err(FenceError::TooLarge { node: target.to_owned(), levels: levels.len() });
        }
        if levels.iter().any(|l| l.is_empty()) {
            return Err(FenceError::EmptyLevel { node: target.to_owned() });
        }
        for agent in levels.iter().flatten() {
            agent_stdin(agent, action, target)?;
        }
        Ok(FencePlan { target: target.to_owned(), action, levels, level: 0, device: 0, errors: Vec::new() })
    }

    /// The next agent to run, or None when the plan is over.
    pub fn next_request(&self) -> Option<FenceRequest> {
        let agent = self.levels.get(self.level)?.get(self.device)?.clone();
        let stdin = agent_stdin(&agent, self.action, &self.target).expect("checked in FencePlan::new");
        Some(FenceRequest { level: self.level, device: self.device, agent, stdin })
    }

    /// The exit of the request last returned by `next_request`.
    pub fn handle_exit(&mut self, exit: &AgentExit) -> FenceProgress {
        assert!(self.level < self.levels.len(), "no request outstanding");
        let name = &self.levels[self.level][self.device].name;
        match interpret(self.action, exit) {
            FenceOutcome::Done | FenceOutcome::PoweredOff => {
                self.device += 1;
                if self.device == self.levels[self.level].len() {
                    tracing::info!(target = %self.target, level = self.level + 1, "fenced");
                    self.level = self.levels.len();
                    return FenceProgress::Fenced;
                }
                FenceProgress::Continue
            }
            FenceOutcome::PoweredOn | FenceOutcome::Failed(_) => {
                let why = match interpret(self.action, exit) {
                    FenceOutcome::Failed(why) => why,
                    _ => "target still powered on".into(),
                };
                tracing::warn!(target = %self.target, level = self.level + 1, device = %name, %why, "fence level failed");
                self.errors.push(format!("level {} device {name}: {why}", self.level + 1));
                self.level += 1;
                self.device = 0;
                if self.level == self.levels.len() {
                    FenceProgress::Failed(self.errors.clone())
                } else {
                    FenceProgress::Continue
                }
            }
        }
    }
}

/// Runs one agent: writes `request.stdin`, waits up to its timeout (then
/// kills it: a timeout is a failure). Blocking; call from a blocking task.
pub fn run_agent(request: &FenceRequest) -> AgentExit {
    // Its own process group: a timeout kills the agent and its children.
    let mut child = match Command::new(&request.agent.path)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return AgentExit::SpawnFailed(format!("{}: {e}", request.agent.path.display())),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // An agent that exits without reading is judged by its exit code.
        let _ = stdin.write_all(request.stdin.as_bytes());
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(());
        status
    });
    let finished = rx.recv_timeout(Duration::from_millis(request.agent.timeout_ms)).is_ok();
    if !finished {
        tracing::warn!(agent = %request.agent.name, pid, "fence agent timed out; killing its process group");
        // The child is owned by the waiter thread; signal its group, whose
        // id is its pid. It has not been reaped (the waiter has not
        // returned), so the group id is still ours.
        if let Ok(raw) = i32::try_from(pid) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(raw), nix::sys::signal::Signal::SIGKILL);
        }
    }
    let status = match waiter.join() {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return AgentExit::SpawnFailed(e.to_string()),
        Err(_) => return AgentExit::SpawnFailed("waiter thread panicked".into()),
    };
    if !finished {
        return AgentExit::TimedOut;
    }
    match status.code() {
        Some(c) => AgentExit::Code(c),
        None => AgentExit::Signaled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn agent(name: &str, path: &str) -> FenceAgent {
        FenceAgent {
            name: name.into(),
            path: path.into(),
            args: vec![("ipaddr".into(), "10.0.0.9".into()), ("plug".into(), "vm-a".into())],
            timeout_ms: 5000,
        }
    }

    #[test]
    fn stdin_is_action_nodename_then_arguments() {
        let s = agent_stdin(&agent("ipmi", "/x"), FenceAction::Off, "node-a").unwrap();
        assert_eq!(s, "action=off\nnodename=node-a\nipaddr=10.0.0.9\nplug=vm-a\n");
    }

    #[test]
    fn stdin_refuses_injection() {
        let mut a = agent("ipmi", "/x");
        a.args.push(("passwd".into(), "x\naction=on".into()));
        assert_eq!(
            agent_stdin(&a, FenceAction::Off, "n"),
            Err(FenceError::BadValue { device: "ipmi".into(), key: "passwd".into() })
        );
        let mut a = agent("ipmi", "/x");
        a.args.push(("action".into(), "on".into()));
        assert!(matches!(agent_stdin(&a, FenceAction::Off, "n"), Err(FenceError::ActionInArgs { .. })));
        assert!(matches!(agent_stdin(&agent("i", "/x"), FenceAction::Off, "a\nb"), Err(FenceError::BadValue { .. })));
        let mut a = agent("ipmi", "/x");
        a.args.push(("Bad Key".into(), "v".into()));
        assert!(matches!(agent_stdin(&a, FenceAction::Off, "n"), Err(FenceError::BadKey { .. })));
    }

    #[test]
    fn exit_codes_follow_the_fence_agents_api() {
        assert_eq!(interpret(FenceAction::Off, &AgentExit::Code(0)), FenceOutcome::Done);
        assert!(matches!(interpret(FenceAction::Off, &AgentExit::Code(1)), FenceOutcome::Failed(_)));
        assert_eq!(interpret(FenceAction::Status, &AgentExit::Code(0)), FenceOutcome::PoweredOn);
        assert_eq!(interpret(FenceAction::Status, &AgentExit::Code(2)), FenceOutcome::PoweredOff);
        assert!(matches!(interpret(FenceAction::Off, &AgentExit::TimedOut), FenceOutcome::Failed(_)));
        assert!(matches!(interpret(FenceAction::Reboot, &AgentExit::Signaled), FenceOutcome::Failed(_)));
    }

    #[test]
    fn levels_fall_through_in_order() {
        let levels = vec![vec![agent("ipmi", "/a"), agent("pdu", "/b")], vec![agent("virsh", "/c")]];
        let mut plan = FencePlan::new("node-a", FenceAction::Off, levels.clone()).unwrap();
        assert_eq!(plan.next_request().unwrap().agent.name, "ipmi");
        assert_eq!(plan.handle_exit(&AgentExit::Code(0)), FenceProgress::Continue);
        assert_eq!(plan.next_request().unwrap().agent.name, "pdu");
        // The second device of level 1 fails: level 2 starts.
        assert_eq!(plan.handle_exit(&AgentExit::TimedOut), FenceProgress::Continue);
        let r = plan.next_request().unwrap();
        assert_eq!((r.level, r.agent.name.as_str()), (1, "virsh"));
        assert_eq!(plan.handle_exit(&AgentExit::Code(0)), FenceProgress::Fenced);
        assert_eq!(plan.next_request(), None);

        let mut plan = FencePlan::new("node-a", FenceAction::Off, levels).unwrap();
        assert_eq!(plan.handle_exit(&AgentExit::Code(1)), FenceProgress::Continue);
        match plan.handle_exit(&AgentExit::SpawnFailed("nope".into())) {
            FenceProgress::Failed(errors) => assert_eq!(errors.len(), 2),
            other => panic!("expected failure, got {other:?}"),
        }
        assert!(matches!(FencePlan::new("n", FenceAction::Off, vec![vec![]]), Err(FenceError::EmptyLevel { .. })));
    }

    fn script(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn run_agent_passes_stdin_and_reports_exit_and_timeout() {
        let dir = std::env::temp_dir().join(format!("clusterd-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seen = dir.join("seen");
        // Succeeds only when it read action=off for node-a.
        let ok = script(
            &dir,
            "fence_ok",
            &format!("cat > {0}; grep -qx action=off {0} && grep -qx nodename=node-a {0}", seen.display()),
        );
        let mut a = agent("ok", ok.to_str().unwrap());
        let plan = FencePlan::new("node-a", FenceAction::Off, vec![vec![a.clone()]]).unwrap();
        assert_eq!(run_agent(&plan.next_request().unwrap()), AgentExit::Code(0));
        let plan = FencePlan::new("node-b", FenceAction::Off, vec![vec![a.clone()]]).unwrap();
        assert_eq!(run_agent(&plan.next_request().unwrap()), AgentExit::Code(1));

        a.path = script(&dir, "fence_hang", "exec sleep 30");
        a.timeout_ms = 200;
        let plan = FencePlan::new("node-a", FenceAction::Off, vec![vec![a.clone()]]).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(run_agent(&plan.next_request().unwrap()), AgentExit::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(10), "the hung agent was not killed");

        // An agent that started a long-running child (ipmitool, ssh) and
        // hangs: the timeout kills the child too (issue 19).
        let child_pid = dir.join("child.pid");
        a.path = script(&dir, "fence_forks", &format!("sleep 300 & echo $! > {}; exec sleep 30", child_pid.display()));
        let plan = FencePlan::new("node-a", FenceAction::Off, vec![vec![a.clone()]]).unwrap();
        assert_eq!(run_agent(&plan.next_request().unwrap()), AgentExit::TimedOut);
        let pid: i32 = std::fs::read_to_string(&child_pid).unwrap().trim().parse().unwrap();
        // Gone, or a zombie waiting for init to reap it: not running.
        let running = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!running(), "the agent's child {pid} survived the timeout");

        a.path = dir.join("missing");
        let plan = FencePlan::new("node-a", FenceAction::Off, vec![vec![a]]).unwrap();
        assert!(matches!(run_agent(&plan.next_request().unwrap()), AgentExit::SpawnFailed(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
