//! Counters and the client registry that `replicator status` and the
//! Prometheus endpoint read. Updated with relaxed atomics on the data path;
//! the registry is touched only on connect and disconnect.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Request counters for the NBD export, across all connections.
#[derive(Debug, Default)]
pub struct IoCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub block_status: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Reads sent from a mapping of the disk's cached pages (`backing::mapped`).
    pub reads_mapped: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub connections_total: AtomicU64,
}

/// A point-in-time copy of [`IoCounters`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IoSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub block_status: u64,
    pub bytes_read: u64,
    #[serde(default)]
    pub reads_mapped: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub protocol_errors: u64,
    pub connections_total: u64,
}

impl IoCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> IoSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IoSnapshot {
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            trims: get(&self.trims),
            zeroes: get(&self.zeroes),
            block_status: get(&self.block_status),
            bytes_read: get(&self.bytes_read),
            reads_mapped: get(&self.reads_mapped),
            bytes_written: get(&self.bytes_written),
            errors: get(&self.errors),
            protocol_errors: get(&self.protocol_errors),
            connections_total: get(&self.connections_total),
        }
    }
}

/// One connected NBD client as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientInfo {
    pub id: u64,
    pub peer: String,
    pub transport: String,
    pub tls: bool,
    /// "handshake" until the client picks the export, then "transmission".
    pub phase: String,
    pub connected_unix_secs: u64,
}

/// The set of connected clients.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    next_id: AtomicU64,
    clients: Mutex<BTreeMap<u64, ClientInfo>>,
}

impl ClientRegistry {
    /// Registers a client; the returned guard removes it when dropped.
    pub fn register(&self, peer: String, transport: &str) -> ClientGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let connected_unix_secs =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let info = ClientInfo {
            id,
            peer,
            transport: transport.to_string(),
            tls: false,
            phase: "handshake".to_string(),
            connected_unix_secs,
        };
        self.lock().insert(id, info);
        ClientGuard { registry: self, id }
    }

    pub fn list(&self) -> Vec<ClientInfo> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ClientInfo>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every update is a single insert/remove/field store).
        self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Keeps a client listed while it is connected.
pub struct ClientGuard<'a> {
    registry: &'a ClientRegistry,
    id: u64,
}

impl ClientGuard<'_> {
    pub fn update(&self, f: impl FnOnce(&mut ClientInfo)) {
        if let Some(info) = self.registry.lock().get_mut(&self.id) {
            f(info);
        }
    }
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}
