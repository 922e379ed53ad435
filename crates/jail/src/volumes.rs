//! Volumes on the host: each is a sparse ext4 image (the size limit: writes past it
//! fail with ENOSPC inside) loop-mounted at a directory under the volumes dir, whose
//! root belongs to the sandboxes' root uid. Sandboxes get a bind mount of that
//! directory, so every sandbox mounting a volume sees the same files at once.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("volume {0} is still in use")]
    Busy(String),
    #[error("volume {0} does not exist on this host")]
    Missing(String),
    #[error(
        "volume {0} was written by a vm sandbox's guest (raw blocks the host does not \
         mount): only vm sandboxes mount it"
    )]
    GuestWritten(String),
}

pub struct Volumes {
    dir: PathBuf,
    uid_base: u32,
    /// Serialises mounting and unmounting.
    lock: tokio::sync::Mutex<()>,
}

async fn run(cmd: &str, args: &[&str]) -> Result<(), VolumeError> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .map_err(|source| VolumeError::Io {
            what: "run",
            path: PathBuf::from(cmd),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VolumeError::Command {
            cmd: format!("{cmd} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Whether a loop device is backed by file `p` (something has it mounted).
fn loop_backs(p: &Path) -> bool {
    let want = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .any(|b| Path::new(b.trim()) == want)
}

/// Whether a process holds a lock on file `p` (QEMU locks the images it opens, with
/// open file description locks).
fn locked_by_another(p: &Path) -> bool {
    use std::os::fd::AsRawFd as _;
    let Ok(f) = std::fs::File::open(p) else {
        return false;
    };
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_WRLCK as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_GETLK fills `l` with a conflicting lock, if any.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut l) };
    rc == 0 && l.l_type != libc::F_UNLCK as libc::c_short
}

/// Whether `p` is a mount point in our mount namespace.
fn is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

impl Volumes {
    pub fn new(dir: &Path, uid_base: u32) -> Volumes {
        Volumes {
            dir: dir.to_path_buf(),
            uid_base,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    fn image(&self, id: &str) -> PathBuf {
        self.dir.join(forkbox_core::volumes::image_file(id))
    }

    /// The mark of a volume a vm guest had writable: its file system is whatever
    /// the guest wrote, so the host kernel never mounts it again.
    fn guest_mark(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.guest-written"))
    }

    /// Hands volume `id` to a runtime that attaches it as a block device: unmounted
    /// from the host (refused while something holds it), marked if the guest may
    /// write it (see [`Volumes::mounted`]); its image.
    pub async fn detach(&self, id: &str, writable: bool) -> Result<PathBuf, VolumeError> {
        let _g = self.lock.lock().await;
        let (img, mnt) = (self.image(id), self.mount_point(id));
        if !img.exists() {
            return Err(VolumeError::Missing(id.to_owned()));
        }
        if is_mounted(&mnt) {
            run("umount", &[&mnt.to_string_lossy()])
                .await
                .map_err(|_| VolumeError::Busy(id.to_owned()))?;
        }
        // A sandbox's bind of the host's mount outlives the mount point: its loop
        // device stays while anything still has the file system mounted (a loop
        // device is let go a moment after its last unmount).
        let mut waited = 0;
        while loop_backs(&img) {
            if waited >= 50 {
                return Err(VolumeError::Busy(id.to_owned()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            waited += 1;
        }
        if writable {
            std::fs::write(self.guest_mark(id), b"").map_err(|source| VolumeError::Io {
                what: "mark",
                path: self.guest_mark(id),
                source,
            })?;
        }
        Ok(img)
    }

    fn mount_point(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Makes the image (sparse) and its file system, and mounts it.
    pub async fn create(&self, id: &str, size_mb: u64) -> Result<(), VolumeError> {
        let img = self.image(id);
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| VolumeError::Io { what, path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let made = async {
            let f = std::fs::File::create_new(&img).map_err(io("create", &img))?;
            f.set_len(size_mb << 20).map_err(io("size", &img))?;
            drop(f);
            let owner = format!(
                "root_owner={}:{},lazy_itable_init=1,lazy_journal_init=1",
                self.uid_base, self.uid_base
            );
            let path = img.to_string_lossy().into_owned();
            run("mkfs.ext4", &["-q", "-F", "-m", "0", "-E", &owner, &path]).await?;
            self.mounted(id).await.map(|_| ())
        }
        .await;
        if made.is_err() {
            let _ = self.delete(id).await;
        }
        made
    }

    /// The volume's mounted directory, mounting it first if needed (after a reboot).
    pub async fn mounted(&self, id: &str) -> Result<PathBuf, VolumeError> {
        let _g = self.lock.lock().await;
        let (img, mnt) = (self.image(id), self.mount_point(id));
        if is_mounted(&mnt) {
            return Ok(mnt);
        }
        if !img.exists() {
            return Err(VolumeError::Missing(id.to_owned()));
        }
        // Never a file system a guest wrote as raw blocks, nor one a QEMU holds open.
        if self.guest_mark(id).exists() {
            return Err(VolumeError::GuestWritten(id.to_owned()));
        }
        if locked_by_another(&img) {
            return Err(VolumeError::Busy(id.to_owned()));
        }
        std::fs::create_dir_all(&mnt).map_err(|source| VolumeError::Io {
            what: "create",
            path: mnt.clone(),
            source,
        })?;
        run(
            "mount",
            &[
                "-o",
                "loop,nosuid,nodev",
                &img.to_string_lossy(),
                &mnt.to_string_lossy(),
            ],
        )
        .await?;
        // lost+found is the host's business, not the sandboxes'.
        let _ = std::fs::remove_dir(mnt.join("lost+found"));
        Ok(mnt)
    }

    /// Unmounts and deletes the volume's data.
    pub async fn delete(&self, id: &str) -> Result<(), VolumeError> {
        let _g = self.lock.lock().await;
        let (img, mnt) = (self.image(id), self.mount_point(id));
        if is_mounted(&mnt) {
            run("umount", &[&mnt.to_string_lossy()])
                .await
                .map_err(|_| VolumeError::Busy(id.to_owned()))?;
        }
        for r in [
            std::fs::remove_dir(&mnt),
            std::fs::remove_file(&img),
            std::fs::remove_file(self.guest_mark(id)),
        ] {
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VolumeError::Io {
                        what: "remove",
                        path: img.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Unmounts every volume (server shutdown with `--on-exit destroy`, `forkbox
    /// down`); returns the mount points unmounted.
    pub async fn unmount_all(&self) -> Vec<PathBuf> {
        let _g = self.lock.lock().await;
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut done = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && is_mounted(&p) && run("umount", &[&p.to_string_lossy()]).await.is_ok()
            {
                done.push(p);
            }
        }
        done
    }

    /// Bytes in use on the volume's file system.
    pub fn used(&self, id: &str) -> Option<u64> {
        let mnt = self.mount_point(id);
        if !is_mounted(&mnt) {
            return None;
        }
        let st = nix::sys::statvfs::statvfs(&mnt).ok()?;
        Some((st.blocks() - st.blocks_free()) * st.fragment_size())
    }
}
