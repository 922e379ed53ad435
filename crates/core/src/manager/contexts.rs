//! Code contexts (E2B's `create_code_context`, PandaStack's `repl/sessions`): several
//! named REPLs in one sandbox, each with its own language, working directory and state.
//! A Python context is a namespace of its own in the sandbox's Python REPL; a
//! JavaScript one a V8 context of its own (node's `vm`) in its JavaScript REPL. Each
//! keeps the directory its code moved to, apart from the REPL's and the others'. They
//! are driven entirely through the REPL: every call is a cell that runs the helper
//! (`contexts.py`, `contexts.js`), which answers with one marked JSON line. Contexts live
//! in the REPL's memory: a fork carries the Python REPL, so its children have the
//! Python contexts (same ids, same state); JavaScript contexts stay with the parent; a
//! REPL that restarts loses its contexts.
//!
//! A context's id says its language (`ctx-…` Python, `ctxjs-…` JavaScript), so it
//! needs no record of its own and means the same thing in a fork child.

use super::*;
use serde_json::Value;

const PYTHON_HELPER: &str = include_str!("contexts.py");
const JAVASCRIPT_HELPER: &str = include_str!("contexts.js");
/// Longest a context's open, close or existence check may take (its REPL may be busy
/// with another cell, or its code may have replaced the helper).
const HELPER_TIMEOUT_S: f64 = 30.0;

/// What a cell run in a context did.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextRun {
    /// MIME bundles: the last expression's `text/plain` and rich reprs (Python: HTML,
    /// figures as `image/png`, …).
    pub results: Value,
    pub stdout: String,
    pub stderr: String,
    /// The traceback or stack of an uncaught exception.
    pub error: Option<String>,
    pub exit_code: i32,
}

/// The language of context id `ctx`, if it is a context id.
pub fn context_language(ctx: &str) -> Option<Language> {
    if ids::is_valid("ctx", ctx) {
        Some(Language::Python)
    } else if ids::is_valid("ctxjs", ctx) {
        Some(Language::Javascript)
    } else {
        None
    }
}

fn context_of(ctx: &str) -> Result<Language, CoreError> {
    context_language(ctx)
        .ok_or_else(|| CoreError::Invalid(format!("{ctx:?} is not a code context id")))
}

/// A string literal of `s` in Python and JavaScript alike (a JSON string is one).
fn literal(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// The cell that runs helper operation `op` in `language`'s REPL, installing the helper
/// first if this REPL does not have it yet.
fn cell(language: Language, op: &str, ctx: &str, code: &str, nonce: &str, cwd: &str) -> String {
    let args = [op, ctx, code, nonce, cwd]
        .iter()
        .map(|a| literal(a))
        .collect::<Vec<_>>()
        .join(", ");
    match language {
        Language::Javascript => format!(
            "(globalThis.__forkbox_ctx_v2__ || (require('vm').runInThisContext({}), \
             globalThis.__forkbox_ctx_v2__))({args})",
            literal(JAVASCRIPT_HELPER)
        ),
        _ => format!(
            "if not hasattr(__import__('builtins'), '__forkbox_ctx_v2__'):\n    \
             __forkbox_g = {{}}\n    \
             exec(compile({}, '<forkbox-contexts>', 'exec'), __forkbox_g)\n    \
             __import__('builtins').__forkbox_ctx_v2__ = __forkbox_g['__forkbox_ctx_v2__']\n    \
             del __forkbox_g\n\
             __import__('builtins').__forkbox_ctx_v2__({args})\n",
            literal(PYTHON_HELPER)
        ),
    }
}

/// What a helper call printed, and its answer line (`None`: the REPL ended first).
struct Reply {
    stdout: String,
    stderr: String,
    answer: Option<Value>,
    exit: i32,
}

fn repl_name(language: Language) -> &'static str {
    match language {
        Language::Javascript => "JavaScript",
        _ => "Python",
    }
}

impl Manager {
    /// Runs helper operation `op` for context `ctx` and collects its answer. Past
    /// `timeout_s` the cell is interrupted (the REPL and its contexts stay): 504.
    async fn context_call(
        &self,
        id: &SandboxRef,
        op: &str,
        ctx: &str,
        code: &str,
        cwd: &str,
        timeout_s: Option<f64>,
    ) -> Result<Reply, CoreError> {
        let language = context_of(ctx)?;
        let nonce = ids::new("fbxctx");
        let events = self
            .exec(
                id,
                ExecCommand {
                    work: Work::Code {
                        language,
                        code: cell(language, op, ctx, code, &nonce, cwd),
                    },
                    cwd: None,
                    env: BTreeMap::new(),
                    timeout: timeout_s,
                },
            )
            .await?;
        // Events are lines: the answer is the one starting with the nonce, found however
        // much the cell printed (the rest is kept up to the usual cap).
        let mut answer = None;
        let c = crate::runner::collect_except(events, |line| match line.strip_prefix(&nonce) {
            Some(json) => {
                answer = serde_json::from_str::<Value>(json.trim_end()).ok();
                true
            }
            None => false,
        })
        .await;
        if c.exit_code == 124 && c.stderr.lines().any(|l| l.starts_with(TIMEOUT_NOTE)) {
            return Err(CoreError::Timeout(format!(
                "timeout: the cell ran past {}s and was interrupted (the context keeps its state)",
                timeout_s.unwrap_or_default()
            )));
        }
        let mut stdout = c.stdout;
        // The helper starts its answer on a line of its own.
        if answer.is_some() && stdout.ends_with('\n') {
            stdout.pop();
        }
        Ok(Reply {
            stdout,
            stderr: c.stderr,
            answer,
            exit: c.exit_code,
        })
    }

    /// Opens a code context in `language` (Python or JavaScript) working in `cwd`
    /// (default `/root`, which must be a directory): its new id.
    pub async fn open_context(
        &self,
        id: &SandboxRef,
        language: Language,
        cwd: Option<&str>,
    ) -> Result<String, CoreError> {
        let prefix = match language {
            Language::Python => "ctx",
            Language::Javascript => "ctxjs",
            Language::Bash => {
                return Err(CoreError::Invalid(
                    "code contexts are python or javascript; the sandbox's bash REPL is \
                     POST /v1/sandboxes/{id}/exec {\"code\", \"language\": \"bash\"}"
                        .into(),
                ))
            }
        };
        let cwd = cwd.unwrap_or("/root");
        if !cwd.starts_with('/') || cwd.contains('\0') {
            return Err(CoreError::Invalid(
                "cwd must be an absolute path without NUL".into(),
            ));
        }
        let ctx = ids::new(prefix);
        let r = self
            .context_call(id, "new", &ctx, "", cwd, Some(HELPER_TIMEOUT_S))
            .await?;
        match r.answer {
            Some(a) if a["ok"] == Value::Bool(true) => Ok(ctx),
            Some(a) if a["invalid"].is_string() => Err(CoreError::Invalid(
                a["invalid"].as_str().unwrap_or_default().to_owned(),
            )),
            _ => Err(CoreError::Conflict(format!(
                "the {} REPL did not make the context (exit {}): {}",
                repl_name(language),
                r.exit,
                r.stderr.trim()
            ))),
        }
    }

    /// Closes context `ctx` (404 when there is none).
    pub async fn close_context(&self, id: &SandboxRef, ctx: &str) -> Result<(), CoreError> {
        let r = self
            .context_call(id, "del", ctx, "", "/", Some(HELPER_TIMEOUT_S))
            .await?;
        match r.answer.as_ref().and_then(|a| a["ok"].as_bool()) {
            Some(true) => Ok(()),
            _ => Err(CoreError::NoContext(ctx.to_owned())),
        }
    }

    /// Runs `code` in context `ctx` and answers what it did; past `timeout_s` the cell
    /// is interrupted (504, the context keeps its state). A cell that ends the REPL
    /// answers its status (every context of that REPL is gone with it).
    pub async fn run_context(
        &self,
        id: &SandboxRef,
        ctx: &str,
        code: &str,
        timeout_s: Option<f64>,
    ) -> Result<ContextRun, CoreError> {
        let language = context_of(ctx)?;
        let r = self
            .context_call(id, "run", ctx, code, "/", timeout_s)
            .await?;
        let Some(answer) = r.answer else {
            return Ok(ContextRun {
                results: Value::Array(Vec::new()),
                stdout: r.stdout,
                stderr: r.stderr,
                error: Some(format!(
                    "the {} REPL exited (status {}); its code contexts are gone",
                    repl_name(language),
                    r.exit
                )),
                exit_code: if r.exit == 0 { 1 } else { r.exit },
            });
        };
        if answer["missing"].as_bool() == Some(true) {
            return Err(CoreError::NoContext(ctx.to_owned()));
        }
        let error = answer["error"].as_str().map(str::to_owned);
        Ok(ContextRun {
            results: answer["results"].clone(),
            stdout: r.stdout,
            stderr: r.stderr,
            exit_code: i32::from(error.is_some()),
            error,
        })
    }

    /// `run_code` naming a context: `code` runs in context `ctx` as a REPL cell runs
    /// (events streamed as they happen; the last expression's value printed; an
    /// uncaught exception's traceback on stderr and exit 1; a timeout interrupts it,
    /// 124, the context keeps its state). 404 when the context does not exist.
    pub async fn exec_in_context(
        &self,
        id: &SandboxRef,
        ctx: &str,
        code: String,
        timeout: Option<f64>,
    ) -> Result<BoxStream<'static, ExecEvent>, CoreError> {
        let language = context_of(ctx)?;
        if code.is_empty() || code.contains('\0') {
            return Err(CoreError::Invalid(
                "code must be non-empty and contain no NUL".into(),
            ));
        }
        let has = self
            .context_call(id, "has", ctx, "", "/", Some(HELPER_TIMEOUT_S))
            .await?;
        if has.answer.as_ref().and_then(|a| a["ok"].as_bool()) != Some(true) {
            return Err(CoreError::NoContext(ctx.to_owned()));
        }
        self.exec(
            id,
            ExecCommand {
                work: Work::Code {
                    language,
                    code: cell(language, "exec", ctx, &code, "", "/"),
                },
                cwd: None,
                env: BTreeMap::new(),
                timeout,
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_id_says_its_language() {
        let py = ids::new("ctx");
        let js = ids::new("ctxjs");
        assert_eq!(context_language(&py), Some(Language::Python));
        assert_eq!(context_language(&js), Some(Language::Javascript));
        for bad in ["ctx-short", "sbx-0123456789abcdef", "", "ctxjs-", "ctx"] {
            assert_eq!(context_language(bad), None, "{bad}");
        }
    }

    /// The cells are valid programs in their REPL's language, whatever the arguments
    /// hold (quotes, newlines, backslashes): checked by the host's python3 and node.
    #[test]
    fn cells_quote_their_arguments() {
        let nasty = "a'b\"c\\d\ne\u{2028}f${x}`";
        let py = cell(Language::Python, "run", "ctx-x", nasty, "n", nasty);
        let out = std::process::Command::new("python3")
            .args(["-c", "import ast, sys; ast.parse(sys.argv[1])", &py])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let js = cell(Language::Javascript, "run", "ctxjs-x", nasty, "n", nasty);
        let out = std::process::Command::new("node")
            .args(["-e", "new (require('vm').Script)(process.argv[1])", &js])
            .output()
            .expect("node");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
