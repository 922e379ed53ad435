//! `forkbox-agent jail-init`: builds one jail sandbox and leaves its first process
//! running as the agent.
//!
//! The steps, host side (this process, root in the host's namespaces) and sandbox side
//! (the clone, root of its new user namespace), synchronised over two pipes:
//!
//! | # | host side                                  | sandbox side                               |
//! |---|--------------------------------------------|--------------------------------------------|
//! | 1 | clone with new user, mount, PID, net, IPC, UTS, cgroup namespaces | wait for "go"      |
//! | 2 | write uid_map / gid_map (0..65536 → base)  |                                            |
//! | 3 | move the child into its cgroups; send "go" |                                            |
//! | 4 |                                            | become uid/gid 0, drop supplementary groups |
//! | 5 |                                            | hostname = sandbox id                      |
//! | 6 |                                            | mounts + pivot_root (`forkbox_sys::mounts`) |
//! | 7 |                                            | loopback up; stdio to /dev/null; undumpable |
//! | 8 | read "ok" or the error; print the reply    | close the status pipe; serve the agent     |
//!
//! The cgroup namespace is unshared by the child after step 3, so that its root is the
//! sandbox's own group.

use forkbox_types::agent::{JailInit, JailInitReply};
use nix::unistd::{Gid, Pid, Uid};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

/// The listening socket the host passes us.
const LISTEN_FD: i32 = 3;

pub fn run() -> ExitCode {
    let reply = match build() {
        Ok(pid) => JailInitReply::Ready { pid },
        Err(e) => JailInitReply::Failed { error: e },
    };
    let ok = matches!(reply, JailInitReply::Ready { .. });
    let mut out = std::io::stdout();
    let _ = serde_json::to_writer(&mut out, &reply);
    let _ = out.flush();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn pipe() -> Result<(File, File), String> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    Ok((File::from(r), File::from(w)))
}

fn build() -> Result<i32, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("read config: {e}"))?;
    let cfg: JailInit = serde_json::from_str(&input).map_err(|e| format!("parse config: {e}"))?;
    let (mut go_r, mut go_w) = pipe()?;
    let (mut st_r, mut st_w) = pipe()?;
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    // SAFETY: this process is single-threaded (no runtime started yet), so a raw clone
    // without a new stack behaves like fork(2): the child continues on a copy of our stack.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(format!("clone: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(go_w);
        drop(st_r);
        let code = match sandbox_side(&cfg, &mut go_r) {
            Ok(()) => {
                drop(go_r);
                drop(st_w);
                // Never returns while the sandbox lives.
                let listener = unsafe_listener();
                crate::server::run(listener, cfg.env.clone())
            }
            Err(e) => {
                let _ = st_w.write_all(e.as_bytes());
                ExitCode::FAILURE
            }
        };
        std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
    }
    let pid = pid as i32;
    drop(go_r);
    drop(st_w);
    let host = host_side(&cfg, pid, &mut go_w);
    drop(go_w);
    if let Err(e) = host {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        return Err(e);
    }
    let mut status = String::new();
    let _ = st_r.read_to_string(&mut status);
    if !status.is_empty() {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        return Err(status);
    }
    Ok(pid)
}

fn unsafe_listener() -> OwnedFd {
    // SAFETY: the host passes the sandbox's listening socket as fd 3 and nothing else
    // in this process owns it.
    unsafe { OwnedFd::from_raw_fd(LISTEN_FD) }
}

/// Steps 2-3: id maps and cgroups, then let the child go.
fn host_side(cfg: &JailInit, pid: i32, go: &mut File) -> Result<(), String> {
    let map = format!("0 {} {}\n", cfg.uid_base, forkbox_sys::uidshift::RANGE);
    for f in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{f}"), &map).map_err(|e| format!("write {f}: {e}"))?;
    }
    for procs in &cfg.cgroup_procs {
        std::fs::write(procs, pid.to_string()).map_err(|e| format!("join cgroup {procs}: {e}"))?;
    }
    go.write_all(b"g")
        .map_err(|e| format!("signal sandbox: {e}"))
}

/// Steps 4-7, inside the new namespaces.
fn sandbox_side(cfg: &JailInit, go: &mut File) -> Result<(), String> {
    let mut b = [0u8; 1];
    match go.read(&mut b) {
        Ok(1) => {}
        _ => return Err("host gave up before the sandbox was set up".into()),
    }
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(|e| format!("setresgid: {e}"))?;
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(|e| format!("setresuid: {e}"))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| format!("unshare cgroup namespace: {e}"))?;
    nix::unistd::sethostname(&cfg.id).map_err(|e| format!("sethostname: {e}"))?;
    forkbox_sys::mounts::enter_rootfs(std::path::Path::new(&cfg.rootfs))
        .map_err(|e| e.to_string())?;
    forkbox_sys::net::loopback_up().map_err(|e| format!("loopback up: {e}"))?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("open /dev/null: {e}"))?;
    // stdin and stdout go to /dev/null (stdout is the host's reply pipe); stderr stays the
    // agent's log file on the host.
    for fd in [0, 1] {
        nix::unistd::dup2(null.as_raw_fd(), fd).map_err(|e| format!("dup2: {e}"))?;
    }
    forkbox_sys::caps::set_undumpable().map_err(|e| format!("undumpable: {e}"))?;
    // We were exec'd from /proc/self/fd/N; name ourselves for `ps`.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"forkbox-agent".as_ptr(), 0, 0, 0) };
    Ok(())
}
