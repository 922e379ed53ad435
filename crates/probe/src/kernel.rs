//! Namespace, process and kernel-interface probes.

use crate::fs::runtime_targets;
use crate::util::{
    self, child, cstr, ename, in_child, last, own, permission_passed, signame, sys, End, Iso,
    Outcome,
};
use crate::Ctx;
use std::os::fd::AsRawFd;
use std::time::Duration;

fn unshare_flags(name: &str, flags: libc::c_int) -> Outcome {
    in_child(name, Iso::Same, || {
        // SAFETY: unshare only affects this short-lived child.
        match util::check(unsafe { libc::unshare(flags) }) {
            Ok(_) => Outcome::escaped(format!("{name} succeeded")),
            Err(e) => Outcome::blocked(format!("{name}: {}", ename(e))),
        }
    })
}

pub fn unshare_user(_: &Ctx) -> Outcome {
    unshare_flags("unshare(CLONE_NEWUSER)", libc::CLONE_NEWUSER)
}

pub fn unshare_mount(_: &Ctx) -> Outcome {
    unshare_flags("unshare(CLONE_NEWNS)", libc::CLONE_NEWNS)
}

pub fn unshare_other(_: &Ctx) -> Outcome {
    let mut notes = Vec::new();
    let mut escaped = false;
    for (n, f) in [
        ("NEWNET", libc::CLONE_NEWNET),
        ("NEWPID", libc::CLONE_NEWPID),
        ("NEWUTS", libc::CLONE_NEWUTS),
        ("NEWIPC", libc::CLONE_NEWIPC),
        ("NEWCGROUP", libc::CLONE_NEWCGROUP),
        ("NEWTIME", 0x80),
    ] {
        let o = unshare_flags(n, f);
        escaped |= o.escaped;
        notes.push(o.detail);
    }
    Outcome::from(escaped, notes.join(", "))
}

pub fn clone_newuser(_: &Ctx) -> Outcome {
    in_child("clone", Iso::Same, || {
        let flags = (libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::SIGCHLD) as libc::c_ulong;
        // SAFETY: raw clone without a new stack behaves like fork; the new process
        // exits at once without touching anything.
        let r = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
        if r == 0 {
            // SAFETY: leave the clone immediately.
            unsafe { libc::_exit(0) };
        }
        match sys(r) {
            Ok(pid) => {
                let mut st = 0;
                // SAFETY: reaping our own child.
                unsafe { libc::waitpid(pid as i32, &mut st, 0) };
                Outcome::escaped("clone(CLONE_NEWUSER|CLONE_NEWNS) made a process")
            }
            Err(e) => Outcome::blocked(format!("clone(CLONE_NEWUSER|CLONE_NEWNS): {}", ename(e))),
        }
    })
}

/// `struct clone_args`, version 0 (64 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

pub fn clone3_newuser(_: &Ctx) -> Outcome {
    in_child("clone3", Iso::Same, || {
        let args = CloneArgs {
            flags: (libc::CLONE_NEWUSER | libc::CLONE_NEWNS) as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        };
        // SAFETY: clone3 without a stack behaves like fork; the new process exits at once.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if r == 0 {
            // SAFETY: leave the clone immediately.
            unsafe { libc::_exit(0) };
        }
        match sys(r) {
            Ok(pid) => {
                let mut st = 0;
                // SAFETY: reaping our own child.
                unsafe { libc::waitpid(pid as i32, &mut st, 0) };
                Outcome::escaped("clone3(CLONE_NEWUSER|CLONE_NEWNS) made a process")
            }
            Err(e) => Outcome::blocked(format!("clone3(CLONE_NEWUSER|CLONE_NEWNS): {}", ename(e))),
        }
    })
}

const NS: [&str; 8] = ["user", "mnt", "net", "pid", "uts", "ipc", "cgroup", "time"];

pub fn setns(ctx: &Ctx) -> Outcome {
    let pids = if !ctx.pids.is_empty() {
        ctx.pids.clone()
    } else if util::host() {
        return Outcome::skipped("host mode needs --pid");
    } else {
        util::pids()
    };
    let ours: Vec<String> = NS
        .iter()
        .map(|n| {
            std::fs::read_link(format!("/proc/self/ns/{n}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    // Every namespace we can see that is not ours, once.
    let mut seen = std::collections::BTreeMap::new();
    for pid in &pids {
        for (i, n) in NS.iter().enumerate() {
            let path = format!("/proc/{pid}/ns/{n}");
            if let Ok(l) = std::fs::read_link(&path) {
                let l = l.display().to_string();
                if l != ours[i] {
                    seen.entry(l).or_insert(path);
                }
            }
        }
    }
    let mut notes = Vec::new();
    let mut escaped = false;
    for (ns, path) in &seen {
        let path = path.clone();
        let o = in_child("setns", Iso::Same, || {
            let fd = match util::open(&path, libc::O_RDONLY) {
                Ok(fd) => fd,
                Err(e) => return Outcome::blocked(format!("open: {}", ename(e))),
            };
            // SAFETY: setns on an fd we opened, in a short-lived child.
            match util::check(unsafe { libc::setns(fd.as_raw_fd(), 0) }) {
                Ok(_) => Outcome::escaped("joined"),
                Err(e) => Outcome::blocked(ename(e)),
            }
        });
        escaped |= o.escaped;
        notes.push(format!("{ns} via {path}: {}", o.detail));
    }
    // Also through a pidfd, all namespaces at once.
    for pid in pids
        .iter()
        .filter(|p| seen.values().any(|v| v.starts_with(&format!("/proc/{p}/"))))
    {
        let pid = *pid;
        let o = in_child("setns(pidfd)", Iso::Same, || {
            // SAFETY: pidfd_open(pid, 0).
            let fd = match sys(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) }) {
                Ok(fd) => own(fd),
                Err(e) => return Outcome::blocked(format!("pidfd_open: {}", ename(e))),
            };
            let all = libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET;
            // SAFETY: setns on our pidfd, in a short-lived child.
            match util::check(unsafe { libc::setns(fd.as_raw_fd(), all) }) {
                Ok(_) => Outcome::escaped("joined uts+ipc+net"),
                Err(e) => Outcome::blocked(ename(e)),
            }
        });
        escaped |= o.escaped;
        notes.push(format!("pidfd of {pid}: {}", o.detail));
        if notes.len() > 40 {
            break;
        }
    }
    if seen.is_empty() {
        // Nothing foreign is visible: still show what joining our own gives.
        let o = in_child("setns", Iso::Same, || {
            let mut v = Vec::new();
            for n in ["mnt", "user", "net"] {
                let r = util::open(&format!("/proc/self/ns/{n}"), libc::O_RDONLY).and_then(|fd| {
                    // SAFETY: setns on an fd we opened, in a short-lived child.
                    util::check(unsafe { libc::setns(fd.as_raw_fd(), 0) })
                });
                v.push(format!(
                    "own {n}: {}",
                    match r {
                        Ok(_) => "ok".to_owned(),
                        Err(e) => ename(e),
                    }
                ));
            }
            Outcome::blocked(v.join(", "))
        });
        notes.push(format!(
            "no namespace but our own visible in {} processes ({})",
            pids.len(),
            o.detail
        ));
    }
    Outcome::from(escaped, notes.join("; "))
}

fn for_targets(ctx: &Ctx, what: &str, f: impl Fn(i32) -> Result<String, String>) -> Outcome {
    let targets = runtime_targets(ctx);
    if targets.is_empty() {
        return Outcome::skipped(format!("{what}: host mode needs --pid"));
    }
    let mut notes = Vec::new();
    let mut escaped = false;
    for pid in targets {
        match f(pid) {
            Ok(n) => {
                escaped = true;
                notes.push(format!("pid {pid} ({}): {n}", util::comm(pid)));
            }
            Err(n) => notes.push(format!("pid {pid} ({}): {n}", util::comm(pid))),
        }
    }
    Outcome::from(escaped, format!("{what}: {}", notes.join(", ")))
}

pub fn ptrace_attach(ctx: &Ctx) -> Outcome {
    for_targets(ctx, "ptrace", |pid| {
        let o = in_child("ptrace", Iso::Same, || {
            // SAFETY: PTRACE_SEIZE (attach without stopping); the tracer is this child,
            // whose exit detaches.
            let r = unsafe {
                libc::ptrace(
                    libc::PTRACE_SEIZE,
                    pid,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            if r == 0 {
                return Outcome::escaped("PTRACE_SEIZE attached");
            }
            let seize = last();
            // SAFETY: PTRACE_ATTACH as above.
            let r = unsafe {
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    pid,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            if r == 0 {
                let mut st = 0;
                // SAFETY: wait for the attach stop, then detach.
                unsafe {
                    libc::waitpid(pid, &mut st, libc::__WALL);
                    libc::ptrace(
                        libc::PTRACE_DETACH,
                        pid,
                        std::ptr::null_mut::<libc::c_void>(),
                        std::ptr::null_mut::<libc::c_void>(),
                    );
                }
                return Outcome::escaped("PTRACE_ATTACH attached");
            }
            Outcome::blocked(format!("SEIZE {seize}, ATTACH {}", last()))
        });
        if o.escaped {
            Ok(o.detail)
        } else {
            Err(o.detail)
        }
    })
}

/// A readable address of `pid`: from its maps if we may read them, else the static
/// agent's load address.
fn some_address(pid: i32) -> (usize, String) {
    if let Ok(maps) = util::read(&format!("/proc/{pid}/maps")) {
        for l in maps.lines() {
            let mut it = l.split_whitespace();
            if let (Some(range), Some(perm)) = (it.next(), it.next()) {
                if perm.starts_with('r') {
                    if let Some(a) = range
                        .split('-')
                        .next()
                        .and_then(|a| usize::from_str_radix(a, 16).ok())
                    {
                        return (a, "from maps".into());
                    }
                }
            }
        }
    }
    (0x400000, "maps unreadable, guessed 0x400000".into())
}

pub fn process_vm_readv(ctx: &Ctx) -> Outcome {
    for_targets(ctx, "process_vm_readv", |pid| {
        let (addr, how) = some_address(pid);
        let mut buf = [0u8; 16];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: reads into our own 16-byte buffer; the remote side is checked by the
        // kernel.
        let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if r > 0 {
            Ok(format!("read {r} bytes at {addr:#x} ({how})"))
        } else {
            Err(format!("{} ({how})", last()))
        }
    })
}

pub fn proc_mem(ctx: &Ctx) -> Outcome {
    for_targets(ctx, "/proc/<pid>/mem", |pid| {
        match util::open(&format!("/proc/{pid}/mem"), libc::O_RDONLY) {
            Ok(_) => Ok("opened".into()),
            Err(e) => Err(ename(e)),
        }
    })
}

pub fn pidfd_getfd(ctx: &Ctx) -> Outcome {
    for_targets(ctx, "pidfd_getfd", |pid| {
        // SAFETY: pidfd_open(pid, 0).
        let pfd = match sys(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) }) {
            Ok(fd) => own(fd),
            Err(e) => return Err(format!("pidfd_open {}", ename(e))),
        };
        let mut last_err = 0;
        for target in 0..8 {
            // SAFETY: pidfd_getfd(pidfd, fd, 0); a returned fd is ours.
            match sys(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pfd.as_raw_fd(), target, 0) }) {
                Ok(fd) => {
                    let fd = own(fd);
                    let l = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    return Ok(format!("took its fd {target} ({l})"));
                }
                Err(e) => last_err = e,
            }
        }
        Err(format!("fds 0-7: {}", ename(last_err)))
    })
}

pub fn pid_visibility(_: &Ctx) -> Outcome {
    let before: std::collections::BTreeSet<i32> = util::pids().into_iter().collect();
    let max: i32 = util::read("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768)
        .min(1 << 22);
    let mut hidden = Vec::new();
    for p in 1..=max {
        // SAFETY: signal 0 only checks existence and permission.
        let r = unsafe { libc::kill(p, 0) };
        let reachable = r == 0 || util::errno() == libc::EPERM;
        if reachable
            && !before.contains(&p)
            && !std::path::Path::new(&format!("/proc/{p}")).exists()
        {
            hidden.push(p);
        }
    }
    Outcome::from(
        !hidden.is_empty(),
        format!(
            "kill(pid, 0) over 1..={max}: {} visible in /proc, {} answering but not in our /proc{}",
            before.len(),
            hidden.len(),
            if hidden.is_empty() {
                String::new()
            } else {
                format!(" (e.g. {:?})", &hidden[..hidden.len().min(10)])
            }
        ),
    )
}

pub fn kill_all(_: &Ctx) -> Outcome {
    if util::host() {
        return Outcome::skipped("never on the host");
    }
    let n = util::pids().len();
    // SAFETY: signal every process we may (the kernel spares PID 1 and us).
    let r = unsafe { libc::kill(-1, libc::SIGKILL) };
    let e = last();
    // SAFETY: existence check of PID 1.
    let init = unsafe { libc::kill(1, 0) } == 0;
    Outcome::blocked(format!(
        "kill(-1, SIGKILL) with {n} processes visible: {}; PID 1 {}; the test checks the host and other sandboxes",
        if r == 0 { "ok".to_owned() } else { e },
        if init { "alive" } else { "gone" }
    ))
}

pub fn tiocsti(_: &Ctx) -> Outcome {
    in_child("TIOCSTI", Iso::Same, || {
        let mut notes = Vec::new();
        let mut escaped = false;
        let ch: u8 = b'#';
        // A fresh pty pair: injecting into a terminal that is not our controlling one.
        match util::open("/dev/ptmx", libc::O_RDWR | libc::O_NOCTTY) {
            Ok(m) => {
                let unlock: libc::c_int = 0;
                // SAFETY: TIOCSPTLCK with a pointer to an int; TIOCGPTPEER returns a new fd.
                let peer = unsafe {
                    libc::ioctl(m.as_raw_fd(), libc::TIOCSPTLCK, &unlock);
                    libc::ioctl(
                        m.as_raw_fd(),
                        0x5441, // TIOCGPTPEER
                        libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
                    )
                };
                if peer < 0 {
                    notes.push(format!("pty peer: {}", last()));
                } else {
                    let peer = own(peer as libc::c_long);
                    // SAFETY: TIOCSTI with a pointer to one byte.
                    let r = unsafe { libc::ioctl(peer.as_raw_fd(), libc::TIOCSTI, &ch) };
                    if r == 0 {
                        escaped = true;
                        notes.push("fresh pty: injected".into());
                    } else {
                        notes.push(format!("fresh pty: {}", last()));
                    }
                }
            }
            Err(e) => notes.push(format!("/dev/ptmx: {}", ename(e))),
        }
        // Our stdio, in the sandbox (never on the host: it may be a real terminal).
        if !util::host() {
            for fd in 0..3 {
                // SAFETY: TIOCSTI with a pointer to one byte on our own stdio.
                let r = unsafe { libc::ioctl(fd, libc::TIOCSTI, &ch) };
                if r == 0 {
                    escaped = true;
                    notes.push(format!("fd {fd}: injected"));
                } else {
                    notes.push(format!("fd {fd}: {}", last()));
                }
            }
        }
        Outcome::from(escaped, notes.join(", "))
    })
}

pub fn init_module(_: &Ctx) -> Outcome {
    let empty = cstr("");
    // SAFETY: init_module(NULL, 0, ""): an empty image; even a privileged caller only
    // gets ENOEXEC.
    let (p, d) = permission_passed(sys(unsafe {
        libc::syscall(
            libc::SYS_init_module,
            std::ptr::null::<u8>(),
            0usize,
            empty.as_ptr(),
        )
    }));
    Outcome::from(p, format!("init_module(empty image): {d}"))
}

pub fn finit_module(_: &Ctx) -> Outcome {
    let empty = cstr("");
    // SAFETY: finit_module(-1, "", 0): a privileged caller only gets EBADF.
    let (p, d) = permission_passed(sys(unsafe {
        libc::syscall(libc::SYS_finit_module, -1, empty.as_ptr(), 0)
    }));
    Outcome::from(p, format!("finit_module(bad fd): {d}"))
}

pub fn reboot(_: &Ctx) -> Outcome {
    // SAFETY: reboot with wrong magic numbers: the kernel checks CAP_SYS_BOOT first, then
    // answers EINVAL to the wrong magic, so nothing can happen.
    let (p, d) = permission_passed(sys(unsafe {
        libc::syscall(
            libc::SYS_reboot,
            0x1234,
            0x5678,
            libc::LINUX_REBOOT_CMD_RESTART,
            0,
        )
    }));
    Outcome::from(p, format!("reboot(wrong magic): {d}"))
}

pub fn kexec_load(_: &Ctx) -> Outcome {
    // SAFETY: kexec_load with too many segments and no segment list: the kernel checks
    // CAP_SYS_BOOT first, then answers EINVAL.
    let (p, d) = permission_passed(sys(unsafe {
        libc::syscall(
            libc::SYS_kexec_load,
            0usize,
            0xffffusize,
            std::ptr::null::<u8>(),
            0usize,
        )
    }));
    Outcome::from(p, format!("kexec_load(65535 segments): {d}"))
}

pub fn bpf(_: &Ctx) -> Outcome {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: bpf(BPF_MAP_CREATE, attr, size) with a zeroed attr we own.
    match sys(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    }) {
        Ok(fd) => {
            drop(own(fd));
            Outcome::escaped("bpf(BPF_MAP_CREATE, array) gave a map")
        }
        Err(e) => Outcome::blocked(format!("bpf(BPF_MAP_CREATE): {}", ename(e))),
    }
}

pub fn perf_event_open(_: &Ctx) -> Outcome {
    let mut notes = Vec::new();
    let mut escaped = false;
    for (what, pid, cpu, exclude_kernel) in [
        ("self, user only", 0, -1, true),
        ("cpu 0, all", -1, 0, false),
    ] {
        // struct perf_event_attr (PERF_ATTR_SIZE_VER5 = 112 bytes): type, size, config,
        // ..., flags at byte 40 (bit 0 disabled, 5 exclude_kernel, 6 exclude_hv).
        let mut attr = [0u8; 112];
        attr[0..4].copy_from_slice(&1u32.to_ne_bytes()); // PERF_TYPE_SOFTWARE
        attr[4..8].copy_from_slice(&112u32.to_ne_bytes());
        // config 0 = PERF_COUNT_SW_CPU_CLOCK
        let flags: u64 = 1 | if exclude_kernel {
            (1 << 5) | (1 << 6)
        } else {
            0
        };
        attr[40..48].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: perf_event_open with an attr buffer we own; the fd is closed at once.
        match sys(unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                pid,
                cpu,
                -1,
                8usize, // PERF_FLAG_FD_CLOEXEC
            )
        }) {
            Ok(fd) => {
                drop(own(fd));
                escaped = true;
                notes.push(format!("{what}: got an fd"));
            }
            Err(e) => notes.push(format!("{what}: {}", ename(e))),
        }
    }
    Outcome::from(escaped, format!("perf_event_open: {}", notes.join(", ")))
}

pub fn userfaultfd(_: &Ctx) -> Outcome {
    let mut notes = Vec::new();
    let mut escaped = false;
    for (what, flags) in [
        ("user-mode only", libc::O_CLOEXEC | 1),
        ("plain", libc::O_CLOEXEC),
    ] {
        // SAFETY: userfaultfd(flags); the fd is closed at once.
        match sys(unsafe { libc::syscall(libc::SYS_userfaultfd, flags) }) {
            Ok(fd) => {
                drop(own(fd));
                escaped = true;
                notes.push(format!("{what}: got an fd"));
            }
            Err(e) => notes.push(format!("{what}: {}", ename(e))),
        }
    }
    match util::open("/dev/userfaultfd", libc::O_RDWR) {
        Ok(_) => {
            escaped = true;
            notes.push("/dev/userfaultfd opened".into());
        }
        Err(e) => notes.push(format!("/dev/userfaultfd: {}", ename(e))),
    }
    Outcome::from(escaped, format!("userfaultfd: {}", notes.join(", ")))
}

pub fn keyctl(_: &Ctx) -> Outcome {
    // SAFETY: keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): read-only.
    match sys(unsafe { libc::syscall(libc::SYS_keyctl, 0, -3, 0) }) {
        Ok(id) => Outcome::escaped(format!("session keyring id {id}")),
        Err(e) => Outcome::blocked(format!("keyctl(GET_KEYRING_ID): {}", ename(e))),
    }
}

pub fn add_key(_: &Ctx) -> Outcome {
    in_child("add_key", Iso::Same, || {
        let (t, d, p) = (cstr("user"), cstr("forkbox-probe"), b"x");
        // SAFETY: add_key into this short-lived child's process keyring (gone with it).
        match sys(unsafe {
            libc::syscall(
                libc::SYS_add_key,
                t.as_ptr(),
                d.as_ptr(),
                p.as_ptr(),
                1usize,
                -2,
            )
        }) {
            Ok(id) => Outcome::escaped(format!("added key {id}")),
            Err(e) => Outcome::blocked(format!("add_key: {}", ename(e))),
        }
    })
}

pub fn io_uring_setup(_: &Ctx) -> Outcome {
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(1, params) with a zeroed params buffer we own.
    match sys(unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) }) {
        Ok(fd) => {
            drop(own(fd));
            Outcome::escaped("io_uring_setup gave a ring")
        }
        Err(e) => Outcome::blocked(format!("io_uring_setup: {}", ename(e))),
    }
}

pub fn clock_settime(_: &Ctx) -> Outcome {
    // settimeofday(NULL, NULL) checks CAP_SYS_TIME and then changes nothing.
    // SAFETY: two NULL pointers.
    let a = sys(unsafe {
        libc::syscall(
            libc::SYS_settimeofday,
            std::ptr::null::<u8>(),
            std::ptr::null::<u8>(),
        )
    });
    // clock_settime with an invalid time: the kernel refuses it whatever the caller's
    // rights; EPERM here means seccomp stopped it first.
    let bad = libc::timespec {
        tv_sec: 0,
        tv_nsec: -1,
    };
    // SAFETY: pointer to a timespec we own.
    let b = sys(unsafe { libc::syscall(libc::SYS_clock_settime, libc::CLOCK_REALTIME, &bad) });
    let d = |r: Result<libc::c_long, i32>| match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => ename(e),
    };
    Outcome::from(
        a.is_ok(),
        format!(
            "settimeofday(NULL, NULL) (CAP_SYS_TIME check): {}; clock_settime(invalid): {}",
            d(a),
            d(b)
        ),
    )
}

pub fn acct(_: &Ctx) -> Outcome {
    let p = cstr("/nonexistent/forkbox-probe-acct");
    // SAFETY: acct(path): the kernel checks CAP_SYS_PACCT first, then fails to open a
    // path that does not exist.
    let (passed, d) = permission_passed(sys(unsafe { libc::syscall(libc::SYS_acct, p.as_ptr()) }));
    Outcome::from(passed, format!("acct(missing file): {d}"))
}

pub fn swapon(_: &Ctx) -> Outcome {
    let p = cstr("/nonexistent/forkbox-probe-swap");
    // SAFETY: swapon(path, 0): the kernel checks CAP_SYS_ADMIN first, then fails to
    // open a path that does not exist.
    let (a, da) = permission_passed(sys(unsafe {
        libc::syscall(libc::SYS_swapon, p.as_ptr(), 0)
    }));
    // SAFETY: swapoff(path): same order of checks.
    let (b, db) = permission_passed(sys(unsafe { libc::syscall(libc::SYS_swapoff, p.as_ptr()) }));
    Outcome::from(a || b, format!("swapon(missing file): {da}; swapoff: {db}"))
}

pub fn syslog(_: &Ctx) -> Outcome {
    let mut buf = vec![0u8; 4096];
    // SAFETY: klogctl(SYSLOG_ACTION_READ_ALL, buf, len) into a buffer we own.
    let r = unsafe { libc::klogctl(3, buf.as_mut_ptr().cast(), buf.len() as i32) };
    if r >= 0 {
        Outcome::escaped(format!("read {r} bytes of the kernel log"))
    } else {
        Outcome::blocked(format!("syslog(READ_ALL): {}", last()))
    }
}

pub fn dev_kmsg(_: &Ctx) -> Outcome {
    match util::open("/dev/kmsg", libc::O_RDONLY | libc::O_NONBLOCK) {
        Ok(fd) => {
            let mut b = [0u8; 256];
            // SAFETY: read into our own buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
            Outcome::escaped(format!("/dev/kmsg opened; read gave {n}"))
        }
        Err(e) => Outcome::blocked(format!("/dev/kmsg: {}", ename(e))),
    }
}

pub fn int80(_: &Ctx) -> Outcome {
    #[cfg(target_arch = "x86_64")]
    {
        let end = child(Iso::Same, Duration::from_secs(10), |_| {
            let ret: i64;
            // SAFETY: the 32-bit syscall gate with eax = 20 (ia32 getpid, no arguments);
            // it clobbers r8-r11 on 64-bit kernels.
            unsafe {
                std::arch::asm!(
                    "int 0x80",
                    inlateout("rax") 20i64 => ret,
                    out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                    options(nostack)
                );
            }
            let me = std::process::id() as i64;
            if ret == me {
                Outcome::escaped(format!("int 0x80 getpid returned our pid {ret}"))
            } else if ret < 0 {
                Outcome::blocked(format!("int 0x80 getpid: {}", ename(-ret as i32)))
            } else {
                Outcome::escaped(format!("int 0x80 getpid returned {ret}"))
            }
        });
        match end {
            End::Signal(s, _) if s == libc::SIGSYS => {
                Outcome::blocked("int 0x80: killed by SIGSYS (seccomp arch check)")
            }
            End::Signal(s, _) => Outcome::blocked(format!("int 0x80: killed by {}", signame(s))),
            other => other.outcome("int 0x80"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Outcome::skipped("x86_64 only")
    }
}

pub fn iopl(_: &Ctx) -> Outcome {
    in_child("iopl", Iso::Same, || {
        // SAFETY: iopl(3) in a short-lived child: raises only this process's I/O level.
        let (a, da) = permission_passed(sys(unsafe { libc::syscall(libc::SYS_iopl, 3) }));
        // SAFETY: ioperm(0x80, 1, 1) in a short-lived child.
        let (b, db) =
            permission_passed(sys(unsafe { libc::syscall(libc::SYS_ioperm, 0x80, 1, 1) }));
        Outcome::from(a || b, format!("iopl(3): {da}; ioperm(0x80): {db}"))
    })
}

pub fn fanotify_init(_: &Ctx) -> Outcome {
    // SAFETY: fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC, O_RDONLY); closed at once.
    match sys(unsafe { libc::syscall(libc::SYS_fanotify_init, 1u32, libc::O_RDONLY as u32) }) {
        Ok(fd) => {
            drop(own(fd));
            Outcome::escaped("fanotify_init gave a group")
        }
        Err(e) => Outcome::blocked(format!("fanotify_init: {}", ename(e))),
    }
}
