//! Content filters run on a complete message before it is queued. The next
//! steps (clamd, SPF/DKIM/DMARC, DNSBL) plug in here.
//!
//! Main types: [`Filter`] (one check) and [`Verdict`].

use crate::smtp::reply::Reply;
use crate::smtp::session::Envelope;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Refuse permanently; the reply must be 5xx.
    Reject(Reply),
    /// Refuse for now; the reply must be 4xx.
    Defer(Reply),
}

/// A check on an envelope and its message. Filters run in order; the first
/// verdict other than `Accept` wins.
pub trait Filter: Send + Sync {
    fn name(&self) -> &str;
    fn check(&self, envelope: &Envelope, message: &[u8]) -> Verdict;
}

/// Runs filters in order. A filter that returns a reply of the wrong class
/// is treated as deferring: a bug in a filter must not lose mail.
pub fn run(filters: &[Box<dyn Filter>], envelope: &Envelope, message: &[u8]) -> Verdict {
    for f in filters {
        match f.check(envelope, message) {
            Verdict::Accept => continue,
            Verdict::Reject(r) if (500..600).contains(&r.code) => return Verdict::Reject(r),
            Verdict::Defer(r) if (400..500).contains(&r.code) => return Verdict::Defer(r),
            other => {
                tracing::error!(filter = f.name(), verdict = ?other, "filter returned a reply of the wrong class; deferring");
                return Verdict::Defer(crate::smtp::reply::temp_failure());
            }
        }
    }
    Verdict::Accept
}

/// Refuses messages without a `From:` header field (RFC 5322 §3.6 requires
/// one): the one built-in filter, and the example for new ones.
pub struct RequireFromHeader;

impl Filter for RequireFromHeader {
    fn name(&self) -> &str {
        "require-from-header"
    }

    fn check(&self, _envelope: &Envelope, message: &[u8]) -> Verdict {
        let header_end = message.windows(4).position(|w| w == b"\r\n\r\n").map_or(message.len(), |p| p + 2);
        let has_from = message[..header_end]
            .split(|&b| b == b'\n')
            .any(|line| line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"from:"));
        if has_from {
            Verdict::Accept
        } else {
            Verdict::Reject(Reply::new(550, (5, 6, 0), "Message has no From: header field"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::smtp::address::ReversePath;
    use crate::smtp::command::Body;

    fn envelope() -> Envelope {
        Envelope {
            helo: "c".into(),
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
            tls: false,
            login: None,
            from: ReversePath::Null,
            local: vec![],
            remote: vec![],
            smtputf8: false,
            body: Body::SevenBit,
        }
    }

    struct Fixed(Verdict);
    impl Filter for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn check(&self, _: &Envelope, _: &[u8]) -> Verdict {
            self.0.clone()
        }
    }

    #[test]
    fn first_refusal_wins_and_wrong_classes_defer() {
        let reject = Reply::new(554, (5, 7, 1), "virus");
        let defer = Reply::new(451, (4, 7, 1), "later");
        let filters: Vec<Box<dyn Filter>> = vec![
            Box::new(Fixed(Verdict::Accept)),
            Box::new(Fixed(Verdict::Reject(reject.clone()))),
            Box::new(Fixed(Verdict::Defer(defer))),
        ];
        assert_eq!(run(&filters, &envelope(), b""), Verdict::Reject(reject));
        let broken: Vec<Box<dyn Filter>> = vec![Box::new(Fixed(Verdict::Reject(Reply::new(250, (2, 0, 0), "oops"))))];
        assert!(matches!(run(&broken, &envelope(), b""), Verdict::Defer(r) if r.code == 451));
        assert_eq!(run(&[], &envelope(), b""), Verdict::Accept);
    }

    #[test]
    fn from_header_is_required_in_the_header_section() {
        let f = RequireFromHeader;
        assert_eq!(f.check(&envelope(), b"Subject: x\r\nFROM: a@b\r\n\r\nbody\r\n"), Verdict::Accept);
        assert!(matches!(f.check(&envelope(), b"Subject: x\r\n\r\nFrom: in body\r\n"), Verdict::Reject(_)));
        assert!(matches!(f.check(&envelope(), b""), Verdict::Reject(_)));
    }
}
