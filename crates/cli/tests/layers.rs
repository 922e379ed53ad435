//! End-to-end: layered root filesystems (an overlay of each sandbox's own writes over
//! read-only layers). Sandboxes of one template share its files' page cache; fork
//! children and sandboxes made from a snapshot stand on frozen layers that outlive
//! their parent's changes and a deleted snapshot, and go with their last user.

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, post, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// Page cache charged to a sandbox's memory cgroup, bytes (cgroup v1 or v2).
fn cache_bytes(id: &str) -> u64 {
    let paths = [
        format!("/sys/fs/cgroup/memory/forkbox/{id}/memory.stat"),
        format!("/sys/fs/cgroup/forkbox/{id}/memory.stat"),
    ];
    let stat = paths
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_else(|| panic!("no memory.stat for {id}"));
    stat.lines()
        .find_map(|l| l.strip_prefix("cache ").or_else(|| l.strip_prefix("file ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

fn chain(pool: &Path, id: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(pool.join("sandboxes").join(format!("{id}.lower")))
        .unwrap_or_else(|e| panic!("chain of {id}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn layers_of(pool: &Path) -> Vec<String> {
    std::fs::read_dir(pool.join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

async fn eventually_gone(p: &Path) {
    for _ in 0..100 {
        if !p.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} is still there", p.display());
}

#[tokio::test]
async fn sandboxes_of_a_template_share_its_page_cache_and_write_only_their_own_layer() {
    let s = Server::start();
    let a = s.create_id().await;
    let b = s.create_id().await;
    // The root stands on the template; the sandbox's own writes (and deletions, as
    // whiteouts) land in its upper directory only.
    let c = chain(&s.pool, &a);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0]["kind"], "template");
    let template = s
        .pool
        .join("templates")
        .join(c[0]["name"].as_str().unwrap());
    s.sh(&a, "echo mine > /root/own && rm /etc/issue").await;
    let upper = s.pool.join("sandboxes").join(&a).join("upper");
    assert_eq!(
        std::fs::read_to_string(upper.join("root/own")).unwrap(),
        "mine\n"
    );
    assert!(
        template.join("etc/issue").exists(),
        "the template lost a file"
    );
    assert!(!template.join("root/own").exists());
    assert_eq!(
        s.sh(&b, "cat /etc/issue >/dev/null && echo there").await.0,
        "there\n"
    );
    assert_eq!(
        s.sh(&a, "test -e /etc/issue || echo gone").await.0,
        "gone\n"
    );
    // No host path shows in the sandbox's mount table.
    let (mounts, _, _) = s.sh(&a, "cat /proc/self/mountinfo").await;
    assert!(!mounts.contains(&*s.pool.to_string_lossy()), "{mounts}");
    // A big file of the template, read by `a` first: `b` reading it again is served
    // from the page cache `a` filled, not charged again (a copy of the template per
    // sandbox charged it to each).
    let big = "$(readlink -f $(command -v python3))";
    let (size, _, code) = s
        .sh(&a, &format!("stat -c %s {big} && cat {big} >/dev/null"))
        .await;
    assert_eq!(code, 0);
    let size: u64 = size.trim().parse().unwrap();
    assert!(size > 2 << 20, "python3 is only {size} bytes");
    let before = cache_bytes(&b);
    assert_eq!(s.sh(&b, &format!("cat {big} >/dev/null")).await.2, 0);
    let charged = cache_bytes(&b).saturating_sub(before);
    assert!(
        charged < size / 2,
        "b was charged {charged} bytes for reading a {size}-byte template file a had read"
    );
    for id in [&a, &b] {
        assert_eq!(s.delete(id).await, 204);
        assert!(!s
            .pool
            .join("sandboxes")
            .join(format!("{id}.lower"))
            .exists());
    }
}

#[tokio::test]
async fn fork_children_and_snapshots_stand_on_frozen_layers_that_go_with_their_last_user() {
    let s = Server::start();
    let p = s.create_id().await;
    s.sh(&p, "echo before > /root/state").await;
    let (st, forked) = post(&s, &format!("/v1/sandboxes/{p}/fork"), json!({"n": 2})).await;
    assert_eq!(st, 200, "{forked}");
    let kids: Vec<String> = forked["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    // Each child stands on one frozen layer of the parent, over the parent's own.
    let c = chain(&s.pool, &kids[0]);
    assert_eq!(c.len(), 2, "{c:?}");
    assert_eq!(
        (c[0]["kind"].as_str(), c[0]["upper"].as_bool()),
        (Some("layer"), Some(true))
    );
    assert_eq!(c[1], chain(&s.pool, &p)[0]);
    assert_eq!(c, chain(&s.pool, &kids[1]));
    let layer = s.pool.join("layers").join(c[0]["id"].as_str().unwrap());
    assert!(layer.exists());
    // The parent's later changes do not reach the children, nor theirs each other.
    s.sh(&p, "rm /root/state").await;
    s.sh(&kids[0], "echo k0 > /root/state").await;
    assert_eq!(s.sh(&kids[1], "cat /root/state").await.0, "before\n");
    assert_eq!(s.sh(&kids[0], "cat /root/state").await.0, "k0\n");
    // A snapshot of a child, and a sandbox made from it, which outlives the snapshot.
    let (st, snap) = post(
        &s,
        &format!("/v1/sandboxes/{}/snapshot", kids[0]),
        json!({"name": "k0"}),
    )
    .await;
    assert_eq!(st, 201, "{snap}");
    let snap = snap["id"].as_str().unwrap().to_owned();
    let (st, made) = post(&s, "/v1/sandboxes", json!({"snapshot": snap})).await;
    assert_eq!(st, 201, "{made}");
    let m = made["id"].as_str().unwrap().to_owned();
    let mc = chain(&s.pool, &m);
    assert_eq!(mc.len(), 3, "{mc:?}");
    assert_eq!(mc[0]["kind"], "snapshot");
    assert_eq!(mc[1..], c[..]);
    assert_eq!(s.delete_at(&format!("/v1/snapshots/{snap}")).await, 204);
    // Every sandbox of the family goes but the one made from the snapshot: the layers
    // it stands on stay, and it still hibernates and wakes with its files.
    for id in [&kids[0], &kids[1], &p] {
        assert_eq!(s.delete(id).await, 204, "{id}");
    }
    assert!(layer.exists(), "a layer a live sandbox stands on went");
    assert!(
        layers_of(&s.pool).contains(&snap),
        "{:?}",
        layers_of(&s.pool)
    );
    let (st, body) = post(&s, &format!("/v1/sandboxes/{m}/hibernate"), json!({})).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = post(&s, &format!("/v1/sandboxes/{m}/wake"), json!({})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        get(&s, &format!("/v1/sandboxes/{m}")).await.1["status"],
        "running"
    );
    assert_eq!(s.sh(&m, "cat /root/state").await.0, "k0\n");
    // The last user gone, so are its layers.
    assert_eq!(s.delete(&m).await, 204);
    eventually_gone(&layer).await;
    eventually_gone(&s.pool.join("layers").join(&snap)).await;
}

#[tokio::test]
async fn a_deleted_snapshot_takes_the_layers_only_it_stood_on() {
    let s = Server::start();
    let p = s.create_id().await;
    s.sh(&p, "head -c 1048576 /dev/urandom > /root/blob").await;
    let (st, forked) = post(&s, &format!("/v1/sandboxes/{p}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{forked}");
    let c = forked["children"][0].as_str().unwrap().to_owned();
    let layer = s
        .pool
        .join("layers")
        .join(chain(&s.pool, &c)[0]["id"].as_str().unwrap());
    let (st, snap) = post(
        &s,
        &format!("/v1/sandboxes/{c}/snapshot"),
        json!({"name": "c"}),
    )
    .await;
    assert_eq!(st, 201, "{snap}");
    let snap = snap["id"].as_str().unwrap().to_owned();
    // The sandboxes go; the snapshot still stands on the fork layer.
    for id in [&c, &p] {
        assert_eq!(s.delete(id).await, 204);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        layer.exists(),
        "the snapshot's layer went with the sandboxes"
    );
    // The snapshot goes: nothing stands on the fork layer any more.
    assert_eq!(s.delete_at(&format!("/v1/snapshots/{snap}")).await, 204);
    eventually_gone(&layer).await;
    assert!(!s.pool.join("layers").join(&snap).exists());
}
