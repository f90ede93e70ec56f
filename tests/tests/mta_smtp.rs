//! The `mta` binary against real SMTP clients (swaks, Python's smtplib):
//! submission with STARTTLS and implicit TLS, AUTH rules, relay and
//! spoofing refusals, pipelining, large messages and hostile input.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tests::mta::{python, swaks, MailTree, Mta};
use tests::require_tools;

fn started(name: &str, extra: &str) -> (MailTree, Mta) {
    let tree = MailTree::new(name, extra, None).unwrap();
    tree.populate().unwrap();
    let mta = tree.serve().unwrap();
    (tree, mta)
}

#[track_caller]
fn assert_contains(out: &tests::Output, needle: &str) {
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains(needle), "expected {needle:?} in the transcript\n{}", out.describe());
}

const AUTH_ALICE: [&str; 4] = ["--auth-user", "alice@example.org", "--auth-password", "alice-pw"];

// RFC 6409 + RFC 3207 + RFC 4954: STARTTLS, then AUTH, then mail, on 587.
#[test]
fn swaks_starttls_auth_plain_and_login_deliver_to_maildir() {
    require_tools!("swaks");
    let (tree, mta) = started("mta-sub", "");
    for mech in ["PLAIN", "LOGIN"] {
        let subject = format!("Subject: via {mech}");
        let mut args = vec!["-tls", "--auth", mech, "--from", "alice@example.org", "--to", "bob@example.org"];
        args.extend(AUTH_ALICE);
        args.extend(["--header", &subject]);
        let out = swaks(mta.submission(), &args).unwrap();
        assert!(out.success(), "swaks failed\n{}", out.describe());
        assert_contains(&out, "235 2.7.0 Authentication successful");
        assert_contains(&out, "250 2.0.0 Ok: queued as ");
    }
    let msgs = tree.wait_messages("bob@example.org", 2, Duration::from_secs(20)).unwrap();
    let texts: Vec<String> = msgs.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect();
    for mech in ["PLAIN", "LOGIN"] {
        let m = texts.iter().find(|t| t.contains(&format!("Subject: via {mech}"))).expect("message per mechanism");
        assert!(m.starts_with("Received: from "), "{m}");
        assert!(m.contains("with ESMTPSA id "), "{m}");
    }
    assert!(!mta.log().contains("alice-pw"), "password in the log:\n{}", mta.log());
}

// RFC 8314: implicit TLS submission on 465.
#[test]
fn swaks_implicit_tls_on_submissions() {
    require_tools!("swaks");
    let (tree, mta) = started("mta-465", "");
    let mut args = vec!["-tlsc", "--auth", "LOGIN", "--from", "alice@example.org", "--to", "alice@example.org"];
    args.extend(AUTH_ALICE);
    let out = swaks(mta.submissions(), &args).unwrap();
    assert!(out.success(), "{}", out.describe());
    assert_contains(&out, "250 2.0.0 Ok: queued as ");
    tree.wait_messages("alice@example.org", 1, Duration::from_secs(20)).unwrap();
}

#[test]
fn auth_is_refused_before_tls() {
    require_tools!("swaks", "python3");
    let (_tree, mta) = started("mta-notls", "");
    // swaks does not even find AUTH advertised without TLS.
    let mut args = vec!["--auth", "PLAIN", "--from", "alice@example.org", "--to", "bob@example.org"];
    args.extend(AUTH_ALICE);
    let out = swaks(mta.submission(), &args).unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert_contains(&out, "Host did not advertise authentication");
    // Sending AUTH anyway gets 538 and no login.
    let script = r#"
import base64, smtplib, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=30)
s.ehlo("client.test")
print("features", " ".join(sorted(s.esmtp_features)))
code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@example.org\0alice-pw").decode())
print("auth", code)
code, _ = s.docmd("MAIL", "FROM:<alice@example.org>")
print("mail", code)
"#;
    let addr = mta.submission();
    let out = python(script, &[&addr.ip().to_string(), &addr.port().to_string()]).unwrap();
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("starttls") && !out.stdout.contains(" auth"), "{}", out.stdout);
    assert!(out.stdout.contains("auth 538"), "{}", out.stdout);
    assert!(out.stdout.contains("mail 530"), "{}", out.stdout);
}

#[test]
fn wrong_password_is_refused_and_not_logged() {
    require_tools!("swaks");
    let (_tree, mta) = started("mta-badpw", "");
    let out = swaks(
        mta.submissions(),
        &[
            "-tlsc",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@example.org",
            "--auth-password",
            "guess-123",
            "--to",
            "bob@example.org",
        ],
    )
    .unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert_contains(&out, "535 5.7.8");
    let log = mta.log();
    assert!(log.contains("AUTH failed"), "{log}");
    assert!(!log.contains("guess-123"), "password in the log:\n{log}");
}

// No open relay: unauthenticated mail only to existing local users.
#[test]
fn relay_is_refused_without_auth() {
    require_tools!("swaks");
    let (_tree, mta) = started("mta-relay", "");
    let out = swaks(mta.mx(), &["--from", "someone@remote.example", "--to", "victim@elsewhere.example"]).unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert_contains(&out, "554 5.7.1 Relay access denied");
    let out = swaks(mta.mx(), &["--from", "someone@remote.example", "--to", "nobody@example.org"]).unwrap();
    assert_contains(&out, "550 5.1.1");
    for trick in ["victim%elsewhere.example@example.org", "elsewhere.example!victim@example.org", "victim@[127.0.0.1]"]
    {
        let out = swaks(mta.mx(), &["--from", "someone@remote.example", "--to", trick]).unwrap();
        assert!(!out.success(), "{trick} accepted\n{}", out.describe());
        assert_contains(&out, "553 5.1.3");
    }
    // Submission without AUTH does not relay either.
    let out =
        swaks(mta.submission(), &["-tls", "--from", "someone@remote.example", "--to", "victim@elsewhere.example"])
            .unwrap();
    assert_contains(&out, "530 5.7.0 Authentication required");
}

// No spoofing, authenticated or not.
#[test]
fn spoofed_senders_are_refused() {
    require_tools!("swaks");
    let (tree, mta) = started("mta-spoof", "");
    let out = swaks(mta.mx(), &["--from", "alice@example.org", "--to", "bob@example.org"]).unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert_contains(&out, "553 5.7.1 Sender address rejected: authentication required for this domain");

    let mut args = vec!["-tls", "--auth", "PLAIN", "--from", "bob@example.org", "--to", "bob@example.org"];
    args.extend(AUTH_ALICE);
    let out = swaks(mta.submission(), &args).unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert_contains(&out, "553 5.7.1 Sender address rejected: not owned by the authenticated user");

    // The envelope is fine, but the From: header claims bob.
    let mut forged = vec!["-tls", "--auth", "PLAIN", "--from", "alice@example.org", "--to", "bob@example.org"];
    forged.extend(AUTH_ALICE);
    forged.extend(["--header", "From: Bob <bob@example.org>"]);
    let out = swaks(mta.submission(), &forged).unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert_contains(&out, "553 5.7.1 From: header address not owned by the authenticated user");

    // After `mta sender allow`, the same submission goes through.
    tree.admin(&["sender", "allow", "alice@example.org", "bob@example.org"]).unwrap();
    let out = swaks(mta.submission(), &args).unwrap();
    assert!(out.success(), "{}", out.describe());
    let out = swaks(mta.submission(), &forged).unwrap();
    assert!(out.success(), "{}", out.describe());
}

const PIPELINE_SCRIPT: &str = r#"
import smtplib, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = smtplib.SMTP(host, port, timeout=30)
code, _ = s.ehlo("client.test")
assert code == 250 and s.has_extn("pipelining"), s.esmtp_features
# One write with the whole envelope (RFC 2920), then read four replies.
s.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
codes = [s.getreply()[0] for _ in range(5)]
print("pipelined", codes)
s.send(b"From: x@remote.example\r\nSubject: pipelined\r\n\r\nhello\r\n.\r\n")
print("data", s.getreply()[0])
# A large message through smtplib.
big = "From: x@remote.example\r\nSubject: big\r\n\r\n" + ("0123456789" * 99 + "\r\n") * 5000
s.sendmail("x@remote.example", ["alice@example.org"], big)
print("big ok", len(big))
try:
    s.sendmail("x@remote.example", ["alice@example.org"], big * 3)
    print("too big accepted")
except smtplib.SMTPException as e:
    print("too big refused", getattr(e, "smtp_code", None) or e)
s.quit()
"#;

#[test]
fn python_pipelining_and_large_messages() {
    require_tools!("python3");
    let (tree, mta) = started("mta-pipe", "message_bytes_max = 8388608");
    let addr = mta.mx();
    let out = python(PIPELINE_SCRIPT, &[&addr.ip().to_string(), &addr.port().to_string()]).unwrap();
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("pipelined [250, 250, 550, 250, 354]"), "{}", out.stdout);
    assert!(out.stdout.contains("data 250"), "{}", out.stdout);
    assert!(out.stdout.contains("big ok"), "{}", out.stdout);
    assert!(out.stdout.contains("too big refused 552"), "{}", out.stdout);
    let alice = tree.wait_messages("alice@example.org", 2, Duration::from_secs(30)).unwrap();
    let big = alice.iter().find(|m| m.windows(12).any(|w| w == b"Subject: big")).expect("big message delivered");
    assert!(big.len() > 4_900_000, "{}", big.len());
    tree.wait_messages("bob@example.org", 1, Duration::from_secs(20)).unwrap();
}

fn raw_session(addr: std::net::SocketAddr, send: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 512];
    let n = s.read(&mut greeting).unwrap();
    assert!(greeting[..n].starts_with(b"220 "), "{:?}", String::from_utf8_lossy(&greeting[..n]));
    // The server may close while we are still writing; that is its answer.
    let _ = s.write_all(send);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

// SMTP smuggling and hostile input; the server stays up for others.
#[test]
fn hostile_input_is_refused_and_the_server_stays_up() {
    require_tools!("swaks");
    let (tree, mta) = started("mta-hostile", "");
    let addr = mta.mx();
    let smuggle = b"EHLO c\r\nMAIL FROM:<x@remote.example>\r\n";
    let r = raw_session(addr, smuggle);
    assert!(r.contains("554 5.5.0"), "{r}");
    let r = raw_session(addr, b"EHLO c\n");
    assert!(r.contains("521 5.5.2"), "{r}");
    let r = raw_session(addr, &vec![b'A'; 1 << 20]);
    assert!(r.contains("500 5.5.6 Line too long"), "{r}");
    let garbage: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let _ = raw_session(addr, &garbage);
    // TLS handshake garbage on the implicit-TLS port.
    let mut s = TcpStream::connect(mta.submissions()).unwrap();
    let _ = s.write_all(b"\x16\x03\x01\x00\x05hello-not-tls");
    drop(s);
    // Smuggling attempt inside DATA: bare LF dot.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reply = [0u8; 512];
    let _ = s.read(&mut reply).unwrap();
    for line in ["EHLO c\r\n", "MAIL FROM:<x@remote.example>\r\n", "RCPT TO:<alice@example.org>\r\n", "DATA\r\n"] {
        s.write_all(line.as_bytes()).unwrap();
        let _ = s.read(&mut reply).unwrap();
    }
    s.write_all(b"From: x@remote.example\r\n\r\nhi\n.\nMAIL FROM:<alice@example.org>\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(String::from_utf8_lossy(&rest).contains("521 5.5.2"), "{}", String::from_utf8_lossy(&rest));

    // Still serving, and nothing smuggled was delivered.
    let out = swaks(addr, &["--from", "x@remote.example", "--to", "alice@example.org"]).unwrap();
    assert!(out.success(), "{}", out.describe());
    let msgs = tree.wait_messages("alice@example.org", 1, Duration::from_secs(20)).unwrap();
    assert_eq!(msgs.len(), 1);
}

// Repeated failures slow down further attempts from the IP and for the login.
#[test]
fn auth_brute_force_is_slowed_down() {
    require_tools!("python3");
    let (_tree, mta) = started("mta-brute", "");
    let script = r#"
import base64, smtplib, ssl, sys, time
host, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
for i in range(5):
    s = smtplib.SMTP_SSL(host, port, timeout=60, context=ctx)
    s.ehlo("brute.test")
    t = time.monotonic()
    # One mechanism per attempt (smtplib's login() would try each).
    token = base64.b64encode(b"\0alice@example.org\0wrong-%d" % i).decode()
    code, _ = s.docmd("AUTH", "PLAIN " + token)
    print("attempt", i, code, "%.3f" % (time.monotonic() - t))
    s.close()
"#;
    let addr = mta.submissions();
    let started = Instant::now();
    let out = python(script, &[&addr.ip().to_string(), &addr.port().to_string()]).unwrap();
    assert!(out.success(), "{}", out.describe());
    let times: Vec<f64> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("attempt "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f[1], "535", "{l}");
            f[2].parse().unwrap()
        })
        .collect();
    assert_eq!(times.len(), 5, "{}", out.stdout);
    // Three free failures, then at least 0.5 s, then at least 1 s.
    assert!(times[3] >= 0.45, "{times:?}");
    assert!(times[4] >= 0.95, "{times:?}");
    assert!(started.elapsed() < Duration::from_secs(60), "{}", out.stdout);
}

const RECIPIENT_FLOOD_SCRIPT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
f = s.makefile("rb")
f.readline()
s.sendall(b"EHLO flood.test\r\n")
while not f.readline().startswith(b"250 "):
    pass
batch = b"MAIL FROM:<x@remote.example>\r\n" + b"RCPT TO:<alice@example.org>\r\n" * 10000
try:
    s.sendall(batch)
except OSError as e:
    print("send stopped:", type(e).__name__)
codes = {}
while True:
    line = f.readline()
    if not line:
        break
    codes[line[:3].decode()] = codes.get(line[:3].decode(), 0) + 1
print("codes", sorted(codes.items()))
"#;

// 10k recipients, idle connections holding slots, and the memory they cost.
#[test]
fn recipient_floods_and_idle_connections_are_bounded() {
    require_tools!("python3", "swaks");
    let (tree, mta) = started("mta-flood", "connections_per_ip_max = 10");
    let addr = mta.mx();
    let out = python(RECIPIENT_FLOOD_SCRIPT, &[&addr.ip().to_string(), &addr.port().to_string()]).unwrap();
    assert!(out.success(), "{}", out.describe());
    // MAIL and 1000 RCPT accepted, then 452 until the error limit (10) closes the session.
    assert!(out.stdout.contains("codes [('250', 1001), ('421', 1), ('452', 10)]"), "{}", out.stdout);

    // Slowloris: ten connections that never finish a line hold every slot...
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"220 "));
        s.write_all(b"EH").unwrap();
        idle.push(s);
    }
    // ...so an eleventh from the same address is turned away politely.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut refused = String::new();
    let _ = s.read_to_string(&mut refused);
    assert!(refused.starts_with("421 4.7.0 Too many connections"), "{refused:?}");
    let rss_kib = tests::util::vm_rss_kib(mta.pid()).unwrap();
    assert!(rss_kib < 200 * 1024, "RSS {rss_kib} KiB");

    // Closing them frees the slots; normal mail flows again.
    drop(idle);
    tests::wait_until(Duration::from_secs(20), "a free connection slot", || {
        swaks(addr, &["--from", "x@remote.example", "--to", "alice@example.org"]).map(|o| o.success()).unwrap_or(false)
    })
    .unwrap();
    tree.wait_messages("alice@example.org", 1, Duration::from_secs(20)).unwrap();
}

const SERVED_CERT_SCRIPT: &str = r#"
import hashlib, socket, ssl, sys
port, pem = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
    with ctx.wrap_socket(raw) as s:
        served = s.getpeercert(binary_form=True)
        print("version", s.version())
want = ssl.PEM_cert_to_DER_cert(open(pem).read())
print("same" if served == want else "different")
"#;

// The certificate is re-read on SIGHUP; new handshakes get the new one.
#[test]
fn sighup_reloads_the_certificate() {
    require_tools!("python3");
    let (tree, mta) = started("mta-hup", "");
    let port = mta.submissions().port().to_string();
    let cert = tree.pki.server_cert.to_str().unwrap().to_string();
    let out = python(SERVED_CERT_SCRIPT, &[&port, &cert]).unwrap();
    assert!(out.stdout.contains("same"), "{}", out.describe());
    assert!(out.stdout.contains("version TLSv1.3"), "{}", out.describe());

    let fresh = tests::tls::make_pki(&tree.dir.join("pki2")).unwrap();
    std::fs::copy(&fresh.server_cert, &tree.pki.server_cert).unwrap();
    std::fs::copy(&fresh.server_key, &tree.pki.server_key).unwrap();
    tests::run(&mut tests::cmd("kill", ["-HUP", &mta.pid().to_string()])).unwrap();
    mta.daemon.logs.wait_for("mta: TLS certificate reloaded", Duration::from_secs(20)).unwrap();

    let out = python(SERVED_CERT_SCRIPT, &[&port, fresh.server_cert.to_str().unwrap()]).unwrap();
    assert!(out.stdout.contains("same"), "{}", out.describe());
}

const PROXY_CLIENT_SCRIPT: &str = r#"
import smtplib, socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
sig = b"\r\n\r\n\x00\r\nQUIT\n"
header = sig + bytes([0x21, 0x11]) + struct.pack(">H", 12) + socket.inet_aton("203.0.113.7") + socket.inet_aton("127.0.0.1") + struct.pack(">HH", 40000, 25)

class ProxiedSMTP(smtplib.SMTP):
    def _get_socket(self, host, port, timeout):
        s = socket.create_connection((host, port), timeout)
        s.sendall(header)
        return s

s = ProxiedSMTP(host, port, timeout=30)
s.sendmail("x@remote.example", ["alice@example.org"], "From: x@remote.example\r\nSubject: proxied\r\n\r\nhi\r\n")
s.quit()
raw = socket.create_connection((host, port), timeout=30)
raw.sendall(b"EHLO no-proxy-header.example\r\n")
try:
    got = raw.recv(512)
except ConnectionResetError:
    got = b""
print("without header:", got)
"#;

// Behind a load balancer: the PROXY v2 header names the real client.
#[test]
fn proxy_protocol_listener_uses_the_real_client_address() {
    require_tools!("python3");
    let extra = "[[listener]]\nkind = \"mx\"\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\n";
    let (tree, mta) = started("mta-proxy", extra);
    let check = tree.admin(&["check-config"]).unwrap();
    assert!(check.stdout.contains("(mx) [behind a PROXY v2 load balancer]"), "{}", check.stdout);
    // Listeners print in config order: the PROXY one comes first.
    let proxied: std::net::SocketAddr = mta
        .daemon
        .logs
        .lines()
        .iter()
        .find_map(|l| l.trim().strip_prefix("mta: listening mx ").map(|a| a.parse().unwrap()))
        .unwrap();
    assert_ne!(proxied, mta.mx());
    let out = python(PROXY_CLIENT_SCRIPT, &[&proxied.ip().to_string(), &proxied.port().to_string()]).unwrap();
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("without header: b''"), "{}", out.stdout);
    let msgs = tree.wait_messages("alice@example.org", 1, Duration::from_secs(20)).unwrap();
    let text = String::from_utf8_lossy(&msgs[0]).into_owned();
    assert!(text.contains("([203.0.113.7])"), "{text}");
}

// RFC 5321 §3.1: clients wait for the greeting. With a greeting delay, one
// that talks first is refused (the pre-greeting test of Postfix's postscreen).
#[test]
fn talking_before_the_greeting_is_refused() {
    let extra = "[[listener]]\nkind = \"mx\"\naddress = \"127.0.0.1:0\"\ngreeting_delay_ms = 500\n";
    let (_tree, mta) = started("mta-pregreet", extra);
    let delayed: std::net::SocketAddr = mta
        .daemon
        .logs
        .lines()
        .iter()
        .find_map(|l| l.trim().strip_prefix("mta: listening mx ").map(|a| a.parse().unwrap()))
        .unwrap();
    let mut eager = TcpStream::connect(delayed).unwrap();
    eager.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    eager.write_all(b"EHLO eager.example\r\n").unwrap();
    let mut reply = String::new();
    let _ = eager.read_to_string(&mut reply);
    assert!(reply.starts_with("554 5.5.0 "), "{reply:?}");

    let mut patient = TcpStream::connect(delayed).unwrap();
    patient.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    let mut greeting = [0u8; 128];
    let n = patient.read(&mut greeting).unwrap();
    assert!(greeting[..n].starts_with(b"220 mx.example.org ESMTP"), "{:?}", String::from_utf8_lossy(&greeting[..n]));
    assert!(started.elapsed() >= Duration::from_millis(450));
}

// RFC 5321 §4.1.3: a sender at an address literal reaches a local user on
// the MX port; a malformed literal is a 501; an authenticated user may not
// send as a literal (it is nobody's own address).
#[test]
fn sender_address_literals_are_syntax_and_policy_decides() {
    require_tools!("swaks");
    let (tree, mta) = started("mta-literal", "");
    for from in ["x@[192.0.2.1]", "x@[IPv6:2001:db8::1]"] {
        let out = swaks(mta.mx(), &["--from", from, "--to", "bob@example.org"]).unwrap();
        assert!(out.success(), "{from}\n{}", out.describe());
    }
    let bob = tree.wait_messages("bob@example.org", 2, Duration::from_secs(20)).unwrap();
    assert_eq!(bob.len(), 2);
    let out = swaks(mta.mx(), &["--from", "x@[999.1.1.1]", "--to", "bob@example.org"]).unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert_contains(&out, "501 5.1.7");
    let mut args = vec!["-tls", "--auth", "PLAIN", "--from", "alice@[127.0.0.1]", "--to", "bob@example.org"];
    args.extend(AUTH_ALICE);
    let out = swaks(mta.submission(), &args).unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert_contains(&out, "553 5.7.1");
}
