//! A software prefetch: asks the CPU to start loading a cache line that will be read soon.
//!
//! Firing a sliding window reads a vector of the key's panes that is rarely in any cache; the
//! timers due next are known, so their keys' vectors can be on their way while the current key
//! fires. The standard library's `prefetch_read` is not stable yet; this is the one instruction
//! it would emit.

/// Starts loading the cache line holding `ptr` into every cache level. A hint: it never faults
/// and changes no result, whatever `ptr` points at.
#[inline(always)]
pub(crate) fn prefetch_read<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetch` does not access memory: any address is allowed, and it cannot fault.
    #[allow(unsafe_code)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Bytes in a cache line (x86-64 and most others).
const LINE: usize = 64;

/// Prefetches the cache lines `items` spans, at most `max_lines` of them.
#[inline]
pub(crate) fn prefetch_slice<T>(items: &[T], max_lines: usize) {
    let bytes = std::mem::size_of_val(items);
    if bytes == 0 {
        return;
    }
    // From the line holding the first byte: a slice need not start on a line.
    let start = items.as_ptr().cast::<u8>();
    let first_line = start.wrapping_sub(start.addr() % LINE);
    let span = (start.addr() % LINE + bytes).min(max_lines.saturating_mul(LINE));
    for offset in (0..span).step_by(LINE) {
        prefetch_read(first_line.wrapping_add(offset));
    }
}
