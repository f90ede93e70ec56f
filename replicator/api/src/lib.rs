//! The replicator's admin-facing state, shared by the replicator (which
//! reports it) and clusterd (which decides failover on it).
//!
//! `replicator status RES --json` prints a report whose `api_version` is
//! [`API_VERSION`] and whose `state` is a [`ReplicaState`]. Every state is
//! an enum here, serialised by its DRBD-style name ("UpToDate",
//! "SyncTarget"), so a reader either understands a state or refuses the
//! report: a renamed or new variant can no longer drop out of a failover
//! decision unnoticed, as a parsed Debug string could.
//!
//! **Compatibility rule:** adding a field (with `#[serde(default)]` on the
//! reader's side) keeps the version; renaming or removing a field or a
//! variant, or adding a variant an older reader would misjudge, raises
//! [`API_VERSION`].
//!
//! **Boundary:** types and names only; no I/O, no replication logic.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The version of the status report's shape (see the compatibility rule).
pub const API_VERSION: u32 = 1;

/// Declares a state enum with its wire names, `ALL`, `as_str` and `Display`.
macro_rules! state_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name on the wire and in `status`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant)),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

state_enum! {
    /// Who may write. Only a primary serves writable NBD.
    Role {
        Primary,
        Secondary,
    }
}

state_enum! {
    /// A disk's state, named as DRBD users know them.
    DiskState {
        /// Consistent and, as far as this node knows, current.
        UpToDate,
        /// Consistent, but the peer is known to have newer data.
        Outdated,
        /// Partly written by a resync (or never synced): must not be promoted.
        Inconsistent,
        /// A local I/O error: the disk holds unknown data until resynced.
        Failed,
    }
}

state_enum! {
    /// Replication protocols, as in DRBD.
    Protocol {
        /// Ack after the local write completed and the data is queued to the peer.
        A,
        /// Ack after the local write completed and the peer received the data.
        B,
        /// Ack after both disks completed the write.
        C,
    }
}

state_enum! {
    /// The replication link, as DRBD names its connection states.
    ConnState {
        /// Not connecting: by the admin's choice or after a split brain.
        StandAlone,
        /// Dialling or waiting for the peer.
        Connecting,
        /// Link up, generations being compared.
        WfReportParams,
        /// Decided to resync, exchanging bitmaps.
        WfBitmap,
        /// Replicating every write.
        Connected,
        /// Sending a resync to the peer.
        SyncSource,
        /// Receiving a resync from the peer.
        SyncTarget,
        /// Online verify running, this node comparing.
        VerifySource,
        /// Protocol A fell behind (`on-congestion = "pull-ahead"`): writes
        /// are only marked in the bitmap until the link catches up.
        Ahead,
        /// The peer of an `Ahead` node: it receives nothing until the resync.
        Behind,
    }
}

impl ConnState {
    /// Every write reaches the peer: the handshake is over and the link is
    /// neither pulled ahead nor behind (a resync or verify may run).
    pub fn replicates_writes(self) -> bool {
        matches!(self, ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget | ConnState::VerifySource)
    }
}

/// Progress of a long operation (resync, verify).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProgressReport {
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
}

/// A replicated resource's state on one node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaState {
    pub resource: String,
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
    pub connection: ConnState,
    pub peer_node: Option<String>,
    pub peer_role: Option<Role>,
    pub peer_disk: Option<DiskState>,
    pub protocol: Protocol,
    /// The primary epoch this node last held or saw.
    pub epoch: u64,
    /// Current, bitmap and two history generation identifiers.
    pub generations: [u64; 4],
    pub out_of_sync_bytes: u64,
    /// I/O held: by fencing, `suspend-io`, or a newer primary.
    pub suspended: bool,
    pub resync: Option<ProgressReport>,
    pub verify: Option<ProgressReport>,
    pub verify_out_of_sync_bytes: u64,
    pub last_error: Option<String>,
    pub writes_in_flight: u64,
    pub resync_sent_bytes: u64,
    pub resync_received_bytes: u64,
    /// The last failed connection attempt or handshake on the replication
    /// link (either direction), if any since `up` started.
    #[serde(default)]
    pub link_failure: Option<String>,
    /// Seconds since that failure.
    #[serde(default)]
    pub link_failure_age_secs: Option<u64>,
    /// `connect --discard-my-data` waits for the next handshake.
    #[serde(default)]
    pub discard_my_data: bool,
}

/// Why a status report cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Not JSON of this shape (a state this reader does not know, a
    /// missing field).
    #[error("malformed status report: {0}")]
    Malformed(String),
    /// Written by a replicator whose report shape this reader does not speak.
    #[error("status report version {found}, this build reads version {API_VERSION}: install matching replicator and clusterd versions")]
    Version { found: u32 },
}

/// The parts of `replicator status RES --json` a cluster manager needs:
/// the version check and the typed state (other fields are ignored).
pub fn parse_report_state(json: &str) -> Result<ReplicaState, ReportError> {
    #[derive(Deserialize)]
    struct Versioned {
        #[serde(default)]
        api_version: u32,
    }
    #[derive(Deserialize)]
    struct Report {
        state: ReplicaState,
    }
    let v: Versioned = serde_json::from_str(json).map_err(|e| ReportError::Malformed(e.to_string()))?;
    if v.api_version != API_VERSION {
        return Err(ReportError::Version { found: v.api_version });
    }
    let r: Report = serde_json::from_str(json).map_err(|e| ReportError::Malformed(e.to_string()))?;
    Ok(r.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(role: Role, disk: DiskState, connection: ConnState, protocol: Protocol) -> ReplicaState {
        ReplicaState {
            resource: "r0".into(),
            node: "a".into(),
            role,
            disk,
            connection,
            peer_node: Some("b".into()),
            peer_role: Some(role),
            peer_disk: Some(disk),
            protocol,
            epoch: 3,
            generations: [1, 2, 3, 4],
            out_of_sync_bytes: 4096,
            suspended: false,
            resync: None,
            verify: None,
            verify_out_of_sync_bytes: 0,
            last_error: None,
            writes_in_flight: 0,
            resync_sent_bytes: 0,
            resync_received_bytes: 0,
            link_failure: None,
            link_failure_age_secs: None,
            discard_my_data: false,
        }
    }

    fn report(s: &ReplicaState, version: u32) -> String {
        format!(r#"{{"api_version":{version},"state":{},"clients":[]}}"#, serde_json::to_string(s).unwrap())
    }

    #[test]
    fn every_state_round_trips_by_its_name() {
        for (i, &connection) in ConnState::ALL.iter().enumerate() {
            let role = Role::ALL[i % Role::ALL.len()];
            let disk = DiskState::ALL[i % DiskState::ALL.len()];
            let protocol = Protocol::ALL[i % Protocol::ALL.len()];
            let s = state(role, disk, connection, protocol);
            let json = report(&s, API_VERSION);
            assert!(json.contains(&format!(r#""connection":"{connection}""#)), "{json}");
            assert!(json.contains(&format!(r#""disk":"{disk}""#)), "{json}");
            assert_eq!(parse_report_state(&json), Ok(s));
        }
        // Every variant of every enum was covered above.
        assert!(ConnState::ALL.len() >= DiskState::ALL.len().max(Role::ALL.len()).max(Protocol::ALL.len()));
    }

    #[test]
    fn the_lists_name_every_variant() {
        // A new variant must be added to ALL: this match stops compiling
        // until the count below is updated with it.
        fn count(c: ConnState) -> usize {
            match c {
                ConnState::StandAlone
                | ConnState::Connecting
                | ConnState::WfReportParams
                | ConnState::WfBitmap
                | ConnState::Connected
                | ConnState::SyncSource
                | ConnState::SyncTarget
                | ConnState::VerifySource
                | ConnState::Ahead
                | ConnState::Behind => 10,
            }
        }
        assert_eq!(ConnState::ALL.len(), count(ConnState::Connected));
        let d = |d: DiskState| match d {
            DiskState::UpToDate | DiskState::Outdated | DiskState::Inconsistent | DiskState::Failed => 4,
        };
        assert_eq!(DiskState::ALL.len(), d(DiskState::UpToDate));
    }

    #[test]
    fn an_unknown_state_is_refused_not_ignored() {
        let json = report(&state(Role::Primary, DiskState::UpToDate, ConnState::Connected, Protocol::C), API_VERSION)
            .replace(r#""disk":"UpToDate""#, r#""disk":"UpToDateish""#);
        assert!(matches!(parse_report_state(&json), Err(ReportError::Malformed(_))), "{json}");
    }

    #[test]
    fn another_version_is_refused_with_the_fix() {
        let s = state(Role::Primary, DiskState::UpToDate, ConnState::Connected, Protocol::C);
        for v in [0, API_VERSION + 1] {
            let json = report(&s, v);
            let err = parse_report_state(&json).unwrap_err();
            assert_eq!(err, ReportError::Version { found: v });
            assert!(err.to_string().contains("install matching"), "{err}");
        }
        // A report without the field is from before versioning.
        let old = report(&s, 1).replace(r#""api_version":1,"#, "");
        assert_eq!(parse_report_state(&old), Err(ReportError::Version { found: 0 }));
    }
}
