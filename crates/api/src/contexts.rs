//! Code contexts over HTTP (`/v1/sandboxes/{id}/contexts…`): several REPLs of their
//! own in a sandbox, each with its language, working directory and state
//! (`forkbox_core::manager::contexts`). `exec {"code", "context"}` runs a cell in one
//! with streamed events (sandboxes.rs).

use crate::error::ApiError;
use crate::AppState;
use forkbox_types::agent::Language;
use serde_json::Value;

/// The language of a new context (`python` by default): python or javascript.
pub fn language(name: Option<&str>) -> Result<Language, String> {
    let name = name.unwrap_or("python");
    match Language::parse(name) {
        Some(l @ (Language::Python | Language::Javascript)) => Ok(l),
        _ => Err(format!(
            "code contexts are python or javascript here ({name:?}); the sandbox's \
             persistent REPLs of every language are POST /v1/sandboxes/{{id}}/exec \
             {{\"code\", \"language\"}}"
        )),
    }
}

#[derive(serde::Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct NewContextBody {
    /// `python` (the default) or `javascript`.
    #[serde(default)]
    language: Option<String>,
    /// Its working directory (default `/root`): a `chdir` in the context stays in it.
    #[serde(default)]
    cwd: Option<String>,
}

/// A code context.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ContextView {
    id: String,
    language: String,
    cwd: String,
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
    /// The traceback (or stack) of an uncaught exception.
    error: Option<String>,
    exit_code: i32,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/contexts", tag = "contexts", params(("id" = String, Path, description = "Sandbox id")), request_body = NewContextBody, responses((status = 201, body = ContextView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn create(
    axum::extract::State(st): axum::extract::State<AppState>,
    crate::owned::Sbx(id): crate::owned::Sbx,
    crate::extract::JsonBody(b): crate::extract::JsonBody<NewContextBody>,
) -> Result<(axum::http::StatusCode, axum::Json<ContextView>), ApiError> {
    let lang = language(b.language.as_deref()).map_err(ApiError::BadRequest)?;
    let ctx = st.manager.open_context(&id, lang, b.cwd.as_deref()).await?;
    Ok((
        axum::http::StatusCode::CREATED,
        axum::Json(ContextView {
            id: ctx,
            language: lang.as_str().into(),
            cwd: b.cwd.unwrap_or_else(|| "/root".into()),
        }),
    ))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/contexts/{ctx}", tag = "contexts", params(("id" = String, Path, description = "Sandbox id"), ("ctx" = String, Path, description = "Context id")), responses((status = 204, description = "Closed"), (status = "4XX", description = "No such context or sandbox", body = crate::error::ErrorBody)))]
pub async fn delete(
    axum::extract::State(st): axum::extract::State<AppState>,
    crate::owned::Sbx(id): crate::owned::Sbx,
    crate::extract::PathArgs(args): crate::extract::PathArgs<(String, String)>,
) -> Result<axum::http::StatusCode, ApiError> {
    st.manager.close_context(&id, &args.1).await?;
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
    let r = st
        .manager
        .run_context(&id, &ctx, &b.code, b.timeout)
        .await?;
    Ok(axum::Json(ContextRun {
        results: r.results,
        stdout: r.stdout,
        stderr: r.stderr,
        error: r.error,
        exit_code: r.exit_code,
    }))
}
