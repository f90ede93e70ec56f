//! Mailbox paths in MAIL FROM and RCPT TO (RFC 5321 §4.1.2), parsed
//! strictly: every form that could route mail somewhere other than where
//! its domain says is refused here, before any policy runs.
//!
//! Refused forms (each has its own [`AddressError`] and test):
//! source routes (`<@a,@b:u@c>`), `%` hacks (`u%other@us`), bang paths
//! (`other!u@us`), quoted local parts containing `@`, `%` or `!`, address
//! literals (`u@[192.0.2.1]`) anywhere but in MAIL FROM, and non-ASCII
//! without SMTPUTF8. In MAIL FROM an IPv4 or `IPv6:` literal is valid
//! syntax (RFC 5321 §4.1.3) and parses (see [`Address::is_literal`]); a
//! malformed one is a syntax error.
//!
//! Main types: [`Address`], [`ReversePath`], [`ForwardPath`].

use std::fmt;

use crate::limits::{DOMAIN_BYTES_MAX, LOCAL_PART_BYTES_MAX, PATH_BYTES_MAX};

/// `local@domain`, with the domain lowercased. The local part keeps its
/// case; [`Address::key`] is the lowercased form used for lookups.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Address {
    local: String,
    domain: String,
}

impl Address {
    /// Parses a bare `local@domain` (no angle brackets), with the same rules
    /// as paths in commands. Used by the CLI and the directory.
    pub fn parse(s: &str, utf8_allowed: bool) -> Result<Address, AddressError> {
        if s.len() > PATH_BYTES_MAX {
            return Err(AddressError::TooLong);
        }
        parse_mailbox(s, utf8_allowed, false)
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The lowercased address: the key of every directory lookup.
    pub fn key(&self) -> String {
        format!("{}@{}", self.local.to_lowercase(), self.domain)
    }

    /// The domain is an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`),
    /// which only a reverse path may carry. No hosted domain is a literal.
    pub fn is_literal(&self) -> bool {
        self.domain.starts_with('[')
    }

    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The argument of MAIL FROM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReversePath {
    /// `<>`: bounces and other notifications (RFC 5321 §4.5.5).
    Null,
    Mailbox(Address),
}

/// The argument of RCPT TO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardPath {
    /// `<Postmaster>` without a domain (RFC 5321 §4.1.1.3), which every
    /// server must accept.
    Postmaster,
    Mailbox(Address),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address must be enclosed in <>")]
    NotBracketed,
    #[error("address syntax error")]
    Syntax,
    #[error("address too long")]
    TooLong,
    #[error("source routes are not accepted")]
    SourceRoute,
    #[error("'%' in the local part is not accepted")]
    PercentHack,
    #[error("'!' in the local part is not accepted")]
    BangPath,
    #[error("quoted local parts containing '@', '%' or '!' are not accepted")]
    QuotedRouting,
    #[error("address literals are not accepted")]
    AddressLiteral,
    #[error("non-ASCII address needs SMTPUTF8")]
    NeedsSmtpUtf8,
    #[error("the null path <> is not a recipient")]
    NullRecipient,
}

/// Splits `<path> params` into the bracketed path (without brackets) and
/// the rest. Quoted strings may contain `>`.
pub fn split_path(arg: &str) -> Result<(&str, &str), AddressError> {
    let rest = arg.strip_prefix('<').ok_or(AddressError::NotBracketed)?;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '>' if !in_quotes => return Ok((&rest[..i], &rest[i + 1..])),
            _ => {}
        }
    }
    Err(AddressError::NotBracketed)
}

/// Parses the inside of MAIL FROM's brackets.
pub fn parse_reverse_path(inner: &str, utf8_allowed: bool) -> Result<ReversePath, AddressError> {
    if inner.is_empty() {
        return Ok(ReversePath::Null);
    }
    Ok(ReversePath::Mailbox(parse_path_inner(inner, utf8_allowed, true)?))
}

/// Parses the inside of RCPT TO's brackets.
pub fn parse_forward_path(inner: &str, utf8_allowed: bool) -> Result<ForwardPath, AddressError> {
    if inner.is_empty() {
        return Err(AddressError::NullRecipient);
    }
    if inner.eq_ignore_ascii_case("postmaster") {
        return Ok(ForwardPath::Postmaster);
    }
    Ok(ForwardPath::Mailbox(parse_path_inner(inner, utf8_allowed, false)?))
}

fn parse_path_inner(inner: &str, utf8_allowed: bool, literal_allowed: bool) -> Result<Address, AddressError> {
    if inner.len() > PATH_BYTES_MAX {
        return Err(AddressError::TooLong);
    }
    // RFC 5321 says to accept and ignore source routes; we refuse them, as
    // a route is an instruction to relay somewhere else.
    if inner.starts_with('@') {
        return Err(AddressError::SourceRoute);
    }
    parse_mailbox(inner, utf8_allowed, literal_allowed)
}

fn parse_mailbox(s: &str, utf8_allowed: bool, literal_allowed: bool) -> Result<Address, AddressError> {
    if !utf8_allowed && !s.is_ascii() {
        return Err(AddressError::NeedsSmtpUtf8);
    }
    let (local, domain) = if s.starts_with('"') {
        let end = quoted_end(s)?;
        let rest = &s[end..];
        let domain = rest.strip_prefix('@').ok_or(AddressError::Syntax)?;
        (check_quoted_local(&s[..end])?, domain)
    } else {
        let at = s.rfind('@').ok_or(AddressError::Syntax)?;
        let (local, domain) = (&s[..at], &s[at + 1..]);
        (check_dot_string(local)?, domain)
    };
    if local.len() > LOCAL_PART_BYTES_MAX {
        return Err(AddressError::TooLong);
    }
    let domain =
        if literal_allowed && domain.starts_with('[') { check_literal(domain)? } else { check_domain(domain)? };
    Ok(Address { local, domain })
}

/// Byte index just past the closing quote of a quoted string at the start of `s`.
fn quoted_end(s: &str) -> Result<usize, AddressError> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            return Ok(i + 1);
        }
    }
    Err(AddressError::Syntax)
}

/// A quoted local part (with its quotes). Its content must be printable and
/// free of routing characters; if it is a plain dot-string it is unquoted
/// (RFC 5321 §4.1.2 asks for the simplest form).
fn check_quoted_local(q: &str) -> Result<String, AddressError> {
    let body = &q[1..q.len() - 1];
    let mut content = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        let c = if c == '\\' { chars.next().ok_or(AddressError::Syntax)? } else { c };
        if c.is_control() {
            return Err(AddressError::Syntax);
        }
        content.push(c);
    }
    if content.contains(['@', '%', '!']) {
        return Err(AddressError::QuotedRouting);
    }
    if content.is_empty() {
        return Err(AddressError::Syntax);
    }
    if check_dot_string(&content).is_ok() {
        return Ok(content);
    }
    Ok(q.to_string())
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "#$&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii() && !c.is_control()
}

fn check_dot_string(local: &str) -> Result<String, AddressError> {
    if local.contains('%') {
        return Err(AddressError::PercentHack);
    }
    if local.contains('!') {
        return Err(AddressError::BangPath);
    }
    if local.contains('@') || local.contains(':') || local.contains(',') {
        return Err(AddressError::SourceRoute);
    }
    if local.is_empty() || local.split('.').any(|atom| atom.is_empty() || !atom.chars().all(is_atext)) {
        return Err(AddressError::Syntax);
    }
    Ok(local.to_string())
}

/// An address literal (RFC 5321 §4.1.3) in its canonical form:
/// `[192.0.2.1]` or `[IPv6:2001:db8::1]`. A malformed or unterminated
/// literal is a syntax error; a general literal (`[tag:content]`) has no
/// registered tag we could route by and is refused as a literal.
fn check_literal(domain: &str) -> Result<String, AddressError> {
    let inner = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')).ok_or(AddressError::Syntax)?;
    if inner.len() >= 5 && inner[..5].eq_ignore_ascii_case("IPv6:") {
        let ip: std::net::Ipv6Addr = inner[5..].parse().map_err(|_| AddressError::Syntax)?;
        return Ok(format!("[IPv6:{ip}]"));
    }
    if let Ok(ip) = inner.parse::<std::net::Ipv4Addr>() {
        return Ok(format!("[{ip}]"));
    }
    // RFC 5321's General-address-literal: `Standardized-tag ":" dcontent`.
    let general = inner.split_once(':').is_some_and(|(tag, content)| {
        let ldh = |c: char| c.is_ascii_alphanumeric() || c == '-';
        !tag.is_empty()
            && tag.chars().all(ldh)
            && !content.is_empty()
            && content.bytes().all(|b| (33..=126).contains(&b) && b != b'[' && b != b']' && b != b'\\')
    });
    Err(if general { AddressError::AddressLiteral } else { AddressError::Syntax })
}

/// A domain name (never a literal), lowercased, without a trailing dot.
pub fn check_domain(domain: &str) -> Result<String, AddressError> {
    if domain.starts_with('[') {
        return Err(AddressError::AddressLiteral);
    }
    if domain.is_empty() || domain.len() > DOMAIN_BYTES_MAX {
        return Err(if domain.is_empty() { AddressError::Syntax } else { AddressError::TooLong });
    }
    for label in domain.split('.') {
        let ldh = label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii() && c.is_alphanumeric());
        if label.is_empty() || label.len() > 63 || !ldh || label.starts_with('-') || label.ends_with('-') {
            return Err(AddressError::Syntax);
        }
    }
    Ok(domain.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(s: &str) -> Result<ForwardPath, AddressError> {
        let (inner, rest) = split_path(s)?;
        assert_eq!(rest, "");
        parse_forward_path(inner, false)
    }

    fn mailbox(local: &str, domain: &str) -> ForwardPath {
        ForwardPath::Mailbox(Address { local: local.into(), domain: domain.into() })
    }

    #[test]
    fn plain_addresses_parse_and_domains_are_lowercased() {
        assert_eq!(rcpt("<alice@Example.ORG>"), Ok(mailbox("alice", "example.org")));
        assert_eq!(rcpt("<a.b+tag@sub.example.org>"), Ok(mailbox("a.b+tag", "sub.example.org")));
        assert_eq!(rcpt("<Postmaster>"), Ok(ForwardPath::Postmaster));
        assert_eq!(rcpt("<postmaster>"), Ok(ForwardPath::Postmaster));
    }

    #[test]
    fn key_lowercases_the_local_part() {
        let a = Address::parse("Alice@Example.org", false).unwrap();
        assert_eq!(a.to_string(), "Alice@example.org");
        assert_eq!(a.key(), "alice@example.org");
    }

    // RFC 5321 §4.1.2 and Appendix C: source routes.
    #[test]
    fn source_routes_are_refused() {
        assert_eq!(rcpt("<@relay.example:bob@example.org>"), Err(AddressError::SourceRoute));
        assert_eq!(rcpt("<@a.example,@b.example:bob@example.org>"), Err(AddressError::SourceRoute));
        assert_eq!(rcpt("<bob:x@example.org>"), Err(AddressError::SourceRoute));
    }

    #[test]
    fn percent_hacks_are_refused() {
        assert_eq!(rcpt("<bob%victim.example@example.org>"), Err(AddressError::PercentHack));
        assert_eq!(rcpt("<bob%victim.example%other@example.org>"), Err(AddressError::PercentHack));
    }

    #[test]
    fn bang_paths_are_refused() {
        assert_eq!(rcpt("<victim.example!bob@example.org>"), Err(AddressError::BangPath));
        assert_eq!(rcpt("<a!b!c@example.org>"), Err(AddressError::BangPath));
    }

    #[test]
    fn quoted_local_parts_with_routing_characters_are_refused() {
        assert_eq!(rcpt("<\"bob@victim.example\"@example.org>"), Err(AddressError::QuotedRouting));
        assert_eq!(rcpt("<\"bob%victim.example\"@example.org>"), Err(AddressError::QuotedRouting));
        assert_eq!(rcpt("<\"victim!bob\"@example.org>"), Err(AddressError::QuotedRouting));
        assert_eq!(rcpt("<\"bob\\@victim.example\"@example.org>"), Err(AddressError::QuotedRouting));
    }

    #[test]
    fn quoted_plain_local_parts_are_unquoted() {
        assert_eq!(rcpt("<\"alice\"@example.org>"), Ok(mailbox("alice", "example.org")));
        assert_eq!(rcpt("<\"al ice\"@example.org>"), Ok(mailbox("\"al ice\"", "example.org")));
        assert_eq!(rcpt("<\"a>b\"@example.org>"), Ok(mailbox("\"a>b\"", "example.org")));
        assert_eq!(rcpt("<\"\"@example.org>"), Err(AddressError::Syntax));
        assert_eq!(rcpt("<\"unterminated@example.org>"), Err(AddressError::NotBracketed));
    }

    #[test]
    fn address_literals_are_refused() {
        assert_eq!(rcpt("<bob@[127.0.0.1]>"), Err(AddressError::AddressLiteral));
        assert_eq!(rcpt("<bob@[IPv6:::1]>"), Err(AddressError::AddressLiteral));
    }

    fn sender(s: &str) -> Result<ReversePath, AddressError> {
        let (inner, rest) = split_path(s)?;
        assert_eq!(rest, "");
        parse_reverse_path(inner, false)
    }

    // RFC 5321 §4.1.3: IPv4 and IPv6 address literals in MAIL FROM.
    #[test]
    fn sender_address_literals_parse_and_bad_ones_are_syntax_errors() {
        let a =
            |local: &str, domain: &str| ReversePath::Mailbox(Address { local: local.into(), domain: domain.into() });
        assert_eq!(sender("<x@[192.0.2.1]>"), Ok(a("x", "[192.0.2.1]")));
        assert_eq!(sender("<x@[IPv6:2001:DB8::1]>"), Ok(a("x", "[IPv6:2001:db8::1]")));
        assert_eq!(sender("<x@[ipv6:2001:db8:0:0:0:0:0:1]>"), Ok(a("x", "[IPv6:2001:db8::1]")));
        assert!(matches!(sender("<x@[192.0.2.1]>"), Ok(ReversePath::Mailbox(m)) if m.is_literal()));
        for bad in
            ["<x@[999.1.1.1]>", "<x@[192.0.2.1>", "<x@[192.0.2]>", "<x@[]>", "<x@[IPv6:2001:db8::g]>", "<x@[1.2.3.4]x>"]
        {
            assert_eq!(sender(bad), Err(AddressError::Syntax), "{bad}");
        }
        assert_eq!(sender("<x@[x-tag:whatever]>"), Err(AddressError::AddressLiteral));
        assert_eq!(Address::parse("x@[192.0.2.1]", false), Err(AddressError::AddressLiteral));
    }

    #[test]
    fn malformed_paths_are_refused() {
        assert_eq!(rcpt("bob@example.org"), Err(AddressError::NotBracketed));
        assert_eq!(rcpt("<bob@example.org"), Err(AddressError::NotBracketed));
        assert_eq!(rcpt("<>"), Err(AddressError::NullRecipient));
        for bad in [
            "<bob>",
            "<@>",
            "<bob@>",
            "<@example.org>",
            "<bob@example..org>",
            "<bob@-example.org>",
            "<bob@example.org.>",
            "<bob@exa mple.org>",
            "<.bob@example.org>",
            "<bob.@example.org>",
            "<bo..b@example.org>",
            "<bo b@example.org>",
            "<bob@exa_mple.org>",
        ] {
            assert!(rcpt(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let long_local = "a".repeat(LOCAL_PART_BYTES_MAX + 1);
        assert_eq!(rcpt(&format!("<{long_local}@example.org>")), Err(AddressError::TooLong));
        let ok_local = "a".repeat(LOCAL_PART_BYTES_MAX);
        assert!(rcpt(&format!("<{ok_local}@example.org>")).is_ok());
        let long_label = "a".repeat(64);
        assert_eq!(rcpt(&format!("<a@{long_label}.org>")), Err(AddressError::Syntax));
        let long_path = format!("<a@{}org>", "abcdefghi.".repeat(26));
        assert_eq!(rcpt(&long_path), Err(AddressError::TooLong));
    }

    #[test]
    fn non_ascii_needs_smtputf8() {
        assert_eq!(rcpt("<jöran@example.org>"), Err(AddressError::NeedsSmtpUtf8));
        let (inner, _) = split_path("<jöran@exämple.org>").unwrap();
        assert_eq!(
            parse_forward_path(inner, true),
            Ok(ForwardPath::Mailbox(Address { local: "jöran".into(), domain: "exämple.org".into() }))
        );
    }

    #[test]
    fn reverse_path_may_be_null() {
        let (inner, rest) = split_path("<> SIZE=10").unwrap();
        assert_eq!(rest, " SIZE=10");
        assert_eq!(parse_reverse_path(inner, false), Ok(ReversePath::Null));
        assert_eq!(parse_reverse_path("@a:b@example.org", false), Err(AddressError::SourceRoute));
    }
}
