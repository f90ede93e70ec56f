//! fio's nbd engine (libnbd, deep queues) writing checksummed blocks and
//! verifying them: catches reordering, lost and misdirected writes.

use std::path::Path;

use serde_json::Value;
use tests::{cmd, require_tools, run, Server, TestDir, Volume, MIB};

fn fio_verify(dir: &TestDir, uri: &str, name: &str, args: &[&str]) -> Value {
    let out_file = dir.join(format!("{name}.json"));
    let mut c = cmd(
        "fio",
        [
            format!("--name={name}"),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--verify=crc32c".into(),
            "--do_verify=1".into(),
            "--verify_fatal=1".into(),
            "--verify_dump=0".into(),
            "--output-format=json".into(),
            format!("--output={}", out_file.display()),
        ],
    );
    c.args(args);
    // fio exits non-zero on I/O errors and verification failures.
    run(&mut c).unwrap();
    parse(&out_file)
}

fn parse(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap();
    // fio may print notices before the JSON object even with --output.
    let start = text.find('{').unwrap_or_else(|| panic!("no JSON in {}: {text}", p.display()));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("bad fio JSON ({e}): {text}"))
}

fn check_job(v: &Value, min_written: u64) {
    let job = &v["jobs"][0];
    assert_eq!(job["error"].as_u64(), Some(0), "fio job error: {job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let verified = job["read"]["io_bytes"].as_u64().unwrap();
    assert!(written >= min_written, "wrote only {written} bytes");
    // The verify phase reads back everything that was written.
    assert!(verified >= written, "verified {verified} of {written} bytes");
}

#[test]
fn fio_randwrite_4k_verify() {
    require_tools!("fio");
    let dir = TestDir::new("fio-rand");
    let vol = Volume::create(&dir, 48 * MIB).unwrap();
    let mut srv = Server::start_tcp(&vol).unwrap();
    let v = fio_verify(&dir, &srv.uri(), "randwrite4k", &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=16M"]);
    check_job(&v, 16 * MIB);
    srv.assert_running();
}

#[test]
fn fio_seqwrite_1m_verify() {
    require_tools!("fio");
    let dir = TestDir::new("fio-seq");
    let vol = Volume::create(&dir, 48 * MIB).unwrap();
    let mut srv = Server::start_tcp(&vol).unwrap();
    let v = fio_verify(&dir, &srv.uri(), "seqwrite1m", &["--rw=write", "--bs=1M", "--iodepth=8", "--size=32M"]);
    check_job(&v, 32 * MIB);
    srv.assert_running();
}

#[test]
fn fio_mixed_unix_socket_verify() {
    require_tools!("fio");
    let dir = TestDir::new("fio-unix");
    let vol = Volume::create(&dir, 48 * MIB).unwrap();
    let sock = dir.join("nbd.sock");
    let srv = Server::start(&vol, &["--unix", sock.to_str().unwrap()]).unwrap();
    // Odd block sizes straddle the preferred 4 KiB block.
    let v = fio_verify(
        &dir,
        &srv.unix_uri(),
        "randrw-unix",
        &["--rw=randwrite", "--bsrange=512-64k", "--bs_unaligned=1", "--iodepth=16", "--size=8M"],
    );
    // Variable block sizes leave a few bytes of the range unwritten.
    check_job(&v, 7 * MIB);
}
