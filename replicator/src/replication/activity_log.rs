//! The activity log, in memory: the set of "hot" extents a primary may be
//! writing. Before a write touches an extent outside the set, the new set is
//! made durable (an [`AlChange`]); so after a primary crash only the logged
//! extents can differ from the peer, and only they are resynced.
//!
//! An extent leaves the set only when no write to it is in flight, and only
//! after the bitmap has been persisted (bits set for it while disconnected
//! must survive its eviction).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

#[derive(Debug)]
pub struct ActivityLog {
    extent_bytes: u64,
    max: usize,
    /// Extent → last use (a logical clock) for LRU eviction.
    active: BTreeMap<u32, u64>,
    inflight: BTreeMap<u32, u32>,
    clock: u64,
}

/// Every logged extent has a write in flight: retry after a completion.
#[derive(Debug, PartialEq, Eq)]
pub struct AlFull;

/// The set changed: persist `extents` (bitmap first if `evicted`) before
/// issuing the write.
#[derive(Debug, PartialEq, Eq)]
pub struct AlChange {
    pub extents: Vec<u32>,
    pub evicted: bool,
}

impl ActivityLog {
    pub fn new(extent_bytes: u32, max: u32, persisted: &[u32]) -> ActivityLog {
        let mut al = ActivityLog {
            extent_bytes: u64::from(extent_bytes),
            max: max.max(1) as usize,
            active: BTreeMap::new(),
            inflight: BTreeMap::new(),
            clock: 0,
        };
        for e in persisted {
            al.active.insert(*e, 0);
        }
        al
    }

    pub fn extents(&self, offset: u64, len: u64) -> RangeInclusive<u32> {
        let first = offset / self.extent_bytes;
        let last = (offset + len.max(1) - 1) / self.extent_bytes;
        (first as u32)..=(last as u32)
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    pub fn active(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.active.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Starts a write to `extents`. `Ok(None)`: already logged. `Ok(Some)`:
    /// the set changed and must be persisted first. `Err(AlFull)`: the log is
    /// full of extents with writes in flight; retry after a completion.
    pub fn begin(&mut self, extents: RangeInclusive<u32>) -> Result<Option<AlChange>, AlFull> {
        let missing: Vec<u32> = extents.clone().filter(|e| !self.active.contains_key(e)).collect();
        let mut evicted = false;
        if !missing.is_empty() {
            let room = self.max.saturating_sub(self.active.len());
            let need = missing.len().saturating_sub(room);
            if need > 0 {
                let mut idle: Vec<(u64, u32)> = self
                    .active
                    .iter()
                    .filter(|(e, _)| !self.inflight.contains_key(e) && !extents.contains(e))
                    .map(|(e, t)| (*t, *e))
                    .collect();
                if idle.len() < need {
                    return Err(AlFull);
                }
                idle.sort_unstable();
                for (_, e) in idle.into_iter().take(need) {
                    self.active.remove(&e);
                }
                evicted = true;
            }
        }
        self.clock += 1;
        for e in extents {
            self.active.insert(e, self.clock);
            *self.inflight.entry(e).or_insert(0) += 1;
        }
        Ok((!missing.is_empty()).then(|| AlChange { extents: self.active(), evicted }))
    }

    pub fn end(&mut self, extents: RangeInclusive<u32>) {
        for e in extents {
            match self.inflight.get_mut(&e) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    self.inflight.remove(&e);
                }
                None => debug_assert!(false, "activity log end without begin for extent {e}"),
            }
        }
    }

    /// Empties the log (clean demote/shutdown with nothing in flight).
    pub fn clear(&mut self) -> bool {
        if self.active.is_empty() || !self.inflight.is_empty() {
            return false;
        }
        self.active.clear();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_before_first_write_and_evicts_only_idle_extents() {
        let mut al = ActivityLog::new(4 << 20, 2, &[]);
        let a = al.extents(0, 4096);
        assert_eq!(al.begin(a.clone()), Ok(Some(AlChange { extents: vec![0], evicted: false })));
        assert_eq!(al.begin(a.clone()), Ok(None));
        let b = al.extents(4 << 20, 4096);
        assert_eq!(al.begin(b.clone()), Ok(Some(AlChange { extents: vec![0, 1], evicted: false })));
        let c = al.extents(8 << 20, 4096);
        assert_eq!(al.begin(c.clone()), Err(AlFull), "both extents busy");
        al.end(a.clone());
        al.end(a);
        assert_eq!(al.begin(c), Ok(Some(AlChange { extents: vec![1, 2], evicted: true })));
        assert_eq!(al.extents((4 << 20) - 1, 2), 0..=1);
    }
}
