//! The `mta` binary's durability and process hygiene: kill -9 during a
//! stream of submissions loses no acknowledged message; chroot and
//! privilege drop, with Dovecot reading the delivered Maildir; start-up
//! refusals and `check-config`.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use tests::mta::{read_maildir_new, swaks, MailTree};
use tests::server::Daemon;
use tests::{cmd, have_root, require_tools, run, run_output, wait_until};

const STREAM_SCRIPT: &str = r#"
import smtplib, sys
host, port = sys.argv[1], int(sys.argv[2])
s = smtplib.SMTP(host, port, timeout=30)
s.ehlo("crash.test")
for i in range(100000):
    token = "tok-%06d" % i
    msg = "From: x@remote.example\r\nSubject: %s\r\nX-Token: %s\r\n\r\nbody of %s\r\n" % (token, token, token)
    try:
        s.sendmail("x@remote.example", ["alice@example.org"], msg)
    except Exception as e:
        print("STOPPED", type(e).__name__, flush=True)
        break
    print("ACK", token, flush=True)
"#;

fn tokens_in(messages: &[Vec<u8>]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in messages {
        let text = String::from_utf8_lossy(m);
        if let Some(line) = text.lines().find(|l| l.starts_with("X-Token: ")) {
            *seen.entry(line["X-Token: ".len()..].to_string()).or_insert(0) += 1;
        }
    }
    seen
}

// Every 250 is durable: after SIGKILL and restart, each acknowledged
// message is delivered exactly once (issue 20: a restart after the
// Maildir write but before the queue update used to deliver it again).
#[test]
fn kill_9_during_submissions_loses_no_acknowledged_message() {
    require_tools!("python3");
    let tree = MailTree::new("mta-crash", "", None).unwrap();
    tree.populate().unwrap();
    let mut mta = tree.serve().unwrap();
    let addr = mta.mx();
    let mut client = cmd("python3", ["-c", STREAM_SCRIPT, &addr.ip().to_string(), &addr.port().to_string()]);
    client.env("PYTHONUNBUFFERED", "1");
    let mut client = Daemon::spawn(client).unwrap();
    let acks = |d: &Daemon| d.logs.lines().iter().filter(|l| l.starts_with("ACK ")).count();
    wait_until(Duration::from_secs(60), "40 acknowledged messages", || acks(&client) >= 40).unwrap();

    mta.daemon.child.kill().unwrap();
    mta.daemon.child.wait().unwrap();
    wait_until(Duration::from_secs(30), "the client to notice", || !client.is_running()).unwrap();
    let acked: Vec<String> =
        client.logs.lines().iter().filter_map(|l| l.strip_prefix("ACK ").map(str::to_string)).collect();
    assert!(acked.len() >= 40);

    let restarted = tree.serve().unwrap();
    assert!(!restarted.log().contains("failed"), "{}", restarted.log());
    let mut seen = HashMap::new();
    let done = wait_until(Duration::from_secs(60), "every acknowledged message in the Maildir", || {
        // kill -9 may leave one partial file in tmp/ per delivery in flight.
        seen = tokens_in(&read_maildir_new(&tree.maildir("alice@example.org")).unwrap_or_default());
        acked.iter().all(|t| seen.contains_key(t))
    });
    let missing: Vec<&String> = acked.iter().filter(|t| !seen.contains_key(*t)).collect();
    assert!(
        done.is_ok(),
        "{} acknowledged messages missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for (token, n) in &seen {
        assert_eq!(*n, 1, "{token} delivered {n} times");
    }
    assert_eq!(std::fs::read_dir(tree.data.join("queue/incoming")).unwrap().count(), 0, "partial queue files left");
}

fn numeric_id(flag: &str, user: &str) -> u32 {
    let out = run(&mut cmd("id", [flag, user])).unwrap();
    out.stdout.trim().parse().unwrap()
}

fn proc_ids(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().skip(1).map(|s| s.parse().unwrap()).collect()
}

// Bind as root, then chroot into the mail tree and run as `nobody`;
// Dovecot (as the same user) reads what was delivered.
#[test]
fn chroot_and_privilege_drop_then_dovecot_reads_the_mail() {
    if !have_root("chroot and setuid") {
        return;
    }
    require_tools!("swaks", "doveadm");
    let tree = MailTree::new("mta-chroot", "", Some("user = \"nobody\"\nchroot = true")).unwrap();
    tree.populate().unwrap();
    let mta = tree.serve().unwrap();
    let (uid, gid) = (numeric_id("-u", "nobody"), numeric_id("-g", "nobody"));
    assert_eq!(proc_ids(mta.pid(), "Uid:"), vec![uid; 4]);
    assert_eq!(proc_ids(mta.pid(), "Gid:"), vec![gid; 4]);
    let root = std::fs::read_link(format!("/proc/{}/root", mta.pid())).unwrap();
    assert_eq!(root, tree.data);
    assert!(mta.log().contains("reload on SIGHUP disabled"), "{}", mta.log());

    let out =
        swaks(mta.mx(), &["--from", "x@remote.example", "--to", "alice@example.org", "--header", "Subject: chrooted"])
            .unwrap();
    assert!(out.success(), "{}", out.describe());
    tree.wait_messages("alice@example.org", 1, Duration::from_secs(20)).unwrap();

    let home = tree.dir.join("dovecot-home");
    std::fs::create_dir_all(&home).unwrap();
    run(&mut cmd("chown", ["nobody", home.to_str().unwrap()])).unwrap();
    let conf = tree.dir.join("dovecot.conf");
    std::fs::write(
        &conf,
        format!(
            "ssl = no\nbase_dir = {0}/dovecot-run\nstate_dir = {0}/dovecot-state\nlog_path = /dev/stderr\n",
            tree.dir.path().display()
        ),
    )
    .unwrap();
    let maildir = tree.maildir("alice@example.org");
    let mut c = Command::new("doveadm");
    c.env("USER", "alice@example.org").env("HOME", &home).args([
        "-c",
        conf.to_str().unwrap(),
        "-o",
        &format!("mail_uid={uid}"),
        "-o",
        &format!("mail_gid={gid}"),
        "-o",
        "first_valid_uid=1",
        "-o",
        &format!("mail_location=maildir:{}", maildir.display()),
        "fetch",
        "hdr.subject hdr.from",
        "all",
    ]);
    let out = run_output(&mut c, Duration::from_secs(60)).unwrap();
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("hdr.subject: chrooted"), "{}", out.describe());
    assert!(out.stdout.contains("hdr.from: x@remote.example"), "{}", out.describe());
}

#[test]
fn root_without_a_service_user_is_refused() {
    if !have_root("start as root") {
        return;
    }
    let tree = MailTree::new("mta-rootref", "", Some("chroot = true")).unwrap();
    let out = run_output(&mut tree.mta(["serve"]), Duration::from_secs(30)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("refusing to run as root"), "{}", out.describe());
    let out = run_output(&mut tree.mta(["check-config"]), Duration::from_secs(30)).unwrap();
    assert!(!out.success(), "{}", out.describe());
}

#[test]
fn check_config_describes_listeners_and_rejects_unknown_keys() {
    let tree = MailTree::new("mta-check", "", None).unwrap();
    let out = tree.admin(&["check-config"]).unwrap();
    assert!(out.stdout.contains("(submission): STARTTLS required, then AUTH PLAIN/LOGIN required"), "{}", out.stdout);
    assert!(out.stdout.contains("(submissions): implicit TLS"), "{}", out.stdout);
    assert!(out.stdout.contains("(mx): STARTTLS offered, no AUTH"), "{}", out.stdout);
    assert!(out.stdout.contains("config ok"), "{}", out.stdout);

    let text = std::fs::read_to_string(&tree.config).unwrap();
    std::fs::write(&tree.config, format!("open_relay = true\n{text}")).unwrap();
    let out = run_output(&mut tree.mta(["check-config"]), Duration::from_secs(30)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.starts_with("mta: invalid config file"), "{}", out.describe());
    assert!(out.stderr.contains("open_relay"), "{}", out.describe());
}

// Passwords come from stdin or a prompt; the CLI has no password argument.
#[test]
fn user_passwords_come_from_stdin_only() {
    let tree = MailTree::new("mta-cli", "", None).unwrap();
    tree.admin(&["domain", "add", "example.org"]).unwrap();
    let out =
        run_output(&mut tree.mta(["user", "add", "carol@example.org", "--password", "x"]), Duration::from_secs(30))
            .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    let out = tree.admin_stdin(&["user", "add", "carol@example.org"], "carol-pw\n").unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list = tree.admin(&["user", "list"]).unwrap();
    assert_eq!(list.stdout, "carol@example.org\tenabled\n");
    let db = std::fs::read(tree.data.join("directory.sqlite3")).unwrap();
    assert!(!db.windows(8).any(|w| w == b"carol-pw"), "plaintext password in the database");
    let out = tree.admin_stdin(&["user", "add", "dave@elsewhere.example"], "pw\n").unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mta domain add elsewhere.example"));
}
