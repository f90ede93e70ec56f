//! The heartbeat's sockets: one UDP socket per path, bound to this node's
//! address on that path; received datagrams go to the daemon's loop with
//! their path index. Datagrams of the wrong size are dropped here (the core
//! counts them as malformed anyway).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::DaemonError;
use crate::heartbeat::{Transmit, DATAGRAM_BYTES};

pub struct HeartbeatSockets {
    sockets: Vec<Arc<UdpSocket>>,
    /// Per node, per path: where its heartbeats go.
    addresses: Vec<Vec<SocketAddr>>,
}

/// A datagram that arrived on `path`.
pub struct Received {
    pub path: u8,
    pub bytes: Vec<u8>,
}

impl HeartbeatSockets {
    pub async fn bind(
        mine: &[SocketAddr],
        addresses: Vec<Vec<SocketAddr>>,
        tx: mpsc::Sender<Received>,
    ) -> Result<HeartbeatSockets, DaemonError> {
        let mut sockets = Vec::new();
        for (path, addr) in mine.iter().enumerate() {
            let socket = UdpSocket::bind(addr).await.map_err(|source| DaemonError::Bind {
                what: format!("heartbeat path {path}"),
                addr: *addr,
                source,
            })?;
            let socket = Arc::new(socket);
            let rx_socket = socket.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                // One byte more than a datagram: an oversized one shows up
                // as too long instead of being silently truncated to fit.
                let mut buf = [0u8; DATAGRAM_BYTES + 1];
                loop {
                    match rx_socket.recv_from(&mut buf).await {
                        Ok((n, _from)) => {
                            let received = Received { path: path as u8, bytes: buf[..n].to_vec() };
                            // A full queue drops the datagram (heartbeats are periodic).
                            if tx.try_send(received).is_err() && tx.is_closed() {
                                return;
                            }
                        }
                        Err(e) => tracing::debug!(path, "heartbeat receive error: {e}"),
                    }
                }
            });
            sockets.push(socket);
        }
        Ok(HeartbeatSockets { sockets, addresses })
    }

    pub fn send(&self, t: &Transmit) {
        let (Some(socket), Some(to)) = (
            self.sockets.get(usize::from(t.path)),
            self.addresses.get(usize::from(t.to.0)).and_then(|a| a.get(usize::from(t.path))),
        ) else {
            return;
        };
        // Non-blocking: a full socket buffer or an unreachable path loses
        // this heartbeat, which the next interval replaces.
        if let Err(e) = socket.try_send_to(&t.bytes, *to) {
            tracing::trace!(path = t.path, %to, "heartbeat not sent: {e}");
        }
    }
}
