//! End-to-end: the code-runner API (`/api/v1`, seed 003) on a real server: languages
//! as data, one-shot execute in throw-away sandboxes, root filesystems built on demand
//! (a real mmdebstrap build of the `compilers` template the first time) and warm pools.

#![allow(clippy::unwrap_used)]

mod common;

use common::{get, post, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Waits until `language`'s rootfs leaves `building`; its final entry.
async fn wait_rootfs(s: &Server, language: &str, patience: Duration) -> Value {
    let deadline = Instant::now() + patience;
    loop {
        let (st, v) = get(s, "/api/v1/rootfs").await;
        assert_eq!(st, 200);
        let entry = v["rootfs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["language"] == language)
            .cloned();
        if let Some(e) = entry.filter(|e| e["status"] != "building") {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "rootfs of {language} still building"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn execute(s: &Server, language: &str, code: &str) -> Value {
    let (st, v) = post(
        s,
        "/api/v1/execute",
        json!({"language": language, "code": code}),
    )
    .await;
    assert_eq!(st, 200, "{language}: {v}");
    v
}

#[tokio::test]
async fn languages_are_data_and_unknown_ones_are_404() {
    let s = Server::start();
    let (st, v) = get(&s, "/api/v1/languages").await;
    assert_eq!(st, 200);
    let names: Vec<&str> = v["languages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    for want in [
        "python",
        "nodejs",
        "typescript",
        "bash",
        "go",
        "rust",
        "c",
        "cpp",
        "java",
        "ruby",
        "php",
        "perl",
        "lua",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert_eq!(v["count"], names.len());
    assert!(v["languages"][0].get("extension").is_some());
    let (st, v) = get(&s, "/api/v1/languages/golang").await;
    assert_eq!(st, 200);
    assert_eq!(
        (v["name"].as_str(), v["extension"].as_str()),
        (Some("go"), Some(".go"))
    );
    let (st, v) = get(&s, "/api/v1/languages/ruby2").await;
    assert_eq!(
        (st, v["error"].as_str()),
        (404, Some("language not found: ruby2"))
    );
    let (st, v) = post(
        &s,
        "/api/v1/execute",
        json!({"language": "ruby2", "code": "1"}),
    )
    .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (404, Some("language not found: ruby2"))
    );
}

#[tokio::test]
async fn execute_runs_scripts_and_compiled_languages_in_throwaway_sandboxes() {
    let s = Server::start();
    // Interpreted, in the default template.
    let v = execute(&s, "python", "print(\"Hello World!\")").await;
    assert_eq!(
        (v["stdout"].as_str(), v["exit_code"].as_i64()),
        (Some("Hello World!\n"), Some(0))
    );
    assert!(v["load_time"].as_str().unwrap().ends_with("ms"));
    assert!(v["exec_time"].as_str().unwrap().ends_with("ms"));
    let v = execute(
        &s,
        "nodejs",
        "console.log(Array.from({length:4},(_,i)=>i*i))",
    )
    .await;
    assert_eq!(v["stdout"], "[ 0, 1, 4, 9 ]\n");
    let v = execute(&s, "bash", "echo $((6*7)); echo oops >&2; exit 3").await;
    assert_eq!(
        (
            v["stdout"].as_str(),
            v["stderr"].as_str(),
            v["exit_code"].as_i64()
        ),
        (Some("42\n"), Some("oops\n"), Some(3))
    );
    // The sandbox was thrown away: nothing of it is listed, and a second run starts clean.
    execute(&s, "bash", "touch /tmp/left-behind").await;
    let v = execute(&s, "bash", "ls /tmp/left-behind 2>&1; true").await;
    assert!(
        v["stdout"].as_str().unwrap().contains("No such file"),
        "{v}"
    );
    let (_, list) = get(&s, "/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]));

    // A timeout ends an endless loop on time, with the timeout's exit code.
    let t = Instant::now();
    let (st, v) = post(
        &s,
        "/api/v1/execute",
        json!({"language": "python", "code": "while True: pass", "timeout": 2}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v["exit_code"], 124, "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );

    // Compiled languages: their rootfs is built on request (202), then they run.
    let (st, v) = post(
        &s,
        "/api/v1/rootfs",
        json!({"language": "c", "size_mb": 1024}),
    )
    .await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["language"], "c");
    let e = wait_rootfs(&s, "c", Duration::from_secs(1500)).await;
    assert_eq!(e["status"], "ready", "{e}");
    assert_eq!(e["template"], "compilers");
    for (lang, code, want) in [
        (
            "c",
            "#include <stdio.h>\nint main(void){ printf(\"Hello C!\\n\"); return 0; }",
            "Hello C!\n",
        ),
        (
            "cpp",
            "#include <iostream>\nint main(){ std::cout << \"Hello C++!\" << std::endl; }",
            "Hello C++!\n",
        ),
        (
            "go",
            "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"Hello Go!\") }",
            "Hello Go!\n",
        ),
        (
            "rust",
            "fn main() { println!(\"Hello Rust!\"); }",
            "Hello Rust!\n",
        ),
    ] {
        let v = execute(&s, lang, code).await;
        assert_eq!(
            (v["stdout"].as_str(), v["exit_code"].as_i64()),
            (Some(want), Some(0)),
            "{lang}: {v}"
        );
    }
    // Compile errors come back in stderr with a non-zero exit code, not as a 500.
    for (lang, code, needle) in [
        ("c", "int main(void) { return nope; }", "nope"),
        (
            "rust",
            "fn main() { let x: i32 = \"s\"; }",
            "mismatched types",
        ),
    ] {
        let v = execute(&s, lang, code).await;
        assert_ne!(v["exit_code"], 0, "{lang}: {v}");
        assert!(
            v["stderr"].as_str().unwrap().contains(needle),
            "{lang}: {v}"
        );
    }
    let (_, list) = get(&s, "/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]));
}

#[tokio::test]
async fn warm_pools_hand_over_ready_sandboxes() {
    let s = Server::start();
    let (st, v) = post(
        &s,
        "/api/v1/snapshots",
        json!({"language": "python", "mem_mb": 512, "vcpus": 1}),
    )
    .await;
    assert_eq!(
        (st, v["message"].as_str()),
        (202, Some("snapshot creation started"))
    );
    let full = || async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, v) = get(&s, "/api/v1/snapshots").await;
            let py = v["snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["language"] == "python")
                .cloned()
                .unwrap();
            if py["ready"] == 2 {
                assert_eq!(py["size"], 2);
                break;
            }
            assert!(Instant::now() < deadline, "pool did not fill: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    full().await;
    // Python from the pool runs in the sandbox's kernel, started while it waited
    // (the driver's `_socket` is already imported), exactly as `python3 main.py`: its
    // own `__main__` module, file, argv, path and directory, no echo of a last
    // expression, exit status from SystemExit, a traceback of its own frames only.
    let v = execute(
        &s,
        "python",
        "import os, sys, __main__, pickle\n\
         print(__name__, __file__, sys.argv, os.getcwd(), sys.path[0], __main__.__file__)\n\
         def f(): return 7\n\
         print(pickle.loads(pickle.dumps(f))(), '_socket' in sys.modules)\n\
         1 + 1",
    )
    .await;
    assert_eq!(
        (v["stdout"].as_str(), v["exit_code"].as_i64()),
        (
            Some("__main__ /tmp/main.py ['main.py'] /tmp /tmp /tmp/main.py\n7 True\n"),
            Some(0)
        ),
        "{v}"
    );
    full().await;
    let v = execute(&s, "python", "import sys\nprint('bye')\nsys.exit(3)").await;
    assert_eq!(
        (v["stdout"].as_str(), v["exit_code"].as_i64()),
        (Some("bye\n"), Some(3))
    );
    full().await;
    let v = execute(&s, "python", "x = 1\n1 / 0").await;
    let err = v["stderr"].as_str().unwrap();
    assert_eq!(v["exit_code"], 1, "{v}");
    assert!(
        err.starts_with("Traceback (most recent call last):\n  File \"/tmp/main.py\", line 2")
            && err.ends_with("ZeroDivisionError: division by zero\n"),
        "{err}"
    );
    // Each execute takes a fresh one and the pool refills behind it.
    for i in 0..4 {
        let v = execute(&s, "python", &format!("print({i})")).await;
        assert_eq!(v["stdout"], format!("{i}\n"));
    }
    // Pool sandboxes belong to no client workspace.
    let (_, list) = get(&s, "/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]));
}

#[tokio::test]
async fn a_failed_rootfs_build_is_reported_and_leaves_nothing() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("languages.toml");
    let builtin = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/languages.toml"),
    )
    .unwrap();
    std::fs::write(
        &file,
        format!(
            "{builtin}\n[templates.broken]\npackages = [\"forkbox-no-such-package\"]\n\n\
             [[languages]]\nname = \"broken\"\nextension = \".b\"\ntemplate = \"broken\"\n\
             run = \"true\"\nversion = \"true\"\n"
        ),
    )
    .unwrap();
    let (s, _log) = Server::start_logged_with(&[("FORKBOX_LANGUAGES", file.display().to_string())]);
    // Execute before the rootfs exists: 409, and the build starts.
    let (st, v) = post(
        &s,
        "/api/v1/execute",
        json!({"language": "broken", "code": "x"}),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("not built yet"),
        "{v}"
    );
    let e = wait_rootfs(&s, "broken", Duration::from_secs(600)).await;
    assert_eq!(e["status"], "failed", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("forkbox-no-such-package"),
        "{e}"
    );
    let templates = s.pool.join("templates");
    assert!(!templates.join("broken").exists() && !templates.join(".build-broken").exists());
    let (_, v) = get(&s, "/api/v1/languages/broken").await;
    assert_eq!(v["rootfs"], "failed");
}
