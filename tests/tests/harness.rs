//! Self-tests of the harness against nbdkit, a known-good server: if these
//! fail, a failure elsewhere is more likely the harness than the replicator.

use std::time::Duration;

use tests::nbd::{self, Client, Handshake};
use tests::{cmd, nbdkit, random_bytes, require_tools, run, run_fail, tls, TestDir, MIB};

#[test]
fn raw_client_talks_to_nbdkit() {
    require_tools!("nbdkit");
    let (_kit, addr) = nbdkit(&[
        "--filter=blocksize-policy",
        "memory",
        "64M",
        "blocksize-minimum=1",
        "blocksize-preferred=4096",
        "blocksize-maximum=33554432",
    ])
    .unwrap();

    let mut hs = Handshake::tcp(addr).unwrap();
    assert!(hs.handshake_flags & nbd::FLAG_FIXED_NEWSTYLE != 0);
    // An unknown option must be refused without ending the session.
    let r = hs.option(0x4242, b"junk").unwrap();
    assert_eq!(r.reply_type, nbd::REP_ERR_UNSUP);
    let names = hs.list().unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    let mut c = hs.go("volume").unwrap();
    assert_eq!(c.size(), 64 * MIB);
    assert_eq!(c.info.block_size, Some((1, 4096, 32 << 20)));
    assert!(c.flags() & nbd::TFLAG_SEND_FLUSH != 0);
    assert!(c.flags() & nbd::TFLAG_READ_ONLY == 0);

    let data = random_bytes(128 * 1024, 7);
    c.write(4096, &data).unwrap();
    c.flush().unwrap();
    assert_eq!(c.read(4096, data.len() as u32).unwrap(), data);
    c.write_zeroes(4096, 4096, 0).unwrap();
    assert_eq!(c.read(4096, 4096).unwrap(), vec![0; 4096]);

    // Pipelined requests: replies may come back in any order.
    let mut handles = std::collections::HashMap::new();
    for i in 0..32u64 {
        let h = c.send(nbd::CMD_READ, 0, i * 4096, 4096, &[]).unwrap();
        handles.insert(h, i);
    }
    for _ in 0..32 {
        let r = c.recv(|_| 4096).unwrap();
        assert_eq!(r.error, 0);
        assert!(handles.remove(&r.handle).is_some());
    }

    // Past the end: nbdkit answers with an error, and the session survives.
    let r = c.request(nbd::CMD_READ, 0, 64 * MIB, 4096, &[]).unwrap();
    assert!(r.error == nbd::EINVAL || r.error == nbd::ENOSPC, "{r:?}");
    assert_eq!(c.read(0, 512).unwrap().len(), 512);
    c.disconnect().unwrap();

    let mut s = nbd::Stream::tcp(addr).unwrap();
    use std::io::Write;
    s.write_all(&random_bytes(64, 1)).unwrap();
    assert!(s.wait_closed(Duration::from_secs(10)).unwrap());
    Client::connect(addr, "volume").unwrap();
}

#[test]
fn generated_pki_works_with_gnutls() {
    require_tools!("nbdkit", "nbdinfo");
    let dir = TestDir::new("pki");
    let pki = tls::make_pki(&dir.join("pki")).unwrap();
    let tls_arg = format!("--tls-certificates={}", pki.dir.display());
    let (_kit, addr) = nbdkit(&["--tls=require", &tls_arg, "memory", "1M"]).unwrap();
    let ca_dir = tls::ca_only_dir(&pki, &dir.join("client")).unwrap();
    // Verifies the server certificate against our CA, including the 127.0.0.1 SAN.
    run(&mut cmd("nbdinfo", [format!("nbds://{addr}/?tls-certificates={}", ca_dir.display())])).unwrap();
    run_fail(&mut cmd("nbdinfo", [format!("nbd://{addr}/")])).unwrap();
}
