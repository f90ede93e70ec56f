//! What a standard client (libnbd's nbdinfo) sees: size, flags, block sizes,
//! export listing and the base:allocation map.

use serde_json::Value;
use tests::nbd::{self, Client, Handshake};
use tests::{cmd, random_bytes, require_tools, run, run_fail, Server, TestDir, Volume, MIB};

const MAX_BLOCK: u64 = 32 * MIB;

fn info_json(uri: &str) -> Value {
    let out = run(&mut cmd("nbdinfo", ["--json", uri])).unwrap();
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json output is not JSON ({e})\n{}", out.describe()));
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{v}");
    exports[0].clone()
}

fn flag(e: &Value, name: &str) -> bool {
    e[name].as_bool().unwrap_or_else(|| panic!("nbdinfo JSON has no boolean {name}: {e}"))
}

#[test]
fn size_flags_and_block_sizes() {
    require_tools!("nbdinfo");
    let dir = TestDir::new("info");
    let vol = Volume::create(&dir, 64 * MIB).unwrap();
    let data_size = vol.data_size().unwrap();
    assert!(
        (60 * MIB..=64 * MIB).contains(&data_size),
        "internal metadata should take a little space at the end: data_size_bytes={data_size}"
    );
    let srv = Server::start_tcp(&vol).unwrap();
    let e = info_json(&srv.uri());
    assert_eq!(e["export-name"], "volume");
    assert_eq!(e["export-size"].as_u64(), Some(data_size), "{e}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{e}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{e}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(MAX_BLOCK), "{e}");
    for f in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert!(flag(&e, f), "{f} should be true: {e}");
    }
    assert!(!flag(&e, "is_read_only"), "{e}");
    assert!(
        e["contexts"].as_array().is_some_and(|c| c.iter().any(|x| x == "base:allocation")),
        "base:allocation context missing: {e}"
    );

    // The empty export name is the default export.
    let e2 = info_json(&srv.uri_for(""));
    assert_eq!(e2["export-size"].as_u64(), Some(data_size), "{e2}");
    // An unknown export is refused.
    run_fail(&mut cmd("nbdinfo", [srv.uri_for("no-such-export")])).unwrap();
}

#[test]
fn read_only_export() {
    require_tools!("nbdinfo");
    let dir = TestDir::new("info-ro");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let srv = Server::start(&vol, &["--listen", "127.0.0.1:0", "--read-only"]).unwrap();
    let e = info_json(&srv.uri());
    assert!(flag(&e, "is_read_only"), "{e}");

    // Writes are refused with EPERM, reads still work, and so does the session.
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    assert!(c.flags() & nbd::TFLAG_READ_ONLY != 0);
    let r = c.request(nbd::CMD_WRITE, 0, 0, 4096, &[0x55; 4096]).unwrap();
    assert_eq!(r.error, nbd::EPERM, "WRITE on a read-only export");
    let r = c.request(nbd::CMD_WRITE_ZEROES, 0, 0, 4096, &[]).unwrap();
    assert_eq!(r.error, nbd::EPERM, "WRITE_ZEROES on a read-only export");
    let r = c.request(nbd::CMD_TRIM, 0, 0, 4096, &[]).unwrap();
    assert_eq!(r.error, nbd::EPERM, "TRIM on a read-only export");
    assert_eq!(c.read(0, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn external_metadata_exports_whole_disk() {
    require_tools!("nbdinfo");
    let dir = TestDir::new("info-ext");
    let meta = dir.join("meta.img");
    let vol = Volume::create_with(&dir, 32 * MIB, Some(&meta), &[]).unwrap();
    assert_eq!(vol.data_size().unwrap(), 32 * MIB, "{}", vol.dump_md().unwrap());
    let srv = Server::start_tcp(&vol).unwrap();
    assert_eq!(info_json(&srv.uri())["export-size"].as_u64(), Some(32 * MIB));
}

#[test]
fn direct_io_advertises_512_minimum() {
    require_tools!("nbdinfo");
    let dir = TestDir::new("info-dio");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let srv = Server::start(&vol, &["--listen", "127.0.0.1:0", "--direct-io"]).unwrap();
    // Aligned I/O works through O_DIRECT.
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    let data = random_bytes(64 * 1024, 3);
    c.write(512 * 7, &data).unwrap();
    assert_eq!(c.read(512 * 7, data.len() as u32).unwrap(), data);
    // Whatever minimum is advertised must really work: if it is below 512,
    // unaligned requests must succeed (with read-modify-write underneath).
    let min = c.info.block_size.expect("NBD_INFO_BLOCK_SIZE").0;
    if min < 512 {
        let odd = random_bytes(3000, 4);
        c.write(4097, &odd).unwrap();
        assert_eq!(c.read(4097, 3000).unwrap(), odd);
        assert_eq!(c.read(512 * 7, 4097 - 512 * 7).unwrap(), &data[..4097 - 512 * 7]);
    }
    let e = info_json(&srv.uri());
    assert_eq!(e["block_size_maximum"].as_u64(), Some(MAX_BLOCK), "{e}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(512), "--direct-io should advertise a 512-byte minimum: {e}");
}

#[test]
fn list_exports() {
    require_tools!("nbdinfo");
    let dir = TestDir::new("info-list");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let srv = Server::start(&vol, &["--listen", "127.0.0.1:0", "--export", "disk0"]).unwrap();
    let out = run(&mut cmd("nbdinfo", ["--list", "--json", &srv.uri_for("")])).unwrap();
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let names: Vec<&str> = v["exports"].as_array().unwrap().iter().filter_map(|e| e["export-name"].as_str()).collect();
    assert!(names.contains(&"disk0"), "{}", out.describe());
    // The raw protocol agrees, and the configured name is the one served.
    let mut hs = Handshake::tcp(srv.addr()).unwrap();
    assert_eq!(hs.list().unwrap(), vec!["disk0".to_string()]);
    hs.go("disk0").unwrap();
}

#[test]
fn allocation_map_shows_holes() {
    require_tools!("nbdinfo");
    let dir = TestDir::new("info-map");
    let vol = Volume::create(&dir, 64 * MIB).unwrap();
    let size = vol.data_size().unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let mut c = Client::connect(srv.addr(), "volume").unwrap();
    c.write(8 * MIB, &random_bytes(MIB as usize, 9)).unwrap();
    c.flush().unwrap();

    let out = run(&mut cmd("nbdinfo", ["--map", "--json", &srv.uri()])).unwrap();
    let map: Value = serde_json::from_str(&out.stdout).unwrap();
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap_or_else(|| panic!("map is not an array\n{}", out.describe()))
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect();
    // The extents tile the whole export.
    let mut next = 0;
    for &(off, len, _) in &extents {
        assert_eq!(off, next, "gap or overlap in map: {extents:?}");
        next = off + len;
    }
    assert_eq!(next, size, "map does not cover the export: {extents:?}");
    let type_at = |pos: u64| extents.iter().find(|&&(o, l, _)| o <= pos && pos < o + l).map(|e| e.2).unwrap();
    // Type bit 0 = hole. Never-written areas are holes; the written MiB is data.
    assert_eq!(type_at(0) & 1, 1, "start of a sparse volume should be a hole: {extents:?}");
    assert_eq!(type_at(32 * MIB) & 1, 1, "middle should be a hole: {extents:?}");
    assert_eq!(type_at(8 * MIB) & 1, 0, "written data reported as hole: {extents:?}");
    assert_eq!(type_at(9 * MIB - 1) & 1, 0, "written data reported as hole: {extents:?}");
}

#[test]
fn several_listeners() {
    require_tools!("nbdinfo");
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        // An environment limitation, not a missing tool: never fatal.
        eprintln!("SKIP: no IPv6 loopback");
        return;
    }
    let dir = TestDir::new("info-listen");
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let srv = Server::start(&vol, &["--listen", "127.0.0.1:0", "--listen", "[::1]:0"]).unwrap();
    assert_eq!(srv.tcp.len(), 2, "one listening line per --listen: {:?}", srv.tcp);
    assert!(srv.tcp[1].is_ipv6(), "{:?}", srv.tcp);
    for addr in &srv.tcp {
        let e = info_json(&format!("nbd://{addr}/volume"));
        assert_eq!(e["export-size"].as_u64(), Some(vol.data_size().unwrap()));
    }
}
