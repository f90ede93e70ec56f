//! The HAProxy PROXY protocol, version 2 (binary), for listeners behind a
//! load balancer: the balancer sends one header with the real client
//! address before any SMTP byte. Pure parser; the shell reads and feeds.
//!
//! Only `PROXY` over TCP/IPv4 and TCP/IPv6 and `LOCAL` (health checks:
//! keep the balancer's own address) are accepted; anything else closes the
//! connection. A listener with `proxy_protocol = true` must never be
//! reachable by clients directly, or they could claim any address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Longest header we accept (addresses plus a generous TLV area).
pub const HEADER_BYTES_MAX: usize = 16 + 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// The original client.
    Client(SocketAddr),
    /// A health check by the balancer itself.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY v2 signature")]
    Signature,
    #[error("unsupported PROXY version or command")]
    Command,
    #[error("unsupported PROXY address family or protocol")]
    Family,
    #[error("PROXY header too long")]
    TooLong,
    #[error("PROXY address block too short")]
    Short,
}

/// Parses a header at the start of `buf`. `Ok(None)`: need more bytes.
/// On success, also returns how many bytes the header took.
pub fn parse(buf: &[u8]) -> Result<Option<(Proxied, usize)>, ProxyError> {
    let n = buf.len().min(SIGNATURE.len());
    if buf[..n] != SIGNATURE[..n] {
        return Err(ProxyError::Signature);
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > HEADER_BYTES_MAX {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let proxied = match buf[12] {
        0x20 => Proxied::Local,
        0x21 => match buf[13] {
            // TCP over IPv4: src addr, dst addr, src port, dst port.
            0x11 => {
                let a = body.get(..12).ok_or(ProxyError::Short)?;
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                Proxied::Client(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]])))
            }
            // TCP over IPv6.
            0x21 => {
                let a = body.get(..36).ok_or(ProxyError::Short)?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[..16]);
                Proxied::Client(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), u16::from_be_bytes([a[32], a[33]])))
            }
            _ => return Err(ProxyError::Family),
        },
        _ => return Err(ProxyError::Command),
    };
    Ok(Some((proxied, 16 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_header(extra_tlv: &[u8]) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        h.extend_from_slice(&((12 + extra_tlv.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[203, 0, 113, 7, 192, 0, 2, 1]);
        h.extend_from_slice(&40000u16.to_be_bytes());
        h.extend_from_slice(&25u16.to_be_bytes());
        h.extend_from_slice(extra_tlv);
        h
    }

    #[test]
    fn ipv4_header_yields_the_client_and_its_length() {
        let mut buf = v4_header(&[0x04, 0x00, 0x01, 0xAA]);
        let len = buf.len();
        buf.extend_from_slice(b"EHLO x\r\n");
        let want = Proxied::Client("203.0.113.7:40000".parse().unwrap());
        assert_eq!(parse(&buf), Ok(Some((want, len))));
        // Every prefix asks for more.
        for cut in 0..len {
            assert_eq!(parse(&buf[..cut]), Ok(None), "prefix {cut}");
        }
    }

    #[test]
    fn ipv6_and_local_headers() {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x21, 0, 36]);
        let mut src = [0u8; 16];
        src[0] = 0x20;
        src[1] = 0x01;
        src[2] = 0x0d;
        src[3] = 0xb8;
        src[15] = 9;
        h.extend_from_slice(&src);
        h.extend_from_slice(&[0u8; 16]);
        h.extend_from_slice(&[0x01, 0xBB, 0, 25]);
        assert_eq!(parse(&h), Ok(Some((Proxied::Client("[2001:db8::9]:443".parse().unwrap()), 52))));
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Some((Proxied::Local, 16))));
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(parse(b"EHLO client\r\n"), Err(ProxyError::Signature));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), Err(ProxyError::Signature));
        let mut h = v4_header(&[]);
        h[12] = 0x11;
        assert_eq!(parse(&h), Err(ProxyError::Command));
        let mut h = v4_header(&[]);
        h[13] = 0x12; // UDP
        assert_eq!(parse(&h), Err(ProxyError::Family));
        let mut h = v4_header(&[]);
        h[14..16].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(parse(&h), Err(ProxyError::Short));
        let mut h = v4_header(&[]);
        h[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(parse(&h), Err(ProxyError::TooLong));
    }
}
