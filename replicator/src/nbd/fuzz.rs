//! Entry points for the fuzz targets in `fuzz/` (and the seeded random
//! tests), so both exercise exactly the code the server runs.
//!
//! Each function takes arbitrary bytes from the network's point of view and
//! must never panic, loop forever or allocate without bound.

use super::handshake::{ExportInfo, Handshake, HandshakeEvent, TlsMode};
use super::request::{self, TransmissionConfig};
use super::wire;
use crate::limits;

/// Feeds `data` to a handshake as a client byte stream would arrive. The
/// first byte picks the TLS mode and whether the export is read-only.
pub fn handshake(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let tls = [TlsMode::Off, TlsMode::Optional, TlsMode::Required][usize::from(mode % 3)];
    let export = ExportInfo {
        name: "volume".into(),
        description: String::new(),
        size_bytes: 1 << 30,
        read_only: mode & 4 != 0,
        block_size_min: 1,
        block_size_preferred: limits::NBD_BLOCK_BYTES_PREFERRED,
        block_size_max: limits::NBD_REQUEST_BYTES_MAX,
        unavailable: None,
    };
    let mut hs = Handshake::new(export, tls);
    let mut output_bytes = 0usize;
    loop {
        if let Some(out) = hs.poll_transmit() {
            output_bytes += out.len();
        }
        match hs.poll_event() {
            Some(HandshakeEvent::StartTls) => {
                hs.tls_established();
                continue;
            }
            Some(_) => return,
            None => {}
        }
        let wanted = hs.bytes_wanted();
        assert!(wanted > 0 && wanted <= limits::NBD_OPTION_BYTES_MAX as usize);
        if rest.len() < wanted {
            return;
        }
        let (input, tail) = rest.split_at(wanted);
        rest = tail;
        if hs.handle_input(input).is_err() {
            return;
        }
        // Replies are bounded by what the client sent (plus fixed overhead).
        assert!(output_bytes <= 1024 + 64 * (data.len() - rest.len()));
    }
}

/// Decodes `data` as a stream of request headers, skipping WRITE payloads
/// as the shell does, and checks every executed request stays in range.
pub fn requests(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let config = TransmissionConfig {
        size_bytes: 1 << 20,
        read_only: mode & 1 != 0,
        structured_replies: mode & 2 != 0,
        base_allocation: mode & 6 == 6,
    };
    while rest.len() >= wire::REQUEST_HEADER_BYTES {
        let (header, tail) = rest.split_at(wire::REQUEST_HEADER_BYTES);
        rest = tail;
        let header: &[u8; wire::REQUEST_HEADER_BYTES] = header.try_into().expect("split at the header size");
        let skip = match request::decode(&config, header) {
            Err(_) => return,
            Ok(request::Decoded::RefuseAndClose { .. }) => return,
            Ok(request::Decoded::Refuse { discard_bytes, .. }) => discard_bytes,
            Ok(request::Decoded::Execute(req)) => {
                if let request::Command::Read { offset, len } | request::Command::Write { offset, len, .. } =
                    req.command
                {
                    assert!(offset + u64::from(len) <= config.size_bytes);
                    assert!(len <= limits::NBD_REQUEST_BYTES_MAX);
                }
                req.command.payload_bytes()
            }
        };
        rest = &rest[(skip as usize).min(rest.len())..];
    }
}
