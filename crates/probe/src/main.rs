//! `forkbox-probe`: escape probes, run inside a sandbox (or, as a control, on the host).
//!
//! ```text
//! forkbox-probe [options] [probe...]     run the named probes (default: every probe
//!                                        of the default set), one JSON line each:
//!                                        {"probe": "...", "escaped": bool, "detail": "..."}
//! forkbox-probe --list | --list-all      names of the default set / of every probe
//! forkbox-probe --describe               one JSON line per probe: name, what, flags
//! ```
//!
//! Every probe attempts its attack for real and says `escaped: true` only if it worked.
//! Probes that could change the machine they run on are written to be harmless even
//! when they succeed (a privileged call with arguments the kernel rejects *after* its
//! permission check, a write of a byte over itself, a mount inside a private mount
//! namespace of a short-lived child ...). `--host` marks a control run on the host:
//! attempts that change namespaced state run in fresh namespaces (and are skipped if
//! that fails), attacks on other processes only target `--pid`, and the probes marked
//! not host-safe are skipped.
//!
//! Options: `--host`, `--pid N` (target process, repeatable), `--port N` (the API
//! server's port, for `host_loopback`), `--abstract NAME` / `--unix PATH` (Unix sockets
//! to try), `--tcp HOST:PORT` (other TCP services to try), `--scratch DIR` (where
//! setuid copies and the disk fill go; default: the probe's directory), `--tmp DIR`
//! (default /tmp), `--mem-cap-mb N` (2048), `--mem-limit-mb N` (the sandbox's limit, if known), `--disk-cap-mb N` (2048), `--fork-cap N`
//! (5000), `--max-pids N` (512), `--flood-mb N` (100), `--exe-wait-ms N` (2000).

mod creds;
mod files;
mod fs;
mod kernel;
mod net;
mod res;
mod util;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use util::Outcome;

/// Inputs of a run.
pub struct Ctx {
    pub pids: Vec<i32>,
    pub port: Option<u16>,
    pub abstract_names: Vec<String>,
    pub unix_paths: Vec<String>,
    pub tcp: Vec<String>,
    pub scratch: PathBuf,
    pub tmp: PathBuf,
    pub mem_cap_mb: u64,
    /// The sandbox's memory limit, if known: allocating past it is an escape.
    pub mem_limit_mb: Option<u64>,
    pub disk_cap_mb: u64,
    pub fork_cap: u32,
    pub max_pids: u32,
    pub flood_mb: u64,
    pub exe_wait_ms: u64,
    /// Fds >= 3 open when the probe started.
    pub inherited: Vec<i32>,
}

/// One probe.
struct Probe {
    name: &'static str,
    /// What it tries (for `--describe` and the docs).
    what: &'static str,
    /// Part of the default set (else only when named).
    default: bool,
    /// May run with `--host` (else skipped there).
    host: bool,
    run: fn(&Ctx) -> Outcome,
}

const fn p(name: &'static str, what: &'static str, run: fn(&Ctx) -> Outcome) -> Probe {
    Probe {
        name,
        what,
        default: true,
        host: true,
        run,
    }
}

/// Not run with `--host`.
const fn guest_only(mut pr: Probe) -> Probe {
    pr.host = false;
    pr
}

/// Only when named.
const fn named_only(mut pr: Probe) -> Probe {
    pr.default = false;
    pr
}

const PROBES: &[Probe] = &[
    // Mounts and roots.
    p("mount", "mount a tmpfs", fs::mount_tmpfs),
    p("fsopen", "new mount API: fsopen(tmpfs), open_tree(/, CLONE)", fs::fsopen),
    p("umount", "detach a mount (to uncover what is under it)", fs::umount2),
    p("pivot_root", "pivot_root(., .) onto a fresh tmpfs", fs::pivot_root),
    p("chroot_escape", "chroot into a subdirectory, chdir(..) out, chroot(.)", fs::chroot_escape),
    p("cgroup_mount", "mount cgroup v1 (release_agent) or cgroup2", fs::cgroup_mount),
    // Namespaces.
    p("unshare_user", "unshare(CLONE_NEWUSER)", kernel::unshare_user),
    p("unshare_mount", "unshare(CLONE_NEWNS)", kernel::unshare_mount),
    p("unshare_other", "unshare net, pid, uts, ipc, cgroup, time namespaces", kernel::unshare_other),
    p("clone_newuser", "clone(CLONE_NEWUSER|CLONE_NEWNS)", kernel::clone_newuser),
    p("clone3_newuser", "clone3(CLONE_NEWUSER|CLONE_NEWNS)", kernel::clone3_newuser),
    p("setns", "setns into every namespace visible in /proc/*/ns that is not ours, and via pidfd", kernel::setns),
    // Other processes.
    p("ptrace", "PTRACE_SEIZE / PTRACE_ATTACH PID 1 and the runtime's processes", kernel::ptrace_attach),
    p("process_vm_readv", "read PID 1's memory with process_vm_readv", kernel::process_vm_readv),
    p("proc_mem", "open /proc/1/mem", kernel::proc_mem),
    p("pidfd_getfd", "steal PID 1's fds with pidfd_getfd", kernel::pidfd_getfd),
    p("pid_visibility", "kill(pid, 0) over every pid: only our own processes answer", kernel::pid_visibility),
    named_only(guest_only(p("kill_all", "kill(-1, SIGKILL): reaches only the sandbox", kernel::kill_all))),
    p("proc_exe_write", "CVE-2019-5736: write the runtime's binary via /proc/<pid>/exe", fs::proc_exe_write),
    p("leaked_fds", "CVE-2024-21626: inherited fds beyond 0-2, directory fds leading outside", fs::leaked_fds),
    p("cwd_outside_root", "CVE-2024-21626: a working directory outside the root", fs::cwd_outside_root),
    p("proc_root_cwd", "/proc/<pid>/root and /cwd of every process lead outside our root", fs::proc_root_cwd),
    p("open_by_handle_at", "open_by_handle_at with a real or forged handle (shocker)", fs::open_by_handle_at),
    // Kernel interfaces.
    p("tiocsti", "TIOCSTI terminal input injection", kernel::tiocsti),
    guest_only(p("init_module", "init_module (load a kernel module)", kernel::init_module)),
    guest_only(p("finit_module", "finit_module (load a kernel module from an fd)", kernel::finit_module)),
    guest_only(p("reboot", "reboot (wrong magic: permission check only)", kernel::reboot)),
    guest_only(p("kexec_load", "kexec_load (invalid segments: permission check only)", kernel::kexec_load)),
    p("bpf", "bpf(BPF_MAP_CREATE)", kernel::bpf),
    p("perf_event_open", "perf_event_open on ourselves and CPU-wide", kernel::perf_event_open),
    p("userfaultfd", "userfaultfd (user-mode only and plain), /dev/userfaultfd", kernel::userfaultfd),
    p("keyctl", "keyctl: read the session keyring", kernel::keyctl),
    p("add_key", "add_key into the process keyring", kernel::add_key),
    p("io_uring", "io_uring_setup", kernel::io_uring_setup),
    guest_only(p("clock_settime", "settimeofday(NULL, NULL) privilege check, clock_settime", kernel::clock_settime)),
    guest_only(p("acct", "acct (missing file: permission check only)", kernel::acct)),
    guest_only(p("swapon", "swapon/swapoff (missing file: permission check only)", kernel::swapon)),
    p("syslog", "syslog(READ_ALL): read the kernel log", kernel::syslog),
    p("dev_kmsg", "open and read /dev/kmsg", kernel::dev_kmsg),
    p("int80", "32-bit int 0x80 syscall (getpid), in a child", kernel::int80),
    p("iopl", "iopl(3), ioperm: raw I/O ports", kernel::iopl),
    p("fanotify_init", "fanotify_init (filesystem-wide monitoring)", kernel::fanotify_init),
    // Kernel files and devices.
    p("proc_sys_write", "write /proc/sys (hostname back unchanged; core_pattern, modprobe, drop_caches, binfmt_misc opened only)", files::proc_sys_write),
    p("sysrq_trigger", "open /proc/sysrq-trigger for writing (never written)", files::sysrq_trigger),
    p("sys_write", "open /sys files for writing (never written), mkdir in /sys", files::sys_write),
    p("proc_kcore", "read /proc/kcore", files::proc_kcore),
    p("kallsyms", "kernel addresses in /proc/kallsyms", files::kallsyms),
    p("mknod", "mknod char (1:3, 1:1) and block (7:0) devices", fs::mknod),
    p("dev_kvm", "open /dev/kvm", files::dev_kvm),
    p("dev_disk", "open disks, loop devices, /dev/mem, /dev/port", files::dev_disk),
    p("dev_other", "open loop-control, tun, fuse, vsock, vhost, console ...", files::dev_other),
    // Network.
    p("unix_sockets", "connect to the host's and other sandboxes' Unix sockets", net::unix_sockets),
    p("af_packet", "AF_PACKET sockets", net::af_packet),
    p("raw_socket", "raw IPv4/IPv6 sockets", net::raw_socket),
    p("af_vsock", "AF_VSOCK sockets (to the hypervisor)", net::af_vsock),
    p("netlink_route", "RTM_NEWADDR on lo over NETLINK_ROUTE", net::netlink_route),
    p("metadata_ip", "TCP to 169.254.169.254:80", net::metadata_ip),
    p("host_loopback", "TCP to the API server's port on 127.0.0.1 and ::1", net::host_loopback),
    p("host_tcp", "TCP to the host services given with --tcp", net::host_tcp),
    // Credentials.
    p("cap_inh_amb", "CapInh/CapAmb non-zero", creds::cap_inh_amb),
    p("cap_eff_bnd", "CapPrm/CapEff/CapBnd non-zero", creds::cap_eff_bnd),
    p("no_new_privs", "NoNewPrivs not set or no seccomp filter", creds::no_new_privs),
    p("setuid_binary", "a setuid-root copy of the probe gains uid 0 or capabilities", creds::setuid_binary),
    // Resources.
    guest_only(p("fork_bomb", "fork until it fails (bounded by the pids limit)", res::fork_bomb)),
    guest_only(p("memory_bomb", "allocate and touch memory until killed (bounded by the memory limit)", res::memory_bomb)),
    guest_only(p("disk_fill", "write a file until ENOSPC/EDQUOT (capped at --disk-cap-mb)", res::disk_fill)),
    named_only(guest_only(p("tmpfs_fill", "write into /tmp (tmpfs, memory) until ENOSPC or killed (capped at --disk-cap-mb)", res::tmpfs_fill))),
    p("fd_exhaustion", "raise RLIMIT_NOFILE, open fds until EMFILE", res::fd_exhaustion),
    named_only(p("stdout_flood", "write 100 MB to stdout as fast as possible", res::stdout_flood)),
];

fn usage(msg: &str) -> ExitCode {
    eprintln!("forkbox-probe: {msg}\nusage: forkbox-probe [--host] [--pid N] [--port N] [--abstract NAME] [--unix PATH] [--tcp HOST:PORT] [--scratch DIR] [--tmp DIR] [--mem-cap-mb N] [--mem-limit-mb N] [--disk-cap-mb N] [--fork-cap N] [--max-pids N] [--flood-mb N] [--exe-wait-ms N] [probe...] | --list | --list-all | --describe");
    ExitCode::from(2)
}

fn num<T: std::str::FromStr>(v: Option<String>, flag: &str) -> Result<T, String> {
    v.and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{flag} needs a number"))
}

fn emit(line: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    // Before anything opens an fd.
    let inherited = fs::inherited_fds();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let mut ctx = Ctx {
        pids: Vec::new(),
        port: None,
        abstract_names: Vec::new(),
        unix_paths: Vec::new(),
        tcp: Vec::new(),
        scratch: exe_dir,
        tmp: PathBuf::from("/tmp"),
        mem_cap_mb: 2048,
        mem_limit_mb: None,
        disk_cap_mb: 2048,
        fork_cap: 5000,
        max_pids: 512,
        flood_mb: 100,
        exe_wait_ms: 2000,
        inherited,
    };
    let mut names: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let r: Result<(), String> = match a.as_str() {
            "--list" | "--list-all" => {
                for pr in PROBES.iter().filter(|pr| pr.default || a == "--list-all") {
                    println!("{}", pr.name);
                }
                return ExitCode::SUCCESS;
            }
            "--describe" => {
                for pr in PROBES {
                    emit(serde_json::json!({
                        "probe": pr.name, "what": pr.what, "default": pr.default, "host": pr.host,
                    }));
                }
                return ExitCode::SUCCESS;
            }
            "--report-creds" => {
                println!("{}", creds::report_creds());
                return ExitCode::SUCCESS;
            }
            "--sleep" => {
                let s: u64 = num(args.next(), "--sleep").unwrap_or(60);
                std::thread::sleep(std::time::Duration::from_secs(s));
                return ExitCode::SUCCESS;
            }
            "--host" => {
                util::set_host(true);
                Ok(())
            }
            "--pid" => num(args.next(), &a).map(|v| ctx.pids.push(v)),
            "--port" => num(args.next(), &a).map(|v| ctx.port = Some(v)),
            "--abstract" => args
                .next()
                .map(|v| ctx.abstract_names.push(v))
                .ok_or_else(|| "--abstract needs a name".into()),
            "--unix" => args
                .next()
                .map(|v| ctx.unix_paths.push(v))
                .ok_or_else(|| "--unix needs a path".into()),
            "--tcp" => args
                .next()
                .map(|v| ctx.tcp.push(v))
                .ok_or_else(|| "--tcp needs HOST:PORT".into()),
            "--scratch" => args
                .next()
                .map(|v| ctx.scratch = PathBuf::from(v))
                .ok_or_else(|| "--scratch needs a directory".into()),
            "--tmp" => args
                .next()
                .map(|v| ctx.tmp = PathBuf::from(v))
                .ok_or_else(|| "--tmp needs a directory".into()),
            "--mem-cap-mb" => num(args.next(), &a).map(|v| ctx.mem_cap_mb = v),
            "--mem-limit-mb" => num(args.next(), &a).map(|v| ctx.mem_limit_mb = Some(v)),
            "--disk-cap-mb" => num(args.next(), &a).map(|v| ctx.disk_cap_mb = v),
            "--fork-cap" => num(args.next(), &a).map(|v| ctx.fork_cap = v),
            "--max-pids" => num(args.next(), &a).map(|v| ctx.max_pids = v),
            "--flood-mb" => num(args.next(), &a).map(|v| ctx.flood_mb = v),
            "--exe-wait-ms" => num(args.next(), &a).map(|v| ctx.exe_wait_ms = v),
            s if s.starts_with("--") => Err(format!("unknown option {s}")),
            _ => {
                names.push(a.clone());
                Ok(())
            }
        };
        if let Err(e) = r {
            return usage(&e);
        }
    }
    let selected: Vec<&Probe> = if names.is_empty() {
        PROBES.iter().filter(|pr| pr.default).collect()
    } else {
        let mut v = Vec::new();
        for n in &names {
            match PROBES.iter().find(|pr| pr.name == n) {
                Some(pr) => v.push(pr),
                None => return usage(&format!("unknown probe {n} (see --list-all)")),
            }
        }
        v
    };
    for pr in selected {
        let o = if util::host() && !pr.host {
            Outcome::skipped("not run on the host")
        } else {
            (pr.run)(&ctx)
        };
        let mut line = serde_json::json!({
            "probe": pr.name,
            "escaped": o.escaped,
            "detail": o.detail,
        });
        if o.skipped {
            line["skipped"] = serde_json::Value::Bool(true);
        }
        emit(line);
    }
    ExitCode::SUCCESS
}
