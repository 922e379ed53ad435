//! End-to-end: the vm runtime (QEMU microvm guests; TCG on these machines) over real
//! HTTP against a real server. Needs qemu-system-x86 and the guest assets (`make
//! vm-assets`), so these are ignored by `make test`; `make test-vm` runs them (the
//! spine itself runs parameterised by runtime in `spine.rs`).

#![allow(clippy::unwrap_used)]

mod common;

use common::{collect, get, post, py, Server};
use serde_json::json;
use std::time::{Duration, Instant};

/// The jail of the QEMU of vm sandbox `id`, read from the host (its pid): a host uid
/// of its own (not root, no capabilities, no_new_privs), its seccomp filter, network,
/// IPC, UTS and mount namespaces of its own, and a root holding nothing but its VM's
/// directory (whose disk is the only file it can write). Returns the pid.
fn assert_qemu_jailed(s: &Server, id: &str) -> i32 {
    let pid: i32 = std::fs::read_to_string(s.data.path().join(format!("vm-run/{id}/qemu.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let uid = field("Uid");
    let uid0: u32 = uid.split(' ').next().unwrap().parse().unwrap();
    assert!(uid0 >= 1 << 30, "QEMU runs as {uid}");
    assert!(uid.split(' ').all(|u| u == uid0.to_string()), "{uid}");
    assert_eq!(field("CapEff"), "0000000000000000", "{status}");
    assert_eq!(field("CapPrm"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs"), "1", "{status}");
    assert_eq!(field("Seccomp"), "2", "{status}");
    // QEMU's own filter over forkbox's two (`seccomp.json` "qemu" and "clone3").
    let filters: u32 = field("Seccomp_filters").parse().unwrap();
    assert!(filters >= 3, "{status}");
    // PID 1 of a PID namespace of its own.
    assert_eq!(field("NSpid").split(' ').next_back(), Some("1"), "{status}");
    for ns in ["net", "ipc", "uts", "mnt", "pid"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns}");
    }
    // Its root: the VM's directory at its host path, nothing else.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let vm_dir = s.data.path().join(format!("vm-run/{id}"));
    let mut walk = root.clone();
    for c in vm_dir.components().skip(1) {
        let entries: Vec<String> = std::fs::read_dir(&walk)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let want = c.as_os_str().to_string_lossy().into_owned();
        assert_eq!(
            entries,
            std::slice::from_ref(&want),
            "{} holds more",
            walk.display()
        );
        walk.push(want);
    }
    assert!(walk.join("qemu.pid").exists(), "{}", walk.display());
    // Another VM's directory, or the run dir's layers, are not there.
    assert!(!root.join("etc/passwd").exists() && !root.join("usr").exists());
    // What it holds writable: its own files, its own RAM file, volumes; a RAM it
    // maps privately (a copy's, shared with other copies) is sealed: a write through
    // its descriptor, as a QEMU taken over by its guest would try, fails.
    let (mut sealed, mut own_ram) = (0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap().path();
        let Ok(target) = std::fs::read_link(&fd) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().unwrap().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap_or(0);
        if target.starts_with("/memfd:forkbox-vm-ram") {
            use std::os::unix::fs::FileExt as _;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&fd)
                .unwrap();
            let mut byte = [0u8; 1];
            f.read_exact_at(&mut byte, 0).unwrap();
            assert!(f.write_all_at(&byte, 0).is_err(), "{target} is writable");
            assert!(f.set_len(0).is_err(), "{target} can shrink");
            sealed += 1;
        } else if target.ends_with(&format!("/forkbox-vm-{id}.ram")) {
            own_ram += 1;
        } else if flags & 3 != 0 && target.starts_with('/') && !target.starts_with("/dev/") {
            assert!(
                // (Seen through its root, which mounts the VM dir at its path.)
                target.contains(&*vm_dir.to_string_lossy()) || target.contains("/volumes/"),
                "QEMU holds {target} writable"
            );
        }
    }
    assert!(
        (sealed > 0) != (own_ram > 0),
        "a copy maps a sealed RAM, others a file of their own ({sealed}, {own_ram})"
    );
    pid
}

/// Starts `sleep 3600` in the background in sandbox `id`.
async fn start_sleeper(s: &Server, id: &str) {
    let (st, bg) = post(
        s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "sleep 3600", "background": true}),
    )
    .await;
    assert_eq!(st, 200, "{bg}");
}

/// Whether a `sleep` runs in sandbox `id` (the one [`start_sleeper`] started, carried).
async fn sleeper_runs(s: &Server, id: &str) -> bool {
    s.sh(id, "pgrep -x sleep >/dev/null && echo running")
        .await
        .0
        == "running\n"
}

async fn create_vm(s: &Server) -> (String, f64) {
    let v = s.create(json!({"runtime": "vm"})).await;
    assert_eq!(v["runtime"], "vm", "{v}");
    (
        v["id"].as_str().unwrap().to_owned(),
        v["boot_ms"].as_f64().unwrap(),
    )
}

/// `GET /logs` of sandbox `id` (it answers 200): the SSE text.
async fn logs(s: &Server, id: &str) -> String {
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/logs")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// Waits up to `secs` for the host's copy of vm `id`'s console (`console.log`) to
/// show `text`.
async fn console_shows(s: &Server, id: &str, text: &str, secs: u64) {
    let path = s.data.path().join(format!("vm-run/{id}/console.log"));
    let mut seen = String::new();
    for _ in 0..secs * 10 {
        seen = std::fs::read_to_string(&path).unwrap_or_default();
        if seen.contains(text) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{text:?} not on the console: {} bytes", seen.len());
}

/// Without `--runtimes`, a server whose vm assets are there serves both runtimes (the
/// jail stays the default); healthz says which and on what accelerator; a vm sandbox
/// runs a kernel that is not the host's.
#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_is_on_by_default_when_its_assets_are_there() {
    let env: Vec<(&str, String)> = common::vm_env()
        .into_iter()
        .filter(|(k, _)| *k != "FORKBOX_RUNTIMES")
        .collect();
    let s = Server::start_with(&env);
    let (st, h) = get(&s, "/v1/healthz").await;
    assert_eq!(st, 200);
    let names: Vec<&str> = h["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["jail", "vm"], "{h}");
    assert!(
        ["kvm", "tcg", "probing"].contains(&h["runtimes"][1]["accelerator"].as_str().unwrap()),
        "{h}"
    );
    assert!(h["runtimes"][0].get("accelerator").is_none(), "{h}");
    // The default runtime is still the jail.
    let jail = s.create(json!({})).await;
    assert_eq!(jail["runtime"], "jail", "{jail}");
    let (id, _) = create_vm(&s).await;
    let host = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    let host = String::from_utf8(host.stdout).unwrap();
    let (guest, _, code) = s.sh(&id, "uname -r").await;
    assert_eq!(code, 0);
    assert_ne!(guest, host, "the guest runs the host's kernel");
    let (_, h) = get(&s, "/v1/healthz").await;
    assert!(
        ["kvm", "tcg"].contains(&h["runtimes"][1]["accelerator"].as_str().unwrap()),
        "{h}"
    );
    // QEMU is confined: jailed (see `assert_qemu_jailed`), and a cgroup with the
    // guest's memory plus QEMU's overhead.
    let pid = assert_qemu_jailed(&s, &id);
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("/forkbox-vm/{id}")), "{cgroup}");
    let limit = [
        "/sys/fs/cgroup/memory/forkbox-vm",
        "/sys/fs/cgroup/forkbox-vm",
    ]
    .iter()
    .find_map(|base| {
        ["memory.limit_in_bytes", "memory.max"]
            .iter()
            .find_map(|f| std::fs::read_to_string(format!("{base}/{id}/{f}")).ok())
    })
    .unwrap();
    assert_eq!(limit.trim().parse::<u64>().unwrap(), (512 + 256) << 20);
    // Its log is the guest's console: the kernel booting (quietly), then the agent.
    let log = logs(&s, &id).await;
    assert!(log.contains("data: [    0."), "{log}");
    assert!(log.contains("ready (pid 1, protocol"), "{log}");
    assert!(
        log.contains("exec pid ") && log.contains(": uname -r\n"),
        "{log}"
    );
    assert!(!log.contains('\r'), "{log:?}");
    // A guest printing without end fills no host disk: QEMU writes no file, the server
    // keeps the console to 1 MiB on disk (and the 1 MiB before it, `console.log.1`),
    // and its newest lines are still served.
    let flood = "yes 'a console flood line, longer than most lines are' | head -c 2500000 \
                 > /dev/console; printf '\\nthe-flood-ended\\n' > /dev/console";
    let (_, err, code) = s.sh(&id, flood).await;
    assert_eq!(code, 0, "{err}");
    let dir = s.data.path().join(format!("vm-run/{id}"));
    console_shows(&s, &id, "the-flood-ended", 60).await;
    for name in ["console.log", "console.log.1"] {
        let len = std::fs::metadata(dir.join(name)).unwrap().len();
        assert!(len <= 1 << 20, "{name}: {len} bytes");
    }
    let log = logs(&s, &id).await;
    assert!(
        log.contains("data: the-flood-ended"),
        "{}",
        &log[log.len().saturating_sub(500)..]
    );
    assert_eq!(s.delete(&id).await, 204);
    // Its group goes with it.
    assert!(!cgroup
        .lines()
        .filter_map(|l| l.split(':').nth(2))
        .filter(|p| p.contains("forkbox-vm"))
        .any(|p| std::path::Path::new(&format!("/sys/fs/cgroup/pids{p}")).exists()));
    assert_eq!(s.delete(jail["id"].as_str().unwrap()).await, 204);
}

#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_files_repl_pause_resume_and_delete() {
    let (s, log) = Server::start_logged_with(&common::vm_env());
    let (id, boot_ms) = create_vm(&s).await;

    // A real guest: its own kernel, the agent is its PID 1.
    let (out, _, code) = s.sh(&id, "uname -r; cat /proc/1/comm; id -u").await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("cloud-amd64"), "{out}");
    assert_eq!(&lines[1..], ["forkbox-agent", "0"], "{out}");

    // exec echo round trips (the first warms the guest's page cache).
    let mut rtts = Vec::new();
    for _ in 0..11 {
        let t = Instant::now();
        let (out, _, code) = s.sh(&id, "echo hi").await;
        rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!((out.as_str(), code), ("hi\n", 0));
    }
    let mut warm = rtts[1..].to_vec();
    warm.sort_by(|a, b| a.total_cmp(b));
    eprintln!(
        "vm figures: boot_ms={boot_ms:.0} exec_echo_p50_ms={:.1} first_ms={:.1}",
        warm[warm.len() / 2],
        rtts[0]
    );

    // Files, through the agent in the guest.
    let r = s
        .http
        .put(s.url(&format!("/v1/sandboxes/{id}/files?path=data/in.txt")))
        .body("hello vm\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let (out, _, _) = s.sh(&id, "cat /root/data/in.txt").await;
    assert_eq!(out, "hello vm\n");
    s.sh(&id, "printf 'from the guest' > /tmp/out.txt").await;
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files?path=/tmp/out.txt")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "from the guest");
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files?path=/nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The REPL keeps its state between calls.
    assert_eq!(py(&s, &id, "x = 41").await.2, 0);
    assert_eq!(py(&s, &id, "x + 1").await.0, "42\n");

    // A preview port: a server in the guest, reached through its agent.
    let (_, err, code) = s
        .sh(
            &id,
            "mkdir -p /srv && echo vm-preview > /srv/index.html && cd /srv && \
             python3 -m http.server 8000 >/dev/null 2>&1 &",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, v) = get(&s, &format!("/v1/sandboxes/{id}/ports")).await;
        assert_eq!(st, 200, "{v}");
        if v["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 8000)
        {
            break;
        }
        assert!(Instant::now() < deadline, "port 8000 never listened: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/ports/8000/index.html")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "vm-preview\n");

    // Pause stops the vCPUs (QMP stop): a command started before keeps no time going.
    let (st, v) = post(&s, &format!("/v1/sandboxes/{id}/pause"), json!({})).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("paused")), "{v}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, v) = post(&s, &format!("/v1/sandboxes/{id}/resume"), json!({})).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("running")), "{v}");
    assert_eq!(py(&s, &id, "x").await.0, "41\n");

    // Delete: QEMU gone, its run dir and RAM file removed.
    let pid: i32 = std::fs::read_to_string(s.data.path().join(format!("vm-run/{id}/qemu.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(s.delete(&id).await, 204);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!s.data.path().join(format!("vm-run/{id}")).exists());
    assert!(!std::path::Path::new(&format!("/dev/shm/forkbox-vm-{id}.ram")).exists());
    let (st, _) = get(&s, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(st, 410);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("vm booted"), "{text}");
}

#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_and_jail_side_by_side_and_unknown_runtime() {
    let (s, _log) = Server::start_logged_with(&common::vm_env());
    let (vm, _) = create_vm(&s).await;
    let jail = s.create(json!({})).await;
    assert_eq!(jail["runtime"], "jail");
    let jail = jail["id"].as_str().unwrap().to_owned();
    let (_, ev) = s.exec(&vm, json!({"cmd": "uname -r"})).await;
    let (vm_kernel, _, _) = collect(&ev);
    let (jail_kernel, _, _) = s.sh(&jail, "uname -r").await;
    assert_ne!(vm_kernel, jail_kernel, "the guest runs its own kernel");
    let (st, v) = post(&s, "/v1/sandboxes", json!({"runtime": "firecracker"})).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("jail, vm"), "{v}");
    // What the vm runtime cannot do is refused before anything boots.
    let (st, v) = post(
        &s,
        "/v1/sandboxes",
        json!({"runtime": "vm", "memory_mb": 64}),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(s.delete(&vm).await, 204);
    assert_eq!(s.delete(&jail).await, 204);
}

#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_hibernate_frees_ram_and_wake_restores_memory_and_processes() {
    let (s, _log) = Server::start_logged_with(&common::vm_env());
    let (id, _) = create_vm(&s).await;
    assert_eq!(py(&s, &id, "kept = [41, 'state']").await.2, 0);
    let (st, bg) = post(
        &s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "python3 -m http.server 8000 --bind 127.0.0.1", "background": true}),
    )
    .await;
    assert_eq!(st, 200, "{bg}");
    // Wait until the server answers inside the guest.
    let mut up = false;
    for _ in 0..100 {
        let (_, _, code) = s
            .sh(
                &id,
                "python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:8000/')\"",
            )
            .await;
        if code == 0 {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(up, "http.server did not come up in the guest");
    let pid_file = s.data.path().join(format!("vm-run/{id}/qemu.pid"));
    let qemu: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ram = format!("/dev/shm/forkbox-vm-{id}.ram");
    assert!(std::path::Path::new(&ram).exists());

    let t = Instant::now();
    let (st, v) = post(&s, &format!("/v1/sandboxes/{id}/hibernate"), json!({})).await;
    let hibernate_ms = t.elapsed().as_millis();
    assert_eq!((st, v["status"].as_str()), (200, Some("hibernated")), "{v}");
    // QEMU is gone and the guest's RAM with it; the saved state is on disk.
    assert!(!std::path::Path::new(&format!("/proc/{qemu}")).exists());
    assert!(!std::path::Path::new(&ram).exists());
    let saved = s.data.path().join(format!("vm-run/{id}/hibernated.state"));
    let saved_bytes = std::fs::metadata(&saved).unwrap().len();
    let (st, _) = post(
        &s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "true"}),
    )
    .await;
    assert_eq!(st, 409);

    let t = Instant::now();
    let (st, v) = post(&s, &format!("/v1/sandboxes/{id}/wake"), json!({})).await;
    let wake_ms = t.elapsed().as_millis();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "running");
    assert_eq!(v["memory_restored"], true, "{v}");
    // A woken guest's QEMU is jailed like a booted one's.
    assert_qemu_jailed(&s, &id);
    // The event says so too (the runtime's capabilities, not the API's guess).
    let events = common::get_text(&s, &format!("/v1/sandboxes/{id}/events")).await;
    assert!(events.contains("\"memory_restored\":true"), "{events}");
    eprintln!(
        "vm figures: hibernate_ms={hibernate_ms} saved_mib={} wake_ms={wake_ms}",
        saved_bytes >> 20
    );
    // The REPL's memory and the background server carried on.
    assert_eq!(py(&s, &id, "kept").await.0, "[41, 'state']\n");
    let (out, err, code) = s
        .sh(&id, "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').status)\"")
        .await;
    assert_eq!((out.as_str(), code), ("200\n", 0), "{err}");
    assert!(
        !saved.exists(),
        "the saved state is dropped once running again"
    );
    assert_eq!(s.delete(&id).await, 204);
    assert!(!s.data.path().join(format!("vm-run/{id}")).exists());
}

#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_fork_carries_memory_and_processes_and_merge_works() {
    let (s, log) = Server::start_logged_with(&common::vm_env());
    let (id, _) = create_vm(&s).await;
    assert_eq!(py(&s, &id, "x = 41").await.2, 0);
    s.sh(&id, "echo parent > /root/who").await;
    let (st, bg) = post(
        &s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "python3 -m http.server 8000 --bind 127.0.0.1", "background": true}),
    )
    .await;
    assert_eq!(st, 200, "{bg}");
    let probe = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').status)\"";
    let mut up = false;
    for _ in 0..100 {
        if s.sh(&id, probe).await.2 == 0 {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(up, "http.server did not come up in the guest");

    let t = Instant::now();
    let (st, f) = post(&s, &format!("/v1/sandboxes/{id}/fork"), json!({"n": 2})).await;
    let fork_ms = t.elapsed().as_millis();
    assert_eq!(
        st,
        200,
        "{f}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A VM's children carry everything inside the guest: the answer does not say
    // processes stayed behind.
    assert!(
        f["carried"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "processes"),
        "{f}"
    );
    assert!(
        !f["not_carried"]
            .as_str()
            .unwrap()
            .contains("running processes"),
        "{f}"
    );
    let kids: Vec<String> = f["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kids.len(), 2);
    eprintln!("vm figures: fork_n2_ms={fork_ms}");
    // Each child's QEMU in a jail of its own, under another uid than its siblings'.
    let uid_of = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap()
            .to_owned()
    };
    let uids: std::collections::HashSet<String> = kids
        .iter()
        .chain([&id])
        .map(|k| uid_of(assert_qemu_jailed(&s, k)))
        .collect();
    assert_eq!(uids.len(), 3, "{uids:?}");
    for (i, k) in kids.iter().enumerate() {
        let (_, v) = get(&s, &format!("/v1/sandboxes/{k}")).await;
        assert_eq!(v["runtime"], "vm", "{v}");
        // Its own hostname, not the parent's (whose memory it is).
        assert_eq!(
            s.sh(k, "cat /proc/sys/kernel/hostname").await.0,
            format!("{k}\n")
        );
        // The background server was carried over and answers inside the child.
        let (out, err, code) = s.sh(k, probe).await;
        assert_eq!((out.as_str(), code), ("200\n", 0), "{k}: {err}");
        // So were the REPL's memory and the files; then they diverge.
        assert_eq!(py(&s, k, "x").await.0, "41\n");
        assert_eq!(py(&s, k, &format!("x = {}", 100 + i)).await.2, 0);
        assert_eq!(s.sh(k, "cat /root/who").await.0, "parent\n");
        s.sh(k, &format!("echo child{i} > /root/who")).await;
    }
    // The parent runs on untouched.
    assert_eq!(py(&s, &id, "x").await.0, "41\n");
    assert_eq!(
        s.sh(&id, "cat /proc/sys/kernel/hostname").await.0,
        format!("{id}\n")
    );
    assert_eq!(s.sh(&id, "cat /root/who").await.0, "parent\n");
    assert_eq!(s.sh(&id, probe).await.0, "200\n");
    assert_eq!(py(&s, &kids[0], "x").await.0, "100\n");
    assert_eq!(py(&s, &kids[1], "x").await.0, "101\n");

    // Merge the second child back: the parent's id now answers with its state.
    let (st, m) = post(
        &s,
        &format!("/v1/sandboxes/{id}/merge_into/{}", kids[1]),
        json!({}),
    )
    .await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(py(&s, &id, "x").await.0, "101\n");
    assert_eq!(s.sh(&id, "cat /root/who").await.0, "child1\n");
    assert_eq!(s.delete(&kids[0]).await, 204);
    assert_eq!(s.delete(&id).await, 204);
    // The frozen disk layer goes with its last user (the merge frees the parent's old
    // VM in the background).
    layers_only_under_images(&s).await;
}

/// Waits until the only disk layers left are those the server's boot images stand on
/// (every sandbox gone, no snapshot left).
async fn layers_only_under_images(s: &Server) {
    use std::os::unix::fs::MetadataExt as _;
    let run = s.data.path().join("vm-run");
    let left = || {
        let held: std::collections::HashSet<u64> = std::fs::read_dir(run.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .filter_map(|f| f.metadata().ok().map(|m| m.ino()))
            .collect();
        std::fs::read_dir(run.join("layers"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.metadata().is_ok_and(|m| !held.contains(&m.ino())))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        left(),
        Vec::<String>::new(),
        "disk layers left in {}",
        run.display()
    );
}

/// Named snapshots of a vm sandbox are whole guests: a sandbox made from one has the
/// memory, files and running processes of the moment it was taken; a paused sandbox
/// stays paused; deleting it leaves the sandboxes made from it alone. After the first
/// cold boot the server makes the template's boot image, and creates are then copies
/// of it (the guest's init file names the image VM) with their own host name and
/// environment; such a copy forks, and so does its child (each a private mapping of
/// another's RAM: the capture takes the mapped copy and the pages it wrote), and the
/// RAM they share is sealed.
#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_snapshots_and_boot_images() {
    let (s, log) = Server::start_logged_with(&common::vm_env());
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let (a, _) = create_vm(&s).await;
    assert_eq!(py(&s, &a, "y = 7").await.2, 0);
    s.sh(&a, "echo before > /root/f").await;
    start_sleeper(&s, &a).await;
    let (st, snap) = post(
        &s,
        &format!("/v1/sandboxes/{a}/snapshot"),
        json!({"name": "s1"}),
    )
    .await;
    assert_eq!(st, 201, "{snap}\n{}", logs());
    assert_eq!(snap["runtime"], "vm", "{snap}");
    let snap_id = snap["id"].as_str().unwrap().to_owned();
    // The snapshot is of that moment.
    s.sh(&a, "echo after > /root/f").await;
    assert_eq!(py(&s, &a, "y = 8").await.2, 0);

    // Made again by the vm runtime, with the snapshot's guest size.
    let (st, e) = post(
        &s,
        "/v1/sandboxes",
        json!({"snapshot": snap_id, "runtime": "jail"}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    let (st, e) = post(
        &s,
        "/v1/sandboxes",
        json!({"snapshot": snap_id, "memory_mb": 256}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert!(e.to_string().contains("memory_mb 512"), "{e}");
    let b = s.create(json!({"snapshot": snap_id})).await;
    assert_eq!(b["runtime"], "vm", "{b}");
    let b = b["id"].as_str().unwrap().to_owned();
    assert_eq!(py(&s, &b, "y").await.0, "7\n");
    assert_eq!(s.sh(&b, "cat /root/f").await.0, "before\n");
    assert!(
        sleeper_runs(&s, &b).await,
        "the background process was not carried"
    );
    assert_eq!(s.sh(&b, "hostname").await.0, format!("{b}\n"));

    // A paused sandbox is snapshotted paused and stays so.
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{a}/pause"), json!({}))
            .await
            .0,
        200
    );
    let (st, snap2) = post(
        &s,
        &format!("/v1/sandboxes/{a}/snapshot"),
        json!({"name": "s2"}),
    )
    .await;
    assert_eq!(st, 201, "{snap2}");
    assert_eq!(
        get(&s, &format!("/v1/sandboxes/{a}")).await.1["status"],
        "paused"
    );
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{a}/resume"), json!({}))
            .await
            .0,
        200
    );
    assert_eq!(py(&s, &a, "y").await.0, "8\n");
    let c = s.create(json!({"snapshot": snap2["id"]})).await;
    let c = c["id"].as_str().unwrap().to_owned();
    assert_eq!(py(&s, &c, "y").await.0, "8\n");

    // Deleting a snapshot leaves its sandboxes running.
    for snap in [&snap_id, snap2["id"].as_str().unwrap()] {
        assert_eq!(s.delete_at(&format!("/v1/snapshots/{snap}")).await, 204);
        assert!(!s.data.path().join("vm-run/snapshots").join(snap).exists());
    }
    assert_eq!(py(&s, &b, "y").await.0, "7\n");

    // The boot image, made in the background after the first cold boot.
    let image = s
        .data
        .path()
        .join("vm-run/images/python-512m-1c-8192d/captured.json");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !image.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(image.exists(), "no boot image was made\n{}", logs());
    let t = Instant::now();
    let d = s
        .create(json!({"runtime": "vm", "env": {"FOO": "bar"}}))
        .await;
    eprintln!(
        "vm figures: create_from_image_ms={} boot_ms={}",
        t.elapsed().as_millis(),
        d["boot_ms"]
    );
    let d = d["id"].as_str().unwrap().to_owned();
    assert!(s
        .sh(&d, "cat /forkbox/init.json")
        .await
        .0
        .contains("vmimg-"));
    assert_eq!(s.sh(&d, "hostname").await.0, format!("{d}\n"));
    assert_eq!(s.sh(&d, "echo $FOO").await.0, "bar\n");
    assert_eq!(
        py(&s, &d, "import os; print(os.environ['FOO'])").await.0,
        "bar\n"
    );
    // `disk_mb` is the room beyond the template's image, on a cold boot (`a`) as on
    // a copy of the image (`d`, `small`): the guest's root file system fills it.
    let root_mb = |id: String| {
        let s = &s;
        async move {
            let out = s.sh(&id, "df -B1M --output=size / | tail -1").await.0;
            out.trim().parse::<i64>().unwrap()
        }
    };
    let small = s.create(json!({"runtime": "vm", "disk_mb": 1024})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (cold, copy, less) = (
        root_mb(a.clone()).await,
        root_mb(d.clone()).await,
        root_mb(small.clone()).await,
    );
    assert!((cold - copy).abs() < 64, "{cold} vs {copy}");
    assert!(((copy - less) - 7168).abs() < 128, "{copy} vs {less}");
    assert_eq!(s.delete(&small).await, 204);
    // A copy keeps the host's time, not the capture's (the image is seconds old).
    let (e, _) = create_vm(&s).await;
    let guest_now: i64 = s.sh(&e, "date +%s").await.0.trim().parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() < 5,
        "{guest_now} vs {host_now}"
    );
    assert!(s
        .sh(&e, "cat /forkbox/init.json")
        .await
        .0
        .contains("vmimg-"));
    assert_eq!(py(&s, &e, "z = 5").await.2, 0);
    // A copy's fork: its RAM is the image's and the pages it wrote, its processes
    // and files carried; and a fork of that child (itself a copy) likewise.
    assert_qemu_jailed(&s, &e);
    s.sh(&e, "echo mine > /root/g").await;
    start_sleeper(&s, &e).await;
    let (st, f) = post(&s, &format!("/v1/sandboxes/{e}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{f}\n{}", logs());
    let kid = f["children"][0].as_str().unwrap().to_owned();
    assert_eq!(py(&s, &kid, "z").await.0, "5\n");
    assert_eq!(py(&s, &e, "z").await.0, "5\n");
    assert_qemu_jailed(&s, &kid);
    assert_eq!(py(&s, &kid, "z = z + 1; print(z)").await.0, "6\n");
    let (st, f) = post(&s, &format!("/v1/sandboxes/{kid}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{f}\n{}", logs());
    let grandkid = f["children"][0].as_str().unwrap().to_owned();
    assert_eq!(py(&s, &grandkid, "z").await.0, "6\n");
    assert_eq!(s.sh(&grandkid, "cat /root/g").await.0, "mine\n");
    assert!(
        sleeper_runs(&s, &grandkid).await,
        "the background process was not carried"
    );
    assert_eq!(s.sh(&grandkid, "hostname").await.0, format!("{grandkid}\n"));
    assert_eq!(py(&s, &e, "z").await.0, "5\n");
    assert!(
        logs().contains("own_ram=false"),
        "a copy's capture took the device state alone\n{}",
        logs()
    );

    for id in [&a, &b, &c, &d, &e, &kid, &grandkid] {
        assert_eq!(s.delete(id).await, 204);
    }
    layers_only_under_images(&s).await;
}

#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_sandboxes_survive_a_server_restart() {
    let env = common::vm_env();
    let (mut s, _log) = Server::start_logged_with(&env);
    let (id, _) = create_vm(&s).await;
    let (paused, _) = create_vm(&s).await;
    assert_eq!(py(&s, &id, "kept = 'across restarts'").await.2, 0);
    assert_eq!(py(&s, &paused, "y = 7").await.2, 0);
    let (st, _) = post(&s, &format!("/v1/sandboxes/{paused}/pause"), json!({})).await;
    assert_eq!(st, 200);
    s.kill_and_restart_with(&env);
    let (_, v) = get(&s, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(v["status"], "running", "{v}");
    assert_eq!(py(&s, &id, "kept").await.0, "'across restarts'\n");
    // The new server reads the guest's console again.
    let (_, _, code) = s
        .sh(&id, "echo said-after-the-restart > /dev/console")
        .await;
    assert_eq!(code, 0);
    console_shows(&s, &id, "said-after-the-restart", 10).await;
    let (_, v) = get(&s, &format!("/v1/sandboxes/{paused}")).await;
    assert_eq!(v["status"], "paused", "{v}");
    let (st, _) = post(&s, &format!("/v1/sandboxes/{paused}/resume"), json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(py(&s, &paused, "y").await.0, "7\n");
    assert_eq!(s.delete(&id).await, 204);
    assert_eq!(s.delete(&paused).await, 204);
}

/// A volume in a vm sandbox is a virtio-blk device (its ext4 image) the guest mounts:
/// one vm sandbox has it writable and nothing else mounts it meanwhile, vm sandboxes
/// may share it read-only, a jail never mounts one a guest had writable (the host
/// kernel does not parse what a guest wrote as raw blocks), and sandboxes with a
/// writable volume are neither forked nor snapshotted.
#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_volumes_are_block_devices() {
    let (s, log) = Server::start_logged_with(&common::vm_env());
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let (st, v) = post(&s, "/v1/volumes", json!({"name": "data", "size_mb": 64})).await;
    assert_eq!(st, 201, "{v}");
    let vol = v["id"].as_str().unwrap().to_owned();
    let rw = json!([{"id": vol, "mount": "/data"}]);
    let ro = json!([{"id": vol, "mount": "/data", "read_only": true}]);

    // Written first by a jail sandbox, on the host's mount.
    let j = s.create(json!({"volumes": rw})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.sh(&j, "echo jail > /data/from-jail").await;
    let (st, e) = post(&s, "/v1/sandboxes", json!({"runtime": "vm", "volumes": rw})).await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(s.delete(&j).await, 204);

    let (st, a) = post(&s, "/v1/sandboxes", json!({"runtime": "vm", "volumes": rw})).await;
    assert_eq!(st, 201, "{a}\n{}", logs());
    let a = a["id"].as_str().unwrap().to_owned();
    assert_eq!(s.sh(&a, "cat /data/from-jail").await.0, "jail\n");
    assert_eq!(
        s.sh(
            &a,
            "echo vm > /data/from-vm && grep ' /data ' /proc/mounts | cut -d' ' -f1,3"
        )
        .await
        .0,
        "/dev/vdb ext4\n"
    );
    // Its size is the limit, as in a jail; a mounted volume is not deleted.
    let (_, err, code) = s
        .sh(
            &a,
            "dd if=/dev/zero of=/data/big bs=1M count=100 status=none",
        )
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("No space left on device"), "{err}");
    s.sh(&a, "rm /data/big").await;
    assert_eq!(s.delete_at(&format!("/v1/volumes/{vol}")).await, 409);
    // Nothing else mounts it while a guest has it writable; it is not copied.
    for body in [
        json!({"runtime": "vm", "volumes": ro}),
        json!({"runtime": "jail", "volumes": ro}),
    ] {
        let (st, e) = post(&s, "/v1/sandboxes", body.clone()).await;
        assert_eq!(st, 409, "{body}: {e}");
    }
    let (st, e) = post(&s, &format!("/v1/sandboxes/{a}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 409, "{e}");
    let (st, e) = post(
        &s,
        &format!("/v1/sandboxes/{a}/snapshot"),
        json!({"name": "x"}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(s.delete(&a).await, 204);

    // Read-only, shared by vm sandboxes.
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (st, b) = post(&s, "/v1/sandboxes", json!({"runtime": "vm", "volumes": ro})).await;
        assert_eq!(st, 201, "{b}\n{}", logs());
        let b = b["id"].as_str().unwrap().to_owned();
        assert_eq!(s.sh(&b, "cat /data/from-vm").await.0, "vm\n");
        let (_, err, code) = s.sh(&b, "echo x > /data/nope").await;
        assert_ne!(code, 0);
        assert!(err.contains("Read-only"), "{err}");
        readers.push(b);
    }
    // A guest wrote it as raw blocks: the host does not mount it again.
    let (st, e) = post(&s, "/v1/sandboxes", json!({"volumes": ro})).await;
    assert_eq!(st, 409, "{e}");
    assert!(e.to_string().contains("vm sandbox"), "{e}");
    for b in &readers {
        assert_eq!(s.delete(b).await, 204);
    }
    assert_eq!(s.delete_at(&format!("/v1/volumes/{vol}")).await, 204);
    assert!(!s
        .data
        .path()
        .join(format!("volumes/{vol}.guest-written"))
        .exists());
}
