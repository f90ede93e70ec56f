//! Smart host with AUTH (`delivery.relay_auth`): A relays through B, a
//! second `mta`, logging in to B's submission listener after STARTTLS
//! (587 style) or with implicit TLS (465 style). Wrong credentials and a
//! relay without STARTTLS defer the mail; the password never appears in a
//! log or the queue.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use tests::mta::{sink_dumps, smtp_sink, MailTree};
use tests::mta_pair::{receiver, sender, submit, Route};
use tests::{require_tools, wait_until};

fn password_file(path: &Path, password: &str, mode: u32) {
    std::fs::write(path, format!("{password}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `extra` relay keys, then AUTH as alice@example.org with the password in `pw`.
fn relay_auth(extra: &str, pw: &Path) -> String {
    format!("{extra}\nrelay_auth = {{ username = \"alice@example.org\", password_file = \"{}\" }}\n", pw.display())
}

fn deferred_entry(tree: &MailTree) -> String {
    let mut listing = String::new();
    wait_until(Duration::from_secs(30), "a deferred queue entry", || {
        listing = tree.admin(&["queue", "list"]).map(|o| o.stdout).unwrap_or_default();
        listing.contains("attempts 1")
    })
    .unwrap_or_else(|e| panic!("{e}: {listing}"));
    listing
}

/// The secrets a log must never contain: the password and the AUTH PLAIN token.
fn assert_no_secret(what: &str, text: &str, password: &str) {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0alice@example.org\0{password}"));
    assert!(!text.contains(password), "{what} shows the password: {text}");
    assert!(!text.contains(&token), "{what} shows the AUTH PLAIN token: {text}");
}

#[test]
fn relay_host_with_auth_over_starttls_and_implicit_tls() {
    require_tools!("swaks");
    // B knows alice@example.org (password alice-pw) and hosts carol@example.net.
    let (b, b_mta) =
        receiver("mta-relay-auth-b", &["alice@example.org", "bob@example.org", "carol@example.net"]).unwrap();

    // STARTTLS on B's submission port, certificate verified against B's CA.
    let scratch = tests::TestDir::new("mta-relay-auth-pw");
    let good = scratch.join("good.pw");
    password_file(&good, "alice-pw", 0o600);
    let extra = format!("relay_tls_policy = \"verify\"\nca_file = \"{}\"", b.pki.ca_cert.display());
    let a = sender("mta-relay-auth-a", Route::Relay(b_mta.submission()), &relay_auth(&extra, &good)).unwrap();
    let check = a.admin(&["check-config"]).unwrap();
    assert!(
        check.stdout.contains(&format!(
            "via relay host {}, STARTTLS, TLS policy verify, AUTH as alice@example.org",
            b_mta.submission()
        )),
        "{}",
        check.stdout
    );
    let a_mta = a.serve().unwrap();
    submit(&a_mta, "carol@example.net", "via 587").unwrap();
    let got = b.wait_messages("carol@example.net", 1, Duration::from_secs(30)).unwrap();
    let text = String::from_utf8_lossy(&got[0]).into_owned();
    assert!(text.contains("Subject: via 587") && text.contains("with ESMTPSA id "), "B's hop is TLS + AUTH: {text}");
    assert_no_secret("A's log", &a_mta.log(), "alice-pw");

    // Implicit TLS on B's submissions port, wrong password: deferred, and
    // neither the log nor the queue shows the password.
    let wrong = scratch.join("wrong.pw");
    password_file(&wrong, "wrong-secret-pw", 0o600);
    let c_auth = relay_auth("relay_tls = \"implicit\"", &wrong);
    let c = sender("mta-relay-auth-c", Route::Relay(b_mta.submissions()), &c_auth).unwrap();
    let c_mta = c.serve().unwrap();
    submit(&c_mta, "carol@example.net", "via 465").unwrap();
    let listing = deferred_entry(&c);
    assert!(listing.contains("the relay host refused AUTH for alice@example.org: 535"), "{listing}");
    wait_until(Duration::from_secs(10), "the deferral in C's log", || c_mta.log().contains("delivery deferred"))
        .unwrap();
    assert!(c_mta.log().contains("refused AUTH"), "{}", c_mta.log());
    assert_no_secret("C's log", &c_mta.log(), "wrong-secret-pw");
    assert_no_secret("C's queue listing", &listing, "wrong-secret-pw");
    assert_eq!(b.messages("carol@example.net").unwrap().len(), 1, "only A's message reached B");
}

// A relay host without STARTTLS never sees the credentials (or the mail).
#[test]
fn credentials_are_never_sent_in_clear() {
    require_tools!("swaks", "smtp-sink");
    let scratch = tests::TestDir::new("mta-relay-auth-clear");
    let dumps = scratch.join("dumps");
    let (_sink, sink_addr) = smtp_sink(&dumps).unwrap();
    let pw = scratch.join("relay.pw");
    password_file(&pw, "clear-secret-pw", 0o600);
    let a = sender("mta-relay-auth-clear-a", Route::Relay(sink_addr), &relay_auth("", &pw)).unwrap();
    let a_mta = a.serve().unwrap();
    submit(&a_mta, "carol@example.net", "must not leak").unwrap();
    let listing = deferred_entry(&a);
    assert!(listing.contains("relay credentials are never sent in clear"), "{listing}");
    assert!(sink_dumps(&dumps).is_empty(), "the sink got a transaction");
    assert_no_secret("A's log", &a_mta.log(), "clear-secret-pw");
}

// A password file others can read, or a weak TLS level with AUTH, is a
// config error that names the fix.
#[test]
fn unsafe_relay_auth_configs_are_refused() {
    let scratch = tests::TestDir::new("mta-relay-auth-bad");
    let pw = scratch.join("relay.pw");
    password_file(&pw, "pw", 0o644);
    let relay = Route::Relay("127.0.0.1:587".parse().unwrap());
    let a = MailTree::new("mta-relay-auth-bad-a", &relay.delivery(&relay_auth("", &pw)), None).unwrap();
    let out = tests::run_fail(&mut a.mta(["check-config"])).unwrap();
    assert!(out.stderr.contains(&format!("chmod 600 {}", pw.display())), "{}", out.stderr);

    password_file(&pw, "pw", 0o600);
    let weak = relay.delivery(&relay_auth("relay_tls_policy = \"may\"", &pw));
    let a = MailTree::new("mta-relay-auth-bad-b", &weak, None).unwrap();
    let out = tests::run_fail(&mut a.mta(["check-config"])).unwrap();
    assert!(
        out.stderr.contains("relay_tls_policy") && out.stderr.contains("only ever sent over TLS"),
        "{}",
        out.stderr
    );
}
