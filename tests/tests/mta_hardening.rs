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
