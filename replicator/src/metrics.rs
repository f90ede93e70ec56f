//! A Prometheus text-format endpoint (`GET /metrics`) over plain HTTP/1.0.
//!
//! Deliberately tiny: one request per connection, a bounded request size
//! and a short timeout, so a scraper cannot tie the server up.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::control::StatusReport;

/// Renders the status as Prometheus text exposition format.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::with_capacity(2048);
    let io = &report.io;
    let counters: [(&str, &str, u64); 11] = [
        ("replicator_io_reads_total", "NBD read requests", io.reads),
        ("replicator_io_writes_total", "NBD write requests", io.writes),
        ("replicator_io_flushes_total", "NBD flush requests", io.flushes),
        ("replicator_io_trims_total", "NBD trim requests", io.trims),
        ("replicator_io_zeroes_total", "NBD write-zeroes requests", io.zeroes),
        ("replicator_io_block_status_total", "NBD block-status requests", io.block_status),
        ("replicator_io_bytes_read_total", "Bytes read by NBD clients", io.bytes_read),
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
        "# HELP replicator_clients Connected NBD clients\n# TYPE replicator_clients gauge\nreplicator_clients {}",
        report.clients.len()
    );
    let _ = writeln!(
        out,
        "# HELP replicator_volume_size_bytes Exported volume size\n# TYPE replicator_volume_size_bytes gauge\nreplicator_volume_size_bytes{{export=\"{}\"}} {}",
        report.volume.export.replace(['"', '\\', '\n'], "_"),
        report.volume.size_bytes
    );
    out
}

/// Serves `/metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, report: Arc<dyn Fn() -> StatusReport + Send + Sync>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let report = report.clone();
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
                    let body = render(&report());
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
