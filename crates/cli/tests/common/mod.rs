//! Test harness: a real `forkbox serve` process on a loopback port, with its own data
//! dir and the shared, cached template pool. Needs root, btrfs and the static agent
//! (`make test` provides all three); fails loudly otherwise.

#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub base: String,
    pub data: tempfile::TempDir,
    pub pool: PathBuf,
    pub http: reqwest::Client,
    /// What of the server's environment says which database and node are its
    /// (`FORKBOX_DATABASE_URL`, `FORKBOX_NODE`): `down` needs the same.
    store_env: Vec<(String, String)>,
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Server environment turning on the vm runtime with the test assets
/// (`FORKBOX_TEST_VM_ASSETS`, default /var/lib/forkbox-test/vm, made by `make vm-assets`).
pub fn vm_env() -> Vec<(&'static str, String)> {
    let assets = std::env::var("FORKBOX_TEST_VM_ASSETS")
        .unwrap_or_else(|_| "/var/lib/forkbox-test/vm".to_owned());
    assert!(
        std::path::Path::new(&assets).join("vmlinux").exists(),
        "vm assets missing in {assets}: run `make vm-assets`"
    );
    vec![
        ("FORKBOX_RUNTIMES", "jail,vm".to_owned()),
        ("FORKBOX_VM_ASSETS", assets),
    ]
}

pub fn pool() -> PathBuf {
    std::env::var_os("FORKBOX_TEST_POOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/forkbox-test/pool"))
}

/// The static agent the test servers start sandboxes from.
fn agent_bin() -> PathBuf {
    std::env::var_os("FORKBOX_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/agent/forkbox-agent"))
}

/// Like [`spawn_server`], logging at level info into `log` when given.
fn spawn_server_logging(
    data: &std::path::Path,
    pool: &std::path::Path,
    agent: &std::path::Path,
    log: Option<&std::path::Path>,
    env: &[(&str, String)],
) -> (std::process::Child, String) {
    let (level, stderr) = match log {
        Some(p) => (
            "info",
            Stdio::from(std::fs::File::create(p).expect("log file")),
        ),
        None => ("warn", Stdio::inherit()),
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data)
        .arg("--pool")
        .arg(pool)
        .arg("--agent-bin")
        .arg(agent)
        // Test servers take their sandboxes with them when they stop.
        .arg("--on-exit")
        .arg("destroy")
        .env("FORKBOX_LOG", level)
        .env("NO_COLOR", "1")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(stderr)
        // A process group of its own, as a service manager would start it (and so a
        // test can signal the server's whole group without signalling itself).
        .process_group(0)
        .spawn()
        .expect("start forkbox serve");
    let stdout = child.stdout.take().expect("server stdout");
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(600);
    let base = loop {
        assert!(Instant::now() < deadline, "server did not start");
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(u) = l.strip_prefix("forkbox listening on ") {
                    break u.trim().to_owned();
                }
            }
            _ => panic!("forkbox serve exited before listening"),
        }
    };
    // Keep draining stdout so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

/// A new database on the test PostgreSQL server, as a URL; `None` (the test skips)
/// when no server is given, unless `FORKBOX_REQUIRE_POSTGRES` says one must be
/// (`scripts/with-postgres.sh`, as `make test` runs the suite).
pub fn postgres_database() -> Option<String> {
    if std::env::var_os("FORKBOX_TEST_DATABASE_URL").is_some() {
        return Some(fresh_database());
    }
    assert!(
        std::env::var_os("FORKBOX_REQUIRE_POSTGRES").is_none(),
        "FORKBOX_REQUIRE_POSTGRES is set but FORKBOX_TEST_DATABASE_URL is not"
    );
    eprintln!("skipped: no FORKBOX_TEST_DATABASE_URL");
    None
}

/// A new database on the test PostgreSQL server (`FORKBOX_TEST_DATABASE_URL`), as a
/// URL.
pub fn fresh_database() -> String {
    let base = std::env::var("FORKBOX_TEST_DATABASE_URL")
        .expect("FORKBOX_TEST_DATABASE_URL names the test PostgreSQL server");
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "fbe_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let out = Command::new("psql")
        .arg(&base)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "create database {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}dbname={name}")
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Like [`Server::start`], with extra environment for the server.
    pub fn start_with(env: &[(&str, String)]) -> Server {
        Server::spawn(env, false).0
    }

    /// Starts a server with `env`, logging at level info into `<data>/server.log`
    /// when `logged`.
    fn spawn(env: &[(&str, String)], logged: bool) -> (Server, PathBuf) {
        assert!(
            nix::unistd::geteuid().is_root(),
            "end-to-end tests need root: run them with `make test` as root"
        );
        // `FORKBOX_TEST_STORE=postgres`: every server on a fresh PostgreSQL database of
        // its own (the suite run on the other store backend; docs/cluster.md).
        let mut env: Vec<(&str, String)> = env.to_vec();
        if std::env::var("FORKBOX_TEST_STORE").as_deref() == Ok("postgres")
            && !env.iter().any(|(k, _)| *k == "FORKBOX_DATABASE_URL")
        {
            env.push(("FORKBOX_DATABASE_URL", fresh_database()));
        }
        let env = &env[..];
        let agent = agent_bin();
        assert!(
            agent.exists(),
            "static agent {} missing: run `make agent` (or `make test`)",
            agent.display()
        );
        let data = tempfile::Builder::new()
            .prefix("forkbox-e2e-")
            .tempdir()
            .expect("temp data dir");
        let pool = pool();
        let log = data.path().join("server.log");
        let (child, base) =
            spawn_server_logging(data.path(), &pool, &agent, logged.then_some(&log), env);
        (
            Server {
                child,
                base,
                data,
                pool,
                http: reqwest::Client::new(),
                store_env: env
                    .iter()
                    .filter(|(k, _)| matches!(*k, "FORKBOX_DATABASE_URL" | "FORKBOX_NODE"))
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            },
            log,
        )
    }

    /// Like [`Server::start`], with the server's log (level info) written to the file
    /// returned.
    pub fn start_logged() -> (Server, PathBuf) {
        Server::start_logged_with(&[])
    }

    /// Like [`Server::start_logged`], with extra environment for the server.
    pub fn start_logged_with(env: &[(&str, String)]) -> (Server, PathBuf) {
        Server::spawn(env, true)
    }

    /// SIGKILLs the server (its sandboxes keep running) and starts a new one on the
    /// same data dir, which adopts them.
    pub fn kill_and_restart(&mut self) {
        self.kill_and_restart_with(&[]);
    }

    /// [`Server::kill_and_restart`] with extra environment for the new server.
    pub fn kill_and_restart_with(&mut self, env: &[(&str, String)]) {
        self.kill();
        self.restart_with(env);
    }

    /// The environment naming the server's database and node (for CLI commands that
    /// work on its database directly).
    pub fn store_env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.store_env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Host pid of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the server (only it: its sandboxes and warden run on).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILLs the server's whole process group, as `kill -9 -PGID`, `timeout` or a
    /// supervisor would.
    pub fn kill_group(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = self.child.wait();
    }

    /// Starts a server again on the same data dir (after [`Server::kill`]), with
    /// `env`.
    pub fn restart_with(&mut self, env: &[(&str, String)]) {
        // The same database and node as before, unless `env` says otherwise.
        let mut env: Vec<(&str, String)> = env.to_vec();
        for (k, v) in &self.store_env {
            if !env.iter().any(|(e, _)| e == k) {
                env.push((k.as_str(), v.clone()));
            }
        }
        let (child, base) =
            spawn_server_logging(self.data.path(), &self.pool, &agent_bin(), None, &env);
        self.child = child;
        self.base = base;
    }

    /// What of sandboxes `ids` and of this server's data dir is still on the host
    /// (processes, cgroups, root filesystems, run dirs, VM RAM files, mounts, the
    /// egress namespace, QEMU or forkbox processes naming the data dir), one line each.
    pub fn leftovers(&self, ids: &[String]) -> Vec<String> {
        let data = self.data.path().to_string_lossy().into_owned();
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            for id in ids {
                if cg.contains(&format!("/forkbox/{id}\n")) {
                    left.push(format!("process {pid} of {id}: {cmd}"));
                }
            }
            if cmd.contains(&data) && !cmd.contains(" down ") {
                left.push(format!("process {pid}: {cmd}"));
            }
        }
        let cg_roots: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .flatten()
            .map(|e| e.path().join("forkbox"))
            .chain([PathBuf::from("/sys/fs/cgroup/forkbox")])
            .collect();
        for id in ids {
            let mut paths: Vec<PathBuf> = cg_roots.iter().map(|r| r.join(id)).collect();
            paths.push(self.pool.join("sandboxes").join(id));
            paths.push(self.data.path().join("run").join(id));
            paths.push(self.data.path().join("vm-run").join(id));
            paths.push(PathBuf::from(format!("/dev/shm/forkbox-vm-{id}.ram")));
            for p in paths {
                if p.exists() {
                    left.push(format!("{}", p.display()));
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        for m in mounts.lines() {
            if let Some(mnt) = m.split(' ').nth(1) {
                if mnt.starts_with(&data) {
                    left.push(format!("mount {mnt}"));
                }
            }
        }
        let ns = std::path::Path::new("/run/netns").join(egress_netns(self.data.path()));
        if ns.exists() {
            left.push(format!("network namespace {}", ns.display()));
        }
        left
    }

    /// Waits up to `patience` for [`Server::leftovers`] of `ids` to be empty; what is
    /// left when it runs out.
    pub fn wait_clean(&self, ids: &[String], patience: Duration) -> Vec<String> {
        let deadline = Instant::now() + patience;
        loop {
            let left = self.leftovers(ids);
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// During a flood: records the server's RSS into `peak`, checks that it still answers
    /// other requests, then waits `pause` (a slow reader).
    pub async fn breathe(&self, peak: &mut u64, pause: Duration) {
        *peak = (*peak).max(self.rss_kib());
        let h = self.http.get(self.url("/v1/healthz")).send().await.unwrap();
        assert_eq!(h.status(), 200);
        tokio::time::sleep(pause).await;
    }

    /// Reads a flooding response slowly (a pause every 200 chunks) until `limit` bytes
    /// came or it ended, then hangs up; returns the bytes read and the server's peak RSS
    /// in KiB meanwhile.
    pub async fn read_slowly_upto(&self, mut r: reqwest::Response, limit: usize) -> (usize, u64) {
        let (mut bytes, mut peak, mut n) = (0usize, 0u64, 0u64);
        while let Some(c) = r.chunk().await.unwrap() {
            bytes += c.len();
            n += 1;
            if n.is_multiple_of(200) {
                self.breathe(&mut peak, Duration::from_millis(5)).await;
            }
            if bytes >= limit {
                break;
            }
        }
        (bytes, peak)
    }

    /// Floods a new sandbox's `route` (`exec` or `exec/stream`) with `cmd`'s output,
    /// read slowly up to `limit` bytes (`None`: to the end); asserts at least `min`
    /// bytes came and the server's RSS stayed within 100 MiB of idle. The sandbox's id.
    pub async fn flood(&self, route: &str, cmd: &str, limit: Option<usize>, min: usize) -> String {
        let id = self.create_id().await;
        let idle = self.rss_kib();
        let r = self
            .http
            .post(self.url(&format!("/v1/sandboxes/{id}/{route}")))
            .json(&serde_json::json!({ "cmd": cmd }))
            .send()
            .await
            .unwrap();
        let (bytes, peak) = self.read_slowly_upto(r, limit.unwrap_or(usize::MAX)).await;
        assert!(bytes >= min, "only {bytes} bytes streamed");
        assert!(
            peak < idle + 100 * 1024,
            "server RSS grew from {idle} KiB to {peak} KiB"
        );
        id
    }

    /// Asserts that no process of the sandbox runs `needle` any more (waits up to 10 s:
    /// a hung-up stream's process tree is killed, not waited for).
    pub async fn assert_gone(&self, id: &str, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (st, ev) = self
                .exec(
                    id,
                    serde_json::json!({"cmd": "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"}),
                )
                .await;
            assert_eq!(st, 200);
            let out: String = ev
                .iter()
                .filter(|e| e["type"] == "stdout")
                .filter_map(|e| e["data"].as_str())
                .collect();
            if !out.contains(needle) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{needle} still runs: {out}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POST /v1/sandboxes with `body`; panics unless 201.
    pub async fn create(&self, body: Value) -> Value {
        let r = self
            .http
            .post(self.url("/v1/sandboxes"))
            .json(&body)
            .send()
            .await
            .expect("create request");
        let status = r.status();
        let v: Value = r.json().await.expect("create body");
        assert_eq!(status, 201, "create failed: {v}");
        v
    }

    pub async fn create_id(&self) -> String {
        self.create(serde_json::json!({})).await["id"]
            .as_str()
            .expect("id")
            .to_owned()
    }

    /// Runs `cmd` and returns every NDJSON event.
    pub async fn exec(&self, id: &str, body: Value) -> (u16, Vec<Value>) {
        let r = self
            .http
            .post(self.url(&format!("/v1/sandboxes/{id}/exec")))
            .json(&body)
            .send()
            .await
            .expect("exec request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("exec body");
        if status != 200 {
            return (
                status,
                vec![serde_json::from_str(&text).unwrap_or(Value::Null)],
            );
        }
        let events = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("NDJSON line"))
            .collect();
        (status, events)
    }

    /// Runs a shell command; returns (stdout, stderr, exit code).
    pub async fn sh(&self, id: &str, cmd: &str) -> (String, String, i64) {
        let (status, events) = self.exec(id, serde_json::json!({ "cmd": cmd })).await;
        assert_eq!(status, 200, "exec failed: {events:?}");
        collect(&events)
    }

    pub async fn delete(&self, id: &str) -> u16 {
        self.delete_at(&format!("/v1/sandboxes/{id}")).await
    }

    /// `DELETE path`: its status.
    pub async fn delete_at(&self, path: &str) -> u16 {
        self.http
            .delete(self.url(path))
            .send()
            .await
            .expect("delete")
            .status()
            .as_u16()
    }
}

/// Folds events into (stdout, stderr, exit code), checking the stream's invariants:
/// seq strictly increasing, exactly one exit, and it is last.
pub fn collect(events: &[Value]) -> (String, String, i64) {
    let (mut out, mut err, mut code) = (String::new(), String::new(), None);
    let mut last_seq = -1i64;
    for (i, e) in events.iter().enumerate() {
        let seq = e["seq"].as_i64().expect("seq");
        assert!(seq > last_seq, "seq not increasing: {events:?}");
        last_seq = seq;
        assert!(e["ts"].as_u64().expect("ts") > 1_700_000_000_000);
        match e["type"].as_str().expect("type") {
            "stdout" => out.push_str(e["data"].as_str().expect("data")),
            "stderr" => err.push_str(e["data"].as_str().expect("data")),
            "exit" => {
                assert_eq!(i, events.len() - 1, "exit is not last: {events:?}");
                code = Some(e["data"].as_i64().expect("exit code"));
            }
            other => panic!("unknown event type {other}"),
        }
    }
    (out, err, code.expect("no exit event"))
}

impl Drop for Server {
    /// Stops the server, then takes its data dir down (`forkbox down --purge`), so
    /// nothing of the test is left on the host even when the test SIGKILLed the
    /// server or it crashed; the data dir itself goes with the `TempDir`.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        down_with(self.data.path(), &self.pool, &self.store_env);
    }
}

/// The egress network namespace of data dir `data` (as the server names it).
pub fn egress_netns(data: &std::path::Path) -> String {
    use sha2::Digest as _;
    use std::os::unix::ffi::OsStrExt as _;
    let digest = sha2::Sha256::digest(data.as_os_str().as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("forkbox-egress-{hex}")
}

/// Runs `forkbox down` (with `args`) on `data`; its stdout.
pub fn run_down(data: &std::path::Path, pool: &std::path::Path, args: &[&str]) -> String {
    run_down_with(data, pool, args, std::iter::empty())
}

/// [`run_down`] on server `s`'s data dir, database and node.
pub fn run_down_of(s: &Server, args: &[&str]) -> String {
    run_down_with(s.data.path(), &s.pool, args, s.store_env())
}

fn run_down_with<'a>(
    data: &std::path::Path,
    pool: &std::path::Path,
    args: &[&str],
    env: impl Iterator<Item = (&'a str, &'a str)>,
) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .arg("down")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .arg("--pool")
        .arg(pool)
        .envs(env)
        .env("FORKBOX_LOG", "warn")
        .output()
        .expect("run forkbox down");
    assert!(
        out.status.success(),
        "forkbox down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `forkbox down --purge` on a test data dir; panics (unless already panicking) when
/// it fails.
pub fn down(data: &std::path::Path, pool: &std::path::Path) {
    down_with(data, pool, &[])
}

/// [`down`] of a server whose database or node `env` names (not the data dir's).
pub fn down_with(data: &std::path::Path, pool: &std::path::Path, env: &[(String, String)]) {
    let out = Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .arg("down")
        .arg("--purge")
        .arg("--data-dir")
        .arg(data)
        .arg("--pool")
        .arg(pool)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("FORKBOX_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .expect("run forkbox down");
    if !out.status.success() && !std::thread::panicking() {
        panic!(
            "forkbox down on {} failed: {}",
            data.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// POST `body` as JSON to `path`: the status and the JSON answer (null if none).
pub async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = s.http.post(s.url(path)).json(&body).send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// GET `path`: the status and the JSON answer (null if none).
/// The body of `GET path` as text.
#[allow(dead_code)]
pub async fn get_text(s: &Server, path: &str) -> String {
    s.http
        .get(s.url(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub async fn get(s: &Server, path: &str) -> (u16, Value) {
    let r = s.http.get(s.url(path)).send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// Runs a Python cell; panics unless the call itself succeeds.
pub async fn py(s: &Server, id: &str, src: &str) -> (String, String, i64) {
    let (status, events) = s.exec(id, serde_json::json!({ "code": src })).await;
    assert_eq!(status, 200, "{id}: {events:?}");
    collect(&events)
}

/// `PUT …/files?path=`: the status.
#[allow(dead_code)]
pub async fn put_file(s: &Server, id: &str, path: &str, bytes: &[u8]) -> (u16, Value) {
    let r = s
        .http
        .put(s.url(&format!("/v1/sandboxes/{id}/files?path={path}")))
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// `GET …/files?path=`: the status and the bytes.
#[allow(dead_code)]
pub async fn get_file(s: &Server, id: &str, path: &str) -> (u16, Vec<u8>) {
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/files?path={path}")))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.bytes().await.unwrap().to_vec())
}

/// Writes `script` into the sandbox at `path` (files API) and starts
/// `python3 <path>` in the background; returns once it started.
#[allow(dead_code)]
pub async fn start_script(s: &Server, id: &str, path: &str, script: &str) {
    let (st, v) = put_file(s, id, path, script.as_bytes()).await;
    assert_eq!(st, 200, "{v}");
    let (out, err, code) = s
        .sh(
            id,
            &format!("python3 {path} >{path}.log 2>&1 & echo started"),
        )
        .await;
    assert_eq!((out.as_str(), code), ("started\n", 0), "{err}");
}

/// The content of the sandbox's file `path` once it exists and is not empty (read
/// through the files API, which passes no descriptor to the sandbox's zygote), or ""
/// after `patience`.
#[allow(dead_code)]
pub async fn wait_for_file(s: &Server, id: &str, path: &str, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        let (st, body) = get_file(s, id, path).await;
        if st == 200 && !body.is_empty() {
            return String::from_utf8_lossy(&body).into_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    String::new()
}

/// Starts `crates/cli/tests/data/preview_app.py` in sandbox `id` (through `s`, with
/// API key `key`) and waits until both its ports (8000 HTTP, 8765 WebSocket) listen.
pub async fn start_preview_app(s: &Server, id: &str, key: Option<&str>) {
    let with_key = |r: reqwest::RequestBuilder| match key {
        Some(k) => r.bearer_auth(k),
        None => r,
    };
    let put = with_key(
        s.http
            .put(s.url(&format!("/v1/sandboxes/{id}/files?path=/root/app.py")))
            .body(include_str!("../data/preview_app.py")),
    );
    assert!(put.send().await.unwrap().status().is_success());
    let start = with_key(
        s.http
            .post(s.url(&format!("/v1/sandboxes/{id}/exec")))
            .json(
                &serde_json::json!({"cmd": "python3 /root/app.py >/root/app.log 2>&1 & echo ok"}),
            ),
    );
    start.send().await.unwrap().text().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = with_key(s.http.get(s.url(&format!("/v1/sandboxes/{id}/ports"))));
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        let ports: Vec<u64> = v["ports"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["port"].as_u64()).collect())
            .unwrap_or_default();
        if ports.contains(&8000) && ports.contains(&8765) {
            return;
        }
        assert!(Instant::now() < deadline, "ports never listened: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
