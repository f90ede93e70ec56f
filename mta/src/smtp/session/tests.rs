//! Transcript tests for the session: each feeds client bytes and checks the
//! exact replies, answering queries from a small in-memory directory.

use std::net::{IpAddr, Ipv4Addr};

use super::*;

const HOST: &str = "mx.example.org";

#[derive(Clone, Copy)]
enum Port {
    Mx,
    Submission,
    /// Implicit TLS (465).
    Submissions,
}

struct Harness {
    s: Session,
    queued: Vec<(Envelope, Vec<u8>)>,
    closed: bool,
    tls_starts: usize,
    queue_fails: bool,
}

impl Harness {
    fn new(port: Port) -> Harness {
        let config = SessionConfig {
            hostname: HOST.into(),
            starttls: !matches!(port, Port::Submissions),
            auth: !matches!(port, Port::Mx),
            auth_required: !matches!(port, Port::Mx),
            tls_required: !matches!(port, Port::Mx),
            message_bytes_max: 10_000,
            postmaster: Address::parse("postmaster@example.org", false).unwrap(),
        };
        let s = Session::new(config, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), matches!(port, Port::Submissions));
        Harness { s, queued: Vec::new(), closed: false, tls_starts: 0, queue_fails: false }
    }

    fn greeted(port: Port) -> Harness {
        let mut h = Harness::new(port);
        h.s.greet();
        assert_eq!(h.drive(), "220 mx.example.org ESMTP\r\n");
        h
    }

    /// Feeds bytes, answers queries, returns every reply produced.
    fn send(&mut self, bytes: &[u8]) -> String {
        self.s.handle_input(bytes);
        self.drive()
    }

    fn drive(&mut self) -> String {
        let mut out = Vec::new();
        loop {
            while let Some(b) = self.s.poll_transmit() {
                out.extend_from_slice(&b);
            }
            match self.s.poll_event() {
                None => break,
                Some(Event::Close) => self.closed = true,
                Some(Event::StartTls) => {
                    self.tls_starts += 1;
                    self.s.handle_tls_established();
                }
                Some(Event::Query(q)) => {
                    let a = self.answer(q);
                    self.s.handle_answer(a);
                }
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn answer(&mut self, q: Query) -> Answer {
        match q {
            Query::Credentials { login, password } => {
                Answer::Credentials(if login == "alice@example.org" && password.expose() == "pw" {
                    AuthOutcome::Success { login }
                } else {
                    AuthOutcome::Invalid
                })
            }
            Query::Sender { login, address } => {
                let owned = login.as_deref() == Some("alice@example.org")
                    && ["alice@example.org", "sales@example.org"].contains(&address.key().as_str());
                Answer::Sender(Some(SenderFacts {
                    domain_hosted: address.domain() == "example.org",
                    owned_by_login: owned,
                }))
            }
            Query::Recipient { address, .. } => {
                let hosted = address.domain() == "example.org";
                let mailboxes = match address.key().as_str() {
                    "alice@example.org" => vec!["alice@example.org".to_string()],
                    "bob@example.org" | "postmaster@example.org" => vec!["bob@example.org".to_string()],
                    "sales@example.org" => vec!["alice@example.org".to_string(), "bob@example.org".to_string()],
                    "full@example.org" => vec!["full@example.org".to_string()],
                    _ => vec![],
                };
                let over_quota = mailboxes.iter().filter(|m| m.as_str() == "full@example.org").cloned().collect();
                Answer::Recipient(Some(RecipientFacts { domain_hosted: hosted, mailboxes, over_quota }))
            }
            Query::Enqueue { envelope, message } => {
                if self.queue_fails {
                    return Answer::Enqueued(EnqueueOutcome::TempFail);
                }
                self.queued.push((envelope, message));
                Answer::Enqueued(EnqueueOutcome::Queued { id: format!("Q{}", self.queued.len()) })
            }
        }
    }

    /// EHLO, STARTTLS, EHLO, AUTH PLAIN as alice.
    fn authenticated(port: Port) -> Harness {
        let mut h = Harness::greeted(port);
        if !matches!(port, Port::Submissions) {
            h.send(b"EHLO c\r\n");
            assert_eq!(h.send(b"STARTTLS\r\n"), "220 2.0.0 Ready to start TLS\r\n");
        }
        h.send(b"EHLO c\r\n");
        assert_eq!(
            h.send(format!("AUTH PLAIN {}\r\n", b64("\0alice@example.org\0pw")).as_bytes()),
            "235 2.7.0 Authentication successful\r\n"
        );
        h
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

// RFC 5321 §4.1.1.1, RFC 2920, 1870, 6152, 6531, 2034, 3207.
#[test]
fn ehlo_lists_extensions_and_starttls_but_no_auth_before_tls() {
    let mut h = Harness::greeted(Port::Submission);
    assert_eq!(
        h.send(b"EHLO client.example\r\n"),
        "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
         250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 STARTTLS\r\n"
    );
    h.send(b"STARTTLS\r\n");
    assert_eq!(h.tls_starts, 1);
    let after = h.send(b"EHLO client.example\r\n");
    assert!(after.contains("250 AUTH PLAIN LOGIN\r\n"), "{after}");
    assert!(!after.contains("STARTTLS"), "{after}");
}

#[test]
fn mx_port_offers_no_auth_even_after_tls() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    h.send(b"STARTTLS\r\n");
    let after = h.send(b"EHLO c\r\n");
    assert!(!after.contains("AUTH"), "{after}");
    assert_eq!(h.send(b"AUTH PLAIN AGFAYg==\r\n"), "502 5.5.1 AUTH not available on this port\r\n");
}

// RFC 4954 §4 and RFC 8314: no plaintext passwords.
#[test]
fn auth_before_tls_is_refused() {
    let mut h = Harness::greeted(Port::Submission);
    h.send(b"EHLO c\r\n");
    let r = h.send(format!("AUTH PLAIN {}\r\n", b64("\0alice@example.org\0pw")).as_bytes());
    assert_eq!(r, "538 5.7.11 Encryption required for requested authentication mechanism\r\n");
    assert_eq!(h.s.login(), None);
}

// RFC 6409 §4.3 / RFC 3207 §4: submission needs TLS, then AUTH, for MAIL.
#[test]
fn submission_requires_tls_then_auth() {
    let mut h = Harness::greeted(Port::Submission);
    h.send(b"EHLO c\r\n");
    assert_eq!(h.send(b"MAIL FROM:<alice@example.org>\r\n"), "530 5.7.0 Must issue a STARTTLS command first\r\n");
    h.send(b"STARTTLS\r\n");
    h.send(b"EHLO c\r\n");
    assert_eq!(h.send(b"MAIL FROM:<alice@example.org>\r\n"), "530 5.7.0 Authentication required\r\n");
}

#[test]
fn starttls_forgets_the_earlier_session_state() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    h.send(b"STARTTLS\r\n");
    assert_eq!(h.send(b"MAIL FROM:<x@remote.example>\r\n"), "503 5.5.1 Send HELO/EHLO first\r\n");
    assert_eq!(h.send(b"STARTTLS\r\n"), "503 5.5.1 TLS already active\r\n");
    let mut h = Harness::greeted(Port::Mx);
    assert_eq!(h.send(b"STARTTLS\r\n"), "503 5.5.1 Send EHLO first\r\n");
}

// CVE-2011-0411: plaintext commands pipelined after STARTTLS.
#[test]
fn commands_injected_after_starttls_close_the_session() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    let r = h.send(b"STARTTLS\r\nMAIL FROM:<x@remote.example>\r\n");
    assert_eq!(r, "554 5.5.0 SMTP protocol synchronization error: commands sent before the reply\r\n");
    assert!(h.closed);
    assert_eq!(h.tls_starts, 0);
}

#[test]
fn auth_plain_and_login_succeed_with_the_right_password() {
    let mut h = Harness::authenticated(Port::Submission);
    assert_eq!(h.s.login(), Some("alice@example.org"));
    assert_eq!(h.send(b"AUTH PLAIN =\r\n"), "503 5.5.1 Already authenticated\r\n");

    let mut h = Harness::greeted(Port::Submissions);
    h.send(b"EHLO c\r\n");
    assert_eq!(h.send(b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(h.send(format!("{}\r\n", b64("alice@example.org")).as_bytes()), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(h.send(format!("{}\r\n", b64("pw")).as_bytes()), "235 2.7.0 Authentication successful\r\n");

    let mut h = Harness::greeted(Port::Submissions);
    h.send(b"EHLO c\r\n");
    assert_eq!(h.send(b"AUTH PLAIN\r\n"), "334 \r\n");
    assert_eq!(
        h.send(format!("{}\r\n", b64("alice@example.org\0alice@example.org\0pw")).as_bytes()),
        "235 2.7.0 Authentication successful\r\n"
    );
}

#[test]
fn wrong_passwords_fail_and_three_failures_close() {
    let mut h = Harness::greeted(Port::Submissions);
    h.send(b"EHLO c\r\n");
    let bad = format!("AUTH PLAIN {}\r\n", b64("\0alice@example.org\0wrong"));
    assert_eq!(h.send(bad.as_bytes()), "535 5.7.8 Authentication credentials invalid\r\n");
    // Acting for another login (authzid) is refused without a query.
    let other = format!("AUTH PLAIN {}\r\n", b64("bob@example.org\0alice@example.org\0pw"));
    assert_eq!(h.send(other.as_bytes()), "535 5.7.8 Authentication credentials invalid\r\n");
    assert!(!h.closed);
    assert_eq!(
        h.send(bad.as_bytes()),
        "535 5.7.8 Authentication credentials invalid\r\n421 4.7.0 Too many authentication failures\r\n"
    );
    assert!(h.closed);
    assert_eq!(h.s.login(), None);
}

#[test]
fn auth_can_be_cancelled_and_garbage_is_refused() {
    let mut h = Harness::greeted(Port::Submissions);
    h.send(b"EHLO c\r\n");
    h.send(b"AUTH LOGIN\r\n");
    assert_eq!(h.send(b"*\r\n"), "501 5.0.0 Authentication cancelled\r\n");
    h.send(b"AUTH PLAIN\r\n");
    assert_eq!(h.send(b"!!!notbase64\r\n"), "501 5.5.4 Invalid base64 in AUTH response\r\n");
    assert_eq!(h.send(b"AUTH CRAM-MD5\r\n"), "504 5.5.4 Unrecognized authentication mechanism\r\n");
}

#[test]
fn authenticated_user_sends_to_remote_and_local_recipients() {
    let mut h = Harness::authenticated(Port::Submission);
    assert_eq!(h.send(b"MAIL FROM:<alice@example.org> SIZE=100\r\n"), "250 2.1.0 Sender ok\r\n");
    assert_eq!(h.send(b"RCPT TO:<carol@remote.example>\r\n"), "250 2.1.5 Recipient ok\r\n");
    assert_eq!(h.send(b"RCPT TO:<sales@example.org>\r\n"), "250 2.1.5 Recipient ok\r\n");
    assert_eq!(h.send(b"RCPT TO:<bob@example.org>\r\n"), "250 2.1.5 Recipient ok\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "354 End data with <CR><LF>.<CR><LF>\r\n");
    assert_eq!(h.send(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
    let (env, msg) = &h.queued[0];
    assert_eq!(msg, b"Subject: hi\r\n\r\n.dot\r\nbody\r\n");
    assert_eq!(env.login.as_deref(), Some("alice@example.org"));
    assert!(env.tls);
    assert_eq!(env.local, vec!["alice@example.org".to_string(), "bob@example.org".to_string()]);
    assert_eq!(env.remote, vec![Address::parse("carol@remote.example", false).unwrap()]);
    assert_eq!(env.from, ReversePath::Mailbox(Address::parse("alice@example.org", false).unwrap()));
}

// A mailbox over quota is refused temporarily at RCPT; the others still work.
#[test]
fn over_quota_recipient_gets_452_4_2_2() {
    let mut h = Harness::authenticated(Port::Submission);
    h.send(b"MAIL FROM:<alice@example.org>\r\n");
    assert_eq!(h.send(b"RCPT TO:<full@example.org>\r\n"), "452 4.2.2 Mailbox full, try again later\r\n");
    assert_eq!(h.send(b"RCPT TO:<bob@example.org>\r\n"), "250 2.1.5 Recipient ok\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "354 End data with <CR><LF>.<CR><LF>\r\n");
    h.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n");
    assert_eq!(h.queued[0].0.local, vec!["bob@example.org".to_string()]);
}

// The heart of "no spoofing".
#[test]
fn authenticated_user_may_only_use_owned_senders() {
    let mut h = Harness::authenticated(Port::Submissions);
    let refused = "553 5.7.1 Sender address rejected: not owned by the authenticated user\r\n";
    assert_eq!(h.send(b"MAIL FROM:<bob@example.org>\r\n"), refused);
    assert_eq!(h.send(b"MAIL FROM:<someone@remote.example>\r\n"), refused);
    assert_eq!(h.send(b"MAIL FROM:<>\r\n"), refused);
    assert_eq!(h.send(b"MAIL FROM:<Sales@Example.org>\r\n"), "250 2.1.0 Sender ok\r\n");
}

#[test]
fn unauthenticated_sender_in_a_hosted_domain_is_refused() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    assert_eq!(
        h.send(b"MAIL FROM:<alice@example.org>\r\n"),
        "553 5.7.1 Sender address rejected: authentication required for this domain\r\n"
    );
    assert_eq!(h.send(b"MAIL FROM:<>\r\n"), "250 2.1.0 Sender ok\r\n");
}

// The heart of "no open relay".
#[test]
fn unauthenticated_session_only_reaches_existing_local_users() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    h.send(b"MAIL FROM:<x@remote.example>\r\n");
    assert_eq!(h.send(b"RCPT TO:<victim@remote.example>\r\n"), "554 5.7.1 Relay access denied\r\n");
    assert_eq!(h.send(b"RCPT TO:<nobody@example.org>\r\n"), "550 5.1.1 Mailbox unavailable: no such user here\r\n");
    for trick in [
        "<victim%remote.example@example.org>",
        "<remote.example!victim@example.org>",
        "<@example.org:victim@remote.example>",
        "<\"victim@remote.example\"@example.org>",
        "<victim@[192.0.2.1]>",
    ] {
        let r = h.send(format!("RCPT TO:{trick}\r\n").as_bytes());
        assert!(r.starts_with("553 5.1.3 "), "{trick}: {r}");
    }
    assert_eq!(h.send(b"DATA\r\n"), "554 5.5.1 No valid recipients\r\n");
    assert_eq!(h.send(b"RCPT TO:<Postmaster>\r\n"), "250 2.1.5 Recipient ok\r\n");
    h.send(b"DATA\r\n");
    assert_eq!(h.send(b"hi\r\n.\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
    assert_eq!(h.queued[0].0.local, vec!["bob@example.org".to_string()]);
    assert!(h.queued[0].0.remote.is_empty());
}

#[test]
fn talking_before_the_greeting_is_refused() {
    let mut h = Harness::new(Port::Mx);
    h.s.handle_input(b"EHLO eager\r\n");
    assert_eq!(h.drive(), "");
    h.s.greet();
    assert_eq!(h.drive(), "554 5.5.0 SMTP protocol synchronization error: commands sent before the reply\r\n");
    assert!(h.closed);
}

// RFC 2920 §3.1: MAIL, RCPT and RSET may be pipelined; DATA ends a group.
#[test]
fn pipelined_envelope_is_accepted() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    let r =
        h.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n");
    assert_eq!(r, "250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n250 2.1.5 Recipient ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
    assert_eq!(h.send(b"x\r\n.\r\nQUIT\r\n"), "250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n");
}

#[test]
fn pipelining_past_a_group_end_closes_the_session() {
    for (setup, burst) in [
        (
            &b"EHLO c\r\nMAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"[..],
            &b"DATA\r\nSubject: smuggled\r\n"[..],
        ),
        (&b""[..], &b"EHLO c\r\nMAIL FROM:<x@remote.example>\r\n"[..]),
        // Without EHLO there is no PIPELINING at all.
        (&b"HELO c\r\n"[..], &b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"[..]),
        (&b"EHLO c\r\n"[..], &b"NOOP\r\nNOOP\r\n"[..]),
    ] {
        let mut h = Harness::greeted(Port::Mx);
        if !setup.is_empty() {
            for line in setup.split_inclusive(|&b| b == b'\n') {
                h.send(line);
            }
        }
        let r = h.send(burst);
        assert!(
            r.ends_with("554 5.5.0 SMTP protocol synchronization error: commands sent before the reply\r\n"),
            "{r}"
        );
        assert!(h.closed);
        assert!(h.queued.is_empty());
    }
}

fn in_data(port: Port) -> Harness {
    let mut h = Harness::greeted(port);
    h.send(b"EHLO c\r\n");
    h.send(b"MAIL FROM:<x@remote.example>\r\n");
    h.send(b"RCPT TO:<alice@example.org>\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "354 End data with <CR><LF>.<CR><LF>\r\n");
    h
}

// SMTP smuggling (CVE-2023-51764 family): only CRLF.CRLF ends DATA, and any
// bare CR or LF closes the session without queueing.
#[test]
fn bare_newlines_in_data_close_without_queueing() {
    for body in [
        &b"Subject: a\r\n\n.\n\r\nMAIL FROM:<x@remote.example>\r\n.\r\n"[..],
        &b"Subject: a\r\n\r.\r\n"[..],
        &b"Subject: a\n.\r\n"[..],
        &b"Subject: a\r\n.\n"[..],
        &b"a\rb\r\n.\r\n"[..],
    ] {
        let mut h = in_data(Port::Mx);
        let r = h.send(body);
        assert_eq!(r, "521 5.5.2 Bare <CR> or <LF> received; lines must end in <CR><LF>\r\n", "{body:?}");
        assert!(h.closed);
        assert!(h.queued.is_empty());
    }
}

#[test]
fn bare_newlines_in_commands_close() {
    let mut h = Harness::greeted(Port::Mx);
    assert_eq!(h.send(b"EHLO c\n"), "521 5.5.2 Bare <CR> or <LF> received; lines must end in <CR><LF>\r\n");
    assert!(h.closed);
    let mut h = Harness::greeted(Port::Mx);
    assert_eq!(h.send(b"EHLO c\rMAIL\r\n"), "521 5.5.2 Bare <CR> or <LF> received; lines must end in <CR><LF>\r\n");
}

#[test]
fn data_fed_one_byte_at_a_time_is_the_same_message() {
    let body = b"Subject: t\r\n\r\n.leading\r\n...\r\nend\r\n.\r\n";
    let mut h = in_data(Port::Mx);
    for b in body {
        h.send(&[*b]);
    }
    assert_eq!(h.queued.len(), 1);
    assert_eq!(h.queued[0].1, b"Subject: t\r\n\r\nleading\r\n..\r\nend\r\n");
}

#[test]
fn oversized_messages_are_refused() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    assert_eq!(
        h.send(b"MAIL FROM:<x@remote.example> SIZE=10001\r\n"),
        "552 5.3.4 Message size exceeds fixed limit\r\n"
    );
    let mut h = in_data(Port::Mx);
    let line = format!("{}\r\n", "a".repeat(98));
    let mut r = String::new();
    for _ in 0..101 {
        r.push_str(&h.send(line.as_bytes()));
    }
    assert_eq!(r, "");
    assert_eq!(h.send(b".\r\n"), "552 5.3.4 Message size exceeds fixed limit\r\n");
    assert!(h.queued.is_empty());
    // The session goes on.
    assert_eq!(h.send(b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
}

// RFC 5321 §4.5.3.1.6: 1000 octets per line including CRLF.
#[test]
fn long_lines_are_bounded() {
    let mut h = in_data(Port::Mx);
    h.send(format!("{}\r\n", "a".repeat(998)).as_bytes());
    h.send("b".repeat(5000).as_bytes());
    h.send(b"\r\n");
    assert_eq!(h.send(b".\r\n"), "554 5.6.0 Message has lines longer than 998 characters\r\n");
    assert!(h.queued.is_empty());
    assert_eq!(h.s.buffered_input_bytes(), 0);

    let mut h = Harness::greeted(Port::Mx);
    assert_eq!(h.send("x".repeat(COMMAND_LINE_BYTES_MAX).as_bytes()), "500 5.5.6 Line too long\r\n");
    assert!(h.closed);
}

#[test]
fn recipients_are_limited_per_message() {
    let mut h = Harness::authenticated(Port::Submissions);
    h.send(b"MAIL FROM:<alice@example.org>\r\n");
    for i in 0..RECIPIENTS_PER_MESSAGE_MAX {
        assert_eq!(h.send(format!("RCPT TO:<r{i}@remote.example>\r\n").as_bytes()), "250 2.1.5 Recipient ok\r\n");
    }
    assert_eq!(h.send(b"RCPT TO:<one-more@remote.example>\r\n"), "452 4.5.3 Too many recipients\r\n");
}

#[test]
fn too_many_errors_close_the_session() {
    let mut h = Harness::greeted(Port::Mx);
    let mut last = String::new();
    for _ in 0..ERRORS_PER_SESSION_MAX {
        last = h.send(b"BOGUS\r\n");
    }
    assert_eq!(last, "500 5.5.1 Command unrecognized\r\n421 4.7.0 Too many errors, closing connection\r\n");
    assert!(h.closed);
    assert_eq!(h.send(b"NOOP\r\n"), "");
}

#[test]
fn sequence_errors_and_disabled_commands() {
    let mut h = Harness::greeted(Port::Mx);
    assert_eq!(h.send(b"MAIL FROM:<x@remote.example>\r\n"), "503 5.5.1 Send HELO/EHLO first\r\n");
    h.send(b"HELO c\r\n");
    assert_eq!(h.send(b"MAIL FROM:<x@remote.example> SIZE=1\r\n"), "555 5.5.4 MAIL parameters need EHLO\r\n");
    assert_eq!(h.send(b"RCPT TO:<alice@example.org>\r\n"), "503 5.5.1 Need MAIL command\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "503 5.5.1 Need MAIL command\r\n");
    assert_eq!(h.send(b"VRFY alice\r\n"), "502 5.5.1 VRFY command is disabled\r\n");
    assert_eq!(h.send(b"EXPN staff\r\n"), "502 5.5.1 EXPN command is disabled\r\n");
    h.send(b"MAIL FROM:<x@remote.example>\r\n");
    assert_eq!(h.send(b"MAIL FROM:<x@remote.example>\r\n"), "503 5.5.1 Nested MAIL command\r\n");
    assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 Ok\r\n");
    assert_eq!(h.send(b"RCPT TO:<alice@example.org>\r\n"), "503 5.5.1 Need MAIL command\r\n");
}

#[test]
fn smtputf8_recipients_need_the_mail_parameter() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    h.send(b"MAIL FROM:<x@remote.example>\r\n");
    assert_eq!(
        h.send("RCPT TO:<jö@example.org>\r\n".as_bytes()),
        "553 5.1.3 Bad recipient address: non-ASCII address needs SMTPUTF8\r\n"
    );
}

#[test]
fn queue_failure_is_a_temporary_error() {
    let mut h = in_data(Port::Mx);
    h.queue_fails = true;
    assert_eq!(h.send(b"x\r\n.\r\n"), "451 4.3.0 Temporary local problem, try again later\r\n");
    assert_eq!(h.send(b"RCPT TO:<alice@example.org>\r\n"), "503 5.5.1 Need MAIL command\r\n");
}

#[test]
fn timeout_and_shutdown_close_with_421() {
    let mut h = Harness::greeted(Port::Mx);
    h.s.handle_timeout();
    assert_eq!(h.drive(), "421 4.4.2 Timeout, closing connection\r\n");
    assert!(h.closed);
    let mut h = in_data(Port::Mx);
    assert_eq!(h.s.read_timeout_secs(), DATA_BLOCK_TIMEOUT_SECS);
    h.s.handle_shutdown();
    assert_eq!(h.drive(), "421 4.3.2 Service shutting down, closing connection\r\n");
}

#[test]
fn secrets_do_not_print() {
    let q = Query::Credentials { login: "alice".into(), password: Secret::new("hunter2".into()) };
    assert!(!format!("{q:?}").contains("hunter2"));
}

/// A seeded random walk over the session API: no panics, replies always
/// end in CRLF, nothing is queued over the size limit.
#[test]
fn random_inputs_never_panic() {
    let pieces: [&[u8]; 14] = [
        b"EHLO c\r\n",
        b"MAIL FROM:<x@remote.example>\r\n",
        b"RCPT TO:<alice@example.org>\r\n",
        b"DATA\r\n",
        b".\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b"AUTH PLAIN\r\n",
        b"STARTTLS\r\n",
        b"x",
        b"RSET\r\n",
        b"\xff",
        b"..\r\n",
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..300 {
        let mut stream = vec![0u8];
        for _ in 0..40 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            stream.extend_from_slice(pieces[(state % pieces.len() as u64) as usize]);
        }
        stream[0] = (state >> 32) as u8;
        crate::smtp::fuzz::session(&stream);
    }
}

#[test]
fn overload_refuses_the_message_in_progress() {
    let mut h = in_data(Port::Mx);
    h.send(b"Subject: x\r\n");
    assert_eq!(h.s.message_bytes_buffered(), 12);
    h.s.handle_overload();
    assert_eq!(h.drive(), "452 4.3.1 Insufficient system storage, try again later\r\n");
    assert!(h.closed);
    assert_eq!(h.s.message_bytes_buffered(), 0);
    assert!(h.queued.is_empty());
}

/// An MX session with MAIL and one local RCPT done, ready for BDAT.
fn bdat_ready() -> Harness {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    assert_eq!(
        h.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<bob@example.org>\r\n"),
        "250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n"
    );
    h
}

// RFC 3030 §2-4: chunks are exact octet counts, no dot-stuffing, replies per
// chunk, and the message is queued after BDAT LAST.
#[test]
fn bdat_chunks_are_taken_verbatim_and_queued_after_last() {
    let mut h = bdat_ready();
    assert_eq!(h.send(b"BDAT 14\r\nSubject: x\r\n\r\n"), "250 2.0.0 14 octets received\r\n");
    // A chunk split across reads, with a line that DATA would unstuff.
    assert_eq!(h.send(b"BDAT 11 LAST\r\n.dot"), "");
    assert_eq!(h.s.message_bytes_buffered(), 18, "buffered chunks count against the memory budget");
    assert_eq!(h.send(b"\r\nend\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
    assert_eq!(h.queued[0].1, b"Subject: x\r\n\r\n.dot\r\nend\r\n");
    assert_eq!(h.queued[0].0.local, vec!["bob@example.org".to_string()]);
    assert_eq!(h.s.message_bytes_buffered(), 0);
    // Pipelined: a whole transaction in one write, BDAT 0 LAST included.
    let r =
        h.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<bob@example.org>\r\nBDAT 3\r\nab\nBDAT 0 LAST\r\nQUIT\r\n");
    assert_eq!(
        r,
        "250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n250 2.0.0 3 octets received\r\n\
         554 5.6.0 Message has bare <CR> or <LF>; lines must end in <CR><LF>\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(h.queued.len(), 1);
}

#[test]
fn bdat_message_without_final_crlf_gets_one() {
    let mut h = bdat_ready();
    assert_eq!(h.send(b"BDAT 10 LAST\r\nSubject: x"), "250 2.0.0 Ok: queued as Q1\r\n");
    assert_eq!(h.queued[0].1, b"Subject: x\r\n");
}

// Refused chunks are still read, so their bytes are never commands.
#[test]
fn refused_bdat_chunks_are_skipped_not_parsed() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    assert_eq!(h.send(b"BDAT 6 LAST\r\nQUIT\r\n"), "503 5.5.1 Need MAIL command\r\n");
    assert!(!h.closed);
    h.send(b"MAIL FROM:<x@remote.example>\r\n");
    assert_eq!(h.send(b"BDAT 6 LAST\r\nRSET\r\n"), "554 5.5.1 No valid recipients\r\n");
    let mut h = bdat_ready();
    assert_eq!(h.send(b"BDAT 2\r\nab"), "250 2.0.0 2 octets received\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "503 5.5.1 DATA not allowed after BDAT\r\n");
    assert!(h.queued.is_empty());
}

#[test]
fn bdat_limits_close_the_session() {
    // Over the size limit (10 000 here) across chunks: 552 and close, unread.
    let mut h = bdat_ready();
    h.send(b"BDAT 6000\r\n");
    h.send(&vec![b'a'; 6000]);
    assert_eq!(h.send(b"BDAT 6000 LAST\r\n"), "552 5.3.4 Message size exceeds fixed limit\r\n");
    assert!(h.closed);
    assert_eq!(h.s.message_bytes_buffered(), 0);
    // A size that is not a number cannot be skipped.
    let mut h = bdat_ready();
    assert_eq!(h.send(b"BDAT lots\r\nxyz"), "501 5.5.4 BDAT needs a chunk size and optionally LAST\r\n");
    assert!(h.closed);
    // Long lines, as with DATA.
    let mut h = bdat_ready();
    let mut msg = vec![b'a'; 999];
    msg.extend_from_slice(b"\r\n");
    h.send(format!("BDAT {} LAST\r\n", msg.len()).as_bytes());
    assert_eq!(h.send(&msg), "554 5.6.0 Message has lines longer than 998 characters\r\n");
    let mut ok = vec![b'a'; 998];
    ok.extend_from_slice(b"\r\n");
    h.send(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<bob@example.org>\r\n");
    h.send(format!("BDAT {} LAST\r\n", ok.len()).as_bytes());
    assert_eq!(h.send(&ok), "250 2.0.0 Ok: queued as Q1\r\n");
}

// Issue 20: every error reply is reported with its command (and the RCPT
// argument) for the shell's `reject:` log line; AUTH arguments never are.
#[test]
fn error_replies_are_reported_as_rejections_with_their_command() {
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    assert_eq!(h.s.poll_rejection(), None);
    h.send(b"MAIL FROM:<x@remote.example>\r\n");
    h.send(b"RCPT TO:<victim@remote.example>\r\n");
    assert_eq!(
        h.s.poll_rejection(),
        Some(Rejection {
            command: "RCPT",
            to: Some("victim@remote.example".into()),
            reply: "554 5.7.1 Relay access denied".into()
        })
    );
    assert_eq!(h.s.mail_from().as_deref(), Some("x@remote.example"));
    assert_eq!(h.s.helo(), Some("c"));
    h.send(b"AUTH PLAIN c2VjcmV0\r\n");
    let r = h.s.poll_rejection().expect("AUTH on the MX port is refused");
    assert_eq!((r.command, r.to), ("AUTH", None));
    assert!(!r.reply.contains("c2VjcmV0"));
    assert_eq!(h.s.poll_rejection(), None);
}

// RFC 5321 §4.1.3: an address literal is valid syntax in MAIL FROM. An
// unauthenticated sender from a literal reaches local users; a malformed
// literal is a syntax error (501); a general literal is a policy refusal.
#[test]
fn mail_from_an_address_literal_is_accepted_inbound() {
    for from in ["<x@[192.0.2.1]>", "<x@[IPv6:2001:db8::1]>"] {
        let mut h = Harness::greeted(Port::Mx);
        h.send(b"EHLO c\r\n");
        assert_eq!(h.send(format!("MAIL FROM:{from}\r\n").as_bytes()), "250 2.1.0 Sender ok\r\n", "{from}");
        assert_eq!(h.send(b"RCPT TO:<bob@example.org>\r\n"), "250 2.1.5 Recipient ok\r\n");
        assert_eq!(h.send(b"RCPT TO:<victim@remote.example>\r\n"), "554 5.7.1 Relay access denied\r\n");
        h.send(b"DATA\r\n");
        assert_eq!(h.send(b"hi\r\n.\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
        let ReversePath::Mailbox(sender) = &h.queued[0].0.from else { panic!("null sender queued") };
        assert!(sender.is_literal(), "{sender}");
    }
    let mut h = Harness::greeted(Port::Mx);
    h.send(b"EHLO c\r\n");
    for bad in ["<x@[999.1.1.1]>", "<x@[192.0.2.1>", "<x@[IPv6:2001:db8::zz]>"] {
        let r = h.send(format!("MAIL FROM:{bad}\r\n").as_bytes());
        assert!(r.starts_with("501 5.1.7 "), "{bad}: {r}");
    }
    assert_eq!(
        h.send(b"MAIL FROM:<x@[x-tag:content]>\r\n"),
        "550 5.7.1 Sender address rejected: this address literal is refused by policy\r\n"
    );
    assert_eq!(h.send(b"MAIL FROM:<x@remote.example>\r\n"), "250 2.1.0 Sender ok\r\n");
}

// Anti-spoofing still holds: a literal is no address an authenticated user
// owns, on submission and implicit TLS alike.
#[test]
fn authenticated_users_may_not_send_from_an_address_literal() {
    for port in [Port::Submission, Port::Submissions] {
        let mut h = Harness::authenticated(port);
        let r = h.send(b"MAIL FROM:<alice@[192.0.2.1]>\r\n");
        assert!(r.starts_with("553 5.7.1 "), "{r}");
        assert_eq!(h.send(b"MAIL FROM:<alice@example.org>\r\n"), "250 2.1.0 Sender ok\r\n");
    }
}
