//! What each step kind runs for start, stop and monitor. Command lines are
//! built by pure functions (unit-tested); `run` executes them through
//! `exec::run_command` and turns exit codes into `Outcome`s.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::config::{DeviceSource, StepKind, StepSpec};
use super::exec::{run_command, CommandSpec, Exec, ProcOutput};
use super::runner::{Op, Outcome};

/// How long the background gratuitous ARP may take.
const ARP_TIMEOUT_MS: u64 = 5_000;
/// Where OCF agents live unless their path says otherwise.
pub const OCF_ROOT_DEFAULT: &str = "/usr/lib/ocf";

pub(crate) async fn run(exec: &Exec, step: usize, op: Op, deadline: Instant) -> Outcome {
    let spec = &exec.spec.steps[step];
    match &spec.kind {
        StepKind::Attach => attach(exec, step, op, deadline).await,
        StepKind::Filesystem { device, directory, fstype, options, fsck, force_unmount } => {
            let device = match device {
                DeviceSource::Path(p) => Some(p.clone()),
                DeviceSource::Attach(i) => device_of(exec, *i),
            };
            let fs = Fs { directory, fstype, options: options.as_deref(), fsck: *fsck, force_unmount: *force_unmount };
            filesystem(device, &fs, op, deadline).await
        }
        StepKind::Ip { address, ip, interface, .. } => ip_step(address, *ip, interface, op, deadline).await,
        StepKind::Ocf { .. } => {
            let (cmd, timeout_ms) = (ocf_command(spec, op, exec.ctx.node.as_deref(), deadline), remaining_ms(deadline));
            tracing::debug!(command = %cmd.describe(), timeout_ms, "OCF agent");
            match run_command(&cmd, deadline).await {
                Ok(out) => ocf_outcome(op, &out),
                Err(e) => e.into(),
            }
        }
        StepKind::Systemd { unit } => match run_command(&systemd_command(unit, op), deadline).await {
            Ok(out) => systemd_outcome(op, &out),
            Err(e) => e.into(),
        },
    }
}

fn remaining_ms(deadline: Instant) -> u64 {
    u64::try_from(deadline.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(u64::MAX)
}

/// Ok on exit code 0, else the command's failure.
fn zero_ok(what: &str, out: &ProcOutput) -> Outcome {
    if out.code == Some(0) {
        Outcome::Ok
    } else {
        Outcome::Failed(format!("{what}: {}", out.describe()))
    }
}

// ---- attach -------------------------------------------------------------

fn device_record(exec: &Exec, step: usize) -> PathBuf {
    exec.ctx.run_dir.join(&exec.spec.name).join(format!("{}.device", exec.spec.steps[step].name))
}

fn device_of(exec: &Exec, step: usize) -> Option<PathBuf> {
    exec.devices.lock().ok()?.get(&step).cloned()
}

fn set_device(exec: &Exec, step: usize, device: Option<PathBuf>) {
    if let Ok(mut d) = exec.devices.lock() {
        match device {
            Some(dev) => d.insert(step, dev),
            None => d.remove(&step),
        };
    }
}

/// What makes an attached device ours rather than a later attachment that
/// reuses its number: a loop device's backing file (the FUSE path names
/// the attach process), an NBD device's client pid.
fn device_identity(device: &Path) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    let file = if name.starts_with("loop") {
        "loop/backing_file"
    } else if name.starts_with("nbd") {
        "pid"
    } else {
        return None;
    };
    std::fs::read_to_string(Path::new("/sys/block").join(name).join(file)).ok().map(|s| s.trim().to_owned())
}

/// The attach process serving a FUSE-backed loop device, from its backing
/// file (`…/attach/fuse-<pid>/volume`).
fn fuse_server_pid(backing_file: &str) -> Option<u32> {
    let rest = &backing_file[backing_file.find("/fuse-")? + "/fuse-".len()..];
    rest.split('/').next()?.parse().ok()
}

/// A process exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Reads the devices recorded by an earlier daemon (after a restart). A
/// record whose device now belongs to another attachment (its number was
/// reused after ours died with the host's processes) is stale: forgotten.
pub(crate) fn load_devices(exec: &Exec) {
    for (i, s) in exec.spec.steps.iter().enumerate() {
        if s.kind == StepKind::Attach {
            let record = device_record(exec, i);
            if let Ok(text) = std::fs::read_to_string(&record) {
                let mut lines = text.lines();
                let dev = lines.next().unwrap_or("").trim();
                let identity = lines.next().map(str::trim);
                if !dev.starts_with("/dev/") {
                    continue;
                }
                if identity.is_some() && device_identity(Path::new(dev)).as_deref() != identity {
                    tracing::warn!(device = dev, record = %record.display(), "the recorded device is no longer ours; forgetting it");
                    let _ = std::fs::remove_file(&record);
                    continue;
                }
                set_device(exec, i, Some(PathBuf::from(dev)));
            }
        }
    }
}

pub fn attach_command(replicator: &Path, volume: &str, node: Option<&str>) -> CommandSpec {
    let mut c = CommandSpec::new(replicator, &["attach", volume]);
    if let Some(n) = node {
        c = c.arg("--node").arg(n);
    }
    c
}

pub fn detach_command(replicator: &Path, device: &Path) -> CommandSpec {
    CommandSpec::new(replicator, &["detach"]).arg(device)
}

/// Whether an attached device is still connected: an NBD device has a
/// `pid` in sysfs while connected, a loop device (FUSE path) its `loop`
/// directory.
fn device_alive(device: &Path) -> bool {
    let Some(name) = device.file_name().and_then(|n| n.to_str()) else { return false };
    if name.starts_with("nbd") {
        Path::new("/sys/block").join(name).join("pid").exists()
    } else if name.starts_with("loop") {
        // Bound, and (FUSE path) its FUSE server is a live process: after a
        // crash of the host's processes the device can stay bound to a
        // dead server.
        Path::new("/sys/block").join(name).join("loop").exists()
            && device_identity(device).and_then(|b| fuse_server_pid(&b)).is_none_or(process_alive)
    } else {
        device.exists()
    }
}

async fn attach(exec: &Exec, step: usize, op: Op, deadline: Instant) -> Outcome {
    let replicator = &exec.spec.replicator;
    let recorded = device_of(exec, step);
    match op {
        Op::Start => {
            if let Some(dev) = recorded.as_ref().filter(|d| device_alive(d)) {
                tracing::info!(device = %dev.display(), "already attached");
                return Outcome::Ok;
            }
            let cmd = attach_command(replicator, &exec.spec.volume, exec.ctx.node.as_deref());
            let out = match run_command(&cmd, deadline).await {
                Ok(out) if out.code == Some(0) => out,
                Ok(out) => return Outcome::Failed(format!("replicator attach: {}", out.describe())),
                Err(e) => return e.into(),
            };
            let Some(dev) = out.stdout.lines().next().map(str::trim).filter(|d| d.starts_with("/dev/")) else {
                return Outcome::Failed(format!("replicator attach printed no device path: {:?}", out.stdout));
            };
            let record = device_record(exec, step);
            let written = record.parent().map(std::fs::create_dir_all).unwrap_or(Ok(())).and_then(|_| {
                let identity = device_identity(Path::new(dev)).unwrap_or_default();
                std::fs::write(&record, format!("{dev}\n{identity}\n"))
            });
            if let Err(e) = written {
                // Only a daemon restart needs it; the device works.
                tracing::warn!(record = %record.display(), error = %e, "failed to record the attached device");
            }
            set_device(exec, step, Some(PathBuf::from(dev)));
            Outcome::Ok
        }
        Op::Stop => {
            let Some(dev) = recorded else { return Outcome::NotRunning };
            match run_command(&detach_command(replicator, &dev), deadline).await {
                Ok(out) if out.code == Some(0) => {}
                Ok(out) if !device_alive(&dev) => {
                    tracing::info!(device = %dev.display(), why = %out.describe(), "detach failed but the device is gone")
                }
                Ok(out) => return Outcome::Failed(format!("replicator detach {}: {}", dev.display(), out.describe())),
                Err(e) => return e.into(),
            }
            let _ = std::fs::remove_file(device_record(exec, step));
            set_device(exec, step, None);
            Outcome::Ok
        }
        Op::Monitor => match recorded {
            Some(dev) if device_alive(&dev) => Outcome::Ok,
            Some(dev) => Outcome::Failed(format!("{} is no longer connected", dev.display())),
            None => Outcome::NotRunning,
        },
    }
}

// ---- filesystem ---------------------------------------------------------

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` is a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') as u32 * 64 + (bytes[i + 2] - b'0') as u32 * 8 + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether something is mounted on `directory` per a mountinfo text.
pub fn mounted_at(mountinfo: &str, directory: &Path) -> bool {
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4).is_some_and(|mp| Path::new(&unescape_mountinfo(mp)) == directory))
}

fn is_mounted(directory: &Path) -> Result<bool, String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("reading mountinfo: {e}"))?;
    // A mount point behind a symlink shows under its real path.
    let real = std::fs::canonicalize(directory).unwrap_or_else(|_| directory.to_path_buf());
    Ok(mounted_at(&text, directory) || mounted_at(&text, &real))
}

pub fn fsck_command(device: &Path, fstype: &str) -> CommandSpec {
    // -a: repair what is safe without asking (e2fsck's -p); -T: no banner.
    CommandSpec::new("fsck", &["-T", "-t", fstype, "-a"]).arg(device)
}

/// fsck's exit code: 0 clean, 1 corrected, 2 corrected (reboot advised for
/// a root file system), 4 and above left errors or failed.
pub fn fsck_outcome(out: &ProcOutput) -> Outcome {
    match out.code {
        Some(0) | Some(1) => Outcome::Ok,
        Some(2) | Some(3) => {
            tracing::warn!(why = %out.describe(), "fsck corrected errors and advises a reboot; mounting anyway");
            Outcome::Ok
        }
        _ => Outcome::Failed(format!("fsck: {}", out.describe())),
    }
}

pub fn mount_command(device: &Path, directory: &Path, fstype: &str, options: Option<&str>) -> CommandSpec {
    let mut c = CommandSpec::new("mount", &["-t", fstype]);
    if let Some(o) = options {
        c = c.arg("-o").arg(o);
    }
    c.arg(device).arg(directory)
}

/// `fuser -k -M -m DIR`: SIGKILL to every process using the file system
/// mounted on DIR; -M refuses when DIR is not a mount point (so a race
/// with an unmount never kills the users of the parent file system).
pub fn fuser_kill_command(directory: &Path) -> CommandSpec {
    CommandSpec::new("fuser", &["-k", "-M", "-m"]).arg(directory)
}

/// `umount -l DIR`: the last resort of a forced stop (see `filesystem`).
pub fn lazy_umount_command(directory: &Path) -> CommandSpec {
    CommandSpec::new("umount", &["-l"]).arg(directory)
}

struct Fs<'a> {
    directory: &'a Path,
    fstype: &'a str,
    options: Option<&'a str>,
    fsck: bool,
    force_unmount: bool,
}

/// After `fuser -k`, a busy umount is retried this often, this far apart
/// (the killed processes are still exiting), within the stop's deadline.
const KILLED_USERS_UMOUNT_RETRIES: u32 = 50;
const KILLED_USERS_UMOUNT_PAUSE: Duration = Duration::from_millis(100);

async fn umount(directory: &Path, deadline: Instant) -> Outcome {
    match run_command(&CommandSpec::new("umount", &[]).arg(directory), deadline).await {
        Ok(out) => zero_ok("umount", &out),
        Err(e) => e.into(),
    }
}

async fn filesystem(device: Option<PathBuf>, fs: &Fs<'_>, op: Op, deadline: Instant) -> Outcome {
    let Fs { directory, fstype, options, fsck, force_unmount } = *fs;
    let mounted = match is_mounted(directory) {
        Ok(m) => m,
        Err(e) => return Outcome::Failed(e),
    };
    match op {
        Op::Monitor => {
            if mounted {
                Outcome::Ok
            } else {
                Outcome::NotRunning
            }
        }
        Op::Start => {
            if mounted {
                return Outcome::Ok;
            }
            let Some(device) = device else {
                return Outcome::Failed("the attach step has no device (is it started?)".into());
            };
            if let Err(e) = tokio::fs::create_dir_all(directory).await {
                return Outcome::Failed(format!("failed to create {}: {e}", directory.display()));
            }
            if fsck {
                match run_command(&fsck_command(&device, fstype), deadline).await {
                    Ok(out) => {
                        let o = fsck_outcome(&out);
                        if o != Outcome::Ok {
                            return o;
                        }
                    }
                    Err(e) => return e.into(),
                }
            }
            match run_command(&mount_command(&device, directory, fstype, options), deadline).await {
                Ok(out) => zero_ok("mount", &out),
                Err(e) => e.into(),
            }
        }
        Op::Stop => {
            if !mounted {
                return Outcome::NotRunning;
            }
            let first = umount(directory, deadline).await;
            if first == Outcome::Ok || !force_unmount || !matches!(is_mounted(directory), Ok(true)) {
                return first;
            }
            tracing::warn!(directory = %directory.display(), ?first, "umount failed; killing the file system's users");
            match run_command(&fuser_kill_command(directory), deadline).await {
                // 1: nobody was using it; umount failed for another reason.
                Ok(out) => tracing::info!(code = ?out.code, killed = %out.stdout.trim(), "fuser"),
                Err(e) => tracing::warn!(error = %e, "fuser failed (is psmisc installed?)"),
            }
            // SIGKILL is asynchronous: a killed process lets go of the file
            // system only once it has exited. Retry while umount says busy.
            let mut last = umount(directory, deadline).await;
            for _ in 0..KILLED_USERS_UMOUNT_RETRIES {
                let busy = matches!(&last, Outcome::Failed(why) if why.contains("busy"));
                if !busy || Instant::now() + KILLED_USERS_UMOUNT_PAUSE >= deadline {
                    break;
                }
                tokio::time::sleep(KILLED_USERS_UMOUNT_PAUSE).await;
                last = umount(directory, deadline).await;
            }
            match last {
                Outcome::Ok => Outcome::Ok,
                // Still busy (a user blocked in the kernel on held I/O does
                // not die): detach the mount lazily, so the device below can
                // be detached and the volume demoted; the file system goes
                // once its last user does. Nothing it still holds was
                // acknowledged (writes are acknowledged after a flush).
                Outcome::Failed(why) if why.contains("busy") => {
                    tracing::warn!(directory = %directory.display(), "still busy after killing its users; unmounting lazily");
                    match run_command(&lazy_umount_command(directory), deadline).await {
                        Ok(out) if out.code == Some(0) => Outcome::Ok,
                        Ok(out) => {
                            Outcome::Failed(format!("{why} (after killing its users); umount -l: {}", out.describe()))
                        }
                        Err(e) => e.into(),
                    }
                }
                Outcome::Failed(why) => Outcome::Failed(format!("{why} (after killing its users)")),
                other => other,
            }
        }
    }
}

// ---- ip -----------------------------------------------------------------

pub fn ip_addr_command(verb: &str, address: &str, interface: &str) -> CommandSpec {
    CommandSpec::new("ip", &["addr", verb, address, "dev", interface])
}

pub fn ip_show_command(interface: &str) -> CommandSpec {
    CommandSpec::new("ip", &["-o", "addr", "show", "dev", interface])
}

/// Gratuitous ARP (iputils arping): two unsolicited replies so neighbours
/// update their caches at once.
pub fn arping_command(ip: IpAddr, interface: &str) -> CommandSpec {
    CommandSpec::new("arping", &["-U", "-c", "2", "-I", interface, &ip.to_string()])
}

/// Whether `ip -o addr show` output lists `address` (`10.0.0.1/24`).
pub fn address_listed(ip_output: &str, address: &str) -> bool {
    ip_output.lines().any(|line| {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if (w == "inet" || w == "inet6") && words.next() == Some(address) {
                return true;
            }
        }
        false
    })
}

async fn ip_present(address: &str, interface: &str, deadline: Instant) -> Result<bool, Outcome> {
    match run_command(&ip_show_command(interface), deadline).await {
        Ok(out) if out.code == Some(0) => Ok(address_listed(&out.stdout, address)),
        Ok(out) => Err(Outcome::Failed(format!("ip addr show dev {interface}: {}", out.describe()))),
        Err(e) => Err(e.into()),
    }
}

async fn ip_step(address: &str, ip: IpAddr, interface: &str, op: Op, deadline: Instant) -> Outcome {
    let present = ip_present(address, interface, deadline).await;
    match op {
        Op::Monitor => match present {
            Ok(true) => Outcome::Ok,
            Ok(false) => Outcome::NotRunning,
            Err(o) => o,
        },
        Op::Start => {
            match present {
                Ok(true) => {}
                Ok(false) => match run_command(&ip_addr_command("add", address, interface), deadline).await {
                    Ok(out) if out.code == Some(0) => {}
                    Ok(out) => {
                        return Outcome::Failed(format!("ip addr add {address} dev {interface}: {}", out.describe()))
                    }
                    Err(e) => return e.into(),
                },
                Err(o) => return o,
            }
            if ip.is_ipv4() {
                // In the background: it takes a second and is only a hint
                // to neighbours; the address works without it.
                let cmd = arping_command(ip, interface);
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_millis(ARP_TIMEOUT_MS);
                    match run_command(&cmd, deadline).await {
                        Ok(out) if out.code == Some(0) => tracing::debug!("gratuitous ARP sent"),
                        Ok(out) => tracing::warn!(why = %out.describe(), "gratuitous ARP failed"),
                        Err(e) => tracing::warn!(error = %e, "gratuitous ARP failed (is iputils-arping installed?)"),
                    }
                });
            }
            Outcome::Ok
        }
        Op::Stop => match present {
            Ok(false) => Outcome::NotRunning,
            // A missing interface holds no address.
            Err(Outcome::Failed(why)) if why.contains("does not exist") => Outcome::NotRunning,
            Err(o) => o,
            Ok(true) => match run_command(&ip_addr_command("del", address, interface), deadline).await {
                Ok(out) => zero_ok(&format!("ip addr del {address} dev {interface}"), &out),
                Err(e) => e.into(),
            },
        },
    }
}

// ---- ocf ----------------------------------------------------------------

/// OCF_ROOT for an agent: the part of its path before `/resource.d/`.
fn ocf_root(agent: &Path) -> (String, Option<String>) {
    let s = agent.to_string_lossy();
    match s.find("/resource.d/") {
        Some(i) => {
            let provider = s[i + "/resource.d/".len()..].split('/').next().map(str::to_owned);
            (s[..i].to_owned(), provider)
        }
        None => (OCF_ROOT_DEFAULT.to_owned(), None),
    }
}

/// Whether a parameter holds a secret (never logged).
pub fn is_secret_param(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("pass") || k.contains("secret") || k.contains("token")
}

/// `node`: this node's name, passed as Pacemaker does (`CRM_meta_on_node`).
pub fn ocf_command(step: &StepSpec, op: Op, node: Option<&str>, deadline: Instant) -> CommandSpec {
    let StepKind::Ocf { agent, params } = &step.kind else {
        unreachable!("ocf_command on a {} step", step.kind.name())
    };
    let mut c = CommandSpec::new(agent, &[op.as_str()]);
    let (root, provider) = ocf_root(agent);
    let ty = agent.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    c.env.push(("OCF_ROOT".into(), root));
    c.env.push(("OCF_RA_VERSION_MAJOR".into(), "1".into()));
    c.env.push(("OCF_RA_VERSION_MINOR".into(), "1".into()));
    c.env.push(("OCF_RESOURCE_INSTANCE".into(), step.name.clone()));
    c.env.push(("OCF_RESOURCE_TYPE".into(), ty));
    if let Some(p) = provider {
        c.env.push(("OCF_RESOURCE_PROVIDER".into(), p));
    }
    // As Pacemaker passes them: the operation's timeout and interval in ms.
    c.env.push(("OCF_RESKEY_CRM_meta_timeout".into(), remaining_ms(deadline).to_string()));
    let interval = if op == Op::Monitor { step.timing.monitor_interval_ms } else { 0 };
    c.env.push(("OCF_RESKEY_CRM_meta_interval".into(), interval.to_string()));
    if let Some(node) = node {
        c.env.push(("OCF_RESKEY_CRM_meta_on_node".into(), node.to_owned()));
    }
    for (k, v) in params {
        let key = format!("OCF_RESKEY_{k}");
        if is_secret_param(k) {
            c.secret_env.push(key.clone());
        }
        c.env.push((key, v.clone()));
    }
    c
}

fn ocf_code_name(code: i32) -> &'static str {
    match code {
        1 => "OCF_ERR_GENERIC",
        2 => "OCF_ERR_ARGS",
        3 => "OCF_ERR_UNIMPLEMENTED",
        4 => "OCF_ERR_PERM",
        5 => "OCF_ERR_INSTALLED",
        6 => "OCF_ERR_CONFIGURED",
        7 => "OCF_NOT_RUNNING",
        8 => "OCF_RUNNING_PROMOTED",
        9 => "OCF_FAILED_PROMOTED",
        _ => "unknown OCF code",
    }
}

/// OCF exit codes: 0 success (monitor: running), 7 not running (a success
/// for stop), 8 running promoted (counts as running); the rest fail.
pub fn ocf_outcome(op: Op, out: &ProcOutput) -> Outcome {
    match out.code {
        Some(0) => Outcome::Ok,
        Some(8) if op == Op::Monitor => Outcome::Ok,
        Some(7) if op != Op::Start => Outcome::NotRunning,
        Some(c) => {
            let last = super::exec::last_line(&out.stderr_tail);
            let tail = if last.is_empty() { String::new() } else { format!(": {last}") };
            Outcome::Failed(format!("{} ({c}){tail}", ocf_code_name(c)))
        }
        None => Outcome::Failed(out.describe()),
    }
}

// ---- systemd ------------------------------------------------------------

pub fn systemd_command(unit: &str, op: Op) -> CommandSpec {
    match op {
        Op::Start => CommandSpec::new("systemctl", &["start", "--", unit]),
        Op::Stop => CommandSpec::new("systemctl", &["stop", "--", unit]),
        Op::Monitor => CommandSpec::new("systemctl", &["is-active", "--quiet", "--", unit]),
    }
}

/// `systemctl is-active` exits 0 when active, 3 when inactive or failed.
pub fn systemd_outcome(op: Op, out: &ProcOutput) -> Outcome {
    match (op, out.code) {
        (_, Some(0)) => Outcome::Ok,
        (Op::Monitor, Some(3)) => Outcome::NotRunning,
        (op, _) => Outcome::Failed(format!("systemctl {}: {}", op.as_str(), out.describe())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fuse_backed_loop_device_names_its_server() {
        assert_eq!(super::fuse_server_pid("/run/replicator/attach/fuse-4242/volume"), Some(4242));
        assert_eq!(super::fuse_server_pid("/srv/disk.img"), None);
        assert_eq!(super::fuse_server_pid("/volume"), None);
        assert!(super::process_alive(std::process::id()));
        assert!(!super::process_alive(u32::MAX));
    }

    use super::*;
    use crate::group::config::StepTiming;
    use std::collections::BTreeMap;
    use std::ffi::OsString;

    fn args(c: &CommandSpec) -> Vec<String> {
        c.args.iter().map(|a: &OsString| a.to_string_lossy().into_owned()).collect()
    }

    fn out(code: i32, stderr: &str) -> ProcOutput {
        ProcOutput { code: Some(code), stdout: String::new(), stderr_tail: stderr.into() }
    }

    #[test]
    fn systemd_commands_and_codes() {
        let c = systemd_command("mta.service", Op::Start);
        assert_eq!(c.program, PathBuf::from("systemctl"));
        assert_eq!(args(&c), ["start", "--", "mta.service"]);
        assert_eq!(args(&systemd_command("mta.service", Op::Stop)), ["stop", "--", "mta.service"]);
        assert_eq!(args(&systemd_command("mta.service", Op::Monitor)), ["is-active", "--quiet", "--", "mta.service"]);
        assert_eq!(systemd_outcome(Op::Monitor, &out(0, "")), Outcome::Ok);
        assert_eq!(systemd_outcome(Op::Monitor, &out(3, "")), Outcome::NotRunning);
        assert!(
            matches!(systemd_outcome(Op::Start, &out(5, "Unit x not found")), Outcome::Failed(w) if w.contains("not found"))
        );
    }

    #[test]
    fn ocf_environment_and_exit_codes() {
        let params: BTreeMap<String, String> =
            [("ip".into(), "10.0.0.9".into()), ("admin_password".into(), "s3cret".into())].into();
        let step = StepSpec {
            name: "vip".into(),
            kind: StepKind::Ocf { agent: "/usr/lib/ocf/resource.d/heartbeat/IPaddr2".into(), params },
            timing: StepTiming::default(),
        };
        let c = ocf_command(&step, Op::Monitor, Some("b"), Instant::now() + Duration::from_secs(20));
        assert_eq!(args(&c), ["monitor"]);
        let env: BTreeMap<&str, &str> = c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(env["OCF_ROOT"], "/usr/lib/ocf");
        assert_eq!(env["OCF_RESOURCE_INSTANCE"], "vip");
        assert_eq!(env["OCF_RESOURCE_TYPE"], "IPaddr2");
        assert_eq!(env["OCF_RESOURCE_PROVIDER"], "heartbeat");
        assert_eq!(env["OCF_RESKEY_ip"], "10.0.0.9");
        assert_eq!(env["OCF_RESKEY_CRM_meta_interval"], "2000");
        assert_eq!(env["OCF_RESKEY_CRM_meta_on_node"], "b");
        let t: u64 = env["OCF_RESKEY_CRM_meta_timeout"].parse().unwrap();
        assert!((19_000..=20_000).contains(&t), "{t}");
        assert!(!c.describe().contains("s3cret"));
        // An agent outside an OCF tree still gets the standard root.
        let step = StepSpec { kind: StepKind::Ocf { agent: "/opt/x/agent".into(), params: BTreeMap::new() }, ..step };
        let c = ocf_command(&step, Op::Start, None, Instant::now());
        assert!(c.env.contains(&("OCF_ROOT".into(), OCF_ROOT_DEFAULT.into())));

        assert_eq!(ocf_outcome(Op::Monitor, &out(0, "")), Outcome::Ok);
        assert_eq!(ocf_outcome(Op::Monitor, &out(7, "")), Outcome::NotRunning);
        assert_eq!(ocf_outcome(Op::Monitor, &out(8, "")), Outcome::Ok);
        assert_eq!(ocf_outcome(Op::Stop, &out(7, "")), Outcome::NotRunning);
        // A start answering "not running" failed.
        assert!(matches!(ocf_outcome(Op::Start, &out(7, "")), Outcome::Failed(_)));
        assert!(
            matches!(ocf_outcome(Op::Start, &out(5, "binary missing")), Outcome::Failed(w) if w == "OCF_ERR_INSTALLED (5): binary missing")
        );
        assert!(
            matches!(ocf_outcome(Op::Monitor, &out(9, "")), Outcome::Failed(w) if w.contains("OCF_FAILED_PROMOTED"))
        );
    }

    #[test]
    fn filesystem_commands_and_fsck_codes() {
        let c = mount_command(Path::new("/dev/nbd0"), Path::new("/srv/mail"), "ext4", Some("noatime"));
        assert_eq!(args(&c), ["-t", "ext4", "-o", "noatime", "/dev/nbd0", "/srv/mail"]);
        let c = mount_command(Path::new("/dev/nbd0"), Path::new("/srv/mail"), "xfs", None);
        assert_eq!(args(&c), ["-t", "xfs", "/dev/nbd0", "/srv/mail"]);
        assert_eq!(args(&fsck_command(Path::new("/dev/nbd0"), "ext4")), ["-T", "-t", "ext4", "-a", "/dev/nbd0"]);
        assert_eq!(args(&fuser_kill_command(Path::new("/srv/mail"))), ["-k", "-M", "-m", "/srv/mail"]);
        assert_eq!(fsck_outcome(&out(0, "")), Outcome::Ok);
        assert_eq!(fsck_outcome(&out(1, "")), Outcome::Ok);
        assert_eq!(fsck_outcome(&out(2, "")), Outcome::Ok);
        assert!(
            matches!(fsck_outcome(&out(4, "UNEXPECTED INCONSISTENCY")), Outcome::Failed(w) if w.contains("UNEXPECTED"))
        );
        assert!(matches!(fsck_outcome(&out(8, "")), Outcome::Failed(_)));
    }

    #[test]
    fn mountinfo_parsing_handles_escapes() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    90 22 7:0 / /srv/mail\\040box rw,noatime shared:40 - ext4 /dev/loop0 rw\n";
        assert!(mounted_at(text, Path::new("/srv/mail box")));
        assert!(!mounted_at(text, Path::new("/srv/mail")));
        assert!(mounted_at(text, Path::new("/")));
        assert_eq!(unescape_mountinfo("a\\134b\\011"), "a\\b\t");
    }

    #[test]
    fn ip_commands_and_listing() {
        assert_eq!(
            args(&ip_addr_command("add", "10.0.0.100/24", "eth0")),
            ["addr", "add", "10.0.0.100/24", "dev", "eth0"]
        );
        assert_eq!(args(&ip_show_command("eth0")), ["-o", "addr", "show", "dev", "eth0"]);
        assert_eq!(
            args(&arping_command("10.0.0.100".parse().unwrap(), "eth0")),
            ["-U", "-c", "2", "-I", "eth0", "10.0.0.100"]
        );
        let show = "2: eth0    inet 10.0.0.1/24 brd 10.0.0.255 scope global eth0\\       valid_lft forever preferred_lft forever\n\
                    2: eth0    inet 10.0.0.100/24 scope global secondary eth0\\       valid_lft forever\n\
                    2: eth0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever\n";
        assert!(address_listed(show, "10.0.0.100/24"));
        assert!(!address_listed(show, "10.0.0.100/16"));
        assert!(!address_listed(show, "10.0.0.10/24"));
        assert!(address_listed(show, "fe80::1/64"));
    }

    #[test]
    fn a_forced_stop_ends_with_a_lazy_unmount() {
        assert_eq!(args(&lazy_umount_command(Path::new("/srv/mail"))), ["-l", "/srv/mail"]);
        assert_eq!(args(&fuser_kill_command(Path::new("/srv/mail"))), ["-k", "-M", "-m", "/srv/mail"]);
    }

    #[test]
    fn attach_commands() {
        let c = attach_command(Path::new("/usr/bin/replicator"), "mail", Some("a"));
        assert_eq!(args(&c), ["attach", "mail", "--node", "a"]);
        assert_eq!(args(&detach_command(Path::new("replicator"), Path::new("/dev/nbd2"))), ["detach", "/dev/nbd2"]);
    }
}
