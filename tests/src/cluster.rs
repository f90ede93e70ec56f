//! A three-host cluster: storage nodes `a` and `b` (a replicated resource,
//! see [`crate::pair`]) and the witness `w`, each running `clusterd run`
//! inside its network namespace, with a resource group of the test's
//! choosing. Hosts "die" by SIGKILL of every process in their namespace.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::pair::{Pair, PairOptions};
use crate::server::{replicator_bin, workspace_bin, Daemon};
use crate::util::{cmd, run_output, wait_until, Output, TestDir, CMD_TIMEOUT};

pub const NAMES: [&str; 3] = ["a", "b", "w"];
pub const RAFT_PORT: u16 = 7790;
pub const HEARTBEAT_PORTS: [u16; 2] = [694, 695];
/// The stand-in service's port on the service address.
pub const SERVICE_PORT: u16 = 2525;

pub fn clusterd_bin() -> PathBuf {
    workspace_bin("clusterd", "CLUSTERD_BIN")
}

/// A test agent (tests/agents/NAME: the stand-in service, fence_netns).
pub fn agent(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("agents").join(name)
}

/// The agents shipped with clusterd (clusterd/agents: the MTA's).
pub fn agent_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clusterd/agents")
}

/// The service address and the stand-in service, which logs its answers
/// to `statefile` (`@DIR@` and `@SERVICE_IP@` are filled in).
pub fn service_resources(statefile: &str) -> String {
    format!(
        "[[group.resource]]\nname = \"ip\"\nkind = \"ip\"\naddress = \"@SERVICE_IP@/24\"\ninterface = \"eth0\"\n\n\
         [[group.resource]]\nname = \"standin\"\nkind = \"ocf\"\nagent = \"{}\"\nmonitor_interval_ms = 500\n\
         params = {{ ip = \"@SERVICE_IP@\", port = \"{SERVICE_PORT}\", statefile = \"{statefile}\" }}\n",
        agent("ocf-standin").display()
    )
}

/// The whole stack: the volume attached (FUSE + loop here), ext4 checked
/// and mounted at `@DIR@/mnt`, the service address, and the stand-in
/// service with its state file on the replicated filesystem. Needs
/// [`ClusterOptions::mkfs`].
pub fn full_stack_resources() -> String {
    format!(
        "[[group.resource]]\nname = \"disk\"\nkind = \"attach\"\n\n\
         [[group.resource]]\nname = \"fs\"\nkind = \"filesystem\"\ndevice = \"@attach\"\ndirectory = \"@DIR@/mnt\"\nfstype = \"ext4\"\n\n{}",
        service_resources("@DIR@/mnt/standin-state")
    )
}

pub struct ClusterOptions {
    /// `[[group.resource]]` tables after the volume; `@SERVICE_IP@` and
    /// `@DIR@` are replaced by the service address and the test directory.
    pub resources: String,
    /// Extra top-level TOML (e.g. `[[fence]]` tables); same replacements,
    /// plus `@NETNS_a@` / `@NETNS_b@` (the storage hosts' namespaces, for
    /// the fence_netns agent).
    pub extra: String,
    /// Put an ext4 filesystem on the volume before the cluster starts.
    pub mkfs: bool,
    /// Fills the new filesystem (mounted at the given directory) before
    /// the cluster starts.
    pub prepare: Option<fn(&std::path::Path) -> Result<()>>,
}

/// What a configuration written by the test (rather than by
/// [`ClusterOptions`]) needs to know: where the harness put things.
pub struct Env {
    pub dir: PathBuf,
    /// `ca.pem`, `NAME.pem`, `NAME.key` for `a`, `b` and `w`.
    pub pki: PathBuf,
    /// The heartbeat key file.
    pub key_file: PathBuf,
    /// Host addresses of `a`, `b`, `w`.
    pub ips: [Ipv4Addr; 3],
    /// Network namespaces of `a`, `b`, `w` (for the fence_netns agent).
    pub netns: [String; 3],
    pub service_ip: Ipv4Addr,
    /// The replicated resource's file (the test writes it).
    pub res: PathBuf,
    /// The storage nodes' disks (with fresh metadata).
    pub disks: [PathBuf; 2],
}

/// A cluster whose resource file and cluster configuration the test
/// writes itself (e.g. taken from README.md), with witness.
pub struct CustomConfig {
    /// The replicated resource file's text (nodes `a` and `b`).
    pub resource: fn(&Env) -> Result<String>,
    /// cluster.toml's text (nodes `a`, `b`, `w`; one group).
    pub cluster: fn(&Env) -> Result<String>,
    pub mkfs: bool,
    pub prepare: Option<fn(&std::path::Path) -> Result<()>>,
}

pub struct Cluster {
    pub pair: Pair,
    pub config: PathBuf,
    pub daemons: [Option<Daemon>; 3],
    pub service_ip: Ipv4Addr,
    pub dir: PathBuf,
    /// Whether host `w` is part of the cluster (false: two-node mode).
    pub witness: bool,
    /// Loop devices whose FUSE server (`replicator attach`) `kill_host`
    /// killed, with their backing file's device number: released on drop.
    orphans: Vec<(String, String)>,
}

fn run(c: &mut Command) -> Result<Output> {
    run_output(c, CMD_TIMEOUT)
}

impl Cluster {
    /// The replicated resource in sync with both nodes secondary, the
    /// cluster configured; no clusterd running yet.
    pub fn new(dir: &TestDir, opts: &ClusterOptions) -> Result<Cluster> {
        Cluster::build(dir, opts, true)
    }

    /// Two-node mode: storage nodes `a` and `b` only, no witness (host `w`
    /// exists but runs nothing).
    pub fn new_two_node(dir: &TestDir, opts: &ClusterOptions) -> Result<Cluster> {
        Cluster::build(dir, opts, false)
    }

    /// The test writes both configurations ([`CustomConfig`]); then as
    /// [`Cluster::new`]: the volume in sync, both nodes secondary, no
    /// clusterd running yet.
    pub fn with_config(dir: &TestDir, cfg: &CustomConfig) -> Result<Cluster> {
        let pki = dir.join("pki");
        crate::tls::make_node_pki(&pki, &NAMES)?;
        let pair_opts = PairOptions { hosts: 3, pki: Some(pki.clone()), ..PairOptions::default() };
        let mut pair = Pair::new(dir, &pair_opts)?;
        let gw = pair.net.gateway.octets();
        let env = Env {
            dir: dir.path().to_owned(),
            pki: pki.clone(),
            key_file: dir.join("authkey"),
            ips: [pair.net.host(0).ip, pair.net.host(1).ip, pair.net.host(2).ip],
            netns: [pair.net.host(0).ns.clone(), pair.net.host(1).ns.clone(), pair.net.host(2).ns.clone()],
            service_ip: Ipv4Addr::new(gw[0], gw[1], gw[2], 100),
            res: pair.res.clone(),
            disks: pair.disks.clone(),
        };
        std::fs::write(&pair.res, (cfg.resource)(&env)?)?;
        pair.bring_up()?;
        if cfg.mkfs {
            make_filesystem(&pair, &dir.join("mkfs-run"), cfg.prepare)?;
        }
        pair.ok(0, &["secondary"])?;
        std::fs::write(&env.key_file, crate::util::random_bytes(32, std::process::id().into()))?;
        let config = dir.join("cluster.toml");
        std::fs::write(&config, without_host_watchdog((cfg.cluster)(&env)?))?;
        Ok(Cluster {
            pair,
            config,
            daemons: [None, None, None],
            service_ip: env.service_ip,
            dir: dir.path().to_owned(),
            witness: true,
            orphans: Vec::new(),
        })
    }

    fn build(dir: &TestDir, opts: &ClusterOptions, witness: bool) -> Result<Cluster> {
        let pki = dir.join("pki");
        crate::tls::make_node_pki(&pki, &NAMES)?;
        let pair_opts = PairOptions { hosts: 3, pki: Some(pki.clone()), ..PairOptions::default() };
        let mut pair = Pair::new(dir, &pair_opts)?;
        pair.bring_up()?;
        if opts.mkfs {
            make_filesystem(&pair, &dir.join("mkfs-run"), opts.prepare)?;
            std::fs::create_dir_all(dir.join("mnt"))?;
        }
        pair.ok(0, &["secondary"])?;
        let key = dir.join("authkey");
        std::fs::write(&key, crate::util::random_bytes(32, std::process::id().into()))?;
        let gw = pair.net.gateway.octets();
        let service_ip = Ipv4Addr::new(gw[0], gw[1], gw[2], 100);
        let subst = |s: &str| {
            s.replace("@SERVICE_IP@", &service_ip.to_string())
                .replace("@DIR@", &dir.path().display().to_string())
                .replace("@NETNS_a@", &pair.net.host(0).ns)
                .replace("@NETNS_b@", &pair.net.host(1).ns)
        };
        let mut text = format!(
            "[cluster]\nname = \"test\"\nkey_file = \"{}\"\nca = \"{}\"\n\n{}\n",
            key.display(),
            pki.join("ca.pem").display(),
            subst(&opts.extra)
        );
        for (i, name) in NAMES.iter().enumerate().take(if witness { 3 } else { 2 }) {
            let ip = pair.net.host(i).ip;
            text.push_str(&format!(
                "\n[[node]]\nname = \"{name}\"\nrole = \"{}\"\nheartbeat = [\"{ip}:{}\", \"{ip}:{}\"]\nraft = \"{ip}:{RAFT_PORT}\"\n\
                 cert = \"{}\"\nkey = \"{}\"\nstate_dir = \"{}\"\ncontrol = \"{}\"\n",
                if i == 2 { "witness" } else { "storage" },
                HEARTBEAT_PORTS[0],
                HEARTBEAT_PORTS[1],
                pki.join(format!("{name}.pem")).display(),
                pki.join(format!("{name}.key")).display(),
                dir.join(format!("state-{name}")).display(),
                dir.join(format!("clusterd-{name}.sock")).display(),
            ));
        }
        text.push_str(&format!(
            "\n[[group]]\nname = \"mail\"\nvolume = \"{}\"\nreplicator = \"{}\"\n{}\n",
            pair.res.display(),
            replicator_bin().display(),
            subst(&opts.resources)
        ));
        let config = dir.join("cluster.toml");
        std::fs::write(&config, without_host_watchdog(text))?;
        Ok(Cluster {
            pair,
            config,
            daemons: [None, None, None],
            service_ip,
            dir: dir.path().to_owned(),
            witness,
            orphans: Vec::new(),
        })
    }

    /// `clusterd run` on host `i`; waits until its admin socket answers.
    pub fn start(&mut self, i: usize) -> Result<()> {
        let mut args = vec!["run".to_string(), "--config".into(), self.config.display().to_string()];
        args.extend(["--node".into(), NAMES[i].into()]);
        if i == 2 {
            args.push("--witness".into());
        }
        let mut c = self.pair.net.host(i).cmd(&clusterd_bin().display().to_string(), &args);
        c.env("CLUSTERD_LOG", std::env::var("CLUSTERD_LOG").unwrap_or_else(|_| "info".into()));
        // OCF agents' pid files per test and node, not in the machine's /run.
        let rsctmp = self.dir.join(format!("rsctmp-{}", NAMES[i]));
        std::fs::create_dir_all(&rsctmp)?;
        c.env("HA_RSCTMP", &rsctmp);
        workspace_path(&mut c);
        let mut d = Daemon::spawn(c)?;
        let mut alive = true;
        let up = wait_until(Duration::from_secs(20), "clusterd admin socket", || {
            alive = d.is_running();
            !alive || self.status(i).is_ok()
        });
        if !alive || up.is_err() {
            bail!("clusterd on {} did not come up: {:?}\n{}", NAMES[i], up.err(), d.logs.text());
        }
        self.daemons[i] = Some(d);
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.hosts() {
            self.start(i)?;
        }
        Ok(())
    }

    /// `clusterd ARGS --config … --node NAME` (runs in the root namespace:
    /// the admin socket is a file).
    pub fn ctl_cmd(&self, i: usize, args: &[&str]) -> Command {
        let mut c = cmd(clusterd_bin(), args);
        c.arg("--config").arg(&self.config).args(["--node", NAMES[i]]);
        workspace_path(&mut c);
        c
    }

    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<Output> {
        run(&mut self.ctl_cmd(i, args))
    }

    pub fn ctl_ok(&self, i: usize, args: &[&str]) -> Result<Output> {
        let out = self.ctl(i, args)?;
        if !out.success() {
            bail!("clusterd {} on {}: {}", args.join(" "), NAMES[i], out.describe());
        }
        Ok(out)
    }

    pub fn status(&self, i: usize) -> Result<Value> {
        let out = self.ctl(i, &["status", "--json"])?;
        if !out.success() {
            bail!("status on {}: {}", NAMES[i], out.describe());
        }
        serde_json::from_str(&out.stdout).with_context(|| format!("status json: {}", out.stdout))
    }

    /// The group's owner as node `i` sees it (None when released or unowned).
    pub fn owner(&self, i: usize) -> Option<String> {
        let s = self.status(i).ok()?;
        let g = &s["groups"][0];
        if g["released"] == true {
            return None;
        }
        g["owner"].as_str().map(str::to_owned)
    }

    /// Node `i`'s failover core says the volume is writable here, and
    /// (the steady state) node `i` leads the cluster log.
    pub fn writable(&self, i: usize) -> bool {
        self.status(i).is_ok_and(|s| s["groups"][0]["writable"] == true && s["leader"] == NAMES[i])
    }

    /// The replicator on storage node `i` is primary with I/O not suspended.
    pub fn volume_writable(&self, i: usize) -> bool {
        self.pair.state(i).is_ok_and(|s| s["role"] == "Primary" && s["suspended"] == false)
    }

    /// Node `i` runs the group: writable there, the log's leader, every
    /// resource started.
    pub fn runs_group(&self, i: usize) -> bool {
        self.volume_writable(i)
            && self.status(i).is_ok_and(|s| {
                let g = &s["groups"][0];
                g["writable"] == true
                    && s["leader"] == NAMES[i]
                    && g["resources"].as_array().is_some_and(|r| r.iter().all(|r| r["state"] == "started"))
            })
    }

    /// Waits until a storage node runs the group; returns its index.
    pub fn wait_group(&self, timeout: Duration) -> Result<usize> {
        let mut which = None;
        wait_until(timeout, "a node running the group", || {
            which = (0..2).find(|i| self.runs_group(*i));
            which.is_some()
        })
        .map_err(|e| anyhow!("{e}\n{}", self.describe()))?;
        which.ok_or_else(|| anyhow!("no node"))
    }

    /// Waits until storage node `i` runs the group.
    pub fn wait_group_on(&self, i: usize, timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("the group running on {}", NAMES[i]), || self.runs_group(i))
            .map_err(|e| anyhow!("{e}\n{}", self.describe()))
    }

    /// Waits until one storage node runs the group with its services
    /// started and the stand-in service answering on the service address;
    /// returns that node's index.
    pub fn wait_running(&self, timeout: Duration) -> Result<usize> {
        let mut which = None;
        wait_until(timeout, "the group running with its service answering", || {
            which = (0..2).find(|i| self.writable(*i) && self.volume_writable(*i));
            which.is_some() && self.service_answer().is_some_and(|a| a.contains(NAMES[which.unwrap_or(0)]))
        })
        .map_err(|e| anyhow!("{e}\n{}", self.describe()))?;
        which.ok_or_else(|| anyhow!("no node"))
    }

    /// Waits until storage node `i` runs the group and the service answers
    /// from it.
    pub fn wait_running_on(&self, i: usize, timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("the group running on {}", NAMES[i]), || {
            self.writable(i) && self.volume_writable(i) && self.service_answer().is_some_and(|a| a.contains(NAMES[i]))
        })
        .map_err(|e| anyhow!("{e}\n{}", self.describe()))
    }

    /// One line from the stand-in service at the service address.
    pub fn service_answer(&self) -> Option<String> {
        use std::io::Read;
        let addr = SocketAddr::from((self.service_ip, SERVICE_PORT));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        (!out.is_empty()).then_some(out)
    }

    /// SIGTERM to clusterd on host `i`; waits (bounded) until it exited.
    pub fn terminate(&mut self, i: usize) -> Result<()> {
        let Some(d) = self.daemons[i].as_mut() else { bail!("clusterd on {} is not running", NAMES[i]) };
        let pid = d.child.id().to_string();
        let out = run(&mut cmd("kill", ["-TERM", &pid]))?;
        if !out.success() {
            bail!("kill -TERM {pid}: {}", out.describe());
        }
        wait_until(Duration::from_secs(60), "clusterd to exit after SIGTERM", || !d.is_running())?;
        self.daemons[i] = None;
        Ok(())
    }

    /// A host death as the other hosts see one (issue 23): the host's link
    /// goes down, then every process on it is killed, so no FIN or RST
    /// reaches its peers and they notice only by their own timeouts (the
    /// heartbeat's deadtime, the replicator's ping timeout, TCP
    /// retransmissions). `kill_host` is the other case: processes killed
    /// with the link up, so the peers see their connections close at once.
    /// `revive_link` brings the link back before the host is restarted.
    pub fn host_death(&mut self, i: usize) -> Result<()> {
        self.pair.net.host(i).set_link(false)?;
        self.kill_host(i);
        Ok(())
    }

    /// The link of a host that died with `host_death` comes back.
    pub fn revive_link(&self, i: usize) -> Result<()> {
        self.pair.net.host(i).set_link(true)
    }

    /// kill -9 of everything on host `i` (its daemons, the service, …).
    pub fn kill_host(&mut self, i: usize) {
        let ns = self.pair.net.host(i).ns.clone();
        if let Ok(out) = run(&mut cmd("ip", ["netns", "pids", &ns])) {
            let pids: Vec<&str> = out.stdout.split_whitespace().collect();
            self.orphans.extend(loop_devices_served_by(&pids));
            if !pids.is_empty() {
                let _ = run(cmd("kill", ["-9"]).args(&pids));
            }
        }
        self.daemons[i] = None;
        if i < 2 {
            self.pair.kill(i);
        }
    }

    /// How many hosts run clusterd (3 with the witness, 2 without).
    pub fn hosts(&self) -> usize {
        if self.witness {
            3
        } else {
            2
        }
    }

    /// Everything the nodes say, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, name) in NAMES.iter().enumerate().take(self.hosts()) {
            let status = self.ctl(i, &["status"]).map(|o| o.stdout + &o.stderr).unwrap_or_else(|e| e.to_string());
            out.push_str(&format!("--- clusterd status on {name} ---\n{status}\n"));
            if i < 2 {
                let s = self.pair.state(i).map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                out.push_str(&format!("--- replicator on {} ---\n{s}\n", NAMES[i]));
            }
            if let Some(d) = &self.daemons[i] {
                let text = d.logs.text();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                out.push_str(&format!("--- clusterd log tail on {} ---\n", NAMES[i]));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// The workspace's binaries (replicator, mta) first on `c`'s PATH, as
/// installed ones would be: configurations may name them without a path.
fn workspace_path(c: &mut Command) {
    if let Some(bin_dir) = clusterd_bin().parent() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![bin_dir.to_owned()];
        dirs.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(dirs) {
            c.env("PATH", joined);
        }
    }
}

/// ext4 on the primary `a` through `replicator attach` (FUSE + loop),
/// attached from inside host `a` (its export may listen on its loopback).
fn make_filesystem(
    pair: &Pair,
    run_dir: &std::path::Path,
    prepare: Option<fn(&std::path::Path) -> Result<()>>,
) -> Result<()> {
    let mut c = pair.net.host(0).cmd(&replicator_bin().display().to_string(), ["attach"]);
    c.arg(&pair.res).args(["--node", "a", "--method", "fuse", "--timeout", "20", "--run-dir"]).arg(run_dir);
    let out = run_output(&mut c, Duration::from_secs(60))?;
    if !out.success() {
        bail!("attach for mkfs: {}", out.describe());
    }
    let device = out.stdout.trim().to_string();
    let made = run(&mut cmd("mkfs.ext4", ["-q", "-F", &device])).and_then(|made| {
        if !made.success() {
            return Ok(made);
        }
        if let Some(prepare) = prepare {
            let mnt = run_dir.join("mnt");
            std::fs::create_dir_all(&mnt)?;
            let mounted = run(cmd("mount", [device.as_str()]).arg(&mnt))?;
            if !mounted.success() {
                bail!("mount for preparing: {}", mounted.describe());
            }
            let prepared = prepare(&mnt);
            let unmounted = run(cmd("umount", Vec::<String>::new()).arg(&mnt))?;
            prepared?;
            if !unmounted.success() {
                bail!("umount after preparing: {}", unmounted.describe());
            }
        }
        Ok(made)
    });
    let mut c = crate::server::replicator();
    c.args(["detach", &device]).arg("--run-dir").arg(run_dir);
    let detached = run(&mut c);
    let made = made?;
    if !made.success() {
        bail!("mkfs.ext4: {}", made.describe());
    }
    let detached = detached?;
    if !detached.success() {
        bail!("detach after mkfs: {}", detached.describe());
    }
    pair.wait(0, Duration::from_secs(10), "writes settled", |s| s["writes_in_flight"] == 0)?;
    pair.wait_in_sync(Duration::from_secs(60))
}

impl Drop for Cluster {
    /// Every process of every host dies (daemons, services, FUSE servers of
    /// attached volumes), and the loop devices of every FUSE server killed
    /// during the test are released, so tests leak neither loop devices
    /// nor hung file systems.
    fn drop(&mut self) {
        let mut pids = Vec::new();
        for i in 0..3 {
            let ns = self.pair.net.host(i).ns.clone();
            if let Ok(out) = run(&mut cmd("ip", ["netns", "pids", &ns])) {
                pids.extend(out.stdout.split_whitespace().map(str::to_owned));
            }
            self.kill_host(i);
        }
        // A FUSE server killed while its loop device had I/O in flight can
        // leave a thread waiting on its own, dead, connection (and an ext4
        // journal thread behind it, which hangs `sync` machine-wide): abort
        // those connections (named after the backing file's device minor)
        // unless the device was bound to something else since.
        let orphans: Vec<(String, String)> = std::mem::take(&mut self.orphans)
            .into_iter()
            .filter(|(dev, maj_min)| backing_maj_min(dev).as_deref() == Some(maj_min.as_str()))
            .collect();
        for (_, maj_min) in &orphans {
            if let Some(minor) = maj_min.strip_prefix("0:") {
                let _ = std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
            }
        }
        // Gone, or a zombie (PID 1 may reap late).
        let gone = |pids: &[String]| {
            pids.iter().all(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|st| st.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
                    .unwrap_or(true)
            })
        };
        let _ = wait_until(Duration::from_secs(10), "the hosts' processes to exit", || gone(&pids));
        for (dev, maj_min) in orphans {
            let _ = wait_until(Duration::from_secs(10), "the loop device to detach", || {
                let _ = run(&mut cmd("losetup", ["-d", &dev]));
                backing_maj_min(&dev).as_deref() != Some(maj_min.as_str())
            });
        }
    }
}

/// Loop devices bound to the volume file of a FUSE server among `pids`
/// (its path names the server: `.../fuse-<pid>/volume`), with the backing
/// file's device number, which stays the same after the server's mount
/// namespace is gone (the path does not).
fn loop_devices_served_by(pids: &[&str]) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let pid = backing.split("/fuse-").nth(1)?.split('/').next()?;
            if !pids.contains(&pid) {
                return None;
            }
            let dev = format!("/dev/{}", e.file_name().to_string_lossy());
            let maj_min = backing_maj_min(&dev)?;
            Some((dev, maj_min))
        })
        .collect()
}

/// The device number of loop device `dev`'s backing file ("0:43"), if bound.
fn backing_maj_min(dev: &str) -> Option<String> {
    let out = run(&mut cmd("losetup", ["--list", "--noheadings", "--output", "BACK-MAJ:MIN", dev])).ok()?;
    let maj_min = out.stdout.trim();
    (!maj_min.is_empty()).then(|| maj_min.to_owned())
}

/// Test daemons never arm this machine's own watchdog: with the default
/// `watchdog.mode = "auto"`, a host that has `/dev/watchdog` would be reset
/// by a test's kill -9. A configuration that sets `[watchdog]` itself (a
/// test of the watchdog, with a stand-in device) is left as it is.
fn without_host_watchdog(mut config: String) -> String {
    if !config.lines().any(|l| l.trim_start().starts_with("[watchdog]")) {
        config.push_str("\n[watchdog]\nmode = \"off\"\n");
    }
    config
}
