//! SMTP replies: a basic code, an enhanced status code (RFC 3463, sent
//! because we advertise ENHANCEDSTATUSCODES, RFC 2034) and text lines.
//!
//! Main type: [`Reply`]. The constructors used by the session are here so
//! that every code the server can send is listed in one file.

/// One reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// `class.subject.detail`; `None` for replies RFC 2034 exempts (greeting, EHLO, 334).
    pub enhanced: Option<(u8, u16, u16)>,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Reply {
        debug_assert!((200..600).contains(&code));
        debug_assert_eq!(u16::from(enhanced.0), code / 100);
        Reply { code, enhanced: Some(enhanced), lines: vec![text.into()] }
    }

    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply { code, enhanced: None, lines: vec![text.into()] }
    }

    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Appends the wire form (`250-...` continuation lines, then `250 ...`).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            // Text comes from our own constants and validated input, but a
            // CR or LF in it would forge extra replies: strip them.
            let line: String = line.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            match self.enhanced {
                Some((a, b, c)) => {
                    out.extend_from_slice(format!("{}{sep}{a}.{b}.{c} {line}\r\n", self.code).as_bytes())
                }
                None => out.extend_from_slice(format!("{}{sep}{line}\r\n", self.code).as_bytes()),
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }
}

pub fn ok() -> Reply {
    Reply::new(250, (2, 0, 0), "Ok")
}
pub fn bye() -> Reply {
    Reply::new(221, (2, 0, 0), "Bye")
}
pub fn start_data() -> Reply {
    Reply::plain(354, "End data with <CR><LF>.<CR><LF>")
}
pub fn syntax_error(text: &str) -> Reply {
    Reply::new(500, (5, 5, 2), text)
}
pub fn unrecognized() -> Reply {
    Reply::new(500, (5, 5, 1), "Command unrecognized")
}
pub fn bad_arguments(text: &str) -> Reply {
    Reply::new(501, (5, 5, 4), text)
}
pub fn not_implemented(text: &str) -> Reply {
    Reply::new(502, (5, 5, 1), text)
}
pub fn bad_sequence(text: &str) -> Reply {
    Reply::new(503, (5, 5, 1), text)
}
pub fn too_many_errors() -> Reply {
    Reply::new(421, (4, 7, 0), "Too many errors, closing connection")
}
pub fn timeout() -> Reply {
    Reply::new(421, (4, 4, 2), "Timeout, closing connection")
}
pub fn shutting_down() -> Reply {
    Reply::new(421, (4, 3, 2), "Service shutting down, closing connection")
}
pub fn sync_error() -> Reply {
    Reply::new(554, (5, 5, 0), "SMTP protocol synchronization error: commands sent before the reply")
}
pub fn bare_newline() -> Reply {
    Reply::new(521, (5, 5, 2), "Bare <CR> or <LF> received; lines must end in <CR><LF>")
}
pub fn line_too_long() -> Reply {
    Reply::new(500, (5, 5, 6), "Line too long")
}
pub fn tls_required() -> Reply {
    Reply::new(530, (5, 7, 0), "Must issue a STARTTLS command first")
}
pub fn auth_required() -> Reply {
    Reply::new(530, (5, 7, 0), "Authentication required")
}
pub fn encryption_required_for_auth() -> Reply {
    Reply::new(538, (5, 7, 11), "Encryption required for requested authentication mechanism")
}
pub fn auth_ok() -> Reply {
    Reply::new(235, (2, 7, 0), "Authentication successful")
}
pub fn auth_failed() -> Reply {
    Reply::new(535, (5, 7, 8), "Authentication credentials invalid")
}
pub fn auth_cancelled() -> Reply {
    Reply::new(501, (5, 0, 0), "Authentication cancelled")
}
pub fn auth_temp_failure() -> Reply {
    Reply::new(454, (4, 7, 0), "Temporary authentication failure")
}
pub fn temp_failure() -> Reply {
    Reply::new(451, (4, 3, 0), "Temporary local problem, try again later")
}
pub fn message_too_big() -> Reply {
    Reply::new(552, (5, 3, 4), "Message size exceeds fixed limit")
}
pub fn too_many_recipients() -> Reply {
    Reply::new(452, (4, 5, 3), "Too many recipients")
}
pub fn relay_denied() -> Reply {
    Reply::new(554, (5, 7, 1), "Relay access denied")
}
/// RCPT for a mailbox at or over its quota, or where MAIL's SIZE= would not
/// fit: temporary (RFC 3463 X.2.2), so the sender's server retries and the
/// mail arrives once there is room.
pub fn mailbox_full() -> Reply {
    Reply::new(452, (4, 2, 2), "Mailbox full, try again later")
}
pub fn unknown_user() -> Reply {
    Reply::new(550, (5, 1, 1), "Mailbox unavailable: no such user here")
}
pub fn sender_not_owned() -> Reply {
    Reply::new(553, (5, 7, 1), "Sender address rejected: not owned by the authenticated user")
}
pub fn sender_hosted_unauthenticated() -> Reply {
    Reply::new(553, (5, 7, 1), "Sender address rejected: authentication required for this domain")
}
pub fn bad_sender(text: &str) -> Reply {
    Reply::new(553, (5, 1, 7), format!("Bad sender address: {text}"))
}
pub fn bad_recipient(text: &str) -> Reply {
    Reply::new(553, (5, 1, 3), format!("Bad recipient address: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline_replies_use_dashes_then_a_space() {
        let r = Reply { code: 250, enhanced: None, lines: vec!["a".into(), "b".into(), "c".into()] };
        assert_eq!(r.to_bytes(), b"250-a\r\n250-b\r\n250 c\r\n");
        assert_eq!(ok().to_bytes(), b"250 2.0.0 Ok\r\n");
    }

    #[test]
    fn line_breaks_in_text_cannot_forge_replies() {
        let r = Reply::new(550, (5, 1, 1), "x\r\n250 2.0.0 fake");
        assert_eq!(r.to_bytes(), b"550 5.1.1 x250 2.0.0 fake\r\n");
    }
}
