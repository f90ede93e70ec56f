//! The SMTP command parser: one line (CRLF already removed) in, a
//! [`Command`] or a [`CommandError`] out. Pure and total: it never panics
//! on any input (fuzzed by `fuzz/fuzz_targets/smtp_command.rs`).

use super::address::{self, AddressError, ForwardPath, ReversePath};

/// BODY= parameter of MAIL FROM (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    #[default]
    SevenBit,
    EightBitMime,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    /// SIZE= (RFC 1870): the client's estimate, checked against our limit.
    pub size: Option<u64>,
    pub body: Body,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
}

/// SASL mechanisms we implement (RFC 4954, RFC 4616, draft LOGIN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        to: ForwardPath,
    },
    Data,
    /// RFC 3030: `size` octets of message follow the command line at once.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth {
        mechanism: Mechanism,
        initial: Option<String>,
    },
}

impl Command {
    /// RFC 2920 §3.1: commands after which the client must wait for the
    /// reply before sending more. Anything already sent past them is
    /// treated as a synchronization error (command injection defence).
    pub fn ends_pipeline_group(&self) -> bool {
        // BDAT's chunk follows its command line by design (RFC 3030 §4.2).
        !matches!(self, Command::Mail { .. } | Command::Rcpt { .. } | Command::Rset | Command::Bdat { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command unrecognized")]
    Unrecognized,
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    #[error("bad sender address: {0}")]
    Sender(AddressError),
    #[error("bad recipient address: {0}")]
    Recipient(AddressError),
    #[error("unsupported parameter")]
    UnsupportedParameter,
    #[error("unsupported authentication mechanism")]
    UnsupportedMechanism,
    /// A BDAT line without a usable size: the chunk that follows cannot be
    /// skipped, so the session must end.
    #[error("BDAT needs a chunk size and optionally LAST")]
    BadChunk,
}

/// Parses one command line. `line` excludes the CRLF.
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::Syntax("command is not valid UTF-8"))?;
    let (verb, arg) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let no_arg =
        |cmd: Command| if arg.trim().is_empty() { Ok(cmd) } else { Err(CommandError::Syntax("no arguments allowed")) };
    match verb.to_ascii_uppercase().as_str() {
        "HELO" => Ok(Command::Helo(parse_helo_name(arg)?)),
        "EHLO" => Ok(Command::Ehlo(parse_helo_name(arg)?)),
        "MAIL" => parse_mail(arg),
        "RCPT" => parse_rcpt(arg),
        "DATA" => no_arg(Command::Data),
        "BDAT" => parse_bdat(arg),
        "RSET" => no_arg(Command::Rset),
        // NOOP and HELP may carry a string that is ignored (RFC 5321 §4.1.1.9).
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "QUIT" => no_arg(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "STARTTLS" => no_arg(Command::StartTls),
        "AUTH" => parse_auth(arg),
        _ => Err(CommandError::Unrecognized),
    }
}

/// `BDAT size [LAST]`; the size has at most 19 digits (fits a u64).
fn parse_bdat(arg: &str) -> Result<Command, CommandError> {
    let mut words = arg.split(' ');
    let size = words.next().unwrap_or("");
    if size.is_empty() || size.len() > 19 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CommandError::BadChunk);
    }
    let size = size.parse().map_err(|_| CommandError::BadChunk)?;
    let last = match (words.next(), words.next()) {
        (None, _) => false,
        (Some(w), None) if w.eq_ignore_ascii_case("LAST") => true,
        _ => return Err(CommandError::BadChunk),
    };
    Ok(Command::Bdat { size, last })
}

fn parse_helo_name(arg: &str) -> Result<String, CommandError> {
    let name = arg.trim_end();
    if name.is_empty() {
        return Err(CommandError::Syntax("HELO/EHLO needs a domain or address literal"));
    }
    if name.contains(char::is_whitespace) || name.chars().any(char::is_control) || name.len() > 255 {
        return Err(CommandError::Syntax("HELO/EHLO argument is not a domain or address literal"));
    }
    Ok(name.to_string())
}

/// `FROM:` or `TO:` followed by the path. Like most servers we allow spaces
/// after the colon, which some clients send.
fn strip_keyword<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    let head = arg.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword).then(|| arg[keyword.len()..].trim_start_matches(' '))
}

fn parse_mail(arg: &str) -> Result<Command, CommandError> {
    let rest = strip_keyword(arg, "FROM:").ok_or(CommandError::Syntax("expected MAIL FROM:<address>"))?;
    let (inner, params) = address::split_path(rest).map_err(CommandError::Sender)?;
    let params = parse_mail_params(params)?;
    let from = address::parse_reverse_path(inner, params.smtputf8).map_err(CommandError::Sender)?;
    Ok(Command::Mail { from, params })
}

fn parse_mail_params(s: &str) -> Result<MailParams, CommandError> {
    let mut params = MailParams::default();
    if !s.is_empty() && !s.starts_with(' ') {
        return Err(CommandError::Syntax("expected a space after the address"));
    }
    for p in s.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match p.find('=') {
            Some(i) => (&p[..i], Some(&p[i + 1..])),
            None => (p, None),
        };
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) if params.size.is_none() => {
                let n = v.parse::<u64>().map_err(|_| CommandError::Syntax("SIZE must be a number"))?;
                params.size = Some(n);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => params.body = Body::SevenBit,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => params.body = Body::EightBitMime,
            ("SMTPUTF8", None) => params.smtputf8 = true,
            _ => return Err(CommandError::UnsupportedParameter),
        }
    }
    Ok(params)
}

fn parse_rcpt(arg: &str) -> Result<Command, CommandError> {
    let rest = strip_keyword(arg, "TO:").ok_or(CommandError::Syntax("expected RCPT TO:<address>"))?;
    let (inner, params) = address::split_path(rest).map_err(CommandError::Recipient)?;
    if !params.trim().is_empty() {
        return Err(CommandError::UnsupportedParameter);
    }
    // Non-ASCII recipients need SMTPUTF8 on MAIL; the session checks that.
    let to = address::parse_forward_path(inner, true).map_err(CommandError::Recipient)?;
    Ok(Command::Rcpt { to })
}

fn parse_auth(arg: &str) -> Result<Command, CommandError> {
    let mut words = arg.split(' ').filter(|w| !w.is_empty());
    let mechanism = match words.next() {
        Some(m) if m.eq_ignore_ascii_case("PLAIN") => Mechanism::Plain,
        Some(m) if m.eq_ignore_ascii_case("LOGIN") => Mechanism::Login,
        Some(_) => return Err(CommandError::UnsupportedMechanism),
        None => return Err(CommandError::Syntax("AUTH needs a mechanism")),
    };
    let initial = words.next().map(str::to_string);
    if words.next().is_some() {
        return Err(CommandError::Syntax("too many AUTH arguments"));
    }
    Ok(Command::Auth { mechanism, initial })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::address::Address;

    fn addr(s: &str) -> Address {
        Address::parse(s, true).unwrap()
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(parse(b"ehlo client.example"), Ok(Command::Ehlo("client.example".into())));
        assert_eq!(parse(b"HeLo [192.0.2.1]"), Ok(Command::Helo("[192.0.2.1]".into())));
        assert_eq!(parse(b"data"), Ok(Command::Data));
        assert_eq!(parse(b"BDAT 0 LAST"), Ok(Command::Bdat { size: 0, last: true }));
        assert_eq!(parse(b"bdat 1000 last"), Ok(Command::Bdat { size: 1000, last: true }));
        assert_eq!(parse(b"BDAT 42"), Ok(Command::Bdat { size: 42, last: false }));
        for bad in
            ["BDAT", "BDAT x", "BDAT -1", "BDAT 1 FIRST", "BDAT 1 LAST x", "BDAT 99999999999999999999", "BDAT  1"]
        {
            assert_eq!(parse(bad.as_bytes()), Err(CommandError::BadChunk), "{bad}");
        }
        assert_eq!(parse(b"QUIT"), Ok(Command::Quit));
        assert_eq!(parse(b"StartTLS"), Ok(Command::StartTls));
        assert_eq!(parse(b"NOOP anything"), Ok(Command::Noop));
    }

    #[test]
    fn mail_from_with_parameters() {
        assert_eq!(
            parse(b"MAIL FROM:<a@example.org> SIZE=1000 BODY=8BITMIME"),
            Ok(Command::Mail {
                from: ReversePath::Mailbox(addr("a@example.org")),
                params: MailParams { size: Some(1000), body: Body::EightBitMime, smtputf8: false }
            })
        );
        assert_eq!(
            parse(b"mail from: <>"),
            Ok(Command::Mail { from: ReversePath::Null, params: MailParams::default() })
        );
        assert_eq!(parse(b"MAIL FROM:<a@example.org> FOO=1"), Err(CommandError::UnsupportedParameter));
        assert_eq!(parse(b"MAIL FROM:<a@example.org> SIZE=1 SIZE=2"), Err(CommandError::UnsupportedParameter));
        assert_eq!(
            parse(b"MAIL FROM:<a@example.org>SIZE=1"),
            Err(CommandError::Syntax("expected a space after the address"))
        );
        assert_eq!(parse(b"MAIL FROM:<a@example.org> SIZE=x"), Err(CommandError::Syntax("SIZE must be a number")));
        assert_eq!(parse(b"MAIL TO:<a@example.org>"), Err(CommandError::Syntax("expected MAIL FROM:<address>")));
        assert_eq!(parse(b"MAIL FROM:a@example.org"), Err(CommandError::Sender(AddressError::NotBracketed)));
    }

    // RFC 6531 §3.4: non-ASCII in MAIL FROM needs the SMTPUTF8 parameter.
    #[test]
    fn smtputf8_sender_needs_the_parameter() {
        assert_eq!(
            parse("MAIL FROM:<jö@example.org>".as_bytes()),
            Err(CommandError::Sender(AddressError::NeedsSmtpUtf8))
        );
        assert!(parse("MAIL FROM:<jö@example.org> SMTPUTF8".as_bytes()).is_ok());
    }

    #[test]
    fn rcpt_to_refuses_parameters_and_tricks() {
        assert_eq!(
            parse(b"RCPT TO:<b@example.org>"),
            Ok(Command::Rcpt { to: ForwardPath::Mailbox(addr("b@example.org")) })
        );
        assert_eq!(parse(b"RCPT TO:<b@example.org> NOTIFY=NEVER"), Err(CommandError::UnsupportedParameter));
        assert_eq!(parse(b"RCPT TO:<b%c@example.org>"), Err(CommandError::Recipient(AddressError::PercentHack)));
        assert_eq!(parse(b"RCPT TO:<@x:b@example.org>"), Err(CommandError::Recipient(AddressError::SourceRoute)));
    }

    #[test]
    fn auth_mechanisms() {
        assert_eq!(parse(b"AUTH PLAIN"), Ok(Command::Auth { mechanism: Mechanism::Plain, initial: None }));
        assert_eq!(
            parse(b"auth login dXNlcg=="),
            Ok(Command::Auth { mechanism: Mechanism::Login, initial: Some("dXNlcg==".into()) })
        );
        assert_eq!(parse(b"AUTH CRAM-MD5"), Err(CommandError::UnsupportedMechanism));
        assert_eq!(parse(b"AUTH"), Err(CommandError::Syntax("AUTH needs a mechanism")));
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        assert_eq!(parse(b""), Err(CommandError::Unrecognized));
        assert_eq!(parse(b"\xff\xfe"), Err(CommandError::Syntax("command is not valid UTF-8")));
        assert_eq!(parse(b"GET / HTTP/1.1"), Err(CommandError::Unrecognized));
        assert!(parse(b"EHLO").is_err());
        assert!(parse(b"EHLO a b").is_err());
        assert!(parse(b"DATA x").is_err());
        assert!(parse("MAIL FROM:<é".as_bytes()).is_err());
        assert!(parse("MAIL FROMé".as_bytes()).is_err());
    }
}
