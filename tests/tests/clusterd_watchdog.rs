//! `[watchdog]` end to end with a fake device (a regular file records the
//! keepalives and the magic close): `mode = "required"` refuses to run
//! without the device, pets it, disarms it on a clean exit, and makes the
//! survivor wait out lease + watchdog timeout after the owner's death.
//! Three hosts in network namespaces; needs root.

use std::time::{Duration, Instant};

use tests::cluster::{service_resources, Cluster, ClusterOptions};
use tests::util::wait_until;
use tests::{have_root, have_tools, TestDir};

const WATCHDOG_MS: u64 = 4000;

fn setup(name: &str, device: &str) -> Option<(TestDir, Cluster)> {
    if !have_root("network namespaces, iptables and service addresses") || !have_tools(&["ip", "iptables", "python3"]) {
        return None;
    }
    let dir = TestDir::new(name);
    let opts = ClusterOptions {
        resources: service_resources("@DIR@/standin-state"),
        extra: format!("[watchdog]\nmode = \"required\"\ndevice = \"{device}\"\ntimeout_ms = {WATCHDOG_MS}\n"),
        mkfs: false,
        prepare: None,
    };
    let cluster = Cluster::new(&dir, &opts).expect("three-host cluster");
    Some((dir, cluster))
}

#[test]
fn a_required_watchdog_is_petted_disarmed_on_exit_and_waited_out_after_a_death() {
    let Some((dir, mut c)) = setup("cl-wd", "@DIR@/watchdog") else { return };
    let device = dir.path().join("watchdog");
    std::fs::write(&device, b"").unwrap();
    c.start_all().unwrap();
    let p = c.wait_running(Duration::from_secs(30)).unwrap();
    let q = 1 - p;
    // Both storage nodes pet (every quarter timeout): the file grows.
    let len = || std::fs::metadata(&device).map(|m| m.len()).unwrap_or(0);
    let before = len();
    wait_until(Duration::from_secs(10), "keepalives", || len() >= before + 4).unwrap();
    assert!(!std::fs::read(&device).unwrap().contains(&b'V'), "no magic close while running");

    // kill -9 of the owner's host: the survivor waits for its lease plus
    // the watchdog's timeout (the owner would have been reset by then).
    let t0 = Instant::now();
    c.kill_host(p);
    c.wait_running_on(q, Duration::from_secs(40)).unwrap();
    let took = t0.elapsed();
    eprintln!("takeover after kill -9 with a {WATCHDOG_MS} ms watchdog: {took:?}");
    assert!(
        took >= Duration::from_millis(WATCHDOG_MS),
        "took over after {took:?}, before the dead owner's watchdog could have fired"
    );

    // A clean exit holding nothing disarms (magic close: 'V' last). The
    // witness never opens the device.
    c.terminate(2).unwrap();
    c.terminate(q).unwrap();
    let bytes = std::fs::read(&device).unwrap();
    assert_eq!(bytes.last(), Some(&b'V'), "the clean exit ends with the magic close");
}

#[test]
fn a_required_watchdog_that_is_missing_stops_the_daemon_with_the_fix() {
    let Some((_dir, mut c)) = setup("cl-wd-missing", "/nonexistent/watchdog") else { return };
    let err = c.start(0).unwrap_err().to_string();
    assert!(
        err.contains("failed to open the watchdog /nonexistent/watchdog") && err.contains("load the driver"),
        "{err}"
    );
}
