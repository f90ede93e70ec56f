//! Mailbox quotas (`mta user quota`): a mailbox at or over its quota is
//! refused at RCPT with 452 4.2.2 (temporary, so the sender retries); a
//! message accepted but too big for the room left waits in the queue
//! instead of being written or lost, and is delivered once there is room.
//! Usage is the size of the files in the Maildir's new/ and cur/. A
//! SIZE= declared with MAIL (RFC 1870) must fit at RCPT.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use tests::mta::{swaks, MailTree};
use tests::{require_tools, wait_until};

/// Raw SMTP: sends each line and returns each reply's first line.
fn transcript(addr: std::net::SocketAddr, lines: &[&str]) -> Vec<String> {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut reply = || {
        let mut first = String::new();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "connection closed");
            if first.is_empty() {
                first = line.trim_end().to_string();
            }
            if line.as_bytes().get(3) == Some(&b' ') {
                return first;
            }
        }
    };
    let mut out = vec![reply()];
    for l in lines {
        w.write_all(format!("{l}\r\n").as_bytes()).unwrap();
        out.push(reply());
    }
    out
}

fn send_to_bob(mta: &tests::mta::Mta, body_bytes: usize, subject: &str) -> tests::Output {
    // Lines of 76 characters (RFC 5322 allows at most 998).
    let line = format!("{}\n", "x".repeat(76));
    let body = line.repeat(body_bytes.div_ceil(77));
    swaks(
        mta.mx(),
        &[
            "--from",
            "someone@remote.example",
            "--to",
            "bob@example.org",
            "--header",
            &format!("Subject: {subject}"),
            "--body",
            &body,
        ],
    )
    .unwrap()
}

#[test]
fn over_quota_mailboxes_defer_at_delivery_and_refuse_at_rcpt() {
    require_tools!("swaks");
    let tree = MailTree::new("mta-quota", "", None).unwrap();
    tree.populate().unwrap();
    tree.admin(&["user", "quota", "bob@example.org", "3000"]).unwrap();
    let users = tree.admin(&["user", "list"]).unwrap().stdout;
    assert!(users.contains("bob@example.org\tenabled\tquota 3000 bytes"), "{users}");
    let bad = tests::run_fail(&mut tree.mta(["user", "quota", "bob@example.org", "lots"])).unwrap();
    assert!(bad.stderr.contains("200M") && bad.stderr.contains("none"), "{}", bad.stderr);
    let mta = tree.serve().unwrap();

    // ~1.4 KB fits under 3000 bytes.
    let out = send_to_bob(&mta, 1000, "first");
    assert!(out.success(), "{}", out.describe());
    tree.wait_messages("bob@example.org", 1, Duration::from_secs(20)).unwrap();

    // A declared SIZE that would not fit is refused at RCPT; a small one is not.
    let replies = transcript(
        mta.mx(),
        &[
            "EHLO quota.test",
            "MAIL FROM:<someone@remote.example> SIZE=5000",
            "RCPT TO:<bob@example.org>",
            "RSET",
            "MAIL FROM:<someone@remote.example> SIZE=100",
            "RCPT TO:<bob@example.org>",
            "QUIT",
        ],
    );
    assert_eq!(replies[3], "452 4.2.2 Mailbox full, try again later", "{replies:?}");
    assert_eq!(replies[6], "250 2.1.5 Recipient ok", "{replies:?}");

    // ~2.4 KB more does not fit: accepted (there was room at RCPT), then
    // kept in the queue with the reason, not written.
    let out = send_to_bob(&mta, 2000, "second");
    assert!(out.success(), "{}", out.describe());
    let mut listing = String::new();
    wait_until(Duration::from_secs(20), "a deferred entry for bob", || {
        listing = tree.admin(&["queue", "list"]).map(|o| o.stdout).unwrap_or_default();
        listing.contains("attempts 1")
    })
    .unwrap_or_else(|e| panic!("{e}: {listing}"));
    assert!(listing.contains("bob@example.org") && listing.contains("mailbox full: "), "{listing}");
    assert!(listing.contains("of 3000 bytes used"), "{listing}");
    assert_eq!(tree.messages("bob@example.org").unwrap().len(), 1);

    // Now at or over quota: refused at RCPT with a temporary code.
    tree.admin(&["user", "quota", "bob@example.org", "1K"]).unwrap();
    let out = send_to_bob(&mta, 10, "third");
    assert!(!out.success());
    assert!(out.stdout.contains("452 4.2.2 Mailbox full"), "{}", out.describe());
    // Other mailboxes are unaffected.
    let out = swaks(mta.mx(), &["--from", "someone@remote.example", "--to", "alice@example.org"]).unwrap();
    assert!(out.success(), "{}", out.describe());

    // Room again: the queued message arrives, exactly once.
    tree.admin(&["user", "quota", "bob@example.org", "none"]).unwrap();
    tree.admin(&["queue", "flush"]).unwrap();
    // New mail wakes the delivery task (otherwise it rescans every 30 s).
    let out = swaks(mta.mx(), &["--from", "someone@remote.example", "--to", "alice@example.org"]).unwrap();
    assert!(out.success(), "{}", out.describe());
    let bob = tree.wait_messages("bob@example.org", 2, Duration::from_secs(45)).unwrap();
    assert_eq!(bob.len(), 2);
    assert!(bob.iter().any(|m| String::from_utf8_lossy(m).contains("Subject: second")));
    wait_until(Duration::from_secs(20), "an empty queue", || {
        tree.admin(&["queue", "list"]).map(|o| o.stdout == "queue empty\n").unwrap_or(false)
    })
    .unwrap();
}
