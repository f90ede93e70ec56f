//! NBD over TLS (STARTTLS) with libnbd/GnuTLS clients and a throwaway CA.

use serde_json::Value;
use tests::nbd::{self, Handshake};
use tests::tls::{ca_only_dir, make_pki, Pki};
use tests::{assert_same_bytes, cmd, random_bytes, require_tools, run, run_fail, Server, TestDir, Volume, MIB};

fn start(dir: &TestDir, mode: &str, extra: &[&str]) -> (Pki, Server) {
    let pki = make_pki(&dir.join("pki")).unwrap();
    let vol = Volume::create(dir, 16 * MIB).unwrap();
    let cert = pki.server_cert.to_str().unwrap().to_string();
    let key = pki.server_key.to_str().unwrap().to_string();
    let mut args = vec!["--listen", "127.0.0.1:0", "--tls", mode];
    if mode != "off" {
        args.extend_from_slice(&["--tls-cert", &cert, "--tls-key", &key]);
    }
    args.extend_from_slice(extra);
    let srv = Server::start(&vol, &args).unwrap();
    (pki, srv)
}

fn tls_uri(srv: &Server, certs: &std::path::Path) -> String {
    format!("nbds://{}/volume?tls-certificates={}", srv.addr(), certs.display())
}

fn nbdinfo_tls_flag(uri: &str) -> bool {
    let out = run(&mut cmd("nbdinfo", ["--json", uri])).unwrap();
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    v["TLS"].as_bool().unwrap_or_else(|| panic!("no TLS field\n{}", out.describe()))
}

#[test]
fn tls_required_refuses_plaintext() {
    require_tools!("nbdinfo", "nbdcopy");
    let dir = TestDir::new("tls-req");
    let (pki, srv) = start(&dir, "required", &[]);
    let ca = ca_only_dir(&pki, &dir.join("client-ca")).unwrap();

    // A plaintext client gets nowhere.
    run_fail(&mut cmd("nbdinfo", [srv.uri()])).unwrap();
    let mut hs = Handshake::tcp(srv.addr()).unwrap();
    let r = hs.go_raw(nbd::OPT_GO, "volume").unwrap();
    assert_eq!(r.err(), Some(nbd::REP_ERR_TLS_REQD), "OPT_GO without TLS");
    let r = hs.option(nbd::OPT_LIST, &[]).unwrap();
    assert_eq!(r.reply_type, nbd::REP_ERR_TLS_REQD, "OPT_LIST without TLS");

    // A TLS client that verifies the certificate against our CA works.
    assert!(nbdinfo_tls_flag(&tls_uri(&srv, &ca)));
    // Data integrity through TLS records (nbdcopy uses several connections).
    let data = random_bytes(4 * MIB as usize, 21);
    let src = dir.join("src.bin");
    let dst = dir.join("dst.bin");
    std::fs::write(&src, &data).unwrap();
    let uri = tls_uri(&srv, &ca);
    run(&mut cmd("nbdcopy", [src.as_os_str(), uri.as_ref()])).unwrap();
    run(&mut cmd("nbdcopy", [uri.as_ref(), dst.as_os_str()])).unwrap();
    assert_same_bytes("nbdcopy over TLS", &std::fs::read(&dst).unwrap()[..data.len()], &data);

    // A client trusting a different CA refuses the server.
    let other = make_pki(&dir.join("other")).unwrap();
    let other_ca = ca_only_dir(&other, &dir.join("other-ca")).unwrap();
    run_fail(&mut cmd("nbdinfo", [tls_uri(&srv, &other_ca)])).unwrap();
}

#[test]
fn tls_optional_accepts_both() {
    require_tools!("nbdinfo");
    let dir = TestDir::new("tls-opt");
    let (pki, srv) = start(&dir, "optional", &[]);
    let ca = ca_only_dir(&pki, &dir.join("client-ca")).unwrap();
    assert!(!nbdinfo_tls_flag(&srv.uri()), "plaintext client");
    assert!(nbdinfo_tls_flag(&tls_uri(&srv, &ca)), "TLS client");
}

#[test]
fn tls_off_refuses_starttls() {
    require_tools!("nbdinfo");
    let dir = TestDir::new("tls-off");
    let (pki, srv) = start(&dir, "off", &[]);
    let ca = ca_only_dir(&pki, &dir.join("client-ca")).unwrap();
    assert!(!nbdinfo_tls_flag(&srv.uri()));
    // libnbd's nbds:// means "require TLS", so it must fail against --tls off.
    run_fail(&mut cmd("nbdinfo", [tls_uri(&srv, &ca)])).unwrap();
}

#[test]
fn tls_client_certificates() {
    require_tools!("nbdinfo");
    let dir = TestDir::new("tls-mutual");
    let pki = make_pki(&dir.join("pki")).unwrap();
    let vol = Volume::create(&dir, 16 * MIB).unwrap();
    let srv = Server::start(
        &vol,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls",
            "required",
            "--tls-cert",
            pki.server_cert.to_str().unwrap(),
            "--tls-key",
            pki.server_key.to_str().unwrap(),
            "--tls-client-ca",
            pki.ca_cert.to_str().unwrap(),
        ],
    )
    .unwrap();
    // The PKI directory has client-cert.pem/client-key.pem, which libnbd presents.
    assert!(nbdinfo_tls_flag(&tls_uri(&srv, &pki.dir)), "client with a certificate");
    // Without a client certificate the server refuses.
    let ca = ca_only_dir(&pki, &dir.join("client-ca")).unwrap();
    run_fail(&mut cmd("nbdinfo", [tls_uri(&srv, &ca)])).unwrap();
}

#[test]
fn qemu_tls_client_and_status() {
    require_tools!("qemu-io");
    let dir = TestDir::new("tls-qemu");
    let (pki, srv) = start(&dir, "required", &[]);
    let ctl = srv.control.clone().expect("control socket");
    let ca = ca_only_dir(&pki, &dir.join("client-ca")).unwrap();
    // QEMU's TLS stack, a second client implementation; it stays connected
    // during its `sleep` so the status can be inspected meanwhile.
    let image_opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=volume,tls-creds=tls0",
        srv.addr().port()
    );
    // stdbuf: qemu-io block-buffers its output into a pipe.
    let qemu = tests::Daemon::spawn(cmd(
        "stdbuf",
        [
            "-oL",
            "qemu-io",
            "--object",
            &format!("tls-creds-x509,id=tls0,dir={},endpoint=client", ca.display()),
            "--image-opts",
            &image_opts,
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "sleep 60000",
        ],
    ))
    .unwrap();
    qemu.logs.wait_for("read 65536/65536", std::time::Duration::from_secs(30)).unwrap();
    let mut st = Value::Null;
    tests::wait_until(std::time::Duration::from_secs(10), "a TLS client in status", || {
        let mut c = tests::replicator();
        c.args(["status", "--json", "--control"]).arg(&ctl);
        st = serde_json::from_str(&run(&mut c).unwrap().stdout).unwrap();
        st["clients"].as_array().is_some_and(|cl| cl.iter().any(|c| c["tls"] == true && c["transport"] == "tcp"))
    })
    .unwrap_or_else(|e| panic!("{e}: {st}"));
    let all = qemu.logs.text().to_lowercase();
    assert!(!all.contains("fail") && !all.contains("error"), "qemu-io over TLS:\n{all}");
}
