//! Delivery of queued messages: local recipients into Maildir. Remote
//! recipients stay queued (remote SMTP delivery is not implemented yet)
//! with a note in `last_error`, visible in `mta queue list`.
//!
//! **Invariant:** a queue file is removed only after every local copy is
//! durable; a crash in between delivers those copies again on restart (at
//! most one duplicate per crash), never loses one.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::limits::{DELIVERY_RETRY_DELAY_SECS_MAX, DELIVERY_RETRY_DELAY_SECS_MIN};
use crate::maildir;
use crate::queue::{Queue, QueueError};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassStats {
    pub delivered_messages: usize,
    pub deferred_messages: usize,
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Exponential backoff after `attempts` failed attempts.
pub fn retry_delay_secs(attempts: u32) -> u64 {
    let doublings = attempts.saturating_sub(1).min(16);
    (DELIVERY_RETRY_DELAY_SECS_MIN << doublings).min(DELIVERY_RETRY_DELAY_SECS_MAX)
}

/// One pass over the due messages.
pub fn run_pass(queue: &Queue, mailboxes: &Path, hostname: &str, now: u64) -> Result<PassStats, QueueError> {
    let mut stats = PassStats::default();
    for envelope in queue.due(now)? {
        let id = envelope.id.clone();
        let (mut envelope, message) = match queue.read(&id) {
            Ok(m) => m,
            // Deleted or held by the admin since `due` listed it.
            Err(QueueError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let mut failed = Vec::new();
        let mut last_error = None;
        for mailbox in &envelope.local {
            match maildir::deliver(mailboxes, mailbox, hostname, &[&message]) {
                Ok(_durable) => tracing::info!(id = %id, to = %mailbox, "delivered to Maildir"),
                Err(e) => {
                    tracing::warn!(id = %id, to = %mailbox, error = %e, "local delivery failed; will retry");
                    last_error = Some(format!("local delivery to {mailbox}: {e}"));
                    failed.push(mailbox.clone());
                }
            }
        }
        if failed.is_empty() && envelope.remote.is_empty() {
            queue.remove(&id)?;
            stats.delivered_messages += 1;
            continue;
        }
        if !envelope.remote.is_empty() && last_error.is_none() {
            last_error = Some("remote delivery is not implemented yet; held in the queue".to_string());
        }
        envelope.local = failed;
        envelope.attempts += 1;
        envelope.next_attempt_unix = now + retry_delay_secs(envelope.attempts);
        envelope.last_error = last_error;
        queue.update(&envelope)?;
        stats.deferred_messages += 1;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::StoredEnvelope;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(retry_delay_secs(1), DELIVERY_RETRY_DELAY_SECS_MIN);
        assert_eq!(retry_delay_secs(2), 2 * DELIVERY_RETRY_DELAY_SECS_MIN);
        assert_eq!(retry_delay_secs(100), DELIVERY_RETRY_DELAY_SECS_MAX);
    }

    #[test]
    fn local_mail_is_delivered_and_leaves_the_queue_remote_stays() {
        let dir = std::env::temp_dir().join(format!("mta-delivery-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (q, _) = Queue::open(&dir.join("queue")).unwrap();
        let mk = |local: Vec<&str>, remote: Vec<&str>| StoredEnvelope {
            id: Queue::new_id(),
            received_unix: 0,
            from: String::new(),
            login: None,
            local: local.into_iter().map(String::from).collect(),
            remote: remote.into_iter().map(String::from).collect(),
            attempts: 0,
            next_attempt_unix: 0,
            last_error: None,
        };
        let only_local = mk(vec!["alice@example.org", "bob@example.org"], vec![]);
        let mixed = mk(vec!["alice@example.org"], vec!["carol@remote.example"]);
        let _p = q.enqueue(&only_local, &[b"m1\r\n"]).unwrap();
        let _p = q.enqueue(&mixed, &[b"m2\r\n"]).unwrap();
        let boxes = dir.join("mailboxes");
        let stats = run_pass(&q, &boxes, "mx.example.org", 1000).unwrap();
        assert_eq!(stats, PassStats { delivered_messages: 1, deferred_messages: 1 });
        assert_eq!(std::fs::read_dir(boxes.join("example.org/alice/new")).unwrap().count(), 2);
        assert_eq!(std::fs::read_dir(boxes.join("example.org/bob/new")).unwrap().count(), 1);
        let left = q.list().unwrap();
        assert_eq!(left.len(), 1);
        let env = &left[0].envelope;
        assert!(env.local.is_empty());
        assert_eq!(env.remote, vec!["carol@remote.example".to_string()]);
        assert_eq!(env.next_attempt_unix, 1000 + DELIVERY_RETRY_DELAY_SECS_MIN);
        // Not due yet: nothing happens, nothing is delivered twice.
        assert_eq!(run_pass(&q, &boxes, "mx.example.org", 1001).unwrap(), PassStats::default());
        assert_eq!(std::fs::read_dir(boxes.join("example.org/alice/new")).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
