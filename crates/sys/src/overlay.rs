//! Overlay root filesystems: a sandbox's root is an overlay of its own writable
//! directory (`upper`) over read-only layers (its template, fork layers, a snapshot),
//! so that every sandbox of a template reads the template's own files and shares their
//! page cache, and making one needs no btrfs snapshot.
//!
//! The overlay is made by host root before the sandbox's namespaces exist, as a
//! *detached* mount (`fsopen("overlay")`, each layer passed as an fd with
//! `FSCONFIG_SET_FD`, `fsmount`): it appears in no host mount table, and the
//! sandbox's first process moves it onto its root (`crate::idmap::attach`). Layers
//! may be idmapped mounts (`crate::idmap::idmapped_tree`), so files stay stored in the
//! canonical uid range while the sandbox runs as its own.
//!
//! The overlay's own operations (making its work directory, whiteouts, copy-up) run
//! as the mounter, host root: an idmapped layer's map must then also map host root to
//! itself (`crate::idmap::shift_userns`'s `keep_root`), which no sandbox process can
//! act as.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay: {step}: {source}{}", if log.is_empty() { String::new() } else { format!(" ({log})") })]
    Mount {
        step: &'static str,
        source: std::io::Error,
        /// What the kernel said about it (the filesystem context's messages).
        log: String,
    },
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_SET_FD: libc::c_uint = 5;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

/// The most lower layers one overlay takes here (the kernel's own limit is 500).
pub const MAX_LOWERS: usize = 128;

/// A detached overlay mount of `upper` (with `work`, a directory on the same mount)
/// over `lowers`, topmost first; close-on-exec.
pub fn overlay_tree(
    lowers: &[BorrowedFd<'_>],
    upper: BorrowedFd<'_>,
    work: BorrowedFd<'_>,
) -> Result<OwnedFd, OverlayError> {
    // SAFETY: fsopen with a NUL-terminated name; returns a new fd or -1.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) };
    if fs < 0 {
        return Err(OverlayError::Mount {
            step: "fsopen",
            source: std::io::Error::last_os_error(),
            log: String::new(),
        });
    }
    // SAFETY: a fresh fd we own.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let fail = |step: &'static str| OverlayError::Mount {
        step,
        source: std::io::Error::last_os_error(),
        log: context_log(&fs),
    };
    let set_fd = |key: &std::ffi::CStr, fd: BorrowedFd<'_>| {
        // SAFETY: fsconfig on our context fd, a NUL-terminated key, an fd we borrow.
        unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_FD,
                key.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                fd.as_raw_fd(),
            )
        }
    };
    for l in lowers {
        if set_fd(c"lowerdir+", *l) < 0 {
            return Err(fail("lower layer"));
        }
    }
    if set_fd(c"upperdir", upper) < 0 {
        return Err(fail("upper directory"));
    }
    if set_fd(c"workdir", work) < 0 {
        return Err(fail("work directory"));
    }
    // No index, metacopy or redirects, whatever the kernel's build defaults: an upper
    // directory stays a plain tree, readable as a layer (a fork layer, a snapshot) by
    // a later overlay, and no layer's extended attributes steer lookups elsewhere.
    for (key, value) in [
        (c"redirect_dir", c"off"),
        (c"index", c"off"),
        (c"metacopy", c"off"),
    ] {
        // SAFETY: fsconfig on our context fd with NUL-terminated key and value.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        };
        if r < 0 {
            return Err(fail("options"));
        }
    }
    // SAFETY: fsconfig CMD_CREATE on our context fd, no key or value.
    let created = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if created < 0 {
        return Err(fail("create"));
    }
    // SAFETY: fsmount on our context fd.
    let m = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
    if m < 0 {
        return Err(fail("fsmount"));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(m as i32) })
}

/// The messages the kernel left on a filesystem context (one read per message).
fn context_log(fs: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..8 {
        // SAFETY: read into a local buffer from an fd we own.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.push(String::from_utf8_lossy(&buf[..n as usize]).into_owned());
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    /// Root only. An overlay of a directory over a read-only lower, through an idmap
    /// that also keeps host root: reads see the lower, writes land in the upper stored
    /// as the canonical range, deletions are whiteouts, the lower is untouched.
    #[test]
    fn an_idmapped_overlay_writes_canonical_ids_to_its_upper() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root");
        }
        let t = tempfile::tempdir().unwrap();
        let (lower, sb) = (t.path().join("lower"), t.path().join("sb"));
        for d in [
            &lower,
            &sb,
            &sb.join("upper"),
            &sb.join("work"),
            &sb.join("root"),
        ] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(lower.join("a"), "lower").unwrap();
        std::fs::write(lower.join("gone"), "x").unwrap();
        for p in [
            lower.clone(),
            lower.join("a"),
            lower.join("gone"),
            sb.join("upper"),
        ] {
            std::os::unix::fs::chown(&p, Some(1_000_000), Some(1_000_000)).unwrap();
        }
        // Every layer a directory of one idmapped copy of their parent (as jail-init
        // does with the pool).
        let ns = crate::idmap::shift_userns(1_000_000, 3_000_000, 65536, true).unwrap();
        let top = crate::idmap::idmapped_tree(t.path(), &ns).unwrap();
        let dir = |p: &str| {
            crate::mounts::dir_beneath(
                &top,
                std::path::Path::new(p),
                std::path::Path::new(p),
                false,
            )
            .unwrap()
            .unwrap()
        };
        let (lo, up, wk) = (dir("lower"), dir("sb/upper"), dir("sb/work"));
        let ov = overlay_tree(&[lo.as_fd()], up.as_fd(), wk.as_fd()).unwrap();
        // Look at it from a thread of its own in a private mount namespace.
        let root = sb.join("root");
        let seen = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            crate::mounts::make_private().unwrap();
            let at: OwnedFd = std::fs::File::open(&root).unwrap().into();
            crate::idmap::attach(ov.as_fd(), at.as_fd(), &root).unwrap();
            let a = std::fs::read_to_string(root.join("a")).unwrap();
            let owner = std::fs::metadata(root.join("a")).unwrap().uid();
            std::fs::write(root.join("b"), "new").unwrap();
            std::os::unix::fs::chown(root.join("b"), Some(3_000_001), Some(3_000_001)).unwrap();
            std::fs::remove_file(root.join("gone")).unwrap();
            (a, owner)
        })
        .join()
        .unwrap();
        assert_eq!(seen, ("lower".to_owned(), 3_000_000));
        let b = sb.join("upper/b");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new");
        assert_eq!(std::fs::metadata(&b).unwrap().uid(), 1_000_001);
        let wh = std::fs::symlink_metadata(sb.join("upper/gone")).unwrap();
        assert_eq!((wh.mode() & libc::S_IFMT, wh.rdev()), (libc::S_IFCHR, 0));
        assert!(lower.join("gone").exists());
    }

    #[test]
    fn a_bad_layer_is_an_error() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root");
        }
        let t = tempfile::tempdir().unwrap();
        for d in ["l", "u", "w"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        let tree = |d: &str| crate::idmap::detached_tree(&t.path().join(d), None).unwrap();
        let (l, u, w) = (tree("l"), tree("u"), tree("w"));
        // upper and work on two different mounts: refused.
        let e = overlay_tree(&[l.as_fd()], u.as_fd(), w.as_fd()).unwrap_err();
        assert!(e.to_string().starts_with("overlay: create:"), "{e}");
    }
}
