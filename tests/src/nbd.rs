//! A minimal, deliberately dumb NBD client (doc/proto.md of NetworkBlockDevice/nbd).
//!
//! It speaks fixed newstyle with simple replies only, and exposes the raw
//! pieces (options, requests, replies) separately so tests can misbehave:
//! send garbage, pipeline without reading, use unknown commands.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

/// TCP or Unix stream; both are needed and a trait object would lose `try_clone`.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn tcp(addr: SocketAddr) -> io::Result<Stream> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_nodelay(true)?;
        Ok(Stream::Tcp(s))
    }

    pub fn unix(path: &Path) -> io::Result<Stream> {
        Ok(Stream::Unix(UnixStream::connect(path)?))
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    /// Waits (up to the read timeout) for the peer to close the connection,
    /// discarding anything it still sends. Ok(true) = closed (EOF or reset),
    /// Ok(false) = still open when the timeout hit.
    pub fn wait_closed(&mut self, timeout: Duration) -> io::Result<bool> {
        self.set_read_timeout(Some(timeout))?;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(_) => {
                    if std::time::Instant::now() >= deadline {
                        return Ok(false);
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(false),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(true)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// One option reply (`NBD_REP_*`).
#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
}

/// One simple reply to a transmission request.
#[derive(Debug, Clone)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
    pub data: Vec<u8>,
}

/// What `OPT_GO` negotiated.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum), if the server sent NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
}

/// A connection in the option-haggling phase.
pub struct Handshake {
    pub stream: Stream,
    pub handshake_flags: u16,
}

impl Handshake {
    /// Reads the server greeting and sends client flags (fixed newstyle, no zeroes).
    pub fn start(mut stream: Stream) -> Result<Handshake> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let magic = read_u64(&mut stream).context("reading NBDMAGIC")?;
        let opt = read_u64(&mut stream).context("reading IHAVEOPT")?;
        if magic != NBDMAGIC || opt != IHAVEOPT {
            bail!("not a newstyle server: {magic:#x} {opt:#x}");
        }
        let handshake_flags = read_u16(&mut stream)?;
        if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("server does not do fixed newstyle (flags {handshake_flags:#x})");
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (handshake_flags & FLAG_NO_ZEROES));
        stream.write_all(&client_flags.to_be_bytes())?;
        Ok(Handshake { stream, handshake_flags })
    }

    pub fn tcp(addr: SocketAddr) -> Result<Handshake> {
        Self::start(Stream::tcp(addr)?)
    }

    pub fn unix(path: &Path) -> Result<Handshake> {
        Self::start(Stream::unix(path)?)
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.stream.write_all(&b)
    }

    pub fn read_reply(&mut self) -> Result<OptReply> {
        let magic = read_u64(&mut self.stream).context("reading option reply")?;
        if magic != OPT_REPLY_MAGIC {
            bail!("bad option reply magic {magic:#x}");
        }
        let option = read_u32(&mut self.stream)?;
        let reply_type = read_u32(&mut self.stream)?;
        let len = read_u32(&mut self.stream)?;
        if len > 64 << 20 {
            bail!("absurd option reply length {len}");
        }
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok(OptReply { option, reply_type, data })
    }

    /// Sends an option and returns its (single) reply.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Result<OptReply> {
        self.send_option(option, data)?;
        self.read_reply()
    }

    /// `NBD_OPT_LIST`: export names.
    pub fn list(&mut self) -> Result<Vec<String>> {
        self.send_option(OPT_LIST, &[])?;
        let mut names = vec![];
        loop {
            let r = self.read_reply()?;
            match r.reply_type {
                REP_ACK => return Ok(names),
                REP_SERVER => {
                    if r.data.len() < 4 {
                        bail!("short NBD_REP_SERVER");
                    }
                    let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
                    names.push(String::from_utf8_lossy(&r.data[4..4 + n]).into_owned());
                }
                t => bail!("unexpected reply {t:#x} to NBD_OPT_LIST"),
            }
        }
    }

    /// `NBD_OPT_GO` (or INFO): returns the export info, or the error reply type.
    pub fn go_raw(&mut self, option: u32, export: &str) -> Result<std::result::Result<ExportInfo, u32>> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(option, &d)?;
        let mut info = ExportInfo::default();
        let mut got_export = false;
        loop {
            let r = self.read_reply()?;
            if r.option != option {
                bail!("reply for option {} while waiting for {option}", r.option);
            }
            if r.is_error() {
                return Ok(Err(r.reply_type));
            }
            match r.reply_type {
                REP_ACK => {
                    if !got_export {
                        bail!("NBD_REP_ACK without NBD_INFO_EXPORT");
                    }
                    return Ok(Ok(info));
                }
                REP_INFO if r.data.len() >= 2 => {
                    let t = u16::from_be_bytes([r.data[0], r.data[1]]);
                    match t {
                        INFO_EXPORT if r.data.len() == 12 => {
                            info.size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                            info.flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                            got_export = true;
                        }
                        INFO_BLOCK_SIZE if r.data.len() == 14 => {
                            let g = |i: usize| u32::from_be_bytes(r.data[i..i + 4].try_into().unwrap());
                            info.block_size = Some((g(2), g(6), g(10)));
                        }
                        INFO_EXPORT | INFO_BLOCK_SIZE => bail!("bad NBD_INFO {t} length {}", r.data.len()),
                        _ => {}
                    }
                }
                t => bail!("unexpected option reply type {t:#x}"),
            }
        }
    }

    /// `NBD_OPT_GO` that must succeed: enters transmission.
    pub fn go(mut self, export: &str) -> Result<Client> {
        match self.go_raw(OPT_GO, export)? {
            Ok(info) => Ok(Client { stream: self.stream, info, next_handle: 1 }),
            Err(t) => bail!("NBD_OPT_GO {export:?} refused with {t:#x}"),
        }
    }
}

/// The 28-byte request header.
pub fn encode_request(cmd: u16, flags: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// A connection in the transmission phase (simple replies only).
pub struct Client {
    pub stream: Stream,
    pub info: ExportInfo,
    next_handle: u64,
}

impl Client {
    /// Connects over TCP and enters transmission on `export`.
    pub fn connect(addr: SocketAddr, export: &str) -> Result<Client> {
        Handshake::tcp(addr)?.go(export)
    }

    pub fn connect_unix(path: &Path, export: &str) -> Result<Client> {
        Handshake::unix(path)?.go(export)
    }

    /// Wraps a stream already in the transmission phase (e.g. after
    /// `NBD_OPT_EXPORT_NAME`, which has no option reply).
    pub fn from_parts(stream: Stream, info: ExportInfo) -> Client {
        Client { stream, info, next_handle: 1 }
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn flags(&self) -> u16 {
        self.info.flags
    }

    /// Sends one request without waiting; returns its handle.
    pub fn send(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&encode_request(cmd, flags, handle, offset, len));
        b.extend_from_slice(payload);
        self.stream.write_all(&b)?;
        Ok(handle)
    }

    /// Reads one simple reply; `read_len` is how many data bytes follow a
    /// successful reply (the length of the READ it answers, else 0).
    pub fn recv(&mut self, read_len: impl Fn(u64) -> usize) -> io::Result<SimpleReply> {
        let magic = read_u32(&mut self.stream)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected reply magic {magic:#x} (structured reply not negotiated)"),
            ));
        }
        let error = read_u32(&mut self.stream)?;
        let handle = read_u64(&mut self.stream)?;
        let mut data = Vec::new();
        if error == 0 {
            data.resize(read_len(handle), 0);
            self.stream.read_exact(&mut data)?;
        }
        Ok(SimpleReply { error, handle, data })
    }

    /// Sends a request and waits for its reply (no other request in flight).
    pub fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<SimpleReply> {
        let h = self.send(cmd, flags, offset, len, payload)?;
        let n = if cmd == CMD_READ { len as usize } else { 0 };
        let r = self.recv(|_| n)?;
        if r.handle != h {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply handle {} for request {h}", r.handle),
            ));
        }
        Ok(r)
    }

    fn check(what: &str, r: io::Result<SimpleReply>) -> Result<Vec<u8>> {
        let r = r.with_context(|| format!("{what}: connection failed"))?;
        if r.error != 0 {
            bail!("{what}: server replied error {}", r.error);
        }
        Ok(r.data)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        Self::check(&format!("READ {offset}+{len}"), self.request(CMD_READ, 0, offset, len, &[]))
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_flags(offset, data, 0)
    }

    pub fn write_flags(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<()> {
        let r = self.request(CMD_WRITE, flags, offset, data.len() as u32, data);
        Self::check(&format!("WRITE {offset}+{}", data.len()), r).map(drop)
    }

    pub fn flush(&mut self) -> Result<()> {
        Self::check("FLUSH", self.request(CMD_FLUSH, 0, 0, 0, &[])).map(drop)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<()> {
        Self::check("TRIM", self.request(CMD_TRIM, 0, offset, len, &[])).map(drop)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, flags: u16) -> Result<()> {
        Self::check("WRITE_ZEROES", self.request(CMD_WRITE_ZEROES, flags, offset, len, &[])).map(drop)
    }

    /// `NBD_CMD_DISC`: the polite goodbye (no reply).
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(CMD_DISC, 0, 0, 0, &[])?;
        Ok(())
    }
}
