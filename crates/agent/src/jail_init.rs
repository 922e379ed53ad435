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
//!
//! A fork child (`fork_of` set) differs in three places: before step 1 this process
//! joins the child's cgroups itself, then enters the parent sandbox's user and PID
//! namespaces and becomes uid 0 there, so the clone's user and PID namespaces are
//! created inside the parent's (owned by the parent's root, which is what lets the
//! parent's REPL join them); in step 2 the map is `0 0 65536` relative to the parent;
//! and the sandbox side listens on the abstract socket `@forkbox-adopt` for the REPL copy.

use forkbox_types::agent::{JailInit, JailInitReply};
use nix::unistd::{Gid, Pid, Uid};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

/// The listening socket the host passes us.
const LISTEN_FD: i32 = 3;

/// `jail-init`, or with `nested` its second stage for a fork child (`jail-init-nested`).
pub fn run(nested: bool) -> ExitCode {
    let reply = match build(nested) {
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

/// Where a fork child's jail-init receives the execute-only agent image.
const NESTED_IMAGE_FD: i32 = 4;

fn build(nested: bool) -> Result<i32, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("read config: {e}"))?;
    let cfg: JailInit = serde_json::from_str(&input).map_err(|e| format!("parse config: {e}"))?;
    // The idmapped root filesystem and volumes, made while this process is still host
    // root in the host's namespaces (the second stage of a fork child inherits them as
    // fds TREE_FD.. across its exec).
    let trees = if nested {
        inherited_trees(&cfg)
    } else {
        idmapped_trees(&cfg)?
    };
    if let (Some(parent), false) = (cfg.fork_of, nested) {
        let Some(t) = trees.as_ref().filter(|_| shifted_owner(&cfg).is_some()) else {
            return Err("a fork child needs a uid range of its own (idmapped mounts)".into());
        };
        t.pin_for_exec()?;
        join_cgroups(&cfg.cgroup_procs)?;
        // From here on this process and its descendants are visible to the parent
        // sandbox's code (in its PID namespace) once forked: nothing of the host's
        // mounts or network may be left in their view.
        if cfg.helper_ns {
            enter_helper_ns()?;
        } else {
            hide_host()?;
        }
        enter_parent(parent)?;
        // CLONE_NEWPID only works from a process born in the PID namespace it nests
        // under, and the child's id maps may only be written by a process whose image
        // was executed inside the parent's user namespace (it then owns the child's
        // /proc files while staying undumpable). So: fork, and exec the second stage
        // from the execute-only image; this process waits and passes on its status
        // (the second stage prints the reply on the shared stdout).
        // SAFETY: single-threaded, as above.
        match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
            nix::unistd::ForkResult::Child => {
                let e = exec_nested(&input);
                let _ = serde_json::to_writer(
                    std::io::stdout(),
                    &JailInitReply::Failed {
                        error: format!("start the nested jail-init: {e}"),
                    },
                );
                // SAFETY: ending the forked copy without running destructors.
                unsafe { libc::_exit(1) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let code = match nix::sys::wait::waitpid(child, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => c,
                    _ => 1,
                };
                std::process::exit(code);
            }
        }
    }
    let (mut go_r, mut go_w) = pipe()?;
    let (mut st_r, mut st_w) = pipe()?;
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    let mut pidfd: libc::c_int = -1;
    // The new user namespace is owned by whoever creates it: the sandbox's own host
    // uid, not host root, so what the kernel charges to a namespace's owner (inotify
    // instances, user namespaces, …) is the sandbox's alone. The real and saved ids
    // stay 0, so host root's privileges come back for the id maps right after.
    // (A fork child's namespaces are owned by its parent's root, the same host uid.)
    let owner = shifted_owner(&cfg).filter(|_| cfg.fork_of.is_none());
    if let Some(h) = owner {
        nix::unistd::setresgid(
            Gid::from_raw(u32::MAX),
            Gid::from_raw(h),
            Gid::from_raw(u32::MAX),
        )
        .map_err(|e| format!("become the sandbox's group: {e}"))?;
        nix::unistd::setresuid(
            Uid::from_raw(u32::MAX),
            Uid::from_raw(h),
            Uid::from_raw(u32::MAX),
        )
        .map_err(|e| format!("become the sandbox's user: {e}"))?;
    }
    // SAFETY: this process is single-threaded (no runtime started yet), so a raw clone
    // without a new stack behaves like fork(2): the child continues on a copy of our stack.
    // With CLONE_PIDFD the kernel stores a pidfd through the parent_tid pointer.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            &mut pidfd as *mut libc::c_int,
            0usize,
            0usize,
        )
    };
    let clone_err = std::io::Error::last_os_error();
    if pid != 0 && owner.is_some() {
        nix::unistd::setresuid(
            Uid::from_raw(u32::MAX),
            Uid::from_raw(0),
            Uid::from_raw(u32::MAX),
        )
        .map_err(|e| format!("back to host root: {e}"))?;
        nix::unistd::setresgid(
            Gid::from_raw(u32::MAX),
            Gid::from_raw(0),
            Gid::from_raw(u32::MAX),
        )
        .map_err(|e| format!("back to host root's group: {e}"))?;
    }
    if pid < 0 {
        return Err(format!("clone: {clone_err}"));
    }
    if pid == 0 {
        drop(go_w);
        drop(st_r);
        let code = match sandbox_side(&cfg, trees.as_ref(), &mut go_r) {
            Ok(adopt) => {
                drop(go_r);
                drop(st_w);
                // Never returns while the sandbox lives.
                let listener = unsafe_listener();
                crate::server::run(
                    listener,
                    crate::server::Options {
                        env: cfg.env.clone(),
                        adopt,
                        orphan_grace: cfg.orphan_grace_s.map(std::time::Duration::from_secs),
                    },
                )
            }
            Err(e) => {
                let _ = st_w.write_all(e.as_bytes());
                ExitCode::FAILURE
            }
        };
        std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
    }
    // `pid` is as our PID namespace sees it (a fork child's jail-init lives in the
    // parent sandbox's); /proc here is the host's, so use the host's number for it.
    let pid = pid as i32;
    drop(go_r);
    drop(st_w);
    let host_pid = host_pid_of(pidfd);
    let host = host_pid.and_then(|h| host_side(&cfg, h, &mut go_w).map(|()| h));
    drop(go_w);
    let host_pid = match host {
        Ok(h) => h,
        Err(e) => {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            return Err(e);
        }
    };
    let mut status = String::new();
    let _ = st_r.read_to_string(&mut status);
    if !status.is_empty() {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        return Err(status);
    }
    Ok(host_pid)
}

/// The host's pid of the process behind `pidfd`, from its fdinfo in the host's /proc.
fn host_pid_of(pidfd: libc::c_int) -> Result<i32, String> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{pidfd}"))
        .map_err(|e| format!("read pidfd info: {e}"))?;
    // SAFETY: the pidfd is ours and used for nothing else.
    unsafe { libc::close(pidfd) };
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no Pid in pidfd info".to_owned())
}

/// Second stage of a fork child: `input` on stdin, then exec the nested image.
fn exec_nested(input: &str) -> String {
    let (r, mut w) = match pipe() {
        Ok(p) => p,
        Err(e) => return e,
    };
    if let Err(e) = w.write_all(input.as_bytes()) {
        return format!("pass config: {e}");
    }
    drop(w);
    // SAFETY: dup2/fcntl on fds we own; execveat with NUL-terminated static strings.
    unsafe {
        if libc::dup2(r.as_raw_fd(), 0) < 0 {
            return format!("dup2: {}", std::io::Error::last_os_error());
        }
        libc::fcntl(NESTED_IMAGE_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        let argv = [
            c"forkbox-agent".as_ptr(),
            c"jail-init-nested".as_ptr(),
            std::ptr::null(),
        ];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        libc::syscall(
            libc::SYS_execveat,
            NESTED_IMAGE_FD,
            c"".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
    format!("execveat: {}", std::io::Error::last_os_error())
}

fn unsafe_listener() -> OwnedFd {
    // SAFETY: the host passes the sandbox's listening socket as fd 3 and nothing else
    // in this process owns it.
    unsafe { OwnedFd::from_raw_fd(LISTEN_FD) }
}

/// Fork child, before the clone: join the child's cgroups (inherited by the clone).
fn join_cgroups(cgroup_procs: &[String]) -> Result<(), String> {
    let me = std::process::id().to_string();
    for procs in cgroup_procs {
        std::fs::write(procs, &me).map_err(|e| format!("join cgroup {procs}: {e}"))?;
    }
    Ok(())
}

/// Where a fork child's root filesystem is attached in the helpers' mount namespace.
const NESTED_ROOT: &str = "/sandbox";

/// Fork child, as host root before entering the parent: a private mount namespace
/// whose root is a small tmpfs holding only what the second stage and the child need —
/// the host's `/proc` (for the id maps, by host pid), the device nodes a sandbox's
/// `/dev` gets, the host's transparent-huge-page settings, and an empty
/// [`NESTED_ROOT`] to attach the child's idmapped root on. Its mounts are all that
/// `/proc/<pid>/mountinfo` of the helpers shows.
fn hide_host() -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    use std::path::Path;
    let m =
        |src: Option<&str>, target: &Path, fs: Option<&str>, flags: MsFlags, data: Option<&str>| {
            mount(src, target, fs, flags, data)
                .map_err(|e| format!("helper mount {}: {e}", target.display()))
        };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare mount namespace: {e}"))?;
    forkbox_sys::mounts::make_private().map_err(|e| e.to_string())?;
    // Any directory of the host serves as the mount point: this namespace is private.
    let new = Path::new("/tmp");
    m(
        Some("forkbox-helper"),
        new,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755,size=64k"),
    )?;
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|e| format!("helper dir {}: {e}", p.display()))
    };
    for d in ["proc", "dev", NESTED_ROOT.trim_start_matches('/')] {
        mkdir(&new.join(d))?;
    }
    m(
        Some("proc"),
        &new.join("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    let bind_file = |from: &Path, to: &Path| -> Result<(), String> {
        std::fs::File::create(to).map_err(|e| format!("helper file {}: {e}", to.display()))?;
        m(
            Some(&from.to_string_lossy()),
            to,
            None,
            MsFlags::MS_BIND,
            None,
        )
    };
    for d in forkbox_sys::mounts::DEVICES {
        bind_file(&Path::new("/dev").join(d), &new.join("dev").join(d))?;
    }
    let thp = Path::new("/sys/kernel/mm/transparent_hugepage");
    for f in ["enabled", "hpage_pmd_size"] {
        if thp.join(f).exists() {
            let dir = new.join(thp.strip_prefix("/").unwrap_or(thp));
            mkdir(&dir)?;
            bind_file(&thp.join(f), &dir.join(f))?;
        }
    }
    nix::unistd::chdir(new).map_err(|e| format!("enter helper root: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot into helper root: {e}"))?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| format!("detach the host's tree: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("enter helper root: {e}"))
}

/// Where a fork child's jail-init finds its family's helper mount namespace.
const HELPER_NS_FD: i32 = 63;

/// `jail-helper`: makes a fork family's helper mount namespace ([`hide_host`]), says
/// `ready` on stdout and waits for stdin to close. The server keeps the namespace (an
/// fd on `/proc/<pid>/ns/mnt`) and passes it to each child's jail-init, which enters
/// it instead of making and dropping one of its own: both wait for an RCU grace
/// period, and a fork's children queue on them.
pub fn helper() -> ExitCode {
    let mut out = std::io::stdout();
    match hide_host() {
        Ok(()) => {
            let _ = writeln!(out, "ready");
            let _ = out.flush();
            let mut b = [0u8; 1];
            let _ = std::io::stdin().read(&mut b);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(out, "{e}");
            ExitCode::FAILURE
        }
    }
}

/// Fork child, as host root: enters the family's helper mount namespace (on
/// [`HELPER_NS_FD`]), the same view [`hide_host`] makes.
fn enter_helper_ns() -> Result<(), String> {
    // SAFETY: the server put the namespace on this fd for us and nothing else owns it.
    let ns = unsafe { OwnedFd::from_raw_fd(HELPER_NS_FD) };
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("enter the helper mount namespace: {e}"))?;
    drop(ns);
    nix::unistd::chdir("/").map_err(|e| format!("enter helper root: {e}"))
}

/// Fork child, after [`hide_host`]: the parent sandbox's user namespace as its uid 0,
/// then its PID namespace (for children) and its network namespace (so what the
/// helpers' `/proc/<pid>/net` shows is the parent's own).
fn enter_parent(parent: i32) -> Result<(), String> {
    let open = |ns: &str| {
        File::open(format!("/proc/{parent}/ns/{ns}"))
            .map_err(|e| format!("open parent's {ns} namespace: {e}"))
    };
    let (user, pidns, net) = (open("user")?, open("pid")?, open("net")?);
    nix::sched::setns(&user, nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("enter parent's user namespace: {e}"))?;
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(|e| format!("setresgid in parent: {e}"))?;
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups in parent: {e}"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(|e| format!("setresuid in parent: {e}"))?;
    nix::sched::setns(&net, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("enter parent's network namespace: {e}"))?;
    nix::sched::setns(&pidns, nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|e| format!("enter parent's PID namespace: {e}"))
}

/// Steps 2-3: id maps and cgroups, then let the child go.
fn host_side(cfg: &JailInit, pid: i32, go: &mut File) -> Result<(), String> {
    let map = match cfg.fork_of {
        // Relative to the parent's user namespace, whose 0..RANGE are already ours.
        Some(_) => format!("0 0 {}\n", forkbox_sys::uidshift::RANGE),
        None => format!(
            "0 {} {}\n",
            cfg.host_uid.unwrap_or(cfg.uid_base),
            forkbox_sys::uidshift::RANGE
        ),
    };
    for f in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{f}"), &map).map_err(|e| format!("write {f}: {e}"))?;
    }
    if cfg.fork_of.is_none() {
        for procs in &cfg.cgroup_procs {
            std::fs::write(procs, pid.to_string())
                .map_err(|e| format!("join cgroup {procs}: {e}"))?;
        }
    }
    go.write_all(b"g")
        .map_err(|e| format!("signal sandbox: {e}"))
}

/// Steps 4-7, inside the new namespaces. Returns the adopt listener of a fork child.
fn sandbox_side(
    cfg: &JailInit,
    trees: Option<&Trees>,
    go: &mut File,
) -> Result<Option<crate::server::Adopt>, String> {
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
    // A session and process group of its own: whatever signals the server's group (a
    // terminal's Ctrl-C, `timeout`, a supervisor) leaves the sandbox alone.
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| format!("unshare cgroup namespace: {e}"))?;
    nix::unistd::sethostname(&cfg.id).map_err(|e| format!("sethostname: {e}"))?;
    let binds: Vec<forkbox_sys::mounts::Bind<'_>> = cfg
        .binds
        .iter()
        .enumerate()
        .map(|(i, b)| forkbox_sys::mounts::Bind {
            source: std::path::Path::new(b.source.as_str()),
            target: std::path::Path::new(b.target.as_str()),
            tree: trees.and_then(|t| t.binds.get(i)).map(|f| f.as_fd()),
            read_only: b.read_only,
        })
        .collect();
    // A fork child is born in the helpers' mount namespace, where its root filesystem
    // has no host path (see `hide_host`).
    let root = if cfg.fork_of.is_some() {
        NESTED_ROOT
    } else {
        cfg.rootfs.as_str()
    };
    forkbox_sys::mounts::enter_rootfs(
        std::path::Path::new(root),
        trees.map(|t| t.root.as_fd()),
        &binds,
        cfg.tmp_size,
    )
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
    let Some(token) = cfg.adopt_token.clone() else {
        return Ok(None);
    };
    use std::os::linux::net::SocketAddrExt as _;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(crate::server::ADOPT_SOCKET)
        .map_err(|e| format!("adopt socket address: {e}"))?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)
        .map_err(|e| format!("bind adopt socket: {e}"))?;
    Ok(Some(crate::server::Adopt { listener, token }))
}

/// Where a fork child's second stage finds the idmapped trees: the root filesystem's
/// at `TREE_FD`, then one per bind mount in order.
const TREE_FD: i32 = 5;

/// The idmapped mounts a sandbox is built from (see `forkbox_sys::idmap`).
struct Trees {
    root: OwnedFd,
    binds: Vec<OwnedFd>,
}

impl Trees {
    /// Puts the trees on `TREE_FD..` without close-on-exec, for the second stage.
    fn pin_for_exec(&self) -> Result<(), String> {
        let err = || format!("pass idmapped mount: {}", std::io::Error::last_os_error());
        // Copies above every target number first: a tree may itself sit on one of them
        // (then a dup2 onto it would lose it, and a later tree take its place).
        let mut high = Vec::new();
        for fd in std::iter::once(&self.root).chain(&self.binds) {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) of an fd we own.
            let h = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
            if h < 0 {
                return Err(err());
            }
            high.push(h);
        }
        for (i, h) in high.into_iter().enumerate() {
            // SAFETY: dup2 of our copy onto a number nothing else here needs (0-4 are
            // stdio, the listener and the nested image); dup2 clears close-on-exec.
            // Then the copy is closed.
            let r = unsafe { libc::dup2(h, TREE_FD + i as i32) };
            // SAFETY: closing our own copy, used for nothing else.
            unsafe { libc::close(h) };
            if r < 0 {
                return Err(err());
            }
        }
        Ok(())
    }
}

/// The host uid the sandbox runs as, when it differs from the canonical range.
fn shifted_owner(cfg: &JailInit) -> Option<u32> {
    cfg.host_uid.filter(|h| *h != cfg.uid_base)
}

/// Whether the root and volumes come as detached trees (idmapped, or an overlay).
fn has_trees(cfg: &JailInit) -> bool {
    shifted_owner(cfg).is_some() || !cfg.lowers.is_empty()
}

/// Makes the detached trees the sandbox is built from (host root, host namespaces):
/// the root — an overlay of the sandbox's `upper` over its `lowers`, or its root
/// filesystem itself — and the bind sources, idmapped when the sandbox runs as a range
/// of its own; `None` for a plain root run as the canonical range.
fn idmapped_trees(cfg: &JailInit) -> Result<Option<Trees>, String> {
    if !has_trees(cfg) {
        return Ok(None);
    }
    // The overlay's layers are mapped keeping host root too (the identity of the
    // overlay's own operations, which no sandbox process has); a plain root and the
    // volumes without it. Each map costs a process, so only the ones needed.
    let shift = |keep_root: bool| {
        shifted_owner(cfg)
            .map(|host| {
                forkbox_sys::idmap::shift_userns(
                    cfg.uid_base,
                    host,
                    forkbox_sys::uidshift::RANGE,
                    keep_root,
                )
                .map_err(|e| e.to_string())
            })
            .transpose()
    };
    let ns = if cfg.lowers.is_empty() || !cfg.binds.is_empty() {
        shift(false)?
    } else {
        None
    };
    let root = if cfg.lowers.is_empty() {
        detached_tree(&cfg.rootfs, ns.as_ref())?
    } else {
        overlay_root(cfg, shift(true)?.as_ref())?
    };
    // Volumes need no tree of their own unless shifted.
    let binds = match &ns {
        Some(ns) => cfg
            .binds
            .iter()
            .map(|b| detached_tree(&b.source, Some(ns)))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    Ok(Some(Trees { root, binds }))
}

/// A detached copy of the tree at `p`, idmapped through `ns` when given.
fn detached_tree(p: &str, ns: Option<&OwnedFd>) -> Result<OwnedFd, String> {
    forkbox_sys::idmap::detached_tree(std::path::Path::new(p), ns).map_err(|e| e.to_string())
}

/// The overlay root of a layered sandbox: `rootfs/upper` (with `rootfs/work`) over
/// `lowers`. Every layer is a directory of one detached copy of the pool (idmapped
/// through `ns`): closing a detached mount waits for an RCU grace period, so one per
/// sandbox rather than one per layer (a fork's children would queue on them).
fn overlay_root(cfg: &JailInit, ns: Option<&OwnedFd>) -> Result<OwnedFd, String> {
    use forkbox_sys::overlay;
    use std::path::Path;
    if cfg.lowers.len() > overlay::MAX_LOWERS {
        return Err(format!(
            "{} layers under the root filesystem; at most {}",
            cfg.lowers.len(),
            overlay::MAX_LOWERS
        ));
    }
    let pool = cfg
        .pool
        .as_deref()
        .ok_or("a layered root filesystem needs its pool")?;
    let tree = detached_tree(pool, ns)?;
    // Beneath the pool's copy, never through a symlink.
    let dir = |p: &Path| -> Result<OwnedFd, String> {
        let rel = p
            .strip_prefix(pool)
            .map_err(|_| format!("layer {} is not in the pool {pool}", p.display()))?;
        forkbox_sys::mounts::dir_beneath(&tree, rel, p, false)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("layer {} is missing", p.display()))
    };
    let lowers = cfg
        .lowers
        .iter()
        .map(|l| dir(Path::new(l)))
        .collect::<Result<Vec<_>, _>>()?;
    let root = Path::new(&cfg.rootfs);
    let (upper, work) = (dir(&root.join("upper"))?, dir(&root.join("work"))?);
    let fds: Vec<_> = lowers.iter().map(|l| l.as_fd()).collect();
    overlay::overlay_tree(&fds, upper.as_fd(), work.as_fd()).map_err(|e| e.to_string())
}

/// The second stage's view of the trees its first stage pinned.
fn inherited_trees(cfg: &JailInit) -> Option<Trees> {
    if !has_trees(cfg) {
        return None;
    }
    // SAFETY: the first stage put exactly these fds in place for us before exec.
    let own = |fd: i32| unsafe { OwnedFd::from_raw_fd(fd) };
    let shifted_binds = if shifted_owner(cfg).is_some() {
        cfg.binds.len()
    } else {
        0
    };
    let trees = Trees {
        root: own(TREE_FD),
        binds: (0..shifted_binds)
            .map(|i| own(TREE_FD + 1 + i as i32))
            .collect(),
    };
    for fd in std::iter::once(&trees.root).chain(&trees.binds) {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Some(trees)
}
