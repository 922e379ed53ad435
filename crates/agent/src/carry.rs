//! `forkbox-agent carry REPL_PID INODE…`: carries the Python REPL's fork copies into
//! fork children, so that no code of the sandbox's ever runs with a capability.
//!
//! The REPL may not `setns` on its own: the seccomp filter of every user process
//! answers `setns` with `SECCOMP_RET_TRACE`, which is `ENOSYS` unless a tracer that
//! asked for seccomp stops lets it through. The agent starts this helper (a process of
//! its own: the agent's reaper would take ptrace stops meant for a thread) before it
//! asks the REPL to fork. It seizes the REPL with `TRACEFORK`, so every copy the REPL
//! forks stops before its first instruction and is traced by us. For each copy, in the
//! order of the REPL's forks (one per child, `INODE`s being the child's seven
//! namespaces, in [`NAMESPACES`] order), it makes the copy undumpable (nothing else in
//! the sandbox may touch its memory while it holds capabilities), then executes in it,
//! one single-stepped `syscall` instruction at a time, the seven `setns` (the copy's
//! descriptors found by inode) and the drop of every capability (securebits; the
//! bounding set by a loop of ours mapped from a sealed memfd the copy holds, one stop
//! instead of one per capability; ambient set; `capset`), makes it dumpable again and
//! lets it go. The copy never
//! runs an instruction of its own while it holds anything; if this helper dies, its
//! copies die with it (`PTRACE_O_EXITKILL`).
//!
//! Prints `ready` once the REPL is seized, then a line per child, `I ok` or
//! `I err MESSAGE`, and `done`.

use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::io::Write as _;
use std::process::ExitCode;

/// The namespaces a copy joins, in order, with their `setns` flags: the user namespace
/// first (it grants the capabilities the others need), the PID namespace last (it only
/// applies to the copy's own children).
pub const NAMESPACES: [(&str, i32); 7] = [
    ("user", libc::CLONE_NEWUSER),
    ("mnt", libc::CLONE_NEWNS),
    ("uts", libc::CLONE_NEWUTS),
    ("ipc", libc::CLONE_NEWIPC),
    ("net", libc::CLONE_NEWNET),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("pid", libc::CLONE_NEWPID),
];

/// How long a carry may take, all copies together.
const DEADLINE_S: u32 = 25;

/// `SECBIT_*` of every user process: no root privileges, no setuid fixups, no ambient
/// raise, all locked (the zygote's state).
const SECUREBITS: u64 = 0xEF;

pub fn run(args: &[String]) -> ExitCode {
    let numbers: Option<Vec<u64>> = args.iter().map(|a| a.parse::<u64>().ok()).collect();
    let parsed = numbers.filter(|n| {
        n.len() > 2 && (n.len() - 2) % NAMESPACES.len() == 0 && i32::try_from(n[0]).is_ok()
    });
    let Some(numbers) = parsed else {
        eprintln!("usage: forkbox-agent carry REPL_PID BLOB_INODE (7 namespace inodes per child)…");
        return ExitCode::from(2);
    };
    let (repl, blob_ino, inos) = (numbers[0] as i32, numbers[1], &numbers[2..]);
    // Whatever happens, not forever (the agent gives up sooner; our copies die with us);
    // and nothing of the sandbox's may read or write our memory.
    // SAFETY: plain alarm(2) and prctl(2).
    unsafe {
        libc::alarm(DEADLINE_S);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let repl = Pid::from_raw(repl);
    let mut out = std::io::stdout().lock();
    if let Err(e) = ptrace::seize(repl, ptrace::Options::PTRACE_O_TRACEFORK) {
        let _ = writeln!(out, "fail seize the Python kernel: {e}");
        return ExitCode::FAILURE;
    }
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(63);
    let mut c = Carrier {
        repl,
        repl_traced: true,
        children: inos.chunks(NAMESPACES.len()).map(<[u64]>::to_vec).collect(),
        forks: Vec::new(),
        born: Vec::new(),
        moving: HashMap::new(),
        done: 0,
        hint: None,
        blob: None,
        blob_ino,
        last_cap,
        out,
    };
    // Every copy moves along on its own: while one waits for its step to come back,
    // the others (and the REPL's next fork) go on.
    while c.done < c.children.len() {
        let status = match waitpid(None, Some(WaitPidFlag::__WALL)) {
            Ok(s) => s,
            Err(_) => break,
        };
        c.on(status);
        c.start_ready();
        if !c.repl_traced && c.moving.is_empty() && c.done == c.forks.len() {
            // The REPL is gone (or detached) and no copy is left to come.
            break;
        }
    }
    for i in c.done..c.children.len() {
        c.report(i, Err("the Python kernel did not fork this copy".into()));
    }
    let _ = writeln!(c.out, "done");
    ExitCode::SUCCESS
}

struct Carrier {
    repl: Pid,
    repl_traced: bool,
    /// Each child's namespace inodes.
    children: Vec<Vec<u64>>,
    /// The REPL's copies, in the order it forked them (copy i goes to child i).
    forks: Vec<Pid>,
    /// Copies seen stopped at birth, not started yet.
    born: Vec<Pid>,
    /// Copies being moved.
    moving: HashMap<Pid, Move>,
    /// Children reported.
    done: usize,
    /// The REPL's namespace descriptors (every copy inherits them).
    hint: Option<HashMap<(String, u64), i32>>,
    /// The REPL's descriptor of the sealed memfd with the bounding-set code (inode
    /// `blob_ino`); `Some(None)`: it holds none.
    blob: Option<Option<i32>>,
    blob_ino: u64,
    last_cap: u64,
    out: std::io::StdoutLock<'static>,
}

impl Carrier {
    fn report(&mut self, i: usize, r: Result<(), String>) {
        let line = match r {
            Ok(()) => format!("{i} ok"),
            Err(e) => format!("{i} err {}", e.replace('\n', " ")),
        };
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
        self.done += 1;
    }

    fn on(&mut self, status: WaitStatus) {
        let pid = match status {
            WaitStatus::PtraceEvent(p, ..)
            | WaitStatus::Stopped(p, _)
            | WaitStatus::Exited(p, _)
            | WaitStatus::Signaled(p, ..) => p,
            _ => return,
        };
        if pid == self.repl {
            self.on_repl(status);
        } else if let Some(mut m) = self.moving.remove(&pid) {
            match m.on(status) {
                Ok(false) => {
                    self.moving.insert(pid, m);
                }
                Ok(true) => self.report(m.child, Ok(())),
                Err(e) => {
                    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    self.report(m.child, Err(e));
                }
            }
        } else if matches!(
            status,
            WaitStatus::PtraceEvent(..) | WaitStatus::Stopped(..)
        ) {
            // A copy stopped at birth (possibly before the REPL's fork event names
            // it). Once all are known, any other is not ours to carry.
            if self.forks.len() >= self.children.len() && !self.forks.contains(&pid) {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            } else if !self.born.contains(&pid) {
                self.born.push(pid);
            }
        }
    }

    fn on_repl(&mut self, status: WaitStatus) {
        match status {
            WaitStatus::PtraceEvent(p, _, ev) => {
                if ev == libc::PTRACE_EVENT_FORK {
                    if let Ok(child) = ptrace::getevent(p) {
                        self.forks.push(Pid::from_raw(child as i32));
                    }
                }
                if self.forks.len() >= self.children.len() {
                    // Enough copies: the REPL runs on untraced.
                    let _ = ptrace::detach(p, None);
                    self.repl_traced = false;
                } else {
                    let _ = ptrace::cont(p, None);
                }
            }
            WaitStatus::Stopped(p, sig) => {
                // A signal for the REPL: passed on.
                let _ = ptrace::cont(p, Some(sig));
            }
            _ => self.repl_traced = false,
        }
    }

    /// Starts every copy that is both born and known to be child i.
    fn start_ready(&mut self) {
        let ready: Vec<(usize, Pid)> = self
            .forks
            .iter()
            .enumerate()
            .filter(|(_, p)| self.born.contains(p))
            .map(|(i, p)| (i, *p))
            .collect();
        for (i, copy) in ready {
            self.born.retain(|p| *p != copy);
            let repl = self.repl;
            let hint = self
                .hint
                .get_or_insert_with(|| namespace_fds(repl).unwrap_or_default());
            let blob_ino = self.blob_ino;
            let blob = *self
                .blob
                .get_or_insert_with(|| fd_with_inode(repl, blob_ino, None));
            // The copy's own, checked (a copy whose REPL shuffled its descriptors takes
            // the slow way).
            let blob = blob.and_then(|fd| fd_with_inode(copy, blob_ino, Some(fd)));
            let started = Move::start(repl, copy, i, &self.children[i], hint, blob, self.last_cap);
            match started {
                Ok(m) => {
                    self.moving.insert(copy, m);
                }
                Err(e) => {
                    let _ = nix::sys::signal::kill(copy, Signal::SIGKILL);
                    self.report(i, Err(e));
                }
            }
        }
    }
}

/// `kcmp(2)`: whether two processes share a resource (`Ok(true)`), or cannot be
/// compared because one is gone.
fn shares(a: Pid, b: Pid, kind: i32) -> Result<bool, String> {
    // SAFETY: kcmp with integer arguments only.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, a.as_raw(), b.as_raw(), kind, 0, 0) };
    match r {
        0 => Ok(true),
        r if r > 0 => Ok(false),
        _ => match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ESRCH) => Ok(false),
            _ => Err(format!("kcmp: {}", std::io::Error::last_os_error())),
        },
    }
}

/// The `syscall` instruction, as the word's low bytes.
const SYSCALL: u16 = 0x050f;

/// One step of a move: a call executed in the copy, or the check that it holds
/// nothing.
enum Step {
    Call {
        what: &'static str,
        nr: i64,
        args: [u64; 6],
    },
    /// `mmap` of the bounding-set code (`BLOB`) from its sealed memfd (`fd` in the copy).
    MapBlob {
        fd: i32,
    },
    /// Runs that code (one stop at its `int3` instead of one per capability).
    RunBlob,
    /// `munmap` of it.
    UnmapBlob,
    HoldsNothing,
}

/// A call with three arguments (the rest zero: calls like prctl(PR_CAP_AMBIENT, …)
/// refuse anything else there).
fn call3(what: &'static str, nr: i64, a: [u64; 3]) -> Step {
    Step::Call {
        what,
        nr,
        args: [a[0], a[1], a[2], 0, 0, 0],
    }
}

// The loop that empties the bounding set, executed in a copy from a sealed memfd
// mapping (`blob_file`): prctl(PR_CAPBSET_DROP, cap) for cap = 0, 1, … until the kernel
// says EINVAL (past the last capability), then `int3`. Position independent.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.forkbox_bset_blob,\"ax\",@progbits",
    ".globl forkbox_bset_blob",
    "forkbox_bset_blob:",
    "xor ebx, ebx",
    "forkbox_bset_loop:",
    "mov eax, 157",
    "mov edi, 24",
    "mov rsi, rbx",
    "xor edx, edx",
    "xor r10d, r10d",
    "xor r8d, r8d",
    "xor r9d, r9d",
    "syscall",
    "test rax, rax",
    "js forkbox_bset_done",
    "inc rbx",
    "cmp rbx, 64",
    "jb forkbox_bset_loop",
    "forkbox_bset_done:",
    "int3",
    ".globl forkbox_bset_blob_end",
    "forkbox_bset_blob_end:",
    ".popsection",
);

#[cfg(target_arch = "x86_64")]
extern "C" {
    static forkbox_bset_blob: u8;
    static forkbox_bset_blob_end: u8;
}

/// The bounding-set code's bytes.
#[cfg(target_arch = "x86_64")]
fn blob() -> &'static [u8] {
    // SAFETY: the two symbols delimit the code above, in this binary's text.
    unsafe {
        let start = std::ptr::addr_of!(forkbox_bset_blob);
        let end = std::ptr::addr_of!(forkbox_bset_blob_end);
        std::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn blob() -> &'static [u8] {
    &[]
}

/// A sealed memfd holding the bounding-set code: the agent passes it to the REPL with
/// a fork's namespaces, so every copy holds it; nobody can change what it holds.
pub fn blob_file() -> std::io::Result<std::fs::File> {
    use std::io::Write as _;
    use std::os::fd::FromRawFd as _;
    // SAFETY: memfd_create with a NUL-terminated name; a new fd we own.
    let fd = unsafe {
        libc::memfd_create(
            c"forkbox-carry".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just made and is ours.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(blob())?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our fd.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// One copy on its way into one child (see the module docs): its plan of calls and
/// where it is in it.
struct Move {
    pid: Pid,
    child: usize,
    saved: libc::user_regs_struct,
    /// Its `syscall` instruction (the one of its fork).
    at: u64,
    plan: Vec<Step>,
    next: usize,
    /// The stack words the capset arguments were written over.
    sp: u64,
    kept: [i64; 4],
    /// Where the bounding-set code is mapped in the copy.
    mapped: u64,
}

#[cfg(target_arch = "x86_64")]
impl Move {
    /// Checks and prepares the copy, then starts its first call.
    fn start(
        repl: Pid,
        copy: Pid,
        child: usize,
        inos: &[u64],
        hint: &HashMap<(String, u64), i32>,
        blob_fd: Option<i32>,
        last_cap: u64,
    ) -> Result<Move, String> {
        ptrace::setoptions(
            copy,
            ptrace::Options::PTRACE_O_EXITKILL | ptrace::Options::PTRACE_O_TRACESECCOMP,
        )
        .map_err(|e| format!("trace the copy: {e}"))?;
        // A real fork: nothing of it (memory, descriptors, root and cwd) shared with
        // the REPL, whose other threads run the sandbox's code.
        const KCMP_VM: i32 = 1;
        const KCMP_FILES: i32 = 2;
        const KCMP_FS: i32 = 3;
        for (kind, what) in [
            (KCMP_VM, "memory"),
            (KCMP_FILES, "descriptors"),
            (KCMP_FS, "fs"),
        ] {
            if shares(repl, copy, kind)? {
                return Err(format!("the copy shares its {what} with the Python kernel"));
            }
        }
        let saved = ptrace::getregs(copy).map_err(|e| format!("read the copy's registers: {e}"))?;
        // It stopped right after the `syscall` of its fork: that instruction is ours.
        let at = saved.rip.wrapping_sub(2);
        let word = ptrace::read(copy, at as ptrace::AddressType)
            .map_err(|e| format!("read the copy's code: {e}"))?;
        if (word as u64 & 0xffff) as u16 != SYSCALL {
            return Err("the copy did not stop after a syscall instruction".into());
        }
        // Prepared while the copy is dumpable, i.e. while this helper (which may hold no
        // capability over the user namespace the REPL's image came from, in a fork of a
        // fork) can still read its descriptors and write its memory; it holds nothing.
        let mut plan = vec![call3(
            "undumpable",
            libc::SYS_prctl,
            [libc::PR_SET_DUMPABLE as u64, 0, 0],
        )];
        let mut scanned: Option<HashMap<(String, u64), i32>> = None;
        for ((name, flag), ino) in NAMESPACES.iter().zip(inos) {
            let key = (name.to_string(), *ino);
            // Where the REPL holds it, the copy does too (checked); else a scan.
            let fd = match hint.get(&key) {
                Some(fd) if is_namespace(copy, *fd, name, *ino) => *fd,
                _ => {
                    if scanned.is_none() {
                        scanned = Some(namespace_fds(copy)?);
                    }
                    *scanned.as_ref().and_then(|f| f.get(&key)).ok_or_else(|| {
                        format!("the copy holds no descriptor of the child's {name} namespace")
                    })?
                }
            };
            plan.push(call3(
                "join a namespace of the child",
                libc::SYS_setns,
                [fd as u64, *flag as u64, 0],
            ));
        }
        plan.push(call3(
            "securebits",
            libc::SYS_prctl,
            [libc::PR_SET_SECUREBITS as u64, SECUREBITS, 0],
        ));
        // The bounding set: one traced call per capability, or the same loop run
        // from the sealed memfd the copy holds (one stop), where the agent sent one.
        match blob_fd {
            Some(fd) => plan.extend([Step::MapBlob { fd }, Step::RunBlob, Step::UnmapBlob]),
            None => {
                for cap in 0..=last_cap {
                    plan.push(call3(
                        "drop the bounding set",
                        libc::SYS_prctl,
                        [libc::PR_CAPBSET_DROP as u64, cap, 0],
                    ));
                }
            }
        }
        plan.push(call3(
            "clear the ambient set",
            libc::SYS_prctl,
            [
                libc::PR_CAP_AMBIENT as u64,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as u64,
                0,
            ],
        ));
        // capset(header, data): header {version 3, pid 0} and two empty data sets,
        // written over the copy's stack top and put back at the end. (What capset did
        // is checked from /proc, whatever another process may write there before.)
        let sp = saved.rsp;
        let mut kept = [0i64; 4];
        for (i, k) in kept.iter_mut().enumerate() {
            *k = ptrace::read(copy, (sp + 8 * i as u64) as ptrace::AddressType)
                .map_err(|e| format!("read the copy's stack: {e}"))?;
        }
        for (i, v) in [0x2008_0522i64, 0, 0, 0].into_iter().enumerate() {
            poke(copy, sp + 8 * i as u64, v)?;
        }
        plan.push(call3(
            "drop every capability",
            libc::SYS_capset,
            [sp, sp + 8, 0],
        ));
        plan.push(Step::HoldsNothing);
        plan.push(call3(
            "dumpable",
            libc::SYS_prctl,
            [libc::PR_SET_DUMPABLE as u64, 1, 0],
        ));
        let mut m = Move {
            pid: copy,
            child,
            saved,
            at,
            plan,
            next: 0,
            sp,
            kept,
            mapped: 0,
        };
        m.issue()?;
        Ok(m)
    }

    /// Starts the next call (checks done inline) or, at the end, lets the copy go:
    /// `Ok(true)` when it is gone into the child.
    fn issue(&mut self) -> Result<bool, String> {
        loop {
            match self.plan.get(self.next) {
                None => {
                    for (i, k) in self.kept.iter().enumerate() {
                        poke(self.pid, self.sp + 8 * i as u64, *k)?;
                    }
                    ptrace::setregs(self.pid, self.saved)
                        .map_err(|e| format!("restore the copy's registers: {e}"))?;
                    ptrace::detach(self.pid, None).map_err(|e| format!("let the copy go: {e}"))?;
                    return Ok(true);
                }
                Some(Step::HoldsNothing) => {
                    holds_nothing(self.pid)?;
                    self.next += 1;
                }
                Some(Step::Call { nr, args, .. }) => {
                    let (nr, args) = (*nr, *args);
                    return self.syscall(nr, args).map(|()| false);
                }
                Some(Step::MapBlob { fd }) => {
                    // Shared, of a write-sealed memfd: no page of it can be written,
                    // not even through a `/proc/<pid>/mem` opened while the copy was
                    // still dumpable (the kernel forces writes only into private
                    // mappings).
                    let args = [
                        0,
                        4096,
                        (libc::PROT_READ | libc::PROT_EXEC) as u64,
                        libc::MAP_SHARED as u64,
                        *fd as u64,
                        0,
                    ];
                    return self.syscall(libc::SYS_mmap, args).map(|()| false);
                }
                Some(Step::RunBlob) => {
                    let mut r = self.saved;
                    r.rip = self.mapped;
                    r.orig_rax = u64::MAX;
                    ptrace::setregs(self.pid, r)
                        .map_err(|e| format!("set the copy's registers: {e}"))?;
                    ptrace::cont(self.pid, None).map_err(|e| format!("run the copy: {e}"))?;
                    return Ok(false);
                }
                Some(Step::UnmapBlob) => {
                    let args = [self.mapped, 4096, 0, 0, 0, 0];
                    return self.syscall(libc::SYS_munmap, args).map(|()| false);
                }
            }
        }
    }

    /// Starts `nr(args)` at the copy's `syscall` instruction.
    fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<(), String> {
        let mut r = self.saved;
        r.rip = self.at;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        ptrace::setregs(self.pid, r).map_err(|e| format!("set the copy's registers: {e}"))?;
        ptrace::step(self.pid, None).map_err(|e| format!("step the copy: {e}"))
    }

    /// A stop of the copy while a call runs: `Ok(true)` once the copy is gone into the
    /// child.
    fn on(&mut self, status: WaitStatus) -> Result<bool, String> {
        match status {
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_SECCOMP => {
                // Our own `setns`, held by the seccomp gate on its way in: let it
                // through (the step goes on to the end of the call).
                ptrace::step(self.pid, None).map_err(|e| format!("step the copy: {e}"))?;
                return Ok(false);
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => return Err("the copy died".into()),
            _ => {}
        }
        let now =
            ptrace::getregs(self.pid).map_err(|e| format!("read the copy's registers: {e}"))?;
        if matches!(self.plan.get(self.next), Some(Step::RunBlob)) {
            // Done at its `int3` (the stop comes with the instruction pointer past it);
            // any other stop is a signal, suppressed here: on it goes.
            if matches!(status, WaitStatus::Stopped(_, Signal::SIGTRAP))
                && now.rip == self.mapped + blob().len() as u64
            {
                self.next += 1;
                return self.issue();
            }
            if now.rip < self.mapped || now.rip >= self.mapped + blob().len() as u64 {
                return Err(format!("the copy went astray (at {:#x})", now.rip));
            }
            ptrace::cont(self.pid, None).map_err(|e| format!("run the copy: {e}"))?;
            return Ok(false);
        }
        // Done once it is past the instruction; a stop before it (a signal arriving,
        // suppressed here) steps again. Never a step beyond it.
        if now.rip == self.at {
            ptrace::step(self.pid, None).map_err(|e| format!("step the copy: {e}"))?;
            return Ok(false);
        }
        if now.rip != self.at + 2 {
            return Err(format!("the copy went astray (at {:#x})", now.rip));
        }
        let r = now.rax as i64;
        let what = match self.plan.get(self.next) {
            Some(Step::Call { what, .. }) => *what,
            Some(Step::MapBlob { .. }) => "map the bounding-set code",
            Some(Step::UnmapBlob) => "unmap the bounding-set code",
            _ => "a call",
        };
        // mmap answers an address, or -errno in the last page of the address space.
        if r < 0 && r > -4096 {
            return Err(format!(
                "{what}: {}",
                std::io::Error::from_raw_os_error(-r as i32)
            ));
        }
        if matches!(self.plan.get(self.next), Some(Step::MapBlob { .. })) {
            self.mapped = now.rax;
        }
        self.next += 1;
        self.issue()
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl Move {
    fn start(
        _repl: Pid,
        _copy: Pid,
        _child: usize,
        _inos: &[u64],
        _hint: &HashMap<(String, u64), i32>,
        _blob_fd: Option<i32>,
        _last_cap: u64,
    ) -> Result<Move, String> {
        Err("carrying the REPL into fork children needs x86_64".into())
    }

    fn on(&mut self, _status: WaitStatus) -> Result<bool, String> {
        Err("carrying the REPL into fork children needs x86_64".into())
    }
}

fn poke(pid: Pid, addr: u64, v: i64) -> Result<(), String> {
    ptrace::write(pid, addr as ptrace::AddressType, v)
        .map_err(|e| format!("write the copy's stack: {e}"))
}

/// Every capability set of `pid` is empty and `no_new_privs` is set (from
/// `/proc/<pid>/status`).
fn holds_nothing(pid: Pid) -> Result<(), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read the copy's status: {e}"))?;
    if !status
        .lines()
        .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"]))
    {
        return Err("the copy lost no_new_privs".into());
    }
    let sets: Vec<&str> = status.lines().filter(|l| l.starts_with("Cap")).collect();
    let empty = sets.len() == 5
        && sets.iter().all(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|v| v.bytes().all(|b| b == b'0'))
        });
    if empty {
        Ok(())
    } else {
        Err(format!(
            "the copy still holds capabilities: {}",
            sets.join(", ")
        ))
    }
}

/// `pid`'s descriptor of the file with inode `ino` (a memfd): `fd` if given and it is
/// that, else the first found.
fn fd_with_inode(pid: Pid, ino: u64, fd: Option<i32>) -> Option<i32> {
    use std::os::unix::fs::MetadataExt as _;
    let is =
        |fd: i32| std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).is_ok_and(|m| m.ino() == ino);
    if let Some(fd) = fd {
        return is(fd).then_some(fd);
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .find(|fd| is(*fd))
}

/// Whether `pid`'s descriptor `fd` is the `kind` namespace with inode `ino`.
fn is_namespace(pid: Pid, fd: i32, kind: &str, ino: u64) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|t| t.to_string_lossy() == format!("{kind}:[{ino}]"))
}

/// A process's namespace descriptors: (kind, inode) → fd number.
fn namespace_fds(copy: Pid) -> Result<HashMap<(String, u64), i32>, String> {
    let dir = format!("/proc/{copy}/fd");
    let mut found = HashMap::new();
    for e in std::fs::read_dir(&dir).map_err(|e| format!("list {dir}: {e}"))? {
        let Ok(e) = e else { continue };
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        // "user:[4026532001]"
        let t = target.to_string_lossy();
        if let Some((kind, rest)) = t.split_once(":[") {
            if let Some(ino) = rest.strip_suffix(']').and_then(|i| i.parse::<u64>().ok()) {
                found.insert((kind.to_owned(), ino), fd);
            }
        }
    }
    Ok(found)
}
