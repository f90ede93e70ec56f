//! The daemon's life: metadata commands, readiness, SIGTERM with writes in
//! flight, restart persistence, the control socket (`status`) and metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::Value;
use tests::nbd::{self, Client};
use tests::{
    assert_same_bytes, io_counter, random_bytes, replicator, run, run_fail, status_json, wait_until, Server, TestDir,
    Volume, KIB, MIB,
};

const BLOCK: u64 = 4096;

fn block_data(i: u64) -> Vec<u8> {
    random_bytes(BLOCK as usize, 0x5eed_0000 + i)
}

#[test]
fn metadata_commands() {
    let dir = TestDir::new("md");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let md = vol.dump_md().unwrap();
    for field in ["data_size_bytes", "volume_uuid", "format_version", "seq"] {
        assert!(md.get(field).is_some(), "dump-md lacks {field}: {md}");
    }
    let uuid = md["volume_uuid"].clone();

    // Metadata is not silently overwritten...
    let mut c = replicator();
    c.arg("create-md").args(vol.disk_args());
    run_fail(&mut c).unwrap();
    assert_eq!(vol.dump_md().unwrap()["volume_uuid"], uuid, "failed create-md changed the volume");
    // ...unless forced, which makes a new volume identity.
    let mut c = replicator();
    c.arg("create-md").args(vol.disk_args()).arg("--force");
    run(&mut c).unwrap();
    assert_ne!(vol.dump_md().unwrap()["volume_uuid"], uuid, "--force kept the old volume uuid");

    // A disk without metadata cannot be dumped or served.
    let bare = dir.join("bare.img");
    std::fs::File::create(&bare).unwrap().set_len(16 * MIB).unwrap();
    let mut c = replicator();
    c.args(["dump-md", "--disk"]).arg(&bare);
    run_fail(&mut c).unwrap();
    let ctl = dir.join("ctl.sock");
    let args =
        ["serve", "--disk", bare.to_str().unwrap(), "--listen", "127.0.0.1:0", "--control", ctl.to_str().unwrap()];
    let err = match Server::spawn(args) {
        Ok(_) => panic!("serve started on a disk without metadata"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("exited before ready"), "{err}");
}

#[test]
fn a_served_disk_is_locked_against_a_second_server_and_create_md() {
    let dir = TestDir::new("lock");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let uuid = vol.dump_md().unwrap()["volume_uuid"].clone();
    let mut srv = Server::start_tcp(&vol).unwrap();

    let ctl = dir.join("second.sock");
    let mut args = vec!["serve".to_string()];
    args.extend(vol.disk_args().iter().map(|a| a.to_string_lossy().into_owned()));
    args.extend(["--listen", "127.0.0.1:0", "--control", ctl.to_str().unwrap()].map(String::from));
    let err = match Server::spawn(args) {
        Ok(_) => panic!("a second server started on a disk in use"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("in use by another replicator"), "{err}");

    let mut c = replicator();
    c.arg("create-md").args(vol.disk_args()).arg("--force");
    let out = run_fail(&mut c).unwrap();
    assert!(out.stderr.contains("in use by another replicator"), "{}", out.describe());
    assert_eq!(vol.dump_md().unwrap()["volume_uuid"], uuid, "create-md rewrote a served disk");

    let status = srv.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success());
    let mut c = replicator();
    c.arg("create-md").args(vol.disk_args()).arg("--force");
    run(&mut c).unwrap();
}

#[test]
fn data_survives_restart() {
    let dir = TestDir::new("restart");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let uuid = vol.dump_md().unwrap()["volume_uuid"].clone();
    let data = random_bytes(3 * MIB as usize, 31);
    {
        let mut srv = Server::start_tcp(&vol).unwrap();
        let mut c = Client::connect(srv.addr(), "volume").unwrap();
        c.write(5 * MIB + 123, &data).unwrap();
        c.flush().unwrap();
        c.disconnect().unwrap();
        let status = srv.terminate(Duration::from_secs(20)).unwrap();
        assert!(status.success(), "exit status after SIGTERM: {status}");
    }
    assert_eq!(vol.dump_md().unwrap()["volume_uuid"], uuid);
    let srv = Server::start_tcp(&vol).unwrap();
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    assert_same_bytes("after restart", &c.read(5 * MIB + 123, data.len() as u32).unwrap(), &data);
}

#[test]
fn sigterm_during_write_stream_keeps_acknowledged_writes() {
    let dir = TestDir::new("sigterm");
    let vol = Volume::create(&dir, 64 * MIB).unwrap();
    let blocks = vol.data_size().unwrap() / BLOCK;
    let mut srv = Server::start_tcp(&vol).unwrap();
    // An idle client must not keep the server from exiting.
    let _idle = Client::connect(srv.addr(), "volume").unwrap();

    let acked_count = Arc::new(AtomicU64::new(0));
    let writer = {
        let addr = srv.addr();
        let acked_count = acked_count.clone();
        thread::spawn(move || -> Vec<u64> {
            let mut c = Client::connect(addr, "volume").unwrap();
            c.stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut acked = Vec::new();
            let mut in_flight = std::collections::HashMap::new();
            let mut next = 0u64;
            // Keep up to 32 writes in flight until the server goes away or the volume is full.
            loop {
                while in_flight.len() < 32 && next < blocks {
                    match c.send(nbd::CMD_WRITE, 0, next * BLOCK, BLOCK as u32, &block_data(next)) {
                        Ok(h) => {
                            in_flight.insert(h, next);
                            next += 1;
                        }
                        Err(_) => return acked,
                    }
                }
                if in_flight.is_empty() {
                    return acked;
                }
                match c.recv(|_| 0) {
                    Ok(r) => {
                        let blk = in_flight.remove(&r.handle).expect("reply for an unknown handle");
                        // An error reply (e.g. ESHUTDOWN while draining) is not an acknowledgement.
                        if r.error == 0 {
                            acked.push(blk);
                            acked_count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => return acked,
                }
            }
        })
    };
    wait_until(Duration::from_secs(30), "500 acknowledged writes", || acked_count.load(Ordering::Relaxed) >= 500)
        .unwrap();
    let status = srv.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}\n{}", srv.logs.text());
    let acked = writer.join().unwrap();
    assert!(acked.len() >= 500);
    let log = srv.logs.text();
    assert!(!log.contains("panicked"), "server panicked:\n{log}");

    let srv = Server::start_tcp(&vol).unwrap();
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    let max = *acked.iter().max().unwrap() + 1;
    let mut image = Vec::with_capacity((max * BLOCK) as usize);
    let mut off = 0;
    while off < max * BLOCK {
        let len = (max * BLOCK - off).min(4 * MIB);
        image.extend(c.read(off, len as u32).unwrap());
        off += len;
    }
    for &b in &acked {
        let got = &image[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
        assert_same_bytes(&format!("acknowledged block {b} after SIGTERM"), got, &block_data(b));
    }
    eprintln!("{} writes acknowledged before shutdown, all present", acked.len());
}

#[test]
fn status_reports_clients_and_io() {
    let dir = TestDir::new("status");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let ctl = dir.join("ctl.sock");
    let sock = dir.join("nbd.sock");
    let srv = Server::start(
        &vol,
        &["--listen", "127.0.0.1:0", "--unix", sock.to_str().unwrap(), "--control", ctl.to_str().unwrap()],
    )
    .unwrap();
    assert_eq!(srv.control.as_deref(), Some(ctl.as_path()), "listening control line");

    let st = status_json(&ctl);
    assert_eq!(st["volume"]["size_bytes"].as_u64(), Some(vol.data_size().unwrap()), "{st}");
    assert_eq!(st["volume"]["export"], "volume", "{st}");
    assert_eq!(st["volume"]["read_only"], false, "{st}");
    let disk = st["volume"]["disk"].as_str().unwrap_or_default();
    assert!(disk.ends_with("disk.img"), "volume.disk = {disk:?}");
    assert_eq!(st["clients"].as_array().map(Vec::len), Some(0), "{st}");
    let w0 = io_counter(&st, "writes");
    let bw0 = io_counter(&st, "bytes_written");
    let r0 = io_counter(&st, "reads");
    let br0 = io_counter(&st, "bytes_read");
    let f0 = io_counter(&st, "flushes");

    let mut tcp = Client::connect(srv.addr(), "volume").unwrap();
    let mut unix = Client::connect_unix(&sock, "volume").unwrap();
    let chunk = random_bytes(64 * KIB as usize, 41);
    for i in 0..10 {
        tcp.write(i * 64 * KIB, &chunk).unwrap();
    }
    tcp.flush().unwrap();
    unix.read(0, 128 * KIB as u32).unwrap();

    // Counters may be published just after the reply; give them a moment.
    let mut st = Value::Null;
    wait_until(Duration::from_secs(10), "I/O counters to include our requests", || {
        st = status_json(&ctl);
        io_counter(&st, "writes") >= w0 + 10
            && io_counter(&st, "bytes_written") >= bw0 + 640 * KIB
            && io_counter(&st, "reads") > r0
            && io_counter(&st, "bytes_read") >= br0 + 128 * KIB
            && io_counter(&st, "flushes") > f0
    })
    .unwrap_or_else(|e| panic!("{e}: {st}"));
    let clients = st["clients"].as_array().unwrap().clone();
    assert_eq!(clients.len(), 2, "{st}");
    let tcp_client = clients.iter().find(|c| c["transport"] == "tcp").unwrap_or_else(|| panic!("no tcp client: {st}"));
    assert!(tcp_client["peer"].as_str().is_some_and(|p| p.contains("127.0.0.1")), "tcp peer: {tcp_client}");
    assert_eq!(tcp_client["tls"], false);
    assert!(clients.iter().any(|c| c["transport"] == "unix"), "no unix client: {st}");

    // Counters only grow.
    let bw1 = io_counter(&st, "bytes_written");
    tcp.write(MIB, &chunk).unwrap();
    wait_until(Duration::from_secs(10), "bytes_written to grow", || {
        io_counter(&status_json(&ctl), "bytes_written") >= bw1 + 64 * KIB
    })
    .unwrap();

    // Disconnected clients leave the list.
    tcp.disconnect().unwrap();
    drop(unix);
    wait_until(Duration::from_secs(10), "clients to disappear from status", || {
        status_json(&ctl)["clients"].as_array().is_some_and(Vec::is_empty)
    })
    .unwrap();

    // The human-readable form works too.
    let mut c = replicator();
    c.args(["status", "--control"]).arg(&ctl);
    let out = run(&mut c).unwrap();
    assert!(!out.stdout.trim().is_empty(), "{}", out.describe());
}

fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (head.to_string(), body.to_string())
}

/// Sum of all samples of a metric (with or without labels) in Prometheus text.
fn metric(body: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit_once('}').map_or(rest, |(_, v)| v).split_whitespace().next()?;
        *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
    }
    found
}

#[test]
fn metrics_endpoint() {
    let dir = TestDir::new("metrics");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let srv = Server::start(&vol, &["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]).unwrap();
    let maddr = srv.metrics.expect("no `listening metrics` line");

    let (head, body) = http_get(maddr, "/metrics");
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200"), "{head}");
    let before = metric(&body, "replicator_io_bytes_written_total")
        .unwrap_or_else(|| panic!("no replicator_io_bytes_written_total in:\n{body}"));

    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    c.write(0, &random_bytes(MIB as usize, 51)).unwrap();
    c.flush().unwrap();
    wait_until(Duration::from_secs(10), "bytes written metric to grow by 1 MiB", || {
        let (_, body) = http_get(maddr, "/metrics");
        metric(&body, "replicator_io_bytes_written_total").is_some_and(|v| v >= before + MIB as f64)
    })
    .unwrap();

    let (head, _) = http_get(maddr, "/no-such-page");
    assert!(head.contains(" 404"), "unknown path: {head}");
}

#[test]
fn config_file_and_overrides() {
    let dir = TestDir::new("config");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let sock = dir.join("cfg.sock");
    let ctl = dir.join("cfg-ctl.sock");
    let cfg = dir.join("replicator.toml");
    std::fs::write(
        &cfg,
        format!(
            "[volume]\ndisk = {:?}\nexport = \"cfgvol\"\nread_only = true\n\n\
             [nbd]\nlisten = [\"127.0.0.1:0\"]\nunix = [{:?}]\n\n\
             [control]\nsocket = {:?}\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            vol.disk.to_str().unwrap(),
            sock.to_str().unwrap(),
            ctl.to_str().unwrap()
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();

    let srv = Server::spawn(["serve", "--config", cfg_s]).unwrap();
    assert_eq!(srv.unix, vec![sock.clone()]);
    assert_eq!(srv.control.as_deref(), Some(ctl.as_path()));
    assert!(srv.metrics.is_some(), "metrics listener from the file");
    let c = Client::connect(srv.addr(), "cfgvol").unwrap();
    assert!(c.flags() & nbd::TFLAG_READ_ONLY != 0, "read_only from the file");
    let st = status_json(&ctl);
    assert_eq!(st["volume"]["export"], "cfgvol");
    assert_eq!(st["volume"]["read_only"], true);
    drop(c);
    drop(srv);

    // Command-line flags override the file.
    let ctl2 = dir.join("ctl2.sock");
    let srv = Server::spawn(["serve", "--config", cfg_s, "--export", "flagvol", "--control", ctl2.to_str().unwrap()])
        .unwrap();
    Client::connect(srv.addr(), "flagvol").unwrap();
    assert_eq!(status_json(&ctl2)["volume"]["export"], "flagvol");
    drop(srv);

    // A typo in the file is an error naming the key, not a silent default.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, format!("[volume]\ndisk = {:?}\nexprot = \"x\"\n", vol.disk.to_str().unwrap())).unwrap();
    let err = match Server::spawn(["serve", "--config", bad.to_str().unwrap()]) {
        Ok(_) => panic!("serve accepted an unknown config key"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("exprot"), "error does not name the bad key: {err}");

    // Busy polling: off from the file, and a flag out of range names the
    // setting and its bounds.
    let io = dir.join("io.toml");
    std::fs::write(&io, format!("[volume]\ndisk = {:?}\n\n[io]\nbusy_poll_us = 0\n", vol.disk.to_str().unwrap()))
        .unwrap();
    let out = run(replicator().args(["serve", "--validate", "--config", io.to_str().unwrap()])).unwrap();
    assert!(out.stdout.contains("busy_poll_us: 0,"), "busy_poll_us from the file not taken: {}", out.stdout);
    let out = run(replicator().args(["serve", "--validate", "--disk", vol.disk.to_str().unwrap()])).unwrap();
    assert!(out.stdout.contains("busy_poll_us: 50,"), "default busy poll is not 50 µs: {}", out.stdout);
    let srv = Server::spawn(["serve", "--config", io.to_str().unwrap()]).unwrap();
    Client::connect(srv.addr(), "volume").unwrap();
    drop(srv);
    let err = match Server::spawn(["serve", "--disk", vol.disk.to_str().unwrap(), "--busy-poll-us", "20000"]) {
        Ok(_) => panic!("serve accepted a 20 ms busy poll"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("busy_poll_us") && err.contains("10000"), "unclear busy-poll error: {err}");
}
