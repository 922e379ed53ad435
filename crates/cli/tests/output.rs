//! End-to-end stress: no output is ever lost. Many concurrent short commands across
//! sandboxes, each printing a token of its own (some without a trailing newline, some
//! with a line written by a child that outlives the shell, some on stderr, some REPL
//! cells); every response must carry exactly its output and exit code, with `exit`
//! last. Before the fix about 1% of the late-child commands ended without their late
//! line at this concurrency (a 50 ms drain window raced the scheduler, and a timer
//! could win over readable output); the counts are set so that today's code fails.

#![allow(clippy::unwrap_used)]

mod common;

use common::{collect, Server};
use serde_json::json;
use std::sync::Arc;

/// Sandboxes, clients per sandbox, and calls per client.
const SANDBOXES: usize = 20;
const CLIENTS_PER_SANDBOX: usize = 2;
const CALLS: usize = 90;

/// What call `n` of client `c` runs, and the output and exit code it must give.
fn shape(c: usize, n: usize) -> (serde_json::Value, String, String, i64) {
    let tok = format!("t{c}x{n}");
    match n % 6 {
        0 => (
            json!({"cmd": format!("printf '{tok}\\n'")}),
            format!("{tok}\n"),
            String::new(),
            0,
        ),
        1 => (
            json!({"cmd": format!("printf '{tok}'")}),
            tok.clone(),
            String::new(),
            0,
        ),
        2 | 3 => (
            json!({"cmd": format!("echo {tok}; (sleep 0.005; echo late-{tok}) &")}),
            format!("{tok}\nlate-{tok}\n"),
            String::new(),
            0,
        ),
        4 => (
            json!({"cmd": format!("echo {tok} >&2; printf 'out-{tok}'; exit 3")}),
            format!("out-{tok}"),
            format!("{tok}\n"),
            3,
        ),
        _ => (
            json!({"code": format!("print('{tok}', end='')")}),
            tok.clone(),
            String::new(),
            0,
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_output_is_lost_under_concurrent_load() {
    let s = Arc::new(Server::start());
    let mut ids = Vec::new();
    for _ in 0..SANDBOXES {
        ids.push(s.create_id().await);
    }
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        for k in 0..CLIENTS_PER_SANDBOX {
            let (s, id) = (s.clone(), id.clone());
            let c = i * CLIENTS_PER_SANDBOX + k;
            tasks.push(tokio::spawn(async move {
                let mut bad = Vec::new();
                for n in 0..CALLS {
                    let (body, out, err, code) = shape(c, n);
                    let (st, events) = s.exec(&id, body.clone()).await;
                    assert_eq!(st, 200, "{body}: {events:?}");
                    let got = collect(&events);
                    if got != (out.clone(), err.clone(), code) {
                        bad.push(format!("{body} gave {got:?}, want {:?}", (out, err, code)));
                    }
                }
                bad
            }));
        }
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.unwrap());
    }
    let total = SANDBOXES * CLIENTS_PER_SANDBOX * CALLS;
    assert!(
        bad.is_empty(),
        "{} of {total} calls lost or changed output:\n{}",
        bad.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}
