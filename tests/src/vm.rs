//! Qemu TCG guests booted with the host's Debian kernel and an initramfs
//! from `kernel-glue/vm/build-initramfs.sh`; `kernel-glue/vm/guest-init.sh`
//! runs the scenario named on the kernel command line and reports on the
//! serial console (lines starting with `GLUE-`, the last `GLUE-RESULT`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::server::Daemon;
use crate::util::{cmd, have_root, have_tools, run, skip, TestDir};

/// A TCG guest boots in about 6 s; a scenario takes 15-30 s on a loaded
/// 2-core machine. Generous, but a hang still fails the test.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(240);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The newest Debian kernel with its modules, if installed.
pub fn kernel_version() -> Option<String> {
    let mut v: Vec<String> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_string))
        .filter(|v| Path::new("/lib/modules").join(v).join("modules.dep").exists())
        .collect();
    v.sort();
    v.pop()
}

/// The kernel version to boot, or `None` (after printing why) when the
/// tools, root or a kernel are missing.
pub fn prerequisites(why_root: &str) -> Option<String> {
    if !have_tools(&["qemu-system-x86_64", "socat", "busybox", "cpio", "nbdcopy", "mount"]) {
        return None;
    }
    if !have_root(why_root) {
        return None;
    }
    match kernel_version() {
        Some(k) => Some(k),
        None => {
            skip("no /boot/vmlinuz-* with /lib/modules (apt-get install linux-image-amd64)");
            None
        }
    }
}

pub fn build_initramfs(dir: &TestDir, kver: &str) -> PathBuf {
    let out = dir.join("initrd.gz");
    let script = repo().join("kernel-glue/vm/build-initramfs.sh");
    let mut c = cmd("bash", [script.as_os_str(), out.as_os_str(), kver.as_ref()]);
    c.arg(crate::replicator_bin());
    run(&mut c).expect("build the guest initramfs");
    out
}

/// Boots a guest running `scenario`; `disk`, if given, is its virtio disk
/// /dev/vda (raw, host page cache: a killed qemu loses only the guest's
/// own cache, as a power cut does).
pub fn boot(kver: &str, initrd: &Path, port: u16, scenario: &str, extra: &[&str], disk: Option<&Path>) -> Daemon {
    let script = repo().join("kernel-glue/vm/run-guest.sh");
    let mut c = cmd("bash", [script.as_os_str(), kver.as_ref(), initrd.as_os_str()]);
    c.arg(port.to_string()).arg(scenario).args(extra);
    if let Some(disk) = disk {
        c.env("GUEST_DISK", disk);
    }
    Daemon::spawn(c).expect("start qemu")
}

/// Waits for the guest's GLUE-RESULT line and fails with the console log
/// unless it is ok.
pub fn expect_ok(vm: &Daemon) -> String {
    vm.logs.wait_for("GLUE-RESULT", GUEST_DEADLINE).expect("the guest reports a result");
    let text = vm.logs.text();
    assert!(text.contains("GLUE-RESULT ok"), "guest failed; console:\n{text}");
    text
}
