//! QEMU's NBD client (qemu-img, qemu-io): a second, independent client
//! implementation with its own negotiation and request patterns.

use serde_json::Value;
use tests::{assert_same_bytes, cmd, random_bytes, require_tools, run, Output, Server, TestDir, Volume, MIB};

/// Runs qemu-io commands against the export and fails on any reported error
/// (older qemu-io versions exit 0 even when a command failed).
fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = cmd("qemu-io", ["-f", "raw", uri]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = run(&mut c).unwrap();
    let all = format!("{}{}", out.stdout, out.stderr).to_lowercase();
    assert!(!all.contains("fail") && !all.contains("error"), "qemu-io reported a problem\n{}", out.describe());
    out
}

#[test]
fn qemu_img_info_convert_compare() {
    require_tools!("qemu-img");
    let dir = TestDir::new("qemu-img");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let size = vol.data_size().unwrap();
    let mut srv = Server::start_tcp(&vol).unwrap();
    let uri = srv.uri();

    let out = run(&mut cmd("qemu-img", ["info", "--output=json", &uri])).unwrap();
    let info: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(size), "{}", out.describe());
    assert_eq!(info["format"], "raw");

    // Sparse-ish source: data, a hole, data, so convert exercises zero detection.
    let mut src = random_bytes(6 * MIB as usize, 11);
    src[2 * MIB as usize..3 * MIB as usize].fill(0);
    let src_path = dir.join("src.raw");
    std::fs::write(&src_path, &src).unwrap();
    run(&mut cmd("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", src_path.to_str().unwrap(), &uri])).unwrap();
    // compare also checks that the rest of the larger export reads as zeros.
    run(&mut cmd("qemu-img", ["compare", "-f", "raw", "-F", "raw", src_path.to_str().unwrap(), &uri])).unwrap();

    // qemu-img map reads base:allocation: the never-written tail is a hole
    // that reads as zeros, the random data is data.
    let out = run(&mut cmd("qemu-img", ["map", "--output=json", "-f", "raw", &uri])).unwrap();
    let map: Value = serde_json::from_str(&out.stdout).unwrap();
    let extent_at = |pos: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                s <= pos && pos < s + l
            })
            .unwrap_or_else(|| panic!("no extent at {pos}\n{}", out.describe()))
            .clone()
    };
    assert_eq!(extent_at(0)["data"], true, "{map}");
    let tail = extent_at(size - 1);
    assert_eq!((tail["data"].clone(), tail["zero"].clone()), (Value::Bool(false), Value::Bool(true)), "{map}");

    let back = dir.join("back.qcow2");
    run(&mut cmd("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", &uri, back.to_str().unwrap()])).unwrap();
    let raw_back = dir.join("back.raw");
    run(&mut cmd(
        "qemu-img",
        ["convert", "-f", "qcow2", "-O", "raw", back.to_str().unwrap(), raw_back.to_str().unwrap()],
    ))
    .unwrap();
    let got = std::fs::read(&raw_back).unwrap();
    assert_eq!(got.len() as u64, size);
    assert_same_bytes("qemu-img round trip", &got[..src.len()], &src);
    srv.assert_running();
}

#[test]
fn qemu_io_patterns_zeroes_and_discard() {
    require_tools!("qemu-io");
    let dir = TestDir::new("qemu-io");
    let vol = Volume::create(&dir, 32 * MIB).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let uri = srv.uri();

    qemu_io(&uri, &["write -P 0xab 0 1M", "read -P 0xab 0 1M"]);
    // Unaligned and FUA writes.
    qemu_io(
        &uri,
        &[
            "write -P 0x11 4097 3000",
            "write -f -P 0x22 1M 64k",
            "read -P 0xab 0 4097",
            "read -P 0x11 4097 3000",
            "read -P 0xab 7097 1041479",
            "read -P 0x22 1M 64k",
        ],
    );
    // Data written in one session is there in the next.
    qemu_io(&uri, &["read -P 0xab 0 4097"]);

    // WRITE_ZEROES, with and without permission to unmap, and a fast-zero-capable request.
    qemu_io(
        &uri,
        &["write -P 0xcd 2M 3M", "write -z 2M 1M", "write -z -u 3M 1M", "read -P 0 2M 2M", "read -P 0xcd 4M 1M"],
    );
    // TRIM: the server punches holes in the backing file, so discarded ranges
    // read back as zeros (NBD itself does not promise that).
    qemu_io(&uri, &["write -P 0xef 8M 2M", "discard 8M 1M", "read -P 0 8M 1M", "read -P 0xef 9M 1M"]);
    // A FLUSH through qemu-io.
    qemu_io(&uri, &["write -P 0x42 12M 4k", "flush", "read -P 0x42 12M 4k"]);
}

#[test]
fn qemu_io_detects_corruption() {
    // Guards the qemu_io() helper itself: a wrong pattern must be noticed,
    // or the tests above would pass vacuously.
    require_tools!("qemu-io");
    let dir = TestDir::new("qemu-neg");
    let vol = Volume::create(&dir, 8 * MIB).unwrap();
    let srv = Server::start_tcp(&vol).unwrap();
    let out = tests::run_output(
        &mut cmd("qemu-io", ["-f", "raw", &srv.uri(), "-c", "write -P 0x01 0 4k", "-c", "read -P 0x02 0 4k"]),
        tests::util::CMD_TIMEOUT,
    )
    .unwrap();
    let all = format!("{}{}", out.stdout, out.stderr).to_lowercase();
    assert!(all.contains("fail"), "pattern mismatch went unnoticed\n{}", out.describe());
}
