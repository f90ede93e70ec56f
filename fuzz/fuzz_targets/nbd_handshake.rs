#![no_main]
//! The NBD handshake (option haggling) against arbitrary client bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replicator::nbd::fuzz::handshake(data));
