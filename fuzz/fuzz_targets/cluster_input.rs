#![no_main]
//! clusterd's parsers with hostile bytes: heartbeat datagrams into the
//! heartbeat core, raft message bodies, the log's state file, cluster log
//! entries and snapshots, admin request lines.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clusterd::fuzz::input(data));
