//! The code-runner contract (`/api/v1`, seed 003): languages, one-shot execute, and
//! each language's root filesystem (template) and warm pool.

use crate::extract::{JsonBody, PathArgs};
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use forkbox_core::languages::Language;
use forkbox_core::runner::{Execute, RootfsState, DEFAULT_WARM};
use serde::{Deserialize, Serialize};

#[derive(Serialize, utoipa::ToSchema)]
pub struct LanguageBrief {
    name: String,
    extension: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct LanguageList {
    languages: Vec<LanguageBrief>,
    count: usize,
}

#[utoipa::path(get, path = "/api/v1/languages", tag = "runner", responses((status = 200, body = LanguageList)))]
pub async fn languages(State(st): State<AppState>) -> Json<LanguageList> {
    let languages: Vec<LanguageBrief> = st
        .manager
        .languages()
        .into_iter()
        .map(|l| LanguageBrief {
            name: l.name,
            extension: l.extension,
        })
        .collect();
    Json(LanguageList {
        count: languages.len(),
        languages,
    })
}

/// One language, from `languages.toml`, and the state of its root filesystem.
#[derive(Serialize, utoipa::ToSchema)]
pub struct LanguageView {
    name: String,
    aliases: Vec<String>,
    extension: String,
    /// File the code is written to.
    file: String,
    /// Template (root filesystem) it runs in.
    template: String,
    compile: Option<String>,
    run: String,
    /// Command that prints the toolchain's version.
    version_command: String,
    /// `ready`, `building`, `failed` or `missing` (build it with POST /api/v1/rootfs).
    rootfs: &'static str,
}

fn state_name(s: &RootfsState) -> &'static str {
    match s {
        RootfsState::Ready(_) => "ready",
        RootfsState::Building => "building",
        RootfsState::Failed(_) => "failed",
        RootfsState::Missing => "missing",
    }
}

#[utoipa::path(get, path = "/api/v1/languages/{lang}", tag = "runner", params(("lang" = String, Path, description = "Name or alias")), responses((status = 200, body = LanguageView), (status = 404, description = "language not found: <lang>", body = crate::error::ErrorBody)))]
pub async fn language(
    State(st): State<AppState>,
    PathArgs(lang): PathArgs<String>,
) -> Result<Json<LanguageView>, ApiError> {
    let l = st.manager.language(&lang)?;
    let state = st.manager.rootfs_state(&l).await;
    Ok(Json(LanguageView {
        file: l.file_name(),
        name: l.name,
        aliases: l.aliases,
        extension: l.extension,
        template: l.template,
        compile: l.compile,
        run: l.run,
        version_command: l.version,
        rootfs: state_name(&state),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBody {
    language: String,
    code: String,
    /// Seconds for compile and run together (default 30, at most 600).
    timeout: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ExecuteView {
    stdout: String,
    stderr: String,
    /// The program's exit code; a compile error's when it did not compile; 124 when the
    /// timeout killed it.
    exit_code: i32,
    /// Time to a ready sandbox, e.g. `"8ms"`.
    load_time: String,
    /// Time writing, compiling and running the code.
    exec_time: String,
    language: String,
}

fn ms(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[utoipa::path(post, path = "/api/v1/execute", tag = "runner", request_body = ExecuteBody, responses((status = 200, body = ExecuteView), (status = 404, description = "language not found: <lang>", body = crate::error::ErrorBody), (status = 409, description = "The language's root filesystem is not built yet (its build starts)", body = crate::error::ErrorBody), (status = "4XX", description = "Invalid request", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn execute(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<ExecuteBody>,
) -> Result<Json<ExecuteView>, ApiError> {
    let r = st
        .manager
        .execute(Execute {
            language: b.language,
            code: b.code,
            timeout_s: b.timeout.unwrap_or(30),
        })
        .await?;
    Ok(Json(ExecuteView {
        stdout: r.stdout,
        stderr: r.stderr,
        exit_code: r.exit_code,
        load_time: ms(r.load),
        exec_time: ms(r.exec),
        language: r.language,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RootfsView {
    language: String,
    template: String,
    /// `ready`, `building` or `failed`.
    status: &'static str,
    /// Bytes of its files (when measured).
    size: Option<u64>,
    path: Option<String>,
    packages: Vec<String>,
    error: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RootfsList {
    rootfs: Vec<RootfsView>,
}

#[utoipa::path(get, path = "/api/v1/rootfs", tag = "runner", responses((status = 200, description = "Root filesystems built or being built, one entry per language", body = RootfsList)))]
pub async fn list_rootfs(State(st): State<AppState>) -> Json<RootfsList> {
    let mut rootfs = Vec::new();
    for l in st.manager.languages() {
        let state = st.manager.rootfs_state(&l).await;
        let mut v = RootfsView {
            status: state_name(&state),
            language: l.name,
            template: l.template,
            size: None,
            path: None,
            packages: Vec::new(),
            error: None,
        };
        match state {
            RootfsState::Missing => continue,
            RootfsState::Ready(info) => {
                v.size = info.size_bytes;
                v.path = Some(info.path);
                v.packages = info.packages;
            }
            RootfsState::Failed(e) => v.error = Some(e),
            RootfsState::Building => {}
        }
        rootfs.push(v);
    }
    Json(RootfsList { rootfs })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LanguageBody {
    language: String,
    /// Accepted for compatibility; root filesystems here are btrfs subvolumes that grow
    /// as needed.
    size_mb: Option<u64>,
    /// Accepted for compatibility (sandboxes get the server's default memory).
    mem_mb: Option<u64>,
    /// Accepted for compatibility.
    vcpus: Option<u32>,
    /// Warm pool only: ready sandboxes to keep (default 2, 0 stops; at most 16).
    size: Option<usize>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Accepted {
    message: String,
    language: String,
}

fn lang_of(st: &AppState, b: &LanguageBody) -> Result<Language, ApiError> {
    let _ = (b.size_mb, b.mem_mb, b.vcpus);
    Ok(st.manager.language(&b.language)?)
}

#[utoipa::path(post, path = "/api/v1/rootfs", tag = "runner", request_body = LanguageBody, responses((status = 202, description = "Build started (or already built or building)", body = Accepted), (status = "4XX", description = "Unknown language or invalid request", body = crate::error::ErrorBody)))]
pub async fn build_rootfs(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<LanguageBody>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let l = lang_of(&st, &b)?;
    let message = match st.manager.rootfs_state(&l).await {
        RootfsState::Ready(_) => "rootfs already built",
        RootfsState::Building => "rootfs creation in progress",
        RootfsState::Missing | RootfsState::Failed(_) => {
            st.manager.build_rootfs(&l);
            "rootfs creation started"
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            message: message.into(),
            language: l.name,
        }),
    ))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct WarmView {
    language: String,
    template: String,
    /// Sandboxes ready now.
    ready: usize,
    /// Sandboxes kept ready.
    size: usize,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct WarmList {
    snapshots: Vec<WarmView>,
}

#[utoipa::path(get, path = "/api/v1/snapshots", tag = "runner", responses((status = 200, description = "Warm pools: per language, sandboxes kept ready for execute", body = WarmList)))]
pub async fn list_warm(State(st): State<AppState>) -> Json<WarmList> {
    let pools = st.manager.warm_pools();
    let mut snapshots = Vec::new();
    for l in st.manager.languages() {
        if let Some(p) = pools
            .iter()
            .find(|p| p.template == l.template && p.target > 0)
        {
            snapshots.push(WarmView {
                language: l.name,
                template: p.template.clone(),
                ready: p.ready,
                size: p.target,
            });
        }
    }
    Json(WarmList { snapshots })
}

#[utoipa::path(post, path = "/api/v1/snapshots", tag = "runner", request_body = LanguageBody, responses((status = 202, description = "Warm pool (re)sized; it fills in the background", body = Accepted), (status = "4XX", description = "Unknown language, rootfs not built, or invalid request", body = crate::error::ErrorBody)))]
pub async fn warm(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<LanguageBody>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let l = lang_of(&st, &b)?;
    let n = b.size.unwrap_or(DEFAULT_WARM);
    if n > 16 {
        return Err(ApiError::BadRequest("size must be at most 16".into()));
    }
    if !matches!(st.manager.rootfs_state(&l).await, RootfsState::Ready(_)) {
        return Err(ApiError::Core(forkbox_core::CoreError::Conflict(format!(
            "the rootfs of {} is not built; POST /api/v1/rootfs first",
            l.name
        ))));
    }
    st.manager.warm_up(&l, n);
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            message: "snapshot creation started".into(),
            language: l.name,
        }),
    ))
}
