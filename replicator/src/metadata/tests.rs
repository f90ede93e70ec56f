//! Tests of the metadata module: round trips, layout arithmetic, crash
//! safety (torn superblock writes), refusals and their messages, and a
//! seeded property test of random updates interleaved with crashes.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::layout::{self, Decoded, Slot, SlotState, SLOT_BYTES};
use super::*;
use crate::test_rng::Rng;

const MIB: u64 = 1 << 20;
const HEADER_BYTES: usize = 160;

/// A unique scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("replicator-md-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A sparse (all-zero) disk image of `size` bytes.
    fn disk(&self, name: &str, size: u64) -> PathBuf {
        let path = self.path(name);
        File::create(&path).unwrap().set_len(size).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

fn slot_offset(md: &Metadata, slot: Slot) -> u64 {
    md.target.slot_offset(slot).unwrap()
}

/// The seq in a slot, if it holds a valid format-1 superblock.
fn slot_seq(md: &Metadata, slot: Slot) -> Option<u64> {
    let bytes = read_at(md.metadata_path(), slot_offset(md, slot), SLOT_BYTES);
    match layout::decode(&bytes) {
        SlotState::Valid { content: Decoded::Ok(sb), .. } => Some(sb.seq),
        _ => None,
    }
}

fn internal(disk: &Path) -> CreateOptions {
    CreateOptions::new(disk.to_path_buf(), MetaLocation::Internal)
}

fn external(disk: &Path, meta: &Path) -> CreateOptions {
    CreateOptions::new(disk.to_path_buf(), MetaLocation::External(meta.to_path_buf()))
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

#[test]
fn internal_create_open_roundtrip() {
    let dir = TempDir::new("rt-int");
    let disk = dir.disk("disk.img", 64 * MIB);
    let created = create(&internal(&disk)).unwrap();
    let sb = created.superblock().clone();
    assert_eq!(sb.format_version, 1);
    assert_eq!(sb.seq, 1);
    assert_eq!(sb.device_size_bytes, 64 * MIB);
    assert_eq!(sb.flags, MetaFlags::default());
    assert_ne!(sb.generations.current, 0);
    assert_eq!(sb.generations.bitmap, 0);
    assert_eq!(sb.generations.history, [0, 0]);
    assert_eq!((sb.primary_epoch, sb.node_id), (0, 0));
    assert_eq!(created.current_slot(), Slot::A);
    drop(created);

    let opened = open(&disk, &MetaLocation::Internal, false).unwrap();
    assert_eq!(opened.superblock(), &sb);
    assert_eq!(opened.location(), &MetaLocation::Internal);
    assert_eq!(opened.metadata_path(), disk.as_path());
    // Bitmap right after the data area, then the AL, both zeroed.
    let bitmap = opened.bitmap_range();
    assert_eq!(bitmap.start, sb.data_size_bytes);
    assert_eq!(opened.al_range().start, bitmap.end);
    assert!(all_zero(&read_at(&disk, bitmap.start, bitmap.end - bitmap.start)));
    let al = opened.al_range();
    assert!(all_zero(&read_at(&disk, al.start, al.end - al.start)));
    // Slot A is the second-to-last block of the disk; slot B is unused yet.
    let slot_a = read_at(&disk, 64 * MIB - 8192, SLOT_BYTES);
    assert_eq!(&slot_a[..8], b"RPLMETA\0");
    assert!(all_zero(&read_at(&disk, 64 * MIB - 4096, SLOT_BYTES)));

    let read_only = open(&disk, &MetaLocation::Internal, true).unwrap();
    assert_eq!(read_only.superblock(), &sb);
}

#[test]
fn external_create_open_roundtrip() {
    let dir = TempDir::new("rt-ext");
    let disk = dir.disk("disk.img", 16 * MIB);
    let meta = dir.path("disk.md");
    let location = MetaLocation::External(meta.clone());
    let created = create(&external(&disk, &meta)).unwrap();
    let sb = created.superblock().clone();
    assert!(sb.flags.external);
    assert_eq!(sb.data_size_bytes, 16 * MIB, "the whole disk is data");
    assert_eq!(created.bitmap_range().start, 0, "external area starts at 0");
    assert_eq!(file_len(&meta), sb.al_offset_bytes + sb.al_len_bytes + 8192);
    drop(created);

    // The disk itself is not touched.
    assert_eq!(file_len(&disk), 16 * MIB);
    assert!(all_zero(&read_at(&disk, 15 * MIB, MIB)));

    let opened = open(&disk, &location, false).unwrap();
    assert_eq!(opened.superblock(), &sb);
    assert_eq!(opened.location(), &location);
    assert_eq!(opened.metadata_path(), meta.as_path());
}

#[test]
fn data_size_arithmetic() {
    let dir = TempDir::new("arith");

    // Internal, unaligned device: bitmap for ceil((64 MiB + 1000) / 4096) =
    // 16385 bits = 2049 bytes -> 4096; AL 64 * 4096; two slots.
    let disk = dir.disk("a.img", 64 * MIB + 1000);
    let sb = create(&internal(&disk)).unwrap().superblock().clone();
    assert_eq!(sb.bitmap_offset_bytes, 0);
    assert_eq!(sb.bitmap_len_bytes, 4096);
    assert_eq!(sb.al_offset_bytes, 4096);
    assert_eq!(sb.al_len_bytes, 262_144);
    assert_eq!(sb.data_size_bytes, 64 * MIB - 274_432);
    assert_eq!(sb.data_size_bytes, 66_834_432);
    // Slots end at the last 4 KiB boundary, ignoring the 1000-byte tail.
    assert_eq!(&read_at(&disk, 64 * MIB - 8192, 8)[..], b"RPLMETA\0");

    // Internal, 1 GiB at 512-byte granularity: 2^21 bits = 256 KiB bitmap.
    let disk = dir.disk("b.img", 1 << 30);
    let mut opts = internal(&disk);
    opts.bitmap_granularity_bytes = 512;
    opts.al_slots = 8;
    let sb = create(&opts).unwrap().superblock().clone();
    assert_eq!(sb.bitmap_len_bytes, 256 * 1024);
    assert_eq!(sb.al_len_bytes, 8 * 4096);
    assert_eq!(sb.data_size_bytes, (1 << 30) - (256 * 1024 + 8 * 4096 + 8192));

    // External, unaligned disk: data rounds down to 4 KiB; the file is
    // exactly the area (4096 bitmap + 64 AL slots + 2 superblock slots).
    let disk = dir.disk("c.img", 10 * MIB + 123);
    let meta = dir.path("c.md");
    let sb = create(&external(&disk, &meta)).unwrap().superblock().clone();
    assert_eq!(sb.data_size_bytes, 10 * MIB);
    assert_eq!(sb.bitmap_len_bytes, 4096);
    assert_eq!(file_len(&meta), 4096 + 262_144 + 8192);
}

#[test]
fn update_alternates_slots_and_survives_reopen() {
    let dir = TempDir::new("update");
    let disk = dir.disk("disk.img", 8 * MIB);
    let mut md = create(&internal(&disk)).unwrap();
    assert_eq!((slot_seq(&md, Slot::A), slot_seq(&md, Slot::B)), (Some(1), None));

    md.update(|sb| {
        sb.flags.primary = true;
        sb.primary_epoch = 7;
    })
    .unwrap();
    assert_eq!(md.superblock().seq, 2);
    assert_eq!(md.current_slot(), Slot::B);
    assert_eq!((slot_seq(&md, Slot::A), slot_seq(&md, Slot::B)), (Some(1), Some(2)));

    md.update(|sb| sb.node_id = 3).unwrap();
    assert_eq!(md.current_slot(), Slot::A);
    assert_eq!((slot_seq(&md, Slot::A), slot_seq(&md, Slot::B)), (Some(3), Some(2)));
    let expected = md.superblock().clone();
    drop(md);

    let mut md = open(&disk, &MetaLocation::Internal, false).unwrap();
    assert_eq!(md.superblock(), &expected);
    assert!(md.superblock().flags.primary);
    assert_eq!((md.superblock().primary_epoch, md.superblock().node_id), (7, 3));
    // The next update goes to the slot not holding seq 3.
    md.update(|sb| sb.flags.consistent = true).unwrap();
    assert_eq!((slot_seq(&md, Slot::A), slot_seq(&md, Slot::B)), (Some(3), Some(4)));
}

#[test]
fn torn_write_of_newest_slot_falls_back_to_previous() {
    let dir = TempDir::new("torn");
    let disk = dir.disk("disk.img", 8 * MIB);
    let mut md = create(&internal(&disk)).unwrap();
    md.update(|sb| sb.primary_epoch = 1).unwrap(); // seq 2, slot B
    let previous = md.superblock().clone();
    md.update(|sb| sb.primary_epoch = 2).unwrap(); // seq 3, slot A
    let torn = slot_offset(&md, Slot::A);
    drop(md);

    // Garbage over part of the newest superblock, as a crash mid-write would.
    write_at(&disk, torn + 40, &[0x5a; 60]);
    let mut md = open(&disk, &MetaLocation::Internal, false).unwrap();
    assert_eq!(md.superblock(), &previous);
    assert_eq!(md.superblock().primary_epoch, 1);

    // The damaged slot is the one the next update overwrites.
    md.update(|sb| sb.primary_epoch = 5).unwrap();
    assert_eq!(md.current_slot(), Slot::A);
    drop(md);
    let md = open(&disk, &MetaLocation::Internal, false).unwrap();
    assert_eq!((md.superblock().seq, md.superblock().primary_epoch), (3, 5));
}

#[test]
fn both_slots_corrupt_is_an_error_naming_both() {
    let dir = TempDir::new("corrupt");
    let disk = dir.disk("disk.img", 8 * MIB);
    let mut md = create(&internal(&disk)).unwrap();
    md.update(|sb| sb.node_id = 1).unwrap();
    let (a, b) = (slot_offset(&md, Slot::A), slot_offset(&md, Slot::B));
    drop(md);
    write_at(&disk, a + 30, &[0xff; 8]);
    write_at(&disk, b + 100, &[0x01; 3]);

    let err = open(&disk, &MetaLocation::Internal, false).unwrap_err();
    assert!(matches!(err, MetadataError::Corrupt { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("slot A: crc mismatch"), "{msg}");
    assert!(msg.contains("slot B: crc mismatch"), "{msg}");
    assert!(msg.contains("corrupt"), "{msg}");
    assert!(msg.contains("peer"), "{msg}");
    assert!(msg.contains(&format!("create-md --disk {} ... --force", disk.display())), "{msg}");

    // A slot whose magic survived but whose header length did not.
    write_at(&disk, b + 12, &[0xff; 4]);
    let msg = open(&disk, &MetaLocation::Internal, false).unwrap_err().to_string();
    assert!(msg.contains("slot B: bad header length"), "{msg}");
}

#[test]
fn future_format_version_is_refused_by_name() {
    let dir = TempDir::new("future");
    let disk = dir.disk("disk.img", 8 * MIB);
    let mut md = create(&internal(&disk)).unwrap();
    md.update(|sb| sb.node_id = 9).unwrap(); // seq 2 in slot B
    let (a, b) = (slot_offset(&md, Slot::A), slot_offset(&md, Slot::B));
    drop(md);

    // A format-2 superblock with a valid checksum and a newer seq in slot A.
    let mut future = read_at(&disk, b, SLOT_BYTES);
    future[8..12].copy_from_slice(&2u32.to_le_bytes());
    future[16..24].copy_from_slice(&3u64.to_le_bytes());
    layout::reseal(&mut future);
    write_at(&disk, a, &future);
    let err = open(&disk, &MetaLocation::Internal, false).unwrap_err();
    assert!(matches!(err, MetadataError::NewerVersion { version: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("written by a newer replicator (format 2, this build reads 1)"), "{err}");
    // Nor may create silently replace it.
    let err = create(&internal(&disk)).unwrap_err();
    assert!(err.to_string().contains("format 2, seq 3"), "{err}");

    // An older seq in the newer format does not shadow a newer format-1 slot.
    future[16..24].copy_from_slice(&1u64.to_le_bytes());
    layout::reseal(&mut future);
    write_at(&disk, a, &future);
    let md = open(&disk, &MetaLocation::Internal, false).unwrap();
    assert_eq!((md.superblock().seq, md.superblock().node_id), (2, 9));
}

#[test]
fn create_refuses_existing_metadata_unless_forced() {
    let dir = TempDir::new("exists");
    let disk = dir.disk("disk.img", 8 * MIB);
    let first = create(&internal(&disk)).unwrap();
    let first_uuid = first.superblock().volume_uuid;
    let bitmap = first.bitmap_range();
    drop(first);

    let err = create(&internal(&disk)).unwrap_err();
    assert!(matches!(err, MetadataError::AlreadyExists { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("--force"), "{msg}");
    assert!(msg.contains("replication state"), "{msg}");
    assert!(msg.contains(&first_uuid.to_string()), "{msg}");
    let still = open(&disk, &MetaLocation::Internal, false).unwrap();
    assert_eq!(still.superblock().volume_uuid, first_uuid);
    drop(still);

    // Dirty the bitmap; a forced create must zero it again.
    write_at(&disk, bitmap.start, &[0xff; 512]);
    let mut opts = internal(&disk);
    opts.force = true;
    let second = create(&opts).unwrap();
    assert_ne!(second.superblock().volume_uuid, first_uuid);
    assert_eq!(second.superblock().seq, 1);
    assert!(all_zero(&read_at(&disk, bitmap.start, 512)));
    drop(second);
    let reopened = open(&disk, &MetaLocation::Internal, false).unwrap();
    assert_ne!(reopened.superblock().volume_uuid, first_uuid);

    // Same for external metadata.
    let meta = dir.path("disk.md");
    let other = dir.disk("other.img", 4 * MIB);
    create(&external(&other, &meta)).unwrap();
    let err = create(&external(&other, &meta)).unwrap_err();
    assert!(matches!(err, MetadataError::AlreadyExists { .. }), "{err:?}");
    let mut opts = external(&other, &meta);
    opts.force = true;
    create(&opts).unwrap();
}

#[test]
fn internal_create_refuses_nonzero_tail_unless_forced() {
    let dir = TempDir::new("tail");
    let disk = dir.disk("disk.img", 8 * MIB);
    // Something (a filesystem's tail) 100 KiB before the end, inside the
    // ~268 KiB the metadata area needs.
    write_at(&disk, 8 * MIB - 100 * 1024, b"ext4 superblock backup");
    let err = create(&internal(&disk)).unwrap_err();
    assert!(matches!(err, MetadataError::WouldOverwriteData { overwrite_bytes: 274_432, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("would overwrite the last 1 MiB"), "{msg}");
    assert!(msg.contains(&disk.display().to_string()), "{msg}");
    assert!(msg.contains("shrink the filesystem"), "{msg}");
    assert!(msg.contains("external metadata"), "{msg}");
    assert!(msg.contains("--force"), "{msg}");
    // Refused means untouched.
    assert_eq!(&read_at(&disk, 8 * MIB - 100 * 1024, 4)[..], b"ext4");

    let mut opts = internal(&disk);
    opts.force = true;
    create(&opts).unwrap();

    // Data in the data area is not in the way.
    let busy = dir.disk("busy.img", 8 * MIB);
    write_at(&busy, 0, b"a filesystem that fits");
    create(&internal(&busy)).unwrap();
    assert_eq!(&read_at(&busy, 0, 5)[..], b"a fil");
}

#[test]
fn external_create_refuses_foreign_file_unless_forced() {
    let dir = TempDir::new("foreign");
    let disk = dir.disk("disk.img", 4 * MIB);
    let meta = dir.path("notes.txt");
    fs::write(&meta, b"important notes").unwrap();
    let err = create(&external(&disk, &meta)).unwrap_err();
    assert!(matches!(err, MetadataError::ExternalNotEmpty { .. }), "{err:?}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(fs::read(&meta).unwrap(), b"important notes");

    let mut opts = external(&disk, &meta);
    opts.force = true;
    create(&opts).unwrap();
    open(&disk, &MetaLocation::External(meta), false).unwrap();
}

#[test]
fn disk_resize_is_detected() {
    let dir = TempDir::new("resize");
    let disk = dir.disk("disk.img", 16 * MIB);
    let meta = dir.path("disk.md");
    let location = MetaLocation::External(meta.clone());
    create(&external(&disk, &meta)).unwrap();

    File::options().write(true).open(&disk).unwrap().set_len(32 * MIB).unwrap();
    let err = open(&disk, &location, false).unwrap_err();
    assert!(
        matches!(err, MetadataError::SizeMismatch { recorded, actual, .. }
            if recorded == 16 * MIB && actual == 32 * MIB),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("16777216") && msg.contains("33554432"), "{msg}");
    assert!(msg.contains("resized"), "{msg}");

    // Internal: growing within the last 4 KiB block keeps the slots in place
    // but must still be noticed.
    let disk = dir.disk("int.img", 8 * MIB);
    create(&internal(&disk)).unwrap();
    File::options().write(true).open(&disk).unwrap().set_len(8 * MIB + 100).unwrap();
    let err = open(&disk, &MetaLocation::Internal, false).unwrap_err();
    assert!(matches!(err, MetadataError::SizeMismatch { .. }), "{err:?}");
}

#[test]
fn flag_bits_roundtrip() {
    for bits in 0..64u64 {
        let flags = MetaFlags::from_bits(bits).unwrap();
        assert_eq!(flags.to_bits(), bits);
    }
    let one = |f: fn(&mut MetaFlags)| {
        let mut flags = MetaFlags::default();
        f(&mut flags);
        flags.to_bits()
    };
    assert_eq!(one(|f| f.consistent = true), 1);
    assert_eq!(one(|f| f.clean_shutdown = true), 2);
    assert_eq!(one(|f| f.primary = true), 4);
    assert_eq!(one(|f| f.external = true), 8);
    assert_eq!(one(|f| f.crashed_primary = true), 16);
    assert_eq!(one(|f| f.outdated = true), 32);
    assert_eq!(MetaFlags::from_bits(0b100_0101), Err(0b100_0000));

    // And through the disk.
    let dir = TempDir::new("flags");
    let disk = dir.disk("disk.img", 8 * MIB);
    let mut md = create(&internal(&disk)).unwrap();
    md.update(|sb| {
        sb.flags.consistent = true;
        sb.flags.primary = true;
    })
    .unwrap();
    drop(md);
    let flags = open(&disk, &MetaLocation::Internal, true).unwrap().superblock().flags;
    assert_eq!(flags.to_bits(), MetaFlags::CONSISTENT | MetaFlags::PRIMARY);
}

#[test]
fn unknown_flag_bits_are_refused_not_dropped() {
    let dir = TempDir::new("unkflags");
    let disk = dir.disk("disk.img", 8 * MIB);
    let md = create(&internal(&disk)).unwrap();
    let a = slot_offset(&md, Slot::A);
    drop(md);
    let mut slot = read_at(&disk, a, SLOT_BYTES);
    slot[136..144].copy_from_slice(&(1u64 << 40).to_le_bytes());
    layout::reseal(&mut slot);
    write_at(&disk, a, &slot);
    let err = open(&disk, &MetaLocation::Internal, false).unwrap_err();
    assert!(matches!(err, MetadataError::Unsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("unknown flag bits 0x10000000000"), "{err}");
}

#[test]
fn meta_location_from_str() {
    assert_eq!("internal".parse::<MetaLocation>().unwrap(), MetaLocation::Internal);
    assert_eq!(
        "/var/lib/r0.md".parse::<MetaLocation>().unwrap(),
        MetaLocation::External(PathBuf::from("/var/lib/r0.md"))
    );
    assert_eq!("./internal".parse::<MetaLocation>().unwrap(), MetaLocation::External(PathBuf::from("./internal")));
    assert!("".parse::<MetaLocation>().is_err());
    for s in ["internal", "/a/b.md"] {
        assert_eq!(s.parse::<MetaLocation>().unwrap().to_string(), s);
    }
}

#[test]
fn open_without_metadata_says_run_create_md() {
    let dir = TempDir::new("nomd");
    let disk = dir.disk("disk.img", 8 * MIB);
    let err = open(&disk, &MetaLocation::Internal, false).unwrap_err();
    assert!(matches!(err, MetadataError::NoMetadata { .. }), "{err:?}");
    let msg = err.to_string();
    let shown = disk.display();
    assert!(msg.contains(&format!("no replicator metadata on {shown} (internal)")), "{msg}");
    assert!(msg.contains(&format!("run `replicator create-md --disk {shown} ...` first")), "{msg}");

    let meta = dir.path("missing.md");
    let err = open(&disk, &MetaLocation::External(meta.clone()), false).unwrap_err();
    assert!(matches!(err, MetadataError::NoMetadata { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("in {}", meta.display())), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");

    // A missing disk is an I/O error naming the disk.
    let err = open(&dir.path("nope.img"), &MetaLocation::Internal, false).unwrap_err();
    assert!(matches!(err, MetadataError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.img"), "{err}");
}

#[test]
fn invalid_parameters_name_the_allowed_range() {
    let dir = TempDir::new("params");
    let disk = dir.disk("disk.img", 8 * MIB);
    let meta = dir.path("never.md");
    type Tweak = fn(&mut CreateOptions);
    let cases: [(Tweak, &str); 7] = [
        (|o| o.bitmap_granularity_bytes = 1000, "power of two between 512 bytes and 1 MiB"),
        (|o| o.bitmap_granularity_bytes = 256, "between 512 bytes and 1 MiB"),
        (|o| o.bitmap_granularity_bytes = 2 << 20, "between 512 bytes and 1 MiB"),
        (|o| o.al_slots = 1, "between 2 and 4096"),
        (|o| o.al_extent_bytes = 2048, "between the bitmap granularity (4096 bytes) and 1 GiB"),
        (|o| o.al_extent_bytes = 3 << 20, "power of two"),
        (|o| o.al_extents_max = 5, "between 7 and 65534"),
    ];
    for (tweak, expected) in cases {
        let mut opts = external(&disk, &meta);
        tweak(&mut opts);
        let err = create(&opts).unwrap_err();
        assert!(matches!(err, MetadataError::InvalidParameter(_)), "{err:?}");
        assert!(err.to_string().contains(expected), "{err} lacks {expected:?}");
    }
    assert!(!meta.exists(), "a refused create must not leave a file behind");
}

#[test]
fn too_small_disk_is_refused() {
    let dir = TempDir::new("small");
    let disk = dir.disk("disk.img", MIB);
    let err = create(&internal(&disk)).unwrap_err();
    assert!(
        matches!(err, MetadataError::DiskTooSmall { size, needed, .. }
            if size == MIB && needed == MIB + 274_432),
        "{err:?}"
    );
    assert!(err.to_string().contains("or external metadata"), "{err}");

    let tiny = dir.disk("tiny.img", MIB - 4096);
    let meta = dir.path("tiny.md");
    let err = create(&external(&tiny, &meta)).unwrap_err();
    assert!(matches!(err, MetadataError::DiskTooSmall { needed, .. } if needed == MIB), "{err:?}");
    assert!(!meta.exists(), "a refused create must not leave a file behind");

    // Exactly metadata + 1 MiB is enough.
    let exact = dir.disk("exact.img", MIB + 274_432);
    assert_eq!(create(&internal(&exact)).unwrap().data_size_bytes(), MIB);
}

#[test]
fn read_only_metadata_cannot_be_updated() {
    let dir = TempDir::new("ro");
    let disk = dir.disk("disk.img", 8 * MIB);
    create(&internal(&disk)).unwrap();
    let mut md = open(&disk, &MetaLocation::Internal, true).unwrap();
    assert!(md.is_read_only());
    let err = md.update(|sb| sb.node_id = 1).unwrap_err();
    assert!(matches!(err, MetadataError::ReadOnly { .. }), "{err:?}");
    assert_eq!(md.superblock().seq, 1);
    assert_eq!(slot_seq(&md, Slot::B), None);
}

#[test]
fn update_cannot_break_the_layout() {
    let dir = TempDir::new("badupdate");
    let disk = dir.disk("disk.img", 8 * MIB);
    let mut md = create(&internal(&disk)).unwrap();
    let before = md.superblock().clone();
    let err = md.update(|sb| sb.data_size_bytes += 4096).unwrap_err();
    assert!(matches!(err, MetadataError::InvalidUpdate { .. }), "{err:?}");
    assert!(err.to_string().contains("data_size_bytes"), "{err}");
    let err = md.update(|sb| sb.flags.external = true).unwrap_err();
    assert!(matches!(err, MetadataError::InvalidUpdate { .. }), "{err:?}");
    assert_eq!(md.superblock(), &before);
    assert_eq!(slot_seq(&md, Slot::B), None, "nothing was written");
    // seq and format_version are not the caller's to choose.
    md.update(|sb| {
        sb.seq = 100;
        sb.format_version = 7;
    })
    .unwrap();
    assert_eq!((md.superblock().seq, md.superblock().format_version), (2, 1));
}

#[test]
fn external_metadata_cannot_be_the_disk_itself() {
    let dir = TempDir::new("same");
    let disk = dir.disk("disk.img", 8 * MIB);
    let err = create(&external(&disk, &disk)).unwrap_err();
    assert!(matches!(err, MetadataError::SameFile { .. }), "{err:?}");
    assert!(all_zero(&read_at(&disk, 0, 8 * MIB)));
}

#[test]
fn superblock_layout_is_stable() {
    let dir = TempDir::new("layout");
    let disk = dir.disk("disk.img", 8 * MIB);
    let sb = create(&internal(&disk)).unwrap().superblock().clone();
    let bytes = layout::encode(&sb);
    assert_eq!(bytes.len() as u64, SLOT_BYTES);
    assert_eq!(&bytes[..8], b"RPLMETA\0");
    assert_eq!(bytes[8..12], 1u32.to_le_bytes());
    assert_eq!(bytes[12..16], (HEADER_BYTES as u32).to_le_bytes());
    assert_eq!(bytes[16..24], sb.seq.to_le_bytes());
    assert_eq!(bytes[24..40], *sb.volume_uuid.as_bytes());
    assert_eq!(bytes[40..48], sb.device_size_bytes.to_le_bytes());
    assert_eq!(bytes[104..112], sb.generations.current.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..HEADER_BYTES - 4]);
    assert_eq!(bytes[HEADER_BYTES - 4..HEADER_BYTES], crc.to_le_bytes());
    assert!(all_zero(&bytes[HEADER_BYTES..]));
    match layout::decode(&bytes) {
        SlotState::Valid { seq: 1, content: Decoded::Ok(decoded) } => assert_eq!(decoded, sb),
        other => panic!("{other:?}"),
    }
    assert!(matches!(layout::decode(&[0u8; 4096]), SlotState::Empty));
    assert!(matches!(layout::decode(&bytes[..10]), SlotState::Bad(_)));

    let json = serde_json::to_value(&sb).unwrap();
    assert_eq!(json["volume_uuid"], sb.volume_uuid.to_string());
    assert_eq!(json["flags"]["external"], false);
}

/// A random change to the fields updates may touch.
fn random_change(rng: &mut Rng) -> impl FnOnce(&mut Superblock) {
    let bits = rng.below(8);
    let values = [rng.next(), rng.next(), rng.next(), rng.next(), rng.next()];
    let node_id = rng.next() as u32;
    move |sb| {
        sb.flags.consistent = bits & 1 != 0;
        sb.flags.clean_shutdown = bits & 2 != 0;
        sb.flags.primary = bits & 4 != 0;
        sb.generations = Generations { current: values[0], bitmap: values[1], history: [values[2], values[3]] };
        sb.primary_epoch = values[4];
        sb.node_id = node_id;
    }
}

/// Random updates interleaved with crashes mid-superblock-write: open must
/// always succeed and return the last completed update, or the one in
/// flight if its header reached the disk intact; never anything older.
#[test]
fn random_updates_and_torn_writes_never_lose_or_roll_back() {
    let dir = TempDir::new("prop");
    for iteration in 0..200u64 {
        let mut rng = Rng::new(iteration);
        let disk = dir.disk("disk.img", 2 * MIB + rng.below(64 * 1024));
        let meta = dir.path("disk.md");
        let _ = fs::remove_file(&meta);
        let mut opts = if rng.below(2) == 0 { internal(&disk) } else { external(&disk, &meta) };
        opts.bitmap_granularity_bytes = [512, 4096, 65536][rng.below(3) as usize];
        opts.al_slots = [2, 3, 64][rng.below(3) as usize];
        let location = opts.location.clone();
        let mut md = create(&opts).unwrap();
        let mut last = md.superblock().clone();
        // A marker in the last data block: metadata writes must never reach it.
        let marker_at = md.data_size_bytes() - 16;
        write_at(&disk, marker_at, b"data-area-marker");

        for step in 0..1 + rng.below(10) {
            let ctx = format!("iteration {iteration} step {step}");
            match rng.below(4) {
                0 | 1 => {
                    let slot = md.current_slot();
                    md.update(random_change(&mut rng)).unwrap();
                    assert_eq!(md.current_slot(), slot.other(), "{ctx}");
                    assert_eq!(md.superblock().seq, last.seq + 1, "{ctx}");
                    last = md.superblock().clone();
                }
                2 => {
                    // Crash while writing the next superblock.
                    let pending = md.prepare_update(random_change(&mut rng)).unwrap();
                    let path = md.metadata_path().to_path_buf();
                    let mut image = read_at(&path, pending.offset, SLOT_BYTES);
                    let len = image.len();
                    match rng.below(5) {
                        0 => {} // nothing reached the disk
                        1 => {
                            // Garbage over a range, biased towards the header.
                            let start =
                                if rng.below(2) == 0 { rng.below(HEADER_BYTES as u64) } else { rng.below(len as u64) }
                                    as usize;
                            let end = start + 1 + rng.below((len - start) as u64) as usize;
                            rng.fill(&mut image[start..end]);
                        }
                        2 | 3 => {
                            // A prefix of the new block landed, then either
                            // the old bytes or garbage.
                            let k = if rng.below(2) == 0 {
                                rng.below(2 * HEADER_BYTES as u64)
                            } else {
                                rng.below(len as u64 + 1)
                            } as usize;
                            image[..k].copy_from_slice(&pending.bytes[..k]);
                            if rng.below(2) == 0 {
                                rng.fill(&mut image[k..]);
                            }
                        }
                        _ => image.copy_from_slice(&pending.bytes), // written, not acked
                    }
                    write_at(&path, pending.offset, &image);
                    drop(md);

                    md = open(&disk, &location, false)
                        .unwrap_or_else(|e| panic!("{ctx}: open after torn write failed: {e}"));
                    let landed = image[..HEADER_BYTES] == pending.bytes[..HEADER_BYTES];
                    let expected = if landed { &pending.sb } else { &last };
                    assert_eq!(md.superblock(), expected, "{ctx}: landed={landed}");
                    last = md.superblock().clone();
                }
                _ => {
                    drop(md);
                    md = open(&disk, &location, false).unwrap();
                    assert_eq!(md.superblock(), &last, "{ctx}: clean reopen");
                }
            }
        }
        drop(md);
        let md = open(&disk, &location, true).unwrap();
        assert_eq!(md.superblock(), &last, "iteration {iteration}: final");
        assert_eq!(&read_at(&disk, marker_at, 16)[..], b"data-area-marker");
    }
}

#[test]
fn bitmap_store_writes_changed_pages_and_reads_them_back() {
    let dir = TempDir::new("bitmapstore");
    let disk = dir.disk("disk.img", 64 * MIB);
    let md = create(&internal(&disk)).unwrap();
    let (mut store, mut words) = BitmapStore::load(&md).unwrap();
    assert!(words.iter().all(|w| *w == 0), "fresh metadata has a clean bitmap");
    words[0] = 0b1011;
    let last = words.len() - 1;
    words[last] = 1 << 7;
    store.store(&md, &words).unwrap();
    drop(md);
    let md = open(&disk, &MetaLocation::Internal, false).unwrap();
    let (_, read) = BitmapStore::load(&md).unwrap();
    assert_eq!(read, words);
    // The data area is untouched by bitmap writes.
    assert!(read_at(&disk, 0, 4096).iter().all(|b| *b == 0));
}

#[test]
fn activity_log_survives_a_torn_update() {
    let dir = TempDir::new("alstore");
    let disk = dir.disk("disk.img", 64 * MIB);
    let md = create(&internal(&disk)).unwrap();
    let (mut store, extents) = ActivityLogStore::load(&md).unwrap();
    assert!(extents.is_empty());
    store.store(&md, &[1, 5, 9]).unwrap();
    store.store(&md, &[1, 5, 9, 12]).unwrap();
    let (_, read) = ActivityLogStore::load(&md).unwrap();
    assert_eq!(read, vec![1, 5, 9, 12]);
    // Tear the newest copy (B: the second update went to the other copy).
    // 1237 extents take two 4 KiB blocks per copy.
    let second = md.al_range().start + 4096 * 2;
    let mut torn = read_at(&disk, second, 4096);
    torn[30] ^= 0xff;
    write_at(&disk, second, &torn);
    let (_, read) = ActivityLogStore::load(&md).unwrap();
    assert_eq!(read, vec![1, 5, 9], "falls back to the previous set, which covers every earlier write");
}
