//! The state file's format, pure: encoding items and frames, and replaying
//! a file's bytes into the state they describe.
//!
//! ```text
//! file  = MAGIC (8 bytes: "CLRAFT\0\x02") frame*
//! frame = len: u32 LE | crc: u32 LE (crc32 of items) | items (len bytes)
//! item  = kind: u8 | len: u32 LE | protobuf bytes of the raft message for that kind
//!   kind 1 = Entry      : replaces every entry from its index on, then appends it
//!   kind 2 = HardState  : replaces the hard state
//!   kind 3 = Snapshot   : replaces the snapshot (data + metadata) and drops all entries
//!   kind 4 = Membership : a SnapshotMetadata whose conf_state replaces the voters and whose
//!                         index says which log entries it already includes (two-node mode)
//! ```
//!
//! The voters live in the snapshot's metadata and, after a membership
//! change (`RaftLog::force_single_voter`, or an applied conf-change entry),
//! in a Membership item: whichever comes last in the file wins.
//!
//! Every append is one frame written with one `write` and followed by an
//! fsync before the next, so a crash can damage only the **last frame**: a
//! bad frame (impossible length, running past the end, checksum mismatch)
//! with no valid frame anywhere after it is a torn tail and is discarded (it
//! was never fsynced, so nothing that depends on it left this node). A bad
//! frame followed by a valid one is **corruption**, reported with its
//! offset; nothing guesses past it. Whole-file rewrites go through a temp
//! file and a rename, so they are never torn.

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot, SnapshotMetadata};

use super::limits::RECORD_BYTES_MAX;

pub(crate) const MAGIC: &[u8; 8] = b"CLRAFT\0\x02";
const FRAME_HEADER_BYTES: usize = 8;
const ITEM_HEADER_BYTES: usize = 5;
/// Rewrites split the state into frames of about this size.
const IMAGE_FRAME_BYTES: usize = 16 << 20;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const KIND_MEMBERSHIP: u8 = 4;

/// The state a file describes.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Replayed {
    pub hard_state: HardState,
    /// Index 0 = no snapshot yet.
    pub snapshot: Snapshot,
    /// Contiguous, starting right after the snapshot's index.
    pub entries: Vec<Entry>,
    /// The newest membership (voters, and the log index whose conf changes
    /// it already includes), from a Membership item or the snapshot.
    pub membership: Option<SnapshotMetadata>,
    /// Bytes of the file holding valid frames (the file is cut there).
    pub valid_bytes: u64,
    /// Bytes of a torn tail that were discarded.
    pub torn_bytes: u64,
}

/// Why replay stopped at a frame that is not a torn tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Corrupt {
    pub offset: u64,
    pub why: String,
}

pub(crate) fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    encode(KIND_ENTRY, e, out);
}

pub(crate) fn encode_hard_state(hs: &HardState, out: &mut Vec<u8>) {
    encode(KIND_HARD_STATE, hs, out);
}

pub(crate) fn encode_snapshot(s: &Snapshot, out: &mut Vec<u8>) {
    encode(KIND_SNAPSHOT, s, out);
}

pub(crate) fn encode_membership(m: &SnapshotMetadata, out: &mut Vec<u8>) {
    encode(KIND_MEMBERSHIP, m, out);
}

fn encode(kind: u8, m: &impl protobuf::Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(kind);
    out.extend_from_slice(&[0; 4]);
    // Writing a proto3 message into a Vec cannot fail (no required fields,
    // no I/O); a failure would be a bug in the codec.
    m.write_to_vec(out).expect("encoding a raft protobuf message into memory");
    let len = u32::try_from(out.len() - start - ITEM_HEADER_BYTES).expect("item under 4 GiB");
    out[start + 1..start + ITEM_HEADER_BYTES].copy_from_slice(&len.to_le_bytes());
}

/// One frame around `items` (what one append writes).
pub(crate) fn frame(items: &[u8]) -> Vec<u8> {
    assert!(!items.is_empty() && items.len() <= RECORD_BYTES_MAX, "frame of {} bytes", items.len());
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + items.len());
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(items).to_le_bytes());
    out.extend_from_slice(items);
    out
}

/// A whole file describing exactly this state (what a rewrite writes).
pub(crate) fn image(
    snapshot: &Snapshot,
    membership: &SnapshotMetadata,
    entries: &[Entry],
    hard_state: &HardState,
) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    let mut items = Vec::new();
    if snapshot.get_metadata().index > 0 {
        encode_snapshot(snapshot, &mut items);
    }
    encode_membership(membership, &mut items);
    out.extend_from_slice(&frame(&items));
    items.clear();
    for e in entries {
        encode_entry(e, &mut items);
        if items.len() >= IMAGE_FRAME_BYTES {
            out.extend_from_slice(&frame(&items));
            items.clear();
        }
    }
    encode_hard_state(hard_state, &mut items);
    out.extend_from_slice(&frame(&items));
    out
}

/// The items of a valid frame at the start of `rest`, if there is one.
fn valid_frame(rest: &[u8]) -> Option<&[u8]> {
    let header = rest.get(..FRAME_HEADER_BYTES)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > RECORD_BYTES_MAX {
        return None;
    }
    let items = rest.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len)?;
    (crc32fast::hash(items) == crc).then_some(items)
}

/// Replays a whole file. `Ok` also when a torn tail was found (see
/// `Replayed::torn_bytes`); `Err` only for corruption.
pub(crate) fn replay(bytes: &[u8]) -> Result<Replayed, Corrupt> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(Corrupt { offset: 0, why: "not a clusterd Raft state file (bad magic or version)".into() });
    }
    let mut st = Replayed::default();
    let mut at = MAGIC.len();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let Some(items) = valid_frame(rest) else {
            // Only the last write can be torn: a valid frame later on means
            // this one was damaged after it was written.
            if let Some(later) = (1..rest.len()).find(|q| valid_frame(&rest[*q..]).is_some()) {
                return Err(Corrupt {
                    offset: at as u64,
                    why: format!("a damaged frame with a valid frame {later} bytes after it"),
                });
            }
            st.torn_bytes = rest.len() as u64;
            break;
        };
        apply_items(&mut st, items).map_err(|why| Corrupt { offset: at as u64, why })?;
        at += FRAME_HEADER_BYTES + items.len();
    }
    st.valid_bytes = (bytes.len() as u64) - st.torn_bytes;
    // The hard state may trail a snapshot written in the same frame.
    let (snap_index, snap_term) = (st.snapshot.get_metadata().index, st.snapshot.get_metadata().term);
    st.hard_state.commit = st.hard_state.commit.max(snap_index);
    st.hard_state.term = st.hard_state.term.max(snap_term);
    let last = snap_index + st.entries.len() as u64;
    if st.hard_state.commit > last {
        return Err(Corrupt {
            offset: st.valid_bytes,
            why: format!("the commit index {} is beyond the last entry {last}", st.hard_state.commit),
        });
    }
    Ok(st)
}

fn apply_items(st: &mut Replayed, mut items: &[u8]) -> Result<(), String> {
    while !items.is_empty() {
        if items.len() < ITEM_HEADER_BYTES {
            return Err("truncated item header inside a frame".into());
        }
        let kind = items[0];
        let len = u32::from_le_bytes([items[1], items[2], items[3], items[4]]) as usize;
        let body = items.get(ITEM_HEADER_BYTES..ITEM_HEADER_BYTES + len).ok_or("item runs past its frame")?;
        apply(st, kind, body)?;
        items = &items[ITEM_HEADER_BYTES + len..];
    }
    Ok(())
}

fn apply(st: &mut Replayed, kind: u8, body: &[u8]) -> Result<(), String> {
    match kind {
        KIND_ENTRY => {
            let e = Entry::parse_from_bytes(body).map_err(|e| format!("undecodable entry: {e}"))?;
            let first = st.snapshot.get_metadata().index + 1;
            let next = first + st.entries.len() as u64;
            if e.index < first || e.index > next {
                return Err(format!("entry {} does not follow the log (entries {first}..{next})", e.index));
            }
            st.entries.truncate((e.index - first) as usize);
            st.entries.push(e);
        }
        KIND_HARD_STATE => {
            st.hard_state = HardState::parse_from_bytes(body).map_err(|e| format!("undecodable hard state: {e}"))?;
        }
        KIND_SNAPSHOT => {
            st.snapshot = Snapshot::parse_from_bytes(body).map_err(|e| format!("undecodable snapshot: {e}"))?;
            st.entries.clear();
            if st.snapshot.get_metadata().conf_state.is_some() {
                st.membership = Some(st.snapshot.get_metadata().clone());
            }
        }
        KIND_MEMBERSHIP => {
            let m = SnapshotMetadata::parse_from_bytes(body).map_err(|e| format!("undecodable membership: {e}"))?;
            st.membership = Some(m);
        }
        other => return Err(format!("unknown record kind {other}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, data: data.to_vec().into(), ..Default::default() }
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..Default::default() }
    }

    /// One frame (one append) with these entries and hard state.
    fn batch(entries: &[Entry], h: &HardState) -> Vec<u8> {
        let mut items = Vec::new();
        for e in entries {
            encode_entry(e, &mut items);
        }
        encode_hard_state(h, &mut items);
        frame(&items)
    }

    fn file(batches: &[Vec<u8>]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for b in batches {
            out.extend_from_slice(b);
        }
        out
    }

    #[test]
    fn replay_returns_what_was_written_and_overwrites_conflicting_suffixes() {
        let f = file(&[
            batch(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")], &hs(1, 1, 2)),
            // A new leader replaced entry 3 onwards.
            batch(&[entry(3, 2, b"C")], &hs(2, 2, 3)),
        ]);
        let st = replay(&f).expect("valid file");
        assert_eq!(st.entries, vec![entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 2, b"C")]);
        assert_eq!(st.hard_state, hs(2, 2, 3));
        assert_eq!(st.torn_bytes, 0);
        assert_eq!(st.valid_bytes, f.len() as u64);
    }

    #[test]
    fn snapshot_item_drops_entries_and_raises_commit() {
        let mut s = Snapshot { data: b"state".to_vec().into(), ..Default::default() };
        s.mut_metadata().index = 7;
        s.mut_metadata().term = 3;
        let mut items = Vec::new();
        encode_snapshot(&s, &mut items);
        encode_entry(&entry(8, 3, b"h"), &mut items);
        let f = file(&[batch(&[entry(1, 1, b"a")], &hs(1, 1, 1)), frame(&items)]);
        let st = replay(&f).expect("valid file");
        assert_eq!(st.snapshot, s);
        assert_eq!(st.entries, vec![entry(8, 3, b"h")]);
        assert_eq!((st.hard_state.commit, st.hard_state.term), (7, 3));
        let mut m = SnapshotMetadata { index: 8, ..Default::default() };
        m.mut_conf_state().voters = vec![1];
        let again = replay(&image(&st.snapshot, &m, &st.entries, &st.hard_state)).expect("image replays");
        assert_eq!(again.membership.as_ref(), Some(&m), "the membership survives a rewrite");
        assert_eq!((again.snapshot, again.entries, again.hard_state), (st.snapshot, st.entries, st.hard_state));
    }

    #[test]
    fn every_truncation_or_garbling_of_the_last_frame_is_a_torn_tail() {
        let good = file(&[batch(&[entry(1, 1, b"a"), entry(2, 1, b"b")], &hs(1, 1, 2))]);
        let mut f = good.clone();
        f.extend_from_slice(&batch(&[entry(3, 1, b"ccccccc"), entry(4, 1, b"dd")], &hs(1, 1, 4)));
        for cut in good.len() + 1..f.len() {
            let st = replay(&f[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e:?}"));
            assert_eq!(st.valid_bytes, good.len() as u64, "cut at {cut}");
            assert_eq!(st.torn_bytes, (cut - good.len()) as u64);
            assert_eq!(st.entries.len(), 2);
        }
        for at in good.len()..f.len() {
            let mut g = f.clone();
            g[at] ^= 0x55;
            let st = replay(&g).unwrap_or_else(|e| panic!("byte {at} garbled: {e:?}"));
            assert_eq!(st.valid_bytes, good.len() as u64, "byte {at} garbled");
        }
        // Zeros where the filesystem extended the file but the data never landed.
        let mut z = good.clone();
        z.extend_from_slice(&[0; 100]);
        assert_eq!(replay(&z).map(|s| s.torn_bytes), Ok(100));
    }

    #[test]
    fn a_damaged_frame_followed_by_a_valid_one_is_corruption_with_its_offset() {
        let first = batch(&[entry(1, 1, b"a")], &hs(1, 1, 1));
        let second = batch(&[entry(2, 1, b"bbbb")], &hs(1, 1, 2));
        let third = batch(&[entry(3, 1, b"c")], &hs(1, 1, 3));
        let f = file(&[first.clone(), second.clone(), third]);
        let at = MAGIC.len() + first.len();
        // Any byte of the middle frame: its header (length, checksum) or items.
        for i in 0..second.len() {
            let mut bad = f.clone();
            bad[at + i] ^= 0x04;
            let err = replay(&bad).expect_err("corruption must be reported");
            assert_eq!(err.offset, at as u64, "byte {i}: {err:?}");
        }
        assert!(replay(b"NOTRAFT!").is_err());
    }

    #[test]
    fn a_gap_in_the_log_or_a_commit_past_it_is_corruption() {
        let f = file(&[batch(&[entry(1, 1, b"a"), entry(3, 1, b"c")], &hs(1, 1, 1))]);
        assert!(replay(&f).unwrap_err().why.contains("does not follow"));
        let f = file(&[batch(&[entry(1, 1, b"a")], &hs(1, 1, 5))]);
        assert!(replay(&f).unwrap_err().why.contains("beyond the last entry"));
    }
}
