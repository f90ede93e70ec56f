//! NBD protocol constants (doc/proto.md of the NBD project) and header
//! encoding. Written out here rather than imported from `replicator`, so a
//! wrong constant cannot pass because both sides share it.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

pub const OPT_GO: u32 = 7;
pub const OPT_ABORT: u32 = 2;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TRANS_HAS_FLAGS: u16 = 1 << 0;
pub const TRANS_READ_ONLY: u16 = 1 << 1;
pub const TRANS_SEND_FLUSH: u16 = 1 << 2;
pub const TRANS_SEND_FUA: u16 = 1 << 3;
pub const TRANS_SEND_TRIM: u16 = 1 << 5;
pub const TRANS_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TRANS_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_BYTES: usize = 16;

/// A transmission request header (28 bytes, big endian).
pub fn encode_request(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> [u8; REQUEST_HEADER_BYTES] {
    let mut h = [0u8; REQUEST_HEADER_BYTES];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&length.to_be_bytes());
    h
}

/// A decoded simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// Decodes a simple reply header; `None` if the magic is wrong.
pub fn decode_simple_reply(b: &[u8; SIMPLE_REPLY_BYTES]) -> Option<SimpleReply> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return None;
    }
    let error = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&b[8..16]);
    Some(SimpleReply { error, cookie: u64::from_be_bytes(c) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_layout_matches_the_spec() {
        let h = encode_request(CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..6], &[0, 1]);
        assert_eq!(&h[6..8], &[0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&h[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&h[24..28], &[0, 0, 2, 0]);
    }

    #[test]
    fn simple_reply_needs_its_magic() {
        let mut b = [0u8; SIMPLE_REPLY_BYTES];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&5u32.to_be_bytes());
        b[15] = 9;
        assert_eq!(decode_simple_reply(&b), Some(SimpleReply { error: 5, cookie: 9 }));
        b[0] ^= 1;
        assert_eq!(decode_simple_reply(&b), None);
    }
}
