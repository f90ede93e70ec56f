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
//! With `log_to = "syslog"`, `mta serve` sends its tracing events to the
//! syslog daemon instead ([`to_syslog`]): one RFC 3164 datagram per event,
//! facility mail, over a Unix datagram socket (`/dev/log`) connected
//! before the chroot. Failed sends are counted in the same counter.
//!
//! **Invariant:** nothing in the daemon writes to stderr or stdout except
//! through this module.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Set once by [`to_syslog`]; from then on events go there.
static SYSLOG: OnceLock<Syslog> = OnceLock::new();

/// A longer event is cut here (at a character boundary): syslog daemons
/// drop or split larger datagrams.
const SYSLOG_DATAGRAM_BYTES_MAX: usize = 8192;
/// RFC 3164 facility `mail` (2), shifted into PRI.
const FACILITY_MAIL: u8 = 2 << 3;

/// A connected syslog socket and the `mta[PID]` tag.
#[derive(Debug)]
pub struct Syslog {
    socket: UnixDatagram,
    pid: u32,
}

impl Syslog {
    /// Connects to the daemon's socket at `path` (`/dev/log`).
    pub fn connect(path: &Path) -> std::io::Result<Syslog> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        Ok(Syslog { socket, pid: std::process::id() })
    }

    /// Sends one event; a failure (daemon gone, buffer full) is counted.
    fn send(&self, level: tracing::Level, event: &[u8]) {
        let text = String::from_utf8_lossy(event);
        let datagram = rfc3164(severity(level), unix_now_secs(), self.pid, text.trim());
        if self.socket.send(datagram.as_bytes()).is_err() {
            LOG_WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// RFC 3164 severity of a tracing level.
fn severity(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

fn unix_now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// One datagram as glibc's `syslog(3)` sends it to `/dev/log`:
/// `<PRI>Mmm dd hh:mm:ss mta[PID]: message`, without the HOSTNAME field
/// (the local daemon adds it). The timestamp is UTC: the daemon usually
/// stamps local messages itself.
fn rfc3164(severity: u8, now_unix: u64, pid: u32, message: &str) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let (_, month, day) = civil_from_days((now_unix / 86_400) as i64);
    let secs = now_unix % 86_400;
    let mut out = format!(
        "<{}>{} {day:>2} {:02}:{:02}:{:02} mta[{pid}]: ",
        FACILITY_MAIL | severity,
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    let room = SYSLOG_DATAGRAM_BYTES_MAX.saturating_sub(out.len());
    let mut cut = message.len().min(room);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    // A newline would split the event into two records.
    out.extend(message[..cut].chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }));
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Sends every later tracing event to the syslog socket at `path` instead
/// of stderr. Call it before the chroot: the connected socket survives it.
pub fn to_syslog(path: &Path) -> std::io::Result<()> {
    let syslog = Syslog::connect(path)?;
    SYSLOG.set(syslog).map_err(|_| std::io::Error::other("syslog output is already set up"))
}

/// Whether events go to syslog.
fn syslog() -> Option<&'static Syslog> {
    SYSLOG.get()
}

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

/// `tracing_subscriber::fmt::MakeWriter` for stderr (or syslog, after
/// [`to_syslog`]) that counts and drops failed writes instead of
/// reporting them (the report itself would panic).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

/// One event's writer: tracing-subscriber formats an event into a buffer
/// and writes it with one `write_all`, so one failure is one lost line.
#[derive(Debug)]
pub struct StderrWriter {
    level: tracing::Level,
}

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match syslog() {
            Some(s) => s.send(self.level, buf),
            None => write_stderr(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = StderrWriter;

    fn make_writer(&'a self) -> StderrWriter {
        StderrWriter { level: tracing::Level::INFO }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> StderrWriter {
        StderrWriter { level: *meta.level() }
    }
}

/// The event timestamp on stderr; none for syslog, which stamps records
/// itself (the writer trims the space left before the level).
#[derive(Clone, Copy, Debug, Default)]
struct Timer;

impl tracing_subscriber::fmt::time::FormatTime for Timer {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        if syslog().is_some() {
            return Ok(());
        }
        tracing_subscriber::fmt::time::SystemTime.format_time(w)
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
        .with_timer(Timer)
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
        let mut w = StderrWriter { level: tracing::Level::INFO };
        assert_eq!(w.write(b"").ok(), Some(0));
        assert!(w.flush().is_ok());
    }

    #[test]
    fn datagrams_are_rfc3164_with_facility_mail() {
        // 2026-12-08 06:17:40 UTC.
        let now = 1_796_710_660;
        assert_eq!(civil_from_days(now as i64 / 86_400), (2026, 12, 8));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(rfc3164(6, now, 42, "INFO a: b\nc"), "<22>Dec  8 06:17:40 mta[42]: INFO a: b c");
        assert_eq!(rfc3164(3, 0, 1, "x"), "<19>Jan  1 00:00:00 mta[1]: x");
        let long = "é".repeat(SYSLOG_DATAGRAM_BYTES_MAX);
        assert!(rfc3164(6, now, 1, &long).len() <= SYSLOG_DATAGRAM_BYTES_MAX);
    }

    // A stand-in for /dev/log: one datagram per event, at the event's
    // severity; a send to a vanished daemon is counted, not raised.
    #[test]
    fn syslog_sends_one_datagram_per_event_and_counts_failures() {
        let dir = std::env::temp_dir().join(format!("mta-syslog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let daemon = UnixDatagram::bind(&path).unwrap();
        let syslog = Syslog::connect(&path).unwrap();
        syslog.send(tracing::Level::WARN, b" WARN mta: Q1: to=<a@b>, status=deferred (later)\n");
        let mut buf = [0u8; 512];
        let n = daemon.recv(&mut buf).unwrap();
        let got = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(got.starts_with("<20>"), "{got}");
        let pid = std::process::id();
        assert!(got.ends_with(&format!(" mta[{pid}]: WARN mta: Q1: to=<a@b>, status=deferred (later)")), "{got}");
        drop(daemon);
        let before = write_failures();
        syslog.send(tracing::Level::INFO, b"lost");
        assert!(write_failures() > before);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
