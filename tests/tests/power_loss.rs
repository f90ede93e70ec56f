//! Power loss with real processes (issue 19). Each node's backing file (and
//! external metadata) lives on its own `LazyFs`, which keeps written data
//! in memory until fsync and drops what was never synced when the node
//! "loses power": kill -9 alone proves nothing here, since a killed
//! process's page cache survives in the shared kernel.
//!
//! The scenario, for internal and external metadata: a writer with logged
//! acknowledgements and periodic FLUSHes on the primary; the secondary
//! loses power mid-burst, restarts and resyncs; the replicas are compared
//! byte for byte; then the primary loses power, the secondary is promoted
//! and every acknowledged write reads back (protocol C; a FLUSHed one in
//! any case); the old primary returns, resyncs, and the replicas are
//! identical again. Needs root (namespaces, mount(2)) and /dev/fuse.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tests::blocks::{pattern, version_of, BLOCK};
use tests::lazyfs::LazyFs;
use tests::nbd::Client;
use tests::pair::{Pair, PairOptions, NAMES};
use tests::server::replicator;
use tests::{have_root, run, TestDir};

const SIZE: u64 = 16 << 20;
const BLOCKS: u64 = 1024;

/// The version in a block (0: never written), if it holds a whole pattern.
fn version_in(block: u64, bytes: &[u8]) -> Option<u64> {
    if bytes.iter().all(|b| *b == 0) {
        return Some(0);
    }
    version_of(block, bytes)
}

/// The client's log: per block, the last acknowledged version, and the
/// version the last completed FLUSH covered.
#[derive(Default)]
struct Log {
    version: u64,
    acked: BTreeMap<u64, u64>,
    flushed: BTreeMap<u64, u64>,
}

impl Log {
    /// `n` writes, a FLUSH after every `flush_every` (0: none).
    fn write(&mut self, client: &mut Client, n: u64, flush_every: u64) {
        for i in 0..n {
            self.version += 1;
            let block = (self.version * 7919) % BLOCKS;
            client.write(block * BLOCK, &pattern(block, self.version)).expect("write on a live primary");
            self.acked.insert(block, self.version);
            if flush_every > 0 && (i + 1) % flush_every == 0 {
                let snapshot = self.acked.clone();
                client.flush().expect("flush on a live primary");
                self.flushed = snapshot;
            }
        }
    }
}

struct Rig {
    _dir: TestDir,
    pair: Pair,
    fs: [LazyFs; 2],
    /// The exported size: the data area, without internal metadata.
    export_bytes: u64,
}

/// Two hosts whose disks (and, if `external`, metadata) live on LazyFs.
fn rig(name: &str, external: bool) -> Option<Rig> {
    if !have_root("network namespaces and FUSE mounts") || !tests::have_tools(&["ip", "iptables", "umount"]) {
        return None;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: /dev/fuse missing");
        return None;
    }
    let dir = TestDir::new(name);
    let opts = PairOptions { size_bytes: SIZE, ..PairOptions::default() };
    let mut pair = Pair::new(&dir, &opts).expect("two-host test network");
    let fs = [
        LazyFs::mount(&dir.join("lazy-a")).expect("LazyFs for a"),
        LazyFs::mount(&dir.join("lazy-b")).expect("LazyFs for b"),
    ];
    let mut res = std::fs::read_to_string(&pair.res).expect("resource file");
    for (i, fs) in fs.iter().enumerate() {
        let disk = fs.path("disk.img");
        std::fs::File::create(&disk).and_then(|f| f.set_len(SIZE)).expect("disk on LazyFs");
        let mut c = replicator();
        c.arg("create-md").arg("--disk").arg(&disk);
        let meta = fs.path("meta.img");
        if external {
            c.arg("--meta").arg(&meta);
        }
        let out = run(&mut c).expect("create-md");
        assert!(out.success(), "create-md on LazyFs: {}", out.describe());
        let old = format!("disk = \"{}\"", pair.disks[i].display());
        let mut new = format!("disk = \"{}\"", disk.display());
        if external {
            new.push_str(&format!("\nmeta = \"{}\"", meta.display()));
        }
        assert!(res.contains(&old), "resource file names {}", pair.disks[i].display());
        res = res.replace(&old, &new);
        pair.disks[i] = disk;
    }
    let res_path = dir.join("r0-lazyfs.toml");
    std::fs::write(&res_path, res).expect("resource file");
    pair.res = res_path;
    Some(Rig { _dir: dir, pair, fs, export_bytes: 0 })
}

impl Rig {
    /// SIGKILL node `i` and drop its unsynced data, as a power cut does.
    fn power_cut(&mut self, i: usize, seed: u64) {
        let unsynced = self.fs[i].unsynced_pages();
        self.pair.kill(i);
        let cut = self.fs[i].power_cut(seed, true);
        eprintln!("power cut on {}: {unsynced} unsynced pages, {cut:?}", NAMES[i]);
        assert!(unsynced > 0, "the cut on {} caught data in flight (else it proves nothing)", NAMES[i]);
    }

    fn data(&self, i: usize) -> Vec<u8> {
        let mut bytes = self.fs[i].contents("disk.img").expect("disk contents");
        bytes.truncate(self.export_bytes as usize);
        bytes
    }

    fn assert_identical(&self, when: &str) {
        let (a, b) = (self.data(0), self.data(1));
        assert!(
            a.len() as u64 >= BLOCKS * BLOCK && a.len() == b.len(),
            "{when}: data areas of {} and {}",
            a.len(),
            b.len()
        );
        let differ: Vec<u64> = (0..self.export_bytes / BLOCK)
            .filter(|blk| {
                let r = (*blk * BLOCK) as usize..((*blk + 1) * BLOCK) as usize;
                a[r.clone()] != b[r]
            })
            .collect();
        assert!(differ.is_empty(), "{when}: replicas differ in blocks {differ:?}");
    }
}

fn check_reads(client: &mut Client, log: &Log, protocol_c: bool) {
    for block in 0..BLOCKS {
        let bytes = client.read(block * BLOCK, BLOCK as u32).expect("read");
        let got = version_in(block, &bytes);
        let flushed = log.flushed.get(&block).copied().unwrap_or(0);
        assert!(got.is_some_and(|v| v >= flushed), "block {block}: flushed version {flushed} lost (found {got:?})");
        if protocol_c {
            let acked = log.acked.get(&block).copied().unwrap_or(0);
            assert!(
                got.is_some_and(|v| v >= acked),
                "block {block}: acknowledged version {acked} lost (found {got:?})"
            );
        }
    }
}

fn scenario(name: &str, external: bool) {
    let Some(mut rig) = rig(name, external) else { return };
    rig.pair.bring_up().expect("initial sync on LazyFs");
    let mut log = Log::default();
    let mut client = Client::connect(rig.pair.nbd(0), "r0").expect("client on a");
    rig.export_bytes = client.size();

    // The secondary loses power in the middle of an unflushed burst.
    log.write(&mut client, 400, 50);
    log.write(&mut client, 40, 0);
    rig.power_cut(1, 1);
    log.write(&mut client, 200, 50);
    rig.pair.start(1).expect("b restarts");
    rig.pair.wait_in_sync(Duration::from_secs(60)).expect("b resyncs after its power loss");
    rig.assert_identical("after the secondary's power loss and resync");

    // Now the primary: the secondary takes over with every acknowledged write.
    log.write(&mut client, 300, 50);
    log.write(&mut client, 40, 0);
    drop(client);
    rig.power_cut(0, 2);
    rig.pair
        .wait(1, Duration::from_secs(10), "b notices the primary is gone", |s| s["connection"] != "Connected")
        .expect("link loss noticed");
    rig.pair.ok(1, &["primary"]).expect("b promoted");
    let mut client = Client::connect(rig.pair.nbd(1), "r0").expect("client on b");
    check_reads(&mut client, &log, true);
    log.write(&mut client, 100, 25);

    // The old primary returns after its power loss and becomes a secondary.
    rig.pair.start(0).expect("a restarts");
    rig.pair.wait_in_sync(Duration::from_secs(60)).expect("a resyncs from b");
    rig.assert_identical("after the primary's power loss and resync");
    check_reads(&mut client, &log, true);
}

#[test]
fn power_loss_of_either_node_keeps_acknowledged_writes_and_identical_replicas() {
    scenario("power-internal", false);
}

#[test]
fn power_loss_with_external_metadata_keeps_acknowledged_writes_and_identical_replicas() {
    scenario("power-external", true);
}

/// The secondary in a qemu TCG guest, its disk a virtio device: killing
/// qemu during writes is a real power loss (the guest's page cache is
/// gone). After it restarts and resyncs, both replicas are identical.
#[test]
fn power_loss_of_a_secondary_in_a_vm_keeps_the_replicas_identical() {
    let Some(kver) = tests::vm::prerequisites("a replicated pair with a qemu guest") else { return };
    let dir = TestDir::new("power-vm");
    let initrd = tests::vm::build_initramfs(&dir, &kver);
    let (host_disk, guest_disk) = (dir.join("host.img"), dir.join("guest.img"));
    for disk in [&host_disk, &guest_disk] {
        std::fs::File::create(disk).and_then(|f| f.set_len(SIZE)).expect("disk image");
        let out = run(replicator().arg("create-md").arg("--disk").arg(disk)).expect("create-md");
        assert!(out.success(), "create-md: {}", out.describe());
    }
    let link_port = tests::server::free_port().expect("a free port");
    let nbd_port = tests::server::free_port().expect("a free port");
    // The guest (id 0) dials; the host (id 1) listens on the port qemu
    // forwards. The guest's own address is never dialled.
    let res = format!(
        "[resource]\nname = \"r0\"\nprotocol = \"C\"\n\n[net]\ntls = \"plaintext-lab\"\nping-interval-ms = 300\n\
         ping-timeout-ms = 1500\nconnect-interval-ms = 200\nio-timeout-ms = 6000\n\n\
         [[node]]\nname = \"g\"\nid = 0\naddress = \"127.0.0.1:9\"\ndisk = \"{guest}\"\n\
         nbd-listen = [\"127.0.0.1:9\"]\ncontrol = \"{dir}/g.ctl\"\n\n\
         [[node]]\nname = \"h\"\nid = 1\naddress = \"127.0.0.1:{link_port}\"\ndisk = \"{host}\"\n\
         nbd-listen = [\"127.0.0.1:{nbd_port}\"]\ncontrol = \"{dir}/h.ctl\"\n",
        guest = guest_disk.display(),
        host = host_disk.display(),
        dir = dir.path().display(),
    );
    let res_path = dir.join("r0.toml");
    std::fs::write(&res_path, res).expect("resource file");
    let admin = |args: &[&str]| {
        let mut c = replicator();
        c.args(args).arg(&res_path).args(["--node", "h"]);
        run(&mut c).expect("replicator admin command")
    };
    let state = || -> serde_json::Value {
        let out = admin(&["status", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out.stdout).ok().map(|v| v["state"].clone()).unwrap_or_default()
    };
    let in_sync = |s: &serde_json::Value| {
        s["connection"] == "Connected" && s["disk"] == "UpToDate" && s["peer_disk"] == "UpToDate"
    };
    let host = tests::Server::spawn(["up".into(), res_path.as_os_str().to_owned(), "--node".into(), "h".into()])
        .expect("replicator up on the host");

    let guest = tests::vm::boot(&kver, &initrd, link_port, "repl-secondary", &[], Some(&guest_disk));
    tests::wait_until(tests::vm::GUEST_DEADLINE, "the guest connects", || state()["connection"] == "Connected")
        .expect("the guest connects");
    let out = admin(&["primary", "--force"]);
    assert!(out.success(), "primary --force: {}", out.describe());
    tests::wait_until(tests::vm::GUEST_DEADLINE, "initial sync", || in_sync(&state())).expect("initial sync");

    let mut log = Log::default();
    let mut client = Client::connect(format!("127.0.0.1:{nbd_port}").parse().expect("address"), "r0").expect("client");
    log.write(&mut client, 200, 50);
    log.write(&mut client, 40, 0);
    drop(guest); // SIGKILL: the guest's unwritten cache is gone
    log.write(&mut client, 100, 25);
    tests::wait_until(Duration::from_secs(30), "the host notices", || state()["connection"] != "Connected")
        .expect("link loss noticed");

    let guest = tests::vm::boot(&kver, &initrd, link_port, "repl-secondary", &[], Some(&guest_disk));
    guest.logs.wait_for("GLUE-INSYNC", tests::vm::GUEST_DEADLINE).expect("the guest resyncs after its power loss");
    tests::wait_until(Duration::from_secs(30), "in sync", || in_sync(&state())).expect("in sync");
    let export_bytes = client.size();
    drop(client);
    drop(host); // the guest sees the link go, stops cleanly and writes its cache out
    guest.logs.wait_for("GLUE-STOPPED", tests::vm::GUEST_DEADLINE).expect("the guest stops");

    let read = |p: &Path| {
        let mut b = std::fs::read(p).expect("disk image");
        b.truncate(export_bytes as usize);
        b
    };
    let (h, g) = (read(&host_disk), read(&guest_disk));
    let differ: Vec<u64> = (0..export_bytes / BLOCK)
        .filter(|b| {
            h[(*b * BLOCK) as usize..((*b + 1) * BLOCK) as usize]
                != g[(*b * BLOCK) as usize..((*b + 1) * BLOCK) as usize]
        })
        .collect();
    assert!(
        differ.is_empty(),
        "replicas differ after the guest's power loss and resync in blocks {differ:?}\n{}",
        guest.logs.text()
    );
    for (block, version) in &log.acked {
        let got = version_of(*block, &h[(*block * BLOCK) as usize..((*block + 1) * BLOCK) as usize]);
        assert_eq!(got, Some(*version), "block {block} on the host");
    }
}
