//! The sandbox's filesystem view, built by the sandbox's first process inside its new
//! mount namespace: private propagation, the root subvolume bind-mounted on itself, a
//! fresh `/proc`, a minimal `/dev` (devices bind-mounted from the host, a private
//! devpts instance, `/dev/shm`), a tmpfs `/tmp`, then `pivot_root` with the old root
//! detached so nothing of the host stays reachable.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {target}: {source}")]
    Mount { target: PathBuf, source: nix::Error },
    #[error("prepare {0}: {1}")]
    Prepare(PathBuf, std::io::Error),
    #[error("pivot_root into {0}: {1}")]
    PivotRoot(PathBuf, nix::Error),
    #[error("detach old root: {0}")]
    DetachOldRoot(nix::Error),
    /// The sandbox's own filesystem puts something in a mount target's way.
    #[error("unsafe mount target {0}: {1}")]
    Unsafe(PathBuf, String),
    #[error(transparent)]
    Idmap(#[from] crate::idmap::IdmapError),
}

/// A host directory mounted into the sandbox at `target` (absolute inside it): the
/// idmapped copy `tree` of `source` when there is one, else a bind mount of `source`.
pub struct Bind<'a> {
    pub source: &'a Path,
    pub target: &'a Path,
    pub tree: Option<BorrowedFd<'a>>,
    /// Mounted read-only (the whole tree beneath `target`).
    pub read_only: bool,
}

/// `/proc/sys/user/*` of every sandbox's user namespace. Fork children's namespaces
/// count against their parent's (32 children per fork, a few forks deep).
pub const USER_NS_LIMITS: [(&str, u32); 12] = [
    ("max_inotify_instances", 128),
    ("max_inotify_watches", 65536),
    ("max_fanotify_groups", 16),
    ("max_fanotify_marks", 8192),
    ("max_user_namespaces", 512),
    ("max_mnt_namespaces", 512),
    ("max_pid_namespaces", 512),
    ("max_net_namespaces", 512),
    ("max_ipc_namespaces", 512),
    ("max_uts_namespaces", 512),
    ("max_cgroup_namespaces", 512),
    ("max_time_namespaces", 512),
];

/// Host device nodes bind-mounted into every sandbox's `/dev`.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn mnt(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    mount(src, target, fstype, flags, data).map_err(|source| MountError::Mount {
        target: target.into(),
        source,
    })
}

fn mkdir_p(p: &Path) -> Result<(), MountError> {
    fs::create_dir_all(p).map_err(|e| MountError::Prepare(p.into(), e))
}

/// Builds the sandbox's mounts under `root` and pivots into it. Runs inside the new
/// user and mount namespaces, with the capabilities the user namespace grants.
///
/// `binds` are host directories (source, absolute target inside the sandbox) mounted
/// before the sandbox's own /proc and /dev; targets are made if missing. Everything
/// happens in the sandbox's private mount namespace, so a target that resolves outside
/// the root (through a symlink in the root filesystem) only lands in the part of the
/// namespace that `pivot_root` detaches.
///
/// `tmp_size` caps the private /tmp (tmpfs pages count against the sandbox's memory
/// limit, so an uncapped /tmp filled to the limit would leave no memory for anything,
/// the agent included).
pub fn enter_rootfs(
    root: &Path,
    root_tree: Option<BorrowedFd<'_>>,
    binds: &[Bind<'_>],
    tmp_size: Option<u64>,
) -> Result<(), MountError> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // 1. Nothing we do may propagate back to the host.
    make_private()?;
    // 2. pivot_root needs the new root to be a mount point: the idmapped copy of the
    //    root filesystem when the sandbox runs as its own uid range, else a bind mount
    //    of it on itself.
    match root_tree {
        Some(tree) => {
            let at: OwnedFd = fs::File::open(root)
                .map_err(|e| MountError::Prepare(root.into(), e))?
                .into();
            crate::idmap::attach(tree, at.as_fd(), root)?;
        }
        None => mnt(
            Some(path_str(root)?),
            root,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?,
    }
    // Every mount target in the sandbox's own filesystem is opened beneath the root
    // without following symlinks, and mounted on by fd (see `dir_beneath`).
    let root_fd: OwnedFd = fs::File::open(root)
        .map_err(|e| MountError::Prepare(root.into(), e))?
        .into();
    // 2b. Volumes.
    for b in binds {
        let at = target_dir(&root_fd, b.target, b.target)?;
        match b.tree {
            Some(tree) => crate::idmap::attach(tree, at.as_fd(), b.target)?,
            None => mnt(
                Some(path_str(b.source)?),
                &fd_path(&at),
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?,
        }
        if b.read_only {
            // Opened again beneath the root: now the top of the volume's mount.
            let top = target_dir(&root_fd, b.target, b.target)?;
            crate::idmap::set_readonly(top.as_fd(), b.target)?;
        }
    }
    // 3. A /proc of the sandbox's own PID namespace, with /proc/sys read-only (as
    //    Docker does): the IPC namespace's sysctls (kernel.shmmax, msgmnb, mqueue
    //    limits) are the sandbox root's to write otherwise. shm_rmid_forced first, so
    //    SysV shared memory dies with its last process instead of pinning memory.
    let proc_fd = target_dir(&root_fd, Path::new("proc"), Path::new("/proc"))?;
    let proc = root.join("proc");
    mnt(
        Some("proc"),
        &fd_path(&proc_fd),
        Some("proc"),
        nosuid_nodev | MsFlags::MS_NOEXEC,
        None,
    )?;
    let rmid = proc.join("sys/kernel/shm_rmid_forced");
    fs::write(&rmid, "1").map_err(|e| MountError::Prepare(rmid, e))?;
    // The user namespace's own limits on what its users may hold (each level of
    // namespaces counts separately: these bound the sandbox inside; its host uid's
    // counts at the host's limits bound it outside).
    for (name, value) in USER_NS_LIMITS {
        let p = proc.join("sys/user").join(name);
        match fs::write(&p, value.to_string()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(MountError::Prepare(p, e)),
        }
    }
    let sys = proc.join("sys");
    mnt(Some(path_str(&sys)?), &sys, None, MsFlags::MS_BIND, None)?;
    mnt(
        None,
        &sys,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | nosuid_nodev
            | MsFlags::MS_NOEXEC,
        None,
    )?;
    // 4. A minimal /dev.
    let dev_fd = target_dir(&root_fd, Path::new("dev"), Path::new("/dev"))?;
    mnt(
        Some("tmpfs"),
        &fd_path(&dev_fd),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )?;
    // From here on /dev is the fresh tmpfs: nothing of the sandbox's in it.
    let dev = root.join("dev");
    for d in DEVICES {
        let target = dev.join(d);
        fs::File::create(&target).map_err(|e| MountError::Prepare(target.clone(), e))?;
        let host = format!("/dev/{d}");
        mnt(Some(&host), &target, None, MsFlags::MS_BIND, None)?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts)?;
    mnt(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    mnt(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        nosuid_nodev,
        Some("mode=1777,size=65536k"),
    )?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let l = dev.join(link);
        symlink(to, &l).map_err(|e| MountError::Prepare(l, e))?;
    }
    // 5. A private /tmp.
    let tmp = target_dir(&root_fd, Path::new("tmp"), Path::new("/tmp"))?;
    mnt(
        Some("tmpfs"),
        &fd_path(&tmp),
        Some("tmpfs"),
        nosuid_nodev,
        Some(&match tmp_size {
            Some(b) => format!("mode=1777,size={b}"),
            None => "mode=1777".to_owned(),
        }),
    )?;
    // 6. A read-only /sys holding only the host's transparent-huge-page mode, which
    //    glibc's malloc reads (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, set for Python
    //    kernels, makes forking a big REPL several times cheaper). Copies, not the
    //    host's sysfs.
    let thp = Path::new("/sys/kernel/mm/transparent_hugepage");
    let files: Vec<(&str, String)> = ["enabled", "hpage_pmd_size"]
        .into_iter()
        .filter_map(|f| fs::read_to_string(thp.join(f)).ok().map(|v| (f, v)))
        .collect();
    if !files.is_empty() {
        let sys_fd = target_dir(&root_fd, Path::new("sys"), Path::new("/sys"))?;
        let flags = nosuid_nodev | MsFlags::MS_NOEXEC;
        mnt(
            Some("sysfs-thp"),
            &fd_path(&sys_fd),
            Some("tmpfs"),
            flags,
            Some("mode=755,size=16k"),
        )?;
        // From here on /sys is the fresh tmpfs.
        let sys = root.join("sys");
        let dir = sys.join("kernel/mm/transparent_hugepage");
        mkdir_p(&dir)?;
        for (f, v) in &files {
            let p = dir.join(f);
            fs::write(&p, v).map_err(|e| MountError::Prepare(p, e))?;
        }
        mnt(
            None,
            &sys,
            None,
            flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            Some("mode=755,size=16k"),
        )?;
    }
    // 7. Switch roots and let go of the host's tree.
    nix::unistd::chdir(root).map_err(|e| MountError::PivotRoot(root.into(), e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| MountError::PivotRoot(root.into(), e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(MountError::DetachOldRoot)?;
    nix::unistd::chdir("/").map_err(|e| MountError::PivotRoot(root.into(), e))?;
    Ok(())
}

/// Makes every mount of the calling process's (new) mount namespace private, so that
/// nothing mounted in it propagates back to the namespace it was copied from.
pub fn make_private() -> Result<(), MountError> {
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
}

/// Opens directory `rel` beneath the directory `root` (`O_PATH`), making missing
/// components (mode 0755) as it goes, and never following a symlink or leaving `root`
/// (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, one component at a time): a mount target
/// that passes through a symlink in the sandbox's own filesystem (`/data -> /tmp`,
/// `/data -> /var/lib/forkbox/pool/…`) is refused, not followed into the host's tree.
/// `shown` names the target in errors. Without `create`, a missing component ends the
/// walk with `Ok(None)` (nothing in the way so far).
pub fn dir_beneath(
    root: &OwnedFd,
    rel: &Path,
    shown: &Path,
    create: bool,
) -> Result<Option<OwnedFd>, MountError> {
    let refuse = |why: &str| MountError::Unsafe(shown.into(), why.to_owned());
    let mut cur = root
        .try_clone()
        .map_err(|e| MountError::Prepare(shown.into(), e))?;
    for comp in rel.components() {
        let name = match comp {
            Component::Normal(n) => n,
            Component::CurDir | Component::RootDir => continue,
            _ => return Err(refuse("mount target has a .. component")),
        };
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(name))
            .map_err(|_| refuse("mount target contains NUL"))?;
        let mut made = false;
        cur = loop {
            let err = match crate::openat2::openat2(
                cur.as_fd(),
                &c,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
                libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
            ) {
                Ok(fd) => break fd,
                Err(e) => std::io::Error::from(e),
            };
            match err.raw_os_error() {
                Some(libc::ENOENT) if !create => return Ok(None),
                Some(libc::ENOENT) if !made => {
                    // SAFETY: mkdirat with an fd we own and a NUL-terminated name.
                    if unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755) } < 0 {
                        let e = std::io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(MountError::Prepare(shown.into(), e));
                        }
                    }
                    made = true;
                }
                Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EXDEV) => {
                    return Err(refuse(
                        "mount target passes through a symlink or a non-directory",
                    ))
                }
                _ => return Err(MountError::Prepare(shown.into(), err)),
            }
        };
    }
    Ok(Some(cur))
}

/// [`dir_beneath`], making what is missing.
fn target_dir(root: &OwnedFd, rel: &Path, shown: &Path) -> Result<OwnedFd, MountError> {
    dir_beneath(root, rel, shown, true)?
        .ok_or_else(|| MountError::Unsafe(shown.into(), "mount target could not be made".into()))
}

/// A path that names what `fd` is open on, for mount(2) (which follows it to the very
/// dentry, with no further lookup by name).
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn path_str(p: &Path) -> Result<&str, MountError> {
    p.to_str().ok_or_else(|| {
        MountError::Prepare(
            p.into(),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not utf-8"),
        )
    })
}

/// `EXT4_IOC_RESIZE_FS` (`_IOW('f', 16, __u64)`).
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Grows the ext4 file system mounted at `mount_point` to fill `device_bytes` (online,
/// as `resize2fs` does); the new size in bytes, or `None` if it was that big already.
pub fn grow_ext4(mount_point: &std::path::Path, device_bytes: u64) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd as _;
    let st = nix::sys::statvfs::statvfs(mount_point).map_err(std::io::Error::from)?;
    let block = st.fragment_size().max(1);
    let want = device_bytes / block;
    if want <= st.blocks() {
        return Ok(None);
    }
    let dir = std::fs::File::open(mount_point)?;
    let blocks: u64 = want;
    // SAFETY: the ioctl reads one u64 (the new block count) from the pointer.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(want * block))
}
