//! The addresses in a message's `From:` header field (RFC 5322 §3.6.2),
//! for the rule that an authenticated user may only put addresses it owns
//! there. Deliberately simple: the header section is unfolded, comments
//! and display names are dropped, and anything unparseable counts as "not
//! owned" (the message is refused rather than let through).

use crate::smtp::address::Address;

/// Header bytes searched for `From:`.
const HEADER_BYTES_MAX: usize = 64 * 1024;

/// `None` if the message has no single well-formed `From:` field.
pub fn from_addresses(message: &[u8]) -> Option<Vec<Address>> {
    let head = &message[..message.len().min(HEADER_BYTES_MAX)];
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").map_or(head.len(), |p| p + 2);
    let text = std::str::from_utf8(&head[..end]).ok()?;
    let unfolded = text.replace("\r\n ", " ").replace("\r\n\t", " ");
    let mut fields = unfolded.split("\r\n").filter(|l| l.len() >= 5 && l[..5].eq_ignore_ascii_case("from:"));
    let value = &fields.next()?[5..];
    if fields.next().is_some() {
        return None; // RFC 5322 allows exactly one From: field.
    }
    let mut out = Vec::new();
    for part in split_mailboxes(&strip_comments(value)?) {
        let addr = match (part.rfind('<'), part.rfind('>')) {
            (Some(a), Some(b)) if a < b => &part[a + 1..b],
            (None, None) => part.trim(),
            _ => return None,
        };
        out.push(Address::parse(addr.trim(), true).ok()?);
    }
    (!out.is_empty()).then_some(out)
}

fn strip_comments(s: &str) -> Option<String> {
    let (mut out, mut depth, mut quoted) = (String::new(), 0u32, false);
    for c in s.chars() {
        match c {
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.checked_sub(1)?,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    (depth == 0 && !quoted).then_some(out)
}

/// Splits on commas outside quotes and angle brackets.
fn split_mailboxes(s: &str) -> Vec<String> {
    let (mut parts, mut cur, mut quoted, mut angle) = (Vec::new(), String::new(), false, false);
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(m: &[u8]) -> Option<Vec<String>> {
        from_addresses(m).map(|v| v.iter().map(Address::key).collect())
    }

    #[test]
    fn common_forms_parse() {
        assert_eq!(keys(b"From: alice@example.org\r\n\r\nbody"), Some(vec!["alice@example.org".into()]));
        assert_eq!(
            keys(b"Subject: x\r\nFROM: \"Alice, A.\" <Alice@Example.org>\r\n\r\n"),
            Some(vec!["alice@example.org".into()])
        );
        assert_eq!(keys(b"From: Alice (work) <alice@example.org> (x)\r\n\r\n"), Some(vec!["alice@example.org".into()]));
        assert_eq!(
            keys(b"From: a@example.org,\r\n\tB <b@example.org>\r\n\r\n"),
            Some(vec!["a@example.org".into(), "b@example.org".into()])
        );
    }

    #[test]
    fn missing_duplicate_or_garbled_from_is_none() {
        assert_eq!(keys(b"Subject: x\r\n\r\nFrom: a@example.org\r\n"), None);
        assert_eq!(keys(b"From: a@example.org\r\nFrom: b@example.org\r\n\r\n"), None);
        assert_eq!(keys(b"From: <a@example.org\r\n\r\n"), None);
        assert_eq!(keys(b"From: (unclosed <a@example.org>\r\n\r\n"), None);
        assert_eq!(keys(b"From: a%b@example.org\r\n\r\n"), None);
        assert_eq!(keys(b"From: \r\n\r\n"), None);
    }
}
