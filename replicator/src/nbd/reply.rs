//! Encoding transmission-phase replies, sans-IO.
//!
//! Each function appends one complete reply header (and any small payload)
//! to `out`. READ data is not copied here: [`read_ok_header`] writes only the
//! header and the shell sends the data buffer after it, so large reads go
//! from the I/O buffer to the socket without a copy.

use zerocopy::IntoBytes;

use super::wire::{self, NbdError, SimpleReply, StructuredReplyHeader};

/// One extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u32,
    pub hole: bool,
}

fn simple(out: &mut Vec<u8>, cookie: u64, error: u32) {
    let reply = SimpleReply { magic: wire::SIMPLE_REPLY_MAGIC.into(), error: error.into(), cookie: cookie.into() };
    out.extend_from_slice(reply.as_bytes());
}

fn chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, reply_type: u16, length: u32) {
    let header = StructuredReplyHeader {
        magic: wire::STRUCTURED_REPLY_MAGIC.into(),
        flags: flags.into(),
        reply_type: reply_type.into(),
        cookie: cookie.into(),
        length: length.into(),
    };
    out.extend_from_slice(header.as_bytes());
}

/// Success without data (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE).
pub fn ok(out: &mut Vec<u8>, cookie: u64) {
    simple(out, cookie, 0);
}

/// The header that precedes `len` bytes of READ data.
pub fn read_ok_header(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32, structured: bool) {
    if structured && len > 0 {
        chunk_header(out, cookie, wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_OFFSET_DATA, len + 8);
        out.extend_from_slice(&offset.to_be_bytes());
    } else if structured {
        // A zero-length read has no data chunk to carry; answer with NONE.
        chunk_header(out, cookie, wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_NONE, 0);
    } else {
        simple(out, cookie, 0);
    }
}

/// An error reply. `structured` selects an NBD_REPLY_TYPE_ERROR chunk, which
/// the spec requires for READ and BLOCK_STATUS once structured replies are on.
pub fn error(out: &mut Vec<u8>, cookie: u64, error: NbdError, structured: bool, message: &str) {
    if structured {
        let message = &message.as_bytes()[..message.len().min(4096)];
        let length = 4 + 2 + message.len() as u32;
        chunk_header(out, cookie, wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_ERROR, length);
        out.extend_from_slice(&(error as u32).to_be_bytes());
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message);
    } else {
        simple(out, cookie, error as u32);
    }
}

/// A `base:allocation` block-status answer. `extents` must be non-empty.
pub fn block_status(out: &mut Vec<u8>, cookie: u64, extents: &[StatusExtent], req_one: bool) {
    assert!(!extents.is_empty(), "block status needs at least one extent");
    let extents = if req_one { &extents[..1] } else { extents };
    let length = 4 + 8 * extents.len() as u32;
    chunk_header(out, cookie, wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_BLOCK_STATUS, length);
    out.extend_from_slice(&wire::META_BASE_ALLOCATION_ID.to_be_bytes());
    for extent in extents {
        assert!(extent.length > 0);
        let state = if extent.hole { wire::STATE_HOLE | wire::STATE_ZERO } else { 0 };
        out.extend_from_slice(&extent.length.to_be_bytes());
        out.extend_from_slice(&state.to_be_bytes());
    }
}
