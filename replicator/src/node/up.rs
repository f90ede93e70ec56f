//! `replicator up RES`: runs the local node of a replicated resource.
//!
//! Start-up: resource file → lock the disk → metadata (superblock, bitmap,
//! activity log) → I/O engine → replica core → link TLS → bind the
//! replication listener (higher node id), NBD listeners and the control
//! socket → readiness lines → serve. SIGTERM: stop NBD clients, drain,
//! then the replica persists its bitmap and a clean-shutdown flag.

use std::sync::{Arc, OnceLock, Weak};

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use super::driver::{self, AdminCall, AdminReply, Driver};
use super::resource::Resource;
use super::{link, ResourceError};
use crate::backing::{Backing, BackingConfig};
use crate::control::{self, ControlReply, ControlRequest, ControlResponse, ResourceCommand, ResourceReport};
use crate::limits;
use crate::metadata::{self, ActivityLogStore, BitmapStore};
use crate::nbd::handshake::{ExportInfo, TlsMode};
use crate::replication::replica::{Config, Persisted, Replica, Status};
use crate::server::{self, Listener, Shared};

/// Runs the resource until SIGTERM/SIGINT.
pub async fn run(res: Resource) -> Result<(), ResourceError> {
    set_io_flusher();
    let disk = res.local.disk.clone();
    let _lock = crate::device::lock_disk(&disk).map_err(|cause| ResourceError::Lock { disk: disk.clone(), cause })?;
    let (meta, bitmap_store, words, al_store, extents) = {
        let (disk, location) = (disk.clone(), res.local.meta.clone());
        tokio::task::spawn_blocking(move || -> Result<_, metadata::MetadataError> {
            let meta = metadata::open(&disk, &location, false)?;
            let (bitmap_store, words) = BitmapStore::load(&meta)?;
            let (al_store, extents) = ActivityLogStore::load(&meta)?;
            Ok((meta, bitmap_store, words, al_store, extents))
        })
        .await
        .expect("metadata task panicked")?
    };
    let sb = meta.superblock().clone();
    let size_bytes = sb.data_size_bytes;
    let persisted = Persisted {
        generations: sb.generations,
        consistent: sb.flags.consistent,
        outdated: sb.flags.outdated,
        primary: sb.flags.primary,
        crashed_primary: sb.flags.crashed_primary,
        clean_shutdown: sb.flags.clean_shutdown,
        epoch: sb.primary_epoch,
        bitmap_words: words,
        al_extents: extents,
    };
    let config = Config {
        resource: res.name.clone(),
        node_name: res.local.name.clone(),
        node_id: res.local.id,
        size_bytes,
        granularity_bytes: sb.bitmap_granularity_bytes,
        al_extent_bytes: sb.al_extent_bytes,
        al_extents_max: sb.al_extents_max,
        protocol: res.protocol,
        fencing: res.fencing,
        after_split_brain: res.after_split_brain,
        ping_interval_ms: res.ping_interval_ms,
        ping_timeout_ms: res.ping_timeout_ms,
        io_timeout_ms: res.io_timeout_ms,
        resync_rate_min_bytes_per_sec: res.resync_rate_min_bytes_per_sec,
        resync_rate_max_bytes_per_sec: res.resync_rate_max_bytes_per_sec,
        resync_chunk_bytes: limits::REPL_RESYNC_CHUNK_BYTES.max(sb.bitmap_granularity_bytes),
        resync_inflight_bytes_max: limits::REPL_RESYNC_INFLIGHT_BYTES_MAX,
        resync_checksums: res.resync_checksums,
        send_queue_bytes_max: res.send_queue_bytes,
        on_congestion: res.on_congestion,
        seed: uuid::Uuid::new_v4().as_u64_pair().0,
    };
    let replica: Replica<link::Payload> = Replica::new(config, persisted, 0);
    let backing = Backing::open(BackingConfig::new(disk.clone(), size_bytes))?;
    let tls = link::link_tls(&res)?;

    let export = ExportInfo {
        name: res.name.clone(),
        description: format!("replicated resource {} on {}", res.name, res.local.name),
        size_bytes,
        read_only: false,
        block_size_min: 1,
        block_size_preferred: limits::NBD_BLOCK_BYTES_PREFERRED,
        block_size_max: limits::NBD_REQUEST_BYTES_MAX,
        unavailable: None,
    };
    let mut shared = Shared::new(backing.clone(), export, TlsMode::Off, None);
    // The driver counts NBD clients (demotion refuses while any is
    // connected); the server state it asks is created just below.
    let cell: Arc<OnceLock<Weak<Shared>>> = Arc::default();
    let clients = {
        let cell = cell.clone();
        Arc::new(move || cell.get().and_then(Weak::upgrade).map_or(0, |s| s.clients.list().len()))
    };
    let (driver, parts) =
        Driver::new(replica, res.clone(), meta, bitmap_store, al_store, backing.clone(), tls, clients);
    shared.replica = Some(parts.handle.clone());
    let shared = Arc::new(shared);
    let _ = cell.set(Arc::downgrade(&shared));

    // Bind everything before announcing readiness.
    let peer_listener = if res.local.id > res.peer.id {
        let addr = res.local.address;
        Some(TcpListener::bind(addr).await.map_err(|cause| ResourceError::Listen { addr: addr.to_string(), cause })?)
    } else {
        None
    };
    let mut listeners = Vec::new();
    for addr in &res.local.nbd_listen {
        let l =
            TcpListener::bind(addr).await.map_err(|cause| ResourceError::Listen { addr: addr.to_string(), cause })?;
        listeners.push(Listener::Tcp(l));
    }
    for path in &res.local.nbd_unix {
        let l = server::bind_unix(path)
            .await
            .map_err(|cause| ResourceError::Listen { addr: path.display().to_string(), cause })?;
        listeners.push(Listener::Unix { listener: l, path: path.clone() });
    }
    let control_listener = control::bind(&res.local.control).await?;
    let metrics_listener = match res.local.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr).await.map_err(|cause| ResourceError::Listen { addr: addr.to_string(), cause })?,
        ),
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(ResourceError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ResourceError::Signals)?;

    for l in &listeners {
        eprintln!("replicator: listening nbd {}", l.describe());
    }
    if let Some(l) = &peer_listener {
        if let Ok(addr) = l.local_addr() {
            eprintln!("replicator: listening replication {addr}");
        }
    }
    eprintln!("replicator: listening control {}", res.local.control.display());
    let metrics_task = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            eprintln!("replicator: listening metrics {addr}");
        }
        let (status, shared, failures) = (parts.status.clone(), shared.clone(), parts.failures.clone());
        let body = move || {
            crate::metrics::render_resource(&resource_report(&shared, driver::state(&status.borrow(), &failures)))
        };
        tokio::spawn(crate::metrics::serve(listener, Arc::new(body)))
    });
    tracing::info!(resource = %res.name, node = %res.local.name, peer = %res.peer.name, protocol = ?res.protocol, "resource up");
    eprintln!("replicator: ready");

    let acceptor = peer_listener.map(|l| driver.spawn_acceptor(l));
    let (stop_tx, stop_rx) = watch::channel(false);
    // `replicator down RES` asks through the control socket.
    let (down_tx, mut down_rx) = watch::channel(false);
    let mut driver_task = tokio::spawn(driver.run(stop_rx));
    let control_task = tokio::spawn(control::serve(
        control_listener,
        handler(parts.admin.clone(), parts.status.clone(), shared.clone(), parts.failures.clone(), down_tx),
    ));
    let accept_tasks: Vec<_> =
        listeners.into_iter().map(|l| tokio::spawn(server::accept_loop(shared.clone(), l))).collect();

    let driver_result = tokio::select! {
        _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); None }
        _ = down_rx.wait_for(|down| *down) => { tracing::info!("`replicator down`: shutting down"); None }
        r = &mut driver_task => Some(r),
    };
    shared.shutdown.send_replace(true);
    for task in accept_tasks {
        let _ = task.await;
    }
    if !server::drain(&shared).await {
        tracing::warn!(seconds = limits::SHUTDOWN_DRAIN_SECS, "some clients did not finish in time");
    }
    control_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(a) = acceptor {
        a.abort();
    }
    // Told to stop, the driver persists the bitmap and a clean state.
    let driver_result = match driver_result {
        Some(r) => r,
        None => {
            stop_tx.send_replace(true);
            driver_task.await
        }
    };
    let result = driver_result.expect("driver task panicked").map_err(ResourceError::from);
    tokio::task::block_in_place(|| backing.shutdown());
    for path in res.local.nbd_unix.iter().chain(std::iter::once(&res.local.control)) {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// PR_SET_IO_FLUSHER: this process serves a block device that may be
/// mounted on this very host, so memory reclaim must not wait on it.
pub(crate) fn set_io_flusher() {
    if let Err(e) = kernel_glue::set_io_flusher() {
        tracing::info!("PR_SET_IO_FLUSHER not set ({e}); a volume attached on this host could deadlock under memory pressure without it (needs CAP_SYS_RESOURCE)");
    }
}

/// Control requests: status and admin commands go to the driver; events
/// stream state changes.
fn handler(
    admin: mpsc::Sender<AdminCall>,
    status: watch::Receiver<Status>,
    shared: Arc<Shared>,
    failures: Arc<link::LinkFailures>,
    down: watch::Sender<bool>,
) -> control::ControlHandler {
    let down = Arc::new(down);
    Arc::new(move |request| {
        let (admin, mut status, shared, failures) = (admin.clone(), status.clone(), shared.clone(), failures.clone());
        let down = down.clone();
        Box::pin(async move {
            let report = move |shared: &Shared, s: &Status| resource_report(shared, driver::state(s, &failures));
            match request {
                ControlRequest::Status => ControlReply::One(ControlResponse::Error(
                    "this server runs a replicated resource: use `replicator status RES`".into(),
                )),
                ControlRequest::Events => {
                    let (tx, rx) = mpsc::channel(16);
                    tokio::spawn(async move {
                        let key = |s: &Status| {
                            (s.role, s.disk, s.connection, s.peer_role, s.peer_disk, s.suspended, s.last_error.clone())
                        };
                        let mut last = None;
                        loop {
                            let current = status.borrow_and_update().clone();
                            if last.as_ref() != Some(&key(&current)) {
                                last = Some(key(&current));
                                let msg = ControlResponse::Resource(Box::new(report(&shared, &current)));
                                if tx.send(msg).await.is_err() {
                                    return;
                                }
                            }
                            if status.changed().await.is_err() {
                                return;
                            }
                        }
                    });
                    ControlReply::Stream(rx)
                }
                ControlRequest::Resource(ResourceCommand::Down) => {
                    // Like `secondary`: a connected client would see its
                    // device fail under it.
                    let clients = shared.clients.list().len();
                    let name = &shared.export.name;
                    ControlReply::One(if clients > 0 {
                        ControlResponse::Error(format!(
                            "{name}: {clients} NBD client(s) still connected; unmount and disconnect them first \
                             (e.g. `replicator detach`)"
                        ))
                    } else {
                        down.send_replace(true);
                        ControlResponse::Done(format!("{name}: stopping"))
                    })
                }
                ControlRequest::Resource(command) => {
                    let (reply_tx, reply_rx) = oneshot::channel();
                    if admin.send(AdminCall { command, reply: reply_tx }).await.is_err() {
                        return ControlReply::One(ControlResponse::Error("the resource is shutting down".into()));
                    }
                    let response = match reply_rx.await {
                        Ok(Ok(AdminReply::Done(message))) => ControlResponse::Done(message),
                        Ok(Ok(AdminReply::State(state))) => {
                            ControlResponse::Resource(Box::new(resource_report(&shared, *state)))
                        }
                        Ok(Err(message)) => ControlResponse::Error(message),
                        Err(_) => ControlResponse::Error("the resource is shutting down".into()),
                    };
                    ControlReply::One(response)
                }
            }
        })
    })
}

/// What `status RES` answers: the replica's state with this process's
/// clients and counters, stamped with the report's API version.
fn resource_report(shared: &Shared, state: control::ReplicaState) -> ResourceReport {
    ResourceReport {
        api_version: replicator_api::API_VERSION,
        state,
        clients: shared.clients.list(),
        io: shared.counters.snapshot(),
        pid: std::process::id(),
    }
}
