//! kernel-glue's fallback path end to end, on this machine (no kernel nbd):
//! `replicator attach --method fuse` → /dev/loopN → ext4 → files → detach,
//! with the data checked through NBD by an independent client (nbdcopy);
//! detach safety (refused while mounted, and no write reaches the volume
//! after a forced detach); and a server that hangs or dies under a writer
//! turns into I/O errors within the timeout instead of a hang.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use tests::util::run_output;
use tests::{
    assert_same_bytes, cmd, have_root, random_bytes, replicator, require_tools, run, run_fail, skip, wait_until,
    Server, TestDir, Volume, MIB,
};

/// Best-effort cleanup command with a short limit: a cleanup must never hang a test run.
fn cleanup(program: &str, args: &[&str]) {
    let _ = run_output(&mut cmd(program, args), Duration::from_secs(30));
}

fn prerequisites() -> bool {
    if !have_root("loop devices, FUSE and mount") {
        return false;
    }
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        return skip("/dev/fuse or /dev/loop-control missing (run scripts/install-deps.sh)");
    }
    true
}

/// A device made by `replicator attach`; on drop: unmount, force-detach,
/// and kill the attach daemon if it is still there.
struct Attached {
    device: String,
    run_dir: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl Attached {
    fn new(dir: &TestDir, srv: &Server, timeout_s: u64) -> Attached {
        let run_dir = dir.join("run");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mut c = replicator();
        c.args(["attach", "--method", "fuse", "--nbd", &srv.addr().to_string(), "--export", "volume"])
            .args(["--timeout", &timeout_s.to_string()])
            .arg("--run-dir")
            .arg(&run_dir);
        let out = run(&mut c).unwrap();
        let device = out.stdout.trim().to_string();
        assert!(device.starts_with("/dev/loop"), "attach printed {device:?}\n{}", out.describe());
        Attached { device, run_dir, mnt, mounted: false }
    }

    fn mnt_s(&self) -> String {
        self.mnt.to_str().unwrap().to_string()
    }

    fn record(&self) -> PathBuf {
        self.run_dir.join(format!("{}.pid", self.device.trim_start_matches("/dev/")))
    }

    fn mkfs_and_mount(&mut self) {
        run(&mut cmd("mkfs.ext4", ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", &self.device])).unwrap();
        run(&mut cmd("mount", ["-t", "ext4", &self.device, &self.mnt_s()])).unwrap();
        self.mounted = true;
    }

    fn umount(&mut self) {
        run(&mut cmd("umount", [&self.mnt_s()])).unwrap();
        self.mounted = false;
    }

    fn detach(&self, force: bool) -> tests::Output {
        let mut c = replicator();
        c.args(["detach", &self.device]).arg("--run-dir").arg(&self.run_dir);
        if force {
            c.arg("--force");
        }
        run_output(&mut c, Duration::from_secs(90)).unwrap()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.mounted {
            cleanup("umount", &[&self.mnt_s()]);
            cleanup("umount", &["-l", &self.mnt_s()]);
        }
        if let Ok(pid) = std::fs::read_to_string(self.record()) {
            let _ = self.detach(true);
            cleanup("kill", &["-KILL", pid.trim()]);
        }
    }
}

fn files() -> Vec<(String, Vec<u8>)> {
    (0..5u64).map(|i| (format!("d{}/f{i}.bin", i % 2), random_bytes((i as usize + 1) * 900_000 + 17, 40 + i))).collect()
}

/// Writes a file and makes it durable (data, then its directory entry).
fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    File::open(path.parent().unwrap())?.sync_all()
}

/// The whole export, read through NBD by nbdcopy (an independent client).
fn export_bytes(dir: &TestDir, srv: &Server, name: &str) -> Vec<u8> {
    let img = dir.join(name);
    run(&mut cmd("nbdcopy", [&srv.uri(), img.to_str().unwrap()])).unwrap();
    std::fs::read(&img).unwrap()
}

/// Reads a whole block device with O_DIRECT, past any page cache.
fn device_bytes(device: &str) -> Vec<u8> {
    let mut f = OpenOptions::new().read(true).open(device).unwrap();
    run(&mut cmd("blockdev", ["--flushbufs", device])).unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// A clean `detach` of `att` succeeds and frees all it held: the attach
/// record, the loop device and the FUSE mount point.
#[track_caller]
fn detach_frees_everything(att: &Attached) {
    let out = att.detach(false);
    assert!(out.success(), "{}", out.describe());
    assert!(!att.record().exists(), "record left behind");
    let backing = format!("/sys/block/{}/loop/backing_file", att.device.trim_start_matches("/dev/"));
    wait_unbound(&backing, &att.device);
    let fuse_dirs: Vec<_> = std::fs::read_dir(&att.run_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("fuse-"))
        .collect();
    assert!(fuse_dirs.is_empty(), "FUSE mount point left behind");
}

/// Waits for the loop device to be unbound. `LOOP_CLR_FD` unbinds at the
/// last close, and tests running beside this one may hold the device open
/// for a moment (`mount -o loop` opens loop devices while looking for a
/// free one), so the unbind can trail `detach` by that moment.
#[track_caller]
fn wait_unbound(backing_attr: &str, device: &str) {
    wait_until(Duration::from_secs(10), &format!("{device} to be unbound after detach"), || {
        !Path::new(backing_attr).exists()
    })
    .unwrap();
}

#[test]
fn fuse_attach_ext4_files_detach_then_verify_through_nbd() {
    require_tools!("mkfs.ext4", "mount", "umount", "nbdcopy", "blockdev");
    if !prerequisites() {
        return;
    }
    let dir = TestDir::new("kg-ext4");
    let vol = Volume::create(&dir, 64 * MIB).unwrap();
    let mut srv = Server::start_tcp(&vol).unwrap();
    let mut att = Attached::new(&dir, &srv, 10);
    assert!(att.record().exists(), "attach daemon record {} missing", att.record().display());
    // What backs the device, as status will show it.
    let listed = kernel_glue::record::list(&att.run_dir);
    let entry = listed.iter().find(|a| a.device == Path::new(&att.device)).expect("device listed");
    assert_eq!(entry.method, kernel_glue::Method::Fuse);
    assert_eq!(entry.backend.as_deref(), Some(format!("nbd://{}/volume", srv.addr()).as_str()));
    assert!(entry.pid.is_some());
    let size = std::fs::read_to_string(format!("/sys/block/{}/size", att.device.trim_start_matches("/dev/"))).unwrap();
    assert_eq!(size.trim().parse::<u64>().unwrap() * 512, vol.data_size().unwrap(), "device size");

    att.mkfs_and_mount();
    for (name, data) in files() {
        write_durably(&att.mnt.join(&name), &data).unwrap();
    }
    att.umount();
    let on_device = device_bytes(&att.device);

    let out = att.detach(false);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout.trim(), att.device);
    assert!(!att.record().exists(), "daemon record left behind");
    let backing = format!("/sys/block/{}/loop/backing_file", att.device.trim_start_matches("/dev/"));
    wait_unbound(&backing, &att.device);

    // Block for block, the export is what the device showed...
    let exported = export_bytes(&dir, &srv, "export.img");
    assert_same_bytes("export vs device", &exported, &on_device);
    // ...and its filesystem holds the files, checked file by file.
    let check = dir.join("check");
    std::fs::create_dir_all(&check).unwrap();
    let img = dir.join("export.img");
    run(&mut cmd("mount", ["-o", "loop,ro", img.to_str().unwrap(), check.to_str().unwrap()])).unwrap();
    let result = std::panic::catch_unwind(|| {
        for (name, data) in files() {
            assert_same_bytes(&name, &std::fs::read(check.join(&name)).unwrap(), &data);
        }
    });
    cleanup("umount", &[check.to_str().unwrap()]);
    result.unwrap();
    srv.assert_running();
}

#[test]
fn detach_refuses_while_mounted_and_forced_detach_stops_writes() {
    require_tools!("mkfs.ext4", "mount", "umount", "nbdcopy", "blockdev");
    if !prerequisites() {
        return;
    }
    let dir = TestDir::new("kg-force");
    let vol = Volume::create(&dir, 48 * MIB).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let mut att = Attached::new(&dir, &srv, 10);
    att.mkfs_and_mount();
    write_durably(&att.mnt.join("a"), &random_bytes(300_000, 1)).unwrap();

    let out = att.detach(false);
    assert!(!out.success(), "detach of a mounted device succeeded\n{}", out.describe());
    assert!(out.stderr.contains("mounted on") && out.stderr.contains(&att.mnt_s()), "{}", out.describe());
    // Refused means untouched: the filesystem still works.
    write_durably(&att.mnt.join("b"), &random_bytes(300_000, 2)).unwrap();

    let out = att.detach(true);
    assert!(out.success(), "{}", out.describe());
    assert!(!att.record().exists(), "daemon record left behind");
    let before = export_bytes(&dir, &srv, "before.img");

    // The filesystem is still mounted; its writes must fail, never hang,
    // and never reach the volume.
    let target = att.mnt.join("c");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || drop(tx.send(write_durably(&target, &random_bytes(2 * MIB as usize, 3)))));
    let res = rx.recv_timeout(Duration::from_secs(60)).expect("a write after forced detach hung");
    assert!(res.is_err(), "a durable write succeeded after forced detach");
    let after = export_bytes(&dir, &srv, "after.img");
    assert_same_bytes("export after forced detach", &after, &before);
}

/// A writer with fsync runs until the first error; the server then hangs
/// (SIGSTOP: only the timeout can notice) or dies (SIGKILL).
fn server_failure_reaches_writer(signal: &str, name: &str) {
    require_tools!("mkfs.ext4", "mount", "umount");
    if !prerequisites() {
        return;
    }
    const TIMEOUT_S: u64 = 3;
    let dir = TestDir::new(name);
    let vol = Volume::create(&dir, 48 * MIB).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let mut att = Attached::new(&dir, &srv, TIMEOUT_S);
    att.mkfs_and_mount();

    let rounds = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let path = att.mnt.join("stream.bin");
    let r = rounds.clone();
    thread::spawn(move || {
        let res = (|| -> std::io::Result<()> {
            let mut f = File::create(&path)?;
            let chunk = random_bytes(MIB as usize, 9);
            // Bounded: 40 MiB would fill the filesystem, long after the failure.
            for _ in 0..40 {
                f.write_all(&chunk)?;
                f.sync_data()?;
                r.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })();
        let _ = tx.send((res, Instant::now()));
    });
    wait_until(Duration::from_secs(60), "the writer to complete 3 fsynced rounds", || {
        rounds.load(Ordering::SeqCst) >= 3
    })
    .unwrap();
    let t0 = Instant::now();
    run(&mut cmd("kill", [signal, &srv.pid.to_string()])).unwrap();
    let (res, at) =
        rx.recv_timeout(Duration::from_secs(TIMEOUT_S + 30)).expect("the writer hung after the server failed");
    let err = res.expect_err("the writer finished without an error although the server failed");
    let waited = at.saturating_duration_since(t0);
    assert!(
        waited <= Duration::from_secs(TIMEOUT_S + 10),
        "the error ({err}) took {waited:?}, timeout is {TIMEOUT_S} s"
    );
    eprintln!("writer saw {err} after {waited:?}");
    drop(srv);
    att.umount_best_effort();
}

impl Attached {
    fn umount_best_effort(&mut self) {
        let out = run_output(&mut cmd("umount", [&self.mnt_s()]), Duration::from_secs(60)).unwrap();
        if !out.success() {
            cleanup("umount", &["-l", &self.mnt_s()]);
        }
        self.mounted = false;
    }
}

#[test]
fn hung_server_fails_io_within_timeout() {
    server_failure_reaches_writer("-STOP", "kg-hang");
}

#[test]
fn killed_server_fails_io_within_timeout() {
    server_failure_reaches_writer("-KILL", "kg-kill");
}

#[test]
fn attach_refuses_a_missing_export_with_a_clear_error() {
    if !prerequisites() {
        return;
    }
    let dir = TestDir::new("kg-noexp");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let mut c = replicator();
    c.args(["attach", "--method", "fuse", "--nbd", &srv.addr().to_string(), "--export", "nope"])
        .arg("--run-dir")
        .arg(dir.join("run"));
    let out = run_fail(&mut c).unwrap();
    assert!(out.stderr.contains("refused export \"nope\""), "{}", out.describe());
}

/// The daemon restarts (SIGTERM, start again on the same Unix socket)
/// under a mounted filesystem with a writer running: the client
/// reconnects, resends what was unanswered, and the writer never sees an
/// error; afterwards every fsynced byte is on the volume.
#[test]
fn server_restart_under_mounted_fs_resumes_io() {
    require_tools!("mkfs.ext4", "mount", "umount", "nbdcopy");
    if !prerequisites() {
        return;
    }
    const CHUNK: usize = 256 * 1024;
    let dir = TestDir::new("kg-restart");
    let vol = Volume::create(&dir, 64 * MIB).unwrap();
    let sock = dir.join("nbd.sock");
    let extra = ["--listen", "127.0.0.1:0", "--unix", sock.to_str().unwrap()];
    let mut srv = Server::start(&vol, &extra).unwrap();
    let run_dir = dir.join("run");
    let mut c = replicator();
    c.args(["attach", "--method", "fuse", "--export", "volume", "--timeout", "20"])
        .arg("--nbd-unix")
        .arg(&sock)
        .arg("--run-dir")
        .arg(&run_dir);
    let out = run(&mut c).unwrap();
    let device = out.stdout.trim().to_string();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut att = Attached { device, run_dir, mnt, mounted: false };
    att.mkfs_and_mount();

    let rounds = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (path, r, st) = (att.mnt.join("log.bin"), rounds.clone(), stop.clone());
    thread::spawn(move || {
        let res = (|| -> std::io::Result<u64> {
            let mut f = File::create(&path)?;
            // Bounded: 120 chunks are 30 MiB, far more than the test needs.
            for i in 0..120u64 {
                if st.load(Ordering::SeqCst) {
                    return Ok(i);
                }
                f.write_all(&random_bytes(CHUNK, 1000 + i))?;
                f.sync_data()?;
                r.fetch_add(1, Ordering::SeqCst);
            }
            Ok(120)
        })();
        let _ = tx.send(res);
    });
    wait_until(Duration::from_secs(60), "3 fsynced rounds", || rounds.load(Ordering::SeqCst) >= 3).unwrap();
    let status = srv.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "server exit: {status}");
    let at_restart = rounds.load(Ordering::SeqCst);
    srv = Server::start(&vol, &extra).unwrap();
    wait_until(Duration::from_secs(60), "3 more fsynced rounds after the restart", || {
        rounds.load(Ordering::SeqCst) >= at_restart + 3
    })
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    let written = rx.recv_timeout(Duration::from_secs(60)).expect("writer hung").expect("the writer saw an error");
    att.umount();
    let out = att.detach(false);
    assert!(out.success(), "{}", out.describe());

    let img = dir.join("export.img");
    run(&mut cmd("nbdcopy", [&srv.uri(), img.to_str().unwrap()])).unwrap();
    let check = dir.join("check");
    std::fs::create_dir_all(&check).unwrap();
    run(&mut cmd("mount", ["-o", "loop,ro", img.to_str().unwrap(), check.to_str().unwrap()])).unwrap();
    let got = std::fs::read(check.join("log.bin"));
    cleanup("umount", &[check.to_str().unwrap()]);
    let want: Vec<u8> = (0..written).flat_map(|i| random_bytes(CHUNK, 1000 + i)).collect();
    assert_same_bytes("log.bin through NBD", &got.unwrap(), &want);
    srv.assert_running();
}

/// Discard and zero-out on the loop device reach the volume as zeros (a
/// discarded range of a file-backed loop device must read back as zeros,
/// which NBD_CMD_TRIM alone would not promise).
#[test]
fn discard_and_zeroout_read_back_as_zeros_through_nbd() {
    require_tools!("blkdiscard", "nbdcopy");
    if !prerequisites() {
        return;
    }
    let dir = TestDir::new("kg-zero");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let att = Attached::new(&dir, &srv, 10);
    let data = random_bytes(16 * MIB as usize, 77);
    {
        let mut f = OpenOptions::new().write(true).open(&att.device).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    run(&mut cmd("blkdiscard", ["-o", "0", "-l", &(4 * MIB).to_string(), &att.device])).unwrap();
    run(&mut cmd("blkdiscard", ["-z", "-o", &(4 * MIB).to_string(), "-l", &(4 * MIB).to_string(), &att.device]))
        .unwrap();
    let got = export_bytes(&dir, &srv, "export.img");
    let mut want = data.clone();
    want[..8 * MIB as usize].fill(0);
    assert_same_bytes("export after discard and zero-out", &got[..16 * MIB as usize], &want);
    let out = att.detach(false);
    assert!(out.success(), "{}", out.describe());
}

/// Without `--method`, attach picks the kernel driver where it exists and
/// FUSE + loop elsewhere (this machine has no nbd driver); either way the
/// device works and detaches.
#[test]
fn auto_method_picks_a_working_device() {
    require_tools!("nbdcopy");
    if !prerequisites() {
        return;
    }
    let dir = TestDir::new("kg-auto");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let run_dir = dir.join("run");
    let mut c = replicator();
    c.args(["attach", "--nbd", &srv.addr().to_string(), "--timeout", "10"]).arg("--run-dir").arg(&run_dir);
    let out = run(&mut c).unwrap();
    let device = out.stdout.trim().to_string();
    let kernel = Path::new("/sys/module/nbd").exists();
    let want = if kernel { "/dev/nbd" } else { "/dev/loop" };
    assert!(device.starts_with(want), "auto chose {device:?}, expected {want}*\n{}", out.describe());
    let att = Attached { device, run_dir, mnt: dir.join("mnt"), mounted: false };
    let data = random_bytes(MIB as usize, 5);
    {
        let mut f = OpenOptions::new().write(true).open(&att.device).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let got = export_bytes(&dir, &srv, "export.img");
    assert_same_bytes("first MiB through NBD", &got[..MIB as usize], &data);
    let out = att.detach(false);
    assert!(out.success(), "{}", out.describe());
}

/// The attach daemon dies (SIGKILL): the device's I/O fails at once (the
/// FUSE connection died with it), and `detach` still frees the loop device
/// and the mount it left behind.
#[test]
fn detach_after_the_attach_daemon_died_frees_the_device() {
    if !prerequisites() {
        return;
    }
    let dir = TestDir::new("kg-orphan");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let att = Attached::new(&dir, &srv, 10);
    let pid = std::fs::read_to_string(att.record()).unwrap().lines().next().unwrap().to_string();
    run(&mut cmd("kill", ["-KILL", &pid])).unwrap();
    wait_until(Duration::from_secs(30), "the attach daemon to exit", || !Path::new(&format!("/proc/{pid}")).exists())
        .unwrap();
    let res = OpenOptions::new().write(true).open(&att.device).and_then(|mut f| {
        f.write_all(&[1u8; 4096])?;
        f.sync_all()
    });
    assert!(res.is_err(), "a write through an orphaned device succeeded");

    detach_frees_everything(&att);
}

/// The attach daemon is SIGKILLed and `detach` runs while it is still a
/// zombie (its parent, this test, has not reaped it): a zombie is dead, so
/// `detach` frees the loop device and the dead mount, and drops the record
/// only then (issue 19: it signalled the zombie, waited, then dropped the
/// record and left the device bound with nothing able to free it).
#[test]
fn detach_frees_the_device_of_an_attach_daemon_that_is_still_a_zombie() {
    if !prerequisites() {
        return;
    }
    let dir = TestDir::new("kg-zombie");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let run_dir = dir.join("run");
    // In the foreground, the daemon is our child: it stays a zombie until
    // we reap it.
    let mut c = replicator();
    c.args(["attach", "--method", "fuse", "--nbd", &srv.addr().to_string(), "--export", "volume"])
        .args(["--timeout", "10", "--foreground"])
        .arg("--run-dir")
        .arg(&run_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut daemon = c.spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = daemon.stdout.take().unwrap();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("the attach daemon reports its device");
    let device = line.trim().strip_prefix("device ").expect("a device line").to_string();
    let att = Attached { device, run_dir, mnt: dir.join("mnt"), mounted: false };
    assert!(att.record().exists(), "the daemon records itself");
    daemon.kill().unwrap();
    let pid = daemon.id();
    wait_until(Duration::from_secs(10), "the daemon to be a zombie", || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
    })
    .unwrap();

    detach_frees_everything(&att);
    let _ = daemon.wait();
}
