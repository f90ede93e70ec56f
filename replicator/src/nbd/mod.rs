//! The NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`), sans-IO.
//!
//! - [`wire`]: constants and fixed-layout headers.
//! - [`handshake`]: option haggling as a state machine ([`handshake::Handshake`]).
//! - [`request`]: decoding and validating transmission requests.
//! - [`reply`]: encoding replies.
//!
//! Boundary: nothing here touches sockets, files or clocks; the server
//! shell (`crate::server`) moves the bytes.

pub mod fuzz;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod wire;

#[cfg(test)]
mod tests;
