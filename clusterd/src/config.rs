//! The cluster configuration file (TOML), in Heartbeat's spirit:
//! `ClusterConfig` (parsed, unknown keys refused) and `ClusterConfig::validate`
//! (relations between keys), whose errors name the file, the key and the fix.
//!
//! ```toml
//! [cluster]
//! name = "mail"
//! key_file = "/etc/clusterd/authkey"   # heartbeat HMAC key
//! ca = "/etc/clusterd/ca.crt"           # signs every node's certificate
//!
//! [heartbeat]          # all optional; defaults shown
//! interval_ms = 200
//! deadtime_ms = 1500   # must exceed 2 × interval_ms
//! warntime_ms = 1000   # interval_ms ≤ warntime_ms < deadtime_ms
//! initdead_ms = 3000   # ≥ deadtime_ms: boot-time slack before the first heartbeat
//!
//! [[node]]
//! name = "a"
//! role = "storage"     # "storage" (two of them) or "witness" (at most one)
//! heartbeat = ["10.0.0.1:694", "10.1.0.1:694"]   # one address per path
//! raft = "10.0.0.1:7790"                           # cluster log, mutual TLS
//! # cert = "/etc/clusterd/a.crt"  key = "/etc/clusterd/a.key"   (defaults)
//! # state_dir = "/var/lib/clusterd"  control = "/run/clusterd/control.sock"
//!
//! [[fence]]            # fence devices per target node; level 1 is tried first
//! node = "a"
//! level = 1
//! agent = "/usr/sbin/fence_ipmilan"
//! timeout_ms = 20000
//! args = { ipaddr = "10.9.0.1", login = "admin", passwd_script = "/etc/clusterd/pw" }
//! ```
//!
//! ```toml
//! [watchdog]           # sbd-like self-fencing; defaults shown
//! mode = "auto"        # auto | required | off
//! device = "/dev/watchdog"
//! timeout_ms = 10000   # whole seconds, at least 2000
//! ```
//!
//! A storage node that holds a group pets its watchdog only while its lease
//! is valid and its stop path is not stuck, so a node that cannot stop is
//! reset by the hardware. `auto` uses the device where it exists (one log
//! line where it does not); `required` makes every storage node refuse to
//! run without it, and only then do the peers rely on it: a new owner waits
//! for the previous owner's lease plus `timeout_ms` (the old owner stopped
//! or was reset by then, whatever hung), without a fence agent.
//!
//! Without a witness the cluster runs in two-node mode, which fails over
//! automatically only with fence devices for both storage nodes; without
//! them `failover.automatic = false` must be written down.
//!
//! ```toml
//! [failover]           # two-node mode only; defaults shown
//! fence_delay_ms = 5000      # how long fence_delay_node waits before fencing its peer
//! # fence_delay_node = "a"   # default: the first storage node listed
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::failover::drift_margin_ms;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {file}: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: {source}")]
    Parse { file: PathBuf, source: Box<toml::de::Error> },
    #[error("{file}: {key}: {problem}; {fix}")]
    Invalid { file: PathBuf, key: String, problem: String, fix: String },
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    #[serde(default)]
    pub heartbeat: HeartbeatSection,
    #[serde(default)]
    pub failover: FailoverSection,
    #[serde(default)]
    pub watchdog: WatchdogSection,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeSection>,
    #[serde(default, rename = "fence")]
    pub fences: Vec<FenceSection>,
    /// Resource groups (see `crate::group::config`).
    #[serde(default, rename = "group")]
    pub groups: Vec<crate::group::GroupSection>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    pub key_file: PathBuf,
    /// The cluster CA: every node's certificate (log traffic, mutual TLS)
    /// is signed by it and names the node.
    #[serde(default = "default_ca")]
    pub ca: PathBuf,
}

fn default_ca() -> PathBuf {
    PathBuf::from("/etc/clusterd/ca.crt")
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatSection {
    pub interval_ms: u64,
    pub deadtime_ms: u64,
    pub warntime_ms: u64,
    pub initdead_ms: u64,
}

impl Default for HeartbeatSection {
    fn default() -> Self {
        HeartbeatSection { interval_ms: 200, deadtime_ms: 1500, warntime_ms: 1000, initdead_ms: 3000 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverSection {
    pub automatic: bool,
    pub lease_ms: u64,
    pub renew_interval_ms: u64,
    pub clock_drift_ppm_max: u64,
    pub failures_max: u32,
    pub failure_window_ms: u64,
    /// Move the group back to its preferred node when it returns (off: sticky).
    pub failback: bool,
    /// How long a node runs a group before failback gives it back.
    pub failback_after_ms: u64,
    /// Two-node mode: how long `fence_delay_node` waits before fencing its
    /// peer, so that in a split the two nodes do not fence each other at
    /// once (the other node fences without delay and wins the race).
    pub fence_delay_ms: u64,
    /// The node that waits [default: the first storage node listed].
    pub fence_delay_node: Option<String>,
}

impl Default for FailoverSection {
    fn default() -> Self {
        FailoverSection {
            automatic: true,
            lease_ms: 1000,
            renew_interval_ms: 250,
            clock_drift_ppm_max: 1000,
            failures_max: 3,
            failure_window_ms: 600_000,
            failback: false,
            failback_after_ms: 5000,
            fence_delay_ms: 5000,
            fence_delay_node: None,
        }
    }
}

/// `[watchdog]`: hardware watchdog self-fencing, like sbd.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogSection {
    pub mode: WatchdogMode,
    pub device: PathBuf,
    /// Whole seconds (the driver's unit), at least `WATCHDOG_TIMEOUT_MS_MIN`.
    pub timeout_ms: u64,
}

impl Default for WatchdogSection {
    fn default() -> Self {
        WatchdogSection { mode: WatchdogMode::Auto, device: PathBuf::from("/dev/watchdog"), timeout_ms: 10_000 }
    }
}

impl WatchdogSection {
    /// What the failover cores may assume of every peer: its watchdog's
    /// timeout when every storage node must run one, else 0.
    pub fn peer_watchdog_ms(&self) -> u64 {
        if self.mode == WatchdogMode::Required {
            self.timeout_ms
        } else {
            0
        }
    }
}

/// A stop that hangs beyond its lease gets at least this long before the
/// reset (the demotion after a lease's end and the role's poll run in it).
pub const WATCHDOG_TIMEOUT_MS_MIN: u64 = 2_000;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WatchdogMode {
    /// Used where the device exists; the peers do not rely on it.
    Auto,
    /// Every storage node runs it (refuses to start without it); the peers
    /// take over after lease + timeout without a fence agent.
    Required,
    Off,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Storage,
    Witness,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub name: String,
    pub role: NodeRole,
    pub heartbeat: Vec<SocketAddr>,
    /// Where this node's cluster log (Raft, mutual TLS) listens.
    pub raft: SocketAddr,
    /// This node's certificate and key [default: /etc/clusterd/NAME.crt, .key].
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The cluster log on local disk (never the replicated volume).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The admin socket `clusterd status` and friends talk to.
    #[serde(default = "default_control")]
    pub control: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/clusterd")
}

fn default_control() -> PathBuf {
    PathBuf::from("/run/clusterd/control.sock")
}

impl NodeSection {
    pub fn cert(&self) -> PathBuf {
        self.cert.clone().unwrap_or_else(|| PathBuf::from(format!("/etc/clusterd/{}.crt", self.name)))
    }

    pub fn key(&self) -> PathBuf {
        self.key.clone().unwrap_or_else(|| PathBuf::from(format!("/etc/clusterd/{}.key", self.name)))
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FenceSection {
    pub node: String,
    #[serde(default = "default_level")]
    pub level: u32,
    pub agent: PathBuf,
    #[serde(default = "default_fence_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
}

fn default_level() -> u32 {
    1
}

fn default_fence_timeout_ms() -> u64 {
    20_000
}

/// How the cluster decides who may promote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Two storage nodes and a witness: quorum is a majority of three.
    Witness,
    /// No witness; every failover fences the peer first.
    TwoNodeFenced,
    /// No witness and no fencing: the admin promotes by hand.
    TwoNodeManual,
}

impl ClusterConfig {
    pub fn load(file: &Path) -> Result<ClusterConfig, ConfigError> {
        let text =
            std::fs::read_to_string(file).map_err(|source| ConfigError::Read { file: file.to_owned(), source })?;
        let cfg = ClusterConfig::parse(file, &text)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Parses without validating (`file` only names the source in errors).
    pub fn parse(file: &Path, text: &str) -> Result<ClusterConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { file: file.to_owned(), source: Box::new(e) })
    }

    pub fn mode(&self) -> Mode {
        let witness = self.nodes.iter().any(|n| n.role == NodeRole::Witness);
        let fenced = self.storage_nodes().all(|n| self.fences.iter().any(|f| f.node == n.name));
        match (witness, fenced) {
            (true, _) => Mode::Witness,
            (false, true) => Mode::TwoNodeFenced,
            (false, false) => Mode::TwoNodeManual,
        }
    }

    /// The node called `name`, with its index (its `NodeId`).
    pub fn node(&self, name: &str) -> Option<(crate::NodeId, &NodeSection)> {
        self.nodes.iter().enumerate().find(|(_, n)| n.name == name).map(|(i, n)| (crate::NodeId(i as u8), n))
    }

    pub fn storage_nodes(&self) -> impl Iterator<Item = &NodeSection> {
        self.nodes.iter().filter(|n| n.role == NodeRole::Storage)
    }

    /// Two-node mode: how long node `name` waits before fencing its peer
    /// (`failover.fence_delay_ms` on the delayed node, 0 on the other).
    pub fn fence_delay_ms_for(&self, name: &str) -> u64 {
        let delayed = match &self.failover.fence_delay_node {
            Some(n) => Some(n.as_str()),
            None => self.storage_nodes().next().map(|n| n.name.as_str()),
        };
        if delayed == Some(name) {
            self.failover.fence_delay_ms
        } else {
            0
        }
    }

    /// The clock-drift margin a new owner adds to the previous owner's lease.
    /// The margin over the longest wait measured on another node's clock:
    /// the lease, plus the peer's watchdog timeout when the peers rely on it.
    pub fn drift_margin_ms(&self) -> u64 {
        drift_margin_ms(self.failover.lease_ms + self.watchdog.peer_watchdog_ms(), self.failover.clock_drift_ppm_max)
    }

    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let err = |key: &str, problem: String, fix: &str| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            problem,
            fix: fix.to_owned(),
        };
        let hb = &self.heartbeat;
        if hb.interval_ms == 0 {
            return Err(err("heartbeat.interval_ms", "is 0".into(), "set it to 200 (the default) or more"));
        }
        if hb.deadtime_ms <= 2 * hb.interval_ms {
            return Err(err(
                "heartbeat.deadtime_ms",
                format!("{} ms does not exceed 2 × heartbeat.interval_ms ({} ms)", hb.deadtime_ms, hb.interval_ms),
                "raise deadtime_ms (default 1500) or lower interval_ms, so that two lost heartbeats never declare a node dead",
            ));
        }
        if hb.warntime_ms < hb.interval_ms || hb.warntime_ms >= hb.deadtime_ms {
            return Err(err(
                "heartbeat.warntime_ms",
                format!(
                    "{} ms is not between interval_ms ({}) and deadtime_ms ({})",
                    hb.warntime_ms, hb.interval_ms, hb.deadtime_ms
                ),
                "set it between the two (e.g. two thirds of deadtime_ms)",
            ));
        }
        if hb.initdead_ms < hb.deadtime_ms {
            return Err(err(
                "heartbeat.initdead_ms",
                format!("{} ms is shorter than deadtime_ms ({} ms)", hb.initdead_ms, hb.deadtime_ms),
                "set it to at least deadtime_ms (2 × deadtime_ms is usual)",
            ));
        }
        let fo = &self.failover;
        if fo.renew_interval_ms == 0 || fo.lease_ms <= 2 * fo.renew_interval_ms {
            return Err(err(
                "failover.lease_ms",
                format!(
                    "{} ms does not exceed 2 × failover.renew_interval_ms ({} ms)",
                    fo.lease_ms, fo.renew_interval_ms
                ),
                "raise lease_ms or lower renew_interval_ms (a lost renewal must not freeze the primary)",
            ));
        }
        if fo.clock_drift_ppm_max >= 100_000 {
            return Err(err(
                "failover.clock_drift_ppm_max",
                format!("{} ppm is not a working clock", fo.clock_drift_ppm_max),
                "use a value below 100000 (1000 covers ordinary hardware)",
            ));
        }
        if fo.failures_max == 0 {
            return Err(err("failover.failures_max", "is 0".into(), "set it to 1 or more (default 3)"));
        }
        if fo.failback && !self.groups.iter().any(|g| g.preferred.is_some()) {
            return Err(err(
                "failover.failback",
                "is on but no group names a preferred node".into(),
                "set `preferred = \"NODE\"` in the groups that should move back, or remove failback",
            ));
        }
        if let Some(n) = &fo.fence_delay_node {
            if !self.storage_nodes().any(|s| &s.name == n) {
                return Err(err(
                    "failover.fence_delay_node",
                    format!("{n:?} is not a storage node"),
                    "name one of the two storage nodes (the one that should lose a fence race)",
                ));
            }
        }
        let wd = &self.watchdog;
        if wd.mode != WatchdogMode::Off
            && (wd.timeout_ms < WATCHDOG_TIMEOUT_MS_MIN || wd.timeout_ms % 1000 != 0 || wd.timeout_ms > 3_600_000)
        {
            return Err(err(
                "watchdog.timeout_ms",
                format!("{} ms is not a whole number of seconds from 2 s to 1 h", wd.timeout_ms),
                "use whole seconds (the driver's unit), e.g. 10000 (the default)",
            ));
        }
        let storage = self.storage_nodes().count();
        if storage != 2 {
            return Err(err(
                "node",
                format!("{storage} nodes have role = \"storage\""),
                "list exactly two storage nodes (the replication pair)",
            ));
        }
        if self.nodes.iter().filter(|n| n.role == NodeRole::Witness).count() > 1 {
            return Err(err("node", "more than one witness".into(), "keep one node with role = \"witness\""));
        }
        let mut names = std::collections::BTreeSet::new();
        for n in &self.nodes {
            if n.name.is_empty() || !names.insert(n.name.as_str()) {
                return Err(err(
                    "node.name",
                    format!("{:?} is empty or repeated", n.name),
                    "give every node a unique name",
                ));
            }
        }
        let paths = self.nodes[0].heartbeat.len();
        if paths == 0 || self.nodes.iter().any(|n| n.heartbeat.len() != paths) {
            return Err(err(
                "node.heartbeat",
                "nodes list different numbers of heartbeat addresses (or none)".into(),
                "give every node one address per heartbeat path, in the same order (two paths recommended)",
            ));
        }
        if paths > crate::heartbeat::PATHS_MAX {
            return Err(err("node.heartbeat", format!("{paths} paths"), "use at most 8 heartbeat paths"));
        }
        for f in &self.fences {
            if !self.storage_nodes().any(|n| n.name == f.node) {
                return Err(err(
                    "fence.node",
                    format!("{:?} is not a storage node", f.node),
                    "fence devices target the storage nodes by name",
                ));
            }
            if f.level == 0 || f.timeout_ms == 0 {
                return Err(err(
                    "fence.level",
                    "level or timeout_ms is 0".into(),
                    "levels start at 1; timeouts are positive",
                ));
            }
        }
        let mut group_names = std::collections::BTreeSet::new();
        for g in &self.groups {
            if !group_names.insert(g.name.as_str()) {
                return Err(err("group.name", format!("{:?} is repeated", g.name), "give every group a unique name"));
            }
            g.validate(false).map_err(|e| ConfigError::Invalid {
                file: file.to_owned(),
                key: e.key.clone(),
                problem: e.problem.clone(),
                fix: e.fix.clone(),
            })?;
            if let Some(p) = &g.preferred {
                if !self.storage_nodes().any(|n| &n.name == p) {
                    return Err(err(
                        "group.preferred",
                        format!("{p:?} is not a storage node"),
                        "name one of the two storage nodes, or remove the key",
                    ));
                }
            }
        }
        if self.mode() == Mode::TwoNodeManual && fo.automatic {
            return Err(err(
                "failover.automatic",
                "two-node mode (no witness) without fence devices for both storage nodes cannot fail over safely"
                    .into(),
                "add a witness node, or [[fence]] devices for both storage nodes, or set failover.automatic = false",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "mail"
key_file = "/etc/clusterd/authkey"

[[node]]
name = "a"
role = "storage"
heartbeat = ["10.0.0.1:694", "10.1.0.1:694"]
raft = "10.0.0.1:7790"

[[node]]
name = "b"
role = "storage"
heartbeat = ["10.0.0.2:694", "10.1.0.2:694"]
raft = "10.0.0.2:7790"

[[node]]
name = "w"
role = "witness"
heartbeat = ["10.0.0.3:694", "10.1.0.3:694"]
raft = "10.0.0.3:7790"
"#;

    fn check(text: &str) -> Result<ClusterConfig, ConfigError> {
        let file = Path::new("/etc/clusterd/cluster.toml");
        let cfg = ClusterConfig::parse(file, text)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn invalid_key(text: &str) -> String {
        match check(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn watchdog_defaults_modes_and_timeouts() {
        let cfg = check(GOOD).unwrap();
        assert_eq!(cfg.watchdog, WatchdogSection::default());
        assert_eq!(cfg.watchdog.mode, WatchdogMode::Auto);
        assert_eq!(cfg.watchdog.peer_watchdog_ms(), 0, "auto: the peers do not rely on it");
        let auto_margin = cfg.drift_margin_ms();
        let required = format!("{GOOD}\n[watchdog]\nmode = \"required\"\ntimeout_ms = 5000\n");
        let cfg = check(&required).unwrap();
        assert_eq!(cfg.watchdog.peer_watchdog_ms(), 5000);
        assert!(cfg.drift_margin_ms() > auto_margin, "the margin covers the watchdog's drift too");
        for bad in ["1000", "2500", "0"] {
            let text = format!("{GOOD}\n[watchdog]\ntimeout_ms = {bad}\n");
            assert_eq!(invalid_key(&text), "watchdog.timeout_ms", "{bad}");
        }
        let off = format!("{GOOD}\n[watchdog]\nmode = \"off\"\ntimeout_ms = 0\n");
        assert_eq!(check(&off).unwrap().watchdog.peer_watchdog_ms(), 0);
        assert!(ClusterConfig::parse(Path::new("c"), &format!("{GOOD}\n[watchdog]\nmode = \"sometimes\"\n")).is_err());
    }

    #[test]
    fn defaults_follow_heartbeat() {
        let cfg = check(GOOD).unwrap();
        assert_eq!(
            cfg.heartbeat,
            HeartbeatSection { interval_ms: 200, deadtime_ms: 1500, warntime_ms: 1000, initdead_ms: 3000 }
        );
        assert_eq!(cfg.mode(), Mode::Witness);
        assert!(cfg.drift_margin_ms() >= 2);
    }

    #[test]
    fn deadtime_must_exceed_twice_the_interval() {
        let text = format!("{GOOD}\n[heartbeat]\ninterval_ms = 500\ndeadtime_ms = 1000\nwarntime_ms = 600\n");
        let e = check(&text).unwrap_err().to_string();
        assert!(e.starts_with("/etc/clusterd/cluster.toml: heartbeat.deadtime_ms: 1000 ms does not exceed"), "{e}");
        assert!(e.contains("raise deadtime_ms"), "{e}");
        let text = format!(
            "{GOOD}\n[heartbeat]\ninterval_ms = 500\ndeadtime_ms = 1001\nwarntime_ms = 600\ninitdead_ms = 2000\n"
        );
        check(&text).unwrap();
    }

    #[test]
    fn other_relations_are_checked() {
        assert_eq!(invalid_key(&format!("{GOOD}\n[heartbeat]\nwarntime_ms = 1500\n")), "heartbeat.warntime_ms");
        assert_eq!(invalid_key(&format!("{GOOD}\n[heartbeat]\ninitdead_ms = 1000\n")), "heartbeat.initdead_ms");
        assert_eq!(invalid_key(&format!("{GOOD}\n[failover]\nlease_ms = 500\n")), "failover.lease_ms");
        let one_path = GOOD.replacen(", \"10.1.0.1:694\"", "", 1);
        assert_eq!(invalid_key(&one_path), "node.heartbeat");
        let dup = GOOD.replace("name = \"w\"", "name = \"a\"");
        assert_eq!(invalid_key(&dup), "node.name");
    }

    #[test]
    fn groups_are_validated_with_the_cluster() {
        let group = "\n[[group]]\nname = \"mail\"\nvolume = \"r0\"\npreferred = \"a\"\n\
                     [[group.resource]]\nname = \"ip\"\nkind = \"ip\"\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n";
        let cfg = check(&format!("{GOOD}{group}")).unwrap();
        assert_eq!(cfg.groups.len(), 1);
        let no_prefix = group.replace("10.0.0.100/24", "10.0.0.100");
        assert!(invalid_key(&format!("{GOOD}{no_prefix}")).contains("address"), "{no_prefix}");
        let witness_preferred = group.replace("preferred = \"a\"", "preferred = \"w\"");
        assert_eq!(invalid_key(&format!("{GOOD}{witness_preferred}")), "group.preferred");
        assert_eq!(invalid_key(&format!("{GOOD}{group}{group}")), "group.name");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = check(&format!("{GOOD}\n[heartbeat]\ndeadtime = 1500\n")).unwrap_err().to_string();
        assert!(e.starts_with("/etc/clusterd/cluster.toml:") && e.contains("deadtime"), "{e}");
    }

    #[test]
    fn two_node_mode_needs_fencing_for_automatic_failover() {
        let two = GOOD.split("[[node]]\nname = \"w\"").next().unwrap().to_owned();
        assert_eq!(invalid_key(&two), "failover.automatic");
        let manual = check(&format!("{two}\n[failover]\nautomatic = false\n")).unwrap();
        assert_eq!(manual.mode(), Mode::TwoNodeManual);
        let fenced = format!(
            "{two}\n[[fence]]\nnode = \"a\"\nagent = \"/usr/sbin/fence_ipmilan\"\nargs = {{ ipaddr = \"10.9.0.1\" }}\n\
             [[fence]]\nnode = \"b\"\nagent = \"/usr/sbin/fence_ipmilan\"\n"
        );
        assert_eq!(check(&fenced).unwrap().mode(), Mode::TwoNodeFenced);
        let fenced = check(&fenced).unwrap();
        assert_eq!((fenced.fence_delay_ms_for("a"), fenced.fence_delay_ms_for("b")), (5000, 0), "first node waits");
        let chosen =
            check(&format!("{two}\n[failover]\nautomatic = false\nfence_delay_node = \"b\"\nfence_delay_ms = 3000\n"))
                .unwrap();
        assert_eq!((chosen.fence_delay_ms_for("a"), chosen.fence_delay_ms_for("b")), (0, 3000));
        let bad = format!("{two}\n[failover]\nautomatic = false\nfence_delay_node = \"w\"\n");
        assert_eq!(invalid_key(&bad), "failover.fence_delay_node");
        let wrong_target = format!("{GOOD}\n[[fence]]\nnode = \"w\"\nagent = \"/bin/true\"\n");
        assert_eq!(invalid_key(&wrong_target), "fence.node");
    }
}
