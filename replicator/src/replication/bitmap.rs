//! The in-memory dirty bitmap: one bit per `granularity` bytes of the
//! volume, set where this node's data may differ from the peer's.
//!
//! Setting is conservative (every granule a range touches), clearing is
//! exact (only granules a range covers completely), so a partial write can
//! never clear a bit for bytes it did not carry.

use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    size_bytes: u64,
    granularity_bytes: u64,
    bits: u64,
    words: Vec<u64>,
    set: u64,
}

impl Bitmap {
    pub fn new(size_bytes: u64, granularity_bytes: u32) -> Bitmap {
        assert!(granularity_bytes.is_power_of_two(), "granularity must be a power of two");
        let granularity_bytes = u64::from(granularity_bytes);
        let bits = size_bytes.div_ceil(granularity_bytes);
        let words = vec![0; usize::try_from(bits.div_ceil(64)).expect("bitmap fits in memory")];
        Bitmap { size_bytes, granularity_bytes, bits, words, set: 0 }
    }

    /// Loads persisted words; bits past the end are ignored.
    pub fn from_words(size_bytes: u64, granularity_bytes: u32, words: &[u64]) -> Bitmap {
        let mut map = Bitmap::new(size_bytes, granularity_bytes);
        for (index, word) in words.iter().enumerate().take(map.words.len()) {
            map.merge_word(index as u64, *word);
        }
        map
    }

    pub fn granularity_bytes(&self) -> u64 {
        self.granularity_bytes
    }

    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.set * self.granularity_bytes
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn is_set(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Bits touched by a byte range.
    pub fn touched(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let end = (offset + len).div_ceil(self.granularity_bytes).min(self.bits);
        (offset / self.granularity_bytes).min(end)..end
    }

    /// Bits completely covered by a byte range.
    pub fn covered(&self, offset: u64, len: u64) -> Range<u64> {
        let start = offset.div_ceil(self.granularity_bytes);
        let end_byte = offset + len;
        // The last granule may be short (volume size not a multiple).
        let end = if end_byte >= self.size_bytes { self.bits } else { end_byte / self.granularity_bytes };
        start.min(end)..end
    }

    /// Byte range of a bit range, clipped to `size_bytes`.
    pub fn byte_range(&self, bits: Range<u64>, size_bytes: u64) -> Range<u64> {
        (bits.start * self.granularity_bytes).min(size_bytes)..(bits.end * self.granularity_bytes).min(size_bytes)
    }

    pub fn set_bytes(&mut self, offset: u64, len: u64) {
        let r = self.touched(offset, len);
        self.set_bits(r);
    }

    pub fn clear_covered_bytes(&mut self, offset: u64, len: u64) {
        let r = self.covered(offset, len);
        self.clear_bits(r);
    }

    pub fn set_bits(&mut self, bits: Range<u64>) {
        for bit in bits.start..bits.end.min(self.bits) {
            let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if self.words[w] & m == 0 {
                self.words[w] |= m;
                self.set += 1;
            }
        }
    }

    pub fn clear_bits(&mut self, bits: Range<u64>) {
        for bit in bits.start..bits.end.min(self.bits) {
            let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if self.words[w] & m != 0 {
                self.words[w] &= !m;
                self.set -= 1;
            }
        }
    }

    pub fn set_all(&mut self) {
        self.set_bits(0..self.bits);
    }

    pub fn clear_all(&mut self) {
        self.words.fill(0);
        self.set = 0;
    }

    /// ORs one word in; an index past the end or bits past the last granule
    /// are refused (a peer sent a bitmap for a different size).
    pub fn merge_word(&mut self, index: u64, word: u64) -> bool {
        let Some(slot) = usize::try_from(index).ok().and_then(|i| self.words.get_mut(i)) else { return false };
        let first_bit = index * 64;
        let valid = if self.bits - first_bit >= 64 { u64::MAX } else { (1u64 << (self.bits - first_bit)) - 1 };
        if word & !valid != 0 {
            return false;
        }
        let added = word & !*slot;
        *slot |= word;
        self.set += u64::from(added.count_ones());
        true
    }

    /// Nonzero words as (index, word), for sending.
    pub fn nonzero_words(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.words.iter().enumerate().filter(|(_, w)| **w != 0).map(|(i, w)| (i as u64, *w))
    }

    /// The first run of set bits at or after `from`, at most `max_bits` long.
    pub fn next_run(&self, from: u64, max_bits: u64) -> Option<Range<u64>> {
        let mut bit = from;
        while bit < self.bits {
            let w = self.words[(bit / 64) as usize] >> (bit % 64);
            if w == 0 {
                bit = (bit / 64 + 1) * 64;
                continue;
            }
            bit += u64::from(w.trailing_zeros());
            break;
        }
        if bit >= self.bits {
            return None;
        }
        let start = bit;
        while bit < self.bits && bit - start < max_bits && self.is_set(bit) {
            bit += 1;
        }
        Some(start..bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writes_set_but_never_clear_a_granule() {
        let mut b = Bitmap::new(10 * 4096 + 100, 4096);
        assert_eq!(b.bits(), 11);
        b.set_bytes(4000, 200);
        assert_eq!(b.count(), 2);
        b.clear_covered_bytes(4096, 100);
        assert_eq!(b.count(), 2, "a partial granule stays dirty");
        b.clear_covered_bytes(4096, 4096);
        assert!(!b.is_set(1) && b.is_set(0));
        // The short last granule is covered by a write reaching the end.
        b.set_bytes(10 * 4096, 100);
        b.clear_covered_bytes(10 * 4096, 100);
        assert!(!b.is_set(10));
    }

    #[test]
    fn runs_and_merge() {
        let mut b = Bitmap::new(1 << 20, 4096);
        b.set_bits(3..7);
        b.set_bits(70..72);
        assert_eq!(b.next_run(0, 100), Some(3..7));
        assert_eq!(b.next_run(5, 100), Some(5..7));
        assert_eq!(b.next_run(7, 1), Some(70..71));
        assert_eq!(b.next_run(72, 100), None);
        let mut c = Bitmap::new(1 << 20, 4096);
        for (i, w) in b.nonzero_words() {
            assert!(c.merge_word(i, w));
        }
        assert_eq!(c, b);
        assert!(!c.merge_word(4, 1), "past the end");
        let mut short = Bitmap::new(4096 * 65, 4096);
        assert!(!short.merge_word(1, 0b10), "bit past the last granule");
        assert!(short.merge_word(1, 0b1));
    }
}
