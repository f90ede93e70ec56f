//! In-process tests of the cluster log: real nodes, real TLS over loopback,
//! state in temp directories. Every wait is a condition with a deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const WAIT: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// A fresh directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("clusterd-raft-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A CA (`ca.pem`) and, for each name, `NAME.pem` + `NAME.key` signed by it
/// with the name as DNS SAN, usable as TLS server and client.
fn make_pki(dir: &Path, names: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("pki dir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "clusterd test CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca");
    for name in names {
        let mut p = CertificateParams::new(vec![name.to_string()]).expect("params");
        p.distinguished_name.push(DnType::CommonName, *name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &ca, &ca_key).expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
    }
    dir.join("ca.pem")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// The daemon's side as the tests model it: the folded state is the list of
/// committed payloads in order.
#[derive(Debug, Default, Clone)]
struct Observed {
    payloads: Vec<Vec<u8>>,
    /// Raft indexes of the `Committed` entries, in delivery order.
    indexes: Vec<u64>,
    last_index: u64,
    restores: Vec<u64>,
    quorum: bool,
}

fn fold(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn unfold(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        out.push(data[4..4 + n].to_vec());
        data = &data[4 + n..];
    }
    out
}

struct TestNode {
    cfg: RaftLogConfig,
    log: Option<RaftLog>,
    obs: Arc<Mutex<Observed>>,
}

impl TestNode {
    fn obs(&self) -> Observed {
        self.obs.lock().expect("obs").clone()
    }

    fn log(&self) -> &RaftLog {
        self.log.as_ref().expect("node is running")
    }

    fn start(&mut self) {
        let (log, mut rx) = start(self.cfg.clone()).expect("start node");
        let obs = Arc::new(Mutex::new(Observed::default()));
        self.obs = obs.clone();
        self.log = Some(log);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let mut o = obs.lock().expect("obs");
                match ev {
                    LogEvent::Committed(entries) => {
                        for (i, data) in entries {
                            assert!(i > o.last_index, "index {i} delivered after {}", o.last_index);
                            o.last_index = i;
                            o.indexes.push(i);
                            o.payloads.push(data);
                        }
                    }
                    LogEvent::Quorum(q) => o.quorum = q,
                    LogEvent::Restore { index, data } => {
                        o.payloads = unfold(&data);
                        o.last_index = index;
                        o.restores.push(index);
                    }
                }
            }
        });
    }

    async fn stop(&mut self) {
        if let Some(log) = self.log.take() {
            log.shutdown().await;
        }
    }

    /// Compacts at what this node has folded so far.
    fn compact(&self) -> u64 {
        let o = self.obs();
        self.log().compact(o.last_index, fold(&o.payloads));
        o.last_index
    }
}

struct Cluster {
    base: PathBuf,
    nodes: Vec<TestNode>,
}

fn name(i: usize) -> String {
    format!("node{i}")
}

impl Cluster {
    /// `n` nodes' configurations (not started); certificates for them plus
    /// an "intruder" signed by the same CA.
    fn new(tag: &str, n: usize) -> Cluster {
        init_tracing();
        let base = temp_dir(tag);
        let mut names: Vec<String> = (0..n).map(name).collect();
        names.push("intruder".into());
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let ca = make_pki(&base.join("pki"), &refs);
        let addrs: Vec<SocketAddr> = (0..n).map(|_| SocketAddr::from(([127, 0, 0, 1], free_port()))).collect();
        let nodes = (0..n)
            .map(|i| {
                let peers = (0..n)
                    .filter(|j| *j != i)
                    .map(|j| RaftPeer { id: NodeId(j as u8), name: name(j), addr: addrs[j] })
                    .collect();
                let tls = RaftTlsFiles {
                    ca: ca.clone(),
                    cert: base.join("pki").join(format!("{}.pem", name(i))),
                    key: base.join("pki").join(format!("{}.key", name(i))),
                };
                let cfg =
                    RaftLogConfig::new(NodeId(i as u8), name(i), addrs[i], peers, base.join(format!("state{i}")), tls);
                TestNode { cfg, log: None, obs: Arc::default() }
            })
            .collect();
        Cluster { base, nodes }
    }

    fn start_all(&mut self) {
        for n in &mut self.nodes {
            n.start();
        }
    }

    fn running(&self) -> impl Iterator<Item = (usize, &TestNode)> {
        self.nodes.iter().enumerate().filter(|(_, n)| n.log.is_some())
    }

    /// The leader all running nodes agree on.
    async fn leader(&self) -> usize {
        let mut found = None;
        wait_for("a leader all running nodes agree on", WAIT, || {
            let leaders: Vec<Option<NodeId>> = self.running().map(|(_, n)| n.log().status().leader).collect();
            found = leaders[0].filter(|l| leaders.iter().all(|x| *x == Some(*l)));
            found.is_some_and(|l| self.nodes[l.0 as usize].log.is_some())
        })
        .await;
        found.map(|l| l.0 as usize).expect("leader")
    }

    /// Proposes `data` on node `on` until every running node has it
    /// (re-proposing like the daemon does when a proposal was dropped).
    async fn commit(&self, on: usize, data: &[u8]) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.nodes[on].log().propose(data.to_vec());
            let seen = wait_until(Duration::from_secs(2), || {
                self.running().all(|(_, n)| n.obs().payloads.iter().any(|p| p == data))
            })
            .await;
            if seen {
                return;
            }
            assert!(Instant::now() < deadline, "{:?} proposed on node{on} never committed everywhere", data);
        }
    }

    /// Every running node folded the same payloads (and as many as `min`).
    async fn converged(&self, min: usize) -> Vec<Vec<u8>> {
        let mut state = Vec::new();
        wait_for("all running nodes to fold the same entries", WAIT, || {
            let states: Vec<Vec<Vec<u8>>> = self.running().map(|(_, n)| n.obs().payloads).collect();
            state = states[0].clone();
            state.len() >= min && states.iter().all(|s| *s == state)
        })
        .await;
        state
    }

    async fn stop_all(&mut self) {
        for n in &mut self.nodes {
            n.stop().await;
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Polls `cond` until it holds or `within` passes; whether it held.
async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for(what: &str, within: Duration, cond: impl FnMut() -> bool) {
    assert!(wait_until(within, cond).await, "timed out after {within:?} waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_commit_proposals_from_every_node_in_one_order() {
    let mut c = Cluster::new("order", 3);
    c.start_all();
    let leader = c.leader().await;
    for round in 0..3 {
        for i in 0..3 {
            c.commit(i, format!("r{round}-n{i}").as_bytes()).await;
        }
    }
    let state = c.converged(9).await;
    for round in 0..3 {
        for i in 0..3 {
            assert!(state.contains(&format!("r{round}-n{i}").into_bytes()), "r{round}-n{i} missing");
        }
    }
    // Every node saw the same raft indexes too, and all of them had quorum.
    let idx: Vec<Vec<u64>> = c.nodes.iter().map(|n| n.obs().indexes).collect();
    assert!(idx.iter().all(|i| *i == idx[0]), "indexes differ: {idx:?}");
    wait_for("Quorum(true) on every node", WAIT, || c.nodes.iter().all(|n| n.obs().quorum)).await;
    let st = c.nodes[leader].log().status();
    assert_eq!(st.leader, Some(NodeId(leader as u8)));
    assert!(st.commit >= 9 && st.applied >= *idx[0].last().expect("entries"));
    wait_for("all peers connected", WAIT, || c.nodes.iter().all(|n| n.log().status().peers.iter().all(|(_, up)| *up)))
        .await;
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_is_replaced_and_a_lone_node_loses_quorum() {
    let mut c = Cluster::new("failover", 3);
    c.start_all();
    let old = c.leader().await;
    c.commit(old, b"before").await;
    wait_for("Quorum(true) everywhere", WAIT, || c.nodes.iter().all(|n| n.obs().quorum)).await;

    let killed_at = Instant::now();
    c.nodes[old].stop().await;
    let new = c.leader().await;
    let took = killed_at.elapsed();
    assert_ne!(new, old);
    tracing::info!(?took, "new leader elected");
    assert!(took < Duration::from_secs(5), "failover took {took:?}");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    for &s in &survivors {
        c.commit(s, format!("after-{s}").as_bytes()).await;
    }
    c.converged(3).await;
    wait_for("Quorum(true) on both survivors", WAIT, || survivors.iter().all(|s| c.nodes[*s].obs().quorum)).await;

    // Stop one more: the last node cannot commit and says so quickly.
    let lone = survivors[0];
    c.nodes[survivors[1]].stop().await;
    let stopped_at = Instant::now();
    let timeout_ms = c.nodes[lone].cfg.election_timeout_ms();
    // About two election timeouts, with slack for a loaded machine.
    wait_for("Quorum(false) on the lone node", Duration::from_millis(timeout_ms * 2 + 1500), || {
        !c.nodes[lone].obs().quorum
    })
    .await;
    tracing::info!(took = ?stopped_at.elapsed(), "lone node lost quorum");
    assert!(!c.nodes[lone].log().status().quorum);
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_replays_its_log_and_catches_up() {
    let mut c = Cluster::new("restart", 3);
    c.start_all();
    let leader = c.leader().await;
    for k in 0..5 {
        c.commit(leader, format!("e{k}").as_bytes()).await;
    }
    let before = c.converged(5).await;
    let follower = (leader + 1) % 3;
    let indexes_before = c.nodes[follower].obs().indexes;
    c.nodes[follower].stop().await;
    let leader = c.leader().await;
    for k in 5..8 {
        c.commit(leader, format!("e{k}").as_bytes()).await;
    }
    c.nodes[follower].start();
    let after = c.converged(8).await;
    assert_eq!(&after[..before.len()], &before[..], "the replayed prefix differs");
    let o = c.nodes[follower].obs();
    assert!(o.restores.is_empty(), "no snapshot exists, so no Restore");
    assert_eq!(&o.indexes[..indexes_before.len()], &indexes_before[..], "replayed with other indexes");
    assert_eq!(o.payloads, c.nodes[leader].obs().payloads);
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_restores_from_snapshots_locally_and_from_the_leader() {
    let mut c = Cluster::new("compact", 3);
    c.start_all();
    let leader = c.leader().await;
    for k in 0..6 {
        c.commit(leader, format!("e{k}").as_bytes()).await;
    }
    c.converged(6).await;
    let mut at = Vec::new();
    for n in &c.nodes {
        at.push(n.compact());
    }
    wait_for("every node compacted", WAIT, || c.nodes.iter().zip(&at).all(|(n, a)| n.log().status().snapshot == *a))
        .await;

    // (1) A restart starts from the local snapshot, then later entries.
    let f = (leader + 1) % 3;
    c.nodes[f].stop().await;
    c.nodes[f].start();
    wait_for("the restarted node's Restore", WAIT, || !c.nodes[f].obs().restores.is_empty()).await;
    assert_eq!(c.nodes[f].obs().restores[0], at[f], "Restore at the local snapshot first");
    let leader = c.leader().await;
    c.commit(leader, b"e6").await;
    c.converged(7).await;
    let o = c.nodes[f].obs();
    assert!(o.indexes.iter().all(|i| *i > at[f]), "only entries after the snapshot are replayed: {o:?}");

    // (2) A node down while the others compact past its log catches up
    // through the leader's snapshot.
    let lagging = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    c.nodes[lagging].stop().await;
    for k in 7..10 {
        c.commit(leader, format!("e{k}").as_bytes()).await;
    }
    c.converged(10).await;
    let leader_snap = c.nodes[leader].compact();
    c.nodes[other].compact();
    wait_for("leader compacted", WAIT, || c.nodes[leader].log().status().snapshot == leader_snap).await;
    c.nodes[lagging].start();
    wait_for("the lagging node receives the leader's snapshot", WAIT, || {
        c.nodes[lagging].obs().restores.contains(&leader_snap)
    })
    .await;
    c.commit(leader, b"e10").await;
    let state = c.converged(11).await;
    assert_eq!(state.len(), 11);

    // (3) A node whose state directory was wiped rejoins from a snapshot.
    let wiped = lagging;
    c.nodes[wiped].stop().await;
    std::fs::remove_dir_all(&c.nodes[wiped].cfg.state_dir).expect("wipe state dir");
    c.nodes[wiped].start();
    // The leader finds out at its next append that the node lost its log.
    c.commit(leader, b"e11").await;
    let state = c.converged(12).await;
    assert!(!c.nodes[wiped].obs().restores.is_empty(), "the wiped node caught up without a snapshot");
    assert_eq!(unfold(&fold(&state)), state);
    c.stop_all().await;
}

/// A TLS client with the given certificate, checking the server is `server`.
async fn tls_client(
    ca: &Path,
    cert: &Path,
    key: &Path,
    server: &str,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca").map(|c| c.expect("ca cert")) {
        roots.add(c).expect("root");
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).expect("cert").map(|c| c.expect("cert")).collect();
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client config");
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server.to_owned()).expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await
}

/// Whether the server closes the connection (EOF or error) within a while.
async fn closed_by_server(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

fn frame(m: &Message) -> Vec<u8> {
    let body = m.write_to_bytes().expect("encode");
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_peers_get_through_and_bad_input_drops_the_connection() {
    let mut c = Cluster::new("security", 3);
    c.start_all();
    let leader = c.leader().await;
    c.commit(leader, b"first").await;
    let target = 0usize;
    let addr = c.nodes[target].log().local_addr();
    let pki = c.base.join("pki");
    let ca = pki.join("ca.pem");
    let stats = || c.nodes[target].log().transport_stats();

    // A certificate from another CA, even for a configured peer's name.
    let evil = c.base.join("evil");
    make_pki(&evil, &["node1"]);
    let before = stats();
    if let Ok(mut s) = tls_client(&ca, &evil.join("node1.pem"), &evil.join("node1.key"), "node0", addr).await {
        let _ = s.write_all(&frame(&Message::default())).await;
        assert!(closed_by_server(&mut s).await, "a foreign CA's client must be refused");
    }
    wait_for("the failed handshake counted", WAIT, || stats().handshakes_failed > before.handshakes_failed).await;

    // A certificate of our CA for a node that is not a peer.
    let before = stats();
    let mut s = tls_client(&ca, &pki.join("intruder.pem"), &pki.join("intruder.key"), "node0", addr)
        .await
        .expect("handshake with a CA-signed certificate");
    let _ = s.write_all(&frame(&Message::default())).await;
    assert!(closed_by_server(&mut s).await, "a non-peer must be refused");
    wait_for("the unknown peer counted", WAIT, || stats().peers_unknown > before.peers_unknown).await;

    // A client dialling node0 while expecting node1 refuses node0's
    // certificate (what every sender checks against the peer it dials).
    let wrong = tls_client(&ca, &pki.join("node2.pem"), &pki.join("node2.key"), "node1", addr).await;
    assert!(wrong.is_err(), "a server certificate for another node must be refused");

    let (n1_cert, n1_key) = (pki.join("node1.pem"), pki.join("node1.key"));
    let as_node1 = || tls_client(&ca, &n1_cert, &n1_key, "node0", addr);

    // An oversized length prefix.
    let before = stats();
    let mut s = as_node1().await.expect("handshake as node1");
    s.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
    assert!(closed_by_server(&mut s).await, "an oversized frame must drop the connection");
    wait_for("the bad frame counted", WAIT, || stats().frames_bad > before.frames_bad).await;

    // Garbage that is not a raft message.
    let before = stats();
    let mut s = as_node1().await.expect("handshake as node1");
    let mut garbage = 16u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 16]);
    s.write_all(&garbage).await.expect("write");
    assert!(closed_by_server(&mut s).await, "garbage must drop the connection");
    wait_for("the bad message counted", WAIT, || stats().messages_bad > before.messages_bad).await;

    // node1 claiming to be node2, with a term that would depose the leader.
    let before = stats();
    let term = c.nodes[target].log().status().term;
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = raft_id(NodeId(2));
    m.to = raft_id(NodeId(0));
    m.term = term + 100;
    let mut s = as_node1().await.expect("handshake as node1");
    s.write_all(&frame(&m)).await.expect("write");
    assert!(closed_by_server(&mut s).await, "a forged sender must drop the connection");
    wait_for("the forged sender counted", WAIT, || stats().messages_wrong_from > before.messages_wrong_from).await;
    assert!(c.nodes[target].log().status().term < term + 100, "the forged message reached raft");

    // The cluster kept working throughout.
    for i in 0..3 {
        c.commit(i, format!("after-{i}").as_bytes()).await;
    }
    c.converged(4).await;
    c.stop_all().await;
}

fn single_node(tag: &str) -> Cluster {
    Cluster::new(tag, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_discarded_and_middle_corruption_names_the_fix() {
    let mut c = single_node("storage");
    c.start_all();
    c.leader().await;
    for k in 0..3 {
        c.commit(0, format!("e{k}").as_bytes()).await;
    }
    let state = c.converged(3).await;
    c.nodes[0].stop().await;

    let file = c.nodes[0].cfg.state_dir.join(storage::STATE_FILE);
    let good = std::fs::read(&file).expect("state file");
    // A record header promising 100 bytes, and only 10 of them.
    let mut torn = good.clone();
    torn.extend_from_slice(&100u32.to_le_bytes());
    torn.extend_from_slice(&0x1234_5678u32.to_le_bytes());
    torn.extend_from_slice(&[7; 10]);
    std::fs::write(&file, &torn).expect("write torn file");
    c.nodes[0].start();
    c.converged(3).await;
    assert_eq!(c.nodes[0].obs().payloads, state, "all committed entries replayed after the torn tail");
    c.nodes[0].stop().await;
    let after = std::fs::read(&file).expect("state file");
    assert!(after.starts_with(&good) && after.len() < torn.len(), "the torn tail was cut off");

    // Flip a byte inside the first frame: frames follow, so it is corruption.
    let mut bad = after.clone();
    bad[record::MAGIC.len() + 8 + 2] ^= 0x40;
    std::fs::write(&file, &bad).expect("write corrupt file");
    let err = start(c.nodes[0].cfg.clone()).expect_err("a corrupt state file must refuse to start");
    let text = err.to_string();
    assert!(matches!(err, RaftLogError::Corrupt { offset: 8, .. }), "{text}");
    assert!(text.contains(&file.display().to_string()), "{text}");
    assert!(text.contains("remove the state directory"), "{text}");
    c.stop_all().await;
}

/// Two-node mode: a lone survivor forced to be the only voter commits
/// alone, keeps that membership across a restart, and adds its peer back
/// through a committed conf change when it returns (the peer catching up
/// through a snapshot taken while it was not a voter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_single_voter_commits_alone_across_a_restart_and_adds_its_peer_back() {
    let mut c = Cluster::new("single", 2);
    c.start_all();
    let leader = c.leader().await;
    c.commit(leader, b"pair").await;
    c.converged(1).await;
    // Node 1 is "fenced": node 0 is alone and without quorum.
    c.nodes[1].stop().await;
    wait_for("Quorum(false) on the survivor", WAIT, || !c.nodes[0].obs().quorum).await;
    c.nodes[0].log().propose(b"lost".to_vec());
    assert!(
        !wait_until(Duration::from_millis(800), || c.nodes[0].obs().payloads.len() > 1).await,
        "a lone node of two committed without being forced"
    );
    c.nodes[0].log().force_single_voter().await.expect("force");
    wait_for("the survivor the only voter", WAIT, || c.nodes[0].log().status().voters == vec![NodeId(0)]).await;
    c.commit(0, b"alone-1").await;
    wait_for("Quorum(true) alone", WAIT, || c.nodes[0].obs().quorum).await;
    // Forcing again is a no-op.
    c.nodes[0].log().force_single_voter().await.expect("force again");
    let snap = c.nodes[0].compact();
    wait_for("compacted", WAIT, || c.nodes[0].log().status().snapshot == snap).await;

    // A restart keeps the single-voter membership.
    c.nodes[0].stop().await;
    c.nodes[0].start();
    wait_for("the restarted survivor leads alone", WAIT, || {
        let st = c.nodes[0].log().status();
        st.leader == Some(NodeId(0)) && st.quorum
    })
    .await;
    assert_eq!(c.nodes[0].log().status().voters, vec![NodeId(0)]);
    c.commit(0, b"alone-2").await;

    // The peer returns: added back, it catches up, and both commit again.
    c.nodes[1].start();
    wait_for("the peer added back as a voter", WAIT, || {
        c.nodes[0].log().add_voter(NodeId(1));
        c.nodes[0].log().status().voters == vec![NodeId(0), NodeId(1)]
    })
    .await;
    c.commit(1, b"pair-again").await;
    let state = c.converged(4).await;
    for p in [&b"pair"[..], b"alone-1", b"alone-2", b"pair-again"] {
        assert!(state.iter().any(|s| s == p), "{:?} missing from {state:?}", String::from_utf8_lossy(p));
    }
    assert!(!c.nodes[1].obs().restores.is_empty(), "the peer caught up through the snapshot");
    // Two voters again: without the peer, no quorum.
    c.nodes[1].stop().await;
    wait_for("Quorum(false) without the peer again", WAIT, || !c.nodes[0].obs().quorum).await;
    // Restarted, node 0 still has two voters (the AddNode is in its log).
    c.nodes[0].stop().await;
    c.nodes[0].start();
    wait_for("status after restart", WAIT, || c.nodes[0].log().status().voters.len() == 2).await;
    c.stop_all().await;
}

/// Issue 23: a peer that rebooted rejoined after 2–27 s because the sender
/// kept writing into its dead connection (the kernel buffers, TCP
/// retransmits with backoff). `redial` drops the connection and dials again
/// at once. The peer here is a TLS server that accepts and never answers,
/// as a dead connection looks from the sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redial_drops_a_silent_connection_and_dials_again_at_once() {
    init_tracing();
    let base = temp_dir("redial");
    let ca = make_pki(&base.join("pki"), &["node0", "node1"]);
    let pki = base.join("pki");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let files = |n: &str| RaftTlsFiles {
        ca: ca.clone(),
        cert: pki.join(format!("{n}.pem")),
        key: pki.join(format!("{n}.key")),
    };
    let peer = |id: u8, n: &str| RaftPeer { id: NodeId(id), name: n.into(), addr };
    let server_tls = Arc::new(tls::TlsSetup::load(&files("node1"), &[peer(0, "node0")]).expect("node1 tls"));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            if let Ok(s) = server_tls.acceptor.accept(tcp).await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(s); // never read, never closed
            }
        }
    });
    let client_tls = Arc::new(tls::TlsSetup::load(&files("node0"), &[peer(1, "node1")]).expect("node0 tls"));
    let (reports, _reports_rx) = tokio::sync::mpsc::channel(16);
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let (link, task) =
        transport::spawn_sender(peer(1, "node1"), client_tls, reports, Arc::new(transport::Counters::default()), stop);
    let n = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("the first connection", WAIT, || n() == 1).await;
    // Without a redial the sender keeps its connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(n(), 1);
    let t0 = Instant::now();
    link.redial();
    wait_for("a second connection after the redial", WAIT, || n() == 2).await;
    assert!(t0.elapsed() < Duration::from_millis(900), "dialled again without backoff: {:?}", t0.elapsed());
    task.abort();
    server.abort();
}
