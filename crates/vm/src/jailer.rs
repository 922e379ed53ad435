//! QEMU in a jail of its own, as Firecracker's jailer does, beside what every QEMU
//! already has (its seccomp filter `-sandbox on`, a cgroup, network/IPC/UTS namespaces
//! of its own):
//!
//! - **A host uid per VM**, from a range after the jail runtime's sandbox uid ranges,
//!   claimed host-wide as a file `/run/forkbox/qemu-uids/<n>` naming the VM's directory
//!   (made under a lock, so two servers never hand out one uid; a claim whose directory
//!   is gone is free again). The VM's directory keeps its uid (`uid`), so a woken VM
//!   gets it back.
//! - **A mount namespace of its own** in which `<run dir>/.qemu-root` is a small tmpfs
//!   holding only the VM's directory, bind-mounted at its host path (`nosuid`, `nodev`,
//!   `noexec`): QEMU reopens its active disk image by name (read-only when it takes a
//!   disk snapshot, read-write again after a migration), so the names must resolve.
//! - QEMU opens everything it is started with (kernel, initramfs, disks and their
//!   backing layers, RAM, sockets, volumes, console) as root, then enters that root and
//!   drops to the uid before the guest runs (`-chroot`, `-runas`): no capabilities,
//!   `no_new_privs`, its seccomp filter. What it may open afterwards is its active disk
//!   (the uid's); the layers other sandboxes stand on are root's and read-only to it.
//!
//! Left (docs/vm.md): QEMU 7.2 opens a `memory-backend-file` read-write even when it
//! maps it privately, so a QEMU mapping a boot image's or a fork parent's RAM copy
//! holds a writable descriptor of it; PID and user namespaces.

use std::ffi::{CString, OsStr};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

/// Where the uid claims live (gone at reboot with every QEMU).
pub const CLAIMS: &str = "/run/forkbox/qemu-uids";
/// The directory of the run dir on which each QEMU's private root is mounted.
pub(crate) const ROOT: &str = ".qemu-root";
/// QEMU uids per host.
pub const UIDS: u32 = 65536;

/// Claims a uid for the VM whose directory is `vm_dir` (its earlier one if it still
/// holds it or nobody took it) and records it in `<vm_dir>/uid`.
pub(crate) fn claim(claims: &Path, base: u32, vm_dir: &Path) -> io::Result<u32> {
    std::fs::create_dir_all(claims)?;
    std::fs::set_permissions(claims, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let lock = std::fs::File::create(claims.join(".lock"))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let me = vm_dir.as_os_str().as_bytes();
    // Free: no claim, or one naming a directory that is gone (its VM deleted).
    let free_or_mine = |n: u32| match std::fs::read(claims.join(n.to_string())) {
        Ok(holder) => holder == me || !Path::new(OsStr::from_bytes(&holder)).exists(),
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    };
    let kept = std::fs::read_to_string(vm_dir.join("uid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .and_then(|u| u.checked_sub(base))
        .filter(|n| *n < UIDS && free_or_mine(*n));
    let n = match kept {
        Some(n) => n,
        None => (0..UIDS)
            .find(|n| free_or_mine(*n))
            .ok_or_else(|| io::Error::other("all QEMU uids of this host are in use"))?,
    };
    let tmp = claims.join(format!(".{n}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(me)?;
    drop(f);
    std::fs::rename(&tmp, claims.join(n.to_string()))?;
    let uid = base + n;
    std::fs::write(vm_dir.join("uid"), uid.to_string())?;
    Ok(uid)
}

/// The uid a VM's QEMU runs as, if it was started jailed.
pub(crate) fn uid_of(vm_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(vm_dir.join("uid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The mounts of one QEMU's root, prepared before its process is forked (nothing may
/// be allocated between fork and exec).
pub(crate) struct Plan {
    root: CString,
    dirs: Vec<CString>,
    src: CString,
    dst: CString,
}

impl Plan {
    /// `vm_dir` must be absolute, as QEMU is given its files' names.
    pub(crate) fn new(run_dir: &Path, vm_dir: &Path) -> io::Result<Plan> {
        if !vm_dir.is_absolute() {
            return Err(io::Error::other(format!(
                "{} is not an absolute path",
                vm_dir.display()
            )));
        }
        let root = run_dir.join(ROOT);
        let mut at = root.clone();
        let mut dirs = Vec::new();
        for c in vm_dir.components().skip(1) {
            at.push(c);
            dirs.push(cstr(&at)?);
        }
        Ok(Plan {
            root: cstr(&root)?,
            dirs,
            src: cstr(vm_dir)?,
            dst: cstr(&at)?,
        })
    }

    /// The directory QEMU's `-chroot` names.
    pub(crate) fn root(&self) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(self.root.as_bytes()))
    }

    /// Builds the root in the calling process's mount namespace, which must be its
    /// own (`unshare(CLONE_NEWNS)` first). Between fork and exec: async-signal-safe
    /// calls only.
    pub(crate) fn enter(&self) -> io::Result<()> {
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let none = std::ptr::null::<libc::c_char>();
        let hidden = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        // SAFETY: mount and mkdir with NUL-terminated strings that outlive the calls.
        unsafe {
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"forkbox-qemu".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                hidden,
                c"mode=0755,size=64k".as_ptr().cast(),
            ))?;
            for d in &self.dirs {
                if libc::mkdir(d.as_ptr(), 0o755) < 0
                    && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::mount(
                self.src.as_ptr(),
                self.dst.as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                none,
                self.dst.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REMOUNT | hidden,
                std::ptr::null(),
            ))?;
        }
        Ok(())
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Makes `path` `uid`'s (a disk QEMU may reopen by name).
pub(crate) fn give(path: &Path, uid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
}

/// Takes `path` back from its QEMU: root's, readable (a frozen disk layer).
pub(crate) fn take_back(path: &Path) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(0), Some(0))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_claimed_once_kept_by_their_vm_and_freed_with_its_dir() {
        let t = tempfile::tempdir().unwrap();
        let claims = t.path().join("claims");
        let (a, b) = (t.path().join("vm-a"), t.path().join("vm-b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let ua = claim(&claims, 5000, &a).unwrap();
        let ub = claim(&claims, 5000, &b).unwrap();
        assert_eq!((ua, ub), (5000, 5001));
        // A VM started again keeps its uid.
        assert_eq!(claim(&claims, 5000, &a).unwrap(), 5000);
        assert_eq!(uid_of(&a), Some(5000));
        // Its directory gone, its uid goes to the next VM.
        std::fs::remove_dir_all(&a).unwrap();
        let c = t.path().join("vm-c");
        std::fs::create_dir_all(&c).unwrap();
        assert_eq!(claim(&claims, 5000, &c).unwrap(), 5000);
        // A VM whose uid was taken meanwhile gets another.
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("uid"), "5000").unwrap();
        assert_eq!(claim(&claims, 5000, &a).unwrap(), 5002);
    }

    #[test]
    fn a_plan_mirrors_the_vm_dir_at_its_host_path() {
        let p = Plan::new(Path::new("/d/vm-run"), Path::new("/d/vm-run/sbx-1")).unwrap();
        assert_eq!(p.root(), PathBuf::from("/d/vm-run/.qemu-root"));
        let dirs: Vec<&[u8]> = p.dirs.iter().map(|d| d.as_bytes()).collect();
        assert_eq!(
            dirs,
            [
                &b"/d/vm-run/.qemu-root/d"[..],
                b"/d/vm-run/.qemu-root/d/vm-run",
                b"/d/vm-run/.qemu-root/d/vm-run/sbx-1"
            ]
        );
        assert_eq!(p.dst.as_bytes(), b"/d/vm-run/.qemu-root/d/vm-run/sbx-1");
        assert!(Plan::new(Path::new("/d"), Path::new("rel/sbx")).is_err());
    }
}
