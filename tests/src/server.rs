//! Starting and stopping `replicator serve` (and other NBD daemons) for tests.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::util::{self, cmd, run, TestDir};

/// How long `serve` may take to print `replicator: ready` (a debug build on a
/// loaded 2-core CI machine is slow to start, but not this slow).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the workspace binary `name` under test.
///
/// The environment variable `env` wins; otherwise it is next to the test's
/// own target directory: the test runs as `target/<profile>/deps/<name>-<hash>`,
/// and `cargo build --workspace --bins` puts the binary in `target/<profile>/`.
pub fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("test binary has a parent dir");
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir = dir.parent().expect("deps has a parent");
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{name} binary not found at {} (run `cargo build --workspace --bins` first, or set {env})",
        bin.display()
    );
    bin
}

/// Path of the `replicator` binary under test (`REPLICATOR_BIN` wins).
pub fn replicator_bin() -> PathBuf {
    workspace_bin("replicator", "REPLICATOR_BIN")
}

/// `replicator status --json` of the daemon behind control socket `ctl`.
pub fn status_json(ctl: &Path) -> serde_json::Value {
    let mut c = replicator();
    c.args(["status", "--json", "--control"]).arg(ctl);
    let out = run(&mut c).unwrap_or_else(|e| panic!("replicator status: {e:#}"));
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e})\n{}", out.describe()))
}

/// Counter `io.<name>` of a `status --json` report.
pub fn io_counter(st: &serde_json::Value, name: &str) -> u64 {
    st["io"][name].as_u64().unwrap_or_else(|| panic!("status lacks io.{name}: {st}"))
}

pub fn replicator() -> Command {
    Command::new(replicator_bin())
}

/// A backing file with replicator metadata on it.
#[derive(Debug, Clone)]
pub struct Volume {
    pub disk: PathBuf,
    /// `None` means internal metadata.
    pub meta: Option<PathBuf>,
    /// Size of the backing file in bytes.
    pub disk_size: u64,
}

impl Volume {
    /// A sparse backing file of `size` bytes in `dir` with internal metadata.
    pub fn create(dir: &TestDir, size: u64) -> Result<Volume> {
        Self::create_with(dir, size, None, &[])
    }

    /// Like [`Volume::create`] with optional external metadata file and extra
    /// `create-md` arguments.
    pub fn create_with(dir: &TestDir, size: u64, meta: Option<&Path>, extra: &[&str]) -> Result<Volume> {
        let disk = dir.join("disk.img");
        let f = std::fs::File::create(&disk).with_context(|| format!("creating {}", disk.display()))?;
        f.set_len(size)?;
        drop(f);
        let vol = Volume { disk, meta: meta.map(Path::to_path_buf), disk_size: size };
        let mut c = replicator();
        c.arg("create-md").args(vol.disk_args()).args(extra);
        run(&mut c)?;
        Ok(vol)
    }

    /// `--disk PATH [--meta PATH]` as accepted by every subcommand.
    pub fn disk_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["--disk".into(), self.disk.clone().into()];
        if let Some(m) = &self.meta {
            v.push("--meta".into());
            v.push(m.clone().into());
        }
        v
    }

    /// The superblock as printed by `dump-md`.
    pub fn dump_md(&self) -> Result<serde_json::Value> {
        let mut c = replicator();
        c.arg("dump-md").args(self.disk_args());
        let out = run(&mut c)?;
        serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("dump-md printed invalid JSON\n{}", out.describe()))
    }

    /// The exported size: the metadata's `data_size_bytes`.
    pub fn data_size(&self) -> Result<u64> {
        let md = self.dump_md()?;
        md.get("data_size_bytes")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| anyhow!("dump-md has no numeric data_size_bytes: {md}"))
    }
}

/// Log lines from a child's stderr/stdout, with a condvar to wait for new ones.
#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    closed_streams: usize,
}

#[derive(Clone, Default)]
pub struct Logs {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

impl Logs {
    fn push(&self, line: String) {
        let (m, cv) = &*self.inner;
        m.lock().unwrap().lines.push(line);
        cv.notify_all();
    }

    fn close_stream(&self) {
        let (m, cv) = &*self.inner;
        m.lock().unwrap().closed_streams += 1;
        cv.notify_all();
    }

    /// All lines captured so far.
    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Blocks until some line satisfies `pred`, all `streams` output streams
    /// closed (the child exited), or the deadline passes.
    fn wait_line(&self, streams: usize, deadline: Instant, pred: impl Fn(&str) -> bool) -> WaitResult {
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        loop {
            if st.lines.iter().any(|l| pred(l)) {
                return WaitResult::Found;
            }
            if st.closed_streams >= streams {
                return WaitResult::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return WaitResult::TimedOut;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Waits until a captured line contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<()> {
        match self.wait_line(usize::MAX, Instant::now() + timeout, |l| l.contains(needle)) {
            WaitResult::Found => Ok(()),
            _ => bail!("no log line containing {needle:?} within {timeout:?}; log:\n{}", self.text()),
        }
    }
}

enum WaitResult {
    Found,
    Closed,
    TimedOut,
}

fn capture(stream: impl Read + Send + 'static, logs: Logs, echo_prefix: Option<&'static str>) {
    thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if let Some(p) = echo_prefix {
                        // Shown by the test harness only for failing tests.
                        eprintln!("{p}{line}");
                    }
                    logs.push(line);
                }
            }
        }
        logs.close_stream();
    });
}

/// A running `replicator serve`. Killed (SIGKILL) on drop.
pub struct Server {
    child: Option<Child>,
    pub pid: u32,
    pub args: Vec<OsString>,
    pub logs: Logs,
    /// `listening nbd tcp` addresses, in order.
    pub tcp: Vec<SocketAddr>,
    /// `listening nbd unix` paths, in order.
    pub unix: Vec<PathBuf>,
    pub control: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// `listening replication` address (`replicator up`, accepting node).
    pub replication: Option<SocketAddr>,
    exit_status: Option<ExitStatus>,
}

impl Server {
    /// Starts `replicator serve` for `vol` with `extra` arguments (typically
    /// `--listen 127.0.0.1:0`) and waits until it is ready.
    pub fn start(vol: &Volume, extra: &[&str]) -> Result<Server> {
        let mut args: Vec<OsString> = vec!["serve".into()];
        args.extend(vol.disk_args());
        args.extend(extra.iter().map(OsString::from));
        // The server has a system-wide default control socket; tests run in
        // parallel, so each server gets its own next to its disk.
        if !extra.contains(&"--control") {
            args.push("--control".into());
            args.push(vol.disk.with_file_name("ctl.sock").into());
        }
        Self::spawn(args)
    }

    /// The common case: one ephemeral TCP listener.
    pub fn start_tcp(vol: &Volume) -> Result<Server> {
        Self::start(vol, &["--listen", "127.0.0.1:0"])
    }

    /// Starts the binary with exactly `args` (which must include `serve`).
    pub fn spawn<I, S>(args: I) -> Result<Server>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Self::spawn_from(replicator(), args)
    }

    /// Like [`Self::spawn`], from a prepared command (e.g. `ip netns exec
    /// NS replicator`).
    pub fn spawn_from<I, S>(mut c: Command, args: I) -> Result<Server>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        c.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "info");
        }
        util::die_with_parent(&mut c);
        let line = util::cmdline(&c);
        let mut child = c.spawn().with_context(|| format!("spawning {line}"))?;
        let logs = Logs::default();
        let echo = std::env::var_os("REPLICATOR_TEST_ECHO").map(|_| "[server] ");
        capture(child.stdout.take().unwrap(), logs.clone(), echo);
        capture(child.stderr.take().unwrap(), logs.clone(), echo);
        let pid = child.id();
        let mut server = Server {
            child: Some(child),
            pid,
            args,
            logs,
            tcp: vec![],
            unix: vec![],
            control: None,
            metrics: None,
            replication: None,
            exit_status: None,
        };
        let res = server.logs.wait_line(2, Instant::now() + READY_TIMEOUT, |l| l.trim() == "replicator: ready");
        match res {
            WaitResult::Found => {}
            WaitResult::Closed => {
                let status = server.child.as_mut().unwrap().wait()?;
                server.exit_status = Some(status);
                bail!("server exited before ready ({status})\ncommand: {line}\nlog:\n{}", server.logs.text());
            }
            WaitResult::TimedOut => {
                bail!("server not ready within {READY_TIMEOUT:?}\ncommand: {line}\nlog:\n{}", server.logs.text())
            }
        }
        server.parse_listeners()?;
        Ok(server)
    }

    fn parse_listeners(&mut self) -> Result<()> {
        for l in self.logs.lines() {
            let Some(rest) = l.trim().strip_prefix("replicator: listening ") else {
                continue;
            };
            let words: Vec<&str> = rest.splitn(3, ' ').collect();
            let bad = || anyhow!("unparseable listening line: {l:?}");
            match words.as_slice() {
                ["nbd", "tcp", addr] => self.tcp.push(addr.parse().map_err(|_| bad())?),
                ["nbd", "unix", path] => self.unix.push(PathBuf::from(path)),
                ["control", path] => self.control = Some(PathBuf::from(path)),
                ["control", a, b] => self.control = Some(PathBuf::from(format!("{a} {b}"))),
                ["metrics", addr] => self.metrics = Some(addr.parse().map_err(|_| bad())?),
                ["replication", addr] => self.replication = Some(addr.parse().map_err(|_| bad())?),
                _ => return Err(bad()),
            }
        }
        Ok(())
    }

    /// First TCP listener.
    pub fn addr(&self) -> SocketAddr {
        *self.tcp.first().expect("server has no TCP listener")
    }

    /// `nbd://127.0.0.1:PORT/volume`.
    pub fn uri(&self) -> String {
        self.uri_for("volume")
    }

    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr(), export)
    }

    /// `nbd+unix:///volume?socket=PATH` for the first Unix listener.
    pub fn unix_uri(&self) -> String {
        let p = self.unix.first().expect("server has no Unix listener");
        format!("nbd+unix:///volume?socket={}", p.display())
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        if self.exit_status.is_some() {
            return false;
        }
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(s))) => {
                self.exit_status = Some(s);
                false
            }
            _ => false,
        }
    }

    /// Fails with the server log if the server has died.
    pub fn assert_running(&mut self) {
        assert!(self.is_running(), "server exited unexpectedly ({:?}); log:\n{}", self.exit_status, self.logs.text());
    }

    pub fn vm_rss_kib(&self) -> Option<u64> {
        util::vm_rss_kib(self.pid)
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the process to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.exit_status {
            return Ok(s);
        }
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let child = self.child.as_mut().expect("child");
        let status = util::wait_child(child, timeout)
            .with_context(|| format!("server did not exit after SIGTERM; log:\n{}", self.logs.text()))?;
        self.exit_status = Some(status);
        Ok(status)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.exit_status.is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!("--- replicator serve {:?} log ---\n{}\n--- end of server log ---", self.args, self.logs.text());
        }
    }
}

/// Any other daemon a test needs (nbdkit, nbdfuse, qemu-nbd): killed on drop.
pub struct Daemon {
    pub child: Child,
    pub name: String,
    pub logs: Logs,
}

impl Daemon {
    pub fn spawn(mut c: Command) -> Result<Daemon> {
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        util::die_with_parent(&mut c);
        let name = util::cmdline(&c);
        let mut child = c.spawn().with_context(|| format!("spawning {name}"))?;
        let logs = Logs::default();
        capture(child.stdout.take().unwrap(), logs.clone(), None);
        capture(child.stderr.take().unwrap(), logs.clone(), None);
        Ok(Daemon { child, name, logs })
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.logs.text());
        }
    }
}

/// Starts `nbdkit` with the given plugin arguments on an ephemeral-ish port and
/// waits until it accepts connections. Used to self-test the harness's NBD
/// client and as a baseline.
pub fn nbdkit(args: &[&str]) -> Result<(Daemon, SocketAddr)> {
    // nbdkit cannot report an ephemeral port, so pick a free one and retry on a race.
    for _ in 0..5 {
        let port = free_port()?;
        let mut c = cmd("nbdkit", ["-f", "-i", "127.0.0.1", "-p", &port.to_string()]);
        c.args(args);
        let mut d = Daemon::spawn(c)?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut alive = true;
        let up = util::wait_until(Duration::from_secs(10), "nbdkit to listen", || {
            alive = d.is_running();
            !alive || std::net::TcpStream::connect(addr).is_ok()
        });
        if up.is_ok() && alive {
            return Ok((d, addr));
        }
    }
    bail!("could not start nbdkit {args:?}")
}

/// A port that was free a moment ago (for daemons that cannot bind port 0).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
