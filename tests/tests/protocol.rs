//! The NBD protocol from a hand-written client: multi-connection consistency,
//! option haggling corner cases, and hostile or careless clients. Each hostile
//! case ends by checking the server still serves a well-behaved client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tests::nbd::{self, Client, Handshake, Stream};
use tests::{assert_same_bytes, io_counter, random_bytes, status_json, Server, TestDir, Volume, MIB};

const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

fn setup(name: &str, size: u64) -> (TestDir, Volume, Server) {
    let dir = TestDir::new(name);
    let vol = Volume::create(&dir, size).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    (dir, vol, srv)
}

/// A well-behaved client can still connect, write and read back promptly.
#[track_caller]
fn assert_serves(srv: &mut Server) {
    srv.assert_running();
    let start = Instant::now();
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    c.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let data = random_bytes(8192, start.elapsed().as_nanos() as u64);
    c.write(12288, &data).unwrap();
    assert_eq!(c.read(12288, 8192).unwrap(), data);
    c.disconnect().unwrap();
    assert!(start.elapsed() < Duration::from_secs(10), "good client took {:?}", start.elapsed());
}

#[test]
fn multi_conn_flush_makes_writes_visible_everywhere() {
    let dir = TestDir::new("mconn");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let sock = dir.join("nbd.sock");
    let srv = Server::start(&vol, &["--listen", "127.0.0.1:0", "--unix", sock.to_str().unwrap()]).unwrap();

    let mut c1 = Client::connect(srv.addr(), "volume").unwrap();
    let mut c2 = Client::connect(srv.addr(), "volume").unwrap();
    let mut c3 = Client::connect_unix(&sock, "volume").unwrap();
    for c in [&c1, &c2, &c3] {
        assert!(c.flags() & nbd::TFLAG_CAN_MULTI_CONN != 0, "CAN_MULTI_CONN not advertised");
        assert!(c.flags() & nbd::TFLAG_SEND_FLUSH != 0);
        assert!(c.flags() & nbd::TFLAG_SEND_FUA != 0);
        assert!(c.flags() & nbd::TFLAG_SEND_TRIM != 0);
        assert!(c.flags() & nbd::TFLAG_SEND_WRITE_ZEROES != 0);
        assert_eq!(c.info.block_size.map(|b| b.2), Some(32 << 20), "max block size");
    }
    for round in 0..8u64 {
        let data = random_bytes(MIB as usize + 4096, 1000 + round);
        let off = round * 3 * MIB + 512 * round;
        c1.write(off, &data).unwrap();
        c2.flush().unwrap();
        assert_same_bytes(&format!("round {round}"), &c3.read(off, data.len() as u32).unwrap(), &data);
    }
    // FUA on one connection is visible on the others without a flush.
    let data = random_bytes(65536, 77);
    c3.write_flags(30 * MIB, &data, nbd::CMD_FLAG_FUA).unwrap();
    assert_eq!(c1.read(30 * MIB, 65536).unwrap(), data);
    // WRITE_ZEROES and TRIM on one connection, seen by another.
    c2.write_zeroes(30 * MIB, 4096, nbd::CMD_FLAG_NO_HOLE).unwrap();
    c2.trim(30 * MIB + 4096, 4096).unwrap();
    c2.flush().unwrap();
    let back = c1.read(30 * MIB, 65536).unwrap();
    assert_eq!(&back[..4096], &[0u8; 4096][..]);
    assert_eq!(&back[8192..], &data[8192..]);
}

/// Large reads of cached data are sent from a mapping of the page cache
/// (`backing::mapped`), at the time of sending rather than of reading:
/// they must still show every write and zeroing answered before them, at
/// unaligned offsets, on any connection.
#[test]
fn large_cached_reads_see_every_completed_write() {
    let dir = TestDir::new("mapped");
    let vol = Volume::create(&dir, 64 * MIB).unwrap();
    let ctl = dir.join("ctl.sock");
    let srv = Server::start(&vol, &["--listen", "127.0.0.1:0", "--control", ctl.to_str().unwrap()]).unwrap();
    let mut writer = Client::connect(srv.addr(), "volume").unwrap();
    let mut reader = Client::connect(srv.addr(), "volume").unwrap();
    let mapped_before = io_counter(&status_json(&ctl), "reads_mapped");

    let base = 3 * MIB + 512;
    let mut image = random_bytes(6 * MIB as usize, 71);
    writer.write(base, &image).unwrap();
    let spans = [(0, MIB), (4096, MIB + 4096), (777_777, 300_000), (5 * MIB - 70_000, MIB)];
    let check = |reader: &mut Client, image: &[u8], what: &str| {
        for (start, len) in spans {
            let got = reader.read(base + start, len as u32).unwrap();
            let want = &image[start as usize..(start + len) as usize];
            assert_same_bytes(&format!("{what}: {len} bytes at +{start}"), &got, want);
        }
    };
    check(&mut reader, &image, "after the first write");

    // Overwrite inside ranges just sent, then read them again.
    let patch = random_bytes(300_000, 72);
    writer.write(base + 1_000_000, &patch).unwrap();
    image[1_000_000..1_300_000].copy_from_slice(&patch);
    check(&mut reader, &image, "after an overwrite");

    // Zeroing either drops the range's cached pages (the first check then
    // reads them into a buffer, caching them again, and the second sends
    // the zeros from the mapping) or zeroes them in place (ext4 with large
    // folios, here): both checks then send from the mapping.
    writer.write_zeroes(base + 4 * MIB, MIB as u32, 0).unwrap();
    image[4 * MIB as usize..5 * MIB as usize].fill(0);
    check(&mut reader, &image, "after write-zeroes");
    check(&mut reader, &image, "after write-zeroes, again");

    let mapped = io_counter(&status_json(&ctl), "reads_mapped") - mapped_before;
    assert!(mapped > 0, "no read was sent from a mapping");
    eprintln!("{mapped} of {} large reads sent from a mapping", 4 * spans.len());
}

#[test]
fn concurrent_writers_on_many_connections() {
    let (_dir, _vol, srv) = setup("conc", 32 * MIB);
    let addr = srv.addr();
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            thread::spawn(move || {
                let mut c = Client::connect(addr, "volume").unwrap();
                // Pipeline 64 writes of 32 KiB into this worker's own 2 MiB stripe.
                let base = w * 4 * MIB;
                let data = random_bytes(2 * MIB as usize, 50 + w);
                for (i, chunk) in data.chunks(32768).enumerate() {
                    c.send(nbd::CMD_WRITE, 0, base + i as u64 * 32768, 32768, chunk).unwrap();
                }
                for _ in 0..64 {
                    let r = c.recv(|_| 0).unwrap();
                    assert_eq!(r.error, 0);
                }
                c.flush().unwrap();
                (base, data)
            })
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|h| h.join().unwrap()).collect();
    let mut c = Client::connect(addr, "volume").unwrap();
    for (base, data) in results {
        assert_same_bytes("stripe", &c.read(base, data.len() as u32).unwrap(), &data);
    }
}

#[test]
fn option_haggling() {
    let (_dir, vol, mut srv) = setup("opts", 16 * MIB);
    let size = vol.data_size().unwrap();

    // Unknown options are refused with ERR_UNSUP and the session continues.
    let mut hs = Handshake::tcp(srv.addr()).unwrap();
    assert!(hs.handshake_flags & nbd::FLAG_NO_ZEROES != 0, "NO_ZEROES not offered");
    let r = hs.option(0x4242, b"whatever").unwrap();
    assert_eq!(r.reply_type, nbd::REP_ERR_UNSUP, "unknown option: {r:?}");
    let r = hs.option(0x0fff_0000, &[]).unwrap();
    assert_eq!(r.reply_type, nbd::REP_ERR_UNSUP, "unknown option: {r:?}");
    // STARTTLS without TLS configured: refused, session continues.
    let r = hs.option(nbd::OPT_STARTTLS, &[]).unwrap();
    assert!(r.is_error(), "STARTTLS on a server without TLS must be refused: {r:?}");
    // INFO does not end the haggling; an unknown export is an error.
    let info = hs.go_raw(nbd::OPT_INFO, "volume").unwrap().unwrap();
    assert_eq!(info.size, size);
    let bs = info.block_size.expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(bs, (1, 4096, 32 << 20));
    let err = hs.go_raw(nbd::OPT_GO, "no-such-export").unwrap();
    assert!(err.is_err(), "GO on an unknown export must fail");
    // Structured replies can be negotiated.
    let r = hs.option(nbd::OPT_STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(r.reply_type, nbd::REP_ACK);
    let mut c = hs.go("volume").unwrap();
    assert_eq!(c.size(), size);
    // With structured replies negotiated a READ answers with a structured chunk.
    c.send(nbd::CMD_READ, 0, 0, 512, &[]).unwrap();
    let magic = nbd::read_u32(&mut c.stream).unwrap();
    assert_eq!(magic, 0x668e_33ef, "expected a structured reply chunk");
    drop(c);

    // Malformed OPT_GO (name length beyond the option payload): an error
    // reply or a hang-up, never a session.
    let mut hs = Handshake::tcp(srv.addr()).unwrap();
    if let Ok(r) = hs.option(nbd::OPT_GO, &[0, 0, 1, 0, b'v']) {
        assert!(r.is_error(), "malformed OPT_GO accepted: {r:?}");
    }
    drop(hs);

    // The old-style OPT_EXPORT_NAME enters transmission with no option reply.
    let mut hs = Handshake::tcp(srv.addr()).unwrap();
    hs.send_option(nbd::OPT_EXPORT_NAME, b"volume").unwrap();
    let got_size = nbd::read_u64(&mut hs.stream).unwrap();
    let flags = nbd::read_u16(&mut hs.stream).unwrap();
    if hs.handshake_flags & nbd::FLAG_NO_ZEROES == 0 {
        let mut zeroes = [0u8; 124];
        hs.stream.read_exact(&mut zeroes).unwrap();
    }
    assert_eq!(got_size, size);
    assert!(flags & nbd::TFLAG_HAS_FLAGS != 0);
    let mut c = Client::from_parts(hs.stream, nbd::ExportInfo { size, flags, block_size: None });
    c.write(0, b"hello").unwrap();
    assert_eq!(c.read(0, 5).unwrap(), b"hello");
    drop(c);

    // OPT_ABORT ends the session.
    let mut hs = Handshake::tcp(srv.addr()).unwrap();
    hs.send_option(nbd::OPT_ABORT, &[]).unwrap();
    assert!(hs.stream.wait_closed(CLOSE_TIMEOUT).unwrap(), "OPT_ABORT did not close");

    // NBD_OPT_LIST names the export.
    let mut hs = Handshake::tcp(srv.addr()).unwrap();
    assert_eq!(hs.list().unwrap(), vec!["volume".to_string()]);
    drop(hs);
    assert_serves(&mut srv);
}

#[test]
fn garbage_handshakes_are_dropped() {
    let (_dir, _vol, mut srv) = setup("garbage", 16 * MIB);

    // Garbage instead of the client flags, without even reading the greeting.
    let mut s = Stream::tcp(srv.addr()).unwrap();
    s.write_all(&random_bytes(4096, 5)).unwrap();
    assert!(s.wait_closed(CLOSE_TIMEOUT).unwrap(), "garbage handshake: connection left open");

    // HTTP instead of NBD.
    let mut s = Stream::tcp(srv.addr()).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(s.wait_closed(CLOSE_TIMEOUT).unwrap(), "HTTP request: connection left open");

    // Valid flags, then an option with a bad magic.
    let mut hs = Handshake::tcp(srv.addr()).unwrap();
    hs.stream.write_all(&random_bytes(16, 6)).unwrap();
    assert!(hs.stream.wait_closed(CLOSE_TIMEOUT).unwrap(), "bad option magic: connection left open");

    // An option claiming a huge payload: must not be buffered, must be refused.
    let mut hs = Handshake::tcp(srv.addr()).unwrap();
    let mut b = Vec::new();
    b.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
    b.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    hs.stream.write_all(&b).unwrap();
    let _ = hs.stream.write_all(&[0u8; 4096]);
    // An error reply, a hang-up, or waiting for the rest of the payload are all
    // fine; accepting the option or buffering gigabytes are not.
    hs.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    if let Ok(r) = hs.read_reply() {
        assert!(r.is_error(), "a 4 GiB option payload was accepted: {r:?}");
    }
    let rss = srv.vm_rss_kib().unwrap();
    assert!(rss < 256 * 1024, "server RSS {rss} KiB after a 4 GiB option header");
    drop(hs);

    // Connect and hang up halfway through the client flags.
    let mut s = TcpStream::connect(srv.addr()).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&[0, 0]).unwrap();
    drop(s);

    // Garbage in the transmission phase (bad request magic) ends the session.
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    c.stream.write_all(&random_bytes(28, 7)).unwrap();
    assert!(c.stream.wait_closed(CLOSE_TIMEOUT).unwrap(), "bad request magic: connection left open");

    assert_serves(&mut srv);
}

#[test]
fn bad_requests_get_errors() {
    let (_dir, vol, mut srv) = setup("badreq", 16 * MIB);
    let size = vol.data_size().unwrap();
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    c.stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();

    // Reads and writes past the end.
    let r = c.request(nbd::CMD_READ, 0, size, 4096, &[]).unwrap();
    assert!(matches!(r.error, nbd::EINVAL | nbd::ENOSPC), "READ past end: {r:?}");
    let r = c.request(nbd::CMD_READ, 0, size - 512, 4096, &[]).unwrap();
    assert!(matches!(r.error, nbd::EINVAL | nbd::ENOSPC), "READ straddling end: {r:?}");
    let r = c.request(nbd::CMD_WRITE, 0, size - 2048, 4096, &[1; 4096]).unwrap();
    assert!(matches!(r.error, nbd::EINVAL | nbd::ENOSPC), "WRITE straddling end: {r:?}");
    let r = c.request(nbd::CMD_WRITE_ZEROES, 0, size, 4096, &[]).unwrap();
    assert!(matches!(r.error, nbd::EINVAL | nbd::ENOSPC), "WRITE_ZEROES past end: {r:?}");
    let r = c.request(nbd::CMD_TRIM, 0, size + 4096, 4096, &[]).unwrap();
    assert!(matches!(r.error, nbd::EINVAL | nbd::ENOSPC), "TRIM past end: {r:?}");
    // offset + length wrapping around u64 must not be taken as in range.
    let r = c.request(nbd::CMD_READ, 0, u64::MAX - 100, 4096, &[]).unwrap();
    assert!(matches!(r.error, nbd::EINVAL | nbd::ENOSPC), "READ with wrapping offset: {r:?}");
    // Nothing was written by the refused write.
    assert_eq!(c.read(size - 2048, 2048).unwrap(), vec![0; 2048]);

    // Unknown command: EINVAL, or the server may hang up.
    match c.request(0x55, 0, 0, 4096, &[]) {
        Ok(r) => {
            assert_eq!(r.error, nbd::EINVAL, "unknown command: {r:?}");
            assert_eq!(c.read(0, 4096).unwrap().len(), 4096, "session after unknown command");
        }
        Err(_) => c = Client::connect(srv.addr(), "volume").unwrap(),
    }
    // Unknown command flag on a READ.
    if let Ok(r) = c.request(nbd::CMD_READ, 0x8000, 0, 4096, &[]) {
        assert!(r.error == nbd::EINVAL || r.error == 0, "unknown flag: {r:?}");
    }
    drop(c);

    // A READ longer than the 32 MiB maximum.
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    c.stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    match c.request(nbd::CMD_READ, 0, 0, (32 << 20) + 4096, &[]) {
        Ok(r) => {
            assert!(matches!(r.error, nbd::EINVAL | nbd::EOVERFLOW | nbd::ENOMEM), "oversized READ: {r:?}");
            assert_eq!(c.read(0, 4096).unwrap().len(), 4096, "session after oversized READ");
        }
        Err(e) => eprintln!("oversized READ: server disconnected ({e})"),
    }
    drop(c);

    // A WRITE longer than the maximum: the server either skips the payload and
    // replies with an error, or hangs up; it must never misparse the payload
    // as requests.
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    c.stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let len: u32 = 40 << 20;
    c.send(nbd::CMD_WRITE, 0, 0, len, &[]).unwrap();
    let mut w = c.stream.try_clone().unwrap();
    // The payload looks like valid requests, to catch a server that resyncs on it.
    let writer = thread::spawn(move || {
        let fake: Vec<u8> = (0..(len as usize / 28 + 1))
            .flat_map(|i| nbd::encode_request(nbd::CMD_WRITE_ZEROES, 0, 1 << 40 | i as u64, 0, 4096))
            .take(len as usize)
            .collect();
        let _ = w.write_all(&fake);
    });
    match c.recv(|_| 0) {
        Ok(r) => {
            assert_ne!(r.error, 0, "oversized WRITE succeeded: {r:?}");
            assert!(r.handle < 1 << 40, "payload of the oversized WRITE was parsed as requests");
            writer.join().unwrap();
            // Either the session continues cleanly or it is closed, but no desync.
            match c.request(nbd::CMD_READ, 0, 0, 4096, &[]) {
                Ok(r) => assert_eq!((r.error, r.handle < 1 << 40), (0, true), "after oversized WRITE: {r:?}"),
                Err(e) => eprintln!("oversized WRITE: error reply, then disconnect ({e})"),
            }
        }
        Err(e) => {
            eprintln!("oversized WRITE: server disconnected ({e})");
            writer.join().unwrap();
        }
    }
    drop(c);
    assert_serves(&mut srv);
}

/// Opens `hogs` connections that each send 10k 1 MiB READs and never read a
/// reply; for 8 s a well-behaved client keeps working next to them. Returns
/// (RSS before, peak RSS) of the server in KiB.
fn hog_memory(srv: &mut Server, hogs: usize) -> (u64, u64) {
    let base_rss = srv.vm_rss_kib().unwrap();
    let mut conns = Vec::new();
    let mut writers = Vec::new();
    for h in 0..hogs {
        let hog = Client::connect(srv.addr(), "volume").unwrap();
        let requests: Vec<u8> = (0..10_000u64)
            .flat_map(|i| nbd::encode_request(nbd::CMD_READ, 0, i, ((i + h as u64) % 63) * MIB, MIB as u32))
            .collect();
        let mut stream = hog.stream.try_clone().unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        // The server may (rightly) stop reading requests once replies back
        // up, so this write may block; it runs on its own thread.
        writers.push(thread::spawn(move || stream.write_all(&requests)));
        conns.push(hog);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(base_rss));
    let sampler = {
        let (stop, max_rss, pid) = (stop.clone(), max_rss.clone(), srv.pid);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = tests::util::vm_rss_kib(pid) {
                    max_rss.fetch_max(rss, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let window = Instant::now();
    let mut good_sessions = 0;
    while window.elapsed() < Duration::from_secs(8) {
        assert_serves(srv);
        good_sessions += 1;
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = max_rss.load(Ordering::Relaxed);
    eprintln!("{hogs} hog(s): base RSS {base_rss} KiB, peak {peak} KiB, {good_sessions} good sessions meanwhile");

    // Hanging up with replies pending must not hurt the server.
    for hog in conns {
        hog.stream.shutdown().unwrap();
    }
    for w in writers {
        let _ = w.join();
    }
    assert_serves(srv);
    (base_rss, peak)
}

#[test]
fn client_that_never_reads_replies_cannot_exhaust_memory() {
    let (_dir, _vol, mut srv) = setup("hog", 64 * MIB);
    let (_, peak) = hog_memory(&mut srv, 1);
    assert!(peak < 512 * 1024, "server RSS peaked at {peak} KiB with one non-reading client (limit 512 MiB)");
}

#[test]
fn unread_replies_respect_connection_inflight_limit() {
    // replicator/src/limits.rs: CONNECTION_INFLIGHT_BYTES_MAX (64 MiB) bounds
    // "read data read but not yet sent" per connection. Allow 2x for
    // allocator and socket overhead.
    const LIMIT_KIB: u64 = 64 * 1024;
    let (_dir, _vol, mut srv) = setup("hog3", 64 * MIB);
    let (base, peak) = hog_memory(&mut srv, 3);
    let growth = peak.saturating_sub(base);
    assert!(
        growth < 3 * 2 * LIMIT_KIB,
        "3 non-reading clients grew server RSS by {growth} KiB; 3 x 64 MiB in-flight limit allows at most {} KiB",
        3 * 2 * LIMIT_KIB
    );
}

#[test]
fn many_idle_connections_do_not_block_new_clients() {
    let (_dir, _vol, mut srv) = setup("idle", 16 * MIB);
    let addr = srv.addr();
    let mut idle = Vec::new();
    // 80 that never speak, 60 stuck mid-handshake, 60 idle in transmission.
    for _ in 0..80 {
        idle.push(Stream::tcp(addr).unwrap());
    }
    for _ in 0..60 {
        let mut s = Stream::tcp(addr).unwrap();
        s.write_all(&[0, 0]).unwrap();
        idle.push(s);
    }
    for _ in 0..60 {
        let start = Instant::now();
        idle.push(Client::connect(addr, "volume").unwrap().stream);
        assert!(start.elapsed() < Duration::from_secs(10), "handshake took {:?}", start.elapsed());
    }
    assert_eq!(idle.len(), 200);
    assert_serves(&mut srv);
    drop(idle);
    assert_serves(&mut srv);
}
