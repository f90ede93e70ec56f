//! The tokio shell of a resource group: `spawn` starts a task that owns a
//! `GroupRunner`, runs the operations it asks for (through `kinds`), feeds
//! back their outcomes and the timer, and forwards its events. The daemon
//! drives it with a `GroupHandle`.
//!
//! `run_command` is the one place that starts processes: stdin is null,
//! each process leads its own process group, which is killed (SIGKILL) when
//! its deadline passes or when the operation is abandoned, stdout is kept up
//! to a bound and stderr's tail goes into error messages.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::config::{GroupSpec, STEPS_MAX};
use super::kinds;
use super::runner::{GroupEvent, GroupRunner, Op, OpId, Outcome, StepStatus};

/// What a command's stdout may hold (device paths, `ip addr` output).
pub const STDOUT_BYTES_MAX: usize = 64 * 1024;
/// The tail of stderr kept for error messages.
pub const STDERR_TAIL_BYTES: usize = 1024;
/// How long pipes are read after the process exited (a daemon it started
/// may hold them open).
const PIPE_DRAIN_MS: u64 = 200;
/// Requests and events waiting between the daemon and the group task.
const REQUESTS_MAX: usize = 16;
const EVENTS_MAX: usize = 256;

/// One process to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    /// Environment variable names whose values must never be logged.
    pub secret_env: Vec<String>,
}

impl CommandSpec {
    pub fn new(program: impl Into<PathBuf>, args: &[&str]) -> CommandSpec {
        CommandSpec {
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            env: Vec::new(),
            secret_env: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> CommandSpec {
        self.args.push(a.into());
        self
    }

    /// The command line and environment for logs, secrets masked.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.env {
            let v = if self.secret_env.contains(k) { "***" } else { v };
            s.push_str(&format!("{k}={v:?} "));
        }
        s.push_str(&self.program.display().to_string());
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcOutput {
    /// None: killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr_tail: String,
}

impl ProcOutput {
    /// `exit code N: <last line of stderr>` for error messages: one line
    /// (status and events show it as is; the whole tail is in the log).
    pub fn describe(&self) -> String {
        let how = match self.code {
            Some(c) => format!("exit code {c}"),
            None => "killed by a signal".into(),
        };
        let last = last_line(&self.stderr_tail);
        if last.is_empty() {
            how
        } else {
            format!("{how}: {last}")
        }
    }
}

/// Longest error line kept for status and events.
pub const ERROR_LINE_CHARS_MAX: usize = 240;

/// The last non-empty line of `text`, trimmed and cut (at a character
/// boundary) to `ERROR_LINE_CHARS_MAX`: the line a failing command prints
/// last is its error, and what comes before it belongs in the log.
pub fn last_line(text: &str) -> String {
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("");
    one_line(line)
}

/// `text` as one line: line breaks become "; ", cut to
/// `ERROR_LINE_CHARS_MAX` characters.
pub fn one_line(text: &str) -> String {
    let joined = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    match joined.char_indices().nth(ERROR_LINE_CHARS_MAX) {
        Some((cut, _)) => format!("{}…", &joined[..cut]),
        None => joined,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcError {
    #[error("could not start {program}: {why}")]
    Spawn { program: String, why: String },
    #[error("{program} did not finish in time (killed){}", if .stderr_tail.trim().is_empty() { String::new() } else { format!(": {}", last_line(.stderr_tail)) })]
    TimedOut { program: String, stderr_tail: String },
}

impl From<ProcError> for Outcome {
    fn from(e: ProcError) -> Outcome {
        match e {
            ProcError::TimedOut { .. } => Outcome::TimedOut,
            other => Outcome::Failed(other.to_string()),
        }
    }
}

/// Kills a process group when dropped, unless disarmed: an abandoned or
/// timed-out operation leaves nothing behind.
struct GroupKiller(Option<Pid>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH: the group is gone already.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Collects a pipe into `kept` until EOF: the head up to `max` bytes, or
/// with `tail`, the last `max` bytes. Reads to the end so the writer never
/// blocks; the caller takes what is there when it stops waiting.
async fn collect(pipe: Option<impl AsyncRead + Unpin>, kept: Arc<Mutex<Vec<u8>>>, max: usize, tail: bool) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let Ok(mut kept) = kept.lock() else { return };
        if tail {
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > max {
                let excess = kept.len() - max;
                kept.drain(..excess);
            }
        } else {
            let room = max.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
    }
}

/// Waits a little for a collector to reach EOF, then takes what it has.
async fn take(task: tokio::task::JoinHandle<()>, kept: &Arc<Mutex<Vec<u8>>>) -> String {
    let abort = task.abort_handle();
    let _ = tokio::time::timeout(Duration::from_millis(PIPE_DRAIN_MS), task).await;
    abort.abort();
    let bytes = kept.lock().map(|mut k| std::mem::take(&mut *k)).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs `spec` until it exits or `deadline` passes (then its process
/// group is killed and the result is `TimedOut`).
pub async fn run_command(spec: &CommandSpec, deadline: Instant) -> Result<ProcOutput, ProcError> {
    let program = spec.program.display().to_string();
    tracing::debug!(command = %spec.describe(), "running");
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| ProcError::Spawn { program: program.clone(), why: e.to_string() })?;
    let mut killer = GroupKiller(child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw));
    let (out_buf, err_buf) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let stdout = tokio::spawn(collect(child.stdout.take(), out_buf.clone(), STDOUT_BYTES_MAX, false));
    let stderr = tokio::spawn(collect(child.stderr.take(), err_buf.clone(), STDERR_TAIL_BYTES, true));
    let waited = tokio::time::timeout_at(deadline, child.wait()).await;
    let status = match waited {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(ProcError::Spawn { program, why: format!("wait failed: {e}") }),
        Err(_) => {
            killer.kill();
            let _ = child.wait().await;
            let stderr_tail = take(stderr, &err_buf).await;
            stdout.abort();
            tracing::warn!(command = %spec.describe(), "timed out; killed its process group");
            return Err(ProcError::TimedOut { program, stderr_tail });
        }
    };
    // The process exited: what it started in its group (an agent's daemon)
    // stays.
    killer.0 = None;
    let (stdout, stderr_tail) = tokio::join!(take(stdout, &out_buf), take(stderr, &err_buf));
    let out = ProcOutput { code: status.code(), stdout, stderr_tail };
    tracing::debug!(command = %spec.describe(), code = ?out.code, "finished");
    Ok(out)
}

/// Where the shell runs: which node of the replicator resource this is, and
/// where it records what must survive a daemon restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupContext {
    /// This node's name in the replicator resource (`--node`); None: the hostname.
    pub node: Option<String>,
    /// Records of attached devices (`<run_dir>/<group>/<step>.device`).
    pub run_dir: PathBuf,
    /// The steps may be running already (the daemon restarted): the first
    /// `stop` stops every step.
    pub unknown_state: bool,
}

impl GroupContext {
    pub fn new(run_dir: impl Into<PathBuf>) -> GroupContext {
        GroupContext { node: None, run_dir: run_dir.into(), unknown_state: false }
    }
}

/// What the operations of one group share: the spec, the context and the
/// devices attach steps made.
#[derive(Debug)]
pub struct Exec {
    pub spec: GroupSpec,
    pub ctx: GroupContext,
    pub(crate) devices: Mutex<HashMap<usize, PathBuf>>,
}

impl Exec {
    pub fn new(spec: GroupSpec, ctx: GroupContext) -> Exec {
        Exec { spec, ctx, devices: Mutex::new(HashMap::new()) }
    }

    /// Runs one operation of one step within `timeout_ms`.
    pub async fn run(&self, step: usize, op: Op, timeout_ms: u64) -> Outcome {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let name = &self.spec.steps[step].name;
        // The commands kill themselves at the deadline; this bounds the rest
        // (file system calls) and drops (kills) whatever is left.
        let outcome =
            match tokio::time::timeout_at(deadline + Duration::from_millis(100), kinds::run(self, step, op, deadline))
                .await
            {
                Ok(o) => o,
                Err(_) => Outcome::TimedOut,
            };
        match (&outcome, op) {
            (Outcome::Ok, _) | (Outcome::NotRunning, Op::Stop) => {
                tracing::debug!(group = %self.spec.name, step = %name, op = op.as_str(), ?outcome, "done")
            }
            _ => tracing::warn!(group = %self.spec.name, step = %name, op = op.as_str(), ?outcome, "operation failed"),
        }
        outcome
    }
}

/// A group's state for `clusterctl status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupStatus {
    pub name: String,
    /// stopped, starting, started, stopping, partial or blocked.
    pub summary: String,
    pub steps: Vec<StepStatus>,
}

#[derive(Debug)]
enum Request {
    Start,
    Stop,
    Restart,
    Cleanup,
    Status(oneshot::Sender<GroupStatus>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the resource group task has ended")]
pub struct GroupGone;

/// Commands to a running group task. Dropping every handle ends the task
/// (steps stay as they are).
#[derive(Debug, Clone)]
pub struct GroupHandle {
    tx: mpsc::Sender<Request>,
}

impl GroupHandle {
    pub async fn start(&self) -> Result<(), GroupGone> {
        self.tx.send(Request::Start).await.map_err(|_| GroupGone)
    }
    pub async fn stop(&self) -> Result<(), GroupGone> {
        self.tx.send(Request::Stop).await.map_err(|_| GroupGone)
    }
    pub async fn restart(&self) -> Result<(), GroupGone> {
        self.tx.send(Request::Restart).await.map_err(|_| GroupGone)
    }
    /// Forgets restart counts and errors (`clusterctl cleanup`).
    pub async fn cleanup(&self) -> Result<(), GroupGone> {
        self.tx.send(Request::Cleanup).await.map_err(|_| GroupGone)
    }
    pub async fn status(&self) -> Result<GroupStatus, GroupGone> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Request::Status(tx)).await.map_err(|_| GroupGone)?;
        rx.await.map_err(|_| GroupGone)
    }
}

/// Starts the task of one group (inside a tokio runtime). Its events come
/// on the receiver, which must be drained (the task waits when it is full).
pub fn spawn(spec: GroupSpec, ctx: GroupContext) -> (GroupHandle, mpsc::Receiver<GroupEvent>) {
    let (req_tx, req_rx) = mpsc::channel(REQUESTS_MAX);
    let (ev_tx, ev_rx) = mpsc::channel(EVENTS_MAX);
    let runner = if ctx.unknown_state { GroupRunner::new_unknown(&spec.steps) } else { GroupRunner::new(&spec.steps) };
    let exec = Arc::new(Exec::new(spec, ctx));
    kinds::load_devices(&exec);
    tokio::spawn(drive(runner, exec, req_rx, ev_tx));
    (GroupHandle { tx: req_tx }, ev_rx)
}

async fn drive(
    mut runner: GroupRunner,
    exec: Arc<Exec>,
    mut requests: mpsc::Receiver<Request>,
    events: mpsc::Sender<GroupEvent>,
) {
    let epoch = Instant::now();
    let now_ms = || u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
    // At most one start/stop and one monitor per step are in flight.
    let (done_tx, mut done_rx) = mpsc::channel::<(OpId, Outcome)>(2 * STEPS_MAX + 2);
    loop {
        while let Some(run) = runner.poll_action() {
            let (exec, done) = (exec.clone(), done_tx.clone());
            tokio::spawn(async move {
                let outcome = exec.run(run.step, run.op, run.timeout_ms).await;
                let _ = done.send((run.id, outcome)).await;
            });
        }
        while let Some(event) = runner.poll_event() {
            tracing::info!(group = %exec.spec.name, ?event, "group event");
            // A dropped receiver: the daemon is going away; keep serving the handle.
            let _ = events.send(event).await;
        }
        let wake = runner.poll_timeout().map(|ms| epoch + Duration::from_millis(ms));
        tokio::select! {
            request = requests.recv() => match request {
                None => break,
                Some(Request::Start) => runner.start(now_ms()),
                Some(Request::Stop) => runner.stop(now_ms()),
                Some(Request::Restart) => runner.restart(now_ms()),
                Some(Request::Cleanup) => runner.cleanup(),
                Some(Request::Status(reply)) => {
                    let _ = reply.send(GroupStatus {
                        name: exec.spec.name.clone(),
                        summary: runner.summary().into(),
                        steps: runner.status(),
                    });
                }
            },
            Some((id, outcome)) = done_rx.recv() => runner.handle_result(now_ms(), id, outcome),
            _ = async { match wake { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                runner.handle_timeout(now_ms());
            }
        }
    }
    tracing::info!(group = %exec.spec.name, "group task ends (no handle left)");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn run_command_reports_exit_stdout_and_stderr_tail() {
        rt().block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            let out = run_command(&CommandSpec::new("sh", &["-c", "echo /dev/nbd3; echo oops >&2; exit 3"]), deadline)
                .await
                .unwrap();
            assert_eq!(out.code, Some(3));
            assert_eq!(out.stdout, "/dev/nbd3\n");
            assert_eq!(out.describe(), "exit code 3: oops");
            // stdin is null: a reader sees EOF at once.
            let out = run_command(&CommandSpec::new("sh", &["-c", "cat; echo done"]), deadline).await.unwrap();
            assert_eq!(out.stdout, "done\n");
            let err = run_command(&CommandSpec::new("/nonexistent/prog", &[]), deadline).await.unwrap_err();
            assert!(matches!(err, ProcError::Spawn { .. }));
        });
    }

    #[test]
    fn run_command_kills_the_process_group_on_timeout() {
        rt().block_on(async {
            let dir = std::env::temp_dir().join(format!("clusterd-exec-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let pidfile = dir.join("grandchild.pid");
            // The grandchild detaches its pipes, like an agent's daemon.
            let script = format!("sleep 60 >/dev/null 2>&1 & echo $! > {}; echo waiting >&2; wait", pidfile.display());
            let started = std::time::Instant::now();
            let err =
                run_command(&CommandSpec::new("sh", &["-c", &script]), Instant::now() + Duration::from_millis(500))
                    .await
                    .unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(
                matches!(&err, ProcError::TimedOut { stderr_tail, .. } if stderr_tail.contains("waiting")),
                "{err}"
            );
            let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
            // The grandchild was in the group: it is gone (reaped by init) soon.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::path::Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
            {
                assert!(std::time::Instant::now() < deadline, "grandchild {pid} survived");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            std::fs::remove_dir_all(&dir).unwrap();
        });
    }

    #[test]
    fn a_daemon_holding_the_pipes_does_not_hang_the_command() {
        rt().block_on(async {
            let started = std::time::Instant::now();
            let out = run_command(
                &CommandSpec::new("sh", &["-c", "(sleep 5 &) ; echo started"]),
                Instant::now() + Duration::from_secs(10),
            )
            .await
            .unwrap();
            assert_eq!(out.code, Some(0));
            assert_eq!(out.stdout, "started\n");
            assert!(started.elapsed() < Duration::from_secs(3), "waited for the daemon's pipes");
        });
    }

    #[test]
    fn errors_are_one_line_the_last_the_command_printed() {
        // Issue 23: status pasted the raw multi-line tail of attach.log.
        let out = ProcOutput {
            code: Some(1),
            stdout: String::new(),
            stderr_tail: "ttach: other attachment's line\nreplicator: waiting\n\nreplicator: failed to attach mail: Secondary\n  \n".into(),
        };
        assert_eq!(out.describe(), "exit code 1: replicator: failed to attach mail: Secondary");
        let long = "é".repeat(3 * ERROR_LINE_CHARS_MAX);
        let cut = last_line(&long);
        assert_eq!(cut.chars().count(), ERROR_LINE_CHARS_MAX + 1, "cut at a character boundary, marked");
        assert_eq!(one_line("a\n b \n\nc"), "a; b; c");
        assert_eq!(last_line(""), "");
    }

    #[test]
    fn describe_masks_secrets() {
        let mut c = CommandSpec::new("/agent", &["start"]);
        c.env = vec![("OCF_RESKEY_ip".into(), "10.0.0.1".into()), ("OCF_RESKEY_password".into(), "hunter2".into())];
        c.secret_env = vec!["OCF_RESKEY_password".into()];
        let d = c.describe();
        assert!(d.contains("10.0.0.1") && d.contains("***") && !d.contains("hunter2"), "{d}");
    }
}
