//! End-to-end regression tests for findings of the outside review (issue 20; the list
//! and the layer that stops each: docs/threat-model.md), each in the situation where it
//! occurred. Cross-tenant ones are in `tenants.rs`.

#![allow(clippy::unwrap_used)]

mod common;

use common::{post, Server};
use serde_json::json;
use std::time::Duration;

/// Finding 6: btrfs ioctls from user code. Creating a subvolume (or a snapshot) of `/`
/// made data that escaped the disk limit and could not be deleted.
#[tokio::test]
async fn user_code_cannot_use_btrfs_ioctls() {
    let s = Server::start();
    let id = s.create_id().await;
    let code = r#"
import fcntl, os, errno
fd = os.open("/", os.O_RDONLY)
for name, cmd in [("SUBVOL_CREATE", 0x5000940e), ("SNAP_CREATE_V2", 0x50009417)]:
    buf = bytearray(4096)
    buf[8:14] = b"escape" if cmd == 0x5000940e else b"\0" * 6
    buf[0x18:0x1e] = b"escape"
    try:
        fcntl.ioctl(fd, cmd, buf)
        print(name, "allowed")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
print(os.path.exists("/escape"))
"#;
    let (out, err, code) = common::py(&s, &id, code).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out, "SUBVOL_CREATE EPERM\nSNAP_CREATE_V2 EPERM\nFalse\n",
        "{err}"
    );
    assert_eq!(s.delete(&id).await, 204);
    assert!(!s.pool.join("sandboxes").join(&id).exists());
}

/// Finding 13: socket families and protocols a sandbox has no use for (SCTP, MPTCP,
/// netfilter and other netlink families, AF_ALG, AF_KEY) are refused; the usual ones
/// work.
#[tokio::test]
async fn unneeded_socket_families_are_refused() {
    let s = Server::start();
    let id = s.create_id().await;
    let code = r#"
import socket, errno
def try_(name, *a):
    try:
        socket.socket(*a).close(); print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
try_("sctp", socket.AF_INET, socket.SOCK_STREAM, 132)
try_("sctp6", socket.AF_INET6, socket.SOCK_SEQPACKET, 132)
try_("mptcp", socket.AF_INET, socket.SOCK_STREAM, 262)
try_("nfnetlink", socket.AF_NETLINK, socket.SOCK_RAW, 12)
try_("genetlink", socket.AF_NETLINK, socket.SOCK_RAW, 16)
try_("alg", 38, socket.SOCK_SEQPACKET, 0)
try_("key", 15, socket.SOCK_RAW, 2)
try_("tcp", socket.AF_INET, socket.SOCK_STREAM, 0)
try_("udp6", socket.AF_INET6, socket.SOCK_DGRAM, 0)
try_("unix", socket.AF_UNIX, socket.SOCK_STREAM, 0)
try_("rtnetlink", socket.AF_NETLINK, socket.SOCK_RAW, 0)
"#;
    let (out, err, code) = common::py(&s, &id, code).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "sctp EPERM\nsctp6 EPERM\nmptcp EPERM\nnfnetlink EPERM\ngenetlink EPERM\nalg EPERM\n\
         key EPERM\ntcp ok\nudp6 ok\nunix ok\nrtnetlink ok\n",
        "{err}"
    );
}

/// Finding 13: IPC sysctls were writable by the sandbox's root, and SysV shared memory
/// outlived its processes (pinning memory until later commands were OOM-killed).
#[tokio::test]
async fn ipc_sysctls_are_read_only_and_shared_memory_dies_with_its_processes() {
    let s = Server::start();
    let id = s.create_id().await;
    let (out, _, code) = s
        .sh(
            &id,
            "cat /proc/sys/kernel/shm_rmid_forced; \
             for k in kernel/shmmax kernel/msgmnb fs/mqueue/msg_max; do \
               echo 1 2>/dev/null > /proc/sys/$k && echo $k written || echo $k refused; done",
        )
        .await;
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "1\nkernel/shmmax refused\nkernel/msgmnb refused\nfs/mqueue/msg_max refused\n"
    );
    // A 64 MiB segment, touched, left behind by a process that exits.
    let shm = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
sid = libc.shmget(0, 64 << 20, 0o1600)
addr = libc.shmat(sid, None, 0)
ctypes.memset(addr, 1, 64 << 20)
print(sid)
"#;
    let (out, err, code) = s
        .sh(
            &id,
            &format!("python3 -c '{shm}'; cat /proc/sysvipc/shm | wc -l"),
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].parse::<i64>().unwrap() >= 0, "{out} {err}");
    // Only the header line: the segment went with its last process.
    assert_eq!(lines[1], "1", "{out}");
}

/// Finding 13: a files GET on a FIFO hung the request (the open blocked for a writer).
#[tokio::test]
async fn reading_a_fifo_or_device_is_refused_at_once() {
    let s = Server::start();
    let id = s.create_id().await;
    s.sh(&id, "mkfifo /root/pipe").await;
    for path in ["/root/pipe", "/dev/zero"] {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            s.http
                .get(s.url(&format!("/v1/sandboxes/{id}/files?path={path}")))
                .send(),
        )
        .await
        .expect("the request hung")
        .unwrap();
        assert_eq!(r.status(), 409, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("not a regular file"),
            "{v}"
        );
    }
    // The sandbox still answers.
    assert_eq!(s.sh(&id, "echo ok").await.0, "ok\n");
}

/// Finding 13: `?access_token=` was written in full to the debug log.
#[tokio::test]
async fn credentials_never_reach_the_log() {
    const KEY: &str = "fbk_log-test-admin-key-0123456789abcdefghijk";
    let (s, log) = Server::start_logged_with(&[
        ("FORKBOX_LOG", "debug".into()),
        ("FORKBOX_AUTH", "true".into()),
        ("FORKBOX_ADMIN_KEY", KEY.into()),
    ]);
    for path in [
        format!("/v1/auth/whoami?access_token={KEY}"),
        format!("/v1/sandboxes?%61ccess_token={KEY}"),
    ] {
        let r = s.http.get(s.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = s
        .http
        .get(s.url("/v1/auth/whoami"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("access_token=REDACTED"), "no request logged");
    assert!(!text.contains(&KEY[4..]), "the key is in the log");
}

/// Finding 12: mount targets followed symlinks of the sandbox's own filesystem before
/// `pivot_root`: `/data -> /tmp` in a snapshot, and a volume at `/data/x` of a sandbox
/// made from it, created `/tmp/x` on the host.
#[tokio::test]
async fn mount_targets_never_follow_the_sandboxs_symlinks() {
    let s = Server::start();
    let a = s.create_id().await;
    let marker = format!("forkbox-escape-{}", std::process::id());
    let (_, _, code) = s
        .sh(&a, "ln -s /tmp /data && ln -s /etc /root/etc-link")
        .await;
    assert_eq!(code, 0);
    let (st, snap) = post(
        &s,
        &format!("/v1/sandboxes/{a}/snapshot"),
        json!({"name": "links"}),
    )
    .await;
    assert_eq!(st, 201, "{snap}");
    let (st, vol) = post(&s, "/v1/volumes", json!({"name": "v", "size_mb": 16})).await;
    assert_eq!(st, 201, "{vol}");
    for target in [
        format!("/data/{marker}"),
        format!("/root/etc-link/{marker}"),
    ] {
        let (st, v) = post(
            &s,
            "/v1/sandboxes",
            json!({"snapshot": snap["id"], "volumes": [{"id": vol["id"], "mount": target}]}),
        )
        .await;
        assert_eq!(st, 400, "{target}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("symlink"),
            "{target}: {v}"
        );
    }
    assert!(!std::path::Path::new("/tmp").join(&marker).exists());
    assert!(!std::path::Path::new("/etc").join(&marker).exists());
    // The same volume at a plain path works.
    let (st, v) = post(
        &s,
        "/v1/sandboxes",
        json!({"snapshot": snap["id"], "volumes": [{"id": vol["id"], "mount": "/mnt/v"}]}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
}

/// Finding 3: a fork parent's code opened a live fork child's `/proc/<pid>/ns/user`,
/// called `setns` and held every capability there (nf_tables, veths, raw sockets).
/// Commands have `setns` denied; the Python REPL's fork copies are moved into children
/// by the agent's carry helper (ptrace), and `setns` is ENOSYS for everything else.
#[tokio::test]
async fn a_fork_parents_code_cannot_enter_a_childs_namespaces() {
    let s = Server::start();
    let parent = s.create_id().await;
    common::py(&s, &parent, "x = 1").await;
    let (st, forked) = post(&s, &format!("/v1/sandboxes/{parent}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{forked}");
    let child = forked["children"][0].as_str().unwrap().to_owned();
    s.sh(&child, "sleep 1000 >/dev/null 2>&1 &").await;
    let probe = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
mine = os.readlink("/proc/self/ns/user")
seen = False
for p in sorted(os.listdir("/proc")):
    if not p.isdigit():
        continue
    try:
        ns = os.readlink(f"/proc/{p}/ns/user")
        fd = os.open(f"/proc/{p}/ns/user", os.O_RDONLY)
    except OSError:
        continue
    if ns == mine:
        os.close(fd)
        continue
    seen = True
    r = libc.setns(fd, 0)
    print("entered" if r == 0 else f"refused {ctypes.get_errno()}")
    break
if not seen:
    print("no child namespace visible")
"#;
    let (out, err, code) = s.sh(&parent, &format!("python3 -c '{probe}'")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "refused 1\n", "{err}");
    // The Python REPL, which carries itself into children, cannot either: only the
    // agent's carry helper executes `setns` in its fork copies (ENOSYS otherwise)…
    let (out, err, code) = common::py(&s, &parent, probe).await;
    assert_eq!((out.as_str(), code), ("refused 38\n", 0), "{err}");
    // …not even from a thread of its own or a process it forks while a fork is being
    // carried, and the carried REPL holds nothing in the child.
    let racer = r#"
import ctypes, os, threading, time
libc = ctypes.CDLL(None, use_errno=True)
mine = os.readlink("/proc/self/ns/user")
targets = []
for p in os.listdir("/proc"):
    try:
        if p.isdigit() and os.readlink(f"/proc/{p}/ns/user") != mine:
            targets.append(os.open(f"/proc/{p}/ns/user", os.O_RDONLY))
    except OSError:
        pass
won = []
def race():
    end = time.time() + 4
    while time.time() < end:
        for fd in targets:
            if libc.setns(fd, 0) == 0:
                won.append("thread")
        pid = os.fork()
        if pid == 0:
            os._exit(3 if any(libc.setns(fd, 0) == 0 for fd in targets) else 0)
        if os.waitpid(pid, 0)[1] >> 8 == 3:
            won.append("forked")
racer = threading.Thread(target=race)
racer.start()
"#;
    let (_, err, code) = common::py(&s, &parent, racer).await;
    assert_eq!(code, 0, "{err}");
    let (st, forked) = post(&s, &format!("/v1/sandboxes/{parent}/fork"), json!({"n": 2})).await;
    assert_eq!(st, 200, "{forked}");
    assert_eq!(forked["carried"], json!(["filesystem", "python"]));
    let (out, err, _) = common::py(&s, &parent, "racer.join()\nprint(len(targets) > 0, won)").await;
    assert_eq!(out, "True []\n", "{err}");
    for c in forked["children"].as_array().unwrap() {
        let c = c.as_str().unwrap();
        let caps = "print(sorted({l.split(':')[0]: l.split()[1] for l in open('/proc/self/status') if l.startswith(('Cap', 'NoNewPrivs'))}.items()), os.getresuid())";
        let (out, err, _) = common::py(&s, c, &format!("import os\n{caps}")).await;
        assert_eq!(
            out,
            "[('CapAmb', '0000000000000000'), ('CapBnd', '0000000000000000'), ('CapEff', '0000000000000000'), ('CapInh', '0000000000000000'), ('CapPrm', '0000000000000000'), ('NoNewPrivs', '1')] (0, 0, 0)\n",
            "{c}: {err}"
        );
        // And it cannot gain one by exec (a setuid-root binary, file capabilities).
        let (out, err, _) = common::py(
            &s,
            c,
            "import subprocess\nprint(subprocess.run(['grep', 'CapEff', '/proc/self/status'], capture_output=True, text=True).stdout.split()[1])",
        )
        .await;
        assert_eq!(out, "0000000000000000\n", "{c}: {err}");
        let (out, _, _) = common::py(&s, c, "x").await;
        assert_eq!(out, "1\n", "{c}: the REPL's state was not carried");
    }
}

/// Finding 11: with auth off (the local default) any web page could drive the server:
/// `Host: attacker.example` (DNS rebinding) was answered, and `text/plain` or
/// form-encoded cross-origin POSTs created sandboxes and ran code.
#[tokio::test]
async fn web_pages_cannot_drive_a_local_server() {
    let s = Server::start();
    let count = || async {
        common::get(&s, "/v1/sandboxes?status=all").await.1["sandboxes"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = count().await;
    let post_raw = |path: &str, headers: Vec<(&'static str, &'static str)>, body: &'static str| {
        let mut r = s.http.post(s.url(path)).body(body);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.send()
    };
    let json = ("content-type", "application/json");
    /// Path, headers, body, the status and error code it must get.
    type Case = (
        &'static str,
        Vec<(&'static str, &'static str)>,
        &'static str,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "/v1/sandboxes",
            vec![("host", "attacker.example:7070"), json],
            "{}",
            421,
            "host_not_allowed",
        ),
        (
            "/v1/sandboxes",
            vec![("host", "127.0.0.1.nip.io"), json],
            "{}",
            421,
            "host_not_allowed",
        ),
        (
            "/v1/sandboxes",
            vec![("origin", "https://attacker.example"), json],
            "{}",
            403,
            "origin_not_allowed",
        ),
        (
            "/v1/sandboxes",
            vec![("origin", "null"), ("content-type", "text/plain")],
            "{}",
            403,
            "origin_not_allowed",
        ),
        (
            "/api/v1/execute",
            vec![("content-type", "text/plain;charset=UTF-8")],
            r#"{"language":"python","code":"print(1)"}"#,
            415,
            "unsupported_media_type",
        ),
        (
            "/v1/sandboxes",
            vec![
                ("content-type", "application/x-www-form-urlencoded"),
                ("sec-fetch-site", "cross-site"),
            ],
            "{}",
            415,
            "unsupported_media_type",
        ),
        (
            "/v1/sandboxes",
            vec![("content-type", "multipart/form-data; boundary=x")],
            "{}",
            415,
            "unsupported_media_type",
        ),
    ];
    for (path, headers, body, want, code) in cases {
        let shown = format!("{path} {headers:?}");
        let r = post_raw(path, headers, body).await.unwrap();
        assert_eq!(r.status().as_u16(), want, "{shown}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["code"], code, "{shown}: {v}");
    }
    assert_eq!(count().await, before, "a refused request created a sandbox");
    // What local clients send still works: `curl -d` (form-encoded, no Origin), JSON,
    // and a page on a loopback origin (with CORS headers).
    let r = post_raw(
        "/v1/sandboxes",
        vec![("content-type", "application/x-www-form-urlencoded")],
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = post_raw(
        "/v1/sandboxes",
        vec![("origin", "http://localhost:3000"), json],
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
}

/// Finding 10: during a fork, the helpers that build each child (the second
/// `jail-init` stage and the child before it pivots) appeared in the parent's `/proc`
/// while still in the host's mount and network namespaces: the parent's capless code
/// read host mounts (`mountinfo`) and every sandbox's agent socket path (`net/unix`)
/// from them. Now they are born in a private mount namespace holding nothing of the
/// host's and in the parent's network namespace.
#[tokio::test]
async fn fork_helpers_show_nothing_of_the_host() {
    let s = Server::start();
    let id = s.create_id().await;
    // Another sandbox, so the host has agent sockets to find.
    let _other = s.create_id().await;
    let watcher = r#"
import os, time
base = set(p for p in os.listdir("/proc") if p.isdigit())
seen, found = set(), []
open("/tmp/ready", "w").write("ready")
end = time.time() + 60
while time.time() < end and not os.path.exists("/tmp/stop"):
    for p in os.listdir("/proc"):
        if not p.isdigit() or p in base or p in seen:
            continue
        seen.add(p)
        for f, marks in (("mountinfo", ("/sys/fs/cgroup",)), ("net/unix", ("agent.sock",))):
            try:
                t = open(f"/proc/{p}/{f}").read()
            except OSError:
                continue
            found += [f"{p} {f} {m}" for m in marks if m in t]
open("/tmp/found.tmp", "w").write(repr((len(seen), found)))
os.rename("/tmp/found.tmp", "/tmp/found")
"#;
    common::start_script(&s, &id, "/tmp/w.py", watcher).await;
    assert!(
        !common::wait_for_file(&s, &id, "/tmp/ready", Duration::from_secs(10))
            .await
            .is_empty()
    );
    for _ in 0..8 {
        let (st, forked) = post(&s, &format!("/v1/sandboxes/{id}/fork"), json!({"n": 2})).await;
        assert_eq!(st, 200, "{forked}");
        for c in forked["children"].as_array().unwrap() {
            assert_eq!(s.delete(c.as_str().unwrap()).await, 204);
        }
    }
    s.sh(&id, "touch /tmp/stop").await;
    let report = common::wait_for_file(&s, &id, "/tmp/found", Duration::from_secs(10)).await;
    let (seen, found) = report
        .trim_start_matches('(')
        .split_once(", ")
        .unwrap_or(("0", ""));
    // The watcher saw the forks' processes come and go (helpers, children's agents)…
    assert!(seen.parse::<u32>().unwrap_or(0) >= 16, "{report}");
    // …and nothing of the host in any of them.
    assert_eq!(found, "[])", "{report}");
}
