//! A real filesystem on the export: nbdfuse turns the export into a file, a
//! loop device turns that into a block device, and ext4 + fsck judge the
//! result. nbdfuse uses several connections at once (multi-conn).

use std::path::Path;
use std::time::Duration;

use tests::util::{run_output, wait_until};
use tests::{
    assert_same_bytes, cmd, have_root, random_bytes, require_tools, run, skip, Daemon, Guard, Server, TestDir, Volume,
    MIB,
};

/// Best-effort cleanup command with a short limit: a cleanup must never hang a test run.
fn cleanup(program: &str, args: &[&str]) {
    let _ = run_output(&mut cmd(program, args), Duration::from_secs(30));
}

fn files() -> Vec<(String, Vec<u8>)> {
    (0..6u64)
        .map(|i| (format!("dir{}/file{i}.bin", i % 2), random_bytes((i as usize + 1) * 700_000, 100 + i)))
        .collect()
}

fn write_files(root: &Path) {
    for (name, data) in files() {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &data).unwrap();
    }
}

fn check_files(root: &Path) {
    for (name, data) in files() {
        let got = std::fs::read(root.join(&name)).unwrap();
        assert_same_bytes(&name, &got, &data);
    }
}

#[test]
fn ext4_on_nbdfuse_loop_device() {
    require_tools!("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount");
    if !have_root("loop devices and mount") {
        return;
    }
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        skip("/dev/fuse or /dev/loop-control missing (run scripts/install-deps.sh)");
        return;
    }
    let dir = TestDir::new("fs");
    let vol = Volume::create(&dir, 96 * MIB).unwrap();
    let mut srv = Server::start_tcp(&vol).unwrap();

    let fuse_dir = dir.join("fuse");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fuse_s = fuse_dir.to_str().unwrap().to_string();
    let mnt_s = mnt.to_str().unwrap().to_string();

    // Drop order is the reverse of declaration: unmount ext4, detach the loop
    // device, then unmount FUSE and stop nbdfuse, then the server.
    let pidfile = dir.join("nbdfuse.pid");
    let mut c = cmd("nbdfuse", ["-P", pidfile.to_str().unwrap(), &fuse_s, &srv.uri()]);
    c.env("LIBNBD_DEBUG", "0");
    let nbdfuse = Daemon::spawn(c).unwrap();
    let _fuse_guard = Guard::new({
        let fuse_s = fuse_s.clone();
        move || {
            cleanup("fusermount3", &["-u", "-z", &fuse_s]);
            drop(nbdfuse);
        }
    });
    let image = fuse_dir.join("nbd");
    wait_until(Duration::from_secs(30), "nbdfuse to be ready", || pidfile.exists() && image.exists()).unwrap();
    assert_eq!(std::fs::metadata(&image).unwrap().len(), vol.data_size().unwrap(), "FUSE file size");

    let out = run(&mut cmd("losetup", ["-f", "--show", image.to_str().unwrap()])).unwrap();
    let loopdev = out.stdout.trim().to_string();
    assert!(loopdev.starts_with("/dev/loop"), "{}", out.describe());
    let _loop_guard = Guard::new({
        let loopdev = loopdev.clone();
        move || cleanup("losetup", &["-d", &loopdev])
    });

    run(&mut cmd("mkfs.ext4", ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", &loopdev])).unwrap();
    let mounted = std::cell::Cell::new(false);
    let _mount_guard = Guard::new(|| {
        if mounted.get() {
            cleanup("umount", &[&mnt_s]);
            cleanup("umount", &["-l", &mnt_s]);
        }
    });
    run(&mut cmd("mount", ["-t", "ext4", &loopdev, &mnt_s])).unwrap();
    mounted.set(true);
    write_files(&mnt);
    run(&mut cmd("sync", ["-f", &mnt_s])).unwrap();
    run(&mut cmd("umount", [&mnt_s])).unwrap();
    mounted.set(false);

    // -f: check even though the filesystem is marked clean; -n: change nothing.
    let fsck = run(&mut cmd("fsck.ext4", ["-n", "-f", &loopdev])).unwrap();
    assert!(fsck.stdout.contains("files"), "{}", fsck.describe());

    // Drop the loop device's page cache so the second mount really reads the server.
    run(&mut cmd("blockdev", ["--flushbufs", &loopdev])).unwrap();
    run(&mut cmd("mount", ["-t", "ext4", "-o", "ro", &loopdev, &mnt_s])).unwrap();
    mounted.set(true);
    check_files(&mnt);
    run(&mut cmd("umount", [&mnt_s])).unwrap();
    mounted.set(false);
    srv.assert_running();
}
