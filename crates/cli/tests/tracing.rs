//! End-to-end: W3C trace context given at creation or per request shows up in the
//! server's log lines for that work.

#![allow(clippy::unwrap_used)]

mod common;

use common::{post, py, Server};
use serde_json::json;

#[tokio::test]
async fn log_lines_carry_the_callers_trace_ids() {
    // No warm pool: a pool sandbox is created (and logged) before any request, so the
    // create must be a cold one for its "sandbox created" line to be the request's.
    let (s, log) = Server::start_logged_with(&[("FORKBOX_WARM_POOL", "0".into())]);
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

#[tokio::test]
async fn spans_are_exported_over_otlp_under_the_callers_trace() {
    use std::sync::{Arc, Mutex};
    // A tiny OTLP/HTTP collector: keeps every body posted to /v1/traces.
    let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: String| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push(body);
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (s, _log) = Server::start_logged_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        // A cold create, so that its phases are spans too.
        ("FORKBOX_WARM_POOL", "0".into()),
    ]);
    let trace = "5bf92f3564d486ad4bf92f3564d486ae";
    let span = "10f067aa0ba902b8";
    let (st, b) = post(
        &s,
        "/v1/sandboxes",
        json!({ "traceparent": format!("00-{trace}-{span}-01") }),
    )
    .await;
    assert_eq!(st, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    assert_eq!(s.sh(&id, "true").await.2, 0);
    let mut found = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let all = bodies.lock().unwrap().join("\n");
        if all.contains(trace) && all.contains(span) {
            found = true;
            break;
        }
    }
    assert!(
        found,
        "no exported span with the caller's trace and parent span ids: {:?}",
        bodies.lock().unwrap()
    );
    // Where the milliseconds of a create and of a fork go: a span per phase.
    assert_eq!(py(&s, &id, "x = 1").await.2, 0);
    let (st, b) = post(&s, &format!("/v1/sandboxes/{id}/fork"), json!({"n": 2})).await;
    assert_eq!(st, 200, "{b}");
    let phases = [
        "create.rootfs_and_cgroup",
        "create.jail_init",
        "create.agent_ready",
        "fork.snapshot",
        "fork.start_children",
        "fork.carry_python",
    ];
    let mut missing = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let all = bodies.lock().unwrap().join("\n");
        missing = phases
            .iter()
            .filter(|p| !all.contains(&format!("\"{p}\"")))
            .collect::<Vec<_>>();
        if missing.is_empty() {
            break;
        }
    }
    assert!(
        missing.is_empty(),
        "phases not exported as spans: {missing:?}"
    );
    for c in b["children"].as_array().unwrap() {
        assert_eq!(s.delete(c.as_str().unwrap()).await, 204);
    }
    assert_eq!(s.delete(&id).await, 204);
}
