//! End-to-end: `run_code` in persistent REPL kernels over real HTTP.

#![allow(clippy::unwrap_used)]

mod common;

use common::{collect, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn code(s: &Server, id: &str, body: Value) -> (String, String, i64) {
    let (status, events) = s.exec(id, body).await;
    assert_eq!(status, 200, "{events:?}");
    collect(&events)
}

async fn py(s: &Server, id: &str, src: &str) -> (String, String, i64) {
    code(s, id, json!({ "code": src })).await
}

#[tokio::test]
async fn python_state_survives_between_calls_and_errors() {
    let s = Server::start();
    let id = s.create_id().await;
    assert_eq!(
        py(&s, &id, "x = 41").await,
        (String::new(), String::new(), 0)
    );
    assert_eq!(py(&s, &id, "x + 1").await.0, "42\n");
    assert_eq!(
        py(&s, &id, "def f(a):\n    return a * 2\nimport math")
            .await
            .2,
        0
    );
    assert_eq!(py(&s, &id, "print(f(x), math.pi > 3)").await.0, "82 True\n");
    // An uncaught exception: traceback on stderr, exit 1, state kept.
    let (out, err, c) = py(&s, &id, "y = 5\n1 / 0").await;
    assert_eq!((out.as_str(), c), ("", 1));
    assert!(err.contains("ZeroDivisionError"), "{err}");
    assert!(err.contains("Traceback"), "{err}");
    assert_eq!(py(&s, &id, "x + y").await.0, "46\n");
    // The final expression is shown like the interactive interpreter would; None is not.
    assert_eq!(py(&s, &id, "'a' * 3").await.0, "'aaa'\n");
    assert_eq!(py(&s, &id, "None").await.0, "");
    // sys.exit sets the cell's exit code without ending the kernel.
    assert_eq!(py(&s, &id, "import sys; sys.exit(3)").await.2, 3);
    assert_eq!(py(&s, &id, "x").await.0, "41\n");
    // Aliases and the default language.
    assert_eq!(
        code(&s, &id, json!({"code": "x", "language": "python3"}))
            .await
            .0,
        "41\n"
    );
    let (st, body) = s.exec(&id, json!({"code": "x", "language": "cobol"})).await;
    assert_eq!(st, 400, "{body:?}");
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn cells_stream_output_as_it_is_printed() {
    let s = Server::start();
    let id = s.create_id().await;
    py(&s, &id, "import time").await;
    let t = Instant::now();
    let mut r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec")))
        .json(&json!({"code": "print('first')\ntime.sleep(1.5)\nprint('second')"}))
        .send()
        .await
        .unwrap();
    let chunk = r.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&chunk).contains("first"));
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(String::from_utf8_lossy(&rest).contains("second"));
    assert!(t.elapsed() >= Duration::from_millis(1500));
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn timeout_interrupts_the_cell_and_keeps_state() {
    let s = Server::start();
    let id = s.create_id().await;
    py(&s, &id, "kept = 'yes'").await;
    let t = Instant::now();
    let (out, err, c) = code(
        &s,
        &id,
        json!({"code": "import time\nprint('before')\ntime.sleep(60)", "timeout": 1}),
    )
    .await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(out, "before\n");
    assert_eq!(c, 124);
    assert!(err.contains("KeyboardInterrupt"), "{err}");
    assert!(err.contains("timed out"), "{err}");
    assert_eq!(py(&s, &id, "kept").await.0, "'yes'\n");
    // A cell that ignores the interrupt gets its kernel restarted; the client is told.
    let stubborn =
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)";
    let (_, err, c) = code(&s, &id, json!({"code": stubborn, "timeout": 1})).await;
    assert_eq!(c, 124);
    assert!(err.contains("restarted"), "{err}");
    let (_, err, c) = py(&s, &id, "kept").await;
    assert_eq!(c, 1);
    assert!(err.contains("NameError"), "{err}");
    assert_eq!(py(&s, &id, "1 + 1").await.0, "2\n");
    assert_eq!(s.delete(&id).await, 204);
}

#[tokio::test]
async fn javascript_and_bash_kernels_keep_state() {
    let s = Server::start();
    let id = s.create_id().await;
    let js = |c: &str| json!({"code": c, "language": "javascript"});
    assert_eq!(
        code(
            &s,
            &id,
            js("let n = 20; function twice(v) { return v * 2 }")
        )
        .await
        .2,
        0
    );
    assert_eq!(code(&s, &id, js("twice(n) + 2")).await.0, "42\n");
    assert_eq!(
        code(&s, &id, js("console.log('hi'); Promise.resolve(7)"))
            .await
            .0,
        "hi\n7\n"
    );
    let (_, err, c) = code(&s, &id, js("throw new Error('boom')")).await;
    assert_eq!(c, 1);
    assert!(err.contains("boom"), "{err}");
    assert_eq!(code(&s, &id, js("n")).await.0, "20\n");

    let sh = |c: &str| json!({"code": c, "language": "bash"});
    assert_eq!(
        code(&s, &id, sh("cd /tmp; V=hello; greet() { echo \"$1 $V\"; }"))
            .await
            .2,
        0
    );
    assert_eq!(
        code(&s, &id, sh("greet world; pwd")).await.0,
        "world hello\n/tmp\n"
    );
    assert_eq!(code(&s, &id, sh("false")).await.2, 1);
    // `exit` ends the kernel: reported, and the next call gets a fresh one.
    let (_, err, c) = code(&s, &id, sh("exit 3")).await;
    assert_eq!(c, 3);
    assert!(err.contains("state is lost"), "{err}");
    assert_eq!(code(&s, &id, sh("echo ${V:-unset}")).await.0, "unset\n");
    // The Python kernel was not disturbed by the others.
    assert_eq!(py(&s, &id, "2 ** 10").await.0, "1024\n");
    assert_eq!(s.delete(&id).await, 204);
}

/// Code contexts: REPLs of their own in one sandbox (Python namespaces, JavaScript V8
/// contexts), each keeping its state and working directory apart from the others' and
/// the REPL's own; `run_code` names one; a fork carries the Python ones.
#[tokio::test]
async fn code_contexts_keep_separate_state_and_cwd_and_fork_with_the_sandbox() {
    let s = Server::start();
    let id = s.create_id().await;
    let new_ctx = |body: Value| {
        let (s, id) = (&s, id.clone());
        async move {
            let (st, v) = common::post(s, &format!("/v1/sandboxes/{id}/contexts"), body).await;
            assert_eq!(st, 201, "{v}");
            v
        }
    };
    let run = |sb: String, ctx: String, code: &'static str| {
        let s = &s;
        async move {
            common::post(
                s,
                &format!("/v1/sandboxes/{sb}/contexts/{ctx}/run"),
                json!({ "code": code }),
            )
            .await
        }
    };
    let v = new_ctx(json!({})).await;
    assert_eq!(
        (&v["language"], &v["cwd"]),
        (&json!("python"), &json!("/root"))
    );
    let a = v["id"].as_str().unwrap().to_owned();
    common::post(
        &s,
        &format!("/v1/sandboxes/{id}/files/mkdir"),
        json!({"path": "/tmp/b"}),
    )
    .await;
    let v = new_ctx(json!({"language": "python", "cwd": "/tmp/b"})).await;
    let b = v["id"].as_str().unwrap().to_owned();
    assert_eq!(run(id.clone(), a.clone(), "x = 'in a'").await.0, 200);
    assert_eq!(run(id.clone(), b.clone(), "x = 'in b'").await.0, 200);
    py(&s, &id, "x = 'in the REPL'").await;
    let (st, r) = run(id.clone(), a.clone(), "print(x)\nx + '!'").await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["stdout"], "in a\n");
    assert_eq!(r["results"][0]["text/plain"], "'in a!'");
    assert_eq!(
        run(id.clone(), b.clone(), "print(x)").await.1["stdout"],
        "in b\n"
    );
    assert_eq!(py(&s, &id, "print(x)").await.0, "in the REPL\n");
    let (_, r) = run(id.clone(), a.clone(), "1 / 0").await;
    assert_eq!(r["exit_code"], 1);
    assert!(
        r["error"].as_str().unwrap().contains("ZeroDivisionError"),
        "{r}"
    );
    // A cell printing more than the output cap still answers (its output cut), and a
    // SystemExit in a context is its error, not the REPL's end.
    let (st, r) = run(id.clone(), a.clone(), "print('y' * 1100000)\nx").await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["results"][0]["text/plain"], "'in a'", "{}", r["error"]);
    assert!(
        r["stderr"].as_str().unwrap().contains("stdout was cut"),
        "{}",
        r["stderr"]
    );
    let (_, r) = run(id.clone(), a.clone(), "raise SystemExit(3)").await;
    assert_eq!(r["exit_code"], 1);
    assert!(
        r["error"].as_str().unwrap().contains("SystemExit: 3"),
        "{r}"
    );
    // Each its own working directory: a chdir stays in its context.
    let cwd = "import os\nprint(os.getcwd())";
    assert_eq!(
        run(id.clone(), b.clone(), cwd).await.1["stdout"],
        "/tmp/b\n"
    );
    run(id.clone(), a.clone(), "import os\nos.chdir('/tmp')").await;
    assert_eq!(run(id.clone(), a.clone(), cwd).await.1["stdout"], "/tmp\n");
    assert_eq!(
        run(id.clone(), b.clone(), cwd).await.1["stdout"],
        "/tmp/b\n"
    );
    assert_eq!(py(&s, &id, cwd).await.0, "/root\n");
    // run_code naming a context: events as for any cell; the value printed; an error
    // is a traceback and exit 1, the context kept.
    let (out, err, c) = code(&s, &id, json!({"code": "print(x)\nx * 2", "context": a})).await;
    assert_eq!(
        (out.as_str(), err.as_str(), c),
        ("in a\n'in ain a'\n", "", 0)
    );
    let (out, err, c) = code(
        &s,
        &id,
        json!({"code": "y = 2\nundefined_name", "context": a}),
    )
    .await;
    assert_eq!((out.as_str(), c), ("", 1));
    assert!(
        err.contains("NameError") && !err.contains("forkbox"),
        "{err}"
    );
    assert_eq!(
        code(&s, &id, json!({"code": "print(y)", "context": a}))
            .await
            .0,
        "2\n"
    );
    // JavaScript contexts: V8 contexts of their own, with their own cwd.
    let v = new_ctx(json!({"language": "javascript", "cwd": "/tmp"})).await;
    assert_eq!(v["language"], "javascript");
    let j = v["id"].as_str().unwrap().to_owned();
    assert!(j.starts_with("ctxjs-"), "{j}");
    let v = new_ctx(json!({"language": "js"})).await;
    let k = v["id"].as_str().unwrap().to_owned();
    assert_eq!(
        run(id.clone(), j.clone(), "var n = 40; globalThis.m = 1")
            .await
            .0,
        200
    );
    let (st, r) = run(id.clone(), j.clone(), "console.log(typeof n); n + 2").await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        (&r["stdout"], &r["results"][0]["text/plain"]),
        (&json!("number\n"), &json!("42"))
    );
    let (_, r) = run(id.clone(), k.clone(), "typeof n + ' ' + typeof m").await;
    assert_eq!(r["results"][0]["text/plain"], "'undefined undefined'");
    let (_, r) = run(id.clone(), k.clone(), "null.x").await;
    assert_eq!(r["exit_code"], 1);
    assert!(r["error"].as_str().unwrap().contains("TypeError"), "{r}");
    let (out, _, c) = code(
        &s,
        &id,
        json!({"code": "process.cwd() + ' ' + n", "context": j, "language": "javascript"}),
    )
    .await;
    assert_eq!((out.as_str(), c), ("'/tmp 40'\n", 0));
    let (out, _, _) = code(&s, &id, json!({"code": "process.cwd()", "context": k})).await;
    assert_eq!(out, "'/root'\n");
    let (_, err, c) = code(
        &s,
        &id,
        json!({"code": "throw new Error('boom')", "context": k}),
    )
    .await;
    assert_eq!(c, 1);
    assert!(err.contains("Error: boom"), "{err}");
    // The JavaScript REPL's own globals are its own.
    assert_eq!(
        code(
            &s,
            &id,
            json!({"code": "typeof n", "language": "javascript"})
        )
        .await
        .0,
        "'undefined'\n"
    );
    // Refusals: bash, a cwd that is not a directory, a language that is not the
    // context's, cmd with a context; unknown or closed contexts are 404; a bad id 400.
    for body in [
        json!({"language": "bash"}),
        json!({"language": "cobol"}),
        json!({"cwd": "/nowhere"}),
        json!({"cwd": "relative"}),
    ] {
        let (st, v) = common::post(&s, &format!("/v1/sandboxes/{id}/contexts"), body.clone()).await;
        assert_eq!(st, 400, "{body} {v}");
    }
    for body in [
        json!({"code": "1", "context": j, "language": "python"}),
        json!({"cmd": "true", "context": a}),
        json!({"code": "1", "context": a, "cwd": "/tmp"}),
        json!({"code": "1", "context": "nope"}),
    ] {
        let (st, _) = s.exec(&id, body.clone()).await;
        assert_eq!(st, 400, "{body}");
    }
    let (st, _) = s
        .exec(&id, json!({"code": "1", "context": "ctx-0000000000000000"}))
        .await;
    assert_eq!(st, 404);
    assert_eq!(
        run(id.clone(), "ctx-0000000000000000".into(), "1").await.0,
        404
    );
    assert_eq!(run(id.clone(), "nope".into(), "1").await.0, 400);
    // A fork's children have the Python contexts, with their state and cwd; the
    // JavaScript REPL is not carried, nor its contexts.
    let (st, f) = common::post(&s, &format!("/v1/sandboxes/{id}/fork"), json!({"n": 1})).await;
    assert_eq!(st, 200, "{f}");
    let kid = f["children"][0].as_str().unwrap().to_owned();
    assert_eq!(
        run(kid.clone(), b.clone(), "print(x)").await.1["stdout"],
        "in b\n"
    );
    assert_eq!(run(kid.clone(), a.clone(), cwd).await.1["stdout"], "/tmp\n");
    assert_eq!(run(kid.clone(), j.clone(), "n").await.0, 404);
    // Closed: gone in the parent, still there in the child.
    assert_eq!(
        s.delete_at(&format!("/v1/sandboxes/{id}/contexts/{b}"))
            .await,
        204
    );
    assert_eq!(run(id.clone(), b.clone(), "print(x)").await.0, 404);
    assert_eq!(run(kid.clone(), b.clone(), "print(x)").await.0, 200);
    assert_eq!(
        s.delete_at(&format!("/v1/sandboxes/{id}/contexts/{j}"))
            .await,
        204
    );
    assert_eq!(run(id.clone(), j.clone(), "n").await.0, 404);
    assert_eq!(s.delete(&kid).await, 204);
    assert_eq!(s.delete(&id).await, 204);
}
