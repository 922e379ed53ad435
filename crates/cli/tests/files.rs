//! End-to-end: the files API over real HTTP against real sandboxes.

#![allow(clippy::unwrap_used)]

mod common;

use common::Server;
use serde_json::{json, Value};

fn files_url(s: &Server, id: &str, sub: &str, path: &str) -> String {
    let q: String = url_escape(path);
    s.url(&format!("/v1/sandboxes/{id}/files{sub}?path={q}"))
}

fn url_escape(p: &str) -> String {
    p.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn put(s: &Server, id: &str, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = s
        .http
        .put(files_url(s, id, "", path))
        .body(body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn get(s: &Server, id: &str, path: &str) -> (u16, Vec<u8>) {
    let r = s.http.get(files_url(s, id, "", path)).send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

async fn get_json(s: &Server, url: String) -> (u16, Value) {
    let r = s.http.get(url).send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn post_json(s: &Server, id: &str, sub: &str, body: Value) -> (u16, Value) {
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/files/{sub}")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn delete(s: &Server, id: &str, path: &str, recursive: bool) -> u16 {
    let mut url = files_url(s, id, "", path);
    if recursive {
        url.push_str("&recursive=true");
    }
    s.http.delete(url).send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn files_round_trip_and_metadata() {
    let s = Server::start();
    let id = s.create_id().await;
    // Write (parents made; relative paths are under /root), read back, seen by commands.
    let (st, body) = put(&s, &id, "notes/a b.txt", "hello\nworld\n").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body, json!({"path": "/root/notes/a b.txt", "size": 12}));
    assert_eq!(
        get(&s, &id, "/root/notes/a b.txt").await,
        (200, b"hello\nworld\n".to_vec())
    );
    assert_eq!(
        s.sh(&id, "cat '/root/notes/a b.txt'").await.0,
        "hello\nworld\n"
    );
    // Overwrite; binary content survives untouched.
    let bin: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    assert_eq!(
        put(&s, &id, "/root/notes/a b.txt", bin.clone()).await.0,
        200
    );
    assert_eq!(get(&s, &id, "/root/notes/a b.txt").await, (200, bin));
    // Files written by commands are readable too; raw endpoint is the same.
    s.sh(&id, "printf made-inside > /tmp/inside").await;
    let r = s
        .http
        .get(files_url(&s, &id, "/raw", "/tmp/inside"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"made-inside");
    // ls and stat.
    s.sh(
        &id,
        "ln -s /etc/hostname /root/notes/link && mkdir /root/notes/sub",
    )
    .await;
    let (st, ls) = get_json(&s, files_url(&s, &id, "/ls", "/root/notes")).await;
    assert_eq!(st, 200, "{ls}");
    let entries = ls["entries"].as_array().unwrap();
    let names: Vec<&str> = entries
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a b.txt", "link", "sub"]);
    assert_eq!(entries[0]["type"], "file");
    assert_eq!(entries[0]["size"], 5000);
    assert_eq!(entries[1]["type"], "symlink");
    assert_eq!(entries[1]["target"], "/etc/hostname");
    assert_eq!(entries[2]["type"], "dir");
    let (st, info) = get_json(&s, files_url(&s, &id, "/stat", "/root/notes/sub")).await;
    assert_eq!((st, info["type"].as_str()), (200, Some("dir")));
    // mkdir -p, rename, delete.
    let (st, info) = post_json(&s, &id, "mkdir", json!({"path": "/tmp/x/y/z"})).await;
    assert_eq!((st, info["path"].as_str()), (200, Some("/tmp/x/y/z")));
    let (st, _) = post_json(
        &s,
        &id,
        "rename",
        json!({"from": "/tmp/inside", "to": "/tmp/x/y/moved"}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(get(&s, &id, "/tmp/x/y/moved").await.1, b"made-inside");
    assert_eq!(get(&s, &id, "/tmp/inside").await.0, 404);
    assert_eq!(
        delete(&s, &id, "/tmp/x", false).await,
        409,
        "non-empty dir needs recursive"
    );
    assert_eq!(delete(&s, &id, "/tmp/x", true).await, 204);
    assert_eq!(s.sh(&id, "ls /tmp").await.0, "");
    // Errors are JSON with the right status.
    let (st, e) = get_json(&s, files_url(&s, &id, "", "/nope")).await;
    assert_eq!((st, e["code"].as_str()), (404, Some("file_not_found")));
    assert_eq!(
        get(&s, &id, "/root/notes").await.0,
        409,
        "a directory is not a file"
    );
    let (st, e) = get_json(&s, files_url(&s, &id, "", "")).await;
    assert_eq!(st, 400, "{e}");
    let (st, e) = get_json(&s, s.url(&format!("/v1/sandboxes/{id}/files"))).await;
    assert_eq!((st, e["code"].as_str()), (400, Some("invalid_request")));
    assert_eq!(put(&s, "sbx-nope", "/x", "y").await.0, 404);
    // Nothing of the uploads is left behind.
    assert!(!s
        .sh(&id, "ls -a /root/notes")
        .await
        .0
        .contains(".forkbox-upload"));
    assert_eq!(s.delete(&id).await, 204);
    assert_eq!(put(&s, &id, "/x", "y").await.0, 410);
}

#[tokio::test]
async fn paths_never_leave_the_sandbox() {
    let s = Server::start();
    let id = s.create_id().await;
    // A file on the host that no path may reach.
    let marker = format!("forkbox-host-marker-{}", std::process::id());
    let host_file = std::path::Path::new("/tmp").join(&marker);
    std::fs::write(&host_file, "HOST SECRET").unwrap();
    s.sh(&id, "echo sandbox-etc > /etc/forkbox-probe").await;
    // `..` is refused outright, and so is a NUL byte.
    for p in [
        "/../../../../etc/forkbox-probe",
        "../../etc/shadow",
        "/root/../../../etc/shadow",
        &format!("../../../../../tmp/{marker}"),
        "/etc/sha\0dow",
    ] {
        let (st, body) = get(&s, &id, p).await;
        assert_eq!(st, 400, "{p}: {}", String::from_utf8_lossy(&body));
    }
    assert_eq!(put(&s, &id, "../../tmp/planted", "x").await.0, 400);
    // Absolute paths are the sandbox's own files.
    assert_eq!(
        get(&s, &id, "/etc/forkbox-probe").await,
        (200, b"sandbox-etc\n".to_vec())
    );
    assert_eq!(get(&s, &id, &format!("/tmp/{marker}")).await.0, 404);
    // Absolute symlinks resolve inside the sandbox.
    s.sh(&id, "ln -s / /root/up && ln -s /tmp /root/tmplink")
        .await;
    assert_eq!(
        get(&s, &id, "/root/up/etc/forkbox-probe").await,
        (200, b"sandbox-etc\n".to_vec())
    );
    assert_eq!(get(&s, &id, &format!("/root/up/tmp/{marker}")).await.0, 404);
    // Magic links (/proc/<pid>/root, fd, cwd, exe) are refused outright.
    for p in [
        "/proc/1/root/etc/hostname",
        "/proc/self/root/etc/hostname",
        "/proc/1/exe",
    ] {
        let (st, _) = get(&s, &id, p).await;
        assert!(st == 400 || st == 403 || st == 404, "{p}: {st}");
    }
    s.sh(&id, "ln -s /proc/1/root /root/magic").await;
    let (st, _) = put(&s, &id, "/root/magic/tmp/planted", "x").await;
    assert!(st >= 400, "write through a magic link: {st}");
    // Writes through a symlink land inside the sandbox, never on the host.
    let (st, _) = put(&s, &id, &format!("/root/tmplink/{marker}"), "from-api").await;
    assert_eq!(st, 200);
    assert_eq!(s.sh(&id, &format!("cat /tmp/{marker}")).await.0, "from-api");
    assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "HOST SECRET");
    // A path swapped between a directory and a symlink while transfers run never
    // leads outside either.
    s.sh(&id, "mkdir -p /root/sw.d && echo inside > /root/sw.d/f && (while :; do ln -sfn /proc/1/root/tmp /root/sw.l; mv -T /root/sw.l /root/sw 2>/dev/null; rm -rf /root/sw; ln -s sw.d /root/sw; done) >/dev/null 2>&1 &").await;
    for i in 0..40 {
        let (st, body) = get(&s, &id, "/root/sw/f").await;
        assert!(st != 200 || body == b"inside\n", "read #{i}: {st} {body:?}");
        let _ = put(&s, &id, &format!("/root/sw/{marker}"), "swapped").await;
    }
    assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "HOST SECRET");
    std::fs::remove_file(&host_file).unwrap();
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn large_files_stream_without_filling_server_memory() {
    let s = Server::start();
    let id = s.create(json!({"memory_mb": 256})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let size: usize = 100 * 1024 * 1024;
    let chunk: Vec<u8> = (0..1024 * 1024)
        .map(|i: usize| (i * 7 % 251) as u8)
        .collect();
    let rss_before = s.rss_kib();
    // Streamed upload: 100 chunks of 1 MiB.
    let c = chunk.clone();
    let stream = futures_util::stream::iter(
        (0..size / chunk.len()).map(move |_| Ok::<_, std::io::Error>(c.clone())),
    );
    // Through the raw endpoint both ways.
    let r = s
        .http
        .put(files_url(&s, &id, "/raw", "/root/big.bin"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["size"], size);
    assert_eq!(
        s.sh(&id, "stat -c %s /root/big.bin").await.0.trim(),
        size.to_string()
    );
    // Streamed download, compared chunk by chunk.
    let mut r = s
        .http
        .get(files_url(&s, &id, "", "/root/big.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-length"], size.to_string().as_str());
    let mut got = 0usize;
    while let Some(b) = r.chunk().await.unwrap() {
        for (i, byte) in b.iter().enumerate() {
            assert_eq!(*byte, chunk[(got + i) % chunk.len()], "byte {}", got + i);
        }
        got += b.len();
    }
    assert_eq!(got, size);
    let grew_mib = (s.rss_kib().saturating_sub(rss_before)) / 1024;
    assert!(
        grew_mib < 40,
        "server RSS grew by {grew_mib} MiB moving 200 MiB"
    );
    // Over the limit: a declared length is refused at once; an undeclared one is cut
    // off at the limit and leaves nothing behind.
    let r = s
        .http
        .put(files_url(&s, &id, "/raw", "/root/huge.bin"))
        .header("content-length", (501u64 * 1024 * 1024).to_string())
        .body("short")
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status().as_u16(), 413);
    }
    let c = chunk.clone();
    let stream =
        futures_util::stream::iter((0..501).map(move |_| Ok::<_, std::io::Error>(c.clone())));
    let (st, body) = put(
        &s,
        &id,
        "/root/huge.bin",
        reqwest::Body::wrap_stream(stream),
    )
    .await;
    assert_eq!(st, 413, "{body}");
    assert_eq!(body["code"], "body_too_large");
    // The agent drops the partial upload when the cut-off stream reaches it.
    let mut left = String::new();
    for _ in 0..100 {
        left = s.sh(&id, "ls -a /root").await.0;
        if !left.contains(".forkbox-upload") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        !left.contains("huge.bin") && !left.contains(".forkbox-upload"),
        "{left}"
    );
    assert_eq!(s.delete(&id).await, 204);
}
