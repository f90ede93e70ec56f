//! `clusterd check-config`'s checks of what the configuration names on this
//! host (issue 23, point 9): the HMAC key file, the CA, this node's
//! certificate and key, the replicator program, the OCF and fence agents,
//! and each group's replicator resource file, read for the settings that
//! must agree with clusterd's.
//!
//! `config::ClusterConfig::validate` checks the file itself (pure); this
//! module reads the disk. Every problem is a `Finding`, printed as
//! `<file>: <key>: <problem>; <fix>`.
//!
//! The relation checked in the resource file: under clusterd the replicator
//! must run with `fencing = "resource-and-stonith"`. With `dont-care` or
//! `resource-only` a primary that loses its peer acknowledges writes alone
//! before clusterd has frozen it and recorded the peer Outdated in the log;
//! if that primary is then cut off, the peer takes over without those
//! writes. With `resource-and-stonith` the replicator holds I/O at once, and
//! clusterd's `resume-io` lifts the hold once the log records the peer
//! Outdated (clusterd is the fence handler). The replicator's ping timeout
//! needs no relation to the heartbeat's deadtime: a promotion with a newer
//! epoch drops the link to a stale primary, and a refused promotion is
//! retried while the grant holds; it is reported for information only.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{ClusterConfig, NodeRole};
use crate::group::StepKind;

/// Where the replicator looks for `RES.toml` (its `RESOURCE_DIR_DEFAULT`).
pub const REPLICATOR_RESOURCE_DIR_DEFAULT: &str = "/etc/replicator";
/// The replicator's default `net.ping-timeout-ms`.
pub const REPLICATOR_PING_TIMEOUT_MS_DEFAULT: u64 = 2000;
/// A key file shorter than this is refused by `clusterd run` too.
pub const KEY_BYTES_MIN: u64 = 16;

/// One problem: `<file>: <key>: <problem>; <fix>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub file: PathBuf,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}; {}", self.file.display(), self.key, self.problem, self.fix)
    }
}

/// What the checks found: problems, and lines worth showing.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<Finding>,
    pub notes: Vec<String>,
}

impl Report {
    fn problem(&mut self, file: &Path, key: &str, problem: String, fix: impl Into<String>) {
        self.problems.push(Finding { file: file.to_owned(), key: key.to_owned(), problem, fix: fix.into() });
    }
}

/// The resource file a replicator resource name (or path) means, as the
/// replicator resolves it.
pub fn resource_path(volume: &str) -> PathBuf {
    if volume.contains('/') || volume.ends_with(".toml") {
        return PathBuf::from(volume);
    }
    let dir = std::env::var_os("REPLICATOR_RESOURCE_DIR")
        .map_or_else(|| PathBuf::from(REPLICATOR_RESOURCE_DIR_DEFAULT), PathBuf::from);
    dir.join(format!("{volume}.toml"))
}

/// Checks everything `cfg` (read from `file`) names on this host; `node`
/// is this host's node name (None: not a cluster node, e.g. an admin box:
/// only the shared files are checked).
pub fn check_host(cfg: &ClusterConfig, file: &Path, node: Option<&str>) -> Report {
    let mut r = Report::default();
    match std::fs::metadata(&cfg.cluster.key_file) {
        Err(e) => r.problem(
            file,
            "cluster.key_file",
            format!("{} {}", cfg.cluster.key_file.display(), io_why(&e)),
            format!(
                "create it with `head -c 32 /dev/urandom > {}` (mode 0600) on one node and copy it to every node",
                cfg.cluster.key_file.display()
            ),
        ),
        Ok(m) if m.len() < KEY_BYTES_MIN => r.problem(
            file,
            "cluster.key_file",
            format!("{} has {} bytes", cfg.cluster.key_file.display(), m.len()),
            format!("use at least {KEY_BYTES_MIN} random bytes: `head -c 32 /dev/urandom > FILE`"),
        ),
        Ok(_) => {}
    }
    check_file(
        &mut r,
        file,
        "cluster.ca",
        &cfg.cluster.ca,
        "copy the cluster CA certificate there (it signs every node's certificate; README: first-time setup)",
    );
    let me = node.and_then(|n| cfg.node(n)).map(|(_, n)| n.clone());
    let Some(me) = me else {
        r.notes.push(format!(
            "this host is not a node of the cluster ({}): its certificates, agents and resource files are not checked",
            node.unwrap_or("no name")
        ));
        return r;
    };
    let name = me.name.clone();
    check_file(
        &mut r,
        file,
        &format!("node {name}: cert"),
        &me.cert(),
        format!("create {name}'s certificate, signed by the cluster CA with the DNS name \"{name}\", or set cert"),
    );
    check_file(
        &mut r,
        file,
        &format!("node {name}: key"),
        &me.key(),
        "put the certificate's private key there (mode 0600), or set key",
    );
    for f in cfg.fences.iter() {
        check_program(
            &mut r,
            file,
            &format!("fence for {}: agent", f.node),
            &f.agent,
            "install the fence agent (package fence-agents) or fix the path",
        );
    }
    if me.role != NodeRole::Storage {
        return r;
    }
    let wd = &cfg.watchdog;
    if wd.mode != crate::config::WatchdogMode::Off && !wd.device.exists() {
        if wd.mode == crate::config::WatchdogMode::Required {
            r.problem(
                file,
                "watchdog.device",
                format!("{} does not exist (watchdog.mode = \"required\")", wd.device.display()),
                "load the board's watchdog driver (or softdog), or set watchdog.mode = \"auto\" and configure fencing",
            );
        } else {
            r.notes.push(format!(
                "watchdog: {} does not exist; clusterd runs without it (watchdog.mode = \"auto\")",
                wd.device.display()
            ));
        }
    }
    for g in &cfg.groups {
        let Ok(spec) = g.validate(false) else { continue };
        check_program(
            &mut r,
            file,
            &format!("group {}: replicator", g.name),
            &spec.replicator,
            "install the replicator there, or set the group's replicator = \"/path/to/replicator\"",
        );
        for step in &spec.steps {
            if let StepKind::Ocf { agent, .. } = &step.kind {
                check_program(
                    &mut r,
                    file,
                    &format!("group {}: resource {}: agent", g.name, step.name),
                    agent,
                    "install the OCF agent there (the MTA's is clusterd/agents/mta) and make it executable",
                );
            }
        }
        let res = resource_path(&g.volume);
        match std::fs::read_to_string(&res) {
            Err(e) => r.problem(
                file,
                &format!("group {}: volume", g.name),
                format!("the replicator resource file {} {}", res.display(), io_why(&e)),
                "write the resource file (README: A replicated resource) or name its path in volume",
            ),
            Ok(text) => check_resource(&mut r, cfg, &res, &text),
        }
    }
    r
}

/// Checks a replicator resource file's text against the cluster's
/// configuration (pure).
pub fn check_resource(r: &mut Report, cfg: &ClusterConfig, res: &Path, text: &str) {
    let doc: toml::Table = match text.parse() {
        Ok(d) => d,
        Err(e) => {
            let why = crate::group::exec::one_line(&e.to_string());
            r.problem(
                res,
                "(file)",
                format!("is not valid TOML: {why}"),
                "fix the syntax (`replicator check RES` names the line)",
            );
            return;
        }
    };
    let get = |section: &str, key: &str| doc.get(section).and_then(|s| s.get(key));
    let fencing = get("resource", "fencing").and_then(|v| v.as_str()).unwrap_or("dont-care");
    if fencing != "resource-and-stonith" {
        r.problem(
            res,
            "resource.fencing",
            format!(
                "is \"{fencing}\": a primary that loses its peer would acknowledge writes alone before clusterd \
                 froze it and recorded the peer Outdated, and a takeover would lose them"
            ),
            "set fencing = \"resource-and-stonith\" (the replicator holds I/O at once; clusterd resumes it once \
             the cluster log records the peer Outdated)",
        );
    }
    if let Some(handler) = get("handlers", "fence-peer").and_then(|v| v.as_str()) {
        let handler = Path::new(handler);
        if let Err(why) = executable(handler) {
            r.problem(
                res,
                "handlers.fence-peer",
                format!("{} {why}", handler.display()),
                "remove the key (under clusterd, clusterd lifts the replicator's hold once the peer is recorded \
                 Outdated) or install the handler",
            );
        }
    }
    let names: Vec<&str> = doc
        .get("node")
        .and_then(|n| n.as_array())
        .map(|a| a.iter().filter_map(|n| n.get("name").and_then(|v| v.as_str())).collect())
        .unwrap_or_default();
    for n in cfg.storage_nodes() {
        if !names.contains(&n.name.as_str()) {
            r.problem(
                res,
                "node",
                format!("no [[node]] named \"{}\" (names: {})", n.name, names.join(", ")),
                "name the replicator's nodes as the cluster's storage nodes (clusterd passes --node NAME)",
            );
        }
    }
    let ping_ms = get("net", "ping-timeout-ms")
        .and_then(|v| v.as_integer())
        .map_or(REPLICATOR_PING_TIMEOUT_MS_DEFAULT, |v| v.max(0) as u64);
    r.notes.push(format!(
        "{}: fencing {fencing}, ping-timeout {ping_ms} ms (heartbeat deadtime {} ms; a promotion drops a stale \
         primary's link, so the two need no relation)",
        res.display(),
        cfg.heartbeat.deadtime_ms
    ));
}

/// What is wrong with a path, as a predicate ("does not exist").
fn io_why(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".into(),
        std::io::ErrorKind::PermissionDenied => "cannot be read (permission denied; run as root)".into(),
        _ => format!("cannot be read ({e})"),
    }
}

fn check_file(r: &mut Report, file: &Path, key: &str, path: &Path, fix: impl Into<String>) {
    if let Err(e) = std::fs::File::open(path) {
        r.problem(file, key, format!("{} {}", path.display(), io_why(&e)), fix);
    }
}

/// Whether `path` is an executable file ("does not exist", …).
fn executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Err(e) => Err(io_why(&e)),
        Ok(m) if !m.is_file() => Err("is not a file".into()),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err("is not executable (chmod +x)".into()),
        Ok(_) => Ok(()),
    }
}

/// A program named by path, or by name on `PATH`.
fn check_program(r: &mut Report, file: &Path, key: &str, program: &Path, fix: &str) {
    let found = if program.components().count() > 1 {
        executable(program)
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        if std::env::split_paths(&path).any(|d| executable(&d.join(program)).is_ok()) {
            Ok(())
        } else {
            Err("is not on PATH".into())
        }
    };
    if let Err(why) = found {
        r.problem(file, key, format!("{} {why}", program.display()), fix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
[cluster]
name = "mail"
key_file = "KEY"
ca = "CA"

[[node]]
name = "a"
role = "storage"
heartbeat = ["127.0.0.1:6940"]
raft = "127.0.0.1:7790"
cert = "DIR/a.crt"
key = "DIR/a.key"

[[node]]
name = "b"
role = "storage"
heartbeat = ["127.0.0.2:6940"]
raft = "127.0.0.2:7790"

[[node]]
name = "w"
role = "witness"
heartbeat = ["127.0.0.3:6940"]
raft = "127.0.0.3:7790"

[[group]]
name = "mail"
volume = "DIR/mail.toml"
replicator = "/bin/sh"
[[group.resource]]
name = "mta"
kind = "ocf"
agent = "DIR/agent"
"#;

    const RESOURCE: &str = r#"
[resource]
name = "mail"
fencing = "resource-and-stonith"
[net]
ping-timeout-ms = 2000
[[node]]
name = "a"
[[node]]
name = "b"
"#;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("clusterd-preflight-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn config(d: &Path) -> ClusterConfig {
        let text = CLUSTER
            .replace("KEY", &d.join("authkey").display().to_string())
            .replace("CA", &d.join("ca.crt").display().to_string())
            .replace("DIR", &d.display().to_string());
        ClusterConfig::parse(Path::new("cluster.toml"), &text).unwrap()
    }

    fn problems(r: &Report) -> Vec<String> {
        r.problems.iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn a_required_watchdog_must_exist_on_a_storage_node() {
        let d = dir("wd");
        let mut cfg = config(&d.0);
        let note = |r: &Report| r.notes.iter().any(|n| n.starts_with("watchdog: ") && n.contains("does not exist"));
        cfg.watchdog.device = d.0.join("watchdog");
        let r = check_host(&cfg, Path::new("cluster.toml"), Some("a"));
        assert!(note(&r), "auto: a note, not a problem: {:?}", r.notes);
        assert!(!problems(&r).iter().any(|l| l.contains("watchdog.device")));
        cfg.watchdog.mode = crate::config::WatchdogMode::Required;
        let p = problems(&check_host(&cfg, Path::new("cluster.toml"), Some("a")));
        assert!(
            p.iter().any(|l| l.starts_with("cluster.toml: watchdog.device: ") && l.contains("does not exist")),
            "{p:#?}"
        );
        std::fs::write(d.0.join("watchdog"), b"").unwrap();
        let r = check_host(&cfg, Path::new("cluster.toml"), Some("a"));
        assert!(!problems(&r).iter().any(|l| l.contains("watchdog.device")) && !note(&r));
    }

    #[test]
    fn missing_files_are_named_with_their_key_and_fix() {
        // Issue 23: check-config said "valid" with none of them present.
        let d = dir("missing");
        let cfg = config(&d.0);
        let r = check_host(&cfg, Path::new("cluster.toml"), Some("a"));
        let p = problems(&r);
        let expect = [
            "cluster.toml: cluster.key_file: ",
            "cluster.toml: cluster.ca: ",
            "cluster.toml: node a: cert: ",
            "cluster.toml: node a: key: ",
            "cluster.toml: group mail: resource mta: agent: ",
            "cluster.toml: group mail: volume: ",
        ];
        for e in expect {
            assert!(p.iter().any(|l| l.starts_with(e) && l.contains(" does not exist; ")), "{e} not in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    #[test]
    fn a_complete_host_passes_and_a_short_key_or_a_plain_agent_does_not() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("complete");
        let cfg = config(&d.0);
        std::fs::write(d.0.join("authkey"), [7u8; 32]).unwrap();
        for f in ["ca.crt", "a.crt", "a.key"] {
            std::fs::write(d.0.join(f), "x").unwrap();
        }
        std::fs::write(d.0.join("agent"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(d.0.join("agent"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.0.join("mail.toml"), RESOURCE).unwrap();
        let r = check_host(&cfg, Path::new("cluster.toml"), Some("a"));
        assert!(r.problems.is_empty(), "{:#?}", problems(&r));
        assert!(r.notes.iter().any(|n| n.contains("ping-timeout 2000 ms")), "{:?}", r.notes);
        std::fs::write(d.0.join("authkey"), [7u8; 8]).unwrap();
        std::fs::set_permissions(d.0.join("agent"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let p = problems(&check_host(&cfg, Path::new("cluster.toml"), Some("a")));
        assert!(p.iter().any(|l| l.contains("cluster.key_file: ") && l.contains("has 8 bytes")), "{p:#?}");
        assert!(p.iter().any(|l| l.contains("agent: ") && l.contains("not executable")), "{p:#?}");
        // Not a node: only the shared files.
        let r = check_host(&cfg, Path::new("cluster.toml"), Some("admin-box"));
        assert_eq!(r.problems.len(), 1, "{:#?}", problems(&r));
    }

    #[test]
    fn the_resource_file_must_hold_io_on_peer_loss_and_name_the_cluster_nodes() {
        let d = dir("resource");
        let cfg = config(&d.0);
        let res = Path::new("/etc/replicator/mail.toml");
        let mut r = Report::default();
        check_resource(&mut r, &cfg, res, RESOURCE);
        assert!(r.problems.is_empty(), "{:#?}", problems(&r));
        let mut r = Report::default();
        let text = RESOURCE.replace("resource-and-stonith", "dont-care").replace("name = \"b\"", "name = \"beta\"")
            + "[handlers]\nfence-peer = \"/usr/lib/replicator/fence-peer-missing\"\n";
        check_resource(&mut r, &cfg, res, &text);
        let p = problems(&r);
        assert!(
            p.iter().any(|l| l.starts_with("/etc/replicator/mail.toml: resource.fencing: is \"dont-care\"")
                && l.contains("; set fencing = \"resource-and-stonith\"")),
            "{p:#?}"
        );
        assert!(
            p.iter().any(|l| l.contains("handlers.fence-peer: /usr/lib/replicator/fence-peer-missing does not exist")),
            "{p:#?}"
        );
        assert!(p.iter().any(|l| l.contains("node: no [[node]] named \"b\" (names: a, beta)")), "{p:#?}");
        let mut r = Report::default();
        check_resource(&mut r, &cfg, res, "[resource\n");
        assert!(problems(&r)[0].contains("(file): is not valid TOML"), "{:?}", problems(&r));
    }
}
