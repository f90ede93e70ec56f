//! WriteZeroes: the cheapest way the store allows to make a range read as
//! zeros, as a small state machine driven by CQEs.
//!
//! Order of attempts: punch a hole (if the client allows deallocation), then
//! fallocate ZERO_RANGE, then — unless the client asked for fast zeroing
//! only — plain writes from a shared zero buffer, then fdatasync for FUA.
//! EOPNOTSUPP disables a fallocate mode for the whole backing; EINVAL (e.g.
//! a range unaligned for a block device) only skips it for this request.

use std::sync::atomic::Ordering;

use io_uring::squeue::Entry;

use super::buf::AlignedBuf;
use super::ops::{disable, fallocate_sqe, flush_sqe, transferred, unsupported, write_sqe, Env, IoResult, Step};
use super::shared::Shared;
use super::{IoFailure, IoOutput};

/// Size of the shared zero buffer and so the largest zero-write.
pub(super) const ZERO_CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    PunchHole,
    ZeroRange,
    /// Writing zeros; `done` bytes of the range are written.
    Write {
        done: u32,
    },
    Sync,
}

pub(super) struct ZeroOp {
    offset: u64,
    len: u32,
    may_trim: bool,
    fast_only: bool,
    fua: bool,
    stage: Stage,
}

impl ZeroOp {
    /// The first stage worth trying, or the answer when none needs the ring.
    pub(super) fn begin(
        offset: u64,
        len: u32,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
        shared: &Shared,
    ) -> Result<ZeroOp, IoResult> {
        let mut op = ZeroOp { offset, len, may_trim, fast_only, fua, stage: Stage::PunchHole };
        if len == 0 {
            // Nothing to zero, but FUA still promises durability.
            return if fua {
                op.stage = Stage::Sync;
                Ok(op)
            } else {
                Err(Ok(IoOutput::Done))
            };
        }
        match op.first_stage_from(Stage::PunchHole, shared) {
            Ok(stage) => {
                op.stage = stage;
                Ok(op)
            }
            Err(failure) => Err(Err(failure)),
        }
    }

    /// The first stage at or after `from` that may work, skipping fallocate
    /// modes known not to.
    fn first_stage_from(&self, from: Stage, shared: &Shared) -> Result<Stage, IoFailure> {
        if from == Stage::PunchHole && self.may_trim && shared.trim_ok.load(Ordering::Relaxed) {
            return Ok(Stage::PunchHole);
        }
        if matches!(from, Stage::PunchHole | Stage::ZeroRange) && shared.zero_range_ok.load(Ordering::Relaxed) {
            return Ok(Stage::ZeroRange);
        }
        if self.fast_only {
            return Err(IoFailure::NotSupported);
        }
        Ok(Stage::Write { done: 0 })
    }

    pub(super) fn sqe(&mut self, env: &mut Env<'_>) -> Entry {
        match self.stage {
            Stage::PunchHole => fallocate_sqe(env.shared, self.offset, self.len, libc::FALLOC_FL_PUNCH_HOLE),
            Stage::ZeroRange => fallocate_sqe(env.shared, self.offset, self.len, libc::FALLOC_FL_ZERO_RANGE),
            Stage::Write { done } => {
                let zeros = env.zero_buf.get_or_insert_with(|| AlignedBuf::zeroed(ZERO_CHUNK));
                let chunk = (self.len - done).min(ZERO_CHUNK as u32) as usize;
                write_sqe(env.shared, self.offset + u64::from(done), &zeros[..chunk], false, false)
            }
            Stage::Sync => flush_sqe(env.shared),
        }
    }

    pub(super) fn advance(&mut self, res: i32, env: &mut Env<'_>) -> Step {
        // Ok(Some(stage)): submit that stage next; Ok(None): all done.
        let next: Result<Option<Stage>, IoFailure> = match self.stage {
            Stage::PunchHole | Stage::ZeroRange if res >= 0 => Ok(self.after_zeroing()),
            Stage::PunchHole | Stage::ZeroRange if unsupported(res) || res == -libc::EINVAL => {
                let punch = self.stage == Stage::PunchHole;
                if unsupported(res) {
                    let (flag, what) = if punch {
                        (&env.shared.trim_ok, "punch hole")
                    } else {
                        (&env.shared.zero_range_ok, "zero range")
                    };
                    disable(flag, what);
                }
                let from = if punch { Stage::ZeroRange } else { Stage::Write { done: 0 } };
                self.first_stage_from(from, env.shared).map(Some)
            }
            Stage::PunchHole | Stage::ZeroRange => Err(IoFailure::Errno(-res)),
            Stage::Write { done } => match transferred(res) {
                // A write that makes no progress would loop forever.
                Ok(0) => Err(IoFailure::Errno(libc::EIO)),
                Ok(n) => {
                    let done = done + n;
                    assert!(done <= self.len, "zero-write past the range");
                    if done == self.len {
                        Ok(self.after_zeroing())
                    } else {
                        Ok(Some(Stage::Write { done }))
                    }
                }
                Err(failure) => Err(failure),
            },
            Stage::Sync => transferred(res).map(|_| None),
        };
        match next {
            Ok(Some(stage)) => {
                self.stage = stage;
                Step::Submit(self.sqe(env))
            }
            Ok(None) => Step::Finish(Ok(IoOutput::Done)),
            Err(failure) => Step::Finish(Err(failure)),
        }
    }

    /// The range reads as zeros; FUA still needs the data durable.
    fn after_zeroing(&self) -> Option<Stage> {
        self.fua.then_some(Stage::Sync)
    }
}
