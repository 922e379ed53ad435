//! End-to-end: the escape-probe suite. The static `forkbox-probe` binary (crates/probe,
//! `make probe`) is uploaded into real sandboxes over the HTTP API and run there; every
//! attack must fail. As a control, the same binary runs on the host (as root, outside
//! any sandbox) where the attacks that can be tried harmlessly must succeed, so that a
//! broken probe cannot pass silently.

#![allow(clippy::unwrap_used)]

mod common;

use common::{collect, Server};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Probes that escape today. Each entry is a real hole, described in
/// docs/threat-model.md ("Escape probes"); the sandbox test still runs the probe and
/// fails if it stops escaping (so the entry gets removed once the hole is closed).
/// Empty since disk limits are on by default (btrfs simple quotas).
const KNOWN_ESCAPES: &[(&str, &str)] = &[];

/// Probes that do not escape but break the attacker's own sandbox, which should keep
/// working. Empty since the zygote cannot be signalled by user code (`kill_all`) and
/// /tmp is capped below the memory limit with the agent shielded from the OOM killer
/// (`tmpfs_fill`).
const KNOWN_SELF_DOS: &[&str] = &[];

/// Run in their own sandbox by `resource_probes_stay_within_limits`.
const RESOURCE: &[&str] = &["fork_bomb", "memory_bomb", "disk_fill", "fd_exhaustion"];

/// Only run when named; each has its own test.
const NAMED_ONLY: &[&str] = &["kill_all", "stdout_flood", "tmpfs_fill"];

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn probe_bin() -> PathBuf {
    let p = std::env::var_os("FORKBOX_PROBE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/probe/forkbox-probe"));
    assert!(
        p.exists(),
        "static probe {} missing: run `make probe` (or `make test`)",
        p.display()
    );
    p
}

#[derive(Debug, Clone)]
struct Res {
    escaped: bool,
    detail: String,
    skipped: bool,
}

/// The probe's JSON lines in `out`, by probe name.
fn parse(out: &str) -> BTreeMap<String, Res> {
    out.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["probe"].as_str()?.to_owned(),
                Res {
                    escaped: v["escaped"].as_bool()?,
                    detail: v["detail"].as_str().unwrap_or("").to_owned(),
                    skipped: v["skipped"].as_bool().unwrap_or(false),
                },
            ))
        })
        .collect()
}

fn list(flag: &str) -> Vec<String> {
    let out = Command::new(probe_bin()).arg(flag).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// PUT the probe into the sandbox as /root/forkbox-probe.
async fn upload(s: &Server, id: &str) {
    let bytes = std::fs::read(probe_bin()).unwrap();
    let r = s
        .http
        .put(s.url(&format!(
            "/v1/sandboxes/{id}/files?path=/root/forkbox-probe"
        )))
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "upload: {:?}", r.text().await);
    let (_, err, code) = s.sh(id, "chmod 755 /root/forkbox-probe").await;
    assert_eq!(code, 0, "{err}");
}

/// Runs one probe in the sandbox; its result (panics if it reported none).
async fn run_in(s: &Server, id: &str, name: &str, args: &str) -> Res {
    let cmd = format!("exec /root/forkbox-probe {args} {name}");
    let (status, events) = s.exec(id, json!({"cmd": cmd, "timeout": 600})).await;
    assert_eq!(status, 200, "{name}: {events:?}");
    let (out, err, code) = collect(&events);
    let mut got = parse(&out);
    match got.remove(name) {
        Some(r) => r,
        None => {
            panic!("probe {name} reported nothing (exit {code}): stdout {out:?} stderr {err:?}")
        }
    }
}

/// Checks a sandbox run: nothing escaped but the known holes, nothing skipped. Prints
/// the results (the docs' table comes from them).
fn judge(results: &BTreeMap<String, Res>) {
    let known: BTreeMap<&str, &str> = KNOWN_ESCAPES.iter().copied().collect();
    let mut failures = Vec::new();
    for (name, r) in results {
        eprintln!(
            "probe {name:<18} {:<8} {}",
            if r.escaped { "ESCAPED" } else { "blocked" },
            r.detail
        );
        if r.skipped {
            failures.push(format!("{name}: skipped in the sandbox: {}", r.detail));
        } else if r.escaped && !known.contains_key(name.as_str()) {
            failures.push(format!("{name} ESCAPED: {}", r.detail));
        } else if !r.escaped && known.contains_key(name.as_str()) {
            failures.push(format!(
                "{name} is listed in KNOWN_ESCAPES but no longer escapes ({}): remove it",
                r.detail
            ));
        } else if r.escaped {
            eprintln!("  known hole: {}", known[name.as_str()]);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// This machine's first non-loopback IPv4 address, if any (no packet is sent).
fn host_ip() -> Option<std::net::IpAddr> {
    let u = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    u.connect("192.0.2.1:9").ok()?;
    let ip = u.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A TCP listener on the host that counts the connections it accepts.
fn counting_listener(addr: &str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = std::net::TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let m = n.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            if c.is_ok() {
                m.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    (port, n)
}

fn api_port(s: &Server) -> u16 {
    s.base.rsplit(':').next().unwrap().parse().unwrap()
}

/// What the probes must not reach, with sandbox `b` as the other sandbox: its abstract
/// Unix socket (a listener started in it) and agent socket, the host's own Unix sockets
/// (abstract and path) and TCP services of the host on loopback and its own address.
struct Targets {
    args: String,
    lo_hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    any_hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _listeners: (UnixListener, UnixListener),
}

/// Checks that B's abstract socket answers.
const B_CHECK: &str = "for i in $(seq 50); do python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); \
                 s.connect('\\0forkbox-probe-b')\" 2>/dev/null && echo up && break; sleep 0.1; done";

impl Targets {
    async fn set_up(s: &Server, b: &str) -> Targets {
        let listen = "nohup python3 -c \"import socket, time; s = socket.socket(socket.AF_UNIX); \
                      s.bind('\\0forkbox-probe-b'); s.listen(); time.sleep(3600)\" \
                      >/dev/null 2>&1 &";
        s.sh(b, listen).await;
        assert_eq!(
            s.sh(b, B_CHECK).await.0,
            "up\n",
            "B's socket is not listening"
        );
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let host_abstract = format!(
            "forkbox-probe-host-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(host_abstract.as_bytes()).unwrap();
        let abstract_listener = UnixListener::bind_addr(&addr).unwrap();
        let host_path = s.data.path().join("host.sock");
        let _ = std::fs::remove_file(&host_path);
        let path_listener = UnixListener::bind(&host_path).unwrap();
        let b_agent = s.data.path().join("run").join(b).join("agent.sock");
        assert!(b_agent.exists(), "{}", b_agent.display());
        let (lo_port, lo_hits) = counting_listener("127.0.0.1:0");
        let (any_port, any_hits) = counting_listener("0.0.0.0:0");
        let mut args = format!(
            "--port {} --abstract forkbox-probe-b --abstract {host_abstract} --unix {} --unix {} \
             --tcp 127.0.0.1:{lo_port}",
            api_port(s),
            host_path.display(),
            b_agent.display()
        );
        if let Some(ip) = host_ip() {
            args.push_str(&format!(" --tcp {ip}:{any_port}"));
        }
        Targets {
            args,
            lo_hits,
            any_hits,
            _listeners: (abstract_listener, path_listener),
        }
    }

    /// Nothing reached the host's listeners; B and the server are fine.
    async fn untouched(&self, s: &Server, b: &str) {
        assert_eq!(self.lo_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(self.any_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(s.sh(b, B_CHECK).await.0, "up\n");
        let h = s.http.get(s.url("/v1/healthz")).send().await.unwrap();
        assert_eq!(h.status(), 200);
    }
}

/// The probes every situation runs (not the resource ones, which have their test).
fn sandbox_probes() -> Vec<String> {
    let names: Vec<String> = list("--list")
        .into_iter()
        .filter(|n| !RESOURCE.contains(&n.as_str()))
        .collect();
    assert!(names.len() >= 40, "only {} probes: {names:?}", names.len());
    names
}

#[tokio::test]
async fn every_probe_fails_inside_a_sandbox() {
    let s = Server::start();
    let a = s.create_id().await;
    let b = s.create_id().await;
    upload(&s, &a).await;
    let targets = Targets::set_up(&s, &b).await;
    let names = sandbox_probes();
    // Every probe is run by one of this file's tests.
    for n in list("--list-all") {
        assert!(
            names.contains(&n)
                || RESOURCE.contains(&n.as_str())
                || NAMED_ONLY.contains(&n.as_str()),
            "probe {n} is run by no test"
        );
    }
    let mut results = BTreeMap::new();
    for n in &names {
        results.insert(n.clone(), run_in(&s, &a, n, &targets.args).await);
    }
    judge(&results);
    targets.untouched(&s, &b).await;
    assert_eq!(s.sh(&a, "echo alive").await.0, "alive\n");
    assert_eq!(s.delete(&a).await, 204);
    assert_eq!(s.delete(&b).await, 204);
}

/// The probes in the situations the outside review attacked from (issue 20): auth on
/// with the attacker's sandbox in one workspace and another tenant's sandbox on the
/// host, the attacker's egress proxy on, a live fork child of the attacker's sandbox,
/// and a template build running. Run in the fork parent and in its child.
#[tokio::test]
async fn every_probe_fails_in_every_situation() {
    const ADMIN: &str = "fbk_test-admin-key-0123456789abcdefghijklmnop";
    let mut s = Server::start_with(&[
        ("FORKBOX_AUTH", "true".into()),
        ("FORKBOX_ADMIN_KEY", ADMIN.into()),
    ]);
    let keyed = |key: &str| {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        reqwest::Client::builder()
            .default_headers(h)
            .build()
            .unwrap()
    };
    let mut keys = Vec::new();
    for ws in ["attacker", "victim"] {
        let r = keyed(ADMIN)
            .post(s.url("/v1/auth/tokens"))
            .json(&json!({"name": ws, "workspace": ws}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        keys.push(v["key"].as_str().unwrap().to_owned());
    }
    // The other tenant's sandbox.
    s.http = keyed(&keys[1]);
    let b = s.create_id().await;
    let targets = Targets::set_up(&s, &b).await;
    // The attacker: egress on, a live REPL and a live fork child.
    s.http = keyed(&keys[0]);
    let a = s
        .create(json!({"egress_allowlist": ["example.invalid"]}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    upload(&s, &a).await;
    common::py(&s, &a, "x = 1").await;
    let (st, forked) = common::post(&s, &format!("/v1/sandboxes/{a}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{forked}");
    let child = forked["children"][0].as_str().unwrap().to_owned();
    // A template build running meanwhile (its build sandbox lives while it runs).
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let build = {
        let (http, url) = (keyed(ADMIN), s.url("/v1/templates"));
        let name = format!("probe-situation-{}", std::process::id());
        tokio::spawn(async move {
            let mut r = http
                .post(url)
                .json(&json!({"name": name, "base": "python", "run": ["sleep 600"]}))
                .send()
                .await
                .unwrap();
            let (mut text, mut tx) = (String::new(), Some(started_tx));
            while let Ok(Some(chunk)) = r.chunk().await {
                text.push_str(&String::from_utf8_lossy(&chunk));
                if text.contains("sleep 600") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(120), started_rx)
        .await
        .expect("the build did not start")
        .unwrap();
    let names = sandbox_probes();
    for id in [&a, &child] {
        let mut results = BTreeMap::new();
        for n in &names {
            results.insert(n.clone(), run_in(&s, id, n, &targets.args).await);
        }
        eprintln!("-- in {id}");
        judge(&results);
    }
    build.abort();
    s.http = keyed(&keys[1]);
    targets.untouched(&s, &b).await;
    s.http = keyed(&keys[0]);
    let (out, _, code) = common::py(&s, &child, "print(x)").await;
    assert_eq!((out.as_str(), code), ("1\n", 0));
}

#[tokio::test]
async fn resource_probes_stay_within_limits() {
    let s = Server::start();
    // A disk limit below the probe's 2 GiB cap (btrfs simple quotas, the default).
    let id = s.create(json!({"memory_mb": 256, "disk_mb": 512})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    upload(&s, &id).await;
    let mut results = BTreeMap::new();
    for n in RESOURCE {
        let r = run_in(
            &s,
            &id,
            n,
            "--mem-cap-mb 1024 --mem-limit-mb 256 --disk-cap-mb 2048",
        )
        .await;
        results.insert(n.to_string(), r);
    }
    judge(&results);
    // The sandbox survived its own bombs and took its files with it; the server is fine.
    assert_eq!(s.sh(&id, "echo alive").await.0, "alive\n");
    let (out, _, _) = s
        .sh(&id, "ls -A /root /tmp | grep -c forkbox-probe-fill")
        .await;
    assert_eq!(out, "0\n", "the fill files were left behind");
    let (out, _, _) = s.sh(&id, "du -sxm /root | cut -f1").await;
    let mib: u64 = out.trim().parse().unwrap();
    assert!(mib < 64, "/root still holds {mib} MiB");
    let h = s.http.get(s.url("/v1/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn tmpfs_fill_stays_in_the_sandbox() {
    let s = Server::start();
    let a = s.create(json!({"memory_mb": 256})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = s.create_id().await;
    upload(&s, &a).await;
    let cmd = "exec /root/forkbox-probe --disk-cap-mb 2048 tmpfs_fill";
    let (status, events) = s.exec(&a, json!({"cmd": cmd, "timeout": 600})).await;
    let res = if status == 200 {
        parse(&collect(&events).0).remove("tmpfs_fill")
    } else {
        None
    };
    eprintln!("tmpfs_fill: {res:?} (exec {status})");
    // Never more than the sandbox's memory, whatever happened.
    if let Some(r) = &res {
        assert!(!r.escaped, "tmpfs_fill ESCAPED: {}", r.detail);
    }
    let (st, ev) = s.exec(&a, json!({"cmd": "echo alive"})).await;
    let works = st == 200 && collect(&ev).0 == "alive\n";
    if KNOWN_SELF_DOS.contains(&"tmpfs_fill") {
        assert!(
            !works,
            "tmpfs_fill no longer breaks its own sandbox ({res:?}): remove it from KNOWN_SELF_DOS"
        );
        eprintln!("known problem: after filling /tmp the sandbox is gone: {ev:?}");
    } else {
        assert!(
            works,
            "after tmpfs_fill the sandbox cannot run commands: {ev:?}"
        );
        assert!(res.is_some(), "tmpfs_fill reported nothing: {events:?}");
    }
    // The neighbour and the server carry on.
    assert_eq!(s.sh(&b, "echo alive").await.0, "alive\n");
    let h = s.http.get(s.url("/v1/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    s.delete(&a).await;
    assert_eq!(s.delete(&b).await, 204);
}

/// A child process killed and reaped when dropped (also when the test fails).
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The uid the sandboxes' root maps to on the host (the owner of a sandbox's root: of
/// its own layer, `upper`, when layered).
fn sandbox_uid(s: &Server, id: &str) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let root = s.pool.join("sandboxes").join(id);
    let upper = root.join("upper");
    std::fs::metadata(if upper.exists() { upper } else { root })
        .unwrap()
        .uid()
}

#[tokio::test]
async fn kill_all_reaches_only_the_sandbox() {
    let s = Server::start();
    let a = s.create_id().await;
    let b = s.create_id().await;
    upload(&s, &a).await;
    // Sentinels: a process of another sandbox, and a host process running as the very
    // uid the sandboxes' root is on the host (what kill(-1) could reach without a PID
    // namespace).
    s.sh(&b, "nohup sleep 3600 >/dev/null 2>&1 &").await;
    let uid = sandbox_uid(&s, &a);
    assert!(uid >= 100000, "sandbox uid {uid}");
    let mut sentinel = Reap(
        Command::new("sleep")
            .arg("3600")
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // `exec`, so that the probe is the command itself rather than a child of the shell
    // it is about to kill.
    let r = run_in(&s, &a, "kill_all", "").await;
    eprintln!("kill_all: {}", r.detail);
    assert!(!r.escaped, "{}", r.detail);
    assert!(r.detail.contains("PID 1 alive"), "{}", r.detail);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        sentinel.0.try_wait().unwrap().is_none(),
        "kill(-1) in a sandbox killed a host process of uid {uid}"
    );
    let (out, _, _) = s.sh(&b, "ps -eo comm=").await;
    assert!(out.contains("sleep"), "B's sleep is gone: {out}");
    // The attacker's sandbox is still there (its PID 1 survives kill(-1)) and should
    // keep working.
    let (st, rec) = common::get(&s, &format!("/v1/sandboxes/{a}")).await;
    assert_eq!(
        (st, rec["status"].as_str()),
        (200, Some("running")),
        "{rec}"
    );
    let (st, ev) = s.exec(&a, json!({"cmd": "echo alive"})).await;
    let works = st == 200 && collect(&ev).0 == "alive\n";
    if KNOWN_SELF_DOS.contains(&"kill_all") {
        assert!(
            !works,
            "kill_all no longer breaks its own sandbox: remove it from KNOWN_SELF_DOS"
        );
        eprintln!("known problem: after kill(-1) the sandbox cannot run commands: {ev:?}");
    } else {
        assert!(
            works,
            "after kill(-1) the sandbox cannot run commands: {ev:?}"
        );
    }
    let h = s.http.get(s.url("/v1/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    drop(sentinel);
    assert_eq!(s.delete(&a).await, 204);
    assert_eq!(s.delete(&b).await, 204);
}

#[tokio::test]
async fn stdout_flood_keeps_the_server_responsive() {
    let s = Server::start();
    let id = s.create_id().await;
    upload(&s, &id).await;
    let idle = s.rss_kib();
    let mut r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec")))
        .json(&json!({"cmd": "/root/forkbox-probe stdout_flood", "timeout": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (mut bytes, mut peak, mut n) = (0usize, 0u64, 0u64);
    let mut tail: Vec<u8> = Vec::new();
    let mut slowest = Duration::ZERO;
    while let Some(c) = r.chunk().await.unwrap() {
        bytes += c.len();
        tail.extend_from_slice(&c);
        if tail.len() > 1 << 20 {
            tail.drain(..tail.len() - (256 << 10));
        }
        n += 1;
        if n.is_multiple_of(200) {
            let t = Instant::now();
            s.breathe(&mut peak, Duration::from_millis(2)).await;
            slowest = slowest.max(t.elapsed());
        }
    }
    assert!(bytes > 100 << 20, "only {bytes} bytes streamed");
    assert!(
        peak < idle + 100 * 1024,
        "server RSS grew from {idle} KiB to {peak} KiB"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "healthz took {slowest:?} during the flood"
    );
    let text = String::from_utf8_lossy(&tail);
    let out: String = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["data"].as_str().map(str::to_owned))
        .collect();
    let got = parse(&out);
    let res = got.get("stdout_flood").expect("the probe's report line");
    eprintln!("stdout_flood: {}", res.detail);
    assert!(res.detail.starts_with("wrote 100 MiB"), "{}", res.detail);
    assert_eq!(s.sh(&id, "echo alive").await.0, "alive\n");
    assert_eq!(s.delete(&id).await, 204);
}

/// Why a control cannot be tried on this host, if it cannot.
fn control_unavailable(name: &str) -> Option<String> {
    let missing = |p: &str| (!Path::new(p).exists()).then(|| format!("{p} does not exist here"));
    match name {
        "dev_kvm" => missing("/dev/kvm"),
        "dev_kmsg" => missing("/dev/kmsg"),
        "proc_kcore" => missing("/proc/kcore"),
        "sysrq_trigger" => missing("/proc/sysrq-trigger"),
        "af_vsock" => {
            // SAFETY: a plain socket call; closed at once.
            let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                Some("no AF_VSOCK in this kernel".into())
            } else {
                // SAFETY: our own fd.
                unsafe { libc::close(fd) };
                None
            }
        }
        "metadata_ip" => std::net::TcpStream::connect_timeout(
            &"169.254.169.254:80".parse().unwrap(),
            Duration::from_secs(2),
        )
        .err()
        .map(|e| format!("no metadata service reachable from the host ({e})")),
        "fd_exhaustion" => {
            // The control raises the hard RLIMIT_NOFILE: needs CAP_SYS_RESOURCE (24).
            let st = std::fs::read_to_string("/proc/self/status").unwrap();
            let eff = st
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(0);
            (eff & (1 << 24) == 0).then(|| "the host's root lacks CAP_SYS_RESOURCE".into())
        }
        _ => None,
    }
}

/// Runs the probe on the host with `args`; its results.
fn run_on_host(cmd: &mut Command) -> BTreeMap<String, Res> {
    let out = spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )
    .wait_with_output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "probe on the host failed: {text}");
    parse(&text)
}

/// `cmd` started, tried again while its binary is "busy": a copy just written is
/// briefly held open for writing by any process another test's thread forks at that
/// moment (until that process execs), and `execve` of it fails with ETXTBSY.
fn spawn(cmd: &mut Command) -> std::process::Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r.unwrap(),
        }
    }
}

/// A copy of the probe in `dir`, mode 0755.
fn copy_probe(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("forkbox-probe");
    std::fs::copy(probe_bin(), &p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn probes_succeed_on_the_host() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the host control needs root: run it with `make test` as root"
    );
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("forkbox-probe-control-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o755)).unwrap();
    let helper_bin = copy_probe(dir.path());

    // A helper process in its own UTS and IPC namespaces: the target of the attacks on
    // other processes (never PID 1 or anything else of the host).
    let mut helper = Command::new(&helper_bin);
    helper.args(["--sleep", "120"]).stdin(Stdio::null());
    // SAFETY: unshare only affects the forked child.
    unsafe {
        helper.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUTS | libc::CLONE_NEWIPC) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut helper = spawn(&mut helper);
    let hpid = helper.id().to_string();
    // Services the network probes should reach here.
    let host_abstract = format!("forkbox-probe-control-{}", std::process::id());
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(host_abstract.as_bytes()).unwrap();
    let _abstract_listener = UnixListener::bind_addr(&addr).unwrap();
    let host_path = dir.path().join("host.sock");
    let _path_listener = UnixListener::bind(&host_path).unwrap();
    let (port, _) = counting_listener("127.0.0.1:0");
    let (port2, hits2) = counting_listener("127.0.0.1:0");

    let mut results = run_on_host(
        Command::new(probe_bin())
            .args(["--host", "--pid", &hpid, "--port", &port.to_string()])
            .args(["--abstract", &host_abstract, "--unix"])
            .arg(&host_path)
            .args(["--tcp", &format!("127.0.0.1:{port2}"), "--scratch"])
            .arg(&scratch)
            .arg("--tmp")
            .arg(dir.path()),
    );
    let _ = helper.kill();
    let _ = helper.wait();
    assert!(hits2.load(std::sync::atomic::Ordering::SeqCst) > 0);

    // CVE-2019-5736 needs a target that exits: a copy of the probe sleeping 1 s. The
    // probe keeps a read-only fd to its /proc/<pid>/exe and reopens it for writing once
    // the binary is no longer busy (writing its first byte over itself).
    let short = copy_probe(&scratch);
    let mut target = spawn(Command::new(&short).args(["--sleep", "1"]));
    let r = run_on_host(Command::new(probe_bin()).args([
        "--host",
        "--pid",
        &target.id().to_string(),
        "--exe-wait-ms",
        "10000",
        "proc_exe_write",
    ]));
    let _ = target.wait();
    results.extend(r);

    // CVE-2024-21626 and other processes' roots: the probe chrooted into a directory of
    // its own, in a private mount namespace with a /proc, its cwd left on the host's
    // root and a directory fd of the host's root inherited as fd 5.
    let jail = dir.path().join("jail");
    std::fs::create_dir_all(jail.join("proc")).unwrap();
    copy_probe(&jail);
    let mut helper2 = spawn(Command::new(&helper_bin).args(["--sleep", "60"]));
    let host_root = std::fs::File::open("/").unwrap();
    let root_fd = std::os::fd::AsRawFd::as_raw_fd(&host_root);
    let jail_c = std::ffi::CString::new(jail.to_str().unwrap()).unwrap();
    let proc_c = std::ffi::CString::new(jail.join("proc").to_str().unwrap()).unwrap();
    let mut cmd = Command::new("/forkbox-probe");
    cmd.args(["--host", "--pid", &helper2.id().to_string()])
        .args(["cwd_outside_root", "leaked_fds", "proc_root_cwd"])
        .current_dir("/");
    // SAFETY: only raw syscalls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let ok = |r: libc::c_int| {
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            ok(libc::unshare(libc::CLONE_NEWNS))?;
            ok(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            ok(libc::mount(
                c"proc".as_ptr(),
                proc_c.as_ptr(),
                c"proc".as_ptr(),
                0,
                std::ptr::null(),
            ))?;
            if libc::dup2(root_fd, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            ok(libc::chroot(jail_c.as_ptr()))
        });
    }
    results.extend(run_on_host(&mut cmd));
    let _ = helper2.kill();
    let _ = helper2.wait();

    // Every probe that may run on the host and that this host can support must have
    // escaped here.
    let no_control: BTreeSet<&str> = [
        "pid_visibility", // the host sees all its pids in /proc: nothing to find
        "cap_inh_amb",    // the host's root has empty inheritable/ambient sets too
        "iopl",           // needs CONFIG_X86_IOPL_IOPERM, often absent
    ]
    .into_iter()
    .collect();
    let described: Vec<Value> = {
        let out = Command::new(probe_bin())
            .arg("--describe")
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    for d in &described {
        let name = d["probe"].as_str().unwrap();
        if d["host"] != true || d["default"] != true || no_control.contains(name) {
            continue;
        }
        if let Some(why) = control_unavailable(name) {
            eprintln!("control {name:<18} not tried: {why}");
            continue;
        }
        match results.get(name) {
            Some(r) if r.escaped => {
                checked += 1;
                eprintln!("control {name:<18} succeeds on the host: {}", r.detail);
            }
            Some(r) => failures.push(format!(
                "{name} does not succeed on the host, so it proves nothing in a sandbox: {}",
                r.detail
            )),
            None => failures.push(format!("{name}: no result on the host")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 35, "only {checked} controls ran");
}
