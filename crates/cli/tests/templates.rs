//! End-to-end: templates built through the API on a real server: layered on the cached
//! `python` template (a btrfs snapshot), an extra Debian package installed with apt in
//! the build sandbox, setup commands run in it; sandboxes made from the result; 409
//! while in use; failed builds leave nothing behind; the CLI's `template build|ls|rm`.

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, Server};
use serde_json::{json, Value};
use std::process::{Command, Output};

/// A template name no other test (or concurrent test server on the shared pool) uses.
fn unique(prefix: &str) -> String {
    let n: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!("{prefix}-{}-{:x}", std::process::id(), n & 0xffffff)
}

/// POSTs a build; (status, every NDJSON event, or the error body).
async fn build(s: &Server, body: Value) -> (u16, Vec<Value>) {
    let r = s
        .http
        .post(s.url("/v1/templates"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    if st != 200 {
        return (st, vec![serde_json::from_str(&text).unwrap_or(Value::Null)]);
    }
    let events = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect();
    (st, events)
}

fn progress(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "progress")
        .map(|e| format!("{}\n", e["data"].as_str().unwrap()))
        .collect()
}

/// The build sandbox's id, from its progress line.
fn build_sandbox(events: &[Value]) -> String {
    let log = progress(events);
    let at = log
        .find("starting build sandbox ")
        .expect("build sandbox line");
    log[at + "starting build sandbox ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

async fn delete_template(s: &Server, name: &str) -> (u16, Value) {
    let r = s
        .http
        .delete(s.url(&format!("/v1/templates/{name}")))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn assert_no_leftovers(s: &Server, name: &str, bld: &str) {
    let t = s.pool.join("templates");
    assert!(!t.join(name).exists(), "subvolume of {name} left");
    assert!(
        !t.join(format!("{name}.json")).exists(),
        "record of {name} left"
    );
    assert!(!s.pool.join("sandboxes").join(bld).exists(), "{bld} left");
    for root in ["/sys/fs/cgroup/memory/forkbox", "/sys/fs/cgroup/forkbox"] {
        assert!(
            !std::path::Path::new(root).join(bld).exists(),
            "cgroup of {bld} left"
        );
    }
}

#[tokio::test]
async fn layered_template_with_a_package_and_commands() {
    let s = Server::start();
    let name = unique("e2e-jq");
    let t0 = std::time::Instant::now();
    let (st, events) = build(
        &s,
        json!({
            "name": name,
            "base": "python",
            "packages": ["jq"],
            "run": [
                "echo built > /etc/built-by",
                "pip --version > /root/pip.txt",
                "pwd > /etc/build-pwd; echo \"$GREETING\" > /etc/build-env"
            ],
            "env": {"GREETING": "hello"},
            "workdir": "/srv/app"
        }),
    )
    .await;
    assert_eq!(st, 200, "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "ready", "{}", progress(&events));
    eprintln!("layered build took {:.1}s", t0.elapsed().as_secs_f64());
    let t = &last["template"];
    assert_eq!(
        (t["name"].as_str(), t["status"].as_str(), t["base"].as_str()),
        (Some(name.as_str()), Some("ready"), Some("python"))
    );
    assert_eq!(t["packages"], json!(["jq"]));
    assert_eq!(t["workdir"], "/srv/app");
    assert!(t["size"].as_u64().unwrap() > 10 << 20, "{t}");
    let log = progress(&events);
    assert!(log.contains("$ echo built > /etc/built-by"), "{log}");
    assert!(log.contains("jq"), "{log}");
    // The build sandbox is gone; only the template is left.
    let bld = build_sandbox(&events);
    assert!(!s.pool.join("sandboxes").join(&bld).exists());
    // Listed, described, log kept.
    let (st, v) = get(&s, "/v1/templates").await;
    assert_eq!(st, 200);
    let row = v["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name.as_str())
        .cloned()
        .expect("listed");
    assert_eq!(row["status"], "ready");
    assert!(v["templates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == "python" && x["base"] == "debian-bookworm"));
    let (st, v) = get(&s, &format!("/v1/templates/{name}")).await;
    assert_eq!((st, v["env"]["GREETING"].as_str()), (200, Some("hello")));
    let r = s
        .http
        .get(s.url(&format!("/v1/templates/{name}/log")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("$ pip --version"));
    // Same name again: 409.
    let (st, _) = build(&s, json!({"name": name, "base": "python"})).await;
    assert_eq!(st, 409);

    // A sandbox made from it sees the package, the commands' files and the env.
    let sb = s.create(json!({"template": name})).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let (out, err, code) = s
        .sh(&id, "jq --version && echo '{\"a\":[1,2]}' | jq -c .a")
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("jq-1.6"), "{out}");
    assert!(out.ends_with("[1,2]\n"), "{out}");
    let (out, _, _) = s
        .sh(
            &id,
            "cat /etc/built-by /etc/build-pwd /etc/build-env; cat /root/pip.txt",
        )
        .await;
    assert!(out.starts_with("built\n/srv/app\nhello\npip "), "{out}");
    let (out, _, _) = s
        .sh(&id, "echo $GREETING; stat -c %U /etc/built-by /usr/bin/jq")
        .await;
    assert_eq!(out, "hello\nroot\nroot\n");

    // In use: 409; then deleted: 204, gone from the list and the pool.
    let (st, v) = delete_template(&s, &name).await;
    assert_eq!(st, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains(&id), "{v}");
    assert_eq!(s.delete(&id).await, 204);
    let (st, v) = delete_template(&s, &name).await;
    assert_eq!(st, 204, "{v}");
    let (st, _) = get(&s, &format!("/v1/templates/{name}")).await;
    assert_eq!(st, 404);
    let (_, v) = get(&s, "/v1/templates").await;
    assert!(!v["templates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == name.as_str()));
    assert!(!s.pool.join("templates").join(&name).exists());
    assert!(!s
        .pool
        .join("templates")
        .join(format!("{name}.json"))
        .exists());
    let (st, _) = delete_template(&s, &name).await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn a_failing_command_fails_the_build_and_leaves_nothing() {
    let s = Server::start();
    let name = unique("e2e-fail");
    let (st, events) = build(
        &s,
        json!({
            "name": name,
            "base": "python",
            "run": ["echo about to fail", "touch /etc/half-made", "exit 3", "echo never"]
        }),
    )
    .await;
    assert_eq!(st, 200, "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "failed", "{events:?}");
    let err = last["error"].as_str().unwrap();
    assert!(
        err.contains("exit 3") && err.contains("exit code 3"),
        "{err}"
    );
    let log = progress(&events);
    assert!(log.contains("about to fail"), "{log}");
    assert!(!log.contains("never"), "{log}");
    assert_no_leftovers(&s, &name, &build_sandbox(&events));
    // The failure stays visible until deleted.
    let (st, v) = get(&s, &format!("/v1/templates/{name}")).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("failed")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("exit code 3"));
    let r = s
        .http
        .get(s.url(&format!("/v1/templates/{name}/log")))
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("about to fail"));
    // Nobody can make a sandbox of it.
    let r = s
        .http
        .post(s.url("/v1/sandboxes"))
        .json(&json!({"template": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (st, _) = delete_template(&s, &name).await;
    assert_eq!(st, 204);
    let (st, _) = get(&s, &format!("/v1/templates/{name}")).await;
    assert_eq!(st, 404);
    // A package that does not exist fails too, without leftovers.
    let (st, events) = build(
        &s,
        json!({"name": name, "base": "python", "packages": ["no-such-package-forkbox"]}),
    )
    .await;
    assert_eq!(st, 200);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "failed", "{events:?}");
    assert_no_leftovers(&s, &name, &build_sandbox(&events));
    assert_eq!(delete_template(&s, &name).await.0, 204);
}

#[tokio::test]
async fn bad_requests_are_refused_before_building() {
    let s = Server::start();
    for (body, want) in [
        (json!({"name": "Bad Name", "base": "python"}), 400),
        (json!({"name": "x".repeat(65), "base": "python"}), 400),
        (
            json!({"name": "ok1", "base": "python", "packages": ["-oAPT::x=1"]}),
            400,
        ),
        (
            json!({"name": "ok1", "base": "python", "workdir": "relative"}),
            400,
        ),
        (
            json!({"name": "ok1", "base": "python", "unknown_field": 1}),
            400,
        ),
        (json!({"name": "ok1", "base": "no-such-base-xyz"}), 404),
        (json!({"name": "ok1", "base": "Not Valid"}), 400),
        (json!({"name": "python", "base": "debian-bookworm"}), 409),
        (json!({"name": "compilers", "base": "python"}), 409),
    ] {
        let (st, v) = build(&s, body.clone()).await;
        assert_eq!(st, want, "{body}: {v:?}");
        assert!(v[0]["error"].is_string(), "{v:?}");
    }
    let (st, v) = get(&s, "/v1/templates/no-such-template").await;
    assert_eq!((st, v["code"].as_str()), (404, Some("template_not_found")));
    let (st, _) = delete_template(&s, "no-such-template").await;
    assert_eq!(st, 404);
    // Names that cannot be templates are never looked up as paths.
    for bad in ["..", "...", "python.json", "%2e%2e"] {
        let (st, _) = delete_template(&s, bad).await;
        assert_eq!(st, 404, "{bad}");
        let (st, _) = get(&s, &format!("/v1/templates/{bad}/log")).await;
        assert_eq!(st, 404, "{bad}");
    }
    assert!(s.pool.join("templates").join("python").exists());
}

fn forkbox(s: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .args(args)
        .env("FORKBOX_URL", &s.base)
        .output()
        .unwrap()
}

#[tokio::test]
async fn cli_template_build_ls_rm() {
    let s = Server::start();
    let name = unique("e2e-cli");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("template.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"{name}\"\nbase = \"python\"\nrun = [\"echo from-cli > /etc/cli-built\"]\n\n[env]\nMODE = \"cli\"\n"
        ),
    )
    .unwrap();
    let o = forkbox(&s, &["template", "build", "-f", file.to_str().unwrap()]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains(&format!("template {name} ready")), "{out}");
    assert!(err.contains("$ echo from-cli > /etc/cli-built"), "{err}");
    let o = forkbox(&s, &["template", "ls", "--json"]);
    let ls: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(ls
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == name.as_str() && t["env"]["MODE"] == "cli"));
    let o = forkbox(&s, &["template", "ls"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&name));
    let sb = s.create(json!({"template": name})).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let (out, _, _) = s.sh(&id, "cat /etc/cli-built; echo $MODE").await;
    assert_eq!(out, "from-cli\ncli\n");
    // In use: rm fails with the server's reason.
    let o = forkbox(&s, &["template", "rm", &name]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("409"));
    assert_eq!(s.delete(&id).await, 204);
    let o = forkbox(&s, &["template", "rm", &name]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A failing build exits non-zero; --json gives the events.
    let failing = dir.path().join("fail.toml");
    std::fs::write(
        &failing,
        format!("name = \"{name}\"\nbase = \"python\"\nrun = [\"false\"]\n"),
    )
    .unwrap();
    let o = forkbox(
        &s,
        &[
            "template",
            "build",
            "-f",
            failing.to_str().unwrap(),
            "--json",
        ],
    );
    assert_ne!(o.status.code(), Some(0));
    let last: Value = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    assert_eq!(last["type"], "failed");
    let o = forkbox(&s, &["template", "rm", &name]);
    assert_eq!(o.status.code(), Some(0));
}

/// Issue 20, finding 7: a base template's `run` command planted an apt hook, and a
/// template layered on it with `packages` ran the hook with every capability, no
/// seccomp and no `no_new_privs` (it unshared a user namespace, mounted, opened
/// AF_PACKET). The package step now runs confined: the hook sees the sandbox's
/// seccomp filters, `no_new_privs` and only the package manager's capabilities.
#[tokio::test]
async fn packages_run_confined_even_with_a_hostile_base() {
    let s = Server::start();
    let base = unique("e2e-hook");
    let probe = "cat > /usr/local/bin/probe <<'EOF'\n#!/bin/sh\n\
        grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status > /root/hook.txt\n\
        if unshare -U true 2>/dev/null; then echo unshare-ok; else echo unshare-refused; fi >> /root/hook.txt\n\
        EOF\n\
        chmod +x /usr/local/bin/probe";
    let plant = r#"echo 'APT::Update::Pre-Invoke {"/usr/local/bin/probe";};' > /etc/apt/apt.conf.d/99probe"#;
    let built = |body: Value| {
        let s = &s;
        async move {
            let (st, events) = build(s, body).await;
            assert_eq!(st, 200, "{events:?}");
            let last = &events.last().unwrap()["type"];
            assert_eq!(last, "ready", "{}", progress(&events));
            events
        }
    };
    built(json!({"name": base, "base": "python", "run": [probe, plant]})).await;
    let layered = unique("e2e-hook-pkgs");
    let events = built(json!({"name": layered, "base": base, "packages": ["jq"]})).await;
    let id = s.create(json!({"template": layered})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (out, _, code) = s.sh(&id, "cat /root/hook.txt").await;
    assert_eq!(code, 0, "the hook did not run: {}", progress(&events));
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(field("Seccomp:"), "2", "{out}");
    assert_eq!(field("NoNewPrivs:"), "1", "{out}");
    // Docker's set minus NET_RAW and MKNOD; never CAP_SYS_ADMIN (bit 21) or NET_ADMIN (12).
    let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    let bnd = u64::from_str_radix(&field("CapBnd:"), 16).unwrap();
    for caps in [eff, bnd] {
        assert_eq!(caps & (1 << 21), 0, "CAP_SYS_ADMIN: {out}");
        assert_eq!(caps & (1 << 12), 0, "CAP_NET_ADMIN: {out}");
        assert_eq!(caps & (1 << 13), 0, "CAP_NET_RAW: {out}");
    }
    assert!(out.contains("unshare-refused"), "{out}");
    assert_eq!(s.delete(&id).await, 204);
    for t in [&layered, &base] {
        assert_eq!(delete_template(&s, t).await.0, 204);
    }
}

/// `forkbox template build -f file --name name` plus `extra`: it must succeed; its
/// stdout and stderr.
fn cli_build(s: &Server, file: &std::path::Path, name: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "template",
        "build",
        "-f",
        file.to_str().unwrap(),
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    let o = forkbox(s, &args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    (out, err)
}

/// Runs `cmd` in a new sandbox of template `name`, then deletes the sandbox and the
/// template: the command's stdout.
async fn run_then_delete(s: &Server, name: &str, cmd: &str) -> String {
    let id = s.create(json!({"template": name})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (out, _, _) = s.sh(&id, cmd).await;
    assert_eq!(s.delete(&id).await, 204);
    assert_eq!(delete_template(s, name).await.0, 204);
    out
}

/// Issue 28, first part: a Dockerfile is a template build. `FROM` a forkbox template,
/// `ARG` (with `--build-arg`), `ENV`, `WORKDIR`, `RUN` (each seeing only what was set
/// before it), `LABEL` and `COPY` from a build context build through the CLI and the
/// API; a sandbox of the template starts with its environment and files; a build
/// again with its last line changed starts from the kept steps; the events stream as
/// SSE too; what forkbox cannot build yet is a 400 naming the instruction and its line.
#[tokio::test]
async fn templates_build_from_a_dockerfile() {
    let s = Server::start();
    let name = unique("e2e-docker");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Dockerfile");
    std::fs::write(
        &file,
        "# a small app\nFROM python\nARG GREETING=hi\nENV APP_DIR=/srv/app\nWORKDIR $APP_DIR\n\
         RUN echo \"$GREETING from $(pwd), later=${LATER:-unset}\" > greeting.txt\n\
         ENV LATER=1\nRUN [\"python3\", \"-c\", \"open('app.py', 'w').write('print(6 * 7)')\"]\n\
         LABEL org.example.app=\"demo\"\nCMD [\"python3\", \"app.py\"]\n",
    )
    .unwrap();
    let (out, _) = cli_build(&s, &file, &name, &["--build-arg", "GREETING=hello"]);
    assert!(out.contains(&format!("template {name} ready")), "{out}");
    let out = run_then_delete(
        &s,
        &name,
        "cat /srv/app/greeting.txt; echo $APP_DIR $LATER; python3 /srv/app/app.py",
    )
    .await;
    assert_eq!(out, "hello from /srv/app, later=unset\n/srv/app 1\n42\n");

    // With a build context: COPY takes files (and directories' contents) from it.
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(ctx.join("lib")).unwrap();
    // (Its own content every run: kept steps of earlier runs do not match it.)
    std::fs::write(
        ctx.join("app.py"),
        format!(
            "# {name}\nimport sys; sys.path.insert(0, '/srv/app'); from lib.util import answer; print(answer())\n"
        ),
    )
    .unwrap();
    std::fs::write(ctx.join("lib/__init__.py"), "").unwrap();
    std::fs::write(ctx.join("lib/util.py"), "def answer():\n    return 42\n").unwrap();
    let file = ctx.join("Dockerfile");
    let with_last = |last: &str| {
        std::fs::write(
            &file,
            format!("FROM python\nWORKDIR /srv/app\nCOPY app.py .\nCOPY lib lib\n{last}\n"),
        )
        .unwrap();
    };
    let context = ["--context", ctx.to_str().unwrap()];
    with_last("RUN python3 app.py > built.txt");
    cli_build(&s, &file, &name, &context);
    let out = run_then_delete(
        &s,
        &name,
        "cat /srv/app/built.txt; python3 /srv/app/app.py; stat -c %U /srv/app/lib/util.py; \
         test -e /.forkbox-context.tar && echo context-left || echo context-gone",
    )
    .await;
    assert_eq!(out, "42\n42\nroot\ncontext-gone\n");

    // Built again with only its last line changed: the steps before it come from the
    // kept ones (the template was deleted; its steps were not).
    with_last("RUN python3 app.py > again.txt");
    let (_, err) = cli_build(&s, &file, &name, &context);
    assert!(err.contains("steps 1-2 of 3 cached"), "{err}");
    let out = run_then_delete(
        &s,
        &name,
        "cat /srv/app/again.txt; ls /srv/app; test -e /.forkbox-context.tar || echo clean",
    )
    .await;
    assert_eq!(out, "42\nagain.txt\napp.py\nlib\nclean\n");

    // ADD: a tar archive of the context (here gzipped) is unpacked; a file is copied.
    let vendor = dir.path().join("vendor");
    std::fs::create_dir_all(vendor.join("pkg")).unwrap();
    std::fs::write(vendor.join("pkg/mod.txt"), format!("vendored {name}\n")).unwrap();
    let o = Command::new("tar")
        .arg("-czf")
        .arg(ctx.join("vendor.tar.gz"))
        .arg("-C")
        .arg(&vendor)
        .arg("pkg")
        .output()
        .unwrap();
    assert!(o.status.success());
    std::fs::write(
        &file,
        "FROM python\nADD vendor.tar.gz /srv/vendor/\nADD app.py /srv/\n",
    )
    .unwrap();
    cli_build(&s, &file, &name, &context);
    let out = run_then_delete(&s, &name, "cat /srv/vendor/pkg/mod.txt; ls /srv").await;
    assert_eq!(out, format!("vendored {name}\napp.py\nvendor\n"));

    // The build's events as Server-Sent Events, for a client that asks for them.
    let r = s
        .http
        .post(s.url("/v1/templates"))
        .header("accept", "text/event-stream")
        .json(&json!({"name": name, "dockerfile": format!("FROM python\nRUN echo streamed {name}\n")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let text = r.text().await.unwrap();
    assert!(
        text.contains("event: progress\ndata: {\"type\":\"progress\""),
        "{text}"
    );
    assert!(text.contains("streamed"), "{text}");
    assert!(text.contains("event: ready\ndata: "), "{text}");
    assert_eq!(delete_template(&s, &name).await.0, 204);

    // Through the API: refusals name the line, and nothing is built.
    for (dockerfile, line, what) in [
        ("FROM python\nRUN true\nCOPY app.py /srv/\n", 3, "COPY"),
        ("FROM python\nUSER no body\n", 2, "USER"),
        ("FROM Python\n", 1, "neither"),
        ("FROM python\nFROBNICATE x\n", 2, ""),
    ] {
        let (st, ev) = build(&s, json!({"name": name, "dockerfile": dockerfile})).await;
        assert_eq!(st, 400, "{dockerfile:?}: {ev:?}");
        let msg = ev[0]["error"].as_str().unwrap();
        assert!(
            msg.contains(&format!("Dockerfile line {line}:")) && msg.contains(what),
            "{dockerfile:?}: {msg}"
        );
        assert_eq!(ev[0]["code"], "invalid_request");
    }
    let (st, ev) = build(
        &s,
        json!({"name": name, "dockerfile": "FROM python\n", "run": ["true"]}),
    )
    .await;
    assert_eq!(st, 400, "{ev:?}");
    let (st, ev) = build(
        &s,
        json!({"name": name, "dockerfile": "FROM python\nCOPY app.py /x\n", "context": "!!"}),
    )
    .await;
    assert_eq!(st, 400, "{ev:?}");
    assert!(ev[0]["error"].as_str().unwrap().contains("base64"));
    let (st, _) = build(
        &s,
        json!({"name": name, "dockerfile": "FROM nosuchtemplate\n"}),
    )
    .await;
    assert_eq!(st, 404);
    let (st, _) = get(&s, &format!("/v1/templates/{name}")).await;
    assert_eq!(st, 404);
}

/// Issue 28, acceptance 1: a Dockerfile `FROM python` with Debian packages (`RUN
/// apt-get install` first: the build's package step), a `COPY` of a small app from the
/// build context, `ENV` and `WORKDIR` builds; a sandbox from it runs the app; changing
/// only the last line rebuilds from the kept steps (packages included) in seconds.
#[tokio::test]
async fn a_dockerfile_with_packages_and_an_app_rebuilds_its_last_line_from_cache() {
    let s = Server::start();
    let name = unique("e2e-dockerapp");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.py"),
        format!("# {name}\nimport json, os\nprint(json.dumps({{'mode': os.environ['MODE']}}))\n"),
    )
    .unwrap();
    let file = dir.path().join("Dockerfile");
    let context = ["--context", dir.path().to_str().unwrap()];
    let build_it = |last: &str| {
        std::fs::write(
            &file,
            format!(
                "FROM python\nRUN apt-get update && apt-get install -y --no-install-recommends jq\n\
                 ENV MODE=docker\nWORKDIR /srv/app\nCOPY app.py .\n{last}\n"
            ),
        )
        .unwrap();
        cli_build(&s, &file, &name, &context).1
    };
    let first = build_it("RUN python3 app.py | jq -r .mode > mode.txt");
    assert!(first.contains("jq"), "{first}");
    let out = run_then_delete(
        &s,
        &name,
        "cat /srv/app/mode.txt; cd /srv/app && python3 app.py | jq -c .",
    )
    .await;
    assert_eq!(out, "docker\n{\"mode\":\"docker\"}\n");

    let t = std::time::Instant::now();
    let again = build_it("RUN python3 app.py | jq -r .mode > mode2.txt");
    let took = t.elapsed();
    assert!(again.contains("steps 1-1 of 2 cached"), "{again}");
    assert!(
        !again.contains("apt-get"),
        "packages were installed again: {again}"
    );
    eprintln!("rebuild of the last line took {:.1}s", took.as_secs_f64());
    let out = run_then_delete(
        &s,
        &name,
        "cat /srv/app/mode2.txt; jq --version >/dev/null && echo jq",
    )
    .await;
    assert_eq!(out, "docker\njq\n");
}

/// Issue 28: a Dockerfile's `USER` — the steps after it run as that user (its id,
/// groups and `HOME`), a `WORKDIR` made after it is that user's, `USER root` is root
/// again — and the build's root steps have a container build's capabilities (here
/// `useradd -m` and `chown`), as `docker build` gives them; the template's sandboxes
/// still run as their root.
#[tokio::test]
async fn a_dockerfile_user_runs_its_steps_as_that_user() {
    let s = Server::start();
    let name = unique("e2e-user");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Dockerfile");
    std::fs::write(
        &file,
        "FROM python\nRUN useradd -m -u 1234 app && mkdir /data && chown app /data\n\
         USER app\nWORKDIR /srv/app\n\
         RUN id -un > who.txt && echo \"$HOME\" >> who.txt && touch /data/mine && \
         (touch /etc/forbidden 2>/dev/null && echo wrote-etc || echo no-etc) >> who.txt\n\
         USER root\nRUN stat -c %U /data/mine > /srv/owner.txt\n",
    )
    .unwrap();
    cli_build(&s, &file, &name, &[]);
    let out = run_then_delete(
        &s,
        &name,
        "cat /srv/app/who.txt /srv/owner.txt; stat -c %U /srv/app; id -u; pwd",
    )
    .await;
    assert_eq!(out, "app\n/home/app\nno-etc\napp\napp\n0\n/srv/app\n");
    // A user the image does not have fails the build at that step, naming it.
    std::fs::write(&file, "FROM python\nUSER ghost\nRUN true\n").unwrap();
    let o = forkbox(
        &s,
        &[
            "template",
            "build",
            "-f",
            file.to_str().unwrap(),
            "--name",
            &name,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no such user") && err.contains("build command 1"),
        "{err}"
    );
    assert_eq!(delete_template(&s, &name).await.0, 204);
}

/// A review's finding: build steps' environment (build arguments among it) was on the
/// host's process list (nsenter's command line), readable by any host user. It goes to
/// the step on a pipe now: while a step that sees its argument runs, no host process's
/// command line carries the value.
#[tokio::test]
async fn build_arguments_stay_off_the_host_process_list() {
    let s = Server::start();
    let name = unique("e2e-secret");
    let secret = format!("s3cr3t-{}", unique("v"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Dockerfile");
    std::fs::write(
        &file,
        // (The step checks it saw the value without naming it: steps are public.)
        format!(
            "FROM python\nARG TOKEN\nRUN test \"${{#TOKEN}}\" = {} && test \"${{TOKEN#s3cr3t-}}\" != \"$TOKEN\" && sleep 3 # {name}\n",
            secret.len()
        ),
    )
    .unwrap();
    let url = s.base.clone();
    let (f, n, arg) = (file.clone(), name.clone(), format!("TOKEN={secret}"));
    let build = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_forkbox"))
            .args([
                "template",
                "build",
                "-f",
                f.to_str().unwrap(),
                "--name",
                &n,
                "--build-arg",
                &arg,
            ])
            .env("FORKBOX_URL", &url)
            .output()
            .unwrap()
    });
    let mut looked = 0;
    while !build.is_finished() {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
                let text = String::from_utf8_lossy(&cmdline);
                // (The CLI itself was given the argument.)
                if text.contains(&secret) && !text.contains("--build-arg") {
                    panic!(
                        "{} carries the build argument: {text:?}",
                        e.path().display()
                    );
                }
            }
        }
        looked += 1;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = build.join().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(looked > 10, "the build was over before it was watched");
    assert_eq!(delete_template(&s, &name).await.0, 204);
}

/// POSTs an image archive to `/v1/templates/{name}/image` (`?ref=`); (status, every
/// NDJSON event or the error body).
async fn import(
    s: &Server,
    name: &str,
    archive: &std::path::Path,
    reference: Option<&str>,
) -> (u16, Vec<Value>) {
    let mut req = s
        .http
        .post(s.url(&format!("/v1/templates/{name}/image")))
        .header("content-type", "application/x-tar")
        .body(std::fs::read(archive).unwrap());
    if let Some(r) = reference {
        req = req.query(&[("ref", r)]);
    }
    let r = req.send().await.unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    if st != 200 {
        return (st, vec![serde_json::from_str(&text).unwrap_or(Value::Null)]);
    }
    (
        st,
        text.lines()
            .map(|l| serde_json::from_str(l).expect("NDJSON line"))
            .collect(),
    )
}

/// Issue 28, acceptance 2: an OCI image made here by Debian's umoci (an OCI layout, as
/// a tar) and skopeo (the same image as a `docker save` tar), offline, from a busybox
/// root filesystem, imports through the CLI and the API. A sandbox from it sees its
/// files (owners shifted: the image's uid 1000 is 1000 inside), its `Env` and its
/// `WorkingDir` (where commands start); the file the second layer whites out is gone;
/// `User`, `Cmd` and the digest are recorded. A tampered layer is refused with its
/// digest mismatch, and leaves nothing behind.
#[tokio::test]
async fn templates_import_oci_and_docker_archives() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    test_image(dir.path());
    let check = "pwd; echo \"$GREETING\"; busybox cat keep.txt; test -e gone.txt || echo gone; \
                 busybox stat -c %u:%g keep.txt /bin/busybox; busybox uname -s";
    let expected = "/app\nhello from the image\nkept\ngone\n1000:1000\n0:0\nLinux\n";

    // The OCI archive, through the CLI.
    let name = unique("e2e-oci");
    let archive = dir.path().join("image.tar");
    let o = forkbox(
        &s,
        &[
            "template",
            "import",
            archive.to_str().unwrap(),
            "--name",
            &name,
        ],
    );
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains(&format!("template {name} ready")), "{out}");
    assert!(err.contains("layer 2") && err.contains("verified"), "{err}");
    let (st, t) = get(&s, &format!("/v1/templates/{name}")).await;
    assert_eq!(st, 200);
    assert_eq!(t["base"], "oci-image", "{t}");
    assert_eq!(t["workdir"], "/app", "{t}");
    assert_eq!(t["env"]["GREETING"], "hello from the image", "{t}");
    assert_eq!(t["image"]["user"], "1000", "{t}");
    assert_eq!(t["image"]["cmd"], json!(["/bin/sh"]), "{t}");
    assert_eq!(t["image"]["layers"], 2, "{t}");
    assert_eq!(t["image"]["reference"], "app", "{t}");
    assert!(
        t["image"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{t}"
    );
    assert_eq!(run_then_delete(&s, &name, check).await, expected);

    // The `docker save` archive, through the API, named by its tag.
    let (st, ev) = import(
        &s,
        &name,
        &dir.path().join("docker.tar"),
        Some("app:latest"),
    )
    .await;
    assert_eq!(st, 200, "{ev:?}");
    assert_eq!(ev.last().unwrap()["type"], "ready", "{ev:?}");
    assert_eq!(run_then_delete(&s, &name, check).await, expected);

    // An image the archive does not have: the import fails naming what it has.
    let (st, ev) = import(&s, &name, &archive, Some("nope")).await;
    assert_eq!(st, 200, "{ev:?}");
    let last = ev.last().unwrap();
    assert_eq!(last["type"], "failed", "{ev:?}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("no image \"nope\""),
        "{last}"
    );

    // A layer changed after the image was made: refused before anything is applied.
    let layout = dir.path().join("layout");
    let blob = |d: &str| layout.join("blobs").join(d.replacen(':', "/", 1));
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
    let mut bytes = std::fs::read(&layer).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::remove_file(&layer).unwrap();
    std::fs::write(&layer, bytes).unwrap();
    let tampered = dir.path().join("tampered.tar");
    let o = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tampered)
        .arg(".")
        .output()
        .unwrap();
    assert!(o.status.success());
    let (st, ev) = import(&s, &name, &tampered, None).await;
    assert_eq!(st, 200, "{ev:?}");
    let last = ev.last().unwrap();
    assert_eq!(last["type"], "failed", "{ev:?}");
    let msg = last["error"].as_str().unwrap();
    assert!(msg.contains("layer 1: digest mismatch"), "{msg}");
    let bld = ev
        .iter()
        .filter_map(|e| e["data"].as_str())
        .find_map(|l| l.split("unpacking the image into ").nth(1))
        .expect("the import's build id")
        .to_owned();
    assert_no_leftovers(&s, &name, &bld);
    // (The failed import's record goes with a delete; its archive went already.)
    assert_eq!(delete_template(&s, &name).await.0, 204);
    let uploads = s.data.path().join("run/uploads");
    let left: Vec<_> = std::fs::read_dir(&uploads)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "archives left: {left:?}");

    // Not an image at all; an invalid name; the CLI's exit code on failure.
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, b"not a tar").unwrap();
    let o = forkbox(
        &s,
        &[
            "template",
            "import",
            junk.to_str().unwrap(),
            "--name",
            &name,
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(delete_template(&s, &name).await.0, 204);
    let (st, ev) = import(&s, "Bad Name", &archive, None).await;
    assert_eq!(st, 400, "{ev:?}");
}

/// The test image (scripts/test-oci-image.sh) in `dir`: `layout/` (image `app`),
/// `image.tar` (its OCI archive), `docker.tar` (a `docker save` tar of it).
fn test_image(dir: &std::path::Path) {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-oci-image.sh");
    let o = Command::new("bash").arg(script).arg(dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Pushes the test image in `dir` to `image` (a registry of [`Registry`]) with skopeo.
fn push(dir: &std::path::Path, image: &str) {
    let o = Command::new("skopeo")
        .current_dir(dir)
        .args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"])
        .args(["--dest-creds", "agent:s3cret pass", "oci:layout:app"])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Debian's OCI distribution registry on a loopback port of its own, with HTTP Basic
/// users from an htpasswd file (bcrypt, made by Python's crypt); stopped when dropped.
struct Registry {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// With HTTP Basic users.
    fn start(user: &str, password: &str) -> Registry {
        Self::start_with(|dir| {
            let o = Command::new("python3")
                .args(["-W", "ignore", "-c", "import crypt, sys; print(sys.argv[1] + ':' + crypt.crypt(sys.argv[2], crypt.mksalt(crypt.METHOD_BLOWFISH)))", user, password])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            std::fs::write(dir.join("htpasswd"), &o.stdout).unwrap();
            format!(
                "htpasswd:\n    realm: forkbox-test\n    path: {}\n",
                dir.join("htpasswd").display()
            )
        })
    }

    /// `auth` (the config's `auth:` section, from the registry's directory).
    fn start_with(auth: impl FnOnce(&std::path::Path) -> String) -> Registry {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-registry.sh");
        let o = Command::new("bash").arg(script).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bin = String::from_utf8(o.stdout).unwrap().trim().to_owned();
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(dir.path());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\nauth:\n  {auth}",
                dir.path().join("data").display(),
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let r = Registry {
            child,
            addr,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(&r.addr).is_ok() {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the registry did not start on {}", r.addr);
    }
}

/// Issue 28: templates from an image in a registry (the OCI distribution API with HTTP
/// Basic auth, Debian's `distribution` on loopback, the image pushed by skopeo): by
/// `"image"` in a build request and by a Dockerfile's `FROM` (with steps on top);
/// refused without credentials or with wrong ones, naming why.
#[tokio::test]
async fn templates_pull_from_a_registry_with_auth() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    test_image(dir.path());
    let reg = Registry::start("agent", "s3cret pass");
    let image = format!("{}/team/app:v1", reg.addr);
    push(dir.path(), &image);
    let auth = json!({"username": "agent", "password": "s3cret pass"});

    let name = unique("e2e-pull");
    let (st, ev) = build(
        &s,
        json!({"name": name, "image": image, "registry_auth": auth}),
    )
    .await;
    assert_eq!(st, 200, "{ev:?}");
    assert_eq!(ev.last().unwrap()["type"], "ready", "{ev:?}");
    let log = progress(&ev);
    assert!(
        log.contains(&format!("pulling {image}")) && log.contains("verified"),
        "{log}"
    );
    assert!(!log.contains("s3cret"), "{log}");
    let (_, t) = get(&s, &format!("/v1/templates/{name}")).await;
    assert_eq!(t["image"]["reference"], image.as_str(), "{t}");
    assert_eq!(
        run_then_delete(
            &s,
            &name,
            "pwd; echo \"$GREETING\"; busybox cat keep.txt; test -e gone.txt || echo gone"
        )
        .await,
        "/app\nhello from the image\nkept\ngone\n"
    );

    // A Dockerfile FROM the image, with steps on top (run by the image's own shell).
    let dockerfile = format!(
        "FROM {image}\nENV MODE=layered\nRUN busybox echo \"built in $(pwd)\" > built.txt\n"
    );
    let (st, ev) = build(
        &s,
        json!({"name": name, "dockerfile": dockerfile, "registry_auth": auth}),
    )
    .await;
    assert_eq!(st, 200, "{ev:?}");
    assert_eq!(ev.last().unwrap()["type"], "ready", "{}", progress(&ev));
    assert_eq!(
        run_then_delete(&s, &name, "busybox cat built.txt; echo $MODE $GREETING").await,
        "built in /app\nlayered hello from the image\n"
    );

    // No credentials, wrong ones, a tag the registry does not have.
    for (body, why) in [
        (
            json!({"name": name, "image": image}),
            "the registry needs credentials",
        ),
        (
            json!({"name": name, "image": image, "registry_auth": {"username": "agent", "password": "wrong"}}),
            "refused the credentials",
        ),
        (
            json!({"name": name, "image": format!("{}/team/app:v2", reg.addr), "registry_auth": auth}),
            "no such image",
        ),
    ] {
        let (st, ev) = build(&s, body.clone()).await;
        assert_eq!(st, 200, "{ev:?}");
        let last = ev.last().unwrap();
        assert_eq!(last["type"], "failed", "{body}: {ev:?}");
        assert!(
            last["error"].as_str().unwrap().contains(why),
            "{body}: {last}"
        );
        assert_eq!(delete_template(&s, &name).await.0, 204);
    }
    // The Bearer token flow (as Docker Hub's and GHCR's): the registry's challenge
    // names a token realm; the token asked of it (with the credentials) is what the
    // registry then takes. (The registry's "silly" controller sends the challenge and
    // takes any token; the realm is a small token service here that records what it
    // was asked.)
    let tokens = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let realm = format!("http://{}/token", tokens.local_addr().unwrap());
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = asked.clone();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for conn in tokens.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = String::new();
            let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            seen.lock().unwrap().push(head);
            let body = r#"{"token":"t0ken-from-realm"}"#;
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    let bearer = Registry::start_with(|_| {
        format!("silly:\n    realm: {realm}\n    service: forkbox-test\n")
    });
    let image2 = format!("{}/team/app:v1", bearer.addr);
    push(dir.path(), &image2);
    asked.lock().unwrap().clear();
    let (st, ev) = build(
        &s,
        json!({"name": name, "image": image2, "registry_auth": auth}),
    )
    .await;
    assert_eq!(st, 200, "{ev:?}");
    assert_eq!(ev.last().unwrap()["type"], "ready", "{ev:?}");
    let asked = asked.lock().unwrap().join("\n");
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("agent:s3cret pass");
    assert!(
        asked.contains("service=forkbox-test")
            && asked.contains("scope=repository%3Ateam%2Fapp%3Apull"),
        "{asked}"
    );
    assert!(
        asked.to_ascii_lowercase().contains(&format!(
            "authorization: basic {}",
            basic.to_ascii_lowercase()
        )),
        "{asked}"
    );
    assert_eq!(
        run_then_delete(&s, &name, "busybox cat keep.txt").await,
        "kept\n"
    );

    // Both a base and an image, and credentials without an image: 400.
    let (st, _) = build(&s, json!({"name": name, "base": "python", "image": image})).await;
    assert_eq!(st, 400);
    let (st, _) = build(&s, json!({"name": name, "registry_auth": auth})).await;
    assert_eq!(st, 400);
}
