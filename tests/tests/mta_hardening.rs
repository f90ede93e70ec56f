//! The mta must not die and must not leak (issue 20): log writes that
//! fail, a second instance on the same data directory, file modes.

use std::time::Duration;

use tests::mta::{metric, scrape, swaks, MailTree};
use tests::require_tools;

// Issue 20: `mta serve 2>/dev/full` died at start-up (eprintln! and
// tracing-subscriber's error report panic on a failed write). Failed log
// writes are now counted and dropped, and mail keeps flowing.
#[test]
fn serve_with_stderr_on_dev_full_keeps_delivering_and_counts_lost_lines() {
    require_tools!("swaks");
    let metrics_port = tests::server::free_port().unwrap();
    let tree = MailTree::new("mta-dev-full", &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""), None).unwrap();
    tree.populate().unwrap();
    let [mx, _, _] = tree.pin_ports().unwrap();
    let mut mta = tree.serve_blind(std::path::Path::new("/dev/full"), mx).unwrap();
    for i in 1..=5 {
        let subject = format!("Subject: full log {i}");
        let out =
            swaks(mx, &["--from", "someone@remote.test", "--to", "alice@example.org", "--header", &subject]).unwrap();
        assert!(out.success(), "swaks failed\n{}", out.describe());
        tree.wait_messages("alice@example.org", i, Duration::from_secs(30)).unwrap();
    }
    assert!(mta.is_running(), "mta died with stderr on /dev/full");
    let text = scrape(([127, 0, 0, 1], metrics_port).into()).unwrap();
    let lost = metric(&text, "mta_log_write_failures_total").unwrap_or_else(|| panic!("no counter in\n{text}"));
    assert!(lost >= 5.0, "expected lost log lines to be counted\n{text}");
}

// Issue 20: two servers on one data directory both started, then
// delivered the same queue files twice. The second now refuses and names
// the first one's PID; queue changes go through the running server's
// admin socket (so they never race its delivery task).
#[test]
fn second_instance_refuses_and_queue_changes_go_through_the_server() {
    let tree = MailTree::new("mta-lock", "", None).unwrap();
    tree.populate().unwrap();
    let first = tree.serve().unwrap();
    let holder = format!("PID {}", first.pid());

    let out = tests::util::run_output(&mut tree.mta(["serve"]), Duration::from_secs(30)).unwrap();
    assert!(!out.success(), "a second server started on the same data directory\n{}", out.describe());
    assert!(out.stderr.contains("in use by another mta") && out.stderr.contains(&holder), "{}", out.describe());

    let out = tree.admin(&["queue", "flush"]).unwrap();
    assert_eq!(out.stdout.trim(), "0 messages due now");
    let out = tests::util::run_output(&mut tree.mta(["queue", "hold", "abc123"]), Duration::from_secs(30)).unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert!(out.stderr.contains(&holder) && out.stderr.contains("no queued message"), "{}", out.describe());
    assert!(tree.admin(&["queue", "list"]).unwrap().success());
    assert!(first.log().contains("queue flushed by the admin"), "{}", first.log());

    // The lock dies with its process: no stale lock (or socket) after kill -9.
    drop(first);
    let again = tree.serve().unwrap();
    assert!(again.log().contains("mta: ready"));
    let out = tree.admin(&["queue", "flush"]).unwrap();
    assert_eq!(out.stdout.trim(), "0 messages due now");
}
