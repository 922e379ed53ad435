//! End-to-end: no sandbox outlives its owner. A server that stays gone past its grace
//! period (`--orphan-grace`) takes its sandboxes with it (each ends itself, its warden
//! frees the rest); one that comes back in time re-adopts them, even when its whole
//! process group was killed; `forkbox down` ends a dead server's sandboxes by hand.

#![allow(clippy::unwrap_used)]

mod common;

use common::{post, py, Server};
use serde_json::json;
use std::time::Duration;

/// Creates `jail` jail sandboxes (one paused, one with a live REPL) and `vm` vm ones.
async fn populate(s: &Server, jail: usize, vm: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..jail {
        let id = s.create_id().await;
        s.sh(&id, "sleep 1000 >/dev/null 2>&1 &").await;
        if i == 0 {
            py(s, &id, "x = 41").await;
        }
        if i == 1 {
            let (st, _) = post(s, &format!("/v1/sandboxes/{id}/pause"), json!({})).await;
            assert_eq!(st, 200);
        }
        ids.push(id);
    }
    for _ in 0..vm {
        let v = s.create(json!({"runtime": "vm"})).await;
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// The server is SIGKILLed and never comes back: after the grace period (5 s) nothing
/// of its sandboxes is left on the host.
async fn orphans_end(vm: usize) {
    let mut env = vec![("FORKBOX_ORPHAN_GRACE", "5".to_owned())];
    if vm > 0 {
        env.extend(common::vm_env());
    }
    let mut s = Server::start_with(&env);
    let ids = populate(&s, 3, vm).await;
    assert!(!s.leftovers(&ids).is_empty());
    s.kill();
    // Still there within the grace period (a server may come back)…
    std::thread::sleep(Duration::from_secs(2));
    let alive = s.leftovers(&ids);
    assert!(
        alive.iter().any(|l| l.starts_with("process")),
        "ended before the grace period: {alive:?}"
    );
    // …and gone soon after it.
    let left = s.wait_clean(&ids, Duration::from_secs(13));
    assert!(left.is_empty(), "left on the host: {left:#?}");
    let log = std::fs::read_to_string(s.data.path().join("warden.log")).unwrap();
    assert!(log.contains("taking the data dir down"), "{log}");
}

#[tokio::test]
async fn jail_sandboxes_end_when_their_server_stays_gone() {
    orphans_end(0).await;
}

#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_and_jail_sandboxes_end_when_their_server_stays_gone() {
    orphans_end(1).await;
}

/// Sandboxes run in sessions of their own: killing the server's whole process group
/// leaves them running, and the next server adopts them (REPL state included).
async fn group_kill_readopts(vm: usize) {
    let env = if vm > 0 { common::vm_env() } else { Vec::new() };
    let mut s = Server::start_with(&env);
    let ids = populate(&s, 2, vm).await;
    s.kill_group();
    s.restart_with(&env);
    let (out, _, code) = py(&s, &ids[0], "print(x + 1)").await;
    assert_eq!((out.as_str(), code), ("42\n", 0));
    let (st, v) = common::get(&s, &format!("/v1/sandboxes/{}", ids[1])).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("paused")), "{v}");
    for id in ids.iter().skip(2) {
        let (out, _, code) = s.sh(id, "echo still-here").await;
        assert_eq!((out.as_str(), code), ("still-here\n", 0), "{id}");
    }
}

#[tokio::test]
async fn a_server_killed_with_its_process_group_re_adopts_its_sandboxes() {
    group_kill_readopts(0).await;
}

#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn vm_sandboxes_survive_a_kill_of_the_servers_process_group() {
    group_kill_readopts(1).await;
}

/// A server back within the grace period re-adopts: the switch does not fire while a
/// server holds the connection, nor for a hollow fork parent whose child lives.
#[tokio::test]
async fn a_server_back_within_the_grace_period_keeps_everything() {
    let env = [("FORKBOX_ORPHAN_GRACE", "3".to_owned())];
    let mut s = Server::start_with(&env);
    let ids = populate(&s, 2, 0).await;
    // A hollow parent: deleted while its fork child lives.
    let parent = s.create_id().await;
    py(&s, &parent, "gen = 'parent'").await;
    let (st, forked) = post(&s, &format!("/v1/sandboxes/{parent}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{forked}");
    let child = forked["children"][0].as_str().unwrap().to_owned();
    assert_eq!(s.delete(&parent).await, 204);
    // Idle with a server for three grace periods: nothing ends.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let (out, _, code) = py(&s, &child, "print(gen)").await;
    assert_eq!((out.as_str(), code), ("parent\n", 0));
    // Gone for less than the grace period, then back.
    s.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.restart_with(&env);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (out, _, code) = py(&s, &ids[0], "print(x)").await;
    assert_eq!((out.as_str(), code), ("41\n", 0));
    let (out, _, code) = py(&s, &child, "print(gen)").await;
    assert_eq!((out.as_str(), code), ("parent\n", 0));
}

/// `forkbox down` on the data dir of a dead server with live sandboxes (paused, fork
/// child, hollow parent, egress, volume): all gone; a second run is a no-op.
#[tokio::test]
async fn down_ends_a_dead_servers_sandboxes() {
    let mut s = Server::start();
    let mut ids = populate(&s, 3, 0).await;
    let (st, vol) = post(&s, "/v1/volumes", json!({"name": "v", "size_mb": 64})).await;
    assert_eq!(st, 201, "{vol}");
    let with_vol = s
        .create(json!({"volumes": [{"id": vol["id"], "mount": "/data"}],
                       "egress_allowlist": ["example.invalid"]}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    ids.push(with_vol);
    let (st, forked) = post(
        &s,
        &format!("/v1/sandboxes/{}/fork", ids[0]),
        json!({"n": 2}),
    )
    .await;
    assert_eq!(st, 200, "{forked}");
    for c in forked["children"].as_array().unwrap() {
        ids.push(c.as_str().unwrap().to_owned());
    }
    assert_eq!(s.delete(&ids[0]).await, 204);
    s.kill();
    assert!(!s.leftovers(&ids).is_empty());
    let out = common::run_down_of(&s, &[]);
    assert!(out.contains("ended sandbox"), "{out}");
    assert!(out.contains("unmounted volume"), "{out}");
    assert!(out.contains("removed network namespace"), "{out}");
    let left = s.leftovers(&ids);
    assert!(left.is_empty(), "left on the host: {left:#?}\n{out}");
    let again = common::run_down_of(&s, &[]);
    assert!(again.starts_with("nothing to do"), "{again}");
    // The records say what happened.
    s.restart_with(&[]);
    let (st, v) = common::get(&s, &format!("/v1/sandboxes/{}", ids[1])).await;
    assert_eq!(st, 410, "{v}");
    assert!(v["error"].as_str().unwrap().contains("lost"), "{v}");
}

/// `forkbox down` refuses while a server runs on the data dir.
#[tokio::test]
async fn down_refuses_beside_a_live_server() {
    let s = Server::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .args(["down", "--data-dir"])
        .arg(s.data.path())
        .arg("--pool")
        .arg(&s.pool)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is running on"), "{err}");
    assert_eq!(s.create(json!({})).await["status"], "running");
}
