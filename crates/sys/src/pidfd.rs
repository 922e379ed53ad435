//! Process file descriptors: a handle on a process that stays valid (and never points
//! at a recycled pid) and turns readable when the process exits.

use std::os::fd::{FromRawFd, OwnedFd};

/// `pidfd_open(pid, 0)`.
pub fn open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open with integer arguments; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn opens_ourselves_and_refuses_nonsense() {
        assert!(super::open(std::process::id() as i32).is_ok());
        assert!(super::open(-5).is_err());
    }
}
