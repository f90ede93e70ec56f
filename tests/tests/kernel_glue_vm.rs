//! kernel-glue's kernel path in real VMs: the Debian kernel boots under
//! qemu TCG with an initramfs from `kernel-glue/vm/build-initramfs.sh`; in
//! the guest, `replicator attach --method kernel` connects /dev/nbd0 to the
//! replicator serving on this host through our generic-netlink code, makes
//! ext4, writes and fsyncs; the host then reads the export with nbdcopy
//! and checks the files; it also attaches through the ioctl interface and
//! force-detaches under a mounted filesystem. The second guest keeps writing while the host
//! restarts the server: the kernel queues I/O on the dead connection and
//! `attach`'s keeper hands it a new socket (NBD_CMD_RECONFIGURE).

use std::path::Path;
use std::time::Duration;

use tests::util::run_output;
use tests::vm::{build_initramfs, expect_ok, GUEST_DEADLINE};
use tests::{assert_same_bytes, cmd, run, Daemon, Server, TestDir, Volume, MIB};

fn prerequisites() -> Option<String> {
    tests::vm::prerequisites("loop-mounting the exported image")
}

fn boot(kver: &str, initrd: &Path, port: u16, scenario: &str, extra: &[&str]) -> Daemon {
    tests::vm::boot(kver, initrd, port, scenario, extra, None)
}

/// Reads the export with nbdcopy, loop-mounts the copy read-only and
/// returns the files asked for.
fn files_through_nbd(dir: &TestDir, srv: &Server, names: &[&str]) -> Vec<Vec<u8>> {
    let img = dir.join("export.img");
    run(&mut cmd("nbdcopy", [&srv.uri(), img.to_str().unwrap()])).unwrap();
    let mnt = dir.join("check");
    std::fs::create_dir_all(&mnt).unwrap();
    // noload: a filesystem left mounted by a forced detach has a journal
    // that a read-only mount must not try to replay.
    run(&mut cmd("mount", ["-o", "loop,ro,noload", img.to_str().unwrap(), mnt.to_str().unwrap()])).unwrap();
    let got: Vec<std::io::Result<Vec<u8>>> = names.iter().map(|n| std::fs::read(mnt.join(n))).collect();
    let absent = !mnt.join("after-force.txt").exists();
    let _ = run_output(&mut cmd("umount", [mnt.to_str().unwrap()]), Duration::from_secs(30));
    assert!(absent, "a file written after the forced detach reached the volume");
    got.into_iter().zip(names).map(|(r, n)| r.unwrap_or_else(|e| panic!("{n} in the export: {e}"))).collect()
}

/// `yes LINE | head -c LEN`.
fn yes(line: &str, len: usize) -> Vec<u8> {
    let l = format!("{line}\n");
    l.as_bytes().iter().copied().cycle().take(len).collect()
}

#[test]
fn kernel_nbd_in_vm_ext4_written_in_guest_verified_on_host() {
    let Some(kver) = prerequisites() else { return };
    let dir = TestDir::new("kg-vm");
    let initrd = build_initramfs(&dir, &kver);
    let vol = Volume::create(&dir, 128 * MIB).unwrap();
    let mut srv = Server::start_tcp(&vol).unwrap();
    let vm = boot(&kver, &initrd, srv.addr().port(), "basic", &[]);
    let console = expect_ok(&vm);

    // The device as the kernel configured it from our netlink request.
    let queue = console.lines().find(|l| l.starts_with("GLUE-QUEUE")).expect("GLUE-QUEUE line");
    for want in ["logical_block_size=4096", "write_cache=write_back", "fua=1"] {
        assert!(queue.contains(want), "{want} missing: {queue}");
    }
    let max_kb: u64 = queue
        .split_whitespace()
        .find_map(|w| w.strip_prefix("max_sectors_kb="))
        .and_then(|v| v.parse().ok())
        .expect("max_sectors_kb");
    assert!(max_kb >= 1024, "1 MiB requests do not fit: {queue}");
    assert!(
        console.contains("GLUE-DETACH-BUSY") && console.contains("mounted on /mnt"),
        "detach while mounted was not refused:\n{console}"
    );
    assert!(console.contains("kernel nbd connected (netlink)"), "not the netlink path:\n{console}");
    let backend = format!("GLUE-BACKEND nbd://10.0.2.100:{}/volume", srv.addr().port());
    assert!(console.lines().any(|l| l.trim() == backend), "no {backend:?} line:\n{console}");

    assert!(console.contains("kernel nbd connected (ioctl fallback)"), "the ioctl path did not run:\n{console}");
    assert!(console.contains("GLUE-FORCED ok"), "forced detach scenario missing:\n{console}");

    let got = files_through_nbd(&dir, &srv, &["seq.txt", "big.txt", "ioctl.txt"]);
    let seq = |n: u32| -> String { (1..=n).map(|i| format!("{i}\n")).collect() };
    assert_same_bytes("seq.txt", &got[0], seq(200_000).as_bytes());
    assert_same_bytes("big.txt", &got[1], &yes("glue-data-line", 16 * MIB as usize));
    assert_same_bytes("ioctl.txt (written through the ioctl path)", &got[2], seq(5000).as_bytes());
    srv.assert_running();
}

#[test]
fn kernel_nbd_in_vm_survives_server_restart_under_mounted_fs() {
    let Some(kver) = prerequisites() else { return };
    const ROUNDS: usize = 12;
    let dir = TestDir::new("kg-vm-rs");
    let initrd = build_initramfs(&dir, &kver);
    let vol = Volume::create(&dir, 128 * MIB).unwrap();
    let mut srv = Server::start_tcp(&vol).unwrap();
    let port = srv.addr().port();
    let vm = boot(&kver, &initrd, port, "restart", &[&format!("glue.rounds={ROUNDS}")]);
    vm.logs.wait_for("GLUE-ROUND 2", GUEST_DEADLINE).unwrap_or_else(|e| panic!("{e:#}"));

    // Restart under the mounted filesystem, on the same port.
    let status = srv.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "server exit {status}");
    let listen = format!("127.0.0.1:{port}");
    srv = Server::start(&vol, &["--listen", &listen]).unwrap();

    let console = expect_ok(&vm);
    assert!(console.contains("nbd connection dead"), "the kernel never reported the dead link:\n{console}");
    assert!(console.contains("connections=2"), "not two connections:\n{console}");
    let reconfigured = console.matches("NBD_CMD_RECONFIGURE").count();
    assert!(reconfigured >= 2, "{reconfigured} reconfigures for two dead connections:\n{console}");
    let got = files_through_nbd(&dir, &srv, &["log.txt"]);
    let want: Vec<u8> = (0..ROUNDS).flat_map(|i| yes(&format!("round-{i}"), 262_144)).collect();
    assert_same_bytes("log.txt", &got[0], &want);
    srv.assert_running();
}
