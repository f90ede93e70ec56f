//! kernel-glue as clusterd uses it: the library in-process (no CLI), with
//! the mount helpers. A forced detach under a mounted filesystem stands in
//! for a crashed primary; the next attach must replay the journal (fsck),
//! mount, and find every fsynced file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use kernel_glue::mount::{self, FsckOutcome};
use kernel_glue::{AttachConfig, DetachMode, Endpoint, Error, Method};
use tests::util::run_output;
use tests::{assert_same_bytes, cmd, have_root, random_bytes, require_tools, run, skip, Server, TestDir, Volume, MIB};

fn config(dir: &TestDir, srv: &Server, name: &str) -> AttachConfig {
    let mut cfg = AttachConfig::new(Endpoint::Tcp(srv.addr().to_string()), "volume", dir.join(name));
    cfg.method = Method::Fuse;
    cfg.io_timeout = Duration::from_secs(5);
    cfg
}

fn files() -> Vec<(String, Vec<u8>)> {
    (0..4u64).map(|i| (format!("mail/{i}.eml"), random_bytes(150_000 * (i as usize + 1), 70 + i))).collect()
}

#[test]
fn crash_then_fsck_replays_the_journal_and_mount_finds_fsynced_files() {
    require_tools!("mkfs.ext4", "fsck.ext4", "dumpe2fs");
    if !have_root("loop devices, FUSE and mount") {
        return;
    }
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        skip("/dev/fuse or /dev/loop-control missing");
        return;
    }
    let dir = TestDir::new("kg-mount");
    let vol = Volume::create(&dir, 48 * MIB).unwrap();
    let mut srv = Server::start_tcp(&vol).unwrap();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    // The primary: attach, make a filesystem, write durably.
    let att = kernel_glue::attach(&config(&dir, &srv, "fuse1")).unwrap();
    assert_eq!(att.method(), Method::Fuse);
    let dev = att.device().to_path_buf();
    run(&mut cmd("mkfs.ext4", ["-q", "-F", dev.to_str().unwrap()])).unwrap();
    mount::mount(&dev, &mnt, "ext4", "noatime,nodev,nosuid").unwrap();
    assert_eq!(mount::mounts_of(&dev).unwrap().len(), 1);
    for (name, data) in files() {
        let p = mnt.join(&name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut f = File::create(&p).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        File::open(p.parent().unwrap()).unwrap().sync_all().unwrap();
    }

    // A clean detach is refused while mounted, and leaves the device usable.
    let att = match att.detach(DetachMode::Clean) {
        Err((Error::Busy { mounts, .. }, Some(still))) => {
            assert_eq!(mounts, vec![mnt.display().to_string()]);
            *still
        }
        Err((e, _)) => panic!("expected Busy, got {e}"),
        Ok(()) => panic!("clean detach of a mounted device succeeded"),
    };
    // "Crash": the device goes away under the mounted filesystem; the
    // journal stays unreplayed on the volume.
    att.detach(DetachMode::Force).unwrap_or_else(|(e, _)| panic!("forced detach: {e}"));
    let out = run_output(&mut cmd("umount", [mnt.to_str().unwrap()]), Duration::from_secs(60)).unwrap();
    if !out.success() {
        run(&mut cmd("umount", ["-l", mnt.to_str().unwrap()])).unwrap();
    }

    // The new primary: attach, fsck, mount, read.
    let att = kernel_glue::attach(&config(&dir, &srv, "fuse2")).unwrap();
    let dev = att.device().to_path_buf();
    mount::ensure_unused(&dev).unwrap();
    let features = || run(&mut cmd("dumpe2fs", ["-h", dev.to_str().unwrap()])).unwrap().stdout;
    assert!(features().contains("needs_recovery"), "the crash left no journal to replay:\n{}", features());
    let outcome = mount::fsck(&dev, "ext4").unwrap();
    // e2fsck -p exits 0 after a plain journal replay, 1 if it also fixed something.
    assert!(matches!(outcome, FsckOutcome::Clean | FsckOutcome::Repaired), "{outcome:?}");
    assert!(!features().contains("needs_recovery"), "fsck did not replay the journal:\n{}", features());
    // The helpers' errors name what they were given.
    let err = mount::mount(&dev, &mnt, "xfs", "").unwrap_err().to_string();
    assert!(err.contains(dev.to_str().unwrap()) && err.contains(mnt.to_str().unwrap()), "{err}");
    let err = mount::umount(&mnt).unwrap_err().to_string();
    assert!(err.contains(mnt.to_str().unwrap()), "{err}");

    mount::mount(&dev, &mnt, "ext4", "noatime").unwrap();
    let result = std::panic::catch_unwind(|| {
        for (name, data) in files() {
            assert_same_bytes(&name, &std::fs::read(mnt.join(&name)).unwrap(), &data);
        }
    });
    mount::umount(&mnt).unwrap();
    result.unwrap();
    // After fsck and a clean unmount the filesystem is clean.
    assert_eq!(mount::fsck(&dev, "ext4").unwrap(), FsckOutcome::Clean);
    att.detach(DetachMode::Clean).unwrap_or_else(|(e, _)| panic!("clean detach: {e}"));
    srv.assert_running();
}
