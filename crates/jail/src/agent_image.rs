//! The agent binary every sandbox starts from: a sealed, in-memory copy made once at
//! server start. Sandboxes' `/proc/1/exe` points at it, so nothing inside a sandbox can
//! ever write to an executable on the host (the class of CVE-2019-5736).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("read agent binary {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("agent binary {0} is not a static executable; build it with `make agent`")]
    NotStatic(PathBuf),
    #[error("memfd for the agent: {0}")]
    Memfd(std::io::Error),
}

pub struct AgentImage {
    fd: OwnedFd,
}

impl AgentImage {
    /// Loads the agent at `path`.
    pub fn load(path: &Path) -> Result<AgentImage, ImageError> {
        let bytes = std::fs::read(path).map_err(|e| ImageError::Read(path.into(), e))?;
        if !is_static_elf(&bytes) {
            return Err(ImageError::NotStatic(path.into()));
        }
        Ok(AgentImage {
            fd: sealed(c"forkbox-agent", &bytes)?,
        })
    }

    /// The sealed copy's descriptor (close-on-exec; `/proc/self/fd/<it>` executes it).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// A copy of the image for the second jail-init stage of a fork's children,
    /// execute-only and owned by `owner`, the host uid of the family's root: a fork
    /// child's jail-init execs it inside the parent sandbox's user namespace, which
    /// makes that namespace the new image's (so it may write the child's id maps), and
    /// the unreadable file keeps the process undumpable from its first instruction.
    pub fn nested_for(&self, owner: u32) -> Result<OwnedFd, ImageError> {
        let mut src = File::open(self.exec_path()).map_err(ImageError::Memfd)?;
        let nested = sealed_from(c"forkbox-agent-nested", &mut src)?;
        nix::unistd::fchown(
            nested.as_raw_fd(),
            Some(nix::unistd::Uid::from_raw(owner)),
            Some(nix::unistd::Gid::from_raw(owner)),
        )
        .map_err(|e| ImageError::Memfd(e.into()))?;
        nix::sys::stat::fchmod(nested.as_raw_fd(), nix::sys::stat::Mode::S_IXUSR)
            .map_err(|e| ImageError::Memfd(e.into()))?;
        Ok(nested)
    }

    /// A path that executes the sealed copy (valid in this process and its children
    /// until exec).
    pub fn exec_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// A sealed memfd holding `bytes`.
fn sealed(name: &std::ffi::CStr, bytes: &[u8]) -> Result<OwnedFd, ImageError> {
    let mut f = memfd(name)?;
    f.write_all(bytes).map_err(ImageError::Memfd)?;
    seal(f)
}

/// A sealed memfd holding what `src` holds (copied in the kernel).
fn sealed_from(name: &std::ffi::CStr, src: &mut File) -> Result<OwnedFd, ImageError> {
    let mut f = memfd(name)?;
    std::io::copy(src, &mut f).map_err(ImageError::Memfd)?;
    seal(f)
}

fn memfd(name: &std::ffi::CStr) -> Result<File, ImageError> {
    // SAFETY: memfd_create with a NUL-terminated name and flags.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(ImageError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd we own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
}

fn seal(f: File) -> Result<OwnedFd, ImageError> {
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our own fd with integer arguments.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(ImageError::Memfd(std::io::Error::last_os_error()));
    }
    Ok(f.into())
}

/// True for an ELF executable without a program interpreter (PT_INTERP).
fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) != 3
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_binaries_are_refused() {
        // /bin/sh on Debian is dynamically linked.
        assert!(matches!(
            AgentImage::load(Path::new("/bin/sh")),
            Err(ImageError::NotStatic(_))
        ));
        assert!(!is_static_elf(b"not an elf"));
    }
}
