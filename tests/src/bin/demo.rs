//! The appliance on one machine (README's first command runs it through
//! scripts/demo.sh): three hosts as network namespaces — storage nodes `a`
//! and `b`, witness `w` — a replicated volume (protocol C, mutual TLS)
//! with ext4, clusterd on all three, and the mail group: attach → fsck +
//! mount → service address → the MTA (its queue, mailboxes and SQLite
//! directory on the replicated filesystem, chrooted, running as `mail`).
//! Mail goes in with swaks; the primary host is killed with SIGKILL; the
//! survivor serves the same mailboxes; the old primary returns and the
//! group moves back by plan. Set DEMO_KEEP=1 to keep the cluster running
//! at the end (Ctrl-C stops it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tests::cluster::{agent_dir, Cluster, ClusterOptions, NAMES};
use tests::server::workspace_bin;
use tests::{cmd, run_output, TestDir};

const MAILBOX: &str = "alice@example.org";

fn say(what: &str) {
    println!("\n### {what}");
}

fn mta_bin() -> PathBuf {
    workspace_bin("mta", "MTA_BIN")
}

/// The MTA's configuration with its mail tree at `data_dir`.
fn mta_config(dir: &Path, data_dir: &Path, service_ip: &str, pki: &tests::tls::Pki) -> String {
    format!(
        "hostname = \"mail.example.org\"\ndata_dir = \"{}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [[listener]]\nkind = \"mx\"\naddress = \"{service_ip}:25\"\n\n\
         [[listener]]\nkind = \"submission\"\naddress = \"{service_ip}:587\"\n\n\
         [[listener]]\nkind = \"submissions\"\naddress = \"{service_ip}:465\"\n\n\
         [privileges]\nuser = \"mail\"\nchroot = true\n\n# {}\n",
        data_dir.display(),
        pki.server_cert.display(),
        pki.server_key.display(),
        dir.display()
    )
}

/// Fills the new filesystem: the mail tree with example.org and alice.
fn prepare(mnt: &Path) -> Result<()> {
    let dir = mnt.parent().and_then(Path::parent).context("prepare dir")?;
    let config = dir.join("mta-prepare.toml");
    let mail = mnt.join("mail");
    std::fs::create_dir_all(&mail)?;
    let pki = tests::tls::make_pki(&dir.join("mta-pki"))?;
    std::fs::write(&config, mta_config(dir, &mail, "127.0.0.1", &pki))?;
    let admin = |args: &[&str], stdin: Option<&str>| -> Result<()> {
        let mut c = cmd(mta_bin(), ["-c".as_ref(), config.as_os_str()]);
        c.args(args);
        let out = match stdin {
            Some(input) => {
                use std::io::Write;
                c.stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                let mut child = c.spawn()?;
                child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
                child.wait_with_output()?
            }
            None => c.output()?,
        };
        if !out.status.success() {
            bail!("mta {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    admin(&["domain", "add", "example.org"], None)?;
    admin(&["user", "add", MAILBOX], Some("alice-secret\n"))?;
    Ok(())
}

/// Messages in alice's Maildir on storage node `i`, read inside that
/// node's mount namespace (the filesystem is mounted only there).
fn messages_on(c: &Cluster, i: usize) -> Result<usize> {
    let pid = c.daemons[i].as_ref().context("clusterd running")?.child.id();
    let maildir = c.dir.join("mnt/mail/mailboxes/example.org/alice/new");
    let out = run_output(
        cmd("nsenter", [format!("--mount=/proc/{pid}/ns/mnt"), "ls".into(), "-1".into()]).arg(&maildir),
        Duration::from_secs(10),
    )?;
    if !out.success() {
        bail!("reading {} on {}: {}", maildir.display(), NAMES[i], out.describe());
    }
    Ok(out.stdout.lines().filter(|l| !l.is_empty()).count())
}

fn send(c: &Cluster, n: usize, tag: &str) -> Result<()> {
    for k in 1..=n {
        let out = run_output(
            &mut cmd(
                "swaks",
                [
                    "--server",
                    &format!("{}:25", c.service_ip),
                    "--from",
                    "friend@elsewhere.example",
                    "--to",
                    MAILBOX,
                    "--header",
                    &format!("Subject: {tag} #{k}"),
                    "--body",
                    "Sent to the cluster's service address.",
                ],
            ),
            Duration::from_secs(30),
        )?;
        if !out.success() {
            bail!("swaks: {}", out.describe());
        }
        // The server's answer to the message itself: the last 250 (swaks
        // writes its transcript to either stream).
        let transcript = format!("{}{}", out.stdout, out.stderr);
        let queued = transcript.lines().rfind(|l| l.contains("queued as")).unwrap_or("");
        println!("  {tag} #{k}: {}", queued.trim_start_matches([' ', '<', '-', '~']));
    }
    Ok(())
}

fn wait_messages(c: &Cluster, i: usize, n: usize) -> Result<()> {
    tests::wait_until(Duration::from_secs(30), &format!("{n} messages on {}", NAMES[i]), || {
        messages_on(c, i).is_ok_and(|m| m >= n)
    })?;
    println!("  alice's Maildir on {}: {} messages", NAMES[i], messages_on(c, i)?);
    Ok(())
}

fn status(c: &Cluster, i: usize) -> Result<()> {
    print!("{}", c.ctl_ok(i, &["status"])?.stdout);
    Ok(())
}

fn main() -> Result<()> {
    let dir = TestDir::new("demo");
    say("three hosts (network namespaces): storage a and b, witness w; a 64 MiB volume replicated a<->b (protocol C, mutual TLS); ext4 on it with the MTA's mail tree");
    let config_dir = dir.path().to_owned();
    let resources = format!(
        "[[group.resource]]\nname = \"disk\"\nkind = \"attach\"\n\n\
         [[group.resource]]\nname = \"fs\"\nkind = \"filesystem\"\ndevice = \"@attach\"\ndirectory = \"@DIR@/mnt\"\nfstype = \"ext4\"\n\n\
         [[group.resource]]\nname = \"ip\"\nkind = \"ip\"\naddress = \"@SERVICE_IP@/24\"\ninterface = \"eth0\"\n\n\
         [[group.resource]]\nname = \"mta\"\nkind = \"ocf\"\nagent = \"{}\"\nmonitor_interval_ms = 2000\n\
         params = {{ config = \"@DIR@/mta.toml\", binary = \"{}\", check = \"@SERVICE_IP@:25\" }}\n",
        agent_dir().join("mta").display(),
        mta_bin().display()
    );
    let mut c =
        Cluster::new(&dir, &ClusterOptions { resources, extra: String::new(), mkfs: true, prepare: Some(prepare) })?;
    let pki = tests::tls::make_pki(&config_dir.join("mta-pki-live"))?;
    std::fs::write(
        config_dir.join("mta.toml"),
        mta_config(&config_dir, &config_dir.join("mnt/mail"), &c.service_ip.to_string(), &pki),
    )?;
    println!("  cluster configuration: {}", c.config.display());
    println!("  service address: {} (ports 25, 587, 465)", c.service_ip);

    say("clusterd on a, b and w: the cluster log elects a leader, one storage node gets the group");
    c.start_all()?;
    let t0 = Instant::now();
    let p = c.wait_group(Duration::from_secs(60))?;
    println!("  the group runs on {} ({:.1} s)", NAMES[p], t0.elapsed().as_secs_f64());
    status(&c, 2)?;

    say(&format!("5 messages for {MAILBOX} through the service address (swaks)"));
    send(&c, 5, "before the crash")?;
    wait_messages(&c, p, 5)?;

    let q = 1 - p;
    say(&format!("kill -9 of every process on host {} (the primary)", NAMES[p]));
    let t0 = Instant::now();
    c.kill_host(p);
    c.wait_group_on(q, Duration::from_secs(60))?;
    println!(
        "  {} took over in {:.1} s: volume promoted, fsck + mount, address moved, MTA started",
        NAMES[q],
        t0.elapsed().as_secs_f64()
    );
    wait_messages(&c, q, 5)?;
    status(&c, q)?;

    say("5 more messages, now served by the survivor");
    send(&c, 5, "after the crash")?;
    wait_messages(&c, q, 10)?;

    say(&format!("host {} comes back: its volume resyncs only what changed", NAMES[p]));
    c.pair.start(p)?;
    c.start(p)?;
    c.pair.wait_in_sync(Duration::from_secs(120))?;
    tests::wait_until(Duration::from_secs(30), "the cluster log to record both disks UpToDate", || {
        c.status(2).is_ok_and(|s| {
            s["groups"][0]["disks"].as_array().is_some_and(|d| d.iter().all(|d| d["state"] == "UpToDate"))
        })
    })?;
    println!("  replicas in sync; the cluster log records both disks UpToDate");

    say(&format!("planned move back to {} (clusterd move mail {})", NAMES[p], NAMES[p]));
    print!("{}", c.ctl_ok(q, &["move", "mail", NAMES[p]])?.stdout);
    c.wait_group_on(p, Duration::from_secs(60))?;
    wait_messages(&c, p, 10)?;
    status(&c, p)?;

    println!("\ndemo finished: no accepted mail was lost across a crash and a move.");
    if std::env::var_os("DEMO_KEEP").is_some() {
        println!(
            "DEMO_KEEP is set: the cluster keeps running; `{} status --config {} --node a`; Ctrl-C ends it.",
            tests::cluster::clusterd_bin().display(),
            c.config.display()
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}
