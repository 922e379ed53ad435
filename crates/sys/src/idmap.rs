//! Idmapped mounts: a detached copy of a directory tree whose files' owners appear
//! shifted by a fixed offset, so that the files of every sandbox stay stored in one
//! *canonical* host uid range while each running sandbox's processes run as a host uid
//! range of their own (issue 20, findings 4 and 5).
//!
//! The steps, all by host root before the sandbox's namespaces exist:
//! 1. [`shift_userns`]: a user namespace whose map sends the canonical range to the
//!    sandbox's (`canonical → host`), held by a short-lived child process that exits
//!    once the namespace is opened;
//! 2. [`idmapped_tree`]: `open_tree(OPEN_TREE_CLONE)` of the directory and
//!    `mount_setattr(MOUNT_ATTR_IDMAP)` with that namespace: a detached mount;
//! 3. [`attach`]: the sandbox's first process, root of its own user namespace, moves the
//!    detached mount onto its target inside its private mount namespace (`move_mount`).
//!
//! A file stored as `canonical + i` is seen as `host + i` through the mount, and a file
//! made through it by `host + i` is stored as `canonical + i`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    #[error("make the id-shifting user namespace ({canonical} → {host}): {source}")]
    Userns {
        canonical: u32,
        host: u32,
        source: std::io::Error,
    },
    #[error("idmapped copy of {0}: {1}")]
    Tree(PathBuf, std::io::Error),
    #[error("attach the idmapped mount at {0}: {1}")]
    Attach(PathBuf, std::io::Error),
    #[error("make the mount at {0} read-only: {1}")]
    Readonly(PathBuf, std::io::Error),
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;

/// `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A user namespace mapping uids and gids `canonical..canonical+count` to
/// `host..host+count`, for [`idmapped_tree`]; with `keep_root` host root is also
/// mapped to itself (the layers of an overlay, whose own operations run as host root;
/// see `crate::overlay`).
///
/// Must be called from a single-threaded process (it forks; the child only waits on a
/// pipe and exits).
pub fn shift_userns(
    canonical: u32,
    host: u32,
    count: u32,
    keep_root: bool,
) -> Result<OwnedFd, IdmapError> {
    let err = |source: std::io::Error| IdmapError::Userns {
        canonical,
        host,
        source,
    };
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| err(std::io::Error::from(e)))?;
    // SAFETY: the caller is single-threaded and the child only calls read(2) and
    // _exit(2), both async-signal-safe.
    let pid = unsafe { clone_newuser() };
    if pid < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let mut b = [0u8; 1];
        // SAFETY: dup2, close_range, read into a local buffer and _exit, all
        // async-signal-safe. Every other fd is closed, so that another thread's
        // namespace holder (tests) never keeps this one's pipe open, nor this one its.
        unsafe {
            libc::dup2(r.as_raw_fd(), 0);
            libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32);
            libc::read(0, b.as_mut_ptr().cast(), 1);
            libc::_exit(0)
        }
    }
    drop(r);
    let pid = pid as i32;
    let result = (|| {
        let root = if keep_root && canonical > 0 && host > 0 {
            "0 0 1\n"
        } else {
            ""
        };
        let map = format!("{root}{canonical} {host} {count}\n");
        for f in ["uid_map", "gid_map"] {
            std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{pid}/{f}"))
                .and_then(|mut file| file.write_all(map.as_bytes()))?;
        }
        Ok(OwnedFd::from(std::fs::File::open(format!(
            "/proc/{pid}/ns/user"
        ))?))
    })();
    drop(w);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    result.map_err(err)
}

/// A detached, recursive copy of the mount tree at `path`, idmapped through `userns`
/// (from [`shift_userns`]), close-on-exec.
pub fn idmapped_tree(path: &Path, userns: &OwnedFd) -> Result<OwnedFd, IdmapError> {
    detached_tree(path, Some(userns))
}

/// A detached, recursive copy of the mount tree at `path`, close-on-exec; idmapped
/// through `userns` when given (unmapped: the layers of a sandbox that runs as the
/// canonical range itself).
pub fn detached_tree(path: &Path, userns: Option<&OwnedFd>) -> Result<OwnedFd, IdmapError> {
    let err = |e: std::io::Error| IdmapError::Tree(path.into(), e);
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    let flags =
        OPEN_TREE_CLONE | libc::AT_RECURSIVE as libc::c_uint | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: open_tree with a NUL-terminated path; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we own.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let Some(userns) = userns else {
        return Ok(tree);
    };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr on the detached tree we own, with an attr struct of the
    // size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(tree)
}

/// Moves the detached mount `tree` onto the directory `target` is open on (an
/// `O_PATH` fd); `shown` names it in errors.
pub fn attach(
    tree: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    shown: &Path,
) -> Result<(), IdmapError> {
    // SAFETY: move_mount between two fds we hold, empty paths.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(IdmapError::Attach(
            shown.into(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Makes the mount `top` is open on (its root directory, an `O_PATH` fd is enough)
/// and every mount beneath it read-only; `shown` names it in errors. Works on attached
/// mounts of the caller's mount namespace, whose owner may always add `RDONLY`.
pub fn set_readonly(top: BorrowedFd<'_>, shown: &Path) -> Result<(), IdmapError> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr on an fd we hold, empty path, an attr struct of the size
    // passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            top.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(IdmapError::Readonly(
            shown.into(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The host uid that uid 0 of `pid`'s user namespace is, from its `uid_map` as the
/// caller's namespace sees it.
pub fn host_root_of(pid: i32) -> std::io::Result<u32> {
    let mut s = String::new();
    std::fs::File::open(format!("/proc/{pid}/uid_map"))?.read_to_string(&mut s)?;
    s.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            match (f.next(), f.next()) {
                (Some("0"), Some(host)) => host.parse().ok(),
                _ => None,
            }
        })
        .ok_or_else(|| std::io::Error::other(format!("no uid 0 in the uid_map of {pid}")))
}

/// `clone(2)` with `CLONE_NEWUSER | SIGCHLD` and no new stack: fork(2) into a user
/// namespace of its own. The child's pid, 0 in the child, -1 on failure (`errno`).
///
/// # Safety
/// As fork(2): the child may only call async-signal-safe functions.
pub(crate) unsafe fn clone_newuser() -> libc::c_long {
    // SAFETY: the caller keeps to fork(2)'s rules; no new stack is given.
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Root only: the test's process is single-threaded enough for `shift_userns` (the
    /// test harness's other threads do not run while the child only reads a pipe).
    #[test]
    fn a_tree_seen_through_the_shift_has_shifted_owners() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root");
        }
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("a");
        std::fs::write(&f, "x").unwrap();
        std::os::unix::fs::chown(&f, Some(1_000_005), Some(1_000_007)).unwrap();
        let ns = shift_userns(1_000_000, 3_000_000, 65536, false).unwrap();
        let tree = idmapped_tree(t.path(), &ns).unwrap();
        // Reading through the detached tree's fd shows the shifted owner.
        let md = std::fs::metadata(format!("/proc/self/fd/{}/a", tree.as_raw_fd())).unwrap();
        assert_eq!((md.uid(), md.gid()), (3_000_005, 3_000_007));
        // On disk nothing changed.
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!((md.uid(), md.gid()), (1_000_005, 1_000_007));
        assert_eq!(host_root_of(std::process::id() as i32).unwrap(), 0);
    }
}
