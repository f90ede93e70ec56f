//! `replicator serve`: wires metadata, the I/O engine, listeners, the
//! control socket and metrics together, and runs until SIGTERM/SIGINT.
//!
//! Start-up order: open metadata → open the backing engine → load TLS →
//! bind every socket → mark the volume "not cleanly shut down" → announce
//! readiness. Shutdown order: stop accepting and reading → drain in-flight
//! requests (bounded) → flush the backing store → mark the volume clean.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::backing::{Backing, BackingConfig, IoOp, IoRequest};
use crate::config::ServeConfig;
use crate::control::{self, StatusReport, VolumeStatus};
use crate::limits;
use crate::metadata::{self, MetaLocation};
use crate::nbd::handshake::{ExportInfo, TlsMode};
use crate::server::{self, Listener, Shared};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Metadata(#[from] metadata::MetadataError),
    #[error(transparent)]
    Backing(#[from] crate::backing::BackingError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("failed to listen on {addr}: {cause}")]
    Listen { addr: String, cause: std::io::Error },
    #[error("failed to install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("disk {disk}: {cause}")]
    Lock { disk: PathBuf, cause: std::io::Error },
    #[error("failed to flush {disk} at shutdown: {cause}")]
    FinalFlush { disk: PathBuf, cause: String },
}

/// Runs the server until a termination signal; returns after a clean drain.
pub async fn run(config: ServeConfig) -> Result<(), ServeError> {
    crate::node::up::set_io_flusher();
    // Held until we return: no second server, and no create-md, on this disk.
    let _lock = crate::device::lock_disk(&config.disk)
        .map_err(|cause| ServeError::Lock { disk: config.disk.clone(), cause })?;
    let mut meta = {
        let (disk, location, read_only) = (config.disk.clone(), config.meta.clone(), config.read_only);
        tokio::task::spawn_blocking(move || metadata::open(&disk, &location, read_only))
            .await
            .expect("metadata task panicked")?
    };
    let data_size_bytes = meta.data_size_bytes();
    let volume_uuid = meta.superblock().volume_uuid;

    let mut backing_config = BackingConfig::new(config.disk.clone(), data_size_bytes);
    backing_config.read_only = config.read_only;
    backing_config.direct_io = config.direct_io;
    backing_config.io_threads = config.io_threads;
    backing_config.ring_entries = config.ring_entries;
    backing_config.busy_poll = std::time::Duration::from_micros(config.busy_poll_us.into());
    let backing = Backing::open(backing_config)?;

    let tls_acceptor = match &config.tls_files {
        Some(files) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(files)?)),
        None => None,
    };
    let export = ExportInfo {
        name: config.export.clone(),
        description: config.description.clone(),
        size_bytes: data_size_bytes,
        read_only: config.read_only,
        // With O_DIRECT, 512-byte alignment takes the fast path; unaligned
        // requests still work (through the buffered descriptor).
        block_size_min: if config.direct_io { 512 } else { 1 },
        block_size_preferred: limits::NBD_BLOCK_BYTES_PREFERRED,
        block_size_max: limits::NBD_REQUEST_BYTES_MAX,
        unavailable: None,
    };
    let shared = Arc::new(Shared::new(backing.clone(), export, config.tls_mode, tls_acceptor));

    // Bind everything before announcing readiness, so a client that reads
    // the announcement can connect at once.
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let listener =
            TcpListener::bind(addr).await.map_err(|cause| ServeError::Listen { addr: addr.clone(), cause })?;
        listeners.push(Listener::Tcp(listener));
    }
    for path in &config.unix {
        let listener = server::bind_unix(path)
            .await
            .map_err(|cause| ServeError::Listen { addr: path.display().to_string(), cause })?;
        listeners.push(Listener::Unix { listener, path: path.clone() });
    }
    let control_listener = control::bind(&config.control).await?;
    let metrics_listener = match &config.metrics_listen {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.map_err(|cause| ServeError::Listen { addr: addr.clone(), cause })?)
        }
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;

    if !config.read_only {
        tokio::task::block_in_place(|| meta.update(|sb| sb.flags.clean_shutdown = false))?;
    }

    let report = {
        let shared = shared.clone();
        let volume = VolumeStatus {
            disk: config.disk.display().to_string(),
            device_kind: format!("{:?}", backing.kind()),
            meta: match &config.meta {
                MetaLocation::Internal => "internal".to_string(),
                MetaLocation::External(path) => path.display().to_string(),
            },
            volume_uuid: volume_uuid.to_string(),
            export: config.export.clone(),
            size_bytes: data_size_bytes,
            read_only: config.read_only,
            direct_io: config.direct_io,
            tls: match config.tls_mode {
                TlsMode::Off => "off",
                TlsMode::Optional => "optional",
                TlsMode::Required => "required",
            }
            .to_string(),
            pid: std::process::id(),
        };
        Arc::new(move || StatusReport {
            volume: volume.clone(),
            clients: shared.clients.list(),
            io: shared.counters.snapshot(),
        }) as Arc<dyn Fn() -> StatusReport + Send + Sync>
    };

    // Stable readiness lines (tests and scripts parse these; logs may not be).
    for listener in &listeners {
        eprintln!("replicator: listening nbd {}", listener.describe());
    }
    eprintln!("replicator: listening control {}", config.control.display());
    let metrics_task = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            eprintln!("replicator: listening metrics {addr}");
        }
        let report = report.clone();
        tokio::spawn(crate::metrics::serve(listener, Arc::new(move || crate::metrics::render(&report()))))
    });
    if config.tls_mode == TlsMode::Off {
        tracing::info!("TLS disabled: NBD traffic is plaintext (set --tls optional|required to enable)");
    }
    tracing::info!(
        disk = %config.disk.display(),
        size_bytes = data_size_bytes,
        export = %config.export,
        read_only = config.read_only,
        "serving volume"
    );
    eprintln!("replicator: ready");

    let control_task = tokio::spawn(control::serve(control_listener, control::status_only(report.clone())));
    let accept_tasks: Vec<_> =
        listeners.into_iter().map(|listener| tokio::spawn(server::accept_loop(shared.clone(), listener))).collect();

    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shared.shutdown.send_replace(true);
    backing.close_hosted_input();
    for task in accept_tasks {
        let _ = task.await;
    }
    if !server::drain(&shared).await {
        tracing::warn!(
            seconds = limits::SHUTDOWN_DRAIN_SECS,
            "some clients did not finish in time; their unanswered requests are abandoned"
        );
    }
    control_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }

    if !config.read_only {
        final_flush(&backing).await.map_err(|cause| ServeError::FinalFlush { disk: config.disk.clone(), cause })?;
        tokio::task::block_in_place(|| meta.update(|sb| sb.flags.clean_shutdown = true))?;
    }
    tokio::task::block_in_place(|| backing.shutdown());
    for path in config.unix.iter().chain(std::iter::once(&config.control)) {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn final_flush(backing: &Backing) -> Result<(), String> {
    // One request, one completion.
    let (done, mut completions) = tokio::sync::mpsc::unbounded_channel();
    backing.submit(IoRequest { tag: 0, op: IoOp::Flush, done });
    match completions.recv().await {
        Some(completion) => completion.result.map(|_| ()).map_err(|failure| format!("{failure:?}")),
        None => Err("the I/O engine stopped".to_string()),
    }
}
