//! End-to-end: `/mcp` (streamable HTTP MCP) under `--auth`: refused without a key, and
//! each request's own key is what its tools act with, so a workspace's key reaches its
//! own sandboxes only. (The official MCP client drives both transports in
//! tests/clients/test_mcp.py.)

#![allow(clippy::unwrap_used)]

mod common;

use common::Server;
use serde_json::{json, Value};

const ADMIN: &str = "fbk_test-admin-key-0123456789abcdefghijklmnop";

/// One JSON-RPC message to `/mcp` with `key`; the reply (JSON or the SSE stream's last
/// data line), its status and session id.
async fn rpc(
    s: &Server,
    key: Option<&str>,
    session: Option<&str>,
    msg: Value,
) -> (u16, Value, Option<String>) {
    let mut r = s
        .http
        .post(s.url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&msg);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(id) = session {
        r = r.header("mcp-session-id", id);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let sid = resp
        .headers()
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    let body = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .rfind(|d| !d.trim().is_empty())
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .unwrap_or_else(|| serde_json::from_str(&text).unwrap_or(Value::Null));
    (status, body, sid)
}

async fn session(s: &Server, key: &str) -> String {
    let (st, v, sid) = rpc(
        s,
        Some(key),
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-03-26", "capabilities": {},
            "clientInfo": {"name": "e2e", "version": "1"}}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let sid = sid.unwrap();
    let (st, _, _) = rpc(
        s,
        Some(key),
        Some(&sid),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert!(st == 202 || st == 200, "{st}");
    sid
}

async fn tool(s: &Server, key: &str, sid: &str, name: &str, args: Value) -> (bool, String) {
    let (st, v, _) = rpc(
        s,
        Some(key),
        Some(sid),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": name, "arguments": args}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let r = &v["result"];
    (
        r["isError"].as_bool().unwrap_or(false),
        r["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test]
async fn mcp_needs_a_key_and_acts_with_the_callers_own() {
    let (s, _log) = Server::start_logged_with(&[
        ("FORKBOX_AUTH", "true".into()),
        ("FORKBOX_ADMIN_KEY", ADMIN.into()),
    ]);
    // Without a key: the same 401 as the API's.
    let (st, v, _) = rpc(
        &s,
        None,
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (401, Some("unauthorized")), "{v}");
    // A key of workspace team-b, and a sandbox of the default workspace.
    let r = s
        .http
        .post(s.url("/v1/auth/tokens"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "b", "workspace": "team-b"}))
        .send()
        .await
        .unwrap();
    let b_key = r.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let admin_sid = session(&s, ADMIN).await;
    let (err, text) = tool(&s, ADMIN, &admin_sid, "create_sandbox", json!({})).await;
    assert!(!err, "{text}");
    let mine: Value = serde_json::from_str(&text).unwrap();
    let id = mine["id"].as_str().unwrap().to_owned();
    // A session is its opener's: team-b's key naming the admin's session is refused.
    let (st, v, _) = rpc(
        &s,
        Some(&b_key),
        Some(&admin_sid),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")), "{v}");
    // team-b's key, through MCP, neither sees nor reaches it.
    let b_sid = session(&s, &b_key).await;
    let (err, text) = tool(&s, &b_key, &b_sid, "list_sandboxes", json!({})).await;
    assert!(!err, "{text}");
    assert!(!text.contains(&id), "{text}");
    let (err, text) = tool(
        &s,
        &b_key,
        &b_sid,
        "exec",
        json!({"sandbox_id": id, "cmd": "echo reached"}),
    )
    .await;
    assert!(err && text.contains("404"), "{text}");
    // The owner's key runs in it.
    let (err, text) = tool(
        &s,
        ADMIN,
        &admin_sid,
        "exec",
        json!({"sandbox_id": id, "cmd": "echo reached"}),
    )
    .await;
    assert!(!err && text.contains("reached"), "{text}");
    assert_eq!(s.delete_at(&format!("/v1/sandboxes/{id}")).await, 401);
    let (err, text) = tool(
        &s,
        ADMIN,
        &admin_sid,
        "delete_sandbox",
        json!({"sandbox_id": id}),
    )
    .await;
    assert!(!err, "{text}");
}
