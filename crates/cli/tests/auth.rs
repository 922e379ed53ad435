//! End-to-end: API keys, workspaces and quotas on a real server started with `--auth`.

#![allow(clippy::unwrap_used)]

mod common;

use common::Server;
use reqwest::{Method, RequestBuilder};
use serde_json::{json, Value};
use std::process::Command;

const ADMIN: &str = "fbk_test-admin-key-0123456789abcdefghijklmnop";

fn auth_server() -> Server {
    let (s, _log) = Server::start_logged_with(&[
        ("FORKBOX_AUTH", "true".into()),
        ("FORKBOX_ADMIN_KEY", ADMIN.into()),
    ]);
    s
}

/// A request to `path` with `key` as a bearer token.
fn req(s: &Server, m: Method, path: &str, key: &str) -> RequestBuilder {
    s.http.request(m, s.url(path)).bearer_auth(key)
}

async fn call(r: RequestBuilder) -> (u16, Value) {
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn new_key(s: &Server, by: &str, body: Value) -> (String, String) {
    let (st, v) = call(req(s, Method::POST, "/v1/auth/tokens", by).json(&body)).await;
    assert_eq!(st, 201, "{v}");
    (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn keys_are_required_in_three_forms_and_revocation_is_immediate() {
    let s = auth_server();
    // Health checks and the document stay open; the rest needs a key.
    for open in ["/v1/healthz", "/health", "/openapi.json"] {
        let r = s.http.get(s.url(open)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }
    let r = s.http.get(s.url("/v1/sandboxes")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "unauthorized");
    for bad in ["fbk_nope", "nope", ""] {
        let (st, v) = call(req(&s, Method::GET, "/v1/auth/whoami", bad)).await;
        assert_eq!(st, 401, "{bad:?}: {v}");
    }

    // The three forms.
    let (st, v) = call(req(&s, Method::GET, "/v1/auth/whoami", ADMIN)).await;
    assert_eq!(st, 200);
    assert_eq!(
        (v["workspace"].as_str(), v["admin"].as_bool()),
        (Some("default"), Some(true))
    );
    assert_eq!(v["auth_required"], true);
    let (st, v) = call(
        s.http
            .get(s.url("/v1/auth/whoami"))
            .header("X-API-Key", ADMIN),
    )
    .await;
    assert_eq!((st, v["workspace"].as_str()), (200, Some("default")));
    let (st, v) = call(
        s.http
            .get(s.url(&format!("/v1/auth/whoami?access_token={ADMIN}"))),
    )
    .await;
    assert_eq!((st, v["workspace"].as_str()), (200, Some("default")));

    // A key for another workspace; it is shown once and listed by prefix only.
    let (key, id) = new_key(&s, ADMIN, json!({"name": "ci", "workspace": "team-b"})).await;
    assert!(key.starts_with("fbk_"));
    let (st, v) = call(req(&s, Method::GET, "/v1/auth/whoami", &key)).await;
    assert_eq!(
        (st, v["workspace"].as_str(), v["admin"].as_bool()),
        (200, Some("team-b"), Some(false))
    );
    let (_, list) = call(req(&s, Method::GET, "/v1/auth/tokens", ADMIN)).await;
    let listed = list["tokens"].to_string();
    assert!(listed.contains(&id) && !listed.contains(&key), "{listed}");
    // A workspace key sees its own keys only, and may not make admin keys or keys of
    // other workspaces.
    let (_, own) = call(req(&s, Method::GET, "/v1/auth/tokens", &key)).await;
    assert_eq!(own["tokens"].as_array().unwrap().len(), 1);
    let (st, _) =
        call(req(&s, Method::POST, "/v1/auth/tokens", &key).json(&json!({"admin": true}))).await;
    assert_eq!(st, 403);
    let (st, _) =
        call(req(&s, Method::POST, "/v1/auth/tokens", &key).json(&json!({"workspace": "default"})))
            .await;
    assert_eq!(st, 403);

    // SSE and WebSocket-style access with ?access_token= on the key's own sandbox.
    let (st, sb) = call(req(&s, Method::POST, "/v1/sandboxes", &key).json(&json!({}))).await;
    assert_eq!(st, 201);
    let sid = sb["id"].as_str().unwrap().to_owned();
    let r = s
        .http
        .get(s.url(&format!(
            "/v1/sandboxes/{sid}/events?tail=10&access_token={key}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("created"));

    // Revoked: fails at once, everywhere.
    let (st, v) = call(req(
        &s,
        Method::DELETE,
        &format!("/v1/auth/tokens/{id}"),
        ADMIN,
    ))
    .await;
    assert_eq!(st, 200);
    assert!(v["revoked_at"].is_string());
    for (m, p) in [
        (Method::GET, "/v1/auth/whoami".to_owned()),
        (Method::GET, format!("/v1/sandboxes/{sid}")),
        (Method::DELETE, format!("/v1/sandboxes/{sid}")),
    ] {
        let (st, _) = call(req(&s, m, &p, &key)).await;
        assert_eq!(st, 401, "{p}");
    }
    // Unknown key ids are 404. The sandbox is team-b's: the default workspace cannot
    // see it, another team-b key can.
    let (st, _) = call(req(
        &s,
        Method::DELETE,
        "/v1/auth/tokens/tok-0000000000000000",
        ADMIN,
    ))
    .await;
    assert_eq!(st, 404);
    let (st, _) = call(req(&s, Method::GET, &format!("/v1/sandboxes/{sid}"), ADMIN)).await;
    assert_eq!(st, 404);
    let (other, _) = new_key(&s, ADMIN, json!({"workspace": "team-b"})).await;
    let (st, _) = call(req(
        &s,
        Method::DELETE,
        &format!("/v1/sandboxes/{sid}"),
        &other,
    ))
    .await;
    assert_eq!(st, 204);
}

#[tokio::test]
async fn workspaces_never_see_each_other() {
    let s = auth_server();
    let (a, _) = new_key(&s, ADMIN, json!({"workspace": "team-a"})).await;
    let (b, _) = new_key(&s, ADMIN, json!({"workspace": "team-b"})).await;
    let (st, sb) = call(req(&s, Method::POST, "/v1/sandboxes", &a).json(&json!({}))).await;
    assert_eq!(st, 201);
    let id = sb["id"].as_str().unwrap().to_owned();
    let (st, snap) = call(
        req(
            &s,
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshot"),
            &a,
        )
        .json(&json!({"name": "base"})),
    )
    .await;
    assert_eq!(st, 201, "{snap}");
    let snap = snap["id"].as_str().unwrap().to_owned();
    let (st, fork) =
        call(req(&s, Method::POST, &format!("/v1/sandboxes/{id}/fork"), &a).json(&json!({"n": 1})))
            .await;
    assert_eq!(st, 200, "{fork}");
    let child = fork["children"][0].as_str().unwrap().to_owned();

    // Everything of team-a answers team-b as if it did not exist.
    let missing = json!({"error": format!("sandbox {id} not found"), "code": "not_found"});
    for (m, p, body) in [
        (Method::GET, format!("/v1/sandboxes/{id}"), None),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": "id"})),
        ),
        (Method::POST, format!("/v1/sandboxes/{id}/pause"), None),
        (
            Method::GET,
            format!("/v1/sandboxes/{id}/files?path=/etc/hostname"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/fork"),
            Some(json!({"n": 1})),
        ),
        (Method::DELETE, format!("/v1/sandboxes/{id}"), None),
    ] {
        let mut r = req(&s, m, &p, &b);
        if let Some(body) = body {
            r = r.json(&body);
        }
        let (st, v) = call(r).await;
        assert_eq!((st, &v), (404, &missing), "{p}");
    }
    // A made-up id answers the same way, so existence does not leak.
    let (st, v) = call(req(
        &s,
        Method::GET,
        "/v1/sandboxes/sbx-0000000000000000",
        &b,
    ))
    .await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
    // Merging across workspaces: the other side is not found.
    let (st, _) = call(req(
        &s,
        Method::POST,
        &format!("/v1/sandboxes/{id}/merge_into/{child}"),
        &b,
    ))
    .await;
    assert_eq!(st, 404);
    let (st, _) = call(req(&s, Method::GET, &format!("/v1/snapshots/{snap}"), &b)).await;
    assert_eq!(st, 404);
    let (st, v) =
        call(req(&s, Method::POST, "/v1/sandboxes", &b).json(&json!({"snapshot": snap}))).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("snapshot_not_found")));
    let (_, list) = call(req(&s, Method::GET, "/v1/sandboxes?status=all", &b)).await;
    assert_eq!(list["sandboxes"], json!([]));
    let (_, snaps) = call(req(&s, Method::GET, "/v1/snapshots", &b)).await;
    assert_eq!(snaps["snapshots"], json!([]));
    // Workspace quotas are the admin's to set, and a key sees only its own workspace.
    let (st, _) = call(req(&s, Method::GET, "/v1/auth/workspaces/team-a", &b)).await;
    assert_eq!(st, 403);

    // team-a still sees and uses its own.
    let (_, list) = call(req(&s, Method::GET, "/v1/sandboxes", &a)).await;
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 2);
    let (st, _) = call(req(
        &s,
        Method::POST,
        &format!("/v1/sandboxes/{id}/merge_into/{child}"),
        &a,
    ))
    .await;
    assert_eq!(st, 200);
    let (st, _) = call(req(&s, Method::DELETE, &format!("/v1/sandboxes/{id}"), &a)).await;
    assert_eq!(st, 204);
}

#[tokio::test]
async fn quotas_answer_429_with_the_reason() {
    let s = auth_server();
    let (k, _) = new_key(&s, ADMIN, json!({"workspace": "small"})).await;
    let (st, _) = call(
        req(&s, Method::PUT, "/v1/auth/workspaces/small", &k)
            .json(&json!({"max_sandboxes": 2, "max_memory_mb": 1024})),
    )
    .await;
    assert_eq!(st, 403, "only admins set quotas");
    let (st, v) = call(
        req(&s, Method::PUT, "/v1/auth/workspaces/small", ADMIN)
            .json(&json!({"max_sandboxes": 2, "max_memory_mb": 1024})),
    )
    .await;
    assert_eq!(st, 200, "{v}");

    let (st, v) =
        call(req(&s, Method::POST, "/v1/sandboxes", &k).json(&json!({"memory_mb": 2048}))).await;
    assert_eq!((st, v["code"].as_str()), (429, Some("quota_exceeded")));
    assert!(v["error"].as_str().unwrap().contains("1024 MiB"), "{v}");
    let (st, first) =
        call(req(&s, Method::POST, "/v1/sandboxes", &k).json(&json!({"memory_mb": 256}))).await;
    assert_eq!(st, 201);
    let first = first["id"].as_str().unwrap().to_owned();
    let (st, v) = call(
        req(&s, Method::POST, &format!("/v1/sandboxes/{first}/fork"), &k).json(&json!({"n": 2})),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (429, Some("quota_exceeded")),
        "{v}"
    );
    assert!(
        v["error"].as_str().unwrap().contains("at most 2 sandboxes"),
        "{v}"
    );
    let (st, _) =
        call(req(&s, Method::POST, "/v1/sandboxes", &k).json(&json!({"memory_mb": 256}))).await;
    assert_eq!(st, 201);
    let (st, v) = call(req(&s, Method::POST, "/v1/sandboxes", &k).json(&json!({}))).await;
    assert_eq!((st, v["code"].as_str()), (429, Some("quota_exceeded")));
    let (_, who) = call(req(&s, Method::GET, "/v1/auth/whoami", &k)).await;
    assert_eq!(who["usage"], json!({"sandboxes": 2, "memory_mb": 512}));
    // Other workspaces are not limited by it.
    let (st, other) = call(req(&s, Method::POST, "/v1/sandboxes", ADMIN).json(&json!({}))).await;
    assert_eq!(st, 201);
    // Deleting frees the place.
    let (st, _) = call(req(
        &s,
        Method::DELETE,
        &format!("/v1/sandboxes/{first}"),
        &k,
    ))
    .await;
    assert_eq!(st, 204);
    let (st, _) = call(req(&s, Method::POST, "/v1/sandboxes", &k).json(&json!({}))).await;
    assert_eq!(st, 201);
    let oid = other["id"].as_str().unwrap();
    let (st, _) = call(req(
        &s,
        Method::DELETE,
        &format!("/v1/sandboxes/{oid}"),
        ADMIN,
    ))
    .await;
    assert_eq!(st, 204);
}

#[tokio::test]
async fn loopback_needs_no_key_and_a_foreign_one_is_no_key() {
    let s = Server::start();
    let (st, v) = common::get(&s, "/v1/auth/whoami").await;
    assert_eq!(st, 200);
    assert_eq!(
        (
            v["workspace"].as_str(),
            v["auth_required"].as_bool(),
            v["token_id"].is_null()
        ),
        (Some("default"), Some(false), true)
    );
    // Real clients send the hosted service's key they were configured with
    // (`PODFLARE_API_KEY`, pandastack's required key): with keys optional it is no key.
    for key in ["fbk_wrong", "pf_live_0123456789", "ps_abc"] {
        let (st, v) = call(req(&s, Method::GET, "/v1/auth/whoami", key)).await;
        assert_eq!((st, v["workspace"].as_str()), (200, Some("default")), "{v}");
    }
}

#[test]
fn an_open_non_loopback_server_refuses_to_start() {
    let data = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(data.path())
        .arg("--pool")
        .arg(common::pool())
        .env_remove("FORKBOX_AUTH")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without API keys"),
        "{err}"
    );
}

#[tokio::test]
async fn the_cli_makes_the_first_admin_key_and_manages_keys() {
    let s = auth_server();
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_forkbox"))
            .args(args)
            .env("FORKBOX_URL", &s.base)
            .env("FORKBOX_DATA_DIR", s.data.path())
            .envs(s.store_env())
            .output()
            .unwrap()
    };
    // Offline, on the data dir's database, while the server runs.
    let o = cli(&["token", "create", "--local", "--admin", "--name", "boot"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let (st, v) = call(req(&s, Method::GET, "/v1/auth/whoami", &key)).await;
    assert_eq!((st, v["token_name"].as_str()), (200, Some("boot")));
    // Through the server with that key.
    let o = cli(&[
        "token",
        "create",
        "--api-key",
        &key,
        "--workspace",
        "ops",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let made: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ops_key = made["key"].as_str().unwrap();
    let o = cli(&["token", "ls", "--api-key", &key]);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        table.contains("ops") && table.contains("boot") && !table.contains(ops_key),
        "{table}"
    );
    let o = cli(&[
        "token",
        "revoke",
        "--api-key",
        &key,
        made["id"].as_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (st, _) = call(req(&s, Method::GET, "/v1/auth/whoami", ops_key)).await;
    assert_eq!(st, 401);
    // Without a key the server refuses, and the CLI says why.
    let o = cli(&["token", "ls"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"));
}
