//! [`AlignedBuf`]: the heap buffer every read and write travels in.
//!
//! O_DIRECT needs the memory address aligned to the device's logical block
//! size; aligning every buffer to 4096 bytes satisfies any device we meet and
//! costs nothing extra for the common 4 KiB request.
//!
//! The buffer is a raw allocation (not a `Box<[u8]>`) on purpose: while the
//! kernel owns the bytes of an in-flight operation, the engine moves the
//! owning struct around, and a raw pointer carries no uniqueness claim that
//! such a move could assert.
//!
//! Allocations come in power-of-two size classes and are recycled through a
//! bounded pool: a fresh 1 MiB allocation is an mmap, 256 page faults and
//! the zeroing of every page, which dominated large-request profiles.
//! Recycled memory is always initialised (every allocation starts zeroed),
//! so [`AlignedBuf::for_overwrite`] can skip clearing it when the caller
//! overwrites every byte anyway.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};

/// Alignment of every [`AlignedBuf`], in bytes.
pub const BUF_ALIGN: usize = 4096;

/// Smallest allocation class (log2 bytes).
const CLASS_MIN_SHIFT: u32 = 12;
/// Largest pooled class (log2 bytes); larger buffers are freed on drop.
const CLASS_POOLED_MAX_SHIFT: u32 = 24;
/// Bytes each class may keep in the pool.
const POOL_CLASS_BYTES_MAX: usize = 16 * 1024 * 1024;
const CLASSES: usize = (CLASS_POOLED_MAX_SHIFT - CLASS_MIN_SHIFT + 1) as usize;

/// A pooled allocation; only ever touched under the pool's lock.
struct FreeBlock(NonNull<u8>);

// SAFETY: a `FreeBlock` is the sole owner of an allocation nobody else
// references (it was taken from a dropped `AlignedBuf`).
unsafe impl Send for FreeBlock {}

static POOL: [Mutex<Vec<FreeBlock>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];

/// The allocation size for `len` bytes: a power of two of at least 4 KiB.
fn class_bytes(len: usize) -> usize {
    len.max(1 << CLASS_MIN_SHIFT).next_power_of_two()
}

fn pool_index(cap: usize) -> Option<usize> {
    let shift = cap.trailing_zeros();
    (cap.is_power_of_two() && (CLASS_MIN_SHIFT..=CLASS_POOLED_MAX_SHIFT).contains(&shift))
        .then(|| (shift - CLASS_MIN_SHIFT) as usize)
}

/// A heap buffer whose first byte is aligned to [`BUF_ALIGN`] (for O_DIRECT).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Allocation size (a size class); 0 for the empty buffer.
    cap: usize,
}

// SAFETY: an `AlignedBuf` uniquely owns its allocation, exactly like a
// `Box<[u8]>`; no other handle to the bytes exists, so moving it to another
// thread or sharing `&AlignedBuf` (which only hands out `&[u8]`) is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see the `Send` impl; `&AlignedBuf` only permits reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer; allocates nothing.
    pub fn new() -> Self {
        // A zero-length slice needs a non-null, aligned pointer but no
        // allocation; an address equal to the alignment is both.
        let dangling = ptr::without_provenance_mut::<u8>(BUF_ALIGN);
        Self { ptr: NonNull::new(dangling).unwrap_or(NonNull::dangling()), len: 0, cap: 0 }
    }

    /// A buffer of `len` initialised bytes with unspecified contents (stale
    /// data of an earlier buffer of this process), for callers that
    /// overwrite all of it: received payloads, file reads.
    pub fn for_overwrite(len: usize) -> Self {
        if len == 0 {
            return Self::new();
        }
        let cap = class_bytes(len);
        if let Some(index) = pool_index(cap) {
            let recycled = POOL[index].lock().unwrap_or_else(|p| p.into_inner()).pop();
            if let Some(FreeBlock(ptr)) = recycled {
                return Self { ptr, len, cap };
            }
        }
        let layout = Self::layout(cap);
        // SAFETY: `layout` has a non-zero size (cap >= 4096) and a valid
        // power-of-two alignment. Zeroing makes every byte initialised for
        // the allocation's whole life, recycled or not.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        match NonNull::new(raw) {
            Some(ptr) => Self { ptr, len, cap },
            None => alloc::handle_alloc_error(layout),
        }
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut buf = Self::for_overwrite(len);
        buf.fill(0);
        buf
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = Self::for_overwrite(bytes.len());
        buf.copy_from_slice(bytes);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, BUF_ALIGN) {
            Ok(layout) => layout,
            // Only lengths near isize::MAX get here; no request can be that big.
            Err(_) => panic!("AlignedBuf of {len} bytes exceeds the address space"),
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        if let Some(index) = pool_index(self.cap) {
            let mut free = POOL[index].lock().unwrap_or_else(|p| p.into_inner());
            if free.len() * self.cap < POOL_CLASS_BYTES_MAX {
                free.push(FreeBlock(self.ptr));
                return;
            }
        }
        // SAFETY: a non-empty buffer was allocated by the global allocator
        // with exactly this layout (its class size) and is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is non-null and valid for `len <= cap` initialised
        // bytes (every allocation is zeroed when made and afterwards only
        // written, by us or by the kernel while the engine alone owns the
        // buffer); for len == 0 a dangling aligned pointer is allowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for AlignedBuf {}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes themselves are rarely useful in logs and can be huge.
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

/// The bytes a write takes from the caller: a buffer it owns, or one it
/// shares read-only with others (a replicated write's payload goes to the
/// local disk and, without a copy, to the link). The engine only reads
/// from it, and keeps its share until the write completed, so the memory
/// the kernel reads stays allocated and unchanged: every holder of an
/// `Arc<AlignedBuf>` sees only `&[u8]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteBuf {
    Owned(AlignedBuf),
    Shared(Arc<AlignedBuf>),
}

impl WriteBuf {
    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        WriteBuf::Owned(AlignedBuf::from_slice(bytes))
    }
}

impl Default for WriteBuf {
    fn default() -> Self {
        WriteBuf::Owned(AlignedBuf::new())
    }
}

impl From<AlignedBuf> for WriteBuf {
    fn from(buf: AlignedBuf) -> Self {
        WriteBuf::Owned(buf)
    }
}

impl From<Arc<AlignedBuf>> for WriteBuf {
    fn from(buf: Arc<AlignedBuf>) -> Self {
        WriteBuf::Shared(buf)
    }
}

impl Deref for WriteBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            WriteBuf::Owned(buf) => buf,
            WriteBuf::Shared(buf) => buf,
        }
    }
}

impl AsRef<[u8]> for WriteBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_buffers_are_aligned_and_usable() {
        for buf in [AlignedBuf::new(), AlignedBuf::zeroed(0), AlignedBuf::from_slice(&[])] {
            assert!(buf.is_empty());
            assert_eq!(buf.len(), 0);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
            assert_eq!(&buf[..], &[] as &[u8]);
            assert_eq!(buf.clone(), buf);
        }
    }

    #[test]
    fn buffers_are_aligned_and_hold_their_bytes() {
        let zero = AlignedBuf::zeroed(10_000);
        assert_eq!(zero.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(zero.iter().all(|&b| b == 0));

        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut copy = AlignedBuf::from_slice(&data);
        assert_eq!(copy.as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!(&copy[..], &data[..]);
        copy[0] = 0xFF;
        assert_ne!(&copy[..], &data[..]);
        assert_eq!(format!("{copy:?}"), "AlignedBuf { len: 5000 }");
    }

    #[test]
    fn dropped_buffers_are_recycled_and_zeroed_when_asked() {
        // A class no other test uses, so the pool's state is ours.
        let len = (8 << 20) + 1;
        let mut first = AlignedBuf::zeroed(len);
        first.fill(0xAB);
        let addr = first.as_ptr() as usize;
        drop(first);
        let stale = AlignedBuf::for_overwrite(len);
        assert_eq!(stale.as_ptr() as usize, addr, "the freed block is reused");
        assert_eq!(stale.len(), len);
        assert!(stale.iter().all(|&b| b == 0xAB), "for_overwrite does not clear");
        drop(stale);
        let zero = AlignedBuf::zeroed(len);
        assert!(zero.iter().all(|&b| b == 0));
        assert_eq!(zero.as_ptr() as usize % BUF_ALIGN, 0);
    }
}
