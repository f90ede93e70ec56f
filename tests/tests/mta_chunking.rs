//! CHUNKING/BDAT (RFC 3030) over raw sockets against the real server:
//! chunks are taken verbatim (no dot-stuffing), pipelined transactions
//! work, a 1 MiB message in 64 KiB chunks arrives intact, and a message
//! with a bare LF is refused without ending the session.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tests::mta::MailTree;

struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = Client { reader: BufReader::new(s.try_clone().unwrap()), writer: s };
        assert!(c.reply().starts_with("220 "));
        c
    }

    /// One reply (all lines of a multi-line one).
    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "connection closed; so far: {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') {
                return all;
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn command(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    fn bdat(&mut self, chunk: &[u8], last: bool) -> String {
        let head = format!("BDAT {}{}\r\n", chunk.len(), if last { " LAST" } else { "" });
        self.send(head.as_bytes());
        self.send(chunk);
        self.reply()
    }
}

/// The message as stored, without the Received: header we prepend.
fn body_after_received(stored: &[u8]) -> &[u8] {
    let text = stored;
    let mut i = 0;
    // Skip the first header field and its continuation lines.
    loop {
        let end = text[i..].windows(2).position(|w| w == b"\r\n").unwrap() + i + 2;
        i = end;
        if !matches!(text.get(i), Some(b' ' | b'\t')) {
            return &text[i..];
        }
    }
}

#[test]
fn bdat_messages_arrive_verbatim_pipelined_and_large() {
    let tree = MailTree::new("mta-chunking", "", None).unwrap();
    tree.populate().unwrap();
    let mta = tree.serve().unwrap();
    let mut c = Client::connect(mta.mx());
    let ehlo = c.command("EHLO chunker.example");
    assert!(ehlo.contains("250-CHUNKING\r\n"), "{ehlo}");

    // 1. Two chunks; lines DATA would treat specially pass through verbatim.
    let first = b"Subject: chunked\r\nFrom: x@remote.example\r\n\r\n";
    let second = b".leading dot\r\n.\r\nlast line\r\n";
    assert_eq!(c.command("MAIL FROM:<x@remote.example>"), "250 2.1.0 Sender ok\r\n");
    assert_eq!(c.command("RCPT TO:<bob@example.org>"), "250 2.1.5 Recipient ok\r\n");
    assert_eq!(c.bdat(first, false), format!("250 2.0.0 {} octets received\r\n", first.len()));
    assert!(c.bdat(second, true).starts_with("250 2.0.0 Ok: queued as "));
    let got = tree.wait_messages("bob@example.org", 1, Duration::from_secs(20)).unwrap();
    assert_eq!(body_after_received(&got[0]), [&first[..], &second[..]].concat());

    // 2. A whole transaction in one write (RFC 3030 §4.2: BDAT pipelines).
    let msg = b"Subject: pipelined\r\nFrom: x@remote.example\r\n\r\nhello\r\n";
    let mut burst = b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.org>\r\n".to_vec();
    burst.extend_from_slice(format!("BDAT {} LAST\r\n", msg.len()).as_bytes());
    burst.extend_from_slice(msg);
    c.send(&burst);
    assert_eq!(c.reply(), "250 2.1.0 Sender ok\r\n");
    assert_eq!(c.reply(), "250 2.1.5 Recipient ok\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let got = tree.wait_messages("alice@example.org", 1, Duration::from_secs(20)).unwrap();
    assert_eq!(body_after_received(&got[0]), msg);

    // 3. A bare LF is refused (554 5.6.0); the session goes on.
    assert_eq!(c.command("MAIL FROM:<x@remote.example>"), "250 2.1.0 Sender ok\r\n");
    assert_eq!(c.command("RCPT TO:<bob@example.org>"), "250 2.1.5 Recipient ok\r\n");
    assert!(c
        .bdat(b"Subject: smuggle\r\nFrom: x@remote.example\r\n\r\na\n.\nMAIL FROM:<y@x>\r\n", true)
        .starts_with("554 5.6.0 "));

    // 4. 1 MiB in 64 KiB chunks, split at arbitrary points in lines.
    let line = format!("{}\r\n", "0123456789abcdef".repeat(4));
    let mut big = b"Subject: big\r\nFrom: x@remote.example\r\n\r\n".to_vec();
    while big.len() < (1 << 20) {
        big.extend_from_slice(line.as_bytes());
    }
    assert_eq!(c.command("MAIL FROM:<x@remote.example>"), "250 2.1.0 Sender ok\r\n");
    assert_eq!(c.command("RCPT TO:<bob@example.org>"), "250 2.1.5 Recipient ok\r\n");
    let chunks: Vec<&[u8]> = big.chunks(64 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let r = c.bdat(chunk, last);
        assert!(r.starts_with("250 2.0.0 "), "chunk {i}: {r}");
    }
    let got = tree.wait_messages("bob@example.org", 2, Duration::from_secs(30)).unwrap();
    let stored = got.iter().find(|m| m.windows(12).any(|w| w == b"Subject: big")).unwrap();
    assert_eq!(body_after_received(stored), &big[..]);
    assert_eq!(c.command("QUIT"), "221 2.0.0 Bye\r\n");
}
