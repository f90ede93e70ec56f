//! Issue 23: clusterd fails over by itself with the configuration README.md
//! documents. The cluster, resource and MTA configurations are README.md's
//! own example blocks, parsed out of the README at run time; the harness
//! substitutes only what it must assign (addresses, paths, the fence
//! device, the service user if this machine has no `mta` user) and every
//! substitution must match, so the README and this test cannot drift.
//!
//! Three hosts (`a`, `b`, witness `w`); a client submits mail over SMTP to
//! the service address and records every token answered 250. Then 10 host
//! deaths (link down and every process killed at once, then the host comes
//! back) and 5 partitions of the primary (cut from both peers, then
//! healed). Checked: each failure is served without an admin command (the
//! survivor answers 250 on the service address within
//! [`FAILOVER_DEADLINE`]); after each return or heal the old primary is an
//! UpToDate secondary within [`REJOIN_DEADLINE`]; never two writable
//! primaries (a sampler reads both replicators every 50 ms for the whole
//! run); at the end every acknowledged token is in the mailbox exactly
//! once. Prints the failover times (event → first 250 from the survivor).
//! The partitions found that a cut-off primary whose writes the fencing
//! held never let go after the heal (its stop hung on those writes and a
//! suspended primary refused to demote with clients connected): fixed in
//! the replicator and clusterd's executor; this test keeps it fixed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tests::cluster::{agent, agent_dir, Cluster, CustomConfig, Env, NAMES};
use tests::server::workspace_bin;
use tests::{cmd, have_root, have_tools, replicator, run_output, wait_until, TestDir};

const HOST_DEATHS: usize = 10;
const PARTITIONS: usize = 5;
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
const REJOIN_DEADLINE: Duration = Duration::from_secs(10);
const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
const MAILBOX: &str = "alice@example.org";

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The README's fenced blocks of language `lang`, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_end() == format!("```{lang}") => current = Some(String::new()),
            Some(_) if line.trim_end() == "```" => out.extend(current.take()),
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    out
}

/// The one toml block of README.md containing every one of `needles`.
fn readme_block(needles: &[&str]) -> Result<String> {
    let found: Vec<String> =
        blocks(&readme(), "toml").into_iter().filter(|b| needles.iter().all(|n| b.contains(n))).collect();
    match found.len() {
        1 => Ok(found.into_iter().next().unwrap_or_default()),
        n => bail!("README.md has {n} toml blocks with {needles:?} (expected exactly one): the example changed"),
    }
}

/// Replaces `from` (which must occur exactly `times` times) by `to`.
fn sub(text: &str, from: &str, to: &str, times: usize) -> Result<String> {
    let n = text.matches(from).count();
    if n != times {
        bail!("README example: {from:?} occurs {n} times, expected {times}: the example changed");
    }
    Ok(text.replace(from, to))
}

/// Replaces the first occurrence of `from` (which must occur).
fn sub_first(text: &str, from: &str, to: &str) -> Result<String> {
    if !text.contains(from) {
        bail!("README example: {from:?} is missing: the example changed");
    }
    Ok(text.replacen(from, to, 1))
}

/// The filesystem's mount point on the storage nodes.
fn mail_dir(dir: &Path) -> PathBuf {
    dir.join("mnt")
}

/// The MTA's service user: README's `mta`, or `mail` where this machine
/// has no `mta` user (creating users is not a test's business).
fn service_user() -> &'static str {
    let has_mta = run_output(&mut cmd("id", ["-u", "mta"]), Duration::from_secs(10)).is_ok_and(|o| o.success());
    if has_mta {
        "mta"
    } else {
        "mail"
    }
}

/// README's MTA configuration with its mail tree at `data_dir`.
fn mta_config(data_dir: &Path) -> Result<String> {
    let text = readme_block(&["data_dir = \"/srv/mail\"", "[[listener]]"])?;
    let text = sub(&text, "\"/srv/mail", &format!("\"{}", data_dir.display()), 3)?;
    sub(&text, "user = \"mta\"", &format!("user = \"{}\"", service_user()), 1)
}

fn resource_config(env: &Env) -> Result<String> {
    let text = readme_block(&["[resource]", "fencing = \"resource-and-stonith\""])?;
    let pki = |f: &str| env.pki.join(f).display().to_string();
    let mut t = sub(&text, "\"/etc/replicator/ca.pem\"", &format!("\"{}\"", pki("ca.pem")), 1)?;
    for (i, name) in ["a", "b"].iter().enumerate() {
        t = sub(&t, &format!("\"10.0.0.{}:7789\"", i + 1), &format!("\"{}:7789\"", env.ips[i]), 1)?;
        t = sub_first(&t, "disk = \"/dev/vdb\"", &format!("disk = \"{}\"", env.disks[i].display()))?;
        t = sub(&t, &format!("\"/etc/replicator/{name}.pem\""), &format!("\"{}\"", pki(&format!("{name}.pem"))), 1)?;
        t = sub(&t, &format!("\"/etc/replicator/{name}.key\""), &format!("\"{}\"", pki(&format!("{name}.key"))), 1)?;
    }
    // Both "hosts" share one /run: each node's control socket is its own.
    let ctl = |name: &str| env.dir.join(format!("{name}.ctl")).display().to_string();
    t = sub(&t, "control = \"/run/replicator/mail.ctl\"", &format!("control = \"{}\"", ctl("a")), 1)?;
    let b_key = format!("key = \"{}\"\n", pki("b.key"));
    sub(&t, &b_key, &format!("{b_key}control = \"{}\"\n", ctl("b")), 1)
}

fn cluster_config(env: &Env) -> Result<String> {
    let text = readme_block(&["[cluster]", "[[group]]"])?;
    let mut t = sub(&text, "\"/etc/clusterd/authkey\"", &format!("\"{}\"", env.key_file.display()), 1)?;
    t = sub(&t, "\"/etc/clusterd/ca.crt\"", &format!("\"{}\"", env.pki.join("ca.pem").display()), 1)?;
    for (i, name) in NAMES.iter().enumerate() {
        let ip = env.ips[i];
        // One test network: the second heartbeat path is a second port.
        t = sub(&t, &format!("\"10.0.0.{}:694\"", i + 1), &format!("\"{ip}:694\""), 1)?;
        t = sub(&t, &format!("\"10.1.0.{}:694\"", i + 1), &format!("\"{ip}:695\""), 1)?;
        let raft = format!("raft = \"10.0.0.{}:7790\"", i + 1);
        let paths = format!(
            "raft = \"{ip}:7790\"\ncert = \"{}\"\nkey = \"{}\"\nstate_dir = \"{}\"\ncontrol = \"{}\"",
            env.pki.join(format!("{name}.pem")).display(),
            env.pki.join(format!("{name}.key")).display(),
            env.dir.join(format!("state-{name}")).display(),
            env.dir.join(format!("clusterd-{name}.sock")).display(),
        );
        t = sub(&t, &raft, &paths, 1)?;
    }
    // The fence device: IPMI there, the namespace's "power" here.
    t = sub(&t, "agent = \"/usr/sbin/fence_ipmilan\"", &format!("agent = \"{}\"", agent("fence_netns").display()), 1)?;
    t = sub(
        &t,
        "password_script = \"/etc/clusterd/ipmi-pw\" }",
        &format!("password_script = \"/etc/clusterd/ipmi-pw\", netns = \"{}\" }}", env.netns[0]),
        1,
    )?;
    t = sub(&t, "volume = \"mail\"", &format!("volume = \"{}\"", env.res.display()), 1)?;
    t = sub(&t, "directory = \"/srv/mail\"", &format!("directory = \"{}\"", mail_dir(&env.dir).display()), 1)?;
    t = sub(&t, "\"10.0.0.100/24\"", &format!("\"{}/24\"", env.service_ip), 1)?;
    t = sub(&t, "\"/usr/lib/ocf/resource.d/appliance/mta\"", &format!("\"{}\"", agent_dir().join("mta").display()), 1)?;
    t = sub(&t, "\"/etc/mta/mta.toml\"", &format!("\"{}\"", env.dir.join("mta.toml").display()), 1)?;
    t = sub(&t, "\"10.0.0.100:25\"", &format!("\"{}:25\"", env.service_ip), 1)?;
    std::fs::write(env.dir.join("mta.toml"), mta_config(&mail_dir(&env.dir))?)?;
    Ok(t)
}

fn mta(config: &Path, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut c = cmd(workspace_bin("mta", "MTA_BIN"), ["-c".as_ref(), config.as_os_str()]);
    c.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    c.stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
    let mut child = c.spawn()?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("mta {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Fills the new filesystem (mounted at `mnt`): the TLS certificate, the
/// domain and alice, with README's MTA configuration.
fn prepare(mnt: &Path) -> Result<()> {
    let dir = mnt.parent().and_then(Path::parent).context("test dir")?;
    let pki = tests::tls::make_pki(&dir.join("mta-pki"))?;
    std::fs::create_dir_all(mnt.join("tls"))?;
    std::fs::copy(&pki.server_cert, mnt.join("tls/cert.pem"))?;
    std::fs::copy(&pki.server_key, mnt.join("tls/key.pem"))?;
    let user = service_user();
    let owned = run_output(
        cmd("chown", [format!("{user}:"), "tls/cert.pem".into(), "tls/key.pem".into()]).current_dir(mnt),
        Duration::from_secs(10),
    )?;
    if !owned.success() {
        bail!("chown: {}", owned.describe());
    }
    let config = dir.join("mta-prepare.toml");
    std::fs::write(&config, mta_config(mnt)?)?;
    mta(&config, &["domain", "add", "example.org"], None)?;
    mta(&config, &["user", "add", MAILBOX], Some("alice-secret-password\n"))
}

/// One message carrying `token`, over plain SMTP; Ok only on the 250 for
/// the message itself.
fn submit(addr: SocketAddr, token: u64) -> Result<()> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut expect = |code: &str| -> Result<()> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                bail!("closed waiting for {code}");
            }
            if !line.starts_with(code) {
                bail!("expected {code}, got {line:?}");
            }
            if line.as_bytes().get(3) == Some(&b' ') {
                return Ok(());
            }
        }
    };
    expect("220")?;
    w.write_all(b"EHLO client.example\r\n")?;
    expect("250")?;
    w.write_all(b"MAIL FROM:<sender@elsewhere.example>\r\n")?;
    expect("250")?;
    w.write_all(format!("RCPT TO:<{MAILBOX}>\r\n").as_bytes())?;
    expect("250")?;
    w.write_all(b"DATA\r\n")?;
    expect("354")?;
    w.write_all(
        format!(
            "From: <sender@elsewhere.example>\r\nTo: <{MAILBOX}>\r\nDate: Tue, 08 Dec 2026 05:00:00 +0000\r\n\
             Message-ID: <m{token}@client.example>\r\nSubject: failover test\r\n\r\ntok-{token}-end\r\n.\r\n"
        )
        .as_bytes(),
    )?;
    expect("250")?;
    let _ = w.write_all(b"QUIT\r\n");
    Ok(())
}

/// Submitters in parallel: a session stuck on a dying server (until its
/// 5 s read timeout) must not hide the survivor's first 250.
const SUBMITTERS: usize = 3;

/// Submits tokens until stopped ([`SUBMITTERS`] sessions at a time);
/// records each acknowledged one with the time its 250 arrived.
struct Client {
    stop: Arc<AtomicBool>,
    /// Token, when its session started, when its 250 arrived.
    acked: Arc<Mutex<Vec<(u64, Instant, Instant)>>>,
    sent: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Client {
    fn start(addr: SocketAddr) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = (0..SUBMITTERS)
            .map(|_| {
                let (s, a, n) = (stop.clone(), acked.clone(), sent.clone());
                thread::spawn(move || {
                    while !s.load(Ordering::SeqCst) {
                        let token = n.fetch_add(1, Ordering::SeqCst);
                        let began = Instant::now();
                        if submit(addr, token).is_ok() {
                            a.lock().unwrap_or_else(|p| p.into_inner()).push((token, began, Instant::now()));
                        }
                        // Pacing, not synchronisation: about 10 messages a
                        // second per submitter.
                        thread::sleep(Duration::from_millis(100));
                    }
                })
            })
            .collect();
        Client { stop, acked, sent, threads }
    }

    /// The first acknowledgement in a session that began after `t` (an
    /// answer already on its way from a host that dies at `t` does not count).
    fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        self.acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, began, _)| *began > t)
            .map(|(_, _, at)| *at)
            .min()
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(t, _, _)| *t).collect()
    }
}

/// Whether a replicator is writable: Primary with I/O not suspended.
fn writable(res: &Path, node: &str) -> bool {
    let Ok(out) =
        run_output(replicator().args(["status", "--json"]).arg(res).args(["--node", node]), Duration::from_secs(5))
    else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&out.stdout)
        .is_ok_and(|v| v["state"]["role"] == "Primary" && v["state"]["suspended"] == false)
}

/// Reads both replicators every [`SAMPLE_INTERVAL`]; a violation is `a`
/// writable before and after `b` was seen writable (or the reverse).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Sampler {
    fn start(res: PathBuf) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || {
            let (mut samples, mut violations) = (0u64, Vec::new());
            let t0 = Instant::now();
            let mut next = Instant::now();
            while !s.load(Ordering::SeqCst) {
                samples += 1;
                for (x, y) in [("a", "b"), ("b", "a")] {
                    if writable(&res, x) && writable(&res, y) && writable(&res, x) {
                        violations.push(format!("{:.2} s: {x} and {y} both writable", t0.elapsed().as_secs_f64()));
                    }
                }
                next += SAMPLE_INTERVAL;
                let now = Instant::now();
                if next > now {
                    thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            (samples, violations)
        });
        Sampler { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

/// Tokens in alice's Maildir on storage node `i` (read in its clusterd's
/// mount namespace, where the filesystem is mounted), with their counts.
fn delivered(c: &Cluster, i: usize) -> Result<HashMap<u64, usize>> {
    let pid = c.daemons[i].as_ref().context("clusterd running")?.child.id();
    let maildir = mail_dir(&c.dir).join("mailboxes/example.org/alice");
    let out = run_output(
        cmd("nsenter", [format!("--mount=/proc/{pid}/ns/mnt"), "grep".into(), "-rhoa".into(), "tok-[0-9]*-end".into()])
            .arg(&maildir),
        Duration::from_secs(60),
    )?;
    // grep exits 1 when nothing matched.
    if !out.success() && !out.stdout.is_empty() {
        bail!("reading {}: {}", maildir.display(), out.describe());
    }
    let mut counts = HashMap::new();
    for t in out.stdout.lines().filter_map(|l| l.strip_prefix("tok-")?.strip_suffix("-end")?.parse::<u64>().ok()) {
        *counts.entry(t).or_insert(0) += 1;
    }
    Ok(counts)
}

/// Storage node `i` is an UpToDate secondary, connected to its peer.
fn rejoined(c: &Cluster, i: usize) -> bool {
    c.pair.state(i).is_ok_and(|s| s["role"] == "Secondary" && s["disk"] == "UpToDate" && s["connection"] == "Connected")
}

/// Healthy again: both disks in sync and recorded UpToDate in the log,
/// every node online, the returning one with quorum.
fn settled(c: &Cluster, p: usize) -> Result<()> {
    c.pair.wait_in_sync(Duration::from_secs(60))?;
    wait_until(Duration::from_secs(30), "every node online and both disks UpToDate in the log", || {
        c.status(2).is_ok_and(|s| {
            s["nodes"].as_array().is_some_and(|n| n.iter().all(|n| n["state"] == "online"))
                && s["groups"][0]["disks"].as_array().is_some_and(|d| d.iter().all(|d| d["state"] == "UpToDate"))
        }) && c.status(p).is_ok_and(|s| s["quorum"] == true)
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.describe()))
}

/// A host that died (or was fenced) boots again: link up, replicator,
/// clusterd. Returns when its processes run.
fn boot(c: &mut Cluster, p: usize) -> Result<Instant> {
    c.kill_host(p);
    c.revive_link(p)?;
    let t = Instant::now();
    c.pair.start(p)?;
    c.start(p)?;
    Ok(t)
}

/// Every running daemon's whole log, in files next to the test directory
/// (which is removed): for failures. Returns where.
fn dump_logs(c: &Cluster, event: usize) -> String {
    let base = std::env::temp_dir().join(format!("failover_readme-{}-event{event}", std::process::id()));
    for (i, name) in NAMES.iter().enumerate() {
        if let Some(d) = &c.daemons[i] {
            let _ = std::fs::write(base.with_extension(format!("clusterd-{name}.log")), d.logs.text());
        }
        if i < 2 {
            if let Some(n) = &c.pair.nodes[i] {
                let _ = std::fs::write(base.with_extension(format!("replicator-{name}.log")), n.logs.text());
            }
        }
    }
    format!("{}.*.log", base.display())
}

fn stats(name: &str, times: &[Duration]) {
    let mut t = times.to_vec();
    t.sort();
    if let (Some(median), Some(max)) = (t.get(t.len() / 2), t.last()) {
        eprintln!(
            "{name}: {} events, failover (event -> first 250 from the survivor) median {:.2} s, max {:.2} s; all: {:?}",
            t.len(),
            median.as_secs_f64(),
            max.as_secs_f64(),
            t.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>()
        );
    }
}

/// Without root too: README.md still has the three example blocks, every
/// substitution the e2e test makes still matches, and the results are
/// valid TOML naming what the harness assigned.
#[test]
fn readme_examples_are_there_and_every_substitution_matches() {
    let dir = TestDir::new("readme-parse");
    let env = Env {
        dir: dir.path().to_owned(),
        pki: dir.join("pki"),
        key_file: dir.join("authkey"),
        ips: ["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap(), "192.0.2.3".parse().unwrap()],
        netns: ["ns-a".into(), "ns-b".into(), "ns-w".into()],
        service_ip: "192.0.2.100".parse().unwrap(),
        res: dir.join("mail.toml"),
        disks: [dir.join("a.img"), dir.join("b.img")],
    };
    let resource: toml::Value = toml::from_str(&resource_config(&env).unwrap()).unwrap();
    assert_eq!(resource["resource"]["fencing"].as_str(), Some("resource-and-stonith"));
    let nodes = resource["node"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["name"].as_str(), Some(NAMES[i]), "the resource's nodes are the cluster's storage nodes");
        assert_eq!(n["address"].as_str(), Some(format!("{}:7789", env.ips[i]).as_str()));
        assert!(n["control"].as_str().is_some_and(|c| c.starts_with(&env.dir.display().to_string())));
    }
    let cluster: toml::Value = toml::from_str(&cluster_config(&env).unwrap()).unwrap();
    let nodes = cluster["node"].as_array().unwrap();
    assert_eq!(nodes.iter().filter_map(|n| n["name"].as_str()).collect::<Vec<_>>(), NAMES);
    for n in nodes {
        for key in ["cert", "key", "state_dir", "control"] {
            assert!(n[key].as_str().is_some_and(|p| p.starts_with(&env.dir.display().to_string())), "{key} in {n}");
        }
    }
    let group = &cluster["group"][0];
    assert_eq!(group["volume"].as_str(), Some(env.res.display().to_string().as_str()));
    let kinds: Vec<&str> = group["resource"].as_array().unwrap().iter().filter_map(|r| r["kind"].as_str()).collect();
    assert_eq!(kinds, ["attach", "filesystem", "ip", "ocf"], "README's group: attach -> filesystem -> ip -> mta");
    let mta: toml::Value = toml::from_str(&std::fs::read_to_string(dir.join("mta.toml")).unwrap()).unwrap();
    assert_eq!(mta["data_dir"].as_str(), Some(mail_dir(dir.path()).display().to_string().as_str()));
}

/// The whole issue-23 scenario: 10 host deaths and 5 partitions of the
/// primary, interleaved.
#[test]
fn readme_configuration_fails_over_by_itself_through_host_deaths_and_partitions() {
    scenario(HOST_DEATHS, PARTITIONS);
}

fn scenario(deaths: usize, partitions: usize) {
    if !have_root("network namespaces, loop devices, FUSE") || !have_tools(&["nsenter", "mkfs.ext4", "iptables"]) {
        return;
    }
    if !Path::new("/dev/fuse").exists() && !tests::skip("/dev/fuse missing") {
        return;
    }
    // The README's blocks exist before anything is built.
    readme_block(&["[cluster]", "[[group]]"]).unwrap();
    readme_block(&["[resource]", "fencing = \"resource-and-stonith\""]).unwrap();
    readme_block(&["data_dir = \"/srv/mail\"", "[[listener]]"]).unwrap();

    let dir = TestDir::new("readme");
    std::fs::create_dir_all(mail_dir(dir.path())).unwrap();
    let mut c = Cluster::with_config(
        &dir,
        &CustomConfig { resource: resource_config, cluster: cluster_config, mkfs: true, prepare: Some(prepare) },
    )
    .unwrap();
    let out = c.ctl(0, &["check-config"]).unwrap();
    assert!(out.success(), "clusterd check-config on the README's configuration: {}", out.describe());
    c.start_all().unwrap();
    let service = SocketAddr::from((c.service_ip, 25));
    let mut p = c.wait_group(Duration::from_secs(90)).unwrap();
    wait_until(Duration::from_secs(30), "the MTA to answer 250 on the service address", || {
        submit(service, u64::MAX).is_ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.describe()));

    let sampler = Sampler::start(c.pair.res.clone());
    let client = Client::start(service);
    let mut death_times = Vec::new();
    let mut cut_times = Vec::new();
    let mut fenced_partitions = 0;
    let mut slow_rejoins = Vec::new();
    let started = Instant::now();
    for event in 0..deaths + partitions {
        // Every third event a partition while there are any left.
        let partition = event % 3 == 2 && event / 3 < partitions;
        let q = 1 - p;
        // Mail flows before the event.
        let before = Instant::now();
        wait_until(Duration::from_secs(30), "mail acknowledged before the event", || {
            client.first_ack_after(before).is_some()
        })
        .unwrap_or_else(|e| panic!("event {event}: {e}\n{}", c.describe()));
        let mut t0 = Instant::now();
        if partition {
            let (hp, hq, hw) = (c.pair.net.host(p), c.pair.net.host(q), c.pair.net.host(2));
            hp.cut(hq).unwrap();
            hp.cut(hw).unwrap();
            // The partition is complete once both cuts are in (iptables can
            // take seconds on a busy machine); the time counts from there.
            eprintln!("event {event}: cutting {} took {:.2} s", NAMES[p], t0.elapsed().as_secs_f64());
            t0 = Instant::now();
        } else {
            // The link goes down first, then every process dies.
            c.host_death(p).unwrap();
        }
        let mut first = None;
        wait_until(FAILOVER_DEADLINE, "the survivor to answer 250 on the service address", || {
            first = client.first_ack_after(t0);
            first.is_some() && c.runs_group(q)
        })
        .unwrap_or_else(|e| {
            panic!(
                "event {event} ({} of {}): no failover without an admin command: {e}\n{}",
                if partition { "partition" } else { "death" },
                NAMES[p],
                c.describe()
            )
        });
        let took = first.map(|f| f - t0).unwrap_or_default();
        eprintln!(
            "event {event}: {} of {} -> {} served mail after {:.2} s",
            if partition { "partition" } else { "death" },
            NAMES[p],
            NAMES[q],
            took.as_secs_f64()
        );
        let back = if partition {
            let (hp, hq, hw) = (c.pair.net.host(p), c.pair.net.host(q), c.pair.net.host(2));
            hp.heal(hq).unwrap();
            hp.heal(hw).unwrap();
            cut_times.push(took);
            // Fenced while cut off (README fences `a`): it boots again.
            let alive = c.daemons[p].as_mut().is_some_and(|d| d.is_running());
            if alive {
                Instant::now()
            } else {
                fenced_partitions += 1;
                boot(&mut c, p).unwrap()
            }
        } else {
            death_times.push(took);
            boot(&mut c, p).unwrap()
        };
        // Measured up to a minute (for the numbers), asserted against
        // REJOIN_DEADLINE at the end.
        let rejoin =
            wait_until(Duration::from_secs(60), "the old primary to be an UpToDate secondary", || rejoined(&c, p));
        let rejoin_took = back.elapsed();
        if let Err(e) = rejoin {
            let logs = dump_logs(&c, event);
            panic!("event {event}: {} after its return: {e} (full logs: {logs})\n{}", NAMES[p], c.describe());
        }
        eprintln!(
            "event {event}: {} an UpToDate secondary {:.2} s after its return",
            NAMES[p],
            rejoin_took.as_secs_f64()
        );
        if rejoin_took > REJOIN_DEADLINE {
            slow_rejoins.push(format!(
                "event {event} ({}): {:.2} s (logs: {})",
                if partition { "partition" } else { "death" },
                rejoin_took.as_secs_f64(),
                dump_logs(&c, event)
            ));
        }
        settled(&c, p).unwrap_or_else(|e| panic!("event {event}: {e}"));
        p = q;
    }
    let elapsed = started.elapsed();
    let sent = client.sent.load(Ordering::SeqCst);
    let acked = client.finish();
    let (samples, violations) = sampler.finish();
    stats("host deaths", &death_times);
    stats("partitions of the primary", &cut_times);
    eprintln!(
        "{} events in {:.0} s; {sent} messages tried, {} acknowledged; {samples} samples of both replicators; {fenced_partitions} partitions ended in a fence",
        deaths + partitions,
        elapsed.as_secs_f64(),
        acked.len()
    );
    assert!(violations.is_empty(), "two writable primaries: {violations:?}");
    assert!(
        slow_rejoins.is_empty(),
        "old primaries not UpToDate secondaries within {REJOIN_DEADLINE:?}: {slow_rejoins:?}"
    );
    assert!(samples > elapsed.as_millis() as u64 / 1000, "the sampler ran ({samples} samples)");

    // Every acknowledged token delivered exactly once (delivery from the
    // queue to the Maildir may lag the 250).
    let p = c.wait_group(Duration::from_secs(30)).unwrap();
    let mut counts = HashMap::new();
    let all_there = wait_until(Duration::from_secs(60), "every acknowledged token in the mailbox", || {
        counts = delivered(&c, p).unwrap_or_default();
        acked.iter().all(|t| counts.contains_key(t))
    });
    let missing: Vec<&u64> = acked.iter().filter(|t| !counts.contains_key(t)).collect();
    assert!(all_there.is_ok(), "{} acknowledged tokens lost: {:?}", missing.len(), &missing[..missing.len().min(20)]);
    let twice: Vec<(&u64, &usize)> = counts.iter().filter(|(t, n)| **n > 1 && **t != u64::MAX).collect();
    assert!(twice.is_empty(), "tokens delivered more than once: {twice:?}");
}
