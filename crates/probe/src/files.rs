//! Kernel files and device nodes: /proc/sys, sysrq, /sys, kcore, kallsyms, disks, kvm.

use crate::util::{self, ename, in_child, Iso, Outcome};
use crate::Ctx;
use std::io::Write;
use std::os::fd::AsRawFd;

pub fn proc_sys_write(_: &Ctx) -> Outcome {
    in_child("/proc/sys", Iso::Private, || {
        let mut notes = Vec::new();
        let mut escaped = false;
        // The hostname: written back unchanged (on the host, in a private UTS namespace).
        let h = "/proc/sys/kernel/hostname";
        match util::read(h) {
            Ok(old) => match std::fs::OpenOptions::new().write(true).open(h) {
                Ok(mut f) => match f.write_all(old.trim().as_bytes()) {
                    Ok(()) => {
                        escaped = true;
                        notes.push(format!("{h}: rewritten"));
                    }
                    Err(e) => notes.push(format!("{h}: write {e}")),
                },
                Err(e) => notes.push(format!("{h}: {}", os(&e))),
            },
            Err(e) => notes.push(format!("{h}: read {}", ename(e))),
        }
        // Host-wide knobs: opened for writing only, never written.
        for p in [
            "/proc/sys/kernel/core_pattern",
            "/proc/sys/kernel/modprobe",
            "/proc/sys/vm/drop_caches",
            "/proc/sys/fs/binfmt_misc/register",
        ] {
            match util::open(p, libc::O_WRONLY) {
                Ok(_) => {
                    escaped = true;
                    notes.push(format!("{p}: open for writing ok"));
                }
                Err(e) => notes.push(format!("{p}: {}", ename(e))),
            }
        }
        Outcome::from(escaped, notes.join(", "))
    })
}

fn os(e: &std::io::Error) -> String {
    e.raw_os_error().map(ename).unwrap_or_else(|| e.to_string())
}

/// Opens each path for writing (never writes); escaped if any opens.
fn open_for_write(paths: &[&str]) -> (bool, Vec<String>) {
    let mut notes = Vec::new();
    let mut escaped = false;
    for p in paths {
        match util::open(p, libc::O_WRONLY) {
            Ok(_) => {
                escaped = true;
                notes.push(format!("{p}: open for writing ok"));
            }
            Err(e) => notes.push(format!("{p}: {}", ename(e))),
        }
    }
    (escaped, notes)
}

pub fn sysrq_trigger(_: &Ctx) -> Outcome {
    let (e, n) = open_for_write(&["/proc/sysrq-trigger"]);
    Outcome::from(e, format!("{} (never written)", n.join(", ")))
}

pub fn sys_write(_: &Ctx) -> Outcome {
    let (mut e, mut n) = open_for_write(&[
        "/sys/kernel/mm/transparent_hugepage/enabled",
        "/sys/kernel/uevent_helper",
        "/sys/power/state",
        "/sys/fs/cgroup/cgroup.procs",
    ]);
    if !util::host() {
        match std::fs::create_dir("/sys/forkbox-probe") {
            Ok(()) => {
                let _ = std::fs::remove_dir("/sys/forkbox-probe");
                e = true;
                n.push("mkdir /sys/forkbox-probe ok".into());
            }
            Err(err) => n.push(format!("mkdir /sys/forkbox-probe: {}", os(&err))),
        }
    }
    Outcome::from(e, n.join(", "))
}

pub fn proc_kcore(_: &Ctx) -> Outcome {
    match util::open("/proc/kcore", libc::O_RDONLY) {
        Ok(fd) => {
            let mut b = [0u8; 64];
            // SAFETY: read into our own buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
            Outcome::from(n > 0, format!("/proc/kcore opened; read gave {n}"))
        }
        Err(e) => Outcome::blocked(format!("/proc/kcore: {}", ename(e))),
    }
}

pub fn kallsyms(_: &Ctx) -> Outcome {
    match util::read("/proc/kallsyms") {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().take(1000).collect();
            let nonzero = lines
                .iter()
                .filter(|l| {
                    l.split_whitespace()
                        .next()
                        .is_some_and(|a| a.chars().any(|c| c != '0'))
                })
                .count();
            Outcome::from(
                nonzero > 0,
                format!(
                    "{nonzero} of the first {} symbols have a real address",
                    lines.len()
                ),
            )
        }
        Err(e) => Outcome::blocked(format!("/proc/kallsyms: {}", ename(e))),
    }
}

pub fn dev_kvm(_: &Ctx) -> Outcome {
    match util::open("/dev/kvm", libc::O_RDWR) {
        Ok(_) => Outcome::escaped("/dev/kvm opened"),
        Err(e) => Outcome::blocked(format!("/dev/kvm: {}", ename(e))),
    }
}

const DISKS: [&str; 14] = [
    "/dev/sda",
    "/dev/sdb",
    "/dev/vda",
    "/dev/vdb",
    "/dev/xvda",
    "/dev/nvme0n1",
    "/dev/hda",
    "/dev/loop0",
    "/dev/loop1",
    "/dev/dm-0",
    "/dev/md0",
    "/dev/mem",
    "/dev/kmem",
    "/dev/port",
];

pub fn dev_disk(_: &Ctx) -> Outcome {
    let mut paths: Vec<String> = DISKS.iter().map(|s| s.to_string()).collect();
    if !util::host() {
        // Any block device that made it into our /dev.
        if let Ok(d) = std::fs::read_dir("/dev") {
            use std::os::unix::fs::FileTypeExt;
            for e in d.filter_map(|e| e.ok()) {
                if e.file_type().is_ok_and(|t| t.is_block_device()) {
                    paths.push(e.path().display().to_string());
                }
            }
        }
    }
    let mut notes = Vec::new();
    let mut missing = 0;
    let mut escaped = false;
    for p in &paths {
        match util::open(p, libc::O_RDONLY | libc::O_NONBLOCK) {
            Ok(_) => {
                escaped = true;
                notes.push(format!("{p}: opened"));
            }
            Err(e) if e == libc::ENOENT => missing += 1,
            Err(e) => notes.push(format!("{p}: {}", ename(e))),
        }
    }
    notes.push(format!("{missing} of {} absent", paths.len()));
    Outcome::from(escaped, notes.join(", "))
}

pub fn dev_other(_: &Ctx) -> Outcome {
    let mut notes = Vec::new();
    let mut missing = 0;
    let mut escaped = false;
    let paths = [
        "/dev/loop-control",
        "/dev/mapper/control",
        "/dev/net/tun",
        "/dev/fuse",
        "/dev/vsock",
        "/dev/vhost-net",
        "/dev/vhost-vsock",
        "/dev/uinput",
        "/dev/btrfs-control",
        "/dev/console",
        "/dev/tty0",
        "/dev/ttyS0",
    ];
    for p in paths {
        match util::open(p, libc::O_RDWR | libc::O_NONBLOCK | libc::O_NOCTTY) {
            Ok(_) => {
                escaped = true;
                notes.push(format!("{p}: opened"));
            }
            Err(e) if e == libc::ENOENT => missing += 1,
            Err(e) => notes.push(format!("{p}: {}", ename(e))),
        }
    }
    notes.push(format!("{missing} of {} absent", paths.len()));
    Outcome::from(escaped, notes.join(", "))
}
