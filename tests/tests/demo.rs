//! README's first command must keep working: the demo program (a local
//! cluster serving mail, a crash, a planned move) runs to its end and finds
//! every accepted message after each step. Needs root.

use std::time::Duration;

use tests::{have_root, have_tools};

#[test]
fn the_demo_serves_mail_through_a_crash_and_a_move() {
    if !have_root("network namespaces, loop devices, FUSE") || !have_tools(&["swaks", "nsenter", "mkfs.ext4"]) {
        return;
    }
    if !std::path::Path::new("/dev/fuse").exists() && !tests::skip("/dev/fuse missing") {
        return;
    }
    let bin = tests::server::workspace_bin("demo", "DEMO_BIN");
    let out = tests::run_output(&mut std::process::Command::new(bin), Duration::from_secs(300)).unwrap();
    assert!(out.success(), "{}", out.describe());
    for needle in [
        "alice's Maildir on a: 5 messages",
        "alice's Maildir on b: 5 messages",
        "Maildir on", // after the crash: 10
        "demo finished: no accepted mail was lost",
    ] {
        assert!(out.stdout.contains(needle), "missing {needle:?} in:\n{}", out.stdout);
    }
    assert_eq!(out.stdout.matches(": 10 messages").count(), 2, "{}", out.stdout);
    assert_eq!(out.stdout.matches("250 ").count(), 10, "every message answered 250:\n{}", out.stdout);
}
