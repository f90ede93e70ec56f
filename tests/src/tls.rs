//! Throwaway PKI for TLS tests, laid out the way libnbd/nbdkit (GnuTLS) expect
//! a `tls-certificates` directory: `ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, and for clients `client-cert.pem`, `client-key.pem`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Creates a CA, a server certificate for localhost/127.0.0.1/::1 and a client
/// certificate, all signed by the CA, in `dir`.
pub fn make_pki(dir: &Path) -> Result<Pki> {
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "replicator test CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;

    let mut sp = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])?;
    sp.distinguished_name.push(DnType::CommonName, "localhost");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sp.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let server_key = KeyPair::generate()?;
    let server = sp.signed_by(&server_key, &ca, &ca_key)?;

    let mut cp = CertificateParams::new(Vec::<String>::new())?;
    cp.distinguished_name.push(DnType::CommonName, "test-client");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    cp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let client_key = KeyPair::generate()?;
    let client = cp.signed_by(&client_key, &ca, &ca_key)?;

    let pki = Pki {
        dir: dir.to_path_buf(),
        ca_cert: dir.join("ca-cert.pem"),
        server_cert: dir.join("server-cert.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client-cert.pem"),
        client_key: dir.join("client-key.pem"),
    };
    std::fs::write(&pki.ca_cert, ca.pem())?;
    std::fs::write(&pki.server_cert, server.pem())?;
    std::fs::write(&pki.server_key, server_key.serialize_pem())?;
    std::fs::write(&pki.client_cert, client.pem())?;
    std::fs::write(&pki.client_key, client_key.serialize_pem())?;
    Ok(pki)
}

/// A directory holding only the CA certificate: what a client without a
/// certificate of its own uses as `tls-certificates`.
pub fn ca_only_dir(pki: &Pki, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::copy(&pki.ca_cert, dir.join("ca-cert.pem"))?;
    Ok(dir.to_path_buf())
}

/// Certificates for replication nodes: each valid for its node name, as
/// both TLS server and client, signed by one CA (`ca.pem`). Files:
/// `NAME.pem`, `NAME.key`.
pub fn make_node_pki(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "replicator cluster CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    for name in names {
        let mut p = CertificateParams::new(vec![name.to_string()])?;
        p.distinguished_name.push(DnType::CommonName, *name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    }
    Ok(dir.join("ca.pem"))
}
