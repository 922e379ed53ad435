//! End-to-end: the `forkbox` client commands against a real server.

#![allow(clippy::unwrap_used)]

mod common;

use common::Server;
use serde_json::Value;
use std::process::{Command, Output};

fn forkbox(s: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .args(args)
        .env("FORKBOX_URL", &s.base)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn run_and_sandbox_commands() {
    let s = Server::start();
    // One-shot runs: output streamed, exit codes passed through.
    let o = forkbox(&s, &["run", "python", "-c", "print(6*7)"]);
    assert_eq!(
        (text(&o.stdout), o.status.code()),
        ("42\n".into(), Some(0)),
        "{}",
        text(&o.stderr)
    );
    let o = forkbox(&s, &["run", "bash", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(text(&o.stdout), "out\n");
    assert_eq!(text(&o.stderr), "err\n");
    assert_eq!(o.status.code(), Some(3));
    let o = forkbox(
        &s,
        &[
            "run",
            "javascript",
            "-c",
            "console.log([1,2].map(x => x * 2).join(','))",
        ],
    );
    assert_eq!(text(&o.stdout), "2,4\n");
    let o = forkbox(&s, &["run", "cobol", "-c", "x"]);
    assert_ne!(o.status.code(), Some(0));
    // Sandboxes: create, ls, exec, fork, merge, rm; --json parses.
    let o = forkbox(&s, &["sandbox", "create", "--json"]);
    let created: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let o = forkbox(&s, &["sandbox", "ls", "--json"]);
    let ls: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(ls
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == id.as_str()));
    let o = forkbox(&s, &["sandbox", "ls"]);
    assert!(text(&o.stdout).starts_with("ID"), "{}", text(&o.stdout));
    assert!(text(&o.stdout).contains(&id));
    let o = forkbox(
        &s,
        &[
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "'echo hi; exit 4'",
        ],
    );
    assert_eq!((text(&o.stdout), o.status.code()), ("hi\n".into(), Some(4)));
    let o = forkbox(&s, &["sandbox", "fork", &id, "-n", "2"]);
    let kids: Vec<String> = text(&o.stdout).lines().map(str::to_owned).collect();
    assert_eq!(kids.len(), 2, "{}", text(&o.stderr));
    let o = forkbox(&s, &["sandbox", "merge", &id, &kids[0]]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = forkbox(&s, &["sandbox", "rm", &id, &kids[1]]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // Errors are messages and a failing exit code.
    let o = forkbox(&s, &["sandbox", "rm", &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("410"), "{}", text(&o.stderr));
    let o = Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .args(["sandbox", "ls", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(
        text(&o.stderr).contains("cannot reach"),
        "{}",
        text(&o.stderr)
    );
}

/// Runs `forkbox` with `input` piped to its stdin; kills it after 60 s.
fn forkbox_piped(s: &Server, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkbox"))
        .args(args)
        .env("FORKBOX_URL", &s.base)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .is_err()
        {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    out
}

#[tokio::test]
async fn shell_through_a_pipe() {
    let s = Server::start();
    let id = s.create_id().await;
    // A login shell on a terminal; the output is the terminal's (echo included), so look
    // for what only running the line prints.
    let o = forkbox_piped(
        &s,
        &["sandbox", "shell", &id],
        "echo hel''lo $((6 * 7)) $(tty); exit 3\n",
    );
    let out = text(&o.stdout);
    assert!(
        out.contains("hello 42 /dev/pts/"),
        "{out:?} {}",
        text(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(3), "{out:?} {}", text(&o.stderr));
    // --cmd, and the end of the input arrives as an end of file.
    let o = forkbox_piped(
        &s,
        &["sandbox", "shell", &id, "--cmd", "cat > /tmp/got; exit 4"],
        "line one\nline two\n",
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o.stderr));
    let (got, _, code) = s.sh(&id, "cat /tmp/got").await;
    assert_eq!((got.as_str(), code), ("line one\nline two\n", 0));
    // Errors: the server's message and a failing exit code.
    let o = forkbox_piped(&s, &["sandbox", "shell", "sbx-nope"], "");
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("404"), "{}", text(&o.stderr));
    assert_eq!(s.delete(&id).await, 204);
    let o = forkbox_piped(&s, &["sandbox", "shell", &id], "");
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("410"), "{}", text(&o.stderr));
}
