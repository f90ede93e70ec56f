//! The client side of the fixed-newstyle handshake, ending in `NBD_OPT_GO`.
//!
//! Blocking, with socket timeouts: the whole exchange is a handful of
//! messages, and the caller (attach) has nothing else to do meanwhile.

use std::io::{self, Read, Write};
use std::time::Duration;

use super::stream::{Endpoint, Stream};
use super::wire::*;
use crate::error::{Error, Result};
use crate::limits::{EXPORT_NAME_BYTES_MAX, OPTION_REPLIES_MAX, OPTION_REPLY_BYTES_MAX};

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    /// NBD transmission flags (`TRANS_*`), as the kernel wants them.
    pub transmission_flags: u16,
    /// Block-size constraints, if the server sent them: minimum, preferred, maximum.
    pub block_sizes: Option<(u32, u32, u32)>,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.transmission_flags & TRANS_READ_ONLY != 0
    }
    pub fn can_flush(&self) -> bool {
        self.transmission_flags & TRANS_SEND_FLUSH != 0
    }
    pub fn can_fua(&self) -> bool {
        self.transmission_flags & TRANS_SEND_FUA != 0
    }
    pub fn can_trim(&self) -> bool {
        self.transmission_flags & TRANS_SEND_TRIM != 0
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.transmission_flags & TRANS_SEND_WRITE_ZEROES != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & TRANS_CAN_MULTI_CONN != 0
    }
}

/// Connects to `endpoint`, negotiates `export` with `NBD_OPT_GO` and returns
/// the socket, ready for the transmission phase (blocking, no timeouts).
pub fn connect(endpoint: &Endpoint, export: &str, timeout: Duration) -> Result<(Stream, ExportInfo)> {
    if export.len() > EXPORT_NAME_BYTES_MAX {
        return Err(Error::Invalid {
            what: "export name",
            reason: format!("longer than {EXPORT_NAME_BYTES_MAX} bytes"),
        });
    }
    let ep = endpoint.to_string();
    let mut s = endpoint.dial(timeout).map_err(|source| Error::Connect { endpoint: ep.clone(), source })?;
    s.set_timeouts(Some(timeout)).map_err(|source| Error::Connect { endpoint: ep.clone(), source })?;
    let info = negotiate(&mut s, export).map_err(|e| match e {
        Negotiation::Io(source) => Error::Handshake { endpoint: ep.clone(), reason: source.to_string() },
        Negotiation::Protocol(reason) => Error::Handshake { endpoint: ep.clone(), reason },
        Negotiation::Refused(reason) => Error::ExportRefused { endpoint: ep.clone(), export: export.into(), reason },
    })?;
    s.set_timeouts(None).map_err(|source| Error::Connect { endpoint: ep, source })?;
    Ok((s, info))
}

enum Negotiation {
    Io(io::Error),
    Protocol(String),
    Refused(String),
}

impl From<io::Error> for Negotiation {
    fn from(e: io::Error) -> Self {
        Negotiation::Io(e)
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// The option haggling on any byte stream (tests run it on a socket pair).
fn negotiate(s: &mut (impl Read + Write), export: &str) -> Result<ExportInfo, Negotiation> {
    if read_u64(s)? != NBDMAGIC {
        return Err(Negotiation::Protocol("not an NBD server (bad magic)".into()));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(Negotiation::Protocol("server does not speak the newstyle protocol".into()));
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Negotiation::Protocol("server does not speak fixed newstyle".into()));
    }
    let mut client_flags = CLIENT_FLAG_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= CLIENT_FLAG_NO_ZEROES;
    }
    // NBD_OPT_GO with the export name and one information request.
    let name = export.as_bytes();
    let mut msg = Vec::with_capacity(16 + 4 + name.len() + 4 + 4);
    msg.extend_from_slice(&client_flags.to_be_bytes());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    let len = u32::try_from(4 + name.len() + 2 + 2).expect("export name length is bounded");
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(&u32::try_from(name.len()).expect("bounded").to_be_bytes());
    msg.extend_from_slice(name);
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    s.write_all(&msg)?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut block_sizes = None;
    for _ in 0..OPTION_REPLIES_MAX {
        if read_u64(s)? != OPTION_REPLY_MAGIC {
            return Err(Negotiation::Protocol("bad option reply magic".into()));
        }
        let option = read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)?;
        if option != OPT_GO {
            return Err(Negotiation::Protocol(format!("reply for option {option}, expected NBD_OPT_GO")));
        }
        if len > OPTION_REPLY_BYTES_MAX {
            return Err(Negotiation::Protocol(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        if kind & REP_FLAG_ERROR != 0 {
            let text = String::from_utf8_lossy(&data).into_owned();
            return Err(Negotiation::Refused(format!(
                "error reply {:#x}{}",
                kind,
                if text.is_empty() { String::new() } else { format!(": {text}") }
            )));
        }
        match kind {
            REP_INFO if data.len() >= 2 => match be_u16(&data, 0) {
                INFO_EXPORT if data.len() == 12 => export_info = Some((be_u64(&data, 2), be_u16(&data, 10))),
                INFO_BLOCK_SIZE if data.len() == 14 => {
                    block_sizes = Some((be_u32(&data, 2), be_u32(&data, 6), be_u32(&data, 10)))
                }
                // Other information we did not ask for is allowed and ignored.
                _ => {}
            },
            REP_INFO => return Err(Negotiation::Protocol("short NBD_REP_INFO".into())),
            REP_ACK => {
                let Some((size_bytes, transmission_flags)) = export_info else {
                    return Err(Negotiation::Protocol("NBD_REP_ACK without NBD_INFO_EXPORT".into()));
                };
                if transmission_flags & TRANS_HAS_FLAGS == 0 {
                    return Err(Negotiation::Protocol("transmission flags lack NBD_FLAG_HAS_FLAGS".into()));
                }
                return Ok(ExportInfo { size_bytes, transmission_flags, block_sizes });
            }
            other => return Err(Negotiation::Protocol(format!("unexpected option reply type {other}"))),
        }
    }
    Err(Negotiation::Protocol(format!("more than {OPTION_REPLIES_MAX} option replies")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A byte stream with scripted server output; records what the client wrote.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting() -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v
    }

    fn reply(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OPT_GO.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn go_returns_size_flags_and_block_sizes() {
        let mut input = greeting();
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(96u64 << 20).to_be_bytes());
        info.extend_from_slice(&(TRANS_HAS_FLAGS | TRANS_SEND_FLUSH | TRANS_SEND_FUA).to_be_bytes());
        input.extend(reply(REP_INFO, &info));
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for x in [1u32, 4096, 32 << 20] {
            bs.extend_from_slice(&x.to_be_bytes());
        }
        input.extend(reply(REP_INFO, &bs));
        input.extend(reply(REP_ACK, &[]));
        let mut s = Script { input: Cursor::new(input), output: vec![] };
        let got = negotiate(&mut s, "vol").ok().expect("handshake succeeds");
        assert_eq!(got.size_bytes, 96 << 20);
        assert!(got.can_flush() && got.can_fua() && !got.read_only() && !got.can_trim());
        assert_eq!(got.block_sizes, Some((1, 4096, 32 << 20)));
        // Client flags, then IHAVEOPT, NBD_OPT_GO, length 4+3+2+2, name, one info request.
        let o = &s.output;
        assert_eq!(be_u32(o, 0), CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
        assert_eq!(be_u64(o, 4), IHAVEOPT);
        assert_eq!(be_u32(o, 12), OPT_GO);
        assert_eq!(be_u32(o, 16), 11);
        assert_eq!(be_u32(o, 20), 3);
        assert_eq!(&o[24..27], b"vol");
        assert_eq!(be_u16(o, 27), 1);
        assert_eq!(be_u16(o, 29), INFO_BLOCK_SIZE);
        assert_eq!(o.len(), 31);
    }

    #[test]
    fn error_reply_is_a_refusal_with_the_servers_text() {
        let mut input = greeting();
        input.extend(reply(REP_FLAG_ERROR | 6, b"no such export"));
        let mut s = Script { input: Cursor::new(input), output: vec![] };
        match negotiate(&mut s, "nope") {
            Err(Negotiation::Refused(r)) => assert!(r.contains("no such export"), "{r}"),
            _ => panic!("expected a refusal"),
        }
    }

    #[test]
    fn oversized_option_reply_is_rejected_before_allocation() {
        let mut input = greeting();
        let mut r = reply(REP_INFO, &[]);
        let n = r.len();
        r[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        input.extend(r);
        let mut s = Script { input: Cursor::new(input), output: vec![] };
        assert!(matches!(negotiate(&mut s, "v"), Err(Negotiation::Protocol(_))));
    }

    #[test]
    fn ack_without_export_info_is_a_protocol_error() {
        let mut input = greeting();
        input.extend(reply(REP_ACK, &[]));
        let mut s = Script { input: Cursor::new(input), output: vec![] };
        assert!(matches!(negotiate(&mut s, "v"), Err(Negotiation::Protocol(_))));
    }
}
