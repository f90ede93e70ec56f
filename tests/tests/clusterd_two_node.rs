//! clusterd end to end in two-node mode: storage hosts `a` and `b` in
//! network namespaces, no witness, a replicated resource and a group with a
//! service address and a stand-in service. Needs root.

use std::time::{Duration, Instant};

use tests::cluster::{agent, service_resources, Cluster, ClusterOptions, NAMES};
use tests::{have_root, have_tools, wait_until, TestDir};

fn setup(name: &str, extra: String) -> Option<(TestDir, Cluster)> {
    if !have_root("network namespaces, iptables and service addresses") {
        return None;
    }
    if !have_tools(&["ip", "iptables", "python3"]) {
        return None;
    }
    let dir = TestDir::new(name);
    let opts =
        ClusterOptions { resources: service_resources("@DIR@/standin-state"), extra, mkfs: false, prepare: None };
    let cluster = Cluster::new_two_node(&dir, &opts).expect("two-host cluster");
    Some((dir, cluster))
}

/// `[[fence]]` for both storage nodes with `agent`, plus the failover
/// settings (a short fence delay keeps the tests short).
fn fenced_with(agent_path: &str) -> String {
    let mut t = "[failover]\nfence_delay_ms = 1000\n".to_string();
    for n in ["a", "b"] {
        t.push_str(&format!(
            "\n[[fence]]\nnode = \"{n}\"\nagent = \"{agent_path}\"\ntimeout_ms = 10000\n\
             args = {{ netns = \"@NETNS_{n}@\", link = \"eth0\" }}\n"
        ));
    }
    t
}

/// The two-node line of node `i`'s status ("" when it does not answer).
fn two_node_line(c: &Cluster, i: usize) -> String {
    c.status(i).ok().and_then(|s| s["two_node"].as_str().map(str::to_owned)).unwrap_or_default()
}

#[test]
fn kill_9_of_the_primary_is_fenced_and_the_survivor_serves_alone_then_takes_it_back() {
    let fence = agent("fence_netns");
    let Some((_dir, mut c)) = setup("tn-kill", fenced_with(&fence.display().to_string())) else { return };
    c.start_all().unwrap();
    let p = c.wait_running(Duration::from_secs(30)).unwrap();
    let q = 1 - p;
    assert!(two_node_line(&c, q).contains("both nodes vote"), "{}", c.describe());
    let t0 = Instant::now();
    c.kill_host(p);
    c.wait_running_on(q, Duration::from_secs(30)).unwrap();
    eprintln!("two-node failover after kill -9: {:?}", t0.elapsed());
    let s = c.status(q).unwrap();
    assert_eq!(s["groups"][0]["owner"], NAMES[q], "{s}");
    assert!(s["two_node"].as_str().unwrap_or("").contains("only voter"), "{s}");
    assert!(
        s["fences"].as_array().unwrap().iter().any(|f| f["node"] == NAMES[p] && f["ok"] == true),
        "the fence is in the log's history: {s}"
    );
    // The fence agent took the dead host's link down.
    let link = tests::run_output(
        &mut tests::cmd("ip", ["-n", &c.pair.net.host(p).ns, "-o", "link", "show", "eth0"]),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(!link.stdout.contains(",UP") && !link.stdout.contains("<UP"), "{}", link.stdout);
    let record = std::fs::read_to_string(c.dir.join(format!("state-{}", NAMES[q])).join("two-node-fences")).unwrap();
    assert!(record.contains(&format!("{} fenced", NAMES[p])), "{record}");

    // The fenced node comes back (link up, replicator, clusterd): it is
    // added back as a voter, the group stays where it is (sticky), and the
    // pair has quorum together again.
    let ns = c.pair.net.host(p).ns.clone();
    let up =
        tests::run_output(&mut tests::cmd("ip", ["-n", &ns, "link", "set", "eth0", "up"]), Duration::from_secs(10));
    assert!(up.unwrap().success());
    c.pair.start(p).unwrap();
    c.start(p).unwrap();
    wait_until(Duration::from_secs(30), "the returned node added back and following", || {
        two_node_line(&c, q).contains("both nodes vote")
            && c.status(p).is_ok_and(|s| s["quorum"] == true && s["leader"] == NAMES[q])
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.describe()));
    c.wait_running_on(q, Duration::from_secs(20)).unwrap();
    assert!(!c.volume_writable(p), "{}", c.describe());
}

#[test]
fn a_failing_fence_agent_never_lets_the_survivor_promote() {
    let Some((_dir, mut c)) = setup("tn-fail", fenced_with("/bin/false")) else { return };
    c.start_all().unwrap();
    let p = c.wait_running(Duration::from_secs(30)).unwrap();
    let q = 1 - p;
    c.kill_host(p);
    wait_until(Duration::from_secs(20), "the survivor reports the failed fence", || {
        two_node_line(&c, q).contains("FAILED")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.describe()));
    // Watch well past deadtime + lease + the fence retry: never promoted.
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        assert!(!c.volume_writable(q), "promoted without a successful fence\n{}", c.describe());
        let s = c.status(q).unwrap();
        assert_ne!(s["groups"][0]["writable"], true, "{s}");
        assert_eq!(s["quorum"], false, "{s}");
    }
    let line = two_node_line(&c, q);
    assert!(line.contains("--confirm-down") && line.contains("Fix the fence device"), "{line}");
    let logs = c.daemons[q].as_ref().unwrap().logs.text();
    assert!(logs.contains("fence-failed") && logs.contains("will NOT take over"), "{logs}");
}

#[test]
fn manual_mode_waits_for_the_admin_to_confirm_the_peer_is_down() {
    let Some((_dir, mut c)) = setup("tn-manual", "[failover]\nautomatic = false\n".into()) else { return };
    c.start_all().unwrap();
    let p = c.wait_running(Duration::from_secs(30)).unwrap();
    let q = 1 - p;
    // While the peer runs, --confirm-down is refused.
    let out = c.ctl(q, &["fence", NAMES[p], "--confirm-down", "--yes"]).unwrap();
    assert!(!out.success() && out.stderr.contains("alive"), "{}", out.describe());
    c.kill_host(p);
    wait_until(Duration::from_secs(20), "the survivor tells the admin what to do", || {
        two_node_line(&c, q).contains(&format!("clusterd fence {} --confirm-down", NAMES[p]))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.describe()));
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        assert!(!c.volume_writable(q), "manual mode promoted by itself\n{}", c.describe());
    }
    let out = c.ctl_ok(q, &["fence", NAMES[p], "--confirm-down", "--yes"]).unwrap();
    assert!(out.stdout.contains("only voter"), "{}", out.describe());
    c.wait_running_on(q, Duration::from_secs(30)).unwrap();
    let s = c.status(q).unwrap();
    assert_eq!(s["groups"][0]["owner"], NAMES[q], "{s}");
    assert!(s["two_node"].as_str().unwrap_or("").contains("only voter"), "{s}");
}
