//! Three nodes on one PostgreSQL database serve one API (docs/cluster.md; `make
//! test-cluster`, and part of `make test`): creates through one node land on all
//! three; exec, run_code, files, the terminal and SSE of a sandbox work through every
//! node; fork and merge through nodes that do not run the parent; a quota holds under
//! concurrent creates spread over the nodes; a SIGKILLed node's sandboxes answer 502
//! through the others within 5 s while everything else works, and are adopted again
//! when it is back within its grace; a node gone (with its host) for longer than its
//! grace has its sandboxes recorded lost by the others.
//! Runs when `FORKBOX_TEST_DATABASE_URL` names a PostgreSQL server
//! (`scripts/with-postgres.sh`).

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, post, Server};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn node_env(url: &str, node: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FORKBOX_DATABASE_URL", url.to_owned()),
        ("FORKBOX_NODE", node.to_owned()),
    ]
}

async fn node_of(s: &Server, id: &str) -> String {
    let (st, v) = get(s, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(st, 200, "{v}");
    v["node"].as_str().unwrap().to_owned()
}

/// With keys required, a call through another node authenticated by `?access_token=`
/// (browsers' WebSockets, SSE) reaches the owner with the caller's key: the owner checks
/// it again, so it must travel with the forwarded call.
#[tokio::test]
async fn a_query_key_travels_with_a_forwarded_call() {
    let Some(url) = common::postgres_database() else {
        return;
    };
    const KEY: &str = "fbk_cluster_query_key_0123456789";
    let env = |node| {
        let mut e = node_env(&url, node);
        e.push(("FORKBOX_AUTH", "true".into()));
        e.push(("FORKBOX_ADMIN_KEY", KEY.into()));
        e
    };
    let a = Server::start_with(&env("a"));
    let b = Server::start_with(&env("b"));
    let r = a
        .http
        .post(a.url("/v1/sandboxes"))
        .bearer_auth(KEY)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    // Whichever node runs it, the other one forwards.
    let other = if v["node"] == "a" { &b } else { &a };
    let r = other
        .http
        .post(other.url(&format!("/v1/sandboxes/{id}/exec?access_token={KEY}")))
        .json(&json!({"cmd": "echo through", "wait": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["stdout"], "through\n", "{v}");
    // A wrong key is still refused, by the first node.
    let r = other
        .http
        .post(other.url(&format!(
            "/v1/sandboxes/{id}/exec?access_token=fbk_wrong_key_0123456789ab"
        )))
        .json(&json!({"cmd": "true", "wait": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = a
        .http
        .delete(a.url(&format!("/v1/sandboxes/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn three_nodes_serve_one_api() {
    let Some(url) = common::postgres_database() else {
        return;
    };
    let mut a = Server::start_with(&node_env(&url, "a"));
    let b = Server::start_with(&node_env(&url, "b"));
    let mut c_env = node_env(&url, "c");
    c_env.push(("FORKBOX_ORPHAN_GRACE", "1".into()));
    let mut c = Server::start_with(&c_env);
    let (_, nodes) = get(&a, "/v1/nodes").await;
    let nodes = nodes["nodes"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    assert!(nodes.iter().all(|n| n["state"] == "up"), "{nodes:?}");

    // A call claiming to come from another node needs the secret the nodes share.
    for secret in [None, Some("guess")] {
        let mut r = b
            .http
            .post(b.url("/v1/sandboxes"))
            .header("x-forkbox-forwarded-by", "a")
            .json(&json!({}));
        if let Some(s) = secret {
            r = r.header("x-forkbox-cluster-secret", s);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "unauthorized", "{v}");
    }

    // Creates sent at once, through all three nodes, spread evenly: each placement
    // sees the others' reservations.
    let creates = (0..6).map(|i| {
        let s = [&a, &b, &c][i % 3];
        let (http, url) = (s.http.clone(), s.url("/v1/sandboxes"));
        async move {
            let r = http.post(url).json(&json!({})).send().await.unwrap();
            assert_eq!(r.status(), 201);
            let v: Value = r.json().await.unwrap();
            (
                v["id"].as_str().unwrap().to_owned(),
                v["node"].as_str().unwrap().to_owned(),
            )
        }
    });
    let made = futures_util::future::join_all(creates).await;
    for n in ["a", "b", "c"] {
        let on = made.iter().filter(|(_, m)| m == n).count();
        assert_eq!(on, 2, "{on} on {n}: {made:?}");
    }
    let x = made.iter().find(|(_, n)| n == "a").unwrap().0.clone();

    // Everything about a sandbox of node a works through b and c.
    for via in [&b, &c] {
        let (out, err, code) = via.sh(&x, "echo out; echo err >&2; exit 3").await;
        assert_eq!((out.as_str(), err.as_str(), code), ("out\n", "err\n", 3));
    }
    let (st, r) = post(
        &b,
        &format!("/v1/sandboxes/{x}/exec"),
        json!({"code": "n = 41", "wait": true}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    let (st, r) = post(
        &c,
        &format!("/v1/sandboxes/{x}/exec"),
        json!({"code": "print(n + 1)", "wait": true}),
    )
    .await;
    assert_eq!((st, r["stdout"].as_str()), (200, Some("42\n")), "{r}");
    let blob: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let r = b
        .http
        .put(b.url(&format!("/v1/sandboxes/{x}/files?path=/root/blob")))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let back = c
        .http
        .get(c.url(&format!("/v1/sandboxes/{x}/files?path=/root/blob")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(back == blob, "the file differs through another node");
    let r = b
        .http
        .post(b.url(&format!("/v1/sandboxes/{x}/exec/stream")))
        .json(&json!({"cmd": "for i in 1 2 3; do echo sse $i; sleep 0.1; done"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let sse = r.text().await.unwrap();
    assert!(
        sse.contains("sse 3") && sse.contains("event: exit"),
        "{sse}"
    );
    let ws_url = format!(
        "{}/v1/sandboxes/{x}/exec/pty?cmd=cat",
        c.base.replacen("http://", "ws://", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    ws.send(Message::Binary(b"through node c\n".to_vec().into()))
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("through node c") {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal through node c: {other:?}; got {seen:?}"),
        }
    }
    drop(ws);

    // A port of the sandbox through another node: the app sees neither the cluster
    // secret nor anything else of forkbox's own.
    common::start_preview_app(&a, &x, None).await;
    let seen = common::get_text(&b, &format!("/v1/sandboxes/{x}/ports/8000/headers"))
        .await
        .to_ascii_lowercase();
    assert!(seen.contains("host: localhost:8000"), "{seen}");
    assert!(!seen.contains("x-forkbox-cluster-secret"), "{seen}");

    // Fork through b (children stay on the parent's node), a child changed through c,
    // merged into the parent through b.
    let (st, f) = post(&b, &format!("/v1/sandboxes/{x}/fork"), json!({"n": 2})).await;
    assert_eq!(st, 200, "{f}");
    let kids: Vec<String> = f["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    for k in &kids {
        assert_eq!(node_of(&c, k).await, "a");
    }
    let (st, r) = post(
        &c,
        &format!("/v1/sandboxes/{}/exec", kids[0]),
        json!({"code": "n = 99", "wait": true}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    let (st, m) = post(
        &b,
        &format!("/v1/sandboxes/{x}/merge_into/{}", kids[0]),
        json!({}),
    )
    .await;
    assert_eq!(st, 200, "{m}");
    let (_, r) = post(
        &c,
        &format!("/v1/sandboxes/{x}/exec"),
        json!({"code": "print(n)", "wait": true}),
    )
    .await;
    assert_eq!(r["stdout"].as_str(), Some("99\n"), "{r}");

    // A sandbox from a snapshot, or with a volume, is made where those are kept,
    // whichever node is asked; a volume is deleted through any node.
    let (st, snap) = post(
        &c,
        &format!("/v1/sandboxes/{x}/snapshot"),
        json!({"name": "s"}),
    )
    .await;
    assert_eq!(st, 201, "{snap}");
    let snap = snap["id"].as_str().unwrap().to_owned();
    let from = b.create(json!({"snapshot": snap})).await;
    assert_eq!(from["node"], "a", "{from}");
    let (out, _, _) = b
        .sh(from["id"].as_str().unwrap(), "cat /root/blob | wc -c")
        .await;
    assert_eq!(out.trim(), "2000000");
    assert_eq!(b.delete(from["id"].as_str().unwrap()).await, 204);
    let (st, vol) = post(&b, "/v1/volumes", json!({"name": "v", "size_mb": 64})).await;
    assert_eq!(st, 201, "{vol}");
    let vol = vol["id"].as_str().unwrap().to_owned();
    let with = c
        .create(json!({"volumes": [{"id": vol, "mount": "/data"}]}))
        .await;
    assert_eq!(with["node"], "b", "{with}");
    let with = with["id"].as_str().unwrap().to_owned();
    let (_, _, code) = a.sh(&with, "echo kept > /data/f").await;
    assert_eq!(code, 0);
    assert_eq!(a.delete(&with).await, 204);
    // A path the router decodes but forwarding does not see is refused by the node
    // that lacks the files, not half done.
    let encoded = format!("/v1/volumes/%76{}", &vol[1..]);
    assert_eq!(c.delete_at(&encoded).await, 421);
    assert_eq!(get(&a, &format!("/v1/volumes/{vol}")).await.0, 200);
    assert_eq!(c.delete_at(&format!("/v1/volumes/{vol}")).await, 204);
    assert_eq!(get(&a, &format!("/v1/volumes/{vol}")).await.0, 404);
    assert_eq!(b.delete_at(&format!("/v1/snapshots/{snap}")).await, 204);

    // A quota holds under concurrent creates spread over the three nodes.
    let (_, ws_view) = get(&a, "/v1/auth/workspaces/default").await;
    let used = ws_view["usage"]["sandboxes"].as_u64().unwrap();
    let quota = |max: Value| {
        let http = a.http.clone();
        let url = a.url("/v1/auth/workspaces/default");
        async move {
            let r = http
                .put(url)
                .json(&json!({"max_sandboxes": max}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    quota(json!(used + 3)).await;
    let creates = (0..9).map(|i| {
        let s = [&a, &b, &c][i % 3];
        let (http, url) = (s.http.clone(), s.url("/v1/sandboxes"));
        async move {
            let r = http
                .post(url)
                .json(&json!({"template": "base"}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    let results = futures_util::future::join_all(creates).await;
    let ok: Vec<String> = results
        .iter()
        .filter(|(st, _)| *st == 201)
        .map(|(_, v)| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ok.len(), 3, "{results:?}");
    assert!(results
        .iter()
        .all(|(st, v)| *st == 201 || (*st == 429 && v["code"] == "quota_exceeded")));
    quota(Value::Null).await;
    for id in &ok {
        assert_eq!(b.delete(id).await, 204);
    }

    // Node a is SIGKILLed: within 5 s its sandboxes answer 502 through the others, and
    // everything else goes on.
    a.kill();
    let t0 = Instant::now();
    let (st, v) = post(
        &b,
        &format!("/v1/sandboxes/{x}/exec"),
        json!({"cmd": "true", "wait": true}),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (502, Some("node_unreachable")),
        "{v}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let y = b.create(json!({})).await;
    let y = y["id"].as_str().unwrap().to_owned();
    let (out, _, _) = c.sh(&y, "echo still here").await;
    assert_eq!(out, "still here\n");
    assert_eq!(c.delete(&y).await, 204);
    // Back within its grace: it adopts its sandboxes, REPL state included.
    a.restart_with(&node_env(&url, "a"));
    let (st, r) = post(
        &c,
        &format!("/v1/sandboxes/{x}/exec"),
        json!({"code": "print(n)", "wait": true}),
    )
    .await;
    assert_eq!((st, r["stdout"].as_str()), (200, Some("99\n")), "{r}");

    // Node c's host goes (server and warden): after its grace the others record its
    // sandboxes lost.
    let on_c: Vec<String> = made
        .iter()
        .filter(|(_, n)| n == "c")
        .map(|(id, _)| id.clone())
        .collect();
    let warden: Value =
        serde_json::from_str(&std::fs::read_to_string(c.data.path().join("warden.lock")).unwrap())
            .unwrap();
    let warden = warden["pid"].as_i64().unwrap() as i32;
    let cmdline = std::fs::read(format!("/proc/{warden}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("warden"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(warden),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    c.kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, all) = get(&b, "/v1/sandboxes?status=all&limit=1000").await;
        let lost = all["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| on_c.contains(&v["id"].as_str().unwrap().to_owned()))
            .filter(|v| {
                v["status"] == "lost" && v["end_reason"].as_str().unwrap().contains("node c")
            })
            .count();
        if lost == on_c.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{lost} of {} recorded lost",
            on_c.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (id, n) in &made {
        if n != "c" && id != &x {
            assert_eq!(a.delete(id).await, 204);
        }
    }
    assert_eq!(b.delete(&x).await, 204);
    // The other child ended with the merge, or with its parent.
    assert!(matches!(b.delete(&kids[1]).await, 204 | 410));
    drop(c);
}
