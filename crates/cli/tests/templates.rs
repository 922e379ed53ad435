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
        ("FROM python\nUSER nobody\n", 2, "USER"),
        ("FROM python:3.11-slim\n", 1, "OCI image"),
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
