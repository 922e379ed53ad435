//! End-to-end: a SIGKILLed server restarts without losing anything: running sandboxes
//! (REPL state included) are adopted, dead ones are marked `lost` with a reason.

#![allow(clippy::unwrap_used)]

mod common;

use common::{post, py, Server};
use serde_json::{json, Value};

/// Host pid of the agent of sandbox `id` (PID 1 inside it).
fn agent_pid(id: &str) -> i32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let is_pid1 = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|v| v.split_whitespace().last() == Some("1"));
        if comm.trim() == "forkbox-agent" && cg.contains(&format!("/{id}\n")) && is_pid1 {
            return pid;
        }
    }
    panic!("no agent for {id}");
}

#[tokio::test]
async fn a_killed_server_restarts_and_adopts_its_sandboxes() {
    let mut s = Server::start();
    let repl = s.create_id().await;
    py(&s, &repl, "x = 41").await;
    let files = s.create_id().await;
    s.sh(&files, "echo kept > /root/f").await;
    let paused = s.create_id().await;
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{paused}/pause"), json!({}))
            .await
            .0,
        200
    );
    let bg = s.create_id().await;
    let (_, started) = post(
        &s,
        &format!("/v1/sandboxes/{bg}/exec"),
        json!({"cmd": "sleep 1; echo from-before-the-restart; sleep 2", "background": true}),
    )
    .await;
    let bg_pid = started["pid"].as_i64().unwrap();
    let doomed = s.create_id().await;
    // A deleted fork parent stays hollow while its child lives.
    let hp = s.create_id().await;
    py(&s, &hp, "gen = 'parent'").await;
    let (st, forked) = post(&s, &format!("/v1/sandboxes/{hp}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{forked}");
    let hc = forked["children"][0].as_str().unwrap().to_owned();
    assert_eq!(s.delete(&hp).await, 204);
    assert!(s.pool.join("sandboxes").join(&hp).exists());
    // Leftovers of a create a crash interrupted: a run dir and a root filesystem.
    let orphan = "sbx-orphan0restart";
    std::fs::create_dir_all(s.data.path().join("run").join(orphan)).unwrap();
    let orphan_root = s.pool.join("sandboxes").join(orphan);
    let ok = std::process::Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(&orphan_root)
        .output()
        .unwrap();
    assert!(ok.status.success());
    // More sandboxes, for 20 in all (with the fork child below).
    let mut extra = Vec::new();
    for _ in 0..14 {
        extra.push(s.create_id().await);
    }
    // Streams in flight when the server dies.
    let mut streams = Vec::new();
    for id in [&repl, &files, &extra[0], &extra[1], &extra[2]] {
        let url = s.url(&format!("/v1/sandboxes/{id}/exec"));
        let http = s.http.clone();
        streams.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"cmd": "for i in $(seq 100); do echo $i; sleep 0.05; done"}))
                .send()
                .await;
            if let Ok(r) = r {
                let _ = r.text().await;
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // One sandbox dies while no server watches.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid(&doomed)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    s.kill_and_restart();
    for t in streams {
        let _ = t.await;
    }
    // Every record is there; the live ones kept their state.
    let (_, list) = {
        let r = s
            .http
            .get(s.url("/v1/sandboxes?status=all"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let status_of = |id: &str| {
        list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == json!(id))
            .map(|x| x["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(status_of(&repl).as_deref(), Some("running"));
    assert_eq!(status_of(&files).as_deref(), Some("running"));
    assert_eq!(status_of(&paused).as_deref(), Some("paused"));
    assert_eq!(status_of(&doomed).as_deref(), Some("lost"));
    assert_eq!(
        py(&s, &repl, "x + 1").await.0,
        "42\n",
        "REPL state survived"
    );
    assert_eq!(s.sh(&files, "cat /root/f").await.0, "kept\n");
    let (st, _) = s.exec(&paused, json!({"cmd": "true"})).await;
    assert_eq!(st, 409);
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{paused}/resume"), json!({}))
            .await
            .0,
        200
    );
    assert_eq!(s.sh(&paused, "echo thawed").await.0, "thawed\n");
    for id in &extra {
        assert_eq!(status_of(id).as_deref(), Some("running"), "{id}");
        assert_eq!(s.sh(id, "echo alive").await.0, "alive\n", "{id}");
    }
    // A background command kept running and its output was kept.
    let r = s
        .http
        .get(s.url(&format!(
            "/v1/sandboxes/{bg}/commands/{bg_pid}/output?follow=1"
        )))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("from-before-the-restart"), "{text}");
    // The dead one: a clear reason, nothing left on the host.
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{doomed}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    let lost = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == json!(doomed))
        .unwrap()
        .clone();
    assert!(lost.to_string().contains("lost"), "{lost}");
    assert!(!s.pool.join("sandboxes").join(&doomed).exists());
    // Garbage: the orphan is gone; the hollow parent was taken back, not freed, and
    // goes with its last child.
    assert!(!orphan_root.exists(), "orphan root filesystem left");
    assert!(!s.data.path().join("run").join(orphan).exists());
    assert!(
        s.pool.join("sandboxes").join(&hp).exists(),
        "hollow parent freed too early"
    );
    assert_eq!(py(&s, &hc, "gen").await.0, "'parent'\n");
    assert_eq!(s.delete(&hc).await, 204);
    let mut gone = false;
    for _ in 0..50 {
        if !s.pool.join("sandboxes").join(&hp).exists() {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone, "hollow parent not released after its last child");
    for id in [&repl, &files, &paused, &bg]
        .into_iter()
        .chain(extra.iter())
    {
        assert_eq!(s.delete(id).await, 204, "{id}");
    }
    // Nothing of these sandboxes is left on the host.
    let mut ids = vec![&repl, &files, &paused, &bg, &doomed, &hp, &hc];
    ids.extend(extra.iter());
    for id in &ids {
        assert!(
            !s.pool.join("sandboxes").join(id).exists(),
            "{id} root left"
        );
        assert!(
            !s.data.path().join("run").join(id).exists(),
            "{id} run dir left"
        );
    }
    for root in ["/sys/fs/cgroup/memory/forkbox", "/sys/fs/cgroup/forkbox"] {
        if let Ok(rd) = std::fs::read_dir(root) {
            let names: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            for id in &ids {
                assert!(!names.contains(*id), "cgroup {id} left in {root}");
            }
        }
    }
}

#[tokio::test]
async fn a_killed_agent_answers_502_then_the_sandbox_is_marked_failed() {
    let s = Server::start();
    let id = s.create_id().await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid(&id)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (st, body) = s.exec(&id, json!({"cmd": "true"})).await;
    // Either the agent's death was already noticed (410) or the call finds it (502).
    assert!(st == 502 || st == 410, "{st} {body:?}");
    let mut status = String::new();
    for _ in 0..40 {
        let r = s
            .http
            .get(s.url(&format!("/v1/sandboxes/{id}")))
            .send()
            .await
            .unwrap();
        if r.status() == 410 {
            status = r.json::<Value>().await.unwrap()["error"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(status.contains("failed"), "{status}");
    assert!(!s.pool.join("sandboxes").join(&id).exists());
    // The rest of the server is unaffected.
    let other = s.create_id().await;
    assert_eq!(s.sh(&other, "echo ok").await.0, "ok\n");
    assert_eq!(s.delete(&other).await, 204);
}
