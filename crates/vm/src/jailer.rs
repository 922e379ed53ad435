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
//! - **A PID namespace of its own** (`boot.rs`: QEMU as PID 1 under `unshare`).
//!
//! The RAM a copy maps privately, which QEMU 7.2 opens read-write, is a sealed memfd
//! (`ram.rs`). Left (docs/vm.md): a user namespace.

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
    // Uids some process runs as (read once, when a claim looks stale).
    let mut running: Option<std::collections::HashSet<u32>> = None;
    // Free: no claim, or one naming a directory that is gone (its VM deleted) whose
    // uid no process runs as any more (a QEMU the server lost track of keeps it).
    // Claims are named by the uid itself: servers with other uid bases never meet.
    let mut free_or_mine = |n: u32| match std::fs::read(claims.join((base + n).to_string())) {
        Ok(holder) if holder == me => true,
        Ok(holder) => {
            !matches!(
                Path::new(OsStr::from_bytes(&holder)).try_exists(),
                Ok(true) | Err(_)
            ) && !running
                .get_or_insert_with(running_uids)
                .contains(&(base + n))
        }
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
    let uid = base + n;
    let tmp = claims.join(format!(".{uid}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(me)?;
    drop(f);
    std::fs::rename(&tmp, claims.join(uid.to_string()))?;
    std::fs::write(vm_dir.join("uid"), uid.to_string())?;
    Ok(uid)
}

/// The host's processes and their real uids.
fn processes() -> Vec<(i32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let uid = s
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next()?.parse().ok())?;
            Some((pid, uid))
        })
        .collect()
}

/// The real uids of the host's processes.
fn running_uids() -> std::collections::HashSet<u32> {
    processes().into_iter().map(|(_, uid)| uid).collect()
}

/// SIGKILLs every process running as `uid` (a QEMU uid: never root's); how many
/// there were.
pub(crate) fn kill_uid(uid: u32) -> usize {
    if uid == 0 {
        return 0;
    }
    let mine: Vec<i32> = processes()
        .into_iter()
        .filter(|(_, u)| *u == uid)
        .map(|(pid, _)| pid)
        .collect();
    for pid in &mine {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    mine.len()
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
    /// The host's mounts QEMU needs nothing of (pools, volumes, network namespaces'
    /// names, ...), deepest first: detached in its namespace, so that it holds none of
    /// them (a mount namespace keeps every mount it copied alive: a volume the host
    /// unmounted would stay busy while the QEMU lives).
    detach: Vec<CString>,
}

impl Plan {
    /// `vm_dir` must be absolute, as QEMU is given its files' names; `needs`: the other
    /// paths QEMU opens before it enters its root (assets, RAM files, volumes).
    pub(crate) fn new(run_dir: &Path, vm_dir: &Path, needs: &[&Path]) -> io::Result<Plan> {
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
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        // As given and as the kernel names them (through symlinks).
        let mut keep: Vec<PathBuf> = vec![run_dir.to_path_buf(), vm_dir.to_path_buf()];
        keep.extend(needs.iter().map(|p| p.to_path_buf()));
        let real: Vec<PathBuf> = keep.iter().filter_map(|p| p.canonicalize().ok()).collect();
        keep.extend(real);
        let keep: Vec<&Path> = keep.iter().map(PathBuf::as_path).collect();
        let detach = mounts_to_detach(&mountinfo, &keep)
            .iter()
            .map(|m| cstr(m))
            .collect::<io::Result<_>>()?;
        Ok(Plan {
            root: cstr(&root)?,
            dirs,
            src: cstr(vm_dir)?,
            dst: cstr(&at)?,
            detach,
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
            for m in &self.detach {
                // Gone already with a detached parent: fine.
                libc::umount2(m.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW);
            }
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

/// The mount points of `mountinfo` that QEMU needs nothing of, deepest first: all but
/// `/`, the pseudo file systems under `/dev`, `/proc` and `/sys`, and the mounts a path
/// of `keep` lies on (or under). The system's own directories (`/usr`, `/lib`, `/etc`,
/// where QEMU, its libraries and firmware are) are kept too.
fn mounts_to_detach(mountinfo: &str, keep: &[&Path]) -> Vec<PathBuf> {
    let system = [
        "/usr",
        "/usr/local",
        "/lib",
        "/lib64",
        "/bin",
        "/sbin",
        "/etc",
        "/opt",
        "/tmp",
        "/var/tmp",
    ];
    let mut out: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|m| {
            let m = Path::new(m);
            m != Path::new("/")
                && !["/dev", "/proc", "/sys"].iter().any(|p| m.starts_with(p))
                && !keep.iter().any(|k| k.starts_with(m))
                && !system.iter().any(|s| Path::new(s).starts_with(m))
        })
        .map(PathBuf::from)
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out.dedup();
    out
}

/// A mountinfo field: `\ooo` octal escapes (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Makes `path` `uid`'s (a disk QEMU may reopen by name).
pub(crate) fn give(path: &Path, uid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
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
        let p = Plan::new(Path::new("/d/vm-run"), Path::new("/d/vm-run/sbx-1"), &[]).unwrap();
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
        assert!(Plan::new(Path::new("/d"), Path::new("rel/sbx"), &[]).is_err());
    }

    #[test]
    fn qemu_keeps_only_the_mounts_it_needs() {
        let mountinfo = "\
21 1 254:0 / / rw - ext4 /dev/vda rw
22 21 0:5 / /dev rw - devtmpfs udev rw
23 22 0:6 / /dev/shm rw - tmpfs tmpfs rw
24 21 0:7 / /proc rw - proc proc rw
25 21 0:8 / /sys rw - sysfs sysfs rw
26 25 0:9 / /sys/fs/cgroup/memory rw - cgroup cgroup rw
27 21 0:10 / /run rw - tmpfs tmpfs rw
28 27 0:4 net:[4026532] /run/netns/forkbox-egress rw - nsfs nsfs rw
29 21 7:0 / /var/lib/forkbox/pool rw - btrfs /dev/loop0 rw
30 29 7:0 /templates /var/lib/forkbox/pool/templates rw - btrfs /dev/loop0 rw
31 21 7:1 / /var/lib/forkbox/volume\\040mounts/v1 rw - ext4 /dev/loop1 rw
32 21 0:11 / /var/lib/forkbox/vm-run rw - tmpfs tmpfs rw
33 21 0:12 / /usr rw - ext4 /dev/vdb rw
";
        let keep = [
            Path::new("/var/lib/forkbox/vm-run"),
            Path::new("/var/lib/forkbox/vm-run/sbx-1"),
            Path::new("/dev/shm/forkbox-vm-sbx-1.ram"),
        ];
        assert_eq!(
            mounts_to_detach(mountinfo, &keep),
            [
                PathBuf::from("/var/lib/forkbox/pool/templates"),
                PathBuf::from("/var/lib/forkbox/volume mounts/v1"),
                PathBuf::from("/var/lib/forkbox/pool"),
                PathBuf::from("/run/netns/forkbox-egress"),
                PathBuf::from("/run"),
            ]
        );
    }
}
