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

/// Why a context cannot be in `language` (`None`: Python, the default), if it cannot:
/// forkbox's API answers it as a bad request, a dialect as "not offered".
pub fn not_python(language: Option<&str>) -> Option<String> {
    let lang = language.unwrap_or("python");
    (Language::parse(lang) != Some(Language::Python)).then(|| {
        format!(
            "code contexts are Python only here ({lang:?}); the sandbox's persistent {lang} \
             REPL is POST /v1/sandboxes/{{id}}/exec {{\"code\", \"language\"}}"
        )
    })
}

/// A Python context opened: a new id, after the REPL made its namespace.
pub async fn open(st: &AppState, id: &SandboxRef) -> Result<String, ApiError> {
    let ctx = forkbox_core::ids::new("ctx");
    let r = call(st, id, "new", &ctx, "", None).await?;
    if r.answer.is_none() {
        return Err(ApiError::Internal(format!(
            "the Python REPL did not make the context (exit {}): {}",
            r.exit, r.stderr
        )));
    }
    Ok(ctx)
}

/// `ctx` when it is a context id.
pub fn context_id(ctx: &str) -> Result<&str, ApiError> {
    if forkbox_core::ids::is_valid("ctx", ctx) {
        Ok(ctx)
    } else {
        Err(ApiError::Core(forkbox_core::CoreError::Invalid(format!(
            "{ctx:?} is not a code context id"
        ))))
    }
}

/// Drops context `ctx`'s namespace (404 when there is none).
pub async fn close(st: &AppState, id: &SandboxRef, ctx: &str) -> Result<(), ApiError> {
    let r = call(st, id, "del", context_id(ctx)?, "", None).await?;
    match r.answer.as_ref().and_then(|a| a["ok"].as_bool()) {
        Some(true) => Ok(()),
        _ => Err(ApiError::NotFound(format!("code context {ctx} not found"))),
    }
}

/// A cell run in a context.
pub struct Ran {
    /// MIME bundles: the last expression's `text/plain` and rich reprs, figures.
    pub results: Value,
    pub stdout: String,
    pub stderr: String,
    /// The traceback of an uncaught exception.
    pub error: Option<String>,
    pub exit_code: i32,
}

/// Runs `code` in context `ctx`; past `timeout_s` the cell is interrupted (504). A
/// cell that ends the REPL answers its status (every context is gone with it).
pub async fn run(
    st: &AppState,
    id: &SandboxRef,
    ctx: &str,
    code: &str,
    timeout_s: Option<f64>,
) -> Result<Ran, ApiError> {
    let r = call(st, id, "run", context_id(ctx)?, code, timeout_s).await?;
    let Some(answer) = r.answer else {
        return Ok(Ran {
            results: Value::Array(Vec::new()),
            stdout: r.stdout,
            stderr: r.stderr,
            error: Some(format!(
                "the Python REPL exited (status {}); its code contexts are gone",
                r.exit
            )),
            exit_code: if r.exit == 0 { 1 } else { r.exit },
        });
    };
    if answer["missing"].as_bool() == Some(true) {
        return Err(ApiError::NotFound(format!(
            "code context {ctx} not found (closed, or the sandbox's REPL restarted)"
        )));
    }
    let error = answer["error"].as_str().map(str::to_owned);
    Ok(Ran {
        results: answer["results"].clone(),
        stdout: r.stdout,
        stderr: r.stderr,
        exit_code: i32::from(error.is_some()),
        error,
    })
}

/// `POST /v1/sandboxes/{id}/contexts`.
#[derive(serde::Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct NewContextBody {
    /// Only `python` (the default).
    #[serde(default)]
    language: Option<String>,
}

/// A code context.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ContextView {
    id: String,
    language: String,
}

/// `POST /v1/sandboxes/{id}/contexts/{ctx}/run`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunContextBody {
    code: String,
    /// Seconds; past it the cell is interrupted (504) and the context keeps its state.
    #[serde(default)]
    timeout: Option<f64>,
}

/// What a cell in a context did.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ContextRun {
    /// MIME bundles: the last expression's `text/plain` and rich reprs (HTML,
    /// figures as `image/png`).
    #[schema(value_type = Vec<Object>)]
    results: Value,
    stdout: String,
    stderr: String,
    /// The traceback of an uncaught exception.
    error: Option<String>,
    exit_code: i32,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/contexts", tag = "contexts", params(("id" = String, Path, description = "Sandbox id")), request_body = NewContextBody, responses((status = 201, body = ContextView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn create(
    axum::extract::State(st): axum::extract::State<AppState>,
    crate::owned::Sbx(id): crate::owned::Sbx,
    crate::extract::JsonBody(b): crate::extract::JsonBody<NewContextBody>,
) -> Result<(axum::http::StatusCode, axum::Json<ContextView>), ApiError> {
    if let Some(why) = not_python(b.language.as_deref()) {
        return Err(ApiError::BadRequest(why));
    }
    let ctx = open(&st, &id).await?;
    Ok((
        axum::http::StatusCode::CREATED,
        axum::Json(ContextView {
            id: ctx,
            language: "python".into(),
        }),
    ))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/contexts/{ctx}", tag = "contexts", params(("id" = String, Path, description = "Sandbox id"), ("ctx" = String, Path, description = "Context id")), responses((status = 204, description = "Closed"), (status = "4XX", description = "No such context or sandbox", body = crate::error::ErrorBody)))]
pub async fn delete(
    axum::extract::State(st): axum::extract::State<AppState>,
    crate::owned::Sbx(id): crate::owned::Sbx,
    crate::extract::PathArgs(args): crate::extract::PathArgs<(String, String)>,
) -> Result<axum::http::StatusCode, ApiError> {
    close(&st, &id, &args.1).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/contexts/{ctx}/run", tag = "contexts", params(("id" = String, Path, description = "Sandbox id"), ("ctx" = String, Path, description = "Context id")), request_body = RunContextBody, responses((status = 200, body = ContextRun), (status = "4XX", description = "Invalid request, no such context, wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure; 504 past the timeout", body = crate::error::ErrorBody)))]
pub async fn run_cell(
    axum::extract::State(st): axum::extract::State<AppState>,
    crate::owned::Sbx(id): crate::owned::Sbx,
    crate::extract::PathArgs(args): crate::extract::PathArgs<(String, String)>,
    crate::extract::JsonBody(b): crate::extract::JsonBody<RunContextBody>,
) -> Result<axum::Json<ContextRun>, ApiError> {
    let ctx = args.1;
    if let Some(t) = b.timeout {
        if !(t > 0.0 && t <= 86400.0) {
            return Err(ApiError::BadRequest(
                "timeout must be between 0 and 86400 seconds".into(),
            ));
        }
    }
    let r = run(&st, &id, &ctx, &b.code, b.timeout).await?;
    Ok(axum::Json(ContextRun {
        results: r.results,
        stdout: r.stdout,
        stderr: r.stderr,
        error: r.error,
        exit_code: r.exit_code,
    }))
}
