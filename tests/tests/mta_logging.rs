//! What the mta logs for an admin to grep (issue 20): one Postfix-style
//! line per recipient and delivery attempt, with the queue id, the relay,
//! the delay and the status, and a line naming the queue id of a bounce.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use tests::mta::Mta;
use tests::mta_pair::{sender, submit, Route};
use tests::{require_tools, wait_until};

/// A loopback port nothing listens on (bound, then closed at once).
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The log lines containing `needle`.
fn lines_with(mta: &Mta, needle: &str) -> Vec<String> {
    mta.log().lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
}

/// The queue id that starts the Postfix-style part of `line` (`ID: to=<`).
fn queue_id(line: &str) -> String {
    let head = line.split(": to=<").next().unwrap();
    head.rsplit(' ').next().unwrap().to_string()
}

/// The number after `delay=` parses as seconds.
fn assert_delay(line: &str) {
    let delay = line.split("delay=").nth(1).and_then(|r| r.split(',').next()).unwrap();
    assert!(delay.parse::<f64>().is_ok_and(|d| d >= 0.0), "{line}");
}

// A local copy is logged as sent to relay=local; a remote recipient whose
// relay host refuses the connection as deferred, with that host and the
// reason; both under the same queue id, one line each.
#[test]
fn delivery_lines_carry_queue_id_recipient_relay_delay_and_status() {
    require_tools!("swaks");
    let relay = closed_port();
    let a = sender("mta-log-deferred", Route::Relay(relay), "").unwrap();
    let mta = a.serve().unwrap();
    submit(&mta, "bob@example.org,x@remote.example", "logged").unwrap();
    wait_until(Duration::from_secs(30), "a status=deferred line", || !lines_with(&mta, "status=deferred").is_empty())
        .unwrap();

    let sent = lines_with(&mta, "to=<bob@example.org>");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].contains(": to=<bob@example.org>, relay=local, delay="), "{}", sent[0]);
    assert!(sent[0].ends_with(", status=sent (delivered to maildir)"), "{}", sent[0]);
    assert_delay(&sent[0]);

    let deferred = lines_with(&mta, "to=<x@remote.example>");
    assert_eq!(deferred.len(), 1, "{deferred:?}");
    let relay_field = format!(", relay=127.0.0.1[127.0.0.1]:{}, delay=", relay.port());
    assert!(deferred[0].contains(&relay_field), "{}", deferred[0]);
    assert!(deferred[0].contains(", status=deferred (") && deferred[0].ends_with(')'), "{}", deferred[0]);
    assert_delay(&deferred[0]);
    let id = queue_id(&sent[0]);
    assert!(!id.is_empty());
    assert_eq!(queue_id(&deferred[0]), id);
    assert!(a.admin(&["queue", "list"]).unwrap().stdout.starts_with(&format!("{id}\t")));
}

// With a queue lifetime of 0 the refused relay's temporary failure bounces
// at once: status=bounced with the reason, a line naming the bounce's own
// queue id, and that bounce's delivery to the sender under the new id.
#[test]
fn bounced_recipients_and_the_bounce_queue_id_are_logged() {
    require_tools!("swaks");
    let relay = closed_port();
    let a = sender("mta-log-bounced", Route::Relay(relay), "queue_lifetime_secs = 0").unwrap();
    let mta = a.serve().unwrap();
    submit(&mta, "x@remote.example", "bounced").unwrap();
    wait_until(Duration::from_secs(30), "the bounce's delivery", || {
        !lines_with(&mta, "to=<alice@example.org>, relay=local").is_empty()
    })
    .unwrap();

    let bounced = lines_with(&mta, "to=<x@remote.example>");
    assert_eq!(bounced.len(), 1, "{bounced:?}");
    let relay_field = format!(", relay=127.0.0.1[127.0.0.1]:{}, delay=", relay.port());
    assert!(bounced[0].contains(&relay_field), "{}", bounced[0]);
    assert!(bounced[0].contains(", status=bounced (delivery time expired: "), "{}", bounced[0]);
    let id = queue_id(&bounced[0]);

    let notice = lines_with(&mta, ": sender non-delivery notification: ");
    assert_eq!(notice.len(), 1, "{notice:?}");
    let (head, bounce_id) = notice[0].split_once(": sender non-delivery notification: ").unwrap();
    assert!(head.ends_with(&format!(" {id}")), "{}", notice[0]);
    assert_ne!(bounce_id, id);
    let delivered = lines_with(&mta, "to=<alice@example.org>, relay=local");
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(queue_id(&delivered[0]), bounce_id);
    assert!(delivered[0].ends_with("status=sent (delivered to maildir)"), "{}", delivered[0]);
}

// `log_to = "syslog"`: events leave as RFC 3164 datagrams, facility mail,
// on the configured socket (a stand-in for /dev/log here); the start-up
// lines stay on stderr for the supervisor.
#[test]
fn syslog_output_sends_rfc3164_datagrams_to_the_socket() {
    require_tools!("swaks");
    let path = std::env::temp_dir().join(format!("mta-syslog-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let daemon = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    daemon.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let extra = format!("log_to = \"syslog\"\nsyslog_socket = \"{}\"", path.display());
    let tree = tests::mta::MailTree::new("mta-syslog", &extra, None).unwrap();
    tree.populate().unwrap();
    let check = tree.admin(&["check-config"]).unwrap().stdout;
    assert!(check.contains(&format!("log: syslog {} (facility mail)\n", path.display())), "{check}");
    let mta = tree.serve().unwrap();
    assert!(mta.log().contains(&format!("mta: logging to syslog {}", path.display())), "{}", mta.log());
    let out = tests::mta::swaks(mta.mx(), &["--from", "someone@remote.example", "--to", "bob@example.org"]).unwrap();
    assert!(out.success(), "{}", out.describe());

    let mut buf = vec![0u8; 16384];
    let delivered = loop {
        let n = daemon.recv(&mut buf).expect("a delivery record within 30 s");
        let record = String::from_utf8_lossy(&buf[..n]).into_owned();
        if record.contains(": to=<bob@example.org>, relay=local, ") {
            break record;
        }
    };
    // mail.info = 2 * 8 + 6.
    assert!(delivered.starts_with("<22>"), "{delivered}");
    assert!(delivered.contains(&format!(" mta[{}]: INFO ", mta.pid())), "{delivered}");
    assert!(delivered.ends_with("status=sent (delivered to maildir)"), "{delivered}");
    assert!(!mta.log().contains("status=sent"), "events must not go to stderr too: {}", mta.log());
    drop(mta);
    let _ = std::fs::remove_file(&path);
}
