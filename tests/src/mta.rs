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
    if let Some(p) = std::env::var_os("MTA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("test binary has a parent dir");
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir = dir.parent().expect("deps has a parent");
    }
    let bin = dir.join("mta");
    assert!(
        bin.is_file(),
        "mta binary not found at {} (run `cargo build -p mta` first, or set MTA_BIN)",
        bin.display()
    );
    bin
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
            "hostname = \"mx.example.org\"\ndata_dir = \"{data}\"\n{extra}\n\
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
        self.admin(&["domain", "add", "example.org"])?;
        for (user, pw) in [("alice@example.org", "alice-pw\n"), ("bob@example.org", "bob-pw\n")] {
            let out = self.admin_stdin(&["user", "add", user], pw)?;
            if !out.status.success() {
                bail!("user add {user} failed: {}", String::from_utf8_lossy(&out.stderr));
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
        let mut m = Mta { daemon, mx: None, submission: None, submissions: None };
        for line in m.daemon.logs.lines() {
            let Some(rest) = line.trim().strip_prefix("mta: listening ") else { continue };
            let (kind, addr) = rest.split_once(' ').ok_or_else(|| anyhow!("bad listening line {line:?}"))?;
            let addr: SocketAddr = addr.parse().with_context(|| format!("bad address in {line:?}"))?;
            match kind {
                "mx" => m.mx = Some(addr),
                "submission" => m.submission = Some(addr),
                "submissions" => m.submissions = Some(addr),
                _ => bail!("unknown listener kind in {line:?}"),
            }
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
    let new = dir.join("new");
    if !new.is_dir() {
        return Ok(Vec::new());
    }
    let tmp_entries = std::fs::read_dir(dir.join("tmp"))?.count();
    if tmp_entries != 0 {
        bail!("{} has {tmp_entries} leftover files in tmp/", dir.display());
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
