//! Reconnecting a StandAlone volume (issue 23, point 6): `Reconnect`, the
//! per-group policy (sans-IO), and `connect`, which runs `replicator
//! connect RES`.
//!
//! Why a volume stayed StandAlone for good: the replicator leaves
//! StandAlone only through `replicator connect` (as DRBD does), and clusterd
//! never ran it. It goes StandAlone when it refuses the peer for a cause it
//! cannot judge alone — both nodes primary for a moment, writes from a
//! stale primary, a primary that would have to become sync target — and
//! the peer coming back after a reboot does not change that. clusterd
//! knows more: the peer is alive on the heartbeat again, and the epochs in
//! the log say who may write; the handshake that `connect` starts then
//! decides the resync direction from the generations as usual.
//!
//! Policy: a StandAlone volume is reconnected while the peer is alive,
//! unless its last error says the admin must decide:
//! - a split brain (both sides changed the data since they last agreed:
//!   DRBD stays StandAlone so that the admin picks the data to discard with
//!   `replicator connect --discard-my-data`);
//! - unrelated data (a wrong disk or recreated metadata);
//! - the admin's own `replicator disconnect`;
//! - no error at all (StandAlone for a reason clusterd did not see).
//!
//! Attempts back off from `RECONNECT_MS_MIN` to `RECONNECT_MS_MAX`; a
//! volume that left StandAlone starts over.

use std::time::Duration;

use replicator_api::ConnState;
use tokio::time::Instant;

use super::exec::run_command;
use super::volume::{Volume, VolumeStatus};

pub const RECONNECT_MS_MIN: u64 = 2_000;
pub const RECONNECT_MS_MAX: u64 = 60_000;
const _: () = assert!(RECONNECT_MS_MIN > 0 && RECONNECT_MS_MIN <= RECONNECT_MS_MAX);

/// How long one `replicator connect` may take.
const CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Why a StandAlone volume is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminDecides {
    SplitBrain,
    Unrelated,
    DisconnectedByAdmin,
    UnknownCause,
}

impl AdminDecides {
    pub fn fix(self) -> &'static str {
        match self {
            AdminDecides::SplitBrain => {
                "split brain: on the node whose changes must go run `replicator connect RES --discard-my-data`, then `replicator connect RES` on the other"
            }
            AdminDecides::Unrelated => {
                "the peers' data is unrelated (wrong disk or recreated metadata): recreate the metadata of the side to overwrite"
            }
            AdminDecides::DisconnectedByAdmin => "disconnected by the admin: `replicator connect RES` when wanted",
            AdminDecides::UnknownCause => "StandAlone without an error: `replicator connect RES` when wanted",
        }
    }
}

/// What the policy says about one volume status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not StandAlone, or the peer is not back: nothing to do.
    Nothing,
    /// Run `replicator connect` now.
    Connect,
    /// Due later.
    Wait,
    /// Left to the admin (reported once per StandAlone spell).
    Admin { cause: AdminDecides, first: bool },
}

/// The cause a StandAlone volume's last error names, if it is the admin's
/// to resolve (the replicator's wording: replication/replica.rs).
pub fn admin_decides(last_error: Option<&str>) -> Option<AdminDecides> {
    let Some(e) = last_error else { return Some(AdminDecides::UnknownCause) };
    let e = e.to_ascii_lowercase();
    if e.contains("split brain") {
        Some(AdminDecides::SplitBrain)
    } else if e.contains("unrelated") {
        Some(AdminDecides::Unrelated)
    } else if e.contains("disconnected by the admin") {
        Some(AdminDecides::DisconnectedByAdmin)
    } else {
        None
    }
}

/// The per-group reconnect policy (sans-IO).
#[derive(Debug, Clone, Default)]
pub struct Reconnect {
    next_try_ms: u64,
    attempts: u32,
    reported: bool,
}

impl Reconnect {
    pub fn poll(&mut self, now_ms: u64, status: &VolumeStatus, peer_alive: bool) -> Verdict {
        if status.connection != ConnState::StandAlone {
            *self = Reconnect::default();
            return Verdict::Nothing;
        }
        if let Some(cause) = admin_decides(status.last_error.as_deref()) {
            let first = !self.reported;
            self.reported = true;
            return Verdict::Admin { cause, first };
        }
        if !peer_alive {
            return Verdict::Nothing;
        }
        if now_ms < self.next_try_ms {
            return Verdict::Wait;
        }
        let pause = RECONNECT_MS_MIN.saturating_mul(1 << self.attempts.min(16)).min(RECONNECT_MS_MAX);
        self.attempts = self.attempts.saturating_add(1);
        self.next_try_ms = now_ms + pause;
        Verdict::Connect
    }
}

/// `replicator connect RES`; the error is one line for the events.
pub async fn connect(volume: &Volume) -> Result<(), String> {
    let cmd = volume.command("connect", &[]);
    let deadline = Instant::now() + Duration::from_millis(CONNECT_TIMEOUT_MS);
    match run_command(&cmd, deadline).await {
        Ok(out) if out.code == Some(0) => Ok(()),
        Ok(out) => Err(format!("replicator connect {} failed: {}", volume.resource, out.describe())),
        Err(e) => Err(format!("replicator connect {}: {e}", volume.resource)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(connection: &str, last_error: Option<&str>) -> VolumeStatus {
        let connection = *ConnState::ALL.iter().find(|c| c.as_str() == connection).expect("a connection state");
        VolumeStatus {
            role: replicator_api::Role::Secondary,
            disk: replicator_api::DiskState::UpToDate,
            peer_disk: None,
            peer_role: None,
            connection,
            epoch: 4,
            suspended: false,
            last_error: last_error.map(str::to_owned),
        }
    }

    #[test]
    fn a_standalone_volume_reconnects_once_the_peer_is_back_with_backoff() {
        let mut r = Reconnect::default();
        let s = status("StandAlone", Some("both nodes became primary; disconnected to protect the data"));
        assert_eq!(r.poll(0, &s, false), Verdict::Nothing, "the peer is not back");
        assert_eq!(r.poll(100, &s, true), Verdict::Connect);
        assert_eq!(r.poll(2_099, &s, true), Verdict::Wait);
        assert_eq!(r.poll(2_100, &s, true), Verdict::Connect);
        assert_eq!(r.poll(6_099, &s, true), Verdict::Wait, "4 s after the second attempt");
        assert_eq!(r.poll(6_100, &s, true), Verdict::Connect);
        // Connected again: the next StandAlone spell starts over.
        assert_eq!(r.poll(7_000, &status("Connected", None), true), Verdict::Nothing);
        assert_eq!(r.poll(7_100, &s, true), Verdict::Connect);
        let stale = status("StandAlone", Some("refusing writes from a stale primary (epoch 3 < 4)"));
        assert_eq!(Reconnect::default().poll(0, &stale, true), Verdict::Connect);
        // The backoff is capped.
        let mut r = Reconnect::default();
        let mut last = 0;
        let mut now = 0;
        for _ in 0..20 {
            while r.poll(now, &s, true) != Verdict::Connect {
                now += 1000;
            }
            last = now;
        }
        let before = last;
        while r.poll(now, &s, true) != Verdict::Connect {
            now += 1000;
        }
        assert_eq!(now - before, RECONNECT_MS_MAX);
    }

    #[test]
    fn a_split_brain_and_the_admins_decisions_stay_standalone() {
        let split =
            "split brain detected with b: both nodes changed the data since they last agreed; nothing was overwritten";
        for (err, cause) in [
            (Some(split), AdminDecides::SplitBrain),
            (Some("the data on b is unrelated to this node's (no common generation)"), AdminDecides::Unrelated),
            (Some("disconnected by the admin"), AdminDecides::DisconnectedByAdmin),
            (None, AdminDecides::UnknownCause),
        ] {
            let mut r = Reconnect::default();
            let s = status("StandAlone", err);
            assert_eq!(r.poll(0, &s, true), Verdict::Admin { cause, first: true }, "{err:?}");
            assert_eq!(r.poll(100_000, &s, true), Verdict::Admin { cause, first: false }, "{err:?}");
            assert!(!cause.fix().contains('\n'));
        }
    }

    #[test]
    fn connect_runs_replicator_connect_on_the_resource() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = std::env::temp_dir().join(format!("clusterd-reconnect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seen = dir.join("args");
        let fake = dir.join("replicator");
        std::fs::write(&fake, format!("#!/bin/sh\necho \"$@\" > {}\n", seen.display())).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let v = Volume { replicator: fake.clone(), resource: "mail".into(), node: Some("b".into()), timeout_ms: 5000 };
        rt.block_on(connect(&v)).unwrap();
        assert_eq!(std::fs::read_to_string(&seen).unwrap().trim(), "connect mail --node b");
        std::fs::write(&fake, "#!/bin/sh\necho 'no such resource' >&2\nexit 3\n").unwrap();
        let e = rt.block_on(connect(&v)).unwrap_err();
        assert!(e.contains("exit code 3: no such resource"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
