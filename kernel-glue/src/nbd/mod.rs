//! A small NBD client: the fixed-newstyle handshake (`NBD_OPT_GO`) in
//! `handshake`, and the transmission phase for the FUSE path in `client`
//! (`Client`: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES with per-request
//! deadlines). The kernel path uses only the handshake: the kernel speaks
//! the transmission phase itself on the socket we hand it.
//!
//! Blocking sockets and threads, not tokio: FUSE (fuser) calls us from a
//! blocking session loop, the kernel path needs only a handshake and a raw
//! descriptor, and clusterd can call a blocking API from any runtime with
//! `spawn_blocking`. One reader thread and one watchdog thread per export
//! keep many requests in flight without a runtime.

pub mod client;
pub mod handshake;
pub mod stream;
pub mod wire;

pub use client::{Client, IoError};
pub use handshake::{connect, ExportInfo};
pub use stream::{Endpoint, Stream};
