//! Decoding and validating transmission-phase requests, sans-IO.
//!
//! [`decode`] turns one 28-byte header into what the shell must do next:
//! execute a command, refuse it with an error reply (after discarding a
//! WRITE payload it still has to read), or drop the connection because the
//! stream can no longer be trusted. All range, flag and permission checks
//! live here, so the shell only moves bytes and the I/O engine never sees a
//! request outside the export.

use zerocopy::FromBytes;

use super::wire::{self, NbdError, RequestHeader};
use crate::limits;

/// What the transmission phase knows about the export and the negotiation.
#[derive(Debug, Clone, Copy)]
pub struct TransmissionConfig {
    pub size_bytes: u64,
    pub read_only: bool,
    pub structured_replies: bool,
    pub base_allocation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    /// A prefetch hint; we answer it without doing anything.
    Cache,
    Disconnect,
}

impl Command {
    /// Payload bytes that follow the header on the wire.
    pub fn payload_bytes(&self) -> u32 {
        match *self {
            Command::Write { len, .. } => len,
            _ => 0,
        }
    }

    /// Data bytes the server holds in memory for this request: the WRITE
    /// payload on the way in, or the READ data on the way out. This is what
    /// the in-flight budget counts.
    pub fn buffer_bytes(&self) -> u32 {
        match *self {
            Command::Write { len, .. } | Command::Read { len, .. } => len,
            _ => 0,
        }
    }

    /// Whether an error for this command must use a structured reply once
    /// structured replies are negotiated (the spec forbids simple replies to
    /// READ, and BLOCK_STATUS only exists with structured replies).
    pub fn needs_structured_error(&self) -> bool {
        matches!(self, Command::Read { .. } | Command::BlockStatus { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub command: Command,
}

/// The decision for one request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    Execute(Request),
    /// Answer `error`; first read and discard `discard_bytes` of payload.
    Refuse {
        cookie: u64,
        error: NbdError,
        discard_bytes: u32,
        structured_error: bool,
    },
    /// Answer `error`, then close: the payload is too large to skip.
    RefuseAndClose {
        cookie: u64,
        error: NbdError,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    #[error("request has bad magic {0:#010x}")]
    BadMagic(u32),
}

const KNOWN_FLAGS: u16 =
    wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_DF | wire::CMD_FLAG_REQ_ONE | wire::CMD_FLAG_FAST_ZERO;

/// Decodes and validates one request header.
pub fn decode(
    config: &TransmissionConfig,
    header: &[u8; wire::REQUEST_HEADER_BYTES],
) -> Result<Decoded, ProtocolViolation> {
    let header = RequestHeader::read_from_bytes(header).expect("the array has exactly the header size");
    let magic = header.magic.get();
    if magic != wire::REQUEST_MAGIC {
        return Err(ProtocolViolation::BadMagic(magic));
    }
    let cookie = header.cookie.get();
    let flags = header.flags.get();
    let offset = header.offset.get();
    let len = header.length.get();
    let command = header.command.get();

    let refuse = |error: NbdError, discard_bytes: u32, structured_error: bool| Decoded::Refuse {
        cookie,
        error,
        discard_bytes,
        structured_error: structured_error && config.structured_replies,
    };
    let in_range = offset.checked_add(u64::from(len)).is_some_and(|end| end <= config.size_bytes);
    let fua = flags & wire::CMD_FLAG_FUA != 0;

    if command == wire::CMD_WRITE {
        if len > limits::NBD_REQUEST_BYTES_MAX {
            return Ok(Decoded::RefuseAndClose { cookie, error: NbdError::Inval });
        }
        let allowed = wire::CMD_FLAG_FUA;
        let decoded = if flags & !allowed != 0 {
            refuse(NbdError::Inval, len, false)
        } else if config.read_only {
            refuse(NbdError::Perm, len, false)
        } else if !in_range {
            refuse(NbdError::NoSpc, len, false)
        } else {
            Decoded::Execute(Request { cookie, command: Command::Write { offset, len, fua } })
        };
        return Ok(decoded);
    }

    if flags & !KNOWN_FLAGS != 0 {
        let structured = command == wire::CMD_READ || command == wire::CMD_BLOCK_STATUS;
        return Ok(refuse(NbdError::Inval, 0, structured));
    }

    let decoded = match command {
        wire::CMD_READ => {
            let allowed = wire::CMD_FLAG_FUA | wire::CMD_FLAG_DF;
            if flags & !allowed != 0 || len > limits::NBD_REQUEST_BYTES_MAX || !in_range {
                refuse(NbdError::Inval, 0, true)
            } else {
                Decoded::Execute(Request { cookie, command: Command::Read { offset, len } })
            }
        }
        wire::CMD_DISC => Decoded::Execute(Request { cookie, command: Command::Disconnect }),
        wire::CMD_FLUSH => {
            if offset != 0 || len != 0 || flags & !wire::CMD_FLAG_FUA != 0 {
                refuse(NbdError::Inval, 0, false)
            } else {
                Decoded::Execute(Request { cookie, command: Command::Flush })
            }
        }
        wire::CMD_TRIM => {
            if flags & !wire::CMD_FLAG_FUA != 0 || !in_range {
                refuse(NbdError::Inval, 0, false)
            } else if config.read_only {
                refuse(NbdError::Perm, 0, false)
            } else {
                Decoded::Execute(Request { cookie, command: Command::Trim { offset, len, fua } })
            }
        }
        wire::CMD_WRITE_ZEROES => {
            let allowed = wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FAST_ZERO;
            if flags & !allowed != 0 {
                refuse(NbdError::Inval, 0, false)
            } else if config.read_only {
                refuse(NbdError::Perm, 0, false)
            } else if !in_range {
                refuse(NbdError::NoSpc, 0, false)
            } else {
                Decoded::Execute(Request {
                    cookie,
                    command: Command::WriteZeroes {
                        offset,
                        len,
                        may_trim: flags & wire::CMD_FLAG_NO_HOLE == 0,
                        fast_only: flags & wire::CMD_FLAG_FAST_ZERO != 0,
                        fua,
                    },
                })
            }
        }
        wire::CMD_BLOCK_STATUS => {
            let allowed = wire::CMD_FLAG_REQ_ONE;
            if !config.base_allocation || flags & !allowed != 0 || len == 0 || !in_range {
                refuse(NbdError::Inval, 0, true)
            } else {
                Decoded::Execute(Request {
                    cookie,
                    command: Command::BlockStatus { offset, len, req_one: flags & wire::CMD_FLAG_REQ_ONE != 0 },
                })
            }
        }
        wire::CMD_CACHE => {
            if in_range {
                Decoded::Execute(Request { cookie, command: Command::Cache })
            } else {
                refuse(NbdError::Inval, 0, false)
            }
        }
        _ => refuse(NbdError::Inval, 0, false),
    };
    Ok(decoded)
}
