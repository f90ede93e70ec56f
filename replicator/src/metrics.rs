//! A Prometheus text-format endpoint (`GET /metrics`) over plain HTTP/1.0.
//!
//! Deliberately tiny: one request per connection, a bounded request size
//! and a short timeout, so a scraper cannot tie the server up.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::control::{ResourceReport, StatusReport};
use crate::replication::message::{DiskState, Role};
use crate::server::stats::IoSnapshot;

/// Renders the status as Prometheus text exposition format.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::with_capacity(2048);
    render_io(&mut out, &report.io, report.clients.len());
    let _ = writeln!(
        out,
        "# HELP replicator_volume_size_bytes Exported volume size\n# TYPE replicator_volume_size_bytes gauge\nreplicator_volume_size_bytes{{export=\"{}\"}} {}",
        report.volume.export.replace(['"', '\\', '\n'], "_"),
        report.volume.size_bytes
    );
    out
}

/// Renders a replicated resource: its state as gauges, resync counters and
/// the NBD I/O counters.
pub fn render_resource(report: &ResourceReport) -> String {
    let mut out = String::with_capacity(4096);
    render_io(&mut out, &report.io, report.clients.len());
    let s = &report.state;
    let label = format!("resource=\"{}\"", s.resource.replace(['"', '\\', '\n'], "_"));
    let gauges: [(&str, &str, u64); 8] = [
        ("replicator_resource_primary", "1 while this node is primary", u64::from(s.role == Role::Primary)),
        ("replicator_resource_connected", "1 while the peer is connected", u64::from(s.peer_role.is_some())),
        (
            "replicator_resource_disk_up_to_date",
            "1 while the local disk is UpToDate",
            u64::from(s.disk == DiskState::UpToDate),
        ),
        (
            "replicator_resource_peer_disk_up_to_date",
            "1 while the peer's disk is UpToDate",
            u64::from(s.peer_disk == Some(DiskState::UpToDate)),
        ),
        ("replicator_resource_suspended", "1 while I/O is suspended by fencing", u64::from(s.suspended)),
        ("replicator_resource_epoch", "Newest primary epoch seen", s.epoch),
        ("replicator_resource_out_of_sync_bytes", "Bytes marked out of sync", s.out_of_sync_bytes),
        ("replicator_resource_writes_in_flight", "Application writes in flight", s.writes_in_flight),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{label}}} {value}");
    }
    let counters: [(&str, &str, u64); 2] = [
        ("replicator_resync_sent_bytes_total", "Resync bytes sent to the peer", s.resync_sent_bytes),
        ("replicator_resync_received_bytes_total", "Resync bytes received from the peer", s.resync_received_bytes),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{label}}} {value}");
    }
    if let Some(p) = &s.resync {
        let _ = writeln!(
            out,
            "# HELP replicator_resync_percent Resync progress\n# TYPE replicator_resync_percent gauge\nreplicator_resync_percent{{{label}}} {:.1}",
            p.percent
        );
    }
    out
}

fn render_io(out: &mut String, io: &IoSnapshot, clients: usize) {
    let counters: [(&str, &str, u64); 12] = [
        ("replicator_io_reads_total", "NBD read requests", io.reads),
        ("replicator_io_writes_total", "NBD write requests", io.writes),
        ("replicator_io_flushes_total", "NBD flush requests", io.flushes),
        ("replicator_io_trims_total", "NBD trim requests", io.trims),
        ("replicator_io_zeroes_total", "NBD write-zeroes requests", io.zeroes),
        ("replicator_io_block_status_total", "NBD block-status requests", io.block_status),
        ("replicator_io_bytes_read_total", "Bytes read by NBD clients", io.bytes_read),
        ("replicator_io_reads_mapped_total", "Reads sent from a mapping of the disk's page cache", io.reads_mapped),
        ("replicator_io_bytes_written_total", "Bytes written by NBD clients", io.bytes_written),
        ("replicator_io_errors_total", "Requests answered with an error", io.errors),
        ("replicator_protocol_errors_total", "Connections dropped for protocol violations", io.protocol_errors),
        ("replicator_connections_total", "NBD connections accepted", io.connections_total),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    }
    let _ = writeln!(
        out,
        "# HELP replicator_clients Connected NBD clients\n# TYPE replicator_clients gauge\nreplicator_clients {clients}"
    );
}

/// Serves `/metrics` (the text `body` returns) until the task is dropped.
pub async fn serve(listener: TcpListener, body: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let body = body.clone();
        tokio::spawn(async move {
            let exchange = async {
                let mut request = vec![0u8; 8192];
                let mut filled = 0;
                while !request[..filled].windows(4).any(|w| w == b"\r\n\r\n") && filled < request.len() {
                    let n = stream.read(&mut request[filled..]).await?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                let line = String::from_utf8_lossy(&request[..filled]);
                let response = if line.starts_with("GET /metrics ") || line.starts_with("GET / ") {
                    let body = body();
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
                };
                stream.write_all(response.as_bytes()).await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), exchange).await;
        });
    }
}
