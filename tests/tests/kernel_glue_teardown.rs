//! Issue 23, point 8: a "host" whose processes all die at once while ext4
//! is mounted on a FUSE-attached volume in the host's private mount
//! namespace (`ip netns exec` gives every host one, as clusterd's hosts
//! have) must not hang. Before the fix the attach daemon could be the last
//! process of that namespace: its exit unmounted ext4, whose final flush
//! went to the daemon's own, not yet aborted, FUSE connection and waited
//! forever (`do_exit → cleanup_mnt → ext4_kill_sb → sync_filesystem →
//! blkdev_issue_flush`). Now the daemon runs in a namespace of its own,
//! and the next attach frees the loop device, FUSE connection, namespace
//! pin and mount point the dead daemon left.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tests::netns::Net;
use tests::util::run_output;
use tests::{
    cmd, have_root, have_tools, replicator, replicator_bin, run, skip, wait_until, Server, TestDir, Volume, MIB,
};

/// Everything must be gone this long after the kill (the daemon's exit and
/// the namespace's teardown take milliseconds when nothing hangs).
const EXIT_DEADLINE: Duration = Duration::from_secs(20);
/// Host deaths per run: which process of the namespace exits last varies.
const ROUNDS: usize = 3;

fn prerequisites() -> bool {
    if !have_root("network namespaces, loop devices, FUSE and mount") {
        return false;
    }
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        return skip("/dev/fuse or /dev/loop-control missing (run scripts/install-deps.sh)");
    }
    have_tools(&["mkfs.ext4", "losetup", "ip"])
}

/// Gone, or a zombie (the reaper may be late).
fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| st.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// The device number of a loop device's backing file ("0:43"), if bound.
fn backing_maj_min(dev: &str) -> Option<String> {
    let out = run_output(
        &mut cmd("losetup", ["--list", "--noheadings", "--output", "BACK-MAJ:MIN", dev]),
        Duration::from_secs(30),
    )
    .ok()?;
    let m = out.stdout.trim();
    (!m.is_empty()).then(|| m.to_owned())
}

/// If the test fails with a device still bound to a dead FUSE server:
/// abort that connection and unbind, so a failure does not leave a hung
/// filesystem on the machine.
struct Rescue {
    device: String,
    maj_min: String,
}

impl Drop for Rescue {
    fn drop(&mut self) {
        if backing_maj_min(&self.device).as_deref() == Some(self.maj_min.as_str()) {
            if let Some(minor) = self.maj_min.strip_prefix("0:") {
                let _ = std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
            }
            let _ = run_output(&mut cmd("losetup", ["-d", &self.device]), Duration::from_secs(30));
        }
    }
}

/// The host attaches the volume with FUSE, makes ext4 on it, mounts it
/// (in its own mount namespace), leaves dirty data in the page cache and
/// stays; then every process of the host is killed with one `kill -9`.
/// Everything exits within [`EXIT_DEADLINE`], the ext4 superblock goes
/// away (its unmount finished), and the next attach in the same run
/// directory frees the loop device, the FUSE connection, the namespace
/// pin and the mount point that the dead daemon left.
#[test]
fn host_kill_with_ext4_on_fuse_in_a_private_namespace_exits_and_the_next_attach_frees_the_orphans() {
    if !prerequisites() {
        return;
    }
    let dir = TestDir::new("kg-teardown");
    let net = Net::new(1).unwrap();
    let host = net.host(0);
    let vol = Volume::create(&dir, 64 * MIB).unwrap();
    let srv = Server::start(&vol, &["--listen", &format!("{}:0", net.gateway)]).unwrap();
    let run_dir = dir.join("run");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut kill_ms = Vec::new();
    for round in 0..ROUNDS {
        let ready = dir.join(format!("ready-{round}"));
        let script = format!(
            "set -e\n\
             dev=$({bin} attach --method fuse --nbd {addr} --export volume --timeout 10 --run-dir {run})\n\
             mkfs.ext4 -q -F $dev\n\
             mount -t ext4 $dev {mnt}\n\
             dd if=/dev/urandom of={mnt}/dirty bs=1M count=8 status=none\n\
             echo $dev > {ready}.tmp && mv {ready}.tmp {ready}\n\
             exec sleep 600\n",
            bin = replicator_bin().display(),
            addr = srv.addr(),
            run = run_dir.display(),
            mnt = mnt.display(),
            ready = ready.display(),
        );
        let mut shell = host.cmd("sh", ["-c", &script]).spawn().unwrap();
        wait_until(Duration::from_secs(90), "the host to attach, mkfs and mount", || {
            ready.exists() || shell.try_wait().ok().flatten().is_some()
        })
        .unwrap();
        let device = std::fs::read_to_string(&ready)
            .unwrap_or_else(|_| panic!("round {round}: the host script failed: {:?}", shell.try_wait()))
            .trim()
            .to_string();
        assert!(device.starts_with("/dev/loop"), "attach printed {device:?}");
        let name = device.trim_start_matches("/dev/").to_string();
        let maj_min = backing_maj_min(&device).expect("the loop device is bound");
        let _rescue = Rescue { device: device.clone(), maj_min: maj_min.clone() };
        let record = run_dir.join(format!("{name}.pid"));
        let daemon = std::fs::read_to_string(&record).unwrap().lines().next().unwrap().trim().to_string();
        let mountpoint = run_dir.join(format!("fuse-{daemon}"));
        assert!(mountpoint.is_dir(), "the daemon's mount point {}", mountpoint.display());
        assert!(Path::new(&format!("/proc/fs/ext4/{name}")).exists(), "ext4 is mounted on {device}");

        // The host dies: every process in it at once.
        let out = run(&mut cmd("ip", ["netns", "pids", &host.ns])).unwrap();
        let pids: Vec<String> = out.stdout.split_whitespace().map(str::to_owned).collect();
        assert!(pids.contains(&daemon), "the attach daemon {daemon} runs in the host: {pids:?}");
        let start = Instant::now();
        run(cmd("kill", ["-9"]).args(&pids)).unwrap();
        let exited =
            wait_until(EXIT_DEADLINE, "every process of the killed host to exit", || pids.iter().all(|p| gone(p)));
        let stuck: Vec<String> = pids
            .iter()
            .filter(|p| !gone(p))
            .map(|p| format!("{p}: {}", std::fs::read_to_string(format!("/proc/{p}/stack")).unwrap_or_default()))
            .collect();
        assert!(exited.is_ok(), "round {round}: processes still there after {EXIT_DEADLINE:?}: {stuck:?}");
        wait_until(EXIT_DEADLINE, "the host's ext4 to be unmounted", || {
            !Path::new(&format!("/proc/fs/ext4/{name}")).exists()
        })
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        kill_ms.push(start.elapsed().as_millis());
        let _ = shell.wait();

        // The next attach (here from the test's own namespace) frees what
        // the dead daemon left.
        let mut c = replicator();
        c.args(["attach", "--method", "fuse", "--nbd", &srv.addr().to_string(), "--export", "volume"])
            .args(["--timeout", "10", "--run-dir"])
            .arg(&run_dir);
        let out = run(&mut c).unwrap();
        assert!(out.success(), "round {round}: attach after the host kill: {}", out.describe());
        let new_device = out.stdout.trim().to_string();
        // Unbinding is deferred while someone (udev's probe) has it open.
        wait_until(Duration::from_secs(10), "the orphaned loop device to be unbound", || {
            backing_maj_min(&device).as_deref() != Some(maj_min.as_str())
        })
        .unwrap_or_else(|e| panic!("round {round}: {device} stays bound to the dead daemon's FUSE file: {e}"));
        let minor = maj_min.trim_start_matches("0:");
        wait_until(Duration::from_secs(10), "the dead FUSE connection to go", || {
            !Path::new(&format!("/sys/fs/fuse/connections/{minor}")).exists()
        })
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(!mountpoint.exists(), "round {round}: {} left behind", mountpoint.display());
        for side in ["mntns", "loop"] {
            let p: PathBuf = mountpoint.with_extension(side);
            assert!(!p.exists(), "round {round}: {} left behind", p.display());
        }
        assert!(!record.exists() || new_device == device, "round {round}: the dead daemon's record stays");

        // The new attachment works and detaches cleanly.
        let mut c = replicator();
        c.args(["detach", &new_device]).arg("--run-dir").arg(&run_dir);
        let out = run_output(&mut c, Duration::from_secs(90)).unwrap();
        assert!(out.success(), "round {round}: detach: {}", out.describe());
    }
    let leftovers: Vec<String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("fuse-"))
        .collect();
    assert!(leftovers.is_empty(), "left in the run directory: {leftovers:?}");
    eprintln!("host kill → every process gone and ext4 unmounted: {kill_ms:?} ms");
}
