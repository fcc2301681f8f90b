//! Page-aligned I/O buffers, as O_DIRECT requires.
//!
//! An `AlignedBuf` owns its memory through a raw pointer, never through a Rust reference,
//! so the kernel may write into it (io_uring reads) while the buffer is shared among
//! in-flight operations; slices are only handed out by `as_slice`/`as_mut_slice`, which
//! callers use once the operations that touch the buffer have completed.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

pub const ALIGN: usize = 4096;

/// Allocations are recycled through a small pool of power-of-two size classes (4 KiB ..
/// 32 MiB): large reads would otherwise mmap, fault in and munmap every buffer.
mod pool {
    use parking_lot::Mutex;
    use std::ptr::NonNull;

    pub const MIN_SHIFT: u32 = 12;
    pub const MAX_SHIFT: u32 = 25;
    const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
    /// Bytes kept in the pool at most.
    const MAX_POOLED_BYTES: usize = 64 << 20;
    const MAX_PER_CLASS: usize = 256;

    struct Free(Vec<NonNull<u8>>);
    // SAFETY: the pointers are unaliased allocations owned by the pool.
    unsafe impl Send for Free {}

    struct Pool {
        classes: [Free; CLASSES],
        bytes: usize,
    }

    static POOL: Mutex<Pool> = Mutex::new(Pool {
        classes: [const { Free(Vec::new()) }; CLASSES],
        bytes: 0,
    });

    /// Capacity a request for `len` bytes gets (a power of two), if it is pooled.
    pub fn class_cap(len: usize) -> Option<usize> {
        let cap = len.max(1 << MIN_SHIFT).next_power_of_two();
        (cap <= 1 << MAX_SHIFT).then_some(cap)
    }

    fn index(cap: usize) -> usize {
        (cap.trailing_zeros() - MIN_SHIFT) as usize
    }

    pub fn take(cap: usize) -> Option<NonNull<u8>> {
        let mut p = POOL.lock();
        let ptr = p.classes[index(cap)].0.pop()?;
        p.bytes -= cap;
        Some(ptr)
    }

    /// Returns false (caller frees) when the pool is full.
    pub fn give(ptr: NonNull<u8>, cap: usize) -> bool {
        let mut p = POOL.lock();
        if p.bytes + cap > MAX_POOLED_BYTES || p.classes[index(cap)].0.len() >= MAX_PER_CLASS {
            return false;
        }
        p.bytes += cap;
        p.classes[index(cap)].0.push(ptr);
        true
    }
}

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    /// Allocated bytes: a multiple of ALIGN, at least ALIGN.
    cap: usize,
    /// The visible window `[start, start + len)`.
    start: usize,
    len: usize,
    /// Came from the pool (contents are an earlier user's until overwritten).
    recycled: bool,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like a Vec<u8>); the raw pointer is not
// shared with anything that outlives it except in-flight kernel I/O, which the io_uring
// reactor keeps alive by holding the buffer until completion.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `as_slice`; mutation needs `&mut self`, except
// kernel writes into buffers lent to in-flight reads (see the module doc).
unsafe impl Sync for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("cap", &self.cap)
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

impl AlignedBuf {
    /// A zero-filled buffer whose visible window is `len` bytes (the whole allocation is
    /// zeroed, so no window ever shows earlier contents).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let mut b = Self::alloc(len, true);
        if b.recycled {
            // SAFETY: the allocation is `cap` bytes long and not shared.
            unsafe { std::ptr::write_bytes(b.ptr.as_ptr(), 0, b.cap) };
            b.recycled = false;
        }
        b
    }

    /// A buffer whose contents are unspecified (a recycled allocation may hold an earlier
    /// request's bytes). The caller must overwrite every byte it exposes; the read path
    /// uses it because every block is either read from disk or zero-filled.
    pub fn for_overwrite(len: usize) -> AlignedBuf {
        let mut b = Self::alloc(len, false);
        b.recycled = false;
        b
    }

    fn alloc(len: usize, zero_fresh: bool) -> AlignedBuf {
        let pooled = pool::class_cap(len);
        let cap = pooled.unwrap_or(len.div_ceil(ALIGN) * ALIGN);
        if let Some(ptr) = pooled.and_then(pool::take) {
            return AlignedBuf {
                ptr,
                cap,
                start: 0,
                len,
                recycled: true,
            };
        }
        // ALIGN is a power of two and cap a non-zero multiple of it.
        let layout = Layout::from_size_align(cap, ALIGN)
            .unwrap_or_else(|_| panic!("buffer of {cap} bytes is too large"));
        // SAFETY: layout has a non-zero size (cap >= ALIGN).
        let raw = unsafe {
            if zero_fresh {
                alloc_zeroed(layout)
            } else {
                std::alloc::alloc(layout)
            }
        };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            cap,
            start: 0,
            len,
            recycled: false,
        }
    }

    /// Zero-fills bytes `[offset, offset + len)` of the allocation.
    pub fn zero_range(&mut self, offset: usize, len: usize) {
        let p = self.io_ptr(offset, len);
        // SAFETY: the range lies within the allocation (io_ptr checks); &mut self.
        unsafe { std::ptr::write_bytes(p, 0, len) };
    }

    /// Copies `src` to bytes `[offset, offset + src.len())` of the allocation.
    pub(crate) fn copy_in(&mut self, offset: usize, src: &[u8]) {
        let p = self.io_ptr(offset, src.len());
        // SAFETY: the range lies within the allocation (io_ptr checks); &mut self, so
        // nothing else refers to it, and `src` is another buffer's memory.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
    }

    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Moves the visible window (e.g. to trim a block-aligned read to what was asked).
    pub fn set_window(&mut self, start: usize, len: usize) {
        assert!(
            start.checked_add(len).is_some_and(|e| e <= self.cap),
            "window {start}+{len} beyond capacity {}",
            self.cap
        );
        self.start = start;
        self.len = len;
    }

    pub fn window_start(&self) -> usize {
        self.start
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: [start, start+len) lies within the allocation (set_window checks), the
        // memory is initialised (zeroed at allocation) and no kernel write is in flight
        // while the caller holds this slice (module invariant).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(self.start), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.start), self.len) }
    }

    /// Pointer to byte `offset` of the allocation, for the kernel. Callers keep the buffer
    /// alive until the I/O completes.
    pub(crate) fn io_ptr(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.cap),
            "io range {offset}+{len} beyond capacity {}",
            self.cap
        );
        // SAFETY: offset is within the allocation (checked above).
        unsafe { self.ptr.as_ptr().add(offset) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if pool::class_cap(self.cap) == Some(self.cap) && pool::give(self.ptr, self.cap) {
            return;
        }
        // SAFETY: allocated in `alloc` with exactly this layout.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.io_ptr(0, 0) as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn recycled_buffers_come_back_zeroed() {
        for _ in 0..3 {
            let mut b = AlignedBuf::zeroed(100_000);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.set_window(0, b.capacity());
            b.as_mut_slice().fill(0xee);
        }
        let b = AlignedBuf::for_overwrite(4096);
        assert_eq!(b.capacity(), 4096);
    }

    #[test]
    fn window() {
        let mut b = AlignedBuf::zeroed(8192);
        b.as_mut_slice()[4096] = 7;
        b.set_window(4096, 512);
        assert_eq!(b.as_slice()[0], 7);
        assert_eq!(b.len(), 512);
    }
}
