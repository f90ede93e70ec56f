//! Source-side resync and online verify: which blocks to handle next, how
//! fast, and progress.
//!
//! [`Resync`] walks the dirty bitmap in runs of at most `chunk` bytes,
//! keeps `inflight_max` bytes in flight and paces itself with a token
//! bucket: `rate_max` while the application is idle, `rate_min` while it
//! writes (so resync never starves it, and never stops either). A chunk is
//! cleared from the bitmap only when the target acknowledged writing it (or
//! reported an equal checksum).
//!
//! [`Verify`] walks the whole volume comparing checksums.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use super::bitmap::Bitmap;

/// Progress of a resync or verify, for `status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Progress {
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
}

/// Writes within this window count as "the application is busy".
const APP_BUSY_WINDOW_MS: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// The target's checksum differed: the data must be read and sent, as
    /// soon as no application write to the range is in flight here.
    WantData,
    /// Reading the block (to send it, or its checksum).
    Reading,
    /// Sent; waiting for the target's answer.
    Sent,
}

#[derive(Debug)]
struct Chunk {
    bits: Range<u64>,
    bytes: Range<u64>,
    stage: Stage,
    /// Checksum sent first; data not yet.
    csum: bool,
    /// The range was marked dirty again after it was read (a write failed
    /// on one side): the target's ack must not clear it.
    stale: bool,
}

#[derive(Debug)]
pub(super) struct Resync {
    chunk_bits: u64,
    inflight_max: u64,
    rate_min: u64,
    rate_max: u64,
    checksums: bool,
    cursor: u64,
    /// By seq.
    chunks: HashMap<u64, Chunk>,
    inflight_bytes: u64,
    tokens: u64,
    last_refill_ms: u64,
    started_ms: u64,
    total_bits: u64,
    sent_bytes: u64,
    /// When pacing, the time enough tokens will have accrued.
    wake_ms: Option<u64>,
}

pub(super) struct ResyncStep {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub checksum_first: bool,
}

impl Resync {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bitmap: &Bitmap,
        chunk_bytes: u32,
        inflight_max: u64,
        rate_min: u64,
        rate_max: u64,
        checksums: bool,
        now_ms: u64,
    ) -> Resync {
        let chunk_bits = (u64::from(chunk_bytes) / bitmap.granularity_bytes()).max(1);
        Resync {
            chunk_bits,
            inflight_max: inflight_max.max(u64::from(chunk_bytes)),
            rate_min: rate_min.max(1),
            rate_max: rate_max.max(rate_min).max(1),
            checksums,
            cursor: 0,
            chunks: HashMap::new(),
            inflight_bytes: 0,
            tokens: u64::from(chunk_bytes),
            last_refill_ms: now_ms,
            started_ms: now_ms,
            total_bits: bitmap.count(),
            sent_bytes: 0,
            wake_ms: None,
        }
    }

    pub fn wake_at(&self) -> Option<u64> {
        self.wake_ms
    }

    pub fn is_idle(&self) -> bool {
        self.chunks.is_empty()
    }

    /// A chunk being read overlaps the byte range.
    pub fn reading_overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        self.chunks.values().any(|c| c.stage == Stage::Reading && c.bytes.start < end && offset < c.bytes.end)
    }

    /// The next chunk to start, if pacing and the in-flight bound allow.
    /// `blocked(offset, len)`: an application write to the range is still
    /// in flight locally (the read would race it); such a chunk waits.
    pub fn next(
        &mut self,
        bitmap: &Bitmap,
        size_bytes: u64,
        now_ms: u64,
        last_app_write_ms: u64,
        seq: &mut dyn FnMut() -> u64,
        blocked: &dyn Fn(u64, u64) -> bool,
    ) -> Option<ResyncStep> {
        self.wake_ms = None;
        let busy = now_ms.saturating_sub(last_app_write_ms) < APP_BUSY_WINDOW_MS && last_app_write_ms != 0;
        let rate = if busy { self.rate_min } else { self.rate_max };
        let elapsed = now_ms.saturating_sub(self.last_refill_ms);
        let burst = (rate / 10).max(self.chunk_bits * bitmap.granularity_bytes());
        self.tokens = (self.tokens + rate.saturating_mul(elapsed) / 1000).min(burst);
        self.last_refill_ms = now_ms;
        if self.inflight_bytes >= self.inflight_max {
            return None;
        }
        let mut run = bitmap.next_run(self.cursor, self.chunk_bits);
        if run.is_none() && self.cursor > 0 {
            self.cursor = 0;
            run = bitmap.next_run(0, self.chunk_bits);
        }
        let bits = run?;
        if self.chunks.values().any(|c| c.bits.start < bits.end && bits.start < c.bits.end) {
            // Already in flight (the cursor wrapped onto it): wait for it.
            return None;
        }
        let bytes = bitmap.byte_range(bits.clone(), size_bytes);
        let len = bytes.end - bytes.start;
        if blocked(bytes.start, len) {
            return None;
        }
        if self.tokens < len {
            let deficit = len - self.tokens;
            self.wake_ms = Some(now_ms + (deficit * 1000).div_ceil(rate).max(1));
            return None;
        }
        self.tokens -= len;
        self.cursor = bits.end;
        self.inflight_bytes += len;
        let s = seq();
        let step = ResyncStep {
            seq: s,
            offset: bytes.start,
            len: u32::try_from(len).expect("chunks are small"),
            checksum_first: self.checksums,
        };
        self.chunks.insert(s, Chunk { bits, bytes, stage: Stage::Reading, csum: self.checksums, stale: false });
        Some(step)
    }

    /// The read (data or checksum) for `seq` finished; it is being sent.
    pub fn sent(&mut self, seq: u64, data_bytes: u64) {
        if let Some(c) = self.chunks.get_mut(&seq) {
            c.stage = Stage::Sent;
            self.sent_bytes += data_bytes;
        }
    }

    /// The target answered a checksum: differs, so the data must follow
    /// (see [`Self::next_data_read`]).
    pub fn needs_data(&mut self, seq: u64) {
        if let Some(c) = self.chunks.get_mut(&seq) {
            c.stage = Stage::WantData;
            c.csum = false;
        }
    }

    /// A chunk whose data may be read now: none of `blocked`'s writes
    /// overlap it (a read racing a local write could send stale data after
    /// the write's own replication).
    pub fn next_data_read(&mut self, blocked: &dyn Fn(u64, u64) -> bool) -> Option<(u64, u64, u32)> {
        let (seq, c) = self
            .chunks
            .iter_mut()
            .find(|(_, c)| c.stage == Stage::WantData && !blocked(c.bytes.start, c.bytes.end - c.bytes.start))?;
        c.stage = Stage::Reading;
        Some((*seq, c.bytes.start, u32::try_from(c.bytes.end - c.bytes.start).ok()?))
    }

    pub fn range(&self, seq: u64) -> Option<(u64, u32)> {
        let c = self.chunks.get(&seq)?;
        Some((c.bytes.start, u32::try_from(c.bytes.end - c.bytes.start).ok()?))
    }

    /// The chunk is done (written or equal): its bits may be cleared,
    /// unless it went stale meanwhile.
    pub fn finished(&mut self, seq: u64) -> Option<Range<u64>> {
        let c = self.chunks.remove(&seq)?;
        self.inflight_bytes -= c.bytes.end - c.bytes.start;
        (!c.stale).then_some(c.bits)
    }

    /// Bytes in the range were marked dirty again: in-flight chunks covering
    /// them no longer prove the target in sync.
    pub fn invalidate(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        for c in self.chunks.values_mut() {
            if c.bytes.start < end && offset < c.bytes.end {
                c.stale = true;
            }
        }
    }

    /// The chunk failed (read error here, write error there): it stays dirty.
    pub fn abandon(&mut self, seq: u64) {
        if let Some(c) = self.chunks.remove(&seq) {
            self.inflight_bytes -= c.bytes.end - c.bytes.start;
        }
    }

    pub fn is_checksum_stage(&self, seq: u64) -> bool {
        self.chunks.get(&seq).is_some_and(|c| c.csum)
    }

    pub fn progress(&self, bitmap: &Bitmap, now_ms: u64) -> Progress {
        let g = bitmap.granularity_bytes();
        let total = self.total_bits.max(bitmap.count()) * g;
        let left = bitmap.count() * g;
        let done = total - left;
        let elapsed_ms = now_ms.saturating_sub(self.started_ms).max(1);
        let rate = self.sent_bytes * 1000 / elapsed_ms;
        Progress {
            total_bytes: total,
            done_bytes: done,
            percent: if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
            rate_bytes_per_sec: rate,
            eta_secs: (rate > 0).then(|| left / rate),
        }
    }
}

#[derive(Debug)]
pub(super) struct Verify {
    chunk_bytes: u64,
    /// A chunk that differs is checked again in pieces of this size (the
    /// bitmap's granularity), so only the granules that differ are resent.
    granule_bytes: u64,
    cursor: u64,
    size_bytes: u64,
    /// seq → (offset, length, a refining piece).
    inflight: HashMap<u64, (u64, u32, bool)>,
    refine: VecDeque<(u64, u32)>,
    inflight_max: usize,
    started_ms: u64,
    pub out_of_sync_bytes: u64,
}

impl Verify {
    pub fn new(size_bytes: u64, chunk_bytes: u32, granule_bytes: u32, now_ms: u64) -> Verify {
        Verify {
            chunk_bytes: u64::from(chunk_bytes),
            granule_bytes: u64::from(granule_bytes.clamp(1, chunk_bytes.max(1))),
            cursor: 0,
            size_bytes,
            inflight: HashMap::new(),
            refine: VecDeque::new(),
            inflight_max: 8,
            started_ms: now_ms,
            out_of_sync_bytes: 0,
        }
    }

    pub fn next(&mut self, seq: &mut dyn FnMut() -> u64) -> Option<(u64, u64, u32)> {
        if self.inflight.len() >= self.inflight_max {
            return None;
        }
        if let Some((offset, len)) = self.refine.pop_front() {
            let s = seq();
            self.inflight.insert(s, (offset, len, true));
            return Some((s, offset, len));
        }
        if self.cursor >= self.size_bytes {
            return None;
        }
        let len = self.chunk_bytes.min(self.size_bytes - self.cursor);
        let offset = self.cursor;
        self.cursor += len;
        let s = seq();
        let len = u32::try_from(len).expect("verify chunks are small");
        self.inflight.insert(s, (offset, len, false));
        Some((s, offset, len))
    }

    pub fn range(&self, seq: u64) -> Option<(u64, u32)> {
        self.inflight.get(&seq).map(|(o, l, _)| (*o, *l))
    }

    pub fn take(&mut self, seq: u64) -> Option<(u64, u32)> {
        self.inflight.remove(&seq).map(|(o, l, _)| (o, l))
    }

    /// The range's checksums differ. A range larger than a granule is
    /// queued again in granules (true: nothing to mark yet); a granule is
    /// out of sync (false: mark it).
    pub fn differs(&mut self, offset: u64, len: u32) -> bool {
        if u64::from(len) <= self.granule_bytes {
            return false;
        }
        let end = offset + u64::from(len);
        let mut o = offset;
        while o < end {
            let l = self.granule_bytes.min(end - o);
            self.refine.push_back((o, l as u32));
            o += l;
        }
        true
    }

    pub fn is_done(&self) -> bool {
        self.cursor >= self.size_bytes && self.inflight.is_empty() && self.refine.is_empty()
    }

    pub fn progress(&self, now_ms: u64) -> Progress {
        let pending: u64 = self.inflight.values().filter(|(_, _, refine)| !refine).map(|(_, l, _)| u64::from(*l)).sum();
        let done = self.cursor.saturating_sub(pending);
        let elapsed_ms = now_ms.saturating_sub(self.started_ms).max(1);
        let rate = done * 1000 / elapsed_ms;
        Progress {
            total_bytes: self.size_bytes,
            done_bytes: done,
            percent: if self.size_bytes == 0 { 100.0 } else { done as f64 * 100.0 / self.size_bytes as f64 },
            rate_bytes_per_sec: rate,
            eta_secs: (rate > 0).then(|| (self.size_bytes - done) / rate),
        }
    }
}

#[cfg(test)]
mod verify_tests {
    use super::Verify;

    /// Issue 19: one bad 4 KiB block used to resend its whole 1 MiB chunk.
    #[test]
    fn a_differing_chunk_is_checked_again_granule_by_granule() {
        let mut v = Verify::new(2 << 20, 1 << 20, 4096, 0);
        let mut n = 0;
        let mut seq = || {
            n += 1;
            n
        };
        let (s1, o1, l1) = v.next(&mut seq).expect("first chunk");
        assert_eq!((o1, l1), (0, 1 << 20));
        v.take(s1);
        assert!(v.differs(o1, l1), "a whole chunk is refined, not marked");
        let probes: Vec<(u64, u64, u32)> = std::iter::from_fn(|| v.next(&mut seq)).collect();
        assert_eq!(probes.len(), 8, "bounded in flight");
        assert!(probes.iter().all(|(_, _, l)| *l == 4096), "granule-sized probes first");
        assert!(!v.differs(probes[3].1, probes[3].2), "a granule that differs is marked");
        for (s, _, _) in &probes {
            v.take(*s);
        }
        let mut rest = 0;
        while let Some((s, _, l)) = v.next(&mut seq) {
            rest += u64::from(l);
            v.take(s);
        }
        assert_eq!(rest, (1 << 20) - 8 * 4096 + (1 << 20), "the remaining granules, then the second chunk");
        assert!(v.is_done());
        assert_eq!(v.progress(1).done_bytes, 2 << 20);
    }
}
