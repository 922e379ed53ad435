//! Applying image layers (tar streams) onto a directory, as root of the host but never
//! outside it: every path is resolved by `openat2(RESOLVE_IN_ROOT)` beneath the
//! directory (a layer's symlink to `/etc` names the image's `/etc`, never the host's),
//! the last component is created or removed relative to its parent's fd without
//! following it, and owners are shifted into the sandboxes' id range (ids at or above
//! [`forkbox_sys::uidshift::RANGE`] are refused).
//!
//! OCI whiteouts: `.wh.NAME` removes `NAME` of the layers below; `.wh..wh..opq` empties
//! its directory of what the layers below put there. Device nodes and extended
//! attributes are not applied (a sandbox has its own `/dev`); they are counted.

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid};
use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// Most entries one image may have, all layers together.
pub const MAX_ENTRIES: u64 = 1_000_000;
/// Most bytes of files one image may unpack to, all layers together.
pub const MAX_BYTES: u64 = 32 << 30;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{path}: {what}: {errno}")]
    Sys {
        path: String,
        what: &'static str,
        errno: Errno,
    },
    #[error("reading the layer: {0}")]
    Read(std::io::Error),
    #[error("{path}: {why}")]
    Refused { path: String, why: String },
    #[error("the image has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
}

impl From<std::io::Error> for UnpackError {
    fn from(e: std::io::Error) -> UnpackError {
        UnpackError::Read(e)
    }
}

/// What an unpack did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    /// Device nodes, sockets and other entries not applied.
    pub skipped: u64,
    /// Entries whose extended attributes were not applied.
    pub xattrs_skipped: u64,
}

/// A directory layers are applied to.
pub struct Target {
    root: OwnedFd,
    id_base: u32,
}

fn sys<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(Errno) -> UnpackError + 'a {
    move |errno| UnpackError::Sys {
        path: path.display().to_string(),
        what,
        errno,
    }
}

fn cstr(p: &OsStr) -> Result<CString, UnpackError> {
    CString::new(p.as_bytes()).map_err(|_| UnpackError::Refused {
        path: p.to_string_lossy().into_owned(),
        why: "a NUL in the name".into(),
    })
}

/// `path` of a layer entry as its parent directory (relative to the root) and its last
/// component; `None` for the root itself. `..` anywhere is refused.
fn split(path: &Path) -> Result<Option<(PathBuf, OsString)>, UnpackError> {
    let mut parts: Vec<&OsStr> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => parts.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(UnpackError::Refused {
                    path: path.display().to_string(),
                    why: "a path with `..`".into(),
                })
            }
        }
    }
    let Some(last) = parts.pop() else {
        return Ok(None);
    };
    Ok(Some((parts.iter().collect(), last.to_owned())))
}

impl Target {
    /// `root` (an existing directory, not a symlink); files get owners `id_base + id`.
    pub fn open(root: &Path, id_base: u32) -> Result<Target, UnpackError> {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys(root, "open"))?;
        // SAFETY: a fresh fd we own.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Target { root, id_base })
    }

    /// The directory `rel` beneath the root (symlinks resolved inside it).
    fn dir(&self, rel: &Path) -> Result<OwnedFd, UnpackError> {
        let p = if rel.as_os_str().is_empty() {
            CString::from(c".")
        } else {
            cstr(rel.as_os_str())?
        };
        forkbox_sys::openat2::openat2(
            self.root.as_fd(),
            &p,
            libc::O_DIRECTORY | libc::O_RDONLY,
            0,
            libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV,
        )
        .map_err(sys(rel, "open directory"))
    }

    /// Like [`Self::dir`], making missing directories (root's, mode 0755) on the way;
    /// iterative (a path may have thousands of components).
    fn dir_made(&self, rel: &Path) -> Result<OwnedFd, UnpackError> {
        match self.dir(rel) {
            Err(UnpackError::Sys {
                errno: Errno::ENOENT,
                ..
            }) => {}
            other => return other,
        }
        let parts: Vec<&OsStr> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect();
        let mut at = PathBuf::new();
        for part in parts {
            let parent = self.dir(&at)?;
            at.push(part);
            match self.dir(&at) {
                Ok(_) => continue,
                Err(UnpackError::Sys {
                    errno: Errno::ENOENT,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
            let n = cstr(part)?;
            match nix::sys::stat::mkdirat(
                Some(parent.as_raw_fd()),
                n.as_c_str(),
                Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(sys(&at, "mkdir")(e)),
            }
            let _ = nix::unistd::fchownat(
                Some(parent.as_raw_fd()),
                n.as_c_str(),
                Some(Uid::from_raw(self.id_base)),
                Some(Gid::from_raw(self.id_base)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
        }
        self.dir(rel)
    }

    /// Makes directory `rel` (and its missing parents, root's, 0755) with `mode`
    /// unless it exists (then it is left as it is).
    pub fn ensure_dir(&self, rel: &Path, mode: u32) -> Result<(), UnpackError> {
        match self.dir(rel) {
            Ok(_) => return Ok(()),
            Err(UnpackError::Sys {
                errno: Errno::ENOENT,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
        let fd = self.dir_made(rel)?;
        let (uid, gid) = self.ids(rel, 0, 0)?;
        set_owner_mode(fd.as_fd(), rel, uid, gid, mode)
    }

    fn ids(&self, path: &Path, uid: u64, gid: u64) -> Result<(Uid, Gid), UnpackError> {
        let range = u64::from(forkbox_sys::uidshift::RANGE);
        if uid >= range || gid >= range {
            return Err(UnpackError::Refused {
                path: path.display().to_string(),
                why: format!(
                    "owned by {uid}:{gid}; a sandbox has ids 0-{} only",
                    range - 1
                ),
            });
        }
        // (Both below RANGE: the sums fit.)
        Ok((
            Uid::from_raw(self.id_base + uid as u32),
            Gid::from_raw(self.id_base + gid as u32),
        ))
    }

    /// Applies one layer's tar stream.
    pub fn apply(&self, layer: impl Read, done: &mut Unpacked) -> Result<(), UnpackError> {
        // Paths made by this layer (hashed: an opaque whiteout keeps them), and the
        // directories whose opaque whiteout was applied (once per layer).
        let keys = std::collections::hash_map::RandomState::new();
        let key = |p: &Path| {
            use std::hash::BuildHasher as _;
            keys.hash_one(
                p.components()
                    .filter(|c| matches!(c, Component::Normal(_)))
                    .collect::<PathBuf>(),
            )
        };
        let mut made: HashSet<u64> = HashSet::new();
        let mut opaqued: HashSet<u64> = HashSet::new();
        crate::tarwalk::walk(layer, |meta, entry| -> Result<(), UnpackError> {
            done.entries += 1;
            if done.entries > MAX_ENTRIES {
                return Err(UnpackError::TooManyEntries);
            }
            if meta.xattrs {
                done.xattrs_skipped += 1;
            }
            let path = meta.path;
            let Some((parent, name)) = split(&path)? else {
                // The root itself: its owner and mode.
                if entry.header().entry_type().is_dir() {
                    let (u, g) = self.ids(&path, meta.uid, meta.gid)?;
                    let mode = entry.header().mode().map_err(UnpackError::Read)?;
                    set_owner_mode(self.root.as_fd(), &path, u, g, mode)?;
                }
                return Ok(());
            };
            let name_bytes = name.as_bytes();
            if name_bytes == OPAQUE.as_bytes() {
                done.whiteouts += 1;
                if !opaqued.insert(key(&parent)) {
                    return Ok(());
                }
                match self.dir(&parent) {
                    Ok(d) => self.empty_dir(d.as_fd(), &parent, &made, &key)?,
                    Err(UnpackError::Sys {
                        errno: Errno::ENOENT,
                        ..
                    }) => {}
                    Err(e) => return Err(e),
                }
                return Ok(());
            }
            if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT.as_bytes()) {
                done.whiteouts += 1;
                // (`.wh.`, `.wh..`, `.wh...`: never a name; `..` would be the parent.)
                if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/')
                {
                    return Err(UnpackError::Refused {
                        path: path.display().to_string(),
                        why: "a whiteout of no file".into(),
                    });
                }
                let hidden = OsStr::from_bytes(hidden);
                match self.dir(&parent) {
                    Ok(d) => remove_all(d.as_fd(), &cstr(hidden)?, &parent.join(hidden))?,
                    Err(UnpackError::Sys {
                        errno: Errno::ENOENT,
                        ..
                    }) => {}
                    Err(e) => return Err(e),
                }
                return Ok(());
            }
            let h = entry.header();
            let kind = h.entry_type();
            let (uid, gid) = self.ids(&path, meta.uid, meta.gid)?;
            let mode = h.mode().map_err(UnpackError::Read)? & 0o7777;
            let mtime = h.mtime().unwrap_or(0);
            use tar::EntryType as E;
            if matches!(kind, E::GNUSparse) {
                return Err(UnpackError::Refused {
                    path: path.display().to_string(),
                    why: "sparse files are not supported".into(),
                });
            }
            if !matches!(
                kind,
                E::Directory | E::Regular | E::Continuous | E::Symlink | E::Link | E::Fifo
            ) {
                done.skipped += 1;
                return Ok(());
            }
            let pfd = self.dir_made(&parent)?;
            let n = cstr(&name)?;
            let at = Some(pfd.as_raw_fd());
            // What is there goes, unless a directory meets a directory.
            let existing =
                nix::sys::stat::fstatat(at, n.as_c_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW);
            let existing_dir = existing.as_ref().is_ok_and(|st| {
                SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
            });
            if existing.is_ok() && !(kind.is_dir() && existing_dir) {
                remove_all(pfd.as_fd(), &n, &path)?;
            }
            match kind {
                E::Directory => {
                    if !existing_dir {
                        nix::sys::stat::mkdirat(at, n.as_c_str(), Mode::from_bits_truncate(0o700))
                            .map_err(sys(&path, "mkdir"))?;
                    }
                    let fd = open_at(pfd.as_fd(), &n, OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)
                        .map_err(sys(&path, "open directory"))?;
                    set_owner_mode(fd.as_fd(), &path, uid, gid, mode)?;
                }
                E::Regular | E::Continuous => {
                    if done.bytes.saturating_add(entry.size()) > MAX_BYTES {
                        return Err(UnpackError::Refused {
                            path: path.display().to_string(),
                            why: format!("the image's files come to more than {MAX_BYTES} bytes"),
                        });
                    }
                    let fd = open_at(
                        pfd.as_fd(),
                        &n,
                        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                        0o600,
                    )
                    .map_err(sys(&path, "create"))?;
                    let mut file = std::fs::File::from(fd);
                    done.bytes += std::io::copy(entry, &mut file).map_err(UnpackError::Read)?;
                    set_owner_mode(file.as_fd(), &path, uid, gid, mode)?;
                    let t = nix::sys::time::TimeSpec::new(mtime as i64, 0);
                    let _ = nix::sys::stat::futimens(file.as_raw_fd(), &t, &t);
                }
                E::Symlink => {
                    let target = meta.link.ok_or_else(|| UnpackError::Refused {
                        path: path.display().to_string(),
                        why: "a symlink without a target".into(),
                    })?;
                    nix::unistd::symlinkat(target.as_path(), at, n.as_c_str())
                        .map_err(sys(&path, "symlink"))?;
                    nix::unistd::fchownat(
                        at,
                        n.as_c_str(),
                        Some(uid),
                        Some(gid),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(sys(&path, "chown"))?;
                }
                E::Link => {
                    let target = meta.link.ok_or_else(|| UnpackError::Refused {
                        path: path.display().to_string(),
                        why: "a hard link without a target".into(),
                    })?;
                    let Some((tparent, tname)) = split(&target)? else {
                        return Err(UnpackError::Refused {
                            path: path.display().to_string(),
                            why: "a hard link to the root".into(),
                        });
                    };
                    let tfd = self.dir(&tparent)?;
                    let tn = cstr(&tname)?;
                    // (No flag: a symlink named is linked itself, never followed.)
                    nix::unistd::linkat(
                        Some(tfd.as_raw_fd()),
                        tn.as_c_str(),
                        at,
                        n.as_c_str(),
                        nix::fcntl::AtFlags::empty(),
                    )
                    .map_err(sys(&path, "link"))?;
                }
                _ => {
                    // A FIFO.
                    nix::sys::stat::mknodat(
                        at,
                        n.as_c_str(),
                        SFlag::S_IFIFO,
                        Mode::from_bits_truncate(0o600),
                        0,
                    )
                    .map_err(sys(&path, "mkfifo"))?;
                    let fd =
                        open_at(pfd.as_fd(), &n, OFlag::O_PATH, 0).map_err(sys(&path, "open"))?;
                    // (fchown/fchmod do not take O_PATH fds: through the fd's name.)
                    let p = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(
                        |_| UnpackError::Refused {
                            path: path.display().to_string(),
                            why: "fd path".into(),
                        },
                    )?;
                    nix::unistd::fchownat(
                        None,
                        p.as_c_str(),
                        Some(uid),
                        Some(gid),
                        nix::fcntl::AtFlags::empty(),
                    )
                    .map_err(sys(&path, "chown"))?;
                    nix::sys::stat::fchmodat(
                        None,
                        p.as_c_str(),
                        Mode::from_bits_truncate(mode),
                        nix::sys::stat::FchmodatFlags::FollowSymlink,
                    )
                    .map_err(sys(&path, "chmod"))?;
                }
            }
            made.insert(key(&path));
            Ok(())
        })
    }

    /// Removes what `dir` holds but this layer made (an opaque whiteout).
    fn empty_dir(
        &self,
        dir: BorrowedFd<'_>,
        rel: &Path,
        made: &HashSet<u64>,
        key: &dyn Fn(&Path) -> u64,
    ) -> Result<(), UnpackError> {
        for name in names(dir, rel)? {
            let child = rel.join(&name);
            if made.contains(&key(&child)) {
                continue;
            }
            remove_all(dir, &cstr(&name)?, &child)?;
        }
        Ok(())
    }
}

fn open_at(dir: BorrowedFd<'_>, name: &CString, flags: OFlag, mode: u32) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name.as_c_str(),
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )?;
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Owner first, then mode (a chown clears setuid bits).
fn set_owner_mode(
    fd: BorrowedFd<'_>,
    path: &Path,
    uid: Uid,
    gid: Gid,
    mode: u32,
) -> Result<(), UnpackError> {
    nix::unistd::fchown(fd.as_raw_fd(), Some(uid), Some(gid)).map_err(sys(path, "chown"))?;
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
        .map_err(sys(path, "chmod"))
}

/// The names in directory `dir` (without `.` and `..`).
fn names(dir: BorrowedFd<'_>, rel: &Path) -> Result<Vec<OsString>, UnpackError> {
    let mut d = nix::dir::Dir::openat(
        Some(dir.as_raw_fd()),
        c".",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys(rel, "list"))?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e.map_err(sys(rel, "list"))?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(OsStr::from_bytes(n).to_owned());
        }
    }
    Ok(out)
}

/// Removes `name` in `dir` and, if a directory, everything in it (never following a
/// symlink); a missing one is fine. Iterative, with one directory fd open at a time (a
/// tree may be tens of thousands of directories deep): down by name with
/// `O_NOFOLLOW`, back up by `..` exactly as many levels as it went down.
fn remove_all(dir: BorrowedFd<'_>, name: &CString, path: &Path) -> Result<(), UnpackError> {
    if name.as_bytes() == b"." || name.as_bytes() == b".." || name.as_bytes().contains(&b'/') {
        return Err(UnpackError::Refused {
            path: path.display().to_string(),
            why: "removing `.` or `..`".into(),
        });
    }
    let at = Some(dir.as_raw_fd());
    match nix::unistd::unlinkat(at, name.as_c_str(), nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(sys(path, "remove")(e)),
    }
    // The directories entered below `name`, each with the names left to do in it.
    let mut cur = open_at(dir, name, OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)
        .map_err(sys(path, "open directory"))?;
    let mut stack: Vec<(CString, Vec<OsString>)> = vec![(name.clone(), names(cur.as_fd(), path)?)];
    while let Some((_, todo)) = stack.last_mut() {
        match todo.pop() {
            Some(child) => {
                let c = cstr(&child)?;
                match nix::unistd::unlinkat(
                    Some(cur.as_raw_fd()),
                    c.as_c_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                ) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(Errno::EISDIR) => {
                        let sub = open_at(cur.as_fd(), &c, OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)
                            .map_err(sys(path, "open directory"))?;
                        let list = names(sub.as_fd(), path)?;
                        cur = sub;
                        stack.push((c, list));
                    }
                    Err(e) => return Err(sys(path, "remove")(e)),
                }
            }
            None => {
                let Some((done_name, _)) = stack.pop() else {
                    break;
                };
                if stack.is_empty() {
                    nix::unistd::unlinkat(
                        at,
                        done_name.as_c_str(),
                        nix::unistd::UnlinkatFlags::RemoveDir,
                    )
                    .map_err(sys(path, "remove directory"))?;
                    break;
                }
                let up = open_at(
                    cur.as_fd(),
                    &CString::from(c".."),
                    OFlag::O_DIRECTORY | OFlag::O_RDONLY,
                    0,
                )
                .map_err(sys(path, "open directory"))?;
                nix::unistd::unlinkat(
                    Some(up.as_raw_fd()),
                    done_name.as_c_str(),
                    nix::unistd::UnlinkatFlags::RemoveDir,
                )
                .map_err(sys(path, "remove directory"))?;
                cur = up;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, path, &[][..]).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = header(kind, 0o777, 0);
        b.append_link(&mut h, path, target).unwrap();
    }

    /// Layers as root would apply them, but with the test's own ids (not root: ids 0).
    fn target(root: &Path) -> Target {
        Target::open(root, nix::unistd::getuid().as_raw()).unwrap()
    }

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_directories() {
        if !nix::unistd::getuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let tg = target(t.path());
        let mut done = Unpacked::default();
        let one = layer(|b| {
            dir(b, "etc");
            file(b, "etc/keep", b"k");
            file(b, "etc/gone", b"g");
            dir(b, "opaque");
            file(b, "opaque/old", b"o");
            link(b, tar::EntryType::Symlink, "lib", "usr/lib");
            file(b, "usr/lib/x", b"x");
            link(b, tar::EntryType::Link, "usr/lib/x2", "usr/lib/x");
        });
        tg.apply(&one[..], &mut done).unwrap();
        let two = layer(|b| {
            file(b, "etc/.wh.gone", b"");
            file(b, "opaque/new", b"n");
            file(b, "opaque/.wh..wh..opq", b"");
            // Through the layer's symlink, inside the root.
            file(b, "lib/y", b"y");
        });
        tg.apply(&two[..], &mut done).unwrap();
        let r = t.path();
        assert_eq!(std::fs::read(r.join("etc/keep")).unwrap(), b"k");
        assert!(!r.join("etc/gone").exists());
        assert!(!r.join("opaque/old").exists());
        assert_eq!(std::fs::read(r.join("opaque/new")).unwrap(), b"n");
        assert_eq!(std::fs::read(r.join("usr/lib/y")).unwrap(), b"y");
        assert_eq!(std::fs::read(r.join("usr/lib/x2")).unwrap(), b"x");
        assert_eq!(done.whiteouts, 2);
    }

    #[test]
    fn nothing_lands_outside_the_root() {
        if !nix::unistd::getuid().is_root() {
            return;
        }
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let tg = target(&root);
        let mut done = Unpacked::default();
        // An absolute symlink and a relative one climbing out: both stay inside.
        let l = layer(|b| {
            link(
                b,
                tar::EntryType::Symlink,
                "abs",
                outer.path().to_str().unwrap(),
            );
            link(b, tar::EntryType::Symlink, "up", "../..");
            file(b, "up/escaped2", b"no");
        });
        tg.apply(&l[..], &mut done).unwrap();
        assert!(!outer.path().join("escaped2").exists());
        assert!(root.join("escaped2").exists());
        // (The symlink's target does not exist inside the root: refused, not followed.)
        let l = layer(|b| file(b, "abs/escaped", b"no"));
        assert!(tg.apply(&l[..], &mut done).is_err());
        assert!(!outer.path().join("escaped").exists());
        // A hard link to a host file through a symlink: resolved inside, so missing.
        let l = layer(|b| {
            link(b, tar::EntryType::Symlink, "etc", "/etc");
            link(b, tar::EntryType::Link, "passwd", "etc/passwd");
        });
        assert!(tg.apply(&l[..], &mut done).is_err());
        // `..` in a name is refused; a whiteout cannot climb out either.
        std::fs::write(outer.path().join("victim"), b"v").unwrap();
        let l = layer(|b| {
            let mut h = header(tar::EntryType::Regular, 0o644, 1);
            // (tar::Builder refuses `..`; the raw header takes it.)
            h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../victim");
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
        });
        let e = tg.apply(&l[..], &mut done).unwrap_err();
        assert!(e.to_string().contains(".."), "{e}");
        let l = layer(|b| file(b, "up/.wh.victim", b""));
        tg.apply(&l[..], &mut done).unwrap();
        assert_eq!(std::fs::read(outer.path().join("victim")).unwrap(), b"v");
    }

    /// A review's finding: `.wh...` hid `..` — the root's parent, emptied by host
    /// root (every other sandbox's files in a pool). Whiteouts of `.`, `..` or nothing
    /// are refused; nothing beside the root changes.
    #[test]
    fn whiteouts_of_dot_and_dotdot_are_refused() {
        if !nix::unistd::getuid().is_root() {
            return;
        }
        for (via_symlink, entry) in [
            (false, ".wh..."),
            (false, "d/.wh.."),
            (true, "x/.wh..."),
            (false, ".wh."),
        ] {
            let outer = tempfile::tempdir().unwrap();
            let root = outer.path().join("root");
            std::fs::create_dir_all(root.join("d")).unwrap();
            std::fs::write(root.join("d/keep"), b"k").unwrap();
            std::fs::write(outer.path().join("victim"), b"v").unwrap();
            let tg = target(&root);
            let l = layer(|b| {
                if via_symlink {
                    link(b, tar::EntryType::Symlink, "x", "/");
                }
                file(b, entry, b"");
            });
            let e = tg.apply(&l[..], &mut Unpacked::default()).unwrap_err();
            assert!(
                e.to_string().contains("whiteout of no file"),
                "{entry}: {e}"
            );
            assert_eq!(
                std::fs::read(outer.path().join("victim")).unwrap(),
                b"v",
                "{entry}"
            );
            assert_eq!(std::fs::read(root.join("d/keep")).unwrap(), b"k", "{entry}");
        }
    }

    /// A review's finding: removal recursed once per directory level, and a tree tens
    /// of thousands deep (built through symlink hops, each entry's path short) overflowed
    /// the stack. Now iterative: a whiteout removes a deep tree on a small stack.
    #[test]
    fn a_whiteout_removes_a_very_deep_tree_on_a_small_stack() {
        if !nix::unistd::getuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        let chain = vec!["a"; 1500].join("/");
        let deep = layer(|b| {
            dir(b, &chain);
            let mut prev = format!("/{chain}");
            for i in 1..6 {
                let s = format!("s{i}");
                link(b, tar::EntryType::Symlink, &s, &prev);
                dir(b, &format!("{s}/{chain}"));
                prev = format!("/{s}/{chain}");
            }
        });
        let gone = layer(|b| file(b, ".wh.a", b""));
        let h = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let tg = target(&root);
                let mut done = Unpacked::default();
                tg.apply(&deep[..], &mut done).unwrap();
                tg.apply(&gone[..], &mut done).unwrap();
                assert!(!root.join("a").exists());
            })
            .unwrap();
        h.join().unwrap();
    }

    #[test]
    fn sparse_files_are_refused() {
        if !nix::unistd::getuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let l = layer(|b| {
            let mut h = header(tar::EntryType::GNUSparse, 0o644, 0);
            b.append_data(&mut h, "sparse", &[][..]).unwrap();
        });
        let e = target(t.path())
            .apply(&l[..], &mut Unpacked::default())
            .unwrap_err();
        assert!(e.to_string().contains("sparse"), "{e}");
    }

    #[test]
    fn owners_beyond_the_sandbox_range_are_refused() {
        if !nix::unistd::getuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let tg = target(t.path());
        let l = layer(|b| {
            let mut h = header(tar::EntryType::Regular, 0o644, 1);
            h.set_uid(70000);
            b.append_data(&mut h, "f", &b"x"[..]).unwrap();
        });
        let e = tg.apply(&l[..], &mut Unpacked::default()).unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
    }
}
