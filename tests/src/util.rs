//! Process, directory and timing helpers shared by every end-to-end test.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A scratch directory that is removed (recursively) when dropped.
///
/// It lives under `/var/tmp` rather than `/tmp` because `/tmp` may be a tmpfs,
/// which has no `O_DIRECT` and would make `--direct-io` tests meaningless.
/// Set `REPLICATOR_KEEP_TEST_DIRS=1` to keep it for post-mortem debugging.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TestDir {
    /// `name` should be short: Unix socket paths inside it are limited to 107 bytes.
    pub fn new(name: &str) -> TestDir {
        let base = if Path::new("/var/tmp").is_dir() {
            PathBuf::from("/var/tmp/replicator-tests")
        } else {
            std::env::temp_dir().join("replicator-tests")
        };
        let n = DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{name}-{}-{n}", std::process::id()));
        // A stale directory can only come from a crashed earlier run with the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating test dir {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("REPLICATOR_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs a closure on drop: cleanup that must happen even when an assertion panics.
pub struct Guard<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Guard<F> {
    pub fn new(f: F) -> Self {
        Guard(Some(f))
    }
}

impl<F: FnOnce()> Drop for Guard<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Polls `cond` until it returns true or `timeout` elapses.
///
/// The poll interval grows from 1 ms to 50 ms so fast conditions are seen fast
/// and slow ones do not burn a core.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Waits for a child to exit, killing it if `timeout` elapses first.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let mut status = None;
    let res = wait_until(timeout, "process exit", || match child.try_wait() {
        Ok(Some(s)) => {
            status = Some(s);
            true
        }
        Ok(None) => false,
        Err(_) => true,
    });
    if let Err(e) = res {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    match status {
        Some(s) => Ok(s),
        None => Ok(child.wait()?),
    }
}

/// Captured result of a finished command.
#[derive(Debug, Clone)]
pub struct Output {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// A readable report used in every failure message.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }
}

pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Default limit for one helper command; long enough for fio jobs on a slow CI machine.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs a command to completion (killing it after `timeout`) and captures its output.
/// Never fails because of the exit status: see [`run`] for that.
pub fn run_output(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = cmdline(cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    die_with_parent(cmd);
    let mut child = cmd.spawn().with_context(|| format!("spawning {line}"))?;
    let out_reader = drain(child.stdout.take().unwrap());
    let err_reader = drain(child.stderr.take().unwrap());
    let status = wait_child(&mut child, timeout).with_context(|| format!("running {line}"));
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let status = status.map_err(|e| anyhow!("{e:#}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"))?;
    Ok(Output { cmdline: line, status, stdout, stderr })
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs a command and fails (with command line, stdout and stderr) unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    run_timeout(cmd, CMD_TIMEOUT)
}

pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = run_output(cmd, timeout)?;
    if !out.success() {
        bail!("command failed\n{}", out.describe());
    }
    Ok(out)
}

/// Runs a command that is expected to fail; errors if it succeeds.
pub fn run_fail(cmd: &mut Command) -> Result<Output> {
    let out = run_output(cmd, CMD_TIMEOUT)?;
    if out.success() {
        bail!("command unexpectedly succeeded\n{}", out.describe());
    }
    Ok(out)
}

/// Builds a `Command` from a program and arguments.
pub fn cmd<I, S>(program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Makes the child die with SIGKILL if the spawning thread dies, so a crashed
/// test binary does not leave daemons behind holding ports and mounts.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// True when running under CI (`CI=true`), where missing tools are failures.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1") | Ok("yes"))
}

/// Looks a program up in `PATH` (and the sbin directories, which root's CI
/// environment might not have in `PATH`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Reports a missing prerequisite: prints `SKIP: why` and returns false outside
/// CI; panics under CI, where scripts/install-deps.sh must have provided it.
pub fn skip(why: &str) -> bool {
    if in_ci() {
        panic!("missing prerequisite under CI (scripts/install-deps.sh should provide it): {why}");
    }
    eprintln!("SKIP: {why}");
    false
}

/// True if every tool is installed; otherwise see [`skip`].
pub fn have_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| find_tool(t).is_none()).collect();
    if missing.is_empty() {
        true
    } else {
        skip(&format!("tools not installed: {}", missing.join(", ")))
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// True if running as root; otherwise see [`skip`].
pub fn have_root(why: &str) -> bool {
    is_root() || skip(&format!("needs root: {why}"))
}

/// Returns early from a test (printing `SKIP: ...`) unless the tools exist.
#[macro_export]
macro_rules! require_tools {
    ($($t:expr),+ $(,)?) => {
        if !$crate::have_tools(&[$($t),+]) {
            return;
        }
    };
}

/// Deterministic pseudo-random bytes (xorshift64*): reproducible test data
/// without a `rand` dependency; different seeds give unrelated streams.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Resident memory of a process in KiB, from /proc/PID/status.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Position of the first differing byte, for readable comparison failures.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b.iter()).position(|(x, y)| x != y).or(if a.len() != b.len() {
        Some(a.len().min(b.len()))
    } else {
        None
    })
}

/// Asserts two byte slices are equal without dumping megabytes on failure.
#[track_caller]
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if let Some(pos) = first_difference(got, want) {
        panic!(
            "{what}: data differs at byte {pos} (got len {}, want len {}); got {:02x?}, want {:02x?}",
            got.len(),
            want.len(),
            &got[pos..got.len().min(pos + 16)],
            &want[pos..want.len().min(pos + 16)]
        );
    }
}
