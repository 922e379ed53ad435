//! Resource exhaustion: processes, memory, disk, tmpfs, fds, output.

use crate::util::{self, child, ename, errno, signame, End, Iso, Outcome, Reporter};
use crate::Ctx;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// Reaps whatever was re-parented to us (we are a child subreaper), for up to `wait`.
fn reap_orphans(wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    let mut n = 0;
    loop {
        let mut st = 0;
        // SAFETY: reaping any child of ours without blocking.
        let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG | libc::__WALL) };
        if r > 0 {
            n += 1;
            continue;
        }
        if r < 0 || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn fork_bomb(ctx: &Ctx) -> Outcome {
    // SAFETY: become a child subreaper so the bomb's orphans come back to us.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let (cap, max) = (ctx.fork_cap, ctx.max_pids);
    let end = child(Iso::Same, Duration::from_secs(120), |rep| {
        // SAFETY: our own process group, so the bomb can be signalled as one.
        unsafe { libc::setpgid(0, 0) };
        let mut n: u32 = 0;
        let mut why = String::from("reached the cap");
        while n < cap {
            // SAFETY: fork; the new process only sleeps until it is killed.
            let p = unsafe { libc::fork() };
            if p == 0 {
                loop {
                    // SAFETY: wait for a signal.
                    unsafe { libc::pause() };
                }
            }
            if p < 0 {
                why = ename(errno());
                break;
            }
            n += 1;
            if n.is_multiple_of(64) {
                rep.progress(&format!("{n} processes"));
            }
        }
        // Take the bomb down: SIGTERM to the group, which we ignore ourselves.
        // SAFETY: signal disposition and a signal to our own process group.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
            libc::kill(0, libc::SIGTERM);
        }
        Outcome::from(
            n > max,
            format!("forked {n} processes, then {why} (limit {max})"),
        )
    });
    let reaped = reap_orphans(Duration::from_secs(10));
    let mut o = end.outcome("fork bomb");
    o.detail.push_str(&format!("; {reaped} reaped"));
    o
}

pub fn memory_bomb(ctx: &Ctx) -> Outcome {
    let cap = ctx.mem_cap_mb;
    let end = child(Iso::Same, Duration::from_secs(180), |rep| {
        const CHUNK: usize = 16 << 20;
        let mut total: u64 = 0;
        while total < cap {
            // SAFETY: a fresh private anonymous mapping, never unmapped (the child exits).
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    CHUNK,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Outcome::blocked(format!(
                    "mmap failed ({}) after {total} MiB",
                    util::last()
                ));
            }
            for off in (0..CHUNK).step_by(4096) {
                // SAFETY: inside the mapping we just made.
                unsafe { std::ptr::write_volatile(p.cast::<u8>().add(off), 1) };
            }
            total += (CHUNK >> 20) as u64;
            rep.progress(&format!("{total} MiB"));
        }
        Outcome::escaped(format!("allocated and touched {total} MiB, no limit hit"))
    });
    match end {
        End::Signal(s, p) => {
            // Killed: escaped only if it got past the sandbox's limit first.
            let got: u64 = p
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let over = ctx.mem_limit_mb.is_some_and(|l| got > l);
            Outcome::from(
                over,
                format!(
                    "killed by {} (the OOM killer) after {p} of a {cap} MiB try{}",
                    signame(s),
                    ctx.mem_limit_mb
                        .map(|l| format!(" (limit {l} MiB)"))
                        .unwrap_or_default()
                ),
            )
        }
        other => other.outcome("memory bomb"),
    }
}

fn free_space(dir: &Path) -> String {
    let c = util::cpath(dir);
    // SAFETY: statvfs into a zeroed struct we own.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path, valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0 {
        format!("{} MiB free", (s.f_bavail as u64 * s.f_frsize as u64) >> 20)
    } else {
        "free space unknown".into()
    }
}

/// Writes incompressible data into `dir/name` until an error or `cap_mb`; always
/// removes the file.
fn fill(dir: &Path, name: &str, cap_mb: u64, what: &str) -> Outcome {
    let path = dir.join(name);
    let before = free_space(dir);
    let end = child(Iso::Same, Duration::from_secs(600), |rep: &mut Reporter| {
        let f = match std::fs::File::create(&path) {
            Ok(f) => f,
            Err(e) => return Outcome::blocked(format!("create {}: {e}", path.display())),
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_ne_bytes()[..b.len()]);
        }
        let mut mb: u64 = 0;
        while mb < cap_mb {
            let mut off = 0;
            while off < buf.len() {
                // SAFETY: write from our own buffer.
                let n = unsafe {
                    libc::write(f.as_raw_fd(), buf[off..].as_ptr().cast(), buf.len() - off)
                };
                if n < 0 {
                    let e = errno();
                    let quota = e == libc::ENOSPC || e == libc::EDQUOT;
                    return Outcome::blocked(format!(
                        "{} after {mb} MiB{}",
                        ename(e),
                        if quota { "" } else { " (not a quota error)" }
                    ));
                }
                off += n as usize;
            }
            mb += 1;
            if mb.is_multiple_of(64) {
                rep.progress(&format!("{mb} MiB"));
            }
        }
        // SAFETY: fsync of our own file.
        if unsafe { libc::fsync(f.as_raw_fd()) } != 0 {
            return Outcome::blocked(format!("fsync after {mb} MiB: {}", util::last()));
        }
        Outcome::escaped(format!(
            "wrote {mb} MiB with no ENOSPC/EDQUOT: no per-sandbox {what} limit"
        ))
    });
    let _ = std::fs::remove_file(&path);
    let mut o = end.outcome(what);
    o.detail.push_str(&format!(" ({before} before)"));
    o
}

pub fn disk_fill(ctx: &Ctx) -> Outcome {
    fill(&ctx.scratch, ".forkbox-probe-fill", ctx.disk_cap_mb, "disk")
}

pub fn tmpfs_fill(ctx: &Ctx) -> Outcome {
    fill(&ctx.tmp, ".forkbox-probe-fill", ctx.disk_cap_mb, "tmpfs")
}

pub fn fd_exhaustion(_: &Ctx) -> Outcome {
    let end = child(Iso::Same, Duration::from_secs(120), |_| {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit into a struct we own.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
        let (soft, hard) = (rl.rlim_cur, rl.rlim_max);
        let raised = if hard != libc::RLIM_INFINITY {
            let up = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard.saturating_mul(2),
            };
            // SAFETY: setrlimit with a struct we own.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &up) == 0 }
        } else {
            true
        };
        let raise_note = if raised {
            "ok".to_owned()
        } else {
            util::last()
        };
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        let null = match util::open("/dev/null", libc::O_RDONLY) {
            Ok(fd) => fd,
            Err(e) => return Outcome::blocked(format!("/dev/null: {}", ename(e))),
        };
        let cap: u64 = hard.min(1 << 21) + 16;
        let mut n: u64 = 0;
        let mut why = String::from("reached the cap");
        while n < cap {
            // SAFETY: dup of our own fd; never closed (the child exits).
            if unsafe { libc::dup(null.as_raw_fd()) } < 0 {
                let e = errno();
                why = ename(e);
                if e == libc::ENFILE {
                    why.push_str(" (the host's file table is full)");
                }
                break;
            }
            n += 1;
        }
        Outcome::from(
            raised || why.starts_with("ENFILE") || n > hard,
            format!(
                "RLIMIT_NOFILE {soft}/{hard}; raising the hard limit: {raise_note}; opened {n} fds, then {why}"
            ),
        )
    });
    end.outcome("fd exhaustion")
}

pub fn stdout_flood(ctx: &Ctx) -> Outcome {
    let mut line = vec![b'x'; 1023];
    line.push(b'\n');
    let chunk: Vec<u8> = line.repeat(64);
    let want = ctx.flood_mb << 20;
    let t = Instant::now();
    let mut sent: u64 = 0;
    let mut err = String::new();
    while sent < want {
        // SAFETY: write from our own buffer to stdout.
        let n = unsafe { libc::write(1, chunk.as_ptr().cast(), chunk.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            err = format!(", then {}", util::last());
            break;
        }
        sent += n as u64;
    }
    Outcome::blocked(format!(
        "wrote {} MiB to stdout in {:.1}s{err}; the test checks the server stays responsive",
        sent >> 20,
        t.elapsed().as_secs_f64()
    ))
}
