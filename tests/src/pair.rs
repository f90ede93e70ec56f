//! A replicated resource on two hosts (network namespaces `a` and `b`):
//! disks, metadata, the resource file, `replicator up` on each host, and
//! the admin commands, with waits on `status --json`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::netns::Net;
use crate::server::{replicator, replicator_bin, Server};
use crate::util::{run_output, wait_until, Output, TestDir, CMD_TIMEOUT};

fn run(c: &mut Command) -> Result<Output> {
    run_output(c, CMD_TIMEOUT)
}

pub const NAMES: [&str; 2] = ["a", "b"];
pub const NBD_PORT: u16 = 10809;
pub const REPL_PORT: u16 = 7789;
pub const METRICS_PORT: u16 = 9933;

pub struct PairOptions {
    pub protocol: &'static str,
    pub size_bytes: u64,
    /// Mutual TLS with certificates from `pki` (a directory made by
    /// `tls::make_node_pki`); plaintext-lab when `None`.
    pub pki: Option<PathBuf>,
    /// Extra lines for the `[net]` section.
    pub net: &'static str,
    /// Extra lines for the `[resource]` section.
    pub resource: &'static str,
    /// Hosts on the test network: the pair is hosts 0 and 1; more hosts
    /// (a cluster witness) run no replicator.
    pub hosts: usize,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            protocol: "C",
            size_bytes: 64 << 20,
            pki: None,
            net: "ping-interval-ms = 300\nping-timeout-ms = 600\nconnect-interval-ms = 200\nio-timeout-ms = 3000",
            resource: "",
            hosts: 2,
        }
    }
}

pub struct Pair {
    pub net: Net,
    pub res: PathBuf,
    pub disks: [PathBuf; 2],
    pub nodes: [Option<Server>; 2],
    pub dir: PathBuf,
}

impl Pair {
    /// Two hosts with fresh metadata and a resource file; nothing running.
    pub fn new(dir: &TestDir, opts: &PairOptions) -> Result<Pair> {
        let net = Net::new(opts.hosts.max(2))?;
        let disks = [dir.join("a.img"), dir.join("b.img")];
        for disk in &disks {
            std::fs::File::create(disk)?.set_len(opts.size_bytes)?;
            let out = run(replicator().arg("create-md").arg("--disk").arg(disk))?;
            if !out.success() {
                bail!("create-md {}: {}", disk.display(), out.describe());
            }
        }
        let tls = match &opts.pki {
            Some(pki) => format!("tls = \"mutual\"\nca = \"{}\"", pki.join("ca.pem").display()),
            None => "tls = \"plaintext-lab\"".to_string(),
        };
        let mut text = format!(
            "[resource]\nname = \"r0\"\nprotocol = \"{}\"\n{}\n\n[net]\n{tls}\n{}\n\n[resync]\nrate-max-kib = 512000\n",
            opts.protocol, opts.resource, opts.net
        );
        for (i, name) in NAMES.iter().enumerate() {
            let ip = net.host(i).ip;
            text.push_str(&format!(
                "\n[[node]]\nname = \"{name}\"\nid = {i}\naddress = \"{ip}:{REPL_PORT}\"\ndisk = \"{}\"\n\
                 nbd-listen = [\"{ip}:{NBD_PORT}\"]\ncontrol = \"{}\"\nmetrics-listen = \"{ip}:{METRICS_PORT}\"\n",
                disks[i].display(),
                dir.join(format!("{name}.ctl")).display()
            ));
            if let Some(pki) = &opts.pki {
                text.push_str(&format!(
                    "cert = \"{}\"\nkey = \"{}\"\n",
                    pki.join(format!("{name}.pem")).display(),
                    pki.join(format!("{name}.key")).display()
                ));
            }
        }
        let res = dir.join("r0.toml");
        std::fs::write(&res, text)?;
        Ok(Pair { net, res, disks, nodes: [None, None], dir: dir.path().to_owned() })
    }

    /// Starts `replicator up` on host `i` (with the resource file `res`,
    /// normally [`Self::res`]).
    pub fn start_with(&mut self, i: usize, res: &std::path::Path) -> Result<()> {
        let c = self.net.host(i).cmd(&replicator_bin().display().to_string(), Vec::<String>::new());
        let server = Server::spawn_from(c, ["up".into(), res.as_os_str().to_owned(), "--node".into(), NAMES[i].into()])
            .with_context(|| format!("starting node {}", NAMES[i]))?;
        self.nodes[i] = Some(server);
        Ok(())
    }

    pub fn start(&mut self, i: usize) -> Result<()> {
        let res = self.res.clone();
        self.start_with(i, &res)
    }

    /// SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    pub fn server(&self, i: usize) -> &Server {
        self.nodes[i].as_ref().expect("node running")
    }

    pub fn nbd(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.net.host(i).ip, NBD_PORT))
    }

    pub fn uri(&self, i: usize) -> String {
        format!("nbd://{}/r0", self.nbd(i))
    }

    /// `replicator ARGS… r0.toml --node NAME`.
    pub fn admin_cmd(&self, i: usize, args: &[&str]) -> Command {
        let mut c = replicator();
        c.args(args).arg(&self.res).args(["--node", NAMES[i]]);
        c
    }

    pub fn admin(&self, i: usize, args: &[&str]) -> Result<Output> {
        run(&mut self.admin_cmd(i, args))
    }

    /// Runs an admin command that must succeed.
    pub fn ok(&self, i: usize, args: &[&str]) -> Result<Output> {
        let out = self.admin(i, args)?;
        if !out.success() {
            bail!("replicator {} on {}: {}", args.join(" "), NAMES[i], out.describe());
        }
        Ok(out)
    }

    /// `status --json`'s `state` object.
    pub fn state(&self, i: usize) -> Result<Value> {
        let out = self.ok(i, &["status", "--json"])?;
        let v: Value = serde_json::from_str(&out.stdout).with_context(|| format!("status json: {}", out.stdout))?;
        v.get("state").cloned().ok_or_else(|| anyhow!("no state in {v}"))
    }

    pub fn field(&self, i: usize, key: &str) -> String {
        self.state(i).ok().and_then(|s| s.get(key).and_then(|v| v.as_str()).map(str::to_owned)).unwrap_or_default()
    }

    pub fn number(&self, i: usize, key: &str) -> u64 {
        self.state(i).ok().and_then(|s| s.get(key).and_then(Value::as_u64)).unwrap_or(0)
    }

    /// Waits until node `i`'s state satisfies `pred`.
    pub fn wait(&self, i: usize, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Result<()> {
        wait_until(timeout, what, || self.state(i).map(|s| pred(&s)).unwrap_or(false)).map_err(|e| {
            let s = self.state(i).map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            anyhow!("{e}; node {} state: {s}", NAMES[i])
        })
    }

    /// Both connected, both UpToDate, no resync under way.
    pub fn wait_in_sync(&self, timeout: Duration) -> Result<()> {
        for i in 0..2 {
            self.wait(i, timeout, "Connected and UpToDate", |s| {
                s["connection"] == "Connected" && s["disk"] == "UpToDate" && s["peer_disk"] == "UpToDate"
            })?;
        }
        Ok(())
    }

    /// Starts both nodes, forces `a` primary and waits for the initial sync.
    pub fn bring_up(&mut self) -> Result<()> {
        self.start(0)?;
        self.start(1)?;
        self.wait(0, Duration::from_secs(10), "connected", |s| s["connection"] == "Connected")?;
        self.ok(0, &["primary", "--force"])?;
        self.wait_in_sync(Duration::from_secs(60))
    }

    /// Node `i`'s Prometheus page.
    pub fn metrics(&self, i: usize) -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((self.net.host(i).ip, METRICS_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    /// The data area of node `i`'s disk, as stored.
    pub fn disk_data(&self, i: usize, size: u64) -> Result<Vec<u8>> {
        let mut bytes = std::fs::read(&self.disks[i])?;
        bytes.truncate(size as usize);
        Ok(bytes)
    }
}
