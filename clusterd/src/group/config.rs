//! The configuration of one resource group: `GroupSection` (a `[[group]]`
//! table of the cluster file, parsed with unknown keys refused) and
//! `GroupSection::validate`, which checks relations between keys and
//! returns the `GroupSpec` the runner and its shell use. Every error names
//! the key and the fix.
//!
//! ```toml
//! [[group]]
//! name = "mail"
//! preferred = "a"                 # optional: the node the group starts on
//! volume = "mail"                 # replicator resource name or file
//! replicator = "/usr/local/bin/replicator"   # default: `replicator` on PATH
//!
//! [[group.resource]]              # started in order, stopped in reverse
//! name = "disk"
//! kind = "attach"                 # `replicator attach VOLUME` / `detach DEV`
//!
//! [[group.resource]]
//! name = "fs"
//! kind = "filesystem"
//! device = "@attach"              # the device of the attach step above, or a path
//! directory = "/srv/mail"
//! fstype = "ext4"
//! options = "noatime"             # optional
//! fsck = true                     # optional: `fsck -a` before mount
//! force_unmount = true            # optional: a busy umount kills the users (fuser -km), retries
//!
//! [[group.resource]]
//! name = "ip"
//! kind = "ip"
//! address = "10.0.0.100/24"
//! interface = "eth0"
//!
//! [[group.resource]]
//! name = "mta"
//! kind = "ocf"
//! agent = "/usr/lib/ocf/resource.d/heartbeat/IPaddr2"
//! params = { ip = "10.0.0.100", cidr_netmask = "24" }
//!
//! [[group.resource]]
//! name = "svc"
//! kind = "systemd"
//! unit = "mta.service"
//! # Every kind: monitor_interval_ms, start_timeout_ms, stop_timeout_ms,
//! # monitor_timeout_ms, restarts_max.
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Steps per group (bounds the runner's work per wake-up).
pub const STEPS_MAX: usize = 32;
/// OCF parameters per resource.
pub const OCF_PARAMS_MAX: usize = 64;
/// Shortest monitor interval accepted (a busier one starves the host).
pub const MONITOR_INTERVAL_MS_MIN: u64 = 100;
/// Longest operation timeout accepted (one hour).
pub const OP_TIMEOUT_MS_MAX: u64 = 3_600_000;

/// Defaults as Pacemaker's: 20 s per operation.
pub const START_TIMEOUT_MS_DEFAULT: u64 = 20_000;
pub const STOP_TIMEOUT_MS_DEFAULT: u64 = 20_000;
pub const MONITOR_TIMEOUT_MS_DEFAULT: u64 = 20_000;
pub const MONITOR_INTERVAL_MS_DEFAULT: u64 = 2_000;
pub const RESTARTS_MAX_DEFAULT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}; {fix}")]
pub struct GroupConfigError {
    /// Where in the file, e.g. `group[mail].resource[fs].directory`.
    pub key: String,
    pub problem: String,
    pub fix: String,
}

/// One `[[group]]` table as written.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    pub name: String,
    #[serde(default)]
    pub preferred: Option<String>,
    pub volume: String,
    #[serde(default)]
    pub replicator: Option<PathBuf>,
    #[serde(default, rename = "resource")]
    pub resources: Vec<ResourceSection>,
}

/// One `[[group.resource]]` table as written: the keys of every kind, each
/// checked against `kind` by `validate` (so a misplaced key is named).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ResourceSection {
    pub name: String,
    pub kind: String,
    // filesystem
    pub device: Option<String>,
    pub directory: Option<PathBuf>,
    pub fstype: Option<String>,
    pub options: Option<String>,
    pub fsck: Option<bool>,
    pub force_unmount: Option<bool>,
    // ip
    pub address: Option<String>,
    pub interface: Option<String>,
    // ocf
    pub agent: Option<PathBuf>,
    pub params: Option<BTreeMap<String, String>>,
    // systemd
    pub unit: Option<String>,
    // every kind
    pub monitor_interval_ms: Option<u64>,
    pub start_timeout_ms: Option<u64>,
    pub stop_timeout_ms: Option<u64>,
    pub monitor_timeout_ms: Option<u64>,
    pub restarts_max: Option<u32>,
}

/// A validated group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub name: String,
    pub preferred: Option<String>,
    pub volume: String,
    pub replicator: PathBuf,
    pub steps: Vec<StepSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    pub name: String,
    pub kind: StepKind,
    pub timing: StepTiming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepTiming {
    pub monitor_interval_ms: u64,
    pub start_timeout_ms: u64,
    pub stop_timeout_ms: u64,
    pub monitor_timeout_ms: u64,
    pub restarts_max: u32,
}

impl Default for StepTiming {
    fn default() -> Self {
        StepTiming {
            monitor_interval_ms: MONITOR_INTERVAL_MS_DEFAULT,
            start_timeout_ms: START_TIMEOUT_MS_DEFAULT,
            stop_timeout_ms: STOP_TIMEOUT_MS_DEFAULT,
            monitor_timeout_ms: MONITOR_TIMEOUT_MS_DEFAULT,
            restarts_max: RESTARTS_MAX_DEFAULT,
        }
    }
}

/// Where a filesystem step finds its block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSource {
    /// The device that the attach step with this index printed.
    Attach(usize),
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// `replicator attach VOLUME` (prints the device), `replicator detach DEVICE`.
    Attach,
    Filesystem {
        device: DeviceSource,
        directory: PathBuf,
        fstype: String,
        options: Option<String>,
        fsck: bool,
        /// On a busy umount, kill the processes using the file system
        /// (as Pacemaker's Filesystem agent does) rather than fail the stop.
        force_unmount: bool,
    },
    /// `address` keeps its prefix length (`10.0.0.100/24`).
    Ip {
        address: String,
        ip: IpAddr,
        prefix_len: u8,
        interface: String,
    },
    Ocf {
        agent: PathBuf,
        params: BTreeMap<String, String>,
    },
    Systemd {
        unit: String,
    },
}

impl StepKind {
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Attach => "attach",
            StepKind::Filesystem { .. } => "filesystem",
            StepKind::Ip { .. } => "ip",
            StepKind::Ocf { .. } => "ocf",
            StepKind::Systemd { .. } => "systemd",
        }
    }
}

const KINDS: &str = "attach, filesystem, ip, ocf or systemd";

fn is_simple_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl GroupSection {
    /// Checks the group; `check_files` also checks that OCF agents exist
    /// and are executable (off for configs read on another machine).
    pub fn validate(&self, check_files: bool) -> Result<GroupSpec, GroupConfigError> {
        let gkey = format!("group[{}]", self.name);
        let err = |key: String, problem: &str, fix: &str| GroupConfigError {
            key,
            problem: problem.to_owned(),
            fix: fix.to_owned(),
        };
        if !is_simple_name(&self.name) {
            return Err(err(format!("{gkey}.name"), "is not a simple name", "use 1 to 64 letters, digits, '-' or '_'"));
        }
        if self.volume.is_empty() || self.volume.contains(['\n', '\0']) {
            return Err(err(
                format!("{gkey}.volume"),
                "is empty or contains a line break",
                "name the replicator resource (or its file)",
            ));
        }
        if self.resources.len() > STEPS_MAX {
            return Err(err(
                format!("{gkey}.resource"),
                &format!("{} resources, more than {STEPS_MAX}", self.resources.len()),
                "split the group or drop resources",
            ));
        }
        let mut names = BTreeSet::new();
        let mut steps: Vec<StepSpec> = Vec::with_capacity(self.resources.len());
        for r in &self.resources {
            let rkey = format!("{gkey}.resource[{}]", r.name);
            if !is_simple_name(&r.name) {
                return Err(err(
                    format!("{rkey}.name"),
                    "is not a simple name",
                    "use 1 to 64 letters, digits, '-' or '_'",
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(err(
                    format!("{rkey}.name"),
                    "is used twice in this group",
                    "give each resource its own name",
                ));
            }
            let kind = validate_kind(r, &rkey, &steps, check_files)?;
            let timing = validate_timing(r, &rkey, &kind)?;
            steps.push(StepSpec { name: r.name.clone(), kind, timing });
        }
        Ok(GroupSpec {
            name: self.name.clone(),
            preferred: self.preferred.clone(),
            volume: self.volume.clone(),
            replicator: self.replicator.clone().unwrap_or_else(|| PathBuf::from("replicator")),
            steps,
        })
    }
}

/// The keys each kind accepts besides name, kind and the timing keys.
fn allowed_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "filesystem" => &["device", "directory", "fstype", "options", "fsck", "force_unmount"],
        "ip" => &["address", "interface"],
        "ocf" => &["agent", "params"],
        "systemd" => &["unit"],
        _ => &[],
    }
}

fn present_keys(r: &ResourceSection) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut add = |present: bool, key: &'static str| {
        if present {
            keys.push(key);
        }
    };
    add(r.device.is_some(), "device");
    add(r.directory.is_some(), "directory");
    add(r.fstype.is_some(), "fstype");
    add(r.options.is_some(), "options");
    add(r.fsck.is_some(), "fsck");
    add(r.force_unmount.is_some(), "force_unmount");
    add(r.address.is_some(), "address");
    add(r.interface.is_some(), "interface");
    add(r.agent.is_some(), "agent");
    add(r.params.is_some(), "params");
    add(r.unit.is_some(), "unit");
    keys
}

fn validate_kind(
    r: &ResourceSection,
    rkey: &str,
    earlier: &[StepSpec],
    check_files: bool,
) -> Result<StepKind, GroupConfigError> {
    let err = |key: &str, problem: String, fix: String| GroupConfigError { key: format!("{rkey}.{key}"), problem, fix };
    if !["attach", "filesystem", "ip", "ocf", "systemd"].contains(&r.kind.as_str()) {
        return Err(err("kind", format!("unknown kind {:?}", r.kind), format!("use {KINDS}")));
    }
    for key in present_keys(r) {
        if !allowed_keys(&r.kind).contains(&key) {
            return Err(err(key, format!("is not a key of kind {}", r.kind), "remove it (or fix the kind)".into()));
        }
    }
    let required = |value: Option<&str>, key: &str, example: &str| -> Result<String, GroupConfigError> {
        match value {
            Some(v) if !v.is_empty() && !v.contains(['\n', '\0']) => Ok(v.to_owned()),
            Some(_) => {
                Err(err(key, "is empty or contains a line break".into(), format!("write e.g. {key} = {example}")))
            }
            None => {
                Err(err(key, format!("is missing (kind {} needs it)", r.kind), format!("add e.g. {key} = {example}")))
            }
        }
    };
    Ok(match r.kind.as_str() {
        "attach" => {
            if earlier.iter().any(|s| s.kind == StepKind::Attach) {
                return Err(err(
                    "kind",
                    "a group attaches its volume once".into(),
                    "remove the second attach resource".into(),
                ));
            }
            StepKind::Attach
        }
        "filesystem" => {
            let directory = r.directory.clone().ok_or_else(|| {
                err(
                    "directory",
                    "is missing (kind filesystem needs it)".into(),
                    "add e.g. directory = \"/srv/mail\"".into(),
                )
            })?;
            if !directory.is_absolute() || directory == Path::new("/") {
                return Err(err(
                    "directory",
                    format!("{} is not an absolute path other than /", directory.display()),
                    "give the mount point's absolute path".into(),
                ));
            }
            let fstype = required(r.fstype.as_deref(), "fstype", "\"ext4\"")?;
            let device = required(r.device.as_deref(), "device", "\"@attach\"")?;
            let device = if let Some(step) = device.strip_prefix('@') {
                match earlier.iter().position(|s| s.name == step || (step == "attach" && s.kind == StepKind::Attach)) {
                    Some(i) if earlier[i].kind == StepKind::Attach => DeviceSource::Attach(i),
                    _ => {
                        return Err(err(
                            "device",
                            format!("{device:?} names no attach resource before this one"),
                            "put a kind = \"attach\" resource first, or give the device's path".into(),
                        ))
                    }
                }
            } else if device.starts_with('/') {
                DeviceSource::Path(PathBuf::from(device))
            } else {
                return Err(err(
                    "device",
                    format!("{device:?} is neither a path nor @attach"),
                    "write device = \"@attach\" or an absolute path".into(),
                ));
            };
            if let Some(o) = &r.options {
                if o.is_empty() || o.contains(char::is_whitespace) {
                    return Err(err(
                        "options",
                        "is empty or contains spaces".into(),
                        "write mount options separated by commas, e.g. \"noatime,nodev\"".into(),
                    ));
                }
            }
            StepKind::Filesystem {
                device,
                directory,
                fstype,
                options: r.options.clone(),
                fsck: r.fsck.unwrap_or(true),
                force_unmount: r.force_unmount.unwrap_or(true),
            }
        }
        "ip" => {
            let address = required(r.address.as_deref(), "address", "\"10.0.0.100/24\"")?;
            let interface = required(r.interface.as_deref(), "interface", "\"eth0\"")?;
            let Some((ip, prefix)) = address.split_once('/') else {
                return Err(err(
                    "address",
                    format!("{address:?} has no prefix length"),
                    format!("write it with one, e.g. \"{address}/24\""),
                ));
            };
            let ip: IpAddr = ip.parse().map_err(|_| {
                err("address", format!("{ip:?} is not an IP address"), "write e.g. \"10.0.0.100/24\"".into())
            })?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix_len = prefix.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                err(
                    "address",
                    format!("prefix length {prefix:?} is not 0 to {max}"),
                    "write e.g. \"10.0.0.100/24\"".into(),
                )
            })?;
            if interface.len() > 15 || interface.contains(['/', ' ', ':']) {
                return Err(err(
                    "interface",
                    format!("{interface:?} is not an interface name"),
                    "give the name `ip link` shows, e.g. \"eth0\"".into(),
                ));
            }
            StepKind::Ip { address: format!("{ip}/{prefix_len}"), ip, prefix_len, interface }
        }
        "ocf" => {
            let agent = r.agent.clone().ok_or_else(|| {
                err(
                    "agent",
                    "is missing (kind ocf needs it)".into(),
                    "add e.g. agent = \"/usr/lib/ocf/resource.d/heartbeat/IPaddr2\"".into(),
                )
            })?;
            if !agent.is_absolute() {
                return Err(err(
                    "agent",
                    format!("{} is not an absolute path", agent.display()),
                    "give the agent's full path".into(),
                ));
            }
            if check_files {
                let executable = std::fs::metadata(&agent).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
                match executable {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(err(
                            "agent",
                            format!("{} is not an executable file", agent.display()),
                            format!("chmod +x {} (or fix the path)", agent.display()),
                        ))
                    }
                    Err(e) => {
                        return Err(err(
                            "agent",
                            format!("{}: {e}", agent.display()),
                            "install the agent (e.g. apt-get install resource-agents) or fix the path".into(),
                        ))
                    }
                }
            }
            let params = r.params.clone().unwrap_or_default();
            if params.len() > OCF_PARAMS_MAX {
                return Err(err(
                    "params",
                    format!("{} parameters", params.len()),
                    format!("keep at most {OCF_PARAMS_MAX}"),
                ));
            }
            for (k, v) in &params {
                if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(err(
                        "params",
                        format!("parameter name {k:?} cannot be an environment variable"),
                        "use letters, digits and '_' only".into(),
                    ));
                }
                if v.contains('\0') {
                    return Err(err("params", format!("the value of {k} contains NUL"), "remove it".into()));
                }
            }
            StepKind::Ocf { agent, params }
        }
        "systemd" => {
            let unit = required(r.unit.as_deref(), "unit", "\"mta.service\"")?;
            if unit.starts_with('-') || unit.contains(['/', ' ']) {
                return Err(err("unit", format!("{unit:?} is not a unit name"), "write e.g. \"mta.service\"".into()));
            }
            StepKind::Systemd { unit }
        }
        _ => unreachable!("kind checked above"),
    })
}

fn validate_timing(r: &ResourceSection, rkey: &str, kind: &StepKind) -> Result<StepTiming, GroupConfigError> {
    let d = StepTiming::default();
    let t = StepTiming {
        // The attach and ip checks are cheap: look more often.
        monitor_interval_ms: r.monitor_interval_ms.unwrap_or(match kind {
            StepKind::Ip { .. } | StepKind::Attach => 1_000,
            _ => d.monitor_interval_ms,
        }),
        start_timeout_ms: r.start_timeout_ms.unwrap_or(d.start_timeout_ms),
        stop_timeout_ms: r.stop_timeout_ms.unwrap_or(d.stop_timeout_ms),
        monitor_timeout_ms: r.monitor_timeout_ms.unwrap_or(d.monitor_timeout_ms),
        restarts_max: r.restarts_max.unwrap_or(d.restarts_max),
    };
    let err = |key: &str, problem: String, fix: String| GroupConfigError { key: format!("{rkey}.{key}"), problem, fix };
    if t.monitor_interval_ms < MONITOR_INTERVAL_MS_MIN {
        return Err(err(
            "monitor_interval_ms",
            format!("{} ms is too short", t.monitor_interval_ms),
            format!("use at least {MONITOR_INTERVAL_MS_MIN}"),
        ));
    }
    for (key, v) in [
        ("start_timeout_ms", t.start_timeout_ms),
        ("stop_timeout_ms", t.stop_timeout_ms),
        ("monitor_timeout_ms", t.monitor_timeout_ms),
    ] {
        if v == 0 || v > OP_TIMEOUT_MS_MAX {
            return Err(err(key, format!("{v} ms is out of range"), format!("use 1 to {OP_TIMEOUT_MS_MAX}")));
        }
    }
    if t.restarts_max > 100 {
        return Err(err("restarts_max", format!("{} restarts", t.restarts_max), "use at most 100".into()));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        group: Vec<GroupSection>,
    }

    const FULL: &str = r#"
[[group]]
name = "mail"
preferred = "a"
volume = "mail"
[[group.resource]]
name = "disk"
kind = "attach"
[[group.resource]]
name = "fs"
kind = "filesystem"
device = "@attach"
directory = "/srv/mail"
fstype = "ext4"
options = "noatime"
[[group.resource]]
name = "ip"
kind = "ip"
address = "10.0.0.100/24"
interface = "eth0"
monitor_interval_ms = 500
[[group.resource]]
name = "mta"
kind = "ocf"
agent = "/bin/true"
params = { ip = "10.0.0.100", passwd = "x" }
restarts_max = 3
[[group.resource]]
name = "svc"
kind = "systemd"
unit = "mta.service"
stop_timeout_ms = 60000
"#;

    fn parse(text: &str) -> GroupSection {
        toml::from_str::<File>(text).unwrap().group.remove(0)
    }

    fn error(text: &str) -> GroupConfigError {
        parse(text).validate(true).unwrap_err()
    }

    #[test]
    fn full_example_validates() {
        let g = parse(FULL).validate(true).unwrap();
        assert_eq!(g.name, "mail");
        assert_eq!(g.preferred.as_deref(), Some("a"));
        assert_eq!(g.replicator, PathBuf::from("replicator"));
        let names: Vec<&str> = g.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["disk", "fs", "ip", "mta", "svc"]);
        assert_eq!(
            g.steps[1].kind,
            StepKind::Filesystem {
                device: DeviceSource::Attach(0),
                directory: "/srv/mail".into(),
                fstype: "ext4".into(),
                options: Some("noatime".into()),
                fsck: true,
                force_unmount: true
            }
        );
        assert!(matches!(&g.steps[2].kind, StepKind::Ip { prefix_len: 24, interface, .. } if interface == "eth0"));
        assert_eq!(g.steps[2].timing.monitor_interval_ms, 500);
        assert_eq!(g.steps[3].timing.restarts_max, 3);
        assert_eq!(g.steps[3].timing.start_timeout_ms, 20_000);
        assert_eq!(g.steps[4].timing.stop_timeout_ms, 60_000);
        assert_eq!(g.steps[4].timing.monitor_interval_ms, MONITOR_INTERVAL_MS_DEFAULT);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<File>(&FULL.replace("preferred", "prefered")).is_err());
        assert!(toml::from_str::<File>(&FULL.replace("fstype", "fs_type")).is_err());
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let e = error(&FULL.replace("directory = \"/srv/mail\"\n", ""));
        assert_eq!(e.key, "group[mail].resource[fs].directory");
        assert!(e.fix.contains("directory ="), "{e}");

        let e = error(&FULL.replace("10.0.0.100/24", "10.0.0.100"));
        assert_eq!(e.key, "group[mail].resource[ip].address");
        assert!(e.problem.contains("prefix length") && e.fix.contains("10.0.0.100/24"), "{e}");
        let e = error(&FULL.replace("10.0.0.100/24", "10.0.0.100/33"));
        assert_eq!(e.key, "group[mail].resource[ip].address");

        let e = error(&FULL.replace("name = \"svc\"", "name = \"ip\""));
        assert_eq!(e.key, "group[mail].resource[ip].name");
        assert!(e.problem.contains("twice"), "{e}");

        let plain = std::env::temp_dir().join(format!("clusterd-not-executable-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = error(&FULL.replace("/bin/true", plain.to_str().unwrap()));
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(e.key, "group[mail].resource[mta].agent");
        assert!(e.fix.contains("chmod +x"), "{e}");
        let e = error(&FULL.replace("/bin/true", "/nonexistent/agent"));
        assert!(e.fix.contains("install"), "{e}");
        // Without file checks the same config passes (validated elsewhere).
        assert!(parse(&FULL.replace("/bin/true", "/nonexistent/agent")).validate(false).is_ok());

        let e = error(&FULL.replace("kind = \"systemd\"", "kind = \"upstart\""));
        assert_eq!(e.key, "group[mail].resource[svc].kind");
        assert!(e.fix.contains("systemd"), "{e}");

        let e = error(&FULL.replace("unit = \"mta.service\"", "unit = \"mta.service\"\ninterface = \"eth0\""));
        assert_eq!(e.key, "group[mail].resource[svc].interface");

        let e = error(
            &FULL.replace("name = \"disk\"\nkind = \"attach\"", "name = \"disk\"\nkind = \"systemd\"\nunit = \"x\""),
        );
        assert_eq!(e.key, "group[mail].resource[fs].device");

        let e = error(&FULL.replace("monitor_interval_ms = 500", "monitor_interval_ms = 5"));
        assert_eq!(e.key, "group[mail].resource[ip].monitor_interval_ms");
        let e = error(&FULL.replace("stop_timeout_ms = 60000", "stop_timeout_ms = 0"));
        assert_eq!(e.key, "group[mail].resource[svc].stop_timeout_ms");

        let e = error(&FULL.replace("params = { ip", "params = { \"bad-key\" = \"1\", ip"));
        assert_eq!(e.key, "group[mail].resource[mta].params");
        let e = error(&FULL.replace("name = \"mail\"", "name = \"mail box\""));
        assert_eq!(e.key, "group[mail box].name");
    }
}
