//! End-to-end: the spine (create / exec / delete) over real HTTP against a real server
//! and real jail sandboxes.

#![allow(clippy::unwrap_used)]

mod common;

use common::{collect, Server};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn create_exec_delete_and_errors() {
    create_exec_delete_and_errors_on(&Server::start(), json!({})).await;
}

/// The same against the vm runtime: a QEMU microvm guest (TCG on these machines). Needs
/// qemu-system-x86 and the guest assets, so it is not part of `make test` yet:
/// `make test-vm` runs it.
#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn create_exec_delete_and_errors_vm() {
    let (s, _log) = Server::start_logged_with(&common::vm_env());
    create_exec_delete_and_errors_on(&s, json!({"runtime": "vm"})).await;
}

/// `base`: what every create body of the scenario carries (e.g. the runtime).
async fn create_exec_delete_and_errors_on(s: &Server, base: serde_json::Value) {
    let with = |extra: serde_json::Value| {
        let mut b = base.clone();
        if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        b
    };
    let created = s.create(with(json!({}))).await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sbx-"), "{created}");
    assert_eq!(created["status"], "running");
    assert_eq!(created["template"], "python");
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(created["boot_ms"].as_f64().unwrap() > 0.0);

    // echo hi: one stdout line then exit 0, numbered from 1.
    let (status, events) = s.exec(&id, json!({"cmd": "echo hi"})).await;
    assert_eq!(status, 200);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["type"], "stdout");
    assert_eq!(events[0]["data"], "hi\n");
    assert_eq!(events[0]["seq"], 1);
    assert_eq!(events[1]["type"], "exit");
    assert_eq!(events[1]["data"], 0);
    assert_eq!(events[1]["seq"], 2);

    let (out, err, code) = s
        .sh(
            &id,
            "python3 -c 'import sys; print(1); print(2, file=sys.stderr); sys.exit(3)'",
        )
        .await;
    assert_eq!((out.as_str(), err.as_str(), code), ("1\n", "2\n", 3));

    // cwd and env are honoured; the sandbox's hostname is its id.
    let (status, ev) = s
        .exec(
            &id,
            json!({"cmd": "pwd; echo $GREETING; hostname", "cwd": "/tmp", "env": {"GREETING": "hello"}}),
        )
        .await;
    assert_eq!(status, 200);
    let (out, _, code) = collect(&ev);
    assert_eq!(out, format!("/tmp\nhello\n{id}\n"));
    assert_eq!(code, 0);

    // One JSON result when asked to wait.
    let r: serde_json::Value = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec")))
        .json(&json!({"cmd": "echo out; echo err >&2; exit 7", "wait": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        r,
        json!({"stdout": "out\n", "stderr": "err\n", "exit_code": 7})
    );

    let got: serde_json::Value = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["id"], id);
    assert_eq!(got["status"], "running");

    // Bad input: clear JSON errors with the right status.
    let (status, body) = s.exec(&id, json!({"cmd": "true", "cwd": "/nope"})).await;
    assert_eq!(status, 400, "{body:?}");
    assert!(body[0]["error"].as_str().unwrap().contains("/nope"));
    let (status, body) = s.exec(&id, json!({"command": "true"})).await;
    assert_eq!(status, 400);
    assert_eq!(body[0]["code"], "invalid_request");
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec")))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .post(s.url("/v1/sandboxes"))
        .json(&with(json!({"memory_mb": 1})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("memory_mb"));
    let r = s
        .http
        .post(s.url("/v1/sandboxes"))
        .json(&with(json!({"template": "no-such-template"})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let unknown = "sbx-0000000000000000";
    assert_eq!(s.exec(unknown, json!({"cmd": "true"})).await.0, 404);
    assert_eq!(s.delete(unknown).await, 404);

    assert_eq!(s.delete(&id).await, 204);
    let (status, body) = s.exec(&id, json!({"cmd": "echo hi"})).await;
    assert_eq!(status, 410, "{body:?}");
    assert_eq!(body[0]["code"], "gone");
    assert_eq!(
        s.http
            .get(s.url(&format!("/v1/sandboxes/{id}")))
            .send()
            .await
            .unwrap()
            .status(),
        410
    );
    assert_eq!(s.delete(&id).await, 410);
}

#[tokio::test]
async fn output_is_streamed_as_it_is_produced() {
    let s = Server::start();
    let id = s.create_id().await;
    let t = Instant::now();
    let mut r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec")))
        .json(&json!({"cmd": "echo first; sleep 2; echo second"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let chunk = r.chunk().await.unwrap().unwrap();
    let first_at = t.elapsed();
    assert!(String::from_utf8_lossy(&chunk).contains("first"));
    assert!(
        first_at < Duration::from_millis(1500),
        "first line arrived only after {first_at:?}"
    );
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(t.elapsed() >= Duration::from_secs(2));
    assert!(String::from_utf8_lossy(&rest).contains("second"));
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn sandboxes_cannot_see_each_other() {
    let s = Server::start();
    let a = s.create_id().await;
    let b = s.create_id().await;
    let (_, _, code) = s
        .sh(
            &a,
            "echo secret > /root/a.txt; (sleep 300 >/dev/null 2>&1 &) ; echo started",
        )
        .await;
    assert_eq!(code, 0);
    let (out, _, _) = s.sh(&b, "ls /root; ps -eo comm").await;
    assert!(!out.contains("a.txt"), "{out}");
    assert!(!out.contains("sleep"), "{out}");
    // A still has both.
    let (out, _, _) = s.sh(&a, "ps -eo comm; cat /root/a.txt").await;
    assert!(out.contains("secret") && out.contains("sleep"), "{out}");
    // PID 1 is the agent in each.
    let (out, _, _) = s.sh(&b, "cat /proc/1/comm; ps -eo pid= | wc -l").await;
    assert!(out.starts_with("forkbox-agent\n"), "{out}");
    assert_eq!(s.delete(&a).await, 204);
    assert_eq!(s.delete(&b).await, 204);
}

#[tokio::test]
async fn user_code_runs_without_privileges() {
    let s = Server::start();
    let id = s.create_id().await;
    let (out, _, _) = s
        .sh(
            &id,
            "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; id -u",
        )
        .await;
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.ends_with("0\n"), "root inside: {out}");

    // Only fds 0-2 are open when user code starts.
    let (out, _, _) = s.sh(&id, "ls /proc/$$/fd").await;
    assert_eq!(out, "0\n1\n2\n");

    for (cmd, what) in [
        ("mount -t tmpfs none /mnt", "mount"),
        ("unshare -U true", "unshare user ns"),
        ("unshare -m true", "unshare mount ns"),
        ("chroot / true", "chroot"),
    ] {
        let (_, _, code) = s.sh(&id, cmd).await;
        assert_ne!(code, 0, "{what} succeeded inside the sandbox");
    }
    let ptrace = "python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True); \
                  r=l.ptrace(16, 1, 0, 0); print(r, ctypes.get_errno())'";
    let (out, _, _) = s.sh(&id, ptrace).await;
    assert!(out.starts_with("-1 "), "ptrace(ATTACH, 1) succeeded: {out}");
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn no_network_but_loopback() {
    let s = Server::start();
    let id = s.create_id().await;
    let (out, _, code) = s
        .sh(&id, "ip -o link show | awk '{print $2}'; ip route")
        .await;
    assert_eq!(code, 0);
    assert_eq!(out, "lo:\n", "interfaces/routes inside: {out}");
    // Loopback works inside.
    let py =
        "python3 -c \"import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); \
              c=socket.create_connection(s.getsockname()); print('ok')\"";
    let (out, _, _) = s.sh(&id, py).await;
    assert_eq!(out, "ok\n");
    // The host's loopback services are not reachable.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let probe = format!(
        "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\""
    );
    let (_, err, code) = s.sh(&id, &probe).await;
    assert_ne!(code, 0);
    assert!(err.contains("Connection refused"), "{err}");
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn memory_bomb_is_killed_and_reported() {
    memory_bomb_is_killed_and_reported_on(&Server::start(), json!({"memory_mb": 64})).await;
}

/// The same in a vm guest (default memory): its kernel's OOM killer, which the guest's
/// agent counts around the command.
#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn memory_bomb_is_killed_and_reported_vm() {
    let (s, _log) = Server::start_logged_with(&common::vm_env());
    memory_bomb_is_killed_and_reported_on(&s, json!({"runtime": "vm"})).await;
}

/// Allocates (and touches) 8 MiB at a time until the OOM killer ends it: no single
/// allocation is larger than the sandbox's memory, so none is refused outright.
async fn memory_bomb_is_killed_and_reported_on(s: &Server, body: serde_json::Value) {
    let id = s.create(body).await["id"].as_str().unwrap().to_owned();
    let before = common::get_text(s, &format!("/v1/sandboxes/{id}/events")).await;
    assert!(!before.contains("\"oom\""), "{before}");
    let (out, err, code) = s
        .sh(
            &id,
            "python3 -c \"a = []\nwhile True: a.append(b'x' * (8 << 20))\"",
        )
        .await;
    assert_eq!(code, 137, "stdout {out} stderr {err}");
    assert!(err.contains("out-of-memory"), "{err}");
    let events = common::get_text(s, &format!("/v1/sandboxes/{id}/events")).await;
    assert!(events.contains("\"oom\""), "{events}");
    // The sandbox and the server carry on.
    assert_eq!(s.sh(&id, "echo alive").await.0, "alive\n");
    let r = s.http.get(s.url("/v1/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn fork_bomb_stops_at_the_pids_limit() {
    let s = Server::start();
    let id = s.create_id().await;
    let bomb = "python3 -c \"
import os, time
n = 0
try:
    while n < 5000:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print('stopped at', n, e.errno)
\"";
    let (status, events) = s.exec(&id, json!({"cmd": bomb, "timeout": 30})).await;
    assert_eq!(status, 200);
    let (out, _, _) = collect(&events);
    assert!(out.starts_with("stopped at "), "{out}");
    let n: u32 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(n < 600, "forked {n} processes");
    // The bomb's children are killed with it, and the sandbox works.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (out, _, _) = s.sh(&id, "ps -eo comm= | grep -c python3 || true").await;
        if out.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} bomb processes remain",
            out.trim()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn timeout_kills_the_process_tree() {
    let s = Server::start();
    let id = s.create_id().await;
    let t = Instant::now();
    let (status, events) = s
        .exec(&id, json!({"cmd": "sleep 1000 & sleep 1000", "timeout": 1}))
        .await;
    assert_eq!(status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let (_, err, code) = collect(&events);
    assert_eq!(code, 124);
    assert!(err.contains("timed out"), "{err}");
    let (out, _, _) = s.sh(&id, "ps -eo comm= | grep -c sleep || true").await;
    assert_eq!(out.trim(), "0");
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn delete_leaves_nothing_behind() {
    let s = Server::start();
    let id = s.create_id().await;
    s.sh(
        &id,
        "(sleep 300 >/dev/null 2>&1 &); dd if=/dev/zero of=/root/f bs=1M count=4 2>/dev/null",
    )
    .await;
    let rootfs = s.pool.join("sandboxes").join(&id);
    assert!(rootfs.exists());
    let cg = ["memory", "pids", "cpu", "freezer"]
        .map(|c| std::path::PathBuf::from(format!("/sys/fs/cgroup/{c}/forkbox/{id}")));
    let v2 = std::path::PathBuf::from(format!("/sys/fs/cgroup/forkbox/{id}"));
    assert!(cg.iter().any(|p| p.exists()) || v2.exists());
    let in_cgroup = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("cgroup"))
                    .map(|c| c.contains(&id))
                    .unwrap_or(false)
            })
            .count()
    };
    assert!(in_cgroup() >= 2);
    assert_eq!(s.delete(&id).await, 204);
    assert_eq!(in_cgroup(), 0, "processes of {id} remain");
    assert!(!rootfs.exists(), "subvolume remains");
    assert!(
        !cg.iter().any(|p| p.exists()) && !v2.exists(),
        "cgroup remains"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&id), "mount remains");
    assert!(
        !s.data.path().join("run").join(&id).exists(),
        "run dir remains"
    );
}

#[tokio::test]
async fn expired_sandboxes_are_killed() {
    let s = Server::start();
    let id = s.create(json!({"timeout": 1})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = s
            .http
            .get(s.url(&format!("/v1/sandboxes/{id}")))
            .send()
            .await
            .unwrap()
            .status();
        if st == 410 {
            break;
        }
        assert!(Instant::now() < deadline, "sandbox outlived its timeout");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!s.pool.join("sandboxes").join(&id).exists());
}

#[tokio::test]
async fn an_output_flood_keeps_server_memory_bounded() {
    // A slow reader: the producer must wait, not the server's memory grow, and the
    // server keeps answering other requests meanwhile.
    let s = Server::start();
    let id = s
        .flood(
            "exec",
            "head -c 150M /dev/zero | tr '\\0' x",
            None,
            150 << 20,
        )
        .await;
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn a_waited_exec_keeps_at_most_a_mib_of_a_flood() {
    // `wait: true` answers one JSON result: a flood must not grow the server's memory
    // (it collected everything before), and the answer says what was cut.
    let s = Server::start();
    let id = s.create_id().await;
    let idle = s.rss_kib();
    let mut peak = idle;
    let call = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec")))
        .json(&json!({"cmd": "head -c 300M /dev/zero | tr '\\0' x; echo done >&2", "wait": true}))
        .send();
    tokio::pin!(call);
    let r = loop {
        tokio::select! {
            r = &mut call => break r.unwrap(),
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                peak = peak.max(s.rss_kib());
            }
        }
    };
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["exit_code"], 0, "{}", v["stderr"]);
    let out = v["stdout"].as_str().unwrap();
    assert_eq!(out.len(), 1 << 20);
    assert!(out.bytes().all(|b| b == b'x'));
    assert_eq!(
        v["stderr"],
        "done\nforkbox: stdout was cut at 1048576 bytes\n"
    );
    assert!(
        peak < idle + 100 * 1024,
        "server RSS grew from {idle} KiB to {peak} KiB"
    );
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn a_flood_of_tiny_lines_keeps_the_agent_connection_and_memory() {
    // One event per two-byte line: the agent must not answer with one tiny HTTP/2 frame
    // per line (the host's h2 closes a connection flooded with small frames).
    let s = Server::start();
    let id = s
        .flood("exec", "yes | head -c 2G", Some(40 << 20), 40 << 20)
        .await;
    // Hanging up killed the flood; the sandbox still answers.
    s.assert_gone(&id, "yes").await;
    let (st, ev) = s.exec(&id, json!({"cmd": "echo ok"})).await;
    assert_eq!(st, 200);
    assert_eq!(ev[0]["data"], "ok\n");
    assert_eq!(s.delete(&id).await, 204);
}
