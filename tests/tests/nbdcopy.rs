//! Bulk data through libnbd's nbdcopy (multi-connection, large requests) over
//! TCP and the Unix socket.

use tests::{assert_same_bytes, cmd, random_bytes, require_tools, run, Server, TestDir, Volume, MIB};

/// Writes 8 MiB of random data with nbdcopy, reads the whole export back with
/// nbdcopy and checks the data, and that the rest of the fresh volume is zero.
fn roundtrip(dir: &TestDir, uri: &str, seed: u64) {
    let data = random_bytes(8 * MIB as usize, seed);
    let src = dir.join(format!("src-{seed}.bin"));
    let dst = dir.join(format!("dst-{seed}.bin"));
    std::fs::write(&src, &data).unwrap();
    // --flush: nbdcopy ends with NBD_CMD_FLUSH, which must succeed.
    run(&mut cmd("nbdcopy", ["--flush".as_ref(), src.as_os_str(), uri.as_ref()])).unwrap();
    run(&mut cmd("nbdcopy", [uri.as_ref(), dst.as_os_str()])).unwrap();
    let back = std::fs::read(&dst).unwrap();
    let size = back.len();
    assert!(size >= data.len(), "export only {size} bytes");
    assert_same_bytes("nbdcopy read-back", &back[..data.len()], &data);
    assert!(back[data.len()..].iter().all(|&b| b == 0), "bytes past the written range are not zero");
}

#[test]
fn copy_over_tcp() {
    require_tools!("nbdcopy");
    let dir = TestDir::new("copy-tcp");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let mut srv = Server::start_tcp(&vol).unwrap();
    roundtrip(&dir, &srv.uri(), 1);
    srv.assert_running();
    // The exported size is what nbdcopy got.
    let dst = std::fs::metadata(dir.join("dst-1.bin")).unwrap().len();
    assert_eq!(dst, vol.data_size().unwrap());
}

#[test]
fn copy_over_unix_socket() {
    require_tools!("nbdcopy");
    let dir = TestDir::new("copy-unix");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let sock = dir.join("nbd.sock");
    let srv = Server::start(&vol, &["--unix", sock.to_str().unwrap()]).unwrap();
    assert_eq!(srv.unix, vec![sock.clone()], "listening line for the Unix socket");
    roundtrip(&dir, &srv.unix_uri(), 2);
}

#[test]
fn tcp_and_unix_share_one_volume() {
    require_tools!("nbdcopy");
    let dir = TestDir::new("copy-both");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let sock = dir.join("nbd.sock");
    let srv = Server::start(&vol, &["--listen", "127.0.0.1:0", "--unix", sock.to_str().unwrap()]).unwrap();
    let data = random_bytes(4 * MIB as usize, 3);
    let src = dir.join("src.bin");
    std::fs::write(&src, &data).unwrap();
    run(&mut cmd("nbdcopy", [src.as_os_str(), srv.uri().as_ref()])).unwrap();
    let dst = dir.join("dst.bin");
    run(&mut cmd("nbdcopy", [srv.unix_uri().as_ref(), dst.as_os_str()])).unwrap();
    assert_same_bytes("written over TCP, read over Unix", &std::fs::read(&dst).unwrap()[..data.len()], &data);
}
