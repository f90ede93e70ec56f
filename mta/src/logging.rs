//! Log output that can neither kill nor stop the server.
//!
//! `eprintln!` panics when stderr cannot be written (stderr on /dev/full,
//! or appended to a file on a full /var), and so does tracing-subscriber's
//! own report of a failed write. Every daemon log line therefore goes
//! through [`StderrWriter`] (tracing) or [`line`] (the `mta: ready` style
//! lines tests and scripts wait for): a failed write is counted in
//! [`LOG_WRITE_FAILURES`] (exported as `mta_log_write_failures_total`) and
//! dropped, and the server keeps accepting and delivering mail.
//!
//! **Invariant:** nothing in the daemon writes to stderr or stdout except
//! through this module.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Log writes that failed and were dropped since start.
pub static LOG_WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// How many log writes failed so far.
pub fn write_failures() -> u64 {
    LOG_WRITE_FAILURES.load(Ordering::Relaxed)
}

/// Writes `bytes` to stderr in one call; a failure is counted, never raised.
fn write_stderr(bytes: &[u8]) {
    let mut err = std::io::stderr().lock();
    if err.write_all(bytes).and_then(|()| err.flush()).is_err() {
        LOG_WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Prints one line (a newline is added) to stderr without ever panicking.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut text = args.to_string();
    text.push('\n');
    write_stderr(text.as_bytes());
}

/// `tracing_subscriber::fmt::MakeWriter` for stderr that counts and drops
/// failed writes instead of reporting them (the report itself would panic).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

/// One event's writer: tracing-subscriber formats an event into a buffer
/// and writes it with one `write_all`, so one failure is one lost line.
#[derive(Debug)]
pub struct StderrWriter;

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_stderr(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = StderrWriter;

    fn make_writer(&'a self) -> StderrWriter {
        StderrWriter
    }
}

/// Installs the global subscriber: `RUST_LOG` (default `info`) to stderr
/// through [`Stderr`], colours only on a terminal.
pub fn init() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writing through the tracing writer reports success even when the
    /// write itself fails, so the caller (tracing-subscriber) never panics.
    #[test]
    fn writer_never_fails() {
        let mut w = StderrWriter;
        assert_eq!(w.write(b"").ok(), Some(0));
        assert!(w.flush().is_ok());
    }
}
