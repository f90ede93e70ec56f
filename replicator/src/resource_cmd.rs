//! The resource subcommands of the `replicator` binary: `up` and the admin
//! commands that talk to a running `up` over its control socket.

use std::io::Write;

use anyhow::Context;

use replicator::control::{self, ControlRequest, ControlResponse, ResourceCommand, ResourceReport};
use replicator::node::resource::{self, Resource};
use replicator::replication::replica::Fencing;

use crate::UsageError;

#[derive(clap::Args)]
pub struct ResArgs {
    /// Resource name (`/etc/replicator/RES.toml`, or $REPLICATOR_RESOURCE_DIR)
    /// or the path of a resource file.
    pub res: String,
    /// This node's name in the resource file [default: the hostname].
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub res: ResArgs,
    /// Check the resource file and exit.
    #[arg(long)]
    pub validate: bool,
}

#[derive(clap::Subcommand)]
pub enum AdminCmd {
    /// Make this node primary (refused if the peer is primary or the local
    /// disk is not UpToDate, unless --force).
    Primary {
        #[command(flatten)]
        res: ResArgs,
        /// Promote even with a disk that is not UpToDate: its data becomes
        /// the truth and the peer is fully resynced from it.
        #[arg(long)]
        force: bool,
        /// Primary epoch (set by the cluster manager) [default: newest + 1].
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Make this node secondary (refused while NBD clients are connected).
    Secondary(ResArgs),
    /// Connect to the peer (from StandAlone).
    Connect {
        #[command(flatten)]
        res: ResArgs,
        /// On split brain, throw away this node's changes.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Drop the peer and stay StandAlone.
    Disconnect(ResArgs),
    /// Online verify: compare checksums with the peer, mark differences.
    Verify(ResArgs),
    /// Throw away the local data and resync everything from the peer.
    Invalidate(ResArgs),
    /// Resume I/O suspended by fencing (after fencing the peer by hand) or
    /// by `suspend-io`.
    ResumeIo(ResArgs),
    /// Hold I/O of the primary (writes wait, unanswered) until `resume-io` or
    /// demotion; the cluster manager uses it when its lease may end.
    SuspendIo(ResArgs),
    /// Mark the local data Outdated (for fence-peer handlers).
    Outdate(ResArgs),
    /// Stream state changes.
    Events(ResArgs),
    /// Stop the resource on this node cleanly (like `drbdadm down`): the
    /// running `up` persists its state and exits; refused while NBD
    /// clients are connected. Waits until the process has exited.
    Down(ResArgs),
}

pub fn load(args: &ResArgs) -> anyhow::Result<Resource> {
    let path = resource::resource_path(&args.res);
    resource::load(&path, args.node.as_deref()).map_err(|e| UsageError(e.to_string()).into())
}

/// Async worker threads for `up`: one per core left over by the I/O
/// thread (which has a core's worth of work under load), at least one.
/// A replicated write hops between the NBD session, the replica's task and
/// the link tasks; on one worker those hops are queue operations, on
/// several they are cross-thread wake-ups (a context switch each), which
/// cost more than the parallelism gains when the cores are busy anyway.
/// `TOKIO_WORKER_THREADS` overrides it.
fn up_worker_threads() -> usize {
    if let Some(n) = std::env::var("TOKIO_WORKER_THREADS").ok().and_then(|v| v.parse::<usize>().ok()) {
        if n > 0 {
            return n;
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_sub(1).max(1)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("failed to start the async runtime")
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let res = load(&args.res)?;
    if args.validate {
        // The files the link needs, and our certificate as the peer will
        // check it (`up` refuses only what it cannot use at all).
        replicator::node::link::check_link_tls(&res).map_err(|e| UsageError(format!("{}: {e}", res.path.display())))?;
    }
    if res.fencing == Fencing::ResourceOnly && res.fence_peer.is_none() {
        eprintln!(
            "replicator: {}: fencing = \"resource-only\" without handlers.fence-peer: every fence attempt fails \
             (writes go on unfenced)",
            res.path.display()
        );
    }
    if args.validate {
        println!(
            "resource {} is valid: node {} (id {}) on {}, peer {} at {}, protocol {:?}",
            res.name,
            res.local.name,
            res.local.id,
            res.local.disk.display(),
            res.peer.name,
            res.peer.address,
            res.protocol
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(up_worker_threads())
        .thread_name("replicator")
        .build()
        .context("failed to start the async runtime")?;
    let name = res.name.clone();
    runtime.block_on(replicator::node::up::run(res)).with_context(|| format!("resource {name}"))?;
    Ok(())
}

pub fn admin(cmd: AdminCmd) -> anyhow::Result<()> {
    let (args, command) = match cmd {
        AdminCmd::Primary { res, force, epoch } => (res, ResourceCommand::Primary { force, epoch }),
        AdminCmd::Secondary(res) => (res, ResourceCommand::Secondary),
        AdminCmd::Connect { res, discard_my_data } => (res, ResourceCommand::Connect { discard_my_data }),
        AdminCmd::Disconnect(res) => (res, ResourceCommand::Disconnect),
        AdminCmd::Verify(res) => (res, ResourceCommand::Verify),
        AdminCmd::Invalidate(res) => (res, ResourceCommand::Invalidate),
        AdminCmd::ResumeIo(res) => (res, ResourceCommand::ResumeIo),
        AdminCmd::SuspendIo(res) => (res, ResourceCommand::SuspendIo),
        AdminCmd::Outdate(res) => (res, ResourceCommand::Outdate),
        AdminCmd::Events(res) => return events(&res),
        AdminCmd::Down(res) => return down(&res),
    };
    let res = load(&args)?;
    if matches!(command, ResourceCommand::Primary { force: true, .. }) {
        eprintln!("replicator: FORCED promotion of {}: this node's data overwrites the peer's", res.name);
    }
    match runtime()?.block_on(control::call(&res.local.control, &ControlRequest::Resource(command)))? {
        ControlResponse::Done(message) => println!("{message}"),
        other => println!("{other:?}"),
    }
    Ok(())
}

/// How long `down` waits for `up` to exit: its own drain bound, and time
/// to persist the metadata.
const DOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(replicator::limits::SHUTDOWN_DRAIN_SECS + 30);

fn down(args: &ResArgs) -> anyhow::Result<()> {
    let res = load(args)?;
    let rt = runtime()?;
    let ctl = &res.local.control;
    let status = ControlRequest::Resource(ResourceCommand::Status);
    let ControlResponse::Resource(report) = rt.block_on(control::call(ctl, &status))? else {
        anyhow::bail!("unexpected answer from {}", ctl.display());
    };
    let pid = report.pid;
    match rt.block_on(control::call(ctl, &ControlRequest::Resource(ResourceCommand::Down)))? {
        ControlResponse::Done(_) => {}
        other => anyhow::bail!("unexpected answer from {}: {other:?}", ctl.display()),
    }
    // `up` removes its control socket last, just before it exits.
    let deadline = std::time::Instant::now() + DOWN_WAIT;
    let mut pause = std::time::Duration::from_millis(5);
    while ctl.exists() && crate::attach::process_alive(pid) {
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("failed to stop resource {}: `up` (pid {pid}) did not exit within {DOWN_WAIT:?}", res.name);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(100));
    }
    println!("{}: down", res.name);
    Ok(())
}

pub fn status(args: &ResArgs, json: bool) -> anyhow::Result<()> {
    let res = load(args)?;
    let request = ControlRequest::Resource(ResourceCommand::Status);
    let ControlResponse::Resource(report) = runtime()?.block_on(control::call(&res.local.control, &request))? else {
        anyhow::bail!("unexpected answer from {}", res.local.control.display());
    };
    let mut out = std::io::stdout().lock();
    let written = if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)
    } else {
        print_report(&mut out, &report, &res).and_then(|()| {
            // Which local block device (attach) backs this node's export.
            let uris = export_uris(&res);
            let attached = kernel_glue::record::list(std::path::Path::new(crate::attach::RUN_DIR_DEFAULT));
            for a in attached {
                if a.backend.as_deref().is_some_and(|b| uris.iter().any(|u| u == b)) {
                    writeln!(out, "  device: {} ({:?})", a.device.display(), a.method)?;
                }
            }
            Ok(())
        })
    };
    crate::stdout_written(written.and_then(|()| out.flush()))
}

/// The NBD URIs this node's export of the resource is attached by (as
/// `attach` records them and the kernel reports them): compared whole, so
/// another volume whose address or socket path merely contains ours is
/// not taken for it.
fn export_uris(res: &Resource) -> Vec<String> {
    res.local
        .nbd_unix
        .iter()
        .map(|p| kernel_glue::Endpoint::Unix(p.clone()))
        .chain(res.local.nbd_listen.iter().map(|a| kernel_glue::Endpoint::Tcp(a.to_string())))
        .map(|e| e.uri(&res.name))
        .collect()
}

fn events(args: &ResArgs) -> anyhow::Result<()> {
    let res = load(args)?;
    let mut out = std::io::stdout().lock();
    let mut written = Ok(());
    runtime()?.block_on(control::stream(&res.local.control, &ControlRequest::Events, |response| {
        if let ControlResponse::Resource(r) = response {
            let s = &r.state;
            written = writeln!(
                out,
                "{} role:{} disk:{} connection:{} peer-role:{} peer-disk:{}{}",
                s.resource,
                s.role,
                s.disk,
                s.connection,
                s.peer_role.map_or("Unknown", |r| r.as_str()),
                s.peer_disk.map_or("DUnknown", |d| d.as_str()),
                s.last_error.as_deref().map(|e| format!(" error:{e:?}")).unwrap_or_default()
            )
            .and_then(|()| out.flush());
        }
        written.is_ok()
    }))?;
    crate::stdout_written(written)
}

/// Bytes for people: exact below 1 KiB, else one decimal in the largest
/// binary unit that keeps the number at least 1 (so no amount but zero
/// shows as 0).
pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn print_report(out: &mut impl Write, r: &ResourceReport, res: &Resource) -> std::io::Result<()> {
    let s = &r.state;
    let bytes = human_bytes;
    writeln!(out, "{} role:{}{}", s.resource, s.role, if s.suspended { " suspended:fencing" } else { "" })?;
    writeln!(out, "  disk:{} (node {}, epoch {}, protocol {})", s.disk, s.node, s.epoch, s.protocol)?;
    // A peer that never connected has not told us its name: the resource
    // file has it.
    writeln!(
        out,
        "  {} connection:{} role:{} disk:{}",
        s.peer_node.as_deref().unwrap_or(&res.peer.name),
        s.connection,
        s.peer_role.map_or("Unknown", |r| r.as_str()),
        s.peer_disk.map_or("DUnknown", |d| d.as_str())
    )?;
    writeln!(out, "  out-of-sync: {}", bytes(s.out_of_sync_bytes))?;
    for (what, p) in [("resync", &s.resync), ("verify", &s.verify)] {
        if let Some(p) = p {
            let eta = p.eta_secs.map(|e| format!("{e} s")).unwrap_or_else(|| "?".into());
            writeln!(
                out,
                "  {what}: {:.1}% ({} of {}) at {}/s, eta {eta}",
                p.percent,
                bytes(p.done_bytes),
                bytes(p.total_bytes),
                bytes(p.rate_bytes_per_sec)
            )?;
        }
    }
    if s.verify_out_of_sync_bytes > 0 {
        writeln!(out, "  last verify found {} out of sync", bytes(s.verify_out_of_sync_bytes))?;
    }
    let g = s.generations;
    writeln!(out, "  generations: current {:016X} bitmap {:016X} history {:016X} {:016X}", g[0], g[1], g[2], g[3])?;
    if let Some(e) = &s.last_error {
        writeln!(out, "  last error: {e}")?;
    }
    if s.discard_my_data {
        writeln!(out, "  --discard-my-data pending: this node's changes go at the next handshake's split brain")?;
    }
    if let Some(e) = &s.link_failure {
        let age = s.link_failure_age_secs.map(|a| format!(" ({a} s ago)")).unwrap_or_default();
        writeln!(out, "  last link failure{age}: {e}")?;
    }
    writeln!(out, "  nbd clients: {}, writes in flight: {}", r.clients.len(), s.writes_in_flight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_amounts_never_show_as_zero() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(160 << 20), "160.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn the_device_list_matches_whole_export_uris_only() {
        let text = r#"
[resource]
name = "r0"
[net]
tls = "plaintext-lab"
[[node]]
name = "a"
id = 0
address = "10.0.0.1:7789"
disk = "/dev/vdb"
nbd-listen = ["10.0.0.1:1080"]
nbd-unix = ["/run/r0.nbd"]
[[node]]
name = "b"
id = 1
address = "10.0.0.2:7789"
disk = "/dev/vdb"
nbd-listen = ["10.0.0.2:1080"]
"#;
        let res = resource::parse(std::path::Path::new("r0.toml"), text, Some("a")).unwrap();
        let uris = export_uris(&res);
        assert!(uris.contains(&"nbd://10.0.0.1:1080/r0".to_string()), "{uris:?}");
        assert!(uris.contains(&"nbd+unix:///r0?socket=/run/r0.nbd".to_string()), "{uris:?}");
        // Another volume's exports, each containing ours as text.
        for other in ["nbd://10.0.0.1:10809/r0", "nbd://10.0.0.1:1080/r01", "nbd+unix:///r0?socket=/run/r0.nbd2"] {
            assert!(!uris.iter().any(|u| u == other), "{other} matched {uris:?}");
        }
    }
}
