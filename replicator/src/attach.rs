//! `replicator attach` and `detach`: thin glue over kernel-glue.
//!
//! `attach` prints the device path once it exists. The kernel path needs no
//! process afterwards (the kernel holds the NBD socket). The FUSE path does:
//! `attach` starts itself again with `--foreground` in a new session, waits
//! for its `device PATH` line, prints the path and exits; the foreground
//! process serves FUSE until `detach` signals it (SIGTERM: clean, SIGUSR1:
//! forced) and records itself in `RUN_DIR/<device name>.pid`.
//!
//! Exit codes as for every command: 0 success, 1 runtime failure, 2 usage.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kernel_glue::{AttachConfig, DetachMode, Endpoint, Method};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

/// Where attach records its FUSE daemons unless told otherwise.
pub const RUN_DIR_DEFAULT: &str = "/run/replicator/attach";

#[derive(Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Auto,
    Kernel,
    Fuse,
}

#[derive(clap::Args)]
pub struct AttachArgs {
    /// A replicated resource (name or file): attach this node's NBD export
    /// of it (its first nbd-unix socket, else its first nbd-listen address).
    #[arg(conflicts_with_all = ["nbd", "nbd_unix"])]
    res: Option<String>,
    /// This node's name in the resource file [default: the hostname].
    #[arg(long, requires = "res")]
    node: Option<String>,
    /// NBD server address (HOST:PORT).
    #[arg(
        long,
        value_name = "HOST:PORT",
        conflicts_with = "nbd_unix",
        required_unless_present_any = ["nbd_unix", "res"]
    )]
    nbd: Option<String>,
    /// NBD server Unix socket.
    #[arg(long, value_name = "PATH")]
    nbd_unix: Option<PathBuf>,
    /// Export name.
    #[arg(long, default_value = "volume")]
    export: String,
    /// Seconds without a reply before I/O fails with EIO (kernel: before the connection counts as dead).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    /// Kernel path: seconds I/O waits on a dead connection for a reconnect (0: fail at once).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    dead_conn_timeout: u64,
    /// Block device kind: auto (kernel nbd if available, else FUSE + loop), kernel or fuse
    /// [default: the resource's attach-method, else auto].
    #[arg(long, value_enum)]
    method: Option<MethodArg>,
    /// Kernel path: use /dev/nbdN.
    #[arg(long, value_name = "N")]
    nbd_index: Option<u32>,
    /// Kernel path: parallel connections, if the server allows several (1-16).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    connections: u32,
    /// Directory for FUSE mounts, daemon records and logs.
    #[arg(long, value_name = "DIR", default_value = RUN_DIR_DEFAULT)]
    run_dir: PathBuf,
    /// Stay in the foreground (FUSE path: until detached).
    #[arg(long)]
    foreground: bool,
    /// Kernel path: use the nbd ioctls even where netlink exists (tests the fallback).
    #[arg(long, hide = true)]
    kernel_ioctl: bool,
}

#[derive(clap::Args)]
pub struct DetachArgs {
    /// The device `attach` printed (/dev/nbdN or /dev/loopN).
    device: PathBuf,
    /// Detach even if mounted: the filesystem's later I/O fails.
    #[arg(long)]
    force: bool,
    /// The directory given to `attach`.
    #[arg(long, value_name = "DIR", default_value = RUN_DIR_DEFAULT)]
    run_dir: PathBuf,
}

/// The line the foreground process prints when the device exists.
const READY_PREFIX: &str = "device ";
/// How long `detach` waits for a FUSE daemon to finish.
const DETACH_WAIT: Duration = Duration::from_secs(60);

fn config(args: &AttachArgs) -> anyhow::Result<AttachConfig> {
    let mut configured = None;
    let (endpoint, export) = match (&args.res, &args.nbd, &args.nbd_unix) {
        (Some(res), None, None) => {
            let res =
                crate::resource_cmd::load(&crate::resource_cmd::ResArgs { res: res.clone(), node: args.node.clone() })?;
            let endpoint = match (res.local.nbd_unix.first(), res.local.nbd_listen.first()) {
                (Some(path), _) => Endpoint::Unix(path.clone()),
                (None, Some(addr)) => Endpoint::Tcp(addr.to_string()),
                (None, None) => bail!(crate::UsageError(format!(
                    "resource {} gives node {} no nbd-unix or nbd-listen",
                    res.name, res.local.name
                ))),
            };
            configured = Some(match res.local.attach_method {
                replicator::node::resource::AttachMethod::Auto => Method::Auto,
                replicator::node::resource::AttachMethod::Kernel => Method::Kernel,
                replicator::node::resource::AttachMethod::Fuse => Method::Fuse,
            });
            (endpoint, res.name)
        }
        (None, Some(a), None) => (Endpoint::Tcp(a.clone()), args.export.clone()),
        (None, None, Some(p)) => (Endpoint::Unix(p.clone()), args.export.clone()),
        _ => bail!(crate::UsageError("give a resource, or exactly one of --nbd and --nbd-unix".into())),
    };
    let method = match args.method {
        Some(MethodArg::Auto) => Method::Auto,
        Some(MethodArg::Kernel) => Method::Kernel,
        Some(MethodArg::Fuse) => Method::Fuse,
        None => configured.unwrap_or(Method::Auto),
    };
    if args.timeout == 0 {
        bail!(crate::UsageError("--timeout must be at least 1 second".into()));
    }
    let mountpoint = args.run_dir.join(format!("fuse-{}", std::process::id()));
    let mut cfg = AttachConfig::new(endpoint, &export, mountpoint);
    cfg.method = method;
    cfg.io_timeout = Duration::from_secs(args.timeout);
    cfg.dead_conn_timeout = Duration::from_secs(args.dead_conn_timeout);
    cfg.nbd_index = args.nbd_index;
    cfg.force_ioctl = args.kernel_ioctl;
    cfg.connections = args.connections;
    Ok(cfg)
}

fn record_path(run_dir: &Path, device: &Path) -> PathBuf {
    kernel_glue::record::path(run_dir, device)
}

/// Where the daemon leaves the reason a detach failed or was refused, for
/// the `detach` command that asked for it.
fn error_path(record: &Path) -> PathBuf {
    record.with_extension("detach-error")
}

pub fn attach(args: AttachArgs) -> anyhow::Result<()> {
    let cfg = config(&args)?;
    // Private: it holds the FUSE mount of the whole volume and the daemons' records.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.run_dir)
        .with_context(|| format!("failed to create {}", args.run_dir.display()))?;
    if args.foreground {
        return foreground(&args, &cfg);
    }
    // Re-run ourselves in the foreground, detached from our session; wait
    // for its readiness line. Its log goes to a file: it outlives us.
    let log_path = args.run_dir.join("attach.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("failed to open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("failed to find the replicator binary")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--foreground")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("failed to start the attach daemon")?;
    let stdout = child.stdout.take().context("attach daemon has no stdout")?;
    // Every step of the daemon's attach is bounded by the I/O timeout; this
    // bound only guards against a bug there.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready_wait = cfg.io_timeout * 3 + Duration::from_secs(60);
    let Ok(line) = rx.recv_timeout(ready_wait) else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("failed to attach export {:?}: the attach daemon was not ready within {ready_wait:?}", cfg.export);
    };
    match line.trim().strip_prefix(READY_PREFIX) {
        Some(dev) => {
            println!("{dev}");
            Ok(())
        }
        None => {
            let status = child.wait().context("failed to wait for the attach daemon")?;
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            bail!(
                "failed to attach export {:?} ({status}); last lines of {}:\n{}",
                cfg.export,
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        }
    }
}

fn foreground(args: &AttachArgs, cfg: &AttachConfig) -> anyhow::Result<()> {
    // Block the signals before any thread exists, so every thread inherits
    // the mask and only `wait` below receives them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1] {
        signals.add(s);
    }
    signals.thread_block().context("failed to block signals")?;
    let attachment = kernel_glue::attach(cfg)
        .with_context(|| format!("failed to attach export {:?} from {}", cfg.export, cfg.endpoint))?;
    let device = attachment.device().to_path_buf();
    let record = record_path(&args.run_dir, &device);
    // A netlink-connected kernel device needs no process, unless it should
    // survive server restarts: then this process stays to hand the kernel
    // new sockets. FUSE and the ioctl interface always need one.
    let keeper = attachment.kernel_device().filter(|_| !cfg.dead_conn_timeout.is_zero());
    let stay = attachment.needs_process() || keeper.is_some();
    if stay {
        kernel_glue::record::write(&args.run_dir, &device, std::process::id(), &cfg.endpoint.uri(&cfg.export))?;
    }
    tracing::info!(device = %device.display(), method = %attachment.method(), direct_io = ?attachment.direct_io(), "attached");
    let mut out = std::io::stdout();
    // The parent may be gone already; that is not our failure.
    let _ = writeln!(out, "{READY_PREFIX}{}", device.display()).and_then(|_| out.flush());
    if !stay {
        return Ok(());
    }
    let mut attachment = attachment;
    let result = loop {
        let stop = Arc::new(AtomicBool::new(false));
        let worker = keeper.map(|(index, size_bytes)| {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            std::thread::spawn(move || {
                let timeouts =
                    kernel_glue::kernel::KernelTimeouts { io: cfg.io_timeout, dead_conn: cfg.dead_conn_timeout };
                kernel_glue::kernel::keep_connected(index, &cfg.endpoint, &cfg.export, size_bytes, timeouts, &|| {
                    stop.load(Ordering::SeqCst)
                })
            })
        });
        let sig = signals.wait().context("failed to wait for signals")?;
        let mode = if sig == Signal::SIGUSR1 { DetachMode::Force } else { DetachMode::Clean };
        tracing::info!(signal = ?sig, ?mode, "detaching");
        // The keeper stops first: it must not hand the kernel a socket
        // after the disconnect.
        stop.store(true, Ordering::SeqCst);
        if let Some(Ok(Err(e))) = worker.map(|w| w.join()) {
            tracing::error!(error = %e, "the reconnect keeper failed");
        }
        match attachment.detach(mode) {
            Ok(()) => break Ok(()),
            Err((e, Some(still))) => {
                tracing::error!(error = %e, "detach refused; still attached");
                let _ = std::fs::write(error_path(&record), format!("refusing to detach {}: {e}", device.display()));
                attachment = *still;
            }
            Err((e, None)) => {
                let _ = std::fs::write(error_path(&record), format!("failed to detach {}: {e}", device.display()));
                break Err(e).context(format!("failed to detach {}", device.display()));
            }
        }
    };
    // Removing the record is the last act: `detach` waits for it.
    let _ = std::fs::remove_file(&record);
    if result.is_ok() {
        tracing::info!(device = %device.display(), "detached");
    }
    result
}

pub fn detach(args: DetachArgs) -> anyhow::Result<()> {
    let mode = if args.force { DetachMode::Force } else { DetachMode::Clean };
    let dev = &args.device;
    let record = record_path(&args.run_dir, dev);
    if !record.exists() {
        // No daemon: a kernel device connected through netlink, which any
        // process may disconnect.
        let index = kernel_glue::kernel::index_of(dev).with_context(|| {
            format!("failed to detach {}: no attach daemon recorded in {}", dev.display(), record.display())
        })?;
        kernel_glue::detach_kernel(index, mode).with_context(|| format!("failed to detach {}", dev.display()))?;
        println!("{}", dev.display());
        return Ok(());
    }
    let (pid, _) = kernel_glue::record::read(&args.run_dir, dev)?.with_context(|| {
        format!("failed to detach {}: no attach daemon recorded in {}", dev.display(), record.display())
    })?;
    let pid_raw = i32::try_from(pid).with_context(|| format!("bad pid {pid} in {}", record.display()))?;
    if mode == DetachMode::Clean {
        wait_unused(dev).with_context(|| format!("refusing to detach {}", dev.display()))?;
    }
    if !process_alive(pid) {
        // The daemon died (crash, SIGKILL; perhaps not yet reaped).
        return release_dead(dev, mode, &record, pid);
    }
    let sig = if args.force { Signal::SIGUSR1 } else { Signal::SIGTERM };
    let error_file = error_path(&record);
    let _ = std::fs::remove_file(&error_file);
    match kill(Pid::from_raw(pid_raw), sig) {
        Ok(()) => {}
        Err(nix::errno::Errno::ESRCH) => return release_dead(dev, mode, &record, pid),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("failed to signal the attach daemon (pid {pid}) of {}", dev.display()))
        }
    }
    wait_gone(&record, pid, dev)?;
    if let Ok(reason) = std::fs::read_to_string(&error_file) {
        let _ = std::fs::remove_file(&error_file);
        bail!("{reason}");
    }
    if record.exists() {
        // It died before finishing (killed meanwhile, crashed): what it
        // held is ours to free, as if it had died before we asked.
        tracing::warn!(
            pid,
            device = %dev.display(),
            log = %args.run_dir.join("attach.log").display(),
            "the attach daemon exited without finishing the detach"
        );
        return release_dead(dev, mode, &record, pid);
    }
    println!("{}", dev.display());
    Ok(())
}

/// Frees what a dead attach daemon left for `dev` (no I/O can reach the
/// volume any more: its FUSE connection or ioctl thread died with it),
/// then drops its record, never before: a record is the only handle on
/// the device that `detach` has.
fn release_dead(dev: &Path, mode: DetachMode, record: &Path, pid: u32) -> anyhow::Result<()> {
    tracing::warn!(pid, device = %dev.display(), "the attach daemon is gone; releasing what it left");
    let released = match kernel_glue::kernel::index_of(dev) {
        // A keeper's device is still connected; an ioctl device went with
        // its daemon's NBD_DO_IT thread.
        Some(index) if kernel_glue::kernel::is_connected(index) => kernel_glue::detach_kernel(index, mode),
        Some(_) => Ok(()),
        None => kernel_glue::fuse::release_orphan(dev),
    };
    released.with_context(|| {
        format!(
            "failed to detach {} (its attach daemon, pid {pid}, is gone; {} is kept: run `replicator detach --force {}` again)",
            dev.display(),
            record.display(),
            dev.display()
        )
    })?;
    let _ = std::fs::remove_file(record);
    println!("{}", dev.display());
    Ok(())
}

/// How long a clean detach waits for a passing holder of the device to let
/// go (udev's blkid probe after an unmount, a `mount -o loop` elsewhere
/// scanning loop devices).
const HOLDER_WAIT: Duration = Duration::from_secs(10);

/// [`kernel_glue::mount::ensure_unused`], but a device that is open
/// exclusively and mounted nowhere gets [`HOLDER_WAIT`] to be let go.
fn wait_unused(dev: &Path) -> Result<(), kernel_glue::Error> {
    let deadline = Instant::now() + HOLDER_WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        match kernel_glue::mount::ensure_unused(dev) {
            Err(kernel_glue::Error::Claimed { .. }) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Whether process `pid` still runs: it exists and is not a zombie (a
/// zombie has exited and released everything but its pid; until its parent
/// reaps it, signals to it still "succeed").
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    if kill(Pid::from_raw(raw), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and
        // may itself contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        // It exists; without /proc we cannot tell a zombie.
        Err(_) => true,
    }
}

/// Waits until the attach daemon `pid` removed its record or exited.
fn wait_gone(record: &Path, pid: u32, dev: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + DETACH_WAIT;
    let mut pause = Duration::from_millis(5);
    while record.exists() && !error_path(record).exists() && process_alive(pid) {
        if Instant::now() >= deadline {
            bail!(
                "failed to detach {}: the attach daemon (pid {pid}) did not finish within {DETACH_WAIT:?}",
                dev.display()
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    Ok(())
}
