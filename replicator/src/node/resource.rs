//! The resource file: one TOML file, identical on both nodes (like a DRBD
//! resource file), resolved for the local node into a [`Resource`].
//!
//! ```toml
//! [resource]
//! name = "r0"
//! protocol = "C"                 # A, B or C
//! fencing = "dont-care"          # resource-only, resource-and-stonith
//! after-split-brain = "disconnect"
//!
//! [net]
//! ping-interval-ms = 1000
//! ping-timeout-ms = 2000
//! connect-interval-ms = 1000
//! io-timeout-ms = 6000
//! send-queue-kib = 16384         # protocol A: data sent, not yet acknowledged
//! on-congestion = "block"        # or "pull-ahead" (protocol A only)
//! tls = "mutual"                 # or "plaintext-lab"
//! ca = "/etc/replicator/ca.pem"
//!
//! [resync]
//! rate-min-kib = 4096
//! rate-max-kib = 102400
//! checksums = false
//!
//! [handlers]
//! fence-peer = "/usr/lib/replicator/fence-peer"
//! fence-peer-timeout-ms = 60000  # then it and its children are killed
//!
//! [[node]]
//! name = "alpha"                 # matched against the hostname or --node
//! id = 0
//! address = "10.0.0.1:7789"      # replication link
//! disk = "/dev/vdb"
//! meta = "internal"
//! nbd-listen = ["127.0.0.1:10809"]
//! nbd-unix = ["/run/replicator/r0.nbd"]
//! control = "/run/replicator/r0.ctl"
//! metrics-listen = "127.0.0.1:9933"
//! attach-method = "auto"        # or "kernel", "fuse" (replicator attach RES)
//! cert = "/etc/replicator/alpha.pem"
//! key = "/etc/replicator/alpha.key"
//! ```
//!
//! Unknown keys are errors; every error names the file, the key and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::ConfigError;
use crate::limits;
use crate::metadata::MetaLocation;
use crate::replication::generations::AfterSplitBrain;
use crate::replication::message::Protocol;
use crate::replication::replica::{Fencing, OnCongestion};

/// Where `replicator up RES` and the admin commands look for `RES.toml`.
pub const RESOURCE_DIR_DEFAULT: &str = "/etc/replicator";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileResource {
    resource: ResourceSection,
    #[serde(default)]
    net: NetSection,
    #[serde(default)]
    resync: ResyncSection,
    #[serde(default)]
    handlers: HandlersSection,
    #[serde(rename = "node")]
    nodes: Vec<NodeSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ResourceSection {
    name: String,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    #[serde(default = "default_fencing")]
    fencing: Fencing,
    #[serde(default = "default_after_sb")]
    after_split_brain: AfterSplitBrain,
}

fn default_protocol() -> Protocol {
    Protocol::C
}
fn default_fencing() -> Fencing {
    Fencing::DontCare
}
fn default_after_sb() -> AfterSplitBrain {
    AfterSplitBrain::Disconnect
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkSecurity {
    /// TLS with a certificate on both sides, checked against the cluster CA
    /// and the peer's node name.
    Mutual,
    /// No TLS, no authentication: only for labs on a trusted network.
    PlaintextLab,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NetSection {
    #[serde(default = "d_ping_interval")]
    ping_interval_ms: u64,
    #[serde(default = "d_ping_timeout")]
    ping_timeout_ms: u64,
    #[serde(default = "d_connect_interval")]
    connect_interval_ms: u64,
    #[serde(default = "d_io_timeout")]
    io_timeout_ms: u64,
    #[serde(default = "d_tls")]
    tls: LinkSecurity,
    ca: Option<PathBuf>,
    #[serde(default = "d_send_queue_kib")]
    send_queue_kib: u64,
    #[serde(default)]
    on_congestion: OnCongestion,
}

fn d_send_queue_kib() -> u64 {
    limits::REPL_SEND_QUEUE_BYTES_MAX / 1024
}

fn d_ping_interval() -> u64 {
    1000
}
fn d_ping_timeout() -> u64 {
    2000
}
fn d_connect_interval() -> u64 {
    1000
}
fn d_io_timeout() -> u64 {
    6000
}
fn d_tls() -> LinkSecurity {
    LinkSecurity::Mutual
}

impl Default for NetSection {
    fn default() -> Self {
        NetSection {
            ping_interval_ms: d_ping_interval(),
            ping_timeout_ms: d_ping_timeout(),
            connect_interval_ms: d_connect_interval(),
            io_timeout_ms: d_io_timeout(),
            tls: d_tls(),
            ca: None,
            send_queue_kib: d_send_queue_kib(),
            on_congestion: OnCongestion::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ResyncSection {
    #[serde(default = "d_rate_min")]
    rate_min_kib: u64,
    #[serde(default = "d_rate_max")]
    rate_max_kib: u64,
    #[serde(default)]
    checksums: bool,
}

fn d_rate_min() -> u64 {
    4 * 1024
}
fn d_rate_max() -> u64 {
    100 * 1024
}

impl Default for ResyncSection {
    fn default() -> Self {
        ResyncSection { rate_min_kib: d_rate_min(), rate_max_kib: d_rate_max(), checksums: false }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HandlersSection {
    fence_peer: Option<PathBuf>,
    /// How long the fence-peer handler may run before it and everything
    /// it started are killed (and the fence counts as failed).
    #[serde(default = "d_fence_peer_timeout")]
    fence_peer_timeout_ms: u64,
}

fn d_fence_peer_timeout() -> u64 {
    60_000
}

impl Default for HandlersSection {
    fn default() -> Self {
        HandlersSection { fence_peer: None, fence_peer_timeout_ms: d_fence_peer_timeout() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NodeSection {
    name: String,
    id: u32,
    address: String,
    disk: PathBuf,
    #[serde(default = "d_meta")]
    meta: String,
    #[serde(default)]
    nbd_listen: Vec<String>,
    #[serde(default)]
    nbd_unix: Vec<PathBuf>,
    control: Option<PathBuf>,
    metrics_listen: Option<String>,
    #[serde(default)]
    attach_method: AttachMethod,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// How `replicator attach RES` makes the block device on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMethod {
    /// The kernel nbd driver where present, else FUSE + loop.
    #[default]
    Auto,
    Kernel,
    Fuse,
}

fn d_meta() -> String {
    "internal".into()
}

/// One node of the resource, resolved.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub id: u32,
    pub address: SocketAddr,
    pub disk: PathBuf,
    pub meta: MetaLocation,
    pub nbd_listen: Vec<SocketAddr>,
    pub nbd_unix: Vec<PathBuf>,
    pub control: PathBuf,
    /// Prometheus `/metrics` endpoint.
    pub metrics_listen: Option<SocketAddr>,
    pub attach_method: AttachMethod,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The resource as the local node runs it.
#[derive(Debug, Clone)]
pub struct Resource {
    pub path: PathBuf,
    pub name: String,
    pub protocol: Protocol,
    pub fencing: Fencing,
    pub after_split_brain: AfterSplitBrain,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub connect_interval_ms: u64,
    pub io_timeout_ms: u64,
    pub link_security: LinkSecurity,
    pub ca: Option<PathBuf>,
    /// Protocol A's send queue bound (see `Config::send_queue_bytes_max`).
    pub send_queue_bytes: u64,
    pub on_congestion: OnCongestion,
    pub resync_rate_min_bytes_per_sec: u64,
    pub resync_rate_max_bytes_per_sec: u64,
    pub resync_checksums: bool,
    pub fence_peer: Option<PathBuf>,
    pub fence_peer_timeout_ms: u64,
    pub local: NodeConfig,
    pub peer: NodeConfig,
}

/// `RES` or a path: a bare name means `<dir>/<RES>.toml`, where `dir` is
/// `$REPLICATOR_RESOURCE_DIR` or [`RESOURCE_DIR_DEFAULT`].
pub fn resource_path(res_or_path: &str) -> PathBuf {
    if res_or_path.contains('/') || res_or_path.ends_with(".toml") {
        return PathBuf::from(res_or_path);
    }
    let dir =
        std::env::var_os("REPLICATOR_RESOURCE_DIR").map_or_else(|| PathBuf::from(RESOURCE_DIR_DEFAULT), PathBuf::from);
    dir.join(format!("{res_or_path}.toml"))
}

/// Reads the resource file and picks the local node: `node` if given, else
/// the node whose name is this host's name.
pub fn load(path: &Path, node: Option<&str>) -> Result<Resource, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.to_owned(), cause })?;
    parse(path, &text, node)
}

pub fn parse(path: &Path, text: &str, node: Option<&str>) -> Result<Resource, ConfigError> {
    let file: FileResource =
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), cause: e.to_string() })?;
    let invalid = |key: &str, why: String| ConfigError::Invalid(format!("{}: {key}: {why}", path.display()));
    let r = &file.resource;
    if r.name.is_empty() || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(invalid("resource.name", "use letters, digits, '-' and '_' only".into()));
    }
    if file.nodes.len() != 2 {
        return Err(invalid("node", format!("{} [[node]] sections; a resource has exactly two", file.nodes.len())));
    }
    let n = &file.net;
    if n.ping_interval_ms == 0 || n.ping_timeout_ms == 0 || n.io_timeout_ms == 0 || n.connect_interval_ms == 0 {
        return Err(invalid("net", "timeouts and intervals must be positive".into()));
    }
    if n.io_timeout_ms < n.ping_timeout_ms {
        return Err(invalid("net.io-timeout-ms", "must be at least net.ping-timeout-ms".into()));
    }
    let queue_kib = limits::REPL_SEND_QUEUE_KIB_MIN..=limits::REPL_SEND_QUEUE_KIB_MAX;
    if !queue_kib.contains(&n.send_queue_kib) {
        return Err(invalid(
            "net.send-queue-kib",
            format!("{} is out of range; use {} to {}", n.send_queue_kib, queue_kib.start(), queue_kib.end()),
        ));
    }
    if n.on_congestion == OnCongestion::PullAhead && r.protocol != Protocol::A {
        return Err(invalid(
            "net.on-congestion",
            format!(
                "\"pull-ahead\" needs protocol = \"A\" (protocol {:?} answers a write only once the peer has it); \
                 remove the key or switch the protocol",
                r.protocol
            ),
        ));
    }
    let s = &file.resync;
    if s.rate_min_kib == 0 || s.rate_max_kib < s.rate_min_kib {
        return Err(invalid(
            "resync.rate-max-kib",
            "must be at least resync.rate-min-kib, which must be positive".into(),
        ));
    }
    if n.tls == LinkSecurity::Mutual && n.ca.is_none() {
        return Err(invalid(
            "net.ca",
            "mutual TLS needs the cluster CA certificate; set net.ca (or net.tls = \"plaintext-lab\" on a trusted lab network)"
                .into(),
        ));
    }
    if r.fencing == Fencing::ResourceAndStonith && file.handlers.fence_peer.is_none() {
        return Err(invalid(
            "resource.fencing",
            "\"resource-and-stonith\" suspends I/O whenever the peer is lost until handlers.fence-peer confirms \
             it is fenced; set handlers.fence-peer (or choose fencing = \"resource-only\" or \"dont-care\")"
                .into(),
        ));
    }
    if file.handlers.fence_peer_timeout_ms == 0 {
        return Err(invalid("handlers.fence-peer-timeout-ms", "must be positive".into()));
    }
    let mut nodes = Vec::new();
    for (i, raw) in file.nodes.iter().enumerate() {
        let key = |k: &str| format!("node[{i}].{k}");
        let address = raw
            .address
            .parse::<SocketAddr>()
            .map_err(|e| invalid(&key("address"), format!("{:?} is not IP:PORT ({e})", raw.address)))?;
        let meta = raw.meta.parse::<MetaLocation>().map_err(|e| invalid(&key("meta"), e.to_string()))?;
        let mut nbd_listen = Vec::new();
        for a in &raw.nbd_listen {
            nbd_listen.push(a.parse::<SocketAddr>().map_err(|e| invalid(&key("nbd-listen"), format!("{a:?}: {e}")))?);
        }
        if n.tls == LinkSecurity::Mutual && (raw.cert.is_none() || raw.key.is_none()) {
            return Err(invalid(&key("cert"), "mutual TLS needs cert and key for every node".into()));
        }
        let metrics_listen = match &raw.metrics_listen {
            Some(a) => {
                Some(a.parse::<SocketAddr>().map_err(|e| invalid(&key("metrics-listen"), format!("{a:?}: {e}")))?)
            }
            None => None,
        };
        let control = raw.control.clone().unwrap_or_else(|| PathBuf::from(format!("/run/replicator/{}.ctl", r.name)));
        nodes.push(NodeConfig {
            name: raw.name.clone(),
            id: raw.id,
            address,
            disk: raw.disk.clone(),
            meta,
            nbd_listen,
            nbd_unix: raw.nbd_unix.clone(),
            control,
            metrics_listen,
            attach_method: raw.attach_method,
            cert: raw.cert.clone(),
            key: raw.key.clone(),
        });
    }
    if nodes[0].name == nodes[1].name || nodes[0].id == nodes[1].id {
        return Err(invalid("node", "the two nodes need different names and ids".into()));
    }
    let wanted = match node {
        Some(name) => name.to_owned(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .ok_or_else(|| invalid("node", "cannot read the hostname; pass --node NAME".into()))?,
    };
    let Some(local) = nodes.iter().position(|x| x.name == wanted) else {
        return Err(invalid(
            "node",
            format!("no node is named {wanted:?} (nodes: {:?}, {:?}); pass --node NAME", nodes[0].name, nodes[1].name),
        ));
    };
    if nodes[local].nbd_listen.is_empty() && nodes[local].nbd_unix.is_empty() {
        return Err(invalid(&format!("node[{local}].nbd-listen"), "give nbd-listen or nbd-unix for the node".into()));
    }
    let peer = nodes[1 - local].clone();
    let local = nodes[local].clone();
    Ok(Resource {
        path: path.to_owned(),
        name: r.name.clone(),
        protocol: r.protocol,
        fencing: r.fencing,
        after_split_brain: r.after_split_brain,
        ping_interval_ms: n.ping_interval_ms,
        ping_timeout_ms: n.ping_timeout_ms,
        connect_interval_ms: n.connect_interval_ms,
        io_timeout_ms: n.io_timeout_ms,
        link_security: n.tls,
        ca: n.ca.clone(),
        send_queue_bytes: n.send_queue_kib * 1024,
        on_congestion: n.on_congestion,
        resync_rate_min_bytes_per_sec: s.rate_min_kib * 1024,
        resync_rate_max_bytes_per_sec: s.rate_max_kib * 1024,
        resync_checksums: s.checksums,
        fence_peer: file.handlers.fence_peer.clone(),
        fence_peer_timeout_ms: file.handlers.fence_peer_timeout_ms,
        local,
        peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[resource]
name = "r0"
protocol = "B"

[net]
tls = "plaintext-lab"

[[node]]
name = "a"
id = 0
address = "10.0.0.1:7789"
disk = "/dev/vdb"
nbd-listen = ["127.0.0.1:10809"]

[[node]]
name = "b"
id = 1
address = "10.0.0.2:7789"
disk = "/dev/vdb"
nbd-unix = ["/run/r0.nbd"]
"#;

    #[test]
    fn picks_the_local_node_and_its_peer() {
        let r = parse(Path::new("r0.toml"), GOOD, Some("b")).unwrap();
        assert_eq!(r.local.name, "b");
        assert_eq!(r.peer.name, "a");
        assert_eq!(r.protocol, Protocol::B);
        assert_eq!(r.local.control, PathBuf::from("/run/replicator/r0.ctl"));
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_fix() {
        let err = parse(Path::new("r0.toml"), GOOD, Some("c")).unwrap_err().to_string();
        assert!(err.contains("r0.toml") && err.contains("no node is named \"c\"") && err.contains("--node"), "{err}");
        let typo = GOOD.replace("protocol = \"B\"", "protocl = \"B\"");
        let err = parse(Path::new("r0.toml"), &typo, Some("a")).unwrap_err().to_string();
        assert!(err.contains("protocl"), "{err}");
        let mutual = GOOD.replace("tls = \"plaintext-lab\"", "tls = \"mutual\"");
        let err = parse(Path::new("r0.toml"), &mutual, Some("a")).unwrap_err().to_string();
        assert!(err.contains("net.ca"), "{err}");
        let stonith = GOOD.replace("protocol = \"B\"", "fencing = \"resource-and-stonith\"");
        let err = parse(Path::new("r0.toml"), &stonith, Some("a")).unwrap_err().to_string();
        assert!(err.contains("resource.fencing") && err.contains("handlers.fence-peer"), "{err}");
        let handled = format!("{stonith}\n[handlers]\nfence-peer = \"/bin/true\"\n");
        assert_eq!(parse(Path::new("r0.toml"), &handled, Some("a")).unwrap().fence_peer_timeout_ms, 60_000);
        let timed = format!("{handled}fence-peer-timeout-ms = 1500\n");
        assert_eq!(parse(Path::new("r0.toml"), &timed, Some("a")).unwrap().fence_peer_timeout_ms, 1500);
        let bad_addr = GOOD.replace("10.0.0.2:7789", "nowhere");
        let err = parse(Path::new("r0.toml"), &bad_addr, Some("a")).unwrap_err().to_string();
        assert!(err.contains("node[1].address"), "{err}");
    }

    #[test]
    fn congestion_keys_are_checked_against_the_protocol() {
        let r = parse(Path::new("r0.toml"), GOOD, Some("a")).unwrap();
        assert_eq!((r.send_queue_bytes, r.on_congestion), (limits::REPL_SEND_QUEUE_BYTES_MAX, OnCongestion::Block));
        let ahead = GOOD.replace("[net]\n", "[net]\non-congestion = \"pull-ahead\"\nsend-queue-kib = 4096\n");
        let err = parse(Path::new("r0.toml"), &ahead, Some("a")).unwrap_err().to_string();
        assert!(err.contains("net.on-congestion") && err.contains("protocol = \"A\""), "{err}");
        let a = ahead.replace("protocol = \"B\"", "protocol = \"A\"");
        let r = parse(Path::new("r0.toml"), &a, Some("a")).unwrap();
        assert_eq!((r.send_queue_bytes, r.on_congestion), (4096 * 1024, OnCongestion::PullAhead));
        let tiny = a.replace("send-queue-kib = 4096", "send-queue-kib = 1");
        let err = parse(Path::new("r0.toml"), &tiny, Some("a")).unwrap_err().to_string();
        assert!(err.contains("net.send-queue-kib") && err.contains("64"), "{err}");
        let unknown = a.replace("\"pull-ahead\"", "\"disconnect\"");
        let err = parse(Path::new("r0.toml"), &unknown, Some("a")).unwrap_err().to_string();
        assert!(err.contains("disconnect"), "{err}");
    }
}
