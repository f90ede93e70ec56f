#![no_main]
//! A client byte stream through the SMTP session state machine.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mta::smtp::fuzz::session(data));
