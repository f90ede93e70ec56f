//! Every bound the MTA enforces, in one place. Units come last in each name.
//!
//! Relations between limits are checked at compile time at the bottom.

/// A command line, CRLF included. RFC 5321 §4.5.3.1.4 asks for 512; AUTH
/// initial responses (RFC 4954 §4) and SMTPUTF8 addresses need more.
pub const COMMAND_LINE_BYTES_MAX: usize = 4096;

/// A line of message text, CRLF included (RFC 5321 §4.5.3.1.6).
pub const DATA_LINE_BYTES_MAX: usize = 1000;

/// Local part of an address (RFC 5321 §4.5.3.1.1).
pub const LOCAL_PART_BYTES_MAX: usize = 64;

/// Domain of an address (RFC 5321 §4.5.3.1.2).
pub const DOMAIN_BYTES_MAX: usize = 255;

/// A whole path (RFC 5321 §4.5.3.1.3).
pub const PATH_BYTES_MAX: usize = 256;

/// Recipients per message; RFC 5321 §4.5.3.1.8 requires at least 100.
pub const RECIPIENTS_PER_MESSAGE_MAX: usize = 1000;

/// Default message size limit, advertised with SIZE (RFC 1870).
pub const MESSAGE_BYTES_MAX_DEFAULT: u64 = 25 * 1024 * 1024;

/// Hard ceiling for the configurable message size: a message is held in
/// memory while it is received.
pub const MESSAGE_BYTES_MAX_CEILING: u64 = 256 * 1024 * 1024;

/// Protocol errors (5xx/4xx replies to bad commands) before the session is closed.
pub const ERRORS_PER_SESSION_MAX: u32 = 10;

/// Failed AUTH attempts in one session before it is closed.
pub const AUTH_FAILURES_PER_SESSION_MAX: u32 = 3;

/// Message bytes held in memory by all sessions together (messages are
/// received into memory, then queued); a session that would exceed it gets
/// 452 4.3.1 and is closed.
pub const MESSAGES_MEMORY_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// Granularity of the server-wide message memory accounting.
pub const MESSAGE_MEMORY_UNIT_BYTES: u64 = 64 * 1024;

/// Timeouts from RFC 5321 §4.5.3.2, in seconds.
pub const COMMAND_TIMEOUT_SECS: u64 = 300;
pub const DATA_BLOCK_TIMEOUT_SECS: u64 = 180;
/// The TLS handshake after STARTTLS or on the implicit-TLS port.
pub const TLS_HANDSHAKE_TIMEOUT_SECS: u64 = 30;

/// Default simultaneous connections per client IP.
pub const CONNECTIONS_PER_IP_MAX_DEFAULT: u32 = 50;
/// Default minimum password length (characters) for `mta user add`/`passwd`.
pub const PASSWORD_LENGTH_MIN_DEFAULT: u32 = 12;
/// Default share (percent) of a listener's connection limit past which it
/// is under stress.
pub const STRESS_PERCENT_DEFAULT: u32 = 75;
/// Idle timeout of every read under stress (Postfix: `smtpd_timeout =
/// ${stress?10}{300}`), so silent clients cannot hold slots for minutes.
pub const STRESS_TIMEOUT_SECS: u64 = 10;
/// Default simultaneous connections per listener.
pub const CONNECTIONS_MAX_DEFAULT: u32 = 1000;
/// A submission listener keeps `connections_max / this` connections for
/// clients that authenticate, unless `submission_reserve` says otherwise.
pub const SUBMISSION_RESERVE_DIVISOR_DEFAULT: u32 = 10;
/// A session admitted into the submission reserve must authenticate this
/// soon, or it is closed (421) and its slot goes to the next client.
pub const RESERVE_AUTH_SECS: u64 = 10;

/// AUTH rate limiting: failures inside the window before delays start, the
/// first delay, and the longest one (delays double per further failure).
pub const AUTH_FAILURES_FREE_MAX: u32 = 3;
pub const AUTH_DELAY_MS_MIN: u64 = 500;
pub const AUTH_DELAY_MS_MAX: u64 = 30_000;
pub const AUTH_FAILURE_WINDOW_SECS: u64 = 900;
/// Argon2 verifications running at once (each takes ~19 MiB and a core
/// for tens of milliseconds); further AUTH attempts wait their turn.
pub const PASSWORD_VERIFICATIONS_CONCURRENT_MAX: usize = 4;
/// Entries the AUTH limiter remembers (IPs plus logins); oldest dropped first.
pub const AUTH_LIMITER_ENTRIES_MAX: usize = 100_000;

/// Retry delays after failed delivery attempts: doubling from the first to
/// the last (bounces come from the queue lifetime, not a count).
pub const DELIVERY_RETRY_DELAY_SECS_MIN: u64 = 60;
pub const DELIVERY_RETRY_DELAY_SECS_MAX: u64 = 3600;

const _: () = assert!(COMMAND_LINE_BYTES_MAX >= 512);
const _: () = assert!(DATA_LINE_BYTES_MAX >= 1000);
const _: () = assert!(RECIPIENTS_PER_MESSAGE_MAX >= 100);
const _: () = assert!(PATH_BYTES_MAX + 64 < COMMAND_LINE_BYTES_MAX);
const _: () = assert!(MESSAGE_BYTES_MAX_DEFAULT <= MESSAGE_BYTES_MAX_CEILING);
const _: () = assert!(MESSAGES_MEMORY_BYTES_MAX >= 2 * MESSAGE_BYTES_MAX_DEFAULT);
const _: () = assert!(MESSAGES_MEMORY_BYTES_MAX / MESSAGE_MEMORY_UNIT_BYTES <= u32::MAX as u64);
const _: () = assert!(AUTH_DELAY_MS_MIN <= AUTH_DELAY_MS_MAX);
const _: () = assert!(DELIVERY_RETRY_DELAY_SECS_MIN <= DELIVERY_RETRY_DELAY_SECS_MAX);
