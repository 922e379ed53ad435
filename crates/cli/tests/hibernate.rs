//! End-to-end: hibernate/wake, expiry that hibernates, and named snapshots.

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, post, py, Server};
use serde_json::json;

#[tokio::test]
async fn hibernate_keeps_files_frees_processes_and_wake_starts_again() {
    let s = Server::start();
    let id = s.create_id().await;
    s.sh(&id, "echo kept > /root/f").await;
    py(&s, &id, "x = 1").await;
    let (st, body) = post(&s, &format!("/v1/sandboxes/{id}/hibernate"), json!({})).await;
    assert_eq!(
        (st, body["status"].as_str()),
        (200, Some("hibernated")),
        "{body}"
    );
    // It still exists, keeps its filesystem, runs nothing.
    let (st, body) = get(&s, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!((st, body["status"].as_str()), (200, Some("hibernated")));
    assert!(s
        .pool
        .join("sandboxes")
        .join(&id)
        .join("upper/root/f")
        .exists());
    assert!(
        !s.data.path().join("run").join(&id).exists(),
        "its run dir is gone"
    );
    let (_, list) = get(&s, "/v1/sandboxes").await;
    assert!(list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == json!(id)));
    // Wrong-state calls.
    let (st, _) = s.exec(&id, json!({"cmd": "true"})).await;
    assert_eq!(st, 409);
    for op in ["hibernate", "pause", "resume"] {
        let (st, body) = post(&s, &format!("/v1/sandboxes/{id}/{op}"), json!({})).await;
        assert_eq!(st, 409, "{op}: {body}");
    }
    // Wake: the filesystem is back, live memory is not (and the answer says so).
    let (st, body) = post(&s, &format!("/v1/sandboxes/{id}/wake"), json!({})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["status"], "running");
    assert_eq!(body["memory_restored"], false);
    let events = common::get_text(&s, &format!("/v1/sandboxes/{id}/events")).await;
    assert!(events.contains("\"memory_restored\":false"), "{events}");
    assert_eq!(s.sh(&id, "cat /root/f").await.0, "kept\n");
    let (_, err, code) = py(&s, &id, "x").await;
    assert_eq!(code, 1);
    assert!(err.contains("NameError"), "{err}");
    let (st, _) = post(&s, &format!("/v1/sandboxes/{id}/wake"), json!({})).await;
    assert_eq!(st, 409, "waking a running sandbox");
    // A hibernated sandbox can be deleted; everything goes.
    let (st, _) = post(&s, &format!("/v1/sandboxes/{id}/hibernate"), json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(s.delete(&id).await, 204);
    assert!(!s.pool.join("sandboxes").join(&id).exists());
    let (st, _) = post(&s, &format!("/v1/sandboxes/{id}/wake"), json!({})).await;
    assert_eq!(st, 410);
    let (st, _) = post(&s, "/v1/sandboxes/sbx-nope/wake", json!({})).await;
    assert_eq!(st, 404);
    // A fork parent with live children cannot hibernate (their namespaces hang off it).
    let p = s.create_id().await;
    let (st, body) = post(&s, &format!("/v1/sandboxes/{p}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{body}");
    let child = body["children"][0].as_str().unwrap().to_owned();
    let (st, body) = post(&s, &format!("/v1/sandboxes/{p}/hibernate"), json!({})).await;
    assert_eq!(st, 409, "{body}");
    // … but the child can, and wakes as a sandbox of its own.
    let (st, _) = post(&s, &format!("/v1/sandboxes/{child}/hibernate"), json!({})).await;
    assert_eq!(st, 200);
    let (st, _) = post(&s, &format!("/v1/sandboxes/{p}/hibernate"), json!({})).await;
    assert_eq!(st, 200);
    let (st, _) = post(&s, &format!("/v1/sandboxes/{child}/wake"), json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(s.sh(&child, "echo up").await.0, "up\n");
    assert_eq!(s.delete(&child).await, 204);
    assert_eq!(s.delete(&p).await, 204);
}

#[tokio::test]
async fn expiry_hibernates_when_asked() {
    let s = Server::start();
    let b = s
        .create(json!({"timeout": 1, "on_timeout": "hibernate"}))
        .await;
    assert_eq!(b["on_timeout"], "hibernate");
    let id = b["id"].as_str().unwrap().to_owned();
    s.sh(&id, "echo survived > /root/f").await;
    let mut status = String::new();
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        status = get(&s, &format!("/v1/sandboxes/{id}")).await.1["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if status == "hibernated" {
            break;
        }
    }
    assert_eq!(status, "hibernated");
    let (st, _) = post(&s, &format!("/v1/sandboxes/{id}/wake"), json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(s.sh(&id, "cat /root/f").await.0, "survived\n");
    let (st, body) = post(&s, "/v1/sandboxes", json!({"on_timeout": "explode"})).await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn named_snapshots_seed_new_sandboxes() {
    let s = Server::start();
    named_snapshots_seed_new_sandboxes_on(&s, json!({}), s.pool.join("snapshots")).await;
}

/// The same in the vm runtime, where a snapshot is the whole guest (`vm.rs` shows the
/// memory and processes it also carries).
#[tokio::test]
#[ignore = "needs qemu-system-x86 and `make vm-assets`; run by `make test-vm`"]
async fn named_snapshots_seed_new_sandboxes_vm() {
    let (s, _log) = Server::start_logged_with(&common::vm_env());
    let kept = s.data.path().join("vm-run/snapshots");
    named_snapshots_seed_new_sandboxes_on(&s, json!({"runtime": "vm"}), kept).await;
}

/// `base`: what every create body carries; `kept`: where the runtime keeps snapshots.
async fn named_snapshots_seed_new_sandboxes_on(
    s: &Server,
    base: serde_json::Value,
    kept: std::path::PathBuf,
) {
    let with = |extra: serde_json::Value| {
        let mut b = base.clone();
        if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        b
    };
    let runtime = base["runtime"].as_str().unwrap_or("jail");
    let a = s.create(with(json!({}))).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.sh(&a, "mkdir -p /root/proj && echo v1 > /root/proj/state")
        .await;
    let (st, snap) = post(
        s,
        &format!("/v1/sandboxes/{a}/snapshot"),
        json!({"name": "base"}),
    )
    .await;
    assert_eq!(st, 201, "{snap}");
    let snap_id = snap["id"].as_str().unwrap().to_owned();
    assert!(snap_id.starts_with("snap-"));
    assert_eq!(
        (
            snap["name"].as_str(),
            snap["sandbox_id"].as_str(),
            snap["runtime"].as_str()
        ),
        (Some("base"), Some(a.as_str()), Some(runtime))
    );
    assert!(kept.join(&snap_id).exists());
    let (_, list) = get(s, "/v1/snapshots").await;
    assert!(list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == json!(snap_id)));
    assert_eq!(get(s, &format!("/v1/snapshots/{snap_id}")).await.0, 200);
    // A sandbox made from it starts with its files; later changes on either side stay apart.
    s.sh(&a, "echo v2 > /root/proj/state").await;
    let (st, b) = post(s, "/v1/sandboxes", json!({"snapshot": snap_id})).await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["runtime"], runtime, "{b}");
    let b = b["id"].as_str().unwrap().to_owned();
    assert_eq!(s.sh(&b, "cat /root/proj/state").await.0, "v1\n");
    s.sh(&b, "echo b > /root/proj/state").await;
    assert_eq!(s.sh(&a, "cat /root/proj/state").await.0, "v2\n");
    // A paused sandbox can be snapshotted and stays paused.
    assert_eq!(
        post(s, &format!("/v1/sandboxes/{a}/pause"), json!({}))
            .await
            .0,
        200
    );
    let (st, snap2) = post(
        s,
        &format!("/v1/sandboxes/{a}/snapshot"),
        json!({"name": "paused"}),
    )
    .await;
    assert_eq!(st, 201, "{snap2}");
    assert_eq!(
        get(s, &format!("/v1/sandboxes/{a}")).await.1["status"],
        "paused"
    );
    // Errors.
    let (st, _) = post(
        s,
        &format!("/v1/sandboxes/{a}/snapshot"),
        json!({"name": ""}),
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = post(s, "/v1/sandboxes/sbx-nope/snapshot", json!({"name": "x"})).await;
    assert_eq!(st, 404);
    let (st, body) = post(s, "/v1/sandboxes", json!({"snapshot": "snap-nope"})).await;
    assert_eq!(
        (st, body["code"].as_str()),
        (404, Some("snapshot_not_found"))
    );
    // Deleting a snapshot leaves sandboxes made from it alone.
    let del = |id: String| {
        let url = s.url(&format!("/v1/snapshots/{id}"));
        let http = s.http.clone();
        async move { http.delete(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(del(snap_id.clone()).await, 204);
    assert_eq!(del(snap_id.clone()).await, 404);
    assert_eq!(del(snap2["id"].as_str().unwrap().to_owned()).await, 204);
    assert_eq!(s.sh(&b, "cat /root/proj/state").await.0, "b\n");
    assert!(!kept.join(&snap_id).exists());
    let (st, _) = post(s, "/v1/sandboxes", json!({"snapshot": snap_id})).await;
    assert_eq!(st, 404);
    assert_eq!(s.delete(&a).await, 204);
    assert_eq!(s.delete(&b).await, 204);
}
