//! The HTTP layer in isolation: core's fake runtime (`forkbox_core::testing`) behind the real router and the real
//! manager/store, driven with `oneshot`. This proves translation and error mapping
//! only; the real runtime is proven by the end-to-end suite.

#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use forkbox_api::{app, AppState};
use forkbox_core::store::Store;
use forkbox_core::testing::{Fake, FakeRuntime};
use forkbox_core::{Manager, ManagerConfig};
use http_body_util::BodyExt;
use std::sync::Arc;
use tower::ServiceExt;

async fn router() -> (axum::Router, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
    let m = Manager::new(
        store,
        Arc::new(Fake(FakeRuntime::new())),
        ManagerConfig::default(),
    );
    (
        app(AppState {
            manager: m,
            auth_required: false,
            browser: forkbox_api::browser::BrowserPolicy::new(true, vec![], vec![]),
            replay: Default::default(),
            terminals: Default::default(),
            previews: Default::default(),
        }),
        dir,
    )
}

async fn call(r: &axum::Router, method: &str, uri: &str, body: &str) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[tokio::test]
async fn errors_are_json_with_a_stable_code() {
    let (r, _d) = router().await;
    let (st, b) = call(&r, "GET", "/v1/nope", "").await;
    assert_eq!(
        (st, json(&b)["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_route"))
    );
    let (st, b) = call(&r, "PUT", "/v1/sandboxes", "{}").await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert!(json(&b)["error"].is_string());
    let (st, b) = call(&r, "POST", "/v1/sandboxes", "{\"cpu\": \"many\"}").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(json(&b)["code"], "invalid_request");
    let (st, _) = call(&r, "POST", "/v1/sandboxes", "{\"unknown_field\": 1}").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, b) = call(&r, "POST", "/v1/sandboxes", "{\"template\": \"../../etc\"}").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");
    let (st, b) = call(&r, "POST", "/v1/sandboxes", "{\"template\": \"ruby\"}").await;
    assert_eq!(
        (st, json(&b)["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unknown_template"))
    );
    for bad in [
        "{\"timeout\": 0}",
        "{\"cpu\": 0}",
        "{\"cpu\": 1000}",
        "{\"memory_mb\": 99999999}",
        "{\"env\": {\"A=B\": \"x\"}}",
    ] {
        let (st, b) = call(&r, "POST", "/v1/sandboxes", bad).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad} → {b}");
    }
    let big = format!("{{\"metadata\": {{\"k\": \"{}\"}}}}", "x".repeat(11 << 20));
    let (st, b) = call(&r, "POST", "/v1/sandboxes", &big).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    assert_eq!(json(&b)["code"], "body_too_large");
    let (st, b) = call(
        &r,
        "POST",
        "/v1/sandboxes/sbx-0000000000000000/exec",
        "{\"cmd\":\"x\"}",
    )
    .await;
    assert_eq!(
        (st, json(&b)["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

#[tokio::test]
async fn undecodable_paths_are_json_errors() {
    let (r, _d) = router().await;
    let (st, b) = call(&r, "POST", "/v1/sandboxes", "{}").await;
    let id = json(&b)["id"].as_str().unwrap().to_owned();
    assert_eq!(st, StatusCode::CREATED);
    for (uri, status) in [
        ("/v1/sandboxes/%FF".to_owned(), StatusCode::NOT_FOUND),
        ("/v1/templates/%FF".to_owned(), StatusCode::BAD_REQUEST),
        ("/v1/templates/%FF/log".to_owned(), StatusCode::BAD_REQUEST),
        ("/v1/volumes/%FF%FE".to_owned(), StatusCode::BAD_REQUEST),
        ("/api/v1/languages/%C3".to_owned(), StatusCode::BAD_REQUEST),
        (
            format!("/v1/sandboxes/{id}/commands/%FF/wait"),
            StatusCode::NOT_FOUND,
        ),
        (
            "/pandastack/v1/volumes/%FF".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (st, b) = call(&r, "GET", &uri, "").await;
        assert_eq!(st, status, "{uri}: {b}");
        let v: serde_json::Value =
            serde_json::from_str(&b).unwrap_or_else(|_| panic!("{uri}: not JSON: {b}"));
        assert!(
            v["error"].is_string() && v["code"].is_string(),
            "{uri}: {v}"
        );
    }
}

#[tokio::test]
async fn exec_streams_numbered_ndjson_and_always_ends_with_exit() {
    let (r, _d) = router().await;
    let (st, b) = call(&r, "POST", "/v1/sandboxes", "").await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let id = json(&b)["id"].as_str().unwrap().to_owned();
    let (st, b) = call(
        &r,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        "{\"cmd\":\"hello\"}",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let lines: Vec<serde_json::Value> = b.lines().map(json).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["type"], "stdout");
    assert_eq!(lines[0]["data"], "hello\n");
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[1]["type"], "exit");
    assert_eq!(lines[1]["data"], 0);
    assert_eq!(lines[1]["seq"], 2);
    // An agent that vanishes still produces an exit event.
    let (_, b) = call(
        &r,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        "{\"cmd\":\"die\"}",
    )
    .await;
    let lines: Vec<serde_json::Value> = b.lines().map(json).collect();
    assert_eq!(lines.last().unwrap()["type"], "exit");
    assert_eq!(lines.last().unwrap()["data"], -1);
    assert!(lines.iter().any(|l| l["type"] == "stderr"));
    // Empty and conflicting exec bodies.
    for bad in [
        "{}",
        "{\"cmd\":\"\"}",
        "{\"cmd\":\"a\",\"code\":\"b\"}",
        "{\"cmd\":\"a\",\"timeout\":-1}",
    ] {
        let (st, _) = call(&r, "POST", &format!("/v1/sandboxes/{id}/exec"), bad).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (st, _) = call(&r, "DELETE", &format!("/v1/sandboxes/{id}"), "").await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, b) = call(
        &r,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        "{\"cmd\":\"x\"}",
    )
    .await;
    assert_eq!(
        (st, json(&b)["code"].as_str()),
        (StatusCode::GONE, Some("gone"))
    );
    let (st, b) = call(&r, "GET", "/v1/healthz", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&b)["status"], "ok");
    let (st, b) = call(&r, "GET", "/health", "").await;
    assert_eq!(
        (st, json(&b)["status"].as_str()),
        (StatusCode::OK, Some("healthy"))
    );
}

#[tokio::test]
async fn every_route_is_in_the_openapi_document_and_served() {
    let (r, _d) = router().await;
    let (st, b) = call(&r, "GET", "/openapi.json", "").await;
    assert_eq!(st, StatusCode::OK);
    let doc = json(&b);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    // Every route the API serves (kept by hand; a route missing here or in the
    // document fails the test).
    let expected = [
        ("GET", "/v1/healthz"),
        ("GET", "/health"),
        ("GET", "/v1/nodes"),
        ("POST", "/v1/nodes/{name}/drain"),
        ("GET", "/openapi.json"),
        ("GET", "/metrics"),
        ("POST", "/v1/sandboxes"),
        ("GET", "/v1/sandboxes"),
        ("GET", "/v1/sandboxes/{id}"),
        ("DELETE", "/v1/sandboxes/{id}"),
        ("POST", "/v1/sandboxes/{id}/exec"),
        ("POST", "/v1/sandboxes/{id}/exec/stream"),
        ("GET", "/v1/sandboxes/{id}/exec/pty"),
        ("GET", "/v1/sandboxes/{id}/lsp/{lang}"),
        ("GET", "/v1/sandboxes/{id}/ports"),
        ("POST", "/v1/sandboxes/{id}/previews"),
        ("POST", "/v1/sandboxes/{id}/contexts"),
        ("DELETE", "/v1/sandboxes/{id}/contexts/{ctx}"),
        ("POST", "/v1/sandboxes/{id}/contexts/{ctx}/run"),
        ("GET", "/v1/sandboxes/{id}/events"),
        ("GET", "/v1/sandboxes/{id}/logs"),
        ("GET", "/v1/sandboxes/{id}/commands"),
        ("DELETE", "/v1/sandboxes/{id}/commands/{pid}"),
        ("POST", "/v1/sandboxes/{id}/commands/{pid}/stdin"),
        ("POST", "/v1/sandboxes/{id}/commands/{pid}/signal"),
        ("GET", "/v1/sandboxes/{id}/commands/{pid}/wait"),
        ("GET", "/v1/sandboxes/{id}/commands/{pid}/output"),
        ("POST", "/v1/sandboxes/{id}/timeout"),
        ("PATCH", "/v1/sandboxes/{id}/timeout"),
        ("POST", "/v1/sandboxes/{id}/pause"),
        ("POST", "/v1/sandboxes/{id}/resume"),
        ("POST", "/v1/sandboxes/{id}/hibernate"),
        ("POST", "/v1/sandboxes/{id}/wake"),
        ("POST", "/v1/sandboxes/{id}/fork"),
        ("POST", "/v1/sandboxes/{id}/merge_into/{winner}"),
        ("POST", "/v1/sandboxes/{id}/snapshot"),
        ("GET", "/v1/snapshots"),
        ("GET", "/v1/snapshots/{id}"),
        ("DELETE", "/v1/snapshots/{id}"),
        ("GET", "/v1/sandboxes/{id}/files"),
        ("PUT", "/v1/sandboxes/{id}/files"),
        ("DELETE", "/v1/sandboxes/{id}/files"),
        ("GET", "/v1/sandboxes/{id}/files/raw"),
        ("PUT", "/v1/sandboxes/{id}/files/raw"),
        ("GET", "/v1/sandboxes/{id}/files/ls"),
        ("GET", "/v1/sandboxes/{id}/files/stat"),
        ("GET", "/v1/sandboxes/{id}/files/watch"),
        ("POST", "/v1/sandboxes/{id}/files/mkdir"),
        ("POST", "/v1/sandboxes/{id}/files/rename"),
        ("POST", "/v1/volumes"),
        ("GET", "/v1/volumes"),
        ("GET", "/v1/volumes/{id}"),
        ("DELETE", "/v1/volumes/{id}"),
        ("GET", "/api/v1/languages"),
        ("GET", "/api/v1/languages/{lang}"),
        ("POST", "/api/v1/execute"),
        ("GET", "/api/v1/rootfs"),
        ("POST", "/api/v1/rootfs"),
        ("GET", "/api/v1/snapshots"),
        ("POST", "/api/v1/snapshots"),
        ("POST", "/v1/templates"),
        ("GET", "/v1/templates"),
        ("GET", "/v1/templates/{name}"),
        ("DELETE", "/v1/templates/{name}"),
        ("GET", "/v1/templates/{name}/log"),
        ("GET", "/v1/templates/{name}/build"),
        ("POST", "/v1/templates/{name}/image"),
        ("GET", "/v1/events"),
        ("GET", "/v1/auth/whoami"),
        ("GET", "/v1/auth/tokens"),
        ("POST", "/v1/auth/tokens"),
        ("DELETE", "/v1/auth/tokens/{id}"),
        ("GET", "/v1/auth/workspaces/{name}"),
        ("PUT", "/v1/auth/workspaces/{name}"),
    ];
    let mut documented = 0;
    for (path, ops) in paths {
        for m in ops.as_object().unwrap().keys() {
            documented += 1;
            assert!(
                expected.contains(&(m.to_uppercase().as_str(), path.as_str())),
                "{m} {path} is documented but not expected"
            );
        }
    }
    assert_eq!(documented, expected.len(), "documented operations");
    // And the router serves each of them (no `no_route` / `method_not_allowed`).
    for (m, p) in expected {
        let uri = p
            .replace("{id}", "sbx-nope")
            .replace("{child}", "sbx-nope")
            .replace("{parent}", "sbx-nope2")
            .replace("{pid}", "7");
        let (st, b) = call(&r, m, &uri, "").await;
        let code = serde_json::from_str::<serde_json::Value>(&b)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        assert!(
            code != "no_route"
                && code != "method_not_allowed"
                && st != StatusCode::METHOD_NOT_ALLOWED,
            "{m} {p} is not served: {st} {b}"
        );
    }
}
