//! File operations inside the sandbox, done by the agent in the sandbox's own mount
//! namespace. Every path is resolved with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` from the sandbox's root: `..` and absolute symlinks stay
//! inside it, and `/proc/<pid>/{root,fd/*,cwd,exe}` links (which could lead to the
//! agent's own host-side files) are refused. Once opened, work continues on the fd, so
//! swapping a path component mid-transfer changes nothing.

use forkbox_types::agent::{FileInfo, FileKind, FileOp, FileOpReply, Refusal, WriteReply};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstatat, FileStat, Mode};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("invalid path: {0}")]
    BadPath(&'static str),
    #[error("{path}: {errno}")]
    Os { path: String, errno: Errno },
    #[error("{path} is not a regular file ({kind}); only regular files are read")]
    NotRegular { path: String, kind: &'static str },
}

impl FileError {
    /// The kind of refusal the agent answers with.
    pub fn refusal(&self) -> Refusal {
        match self {
            FileError::BadPath(_) => Refusal::FileInvalid,
            FileError::NotRegular { .. } => Refusal::FileConflict,
            FileError::Os { errno, .. } => match errno {
                Errno::ENOENT => Refusal::FileNotFound,
                Errno::ENOTDIR
                | Errno::EISDIR
                | Errno::ENOTEMPTY
                | Errno::EEXIST
                | Errno::EXDEV => Refusal::FileConflict,
                Errno::EACCES | Errno::EPERM | Errno::EROFS => Refusal::FileDenied,
                Errno::ENOSPC | Errno::EDQUOT => Refusal::NoSpace,
                _ => Refusal::FileInvalid,
            },
        }
    }
}

fn os(path: &str) -> impl Fn(Errno) -> FileError + '_ {
    move |errno| FileError::Os {
        path: path.to_owned(),
        errno,
    }
}

/// Makes `path` absolute (relative paths are relative to /root) and checks it.
pub fn normalize(path: &str) -> Result<String, FileError> {
    if path.is_empty() {
        return Err(FileError::BadPath("empty"));
    }
    if path.contains('\0') {
        return Err(FileError::BadPath("contains NUL"));
    }
    if path.len() > 4096 {
        return Err(FileError::BadPath("longer than 4096 bytes"));
    }
    if path.split('/').any(|c| c == "..") {
        // It could not leave the root anyway (RESOLVE_IN_ROOT), but a client that
        // sends one is confused or probing: say so.
        return Err(FileError::BadPath("contains a .. component"));
    }
    Ok(if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/root/{path}")
    })
}

fn root() -> Result<OwnedFd, FileError> {
    nix::fcntl::open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(|fd| {
        // SAFETY: a fresh fd we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
    .map_err(os("/"))
}

/// `openat2` of `path` inside the sandbox's root.
pub fn open_in_root(path: &str, flags: OFlag, mode: u32) -> Result<OwnedFd, FileError> {
    open_beneath(root()?.as_fd(), path, flags, mode)
}

/// `openat2` of `path` with `root` as its root directory (`RESOLVE_IN_ROOT |
/// RESOLVE_NO_MAGICLINKS`): `..`, absolute paths and symlinks resolve as if `root`
/// were `/`, so the result is always `root` or beneath it. [`open_in_root`] uses the
/// process's root; the fuzz targets use a temporary directory.
pub fn open_beneath(
    root: BorrowedFd<'_>,
    path: &str,
    flags: OFlag,
    mode: u32,
) -> Result<OwnedFd, FileError> {
    let c = CString::new(path).map_err(|_| FileError::BadPath("contains NUL"))?;
    forkbox_sys::openat2::openat2(
        root,
        &c,
        flags.bits(),
        mode,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(os(path))
}

/// The directory holding `path` (opened safely) and the last component's name.
fn parent_of(path: &str) -> Result<(OwnedFd, String), FileError> {
    let p = std::path::Path::new(path);
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or(FileError::BadPath("names no file"))?;
    if name == "." || name == ".." {
        return Err(FileError::BadPath("names no file"));
    }
    let parent = p.parent().and_then(|p| p.to_str()).unwrap_or("/");
    let dir = open_in_root(parent, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
    Ok((dir, name.to_owned()))
}

fn kind(st: &FileStat) -> FileKind {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileKind::File,
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        _ => FileKind::Other,
    }
}

fn info(dir: &OwnedFd, name: &str, path: &str) -> Result<FileInfo, FileError> {
    let st =
        fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(os(path))?;
    let k = kind(&st);
    let target = if k == FileKind::Symlink {
        nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(FileInfo {
        name: name.to_owned(),
        path: path.to_owned(),
        kind: k,
        size: st.st_size.max(0) as u64,
        mode: st.st_mode & 0o7777,
        mtime: st.st_mtime,
        target,
    })
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// `mkdir -p` inside the root.
pub fn mkdir_p(path: &str) -> Result<(), FileError> {
    let comps: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let mut cur = String::from("/");
    for c in comps {
        if c == ".." {
            return Err(FileError::BadPath("contains .."));
        }
        let next = join(&cur, c);
        match open_in_root(&next, OFlag::O_PATH | OFlag::O_DIRECTORY, 0) {
            Ok(_) => {}
            Err(FileError::Os {
                errno: Errno::ENOENT,
                ..
            }) => {
                let dir = open_in_root(&cur, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
                match nix::sys::stat::mkdirat(
                    Some(dir.as_raw_fd()),
                    c,
                    Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(os(&next)(e)),
                }
            }
            Err(e) => return Err(e),
        }
        cur = next;
    }
    Ok(())
}

/// Removes `name` in `dir`, descending into directories (never following symlinks).
fn remove_tree(dir: &OwnedFd, name: &str, path: &str) -> Result<(), FileError> {
    let st =
        fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(os(path))?;
    if kind(&st) == FileKind::Dir {
        let sub = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(os(path))?;
        // SAFETY: a fresh fd we own.
        let sub = unsafe { OwnedFd::from_raw_fd(sub) };
        let names: Vec<String> = {
            let d = nix::dir::Dir::from_fd(nix::unistd::dup(sub.as_raw_fd()).map_err(os(path))?)
                .map_err(os(path))?;
            let mut d = d;
            d.iter()
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().ok().map(str::to_owned))
                .filter(|n| n != "." && n != "..")
                .collect()
        };
        for n in names {
            remove_tree(&sub, &n, &join(path, &n))?;
        }
        nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::RemoveDir,
        )
        .map_err(os(path))
    } else {
        nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(os(path))
    }
}

/// Runs one metadata operation.
pub fn op(op: FileOp) -> Result<FileOpReply, FileError> {
    match op {
        FileOp::Ls { path } => {
            let path = normalize(&path)?;
            let dir = open_in_root(&path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
            let mut d =
                nix::dir::Dir::from_fd(nix::unistd::dup(dir.as_raw_fd()).map_err(os(&path))?)
                    .map_err(os(&path))?;
            let mut entries = Vec::new();
            for e in d.iter().filter_map(|e| e.ok()) {
                let Ok(name) = e.file_name().to_str() else {
                    continue;
                };
                if name == "." || name == ".." {
                    continue;
                }
                if let Ok(i) = info(&dir, name, &join(&path, name)) {
                    entries.push(i);
                }
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(FileOpReply::Entries { entries })
        }
        FileOp::Stat { path } => {
            let path = normalize(&path)?;
            if path.trim_end_matches('/').is_empty() {
                let r = root()?;
                let st = nix::sys::stat::fstat(r.as_fd().as_raw_fd()).map_err(os(&path))?;
                return Ok(FileOpReply::Info(FileInfo {
                    name: "/".into(),
                    path,
                    kind: kind(&st),
                    size: st.st_size.max(0) as u64,
                    mode: st.st_mode & 0o7777,
                    mtime: st.st_mtime,
                    target: None,
                }));
            }
            let (dir, name) = parent_of(&path)?;
            Ok(FileOpReply::Info(info(&dir, &name, &path)?))
        }
        FileOp::Mkdir { path } => {
            mkdir_p(&normalize(&path)?)?;
            Ok(FileOpReply::Done { ok: true })
        }
        FileOp::Rename { from, to } => {
            let (from, to) = (normalize(&from)?, normalize(&to)?);
            let (fd, fname) = parent_of(&from)?;
            let (td, tname) = parent_of(&to)?;
            match nix::fcntl::renameat(
                Some(fd.as_raw_fd()),
                fname.as_str(),
                Some(td.as_raw_fd()),
                tname.as_str(),
            ) {
                Ok(()) => {}
                // Across filesystems (e.g. /root to the /tmp tmpfs): copy, then remove.
                Err(Errno::EXDEV) => move_across(&from, &to, &fd, &fname)?,
                Err(e) => return Err(os(&from)(e)),
            }
            Ok(FileOpReply::Done { ok: true })
        }
        FileOp::Delete { path, recursive } => {
            let path = normalize(&path)?;
            let (dir, name) = parent_of(&path)?;
            if recursive {
                remove_tree(&dir, &name, &path)?;
            } else {
                let st = fstatat(
                    Some(dir.as_raw_fd()),
                    name.as_str(),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(os(&path))?;
                let flag = if kind(&st) == FileKind::Dir {
                    nix::unistd::UnlinkatFlags::RemoveDir
                } else {
                    nix::unistd::UnlinkatFlags::NoRemoveDir
                };
                nix::unistd::unlinkat(Some(dir.as_raw_fd()), name.as_str(), flag)
                    .map_err(os(&path))?;
            }
            Ok(FileOpReply::Done { ok: true })
        }
    }
}

/// `rename` of a regular file between filesystems: a copy written atomically at `to`,
/// then `from` removed. Directories are refused.
fn move_across(from: &str, to: &str, from_dir: &OwnedFd, from_name: &str) -> Result<(), FileError> {
    let src = open_in_root(from, OFlag::O_RDONLY | OFlag::O_NOFOLLOW, 0)?;
    let st = nix::sys::stat::fstat(src.as_raw_fd()).map_err(os(from))?;
    if kind(&st) != FileKind::File {
        return Err(FileError::Os {
            path: from.to_owned(),
            errno: Errno::EXDEV,
        });
    }
    let mut up = begin_write(to)?;
    let mut src = std::fs::File::from(src);
    std::io::copy(&mut src, &mut up.file).map_err(|e| FileError::Os {
        path: to.to_owned(),
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    let _ = nix::sys::stat::fchmod(
        up.file.as_raw_fd(),
        Mode::from_bits_truncate(st.st_mode & 0o7777),
    );
    up.commit(st.st_size.max(0) as u64)?;
    nix::unistd::unlinkat(
        Some(from_dir.as_raw_fd()),
        from_name,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    )
    .map_err(os(from))
}

/// Opens a regular file for reading; returns it and its size. Anything else is
/// refused: a directory (EISDIR), and FIFOs, sockets and devices, which would block
/// the call or never end (opened non-blocking, so a FIFO without a writer cannot hang
/// the open either).
pub fn open_read(path: &str) -> Result<(std::fs::File, u64), FileError> {
    let path = normalize(path)?;
    let fd = open_in_root(&path, OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0)?;
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(os(&path))?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(os(&path)(Errno::EISDIR)),
        other => {
            let kind = match other {
                libc::S_IFIFO => "a FIFO",
                libc::S_IFSOCK => "a socket",
                libc::S_IFCHR => "a character device",
                libc::S_IFBLK => "a block device",
                _ => "not a file",
            };
            return Err(FileError::NotRegular { path, kind });
        }
    }
    // Back to blocking reads (regular files ignore it; cleared for clarity).
    let flags =
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(os(&path))?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(os(&path))?;
    Ok((std::fs::File::from(fd), st.st_size.max(0) as u64))
}

/// A file being written: a temporary sibling renamed into place by [`Upload::commit`].
/// Dropped without a commit (failed or cancelled upload), the temporary file goes.
pub struct Upload {
    pub file: std::fs::File,
    dir: OwnedFd,
    tmp: String,
    name: String,
    path: String,
    committed: bool,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            self.abort();
        }
    }
}

pub fn begin_write(path: &str) -> Result<Upload, FileError> {
    let path = normalize(path)?;
    let parent = std::path::Path::new(&path)
        .parent()
        .and_then(|p| p.to_str())
        .unwrap_or("/")
        .to_owned();
    mkdir_p(&parent)?;
    let (dir, name) = parent_of(&path)?;
    let tmp = format!(".forkbox-upload-{:016x}", rand::random::<u64>());
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(os(&path))?;
    // SAFETY: a fresh fd we own.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(Upload {
        file,
        dir,
        tmp,
        name,
        path,
        committed: false,
    })
}

impl Upload {
    pub fn commit(mut self, size: u64) -> Result<WriteReply, FileError> {
        nix::fcntl::renameat(
            Some(self.dir.as_raw_fd()),
            self.tmp.as_str(),
            Some(self.dir.as_raw_fd()),
            self.name.as_str(),
        )
        .map_err(os("rename"))?;
        self.committed = true;
        Ok(WriteReply {
            path: std::mem::take(&mut self.path),
            size,
        })
    }

    pub fn abort(&self) {
        let _ = nix::unistd::unlinkat(
            Some(self.dir.as_raw_fd()),
            self.tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_absolute_and_checked() {
        assert_eq!(normalize("a/b").unwrap(), "/root/a/b");
        assert_eq!(normalize("/etc/x").unwrap(), "/etc/x");
        assert!(matches!(normalize(""), Err(FileError::BadPath(_))));
        assert!(matches!(normalize("a\0b"), Err(FileError::BadPath(_))));
        assert!(matches!(
            normalize("../etc/shadow"),
            Err(FileError::BadPath(_))
        ));
        assert!(matches!(
            normalize("/root/../etc"),
            Err(FileError::BadPath(_))
        ));
        assert_eq!(normalize("/root/..x").unwrap(), "/root/..x");
        assert!(matches!(
            normalize(&"x".repeat(5000)),
            Err(FileError::BadPath(_))
        ));
    }

    #[test]
    fn errors_map_to_refusals() {
        let e = |errno| FileError::Os {
            path: "/p".into(),
            errno,
        };
        assert_eq!(e(Errno::ENOENT).refusal(), Refusal::FileNotFound);
        assert_eq!(e(Errno::EISDIR).refusal(), Refusal::FileConflict);
        assert_eq!(e(Errno::ENOTEMPTY).refusal(), Refusal::FileConflict);
        assert_eq!(e(Errno::EACCES).refusal(), Refusal::FileDenied);
        assert_eq!(e(Errno::ENOSPC).refusal(), Refusal::NoSpace);
        assert_eq!(e(Errno::ELOOP).refusal(), Refusal::FileInvalid);
        assert_eq!(e(Errno::ENOENT).refusal().status(), 404);
        assert_eq!(e(Errno::ENOSPC).refusal().status(), 507);
    }

    #[test]
    fn file_ops_stay_inside_the_root_and_clean_up() {
        // Runs against this test process's own root, in a temporary directory.
        let dir = tempfile_dir();
        let base = dir.to_str().unwrap().to_owned();
        mkdir_p(&format!("{base}/a/b/c")).unwrap();
        let up = begin_write(&format!("{base}/a/b/c/f")).unwrap();
        drop(up);
        let entries = match op(FileOp::Ls {
            path: format!("{base}/a/b/c"),
        })
        .unwrap()
        {
            FileOpReply::Entries { entries } => entries,
            other => panic!("{other:?}"),
        };
        assert!(
            entries.is_empty(),
            "an uncommitted upload leaves nothing: {entries:?}"
        );
        let mut up = begin_write(&format!("{base}/a/f")).unwrap();
        std::io::Write::write_all(&mut up.file, b"data").unwrap();
        assert_eq!(up.commit(4).unwrap().size, 4);
        let (_, size) = open_read(&format!("{base}/a/f")).unwrap();
        assert_eq!(size, 4);
        op(FileOp::Delete {
            path: base.clone(),
            recursive: true,
        })
        .unwrap();
        assert!(!dir.exists());
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("forkbox-files-{}", rand::random::<u64>()));
        std::fs::create_dir(&d).unwrap();
        d
    }
}
