//! End-to-end: fork children share the parent's REPL memory copy-on-write. Alone in its
//! test binary so no other test moves the host's memory figures meanwhile.

#![allow(clippy::unwrap_used)]

mod common;

use common::{collect, Server};
use serde_json::json;

/// Host memory in use (MemTotal - MemAvailable), in MiB.
fn used_mib() -> f64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap()
    };
    (field("MemTotal:") - field("MemAvailable:")) / 1024.0
}

#[tokio::test]
async fn eight_children_of_a_200_mb_repl_cost_far_less_than_eight_copies() {
    let s = Server::start();
    let id = s.create(json!({"memory_mb": 1024})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, events) = s
        .exec(
            &id,
            json!({"code": "blob = [bytes(1000) for _ in range(200_000)]\nlen(blob)"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(collect(&events).0, "200000\n");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let before = used_mib();
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/fork")))
        .json(&json!({"n": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["carried"], json!(["filesystem", "python"]));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let grew = used_mib() - before;
    eprintln!("8 children of a ~200 MB REPL raised host memory use by {grew:.0} MiB");
    // Eight private copies would be ~1600 MiB; sharing leaves page tables, agents and
    // the pages the copies touched. Generous bound: a quarter of the copies.
    assert!(grew < 400.0, "host memory grew by {grew:.0} MiB");
    for c in body["children"].as_array().unwrap() {
        let c = c.as_str().unwrap();
        let (_, events) = s.exec(c, json!({"code": "len(blob)"})).await;
        assert_eq!(collect(&events).0, "200000\n", "{c}");
        assert_eq!(s.delete(c).await, 204);
    }
    assert_eq!(s.delete(&id).await, 204);
}
