//! End-to-end: W3C trace context given at creation or per request shows up in the
//! server's log lines for that work.

#![allow(clippy::unwrap_used)]

mod common;

use common::{post, Server};
use serde_json::json;

#[tokio::test]
async fn log_lines_carry_the_callers_trace_ids() {
    let (s, log) = Server::start_logged();
    let trace = "4bf92f3564d486ad4bf92f3564d486ad";
    let span = "00f067aa0ba902b7";
    let (st, b) = post(
        &s,
        "/v1/sandboxes",
        json!({ "traceparent": format!("00-{trace}-{span}-01") }),
    )
    .await;
    assert_eq!(st, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    assert_eq!(s.sh(&id, "echo traced").await.0, "traced\n");
    let (st, _) = post(&s, &format!("/v1/sandboxes/{id}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200);
    // A per-request header works for any call.
    let other = "0af7651916cd43dd8448eb211c80319c";
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/pause")))
        .header("traceparent", format!("00-{other}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = std::fs::read_to_string(&log).unwrap();
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle) && l.contains(&id))
            .unwrap_or_else(|| panic!("no log line with {needle:?} for {id} in:\n{text}"))
            .to_owned()
    };
    for needle in ["sandbox created", "exec started", "sandbox forked"] {
        let l = line(needle);
        assert!(l.contains(trace) && l.contains(span), "{needle}: {l}");
    }
    let paused = line("sandbox state changed");
    assert!(paused.contains(other), "{paused}");
    assert_eq!(s.delete(&id).await, 204);
}
