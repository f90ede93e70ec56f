//! The TOML configuration file, validated into a [`Config`]. Unknown keys
//! are errors; every error names the key and what to do about it.
//!
//! ```toml
//! hostname = "mail.example.org"
//! data_dir = "/srv/mail"          # queue/, mailboxes/, directory.sqlite3
//! # directory_url = "mysql://mta:secret@127.0.0.1/mail"   # default: SQLite in data_dir
//! message_bytes_max = 26214400
//! connections_max = 1000          # per listener (each listener may set its own)
//! postmaster_to = "admin@example.org"  # postmaster@ every hosted domain (default: its first mailbox)
//! password_length_min = 12       # `mta user add`/`passwd` refuse shorter passwords
//! stress_percent = 75             # past this share of a listener's limit, idle timeouts drop to 10 s
//! connections_per_ip_max = 50     # Postfix's smtpd_client_connection_count_limit
//! enforce_from_header = true     # authenticated: From: only with owned addresses
//! metrics_listen = "127.0.0.1:9325"  # opt-in Prometheus endpoint (GET /metrics)
//! log_to = "stderr"               # or "syslog": RFC 3164, facility mail, to syslog_socket
//! syslog_socket = "/dev/log"
//!
//! [tls]
//! cert = "/srv/mail/tls/cert.pem"
//! key = "/srv/mail/tls/key.pem"
//!
//! [[listener]]
//! kind = "mx"                    # mx (25), submission (587), submissions (465)
//! address = "0.0.0.0:25"
//! greeting_delay_ms = 0          # wait this long for clients that talk first
//! proxy_protocol = false         # true: a PROXY v2 header precedes SMTP
//! connections_max = 1000         # this listener's own limit (default: the top-level one)
//! submission_reserve = 100       # submission/submissions only: connections kept for clients
//!                                # that authenticate (default: a tenth of connections_max)
//!
//! [delivery]
//! relay_host = "192.0.2.25:587"  # smart host; without it, MX lookup
//! relay_tls = "starttls"         # or "implicit" (TLS from the first byte, port 465)
//! relay_tls_policy = "encrypt"   # TLS level towards the relay host (default: tls_policy_default,
//!                                # at least "encrypt" with relay_auth)
//! relay_auth = { username = "mx1@example.org", password_file = "/etc/mta/relay.pw" }  # mode 0600
//! dns_server = "127.0.0.1:53"    # resolver for MX lookups (default: /etc/resolv.conf)
//! tls_policy_default = "may"     # none | may | encrypt | verify (see below)
//! ca_file = "/etc/mta/ca.pem"    # roots for "verify" (default: the system bundle)
//! queue_lifetime_secs = 432000   # temporary failures bounce after this
//!
//! [delivery.tls_policy]          # per destination domain; ".example.com" also covers subdomains
//! "example.com" = "encrypt"      # STARTTLS required (certificate not checked); else deferred
//! "partner.net" = "verify"       # STARTTLS required, certificate valid for the MX host name
//! "legacy.org" = "none"          # never STARTTLS
//!
//! [privileges]
//! user = "mta"                   # required when started as root
//! chroot = true                  # chroot into data_dir after binding
//! allow_root = false             # tests only: stay root, no chroot
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::limits::{
    CONNECTIONS_MAX_DEFAULT, CONNECTIONS_PER_IP_MAX_DEFAULT, MESSAGE_BYTES_MAX_CEILING, MESSAGE_BYTES_MAX_DEFAULT,
    PASSWORD_LENGTH_MIN_DEFAULT, STRESS_PERCENT_DEFAULT, SUBMISSION_RESERVE_DIVISOR_DEFAULT,
};
use crate::smtp::address::{self, Address};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("invalid config file {path}: {cause}")]
    Parse { path: PathBuf, cause: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("relay password file {path}: {message}")]
    PasswordFile { path: PathBuf, message: String },
}

/// What a listener is for; decides TLS and AUTH behaviour (RFC 6409, 8314).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// Inbound MX (port 25): STARTTLS offered, no AUTH, unauthenticated mail
    /// only to local recipients.
    Mx,
    /// Submission (port 587): STARTTLS, then AUTH, required before MAIL.
    Submission,
    /// Implicit-TLS submission (port 465): AUTH required before MAIL.
    Submissions,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Mx => "mx",
            ListenerKind::Submission => "submission",
            ListenerKind::Submissions => "submissions",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    kind: ListenerKind,
    address: String,
    #[serde(default)]
    greeting_delay_ms: u64,
    #[serde(default)]
    proxy_protocol: bool,
    connections_max: Option<u32>,
    submission_reserve: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

/// How hard remote delivery insists on TLS, weakest first (the levels of
/// Postfix's `smtp_tls_security_level`, without DANE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsLevel {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, certificate not checked (RFC 7435).
    May,
    /// STARTTLS required, certificate not checked; otherwise the mail waits.
    Encrypt,
    /// STARTTLS required and the certificate must chain to a trusted root
    /// and name the host (MX host name, or the relay host's address).
    Verify,
}

impl TlsLevel {
    pub fn name(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
        }
    }
}

/// Where `mta serve` writes its log (`log_to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTo {
    Stderr,
    /// RFC 3164 datagrams, facility mail, to `syslog_socket`.
    Syslog,
}

/// How the connection to the relay host starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    /// Plain SMTP, then STARTTLS as the TLS level asks (port 25 or 587).
    Starttls,
    /// TLS from the first byte (RFC 8314, port 465).
    Implicit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelayAuth {
    username: String,
    password_file: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    relay_host: Option<String>,
    relay_tls: Option<RelayTls>,
    relay_tls_policy: Option<TlsLevel>,
    relay_auth: Option<RawRelayAuth>,
    dns_server: Option<String>,
    mx_port: Option<u16>,
    #[serde(default)]
    require_tls: bool,
    tls_policy_default: Option<TlsLevel>,
    #[serde(default)]
    tls_policy: BTreeMap<String, TlsLevel>,
    ca_file: Option<PathBuf>,
    queue_lifetime_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivileges {
    user: Option<String>,
    chroot: Option<bool>,
    #[serde(default)]
    allow_root: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: String,
    data_dir: PathBuf,
    directory_url: Option<String>,
    message_bytes_max: Option<u64>,
    connections_max: Option<u32>,
    connections_per_ip_max: Option<u32>,
    stress_percent: Option<u32>,
    password_length_min: Option<u32>,
    postmaster_to: Option<String>,
    enforce_from_header: Option<bool>,
    metrics_listen: Option<String>,
    log_to: Option<LogTo>,
    syslog_socket: Option<PathBuf>,
    tls: Option<RawTls>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    privileges: RawPrivileges,
    #[serde(default)]
    delivery: RawDelivery,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub kind: ListenerKind,
    pub address: SocketAddr,
    pub greeting_delay_ms: u64,
    /// Connections start with a PROXY v2 header from a load balancer.
    pub proxy_protocol: bool,
    /// This listener's own connection limit (default: `connections_max`),
    /// so a flood on one port cannot lock out another.
    pub connections_max: u32,
    /// Connections of `connections_max` kept for clients that
    /// authenticate (submission listeners only; 0 on mx): at most
    /// `connections_max - submission_reserve` unauthenticated sessions
    /// hold a normal slot, one admitted beyond that must authenticate
    /// within `limits::RESERVE_AUTH_SECS` or is closed.
    pub submission_reserve: u32,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Login at the relay host; the password stays in its file until start-up
/// reads it ([`read_password_file`]).
#[derive(Debug, Clone)]
pub struct RelayAuth {
    pub username: String,
    pub password_file: PathBuf,
}

/// Remote delivery settings.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Smart host for every remote recipient (`host:port` as an IP address).
    pub relay_host: Option<SocketAddr>,
    pub relay_tls: RelayTls,
    /// TLS level towards the relay host; at least `Encrypt` with `relay_auth`.
    pub relay_tls_level: TlsLevel,
    pub relay_auth: Option<RelayAuth>,
    /// TLS level for destinations without an entry in `tls_policy`.
    pub tls_default: TlsLevel,
    /// Per-domain TLS levels, keys lowercase; a leading `.` covers subdomains.
    pub tls_policy: BTreeMap<String, TlsLevel>,
    /// Trusted roots for `Verify`; the system bundle if unset.
    pub ca_file: Option<PathBuf>,
    /// Resolver for MX lookups; the system's (/etc/resolv.conf) if unset.
    pub dns_server: Option<SocketAddr>,
    /// Port of MX hosts: 25, except in tests.
    pub mx_port: u16,
    /// Temporary failures older than this bounce.
    pub queue_lifetime_secs: u64,
}

/// The system's CA bundle (Debian's ca-certificates), read before chroot.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// A relay password file is at most this long.
const PASSWORD_FILE_BYTES_MAX: u64 = 4096;

impl Delivery {
    /// The TLS level for mail to `domain`: its own entry, else the nearest
    /// `.parent` entry, else the default.
    pub fn tls_level_for(&self, domain: &str) -> TlsLevel {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some(level) = self.tls_policy.get(&domain) {
            return *level;
        }
        let mut rest = domain.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(level) = self.tls_policy.get(&format!(".{parent}")) {
                return *level;
            }
            rest = parent;
        }
        self.tls_default
    }

    /// Whether any destination needs trusted roots (so start-up loads them).
    pub fn needs_ca(&self) -> bool {
        let relay = self.relay_host.is_some() && self.relay_tls_level == TlsLevel::Verify;
        let mx = self.relay_host.is_none()
            && (self.tls_default == TlsLevel::Verify || self.tls_policy.values().any(|l| *l == TlsLevel::Verify));
        relay || mx
    }

    /// The CA file `verify` uses.
    pub fn ca_path(&self) -> &Path {
        self.ca_file.as_deref().unwrap_or(Path::new(SYSTEM_CA_FILE))
    }
}

/// Reads a relay password: the file's first line, which must not be empty.
/// The file must not be readable by group or others.
pub fn read_password_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let invalid = |message: String| ConfigError::PasswordFile { path: path.to_owned(), message };
    let unreadable = |e: std::io::Error| invalid(format!("cannot read it: {e}"));
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(format!(
            "the relay password file has mode {mode:04o}: others may read it; run `chmod 600 {}`",
            path.display()
        )));
    }
    let mut text = String::new();
    file.take(PASSWORD_FILE_BYTES_MAX).read_to_string(&mut text).map_err(unreadable)?;
    let password = text.lines().next().unwrap_or("").to_string();
    if password.is_empty() {
        return Err(invalid("the relay password file is empty; put the password on its first line".into()));
    }
    Ok(password)
}

/// Five days, as RFC 5321 §4.5.4.1 suggests (at least 4-5 days).
pub const QUEUE_LIFETIME_SECS_DEFAULT: u64 = 5 * 24 * 3600;

#[derive(Debug, Clone)]
pub struct Privileges {
    pub user: Option<String>,
    pub chroot: bool,
    pub allow_root: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub hostname: String,
    pub data_dir: PathBuf,
    pub directory_url: String,
    pub message_bytes_max: u64,
    pub connections_max: u32,
    pub connections_per_ip_max: u32,
    /// Past this share of a listener's connection limit, idle timeouts
    /// shrink to `STRESS_TIMEOUT_SECS` (Postfix's stress mode).
    pub stress_percent: u32,
    /// `mta user add` and `passwd` refuse shorter passwords (characters).
    pub password_length_min: u32,
    /// Authenticated users may only put addresses they own in `From:`.
    pub enforce_from_header: bool,
    /// Opt-in Prometheus endpoint (`GET /metrics`); keep it on loopback or
    /// a management network.
    pub metrics_listen: Option<SocketAddr>,
    /// `mta serve`'s log: stderr (default) or syslog; admin commands and
    /// the `mta: ready` style start-up lines always use stderr.
    pub log_to: LogTo,
    /// The syslog daemon's datagram socket (default `/dev/log`).
    pub syslog_socket: PathBuf,
    pub tls: Option<TlsFiles>,
    pub listeners: Vec<Listener>,
    pub privileges: Privileges,
    pub delivery: Delivery,
    /// Where `RCPT TO:<Postmaster>` goes: postmaster@ the hostname's parent domain.
    pub postmaster: Address,
    /// Where `postmaster@` a hosted domain goes when it has no mailbox or
    /// alias of its own (default: the domain's first enabled mailbox).
    pub postmaster_to: Option<Address>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.to_owned(), cause })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), cause: e.to_string() })?;
        let invalid = |message: String| ConfigError::Invalid { path: path.to_owned(), message };

        let hostname = address::check_domain(&raw.hostname).map_err(|e| {
            invalid(format!(
                "`hostname` = {:?} is not a domain name ({e}); use the server's fully qualified name",
                raw.hostname
            ))
        })?;
        if !raw.data_dir.is_absolute() {
            return Err(invalid(format!("`data_dir` = {:?} must be an absolute path", raw.data_dir)));
        }
        let directory_url = match raw.directory_url {
            Some(u) if u.starts_with("sqlite:") || u.starts_with("mysql:") || u.starts_with("mariadb:") => {
                u.replacen("mariadb:", "mysql:", 1)
            }
            Some(u) => {
                return Err(invalid(format!(
                    "`directory_url` = {:?} must start with sqlite:, mysql: or mariadb:",
                    crate::directory::redact_url(&u)
                )))
            }
            None => default_directory_url(&raw.data_dir),
        };
        let message_bytes_max = raw.message_bytes_max.unwrap_or(MESSAGE_BYTES_MAX_DEFAULT);
        if message_bytes_max == 0 || message_bytes_max > MESSAGE_BYTES_MAX_CEILING {
            return Err(invalid(format!("`message_bytes_max` must be between 1 and {MESSAGE_BYTES_MAX_CEILING}")));
        }
        let connections_max = raw.connections_max.unwrap_or(CONNECTIONS_MAX_DEFAULT);
        let connections_per_ip_max = raw.connections_per_ip_max.unwrap_or(CONNECTIONS_PER_IP_MAX_DEFAULT);
        if connections_max == 0 || connections_per_ip_max == 0 {
            return Err(invalid("`connections_max` and `connections_per_ip_max` must be at least 1".into()));
        }
        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                invalid(format!("`metrics_listen` = {a:?} is not IP:PORT ({e}), e.g. \"127.0.0.1:9325\""))
            })?),
        };
        let stress_percent = raw.stress_percent.unwrap_or(STRESS_PERCENT_DEFAULT);
        if !(1..=100).contains(&stress_percent) {
            return Err(invalid("`stress_percent` must be between 1 and 100".into()));
        }
        if raw.listener.is_empty() {
            return Err(invalid("no `[[listener]]` sections; add at least one (kind and address)".into()));
        }
        let mut listeners = Vec::new();
        for (i, l) in raw.listener.iter().enumerate() {
            let address = l.address.parse::<SocketAddr>().map_err(|e| {
                invalid(format!("`listener[{i}].address` = {:?} is not IP:PORT ({e}), e.g. \"0.0.0.0:25\"", l.address))
            })?;
            if l.greeting_delay_ms > 30_000 {
                return Err(invalid(format!("`listener[{i}].greeting_delay_ms` must be at most 30000")));
            }
            let listener_max = match l.connections_max {
                Some(0) => return Err(invalid(format!("`listener[{i}].connections_max` must be at least 1"))),
                Some(n) => n,
                None => connections_max,
            };
            let submission_reserve = match (l.kind, l.submission_reserve) {
                (ListenerKind::Mx, None) => 0,
                (ListenerKind::Mx, Some(_)) => {
                    return Err(invalid(format!(
                        "`listener[{i}].submission_reserve` needs a submission or submissions listener (mx offers no AUTH)"
                    )))
                }
                (_, Some(n)) if n >= listener_max => {
                    return Err(invalid(format!(
                        "`listener[{i}].submission_reserve` = {n} must be below the listener's connections_max ({listener_max})"
                    )))
                }
                (_, Some(n)) => n,
                (_, None) => listener_max / SUBMISSION_RESERVE_DIVISOR_DEFAULT,
            };
            listeners.push(Listener {
                kind: l.kind,
                address,
                greeting_delay_ms: l.greeting_delay_ms,
                proxy_protocol: l.proxy_protocol,
                connections_max: listener_max,
                submission_reserve,
            });
        }
        let tls = raw.tls.map(|t| TlsFiles { cert: t.cert, key: t.key });
        if tls.is_none() {
            if let Some(l) = listeners.iter().find(|l| l.kind != ListenerKind::Mx) {
                return Err(invalid(format!(
                    "listener {} ({}) needs TLS: add a `[tls]` section with `cert` and `key`",
                    l.address,
                    l.kind.name()
                )));
            }
        }
        let privileges = Privileges {
            user: raw.privileges.user,
            chroot: raw.privileges.chroot.unwrap_or(true),
            allow_root: raw.privileges.allow_root,
        };
        let relay_host = match &raw.delivery.relay_host {
            None => None,
            Some(h) => Some(h.parse::<SocketAddr>().map_err(|e| {
                invalid(format!("`delivery.relay_host` = {h:?} is not IP:PORT ({e}), e.g. \"192.0.2.25:25\""))
            })?),
        };
        let dns_server = match &raw.delivery.dns_server {
            None => None,
            Some(h) => Some(h.parse::<SocketAddr>().map_err(|e| {
                invalid(format!("`delivery.dns_server` = {h:?} is not IP:PORT ({e}), e.g. \"127.0.0.1:53\""))
            })?),
        };
        let d = &raw.delivery;
        let tls_default = match (d.require_tls, d.tls_policy_default) {
            (true, Some(_)) => {
                return Err(invalid(
                    "`delivery.require_tls` and `delivery.tls_policy_default` both set; keep only \
                     `tls_policy_default` (require_tls = true means \"encrypt\")"
                        .into(),
                ))
            }
            (true, None) => TlsLevel::Encrypt,
            (false, level) => level.unwrap_or(TlsLevel::May),
        };
        let mut tls_policy = BTreeMap::new();
        for (key, level) in &d.tls_policy {
            let bare = key.strip_prefix('.').unwrap_or(key);
            let domain = address::check_domain(bare).map_err(|e| {
                invalid(format!(
                    "`delivery.tls_policy.\"{key}\"` is not a domain ({e}); write \"example.com\", or \
                     \".example.com\" for its subdomains"
                ))
            })?;
            let normalised = if key.starts_with('.') { format!(".{domain}") } else { domain };
            tls_policy.insert(normalised.to_ascii_lowercase(), *level);
        }
        if relay_host.is_none() && (d.relay_tls.is_some() || d.relay_tls_policy.is_some() || d.relay_auth.is_some()) {
            return Err(invalid(
                "`delivery.relay_tls`, `relay_tls_policy` and `relay_auth` need `delivery.relay_host`".into(),
            ));
        }
        let relay_tls = d.relay_tls.unwrap_or(RelayTls::Starttls);
        let relay_auth = match &d.relay_auth {
            None => None,
            Some(a) => {
                if a.username.is_empty() || a.username.chars().any(|c| c.is_control() || c == ' ') {
                    return Err(invalid(
                        "`delivery.relay_auth.username` must be non-empty, without spaces or control characters".into(),
                    ));
                }
                if !a.password_file.is_absolute() {
                    return Err(invalid(format!(
                        "`delivery.relay_auth.password_file` = {:?} must be an absolute path",
                        a.password_file
                    )));
                }
                Some(RelayAuth { username: a.username.clone(), password_file: a.password_file.clone() })
            }
        };
        let relay_floor =
            if relay_auth.is_some() || relay_tls == RelayTls::Implicit { TlsLevel::Encrypt } else { TlsLevel::None };
        let relay_tls_level = match d.relay_tls_policy {
            Some(level) if level < relay_floor => {
                let why = if relay_auth.is_some() {
                    "credentials are only ever sent over TLS"
                } else {
                    "`relay_tls = \"implicit\"` always encrypts"
                };
                return Err(invalid(format!(
                    "`delivery.relay_tls_policy` = \"{}\" is too weak: {why}; use \"encrypt\" or \"verify\"",
                    level.name()
                )));
            }
            Some(level) => level,
            None => tls_default.max(relay_floor),
        };
        if let Some(ca) = &d.ca_file {
            if !ca.is_absolute() {
                return Err(invalid(format!("`delivery.ca_file` = {ca:?} must be an absolute path")));
            }
        }
        let delivery = Delivery {
            relay_host,
            relay_tls,
            relay_tls_level,
            relay_auth,
            tls_default,
            tls_policy,
            ca_file: d.ca_file.clone(),
            dns_server,
            mx_port: raw.delivery.mx_port.unwrap_or(25),
            queue_lifetime_secs: raw.delivery.queue_lifetime_secs.unwrap_or(QUEUE_LIFETIME_SECS_DEFAULT),
        };
        let postmaster_to = match &raw.postmaster_to {
            None => None,
            Some(a) => Some(Address::parse(a, true).map_err(|e| {
                invalid(format!("`postmaster_to` = {a:?} is not a mail address ({e}); use a local mailbox"))
            })?),
        };
        let postmaster_domain =
            hostname.split_once('.').map(|(_, d)| d).filter(|d| d.contains('.')).unwrap_or(&hostname);
        let postmaster = Address::parse(&format!("postmaster@{postmaster_domain}"), true)
            .map_err(|e| invalid(format!("cannot derive the postmaster address from `hostname`: {e}")))?;
        Ok(Config {
            path: path.to_owned(),
            hostname,
            data_dir: raw.data_dir,
            directory_url,
            message_bytes_max,
            connections_max,
            connections_per_ip_max,
            stress_percent,
            password_length_min: raw.password_length_min.unwrap_or(PASSWORD_LENGTH_MIN_DEFAULT),
            enforce_from_header: raw.enforce_from_header.unwrap_or(true),
            metrics_listen,
            log_to: raw.log_to.unwrap_or(LogTo::Stderr),
            syslog_socket: raw.syslog_socket.unwrap_or_else(|| PathBuf::from("/dev/log")),
            tls,
            listeners,
            privileges,
            delivery,
            postmaster,
            postmaster_to,
        })
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.data_dir.join("queue")
    }

    pub fn mailboxes_dir(&self) -> PathBuf {
        self.data_dir.join("mailboxes")
    }

    /// A human summary for `check-config`: what listens where, with what policy.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("hostname: {}\n", self.hostname));
        s.push_str(&format!("data_dir: {}\n", self.data_dir.display()));
        s.push_str(&format!("directory: {}\n", crate::directory::redact_url(&self.directory_url)));
        s.push_str(&format!("message size limit: {} bytes\n", self.message_bytes_max));
        s.push_str(&format!(
            "connections: at most {} per listener unless it sets its own, {} per client IP; stress mode past {}%\n",
            self.connections_max, self.connections_per_ip_max, self.stress_percent
        ));
        match &self.tls {
            Some(t) => {
                s.push_str(&format!("tls: cert {} key {} (TLS 1.2 and 1.3 only)\n", t.cert.display(), t.key.display()))
            }
            None => s.push_str("tls: none (STARTTLS not offered)\n"),
        }
        for l in &self.listeners {
            let policy = match l.kind {
                ListenerKind::Mx => {
                    let tls = if self.tls.is_some() { "STARTTLS offered" } else { "no TLS" };
                    format!("{tls}, no AUTH; unauthenticated mail only to existing local recipients")
                }
                ListenerKind::Submission => "STARTTLS required, then AUTH PLAIN/LOGIN required before MAIL".to_string(),
                ListenerKind::Submissions => "implicit TLS, AUTH PLAIN/LOGIN required before MAIL".to_string(),
            };
            let proxy = if l.proxy_protocol { " [behind a PROXY v2 load balancer]" } else { "" };
            let reserve = match l.submission_reserve {
                0 => String::new(),
                n => format!(", {n} kept for clients that authenticate"),
            };
            s.push_str(&format!(
                "listen {} ({}){proxy}: {}; at most {} connections{reserve}\n",
                l.address,
                l.kind.name(),
                policy,
                l.connections_max
            ));
        }
        match self.log_to {
            LogTo::Stderr => s.push_str("log: stderr\n"),
            LogTo::Syslog => s.push_str(&format!("log: syslog {} (facility mail)\n", self.syslog_socket.display())),
        }
        match self.metrics_listen {
            Some(a) => s.push_str(&format!("metrics: http://{a}/metrics (Prometheus)\n")),
            None => s.push_str("metrics: off (set `metrics_listen`)\n"),
        }
        match &self.postmaster_to {
            Some(a) => s.push_str(&format!("postmaster@ each hosted domain: {a} unless the domain has its own\n")),
            None => s.push_str(
                "postmaster@ each hosted domain: its own mailbox or alias, else its first mailbox \
                 (set `postmaster_to` to choose; a domain without mailboxes refuses postmaster mail)\n",
            ),
        }
        let d = &self.delivery;
        match d.relay_host {
            Some(h) => {
                let start = match d.relay_tls {
                    RelayTls::Starttls => "STARTTLS",
                    RelayTls::Implicit => "implicit TLS",
                };
                let auth = match &d.relay_auth {
                    Some(a) => format!(", AUTH as {} (password from {})", a.username, a.password_file.display()),
                    None => String::new(),
                };
                s.push_str(&format!(
                    "remote delivery: via relay host {h}, {start}, TLS policy {}{auth}\n",
                    d.relay_tls_level.name()
                ))
            }
            None => {
                s.push_str(&format!(
                    "remote delivery: MX lookup via {}, port {}, TLS policy {} by default\n",
                    d.dns_server.map_or("the system resolver".to_string(), |d| d.to_string()),
                    d.mx_port,
                    d.tls_default.name()
                ));
                for (domain, level) in &d.tls_policy {
                    s.push_str(&format!("tls policy: {domain} {}\n", level.name()));
                }
            }
        }
        if d.needs_ca() {
            s.push_str(&format!("tls verify roots: {}\n", d.ca_path().display()));
        }
        s.push_str(
            "sender policy: authenticated logins only as addresses they own; no hosted-domain senders without AUTH\n",
        );
        s.push_str(
            "mailbox quotas: RCPT refused with 452 4.2.2 when full or when SIZE= does not fit; \
             delivery waits for room (bounce after the queue lifetime)\n",
        );
        if self.enforce_from_header {
            s.push_str("From: header: authenticated users only with addresses they own\n");
        }
        let p = &self.privileges;
        if p.allow_root {
            s.push_str("privileges: allow_root: stays root, no chroot (tests only)\n");
        } else {
            s.push_str(&format!(
                "privileges: drop to user {} after binding, chroot {}\n",
                p.user.as_deref().unwrap_or("(none: must not start as root)"),
                if p.chroot { self.data_dir.display().to_string() } else { "disabled".to_string() }
            ));
        }
        s
    }
}

pub fn default_directory_url(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("directory.sqlite3").display())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
hostname = "mx.example.org"
data_dir = "/srv/mail"
[[listener]]
kind = "mx"
address = "127.0.0.1:2525"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/mta/mta.toml"), text)
    }

    #[test]
    fn minimal_config_gets_strict_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.hostname, "mx.example.org");
        assert_eq!(c.directory_url, "sqlite:///srv/mail/directory.sqlite3?mode=rwc");
        assert_eq!(c.message_bytes_max, MESSAGE_BYTES_MAX_DEFAULT);
        assert!(c.privileges.chroot);
        assert!(!c.privileges.allow_root);
        assert_eq!(c.postmaster.to_string(), "postmaster@example.org");
        assert!(c.describe().contains("listen 127.0.0.1:2525 (mx)"));
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let e = parse(&format!("{MINIMAL}\nrelay_networks = [\"0.0.0.0/0\"]\n")).unwrap_err().to_string();
        assert!(e.contains("relay_networks"), "{e}");
        let e = parse(&MINIMAL.replace("kind = \"mx\"", "kind = \"mx\"\nport = 25")).unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
        let e = parse(&MINIMAL.replace("\"mx\"", "\"relay\"")).unwrap_err().to_string();
        assert!(e.contains("relay"), "{e}");
    }

    #[test]
    fn submission_reserve_defaults_to_a_tenth_and_is_checked() {
        let tls = "[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n";
        let sub = |extra: &str| format!("{}{extra}\n{tls}", MINIMAL.replace("\"mx\"", "\"submission\""));
        let c = parse(&sub("")).unwrap();
        assert_eq!(c.listeners[0].submission_reserve, CONNECTIONS_MAX_DEFAULT / 10);
        assert_eq!(parse(&sub("submission_reserve = 5")).unwrap().listeners[0].submission_reserve, 5);
        assert_eq!(parse(MINIMAL).unwrap().listeners[0].submission_reserve, 0);
        let e = parse(&sub("connections_max = 5\nsubmission_reserve = 5")).unwrap_err().to_string();
        assert!(e.contains("listener[0].submission_reserve") && e.contains("below"), "{e}");
        let e = parse(&format!("{MINIMAL}submission_reserve = 1\n")).unwrap_err().to_string();
        assert!(e.contains("mx offers no AUTH"), "{e}");
    }

    #[test]
    fn submission_without_tls_is_refused_with_the_fix() {
        let e = parse(&MINIMAL.replace("\"mx\"", "\"submission\"")).unwrap_err().to_string();
        assert!(e.contains("add a `[tls]` section"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse(&MINIMAL.replace("127.0.0.1:2525", "localhost")).unwrap_err().to_string();
        assert!(e.contains("listener[0].address"), "{e}");
        let e = parse(&MINIMAL.replace("/srv/mail", "srv/mail")).unwrap_err().to_string();
        assert!(e.contains("data_dir"), "{e}");
        let e = parse(&format!("directory_url = \"postgres://u:pw@h/db\"\n{MINIMAL}")).unwrap_err().to_string();
        assert!(e.contains("directory_url") && !e.contains("pw@"), "{e}");
        let e = parse(&MINIMAL.replace("[[listener]]\nkind = \"mx\"\naddress = \"127.0.0.1:2525\"\n", "")).unwrap_err();
        assert!(e.to_string().contains("[[listener]]"), "{e}");
    }

    #[test]
    fn tls_policy_picks_the_domain_then_the_nearest_parent_then_the_default() {
        let c = parse(&format!(
            "{MINIMAL}[delivery]\ntls_policy_default = \"encrypt\"\n[delivery.tls_policy]\n\
             \"Example.com\" = \"verify\"\n\".example.com\" = \"none\"\n\".a.example.com\" = \"may\"\n"
        ))
        .unwrap();
        let d = &c.delivery;
        assert_eq!(d.tls_level_for("example.com"), TlsLevel::Verify);
        assert_eq!(d.tls_level_for("EXAMPLE.com."), TlsLevel::Verify);
        assert_eq!(d.tls_level_for("b.example.com"), TlsLevel::None);
        assert_eq!(d.tls_level_for("x.a.example.com"), TlsLevel::May);
        assert_eq!(d.tls_level_for("other.org"), TlsLevel::Encrypt);
        assert!(d.needs_ca());
        assert_eq!(d.ca_path(), Path::new(SYSTEM_CA_FILE));
        let plain = parse(MINIMAL).unwrap();
        assert_eq!(plain.delivery.tls_level_for("x.org"), TlsLevel::May);
        assert!(!plain.delivery.needs_ca());
        let legacy = parse(&format!("{MINIMAL}[delivery]\nrequire_tls = true\n")).unwrap();
        assert_eq!(legacy.delivery.tls_default, TlsLevel::Encrypt);
    }

    #[test]
    fn relay_settings_are_checked() {
        let e = parse(&format!("{MINIMAL}[delivery]\nrequire_tls = true\ntls_policy_default = \"may\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keep only `tls_policy_default`"), "{e}");
        let auth = "relay_auth = { username = \"u\", password_file = \"/etc/mta/relay.pw\" }";
        let e = parse(&format!("{MINIMAL}[delivery]\n{auth}\n")).unwrap_err().to_string();
        assert!(e.contains("need `delivery.relay_host`"), "{e}");
        let relay = "relay_host = \"192.0.2.1:587\"";
        let c = parse(&format!("{MINIMAL}[delivery]\n{relay}\n{auth}\n")).unwrap();
        assert_eq!(c.delivery.relay_tls_level, TlsLevel::Encrypt, "AUTH raises the default to encrypt");
        let e = parse(&format!("{MINIMAL}[delivery]\n{relay}\n{auth}\nrelay_tls_policy = \"none\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only ever sent over TLS"), "{e}");
        let e = parse(&format!(
            "{MINIMAL}[delivery]\n{relay}\nrelay_auth = {{ username = \"u\", password_file = \"relay.pw\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("password_file") && e.contains("absolute"), "{e}");
        let c = parse(&format!("{MINIMAL}[delivery]\n{relay}\n")).unwrap();
        assert_eq!(c.delivery.relay_tls_level, TlsLevel::May);
    }

    #[test]
    fn password_files_must_be_private_and_non_empty() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mta-config-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("relay.pw");
        std::fs::write(&f, "s3cret\nignored\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_password_file(&f).unwrap_err().to_string();
        assert!(e.contains(&format!("chmod 600 {}", f.display())) && !e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password_file(&f).unwrap(), "s3cret");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_password_file(&f).unwrap_err().to_string().contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
