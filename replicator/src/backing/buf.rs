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

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::{self, NonNull};

/// Alignment of every [`AlignedBuf`], in bytes.
pub const BUF_ALIGN: usize = 4096;

/// A heap buffer whose first byte is aligned to [`BUF_ALIGN`] (for O_DIRECT).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
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
        Self { ptr: NonNull::new(dangling).unwrap_or(NonNull::dangling()), len: 0 }
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self::new();
        }
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (len > 0) and a valid
        // power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        match NonNull::new(raw) {
            Some(ptr) => Self { ptr, len },
            None => alloc::handle_alloc_error(layout),
        }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        if bytes.is_empty() {
            return Self::new();
        }
        let layout = Self::layout(bytes.len());
        // SAFETY: `layout` has a non-zero size and a valid alignment.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        // SAFETY: the fresh allocation is `bytes.len()` bytes long, so the
        // copy stays in bounds, and it cannot overlap the borrowed `bytes`.
        // After the copy every byte is initialised.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.as_ptr(), bytes.len()) };
        Self { ptr, len: bytes.len() }
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
        if self.len != 0 {
            // SAFETY: a non-empty buffer was allocated by the global
            // allocator with exactly this layout and is freed only here.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is non-null and valid for `len` initialised bytes
        // (zeroed or copied at construction, or written by the kernel, which
        // only happens while the engine alone owns the buffer); for len == 0
        // a dangling aligned pointer is allowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
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
}
