//! `clusterd move` (issue 23, point 5): refused towards a node that cannot
//! take the group now, and done only once the group is served on the
//! target (its services started, as the cluster log records it), not merely
//! granted. Three hosts in network namespaces; needs root.

use std::time::Duration;

use tests::cluster::{service_resources, Cluster, ClusterOptions, NAMES};
use tests::util::wait_until;
use tests::{have_root, have_tools, TestDir};

/// An OCF agent whose start takes 2 s: a move that returned at the grant
/// (the old behaviour) would return before it ran.
const SLOW_AGENT: &str = r#"#!/bin/sh
st="$OCF_RESKEY_dir/slow-$OCF_RESKEY_CRM_meta_on_node"
case "$1" in
start) sleep 2; touch "$st"; exit 0 ;;
stop) rm -f "$st"; exit 0 ;;
monitor) [ -e "$st" ] && exit 0; exit 7 ;;
meta-data|validate-all) exit 0 ;;
*) exit 3 ;;
esac
"#;

fn setup(name: &str) -> Option<(TestDir, Cluster)> {
    if !have_root("network namespaces, iptables and service addresses") {
        return None;
    }
    if !have_tools(&["ip", "iptables", "python3"]) {
        return None;
    }
    let dir = TestDir::new(name);
    let agent = dir.path().join("slow-ocf");
    std::fs::write(&agent, SLOW_AGENT).unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let slow = format!(
        "\n[[group.resource]]\nname = \"slow\"\nkind = \"ocf\"\nagent = \"{}\"\nparams = {{ dir = \"@DIR@\" }}\n",
        agent.display()
    );
    let opts = ClusterOptions {
        resources: service_resources("@DIR@/standin-state") + &slow,
        extra: String::new(),
        mkfs: false,
        prepare: None,
    };
    let cluster = Cluster::new(&dir, &opts).expect("three-host cluster");
    Some((dir, cluster))
}

fn served_by(c: &Cluster, i: usize) -> Option<String> {
    c.status(i).ok()?["groups"][0]["served_by"].as_str().map(str::to_owned)
}

fn all_started(c: &Cluster, i: usize) -> bool {
    c.status(i).is_ok_and(|s| {
        let g = &s["groups"][0];
        g["writable"] == true
            && g["resources"].as_array().is_some_and(|r| !r.is_empty() && r.iter().all(|r| r["state"] == "started"))
    })
}

#[test]
fn move_returns_only_once_the_target_serves_the_group() {
    let Some((_dir, mut c)) = setup("cl-move-served") else { return };
    c.start_all().unwrap();
    let p = c.wait_running(Duration::from_secs(30)).unwrap();
    let q = 1 - p;
    wait_until(Duration::from_secs(10), "status to say who serves the group", || {
        served_by(&c, 2).as_deref() == Some(NAMES[p])
    })
    .unwrap();
    // Asked on the witness, which runs nothing: it can only know from the log.
    let out = c.ctl_ok(2, &["move", "mail", NAMES[q], "--timeout", "60"]).unwrap();
    assert!(out.stdout.contains(&format!("mail: now on {}", NAMES[q])), "{}", out.describe());
    // At that instant the target runs every resource.
    assert!(all_started(&c, q), "move said done before {} served the group:\n{}", NAMES[q], c.describe());
    assert!(c.volume_writable(q), "{}", c.describe());
    // And a move that cannot finish in time says so.
    let out = c.ctl(q, &["move", "mail", NAMES[p], "--timeout", "0"]).unwrap();
    assert!(!out.success() && out.stderr.contains("not yet served"), "{}", out.describe());
}

#[test]
fn move_to_an_offline_node_is_refused_with_the_fix() {
    let Some((_dir, mut c)) = setup("cl-move-offline") else { return };
    c.start_all().unwrap();
    let p = c.wait_running(Duration::from_secs(30)).unwrap();
    let q = 1 - p;
    wait_until(Duration::from_secs(20), "the group served", || served_by(&c, p).as_deref() == Some(NAMES[p])).unwrap();
    c.daemons[q] = None; // SIGKILL of clusterd on q (its replicator stays up)
    wait_until(Duration::from_secs(20), "q reported offline", || {
        c.status(p).is_ok_and(|s| s["nodes"][q]["state"] == "offline")
    })
    .unwrap();
    let out = c.ctl(p, &["move", "mail", NAMES[q], "--timeout", "5"]).unwrap();
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("{} is offline", NAMES[q])) && out.stderr.contains("start clusterd"),
        "{}",
        out.describe()
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "one line: {}", out.stderr);
    // Nothing moved.
    assert!(all_started(&c, p), "{}", c.describe());
}
