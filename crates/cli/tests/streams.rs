//! End-to-end: Server-Sent Event streams (exec/stream and lifecycle events).

#![allow(clippy::unwrap_used)]

mod common;

use common::Server;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Reads SSE messages from `r` until `stop` says so or the stream ends; returns
/// `(event, data)` pairs and when each arrived.
async fn read_sse(
    r: &mut reqwest::Response,
    mut stop: impl FnMut(&str, &Value) -> bool,
) -> Vec<(String, Value, Instant)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), r.chunk())
        .await
        .expect("stream stalled")
        .unwrap()
    {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let msg: String = buf.drain(..end + 2).collect();
            let (mut event, mut data) = (String::from("message"), String::new());
            for line in msg.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue; // keep-alive comment
            }
            let v: Value = serde_json::from_str(&data).unwrap();
            let done = stop(&event, &v);
            out.push((event, v, Instant::now()));
            if done {
                return out;
            }
        }
    }
    out
}

#[tokio::test]
async fn exec_stream_sends_server_sent_events_as_output_happens() {
    let s = Server::start();
    let id = s.create_id().await;
    let t = Instant::now();
    let mut r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec/stream")))
        .json(&json!({"cmd": "echo a; sleep 1; echo b >&2; exit 3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let evs = read_sse(&mut r, |e, _| e == "exit").await;
    let kinds: Vec<&str> = evs.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(kinds, ["stdout", "stderr", "exit"]);
    assert_eq!(evs[0].1["data"], "a\n");
    assert_eq!(evs[1].1["data"], "b\n");
    assert_eq!(evs[2].1["data"], 3);
    assert!(
        evs[0].2 - t < Duration::from_millis(800),
        "first line came late"
    );
    // Cells stream too; bad bodies are JSON errors.
    let mut r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec/stream")))
        .json(&json!({"code": "print(6 * 7)"}))
        .send()
        .await
        .unwrap();
    let evs = read_sse(&mut r, |e, _| e == "exit").await;
    assert_eq!(evs[0].1["data"], "42\n");
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec/stream")))
        .json(&json!({"cmd": "true", "wait": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(s.delete(&id).await, 204);
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec/stream")))
        .json(&json!({"cmd": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
}

#[tokio::test]
async fn lifecycle_events_tail_and_follow() {
    let s = Server::start();
    let id = s.create_id().await;
    let post = |path: String| {
        let http = s.http.clone();
        let url = s.url(&path);
        async move { http.post(url).json(&json!({})).send().await.unwrap() }
    };
    // Follow from the start: the stream ends after the sandbox does.
    let mut follow = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/events?follow=1")))
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    assert_eq!(
        post(format!("/v1/sandboxes/{id}/pause")).await.status(),
        200
    );
    assert_eq!(
        post(format!("/v1/sandboxes/{id}/resume")).await.status(),
        200
    );
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/fork")))
        .json(&json!({"n": 1}))
        .send()
        .await
        .unwrap();
    let child = r.json::<Value>().await.unwrap()["children"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(s.delete(&id).await, 204);
    let seen = read_sse(&mut follow, |_, _| false).await;
    let kinds: Vec<&str> = seen.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(kinds, ["created", "paused", "resumed", "forked", "deleted"]);
    assert_eq!(seen[3].1["detail"]["children"], json!([child]));
    assert!(seen
        .windows(2)
        .all(|w| w[0].1["seq"].as_u64() < w[1].1["seq"].as_u64()));
    // Tail of an ended sandbox, without follow.
    let mut r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/events?tail=2")))
        .send()
        .await
        .unwrap();
    let tail = read_sse(&mut r, |_, _| false).await;
    let kinds: Vec<&str> = tail.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(kinds, ["forked", "deleted"]);
    // The child's history starts with its creation from the parent.
    let mut r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{child}/events")))
        .send()
        .await
        .unwrap();
    let c = read_sse(&mut r, |_, _| false).await;
    assert_eq!(c[0].0, "created");
    assert_eq!(c[0].1["detail"]["parent"], json!(id));
    // Errors.
    let r = s
        .http
        .get(s.url("/v1/sandboxes/sbx-nope/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{child}/events?follow=maybe")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(s.delete(&child).await, 204);
}

#[tokio::test]
async fn an_sse_flood_keeps_server_memory_bounded() {
    let s = Server::start();
    let id = s
        .flood(
            "exec/stream",
            "head -c 100M /dev/zero | tr '\\0' x",
            None,
            100 << 20,
        )
        .await;
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn an_sse_flood_of_tiny_lines_stays_bounded() {
    let s = Server::start();
    let id = s
        .flood("exec/stream", "yes | head -c 2G", Some(40 << 20), 40 << 20)
        .await;
    s.assert_gone(&id, "yes").await;
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn file_watch_streams_changes_as_they_happen() {
    let s = Server::start();
    let id = s.create_id().await;
    s.sh(&id, "mkdir -p /root/w").await;
    let mut r = s
        .http
        .get(s.url(&format!(
            "/v1/sandboxes/{id}/files/watch?path=/root/w&recursive=1"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.sh(
        &id,
        "echo 1 > /root/w/a && mkdir /root/w/sub && sleep 0.2 && echo 2 > /root/w/sub/b && rm /root/w/a",
    )
    .await;
    let evs = read_sse(&mut r, |e, v| e == "delete" && v["path"] == "/root/w/a").await;
    let seen: Vec<(String, String)> = evs
        .iter()
        .map(|(e, v, _)| (e.clone(), v["path"].as_str().unwrap_or_default().to_owned()))
        .collect();
    for want in [
        ("create", "/root/w/a"),
        ("modify", "/root/w/a"),
        ("create", "/root/w/sub"),
        ("create", "/root/w/sub/b"),
        ("delete", "/root/w/a"),
    ] {
        assert!(
            seen.iter().any(|(e, p)| e == want.0 && p == want.1),
            "{want:?} not in {seen:?}"
        );
    }
    assert!(evs
        .iter()
        .any(|(_, v, _)| v["path"] == "/root/w/sub" && v["is_dir"] == true));
    drop(r);
    // Errors.
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files/watch?path=/root/nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files/watch?path=../etc")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn the_sandbox_log_is_readable_and_followable() {
    let s = Server::start();
    let id = s.create_id().await;
    s.sh(&id, "echo first").await;
    let mut r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/logs")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    while let Some(c) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(text.contains("ready (pid 1"), "{text}");
    assert!(text.contains(": echo first"), "{text}");
    // Following shows new lines as they are written.
    let mut r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/logs?follow=1")))
        .send()
        .await
        .unwrap();
    s.sh(&id, "echo second-marker").await;
    let mut text = String::new();
    while !text.contains("second-marker") {
        let c = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("log follow stalled")
            .unwrap()
            .expect("log stream ended");
        text.push_str(&String::from_utf8_lossy(&c));
    }
    drop(r);
    let r = s
        .http
        .get(s.url("/v1/sandboxes/sbx-nope/logs"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(s.delete(&id).await, 204);
}
