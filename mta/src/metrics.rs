//! The opt-in Prometheus endpoint (`metrics_listen`): counters kept in
//! atomics by the rest of the daemon, rendered as text on any HTTP GET.
//!
//! The endpoint answers one request per connection with a bounded read
//! and a deadline, so a stuck scraper cannot hold a task for long.
//! **Invariant:** rendering reads only atomics; it never blocks on the
//! queue, the directory or a lock.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A scraper gets this long to send its request and read the answer.
const REQUEST_DEADLINE_MS: u64 = 5_000;
/// Bytes of the request read (the request itself is not interpreted).
const REQUEST_BYTES_MAX: usize = 4096;

/// The metrics text in Prometheus exposition format 0.0.4.
pub fn render() -> String {
    let mut s = String::new();
    s.push_str("# HELP mta_log_write_failures_total Log lines dropped because stderr could not be written.\n");
    s.push_str("# TYPE mta_log_write_failures_total counter\n");
    s.push_str(&format!("mta_log_write_failures_total {}\n", crate::logging::write_failures()));
    s
}

/// Serves `GET /metrics` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let Ok((mut tcp, _peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let answer = async {
                let mut buf = vec![0u8; REQUEST_BYTES_MAX];
                // The request line is enough; whatever it asks, the answer is the metrics.
                let _ = tcp.read(&mut buf).await?;
                let body = render();
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                tcp.write_all(head.as_bytes()).await?;
                tcp.write_all(body.as_bytes()).await?;
                tcp.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_millis(REQUEST_DEADLINE_MS), answer).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn render_names_log_failures() {
        let text = super::render();
        assert!(text.contains("# TYPE mta_log_write_failures_total counter\nmta_log_write_failures_total "));
    }
}
