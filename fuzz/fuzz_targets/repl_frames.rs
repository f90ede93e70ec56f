#![no_main]
//! Replication frames from a hostile or broken peer, decoded and fed to the
//! replica core.
libfuzzer_sys::fuzz_target!(|data: &[u8]| replicator::replication::fuzz::frames(data));
