//! Code contexts (PandaStack's `repl/sessions`): namespaces of their own inside the
//! sandbox's one Python REPL, so state persists per context and contexts do not see
//! each other's (or the REPL's own) variables. Driven entirely through forkbox's
//! REPL: each call is a cell that runs the helper in `contexts.py`, which prints one
//! marked JSON line at its end. Contexts live in the REPL's memory: fork children get
//! them too; a REPL that restarts loses them.

use crate::error::ApiError;
use crate::AppState;
use forkbox_core::{ExecCommand, SandboxRef, Work};
use forkbox_types::agent::Language;
use serde_json::Value;

/// The helper, defined once per REPL into its builtins.
const HELPER: &str = include_str!("contexts.py");

/// What a context call printed and the helper's answer.
pub struct Reply {
    pub stdout: String,
    pub stderr: String,
    /// The helper's JSON line; `None` when the REPL ended before printing it.
    pub answer: Option<Value>,
    /// The REPL's exit status when it ended the cell by exiting.
    pub exit: i32,
}

/// A Python string literal of `s` (a JSON string is one).
fn literal(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// Runs context operation `op` (`new`, `del`, `run`) for context `ctx` with `code`.
/// A timeout (`timeout_s`) interrupts the cell (the REPL and its contexts stay) and is
/// a 504 saying so.
pub async fn call(
    st: &AppState,
    id: &SandboxRef,
    op: &str,
    ctx: &str,
    code: &str,
    timeout_s: Option<f64>,
) -> Result<Reply, ApiError> {
    let nonce = forkbox_core::ids::new("fbxctx");
    let cell = format!(
        "if not hasattr(__import__('builtins'), '__forkbox_ctx__'):\n    \
         __forkbox_g = {{}}\n    \
         exec(compile({}, '<forkbox-contexts>', 'exec'), __forkbox_g)\n    \
         __import__('builtins').__forkbox_ctx__ = __forkbox_g['__forkbox_ctx__']\n    \
         del __forkbox_g\n\
         __import__('builtins').__forkbox_ctx__({}, {}, {}, {})\n",
        literal(HELPER),
        literal(op),
        literal(ctx),
        literal(code),
        literal(&nonce),
    );
    let events = st
        .manager
        .exec(
            id,
            ExecCommand {
                work: Work::Code {
                    language: Language::Python,
                    code: cell,
                },
                cwd: None,
                env: Default::default(),
                timeout: timeout_s,
            },
        )
        .await?;
    let crate::dialect::Collected {
        stdout: out,
        stderr: err,
        code,
        timed_out,
    } = crate::dialect::collect(events).await;
    let exit = code.unwrap_or_default();
    if timed_out {
        return Err(ApiError::Timeout(format!(
            "timeout: the cell ran past {}s and was interrupted (the context keeps its state)",
            timeout_s.unwrap_or_default()
        )));
    }
    let marker = format!("\n{nonce}");
    let (stdout, answer) = match out.rfind(&marker) {
        Some(i) => {
            let line = out[i + marker.len()..].lines().next().unwrap_or_default();
            let answer = serde_json::from_str(line).ok();
            (out[..i].to_owned(), answer)
        }
        None => (out, None),
    };
    Ok(Reply {
        stdout,
        stderr: err,
        answer,
        exit,
    })
}
