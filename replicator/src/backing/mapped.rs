//! Large READ replies of hosted connections sent straight from a shared,
//! read-only mapping of the backing store: the kernel copies the cached
//! file pages into the socket once, where reading them into a buffer and
//! sending that copies them twice and costs an io-wq hop (BENCHMARKS.md,
//! 2026-12-07 afternoon).
//!
//! The process never dereferences a mapping. Its addresses only go to the
//! kernel as a send's source, so a concurrent write is no data race in this
//! program, and a page beyond a shrunken file fails that send with EFAULT
//! (the connection is dropped) instead of raising SIGBUS.
//!
//! Only ranges whose pages are all in the page cache (`mincore`) are sent
//! this way: a fault on a cold page inside the send would block the ring
//! thread on the disk. Everything else is read into a buffer as before.
//! The check is made when the request is processed and the kernel copies
//! the pages when the reply is sent, usually at once; a page evicted in
//! between (memory pressure while the reply waits behind others) is read
//! back inside the send: a stall of the ring thread, not an error.
//!
//! The data area is mapped in windows of [`WINDOW_BYTES`], at most
//! [`WINDOWS_MAX`] listed per I/O thread, so the cached pages this process
//! maps (which count in its RSS, and so in the OOM killer's choice) stay
//! near 1 GiB per thread, and their page tables near 2 MiB. The least
//! recently used window is dropped from the list when another is needed;
//! it stays mapped until no reply in flight points into it (replies in
//! flight are bounded by the connections' memory budget). A window is
//! listed only once it served a cached range, so cold reads do not push
//! out hot windows.

use std::fmt;
use std::os::unix::io::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use tracing::debug;

use crate::limits;

/// Size and alignment of one mapping.
pub(super) const WINDOW_BYTES: u64 = 128 << 20;
/// Windows each I/O thread keeps listed (see the module docs).
pub(super) const WINDOWS_MAX: usize = 8;

/// One mapped window of the data area.
struct Window {
    base: NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: a `Window` is an address range of this process's mapping; no
// code here reads or writes through it (only the kernel does, as a send's
// source), so moving or sharing it between threads cannot race.
unsafe impl Send for Window {}
// SAFETY: as for `Send`: shared references give no access to the bytes.
unsafe impl Sync for Window {}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is exactly the mapping `map_window`
        // created, and every `MappedRange` into it holds an `Arc` of this
        // window, so no send still points into it.
        if unsafe { libc::munmap(self.base.as_ptr(), self.len) } != 0 {
            debug!("munmap of a read window failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// A cached range of the backing store, to be sent by the kernel. It keeps
/// its window mapped; it offers no access to the bytes from this process.
pub struct MappedRange {
    window: Arc<Window>,
    /// Offset of the range inside its window.
    offset: usize,
    len: usize,
}

impl MappedRange {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte's address, for the kernel only (see the module docs).
    pub(in crate::backing) fn as_ptr(&self) -> *const u8 {
        // `offset + len` lies inside the window (checked in `range`), so
        // this is an address inside the mapping: no pointer arithmetic
        // past its end.
        self.window.base.as_ptr().cast::<u8>().wrapping_add(self.offset)
    }
}

impl fmt::Debug for MappedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedRange").field("offset_in_window", &self.offset).field("len", &self.len).finish()
    }
}

impl PartialEq for MappedRange {
    fn eq(&self, other: &MappedRange) -> bool {
        Arc::ptr_eq(&self.window, &other.window) && self.offset == other.offset && self.len == other.len
    }
}

impl Eq for MappedRange {}

/// One I/O thread's windows and its `mincore` scratch vector.
pub(super) struct MappedReads {
    /// The page-cache descriptor; owned by `Shared`, which outlives us.
    fd: RawFd,
    data_size: u64,
    /// Mapped windows by index, least recently used first.
    windows: Vec<(u64, Arc<Window>)>,
    /// One byte per page of the range being checked.
    residency: Vec<u8>,
    page: usize,
}

impl MappedReads {
    /// `None` when reads must not come from the page cache (O_DIRECT), or
    /// when `mincore` would not tell the truth about this file.
    pub(super) fn new(fd: RawFd, data_size: u64, direct_io: bool) -> Option<MappedReads> {
        if direct_io || data_size == 0 || !mincore_is_truthful(fd) {
            return None;
        }
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten()?;
        let page = usize::try_from(page).ok().filter(|p| p.is_power_of_two())?;
        Some(MappedReads { fd, data_size, windows: Vec::with_capacity(WINDOWS_MAX), residency: Vec::new(), page })
    }

    /// The range as a mapped body, if it is large, inside one window and
    /// entirely cached; `None` means "read it into a buffer".
    pub(super) fn range(&mut self, offset: u64, len: u32) -> Option<MappedRange> {
        let len = len as usize;
        let end = offset.checked_add(len as u64)?;
        if len <= limits::REPLY_COPY_BYTES_MAX || end > self.data_size {
            return None;
        }
        let index = offset / WINDOW_BYTES;
        if (end - 1) / WINDOW_BYTES != index {
            return None;
        }
        let listed = self.listed(index);
        let window = match &listed {
            Some(window) => Arc::clone(window),
            None => {
                let start = index * WINDOW_BYTES;
                let len = usize::try_from(WINDOW_BYTES.min(self.data_size - start)).ok()?;
                Arc::new(map_window(self.fd, start, len)?)
            }
        };
        let offset = usize::try_from(offset - index * WINDOW_BYTES).ok()?;
        if !self.resident(&window, offset, len) {
            // A new window stays unlisted (unmapped on return): cold reads
            // do not push out the windows that serve cached ones.
            return None;
        }
        if listed.is_none() {
            self.list(index, Arc::clone(&window));
        }
        Some(MappedRange { window, offset, len })
    }

    /// Listed window `index`, now the most recently used.
    fn listed(&mut self, index: u64) -> Option<Arc<Window>> {
        let at = self.windows.iter().position(|(i, _)| *i == index)?;
        let entry = self.windows.remove(at);
        let window = Arc::clone(&entry.1);
        self.windows.push(entry);
        Some(window)
    }

    /// Lists a window as the most recently used, dropping the least
    /// recently used one beyond [`WINDOWS_MAX`].
    fn list(&mut self, index: u64, window: Arc<Window>) {
        if self.windows.len() == WINDOWS_MAX {
            self.windows.remove(0);
        }
        self.windows.push((index, window));
    }

    /// Every page of `offset..offset+len` of `window` is in the page cache.
    fn resident(&mut self, window: &Window, offset: usize, len: usize) -> bool {
        let start = offset & !(self.page - 1);
        let span = offset + len - start;
        self.residency.clear();
        self.residency.resize(span.div_ceil(self.page), 0);
        let addr = window.base.as_ptr().cast::<u8>().wrapping_add(start).cast::<libc::c_void>();
        // SAFETY: `start` is page-aligned and `start + span` lies inside the
        // window's mapping (`range` checked `offset + len` against it);
        // `residency` has one byte per page of the span, as mincore writes.
        let rc = unsafe { libc::mincore(addr, span, self.residency.as_mut_ptr()) };
        rc == 0 && self.residency.iter().all(|b| b & 1 == 1)
    }

    #[cfg(test)]
    pub(super) fn windows_mapped(&self) -> usize {
        self.windows.len()
    }
}

/// `mincore` reports the page cache of a file only to a process that owns
/// it or may write it; to any other it says every page is resident (Linux
/// `can_do_mincore`), and a send would then fault cold pages in on the ring
/// thread. Effective write permission is asked through `/proc/self/fd`;
/// without an answer, the mapping is not used.
fn mincore_is_truthful(fd: RawFd) -> bool {
    use nix::unistd::{faccessat, geteuid, AccessFlags};
    let owner = nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_uid == geteuid().as_raw());
    let path = format!("/proc/self/fd/{fd}");
    let writable = faccessat(None, path.as_str(), AccessFlags::W_OK, nix::fcntl::AtFlags::AT_EACCESS).is_ok();
    if !(owner || writable) {
        debug!("large reads are not sent from a mapping: this process may not learn the file's cache residency");
    }
    owner || writable
}

/// Maps `len` bytes of the store from `start` (a multiple of the page size).
fn map_window(fd: RawFd, start: u64, len: usize) -> Option<Window> {
    let offset = libc::off_t::try_from(start).ok()?;
    // SAFETY: a new shared, read-only mapping at an address the kernel
    // chooses; it aliases no Rust object. The descriptor is open (owned by
    // `Shared`, which outlives every engine), and the mapping keeps its
    // own reference to the file.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, offset) };
    if base == libc::MAP_FAILED {
        debug!("cannot map a read window at {start}: {}", std::io::Error::last_os_error());
        return None;
    }
    Some(Window { base: NonNull::new(base)?, len })
}

#[cfg(test)]
mod tests {
    use std::os::unix::io::AsRawFd;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A file in /var/tmp, removed on drop.
    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A file of `bytes` written through the page cache (so cached), open
    /// for reading.
    fn cached_file(bytes: usize) -> (TempFile, std::fs::File) {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/var/tmp/mapped-{}-{n}.img", std::process::id()));
        let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, data).expect("write");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        (TempFile(path), file)
    }

    #[test]
    fn only_large_cached_ranges_inside_the_data_area_are_mapped() {
        let (_guard, file) = cached_file(4 << 20);
        let mut reads = MappedReads::new(file.as_raw_fd(), 3 << 20, false).expect("mappable");
        let range = reads.range(4096, 1 << 20).expect("a cached 1 MiB range");
        assert_eq!(range.len(), 1 << 20);
        // Unaligned offsets are fine: the residency check rounds to pages.
        assert!(reads.range(1000, 100_000).is_some());
        // Small reads are copied by the session; beyond the data area is
        // the metadata.
        assert!(reads.range(0, limits::REPLY_COPY_BYTES_MAX as u32).is_none());
        assert!(reads.range((3 << 20) - 65536, 131_072).is_none());
        assert!(reads.range(u64::MAX - 10, 100_000).is_none());
        assert_eq!(reads.windows_mapped(), 1);
    }

    #[test]
    fn direct_io_and_empty_stores_read_into_buffers() {
        let (_guard, file) = cached_file(4096);
        assert!(MappedReads::new(file.as_raw_fd(), 4096, true).is_none());
        assert!(MappedReads::new(file.as_raw_fd(), 0, false).is_none());
    }

    #[test]
    fn uncached_pages_are_not_mapped() {
        let (_guard, file) = cached_file(2 << 20);
        let mut reads = MappedReads::new(file.as_raw_fd(), 2 << 20, false).expect("mappable");
        assert!(reads.range(0, 1 << 20).is_some(), "just written, so cached");
        file.sync_all().expect("sync");
        let rc = nix::fcntl::posix_fadvise(file.as_raw_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        assert!(rc.is_ok());
        // DONTNEED drops clean, unmapped pages: the listed window has none
        // of its pages in its page tables (no send touched them).
        assert!(reads.range(0, 1 << 20).is_none(), "pages the cache dropped must be read, not mapped");
        assert_eq!(reads.windows_mapped(), 1);
        let mut fresh = MappedReads::new(file.as_raw_fd(), 2 << 20, false).expect("mappable");
        assert!(fresh.range(4096, 1 << 20).is_none());
        assert_eq!(fresh.windows_mapped(), 0, "a cold range lists no new window");
    }

    /// What the kernel sends from `range`, through a socket pair.
    fn sent_bytes(range: &MappedRange) -> Vec<u8> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (ours, theirs) =
            socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::empty()).expect("socketpair");
        let len = range.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; len];
            std::io::Read::read_exact(&mut std::fs::File::from(theirs), &mut got).expect("receive");
            got
        });
        let mut sent = 0;
        while sent < len {
            // SAFETY: the kernel reads the range (mapped while `range`
            // lives) as the send's source; this process reads none of it.
            let n = unsafe {
                libc::send(ours.as_raw_fd(), range.as_ptr().wrapping_add(sent).cast(), len - sent, libc::MSG_NOSIGNAL)
            };
            assert!(n > 0, "send from a mapping: {}", std::io::Error::last_os_error());
            sent += n as usize;
        }
        reader.join().expect("reader")
    }

    #[test]
    fn the_kernel_sends_the_files_bytes_from_any_window() {
        // Data at the start of window 1, at its very end (the end of an
        // unaligned data area), and across an unaligned offset.
        let data_size = WINDOW_BYTES + (3 << 20) + 1000;
        let (_guard, file) = cached_file(0);
        file.set_len(data_size + 4096).expect("extend");
        let data: Vec<u8> = (0..(3 << 20) + 1000).map(|i: usize| (i * 7 % 253) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&file, &data, WINDOW_BYTES).expect("write");
        let mut reads = MappedReads::new(file.as_raw_fd(), data_size, false).expect("mappable");
        for (at, len) in [(0usize, 1usize << 20), (1000, 100_000), (data.len() - (1 << 20), 1 << 20)] {
            let range = reads.range(WINDOW_BYTES + at as u64, len as u32).expect("cached");
            assert!(sent_bytes(&range) == data[at..at + len], "{len} bytes at window 1 + {at}");
        }
        assert!(reads.range(data_size - 65536, 131_072).is_none(), "past the data area");
    }

    #[test]
    fn a_range_keeps_its_window_mapped_after_eviction() {
        let (_guard, file) = cached_file(2 << 20);
        let data_size = (WINDOWS_MAX as u64 + 2) * WINDOW_BYTES;
        file.set_len(data_size).expect("extend");
        let mut reads = MappedReads::new(file.as_raw_fd(), data_size, false).expect("mappable");
        let range = reads.range(0, 1 << 20).expect("cached");
        // Windows beyond the first are holes (not cached); list them by hand.
        for index in 1..=WINDOWS_MAX as u64 {
            let window = map_window(file.as_raw_fd(), index * WINDOW_BYTES, WINDOW_BYTES as usize).expect("map");
            reads.list(index, Arc::new(window));
        }
        assert_eq!(reads.windows_mapped(), WINDOWS_MAX);
        assert!(reads.windows.iter().all(|(i, _)| *i != 0), "window 0 was least recently used");
        // The range still holds window 0: the mapping outlives its eviction.
        assert_eq!(Arc::strong_count(&range.window), 1);
        let want: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        assert!(sent_bytes(&range) == want, "an evicted window still serves its range");
        let again = reads.range(0, 1 << 20).expect("remapped");
        assert!(range != again, "a new mapping of the same window");
        assert_eq!(range.len(), again.len());
    }

    #[test]
    fn a_range_beyond_a_shrunken_file_fails_its_send_instead_of_killing_us() {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (_guard, file) = cached_file(2 << 20);
        let mut reads = MappedReads::new(file.as_raw_fd(), 2 << 20, false).expect("mappable");
        let range = reads.range(1 << 20, 1 << 20).expect("cached");
        // Someone truncates the store under the server: its pages are gone.
        file.set_len(4096).expect("truncate");
        let (ours, _theirs) =
            socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::empty()).expect("socketpair");
        // SAFETY: the kernel reads `range` (still mapped, held by `range`)
        // as a send's source; this process reads none of it.
        let sent = unsafe {
            libc::send(ours.as_raw_fd(), range.as_ptr().cast(), range.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        let errno = std::io::Error::last_os_error().raw_os_error();
        assert_eq!((sent, errno), (-1, Some(libc::EFAULT)), "a send from a truncated mapping fails with EFAULT");
    }

    #[test]
    fn ranges_across_a_window_boundary_are_read() {
        let (_guard, file) = cached_file(4096);
        file.set_len(2 * WINDOW_BYTES).expect("extend");
        let mut reads = MappedReads::new(file.as_raw_fd(), 2 * WINDOW_BYTES, false).expect("mappable");
        assert!(reads.range(WINDOW_BYTES - 65536, 131_072).is_none());
        assert_eq!(reads.windows_mapped(), 0, "a straddling range maps nothing");
    }
}
