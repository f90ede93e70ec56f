//! TLS for Raft traffic: `TlsSetup` holds both sides built from the cluster
//! CA and this node's certificate (TLS 1.2 and 1.3, ring provider), and
//! decides which configured peer a client certificate belongs to.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{raft_id, RaftLogError, RaftPeer, RaftTlsFiles};

pub(crate) struct TlsSetup {
    pub(crate) connector: TlsConnector,
    pub(crate) acceptor: TlsAcceptor,
    /// Each peer's raft id and the name its certificate must carry.
    peers: Vec<(u64, ServerName<'static>)>,
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RaftLogError> {
    let err = |e: String| RaftLogError::Tls(format!("failed to read certificates from {}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// A node name as the DNS name its certificate must carry.
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>, RaftLogError> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| RaftLogError::Config(format!("node name {name:?} is not a valid DNS name: {e}")))
}

impl TlsSetup {
    pub(crate) fn load(files: &RaftTlsFiles, peers: &[RaftPeer]) -> Result<TlsSetup, RaftLogError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(&files.ca)? {
            roots.add(c).map_err(|e| RaftLogError::Tls(format!("CA file {}: {e}", files.ca.display())))?;
        }
        let roots = Arc::new(roots);
        let chain = load_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
            RaftLogError::Tls(format!(
                "failed to read the private key from {}: {e} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)",
                files.key.display()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
        let rustls_err = |e: rustls::Error| RaftLogError::Tls(e.to_string());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| RaftLogError::Tls(format!("CA file {}: {e}", files.ca.display())))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(rustls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| RaftLogError::Tls(format!("certificate {}: {e}", files.cert.display())))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(rustls_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| RaftLogError::Tls(format!("certificate {}: {e}", files.cert.display())))?;
        let peers = peers
            .iter()
            .map(|p| Ok((raft_id(p.id), server_name(&p.name)?)))
            .collect::<Result<Vec<_>, RaftLogError>>()?;
        Ok(TlsSetup {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            peers,
        })
    }

    /// The raft id of the one configured peer the (CA-verified) client
    /// certificate names, or why there is none.
    pub(crate) fn identify(&self, cert: Option<&CertificateDer<'_>>) -> Result<u64, String> {
        let cert = cert.ok_or("no client certificate")?;
        let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
        let mut found = self.peers.iter().filter(|(_, name)| ee.verify_is_valid_for_subject_name(name).is_ok());
        match (found.next(), found.next()) {
            (Some((id, _)), None) => Ok(*id),
            (None, _) => Err("the certificate names no configured peer".into()),
            (Some(_), Some(_)) => Err("the certificate names several configured peers".into()),
        }
    }
}
