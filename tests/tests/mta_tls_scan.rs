//! testssl.sh against the MX listener (STARTTLS, `-t smtp`) and the
//! implicit-TLS submission listener, in parallel: only TLS 1.2 and 1.3,
//! only AEAD suites with forward secrecy, no known TLS vulnerability, no
//! finding of severity HIGH or CRITICAL.
//!
//! The certificate checks (`-S`) are left out: they judge the throwaway
//! test certificate (self-signed CA, two-day lifetime, no OCSP), not the
//! server. Scan time is about 45 s on this machine.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::mta::MailTree;
use tests::{require_tools, run_output, TestDir};

/// Runs testssl with `args` against `addr`; returns its JSON findings.
fn testssl(addr: SocketAddr, json: &Path, args: &[&str]) -> Vec<Value> {
    let mut c = tests::cmd("testssl", ["--quiet", "--color", "0", "--warnings", "batch", "--jsonfile"]);
    c.arg(json).args(args).arg(addr.to_string());
    let out = run_output(&mut c, Duration::from_secs(240)).unwrap();
    let text =
        std::fs::read_to_string(json).unwrap_or_else(|e| panic!("no JSON from testssl ({e}): {}", out.describe()));
    match serde_json::from_str(&text) {
        Ok(Value::Array(findings)) => findings,
        other => panic!("testssl JSON is not a list: {other:?}"),
    }
}

fn finding<'a>(findings: &'a [Value], id: &str) -> &'a str {
    findings
        .iter()
        .find(|f| f["id"] == id)
        .and_then(|f| f["finding"].as_str())
        .unwrap_or_else(|| panic!("testssl reported no {id:?}"))
}

fn check(what: &str, findings: &[Value], vulnerabilities_scanned: bool) {
    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert_eq!(finding(findings, id), "not offered", "{what}: {id}");
    }
    for id in ["TLS1_2", "TLS1_3"] {
        assert!(finding(findings, id).starts_with("offered"), "{what}: {id}: {}", finding(findings, id));
    }
    // NULL, anonymous, export, low, 3DES/IDEA and the obsoleted CBC suites.
    for id in [
        "cipherlist_NULL",
        "cipherlist_aNULL",
        "cipherlist_EXPORT",
        "cipherlist_LOW",
        "cipherlist_3DES_IDEA",
        "cipherlist_AVERAGE",
    ] {
        assert_eq!(finding(findings, id), "not offered", "{what}: {id}");
    }
    assert_eq!(finding(findings, "PFS"), "offered", "{what}: forward secrecy");
    // Every offered suite (-E) is an AEAD with ECDHE (TLS 1.3 suites always are).
    let suites: Vec<&str> = findings
        .iter()
        .filter(|f| f["id"].as_str().is_some_and(|id| id.starts_with("cipher-tls")))
        .filter_map(|f| f["finding"].as_str())
        .collect();
    assert!(suites.iter().any(|s| s.starts_with("TLS 1.2")) && suites.iter().any(|s| s.starts_with("TLS 1.3")));
    for s in &suites {
        let aead = s.contains("GCM") || s.contains("CHACHA20");
        let weak = ["CBC", "RC4", "DES", "NULL", "EXP", "MD5"].iter().any(|w| s.contains(w));
        let kx = s.starts_with("TLS 1.3") || s.contains("ECDHE-");
        assert!(aead && !weak && kx, "{what}: weak suite offered: {s}");
    }
    if vulnerabilities_scanned {
        for id in ["heartbleed", "CCS", "ROBOT", "SWEET32", "FREAK", "LOGJAM", "BEAST", "LUCKY13", "RC4", "POODLE_SSL"]
        {
            assert!(finding(findings, id).starts_with("not vulnerable"), "{what}: {id}: {}", finding(findings, id));
        }
        assert_eq!(finding(findings, "secure_renego"), "supported", "{what}");
    }
    let bad: Vec<&Value> =
        findings.iter().filter(|f| matches!(f["severity"].as_str(), Some("HIGH" | "CRITICAL"))).collect();
    assert!(bad.is_empty(), "{what}: HIGH/CRITICAL findings: {bad:#?}");
}

#[test]
fn testssl_finds_only_strong_tls_on_starttls_and_implicit_tls() {
    require_tools!("testssl");
    let tree = MailTree::new("mta-tls-scan", "", None).unwrap();
    let mut mta = tree.serve().unwrap();
    let out = TestDir::new("mta-tls-scan-out");
    let (json25, json465) = (out.join("mx.json"), out.join("submissions.json"));
    let (mx, submissions) = (mta.mx(), mta.submissions());
    // The STARTTLS listener gets the vulnerability checks (-U) too; 465
    // shares its TLS configuration, so protocols and suites suffice there.
    let implicit = std::thread::spawn(move || testssl(submissions, &json465, &["-p", "-s", "-f", "-E"]));
    let starttls = testssl(mx, &json25, &["-p", "-s", "-f", "-E", "-U", "-t", "smtp"]);
    let implicit = implicit.join().unwrap();
    assert_eq!(finding(&starttls, "service"), "smtp", "testssl spoke STARTTLS");
    check("port 25 STARTTLS", &starttls, true);
    check("port 465 implicit TLS", &implicit, false);
    assert!(mta.daemon.is_running(), "the MTA survived the scan");
}
