//! Relay and anti-spoofing rules as pure functions of facts the shell
//! looked up in the directory. Routing tricks never reach here: the
//! address parser refuses them.
//!
//! **Invariant:** relaying to a domain we do not host needs an
//! authenticated session; never a source IP.

use super::reply::{self, Reply};

/// What the directory knows about a MAIL FROM address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderFacts {
    /// The address's domain is one we host.
    pub domain_hosted: bool,
    /// The authenticated login may send as this address (sender login map).
    pub owned_by_login: bool,
}

/// What the directory knows about a RCPT TO address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientFacts {
    pub domain_hosted: bool,
    /// Local mailboxes the address resolves to (aliases and catch-alls
    /// expanded); empty when no such user exists.
    pub mailboxes: Vec<String>,
    /// Those of `mailboxes` already at or over their quota, or without
    /// room for the size MAIL declared.
    pub over_quota: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderDecision {
    Accept,
    Reject(Reply),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientDecision {
    /// Deliver to these local mailboxes.
    Local(Vec<String>),
    /// Queue for remote delivery (authenticated sessions only).
    Relay,
    Reject(Reply),
}

/// MAIL FROM: an authenticated login may only use addresses it owns (and
/// not `<>`); an unauthenticated session may not claim a hosted domain.
/// `null_sender` is true for `<>`, in which case `facts` is ignored.
pub fn sender_decision(authenticated: bool, null_sender: bool, facts: SenderFacts) -> SenderDecision {
    match (authenticated, null_sender) {
        (true, true) => SenderDecision::Reject(reply::sender_not_owned()),
        (true, false) if facts.owned_by_login => SenderDecision::Accept,
        (true, false) => SenderDecision::Reject(reply::sender_not_owned()),
        (false, true) => SenderDecision::Accept,
        (false, false) if facts.domain_hosted => SenderDecision::Reject(reply::sender_hosted_unauthenticated()),
        (false, false) => SenderDecision::Accept,
    }
}

/// RCPT TO: hosted domains accept existing mailboxes from anyone; other
/// domains only from authenticated sessions. A recipient whose mailboxes
/// are all over quota gets a temporary 452 4.2.2; if only some are (an
/// alias), it is accepted and delivery defers the full ones.
pub fn recipient_decision(authenticated: bool, facts: RecipientFacts) -> RecipientDecision {
    let all_full = !facts.mailboxes.is_empty() && facts.mailboxes.iter().all(|m| facts.over_quota.contains(m));
    if facts.domain_hosted && all_full {
        return RecipientDecision::Reject(reply::mailbox_full());
    }
    match (facts.domain_hosted, facts.mailboxes.is_empty(), authenticated) {
        (true, false, _) => RecipientDecision::Local(facts.mailboxes),
        (true, true, _) => RecipientDecision::Reject(reply::unknown_user()),
        (false, _, true) => RecipientDecision::Relay,
        (false, _, false) => RecipientDecision::Reject(reply::relay_denied()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every combination of inputs, with the expected outcome written out.
    #[test]
    fn sender_decisions_exhaustive() {
        let cases = [
            // (authenticated, null, hosted, owned) -> accepted?
            (false, false, false, false, true),
            (false, false, false, true, true),
            (false, false, true, false, false),
            (false, false, true, true, false),
            (false, true, false, false, true),
            (false, true, true, true, true),
            (true, false, false, false, false),
            (true, false, false, true, true),
            (true, false, true, false, false),
            (true, false, true, true, true),
            (true, true, false, false, false),
            (true, true, true, true, false),
        ];
        for (auth, null, hosted, owned, accepted) in cases {
            let d = sender_decision(auth, null, SenderFacts { domain_hosted: hosted, owned_by_login: owned });
            assert_eq!(
                d == SenderDecision::Accept,
                accepted,
                "auth={auth} null={null} hosted={hosted} owned={owned}: {d:?}"
            );
            if let SenderDecision::Reject(r) = d {
                assert_eq!((r.code, r.enhanced), (553, Some((5, 7, 1))));
            }
        }
    }

    #[test]
    fn recipient_decisions_exhaustive() {
        let boxes = vec!["bob@example.org".to_string()];
        for auth in [false, true] {
            let local = recipient_decision(
                auth,
                RecipientFacts { domain_hosted: true, mailboxes: boxes.clone(), over_quota: vec![] },
            );
            assert_eq!(local, RecipientDecision::Local(boxes.clone()));
            let unknown =
                recipient_decision(auth, RecipientFacts { domain_hosted: true, mailboxes: vec![], over_quota: vec![] });
            assert_eq!(unknown, RecipientDecision::Reject(reply::unknown_user()));
            let full = recipient_decision(
                auth,
                RecipientFacts { domain_hosted: true, mailboxes: boxes.clone(), over_quota: boxes.clone() },
            );
            assert_eq!(full, RecipientDecision::Reject(reply::mailbox_full()));
            // An alias with room in one of its mailboxes is accepted.
            let two = vec!["bob@example.org".to_string(), "carol@example.org".to_string()];
            let partly = recipient_decision(
                auth,
                RecipientFacts { domain_hosted: true, mailboxes: two.clone(), over_quota: boxes.clone() },
            );
            assert_eq!(partly, RecipientDecision::Local(two));
        }
        let remote = RecipientFacts { domain_hosted: false, mailboxes: vec![], over_quota: vec![] };
        assert_eq!(recipient_decision(true, remote.clone()), RecipientDecision::Relay);
        assert_eq!(recipient_decision(false, remote), RecipientDecision::Reject(reply::relay_denied()));
        // Mailboxes without a hosted domain cannot happen from the directory,
        // but must not open a relay if they did.
        let odd = RecipientFacts { domain_hosted: false, mailboxes: boxes, over_quota: vec![] };
        assert_eq!(recipient_decision(false, odd), RecipientDecision::Reject(reply::relay_denied()));
    }
}
