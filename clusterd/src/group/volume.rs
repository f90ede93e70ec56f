//! `Volume`: the replicated volume of a group, driven through the
//! replicator CLI — the commands the failover core's actions map to:
//! `Promote { epoch }` → `promote`, `Demote` → `demote`, `Freeze` →
//! `freeze` (`replicator suspend-io`: writes are held, not acknowledged),
//! `Resume` → `resume` (`replicator resume-io`); and `status`, parsed from
//! `replicator status RES --json`.

use std::path::PathBuf;
use std::time::Duration;

use replicator_api::{ConnState, DiskState as ReplDisk, Role};
use tokio::time::Instant;

use super::config::GroupSpec;
use super::exec::{run_command, CommandSpec, ProcError};
use crate::failover::DiskState;

/// Default bound of one replicator command.
pub const VOLUME_TIMEOUT_MS_DEFAULT: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    #[error("failed to run replicator {command} for {volume}: {source}")]
    Run { command: String, volume: String, source: ProcError },
    #[error("replicator {command} {volume} failed: {why}")]
    Refused { command: String, volume: String, why: String },
    #[error("replicator status {volume} --json: unexpected output ({why})")]
    BadStatus { volume: String, why: String },
}

/// The volume's state, as far as clusterd needs it: typed by the
/// replicator's admin API, so a state clusterd does not know makes the
/// report unreadable (and the volume untrusted) instead of being ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    pub role: Role,
    pub disk: ReplDisk,
    pub peer_disk: Option<ReplDisk>,
    pub peer_role: Option<Role>,
    pub connection: ConnState,
    pub epoch: u64,
    /// I/O is suspended (by fencing or `suspend-io`): writes are held.
    pub suspended: bool,
    pub last_error: Option<String>,
}

impl VolumeStatus {
    pub fn is_primary(&self) -> bool {
        self.role == Role::Primary
    }

    /// The local disk in the failover core's terms (None: a state it does
    /// not weigh, such as Failed).
    pub fn disk_state(&self) -> Option<DiskState> {
        core_disk(self.disk)
    }

    pub fn peer_disk_state(&self) -> Option<DiskState> {
        self.peer_disk.and_then(core_disk)
    }

    /// One line for status: "Primary+suspended, StandAlone, epoch 4, disk
    /// UpToDate" and the replicator's last error, if any.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}{}, {}, epoch {}, disk {}",
            self.role,
            if self.suspended { "+suspended" } else { "" },
            self.connection,
            self.epoch,
            self.disk
        );
        if let Some(e) = self.last_error.as_deref().map(super::exec::one_line).filter(|e| !e.is_empty()) {
            s.push_str(&format!(" (last error: {e})"));
        }
        s
    }
}

fn core_disk(d: ReplDisk) -> Option<DiskState> {
    match d {
        ReplDisk::UpToDate => Some(DiskState::UpToDate),
        ReplDisk::Outdated => Some(DiskState::Outdated),
        ReplDisk::Inconsistent => Some(DiskState::Inconsistent),
        ReplDisk::Failed => None,
    }
}

/// Parses `replicator status RES --json`: the report's version first,
/// then the typed state (fields clusterd does not need are ignored).
pub fn parse_status(json: &str) -> Result<VolumeStatus, String> {
    let s = replicator_api::parse_report_state(json).map_err(|e| e.to_string())?;
    Ok(VolumeStatus {
        role: s.role,
        disk: s.disk,
        peer_disk: s.peer_disk,
        peer_role: s.peer_role,
        connection: s.connection,
        epoch: s.epoch,
        suspended: s.suspended,
        last_error: s.last_error,
    })
}

/// A group's volume: `replicator` commands on one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub replicator: PathBuf,
    /// Resource name or file.
    pub resource: String,
    /// This node's name in the resource (`--node`); None: the hostname.
    pub node: Option<String>,
    pub timeout_ms: u64,
}

impl Volume {
    pub fn new(spec: &GroupSpec, node: Option<String>) -> Volume {
        Volume {
            replicator: spec.replicator.clone(),
            resource: spec.volume.clone(),
            node,
            timeout_ms: VOLUME_TIMEOUT_MS_DEFAULT,
        }
    }

    /// `replicator SUBCOMMAND RES [--node N] EXTRA…`
    pub fn command(&self, subcommand: &str, extra: &[&str]) -> CommandSpec {
        let mut c = CommandSpec::new(&self.replicator, &[subcommand, &self.resource]);
        if let Some(n) = &self.node {
            c = c.arg("--node").arg(n);
        }
        for e in extra {
            c = c.arg(e);
        }
        c
    }

    async fn run(&self, subcommand: &str, extra: &[&str]) -> Result<String, VolumeError> {
        let cmd = self.command(subcommand, extra);
        let deadline = Instant::now() + Duration::from_millis(self.timeout_ms);
        let out = run_command(&cmd, deadline).await.map_err(|source| VolumeError::Run {
            command: subcommand.into(),
            volume: self.resource.clone(),
            source,
        })?;
        if out.code != Some(0) {
            return Err(VolumeError::Refused {
                command: subcommand.into(),
                volume: self.resource.clone(),
                why: out.describe(),
            });
        }
        Ok(out.stdout)
    }

    /// `replicator primary RES --epoch N`: the peer then refuses writes of
    /// older epochs.
    pub async fn promote(&self, epoch: u64) -> Result<(), VolumeError> {
        self.run("primary", &["--epoch", &epoch.to_string()]).await.map(drop)
    }

    /// `replicator secondary RES` (refused while clients are attached).
    pub async fn demote(&self) -> Result<(), VolumeError> {
        self.run("secondary", &[]).await.map(drop)
    }

    /// `replicator suspend-io RES`: writes are held, not acknowledged.
    pub async fn freeze(&self) -> Result<(), VolumeError> {
        self.run("suspend-io", &[]).await.map(drop)
    }

    /// `replicator resume-io RES`.
    pub async fn resume(&self) -> Result<(), VolumeError> {
        self.run("resume-io", &[]).await.map(drop)
    }

    pub async fn status(&self) -> Result<VolumeStatus, VolumeError> {
        let json = self.run("status", &["--json"]).await?;
        parse_status(&json).map_err(|why| VolumeError::BadStatus { volume: self.resource.clone(), why })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_name_resource_node_and_epoch() {
        let v = Volume {
            replicator: "/usr/local/bin/replicator".into(),
            resource: "mail".into(),
            node: Some("b".into()),
            timeout_ms: 1000,
        };
        let c = v.command("primary", &["--epoch", "7"]);
        let args: Vec<String> = c.args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["primary", "mail", "--node", "b", "--epoch", "7"]);
        assert_eq!(c.program, PathBuf::from("/usr/local/bin/replicator"));
    }

    #[test]
    fn status_shows_the_volumes_real_role() {
        // Issue 23: status said "here: Secondary" while the volume was
        // Primary and suspended.
        let s = parse_status(&report(
            r#""role":"Primary","disk":"UpToDate","connection":"StandAlone","epoch":4,"suspended":true,
            "last_error":"both nodes are primary:\nsplit brain""#,
        ))
        .unwrap();
        assert_eq!(
            s.describe(),
            "Primary+suspended, StandAlone, epoch 4, disk UpToDate (last error: both nodes are primary:; split brain)"
        );
    }

    /// A version-1 report whose state has `fields` and defaults elsewhere.
    fn report(fields: &str) -> String {
        format!(
            r#"{{"api_version":{},"state":{{"resource":"mail","node":"a",
            "protocol":"C","generations":[1,0,0,0],"out_of_sync_bytes":0,"resync":null,
            "verify":null,"verify_out_of_sync_bytes":0,"writes_in_flight":0,"resync_sent_bytes":0,
            "resync_received_bytes":0,{fields}}}}}"#,
            replicator_api::API_VERSION
        )
    }

    #[test]
    fn every_replicator_state_reaches_the_failover_core() {
        // clusterd once parsed Debug strings and ignored names it did not
        // know; every state is now typed, and an unknown one is an error.
        for &conn in ConnState::ALL {
            for &disk in ReplDisk::ALL {
                let s = parse_status(&report(&format!(
                    r#""role":"Secondary","disk":"{disk}","connection":"{conn}","epoch":2,"suspended":false,
                    "last_error":null,"peer_disk":"{disk}""#
                )))
                .unwrap();
                assert_eq!((s.connection, s.disk, s.peer_disk), (conn, disk, Some(disk)));
                assert_eq!(s.disk_state().is_none(), disk == ReplDisk::Failed);
            }
        }
        let unknown = report(
            r#""role":"Secondary","disk":"Diskless","connection":"Connected","epoch":2,"suspended":false,"last_error":null"#,
        );
        assert!(parse_status(&unknown).unwrap_err().contains("Diskless"));
        let newer = report(r#""role":"Secondary","disk":"UpToDate","connection":"Connected","epoch":2,"suspended":false,"last_error":null"#)
            .replace(r#""api_version":1"#, r#""api_version":2"#);
        assert!(parse_status(&newer).unwrap_err().contains("install matching"));
    }

    #[test]
    fn errors_carry_the_cli_stderr() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let v = Volume { replicator: "sh".into(), resource: "-c".into(), node: None, timeout_ms: 5000 };
        // `sh primary -c …` fails: sh cannot open a script named "primary".
        let err = rt.block_on(v.promote(3)).unwrap_err();
        assert!(matches!(&err, VolumeError::Refused { why, .. } if why.contains("primary")), "{err}");
        let v = Volume { replicator: "/nonexistent/replicator".into(), ..v };
        assert!(matches!(rt.block_on(v.demote()), Err(VolumeError::Run { .. })));
    }
}
