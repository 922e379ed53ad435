//! End-to-end: servers listening inside a sandbox reached from outside (preview ports),
//! by path and by host, HTTP/1.1 and HTTP/2, bodies streamed both ways, WebSockets;
//! a closed port is a clear 502; another tenant's port is 404; a page a sandbox serves
//! gets no power over the API.

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, put_file, Server};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A sandbox running the preview app, once both its ports listen.
async fn app(s: &Server, key: Option<&str>) -> String {
    let mut r = s.http.post(s.url("/v1/sandboxes")).json(&json!({}));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let v: Value = r.send().await.unwrap().json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    common::start_preview_app(s, &id, key).await;
    id
}

/// `Host` of the preview host for `port` of `id` on this server.
fn preview_host(s: &Server, id: &str, port: u16) -> String {
    let server_port = s.base.rsplit(':').next().unwrap();
    format!("{port}-{id}.localhost:{server_port}")
}

#[tokio::test]
async fn a_sandbox_server_is_reached_by_path_and_by_host() {
    let s = Server::start();
    let id = app(&s, None).await;

    // The list says where each port is reached.
    let (st, v) = get(&s, &format!("/v1/sandboxes/{id}/ports")).await;
    assert_eq!(st, 200, "{v}");
    let p8000 = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 8000)
        .unwrap();
    assert_eq!(p8000["address"], "0.0.0.0");
    assert_eq!(p8000["path"], format!("/v1/sandboxes/{id}/ports/8000/"));
    assert_eq!(p8000["host"], preview_host(&s, &id, 8000));

    // A large file, by path, byte for byte; the answer runs in an opaque origin.
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (st, v) = put_file(&s, &id, "/srv/big.bin", &big).await;
    assert_eq!(st, 200, "{v}");
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/ports/8000/big.bin")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("sandbox") && !csp.contains("allow-same-origin"),
        "{csp}"
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &big[..]);

    // Uploads: a known length, and a stream of unknown length (chunked).
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/ports/8000/up?x=1")))
        .header("content-type", "text/plain")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&big))
    };
    assert_eq!(text, format!("{} {sha} /up?x=1", big.len()));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(100_000).map(|c| Ok(c.to_vec())).collect();
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/ports/8000/stream")))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        format!("{} {sha} /stream", big.len())
    );

    // Answers stream: the first part arrives while the server still sleeps.
    let t0 = Instant::now();
    let mut r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/ports/8000/slow")))
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"first\n");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"second\n");

    // By path, the app cannot set cookies on the API's origin; what it was sent.
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/ports/8000/cookie")))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("set-cookie").is_none());
    let seen = common::get_text(&s, &format!("/v1/sandboxes/{id}/ports/8000/headers"))
        .await
        .to_ascii_lowercase();
    assert!(seen.contains("host: localhost:8000"), "{seen}");
    assert!(
        seen.contains(&format!(
            "x-forwarded-prefix: /v1/sandboxes/{id}/ports/8000"
        )),
        "{seen}"
    );

    // By host: every path is the app's (even /v1/…), cookies pass, no CSP.
    let host = preview_host(&s, &id, 8000);
    let r = s
        .http
        .get(s.url("/cookie"))
        .header("host", &host)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-security-policy").is_none());
    assert_eq!(r.headers()["set-cookie"], "a=1; Path=/");
    let r = s
        .http
        .get(s.url("/v1/sandboxes"))
        .header("host", &host)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the app's 404, not the API's list");
    assert!(!r.text().await.unwrap().contains("\"sandboxes\""));
    let r = s
        .http
        .get(s.url("/big.bin"))
        .header("host", &host)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), big.len());

    // HTTP/2 from the client (the sandbox's server speaks HTTP/1.1).
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(s.url(&format!("/v1/sandboxes/{id}/ports/8000/big.bin")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &big[..]);

    // WebSockets, by path and by host: frames intact both ways.
    let ws_base = s.base.replacen("http://", "ws://", 1);
    let by_path = format!("{ws_base}/v1/sandboxes/{id}/ports/8765/");
    let mut by_host = format!("{ws_base}/chat").into_client_request().unwrap();
    by_host
        .headers_mut()
        .insert("host", preview_host(&s, &id, 8765).parse().unwrap());
    for req in [by_path.into_client_request().unwrap(), by_host] {
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        ws.send(Message::Text("hello".into())).await.unwrap();
        let blob: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        ws.send(Message::Binary(blob.clone().into())).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if matches!(m, Message::Text(_) | Message::Binary(_)) {
                got.push(m);
            }
        }
        assert_eq!(got[0], Message::Text("hello".into()));
        assert_eq!(got[1], Message::Binary(blob.into()));
        ws.close(None).await.unwrap();
    }

    // A closed port: a clear JSON 502.
    for url in [s.url(&format!("/v1/sandboxes/{id}/ports/9/")), s.url("/x")] {
        let mut r = s.http.get(&url);
        if url.ends_with("/x") {
            r = r.header("host", preview_host(&s, &id, 9));
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 502);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "port_closed", "{v}");
        assert!(v["error"].as_str().unwrap().contains("port 9"), "{v}");
    }
    // Bad ports and unknown sandboxes.
    let (st, v) = get(&s, &format!("/v1/sandboxes/{id}/ports/0/")).await;
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_request")));
    let (st, _) = get(&s, "/v1/sandboxes/sbx-0000000000000000/ports/8000/").await;
    assert_eq!(st, 404);

    // A page a sandbox serves is no trusted origin for the API (auth is off here).
    let r = s
        .http
        .post(s.url("/v1/sandboxes"))
        .header("origin", format!("http://{host}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(s.delete(&id).await, 204);
}

const ADMIN: &str = "fbk_test-admin-key-0123456789abcdefghijklmnop";

/// A server requiring keys, with a key for workspace `alice` and one for `mallory`.
async fn two_tenants() -> (Server, Vec<String>) {
    let s = Server::start_with(&[
        ("FORKBOX_AUTH", "true".into()),
        ("FORKBOX_ADMIN_KEY", ADMIN.into()),
    ]);
    let mut keys = Vec::new();
    for ws in ["alice", "mallory"] {
        let v: Value = s
            .http
            .post(s.url("/v1/auth/tokens"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": ws, "workspace": ws}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        keys.push(v["key"].as_str().unwrap().to_owned());
    }
    (s, keys)
}

#[tokio::test]
async fn with_auth_a_port_is_its_workspaces_only_and_the_key_stays_with_forkbox() {
    let (s, keys) = two_tenants().await;
    let (alice, mallory) = (&keys[0], &keys[1]);
    let id = app(&s, Some(alice)).await;
    let path = format!("/v1/sandboxes/{id}/ports/8000/headers");
    let host = preview_host(&s, &id, 8000);
    // Without a key, and with another workspace's: nothing there.
    let r = s.http.get(s.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    for (url, h) in [(s.url(&path), None), (s.url("/headers"), Some(&host))] {
        let mut r = s.http.get(&url).bearer_auth(mallory);
        if let Some(h) = h {
            r = r.header("host", h);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 404, "{url}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "not_found");
    }
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/ports")))
        .bearer_auth(mallory)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The owner's key, by path and by host (also as ?access_token=); the app never
    // sees it.
    for (url, h) in [
        (s.url(&path), None),
        (s.url("/headers"), Some(&host)),
        (s.url(&format!("{path}?access_token={alice}")), None),
    ] {
        let mut r = s.http.get(&url);
        if !url.contains("access_token") {
            r = r.header("x-api-key", alice.as_str());
        }
        if let Some(h) = h {
            r = r.header("host", h);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let seen = r.text().await.unwrap();
        assert!(!seen.contains(alice.as_str()), "{seen}");
        assert!(!seen.to_ascii_lowercase().contains("x-api-key"), "{seen}");
    }
    let r = s
        .http
        .delete(s.url(&format!("/v1/sandboxes/{id}")))
        .bearer_auth(alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn a_public_link_opens_one_port_without_a_key_until_it_expires() {
    let (s, keys) = two_tenants().await;
    let (alice, mallory) = (&keys[0], &keys[1]);
    let id = app(&s, Some(alice)).await;
    let link = |key: &str, body: Value| {
        s.http
            .post(s.url(&format!("/v1/sandboxes/{id}/previews")))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let r = link(alice, json!({"port": 8000})).await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let host = v["host"].as_str().unwrap().to_owned();
    assert_eq!(v["url"].as_str().unwrap(), format!("http://{host}/"));
    assert!(v["expires_at"].as_str().unwrap().starts_with("20"), "{v}");
    let open = |h: String, path: &'static str| s.http.get(s.url(path)).header("host", h).send();
    // No key needed; what the app sees carries none.
    let r = open(host.clone(), "/headers").await.unwrap();
    assert_eq!(r.status(), 200);
    // Another workspace cannot make a link to it; bad requests are 400.
    assert_eq!(
        link(mallory, json!({"port": 8000})).await.unwrap().status(),
        404
    );
    for bad in [
        json!({"port": 0}),
        json!({"port": 8000, "expires_in": 0}),
        json!({"port": 8000, "expires_in": 99_999_999}),
    ] {
        assert_eq!(
            link(alice, bad.clone()).await.unwrap().status(),
            400,
            "{bad}"
        );
    }
    // The link names one port of one sandbox: a changed signature, port or sandbox is
    // nothing (404, like a missing sandbox), and so is the plain host without a key.
    let (label, rest) = host.split_once('.').unwrap();
    let mut forged = label.to_owned();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let other_port = label.replacen("8000-", "8001-", 1);
    let mallorys = app(&s, Some(mallory)).await;
    let other_sbx = label.replacen(&id, &mallorys, 1);
    for l in [forged, other_port, other_sbx] {
        let r = open(format!("{l}.{rest}"), "/headers").await.unwrap();
        assert_eq!(r.status(), 404, "{l}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "not_found");
    }
    let r = open(preview_host(&s, &id, 8000), "/headers").await.unwrap();
    assert_eq!(r.status(), 401);
    // A page served on the link's host is no trusted origin for the API: the guard
    // refuses its call before any key is looked at.
    let r = s
        .http
        .post(s.url("/v1/sandboxes"))
        .header("origin", format!("http://{host}"))
        .header("content-type", "application/json")
        .bearer_auth(alice)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // It expires.
    let r = link(alice, json!({"port": 8000, "expires_in": 1}))
        .await
        .unwrap();
    let short = r.json::<Value>().await.unwrap()["host"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(open(short.clone(), "/headers").await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(open(short, "/headers").await.unwrap().status(), 404);
    // It ends with the sandbox.
    for (sbx, key) in [(&id, alice), (&mallorys, mallory)] {
        let r = s
            .http
            .delete(s.url(&format!("/v1/sandboxes/{sbx}")))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    assert_ne!(open(host, "/headers").await.unwrap().status(), 200);
}
