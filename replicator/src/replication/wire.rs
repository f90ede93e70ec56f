//! The replication link's framing: a fixed 56-byte big-endian header
//! (`zerocopy`) followed by an optional payload, with one crc32 over both.
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! |      0 |    4 | magic `b"RPL1"`                                    |
//! |      4 |    1 | version (= 1)                                      |
//! |      5 |    1 | command                                            |
//! |      6 |    2 | flags (per command)                                |
//! |      8 |    8 | seq                                                |
//! |     16 |    8 | offset (bytes into the volume)                     |
//! |     24 |    4 | length (bytes of the volume the command covers)    |
//! |     28 |    4 | payload length (bytes following this header)       |
//! |     32 |    8 | Data: the primary's epoch; otherwise zero          |
//! |     40 |    8 | aux (write-ordering barrier, checksum, …)          |
//! |     48 |    4 | reserved, zero                                     |
//! |     52 |    4 | crc32 of the header (this field zero) and payload  |
//!
//! Decoding happens in two steps so no payload is read for a header that is
//! already wrong: [`decode_header`] checks magic, version, command, reserved
//! bits and bounds; [`decode_message`] checks the crc over header and
//! payload and builds the typed [`Message`]. Any failure is a
//! [`FrameError`], after which the shell drops the connection: nothing of a
//! bad frame is ever applied.

use serde::{Deserialize, Serialize};
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use super::message::{AckKind, Hello, Message, PeerState, ResyncDone, WriteKind};
use crate::limits;

pub const MAGIC: [u8; 4] = *b"RPL1";
pub const VERSION: u8 = 2;
pub const HEADER_BYTES: usize = 56;

#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
struct RawHeader {
    magic: [u8; 4],
    version: u8,
    command: u8,
    flags: U16,
    seq: U64,
    offset: U64,
    length: U32,
    payload_len: U32,
    epoch: U64,
    aux: U64,
    reserved: U32,
    crc: U32,
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_BYTES);
const _: () = assert!(HEADER_BYTES as u64 == crate::limits::REPL_FRAME_HEADER_BYTES);

/// Command numbers. Never reuse a retired number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Command {
    Hello = 1,
    Bitmap = 2,
    State = 3,
    Data = 4,
    Ack = 5,
    Flush = 6,
    FlushAck = 7,
    ResyncData = 8,
    ResyncAck = 9,
    ResyncCsum = 10,
    ResyncCsumReply = 11,
    ResyncDone = 12,
    VerifyReq = 13,
    VerifyReply = 14,
    Ping = 15,
    PingAck = 16,
    Outdate = 17,
}

impl Command {
    fn from_u8(v: u8) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Hello,
            2 => Bitmap,
            3 => State,
            4 => Data,
            5 => Ack,
            6 => Flush,
            7 => FlushAck,
            8 => ResyncData,
            9 => ResyncAck,
            10 => ResyncCsum,
            11 => ResyncCsumReply,
            12 => ResyncDone,
            13 => VerifyReq,
            14 => VerifyReply,
            15 => Ping,
            16 => PingAck,
            17 => Outdate,
            _ => return None,
        })
    }

    /// Acks, pings and small control frames: the shell sends these ahead of
    /// queued bulk data so they never wait behind it.
    pub fn is_urgent(self) -> bool {
        matches!(
            self,
            Command::Ack
                | Command::FlushAck
                | Command::ResyncAck
                | Command::ResyncCsumReply
                | Command::VerifyReply
                | Command::Ping
                | Command::PingAck
        )
    }

    /// Flag bits this command may carry.
    fn known_flags(self) -> u16 {
        match self {
            Command::Data => FLAG_FUA | FLAG_KIND_MASK,
            Command::Ack | Command::FlushAck | Command::ResyncAck | Command::VerifyReply => ACK_KIND_MASK,
            Command::Bitmap => FLAG_LAST,
            Command::ResyncCsumReply => FLAG_EQUAL,
            _ => 0,
        }
    }

    /// Largest payload this command may carry.
    fn payload_max(self) -> u32 {
        match self {
            Command::Hello | Command::State | Command::ResyncDone => limits::REPL_CONTROL_PAYLOAD_BYTES_MAX,
            Command::Bitmap => limits::REPL_BITMAP_PAYLOAD_BYTES_MAX,
            Command::Data | Command::ResyncData => limits::NBD_REQUEST_BYTES_MAX,
            _ => 0,
        }
    }
}

pub const FLAG_FUA: u16 = 1 << 0;
/// Bits 1..=2 of a Data frame: what kind of write.
const FLAG_KIND_MASK: u16 = 0b110;
const KIND_WRITE: u16 = 0;
const KIND_TRIM: u16 = 1 << 1;
const KIND_ZEROES: u16 = 2 << 1;
pub const FLAG_LAST: u16 = 1 << 0;
pub const FLAG_EQUAL: u16 = 1 << 0;
const ACK_KIND_MASK: u16 = 0b11;
const ACK_RECEIVED: u16 = 0;
const ACK_WRITTEN: u16 = 1;
const ACK_FAILED: u16 = 2;

/// A header that passed [`decode_header`]; its payload is still unread.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    raw: RawHeader,
    pub command: Command,
}

impl Header {
    pub fn payload_len(&self) -> usize {
        self.raw.payload_len.get() as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: the peer is not a replicator (or the stream is corrupt)")]
    Magic([u8; 4]),
    #[error("protocol version {0} is not supported (this build speaks {VERSION}); run the same replicator version on both nodes")]
    Version(u8),
    #[error("unknown command {0}")]
    Command(u8),
    #[error("{command:?} frame carries unknown flags {flags:#06x}")]
    Flags { command: Command, flags: u16 },
    #[error("reserved header field is {0:#x}, not zero")]
    Reserved(u32),
    #[error("{command:?} frame carries a {len}-byte payload, more than its {max}-byte limit")]
    PayloadTooLarge { command: Command, len: u32, max: u32 },
    #[error("{command:?} frame: {what}")]
    Malformed { command: Command, what: &'static str },
    #[error("checksum mismatch: frame corrupt in transit")]
    Checksum,
    #[error("{command:?} payload does not decode: {why}")]
    Payload { command: Command, why: String },
}

/// Checks everything that can be checked before reading the payload.
pub fn decode_header(bytes: &[u8; HEADER_BYTES]) -> Result<Header, FrameError> {
    let raw = RawHeader::read_from_bytes(bytes)
        .map_err(|_| FrameError::Malformed { command: Command::Hello, what: "short header" })?;
    if raw.magic != MAGIC {
        return Err(FrameError::Magic(raw.magic));
    }
    if raw.version != VERSION {
        return Err(FrameError::Version(raw.version));
    }
    let command = Command::from_u8(raw.command).ok_or(FrameError::Command(raw.command))?;
    let flags = raw.flags.get();
    if flags & !command.known_flags() != 0 {
        return Err(FrameError::Flags { command, flags });
    }
    if raw.reserved.get() != 0 {
        return Err(FrameError::Reserved(raw.reserved.get()));
    }
    let len = raw.payload_len.get();
    let max = command.payload_max();
    if len > max {
        return Err(FrameError::PayloadTooLarge { command, len, max });
    }
    let length = raw.length.get();
    match command {
        Command::Data => {
            let kind = flags & FLAG_KIND_MASK;
            if kind == FLAG_KIND_MASK {
                return Err(FrameError::Malformed { command, what: "unknown write kind" });
            }
            let want = if kind == KIND_WRITE { length } else { 0 };
            if len != want || length == 0 {
                return Err(FrameError::Malformed { command, what: "payload length does not match the write" });
            }
        }
        Command::ResyncData if len != length || length == 0 => {
            return Err(FrameError::Malformed { command, what: "payload length does not match the block range" });
        }
        Command::Bitmap if len % 16 != 0 => {
            return Err(FrameError::Malformed { command, what: "bitmap payload is not whole (index, word) pairs" });
        }
        _ => {}
    }
    if flags & ACK_KIND_MASK == ACK_KIND_MASK && command.known_flags() == ACK_KIND_MASK {
        return Err(FrameError::Malformed { command, what: "unknown ack kind" });
    }
    Ok(Header { raw, command })
}

/// Checks the crc and builds the message. `payload` must be exactly
/// `header.payload_len()` bytes; Data and ResyncData messages keep it as
/// their data (no copy).
pub fn decode_message<P: AsRef<[u8]>>(header: &Header, payload: P) -> Result<Message<P>, FrameError> {
    let bytes = payload.as_ref();
    if bytes.len() != header.payload_len() {
        return Err(FrameError::Malformed { command: header.command, what: "payload length" });
    }
    if crc(&header.raw, bytes) != header.raw.crc.get() {
        return Err(FrameError::Checksum);
    }
    let r = &header.raw;
    let command = header.command;
    let flags = r.flags.get();
    let (seq, offset, length, epoch, aux) = (r.seq.get(), r.offset.get(), r.length.get(), r.epoch.get(), r.aux.get());
    let ack = || match flags & ACK_KIND_MASK {
        ACK_RECEIVED => AckKind::Received,
        ACK_WRITTEN => AckKind::Written,
        _ => AckKind::Failed,
    };
    Ok(match command {
        Command::Hello => Message::Hello(Box::new(postcard_decode::<Hello>(command, bytes)?)),
        Command::State => Message::State(postcard_decode::<PeerState>(command, bytes)?),
        Command::ResyncDone => Message::ResyncDone(postcard_decode::<ResyncDone>(command, bytes)?),
        Command::Bitmap => {
            let pairs = bytes
                .chunks_exact(16)
                .map(|c| {
                    let (i, w) = c.split_at(8);
                    (
                        u64::from_le_bytes(i.try_into().unwrap_or_default()),
                        u64::from_le_bytes(w.try_into().unwrap_or_default()),
                    )
                })
                .collect();
            Message::Bitmap { pairs, last: flags & FLAG_LAST != 0 }
        }
        Command::Data => {
            let kind = match flags & FLAG_KIND_MASK {
                KIND_WRITE => WriteKind::Write,
                KIND_TRIM => WriteKind::Trim,
                _ => WriteKind::Zeroes,
            };
            let data = (kind == WriteKind::Write).then_some(payload);
            Message::Data { seq, epoch, barrier: aux, offset, len: length, kind, fua: flags & FLAG_FUA != 0, data }
        }
        Command::Ack => Message::Ack { seq, kind: ack() },
        Command::Flush => Message::Flush { seq, barrier: aux },
        Command::FlushAck => Message::FlushAck { seq, ok: ack() != AckKind::Failed },
        Command::ResyncData => Message::ResyncData { seq, offset, len: length, data: payload },
        Command::ResyncAck => Message::ResyncAck { seq, ok: ack() != AckKind::Failed },
        Command::ResyncCsum => Message::ResyncCsum { seq, offset, len: length, csum: aux as u32 },
        Command::ResyncCsumReply => Message::ResyncCsumReply { seq, equal: flags & FLAG_EQUAL != 0 },
        Command::VerifyReq => Message::VerifyReq { seq, offset, len: length, csum: aux as u32 },
        Command::VerifyReply => Message::VerifyReply { seq, kind: ack() },
        Command::Ping => Message::Ping,
        Command::PingAck => Message::PingAck,
        Command::Outdate => Message::Outdate,
    })
}

fn postcard_decode<T: for<'de> Deserialize<'de>>(command: Command, payload: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(|e| FrameError::Payload { command, why: e.to_string() })
}

fn crc(raw: &RawHeader, payload: &[u8]) -> u32 {
    let mut copy = *raw;
    copy.crc = U32::new(0);
    let mut h = crc32fast::Hasher::new();
    h.update(copy.as_bytes());
    h.update(payload);
    h.finalize()
}

/// An encoded frame: the header plus the payload to send after it. `data`
/// is the shell's buffer for Data/ResyncData (sent without copying);
/// `bytes` holds any other payload.
pub struct Encoded<'a> {
    pub header: [u8; HEADER_BYTES],
    pub payload: EncodedPayload<'a>,
}

pub enum EncodedPayload<'a> {
    None,
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

impl EncodedPayload<'_> {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            EncodedPayload::None => &[],
            EncodedPayload::Owned(v) => v,
            EncodedPayload::Borrowed(b) => b,
        }
    }
}

/// Encodes `msg`. `data_bytes` views the shell's buffer type.
pub fn encode<'a, P>(msg: &'a Message<P>, data_bytes: impl Fn(&'a P) -> &'a [u8]) -> Encoded<'a> {
    let mut raw = RawHeader::new_zeroed();
    raw.magic = MAGIC;
    raw.version = VERSION;
    let ack_bits = |kind: AckKind| match kind {
        AckKind::Received => ACK_RECEIVED,
        AckKind::Written => ACK_WRITTEN,
        AckKind::Failed => ACK_FAILED,
    };
    let ok_bits = |ok: bool| if ok { ACK_WRITTEN } else { ACK_FAILED };
    let mut data_epoch = 0;
    let mut fields = |command: Command, flags: u16, seq: u64, offset: u64, length: u32, aux: u64| {
        raw.command = command as u8;
        raw.flags = U16::new(flags);
        raw.seq = U64::new(seq);
        raw.offset = U64::new(offset);
        raw.length = U32::new(length);
        raw.aux = U64::new(aux);
    };
    let payload = match msg {
        Message::Hello(h) => {
            fields(Command::Hello, 0, 0, 0, 0, 0);
            EncodedPayload::Owned(postcard_encode(h.as_ref()))
        }
        Message::State(s) => {
            fields(Command::State, 0, 0, 0, 0, 0);
            EncodedPayload::Owned(postcard_encode(s))
        }
        Message::ResyncDone(d) => {
            fields(Command::ResyncDone, 0, 0, 0, 0, 0);
            EncodedPayload::Owned(postcard_encode(d))
        }
        Message::Bitmap { pairs, last } => {
            fields(Command::Bitmap, if *last { FLAG_LAST } else { 0 }, 0, 0, 0, 0);
            let mut bytes = Vec::with_capacity(pairs.len() * 16);
            for (index, word) in pairs {
                bytes.extend_from_slice(&index.to_le_bytes());
                bytes.extend_from_slice(&word.to_le_bytes());
            }
            EncodedPayload::Owned(bytes)
        }
        Message::Data { seq, epoch, barrier, offset, len, kind, fua, data } => {
            data_epoch = *epoch;
            let kind_bits = match kind {
                WriteKind::Write => KIND_WRITE,
                WriteKind::Trim => KIND_TRIM,
                WriteKind::Zeroes => KIND_ZEROES,
            };
            let flags = kind_bits | if *fua { FLAG_FUA } else { 0 };
            fields(Command::Data, flags, *seq, *offset, *len, *barrier);
            match data {
                Some(d) => EncodedPayload::Borrowed(data_bytes(d)),
                None => EncodedPayload::None,
            }
        }
        Message::Ack { seq, kind } => {
            fields(Command::Ack, ack_bits(*kind), *seq, 0, 0, 0);
            EncodedPayload::None
        }
        Message::Flush { seq, barrier } => {
            fields(Command::Flush, 0, *seq, 0, 0, *barrier);
            EncodedPayload::None
        }
        Message::FlushAck { seq, ok } => {
            fields(Command::FlushAck, ok_bits(*ok), *seq, 0, 0, 0);
            EncodedPayload::None
        }
        Message::ResyncData { seq, offset, len, data } => {
            fields(Command::ResyncData, 0, *seq, *offset, *len, 0);
            EncodedPayload::Borrowed(data_bytes(data))
        }
        Message::ResyncAck { seq, ok } => {
            fields(Command::ResyncAck, ok_bits(*ok), *seq, 0, 0, 0);
            EncodedPayload::None
        }
        Message::ResyncCsum { seq, offset, len, csum } => {
            fields(Command::ResyncCsum, 0, *seq, *offset, *len, u64::from(*csum));
            EncodedPayload::None
        }
        Message::ResyncCsumReply { seq, equal } => {
            fields(Command::ResyncCsumReply, if *equal { FLAG_EQUAL } else { 0 }, *seq, 0, 0, 0);
            EncodedPayload::None
        }
        Message::VerifyReq { seq, offset, len, csum } => {
            fields(Command::VerifyReq, 0, *seq, *offset, *len, u64::from(*csum));
            EncodedPayload::None
        }
        Message::VerifyReply { seq, kind } => {
            fields(Command::VerifyReply, ack_bits(*kind), *seq, 0, 0, 0);
            EncodedPayload::None
        }
        Message::Ping => {
            fields(Command::Ping, 0, 0, 0, 0, 0);
            EncodedPayload::None
        }
        Message::PingAck => {
            fields(Command::PingAck, 0, 0, 0, 0, 0);
            EncodedPayload::None
        }
        Message::Outdate => {
            fields(Command::Outdate, 0, 0, 0, 0, 0);
            EncodedPayload::None
        }
    };
    raw.epoch = U64::new(data_epoch);
    let payload_bytes = payload.as_slice();
    raw.payload_len = U32::new(u32::try_from(payload_bytes.len()).expect("payloads are bounded by their limits"));
    raw.crc = U32::new(crc(&raw, payload_bytes));
    let mut header = [0u8; HEADER_BYTES];
    header.copy_from_slice(raw.as_bytes());
    Encoded { header, payload }
}

fn postcard_encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("control messages always serialize")
}

/// Which command a message is (for priority decisions before encoding).
pub fn command_of<P>(msg: &Message<P>) -> Command {
    match msg {
        Message::Hello(_) => Command::Hello,
        Message::Bitmap { .. } => Command::Bitmap,
        Message::State(_) => Command::State,
        Message::Data { .. } => Command::Data,
        Message::Ack { .. } => Command::Ack,
        Message::Flush { .. } => Command::Flush,
        Message::FlushAck { .. } => Command::FlushAck,
        Message::ResyncData { .. } => Command::ResyncData,
        Message::ResyncAck { .. } => Command::ResyncAck,
        Message::ResyncCsum { .. } => Command::ResyncCsum,
        Message::ResyncCsumReply { .. } => Command::ResyncCsumReply,
        Message::ResyncDone(_) => Command::ResyncDone,
        Message::VerifyReq { .. } => Command::VerifyReq,
        Message::VerifyReply { .. } => Command::VerifyReply,
        Message::Ping => Command::Ping,
        Message::PingAck => Command::PingAck,
        Message::Outdate => Command::Outdate,
    }
}
