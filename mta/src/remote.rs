//! The SMTP client for remote delivery: one connection to one host, EHLO,
//! opportunistic STARTTLS (RFC 7435: encrypt when offered; the certificate
//! is not verified unless TLS is required), one transaction, per-recipient
//! results.
//!
//! Main function: [`send`]. Routing (smart host or MX) is the caller's job.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// RFC 5321 §4.5.3.2 client timeouts, shortened for the initial connect.
const CONNECT_TIMEOUT_SECS: u64 = 30;
const REPLY_TIMEOUT_SECS: u64 = 300;
const DATA_END_TIMEOUT_SECS: u64 = 600;
const REPLY_LINE_BYTES_MAX: u64 = 4096;
const REPLY_LINES_MAX: usize = 100;

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    Delivered,
    /// 4xx or a connection problem: retry later.
    Temporary(String),
    /// 5xx: bounce.
    Permanent(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Use STARTTLS if offered; do not verify the certificate.
    Opportunistic,
    /// Fail (temporarily) unless STARTTLS succeeds.
    Required,
}

#[derive(Debug)]
struct Reply {
    code: u16,
    text: String,
}

impl Reply {
    fn describe(&self) -> String {
        format!("{} {}", self.code, self.text)
    }
}

fn proto_err(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

async fn read_reply<R: AsyncRead + Unpin>(r: &mut BufReader<R>, timeout_secs: u64) -> io::Result<Reply> {
    let read = async {
        let mut text = Vec::new();
        for _ in 0..REPLY_LINES_MAX {
            let mut line = Vec::new();
            (&mut *r).take(REPLY_LINE_BYTES_MAX).read_until(b'\n', &mut line).await?;
            if line.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
            }
            let s = String::from_utf8_lossy(&line).trim_end().to_string();
            let code = s
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| proto_err(format!("bad reply line {s:?}")))?;
            let last = s.as_bytes().get(3) != Some(&b'-');
            text.push(s.get(4..).unwrap_or("").to_string());
            if last {
                return Ok(Reply { code, text: text.join(" / ") });
            }
        }
        Err(proto_err("reply too long".into()))
    };
    tokio::time::timeout(Duration::from_secs(timeout_secs), read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out waiting for a reply"))?
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(s: &mut BufReader<S>, line: &str) -> io::Result<Reply> {
    s.get_mut().write_all(format!("{line}\r\n").as_bytes()).await?;
    s.get_mut().flush().await?;
    read_reply(s, REPLY_TIMEOUT_SECS).await
}

/// Accepts any certificate: opportunistic TLS protects against passive
/// eavesdropping only, which is all RFC 7435 promises without DANE/MTA-STS.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client TLS configuration for opportunistic STARTTLS (TLS 1.2/1.3).
pub fn client_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A message to send: envelope and the stored message (CRLF lines).
pub struct Outgoing<'a> {
    pub helo: &'a str,
    /// Empty for the null sender.
    pub from: &'a str,
    pub recipients: &'a [String],
    pub message: &'a [u8],
}

/// Delivers to one host. Connection-level failures are temporary for all recipients.
pub async fn send(
    addr: SocketAddr,
    server_name: &str,
    tls: TlsPolicy,
    tls_config: Arc<rustls::ClientConfig>,
    out: &Outgoing<'_>,
) -> Vec<(String, RcptResult)> {
    match session(addr, server_name, tls, tls_config, out).await {
        Ok(results) => results,
        Err(e) => {
            let why = format!("{addr}: {e}");
            out.recipients.iter().map(|r| (r.clone(), RcptResult::Temporary(why.clone()))).collect()
        }
    }
}

async fn session(
    addr: SocketAddr,
    server_name: &str,
    tls: TlsPolicy,
    tls_config: Arc<rustls::ClientConfig>,
    out: &Outgoing<'_>,
) -> io::Result<Vec<(String, RcptResult)>> {
    let tcp = tokio::time::timeout(Duration::from_secs(CONNECT_TIMEOUT_SECS), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let mut plain = BufReader::new(tcp);
    let greeting = read_reply(&mut plain, REPLY_TIMEOUT_SECS).await?;
    if greeting.code != 220 {
        return Ok(all(out, &greeting));
    }
    let ehlo = command(&mut plain, &format!("EHLO {}", out.helo)).await?;
    if ehlo.code != 250 {
        return Ok(all(out, &ehlo));
    }
    let offers_tls = ehlo.text.split(" / ").any(|l| l.eq_ignore_ascii_case("STARTTLS"));
    if !offers_tls {
        if tls == TlsPolicy::Required {
            return Err(proto_err("STARTTLS required by policy but not offered".into()));
        }
        return transaction(&mut plain, out, &ehlo.text).await;
    }
    let r = command(&mut plain, "STARTTLS").await?;
    if r.code != 220 {
        return Err(proto_err(format!("STARTTLS refused: {}", r.describe())));
    }
    if !plain.buffer().is_empty() {
        return Err(proto_err("server sent data after its STARTTLS reply".into()));
    }
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| proto_err(format!("bad server name: {e}")))?;
    let tls_stream = TlsConnector::from(tls_config).connect(name, plain.into_inner()).await?;
    let mut secure = BufReader::new(tls_stream);
    let ehlo = command(&mut secure, &format!("EHLO {}", out.helo)).await?;
    if ehlo.code != 250 {
        return Ok(all(out, &ehlo));
    }
    transaction(&mut secure, out, &ehlo.text).await
}

fn classify(r: &Reply) -> RcptResult {
    match r.code {
        200..=399 => RcptResult::Delivered,
        500..=599 => RcptResult::Permanent(r.describe()),
        _ => RcptResult::Temporary(r.describe()),
    }
}

fn all(out: &Outgoing<'_>, r: &Reply) -> Vec<(String, RcptResult)> {
    out.recipients.iter().map(|rc| (rc.clone(), classify(r))).collect()
}

async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    out: &Outgoing<'_>,
    ehlo_text: &str,
) -> io::Result<Vec<(String, RcptResult)>> {
    let eight_bit = out.message.iter().any(|&b| b >= 0x80);
    let mut mail = format!("MAIL FROM:<{}>", out.from);
    if ehlo_text.split(" / ").any(|l| l.to_ascii_uppercase().starts_with("SIZE")) {
        mail.push_str(&format!(" SIZE={}", out.message.len()));
    }
    if eight_bit && ehlo_text.split(" / ").any(|l| l.eq_ignore_ascii_case("8BITMIME")) {
        mail.push_str(" BODY=8BITMIME");
    }
    let r = command(s, &mail).await?;
    if r.code != 250 {
        return Ok(all(out, &r));
    }
    let mut results = Vec::new();
    let mut accepted = Vec::new();
    for rcpt in out.recipients {
        let r = command(s, &format!("RCPT TO:<{rcpt}>")).await?;
        match classify(&r) {
            RcptResult::Delivered => accepted.push(rcpt.clone()),
            other => results.push((rcpt.clone(), other)),
        }
    }
    if accepted.is_empty() {
        let _ = command(s, "QUIT").await;
        return Ok(results);
    }
    let r = command(s, "DATA").await?;
    if r.code != 354 {
        results.extend(accepted.iter().map(|rc| (rc.clone(), classify(&r))));
        return Ok(results);
    }
    let mut body = Vec::with_capacity(out.message.len() + 1024);
    for line in out.message.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            body.push(b'.');
        }
        body.extend_from_slice(line);
    }
    if !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    s.get_mut().write_all(&body).await?;
    s.get_mut().flush().await?;
    let r = read_reply(s, DATA_END_TIMEOUT_SECS).await?;
    results.extend(accepted.iter().map(|rc| (rc.clone(), classify(&r))));
    let _ = command(s, "QUIT").await;
    Ok(results)
}
