//! The shell around the replication core: what `replicator up` runs on a
//! node. `resource` reads the resource file (and the hostname), `link`
//! owns the TCP/TLS connection to the peer, `driver` is the tokio task
//! that feeds a `replication::Replica` and carries out its actions, and
//! `up` starts, serves and stops a resource.
//!
//! **Boundary:** the sockets, files, clocks and processes live here; the
//! protocol decisions live in `replication`.

pub mod driver;
pub mod link;
pub mod resource;
pub mod up;

/// Why `replicator up` could not run the resource.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Metadata(#[from] crate::metadata::MetadataError),
    #[error(transparent)]
    Backing(#[from] crate::backing::BackingError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    Driver(#[from] driver::DriverError),
    #[error("failed to listen on {addr}: {cause}")]
    Listen { addr: String, cause: std::io::Error },
    #[error("failed to install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("disk {disk}: {cause}")]
    Lock { disk: std::path::PathBuf, cause: std::io::Error },
}
