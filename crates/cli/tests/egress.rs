//! End-to-end: egress control. An upstream HTTP server runs in a network namespace this
//! test makes; sandboxes reach it only through their proxy, only by listed names, and
//! never reach the host's own addresses, loopback or link-local metadata.

#![allow(clippy::unwrap_used)]

mod common;

use common::Server;
use serde_json::{json, Value};
use std::process::{Child, Command};

/// A network namespace with a veth to the host and an HTTP server on port 8000.
struct Upstream {
    ns: String,
    host_ip: String,
    ip: String,
    server: Child,
    _dir: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Upstream {
    fn start() -> Upstream {
        let n = std::process::id() % 250 + 1;
        let ns = format!("fbtest-up-{n}");
        let veth = format!("fbtu{n}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        let (host_ip, up_ip) = (format!("10.251.{n}.1"), format!("10.251.{n}.2"));
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{up_ip}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), "hello from upstream\n").unwrap();
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                "-m",
                "http.server",
                "8000",
                "--bind",
                &up_ip,
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until it answers (from the host, directly).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect((up_ip.as_str(), 8000)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "upstream did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Upstream {
            ns,
            host_ip,
            ip: up_ip,
            server,
            _dir: dir,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// Probes run inside a sandbox; prints one JSON object of results.
const PROBE: &str = r#"
import json, socket, sys, urllib.request, urllib.error, http.client
up, loop_port = sys.argv[1], int(sys.argv[2])
out = {}
def get(name, url):
    try:
        r = urllib.request.urlopen(url, timeout=10)
        out[name] = [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        out[name] = [e.code, e.read().decode()]
    except Exception as e:
        out[name] = ["error", repr(e)]
def tunnel(name, host, port):
    c = http.client.HTTPConnection("10.200.0.1", 3128, timeout=10)
    try:
        c.set_tunnel(host, port)
        c.request("GET", "/hello.txt")
        r = c.getresponse()
        out[name] = [r.status, r.read().decode()]
    except OSError as e:
        out[name] = ["refused", str(e)]
def direct(name, host, port):
    try:
        socket.create_connection((host, port), 3).close()
        out[name] = "connected"
    except OSError as e:
        out[name] = "failed: " + str(e)
get("allowed", "http://allowed.test:8000/hello.txt")
get("denied", "http://denied.test:8000/hello.txt")
get("wildcard", "http://api.wild.test:8000/hello.txt")
get("to_loopback", "http://loop.test:%d/" % loop_port)
get("to_metadata", "http://meta.test/latest/meta-data/")
get("to_host_address", "http://hostaddr.test:8000/")
tunnel("tunnel_allowed", "allowed.test", 8000)
tunnel("tunnel_by_ip", up, 8000)
tunnel("tunnel_denied", "denied.test", 8000)
direct("direct_upstream", up, 8000)
direct("direct_metadata", "169.254.169.254", 80)
direct("direct_host_loopback", "127.0.0.1", loop_port)
direct("proxy_host_other_port", "10.200.0.1", 22)
print(json.dumps(out))
"#;

async fn probe(s: &Server, id: &str, up: &Upstream, loop_port: u16) -> Value {
    let r = s
        .http
        .put(s.url(&format!("/v1/sandboxes/{id}/files?path=/root/probe.py")))
        .body(PROBE)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let (out, err, code) = s
        .sh(id, &format!("python3 /root/probe.py {} {loop_port}", up.ip))
        .await;
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out} {err}"))
}

fn status(v: &Value, k: &str) -> Value {
    v[k][0].clone()
}

#[tokio::test]
async fn egress_admits_listed_names_only_and_never_the_host() {
    let up = Upstream::start();
    // A service on the host's loopback that no sandbox may reach.
    let host_service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let loop_port = host_service.local_addr().unwrap().port();
    let resolve = format!(
        "allowed.test={ip},denied.test={ip},api.wild.test={ip},loop.test=127.0.0.1,meta.test=169.254.169.254,hostaddr.test={host}",
        ip = up.ip,
        host = up.host_ip
    );
    let (s, _log) = Server::start_logged_with(&[("FORKBOX_EGRESS_RESOLVE", resolve)]);
    let sb = s
        .create(json!({"egress_allowlist": [
            "allowed.test", "*.wild.test", "loop.test", "meta.test", "hostaddr.test"
        ]}))
        .await;
    assert_eq!(
        sb["egress_allowlist"],
        json!([
            "allowed.test",
            "*.wild.test",
            "loop.test",
            "meta.test",
            "hostaddr.test"
        ])
    );
    let id = sb["id"].as_str().unwrap().to_owned();
    let (env, _, _) = s.sh(&id, "echo $HTTP_PROXY $https_proxy").await;
    assert_eq!(env.trim(), "http://10.200.0.1:3128 http://10.200.0.1:3128");

    let r = probe(&s, &id, &up, loop_port).await;
    // Listed names go through, plain HTTP and CONNECT.
    assert_eq!(r["allowed"], json!([200, "hello from upstream\n"]), "{r}");
    assert_eq!(r["wildcard"][0], 200, "{r}");
    assert_eq!(
        r["tunnel_allowed"],
        json!([200, "hello from upstream\n"]),
        "{r}"
    );
    // Unlisted names and bare addresses are refused by the proxy.
    assert_eq!(status(&r, "denied"), 403, "{r}");
    assert!(r["denied"][1]
        .as_str()
        .unwrap()
        .contains("not in this sandbox's egress allowlist"));
    for k in ["tunnel_by_ip", "tunnel_denied"] {
        assert_eq!(r[k][0], "refused", "{k}: {r}");
        assert!(r[k][1].as_str().unwrap().contains("403"), "{k}: {r}");
    }
    // Listed names that lead to the host itself or to link-local metadata: refused.
    for k in ["to_loopback", "to_metadata", "to_host_address"] {
        assert_eq!(status(&r, k), 403, "{k}: {r}");
    }
    // Nothing is reachable directly: no route out, and the sandbox's loopback is its own.
    for k in [
        "direct_upstream",
        "direct_metadata",
        "direct_host_loopback",
        "proxy_host_other_port",
    ] {
        assert!(r[k].as_str().unwrap().starts_with("failed"), "{k}: {r}");
    }
    assert!(
        r["direct_upstream"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{r}"
    );

    // Fork children get their own link with the same allowlist.
    let (st, fork) = common::post(&s, &format!("/v1/sandboxes/{id}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{fork}");
    let child = fork["children"][0].as_str().unwrap().to_owned();
    let rc = probe(&s, &child, &up, loop_port).await;
    assert_eq!(rc["allowed"][0], 200, "{rc}");
    assert_eq!(status(&rc, "denied"), 403, "{rc}");
    assert!(rc["direct_upstream"]
        .as_str()
        .unwrap()
        .starts_with("failed"));

    // Without an allowlist: loopback only, no proxy at all.
    let plain = s.create_id().await;
    let rp = probe(&s, &plain, &up, loop_port).await;
    assert!(
        rp["allowed"][0] == "error" && rp["tunnel_allowed"][0] == "refused",
        "{rp}"
    );
    let (links, _, _) = s.sh(&plain, "ip -o link | cut -d: -f2").await;
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), ["lo"]);

    // Bad allowlists and the unavailable NAT mode are 400s.
    for body in [
        json!({"egress_allowlist": ["http://x.org"]}),
        json!({"egress_allowlist": ["*"]}),
        json!({"network": "full"}),
        json!({"network": "bogus"}),
    ] {
        let (st, v) = common::post(&s, "/v1/sandboxes", body.clone()).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (400, Some("invalid_request")),
            "{body}: {v}"
        );
    }
    for sid in [&child, &id, &plain] {
        assert_eq!(s.delete(sid).await, 204);
    }
    drop(host_service);
}

#[tokio::test]
async fn an_adopted_sandbox_gets_its_proxy_back() {
    let mut s = Server::start();
    let id = s.create(json!({"egress_allowlist": ["only.test"]})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ask = "python3 -c \"import urllib.request, urllib.error
try:
    urllib.request.urlopen('http://other.test/', timeout=10)
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode().strip())
\"";
    let (out, err, _) = s.sh(&id, ask).await;
    assert_eq!(
        out.trim(),
        "403 forkbox egress: other.test is not in this sandbox's egress allowlist",
        "{err}"
    );
    s.kill_and_restart();
    let (out, err, _) = s.sh(&id, ask).await;
    assert!(out.starts_with("403 forkbox egress"), "{out} {err}");
    assert_eq!(s.delete(&id).await, 204);
}
