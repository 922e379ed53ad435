//! The btrfs pool holding templates and sandboxes' root filesystems.
//!
//! When the pool directory is not on btrfs, a sparse image file beside it is formatted
//! as btrfs (once) and loop-mounted there.

use std::path::{Path, PathBuf};
use std::process::Command;

use forkbox_sys::btrfs::QuotaMode;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("create {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error(transparent)]
    Btrfs(#[from] forkbox_sys::btrfs::BtrfsError),
    #[error("create pool image {0}: {1}")]
    Image(PathBuf, std::io::Error),
    #[error("{cmd} failed: {detail} (is btrfs-progs installed? `make deps` installs it)")]
    Tool { cmd: String, detail: String },
    #[error("pool {0} is still not btrfs after mounting its image")]
    NotBtrfs(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Pool {
    root: PathBuf,
    /// Whether quota groups are on (sandboxes get disk limits).
    quota: bool,
}

fn run(cmd: &mut Command) -> Result<(), PoolError> {
    let name = format!("{cmd:?}");
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(PoolError::Tool {
            cmd: name,
            detail: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        }),
        Err(e) => Err(PoolError::Tool {
            cmd: name,
            detail: e.to_string(),
        }),
    }
}

impl Pool {
    /// Formats `<root>.img` (sparse, `size_gb`) if it does not exist and mounts it at
    /// `root`.
    fn mount_image(root: &Path, size_gb: u64) -> Result<(), PoolError> {
        let img = root.with_extension("img");
        if !img.exists() {
            tracing::info!(image = %img.display(), size_gb, "creating btrfs pool image");
            let tmp = root.with_extension("img.tmp");
            let f = std::fs::File::create(&tmp).map_err(|e| PoolError::Image(tmp.clone(), e))?;
            f.set_len(size_gb << 30)
                .map_err(|e| PoolError::Image(tmp.clone(), e))?;
            drop(f);
            run(Command::new("mkfs.btrfs").arg("-q").arg(&tmp))?;
            std::fs::rename(&tmp, &img).map_err(|e| PoolError::Image(img.clone(), e))?;
        }
        run(Command::new("mount")
            .args(["-t", "btrfs", "-o", "loop,noatime"])
            .arg(&img)
            .arg(root))?;
        if !forkbox_sys::btrfs::is_btrfs(root)? {
            return Err(PoolError::NotBtrfs(root.into()));
        }
        Ok(())
    }

    /// Opens the pool at `root`, formatting and mounting `<root>.img` (sparse,
    /// `size_gb`) when `root` is not on btrfs.
    /// `disk_limits`: the btrfs quota mode that gives each sandbox a disk limit.
    /// [`QuotaMode::Simple`] (the default) costs forks nothing; on kernels without
    /// simple quotas (before 6.7) the pool runs without limits and says so.
    /// [`QuotaMode::Full`] works everywhere but accounts every snapshot (a fork took
    /// seconds here); [`QuotaMode::Off`] turns quotas off.
    pub fn open(root: &Path, size_gb: u64, disk_limits: QuotaMode) -> Result<Pool, PoolError> {
        std::fs::create_dir_all(root).map_err(|e| PoolError::Dir(root.into(), e))?;
        if !forkbox_sys::btrfs::is_btrfs(root)? {
            // Servers starting at once on one pool: one formats and mounts the image
            // while the others wait, then find it mounted.
            let lock = root.with_extension("img.lock");
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock)
                .map_err(|e| PoolError::Image(lock.clone(), e))?;
            let _held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| PoolError::Image(lock.clone(), e.into()))?;
            if !forkbox_sys::btrfs::is_btrfs(root)? {
                Pool::mount_image(root, size_gb)?;
            }
        }
        for d in ["templates", "sandboxes", "snapshots", "layers"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| PoolError::Dir(p, e))?;
        }
        // Quota groups give each sandbox's subvolume a disk limit.
        let quota = match forkbox_sys::btrfs::set_quota_mode(root, disk_limits) {
            Ok(()) => disk_limits != QuotaMode::Off,
            Err(e) => {
                tracing::warn!(pool = %root.display(), mode = ?disk_limits, error = %e,
                    "btrfs quotas unavailable: sandboxes get no disk limit");
                if let Err(e) = forkbox_sys::btrfs::set_quota_mode(root, QuotaMode::Off) {
                    tracing::warn!(pool = %root.display(), error = %e, "could not turn btrfs quotas off");
                }
                false
            }
        };
        Ok(Pool {
            root: root.into(),
            quota,
        })
    }

    /// The pool at `root` as it is, for clean-up: nothing is made, mounted or
    /// switched (paths under an unmounted pool simply do not exist).
    pub fn attach(root: &Path) -> Pool {
        Pool {
            root: root.into(),
            quota: false,
        }
    }

    /// Limits sandbox subvolume `path` to `bytes` of its own data, when quotas are on.
    pub fn limit(&self, path: &Path, bytes: u64) -> Result<(), forkbox_sys::btrfs::BtrfsError> {
        if self.quota {
            match forkbox_sys::btrfs::limit_exclusive(path, bytes) {
                // Quotas were turned off under us (another server on this pool).
                Err(forkbox_sys::btrfs::BtrfsError::Limit(_, nix::errno::Errno::ENOTCONN)) => {
                    tracing::warn!(sandbox = %path.display(), "btrfs quotas are off: no disk limit");
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Whether sandboxes get disk limits.
    pub fn disk_limits(&self) -> bool {
        self.quota
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn template(&self, name: &str) -> PathBuf {
        self.root.join("templates").join(name)
    }

    pub fn template_meta(&self, name: &str) -> PathBuf {
        self.root.join("templates").join(format!("{name}.json"))
    }

    /// The build log kept beside a template built through the API.
    pub fn template_log(&self, name: &str) -> PathBuf {
        self.root.join("templates").join(format!("{name}.log"))
    }

    /// A named snapshot's (read-only) root filesystem.
    pub fn snapshot(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

    /// A template build's step, kept: the build's filesystem after its steps up to
    /// one, read-only, named by a hash of everything they depended on (`build.rs`).
    pub fn build_step(&self, key: &str) -> PathBuf {
        self.root.join("build-cache").join(key)
    }

    pub fn sandbox(&self, id: &str) -> PathBuf {
        self.root.join("sandboxes").join(id)
    }

    /// The chain of layers under a layered sandbox's root (see `layers.rs`).
    pub fn sandbox_chain(&self, id: &str) -> PathBuf {
        self.root.join("sandboxes").join(format!("{id}.lower"))
    }

    /// The chain of layers under a named snapshot of a layered sandbox.
    pub fn snapshot_chain(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(format!("{id}.lower"))
    }

    /// Read-only layers sandboxes stand on (see `layers.rs`).
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.root.join("templates").join(".lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// Writes `mib` MiB into `path`, returning how many got written before an error.
    fn write_mib(path: &Path, mib: usize) -> (usize, Option<std::io::Error>) {
        let mut f = match std::fs::File::create(path) {
            Ok(f) => f,
            Err(e) => return (0, Some(e)),
        };
        let block = vec![7u8; 1 << 20];
        for i in 0..mib {
            if let Err(e) = f.write_all(&block).and_then(|()| f.sync_data()) {
                return (i, Some(e));
            }
        }
        (mib, None)
    }

    /// Servers starting at once on one pool: every one opens it, its image is made
    /// and mounted once (before, a second `mount` of the image failed the start).
    #[test]
    fn pools_opened_at_once_mount_their_image_once() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("forkbox-race-test-{}", std::process::id()));
        let root = dir.join("pool");
        std::fs::create_dir_all(&root).unwrap();
        let opened: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|_| s.spawn(|| Pool::open(&root, 1, QuotaMode::Off).is_ok()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(root.to_str().unwrap()))
            .count();
        while Command::new("umount")
            .arg(&root)
            .status()
            .is_ok_and(|s| s.success())
        {}
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(opened, vec![true; 6]);
        assert_eq!(mounts, 1);
    }

    /// Snapshots go through a private directory and are renamed into place: many at
    /// once into one directory all land, none overwrites an existing path, no staging
    /// directory stays behind, and a crash's leftovers are removed by age.
    #[test]
    fn snapshots_land_through_a_private_directory() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("forkbox-snap-test-{}", std::process::id()));
        let root = dir.join("pool");
        std::fs::create_dir_all(&root).unwrap();
        let pool = Pool::open(&root, 1, QuotaMode::Off).unwrap();
        let result = std::panic::catch_unwind(|| {
            let base = root.join("templates/base");
            forkbox_sys::btrfs::create_subvolume(&base).unwrap();
            std::fs::write(base.join("f"), "x").unwrap();
            let ids: Vec<String> = (0..16).map(|i| format!("c{i}")).collect();
            std::thread::scope(|s| {
                for id in &ids {
                    let (base, dst) = (&base, pool.sandbox(id));
                    s.spawn(move || forkbox_sys::btrfs::snapshot(base, &dst, false).unwrap());
                }
            });
            for id in &ids {
                assert_eq!(
                    std::fs::read_to_string(pool.sandbox(id).join("f")).unwrap(),
                    "x"
                );
            }
            let names: Vec<String> = std::fs::read_dir(root.join("sandboxes"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(names.len(), 16, "{names:?}");
            // An existing destination is never replaced, not even an empty directory.
            std::fs::create_dir(pool.sandbox("empty")).unwrap();
            for id in ["c0", "empty"] {
                let err =
                    forkbox_sys::btrfs::snapshot(&base, &pool.sandbox(id), false).unwrap_err();
                assert!(
                    matches!(
                        err,
                        forkbox_sys::btrfs::BtrfsError::Snapshot(_, _, nix::errno::Errno::EEXIST)
                    ),
                    "{err}"
                );
            }
            // Read-only snapshots (named snapshots) are taken in place and stay read-only.
            let ro = pool.snapshot("ro");
            forkbox_sys::btrfs::snapshot(&base, &ro, true).unwrap();
            assert_eq!(std::fs::read_to_string(ro.join("f")).unwrap(), "x");
            assert!(std::fs::write(ro.join("g"), "y").is_err());
            // A crash between snapshot and rename: removed once old enough.
            let stale = root.join("sandboxes/.snap-gone");
            std::fs::create_dir(&stale).unwrap();
            forkbox_sys::btrfs::snapshot(&base, &stale.join("inner"), false).unwrap();
            std::fs::rename(stale.join("inner"), stale.join("gone")).unwrap();
            let sandboxes = root.join("sandboxes");
            assert_eq!(
                forkbox_sys::btrfs::remove_stale_staging(&sandboxes, Duration::from_secs(60)),
                0
            );
            assert_eq!(
                forkbox_sys::btrfs::remove_stale_staging(&sandboxes, Duration::ZERO),
                1
            );
            assert!(!stale.exists());
        });
        unmount_patiently(&root);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }

    /// Unmounts a test pool: a moment after its last use the file system can still be
    /// busy (a transient reference), and a pool left mounted keeps its loop device
    /// (its image deleted) for the next run's host scan; lazily as a last resort.
    fn unmount_patiently(root: &Path) {
        for _ in 0..50 {
            if Command::new("umount")
                .arg(root)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(root).status();
    }

    /// A subvolume holding nested ones (what user code could make with btrfs ioctls
    /// before seccomp denied them) is deleted whole: nested ones first.
    #[test]
    fn nested_subvolumes_are_deleted_with_their_parent() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("forkbox-nest-test-{}", std::process::id()));
        let root = dir.join("pool");
        std::fs::create_dir_all(&root).unwrap();
        let pool = Pool::open(&root, 1, QuotaMode::Off).unwrap();
        let result = std::panic::catch_unwind(|| {
            let outer = pool.sandbox("outer");
            forkbox_sys::btrfs::create_subvolume(&outer).unwrap();
            std::fs::create_dir_all(outer.join("a/b")).unwrap();
            forkbox_sys::btrfs::create_subvolume(&outer.join("a/b/inner")).unwrap();
            forkbox_sys::btrfs::create_subvolume(&outer.join("a/b/inner/deeper")).unwrap();
            std::fs::write(outer.join("a/b/inner/deeper/data"), vec![7u8; 1 << 20]).unwrap();
            forkbox_sys::btrfs::snapshot(&outer.join("a/b/inner"), &outer.join("ro"), true)
                .unwrap();
            std::os::unix::fs::symlink("/", outer.join("a/root-link")).unwrap();
            forkbox_sys::btrfs::delete_subvolume(&outer).unwrap();
            assert!(!outer.exists());
            assert!(std::fs::read_dir(root.join("sandboxes"))
                .unwrap()
                .next()
                .is_none());
        });
        unmount_patiently(&root);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }

    /// A pool on its own loop image (root only: mounts): simple quotas limit what a
    /// snapshot writes, not what it shares with its source; switching modes works.
    #[test]
    fn simple_quotas_limit_a_snapshot_own_writes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("forkbox-pool-test-{}", std::process::id()));
        let root = dir.join("pool");
        std::fs::create_dir_all(&root).unwrap();
        let pool = Pool::open(&root, 2, QuotaMode::Full).unwrap();
        let result = std::panic::catch_unwind(|| {
            assert!(pool.disk_limits());
            assert_eq!(
                forkbox_sys::btrfs::quota_mode(&root).unwrap(),
                QuotaMode::Full
            );
            let pool = Pool::open(&root, 2, QuotaMode::Simple).unwrap();
            if forkbox_sys::btrfs::quota_mode(&root).unwrap() != QuotaMode::Simple {
                eprintln!("skipped: this kernel has no simple quotas");
                return;
            }
            assert!(pool.disk_limits());
            let base = root.join("templates/base");
            forkbox_sys::btrfs::create_subvolume(&base).unwrap();
            assert_eq!(write_mib(&base.join("big"), 64).0, 64);
            let child = pool.sandbox("child");
            forkbox_sys::btrfs::snapshot(&base, &child, false).unwrap();
            pool.limit(&child, 32 << 20).unwrap();
            // The 64 MiB shared with the template do not count; 16 MiB of its own fit.
            assert_eq!(write_mib(&child.join("own"), 16).0, 16);
            let (n, err) = write_mib(&child.join("more"), 64);
            assert!(n < 32, "wrote {n} MiB past a 32 MiB limit");
            let err = err.expect("a write past the limit fails");
            assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
            // Deleting frees the charge: the same write fits again.
            std::fs::remove_file(child.join("more")).unwrap();
            std::fs::remove_file(child.join("own")).unwrap();
            nix::unistd::sync();
            assert_eq!(write_mib(&child.join("again"), 8).0, 8);
            let off = Pool::open(&root, 2, QuotaMode::Off).unwrap();
            assert!(!off.disk_limits());
            assert_eq!(
                forkbox_sys::btrfs::quota_mode(&root).unwrap(),
                QuotaMode::Off
            );
        });
        unmount_patiently(&root);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}
