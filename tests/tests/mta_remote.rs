//! Remote delivery between two `mta` instances: A relays an authenticated
//! user's mail to B (as its relay host) over opportunistic STARTTLS; B's
//! 550 for an unknown user comes back to the sender as a DSN.

use std::time::Duration;

use tests::mta::{read_maildir, swaks, MailTree};
use tests::{require_tools, wait_until};

#[test]
fn relayed_mail_reaches_the_second_instance_and_failures_bounce() {
    require_tools!("swaks");
    let b = MailTree::new("mta-remote-b", "", None).unwrap();
    b.admin(&["domain", "add", "example.net"]).unwrap();
    let out = b.admin_stdin(&["user", "add", "carol@example.net"], "carol-pw\n").unwrap();
    assert!(out.status.success());
    let b_mta = b.serve().unwrap();

    let relay = format!("[delivery]\nrelay_host = \"{}\"\n", b_mta.mx());
    let a = MailTree::new("mta-remote-a", &relay, None).unwrap();
    a.populate().unwrap();
    let a_mta = a.serve().unwrap();
    let check = a.admin(&["check-config"]).unwrap();
    assert!(check.stdout.contains(&format!("remote delivery: via relay host {}", b_mta.mx())), "{}", check.stdout);

    let out = swaks(
        a_mta.submissions(),
        &[
            "-tlsc",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@example.org",
            "--auth-password",
            "alice-pw",
            "--from",
            "alice@example.org",
            "--to",
            "carol@example.net,nobody@example.net",
            "--header",
            "Subject: across",
        ],
    )
    .unwrap();
    assert!(out.success(), "{}", out.describe());

    let carol = b.wait_messages("carol@example.net", 1, Duration::from_secs(30)).unwrap();
    let text = String::from_utf8_lossy(&carol[0]).into_owned();
    assert!(text.contains("Subject: across"), "{text}");
    assert_eq!(text.matches("Received: from ").count(), 2, "{text}");
    assert!(text.contains("with ESMTPS id "), "B's hop must be encrypted: {text}");

    let bounces = a.wait_messages("alice@example.org", 1, Duration::from_secs(30)).unwrap();
    let dsn = String::from_utf8_lossy(&bounces[0]).into_owned();
    assert!(dsn.contains("Subject: Undelivered Mail Returned to Sender"), "{dsn}");
    assert!(dsn.contains("Final-Recipient: rfc822; nobody@example.net"), "{dsn}");
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(dsn.contains("Subject: across"), "original headers: {dsn}");
    assert!(!dsn.contains("carol@example.net>:"), "carol was delivered: {dsn}");

    // Nothing left in A's queue; B got exactly one copy.
    wait_until(Duration::from_secs(20), "A's queue to drain", || {
        a.admin(&["queue", "list"]).map(|o| o.stdout.is_empty()).unwrap_or(false)
    })
    .unwrap();
    assert_eq!(read_maildir(&b.maildir("carol@example.net")).unwrap().len(), 1);
    assert!(!a_mta.log().contains("alice-pw"));
}

// When DNS fails, relayed mail waits in the queue with the reason shown.
#[test]
fn remote_mail_without_a_route_stays_queued_with_a_reason() {
    require_tools!("swaks", "python3");
    // The fake zone has no MX and no address for remote.example.
    let (_dns, dns_port) = fake_dns();
    let a =
        MailTree::new("mta-noroute", &format!("[delivery]\ndns_server = \"127.0.0.1:{dns_port}\"\n"), None).unwrap();
    a.populate().unwrap();
    let mta = a.serve().unwrap();
    let out = swaks(
        mta.submissions(),
        &[
            "-tlsc",
            "--auth",
            "LOGIN",
            "--auth-user",
            "alice@example.org",
            "--auth-password",
            "alice-pw",
            "--from",
            "alice@example.org",
            "--to",
            "x@remote.example",
        ],
    )
    .unwrap();
    assert!(out.success(), "{}", out.describe());
    let mut listing = String::new();
    wait_until(Duration::from_secs(20), "a deferred queue entry", || {
        listing = a.admin(&["queue", "list"]).map(|o| o.stdout).unwrap_or_default();
        listing.contains("attempts 1")
    })
    .unwrap();
    assert!(listing.contains("x@remote.example") && listing.contains("address lookup for remote.example"), "{listing}");
    let id = listing.split('\t').next().unwrap().to_string();
    a.admin(&["queue", "hold", &id]).unwrap();
    assert!(a.admin(&["queue", "list"]).unwrap().stdout.contains("\theld\t"));
    a.admin(&["queue", "delete", &id]).unwrap();
    assert_eq!(a.admin(&["queue", "list"]).unwrap().stdout, "");
}

/// A tiny authoritative DNS server for the test zone: prints its port, then
/// answers MX and A queries from argv (UDP only).
const FAKE_DNS: &str = r#"
import socket, struct, sys
zone_mx = {"example.net": [(10, "mx.example.net")], "nullmx.example": [(0, "")]}
zone_a = {"mx.example.net": "127.0.0.1"}
nx = {"nxdomain.example"}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print("port", s.getsockname()[1], flush=True)

def name(n):
    out = b""
    for label in [l for l in n.split(".") if l]:
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"

while True:
    q, addr = s.recvfrom(4096)
    qid, flags = struct.unpack(">HH", q[:4])
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
        i += 1 + q[i]
    qname = ".".join(labels)
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    answers = []
    if qtype == 15:
        for pref, host in zone_mx.get(qname, []):
            answers.append((15, struct.pack(">H", pref) + name(host)))
    elif qtype == 1 and qname in zone_a:
        answers.append((1, socket.inet_aton(zone_a[qname])))
    rcode = 3 if qname in nx else 0
    head = struct.pack(">HHHHHH", qid, 0x8400 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0)
    body = b"".join(struct.pack(">HHHIH", 0xC00C, t, 1, 60, len(r)) + r for t, r in answers)
    s.sendto(head + question + body, addr)
"#;

fn fake_dns() -> (tests::server::Daemon, u16) {
    let dns = tests::server::Daemon::spawn(tests::cmd("python3", ["-u", "-c", FAKE_DNS])).unwrap();
    dns.logs.wait_for("port ", Duration::from_secs(20)).unwrap();
    let port = dns.logs.lines().iter().find_map(|l| l.strip_prefix("port ").and_then(|p| p.parse().ok())).unwrap();
    (dns, port)
}

// Remote delivery by MX: the domain's MX host (a second mta) gets the mail;
// null MX and nonexistent domains bounce at once.
#[test]
fn mx_lookup_routes_mail_and_refusing_domains_bounce() {
    require_tools!("swaks", "python3");
    let (_dns, dns_port) = fake_dns();

    let b = MailTree::new("mta-mx-b", "", None).unwrap();
    b.admin(&["domain", "add", "example.net"]).unwrap();
    assert!(b.admin_stdin(&["user", "add", "carol@example.net"], "carol-pw\n").unwrap().status.success());
    let b_mta = b.serve().unwrap();

    let delivery = format!("[delivery]\ndns_server = \"127.0.0.1:{dns_port}\"\nmx_port = {}\n", b_mta.mx().port());
    let a = MailTree::new("mta-mx-a", &delivery, None).unwrap();
    a.populate().unwrap();
    let check = a.admin(&["check-config"]).unwrap();
    assert!(check.stdout.contains(&format!("remote delivery: MX lookup via 127.0.0.1:{dns_port}")), "{}", check.stdout);
    let a_mta = a.serve().unwrap();
    let out = swaks(
        a_mta.submissions(),
        &[
            "-tlsc",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@example.org",
            "--auth-password",
            "alice-pw",
            "--from",
            "alice@example.org",
            "--to",
            "carol@example.net,x@nullmx.example,y@nxdomain.example",
            "--header",
            "Subject: by mx",
        ],
    )
    .unwrap();
    assert!(out.success(), "{}", out.describe());
    let carol = b.wait_messages("carol@example.net", 1, Duration::from_secs(30)).unwrap();
    assert!(String::from_utf8_lossy(&carol[0]).contains("Subject: by mx"));
    let bounces = a.wait_messages("alice@example.org", 1, Duration::from_secs(30)).unwrap();
    let dsn = String::from_utf8_lossy(&bounces[0]).into_owned();
    assert!(dsn.contains("Final-Recipient: rfc822; x@nullmx.example\r\nAction: failed\r\nStatus: 5.1.10"), "{dsn}");
    assert!(dsn.contains("Final-Recipient: rfc822; y@nxdomain.example\r\nAction: failed\r\nStatus: 5.1.2"), "{dsn}");
    assert!(!dsn.contains("Final-Recipient: rfc822; carol@example.net"), "{dsn}");
}
