//! Shifts the owners of a template's files into the sandboxes' uid range, once, when the
//! template is built: root inside a sandbox is an unprivileged uid outside, and must own
//! the files it is root of.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ShiftError {
    #[error("walk {0}: {1}")]
    Walk(PathBuf, io::Error),
    #[error("chown {0}: {1}")]
    Chown(PathBuf, io::Error),
}

/// Size of the id range each side maps.
pub const RANGE: u32 = 65536;

/// Adds `base` to the uid and gid of every file under `root` whose ids are below
/// [`RANGE`], without following symlinks, keeping setuid/setgid bits.
pub fn shift_tree(root: &Path, base: u32) -> Result<u64, ShiftError> {
    let mut count = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).map_err(|e| ShiftError::Walk(p.clone(), e))?;
        if md.is_dir() {
            for e in fs::read_dir(&p).map_err(|e| ShiftError::Walk(p.clone(), e))? {
                stack.push(e.map_err(|e| ShiftError::Walk(p.clone(), e))?.path());
            }
        }
        let (uid, gid) = (md.uid(), md.gid());
        if uid >= RANGE && gid >= RANGE {
            continue;
        }
        let nu = if uid < RANGE { uid + base } else { uid };
        let ng = if gid < RANGE { gid + base } else { gid };
        std::os::unix::fs::lchown(&p, Some(nu), Some(ng))
            .map_err(|e| ShiftError::Chown(p.clone(), e))?;
        let mode = md.mode();
        if !md.file_type().is_symlink() && mode & 0o6000 != 0 {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| ShiftError::Chown(p.clone(), e))?;
        }
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_owners_and_keeps_modes() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (chown)");
        }
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("a");
        fs::write(&f, "x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("a", t.path().join("l")).unwrap();
        let n = shift_tree(t.path(), 100_000).unwrap();
        assert_eq!(n, 3);
        let md = fs::metadata(&f).unwrap();
        assert_eq!((md.uid(), md.gid()), (100_000, 100_000));
        assert_eq!(md.mode() & 0o7777, 0o4755);
        let l = fs::symlink_metadata(t.path().join("l")).unwrap();
        assert_eq!(l.uid(), 100_000);
        // A second pass changes nothing.
        assert_eq!(shift_tree(t.path(), 100_000).unwrap(), 0);
    }
}
