//! Delivery status notifications (RFC 3464) for failed recipients, sent
//! from the null sender so that a bounce can never cause another bounce.

use crate::queue::StoredEnvelope;
use crate::received::rfc5322_date;

/// Header bytes of the original message included in the report.
const ORIGINAL_HEADERS_BYTES_MAX: usize = 64 * 1024;

/// Builds the DSN message for `failures` (recipient, status, diagnostic).
/// The caller queues it with the null sender to `original.from`, which
/// must not be empty.
pub fn dsn(
    hostname: &str,
    original: &StoredEnvelope,
    failures: &[(String, String, String)],
    message: &[u8],
    now: u64,
) -> Vec<u8> {
    assert!(!original.from.is_empty(), "never bounce a bounce");
    let boundary = format!("{}/{}", original.id, hostname);
    let date = rfc5322_date(now);
    let mut text = String::new();
    text.push_str(&format!("From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"));
    text.push_str(&format!("To: <{}>\r\n", original.from));
    text.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    text.push_str(&format!("Date: {date}\r\n"));
    text.push_str(&format!("Message-ID: <{}.bounce@{hostname}>\r\n", original.id));
    text.push_str("Auto-Submitted: auto-replied\r\n");
    text.push_str("MIME-Version: 1.0\r\n");
    text.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    text.push_str(&format!("--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"));
    text.push_str(&format!(
        "This is the mail system at {hostname}.\r\n\r\nYour message could not be delivered to these recipients:\r\n\r\n"
    ));
    for (rcpt, _, why) in failures {
        text.push_str(&format!("<{rcpt}>: {}\r\n", one_line(why)));
    }
    text.push_str(&format!("\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"));
    text.push_str(&format!("Reporting-MTA: dns; {hostname}\r\nX-Queue-ID: {}\r\n", original.id));
    text.push_str(&format!("Arrival-Date: {}\r\n", rfc5322_date(original.received_unix)));
    for (rcpt, status, why) in failures {
        text.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {status}\r\nDiagnostic-Code: smtp; {}\r\n",
            one_line(why)
        ));
    }
    text.push_str(&format!("\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"));
    let mut out = text.into_bytes();
    let header_end = message.windows(4).position(|w| w == b"\r\n\r\n").map_or(message.len(), |p| p + 2);
    out.extend_from_slice(&message[..header_end.min(ORIGINAL_HEADERS_BYTES_MAX)]);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_names_each_failure_and_carries_the_original_headers() {
        let env = StoredEnvelope {
            id: "abc123".into(),
            received_unix: 0,
            from: "alice@example.org".into(),
            login: Some("alice@example.org".into()),
            local: vec![],
            remote: vec![],
            attempts: 1,
            next_attempt_unix: 0,
            last_error: None,
        };
        let failures =
            vec![("x@remote.example".to_string(), "5.1.1".to_string(), "550 5.1.1 no\r\nsuch user".to_string())];
        let m = dsn(
            "mx.example.org",
            &env,
            &failures,
            b"Subject: hello\r\nFrom: alice@example.org\r\n\r\nsecret body\r\n",
            60,
        );
        let t = String::from_utf8(m).unwrap();
        assert!(t.contains("To: <alice@example.org>\r\n"));
        assert!(t.contains("Final-Recipient: rfc822; x@remote.example\r\nAction: failed\r\nStatus: 5.1.1\r\n"));
        assert!(t.contains("Diagnostic-Code: smtp; 550 5.1.1 no  such user\r\n"));
        assert!(t.contains("Subject: hello\r\n"));
        assert!(!t.contains("secret body"), "only headers are returned");
        assert!(t.ends_with("--abc123/mx.example.org--\r\n"));
        assert!(t.split("\r\n").all(|l| !l.contains('\n') && l.len() < 1000));
    }

    #[test]
    #[should_panic(expected = "never bounce a bounce")]
    fn bounces_are_never_bounced() {
        let env = StoredEnvelope {
            id: "a".into(),
            received_unix: 0,
            from: String::new(),
            login: None,
            local: vec![],
            remote: vec![],
            attempts: 0,
            next_attempt_unix: 0,
            last_error: None,
        };
        dsn("h", &env, &[], b"", 0);
    }
}
