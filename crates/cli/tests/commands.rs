//! End-to-end: background commands (start, list, stdin, signal, wait, reconnect).

#![allow(clippy::unwrap_used)]

mod common;

use common::{collect, get, get_text, post, Server};
use serde_json::{json, Value};

async fn output(s: &Server, id: &str, pid: i64, follow: bool) -> Vec<Value> {
    let path = format!(
        "/v1/sandboxes/{id}/commands/{pid}/output?follow={}",
        u8::from(follow)
    );
    get_text(s, &path)
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn background_commands_run_detached_and_can_be_driven() {
    let s = Server::start();
    let id = s.create_id().await;
    drive_background_commands(&s, &id).await;
}

/// The same in a vm sandbox (see `vm.rs`; run by `make test-vm`).
#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn background_commands_run_detached_and_can_be_driven_vm() {
    let (s, _log) = Server::start_logged_with(&common::vm_env());
    let id = s.create(json!({"runtime": "vm"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    drive_background_commands(&s, &id).await;
}

async fn drive_background_commands(s: &Server, id: &str) {
    // Start: the answer comes at once with the pid.
    let t = std::time::Instant::now();
    let (st, cat) = post(
        s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "echo ready; cat; echo done >&2; exit 7", "background": true}),
    )
    .await;
    assert_eq!(st, 200, "{cat}");
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    let pid = cat["pid"].as_i64().unwrap();
    assert_eq!(cat["running"], true);
    // Listed; output so far is kept (no exit yet).
    let (_, list) = get(s, &format!("/v1/sandboxes/{id}/commands")).await;
    assert!(list["commands"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["pid"] == json!(pid)));
    let mut so_far = Vec::new();
    for _ in 0..50 {
        so_far = output(s, id, pid, false).await;
        if !so_far.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(so_far[0]["data"], "ready\n");
    assert!(so_far.iter().all(|e| e["type"] != "exit"));
    // Stdin, then end of file: cat echoes and exits.
    let st = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/commands/{pid}/stdin")))
        .json(&json!({"data": "hello from stdin\n", "close": true}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 204);
    let (st, w) = get(s, &format!("/v1/sandboxes/{id}/commands/{pid}/wait")).await;
    assert_eq!((st, w["exit_code"].as_i64()), (200, Some(7)));
    // Reconnecting replays everything, ending with the exit event.
    let all = output(s, id, pid, true).await;
    let (out, err, code) = collect(&all);
    assert_eq!(
        (out.as_str(), err.as_str(), code),
        ("ready\nhello from stdin\n", "done\n", 7)
    );
    let (st, _) = post(
        s,
        &format!("/v1/sandboxes/{id}/commands/{pid}/stdin"),
        json!({"data": "x"}),
    )
    .await;
    assert_eq!(st, 409, "stdin of an exited command");
    // A follower sees output as it happens; a signal ends the command.
    let (_, sleeper) = post(
        s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "trap 'echo got-term; exit 143' TERM; echo up; while :; do sleep 0.1; done", "background": true}),
    )
    .await;
    let spid = sleeper["pid"].as_i64().unwrap();
    let follow = {
        let url = s.url(&format!(
            "/v1/sandboxes/{id}/commands/{spid}/output?follow=1"
        ));
        let http = s.http.clone();
        tokio::spawn(async move { http.get(url).send().await.unwrap().text().await.unwrap() })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let st = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/commands/{spid}/signal")))
        .json(&json!({"signal": "SIGTERM"}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 204);
    let text = tokio::time::timeout(std::time::Duration::from_secs(10), follow)
        .await
        .unwrap()
        .unwrap();
    let evs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (out, _, code) = collect(&evs);
    assert_eq!((out.as_str(), code), ("up\ngot-term\n", 143));
    // DELETE kills; the command's whole group goes.
    let (_, k) = post(
        s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "sleep 1000 & sleep 1000", "background": true}),
    )
    .await;
    let kpid = k["pid"].as_i64().unwrap();
    let st = s
        .http
        .delete(s.url(&format!("/v1/sandboxes/{id}/commands/{kpid}")))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 204);
    let (_, w) = get(s, &format!("/v1/sandboxes/{id}/commands/{kpid}/wait")).await;
    assert_eq!(w["exit_code"], 137);
    assert_eq!(s.sh(id, "pgrep -c sleep || true").await.0.trim(), "0");
    // Errors.
    let (st, e) = get(s, &format!("/v1/sandboxes/{id}/commands/99999/wait")).await;
    assert_eq!((st, e["code"].as_str()), (404, Some("process_not_found")));
    assert!(e["error"].as_str().unwrap().contains("99999"), "{e}");
    let (st, _) = get(s, &format!("/v1/sandboxes/{id}/commands/abc/wait")).await;
    assert_eq!(st, 400);
    let (st, _) = post(
        s,
        &format!("/v1/sandboxes/{id}/commands/{kpid}/signal"),
        json!({"signal": "SIGNOPE"}),
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = post(
        s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"code": "1", "background": true}),
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = post(
        s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "true", "background": true, "wait": true}),
    )
    .await;
    assert_eq!(st, 400);
    // Paused: starting is a 409.
    assert_eq!(
        post(s, &format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await
            .0,
        200
    );
    let (st, _) = post(
        s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "true", "background": true}),
    )
    .await;
    assert_eq!(st, 409);
    assert_eq!(s.delete(id).await, 204);
    let (st, _) = get(s, &format!("/v1/sandboxes/{id}/commands")).await;
    assert_eq!(st, 410);
}
