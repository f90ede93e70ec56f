//! The NBD handshake ("option haggling") as a sans-IO state machine.
//!
//! [`Handshake`] owns no socket and no clock. The shell drives it:
//! 1. send whatever [`Handshake::poll_transmit`] returns (the greeting first);
//! 2. read exactly [`Handshake::bytes_wanted`] bytes and pass them to
//!    [`Handshake::handle_input`];
//! 3. act on [`Handshake::poll_event`]: `StartTls` (wrap the socket, then
//!    call [`Handshake::tls_established`]), `Ready` (enter transmission),
//!    `Closed` (send pending output, close).
//!
//! Reading exactly what is wanted matters for STARTTLS: no plaintext byte
//! after the option may be consumed before the TLS handshake starts.
//!
//! Invariant: a client that has not finished TLS while TLS is required
//! learns nothing about the export but that TLS is required.

use zerocopy::FromBytes;

use super::wire::{self, OptionHeader};
use crate::limits;

/// Whether TLS is off, offered, or mandatory for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Off,
    Optional,
    Required,
}

/// What the handshake tells clients about the one export we serve.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub block_size_min: u32,
    pub block_size_preferred: u32,
    pub block_size_max: u32,
    /// Set when the export may not be opened now (a replicated volume on a
    /// secondary): GO/INFO get NBD_REP_ERR_POLICY with this message.
    pub unavailable: Option<String>,
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub structured_replies: bool,
    /// The client selected `base:allocation` (only with structured replies).
    pub base_allocation: bool,
    pub transmission_flags: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeEvent {
    /// The client asked for TLS and we agreed; upgrade the socket now.
    StartTls,
    /// Option haggling is over; the transmission phase starts.
    Ready(Negotiated),
    /// The client aborted; send pending output and close.
    Closed,
}

/// A violation that ends the connection (after pending output is sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("client flags {0:#x} include bits this server does not know")]
    UnknownClientFlags(u32),
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE")]
    NotFixedNewstyle,
    #[error("option header has bad magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} carries {length} bytes, more than the {max} allowed")]
    OptionTooBig { option: u32, length: u32, max: u32 },
    #[error("client sent more than {0} options")]
    TooManyOptions(u32),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client asked for an export that is unavailable: {0}")]
    Unavailable(String),
    #[error("client used NBD_OPT_EXPORT_NAME without TLS while TLS is required")]
    TlsRequired,
    #[error("input of {got} bytes given where {wanted} were wanted")]
    WrongInputLength { wanted: usize, got: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ExpectClientFlags,
    ExpectOptionHeader,
    ExpectOptionData { option: u32, length: u32 },
    AwaitTls,
    Done,
}

/// Sans-IO NBD handshake for one connection. See the module docs for the
/// call order.
#[derive(Debug)]
pub struct Handshake {
    export: ExportInfo,
    tls_mode: TlsMode,
    tls_active: bool,
    state: State,
    no_zeroes: bool,
    structured_replies: bool,
    base_allocation: bool,
    options_seen: u32,
    output: Vec<u8>,
    event: Option<HandshakeEvent>,
}

impl Handshake {
    pub fn new(export: ExportInfo, tls_mode: TlsMode) -> Handshake {
        assert!(export.block_size_min <= export.block_size_preferred);
        assert!(export.block_size_preferred <= export.block_size_max);
        let mut handshake = Handshake {
            export,
            tls_mode,
            tls_active: false,
            state: State::ExpectClientFlags,
            no_zeroes: false,
            structured_replies: false,
            base_allocation: false,
            options_seen: 0,
            output: Vec::with_capacity(256),
            event: None,
        };
        handshake.output.extend_from_slice(&wire::NBDMAGIC.to_be_bytes());
        handshake.output.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        let flags = wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES;
        handshake.output.extend_from_slice(&flags.to_be_bytes());
        handshake
    }

    /// Bytes the shell must read next and pass to [`Self::handle_input`];
    /// zero while an event is pending or the handshake is over.
    pub fn bytes_wanted(&self) -> usize {
        if self.event.is_some() {
            return 0;
        }
        match self.state {
            State::ExpectClientFlags => 4,
            State::ExpectOptionHeader => wire::OPTION_HEADER_BYTES,
            State::ExpectOptionData { length, .. } => length as usize,
            State::AwaitTls | State::Done => 0,
        }
    }

    /// Output to send to the client, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.output.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.output))
        }
    }

    pub fn poll_event(&mut self) -> Option<HandshakeEvent> {
        self.event.take()
    }

    /// The TLS handshake on the socket succeeded. Per the spec, everything
    /// negotiated in plaintext is forgotten.
    pub fn tls_established(&mut self) {
        assert_eq!(self.state, State::AwaitTls);
        self.tls_active = true;
        self.structured_replies = false;
        self.base_allocation = false;
        self.state = State::ExpectOptionHeader;
    }

    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Feeds exactly [`Self::bytes_wanted`] bytes. An error ends the
    /// connection; pending output (a final error reply) should still be sent.
    pub fn handle_input(&mut self, input: &[u8]) -> Result<(), HandshakeError> {
        let wanted = self.bytes_wanted();
        if wanted == 0 || input.len() != wanted {
            return Err(HandshakeError::WrongInputLength { wanted, got: input.len() });
        }
        match self.state {
            State::ExpectClientFlags => {
                let flags = u32::from_be_bytes([input[0], input[1], input[2], input[3]]);
                let known = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;
                if flags & !known != 0 {
                    return Err(HandshakeError::UnknownClientFlags(flags));
                }
                if flags & wire::FLAG_C_FIXED_NEWSTYLE == 0 {
                    return Err(HandshakeError::NotFixedNewstyle);
                }
                self.no_zeroes = flags & wire::FLAG_C_NO_ZEROES != 0;
                self.state = State::ExpectOptionHeader;
                Ok(())
            }
            State::ExpectOptionHeader => {
                let header = OptionHeader::ref_from_bytes(input)
                    .map_err(|_| HandshakeError::WrongInputLength { wanted, got: input.len() })?;
                let magic = header.magic.get();
                if magic != wire::IHAVEOPT {
                    return Err(HandshakeError::BadOptionMagic(magic));
                }
                self.options_seen += 1;
                if self.options_seen > limits::NBD_OPTIONS_PER_HANDSHAKE_MAX {
                    return Err(HandshakeError::TooManyOptions(limits::NBD_OPTIONS_PER_HANDSHAKE_MAX));
                }
                let option = header.option.get();
                let length = header.length.get();
                if length > limits::NBD_OPTION_BYTES_MAX {
                    self.reply_error(option, wire::REP_ERR_TOO_BIG, "option too large");
                    return Err(HandshakeError::OptionTooBig { option, length, max: limits::NBD_OPTION_BYTES_MAX });
                }
                if length == 0 {
                    self.state = State::ExpectOptionHeader;
                    self.handle_option(option, &[])
                } else {
                    self.state = State::ExpectOptionData { option, length };
                    Ok(())
                }
            }
            State::ExpectOptionData { option, .. } => {
                self.state = State::ExpectOptionHeader;
                self.handle_option(option, input)
            }
            State::AwaitTls | State::Done => unreachable!("bytes_wanted is 0 in this state"),
        }
    }

    fn handle_option(&mut self, option: u32, data: &[u8]) -> Result<(), HandshakeError> {
        let tls_missing = self.tls_mode == TlsMode::Required && !self.tls_active;
        if tls_missing && option != wire::OPT_STARTTLS && option != wire::OPT_ABORT {
            if option == wire::OPT_EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            self.reply_error(option, wire::REP_ERR_TLS_REQD, "TLS is required: use NBD_OPT_STARTTLS");
            return Ok(());
        }
        match option {
            wire::OPT_ABORT => {
                self.reply(option, wire::REP_ACK, &[]);
                self.state = State::Done;
                self.event = Some(HandshakeEvent::Closed);
                Ok(())
            }
            wire::OPT_LIST => {
                if !data.is_empty() {
                    self.reply_error(option, wire::REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(());
                }
                let name = self.export.name.clone();
                let mut payload = Vec::with_capacity(4 + name.len());
                payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
                payload.extend_from_slice(name.as_bytes());
                self.reply(option, wire::REP_SERVER, &payload);
                self.reply(option, wire::REP_ACK, &[]);
                Ok(())
            }
            wire::OPT_STARTTLS => {
                if !data.is_empty() {
                    self.reply_error(option, wire::REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                } else if self.tls_mode == TlsMode::Off {
                    self.reply_error(option, wire::REP_ERR_UNSUP, "TLS is not configured on this server");
                } else if self.tls_active {
                    self.reply_error(option, wire::REP_ERR_INVALID, "TLS is already active");
                } else {
                    self.reply(option, wire::REP_ACK, &[]);
                    self.state = State::AwaitTls;
                    self.event = Some(HandshakeEvent::StartTls);
                }
                Ok(())
            }
            wire::OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured_replies = true;
                    self.reply(option, wire::REP_ACK, &[]);
                } else {
                    self.reply_error(option, wire::REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                Ok(())
            }
            wire::OPT_INFO | wire::OPT_GO => {
                self.handle_info_or_go(option, data);
                Ok(())
            }
            wire::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                if !self.export_matches(data) {
                    return Err(HandshakeError::UnknownExport(name));
                }
                if let Some(why) = &self.export.unavailable {
                    return Err(HandshakeError::Unavailable(why.clone()));
                }
                let flags = self.transmission_flags();
                self.output.extend_from_slice(&self.export.size_bytes.to_be_bytes());
                self.output.extend_from_slice(&flags.to_be_bytes());
                if !self.no_zeroes {
                    self.output.extend_from_slice(&[0u8; 124]);
                }
                self.finish();
                Ok(())
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                self.handle_meta_context(option, data);
                Ok(())
            }
            _ => {
                self.reply_error(option, wire::REP_ERR_UNSUP, "option not supported");
                Ok(())
            }
        }
    }

    fn handle_info_or_go(&mut self, option: u32, data: &[u8]) {
        let mut cursor = Cursor::new(data);
        let parsed = (|| {
            let name_len = cursor.u32()?;
            let name = cursor.bytes(name_len as usize)?;
            let count = cursor.u16()?;
            let mut requests = Vec::with_capacity(usize::from(count).min(16));
            for _ in 0..count {
                requests.push(cursor.u16()?);
            }
            cursor.is_empty().then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            self.reply_error(option, wire::REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO payload");
            return;
        };
        if !self.export_matches(name) {
            self.reply_error(option, wire::REP_ERR_UNKNOWN, "no such export");
            return;
        }
        if let Some(why) = self.export.unavailable.clone() {
            self.reply_error(option, wire::REP_ERR_POLICY, &why);
            return;
        }
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&wire::INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&self.export.size_bytes.to_be_bytes());
        info.extend_from_slice(&self.transmission_flags().to_be_bytes());
        self.reply(option, wire::REP_INFO, &info);

        if requests.contains(&wire::INFO_NAME) {
            let mut info = wire::INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(self.export.name.as_bytes());
            self.reply(option, wire::REP_INFO, &info);
        }
        if requests.contains(&wire::INFO_DESCRIPTION) && !self.export.description.is_empty() {
            let mut info = wire::INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(self.export.description.as_bytes());
            self.reply(option, wire::REP_INFO, &info);
        }
        // Block sizes are always sent: clients ignore what they did not ask for,
        // and those that honour it avoid unaligned I/O.
        let mut info = wire::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        info.extend_from_slice(&self.export.block_size_min.to_be_bytes());
        info.extend_from_slice(&self.export.block_size_preferred.to_be_bytes());
        info.extend_from_slice(&self.export.block_size_max.to_be_bytes());
        self.reply(option, wire::REP_INFO, &info);

        self.reply(option, wire::REP_ACK, &[]);
        if option == wire::OPT_GO {
            self.finish();
        }
    }

    fn handle_meta_context(&mut self, option: u32, data: &[u8]) {
        let is_set = option == wire::OPT_SET_META_CONTEXT;
        if is_set && !self.structured_replies {
            self.reply_error(option, wire::REP_ERR_INVALID, "negotiate structured replies first");
            return;
        }
        let mut cursor = Cursor::new(data);
        let parsed = (|| {
            let name_len = cursor.u32()?;
            let name = cursor.bytes(name_len as usize)?;
            let count = cursor.u32()?;
            if count > limits::NBD_META_QUERIES_MAX {
                return None;
            }
            let mut queries = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let len = cursor.u32()?;
                queries.push(cursor.bytes(len as usize)?);
            }
            cursor.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.reply_error(option, wire::REP_ERR_INVALID, "malformed meta context payload");
            return;
        };
        if !self.export_matches(name) {
            self.reply_error(option, wire::REP_ERR_UNKNOWN, "no such export");
            return;
        }
        let exact = wire::META_BASE_ALLOCATION.as_bytes();
        let selected = if is_set {
            queries.contains(&exact)
        } else {
            queries.is_empty() || queries.iter().any(|q| *q == exact || *q == b"base:")
        };
        if is_set {
            self.base_allocation = selected;
        }
        if selected {
            let mut payload = wire::META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            payload.extend_from_slice(exact);
            self.reply(option, wire::REP_META_CONTEXT, &payload);
        }
        self.reply(option, wire::REP_ACK, &[]);
    }

    fn export_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export.name.as_bytes()
    }

    fn transmission_flags(&self) -> u16 {
        let mut flags = wire::TFLAG_HAS_FLAGS | wire::TFLAG_CAN_MULTI_CONN | wire::TFLAG_SEND_CACHE;
        if self.export.read_only {
            flags |= wire::TFLAG_READ_ONLY;
        } else {
            flags |= wire::TFLAG_SEND_FLUSH
                | wire::TFLAG_SEND_FUA
                | wire::TFLAG_SEND_TRIM
                | wire::TFLAG_SEND_WRITE_ZEROES
                | wire::TFLAG_SEND_FAST_ZERO;
        }
        if self.structured_replies {
            flags |= wire::TFLAG_SEND_DF;
        }
        flags
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.event = Some(HandshakeEvent::Ready(Negotiated {
            structured_replies: self.structured_replies,
            base_allocation: self.structured_replies && self.base_allocation,
            transmission_flags: self.transmission_flags(),
        }));
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        let length = u32::try_from(data.len()).expect("option replies are small");
        self.output.extend_from_slice(&wire::OPTION_REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&option.to_be_bytes());
        self.output.extend_from_slice(&reply_type.to_be_bytes());
        self.output.extend_from_slice(&length.to_be_bytes());
        self.output.extend_from_slice(data);
    }

    fn reply_error(&mut self, option: u32, reply_type: u32, message: &str) {
        assert!(reply_type & 0x8000_0000 != 0);
        self.reply(option, reply_type, message.as_bytes());
    }
}

/// Bounds-checked big-endian reader over an option payload.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { rest: data }
    }

    fn bytes(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}
