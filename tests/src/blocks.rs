//! Versioned 4 KiB blocks for write-stream tests: each block's content
//! names its number and a version and fills the rest from both, so a lost,
//! torn or misplaced block is caught on read-back.

pub const BLOCK: u64 = 4096;

/// A block's content: its number and a version, then filler derived from
/// both.
pub fn pattern(block: u64, version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK as usize);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version;
    while out.len() < BLOCK as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The version in a block, if it holds a whole pattern for `block`.
pub fn version_of(block: u64, bytes: &[u8]) -> Option<u64> {
    let b = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let v = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    (b == block && bytes == pattern(block, v).as_slice()).then_some(v)
}
