//! Remote delivery between two `mta` instances: A relays an authenticated
//! user's mail to B (as its relay host) over opportunistic STARTTLS; B's
//! 550 for an unknown user comes back to the sender as a DSN.

use std::time::Duration;

use tests::mta::{read_maildir, swaks, MailTree};
use tests::mta_pair::{receiver, sender, submit, Route};
use tests::{require_tools, wait_until};

#[test]
fn relayed_mail_reaches_the_second_instance_and_failures_bounce() {
    require_tools!("swaks");
    let (b, b_mta) = receiver("mta-remote-b", &["carol@example.net"]).unwrap();

    let a = sender("mta-remote-a", Route::Relay(b_mta.mx()), "").unwrap();
    let a_mta = a.serve().unwrap();
    let check = a.admin(&["check-config"]).unwrap();
    assert!(check.stdout.contains(&format!("remote delivery: via relay host {}", b_mta.mx())), "{}", check.stdout);

    submit(&a_mta, "carol@example.net,nobody@example.net", "across").unwrap();

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
        a.admin(&["queue", "list"]).map(|o| o.stdout == "queue empty\n").unwrap_or(false)
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
    assert!(listing.contains("\tnext attempt in "), "{listing}");
    let id = listing.split('\t').next().unwrap().to_string();
    // Issue 20: queue commands say what they did (here through the running server).
    assert_eq!(a.admin(&["queue", "hold", &id]).unwrap().stdout, format!("held {id}\n"));
    let held = a.admin(&["queue", "list"]).unwrap().stdout;
    assert!(held.contains("\theld\t") && held.contains("next attempt: when released"), "{held}");
    assert_eq!(a.admin(&["queue", "delete", &id]).unwrap().stdout, format!("deleted {id}\n"));
    assert_eq!(a.admin(&["queue", "list"]).unwrap().stdout, "queue empty\n");
}

/// The test zone: example.net's MX is 127.0.0.1; nullmx.example publishes
/// a null MX; nxdomain.example does not exist.
fn fake_dns() -> (tests::server::Daemon, u16) {
    tests::mta::fake_dns(
        &[("example.net", 10, "mx.example.net"), ("nullmx.example", 0, "")],
        &[("mx.example.net", "127.0.0.1")],
        &["nxdomain.example"],
    )
    .unwrap()
}

// Remote delivery by MX: the domain's MX host (a second mta) gets the mail;
// null MX and nonexistent domains bounce at once.
#[test]
fn mx_lookup_routes_mail_and_refusing_domains_bounce() {
    require_tools!("swaks", "python3");
    let (_dns, dns_port) = fake_dns();

    let (b, b_mta) = receiver("mta-mx-b", &["carol@example.net"]).unwrap();

    let a = sender("mta-mx-a", Route::Mx { dns_port, mx_port: b_mta.mx().port() }, "").unwrap();
    let check = a.admin(&["check-config"]).unwrap();
    assert!(check.stdout.contains(&format!("remote delivery: MX lookup via 127.0.0.1:{dns_port}")), "{}", check.stdout);
    let a_mta = a.serve().unwrap();
    submit(&a_mta, "carol@example.net,x@nullmx.example,y@nxdomain.example", "by mx").unwrap();
    let carol = b.wait_messages("carol@example.net", 1, Duration::from_secs(30)).unwrap();
    assert!(String::from_utf8_lossy(&carol[0]).contains("Subject: by mx"));
    let bounces = a.wait_messages("alice@example.org", 1, Duration::from_secs(30)).unwrap();
    let dsn = String::from_utf8_lossy(&bounces[0]).into_owned();
    assert!(dsn.contains("Final-Recipient: rfc822; x@nullmx.example\r\nAction: failed\r\nStatus: 5.1.10"), "{dsn}");
    assert!(dsn.contains("Final-Recipient: rfc822; y@nxdomain.example\r\nAction: failed\r\nStatus: 5.1.2"), "{dsn}");
    assert!(!dsn.contains("Final-Recipient: rfc822; carol@example.net"), "{dsn}");
}
