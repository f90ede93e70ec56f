//! The SMTP client for remote delivery: one connection to one host, EHLO,
//! STARTTLS as the destination's [`TlsLevel`] asks (or implicit TLS to a
//! relay host), AUTH to a relay host, one transaction, per-recipient
//! results.
//!
//! Main function: [`send`]. Routing (smart host or MX) and choosing the
//! level are the caller's job.
//!
//! **Invariant:** with a level above `may`, no byte of the message leaves
//! before the TLS handshake succeeded (the attempt fails temporarily
//! instead); relay credentials are only ever written to a TLS stream.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub use crate::config::TlsLevel;

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

/// A relay host login. The password is never printed, not even by `Debug`.
pub struct Credentials {
    pub username: String,
    password: String,
}

impl Credentials {
    pub fn new(username: String, password: String) -> Credentials {
        Credentials { username, password }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// One host to deliver to and how.
#[derive(Clone, Copy)]
pub struct Hop<'a> {
    pub addr: SocketAddr,
    /// The name the certificate must carry under `Verify` (MX host name, or
    /// the relay host's IP address); also sent as SNI.
    pub server_name: &'a str,
    pub level: TlsLevel,
    /// TLS from the first byte (a relay host on port 465).
    pub implicit_tls: bool,
    /// AUTH after TLS (relay host only).
    pub auth: Option<&'a Credentials>,
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

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("failed to read CA certificates from {path}: {cause} (set `delivery.ca_file` to a PEM bundle)")]
    Roots { path: std::path::PathBuf, cause: String },
    #[error("no usable CA certificate in {0} (set `delivery.ca_file` to a PEM bundle of trusted roots)")]
    NoRoots(std::path::PathBuf),
    #[error("TLS client configuration rejected: {0}")]
    Config(#[from] rustls::Error),
}

/// Client TLS configurations (TLS 1.2/1.3 only): one that accepts any
/// certificate (`may`, `encrypt`) and, when a `verify` level is in use,
/// one that checks it against trusted roots and the host name.
#[derive(Clone)]
pub struct ClientTls {
    unverified: Arc<rustls::ClientConfig>,
    verified: Option<Arc<rustls::ClientConfig>>,
}

impl ClientTls {
    /// `roots`: the PEM bundle `verify` trusts; `None` when no destination
    /// uses `verify`. Read before chroot.
    pub fn new(roots: Option<&Path>) -> Result<ClientTls, ClientTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let unverified = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider.clone())))
            .with_no_client_auth();
        let verified = match roots {
            None => None,
            Some(path) => {
                let mut store = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| ClientTlsError::Roots { path: path.to_owned(), cause: e.to_string() })?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ClientTlsError::Roots { path: path.to_owned(), cause: e.to_string() })?;
                let (added, _ignored) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ClientTlsError::NoRoots(path.to_owned()));
                }
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                    .with_root_certificates(store)
                    .with_no_client_auth();
                Some(Arc::new(config))
            }
        };
        Ok(ClientTls { unverified: Arc::new(unverified), verified })
    }

    fn for_level(&self, level: TlsLevel) -> io::Result<Arc<rustls::ClientConfig>> {
        match level {
            TlsLevel::Verify => {
                self.verified.clone().ok_or_else(|| io::Error::other("TLS policy verify but no trusted roots loaded"))
            }
            _ => Ok(self.unverified.clone()),
        }
    }
}

/// A message to send: envelope and the stored message (CRLF lines).
pub struct Outgoing<'a> {
    pub helo: &'a str,
    /// Empty for the null sender.
    pub from: &'a str,
    pub recipients: &'a [String],
    pub message: &'a [u8],
}

/// A failed TLS handshake, told apart from other errors so that `may`
/// can retry without TLS.
#[derive(Debug)]
struct HandshakeFailed(String);

impl std::fmt::Display for HandshakeFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandshakeFailed {}

fn is_handshake_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<HandshakeFailed>())
}

/// Delivers to one host. Connection-level failures, TLS policy failures
/// and AUTH failures are temporary for all recipients. Under `may`, a
/// failed handshake is retried once without TLS on a new connection
/// (RFC 7435: opportunistic security is never worse than cleartext), as
/// Postfix does.
pub async fn send(hop: &Hop<'_>, tls: &ClientTls, out: &Outgoing<'_>) -> Vec<(String, RcptResult)> {
    let mut result = session(hop, tls, out).await;
    if let Err(e) = &result {
        if hop.level == TlsLevel::May && hop.auth.is_none() && !hop.implicit_tls && is_handshake_failure(e) {
            tracing::info!(host = %hop.server_name, addr = %hop.addr, error = %e, "retrying without TLS (TLS policy may)");
            let clear = Hop { level: TlsLevel::None, ..*hop };
            result = session(&clear, tls, out).await;
        }
    }
    match result {
        Ok(results) => results,
        Err(e) => {
            let why = format!("{}: {e}", hop.addr);
            out.recipients.iter().map(|r| (r.clone(), RcptResult::Temporary(why.clone()))).collect()
        }
    }
}

async fn handshake(
    hop: &Hop<'_>,
    tls: &ClientTls,
    tcp: TcpStream,
) -> io::Result<BufReader<tokio_rustls::client::TlsStream<TcpStream>>> {
    // `may` and `encrypt` accept any certificate; only `verify` checks it.
    let level = hop.level.max(TlsLevel::Encrypt);
    let name =
        ServerName::try_from(hop.server_name.to_string()).map_err(|e| proto_err(format!("bad server name: {e}")))?;
    let stream = TlsConnector::from(tls.for_level(level)?).connect(name, tcp).await.map_err(|e| {
        let why = format!("TLS handshake with {} failed (TLS policy {}): {e}", hop.server_name, hop.level.name());
        io::Error::new(e.kind(), HandshakeFailed(why))
    })?;
    Ok(BufReader::new(stream))
}

async fn session(hop: &Hop<'_>, tls: &ClientTls, out: &Outgoing<'_>) -> io::Result<Vec<(String, RcptResult)>> {
    let tcp = tokio::time::timeout(Duration::from_secs(CONNECT_TIMEOUT_SECS), TcpStream::connect(hop.addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    if hop.implicit_tls {
        let mut secure = handshake(hop, tls, tcp).await?;
        let greeting = read_reply(&mut secure, REPLY_TIMEOUT_SECS).await?;
        if greeting.code != 220 {
            return Ok(all(out, &greeting));
        }
        return secure_session(&mut secure, hop, out).await;
    }
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
    let use_tls = match hop.level {
        TlsLevel::None => false,
        TlsLevel::May => offers_tls,
        TlsLevel::Encrypt | TlsLevel::Verify => true,
    };
    if !use_tls {
        if hop.auth.is_some() {
            return Err(proto_err("refusing to send relay credentials without TLS".into()));
        }
        return transaction(&mut plain, out, &ehlo.text).await;
    }
    if !offers_tls {
        let why = if hop.auth.is_some() { "; relay credentials are never sent in clear" } else { "" };
        return Err(proto_err(format!(
            "TLS policy {} requires STARTTLS but {} does not offer it{why}",
            hop.level.name(),
            hop.server_name
        )));
    }
    let r = command(&mut plain, "STARTTLS").await?;
    if r.code != 220 {
        return Err(proto_err(format!("STARTTLS refused: {}", r.describe())));
    }
    if !plain.buffer().is_empty() {
        return Err(proto_err("server sent data after its STARTTLS reply".into()));
    }
    let mut secure = handshake(hop, tls, plain.into_inner()).await?;
    secure_session(&mut secure, hop, out).await
}

/// EHLO over TLS, AUTH if configured, then the transaction.
async fn secure_session<S: AsyncRead + AsyncWrite + Unpin>(
    secure: &mut BufReader<S>,
    hop: &Hop<'_>,
    out: &Outgoing<'_>,
) -> io::Result<Vec<(String, RcptResult)>> {
    let ehlo = command(secure, &format!("EHLO {}", out.helo)).await?;
    if ehlo.code != 250 {
        return Ok(all(out, &ehlo));
    }
    if let Some(creds) = hop.auth {
        authenticate(secure, &ehlo.text, creds).await?;
    }
    transaction(secure, out, &ehlo.text).await
}

/// AUTH PLAIN, else LOGIN (RFC 4954, 4616). Any refusal is an error: the
/// admin must fix the credentials, and the mail waits meanwhile.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    ehlo_text: &str,
    creds: &Credentials,
) -> io::Result<()> {
    let mechanisms: Vec<String> = ehlo_text
        .split(" / ")
        .filter_map(|l| {
            let upper = l.to_ascii_uppercase();
            upper.strip_prefix("AUTH ").or_else(|| upper.strip_prefix("AUTH=")).map(str::to_string)
        })
        .flat_map(|m| m.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
    let refused =
        |r: &Reply| proto_err(format!("the relay host refused AUTH for {}: {}", creds.username, r.describe()));
    if mechanisms.iter().any(|m| m == "PLAIN") {
        let token = b64(format!("\0{}\0{}", creds.username, creds.password).as_bytes());
        let r = command(s, &format!("AUTH PLAIN {token}")).await?;
        if r.code != 235 {
            return Err(refused(&r));
        }
    } else if mechanisms.iter().any(|m| m == "LOGIN") {
        let r = command(s, "AUTH LOGIN").await?;
        if r.code != 334 {
            return Err(refused(&r));
        }
        let r = command(s, &b64(creds.username.as_bytes())).await?;
        if r.code != 334 {
            return Err(refused(&r));
        }
        let r = command(s, &b64(creds.password.as_bytes())).await?;
        if r.code != 235 {
            return Err(refused(&r));
        }
    } else {
        return Err(proto_err(format!(
            "the relay host offers no AUTH PLAIN or LOGIN (it offers {:?})",
            mechanisms.join(" ")
        )));
    }
    Ok(())
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
