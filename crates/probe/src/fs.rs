//! Filesystem probes: the mount family, chroot, leaked fds and cwd, other processes'
//! roots, file handles, the runtime's executable, device nodes.

use crate::util::{
    self, check, cpath, cstr, dev_ino, ename, errno, in_child, last, own, sys, top_of, Iso, Outcome,
};
use crate::Ctx;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

fn mount(src: &str, target: &Path, fstype: &str, data: &str) -> Result<(), i32> {
    let (s, t, f, d) = (cstr(src), cpath(target), cstr(fstype), cstr(data));
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    check(unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            0,
            d.as_ptr().cast::<libc::c_void>(),
        )
    })
    .map(|_| ())
}

fn umount(target: &Path) {
    let t = cpath(target);
    // SAFETY: NUL-terminated path.
    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
}

/// A scratch dir under the sandbox's /tmp (or the host's, in host mode); removed after.
fn with_dir(ctx: &Ctx, prefix: &str, f: impl FnOnce(&Path) -> Outcome) -> Outcome {
    match util::scratch(&ctx.tmp, prefix) {
        Ok(d) => {
            let o = f(&d);
            let _ = std::fs::remove_dir_all(&d);
            o
        }
        Err(e) => Outcome::blocked(format!("could not prepare: {e}")),
    }
}

pub fn mount_tmpfs(ctx: &Ctx) -> Outcome {
    with_dir(ctx, "forkbox-probe-mnt", |d| {
        in_child("mount", Iso::Private, || {
            match mount("none", d, "tmpfs", "size=1m") {
                Ok(()) => {
                    umount(d);
                    Outcome::escaped("mounted a tmpfs")
                }
                Err(e) => Outcome::blocked(format!("mount(tmpfs): {}", ename(e))),
            }
        })
    })
}

pub fn fsopen(_: &Ctx) -> Outcome {
    in_child("fsopen", Iso::Same, || {
        let t = cstr("tmpfs");
        // SAFETY: fsopen(name, FSOPEN_CLOEXEC) with a NUL-terminated name.
        let a = sys(unsafe { libc::syscall(libc::SYS_fsopen, t.as_ptr(), 1) });
        let root = cstr("/");
        // SAFETY: open_tree(AT_FDCWD, "/", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC) makes a
        // detached copy of the tree (no mount is attached anywhere).
        let b = sys(unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                root.as_ptr(),
                1 | libc::O_CLOEXEC,
            )
        });
        let d = |r: &Result<libc::c_long, i32>| match r {
            Ok(_) => "got an fd".to_owned(),
            Err(e) => ename(*e),
        };
        Outcome::from(
            a.is_ok() || b.is_ok(),
            format!("fsopen(tmpfs): {}; open_tree(/, CLONE): {}", d(&a), d(&b)),
        )
    })
}

/// The first of these that is a mount point in our namespace.
fn some_mount_point() -> &'static str {
    let info = util::read("/proc/self/mountinfo").unwrap_or_default();
    for p in ["/dev/shm", "/tmp", "/proc"] {
        if info.lines().any(|l| l.split_whitespace().nth(4) == Some(p)) {
            return p;
        }
    }
    "/proc"
}

pub fn umount2(_: &Ctx) -> Outcome {
    in_child("umount", Iso::Private, || {
        let p = some_mount_point();
        let c = cstr(p);
        // SAFETY: NUL-terminated path; in host mode this runs in a private mount ns.
        match check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }) {
            Ok(_) => Outcome::escaped(format!("detached {p}")),
            Err(e) => Outcome::blocked(format!("umount2({p}): {}", ename(e))),
        }
    })
}

pub fn pivot_root(ctx: &Ctx) -> Outcome {
    with_dir(ctx, "forkbox-probe-pivot", |d| {
        in_child("pivot_root", Iso::Private, || {
            let m = mount("none", d, "tmpfs", "size=1m");
            if let Err(e) = nix::unistd::chdir(d) {
                return Outcome::blocked(format!("chdir: {e}"));
            }
            let dot = cstr(".");
            // SAFETY: pivot_root(".", ".") with NUL-terminated paths; in host mode in a
            // private mount namespace of this short-lived child.
            match sys(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) }) {
                Ok(_) => Outcome::escaped("pivot_root(., .) succeeded"),
                Err(e) => Outcome::blocked(format!(
                    "pivot_root: {}{}",
                    ename(e),
                    match m {
                        Ok(()) => String::new(),
                        Err(me) => format!(" (mount tmpfs: {})", ename(me)),
                    }
                )),
            }
        })
    })
}

pub fn chroot_escape(ctx: &Ctx) -> Outcome {
    with_dir(ctx, "forkbox-probe-jail", |d| {
        in_child("chroot", Iso::Same, || {
            let root = match dev_ino("/") {
                Ok(r) => r,
                Err(e) => return Outcome::blocked(format!("stat /: {}", ename(e))),
            };
            let c = cpath(d);
            // SAFETY: chroot of a NUL-terminated path, in a short-lived child.
            if unsafe { libc::chroot(c.as_ptr()) } != 0 {
                return Outcome::blocked(format!("chroot: {}", last()));
            }
            // The classic trick: the cwd stayed outside the new root, so ".." climbs.
            let up = cstr("..");
            for _ in 0..256 {
                // SAFETY: chdir to a NUL-terminated relative path.
                unsafe { libc::chdir(up.as_ptr()) };
            }
            let dot = cstr(".");
            // SAFETY: as above.
            let r = unsafe { libc::chroot(dot.as_ptr()) };
            let now = dev_ino("/").unwrap_or((0, 0));
            Outcome::from(
                r == 0 && now == root,
                format!(
                    "chroot allowed; chdir(..) x256 then chroot(.): {}",
                    if now == root {
                        "back at the original root"
                    } else {
                        "still inside"
                    }
                ),
            )
        })
    })
}

pub fn cgroup_mount(ctx: &Ctx) -> Outcome {
    with_dir(ctx, "forkbox-probe-cg", |d| {
        in_child("cgroup mount", Iso::Private, || {
            let mut notes = Vec::new();
            for (fstype, data) in [("cgroup", "memory"), ("cgroup", "rdma"), ("cgroup2", "")] {
                match mount("cgroup", d, fstype, data) {
                    Ok(()) => {
                        umount(d);
                        return Outcome::escaped(format!(
                            "mounted {fstype} {data}: release_agent / cgroup.procs reachable"
                        ));
                    }
                    Err(e) => notes.push(format!("{fstype} {data}: {}", ename(e))),
                }
            }
            Outcome::blocked(notes.join(", "))
        })
    })
}

/// Fds 3 and up the probe inherited (collected before it opened anything).
pub fn inherited_fds() -> Vec<i32> {
    (3..4096)
        // SAFETY: F_GETFD only queries the fd table.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect()
}

pub fn leaked_fds(ctx: &Ctx) -> Outcome {
    if ctx.inherited.is_empty() {
        return Outcome::blocked("only fds 0-2 inherited");
    }
    let root = dev_ino("/").unwrap_or((0, 0));
    let mut notes = Vec::new();
    for &fd in &ctx.inherited {
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        // SAFETY: dup of an inherited fd, so `top_of` can own its copy.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
        let reach = if dup >= 0 {
            let d: OwnedFd = own(dup as libc::c_long);
            match top_of(&d) {
                Ok(top) if top != root => " (a directory: its .. climbs outside our root)",
                Ok(_) => " (a directory under our root)",
                Err(_) => "",
            }
        } else {
            ""
        };
        notes.push(format!("fd {fd} -> {link}{reach}"));
    }
    Outcome::escaped(format!("inherited {}", notes.join(", ")))
}

pub fn cwd_outside_root(_: &Ctx) -> Outcome {
    let cwd = match std::env::current_dir() {
        Ok(p) => p.display().to_string(),
        Err(e) => format!("getcwd: {e}"),
    };
    let root = match dev_ino("/") {
        Ok(r) => r,
        Err(e) => return Outcome::blocked(format!("stat /: {}", ename(e))),
    };
    let here = match util::open(".", libc::O_RDONLY | libc::O_DIRECTORY) {
        Ok(fd) => fd,
        Err(e) => return Outcome::blocked(format!("open .: {}", ename(e))),
    };
    match top_of(&here) {
        Ok(top) => Outcome::from(
            top != root || cwd.starts_with("(unreachable)"),
            format!(
                "cwd {cwd}: .. {}",
                if top == root {
                    "stops at our root"
                } else {
                    "climbs past our root"
                }
            ),
        ),
        Err(e) => Outcome::blocked(format!("cwd {cwd}: {}", ename(e))),
    }
}

/// Pids whose links the probe may follow: `--pid`, else (in a sandbox) every pid.
fn visible_pids(ctx: &Ctx) -> Vec<i32> {
    if !ctx.pids.is_empty() {
        ctx.pids.clone()
    } else if util::host() {
        Vec::new()
    } else {
        util::pids()
    }
}

/// Whether `pid` lives in a PID namespace below ours (its `NSpid` has more than one
/// entry as our /proc shows it).
fn in_nested_pidns(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .map(|v| v.split_whitespace().count() > 1)
        })
        .unwrap_or(false)
}

pub fn proc_root_cwd(ctx: &Ctx) -> Outcome {
    let root = match dev_ino("/") {
        Ok(r) => r,
        Err(e) => return Outcome::blocked(format!("stat /: {}", ename(e))),
    };
    let all = visible_pids(ctx);
    if all.is_empty() {
        return Outcome::skipped("no pid to look at (host mode needs --pid)");
    }
    // Processes in PID namespaces nested in ours are our own fork children's: the
    // same tenant's filesystem, which a fork parent may see (docs/threat-model.md).
    let (pids, family): (Vec<i32>, Vec<i32>) = all.into_iter().partition(|p| !in_nested_pidns(*p));
    let (mut checked, mut refused) = (0, 0);
    let mut outside = Vec::new();
    for pid in &pids {
        for what in ["root", "cwd"] {
            match util::open(
                &format!("/proc/{pid}/{what}"),
                libc::O_RDONLY | libc::O_DIRECTORY,
            ) {
                Ok(fd) => {
                    checked += 1;
                    if let Ok(top) = top_of(&fd) {
                        if top != root {
                            outside.push(format!("/proc/{pid}/{what}"));
                        }
                    }
                }
                Err(_) => refused += 1,
            }
        }
    }
    if outside.is_empty() {
        Outcome::blocked(format!(
            "{} processes: {checked} root/cwd links all under our root, {refused} refused; {} of our fork children not judged",
            pids.len(),
            family.len()
        ))
    } else {
        Outcome::escaped(format!("outside our root: {}", outside.join(", ")))
    }
}

/// `struct file_handle` with room for the handle.
#[repr(C)]
struct Handle {
    bytes: u32,
    kind: i32,
    data: [u8; 128],
}

pub fn open_by_handle_at(_: &Ctx) -> Outcome {
    in_child("open_by_handle_at", Iso::Same, || {
        let mount_fd = match util::open("/", libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) => return Outcome::blocked(format!("open /: {}", ename(e))),
        };
        let mut h = Handle {
            bytes: 128,
            kind: 0,
            data: [0; 128],
        };
        let mut mount_id: i32 = 0;
        let etc = cstr("/etc");
        // SAFETY: name_to_handle_at with a valid path, a handle buffer of `bytes` bytes
        // and an int out pointer.
        let named = sys(unsafe {
            libc::syscall(
                libc::SYS_name_to_handle_at,
                libc::AT_FDCWD,
                etc.as_ptr(),
                &mut h as *mut Handle,
                &mut mount_id as *mut i32,
                0,
            )
        });
        let how = match named {
            Ok(_) => "name_to_handle_at(/etc) ok".to_owned(),
            Err(e) => {
                // Forge one, as the "shocker" exploit did: inode 2, generation 0.
                h.bytes = 8;
                h.kind = 1; // FILEID_INO32_GEN
                h.data[..4].copy_from_slice(&2u32.to_ne_bytes());
                format!("name_to_handle_at: {}; forged handle", ename(e))
            }
        };
        // SAFETY: open_by_handle_at with a valid mount fd and handle buffer.
        let r = sys(unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                mount_fd.as_raw_fd(),
                &mut h as *mut Handle,
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        });
        match r {
            Ok(fd) => {
                drop(own(fd));
                Outcome::escaped(format!("{how}; open_by_handle_at opened it"))
            }
            Err(e) => Outcome::blocked(format!("{how}; open_by_handle_at: {}", ename(e))),
        }
    })
}

/// Targets for attacks on the runtime's processes: `--pid`, else (in a sandbox) PID 1
/// and every `forkbox-*` process but ourselves.
pub fn runtime_targets(ctx: &Ctx) -> Vec<i32> {
    if !ctx.pids.is_empty() {
        return ctx.pids.clone();
    }
    if util::host() {
        return Vec::new();
    }
    let me = std::process::id() as i32;
    let mut v = vec![1];
    for p in util::pids() {
        let c = util::comm(p);
        if p != 1 && p != me && c.starts_with("forkbox-") && c != "forkbox-probe" {
            v.push(p);
        }
    }
    v
}

/// Rewrites the first byte of `fd` with itself: proves write access without changing it.
fn rewrite_first_byte(fd: &OwnedFd) -> Result<(), i32> {
    let mut b = [0u8; 1];
    // SAFETY: pread into a 1-byte buffer we own.
    if unsafe { libc::pread(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1, 0) } != 1 {
        return Err(errno());
    }
    // SAFETY: pwrite from a 1-byte buffer we own.
    if unsafe { libc::pwrite(fd.as_raw_fd(), b.as_ptr().cast(), 1, 0) } != 1 {
        return Err(errno());
    }
    Ok(())
}

/// CVE-2019-5736: open the runtime's executable through /proc/<pid>/exe for writing;
/// if it is busy, keep a read-only fd and retry through /proc/self/fd for a while (the
/// exploit waits for the runtime to exit).
fn exe_write(pid: &str, wait: Duration) -> (bool, String) {
    let path = format!("/proc/{pid}/exe");
    match util::open(&path, libc::O_RDWR) {
        Ok(fd) => {
            return match rewrite_first_byte(&fd) {
                Ok(()) => (true, format!("{path}: opened and wrote")),
                Err(e) => (false, format!("{path}: opened, write {}", ename(e))),
            }
        }
        Err(e) if e != libc::ETXTBSY => return (false, format!("{path}: {}", ename(e))),
        Err(_) => {}
    }
    let ro = match util::open(&path, libc::O_RDONLY) {
        Ok(fd) => fd,
        Err(e) => {
            return (
                false,
                format!("{path}: ETXTBSY, read-only open {}", ename(e)),
            )
        }
    };
    let again = format!("/proc/self/fd/{}", ro.as_raw_fd());
    let deadline = Instant::now() + wait;
    loop {
        match util::open(&again, libc::O_RDWR) {
            Ok(fd) => {
                return match rewrite_first_byte(&fd) {
                    Ok(()) => (true, format!("{path}: reopened for writing and wrote")),
                    Err(e) => (false, format!("{path}: reopened, write {}", ename(e))),
                }
            }
            Err(e) if e == libc::ETXTBSY && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                return (
                    false,
                    format!("{path}: kept fd, reopen for writing {}", ename(e)),
                )
            }
        }
    }
}

pub fn proc_exe_write(ctx: &Ctx) -> Outcome {
    let wait = Duration::from_millis(ctx.exe_wait_ms);
    let mut notes = Vec::new();
    let mut escaped = false;
    for pid in runtime_targets(ctx) {
        let (e, n) = exe_write(&pid.to_string(), wait);
        escaped |= e;
        notes.push(n);
    }
    // Our own executable is a file of the sandbox, writable by its owner: writing it is
    // only an escape if it lives outside the sandbox's filesystem.
    let (e, n) = exe_write("self", Duration::ZERO);
    let own_dev = util::dev_ino("/proc/self/exe").map(|d| d.0).ok();
    let root_dev = util::dev_ino("/").map(|d| d.0).ok();
    let foreign = own_dev != root_dev;
    escaped |= e && foreign && !util::host();
    notes.push(format!(
        "{n}{}",
        if foreign { " (not on our root fs)" } else { "" }
    ));
    Outcome::from(escaped, notes.join("; "))
}

pub fn mknod(ctx: &Ctx) -> Outcome {
    let mut notes = Vec::new();
    let mut escaped = false;
    for base in [ctx.tmp.clone(), ctx.scratch.clone()] {
        let Ok(d) = util::scratch(&base, "forkbox-probe-dev") else {
            continue;
        };
        for (name, kind, maj, min) in [
            ("null", libc::S_IFCHR, 1, 3),
            ("mem", libc::S_IFCHR, 1, 1),
            ("loop0", libc::S_IFBLK, 7, 0),
        ] {
            let p = d.join(name);
            let c = cpath(&p);
            // SAFETY: mknod of a NUL-terminated path in our scratch dir.
            let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::makedev(maj, min)) };
            if r == 0 {
                escaped = true;
                notes.push(format!("made {}", p.display()));
            } else {
                notes.push(format!("{}: {}", p.display(), last()));
            }
        }
        let _ = std::fs::remove_dir_all(&d);
    }
    Outcome::from(escaped, notes.join(", "))
}
