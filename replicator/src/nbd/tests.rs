//! Tests of the sans-IO NBD core against hand-built byte sequences, each
//! citing the part of NetworkBlockDevice/nbd `doc/proto.md` it checks.

use super::handshake::{ExportInfo, Handshake, HandshakeError, HandshakeEvent, TlsMode};
use super::request::{self, Command, Decoded, ProtocolViolation, TransmissionConfig};
use super::wire::{self, NbdError};
use crate::test_rng::Rng;

fn export(read_only: bool) -> ExportInfo {
    ExportInfo {
        name: "volume".into(),
        description: "test volume".into(),
        size_bytes: 1 << 20,
        read_only,
        block_size_min: 1,
        block_size_preferred: 4096,
        block_size_max: 32 << 20,
        unavailable: None,
    }
}

/// Drives a handshake past the greeting and client flags.
fn started(tls: TlsMode, read_only: bool) -> Handshake {
    let mut hs = Handshake::new(export(read_only), tls);
    let greeting = hs.poll_transmit().unwrap();
    assert_eq!(greeting.len(), wire::GREETING_BYTES);
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    let flags = (wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES).to_be_bytes();
    hs.handle_input(&flags).unwrap();
    hs
}

/// Sends one option (header, then data if any, as the shell would).
fn send_option(hs: &mut Handshake, option: u32, data: &[u8]) -> Result<(), HandshakeError> {
    let mut header = wire::IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&option.to_be_bytes());
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    assert_eq!(hs.bytes_wanted(), 16);
    hs.handle_input(&header)?;
    if !data.is_empty() {
        assert_eq!(hs.bytes_wanted(), data.len());
        hs.handle_input(data)?;
    }
    Ok(())
}

/// Splits the server's option replies into (option, type, data).
fn replies(bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= 20, "truncated reply");
        assert_eq!(u64::from_be_bytes(rest[..8].try_into().unwrap()), wire::OPTION_REPLY_MAGIC);
        let option = u32::from_be_bytes(rest[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(rest[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
        out.push((option, kind, rest[20..20 + len].to_vec()));
        rest = &rest[20 + len..];
    }
    out
}

fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    data
}

#[test]
fn go_replies_export_info_block_size_then_ack() {
    // "NBD_OPT_GO": NBD_REP_INFO(NBD_INFO_EXPORT) is mandatory, then NBD_REP_ACK.
    let mut hs = started(TlsMode::Off, false);
    send_option(&mut hs, wire::OPT_GO, &go_payload("", &[wire::INFO_NAME, wire::INFO_DESCRIPTION])).unwrap();
    let out = replies(&hs.poll_transmit().unwrap());
    let kinds: Vec<u32> = out.iter().map(|r| r.1).collect();
    assert_eq!(kinds, vec![wire::REP_INFO, wire::REP_INFO, wire::REP_INFO, wire::REP_INFO, wire::REP_ACK]);
    let info = &out[0].2;
    assert_eq!(u16::from_be_bytes([info[0], info[1]]), wire::INFO_EXPORT);
    assert_eq!(u64::from_be_bytes(info[2..10].try_into().unwrap()), 1 << 20);
    let flags = u16::from_be_bytes([info[10], info[11]]);
    assert!(flags & wire::TFLAG_HAS_FLAGS != 0 && flags & wire::TFLAG_CAN_MULTI_CONN != 0);
    assert!(flags & wire::TFLAG_READ_ONLY == 0 && flags & wire::TFLAG_SEND_FLUSH != 0);
    assert_eq!(&out[1].2[2..], b"volume");
    assert_eq!(&out[2].2[2..], b"test volume");
    let block = &out[3].2;
    assert_eq!(u16::from_be_bytes([block[0], block[1]]), wire::INFO_BLOCK_SIZE);
    assert_eq!(u32::from_be_bytes(block[6..10].try_into().unwrap()), 4096);
    match hs.poll_event() {
        Some(HandshakeEvent::Ready(n)) => assert!(!n.structured_replies && n.transmission_flags == flags),
        other => panic!("expected Ready, got {other:?}"),
    }
    assert_eq!(hs.bytes_wanted(), 0);
}

#[test]
fn info_does_not_end_the_handshake_and_read_only_is_flagged() {
    let mut hs = started(TlsMode::Off, true);
    send_option(&mut hs, wire::OPT_INFO, &go_payload("volume", &[])).unwrap();
    let out = replies(&hs.poll_transmit().unwrap());
    let flags = u16::from_be_bytes([out[0].2[10], out[0].2[11]]);
    assert!(flags & wire::TFLAG_READ_ONLY != 0);
    assert!(flags & wire::TFLAG_SEND_TRIM == 0, "no trim on a read-only export");
    assert_eq!(hs.poll_event(), None);
    assert_eq!(hs.bytes_wanted(), 16);
}

#[test]
fn unknown_export_and_unknown_option_keep_the_session() {
    // "NBD_REP_ERR_UNKNOWN" for GO on a missing export; "NBD_REP_ERR_UNSUP" for unknown options.
    let mut hs = started(TlsMode::Off, false);
    send_option(&mut hs, wire::OPT_GO, &go_payload("nope", &[])).unwrap();
    send_option(&mut hs, 0x4242, b"whatever").unwrap();
    let out = replies(&hs.poll_transmit().unwrap());
    assert_eq!(out[0].1, wire::REP_ERR_UNKNOWN);
    assert_eq!((out[1].0, out[1].1), (0x4242, wire::REP_ERR_UNSUP));
    assert_eq!(hs.bytes_wanted(), 16);
}

#[test]
fn malformed_go_payloads_get_err_invalid() {
    let mut hs = started(TlsMode::Off, false);
    for bad in [vec![0, 0, 0], vec![0, 0, 0, 9, b'a'], {
        let mut p = go_payload("", &[1]);
        p.push(0);
        p
    }] {
        send_option(&mut hs, wire::OPT_GO, &bad).unwrap();
        let out = replies(&hs.poll_transmit().unwrap());
        assert_eq!(out[0].1, wire::REP_ERR_INVALID, "payload {bad:?}");
    }
}

#[test]
fn list_names_the_export() {
    let mut hs = started(TlsMode::Off, false);
    send_option(&mut hs, wire::OPT_LIST, &[]).unwrap();
    let out = replies(&hs.poll_transmit().unwrap());
    assert_eq!(out[0].1, wire::REP_SERVER);
    assert_eq!(&out[0].2[4..], b"volume");
    assert_eq!(out[1].1, wire::REP_ACK);
}

#[test]
fn export_name_sends_size_flags_and_honours_no_zeroes() {
    // "NBD_OPT_EXPORT_NAME": size (8), flags (2), then 124 zeroes unless NO_ZEROES.
    let mut hs = started(TlsMode::Off, false);
    send_option(&mut hs, wire::OPT_EXPORT_NAME, b"volume").unwrap();
    assert_eq!(hs.poll_transmit().unwrap().len(), 10);

    let mut hs = Handshake::new(export(false), TlsMode::Off);
    hs.poll_transmit();
    hs.handle_input(&wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    send_option(&mut hs, wire::OPT_EXPORT_NAME, b"").unwrap();
    assert_eq!(hs.poll_transmit().unwrap().len(), 134);
    assert!(matches!(hs.poll_event(), Some(HandshakeEvent::Ready(_))));
}

#[test]
fn export_name_for_unknown_export_closes() {
    let mut hs = started(TlsMode::Off, false);
    let err = send_option(&mut hs, wire::OPT_EXPORT_NAME, b"other").unwrap_err();
    assert_eq!(err, HandshakeError::UnknownExport("other".into()));
}

#[test]
fn client_flags_are_checked() {
    let mut hs = Handshake::new(export(false), TlsMode::Off);
    assert_eq!(hs.handle_input(&0u32.to_be_bytes()), Err(HandshakeError::NotFixedNewstyle));
    let mut hs = Handshake::new(export(false), TlsMode::Off);
    assert!(matches!(hs.handle_input(&0x11u32.to_be_bytes()), Err(HandshakeError::UnknownClientFlags(0x11))));
}

#[test]
fn bad_option_magic_and_oversized_options_close() {
    let mut hs = started(TlsMode::Off, false);
    assert!(matches!(hs.handle_input(&[0x55; 16]), Err(HandshakeError::BadOptionMagic(_))));

    let mut hs = started(TlsMode::Off, false);
    let mut header = wire::IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(hs.handle_input(&header), Err(HandshakeError::OptionTooBig { .. })));
    let out = replies(&hs.poll_transmit().unwrap());
    assert_eq!(out[0].1, wire::REP_ERR_TOO_BIG);
}

#[test]
fn too_many_options_close() {
    let mut hs = started(TlsMode::Off, false);
    let mut result = Ok(());
    for _ in 0..=crate::limits::NBD_OPTIONS_PER_HANDSHAKE_MAX {
        result = send_option(&mut hs, 0x99, &[]);
        if result.is_err() {
            break;
        }
    }
    assert!(matches!(result, Err(HandshakeError::TooManyOptions(_))));
}

#[test]
fn tls_required_hides_the_export_until_starttls() {
    // "Server-side requirements" of the TLS section: NBD_REP_ERR_TLS_REQD before STARTTLS.
    let mut hs = started(TlsMode::Required, false);
    send_option(&mut hs, wire::OPT_LIST, &[]).unwrap();
    send_option(&mut hs, wire::OPT_GO, &go_payload("", &[])).unwrap();
    let out = replies(&hs.poll_transmit().unwrap());
    assert!(out.iter().all(|r| r.1 == wire::REP_ERR_TLS_REQD), "{out:?}");
    assert_eq!(hs.poll_event(), None);

    send_option(&mut hs, wire::OPT_STARTTLS, &[]).unwrap();
    assert_eq!(replies(&hs.poll_transmit().unwrap())[0].1, wire::REP_ACK);
    assert_eq!(hs.poll_event(), Some(HandshakeEvent::StartTls));
    assert_eq!(hs.bytes_wanted(), 0, "nothing may be read before the TLS handshake");
    hs.tls_established();
    send_option(&mut hs, wire::OPT_STARTTLS, &[]).unwrap();
    assert_eq!(replies(&hs.poll_transmit().unwrap())[0].1, wire::REP_ERR_INVALID);
    send_option(&mut hs, wire::OPT_GO, &go_payload("", &[])).unwrap();
    assert!(matches!(hs.poll_event(), Some(HandshakeEvent::Ready(_))));
}

#[test]
fn tls_required_refuses_export_name_without_tls() {
    let mut hs = started(TlsMode::Required, false);
    assert_eq!(send_option(&mut hs, wire::OPT_EXPORT_NAME, b""), Err(HandshakeError::TlsRequired));
}

#[test]
fn starttls_without_tls_configured_is_unsupported() {
    let mut hs = started(TlsMode::Off, false);
    send_option(&mut hs, wire::OPT_STARTTLS, &[]).unwrap();
    assert_eq!(replies(&hs.poll_transmit().unwrap())[0].1, wire::REP_ERR_UNSUP);
    assert_eq!(hs.poll_event(), None);
}

#[test]
fn tls_resets_structured_replies() {
    let mut hs = started(TlsMode::Optional, false);
    send_option(&mut hs, wire::OPT_STRUCTURED_REPLY, &[]).unwrap();
    send_option(&mut hs, wire::OPT_STARTTLS, &[]).unwrap();
    assert_eq!(hs.poll_event(), Some(HandshakeEvent::StartTls));
    hs.tls_established();
    send_option(&mut hs, wire::OPT_GO, &go_payload("", &[])).unwrap();
    match hs.poll_event() {
        Some(HandshakeEvent::Ready(n)) => assert!(!n.structured_replies),
        other => panic!("{other:?}"),
    }
}

#[test]
fn meta_context_needs_structured_replies_and_selects_base_allocation() {
    // "Metadata querying": SET_META_CONTEXT before STRUCTURED_REPLY is invalid.
    let mut hs = started(TlsMode::Off, false);
    send_option(&mut hs, wire::OPT_SET_META_CONTEXT, &meta_payload("", &["base:allocation"])).unwrap();
    assert_eq!(replies(&hs.poll_transmit().unwrap())[0].1, wire::REP_ERR_INVALID);

    send_option(&mut hs, wire::OPT_LIST_META_CONTEXT, &meta_payload("", &[])).unwrap();
    let out = replies(&hs.poll_transmit().unwrap());
    assert_eq!(out[0].1, wire::REP_META_CONTEXT);
    assert_eq!(&out[0].2[4..], b"base:allocation");

    send_option(&mut hs, wire::OPT_STRUCTURED_REPLY, &[]).unwrap();
    send_option(&mut hs, wire::OPT_SET_META_CONTEXT, &meta_payload("volume", &["qemu:dirty", "base:allocation"]))
        .unwrap();
    let out = replies(&hs.poll_transmit().unwrap());
    assert_eq!(out[1].1, wire::REP_META_CONTEXT);
    assert_eq!(u32::from_be_bytes(out[1].2[..4].try_into().unwrap()), wire::META_BASE_ALLOCATION_ID);
    assert_eq!(out[2].1, wire::REP_ACK);
    send_option(&mut hs, wire::OPT_GO, &go_payload("", &[])).unwrap();
    match hs.poll_event() {
        Some(HandshakeEvent::Ready(n)) => {
            assert!(n.structured_replies && n.base_allocation);
            assert!(n.transmission_flags & wire::TFLAG_SEND_DF != 0);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn abort_acks_and_closes() {
    let mut hs = started(TlsMode::Off, false);
    send_option(&mut hs, wire::OPT_ABORT, &[]).unwrap();
    assert_eq!(replies(&hs.poll_transmit().unwrap())[0].1, wire::REP_ACK);
    assert_eq!(hs.poll_event(), Some(HandshakeEvent::Closed));
    assert_eq!(hs.bytes_wanted(), 0);
}

#[test]
fn random_option_streams_never_panic_and_always_terminate() {
    for seed in 0..2000u64 {
        let mut rng = Rng::new(seed);
        let mut hs = Handshake::new(
            export(seed % 2 == 0),
            [TlsMode::Off, TlsMode::Optional, TlsMode::Required][seed as usize % 3],
        );
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 10_000, "seed {seed}: handshake did not terminate");
            let _ = hs.poll_transmit();
            match hs.poll_event() {
                Some(HandshakeEvent::StartTls) => {
                    hs.tls_established();
                    continue;
                }
                Some(_) => break,
                None => {}
            }
            let wanted = hs.bytes_wanted();
            assert!(wanted > 0 && wanted <= crate::limits::NBD_OPTION_BYTES_MAX as usize);
            // Mostly well-formed option headers with random options and
            // lengths, sometimes pure garbage.
            let mut input = vec![0u8; wanted];
            for b in input.iter_mut() {
                *b = rng.next() as u8;
            }
            if wanted == 16 && rng.next() % 8 != 0 {
                input[..8].copy_from_slice(&wire::IHAVEOPT.to_be_bytes());
                let option = (rng.next() % 12) as u32;
                input[8..12].copy_from_slice(&option.to_be_bytes());
                let len = (rng.next() % 40) as u32;
                input[12..16].copy_from_slice(&len.to_be_bytes());
            }
            if wanted == 4 && rng.next() % 4 != 0 {
                input.copy_from_slice(&(rng.next() as u32 & 3 | 1).to_be_bytes());
            }
            if hs.handle_input(&input).is_err() {
                break;
            }
        }
    }
}

fn request(command: u16, flags: u16, offset: u64, length: u32) -> [u8; wire::REQUEST_HEADER_BYTES] {
    let mut header = [0u8; wire::REQUEST_HEADER_BYTES];
    header[..4].copy_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&command.to_be_bytes());
    header[8..16].copy_from_slice(&0xc0ffeeu64.to_be_bytes());
    header[16..24].copy_from_slice(&offset.to_be_bytes());
    header[24..28].copy_from_slice(&length.to_be_bytes());
    header
}

fn config(read_only: bool) -> TransmissionConfig {
    TransmissionConfig { size_bytes: 1 << 20, read_only, structured_replies: true, base_allocation: false }
}

fn refused(decoded: Decoded) -> (NbdError, u32) {
    match decoded {
        Decoded::Refuse { error, discard_bytes, .. } => (error, discard_bytes),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn valid_requests_decode() {
    let c = config(false);
    let read = request::decode(&c, &request(wire::CMD_READ, wire::CMD_FLAG_DF, 4096, 512)).unwrap();
    assert_eq!(
        read,
        Decoded::Execute(request::Request { cookie: 0xc0ffee, command: Command::Read { offset: 4096, len: 512 } })
    );
    let write = request::decode(&c, &request(wire::CMD_WRITE, wire::CMD_FLAG_FUA, 0, 1 << 20)).unwrap();
    assert!(matches!(write, Decoded::Execute(r) if r.command == Command::Write { offset: 0, len: 1 << 20, fua: true }));
    let zero =
        request::decode(&c, &request(wire::CMD_WRITE_ZEROES, wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FAST_ZERO, 0, 8))
            .unwrap();
    assert!(
        matches!(zero, Decoded::Execute(r) if r.command == Command::WriteZeroes { offset: 0, len: 8, may_trim: false, fast_only: true, fua: false })
    );
    assert!(
        matches!(request::decode(&c, &request(wire::CMD_DISC, 0, 0, 0)).unwrap(), Decoded::Execute(r) if r.command == Command::Disconnect)
    );
}

#[test]
fn out_of_range_requests_are_refused_not_executed() {
    // "NBD_CMD_READ": EINVAL past the end; "NBD_CMD_WRITE": ENOSPC past the end.
    let c = config(false);
    assert_eq!(refused(request::decode(&c, &request(wire::CMD_READ, 0, (1 << 20) - 1, 2)).unwrap()).0, NbdError::Inval);
    assert_eq!(
        refused(request::decode(&c, &request(wire::CMD_WRITE, 0, 1 << 20, 512)).unwrap()),
        (NbdError::NoSpc, 512)
    );
    assert_eq!(refused(request::decode(&c, &request(wire::CMD_READ, 0, u64::MAX, 4096)).unwrap()).0, NbdError::Inval);
    assert_eq!(
        refused(request::decode(&c, &request(wire::CMD_TRIM, 0, u64::MAX - 1, 4096)).unwrap()).0,
        NbdError::Inval
    );
    assert_eq!(
        refused(request::decode(&c, &request(wire::CMD_WRITE_ZEROES, 0, 1 << 20, 1)).unwrap()).0,
        NbdError::NoSpc
    );
}

#[test]
fn writes_to_a_read_only_export_are_refused_after_their_payload() {
    let c = config(true);
    assert_eq!(refused(request::decode(&c, &request(wire::CMD_WRITE, 0, 0, 4096)).unwrap()), (NbdError::Perm, 4096));
    assert_eq!(refused(request::decode(&c, &request(wire::CMD_TRIM, 0, 0, 4096)).unwrap()).0, NbdError::Perm);
    assert_eq!(refused(request::decode(&c, &request(wire::CMD_WRITE_ZEROES, 0, 0, 4096)).unwrap()).0, NbdError::Perm);
}

#[test]
fn oversized_requests() {
    let c = config(false);
    let max = crate::limits::NBD_REQUEST_BYTES_MAX;
    assert!(matches!(
        request::decode(&c, &request(wire::CMD_WRITE, 0, 0, max + 1)).unwrap(),
        Decoded::RefuseAndClose { error: NbdError::Inval, .. }
    ));
    assert_eq!(refused(request::decode(&c, &request(wire::CMD_READ, 0, 0, max + 1)).unwrap()).0, NbdError::Inval);
}

#[test]
fn bad_flags_commands_and_magic() {
    let c = config(false);
    assert_eq!(refused(request::decode(&c, &request(wire::CMD_FLUSH, 0, 0, 1)).unwrap()).0, NbdError::Inval);
    assert_eq!(refused(request::decode(&c, &request(99, 0, 0, 0)).unwrap()).0, NbdError::Inval);
    assert_eq!(refused(request::decode(&c, &request(wire::CMD_READ, 1 << 9, 0, 1)).unwrap()).0, NbdError::Inval);
    assert_eq!(
        refused(request::decode(&c, &request(wire::CMD_WRITE, wire::CMD_FLAG_NO_HOLE, 0, 8)).unwrap()),
        (NbdError::Inval, 8)
    );
    // BLOCK_STATUS without a negotiated meta context.
    assert_eq!(refused(request::decode(&c, &request(wire::CMD_BLOCK_STATUS, 0, 0, 4096)).unwrap()).0, NbdError::Inval);
    let mut bad = request(wire::CMD_READ, 0, 0, 1);
    bad[0] ^= 0xff;
    assert!(matches!(request::decode(&c, &bad), Err(ProtocolViolation::BadMagic(_))));
}

#[test]
fn structured_error_only_for_read_and_block_status_when_negotiated() {
    let mut c = config(false);
    assert!(matches!(
        request::decode(&c, &request(wire::CMD_READ, 0, 1 << 20, 1)).unwrap(),
        Decoded::Refuse { structured_error: true, .. }
    ));
    assert!(matches!(
        request::decode(&c, &request(wire::CMD_TRIM, 0, 1 << 20, 1)).unwrap(),
        Decoded::Refuse { structured_error: false, .. }
    ));
    c.structured_replies = false;
    assert!(matches!(
        request::decode(&c, &request(wire::CMD_READ, 0, 1 << 20, 1)).unwrap(),
        Decoded::Refuse { structured_error: false, .. }
    ));
}

#[test]
fn random_request_headers_never_panic_and_stay_in_range() {
    let mut rng = Rng::new(7);
    for i in 0..200_000u32 {
        let mut header = [0u8; wire::REQUEST_HEADER_BYTES];
        for b in header.iter_mut() {
            *b = rng.next() as u8;
        }
        if i % 4 != 0 {
            header[..4].copy_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
            header[6..8].copy_from_slice(&((rng.next() % 10) as u16).to_be_bytes());
        }
        let c = TransmissionConfig {
            size_bytes: rng.next() % (1 << 40),
            read_only: i % 3 == 0,
            structured_replies: i % 2 == 0,
            base_allocation: i % 5 == 0,
        };
        if let Ok(Decoded::Execute(req)) = request::decode(&c, &header) {
            let (offset, len) = match req.command {
                Command::Read { offset, len }
                | Command::Write { offset, len, .. }
                | Command::Trim { offset, len, .. } => (offset, len),
                Command::WriteZeroes { offset, len, .. } | Command::BlockStatus { offset, len, .. } => (offset, len),
                Command::Flush | Command::Cache | Command::Disconnect => (0, 0),
            };
            assert!(offset + u64::from(len) <= c.size_bytes);
            assert!(
                !c.read_only
                    || !matches!(
                        req.command,
                        Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
                    )
            );
        }
    }
}

#[test]
fn fuzz_entry_points_survive_random_input() {
    for seed in 0..3000u64 {
        let mut rng = Rng::new(seed);
        let len = (rng.next() % 600) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Seed some structure so the fuzzers' deeper paths are reached here too.
        if len > 24 && seed % 2 == 0 {
            data[1..5].copy_from_slice(&3u32.to_be_bytes());
            data[5..13].copy_from_slice(&wire::IHAVEOPT.to_be_bytes());
            data[13..17].copy_from_slice(&((seed % 11) as u32).to_be_bytes());
            data[17..21].copy_from_slice(&((seed % 7) as u32).to_be_bytes());
        }
        super::fuzz::handshake(&data);
        if len > 29 {
            data[1..5].copy_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
        }
        super::fuzz::requests(&data);
    }
}
