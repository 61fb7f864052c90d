//! Memory for the kernels: output buffers written in full without being zeroed first, large
//! buffers backed by transparent huge pages where the system offers them (a 7B model's weights
//! are gigabytes, and on 4 KB pages filling them costs a page fault, and later a TLB entry,
//! every 4 KB: a large share of the time of loading an int8 checkpoint), and the allocator
//! setting that keeps freed layer outputs in the process.

use candle_core::Result;
use std::mem::MaybeUninit;

/// Size of a huge page (x86_64 and aarch64 with 4 KB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// `len` zeroed values in memory that the kernel is asked to back with huge pages before any of
/// it is touched (`madvise(MADV_HUGEPAGE)`; a hint, ignored where unsupported).
pub fn zeroed<T: Copy + Default>(len: usize) -> Vec<T> {
    // Large zeroed vectors come from `calloc`, i.e. fresh, untouched pages.
    let v = vec![T::default(); len];
    advise_huge(v.as_ptr().cast(), std::mem::size_of_val(v.as_slice()));
    v
}

/// Asks for huge pages over the whole pages of `bytes` bytes at `ptr` (at least one huge page).
pub fn advise_huge(ptr: *const u8, bytes: usize) {
    if bytes < HUGE_PAGE {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (ptr as usize).next_multiple_of(PAGE);
        let end = (ptr as usize + bytes) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside one live allocation of the caller's; MADV_HUGEPAGE
            // only changes how the kernel backs it, never its contents or validity.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

/// Keeps the memory of freed buffers of up to 32 MB in the process instead of handing it back
/// to the system (glibc's allocator; nothing elsewhere). A forward pass allocates and frees
/// outputs of megabytes per layer; by default glibc maps many such blocks afresh and unmaps
/// them when freed, so every call pays a page fault and a zeroed page per 4 KB written (5 % of
/// a batched MiniLM embedding run). This serves blocks up to glibc's largest threshold (32 MB)
/// from the heap and stops trimming it, so freed blocks are reused. Process-wide: call once,
/// early (the command-line tool does).
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; both values are within glibc's limits.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// `out` as memory to write (every `f32` is a valid value, so writing any keeps it initialised).
pub(crate) fn as_unfilled(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same size and alignment; MaybeUninit<f32> only loosens what may be read, and the
    // kernels write nothing but f32 values through it.
    unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// `out` once every value has been written.
///
/// # Safety
/// Every value of `out` is initialised.
pub(crate) unsafe fn assume_filled(out: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: the caller's contract; same size and alignment.
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A vector of `len` floats that `fill` writes in full, without zeroing its memory first (at a
/// prompt's sizes, zeroing every layer's outputs is a few percent of the time).
///
/// # Safety
/// When `fill` returns `Ok`, it has written every one of the `len` values.
pub(crate) unsafe fn filled_vec(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>]) -> Result<()>) -> Result<Vec<f32>> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len])?;
    // SAFETY: capacity is at least len, and fill wrote all of them (the caller's contract).
    unsafe { v.set_len(len) };
    Ok(v)
}
