//! Helpers for the `mta` end-to-end tests: a mail tree with its config and
//! a throwaway certificate, the `mta` binary under test, a supervised
//! `mta serve` whose listener addresses are read from its log, and a
//! strict Maildir reader.

use std::ffi::OsStr;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::server::Daemon;
use crate::tls::{make_pki, Pki};
use crate::util::{self, is_root, TestDir};

/// How long `mta serve` may take to print `mta: ready`.
pub const MTA_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the `mta` binary: `MTA_BIN`, else next to the test's target dir
/// (see [`crate::replicator_bin`]).
pub fn mta_bin() -> PathBuf {
    crate::server::workspace_bin("mta", "MTA_BIN")
}

/// A mail tree: config, data directory and certificates in a scratch dir.
pub struct MailTree {
    pub dir: TestDir,
    pub config: PathBuf,
    pub data: PathBuf,
    pub pki: Pki,
}

impl MailTree {
    /// Three listeners on ephemeral loopback ports; `allow_root` when run as
    /// root so the test can read the files it made. `extra` is appended to
    /// the top-level keys, `privileges` replaces the `[privileges]` body.
    pub fn new(name: &str, extra: &str, privileges: Option<&str>) -> Result<MailTree> {
        let dir = TestDir::new(name);
        let pki = make_pki(&dir.join("pki"))?;
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let privileges = match privileges {
            Some(p) => p.to_string(),
            None if is_root() => "allow_root = true".to_string(),
            None => String::new(),
        };
        let text = format!(
            "hostname = \"mx.example.org\"\ndata_dir = \"{data}\"\n\
             # The tests' passwords (`alice-pw`) are short.\npassword_length_min = 1\n{extra}\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [[listener]]\nkind = \"mx\"\naddress = \"127.0.0.1:0\"\n\
             [[listener]]\nkind = \"submission\"\naddress = \"127.0.0.1:0\"\n\
             [[listener]]\nkind = \"submissions\"\naddress = \"127.0.0.1:0\"\n\
             [privileges]\n{privileges}\n",
            data = data.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
        );
        let config = dir.join("mta.toml");
        std::fs::write(&config, text)?;
        Ok(MailTree { dir, config, data, pki })
    }

    /// `mta -c CONFIG ARGS...`
    pub fn mta<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(mta_bin());
        c.arg("-c").arg(&self.config).args(args);
        c
    }

    /// Runs an admin command, failing with its output unless it exits 0.
    pub fn admin(&self, args: &[&str]) -> Result<util::Output> {
        util::run(&mut self.mta(args))
    }

    /// Runs an admin command with `stdin` as its standard input.
    pub fn admin_stdin(&self, args: &[&str], stdin: &str) -> Result<std::process::Output> {
        let mut c = self.mta(args);
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().with_context(|| format!("spawning {}", util::cmdline(&c)))?;
        child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?.write_all(stdin.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// example.org with alice (password `alice-pw`) and bob (`bob-pw`).
    pub fn populate(&self) -> Result<()> {
        self.add_mailboxes(&["alice@example.org", "bob@example.org"])
    }

    /// Adds each `local@domain` with the password `local-pw`; a domain is
    /// added before the first of its mailboxes in the list.
    pub fn add_mailboxes(&self, mailboxes: &[&str]) -> Result<()> {
        let mut domains: Vec<&str> = Vec::new();
        for &mailbox in mailboxes {
            let (local, domain) =
                mailbox.split_once('@').ok_or_else(|| anyhow!("mailbox {mailbox:?} is not local@domain"))?;
            if !domains.contains(&domain) {
                self.admin(&["domain", "add", domain])?;
                domains.push(domain);
            }
            let out = self.admin_stdin(&["user", "add", mailbox], &format!("{local}-pw\n"))?;
            if !out.status.success() {
                bail!("user add {mailbox} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    }

    pub fn serve(&self) -> Result<Mta> {
        let mut c = self.mta(["serve"]);
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "info");
        }
        let daemon = Daemon::spawn(c)?;
        daemon.logs.wait_for("mta: ready", MTA_READY_TIMEOUT)?;
        let mut m = Mta { daemon, mx: None, submission: None, submissions: None, metrics: None };
        for line in m.daemon.logs.lines() {
            let Some(rest) = line.trim().strip_prefix("mta: listening ") else { continue };
            let (kind, addr) = rest.split_once(' ').ok_or_else(|| anyhow!("bad listening line {line:?}"))?;
            let addr: SocketAddr = addr.parse().with_context(|| format!("bad address in {line:?}"))?;
            match kind {
                "mx" => m.mx = Some(addr),
                "submission" => m.submission = Some(addr),
                "submissions" => m.submissions = Some(addr),
                "metrics" => m.metrics = Some(addr),
                _ => bail!("unknown listener kind in {line:?}"),
            }
        }
        Ok(m)
    }

    /// Replaces every listener's `127.0.0.1:0` with a port that was free a
    /// moment ago, for runs whose log cannot be read (stderr on /dev/full).
    /// Returns the mx, submission and submissions addresses.
    pub fn pin_ports(&self) -> Result<[SocketAddr; 3]> {
        let mut text = std::fs::read_to_string(&self.config)?;
        let mut addrs = Vec::new();
        while text.contains("\"127.0.0.1:0\"") {
            let addr: SocketAddr = ([127, 0, 0, 1], crate::server::free_port()?).into();
            text = text.replacen("\"127.0.0.1:0\"", &format!("\"{addr}\""), 1);
            addrs.push(addr);
        }
        std::fs::write(&self.config, text)?;
        addrs.try_into().map_err(|a: Vec<SocketAddr>| anyhow!("expected 3 listeners, found {}", a.len()))
    }

    /// `mta serve` with stdout and stderr on `output` (e.g. /dev/full);
    /// returns once `probe` accepts connections. Killed on drop.
    pub fn serve_blind(&self, output: &Path, probe: SocketAddr) -> Result<BlindMta> {
        let mut c = self.mta(["serve"]);
        let out = std::fs::OpenOptions::new().append(true).open(output)?;
        c.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).env("RUST_LOG", "info");
        util::die_with_parent(&mut c);
        let mut m = BlindMta { child: c.spawn().with_context(|| format!("spawning {}", util::cmdline(&c)))? };
        util::wait_until(MTA_READY_TIMEOUT, "mta serve to accept connections", || {
            !m.is_running() || std::net::TcpStream::connect(probe).is_ok()
        })?;
        if !m.is_running() {
            bail!("mta serve exited at start-up: {:?}", m.child.try_wait());
        }
        Ok(m)
    }

    /// The Maildir of `local@domain`.
    pub fn maildir(&self, mailbox: &str) -> PathBuf {
        let (local, domain) = mailbox.split_once('@').expect("mailbox is local@domain");
        self.data.join("mailboxes").join(domain).join(local)
    }

    /// Messages in a Maildir's `new/`, checked strictly: `tmp/` empty, every
    /// name carries a matching `,S=size`, every file ends in CRLF.
    pub fn messages(&self, mailbox: &str) -> Result<Vec<Vec<u8>>> {
        read_maildir(&self.maildir(mailbox))
    }

    /// Waits until `mailbox` holds at least `n` messages.
    pub fn wait_messages(&self, mailbox: &str, n: usize, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        util::wait_until(timeout, &format!("{n} messages in {mailbox}"), || {
            self.messages(mailbox).map(|m| m.len() >= n).unwrap_or(false)
        })?;
        self.messages(mailbox)
    }
}

pub fn read_maildir(dir: &Path) -> Result<Vec<Vec<u8>>> {
    if !dir.join("new").is_dir() {
        return Ok(Vec::new());
    }
    let tmp_entries = std::fs::read_dir(dir.join("tmp"))?.count();
    if tmp_entries != 0 {
        bail!("{} has {tmp_entries} leftover files in tmp/", dir.display());
    }
    read_maildir_new(dir)
}

/// Like [`read_maildir`] but ignoring `tmp/`: after a crash, a delivery cut
/// between writing to tmp/ and the rename into new/ leaves its file there
/// (Maildir readers ignore tmp/; the message is still in the queue).
pub fn read_maildir_new(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let new = dir.join("new");
    if !new.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&new)?.collect::<std::io::Result<Vec<_>>>()?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let name = e.file_name().to_string_lossy().into_owned();
        let data = std::fs::read(e.path())?;
        let size: usize = name
            .rsplit_once(",S=")
            .and_then(|(_, s)| s.parse().ok())
            .ok_or_else(|| anyhow!("Maildir file name {name:?} lacks ,S=size"))?;
        if size != data.len() {
            bail!("{name}: S={size} but the file has {} bytes", data.len());
        }
        if !data.ends_with(b"\r\n") {
            bail!("{name}: message does not end in CRLF");
        }
        out.push(data);
    }
    Ok(out)
}

/// A running `mta serve`, killed on drop.
pub struct Mta {
    pub daemon: Daemon,
    pub mx: Option<SocketAddr>,
    pub submission: Option<SocketAddr>,
    pub submissions: Option<SocketAddr>,
    /// `metrics_listen`, when the config sets it.
    pub metrics: Option<SocketAddr>,
}

impl Mta {
    pub fn mx(&self) -> SocketAddr {
        self.mx.expect("no mx listener")
    }
    pub fn submission(&self) -> SocketAddr {
        self.submission.expect("no submission listener")
    }
    pub fn submissions(&self) -> SocketAddr {
        self.submissions.expect("no submissions listener")
    }
    pub fn pid(&self) -> u32 {
        self.daemon.child.id()
    }
    pub fn log(&self) -> String {
        self.daemon.logs.text()
    }
}

/// `swaks` against `addr` with extra arguments; returns its output (any status).
pub fn swaks(addr: SocketAddr, args: &[&str]) -> Result<util::Output> {
    let mut c = Command::new("swaks");
    c.args(["--server", &addr.ip().to_string(), "--port", &addr.port().to_string(), "--timeout", "30"]).args(args);
    util::run_output(&mut c, Duration::from_secs(60))
}

/// Runs a Python 3 script with arguments; returns its output (any status).
pub fn python(script: &str, args: &[&str]) -> Result<util::Output> {
    let mut c = Command::new("python3");
    c.arg("-c").arg(script).args(args);
    util::run_output(&mut c, Duration::from_secs(120))
}

/// A tiny authoritative DNS server (UDP only): prints its port, then
/// answers MX and A queries from the zone given as JSON in argv.
const FAKE_DNS: &str = r#"
import json, socket, struct, sys
zone = json.loads(sys.argv[1])
zone_mx, zone_a, nx = zone["mx"], zone["a"], set(zone["nx"])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print("port", s.getsockname()[1], flush=True)

def name(n):
    out = b""
    for label in [l for l in n.split(".") if l]:
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"

while True:
    q, addr = s.recvfrom(4096)
    qid, flags = struct.unpack(">HH", q[:4])
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
        i += 1 + q[i]
    qname = ".".join(labels)
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    answers = []
    if qtype == 15:
        for pref, host in zone_mx.get(qname, []):
            answers.append((15, struct.pack(">H", pref) + name(host)))
    elif qtype == 1 and qname in zone_a:
        answers.append((1, socket.inet_aton(zone_a[qname])))
    rcode = 3 if qname in nx else 0
    head = struct.pack(">HHHHHH", qid, 0x8400 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0)
    body = b"".join(struct.pack(">HHHIH", 0xC00C, t, 1, 60, len(r)) + r for t, r in answers)
    s.sendto(head + question + body, addr)
"#;

/// Starts the fake DNS server for a zone: MX records (domain, preference,
/// host; host "" is a null MX), A records (host, IPv4) and names that do
/// not exist. Returns the server (killed on drop) and its UDP port.
pub fn fake_dns(mx: &[(&str, u16, &str)], a: &[(&str, &str)], nxdomain: &[&str]) -> Result<(Daemon, u16)> {
    let mut mx_map = serde_json::Map::new();
    for (domain, pref, host) in mx {
        let entry = mx_map.entry(domain.to_string()).or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(list) = entry {
            list.push(serde_json::json!([pref, host]));
        }
    }
    let a_map: serde_json::Map<String, serde_json::Value> =
        a.iter().map(|(h, ip)| (h.to_string(), serde_json::Value::String(ip.to_string()))).collect();
    let zone = serde_json::json!({ "mx": mx_map, "a": a_map, "nx": nxdomain });
    let dns = Daemon::spawn(util::cmd("python3", ["-u", "-c", FAKE_DNS, &zone.to_string()]))?;
    dns.logs.wait_for("port ", Duration::from_secs(20))?;
    let port = dns
        .logs
        .lines()
        .iter()
        .find_map(|l| l.strip_prefix("port ").and_then(|p| p.trim().parse().ok()))
        .ok_or_else(|| anyhow!("fake DNS printed no port"))?;
    Ok((dns, port))
}

/// Postfix's `smtp-sink` on 127.0.0.1 (no STARTTLS, no AUTH), dumping each
/// transaction into a file in `dump_dir`. Returns it (killed on drop) and its address.
pub fn smtp_sink(dump_dir: &Path) -> Result<(Daemon, SocketAddr)> {
    std::fs::create_dir_all(dump_dir)?;
    let port = crate::server::free_port()?;
    let mut c = Command::new("smtp-sink");
    if is_root() {
        // It refuses to keep root; the dumps are written as nobody.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dump_dir, std::fs::Permissions::from_mode(0o777))?;
        c.args(["-u", "nobody"]);
    }
    c.arg("-d").arg(format!("{}/%H%M%S.", dump_dir.display()));
    c.arg(format!("127.0.0.1:{port}")).arg("16");
    let sink = Daemon::spawn(c)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    util::wait_until(Duration::from_secs(20), "smtp-sink to listen", || std::net::TcpStream::connect(addr).is_ok())?;
    Ok((sink, addr))
}

/// The transactions `smtp-sink` dumped, as text.
pub fn sink_dumps(dump_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dump_dir) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

/// `mta serve` whose output the test does not read. Killed on drop.
pub struct BlindMta {
    pub child: std::process::Child,
}

impl BlindMta {
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for BlindMta {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of `GET /metrics` from the mta's metrics listener.
pub fn scrape(addr: SocketAddr) -> Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (_, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header end in {text:?}"))?;
    Ok(body.to_string())
}

/// The value of metric `name` (a line `name value`) in `text`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
