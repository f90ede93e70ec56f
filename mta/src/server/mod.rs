//! The daemon: start-up order, listeners, connection limits, delivery
//! task, signals and drain.
//!
//! Start-up order ([`prepare`], synchronous, before any thread exists):
//! bind every listener → load TLS → create the mail tree's directories →
//! chown them, chroot, drop to the service user. Then [`run`] (tokio):
//! open the queue (discarding partial files) and the directory, print
//! `mta: listening KIND ADDR` per listener and `mta: ready`, accept.
//! SIGHUP reloads the certificate; SIGTERM/SIGINT stop accepting, tell
//! sessions to close (421) and wait a bounded time.

pub mod connection;
pub mod control;
pub mod delivery_task;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::auth_limit::AuthLimiter;
use crate::config::{Config, Listener, ListenerKind};
use crate::directory::{sqlite_path, Directory};
use crate::durable;
use crate::filter::{Filter, RequireFromHeader};
use crate::limits::{MESSAGES_MEMORY_BYTES_MAX, MESSAGE_MEMORY_UNIT_BYTES};
use crate::mx;
use crate::privileges::{self, Dropped};
use crate::proxy::Proxied;
use crate::queue::Queue;
use crate::remote::{ClientTls, Credentials};
use crate::tls::TlsStore;

/// How long SIGTERM waits for sessions to end.
const DRAIN_SECS: u64 = 10;
/// Pause after a failed accept (e.g. out of descriptors).
const ACCEPT_ERROR_PAUSE_MS: u64 = 100;

/// State every connection shares.
pub struct Shared {
    pub config: Config,
    pub directory: Directory,
    pub queue: Queue,
    pub tls: Option<TlsStore>,
    pub limiter: Mutex<AuthLimiter>,
    pub filters: Vec<Box<dyn Filter>>,
    pub delivery_wakeup: Notify,
    pub mailboxes_dir: PathBuf,
    /// Server-wide budget for messages being received, in
    /// `MESSAGE_MEMORY_UNIT_BYTES` units.
    pub message_memory: Arc<Semaphore>,
    /// Queue ids being delivered or changed by the admin socket.
    pub claims: control::Claims,
}

/// The result of the privileged part of start-up.
pub struct Prepared {
    config: Config,
    /// Held until the process ends: one server per mail tree.
    lock: crate::lock::DataLock,
    listeners: Vec<(Listener, std::net::TcpListener)>,
    metrics: Option<std::net::TcpListener>,
    /// The admin socket (`mta queue …` against the running server).
    control: std::os::unix::net::UnixListener,
    tls: Option<TlsStore>,
    dropped: Dropped,
    directory_url: String,
    /// Read before the chroot, which hides /etc/resolv.conf.
    resolver: Option<mx::ResolverSettings>,
    /// Client TLS (with the `verify` roots) and the relay password, also
    /// read before the chroot.
    client_tls: ClientTls,
    relay_credentials: Option<Credentials>,
}

/// Takes world access away from the TLS private key (we are still root
/// here), saying so, and warns when its group may read it (Debian's
/// `ssl-cert` group is a legitimate reason).
fn protect_key(key: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(key).with_context(|| format!("failed to read the TLS key {}", key.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(mode & 0o770))
            .with_context(|| format!("failed to take world access away from the TLS key {}", key.display()))?;
        tracing::warn!(path = %key.display(), "the TLS key had mode {mode:04o} (any local user could read it); now {:04o}", mode & 0o770);
    } else if mode & 0o070 != 0 {
        tracing::warn!(path = %key.display(), "the TLS key has mode {mode:04o}: its group may read it");
    }
    Ok(())
}

/// Binds, loads TLS, prepares the mail tree and drops privileges.
pub fn prepare(config: Config) -> Result<Prepared> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("failed to create data_dir {}", config.data_dir.display()))?;
    let lock = crate::lock::acquire(&config.data_dir)?;
    let control = bind_control(&config.data_dir)?;
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let socket = std::net::TcpListener::bind(l.address)
            .with_context(|| format!("failed to bind {} listener on {}", l.kind.name(), l.address))?;
        socket.set_nonblocking(true).context("failed to make a listener non-blocking")?;
        listeners.push((l.clone(), socket));
    }
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let socket = std::net::TcpListener::bind(addr)
                .with_context(|| format!("failed to bind the metrics listener on {addr}"))?;
            socket.set_nonblocking(true).context("failed to make a listener non-blocking")?;
            Some(socket)
        }
        None => None,
    };
    if let Some(t) = &config.tls {
        protect_key(&t.key)?;
    }
    crate::directory::protect_sqlite_files(&config.directory_url).context("failed to protect the user directory")?;
    let mut tls = match &config.tls {
        Some(t) => Some(TlsStore::load(&t.cert, &t.key).context("failed to load TLS material")?),
        None => {
            tracing::info!("no [tls] section: STARTTLS disabled");
            None
        }
    };
    let queue_dir = config.queue_dir();
    let mailboxes_dir = config.mailboxes_dir();
    for dir in [queue_dir.join("incoming"), queue_dir.join("active"), queue_dir.join("hold"), mailboxes_dir.clone()] {
        durable::create_dir_durable(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let mut owned = vec![
        config.data_dir.clone(),
        queue_dir.clone(),
        queue_dir.join("incoming"),
        queue_dir.join("active"),
        queue_dir.join("hold"),
        mailboxes_dir,
    ];
    for sub in ["incoming", "active", "hold"] {
        let dir = queue_dir.join(sub);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("failed to list {}", dir.display()))?.flatten() {
            owned.push(entry.path());
        }
    }
    let sqlite = sqlite_path(&config.directory_url);
    if let Some(db) = &sqlite {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            owned.push(PathBuf::from(format!("{}{suffix}", db.display())));
        }
    }
    let resolver = match config.delivery.relay_host {
        Some(_) => None,
        None => match mx::resolver_settings(config.delivery.dns_server) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no DNS resolver configuration: remote mail will wait in the queue");
                None
            }
        },
    };
    let (client_tls, relay_credentials) = outbound_secrets(&config)?;
    let dropped = privileges::drop_privileges(&config.privileges, &config.data_dir, &owned)
        .context("failed to drop privileges")?;
    let directory_url = match &sqlite {
        Some(db) if dropped.chrooted => {
            let Some(inside) = privileges::rebase(db, &config.data_dir, &dropped) else {
                bail!("the SQLite directory {} must live inside data_dir when chroot is on", db.display());
            };
            config.directory_url.replacen(&db.display().to_string(), &inside.display().to_string(), 1)
        }
        _ => config.directory_url.clone(),
    };
    if let (Some(store), Some(files)) = (&mut tls, &config.tls) {
        match (
            privileges::rebase(&files.cert, &config.data_dir, &dropped),
            privileges::rebase(&files.key, &config.data_dir, &dropped),
        ) {
            (Some(cert), Some(key)) => store.rebase(cert, key),
            _ => tracing::warn!("TLS files are outside the chroot: certificate reload on SIGHUP disabled"),
        }
    }
    Ok(Prepared {
        config,
        lock,
        listeners,
        metrics,
        control,
        tls,
        dropped,
        directory_url,
        resolver,
        client_tls,
        relay_credentials,
    })
}

/// Binds `DATA_DIR/mta.sock` 0600 (root only while we are root). A file
/// left there by a crash is removed: the data lock proves no server owns it.
fn bind_control(data_dir: &Path) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join(control::SOCKET_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("failed to remove the stale admin socket {}", path.display())),
    }
    let socket = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("failed to bind the admin socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to set the mode of {}", path.display()))?;
    socket.set_nonblocking(true).context("failed to make the admin socket non-blocking")?;
    Ok(socket)
}

/// The client TLS roots (only when a `verify` level is configured) and the
/// relay password; `check-config` runs this too.
pub fn outbound_secrets(config: &Config) -> Result<(ClientTls, Option<Credentials>)> {
    let d = &config.delivery;
    let roots = d.needs_ca().then(|| d.ca_path());
    let client_tls = ClientTls::new(roots).context("failed to load the trusted roots for TLS policy `verify`")?;
    let credentials = match &d.relay_auth {
        Some(a) => Some(Credentials::new(
            a.username.clone(),
            crate::config::read_password_file(&a.password_file).context("failed to load the relay password")?,
        )),
        None => None,
    };
    Ok((client_tls, credentials))
}

/// Per-IP connection counts, shared by every listener (a client is one
/// client whatever port it uses).
struct Slots {
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    per_ip_max: u32,
}

/// One listener's connection budget: a flood on port 25 cannot take the
/// slots of submission on 587 or 465.
pub struct ListenerLoad {
    total: Arc<Semaphore>,
    max: u32,
    /// Connections in use from which the listener is under stress.
    stress_at: u32,
    /// Sessions not (yet) authenticated, and how many of them fit outside
    /// the submission reserve (`max - submission_reserve`).
    unauthenticated: Arc<std::sync::atomic::AtomicU32>,
    unauthenticated_max: u32,
}

/// An unauthenticated session's place in its listener's count; dropped
/// when the session authenticates or ends.
pub struct Unauthenticated {
    count: Arc<std::sync::atomic::AtomicU32>,
    /// Admitted beyond `max - submission_reserve`: it holds a reserved
    /// slot and must authenticate within `RESERVE_AUTH_SECS`.
    pub in_reserve: bool,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ListenerLoad {
    fn new(max: u32, stress_percent: u32, submission_reserve: u32) -> ListenerLoad {
        assert!(submission_reserve < max, "config validation keeps the reserve below the limit");
        let stress_at = ((u64::from(max) * u64::from(stress_percent)).div_ceil(100)).max(1) as u32;
        ListenerLoad {
            total: Arc::new(Semaphore::new(max as usize)),
            max,
            stress_at,
            unauthenticated: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            unauthenticated_max: max - submission_reserve,
        }
    }

    /// Counts a new session as unauthenticated; it is in the reserve when
    /// `max - submission_reserve` others are unauthenticated already.
    pub fn admit_unauthenticated(&self) -> Unauthenticated {
        let before = self.unauthenticated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Unauthenticated { count: self.unauthenticated.clone(), in_reserve: before >= self.unauthenticated_max }
    }

    /// Whether idle timeouts are cut short (Postfix's stress mode).
    pub fn stressed(&self) -> bool {
        let in_use = self.max.saturating_sub(self.total.available_permits() as u32);
        in_use >= self.stress_at
    }
}

/// A connection's per-IP and total slot, released on drop.
pub struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.slots.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Slots {
    /// A per-IP slot for a connection that already holds its listener's
    /// permit (taken at accept, before a PROXY header names the real client).
    fn try_take(self: &Arc<Self>, ip: IpAddr, permit: OwnedSemaphorePermit) -> Option<Slot> {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return None;
        }
        *n += 1;
        Some(Slot { slots: self.clone(), ip, _permit: permit })
    }
}

pub async fn run(prepared: Prepared) -> Result<()> {
    let Prepared {
        config,
        lock,
        listeners,
        metrics,
        control,
        tls,
        dropped,
        directory_url,
        resolver,
        client_tls,
        relay_credentials,
    } = prepared;
    let (queue, discarded) = Queue::open(&dropped.data_dir.join("queue")).context("failed to open the queue")?;
    if discarded > 0 {
        tracing::warn!(discarded, "discarded partial queue files left by a crash");
    }
    let directory = Directory::open(&directory_url).await.context("failed to open the directory")?;
    let shared = Arc::new(Shared {
        mailboxes_dir: dropped.data_dir.join("mailboxes"),
        config: config.clone(),
        directory,
        queue,
        tls,
        limiter: Mutex::new(AuthLimiter::new()),
        filters: vec![Box::new(RequireFromHeader)],
        delivery_wakeup: Notify::new(),
        message_memory: Arc::new(Semaphore::new((MESSAGES_MEMORY_BYTES_MAX / MESSAGE_MEMORY_UNIT_BYTES) as usize)),
        claims: control::Claims::default(),
    });
    let slots = Arc::new(Slots { per_ip: Mutex::new(HashMap::new()), per_ip_max: config.connections_per_ip_max });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut tasks = Vec::new();
    let mut loads = Vec::new();
    for (listener, socket) in listeners {
        let socket = TcpListener::from_std(socket).context("failed to register a listener with tokio")?;
        let addr = socket.local_addr().context("listener address")?;
        crate::logging::line(format_args!("mta: listening {} {addr}", listener.kind.name()));
        let load =
            Arc::new(ListenerLoad::new(listener.connections_max, config.stress_percent, listener.submission_reserve));
        loads.push(load.clone());
        let shutdown = shutdown_rx.clone();
        tasks.push(tokio::spawn(accept_loop(shared.clone(), slots.clone(), load, socket, listener, shutdown)));
    }
    if let Some(socket) = metrics {
        let socket = TcpListener::from_std(socket).context("failed to register the metrics listener with tokio")?;
        let addr = socket.local_addr().context("metrics listener address")?;
        crate::logging::line(format_args!("mta: listening metrics {addr}"));
        tasks.push(tokio::spawn(crate::metrics::serve(socket, shutdown_rx.clone())));
    }
    let control = tokio::net::UnixListener::from_std(control).context("failed to register the admin socket")?;
    tasks.push(tokio::spawn(control::serve(shared.clone(), control, shutdown_rx.clone())));
    let outbound = delivery_task::Outbound {
        router: resolver.map(|r| mx::Router::new(r, config.delivery.mx_port)),
        tls: client_tls,
        relay_credentials,
    };
    let delivery = tokio::spawn(delivery_task::run(shared.clone(), outbound, shutdown_rx.clone()));
    tracing::info!(user = dropped.user.as_deref().unwrap_or("(unchanged)"), chroot = dropped.chrooted, "started");
    crate::logging::line(format_args!("mta: ready"));

    wait_for_shutdown(&shared).await?;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let drained = async {
        for load in &loads {
            let _ = load.total.acquire_many(load.max).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(DRAIN_SECS), drained).await.is_err() {
        tracing::warn!("sessions still open after {DRAIN_SECS} s; exiting anyway");
    }
    let _ = delivery.await;
    shared.directory.close().await;
    crate::logging::line(format_args!("mta: stopped"));
    drop(lock);
    Ok(())
}

async fn wait_for_shutdown(shared: &Shared) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("failed to install the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => match &shared.tls {
                Some(store) => match store.reload() {
                    Ok(()) => crate::logging::line(format_args!("mta: TLS certificate reloaded")),
                    Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the old certificate"),
                },
                None => tracing::info!("SIGHUP: no TLS configured, nothing to reload"),
            },
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    slots: Arc<Slots>,
    load: Arc<ListenerLoad>,
    socket: TcpListener,
    listener: Listener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (mut tcp, peer): (tokio::net::TcpStream, SocketAddr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
                continue;
            }
        };
        let implicit_tls = listener.kind == ListenerKind::Submissions;
        let Ok(permit) = load.total.clone().try_acquire_owned() else {
            tracing::info!(%peer, listener = listener.kind.name(), "connection limit reached; refusing");
            tokio::spawn(refuse(tcp, implicit_tls));
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (shared, slots, listener, shutdown) = (shared.clone(), slots.clone(), listener.clone(), shutdown.clone());
        let load = load.clone();
        tokio::spawn(async move {
            let peer = if listener.proxy_protocol {
                match connection::read_proxy_header(&mut tcp).await {
                    Ok(Proxied::Client(client)) => client,
                    Ok(Proxied::Local) => peer,
                    Err(e) => {
                        tracing::warn!(balancer = %peer, error = %e, "bad PROXY header; closing");
                        return;
                    }
                }
            } else {
                peer
            };
            let Some(slot) = slots.try_take(peer.ip(), permit) else {
                tracing::info!(%peer, "per-IP connection limit reached; refusing");
                refuse(tcp, implicit_tls).await;
                return;
            };
            connection::serve(shared, tcp, peer, listener, shutdown, slot, load).await;
        });
    }
}

/// Refuses a connection over a limit: `421` in plaintext, except on the
/// implicit-TLS port, where a plaintext byte before the handshake would be
/// a protocol error (and a downgrade hint): there the socket is just closed.
async fn refuse(mut tcp: tokio::net::TcpStream, implicit_tls: bool) {
    if implicit_tls {
        return;
    }
    let reply = b"421 4.7.0 Too many connections, try again later\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(reply)).await;
}

/// The mail tree path for `check-config` output.
pub fn describe_paths(config: &Config) -> String {
    let q: &Path = &config.queue_dir();
    format!("queue: {}\nmailboxes: {}\n", q.display(), config.mailboxes_dir().display())
}

#[cfg(test)]
mod tests {
    use super::ListenerLoad;

    #[test]
    fn stress_starts_at_the_configured_share_of_the_listener_limit() {
        let load = ListenerLoad::new(4, 75, 0);
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(load.total.clone().try_acquire_owned().unwrap());
            assert!(!load.stressed());
        }
        held.push(load.total.clone().try_acquire_owned().unwrap());
        assert!(load.stressed(), "3 of 4 is 75%");
        held.pop();
        assert!(!load.stressed());
        assert!(ListenerLoad::new(1, 1, 0).stress_at == 1);
    }

    #[test]
    fn sessions_past_the_unauthenticated_share_are_in_the_reserve() {
        let load = ListenerLoad::new(4, 100, 2);
        let first = load.admit_unauthenticated();
        let second = load.admit_unauthenticated();
        assert!(!first.in_reserve && !second.in_reserve);
        let third = load.admit_unauthenticated();
        assert!(third.in_reserve, "2 of 4 are kept for AUTH");
        drop(first);
        drop(third);
        assert!(!load.admit_unauthenticated().in_reserve, "a slot left the unauthenticated share");
    }
}
