//! The sandbox's filesystem view, built by the sandbox's first process inside its new
//! mount namespace: private propagation, the root subvolume bind-mounted on itself, a
//! fresh `/proc`, a minimal `/dev` (devices bind-mounted from the host, a private
//! devpts instance, `/dev/shm`), a tmpfs `/tmp`, then `pivot_root` with the old root
//! detached so nothing of the host stays reachable.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

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
}

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
    binds: &[(&Path, &Path)],
    tmp_size: Option<u64>,
) -> Result<(), MountError> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // 1. Nothing we do may propagate back to the host.
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    // 2. pivot_root needs the new root to be a mount point.
    mnt(
        Some(path_str(root)?),
        root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    // 2b. Volumes.
    for (source, target) in binds {
        let rel = target.strip_prefix("/").unwrap_or(target);
        let at = root.join(rel);
        mkdir_p(&at)?;
        mnt(
            Some(path_str(source)?),
            &at,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
    }
    // 3. A /proc of the sandbox's own PID namespace.
    let proc = root.join("proc");
    mkdir_p(&proc)?;
    mnt(
        Some("proc"),
        &proc,
        Some("proc"),
        nosuid_nodev | MsFlags::MS_NOEXEC,
        None,
    )?;
    // 4. A minimal /dev.
    let dev = root.join("dev");
    mkdir_p(&dev)?;
    mnt(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )?;
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
    let tmp = root.join("tmp");
    mkdir_p(&tmp)?;
    mnt(
        Some("tmpfs"),
        &tmp,
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
        let sys = root.join("sys");
        mkdir_p(&sys)?;
        let flags = nosuid_nodev | MsFlags::MS_NOEXEC;
        mnt(
            Some("sysfs-thp"),
            &sys,
            Some("tmpfs"),
            flags,
            Some("mode=755,size=16k"),
        )?;
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

fn path_str(p: &Path) -> Result<&str, MountError> {
    p.to_str().ok_or_else(|| {
        MountError::Prepare(
            p.into(),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not utf-8"),
        )
    })
}
