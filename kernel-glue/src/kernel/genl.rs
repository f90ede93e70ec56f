//! A minimal generic-netlink client: build messages with attributes,
//! resolve a family and its multicast groups, send a request and collect
//! the replies up to the kernel's ACK. Only what the nbd family needs.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const NLMSG_HDR_BYTES: usize = 16;
const GENL_HDR_BYTES: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
pub const NLA_F_NESTED: u16 = 1 << 15;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
/// Replies are small; a datagram larger than this is truncated and rejected.
const RECV_BYTES_MAX: usize = 32 * 1024;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A generic-netlink request under construction.
pub struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    pub fn new(family: u16, cmd: u8, version: u8) -> Message {
        let mut buf = vec![0u8; NLMSG_HDR_BYTES];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Message { buf, nests: Vec::new() }
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + payload.len()).expect("attribute fits a netlink message");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    pub fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    pub fn begin_nested(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.attr(kind | NLA_F_NESTED, &[])
    }

    pub fn end_nested(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("end_nested matches begin_nested");
        let len = u16::try_from(self.buf.len() - start).expect("nested attribute fits");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        assert!(self.nests.is_empty(), "unterminated nested attribute");
        let len = u32::try_from(self.buf.len()).expect("message fits");
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }

    #[cfg(test)]
    fn bytes(&mut self) -> Vec<u8> {
        self.finish(7).to_vec()
    }
}

/// Iterates over the attributes in `b` as (type without flags, payload).
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !(NLA_F_NESTED | 0x4000);
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[align4(len).min(b.len())..];
        Some((kind, payload))
    })
}

pub fn attr_u32(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

/// A reply: command and attributes of one generic-netlink message.
#[derive(Debug)]
pub struct Reply {
    pub cmd: u8,
    pub attrs: Vec<u8>,
}

/// A bound NETLINK_GENERIC socket.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_GENERIC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain old data; zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and the length matches it.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = Socket { fd, seq: 1 };
        s.set_recv_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    }

    pub fn set_recv_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            Some(t) => {
                libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t }
            }
            None => libc::timeval { tv_sec: 0, tv_usec: 0 },
        };
        // SAFETY: SO_RCVTIMEO reads one timeval, which `tv` is.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn join_group(&self, group: u32) -> io::Result<()> {
        // SAFETY: NETLINK_ADD_MEMBERSHIP reads one u32 group id.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&group as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "netlink message truncated"));
        }
        Ok(n)
    }

    /// Sends `msg` and returns the data replies that precede the ACK; a
    /// negative ACK becomes the errno it carries.
    pub fn request(&mut self, msg: &mut Message) -> io::Result<Vec<Reply>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: `bytes` is valid for reads of its length; the kernel is
        // the destination (a zeroed sockaddr_nl, pid 0).
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECV_BYTES_MAX];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, mseq, body) in messages(&buf[..n]) {
                if mseq != seq {
                    continue; // a multicast notification or a stale reply
                }
                match kind {
                    NLMSG_ERROR => {
                        let code =
                            body.get(..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(-libc::EIO);
                        return if code == 0 { Ok(out) } else { Err(io::Error::from_raw_os_error(-code)) };
                    }
                    NLMSG_DONE => return Ok(out),
                    _ if body.len() >= GENL_HDR_BYTES => {
                        out.push(Reply { cmd: body[0], attrs: body[GENL_HDR_BYTES..].to_vec() })
                    }
                    _ => {}
                }
            }
        }
    }

    /// Waits for the next generic-netlink message (multicast notifications).
    pub fn next_notification(&self) -> io::Result<Reply> {
        let mut buf = vec![0u8; RECV_BYTES_MAX];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, _seq, body) in messages(&buf[..n]) {
                if kind != NLMSG_ERROR && kind != NLMSG_DONE && body.len() >= GENL_HDR_BYTES {
                    return Ok(Reply { cmd: body[0], attrs: body[GENL_HDR_BYTES..].to_vec() });
                }
            }
        }
    }

    /// Resolves a family name to its id and multicast groups (name, id).
    pub fn resolve(&mut self, name: &str) -> io::Result<(u16, Vec<(String, u32)>)> {
        let mut m = Message::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        m.attr(CTRL_ATTR_FAMILY_NAME, &n);
        let replies = self.request(&mut m)?;
        let mut id = None;
        let mut groups = Vec::new();
        for r in &replies {
            for (kind, p) in attrs(&r.attrs) {
                match kind {
                    CTRL_ATTR_FAMILY_ID if p.len() >= 2 => id = Some(u16::from_ne_bytes([p[0], p[1]])),
                    CTRL_ATTR_MCAST_GROUPS => {
                        for (_, grp) in attrs(p) {
                            let mut gname = None;
                            let mut gid = None;
                            for (k, v) in attrs(grp) {
                                match k {
                                    CTRL_ATTR_MCAST_GRP_NAME => {
                                        gname = Some(String::from_utf8_lossy(v).trim_end_matches('\0').to_string())
                                    }
                                    CTRL_ATTR_MCAST_GRP_ID => gid = attr_u32(v),
                                    _ => {}
                                }
                            }
                            if let (Some(n), Some(i)) = (gname, gid) {
                                groups.push((n, i));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        id.map(|id| (id, groups)).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no family id in the reply"))
    }
}

/// Splits a datagram into (type, seq, payload after the netlink header).
fn messages(mut b: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < NLMSG_HDR_BYTES {
            return None;
        }
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDR_BYTES || len > b.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        let body = &b[NLMSG_HDR_BYTES..len];
        b = &b[align4(len).min(b.len())..];
        Some((kind, seq, body))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_are_sized_and_padded() {
        let mut m = Message::new(0x20, 1, 1);
        m.u32(1, 5).begin_nested(7).begin_nested(1).u32(1, 9).end_nested().end_nested();
        m.attr(10, b"abc");
        let b = m.bytes();
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(b.len() % 4, 0);
        assert_eq!(&b[16..20], &[1, 1, 0, 0]);
        let top: Vec<(u16, Vec<u8>)> = attrs(&b[20..]).map(|(k, p)| (k, p.to_vec())).collect();
        assert_eq!(top.len(), 3);
        assert_eq!((top[0].0, attr_u32(&top[0].1)), (1, Some(5)));
        assert_eq!(top[1].0, 7);
        let inner: Vec<_> = attrs(&top[1].1).collect();
        assert_eq!(inner.len(), 1);
        let fd: Vec<_> = attrs(inner[0].1).collect();
        assert_eq!((fd[0].0, attr_u32(fd[0].1)), (1, Some(9)));
        assert_eq!(top[2], (10, b"abc".to_vec()));
    }

    #[test]
    fn truncated_attributes_end_the_iteration() {
        let b = [8u8, 0, 1, 0, 1, 2];
        assert_eq!(attrs(&b).count(), 0);
    }
}
