//! End-to-end: one host identity per sandbox (issue 20, findings 4 and 5). Every
//! sandbox's processes run as a host uid range of their own (a fork family shares its
//! parent's), its user namespace is owned by that range's root rather than host root,
//! and its files are stored in the canonical range through idmapped mounts. So one
//! sandbox exhausting what the kernel counts per user (fds in flight, pipe pages,
//! inotify instances) hurts no other sandbox, nor the host.

#![allow(clippy::unwrap_used)]

mod common;

use common::{post, py, Server};
use serde_json::json;
use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

const UID_BASE: u32 = 1_000_000;
const RANGE: u32 = 65536;

/// Host pids of sandbox `id`'s processes (from their cgroups).
fn pids_of(id: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|cg| cg.contains(&format!("/forkbox/{id}\n")))
        })
        .collect()
}

/// Every host uid and gid (real, effective, saved, filesystem) sandbox `id`'s
/// processes run as.
fn host_ids(id: &str) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    for pid in pids_of(id) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        for l in status.lines() {
            if let Some(v) = l.strip_prefix("Uid:").or_else(|| l.strip_prefix("Gid:")) {
                ids.extend(v.split_whitespace().map(|x| x.parse::<u32>().unwrap()));
            }
        }
    }
    assert!(!ids.is_empty(), "no processes of {id}");
    ids
}

/// The host uid owning the user namespace of `pid` (`NS_GET_OWNER_UID`).
fn userns_owner(pid: u32) -> u32 {
    let f = std::fs::File::open(format!("/proc/{pid}/ns/user")).unwrap();
    let mut uid: libc::uid_t = u32::MAX;
    // SAFETY: NS_GET_OWNER_UID (_IO(0xb7, 0x4)) writes one uid_t.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), 0xb704, &mut uid as *mut libc::uid_t) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    uid
}

/// The slot (uid range index) all of `ids` fall in.
fn slot_of(id: &str, ids: &BTreeSet<u32>) -> u32 {
    let slots: BTreeSet<u32> = ids.iter().map(|u| (u - UID_BASE) / RANGE).collect();
    assert_eq!(slots.len(), 1, "{id} runs in several ranges: {ids:?}");
    let slot = *slots.iter().next().unwrap();
    assert!(
        ids.iter().all(|u| *u >= UID_BASE + RANGE),
        "{id} runs as the canonical range: {ids:?}"
    );
    slot
}

#[tokio::test]
async fn no_two_sandboxes_share_a_host_uid() {
    let s = Server::start();
    let a = s.create_id().await;
    let b = s.create_id().await;
    for id in [&a, &b] {
        s.sh(id, "sleep 300 >/dev/null 2>&1 & touch /root/mine")
            .await;
        py(&s, id, "x = 1").await;
    }
    let (st, forked) = post(&s, &format!("/v1/sandboxes/{a}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{forked}");
    let c = forked["children"][0].as_str().unwrap().to_owned();
    let (ia, ib, ic) = (host_ids(&a), host_ids(&b), host_ids(&c));
    assert!(ia.is_disjoint(&ib), "{a}: {ia:?}, {b}: {ib:?}");
    let (sa, sb, sc) = (slot_of(&a, &ia), slot_of(&b, &ib), slot_of(&c, &ic));
    assert_ne!(sa, sb);
    // A fork child is family: its namespaces nest in its parent's.
    assert_eq!(sa, sc);
    // The user namespaces are owned by the sandbox's own root, not by host root.
    for (id, slot) in [(&a, sa), (&b, sb)] {
        let agent = *pids_of(id).iter().min().unwrap();
        assert_eq!(userns_owner(agent), UID_BASE + slot * RANGE, "{id}");
    }
    // On disk, files stay in the canonical range (templates, snapshots, forks and
    // wakes need no change); inside, root owns them.
    for id in [&a, &b] {
        let f = s.pool.join("sandboxes").join(id).join("upper/root/mine");
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (UID_BASE, UID_BASE),
            "{}",
            f.display()
        );
        let (out, _, _) = s.sh(id, "stat -c %u:%g /root/mine /etc/passwd").await;
        assert_eq!(out, "0:0\n0:0\n");
    }
    // A second server's sandboxes, after a restart: the ranges are read back and a new
    // sandbox does not get one in use.
    let mut s = s;
    s.kill_and_restart();
    let d = s.create_id().await;
    let sd = slot_of(&d, &host_ids(&d));
    assert!(![sa, sb].contains(&sd), "{d} got a range in use: {sd}");
    let (out, _, code) = py(&s, &c, "print(x)").await;
    assert_eq!((out.as_str(), code), ("1\n", 0));
}

/// What one sandbox parks (fds in flight, pipe pages, inotify instances and watches,
/// processes) is counted against its own host uid, namespace or cgroup: another
/// sandbox's exec, run_code, files/watch, pipes, inotify and fork, and host root's
/// inotify, keep working; keyrings are out of its reach. Before: one shared uid for every sandbox,
/// user namespaces owned by host root.
#[tokio::test]
async fn a_sandbox_exhausting_per_user_counters_hurts_no_other() {
    let s = Server::start();
    let hog = s.create_id().await;
    let other = s.create_id().await;
    let park = r#"
import ctypes, os, resource, socket, array, fcntl, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
libc = ctypes.CDLL(None, use_errno=True)
held, report = [], {}
# inotify instances until refused
n = 0
while True:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    held.append(fd); n += 1
report["inotify"] = n
# pipe pages: 1 MiB pipes until refused
n = 0
while n < 200:
    r, w = os.pipe()
    held += [r, w]
    try:
        fcntl.fcntl(w, 1031, 1 << 20)
        n += 1
    except OSError:
        break
report["big_pipes"] = n
# inotify watches: every instance watching the same directories, until refused
dirs = []
for i in range(1600):
    d = f"/tmp/w{i}"
    os.makedirs(d, exist_ok=True)
    dirs.append(d.encode())
watches = 0
try:
    for fd in held[:report["inotify"]]:
        for d in dirs:
            if libc.inotify_add_watch(fd, d, 0x100) < 0:
                raise OSError(ctypes.get_errno(), "add watch")
            watches += 1
except OSError as e:
    report["watches_refused"] = e.errno
report["watches"] = watches
# keyrings: out of reach (seccomp)
report["add_key"] = libc.syscall(248, b"user", b"k", b"v", 1, -3) if hasattr(libc, "syscall") else None
report["add_key_errno"] = ctypes.get_errno()
# processes, until the sandbox's pids limit refuses more
procs = 0
try:
    while procs < 1000:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        procs += 1
except OSError as e:
    report["fork_refused"] = e.errno
report["procs"] = procs
# fds in flight over unix sockets, never received, until the kernel refuses more
# (past RLIMIT_NOFILE of the sender, counted per host user)
inflight = 0
one = os.open("/dev/null", os.O_RDONLY)
done = False
while not done and inflight < 60000:
    a, b = socket.socketpair()
    held += [a, b]
    a.setblocking(False)
    try:
        while inflight < 60000:
            a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [one] * 250))])
            inflight += 250
    except BlockingIOError:
        continue
    except OSError as e:
        report["refused"] = e.errno
        done = True
report["inflight"] = inflight
open("/tmp/report", "w").write(repr(report))
time.sleep(600)
"#;
    // Written and started through the files API and one exec: once it runs, the hog's
    // own commands fail (its agent is of its uid too), which is its own business.
    common::start_script(&s, &hog, "/tmp/park.py", park).await;
    let report =
        common::wait_for_file(&s, &hog, "/tmp/report", std::time::Duration::from_secs(30)).await;
    let inflight: u64 = report
        .split("'inflight': ")
        .nth(1)
        .and_then(|r| r.trim_end_matches('}').trim().parse().ok())
        .unwrap_or(0);
    eprintln!("the hog parked: {report}");
    assert!(inflight >= 20000, "parked too few: {report}");
    assert!(report.contains("'inotify': 1"), "{report}");
    // Keyrings are out of its reach; processes stop at its pids limit.
    assert!(report.contains("'add_key': -1"), "{report}");
    assert!(report.contains("'fork_refused': 11"), "{report}");
    // The other sandbox: commands (stdio passed to the zygote over a unix socket), the
    // REPL, big pipes, inotify.
    for _ in 0..5 {
        let (out, err, code) = s.sh(&other, "echo fine").await;
        assert_eq!((out.as_str(), code), ("fine\n", 0), "{err}");
    }
    let (out, err, code) = py(
        &s,
        &other,
        "import os, fcntl, ctypes\nr, w = os.pipe()\nprint(fcntl.fcntl(w, 1031, 1 << 20))\nc = ctypes.CDLL(None)\nfd = c.inotify_init1(0)\nprint(fd >= 0 and c.inotify_add_watch(fd, b'/tmp', 0x100) >= 0)\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\nprint('forked')",
    )
    .await;
    assert_eq!(
        (out.as_str(), code),
        ("1048576\nTrue\nforked\n", 0),
        "{err}"
    );
    let resp = reqwest::Client::new()
        .get(s.url(&format!("/v1/sandboxes/{other}/files/watch?path=/tmp")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    drop(resp);
    // Host root's inotify (the hog's namespace used to be owned by host root).
    // SAFETY: inotify_init1 with flags only; the fd is closed right after.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    assert!(fd >= 0, "host inotify: {}", std::io::Error::last_os_error());
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    // A new sandbox works too.
    let fresh = s.create_id().await;
    let (out, _, code) = s.sh(&fresh, "echo new").await;
    assert_eq!((out.as_str(), code), ("new\n", 0));
}
