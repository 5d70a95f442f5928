//! Handing freed heap memory back to the kernel after a large change.
//!
//! A large change (thousands of peers joining or leaving at once) builds and frees several MiB of
//! short-lived data: the desired state, the ops, the entries replaced in what the loop knows. glibc's
//! allocator keeps freed pages in the middle of its heap for reuse and only returns the top of it,
//! so the agent's resident size would stay at the high-water mark of its largest change.
//! [`release_freed`] asks glibc to return every free page (`malloc_trim(0)`, which `madvise`s them
//! away). The driver calls it once a change of [`LARGE_CHANGE`] or more entries is over (a second
//! after its last pass), right after rebuilding what it keeps in compact form.

/// Allocations of this size or more get pages of their own (glibc's `M_MMAP_THRESHOLD`).
pub const OWN_PAGES_FROM: usize = 128 * 1024;

/// Makes every allocation of [`OWN_PAGES_FROM`] or more get pages of its own, returned to the kernel
/// when freed. glibc starts there too, but raises the threshold to the size of each such block that
/// is freed (up to 32 MiB), after which a pass's large short-lived lists (its changes, a burst of
/// lease events) come from the heap and leave it fragmented. Call once, at start (glibc only).
pub fn keep_large_blocks_apart() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_PAGES_FROM as libc::c_int);
    }
}

/// A change of this many kernel entries or more (over one pass or several) is a large one.
pub const LARGE_CHANGE: usize = 1000;

/// Returns the allocator's free pages to the kernel (glibc only; elsewhere it does nothing).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's own free lists; it
    // is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
