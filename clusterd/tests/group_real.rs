//! The resource-group shell against real processes: a service IP in a
//! network namespace, the OCF stand-in service (tests/agents/ocf-standin),
//! the real ocf:heartbeat:IPaddr2 when resource-agents is installed, and an
//! ext4 filesystem on a loop device. Needs root (skipped otherwise, failed
//! under CI).
//!
//! Each namespace test runs its tokio runtime on its own thread moved into
//! the namespace (setns), so every command the shell starts runs there.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clusterd::fence::{run_agent, AgentExit, FenceAction, FenceAgent, FencePlan};
use clusterd::group::{self, GroupContext, GroupEvent, GroupSection, StepState};
use tokio::sync::mpsc;

const EVENT_WAIT: Duration = Duration::from_secs(60);

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test} needs root under CI");
    eprintln!("skipping {test}: needs root");
    false
}

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn agent(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/agents").join(name).canonicalize().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("clusterd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A namespace whose `eth0` is one leg of a veth pair (the other stays in
/// the root namespace, down to nothing), deleted on drop.
struct Netns {
    name: String,
}

fn veth_of(ns: &str) -> String {
    format!("{ns}v")
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("cdg{tag}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        sh("ip", &["netns", "add", &name]);
        let veth = veth_of(&name);
        let _ = Command::new("ip").args(["link", "del", &veth]).stderr(Stdio::null()).status();
        sh("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name]);
        sh("ip", &["link", "set", &veth, "up"]);
        sh("ip", &["-n", &name, "link", "set", "eth0", "up"]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    }

    fn addresses(&self) -> String {
        sh("ip", &["-n", &self.name, "-o", "addr", "show", "dev", "eth0"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill what the group left (a failed test) before deleting.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        // Usually gone with the namespace.
        let _ = Command::new("ip").args(["link", "del", &veth_of(&self.name)]).stderr(Stdio::null()).status();
    }
}

async fn next_event(rx: &mut mpsc::Receiver<GroupEvent>, what: &str) -> GroupEvent {
    match tokio::time::timeout(EVENT_WAIT, rx.recv()).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!("event channel closed waiting for {what}"),
        Err(_) => panic!("no event within {EVENT_WAIT:?} waiting for {what}"),
    }
}

fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    s.read_to_string(&mut line)?;
    Ok(line)
}

fn kill9_from_pidfile(pidfile: &Path) -> String {
    let pid = std::fs::read_to_string(pidfile).unwrap().trim().to_owned();
    sh("kill", &["-9", &pid]);
    pid
}

#[test]
fn ip_standin_and_ipaddr2_restart_then_escalate_then_stop() {
    if !root_or_skip("ip_standin_and_ipaddr2_restart_then_escalate_then_stop") {
        return;
    }
    let ns = Netns::new("a");
    let dir = scratch("group-ns");
    let subnet = 10 + (std::process::id() % 200) as u8;
    let vip = Ipv4Addr::new(10, 239, subnet, 1);
    let vip2 = Ipv4Addr::new(10, 239, subnet, 2);
    let ipaddr2 = Path::new("/usr/lib/ocf/resource.d/heartbeat/IPaddr2");
    let with_ipaddr2 = ipaddr2.exists();
    if !with_ipaddr2 {
        assert!(std::env::var_os("CI").is_none(), "resource-agents is not installed (scripts/install-deps.sh)");
        eprintln!("resource-agents not installed: testing without ocf:heartbeat:IPaddr2");
    }
    let mut toml = format!(
        r#"
name = "mail"
volume = "unused"
[[resource]]
name = "vip"
kind = "ip"
address = "{vip}/24"
interface = "eth0"
monitor_interval_ms = 200
[[resource]]
name = "standin"
kind = "ocf"
agent = "{agent}"
params = {{ ip = "{vip}", port = "7000", statefile = "{dir}/state", pidfile = "{dir}/standin.pid", name = "node-a" }}
monitor_interval_ms = 200
restarts_max = 1
"#,
        agent = agent("ocf-standin").display(),
        dir = dir.display()
    );
    if with_ipaddr2 {
        toml.push_str(&format!(
            "[[resource]]\nname = \"vip2\"\nkind = \"ocf\"\nagent = \"{}\"\n\
             params = {{ ip = \"{vip2}\", cidr_netmask = \"24\", nic = \"eth0\" }}\nmonitor_interval_ms = 500\n",
            ipaddr2.display()
        ));
    }
    let section: GroupSection = toml::from_str(&toml).unwrap();
    let spec = section.validate(true).unwrap();
    let pidfile = dir.join("standin.pid");
    let ns_name = ns.name.clone();
    let run_dir = dir.join("run");

    let thread = std::thread::spawn(move || {
        let ns = Netns { name: ns_name };
        ns.enter();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (h, mut rx) = group::spawn(spec, GroupContext::new(&run_dir));
            h.start().await.unwrap();
            assert_eq!(next_event(&mut rx, "Started").await, GroupEvent::Started);
            let service = SocketAddr::from((vip, 7000));
            let answer = ask(service).unwrap();
            assert!(answer.starts_with("node-a "), "{answer:?}");
            let addrs = ns.addresses();
            assert!(addrs.contains(&format!("inet {vip}/24")), "{addrs}");
            if with_ipaddr2 {
                assert!(addrs.contains(&format!("inet {vip2}/24")), "IPaddr2 did not add {vip2}: {addrs}");
            }

            // The service dies: its monitor notices, it and what follows restart.
            let first = kill9_from_pidfile(&pidfile);
            assert_eq!(next_event(&mut rx, "Recovered").await, GroupEvent::Recovered { step: "standin".into() });
            let answer = ask(service).unwrap();
            assert!(answer.starts_with("node-a "), "{answer:?}");
            assert_ne!(std::fs::read_to_string(&pidfile).unwrap().trim(), first, "the responder was restarted");
            let status = h.status().await.unwrap();
            assert_eq!(status.summary, "started");
            assert_eq!(status.steps[1].restarts, 1);
            // Running again: the restart count stays, the error is gone
            // (issue 23: status kept errors of steps that run).
            assert_eq!(status.steps[1].last_error, None, "{status:?}");

            // Again: beyond restarts_max, the group fails at that step.
            kill9_from_pidfile(&pidfile);
            match next_event(&mut rx, "Failed").await {
                GroupEvent::Failed { step, why } => {
                    assert_eq!(step, "standin");
                    assert!(why.contains("OCF_NOT_RUNNING") || why.contains("not running"), "{why}");
                }
                other => panic!("expected Failed, got {other:?}"),
            }
            let status = h.status().await.unwrap();
            assert_eq!(status.summary, "partial");
            assert_eq!(status.steps[0].state, StepState::Started);
            assert_eq!(status.steps[1].state, StepState::Failed);
            let addrs = ns.addresses();
            assert!(addrs.contains(&format!("inet {vip}/24")), "the IP below the failed step stays: {addrs}");
            assert!(!addrs.contains(&format!("inet {vip2}/")), "the step after the failed one is stopped: {addrs}");
            assert!(ask(service).is_err(), "the stand-in still answers");

            h.stop().await.unwrap();
            assert_eq!(next_event(&mut rx, "Stopped").await, GroupEvent::Stopped);
            let addrs = ns.addresses();
            assert!(!addrs.contains(&format!("inet {vip}/")), "stop left the address: {addrs}");
        });
        std::mem::forget(ns); // the outer handle deletes it
    });
    let result = thread.join();
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A loop device over an image file, detached on drop.
struct Loop {
    device: String,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// Unmounts (lazily) on drop, if still mounted: a failed test leaves nothing.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn mounted(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

#[test]
fn filesystem_on_a_loop_device_fsck_mount_remount_umount() {
    if !root_or_skip("filesystem_on_a_loop_device_fsck_mount_remount_umount") {
        return;
    }
    let dir = scratch("group-fs");
    let image = dir.join("fs.img");
    std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
    sh("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
    let lo = Loop { device: sh("losetup", &["--find", "--show", image.to_str().unwrap()]).trim().to_owned() };
    let mnt = dir.join("mnt");
    let _unmount = Unmount(mnt.clone());
    let spec = |force: bool| {
        let toml = format!(
            "name = \"fs\"\nvolume = \"unused\"\n[[resource]]\nname = \"data\"\nkind = \"filesystem\"\n\
             device = \"{}\"\ndirectory = \"{}\"\nfstype = \"ext4\"\noptions = \"noatime\"\n\
             monitor_interval_ms = 200\nforce_unmount = {force}\n",
            lo.device,
            mnt.display()
        );
        toml::from_str::<GroupSection>(&toml).unwrap().validate(true).unwrap()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (h, mut rx) = group::spawn(spec(false), GroupContext::new(dir.join("run")));
        h.start().await.unwrap();
        assert_eq!(next_event(&mut rx, "Started").await, GroupEvent::Started);
        assert!(mounted(&mnt), "not mounted after start");
        std::fs::write(mnt.join("mail"), b"kept").unwrap();
        // Unmounted behind the group's back: the monitor notices and remounts.
        sh("umount", &[mnt.to_str().unwrap()]);
        assert_eq!(next_event(&mut rx, "Recovered").await, GroupEvent::Recovered { step: "data".into() });
        assert!(mounted(&mnt));
        assert_eq!(std::fs::read(mnt.join("mail")).unwrap(), b"kept");
        // Without force_unmount a busy mount point fails the stop.
        let mut cwd_holder = Command::new("sleep").arg("60").current_dir(&mnt).spawn().unwrap();
        h.stop().await.unwrap();
        let event = next_event(&mut rx, "StopFailed").await;
        assert!(
            matches!(&event, GroupEvent::StopFailed { step, why } if step == "data" && why.contains("umount")),
            "{event:?}"
        );
        assert_eq!(cwd_holder.try_wait().unwrap(), None, "the user was killed without force_unmount");
        cwd_holder.kill().unwrap();
        cwd_holder.wait().unwrap();
        // Retried, it stops.
        h.stop().await.unwrap();
        assert_eq!(next_event(&mut rx, "Stopped").await, GroupEvent::Stopped);
        assert!(!mounted(&mnt), "still mounted after stop");

        // With force_unmount (the default) the users are killed and the stop succeeds.
        let (h, mut rx) = group::spawn(spec(true), GroupContext::new(dir.join("run")));
        h.start().await.unwrap();
        assert_eq!(next_event(&mut rx, "Started").await, GroupEvent::Started);
        let mut cwd_holder = Command::new("sleep").arg("60").current_dir(&mnt).spawn().unwrap();
        h.stop().await.unwrap();
        assert_eq!(next_event(&mut rx, "Stopped").await, GroupEvent::Stopped);
        assert!(!mounted(&mnt), "still mounted after a forced stop");
        let status = cwd_holder.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status:?}");
    });
    drop(_unmount);
    drop(lo);
    let _ = std::fs::remove_dir_all(&dir);
}

fn fence(agent_args: Vec<(String, String)>, target: &str, action: FenceAction) -> AgentExit {
    let device = FenceAgent { name: "netns".into(), path: agent("fence_netns"), args: agent_args, timeout_ms: 20_000 };
    let plan = FencePlan::new(target, action, vec![vec![device]]).unwrap();
    run_agent(&plan.next_request().unwrap())
}

#[test]
fn fence_netns_kills_the_host_and_cuts_its_link() {
    if !root_or_skip("fence_netns_kills_the_host_and_cuts_its_link") {
        return;
    }
    let ns = Netns::new("f");
    let mut inside = Command::new("ip").args(["netns", "exec", &ns.name, "sleep", "600"]).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sh("ip", &["netns", "pids", &ns.name]).trim().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the process never entered {}", ns.name);
        std::thread::sleep(Duration::from_millis(10));
    }
    let by_netns = vec![("netns".to_string(), ns.name.clone())];
    // clusterd sends nodename=<node>; netns= maps it to the namespace.
    assert_eq!(fence(by_netns.clone(), "node-a", FenceAction::Status), AgentExit::Code(0));
    assert_eq!(fence(by_netns.clone(), "node-a", FenceAction::Off), AgentExit::Code(0));
    let status = inside.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "not killed: {status:?}");
    assert!(sh("ip", &["netns", "pids", &ns.name]).trim().is_empty());
    assert!(!sh("ip", &["-n", &ns.name, "-o", "link", "show", "eth0"]).contains(",UP"), "link still up");
    assert_eq!(fence(by_netns.clone(), "node-a", FenceAction::Status), AgentExit::Code(2));
    assert_eq!(fence(by_netns, "node-a", FenceAction::On), AgentExit::Code(0));
    // Without netns=, the node name is the namespace.
    assert_eq!(fence(Vec::new(), &ns.name, FenceAction::Status), AgentExit::Code(0));
    assert_eq!(fence(Vec::new(), &ns.name, FenceAction::Monitor), AgentExit::Code(0));
    assert_eq!(fence(Vec::new(), "no-such-namespace", FenceAction::Status), AgentExit::Code(2));
    assert!(matches!(fence(Vec::new(), "bad name!", FenceAction::Off), AgentExit::Code(1)));
}
