//! Entry points shared by the fuzz targets: arbitrary bytes must never
//! panic the parser or the session, and the session's output must stay
//! well-formed.

use std::net::{IpAddr, Ipv4Addr};

use super::address::Address;
use super::command;
use super::policy::{RecipientFacts, SenderFacts};
use super::session::{Answer, AuthOutcome, EnqueueOutcome, Event, Query, Session, SessionConfig};

/// Every line of `data` through the command parser.
pub fn commands(data: &[u8]) {
    for line in data.split(|&b| b == b'\n') {
        let _ = command::parse(line);
    }
}

/// `data` as a client's byte stream into a session (fed in chunks whose
/// sizes come from the first bytes), answering every query.
pub fn session(data: &[u8]) {
    let Some((&chunk_seed, data)) = data.split_first() else { return };
    let chunk = usize::from(chunk_seed % 64) + 1;
    let postmaster = Address::parse("postmaster@example.org", false).expect("constant address");
    let config = SessionConfig {
        hostname: "mx.example.org".into(),
        starttls: true,
        auth: true,
        auth_required: false,
        tls_required: false,
        message_bytes_max: 4096,
        postmaster,
    };
    let mut s = Session::new(config, IpAddr::V4(Ipv4Addr::LOCALHOST), chunk_seed & 1 == 1);
    s.greet();
    for piece in data.chunks(chunk) {
        if s.is_closed() {
            break;
        }
        s.handle_input(piece);
        drive(&mut s);
    }
}

fn drive(s: &mut Session) {
    loop {
        while let Some(out) = s.poll_transmit() {
            assert!(out.ends_with(b"\r\n"), "reply without CRLF");
        }
        match s.poll_event() {
            None => return,
            Some(Event::Close) => {}
            Some(Event::StartTls) => s.handle_tls_established(),
            Some(Event::Query(q)) => {
                let answer = match q {
                    Query::Credentials { login, .. } => Answer::Credentials(if login == "ok" {
                        AuthOutcome::Success { login }
                    } else {
                        AuthOutcome::Invalid
                    }),
                    Query::Sender { .. } => {
                        Answer::Sender(Some(SenderFacts { domain_hosted: false, owned_by_login: true }))
                    }
                    Query::Recipient { address, .. } => Answer::Recipient(Some(RecipientFacts {
                        domain_hosted: address.domain() == "example.org",
                        mailboxes: vec![address.key()],
                        over_quota: vec![],
                    })),
                    Query::Enqueue { message, .. } => {
                        assert!(message.len() <= 4096);
                        Answer::Enqueued(EnqueueOutcome::Queued { id: "x".into() })
                    }
                };
                s.handle_answer(answer);
            }
        }
    }
}
