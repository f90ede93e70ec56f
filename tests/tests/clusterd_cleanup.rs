//! `clusterd cleanup GROUP` (issue 23, point 6): a way out of a stop
//! failure without waiting for the retry's backoff — the stop is retried at
//! once and the group moves on. Three hosts in network namespaces; needs root.

use std::time::{Duration, Instant};

use tests::cluster::{full_stack_resources, Cluster, ClusterOptions, NAMES};
use tests::util::wait_until;
use tests::{have_root, have_tools, TestDir};

/// An OCF agent whose stop fails unless `$dir/allow-stop` exists (the
/// last step: stopped first, so nothing below it stops either).
const STUBBORN_AGENT: &str = r#"#!/bin/sh
st="$OCF_RESKEY_dir/stubborn-$OCF_RESKEY_CRM_meta_on_node"
case "$1" in
start) touch "$st"; exit 0 ;;
stop) [ -e "$OCF_RESKEY_dir/allow-stop" ] || { echo "stop refused" >&2; exit 1; }; rm -f "$st"; exit 0 ;;
monitor) [ -e "$st" ] && exit 0; exit 7 ;;
meta-data|validate-all) exit 0 ;;
*) exit 3 ;;
esac
"#;

fn served_by(c: &Cluster, i: usize) -> Option<String> {
    c.status(i).ok()?["groups"][0]["served_by"].as_str().map(str::to_owned)
}

/// The full stack plus the stubborn agent, running on p; its stop then
/// refused and a planned move to q started: returns (dir, cluster, p, q,
/// the allow-stop file) once the stop was retried `retries` times.
fn stuck_move(name: &str, retries: usize) -> Option<(TestDir, Cluster, usize, usize, std::path::PathBuf)> {
    if !have_root("network namespaces, iptables and service addresses") || !have_tools(&["ip", "iptables", "python3"]) {
        return None;
    }
    let dir = TestDir::new(name);
    let agent = dir.path().join("stubborn-ocf");
    std::fs::write(&agent, STUBBORN_AGENT).unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let allow = dir.path().join("allow-stop");
    std::fs::write(&allow, b"").unwrap();
    let stubborn = format!(
        "\n[[group.resource]]\nname = \"stubborn\"\nkind = \"ocf\"\nagent = \"{}\"\nparams = {{ dir = \"@DIR@\" }}\n",
        agent.display()
    );
    let opts = ClusterOptions {
        // The full stack: the failed stop leaves the file system mounted, so
        // the volume cannot demote and the move waits for the stop.
        resources: full_stack_resources() + &stubborn,
        extra: String::new(),
        mkfs: true,
        prepare: None,
    };
    let mut c = Cluster::new(&dir, &opts).expect("three-host cluster");
    c.start_all().unwrap();
    let p = c.wait_running(Duration::from_secs(30)).unwrap();
    let q = 1 - p;
    wait_until(Duration::from_secs(20), "the group served", || served_by(&c, p).as_deref() == Some(NAMES[p])).unwrap();
    // The stop on p fails: the planned move is stuck, retried with a
    // backoff growing to 8 s.
    std::fs::remove_file(&allow).unwrap();
    c.ctl_ok(p, &["move", "mail", NAMES[q], "--no-wait"]).unwrap();
    let count = |c: &Cluster| {
        c.daemons[p].as_ref().map_or(0, |d| d.logs.text().matches("the release's demotion has not finished").count())
    };
    wait_until(Duration::from_secs(40), "retries of the stuck stop", || count(&c) >= retries).unwrap();
    assert_ne!(served_by(&c, 2).as_deref(), Some(NAMES[q]), "{}", c.describe());
    Some((dir, c, p, q, allow))
}

#[test]
fn cleanup_of_a_group_retries_its_stuck_stop_at_once() {
    // Four repeats (after 1, 2, 4 and 8 s): the next is 8 s away.
    let Some((_dir, c, p, q, allow)) = stuck_move("cl-cleanup", 4) else { return };
    // The cause is fixed; cleanup retries at once instead of in up to 8 s.
    std::fs::write(&allow, b"").unwrap();
    let t0 = Instant::now();
    let out = c.ctl_ok(p, &["cleanup", "mail"]).unwrap();
    assert!(out.stdout.contains(&format!("re-probed on {}", NAMES[p])), "{}", out.describe());
    wait_until(Duration::from_secs(20), "the group served on q", || served_by(&c, 2).as_deref() == Some(NAMES[q]))
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "served on {} {took:?} after cleanup (the backoff was not cut short)",
        NAMES[q]
    );
}

/// Without the admin: once the cause is gone, the next retry finishes the
/// move. (The executor held the volume's I/O when the stop failed; the
/// service on the file system then hung in every retried stop, and the move
/// never finished.)
#[test]
fn a_stuck_stop_recovers_by_itself_once_its_cause_is_gone() {
    let Some((_dir, c, _p, q, allow)) = stuck_move("cl-stuck-recovers", 2) else { return };
    std::fs::write(&allow, b"").unwrap();
    // The next retry comes within 4 s; the standin's stop would time out
    // after 20 s if it hung on held I/O.
    wait_until(Duration::from_secs(15), "the group served on q", || served_by(&c, 2).as_deref() == Some(NAMES[q]))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.describe()));
}
