//! The shell around [`Replica`]: one tokio task owns it, feeds it every
//! input (NBD writes, disk completions, link events, admin commands,
//! timers) and carries out its actions in order: metadata persistence
//! (synchronous, before the next action), disk operations on the io_uring
//! engine, frames to the link writer, answers to NBD sessions, the fence
//! handler.
//!
//! [`ReplicaHandle`] is what the NBD server holds: reads go straight to
//! the backing engine (a primary's disk is current), writes, trims, zeroes
//! and flushes go through the replica.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use super::link::{self, LinkEvent, LinkFailures, LinkStream, LinkTls, LinkWriter, Payload};
use super::resource::Resource;
use crate::backing::{Backing, CompletionSender, IoCompletion, IoFailure, IoOp, IoOutput, IoRequest};
use crate::control::{ProgressReport, ReplicaState, ResourceCommand};
use crate::limits;
use crate::metadata::{ActivityLogStore, BitmapStore, Metadata, MetadataError};
use crate::replication::message::{Role, WriteKind};
use crate::replication::replica::{
    Action, AdminError, AppId, AppWrite, DiskOp, DiskOutput, IoId, LinkId, Replica, Status,
};

/// Most queued inputs of each kind handled before the driver acts.
const DRAIN_MAX: usize = 64;

/// The NBD server's view of a replicated volume.
#[derive(Clone)]
pub struct ReplicaHandle {
    app: mpsc::Sender<IoRequest>,
    backing: Backing,
    primary: watch::Receiver<bool>,
    resource: String,
}

impl ReplicaHandle {
    pub fn submit_batch(&self, reqs: impl IntoIterator<Item = IoRequest>) {
        for req in reqs {
            match req.op {
                IoOp::Read { .. } | IoOp::BlockStatus { .. } => self.backing.submit(req),
                _ => {
                    // Never full: see `REPL_APP_QUEUE_REQUESTS_MAX`.
                    match self.app.try_send(req) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Closed(req)) => {
                            let _ = req.done.send(IoCompletion { tag: req.tag, result: Err(IoFailure::EngineStopped) });
                        }
                        Err(mpsc::error::TrySendError::Full(req)) => {
                            tracing::error!(
                                resource = %self.resource,
                                "bug: the volume's request queue is full ({} requests); failing the request",
                                limits::REPL_APP_QUEUE_REQUESTS_MAX
                            );
                            let _ = req.done.send(IoCompletion { tag: req.tag, result: Err(IoFailure::EngineStopped) });
                        }
                    }
                }
            }
        }
    }

    /// Why a new NBD client may not open the volume now (a secondary's
    /// data may be behind or mid-resync).
    pub fn unavailable(&self) -> Option<String> {
        (!*self.primary.borrow())
            .then(|| format!("resource {} is Secondary on this node; connect to the primary", self.resource))
    }
}

/// Where an admin command's answer goes.
pub type AdminReplyTx = oneshot::Sender<Result<AdminReply, String>>;

/// An admin command and where to send its answer.
pub struct AdminCall {
    pub command: ResourceCommand,
    pub reply: AdminReplyTx,
}

pub enum AdminReply {
    Done(String),
    State(Box<ReplicaState>),
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("failed to persist replication metadata: {0}")]
    Persist(#[from] MetadataError),
}

pub struct Driver {
    replica: Replica<Payload>,
    res: Resource,
    meta: Metadata,
    bitmap_store: BitmapStore,
    al_store: ActivityLogStore,
    backing: Backing,
    start: Instant,
    app_rx: mpsc::Receiver<IoRequest>,
    disk_tx: CompletionSender,
    disk_rx: mpsc::UnboundedReceiver<IoCompletion>,
    link_tx: mpsc::Sender<LinkEvent>,
    link_rx: mpsc::Receiver<LinkEvent>,
    stream_tx: mpsc::Sender<Result<Box<dyn LinkStream>, String>>,
    stream_rx: mpsc::Receiver<Result<Box<dyn LinkStream>, String>>,
    fence_tx: mpsc::Sender<bool>,
    fence_rx: mpsc::Receiver<bool>,
    admin_rx: mpsc::Receiver<AdminCall>,
    pending_app: HashMap<AppId, (u64, CompletionSender)>,
    next_app: AppId,
    checksum_ios: HashSet<IoId>,
    link: Option<(LinkId, LinkWriter)>,
    next_link: LinkId,
    connecting: bool,
    next_attempt: Instant,
    tls: Option<LinkTls>,
    status_tx: watch::Sender<Status>,
    primary_tx: watch::Sender<bool>,
    nbd_clients: Arc<dyn Fn() -> usize + Send + Sync>,
    /// Role-change answers held until the peer applied the change, so a
    /// `secondary` here followed by `primary` there never races.
    settling: Vec<(AdminReplyTx, String, Instant)>,
    /// Receive budget held by peer data until its write completes.
    permits: HashMap<IoId, tokio::sync::OwnedSemaphorePermit>,
    /// Failed connection attempts and handshakes, both directions.
    failures: Arc<LinkFailures>,
}

/// What `up` needs to talk to a running driver.
pub struct DriverParts {
    pub handle: ReplicaHandle,
    pub admin: mpsc::Sender<AdminCall>,
    pub status: watch::Receiver<Status>,
    /// Failed connection attempts and handshakes, for `status`.
    pub failures: Arc<LinkFailures>,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        replica: Replica<Payload>,
        res: Resource,
        meta: Metadata,
        bitmap_store: BitmapStore,
        al_store: ActivityLogStore,
        backing: Backing,
        tls: Option<LinkTls>,
        nbd_clients: Arc<dyn Fn() -> usize + Send + Sync>,
    ) -> (Driver, DriverParts) {
        let (app_tx, app_rx) = mpsc::channel(limits::REPL_APP_QUEUE_REQUESTS_MAX);
        let (disk_tx, disk_rx) = mpsc::unbounded_channel();
        let (link_tx, link_rx) = mpsc::channel(256);
        let (stream_tx, stream_rx) = mpsc::channel(4);
        let (fence_tx, fence_rx) = mpsc::channel(1);
        let (admin_tx, admin_rx) = mpsc::channel(16);
        let status = replica.status(0);
        let (status_tx, status_rx) = watch::channel(status);
        let (primary_tx, primary_rx) = watch::channel(replica.role() == Role::Primary);
        let handle =
            ReplicaHandle { app: app_tx, backing: backing.clone(), primary: primary_rx, resource: res.name.clone() };
        let driver = Driver {
            replica,
            res,
            meta,
            bitmap_store,
            al_store,
            backing,
            start: Instant::now(),
            app_rx,
            disk_tx,
            disk_rx,
            link_tx,
            link_rx,
            stream_tx,
            stream_rx,
            fence_tx,
            fence_rx,
            admin_rx,
            pending_app: HashMap::new(),
            next_app: 1,
            checksum_ios: HashSet::new(),
            link: None,
            next_link: 1,
            connecting: false,
            next_attempt: Instant::now(),
            tls,
            status_tx,
            primary_tx,
            nbd_clients,
            settling: Vec::new(),
            permits: HashMap::new(),
            failures: Arc::default(),
        };
        let failures = driver.failures.clone();
        (driver, DriverParts { handle, admin: admin_tx, status: status_rx, failures })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Accepts peer connections until the task is aborted (the node with
    /// the higher id); see [`link::accept_loop`].
    pub fn spawn_acceptor(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        tokio::spawn(link::accept_loop(
            listener,
            self.tls.clone(),
            Duration::from_millis(self.res.io_timeout_ms),
            self.res.peer.address.ip(),
            self.failures.clone(),
            self.stream_tx.clone(),
        ))
    }

    /// Runs until `shutdown` flips; then persists a clean state.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), DriverError> {
        self.execute()?;
        loop {
            self.maybe_connect();
            let now = self.now_ms();
            let wake = self.replica.poll_timeout().map(|t| self.start + Duration::from_millis(t.max(now)));
            let reconnect =
                (self.replica.wants_link() && self.link.is_none() && !self.connecting).then_some(self.next_attempt);
            tokio::select! {
                Some(req) = self.app_rx.recv() => self.app_request(req),
                Some(done) = self.disk_rx.recv() => self.disk_done(done),
                Some(event) = self.link_rx.recv() => self.link_event(event),
                Some(stream) = self.stream_rx.recv() => {
                    self.connecting = false;
                    match stream {
                        Ok(stream) => self.stream_up(stream),
                        Err(why) => {
                            // Already recorded (and logged) by the task that dialled.
                            tracing::trace!(resource = %self.res.name, "connect attempt failed: {why}");
                            self.next_attempt = Instant::now() + Duration::from_millis(self.res.connect_interval_ms);
                        }
                    }
                }
                Some(ok) = self.fence_rx.recv() => {
                    let now = self.now_ms();
                    self.replica.handle_fence_result(now, ok);
                }
                Some(call) = self.admin_rx.recv() => self.admin(call),
                _ = sleep_until(wake), if wake.is_some() => {
                    let now = self.now_ms();
                    self.replica.handle_timeout(now);
                }
                _ = sleep_until(reconnect), if reconnect.is_some() => {}
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        self.quiesce().await?;
                        let now = self.now_ms();
                        self.replica.shutdown(now);
                        self.execute()?;
                        if let Some((_, writer)) = self.link.take() {
                            writer.close();
                        }
                        return Ok(());
                    }
                }
            }
            // Take whatever else already arrived before acting, so the
            // actions of many requests go out together (one engine wake-up,
            // one link write).
            self.drain_ready();
            self.execute()?;
        }
    }

    /// Lets the last writes become durable on both disks (bounded by the
    /// I/O timeout), so that the stop is clean: without it a restart
    /// recovers as after a crash.
    async fn quiesce(&mut self) -> Result<(), DriverError> {
        let now = self.now_ms();
        self.replica.quiesce(now);
        self.execute()?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.res.io_timeout_ms);
        while !self.replica.is_quiescent() {
            tokio::select! {
                Some(done) = self.disk_rx.recv() => self.disk_done(done),
                Some(event) = self.link_rx.recv() => self.link_event(event),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(resource = %self.res.name, "stopping with writes not yet flushed on both nodes; the next start recovers them");
                    return Ok(());
                }
            }
            self.execute()?;
        }
        Ok(())
    }

    /// Handles the requests, completions and link events already queued
    /// (bounded, so a flood cannot starve timers and admin commands).
    fn drain_ready(&mut self) {
        debug_assert!(
            self.disk_rx.len() <= limits::REPL_DISK_COMPLETIONS_MAX,
            "more disk completions queued than operations can be in flight"
        );
        for _ in 0..DRAIN_MAX {
            let mut any = false;
            if let Ok(req) = self.app_rx.try_recv() {
                self.app_request(req);
                any = true;
            }
            if let Ok(done) = self.disk_rx.try_recv() {
                self.disk_done(done);
                any = true;
            }
            if let Ok(event) = self.link_rx.try_recv() {
                self.link_event(event);
                any = true;
            }
            if !any {
                return;
            }
        }
    }

    fn maybe_connect(&mut self) {
        let connector = self.res.local.id < self.res.peer.id;
        if !connector || !self.replica.wants_link() || self.link.is_some() || self.connecting {
            return;
        }
        if Instant::now() < self.next_attempt {
            return;
        }
        self.connecting = true;
        let (addr, tls, tx) = (self.res.peer.address, self.tls.clone(), self.stream_tx.clone());
        let (failures, peer) = (self.failures.clone(), self.res.peer.name.clone());
        let timeout = Duration::from_millis(self.res.io_timeout_ms);
        tokio::spawn(async move {
            let result = link::connect(addr, tls.as_ref(), timeout).await.map_err(|e| {
                // A TLS failure here (wrong CA, certificate, name) is as
                // much the admin's business as on the accepting side.
                failures.record(e.is_handshake(), &format!("connecting to {peer} at {addr} failed"), e.to_string());
                e.to_string()
            });
            let _ = tx.send(result).await;
        });
    }

    fn stream_up(&mut self, stream: Box<dyn LinkStream>) {
        if !self.replica.wants_link() || self.link.is_some() {
            return; // dropped: closes the connection
        }
        let id = self.next_link;
        self.next_link += 1;
        let bitmap_bytes = self.replica.bitmap().words().len() as u64 * 8;
        let writer = link::start(id, stream, self.link_tx.clone(), limits::link_bulk_queue_bytes_max(bitmap_bytes));
        self.link = Some((id, writer));
        tracing::info!(resource = %self.res.name, peer = %self.res.peer.name, link = id, "connected to the peer");
        let now = self.now_ms();
        self.replica.handle_connected(now, id);
    }

    fn link_event(&mut self, event: LinkEvent) {
        let now = self.now_ms();
        match event {
            LinkEvent::Message { link, msg } => self.replica.handle_message(now, link, msg),
            LinkEvent::FrameError { link, error } => self.replica.handle_frame_error(now, link, &error),
            LinkEvent::Closed { link, why, tls_alert } => {
                if self.link.as_ref().is_some_and(|(id, _)| *id == link) {
                    if tls_alert {
                        // Typically the peer refusing our certificate (TLS
                        // 1.3 tells the client only now).
                        let context = format!("the link to {} was closed by a TLS alert", self.res.peer.name);
                        self.failures.record(
                            true,
                            &context,
                            format!(
                                "{why} (does the peer trust our CA, and is our certificate for node {:?}?)",
                                self.res.local.name
                            ),
                        );
                    }
                    tracing::info!(resource = %self.res.name, "link closed: {why}");
                    if let Some((_, writer)) = self.link.take() {
                        writer.close();
                    }
                    self.next_attempt = Instant::now() + Duration::from_millis(self.res.connect_interval_ms);
                }
                self.replica.handle_disconnected(now, link);
            }
        }
    }

    fn app_request(&mut self, req: IoRequest) {
        let now = self.now_ms();
        let id = self.next_app;
        self.next_app += 1;
        let IoRequest { tag, op, done } = req;
        let write = |kind, offset, len, fua, data| AppWrite { id, offset, len, kind, fua, data };
        let w = match op {
            IoOp::Write { offset, data, fua, .. } => {
                let len = data.len() as u32;
                write(WriteKind::Write, offset, len, fua, Some(Payload::from_write(data)))
            }
            IoOp::Trim { offset, len } => write(WriteKind::Trim, offset, len, false, None),
            IoOp::WriteZeroes { fast_only: true, .. } => {
                // Fast zeroing cannot be promised for both disks.
                let _ = done.send(IoCompletion { tag, result: Err(IoFailure::NotSupported) });
                return;
            }
            IoOp::WriteZeroes { offset, len, fua, .. } => write(WriteKind::Zeroes, offset, len, fua, None),
            IoOp::Flush => {
                self.pending_app.insert(id, (tag, done));
                self.replica.handle_flush(now, id);
                return;
            }
            IoOp::Read { .. } | IoOp::BlockStatus { .. } => {
                self.backing.submit(IoRequest { tag, op, done });
                return;
            }
        };
        self.pending_app.insert(id, (tag, done));
        self.replica.handle_write(now, w);
    }

    fn disk_done(&mut self, done: IoCompletion) {
        let now = self.now_ms();
        let io = done.tag;
        let checksum = self.checksum_ios.remove(&io);
        self.permits.remove(&io);
        let result = match done.result {
            Ok(IoOutput::Read(buf)) if checksum => Ok(DiskOutput::Checksum(crc32fast::hash(&buf))),
            Ok(IoOutput::Read(buf)) => Ok(DiskOutput::Data(Payload::new(buf))),
            // Only hosted connections are answered from a mapping.
            Ok(IoOutput::Mapped(_)) => Err(libc::EIO),
            Ok(IoOutput::Done | IoOutput::Extents(_)) => Ok(DiskOutput::Done),
            Err(failure) => Err(failure.errno()),
        };
        self.replica.handle_disk(now, io, result);
    }

    /// Carries out the replica's actions, in order.
    fn execute(&mut self) -> Result<(), DriverError> {
        // Disk operations go to the engine together (one wake-up), but
        // always before any later metadata persistence, so the order of
        // submissions and persistence is the replica's.
        let mut disk_batch = Vec::new();
        let mut overflowed = None;
        while let Some(action) = self.replica.poll_action() {
            if !disk_batch.is_empty()
                && matches!(action, Action::PersistMeta(_) | Action::PersistBitmap | Action::PersistActivityLog(_))
            {
                self.backing.submit_batch(disk_batch.drain(..));
            }
            match action {
                Action::PersistMeta(m) => tokio::task::block_in_place(|| {
                    self.meta.update(|sb| {
                        sb.generations = m.generations;
                        sb.flags.consistent = m.consistent;
                        sb.flags.outdated = m.outdated;
                        sb.flags.primary = m.primary;
                        sb.flags.crashed_primary = m.crashed_primary;
                        sb.flags.clean_shutdown = m.clean_shutdown;
                        sb.primary_epoch = m.epoch;
                    })
                })?,
                Action::PersistBitmap => {
                    let words = self.replica.bitmap().words();
                    tokio::task::block_in_place(|| self.bitmap_store.store(&self.meta, words))?;
                }
                Action::PersistActivityLog(extents) => {
                    tokio::task::block_in_place(|| self.al_store.store(&self.meta, &extents))?;
                }
                Action::Disk { io, op } => {
                    let op = match op {
                        DiskOp::Write { offset, len, kind, fua, data, bulk } => match (kind, data) {
                            (WriteKind::Write, Some(data)) => {
                                let (data, permit) = data.into_parts();
                                if let Some(permit) = permit {
                                    self.permits.insert(io, permit);
                                }
                                IoOp::Write { offset, data, fua, uncached: bulk }
                            }
                            (WriteKind::Trim, _) => IoOp::Trim { offset, len },
                            _ => IoOp::WriteZeroes { offset, len, may_trim: false, fast_only: false, fua },
                        },
                        DiskOp::Read { offset, len } => IoOp::Read { offset, len, uncached: true },
                        DiskOp::Checksum { offset, len } => {
                            self.checksum_ios.insert(io);
                            IoOp::Read { offset, len, uncached: true }
                        }
                        DiskOp::Flush => IoOp::Flush,
                    };
                    disk_batch.push(IoRequest { tag: io, op, done: self.disk_tx.clone() });
                }
                Action::Send { link, msg } => {
                    if let Some((id, writer)) = &self.link {
                        if *id == link {
                            if let Err(overflow) = writer.send(msg) {
                                overflowed.get_or_insert((link, overflow));
                            }
                        }
                    }
                }
                Action::Complete { id, result } => {
                    if let Some((tag, done)) = self.pending_app.remove(&id) {
                        let result = result.map(|()| IoOutput::Done).map_err(IoFailure::Errno);
                        let _ = done.send(IoCompletion { tag, result });
                    }
                }
                Action::CloseLink { link } => {
                    if self.link.as_ref().is_some_and(|(id, _)| *id == link) {
                        if let Some((_, writer)) = self.link.take() {
                            writer.close();
                        }
                        self.next_attempt = Instant::now() + Duration::from_millis(self.res.connect_interval_ms);
                    }
                }
                Action::Fence => self.spawn_fence(),
            }
        }
        if !disk_batch.is_empty() {
            self.backing.submit_batch(disk_batch);
        }
        if let Some((link, overflow)) = overflowed {
            // The peer stopped reading: drop the link as if it had closed,
            // then carry out what losing it asks for.
            tracing::warn!(resource = %self.res.name, peer = %self.res.peer.name, "dropping the link: {overflow}");
            self.link_event(LinkEvent::Closed { link, why: overflow.to_string(), tls_alert: false });
            return self.execute();
        }
        if !self.settling.is_empty() {
            let settled = self.replica.state_settled();
            let deadline = Duration::from_millis(self.res.io_timeout_ms);
            for (reply, message, since) in std::mem::take(&mut self.settling) {
                if settled || since.elapsed() > deadline {
                    let _ = reply.send(Ok(AdminReply::Done(message)));
                } else {
                    self.settling.push((reply, message, since));
                }
            }
        }
        let now = self.now_ms();
        let status = self.replica.status(now);
        self.status_tx.send_if_modified(|old| {
            let changed = *old != status;
            if changed {
                *old = status;
            }
            changed
        });
        self.primary_tx.send_if_modified(|p| {
            let now_primary = self.replica.role() == Role::Primary;
            let changed = *p != now_primary;
            *p = now_primary;
            changed
        });
        Ok(())
    }

    /// Runs the fence-peer handler (DRBD's exit-code convention: 3, 4, 5
    /// and 7 mean the peer is outdated, down or fenced; 0 is accepted too).
    fn spawn_fence(&self) {
        let tx = self.fence_tx.clone();
        let Some(handler) = self.res.fence_peer.clone() else {
            tracing::error!(resource = %self.res.name, "fencing is configured but handlers.fence-peer is not set");
            tokio::spawn(async move {
                let _ = tx.send(false).await;
            });
            return;
        };
        let resource = self.res.name.clone();
        let env = [
            ("REPLICATOR_RESOURCE", self.res.name.clone()),
            ("REPLICATOR_PEER", self.res.peer.name.clone()),
            ("REPLICATOR_PEER_ADDRESS", self.res.peer.address.to_string()),
        ];
        let timeout = Duration::from_millis(self.res.fence_peer_timeout_ms);
        tokio::spawn(async move {
            tracing::warn!(%resource, handler = %handler.display(), "running the fence-peer handler");
            let ok = match run_fence_handler(&handler, &env, timeout).await {
                FenceOutcome::Exited(code) => {
                    tracing::warn!(%resource, ?code, "fence-peer handler finished");
                    matches!(code, Some(0 | 3 | 4 | 5 | 7))
                }
                FenceOutcome::CannotRun(e) => {
                    tracing::error!(%resource, "cannot run the fence-peer handler {}: {e}", handler.display());
                    false
                }
                FenceOutcome::TimedOut => {
                    tracing::error!(
                        %resource,
                        "the fence-peer handler {} timed out after {} ms (handlers.fence-peer-timeout-ms); \
                         it and every process it started were killed",
                        handler.display(),
                        timeout.as_millis()
                    );
                    false
                }
            };
            let _ = tx.send(ok).await;
        });
    }

    fn admin(&mut self, call: AdminCall) {
        let now = self.now_ms();
        let name = self.res.name.clone();
        let done = |s: String| Ok(AdminReply::Done(s));
        let err = |e: AdminError| Err(format!("{name}: {e}"));
        let result = match call.command {
            ResourceCommand::Status => {
                Ok(AdminReply::State(Box::new(state(&self.replica.status(now), &self.failures))))
            }
            ResourceCommand::Primary { force, epoch } => match self.replica.promote(now, force, epoch) {
                Ok(()) => {
                    let message = format!("{name}: Primary (epoch {})", self.replica.epoch());
                    self.settling.push((call.reply, message, Instant::now()));
                    return;
                }
                Err(e) => err(e),
            },
            ResourceCommand::Secondary => {
                let clients = (self.nbd_clients)();
                // A primary cut off from its peer with its I/O suspended
                // (fencing, its lease over) is being given up: its clients'
                // held writes were never acknowledged, and refusing would
                // deadlock, as those clients wait on exactly these writes
                // (issue 23: a cut-off primary never demoted after the
                // heal). With the peer connected, clients still go first.
                let given_up = self.replica.is_frozen() && !self.replica.is_connected();
                if clients > 0 && given_up {
                    tracing::warn!(resource = %name, clients,
                        "demoting with NBD clients connected: their suspended writes fail, later ones are refused");
                }
                if clients > 0 && !given_up {
                    Err(format!(
                        "{name}: {clients} NBD client(s) still connected; unmount and disconnect them first \
                         (e.g. `replicator detach {name}`)"
                    ))
                } else {
                    match self.replica.demote(now) {
                        Ok(()) => {
                            self.settling.push((call.reply, format!("{name}: Secondary"), Instant::now()));
                            return;
                        }
                        Err(e) => err(e),
                    }
                }
            }
            ResourceCommand::Connect { discard_my_data } => match self.replica.connect(now, discard_my_data) {
                Ok(()) => done(format!(
                    "{name}: connecting{}",
                    if discard_my_data { " (discarding local changes on split brain)" } else { "" }
                )),
                Err(e) => err(e),
            },
            ResourceCommand::Disconnect => {
                self.replica.disconnect(now);
                done(format!("{name}: StandAlone"))
            }
            ResourceCommand::Verify => match self.replica.verify(now) {
                Ok(()) => done(format!("{name}: online verify started; watch `replicator status {name}`")),
                Err(e) => err(e),
            },
            ResourceCommand::Invalidate => match self.replica.invalidate(now) {
                Ok(()) => done(format!("{name}: invalidated; a full resync from the peer follows")),
                Err(e) => err(e),
            },
            ResourceCommand::SuspendIo => match self.replica.suspend_io(now) {
                Ok(()) => done(format!("{name}: I/O suspended until `replicator resume-io {name}` or demotion")),
                Err(e) => err(e),
            },
            ResourceCommand::ResumeIo => {
                self.replica.resume_io(now);
                done(format!("{name}: I/O resumed"))
            }
            ResourceCommand::Outdate => match self.replica.outdate(now) {
                Ok(()) => done(format!("{name}: Outdated")),
                Err(e) => err(e),
            },
            // `up` stops the whole process; it never sends this here.
            ResourceCommand::Down => Err(format!("{name}: `down` is handled by the process, not the replica")),
        };
        let _ = call.reply.send(result);
    }
}

/// How a fence-peer handler ended.
#[derive(Debug)]
pub(crate) enum FenceOutcome {
    /// Its exit code (`None`: killed by a signal).
    Exited(Option<i32>),
    CannotRun(std::io::Error),
    TimedOut,
}

/// Kills a process group when dropped, unless disarmed: a handler left
/// running when the driver stops (or its task is dropped) must not go on
/// fencing behind our back.
struct GroupGuard(Option<nix::unistd::Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(group) = self.0.take() {
            // The group may be gone already (everything in it exited).
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `handler` in a process group of its own with `env` added, for at
/// most `timeout`; on timeout the whole group is killed, so the children a
/// handler starts (ssh, ipmitool) cannot outlive it and act later.
pub(crate) async fn run_fence_handler(handler: &Path, env: &[(&str, String)], timeout: Duration) -> FenceOutcome {
    let mut command = tokio::process::Command::new(handler);
    command.envs(env.iter().map(|(k, v)| (k, v))).process_group(0).kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return FenceOutcome::CannotRun(e),
    };
    // With process_group(0) the group's id is the child's pid.
    let group = child.id().and_then(|pid| i32::try_from(pid).ok()).map(nix::unistd::Pid::from_raw);
    let mut guard = GroupGuard(group);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            // Whatever it left running is its own business (a finished
            // handler has given its answer); only a handler we gave up on
            // is stopped with all it started.
            guard.0 = None;
            FenceOutcome::Exited(status.code())
        }
        Ok(Err(e)) => FenceOutcome::CannotRun(e),
        Err(_) => {
            guard.kill();
            // The handler itself, in case its group could not be signalled.
            let _ = child.start_kill();
            let _ = child.wait().await;
            FenceOutcome::TimedOut
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The wire form of a replica's status, with the shell's own part (the
/// last failed connection attempt or handshake).
pub fn state(s: &Status, failures: &LinkFailures) -> ReplicaState {
    let progress = |p: &crate::replication::replica::Progress| ProgressReport {
        total_bytes: p.total_bytes,
        done_bytes: p.done_bytes,
        percent: p.percent,
        rate_bytes_per_sec: p.rate_bytes_per_sec,
        eta_secs: p.eta_secs,
    };
    let g = &s.generations;
    let last_failure = failures.last();
    ReplicaState {
        resource: s.resource.clone(),
        node: s.node.clone(),
        role: s.role,
        disk: s.disk,
        connection: s.connection,
        peer_node: s.peer_node.clone(),
        peer_role: s.peer_role,
        peer_disk: s.peer_disk,
        protocol: s.protocol,
        epoch: s.epoch,
        generations: [g.current, g.bitmap, g.history[0], g.history[1]],
        out_of_sync_bytes: s.out_of_sync_bytes,
        suspended: s.suspended,
        resync: s.resync.as_ref().map(progress),
        verify: s.verify.as_ref().map(progress),
        verify_out_of_sync_bytes: s.verify_out_of_sync_bytes,
        last_error: s.last_error.clone(),
        writes_in_flight: s.writes_in_flight as u64,
        resync_sent_bytes: s.resync_sent_bytes,
        resync_received_bytes: s.resync_received_bytes,
        link_failure: last_failure.as_ref().map(|(what, _)| what.clone()),
        link_failure_age_secs: last_failure.map(|(_, age)| age.as_secs()),
        discard_my_data: s.discard_my_data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flooding the volume's request queue while the driver is busy: it
    /// holds at most its bound, and what does not fit fails at once
    /// instead of growing memory.
    #[test]
    fn the_request_queue_never_holds_more_than_its_bound() {
        let dir = std::env::temp_dir().join(format!("replicator-appq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let backing = Backing::open(crate::backing::BackingConfig::new(disk, 1 << 20)).unwrap();
        let (app, app_rx) = mpsc::channel(limits::REPL_APP_QUEUE_REQUESTS_MAX);
        let (_primary_tx, primary) = watch::channel(true);
        let handle = ReplicaHandle { app, backing, primary, resource: "r0".into() };
        let (done, mut completions) = mpsc::unbounded_channel();
        let extra = 10;
        let flood = (0..(limits::REPL_APP_QUEUE_REQUESTS_MAX + extra) as u64).map(|tag| IoRequest {
            tag,
            op: IoOp::Flush,
            done: done.clone(),
        });
        handle.submit_batch(flood);
        assert_eq!(app_rx.len(), limits::REPL_APP_QUEUE_REQUESTS_MAX);
        let mut failed = 0;
        while let Ok(c) = completions.try_recv() {
            assert!(matches!(c.result, Err(IoFailure::EngineStopped)));
            failed += 1;
        }
        assert_eq!(failed, extra, "each request past the bound fails at once");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
    fn exited(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()).is_some_and(|s| s == 'Z'),
            Err(_) => true,
        }
    }

    #[tokio::test]
    async fn a_fence_handler_that_times_out_is_killed_with_its_children() {
        let dir = std::env::temp_dir().join(format!("replicator-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let handler = dir.join("fence-peer");
        let child_pid = dir.join("child.pid");
        // Like a handler whose ssh hangs: a child that would outlive it.
        std::fs::write(&handler, format!("#!/bin/sh\nsleep 1000 &\necho $! > {}\nsleep 1000\n", child_pid.display()))
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = [("REPLICATOR_RESOURCE", "r0".to_string())];
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            Duration::from_secs(20),
            run_fence_handler(&handler, &env, Duration::from_millis(300)),
        )
        .await
        .expect("run_fence_handler returns after its timeout");
        assert!(matches!(outcome, FenceOutcome::TimedOut), "{outcome:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "the timeout holds");
        let pid: u32 = std::fs::read_to_string(&child_pid).unwrap().trim().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exited(pid) {
            assert!(Instant::now() < deadline, "the handler's child {pid} survived the timeout");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_fence_handler_s_exit_code_is_its_answer() {
        let outcome = run_fence_handler(Path::new("/bin/sh"), &[], Duration::from_secs(10)).await;
        // No script on stdin (null in tests): sh exits 0 at once.
        assert!(matches!(outcome, FenceOutcome::Exited(Some(0))), "{outcome:?}");
        let outcome = run_fence_handler(Path::new("/nonexistent/fence"), &[], Duration::from_secs(10)).await;
        assert!(matches!(outcome, FenceOutcome::CannotRun(_)), "{outcome:?}");
    }
}
