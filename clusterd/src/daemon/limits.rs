//! Every queue of the daemon and its executors, with its bound and what
//! happens when it is full (issue 19). The cluster log's own bounds are in
//! `raft_log::limits`, the resource group task's in `group::exec`
//! (`REQUESTS_MAX`, `EVENTS_MAX`: the daemon awaits).
//!
//! | queue | producer → consumer | bound | when full |
//! |---|---|---|---|
//! | heartbeat datagrams | UDP sockets → loop | `DATAGRAMS_MAX` | the socket task awaits; the kernel's buffer drops (UDP, re-sent every interval) |
//! | internal | volume pollers, fence threads, forced membership → loop | `INTERNAL_MAX` | the producer awaits (pollers poll later; a fence thread blocks) |
//! | reports | executors, reconnects → loop | `REPORTS_MAX` | the producer awaits (the executor pauses) |
//! | executor actions | loop → executor (one per group) | `EXEC_ACTIONS_MAX` | dropped and counted: the loop never waits for an executor. The executor is then stuck behind a command longer than its timeout, and the core re-derives what matters (stop and demote are repeated with a backoff, an unanswered promotion steps down at the lease's end) |
//! | executor freeze | loop → executor | `EXEC_FREEZE_MAX` (1) | coalesced: a freeze is pending already, and a freeze is idempotent; kept apart from the actions so that it is never dropped and still jumps the queue |
//! | admin requests | admin socket → loop | `ADMIN_REQUESTS_MAX` | the connection task awaits |
//! | admin replies | loop → one connection | `ADMIN_REPLIES_MAX` | events: the stream's lag is reported, answers: one per request |
//! | events | loop → `clusterd events` | `EVENTS_MAX` | broadcast: a slow reader lags and is told |
//!
//! Names carry units last; the relations are checked at compile time.

/// Heartbeat datagrams received and not yet handled.
pub const DATAGRAMS_MAX: usize = 1024;
/// Volume states, fence results and membership results for the loop: one
/// poller per group every 200 ms plus rare results; the loop handles each
/// at once.
pub const INTERNAL_MAX: usize = 256;
/// Executor reports: a few per action.
pub const REPORTS_MAX: usize = 256;
/// Actions queued for one executor (a handful per core event).
pub const EXEC_ACTIONS_MAX: usize = 256;
/// A pending freeze (coalesced).
pub const EXEC_FREEZE_MAX: usize = 1;
/// Admin requests waiting for the loop.
pub const ADMIN_REQUESTS_MAX: usize = 64;
/// Responses (event lines) waiting for one admin connection.
pub const ADMIN_REPLIES_MAX: usize = 256;
/// Events buffered for `clusterd events` readers.
pub const EVENTS_MAX: usize = 1024;

const _: () = assert!(EXEC_FREEZE_MAX == 1, "a pending freeze is coalesced: one slot");
const _: () = assert!(REPORTS_MAX >= EXEC_ACTIONS_MAX, "an executor reports at most once per action, besides events");
const _: () = assert!(INTERNAL_MAX > 0 && DATAGRAMS_MAX > 0 && ADMIN_REQUESTS_MAX > 0 && ADMIN_REPLIES_MAX > 0);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::executor::ExecHandle;
    use crate::failover::Action;
    use tokio::sync::mpsc;

    /// The loop's side of an executor never waits and never queues more
    /// than its bound; freezes coalesce into one slot and are never dropped.
    #[test]
    fn a_flooded_executor_queue_stays_bounded_and_keeps_a_freeze() {
        let (tx, mut rx) = mpsc::channel(EXEC_ACTIONS_MAX);
        let (ftx, mut frx) = mpsc::channel(EXEC_FREEZE_MAX);
        let mut h = ExecHandle::new(tx, ftx);
        let n = 10_000u64;
        for i in 0..n {
            let a = if i % 2 == 0 { Action::StopServices } else { Action::Demote };
            h.send(a);
            assert!(h.send(Action::Freeze), "a freeze is never dropped");
            assert!(rx.len() <= EXEC_ACTIONS_MAX);
            assert!(frx.len() <= EXEC_FREEZE_MAX);
        }
        assert_eq!(rx.len(), EXEC_ACTIONS_MAX);
        assert_eq!(h.dropped, n - EXEC_ACTIONS_MAX as u64);
        assert_eq!(frx.len(), 1);
        // The executor catches up: the queue takes actions again, in order.
        assert_eq!(rx.try_recv().unwrap(), Action::StopServices);
        assert!(frx.try_recv().is_ok());
        assert!(h.send(Action::Resume));
        assert!(h.send(Action::Freeze));
        assert_eq!(frx.len(), 1);
    }

    /// Producers that await (pollers, executors, fence threads) are held
    /// at the bound and lose nothing.
    #[tokio::test]
    async fn flooded_internal_and_report_queues_hold_their_producers_at_the_bound() {
        for bound in [INTERNAL_MAX, REPORTS_MAX] {
            let (tx, mut rx) = mpsc::channel::<u64>(bound);
            let n = 10 * bound as u64;
            let producer = tokio::spawn(async move {
                for i in 0..n {
                    tx.send(i).await.unwrap();
                }
            });
            // Let the producer run until it blocks.
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            assert_eq!(rx.len(), bound, "the producer waits at the bound");
            assert!(!producer.is_finished());
            let mut got = 0;
            while let Some(i) = rx.recv().await {
                assert_eq!(i, got, "in order, nothing lost");
                got += 1;
                assert!(rx.len() <= bound);
            }
            assert_eq!(got, n);
            producer.await.unwrap();
        }
    }
}
