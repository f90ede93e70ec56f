//! The resource subcommands of the `replicator` binary: `up` and the admin
//! commands that talk to a running `up` over its control socket.

use anyhow::Context;

use replicator::control::{self, ControlRequest, ControlResponse, ResourceCommand, ResourceReport};
use replicator::replication::resource::{self, Resource};

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
    runtime.block_on(replicator::replication::up::run(res)).with_context(|| format!("resource {name}"))?;
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

pub fn status(args: &ResArgs, json: bool) -> anyhow::Result<()> {
    let res = load(args)?;
    let request = ControlRequest::Resource(ResourceCommand::Status);
    let ControlResponse::Resource(report) = runtime()?.block_on(control::call(&res.local.control, &request))? else {
        anyhow::bail!("unexpected answer from {}", res.local.control.display());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
        // Which local block device (attach) backs this node's export.
        let exports: Vec<String> = res
            .local
            .nbd_unix
            .iter()
            .map(|p| p.display().to_string())
            .chain(res.local.nbd_listen.iter().map(|a| a.to_string()))
            .collect();
        let attached = kernel_glue::record::list(std::path::Path::new(crate::attach::RUN_DIR_DEFAULT));
        for a in attached {
            if a.backend.as_deref().is_some_and(|b| exports.iter().any(|e| b.contains(e.as_str()))) {
                println!("  device: {} ({:?})", a.device.display(), a.method);
            }
        }
    }
    Ok(())
}

fn events(args: &ResArgs) -> anyhow::Result<()> {
    let res = load(args)?;
    runtime()?.block_on(control::stream(&res.local.control, &ControlRequest::Events, |response| {
        if let ControlResponse::Resource(r) = response {
            let s = &r.state;
            println!(
                "{} role:{} disk:{} connection:{} peer-role:{} peer-disk:{}{}",
                s.resource,
                s.role,
                s.disk,
                s.connection,
                s.peer_role.as_deref().unwrap_or("Unknown"),
                s.peer_disk.as_deref().unwrap_or("DUnknown"),
                s.last_error.as_deref().map(|e| format!(" error:{e:?}")).unwrap_or_default()
            );
        }
        true
    }))?;
    Ok(())
}

fn print_report(r: &ResourceReport) {
    let s = &r.state;
    let bytes = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
    println!("{} role:{}{}", s.resource, s.role, if s.suspended { " suspended:fencing" } else { "" });
    println!("  disk:{} (node {}, epoch {}, protocol {})", s.disk, s.node, s.epoch, s.protocol);
    println!(
        "  {} connection:{} role:{} disk:{}",
        s.peer_node.as_deref().unwrap_or("peer"),
        s.connection,
        s.peer_role.as_deref().unwrap_or("Unknown"),
        s.peer_disk.as_deref().unwrap_or("DUnknown")
    );
    println!("  out-of-sync: {}", bytes(s.out_of_sync_bytes));
    for (what, p) in [("resync", &s.resync), ("verify", &s.verify)] {
        if let Some(p) = p {
            let eta = p.eta_secs.map(|e| format!("{e} s")).unwrap_or_else(|| "?".into());
            println!(
                "  {what}: {:.1}% ({} of {}) at {}/s, eta {eta}",
                p.percent,
                bytes(p.done_bytes),
                bytes(p.total_bytes),
                bytes(p.rate_bytes_per_sec)
            );
        }
    }
    if s.verify_out_of_sync_bytes > 0 {
        println!("  last verify found {} out of sync", bytes(s.verify_out_of_sync_bytes));
    }
    let g = s.generations;
    println!("  generations: current {:016X} bitmap {:016X} history {:016X} {:016X}", g[0], g[1], g[2], g[3]);
    if let Some(e) = &s.last_error {
        println!("  last error: {e}");
    }
    println!("  nbd clients: {}, writes in flight: {}", r.clients.len(), s.writes_in_flight);
}
