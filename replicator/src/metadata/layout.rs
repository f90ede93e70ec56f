//! The on-disk superblock format: byte layout, checksum, and decoding of one
//! 4 KiB slot into a [`SlotState`].
//!
//! Format version 1, little-endian, at the start of a zero-padded 4 KiB slot:
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! |      0 |    8 | magic `b"RPLMETA\0"`                    |
//! |      8 |    4 | format_version (= 1)                    |
//! |     12 |    4 | header_len (= 160, includes the crc)    |
//! |     16 |    8 | seq                                     |
//! |     24 |   16 | volume_uuid                             |
//! |     40 |    8 | device_size_bytes                       |
//! |     48 |    8 | data_size_bytes                         |
//! |     56 |    4 | bitmap_granularity_bytes                |
//! |     60 |    8 | bitmap_offset_bytes                     |
//! |     68 |    8 | bitmap_len_bytes                        |
//! |     76 |    8 | al_offset_bytes                         |
//! |     84 |    8 | al_len_bytes                            |
//! |     92 |    4 | al_slots                                |
//! |     96 |    4 | al_extent_bytes                         |
//! |    100 |    4 | al_extents_max                          |
//! |    104 |    8 | generation current                      |
//! |    112 |    8 | generation bitmap                       |
//! |    120 |   16 | generation history [2]                  |
//! |    136 |    8 | flags                                   |
//! |    144 |    8 | primary_epoch                           |
//! |    152 |    4 | node_id                                 |
//! |    156 |    4 | crc32 of bytes [0, 156)                 |
//!
//! The first 24 bytes (magic, version, header_len, seq) are frozen for all
//! future versions, and the crc always sits in the last 4 bytes of
//! `header_len`. That lets this build verify a newer version's checksum and
//! its seq, and so refuse it by name instead of calling it corrupt or
//! silently falling back to an older slot.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::superblock::{Generations, MetaFlags, Superblock};

pub(crate) const MAGIC: [u8; 8] = *b"RPLMETA\0";
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Alignment of every offset and length in the metadata area.
pub(crate) const BLOCK_BYTES: u64 = 4096;
/// One superblock slot.
pub(crate) const SLOT_BYTES: u64 = 4096;

/// Version-independent start of every superblock.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
struct RawPrefix {
    magic: [u8; 8],
    format_version: U32,
    header_len: U32,
    seq: U64,
}

/// Format version 1, exactly as stored. Every field is an unaligned
/// little-endian type, so `repr(C)` adds no padding.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
struct RawSuperblockV1 {
    magic: [u8; 8],
    format_version: U32,
    header_len: U32,
    seq: U64,
    volume_uuid: [u8; 16],
    device_size_bytes: U64,
    data_size_bytes: U64,
    bitmap_granularity_bytes: U32,
    bitmap_offset_bytes: U64,
    bitmap_len_bytes: U64,
    al_offset_bytes: U64,
    al_len_bytes: U64,
    al_slots: U32,
    al_extent_bytes: U32,
    al_extents_max: U32,
    gen_current: U64,
    gen_bitmap: U64,
    gen_history: [U64; 2],
    flags: U64,
    primary_epoch: U64,
    node_id: U32,
    crc: U32,
}

const V1_LEN: usize = size_of::<RawSuperblockV1>();
const PREFIX_LEN: usize = size_of::<RawPrefix>();
// The table in the module doc and the crc placement depend on these.
const _: () = assert!(V1_LEN == 160);
const _: () = assert!(PREFIX_LEN == 24);
const _: () = assert!(std::mem::offset_of!(RawSuperblockV1, crc) == V1_LEN - 4);
const _: () = assert!(V1_LEN as u64 <= SLOT_BYTES);

/// The two superblock slots, in on-disk order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    A,
    B,
}

impl Slot {
    pub(crate) fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// Position of the slot among the two, counted from slot A.
    pub(crate) fn index(self) -> u64 {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Slot::A => "slot A",
            Slot::B => "slot B",
        }
    }
}

/// What one slot holds.
#[derive(Debug)]
pub(crate) enum SlotState {
    /// No magic: never written, or not replicator metadata at all.
    Empty,
    /// Magic present but unusable (torn write, bit rot, short read).
    Bad(String),
    /// Checksum verified; `seq` is trustworthy even if the content is not
    /// something this build can use.
    Valid { seq: u64, content: Decoded },
}

#[derive(Debug)]
pub(crate) enum Decoded {
    Ok(Superblock),
    /// Written by a newer format version.
    NewerVersion(u32),
    /// Format 1 but with something this build does not understand.
    Unsupported(String),
}

/// Encodes `sb` into a full, zero-padded slot.
pub(crate) fn encode(sb: &Superblock) -> Vec<u8> {
    assert_eq!(sb.format_version, FORMAT_VERSION, "only format 1 is written");
    let mut raw = RawSuperblockV1 {
        magic: MAGIC,
        format_version: U32::new(sb.format_version),
        header_len: U32::new(V1_LEN as u32),
        seq: U64::new(sb.seq),
        volume_uuid: *sb.volume_uuid.as_bytes(),
        device_size_bytes: U64::new(sb.device_size_bytes),
        data_size_bytes: U64::new(sb.data_size_bytes),
        bitmap_granularity_bytes: U32::new(sb.bitmap_granularity_bytes),
        bitmap_offset_bytes: U64::new(sb.bitmap_offset_bytes),
        bitmap_len_bytes: U64::new(sb.bitmap_len_bytes),
        al_offset_bytes: U64::new(sb.al_offset_bytes),
        al_len_bytes: U64::new(sb.al_len_bytes),
        al_slots: U32::new(sb.al_slots),
        al_extent_bytes: U32::new(sb.al_extent_bytes),
        al_extents_max: U32::new(sb.al_extents_max),
        gen_current: U64::new(sb.generations.current),
        gen_bitmap: U64::new(sb.generations.bitmap),
        gen_history: sb.generations.history.map(U64::new),
        flags: U64::new(sb.flags.to_bits()),
        primary_epoch: U64::new(sb.primary_epoch),
        node_id: U32::new(sb.node_id),
        crc: U32::new(0),
    };
    raw.crc = U32::new(crc32fast::hash(&raw.as_bytes()[..V1_LEN - 4]));
    let mut slot = vec![0u8; SLOT_BYTES as usize];
    slot[..V1_LEN].copy_from_slice(raw.as_bytes());
    slot
}

/// Classifies one slot's bytes. Never panics on arbitrary input.
pub(crate) fn decode(slot: &[u8]) -> SlotState {
    let Ok((prefix, _)) = RawPrefix::read_from_prefix(slot) else {
        return SlotState::Bad(format!("short read ({} bytes)", slot.len()));
    };
    if prefix.magic != MAGIC {
        return SlotState::Empty;
    }
    let header_len = prefix.header_len.get() as usize;
    if header_len < PREFIX_LEN + 4 || header_len > slot.len() {
        return SlotState::Bad(format!("bad header length {header_len}"));
    }
    let (covered, rest) = slot[..header_len].split_at(header_len - 4);
    let stored = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return SlotState::Bad(format!("crc mismatch (stored {stored:#010x}, computed {computed:#010x})"));
    }
    let seq = prefix.seq.get();
    let version = prefix.format_version.get();
    let content = if version != FORMAT_VERSION {
        Decoded::NewerVersion(version)
    } else if header_len != V1_LEN {
        Decoded::Unsupported(format!("format 1 superblock with header length {header_len}, expected {V1_LEN}"))
    } else {
        match RawSuperblockV1::read_from_prefix(slot) {
            Ok((raw, _)) => decode_v1(&raw),
            // Unreachable after the header_len check, but it is disk data:
            // report rather than panic.
            Err(_) => return SlotState::Bad(format!("short read ({} bytes)", slot.len())),
        }
    };
    SlotState::Valid { seq, content }
}

fn decode_v1(raw: &RawSuperblockV1) -> Decoded {
    let flags = match MetaFlags::from_bits(raw.flags.get()) {
        Ok(flags) => flags,
        Err(unknown) => {
            return Decoded::Unsupported(format!("unknown flag bits {unknown:#x} (written by a newer replicator?)"))
        }
    };
    Decoded::Ok(Superblock {
        format_version: raw.format_version.get(),
        seq: raw.seq.get(),
        volume_uuid: uuid::Uuid::from_bytes(raw.volume_uuid),
        device_size_bytes: raw.device_size_bytes.get(),
        data_size_bytes: raw.data_size_bytes.get(),
        bitmap_granularity_bytes: raw.bitmap_granularity_bytes.get(),
        bitmap_offset_bytes: raw.bitmap_offset_bytes.get(),
        bitmap_len_bytes: raw.bitmap_len_bytes.get(),
        al_offset_bytes: raw.al_offset_bytes.get(),
        al_len_bytes: raw.al_len_bytes.get(),
        al_slots: raw.al_slots.get(),
        al_extent_bytes: raw.al_extent_bytes.get(),
        al_extents_max: raw.al_extents_max.get(),
        generations: Generations {
            current: raw.gen_current.get(),
            bitmap: raw.gen_bitmap.get(),
            history: raw.gen_history.map(|g| g.get()),
        },
        flags,
        primary_epoch: raw.primary_epoch.get(),
        node_id: raw.node_id.get(),
    })
}

/// Test helper: re-seals a slot after a test edited header bytes, so the
/// edit is seen as deliberate content rather than corruption.
#[cfg(test)]
pub(crate) fn reseal(slot: &mut [u8]) {
    let header_len = u32::from_le_bytes([slot[12], slot[13], slot[14], slot[15]]) as usize;
    let crc = crc32fast::hash(&slot[..header_len - 4]);
    slot[header_len - 4..header_len].copy_from_slice(&crc.to_le_bytes());
}
