//! Persistence of the dirty bitmap and the activity log in the metadata
//! area (the superblock lives in `layout.rs`).
//!
//! Bitmap: little-endian u64 words, one bit per granule, from the start of
//! the bitmap area. [`BitmapStore`] remembers what it last wrote and writes
//! only the 4 KiB pages that changed, then syncs.
//!
//! Activity log: two copies (A in the first half of the area, B in the
//! second), each `b"RPLAL\0\0\0"`, seq (u64), count (u32), crc32 (u32) of
//! the copy with this field zero, then `count` extent numbers (u32), all
//! little-endian. An update writes the older copy with `seq + 1` and syncs;
//! reading trusts the valid copy with the higher seq. A torn update thus
//! leaves the previous set, which covers every extent written before the
//! update began (writes to a new extent start only after it is durable).

use super::error::{io_err, MetadataError};
use super::Metadata;

const PAGE_BYTES: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;
const AL_MAGIC: [u8; 8] = *b"RPLAL\0\0\0";
const AL_HEADER_BYTES: usize = 24;

impl Metadata {
    /// Words of a bitmap covering the data area.
    pub fn bitmap_words_len(&self) -> usize {
        let sb = self.superblock();
        let bits = sb.data_size_bytes.div_ceil(u64::from(sb.bitmap_granularity_bytes));
        bits.div_ceil(64) as usize
    }

    /// Bytes one activity-log copy occupies (whole 4 KiB blocks).
    fn al_copy_bytes(&self) -> u64 {
        let max = self.superblock().al_extents_max as usize;
        ((AL_HEADER_BYTES + 4 * max).div_ceil(PAGE_BYTES) * PAGE_BYTES) as u64
    }

    /// Checks that two activity-log copies fit the area.
    pub fn check_activity_log_fits(&self) -> Result<(), MetadataError> {
        if 2 * self.al_copy_bytes() > self.al_range().end - self.al_range().start {
            return Err(MetadataError::InvalidParameter(format!(
                "the activity log area ({} slots) cannot hold {} extents twice; recreate the metadata with more \
                 --al-slots or fewer --al-extents",
                self.superblock().al_slots,
                self.superblock().al_extents_max
            )));
        }
        Ok(())
    }
}

/// Reads and writes the persisted dirty bitmap.
#[derive(Debug)]
pub struct BitmapStore {
    persisted: Vec<u64>,
}

impl BitmapStore {
    /// Reads the bitmap; returns the store and the words.
    pub fn load(md: &Metadata) -> Result<(BitmapStore, Vec<u64>), MetadataError> {
        let words = md.bitmap_words_len();
        let mut bytes = vec![0u8; words * 8];
        read_exact(md, &mut bytes, md.bitmap_range().start)?;
        let words: Vec<u64> =
            bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk"))).collect();
        Ok((BitmapStore { persisted: words.clone() }, words))
    }

    /// Writes the pages that differ from what was last written, then syncs.
    pub fn store(&mut self, md: &Metadata, words: &[u64]) -> Result<(), MetadataError> {
        assert_eq!(words.len(), self.persisted.len(), "bitmap size changed");
        let mut wrote = false;
        for (page, chunk) in words.chunks(WORDS_PER_PAGE).enumerate() {
            let start = page * WORDS_PER_PAGE;
            if self.persisted[start..start + chunk.len()] == *chunk {
                continue;
            }
            let bytes: Vec<u8> = chunk.iter().flat_map(|w| w.to_le_bytes()).collect();
            let offset = md.bitmap_range().start + (start * 8) as u64;
            md.file().write_all_at_checked(&bytes, offset, md)?;
            self.persisted[start..start + chunk.len()].copy_from_slice(chunk);
            wrote = true;
        }
        if wrote {
            md.file().sync_data().map_err(io_err("sync the bitmap in", md.metadata_path()))?;
        }
        Ok(())
    }
}

/// Reads and writes the persisted activity log.
#[derive(Debug)]
pub struct ActivityLogStore {
    seq: u64,
    /// The copy holding `seq` (0 = A, 1 = B).
    current: usize,
}

impl ActivityLogStore {
    pub fn load(md: &Metadata) -> Result<(ActivityLogStore, Vec<u32>), MetadataError> {
        md.check_activity_log_fits()?;
        let mut best: Option<(u64, usize, Vec<u32>)> = None;
        for copy in 0..2 {
            if let Some((seq, extents)) = read_copy(md, copy)? {
                if best.as_ref().is_none_or(|(s, _, _)| seq > *s) {
                    best = Some((seq, copy, extents));
                }
            }
        }
        Ok(match best {
            Some((seq, current, extents)) => (ActivityLogStore { seq, current }, extents),
            None => (ActivityLogStore { seq: 0, current: 1 }, Vec::new()),
        })
    }

    pub fn store(&mut self, md: &Metadata, extents: &[u32]) -> Result<(), MetadataError> {
        let max = md.superblock().al_extents_max as usize;
        assert!(extents.len() <= max, "activity log holds {} > {max} extents", extents.len());
        let copy = 1 - self.current;
        let seq = self.seq + 1;
        let mut bytes = vec![0u8; md.al_copy_bytes() as usize];
        bytes[..8].copy_from_slice(&AL_MAGIC);
        bytes[8..16].copy_from_slice(&seq.to_le_bytes());
        bytes[16..20].copy_from_slice(&(extents.len() as u32).to_le_bytes());
        for (i, e) in extents.iter().enumerate() {
            let at = AL_HEADER_BYTES + 4 * i;
            bytes[at..at + 4].copy_from_slice(&e.to_le_bytes());
        }
        let crc = crc32fast::hash(&bytes[..AL_HEADER_BYTES + 4 * extents.len()]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
        let offset = md.al_range().start + copy as u64 * md.al_copy_bytes();
        md.file().write_all_at_checked(&bytes, offset, md)?;
        md.file().sync_data().map_err(io_err("sync the activity log in", md.metadata_path()))?;
        self.seq = seq;
        self.current = copy;
        Ok(())
    }
}

fn read_copy(md: &Metadata, copy: usize) -> Result<Option<(u64, Vec<u32>)>, MetadataError> {
    let mut bytes = vec![0u8; md.al_copy_bytes() as usize];
    read_exact(md, &mut bytes, md.al_range().start + copy as u64 * md.al_copy_bytes())?;
    if bytes[..8] != AL_MAGIC {
        return Ok(None);
    }
    let seq = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")) as usize;
    let stored = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    if count > md.superblock().al_extents_max as usize {
        return Ok(None);
    }
    let end = AL_HEADER_BYTES + 4 * count;
    bytes[20..24].fill(0);
    if crc32fast::hash(&bytes[..end]) != stored {
        return Ok(None);
    }
    let extents = bytes[AL_HEADER_BYTES..end]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok(Some((seq, extents)))
}

fn read_exact(md: &Metadata, buf: &mut [u8], offset: u64) -> Result<(), MetadataError> {
    use std::os::unix::fs::FileExt;
    md.file().read_exact_at(buf, offset).map_err(io_err("read", md.metadata_path()))
}

trait WriteChecked {
    fn write_all_at_checked(&self, buf: &[u8], offset: u64, md: &Metadata) -> Result<(), MetadataError>;
}

impl WriteChecked for std::fs::File {
    fn write_all_at_checked(&self, buf: &[u8], offset: u64, md: &Metadata) -> Result<(), MetadataError> {
        use std::os::unix::fs::FileExt;
        if md.is_read_only() {
            return Err(MetadataError::ReadOnly { disk: md.disk().to_owned(), location: md.location().clone() });
        }
        self.write_all_at(buf, offset).map_err(io_err("write", md.metadata_path()))
    }
}
