//! The zygote: a child of the agent that gave up every privilege once — capabilities,
//! `no_new_privs`, the seccomp filters — and then forks each user command from that
//! state. Installing a ~1500-instruction seccomp filter costs more than a millisecond;
//! forking a process that already has it costs nothing extra.
//!
//! Agent ↔ zygote: one SOCK_SEQPACKET socketpair, one JSON message per packet.
//! The agent sends [`Request::Spawn`] with the command's stdin/stdout/stderr attached
//! (SCM_RIGHTS); the zygote answers [`Reply::Spawned`] (or `Failed`) and later
//! [`Reply::Exited`] when it reaps the command. Commands are the zygote's children.

use forkbox_sys::seccomp::Filters;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::CString;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::reaper::Exit;

const MAX_MSG: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Spawn {
        id: u64,
        argv: Vec<String>,
        env: Vec<String>,
        cwd: String,
        /// A fourth fd follows stdio and becomes fd 3 (a REPL kernel's control socket).
        extra: bool,
        /// stdin is a terminal: make it the command's controlling terminal.
        #[serde(default)]
        tty: bool,
        /// May call `setns` (the Python kernel, which carries itself into fork
        /// children); everything else gets a filter denying it.
        #[serde(default)]
        may_setns: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Spawned {
        id: u64,
        pid: i32,
    },
    Failed {
        id: u64,
        error: String,
    },
    Exited {
        pid: i32,
        code: i32,
        signal: Option<i32>,
    },
}

/// A command for the zygote to start.
pub struct Command {
    pub argv: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    pub cwd: String,
    /// stdin, stdout, stderr.
    pub stdio: [OwnedFd; 3],
    /// Becomes the command's fd 3 when given.
    pub extra: Option<OwnedFd>,
    /// stdin is a pseudo-terminal that becomes the controlling terminal.
    pub tty: bool,
    /// May call `setns`: only the Python kernel, to carry itself into fork children.
    pub may_setns: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("start zygote: {0}")]
    Start(nix::Error),
    #[error("zygote is gone")]
    Gone,
    #[error("talk to zygote: {0}")]
    Io(std::io::Error),
    #[error("start command: {0}")]
    Spawn(String),
}

type SpawnReply = Result<(i32, oneshot::Receiver<Exit>), String>;

#[derive(Default)]
struct Pending {
    spawns: HashMap<u64, oneshot::Sender<SpawnReply>>,
    exits: HashMap<i32, oneshot::Sender<Exit>>,
}

/// The agent's handle on its zygote.
#[derive(Clone)]
pub struct Spawner {
    sock: Arc<AsyncFd<OwnedFd>>,
    pending: Arc<Mutex<Pending>>,
    next: Arc<AtomicU64>,
}

/// Forks the zygote. Must be called while the process is single-threaded.
pub fn fork_zygote(filters: &Filters) -> Result<OwnedFd, ZygoteError> {
    let (agent_end, zygote_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(ZygoteError::Start)?;
    // SAFETY: the caller guarantees a single-threaded process, so the child may run
    // arbitrary code.
    match unsafe { nix::unistd::fork() }.map_err(ZygoteError::Start)? {
        nix::unistd::ForkResult::Child => {
            // Keep only stderr (the agent's log) and our socket, as fd 3.
            // SAFETY: dup2/close_range on fds of this single-threaded child.
            let sock = unsafe {
                let z = zygote_end.as_raw_fd();
                if z != 3 && libc::dup2(z, 3) < 0 {
                    libc::_exit(1);
                }
                libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
                std::mem::forget(zygote_end);
                std::mem::forget(agent_end);
                OwnedFd::from_raw_fd(3)
            };
            let code = match zygote_main(sock, filters) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("forkbox-zygote: {e}");
                    1
                }
            };
            // SAFETY: ending the zygote without running the agent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(zygote_end);
            Ok(agent_end)
        }
    }
}

fn send_reply(sock: &OwnedFd, r: &Reply) {
    let bytes = serde_json::to_vec(r).unwrap_or_default();
    let iov = [std::io::IoSlice::new(&bytes)];
    let _ = sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::empty(), None);
}

/// Real and saved uid of the zygote (its effective uid stays 0). The kernel lets a
/// process signal another only when its real or effective uid is the target's real or
/// saved uid, so user code (uid 0, no capabilities) cannot kill the zygote, not even
/// with `kill(-1, SIGKILL)`; the zygote's children go back to 0 for all three, which an
/// unprivileged process may do because 0 is its effective uid.
pub const ZYGOTE_UID: u32 = 65534;

fn zygote_main(sock: OwnedFd, filters: &Filters) -> std::io::Result<()> {
    nix::unistd::setresuid(
        nix::unistd::Uid::from_raw(ZYGOTE_UID),
        nix::unistd::Uid::from_raw(0),
        nix::unistd::Uid::from_raw(ZYGOTE_UID),
    )
    .map_err(std::io::Error::from)?;
    // SAFETY: prctl with integer/static-string arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, c"forkbox-zygote".as_ptr(), 0, 0, 0);
    }
    // The host shields the agent from the OOM killer (-1000); user commands must stay
    // killable, so the zygote and everything it forks take the default back.
    let _ = std::fs::write("/proc/self/oom_score_adj", "0");
    forkbox_sys::caps::drop_all()?;
    forkbox_sys::caps::set_no_new_privs()?;
    forkbox_sys::seccomp::install(filters).map_err(std::io::Error::other)?;
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().map_err(std::io::Error::from)?;
    let sfd = nix::sys::signalfd::SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    )
    .map_err(std::io::Error::from)?;
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        let mut fds = [
            nix::poll::PollFd::new(sock.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(sfd.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let sock_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let sig_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        if sig_ready {
            while let Ok(Some(_)) = sfd.read_signal() {}
            reap(&sock);
        }
        if sock_ready {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let (n, fds) = {
                let msg = match recvmsg::<()>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => m,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                };
                let mut fds: Vec<OwnedFd> = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these fds for us.
                        fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                (msg.bytes, fds)
            };
            if n == 0 {
                // The agent is gone.
                return Ok(());
            }
            match serde_json::from_slice::<Request>(&buf[..n]) {
                Ok(Request::Spawn {
                    id,
                    argv,
                    env,
                    cwd,
                    extra,
                    tty,
                    may_setns,
                }) => {
                    let nosetns = (!may_setns).then_some(&filters.nosetns);
                    let reply = match spawn(&argv, &env, &cwd, fds, extra, tty, nosetns) {
                        Ok(pid) => Reply::Spawned { id, pid },
                        Err(error) => Reply::Failed { id, error },
                    };
                    send_reply(&sock, &reply);
                }
                Err(e) => eprintln!("forkbox-zygote: bad request: {e}"),
            }
        }
    }
}

fn reap(sock: &OwnedFd) {
    loop {
        let r = match waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => Reply::Exited {
                pid: pid.as_raw(),
                code,
                signal: None,
            },
            Ok(WaitStatus::Signaled(pid, sig, _)) => Reply::Exited {
                pid: pid.as_raw(),
                code: 128 + sig as i32,
                signal: Some(sig as i32),
            },
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        send_reply(sock, &r);
    }
}

fn cstrings(v: &[String]) -> Result<Vec<CString>, String> {
    v.iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| "argument contains NUL".to_owned()))
        .collect()
}

/// Forks and execs one command with `stdio` as fds 0-2 (and a fourth fd as 3 when
/// `extra`). Returns its pid.
fn spawn(
    argv: &[String],
    env: &[String],
    cwd: &str,
    stdio: Vec<OwnedFd>,
    extra: bool,
    tty: bool,
    nosetns: Option<&forkbox_sys::seccomp::BpfProgram>,
) -> Result<i32, String> {
    let want = if extra { 4 } else { 3 };
    if stdio.len() != want || argv.is_empty() {
        return Err("malformed spawn request".into());
    }
    let extra_fd: RawFd = if extra { stdio[3].as_raw_fd() } else { -1 };
    let first_closed: u32 = if extra { 4 } else { 3 };
    let argv_c = cstrings(argv)?;
    let env_c = cstrings(env)?;
    let cwd_c = CString::new(cwd).map_err(|_| "cwd contains NUL".to_owned())?;
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    env_p.push(std::ptr::null());
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let raw: [RawFd; 3] = [
        stdio[0].as_raw_fd(),
        stdio[1].as_raw_fd(),
        stdio[2].as_raw_fd(),
    ];
    // SAFETY: the zygote is single-threaded; the child only makes syscalls on data
    // prepared above and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: async-signal-safe syscalls only, on fds and strings we own.
        unsafe {
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::setsid();
            if libc::setresuid(0, 0, 0) < 0 {
                child_fail(err_w.as_raw_fd());
            }
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, i as i32) < 0 {
                    child_fail(err_w.as_raw_fd());
                }
            }
            if extra_fd >= 0 && libc::dup2(extra_fd, 3) < 0 {
                child_fail(err_w.as_raw_fd());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                child_fail(err_w.as_raw_fd());
            }
            if libc::chdir(cwd_c.as_ptr()) < 0 {
                child_fail(err_w.as_raw_fd());
            }
            libc::syscall(
                libc::SYS_close_range,
                first_closed,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            // Commands may not join namespaces (a fork child's would give them every
            // capability there); `no_new_privs` is the zygote's already.
            if let Some(f) = nosetns {
                if forkbox_sys::seccomp::install_one(f).is_err() {
                    child_fail(err_w.as_raw_fd());
                }
            }
            libc::execve(argv_p[0], argv_p.as_ptr(), env_p.as_ptr());
            child_fail(err_w.as_raw_fd());
        }
    }
    drop(err_w);
    drop(stdio);
    let mut b = [0u8; 4];
    let n = nix::unistd::read(err_r.as_raw_fd(), &mut b).unwrap_or(0);
    if n == 4 {
        let errno = i32::from_ne_bytes(b);
        let _ = waitpid(nix::unistd::Pid::from_raw(pid), None);
        return Err(format!(
            "exec {}: {}",
            argv[0],
            std::io::Error::from_raw_os_error(errno)
        ));
    }
    Ok(pid)
}

/// Reports errno to the zygote and ends the child.
///
/// # Safety
/// Only for the forked child.
unsafe fn child_fail(fd: RawFd) -> ! {
    // SAFETY: errno location and write/_exit are async-signal-safe.
    unsafe {
        let e = *libc::__errno_location();
        let b = e.to_ne_bytes();
        libc::write(fd, b.as_ptr().cast(), 4);
        libc::_exit(127)
    }
}

impl Spawner {
    /// Wraps the agent's end of the zygote socket; starts reading replies.
    pub fn new(sock: OwnedFd) -> std::io::Result<Spawner> {
        nix::fcntl::fcntl(
            sock.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(std::io::Error::from)?;
        // SAFETY: `sock` is an OwnedFd moved into the AsyncFd for its whole lifetime.
        let afd = unsafe { AsyncFd::register(sock) }.map_err(std::io::Error::from)?;
        let s = Spawner {
            sock: Arc::new(afd),
            pending: Arc::default(),
            next: Arc::new(AtomicU64::new(1)),
        };
        let me = s.clone();
        tokio::spawn(async move { me.read_loop().await });
        Ok(s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        match self.pending.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    async fn read_loop(&self) {
        let mut buf = vec![0u8; MAX_MSG];
        loop {
            let n = match self
                .sock
                .async_io(tokio::io::Interest::READABLE, |fd| {
                    nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                        .map_err(std::io::Error::from)
                })
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let Ok(reply) = serde_json::from_slice::<Reply>(&buf[..n]) else {
                continue;
            };
            let mut p = self.lock();
            match reply {
                Reply::Spawned { id, pid } => {
                    let (tx, rx) = oneshot::channel();
                    p.exits.insert(pid, tx);
                    if let Some(w) = p.spawns.remove(&id) {
                        let _ = w.send(Ok((pid, rx)));
                    }
                }
                Reply::Failed { id, error } => {
                    if let Some(w) = p.spawns.remove(&id) {
                        let _ = w.send(Err(error));
                    }
                }
                Reply::Exited { pid, code, signal } => {
                    if let Some(w) = p.exits.remove(&pid) {
                        let _ = w.send(Exit { code, signal });
                    }
                }
            }
        }
        // The zygote died: fail everyone waiting.
        let mut p = self.lock();
        p.spawns.clear();
        p.exits.clear();
    }

    /// Starts `cmd`; returns its pid and a receiver for its exit.
    pub async fn spawn(&self, cmd: Command) -> Result<(i32, oneshot::Receiver<Exit>), ZygoteError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().spawns.insert(id, tx);
        let msg = serde_json::to_vec(&Request::Spawn {
            id,
            argv: cmd.argv,
            env: cmd.env,
            cwd: cmd.cwd,
            extra: cmd.extra.is_some(),
            tty: cmd.tty,
            may_setns: cmd.may_setns,
        })
        .map_err(|e| ZygoteError::Io(e.into()))?;
        let mut raw: Vec<RawFd> = cmd.stdio.iter().map(|f| f.as_raw_fd()).collect();
        if let Some(x) = &cmd.extra {
            raw.push(x.as_raw_fd());
        }
        let sent = self
            .sock
            .async_io(tokio::io::Interest::WRITABLE, |fd| {
                let iov = [std::io::IoSlice::new(&msg)];
                let cm = [ControlMessage::ScmRights(&raw)];
                sendmsg::<()>(fd.as_raw_fd(), &iov, &cm, MsgFlags::empty(), None)
                    .map_err(std::io::Error::from)
            })
            .await;
        // Our copies of the command's stdio must close so that EOF can happen.
        drop(cmd.stdio);
        drop(cmd.extra);
        if let Err(e) = sent {
            self.lock().spawns.remove(&id);
            return Err(ZygoteError::Io(e));
        }
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(ZygoteError::Spawn(e)),
            Err(_) => Err(ZygoteError::Gone),
        }
    }
}
