//! End-to-end, as an attacker with a key of their own: another workspace's sandboxes,
//! snapshots and the warm pool are out of reach by every spelling of their ids
//! (ownership is checked in core on the decoded id, not on the path's text).

#![allow(clippy::unwrap_used)]

mod common;

use common::Server;
use reqwest::{Method, RequestBuilder};
use serde_json::{json, Value};

const ADMIN: &str = "fbk_test-admin-key-0123456789abcdefghijklmnop";

fn auth_server() -> Server {
    Server::start_with(&[
        ("FORKBOX_AUTH", "true".into()),
        ("FORKBOX_ADMIN_KEY", ADMIN.into()),
    ])
}

fn req(s: &Server, m: Method, path: &str, key: Option<&str>) -> RequestBuilder {
    let r = s.http.request(m, s.url(path));
    match key {
        Some(k) => r.bearer_auth(k),
        None => r,
    }
}

async fn call(r: RequestBuilder) -> (u16, Value) {
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn key_of(s: &Server, workspace: &str) -> String {
    let (st, v) = call(
        req(s, Method::POST, "/v1/auth/tokens", Some(ADMIN))
            .json(&json!({"name": workspace, "workspace": workspace})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    v["key"].as_str().unwrap().to_owned()
}

/// Ways to write `id` in a path that decode to it: as is, one letter percent-encoded
/// (lower and upper case hex), the dash encoded.
fn spellings(id: &str) -> Vec<String> {
    let (head, tail) = id.split_at(1);
    let c = head.as_bytes()[0];
    vec![
        id.to_owned(),
        format!("%{c:02x}{tail}"),
        format!("%{c:02X}{tail}"),
        id.replacen('-', "%2D", 1),
        format!(
            "{}%{:02x}",
            &id[..id.len() - 1],
            id.as_bytes()[id.len() - 1]
        ),
    ]
}

/// Every sandbox operation, spelled each way, with `key`: all must answer 404 JSON and
/// change nothing.
async fn assert_unreachable(s: &Server, id: &str, key: Option<&str>, own: &str) {
    for sp in spellings(id) {
        let calls: Vec<(Method, String, Option<Value>)> = vec![
            (Method::GET, format!("/v1/sandboxes/{sp}"), None),
            (
                Method::POST,
                format!("/v1/sandboxes/{sp}/exec"),
                Some(json!({"cmd": "touch /root/pwned"})),
            ),
            (
                Method::POST,
                format!("/v1/sandboxes/{sp}/exec"),
                Some(json!({"cmd": "touch /root/pwned", "background": true})),
            ),
            (
                Method::POST,
                format!("/v1/sandboxes/{sp}/exec/stream"),
                Some(json!({"cmd": "touch /root/pwned"})),
            ),
            (
                Method::GET,
                format!("/v1/sandboxes/{sp}/files?path=/root/secret"),
                None,
            ),
            (
                Method::GET,
                format!("/v1/sandboxes/{sp}/files/ls?path=/root"),
                None,
            ),
            (
                Method::POST,
                format!("/v1/sandboxes/{sp}/files/mkdir"),
                Some(json!({"path": "/root/pwned"})),
            ),
            (Method::GET, format!("/v1/sandboxes/{sp}/commands"), None),
            (Method::GET, format!("/v1/sandboxes/{sp}/logs"), None),
            (Method::GET, format!("/v1/sandboxes/{sp}/events"), None),
            (
                Method::POST,
                format!("/v1/sandboxes/{sp}/fork"),
                Some(json!({"n": 1})),
            ),
            (Method::POST, format!("/v1/sandboxes/{sp}/pause"), None),
            (Method::POST, format!("/v1/sandboxes/{sp}/hibernate"), None),
            (
                Method::POST,
                format!("/v1/sandboxes/{sp}/timeout"),
                Some(json!({"timeout": 5})),
            ),
            (
                Method::POST,
                format!("/v1/sandboxes/{sp}/snapshot"),
                Some(json!({"name": "stolen"})),
            ),
            (
                Method::POST,
                format!("/v1/sandboxes/{own}/merge_into/{sp}"),
                None,
            ),
            (
                Method::POST,
                format!("/v1/sandboxes/{sp}/merge_into/{own}"),
                None,
            ),
            (Method::DELETE, format!("/v1/sandboxes/{sp}"), None),
        ];
        for (m, path, body) in calls {
            let mut r = req(s, m.clone(), &path, key);
            if let Some(b) = body {
                r = r.json(&b);
            }
            let (st, v) = call(r).await;
            assert_eq!(st, 404, "{m} {path}: {v}");
            assert_eq!(v["code"], "not_found", "{m} {path}: {v}");
        }
        let (st, v) = call(
            req(
                s,
                Method::PUT,
                &format!("/v1/sandboxes/{sp}/files?path=/root/pwned"),
                key,
            )
            .body("x"),
        )
        .await;
        assert_eq!(st, 404, "PUT files {sp}: {v}");
    }
}

#[tokio::test]
async fn another_workspace_reaches_no_sandbox_or_snapshot_by_any_spelling() {
    let s = auth_server();
    let (a, b) = (key_of(&s, "team-a").await, key_of(&s, "team-b").await);
    let create = |k: String| {
        let s = &s;
        async move {
            let (st, v) =
                call(req(s, Method::POST, "/v1/sandboxes", Some(&k)).json(&json!({}))).await;
            assert_eq!(st, 201, "{v}");
            v["id"].as_str().unwrap().to_owned()
        }
    };
    let victim = create(a.clone()).await;
    let mine = create(b.clone()).await;
    let (st, _) = call(
        req(
            &s,
            Method::PUT,
            &format!("/v1/sandboxes/{victim}/files?path=/root/secret"),
            Some(&a),
        )
        .body("A's secret"),
    )
    .await;
    assert_eq!(st, 200);
    let (st, snap) = call(
        req(
            &s,
            Method::POST,
            &format!("/v1/sandboxes/{victim}/snapshot"),
            Some(&a),
        )
        .json(&json!({"name": "a-snap"})),
    )
    .await;
    assert_eq!(st, 201, "{snap}");
    let snap = snap["id"].as_str().unwrap().to_owned();

    assert_unreachable(&s, &victim, Some(&b), &mine).await;
    for sp in spellings(&snap) {
        for m in [Method::GET, Method::DELETE] {
            let (st, v) = call(req(&s, m.clone(), &format!("/v1/snapshots/{sp}"), Some(&b))).await;
            assert_eq!(
                (st, v["code"].as_str()),
                (404, Some("snapshot_not_found")),
                "{m} {sp}: {v}"
            );
        }
    }
    // Starting from A's snapshot is refused too.
    let (st, v) =
        call(req(&s, Method::POST, "/v1/sandboxes", Some(&b)).json(&json!({"snapshot": snap})))
            .await;
    assert_eq!(st, 404, "{v}");

    // A's sandbox and snapshot are untouched.
    let (st, v) = call(req(
        &s,
        Method::GET,
        &format!("/v1/sandboxes/{victim}"),
        Some(&a),
    ))
    .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("running")), "{v}");
    let (st, v) = call(
        req(
            &s,
            Method::POST,
            &format!("/v1/sandboxes/{victim}/exec"),
            Some(&a),
        )
        .json(&json!({"cmd": "cat /root/secret; ls /root", "wait": true})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v["stdout"], "A's secretsecret\n", "{v}");
    let (st, _) = call(req(
        &s,
        Method::GET,
        &format!("/v1/snapshots/{snap}"),
        Some(&a),
    ))
    .await;
    assert_eq!(st, 200);
}

/// Malformed ids are 404 JSON before anything runs (never a plain-text rejection).
#[tokio::test]
async fn malformed_ids_are_404_json() {
    let s = Server::start();
    for bad in ["%FF", "%C3%28", "sbx-..%2F..%2Fetc", "%00", "sbx-%20", "x"] {
        for path in [
            format!("/v1/sandboxes/{bad}"),
            format!("/v1/sandboxes/{bad}/exec"),
        ] {
            let m = if path.ends_with("exec") {
                Method::POST
            } else {
                Method::GET
            };
            let (st, v) = call(req(&s, m, &path, None).json(&json!({"cmd": "true"}))).await;
            assert_eq!(st, 404, "{path}: {v}");
            assert_eq!(v["code"], "not_found", "{path}: {v}");
        }
    }
}

/// Warm-pool sandboxes belong to no key (auth off here: the local user is admin of
/// the default workspace) by any spelling; a create is handed a pristine one.
#[tokio::test]
async fn the_warm_pool_is_out_of_reach_and_handed_over_pristine() {
    let s = Server::start();
    let own = s.create_id().await;
    // The pool's sandboxes: run dirs that are no listed sandbox.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let pool: Vec<String> = loop {
        let ids: Vec<String> = std::fs::read_dir(s.data.path().join("run"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sbx-") && *n != own)
            .collect();
        if ids.len() >= 2 || std::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(!pool.is_empty(), "no warm pool sandbox appeared");
    for id in &pool {
        assert_unreachable(&s, id, None, &own).await;
    }
    // A create takes one of them: nothing but the agent and its zygote runs in it.
    let handed = s.create_id().await;
    assert!(
        pool.contains(&handed),
        "{handed} is not from the pool {pool:?}"
    );
    let (out, _, code) = s
        .sh(
            &handed,
            "for p in /proc/[0-9]*; do cat $p/comm; done | sort | uniq -c; ls /root",
        )
        .await;
    assert_eq!(code, 0);
    for line in out.lines() {
        let name = line.split_whitespace().last().unwrap_or_default();
        assert!(
            [
                "forkbox-agent",
                "forkbox-zygote",
                "sh",
                "sort",
                "uniq",
                "cat",
                "ls"
            ]
            .contains(&name),
            "unexpected process in a handed-over sandbox: {out}"
        );
    }
    assert!(!out.contains("pwned"), "{out}");
}
