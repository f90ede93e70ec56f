//! BlockStatus: the allocation map of a range, from lseek SEEK_DATA and
//! SEEK_HOLE on the buffered descriptor.
//!
//! lseek never waits for data I/O, so the I/O thread answers these inline.
//! The descriptor's file position moves, which nothing else depends on:
//! every ring operation carries an explicit offset, and lseek returns its
//! result atomically even when several threads seek at once.

use std::os::unix::io::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::shared::Shared;
use super::{Extent, IoFailure};

/// Cap on extents per answer (a badly fragmented file could yield one per
/// block); the answer then covers a prefix of the range, which is allowed.
const MAX_EXTENTS: usize = 1024;

pub(super) fn block_status(shared: &Shared, offset: u64, len: u32) -> Result<Vec<Extent>, IoFailure> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let all_data = || vec![Extent { length: len, hole: false }];
    if !shared.block_status {
        return Ok(all_data());
    }
    let fd = shared.files.buffered.as_raw_fd();
    let end = offset + u64::from(len);
    let mut extents = Vec::new();
    let mut pos = offset;
    while pos < end && extents.len() < MAX_EXTENTS {
        let data_start = match seek(fd, pos, Whence::SeekData) {
            Ok(data) => data.min(end),
            // No data at or after `pos`: the rest (even beyond EOF, which
            // reads as zeros) is a hole.
            Err(Errno::ENXIO) => end,
            Err(Errno::EINVAL) if pos == offset => return Ok(all_data()),
            Err(e) => return Err(IoFailure::Errno(e as i32)),
        };
        if data_start > pos {
            push(&mut extents, data_start - pos, true);
            pos = data_start;
            continue;
        }
        let hole_start = match seek(fd, pos, Whence::SeekHole) {
            Ok(hole) => hole.min(end),
            // The file shrank under us: what follows reads as zeros.
            Err(Errno::ENXIO) => {
                push(&mut extents, end - pos, true);
                break;
            }
            Err(e) => return Err(IoFailure::Errno(e as i32)),
        };
        if hole_start <= pos {
            // Contradicts the SEEK_DATA answer (a racing writer); saying
            // "data" is always safe.
            push(&mut extents, end - pos, false);
            break;
        }
        push(&mut extents, hole_start - pos, false);
        pos = hole_start;
    }
    assert!(!extents.is_empty(), "block status of a non-empty range must cover a byte");
    Ok(extents)
}

fn seek(fd: std::os::unix::io::RawFd, pos: u64, whence: Whence) -> Result<u64, Errno> {
    let pos = libc::off_t::try_from(pos).map_err(|_| Errno::EOVERFLOW)?;
    let found = lseek(fd, pos, whence)?;
    u64::try_from(found).map_err(|_| Errno::EOVERFLOW)
}

/// Appends a run, merging it with the previous one of the same type.
fn push(extents: &mut Vec<Extent>, length: u64, hole: bool) {
    // Runs lie inside a u32-long range.
    let length = u32::try_from(length).unwrap_or(u32::MAX);
    match extents.last_mut() {
        Some(last) if last.hole == hole => last.length += length,
        _ => extents.push(Extent { length, hole }),
    }
}
