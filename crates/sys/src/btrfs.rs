//! btrfs subvolumes through the kernel's ioctls: create, snapshot, destroy, read-only.
//!
//! A sandbox's root filesystem is a writable snapshot of its template's subvolume:
//! O(1) and copy-on-write.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
const BTRFS_PATH_NAME_MAX: usize = 4087;
const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

nix::ioctl_write_ptr!(ioc_subvol_create, BTRFS_IOCTL_MAGIC, 14, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_destroy, BTRFS_IOCTL_MAGIC, 15, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_create_v2, BTRFS_IOCTL_MAGIC, 23, VolArgsV2);
nix::ioctl_read!(ioc_subvol_getflags, BTRFS_IOCTL_MAGIC, 25, u64);
nix::ioctl_write_ptr!(ioc_subvol_setflags, BTRFS_IOCTL_MAGIC, 26, u64);

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `struct btrfs_ioctl_qgroup_limit_args` (with its `struct btrfs_qgroup_limit`).
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

const BTRFS_QUOTA_CTL_ENABLE: u64 = 1;
const BTRFS_QUOTA_CTL_DISABLE: u64 = 2;
/// Simple quotas (Linux 6.7+): each extent is charged to the subvolume that wrote it,
/// so snapshots and deletions cost no back-reference walks.
const BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA: u64 = 4;
const BTRFS_QGROUP_LIMIT_MAX_EXCL: u64 = 1 << 1;

nix::ioctl_readwrite!(ioc_quota_ctl, BTRFS_IOCTL_MAGIC, 40, QuotaCtlArgs);
/// `struct btrfs_ioctl_quota_rescan_args`.
#[repr(C)]
struct QuotaRescanArgs {
    flags: u64,
    progress: u64,
    reserved: [u64; 6],
}
nix::ioctl_write_ptr!(ioc_quota_rescan, BTRFS_IOCTL_MAGIC, 44, QuotaRescanArgs);
nix::ioctl_none!(ioc_quota_rescan_wait, BTRFS_IOCTL_MAGIC, 46);
// `struct btrfs_ioctl_fs_info_args` is 1024 bytes; the fsid is at bytes 16..32.
nix::ioctl_read!(ioc_fs_info, BTRFS_IOCTL_MAGIC, 31, [u8; 1024]);
// The kernel declares this one _IOR although it only reads the argument.
nix::ioctl_read!(ioc_qgroup_limit, BTRFS_IOCTL_MAGIC, 43, QgroupLimitArgs);

#[derive(Debug, thiserror::Error)]
pub enum BtrfsError {
    #[error("open {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("invalid subvolume path {0}")]
    BadPath(PathBuf),
    #[error("create subvolume {0}: {1}")]
    Create(PathBuf, nix::Error),
    #[error("snapshot {0} to {1}: {2}")]
    Snapshot(PathBuf, PathBuf, nix::Error),
    #[error("delete subvolume {0}: {1}")]
    Delete(PathBuf, nix::Error),
    #[error("set flags of subvolume {0}: {1}")]
    Flags(PathBuf, nix::Error),
    #[error("statfs {0}: {1}")]
    Statfs(PathBuf, nix::Error),
    #[error("enable quotas on {0}: {1}")]
    Quota(PathBuf, nix::Error),
    #[error("limit subvolume {0}: {1}")]
    Limit(PathBuf, nix::Error),
}

/// Splits `path` into its opened parent directory and its final component.
fn parent_and_name(path: &Path) -> Result<(File, &OsStr), BtrfsError> {
    let name = path
        .file_name()
        .ok_or_else(|| BtrfsError::BadPath(path.into()))?;
    let parent = path
        .parent()
        .ok_or_else(|| BtrfsError::BadPath(path.into()))?;
    let dir = File::open(parent).map_err(|e| BtrfsError::Open(parent.into(), e))?;
    Ok((dir, name))
}

fn copy_name(dst: &mut [u8], name: &OsStr, path: &Path) -> Result<(), BtrfsError> {
    let bytes = name.as_bytes();
    if bytes.len() >= dst.len() || bytes.contains(&0) {
        return Err(BtrfsError::BadPath(path.into()));
    }
    dst[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

fn vol_args(name: &OsStr, path: &Path) -> Result<Box<VolArgs>, BtrfsError> {
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    });
    copy_name(&mut args.name, name, path)?;
    Ok(args)
}

/// True when `path` lives on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> Result<bool, BtrfsError> {
    let st = nix::sys::statfs::statfs(path).map_err(|e| BtrfsError::Statfs(path.into(), e))?;
    #[allow(clippy::unnecessary_cast)]
    Ok(st.filesystem_type().0 as i64 == BTRFS_SUPER_MAGIC)
}

/// Creates an empty subvolume at `path` (its parent must exist on btrfs).
pub fn create_subvolume(path: &Path) -> Result<(), BtrfsError> {
    let (dir, name) = parent_and_name(path)?;
    let args = vol_args(name, path)?;
    // SAFETY: `args` is a valid, fully initialised btrfs_ioctl_vol_args that outlives the call.
    unsafe { ioc_subvol_create(dir.as_raw_fd(), &*args) }
        .map_err(|e| BtrfsError::Create(path.into(), e))?;
    Ok(())
}

/// The prefix of the private directory [`snapshot`] creates a snapshot in before
/// renaming it into place: `<parent>/.snap-<name>/<name>`. A crash can leave one
/// behind; [`remove_stale_staging`] removes them.
pub const STAGING_PREFIX: &str = ".snap-";

/// Snapshots subvolume `src` to the new path `dst` (writable unless `readonly`);
/// fails with EEXIST when `dst` exists.
///
/// The kernel holds the destination directory's inode lock across the transaction
/// commit a snapshot needs, so snapshots into one directory (a fork's children, all in
/// `sandboxes/`) are taken one commit after the other. Each snapshot is therefore made
/// in a private directory beside `dst` and renamed into place (no commit): snapshots
/// taken together then share commits (32 at once: ~0.2 s instead of 1.5-3.5 s here).
/// A read-only snapshot cannot be moved to another directory (EROFS: its `..` would
/// change), so read-only ones (named snapshots, rare and one at a time) are taken in
/// place.
pub fn snapshot(src: &Path, dst: &Path, readonly: bool) -> Result<(), BtrfsError> {
    let (parent, name) = (
        dst.parent()
            .ok_or_else(|| BtrfsError::BadPath(dst.into()))?,
        dst.file_name()
            .ok_or_else(|| BtrfsError::BadPath(dst.into()))?,
    );
    let snap_err = |e: nix::Error| BtrfsError::Snapshot(src.into(), dst.into(), e);
    let io_err = |e: std::io::Error| {
        snap_err(nix::errno::Errno::from_raw(
            e.raw_os_error().unwrap_or(libc::EIO),
        ))
    };
    if dst.symlink_metadata().is_ok() {
        return Err(snap_err(nix::errno::Errno::EEXIST));
    }
    if readonly {
        return snapshot_at(src, dst, true);
    }
    let mut staging_name = std::ffi::OsString::from(STAGING_PREFIX);
    staging_name.push(name);
    let staging = parent.join(staging_name);
    match std::fs::create_dir(&staging) {
        Ok(()) => {}
        // A crash's leftover (one being used now is younger): removed, then ours.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !remove_staging(&staging, name, STALE_STAGING) {
                return Err(io_err(e));
            }
            std::fs::create_dir(&staging).map_err(io_err)?;
        }
        Err(e) => return Err(io_err(e)),
    }
    let staged = staging.join(name);
    let result = snapshot_at(src, &staged, false).and_then(|()| {
        nix::fcntl::renameat2(
            None,
            &staged,
            None,
            dst,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| {
            let _ = delete_subvolume(&staged);
            snap_err(e)
        })
    });
    let _ = std::fs::remove_dir(&staging);
    result
}

/// A staging directory older than this is a crash's leftover: no snapshot takes so long.
pub const STALE_STAGING: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes staging directories [`snapshot`] left in `dir` (a crash between the snapshot
/// and its rename) that are older than `min_age`, with the subvolume in each; returns
/// how many it removed.
pub fn remove_stale_staging(dir: &Path, min_age: std::time::Duration) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| {
            let name = e.file_name();
            match name.to_str().and_then(|n| n.strip_prefix(STAGING_PREFIX)) {
                Some(inner) => remove_staging(&e.path(), OsStr::new(inner), min_age),
                None => false,
            }
        })
        .count()
}

/// Removes staging directory `staging` (holding subvolume `name`) when it is older than
/// `min_age`; true when it is gone.
fn remove_staging(staging: &Path, name: &OsStr, min_age: std::time::Duration) -> bool {
    let old = std::fs::symlink_metadata(staging)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= min_age);
    if !old {
        return false;
    }
    let inner = staging.join(name);
    if inner.exists() && delete_subvolume(&inner).is_err() {
        return false;
    }
    std::fs::remove_dir(staging).is_ok()
}

/// Snapshots `src` to `dst` in one ioctl in `dst`'s directory.
fn snapshot_at(src: &Path, dst: &Path, readonly: bool) -> Result<(), BtrfsError> {
    let source = File::open(src).map_err(|e| BtrfsError::Open(src.into(), e))?;
    let (dir, name) = parent_and_name(dst)?;
    let mut args = Box::new(VolArgsV2 {
        fd: i64::from(source.as_raw_fd()),
        transid: 0,
        flags: if readonly { BTRFS_SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
    });
    copy_name(&mut args.name, name, dst)?;
    // SAFETY: `args` is a valid btrfs_ioctl_vol_args_v2; `source` stays open across the call.
    unsafe { ioc_snap_create_v2(dir.as_raw_fd(), &*args) }
        .map_err(|e| BtrfsError::Snapshot(src.into(), dst.into(), e))?;
    Ok(())
}

/// Deletes the subvolume at `path` with everything in it, subvolumes nested in it
/// included (the kernel refuses a subvolume holding another with ENOTEMPTY).
pub fn delete_subvolume(path: &Path) -> Result<(), BtrfsError> {
    match delete_one(path) {
        Err(BtrfsError::Delete(_, nix::errno::Errno::ENOTEMPTY)) => {
            for nested in nested_subvolumes(path) {
                delete_subvolume(&nested)?;
            }
            delete_one(path)
        }
        other => other,
    }
}

fn delete_one(path: &Path) -> Result<(), BtrfsError> {
    // A read-only subvolume must be made writable before it can be deleted by path.
    let _ = set_readonly(path, false);
    let (dir, name) = parent_and_name(path)?;
    let args = vol_args(name, path)?;
    // SAFETY: `args` is a valid, fully initialised btrfs_ioctl_vol_args.
    unsafe { ioc_snap_destroy(dir.as_raw_fd(), &*args) }
        .map_err(|e| BtrfsError::Delete(path.into(), e))?;
    Ok(())
}

/// The roots of the subvolumes directly nested in subvolume `root` (not those nested
/// in them), found by walking it without following symlinks: a subvolume's root
/// directory has inode 256 and a device number of its own.
fn nested_subvolumes(root: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    const FIRST_FREE_OBJECTID: u64 = 256;
    let Ok(top) = std::fs::symlink_metadata(root) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if !m.file_type().is_dir() {
                continue;
            }
            if m.ino() == FIRST_FREE_OBJECTID && m.dev() != top.dev() {
                found.push(e.path());
            } else {
                stack.push(e.path());
            }
        }
    }
    found
}

/// How the filesystem accounts space to subvolumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// No quota groups: no limits.
    Off,
    /// Full quota groups: shared extents are tracked through back references, which
    /// makes every snapshot and deletion walk them (seconds for a fork on a busy pool).
    Full,
    /// Simple quotas (Linux 6.7+): an extent is charged to the subvolume that wrote it
    /// and stays there; snapshots cost nothing extra. A snapshot is only charged for
    /// what it writes itself, which is what a per-sandbox disk limit needs.
    Simple,
}

fn quota_ctl(path: &Path, cmd: u64) -> Result<(), BtrfsError> {
    let f = File::open(path).map_err(|e| BtrfsError::Open(path.into(), e))?;
    let mut args = QuotaCtlArgs { cmd, status: 0 };
    // SAFETY: `args` is a valid btrfs_ioctl_quota_ctl_args for the whole call.
    match unsafe { ioc_quota_ctl(f.as_raw_fd(), &mut args) } {
        Ok(_) => Ok(()),
        // Disabling quotas that are off.
        Err(nix::errno::Errno::ENOTCONN) if cmd == BTRFS_QUOTA_CTL_DISABLE => Ok(()),
        Err(e) => Err(BtrfsError::Quota(path.into(), e)),
    }
}

/// The `/sys/fs/btrfs/<uuid>` directory of the filesystem holding `path`.
fn sysfs_dir(path: &Path) -> Result<PathBuf, BtrfsError> {
    let f = File::open(path).map_err(|e| BtrfsError::Open(path.into(), e))?;
    let mut info = [0u8; 1024];
    // SAFETY: the kernel writes a btrfs_ioctl_fs_info_args (1024 bytes) into `info`.
    unsafe { ioc_fs_info(f.as_raw_fd(), &mut info) }
        .map_err(|e| BtrfsError::Quota(path.into(), e))?;
    let hex: String = info[16..32].iter().map(|b| format!("{b:02x}")).collect();
    Ok(PathBuf::from(format!(
        "/sys/fs/btrfs/{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )))
}

/// The quota mode the filesystem holding `path` is in now.
pub fn quota_mode(path: &Path) -> Result<QuotaMode, BtrfsError> {
    let dir = sysfs_dir(path)?.join("qgroups");
    Ok(match std::fs::read_to_string(dir.join("mode")) {
        Ok(m) if m.trim() == "squota" => QuotaMode::Simple,
        Ok(_) => QuotaMode::Full,
        // Kernels before 6.7 have no `mode` file: the directory exists iff quotas are on.
        Err(_) if dir.is_dir() => QuotaMode::Full,
        Err(_) => QuotaMode::Off,
    })
}

/// Puts the filesystem holding `path` in quota mode `mode` (turning quotas off first
/// when it is in the other mode; a no-op when it is already in `mode`). Fails with
/// EINVAL for [`QuotaMode::Simple`] on kernels before 6.7.
pub fn set_quota_mode(path: &Path, mode: QuotaMode) -> Result<(), BtrfsError> {
    let now = quota_mode(path)?;
    if now == mode {
        return Ok(());
    }
    if now != QuotaMode::Off {
        quota_ctl(path, BTRFS_QUOTA_CTL_DISABLE)?;
    }
    match mode {
        QuotaMode::Off => Ok(()),
        QuotaMode::Full => {
            quota_ctl(path, BTRFS_QUOTA_CTL_ENABLE)?;
            ensure_quota_consistent(path)
        }
        QuotaMode::Simple => quota_ctl(path, BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA),
    }
}

/// Makes quota-group accounting trustworthy: when the kernel says it is inconsistent
/// (quotas just enabled on a filesystem with data, or an earlier accounting gap), limits
/// are not enforced until a rescan ends, so this starts one and waits for it (seconds
/// on a pool with many subvolumes, once).
pub fn ensure_quota_consistent(path: &Path) -> Result<(), BtrfsError> {
    let flag = std::fs::read_to_string(sysfs_dir(path)?.join("qgroups/inconsistent"))
        .unwrap_or_else(|_| "1".into());
    if flag.trim() == "0" {
        return Ok(());
    }
    let f = File::open(path).map_err(|e| BtrfsError::Open(path.into(), e))?;
    let args = QuotaRescanArgs {
        flags: 0,
        progress: 0,
        reserved: [0; 6],
    };
    // SAFETY: `args` is a valid btrfs_ioctl_quota_rescan_args for the whole call.
    match unsafe { ioc_quota_rescan(f.as_raw_fd(), &args) } {
        Ok(_) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(BtrfsError::Quota(path.into(), e)),
    }
    // SAFETY: no argument.
    unsafe { ioc_quota_rescan_wait(f.as_raw_fd()) }
        .map_err(|e| BtrfsError::Quota(path.into(), e))?;
    Ok(())
}

/// Limits the bytes the subvolume at `path` may hold exclusively (data it shares with
/// its template does not count); writes past it fail with EDQUOT. Needs
/// [`enable_quota`] first.
pub fn limit_exclusive(path: &Path, bytes: u64) -> Result<(), BtrfsError> {
    let f = File::open(path).map_err(|e| BtrfsError::Open(path.into(), e))?;
    // qgroupid 0: the qgroup of the subvolume the fd is in.
    let mut args = QgroupLimitArgs {
        qgroupid: 0,
        flags: BTRFS_QGROUP_LIMIT_MAX_EXCL,
        max_rfer: 0,
        max_excl: bytes,
        rsv_rfer: 0,
        rsv_excl: 0,
    };
    // SAFETY: `args` is a valid btrfs_ioctl_qgroup_limit_args for the whole call.
    unsafe { ioc_qgroup_limit(f.as_raw_fd(), &mut args) }
        .map_err(|e| BtrfsError::Limit(path.into(), e))?;
    Ok(())
}

/// Marks a subvolume read-only (or writable again).
pub fn set_readonly(path: &Path, readonly: bool) -> Result<(), BtrfsError> {
    let f = File::open(path).map_err(|e| BtrfsError::Open(path.into(), e))?;
    let mut flags: u64 = 0;
    // SAFETY: the kernel writes one u64 into `flags`.
    unsafe { ioc_subvol_getflags(f.as_raw_fd(), &mut flags) }
        .map_err(|e| BtrfsError::Flags(path.into(), e))?;
    let new = if readonly {
        flags | BTRFS_SUBVOL_RDONLY
    } else {
        flags & !BTRFS_SUBVOL_RDONLY
    };
    if new != flags {
        // SAFETY: the kernel reads one u64 from `new`.
        unsafe { ioc_subvol_setflags(f.as_raw_fd(), &new) }
            .map_err(|e| BtrfsError::Flags(path.into(), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_structs_have_the_kernel_sizes() {
        assert_eq!(std::mem::size_of::<QuotaCtlArgs>(), 16);
        assert_eq!(std::mem::size_of::<QgroupLimitArgs>(), 48);
        assert_eq!(std::mem::size_of::<QuotaRescanArgs>(), 64);
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
    }

    #[test]
    fn rejects_paths_without_a_name() {
        assert!(matches!(
            create_subvolume(Path::new("/")),
            Err(BtrfsError::BadPath(_))
        ));
    }
}
