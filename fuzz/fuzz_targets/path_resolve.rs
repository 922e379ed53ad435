//! The agent's real resolver (`files::open_beneath`, i.e. `openat2` with
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`) against a temporary directory tree full
//! of escape attempts (absolute, relative and magic symlinks, a symlink loop; see
//! `escape_tree`): whatever the path — raw, with `..` and NULs, or after
//! `files::normalize` — a path that opens is the root or beneath it, never the
//! sibling directory, the host's `/` or `/etc`. `normalize` refuses every `..` and
//! NUL before any syscall.

#![no_main]

use forkbox_agent::files::{normalize, open_beneath, FileError};
use forkbox_fuzz::{escape_tree, fd_path};
use libfuzzer_sys::fuzz_target;
use nix::fcntl::OFlag;
use std::os::fd::AsFd;

fn check(root: &std::path::Path, dir: std::os::fd::BorrowedFd<'_>, path: &str) {
    for flags in [OFlag::O_PATH, OFlag::O_PATH | OFlag::O_NOFOLLOW] {
        match open_beneath(dir, path, flags, 0) {
            Ok(fd) => {
                let at = fd_path(&fd);
                assert!(
                    at.starts_with(root),
                    "{path:?} resolved to {} outside the root {}",
                    at.display(),
                    root.display()
                );
            }
            Err(FileError::BadPath(_)) => assert!(path.contains('\0'), "{path:?} refused"),
            Err(FileError::Os { .. }) => {}
            Err(e @ FileError::NotRegular { .. }) => {
                panic!("{path:?}: open_beneath never reads: {e}")
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let root = escape_tree();
    let dir = std::fs::File::open(root).expect("open the fuzz root");
    // The raw path, `..` and all: RESOLVE_IN_ROOT alone must keep it inside.
    check(root, dir.as_fd(), path);
    match normalize(path) {
        Ok(p) => {
            assert!(!p.contains('\0') && !p.split('/').any(|c| c == ".."));
            check(root, dir.as_fd(), &p);
        }
        Err(_) => assert!(
            path.is_empty()
                || path.contains('\0')
                || path.len() > 4096
                || path.split('/').any(|c| c == ".."),
            "{path:?} refused"
        ),
    }
});
