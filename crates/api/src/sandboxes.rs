//! `/v1/sandboxes` routes.

use crate::extract::JsonBody;
use crate::owned::{Sbx, SbxPair, Snap};
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use forkbox_core::SandboxRef;
use forkbox_core::{
    CreateRequest, ExecCommand, ListFilter, OnTimeout, Sandbox, Snapshot, Status, Work,
};
use forkbox_types::agent::Language;
pub use forkbox_types::api::SandboxView;
use forkbox_types::api::{CreateBody, ExecBody, ForkBody, ForkView, ListView, VolumeMountBody};
use forkbox_types::exec::EventKind;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// A time as every answer writes it (RFC 3339, UTC as given).
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A sandbox as the API shows it.
pub fn sandbox_view(s: Sandbox) -> SandboxView {
    SandboxView {
        id: s.id,
        status: s.status.to_string(),
        runtime: s.runtime,
        template: s.template,
        cpu: s.cpu,
        memory_mb: s.memory_mb,
        disk_mb: s.disk_mb,
        timeout: s.timeout,
        idle_timeout: s.idle_timeout,
        metadata: s.metadata,
        created_at: rfc3339(s.created_at),
        expires_at: rfc3339(s.expires_at),
        ended_at: s.ended_at.map(rfc3339),
        end_reason: s.end_reason,
        boot_ms: s.boot_ms,
        parent: s.parent,
        on_timeout: s.on_timeout.as_str().to_owned(),
        egress_allowlist: s.egress,
        volumes: s
            .volumes
            .into_iter()
            .map(|v| VolumeMountBody {
                id: v.id,
                mount: v.mount,
                read_only: v.read_only,
            })
            .collect(),
        node: s.node,
    }
}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateBody, responses((status = 201, body = SandboxView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn create(
    State(st): State<AppState>,
    axum::Extension(p): axum::Extension<forkbox_core::auth::Principal>,
    forwarded: Option<axum::Extension<crate::forward::Forwarded>>,
    headers: axum::http::HeaderMap,
    JsonBody(b): JsonBody<CreateBody>,
) -> Result<axum::response::Response, ApiError> {
    use forkbox_core::manager::nodes::Owner;
    if let Some(axum::Extension(f)) = forwarded {
        // Placed here by another node: its reservation ends once this is recorded.
        let _reserved = crate::forward::Reserved::new(&st.manager, f.placement);
        return make(&st, p, &headers, b).await;
    }
    // From a snapshot or with volumes: made on the node that holds them.
    if b.snapshot.is_some() || !b.volumes.is_empty() {
        let volumes: Vec<&str> = b.volumes.iter().map(|v| v.id.as_str()).collect();
        if let Owner::Elsewhere { node, url, up } =
            st.manager.home_of(b.snapshot.as_deref(), &volumes).await?
        {
            let held = b
                .snapshot
                .clone()
                .or_else(|| volumes.first().map(|v| (*v).to_owned()))
                .unwrap_or_default();
            if !up {
                return Err(crate::forward::unheard(&held, &node));
            }
            return match crate::forward::create_on(&st, &headers, &b, &node, &url, None).await? {
                Some(r) => Ok(r),
                None => Err(crate::forward::unheard(&held, &node)),
            };
        }
        return make(&st, p, &headers, b).await;
    }
    // With several nodes, the best one makes it.
    let template = b
        .template
        .clone()
        .unwrap_or_else(|| st.manager.default_template());
    let placed = st
        .manager
        .place(&template, b.runtime.as_deref(), b.memory_mb)
        .await?;
    let _reserved = crate::forward::Reserved::new(&st.manager, placed.token.clone());
    let made = match &placed.owner {
        Owner::Elsewhere { node, url, .. } => {
            match crate::forward::create_on(&st, &headers, &b, node, url, placed.token.as_deref())
                .await
            {
                Ok(Some(r)) => Ok(r),
                // Not reached: made here.
                Ok(None) => make(&st, p, &headers, b).await,
                Err(e) => Err(e),
            }
        }
        Owner::Here => make(&st, p, &headers, b).await,
    };
    made
}

/// A create made on this node.
async fn make(
    st: &AppState,
    p: forkbox_core::auth::Principal,
    headers: &axum::http::HeaderMap,
    b: CreateBody,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    let traceparent = b.traceparent.or_else(|| {
        headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    match b.network.as_deref() {
        None | Some("none") => {}
        Some("full") => {
            return Err(ApiError::BadRequest(
                "network \"full\" (NAT egress) is not offered by this server; use egress_allowlist"
                    .into(),
            ))
        }
        Some(_) => return Err(ApiError::BadRequest("network must be none or full".into())),
    }
    let s = st
        .manager
        .create(CreateRequest {
            template: b.template,
            cpu: b.cpu,
            memory_mb: b.memory_mb,
            disk_mb: b.disk_mb,
            timeout: b.timeout,
            idle_timeout: b.idle_timeout,
            env: b.env,
            metadata: b.metadata,
            on_timeout: match b.on_timeout.as_deref() {
                None => OnTimeout::Kill,
                Some(v) => OnTimeout::parse(v).ok_or_else(|| {
                    ApiError::BadRequest("on_timeout must be kill or hibernate".into())
                })?,
            },
            snapshot: b.snapshot,
            traceparent,
            workspace: p.workspace,
            egress: b.egress_allowlist,
            volumes: b
                .volumes
                .into_iter()
                .map(|v| forkbox_core::VolumeMount {
                    id: v.id,
                    mount: v.mount,
                    read_only: v.read_only,
                })
                .collect(),
            runtime: b.runtime,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(sandbox_view(s))).into_response())
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/hibernate", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")), responses((status = 200, body = SandboxView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn hibernate(
    State(st): State<AppState>,
    Sbx(id): Sbx,
) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(sandbox_view(st.manager.hibernate(&id).await?)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct WakeView {
    #[serde(flatten)]
    sandbox: SandboxView,
    /// Whether memory and processes carried on (the runtime keeps them), else only files.
    memory_restored: bool,
    note: &'static str,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/wake", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")), responses((status = 200, body = WakeView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn wake(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<WakeView>, ApiError> {
    let sandbox = st.manager.wake(&id).await?;
    let memory = st.manager.capabilities(&sandbox).hibernate_keeps_memory;
    Ok(Json(WakeView {
        sandbox: sandbox_view(sandbox),
        memory_restored: memory,
        note: if memory {
            "the whole sandbox was restored: memory, REPL state and running processes carry on"
        } else {
            "this runtime keeps the filesystem across hibernation but not live memory: REPL state and running processes start fresh"
        },
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    name: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SnapshotView {
    id: String,
    name: String,
    sandbox_id: String,
    template: String,
    created_at: String,
    /// The runtime that took it: a `jail` snapshot holds the sandbox's files, a `vm`
    /// one the whole guest (memory and processes too).
    runtime: String,
}

impl From<Snapshot> for SnapshotView {
    fn from(s: Snapshot) -> Self {
        SnapshotView {
            id: s.id,
            name: s.name,
            sandbox_id: s.sandbox_id,
            template: s.template,
            created_at: rfc3339(s.created_at),
            runtime: s.runtime,
        }
    }
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshot", tag = "snapshots", params(("id" = String, Path, description = "Sandbox id")), request_body = SnapshotBody, responses((status = 201, body = SnapshotView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn snapshot(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<SnapshotBody>,
) -> Result<(StatusCode, Json<SnapshotView>), ApiError> {
    let s = st.manager.snapshot(&id, &b.name).await?;
    Ok((StatusCode::CREATED, Json(s.into())))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SnapshotList {
    snapshots: Vec<SnapshotView>,
}

#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots", responses((status = 200, body = SnapshotList), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn list_snapshots(
    State(st): State<AppState>,
    axum::Extension(p): axum::Extension<forkbox_core::auth::Principal>,
) -> Result<Json<SnapshotList>, ApiError> {
    Ok(Json(SnapshotList {
        snapshots: st
            .manager
            .snapshots(Some(&p.workspace))
            .await?
            .into_iter()
            .map(Into::into)
            .collect(),
    }))
}

#[utoipa::path(get, path = "/v1/snapshots/{id}", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id")), responses((status = 200, body = SnapshotView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn get_snapshot(
    State(st): State<AppState>,
    Snap(id): Snap,
) -> Result<Json<SnapshotView>, ApiError> {
    Ok(Json(st.manager.get_snapshot(&id).await?.into()))
}

#[utoipa::path(delete, path = "/v1/snapshots/{id}", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id")), responses((status = 204, description = "Deleted"), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn delete_snapshot(
    State(st): State<AppState>,
    Snap(id): Snap,
) -> Result<StatusCode, ApiError> {
    st.manager.delete_snapshot(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")), responses((status = 200, body = SandboxView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn get(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(sandbox_view(st.manager.get(&id).await?)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    template: Option<String>,
    /// `running`, `paused`, `deleted`, `killed`, `failed`, or `all`.
    status: Option<String>,
    limit: Option<u32>,
    next_token: Option<String>,
}

/// Largest page.
const MAX_LIMIT: u32 = 1000;

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", params(("template" = Option<String>, Query), ("status" = Option<String>, Query, description = "running, paused, hibernated, deleted, killed, failed, merged, lost or all"), ("limit" = Option<u32>, Query), ("next_token" = Option<String>, Query)), responses((status = 200, body = ListView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn list(
    State(st): State<AppState>,
    axum::Extension(p): axum::Extension<forkbox_core::auth::Principal>,
    q: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ListView>, ApiError> {
    let axum::extract::Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("bad query string: {}", e.body_text())))?;
    let mut filter = ListFilter {
        template: q.template,
        limit: q.limit.unwrap_or(100),
        workspace: Some(p.workspace),
        ..Default::default()
    };
    if filter.limit == 0 || filter.limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    match q.status.as_deref() {
        None => {}
        Some("all") => filter.all = true,
        Some(s) => {
            filter.status = Some(Status::parse(s).ok_or_else(|| {
                ApiError::BadRequest(
                    "status must be running, paused, hibernated, deleted, killed, failed, merged, lost or all".into(),
                )
            })?)
        }
    }
    if let Some(t) = q.next_token {
        filter.after = Some(t.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| {
            ApiError::BadRequest("next_token is not one this server issued".into())
        })?);
    }
    let (page, next) = st.manager.list(&filter).await?;
    Ok(Json(ListView {
        sandboxes: page.into_iter().map(sandbox_view).collect(),
        next_token: next.map(|n| n.to_string()),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutBody {
    /// Seconds of life from now.
    timeout: u64,
}

#[utoipa::path(method(post, patch), path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")), request_body = TimeoutBody, responses((status = 200, body = SandboxView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn set_timeout(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<TimeoutBody>,
) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(sandbox_view(
        st.manager.set_timeout(&id, b.timeout).await?,
    )))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")), responses((status = 200, body = SandboxView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn pause(
    State(st): State<AppState>,
    Sbx(id): Sbx,
) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(sandbox_view(st.manager.pause(&id).await?)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")), responses((status = 200, body = SandboxView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn resume(
    State(st): State<AppState>,
    Sbx(id): Sbx,
) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(sandbox_view(st.manager.resume(&id).await?)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "fork", params(("id" = String, Path, description = "Sandbox id")), request_body = ForkBody, responses((status = 200, body = ForkView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn fork(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ForkBody>,
) -> Result<Json<ForkView>, ApiError> {
    let n = b.n.unwrap_or(1);
    let max = i64::from(forkbox_core::MAX_FORK);
    if !(1..=max).contains(&n) {
        return Err(ApiError::BadRequest(format!(
            "n must be between 1 and {max} (got {n})"
        )));
    }
    let out = st.manager.fork(&id, n as u32, &b.metadata).await?;
    Ok(Json(ForkView {
        parent: id.to_string(),
        children: out.children.iter().map(|s| s.id.clone()).collect(),
        sandboxes: out.children.into_iter().map(sandbox_view).collect(),
        carried: out.carried,
        not_carried: out.not_carried,
    }))
}

/// Commits fork descendant `{winner}`'s state as `{id}`'s (the seed's order: the
/// ancestor first). `{id}` keeps its id; `{winner}` is consumed (410 afterwards).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/merge_into/{winner}", tag = "fork", params(("id" = String, Path, description = "The ancestor, whose state is replaced"), ("winner" = String, Path, description = "A fork descendant of it, consumed")), responses((status = 200, body = SandboxView), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn merge_into(
    State(st): State<AppState>,
    SbxPair(id, winner): SbxPair,
) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(sandbox_view(
        st.manager.merge_into(&winner, &id).await?,
    )))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")), responses((status = 204, description = "Deleted"), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn delete(State(st): State<AppState>, Sbx(id): Sbx) -> Result<StatusCode, ApiError> {
    st.manager.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
struct ExecResult {
    stdout: String,
    stderr: String,
    exit_code: i32,
}

/// The JSON answers of exec: a result (`wait`) or a started command (`background`).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum ExecJson {
    Result(ExecResult),
    Started(crate::commands::CommandView),
}

/// Validates an exec body and starts the call.
async fn start_exec(
    st: &AppState,
    id: &SandboxRef,
    b: ExecBody,
) -> Result<futures_util::stream::BoxStream<'static, forkbox_types::exec::ExecEvent>, ApiError> {
    if let Some(ctx) = b.context {
        let Some(code) = b.code.filter(|_| b.cmd.is_none()) else {
            return Err(ApiError::BadRequest(
                "`context` goes with `code`, not `cmd`".into(),
            ));
        };
        if b.cwd.is_some() || !b.env.is_empty() {
            return Err(ApiError::BadRequest(
                "cwd and env apply to commands; a code context keeps its own".into(),
            ));
        }
        let lang = forkbox_core::manager::contexts::context_language(&ctx);
        if let (Some(name), Some(lang)) = (b.language.as_deref(), lang) {
            if Language::parse(name) != Some(lang) {
                return Err(ApiError::BadRequest(format!(
                    "context {ctx} is {}, not {name}",
                    lang.as_str()
                )));
            }
        }
        return Ok(st
            .manager
            .exec_in_context(id, &ctx, code, b.timeout)
            .await?);
    }
    let work = match (b.cmd, b.code) {
        (Some(c), None) => {
            if b.language.is_some() {
                return Err(ApiError::BadRequest(
                    "`language` goes with `code`, not `cmd`".into(),
                ));
            }
            Work::Command(c)
        }
        (None, Some(code)) => {
            let name = b.language.as_deref().unwrap_or("python");
            let language = Language::parse(name).ok_or_else(|| {
                ApiError::BadRequest("unsupported language; use python, javascript or bash".into())
            })?;
            Work::Code { language, code }
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "send either `cmd` or `code`, not both".into(),
            ))
        }
        (None, None) => return Err(ApiError::BadRequest("missing `cmd` or `code`".into())),
    };
    Ok(st
        .manager
        .exec(
            id,
            ExecCommand {
                work,
                cwd: b.cwd,
                env: b.env,
                timeout: b.timeout,
            },
        )
        .await?)
}

/// `POST …/exec/stream`: the same events as Server-Sent Events (`event:` the type,
/// `id:` the sequence number, `data:` the event as JSON).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec/stream", tag = "exec", params(("id" = String, Path, description = "Sandbox id")), request_body = ExecBody, responses((status = 200, description = "Server-Sent Events: stdout, stderr, exit", content_type = "text/event-stream", body = String), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn exec_stream(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    if b.wait || b.background {
        return Err(ApiError::BadRequest(
            "`wait` and `background` do not apply to a stream; use POST …/exec".into(),
        ));
    }
    let events = start_exec(&st, &id, b).await?;
    let sse = events.map(|ev| {
        let kind = match ev.kind {
            EventKind::Stdout(_) => "stdout",
            EventKind::Stderr(_) => "stderr",
            EventKind::Exit(_) => "exit",
        };
        let data = serde_json::to_string(&ev).unwrap_or_default();
        Ok::<_, std::convert::Infallible>(
            axum::response::sse::Event::default()
                .event(kind)
                .id(ev.seq.to_string())
                .data(data),
        )
    });
    Ok(axum::response::sse::Sse::new(sse).into_response())
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "exec", params(("id" = String, Path, description = "Sandbox id")), request_body = ExecBody, responses((status = 200, description = "The events as NDJSON (application/x-ndjson); with `wait`, one ExecResult; with `background`, the started command", content((String = "application/x-ndjson"), (ExecJson = "application/json"))), (status = "4XX", description = "Invalid request or wrong state", body = crate::error::ErrorBody), (status = "5XX", description = "Server or sandbox failure", body = crate::error::ErrorBody)))]
pub async fn exec(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let wait = b.wait;
    if b.background {
        if wait {
            return Err(ApiError::BadRequest(
                "`background` and `wait` exclude each other".into(),
            ));
        }
        if b.code.is_some() || b.language.is_some() || b.context.is_some() || b.cmd.is_none() {
            return Err(ApiError::BadRequest(
                "background applies to `cmd` only".into(),
            ));
        }
        let info = st
            .manager
            .exec_background(
                &id,
                ExecCommand {
                    work: Work::Command(b.cmd.unwrap_or_default()),
                    cwd: b.cwd,
                    env: b.env,
                    timeout: b.timeout,
                },
            )
            .await?;
        return Ok(Json(ExecJson::Started(info.into())).into_response());
    }
    let events = start_exec(&st, &id, b).await?;
    if wait {
        // One answer holds at most 1 MiB of each stream (a note on stderr says what
        // was cut); the command still runs to its end.
        let c = forkbox_core::runner::collect(events).await;
        let r = ExecResult {
            stdout: c.stdout,
            stderr: c.stderr,
            exit_code: c.exit_code,
        };
        return Ok(Json(ExecJson::Result(r)).into_response());
    }
    Ok(crate::extract::ndjson(events))
}
