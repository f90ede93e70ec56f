//! Two real `replicator up` processes in two network namespaces: failover
//! after kill -9, link cuts with bitmap resync, split brain, hostile peers.
//! Needs root (namespaces, iptables).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tests::blocks::{pattern, version_of, BLOCK};
use tests::nbd::Client;
use tests::pair::{Pair, PairOptions, REPL_PORT};
use tests::{have_root, require_tools, TestDir};

fn setup(name: &str, opts: &PairOptions) -> Option<(TestDir, Pair)> {
    if !have_root("network namespaces and iptables") {
        return None;
    }
    if !tests::have_tools(&["ip", "iptables"]) {
        return None;
    }
    let dir = TestDir::new(name);
    let pair = Pair::new(&dir, opts).expect("two-host test network");
    Some((dir, pair))
}

/// Protocol C: every write acknowledged before the primary is killed with
/// SIGKILL reads back from the promoted secondary.
#[test]
fn kill_primary_then_every_acknowledged_write_survives_on_the_secondary() {
    let Some((_dir, mut pair)) = setup("repl-kill", &PairOptions::default()) else { return };
    pair.bring_up().unwrap();
    let blocks = 1024u64;
    let mut client = Client::connect(pair.nbd(0), "r0").unwrap();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut version = 0u64;
    // A stream of versioned writes; kill the primary part-way through.
    let kill_after = 1500;
    let mut killed = false;
    for i in 0..4000u64 {
        let block = (i * 7919) % blocks;
        version += 1;
        if i == kill_after {
            pair.kill(0);
            killed = true;
        }
        match client.write(block * BLOCK, &pattern(block, version)) {
            Ok(()) => {
                acked.insert(block, version);
            }
            Err(_) => break,
        }
    }
    assert!(killed, "the primary was killed mid-stream");
    assert!(acked.len() > 500, "only {} blocks acknowledged before the kill", acked.len());
    drop(client);

    pair.wait(1, Duration::from_secs(10), "b notices the primary is gone", |s| s["connection"] != "Connected").unwrap();
    pair.ok(1, &["primary"]).unwrap();
    let mut b = Client::connect(pair.nbd(1), "r0").unwrap();
    let mut checked = 0;
    for (block, want) in &acked {
        let bytes = b.read(block * BLOCK, BLOCK as u32).unwrap();
        let got = version_of(*block, &bytes);
        assert!(
            got.is_some_and(|v| v >= *want),
            "block {block}: acknowledged version {want} lost on the new primary (found {got:?})"
        );
        checked += 1;
    }
    assert_eq!(checked, acked.len());
}

/// A link cut while writing: the primary continues alone, and on
/// reconnect resends only the blocks written meanwhile.
#[test]
fn link_cut_resyncs_only_dirty_blocks_and_replicas_end_identical() {
    let Some((_dir, mut pair)) = setup("repl-cut", &PairOptions::default()) else { return };
    pair.bring_up().unwrap();
    let mut client = Client::connect(pair.nbd(0), "r0").unwrap();
    for block in 0..256 {
        client.write(block * BLOCK, &pattern(block, 1)).unwrap();
    }
    // Flushed: durable on both nodes, so the cut leaves nothing of these
    // to resend (unflushed writes would be, as the peer may lose them).
    client.flush().unwrap();
    let (a, b) = (pair.net.host(0), pair.net.host(1));
    a.cut(b).unwrap();
    // Writes during the cut: the first waits for the ping timeout, then the
    // primary goes on alone and tracks what the peer misses.
    let mut dirty = std::collections::BTreeSet::new();
    for i in 0..300u64 {
        let block = 1000 + (i * 37) % 2000;
        client.write(block * BLOCK, &pattern(block, 2 + i)).unwrap();
        dirty.insert(block);
    }
    pair.wait(0, Duration::from_secs(10), "primary alone", |s| s["connection"] != "Connected").unwrap();
    let sent_before = pair.number(0, "resync_sent_bytes");
    a.heal(b).unwrap();
    pair.wait_in_sync(Duration::from_secs(30)).unwrap();
    client.flush().unwrap();
    let resent = pair.number(0, "resync_sent_bytes") - sent_before;
    let dirty_bytes = dirty.len() as u64 * BLOCK;
    assert!(resent > 0, "nothing was resynced");
    assert!(resent <= dirty_bytes, "resync sent {resent} bytes for {} dirty blocks ({dirty_bytes} bytes)", dirty.len());
    drop(client);
    // Everything written lies in the first 16 MiB.
    let data_size = 16 << 20;
    let (da, db) = (pair.disk_data(0, data_size).unwrap(), pair.disk_data(1, data_size).unwrap());
    assert!(
        da == db,
        "replicas differ after resync (first difference at {:?})",
        tests::util::first_difference(&da, &db)
    );
}

/// Both sides primary while cut off: the reconnect detects split brain,
/// overwrites nothing, and `connect --discard-my-data` resolves it.
#[test]
fn split_brain_is_detected_and_resolved_with_discard_my_data() {
    let Some((_dir, mut pair)) = setup("repl-sb", &PairOptions::default()) else { return };
    pair.bring_up().unwrap();
    let (a, b) = (pair.net.host(0), pair.net.host(1));
    a.cut(b).unwrap();
    pair.wait(1, Duration::from_secs(10), "b alone", |s| s["connection"] != "Connected").unwrap();
    pair.wait(0, Duration::from_secs(10), "a alone", |s| s["connection"] != "Connected").unwrap();
    pair.ok(1, &["primary"]).unwrap();
    let mut ca = Client::connect(pair.nbd(0), "r0").unwrap();
    let mut cb = Client::connect(pair.nbd(1), "r0").unwrap();
    for block in 0..10 {
        ca.write(block * BLOCK, &pattern(block, 100)).unwrap();
    }
    for block in 20..30 {
        cb.write(block * BLOCK, &pattern(block, 200)).unwrap();
    }
    ca.flush().unwrap();
    cb.flush().unwrap();
    drop(cb);
    a.heal(b).unwrap();
    for i in 0..2 {
        // Both primary: each keeps retrying (the stale one is normally
        // demoted by its cluster manager) and says why it refuses.
        pair.wait(i, Duration::from_secs(15), "split brain detected", |s| {
            s["connection"] != "Connected" && s["last_error"].as_str().is_some_and(|e| e.contains("split brain"))
        })
        .unwrap();
    }
    // Nothing was overwritten.
    let a_disk = pair.disk_data(0, 128 << 10).unwrap();
    let b_disk = pair.disk_data(1, 128 << 10).unwrap();
    assert_eq!(version_of(3, &a_disk[3 * 4096..4 * 4096]), Some(100));
    assert_eq!(version_of(25, &b_disk[25 * 4096..26 * 4096]), Some(200));
    // The admin keeps a's data: b was promoted later (newer epoch), so a's
    // epoch is raised first, then b gives up its changes.
    pair.ok(0, &["primary", "--epoch", "10"]).unwrap();
    pair.ok(1, &["secondary"]).unwrap();
    pair.ok(1, &["connect", "--discard-my-data"]).unwrap();
    pair.ok(0, &["connect"]).unwrap();
    pair.wait_in_sync(Duration::from_secs(30)).unwrap();
    let b_disk = pair.disk_data(1, 128 << 10).unwrap();
    assert_eq!(version_of(3, &b_disk[3 * 4096..4 * 4096]), Some(100), "a's change reached b");
    assert_eq!(version_of(25, &b_disk[25 * 4096..26 * 4096]), None, "b's change was discarded");
    let a_disk = pair.disk_data(0, 128 << 10).unwrap();
    assert_eq!(a_disk, b_disk);
    drop(ca);
}

/// Garbage and a frame with a bad checksum on the replication port are
/// dropped without harm; the real peer connects afterwards.
#[test]
fn corrupt_frames_are_refused_and_the_node_stays_up() {
    let Some((_dir, mut pair)) = setup("repl-corrupt", &PairOptions::default()) else { return };
    pair.start(1).unwrap();
    let addr = std::net::SocketAddr::from((pair.net.host(1).ip, REPL_PORT));
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(&[0xa5; 4096]).unwrap();
    let mut sink = Vec::new();
    garbage.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = garbage.read_to_end(&mut sink);
    pair.server(1).logs.wait_for("bad frame from the peer", Duration::from_secs(10)).unwrap();

    // A well-formed Ping header whose crc is wrong.
    let mut header = [0u8; 56];
    header[..4].copy_from_slice(b"RPL1");
    header[4] = 2; // the replication protocol's version (`wire::VERSION`)
    header[5] = 15;
    header[52..].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    let mut bad_crc = TcpStream::connect(addr).unwrap();
    bad_crc.write_all(&header).unwrap();
    bad_crc.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = bad_crc.read_to_end(&mut sink);
    pair.server(1).logs.wait_for("checksum mismatch", Duration::from_secs(10)).unwrap();

    pair.start(0).unwrap();
    pair.wait(0, Duration::from_secs(10), "the real peer connects", |s| s["connection"] == "Connected").unwrap();
}

/// Mutual TLS: a node holding a certificate for another name, or one from
/// another CA, is refused before any frame is read; the right peer works.
#[test]
fn tls_link_refuses_wrong_certificates_and_accepts_the_peer() {
    if !have_root("network namespaces") {
        return;
    }
    require_tools!("ip");
    let dir = TestDir::new("repl-tls");
    let pki = dir.join("pki");
    tests::tls::make_node_pki(&pki, &["a", "b", "mallory"]).unwrap();
    let other_ca = dir.join("other");
    tests::tls::make_node_pki(&other_ca, &["a"]).unwrap();
    let opts = PairOptions { pki: Some(pki.clone()), ..PairOptions::default() };
    let mut pair = Pair::new(&dir, &opts).unwrap();
    pair.start(1).unwrap();

    // Node a presenting mallory's certificate (right CA, wrong name).
    let text = std::fs::read_to_string(&pair.res).unwrap();
    let mallory = dir.join("mallory.toml");
    std::fs::write(
        &mallory,
        text.replace(&pki.join("a.pem").display().to_string(), &pki.join("mallory.pem").display().to_string())
            .replace(&pki.join("a.key").display().to_string(), &pki.join("mallory.key").display().to_string()),
    )
    .unwrap();
    pair.start_with(0, &mallory).unwrap();
    pair.server(1).logs.wait_for("is not for node \"a\"", Duration::from_secs(10)).unwrap();
    pair.kill(0);

    // Node a with a certificate from another CA.
    let foreign = dir.join("foreign.toml");
    std::fs::write(
        &foreign,
        text.replace(&pki.join("a.pem").display().to_string(), &other_ca.join("a.pem").display().to_string())
            .replace(&pki.join("a.key").display().to_string(), &other_ca.join("a.key").display().to_string()),
    )
    .unwrap();
    pair.start_with(0, &foreign).unwrap();
    pair.server(1).logs.wait_for("TLS handshake with the peer failed", Duration::from_secs(10)).unwrap();
    assert_ne!(pair.field(1, "connection"), "Connected");
    // The dialling node says so too, in its log and its status (issue 19:
    // it used to log nothing at the default level). Under TLS 1.3 it learns
    // of the refusal from b's alert.
    pair.server(0).logs.wait_for("the link to b was closed by a TLS alert", Duration::from_secs(10)).unwrap();
    pair.wait(0, Duration::from_secs(10), "a shows the failed handshake", |s| {
        s["link_failure"].as_str().is_some_and(|f| f.contains("TLS alert"))
    })
    .unwrap();
    assert!(pair.field(1, "link_failure").contains("TLS handshake"), "b's status names the failed handshake");
    pair.kill(0);

    // Node a trusting another CA: it cannot verify b's certificate.
    let wrong_ca = dir.join("wrong-ca.toml");
    std::fs::write(
        &wrong_ca,
        text.replace(&pki.join("ca.pem").display().to_string(), &other_ca.join("ca.pem").display().to_string()),
    )
    .unwrap();
    pair.start_with(0, &wrong_ca).unwrap();
    pair.server(0).logs.wait_for("certificate", Duration::from_secs(10)).unwrap();
    pair.wait(0, Duration::from_secs(10), "a shows why it cannot connect", |s| {
        s["link_failure"].as_str().is_some_and(|f| f.contains("connecting to b") && f.contains("TLS"))
    })
    .unwrap();
    let out = pair.ok(0, &["status"]).unwrap();
    assert!(out.stdout.contains("last link failure"), "{}", out.stdout);
    pair.kill(0);

    pair.start(0).unwrap();
    pair.wait(0, Duration::from_secs(10), "TLS peer connects", |s| s["connection"] == "Connected").unwrap();
    pair.ok(0, &["primary", "--force"]).unwrap();
    pair.wait_in_sync(Duration::from_secs(60)).unwrap();
    let mut c = Client::connect(pair.nbd(0), "r0").unwrap();
    c.write(0, &pattern(0, 7)).unwrap();
    c.flush().unwrap();
    let b = pair.disk_data(1, 4096).unwrap();
    assert_eq!(version_of(0, &b), Some(7), "a write replicated over TLS");
}

/// A secondary refuses NBD clients; demotion is refused while a client is
/// connected; a planned switchover moves the writable role.
#[test]
fn secondary_refuses_clients_and_switchover_moves_the_primary() {
    let Some((_dir, mut pair)) = setup("repl-roles", &PairOptions::default()) else { return };
    pair.bring_up().unwrap();
    let refused = Client::connect(pair.nbd(1), "r0");
    assert!(refused.is_err(), "the secondary served an NBD client");
    let metrics = pair.metrics(0).unwrap();
    assert!(metrics.contains("replicator_resource_primary{resource=\"r0\"} 1"), "{metrics}");
    assert!(metrics.contains("replicator_resource_peer_disk_up_to_date{resource=\"r0\"} 1"), "{metrics}");
    assert!(pair.metrics(1).unwrap().contains("replicator_resource_primary{resource=\"r0\"} 0"));
    let client = Client::connect(pair.nbd(0), "r0").unwrap();
    let out = pair.admin(0, &["secondary"]).unwrap();
    assert!(!out.success() && out.stderr.contains("NBD client"), "{}", out.describe());
    let out = pair.admin(1, &["primary"]).unwrap();
    assert!(!out.success() && out.stderr.contains("peer is primary"), "{}", out.describe());
    drop(client);
    tests::wait_until(Duration::from_secs(5), "client gone", || {
        pair.admin(0, &["secondary"]).is_ok_and(|o| o.success())
    })
    .unwrap();
    pair.ok(1, &["primary"]).unwrap();
    let mut c = Client::connect(pair.nbd(1), "r0").unwrap();
    c.write(8192, &pattern(2, 9)).unwrap();
    c.flush().unwrap();
    let a = pair.disk_data(0, 3 * 4096).unwrap();
    assert_eq!(version_of(2, &a[8192..]), Some(9), "the new primary replicates to the old one");

    // suspend-io (the cluster manager's freeze) holds writes unanswered
    // until resume-io; the secondary refuses it.
    let out = pair.admin(0, &["suspend-io"]).unwrap();
    assert!(!out.success() && out.stderr.contains("not primary"), "{}", out.describe());
    pair.ok(1, &["suspend-io"]).unwrap();
    assert_eq!(pair.state(1).unwrap()["suspended"], true);
    c.stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let handle = c.send(1, 0, 12288, 4096, &pattern(3, 10)).unwrap();
    assert!(c.recv(|_| 0).is_err(), "a write was answered while I/O was suspended");
    pair.ok(1, &["resume-io"]).unwrap();
    c.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let reply = c.recv(|_| 0).unwrap();
    assert_eq!((reply.handle, reply.error), (handle, 0), "the held write completes after resume-io");
}

/// Online verify finds a block corrupted behind the secondary's back and the
/// primary repairs it; invalidate resyncs everything from the peer.
#[test]
fn verify_finds_and_repairs_a_corrupted_block_and_invalidate_resyncs() {
    let Some((_dir, mut pair)) = setup("repl-verify", &PairOptions::default()) else { return };
    pair.bring_up().unwrap();
    let mut c = Client::connect(pair.nbd(0), "r0").unwrap();
    for block in 0..64 {
        c.write(block * BLOCK, &pattern(block, 5)).unwrap();
    }
    c.flush().unwrap();
    // Corrupt block 40 on b's disk directly.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&pair.disks[1]).unwrap();
        f.write_all_at(&[0xee; 4096], 40 * BLOCK).unwrap();
        f.sync_all().unwrap();
    }
    pair.ok(0, &["verify"]).unwrap();
    pair.wait(0, Duration::from_secs(60), "verify done", |s| {
        s["connection"] == "Connected" && s["verify_out_of_sync_bytes"].as_u64().unwrap_or(0) > 0
    })
    .unwrap();
    // The differing 1 MiB chunk is checked again granule by granule: only
    // the corrupted 4 KiB block is reported (and resent).
    assert_eq!(pair.number(0, "verify_out_of_sync_bytes"), BLOCK, "one granule differs");
    pair.wait_in_sync(Duration::from_secs(30)).unwrap();
    pair.wait(0, Duration::from_secs(30), "repaired", |s| s["out_of_sync_bytes"] == 0).unwrap();
    let b = pair.disk_data(1, 64 * BLOCK).unwrap();
    assert_eq!(version_of(40, &b[40 * 4096..41 * 4096]), Some(5), "the primary's block was resent");

    // Invalidate the secondary: a full resync brings everything back.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&pair.disks[1]).unwrap();
        f.write_all_at(&[0x11; 8192], 10 * BLOCK).unwrap();
        f.sync_all().unwrap();
    }
    let received_before = pair.number(1, "resync_received_bytes");
    pair.ok(1, &["invalidate"]).unwrap();
    pair.wait(1, Duration::from_secs(10), "resync starts", |s| s["disk"] != "UpToDate").ok();
    pair.wait_in_sync(Duration::from_secs(60)).unwrap();
    assert!(pair.number(1, "resync_received_bytes") - received_before >= 60 << 20, "a full resync ran");
    let (a, b) = (pair.disk_data(0, 16 << 20).unwrap(), pair.disk_data(1, 16 << 20).unwrap());
    assert!(a == b, "replicas differ after invalidate");
    drop(c);
}

/// Protocols A and B replicate too (C is covered above).
#[test]
fn protocols_a_and_b_replicate_writes_and_flushes() {
    for protocol in ["A", "B"] {
        let opts = PairOptions { protocol, ..PairOptions::default() };
        let Some((_dir, mut pair)) = setup(&format!("repl-proto-{protocol}"), &opts) else { return };
        pair.bring_up().unwrap();
        let mut c = Client::connect(pair.nbd(0), "r0").unwrap();
        for block in 0..200 {
            c.write(block * BLOCK, &pattern(block, 3)).unwrap();
        }
        c.flush().unwrap();
        // A flush does not wait for the peer's disk under protocol A; the
        // peer's acks drain the writes soon after.
        pair.wait(0, Duration::from_secs(10), "writes acknowledged", |s| s["writes_in_flight"] == 0).unwrap();
        let b = pair.disk_data(1, 200 * BLOCK).unwrap();
        for block in 0..200u64 {
            let at = (block * BLOCK) as usize;
            assert_eq!(version_of(block, &b[at..at + 4096]), Some(3), "protocol {protocol}: block {block}");
        }
        assert_eq!(pair.field(0, "protocol"), protocol);
    }
}

/// The whole storage stack: `replicator attach RES` on the primary (FUSE +
/// loop here), ext4 on the replicated volume, files written with fsync;
/// after unmount and detach the secondary's disk holds the same bytes.
#[test]
fn attach_by_resource_name_puts_ext4_on_the_replicated_volume() {
    if !std::path::Path::new("/dev/fuse").exists() && !tests::skip("/dev/fuse missing") {
        return;
    }
    require_tools!("mkfs.ext4", "mount", "umount", "losetup");
    let Some((dir, mut pair)) = setup("repl-attach", &PairOptions::default()) else { return };
    // The resource file asks for the kernel path, which this host lacks
    // (no nbd module in CI's kernel); --method overrides it.
    let text = std::fs::read_to_string(&pair.res).unwrap();
    std::fs::write(&pair.res, text.replace("name = \"a\"\n", "name = \"a\"\nattach-method = \"kernel\"\n")).unwrap();
    pair.bring_up().unwrap();
    let run_dir = dir.join("run");
    let attach = |method: Option<&str>| {
        let mut c = tests::replicator();
        c.args(["attach"]).arg(&pair.res).args(["--node", "a", "--timeout", "20", "--run-dir"]).arg(&run_dir);
        if let Some(m) = method {
            c.args(["--method", m]);
        }
        tests::util::run_output(&mut c, Duration::from_secs(60)).unwrap()
    };
    if !std::path::Path::new("/sys/module/nbd").exists() {
        let refused = attach(None);
        assert!(!refused.success(), "the configured kernel path attached without nbd: {}", refused.describe());
    }
    let out = attach(Some("fuse"));
    assert!(out.success(), "{}", out.describe());
    let device = out.stdout.trim().to_string();
    assert!(device.starts_with("/dev/loop"), "attach printed {device:?}");
    let detach = |force: bool| {
        let mut c = tests::replicator();
        c.args(["detach", &device]).arg("--run-dir").arg(&run_dir);
        if force {
            c.arg("--force");
        }
        tests::run(&mut c)
    };
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let result = (|| -> anyhow::Result<()> {
        tests::run(&mut tests::cmd("mkfs.ext4", ["-q", "-F", &device]))?;
        tests::run(tests::cmd("mount", [device.as_str()]).arg(&mnt))?;
        let data = tests::random_bytes(3 << 20, 42);
        std::fs::write(mnt.join("mail.bin"), &data)?;
        std::fs::File::open(mnt.join("mail.bin"))?.sync_all()?;
        tests::run(tests::cmd("umount", Vec::<String>::new()).arg(&mnt))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = tests::run(tests::cmd("umount", Vec::<String>::new()).arg(&mnt));
    }
    let detached = detach(result.is_err());
    result.unwrap();
    detached.unwrap();
    pair.wait(0, Duration::from_secs(10), "writes settled", |s| s["writes_in_flight"] == 0).unwrap();
    let (a, b) = (pair.disk_data(0, 48 << 20).unwrap(), pair.disk_data(1, 48 << 20).unwrap());
    assert!(a.iter().any(|x| *x != 0), "the filesystem reached the disk");
    assert!(a == b, "the secondary's disk differs (first difference at {:?})", tests::util::first_difference(&a, &b));
}

/// Idle TCP connections from a third host, held open and reopened as the
/// listener closes them, neither delay the peer's first connection nor its
/// reconnection (issue 19: handshakes ran one at a time, each waiting out
/// its timeout, so 8 idle connections delayed the peer by 50 s).
#[test]
fn idle_connections_from_another_host_do_not_keep_the_peer_out() {
    if !have_root("network namespaces") {
        return;
    }
    require_tools!("ip");
    let dir = TestDir::new("repl-idle");
    let pki = dir.join("pki");
    tests::tls::make_node_pki(&pki, &["a", "b"]).unwrap();
    let opts = PairOptions { pki: Some(pki), ..PairOptions::default() };
    let mut pair = Pair::new(&dir, &opts).unwrap();
    pair.start(1).unwrap();
    // The test process is the third host (it reaches b through the bridge).
    let addr = std::net::SocketAddr::from((pair.net.host(1).ip, REPL_PORT));
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let connect = move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok();
    let mut idle: Vec<Option<TcpStream>> = (0..50).map(|_| connect()).collect();
    assert!(idle.iter().filter(|c| c.is_some()).count() >= 40, "the listener accepts connections");
    let holder = std::thread::spawn(move || {
        let mut reopened = 0u64;
        // Reopen every connection the listener closed, until told to stop.
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(Duration::from_millis(50)) {
            for slot in idle.iter_mut() {
                let open = slot.as_ref().is_some_and(|c| {
                    let mut byte = [0u8; 1];
                    c.set_nonblocking(true).is_ok()
                        && matches!(c.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                if !open {
                    *slot = connect();
                    reopened += 1;
                }
            }
        }
        reopened
    });
    let _stop = tests::util::Guard::new(move || drop(stop_tx));

    pair.start(0).unwrap();
    pair.wait(0, Duration::from_secs(5), "the peer connects past 50 idle connections", |s| {
        s["connection"] == "Connected"
    })
    .unwrap();
    for round in 0..2 {
        pair.ok(0, &["disconnect"]).unwrap();
        pair.wait(1, Duration::from_secs(10), "b sees the peer go", |s| s["connection"] != "Connected").unwrap();
        pair.ok(0, &["connect"]).unwrap();
        pair.wait(0, Duration::from_secs(5), &format!("reconnect {round} past idle connections"), |s| {
            s["connection"] == "Connected"
        })
        .unwrap();
    }
    pair.server(1).logs.wait_for("unauthenticated connections from this address", Duration::from_secs(5)).unwrap();
    drop(_stop);
    let reopened = holder.join().unwrap();
    assert!(reopened > 0, "the listener closed surplus idle connections");
}

/// `status` names a peer that never connected by its name in the resource
/// file, and a reader that goes away (`status | head -1`) is no panic.
#[test]
fn status_names_an_absent_peer_and_survives_a_closed_pipe() {
    let Some((_dir, mut pair)) = setup("repl-status", &PairOptions::default()) else { return };
    pair.start(0).unwrap();
    pair.wait(0, Duration::from_secs(10), "a is up", |s| s["connection"] != "").unwrap();
    let out = pair.ok(0, &["status"]).unwrap();
    assert!(out.stdout.contains("\n  b connection:"), "the peer is named: {}", out.stdout);
    for json in [false, true] {
        let mut c = pair.admin_cmd(0, &["status"]);
        if json {
            c.arg("--json");
        }
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        // Close the reading end before the command can write.
        drop(child.stdout.take());
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let status = tests::util::wait_child(&mut child, Duration::from_secs(30)).unwrap();
        assert!(status.success() && !stderr.contains("panicked"), "status into a closed pipe: {status}: {stderr}");
    }
}

/// `replicator down RES` stops a node cleanly (like `drbdadm down`): refused
/// while an NBD client is connected, then the process persists its state
/// and exits 0, and the resource comes back up in sync.
#[test]
fn down_stops_a_node_cleanly_and_is_refused_while_clients_are_connected() {
    let Some((dir, mut pair)) = setup("repl-down", &PairOptions::default()) else { return };
    pair.bring_up().unwrap();
    let mut client = Client::connect(pair.nbd(0), "r0").unwrap();
    client.write(0, &pattern(0, 4)).unwrap();
    let out = pair.admin(0, &["down"]).unwrap();
    assert!(!out.success() && out.stderr.contains("NBD client"), "{}", out.describe());
    drop(client);
    tests::wait_until(Duration::from_secs(10), "down once the client is gone", || {
        pair.admin(0, &["down"]).is_ok_and(|o| o.success() && o.stdout.contains("r0: down"))
    })
    .unwrap();
    let node = pair.nodes[0].as_mut().unwrap();
    tests::wait_until(Duration::from_secs(10), "a's up exits by itself", || !node.is_running()).unwrap();
    // Already exited: this only reads the exit status.
    let status = node.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "up exited with {status}; log:\n{}", node.logs.text());
    assert!(!dir.join("a.ctl").exists(), "the control socket is removed");
    pair.wait(1, Duration::from_secs(10), "b sees a go", |s| s["connection"] != "Connected").unwrap();
    pair.ok(1, &["down"]).unwrap();

    pair.start(0).unwrap();
    pair.start(1).unwrap();
    pair.wait_in_sync(Duration::from_secs(30)).unwrap();
    assert_eq!(pair.field(0, "role"), "Primary", "a clean down keeps the role");
    assert_eq!(version_of(0, &pair.disk_data(1, 4096).unwrap()), Some(4));
}

/// `on-congestion = "pull-ahead"` (protocol A) over a link much slower
/// than the disk: writes keep going, the primary shows Ahead and the
/// secondary Behind and Outdated; once the link is fast again, the resync
/// sends what was only marked and the replicas end identical.
#[test]
fn pull_ahead_keeps_writes_going_over_a_slow_link_and_resyncs_after() {
    let opts = PairOptions {
        protocol: "A",
        net: "ping-interval-ms = 300\nping-timeout-ms = 600\nconnect-interval-ms = 200\nio-timeout-ms = 3000\n\
              on-congestion = \"pull-ahead\"\nsend-queue-kib = 256",
        ..PairOptions::default()
    };
    let Some((_dir, mut pair)) = setup("repl-pull-ahead", &opts) else { return };
    if !tests::have_tools(&["tc"]) {
        return;
    }
    pair.bring_up().unwrap();
    let a = pair.net.host(0);
    let throttle = |args: &[&str]| {
        let out = tests::util::run_output(&mut a.cmd("tc", args), tests::util::CMD_TIMEOUT).unwrap();
        assert!(out.success(), "tc {args:?}: {}", out.describe());
    };
    // Only the replication link (to the peer's port) is slowed: the NBD
    // client's replies leave by the same interface and must not queue
    // behind it.
    throttle(&["qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10", "r2q", "100000"]);
    throttle(&["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit"]);
    throttle(&[
        "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb", "rate", "2mbit", "ceil", "2mbit",
    ]);
    let port = REPL_PORT.to_string();
    throttle(&[
        "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "dport",
        &port, "0xffff", "flowid", "1:20",
    ]);
    let mut client = Client::connect(pair.nbd(0), "r0").unwrap();
    let blocks = 2048u64; // 8 MiB: half a minute at 2 Mbit/s
                          // Sampled while writing: the link drains the send queue in about a
                          // second, after which the resync of the marks may already run.
    let mut seen = std::collections::BTreeSet::new();
    for block in 0..blocks {
        client.write(block * BLOCK, &pattern(block, 5)).unwrap();
        if block % 64 == 0 {
            let s = pair.state(0).unwrap();
            seen.insert((s["connection"].to_string(), s["peer_disk"].to_string()));
        }
    }
    assert!(
        seen.contains(&("\"Ahead\"".into(), "\"Outdated\"".into())),
        "the primary never pulled ahead (states seen: {seen:?})"
    );
    pair.wait(1, Duration::from_secs(30), "Behind and Outdated", |s| {
        s["connection"] == "Behind" && s["disk"] == "Outdated"
    })
    .unwrap();
    throttle(&["qdisc", "del", "dev", "eth0", "root"]);
    pair.wait_in_sync(Duration::from_secs(60)).unwrap();
    client.flush().unwrap();
    pair.wait(0, Duration::from_secs(10), "writes acknowledged", |s| s["writes_in_flight"] == 0).unwrap();
    drop(client);
    let size = blocks * BLOCK;
    let (da, db) = (pair.disk_data(0, size).unwrap(), pair.disk_data(1, size).unwrap());
    assert!(
        da == db,
        "replicas differ after the resync (first difference at {:?})",
        tests::util::first_difference(&da, &db)
    );
}

/// Issue 23 (found by the README failover test): a primary cut off under
/// `resource-and-stonith`, whose fence handler cannot confirm, holds its
/// client's write suspended. Its cluster manager must still be able to
/// demote it while that client is connected (the client waits on exactly
/// that write): the held write fails instead of hanging for ever.
#[test]
fn a_suspended_primary_demotes_with_its_client_still_connected() {
    let opts = PairOptions {
        resource: "fencing = \"resource-and-stonith\"",
        net: "ping-interval-ms = 300\nping-timeout-ms = 600\nconnect-interval-ms = 200\nio-timeout-ms = 3000\n\n\
              [handlers]\nfence-peer = \"/bin/false\"",
        ..PairOptions::default()
    };
    let Some((_dir, mut pair)) = setup("repl-held-demote", &opts) else { return };
    pair.bring_up().unwrap();
    let mut client = Client::connect(pair.nbd(0), "r0").unwrap();
    client.write(0, &pattern(0, 1)).unwrap();
    let (a, b) = (pair.net.host(0), pair.net.host(1));
    a.cut(b).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(client.write(BLOCK, &pattern(1, 2)).map_err(|e| e.to_string()));
    });
    pair.wait(0, Duration::from_secs(10), "I/O suspended by fencing", |s| s["suspended"] == true).unwrap();
    assert!(rx.try_recv().is_err(), "the write is held, not answered");
    pair.ok(0, &["secondary"]).expect("a suspended primary demotes with its client connected");
    let held = rx.recv_timeout(Duration::from_secs(10)).expect("the held write is answered after the demotion");
    assert!(held.is_err(), "a write that was never replicated fails: {held:?}");
    assert_eq!(pair.field(0, "role"), "Secondary");
}
