//! Per-destination TLS policy for MX delivery (`[delivery.tls_policy]`):
//! `encrypt` never sends in clear (a server without STARTTLS defers the
//! mail), `verify` checks the certificate against `ca_file` and the MX host
//! name, `may` delivers in clear when STARTTLS is not offered.
//!
//! Peers: Postfix's `smtp-sink` (no STARTTLS) and a second `mta` (STARTTLS
//! with a certificate for `localhost`, signed by its own test CA).

use std::time::Duration;

use tests::mta::{sink_dumps, smtp_sink, MailTree};
use tests::mta_pair::{fake_mx, receiver, sender, submit, Route};
use tests::{require_tools, wait_until};

/// Waits until the queue holds a deferred entry for `rcpt`; returns its line.
fn deferred_entry(tree: &MailTree, rcpt: &str) -> String {
    let mut listing = String::new();
    wait_until(Duration::from_secs(30), &format!("a deferred queue entry for {rcpt}"), || {
        listing = tree.admin(&["queue", "list"]).map(|o| o.stdout).unwrap_or_default();
        listing.lines().any(|l| l.contains(rcpt) && l.contains("attempts 1"))
    })
    .unwrap_or_else(|e| panic!("{e}: {listing}"));
    listing.lines().find(|l| l.contains(rcpt)).unwrap_or_default().to_string()
}

// encrypt: a server without STARTTLS gets nothing, the mail waits in the
// queue with the reason; the same server gets mail for a `may` domain in clear.
#[test]
fn encrypt_policy_defers_rather_than_deliver_in_clear() {
    require_tools!("swaks", "python3", "smtp-sink");
    let scratch = tests::TestDir::new("mta-tls-policy-sink");
    let dumps = scratch.join("dumps");
    let (_sink, sink_addr) = smtp_sink(&dumps).unwrap();
    let (_dns, dns_port) =
        fake_mx(&[("secure.example", "mx.sink.example"), ("plain.example", "mx.sink.example")]).unwrap();
    let route = Route::Mx { dns_port, mx_port: sink_addr.port() };
    let a = sender("mta-tls-policy-a", route, "[delivery.tls_policy]\n\"secure.example\" = \"encrypt\"\n").unwrap();
    let check = a.admin(&["check-config"]).unwrap();
    assert!(check.stdout.contains("TLS policy may by default"), "{}", check.stdout);
    assert!(check.stdout.contains("tls policy: secure.example encrypt"), "{}", check.stdout);
    let a_mta = a.serve().unwrap();

    submit(&a_mta, "x@secure.example,y@plain.example", "policy").unwrap();
    let line = deferred_entry(&a, "x@secure.example");
    assert!(line.contains("TLS policy encrypt requires STARTTLS but mx.sink.example does not offer it"), "{line}");
    assert!(!line.contains("y@plain.example"), "the may domain was delivered: {line}");
    wait_until(Duration::from_secs(20), "one dump from smtp-sink", || !sink_dumps(&dumps).is_empty()).unwrap();
    let all = sink_dumps(&dumps).join("\n-----\n");
    assert_eq!(sink_dumps(&dumps).len(), 1, "{all}");
    assert!(all.contains("y@plain.example") && all.contains("Subject: policy"), "{all}");
    assert!(!all.contains("X-Rcpt-Args: <x@secure.example>"), "sent in clear despite encrypt: {all}");
}

// encrypt and verify deliver over STARTTLS to a second mta; verify refuses
// a certificate that does not name the MX host or that a foreign CA signed.
#[test]
fn verify_policy_checks_the_ca_and_the_mx_host_name() {
    require_tools!("swaks", "python3");
    let (b, b_mta) = receiver("mta-tls-verify-b", &["u@enc.example", "u@ver.example", "u@misnamed.example"]).unwrap();
    // B's certificate names localhost and 127.0.0.1, not mx.misnamed.example.
    let (_dns, dns_port) = fake_mx(&[
        ("enc.example", "mx.misnamed.example"),
        ("ver.example", "localhost"),
        ("misnamed.example", "mx.misnamed.example"),
    ])
    .unwrap();
    let route = Route::Mx { dns_port, mx_port: b_mta.mx().port() };
    let trusting = |ca: &std::path::Path| {
        format!(
            "ca_file = \"{}\"\n\
             [delivery.tls_policy]\n\"enc.example\" = \"encrypt\"\n\"ver.example\" = \"verify\"\n\
             \"misnamed.example\" = \"verify\"\n",
            ca.display()
        )
    };

    // A trusts B's CA.
    let a = sender("mta-tls-verify-a", route, &trusting(&b.pki.ca_cert)).unwrap();
    let check = a.admin(&["check-config"]).unwrap();
    assert!(check.stdout.contains(&format!("tls verify roots: {}", b.pki.ca_cert.display())), "{}", check.stdout);
    let a_mta = a.serve().unwrap();
    submit(&a_mta, "u@enc.example,u@ver.example,u@misnamed.example", "verified").unwrap();
    for rcpt in ["u@enc.example", "u@ver.example"] {
        let got = b.wait_messages(rcpt, 1, Duration::from_secs(30)).unwrap();
        let text = String::from_utf8_lossy(&got[0]).into_owned();
        assert!(text.contains("Subject: verified") && text.contains("with ESMTPS id "), "{text}");
    }
    let line = deferred_entry(&a, "u@misnamed.example");
    assert!(line.contains("TLS handshake with mx.misnamed.example failed (TLS policy verify)"), "{line}");
    assert!(b.messages("u@misnamed.example").unwrap().is_empty());

    // C trusts only a foreign CA, which did not sign B's certificate.
    let foreign = tests::TestDir::new("mta-tls-verify-foreign-ca");
    let foreign_pki = tests::tls::make_pki(&foreign.join("pki")).unwrap();
    let c = sender("mta-tls-verify-c", route, &trusting(&foreign_pki.ca_cert)).unwrap();
    let c_mta = c.serve().unwrap();
    submit(&c_mta, "u@ver.example", "foreign ca").unwrap();
    let line = deferred_entry(&c, "u@ver.example");
    assert!(line.contains("TLS handshake with localhost failed (TLS policy verify)"), "{line}");
    assert_eq!(b.messages("u@ver.example").unwrap().len(), 1, "only A's copy");
}

/// A server that offers STARTTLS but answers the handshake with a TLS
/// alert; without STARTTLS it takes mail. Prints `port N`, then `GOT
/// <recipient>` per message and `STARTTLS` per broken handshake.
const BROKEN_TLS_SERVER: &str = r#"
import socket, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(16)
print("port", s.getsockname()[1], flush=True)

def serve(c):
    f = c.makefile("rb")
    c.sendall(b"220 broken.example ESMTP\r\n")
    rcpt = ""
    while True:
        line = f.readline()
        if not line:
            return
        cmd = line.strip().upper()
        if cmd.startswith(b"EHLO"):
            c.sendall(b"250-broken.example\r\n250 STARTTLS\r\n")
        elif cmd == b"STARTTLS":
            c.sendall(b"220 go ahead\r\n")
            f.read(5)
            c.sendall(bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]))
            print("STARTTLS", flush=True)
            c.close()
            return
        elif cmd.startswith(b"MAIL"):
            c.sendall(b"250 ok\r\n")
        elif cmd.startswith(b"RCPT"):
            rcpt = line.strip()[8:].decode()
            c.sendall(b"250 ok\r\n")
        elif cmd == b"DATA":
            c.sendall(b"354 go\r\n")
            while f.readline() not in (b".\r\n", b""):
                pass
            print("GOT", rcpt, flush=True)
            c.sendall(b"250 queued\r\n")
        elif cmd == b"QUIT":
            c.sendall(b"221 bye\r\n")
            c.close()
            return
        else:
            c.sendall(b"500 what\r\n")

while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

// may: a broken handshake is retried in clear (RFC 7435), once; encrypt
// never falls back.
#[test]
fn may_falls_back_to_cleartext_after_a_failed_handshake_encrypt_does_not() {
    require_tools!("swaks", "python3");
    let server = tests::server::Daemon::spawn(tests::cmd("python3", ["-u", "-c", BROKEN_TLS_SERVER])).unwrap();
    server.logs.wait_for("port ", Duration::from_secs(20)).unwrap();
    let port: u16 =
        server.logs.lines().iter().find_map(|l| l.strip_prefix("port ").and_then(|p| p.trim().parse().ok())).unwrap();
    let (_dns, dns_port) =
        fake_mx(&[("opportunistic.example", "mx.broken.example"), ("strict.example", "mx.broken.example")]).unwrap();
    let route = Route::Mx { dns_port, mx_port: port };
    let a = sender("mta-tls-fallback", route, "[delivery.tls_policy]\n\"strict.example\" = \"encrypt\"\n").unwrap();
    let a_mta = a.serve().unwrap();
    submit(&a_mta, "o@opportunistic.example", "fallback").unwrap();
    server.logs.wait_for("GOT <o@opportunistic.example>", Duration::from_secs(30)).unwrap();
    assert!(a_mta.log().contains("retrying without TLS (TLS policy may)"), "{}", a_mta.log());

    submit(&a_mta, "s@strict.example", "no fallback").unwrap();
    let line = deferred_entry(&a, "s@strict.example");
    assert!(line.contains("TLS handshake with mx.broken.example failed (TLS policy encrypt)"), "{line}");
    assert!(!server.logs.text().contains("GOT <s@strict.example>"), "{}", server.logs.text());
}

// Config mistakes are refused with the key and the fix.
#[test]
fn bad_tls_policies_are_refused_by_check_config() {
    let bad =
        MailTree::new("mta-tls-policy-bad", "[delivery.tls_policy]\n\"example.com\" = \"sometimes\"\n", None).unwrap();
    let out = tests::run_fail(&mut bad.mta(["check-config"])).unwrap();
    assert!(out.stderr.contains("sometimes") && out.stderr.contains("verify"), "{}", out.stderr);
    let bad =
        MailTree::new("mta-tls-policy-bad2", "[delivery.tls_policy]\n\"exa mple\" = \"encrypt\"\n", None).unwrap();
    let out = tests::run_fail(&mut bad.mta(["check-config"])).unwrap();
    assert!(out.stderr.contains("delivery.tls_policy.\"exa mple\""), "{}", out.stderr);
    let missing = "[delivery]\nca_file = \"/nonexistent/ca.pem\"\ntls_policy_default = \"verify\"\n";
    let bad = MailTree::new("mta-tls-policy-bad3", missing, None).unwrap();
    let out = tests::run_fail(&mut bad.mta(["check-config"])).unwrap();
    assert!(out.stderr.contains("/nonexistent/ca.pem") && out.stderr.contains("delivery.ca_file"), "{}", out.stderr);
}
