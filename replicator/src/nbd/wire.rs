//! NBD wire constants and fixed-layout headers (NetworkBlockDevice/nbd
//! `doc/proto.md`). Everything is big-endian on the wire; the headers are
//! `zerocopy` structs so parsing is a bounds-checked cast, never `unsafe`.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// "NBDMAGIC": first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second word of the greeting and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// Information types in NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Block status flags of the `base:allocation` context.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id we give it when a client selects it.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Error values in replies (the spec fixes these numbers; they are Linux's
/// errno values, but are spelled out so that the wire never depends on the
/// host's libc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdError {
    /// Maps a host errno from the backing store onto the spec's error set.
    pub fn from_errno(errno: i32) -> NbdError {
        match errno {
            libc::EPERM | libc::EROFS | libc::EACCES => NbdError::Perm,
            libc::ENOMEM => NbdError::NoMem,
            libc::EINVAL => NbdError::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdError::NoSpc,
            libc::EOVERFLOW => NbdError::Overflow,
            libc::EOPNOTSUPP => NbdError::NotSup,
            libc::ESHUTDOWN => NbdError::Shutdown,
            _ => NbdError::Io,
        }
    }
}

/// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags (18 bytes).
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Greeting {
    pub nbd_magic: U64,
    pub opt_magic: U64,
    pub handshake_flags: U16,
}

/// Header of a client option (16 bytes); `length` bytes of data follow.
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct OptionHeader {
    pub magic: U64,
    pub option: U32,
    pub length: U32,
}

/// Header of an option reply (20 bytes); `length` bytes of data follow.
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct OptionReplyHeader {
    pub magic: U64,
    pub option: U32,
    pub reply_type: U32,
    pub length: U32,
}

/// Transmission request header (28 bytes); WRITE data follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RequestHeader {
    pub magic: U32,
    pub flags: U16,
    pub command: U16,
    pub cookie: U64,
    pub offset: U64,
    pub length: U32,
}

/// Simple reply header (16 bytes); READ data follows on success.
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SimpleReply {
    pub magic: U32,
    pub error: U32,
    pub cookie: U64,
}

/// Structured reply chunk header (20 bytes); `length` bytes of payload follow.
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct StructuredReplyHeader {
    pub magic: U32,
    pub flags: U16,
    pub reply_type: U16,
    pub cookie: U64,
    pub length: U32,
}

pub const GREETING_BYTES: usize = std::mem::size_of::<Greeting>();
pub const OPTION_HEADER_BYTES: usize = std::mem::size_of::<OptionHeader>();
pub const REQUEST_HEADER_BYTES: usize = std::mem::size_of::<RequestHeader>();
pub const SIMPLE_REPLY_BYTES: usize = std::mem::size_of::<SimpleReply>();
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = std::mem::size_of::<StructuredReplyHeader>();

const _: () = assert!(GREETING_BYTES == 18);
const _: () = assert!(OPTION_HEADER_BYTES == 16);
const _: () = assert!(std::mem::size_of::<OptionReplyHeader>() == 20);
const _: () = assert!(REQUEST_HEADER_BYTES == 28);
const _: () = assert!(SIMPLE_REPLY_BYTES == 16);
const _: () = assert!(STRUCTURED_REPLY_HEADER_BYTES == 20);
