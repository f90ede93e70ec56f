//! The opt-in Prometheus endpoint (`metrics_listen`): counters kept in
//! atomics by the rest of the daemon, rendered as text on any HTTP GET.
//!
//! The endpoint answers one request per connection with a bounded read
//! and a deadline, so a stuck scraper cannot hold a task for long.
//! **Invariant:** rendering reads only atomics; it never blocks on the
//! queue, the directory or a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A scraper gets this long to send its request and read the answer.
const REQUEST_DEADLINE_MS: u64 = 5_000;
/// Bytes of the request read (the request itself is not interpreted).
const REQUEST_BYTES_MAX: usize = 4096;

/// Counters the daemon bumps as it goes (relaxed atomics: a scrape may see
/// one counter a moment ahead of another).
#[derive(Default)]
pub struct Metrics {
    /// Sessions ended, per listener kind (mx, submission, submissions).
    pub sessions: [AtomicU64; 3],
    /// Sessions ended, by TLS: none, TLS 1.2, TLS 1.3.
    pub sessions_tls: [AtomicU64; 3],
    pub messages_accepted: AtomicU64,
    /// Error replies, by command: RCPT, MAIL, AUTH, DATA/BDAT, other.
    pub rejects: [AtomicU64; 5],
    /// `535` answers to AUTH.
    pub auth_failures: AtomicU64,
    /// Delivery attempts that finished the message, and that deferred it.
    pub deliveries_done: AtomicU64,
    pub deliveries_deferred: AtomicU64,
    /// Recipients bounced.
    pub bounced_recipients: AtomicU64,
    /// Messages in the queue and the oldest one's receipt time, as of the
    /// last delivery pass (a gauge, set, not added).
    pub queue_messages: AtomicU64,
    pub queue_oldest_received_unix: AtomicU64,
}

/// The daemon's counters.
pub static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(Metrics::default);

const LISTENERS: [&str; 3] = ["mx", "submission", "submissions"];
const TLS: [&str; 3] = ["none", "tls1.2", "tls1.3"];
const REJECT_COMMANDS: [&str; 5] = ["rcpt", "mail", "auth", "data", "other"];

/// Index into [`Metrics::rejects`] for a command verb.
pub fn reject_index(command: &str) -> usize {
    match command {
        "RCPT" => 0,
        "MAIL" => 1,
        "AUTH" => 2,
        "DATA" | "BDAT" => 3,
        _ => 4,
    }
}

/// Index into [`Metrics::sessions`] for a listener name.
pub fn listener_index(name: &str) -> usize {
    LISTENERS.iter().position(|l| *l == name).unwrap_or(0)
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn counter(s: &mut String, name: &str, help: &str, kind: &str, samples: &[(String, u64)]) {
    s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, v) in samples {
        s.push_str(&format!("{name}{labels} {v}\n"));
    }
}

fn labelled(label: &str, names: &[&str], values: &[AtomicU64]) -> Vec<(String, u64)> {
    names.iter().zip(values).map(|(n, v)| (format!("{{{label}=\"{n}\"}}"), v.load(Ordering::Relaxed))).collect()
}

fn one(v: u64) -> Vec<(String, u64)> {
    vec![(String::new(), v)]
}

/// The metrics text in Prometheus exposition format 0.0.4.
pub fn render() -> String {
    let m = &*METRICS;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut s = String::new();
    counter(
        &mut s,
        "mta_log_write_failures_total",
        "Log lines dropped because stderr could not be written.",
        "counter",
        &one(crate::logging::write_failures()),
    );
    counter(
        &mut s,
        "mta_sessions_total",
        "SMTP sessions ended, by listener.",
        "counter",
        &labelled("listener", &LISTENERS, &m.sessions),
    );
    counter(
        &mut s,
        "mta_sessions_tls_total",
        "SMTP sessions ended, by TLS version.",
        "counter",
        &labelled("tls", &TLS, &m.sessions_tls),
    );
    counter(
        &mut s,
        "mta_messages_accepted_total",
        "Messages queued (250 after DATA/BDAT).",
        "counter",
        &one(load(&m.messages_accepted)),
    );
    counter(
        &mut s,
        "mta_rejects_total",
        "Error replies sent, by command.",
        "counter",
        &labelled("command", &REJECT_COMMANDS, &m.rejects),
    );
    counter(&mut s, "mta_auth_failures_total", "Failed AUTH attempts (535).", "counter", &one(load(&m.auth_failures)));
    let deliveries = vec![
        ("{result=\"done\"}".to_string(), load(&m.deliveries_done)),
        ("{result=\"deferred\"}".to_string(), load(&m.deliveries_deferred)),
    ];
    counter(&mut s, "mta_delivery_attempts_total", "Delivery attempts, by result.", "counter", &deliveries);
    counter(
        &mut s,
        "mta_bounced_recipients_total",
        "Recipients that failed for good (DSN sent).",
        "counter",
        &one(load(&m.bounced_recipients)),
    );
    counter(
        &mut s,
        "mta_queue_messages",
        "Messages in the queue at the last delivery pass.",
        "gauge",
        &one(load(&m.queue_messages)),
    );
    let oldest = load(&m.queue_oldest_received_unix);
    let age = if oldest == 0 { 0 } else { crate::delivery::now_unix().saturating_sub(oldest) };
    counter(
        &mut s,
        "mta_queue_oldest_age_seconds",
        "Age of the oldest queued message at the last delivery pass.",
        "gauge",
        &one(age),
    );
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
        assert!(text.contains("mta_sessions_total{listener=\"submissions\"} "));
        assert!(text.contains("mta_rejects_total{command=\"auth\"} "));
        assert_eq!(super::reject_index("BDAT"), 3);
    }
}
