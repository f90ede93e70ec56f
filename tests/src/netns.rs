//! Several "hosts" on one machine: each a network namespace with one veth
//! leg on a bridge in the root namespace. The test process (root
//! namespace) reaches every host through the bridge (`.254`); hosts reach
//! each other directly. Partitions are iptables DROP rules inside a host,
//! so a cut between two hosts leaves the test's own path to them intact.
//!
//! Names are claimed atomically (creating the bridge fails if another test
//! holds the index), so tests in parallel threads and processes never
//! collide. Everything is deleted on drop.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cmd, run_output, CMD_TIMEOUT};

fn run(c: &mut std::process::Command) -> Result<crate::util::Output> {
    run_output(c, CMD_TIMEOUT)
}

/// One namespace.
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
    veth: String,
}

pub struct Net {
    pub hosts: Vec<Host>,
    bridge: String,
    pub gateway: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = run(&mut cmd("ip", args))?;
    if !out.success() {
        bail!("ip {}: {}", args.join(" "), out.describe());
    }
    Ok(())
}

impl Net {
    /// Creates `n` hosts (`.1` … `.n`) on a fresh /24. Needs root.
    pub fn new(n: usize) -> Result<Net> {
        let seed = std::process::id() as usize;
        for attempt in 0..200 {
            let index = (seed + attempt * 7) % 200 + 20;
            let bridge = format!("rtbr{index}");
            let out = run(&mut cmd("ip", ["link", "add", &bridge, "type", "bridge"]))?;
            if !out.success() {
                continue; // taken by another test
            }
            let mut net =
                Net { hosts: Vec::new(), bridge: bridge.clone(), gateway: Ipv4Addr::new(10, 231, index as u8, 254) };
            net.setup(index, n).with_context(|| format!("setting up test network {bridge}"))?;
            return Ok(net);
        }
        bail!("no free test network index (stale rtbr* bridges? delete them with `ip link del`)")
    }

    fn setup(&mut self, index: usize, n: usize) -> Result<()> {
        let gw = format!("{}/24", self.gateway);
        ip(&["addr", "add", &gw, "dev", &self.bridge])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        for h in 1..=n {
            let ns = format!("rt{index}h{h}");
            let veth = format!("rt{index}v{h}");
            let addr = Ipv4Addr::new(10, 231, index as u8, h as u8);
            let _ = run(&mut cmd("ip", ["netns", "del", &ns]));
            ip(&["netns", "add", &ns])?;
            self.hosts.push(Host { ns: ns.clone(), ip: addr, veth: veth.clone() });
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["link", "set", &veth, "master", &self.bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = run(&mut cmd("ip", ["netns", "del", &h.ns]));
            let _ = run(&mut cmd("ip", ["link", "del", &h.veth]));
        }
        let _ = run(&mut cmd("ip", ["link", "del", &self.bridge]));
    }
}

impl Host {
    /// `program args` inside this host.
    pub fn cmd<I, S>(&self, program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]).args(args);
        c
    }

    fn iptables(&self, action: &str, other: Ipv4Addr) -> Result<()> {
        for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            let out = run(&mut cmd(
                "ip",
                ["netns", "exec", &self.ns, "iptables", action, chain, dir, &other.to_string(), "-j", "DROP"],
            ))?;
            if !out.success() {
                bail!("iptables {action} {chain} in {}: {}", self.ns, out.describe());
            }
        }
        Ok(())
    }

    /// Drops all traffic between this host and `other` (both directions),
    /// silently: neither side is told.
    pub fn cut(&self, other: &Host) -> Result<()> {
        self.iptables("-A", other.ip)
    }

    pub fn heal(&self, other: &Host) -> Result<()> {
        self.iptables("-D", other.ip)
    }

    /// Sets this host's only link (`eth0`) down or up: down, nothing it
    /// sends leaves and nothing reaches it, as when a machine loses power.
    pub fn set_link(&self, up: bool) -> Result<()> {
        ip(&["-n", &self.ns, "link", "set", "eth0", if up { "up" } else { "down" }])
    }
}
