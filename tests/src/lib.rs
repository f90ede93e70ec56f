//! End-to-end test harness for the `replicator` binary: scratch directories,
//! volumes, a supervised `replicator serve`, a raw NBD client for protocol
//! abuse, a throwaway PKI, and helpers to run external tools (nbdinfo,
//! nbdcopy, qemu-img, fio, ...) with readable failures. The tests live in
//! `tests/tests/*.rs`.

pub mod blocks;
pub mod cluster;
pub mod lazyfs;
pub mod mta;
pub mod mta_pair;
pub mod nbd;
pub mod netns;
pub mod pair;
pub mod server;
pub mod tls;
pub mod util;
pub mod vm;

pub use server::{io_counter, nbdkit, replicator, replicator_bin, status_json, Daemon, Server, Volume};
pub use util::{
    assert_same_bytes, cmd, have_root, have_tools, in_ci, is_root, random_bytes, run, run_fail, run_output,
    run_timeout, skip, wait_until, Guard, Output, TestDir,
};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
