//! TLS material: PEM files → a rustls `ServerConfig` (TLS 1.2 and 1.3
//! only, the `ring` provider's AEAD suites), held in a [`TlsStore`] that is
//! reloaded on SIGHUP. New handshakes use the new certificate; running
//! connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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
    #[error("TLS configuration rejected (does the key match the certificate?): {0}")]
    Config(#[from] rustls::Error),
}

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Certs { path: cert.to_owned(), cause: e.to_string() })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certs { path: cert.to_owned(), cause: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts(cert.to_owned()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key { path: key.to_owned(), cause: e.to_string() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// The current TLS configuration and the files it came from.
pub struct TlsStore {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsStore {
    pub fn load(cert: &Path, key: &Path) -> Result<TlsStore, TlsError> {
        let config = server_config(cert, key)?;
        Ok(TlsStore { cert: cert.to_owned(), key: key.to_owned(), current: RwLock::new(config) })
    }

    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the files; on error the old configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert, &self.key)?;
        match self.current.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }

    /// Points the store at paths inside a chroot (for reloads after chroot).
    pub fn rebase(&mut self, cert: PathBuf, key: PathBuf) {
        self.cert = cert;
        self.key = key;
    }
}
