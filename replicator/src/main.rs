//! The `replicator` command: thin glue over the library.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.

mod resource_cmd;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use replicator::config::{self, Overrides};
use replicator::metadata::{self, CreateOptions, MetaLocation};
use replicator::nbd::handshake::TlsMode;

mod attach;

#[derive(Parser)]
#[command(name = "replicator", version, about = "A replicated block volume served over NBD")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Initialise metadata for a volume on a backing file or block device.
    CreateMd(CreateMdArgs),
    /// Print a volume's metadata superblock as JSON.
    DumpMd(DiskArgs),
    /// Serve a volume over NBD (foreground daemon).
    Serve(Box<ServeArgs>),
    /// Run this node of a replicated resource (foreground daemon).
    Up(resource_cmd::UpArgs),
    #[command(flatten)]
    Admin(resource_cmd::AdminCmd),
    /// Show a resource's (or a plain server's) state, clients and I/O.
    Status(StatusArgs),
    /// Make a block device of an NBD export; prints its path.
    Attach(attach::AttachArgs),
    /// Take away a device made by `attach`.
    Detach(attach::DetachArgs),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

#[derive(clap::Args)]
struct DiskArgs {
    /// Backing file or block device.
    #[arg(long)]
    disk: PathBuf,
    /// Metadata location: `internal` (end of the disk) or a file path.
    #[arg(long, default_value = "internal")]
    meta: String,
}

#[derive(clap::Args)]
struct CreateMdArgs {
    #[command(flatten)]
    disk: DiskArgs,
    /// Bytes of data per dirty-bitmap bit (power of two, 512 B to 1 MiB).
    #[arg(long, default_value_t = 4096)]
    bitmap_granularity: u32,
    /// Hot extents the activity log tracks.
    #[arg(long, default_value_t = 1237)]
    al_extents: u32,
    /// Overwrite existing metadata or data where internal metadata goes.
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum TlsArg {
    Off,
    Optional,
    Required,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Backing file or block device.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Metadata location: `internal` or a file path [default: internal].
    #[arg(long)]
    meta: Option<String>,
    /// NBD export name [default: volume]; the empty name also selects it.
    #[arg(long)]
    export: Option<String>,
    /// Export description shown to clients.
    #[arg(long)]
    description: Option<String>,
    /// Serve the volume read-only.
    #[arg(long)]
    read_only: bool,
    /// Use O_DIRECT for aligned I/O on the backing store.
    #[arg(long)]
    direct_io: bool,
    /// TCP address to listen on (repeatable) [default: 127.0.0.1:10809].
    #[arg(long, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// Unix socket to listen on (repeatable).
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// TLS through NBD_OPT_STARTTLS: off, optional or required.
    #[arg(long, value_enum)]
    tls: Option<TlsArg>,
    /// Server certificate chain (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA whose client certificates are required (mutual TLS).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Control socket for `replicator status`.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics on HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
    /// I/O threads, each owning one io_uring.
    #[arg(long)]
    io_threads: Option<usize>,
    /// After a request, keep polling the connections this many µs before
    /// sleeping (lower latency for a little CPU; 0 turns it off) [default: 50]
    #[arg(long, value_name = "MICROSECONDS")]
    busy_poll_us: Option<u32>,
    /// Check the configuration and exit.
    #[arg(long)]
    validate: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Resource name or file (omit for a plain `serve`).
    res: Option<String>,
    /// This node's name in the resource file [default: the hostname].
    #[arg(long)]
    node: Option<String>,
    /// Control socket of a plain `serve`.
    #[arg(long, value_name = "PATH", default_value = config::CONTROL_SOCKET_DEFAULT)]
    control: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// An error that is the user's to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr on a full disk or
        // closed) is dropped; reporting that would panic the daemon.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REPLICATOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "replicator: {err:#}");
            if err.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// The result of printing to stdout: a reader that went away (`status |
/// head -1`) is not an error, and must not be a panic.
pub(crate) fn stdout_written(result: std::io::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("failed to write to stdout")?),
    }
}

fn parse_meta(meta: &str) -> anyhow::Result<MetaLocation> {
    meta.parse::<MetaLocation>().map_err(|e| UsageError(format!("--meta {meta:?}: {e}")).into())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::CreateMd(args) => {
            let mut options = CreateOptions::new(args.disk.disk.clone(), parse_meta(&args.disk.meta)?);
            options.bitmap_granularity_bytes = args.bitmap_granularity;
            options.al_extents_max = args.al_extents;
            options.force = args.force;
            // A missing disk is reported by create itself, with the fix.
            let _lock = match args.disk.disk.exists() {
                true => Some(
                    replicator::device::lock_disk(&args.disk.disk)
                        .with_context(|| format!("failed to lock {}", args.disk.disk.display()))?,
                ),
                false => None,
            };
            let meta = metadata::create(&options)
                .with_context(|| format!("failed to create metadata on {}", args.disk.disk.display()))?;
            let sb = meta.superblock();
            println!(
                "created metadata on {} ({}): volume {} with {} bytes of data",
                args.disk.disk.display(),
                args.disk.meta,
                sb.volume_uuid,
                sb.data_size_bytes
            );
            Ok(())
        }
        Cmd::DumpMd(args) => {
            let meta = metadata::open(&args.disk, &parse_meta(&args.meta)?, true)
                .with_context(|| format!("failed to read metadata of {}", args.disk.display()))?;
            println!("{}", serde_json::to_string_pretty(meta.superblock())?);
            Ok(())
        }
        Cmd::Serve(args) => serve(*args),
        Cmd::Up(args) => resource_cmd::up(args),
        Cmd::Admin(cmd) => resource_cmd::admin(cmd),
        Cmd::Status(args) => match args.res {
            Some(res) => resource_cmd::status(&resource_cmd::ResArgs { res, node: args.node }, args.json),
            None => status(args),
        },
        Cmd::Attach(args) => attach::attach(args),
        Cmd::Detach(args) => attach::detach(args),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "replicator", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        config_file: args.config,
        disk: args.disk,
        meta: args.meta,
        export: args.export,
        description: args.description,
        read_only: args.read_only,
        direct_io: args.direct_io,
        listen: args.listen,
        unix: args.unix,
        tls_mode: args.tls.map(|t| match t {
            TlsArg::Off => TlsMode::Off,
            TlsArg::Optional => TlsMode::Optional,
            TlsArg::Required => TlsMode::Required,
        }),
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_client_ca: args.tls_client_ca,
        control: args.control,
        metrics_listen: args.metrics_listen,
        io_threads: args.io_threads,
        busy_poll_us: args.busy_poll_us,
    };
    let config = config::resolve(overrides).map_err(|e| UsageError(e.to_string()))?;
    if args.validate {
        println!("configuration is valid: {config:#?}");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("replicator")
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(replicator::daemon::run(config))?;
    Ok(())
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(replicator::control::query_status(&args.control))?;
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)
    } else {
        print_status(&mut out, &report)
    };
    stdout_written(written.and_then(|()| out.flush()))
}

fn print_status(out: &mut impl Write, report: &replicator::control::StatusReport) -> std::io::Result<()> {
    let v = &report.volume;
    writeln!(out, "volume {} ({})", v.export, v.volume_uuid)?;
    writeln!(out, "  disk:      {} ({}, metadata {})", v.disk, v.device_kind, v.meta)?;
    writeln!(out, "  size:      {} bytes", v.size_bytes)?;
    writeln!(
        out,
        "  mode:      {}{}",
        if v.read_only { "read-only" } else { "read-write" },
        if v.direct_io { ", direct I/O" } else { "" }
    )?;
    writeln!(out, "  tls:       {}", v.tls)?;
    writeln!(out, "  pid:       {}", v.pid)?;
    writeln!(out, "clients: {}", report.clients.len())?;
    for c in &report.clients {
        writeln!(out, "  #{} {} {} {}{}", c.id, c.transport, c.peer, c.phase, if c.tls { " tls" } else { "" })?;
    }
    let io = &report.io;
    writeln!(out, "io:")?;
    writeln!(out, "  reads {} ({} bytes), writes {} ({} bytes)", io.reads, io.bytes_read, io.writes, io.bytes_written)?;
    writeln!(out, "  reads sent from a mapping of the disk {}", io.reads_mapped)?;
    writeln!(
        out,
        "  flushes {}, trims {}, zeroes {}, block-status {}",
        io.flushes, io.trims, io.zeroes, io.block_status
    )?;
    writeln!(
        out,
        "  errors {}, protocol errors {}, connections {}",
        io.errors, io.protocol_errors, io.connections_total
    )
}
