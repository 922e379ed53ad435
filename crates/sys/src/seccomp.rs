//! Seccomp allow-list for user code running inside a sandbox.
//!
//! The policy itself is data, `policy/seccomp.json` in seccompiler's JSON format, compiled into
//! the binary. It holds these filters:
//!
//! * `user`: an allow-list in the spirit of Docker's default profile. Anything not listed fails
//!   with `EPERM`. `clone` is only allowed without namespace flags, `ioctl` without `TIOCSTI` and
//!   `TIOCLINUX`, `socket` only for `AF_UNIX`, `AF_INET`/`AF_INET6` (not SCTP or MPTCP) and
//!   `AF_NETLINK` (route and sock_diag only), `personality` only with the values Docker allows.
//! * `deny`: what the allow-list cannot express (it has no "masked not equal"): `ioctl`s of
//!   btrfs (type `0x94`) fail with `EPERM`.
//! * `carry`: `setns` returns `SECCOMP_RET_TRACE`, i.e. `ENOSYS` unless a tracer lets it
//!   through: only the agent's carry helper does, for a fork copy of the Python kernel
//!   (`nosetns`, added for every other process, makes it `EPERM` there).
//! * `clone3`: makes `clone3` fail with `ENOSYS`, so that libc falls back to `clone(2)`, whose
//!   flags (unlike `clone3`'s, which sit behind a pointer) the `user` filter can inspect.
//! * `qemu`: not for sandboxes but for the vm runtime's QEMUs, under their own `-sandbox`
//!   filter ([`compile_qemu`]): a deny-list (`EPERM`) of what QEMU never needs — `ptrace`,
//!   `process_vm_*`, `bpf`, `perf_event_open`, keys, `userfaultfd`, modules, kexec, the mount
//!   API, `setns`, handles, and user namespaces (`unshare`/`clone` with `CLONE_NEWUSER`).
//!
//! Compile once with [`compile`] before forking, then [`install`] in the child (typically from a
//! `pre_exec` hook) right before `execve`.

pub use seccompiler::BpfProgram;
use seccompiler::TargetArch;

/// The seccomp policy, in seccompiler's JSON format.
pub const POLICY_JSON: &str = include_str!("../policy/seccomp.json");

/// Name of the allow-list filter in [`POLICY_JSON`].
const USER: &str = "user";
/// Name of the filter that turns `clone3` into `ENOSYS` in [`POLICY_JSON`].
const CLONE3: &str = "clone3";
/// Name of the deny-list filter in [`POLICY_JSON`].
const DENY: &str = "deny";
/// Name of the filter that denies `setns` in [`POLICY_JSON`].
const NOSETNS: &str = "nosetns";
/// Name of the filter that holds `setns` for a tracer in [`POLICY_JSON`].
const CARRY: &str = "carry";
/// Name of the vm runtime's QEMU deny-list in [`POLICY_JSON`].
const QEMU: &str = "qemu";

/// The compiled filters, in the order they must be installed.
#[derive(Debug, Clone)]
pub struct Filters {
    /// The allow-list; everything else fails with `EPERM`.
    pub user: BpfProgram,
    /// Denials inside what `user` allows (btrfs ioctls), `EPERM`.
    pub deny: BpfProgram,
    /// `setns` fails with `EPERM`: added for every process but the Python kernel (see
    /// [`install_one`]).
    pub nosetns: BpfProgram,
    /// `setns` returns `SECCOMP_RET_TRACE`: `ENOSYS` unless a tracer with
    /// `PTRACE_O_TRACESECCOMP` lets it through (the agent's carry helper, executing it
    /// in a fork copy of the Python kernel).
    pub carry: BpfProgram,
    /// Makes `clone3` fail with `ENOSYS`. Installed after `user` so that it is evaluated first and
    /// its `ENOSYS` wins over `user`'s `EPERM` (for two `ERRNO` results, the kernel keeps the one
    /// from the most recently installed filter).
    pub clone3: BpfProgram,
}

/// Errors compiling or installing the seccomp policy.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The policy is not valid JSON, names a syscall unknown to the target, or the current
    /// architecture is not supported.
    #[error("compile seccomp policy: {0}")]
    Compile(seccompiler::Error),
    /// The policy lacks one of the filters this module installs.
    #[error("missing filter {0} in seccomp policy")]
    Missing(&'static str),
    /// The kernel refused a filter.
    #[error("install seccomp filter: {0}")]
    Install(seccompiler::Error),
}

/// Compiles [`POLICY_JSON`] for the architecture this binary runs on.
///
/// The policy uses x86_64 syscall names (`open`, `stat`, `fork`, ...): on aarch64, which lacks
/// them, compilation fails with [`SeccompError::Compile`].
pub fn compile() -> Result<Filters, SeccompError> {
    let mut map = compile_policy()?;
    let user = map.remove(USER).ok_or(SeccompError::Missing(USER))?;
    let deny = map.remove(DENY).ok_or(SeccompError::Missing(DENY))?;
    let nosetns = map.remove(NOSETNS).ok_or(SeccompError::Missing(NOSETNS))?;
    let carry = map.remove(CARRY).ok_or(SeccompError::Missing(CARRY))?;
    let clone3 = map.remove(CLONE3).ok_or(SeccompError::Missing(CLONE3))?;
    Ok(Filters {
        user,
        deny,
        nosetns,
        carry,
        clone3,
    })
}

/// Every filter of [`POLICY_JSON`], by name, for the architecture this binary runs on.
fn compile_policy() -> Result<std::collections::HashMap<String, BpfProgram>, SeccompError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SeccompError::Compile(seccompiler::Error::Backend(e)))?;
    seccompiler::compile_from_json(POLICY_JSON.as_bytes(), arch).map_err(SeccompError::Compile)
}

/// The filters a QEMU of the vm runtime starts under, in the order to install them:
/// `qemu` (a deny-list, `EPERM`), then `clone3` (`ENOSYS`, so that `clone`'s flags are
/// seen). A deny-list, not an allow-list: what QEMU calls depends on its accelerator,
/// devices and migrations, and a call an allow-list missed would kill a guest; the
/// calls denied here are ones QEMU has no use for.
pub fn compile_qemu() -> Result<[BpfProgram; 2], SeccompError> {
    let mut map = compile_policy()?;
    let qemu = map.remove(QEMU).ok_or(SeccompError::Missing(QEMU))?;
    let clone3 = map.remove(CLONE3).ok_or(SeccompError::Missing(CLONE3))?;
    Ok([qemu, clone3])
}

/// Installs one more filter on the calling thread (which must have `no_new_privs`).
/// Allocates nothing: safe between `fork` and `execve`.
pub fn install_one(f: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(f).map_err(SeccompError::Install)
}

/// Installs the filters into the calling thread: `user`, `deny`, `carry`, then `clone3`.
///
/// Meant to run in a `pre_exec` hook after `fork`, so it allocates nothing:
/// `seccompiler::apply_filter` only builds a `sock_fprog` on the stack and makes two syscalls.
/// Requires `no_new_privs` to be set already (`apply_filter` sets it again, which is harmless),
/// or `CAP_SYS_ADMIN`.
///
/// Filters only ever add restrictions and cannot be removed: after this returns, even a failure
/// of the second filter leaves the first one in place.
pub fn install(f: &Filters) -> Result<(), SeccompError> {
    seccompiler::apply_filter(&f.user).map_err(SeccompError::Install)?;
    seccompiler::apply_filter(&f.deny).map_err(SeccompError::Install)?;
    seccompiler::apply_filter(&f.carry).map_err(SeccompError::Install)?;
    seccompiler::apply_filter(&f.clone3).map_err(SeccompError::Install)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    /// `TIOCLINUX` is not in every libc crate version for every target, so spell it out.
    const TIOCLINUX: libc::c_ulong = 0x541C;

    /// Child exit-code bits, one per failed expectation.
    const F_UNSHARE: i32 = 1 << 0;
    const F_MOUNT: i32 = 1 << 1;
    const F_CLONE3: i32 = 1 << 2;
    const F_TIOCSTI: i32 = 1 << 3;
    const F_GETPID: i32 = 1 << 4;
    const F_CLONE_NS: i32 = 1 << 5;
    const F_FORK: i32 = 1 << 6;
    /// Grouped: `TIOCLINUX`, socket families and protocols outside the allow-list,
    /// btrfs ioctls, disallowed personality, the high-bits `TIOCSTI` bypass attempt,
    /// `ptrace`.
    const F_MISC_DENY: i32 = 1 << 7;
    /// Grouped: allowed ioctl, `AF_INET`/`AF_INET6`/`AF_UNIX`/netlink route and
    /// sock_diag sockets, personality query.
    const F_MISC_ALLOW: i32 = 1 << 8;
    /// `prctl(PR_SET_NO_NEW_PRIVS)` or [`install`] failed: nothing else was checked.
    const F_SETUP: i32 = 0xff;

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// Whether `clone(2)` with `CLONE_NEWUSER` fails with `EPERM`. With a null stack
    /// it would act like fork, so a child that slipped through leaves at once.
    /// Raw syscalls only (for a forked child of the multi-threaded harness).
    fn clone_newuser_is_eperm() -> bool {
        // SAFETY: a raw clone whose child, if any, `_exit`s at once.
        unsafe {
            let r = crate::idmap::clone_newuser();
            if r == 0 {
                libc::_exit(0);
            }
            r == -1 && errno() == libc::EPERM
        }
    }

    /// Whether `clone3` fails with `ENOSYS`.
    fn clone3_is_enosys() -> bool {
        // SAFETY: clone3 with a null argument creates nothing.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::null::<libc::c_void>(),
                0 as libc::size_t,
            )
        };
        r == -1 && errno() == libc::ENOSYS
    }

    /// Whether a plain fork (glibc: `clone(SIGCHLD)` without namespace flags) works.
    fn fork_works() -> bool {
        // SAFETY: the child `_exit`s at once; the parent waits for it.
        unsafe {
            let child = libc::fork();
            if child == 0 {
                libc::_exit(7);
            }
            let mut status = 0;
            child > 0
                && libc::waitpid(child, &mut status, 0) == child
                && libc::WIFEXITED(status)
                && libc::WEXITSTATUS(status) == 7
        }
    }

    /// `no_new_privs` then the filters, for `pre_exec`.
    fn harden(filters: &Filters) -> std::io::Result<()> {
        // SAFETY: plain prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        install(filters).map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))
    }

    #[test]
    fn policy_compiles() {
        let f = compile().expect("compile policy");
        assert!(!f.user.is_empty());
        assert!(!f.clone3.is_empty());
        assert!(!f.deny.is_empty());
        assert!(!f.nosetns.is_empty());
    }

    /// Runs in the forked child, after the filters are installed; returns the failure bits.
    /// Only raw syscalls: no allocation, no locks.
    fn probe() -> i32 {
        let mut fail = 0;
        // SAFETY: raw syscalls with integer or null arguments; the only ones that
        // could create a process (`clone`, `fork`) are followed by an immediate `_exit` in the new
        // process.
        unsafe {
            if libc::unshare(libc::CLONE_NEWUSER) != -1 || errno() != libc::EPERM {
                fail |= F_UNSHARE;
            }
            if libc::mount(
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
                0,
                std::ptr::null(),
            ) != -1
                || errno() != libc::EPERM
            {
                fail |= F_MOUNT;
            }
            if !clone3_is_enosys() {
                fail |= F_CLONE3;
            }
            let mut c: libc::c_char = 0;
            if libc::ioctl(0, libc::TIOCSTI, &mut c) != -1 || errno() != libc::EPERM {
                fail |= F_TIOCSTI;
            }
            let pid = libc::getpid();
            if pid <= 1 || libc::syscall(libc::SYS_getpid) != libc::c_long::from(pid) {
                fail |= F_GETPID;
            }

            // clone(2) with a namespace flag: denied; a plain fork: allowed.
            if !clone_newuser_is_eperm() {
                fail |= F_CLONE_NS;
            }
            if !fork_works() {
                fail |= F_FORK;
            }

            // Denied odds and ends.
            if libc::ioctl(0, TIOCLINUX, &mut c) != -1 || errno() != libc::EPERM {
                fail |= F_MISC_DENY;
            }
            // The kernel truncates ioctl's cmd to 32 bits: so must the filter.
            let sneaky = libc::syscall(
                libc::SYS_ioctl,
                0 as libc::c_long,
                (0x1_0000_0000 | libc::TIOCSTI) as libc::c_long,
                &mut c as *mut libc::c_char,
            );
            if sneaky != -1 || errno() != libc::EPERM {
                fail |= F_MISC_DENY;
            }
            for (domain, ty, proto) in [
                (libc::AF_PACKET, libc::SOCK_DGRAM, 0),
                (libc::AF_VSOCK, libc::SOCK_DGRAM, 0),
                (libc::AF_ALG, libc::SOCK_SEQPACKET, 0),
                (libc::AF_KEY, libc::SOCK_RAW, 2),
                (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
                (libc::AF_INET6, libc::SOCK_SEQPACKET, libc::IPPROTO_SCTP),
                (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
                (libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_NETFILTER),
                (libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_GENERIC),
                (libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_XFRM),
            ] {
                let fd = libc::socket(domain, ty, proto);
                if fd >= 0 {
                    libc::close(fd);
                }
                if fd != -1 || errno() != libc::EPERM {
                    fail |= F_MISC_DENY;
                }
            }
            // btrfs ioctls (BTRFS_IOC_SUBVOL_CREATE, BTRFS_IOC_SNAP_CREATE_V2), on any fd.
            let mut args = [0u8; 4096];
            for cmd in [0x5000_940e_u32, 0x5000_9417_u32] {
                let r = libc::syscall(
                    libc::SYS_ioctl,
                    0 as libc::c_long,
                    libc::c_long::from(cmd),
                    args.as_mut_ptr(),
                );
                if r != -1 || errno() != libc::EPERM {
                    fail |= F_MISC_DENY;
                }
            }
            if libc::personality(0x0040_0000) != -1 || errno() != libc::EPERM {
                // READ_IMPLIES_EXEC
                fail |= F_MISC_DENY;
            }
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != -1 || errno() != libc::EPERM {
                fail |= F_MISC_DENY;
            }

            // Allowed odds and ends.
            let mut ws: libc::winsize = std::mem::zeroed();
            if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == -1 && errno() == libc::EPERM {
                fail |= F_MISC_ALLOW;
            }
            for (domain, ty, proto) in [
                (libc::AF_INET, libc::SOCK_STREAM, 0),
                (libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDP),
                (libc::AF_UNIX, libc::SOCK_STREAM, 0),
                (libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE),
                (libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_SOCK_DIAG),
            ] {
                let fd = libc::socket(domain, ty, proto);
                if fd < 0 {
                    fail |= F_MISC_ALLOW;
                } else {
                    libc::close(fd);
                }
            }
            if libc::personality(0xffff_ffff) == -1 {
                fail |= F_MISC_ALLOW;
            }
        }
        fail
    }

    /// Without a tracer, `setns` is `ENOSYS` under the base filters (the `carry` gate:
    /// only the agent's helper, tracing a fork copy of the Python kernel, lets it
    /// through) and EPERM once `nosetns` is added (every other process).
    #[test]
    fn setns_needs_the_carry_helper() {
        let filters = compile().expect("compile policy");
        for (extra, want) in [(false, libc::ENOSYS), (true, libc::EPERM)] {
            // SAFETY: as in `denies_and_allows_in_forked_child`: raw syscalls only in
            // the child, which leaves with `_exit`.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                // SAFETY: see above.
                unsafe {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || install(&filters).is_err()
                        || (extra && install_one(&filters.nosetns).is_err())
                    {
                        libc::_exit(200);
                    }
                    let r = libc::setns(-1, 0);
                    libc::_exit(if r == -1 { errno() } else { 201 });
                }
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert_eq!(libc::WEXITSTATUS(status), want, "nosetns added: {extra}");
        }
    }

    /// QEMU's deny-list: what it never needs is `EPERM`, a user namespace too, while
    /// `unshare(1)`'s PID namespace, threads and forks still work.
    #[test]
    fn qemu_is_denied_what_it_never_needs() {
        let filters = compile_qemu().expect("compile policy");
        // SAFETY: as in `denies_and_allows_in_forked_child`: raw syscalls only in the
        // child, which leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: see above.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || filters.iter().any(|f| install_one(f).is_err())
                {
                    libc::_exit(F_SETUP);
                }
                let mut fail = 0;
                let eperm = |r: libc::c_long| r == -1 && errno() == libc::EPERM;
                if !eperm(libc::syscall(
                    libc::SYS_ptrace,
                    libc::PTRACE_TRACEME,
                    0,
                    0,
                    0,
                )) {
                    fail |= 1;
                }
                if !eperm(libc::syscall(libc::SYS_bpf, 0, 0, 0))
                    || !eperm(libc::syscall(libc::SYS_userfaultfd, 0))
                    || !eperm(libc::syscall(libc::SYS_perf_event_open, 0, 0, 0, 0, 0))
                    || !eperm(libc::syscall(libc::SYS_setns, -1, 0))
                {
                    fail |= 2;
                }
                if libc::unshare(libc::CLONE_NEWUSER) != -1 || errno() != libc::EPERM {
                    fail |= 4;
                }
                if !clone_newuser_is_eperm() {
                    fail |= 8;
                }
                if !clone3_is_enosys() {
                    fail |= 16;
                }
                // A PID namespace (root here, as the server is) and a fork in it.
                if libc::geteuid() == 0 && libc::unshare(libc::CLONE_NEWPID) != 0 {
                    fail |= 32;
                }
                if !fork_works() {
                    fail |= 64;
                }
                libc::_exit(fail);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "failure bits");
    }

    #[test]
    fn denies_and_allows_in_forked_child() {
        let filters = compile().expect("compile policy");
        // SAFETY: the test harness is multi-threaded, so the child may only use
        // async-signal-safe operations: `probe` and `install` make raw syscalls and allocate
        // nothing (the filters were compiled before the fork), and the child leaves with
        // `_exit`, never unwinding or returning into the harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: see above; prctl with integer arguments, then `_exit`.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || install(&filters).is_err()
                {
                    libc::_exit(F_SETUP);
                }
                libc::_exit(probe());
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
        assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
        let code = libc::WEXITSTATUS(status);
        assert_ne!(code, F_SETUP, "child could not install the filters");
        let named = [
            (F_UNSHARE, "unshare(CLONE_NEWUSER) was not EPERM"),
            (F_MOUNT, "mount was not EPERM"),
            (F_CLONE3, "clone3 was not ENOSYS"),
            (F_TIOCSTI, "ioctl(TIOCSTI) was not EPERM"),
            (F_GETPID, "getpid failed"),
            (F_CLONE_NS, "clone(CLONE_NEWUSER) was not EPERM"),
            (F_FORK, "fork did not work"),
            (
                F_MISC_DENY,
                "a TIOCLINUX/socket family/btrfs ioctl/personality/ptrace call was not EPERM",
            ),
            (
                F_MISC_ALLOW,
                "an ioctl/socket/personality call that should pass was denied",
            ),
        ];
        let failures: Vec<&str> = named
            .iter()
            .filter(|(bit, _)| code & bit != 0)
            .map(|(_, what)| *what)
            .collect();
        assert!(failures.is_empty(), "{failures:?}");
    }

    /// Runs `program args...` under the filters and returns its trimmed stdout.
    fn run_confined(program: &str, args: &[&str]) -> String {
        let filters = compile().expect("compile policy");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the hook only makes raw syscalls and allocates nothing on success (the filters
        // were compiled before the fork).
        unsafe {
            cmd.pre_exec(move || harden(&filters));
        }
        let out = cmd.output().expect("spawn confined program");
        assert!(
            out.status.success(),
            "{program} failed under seccomp: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn shell_runs_under_filters() {
        assert_eq!(run_confined("/bin/sh", &["-c", "echo ok"]), "ok");
    }

    #[test]
    fn python_runs_under_filters() {
        let script = "import os,subprocess,json,ssl,socket; \
                      print(subprocess.run(['echo','x'],capture_output=True).stdout)";
        assert_eq!(run_confined("python3", &["-c", script]), "b'x\\n'");
    }
}
