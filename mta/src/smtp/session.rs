//! One SMTP conversation as a sans-IO state machine: bytes in, reply bytes,
//! directory queries and connection events out. No sockets, no clocks, no
//! files; the shell (`server::connection`) does all I/O.
//!
//! Call order for the shell:
//! 1. [`Session::new`], then [`Session::greet`] once the greeting delay
//!    passed (input fed before that is a pre-greeting violation).
//! 2. [`Session::handle_input`] with whatever bytes arrived.
//! 3. Drain [`Session::poll_transmit`] (reply bytes) and
//!    [`Session::poll_event`]. A [`Event::Query`] must be answered with
//!    [`Session::handle_answer`] before anything else is fed; send pending
//!    reply bytes before acting on [`Event::StartTls`] or [`Event::Close`].
//! 4. After the TLS handshake, [`Session::handle_tls_established`]. When the
//!    read deadline from [`Session::read_timeout_secs`] passes,
//!    [`Session::handle_timeout`].
//!
//! Defences that live here: bare CR/LF anywhere closes the session with
//! 521 (SMTP smuggling, see ARCHITECTURE.md), except inside BDAT chunks
//! (RFC 3030), whose explicit lengths leave no framing to confuse: there a
//! bare CR/LF refuses the message with 554 5.6.0 and the session goes on; input before the greeting or
//! past a command that ends a pipelining group closes it with 554 5.5.0;
//! AUTH only over TLS; every line and counter is bounded (`limits`).

use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;

use super::address::{Address, AddressError, ForwardPath, ReversePath};
use super::command::{self, Body, Command, CommandError, MailParams, Mechanism};
use super::policy::{self, RecipientDecision, RecipientFacts, SenderDecision, SenderFacts};
use super::reply::{self, Reply};
use crate::limits::{
    AUTH_FAILURES_PER_SESSION_MAX, COMMAND_LINE_BYTES_MAX, COMMAND_TIMEOUT_SECS, DATA_BLOCK_TIMEOUT_SECS,
    DATA_LINE_BYTES_MAX, ERRORS_PER_SESSION_MAX, RECIPIENTS_PER_MESSAGE_MAX, TLS_HANDSHAKE_TIMEOUT_SECS,
};

/// What a listener allows; fixed for the session's life.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our name in the greeting and EHLO reply.
    pub hostname: String,
    /// STARTTLS may be offered (certificate loaded, not implicit TLS).
    pub starttls: bool,
    /// AUTH is offered, and only once TLS is active.
    pub auth: bool,
    /// MAIL needs an authenticated session (submission).
    pub auth_required: bool,
    /// MAIL needs TLS (submission).
    pub tls_required: bool,
    pub message_bytes_max: u64,
    /// Where `RCPT TO:<Postmaster>` goes.
    pub postmaster: Address,
}

/// A password that does not print itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The envelope of an accepted message, with what the trace header needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub helo: String,
    pub peer: IpAddr,
    pub tls: bool,
    pub login: Option<String>,
    pub from: ReversePath,
    /// Local mailboxes (aliases already expanded), without duplicates.
    pub local: Vec<String>,
    /// Remote recipients (authenticated sessions only).
    pub remote: Vec<Address>,
    pub smtputf8: bool,
    pub body: Body,
}

impl Envelope {
    /// MAIL FROM for logs: `<>` for the null sender.
    pub fn from_display(&self) -> String {
        match &self.from {
            ReversePath::Null => "<>".to_string(),
            ReversePath::Mailbox(a) => a.to_string(),
        }
    }
}

/// Work the shell must do and answer with [`Session::handle_answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Verify a login/password (rate limiting is the shell's job).
    Credentials { login: String, password: Secret },
    /// Facts for the sender policy.
    Sender { login: Option<String>, address: Address },
    /// Facts for the recipient policy. `size` is MAIL's SIZE= (RFC 1870),
    /// for the quota check.
    Recipient { address: Address, size: Option<u64> },
    /// Run the filters, then queue durably; answer only once the message
    /// is on disk (or refused).
    Enqueue { envelope: Envelope, message: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Success { login: String },
    Invalid,
    TempFail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Durable in the queue under this id.
    Queued {
        id: String,
    },
    /// A filter refused (5xx) or deferred (4xx) the message.
    Refused(Reply),
    TempFail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Credentials(AuthOutcome),
    /// `None`: the directory is unavailable (4xx to the client).
    Sender(Option<SenderFacts>),
    Recipient(Option<RecipientFacts>),
    Enqueued(EnqueueOutcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Query(Query),
    /// Send pending replies, then start the TLS handshake.
    StartTls,
    /// Send pending replies, then close the connection.
    Close,
}

#[derive(Debug)]
enum AuthStep {
    PlainResponse,
    LoginUser,
    LoginPassword { login: String },
}

#[derive(Debug, Default)]
struct DataState {
    body: Vec<u8>,
    too_big: bool,
    long_line: bool,
    /// Inside a line already known to be too long: drop bytes until LF.
    skipping_line: bool,
}

/// One BDAT chunk being read (RFC 3030): exactly `remaining` more octets.
#[derive(Debug)]
struct ChunkState {
    size: u64,
    remaining: u64,
    last: bool,
    /// Read and drop the chunk, then send this error.
    refuse: Option<Reply>,
}

#[derive(Debug)]
enum Pending {
    Credentials,
    Sender { from: Address, params: MailParams },
    Recipient { address: Address },
    Enqueue,
}

#[derive(Debug)]
enum State {
    ExpectGreeting,
    ExpectCommand,
    ExpectAuthResponse(AuthStep),
    ReceivingData(DataState),
    ReceivingChunk(ChunkState),
    AwaitingAnswer(Pending),
    ExpectTlsHandshake,
    Closed,
}

#[derive(Debug)]
struct Transaction {
    from: ReversePath,
    params: MailParams,
    local: Vec<String>,
    remote: Vec<Address>,
    recipients: usize,
    /// BDAT chunks so far; non-empty or `chunking` means DATA is refused.
    chunks: Vec<u8>,
    chunking: bool,
}

enum Line {
    /// Start and end (exclusive, without CRLF) of a complete line in `input`.
    Complete(usize, usize),
    Incomplete,
    BareNewline,
    TooLong,
}

/// A 4xx/5xx reply with the command it answered, for the shell's
/// `reject:` log line (fail2ban and audits read it). Never carries AUTH
/// arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The command's verb (`RCPT`, `MAIL`, `AUTH`, …; `CONNECT` before one).
    pub command: &'static str,
    /// The RCPT argument, for `to=<…>`.
    pub to: Option<String>,
    /// The reply's first line, e.g. `554 5.7.1 Relay access denied`.
    pub reply: String,
}

/// Rejections waiting for the shell; more are dropped (the session closes
/// after `ERRORS_PER_SESSION_MAX` errors anyway).
const REJECTIONS_QUEUED_MAX: usize = 32;

pub struct Session {
    config: SessionConfig,
    peer: IpAddr,
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    events: VecDeque<Event>,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    login: Option<String>,
    transaction: Option<Transaction>,
    errors: u32,
    auth_failures: u32,
    /// The command being answered, for [`Rejection`]s.
    current: (&'static str, Option<String>),
    rejections: VecDeque<Rejection>,
}

impl Session {
    /// `tls` is true on implicit-TLS listeners (the handshake is done).
    pub fn new(config: SessionConfig, peer: IpAddr, tls: bool) -> Session {
        Session {
            config,
            peer,
            state: State::ExpectGreeting,
            input: Vec::new(),
            output: Vec::new(),
            events: VecDeque::new(),
            tls,
            helo: None,
            esmtp: false,
            login: None,
            transaction: None,
            errors: 0,
            auth_failures: 0,
            current: ("CONNECT", None),
            rejections: VecDeque::new(),
        }
    }

    /// Sends the greeting, or 554 and close if the client already talked.
    pub fn greet(&mut self) {
        assert!(matches!(self.state, State::ExpectGreeting), "greet called twice");
        if !self.input.is_empty() {
            self.input.clear();
            return self.close_with(reply::sync_error());
        }
        self.state = State::ExpectCommand;
        let greeting = Reply::plain(220, format!("{} ESMTP", self.config.hostname));
        greeting.encode_into(&mut self.output);
    }

    pub fn handle_input(&mut self, bytes: &[u8]) {
        match self.state {
            State::Closed => {}
            State::ExpectTlsHandshake => {
                // The shell hands the socket to TLS and must not read plaintext;
                // if it did, this is injected plaintext (CVE-2011-0411 style).
                self.close_with(reply::sync_error());
            }
            _ => {
                self.input.extend_from_slice(bytes);
                self.process();
            }
        }
    }

    pub fn handle_answer(&mut self, answer: Answer) {
        let pending = match std::mem::replace(&mut self.state, State::ExpectCommand) {
            State::AwaitingAnswer(p) => p,
            other => panic!("answer {answer:?} without a pending query (state {other:?})"),
        };
        match (pending, answer) {
            (Pending::Credentials, Answer::Credentials(outcome)) => self.finish_auth(outcome),
            (Pending::Sender { from, params }, Answer::Sender(facts)) => match facts {
                None => self.respond(reply::temp_failure()),
                Some(facts) => {
                    let decision = policy::sender_decision(self.login.is_some(), false, facts);
                    self.finish_mail(ReversePath::Mailbox(from), params, decision);
                }
            },
            (Pending::Recipient { address }, Answer::Recipient(facts)) => match facts {
                None => self.respond(reply::temp_failure()),
                Some(facts) => self.finish_rcpt(address, policy::recipient_decision(self.login.is_some(), facts)),
            },
            (Pending::Enqueue, Answer::Enqueued(outcome)) => {
                self.transaction = None;
                match outcome {
                    EnqueueOutcome::Queued { id } => {
                        self.respond(Reply::new(250, (2, 0, 0), format!("Ok: queued as {id}")))
                    }
                    EnqueueOutcome::Refused(r) => self.respond(r),
                    EnqueueOutcome::TempFail => self.respond(reply::temp_failure()),
                }
            }
            (p, a) => panic!("answer {a:?} does not match pending query {p:?}"),
        }
        self.process();
    }

    /// The TLS handshake after STARTTLS succeeded: RFC 3207 §4.2, forget
    /// everything learnt before it.
    pub fn handle_tls_established(&mut self) {
        assert!(matches!(self.state, State::ExpectTlsHandshake), "TLS established outside STARTTLS");
        assert!(self.input.is_empty());
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.transaction = None;
        self.state = State::ExpectCommand;
    }

    pub fn handle_timeout(&mut self) {
        if !matches!(self.state, State::Closed) {
            self.close_with(reply::timeout());
        }
    }

    pub fn handle_shutdown(&mut self) {
        if !matches!(self.state, State::Closed) {
            self.close_with(reply::shutting_down());
        }
    }

    /// Reply bytes to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.output.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.output))
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// How long the shell waits for the next input before [`Session::handle_timeout`].
    pub fn read_timeout_secs(&self) -> u64 {
        match self.state {
            State::ReceivingData(_) | State::ReceivingChunk(_) => DATA_BLOCK_TIMEOUT_SECS,
            State::ExpectTlsHandshake => TLS_HANDSHAKE_TIMEOUT_SECS,
            _ => COMMAND_TIMEOUT_SECS,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The authenticated login, if any.
    pub fn login(&self) -> Option<&str> {
        self.login.as_deref()
    }

    /// Bytes received but not yet consumed (bounded by the line limits).
    pub fn buffered_input_bytes(&self) -> usize {
        self.input.len()
    }

    /// Message bytes held while receiving DATA (zero otherwise): what the
    /// shell charges against the server-wide memory budget.
    pub fn message_bytes_buffered(&self) -> usize {
        let data = match &self.state {
            State::ReceivingData(d) => d.body.len(),
            _ => 0,
        };
        data + self.transaction.as_ref().map_or(0, |t| t.chunks.len())
    }

    /// The server-wide message memory budget is exhausted: refuse this
    /// message for now and close (the client retries later).
    pub fn handle_overload(&mut self) {
        if !matches!(self.state, State::Closed) {
            self.transaction = None;
            self.close_with(Reply::new(452, (4, 3, 1), "Insufficient system storage, try again later"));
        }
    }

    fn process(&mut self) {
        let mut pos = 0;
        loop {
            let progressed = match &self.state {
                State::ExpectCommand => self.take_command(&mut pos),
                State::ExpectAuthResponse(_) => self.take_auth_response(&mut pos),
                State::ReceivingData(_) => self.take_data(&mut pos),
                State::ReceivingChunk(_) => self.take_chunk(&mut pos),
                _ => false,
            };
            if !progressed {
                break;
            }
        }
        if matches!(self.state, State::Closed) {
            self.input.clear();
        } else {
            self.input.drain(..pos);
        }
    }

    fn next_line(&self, pos: usize, max: usize) -> Line {
        let rest = &self.input[pos..];
        match rest.iter().position(|&b| b == b'\n') {
            None if rest.len() >= max => Line::TooLong,
            None => Line::Incomplete,
            Some(i) if i + 1 > max => Line::TooLong,
            Some(0) => Line::BareNewline,
            Some(i) if rest[i - 1] != b'\r' || rest[..i - 1].contains(&b'\r') => Line::BareNewline,
            Some(i) => Line::Complete(pos, pos + i - 1),
        }
    }

    /// Consumes one command line if complete; false if nothing more can be done now.
    fn take_command(&mut self, pos: &mut usize) -> bool {
        let (start, end) = match self.next_line(*pos, COMMAND_LINE_BYTES_MAX) {
            Line::Incomplete => return false,
            Line::BareNewline => {
                self.close_with(reply::bare_newline());
                return false;
            }
            Line::TooLong => {
                self.close_with(reply::line_too_long());
                return false;
            }
            Line::Complete(s, e) => (s, e),
        };
        *pos = end + 2;
        let more_input = *pos < self.input.len();
        let parsed = command::parse(&self.input[start..end]);
        if let Ok(cmd) = &parsed {
            let pipelining = self.esmtp;
            if more_input && !matches!(cmd, Command::Quit) && (cmd.ends_pipeline_group() || !pipelining) {
                self.close_with(reply::sync_error());
                return false;
            }
        }
        self.current = match &parsed {
            Ok(cmd) => (verb(cmd), if let Command::Rcpt { to } = cmd { Some(forward_path_text(to)) } else { None }),
            Err(_) => ("UNKNOWN", None),
        };
        match parsed {
            Ok(cmd) => self.dispatch(cmd),
            // The chunk after it cannot be skipped without its size.
            Err(e @ CommandError::BadChunk) => self.close_with(command_error_reply(&e)),
            Err(e) => self.respond(command_error_reply(&e)),
        }
        !matches!(self.state, State::Closed)
    }

    fn dispatch(&mut self, cmd: Command) {
        match cmd {
            Command::Helo(name) => {
                self.transaction = None;
                self.helo = Some(name);
                self.esmtp = false;
                self.respond(Reply::plain(250, self.config.hostname.clone()));
            }
            Command::Ehlo(name) => {
                self.transaction = None;
                self.helo = Some(name);
                self.esmtp = true;
                let r = self.ehlo_reply();
                self.respond(r);
            }
            Command::Mail { from, params } => self.start_mail(from, params),
            Command::Rcpt { to } => self.start_rcpt(to),
            Command::Data => self.start_data(),
            Command::Bdat { size, last } => self.start_bdat(size, last),
            Command::Rset => {
                self.transaction = None;
                self.respond(reply::ok());
            }
            Command::Noop => self.respond(reply::ok()),
            Command::Quit => self.close_with(reply::bye()),
            // No address enumeration: RFC 5321 §7.3 lets us disable both.
            Command::Vrfy => self.respond(reply::not_implemented("VRFY command is disabled")),
            Command::Expn => self.respond(reply::not_implemented("EXPN command is disabled")),
            Command::Help => self.respond(Reply::new(214, (2, 0, 0), "See RFC 5321")),
            Command::StartTls => self.start_tls(),
            Command::Auth { mechanism, initial } => self.start_auth(mechanism, initial),
        }
    }

    fn ehlo_reply(&self) -> Reply {
        let mut lines = vec![
            self.config.hostname.clone(),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.message_bytes_max),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
        ];
        if self.config.starttls && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        if self.config.auth && self.tls {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        Reply { code: 250, enhanced: None, lines }
    }

    fn start_tls(&mut self) {
        if !self.config.starttls || self.tls {
            let text = if self.tls { "TLS already active" } else { "STARTTLS not available" };
            return self.respond(reply::bad_sequence(text));
        }
        if self.helo.is_none() {
            return self.respond(reply::bad_sequence("Send EHLO first"));
        }
        self.respond(Reply::new(220, (2, 0, 0), "Ready to start TLS"));
        if !matches!(self.state, State::Closed) {
            self.state = State::ExpectTlsHandshake;
            self.events.push_back(Event::StartTls);
        }
    }

    fn start_mail(&mut self, from: ReversePath, params: MailParams) {
        if self.helo.is_none() {
            return self.respond(reply::bad_sequence("Send HELO/EHLO first"));
        }
        if self.config.tls_required && !self.tls {
            return self.respond(reply::tls_required());
        }
        if self.config.auth_required && self.login.is_none() {
            return self.respond(reply::auth_required());
        }
        if self.transaction.is_some() {
            return self.respond(reply::bad_sequence("Nested MAIL command"));
        }
        if !self.esmtp && params != MailParams::default() {
            return self.respond(Reply::new(555, (5, 5, 4), "MAIL parameters need EHLO"));
        }
        if params.size.is_some_and(|n| n > self.config.message_bytes_max) {
            return self.respond(reply::message_too_big());
        }
        match from {
            ReversePath::Null => {
                let facts = SenderFacts { domain_hosted: false, owned_by_login: false };
                let decision = policy::sender_decision(self.login.is_some(), true, facts);
                self.finish_mail(ReversePath::Null, params, decision);
            }
            // A literal names no domain we host and no address a login
            // owns: an unauthenticated session may use it (inbound mail to
            // local users), an authenticated one may not (anti-spoofing).
            ReversePath::Mailbox(address) if address.is_literal() => {
                let facts = SenderFacts { domain_hosted: false, owned_by_login: false };
                let decision = policy::sender_decision(self.login.is_some(), false, facts);
                self.finish_mail(ReversePath::Mailbox(address), params, decision);
            }
            ReversePath::Mailbox(address) => {
                let query = Query::Sender { login: self.login.clone(), address: address.clone() };
                self.await_answer(Pending::Sender { from: address, params }, query);
            }
        }
    }

    fn finish_mail(&mut self, from: ReversePath, params: MailParams, decision: SenderDecision) {
        match decision {
            SenderDecision::Accept => {
                self.transaction = Some(Transaction {
                    from,
                    params,
                    local: Vec::new(),
                    remote: Vec::new(),
                    recipients: 0,
                    chunks: Vec::new(),
                    chunking: false,
                });
                self.respond(Reply::new(250, (2, 1, 0), "Sender ok"));
            }
            SenderDecision::Reject(r) => self.respond(r),
        }
    }

    fn start_rcpt(&mut self, to: ForwardPath) {
        let Some(txn) = &self.transaction else {
            return self.respond(reply::bad_sequence("Need MAIL command"));
        };
        if txn.recipients >= RECIPIENTS_PER_MESSAGE_MAX {
            return self.respond(reply::too_many_recipients());
        }
        let address = match to {
            ForwardPath::Postmaster => self.config.postmaster.clone(),
            ForwardPath::Mailbox(a) => a,
        };
        if !address.is_ascii() && !txn.params.smtputf8 {
            return self.respond(reply::bad_recipient(&AddressError::NeedsSmtpUtf8.to_string()));
        }
        let size = txn.params.size;
        self.await_answer(Pending::Recipient { address: address.clone() }, Query::Recipient { address, size });
    }

    fn finish_rcpt(&mut self, address: Address, decision: RecipientDecision) {
        let Some(txn) = &mut self.transaction else {
            panic!("recipient answer without a transaction");
        };
        match decision {
            RecipientDecision::Local(mailboxes) => {
                for m in mailboxes {
                    if !txn.local.contains(&m) {
                        txn.local.push(m);
                    }
                }
                txn.recipients += 1;
                self.respond(Reply::new(250, (2, 1, 5), "Recipient ok"));
            }
            RecipientDecision::Relay => {
                if !txn.remote.contains(&address) {
                    txn.remote.push(address);
                }
                txn.recipients += 1;
                self.respond(Reply::new(250, (2, 1, 5), "Recipient ok"));
            }
            RecipientDecision::Reject(r) => self.respond(r),
        }
    }

    fn start_data(&mut self) {
        match &self.transaction {
            None => self.respond(reply::bad_sequence("Need MAIL command")),
            Some(t) if t.recipients == 0 => self.respond(Reply::new(554, (5, 5, 1), "No valid recipients")),
            Some(t) if t.chunking => self.respond(reply::bad_sequence("DATA not allowed after BDAT")),
            Some(_) => {
                self.respond(reply::start_data());
                self.state = State::ReceivingData(DataState::default());
            }
        }
    }

    /// Consumes message lines; true if the state changed (end of data).
    fn take_data(&mut self, pos: &mut usize) -> bool {
        let State::ReceivingData(data) = &mut self.state else { unreachable!() };
        let max = self.config.message_bytes_max;
        loop {
            let rest = &self.input[*pos..];
            let Some(i) = rest.iter().position(|&b| b == b'\n') else {
                // A partial line: bound it. The final byte may be the CR of a CRLF.
                if rest.len() >= DATA_LINE_BYTES_MAX {
                    data.long_line = true;
                    data.skipping_line = true;
                    let keep = usize::from(rest.last() == Some(&b'\r'));
                    if rest[..rest.len() - keep].contains(&b'\r') {
                        return self.close_with_bool(reply::bare_newline());
                    }
                    *pos += rest.len() - keep;
                }
                return false;
            };
            let line = &rest[..=i];
            if i == 0 || line[i - 1] != b'\r' || line[..i - 1].contains(&b'\r') {
                return self.close_with_bool(reply::bare_newline());
            }
            *pos += i + 1;
            if data.skipping_line {
                data.skipping_line = false;
                continue;
            }
            if line.len() > DATA_LINE_BYTES_MAX {
                data.long_line = true;
                continue;
            }
            let content = &line[..i - 1];
            if content == b"." {
                break;
            }
            // RFC 5321 §4.5.2: remove one leading dot.
            let unstuffed = if content.first() == Some(&b'.') { &line[1..] } else { line };
            if data.body.len() as u64 + unstuffed.len() as u64 > max {
                data.too_big = true;
            }
            if !data.too_big {
                data.body.extend_from_slice(unstuffed);
            }
        }
        let State::ReceivingData(data) = std::mem::replace(&mut self.state, State::ExpectCommand) else {
            unreachable!()
        };
        if data.too_big {
            self.transaction = None;
            self.respond(reply::message_too_big());
        } else if data.long_line {
            self.transaction = None;
            self.respond(Reply::new(554, (5, 6, 0), "Message has lines longer than 998 characters"));
        } else {
            self.enqueue(data.body);
        }
        true
    }

    /// Hands the finished transaction's message to the shell to queue.
    fn enqueue(&mut self, message: Vec<u8>) {
        let Some(txn) = self.transaction.take() else { panic!("message end without a transaction") };
        let envelope = Envelope {
            helo: self.helo.clone().unwrap_or_default(),
            peer: self.peer,
            tls: self.tls,
            login: self.login.clone(),
            from: txn.from,
            local: txn.local,
            remote: txn.remote,
            smtputf8: txn.params.smtputf8,
            body: txn.params.body,
        };
        self.await_answer(Pending::Enqueue, Query::Enqueue { envelope, message });
    }

    /// BDAT (RFC 3030): the chunk is always read, even when refused, so
    /// that its bytes are never taken for commands. A chunk that cannot fit
    /// under the size limit ends the session instead of being read.
    fn start_bdat(&mut self, size: u64, last: bool) {
        let have = self.transaction.as_ref().map_or(0, |t| t.chunks.len() as u64);
        if size > self.config.message_bytes_max.saturating_sub(have) {
            self.transaction = None;
            return self.close_with(reply::message_too_big());
        }
        let refuse = match &mut self.transaction {
            _ if !self.esmtp => Some(reply::bad_sequence("Send EHLO first")),
            None => Some(reply::bad_sequence("Need MAIL command")),
            Some(t) if t.recipients == 0 => Some(Reply::new(554, (5, 5, 1), "No valid recipients")),
            Some(t) => {
                t.chunking = true;
                None
            }
        };
        self.state = State::ReceivingChunk(ChunkState { size, remaining: size, last, refuse });
    }

    /// Consumes chunk bytes; true once the chunk is complete.
    fn take_chunk(&mut self, pos: &mut usize) -> bool {
        let State::ReceivingChunk(chunk) = &mut self.state else { unreachable!() };
        let available = (self.input.len() - *pos) as u64;
        let n = available.min(chunk.remaining) as usize;
        if chunk.refuse.is_none() {
            if let Some(txn) = &mut self.transaction {
                txn.chunks.extend_from_slice(&self.input[*pos..*pos + n]);
            }
        }
        *pos += n;
        chunk.remaining -= n as u64;
        if chunk.remaining > 0 {
            return false;
        }
        let State::ReceivingChunk(chunk) = std::mem::replace(&mut self.state, State::ExpectCommand) else {
            unreachable!()
        };
        if let Some(r) = chunk.refuse {
            self.respond(r);
            return !matches!(self.state, State::Closed);
        }
        if !chunk.last {
            self.respond(Reply::new(250, (2, 0, 0), format!("{} octets received", chunk.size)));
            return true;
        }
        let mut message = self.transaction.as_mut().map(|t| std::mem::take(&mut t.chunks)).unwrap_or_default();
        if let Err(r) = check_chunked_message(&mut message) {
            self.transaction = None;
            self.respond(r);
            return !matches!(self.state, State::Closed);
        }
        self.enqueue(message);
        true
    }

    fn start_auth(&mut self, mechanism: Mechanism, initial: Option<String>) {
        if !self.config.auth {
            return self.respond(reply::not_implemented("AUTH not available on this port"));
        }
        if !self.tls {
            return self.respond(reply::encryption_required_for_auth());
        }
        if !self.esmtp {
            return self.respond(reply::bad_sequence("Send EHLO first"));
        }
        if self.login.is_some() {
            return self.respond(reply::bad_sequence("Already authenticated"));
        }
        if self.transaction.is_some() {
            return self.respond(reply::bad_sequence("AUTH not allowed during a mail transaction"));
        }
        match (mechanism, initial) {
            (Mechanism::Plain, None) => {
                self.respond(Reply::plain(334, ""));
                self.state = State::ExpectAuthResponse(AuthStep::PlainResponse);
            }
            // RFC 4954 §4: "=" is an empty initial response.
            (Mechanism::Plain, Some(r)) => self.auth_plain(&r),
            (Mechanism::Login, None) => {
                self.respond(Reply::plain(334, "VXNlcm5hbWU6"));
                self.state = State::ExpectAuthResponse(AuthStep::LoginUser);
            }
            (Mechanism::Login, Some(r)) => self.auth_login_user(&r),
        }
    }

    fn take_auth_response(&mut self, pos: &mut usize) -> bool {
        let (start, end) = match self.next_line(*pos, COMMAND_LINE_BYTES_MAX) {
            Line::Incomplete => return false,
            Line::BareNewline => return self.close_with_bool(reply::bare_newline()),
            Line::TooLong => return self.close_with_bool(reply::line_too_long()),
            Line::Complete(s, e) => (s, e),
        };
        *pos = end + 2;
        if *pos < self.input.len() {
            return self.close_with_bool(reply::sync_error());
        }
        let line = String::from_utf8_lossy(&self.input[start..end]).into_owned();
        let State::ExpectAuthResponse(step) = std::mem::replace(&mut self.state, State::ExpectCommand) else {
            unreachable!()
        };
        if line == "*" {
            self.respond(reply::auth_cancelled());
            return true;
        }
        match step {
            AuthStep::PlainResponse => self.auth_plain(&line),
            AuthStep::LoginUser => self.auth_login_user(&line),
            AuthStep::LoginPassword { login } => match decode_text(&line) {
                Some(password) => self.verify(login, password),
                None => self.respond(reply::bad_arguments("Invalid base64 in AUTH response")),
            },
        }
        true
    }

    fn auth_plain(&mut self, response: &str) {
        let decoded = if response == "=" { Some(String::new()) } else { decode_text(response) };
        let Some(decoded) = decoded else {
            return self.respond(reply::bad_arguments("Invalid base64 in AUTH response"));
        };
        // RFC 4616: [authzid] NUL authcid NUL passwd. We do not let one
        // login act for another, so authzid must be empty or the same.
        let parts: Vec<&str> = decoded.split('\0').collect();
        match parts.as_slice() {
            [authzid, authcid, password] if !authcid.is_empty() && (authzid.is_empty() || authzid == authcid) => {
                self.verify(authcid.to_string(), password.to_string())
            }
            _ => self.fail_auth(),
        }
    }

    fn auth_login_user(&mut self, response: &str) {
        match decode_text(response) {
            Some(login) if !login.is_empty() => {
                self.respond(Reply::plain(334, "UGFzc3dvcmQ6"));
                self.state = State::ExpectAuthResponse(AuthStep::LoginPassword { login });
            }
            _ => self.respond(reply::bad_arguments("Invalid base64 in AUTH response")),
        }
    }

    fn verify(&mut self, login: String, password: String) {
        self.await_answer(Pending::Credentials, Query::Credentials { login, password: Secret::new(password) });
    }

    fn finish_auth(&mut self, outcome: AuthOutcome) {
        match outcome {
            AuthOutcome::Success { login } => {
                self.login = Some(login);
                self.respond(reply::auth_ok());
            }
            AuthOutcome::Invalid => self.fail_auth(),
            AuthOutcome::TempFail => self.respond(reply::auth_temp_failure()),
        }
    }

    fn fail_auth(&mut self) {
        self.auth_failures += 1;
        if self.auth_failures >= AUTH_FAILURES_PER_SESSION_MAX {
            reply::auth_failed().encode_into(&mut self.output);
            self.close_with(Reply::new(421, (4, 7, 0), "Too many authentication failures"));
        } else {
            self.respond(reply::auth_failed());
        }
    }

    fn await_answer(&mut self, pending: Pending, query: Query) {
        self.state = State::AwaitingAnswer(pending);
        self.events.push_back(Event::Query(query));
    }

    /// Queues a [`Rejection`] for an error reply.
    fn note_rejection(&mut self, r: &Reply) {
        if !r.is_error() || self.rejections.len() >= REJECTIONS_QUEUED_MAX {
            return;
        }
        let mut wire = Vec::new();
        r.encode_into(&mut wire);
        let text = String::from_utf8_lossy(&wire);
        let first = text.split("\r\n").next().unwrap_or("");
        // `554-…` continuation: log it as one line.
        let reply = if first.as_bytes().get(3) == Some(&b'-') {
            format!("{} {}", &first[..3], &first[4..])
        } else {
            first.to_string()
        };
        self.rejections.push_back(Rejection { command: self.current.0, to: self.current.1.clone(), reply });
    }

    /// The next error reply sent, with its command (for the `reject:` log).
    pub fn poll_rejection(&mut self) -> Option<Rejection> {
        self.rejections.pop_front()
    }

    /// The HELO/EHLO name, if the client sent one.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// Whether the client said EHLO (`proto=ESMTP`) rather than HELO.
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
    }

    /// The MAIL FROM of the transaction in progress (`""` for `<>`).
    pub fn mail_from(&self) -> Option<String> {
        self.transaction.as_ref().map(|t| match &t.from {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(a) => a.to_string(),
        })
    }

    /// Sends a reply, counting errors; too many errors close the session.
    fn respond(&mut self, r: Reply) {
        self.note_rejection(&r);
        r.encode_into(&mut self.output);
        if r.is_error() {
            self.errors += 1;
            if self.errors >= ERRORS_PER_SESSION_MAX {
                self.close_with(reply::too_many_errors());
            }
        }
    }

    fn close_with(&mut self, r: Reply) {
        self.note_rejection(&r);
        r.encode_into(&mut self.output);
        self.state = State::Closed;
        self.events.push_back(Event::Close);
    }

    fn close_with_bool(&mut self, r: Reply) -> bool {
        self.close_with(r);
        false
    }
}

/// A message received by BDAT must satisfy what DATA enforces line by
/// line: CRLF line ends only and lines of at most 998 characters; it gets
/// a final CRLF if it lacks one.
fn check_chunked_message(message: &mut Vec<u8>) -> Result<(), Reply> {
    if message.is_empty() {
        return Err(Reply::new(554, (5, 6, 0), "Empty message"));
    }
    let mut line_start = 0;
    for (i, &b) in message.iter().enumerate() {
        let bare_cr = b == b'\r' && message.get(i + 1) != Some(&b'\n');
        let bare_lf = b == b'\n' && (i == 0 || message[i - 1] != b'\r');
        if bare_cr || bare_lf {
            return Err(Reply::new(554, (5, 6, 0), "Message has bare <CR> or <LF>; lines must end in <CR><LF>"));
        }
        if b == b'\n' {
            line_start = i + 1;
        } else if b != b'\r' && i + 1 - line_start > DATA_LINE_BYTES_MAX - 2 {
            return Err(Reply::new(554, (5, 6, 0), "Message has lines longer than 998 characters"));
        }
    }
    if !message.ends_with(b"\r\n") {
        message.extend_from_slice(b"\r\n");
    }
    Ok(())
}

fn decode_text(b64: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    String::from_utf8(bytes).ok()
}

fn command_error_reply(e: &CommandError) -> Reply {
    match e {
        CommandError::Unrecognized => reply::unrecognized(),
        CommandError::Syntax(text) => reply::bad_arguments(text),
        // RFC 5321 §4.1.3: IPv4 and IPv6 literals in MAIL FROM parse; a
        // general literal (`[tag:content]`) is valid syntax too, but no tag
        // is one we could answer, so it is refused by policy.
        CommandError::Sender(AddressError::AddressLiteral) => {
            Reply::new(550, (5, 7, 1), "Sender address rejected: this address literal is refused by policy")
        }
        // A path that is not RFC 5321 syntax at all (`[999.1.1.1]`, an
        // unterminated literal) is a 501, as Postfix answers it; refused
        // forms of valid syntax (routes, `%` hacks) stay 553.
        CommandError::Sender(AddressError::Syntax) => Reply::new(501, (5, 1, 7), "Bad sender address syntax"),
        CommandError::Sender(a) => reply::bad_sender(&a.to_string()),
        CommandError::Recipient(a) => reply::bad_recipient(&a.to_string()),
        CommandError::UnsupportedParameter => Reply::new(555, (5, 5, 4), "Unsupported parameter"),
        CommandError::UnsupportedMechanism => Reply::new(504, (5, 5, 4), "Unrecognized authentication mechanism"),
        CommandError::BadChunk => Reply::new(501, (5, 5, 4), "BDAT needs a chunk size and optionally LAST"),
    }
}

#[cfg(test)]
mod tests;

/// The verb of a command, for logs.
fn verb(cmd: &Command) -> &'static str {
    match cmd {
        Command::Helo(_) => "HELO",
        Command::Ehlo(_) => "EHLO",
        Command::Mail { .. } => "MAIL",
        Command::Rcpt { .. } => "RCPT",
        Command::Data => "DATA",
        Command::Bdat { .. } => "BDAT",
        Command::Rset => "RSET",
        Command::Noop => "NOOP",
        Command::Quit => "QUIT",
        Command::Vrfy => "VRFY",
        Command::Expn => "EXPN",
        Command::Help => "HELP",
        Command::StartTls => "STARTTLS",
        Command::Auth { .. } => "AUTH",
    }
}

fn forward_path_text(to: &ForwardPath) -> String {
    match to {
        ForwardPath::Postmaster => "Postmaster".to_string(),
        ForwardPath::Mailbox(a) => a.to_string(),
    }
}
