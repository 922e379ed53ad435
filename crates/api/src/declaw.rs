//! The Declaw dialect (seed 004 and the real `declaw` client from PyPI), served at the
//! root (`/sandboxes…`, no `/v1`: the client's one setting, `DECLAW_DOMAIN=host:port`,
//! carries no path) and under `/declaw` (for a client built with an `api_url`).
//!
//! Same core, sandboxes, keys and workspaces as forkbox's own API; translated here:
//! views with `sandbox_id`/`template_id`/`state`/`started_at`/`end_at`, errors with a
//! `message`, `commands` run to one JSON result (or started in the background, then
//! waited on by pid), `commands/stream` as SSE `{"type","data"}` lines then
//! `{"exit_code"}`, files by `?path=` (text as JSON, bytes at `files/raw`), snapshots of
//! a sandbox's files. Keys: `X-API-Key` or `Authorization: Bearer` (the client sends
//! the latter). Calls forkbox does not serve answer `501` saying why.

use crate::dialect::{collect, not_offered, timeout_note};
use crate::error::ApiError;
use crate::extract::{JsonBody, PathArgs, QueryArgs};
use crate::owned::Sbx;
use crate::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::{Extension, Json, Router};
use forkbox_core::auth::Principal;
use forkbox_core::{
    CoreError, CreateRequest, ExecCommand, FileErrorKind, ListFilter, OnTimeout, RuntimeError,
    Sandbox, SandboxRef, Status, Work,
};
use forkbox_types::agent::{FileInfo, FileKind, FileOp, FileOpReply};
use forkbox_types::exec::{EventKind, ExecEvent};
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;

/// Where the dialect is also mounted (it is served at the root too).
pub const PREFIX: &str = "/declaw";

/// Declaw's default template (a real one: a minimal Debian with a shell and common
/// tools, built by `make test` and `forkbox template prepare base`, or on first use).
const DEFAULT_TEMPLATE: &str = "base";

/// The client's default sandbox life.
const DEFAULT_TIMEOUT_S: u64 = 300;

/// Deepest `files/list` walk.
const MAX_DEPTH: u32 = 16;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/sandboxes/kill-many", post(kill_many))
        .route("/sandboxes/{id}", get(get_one).delete(kill))
        .route("/sandboxes/{id}/status", get(status))
        .route("/sandboxes/{id}/timeout", patch(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/snapshot", post(snapshot))
        .route("/sandboxes/{id}/snapshots", get(snapshots))
        .route("/sandboxes/{id}/snapshots/{snap}", delete(delete_snapshot))
        .route("/sandboxes/{id}/commands", post(run).get(commands))
        .route("/sandboxes/{id}/commands/stream", post(run_stream))
        .route("/sandboxes/{id}/commands/{pid}", delete(kill_command))
        .route("/sandboxes/{id}/commands/{pid}/wait", get(wait))
        .route("/sandboxes/{id}/commands/{pid}/stdin", post(stdin))
        .route(
            "/sandboxes/{id}/files",
            get(read).post(write_text).delete(remove).patch(rename),
        )
        .route("/sandboxes/{id}/files/raw", get(read).put(write_raw))
        .route("/sandboxes/{id}/files/batch", post(write_batch))
        .route("/sandboxes/{id}/files/list", get(list_dir))
        .route("/sandboxes/{id}/files/exists", get(exists))
        .route("/sandboxes/{id}/files/info", get(info))
        .route("/sandboxes/{id}/files/mkdir", post(mkdir))
        .route(
            "/sandboxes/{id}/files/watch",
            post(|| not_offered("files/watch here is a stream: GET /v1/sandboxes/{id}/files/watch?path= on forkbox's own API (SSE)")),
        )
        .route(
            "/sandboxes/{id}/restore",
            post(|| not_offered("a snapshot is restored as a new sandbox here: POST /v1/sandboxes {\"snapshot\": \"snap-…\"} on forkbox's own API")),
        )
        .route(
            "/sandboxes/{id}/metrics",
            get(|| not_offered("per-sandbox metrics are not kept; the server's Prometheus metrics are at /metrics")),
        )
        .route(
            "/sandboxes/{id}/pty",
            post(|| not_offered("forkbox's terminal is a WebSocket: GET /v1/sandboxes/{id}/exec/pty")),
        )
        .layer(axum::middleware::map_response(message_errors))
}

/// Declaw's error shape: forkbox's `{"error", "code"}` with the text as `message`.
async fn message_errors(r: Response) -> Response {
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if r.status().is_success() || !is_json {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return (
            parts.status,
            Json(json!({"message": "error body unreadable"})),
        )
            .into_response();
    };
    let mut v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({}));
    if let Some(o) = v.as_object_mut() {
        if let Some(msg) = o.remove("error") {
            o.insert("message".into(), msg);
        }
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(v.to_string()))
}

/// A sandbox's state as Declaw names it.
fn state(s: Status) -> &'static str {
    match s {
        Status::Running => "running",
        Status::Paused | Status::Hibernated => "paused",
        _ => "killed",
    }
}

/// A sandbox as Declaw shows it.
fn view(s: &Sandbox) -> Value {
    json!({
        "sandbox_id": s.id,
        "template_id": s.template,
        "name": s.template,
        "metadata": s.metadata,
        "started_at": crate::sandboxes::rfc3339(s.created_at),
        "end_at": crate::sandboxes::rfc3339(s.ended_at.unwrap_or(s.expires_at)),
        "state": state(s.status),
        "cpu_count": s.cpu,
        "memory_mb": s.memory_mb,
        "envd_access_token": null,
        "sandbox_domain": null,
        "traffic_access_token": null,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkBody {
    #[serde(default)]
    allow_out: Vec<String>,
    /// Everything not allowed is denied here anyway.
    #[serde(default)]
    #[allow(dead_code)]
    deny_out: Vec<String>,
    /// Sandboxes take no inbound traffic here.
    #[allow(dead_code)]
    allow_public_traffic: Option<bool>,
    mask_request_host: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LifecycleBody {
    on_timeout: Option<String>,
    #[serde(default)]
    auto_resume: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    template: Option<String>,
    timeout: Option<u64>,
    /// Declaw's per-sandbox access token for its in-VM daemon; forkbox's API keys
    /// cover every call here.
    #[allow(dead_code)]
    secure: Option<bool>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    network: Option<NetworkBody>,
    lifecycle: Option<LifecycleBody>,
    vault_refs: Option<Value>,
    security: Option<Value>,
    volumes: Option<Vec<Value>>,
}

/// Egress by host name (forkbox's allowlist); addresses and ranges are not offered.
fn egress_of(n: Option<NetworkBody>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(n) = n else { return Ok(None) };
    if n.mask_request_host.is_some() {
        return Err(ApiError::NotOffered(
            "mask_request_host is not offered: the egress proxy forwards to the host it was asked for".into(),
        ));
    }
    let mut names = Vec::new();
    for e in n.allow_out {
        let bare = e.split('/').next().unwrap_or_default();
        if e.contains('/') || bare.parse::<std::net::IpAddr>().is_ok() {
            return Err(ApiError::NotOffered(format!(
                "allow_out {e:?}: egress is allowed by host name only here (the proxy refuses addresses)"
            )));
        }
        names.push(e);
    }
    Ok((!names.is_empty()).then_some(names))
}

async fn create(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    JsonBody(b): JsonBody<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if b.vault_refs.is_some() || b.security.is_some() {
        return Err(ApiError::NotOffered(
            "vault_refs and security policies are not offered; pass secrets as envs".into(),
        ));
    }
    if b.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(ApiError::NotOffered(
            "Declaw volumes are not served; forkbox's own API mounts volumes: POST /v1/sandboxes {\"volumes\": [{\"id\", \"mount\"}]}".into(),
        ));
    }
    let on_timeout = match b.lifecycle {
        None => OnTimeout::Kill,
        Some(l) if l.auto_resume => {
            return Err(ApiError::NotOffered(
                "auto_resume is not offered: resume a paused sandbox with POST …/resume".into(),
            ))
        }
        Some(l) => match l.on_timeout.as_deref() {
            None | Some("kill") => OnTimeout::Kill,
            Some("pause") => OnTimeout::Hibernate,
            Some(o) => {
                return Err(ApiError::BadRequest(format!(
                    "lifecycle.on_timeout must be kill or pause, not {o:?}"
                )))
            }
        },
    };
    // `default` is the server's default template, as for Podflare's client.
    let template = match b.template.as_deref() {
        Some("default") => None,
        Some(t) => Some(t.to_owned()),
        None => Some(DEFAULT_TEMPLATE.to_owned()),
    };
    let s = st
        .manager
        .create(CreateRequest {
            template,
            timeout: Some(b.timeout.unwrap_or(DEFAULT_TIMEOUT_S)),
            metadata: b.metadata,
            env: b.envs,
            on_timeout,
            egress: egress_of(b.network)?,
            workspace: p.workspace,
            ..Default::default()
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view(&s))))
}

/// `GET /sandboxes[?limit=&next_token=&state=…]`: `{"sandboxes", "next_token"}` (a
/// cursor, `null` on the last page); `state` (`running`, `paused`) is repeatable.
async fn list(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Result<Json<Value>, ApiError> {
    let (mut limit, mut after, mut states) = (100u32, None, Vec::new());
    let bad = |k: &str, v: &str| ApiError::BadRequest(format!("bad {k} {v:?}"));
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match &*k {
            "limit" => limit = v.parse().map_err(|_| bad(&k, &v))?,
            "next_token" if v.is_empty() => {}
            "next_token" => after = Some(v.parse::<i64>().map_err(|_| bad(&k, &v))?),
            "state" => states.push(v.into_owned()),
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {k:?}"
                )))
            }
        }
    }
    let wanted = |s: &Sandbox| states.is_empty() || states.iter().any(|w| w == state(s.status));
    let (page, next) = st
        .manager
        .list(&ListFilter {
            limit: limit.clamp(1, 1000),
            after,
            workspace: Some(p.workspace.clone()),
            ..Default::default()
        })
        .await?;
    let sandboxes: Vec<Value> = page.iter().filter(|s| wanted(s)).map(view).collect();
    Ok(Json(json!({
        "sandboxes": sandboxes,
        "next_token": next.map(|n| n.to_string()),
    })))
}

async fn get_one(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<Value>, ApiError> {
    Ok(Json(view(&st.manager.any_record(&id).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillQuery {
    /// `async=true`: the client does not wait (here the kill is done before the answer
    /// either way).
    #[serde(rename = "async")]
    #[allow(dead_code)]
    not_waiting: Option<String>,
}

async fn kill(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(_q): QueryArgs<KillQuery>,
) -> Result<Json<Value>, ApiError> {
    st.manager.delete(&id).await?;
    Ok(Json(json!({"killed": true, "queued": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillManyBody {
    sandbox_ids: Vec<String>,
}

/// `POST /sandboxes/kill-many`: per id `{"killed": true}` or `{"error"}`.
async fn kill_many(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    QueryArgs(_q): QueryArgs<KillQuery>,
    JsonBody(b): JsonBody<KillManyBody>,
) -> Result<Json<Value>, ApiError> {
    if b.sandbox_ids.len() > 1000 {
        return Err(ApiError::BadRequest("at most 1000 sandbox_ids".into()));
    }
    let mut results = serde_json::Map::new();
    for sid in b.sandbox_ids {
        let r = match st.manager.sandbox_ref(&p, &sid).await {
            Ok(r) => st.manager.delete(&r).await,
            Err(e) => Err(e),
        };
        let v = match r {
            Ok(()) => json!({"killed": true}),
            Err(e) => json!({"error": e.to_string()}),
        };
        results.insert(sid, v);
    }
    Ok(Json(json!({ "results": results })))
}

async fn status(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<Value>, ApiError> {
    let s = st.manager.any_record(&id).await?;
    Ok(Json(json!({
        "sandbox_id": s.id,
        "is_running": s.status == Status::Running,
        "state": state(s.status),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutBody {
    timeout: u64,
}

/// `PATCH …/timeout`: `timeout` more seconds of life from now.
async fn set_timeout(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<TimeoutBody>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(view(&st.manager.set_timeout(&id, b.timeout).await?)))
}

/// `POST …/pause`: frozen in place (memory kept; `resume` continues it).
async fn pause(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<Value>, ApiError> {
    Ok(Json(view(&st.manager.pause(&id).await?)))
}

/// `POST …/resume`: a paused sandbox, or one hibernated by `lifecycle.on_timeout: pause`.
async fn resume(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<Value>, ApiError> {
    let s = st.manager.get(&id).await?;
    let s = if s.status == Status::Hibernated {
        st.manager.wake(&id).await?
    } else {
        st.manager.resume(&id).await?
    };
    Ok(Json(view(&s)))
}

fn snapshot_view(s: forkbox_core::Snapshot) -> Value {
    json!({"snapshot_id": s.id, "sandbox_id": s.sandbox_id, "source": "manual",
           "created_at": crate::sandboxes::rfc3339(s.created_at), "name": s.name,
           "mem_blob_key": "", "vmstate_blob_key": "", "mem_size_bytes": null,
           "pause_duration_ms": null})
}

/// `POST …/snapshot`: a snapshot of the sandbox's files (not its memory), named by time.
async fn snapshot(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<Value>, ApiError> {
    let name = crate::dialect::snapshot_name();
    Ok(Json(snapshot_view(st.manager.snapshot(&id, &name).await?)))
}

/// `GET …/snapshots`: the sandbox's snapshots, newest first.
async fn snapshots(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Sbx(id): Sbx,
) -> Result<Json<Value>, ApiError> {
    let mut all = st.manager.snapshots(Some(&p.workspace)).await?;
    all.retain(|s| s.sandbox_id == id.id());
    all.sort_by_key(|s| std::cmp::Reverse(s.created_at));
    let all: Vec<Value> = all.into_iter().map(snapshot_view).collect();
    Ok(Json(json!({ "snapshots": all })))
}

/// `DELETE …/snapshots/:snap`: idempotent (an unknown snapshot is already gone).
async fn delete_snapshot(
    State(st): State<AppState>,
    Extension(p): Extension<Principal>,
    Sbx(_id): Sbx,
    PathArgs((_, snap)): PathArgs<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    match st.manager.snapshot_ref(&p, &snap).await {
        Ok(r) => match st.manager.delete_snapshot(&r).await {
            Ok(()) | Err(CoreError::NoSnapshot(_)) => {}
            Err(e) => return Err(e.into()),
        },
        Err(CoreError::NoSnapshot(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Json(json!({"deleted": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    cmd: String,
    #[serde(default)]
    background: bool,
    user: Option<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
    /// Keep stdin open (background commands always take stdin here).
    #[allow(dead_code)]
    stdin: Option<bool>,
    /// Seconds; 0 or absent: no limit.
    timeout: Option<f64>,
    /// Set by `run_stream` (the stream's own route).
    #[allow(dead_code)]
    stream: Option<bool>,
}

impl RunBody {
    /// The command, once its user is one forkbox runs commands as.
    fn command(self) -> Result<ExecCommand, ApiError> {
        match self.user.as_deref() {
            None | Some("user") | Some("root") => {}
            Some(u) => {
                return Err(ApiError::BadRequest(format!(
                    "user {u:?}: commands run as the sandbox's root user here (\"user\" and \"root\" both mean it)"
                )))
            }
        }
        Ok(ExecCommand {
            work: Work::Command(self.cmd),
            cwd: self.cwd,
            env: self.envs,
            timeout: self.timeout.filter(|t| *t > 0.0),
        })
    }
}

/// A command's whole output and exit code; `None` for the code when its timeout
/// killed it.
async fn outcome(events: BoxStream<'static, ExecEvent>) -> (String, String, Option<i32>) {
    let c = collect(events).await;
    (c.stdout, c.stderr, c.code.filter(|_| !c.timed_out))
}

/// `POST …/commands`: runs a command to its end (`{"stdout","stderr","exit_code"}`;
/// past its `timeout`, 408) or, with `background`, starts it (`{"pid"}`).
async fn run(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<RunBody>,
) -> Result<Response, ApiError> {
    let background = b.background;
    let limit = b.timeout.unwrap_or_default();
    let cmd = b.command()?;
    if background {
        let bg = st.manager.exec_background(&id, cmd).await?;
        return Ok(Json(json!({"pid": bg.pid, "sandbox_id": id.to_string()})).into_response());
    }
    let (stdout, stderr, code) = outcome(st.manager.exec(&id, cmd).await?).await;
    match code {
        Some(c) if c != forkbox_core::EXIT_UNKNOWN => {
            Ok(Json(json!({"stdout": stdout, "stderr": stderr, "exit_code": c})).into_response())
        }
        Some(_) => Err(ApiError::Timeout(
            "the sandbox's agent went away; the command's outcome is unknown".into(),
        )),
        None => Ok((
            StatusCode::REQUEST_TIMEOUT,
            Json(json!({"message": format!("the command ran past its timeout ({limit}s) and was killed"),
                        "code": "timeout", "stdout": stdout, "stderr": stderr})),
        )
            .into_response()),
    }
}

/// `POST …/commands/stream`: SSE, one `{"type": "stdout"|"stderr", "data": line}` per
/// line as it is printed, then `{"exit_code"}`; a timeout is an `{"error"}` first.
async fn run_stream(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<RunBody>,
) -> Result<Response, ApiError> {
    let limit = b.timeout.unwrap_or_default();
    let events = crate::podflare::lines(st.manager.exec(&id, b.command()?).await?);
    let mut timed_out = false;
    let sse = events.flat_map(move |ev| {
        let data: Vec<Value> = match ev.kind {
            EventKind::Stdout(d) => vec![json!({"type": "stdout", "data": d})],
            EventKind::Stderr(d) if timeout_note(&d) => {
                timed_out = true;
                Vec::new()
            }
            EventKind::Stderr(d) => vec![json!({"type": "stderr", "data": d})],
            EventKind::Exit(c) if c == forkbox_core::EXIT_UNKNOWN => vec![
                json!({"error": "the sandbox's agent went away; the command's outcome is unknown"}),
            ],
            EventKind::Exit(c) if timed_out => vec![
                json!({"error": format!("the command ran past its timeout ({limit}s) and was killed")}),
                json!({"exit_code": c}),
            ],
            EventKind::Exit(c) => vec![json!({"exit_code": c})],
        };
        futures_util::stream::iter(
            data.into_iter()
                .map(|d| Ok::<_, Infallible>(Event::default().data(d.to_string()))),
        )
    });
    Ok(Sse::new(sse)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn parse_pid(s: &str) -> Result<i32, ApiError> {
    s.parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("{s} is not a pid")))
}

/// `GET …/commands`: the background commands still running.
async fn commands(State(st): State<AppState>, Sbx(id): Sbx) -> Result<Json<Value>, ApiError> {
    let running: Vec<Value> = st
        .manager
        .commands(&id)
        .await?
        .into_iter()
        .filter(|c| c.exit_code.is_none())
        .map(|c| json!({"pid": c.pid, "cmd": c.cmd, "is_pty": false, "envs": {}}))
        .collect();
    Ok(Json(Value::Array(running)))
}

async fn kill_command(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs((_, pid)): PathArgs<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    st.manager.command_signal(&id, parse_pid(&pid)?, 9).await?;
    Ok(Json(json!({"killed": true})))
}

/// `GET …/commands/:pid/wait`: waits for a background command; its kept output (the
/// last MiB of each stream) and exit code.
async fn wait(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs((_, pid)): PathArgs<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let pid = parse_pid(&pid)?;
    let exit_code = st.manager.command_wait(&id, pid).await?;
    let (stdout, stderr, _) = outcome(st.manager.command_output(&id, pid, false).await?).await;
    Ok(Json(
        json!({"stdout": stdout, "stderr": stderr, "exit_code": exit_code}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdinBody {
    data: String,
}

async fn stdin(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    PathArgs((_, pid)): PathArgs<(String, String)>,
    JsonBody(b): JsonBody<StdinBody>,
) -> Result<Json<Value>, ApiError> {
    st.manager
        .command_stdin(&id, parse_pid(&pid)?, b.data.into_bytes().into(), false)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
    /// Files belong to the sandbox's root user whoever asks.
    #[allow(dead_code)]
    username: Option<String>,
    depth: Option<u32>,
}

async fn read(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let text = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/"));
    let (size, stream) = st.manager.read_file(&id, &q.path).await?;
    let body = Body::from_stream(stream.map(|r| r.map_err(std::io::Error::other)));
    let kind = if text {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    let mut resp = ([(header::CONTENT_TYPE, kind)], body).into_response();
    if let Some(n) = size {
        resp.headers_mut().insert(header::CONTENT_LENGTH, n.into());
    }
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBody {
    path: String,
    data: String,
    #[allow(dead_code)]
    username: Option<String>,
}

async fn write_one(
    st: &AppState,
    id: &SandboxRef,
    path: &str,
    data: String,
) -> Result<Value, ApiError> {
    let bytes = bytes::Bytes::from(data.into_bytes());
    let chunk = futures_util::stream::once(async move { Ok::<_, std::io::Error>(bytes) });
    Ok(json!(st.manager.write_file(id, path, chunk.boxed()).await?))
}

/// `POST …/files {"path", "data"}`: text, written whole (parents made).
async fn write_text(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<WriteBody>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(write_one(&st, &id, &b.path, b.data).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchEntry {
    path: String,
    data: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    files: Vec<BatchEntry>,
    #[allow(dead_code)]
    username: Option<String>,
}

/// `POST …/files/batch`: several text files, in order.
async fn write_batch(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<BatchBody>,
) -> Result<Json<Value>, ApiError> {
    let mut written = Vec::with_capacity(b.files.len());
    for f in b.files {
        written.push(write_one(&st, &id, &f.path, f.data).await?);
    }
    Ok(Json(Value::Array(written)))
}

/// `PUT …/files/raw?path=`: the body's bytes, streamed (up to 500 MiB).
async fn write_raw(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let r = crate::files::write_stream(&st, &id, &q.path, &headers, body).await?;
    Ok(Json(json!(r)))
}

/// A file as Declaw lists it.
fn entry(f: FileInfo) -> Value {
    let kind = if f.kind == FileKind::Dir {
        "dir"
    } else {
        "file"
    };
    json!({"name": f.name, "path": f.path, "type": kind, "size": f.size})
}

/// The agent said there is no such file.
fn no_file(e: &CoreError) -> bool {
    matches!(
        e,
        CoreError::Runtime(RuntimeError::File {
            kind: FileErrorKind::NotFound,
            ..
        })
    )
}

/// `GET …/files/list?path=&depth=`: entries down to `depth` levels (default 1).
async fn list_dir(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    let depth = q.depth.unwrap_or(1).clamp(1, MAX_DEPTH);
    let mut out = Vec::new();
    let mut level = vec![q.path];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in level {
            let FileOpReply::Entries { entries } =
                crate::files::op(&st, &id, FileOp::Ls { path: dir }).await?
            else {
                return Err(ApiError::Internal("unexpected answer to ls".into()));
            };
            for e in entries {
                if e.kind == FileKind::Dir {
                    next.push(e.path.clone());
                }
                out.push(entry(e));
            }
        }
        level = next;
    }
    Ok(Json(Value::Array(out)))
}

async fn exists(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    let found = match st.manager.file_op(&id, FileOp::Stat { path: q.path }).await {
        Ok(_) => true,
        Err(e) if no_file(&e) => false,
        Err(e) => return Err(e.into()),
    };
    Ok(Json(json!({ "exists": found })))
}

async fn info(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(entry(crate::files::stat_of(&st, &id, q.path).await?)))
}

/// `DELETE …/files?path=`: a file or a whole directory.
async fn remove(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    QueryArgs(q): QueryArgs<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    crate::files::op(
        &st,
        &id,
        FileOp::Delete {
            path: q.path,
            recursive: true,
        },
    )
    .await?;
    Ok(Json(json!({"deleted": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameBody {
    old_path: String,
    new_path: String,
    #[allow(dead_code)]
    username: Option<String>,
}

async fn rename(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<RenameBody>,
) -> Result<Json<Value>, ApiError> {
    crate::files::op(
        &st,
        &id,
        FileOp::Rename {
            from: b.old_path,
            to: b.new_path.clone(),
        },
    )
    .await?;
    Ok(Json(entry(
        crate::files::stat_of(&st, &id, b.new_path).await?,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MkdirBody {
    path: String,
    #[allow(dead_code)]
    username: Option<String>,
}

/// `POST …/files/mkdir`: `{"created": false}` when the directory was there already.
async fn mkdir(
    State(st): State<AppState>,
    Sbx(id): Sbx,
    JsonBody(b): JsonBody<MkdirBody>,
) -> Result<Json<Value>, ApiError> {
    let existed = match st
        .manager
        .file_op(
            &id,
            FileOp::Stat {
                path: b.path.clone(),
            },
        )
        .await
    {
        Ok(FileOpReply::Info(i)) if i.kind == FileKind::Dir => true,
        Ok(_) => {
            return Err(ApiError::Core(CoreError::Invalid(format!(
                "{} exists and is not a directory",
                b.path
            ))))
        }
        Err(e) if no_file(&e) => false,
        Err(e) => return Err(e.into()),
    };
    if !existed {
        crate::files::op(&st, &id, FileOp::Mkdir { path: b.path }).await?;
    }
    Ok(Json(json!({ "created": !existed })))
}
