//! `openat2(2)`, which libc and nix do not wrap: opening a path with resolution rules
//! (`RESOLVE_IN_ROOT`, `RESOLVE_BENEATH`, `RESOLVE_NO_SYMLINKS`, …).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Opens `path` relative to `dir` with open `flags` (`O_CLOEXEC` added), `mode` (used
/// with `O_CREAT`) and `resolve` flags; the raw errno on failure.
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> Result<OwnedFd, nix::errno::Errno> {
    // SAFETY: open_how is plain data; zero is valid for the fields not set.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        u64::from(mode)
    } else {
        0
    };
    how.resolve = resolve;
    // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and an open_how of the
    // size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
