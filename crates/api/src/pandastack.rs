//! The PandaStack dialect, served under `/pandastack` (the real `pandastack` client's
//! base URL: `PANDASTACK_API=http://host:7070/pandastack`, docs/compatibility.md).
//!
//! Same core, sandboxes, keys and workspaces as forkbox's own API; translated here:
//! lists under `items`, sandbox views with PandaStack's fields, `ttl_seconds` as an idle
//! timeout, `persistent` as hibernate-on-expiry, files at `/fs`, `exec` as one JSON
//! result and `exec/stream` as SSE `chunk`/`exit_code`, snapshots at `/snapshots`,
//! volumes by name (mounted at `/mnt/<name>`), `me` and tokens by label and prefix, an
//! ended sandbox as 404 (the client has no "gone"). Calls forkbox does not serve answer
//! `501 not_offered` saying why.

use crate::dialect::{collect, not_offered, timeout_note, Collected};
use crate::error::ApiError;
use crate::extract::{JsonBody, PathArgs, QueryArgs};
use crate::owned::Sbx;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use forkbox_core::auth::Principal;
use forkbox_core::{
    CreateRequest, ExecCommand, ListFilter, OnTimeout, Sandbox, SandboxRef, VolumeMount, Work,
};
use forkbox_types::agent::{FileInfo, FileKind, FileOp, FileOpReply};
use forkbox_types::exec::EventKind;
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;

/// Where the dialect is mounted.
pub const PREFIX: &str = "/pandastack";

/// PandaStack's default template (a real one: Python with the data stack, built by
/// `make test` and `forkbox template prepare code-interpreter`, or on first use).
const DEFAULT_TEMPLATE: &str = "code-interpreter";

/// A sandbox's life when its only limit is PandaStack's idle TTL (forkbox's maximum).
const LIFE_S: u64 = 86400;

/// PandaStack's default idle TTL.
const DEFAULT_TTL_S: u64 = 300;

mod seed;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{id}", get(get_one).delete(kill))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/exec/stream", post(exec_stream))
        .route(
            "/v1/sandboxes/{id}/fs",
            get(crate::files::read)
                .put(crate::files::write)
                .delete(crate::files::delete),
        )
        .route("/v1/sandboxes/{id}/fs/dir", get(fs_dir))
        .route("/v1/sandboxes/{id}/fs/stat", get(fs_stat))
        .route("/v1/sandboxes/{id}/pause", post(crate::sandboxes::pause))
        .route("/v1/sandboxes/{id}/resume", post(crate::sandboxes::resume))
        .route(
            "/v1/sandboxes/{id}/hibernate",
            post(crate::sandboxes::hibernate),
        )
        .route("/v1/sandboxes/{id}/wake", post(wake))
        .route("/v1/sandboxes/{id}/snapshots", post(snapshot))
        .route("/v1/snapshots", get(snapshots))
        .route(
            "/v1/snapshots/{id}",
            get(crate::sandboxes::get_snapshot).delete(crate::sandboxes::delete_snapshot),
        )
        .route("/v1/sandboxes/{id}/logs", get(logs))
        .route(
            "/v1/sandboxes/{id}/lifecycle",
            get(lifecycle).patch(set_lifecycle),
        )
        .route("/v1/sandboxes/{id}/fork", post(fork))
        .route("/v1/volumes", post(create_volume).get(volumes))
        .route("/v1/volumes/{name}", get(volume).delete(delete_volume))
        .route("/v1/me", get(me))
        .route("/v1/me/tokens", get(tokens).post(create_token))
        .route("/v1/me/tokens/{prefix}", delete(revoke_token))
        .route("/v1/sandboxes/{id}/fork-tree", post(fork_tree))
        .route("/v1/sandboxes/{id}/promote", post(promote))
        .route("/v1/sandboxes/{id}/repl/sessions", post(create_context))
        .route(
            "/v1/sandboxes/{id}/repl/sessions/{ctx}",
            delete(delete_context),
        )
        .route("/v1/sandboxes/{id}/repl/sessions/{ctx}/run", post(run_in_context))
        .route("/v1/sandboxes/{id}/ports", get(crate::ports::list))
        .merge(seed::routes())
        .fallback(|| not_offered("not part of what this server speaks under /pandastack (apps, databases, functions, schedules, template builds); forkbox's own API is at /v1/… (docs/compatibility.md)"))
        // The client has no "gone": an ended sandbox is not found.
        .layer(axum::middleware::map_response(gone_as_not_found))
}

async fn gone_as_not_found(mut r: Response) -> Response {
    if r.status() == StatusCode::GONE {
        *r.status_mut() = StatusCode::NOT_FOUND;
    }
    r
}

/// A sandbox as PandaStack shows it (forkbox's view, plus PandaStack's fields).
fn view(s: Sandbox, from_snapshot: Option<String>) -> Value {
    let persistent = s.on_timeout == OnTimeout::Hibernate;
    let ttl = s.idle_timeout;
    let cpu = s.cpu;
    let mut v = serde_json::to_value(crate::sandboxes::sandbox_view(s)).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("cpu".into(), json!(cpu.round().max(1.0) as u64));
        o.insert("persistent".into(), json!(persistent));
        o.insert("ttl_seconds".into(), json!(ttl));
        o.insert("from_snapshot".into(), json!(from_snapshot));
        o.insert("boot_mode".into(), Value::Null);
        o.insert("guest_ip".into(), Value::Null);
    }
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeBody {
    /// The client's way: a volume by name, mounted at `/mnt/<name>`.
    name: Option<String>,
    /// Seed 002's way: a volume by id, mounted at `mount`.
    id: Option<String>,
    mount: Option<String>,
    #[serde(default, alias = "readOnly")]
    read_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    template: Option<String>,
    cpu: Option<f64>,
    memory_mb: Option<u64>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// Idle seconds before it is deleted (or hibernated, `persistent`).
    ttl_seconds: Option<u64>,
    #[serde(default)]
    persistent: bool,
    from_snapshot: Option<String>,
    #[serde(default)]
    volumes: Vec<VolumeBody>,
    /// Host names the sandbox may reach (through the egress proxy).
    egress_allowlist: Option<Vec<String>>,
}

async fn create(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    JsonBody(b): JsonBody<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut volumes = Vec::with_capacity(b.volumes.len());
    for v in &b.volumes {
        let key = match (&v.name, &v.id) {
            (Some(n), None) => n,
            (None, Some(id)) => id,
            _ => {
                return Err(ApiError::BadRequest(
                    "each volume names a volume by name or by id (one of them)".into(),
                ))
            }
        };
        let vol = volume_named(&st, &p, key).await?;
        volumes.push(VolumeMount {
            mount: v
                .mount
                .clone()
                .unwrap_or_else(|| format!("/mnt/{}", vol.name)),
            id: vol.id,
            read_only: v.read_only,
        });
    }
    // The client always names a template; a snapshot brings its own.
    let template = match (&b.from_snapshot, b.template) {
        (Some(_), _) => None,
        (None, t) => Some(t.unwrap_or_else(|| DEFAULT_TEMPLATE.to_owned())),
    };
    let s = st
        .manager
        .create(CreateRequest {
            template,
            cpu: b.cpu,
            memory_mb: b.memory_mb,
            timeout: Some(LIFE_S),
            idle_timeout: Some(b.ttl_seconds.unwrap_or(DEFAULT_TTL_S)),
            metadata: b.metadata,
            on_timeout: if b.persistent {
                OnTimeout::Hibernate
            } else {
                OnTimeout::Kill
            },
            snapshot: b.from_snapshot.clone(),
            workspace: p.workspace,
            volumes,
            egress: b.egress_allowlist,
            ..Default::default()
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view(s, b.from_snapshot))))
}

/// Every live sandbox of `p`'s workspace.
async fn all_live(st: &AppState, p: &Principal) -> Result<Vec<Sandbox>, ApiError> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = st
            .manager
            .list(&ListFilter {
                limit: 1000,
                after,
                workspace: Some(p.workspace.clone()),
                ..Default::default()
            })
            .await?;
        all.extend(page);
        match next {
            Some(n) => after = Some(n),
            None => return Ok(all),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    template: Option<String>,
    status: Option<String>,
}

/// `GET /v1/sandboxes[?template=&status=]`: the workspace's live sandboxes.
async fn list(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let items: Vec<Value> = all_live(&st, &p)
        .await?
        .into_iter()
        .filter(|s| q.template.as_ref().is_none_or(|t| &s.template == t))
        .filter(|s| q.status.as_ref().is_none_or(|x| &s.status.to_string() == x))
        .map(|s| view(s, None))
        .collect();
    Ok(Json(json!({ "items": items })))
}

async fn get_one(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<Value>, ApiError> {
    Ok(Json(view(st.manager.get(&id).await?, None)))
}

async fn kill(State(st): State<AppState>, Sbx(id): Sbx) -> Result<StatusCode, ApiError> {
    st.manager.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    cmd: String,
    timeout_seconds: Option<u64>,
}

/// Starts a command (a timeout of 0 or none: none).
async fn start(
    st: &AppState,
    id: &SandboxRef,
    b: ExecBody,
) -> Result<futures_util::stream::BoxStream<'static, forkbox_types::exec::ExecEvent>, ApiError> {
    Ok(st
        .manager
        .exec(
            id,
            ExecCommand {
                work: Work::Command(b.cmd),
                cwd: None,
                env: Default::default(),
                timeout: b.timeout_seconds.filter(|t| *t > 0).map(|t| t as f64),
            },
        )
        .await?)
}

/// `POST …/exec`: runs a command and answers one JSON result. A timeout is a 504 whose
/// message says so (the client raises `SandboxTimeout`); an agent lost mid-command 502.
async fn exec(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ExecBody>,
) -> Result<Json<Value>, ApiError> {
    let limit = b.timeout_seconds;
    let t0 = std::time::Instant::now();
    let Collected {
        stdout: out,
        stderr: err,
        code,
        timed_out,
    } = collect(start(&st, &id, b).await?).await;
    if timed_out {
        return Err(ApiError::Timeout(format!(
            "timeout: the command ran past {}s and was killed",
            limit.unwrap_or_default()
        )));
    }
    match code {
        Some(c) if c != forkbox_core::EXIT_UNKNOWN => Ok(Json(json!({
            "stdout": out, "stderr": err, "exit_code": c,
            "duration_ms": t0.elapsed().as_millis() as u64,
        }))),
        _ => Err(ApiError::Timeout(
            "the sandbox's agent went away; the command's outcome is unknown".into(),
        )),
    }
}

/// `POST …/exec/stream`: SSE `stdout`/`stderr` with `{"chunk"}`, then `exit` with
/// `{"exit_code"}`; a timeout is an `error` event; a lost agent ends the stream with
/// no `exit` (the client raises `ExecInterrupted`).
async fn exec_stream(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let limit = b.timeout_seconds.unwrap_or_default();
    let events = start(&st, &id, b).await?;
    let mut timed_out = false;
    let sse = events.filter_map(move |ev| {
        let e =
            match ev.kind {
                EventKind::Stdout(d) => Some(
                    Event::default()
                        .event("stdout")
                        .data(json!({"chunk": d}).to_string()),
                ),
                EventKind::Stderr(d) if timeout_note(&d) => {
                    timed_out = true;
                    None
                }
                EventKind::Stderr(d) => Some(
                    Event::default()
                        .event("stderr")
                        .data(json!({"chunk": d}).to_string()),
                ),
                EventKind::Exit(_) if timed_out => Some(Event::default().event("error").data(
                    json!({"error": format!("timeout: the command ran past {limit}s and was killed")}).to_string(),
                )),
                EventKind::Exit(c) if c == forkbox_core::EXIT_UNKNOWN => None,
                EventKind::Exit(c) => Some(
                    Event::default()
                        .event("exit")
                        .data(json!({"exit_code": c}).to_string()),
                ),
            };
        std::future::ready(e.map(Ok::<_, Infallible>))
    });
    Ok(Sse::new(sse)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
}

/// A file as PandaStack lists it (`mode` is the kind's letter, as `find -printf %y`).
fn file_view(f: FileInfo) -> Value {
    let (is_dir, mode) = match f.kind {
        FileKind::Dir => (true, "d"),
        FileKind::File => (false, "f"),
        FileKind::Symlink => (false, "l"),
        _ => (false, "o"),
    };
    json!({"name": f.name, "path": f.path, "is_dir": is_dir, "size": f.size,
           "mode": mode, "mtime": f.mtime})
}

async fn fs_dir(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    match st
        .manager
        .file_op(
            &id,
            FileOp::Ls {
                path: q.path.clone(),
            },
        )
        .await?
    {
        FileOpReply::Entries { entries } => Ok(Json(json!({
            "path": q.path,
            "entries": entries.into_iter().map(file_view).collect::<Vec<_>>(),
        }))),
        _ => Err(ApiError::Internal("unexpected answer to ls".into())),
    }
}

async fn fs_stat(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    match st
        .manager
        .file_op(&id, FileOp::Stat { path: q.path })
        .await?
    {
        FileOpReply::Info(info) => Ok(Json(file_view(info))),
        _ => Err(ApiError::Internal("unexpected answer to stat".into())),
    }
}

/// `POST …/wake`: idempotent on a running sandbox.
async fn wake(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<Value>, ApiError> {
    let s = st.manager.get(&id).await?;
    let s = if s.status == forkbox_core::Status::Hibernated {
        st.manager.wake(&id).await?
    } else {
        s
    };
    Ok(Json(view(s, None)))
}

fn snapshot_view(s: forkbox_core::Snapshot) -> Value {
    let created = crate::sandboxes::rfc3339(s.created_at);
    json!({"id": s.id, "snapshot_id": s.id, "name": s.name, "sandbox_id": s.sandbox_id,
           "template": s.template, "created_at": created, "size_bytes": null})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    name: Option<String>,
}

/// `POST …/snapshots` (the client: no body) or `…/snapshot` (seed 002: "a named
/// snapshot", `{name}`): a snapshot of the sandbox's files, named by time if unnamed.
async fn snapshot(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<SnapshotBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let name = b.name.unwrap_or_else(crate::dialect::snapshot_name);
    let s = st.manager.snapshot(&id, &name).await?;
    Ok((StatusCode::CREATED, Json(snapshot_view(s))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotsQuery {
    sandbox_id: Option<String>,
}

/// `GET /v1/snapshots[?sandbox_id=]`, newest first.
async fn snapshots(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    QueryArgs(q): QueryArgs<SnapshotsQuery>,
) -> Result<Json<Value>, ApiError> {
    let mut all = st.manager.snapshots(Some(&p.workspace)).await?;
    all.retain(|s| q.sandbox_id.as_ref().is_none_or(|id| &s.sandbox_id == id));
    all.sort_by_key(|s| std::cmp::Reverse(s.created_at));
    Ok(Json(
        json!({"snapshots": all.into_iter().map(snapshot_view).collect::<Vec<_>>()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    /// stdout, stderr or both: forkbox's sandbox log is one stream (its agent's).
    #[allow(dead_code)]
    stream: Option<String>,
    follow: Option<String>,
}

/// `GET …/logs`: plain text lines; followed, SSE `{"line"}`.
async fn logs(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<LogsQuery>,
) -> Result<Response, ApiError> {
    let follow = crate::extract::flag(q.follow.as_deref(), "follow")?;
    let lines = st.manager.logs(&id, follow).await?;
    if follow {
        let sse = lines
            .map(|l| Ok::<_, Infallible>(Event::default().data(json!({"line": l}).to_string())));
        return Ok(Sse::new(sse)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let text: Vec<String> = lines.collect().await;
    let mut body = text.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

fn lifecycle_view(s: &Sandbox) -> Value {
    json!({"ttl_seconds": s.idle_timeout, "persistent": s.on_timeout == OnTimeout::Hibernate,
           "idle_seconds": null})
}

async fn lifecycle(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<Value>, ApiError> {
    Ok(Json(lifecycle_view(&st.manager.get(&id).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LifecycleBody {
    ttl_seconds: Option<u64>,
    persistent: Option<bool>,
}

/// `PATCH …/lifecycle`: the idle TTL and persistence.
async fn set_lifecycle(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<LifecycleBody>,
) -> Result<Json<Value>, ApiError> {
    let s = st
        .manager
        .set_expiry_policy(
            &id,
            b.ttl_seconds.map(Some),
            b.persistent.map(|p| {
                if p {
                    OnTimeout::Hibernate
                } else {
                    OnTimeout::Kill
                }
            }),
        )
        .await?;
    Ok(Json(lifecycle_view(&s)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkBody {
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// `POST …/fork`: one child, with the parent's metadata and `metadata`'s over it.
async fn fork(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ForkBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut out = st.manager.fork(&id, 1, &b.metadata).await?;
    let child = out
        .children
        .pop()
        .ok_or_else(|| ApiError::Internal("fork made no child".into()))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "sandbox": view(child, None) })),
    ))
}

/// Metadata keys of a fork tree's children: the tree, and the sandbox it forked from.
const TREE_KEY: &str = "fork_tree_id";
const PARENT_KEY: &str = "fork_parent_id";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkTreeBody {
    count: u32,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// `POST …/fork-tree`: `count` children of one fork (1 to 32), each tagged with the
/// tree's id and its parent in its metadata, which `promote` uses to find a winner's
/// siblings.
async fn fork_tree(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ForkTreeBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let tree = forkbox_core::ids::new("tree");
    let mut metadata = b.metadata;
    metadata.insert(TREE_KEY.into(), tree.clone());
    metadata.insert(PARENT_KEY.into(), id.to_string());
    let out = st.manager.fork(&id, b.count, &metadata).await?;
    let children: Vec<Value> = out.children.into_iter().map(|c| view(c, None)).collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({ "tree_id": tree, "parent_id": id.to_string(), "children": children })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    #[serde(default)]
    cleanup_siblings: bool,
    tree_id: Option<String>,
}

/// `POST …/promote`: a fork child already lives on its own here (its parent may end
/// before it), so promoting one is about its tree: with `cleanup_siblings` every other
/// live sandbox of the tree (`tree_id`, else the child's own tag) is deleted.
/// Idempotent; a sibling that cannot be deleted is reported in `failures`.
async fn promote(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<PromoteBody>,
) -> Result<Json<Value>, ApiError> {
    let winner = st.manager.get(&id).await?;
    let tree = b.tree_id.or_else(|| winner.metadata.get(TREE_KEY).cloned());
    let (mut deleted, mut failures) = (Vec::new(), Vec::new());
    if b.cleanup_siblings {
        let Some(tree) = &tree else {
            return Err(ApiError::BadRequest(format!(
                "{id} was not made by fork-tree: pass tree_id to clean up siblings"
            )));
        };
        for s in all_live(&st, &p).await? {
            if s.id == winner.id || s.metadata.get(TREE_KEY) != Some(tree) {
                continue;
            }
            let gone = match st.manager.sandbox_ref(&p, &s.id).await {
                Ok(r) => st.manager.delete(&r).await.map_err(ApiError::from),
                Err(e) => Err(e.into()),
            };
            match gone {
                Ok(()) => deleted.push(s.id),
                Err(e) => failures.push(json!({"sandbox_id": s.id, "error": e.to_string()})),
            }
        }
    }
    Ok(Json(json!({
        "winner": winner.id,
        "tree_id": tree,
        "deleted": deleted,
        "failures": failures,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContextBody {
    language: Option<String>,
}

/// `POST …/repl/sessions`: a code context, Python or JavaScript
/// (`forkbox_core::manager::contexts`).
async fn create_context(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<ContextBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let lang = crate::contexts::language(b.language.as_deref()).map_err(ApiError::NotOffered)?;
    let ctx = st.manager.open_context(&id, lang, None).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": ctx, "language": lang.as_str()})),
    ))
}

/// `DELETE …/repl/sessions/:ctx`: its namespace is dropped (404 when there is none).
async fn delete_context(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs((_, ctx)): PathArgs<(String, String)>,
) -> Result<StatusCode, ApiError> {
    st.manager.close_context(&id, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    code: String,
    timeout_ms: Option<u64>,
}

/// `POST …/repl/sessions/:ctx/run`: the cell in the context; PandaStack's execution:
/// `results` (MIME bundles: the last expression's `text/plain` and rich reprs,
/// matplotlib figures as `image/png`), `stdout`, `stderr`, `error` (the traceback),
/// `exit_code`, `duration_ms`. Past `timeout_ms` the cell is interrupted: 504.
async fn run_in_context(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs((_, ctx)): PathArgs<(String, String)>,
    JsonBody(b): JsonBody<RunBody>,
) -> Result<Json<Value>, ApiError> {
    let t0 = std::time::Instant::now();
    let timeout = b.timeout_ms.filter(|t| *t > 0).map(|t| t as f64 / 1000.0);
    let r = st.manager.run_context(&id, &ctx, &b.code, timeout).await?;
    Ok(Json(json!({
        "results": r.results,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "exit_code": r.exit_code,
        "error": r.error,
        "duration_ms": t0.elapsed().as_millis() as u64,
    })))
}

fn template_view(name: &str, t: &forkbox_core::templates::Template) -> Value {
    json!({"name": name, "size_bytes": t.size_bytes, "base": t.base, "cpu": 1,
           "memory_mb": 512, "is_global": true,
           "description": format!("forkbox template {}", t.name),
           "meta": {"packages": t.packages}})
}

/// `GET /v1/templates`: a bare list of the built templates.
async fn templates(State(st): State<AppState>) -> Json<Value> {
    let all = st.manager.templates().await;
    Json(Value::Array(
        all.iter().map(|t| template_view(&t.name, t)).collect(),
    ))
}

async fn template(
    State(st): State<AppState>,
    PathArgs(name): PathArgs<String>,
) -> Result<Json<Value>, ApiError> {
    let t = st.manager.template(&name).await?;
    Ok(Json(template_view(&name, &t)))
}

fn volume_view(v: forkbox_core::Volume) -> Value {
    let created = crate::sandboxes::rfc3339(v.created_at);
    json!({"id": v.id, "name": v.name, "size_mb": v.size_mb,
           "size_bytes": v.size_mb << 20, "created_at": created})
}

async fn volume_named(
    st: &AppState,
    p: &Principal,
    name: &str,
) -> Result<forkbox_core::Volume, ApiError> {
    st.manager
        .volumes(&p.workspace)
        .await?
        .into_iter()
        .find(|v| v.name == name || v.id == name)
        .ok_or_else(|| forkbox_core::CoreError::NoVolume(name.to_owned()).into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeCreate {
    name: String,
    size_mb: u64,
}

/// `POST /v1/volumes`: names are unique in a workspace and safe as `/mnt/<name>`.
async fn create_volume(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    JsonBody(b): JsonBody<VolumeCreate>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let ok = !b.name.is_empty()
        && b.name.len() <= 64
        && b.name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_');
    if !ok {
        return Err(ApiError::BadRequest(
            "volume names are 1-64 characters of a-z, 0-9, '-' and '_'".into(),
        ));
    }
    if volume_named(&st, &p, &b.name).await.is_ok() {
        return Err(
            forkbox_core::CoreError::Conflict(format!("a volume named {} exists", b.name)).into(),
        );
    }
    let v = st
        .manager
        .create_volume(&p.workspace, &b.name, b.size_mb)
        .await?;
    Ok((StatusCode::CREATED, Json(volume_view(v))))
}

async fn volumes(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let all = st.manager.volumes(&p.workspace).await?;
    Ok(Json(
        json!({"items": all.into_iter().map(volume_view).collect::<Vec<_>>()}),
    ))
}

async fn volume(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(name): PathArgs<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(volume_view(volume_named(&st, &p, &name).await?)))
}

async fn delete_volume(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(name): PathArgs<String>,
) -> Result<StatusCode, ApiError> {
    let v = volume_named(&st, &p, &name).await?;
    st.manager.delete_volume(&p.workspace, &v.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/me`: the caller (a workspace is PandaStack's organisation).
async fn me(Extension(p): Extension<Principal>) -> Json<Value> {
    let org = json!({"slug": p.workspace, "name": p.workspace});
    Json(json!({
        "user_id": p.token_id.clone().unwrap_or_else(|| "local".into()),
        "email": "",
        "current_org": org,
        "orgs": [org],
        "auth_method": if p.token_id.is_some() { "token" } else { "none" },
        "workspace": p.workspace,
        "admin": p.admin,
    }))
}

fn token_view(t: &forkbox_core::auth::Token) -> Value {
    let created = crate::sandboxes::rfc3339(t.created_at);
    let expires = t.expires_at.map(crate::sandboxes::rfc3339);
    json!({"id": t.id, "prefix": t.prefix, "label": t.name, "name": t.name, "created_at": created,
           "expires_at": expires})
}

/// `GET /v1/me/tokens`: the workspace's keys in force.
async fn tokens(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let all = st.manager.tokens(&p).await?;
    let items: Vec<Value> = all
        .iter()
        .filter(|t| t.in_force(time::OffsetDateTime::now_utc()) && t.workspace == p.workspace)
        .map(token_view)
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    #[serde(alias = "name")]
    label: String,
    expires_in_days: Option<u64>,
}

async fn create_token(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    JsonBody(b): JsonBody<TokenBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let expires = crate::auth::expires_after(b.expires_in_days.map(|d| d.saturating_mul(86400)))?;
    let t = st
        .manager
        .create_token(&p, &b.label, Some(&p.workspace.clone()), false, expires)
        .await?;
    let mut v = token_view(&t.token);
    v["token"] = json!(t.key);
    Ok((StatusCode::CREATED, Json(v)))
}

/// `DELETE /v1/me/tokens/{prefix}` (or seed 002's `/v1/auth/tokens/{id}`): the
/// workspace's one key in force with that prefix, or that id.
async fn revoke_token(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    PathArgs(prefix): PathArgs<String>,
) -> Result<StatusCode, ApiError> {
    let all = st.manager.tokens(&p).await?;
    let hits: Vec<_> = all
        .iter()
        .filter(|t| {
            t.revoked_at.is_none()
                && t.workspace == p.workspace
                && (t.prefix == prefix || t.id == prefix)
        })
        .collect();
    match hits.as_slice() {
        [] => Err(forkbox_core::CoreError::NoToken(prefix).into()),
        [t] => {
            st.manager.revoke_token(&p, &t.id).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        _ => Err(forkbox_core::CoreError::Conflict(format!(
            "several keys start with {prefix}; revoke by id on forkbox's own API"
        ))
        .into()),
    }
}
