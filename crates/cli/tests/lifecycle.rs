//! End-to-end: listing, time-to-live changes, pause and resume.

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, get_text, post, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn list_filters_and_paginates() {
    let s = Server::start();
    let mut ids = Vec::new();
    for i in 0..5 {
        let v = s.create(json!({"metadata": {"n": i.to_string()}})).await;
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(s.delete(&ids[4]).await, 204);
    // Pages of 2 in creation order; a create between pages does not disturb them.
    let (st, p1) = get(&s, "/v1/sandboxes?limit=2").await;
    assert_eq!(st, 200);
    let got: Vec<&str> = p1["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[0].as_str(), ids[1].as_str()]);
    let extra = s.create_id().await;
    let token = p1["next_token"].as_str().unwrap().to_owned();
    let (_, p2) = get(&s, &format!("/v1/sandboxes?limit=2&next_token={token}")).await;
    let got: Vec<&str> = p2["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[3].as_str()]);
    let token = p2["next_token"].as_str().unwrap().to_owned();
    let (_, p3) = get(&s, &format!("/v1/sandboxes?limit=2&next_token={token}")).await;
    let got: Vec<&str> = p3["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [extra.as_str()]);
    assert!(p3["next_token"].is_null());
    // Filters.
    let (_, del) = get(&s, "/v1/sandboxes?status=deleted").await;
    assert_eq!(del["sandboxes"].as_array().unwrap().len(), 1);
    assert_eq!(del["sandboxes"][0]["id"], ids[4]);
    let (_, all) = get(&s, "/v1/sandboxes?status=all&template=python").await;
    assert_eq!(all["sandboxes"].as_array().unwrap().len(), 6);
    let (_, none) = get(&s, "/v1/sandboxes?template=other").await;
    assert_eq!(none["sandboxes"].as_array().unwrap().len(), 0);
    for bad in [
        "?limit=0",
        "?limit=5000",
        "?status=sleeping",
        "?next_token=xyz",
        "?bogus=1",
    ] {
        let (st, body) = get(&s, &format!("/v1/sandboxes{bad}")).await;
        assert_eq!(st, 400, "{bad}: {body}");
    }
    for id in ids.iter().take(4).chain([&extra]) {
        assert_eq!(s.delete(id).await, 204);
    }
}

#[tokio::test]
async fn timeout_can_be_extended_and_shortened() {
    let s = Server::start();
    let id = s.create(json!({"timeout": 2})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (st, v) = post(
        &s,
        &format!("/v1/sandboxes/{id}/timeout"),
        json!({"timeout": 600}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["timeout"], 600);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        get(&s, &format!("/v1/sandboxes/{id}")).await.0,
        200,
        "extended sandbox expired"
    );
    let r = s
        .http
        .patch(s.url(&format!("/v1/sandboxes/{id}/timeout")))
        .json(&json!({"timeout": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&s, &format!("/v1/sandboxes/{id}")).await.0 != 410 {
        assert!(
            Instant::now() < deadline,
            "shortened sandbox did not expire"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, all) = get(&s, "/v1/sandboxes?status=killed").await;
    assert_eq!(all["sandboxes"][0]["id"], id);
    assert_eq!(
        post(
            &s,
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({"timeout": 5})
        )
        .await
        .0,
        410
    );
    let other = s.create_id().await;
    assert_eq!(
        post(
            &s,
            &format!("/v1/sandboxes/{other}/timeout"),
            json!({"timeout": 0})
        )
        .await
        .0,
        400
    );
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{other}/timeout"), json!({}))
            .await
            .0,
        400
    );
    assert_eq!(s.delete(&other).await, 204);
}

/// Sum of user+system CPU ticks of every process in the sandbox's cgroup.
fn cpu_ticks(id: &str) -> u64 {
    let procs = ["pids", "memory"]
        .iter()
        .map(|c| format!("/sys/fs/cgroup/{c}/forkbox/{id}/cgroup.procs"))
        .chain([format!("/sys/fs/cgroup/forkbox/{id}/cgroup.procs")])
        .find_map(|p| std::fs::read_to_string(p).ok())
        .expect("sandbox cgroup");
    procs
        .lines()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
        })
        .sum()
}

#[tokio::test]
async fn pause_freezes_and_resume_thaws() {
    let s = Server::start();
    let id = s.create_id().await;
    s.sh(&id, "(while :; do :; done) >/dev/null 2>&1 &").await;
    py_counter(&s, &id).await;
    let (st, v) = post(&s, &format!("/v1/sandboxes/{id}/pause"), json!({})).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("paused")));
    assert_eq!(
        get(&s, &format!("/v1/sandboxes/{id}")).await.1["status"],
        "paused"
    );
    // No CPU while paused, even with a busy loop inside.
    let before = cpu_ticks(&id);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cpu_ticks(&id), before, "a paused sandbox used CPU");
    // Wrong-state calls.
    let (st, body) = s.exec(&id, json!({"cmd": "echo hi"})).await;
    assert_eq!(st, 409, "{body:?}");
    assert_eq!(body[0]["code"], "wrong_state");
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await
            .0,
        409
    );
    let (_, listed) = get(&s, "/v1/sandboxes?status=paused").await;
    assert_eq!(listed["sandboxes"][0]["id"], id);
    // Resume: memory was kept (the REPL still has its variable) and CPU flows again.
    let (st, v) = post(&s, &format!("/v1/sandboxes/{id}/resume"), json!({})).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("running")));
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{id}/resume"), json!({}))
            .await
            .0,
        409
    );
    let (st, events) = s.exec(&id, json!({"code": "counter"})).await;
    assert_eq!(st, 200);
    assert_eq!(common::collect(&events).0, "7\n");
    let before = cpu_ticks(&id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(cpu_ticks(&id) > before);
    // A paused sandbox can be deleted.
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await
            .0,
        200
    );
    assert_eq!(s.delete(&id).await, 204);
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{id}/resume"), json!({}))
            .await
            .0,
        410
    );
    assert_eq!(
        post(&s, "/v1/sandboxes/sbx-0000000000000000/pause", json!({}))
            .await
            .0,
        404
    );
}

async fn py_counter(s: &Server, id: &str) {
    let (st, events) = s.exec(id, json!({"code": "counter = 7"})).await;
    assert_eq!(st, 200);
    assert_eq!(common::collect(&events).2, 0);
}

#[tokio::test]
async fn every_sandbox_route_answers_409_when_paused_and_410_when_gone() {
    let s = Server::start();
    let id = s.create_id().await;
    s.sh(&id, "echo x > /root/f").await;
    let calls: Vec<(&str, String, Value)> = vec![
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": "true"}),
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec/stream"),
            json!({"cmd": "true"}),
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": "true", "background": true}),
        ),
        ("POST", format!("/v1/sandboxes/{id}/fork"), json!({"n": 1})),
        ("POST", format!("/v1/sandboxes/{id}/pause"), json!({})),
        (
            "GET",
            format!("/v1/sandboxes/{id}/files?path=/root/f"),
            Value::Null,
        ),
        (
            "PUT",
            format!("/v1/sandboxes/{id}/files?path=/root/g"),
            Value::Null,
        ),
        (
            "GET",
            format!("/v1/sandboxes/{id}/files/ls?path=/root"),
            Value::Null,
        ),
        (
            "GET",
            format!("/v1/sandboxes/{id}/files/watch?path=/root"),
            Value::Null,
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/files/mkdir"),
            json!({"path": "/root/d"}),
        ),
        ("GET", format!("/v1/sandboxes/{id}/exec/pty"), Value::Null),
        ("GET", format!("/v1/sandboxes/{id}/commands"), Value::Null),
        (
            "GET",
            format!("/v1/sandboxes/{id}/commands/1/wait"),
            Value::Null,
        ),
        (
            "GET",
            format!("/v1/sandboxes/{id}/commands/1/output"),
            Value::Null,
        ),
    ];
    let call = |m: &'static str, url: String, body: Value| {
        let http = s.http.clone();
        let url = s.url(&url);
        async move {
            let req = match m {
                "GET" => http.get(url),
                "PUT" => http.put(url).body("data"),
                _ => http.post(url).json(&body),
            };
            // The PTY route wants a WebSocket upgrade: make it look like one.
            let req = req
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
            let r = req.send().await.unwrap();
            let st = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (st, body)
        }
    };
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await
            .0,
        200
    );
    for (m, url, body) in &calls {
        let (st, b) = call(m, url.clone(), body.clone()).await;
        assert_eq!(st, 409, "{m} {url} on a paused sandbox: {b}");
        assert!(b["code"].is_string(), "{m} {url}: {b}");
    }
    assert_eq!(
        post(&s, &format!("/v1/sandboxes/{id}/resume"), json!({}))
            .await
            .0,
        200
    );
    assert_eq!(s.delete(&id).await, 204);
    let mut gone = calls.clone();
    gone.push((
        "POST",
        format!("/v1/sandboxes/{id}/snapshot"),
        json!({"name": "x"}),
    ));
    gone.push(("POST", format!("/v1/sandboxes/{id}/hibernate"), json!({})));
    gone.push(("GET", format!("/v1/sandboxes/{id}/logs"), Value::Null));
    for (m, url, body) in &gone {
        let (st, b) = call(m, url.clone(), body.clone()).await;
        assert_eq!(st, 410, "{m} {url} on a deleted sandbox: {b}");
    }
}

/// The warm pool's fill for the default template, from /v1/healthz.
async fn pool_ready(s: &Server) -> u64 {
    let (_, h) = get(s, "/v1/healthz").await;
    h["warm_pool"][0]["ready"].as_u64().unwrap_or(0)
}

async fn handed_over(s: &Server) -> u64 {
    get_text(s, "/metrics")
        .await
        .lines()
        .find(|l| l.starts_with("forkbox_sandboxes_handed_over_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap() as u64
}

async fn wait_pool_full(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool_ready(s).await < 2 {
        assert!(Instant::now() < deadline, "the warm pool did not fill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain create is a hand-over from the warm pool (default size 2): the sandbox is
/// the caller's (listed, its metadata and timeout, usable), pool sandboxes are never
/// listed, the pool refills, and requests the pool cannot serve are made cold.
#[tokio::test]
async fn plain_creates_come_from_the_warm_pool() {
    let s = Server::start();
    wait_pool_full(&s).await;
    let before = handed_over(&s).await;
    let (_, listed) = get(&s, "/v1/sandboxes").await;
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 0, "{listed}");

    let v = s
        .create(json!({"metadata": {"k": "v"}, "timeout": 77}))
        .await;
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(handed_over(&s).await, before + 1);
    assert_eq!(v["metadata"]["k"], "v");
    assert_eq!(v["timeout"], 77);
    let (_, got) = get(&s, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(got["metadata"]["k"], "v");
    assert_eq!(got["status"], "running");
    assert_eq!(s.sh(&id, "echo hi").await.0, "hi\n");
    let (_, listed) = get(&s, "/v1/sandboxes").await;
    let ids: Vec<&str> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id.as_str()]);

    // Refilled in the background.
    wait_pool_full(&s).await;
    // Asking for something else (here: environment, memory) makes one cold.
    let cold = s
        .create(json!({"env": {"FOO": "bar"}, "memory_mb": 300}))
        .await;
    let cold_id = cold["id"].as_str().unwrap().to_owned();
    assert_eq!(handed_over(&s).await, before + 1);
    assert_eq!(s.sh(&cold_id, "echo $FOO").await.0, "bar\n");
    assert_eq!(pool_ready(&s).await, 2);

    // Bad input is refused before the pool is touched.
    let (st, _) = post(&s, "/v1/sandboxes", json!({"timeout": 0})).await;
    assert_eq!(st, 400);
    assert_eq!(pool_ready(&s).await, 2);
    assert_eq!(s.delete(&id).await, 204);
    assert_eq!(s.delete(&cold_id).await, 204);
}

/// A burst of creates grows the warm pool to the burst's size, so the next burst like
/// it is handed over; the pool says what it keeps (`keeping`) and never passes
/// `--warm-pool-max`.
#[tokio::test]
async fn a_burst_of_creates_grows_the_warm_pool() {
    let s = Server::start_with(&[("FORKBOX_WARM_POOL_MAX", "5".into())]);
    wait_pool_full(&s).await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(s.create_id().await);
    }
    let (_, h) = get(&s, "/v1/healthz").await;
    assert_eq!(h["warm_pool"][0]["target"], 2, "{h}");
    assert_eq!(h["warm_pool"][0]["keeping"], 5, "{h}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool_ready(&s).await < 5 {
        assert!(Instant::now() < deadline, "the pool did not grow");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = handed_over(&s).await;
    for _ in 0..5 {
        ids.push(s.create_id().await);
    }
    assert_eq!(handed_over(&s).await, before + 5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pool_ready(&s).await <= 5);
    for id in &ids {
        assert_eq!(s.delete(id).await, 204);
    }
}

/// The row of sandbox `id` in the list of every sandbox (ended ones included).
async fn row(s: &Server, id: &str) -> Value {
    let (_, v) = get(s, "/v1/sandboxes?status=all&limit=1000").await;
    v["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn idle_timeout_ends_unused_sandboxes_only() {
    let s = Server::start();
    let make = |on_timeout: &str| json!({"idle_timeout": 1, "on_timeout": on_timeout});
    let (_, idle) = post(&s, "/v1/sandboxes", make("kill")).await;
    let (_, sleepy) = post(&s, "/v1/sandboxes", make("hibernate")).await;
    let (_, used) = post(&s, "/v1/sandboxes", make("kill")).await;
    let (_, running) = post(&s, "/v1/sandboxes", make("kill")).await;
    let [idle, sleepy, used, running] =
        [idle, sleepy, used, running].map(|v| v["id"].as_str().unwrap().to_owned());
    assert_eq!(row(&s, &idle).await["idle_timeout"], 1);
    // `running` runs one command longer than its idle timeout; `used` gets a call every
    // half second; status reads count for nothing.
    let long = s.sh(&running, "sleep 3; echo slept");
    let poke = async {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            assert_eq!(s.sh(&used, "true").await.2, 0);
            let _ = get(&s, &format!("/v1/sandboxes/{idle}")).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let (out, ()) = tokio::join!(long, poke);
    assert_eq!(out.0, "slept\n");
    assert_eq!(row(&s, &used).await["status"], "running");
    assert_eq!(row(&s, &running).await["status"], "running");
    let r = row(&s, &idle).await;
    assert_eq!(
        (r["status"].as_str(), r["end_reason"].as_str()),
        (Some("killed"), Some("idle timeout")),
        "{r}"
    );
    assert_eq!(row(&s, &sleepy).await["status"], "hibernated");
    let events = get_text(&s, &format!("/v1/sandboxes/{idle}/events")).await;
    assert!(events.contains("idle_timeout"), "{events}");
    // Out of range is 400.
    let (st, _) = post(&s, "/v1/sandboxes", json!({"idle_timeout": 0})).await;
    assert_eq!(st, 400);
    // A sandbox handed over from the warm pool, where it waited longer than its new
    // idle timeout, starts its idle clock with its new owner.
    wait_pool_full(&s).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = handed_over(&s).await;
    let (_, fresh) = post(&s, "/v1/sandboxes", json!({"idle_timeout": 2})).await;
    assert_eq!(handed_over(&s).await, before + 1, "not from the pool");
    let fresh = fresh["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(row(&s, &fresh).await["status"], "running");
}

/// Sends `head` then, a moment later, `body` on one HTTP/1.1 connection; reads the
/// answer; then asks `GET /v1/healthz` on the same connection. What the server said
/// (its status line and headers) and whether the connection carried the second call.
async fn refusal_then_reuse(s: &Server, head: &str, body: &[u8]) -> (String, bool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = s.url("").trim_start_matches("http://").to_owned();
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    c.write_all(head.replace("{host}", &addr).as_bytes())
        .await
        .unwrap();
    // The refusal is ready before the body arrives.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _ = c.write_all(body).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let head_end = loop {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let answer = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
    let len: usize = answer
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    while got.len() < head_end + 4 + len {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let reused = c
        .write_all(format!("GET /v1/healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .is_ok()
        && matches!(
            tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await,
            Ok(Ok(n)) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 200")
        );
    (answer, reused)
}

#[tokio::test]
async fn a_refusal_before_the_body_is_read_keeps_the_connection_usable() {
    // Real clients (httpx under podflare's SDK) reuse a kept-alive connection right
    // after an error answer; a refusal made before the handler read the body must not
    // leave the connection to be closed under them.
    let s = Server::start();
    let body = br#"{"cmd": "echo hi"}"#;
    let head = format!(
        "POST /v1/sandboxes/sbx-0000000000000000/exec HTTP/1.1\r\nhost: {{host}}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    for _ in 0..5 {
        let (answer, reused) = refusal_then_reuse(&s, &head, body).await;
        assert!(answer.starts_with("http/1.1 404"), "{answer}");
        assert!(reused, "the connection was closed after a 404: {answer}");
    }
    // A large body (an upload) refused early is not read; the answer says the
    // connection closes, so no client sends on it again.
    let big = vec![b'x'; 8 << 20];
    let head = format!(
        "PUT /v1/sandboxes/sbx-0000000000000000/files?path=/root/f HTTP/1.1\r\nhost: {{host}}\r\n\
         content-length: {}\r\n\r\n",
        big.len()
    );
    let (answer, _) = refusal_then_reuse(&s, &head, &big).await;
    assert!(answer.starts_with("http/1.1 404"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}
