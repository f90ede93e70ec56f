//! Loading TLS material into a rustls server configuration.
//!
//! Only TLS 1.2 and 1.3 are enabled, with the `ring` provider's default
//! suites (ECDHE key exchange and AEAD ciphers only). With a client CA the
//! server requires and verifies client certificates (mutual TLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read certificates from {path}: {cause} (expected PEM `CERTIFICATE` blocks)")]
    Certs { path: PathBuf, cause: String },
    #[error("no certificate found in {0} (expected PEM `CERTIFICATE` blocks)")]
    NoCerts(PathBuf),
    #[error("failed to read the private key from {path}: {cause} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)")]
    Key { path: PathBuf, cause: String },
    /// rustls's error is in the message, not the source chain, so that
    /// `{:#}` does not print it twice.
    #[error("TLS configuration rejected: {0}")]
    Config(rustls::Error),
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("certificate {path} {why}")]
    Unusable { path: PathBuf, why: String },
    #[error("client CA file {path} is not usable: {cause}")]
    ClientCa { path: PathBuf, cause: String },
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> TlsError {
        TlsError::Config(e)
    }
}

/// Fails with a plain message when `path` does not exist (reading it would
/// say "No such file or directory" with less context).
pub(crate) fn require_file(what: &'static str, path: &Path) -> Result<(), TlsError> {
    match path.try_exists() {
        Ok(true) => Ok(()),
        _ => Err(TlsError::Missing { what, path: path.to_owned() }),
    }
}

/// Paths of the server's TLS material.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// Reads every PEM `CERTIFICATE` in `path` (at least one).
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Certs { path: path.to_owned(), cause: e.to_string() })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certs { path: path.to_owned(), cause: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts(path.to_owned()));
    }
    Ok(certs)
}

/// Builds the server configuration from PEM files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::Key { path: files.key.clone(), cause: e.to_string() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let config = match &files.client_ca {
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca_path)? {
                roots.add(cert).map_err(|e| TlsError::ClientCa { path: ca_path.clone(), cause: e.to_string() })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientCa { path: ca_path.clone(), cause: e.to_string() })?;
            builder.with_client_cert_verifier(verifier).with_single_cert(certs, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
    };
    Ok(Arc::new(config))
}
