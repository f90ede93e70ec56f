//! Delivery decisions: local copies into Maildir, and [`plan`], which turns
//! one attempt's results into retries (exponential backoff) and bounces
//! (permanent failures, or temporary ones past the queue lifetime). The
//! I/O loop that drives it is `server::delivery_task`.
//!
//! **Invariant:** a queue file is removed only after every local copy is
//! durable and any bounce is queued; a crash in between repeats that work
//! on restart (at most one duplicate per crash), never loses it.

use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::limits::{DELIVERY_RETRY_DELAY_SECS_MAX, DELIVERY_RETRY_DELAY_SECS_MIN};
use crate::maildir;
use crate::queue::StoredEnvelope;
use crate::remote::RcptResult;

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Exponential backoff after `attempts` failed attempts.
pub fn retry_delay_secs(attempts: u32) -> u64 {
    let doublings = attempts.saturating_sub(1).min(16);
    (DELIVERY_RETRY_DELAY_SECS_MIN << doublings).min(DELIVERY_RETRY_DELAY_SECS_MAX)
}

/// Whether `incoming_bytes` more do not fit under `quota_bytes`; `Some`
/// with the bytes in use if so. RCPT asks with 1 (refused once at or over
/// quota), delivery with the message size.
pub fn over_quota(mailboxes: &Path, key: &str, quota_bytes: u64, incoming_bytes: u64) -> io::Result<Option<u64>> {
    let used = maildir::usage_bytes(mailboxes, key)?;
    Ok((used.saturating_add(incoming_bytes) > quota_bytes).then_some(used))
}

/// Local copies of one message; returns the mailboxes that failed (to
/// retry). `full` lists mailboxes over quota (with the reason): they are
/// not written and count as failed, so the message waits for room.
pub fn deliver_local(
    mailboxes: &Path,
    hostname: &str,
    envelope: &StoredEnvelope,
    message: &[u8],
    full: &[(String, String)],
) -> Vec<(String, String)> {
    let mut failed = Vec::new();
    for mailbox in &envelope.local {
        if let Some((_, why)) = full.iter().find(|(m, _)| m == mailbox) {
            tracing::debug!(id = %envelope.id, to = %mailbox, why = %why, "local delivery deferred: mailbox full");
            failed.push((mailbox.clone(), why.clone()));
            continue;
        }
        match maildir::deliver(mailboxes, mailbox, hostname, &envelope.id, envelope.received_unix, &[message]) {
            Ok(maildir::Delivered::New(_durable)) => {
                tracing::debug!(id = %envelope.id, to = %mailbox, "delivered to Maildir")
            }
            Ok(maildir::Delivered::Already(_durable)) => {
                tracing::debug!(id = %envelope.id, to = %mailbox, "already in the Maildir (delivered before a restart)")
            }
            Err(e) => {
                tracing::debug!(id = %envelope.id, to = %mailbox, error = %e, "local delivery failed");
                failed.push((mailbox.clone(), format!("local delivery: {e}")));
            }
        }
    }
    failed
}

/// What became of one recipient after an attempt, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Sent,
    Deferred,
    Bounced,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Deferred => "deferred",
            Status::Bounced => "bounced",
        }
    }
}

/// The Postfix-style line for one recipient, without the level:
/// `ID: to=<rcpt>, relay=local, delay=1.2, status=sent (delivered to maildir)`.
/// Admins grep for `status=deferred` and `status=bounced`; the reason
/// follows in parentheses, as Postfix writes it.
pub fn outcome_line(id: &str, rcpt: &str, relay: &str, delay_secs: f64, status: Status, reason: &str) -> String {
    // A reason comes from a remote server: keep it on one line.
    let reason: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    format!("{id}: to=<{rcpt}>, relay={relay}, delay={delay_secs:.1}, status={} ({reason})", status.as_str())
}

/// Seconds since `received_unix`, with a fraction (the clock's, not the
/// queue file's, which keeps whole seconds).
pub fn delay_secs(received_unix: u64) -> f64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    (now - received_unix as f64).max(0.0)
}

/// The outcome of one delivery attempt of one message.
#[derive(Debug, Default)]
pub struct Attempt {
    /// Local mailboxes that failed (always temporary: disk trouble).
    pub local_failed: Vec<(String, String)>,
    /// Every remote recipient tried, with its result.
    pub remote: Vec<(String, RcptResult)>,
}

/// What to do after an attempt: bounce these recipients, keep the rest.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// The envelope with what remains to deliver and the next attempt time.
    pub envelope: StoredEnvelope,
    /// (recipient, status code, diagnostic) for the DSN.
    pub bounces: Vec<(String, String, String)>,
    /// Nothing remains: remove the queue file.
    pub finished: bool,
}

/// Decides retries and bounces. Temporary failures older than
/// `lifetime_secs` bounce with 4.4.7; permanent ones bounce at once.
pub fn plan(mut envelope: StoredEnvelope, attempt: Attempt, now: u64, lifetime_secs: u64) -> Plan {
    let expired = now.saturating_sub(envelope.received_unix) >= lifetime_secs;
    let mut bounces = Vec::new();
    let mut local = Vec::new();
    let mut remote = Vec::new();
    let mut last_error = None;
    for (mailbox, why) in attempt.local_failed {
        if expired {
            bounces.push((mailbox, "4.4.7".to_string(), format!("delivery time expired: {why}")));
        } else {
            last_error = Some(why);
            local.push(mailbox);
        }
    }
    for (rcpt, result) in attempt.remote {
        match result {
            RcptResult::Delivered => {}
            RcptResult::Permanent(why) => {
                let status = enhanced_status(&why).unwrap_or_else(|| "5.0.0".to_string());
                bounces.push((rcpt, status, why));
            }
            RcptResult::Temporary(why) if expired => {
                bounces.push((rcpt, "4.4.7".to_string(), format!("delivery time expired: {why}")))
            }
            RcptResult::Temporary(why) => {
                last_error = Some(why);
                remote.push(rcpt);
            }
        }
    }
    let finished = local.is_empty() && remote.is_empty();
    envelope.local = local;
    envelope.remote = remote;
    if !finished {
        envelope.attempts += 1;
        envelope.next_attempt_unix = now + retry_delay_secs(envelope.attempts);
        envelope.last_error = last_error;
    }
    Plan { envelope, bounces, finished }
}

/// The enhanced status code in a reply such as `550 5.1.1 No such user`.
fn enhanced_status(reply: &str) -> Option<String> {
    let word = reply.split_whitespace().nth(1)?;
    let parts: Vec<&str> = word.split('.').collect();
    let ok = parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    ok.then(|| word.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(received: u64) -> StoredEnvelope {
        StoredEnvelope {
            id: "abc".into(),
            received_unix: received,
            from: "alice@example.org".into(),
            login: None,
            local: vec!["bob@example.org".into()],
            remote: vec!["c@remote.example".into(), "d@remote.example".into(), "e@remote.example".into()],
            attempts: 0,
            next_attempt_unix: 0,
            last_error: None,
        }
    }

    #[test]
    fn outcome_lines_read_like_postfix() {
        assert_eq!(
            outcome_line("Q1", "bob@example.org", "local", 1.234, Status::Sent, "delivered to maildir"),
            "Q1: to=<bob@example.org>, relay=local, delay=1.2, status=sent (delivered to maildir)"
        );
        assert_eq!(
            outcome_line("Q2", "c@x.example", "mx.x.example[192.0.2.1]:25", 0.0, Status::Deferred, "421 a\r\nb"),
            "Q2: to=<c@x.example>, relay=mx.x.example[192.0.2.1]:25, delay=0.0, status=deferred (421 a  b)"
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(retry_delay_secs(1), DELIVERY_RETRY_DELAY_SECS_MIN);
        assert_eq!(retry_delay_secs(2), 2 * DELIVERY_RETRY_DELAY_SECS_MIN);
        assert_eq!(retry_delay_secs(100), DELIVERY_RETRY_DELAY_SECS_MAX);
    }

    #[test]
    fn permanent_failures_bounce_temporary_ones_retry() {
        let attempt = Attempt {
            local_failed: vec![],
            remote: vec![
                ("c@remote.example".into(), RcptResult::Delivered),
                ("d@remote.example".into(), RcptResult::Permanent("550 5.1.1 no such user".into())),
                ("e@remote.example".into(), RcptResult::Temporary("451 4.3.0 later".into())),
            ],
        };
        let p = plan(envelope(1000), attempt, 1010, 3600);
        assert!(!p.finished);
        assert_eq!(p.bounces, vec![("d@remote.example".into(), "5.1.1".into(), "550 5.1.1 no such user".into())]);
        assert!(p.envelope.local.is_empty());
        assert_eq!(p.envelope.remote, vec!["e@remote.example".to_string()]);
        assert_eq!(p.envelope.attempts, 1);
        assert_eq!(p.envelope.next_attempt_unix, 1010 + DELIVERY_RETRY_DELAY_SECS_MIN);
        assert_eq!(p.envelope.last_error.as_deref(), Some("451 4.3.0 later"));
    }

    #[test]
    fn temporary_failures_bounce_after_the_lifetime() {
        let attempt = Attempt {
            local_failed: vec![("bob@example.org".into(), "disk full".into())],
            remote: vec![("c@remote.example".into(), RcptResult::Temporary("connection refused".into()))],
        };
        let p = plan(envelope(0), attempt, 3600, 3600);
        assert!(p.finished);
        assert_eq!(p.bounces.len(), 2);
        assert!(p.bounces.iter().all(|(_, status, why)| status == "4.4.7" && why.starts_with("delivery time expired")));
    }

    #[test]
    fn all_delivered_finishes_without_bounces() {
        let attempt =
            Attempt { local_failed: vec![], remote: vec![("c@remote.example".into(), RcptResult::Delivered)] };
        let p = plan(envelope(0), attempt, 10, 3600);
        assert!(p.finished);
        assert!(p.bounces.is_empty());
        assert_eq!(enhanced_status("550 Requested action not taken"), None);
    }

    #[test]
    fn local_delivery_reports_failures() {
        let dir = std::env::temp_dir().join(format!("mta-delivery-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut env = envelope(0);
        env.local = vec!["alice@example.org".into(), "../evil@example.org".into()];
        let full = vec![("bob@example.org".to_string(), "mailbox full".to_string())];
        env.local.push("bob@example.org".into());
        let failed = deliver_local(&dir, "mx.example.org", &env, b"m\r\n", &full);
        assert_eq!(failed.len(), 2);
        assert_eq!(failed[1], ("bob@example.org".to_string(), "mailbox full".to_string()));
        assert!(!dir.join("example.org/bob").exists());
        assert_eq!(over_quota(&dir, "alice@example.org", 3, 1).unwrap(), Some(3));
        assert_eq!(over_quota(&dir, "alice@example.org", 4, 1).unwrap(), None);
        assert_eq!(over_quota(&dir, "alice@example.org", 4, 2).unwrap(), Some(3));
        assert_eq!(over_quota(&dir, "bob@example.org", 4, 4).unwrap(), None);
        assert_eq!(failed[0].0, "../evil@example.org");
        assert_eq!(std::fs::read_dir(dir.join("example.org/alice/new")).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
