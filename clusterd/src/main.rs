//! `clusterd`: the cluster daemon (`clusterd run`) and its admin commands,
//! which talk to the local daemon over its root-only Unix socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};

use clusterd::config::{ClusterConfig, NodeRole};
use clusterd::control::{self, Request, Response, StatusReport};

#[derive(Parser)]
#[command(
    name = "clusterd",
    version,
    about = "Cluster manager of the mail appliance: heartbeats, a Raft cluster log, fencing, and the resource group that moves between the two storage nodes."
)]
struct Cli {
    /// Cluster configuration file.
    #[arg(long, global = true, default_value = "/etc/clusterd/cluster.toml")]
    config: PathBuf,
    /// This node's name in the configuration [default: the hostname].
    #[arg(long, global = true)]
    node: Option<String>,
    /// Admin socket of the local daemon [default: the node's `control` key].
    #[arg(long, global = true)]
    control: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run this node's daemon (foreground).
    Run {
        /// Run as the witness (a voter without storage); the node must have
        /// role = "witness".
        #[arg(long)]
        witness: bool,
    },
    /// Check the configuration and print what this node would do.
    CheckConfig,
    /// Show the cluster as this node sees it (like crm_mon).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Move every group to NODE (planned, no write lost).
    Promote {
        #[arg(id = "target", value_name = "NODE")]
        node: String,
    },
    /// Move every group NODE runs to its peer.
    Demote {
        #[arg(id = "target", value_name = "NODE")]
        node: String,
    },
    /// Move GROUP to NODE (planned switchover, no write lost).
    Move {
        group: String,
        #[arg(id = "target", value_name = "NODE")]
        node: String,
        /// Return once the move is logged instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for the move.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Put NODE in standby: it runs no group (its groups move away).
    Standby {
        #[arg(id = "target", value_name = "NODE")]
        node: String,
    },
    /// Bring NODE back from standby.
    Online {
        #[arg(id = "target", value_name = "NODE")]
        node: String,
    },
    /// Fence (power off) NODE with its configured fence devices.
    Fence {
        #[arg(id = "target", value_name = "NODE")]
        node: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Two-node mode: run no fence agent; you confirm NODE is really off
        /// (powered off, or its heartbeat and log links are cut for good), and
        /// this node becomes the cluster log's only voter and takes over.
        #[arg(long)]
        confirm_down: bool,
    },
    /// Clear resource failures of NODE (all nodes if omitted); with a GROUP
    /// name, re-probe that group's real state on this node too (a stuck
    /// stop retried at once, the volume re-read) like `crm_resource --cleanup`.
    Cleanup {
        #[arg(id = "target", value_name = "NODE|GROUP")]
        node: Option<String>,
    },
    /// Stream cluster events (one line each).
    Events,
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

/// An error that is the user's to fix (exit code 2).
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLUSTERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written is dropped; reporting that
        // would panic the daemon.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = real_main(cli) {
        let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("clusterd: {e:#}\n"));
        std::process::exit(if e.downcast_ref::<UsageError>().is_some() { 2 } else { 1 });
    }
}

fn node_name(cli: &Cli) -> anyhow::Result<String> {
    match &cli.node {
        Some(n) => Ok(n.clone()),
        None => {
            Ok(nix::unistd::gethostname().context("reading the hostname (pass --node)")?.to_string_lossy().into_owned())
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<ClusterConfig> {
    ClusterConfig::load(&cli.config).map_err(|e| UsageError(e.to_string()).into())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

/// The local daemon's admin socket.
fn control_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cli.control {
        return Ok(p.clone());
    }
    let cfg = load(cli)?;
    let name = node_name(cli)?;
    match cfg.node(&name) {
        Some((_, n)) => Ok(n.control.clone()),
        None => Err(UsageError(format!("node {name:?} is not in {}; pass --node", cli.config.display())).into()),
    }
}

fn call(path: &Path, request: Request) -> anyhow::Result<Response> {
    Ok(runtime()?.block_on(control::call(path, &request))?)
}

fn done(response: Response) -> anyhow::Result<()> {
    match response {
        Response::Done(m) => {
            println!("{m}");
            Ok(())
        }
        Response::Error(e) => Err(UsageError(e).into()),
        other => bail!("unexpected answer: {other:?}"),
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Run { witness } => {
            let cfg = load(&cli)?;
            let node = node_name(&cli)?;
            let role = cfg.node(&node).map(|(_, n)| n.role);
            match (witness, role) {
                (_, None) => {
                    return Err(UsageError(format!(
                        "node {node:?} is not in {}; pass --node NAME",
                        cli.config.display()
                    ))
                    .into())
                }
                (true, Some(NodeRole::Storage)) => {
                    return Err(UsageError(format!("{node} has role = \"storage\"; drop --witness")).into())
                }
                (false, Some(NodeRole::Witness)) => {
                    return Err(UsageError(format!("{node} has role = \"witness\"; run it with --witness")).into())
                }
                _ => {}
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("clusterd")
                .build()
                .context("starting the async runtime")?;
            rt.block_on(clusterd::daemon::run(clusterd::daemon::Options { config: cfg, node }))?;
            Ok(())
        }
        Cmd::CheckConfig => {
            let cfg = load(&cli)?;
            let node = node_name(&cli)?;
            println!("{}: the file is valid; mode {:?}", cli.config.display(), cfg.mode());
            for n in &cfg.nodes {
                println!(
                    "  node {:<12} {:<8} raft {}  heartbeat {:?}{}",
                    n.name,
                    format!("{:?}", n.role).to_lowercase(),
                    n.raft,
                    n.heartbeat,
                    if n.name == node { "  (this node)" } else { "" }
                );
            }
            for g in &cfg.groups {
                let spec = g.validate(false).map_err(|e| UsageError(format!("group {}: {e}", g.name)))?;
                let steps: Vec<&str> = spec.steps.iter().map(|s| s.name.as_str()).collect();
                println!("  group {}: volume {} -> {}", g.name, g.volume, steps.join(" -> "));
            }
            // What the file names on this host: keys, certificates, agents,
            // the replicator resource files (and their settings).
            let report = clusterd::preflight::check_host(&cfg, &cli.config, Some(&node));
            for n in &report.notes {
                println!("  {n}");
            }
            if !report.problems.is_empty() {
                for p in &report.problems {
                    eprintln!("clusterd: {p}");
                }
                return Err(UsageError(format!(
                    "{} problem(s) on this host; {} is not ready to run",
                    report.problems.len(),
                    cli.config.display()
                ))
                .into());
            }
            println!("{}: ready on this host", cli.config.display());
            Ok(())
        }
        Cmd::Status { json } => {
            let path = control_path(&cli)?;
            match call(&path, Request::Status)? {
                Response::Status(report) => {
                    if *json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        print!("{}", render_status(&report));
                    }
                    Ok(())
                }
                Response::Error(e) => Err(UsageError(e).into()),
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Cmd::Promote { node } => done(call(&control_path(&cli)?, Request::Promote { node: node.clone() })?),
        Cmd::Demote { node } => done(call(&control_path(&cli)?, Request::Demote { node: node.clone() })?),
        Cmd::Standby { node } => done(call(&control_path(&cli)?, Request::Standby { node: node.clone() })?),
        Cmd::Online { node } => done(call(&control_path(&cli)?, Request::Online { node: node.clone() })?),
        Cmd::Cleanup { node } => done(call(&control_path(&cli)?, Request::Cleanup { node: node.clone() })?),
        Cmd::Move { group, node, no_wait, timeout } => {
            let path = control_path(&cli)?;
            done(call(&path, Request::Move { group: group.clone(), node: node.clone() })?)?;
            if *no_wait {
                return Ok(());
            }
            // Done only once the log records the group served (services
            // started) on NODE at the current epoch, not merely granted.
            let deadline = Instant::now() + Duration::from_secs(*timeout);
            let mut last = String::from("no status yet");
            loop {
                if let Response::Status(s) = call(&path, Request::Status)? {
                    if let Some(g) = s.groups.iter().find(|g| &g.name == group) {
                        if g.served_by.as_deref() == Some(node.as_str()) {
                            println!("{group}: now on {node}");
                            return Ok(());
                        }
                        last = format!(
                            "owner {}{}, served by {}",
                            g.owner.as_deref().unwrap_or("none"),
                            if g.released { " (released)" } else { "" },
                            g.served_by.as_deref().unwrap_or("nobody")
                        );
                    }
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{group} is not yet served on {node} after {timeout} s ({last}); the move may still finish: see `clusterd status` and `clusterd events`"
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Cmd::Fence { node, yes, confirm_down } => {
            if !yes {
                if *confirm_down {
                    eprint!(
                        "Confirm that node {node} is really OFF (two writers would corrupt the volume) and \
                         that this node ran together with it last (otherwise this node's data may be older); \
                         this node then takes over alone. Type the node name to confirm: "
                    );
                } else {
                    eprint!("Fence (power off) node {node}? Type the node name to confirm: ");
                }
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).context("reading the confirmation")?;
                if line.trim() != node {
                    return Err(UsageError("not confirmed; nothing done (use --yes in scripts)".into()).into());
                }
            }
            done(call(&control_path(&cli)?, Request::Fence { node: node.clone(), confirm_down: *confirm_down })?)
        }
        Cmd::Events => {
            let path = control_path(&cli)?;
            runtime()?.block_on(async {
                let mut reader = control::connect(&path, &Request::Events).await?;
                while let Some(line) = control::read_line(&mut reader).await? {
                    match serde_json::from_slice::<Response>(&line)? {
                        Response::Event(e) => println!("{} {} {} {}", e.unix_ms, e.node, e.kind, e.message),
                        Response::Error(e) => return Err(UsageError(e).into()),
                        other => println!("{other:?}"),
                    }
                }
                Ok::<(), anyhow::Error>(())
            })
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "clusterd", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
    }
}

fn render_status(s: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Cluster {} (seen from {}): quorum {}{}",
        s.cluster,
        s.node,
        if s.quorum { "yes" } else { "NO" },
        match &s.leader {
            Some(l) => format!(", log leader {l}, term {}", s.term),
            None => ", no log leader".into(),
        }
    );
    if let Some(t) = &s.two_node {
        let _ = writeln!(out, "{t}");
    }
    let _ = writeln!(out, "\nNodes:");
    for n in &s.nodes {
        let _ = writeln!(
            out,
            "  {:<12} {:<8} {}{}",
            n.name,
            n.role,
            n.state,
            if n.this_node { "  (this node)" } else { "" }
        );
    }
    let _ = writeln!(out, "\nGroups:");
    for g in &s.groups {
        let owner = match (&g.owner, g.released) {
            (Some(o), false) => format!("on {o}"),
            (Some(o), true) => format!("released by {o}"),
            (None, _) => "stopped".into(),
        };
        let disks: Vec<String> = g.disks.iter().map(|d| format!("{} {}", d.node, d.state)).collect();
        let _ = writeln!(out, "  {} {owner} (epoch {}); disks: {}", g.name, g.epoch, disks.join(", "));
        if !g.failed.is_empty() {
            let _ = writeln!(out, "    FAILED on: {} (run `clusterd cleanup`)", g.failed.join(", "));
        }
        if !g.standby.is_empty() {
            let _ = writeln!(out, "    standby: {}", g.standby.join(", "));
        }
        let _ = writeln!(
            out,
            "    here: {}{}{}",
            g.local_role,
            if g.writable { ", writable" } else { "" },
            g.volume.as_ref().map(|v| format!("; volume {v}")).unwrap_or_default()
        );
        for r in &g.resources {
            let _ = writeln!(
                out,
                "    {:<12} {}{}",
                r.name,
                r.state,
                r.last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
            );
        }
    }
    if !s.fences.is_empty() {
        let _ = writeln!(out, "\nFencing history:");
        for f in &s.fences {
            let _ = writeln!(
                out,
                "  {} fenced by {}: {} (unix ms {})",
                f.node,
                f.by,
                if f.ok { "ok" } else { "FAILED" },
                f.unix_ms
            );
        }
    }
    let h = &s.heartbeat;
    let _ = writeln!(
        out,
        "\nHeartbeats: {} accepted, {} malformed, {} spoofed, {} replayed",
        h.accepted, h.malformed, h.spoofed, h.replayed
    );
    out
}
