//! Shared helpers: outcomes, errno names, running an attempt in a sacrificial child
//! process, small file and `/proc` readers.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What one probe found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The attack worked.
    pub escaped: bool,
    /// The errno or what happened.
    pub detail: String,
    /// The probe did not run (host mode, or nothing to try).
    pub skipped: bool,
}

impl Outcome {
    pub fn blocked(detail: impl Into<String>) -> Outcome {
        Outcome {
            escaped: false,
            detail: detail.into(),
            skipped: false,
        }
    }

    pub fn escaped(detail: impl Into<String>) -> Outcome {
        Outcome {
            escaped: true,
            detail: detail.into(),
            skipped: false,
        }
    }

    pub fn skipped(detail: impl Into<String>) -> Outcome {
        Outcome {
            escaped: false,
            detail: detail.into(),
            skipped: true,
        }
    }

    /// `escaped` if `escaped` is true, else `blocked`, with `detail` either way.
    pub fn from(escaped: bool, detail: impl Into<String>) -> Outcome {
        if escaped {
            Outcome::escaped(detail)
        } else {
            Outcome::blocked(detail)
        }
    }
}

/// Set by `--host`: the probe runs on the host as a control, so anything that could
/// change the host's state must first be isolated (or not run at all).
static HOST: AtomicBool = AtomicBool::new(false);

pub fn set_host(on: bool) {
    HOST.store(on, Ordering::SeqCst);
}

pub fn host() -> bool {
    HOST.load(Ordering::SeqCst)
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `EPERM`-style name of an errno value.
pub fn ename(e: i32) -> String {
    let s = format!("{:?}", nix::errno::Errno::from_raw(e));
    if s == "UnknownErrno" {
        format!("errno {e}")
    } else {
        s
    }
}

/// Name of the current errno.
pub fn last() -> String {
    ename(errno())
}

/// A raw syscall's result: the value, or the errno.
pub fn sys(r: libc::c_long) -> Result<libc::c_long, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// A libc call's int result: the value, or the errno.
pub fn check(r: libc::c_int) -> Result<libc::c_int, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// For privilege checks the kernel makes *before* validating arguments: EPERM/EACCES
/// mean refused, ENOSYS means the kernel lacks the call; any other answer (including
/// success) means the caller got past the permission check.
pub fn permission_passed(r: Result<libc::c_long, i32>) -> (bool, String) {
    match r {
        Ok(v) => (true, format!("returned {v}")),
        Err(e) if e == libc::EPERM || e == libc::EACCES || e == libc::ENOSYS => (false, ename(e)),
        Err(e) => (true, format!("{} (past the permission check)", ename(e))),
    }
}

pub fn cstr(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

pub fn cpath(p: &Path) -> CString {
    cstr(&p.to_string_lossy())
}

/// Opens `path` with `flags`; the fd or the errno.
pub fn open(path: &str, flags: libc::c_int) -> Result<OwnedFd, i32> {
    let c = cstr(path);
    // SAFETY: `c` is a valid NUL-terminated string; the fd returned is ours.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        Err(errno())
    } else {
        // SAFETY: a fresh fd nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Takes ownership of a raw fd returned by a syscall.
pub fn own(fd: libc::c_long) -> OwnedFd {
    // SAFETY: callers pass a fresh fd a syscall just returned.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// `(st_dev, st_ino)` of `path` (following symlinks).
pub fn dev_ino(path: &str) -> Result<(u64, u64), i32> {
    let c = cstr(path);
    // SAFETY: plain stat into a zeroed buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated, `st` is a valid out pointer.
    check(unsafe { libc::stat(c.as_ptr(), &mut st) })?;
    Ok((st.st_dev, st.st_ino))
}

/// `(st_dev, st_ino)` of an open fd.
pub fn fd_dev_ino(fd: i32) -> Result<(u64, u64), i32> {
    // SAFETY: plain fstat into a zeroed buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer; a bad fd only yields EBADF.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok((st.st_dev, st.st_ino))
}

/// Starting from the directory `fd`, follows `..` until it stops moving; returns the
/// `(dev, ino)` where it stopped. The kernel stops `..` at the caller's root, so a
/// directory under our root ends at our root; one outside ends somewhere else.
pub fn top_of(fd: &OwnedFd) -> Result<(u64, u64), i32> {
    let dotdot = cstr("..");
    let mut cur = {
        // SAFETY: dup of a valid fd.
        let d = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if d < 0 {
            return Err(errno());
        }
        own(d as libc::c_long)
    };
    for _ in 0..4096 {
        let here = fd_dev_ino(cur.as_raw_fd())?;
        // SAFETY: openat relative to a valid directory fd with a NUL-terminated name.
        let up = unsafe {
            libc::openat(
                cur.as_raw_fd(),
                dotdot.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if up < 0 {
            return Err(errno());
        }
        let up = own(up as libc::c_long);
        if fd_dev_ino(up.as_raw_fd())? == here {
            return Ok(here);
        }
        cur = up;
    }
    Err(libc::ELOOP)
}

/// Reads a small file to a string.
pub fn read(path: &str) -> Result<String, i32> {
    std::fs::read_to_string(path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}

/// Numeric entries of /proc.
pub fn pids() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// `/proc/<pid>/comm`, trimmed.
pub fn comm(pid: i32) -> String {
    read(&format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// A hex field of /proc/self/status (`CapEff` ...).
pub fn status_field(name: &str) -> Option<String> {
    read("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_owned())
    })
}

/// A fresh scratch directory `prefix-<pid>-<n>` under `base`, mode 0755.
pub fn scratch(base: &Path, prefix: &str) -> Result<PathBuf, String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let p = base.join(format!("{prefix}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
    let c = cpath(&p);
    // SAFETY: chmod of a path we just created.
    unsafe { libc::chmod(c.as_ptr(), 0o755) };
    Ok(p)
}

/// Where the sacrificial child runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Iso {
    /// The caller's namespaces.
    Same,
    /// New mount (private), UTS, IPC and network namespaces when the caller may make
    /// them (on the host); in a sandbox that fails and the child stays in the
    /// sandbox's own namespaces, which is what is being probed. In host mode a failure
    /// to isolate skips the attempt.
    Private,
}

/// How a child attempt ended.
pub enum End {
    /// The child reported an outcome (and exited or was killed afterwards).
    Report(Outcome),
    /// Killed by this signal before reporting; `progress` is its last progress note.
    Signal(i32, String),
    /// Exited with this code before reporting.
    Exit(i32, String),
    /// Still running after the deadline: killed.
    Timeout(String),
}

impl End {
    /// The reported outcome, or a blocked one describing how the child ended.
    pub fn outcome(self, what: &str) -> Outcome {
        match self {
            End::Report(o) => o,
            End::Signal(s, p) => Outcome::blocked(format!(
                "{what}: child killed by {}{}",
                signame(s),
                note(&p)
            )),
            End::Exit(c, p) => Outcome::blocked(format!(
                "{what}: child exited {c} without a report{}",
                note(&p)
            )),
            End::Timeout(p) => Outcome::blocked(format!("{what}: timed out{}", note(&p))),
        }
    }
}

fn note(p: &str) -> String {
    if p.is_empty() {
        String::new()
    } else {
        format!(" after {p}")
    }
}

pub fn signame(s: i32) -> String {
    nix::sys::signal::Signal::try_from(s)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {s}"))
}

/// The child's side of the report pipe.
pub struct Reporter {
    w: std::fs::File,
}

impl Reporter {
    /// A progress note (the parent keeps the last one).
    pub fn progress(&mut self, p: &str) {
        let _ = writeln!(self.w, "P{}", p.replace('\n', " "));
    }

    fn report(&mut self, o: &Outcome) {
        let tag = if o.skipped {
            'S'
        } else if o.escaped {
            'E'
        } else {
            'B'
        };
        let _ = writeln!(self.w, "{tag}{}", o.detail.replace('\n', " "));
    }
}

/// Isolates the current (child) process as `iso` asks; `Err` when it must not go on.
fn isolate(iso: Iso) -> Result<(), String> {
    if iso == Iso::Same {
        return Ok(());
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET;
    // SAFETY: unshare with flags only affects this (child) process.
    if unsafe { libc::unshare(flags) } != 0 {
        let e = last();
        return if host() {
            Err(format!("host mode: could not isolate the attempt ({e})"))
        } else {
            Ok(())
        };
    }
    let root = cstr("/");
    // SAFETY: mount with NULL source/fstype/data and a NUL-terminated target.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(format!("could not make mounts private ({})", last()));
    }
    Ok(())
}

/// Runs `f` in a forked child (isolated as `iso`), waits up to `timeout` for its report.
/// The child may send progress notes; a child killed before reporting (SIGSYS from
/// seccomp, SIGKILL from the OOM killer) is described by [`End`].
pub fn child(iso: Iso, timeout: Duration, f: impl FnOnce(&mut Reporter) -> Outcome) -> End {
    let (r, w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return End::Exit(-1, format!("pipe: {e}")),
    };
    let _ = std::io::stdout().flush();
    // SAFETY: the probe is single-threaded, so the child may run ordinary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return End::Exit(-1, format!("fork: {}", last()));
    }
    if pid == 0 {
        drop(r);
        let mut rep = Reporter {
            w: std::fs::File::from(w),
        };
        let o = match isolate(iso) {
            Ok(()) => f(&mut rep),
            Err(e) => Outcome::skipped(e),
        };
        rep.report(&o);
        // SAFETY: leave the child without running the parent's atexit handlers.
        unsafe { libc::_exit(0) };
    }
    drop(w);
    let mut file = std::fs::File::from(r);
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut progress = String::new();
    let mut report: Option<Outcome> = None;
    let mut timed_out = false;
    loop {
        // Everything up to the last newline is complete lines.
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let (tag, rest) = line.split_at(line.len().min(1));
            match tag {
                "P" => progress = rest.to_owned(),
                "E" => report = Some(Outcome::escaped(rest)),
                "B" => report = Some(Outcome::blocked(rest)),
                "S" => report = Some(Outcome::skipped(rest)),
                _ => {}
            }
        }
        if report.is_some() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(1000) as i32;
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            continue;
        }
        let mut chunk = [0u8; 4096];
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(_) => break,
        }
    }
    if timed_out {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if let Some(o) = report {
        return End::Report(o);
    }
    if timed_out {
        return End::Timeout(progress);
    }
    if libc::WIFSIGNALED(status) {
        End::Signal(libc::WTERMSIG(status), progress)
    } else {
        End::Exit(libc::WEXITSTATUS(status), progress)
    }
}

/// [`child`] with the usual 20 s limit, folded into an outcome.
pub fn in_child(what: &str, iso: Iso, f: impl FnOnce() -> Outcome) -> Outcome {
    child(iso, Duration::from_secs(20), |_| f()).outcome(what)
}
