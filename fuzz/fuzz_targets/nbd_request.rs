#![no_main]
//! NBD transmission request decoding against arbitrary client bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replicator::nbd::fuzz::requests(data));
