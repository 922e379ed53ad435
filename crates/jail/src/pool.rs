//! The btrfs pool holding templates and sandboxes' root filesystems.
//!
//! When the pool directory is not on btrfs, a sparse image file beside it is formatted
//! as btrfs (once) and loop-mounted there.

use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// Opens the pool at `root`, formatting and mounting `<root>.img` (sparse,
    /// `size_gb`) when `root` is not on btrfs.
    /// `disk_limits`: turn on btrfs quota groups so each sandbox gets a disk limit. With
    /// consistent accounting every snapshot is accounted, which made a fork take
    /// seconds here; off (the default), quota groups are turned off if an earlier run
    /// left them on.
    pub fn open(root: &Path, size_gb: u64, disk_limits: bool) -> Result<Pool, PoolError> {
        std::fs::create_dir_all(root).map_err(|e| PoolError::Dir(root.into(), e))?;
        if !forkbox_sys::btrfs::is_btrfs(root)? {
            let img = root.with_extension("img");
            if !img.exists() {
                tracing::info!(image = %img.display(), size_gb, "creating btrfs pool image");
                let tmp = root.with_extension("img.tmp");
                let f =
                    std::fs::File::create(&tmp).map_err(|e| PoolError::Image(tmp.clone(), e))?;
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
        }
        for d in ["templates", "sandboxes", "snapshots"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| PoolError::Dir(p, e))?;
        }
        // Quota groups give each sandbox's subvolume a disk limit.
        if !disk_limits {
            if let Err(e) = forkbox_sys::btrfs::disable_quota(root) {
                tracing::warn!(pool = %root.display(), error = %e, "could not turn btrfs quotas off");
            }
        }
        let quota = match disk_limits.then(|| {
            forkbox_sys::btrfs::enable_quota(root)
                .and_then(|()| forkbox_sys::btrfs::ensure_quota_consistent(root))
        }) {
            None => false,
            Some(r) => match r {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(pool = %root.display(), error = %e, "btrfs quotas unavailable: sandboxes get no disk limit");
                    false
                }
            },
        };
        Ok(Pool {
            root: root.into(),
            quota,
        })
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

    pub fn sandbox(&self, id: &str) -> PathBuf {
        self.root.join("sandboxes").join(id)
    }

    pub fn lock_file(&self) -> PathBuf {
        self.root.join("templates").join(".lock")
    }
}
