//! The delivery loop: woken per queued message and every 30 s, it takes
//! each due message, delivers local copies, sends remote ones through the
//! relay host or the domains' MX hosts, queues a DSN for failures, then removes or reschedules the
//! queue file — in that order (see `delivery`'s invariant).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Shared;
use crate::bounce;
use crate::config::RelayTls;
use crate::delivery::{self, Attempt, Status};
use crate::mx::{Route, Router};
use crate::queue::{Queue, QueueError, StoredEnvelope};
use crate::remote::{self, ClientTls, Credentials, Hop, Outgoing, RcptResult};
use crate::smtp::address::Address;

/// Delivery runs at least this often, even without new mail (retries).
const DELIVERY_SCAN_SECS: u64 = 30;
/// Messages delivered at once.
const DELIVERIES_CONCURRENT_MAX: usize = 16;

/// What remote delivery needs besides the shared state.
pub struct Outbound {
    /// MX routing; `None` with a relay host (or without a resolver).
    pub router: Option<Router>,
    pub tls: ClientTls,
    pub relay_credentials: Option<Credentials>,
}

pub async fn run(shared: Arc<Shared>, outbound: Outbound, mut shutdown: watch::Receiver<bool>) {
    let outbound = Arc::new(outbound);
    loop {
        if let Err(e) = pass(&shared, &outbound).await {
            tracing::error!(error = %e, "delivery pass failed");
        }
        tokio::select! {
            _ = shared.delivery_wakeup.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(DELIVERY_SCAN_SECS)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, QueueError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(QueueError::Corrupt { path: "(task)".into(), why: e.to_string() }),
    }
}

/// Delivers every due message, `DELIVERIES_CONCURRENT_MAX` at a time (each
/// one waits on fsyncs or a remote server most of its time).
async fn pass(shared: &Arc<Shared>, outbound: &Arc<Outbound>) -> Result<(), QueueError> {
    let now = delivery::now_unix();
    let queue = shared.queue.clone();
    let (due, total, oldest) = blocking(move || {
        let all = queue.list()?;
        let oldest = all.iter().map(|e| e.envelope.received_unix).min().unwrap_or(0);
        let total = all.len() as u64;
        let due: Vec<_> =
            all.into_iter().filter(|e| !e.held && e.envelope.next_attempt_unix <= now).map(|e| e.envelope).collect();
        Ok((due, total, oldest))
    })
    .await?;
    let m = &*crate::metrics::METRICS;
    m.queue_messages.store(total, std::sync::atomic::Ordering::Relaxed);
    m.queue_oldest_received_unix.store(oldest, std::sync::atomic::Ordering::Relaxed);
    let mut running = tokio::task::JoinSet::new();
    let mut first_error = None;
    for listed in due {
        while running.len() >= DELIVERIES_CONCURRENT_MAX {
            if let Some(Ok(Err(e))) = running.join_next().await {
                first_error.get_or_insert(e);
            }
        }
        let (shared, outbound) = (shared.clone(), outbound.clone());
        running.spawn(async move {
            let queue = shared.queue.clone();
            let id = listed.id.clone();
            // An admin change in progress (hold, delete) goes first; the
            // next pass sees what it left.
            let Some(_claim) = shared.claims.try_claim(&id) else { return Ok(()) };
            match blocking(move || queue.read(&id)).await {
                Ok((envelope, message)) => deliver_one(&shared, &outbound, envelope, message).await,
                // Deleted or held by the admin since it was listed.
                Err(QueueError::NotFound(_)) => Ok(()),
                Err(e) => Err(e),
            }
        });
    }
    while let Some(done) = running.join_next().await {
        match done {
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => tracing::error!(error = %e, "delivery task panicked"),
            Ok(Ok(())) => {}
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn deliver_one(
    shared: &Arc<Shared>,
    outbound: &Outbound,
    envelope: StoredEnvelope,
    message: Vec<u8>,
) -> Result<(), QueueError> {
    let message = Arc::new(message);
    let full = mailboxes_over_quota(shared, &envelope.local, message.len() as u64).await;
    let (boxes, host, env, msg) =
        (shared.mailboxes_dir.clone(), shared.config.hostname.clone(), envelope.clone(), message.clone());
    let local_failed = blocking(move || Ok(delivery::deliver_local(&boxes, &host, &env, &msg, &full))).await?;
    let remote =
        if envelope.remote.is_empty() { Vec::new() } else { send_remote(shared, outbound, &envelope, &message).await };
    let now = delivery::now_unix();
    let attempt = Attempt {
        local_failed: local_failed.clone(),
        remote: remote.iter().map(|(r, result, _)| (r.clone(), result.clone())).collect(),
    };
    let plan = delivery::plan(envelope.clone(), attempt, now, shared.config.delivery.queue_lifetime_secs);
    log_outcomes(&envelope, &local_failed, &remote, &plan.bounces);
    if !plan.bounces.is_empty() {
        if envelope.from.is_empty() {
            tracing::warn!(
                "{}: bounce undeliverable, dropped: null sender, {} failed",
                envelope.id,
                plan.bounces.len()
            );
        } else {
            queue_bounce(shared, &envelope, &plan.bounces, &message, now).await?;
        }
    }
    let m = &*crate::metrics::METRICS;
    m.bounced_recipients.fetch_add(plan.bounces.len() as u64, std::sync::atomic::Ordering::Relaxed);
    crate::metrics::bump(if plan.finished { &m.deliveries_done } else { &m.deliveries_deferred });
    let queue = shared.queue.clone();
    if plan.finished {
        let id = envelope.id.clone();
        blocking(move || queue.remove(&id)).await?;
        tracing::info!("{}: removed", envelope.id);
        Ok(())
    } else {
        let updated = plan.envelope;
        tracing::info!(id = %updated.id, attempts = updated.attempts, error = updated.last_error.as_deref().unwrap_or(""), "delivery deferred");
        blocking(move || queue.update(&updated)).await
    }
}

/// One Postfix-style line per recipient of this attempt: every local
/// mailbox and every remote recipient tried, as sent, deferred or bounced
/// (a failure is bounced when the plan bounces it).
fn log_outcomes(
    envelope: &StoredEnvelope,
    local_failed: &[(String, String)],
    remote: &[(String, RcptResult, String)],
    bounces: &[(String, String, String)],
) {
    let delay = delivery::delay_secs(envelope.received_unix);
    let failed = |rcpt: &str, why: &str| match bounces.iter().find(|(r, _, _)| r == rcpt) {
        Some((_, _, diagnostic)) => (Status::Bounced, diagnostic.clone()),
        None => (Status::Deferred, why.to_string()),
    };
    for mailbox in &envelope.local {
        let (status, reason) = match local_failed.iter().find(|(m, _)| m == mailbox) {
            Some((_, why)) => failed(mailbox, why),
            None => (Status::Sent, "delivered to maildir".to_string()),
        };
        emit(&delivery::outcome_line(&envelope.id, mailbox, "local", delay, status, &reason), status);
    }
    for (rcpt, result, relay) in remote {
        let (status, reason) = match result {
            RcptResult::Delivered => (Status::Sent, "delivered".to_string()),
            RcptResult::Temporary(why) | RcptResult::Permanent(why) => failed(rcpt, why),
        };
        emit(&delivery::outcome_line(&envelope.id, rcpt, relay, delay, status, &reason), status);
    }
}

fn emit(line: &str, status: Status) {
    match status {
        Status::Sent => tracing::info!("{line}"),
        Status::Deferred | Status::Bounced => tracing::warn!("{line}"),
    }
}

/// The mailboxes among `mailboxes` where `incoming_bytes` more would exceed
/// the quota, with the reason. Lookup or disk errors count as "fits": the
/// quota is a soft limit, and mail is not held back for it.
pub(super) async fn mailboxes_over_quota(
    shared: &Shared,
    mailboxes: &[String],
    incoming_bytes: u64,
) -> Vec<(String, String)> {
    if mailboxes.is_empty() {
        return Vec::new();
    }
    let quotas = match shared.directory.quotas(mailboxes).await {
        Ok(q) if q.is_empty() => return Vec::new(),
        Ok(q) => q,
        Err(e) => {
            tracing::warn!(error = %e, "quota lookup failed; not enforcing quotas for this message");
            return Vec::new();
        }
    };
    let root = shared.mailboxes_dir.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let mut full = Vec::new();
        for (mailbox, quota) in quotas {
            match delivery::over_quota(&root, &mailbox, quota, incoming_bytes) {
                Ok(Some(used)) => {
                    let why = format!("mailbox full: {used} of {quota} bytes used, {incoming_bytes} more do not fit");
                    full.push((mailbox, why));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%mailbox, error = %e, "cannot measure the mailbox; quota not enforced"),
            }
        }
        full
    })
    .await;
    checked.unwrap_or_default()
}

/// Every remote recipient with its result and the relay that gave it
/// (`host[addr]:port`, or `none` when no host was tried).
async fn send_remote(
    shared: &Shared,
    outbound: &Outbound,
    envelope: &StoredEnvelope,
    message: &[u8],
) -> Vec<(String, RcptResult, String)> {
    let d = &shared.config.delivery;
    if let Some(relay) = d.relay_host {
        let name = relay.ip().to_string();
        let hop = Hop {
            addr: relay,
            server_name: &name,
            level: d.relay_tls_level,
            implicit_tls: d.relay_tls == RelayTls::Implicit,
            auth: outbound.relay_credentials.as_ref(),
        };
        return send_via(shared, outbound, &[hop], envelope, &envelope.remote, message).await;
    }
    let Some(router) = &outbound.router else {
        let why = "no route to remote domains: no relay host and no DNS resolver".to_string();
        return envelope
            .remote
            .iter()
            .map(|r| (r.clone(), RcptResult::Temporary(why.clone()), "none".into()))
            .collect();
    };
    // One transaction per destination domain, in first-seen order.
    let mut domains: Vec<(String, Vec<String>)> = Vec::new();
    for rcpt in &envelope.remote {
        let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d).to_lowercase();
        match domains.iter_mut().find(|(d, _)| *d == domain) {
            Some((_, list)) => list.push(rcpt.clone()),
            None => domains.push((domain, vec![rcpt.clone()])),
        }
    }
    let mut results = Vec::new();
    for (domain, rcpts) in domains {
        match router.route(&domain).await {
            Route::Hosts(hosts) => {
                let level = d.tls_level_for(&domain);
                let hops: Vec<Hop> = hosts
                    .iter()
                    .map(|(name, addr)| Hop { addr: *addr, server_name: name, level, implicit_tls: false, auth: None })
                    .collect();
                results.extend(send_via(shared, outbound, &hops, envelope, &rcpts, message).await)
            }
            Route::Refused { status, why } => results.extend(
                rcpts.into_iter().map(|r| (r, RcptResult::Permanent(format!("550 {status} {why}")), "none".into())),
            ),
            Route::Retry(why) => {
                results.extend(rcpts.into_iter().map(|r| (r, RcptResult::Temporary(why.clone()), "none".into())))
            }
        }
    }
    results
}

/// Tries each host in turn until one gives an answer that is not temporary;
/// the results are the last host's, each with that host as the relay.
async fn send_via(
    shared: &Shared,
    outbound: &Outbound,
    hops: &[Hop<'_>],
    envelope: &StoredEnvelope,
    rcpts: &[String],
    message: &[u8],
) -> Vec<(String, RcptResult, String)> {
    let out = Outgoing { helo: &shared.config.hostname, from: &envelope.from, recipients: rcpts, message };
    let mut results = Vec::new();
    for hop in hops {
        let relay = format!("{}[{}]:{}", hop.server_name, hop.addr.ip(), hop.addr.port());
        let sent = remote::send(hop, &outbound.tls, &out).await;
        let all_temporary = sent.iter().all(|(_, r)| matches!(r, RcptResult::Temporary(_)));
        if all_temporary && hops.len() > 1 {
            tracing::debug!(id = %envelope.id, %relay, "every recipient failed temporarily; trying the next host");
        }
        results = sent.into_iter().map(|(rcpt, r)| (rcpt, r, relay.clone())).collect();
        if !all_temporary {
            break;
        }
    }
    results
}

/// Queues a DSN to the original sender, local or remote.
async fn queue_bounce(
    shared: &Shared,
    original: &StoredEnvelope,
    failures: &[(String, String, String)],
    message: &[u8],
    now: u64,
) -> Result<(), QueueError> {
    let dsn = bounce::dsn(&shared.config.hostname, original, failures, message, now);
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    match Address::parse(&original.from, true) {
        Ok(sender) => match shared.directory.recipient_facts(&sender).await {
            Ok(f) if f.domain_hosted => local = f.mailboxes,
            Ok(_) => remote.push(original.from.clone()),
            Err(e) => {
                tracing::error!(error = %e, "directory unavailable for a bounce; retrying later");
                return Err(QueueError::Corrupt { path: "(directory)".into(), why: e.to_string() });
            }
        },
        Err(e) => tracing::warn!(id = %original.id, error = %e, "bounce to an unparseable sender dropped"),
    }
    if local.is_empty() && remote.is_empty() {
        tracing::warn!(id = %original.id, "bounce has no deliverable recipient; dropped");
        return Ok(());
    }
    let id = Queue::new_id();
    let header = format!(
        "Received: from localhost\r\n\tby {} with local id {id};\r\n\t{}\r\n",
        shared.config.hostname,
        crate::received::rfc5322_date(now)
    );
    let stored = StoredEnvelope {
        id: id.clone(),
        received_unix: now,
        from: String::new(),
        login: None,
        local,
        remote,
        attempts: 0,
        next_attempt_unix: 0,
        last_error: None,
    };
    let queue = shared.queue.clone();
    blocking(move || queue.enqueue(&stored, &[header.as_bytes(), &dsn]).map(|_durable| ())).await?;
    tracing::info!("{}: sender non-delivery notification: {id}", original.id);
    shared.delivery_wakeup.notify_one();
    Ok(())
}
