//! End-to-end on PostgreSQL: a server whose store is a PostgreSQL database
//! (`--database`, here `FORKBOX_DATABASE_URL`) does what a server on SQLite does —
//! create, exec, list, keys — keeps its sandboxes across a SIGKILL and restart, and
//! keeps a second server off its database. Runs when `FORKBOX_TEST_DATABASE_URL` names
//! a PostgreSQL server (`scripts/with-postgres.sh`, as `make test` does).

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, Server};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use std::process::Command;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

fn database() -> Option<String> {
    match std::env::var("FORKBOX_TEST_DATABASE_URL") {
        Ok(url) => Some(url),
        Err(_) if std::env::var_os("FORKBOX_REQUIRE_POSTGRES").is_some() => {
            panic!("FORKBOX_REQUIRE_POSTGRES is set but FORKBOX_TEST_DATABASE_URL is not")
        }
        Err(_) => {
            eprintln!("skipped: no FORKBOX_TEST_DATABASE_URL");
            None
        }
    }
}

#[tokio::test]
async fn a_server_on_postgres_works_restarts_and_owns_its_database() {
    let Some(url) = database() else { return };
    let env = [("FORKBOX_DATABASE_URL", url.clone())];
    let mut s = Server::start_with(&env);
    let id = s.create_id().await;
    let (out, _, code) = s.sh(&id, "echo hi from postgres").await;
    assert_eq!((out.as_str(), code), ("hi from postgres\n", 0));
    let (st, list) = get(&s, "/v1/sandboxes").await;
    assert_eq!(st, 200);
    assert!(list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["id"] == id.as_str()));
    // A second server on the same database is refused before it serves anything.
    let other = tempfile::Builder::new()
        .prefix("forkbox-e2e-")
        .tempdir()
        .unwrap();
    let second = Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(other.path())
        .arg("--pool")
        .arg(&s.pool)
        .env("FORKBOX_DATABASE_URL", &url)
        .env("FORKBOX_LOG", "warn")
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another forkbox server"), "{err}");
    common::down(other.path(), &s.pool);
    // A second node on the same database: it sees every sandbox and every node, runs
    // its own sandboxes, and passes requests about the first node's to it — streams,
    // files, terminals and deletes included.
    let second = Server::start_with(&[
        ("FORKBOX_DATABASE_URL", url.clone()),
        ("FORKBOX_NODE", "second".into()),
    ]);
    let (st, nodes) = get(&second, "/v1/nodes").await;
    assert_eq!(st, 200);
    let nodes = nodes["nodes"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert!(nodes.iter().all(|n| n["state"] == "up"), "{nodes:?}");
    let me = nodes.iter().find(|n| n["this"] == true).unwrap();
    assert_eq!(me["name"], "second");
    assert_eq!(me["url"].as_str(), Some(second.url("").as_str()));
    let first = nodes.iter().find(|n| n["this"] == false).unwrap();
    assert_eq!(first["url"].as_str(), Some(s.url("").as_str()));
    let (_, list) = get(&second, "/v1/sandboxes").await;
    assert!(list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["id"] == id.as_str()));
    // Through the second node: a streamed exec (NDJSON, events in order), a file up
    // and back, a terminal over WebSocket.
    let (out, err, code) = second
        .sh(&id, "for i in 1 2 3; do echo line $i; done; echo oops >&2")
        .await;
    assert_eq!(
        (out.as_str(), err.as_str(), code),
        ("line 1\nline 2\nline 3\n", "oops\n", 0)
    );
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let r = second
        .http
        .put(second.url(&format!("/v1/sandboxes/{id}/files?path=/root/blob")))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let back = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files?path=/root/blob")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        back == blob,
        "the file written through the other node differs"
    );
    let ws_url = format!(
        "{}/v1/sandboxes/{id}/exec/pty?cmd=cat",
        second.base.replacen("http://", "ws://", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    ws.send(Message::Binary(b"through the other node\n".to_vec().into()))
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("through the other node") {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal through the other node: {other:?}; got {seen:?}"),
        }
    }
    drop(ws);
    // Placement: creates through the first node land on both (the one with more
    // memory left after its sandboxes' limits makes it), and none on a drained node.
    let (_, _) = get(&s, "/v1/nodes").await;
    let mut placed = Vec::new();
    for _ in 0..4 {
        let v = s.create(json!({})).await;
        placed.push((
            v["id"].as_str().unwrap().to_owned(),
            v["node"].as_str().unwrap().to_owned(),
        ));
    }
    assert!(placed.iter().any(|(_, n)| n == "second"), "{placed:?}");
    assert!(placed.iter().any(|(_, n)| n != "second"), "{placed:?}");
    let drain = Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .args(["node", "drain", "second", "--url", &s.base])
        .output()
        .unwrap();
    assert!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    assert!(String::from_utf8_lossy(&drain.stdout).contains("second"));
    for _ in 0..2 {
        let v = s.create(json!({})).await;
        assert_ne!(v["node"], "second", "placed on a draining node: {v}");
        placed.push((v["id"].as_str().unwrap().to_owned(), String::new()));
    }
    for (pid, _) in &placed {
        assert_eq!(s.delete(pid).await, 204);
    }
    // Quotas hold across nodes: with room for 3 more, 8 concurrent creates spread over
    // both nodes (and placed on both) make exactly 3.
    let (st, ws) = get(&s, "/v1/auth/workspaces/default").await;
    assert_eq!(st, 200, "{ws}");
    let used = ws["usage"]["sandboxes"].as_u64().unwrap();
    let r = s
        .http
        .put(s.url("/v1/auth/workspaces/default"))
        .json(&json!({"max_sandboxes": used + 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let creates = (0..8).map(|i| {
        let (http, url) = if i % 2 == 0 {
            (s.http.clone(), s.url("/v1/sandboxes"))
        } else {
            (second.http.clone(), second.url("/v1/sandboxes"))
        };
        async move {
            // A template outside the warm pools: cold creates, so admissions overlap.
            let r = http
                .post(url)
                .json(&json!({"template": "base"}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    });
    let results = futures_util::future::join_all(creates).await;
    let made: Vec<String> = results
        .iter()
        .filter(|(st, _)| *st == 201)
        .map(|(_, v)| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(made.len(), 3, "{results:?}");
    assert!(
        results
            .iter()
            .all(|(st, v)| *st == 201 || (*st == 429 && v["code"] == "quota_exceeded")),
        "{results:?}"
    );
    for id in &made {
        assert_eq!(s.delete(id).await, 204);
    }
    let r = s
        .http
        .put(s.url("/v1/auth/workspaces/default"))
        .json(&json!({"max_sandboxes": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A node that stays gone longer than its orphan grace: the others record its
    // sandboxes lost (meanwhile they answer 502 for them).
    let mut third = Server::start_with(&[
        ("FORKBOX_DATABASE_URL", url.clone()),
        ("FORKBOX_NODE", "third".into()),
        ("FORKBOX_ORPHAN_GRACE", "1".into()),
    ]);
    let r = third
        .http
        .post(third.url("/v1/sandboxes"))
        // Made on this node (as if another had placed it here).
        .header("x-forkbox-forwarded-by", "test")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let gone: serde_json::Value = r.json().await.unwrap();
    assert_eq!(gone["node"], "third", "{gone}");
    let gone = gone["id"].as_str().unwrap().to_owned();
    // The whole host goes: the server and its warden (which would otherwise take the
    // data dir down itself once the grace is over).
    let warden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(third.data.path().join("warden.lock")).unwrap(),
    )
    .unwrap();
    let warden = warden["pid"].as_i64().unwrap() as i32;
    let cmdline = std::fs::read(format!("/proc/{warden}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("warden"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(warden),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    third.kill();
    let (st, v) = common::post(
        &second,
        &format!("/v1/sandboxes/{gone}/exec"),
        json!({"cmd": "true", "wait": true}),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (502, Some("node_unreachable")),
        "{v}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, all) = get(&second, "/v1/sandboxes?status=all&limit=1000").await;
        let rec = all["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == gone.as_str())
            .cloned()
            .unwrap();
        if rec["status"] == "lost" {
            assert!(
                rec["end_reason"].as_str().unwrap().contains("node third"),
                "{rec}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recorded lost: {rec}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, nodes) = get(&second, "/v1/nodes").await;
    assert!(nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["name"] == "third" && n["state"] == "down"));
    drop(third);
    // The second node's own sandbox, deleted through the first.
    let theirs = second.create_id().await;
    let (out, _, _) = second.sh(&theirs, "echo second").await;
    assert_eq!(out, "second\n");
    assert_eq!(s.delete(&theirs).await, 204);
    // The first node dies: the second answers for its sandbox with 502 at once, and
    // keeps serving everything else.
    s.kill();
    let (st, v) = common::post(
        &second,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "true", "wait": true}),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (502, Some("node_unreachable")),
        "{v}"
    );
    // Creates still work through it: a node that cannot be reached is not placed on.
    for _ in 0..2 {
        let mine = second.create(json!({})).await;
        assert_eq!(mine["node"], "second", "{mine}");
        assert_eq!(second.delete(mine["id"].as_str().unwrap()).await, 204);
    }
    // Back within its grace period: it adopts its sandbox again.
    s.restart_with(&env);
    drop(second);
    // SIGKILL and restart: the new server adopts the sandbox from the database, with
    // its REPL state.
    let (st, _) = common::post(
        &s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"code": "kept = 42", "wait": true}),
    )
    .await;
    assert_eq!(st, 200);
    s.kill_and_restart_with(&env);
    let (st, v) = get(&s, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("running")), "{v}");
    let (st, r) = common::post(
        &s,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"code": "print(kept)", "wait": true}),
    )
    .await;
    assert_eq!((st, r["stdout"].as_str()), (200, Some("42\n")), "{r}");
    assert_eq!(s.delete(&id).await, 204);
    let (_, all) = get(&s, "/v1/sandboxes?status=all").await;
    let rec = all["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(rec["status"], "deleted", "{rec}");
}
