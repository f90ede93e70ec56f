//! Tests of the engine against real files in unique temp directories.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::*;
use crate::test_rng::Rng;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(base: &Path, name: &str) -> TempDir {
        let n = DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("backing-{name}-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// A `len`-byte file: sparse when `fill` is None.
    fn file(&self, len: u64, fill: Option<u8>) -> PathBuf {
        let path = self.0.join("disk.img");
        match fill {
            Some(byte) => fs::write(&path, vec![byte; len as usize]).expect("write file"),
            None => fs::File::create(&path).and_then(|f| f.set_len(len)).expect("create sparse file"),
        }
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// /var/tmp is ext4 on the test machines (needed for holes and O_DIRECT).
fn var_tmp() -> PathBuf {
    PathBuf::from("/var/tmp")
}

fn open_with(path: &Path, data_size: u64, tweak: impl FnOnce(&mut BackingConfig)) -> Backing {
    let mut cfg = BackingConfig::new(path.to_path_buf(), data_size);
    tweak(&mut cfg);
    Backing::open(cfg).expect("open backing")
}

/// One completion channel and a tag counter, like an NBD connection.
struct Client {
    tx: CompletionSender,
    rx: UnboundedReceiver<IoCompletion>,
    next_tag: u64,
}

impl Client {
    fn new() -> Client {
        let (tx, rx) = unbounded_channel();
        Client { tx, rx, next_tag: 1 }
    }

    fn req(&mut self, op: IoOp) -> IoRequest {
        self.next_tag += 1;
        IoRequest { tag: self.next_tag, op, done: self.tx.clone() }
    }

    fn recv(&mut self) -> IoCompletion {
        self.rx.blocking_recv().expect("engine dropped a request")
    }

    fn run(&mut self, backing: &Backing, op: IoOp) -> Result<IoOutput, IoFailure> {
        let req = self.req(op);
        let tag = req.tag;
        backing.submit(req);
        let completion = self.recv();
        assert_eq!(completion.tag, tag);
        completion.result
    }

    fn read(&mut self, backing: &Backing, offset: u64, len: u32) -> Vec<u8> {
        match self.run(backing, IoOp::Read { offset, len, uncached: false }) {
            Ok(IoOutput::Read(buf)) => {
                assert_eq!(buf.len(), len as usize);
                buf.to_vec()
            }
            other => panic!("read {offset}+{len}: {other:?}"),
        }
    }

    fn write(&mut self, backing: &Backing, offset: u64, data: &[u8], fua: bool) {
        let op = IoOp::Write { offset, data: WriteBuf::from_slice(data), fua, uncached: false };
        assert_eq!(self.run(backing, op), Ok(IoOutput::Done), "write {offset}");
    }

    fn extents(&mut self, backing: &Backing, offset: u64, len: u32) -> Vec<Extent> {
        match self.run(backing, IoOp::BlockStatus { offset, len }) {
            Ok(IoOutput::Extents(extents)) => extents,
            other => panic!("block status: {other:?}"),
        }
    }
}

/// Rounds of 200 concurrent writes (non-overlapping, so the model is exact)
/// followed by 200 concurrent reads compared against the model. `align`
/// makes every other op aligned to it, to exercise O_DIRECT.
fn random_roundtrip(backing: &Backing, size: u64, seed: u64, align: u64) {
    const BATCH: u64 = 200;
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; size as usize];
    let mut client = Client::new();
    let region = size / BATCH;
    for round in 0..4 {
        let mut pending = HashMap::new();
        let mut batch = Vec::new();
        for i in 0..BATCH {
            let (mut offset, mut len) = (rng.below(region / 2), 1 + rng.below(region / 2));
            if i % 2 == 0 && align > 1 {
                offset -= offset % align;
                len = (len / align).max(1) * align;
            }
            let offset = i * region + offset;
            let data = rng.bytes(len as usize);
            model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            let req = client.req(IoOp::Write {
                offset,
                data: WriteBuf::from_slice(&data),
                fua: round == 3 && i % 7 == 0,
                uncached: false,
            });
            pending.insert(req.tag, offset);
            batch.push(req);
        }
        backing.submit_batch(batch);
        for _ in 0..BATCH {
            let c = client.recv();
            let offset = pending.remove(&c.tag).expect("unknown or repeated tag");
            assert_eq!(c.result, Ok(IoOutput::Done), "write at {offset}");
        }

        let mut batch = Vec::new();
        for i in 0..BATCH {
            let (mut offset, mut len) = (rng.below(size), 1 + rng.below(64 * KIB));
            if i % 2 == 0 && align > 1 {
                offset -= offset % align;
                len = (len / align).max(1) * align;
            }
            let len = len.min(size - offset) as u32;
            let req = client.req(IoOp::Read { offset, len, uncached: false });
            pending.insert(req.tag, offset);
            batch.push((req, len));
        }
        let lens: HashMap<u64, u32> = batch.iter().map(|(r, len)| (r.tag, *len)).collect();
        backing.submit_batch(batch.into_iter().map(|(r, _)| r));
        for _ in 0..BATCH {
            let c = client.recv();
            let offset = pending.remove(&c.tag).expect("unknown or repeated tag") as usize;
            let len = lens[&c.tag] as usize;
            match c.result {
                Ok(IoOutput::Read(buf)) => assert!(
                    buf[..] == model[offset..offset + len],
                    "round {round}: read {offset}+{len} differs from the model"
                ),
                other => panic!("read at {offset}: {other:?}"),
            }
        }
        assert!(pending.is_empty());
    }
    let stats = backing.stats();
    assert_eq!(stats.writes, 4 * BATCH);
    assert_eq!(stats.reads, 4 * BATCH);
    assert_eq!(stats.errors, 0);
}

#[test]
fn random_roundtrip_with_many_in_flight() {
    let dir = TempDir::new(&std::env::temp_dir(), "roundtrip");
    let size = 8 * MIB;
    let path = dir.file(size, None);
    // A ring smaller than the batch also exercises the overflow queue.
    let backing = open_with(&path, size, |c| c.ring_entries = 64);
    random_roundtrip(&backing, size, 0x9E37_79B9_7F4A_7C15, 1);
}

#[test]
fn random_roundtrip_with_two_io_threads() {
    let dir = TempDir::new(&std::env::temp_dir(), "two-threads");
    let size = 4 * MIB;
    let path = dir.file(size, None);
    let backing = open_with(&path, size, |c| c.io_threads = 2);
    random_roundtrip(&backing, size, 42, 512);
}

#[test]
fn direct_io_handles_aligned_and_unaligned_ops() {
    let dir = TempDir::new(&var_tmp(), "direct");
    let size = 4 * MIB;
    let path = dir.file(size, None);
    let backing = open_with(&path, size, |c| c.direct_io = true);
    assert!(backing.capabilities().direct_io);
    random_roundtrip(&backing, size, 7, 4096);

    // What went through O_DIRECT is visible through the page cache too.
    let mut client = Client::new();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    client.write(&backing, 64 * KIB, &data, true);
    client.write(&backing, 64 * KIB + 100, &data[..50], false);
    let mut expect = data.clone();
    expect[100..150].copy_from_slice(&data[..50]);
    assert_eq!(client.read(&backing, 64 * KIB, 8192), expect);
    assert_eq!(client.read(&backing, 64 * KIB + 1, 8000), expect[1..8001]);
    assert_eq!(client.run(&backing, IoOp::Flush), Ok(IoOutput::Done));

    // Large reads: aligned ones through O_DIRECT, unaligned ones through the
    // page cache in an io-wq worker (`OpState::sqe`).
    let big = Rng::new(11).bytes(2 * MIB as usize);
    client.write(&backing, MIB, &big, false);
    assert_eq!(client.read(&backing, MIB, 2 * MIB as u32), big);
    assert_eq!(client.read(&backing, MIB + 1, MIB as u32), big[1..MIB as usize + 1]);
    drop(backing);
    let on_disk = fs::read(&path).expect("read file");
    assert_eq!(on_disk[64 * 1024..64 * 1024 + 8192], expect[..]);
}

#[test]
fn fua_writes_and_flush_complete() {
    let dir = TempDir::new(&std::env::temp_dir(), "fua");
    let path = dir.file(MIB, None);
    let backing = open_with(&path, MIB, |_| {});
    let mut client = Client::new();
    let data = Rng::new(5).bytes(10_000);
    client.write(&backing, 4097, &data, true);
    assert_eq!(client.run(&backing, IoOp::Flush), Ok(IoOutput::Done));
    let stats = backing.stats();
    assert_eq!((stats.writes, stats.flushes, stats.bytes_written), (1, 1, 10_000));
    let on_disk = fs::read(&path).expect("read file");
    assert_eq!(&on_disk[4097..4097 + 10_000], &data[..]);
}

/// Uncached (bulk) transfers move the same bytes as cached ones: on ext4,
/// which takes RWF_DONTCACHE (Linux 6.14+), and on tmpfs, which refuses it,
/// where the engine falls back to plain transfers and stops asking.
#[test]
fn uncached_transfers_round_trip_with_or_without_dontcache() {
    for (base, name) in [(var_tmp(), "uncached-ext4"), (PathBuf::from("/dev/shm"), "uncached-tmpfs")] {
        if !base.is_dir() {
            continue;
        }
        let dir = TempDir::new(&base, name);
        let path = dir.file(4 * MIB, Some(0x11));
        let backing = open_with(&path, 4 * MIB, |_| {});
        let mut client = Client::new();
        let mut rng = Rng::new(7);
        let big = rng.bytes(256 * KIB as usize);
        let odd = rng.bytes(5000);
        for (offset, data) in [(MIB, &big), (3 * MIB + 123, &odd)] {
            let op = IoOp::Write { offset, data: WriteBuf::from_slice(data), fua: false, uncached: true };
            assert_eq!(client.run(&backing, op), Ok(IoOutput::Done), "{name}: write {offset}");
            let len = data.len() as u32;
            match client.run(&backing, IoOp::Read { offset, len, uncached: true }) {
                Ok(IoOutput::Read(buf)) => assert!(buf[..] == data[..], "{name}: read back {offset}"),
                other => panic!("{name}: read {offset}: {other:?}"),
            }
            assert_eq!(client.read(&backing, offset - 1, 1), vec![0x11], "{name}: byte before {offset}");
        }
        assert_eq!(client.run(&backing, IoOp::Flush), Ok(IoOutput::Done));
        let on_disk = fs::read(&path).expect("read file");
        assert!(on_disk[MIB as usize..][..big.len()] == big[..], "{name}: file content");
        let dontcache = backing.inner.shared.dontcache_ok.load(Ordering::Relaxed);
        if name == "uncached-tmpfs" {
            assert!(!dontcache, "tmpfs refuses RWF_DONTCACHE; the engine should have stopped asking");
        }
        let stats = backing.stats();
        assert_eq!((stats.writes, stats.errors), (2, 0), "{name}: a refused flag is not an error");
    }
}

#[test]
fn trim_reads_back_zeros_and_shows_a_hole() {
    let dir = TempDir::new(&var_tmp(), "trim");
    let path = dir.file(MIB, Some(0xAB));
    let backing = open_with(&path, MIB, |_| {});
    let mut client = Client::new();
    assert!(backing.capabilities().block_status);
    assert_eq!(client.extents(&backing, 0, MIB as u32), vec![Extent { length: MIB as u32, hole: false }]);
    let trim = IoOp::Trim { offset: 64 * KIB, len: 256 * KIB as u32 };
    assert_eq!(client.run(&backing, trim), Ok(IoOutput::Done));
    assert!(backing.capabilities().trim, "ext4 punches holes");

    let all = client.read(&backing, 0, MIB as u32);
    assert!(all[..64 * 1024].iter().all(|&b| b == 0xAB));
    assert!(all[64 * 1024..320 * 1024].iter().all(|&b| b == 0));
    assert!(all[320 * 1024..].iter().all(|&b| b == 0xAB));

    let extents = client.extents(&backing, 0, MIB as u32);
    let expected = [(64 * KIB, false), (256 * KIB, true), (704 * KIB, false)];
    let expected: Vec<Extent> = expected.iter().map(|&(length, hole)| Extent { length: length as u32, hole }).collect();
    assert_eq!(extents, expected);
    // A range starting inside the hole.
    assert_eq!(client.extents(&backing, 128 * KIB, 4096), vec![Extent { length: 4096, hole: true }]);
    assert_eq!(backing.stats().trims, 1);
}

#[test]
fn block_status_of_sparse_file_tracks_writes() {
    let dir = TempDir::new(&var_tmp(), "sparse");
    let path = dir.file(MIB, None);
    let backing = open_with(&path, MIB, |_| {});
    let mut client = Client::new();
    assert_eq!(client.extents(&backing, 0, MIB as u32), vec![Extent { length: MIB as u32, hole: true }]);
    client.write(&backing, 512 * KIB, &[1u8; 4096], false);
    assert_eq!(client.run(&backing, IoOp::Flush), Ok(IoOutput::Done));
    let extents = client.extents(&backing, 0, MIB as u32);
    let total: u64 = extents.iter().map(|e| u64::from(e.length)).sum();
    assert_eq!(total, MIB);
    assert!(extents[0].hole && extents.last().is_some_and(|e| e.hole));
    assert!(extents.iter().any(|e| !e.hole), "the written block is data: {extents:?}");
    assert_eq!(client.extents(&backing, 0, 0), Vec::new());
}

#[test]
fn write_zeroes_with_and_without_trim() {
    let dir = TempDir::new(&var_tmp(), "zeroes");
    let size = 4 * MIB;
    let path = dir.file(size, Some(0xCD));
    let backing = open_with(&path, size, |_| {});
    let mut client = Client::new();
    let mut model = vec![0xCDu8; size as usize];
    let mut zero = |client: &mut Client, offset: u64, len: u32, may_trim, fast_only, fua| {
        let op = IoOp::WriteZeroes { offset, len, may_trim, fast_only, fua };
        let result = client.run(&backing, op);
        if result.is_ok() {
            model[offset as usize..offset as usize + len as usize].fill(0);
        }
        result
    };

    // Fast paths (punch hole, zero range) on unaligned ranges.
    assert_eq!(zero(&mut client, 100, 5000, true, true, false), Ok(IoOutput::Done));
    assert_eq!(zero(&mut client, MIB + 7, 300_000, false, true, true), Ok(IoOutput::Done));
    let caps = backing.capabilities();
    assert!(caps.trim && caps.zero_range, "ext4 supports both: {caps:?}");

    // Pretend the filesystem refused both modes: fast-only must fail
    // without touching data; otherwise zero buffers (several chunks) are written.
    backing.inner.shared.trim_ok.store(false, Ordering::Relaxed);
    backing.inner.shared.zero_range_ok.store(false, Ordering::Relaxed);
    assert_eq!(zero(&mut client, 2 * MIB, 4096, true, true, false), Err(IoFailure::NotSupported));
    let len = (2 * MIB + MIB / 2) as u32;
    assert_eq!(zero(&mut client, 1_234_567, len, true, false, true), Ok(IoOutput::Done));
    assert_eq!(zero(&mut client, 3, 0, false, false, true), Ok(IoOutput::Done));

    let all = client.read(&backing, 0, size as u32);
    assert!(all == model, "contents differ from the model");
    let stats = backing.stats();
    assert_eq!((stats.write_zeroes, stats.errors), (4, 1));
}

#[test]
fn out_of_range_ops_are_refused_without_io() {
    let dir = TempDir::new(&std::env::temp_dir(), "range");
    let data_size = 64 * KIB;
    let path = dir.0.join("disk.img");
    let mut content = vec![0x11u8; data_size as usize];
    content.extend_from_slice(&[0x5A; 4096]);
    fs::write(&path, &content).expect("write file");
    let backing = open_with(&path, data_size, |_| {});
    let mut client = Client::new();
    let beyond = |offset, len| IoOp::WriteZeroes { offset, len, may_trim: true, fast_only: false, fua: false };
    let refused = vec![
        IoOp::Read { offset: data_size - 10, len: 11, uncached: false },
        IoOp::Write { offset: data_size - 2, data: WriteBuf::from_slice(&[0xEE; 4]), fua: false, uncached: false },
        IoOp::Write { offset: data_size, data: WriteBuf::from_slice(&[0xEE]), fua: true, uncached: false },
        IoOp::Trim { offset: 60 * KIB, len: 8192 },
        beyond(data_size, 4096),
        beyond(u64::MAX - 1, 4),
        IoOp::BlockStatus { offset: 0, len: data_size as u32 + 1 },
        IoOp::Read { offset: u64::MAX - 1, len: 4, uncached: false },
    ];
    let count = refused.len() as u64;
    for op in refused {
        assert_eq!(client.run(&backing, op), Err(IoFailure::OutOfRange));
    }
    let stats = backing.stats();
    assert_eq!((stats.errors, stats.reads, stats.writes), (count, 0, 0));
    // Right up to the line is fine.
    assert_eq!(client.read(&backing, data_size - 10, 10), vec![0x11; 10]);
    client.write(&backing, data_size - 4, &[0x22; 4], false);
    drop(backing);

    let on_disk = fs::read(&path).expect("read file");
    assert_eq!(on_disk.len(), content.len());
    assert_eq!(&on_disk[data_size as usize - 4..data_size as usize], &[0x22; 4]);
    assert!(on_disk[data_size as usize..].iter().all(|&b| b == 0x5A), "sentinel changed");
    assert_eq!(IoFailure::OutOfRange.errno(), libc::EINVAL);
}

#[test]
fn read_only_refuses_writes() {
    let dir = TempDir::new(&std::env::temp_dir(), "ro");
    let path = dir.file(64 * KIB, Some(0x22));
    let backing = open_with(&path, 64 * KIB, |c| c.read_only = true);
    let caps = backing.capabilities();
    assert!(!caps.trim && !caps.zero_range);
    let mut client = Client::new();
    let writes = [
        IoOp::Write { offset: 0, data: WriteBuf::from_slice(&[1; 512]), fua: false, uncached: false },
        IoOp::Trim { offset: 0, len: 4096 },
        IoOp::WriteZeroes { offset: 0, len: 4096, may_trim: false, fast_only: false, fua: false },
    ];
    for op in writes {
        assert_eq!(client.run(&backing, op), Err(IoFailure::ReadOnly));
    }
    assert_eq!(client.read(&backing, 0, 4096), vec![0x22; 4096]);
    assert_eq!(client.run(&backing, IoOp::Flush), Ok(IoOutput::Done));
    drop(backing);
    assert!(fs::read(&path).expect("read file").iter().all(|&b| b == 0x22));
}

#[test]
fn short_file_reads_zeros_past_its_end() {
    let dir = TempDir::new(&var_tmp(), "short");
    let path = dir.file(10_000, Some(0x33));
    let backing = open_with(&path, 64 * KIB, |_| {});
    let mut client = Client::new();
    let got = client.read(&backing, 8192, 16384);
    assert!(got[..1808].iter().all(|&b| b == 0x33));
    assert!(got[1808..].iter().all(|&b| b == 0), "no zero fill past EOF");
    assert_eq!(client.read(&backing, 32 * KIB, 4096), vec![0; 4096]);

    let extents = client.extents(&backing, 0, 64 * KIB as u32);
    assert!(!extents[0].hole && extents[0].length >= 10_000);
    assert!(extents.last().is_some_and(|e| e.hole), "past EOF is a hole: {extents:?}");
    let total: u32 = extents.iter().map(|e| e.length).sum();
    assert_eq!(total, 64 * KIB as u32);
}

#[test]
fn zero_length_ops_succeed() {
    let dir = TempDir::new(&std::env::temp_dir(), "empty-ops");
    let path = dir.file(8192, None);
    let backing = open_with(&path, 8192, |_| {});
    let mut client = Client::new();
    assert_eq!(
        client.run(&backing, IoOp::Read { offset: 8192, len: 0, uncached: false }),
        Ok(IoOutput::Read(AlignedBuf::new()))
    );
    let ops = [
        IoOp::Write { offset: 100, data: WriteBuf::default(), fua: true, uncached: false },
        IoOp::Trim { offset: 0, len: 0 },
    ];
    for op in ops {
        assert_eq!(client.run(&backing, op), Ok(IoOutput::Done));
    }
}

#[test]
fn shutdown_completes_ops_in_flight() {
    let dir = TempDir::new(&std::env::temp_dir(), "shutdown");
    let size = 2 * MIB;
    let path = dir.file(size, None);
    let backing = open_with(&path, size, |c| c.ring_entries = 8);
    let other_handle = backing.clone();
    let mut client = Client::new();
    let batch: Vec<IoRequest> = (0..300u64)
        .map(|i| {
            client.req(IoOp::Write {
                offset: i * 4096,
                data: WriteBuf::from_slice(&[(i % 250) as u8 + 1; 4096]),
                fua: i % 50 == 0,
                uncached: false,
            })
        })
        .collect();
    backing.submit_batch(batch);
    backing.shutdown();
    for _ in 0..300 {
        assert_eq!(client.recv().result, Ok(IoOutput::Done));
    }
    // Any handle now answers at once with an error.
    assert_eq!(client.run(&other_handle, IoOp::Flush), Err(IoFailure::EngineStopped));
    assert_eq!(client.run(&backing, IoOp::Read { offset: 0, len: 1, uncached: false }), Err(IoFailure::EngineStopped));
    backing.shutdown();
    let on_disk = fs::read(&path).expect("read file");
    for i in 0..300usize {
        assert_eq!(on_disk[i * 4096], (i % 250) as u8 + 1, "block {i}");
    }
}

#[test]
fn dropping_the_last_handle_finishes_ops_in_flight() {
    let dir = TempDir::new(&std::env::temp_dir(), "drop");
    let path = dir.file(MIB, None);
    let backing = open_with(&path, MIB, |_| {});
    let mut client = Client::new();
    let batch: Vec<IoRequest> =
        (0..100u64).map(|i| client.req(IoOp::Read { offset: i * 512, len: 4096, uncached: false })).collect();
    backing.submit_batch(batch);
    drop(backing);
    for _ in 0..100 {
        assert!(matches!(client.recv().result, Ok(IoOutput::Read(b)) if b.len() == 4096));
    }
    drop(client.tx);
    assert!(client.rx.blocking_recv().is_none(), "no stray completions");
}

#[test]
fn concurrent_submitters_never_lose_a_wake_up() {
    // Each op is submitted alone and awaited, so the I/O thread is usually
    // asleep: every request depends on the eventfd wake-up handshake.
    let dir = TempDir::new(&std::env::temp_dir(), "wakeups");
    let path = dir.file(MIB, None);
    let backing = open_with(&path, MIB, |_| {});
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let backing = backing.clone();
            std::thread::spawn(move || {
                let mut client = Client::new();
                let mut rng = Rng::new(t + 1);
                for i in 0..1500u64 {
                    let offset = t * 256 * KIB + rng.below(64) * 4096;
                    let byte = (i % 255) as u8;
                    client.write(&backing, offset, &[byte; 512], false);
                    assert_eq!(client.read(&backing, offset, 512), vec![byte; 512]);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("submitter thread");
    }
    assert_eq!(backing.stats().writes, 6000);
}

#[test]
fn open_errors_name_the_path_and_the_fix() {
    let dir = TempDir::new(&std::env::temp_dir(), "open-errors");
    let missing = dir.0.join("missing.img");
    let err = Backing::open(BackingConfig::new(missing.clone(), 4096)).expect_err("missing file");
    assert!(matches!(err, BackingError::Open { .. }));
    assert!(err.to_string().contains(&missing.display().to_string()), "{err}");

    let mut cfg = BackingConfig::new(dir.0.clone(), 4096);
    cfg.read_only = true;
    let err = Backing::open(cfg).expect_err("a directory");
    assert!(matches!(err, BackingError::NotFileOrDevice { .. }), "{err}");

    let path = dir.file(4096, None);
    let mut cfg = BackingConfig::new(path, 4096);
    cfg.ring_entries = 1;
    let err = Backing::open(cfg).expect_err("tiny ring");
    assert!(matches!(err, BackingError::InvalidConfig(_)), "{err}");

    let message = BackingError::DirectIoUnsupported {
        path: PathBuf::from("/x"),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    }
    .to_string();
    assert!(message.contains("drop direct-io"), "{message}");
}

#[test]
fn handles_and_requests_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Backing>();
    send_sync::<AlignedBuf>();
    send::<IoRequest>();
    send::<IoCompletion>();
    assert_eq!(IoFailure::ReadOnly.errno(), libc::EPERM);
    assert_eq!(IoFailure::Errno(libc::ENOSPC).errno(), libc::ENOSPC);
}
