//! End-to-end on PostgreSQL: a server whose store is a PostgreSQL database
//! (`--database`, here `FORKBOX_DATABASE_URL`) does what a server on SQLite does —
//! create, exec, list — keeps its sandboxes across a SIGKILL and restart, and keeps a
//! second server with its node name off. Several nodes: `cluster.rs`. Runs when `FORKBOX_TEST_DATABASE_URL` names
//! a PostgreSQL server (`scripts/with-postgres.sh`, as `make test` does).

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, Server};
use serde_json::json;
use std::process::Command;

#[tokio::test]
async fn a_server_on_postgres_works_restarts_and_owns_its_database() {
    let Some(url) = common::postgres_database() else {
        return;
    };
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
