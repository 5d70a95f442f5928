//! Handing freed heap memory back to the kernel after a large change.
//!
//! A large change (thousands of peers joining or leaving at once) builds and frees several
//! MiB of short-lived data: the desired state, the ops, the entries replaced in what the loop knows.
//! glibc's allocator keeps freed pages in the middle of its heap for reuse and only returns the top
//! of it, so the agent's resident size would stay at the high-water mark of its largest pass.
//! [`release_freed`] asks glibc to return every free page (`malloc_trim(0)`, which `madvise`s
//! them away); the driver calls it each time its passes have changed [`LARGE_CHANGE`] more entries.

/// After this many changed kernel entries (over one pass or several) the driver calls
/// [`release_freed`].
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
