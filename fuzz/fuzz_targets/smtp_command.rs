#![no_main]
//! SMTP command lines through the parser.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mta::smtp::fuzz::commands(data));
